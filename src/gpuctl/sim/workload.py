"""The mixed workload of benchmark B4: training gangs from a window of a Gavel (Philly-derived)
trace, on training-class hardware, plus inference services whose replica count follows a diurnal
curve, each replica with a tokens/s target. Every fleet of the benchmark replays the same one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gpuctl.core.model import JobKind, JobSpec
from gpuctl.sim.synthetic import SimJob

_HOUR = 3600.0
_DAY = 24 * _HOUR

# Training floors. The trace's run times were measured on one GPU model, so every fleet runs
# training on one model too (the run time is then the same wherever a job lands): the H100 SXM,
# with its NVLink for a job of several GPUs on a node and a fabric of 8x200 Gb/s or better
# (InfiniBand or RoCE) between the nodes of a gang.
TRAINING_GPU = "H100 SXM"
TRAINING_NVLINK_GBPS = 900.0  # an H100 SXM's NVLink, per GPU
TRAINING_NET_GBPS = 1600.0  # per node


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """An inference service: its model, one replica's GPUs and tokens/s target, and a diurnal
    replica curve, `min_replicas` at night up to `max_replicas` at `peak_hour`."""

    name: str
    weights_gb: float  # streamed once per decoded token
    gpus_per_replica: int
    tokens_per_s: float  # per replica: sets the HBM floor, tokens/s x weights GB
    min_replicas: int
    max_replicas: int
    peak_hour: float = 14.0  # hours after midnight; the window starts at midnight
    gpu_milli: int = 0  # a share of one GPU a replica, instead of gpus_per_replica
    # The replicas an autoscaler asked for, one a `curve_step_s` from the window's start (the
    # last held to the end), instead of the raised cosine (`sim.serving`)
    curve: tuple[int, ...] = ()
    curve_step_s: float = 0.0

    def replicas_at(self, t_s: float) -> int:
        """Replicas needed `t_s` seconds into the window: the curve given, or a raised cosine
        over the day."""
        if self.curve:
            return self.curve[min(int(t_s // self.curve_step_s), len(self.curve) - 1)]
        phase = 2 * math.pi * (t_s - self.peak_hour * _HOUR) / _DAY
        swing = (self.max_replicas - self.min_replicas) * (1 + math.cos(phase)) / 2
        return round(self.min_replicas + swing)

    def spec(self, name: str) -> JobSpec:
        """One replica as an inference job (an autoscaler submits one per replica it adds)."""
        return JobSpec(
            kind=JobKind.INFERENCE,
            command=("serve", self.name),
            name=name,
            replicas=1,
            gpus_per_node=0 if self.gpu_milli else self.gpus_per_replica,
            gpu_milli=self.gpu_milli,
            target_tokens_per_s=self.tokens_per_s,
            weights_gb=self.weights_gb,
        )


# The default services: an 8B, a 32B and a 70B model in BF16 (2 bytes a parameter), the weights
# only (no KV cache). Targets are decode tokens/s of one replica at batch 1: 40 tokens/s of the
# 8B model needs 640 GB/s (an L40S or better), 30 of the 32B 1,920 GB/s (one 80 GB A100 or
# better), 25 of the 70B 3,500 GB/s over its two GPUs (two 80 GB A100s or better).
DEFAULT_SERVICES = (
    Service(
        name="chat-8b",
        weights_gb=16.0,
        gpus_per_replica=1,
        tokens_per_s=40.0,
        min_replicas=4,
        max_replicas=24,
        peak_hour=14.0,
    ),
    Service(
        name="code-32b",
        weights_gb=64.0,
        gpus_per_replica=1,
        tokens_per_s=30.0,
        min_replicas=2,
        max_replicas=10,
        peak_hour=11.0,
    ),
    Service(
        name="chat-70b",
        weights_gb=140.0,
        gpus_per_replica=2,
        tokens_per_s=25.0,
        min_replicas=1,
        max_replicas=6,
        peak_hour=20.0,
    ),
)
DEFAULT_STEP_S = 15 * 60  # how often the autoscaler re-reads the curve


@dataclass(frozen=True, slots=True, kw_only=True)
class Demand:
    """One unit of work: a training gang that runs `duration_s` once started, or one replica of
    a service, wanted from `arrival_s` until `until_s` (then cancelled, started or not)."""

    id: int
    name: str
    spec: JobSpec
    arrival_s: float
    duration_s: float = 0.0  # training
    until_s: float = 0.0  # replica
    service: str = ""  # replica: its service

    @property
    def training(self) -> bool:
        return self.spec.kind is JobKind.TRAINING

    @property
    def gpus(self) -> float:
        return self.spec.total_gpus


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """What every fleet replays: `demands` (by id) over a window of `window_s` seconds."""

    window_s: float
    demands: tuple[Demand, ...]
    services: tuple[Service, ...] = ()
    source: str = ""  # where the training came from, for the report

    @property
    def training(self) -> tuple[Demand, ...]:
        return tuple(d for d in self.demands if d.training)

    @property
    def replicas(self) -> tuple[Demand, ...]:
        return tuple(d for d in self.demands if not d.training)


def training_spec(spec: JobSpec) -> JobSpec:
    """`spec` with the training floors: the GPU model, NVLink for several GPUs on a node, a
    fast fabric for several nodes."""
    return replace(
        spec,
        gpu_model=TRAINING_GPU,
        min_nvlink_gbps=TRAINING_NVLINK_GBPS if spec.gpus_per_node > 1 else 0.0,
        min_net_gbps=TRAINING_NET_GBPS if spec.num_nodes > 1 else 0.0,
    )


def training_window(
    jobs: Sequence[SimJob], *, start_s: float, window_s: float, limit: int = 0
) -> tuple[SimJob, ...]:
    """The jobs arriving in [start_s, start_s + window_s), arrivals made relative to start_s,
    the first `limit` of them (0: all), each with the training floors."""
    chosen = [j for j in jobs if start_s <= j.arrival_s < start_s + window_s]
    chosen.sort(key=lambda j: j.arrival_s)
    if limit:
        chosen = chosen[:limit]
    return tuple(
        replace(j, arrival_s=j.arrival_s - start_s, spec=training_spec(j.spec)) for j in chosen
    )


def replica_intervals(
    service: Service, window_s: float, step_s: float = DEFAULT_STEP_S
) -> tuple[tuple[int, float, float], ...]:
    """(replica number, from, until) for every stretch a replica is wanted: the curve is read
    every `step_s`; replica k is wanted while the curve asks for k or more (the last added is
    the first removed). Every replica ends with the window."""
    if step_s <= 0:
        raise ValueError(f"step must be > 0 s, got {step_s}")
    out: list[tuple[int, float, float]] = []
    up: dict[int, float] = {}  # replica -> wanted since
    t = 0.0
    while t < window_s:
        want = service.replicas_at(t)
        for k in range(1, max(want, len(up)) + 1):
            if k <= want and k not in up:
                up[k] = t
            elif k > want and k in up:
                out.append((k, up.pop(k), t))
        t += step_s
    out.extend((k, since, window_s) for k, since in up.items())
    return tuple(sorted(out, key=lambda x: (x[1], x[0])))


def build(
    training: Sequence[SimJob],
    services: Sequence[Service],
    *,
    window_s: float,
    step_s: float = DEFAULT_STEP_S,
    source: str = "",
) -> Workload:
    """The workload: `training` (arrivals already relative to the window) and every replica
    stretch of `services`, numbered in arrival order (training first at one instant)."""
    items: list[tuple[float, int, Demand]] = []
    for i, job in enumerate(training):
        demand = Demand(
            id=0, name=job.name, spec=job.spec, arrival_s=job.arrival_s, duration_s=job.duration_s
        )
        items.append((job.arrival_s, i, demand))
    n = len(items)
    for service in services:
        for k, since, until in replica_intervals(service, window_s, step_s):
            name = f"{service.name}-r{k}@{since / _HOUR:.2f}h"
            demand = Demand(
                id=0,
                name=name,
                spec=service.spec(name),
                arrival_s=since,
                until_s=until,
                service=service.name,
            )
            items.append((since, n, demand))
            n += 1
    items.sort(key=lambda x: (x[0], x[1]))
    demands = tuple(replace(d, id=i + 1) for i, (_, _, d) in enumerate(items))
    return Workload(window_s=window_s, demands=demands, services=tuple(services), source=source)
