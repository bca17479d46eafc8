"""One contract, every provider: acquire → held → renew → release → release again → held empty.

Each case is set up with room for exactly two nodes of its SKU. Also: the documented example
config/providers.toml builds one provider of each kind.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpuctl.core.model import NetKind, Network
from gpuctl.providers.base import CapacityUnavailable, LeaseNotHeld, Provider, Sku, UnknownSku
from gpuctl.providers.catalog import CatalogProvider
from gpuctl.providers.command import CommandProvider, Commands
from gpuctl.providers.static import StaticNode, StaticProvider
from tests.test_providers_command import GOOD, write_script

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
HGX = Sku(
    provider="p",
    name="hgx-h100",
    gpu_model="H100 SXM",
    gpu_count=8,
    network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400),
    region="r1",
    price_per_hour=23.6,
)


@dataclass(frozen=True)
class Case:
    provider: Provider
    renewed: Callable[[datetime], datetime | None]  # the expiry renew(now) must return


def static_case(tmp_path: Path) -> Case:
    nodes = [
        StaticNode(
            name=f"n{i}", address=f"10.0.0.{i}", sku=HGX, fabric="ib0/s1/l1", price_per_hour=23.6
        )
        for i in (1, 2)
    ]
    return Case(StaticProvider(nodes, name="p"), lambda now: None)


def command_case(tmp_path: Path) -> Case:
    argv = (str(write_script(tmp_path, "p", GOOD)), str(tmp_path / "state.json"))
    commands = Commands(acquire=argv, release=argv, list=argv, renew=argv, timeout_s=10)
    return Case(CommandProvider(commands, name="p", skus=(HGX,)), lambda now: now + HOUR)


def catalog_case(tmp_path: Path) -> Case:
    provider = CatalogProvider((HGX,), name="p", max_lease=4 * HOUR, capacity={HGX.name: 2})
    return Case(provider, lambda now: now + 4 * HOUR)


@pytest.fixture(
    params=[static_case, command_case, catalog_case], ids=["static", "command", "catalog"]
)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    return request.param(tmp_path)


def test_lease_lifecycle(case: Case) -> None:
    p = case.provider
    assert isinstance(p, Provider)
    assert p.name == "p"
    assert HGX.name in {s.name for s in p.skus()}
    assert p.held() == ()

    got = p.acquire(HGX.name, 2, now=T0)
    assert len(got) == 2 and len({a.lease_id for a in got}) == 2
    assert all(a.sku == HGX.name and a.price_per_hour == 23.6 and a.acquired_at == T0 for a in got)
    assert len({a.node for a in got}) == 2
    assert set(p.held()) == set(got)  # held() says exactly what acquire said

    with pytest.raises(CapacityUnavailable):
        p.acquire(HGX.name, 1, now=T0)
    assert set(p.held()) == set(got)  # a refused acquire holds nothing new

    later = T0 + HOUR
    assert p.renew(got[0].lease_id, now=later) == case.renewed(later)

    p.release(got[0].lease_id, now=later)
    assert [h.lease_id for h in p.held()] == [got[1].lease_id]
    p.release(got[0].lease_id, now=later)  # released twice: quiet
    with pytest.raises(LeaseNotHeld):
        p.renew(got[0].lease_id, now=later)
    p.release(got[1].lease_id, now=later)
    assert p.held() == ()

    again = p.acquire(HGX.name, 2, now=later)  # what was released can be leased again
    assert {a.lease_id for a in again}.isdisjoint({a.lease_id for a in got})
    for lease in again:
        p.release(lease.lease_id, now=later)
    assert p.held() == ()


def test_unknown_sku(case: Case) -> None:
    with pytest.raises(UnknownSku):
        case.provider.acquire("no-such-sku", 1, now=T0)
    assert case.provider.held() == ()


def test_the_documented_config_builds_every_kind() -> None:
    config = Path(__file__).resolve().parents[1] / "config" / "providers.toml"
    tables = tomllib.loads(config.read_text())["provider"]
    built = {}
    for table in tables:
        kind = table["kind"]
        if kind == "static":
            built[kind] = StaticProvider.from_settings(table)
        elif kind == "command":
            built[kind] = CommandProvider.from_settings(table)
        else:
            built[kind] = CatalogProvider.from_settings(table, base_dir=config.parent)
    assert set(built) == {"static", "command", "catalog"}
    assert len({p.name for p in built.values()}) == 3
    assert all(p.skus() for p in built.values())
