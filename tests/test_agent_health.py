"""`check_health` as a table: a node's re-measured profile against its own baseline, one case
per kind of fault, plus the edges (exactly at the bandwidth floor, a port down from the start).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pytest

from gpuctl.agent.health import check_health
from gpuctl.core.model import BandwidthProfile, Gpu, IbPort

FRACTION = 0.85


def gpu(index: int, **kw: object) -> Gpu:
    base: dict[str, object] = dict(
        index=index,
        uuid=f"GPU-{index}",
        model="H100 SXM",
        memory_mib=81559,
        hbm_gbps=3350,
        nvlink_gbps=900,
        measured_hbm_gbps=3350.0,
        nvlink_links_active=18,
        nvlink_links_total=18,
        pcie_gen=5,
        pcie_width=16,
        pcie_max_gen=5,
        pcie_max_width=16,
    )
    base.update(kw)
    return Gpu(**base)  # type: ignore[arg-type]


def port(device: str, state: str = "ACTIVE", rate: float = 400) -> IbPort:
    return IbPort(
        device=device,
        port=1,
        rate_gbps=rate,
        state=state,
        phys_state="LinkUp" if state == "ACTIVE" else "Disabled",
        link_layer="InfiniBand",
    )


def profile(
    gpus: tuple[Gpu, ...] | None = None, ports: tuple[IbPort, ...] | None = None
) -> BandwidthProfile:
    return BandwidthProfile(
        gpus=gpus if gpus is not None else tuple(gpu(i) for i in range(8)),
        ib_ports=ports if ports is not None else tuple(port(f"mlx5_{i}") for i in range(4)),
    )


BASELINE = profile()


def with_gpu(index: int, **kw: object) -> BandwidthProfile:
    return replace(
        BASELINE, gpus=tuple(replace(g, **kw) if g.index == index else g for g in BASELINE.gpus)
    )


def with_port(device: str, **kw: object) -> BandwidthProfile:
    return replace(
        BASELINE,
        ib_ports=tuple(replace(p, **kw) if p.device == device else p for p in BASELINE.ib_ports),
    )


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    current: BandwidthProfile
    issues: tuple[str, ...]
    baseline: BandwidthProfile = BASELINE


# GPU 3 fell off the bus: the driver renumbers the GPUs after it (GPU-4 is index 3 now, ...),
# so only matching by UUID names the right one.
_RENUMBERED = tuple(
    replace(g, index=g.index - 1 if g.index > 3 else g.index) for g in BASELINE.gpus if g.index != 3
)

CASES = [
    Case("healthy", BASELINE, ()),
    Case(
        "only-the-measure-time-moved",
        replace(BASELINE, measured_at=datetime(2026, 1, 1, tzinfo=UTC)),
        (),
    ),
    Case("gpu-gone", replace(BASELINE, gpus=_RENUMBERED), ("GPU 3 (GPU-3) is gone",)),
    Case(
        "nvlink-link-down",
        with_gpu(3, nvlink_links_active=17),
        ("GPU 3: NVLink 17/18 links active (was 18)",),
    ),
    Case(
        "ib-port-down",
        with_port("mlx5_2", state="DOWN", phys_state="Disabled"),
        ("mlx5_2 port 1 is DOWN (was ACTIVE)",),
    ),
    Case(
        "ib-port-down-as-sysfs-writes-it",
        with_port("mlx5_2", state="1: DOWN"),
        ("mlx5_2 port 1 is DOWN (was ACTIVE)",),
    ),
    Case(
        "ib-port-gone",
        replace(BASELINE, ib_ports=BASELINE.ib_ports[:2] + BASELINE.ib_ports[3:]),
        ("mlx5_2 port 1 is gone (was ACTIVE)",),
    ),
    Case(
        "ib-port-slower",
        with_port("mlx5_1", rate_gbps=200),
        ("mlx5_1 port 1 at 200 Gb/s (was 400)",),
    ),
    Case(
        "ib-port-down-since-start-is-not-news",
        with_port("mlx5_2", state="DOWN"),
        (),
        baseline=with_port("mlx5_2", state="DOWN"),
    ),
    Case(
        # 2400 / 3350 = 0.716: 28% below, past the 15% allowed
        "hbm-below-the-fraction",
        with_gpu(5, measured_hbm_gbps=2400.0),
        ("GPU 5: HBM 2400 GB/s measured, 28% below its baseline 3350",),
    ),
    Case(
        # 3350 x 0.85 = 2847.5: exactly at the floor is fine
        "hbm-exactly-at-the-fraction",
        with_gpu(5, measured_hbm_gbps=2847.5),
        (),
    ),
    Case(
        "hbm-just-below-the-fraction",
        with_gpu(5, measured_hbm_gbps=2847.0),
        ("GPU 5: HBM 2847 GB/s measured, 15% below its baseline 3350",),
    ),
    Case(
        # a datasheet figure is no baseline: nothing measured then, nothing to compare with
        "hbm-not-measured-at-baseline",
        with_gpu(5, measured_hbm_gbps=1000.0),
        (),
        baseline=with_gpu(5, measured_hbm_gbps=None),
    ),
    Case(
        "pcie-width-dropped",
        with_gpu(2, pcie_width=8),
        ("GPU 2: PCIe link x8 (max x16)",),
    ),
    Case(
        # a busy GPU at baseline, idle now: the gen drops for power saving, not a fault
        "pcie-gen-dropped-at-idle",
        with_gpu(2, pcie_gen=1),
        (),
    ),
    Case(
        # idle GPUs drop their link gen; one that was below max at start is not flagged for it
        "pcie-below-max-already-at-baseline",
        with_gpu(2, pcie_gen=1),
        (),
        baseline=with_gpu(2, pcie_gen=1),
    ),
    Case(
        "several-issues-in-gpu-then-port-order",
        replace(
            BASELINE,
            gpus=tuple(
                replace(g, nvlink_links_active=0) if g.index == 6 else g
                for g in _RENUMBERED
                if g.index != 0
            ),
            ib_ports=(port("mlx5_0", state="INIT"), *BASELINE.ib_ports[1:]),
        ),
        (
            "GPU 0 (GPU-0) is gone",
            "GPU 3 (GPU-3) is gone",
            "GPU 6: NVLink 0/18 links active (was 18)",  # GPU-7, now index 6
            "mlx5_0 port 1 is INIT (was ACTIVE)",
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_health(case: Case) -> None:
    assert check_health(case.baseline, case.current, min_bandwidth_fraction=FRACTION) == case.issues


def test_a_fraction_of_zero_turns_the_bandwidth_check_off() -> None:
    slow = with_gpu(5, measured_hbm_gbps=10.0)
    assert check_health(BASELINE, slow, min_bandwidth_fraction=0) == ()
