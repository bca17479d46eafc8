"""Cycles decided in a worker process: the same decisions as in gpuctld's process, nothing
bound on a decision about jobs that changed since, and a dead worker costs one cycle its
process, not the cycle."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest

from gpuctl.core.cycle import Binding, CycleResult, Unschedulable
from gpuctl.core.model import JobState, Placement, RankPlacement
from gpuctl.core.plugins import build_policy
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller, ControllerSettings, _as_seen
from gpuctl.runtime.cycleproc import CycleProcess, Decided, Decider, decide
from gpuctl.runtime.logstore import LogStore
from gpuctl.store.sql import open_store
from tests.test_controller import h100_node, training


@pytest.fixture
def ctl(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = open_store(url)
    c = Controller(
        store,
        FakeClock(),
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
        ControllerSettings(heartbeat_timeout_s=30),
    )
    c.cycles = CycleProcess(url, c.policy)
    yield c
    c.cycles.close()
    store.close()


def test_the_worker_places_a_gang_and_gives_the_rest_their_reasons(ctl):
    too_big = ctl.submit(training(nodes=3))  # no node yet: nothing to refuse it by
    ctl.register_node(h100_node("a"))
    ctl.register_node(h100_node("b"))
    gang = ctl.submit(training())
    result = ctl.run_cycle()
    assert [b.job_id for b in result.bindings] == [gang.id]
    placed = ctl.store.get_job(gang.id)
    assert placed.state is JobState.RUNNING
    assert sorted(placed.placement.node_ids) == ["a", "b"]
    ctl.run_cycle()  # the big one's reason as it is with the gang on a and b
    waiting = ctl.store.get_job(too_big.id)
    assert waiting.state is JobState.PENDING and waiting.reason
    # Nothing changed: the next decision sends no reason again, and binds nothing twice.
    again = ctl.run_cycle()
    assert again.bindings == () and again.unschedulable == ()
    assert ctl.store.get_job(too_big.id).revision == waiting.revision


def test_a_dead_worker_costs_one_cycle_its_process_and_is_replaced(ctl):
    ctl.register_node(h100_node("a"))
    ctl.submit(training(nodes=1, gpus=4))
    assert len(ctl.run_cycle().bindings) == 1
    first = ctl.cycles._proc.pid
    os.kill(first, signal.SIGKILL)
    ctl.cycles._proc.join(10)
    job = ctl.submit(training(nodes=1, gpus=4))
    result = ctl.run_cycle()  # decided here, in this process
    assert [b.job_id for b in result.bindings] == [job.id]
    third = ctl.submit(training(nodes=1, gpus=4))
    ctl.run_cycle()  # by a new worker
    assert ctl.cycles._proc.pid != first
    assert ctl.store.get_job(third.id).reason  # no room left, as it learnt from the store


def test_a_decision_about_jobs_changed_since_binds_nothing(ctl):
    a = ctl.submit(training(nodes=1))
    b = ctl.submit(training(nodes=1))
    placement = Placement(ranks=(RankPlacement(rank=0, node_id="a", gpu_indices=(0,)),))
    decided = Decided(
        result=CycleResult(
            bindings=(Binding(job_id=a.id, placement=placement),),
            unschedulable=(Unschedulable(job_id=b.id, reason="no room"),),
        ),
        seen={a.id: a.revision, b.id: b.revision},
    )
    active = {j.id: j for j in ctl.active_jobs()}
    assert _as_seen(decided, active) is decided.result
    active[a.id] = replace(a, revision=a.revision + 10)  # cancelled meanwhile, say
    kept = _as_seen(decided, active)
    assert kept.bindings == ()
    assert kept.unschedulable == decided.result.unschedulable


def test_the_worker_tells_new_jobs_from_a_kept_quiet_cycle_what_a_full_cycle_would(ctl):
    ctl.register_node(h100_node("a"))
    ctl.register_node(h100_node("b"))
    ctl.submit(training(time_limit_s=3600))
    ctl.run_cycle()  # it runs on a and b: nothing else fits
    for _ in range(3):
        ctl.submit(training())
    decider = Decider(ctl.policy)
    now = ctl.clock.now()

    def decide_now(nodes=None):
        jobs = list(ctl.active_jobs())
        nodes = list(ctl.store.list_nodes()) if nodes is None else nodes
        full = decide(jobs, nodes, ctl.policy, now=now, leasing=None)
        return decider.decide(jobs, nodes, now=now, leasing=None), full

    first, _ = decide_now()
    assert decider.carried == 0 and not first.result.bindings
    new = ctl.submit(training(nodes=1, gpus=4))  # waits too: a and b are taken
    got, full = decide_now()
    assert decider.carried == 1
    assert got.result.unschedulable == tuple(
        u for u in full.result.unschedulable if u.job_id == new.id
    )
    assert got.seen == {new.id: ctl.store.get_job(new.id).revision}
    # Only a heartbeat's time changed: still carried. A node drained: a full cycle.
    beat = [replace(n, last_heartbeat=now) for n in ctl.store.list_nodes()]
    decide_now(beat)
    assert decider.carried == 2
    ctl.drain("a", "maintenance")
    decide_now()
    assert decider.carried == 2
    # A job that can start is never told from the kept cycle: a full cycle places it. On c,
    # which the first waiting gang reserves for when the running job's hour is up, one that
    # asks for a minute backfills; the 4-GPU job, with no time limit, may not.
    ctl.register_node(h100_node("c"))
    decide_now()  # a full cycle again (a new node), and quiet: kept
    fits = ctl.submit(training(nodes=1, gpus=1, time_limit_s=60))
    got, _ = decide_now()
    assert decider.carried == 2 and [b.job_id for b in got.result.bindings] == [fits.id]


def test_a_decision_with_nothing_new_renews_a_kept_cycle_that_has_aged(ctl):
    from datetime import timedelta

    from gpuctl.runtime.cycleproc import REFRESH_S

    ctl.register_node(h100_node("a"))
    ctl.submit(training(nodes=1, time_limit_s=3600))
    ctl.run_cycle()  # it runs on a
    ctl.submit(training(nodes=1))  # waits for a
    decider = Decider(ctl.policy)
    t0 = ctl.clock.now()

    def at(seconds: float):
        jobs, nodes = list(ctl.active_jobs()), list(ctl.store.list_nodes())
        return decider.decide(jobs, nodes, now=t0 + timedelta(seconds=seconds), leasing=None)

    at(0)  # full, and kept
    at(REFRESH_S / 2)  # nothing new, young: nothing to do
    assert decider.carried == 1
    at(REFRESH_S)  # nothing new, aged: a full cycle, kept anew at this time
    assert decider.carried == 1
    ctl.submit(training(nodes=1))
    at(REFRESH_S + 1)  # from the renewed cycle
    assert decider.carried == 2


def test_a_kept_cycle_is_renewed_aside_while_the_old_one_goes_on_answering(ctl, monkeypatch):
    import threading
    from datetime import timedelta

    from gpuctl.core.cycle import CARRY_S
    from gpuctl.runtime import cycleproc
    from gpuctl.runtime.cycleproc import REFRESH_S

    ctl.register_node(h100_node("a"))
    ctl.submit(training(nodes=1, time_limit_s=3600))
    ctl.run_cycle()  # it runs on a
    ctl.submit(training(nodes=1))  # waits for a
    decider = Decider(ctl.policy, renew_aside=True)
    t0 = ctl.clock.now()
    gate = threading.Event()
    full_cycle = cycleproc.schedule_carrying

    def held(*args, **kw):  # the renewal waits for the gate: the test says when it is done
        if threading.current_thread().name == "cycle-renewal":
            assert gate.wait(10)
        return full_cycle(*args, **kw)

    monkeypatch.setattr(cycleproc, "schedule_carrying", held)

    def at(seconds: float):
        jobs, nodes = list(ctl.active_jobs()), list(ctl.store.list_nodes())
        now = t0 + timedelta(seconds=seconds)
        got = decider.decide(jobs, nodes, now=now, leasing=None)
        return got, decide(jobs, nodes, ctl.policy, now=now, leasing=None)

    def told(decided, job_id):
        return [u for u in decided.result.unschedulable if u.job_id == job_id]

    at(0)  # full, and kept
    one = ctl.submit(training(nodes=1))
    got, full = at(REFRESH_S)  # aged: the old one answers at once, a renewal starts aside
    assert decider.carried == 1 and told(got, one.id) == told(full, one.id) != []
    two = ctl.submit(training(nodes=1))
    got, full = at(REFRESH_S + 0.5)  # the renewal still runs: the old one answers
    assert decider.carried == 2 and decider.renewed == 0
    assert told(got, two.id) == told(full, two.id) != []
    gate.set()
    decider.wait_renewal(10)
    three = ctl.submit(training(nodes=1))
    got, full = at(REFRESH_S + 1)  # taken up, having said of `two` what the old one did
    assert decider.renewed == 1 and decider.carried == 3
    assert told(got, three.id) == told(full, three.id) != []
    # Young again: it answers past the old one's CARRY_S.
    four = ctl.submit(training(nodes=1))
    got, full = at(CARRY_S + 1)
    assert decider.carried == 4 and told(got, four.id) == told(full, four.id) != []
    # Nothing new and aged: nothing to do, said at once, and renewed aside again.
    at(CARRY_S + 1.5)
    assert decider.carried == 5
    decider.wait_renewal(10)
    at(CARRY_S + 2)
    assert decider.renewed == 2 and decider.carried == 6


def test_a_renewal_taken_up_tells_the_old_jobs_their_reasons_where_time_changed_them(ctl):
    from datetime import timedelta

    ctl.register_node(h100_node("a"))
    ctl.submit(training(nodes=1, time_limit_s=3600))
    ctl.run_cycle()  # bound to a, not started: it may hold a for an hour from when it starts
    waiting = ctl.submit(training(nodes=1))  # reserves a for when that hour is up
    decider = Decider(ctl.policy, renew_aside=True)
    t0 = ctl.clock.now() + timedelta(seconds=56)

    def at(seconds: float):
        jobs, nodes = list(ctl.active_jobs()), list(ctl.store.list_nodes())
        now = t0 + timedelta(seconds=seconds)
        return decider.decide(jobs, nodes, now=now, leasing=None), decide(
            jobs, nodes, ctl.policy, now=now, leasing=None
        )

    first, _ = at(0)  # kept
    (reserved,) = first.result.unschedulable
    assert "starts by 01:00 UTC" in reserved.reason
    got, _ = at(5)  # aged, nothing new: nothing to say at once; renewed aside
    assert got.result.unschedulable == () and decider.renewed == 0
    decider.wait_renewal(10)
    got, full = at(5.5)  # taken up: a minute later, the reservation starts a minute later
    assert decider.renewed == 1
    assert got.result.unschedulable == full.result.unschedulable
    assert [(u.job_id, "starts by 01:01 UTC" in u.reason) for u in got.result.unschedulable] == [
        (waiting.id, True)
    ]
