"""The daemon's use cases: submit, cancel, drain, register, heartbeat, report, and the cycle.

Every mutation runs under one lock (one writer), reads the store, decides through the pure
core (lifecycle tables, validation, `core.schedule`) and writes the result back in one
transaction. Time comes from the injected clock; nothing here sleeps or touches the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from gpuctl.core import services
from gpuctl.core.cost import (
    AttemptCharge,
    CostBy,
    CostReport,
    NodePrice,
    attempt_charge,
    charges,
    prices_of,
    report,
)
from gpuctl.core.cycle import CycleResult
from gpuctl.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from gpuctl.core.fabric import fabric_issues
from gpuctl.core.feasibility import FleetKinds, never_runs, shape
from gpuctl.core.launch import rank_env
from gpuctl.core.leasing import Leasing, Offer, managed
from gpuctl.core.lifecycle import (
    JobEvent,
    NodeEvent,
    end_ranks,
    exit_text,
    next_job_state,
    next_node_state,
)
from gpuctl.core.model import (
    BandwidthProfile,
    Event,
    Job,
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    Node,
    NodeLease,
    NodeState,
    OnNodeLost,
    Placement,
    RankPlacement,
    RankState,
)
from gpuctl.core.plugins import Policy
from gpuctl.core.text import job_size
from gpuctl.core.trust import AuditEntry, PermissionDenied
from gpuctl.core.validation import MAX_REPLICAS, validate_spec
from gpuctl.runtime.clock import Clock
from gpuctl.runtime.cycleproc import Decided, WorkerLost, decide
from gpuctl.runtime.logstore import LogStore
from gpuctl.store.base import Store

if TYPE_CHECKING:
    from gpuctl.runtime.cycleproc import CycleProcess

log = logging.getLogger(__name__)


class LeaseSide(Protocol):
    """What the controller asks of the leases (`runtime.leases.LeaseKeeper` is one): the
    offers to judge jobs by, the lease side of a cycle's input, writing what a cycle decided
    about leases, and which lease a registering node comes up under."""

    offers: tuple[Offer, ...]

    def context(self, nodes: Sequence[Node], active: Sequence[Job], now: datetime) -> Leasing: ...

    def apply(self, result: CycleResult, now: datetime) -> list[Event]: ...

    def match(self, reported: Node, known: Node | None, now: datetime) -> NodeLease | None: ...

    def fabric_of(self, lease: NodeLease) -> str: ...

    kept: Mapping[str, str]  # idle leases the last cycle kept -> why


class CycleObserver(Protocol):
    """Told of each cycle that had something to decide (gpuctld's metrics)."""

    def cycle(
        self, seconds: float, result: CycleResult, placed: Sequence[Job], now: datetime
    ) -> None:
        """`placed`: the jobs the cycle bound, as they were while pending."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerSettings:
    heartbeat_interval_s: float = 3.0
    heartbeat_timeout_s: float = 12.0
    kill_grace_s: float = 10.0
    master_port_base: int = 29500
    master_port_range: int = 1000
    replica_port_base: int = 31000
    replica_port_range: int = 9000
    queues: tuple[str, ...] = ()  # the queues jobs may name; empty: any
    job_retention_s: float = 30 * 86400.0  # finished jobs, their events and logs; 0: forever
    audit_retention_s: float = 365 * 86400.0  # 0: forever


# Retention deletes at most this many rows a batch and this many batches a run, so that one run
# holds the writer's lock briefly and a backlog (retention just turned on) drains over runs.
PURGE_BATCH = 1000
# Waiting jobs told their reasons in one store write (see run_cycle): small enough that submits
# queued behind one wait milliseconds, large enough that a cycle makes few commits.
REASONS_A_WRITE = 100
# How long a submit judges whether a job could ever run by the fleet as last read.
FLEET_TTL_S = 10.0
MAX_VERDICTS = 10_000  # verdicts kept by spec shape between two reads of the fleet
DRY_RUN_ID = 1 << 62  # the id a dry run's job is decided under (no stored job has it)
PURGE_BATCHES = 10


@dataclass(frozen=True, slots=True)
class RankRef:
    job_id: int
    rank: int
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    ref: RankRef
    job: Job
    rank: RankPlacement
    env: dict[str, str]
    kill_grace_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatResult:
    assignments: tuple[Assignment, ...] = ()
    stop: tuple[RankRef, ...] = ()
    reregister: bool = False


class JobFeed:
    """Wakes `WatchJobs` streams when a job's revision moves."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.revision = 0

    def publish(self, jobs: Iterable[Job]) -> None:
        with self._cond:
            self.revision = max([self.revision, *(j.revision for j in jobs)])
            self._cond.notify_all()

    def wait(self, after: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.revision > after, timeout=timeout)
            return self.revision


class ActiveJobs:
    """The store's active jobs, kept in memory and brought up to date from what changed since
    (`jobs_since` the last revision seen), so a cycle or heartbeat reads and decodes only the
    jobs that changed, not every active job. Revisions become visible in increasing order
    (store.base), so nothing committed is skipped; another gpuctld's writes show up too."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        # In id order, kept so: new jobs mostly come with ids above every other (an update
        # keeps its place, a removal the order), and one that does not sorts it once. A
        # cycle's read of 30,000 jobs is then a copy, not a sort and a lookup each (~4 ms).
        self._jobs: dict[int, Job] = {}
        self._sorted = True
        self._pending = 0  # of those, how many are PENDING
        self._holding: dict[int, Job] = {}  # of those, the ones that hold GPUs
        self._on_node: dict[str, set[int]] = {}  # the holding jobs with ranks on each node
        self._revision: int | None = None

    def __call__(self) -> tuple[Job, ...]:
        """Every job that is PENDING, RUNNING or CANCELLING, in id order."""
        return tuple(self.by_id().values())

    def by_id(self) -> dict[int, Job]:
        """The same, by id (a copy, in id order)."""
        return self.read()[0]

    def pending(self) -> int:
        """How many of them are PENDING."""
        with self._lock:
            self._refresh()
            return self._pending

    def read(self) -> tuple[dict[int, Job], int]:
        """`by_id()` and `pending()` of one look at the store."""
        with self._lock:
            self._refresh()
            if not self._sorted:
                self._jobs = {i: self._jobs[i] for i in sorted(self._jobs)}
                self._sorted = True
            return dict(self._jobs), self._pending

    def holding(self, node_id: str = "") -> tuple[Job, ...]:
        """The active jobs that hold resources (placed, running or stopping; with ranks on
        `node_id` when given), in id order: what a node's usage is made of, found without
        going through the queue."""
        with self._lock:
            self._refresh()
            ids = self._on_node.get(node_id, set()) if node_id else self._holding
            return tuple(self._holding[i] for i in sorted(ids))

    def _refresh(self) -> None:
        if self._revision is None:
            # The revision before the jobs: whatever commits in between is read twice, never
            # missed.
            self._revision = self._store.current_revision()
            changed: Iterable[Job] = self._store.active_jobs()
        else:
            changed = self._store.jobs_since(self._revision)
        for job in changed:
            self._revision = max(self._revision, job.revision)
            old = self._jobs.pop(job.id, None) if job.state.finished else self._jobs.get(job.id)
            self._pending -= old is not None and old.state is JobState.PENDING
            if not job.state.finished:
                if old is None and self._jobs and job.id < next(reversed(self._jobs)):
                    self._sorted = False
                self._jobs[job.id] = job
                self._pending += job.state is JobState.PENDING
            if (old := self._holding.pop(job.id, None)) is not None:
                for node_id in old.placement.node_ids if old.placement else ():
                    self._on_node[node_id].discard(job.id)
            if job.state.holds_resources and job.placement is not None:
                self._holding[job.id] = job
                for node_id in job.placement.node_ids:
                    self._on_node.setdefault(node_id, set()).add(job.id)


class Controller:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        policy: Policy,
        logs: LogStore,
        settings: ControllerSettings | None = None,
        *,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy
        self.logs = logs
        self.settings = settings or ControllerSettings()
        self.wake = wake  # asks the scheduling loop to run a cycle soon
        self.feed = JobFeed()
        self.active_jobs = ActiveJobs(store)
        self._lock = threading.RLock()
        self.leases: LeaseSide | None = None  # leases from providers (`attach_leases`)
        self.cycles: CycleProcess | None = None  # where cycles decide, if not in here
        self.observer: CycleObserver | None = None  # told of each cycle that decided (metrics)
        self._leading_since: datetime | None = None
        # The fleet by kind, for refusing jobs that could never run: (when read, the kinds,
        # the verdicts given on them by the shape of the spec).
        self._fleet: tuple[datetime, FleetKinds, dict[tuple[object, ...], str]] | None = None

    def writing(self) -> threading.RLock:
        """The one writer's section, for what must read the store and write over it with no
        other write of the controller's in between (the lease keeper, a join token's one use)."""
        return self._lock

    def attach_leases(self, keeper: LeaseSide) -> None:
        self.leases = keeper

    @property
    def leading(self) -> bool:
        """Whether this gpuctld leads (decides and writes), not a standby."""
        return self._leading_since is not None

    def lead(self) -> None:
        """This gpuctld starts deciding (at start, or taking over from a leader that died):
        every node gets a full heartbeat timeout from now before it counts as lost, since its
        agent may still be finding this daemon."""
        self._leading_since = self.clock.now()

    # -- user API ------------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        request_id: str = "",
        validate_only: bool = False,
        audit: Callable[[Job], AuditEntry] | None = None,
    ) -> Job:
        """Store a new job (its Submitted event, and `audit(job)` where given, with it), or the
        one stored before under `request_id`."""
        validate_spec(spec)
        self._check_queue(spec)
        now = self.clock.now()
        why = self._never_runs(spec, now)
        if why:
            raise FailedPrecondition(f"this job could never run: {why}")
        if validate_only:
            return Job(id=0, spec=spec, created_at=now, reason=self._dry_run(spec, now))
        what = f"{spec.kind.value}: " + job_size(spec)
        # No controller lock: an insert takes nothing the cycle reads and writes back, so a
        # submit never waits for a cycle; the next cycle sees the job.
        job, created = self.store.create_job(
            spec,
            request_id=request_id,
            now=now,
            events=lambda j: [_job_event(j, now, "Submitted", f"{what}, queue {spec.queue}")],
            audit=audit,
        )
        if created:
            log.info(
                "job %d submitted by %s (%s)",
                job.id,
                spec.owner or "-",
                what,
                extra={"job_id": job.id},
            )
        self.feed.publish([job])
        self.wake()
        return job

    def get(
        self, job_id: int, *, job: Job | None = None
    ) -> tuple[Job, tuple[Event, ...], dict[int, dict[str, str]]]:
        """The job (`job`, where the caller read it already), its events and ranks' env."""
        job = job or self.store.get_job(job_id)
        events = self.store.list_events("job", str(job_id))
        env: dict[int, dict[str, str]] = {}
        if job.placement is not None:
            nodes = self._nodes_by_id(job.placement.node_ids)
            env = {r.rank: rank_env(job, r, nodes) for r in job.placement.ranks}
        return job, events, env

    def cancel(self, job_id: int, *, by: str = "") -> Job:
        with self._lock:
            job = self.store.get_job(job_id)
            if job.state.finished:
                raise FailedPrecondition(
                    f"job {job_id} already {job.state.value}: nothing to cancel"
                )
            now = self.clock.now()
            state = next_job_state(job.id, job.state, JobEvent.CANCEL)
            changed = replace(job, state=state, updated_at=now)
            who = f"cancelled by {by}" if by else "cancelled"
            if state is JobState.CANCELLED:
                changed = replace(changed, finished_at=now, reason=f"{who} while pending")
            elif job.state is JobState.RUNNING:
                changed = replace(
                    changed, reason=f"{who}; stopping ranks", end_state=JobState.CANCELLED
                )
            asked = f"cancel requested{f' by {by}' if by else ''}: {state.value}"
            (job,) = self._write([changed], [_job_event(job, now, "Cancel", asked)])
        self.wake()
        return job

    def scale(self, job_id: int, replicas: int, *, by: str = "") -> Job:
        """Set an inference job's desired replicas. Scaling up, the cycle places the new ones;
        scaling down stops the replicas whose going frees the most (`services.scale_down`)."""
        if not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidArgument(
                [FieldViolation("replicas", f"must be between 1 and {MAX_REPLICAS}")]
            )
        with self._lock:
            job = self.store.get_job(job_id)
            if job.spec.kind is not JobKind.INFERENCE:
                raise FailedPrecondition(
                    f"job {job_id} is a training gang: its size is fixed (replicas are for "
                    "inference)"
                )
            _check_changeable(job, "scale")
            now = self.clock.now()
            was = job.spec.replicas
            stop: tuple[RankPlacement, ...] = ()
            if job.state is JobState.RUNNING and job.placement is not None:
                if replicas < len(job.placement.ranks):
                    usage = self.node_usage()
                    others_on = {
                        n: any(i != job_id for _, ids in gpus.values() for i in ids)
                        for n, gpus in usage.items()
                    }
                    job, stop = services.scale_down(job, replicas, others_on)
                else:
                    job = replace(job, spec=replace(job.spec, replicas=replicas))
                events: list[Event] = []
                job = self._settle(replace(job, updated_at=now), now, events)
                if job.state is JobState.RUNNING:
                    job = replace(job, reason=services.summary(job, now))
            else:
                job = replace(job, spec=replace(job.spec, replicas=replicas), updated_at=now)
                events = []
            what = f"replicas {was} -> {replicas}" + (f" by {by}" if by else "")
            if stop:
                what += "; stopping " + ", ".join(f"replica {r.rank} on {r.node_id}" for r in stop)
            events.insert(0, _job_event(job, now, "Scaled", what))
            job = self._respec(job, events)
        log.info("job %d scaled: %s", job_id, what, extra={"job_id": job_id})
        self.wake()
        return job

    def update(self, job_id: int, spec: JobSpec, *, by: str = "") -> Job:
        """Roll an inference service to `spec` (its command, env, resources, replicas...): new
        replicas are placed beside the old, which stop as the new become available
        (`services.roll`); a pending one simply takes the new spec."""
        validate_spec(spec)
        with self._lock:
            job = self.store.get_job(job_id)
            spec = replace(spec, owner=job.spec.owner)
            if job.spec.kind is not JobKind.INFERENCE or spec.kind is not JobKind.INFERENCE:
                raise FailedPrecondition(
                    f"job {job_id}: only an inference service is updated in place; a training "
                    "job is cancelled and submitted again"
                )
            for name in ("queue", "name", "priority"):
                if getattr(spec, name) != getattr(job.spec, name):
                    raise InvalidArgument(
                        [FieldViolation(f"spec.{name}", "cannot change in an update")]
                    )
            _check_changeable(job, "update")
            if spec == job.spec:
                return job
            now = self.clock.now()
            why = self._never_runs(spec, now)
            if why:
                raise FailedPrecondition(f"the updated job could never run: {why}")
            if job.state is JobState.RUNNING:
                job = services.update(job, spec)
                job = replace(job, updated_at=now, reason=services.summary(job, now))
                assert job.placement is not None
                what = f"rolling to generation {job.placement.generation}"
            else:
                job = replace(job, spec=spec, updated_at=now)
                what = "the spec replaced before it started"
            what += f" by {by}" if by else ""
            job = self._respec(job, [_job_event(job, now, "Update", what)])
        log.info("job %d: %s", job_id, what, extra={"job_id": job_id})
        self.wake()
        return job

    def roll_updates(self) -> None:
        """A step of every rolling update (`services.roll`): the scheduling loop takes one
        before each cycle, so old replicas stop as new ones become available."""
        now = self.clock.now()
        with self._lock:
            for job in self.active_jobs.holding():
                rolled = services.roll(job, now)
                if rolled.job is job:
                    continue
                events = [_job_event(job, now, t, m) for t, m in rolled.events]
                if rolled.job.spec is not job.spec:  # rolled back
                    self._respec(rolled.job, events)
                else:
                    self._write([rolled.job], events)
                for t, m in rolled.events:
                    log.info("job %d: %s: %s", job.id, t, m, extra={"job_id": job.id})

    def drain(self, node_id: str, reason: str = "") -> Node:
        with self._lock:
            node = self.store.get_node(node_id)
            state = next_node_state(node_id, node.state, NodeEvent.DRAIN)
            why = reason or "drained by an operator"
            node = self.store.put_node(replace(node, state=state, state_reason=why))
            self.store.add_events([_node_event(node_id, self.clock.now(), "Drain", why)])
        log.info("node %s draining: %s", node_id, why, extra={"node_id": node_id})
        return node

    def undrain(self, node_id: str, *, by: str = "") -> Node:
        """Lift a drain: new work may land again (unless the node's health check still finds
        problems: then it is DEGRADED, as it would have been without the drain)."""
        with self._lock:
            node = self.store.get_node(node_id)
            state = next_node_state(node_id, node.state, NodeEvent.UNDRAIN)
            reason = ""
            if node.health_issues:
                state, reason = NodeState.DEGRADED, _issues_line(node.health_issues)
            node = self.store.put_node(replace(node, state=state, state_reason=reason))
            why = f"undrained by {by}" if by else "undrained"
            self.store.add_events([_node_event(node_id, self.clock.now(), "Undrain", why)])
        log.info("node %s %s: %s", node_id, why, state.value, extra={"node_id": node_id})
        self.wake()
        return node

    def node_usage(self) -> dict[str, dict[int, tuple[int, list[int]]]]:
        """Per node, per GPU: used milli and the jobs using it."""
        usage: dict[str, dict[int, tuple[int, list[int]]]] = {}
        for job in self.active_jobs.holding():
            assert job.placement is not None  # holding() has placed jobs only
            for r in job.placement.ranks:
                gpus = usage.setdefault(r.node_id, {})
                for i in r.gpu_indices:
                    milli, ids = gpus.get(i, (0, []))
                    gpus[i] = (milli + r.gpu_milli, [*ids, job.id])
        return usage

    # -- agent API -----------------------------------------------------------------------

    def register_node(self, reported: Node) -> Node:
        now = self.clock.now()
        self._fleet = None  # what could run may have changed
        with self._lock:
            try:
                known: Node | None = self.store.get_node(reported.id)
            except NotFound:
                known = None
            if known is None:
                state, reason, registered = NodeState.READY, "", now
            else:
                state = next_node_state(reported.id, known.state, NodeEvent.REGISTER)
                # A drain and a degradation outlive an agent restart; the next heartbeat
                # says whether the issues are still there.
                kept = state in (NodeState.DRAINING, NodeState.DEGRADED)
                reason = known.state_reason if kept else ""
                reported = replace(reported, health_issues=known.health_issues if kept else ())
                registered = known.registered_at or now
            lease_id = known.lease_id if known else ""
            lease = self.leases.match(reported, known, now) if self.leases is not None else None
            if lease is not None:
                # A leased node is what its provider lent: its price, SKU and (when the agent
                # does not say) fabric come from the lease.
                assert self.leases is not None
                lease_id = lease.id
                reported = replace(
                    reported,
                    provider=lease.provider,
                    sku=lease.sku or reported.sku,
                    price_per_hour=lease.price_per_hour,
                    fabric=reported.fabric or self.leases.fabric_of(lease),
                )
            elif not self._lease_active(lease_id):
                lease_id = self._open_static_lease(reported, now)
            node = self.store.put_node(
                replace(
                    reported,
                    state=state,
                    state_reason=reason,
                    registered_at=registered,
                    last_heartbeat=now,
                    lease_id=lease_id,
                )
            )
            gpus = f"{node.gpu_count}x {node.profile.gpu_model}" if node.gpu_count else "no GPUs"
            self.store.add_events(
                [
                    _node_event(
                        node.id,
                        now,
                        "Registered",
                        f"{gpus}, fabric {node.fabric or '-'}, at {node.address}",
                    )
                ]
            )
            implausible = fabric_issues(node, self.store.list_nodes())
            if implausible:
                self.store.add_events(
                    [_node_event(node.id, now, "FabricImplausible", "; ".join(implausible))]
                )
                log.warning(
                    "node %s: fabric claim implausible: %s", node.id, "; ".join(implausible)
                )
        log.info("node %s registered (%s)", node.id, gpus, extra={"node_id": node.id})
        self.wake()
        return node

    def heartbeat(
        self,
        node_id: str,
        running: Sequence[RankRef],
        *,
        ready: Sequence[RankRef] = (),
        health_issues: Sequence[str] = (),
        profile: BandwidthProfile | None = None,
    ) -> HeartbeatResult:
        """The agent's periodic word: what it runs (and which of those passed their readiness
        probe), what its health check found, and its re-measured profile when it took one.
        Answers what to start and stop."""
        now = self.clock.now()
        with self._lock:
            try:
                node = self.store.get_node(node_id)
            except NotFound:
                return HeartbeatResult(reregister=True)
            if node.state in (NodeState.LOST, NodeState.RELEASED):
                return HeartbeatResult(reregister=True)
            was = node
            node = self._apply_health(node, tuple(health_issues), profile, now)
            if node == was:  # most heartbeats: only the time moves
                self.store.touch_node(node_id, now)
            else:
                self.store.put_node(replace(node, last_heartbeat=now))
            if node.state is NodeState.DEGRADED and was.state is not NodeState.DEGRADED:
                # Its ranks stop through the stop list below: the jobs moved to a new attempt.
                self._fail_over(
                    {node_id},
                    now,
                    why=f"degraded: {node.state_reason}",
                    event_type="NodeDegraded",
                    cancelling_too=False,
                )
            woken = node.state is not was.state or node.profile.gpus != was.profile.gpus
            running_set = set(running)
            ready_set = set(ready).intersection(running_set)
            # The jobs placed here: a heartbeat's work is its node's, not the queue's.
            jobs = {j.id: j for j in self.active_jobs.holding(node_id)}
            stop = [
                ref
                for ref in running_set
                if not self._should_run(jobs.get(ref.job_id), ref, node_id)
            ]
            # Ranks still to stop here hold GPUs (a preemption's victims, a cancelled or
            # requeued attempt): nothing new starts on the node until they are gone, or a new
            # rank would share their GPUs (memory) through the stop's kill grace.
            deferred = bool(stop)
            assignments: list[Assignment] = []
            changed: list[Job] = []
            events: list[Event] = []
            nodes = None
            for job in jobs.values():
                if job.placement is None or not job.state.holds_resources:
                    continue
                updated = job
                for r in job.placement.ranks:
                    ref = RankRef(job.id, r.rank, job.attempt)
                    if ref in ready_set and r.state is RankState.RUNNING and not r.ready:
                        assert updated.placement is not None
                        r = replace(r, ready=True)
                        updated = replace(updated, placement=updated.placement.with_rank(r))
                        events.append(_job_event(job, now, "Ready", f"replica {r.rank} ready"))
                        continue
                    if (
                        r.node_id != node_id
                        or r.state is not RankState.ASSIGNED
                        or ref in running_set
                    ):
                        continue
                    if job.state is JobState.CANCELLING:
                        # Never started, and will not be now: count it as stopped.
                        assert updated.placement is not None
                        stopped = replace(
                            r, state=RankState.EXITED, message="cancelled before start"
                        )
                        updated = replace(updated, placement=updated.placement.with_rank(stopped))
                        continue
                    if deferred:
                        continue
                    nodes = nodes or self._nodes_by_id([node_id])  # the env of ranks here
                    assignments.append(
                        Assignment(
                            ref=ref,
                            job=job,
                            rank=r,
                            env=rank_env(job, r, nodes),
                            kill_grace_s=self.settings.kill_grace_s,
                        )
                    )
                if updated is not job:
                    finished = self._settle(updated, now, events)
                    changed.append(finished)
            if changed:
                self._write(changed, events)
        if woken:
            self.wake()
        return HeartbeatResult(
            assignments=tuple(assignments), stop=tuple(sorted(stop, key=_ref_key))
        )

    def report_rank(
        self,
        node_id: str,
        ref: RankRef,
        state: RankState,
        exit_code: int | None = None,
        message: str = "",
    ) -> None:
        """An agent says a rank started or exited. Reports about older attempts, unknown ranks
        or ranks in a final state already are acknowledged and ignored (idempotent)."""
        now = self.clock.now()
        with self._lock:
            try:
                job = self.store.get_job(ref.job_id)
            except NotFound:
                return
            if job.attempt != ref.attempt or job.placement is None:
                return
            rank = next((r for r in job.placement.ranks if r.rank == ref.rank), None)
            if rank is None or rank.node_id != node_id:
                return
            if job.state.finished:
                # A rank stopped as its job ended (`end_ranks`): how it ended, when told.
                told = state is RankState.EXITED and exit_code is not None
                if told and rank.state is RankState.EXITED and rank.exit_code is None:
                    rank = replace(rank, exit_code=exit_code)
                    self._write([replace(job, placement=job.placement.with_rank(rank))], [])
                return
            if rank.state in (RankState.EXITED, RankState.LOST):
                return
            events: list[Event] = []
            if state is RankState.RUNNING:
                if rank.state is not RankState.ASSIGNED:
                    return
                rank = replace(rank, state=RankState.RUNNING, started_at=now)
                job = replace(job, started_at=job.started_at or now)
                events.append(
                    _job_event(job, now, "Started", f"rank {ref.rank} started on {node_id}")
                )
            elif state is RankState.EXITED:
                rank = replace(
                    rank,
                    state=RankState.EXITED,
                    exit_code=exit_code,
                    message=message,
                    ended_at=now,
                )
                detail = f" ({message})" if message else ""
                events.append(
                    _job_event(
                        job,
                        now,
                        "Exited",
                        f"rank {ref.rank} on {node_id} exited with {exit_code}{detail}",
                    )
                )
            else:
                return
            job = replace(job, placement=job.placement.with_rank(rank), updated_at=now)
            job = self._settle(job, now, events)
            self._write([job], events)
        if job.state.finished or services.wanted(job, now):  # GPUs freed, or a replica to replace
            self.wake()

    def push_logs(self, node_id: str, ref: RankRef, offset: int, data: bytes) -> int:
        """Append a rank's output where that rank of the job's attempt is placed on `node_id`,
        so no node writes into the logs of others' ranks. Older attempts are taken as they come
        (their placements are not kept), a newer one never."""
        try:
            job = self.store.get_job(ref.job_id)
        except NotFound:
            raise NotFound("rank", f"{ref.rank} of job {ref.job_id}") from None
        placed = job.placement is not None and any(
            r.rank == ref.rank and r.node_id == node_id for r in job.placement.ranks
        )
        if ref.attempt > job.attempt or (ref.attempt == job.attempt and not placed):
            raise PermissionDenied(
                f"job {ref.job_id} rank {ref.rank} attempt {ref.attempt} is not placed on "
                f"node {node_id}",
                permission="agent",
            )
        return self.logs.append(ref.job_id, ref.attempt, ref.rank, offset, data, self.clock.now())

    # -- periodic work -------------------------------------------------------------------

    def run_cycle(self) -> CycleResult:
        """One scheduling cycle: snapshot, `core.schedule`, then in one write: requeue the
        preempted, bind what was placed, and leave every waiting job its reason (a blocked
        gang's reservation among them). Rolling updates take their step first."""
        self.roll_updates()
        started = time.perf_counter()
        placed: list[Job] = []  # as they were while pending
        with self._lock:
            now = self.clock.now()
            nodes = self.store.list_nodes()
            by_id, pending = self.active_jobs.read()
            active = tuple(by_id.values())
            leasing = self.leases.context(nodes, active, now) if self.leases is not None else None
            # With nothing pending (no service's replica to replace either), only leases to
            # give back can come of a cycle.
            idle = not pending and not any(services.wanted(j, now) for j in active)
            if idle and (leasing is None or not any(map(managed, leasing.leases))):
                return CycleResult(bindings=(), unschedulable=())
            decided = None
            if self.cycles is not None:
                try:
                    decided = self.cycles.decide(now=now, leasing=leasing)
                except WorkerLost as e:
                    log.warning("%s: this cycle decides in gpuctld's process", e)
                if decided is not None:
                    # The worker may have read jobs submitted since `active` was.
                    by_id = self.active_jobs.by_id()
            if decided is None:
                decided = decide(list(active), list(nodes), self.policy, now=now, leasing=leasing)
            result = _as_seen(decided, by_id)
            if result is not decided.result:
                self.wake()  # at once, on what the store holds now
            changed: list[Job] = []
            events: list[Event] = []
            self._requeue_preempted(result, by_id, now, changed, events)
            ports = _Ports(self.settings, self.active_jobs)
            for binding in result.bindings:
                job = by_id[binding.job_id]
                if job.spec.kind is JobKind.INFERENCE:
                    binding = replace(binding, placement=ports.give(binding.placement))
                if job.state is not JobState.PENDING:  # a running service's replacements
                    merged = services.merge(job, binding.placement, now)
                    changed.append(merged)
                    where = _where(merged.placement, after=job.placement)
                    why = f"{where}; {binding.placement.reason}"
                    events.append(_job_event(job, now, "ReplicaScheduled", why))
                    log.info(
                        "job %d: replacement replica(s) placed: %s",
                        job.id,
                        where,
                        extra={"job_id": job.id},
                    )
                    continue
                placed.append(job)
                port = self.settings.master_port_base + job.id % self.settings.master_port_range
                placement = replace(binding.placement, master_port=port)
                changed.append(
                    replace(
                        job,
                        state=next_job_state(job.id, job.state, JobEvent.BIND),
                        placement=placement,
                        reason="",
                        updated_at=now,
                    )
                )
                where = _where(placement)
                events.append(_job_event(job, now, "Scheduled", f"{where}; {placement.reason}"))
                log.info(
                    "job %d placed: %s (%s)",
                    job.id,
                    where,
                    placement.reason,
                    extra={"job_id": job.id},
                )
            let_go = False
            told: list[tuple[Job, Event]] = []  # waiting jobs, each with its new reason
            for miss in result.unschedulable:  # only reasons that changed (cycleproc.decide)
                job = by_id[miss.job_id]
                event = _job_event(job, now, "Unschedulable", miss.reason)
                if job.state is JobState.PENDING:
                    told.append((replace(job, reason=miss.reason, updated_at=now), event))
                    continue
                # No place but where the ended replicas were: they let go of it now.
                released = services.let_go(job)
                let_go = let_go or released is not job
                changed.append(replace(released, reason=miss.reason, updated_at=now))
                events.append(event)
            if self.leases is not None:
                events.extend(self.leases.apply(result, now))
            if changed or events:
                self._write(changed, events)
            # Then why the rest wait, REASONS_A_WRITE at a time: a cycle telling thousands of
            # new jobs why they wait would otherwise hold the store's commit, and every submit
            # queued behind it, for as long (~100 ms for 600 on PostgreSQL).
            for start in range(0, len(told), REASONS_A_WRITE):
                chunk = told[start : start + REASONS_A_WRITE]
                self._write([j for j, _ in chunk], [e for _, e in chunk])
        if self.observer is not None:
            self.observer.cycle(time.perf_counter() - started, result, placed, now)
        if let_go:
            self.wake()
        return result

    def _requeue_preempted(
        self,
        result: CycleResult,
        active: dict[int, Job],
        now: datetime,
        changed: list[Job],
        events: list[Event],
    ) -> None:
        """Each victim back to PENDING as a new attempt; the heartbeat then tells its agents to
        stop the old attempt (`_should_run`), as for a job requeued off a lost node."""
        attempts = _NewAttempts(self, now)
        for preemption in result.preemptions:
            job = active[preemption.job_id]
            state = next_job_state(job.id, job.state, JobEvent.PREEMPT)
            changed.append(attempts.next(job, state, preemption.reason))
            why = f"{preemption.reason}; requeued as attempt {job.attempt + 1}"
            events.append(_job_event(job, now, "Preempted", why))
            log.info("job %d %s", job.id, why, extra={"job_id": job.id})
        attempts.charge()

    def expire_heartbeats(self) -> list[str]:
        """Nodes silent past the timeout become LOST; their jobs are requeued or failed."""
        now = self.clock.now()
        cutoff = now - timedelta(seconds=self.settings.heartbeat_timeout_s)
        lost: list[str] = []
        with self._lock:
            for node in self.store.list_nodes():
                if node.state not in (NodeState.READY, NodeState.DRAINING, NodeState.DEGRADED):
                    continue
                if node.last_heartbeat is None or node.last_heartbeat >= cutoff:
                    continue
                if self._leading_since is not None and self._leading_since >= cutoff:
                    continue
                silent = int((now - node.last_heartbeat).total_seconds())
                why = f"no heartbeat for {silent}s (timeout {self.settings.heartbeat_timeout_s:g}s)"
                self.store.put_node(
                    replace(
                        node,
                        state=next_node_state(node.id, node.state, NodeEvent.HEARTBEAT_MISSED),
                        state_reason=why,
                    )
                )
                self.store.add_events([_node_event(node.id, now, "NodeLost", why)])
                log.warning("node %s lost: %s", node.id, why, extra={"node_id": node.id})
                lost.append(node.id)
            if lost:
                self._fail_over(set(lost), now)
        if lost:
            self.wake()
        return lost

    def purge_history(self) -> tuple[int, int, int]:
        """Retention: delete jobs finished longer ago than `job_retention_s` with their events
        and logs, nodes' and leases' events as old, and audit entries older than
        `audit_retention_s`. Returns (jobs, events, entries)."""
        now = self.clock.now()
        jobs = events = entries = 0
        for _ in range(PURGE_BATCHES):
            ids: tuple[int, ...] = ()
            gone = done = 0
            if self.settings.job_retention_s:
                before = now - timedelta(seconds=self.settings.job_retention_s)
                with self._lock:
                    ids = self.store.purge_finished_jobs(before, limit=PURGE_BATCH)
                for job_id in ids:
                    self.logs.remove(job_id)
                gone = self.store.purge_events(("node", "lease"), before, limit=PURGE_BATCH)
            if self.settings.audit_retention_s:
                before = now - timedelta(seconds=self.settings.audit_retention_s)
                done = self.store.purge_audit(before, limit=PURGE_BATCH)
            jobs, events, entries = jobs + len(ids), events + gone, entries + done
            if max(len(ids), gone, done) < PURGE_BATCH:
                break
        if jobs or events or entries:
            log.info(
                "retention: deleted %d finished job(s), %d node and lease events and %d audit "
                "entries",
                jobs,
                events,
                entries,
            )
        return jobs, events, entries

    def enforce_time_limits(self) -> list[int]:
        now = self.clock.now()
        hit: list[int] = []
        with self._lock:
            changed, events = [], []
            for job in self.active_jobs.holding():
                limit = job.spec.time_limit_s
                if job.state is not JobState.RUNNING or not limit or job.started_at is None:
                    continue
                if now - job.started_at < timedelta(seconds=limit):
                    continue
                why = f"time limit of {_duration(limit)} reached"
                changed.append(
                    replace(
                        job,
                        state=next_job_state(job.id, job.state, JobEvent.TIME_LIMIT),
                        reason=why + "; stopping ranks",
                        end_state=JobState.TIMEOUT,
                        updated_at=now,
                    )
                )
                events.append(_job_event(job, now, "TimeLimit", why + "; stopping ranks"))
                hit.append(job.id)
            if changed:
                self._write(changed, events)
        return hit

    def keep_leases(self) -> list[str]:
        """A lease past its provider's end is EXPIRED and its node drained; returns their ids.

        The lease keeper (`runtime.leases`) runs this in its tick, after renewing what it can."""
        now = self.clock.now()
        expired: list[str] = []
        with self._lock:
            for lease in self.store.list_leases():
                if (
                    lease.state is not LeaseState.ACTIVE
                    or lease.expires_at is None
                    or lease.expires_at > now
                ):
                    continue
                self.store.put_lease(
                    replace(lease, state=LeaseState.EXPIRED, released_at=lease.expires_at)
                )
                why = f"lease {lease.id} expired at {lease.expires_at:%Y-%m-%d %H:%M:%S}Z"
                try:
                    node = self.store.get_node(lease.node_id)
                except NotFound:
                    node = None
                if node is not None and node.state in (
                    NodeState.READY,
                    NodeState.DRAINING,
                    NodeState.DEGRADED,
                ):
                    self.store.put_node(
                        replace(
                            node,
                            state=next_node_state(node.id, node.state, NodeEvent.DRAIN),
                            state_reason=why,
                        )
                    )
                self.store.add_events([_node_event(lease.node_id, now, "LeaseExpired", why)])
                log.warning("%s; node %s drained", why, lease.node_id)
                expired.append(lease.id)
        if expired:
            log.info("leases: $%.2f accrued so far", self.lease_costs())
        return expired

    def lease_costs(self) -> float:
        """Dollars accrued by every lease so far (`cost` splits them among the jobs)."""
        now = self.clock.now()
        total = 0.0
        for lease in self.store.list_leases(include_released=True):
            if lease.acquired_at is not None:
                end = lease.released_at or now
                total += (
                    max(0.0, (end - lease.acquired_at).total_seconds())
                    / 3600
                    * lease.price_per_hour
                )
        return total

    def cost(self, *, since: datetime | None = None, by: CostBy = CostBy.JOB) -> CostReport:
        """What each job (grouped `by` job, queue or user) was charged since `since`, and what
        every lease accrued over the same window."""
        now = self.clock.now()
        ended = self.store.list_charges(since=since)
        charged = charges(self.jobs(), self.node_prices(), now=now, since=since, ended=ended)
        leases = self.store.list_leases(include_released=True)
        return report(charged, leases, by, now=now, since=since)

    def jobs(self, *, queue: str = "") -> Iterator[Job]:
        """Every job (of `queue`), page by page."""
        token = ""
        while True:
            page = self.store.list_jobs(queue=queue, page_size=1000, page_token=token)
            yield from page.jobs
            if not page.next_page_token:
                return
            token = page.next_page_token

    def node_prices(self) -> dict[str, NodePrice]:
        """Every node's GPU count and price per hour (a leased node's is its lease's)."""
        return prices_of(self.store.list_nodes())

    def write_jobs(self, jobs: Sequence[Job], events: Sequence[Event]) -> tuple[Job, ...]:
        """Write changed jobs and their events, and tell the watchers (call under `lock`)."""
        return self._write(jobs, events)

    # -- internals -----------------------------------------------------------------------

    def _respec(self, job: Job, events: Sequence[Event]) -> Job:
        """`_write` of one job whose spec changed (scaled, updated, rolled back)."""
        written = self.store.respec_job(end_ranks(job, self.clock.now()), events)
        self.feed.publish([written])
        return written

    def _write(self, jobs: Sequence[Job], events: Sequence[Event]) -> tuple[Job, ...]:
        now = self.clock.now()
        written = self.store.update_jobs([end_ranks(j, now) for j in jobs], events)
        self.feed.publish(written)
        return written

    def _dry_run(self, spec: JobSpec, now: datetime) -> str:
        """Where a job of `spec` would land if submitted now (behind the queue as it is), or
        why it would wait: a cycle decided in here on the store as it is, nothing written."""
        probe = Job(id=DRY_RUN_ID, spec=spec, created_at=now)
        with self._lock:
            active, nodes = self.active_jobs(), self.store.list_nodes()
        result = decide([*active, probe], list(nodes), self.policy, now=now, leasing=None).result
        placed = next((b.placement for b in result.bindings if b.job_id == DRY_RUN_ID), None)
        if placed is not None:
            return f"would start now: {_where(placed)}; {placed.reason}"
        why = next((m.reason for m in result.unschedulable if m.job_id == DRY_RUN_ID), "")
        if self.leases is not None and self.leases.offers:
            why += " (the cycle may lease nodes for it)"
        return f"would wait: {why}"

    def _check_queue(self, spec: JobSpec) -> None:
        known = self.settings.queues
        if known and spec.queue not in known:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "spec.queue",
                        f"unknown queue {spec.queue!r}; the queues: {', '.join(known)}",
                    )
                ]
            )

    def _never_runs(self, spec: JobSpec, now: datetime) -> str:
        """`feasibility.never_runs` on the fleet by kind, read again after `FLEET_TTL_S` or a
        registration (a node that changes its profile otherwise counts as it was for up to
        that long); alike specs share a verdict meanwhile."""
        cached = self._fleet
        if cached is None or (now - cached[0]).total_seconds() > FLEET_TTL_S:
            cached = self._fleet = (now, FleetKinds.of(self.store.list_nodes()), {})
        key = shape(spec)
        why = cached[2].get(key)
        if why is None:
            if len(cached[2]) >= MAX_VERDICTS:  # many shapes at once: memory stays bounded
                cached[2].clear()
            offers = self.leases.offers if self.leases is not None else ()
            why = cached[2][key] = never_runs(spec, cached[1], offers, self.policy)
        return why

    def _nodes_by_id(self, ids: Sequence[str] | None = None) -> dict[str, Node]:
        """The nodes (of `ids`: a job's, not the fleet's, where that is all that is needed)."""
        return {n.id: n for n in self.store.list_nodes(ids)}

    def _should_run(self, job: Job | None, ref: RankRef, node_id: str) -> bool:
        if (
            job is None
            or job.attempt != ref.attempt
            or job.state is not JobState.RUNNING
            or job.placement is None
        ):
            return False
        # A rank that ended (a service's replica lost with its node, back now) stays stopped.
        return any(
            r.rank == ref.rank and r.node_id == node_id and r.state is not RankState.LOST
            for r in job.placement.ranks
        )

    def _settle(self, job: Job, now: datetime, events: list[Event]) -> Job:
        """Move a job whose ranks changed to the state its ranks imply."""
        assert job.placement is not None
        if job.state is JobState.RUNNING and services.is_service(job):
            settled = services.settle(job, now)
            events.extend(_job_event(job, now, t, m) for t, m in settled.events)
            return settled.job
        ranks = job.placement.ranks
        done = [r for r in ranks if r.state in (RankState.EXITED, RankState.LOST)]
        if job.state is JobState.RUNNING:
            failed = next((r for r in done if r.exit_code != 0), None)
            if failed is not None:
                how = exit_text(failed.exit_code, failed.message)
                why = f"rank {failed.rank} on {failed.node_id} {how}"
                events.append(_job_event(job, now, "Failed", why))
                return replace(
                    job,
                    state=next_job_state(job.id, job.state, JobEvent.RANK_FAILED),
                    reason=why,
                    exit_code=failed.exit_code,
                    finished_at=now,
                )
            if len(done) == len(ranks):
                events.append(
                    _job_event(job, now, "Succeeded", f"all {len(ranks)} ranks exited with 0")
                )
                return replace(
                    job,
                    state=next_job_state(job.id, job.state, JobEvent.ALL_EXITED_OK),
                    exit_code=0,
                    finished_at=now,
                )
        elif job.state is JobState.CANCELLING and len(done) == len(ranks):
            timeout = job.end_state is JobState.TIMEOUT
            event = JobEvent.STOPPED_AT_LIMIT if timeout else JobEvent.STOPPED
            events.append(
                _job_event(job, now, "TimedOut" if timeout else "Cancelled", "every rank stopped")
            )
            return replace(
                job,
                state=next_job_state(job.id, job.state, event),
                finished_at=now,
                reason=job.reason.replace("; stopping ranks", "") or "cancelled",
            )
        return job

    def _apply_health(
        self,
        node: Node,
        issues: tuple[str, ...],
        profile: BandwidthProfile | None,
        now: datetime,
    ) -> Node:
        """`node` with what its agent's health check found: DEGRADED while a READY node has
        issues, READY again when they clear; a DRAINING node only records them."""
        events: list[Event] = []
        if profile is not None:
            if replace(profile, measured_at=None) != replace(node.profile, measured_at=None):
                change = _profile_line(profile)
                if change == _profile_line(node.profile):
                    change += "; per-GPU or port details changed"
                else:
                    change += f" (was {_profile_line(node.profile)})"
                events.append(_node_event(node.id, now, "Reprofiled", change))
            node = replace(node, profile=profile)
        if issues:
            moved = issues != node.health_issues or node.state is NodeState.READY
            event = NodeEvent.DEGRADE
        else:
            moved = bool(node.health_issues) or node.state is NodeState.DEGRADED
            event = NodeEvent.RECOVER
        if not moved:
            if events:
                self.store.add_events(events)
            return node
        state = next_node_state(node.id, node.state, event)
        summary = _issues_line(issues)
        if state is NodeState.DEGRADED:
            reason = summary
            events.append(_node_event(node.id, now, "Degraded", "; ".join(issues)))
            log.warning(
                "node %s degraded: %s", node.id, "; ".join(issues), extra={"node_id": node.id}
            )
        elif issues:  # draining: the operator's reason stands
            reason = node.state_reason
            events.append(_node_event(node.id, now, "HealthIssues", "; ".join(issues)))
            log.warning(
                "node %s (%s): %s",
                node.id,
                state.value,
                "; ".join(issues),
                extra={"node_id": node.id},
            )
        else:
            reason = "" if state is NodeState.READY else node.state_reason
            events.append(_node_event(node.id, now, "Recovered", "health issues cleared"))
            log.info(
                "node %s recovered: health issues cleared", node.id, extra={"node_id": node.id}
            )
        self.store.add_events(events)
        return replace(node, state=state, state_reason=reason, health_issues=issues)

    def _fail_over(
        self,
        nodes: set[str],
        now: datetime,
        *,
        why: str = "lost",
        event_type: str = "NodeLost",
        cancelling_too: bool = True,
    ) -> None:
        """Requeue or fail, per their spec, the jobs with ranks on `nodes`; the job's reason
        reads "node a <why>". `cancelling_too`: also settle cancelling jobs, whose ranks on a
        lost node will never report; a live agent (degraded node) stops them as usual."""
        changed, events = [], []
        attempts = _NewAttempts(self, now)
        for job in self.active_jobs():
            if job.placement is None or not nodes.intersection(job.placement.node_ids):
                continue
            where = ", ".join(sorted(nodes.intersection(job.placement.node_ids)))
            if job.state is JobState.RUNNING and services.is_service(job):
                # The service keeps its other replicas; these are replaced elsewhere.
                lost = services.lose(job, nodes, now, why)
                if lost is not job:
                    why_ = f"replica(s) on node {where} {why}; replaced elsewhere"
                    events.append(_job_event(job, now, event_type, why_))
                    changed.append(self._settle(lost, now, events))
                continue
            if job.state is JobState.CANCELLING:
                if not cancelling_too:
                    continue
                # Its ranks there will never report: stopped, as it was to be.
                timeout = job.end_state is JobState.TIMEOUT
                event = JobEvent.STOPPED_AT_LIMIT if timeout else JobEvent.NODE_LOST_FAIL
            else:
                event = (
                    JobEvent.NODE_LOST_REQUEUE
                    if job.spec.on_node_lost is OnNodeLost.REQUEUE
                    else JobEvent.NODE_LOST_FAIL
                )
            state = next_job_state(job.id, job.state, event)
            if state is JobState.PENDING:
                reason = f"requeued: node {where} {why} (attempt {job.attempt + 1})"
                changed.append(attempts.next(job, state, reason))
            else:
                reason = f"node {where} {why}"
                lost = services.lose(job, nodes, now, why)  # its ranks there: LOST, truly
                changed.append(
                    replace(lost, state=state, reason=reason, finished_at=now, updated_at=now)
                )
            events.append(_job_event(job, now, event_type, reason))
            log.warning("job %d: %s", job.id, reason, extra={"job_id": job.id})
        if changed:
            attempts.charge()
            self._write(changed, events)

    def _lease_active(self, lease_id: str) -> bool:
        if not lease_id:
            return False
        return any(
            lease.id == lease_id and lease.state is LeaseState.ACTIVE
            for lease in self.store.list_leases()
        )

    def _open_static_lease(self, node: Node, now: datetime) -> str:
        """A node that registers by itself is static capacity: account for it from now."""
        lease_id = f"{node.provider}-{node.id}-{int(now.timestamp())}"
        self.store.put_lease(
            NodeLease(
                id=lease_id,
                provider=node.provider,
                node_id=node.id,
                sku=node.sku,
                price_per_hour=node.price_per_hour,
                acquired_at=now,
                state=LeaseState.ACTIVE,
            )
        )
        return lease_id


class _Ports:
    """Ports for new inference replicas: on each node, the lowest of the configured range
    that no live replica there has (nor one given in this cycle)."""

    def __init__(self, settings: ControllerSettings, active: ActiveJobs) -> None:
        self._settings = settings
        self._active = active
        self._taken: dict[str, set[int]] = {}

    def give(self, placement: Placement) -> Placement:
        ranks = []
        for r in placement.ranks:
            taken = self._taken.get(r.node_id)
            if taken is None:
                taken = self._taken[r.node_id] = {
                    x.port
                    for j in self._active.holding(r.node_id)
                    for x in (j.placement.ranks if j.placement is not None else ())
                    if x.node_id == r.node_id and x.live and x.port
                }
            base, size = self._settings.replica_port_base, self._settings.replica_port_range
            port = next((p for p in range(base, base + size) if p not in taken), 0)
            taken.add(port)
            ranks.append(replace(r, port=port))
        return replace(placement, ranks=tuple(ranks))


def _as_seen(decided: Decided, active: dict[int, Job]) -> CycleResult:
    """The decision, if every job it names is still as the decider read it; otherwise only
    the reasons of the jobs that are (the controller's lock makes this rare: only a decision
    read from another process can be behind)."""
    stale = {i for i, rev in decided.seen.items() if i not in active or active[i].revision != rev}
    if not stale:
        return decided.result
    log.warning("cycle decided on jobs changed since (%s): nothing bound this time", sorted(stale))
    result = decided.result
    return CycleResult(
        unschedulable=tuple(m for m in result.unschedulable if m.job_id not in stale),
        reservations=result.reservations,
        lease_releases=result.lease_releases,
        lease_kept=result.lease_kept,
    )


def _ref_key(ref: RankRef) -> tuple[int, int, int]:
    return (ref.job_id, ref.rank, ref.attempt)


def _check_changeable(job: Job, doing: str) -> None:
    """An inference job may be scaled or updated while pending, or running as a service."""
    if job.state.finished or job.state is JobState.CANCELLING:
        raise FailedPrecondition(f"job {job.id} is {job.state.value}: nothing to {doing}")
    if job.state is JobState.RUNNING and not services.is_service(job):
        raise FailedPrecondition(
            f"job {job.id} runs with restart policy never: its replicas are fixed"
        )


def _where(placement: Placement, *, after: Placement | None = None) -> str:
    """ "rank:node[GPUs]" of each rank of `placement` (not in `after`)."""
    known = {r.rank for r in after.ranks} if after is not None else set()
    return ", ".join(
        f"{r.rank}:{r.node_id}[{_gpus(r)}]" for r in placement.ranks if r.rank not in known
    )


def _gpus(rank: RankPlacement) -> str:
    if not rank.gpu_indices:
        return "no GPU"
    ids = ",".join(str(i) for i in rank.gpu_indices)
    return f"GPU {ids} @{rank.gpu_milli}m" if rank.gpu_milli < 1000 else f"GPU {ids}"


def _issues_line(issues: Sequence[str]) -> str:
    """The first issue, and how many more: short enough for a node's one-line reason."""
    if len(issues) <= 1:
        return "".join(issues)
    return f"{issues[0]}; {len(issues) - 1} more issue{'s' if len(issues) > 2 else ''}"


def _profile_line(p: BandwidthProfile) -> str:
    gpus = f"{len(p.gpus)}x {p.gpu_model}" if p.gpus else "no GPUs"
    return (
        f"{gpus}, HBM {p.hbm_gbps:g} GB/s, NVLink {p.nvlink_gbps:g} GB/s, "
        f"network {p.network.total_gbps:g} Gb/s"
    )


def _duration(seconds: int) -> str:
    return str(timedelta(seconds=seconds))


def _job_event(job: Job, now: datetime, type_: str, message: str) -> Event:
    return Event(object_kind="job", object_id=str(job.id), time=now, type=type_, message=message)


def _node_event(node_id: str, now: datetime, type_: str, message: str) -> Event:
    return Event(object_kind="node", object_id=node_id, time=now, type=type_, message=message)


__all__ = [
    "Assignment",
    "Controller",
    "ControllerSettings",
    "HeartbeatResult",
    "JobFeed",
    "RankRef",
]


class _NewAttempts:
    """Jobs moved to a new attempt (preempted, requeued off a lost node): each forgets where its
    last attempt ran, so that attempt is charged as it ends and kept (`charge`)."""

    def __init__(self, controller: Controller, now: datetime) -> None:
        self._controller = controller
        self._now = now
        self._prices: dict[str, NodePrice] | None = None
        self._ended: list[AttemptCharge] = []

    def next(self, job: Job, state: JobState, reason: str) -> Job:
        """`job` as its next attempt, in `state` (pending), its last one charged."""
        if self._prices is None:
            self._prices = self._controller.node_prices()
        ended = attempt_charge(job, self._prices, ended_at=self._now)
        if ended is not None:
            self._ended.append(ended)
        return replace(
            job,
            state=state,
            attempt=job.attempt + 1,
            placement=None,
            reason=reason,
            started_at=None,
            updated_at=self._now,
        )

    def charge(self) -> None:
        """Keep what the ended attempts were charged (before the jobs are written: a retry
        writes the same records again, once each)."""
        self._controller.store.add_charges(self._ended)
