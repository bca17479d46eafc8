"""Fabric claims checked against the measured InfiniBand/RoCE ports."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpuctl.core.fabric import fabric_issues
from gpuctl.core.model import BandwidthProfile, IbPort, Node


def port(guid: str, layer: str = "InfiniBand", state: str = "ACTIVE") -> IbPort:
    return IbPort(
        device="mlx5_0",
        port=1,
        rate_gbps=400,
        state=state,
        phys_state="LinkUp",
        link_layer=layer,
        guid=guid,
    )


def node(name: str, fabric: str = "ib-a/s1/l1", *ports: IbPort) -> Node:
    return Node(id=name, address=name, fabric=fabric, profile=BandwidthProfile(ib_ports=ports))


A = node("a", "ib-a/s1/l1", port("0x01"))
CASES = [
    ("plausible", node("b", "ib-a/s1/l2", port("0x02")), ()),
    ("no-fabric-claimed", node("b", "", port("0x01")), ()),
    (
        "cloned-guid",
        node("b", "ib-a/s1/l1", port("0x01")),
        ("port mlx5_0/1 GUID 0x01 is also reported by node a",),
    ),
    (
        "no-active-port",
        node("b", "ib-a/s1/l1", port("0x02", state="4: DOWN")),
        (
            "claims fabric ib-a but has no active InfiniBand/RoCE port (its other nodes have InfiniBand)",
        ),
    ),
    (
        "roce-on-an-ib-fabric",
        node("b", "ib-a/s1/l1", port("0x02", layer="Ethernet")),
        ("claims fabric ib-a with Ethernet ports; its other nodes use InfiniBand",),
    ),
    ("other-fabric-other-layer", node("b", "roce-b/s1/l1", port("0x02", layer="Ethernet")), ()),
]


@pytest.mark.parametrize(("case", "b", "expected"), CASES, ids=[c[0] for c in CASES])
def test_fabric_issues(case, b, expected):
    assert fabric_issues(b, [A, b]) == expected


def test_a_node_is_not_compared_with_itself():
    assert fabric_issues(A, [A, replace(A)]) == ()
