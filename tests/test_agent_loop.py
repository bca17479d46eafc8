"""The agent loop against a hand-written fake daemon on a real gRPC server (127.0.0.1, port 0),
driven one `tick()` at a time with a fake clock: registration, assignments, status reports,
log shipping, stops, re-registration and the retrying outbox.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from gpuctl.agent.logship import LogShipper
from gpuctl.agent.loop import AgentLoop, NodeIdentity, key_from_pb
from gpuctl.agent.probe import FakeProbe, NodeFacts
from gpuctl.agent.runner import AccountPolicy, RankKey, Runner
from gpuctl.agent.shim import LEASE_FILE
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import jobs_pb2, nodes_pb2
from gpuctl.api.convert import duration, rank_ref
from gpuctl.core.model import BandwidthProfile, NetKind, Network

HEARTBEAT_S = 10.0
KEY = RankKey(job_id=7, rank=0, attempt=1)
RUNNING, EXITED = jobs_pb2.RANK_STATE_RUNNING, jobs_pb2.RANK_STATE_EXITED
IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)
# Ranks run as the tests' own account, root included: their commands are this interpreter.
AS_ME = AccountPolicy(fallback_user=pwd.getpwuid(os.geteuid()).pw_name, allow_root=True)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.t)

    def sleep(self, seconds: float) -> None:
        self.t += seconds

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeNotifier:
    def __init__(self, watchdog_interval: float | None = None) -> None:
        self.watchdog_interval = watchdog_interval
        self.sent: list[str] = []
        self.statuses: list[str] = []  # STATUS= lines, which `sent` leaves out

    def ready(self, status: str = "") -> bool:
        self.sent.append("READY=1")
        self.statuses.append(status)
        return True

    def status(self, text: str) -> bool:
        self.statuses.append(text)
        return True

    def watchdog(self) -> bool:
        self.sent.append("WATCHDOG=1")
        return True

    def stopping(self) -> bool:
        self.sent.append("STOPPING=1")
        return True


class FixedHost:
    def probe(self) -> NodeFacts:
        return NodeFacts(
            hostname="host-1",
            cpu_milli=192_000,
            memory_mib=2_048_000,
            profile=BandwidthProfile(
                network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400)
            ),
        )


@dataclass
class Call:
    method: str
    request: object


class FakeDaemon(agent_pb2_grpc.AgentServiceServicer):
    """Plays gpuctld's agent API: records what it accepted, answers from what the test set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Call] = []  # accepted calls, in arrival order
        self.attempts: Counter[str] = Counter()  # every call, failed ones too
        self.assignments: list[agent_pb2.Assignment] = []  # answered on every heartbeat
        self.stop: list[agent_pb2.RankRef] = []
        self.reregister_once = False
        self.failures: dict[str, list[grpc.StatusCode]] = {}  # method -> codes to fail with
        self.logs: dict[RankKey, bytearray] = {}
        self.take_logs = True  # False: accept pushes but keep nothing (a stalled log store)
        self.hang = False  # every call hangs until `release` is set (a hung daemon)
        self.heartbeat_timeout = 0.0  # told to the agent at registration; 0: not told
        self.release = threading.Event()

    def fail(self, method: str, *codes: grpc.StatusCode) -> None:
        self.failures.setdefault(method, []).extend(codes)

    def _accept(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.attempts[method] += 1
        if self.hang:
            self.release.wait(10)
            context.abort(grpc.StatusCode.UNAVAILABLE, "hung")
        with self.lock:
            codes = self.failures.get(method)
            code = codes.pop(0) if codes else None
            if code is None:
                self.calls.append(Call(method, request))
        if code is not None:
            context.abort(code, f"injected {code.name}")

    def RegisterNode(self, request, context):
        self._accept("RegisterNode", request, context)
        return agent_pb2.RegisterNodeResponse(
            node_name=request.node.name,
            heartbeat_interval=duration(HEARTBEAT_S),
            heartbeat_timeout=duration(self.heartbeat_timeout),
        )

    def Heartbeat(self, request, context):
        self._accept("Heartbeat", request, context)
        if self.reregister_once:
            self.reregister_once = False
            return agent_pb2.HeartbeatResponse(reregister=True)
        return agent_pb2.HeartbeatResponse(assignments=self.assignments, stop=self.stop)

    def ReportRankStatus(self, request, context):
        self._accept("ReportRankStatus", request, context)
        return agent_pb2.ReportRankStatusResponse()

    def PushLogs(self, request, context):
        self._accept("PushLogs", request, context)
        with self.lock:
            log = self.logs.setdefault(key_from_pb(request.ref), bytearray())
            if request.offset == len(log) and self.take_logs:
                log.extend(request.data)
            return agent_pb2.PushLogsResponse(next_offset=len(log))

    # -- what the tests look at

    def requests(self, method: str) -> list:
        with self.lock:
            return [c.request for c in self.calls if c.method == method]

    def reports(self, key: RankKey = KEY) -> list[tuple[int, int | None, str]]:
        return [
            (r.state, r.exit_code if r.HasField("exit_code") else None, r.message)
            for r in self.requests("ReportRankStatus")
            if key_from_pb(r.ref) == key
        ]


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    fake.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    server.start()
    yield fake
    fake.release.set()
    server.stop(grace=None)


@dataclass
class Agent:
    loop: AgentLoop
    runner: Runner
    clock: FakeClock
    notifier: FakeNotifier

    def until(self, condition: Callable[[], object], timeout: float = 10.0) -> None:
        """Tick until `condition` holds: waits for real processes, never advances time."""
        deadline = time.monotonic() + timeout
        while True:
            self.loop.tick()
            if condition():
                return
            if time.monotonic() > deadline:
                raise AssertionError("timed out")
            time.sleep(0.01)

    def heartbeat(self) -> None:
        self.clock.advance(HEARTBEAT_S)
        self.loop.tick()

    def wait_log(self, needle: bytes, key: RankKey = KEY) -> None:
        """Wait until the rank wrote `needle`, e.g. that its signal handlers are in place."""
        path = self.runner.log_path(key)
        self.until(lambda: path.exists() and needle in path.read_bytes())


@contextlib.contextmanager
def make_agent(daemon: FakeDaemon, tmp_path: Path, **kw: object) -> Iterator[Agent]:
    clock = FakeClock()
    notifier = FakeNotifier(kw.pop("watchdog_interval", None))  # type: ignore[arg-type]
    crash = kw.pop("crash", False)  # leave the ranks running, as an agent that died would
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")  # type: ignore[attr-defined]
    runner = Runner(
        tmp_path / "state",
        base_env={"PATH": "/usr/bin:/bin"},
        clock=clock.monotonic,
        accounts=AS_ME,
    )
    loop = AgentLoop(
        agent_pb2_grpc.AgentServiceStub(channel),
        runner,
        FakeProbe("h100-sxm:8", node_name="n1", host=FixedHost()),
        NodeIdentity(
            name="n1",
            address="10.0.0.1",
            fabric="ib-a/spine-1/leaf-1",
            sku="p5.48xlarge",
            price_per_hour=98.32,
            labels=(("zone", "a"),),
        ),
        clock=clock,
        notifier=notifier,
        jitter=lambda: 1.0,  # no randomness: the backoff is exactly 0.5, 1, 2, ... s
        **kw,  # type: ignore[arg-type]
    )
    yield Agent(loop, runner, clock, notifier)
    if not crash:
        runner.reap(timeout_s=5)
    channel.close()


@pytest.fixture
def agent(daemon: FakeDaemon, tmp_path: Path) -> Iterator[Agent]:
    with make_agent(daemon, tmp_path) as a:
        yield a


def assignment(
    *command: str, key: RankKey = KEY, grace: float = 30.0, **env: str
) -> agent_pb2.Assignment:
    return agent_pb2.Assignment(
        ref=rank_ref(key.job_id, key.rank, key.attempt),
        job_name=f"jobs/{key.job_id}",
        command=command,
        env=env,
        kill_grace=duration(grace),
    )


def running_refs(request: agent_pb2.HeartbeatRequest) -> list[RankKey]:
    return [key_from_pb(r) for r in request.running]


# -- registration ---------------------------------------------------------------------------


def test_registers_with_the_profile_then_heartbeats(agent: Agent, daemon: FakeDaemon) -> None:
    agent.loop.tick()
    [register] = daemon.requests("RegisterNode")
    node = register.node
    assert (node.name, node.address, node.fabric) == ("n1", "10.0.0.1", "ib-a/spine-1/leaf-1")
    assert (node.sku, node.price_per_hour, dict(node.labels)) == (
        "p5.48xlarge",
        98.32,
        {"zone": "a"},
    )
    assert (node.cpu_milli, node.memory_mib) == (192_000, 2_048_000)
    p = node.profile
    assert len(p.gpus) == 8 and p.gpus[0].model == "H100 SXM" and p.gpus[0].hbm_gbps == 3350
    assert p.gpus[7].uuid == "GPU-fake-n1-7"
    assert (p.nvlink_domain_size, p.source) == (8, "fake")
    assert (p.network.kind, p.network.ports, p.network.gbps_per_port) == (
        nodes_pb2.NET_KIND_INFINIBAND,
        8,
        400,
    )
    assert [h.node_name for h in daemon.requests("Heartbeat")] == ["n1"]
    assert agent.loop.registered and agent.notifier.sent == ["READY=1"]

    agent.loop.tick()  # not due yet
    assert len(daemon.requests("Heartbeat")) == 1
    agent.heartbeat()
    assert len(daemon.requests("Heartbeat")) == 2
    assert len(daemon.requests("RegisterNode")) == 1
    assert agent.notifier.sent == ["READY=1"]


def test_registration_retries_with_capped_exponential_backoff(
    agent: Agent, daemon: FakeDaemon
) -> None:
    daemon.fail("RegisterNode", *[grpc.StatusCode.UNAVAILABLE] * 9)
    agent.loop.tick()
    # 0.5 s doubling per failure, capped at 30 s; the 10th attempt succeeds
    for attempt, gap in enumerate([0.5, 1, 2, 4, 8, 16, 30, 30, 30], start=2):
        agent.clock.advance(gap - 0.01)
        agent.loop.tick()  # not due yet
        assert daemon.attempts["RegisterNode"] == attempt - 1
        assert not agent.loop.registered and agent.notifier.sent == ["READY=1"]
        assert agent.notifier.statuses == ["registering with gpuctld"]
        agent.clock.advance(0.01)
        agent.loop.tick()
        assert daemon.attempts["RegisterNode"] == attempt
    assert agent.loop.registered
    assert agent.notifier.sent == ["READY=1"]
    assert agent.notifier.statuses == ["registering with gpuctld", "registered as n1"]
    assert len(daemon.requests("Heartbeat")) == 1


def test_registration_against_no_daemon_at_all(tmp_path: Path) -> None:
    # A port nothing listens on: the call fails fast with UNAVAILABLE and the agent retries.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = FakeDaemon()
    nobody.port = port  # type: ignore[attr-defined]
    with make_agent(nobody, tmp_path, rpc_timeout_s=2.0) as agent:
        agent.loop.tick()
        assert not agent.loop.registered
        # Ready all the same (systemd would otherwise restart it in a loop while gpuctld is
        # down), saying what it waits for.
        assert agent.notifier.sent == ["READY=1"]
        assert agent.notifier.statuses == ["registering with gpuctld"]


# -- running ranks --------------------------------------------------------------------------


def test_assignment_runs_and_reports_running_then_exited_once(
    agent: Agent, daemon: FakeDaemon
) -> None:
    script = (
        "import os; print('hello from', os.environ['CUDA_VISIBLE_DEVICES']); raise SystemExit(3)"
    )
    daemon.assignments = [assignment(sys.executable, "-c", script, CUDA_VISIBLE_DEVICES="0,1")]
    agent.loop.tick()
    assert daemon.reports() == [(RUNNING, None, "")]
    agent.until(lambda: len(daemon.reports()) == 2)
    assert daemon.reports() == [(RUNNING, None, ""), (EXITED, 3, "exited with code 3")]
    assert bytes(daemon.logs[KEY]) == b"hello from 0,1\n"

    # The daemon keeps answering with the assignment: it is not started again.
    for _ in range(3):
        agent.heartbeat()
    assert daemon.reports() == [(RUNNING, None, ""), (EXITED, 3, "exited with code 3")]
    assert agent.runner.running() == ()
    assert running_refs(daemon.requests("Heartbeat")[-1]) == []


def test_logs_are_complete_before_exited(agent: Agent, daemon: FakeDaemon) -> None:
    # 2.5 MiB of output: three pushes of at most 1 MiB, all before the EXITED report.
    script = "import sys; sys.stdout.write('x' * (5 * 2**19)); sys.stdout.write('end\\n')"
    daemon.assignments = [assignment(sys.executable, "-c", script)]
    agent.until(lambda: len(daemon.reports()) == 2)
    order = [c.method for c in daemon.calls if c.method in ("PushLogs", "ReportRankStatus")]
    assert order[-1] == "ReportRankStatus"
    pushes = daemon.requests("PushLogs")
    assert all(len(p.data) <= 2**20 for p in pushes)
    assert len(daemon.logs[KEY]) == 5 * 2**19 + 4
    assert agent.runner.log_path(KEY).read_bytes() == bytes(daemon.logs[KEY])


def test_running_rank_is_in_every_heartbeat_until_its_exit_is_reported(
    agent: Agent, daemon: FakeDaemon
) -> None:
    daemon.assignments = [assignment("sleep", "60")]
    agent.loop.tick()
    agent.heartbeat()
    assert running_refs(daemon.requests("Heartbeat")[-1]) == [KEY]
    daemon.fail("ReportRankStatus", *[grpc.StatusCode.UNAVAILABLE] * 100)
    agent.runner.stop(KEY, grace_s=30)
    agent.until(lambda: KEY not in agent.runner.running())
    agent.heartbeat()  # exited, but the daemon has not heard: still counted as running here
    assert running_refs(daemon.requests("Heartbeat")[-1]) == [KEY]
    daemon.failures.clear()
    agent.loop.tick()
    agent.heartbeat()
    assert running_refs(daemon.requests("Heartbeat")[-1]) == []
    assert daemon.reports()[-1][:2] == (EXITED, -signal.SIGTERM)


def test_missing_command_is_reported_as_exit_127(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.assignments = [assignment("gpuctl-no-such-command-x", "--flag")]
    agent.loop.tick()
    assert daemon.reports() == [(EXITED, 127, "command not found: gpuctl-no-such-command-x")]
    assert bytes(daemon.logs[KEY]) == b"gpuctl-agent: command not found: gpuctl-no-such-command-x\n"


def test_stop_sends_sigterm_then_sigkill_after_the_assignment_grace(
    agent: Agent, daemon: FakeDaemon
) -> None:
    daemon.assignments = [assignment(sys.executable, "-c", IGNORE_TERM, grace=0.2)]
    agent.wait_log(b"ready")
    daemon.stop = [rank_ref(KEY.job_id, KEY.rank, KEY.attempt)]
    agent.heartbeat()
    assert KEY in agent.runner.running()  # ignores SIGTERM; the grace has not run out
    agent.clock.advance(0.2)
    agent.until(lambda: len(daemon.reports()) == 2)
    assert daemon.reports()[1] == (
        EXITED,
        -signal.SIGKILL,
        "killed by SIGKILL after the 0.2s stop grace",
    )


def test_assignment_and_stop_in_one_answer_is_not_started(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.assignments = [assignment("sleep", "60")]
    daemon.stop = [rank_ref(KEY.job_id, KEY.rank, KEY.attempt)]
    agent.loop.tick()
    assert agent.runner.running() == ()
    assert daemon.reports() == []


def test_a_restarted_agent_adopts_its_rank_and_reports_the_exit_once(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    script = (
        "import os, time; print('ready', flush=True)\n"
        "while not os.path.exists('go'): time.sleep(0.01)\n"
        "print('bye'); raise SystemExit(3)"
    )
    a = assignment(sys.executable, "-c", script)
    a.working_dir = str(workdir)
    daemon.assignments = [a]
    with make_agent(daemon, tmp_path, crash=True) as first:
        first.wait_log(b"ready")
    # The first agent died; the daemon still assigns the rank on every heartbeat.
    with make_agent(daemon, tmp_path) as second:
        second.loop.tick()
        register = daemon.requests("RegisterNode")[-1]
        assert [key_from_pb(r) for r in register.running] == [KEY]
        assert second.runner.running() == (KEY,)  # adopted, not started a second time
        assert running_refs(daemon.requests("Heartbeat")[-1]) == [KEY]
        (workdir / "go").touch()
        second.until(lambda: daemon.reports()[-1][0] == EXITED)
        # RUNNING again from the adopter (the daemon ignores a repeat), EXITED once
        assert daemon.reports() == [
            (RUNNING, None, ""),
            (RUNNING, None, ""),
            (EXITED, 3, "exited with code 3"),
        ]
        assert bytes(daemon.logs[KEY]) == b"ready\nbye\n"
    with make_agent(daemon, tmp_path) as third:
        third.loop.tick()
        third.heartbeat()
        assert third.runner.running() == ()
        assert len(daemon.reports()) == 3


def test_an_exit_while_the_agent_was_down_is_reported_by_the_next(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    go = tmp_path / "state" / "work" / "7" / "1" / "rank-0" / "go"
    script = "import os, time\nwhile not os.path.exists('go'): time.sleep(0.01)\nprint('bye')"
    daemon.assignments = [assignment(sys.executable, "-c", script)]
    with make_agent(daemon, tmp_path, crash=True) as first:
        first.loop.tick()
        assert daemon.reports() == [(RUNNING, None, "")]
    go.touch()
    exit_file = tmp_path / "state" / "ranks" / "7.0.1" / "exit"
    deadline = time.monotonic() + 10
    while not exit_file.exists():
        assert time.monotonic() < deadline, "the rank did not exit"
        time.sleep(0.01)
    with make_agent(daemon, tmp_path) as second:
        second.loop.tick()
        register = daemon.requests("RegisterNode")[-1]
        # exited, but until the daemon heard so, it counts as running here
        assert [key_from_pb(r) for r in register.running] == [KEY]
        assert daemon.reports() == [(RUNNING, None, ""), (EXITED, 0, "exited with code 0")]
        assert bytes(daemon.logs[KEY]) == b"bye\n"
        assert second.runner.running() == ()


# -- the daemon forgets, fails or hangs -----------------------------------------------------


def test_reregister_when_asked_reports_running_ranks(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.assignments = [assignment("sleep", "60")]
    agent.loop.tick()
    daemon.reregister_once = True
    agent.heartbeat()
    first, again = daemon.requests("RegisterNode")
    assert [key_from_pb(r) for r in first.running] == []
    assert [key_from_pb(r) for r in again.running] == [KEY]
    assert agent.loop.registered
    assert agent.notifier.sent == ["READY=1"]  # READY only once
    assert len(daemon.reports()) == 1  # still one RUNNING: the rank was not restarted


def test_heartbeat_not_found_reregisters(agent: Agent, daemon: FakeDaemon) -> None:
    agent.loop.tick()
    daemon.fail("Heartbeat", grpc.StatusCode.NOT_FOUND)
    agent.heartbeat()
    assert len(daemon.requests("RegisterNode")) == 2


def test_outbox_retries_a_failed_report(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.fail("ReportRankStatus", grpc.StatusCode.UNAVAILABLE)
    daemon.assignments = [assignment("sh", "-c", "exit 5")]
    agent.loop.tick()
    assert daemon.reports() == []
    assert agent.loop.pending_reports() >= 1
    agent.until(lambda: len(daemon.reports()) == 2)
    assert daemon.reports() == [(RUNNING, None, ""), (EXITED, 5, "exited with code 5")]
    assert agent.loop.pending_reports() == 0
    agent.heartbeat()
    assert len(daemon.reports()) == 2


def test_rejected_report_is_dropped(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.fail("ReportRankStatus", grpc.StatusCode.FAILED_PRECONDITION)
    daemon.assignments = [assignment("sh", "-c", "exit 0")]
    agent.until(lambda: agent.loop.pending_reports() == 0 and daemon.reports())
    assert daemon.reports() == [(EXITED, 0, "exited with code 0")]


def test_failed_log_push_holds_the_exit_report(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.fail("PushLogs", *[grpc.StatusCode.RESOURCE_EXHAUSTED] * 1000)
    daemon.assignments = [assignment("sh", "-c", "echo done")]
    agent.until(lambda: KEY not in agent.runner.running())
    agent.loop.tick()
    assert daemon.reports() == [(RUNNING, None, "")]
    daemon.failures.clear()
    agent.loop.tick()
    assert daemon.reports()[-1] == (EXITED, 0, "exited with code 0")
    assert bytes(daemon.logs[KEY]) == b"done\n"


def test_a_log_the_daemon_will_not_take_does_not_hold_the_exit_forever(
    agent: Agent, daemon: FakeDaemon
) -> None:
    daemon.take_logs = False
    daemon.assignments = [assignment("sh", "-c", "echo lost; exit 2")]
    agent.until(lambda: len(daemon.reports()) == 2)
    # at least MAX_LOG_STALLS pushes that the daemon accepted without advancing, then the exit
    assert daemon.attempts["PushLogs"] >= 3
    assert daemon.reports()[-1] == (EXITED, 2, "exited with code 2")
    assert bytes(daemon.logs[KEY]) == b""


def test_a_refused_log_is_not_retried(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.fail("PushLogs", grpc.StatusCode.NOT_FOUND)
    daemon.assignments = [assignment("sh", "-c", "echo x; exit 1")]
    agent.until(lambda: len(daemon.reports()) == 2)
    assert daemon.reports()[-1] == (EXITED, 1, "exited with code 1")
    assert daemon.attempts["PushLogs"] == 1


def test_a_hung_daemon_costs_one_deadline_per_tick(daemon: FakeDaemon, tmp_path: Path) -> None:
    with make_agent(daemon, tmp_path, rpc_timeout_s=0.2) as agent:
        daemon.assignments = [assignment("sh", "-c", "echo hi; exit 4")]
        daemon.fail("PushLogs", *[grpc.StatusCode.UNAVAILABLE] * 1000)
        agent.until(lambda: not agent.runner.running())  # exited: its log and report are due
        daemon.failures.clear()
        daemon.hang = True
        calls = sum(daemon.attempts.values())
        agent.heartbeat()  # the heartbeat times out; the log push and report wait
        assert sum(daemon.attempts.values()) == calls + 1
        assert agent.loop.registered  # a slow daemon is not a reason to re-register
        assert agent.loop.held() == (KEY,)
        daemon.hang = False
        daemon.release.set()
        agent.loop.tick()
        assert daemon.reports()[-1] == (EXITED, 4, "exited with code 4")


# -- systemd and shutdown -------------------------------------------------------------------


def test_watchdog_pings_at_its_interval(daemon: FakeDaemon, tmp_path: Path) -> None:
    with make_agent(daemon, tmp_path, watchdog_interval=15.0) as agent:
        agent.loop.tick()
        assert agent.notifier.sent == ["READY=1", "WATCHDOG=1"]
        agent.heartbeat()  # 10 s later: not yet
        assert agent.notifier.sent.count("WATCHDOG=1") == 1
        agent.heartbeat()
        assert agent.notifier.sent.count("WATCHDOG=1") == 2


def test_shutdown_stops_ranks_and_reports_them(agent: Agent, daemon: FakeDaemon) -> None:
    daemon.assignments = [assignment(sys.executable, "-c", IGNORE_TERM, grace=0.2)]
    agent.wait_log(b"ready")
    agent.loop.shutdown()
    assert agent.runner.running() == ()
    assert daemon.reports()[-1][:2] == (EXITED, -signal.SIGKILL)
    assert agent.notifier.sent[-1] == "STOPPING=1"


def test_run_stops_when_the_event_is_set(agent: Agent, daemon: FakeDaemon) -> None:
    stop = threading.Event()
    stop.set()
    agent.loop.run(stop)  # returns at once, without a tick
    assert daemon.requests("RegisterNode") == []


# -- log shipping, without gRPC -------------------------------------------------------------


class Sink:
    """A daemon's log store for one rank; `lose_first` drops that many pushes silently."""

    def __init__(self, lose_first: int = 0) -> None:
        self.data = bytearray()
        self.pushes: list[tuple[int, int]] = []
        self.lose_first = lose_first

    def push(self, key: RankKey, offset: int, data: bytes) -> int:
        self.pushes.append((offset, len(data)))
        if self.lose_first:
            self.lose_first -= 1
            return len(self.data)
        if offset == len(self.data):
            self.data.extend(data)
        return len(self.data)


def test_log_shipper_chunks_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.log"
    path.write_bytes(b"a" * 25)
    sink = Sink()
    shipper = LogShipper(sink.push, chunk_bytes=10, chunks_per_ship=2)
    assert not shipper.ship(KEY, path)  # two chunks per call
    assert sink.pushes == [(0, 10), (10, 10)]
    assert shipper.ship(KEY, path)
    assert sink.pushes[-1] == (20, 5) and bytes(sink.data) == b"a" * 25
    with path.open("ab") as f:
        f.write(b"b" * 3)
    assert shipper.ship(KEY, path)
    assert sink.pushes[-1] == (25, 3)
    assert shipper.ship(KEY, path) and len(sink.pushes) == 4  # nothing new: no push


def test_log_shipper_resends_from_the_daemons_offset(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.log"
    path.write_bytes(b"0123456789")
    sink = Sink()
    shipper = LogShipper(sink.push, chunk_bytes=4)
    sink.data.extend(b"0123")  # the daemon already has a prefix (say, from before a restart)
    assert shipper.ship(KEY, path)
    assert sink.pushes[0] == (0, 4)  # it answers 4, and the agent continues from there
    assert bytes(sink.data) == b"0123456789"


def test_log_shipper_counts_stalls(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.log"
    path.write_bytes(b"xyz")
    sink = Sink(lose_first=2)
    shipper = LogShipper(sink.push)
    assert not shipper.ship(KEY, path) and shipper.stalls(KEY) == 1
    assert not shipper.ship(KEY, path) and shipper.stalls(KEY) == 2
    assert shipper.ship(KEY, path) and shipper.stalls(KEY) == 0


def test_log_shipper_without_a_file(tmp_path: Path) -> None:
    assert LogShipper(Sink().push).ship(KEY, tmp_path / "never-written.log")


def test_an_agent_cut_off_from_the_daemon_stops_its_ranks_before_they_run_elsewhere(
    agent: Agent, daemon: FakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    # The daemon calls a node lost after 30 s without a heartbeat; heartbeats every 10 s, so
    # the agent stops its ranks after 30 - 10 = 20 s without an answer: a leader failover
    # (about 5 s) stops nothing.
    daemon.heartbeat_timeout = 30.0
    daemon.assignments = [assignment(sys.executable, "-c", "import time; time.sleep(60)")]
    agent.until(lambda: KEY in agent.runner.running())
    daemon.assignments = []
    daemon.fail("Heartbeat", *[grpc.StatusCode.UNAVAILABLE] * 100)
    daemon.fail("ReportRankStatus", *[grpc.StatusCode.UNAVAILABLE] * 100)
    agent.clock.advance(20.0)
    agent.loop.tick()  # the heartbeat fails; the next try is due in 0.5 s
    assert "no word from gpuctld" not in caplog.text  # 20 s of silence: not yet
    agent.clock.advance(0.5)
    agent.loop.tick()  # 20.5 s: the retried heartbeat fails too
    assert "(it calls a node lost after 30s): stopping 1 rank(s)" in caplog.text
    agent.until(lambda: KEY not in agent.runner.running())
    daemon.failures.clear()  # the daemon is back: it hears how the rank ended
    agent.heartbeat()
    agent.until(lambda: any(r[0] == EXITED for r in daemon.reports()))
    assert [r[:2] for r in daemon.reports()][-1] == (EXITED, -signal.SIGTERM)


def test_the_fence_is_never_sooner_than_one_heartbeat(
    agent: Agent, daemon: FakeDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    # A timeout of 15 s with heartbeats every 10 s: 15 - 10 = 5 s would be shorter than a
    # heartbeat, so the agent waits one heartbeat, 10 s.
    daemon.heartbeat_timeout = 15.0
    daemon.assignments = [assignment(sys.executable, "-c", "import time; time.sleep(60)")]
    agent.until(lambda: KEY in agent.runner.running())
    daemon.assignments = []
    daemon.fail("Heartbeat", *[grpc.StatusCode.UNAVAILABLE] * 100)
    agent.clock.advance(10.0)
    agent.loop.tick()
    assert "no word from gpuctld" not in caplog.text
    agent.clock.advance(0.5)
    agent.loop.tick()
    assert "(it calls a node lost after 15s): stopping 1 rank(s)" in caplog.text
    agent.until(lambda: KEY not in agent.runner.running())


def test_each_word_from_the_daemon_renews_the_lease_the_ranks_supervisors_hold_to(
    agent: Agent, daemon: FakeDaemon, tmp_path: Path
) -> None:
    # Timeout 30 s, heartbeats every 10 s: the supervisors SIGTERM their ranks 20 s after the
    # last renewal and SIGKILL them at 25 s, even with the agent dead (runner and shim tests).
    daemon.heartbeat_timeout = 30.0
    lease_file = tmp_path / "state" / LEASE_FILE

    def lease() -> tuple[float, float]:
        data = json.loads(lease_file.read_text())
        return data["stop_at"] - time.monotonic(), data["kill_at"] - time.monotonic()

    agent.loop.tick()  # registers (and heartbeats)
    stop_in, kill_in = lease()
    assert 19.0 < stop_in <= 20.0 and 24.0 < kill_in <= 25.0
    written = lease_file.read_text()
    daemon.fail("Heartbeat", grpc.StatusCode.UNAVAILABLE)
    agent.heartbeat()  # no answer: no renewal
    assert lease_file.read_text() == written
    agent.clock.advance(0.5)
    agent.loop.tick()  # the retry is answered
    assert lease_file.read_text() != written


@pytest.mark.parametrize(
    ("code", "gaps"),
    [
        # no daemon answered: 0.5 s doubling per failure, capped at the 10 s interval
        (grpc.StatusCode.UNAVAILABLE, [0.5, 1, 2, 4, 8, 10, 10]),
        (grpc.StatusCode.DEADLINE_EXCEEDED, [0.5, 1, 2, 4, 8, 10, 10]),
        # the daemon answered: the next heartbeat comes at the interval
        (grpc.StatusCode.INTERNAL, [10, 10, 10]),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_a_heartbeat_no_daemon_answered_is_retried_sooner(
    agent: Agent, daemon: FakeDaemon, code: grpc.StatusCode, gaps: list[float]
) -> None:
    agent.loop.tick()  # registers and heartbeats
    daemon.fail("Heartbeat", *[code] * len(gaps))
    agent.heartbeat()  # the 2nd heartbeat fails, and the next ones but the last
    for attempt, gap in enumerate(gaps, start=3):
        agent.clock.advance(gap - 0.25)
        agent.loop.tick()  # not due yet
        assert daemon.attempts["Heartbeat"] == attempt - 1
        agent.clock.advance(0.25)
        agent.loop.tick()
        assert daemon.attempts["Heartbeat"] == attempt
    assert len(daemon.requests("Heartbeat")) == 2  # the first and the last
    # answered: back to the interval, and a later failure starts again from 0.5 s
    daemon.fail("Heartbeat", code)
    agent.heartbeat()
    assert daemon.attempts["Heartbeat"] == len(gaps) + 3
    agent.clock.advance(0.5)
    agent.loop.tick()
    expected = len(gaps) + 4 if code is not grpc.StatusCode.INTERNAL else len(gaps) + 3
    assert daemon.attempts["Heartbeat"] == expected
