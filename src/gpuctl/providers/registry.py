"""Provider kinds by name: what a `[[provider]]` table's `kind` builds. A new kind is one entry
here (and its settings in config/providers.toml), nothing in the daemon."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from gpuctl.providers.base import Held, Provider
from gpuctl.providers.catalog import CatalogProvider
from gpuctl.providers.command import CommandProvider
from gpuctl.providers.static import StaticProvider


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """What a provider is built with besides its table."""

    base_dir: Path  # relative paths in the table are relative to this (the config's directory)
    held: tuple[Held, ...] = ()  # its open leases in the store: grants kept in memory come back


Factory = Callable[[Mapping[str, object], Setting], Provider]

KINDS: Mapping[str, Factory] = MappingProxyType(
    {
        "static": lambda table, s: StaticProvider.from_settings(table, claimed=s.held),
        "command": lambda table, s: CommandProvider.from_settings(table),
        "catalog": lambda table, s: CatalogProvider.from_settings(
            table, base_dir=s.base_dir, held=s.held
        ),
    }
)
