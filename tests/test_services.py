"""Inference jobs as services: a replica that ends is replaced through the cycle while the
others keep running. The daemon's use cases on a real SQLite store with a fake clock, and the
pure rules of `core.services`."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuctl.core import services
from gpuctl.core.errors import FailedPrecondition, InvalidArgument
from gpuctl.core.model import (
    Job,
    JobKind,
    JobSpec,
    JobState,
    NodeState,
    Placement,
    RankPlacement,
    RankState,
    RestartPolicy,
)
from gpuctl.core.plugins import build_policy
from gpuctl.core.validation import validate_spec
from gpuctl.runtime.controller import Controller, RankRef
from gpuctl.runtime.cycleproc import decide
from tests import test_controller
from tests.test_controller import h100_node

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ctl = test_controller.ctl  # the fixture: a controller on SQLite with a fake clock


def service(replicas: int = 3, gpus: int = 1, **kw) -> JobSpec:
    return JobSpec(
        kind=JobKind.INFERENCE,
        command=("vllm", "serve"),
        replicas=replicas,
        gpus_per_node=gpus,
        **kw,
    )


def start(ctl: Controller, spec: JobSpec, nodes=("a",)) -> Job:
    """Register `nodes`, submit `spec`, place it and report every replica running."""
    for n in nodes:
        ctl.register_node(h100_node(n))
    job = ctl.submit(spec)
    (binding,) = ctl.run_cycle().bindings
    for r in binding.placement.ranks:
        ctl.report_rank(r.node_id, RankRef(job.id, r.rank, 0), RankState.RUNNING)
    return ctl.store.get_job(job.id)


def live(job: Job) -> list[RankPlacement]:
    assert job.placement is not None
    return [r for r in job.placement.ranks if r.live]


def crash(ctl: Controller, job: Job, rank: int, code: int = 1) -> Job:
    node = next(r.node_id for r in job.placement.ranks if r.rank == rank)
    ctl.report_rank(node, RankRef(job.id, rank, job.attempt), RankState.EXITED, code)
    return ctl.store.get_job(job.id)


def run_new(ctl: Controller, job: Job) -> Job:
    """Report the job's assigned replicas running (what their agents would do)."""
    for r in ctl.store.get_job(job.id).placement.ranks:
        if r.state is RankState.ASSIGNED:
            ctl.report_rank(r.node_id, RankRef(job.id, r.rank, job.attempt), RankState.RUNNING)
    return ctl.store.get_job(job.id)


def test_a_crashed_replica_is_replaced_elsewhere_and_the_others_keep_running(ctl):
    job = start(ctl, service(3))
    before = {r.rank: r for r in job.placement.ranks}

    job = crash(ctl, job, 1)

    assert job.state is JobState.RUNNING and job.attempt == 0
    assert [r.rank for r in live(job)] == [0, 2]
    assert job.reason == "2 of 3 replicas running; replacing replica 1 (exited with 1)"
    # The other replicas are not told to stop.
    running = [RankRef(job.id, 0, 0), RankRef(job.id, 2, 0)]
    assert ctl.heartbeat("a", running).stop == ()

    assert len(ctl.run_cycle().bindings) == 1
    job = ctl.store.get_job(job.id)
    new = next(r for r in job.placement.ranks if r.rank == 3)
    assert (new.state, new.restarts, new.last_failure) == (RankState.ASSIGNED, 1, "exited with 1")
    assert new.gpu_indices != before[1].gpu_indices  # not back onto the GPU that failed
    assert sorted(r.rank for r in job.placement.ranks) == [0, 2, 3]  # the ended one is gone
    assert job.reason == ""  # three replicas again (one assigned)
    (assignment,) = ctl.heartbeat("a", running).assignments
    assert assignment.ref == RankRef(job.id, 3, 0)
    assert assignment.env["GPUCTL_NUM_REPLICAS"] == "3"
    job = run_new(ctl, job)
    assert len(live(job)) == 3
    types = [e.type for e in ctl.store.list_events("job", str(job.id))]
    assert types[-3:] == ["Exited", "ReplicaScheduled", "Started"]


def test_replacements_in_a_row_back_off_and_a_replica_that_keeps_failing_is_given_up(ctl):
    job = start(ctl, service(2))
    rank = 1
    waits = []
    for restarts in range(1, services.RESTART_LIMIT + 1):
        job = crash(ctl, job, rank)
        waited = 0
        while not ctl.run_cycle().bindings:
            ctl.clock.advance(timedelta(seconds=1))
            waited += 1
            assert waited <= services.BACKOFF_MAX_S
        waits.append(waited)
        job = run_new(ctl, job)
        rank = max(r.rank for r in job.placement.ranks)
        assert next(r for r in job.placement.ranks if r.rank == rank).restarts == restarts
    assert waits == [0, 10, 20, 40, 80]

    job = crash(ctl, job, rank, code=2)  # the sixth failure in a row: given up

    assert job.state is JobState.RUNNING
    assert job.reason.startswith(f"degraded: replica {rank} on a failed 6 times in a row")
    assert "1 of 2 replicas running" in job.reason
    ctl.clock.advance(timedelta(seconds=services.BACKOFF_MAX_S))
    assert ctl.run_cycle().bindings == ()
    assert "ReplicaGivenUp" in [e.type for e in ctl.store.list_events("job", str(job.id))]
    # Its GPU is let go at once: a new job can use it.
    assert not services.holding_ended(job)

    job = crash(ctl, job, 0, code=3)  # the other place is still replaced

    assert job.state is JobState.RUNNING
    assert job.reason.endswith("replacing replica 0 (exited with 3)")


def test_a_service_with_nothing_running_or_awaited_fails_with_its_last_failure():
    ended = dict(state=RankState.EXITED, ended_at=T0)
    job = Job(
        id=7,
        spec=service(2),
        state=JobState.RUNNING,
        placement=Placement(
            ranks=(
                _rank(3, exit_code=0, **ended),  # done: on-failure keeps it ended
                _rank(4, exit_code=2, restarts=services.RESTART_LIMIT, **ended),  # given up
            )
        ),
    )

    settled = services.settle(job, T0)

    assert (settled.job.state, settled.job.exit_code) == (JobState.FAILED, 2)
    assert settled.job.reason == (
        "every replica ended; replica 4 on a exited with 2 (after 5 replacement(s) in a row)"
    )
    assert [t for t, _ in settled.events] == ["ReplicaGivenUp", "Failed"]
    assert not services.holding_ended(settled.job)


def test_a_replica_that_ran_long_enough_starts_its_count_afresh(ctl):
    job = start(ctl, service(1))
    job = crash(ctl, job, 0)
    ctl.run_cycle()
    job = run_new(ctl, job)
    job = crash(ctl, job, 1)  # restarts 1 -> its replacement waits 10 s
    assert ctl.run_cycle().bindings == ()
    ctl.clock.advance(timedelta(seconds=10))
    ctl.run_cycle()
    job = run_new(ctl, job)
    ctl.clock.advance(timedelta(seconds=services.RESET_AFTER_S))
    job = crash(ctl, job, 2)
    assert ctl.run_cycle().bindings  # at once: the count started afresh
    assert ctl.store.get_job(job.id).placement.ranks[-1].restarts == 1


def test_a_lost_node_takes_only_its_replicas_which_are_replaced_at_once(ctl):
    for n in ("a", "b"):
        ctl.register_node(h100_node(n))
    job = ctl.submit(service(2, gpus=8))  # one whole node each
    (binding,) = ctl.run_cycle().bindings
    for r in binding.placement.ranks:
        ctl.report_rank(r.node_id, RankRef(job.id, r.rank, 0), RankState.RUNNING)
    ctl.register_node(h100_node("c"))  # spare capacity
    on_b = next(r.rank for r in binding.placement.ranks if r.node_id == "b")
    on_a = 1 - on_b
    ctl.clock.advance(timedelta(seconds=31))
    ctl.heartbeat("a", [RankRef(job.id, on_a, 0)])
    ctl.heartbeat("c", [])

    assert ctl.expire_heartbeats() == ["b"]

    job = ctl.store.get_job(job.id)
    assert (job.state, job.attempt) == (JobState.RUNNING, 0)
    lost = next(r for r in job.placement.ranks if r.rank == on_b)
    assert lost.state is RankState.LOST and lost.message == "node b lost"
    assert ctl.heartbeat("a", [RankRef(job.id, on_a, 0)]).stop == ()
    (replacement,) = ctl.run_cycle().bindings  # no backoff for a lost node
    assert replacement.placement.node_ids == ("c",)
    job = ctl.store.get_job(job.id)
    assert job.placement.ranks[-1].restarts == 0  # the node's doing, not the replica's
    # The lost node comes back: its old replica is told to stop, never started again.
    ctl.register_node(h100_node("b"))
    hb = ctl.heartbeat("b", [RankRef(job.id, on_b, 0)])
    assert hb.stop == (RankRef(job.id, on_b, 0),) and hb.assignments == ()


def test_a_degraded_node_moves_its_replicas_and_the_rest_stay(ctl):
    for n in ("a", "b"):
        ctl.register_node(h100_node(n))
    job = ctl.submit(service(2, gpus=8))
    (binding,) = ctl.run_cycle().bindings
    ctl.register_node(h100_node("c"))
    refs = {r.node_id: RankRef(job.id, r.rank, 0) for r in binding.placement.ranks}
    for node, ref in refs.items():
        ctl.report_rank(node, ref, RankState.RUNNING)

    hb = ctl.heartbeat("b", [refs["b"]], health_issues=["GPU 3: Xid 79"])

    assert ctl.store.get_node("b").state is NodeState.DEGRADED
    assert hb.stop == (refs["b"],)
    assert ctl.heartbeat("a", [refs["a"]]).stop == ()
    job = ctl.store.get_job(job.id)
    assert job.state is JobState.RUNNING
    (replacement,) = ctl.run_cycle().bindings
    assert replacement.placement.node_ids == ("c",)


def test_when_only_the_failed_gpus_are_left_the_replacement_goes_back_onto_them(ctl):
    job = start(ctl, service(8))  # node a full
    job = crash(ctl, job, 5)

    first = ctl.run_cycle()

    assert first.bindings == ()
    job = ctl.store.get_job(job.id)
    assert "replacement waits:" in job.reason
    assert not services.holding_ended(job)  # the ended replica let go of its GPU
    assert ctl.wakes  # and the next cycle is asked for at once
    (binding,) = ctl.run_cycle().bindings
    assert binding.placement.ranks[0].gpu_indices == (5,)


@pytest.mark.parametrize(
    ("policy", "code", "replaced", "state"),
    [
        (RestartPolicy.ON_FAILURE, 0, False, JobState.RUNNING),
        (RestartPolicy.ALWAYS, 0, True, JobState.RUNNING),
        (RestartPolicy.NEVER, 1, False, JobState.FAILED),
    ],
)
def test_restart_policies(ctl, policy, code, replaced, state):
    job = start(ctl, service(2, restart_policy=policy))

    job = crash(ctl, job, 0, code=code)

    assert job.state is state
    assert bool(ctl.run_cycle().bindings) is replaced
    if policy is RestartPolicy.NEVER:  # one failed replica fails the job and stops the rest
        assert ctl.heartbeat("a", [RankRef(job.id, 1, 0)]).stop == (RankRef(job.id, 1, 0),)


def test_a_service_whose_replicas_all_exit_zero_under_on_failure_succeeds(ctl):
    job = start(ctl, service(2))
    crash(ctl, job, 0, code=0)
    job = crash(ctl, job, 1, code=0)
    assert (job.state, job.exit_code) == (JobState.SUCCEEDED, 0)


def test_cancelling_a_service_with_a_replica_awaiting_replacement_ends_it(ctl):
    job = start(ctl, service(2))
    crash(ctl, job, 0)
    ctl.cancel(job.id)
    job = crash(ctl, job, 1, code=-15)
    assert job.state is JobState.CANCELLED
    assert ctl.run_cycle().bindings == ()


def test_training_refuses_a_restart_policy():
    spec = JobSpec(
        kind=JobKind.TRAINING,
        command=("t",),
        gpus_per_node=8,
        restart_policy=RestartPolicy.ALWAYS,
    )
    with pytest.raises(InvalidArgument) as e:
        validate_spec(spec)
    assert e.value.violations[0].field == "spec.restart_policy"


# -- core.services, pure ------------------------------------------------------------------


def _rank(rank: int, **kw) -> RankPlacement:
    return RankPlacement(rank=rank, node_id="a", gpu_indices=(rank,), **kw)


def test_backoff_doubles_from_the_second_replacement_up_to_five_minutes():
    assert [services.backoff_s(n) for n in range(1, 9)] == [0, 10, 20, 40, 80, 160, 300, 300]


def test_the_cycle_sees_a_replacement_as_pending_and_the_service_holding_under_another_id():
    ranks = (
        _rank(0, state=RankState.RUNNING),
        _rank(1, state=RankState.EXITED, exit_code=1, ended_at=T0),
    )
    job = Job(
        id=7,
        spec=service(2),
        state=JobState.RUNNING,
        placement=Placement(ranks=ranks),
    )

    given = services.cycle_input([job], T0)

    (holding,) = given.holding
    (pending,) = given.pending
    assert (holding.id, holding.placement) == (-7, job.placement)
    assert (pending.id, pending.state, pending.spec.replicas) == (7, JobState.PENDING, 1)


def test_decide_places_a_replacement_beside_the_replicas_that_hold_their_gpus():
    node = h100_node("a")
    ranks = (
        *(_rank(i, state=RankState.RUNNING) for i in range(7)),
        _rank(7, state=RankState.EXITED, exit_code=1, ended_at=T0),
    )
    job = Job(
        id=7,
        spec=service(8),
        state=JobState.RUNNING,
        placement=Placement(ranks=ranks),
        revision=3,
    )
    other = Job(id=8, spec=service(1), created_at=T0, revision=4)

    decided = decide([job, other], [node], build_policy("default"), now=T0, leasing=None)

    # The one GPU left is the failed replica's, held until its replacement is placed: neither
    # the replacement nor job 8 gets it.
    assert decided.result.bindings == ()
    assert {m.job_id for m in decided.result.unschedulable} == {7, 8}
    assert decided.seen == {7: 3, 8: 4}
    job = replace(job, placement=services.let_go(job).placement)
    decided = decide([job], [node], build_policy("default"), now=T0, leasing=None)
    (binding,) = decided.result.bindings
    assert (binding.job_id, binding.placement.ranks[0].gpu_indices) == (7, (7,))


# -- scale ----------------------------------------------------------------------------------


def test_scale_up_places_the_new_replicas_through_the_cycle(ctl):
    job = start(ctl, service(3))

    job = ctl.scale(job.id, 6, by="alice")

    assert (job.state, job.spec.replicas) == (JobState.RUNNING, 6)
    assert job.reason == "3 of 6 replicas running; placing 3 more (scaled up)"
    (binding,) = ctl.run_cycle().bindings
    assert len(binding.placement.ranks) == 3
    job = run_new(ctl, job)
    assert sorted(r.rank for r in live(job)) == [0, 1, 2, 3, 4, 5]
    assert job.reason == ""
    assert ctl.store.get_job(job.id).spec.replicas == 6  # stored, not only answered
    assert [e.message for e in ctl.store.list_events("job", str(job.id)) if e.type == "Scaled"] == [
        "replicas 3 -> 6 by alice"
    ]


def test_scale_down_stops_the_replicas_that_free_whole_nodes_first(ctl):
    # Four replicas of 4 GPUs fill nodes a and b; a fifth goes to c, beside another job.
    job = start(ctl, service(4, gpus=4), nodes=("a", "b"))
    ctl.register_node(h100_node("c"))
    ctl.scale(job.id, 5)
    ctl.run_cycle()
    job = run_new(ctl, job)
    other = ctl.submit(service(1, gpus=4))
    (placed,) = ctl.run_cycle().bindings
    assert placed.placement.node_ids == ("c",)
    on = {n: [r.rank for r in live(job) if r.node_id == n] for n in ("a", "b", "c")}
    assert [len(on[n]) for n in on] == [2, 2, 1]

    # Down to 3: both replicas of a node nothing else uses (a and b tie: a, by name), so that
    # node empties; not the one beside job `other`, nor one of two on b.
    job = ctl.scale(job.id, 3)

    assert sorted(r.rank for r in live(job)) == sorted(on["b"] + on["c"])
    refs = [RankRef(job.id, r, 0) for r in on["a"]]
    assert ctl.heartbeat("a", refs).stop == tuple(refs)
    assert ctl.store.get_job(other.id).state is JobState.RUNNING
    assert ctl.run_cycle().bindings == ()  # nothing to replace: they were scaled away


def test_scale_is_refused_for_training_finished_jobs_and_out_of_range_counts(ctl):
    gang = ctl.submit(JobSpec(kind=JobKind.TRAINING, command=("t",), gpus_per_node=8))
    with pytest.raises(FailedPrecondition, match="training gang"):
        ctl.scale(gang.id, 2)
    ctl.cancel(gang.id)
    job = start(ctl, service(2))
    with pytest.raises(InvalidArgument) as e:
        ctl.scale(job.id, 0)
    assert e.value.violations[0].field == "replicas"
    ctl.cancel(job.id)
    with pytest.raises(FailedPrecondition, match="cancelling"):
        ctl.scale(job.id, 3)


def test_scaling_a_pending_service_changes_what_the_cycle_places(ctl):
    job = ctl.submit(service(2))
    ctl.scale(job.id, 4)
    ctl.register_node(h100_node("a"))
    (binding,) = ctl.run_cycle().bindings
    assert len(binding.placement.ranks) == 4


def test_a_crashed_replica_wakes_the_cycle_for_its_replacement(ctl):
    job = start(ctl, service(2))
    ctl.wakes.clear()
    crash(ctl, job, 0)
    assert ctl.wakes


def test_the_service_day_benchmark_keeps_the_service_up_at_the_default_settings(tmp_path):
    from gpuctl.bench_service import report, run

    figures = run(hours=0.25, nodes=4, night=4, day=8, node_loss_every_s=300, workdir=tmp_path)

    # 3 nodes lost with their replicas, each replaced within the heartbeat timeout (12 s), the
    # check (1 s) and the next heartbeat of the node that takes it (3 s).
    assert figures.nodes_lost == 3 and figures.replaced == figures.failures > 0
    assert figures.replace_s_max <= 12 + 1 + 3
    assert 0.97 < figures.availability < 1.0
    assert "availability" in report(figures)


def test_a_replica_scaled_away_never_lends_its_rank_number_to_a_new_one(ctl):
    job = start(ctl, service(4))
    ctl.scale(job.id, 2)  # ranks 2 and 3 (the newest) stop; they may still be stopping

    job = ctl.scale(job.id, 4)
    ctl.run_cycle()

    job = ctl.store.get_job(job.id)
    assert sorted(r.rank for r in job.placement.ranks) == [0, 1, 4, 5]


# -- rolling updates ------------------------------------------------------------------------


def available(ctl, job_id: int) -> list[RankPlacement]:
    return [r for r in ctl.store.get_job(job_id).placement.ranks if r.state is RankState.RUNNING]


def test_a_rolling_update_replaces_replicas_one_by_one_never_short_of_the_desired_count(ctl):
    job = start(ctl, service(3))
    new_spec = replace(job.spec, command=("vllm", "serve", "--v2"))

    job = ctl.update(job.id, new_spec, by="alice")

    assert job.placement.generation == 1 and services.rolling(job)
    assert job.reason == "updating to generation 1: 0 of 3 replicas new"
    generations = []
    for _ in range(12):
        ctl.run_cycle()
        live = [r for r in ctl.store.get_job(job.id).placement.ranks if r.state.value == "running"]
        refs = [RankRef(job.id, r.rank, 0) for r in live]
        for assignment in ctl.heartbeat("a", refs).assignments:  # the new spec's command
            assert assignment.job.spec.command == ("vllm", "serve", "--v2")
        job = run_new(ctl, job)
        running = available(ctl, job.id)
        assert len(running) >= 3  # max_unavailable 0
        assert len([r for r in job.placement.ranks if r.live]) <= 4  # max_surge 1
        generations.append(sorted(r.generation for r in running))
        if not services.rolling(ctl.store.get_job(job.id)):
            break
        ctl.clock.advance(timedelta(seconds=job.spec.min_ready_s))
    job = ctl.store.get_job(job.id)
    assert [r.generation for r in job.placement.ranks if r.live] == [1, 1, 1]
    assert job.placement.previous_spec is None and job.reason == ""
    assert generations[0] == [0, 0, 0, 1]  # one new beside the three old
    types = [e.type for e in ctl.store.list_events("job", str(job.id))]
    assert "Update" in types and types.count("RollingUpdate") == 3 and types[-1] == "Updated"
    assert ctl.store.get_job(job.id).spec.command == ("vllm", "serve", "--v2")


def test_an_update_whose_new_replicas_keep_failing_rolls_back_and_the_old_ones_never_stopped(
    ctl,
):
    job = start(ctl, service(2))
    old = {r.rank for r in job.placement.ranks}
    job = ctl.update(job.id, replace(job.spec, command=("broken",)))
    for _ in range(services.ROLLBACK_AFTER):
        ctl.run_cycle()
        job = run_new(ctl, job)
        new = max(r.rank for r in job.placement.ranks)
        job = crash(ctl, job, new, code=3)
        ctl.clock.advance(timedelta(seconds=services.BACKOFF_MAX_S))

    ctl.run_cycle()

    job = ctl.store.get_job(job.id)
    assert job.spec.command == ("vllm", "serve")  # the old spec again
    assert job.placement.generation == 0 and not services.rolling(job)
    assert {r.rank for r in job.placement.ranks if r.live} == old  # never stopped
    assert job.reason.startswith("rolled back to generation 0: a replica of generation 1 failed")
    assert "RolledBack" in [e.type for e in ctl.store.list_events("job", str(job.id))]
    assert ctl.run_cycle().bindings == ()  # nothing more to place


def test_an_update_may_not_change_what_the_job_is_filed_under(ctl):
    job = start(ctl, service(2))
    with pytest.raises(InvalidArgument) as e:
        ctl.update(job.id, replace(job.spec, queue="other"))
    assert e.value.violations[0].field == "spec.queue"
    gang = ctl.submit(JobSpec(kind=JobKind.TRAINING, command=("t",), gpus_per_node=8))
    with pytest.raises(FailedPrecondition, match="only an inference service"):
        ctl.update(gang.id, service(2))
    assert ctl.update(job.id, job.spec) == ctl.store.get_job(job.id)  # the same spec: no-op


def test_each_replica_gets_a_port_no_other_live_replica_on_its_node_has(ctl):
    job = start(ctl, service(2))
    other = ctl.submit(service(1))
    ctl.run_cycle()
    ports = {
        r.port
        for j in (job, ctl.store.get_job(other.id))
        for r in ctl.store.get_job(j.id).placement.ranks
    }
    assert ports == {31000, 31001, 31002}
    job = crash(ctl, ctl.store.get_job(job.id), 0)  # its port is free again
    ctl.run_cycle()
    job = ctl.store.get_job(job.id)
    new = next(r for r in job.placement.ranks if r.rank == 2)
    assert new.port == 31000
    (assignment,) = ctl.heartbeat("a", []).assignments[-1:]
    assert assignment.env["GPUCTL_PORT"] == str(assignment.rank.port)


def test_a_replica_waiting_out_its_backoff_says_when_and_the_reason_holds_still(ctl):
    job = start(ctl, service(1))
    job = crash(ctl, job, 0)
    ctl.run_cycle()
    job = run_new(ctl, job)
    ctl.clock.advance(timedelta(seconds=1))
    job = crash(ctl, job, 1)  # the second in a row: 10 s of backoff

    at = (ctl.clock.now() + timedelta(seconds=10)).strftime("%H:%M:%S")
    assert job.reason == f"0 of 1 replicas running; replacing replica 1 (exited with 1) at {at}Z"
    later = services.summary(job, ctl.clock.now() + timedelta(seconds=4))
    assert later == job.reason  # the same words every cycle: no event per cycle
