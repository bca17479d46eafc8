"""The agent loop: register, heartbeat, start and stop the assigned ranks, report their status
and ship their logs. `tick()` does one round with no sleeping, so tests drive it step by step;
`run()` repeats it until told to stop; then `shutdown()` stops the ranks and reports them, or
`detach()` leaves them running for the next agent to adopt.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import grpc

from gpuctl.agent.health import (
    DEFAULT_HEALTH_INTERVAL_S,
    DEFAULT_MIN_BANDWIDTH_FRACTION,
    check_health,
)
from gpuctl.agent.logship import LogShipper
from gpuctl.agent.probe import NodeFacts, Probe
from gpuctl.agent.readiness import Readiness
from gpuctl.agent.runner import DEFAULT_KILL_GRACE_S, Launch, RankExit, RankKey, Runner
from gpuctl.api._pb.agent.v1 import agent_pb2, agent_pb2_grpc
from gpuctl.api._pb.v1 import jobs_pb2
from gpuctl.api.convert import node_to_pb, profile_to_pb, rank_ref, ts
from gpuctl.core.model import BandwidthProfile, Node

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0
DEFAULT_HEARTBEAT_S = 5.0  # used only if the daemon's answer carries no interval
POLL_INTERVAL_S = 0.5  # how soon an exit is noticed (and reported) between heartbeats
REGISTER_BACKOFF_S = 0.5  # first retry; doubles per failure ...
REGISTER_BACKOFF_CAP_S = 30.0  # ... up to this, so a restarted daemon is found within 30 s
# A heartbeat that found no daemon (down, hung, a standby) is retried this soon, doubling per
# failure up to the heartbeat interval: an agent reaches a new leader within about a second
# of its takeover, well inside the full timeout the new leader gives every node.
HEARTBEAT_RETRY_S = 0.5
LEASE_RENEW_S = 1.0  # the ranks' lease (`Runner.lease`) is written at most this often
_MAX_DOUBLINGS = 20  # past every cap above
MAX_LOG_STALLS = 3  # ticks the daemon may refuse to take a finished rank's log before we report
SHUTDOWN_ROUNDS = 3  # tries to deliver the last logs and reports before the agent exits

# A report the daemon answers with these can never succeed: dropped, so the outbox moves on.
# Everything else (UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND while it re-learns this node...)
# is retried on the next tick.
_REJECTED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,  # a rank that is not this node's (any more)
    }
)
# A log push answered with these will not get better by retrying: report the exit without it.
_LOGS_REFUSED = _REJECTED | {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}
# After one of these the rest of the tick's calls are skipped: against a hung daemon every call
# would wait out its deadline, and a tick of many such waits would starve the watchdog.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Notifier(Protocol):
    """What the loop tells the service manager; `gpuctl.runtime.sdnotify.Notifier` is one."""

    @property
    def watchdog_interval(self) -> float | None: ...

    def ready(self, status: str = "") -> bool: ...

    def watchdog(self) -> bool: ...

    def stopping(self) -> bool: ...

    def status(self, text: str) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentStatus:
    """What the agent's metrics show, as of the end of the last tick (read by another
    thread: the loop replaces it whole, never changes it)."""

    registered: bool = False
    ranks: int = 0  # held: running, or exited and not yet reported
    reports_pending: int = 0
    silent_s: float | None = None  # since gpuctld last answered; None: never
    fenced: bool = False
    health_issues: int = 0
    heartbeats_ok: int = 0
    heartbeats_failed: int = 0
    profile: BandwidthProfile | None = None  # as last measured


class HeartbeatObserver(Protocol):
    def heartbeat(self, ok: bool, seconds: float) -> None:
        """A heartbeat was answered (ok) or failed after `seconds`."""


class JobMap(Protocol):
    def update(self, jobs_by_gpu: dict[int, set[int]]) -> None:
        """The jobs each GPU of this node holds now (DCGM's job mapping)."""


class _NoNotifier:
    watchdog_interval = None

    def ready(self, status: str = "") -> bool:
        return False

    def status(self, text: str) -> bool:
        return False

    def watchdog(self) -> bool:
        return False

    def stopping(self) -> bool:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeIdentity:
    """What the operator says about the node (flags, config); the probe says what it has."""

    name: str
    address: str
    fabric: str = ""
    sku: str = ""
    price_per_hour: float = 0.0
    labels: tuple[tuple[str, str], ...] = ()


def build_node(identity: NodeIdentity, facts: NodeFacts) -> Node:
    return Node(
        id=identity.name,
        address=identity.address,
        fabric=identity.fabric,
        sku=identity.sku,
        price_per_hour=identity.price_per_hour,
        labels=identity.labels,
        cpu_milli=facts.cpu_milli,
        memory_mib=facts.memory_mib,
        profile=facts.profile,
    )


def launch_from_pb(a: agent_pb2.Assignment) -> Launch:
    return Launch(
        key=key_from_pb(a.ref),
        command=tuple(a.command),
        env=tuple(sorted(a.env.items())),
        working_dir=a.working_dir,
        kill_grace_s=(
            a.kill_grace.ToTimedelta().total_seconds()
            if a.HasField("kill_grace")
            else DEFAULT_KILL_GRACE_S
        ),
        owner=a.owner,
        readiness=Readiness.of(a.port, a.readiness_http, a.readiness_tcp),
    )


def key_from_pb(ref: agent_pb2.RankRef) -> RankKey:
    return RankKey(job_id=ref.job_id, rank=ref.rank, attempt=ref.attempt)


def _refs(keys: Iterable[RankKey]) -> list[agent_pb2.RankRef]:
    return [rank_ref(k.job_id, k.rank, k.attempt) for k in sorted(keys)]


class AgentLoop:
    """One node's agent: its registration, its ranks, and what the daemon has yet to hear."""

    def __init__(
        self,
        stub: agent_pb2_grpc.AgentServiceStub,
        runner: Runner,
        probe: Probe,
        identity: NodeIdentity,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        poll_interval_s: float = POLL_INTERVAL_S,
        jitter: Callable[[], float] = random.random,
        health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S,
        min_bandwidth_fraction: float = DEFAULT_MIN_BANDWIDTH_FRACTION,
        observer: HeartbeatObserver | None = None,
        job_map: JobMap | None = None,
    ) -> None:
        self._stub = stub
        self._runner = runner
        self._probe = probe
        self._identity = identity
        self._clock = clock or SystemClock()
        self._notifier = notifier or _NoNotifier()
        self._rpc_timeout = rpc_timeout_s
        self._poll_interval = poll_interval_s
        self._jitter = jitter
        self._logs = LogShipper(self._push_logs)

        self._node_name = identity.name
        self._registered = False
        self._register_failures = 0
        self._next_register = 0.0  # monotonic
        self._heartbeat_s = DEFAULT_HEARTBEAT_S
        self._next_heartbeat = 0.0
        self._heartbeat_failures = 0  # in a row, against an unreachable daemon
        self._last_watchdog: float | None = None
        self._unreachable = False  # an RPC of this round found the daemon down or hung
        self._down_since: float | None = None  # monotonic start of a run of such failures
        self._last_word: float | None = None  # monotonic: the daemon's last answer
        self._fence_after: float | None = None  # no answer this long: stop every rank
        self._lost_after = 0.0  # the daemon's heartbeat timeout: then it calls the node lost
        self._fenced = False
        self._leased_at: float | None = None  # monotonic: the ranks' lease last renewed

        self._seen: set[RankKey] = set()  # every rank ever started: assignments are re-sent
        self._ready: set[RankKey] = set()  # running, and their readiness probe passed
        self._probes: dict[RankKey, Readiness | None] = {}  # each running rank's, read once
        self._exited: dict[RankKey, RankExit] = {}  # exited, log not yet all shipped
        self._logs_refused: set[RankKey] = set()  # the daemon will not take these logs
        self._outbox: deque[agent_pb2.ReportRankStatusRequest] = deque()
        self._recovered = False  # the previous agent run's ranks were looked for

        self._health_interval = health_interval_s  # 0: re-profile at job boundaries only
        self._min_bandwidth_fraction = min_bandwidth_fraction
        self._baseline: BandwidthProfile | None = None  # the first probe: what "healthy" means
        self._next_health = 0.0  # monotonic
        self._health_due = False  # a rank exited: re-profile at the next tick
        self._health_issues: tuple[str, ...] = ()
        self._profile_unsent: BandwidthProfile | None = None  # re-measured, not yet heartbeated
        self._profile: BandwidthProfile | None = None  # the last measured

        self._observer = observer
        self._job_map = job_map
        self._gpus: dict[RankKey, tuple[int, ...]] = {}  # each assigned rank's GPU indices
        self._heartbeats = [0, 0]  # answered, failed
        self.status = AgentStatus()

    # -- the view tests and main need -----------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def node_name(self) -> str:
        return self._node_name

    def held(self) -> tuple[RankKey, ...]:
        """Ranks the daemon must still count as running here: alive, or exited with the
        EXITED report not yet delivered (until then the daemon has no other word on them)."""
        held = set(self._runner.running()) | set(self._exited)
        held.update(
            key_from_pb(r.ref) for r in self._outbox if r.state == jobs_pb2.RANK_STATE_EXITED
        )
        return tuple(sorted(held))

    def pending_reports(self) -> int:
        return len(self._outbox)

    @property
    def health_issues(self) -> tuple[str, ...]:
        return self._health_issues

    # -- one round ------------------------------------------------------------------------

    def tick(self) -> None:
        """Reap exits, register or heartbeat when due, ship logs, send reports, ping systemd."""
        self._unreachable = False
        if not self._recovered:
            self._recover()
            # Up: its ranks found, its loop running. READY does not wait for gpuctld, which
            # may be down for longer than systemd waits for a start: the agent keeps trying
            # and keeps its ranks meanwhile, and a restart loop would help neither.
            self._notify(lambda: self._notifier.ready("registering with gpuctld"))
        self._collect(self._runner.poll())
        now = self._clock.monotonic()
        if not self._registered and now >= self._next_register:
            self._register()
        self._check_health(now)
        if self._registered and now >= self._next_heartbeat:
            self._heartbeat()
        self._fence(self._clock.monotonic())
        self._ship_running_logs()
        self._finish_exited()
        self._send_outbox()
        self._ping_watchdog()
        self._publish()

    def _publish(self) -> None:
        """The status for metrics, and which jobs hold which GPUs for DCGM's exporter."""
        held = self.held()
        now = self._clock.monotonic()
        self.status = AgentStatus(
            registered=self._registered,
            ranks=len(held),
            reports_pending=len(self._outbox),
            silent_s=None if self._last_word is None else max(0.0, now - self._last_word),
            fenced=self._fenced,
            health_issues=len(self._health_issues),
            heartbeats_ok=self._heartbeats[0],
            heartbeats_failed=self._heartbeats[1],
            profile=self._profile,
        )
        self._gpus = {k: v for k, v in self._gpus.items() if k in held}  # bounded by the ranks
        if self._job_map is not None:
            jobs: dict[int, set[int]] = {}
            for key in held:
                for gpu in self._gpus.get(key, ()):
                    jobs.setdefault(gpu, set()).add(key.job_id)
            self._job_map.update(jobs)

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set, sleeping (interruptibly) until the next thing is due."""
        while not stop.is_set():
            self.tick()
            stop.wait(self._sleep_s())

    def shutdown(self, grace_s: float | None = None) -> None:
        """Stop every rank (SIGTERM, SIGKILL after its grace), then report them and ship the
        rest of their logs, trying a few times before giving up on an absent daemon."""
        self._notify(self._notifier.stopping)
        self._runner.stop_all(grace_s)
        while self._runner.running() and self._runner.next_deadline() is not None:
            self._collect(self._runner.poll())
            if self._runner.running():
                self._clock.sleep(min(0.05, self._poll_interval))
        self._collect(self._runner.poll())
        self._collect(self._runner.reap())
        self._report_before_exit()
        if self._exited or self._outbox:
            log.warning(
                "exiting with %d rank(s) unreported: the agent reports them when it starts again",
                len(self._exited) + len(self._outbox),
            )

    def detach(self) -> None:
        """Exit leaving every running rank to its supervisor (a restart, an upgrade): report
        what has exited and ship what is pending, a few tries at most. The agent that starts
        next adopts the ranks still running and reports them when they exit."""
        self._notify(self._notifier.stopping)
        self._collect(self._runner.poll())
        self._report_before_exit()
        running = len(self._runner.running())
        if running:
            log.info(
                "leaving %d rank(s) running under their supervisors: the agent adopts them "
                "when it starts again",
                running,
            )

    def _report_before_exit(self) -> None:
        """Report the exits and ship the logs pending, a few tries at most: the daemon may be
        gone, and what is left is reported by the agent that starts next."""
        for _ in range(SHUTDOWN_ROUNDS):
            self._unreachable = False
            self._finish_exited()
            self._send_outbox()
            if not self._exited and not self._outbox:
                break

    # -- registration and heartbeat -------------------------------------------------------

    def _register(self) -> None:
        facts = self._probe.probe()
        self._profile = facts.profile
        if self._baseline is None:
            self._baseline = facts.profile
            self._next_health = self._clock.monotonic() + self._health_interval
        node = build_node(self._identity, facts)
        request = agent_pb2.RegisterNodeRequest(node=node_to_pb(node), running=_refs(self.held()))
        try:
            response = self._stub.RegisterNode(request, timeout=self._rpc_timeout)
        except grpc.RpcError as e:
            # The exponent is bounded: a float cannot hold 2**1024 (a daemon gone for hours).
            doubled = 2 ** min(self._register_failures, _MAX_DOUBLINGS)
            delay = min(REGISTER_BACKOFF_CAP_S, REGISTER_BACKOFF_S * doubled)
            # Equal jitter: agents that lost the same daemon do not all come back in step.
            delay = delay / 2 + delay / 2 * self._jitter()
            self._register_failures += 1
            self._next_register = self._clock.monotonic() + delay
            self._failed(e, f"registering as {node.id} (next try in {delay:.1f}s)")
            return
        self._reached()
        self._registered = True
        self._register_failures = 0
        self._heartbeat_failures = 0
        self._node_name = response.node_name or node.id
        interval = response.heartbeat_interval.ToTimedelta().total_seconds()
        self._heartbeat_s = interval if interval > 0 else DEFAULT_HEARTBEAT_S
        timeout = response.heartbeat_timeout.ToTimedelta().total_seconds()
        # One heartbeat short of the daemon's timeout: the ranks are stopped before the daemon
        # can call the node lost and start them elsewhere, yet not during a leader failover
        # (up to about 5 s): the new leader hears from the agent within a second of taking
        # over and counts the node's silence from its takeover, a full timeout.
        self._lost_after = timeout
        self._fence_after = (
            max(self._heartbeat_s, timeout - self._heartbeat_s) if timeout > 0 else None
        )
        self._renew_lease(force=True)
        self._next_heartbeat = self._clock.monotonic()
        log.info(
            "registered as %s (%d GPU(s), profile %s); heartbeat every %.1fs",
            self._node_name,
            node.gpu_count,
            node.profile.source,
            self._heartbeat_s,
        )
        self._notify(lambda: self._notifier.status(f"registered as {self._node_name}"))

    def _heartbeat(self) -> None:
        self._next_heartbeat = self._clock.monotonic() + self._heartbeat_s
        held = self.held()
        request = agent_pb2.HeartbeatRequest(
            node_name=self._node_name, running=_refs(held), ready=_refs(self._probe_ready())
        )
        self._add_health(request)
        started = self._clock.monotonic()
        try:
            response = self._stub.Heartbeat(request, timeout=self._rpc_timeout)
        except grpc.RpcError as e:
            self._count_heartbeat(False, started)
            if e.code() is grpc.StatusCode.NOT_FOUND:
                self._reregister("the daemon does not know this node")
                return
            if e.code() in _UNREACHABLE:
                doubled = 2 ** min(self._heartbeat_failures, _MAX_DOUBLINGS)
                delay = min(self._heartbeat_s, HEARTBEAT_RETRY_S * doubled)
                delay = delay / 2 + delay / 2 * self._jitter()  # equal jitter, as registering
                self._heartbeat_failures += 1
                self._next_heartbeat = self._clock.monotonic() + delay
            self._failed(e, "heartbeat")
            return
        self._count_heartbeat(True, started)
        self._reached()
        self._heartbeat_failures = 0
        self._profile_unsent = None
        if response.reregister:
            self._reregister("the daemon asked")
            return
        stops = {key_from_pb(ref) for ref in response.stop}
        for key in sorted(stops):
            self._runner.stop(key)
        for assignment in response.assignments:
            key = key_from_pb(assignment.ref)
            # Assignments are sent again each heartbeat: an agent that adopted ranks learns
            # their GPUs here too.
            self._gpus[key] = tuple(assignment.gpu_indices)
            if key in self._seen or key in stops:
                continue
            self._start(launch_from_pb(assignment))

    def _count_heartbeat(self, ok: bool, started: float) -> None:
        self._heartbeats[0 if ok else 1] += 1
        if self._observer is not None:
            self._observer.heartbeat(ok, self._clock.monotonic() - started)

    # -- health ---------------------------------------------------------------------------

    def _check_health(self, now: float) -> None:
        """Re-profile through the same probe when due (every health interval, and once after
        ranks exited: a job boundary is when a fault a job caused or hit shows), and compare
        the node with its baseline."""
        periodic = self._health_interval > 0 and now >= self._next_health
        if self._baseline is None or not (periodic or self._health_due):
            return
        self._health_due = False
        if periodic:
            self._next_health = now + self._health_interval
        try:
            facts = self._probe.probe()
        except Exception:  # a probe bug or a driver hiccup must not take the agent down
            log.exception("re-profiling failed; keeping the last health verdict")
            return
        issues = check_health(
            self._baseline, facts.profile, min_bandwidth_fraction=self._min_bandwidth_fraction
        )
        if issues != self._health_issues:
            if issues:
                log.warning("health check: %s", "; ".join(issues))
            else:
                log.info("health check: the node is healthy again")
            # Tell the daemon now, not at the next heartbeat: it keeps new work off a sick node.
            self._next_heartbeat = now
        self._health_issues = issues
        self._profile_unsent = self._profile = facts.profile

    def _add_health(self, request: agent_pb2.HeartbeatRequest) -> None:
        request.health_issues.extend(self._health_issues)
        if self._profile_unsent is not None:
            request.profile.CopyFrom(profile_to_pb(self._profile_unsent))

    def _reregister(self, why: str) -> None:
        log.info("registering again: %s", why)
        self._registered = False
        self._next_register = self._clock.monotonic()
        self._register()

    # -- ranks ----------------------------------------------------------------------------

    def _probe_ready(self) -> set[RankKey]:
        """The running ranks that passed their readiness probe: each probed until it passes
        (then it stays ready), a rank with no probe not at all."""
        running = set(self._runner.running())
        self._ready &= running
        self._probes = {k: v for k, v in self._probes.items() if k in running}
        for key in sorted(running - self._ready):
            if key not in self._probes:
                self._probes[key] = self._runner.readiness(key)
            readiness = self._probes[key]
            if readiness is not None and readiness.passes():
                self._ready.add(key)
        return self._ready

    def _start(self, launch: Launch) -> None:
        self._seen.add(launch.key)
        refused = self._runner.start(launch)
        if refused is not None:
            self._collect([refused])
            return
        self._report(launch.key, jobs_pb2.RANK_STATE_RUNNING)

    def _recover(self) -> None:
        """Adopt the ranks the agent's previous run left running and report those that ended
        meanwhile; remember every rank found, so a re-sent assignment starts nothing twice."""
        self._recovered = True
        found = self._runner.recover()
        self._seen.update(found.adopted, found.reported, (e.key for e in found.exits))
        for key in found.adopted:
            # The daemon may not have heard RUNNING before the agent died; a repeat is ignored.
            self._report(key, jobs_pb2.RANK_STATE_RUNNING)
        self._collect(found.exits)

    def _collect(self, exits: Iterable[RankExit]) -> None:
        for e in exits:
            self._exited[e.key] = e
            self._health_due = True

    def _report(self, key: RankKey, state: int, exit: RankExit | None = None) -> None:
        request = agent_pb2.ReportRankStatusRequest(
            node_name=self._node_name,
            ref=rank_ref(key.job_id, key.rank, key.attempt),
            state=state,
            time=ts(self._clock.now()),
        )
        if exit is not None:
            request.exit_code = exit.exit_code
            request.message = exit.message
        self._outbox.append(request)

    def _finish_exited(self) -> None:
        # Logs first: once the daemon hears EXITED the job may finish, and `gpuctl logs`
        # of a finished job must be complete.
        for key, exit in list(self._exited.items()):
            if self._unreachable:
                return
            if self._ship(key) or self._logs.stalls(key) >= MAX_LOG_STALLS:
                del self._exited[key]
                self._logs.forget(key)
                self._logs_refused.discard(key)
                self._report(key, jobs_pb2.RANK_STATE_EXITED, exit)

    def _ship_running_logs(self) -> None:
        for key in self._runner.running():
            if self._unreachable:
                return
            self._ship(key)

    def _ship(self, key: RankKey) -> bool:
        """Ship what the daemon lacks of the rank's log; True when it has it all, or when it
        refuses the log for good (then the exit is reported without it)."""
        if key in self._logs_refused:
            return True
        try:
            return self._logs.ship(key, self._runner.log_path(key))
        except grpc.RpcError as e:
            if e.code() in _LOGS_REFUSED:
                self._logs_refused.add(key)
                log.warning("the daemon refused the log of %s (%s): not sending it", key, _why(e))
                return True
            self._failed(e, f"pushing the log of {key}")
            return False

    def _push_logs(self, key: RankKey, offset: int, data: bytes) -> int:
        request = agent_pb2.PushLogsRequest(
            node_name=self._node_name,
            ref=rank_ref(key.job_id, key.rank, key.attempt),
            offset=offset,
            data=data,
        )
        next_offset = self._stub.PushLogs(request, timeout=self._rpc_timeout).next_offset
        self._reached()
        return next_offset

    def _send_outbox(self) -> None:
        # In order, stopping at the first failure: a rank's RUNNING must not arrive after its
        # EXITED. A report is removed only once the daemon acknowledged it.
        while self._outbox and not self._unreachable:
            request = self._outbox[0]
            try:
                self._stub.ReportRankStatus(request, timeout=self._rpc_timeout)
                self._reached()
            except grpc.RpcError as e:
                if e.code() not in _REJECTED:
                    self._failed(e, f"reporting on {_ref_str(request)}")
                    return
                log.error("the daemon rejected the report on %s (%s)", _ref_str(request), _why(e))
            self._outbox.popleft()
            if request.state == jobs_pb2.RANK_STATE_EXITED:
                # Acknowledged (or refused for good): an agent restart must not report it again.
                self._runner.mark_reported(key_from_pb(request.ref))

    def _failed(self, e: grpc.RpcError, what: str) -> None:
        """Note a failed call. Only the first of a run of unreachable-daemon failures is a
        warning, so a daemon restart does not flood the journal at every tick."""
        if e.code() not in _UNREACHABLE:
            log.warning("%s failed (%s); will retry", what, _why(e))
            return
        self._unreachable = True
        if self._down_since is None:
            self._down_since = self._clock.monotonic()
            log.warning("gpuctld unreachable: %s failed (%s); will retry", what, _why(e))
        else:
            log.debug("%s failed (%s)", what, _why(e))

    def _fence(self, now: float) -> None:
        """Stop every rank when the daemon has been silent for `fence_after`: it will soon
        call this node lost and run the ranks elsewhere (etcd's and Borg's fencing)."""
        if self._fence_after is None or self._last_word is None or self._fenced:
            return
        silent = now - self._last_word
        if silent <= self._fence_after or not self._runner.running():
            return
        self._fenced = True
        log.warning(
            "no word from gpuctld for %.0fs (it calls a node lost after %.0fs): stopping %d "
            "rank(s) so that they never run twice",
            silent,
            self._lost_after,
            len(self._runner.running()),
        )
        self._runner.stop_all(self._kill_after() - self._fence_after)

    def _kill_after(self) -> float:
        """Silence after which a fenced rank is SIGKILLed, whatever its stop grace: halfway
        from the fence to the daemon's timeout, so it is gone before it can run elsewhere."""
        assert self._fence_after is not None
        return max(self._fence_after, (self._fence_after + self._lost_after) / 2)

    def _renew_lease(self, *, force: bool = False) -> None:
        """The ranks may run `fence_after` more without word from gpuctld: past it their
        supervisors stop them even if this agent is dead (`Runner.lease`). Written at most
        once per LEASE_RENEW_S, so a supervisor may fence that much early."""
        now = self._clock.monotonic()
        if not force and self._leased_at is not None and now - self._leased_at < LEASE_RENEW_S:
            return
        self._leased_at = now
        fence = self._fence_after
        try:
            self._runner.lease(fence, None if fence is None else self._kill_after())
        except OSError as e:  # a full disk: the agent's own fence still holds
            log.warning("cannot renew the ranks' lease: %s", e)

    def _reached(self) -> None:
        self._last_word = self._clock.monotonic()
        self._fenced = False
        self._renew_lease()
        if self._down_since is not None:
            down_s = self._clock.monotonic() - self._down_since
            self._down_since = None
            log.info("gpuctld reachable again after %.1fs", down_s)

    # -- systemd and timing ---------------------------------------------------------------

    def _ping_watchdog(self) -> None:
        interval = self._notifier.watchdog_interval
        now = self._clock.monotonic()
        if interval is None or (
            self._last_watchdog is not None and now - self._last_watchdog < interval
        ):
            return
        self._last_watchdog = now
        self._notify(self._notifier.watchdog)

    @staticmethod
    def _notify(send: Callable[[], bool]) -> None:
        try:
            send()
        except OSError as e:  # a missing socket must not take the agent down
            log.warning("sd_notify failed: %s", e)

    def _sleep_s(self) -> float:
        now = self._clock.monotonic()
        due = [now + self._poll_interval]
        due.append(self._next_heartbeat if self._registered else self._next_register)
        if self._baseline is not None and self._health_interval > 0:
            due.append(self._next_health)
        if (deadline := self._runner.next_deadline()) is not None:
            due.append(deadline)
        if self._notifier.watchdog_interval is not None and self._last_watchdog is not None:
            due.append(self._last_watchdog + self._notifier.watchdog_interval)
        return max(0.0, min(due) - now)


def _why(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'error'}: {details}"


def _ref_str(request: agent_pb2.ReportRankStatusRequest) -> str:
    return str(key_from_pb(request.ref))
