"""The scheduling cycle's decision (`core.schedule`) in a process of its own.

In gpuctld's process a cycle over a long queue is a stretch of pure Python that holds the
interpreter lock (0.2 s at 30,000 pending jobs): every call in flight waits it out, and a
storm of submits ran at half its rate with a p99 of 0.4 s. The worker process keeps its own
copy of the active jobs (from the store, as `ActiveJobs` does: only what changed since is read)
and the nodes, decides, and sends back the decisions, whose unschedulable reasons it cuts to
those that changed; it keeps a quiet cycle for a few seconds to tell jobs queued since where
they stand without going through the whole queue again (`Decider`, core.cycle.Carried).
gpuctld applies the decisions as before, under its lock, after checking that every job they
name is as the worker saw it.

The worker only reads the store. It is started by the leader, restarted when it dies (the
cycle that found it dead decides in gpuctld's process instead), and stops with gpuctld.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

from gpuctl.core import services
from gpuctl.core.cycle import Carried, CycleResult, Unschedulable, schedule, schedule_carrying
from gpuctl.core.leasing import Leasing
from gpuctl.core.model import Job, JobState, Node
from gpuctl.core.plugins import Policy
from gpuctl.core.snapshot import Snapshot

log = logging.getLogger(__name__)

# A cycle at 100,000 pending jobs takes seconds; one that takes this long is stuck, and the
# worker is replaced.
CYCLE_TIMEOUT_S = 300.0
# A decision with nothing new to decide runs a full cycle when the kept one is this old: the
# periodic cycle (every 5 s by default) then pays for the full cycles, and the submits between
# find a kept cycle younger than core.cycle.CARRY_S.
REFRESH_S = 2.0


@dataclass(frozen=True, slots=True)
class Decided:
    """A cycle's result, and the revision of every job it names as the worker read it."""

    result: CycleResult
    seen: dict[int, int]


class CycleProcess:
    """A worker process deciding cycles over the store at `store_url` with `policy`."""

    def __init__(self, store_url: str, policy: Policy) -> None:
        self._store_url = store_url
        self._policy = policy
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._proc: Any = None

    def decide(self, *, now: datetime, leasing: Leasing | None) -> Decided:
        """The worker's decision for the store as it is now; raises `WorkerLost` if the worker
        died or hung (a new one starts with the next call)."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            assert self._conn is not None
            try:
                self._conn.send((now, leasing))
                if not self._conn.poll(CYCLE_TIMEOUT_S):
                    raise WorkerLost(f"no decision in {CYCLE_TIMEOUT_S:.0f} s")
                ok, payload = self._conn.recv()
            except (EOFError, OSError) as e:
                self._stop()
                raise WorkerLost(f"the cycle worker is gone ({e or type(e).__name__})") from e
            except WorkerLost:
                self._stop()
                raise
            if not ok:  # the worker's own error, as text: it stays up
                raise RuntimeError(f"cycle worker: {payload}")
            return payload

    def start(self) -> None:
        """Start the worker now (its imports take a second), not at the first cycle, which
        holds the controller's lock while it waits."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        self._stop()
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(child, self._store_url, self._policy),
            name="gpuctld-cycle",
            daemon=True,
        )
        self._proc.start()
        child.close()
        log.info("cycle worker started (pid %d)", self._proc.pid)

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join(10)
            self._proc = None


class WorkerLost(RuntimeError):
    pass


def decide(
    jobs: list[Job], nodes: list[Node], policy: Policy, *, now: datetime, leasing: Leasing | None
) -> Decided:
    """The decision itself, from scratch."""
    given = services.cycle_input(jobs, now)
    snapshot = Snapshot.build(nodes, given.holding)
    result = schedule(snapshot, given.pending, policy, now=now, leasing=leasing)
    return _decided(result, {j.id: j for j in jobs}, now)


class Decider:
    """What the worker runs on its copy of the store: `decide`, except that a quiet cycle is
    kept (core.cycle.Carried), and while nothing has changed since but jobs queued, it says
    what becomes of them without going through the whole queue again: with a long queue that
    nothing can start from, a submit is told where it stands in milliseconds instead of a
    cycle over every pending job (~8 us each).

    A kept cycle older than REFRESH_S is renewed: in the decision that finds it so, or, with
    `renew_aside`, on a thread of its own (`_Renewal`) while the old one goes on answering,
    so that no submit waits for a renewal (0.3 s at 30,000 pending jobs). A renewal is taken
    up at the next decision if it is quiet too and says of the jobs the old one answered
    since what the old one said; else the old one is kept, to its CARRY_S."""

    def __init__(self, policy: Policy, *, renew_aside: bool = False) -> None:
        self._policy = policy
        self._carry: _Carry | None = None
        self._renew_aside = renew_aside
        self._renewal: _Renewal | None = None
        self.carried = 0  # decisions the kept cycle made (for tests)
        self.renewed = 0  # renewals made aside and taken up (for tests)

    def decide(
        self,
        jobs: list[Job],
        nodes: list[Node],
        *,
        now: datetime,
        leasing: Leasing | None,
        by_id: Mapping[int, Job] | None = None,
    ) -> Decided:
        """`by_id`: the same jobs by id, where the caller has them (else made here)."""
        by_id = by_id if by_id is not None else {j.id: j for j in jobs}
        given = services.cycle_input(jobs, now)
        told = self._take_renewal()
        if self._carry is not None and leasing is None:
            said = self._carry.decide(given, nodes, now, aged=self._renew_aside)
            if said is not None:
                self.carried += 1
                if self._renew_aside and self._carry.carried.age(now) >= REFRESH_S:
                    self._renew(given, nodes, now)
                # With the reasons a renewal taken up gives the jobs it read (time moves some):
                # only those that changed go to gpuctld (`_decided`).
                if told:
                    waiting = {j.id for j in given.pending}
                    told = tuple(u for u in told if u.job_id in waiting)
                return _decided(CycleResult(unschedulable=(*told, *said)), by_id, now)
        self._carry = None
        if self._renewal is not None:
            self._renewal.wanted = False  # made from an older view: of no use now
        snapshot = Snapshot.build(nodes, given.holding)
        result, carried = schedule_carrying(
            snapshot, given.pending, self._policy, now=now, leasing=leasing
        )
        if carried is not None:
            self._carry = _Carry.of(carried, nodes, given)
        return _decided(result, by_id, now)

    def wait_renewal(self, timeout: float | None = None) -> None:
        """Until a renewal made aside has finished (tests; the worker never waits)."""
        if self._renewal is not None:
            self._renewal.thread.join(timeout)

    def _renew(self, given: services.CycleInput, nodes: list[Node], now: datetime) -> None:
        if self._renewal is None:  # one at a time: a renewal is a whole cycle's work
            self._renewal = _Renewal(self._policy, given, nodes, now)

    def _take_renewal(self) -> tuple[Unschedulable, ...]:
        """Take up a renewal made aside that has finished, where it can be: the reasons it
        gave the jobs it read."""
        renewal = self._renewal
        if renewal is None or renewal.thread.is_alive():
            return ()
        self._renewal = None
        if not renewal.wanted or self._carry is None:
            return ()
        if renewal.error is not None:
            log.warning("renewing the kept cycle failed: %s", renewal.error)
            return ()
        if renewal.carry is None:  # no longer quiet: this decision runs a full cycle
            self._carry = None
            return ()
        # What the old one told the jobs queued since the renewal read them, the new one must
        # tell them too, as it would have had they been there.
        if not renewal.carry.answer(self._carry.answered(since=renewal.carry)):
            return ()
        self._carry = renewal.carry
        self.renewed += 1
        return renewal.reasons


class _Renewal:
    """A full cycle over `given` and `nodes` at `now`, on a thread of its own: `carry` is
    then the kept cycle, or None where the cycle was not quiet."""

    def __init__(
        self, policy: Policy, given: services.CycleInput, nodes: list[Node], now: datetime
    ) -> None:
        self.carry: _Carry | None = None
        self.reasons: tuple[Unschedulable, ...] = ()  # of every job it read
        self.error: BaseException | None = None
        self.wanted = True
        self.thread = threading.Thread(
            target=self._run, args=(policy, given, nodes, now), name="cycle-renewal", daemon=True
        )
        self.thread.start()

    def _run(
        self, policy: Policy, given: services.CycleInput, nodes: list[Node], now: datetime
    ) -> None:
        try:
            snapshot = Snapshot.build(nodes, given.holding)
            result, carried = schedule_carrying(snapshot, given.pending, policy, now=now)
            if carried is not None:
                self.carry = _Carry.of(carried, nodes, given)
                self.reasons = result.unschedulable
        except Exception as e:  # logged by the decider that takes it up
            self.error = e


@dataclass(slots=True)
class _Carry:
    """A kept cycle, the nodes and jobs it read, and what it told jobs queued since."""

    carried: Carried
    nodes: tuple[Node, ...]
    holding: dict[int, Job]
    pending: dict[int, Job]
    said: dict[int, Unschedulable] = field(default_factory=dict)

    @classmethod
    def of(cls, carried: Carried, nodes: list[Node], given: services.CycleInput) -> _Carry:
        return cls(
            carried,
            nodes=_as_read(nodes),
            holding={j.id: j for j in given.holding},
            pending={j.id: j for j in given.pending},
        )

    def answered(self, since: _Carry) -> list[tuple[Job, Unschedulable]]:
        """The jobs this one answered that `since` did not read, in the order answered."""
        return [(self.pending[i], u) for i, u in self.said.items() if i not in since.pending]

    def answer(self, told: list[tuple[Job, Unschedulable]]) -> bool:
        """Take in jobs another kept cycle answered: whether this one says the same of each
        (if not, it must not be used)."""
        for job, before in told:
            if self.carried.decide(job) != before:
                return False
            self.pending[job.id] = job
            self.said[job.id] = before
        return True

    def decide(
        self, given: services.CycleInput, nodes: list[Node], now: datetime, *, aged: bool = False
    ) -> list[Unschedulable] | None:
        """The reasons of the jobs queued since, if nothing else changed and each waits
        holding nothing; else None (a full cycle decides). With nothing new, a cycle older
        than REFRESH_S says None too, unless `aged` (it is renewed aside)."""
        if not self.carried.fresh(now) or _as_read(nodes) != self.nodes:
            return None
        if len(given.holding) != len(self.holding) or not all(
            _same(j, self.holding.get(j.id)) for j in given.holding
        ):
            return None
        new, kept = [], 0
        for job in given.pending:
            before = self.pending.get(job.id)
            if before is None:
                new.append(job)
            elif before is not job and not _same(job, before):  # (the same object: most)
                return None
            else:
                kept += 1
        if kept != len(self.pending):  # one left the queue
            return None
        if not new and not aged and self.carried.age(now) >= REFRESH_S:
            return None
        said = []
        for job in new:
            reason = self.carried.decide(job)
            if reason is None:
                return None
            said.append(reason)
        self.pending.update((j.id, j) for j in new)
        self.said.update((u.job_id, u) for u in said)
        return said


def _as_read(nodes: list[Node]) -> tuple[Node, ...]:
    """The nodes as a cycle reads them: a heartbeat's time changes nothing it decides."""
    return tuple(replace(n, last_heartbeat=None) for n in nodes)


def _same(job: Job, before: Job | None) -> bool:
    """Whether a cycle would read `job` as it read `before` (its reason and the time it was
    written aside: the cycle wrote them)."""
    if job is before:
        return True
    return before is not None and (
        job.spec, job.state, job.attempt, job.placement, job.created_at, job.started_at
    ) == (
        before.spec, before.state, before.attempt, before.placement, before.created_at,
        before.started_at,
    )  # fmt: skip


def _decided(result: CycleResult, by_id: Mapping[int, Job], now: datetime) -> Decided:
    changed = []
    for m in result.unschedulable:
        job = by_id[m.job_id]
        if job.state is not JobState.PENDING:  # a running service's replacements
            m = replace(m, reason=services.waiting_reason(job, m.reason, now))
        # gpuctld writes only the reasons that changed: the rest need not cross the pipe. A
        # service whose ended replicas still hold capacity is always named: it lets go of it.
        if job.reason != m.reason or services.holding_ended(job):
            changed.append(m)
    preemptions = tuple(replace(p, job_id=abs(p.job_id)) for p in result.preemptions)
    result = replace(result, unschedulable=tuple(changed), preemptions=preemptions)
    named = [
        *(b.job_id for b in result.bindings),
        *(m.job_id for m in result.unschedulable),
        *(p.job_id for p in result.preemptions),
    ]
    return Decided(result=result, seen={i: by_id[i].revision for i in named})


def _serve(conn: Connection, store_url: str, policy: Policy) -> None:
    from gpuctl.runtime.controller import ActiveJobs
    from gpuctl.store.sql import open_store

    store = open_store(store_url)
    active = ActiveJobs(store)
    decider = Decider(policy, renew_aside=True)
    try:
        while True:
            try:
                now, leasing = conn.recv()
            except EOFError:  # gpuctld is gone or done with us
                return
            try:
                by_id = active.by_id()
                nodes = list(store.list_nodes())
                decided = decider.decide(
                    list(by_id.values()), nodes, now=now, leasing=leasing, by_id=by_id
                )
                conn.send((True, decided))
            except Exception as e:  # told to gpuctld, which logs it; the next cycle tries again
                conn.send((False, f"{type(e).__name__}: {e}"))
    finally:
        store.close()
