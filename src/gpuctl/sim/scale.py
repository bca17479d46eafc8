"""Benchmark B2 (BENCHMARKS.md): the scheduling core at scale. A synthetic cluster of mixed
SKUs on several fabrics, a background of running work, and queues of training gangs and
inference replicas; each figure is one timed `core.schedule` call, repeated, as the daemon
makes it (the real default policy, every filter and score).

Everything is generated from one seed, so two runs time the same decisions.
"""

from __future__ import annotations

import gc
import math
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from gpuctl.core import CycleResult, schedule
from gpuctl.core.leasing import Leasing, Offer
from gpuctl.core.model import (
    MILLI_PER_GPU,
    Job,
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    Node,
    NodeLease,
    Placement,
    RankPlacement,
)
from gpuctl.core.plugins import DEFAULT_POLICY, Policy, build_policy
from gpuctl.core.queue import placement_gpus
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim.synthetic import SKUS, gang_shape, node_of

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)

# Shares of the nodes by SKU: bare-metal H100 on InfiniBand for gangs, L40S on Ethernet and
# older V100 on InfiniBand for the rest.
SCALE_SKUS = (("h100-sxm-ib", 5), ("l40s-eth", 3), ("v100-sxm2-ib", 2))
NODES_PER_LEAF = 32
LEAVES_PER_FABRIC = 8  # 256 nodes, 2,048 GPUs a fabric: a 1,024-GPU gang takes half of one

# Training gangs of 8 to 1,024 GPUs (whole 8-GPU nodes), weighted towards the small ones as
# production traces are (Philly, Helios: most jobs are small, most GPU-hours are large).
GANG_GPUS = ((8, 30), (16, 15), (32, 15), (64, 12), (128, 10), (256, 8), (512, 6), (1024, 4))
REPLICAS = ((1, 40), (2, 30), (4, 20), (8, 10))
# Per replica: 1 or 2 whole GPUs, or a share of one.
REPLICA_SHAPES = (((1, 0), 55), ((2, 0), 10), ((0, 500), 20), ((0, 250), 15))
OWNERS = 24
QUEUES = ("research", "prod", "batch", "interactive")


def _pick(rng: random.Random, table: Sequence[tuple[object, int]]) -> object:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def scale_cluster(nodes: int) -> tuple[Node, ...]:
    """`nodes` 8-GPU nodes split across SCALE_SKUS, each SKU on fabrics of LEAVES_PER_FABRIC
    leaves of NODES_PER_LEAF nodes: `<sku>-f<fabric>-l<leaf>-n<i>` on `<sku>-f<fabric>/s1/l<leaf>`."""
    total = sum(share for _, share in SCALE_SKUS)
    counts = [nodes * share // total for _, share in SCALE_SKUS]
    counts[0] += nodes - sum(counts)
    out = []
    per_fabric = NODES_PER_LEAF * LEAVES_PER_FABRIC
    for (name, _), count in zip(SCALE_SKUS, counts, strict=True):
        sku = SKUS[name]
        for i in range(count):
            f, rest = divmod(i, per_fabric)
            leaf, n = divmod(rest, NODES_PER_LEAF)
            fabric = f"{name}-f{f}"
            out.append(node_of(sku, f"{fabric}-l{leaf}-n{n}", f"{fabric}/s1/l{leaf}"))
    return tuple(out)


def _common(rng: random.Random, *, limit_h: tuple[float, float]) -> dict[str, object]:
    owner = rng.randrange(OWNERS)
    return {
        "command": ("run",),
        "owner": f"user{owner}",
        "queue": QUEUES[owner % len(QUEUES)],
        "priority": _pick(rng, ((0, 85), (1, 10), (2, 5))),
        "time_limit_s": int(rng.uniform(*limit_h) * 3600),
    }


def training_spec(rng: random.Random, gpus: int, name: str) -> JobSpec:
    nodes, per_node = gang_shape(gpus)
    return JobSpec(
        kind=JobKind.TRAINING,
        name=name,
        num_nodes=nodes,
        gpus_per_node=per_node,
        gpu_model="H100 SXM" if rng.random() < 0.25 else "",
        min_net_gbps=200.0 if rng.random() < 0.25 else 0.0,  # rules out the Ethernet L40S
        cpu_milli=96_000,
        memory_mib=1_000_000,
        **_common(rng, limit_h=(1, 48)),  # type: ignore[arg-type]
    )


def inference_spec(rng: random.Random, name: str) -> JobSpec:
    gpus, milli = _pick(rng, REPLICA_SHAPES)  # type: ignore[misc]
    floor = gpus > 0 and rng.random() < 0.4  # a share of a GPU serves no tokens/s target
    return JobSpec(
        kind=JobKind.INFERENCE,
        name=name,
        replicas=_pick(rng, REPLICAS),  # type: ignore[arg-type]
        gpus_per_node=gpus,
        gpu_milli=milli,
        gpu_memory_mib=20_000 if milli else 0,
        gpu_model="L40S" if rng.random() < 0.2 else "",
        cpu_milli=8_000,
        memory_mib=64_000,
        # 30 tokens/s of a 14 GB model: 420 GB/s of HBM per replica
        target_tokens_per_s=30.0 if floor else 0.0,
        weights_gb=14.0 if floor else 0.0,
        **_common(rng, limit_h=(4, 72)),  # type: ignore[arg-type]
    )


def pending_jobs(
    count: int, *, seed: int, first_id: int = 1, inference_share: float = 0.3
) -> tuple[Job, ...]:
    """`count` pending jobs: training gangs of 8-1,024 GPUs and inference replica sets,
    submitted over the last day."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if rng.random() < inference_share:
            spec = inference_spec(rng, f"svc-{i}")
        else:
            spec = training_spec(rng, _pick(rng, GANG_GPUS), f"train-{i}")  # type: ignore[arg-type]
        created = NOW - timedelta(seconds=rng.uniform(0, 86_400))
        out.append(Job(id=first_id + i, spec=spec, created_at=created))
    return tuple(out)


def inference_jobs(count: int, *, seed: int, first_id: int = 1) -> tuple[Job, ...]:
    """`count` pending inference replica sets and nothing else."""
    return pending_jobs(count, seed=seed, first_id=first_id, inference_share=1.0)


def gang_job(gpus: int = 512, *, job_id: int = 1) -> Job:
    """One training gang of `gpus` GPUs (8 per node), any H100-class fabric."""
    nodes, per_node = gang_shape(gpus)
    spec = JobSpec(
        kind=JobKind.TRAINING,
        command=("run",),
        name=f"gang-{gpus}",
        num_nodes=nodes,
        gpus_per_node=per_node,
        cpu_milli=96_000,
        memory_mib=1_000_000,
        time_limit_s=24 * 3600,
    )
    return Job(id=job_id, spec=spec, created_at=NOW - timedelta(minutes=5))


def background(
    nodes: Sequence[Node], *, seed: int, utilisation: float = 0.6, first_id: int = 1_000_000
) -> tuple[Job, ...]:
    """Running jobs holding about `utilisation` of the GPUs: gangs on runs of whole nodes of
    one fabric (70 % of the load), replica sets on random nodes of the inference-class SKUs,
    those without InfiniBand-class H100s (30 %); all with time limits, some preemptible."""
    rng = random.Random(seed)
    free = {n.id: [MILLI_PER_GPU] * n.gpu_count for n in nodes}
    cpu = {n.id: n.cpu_milli for n in nodes}
    memory = {n.id: n.memory_mib for n in nodes}
    fabrics: dict[str, list[Node]] = {}
    for n in nodes:
        fabrics.setdefault(n.fabric_name, []).append(n)
    names = sorted(fabrics)
    total = sum(n.gpu_count for n in nodes) * MILLI_PER_GPU
    gang_target, replica_target = 0.7 * utilisation * total, 0.3 * utilisation * total
    jobs: list[Job] = []

    def add(spec: JobSpec, ranks: list[RankPlacement]) -> None:
        started = NOW - timedelta(seconds=rng.uniform(60, 12 * 3600))
        ran = (NOW - started).total_seconds()
        spec = replace(
            spec,
            time_limit_s=int(ran + rng.uniform(0.5, 24) * 3600),
            preemptible=rng.random() < 0.3,
            priority=0,
        )
        jobs.append(
            Job(
                id=first_id + len(jobs),
                spec=spec,
                state=JobState.RUNNING,
                placement=Placement(ranks=tuple(ranks), master_addr=f"{ranks[0].node_id}.sim"),
                started_at=started,
                created_at=started - timedelta(minutes=1),
            )
        )

    used, misses = 0.0, 0
    while used < gang_target and misses < 50:
        spec = training_spec(rng, _pick(rng, GANG_GPUS[:6]), "bg")  # type: ignore[arg-type]
        members = fabrics[rng.choice(names)]
        start = rng.randrange(len(members))
        chosen = []
        for k in range(len(members)):
            n = members[(start + k) % len(members)]
            if all(m == MILLI_PER_GPU for m in free[n.id]) and (
                not spec.gpu_model or n.profile.gpu_model == spec.gpu_model
            ):
                chosen.append(n)
                if len(chosen) == spec.num_nodes:
                    break
        if len(chosen) < spec.num_nodes:
            misses += 1
            continue
        ranks = []
        for i, n in enumerate(sorted(chosen, key=lambda n: (n.fabric, n.id))):
            gpus = tuple(range(spec.gpus_per_node))
            for g in gpus:
                free[n.id][g] = 0
            cpu[n.id] -= spec.cpu_milli
            memory[n.id] -= spec.memory_mib
            ranks.append(
                RankPlacement(
                    rank=i,
                    node_id=n.id,
                    gpu_indices=gpus,
                    cpu_milli=spec.cpu_milli,
                    memory_mib=spec.memory_mib,
                )
            )
        used += spec.num_nodes * spec.gpus_per_node * MILLI_PER_GPU
        add(spec, ranks)

    misses = 0
    serving = [n for n in nodes if n.profile.gpu_model != "H100 SXM"] or list(nodes)
    while used < gang_target + replica_target and misses < 200:
        spec = inference_spec(rng, "bg")
        ranks = []
        for r in range(spec.replicas):
            for _ in range(20):  # a few random nodes; give up on this replica set after that
                n = serving[rng.randrange(len(serving))]
                if cpu[n.id] < spec.cpu_milli or memory[n.id] < spec.memory_mib:
                    continue
                if spec.gpu_model and n.profile.gpu_model != spec.gpu_model:
                    continue
                row = free[n.id]
                if spec.gpu_milli:
                    fits = [g for g, m in enumerate(row) if m >= spec.gpu_milli]
                    gpus, milli = tuple(fits[:1]), spec.gpu_milli
                else:
                    fits = [g for g, m in enumerate(row) if m == MILLI_PER_GPU]
                    gpus, milli = tuple(fits[: spec.gpus_per_node]), MILLI_PER_GPU
                    if len(gpus) < spec.gpus_per_node:
                        continue
                if not gpus:
                    continue
                for g in gpus:
                    row[g] -= milli
                cpu[n.id] -= spec.cpu_milli
                memory[n.id] -= spec.memory_mib
                ranks.append(
                    RankPlacement(
                        rank=r,
                        node_id=n.id,
                        gpu_indices=gpus,
                        gpu_milli=milli,
                        cpu_milli=spec.cpu_milli,
                        memory_mib=spec.memory_mib,
                    )
                )
                used += milli * len(gpus)
                break
        if len(ranks) < spec.replicas:
            misses += 1
            for rp in ranks:  # all or nothing, as the core places them
                for g in rp.gpu_indices:
                    free[rp.node_id][g] += rp.gpu_milli
                cpu[rp.node_id] += rp.cpu_milli
                memory[rp.node_id] += rp.memory_mib
                used -= rp.gpu_milli * len(rp.gpu_indices)
            continue
        add(spec, ranks)
    return tuple(jobs)


# -- the cycle after: churn and arrivals ------------------------------------------------------


def applied(
    result: CycleResult, running: Sequence[Job], pending: Sequence[Job], now: datetime
) -> tuple[list[Job], list[Job]]:
    """(running, pending) once `result` is applied as the daemon applies it: preempted jobs
    back in the queue as a new attempt, bound jobs started."""
    victims = {p.job_id for p in result.preemptions}
    bound = {b.job_id: b.placement for b in result.bindings}
    stopped = [
        replace(j, state=JobState.PENDING, attempt=j.attempt + 1, placement=None, started_at=None)
        for j in running
        if j.id in victims
    ]
    started = [
        replace(j, state=JobState.RUNNING, placement=bound[j.id], started_at=now)
        for j in pending
        if j.id in bound
    ]
    still = [j for j in running if j.id not in victims] + started
    waiting = [j for j in pending if j.id not in bound] + stopped
    return still, waiting


def churn(
    running: Sequence[Job],
    pending: Sequence[Job],
    *,
    seed: int,
    finished: float,
    queue: int,
    next_id: int,
) -> tuple[list[Job], list[Job], int]:
    """Between two cycles: a `finished` share of the running jobs ends (chosen at random), and
    new jobs arrive until `queue` are pending. Returns (running, pending, next free job id)."""
    rng = random.Random(seed)
    still = [j for j in running if rng.random() >= finished]
    arriving = pending_jobs(max(0, queue - len(pending)), seed=seed, first_id=next_id)
    return still, [*pending, *arriving], next_id + len(arriving)


def steady_step(
    result: CycleResult,
    running: Sequence[Job],
    pending: Sequence[Job],
    now: datetime,
    *,
    seed: int,
    queue: int,
    next_id: int,
) -> tuple[list[Job], list[Job], datetime, int]:
    """The inputs of the steady cycle after `result`: its decisions applied, STEADY_STEP
    later, a STEADY_FINISHED share of the running jobs done and the queue topped up to `queue`
    (`churn`). Returns (running, pending, now, the next free job id)."""
    still, waiting = applied(result, running, pending, now)
    still, waiting, next_id = churn(
        still, waiting, seed=seed, finished=STEADY_FINISHED, queue=queue, next_id=next_id
    )
    return still, waiting, now + STEADY_STEP, next_id


# -- measuring ------------------------------------------------------------------------------


def _nearest_rank(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """Wall seconds of repeated runs of one call, and what the last run decided."""

    seconds: tuple[float, ...]
    bound_jobs: int = 0
    bound_ranks: int = 0
    waiting: int = 0
    preempted: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p99(self) -> float:
        """Nearest rank; with fewer than 100 runs, the slowest."""
        return _nearest_rank(self.seconds, 0.99)

    def as_dict(self) -> dict[str, object]:
        return {
            "runs": len(self.seconds),
            "median_s": round(self.median, 6),
            "p99_s": round(self.p99, 6),
            "seconds": [round(s, 6) for s in self.seconds],
            "bound_jobs": self.bound_jobs,
            "bound_ranks": self.bound_ranks,
            "waiting": self.waiting,
            "preempted": self.preempted,
        }


def time_call(call: Callable[[], object], repeats: int) -> tuple[tuple[float, ...], object]:
    """Wall seconds of `repeats` calls (a full collection before each), and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    return tuple(seconds), result


def time_cycle(
    snapshot: Snapshot,
    pending: Sequence[Job],
    policy: Policy,
    *,
    repeats: int,
    now: datetime = NOW,
    leasing: Leasing | None = None,
) -> tuple[Timing, CycleResult]:
    """`schedule` on the same input `repeats` times (it leaves `snapshot` as it was)."""
    seconds, result = time_call(
        lambda: schedule(snapshot, pending, policy, now=now, leasing=leasing), repeats
    )
    assert isinstance(result, CycleResult)
    timing = Timing(
        seconds=seconds,
        bound_jobs=len(result.bindings),
        bound_ranks=sum(len(b.placement.ranks) for b in result.bindings),
        waiting=len(result.unschedulable),
        preempted=len(result.preemptions),
    )
    return timing, result


def leased(cluster: Sequence[Node]) -> Leasing:
    """The cluster as gpuctl's own leases, each node at its price (leased an hour ago, no time
    limit), and every SKU of it on offer to lease more: a cycle with leasing has every
    lease block and lease decision to make for the whole queue."""
    offers = tuple(
        Offer(
            provider="sim",
            sku=sku.name,
            gpu_model=sku.model,
            gpu_count=sku.gpus,
            gpu_memory_mib=sku.gpu_memory_mib,
            hbm_gbps=sku.hbm_gbps,
            nvlink_gbps=sku.nvlink_gbps,
            network_gbps=sku.net_ports * sku.net_gbps_per_port,
            bf16_tflops=sku.tflops_per_gpu,
            cpu_milli=sku.cpu_milli,
            memory_mib=sku.memory_mib,
            price_per_hour=sku.price_per_hour,
        )
        for sku in SKUS.values()
    )
    leases = tuple(
        NodeLease(
            id=f"lease-{n.id}",
            provider="sim",
            provider_lease_id=f"sim/{n.id}",
            node_id=n.id,
            sku=n.sku,
            price_per_hour=n.price_per_hour,
            acquired_at=NOW - timedelta(hours=1),
            state=LeaseState.ACTIVE,
        )
        for n in cluster
    )
    return Leasing(offers=offers, leases=leases, renewable=frozenset({"sim"}))


@dataclass(frozen=True, slots=True, kw_only=True)
class SizeReport:
    """Every B2 figure for one cluster size and queue length, from one process."""

    nodes: int
    pending: int
    gpus: int
    running_jobs: int
    used_gpus: float
    build: Timing  # Snapshot.build: the daemon's side of every cycle
    gang: Timing  # one 512-GPU gang
    gang_gpus: int
    inference: Timing  # inference replica sets only
    inference_jobs: int
    burst: Timing  # the mixed queue on the cluster 60 % used: the cycle that places the most
    leased_burst: Timing  # the same with every node leased and SKUs on offer (`leased`)
    lease_requests: int  # what that cycle asked to lease
    steady: Timing  # the cycles after it, one sample each (the median of its repeats)
    steady_bound: tuple[int, ...]  # jobs each steady cycle placed
    peak_rss_mib: float
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def replicas_per_s(self) -> float:
        return self.inference.bound_ranks / self.inference.median if self.inference.median else 0.0

    @property
    def burst_ranks_per_s(self) -> float:
        return self.burst.bound_ranks / self.burst.median if self.burst.median else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "nodes": self.nodes,
            "pending": self.pending,
            "gpus": self.gpus,
            "running_jobs": self.running_jobs,
            "used_gpus": round(self.used_gpus, 1),
            "snapshot_build": self.build.as_dict(),
            "gang": {**self.gang.as_dict(), "gpus": self.gang_gpus},
            "inference": {**self.inference.as_dict(), "jobs": self.inference_jobs},
            "inference_replicas_per_s": round(self.replicas_per_s, 1),
            "burst_cycle": self.burst.as_dict(),
            "burst_ranks_per_s": round(self.burst_ranks_per_s, 1),
            "leased_burst_cycle": {
                **self.leased_burst.as_dict(),
                "lease_requests": self.lease_requests,
            },
            "steady_cycle": {**self.steady.as_dict(), "bound_per_cycle": list(self.steady_bound)},
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            **self.extra,
        }


def peak_rss_mib() -> float:
    """This process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# Between steady cycles: the share of running jobs that ends (1 %: jobs of ~1 h median run
# time against a cycle every ~30 s, rounded up), and the clock step.
STEADY_FINISHED = 0.01
STEADY_STEP = timedelta(seconds=30)


def measure(
    nodes: int,
    pending: int,
    *,
    seed: int = 1,
    repeats: int = 3,
    steady_cycles: int = 5,
    inference_count: int = 1000,
    gang_gpus: int = 512,
    policy_name: str = DEFAULT_POLICY,
    progress: Callable[[str], None] | None = None,
) -> SizeReport:
    """Every B2 figure for `nodes` nodes and `pending` jobs, in this process.

    1. gang: one `gang_gpus`-GPU gang alone in the queue, the cluster 60 % used;
    2. inference: `inference_count` inference replica sets alone in the queue;
    3. burst: `pending` mixed jobs on the same cluster, which has room for thousands of them;
       then the same cycle with every node a lease of gpuctl's and more on offer (`leased`);
    4. steady: the cycles after the burst: its decisions applied, 1 % of the running jobs
       done and the queue topped up to `pending` between cycles; `steady_cycles` of them,
       each timed `repeats` times (its median is its sample).
    Every call is `repeats` runs on the same input; figures are medians.
    """
    say = progress or (lambda _: None)
    policy = build_policy(policy_name)
    cluster = scale_cluster(nodes)
    running = list(background(cluster, seed=seed))
    running_at_start = len(running)
    build_s, snapshot = time_call(lambda: Snapshot.build(cluster, running), repeats)
    assert isinstance(snapshot, Snapshot)
    used = sum(placement_gpus(j.placement) for j in running)
    say(f"{nodes} nodes, {len(running)} running jobs: one {gang_gpus}-GPU gang")
    gang, _ = time_cycle(snapshot, (gang_job(gang_gpus),), policy, repeats=max(repeats, 5))
    say(f"{inference_count} inference replica sets")
    inference, _ = time_cycle(
        snapshot, inference_jobs(inference_count, seed=seed + 1), policy, repeats=repeats
    )
    say(f"{pending} mixed pending jobs: burst cycle")
    queue = list(pending_jobs(pending, seed=seed + 2))
    burst, result = time_cycle(snapshot, queue, policy, repeats=repeats)
    say(f"{pending} mixed pending jobs on leased nodes: burst cycle with leasing")
    leased_burst, with_leases = time_cycle(
        snapshot, queue, policy, repeats=repeats, leasing=leased(cluster)
    )
    now = NOW
    next_id = pending + 1
    samples, bound = [], []
    for cycle in range(steady_cycles):
        running, queue, now, next_id = steady_step(
            result, running, queue, now, seed=seed + 100 + cycle, queue=pending, next_id=next_id
        )
        say(f"steady cycle {cycle + 1} of {steady_cycles}")
        state = Snapshot.build(cluster, running)
        timing, result = time_cycle(state, queue, policy, repeats=repeats, now=now)
        samples.append(timing.median)
        bound.append(timing.bound_jobs)
    steady = Timing(seconds=tuple(samples))
    return SizeReport(
        nodes=nodes,
        pending=pending,
        gpus=sum(n.gpu_count for n in cluster),
        running_jobs=running_at_start,
        used_gpus=used,
        build=Timing(seconds=build_s),
        gang=gang,
        gang_gpus=gang_gpus,
        inference=inference,
        inference_jobs=inference_count,
        burst=burst,
        leased_burst=leased_burst,
        lease_requests=len(with_leases.lease_requests),
        steady=steady,
        steady_bound=tuple(bound),
        peak_rss_mib=peak_rss_mib(),
    )


def measure_as_dict(nodes: int, pending: int, options: dict[str, object]) -> dict[str, object]:
    """`measure` returning plain data: the entry point of the process each size runs in."""
    return measure(nodes, pending, **options).as_dict()  # type: ignore[arg-type]
