"""sysfs and psutil readings: IB/RoCE ports from a fake /sys tree, Ethernet NICs from fake
psutil stats, the `Network` the profile derives from them, and PCI locality."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gpuctl.agent.sysfs import (
    EthernetNic,
    canonical_bus_id,
    derive_network,
    ethernet_nics,
    format_cpulist,
    parse_cpulist,
    parse_rate,
    parse_state,
    pci_local_cpulist,
    pci_numa_node,
    read_ib_ports,
)
from gpuctl.core.model import IbPort, NetKind, Network
from tests.nvml_fixtures import SysfsPort, ndr_ports, write_sysfs


@pytest.mark.parametrize(
    ("text", "gbps"),
    [
        ("400 Gb/sec (4X NDR)", 400.0),
        ("200 Gb/sec (2X NDR)", 200.0),
        ("100 Gb/sec (4X EDR)", 100.0),
        ("56 Gb/sec (4X FDR)", 56.0),
        ("2.5 Gb/sec (1X SDR)", 2.5),
        ("", 0.0),
        ("garbage", 0.0),
    ],
)
def test_parse_rate(text: str, gbps: float) -> None:
    assert parse_rate(text) == gbps


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("4: ACTIVE", "ACTIVE"),
        ("1: DOWN", "DOWN"),
        ("5: LinkUp", "LinkUp"),
        ("3: Disabled", "Disabled"),
        ("ACTIVE", "ACTIVE"),
    ],
)
def test_parse_state(text: str, word: str) -> None:
    assert parse_state(text) == word


def test_read_ib_ports_from_a_fake_tree(tmp_path) -> None:
    write_sysfs(
        tmp_path,
        ports=(
            *ndr_ports(2),
            SysfsPort(device="mlx5_2", state="1: DOWN", phys_state="3: Disabled"),
            SysfsPort(
                device="mlx5_3",
                rate="200 Gb/sec (2X NDR)",
                link_layer="Ethernet",
                gid0="fe80:0000:0000:0000:0000:0000:0000:0000",  # no GID: node_guid instead
                node_guid="b83f:d203:0045:6789",
            ),
        ),
    )

    ports = read_ib_ports(tmp_path)

    assert ports[0] == IbPort(
        device="mlx5_0",
        port=1,
        rate_gbps=400.0,
        state="ACTIVE",
        phys_state="LinkUp",
        link_layer="InfiniBand",
        guid="0c42:a103:00f1:0000",  # the lower 64 bits of GID 0
    )
    assert [(p.device, p.state, p.phys_state) for p in ports[1:3]] == [
        ("mlx5_1", "ACTIVE", "LinkUp"),
        ("mlx5_2", "DOWN", "Disabled"),
    ]
    assert (ports[3].link_layer, ports[3].rate_gbps, ports[3].guid) == (
        "Ethernet",
        200.0,
        "b83f:d203:0045:6789",
    )


def test_no_infiniband_directory_means_no_ports(tmp_path) -> None:
    assert read_ib_ports(tmp_path) == ()


def test_ports_sort_numerically(tmp_path) -> None:
    write_sysfs(tmp_path, ports=[SysfsPort(device="mlx5_0", port=n) for n in (10, 2, 1)])
    assert [p.port for p in read_ib_ports(tmp_path)] == [1, 2, 10]


@dataclass(frozen=True)
class Stats:
    """psutil's snicstats, the fields we read."""

    isup: bool = True
    speed: int = 100_000  # Mb/s
    flags: str = "up,broadcast,running,multicast"


def test_ethernet_nics_skip_loopback_down_unknown_and_virtual(tmp_path) -> None:
    stats = {
        "lo": Stats(speed=0, flags="up,loopback,running"),
        "eno1": Stats(speed=25_000),
        "ens2f0": Stats(speed=100_000),
        "ens2f1": Stats(isup=False),
        "eth9": Stats(speed=0),  # virtio: no speed
        "docker0": Stats(speed=10_000),
        "veth12ab": Stats(speed=10_000),
        "ib0": Stats(speed=400_000),  # IPoIB: counted as an IB port, not Ethernet
    }

    assert ethernet_nics(stats, root=tmp_path) == (
        EthernetNic(name="eno1", gbps=25.0),
        EthernetNic(name="ens2f0", gbps=100.0),
    )


def test_ethernet_nics_ask_sysfs_where_it_knows(tmp_path) -> None:
    net = tmp_path / "sys/class/net"
    for name, physical, kind in (("eth0", False, "1"), ("enp1", True, "1"), ("enp2", True, "32")):
        (net / name).mkdir(parents=True)
        (net / name / "type").write_text(kind + "\n")
        if physical:
            (net / name / "device").mkdir()
    stats = {"eth0": Stats(), "enp1": Stats(), "enp2": Stats()}

    # eth0 is a container's veth end (no device), enp2 an IPoIB interface (type 32)
    assert ethernet_nics(stats, root=tmp_path) == (EthernetNic(name="enp1", gbps=100.0),)


def _ib(n: int, gbps: float, *, layer: str = "InfiniBand", state: str = "ACTIVE", first: int = 0):
    return [
        IbPort(
            device=f"mlx5_{first + i}",
            port=1,
            rate_gbps=gbps,
            state=state,
            phys_state="LinkUp",
            link_layer=layer,
        )
        for i in range(n)
    ]


def _eth(*gbps: float) -> list[EthernetNic]:
    return [EthernetNic(name=f"eth{i}", gbps=g) for i, g in enumerate(gbps)]


IB, ROCE, ETH = NetKind.INFINIBAND, NetKind.ROCE, NetKind.ETHERNET
NETWORK_CASES = [
    ("nothing", [], [], Network()),
    ("hgx-h100", _ib(8, 400), _eth(100), Network(kind=IB, ports=8, gbps_per_port=400)),
    # a 200G storage port beside the 8 compute ports: the compute fabric is 8 x 400
    (
        "storage-port",
        _ib(8, 400) + _ib(1, 200, first=8),
        [],
        Network(kind=IB, ports=8, gbps_per_port=400),
    ),
    (
        "down-ports",
        _ib(6, 400) + _ib(2, 400, state="DOWN", first=6),
        [],
        Network(kind=IB, ports=6, gbps_per_port=400),
    ),
    # RoCE compute fabric beside a slow IB management port: 8 x 400 beats 1 x 100
    (
        "roce",
        _ib(8, 400, layer="Ethernet") + _ib(1, 100, first=8),
        [],
        Network(kind=ROCE, ports=8, gbps_per_port=400),
    ),
    # the same ConnectX seen as an RDMA port and as a NIC: a tie, and RoCE can do RDMA
    (
        "roce-tie",
        _ib(2, 200, layer="Ethernet"),
        _eth(200, 200),
        Network(kind=ROCE, ports=2, gbps_per_port=200),
    ),
    ("ethernet", [], _eth(25, 100, 100), Network(kind=ETH, ports=2, gbps_per_port=100)),
    (
        "all-ib-down",
        _ib(8, 400, state="DOWN"),
        _eth(25),
        Network(kind=ETH, ports=1, gbps_per_port=25),
    ),
]


@pytest.mark.parametrize(
    ("ports", "nics", "network"), [c[1:] for c in NETWORK_CASES], ids=[c[0] for c in NETWORK_CASES]
)
def test_derive_network(ports, nics, network: Network) -> None:
    assert derive_network(ports, nics) == network


def test_operator_override_wins_even_none() -> None:
    assert derive_network(_ib(8, 400), [], Network()) == Network()
    forced = Network(kind=ROCE, ports=2, gbps_per_port=200)
    assert derive_network(_ib(8, 400), [], forced) == forced


@pytest.mark.parametrize(
    ("raw", "bus"),
    [
        ("00000000:18:00.0", "0000:18:00.0"),
        (b"00000000:DB:00.0", "0000:db:00.0"),
        ("0000:18:00.0", "0000:18:00.0"),
        ("00000001:0A:00.0", "0001:0a:00.0"),
        ("", ""),
    ],
)
def test_canonical_bus_id(raw: str | bytes, bus: str) -> None:
    assert canonical_bus_id(raw) == bus


def test_cpulists_round_trip() -> None:
    assert parse_cpulist("0-3,8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpulist(parse_cpulist("0-55,112-167")) == "0-55,112-167"
    assert (parse_cpulist(""), format_cpulist([])) == ((), "")


def test_pci_locality(tmp_path) -> None:
    write_sysfs(tmp_path, pci={"0000:18:00.0": (0, "0-55,112-167"), "0000:9a:00.0": (-1, "")})

    assert pci_numa_node("0000:18:00.0", tmp_path) == 0
    assert pci_local_cpulist("0000:18:00.0", tmp_path) == "0-55,112-167"
    assert pci_numa_node("0000:9a:00.0", tmp_path) == -1  # a one-socket host says -1
    assert pci_numa_node("0000:ff:00.0", tmp_path) is None  # no such device
    assert pci_local_cpulist("0000:ff:00.0", tmp_path) == ""
