"""The daemon's use cases on a real SQLite store with a fake clock: submit, place, run, exit,
cancel, lose a node, time limits. No network, no sleeping."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuctl.core.errors import FailedPrecondition, InvalidArgument, NotFound
from gpuctl.core.model import (
    BandwidthProfile,
    Gpu,
    Job,
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    NetKind,
    Network,
    Node,
    NodeState,
    OnNodeLost,
    RankState,
)
from gpuctl.core.plugins import build_policy
from gpuctl.core.trust import AuditEntry, PermissionDenied
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller, ControllerSettings, RankRef
from gpuctl.runtime.logstore import TRUNCATED, LogStore
from gpuctl.store.memory import MemoryStore


def h100_node(name: str, fabric: str = "ib-a/s1/l1") -> Node:
    gpus = tuple(
        Gpu(
            index=i,
            uuid=f"GPU-{name}-{i}",
            model="H100 SXM",
            memory_mib=81920,
            hbm_gbps=3350,
            nvlink_gbps=900,
        )
        for i in range(8)
    )
    return Node(
        id=name,
        address=f"10.0.0.{len(name)}",
        fabric=fabric,
        cpu_milli=192_000,
        memory_mib=2_000_000,
        price_per_hour=24.0,
        profile=BandwidthProfile(
            gpus=gpus,
            nvlink_domain_size=8,
            network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400),
        ),
    )


def training(nodes: int = 2, gpus: int = 8, **kw) -> JobSpec:
    return JobSpec(
        kind=JobKind.TRAINING,
        command=("python", "train.py"),
        num_nodes=nodes,
        gpus_per_node=gpus,
        **kw,
    )


@pytest.fixture
def ctl(tmp_path):
    store = MemoryStore()
    clock = FakeClock()
    wakes: list[int] = []
    c = Controller(
        store,
        clock,
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
        ControllerSettings(heartbeat_timeout_s=30, kill_grace_s=1),
        wake=lambda: wakes.append(1),
    )
    c.wakes = wakes  # type: ignore[attr-defined]
    yield c
    store.close()


def run_gang(ctl: Controller) -> int:
    ctl.register_node(h100_node("a"))
    ctl.register_node(h100_node("b"))
    job = ctl.submit(training(), request_id="r1")
    result = ctl.run_cycle()
    assert [b.job_id for b in result.bindings] == [job.id]
    return job.id


def test_submit_is_idempotent_by_request_id_and_wakes_the_loop(ctl):
    first = ctl.submit(training(), request_id="same")
    again = ctl.submit(training(), request_id="same")
    assert first.id == again.id
    assert ctl.store.get_job(first.id).state is JobState.PENDING
    assert ctl.wakes


def test_validate_only_stores_nothing(ctl):
    job = ctl.submit(training(), validate_only=True)
    assert job.id == 0
    assert ctl.store.list_jobs().jobs == ()


def test_invalid_spec_is_rejected_and_nothing_stored(ctl):
    with pytest.raises(InvalidArgument) as e:
        ctl.submit(training(gpus=0))
    assert e.value.violations[0].field == "spec.gpus_per_node"
    assert ctl.store.list_jobs().jobs == ()


def test_gang_is_assigned_started_and_succeeds(ctl):
    job_id = run_gang(ctl)
    job = ctl.store.get_job(job_id)
    assert job.state is JobState.RUNNING
    assert job.placement.master_addr == "10.0.0.1"  # node "a" is rank 0: fabric order, then id
    assert job.placement.master_port == 29500 + job_id

    hb = ctl.heartbeat("a", [])
    (assignment,) = hb.assignments
    assert assignment.env["NODE_RANK"] == "0"
    assert assignment.env["WORLD_SIZE"] == "16"
    assert assignment.env["MASTER_ADDR"] == "10.0.0.1"
    assert assignment.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert ctl.heartbeat("b", []).assignments[0].env["NODE_RANK"] == "1"

    for node, rank in (("a", 0), ("b", 1)):
        ctl.report_rank(node, RankRef(job_id, rank, 0), RankState.RUNNING)
    # Once running, the heartbeat does not assign it again.
    assert ctl.heartbeat("a", [RankRef(job_id, 0, 0)]).assignments == ()
    ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.EXITED, 0)
    assert ctl.store.get_job(job_id).state is JobState.RUNNING
    ctl.report_rank("b", RankRef(job_id, 1, 0), RankState.EXITED, 0)
    ctl.report_rank("b", RankRef(job_id, 1, 0), RankState.EXITED, 0)  # duplicate: ignored
    job = ctl.store.get_job(job_id)
    assert job.state is JobState.SUCCEEDED
    assert job.exit_code == 0
    types = [e.type for e in ctl.store.list_events("job", str(job_id))]
    assert types == [
        "Submitted",
        "Scheduled",
        "Started",
        "Started",
        "Exited",
        "Exited",
        "Succeeded",
    ]


def test_one_rank_failing_fails_the_gang_and_stops_the_rest(ctl):
    job_id = run_gang(ctl)
    for node, rank in (("a", 0), ("b", 1)):
        ctl.report_rank(node, RankRef(job_id, rank, 0), RankState.RUNNING)
    ctl.report_rank("b", RankRef(job_id, 1, 0), RankState.EXITED, 3, "")
    job = ctl.store.get_job(job_id)
    assert job.state is JobState.FAILED
    assert job.exit_code == 3
    assert "rank 1 on b exited with 3" in job.reason
    assert ctl.heartbeat("a", [RankRef(job_id, 0, 0)]).stop == (RankRef(job_id, 0, 0),)
    # No rank is left running once the job ended; the stopped one's exit is kept when told.
    rank0 = job.placement.ranks[0]
    assert (rank0.state, rank0.exit_code, rank0.message) == (
        RankState.EXITED,
        None,
        "stopped: the job is failed",
    )
    ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.EXITED, -15, "killed by SIGTERM")
    job = ctl.store.get_job(job_id)
    assert (job.state, job.placement.ranks[0].exit_code) == (JobState.FAILED, -15)


def test_a_rank_killed_by_a_signal_is_worded_so(ctl):
    job_id = run_gang(ctl)
    ctl.report_rank("b", RankRef(job_id, 1, 0), RankState.EXITED, -9)
    assert ctl.store.get_job(job_id).reason == "rank 1 on b was killed by SIGKILL (signal 9)"


def test_gang_that_does_not_fit_stays_pending_with_a_reason(ctl):
    job = ctl.submit(training(nodes=2))  # no node yet: nothing to refuse it by
    ctl.register_node(h100_node("a"))
    ctl.run_cycle()
    job = ctl.store.get_job(job.id)
    assert job.state is JobState.PENDING
    assert "2 nodes" in job.reason
    ctl.run_cycle()  # same reason: no second event
    assert [e.type for e in ctl.store.list_events("job", str(job.id))] == [
        "Submitted",
        "Unschedulable",
    ]


def test_a_cycle_tells_waiting_jobs_their_reasons_a_bounded_write_at_a_time(ctl, monkeypatch):
    # Each write holds the store's commit, and every submit behind it, for its length.
    jobs = [ctl.submit(training(nodes=2)) for _ in range(250)]
    ctl.register_node(h100_node("a"))
    writes: list[int] = []
    update_jobs = ctl.store.update_jobs

    def counted(jobs, events=()):
        writes.append(len(jobs))
        return update_jobs(jobs, events)

    monkeypatch.setattr(ctl.store, "update_jobs", counted)
    ctl.run_cycle()
    assert writes == [100, 100, 50]
    for job in jobs:
        assert "2 nodes" in ctl.store.get_job(job.id).reason
        assert [e.type for e in ctl.store.list_events("job", str(job.id))][-1] == "Unschedulable"


def test_cancel_pending_is_immediate_and_cancel_finished_is_refused(ctl):
    job = ctl.submit(training())
    assert ctl.cancel(job.id).state is JobState.CANCELLED
    with pytest.raises(FailedPrecondition):
        ctl.cancel(job.id)
    with pytest.raises(NotFound):
        ctl.cancel(999)


def test_cancel_running_stops_ranks_then_cancelled(ctl):
    job_id = run_gang(ctl)
    ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.RUNNING)
    assert ctl.cancel(job_id).state is JobState.CANCELLING
    assert ctl.heartbeat("a", [RankRef(job_id, 0, 0)]).stop == (RankRef(job_id, 0, 0),)
    # Rank 1 was never started: node b's heartbeat settles it without starting it.
    assert ctl.heartbeat("b", []).assignments == ()
    assert ctl.store.get_job(job_id).state is JobState.CANCELLING  # rank 0 still stopping
    ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.EXITED, -15)
    assert ctl.store.get_job(job_id).state is JobState.CANCELLED


@pytest.mark.parametrize(
    ("on_lost", "state", "attempt"),
    [(OnNodeLost.REQUEUE, JobState.PENDING, 1), (OnNodeLost.FAIL, JobState.NODE_LOST, 0)],
    ids=["requeue", "fail"],
)
def test_lost_node_requeues_or_fails_its_jobs(ctl, on_lost, state, attempt):
    ctl.register_node(h100_node("a"))
    ctl.register_node(h100_node("b"))
    job = ctl.submit(training(on_node_lost=on_lost))
    ctl.run_cycle()
    ctl.clock.advance(timedelta(seconds=20))
    ctl.heartbeat("a", [])
    assert ctl.expire_heartbeats() == []
    ctl.clock.advance(timedelta(seconds=15))  # b silent for 35 s > 30 s; a for 15 s
    assert ctl.expire_heartbeats() == ["b"]
    assert ctl.store.get_node("b").state is NodeState.LOST
    job = ctl.store.get_job(job.id)
    assert (job.state, job.attempt) == (state, attempt)
    assert "node b lost" in job.reason
    # The surviving node is told to stop the old attempt's rank.
    assert ctl.heartbeat("a", [RankRef(job.id, 0, 0)]).stop == (RankRef(job.id, 0, 0),)
    # A lost node that comes back must register again.
    assert ctl.heartbeat("b", []).reregister


def test_report_from_an_older_attempt_is_ignored(ctl):
    job_id = run_gang(ctl)
    ctl.clock.advance(timedelta(seconds=31))
    ctl.heartbeat("a", [])
    ctl.expire_heartbeats()  # b lost -> requeued as attempt 1
    ctl.report_rank("a", RankRef(job_id, 0, 0), RankState.EXITED, 1)
    assert ctl.store.get_job(job_id).state is JobState.PENDING


def test_time_limit_stops_a_running_job_which_ends_as_timeout(ctl):
    ctl.register_node(h100_node("a"))
    job = ctl.submit(training(nodes=1, time_limit_s=60))
    ctl.run_cycle()
    ctl.report_rank("a", RankRef(job.id, 0, 0), RankState.RUNNING)
    ctl.clock.advance(timedelta(seconds=59))
    assert ctl.enforce_time_limits() == []
    ctl.clock.advance(timedelta(seconds=1))
    assert ctl.enforce_time_limits() == [job.id]
    assert ctl.store.get_job(job.id).state is JobState.CANCELLING
    ctl.report_rank("a", RankRef(job.id, 0, 0), RankState.EXITED, -15)
    job = ctl.store.get_job(job.id)
    assert job.state is JobState.TIMEOUT
    assert job.reason == "time limit of 0:01:00 reached"
    assert [e.type for e in ctl.store.list_events("job", str(job.id))][-2:] == [
        "Exited",
        "TimedOut",
    ]


def test_cancel_says_by_whom_and_ends_as_cancelled(ctl):
    ctl.register_node(h100_node("a"))
    job = ctl.submit(training(nodes=1))
    ctl.run_cycle()
    ctl.report_rank("a", RankRef(job.id, 0, 0), RankState.RUNNING)
    ctl.cancel(job.id, by="alice")
    ctl.report_rank("a", RankRef(job.id, 0, 0), RankState.EXITED, -15)
    job = ctl.store.get_job(job.id)
    assert (job.state, job.reason) == (JobState.CANCELLED, "cancelled by alice")


def test_drain_keeps_new_work_off_the_node(ctl):
    ctl.register_node(h100_node("a"))
    assert ctl.drain("a", "bad fan").state is NodeState.DRAINING
    job = ctl.submit(training(nodes=1))
    ctl.run_cycle()
    assert ctl.store.get_job(job.id).state is JobState.PENDING
    assert (
        ctl.register_node(h100_node("a")).state is NodeState.DRAINING
    )  # re-register keeps the drain


def test_registration_opens_a_lease_and_accrues_cost(ctl):
    ctl.register_node(h100_node("a"))
    (lease,) = ctl.store.list_leases()
    assert (lease.node_id, lease.price_per_hour) == ("a", 24.0)
    ctl.clock.advance(timedelta(minutes=30))
    assert ctl.lease_costs() == pytest.approx(12.0)  # 0.5 h x $24/h
    ctl.register_node(h100_node("a"))  # again: same lease
    assert len(ctl.store.list_leases()) == 1


def test_logs_are_appended_by_offset_idempotently(ctl):
    job_id = run_gang(ctl)
    node = ctl.store.get_job(job_id).placement.ranks[0].node_id
    ref = RankRef(job_id, 0, 0)
    assert ctl.push_logs(node, ref, 0, b"hello ") == 6
    assert ctl.push_logs(node, ref, 0, b"hello ") == 6  # a resend: not duplicated
    assert ctl.push_logs(node, ref, 6, b"world\n") == 12
    assert ctl.logs.read(job_id, 0, 0, 0) == b"hello world\n"


@pytest.mark.parametrize(
    "ref, node, error",
    [
        pytest.param((0, 0), "other", PermissionDenied, id="rank-on-another-node"),
        pytest.param((0, 1), "own", PermissionDenied, id="a-newer-attempt"),
        pytest.param((9, 0), "own", NotFound, id="unknown-rank"),
    ],
)
def test_a_node_pushes_logs_only_for_its_own_ranks(ctl, ref, node, error):
    job_id = run_gang(ctl)
    ranks = ctl.store.get_job(job_id).placement.ranks
    own = ranks[0].node_id
    other = next(r.node_id for r in ranks if r.node_id != own)
    rank, attempt = ref
    job = job_id if rank != 9 else 999
    with pytest.raises(error):
        ctl.push_logs(own if node == "own" else other, RankRef(job, rank, attempt), 0, b"x")
    assert ctl.logs.read(job_id, 0, 0, 0) == b""


def test_a_drain_and_its_reason_survive_a_daemon_restart_and_the_agent_registering_again(
    ctl, tmp_path
):
    ctl.register_node(h100_node("a"))
    ctl.drain("a", "bad fan")
    again = Controller(
        ctl.store,
        ctl.clock,
        build_policy("default"),
        LogStore(tmp_path / "logs2", max_bytes_per_rank=1024),
    )  # a new gpuctld on the same store

    node = again.register_node(h100_node("a"))  # the agent restarts too

    assert (node.state, node.state_reason) == (NodeState.DRAINING, "bad fan")


def test_undrain_lets_work_land_again_and_a_ready_node_cannot_be_undrained(ctl):
    ctl.register_node(h100_node("a"))
    with pytest.raises(FailedPrecondition):
        ctl.undrain("a")
    ctl.drain("a", "bad fan")
    assert ctl.undrain("a", by="olga").state is NodeState.READY
    job = ctl.submit(training(nodes=1))
    ctl.run_cycle()
    assert ctl.store.get_job(job.id).state is JobState.RUNNING
    assert [e.type for e in ctl.store.list_events("node", "a")][-1] == "Undrain"


def test_an_expired_lease_drains_its_node(ctl):
    ctl.register_node(h100_node("a"))
    (lease,) = ctl.store.list_leases()
    ctl.store.put_lease(replace(lease, expires_at=ctl.clock.now() + timedelta(hours=1)))
    assert ctl.keep_leases() == []
    ctl.clock.advance(timedelta(hours=1))
    assert ctl.keep_leases() == [lease.id]
    (after,) = ctl.store.list_leases(include_released=True)
    assert after.state is LeaseState.EXPIRED
    node = ctl.store.get_node("a")
    assert node.state is NodeState.DRAINING
    assert "expired" in node.state_reason
    assert ctl.lease_costs() == pytest.approx(24.0)  # 1 h x $24/h, then it stops accruing
    ctl.clock.advance(timedelta(hours=1))
    assert ctl.lease_costs() == pytest.approx(24.0)


def test_an_implausible_fabric_claim_is_an_event_on_the_node(ctl):
    from gpuctl.core.model import IbPort

    ib = IbPort(
        device="mlx5_0",
        port=1,
        rate_gbps=400,
        state="ACTIVE",
        phys_state="LinkUp",
        link_layer="InfiniBand",
        guid="0xabc",
    )
    for name in ("a", "b"):  # b's config was cloned from a's, GUIDs and all
        n = h100_node(name)
        ctl.register_node(replace(n, profile=replace(n.profile, ib_ports=(ib,))))
    (event,) = [e for e in ctl.store.list_events("node", "b") if e.type == "FabricImplausible"]
    assert event.message == "port mlx5_0/1 GUID 0xabc is also reported by node a"
    assert not [e for e in ctl.store.list_events("node", "a") if e.type == "FabricImplausible"]


@pytest.mark.parametrize(
    ("caps", "kept"),
    [
        pytest.param({}, [b"aaaa", b"bbbb", b"cccc"], id="rank-cap-only"),
        pytest.param({"max_bytes_per_job": 6}, [b"aaaa", b"bb" + TRUNCATED, b""], id="per-job"),
        pytest.param({"max_bytes_total": 5}, [b"aaaa", b"b" + TRUNCATED, b""], id="total"),
    ],
)
def test_logs_are_capped_per_rank_per_job_and_in_all(tmp_path, caps, kept):
    logs = LogStore(tmp_path / "logs", max_bytes_per_rank=8, **caps)
    for rank, data in enumerate((b"aaaa", b"bbbb", b"cccc")):
        assert logs.append(7, 0, rank, 0, data) == 4  # accepted, whatever is kept
    assert [logs.read(7, 0, rank, 0) for rank in range(3)] == kept


def test_log_arrival_times_are_kept_a_second_apart_and_cut_the_reads(tmp_path):
    logs = LogStore(tmp_path / "logs", max_bytes_per_rank=1 << 20)
    t0 = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)
    logs.append(7, 0, 0, 0, b"one\n", t0)
    logs.append(7, 0, 0, 4, b"two\n", t0 + timedelta(seconds=0.5))  # within the second: no record
    logs.append(7, 0, 0, 8, b"three\n", t0 + timedelta(seconds=2))
    logs.append(7, 0, 0, 14, b"four\n")  # no time given (an older caller): none recorded
    assert logs.times(7, 0, 0) == [(0, t0), (8, t0 + timedelta(seconds=2))]
    assert logs.read_stamped(7, 0, 0, 0) == (b"one\ntwo\n", t0)
    assert logs.read_stamped(7, 0, 0, 4) == (b"two\n", t0)
    assert logs.read_stamped(7, 0, 0, 8) == (b"three\nfour\n", t0 + timedelta(seconds=2))
    assert logs.times(7, 0, 1) == [] and logs.read_stamped(7, 0, 1, 0) == (b"", None)
    # A torn last record (a crash mid-write) is left out, not misread.
    times = logs.path(7, 0, 0).with_suffix(".times")
    times.write_bytes(times.read_bytes() + b"\x01\x02")
    assert len(logs.times(7, 0, 0)) == 2


def test_the_active_jobs_kept_in_memory_follow_every_write_even_another_daemons(ctl, tmp_path):
    other = Controller(
        ctl.store,
        ctl.clock,
        build_policy("default"),
        LogStore(tmp_path / "other-logs", max_bytes_per_rank=1 << 20),
    )
    assert ctl.active_jobs() == ()
    job_id = run_gang(ctl)
    a = ctl.submit(training(nodes=1))
    b = other.submit(training(nodes=1))  # another gpuctld on the same store
    assert ctl.active_jobs() == ctl.store.active_jobs()
    ctl.cancel(a.id)
    other.cancel(b.id)
    node = ctl.store.get_job(job_id).placement.ranks[0].node_id
    ctl.report_rank(node, RankRef(job_id, 0, 0), RankState.EXITED, 1)
    assert ctl.active_jobs() == ctl.store.active_jobs()
    assert [j.id for j in ctl.active_jobs()] == [j.id for j in other.active_jobs()]
    ctl.run_cycle()
    assert ctl.active_jobs() == ctl.store.active_jobs()


def test_the_active_jobs_stay_in_id_order_and_count_the_pending(ctl):
    active = ctl.active_jobs
    first = [ctl.submit(training(nodes=1)) for _ in range(3)]
    assert active.pending() == 3
    # Jobs that come in below the highest id (an import with the ids it carries) sort in.
    ctl.store.load_jobs(
        [Job(id=first[-1].id + 10, spec=training()), Job(id=0, spec=training())], []
    )
    assert [j.id for j in active()] == sorted(j.id for j in ctl.store.active_jobs())
    assert list(active.by_id()) == [j.id for j in active()] and active.pending() == 5
    ctl.register_node(h100_node("a"))
    ctl.run_cycle()  # one 1-node gang is bound: four wait
    ctl.cancel(first[1].id)
    assert active() == ctl.store.active_jobs()
    waiting = [j for j in ctl.store.active_jobs() if j.state is JobState.PENDING]
    assert active.pending() == len(waiting) == 3


def test_a_new_leader_gives_every_node_a_full_timeout_before_calling_it_lost(ctl):
    """Taking over from a leader that died (or restarting after a long outage), the nodes'
    last heartbeats are old: their agents are still finding this daemon, not dead."""
    ctl.register_node(h100_node("a"))
    ctl.clock.advance(timedelta(seconds=100))  # the old leader died long ago
    ctl.lead()
    ctl.clock.advance(timedelta(seconds=29))
    assert ctl.expire_heartbeats() == []  # within the timeout (30 s here) of the takeover
    ctl.clock.advance(timedelta(seconds=2))
    assert ctl.expire_heartbeats() == ["a"]


def test_retention_deletes_old_finished_jobs_their_logs_node_events_and_old_audit(ctl):
    job = ctl.submit(training())
    ctl.cancel(job.id)  # finished now
    ctl.logs.append(job.id, 0, 0, 0, b"hello\n")
    kept = ctl.submit(training())
    ctl.register_node(h100_node("a"))  # a node event now
    ctl.store.add_audit(
        AuditEntry(
            time=ctl.clock.now(), principal="a", role="user", via="unix", peer="",
            action="CancelJob", target=f"jobs/{job.id}", outcome="ok",
        )
    )  # fmt: skip
    ctl.clock.advance(timedelta(days=29))
    assert ctl.purge_history() == (0, 0, 0)
    ctl.drain("a", "today")  # a node event that stays
    ctl.clock.advance(timedelta(days=2))
    # 31 days after: the job and the node's registration go; audit is kept for a year.
    assert ctl.purge_history() == (1, 1, 0)
    assert [j.id for j in ctl.store.list_jobs().jobs] == [kept.id]
    assert not (ctl.logs.root / str(job.id)).exists()
    assert [e.type for e in ctl.store.list_events("node", "a")] == ["Drain"]
    ctl.clock.advance(timedelta(days=365))
    assert ctl.purge_history() == (0, 1, 1)
