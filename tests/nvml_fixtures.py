"""Fixture nodes for the NVML probe: boards of real parts (clocks, bus widths and NVLink links as
in `gpuctl.agent.fakenvml.PARTS`), the faults operators meet, and a fake sysfs tree builder for
InfiniBand ports and PCI locality.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gpuctl.agent.fakenvml import FakeGpu, fake_board, with_link_down, with_mig


@dataclass(frozen=True, slots=True, kw_only=True)
class SysfsPort:
    """One port as /sys/class/infiniband/<device>/ports/<port>/ shows it."""

    device: str
    port: int = 1
    rate: str = "400 Gb/sec (4X NDR)"
    state: str = "4: ACTIVE"
    phys_state: str = "5: LinkUp"
    link_layer: str = "InfiniBand"
    gid0: str = ""  # "" -> a GID built from the device number
    node_guid: str = ""


def ndr_ports(n: int = 8) -> tuple[SysfsPort, ...]:
    """A DGX/HGX H100's compute fabric: n ConnectX-7 ports at 400 Gb/s NDR, all up."""
    return tuple(SysfsPort(device=f"mlx5_{i}") for i in range(n))


def write_sysfs(
    root: Path,
    ports: Iterable[SysfsPort] = (),
    pci: Mapping[str, tuple[int, str]] | None = None,
) -> Path:
    """Build <root>/sys/... with these IB ports and PCI devices (bus id -> (NUMA node, CPUs))."""
    for p in ports:
        dev = root / "sys/class/infiniband" / p.device
        port = dev / "ports" / str(p.port)
        (port / "gids").mkdir(parents=True, exist_ok=True)
        number = int(p.device.rsplit("_", 1)[-1]) if p.device[-1].isdigit() else 0
        (port / "rate").write_text(p.rate + "\n")
        (port / "state").write_text(p.state + "\n")
        (port / "phys_state").write_text(p.phys_state + "\n")
        (port / "link_layer").write_text(p.link_layer + "\n")
        gid = p.gid0 or f"fe80:0000:0000:0000:0c42:a103:00f1:{number:04x}"
        (port / "gids" / "0").write_text(gid + "\n")
        (dev / "node_guid").write_text((p.node_guid or f"0c42:a103:00f1:{number:04x}") + "\n")
    for bus, (numa, cpus) in (pci or {}).items():
        dev = root / "sys/bus/pci/devices" / bus
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "numa_node").write_text(f"{numa}\n")
        (dev / "local_cpulist").write_text(cpus + "\n")
    return root


# -- boards ---------------------------------------------------------------------------------

H100_SXM_8 = fake_board("h100-sxm", 8, node="h100-a")
H200_8 = fake_board("h200", 8, node="h200-a")
A100_80G_SXM_8 = fake_board("a100-80g-sxm", 8, node="a100-a")
L40S_4 = fake_board("l40s", 4, node="l40s-a")
L4_1 = fake_board("l4", 1, node="l4-a")
# GPU 3 lost one of its 18 links (link 7): the board still forms one domain through the others.
H100_LINK_DOWN = with_link_down(H100_SXM_8, 3, 7)
# An A100 board with GPUs 0 and 1 partitioned into MIG instances, the rest whole.
A100_MIG = with_mig(A100_80G_SXM_8, 0, 1)

BOARDS: dict[str, tuple[FakeGpu, ...]] = {
    "h100-sxm-8": H100_SXM_8,
    "h200-8": H200_8,
    "a100-80g-sxm-8": A100_80G_SXM_8,
    "l40s-4": L40S_4,
    "l4-1": L4_1,
    "h100-link-down": H100_LINK_DOWN,
    "a100-mig": A100_MIG,
}
