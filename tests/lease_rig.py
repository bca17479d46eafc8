"""A controller with a lease keeper on a real SQLite store and a fake clock, the nodes its
agents would register, and hand-written provider fakes: what the keeper tests share."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from gpuctl.core.model import (
    BandwidthProfile,
    Gpu,
    JobKind,
    JobSpec,
    JobState,
    NetKind,
    Network,
    Node,
    RankState,
)
from gpuctl.core.plugins import build_policy
from gpuctl.providers.base import Acquired, CapacityUnavailable, Held, Provider, Sku
from gpuctl.providers.static import StaticNode, StaticProvider
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller, ControllerSettings, RankRef
from gpuctl.runtime.leases import LeaseKeeper, LeaseSettings
from gpuctl.runtime.logstore import LogStore
from gpuctl.store.sql import SqlStore, open_store

H100_SKU = Sku(
    provider="lab",
    name="hgx-h100",
    gpu_model="H100 SXM",
    gpu_count=8,
    gpu_memory_gb=80,
    hbm_gbps=3350,
    nvlink_gbps=900,
    network=Network(kind=NetKind.INFINIBAND, ports=1, gbps_per_port=3200),
    price_per_hour=24.0,
)
L40S_SKU = Sku(
    provider="lab",
    name="l40s-4x",
    gpu_model="L40S",
    gpu_count=4,
    gpu_memory_gb=48,
    hbm_gbps=864,
    price_per_hour=3.0,
)


def lab(*, name: str = "lab", claimed: tuple[Held, ...] = ()) -> StaticProvider:
    """Two H100 nodes on one fabric at $24/h and an L40S node at $3/h."""
    return StaticProvider(
        [
            StaticNode(name="hgx-1", address="10.0.1.1", sku=H100_SKU, fabric="ib/s1/l1",
                       price_per_hour=24.0),
            StaticNode(name="hgx-2", address="10.0.1.2", sku=H100_SKU, fabric="ib/s1/l1",
                       price_per_hour=24.0),
            StaticNode(name="l40s-1", address="10.0.2.1", sku=L40S_SKU, price_per_hour=3.0),
        ],
        name=name,
        claimed=claimed,
    )  # fmt: skip


def agent_node(name: str, *, gpus: int = 8, model: str = "H100 SXM", fabric: str = "") -> Node:
    """The node an agent with simulated GPUs registers: what the SKU promised."""
    return Node(
        id=name,
        address=f"{name}.local",
        fabric=fabric,
        cpu_milli=64_000,
        memory_mib=512 * 1024,
        profile=BandwidthProfile(
            gpus=tuple(
                Gpu(index=i, uuid=f"{name}-{i}", model=model, memory_mib=81920, hbm_gbps=3350,
                    nvlink_gbps=900 if gpus > 1 else 0)
                for i in range(gpus)
            ),
            network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400),
        ),
    )  # fmt: skip


def training(nodes: int = 1, gpus: int = 8, **kw) -> JobSpec:
    return JobSpec(
        kind=JobKind.TRAINING, command=("train",), num_nodes=nodes, gpus_per_node=gpus, **kw
    )


@dataclass
class Recording:
    """A provider that does what `inner` does and remembers every acquire, renew and release."""

    inner: Provider
    calls: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def can_renew(self) -> bool:
        return self.inner.can_renew

    def skus(self) -> tuple[Sku, ...]:
        return self.inner.skus()

    def inventory(self) -> tuple[str, ...]:
        return self.inner.inventory()

    def acquire(self, sku, count, *, fabric=None, now):
        self.calls.append(("acquire", sku, str(count)))
        return self.inner.acquire(sku, count, fabric=fabric, now=now)

    def renew(self, lease_id, *, now):
        self.calls.append(("renew", lease_id))
        return self.inner.renew(lease_id, now=now)

    def release(self, lease_id, *, now):
        self.calls.append(("release", lease_id))
        return self.inner.release(lease_id, now=now)

    def held(self) -> tuple[Held, ...]:
        return self.inner.held()

    def released(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "release"]


@dataclass
class NoCapacity:
    """A provider that lists a cheap SKU and never has it."""

    sku: Sku
    name: str = "flaky"
    asked: int = 0

    def skus(self) -> tuple[Sku, ...]:
        return (self.sku,)

    @property
    def can_renew(self) -> bool:
        return True

    def inventory(self) -> tuple[str, ...]:
        return ()

    def acquire(self, sku: str, count: int, *, fabric=None, now: datetime) -> tuple[Acquired, ...]:
        self.asked += 1
        raise CapacityUnavailable(self.name, f"sku {sku}: 0 of {count} nodes free")

    def renew(self, lease_id: str, *, now: datetime) -> datetime | None:
        return None

    def release(self, lease_id: str, *, now: datetime) -> None:
        return None

    def held(self) -> tuple[Held, ...]:
        return ()


class Rig:
    """gpuctld's controller and lease keeper, minus the network and the periodic thread."""

    def __init__(
        self,
        tmp_path: Path,
        providers: list[Provider],
        settings: LeaseSettings | None = None,
        *,
        clock: FakeClock | None = None,
        store: SqlStore | None = None,
        prefix: str = "L",
    ) -> None:
        self.store = store or open_store(f"sqlite:///{tmp_path / 'state.db'}")
        self.clock = clock or FakeClock()
        self.ctl = Controller(
            self.store,
            self.clock,
            build_policy("default"),
            LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
            ControllerSettings(heartbeat_timeout_s=3600, kill_grace_s=1),
        )
        ids = itertools.count(1)
        self.keeper = LeaseKeeper(
            self.ctl,
            providers,
            settings or LeaseSettings(),
            new_id=lambda: f"{prefix}{next(ids)}",
        )
        self.ctl.attach_leases(self.keeper)

    def leases(self, *, everything: bool = True):
        return self.store.list_leases(include_released=everything)

    def lease_of(self, job_id: int):
        return [x for x in self.leases() if x.for_job_id == job_id]

    def run(self, job_id: int, *, hours: float = 0.5) -> None:
        """Start every rank of a placed job, let `hours` pass, and have them all exit 0."""
        job = self.store.get_job(job_id)
        assert job.state is JobState.RUNNING, job.reason
        for r in job.placement.ranks:
            self.ctl.report_rank(r.node_id, RankRef(job_id, r.rank, job.attempt), RankState.RUNNING)
        self.clock.advance(timedelta(hours=hours))
        for r in job.placement.ranks:
            self.ctl.report_rank(
                r.node_id, RankRef(job_id, r.rank, job.attempt), RankState.EXITED, 0
            )
        assert self.store.get_job(job_id).state is JobState.SUCCEEDED
