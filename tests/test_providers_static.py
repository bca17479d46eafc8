"""The static provider: claiming nodes from a configured inventory, fabric by fabric."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpuctl.core.errors import InvalidArgument
from gpuctl.core.model import NetKind, Network
from gpuctl.providers.base import CapacityUnavailable, LeaseNotHeld, Sku, UnknownSku
from gpuctl.providers.static import StaticNode, StaticProvider

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HGX = Sku(
    provider="lab",
    name="hgx",
    gpu_model="H100 SXM",
    gpu_count=8,
    network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400),
)
L40S = Sku(provider="lab", name="l40s", gpu_model="L40S", gpu_count=4)


def node(name: str, fabric: str = "", sku: Sku = HGX, price: float = 10.0) -> StaticNode:
    return StaticNode(
        name=name, address=f"10.0.0.{name[-1]}", sku=sku, fabric=fabric, price_per_hour=price
    )


# Fabric ib-a has three HGX nodes (two on leaf1, one on leaf2), ib-b has two, h6 is on none.
INVENTORY = (
    node("h1", "ib-a/s1/leaf2"),
    node("h2", "ib-a/s1/leaf1"),
    node("h3", "ib-a/s1/leaf1"),
    node("h4", "ib-b/s1/leaf1", price=9.0),
    node("h5", "ib-b/s1/leaf1", price=9.0),
    node("h6"),
    node("l1", sku=L40S, price=3.0),
)


def provider(**kw) -> StaticProvider:
    return StaticProvider(INVENTORY, name="lab", **kw)


# fmt: off
CHOICES = [
    # id,                    count, fabric,          nodes claimed
    ("smallest-island-fits", 2,     None,            ("h4", "h5")),        # ib-b (2) fits, ib-a (3) stays whole
    ("bigger-island",        3,     None,            ("h2", "h3", "h1")),  # only ib-a fits; sorted by path: leaf1 first
    ("no-island-fits",       4,     None,            ("h1", "h2", "h3", "h4")),  # no fabric has 4: config order
    ("named-fabric",         2,     "ib-a",          ("h2", "h3")),
    ("narrower-path",        1,     "ib-a/s1/leaf2", ("h1",)),
    ("one-node",             1,     None,            ("h4",)),             # every island fits: ib-b is the smallest
]
# fmt: on


@pytest.mark.parametrize(
    ("count", "fabric", "expected"), [c[1:] for c in CHOICES], ids=[c[0] for c in CHOICES]
)
def test_acquire_chooses(count: int, fabric: str | None, expected: tuple[str, ...]) -> None:
    got = provider().acquire("hgx", count, fabric=fabric, now=T0)
    assert tuple(a.node for a in got) == expected
    assert len({a.lease_id for a in got}) == count
    for a in got:
        n = next(n for n in INVENTORY if n.name == a.node)
        assert (a.address, a.fabric, a.price_per_hour, a.acquired_at, a.expires_at) == (
            n.address,
            n.fabric,
            n.price_per_hour,
            T0,
            None,
        )


def test_claimed_nodes_are_not_offered_again_until_released() -> None:
    p = provider()
    first = p.acquire("hgx", 5, now=T0)
    assert {a.node for a in first} == {"h1", "h2", "h3", "h4", "h5"}
    last = p.acquire("hgx", 1, now=T0)
    assert last[0].node == "h6"
    with pytest.raises(CapacityUnavailable, match="sku hgx: 0 of 1 nodes free"):
        p.acquire("hgx", 1, now=T0)
    p.release(last[0].lease_id, now=T0)
    again = p.acquire("hgx", 1, now=T0 + timedelta(minutes=1))
    assert again[0].node == "h6"
    assert again[0].lease_id != last[0].lease_id  # a stale release cannot end the new claim
    p.release(last[0].lease_id, now=T0)
    assert again[0] in p.held()


def test_capacity_names_the_fabric_and_what_is_free() -> None:
    with pytest.raises(CapacityUnavailable) as e:
        provider().acquire("hgx", 4, fabric="ib-a", now=T0)
    assert str(e.value) == "provider lab: sku hgx: 3 of 4 nodes free on fabric ib-a"


def test_release_is_idempotent_and_renew_needs_a_held_lease() -> None:
    p = provider()
    (lease,) = p.acquire("l40s", 1, now=T0)
    assert p.renew(lease.lease_id, now=T0) is None  # owned nodes: a claim never expires
    p.release(lease.lease_id, now=T0)
    p.release(lease.lease_id, now=T0)
    p.release("never-was", now=T0)
    assert p.held() == ()
    with pytest.raises(LeaseNotHeld, match="holds no such lease"):
        p.renew(lease.lease_id, now=T0)


def test_claims_survive_a_restart_only_through_held() -> None:
    before = provider()
    claims = before.acquire("hgx", 2, now=T0)
    stray = claims[0].__class__(lease_id="lab/gone/1", sku="hgx", node="gone")
    after = provider(claimed=(*before.held(), stray))
    assert after.held() == before.held()  # the node no longer in config is not restored
    assert {a.node for a in after.acquire("hgx", 4, now=T0)}.isdisjoint({c.node for c in claims})
    assert provider().held() == ()  # no claims passed: none remembered


def test_skus_come_from_the_inventory() -> None:
    skus = {s.name: s for s in provider().skus()}
    assert set(skus) == {"hgx", "l40s"}
    assert skus["hgx"].price_per_hour == 9.0  # the cheapest node of the sku
    assert skus["l40s"].price_per_hour == 3.0


# fmt: off
BAD_CALLS = [
    # id,           sku,    count, now,                   error
    ("unknown-sku", "tpu",  1,     T0,                    UnknownSku),
    ("zero",        "hgx",  0,     T0,                    InvalidArgument),
    ("naive-now",   "hgx",  1,     datetime(2026, 1, 1),  InvalidArgument),
]
# fmt: on


@pytest.mark.parametrize(
    ("sku", "count", "now", "error"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_calls(sku: str, count: int, now: datetime, error: type[Exception]) -> None:
    p = provider()
    with pytest.raises(error):
        p.acquire(sku, count, now=now)
    assert p.held() == ()


def test_duplicate_nodes_and_disagreeing_skus_are_refused() -> None:
    odd = StaticNode(
        name="h9", address="10.0.0.9", sku=Sku(provider="lab", name="hgx", gpu_count=4)
    )
    with pytest.raises(InvalidArgument) as e:
        StaticProvider((*INVENTORY, INVENTORY[0], odd))
    fields = [v.field for v in e.value.violations]
    assert fields == ["node[7].name", "node[8].sku"]


SETTINGS = {
    "name": "lab",
    "kind": "static",
    "node": [
        {
            "name": "a1",
            "address": "10.1.0.1",
            "sku": "hgx-h100",
            "gpu_model": "H100 SXM",
            "gpu_count": 8,
            "fabric": "ib0/s1/l1",
            "network_kind": "infiniband",
            "network_gbps": 3200,
            "price_per_hour": 12.5,
        },
        {"name": "b1", "address": "10.1.0.2", "sku": "l4", "gpu_model": "L4", "gpu_count": 1},
    ],
}


def test_from_settings_fills_gpu_figures_from_the_specs() -> None:
    p = StaticProvider.from_settings(SETTINGS)
    skus = {s.name: s for s in p.skus()}
    hgx = skus["hgx-h100"]
    # H100 SXM row of gpu_specs.csv; 8 SXM GPUs form one NVLink domain.
    assert (hgx.hbm_gbps, hgx.nvlink_gbps, hgx.bf16_tflops, hgx.gpu_memory_gb) == (
        3350,
        900,
        989.4,
        80,
    )
    assert hgx.network.kind is NetKind.INFINIBAND and hgx.network.total_gbps == 3200
    assert hgx.price_per_hour == 12.5
    assert skus["l4"].nvlink_gbps == 0 and skus["l4"].price_per_hour == 0
    (lease,) = p.acquire("hgx-h100", 1, now=T0)
    assert (lease.node, lease.address, lease.fabric, lease.price_per_hour) == (
        "a1",
        "10.1.0.1",
        "ib0/s1/l1",
        12.5,
    )


# fmt: off
BAD_SETTINGS = [
    # id,             change to node[0],                       field named
    ("typo",          {"price_per_hr": 3.0},                   "node[0].price_per_hr"),
    ("no-address",    {"address": ""},                         "node[0].address"),
    ("bad-model",     {"gpu_model": "H100"},                   "node[0].gpu_model"),
    ("negative",      {"price_per_hour": -1},                  "node[0].price_per_hour"),
    ("bool-count",    {"gpu_count": True},                     "node[0].gpu_count"),
    ("bad-network",   {"network_kind": "nvlink"},              "node[0].network_kind"),
]
# fmt: on


@pytest.mark.parametrize(
    ("change", "field"), [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS]
)
def test_bad_settings_name_the_field(change: dict[str, object], field: str) -> None:
    settings = {**SETTINGS, "node": [{**SETTINGS["node"][0], **change}, SETTINGS["node"][1]]}
    with pytest.raises(InvalidArgument) as e:
        StaticProvider.from_settings(settings)
    assert field in [v.field for v in e.value.violations]
