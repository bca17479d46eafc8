"""The daemon applies what the policy decides: preemptions requeue their victims (whose agents
are then told to stop the old attempt), reservations and backfill show in the waiting jobs'
reasons. Real SQLite store, fake clock, no network."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gpuctl.core.cycle import Preemption
from gpuctl.core.model import JobSpec, JobState, RankState
from gpuctl.core.plugins import build_policy
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller, ControllerSettings, RankRef
from gpuctl.runtime.logstore import LogStore
from gpuctl.store.memory import MemoryStore
from tests.test_controller import h100_node, training


@pytest.fixture
def ctl(tmp_path):
    store = MemoryStore()
    c = Controller(
        store,
        FakeClock(),  # 2026-01-01 00:00 UTC
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
        ControllerSettings(heartbeat_timeout_s=30, kill_grace_s=1),
    )
    yield c
    store.close()


def start(ctl: Controller, spec: JobSpec) -> int:
    """Submit `spec`, place it and report every rank running; its id."""
    job = ctl.submit(spec)
    result = ctl.run_cycle()
    assert job.id in {b.job_id for b in result.bindings}
    placed = ctl.store.get_job(job.id)
    for r in placed.placement.ranks:
        ctl.report_rank(r.node_id, RankRef(job.id, r.rank, placed.attempt), RankState.RUNNING)
    return job.id


def test_preemption_requeues_the_victim_and_stops_its_old_attempt(ctl):
    ctl.register_node(h100_node("a"))
    low = start(ctl, training(nodes=1, preemptible=True))
    ctl.clock.advance(timedelta(hours=1))

    high = ctl.submit(training(nodes=1, priority=5)).id
    result = ctl.run_cycle()
    assert result.preemptions == (
        Preemption(job_id=low, for_job_id=high, reason=f"preempted by job {high} (priority 5)"),
    )
    assert [b.job_id for b in result.bindings] == [high]

    victim = ctl.store.get_job(low)
    assert (victim.state, victim.attempt, victim.placement) == (JobState.PENDING, 1, None)
    assert victim.reason == f"preempted by job {high} (priority 5)"
    assert victim.started_at is None
    events = ctl.store.list_events("job", str(low))
    assert (events[-1].type, events[-1].message) == (
        "Preempted",
        f"preempted by job {high} (priority 5); requeued as attempt 1",
    )
    winner = ctl.store.get_job(high)
    assert winner.state is JobState.RUNNING
    assert winner.placement.node_ids == ("a",)
    # 8 GPUs x 1h run so far
    assert winner.placement.reason.endswith(f"preempted 1 job ({low}), 8 GPU-hours lost")
    # ... and still charged to the victim, though it no longer holds them.
    (kept,) = ctl.store.list_charges()
    assert (kept.job_id, kept.attempt, kept.gpu_hours) == (low, 0, 8.0)
    assert {r.key: r.gpu_hours for r in ctl.cost().rows} == {str(low): 8.0}

    # The agent still runs the old attempt: it is told to stop it, and the winner starts only
    # once it is gone (they would share GPUs through the victim's kill grace).
    beat = ctl.heartbeat("a", [RankRef(low, 0, 0)])
    assert (beat.stop, beat.assignments) == ((RankRef(low, 0, 0),), ())
    # The old attempt's exit is acknowledged and ignored; the victim waits to run again.
    ctl.report_rank("a", RankRef(low, 0, 0), RankState.EXITED, -15)
    beat = ctl.heartbeat("a", [])
    assert beat.stop == ()
    assert [a.ref for a in beat.assignments] == [RankRef(high, 0, 0)]
    assert ctl.store.get_job(low).state is JobState.PENDING
    ctl.run_cycle()
    assert ctl.store.get_job(low).reason.startswith("needs 1 node")


def test_no_preemption_of_work_that_is_not_preemptible(ctl):
    ctl.register_node(h100_node("a"))
    low = start(ctl, training(nodes=1))
    high = ctl.submit(training(nodes=1, priority=5)).id
    assert ctl.run_cycle().preemptions == ()
    assert ctl.store.get_job(low).state is JobState.RUNNING
    assert ctl.store.get_job(high).state is JobState.PENDING


def test_blocked_gang_reserves_and_small_jobs_backfill_around_it(ctl):
    ctl.register_node(h100_node("a"))
    ctl.register_node(h100_node("b"))
    # 00:00: job 1 starts on a with a 2h limit: a frees by 02:00
    first = start(ctl, training(nodes=1, time_limit_s=7200))
    assert ctl.store.get_job(first).placement.node_ids == ("a",)
    ctl.clock.advance(timedelta(minutes=30))

    # 00:30: the 2-node gang cannot start; it reserves a and b from 02:00
    gang = ctl.submit(training(nodes=2)).id
    result = ctl.run_cycle()
    (reservation,) = result.reservations
    assert (reservation.job_id, reservation.node_ids) == (gang, ("a", "b"))
    assert reservation.start == ctl.clock.now() + timedelta(hours=1, minutes=30)
    reason = ctl.store.get_job(gang).reason
    assert reason.startswith(
        f"reserved: starts by 02:00 UTC when job {first} reaches its time limit (nodes a, b); "
        "needs 2 nodes \N{MULTIPLICATION SIGN} 8 GPUs on one fabric"
    )
    assert ctl.store.list_events("job", str(gang))[-1].message == reason

    # No limit: would hold b past 02:00, so it waits, though it came first.
    # 00:30 + 1h = 01:30 <= 02:00: backfills on b.
    endless = ctl.submit(training(nodes=1)).id
    short = ctl.submit(training(nodes=1, time_limit_s=3600)).id
    ctl.run_cycle()
    assert ctl.store.get_job(short).placement.node_ids == ("b",)
    assert ctl.store.get_job(endless).reason == (
        f"waiting behind job {gang}'s reservation (starts by 02:00 UTC on a, b); "
        "a time limit of at most 1h30m would let it start now"
    )
    assert ctl.store.get_job(gang).state is JobState.PENDING

    # Both end; the gang goes before the endless job, which came later.
    for job_id, node in ((first, "a"), (short, "b")):
        ctl.report_rank(node, RankRef(job_id, 0, 0), RankState.EXITED, 0)
    ctl.run_cycle()
    assert ctl.store.get_job(gang).state is JobState.RUNNING
    assert ctl.store.get_job(endless).state is JobState.PENDING
