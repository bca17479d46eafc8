"""Node health: a re-measured bandwidth profile compared with the node's own baseline (its
profile when the agent started), as readable issues. Pure: the loop probes, this judges.
"""

from __future__ import annotations

from gpuctl.core.model import BandwidthProfile, Gpu, IbPort

DEFAULT_HEALTH_INTERVAL_S = 300.0
# More than 15% below its own baseline: slower than run-to-run noise of a copy benchmark
# (a few %), the size of loss a throttled or failing HBM stack shows.
DEFAULT_MIN_BANDWIDTH_FRACTION = 0.85
# A reading equal to the floor, up to float rounding, is fine.
_ROUNDING = 1e-9


def check_health(
    baseline: BandwidthProfile, current: BandwidthProfile, *, min_bandwidth_fraction: float
) -> tuple[str, ...]:
    """What got worse since `baseline`, one readable line per issue; () when nothing did.

    GPUs are matched by UUID, not index: when one falls off the bus the driver renumbers the
    rest, and comparing by index would blame the wrong ones.
    """
    now_by_uuid = {_gpu_key(g): g for g in current.gpus}
    issues: list[str] = []
    for was in baseline.gpus:
        gpu = now_by_uuid.get(_gpu_key(was))
        if gpu is None:
            issues.append(f"GPU {was.index} ({was.uuid}) is gone")
            continue
        issues.extend(_gpu_issues(was, gpu, min_bandwidth_fraction))
    ports_now = {(p.device, p.port): p for p in current.ib_ports}
    for was in sorted(baseline.ib_ports, key=lambda p: (p.device, p.port)):
        issues.extend(_port_issues(was, ports_now.get((was.device, was.port))))
    return tuple(issues)


def _gpu_key(gpu: Gpu) -> str:
    return gpu.uuid or f"index {gpu.index}"


def _gpu_issues(was: Gpu, gpu: Gpu, min_fraction: float) -> list[str]:
    name = f"GPU {gpu.index}"
    issues: list[str] = []
    if gpu.nvlink_links_active < was.nvlink_links_active:
        total = gpu.nvlink_links_total or was.nvlink_links_total
        issues.append(
            f"{name}: NVLink {gpu.nvlink_links_active}/{total} links active "
            f"(was {was.nvlink_links_active})"
        )
    if _pcie_degraded(gpu) and not _pcie_degraded(was):
        issues.append(f"{name}: PCIe link x{gpu.pcie_width} (max x{gpu.pcie_max_width})")
    base, now = was.measured_hbm_gbps, gpu.measured_hbm_gbps
    # Only a measured figure against a measured one: the node is compared with itself, and a
    # datasheet number says nothing about this GPU's HBM.
    if base and now is not None and now < base * min_fraction * (1 - _ROUNDING):
        below = (1 - now / base) * 100
        issues.append(
            f"{name}: HBM {now:.0f} GB/s measured, {below:.0f}% below its baseline {base:.0f}"
        )
    return issues


def _pcie_degraded(gpu: Gpu) -> bool:
    """The link trained narrower than the GPU can do (0: the probe does not know).

    Only the width counts: GPUs drop their link *generation* at idle to save power, so a gen
    below max says nothing about the link, while a x16 card that comes up at x8 is a fault."""
    return 0 < gpu.pcie_width < gpu.pcie_max_width


def _port_issues(was: IbPort, port: IbPort | None) -> list[str]:
    name = f"{was.device} port {was.port}"
    if not _active(was):
        return []  # a port that was down at start is not ours to complain about
    if port is None:
        return [f"{name} is gone (was ACTIVE)"]
    if not _active(port):
        return [f"{name} is {_state(port) or 'in no state'} (was ACTIVE)"]
    if 0 < port.rate_gbps < was.rate_gbps:
        return [f"{name} at {port.rate_gbps:g} Gb/s (was {was.rate_gbps:g})"]
    return []


def _state(port: IbPort) -> str:
    # sysfs writes "4: ACTIVE"; a probe may pass that through or keep only the word.
    return port.state.rpartition(":")[2].strip().upper()


def _active(port: IbPort) -> bool:
    return _state(port) == "ACTIVE"
