"""What sysfs and psutil say about the node's network and PCI devices: InfiniBand/RoCE ports from
/sys/class/infiniband, Ethernet NIC speeds, the `Network` derived from them, and a PCI device's
NUMA node and local CPUs. The root is an argument, so tests build a fake tree under tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from gpuctl.core.model import IbPort, NetKind, Network

ROOT = Path("/")
ACTIVE = "ACTIVE"
IB_LINK_LAYER = "InfiniBand"
ETHERNET_LINK_LAYER = "Ethernet"  # an RDMA port on Ethernet: RoCE
ARPHRD_ETHER = "1"  # /sys/class/net/*/type of an Ethernet interface (IPoIB is 32)

_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*Gb/sec")
# Interfaces that say nothing about the node's fabric where sysfs cannot tell us (no tree, e.g.
# in tests): bridges, container and overlay ends, tunnels, IPoIB (counted as IB ports instead).
_VIRTUAL_PREFIXES = (
    "lo", "docker", "veth", "br-", "virbr", "cni", "flannel", "cali", "vxlan", "tun", "tap",
    "kube", "weave", "genev", "tailscale", "wg", "zt", "ifb", "dummy", "ib",
)  # fmt: skip
# When two kinds carry the same total, prefer the one that can do RDMA.
_KIND_RANK = {NetKind.ETHERNET: 0, NetKind.ROCE: 1, NetKind.INFINIBAND: 2}


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def parse_rate(text: str) -> float:
    """'400 Gb/sec (4X NDR)' -> 400.0; anything unreadable -> 0.0."""
    match = _RATE_RE.match(text)
    return float(match[1]) if match else 0.0


def parse_state(text: str) -> str:
    """'4: ACTIVE' -> 'ACTIVE', '5: LinkUp' -> 'LinkUp'; a bare word stays as it is."""
    _, sep, word = text.partition(":")
    return (word if sep else text).strip()


def _port_guid(dev: Path, port: Path) -> str:
    # An IB port's GID 0 is the subnet prefix followed by the port GUID; the lower 64 bits are
    # what `ibstat` shows as "Port GUID". A zero GID (port down on some drivers) says nothing.
    groups = _read(port / "gids" / "0").split(":")
    try:
        if len(groups) == 8 and any(int(g or "0", 16) for g in groups[4:]):
            return ":".join(g.zfill(4) for g in groups[4:]).lower()
    except ValueError:
        pass
    return _read(dev / "node_guid").lower()


def _port_number(path: Path) -> int:
    return int(path.name) if path.name.isdigit() else -1


def read_ib_ports(root: Path = ROOT) -> tuple[IbPort, ...]:
    """Every InfiniBand/RoCE port under <root>/sys/class/infiniband, by device and port number."""
    base = root / "sys" / "class" / "infiniband"
    if not base.is_dir():
        return ()
    ports: list[IbPort] = []
    for dev in sorted(base.iterdir()):
        port_dirs = (dev / "ports").iterdir() if (dev / "ports").is_dir() else ()
        for port in sorted(port_dirs, key=_port_number):
            if _port_number(port) < 0:
                continue
            ports.append(
                IbPort(
                    device=dev.name,
                    port=_port_number(port),
                    rate_gbps=parse_rate(_read(port / "rate")),
                    state=parse_state(_read(port / "state")),
                    phys_state=parse_state(_read(port / "phys_state")),
                    link_layer=_read(port / "link_layer") or IB_LINK_LAYER,
                    guid=_port_guid(dev, port),
                )
            )
    return tuple(ports)


# -- Ethernet ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EthernetNic:
    name: str
    gbps: float


def _is_virtual(name: str, root: Path) -> bool:
    iface = root / "sys" / "class" / "net" / name
    if iface.exists():
        # A physical NIC has a `device` link to its PCI function; a container's eth0 (a veth)
        # does not, and its speed says nothing about the node's fabric.
        return not (iface / "device").exists() or _read(iface / "type") != ARPHRD_ETHER
    return name.startswith(_VIRTUAL_PREFIXES)


def ethernet_nics(
    stats: Mapping[str, Any] | None = None, *, root: Path = ROOT
) -> tuple[EthernetNic, ...]:
    """Physical Ethernet interfaces that are up and report a speed (psutil's Mb/s -> Gb/s)."""
    stats = psutil.net_if_stats() if stats is None else stats
    nics = []
    for name, st in sorted(stats.items()):
        if not st.isup or st.speed <= 0 or "loopback" in getattr(st, "flags", ""):
            continue
        if _is_virtual(name, root):
            continue
        nics.append(EthernetNic(name=name, gbps=st.speed / 1000))
    return tuple(nics)


def derive_network(
    ib_ports: Iterable[IbPort], nics: Iterable[EthernetNic], override: Network | None = None
) -> Network:
    """The inter-node network: the operator's --net if given, else the kind whose active ports
    at their top rate carry the most (RDMA kinds win ties); ports slower than that top rate
    (a storage NIC, a link that trained down) are left out of the count."""
    if override is not None:
        return override
    active = [p for p in ib_ports if p.state == ACTIVE and p.rate_gbps > 0]
    rates = {
        NetKind.INFINIBAND: [p.rate_gbps for p in active if p.link_layer == IB_LINK_LAYER],
        NetKind.ROCE: [p.rate_gbps for p in active if p.link_layer == ETHERNET_LINK_LAYER],
        NetKind.ETHERNET: [n.gbps for n in nics],
    }
    candidates = [
        Network(kind=kind, ports=r.count(max(r)), gbps_per_port=max(r))
        for kind, r in rates.items()
        if r
    ]
    if not candidates:
        return Network()
    return max(candidates, key=lambda n: (n.total_gbps, _KIND_RANK[n.kind]))


# -- PCI -----------------------------------------------------------------------------------


def canonical_bus_id(raw: str | bytes) -> str:
    """NVML's '00000000:18:00.0' -> '0000:18:00.0', the form lspci and sysfs use."""
    text = (raw.decode() if isinstance(raw, bytes) else raw).strip().lower()
    domain, sep, rest = text.partition(":")
    if not sep or not rest:
        return text
    return f"{int(domain or '0', 16):04x}:{rest}"


def pci_numa_node(bus_id: str, root: Path = ROOT) -> int | None:
    """The NUMA node the kernel gives the PCI device; None where sysfs does not say."""
    raw = _read(root / "sys" / "bus" / "pci" / "devices" / bus_id / "numa_node")
    try:
        return int(raw)
    except ValueError:
        return None


def pci_local_cpulist(bus_id: str, root: Path = ROOT) -> str:
    """The CPUs near the PCI device, e.g. '0-47,96-143'; '' where sysfs does not say."""
    return _read(root / "sys" / "bus" / "pci" / "devices" / bus_id / "local_cpulist")


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8' -> (0, 1, 2, 3, 8), the kernel's CPU list format."""
    cpus: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(cpus)))


def format_cpulist(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 3, 8) -> '0-3,8'."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
