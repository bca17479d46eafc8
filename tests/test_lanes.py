"""People's calls run on a lane of their own: when its threads are all taken the next one is
refused at once (RESOURCE_EXHAUSTED with RetryInfo), while agents' calls and health checks
still get through."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import jobs_pb2, jobs_pb2_grpc
from gpuctl.api.lanes import GATE_SLOTS, Gate, Lanes
from gpuctl.api.limits import LimitSettings
from gpuctl.api.server import ApiServer
from gpuctl.api.servicers import DEFAULT_PAGE_SIZE
from gpuctl.core.plugins import build_policy
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller
from gpuctl.runtime.logstore import LogStore
from gpuctl.store.base import Store
from gpuctl.store.sql import open_store
from tests.auth_rig import Tokens, serve
from tests.test_api import spec
from tests.test_e2e import wait_until


def test_a_full_people_lane_admits_no_more_and_leaves_the_other_lane_free() -> None:
    lanes = Lanes(people=2, others=1)
    gate = threading.Event()
    try:
        assert lanes.admit() and lanes.admit()
        held = [lanes.call(True, gate.wait, 10) for _ in range(2)]
        assert lanes.people_in_flight == 2
        assert not lanes.admit()  # the third is refused, not queued
        assert lanes.call(False, lambda: "agent").result(10) == "agent"
        gate.set()
        assert [f.result(10) for f in held] == [True, True]
        wait_until(lambda: lanes.people_in_flight == 0)  # each call gave its place back
        assert lanes.admit()
        assert lanes.call(True, lambda: "ran").result(10) == "ran"
        wait_until(lambda: lanes.people_in_flight == 0)
    finally:
        gate.set()
        lanes.shutdown()


def _controller(tmp_path) -> tuple[Store, Controller]:
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    controller = Controller(
        store, FakeClock(), build_policy("default"), LogStore(tmp_path / "l", max_bytes_per_rank=1)
    )
    return store, controller


def _held(monkeypatch, controller: Controller, method: str) -> threading.Event:
    """Hold every call of `controller.<method>` until the event returned is set."""
    gate = threading.Event()
    call = getattr(controller, method)

    def held(*args, **kwargs):
        gate.wait(10)
        return call(*args, **kwargs)

    monkeypatch.setattr(controller, method, held)
    return gate


@pytest.fixture
def busy_server(tmp_path, monkeypatch):
    """A server whose people's lane has 4 threads, and a gate that holds GetJob calls (run on
    the lane: inline, a held read would hold the whole server)."""
    store, controller = _controller(tmp_path)
    gate = _held(monkeypatch, controller, "get")
    server = serve(
        controller,
        limits=LimitSettings(workers=6, agent_reserve=2, max_streams=1),
        inline_reads=False,
    )
    try:
        yield server, Tokens(controller), gate
    finally:
        gate.set()
        server.drain(0)
        store.close()


def test_people_past_their_lane_are_refused_at_once_and_agents_still_answered(busy_server):
    server, tokens, gate = busy_server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)
        alice = tokens.metadata(tokens.user("alice"))
        job = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=spec()), metadata=alice)
        with ThreadPoolExecutor(4) as pool:
            held = [
                pool.submit(
                    jobs.GetJob, jobs_pb2.GetJobRequest(name=job.name), metadata=alice, timeout=20
                )
                for _ in range(4)
            ]
            wait_until(lambda: server.lanes.people_in_flight == 4)
            with pytest.raises(grpc.RpcError) as e:
                jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=spec()), metadata=alice, timeout=5)
            assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in e.value.details()
            details = rpc_status.from_call(e.value).details
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
            # The other lane: a health check, and an agent's heartbeat (answered: this node
            # never registered, so it is told to).
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            node = tokens.metadata(tokens.node("n1"))
            agent = agent_pb2_grpc.AgentServiceStub(channel)
            request = agent_pb2.HeartbeatRequest(node_name="n1")
            assert agent.Heartbeat(request, metadata=node, timeout=5).reregister
            assert not any(f.done() for f in held)
            gate.set()
            assert all(f.result(20).name == job.name for f in held)
        wait_until(lambda: server.lanes.people_in_flight == 0)
        jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=spec()), metadata=alice, timeout=5)


# -- the gate: a few handlers run Python at once ---------------------------------------------


def test_the_gate_lets_in_its_slots_and_a_thread_that_leaves_lets_the_next_in() -> None:
    gate = Gate(2)
    inside = threading.Semaphore(0)
    go = threading.Event()
    left = threading.Event()

    def handler(leave_early: bool) -> None:
        with gate:
            inside.release()
            if leave_early:
                gate.leave()  # about to wait on a commit
                left.set()
            go.wait(10)

    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(handler, False), pool.submit(handler, True)]
        assert inside.acquire(timeout=10) and inside.acquire(timeout=10)
        assert left.wait(10)
        third = pool.submit(handler, False)
        assert inside.acquire(timeout=10)  # in, while both before it still run
        go.set()
        for f in [*first, third]:
            f.result(10)  # and nobody released a slot twice (BoundedSemaphore would raise)
    with gate, gate:  # both slots free again
        pass


@contextlib.contextmanager
def _serving(controller: Controller, **limits: int) -> Iterator[tuple[ApiServer, Any, Any]]:
    """A server with these limits, a JobService stub on it and alice's call metadata; the
    server drained on the way out."""
    server = serve(controller, limits=LimitSettings(**limits))
    try:
        tokens = Tokens(controller)
        alice = tokens.metadata(tokens.user("alice"))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, jobs_pb2_grpc.JobServiceStub(channel), alice
    finally:
        server.drain(0)


def test_watches_never_hold_the_gate(tmp_path) -> None:
    # More open watches (streams waiting for changes) than the gate has slots: a GetJob still
    # runs at once (a streaming handler is a generator, which runs after the gate is left).
    store, controller = _controller(tmp_path)
    with _serving(controller, workers=16, agent_reserve=2, max_streams=8) as (_, jobs, alice):
        job = jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=spec()), metadata=alice)
        watches = [
            jobs.WatchJobs(jobs_pb2.WatchJobsRequest(), metadata=alice, timeout=30)
            for _ in range(GATE_SLOTS + 1)
        ]
        for w in watches:
            next(w)  # each runs, and now waits for a change
        got = jobs.GetJob(jobs_pb2.GetJobRequest(name=job.name), metadata=alice, timeout=5)
        assert got.name == job.name
        for w in watches:
            w.cancel()
    store.close()


def test_inline_reads_are_answered_while_the_people_lane_is_full(tmp_path, monkeypatch) -> None:
    # GetJob runs on the loop's thread: a full lane (4 held cancels) refuses a submit, not it.
    store, controller = _controller(tmp_path)
    gate = _held(monkeypatch, controller, "cancel")
    with (
        _serving(controller, workers=6, agent_reserve=2, max_streams=1) as (server, jobs, alice),
        ThreadPoolExecutor(4) as pool,
    ):
        try:
            names = [
                jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=spec()), metadata=alice).name
                for _ in range(4)
            ]
            held = [
                pool.submit(
                    jobs.CancelJob, jobs_pb2.CancelJobRequest(name=n), metadata=alice, timeout=20
                )
                for n in names
            ]
            wait_until(lambda: server.lanes.people_in_flight == 4)
            with pytest.raises(grpc.RpcError) as e:
                jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=spec()), metadata=alice)
            assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            got = jobs.GetJob(jobs_pb2.GetJobRequest(name=names[0]), metadata=alice, timeout=5)
            assert got.name == names[0]
            listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(), metadata=alice, timeout=5)
            assert sorted(j.name for j in listed.jobs) == sorted(names)
            # A page past the default size is no quick read: it takes the lane, and is
            # refused like the submit.
            with pytest.raises(grpc.RpcError) as e:
                big = jobs_pb2.ListJobsRequest(page_size=DEFAULT_PAGE_SIZE + 1)
                jobs.ListJobs(big, metadata=alice, timeout=5)
            assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.set()
            assert all(f.result(20).name in names for f in held)
        finally:
            gate.set()
    store.close()


def test_a_stream_holds_its_place_until_its_caller_goes_and_then_gives_it_back(tmp_path) -> None:
    store, controller = _controller(tmp_path)
    # One stream for everyone: a second watch is refused while the first is open.
    with _serving(controller, workers=6, agent_reserve=2, max_streams=1) as (server, jobs, alice):
        jobs.CreateJob(jobs_pb2.CreateJobRequest(spec=spec()), metadata=alice)
        for _ in range(3):  # each time the place and the stream slot come back
            watch = jobs.WatchJobs(jobs_pb2.WatchJobsRequest(), metadata=alice, timeout=30)
            next(watch)
            assert server.lanes.people_in_flight == 1
            second = jobs.WatchJobs(jobs_pb2.WatchJobsRequest(), metadata=alice, timeout=5)
            with pytest.raises(grpc.RpcError) as e:
                next(second)
            assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            watch.cancel()
            wait_until(lambda: server.lanes.people_in_flight == 0, what="the place back")
    store.close()
