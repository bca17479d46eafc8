"""Provider settings from plain mappings (a parsed `[[provider]]` table) to typed values.

Every bad or unknown field becomes one `FieldViolation` naming its path, so a typo such as
`price_per_hr` is refused instead of silently making a node free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta

from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import NetKind, Network
from gpuctl.providers.base import Sku
from gpuctl.providers.specs import packaged_gpu_specs

# Rows of gpu_specs.csv whose NVLink (or Infinity Fabric) joins every GPU of a board. The
# "H100 PCIe" row's 600 GB/s is a bridge between a *pair* of cards, so a node of them is no
# NVLink domain: it gets 0 unless its settings say otherwise.
BOARD_MODELS = frozenset(
    {"H200 SXM", "H100 SXM", "A100 80GB SXM", "A100 40GB", "V100 SXM2 32GB", "MI300X"}
)

SKU_FIELDS = (
    "gpu_model",
    "gpu_count",
    "price_per_hour",
    "region",
    "network_kind",
    "network_gbps",
    "nvlink_gbps",
    "max_lease_s",
    "vcpus",
    "memory_gib",
)


class Fields:
    """Typed reads from one table; violations collect in `out` under `where.<key>`."""

    def __init__(self, raw: object, where: str, out: list[FieldViolation]) -> None:
        self.where, self.out = where, out
        if isinstance(raw, Mapping):
            self.raw: Mapping[str, object] = raw
        else:
            self.raw = {}
            out.append(FieldViolation(where, f"must be a table, got {type(raw).__name__}"))

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def bad(self, key: str, why: str) -> None:
        self.out.append(FieldViolation(self.path(key), why))

    def only(self, allowed: tuple[str, ...]) -> None:
        for key in self.raw:
            if key not in allowed:
                self.bad(key, f"is not a setting here; known: {', '.join(sorted(allowed))}")

    def text(self, key: str, *, required: bool = False, default: str = "") -> str:
        value = self.raw.get(key, None)
        if value is None or value == "":
            if required:
                self.bad(key, "is required")
            return default
        if not isinstance(value, str):
            self.bad(key, f"must be a string, got {value!r}")
            return default
        return value

    def number(self, key: str, *, default: float = 0.0, lo: float = 0.0) -> float:
        value = self.raw.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.bad(key, f"must be a number, got {value!r}")
            return default
        if value < lo:
            self.bad(key, f"must be >= {lo:g}, got {value!r}")
            return default
        return float(value)

    def whole(self, key: str, *, default: int = 0, lo: int = 0) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(key, f"must be a whole number, got {value!r}")
            return default
        if value < lo:
            self.bad(key, f"must be >= {lo}, got {value!r}")
            return default
        return value

    def argv(self, key: str, *, required: bool = False) -> tuple[str, ...]:
        value = self.raw.get(key)
        if value is None:
            if required:
                self.bad(key, 'is required: the command as a list, e.g. ["/path/to/script"]')
            return ()
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(a, str) and a for a in value)
        ):
            self.bad(key, f"must be a non-empty list of strings, got {value!r}")
            return ()
        return tuple(value)


def raise_if(out: list[FieldViolation]) -> None:
    if out:
        raise InvalidArgument(out)


def network_of(f: Fields) -> Network:
    kind_raw = f.text("network_kind", default=NetKind.ETHERNET.value)
    try:
        kind = NetKind(kind_raw)
    except ValueError:
        f.bad("network_kind", f"must be one of {', '.join(k.value for k in NetKind)}")
        kind = NetKind.ETHERNET
    gbps = f.number("network_gbps")
    # One "port" carrying the total: settings give the node's aggregate, not its NICs.
    return Network(kind=kind, ports=1 if gbps else 0, gbps_per_port=gbps)


def sku_from(f: Fields, *, provider: str, name: str) -> Sku:
    """A SKU from settings: GPU figures from gpu_specs.csv for its `gpu_model`."""
    model = f.text("gpu_model")
    specs = packaged_gpu_specs()
    spec = specs.get(model)
    if model and spec is None:
        f.bad("gpu_model", f"must be a row of gpu_specs.csv: {', '.join(specs)}")
    count = f.whole("gpu_count")
    default_nvlink = spec.nvlink_gbps if spec and model in BOARD_MODELS and count > 1 else 0.0
    max_lease_s = f.number("max_lease_s")
    return Sku(
        provider=provider,
        name=name,
        instance_type=name,
        gpu_model=model,
        gpu_count=count,
        gpu_memory_gb=spec.memory_gb if spec else 0.0,
        hbm_gbps=spec.hbm_gbps if spec else 0.0,
        nvlink_gbps=f.number("nvlink_gbps", default=default_nvlink),
        bf16_tflops=spec.bf16_tflops if spec else 0.0,
        network=network_of(f),
        region=f.text("region"),
        price_per_hour=f.number("price_per_hour"),
        max_lease=timedelta(seconds=max_lease_s) if max_lease_s else None,
        vcpus=f.number("vcpus"),
        memory_gib=f.number("memory_gib"),
    )
