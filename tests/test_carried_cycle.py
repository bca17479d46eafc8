"""A quiet cycle carried on (`core.cycle.Carried`) says of a new job what a full cycle over the
old queue and the new jobs says, whenever it says anything: on B2-style clusters with a queue
blocked behind reservations, and new jobs of every priority and owner (so they stand anywhere
in the fair-share order), some of which could start, preempt or hold (then it must say None)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import pytest

from gpuctl.core.cycle import (
    CARRY_S,
    CycleResult,
    Unschedulable,
    schedule,
    schedule_carrying,
)
from gpuctl.core.model import Job, JobKind, JobSpec, JobState, Placement, RankPlacement
from gpuctl.core.plugins import DEFAULT_POLICY, build_policy
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim.scale import NOW, QUEUES, applied, background, pending_jobs, scale_cluster

POLICY = build_policy(DEFAULT_POLICY)
SEEDS = range(16)
# The default (fair share, EASY backfill: the first blocked job reserves), and arrival order
# where the first blocked job stops the whole queue (its hold bars every job after it).
POLICIES = {name: build_policy(name) for name in (DEFAULT_POLICY, "fifo")}


def quiet_state(seed: int, policy=POLICY) -> tuple[Snapshot, list[Job]]:
    """A cluster and a training queue on which a cycle binds and preempts nothing: the
    decisions of cycles applied until one is quiet."""
    cluster = scale_cluster(64)
    running = list(background(cluster, seed=seed))
    queue = [j for j in pending_jobs(150, seed=seed + 1) if j.spec.kind is JobKind.TRAINING]
    for _ in range(20):
        result = schedule(Snapshot.build(cluster, running), queue, policy, now=NOW)
        if not (result.bindings or result.preemptions):
            return Snapshot.build(cluster, running), queue
        running, queue = applied(result, running, queue, NOW)
    raise AssertionError("no quiet cycle")


def arrivals(seed: int, first_id: int, count: int) -> list[Job]:
    """Training jobs of every size, priority and owner, submitted over the last day: some
    fit now, some only where no reservation needs the nodes, some nowhere."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        gpus = rng.choice((1, 2, 4, 8, 8, 16, 32, 64))
        owner = rng.randrange(26)  # 24 owners have jobs queued or running; 2 are new
        spec = JobSpec(
            kind=JobKind.TRAINING,
            command=("run",),
            num_nodes=max(1, gpus // 8),
            gpus_per_node=min(gpus, 8),
            cpu_milli=8_000,
            memory_mib=64_000,
            priority=rng.choice((0, 0, 0, 1, 2)),
            owner=f"user{owner}",
            queue=QUEUES[owner % len(QUEUES)],
            preemptible=rng.random() < 0.3,
            time_limit_s=int(rng.uniform(0.2, 30) * 3600),
            # Some no node could ever take: they hold nothing, wherever they stand.
            gpu_model="B200" if rng.random() < 0.15 else "",
        )
        created = NOW - timedelta(seconds=rng.uniform(0, 86_400))
        jobs.append(Job(id=first_id + i, spec=spec, created_at=created))
    return jobs


def assert_as_full(said: Unschedulable, full: CycleResult, first: CycleResult) -> None:
    """The new job waits, holding nothing: the `full` cycle binds, preempts and reserves
    exactly what the quiet one (`first`) did, gives the old jobs the same reasons, and the
    new one what the kept cycle `said`."""
    assert (full.bindings, full.preemptions) == ((), ())
    assert full.reservations == first.reservations
    reasons = {u.job_id: u.reason for u in full.unschedulable}
    assert reasons[said.job_id] == said.reason
    assert all(reasons[u.job_id] == u.reason for u in first.unschedulable)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", SEEDS)
def test_a_carried_cycle_says_of_a_new_job_what_a_full_cycle_says(seed: int, policy) -> None:
    chosen = POLICIES[policy]
    snapshot, queue = quiet_state(seed, chosen)
    first, carried = schedule_carrying(snapshot, queue, chosen, now=NOW)
    assert carried is not None and not first.bindings
    assert first == schedule(snapshot, queue, chosen, now=NOW)  # keeping costs nothing else
    decided: list[Job] = []
    for job in arrivals(seed, 50_000, 30):
        said = carried.decide(job)
        full = schedule(snapshot, [*queue, *decided, job], chosen, now=NOW)
        if said is None:  # a full cycle must decide it: it would start, preempt or hold
            continue
        assert_as_full(said, full, first)
        decided.append(job)


def test_the_seeds_cover_jobs_it_decides_and_jobs_it_leaves_to_a_full_cycle() -> None:
    said = left = 0
    for seed in SEEDS:
        snapshot, queue = quiet_state(seed)
        _, carried = schedule_carrying(snapshot, queue, POLICY, now=NOW)
        assert carried is not None
        for job in arrivals(seed, 50_000, 30):
            if carried.decide(job) is None:
                left += 1
            else:
                said += 1
    assert said >= 100 and left >= 50, (said, left)


def test_what_a_carried_cycle_leaves_to_a_full_cycle() -> None:
    snapshot, queue = quiet_state(0)
    _, carried = schedule_carrying(snapshot, queue, POLICY, now=NOW)
    assert carried is not None
    assert carried.fresh(NOW + timedelta(seconds=CARRY_S))
    assert not carried.fresh(NOW + timedelta(seconds=CARRY_S + 0.001))
    assert not carried.fresh(NOW - timedelta(seconds=1))
    one = arrivals(0, 50_000, 1)[0]
    # A replica: its packing reads the queue's mix of shapes.
    replica = replace(
        one, spec=JobSpec(kind=JobKind.INFERENCE, command=("serve",), gpus_per_node=1)
    )
    assert carried.decide(replica) is None
    # One GPU fits somewhere now: it would start.
    small = replace(one, spec=replace(one.spec, num_nodes=1, gpus_per_node=1, time_limit_s=60))
    assert schedule(snapshot, [*queue, small], POLICY, now=NOW).bindings
    assert carried.decide(small) is None


def test_a_cycle_that_binds_is_not_carried() -> None:
    cluster = scale_cluster(64)
    running = list(background(cluster, seed=3))
    queue = [j for j in pending_jobs(120, seed=4) if j.spec.kind is JobKind.TRAINING]
    result, carried = schedule_carrying(Snapshot.build(cluster, running), queue, POLICY, now=NOW)
    assert result.bindings and carried is None


def _gangs(first_id: int, count: int, owner: str, *, age: timedelta = timedelta()) -> list[Job]:
    """2-node gangs of 8 GPUs each, all of `owner`, submitted a minute apart, the last `age`
    ago."""
    spec = JobSpec(
        kind=JobKind.TRAINING, command=("run",), num_nodes=2, gpus_per_node=8, owner=owner,
        time_limit_s=3600,
    )  # fmt: skip
    return [
        Job(id=first_id + i, spec=spec, created_at=NOW - age - timedelta(minutes=count - i))
        for i in range(count)
    ]


def _busy(cluster, running: list[Job]) -> list[Job]:
    """`running` and a one-GPU job on every node it leaves idle, of the users queued: no node
    idle, and those users' fair share used."""
    snapshot = Snapshot.build(cluster, running)
    idle = [v.id for v in snapshot.nodes if v.idle]
    return running + [
        Job(
            id=900_000 + i,
            spec=JobSpec(
                kind=JobKind.TRAINING,
                command=("run",),
                gpus_per_node=1,
                time_limit_s=7200,
                owner=("history", "other")[i % 2],
            ),
            state=JobState.RUNNING,
            created_at=NOW,
            started_at=NOW,
            placement=Placement(ranks=(RankPlacement(rank=0, node_id=n, gpu_indices=(0,)),)),
        )
        for i, n in enumerate(idle)
    ]


@pytest.mark.parametrize("fleet", ["none", "busy"])
def test_where_no_node_is_idle_gangs_queued_first_are_carried_too(fleet: str) -> None:
    # A long queue on a full cluster (or no node at all), and a user who has used nothing:
    # fair share puts their gangs first (with no node, their age does), where the islands of
    # the first queued gangs are kept; with no node idle there are none to keep.
    cluster = scale_cluster(32) if fleet == "busy" else ()
    running = _busy(cluster, list(background(cluster, seed=5))) if cluster else []
    pending = _gangs(1, 20, "history") + _gangs(100, 20, "other")
    snapshot = Snapshot.build(cluster, running)
    assert not any(v.idle for v in snapshot.nodes)
    first, carried = schedule_carrying(snapshot, pending, POLICY, now=NOW)
    assert carried is not None and not first.bindings
    said_of = 0
    for k, job in enumerate(_gangs(10_000, 6, "newcomer", age=timedelta(days=1))):
        said = carried.decide(job)
        full = schedule(snapshot, [*pending, job], POLICY, now=NOW)
        order = [u.job_id for u in full.unschedulable]
        assert order.index(job.id) == k  # ahead of every queued gang: among the first four
        pending.append(job)
        if said is None:  # the first blocked job reserves (EASY backfill): a full cycle,
            assert job.id in {r.job_id for r in full.reservations}
            first, carried = schedule_carrying(snapshot, pending, POLICY, now=NOW)  # kept
            assert carried is not None
            continue
        assert_as_full(said, full, first)
        said_of += 1
    assert said_of == (6 if fleet == "none" else 5)


def test_where_a_node_is_idle_a_gang_queued_first_gets_a_full_cycle() -> None:
    cluster = scale_cluster(32)
    snapshot = Snapshot.build(cluster, list(background(cluster, seed=5)))
    assert any(v.idle for v in snapshot.nodes)
    b200 = lambda jobs: [replace(j, spec=replace(j.spec, gpu_model="B200")) for j in jobs]  # noqa: E731
    queue = b200(_gangs(1, 20, "history") + _gangs(100, 20, "other"))
    first, carried = schedule_carrying(snapshot, queue, POLICY, now=NOW)
    assert carried is not None and not first.bindings
    (job,) = b200(_gangs(10_000, 1, "newcomer", age=timedelta(days=1)))
    full = schedule(snapshot, [*queue, job], POLICY, now=NOW)
    assert full.unschedulable[0].job_id == job.id
    assert carried.decide(job) is None  # first in the queue, where islands are kept
