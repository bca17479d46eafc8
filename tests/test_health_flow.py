"""Node health end to end, one piece at a time: the agent re-profiles (on its clock and after a
rank exits) and heartbeats the issues; the controller degrades the node, moves its jobs off
and lets work back on when the issues clear; the API shows it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from gpuctl.agent.loop import AgentLoop, NodeIdentity
from gpuctl.agent.main import SettingsError, load_settings
from gpuctl.agent.probe import NodeFacts, fake_profile, parse_fake_gpus
from gpuctl.agent.runner import Runner
from gpuctl.api import convert
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import nodes_pb2, nodes_pb2_grpc
from gpuctl.core.model import (
    BandwidthProfile,
    JobState,
    Node,
    NodeState,
    OnNodeLost,
    RankState,
)
from gpuctl.core.plugins import build_policy
from gpuctl.runtime.clock import FakeClock
from gpuctl.runtime.controller import Controller, ControllerSettings, RankRef
from gpuctl.runtime.logstore import LogStore
from gpuctl.store.memory import MemoryStore
from tests.auth_rig import AsCaller, Tokens, serve
from tests.test_agent_loop import HEARTBEAT_S, FakeDaemon, assignment
from tests.test_agent_loop import FakeClock as AgentClock
from tests.test_controller import h100_node, training

HEALTH_S = 300.0
GPU_GONE = "GPU 3 (GPU-a-3) is gone"


def without_gpu(profile: BandwidthProfile, index: int) -> BandwidthProfile:
    return replace(profile, gpus=tuple(g for g in profile.gpus if g.index != index))


# -- the agent ------------------------------------------------------------------------------


class ScriptedProbe:
    """A probe whose profile the test sets; it counts the probes and can be made to fail."""

    def __init__(self, profile: BandwidthProfile) -> None:
        self.profile = profile
        self.probes = 0
        self.broken = False

    def probe(self) -> NodeFacts:
        self.probes += 1
        if self.broken:
            raise RuntimeError("NVML: driver not loaded")
        return NodeFacts(hostname="n1", cpu_milli=64_000, memory_mib=512_000, profile=self.profile)


HEALTHY = fake_profile(parse_fake_gpus("h100-sxm:8"), node_name="n1")
SICK = without_gpu(HEALTHY, 3)
SICK_ISSUES = ["GPU 3 (GPU-fake-n1-3) is gone"]


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    fake.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    server.start()
    yield fake
    server.stop(grace=None)


@contextlib.contextmanager
def agent_loop(
    daemon: FakeDaemon, tmp_path: Path, probe: ScriptedProbe, *, health_interval_s: float
) -> Iterator[tuple[AgentLoop, AgentClock]]:
    clock = AgentClock()
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")  # type: ignore[attr-defined]
    runner = Runner(tmp_path / "state", base_env={"PATH": "/usr/bin:/bin"}, clock=clock.monotonic)
    loop = AgentLoop(
        agent_pb2_grpc.AgentServiceStub(channel),
        runner,
        probe,
        NodeIdentity(name="n1", address="10.0.0.1"),
        clock=clock,
        jitter=lambda: 1.0,
        health_interval_s=health_interval_s,
    )
    yield loop, clock
    runner.reap(timeout_s=5)
    channel.close()


def tick_until(loop: AgentLoop, condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Tick until `condition` holds: waits for a real process to exit, never advances time."""
    deadline = time.monotonic() + timeout
    while True:
        loop.tick()
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def last_heartbeat(daemon: FakeDaemon) -> agent_pb2.HeartbeatRequest:
    return daemon.requests("Heartbeat")[-1]


def test_agent_reprofiles_on_its_clock_and_heartbeats_the_issues(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    probe = ScriptedProbe(HEALTHY)
    with agent_loop(daemon, tmp_path, probe, health_interval_s=HEALTH_S) as (loop, clock):
        loop.tick()
        assert probe.probes == 1  # registration: the baseline
        hb = last_heartbeat(daemon)
        assert list(hb.health_issues) == [] and not hb.HasField("profile")

        probe.profile = SICK
        clock.advance(HEALTH_S - 1)
        loop.tick()  # a heartbeat is due, the health check not yet
        assert probe.probes == 1 and list(last_heartbeat(daemon).health_issues) == []

        clock.advance(1)
        loop.tick()
        hb = last_heartbeat(daemon)
        assert probe.probes == 2
        assert list(hb.health_issues) == SICK_ISSUES
        assert len(hb.profile.gpus) == 7  # the re-measured profile goes along once
        assert loop.health_issues == tuple(SICK_ISSUES)

        clock.advance(HEARTBEAT_S)
        loop.tick()
        hb = last_heartbeat(daemon)
        assert list(hb.health_issues) == SICK_ISSUES and not hb.HasField("profile")

        probe.profile = HEALTHY
        clock.advance(HEALTH_S)
        loop.tick()
        hb = last_heartbeat(daemon)
        assert list(hb.health_issues) == [] and len(hb.profile.gpus) == 8


def test_agent_reprofiles_after_a_rank_exits(daemon: FakeDaemon, tmp_path: Path) -> None:
    probe = ScriptedProbe(HEALTHY)
    # 0: no periodic check, so only the exit can have caused the second probe
    with agent_loop(daemon, tmp_path, probe, health_interval_s=0) as (loop, clock):
        loop.tick()
        daemon.assignments = [assignment("true")]
        probe.profile = SICK  # the job broke the GPU; nobody looks until it ends
        clock.advance(HEARTBEAT_S)
        loop.tick()
        assert probe.probes == 1 and loop.held()

        tick_until(loop, lambda: any(h.health_issues for h in daemon.requests("Heartbeat")))
        hb = last_heartbeat(daemon)
        assert list(hb.health_issues) == SICK_ISSUES and len(hb.profile.gpus) == 7
        assert probe.probes == 2


def test_agent_keeps_an_undelivered_profile_for_the_next_heartbeat(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    probe = ScriptedProbe(HEALTHY)
    with agent_loop(daemon, tmp_path, probe, health_interval_s=HEALTH_S) as (loop, clock):
        loop.tick()
        probe.profile = SICK
        daemon.fail("Heartbeat", grpc.StatusCode.UNAVAILABLE)
        clock.advance(HEALTH_S)
        loop.tick()  # re-profiled, but the heartbeat carrying it failed
        clock.advance(HEARTBEAT_S)
        loop.tick()
        hb = last_heartbeat(daemon)
        assert list(hb.health_issues) == SICK_ISSUES and len(hb.profile.gpus) == 7


def test_a_failing_probe_keeps_the_last_verdict_and_the_agent_running(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    probe = ScriptedProbe(SICK)
    with agent_loop(daemon, tmp_path, probe, health_interval_s=HEALTH_S) as (loop, clock):
        loop.tick()
        probe.profile = without_gpu(SICK, 5)
        clock.advance(HEALTH_S)
        loop.tick()
        assert list(last_heartbeat(daemon).health_issues) == ["GPU 5 (GPU-fake-n1-5) is gone"]
        probe.broken = True
        clock.advance(HEALTH_S)
        loop.tick()
        hb = last_heartbeat(daemon)
        assert list(hb.health_issues) == ["GPU 5 (GPU-fake-n1-5) is gone"]
        assert not hb.HasField("profile") and loop.registered


def test_agent_flags_set_the_health_check() -> None:
    env = {"HOME": "/h"}
    default = load_settings([], env)
    assert (default.health_interval_s, default.min_bandwidth_fraction) == (300.0, 0.85)
    s = load_settings(["--health-interval", "0", "--min-bandwidth-fraction", "0.9"], env)
    assert (s.health_interval_s, s.min_bandwidth_fraction) == (0.0, 0.9)
    for bad in (["--health-interval", "-1"], ["--min-bandwidth-fraction", "1.5"]):
        with pytest.raises(SettingsError, match=bad[0]):
            load_settings(bad, env)


# -- the controller -------------------------------------------------------------------------


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Controller]:
    store = MemoryStore()
    wakes: list[int] = []
    c = Controller(
        store,
        FakeClock(),
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1024),
        ControllerSettings(heartbeat_timeout_s=30, kill_grace_s=1),
        wake=lambda: wakes.append(1),
    )
    c.wakes = wakes  # type: ignore[attr-defined]
    yield c
    store.close()


def running_gang(ctl: Controller, on_node_lost: OnNodeLost) -> int:
    """A 2-node gang on a and b, both ranks running; returns the job id."""
    ctl.register_node(h100_node("a"))
    ctl.register_node(h100_node("b"))
    job = ctl.submit(training(on_node_lost=on_node_lost))
    (binding,) = ctl.run_cycle().bindings
    for node, rank in (("a", 0), ("b", 1)):
        assert len(ctl.heartbeat(node, []).assignments) == 1
        ctl.report_rank(node, RankRef(job.id, rank, 0), RankState.RUNNING)
    return binding.job_id


def sick_a(ctl: Controller, running: list[RankRef]):
    a = ctl.store.get_node("a")
    return ctl.heartbeat("a", running, health_issues=(GPU_GONE,), profile=without_gpu(a.profile, 3))


def node_events(ctl: Controller, node_id: str) -> list[tuple[str, str]]:
    return [(e.type, e.message) for e in ctl.store.list_events("node", node_id)]


def test_issues_degrade_the_node_and_requeue_its_job_until_they_clear(ctl: Controller) -> None:
    job_id = running_gang(ctl, OnNodeLost.REQUEUE)
    full_profile = ctl.store.get_node("a").profile
    wakes = len(ctl.wakes)  # type: ignore[attr-defined]

    hb = sick_a(ctl, [RankRef(job_id, 0, 0)])

    a = ctl.store.get_node("a")
    assert (a.state, a.state_reason, a.health_issues) == (
        NodeState.DEGRADED,
        GPU_GONE,
        (GPU_GONE,),
    )
    assert a.gpu_count == 7  # the re-measured profile replaced the stored one
    assert ("Degraded", GPU_GONE) in node_events(ctl, "a")
    assert [t for t, _ in node_events(ctl, "a")].count("Reprofiled") == 1
    job = ctl.store.get_job(job_id)
    assert (job.state, job.attempt, job.placement) == (JobState.PENDING, 1, None)
    assert job.reason == f"requeued: node a degraded: {GPU_GONE} (attempt 1)"
    # the old attempt's ranks stop through the normal stop path, on both nodes
    assert hb.stop == (RankRef(job_id, 0, 0),) and hb.assignments == ()
    assert ctl.heartbeat("b", [RankRef(job_id, 1, 0)]).stop == (RankRef(job_id, 1, 0),)
    assert len(ctl.wakes) > wakes  # type: ignore[attr-defined]

    # no new work lands on a: the gang needs two nodes and b is the only READY one
    assert ctl.run_cycle().bindings == ()
    job = ctl.store.get_job(job_id)
    assert job.state is JobState.PENDING
    assert f"node a degraded ({GPU_GONE})" in job.reason

    ctl.heartbeat("a", [], health_issues=(), profile=full_profile)
    a = ctl.store.get_node("a")
    assert (a.state, a.state_reason, a.health_issues, a.gpu_count) == (NodeState.READY, "", (), 8)
    assert node_events(ctl, "a")[-1][0] == "Recovered"
    (binding,) = ctl.run_cycle().bindings
    assert {r.node_id for r in binding.placement.ranks} == {"a", "b"}
    assert ctl.heartbeat("a", []).assignments[0].ref == RankRef(job_id, 0, 1)


def test_issues_fail_a_job_that_asked_not_to_be_requeued(ctl: Controller) -> None:
    job_id = running_gang(ctl, OnNodeLost.FAIL)
    hb = sick_a(ctl, [RankRef(job_id, 0, 0)])
    job = ctl.store.get_job(job_id)
    assert (job.state, job.reason) == (JobState.NODE_LOST, f"node a degraded: {GPU_GONE}")
    assert hb.stop == (RankRef(job_id, 0, 0),)
    job_events = [(e.type, e.message) for e in ctl.store.list_events("job", str(job_id))]
    assert job_events[-1] == ("NodeDegraded", f"node a degraded: {GPU_GONE}")


def test_a_draining_node_stays_draining_and_records_the_issues(ctl: Controller) -> None:
    job_id = running_gang(ctl, OnNodeLost.REQUEUE)
    ctl.drain("a", "disk swap on Tuesday")
    sick_a(ctl, [RankRef(job_id, 0, 0)])
    a = ctl.store.get_node("a")
    assert (a.state, a.state_reason, a.health_issues) == (
        NodeState.DRAINING,
        "disk swap on Tuesday",
        (GPU_GONE,),
    )
    assert ("HealthIssues", GPU_GONE) in node_events(ctl, "a")
    # draining lets running work finish: the operator, not the health check, decides
    assert ctl.store.get_job(job_id).state is JobState.RUNNING

    ctl.heartbeat("a", [RankRef(job_id, 0, 0)])
    a = ctl.store.get_node("a")
    assert (a.state, a.state_reason, a.health_issues) == (
        NodeState.DRAINING,
        "disk swap on Tuesday",
        (),
    )


def test_reprofiled_only_when_the_profile_changed(ctl: Controller) -> None:
    ctl.register_node(h100_node("a"))
    same = replace(ctl.store.get_node("a").profile, measured_at=ctl.clock.now())
    ctl.heartbeat("a", [], profile=same)
    assert "Reprofiled" not in [t for t, _ in node_events(ctl, "a")]
    assert ctl.store.get_node("a").profile.measured_at == same.measured_at

    slower = replace(same, gpus=tuple(replace(g, measured_hbm_gbps=3000.0) for g in same.gpus))
    ctl.heartbeat("a", [], profile=slower)
    assert node_events(ctl, "a")[-1] == (
        "Reprofiled",
        "8x H100 SXM, HBM 3000 GB/s, NVLink 900 GB/s, network 3200 Gb/s "
        "(was 8x H100 SXM, HBM 3350 GB/s, NVLink 900 GB/s, network 3200 Gb/s)",
    )
    assert ctl.store.get_node("a").state is NodeState.READY  # a new profile is not an issue


def test_a_degraded_node_stays_degraded_across_an_agent_restart(ctl: Controller) -> None:
    ctl.register_node(h100_node("a"))
    sick_a(ctl, [])
    ctl.register_node(h100_node("a"))
    a = ctl.store.get_node("a")
    assert (a.state, a.state_reason, a.health_issues) == (
        NodeState.DEGRADED,
        GPU_GONE,
        (GPU_GONE,),
    )


def test_a_silent_degraded_node_is_lost(ctl: Controller) -> None:
    ctl.register_node(h100_node("a"))
    sick_a(ctl, [])
    ctl.clock.advance(timedelta(seconds=31))  # type: ignore[attr-defined]
    assert ctl.expire_heartbeats() == ["a"]
    assert ctl.store.get_node("a").state is NodeState.LOST


# -- the API --------------------------------------------------------------------------------


def test_get_node_shows_degraded_with_the_reason_and_the_issues(tmp_path: Path) -> None:
    store = MemoryStore()
    controller = Controller(
        store,
        FakeClock(),
        build_policy("default"),
        LogStore(tmp_path / "logs", max_bytes_per_rank=1 << 20),
    )
    server = serve(controller)
    channel = grpc.intercept_channel(
        grpc.insecure_channel(f"127.0.0.1:{server.port}"), AsCaller(Tokens(controller), "alice")
    )
    try:
        agent = agent_pb2_grpc.AgentServiceStub(channel)
        node: Node = h100_node("a")
        agent.RegisterNode(agent_pb2.RegisterNodeRequest(node=convert.node_to_pb(node)))
        agent.Heartbeat(
            agent_pb2.HeartbeatRequest(
                node_name="a",
                health_issues=[GPU_GONE],
                profile=convert.profile_to_pb(without_gpu(node.profile, 3)),
            )
        )
        got = nodes_pb2_grpc.NodeServiceStub(channel).GetNode(
            nodes_pb2.GetNodeRequest(name="nodes/a")
        )
        assert got.state == nodes_pb2.NODE_STATE_DEGRADED
        assert (got.state_reason, list(got.health_issues)) == (GPU_GONE, [GPU_GONE])
        assert len(got.profile.gpus) == 7
        assert "Degraded" in [e.type for e in got.events]

        with pytest.raises(grpc.RpcError) as e:
            agent.Heartbeat(agent_pb2.HeartbeatRequest(node_name="a", health_issues=[""]))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
        server.drain(0)
        store.close()
