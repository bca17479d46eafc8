"""One scheduling cycle: pending jobs in queue order, each gang or replica set placed whole
or not at all on a copy of the snapshot (preempting, reserving or backfilling as the policy
says), and for every job left waiting a reason to act on.

The cycle decides what to do with each job; where a job fits, and why not, is the placers'
(`core.placement`); what jobs alike share, and when it stops being true, the engine's
(`core.engine`: the node table, the verdict caches, the cycle's memos).

Budgets (benchmark B2: `gpuctl simulate scale`, README "Performance"; a 2-core x86 VM, 10,000
nodes of 8 GPUs, 60 % used, the default policy), each with how it is spent:

- a full cycle over 10,000 pending jobs <= 1 s: 100 us a job on average. In a steady cycle
  most jobs cannot start, and such a job costs ~20 us: its shape and held nodes (`signature`)
  looked up in `misses`, `no_room` and `behind` (jobs alike in everything placement reads fail
  alike until a preemption frees something; candidates and the snapshot without them are
  kept per priority), a reason joined: ~0.2 s for 10,000. Fixed costs: the node table
  (~3 us a node, 30 ms), the queue order (~50 ms), one reservation plan (~0.1 s). That leaves
  ~0.5 s for the few hundred jobs a steady cycle places, at ~1 ms each (below). A burst cycle
  that places thousands must place a job in ~0.2 ms: the next budget. The garbage collector
  is kept off for the cycle (it makes no reference cycles; its passes cost ~0.1 s);
- >= 1,000 inference replicas placed a second, so <= 1 ms a replica, and ~0.2 ms a job in a
  burst: bring the verdicts of the job's rank shape up to date for the rows changed since
  that shape last looked (the nodes that took jobs in between: ~20-80 us, a few rows node by
  node, more by columns; the packing score remembers node states per node kind), the best
  row read off the cached scores (one argmax, ~5 us), the node that took a replica asked
  again by the filters that read what is free and the per-node scores (~10 us), the bind
  reusing the nodes the placement worked out (~20 us). No Python loop over the nodes;
- a 512-GPU gang placed in <= 50 ms: the node table (30 ms), one filter and score pass in
  numpy over 10,000 rows (~5 ms), the best gang of each fabric from the arrays (~0.1 ms a
  fabric, 40 fabrics), the cycle's other fixed costs (~5 ms);
- under 1 GiB resident: the cycle adds the node table (~35 int64 columns, ~3 MB at 10,000
  nodes) and per job shape three cached arrays of a row each (~250 kB; ~100 shapes a cycle,
  ~25 MB). The rest is the jobs and nodes handed in (~2 kB a job, ~200 MB at 100,000).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np

from gpuctl.core.backfill import Hold, Planner, Reservation, ends_if_started, ids
from gpuctl.core.engine.fits import PlanFits
from gpuctl.core.engine.memos import CycleMemos, Signature
from gpuctl.core.engine.verdicts import Shape, check, filter_codes, shape
from gpuctl.core.leasing import (
    LeaseBlocks,
    LeasePlan,
    LeaseRelease,
    LeaseRequest,
    Leasing,
    Refused,
    busy_seconds,
    plan_leases,
)
from gpuctl.core.model import Job, JobKind, JobState, Placement
from gpuctl.core.placement import PLACERS, Placer, replicas_fitting
from gpuctl.core.plugins import Code, CycleContext, Policy, RankRequest, plural
from gpuctl.core.preempt import MAX_CANDIDATES, Preemption, Victim, choose_victims
from gpuctl.core.queue import QueueOrder, Usage, placement_gpus
from gpuctl.core.snapshot import NodeView, Snapshot
from gpuctl.core.topology import GangDemand

# Queued gangs whose islands the cycle keeps intact where it can: the next few to start. Each
# costs one filter pass over the idle nodes per cycle.
_QUEUED_GANGS = 4
# How long a quiet cycle may go on deciding jobs queued since (`Carried`): it decides them at
# its own `now`. It only ever says "wait", and as time passes with nothing else changed a job
# can start no sooner (it would end later), except where a running job is past its limit and
# not yet stopped: then a job may be told to wait up to this much longer than it need.
CARRY_S = 10.0

__all__ = [
    "Binding",
    "CycleResult",
    "LeaseRelease",
    "LeaseRequest",
    "Leasing",
    "Preemption",
    "Reservation",
    "Unschedulable",
    "schedule",
    "schedule_carrying",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    job_id: int
    placement: Placement


@dataclass(frozen=True, slots=True, kw_only=True)
class Unschedulable:
    job_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CycleResult:
    bindings: tuple[Binding, ...] = ()
    unschedulable: tuple[Unschedulable, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    preemptions: tuple[Preemption, ...] = ()  # applied before the bindings that need them
    lease_requests: tuple[LeaseRequest, ...] = ()  # scale up: for jobs left waiting
    lease_releases: tuple[LeaseRelease, ...] = ()  # scale down: leases nothing will use
    # Idle leased nodes kept, and why; None: the cycle had no lease phase (leasing=None).
    lease_kept: Mapping[str, str] | None = None


def schedule(
    snapshot: Snapshot,
    pending: Sequence[Job],
    policy: Policy,
    *,
    now: datetime,
    leasing: Leasing | None = None,
) -> CycleResult:
    """Place what fits of `pending`; `snapshot` itself is left as it was.

    1. Sort: order the queue (the policy's queue sort: priority, fair share, age).
    2. Prepare: note the islands the next queued gangs need; prepare the scores for the cycle.
    3. For each job in order, on a copy of the snapshot:
       a. Place it whole or not at all, on nodes no reservation ahead of it needs (backfill);
       b. else preempt the cheapest lower-priority work that makes it fit, if the policy may;
       c. else hold what the policy says (a reservation, or the whole queue) and say why.
       Whatever is placed is assumed, so later jobs see it. A node whose lease ends before
       the job's time limit (and cannot be renewed), is being released, or was leased for
       another waiting job is not used.
    4. Lease (with `leasing`): for each job left waiting that new nodes would start, the offer
       to lease (within its queue's budget); and the leases nothing will use, to give back.
    """
    with _collector_paused():
        return _Cycle(snapshot.copy(), policy, now, leasing).run(pending)


def schedule_carrying(
    snapshot: Snapshot,
    pending: Sequence[Job],
    policy: Policy,
    *,
    now: datetime,
    leasing: Leasing | None = None,
) -> tuple[CycleResult, Carried | None]:
    """`schedule`, and the cycle itself when it was quiet (`Carried`), to decide jobs queued
    since without going through its own again."""
    cycle = _Cycle(snapshot.copy(), policy, now, leasing, keep=True)
    with _collector_paused():
        result = cycle.run(pending)
    quiet = leasing is None and not cycle.mix and not (result.bindings or result.preemptions)
    return result, Carried(cycle) if quiet else None


class Carried:
    """A quiet cycle (it bound, preempted and leased nothing, and placed no replica), kept to
    decide jobs queued since without going through its own jobs again.

    `decide(job)` is what a cycle over the same jobs and `job` would have said of `job` when
    that is to wait holding nothing: then nothing the jobs after it read has changed (it took
    no GPUs, made no reservation, preempted nobody), so they come out as they did, and `job`
    itself is decided as the cycle would have where it stands in the queue order, with the
    holds and reservations of the jobs before it only. A job that would start, preempt or hold
    changes what every job after it sees: `decide` says None, and a full cycle must run. So do
    a replica (its packing reads the queue's mix of shapes) and, where a node is idle, a gang
    among the first queued gangs (whose islands the cycle keeps). The islands only rank the
    places a job could take (the island-guard score, the least damage among a gang's choices),
    and where no node is idle they are all empty. The caller vouches that nothing else
    changed: the nodes, the jobs holding them, the pending jobs; and `now` within CARRY_S of
    the cycle's.
    """

    __slots__ = ("_cycle", "_marks", "_places")

    def __init__(self, cycle: _Cycle) -> None:
        self._cycle = cycle
        self._places = cycle.places  # where each job gone through stands, in order
        # (jobs gone through, holds, reservations) after each job that added to them
        self._marks = cycle.marks

    def age(self, now: datetime) -> float:
        """Seconds since the cycle's `now`."""
        return (now - self._cycle.now).total_seconds()

    def fresh(self, now: datetime) -> bool:
        return 0.0 <= self.age(now) <= CARRY_S

    def decide(self, job: Job) -> Unschedulable | None:
        c = self._cycle
        assert c.order is not None  # a kept cycle has gone through its queue
        if job.spec.kind is JobKind.INFERENCE:
            return None
        place = c.order.place_of(job)
        if place is None:
            return None
        at = bisect_left(self._places, place)
        # A gang among the first queued gangs changes the islands the cycle keeps, unless no
        # node is idle: then every queued gang's island is empty, and which gangs come first
        # changes nothing (a long queue on a busy cluster, the case worth carrying).
        if job.spec.is_gang and c.islands and bisect_left(c.gangs_at, at) < _QUEUED_GANGS:
            return None
        mark = bisect_right(self._marks, (at, math.inf, math.inf)) - 1
        holds, reservations = self._marks[mark][1:] if mark >= 0 else (0, 0)
        kept = c.holds
        c.holds = c.holds[:holds]
        try:
            with c.planner.rewound(reservations):
                outcome = c._assign(job)
        finally:
            c.holds = kept
        if outcome.mode is not Mode.WAITS or outcome.hold is not None:
            return None
        # It stands in the queue now: the places of the jobs decided after it count it.
        self._places.insert(at, place)
        for i in range(mark + 1, len(self._marks)):
            n, h, r = self._marks[i]
            self._marks[i] = (n + 1, h, r)
        c.gangs_at = [p + 1 if p >= at else p for p in c.gangs_at]
        return Unschedulable(job_id=job.id, reason=outcome.reason)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The garbage collector off while a cycle runs, back on after.

    A cycle allocates enough to set the collector off hundreds of times, each pass walking
    what was allocated since, and now and then everything the process holds (~300,000
    objects at 10,000 nodes, ~0.1 s). It would find nothing: a cycle makes no reference
    cycles (a test holds it to that), so all it allocates is freed by reference counting.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Mode(enum.IntEnum):
    """What a job's assignment comes to, ordered as Kueue orders its flavor assignments:
    waiting < fitting once others are preempted < fitting as the cluster is."""

    WAITS = 0
    FITS_AFTER_PREEMPTION = 1
    FITS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """One job's outcome in the cycle (`_Cycle._assign`): where it goes (FITS, and after
    preempting `victims`), or why it waits and what it holds meanwhile."""

    mode: Mode
    placement: Placement | None = None
    victims: tuple[Victim, ...] = ()
    reason: str = ""
    hold: Hold | None = None


class _Cycle:
    """The working state of one cycle; `run` is the whole of it."""

    def __init__(
        self,
        work: Snapshot,
        policy: Policy,
        now: datetime,
        leasing: Leasing | None = None,
        *,
        keep: bool = False,
    ) -> None:
        self.work = work
        self.leasing = leasing
        self.lease_blocks: LeaseBlocks | None = None
        self.barred: set[int] = set()  # waiting on the queue itself: new nodes would not help
        self.base_policy = policy
        self.policy = policy
        self.prepared = False
        self.now = now
        self.planner = Planner(work, now)
        self.holds: list[Hold] = []
        self.demands: tuple[GangDemand, ...] = ()
        self.mix: tuple[tuple[RankRequest, int], ...] = ()  # what frag-aware packs for
        self.eligible_rows: dict[int, np.ndarray] = {}  # queued gang -> its eligible rows
        # Whether any node is idle, READY and on a fabric: where none is, no queued gang has an
        # island to keep, whichever gangs are queued first (`_demands`).
        self.islands = True
        self.start_nodes: tuple[NodeView, ...] = work.nodes
        self.fresh: set[int] = set()  # placed in this cycle: never a victim in it
        self.memos = CycleMemos()  # what jobs alike share, and when it stops being true
        self.bindings: list[Binding] = []
        self.waiting: list[Unschedulable] = []
        self.preemptions: list[Preemption] = []
        # With `keep` (core.cycle.Carried): the queue order, where each job gone through
        # stands in it, where the gangs among them stand, and (jobs gone through, holds,
        # reservations) after each job that added a hold or a reservation.
        self.keep = keep
        self.order: QueueOrder | None = None
        self.places: list[Any] = []
        self.gangs_at: list[int] = []
        self.marks: list[tuple[int, int, int]] = []

    def run(self, pending: Sequence[Job]) -> CycleResult:
        # 1. sort
        order = QueueOrder(pending, self.base_policy.queue_sort, lambda: Usage.of(self.work.jobs()))
        if self.leasing is not None:
            blocks = LeaseBlocks(
                self.leasing,
                frozenset(j.id for j in pending),
                self.now,
                busy_s=busy_seconds(self.work.jobs(), self.now),
            )
            self.lease_blocks = blocks if blocks else None
        # 2. prepare
        if any(j.spec.kind is JobKind.INFERENCE for j in pending):  # only replicas use it
            self.mix = CycleContext.mix_of(itertools.chain(pending, self.work.jobs()))
        gangs = list(
            itertools.islice((j for j in order.preview() if j.spec.is_gang), _QUEUED_GANGS)
        )
        self.demands = self._demands(gangs)
        self._prepare()
        # 3. place, preempt or hold, job by job
        if self.keep:
            self._kept(order)
        else:
            for job in order:
                self._one(job, order)
        # 4. lease
        leases = self._lease({j.id: j for j in pending})
        return CycleResult(
            bindings=tuple(self.bindings),
            unschedulable=tuple(self.waiting),
            reservations=tuple(self.planner.reservations),
            preemptions=tuple(self.preemptions),
            lease_requests=leases.requests,
            lease_releases=leases.releases,
            lease_kept=leases.kept if self.leasing is not None else None,
        )

    def _kept(self, order: QueueOrder) -> None:
        """Step 3, noting what `Carried` needs."""
        self.order = order
        holds = reservations = 0
        for job in order:
            self.places.append(order.last)
            if job.spec.is_gang:
                self.gangs_at.append(len(self.places) - 1)
            self._one(job, order)
            if len(self.holds) != holds or len(self.planner.reservations) != reservations:
                holds, reservations = len(self.holds), len(self.planner.reservations)
                self.marks.append((len(self.places), holds, reservations))

    def _lease(self, jobs: Mapping[int, Job]) -> LeasePlan:
        if self.leasing is None:
            return LeasePlan()
        waiting = [jobs[w.job_id] for w in self.waiting]
        leased_out: dict[int, Mapping[str, str]] = {}
        refusals: dict[int, Refused | None] = {}

        def fits(job: Job, view: NodeView) -> bool:
            if self.lease_blocks is not None:
                if job.id not in leased_out:
                    leased_out[job.id] = self.lease_blocks.for_job(job)
                    refusals[job.id] = self._refused(job)
                refused = refusals[job.id]
                if view.id in leased_out[job.id] or (
                    refused is not None and refused.rows[self.work.table.pos[view.id]]
                ):
                    return False
            return check(self.base_policy, job, RankRequest.of(job.spec), view).ok

        def replicas_short(job: Job) -> int:
            blocked, _ = self._blocked(job)
            # A node that takes no replica as it is takes none after one more: ask only those
            # that pass the filters now.
            request = RankRequest.of(job.spec)
            codes = filter_codes(self.work, self.base_policy, job, request, shape(job.spec))
            t = self.work.table
            open_ = codes == Code.SUCCESS
            refused = self._refused(job)
            if refused is not None:
                open_ &= ~refused.rows
            views = [
                t.views[row] for row in np.flatnonzero(open_).tolist() if t.ids[row] not in blocked
            ]
            return job.spec.replicas - replicas_fitting(views, job, self.base_policy)

        plan = plan_leases(
            self.leasing,
            waiting,
            nodes=self.work.nodes,
            barred=frozenset(self.barred),
            replicas_short=replicas_short,
            fits=fits,
            now=self.now,
            serving=self._serving()
            if self.leasing.service_grace_s > 0 or self.leasing.service_headroom > 0
            else None,
        )
        if plan.notes:
            self.waiting = [
                replace(w, reason=f"{w.reason}; {plan.notes[w.job_id]}")
                if w.job_id in plan.notes
                else w
                for w in self.waiting
            ]
        return plan

    def _serving(self) -> dict[int, Job]:
        """The running inference jobs by id; a service with replicas to replace holds its
        capacity under its negated id (`services.cycle_input`): here, under its own."""
        return {
            abs(j.id): j if j.id > 0 else replace(j, id=-j.id)
            for j in self.work.jobs()
            if j.spec.kind is JobKind.INFERENCE
        }

    def _blocked(self, job: Job) -> tuple[Mapping[str, str], tuple[str, ...]]:
        """Nodes `job` may not use, and why: held for a reservation ahead of it, or ruled out
        by their lease; and their ids, sorted."""
        ends = ends_if_started(job, self.now)
        parts = [hold.blocked(ends) for hold in self.holds]
        if self.lease_blocks is not None:
            parts.append(self.lease_blocks.for_job(job))
        return self.memos.blocked(parts)

    def _refused(self, job: Job) -> Refused | None:
        """Rows `job` may not use for what keeping their leased node would cost (thrift)."""
        if self.lease_blocks is None:
            return None
        return self.lease_blocks.refused(job, self.work.table)

    def _demands(self, gangs: Sequence[Job]) -> tuple[GangDemand, ...]:
        """What each of `gangs` needs of the nodes idle now: the idle, READY nodes on a fabric
        that pass its filters, counted per fabric."""
        t = self.work.table
        on_fabric = np.array([bool(f) for f in t.fabrics], dtype=bool)[t.fabric]
        idle = t.idle & t.ready & on_fabric
        self.islands = bool(idle.any())
        out = []
        for job in gangs:
            request = RankRequest.of(job.spec)
            codes = filter_codes(self.work, self.base_policy, job, request, shape(job.spec))
            rows = np.flatnonzero(idle & (codes == Code.SUCCESS))
            fabrics, counts = np.unique(t.fabric[rows], return_counts=True)
            by_fabric = sorted(
                ((t.fabrics[f], int(c)) for f, c in zip(fabrics, counts, strict=True)),
                key=lambda kv: (-kv[1], kv[0]),
            )
            self.eligible_rows[job.id] = rows
            out.append(
                GangDemand(
                    job_id=job.id,
                    nodes=job.spec.num_nodes,
                    eligible=frozenset(t.ids[r] for r in rows.tolist()),
                    by_fabric=tuple(by_fabric),
                )
            )
        return tuple(out)

    def _prepare(self) -> None:
        t = self.work.table
        protected: dict[str, frozenset[int]] = {}
        for d in self.demands:
            # The idle nodes of the gang's largest island: what replicas should leave alone.
            rows = self.eligible_rows[d.job_id]
            best = t.fabrics.index(d.best_fabric) if d.by_fabric else -1
            for row in rows[t.fabric[rows] == best].tolist():
                node_id = t.ids[row]
                protected[node_id] = protected.get(node_id, frozenset()) | {d.job_id}
        context = CycleContext(nodes=self.start_nodes, protected=protected, table=t, mix=self.mix)
        policy = self.base_policy.prepared(context)
        if self.prepared:
            # Keep the instances that came out the same, and with them the score columns
            # cached for them: only what the queued gangs changed is scored anew.
            before = [s for s, _ in self.policy.scores]
            scores = tuple(
                (next((b for b in before if type(b) is type(s) and b == s), s), w)
                for s, w in policy.scores
            )
            policy = replace(policy, scores=scores)
        self.policy = policy
        self.prepared = True

    def _one(self, job: Job, order: QueueOrder) -> None:
        """Act on what `_assign` found for `job`."""
        outcome = self._assign(job)
        if outcome.mode is Mode.FITS_AFTER_PREEMPTION:
            self._preempt(job, outcome.victims, order)
        if outcome.placement is not None:
            self._bind(job, outcome.placement, order)
            return
        if outcome.hold is not None:
            self.holds.append(outcome.hold)
        self._wait(job, outcome.reason)

    def _assign(self, job: Job) -> Assignment:
        """Where `job` goes, in order of preference: it fits (a), it fits once lower-priority
        work is preempted (b), or it waits, holding what the backfill policy says (c), with
        the reason. Nothing is bound or preempted here; what failed is remembered (the
        memos) for the jobs alike that come after it."""
        barrier = next((h for h in self.holds if h.blocks_all), None)
        if barrier is not None:
            self.barred.add(job.id)
            return Assignment(mode=Mode.WAITS, reason=barrier.waiting(job, self.now))
        blocked, blocked_ids = self._blocked(job)
        refused = self._refused(job)
        placer = PLACERS[job.spec.kind]
        job_shape = shape(job.spec)
        signature = (job_shape, blocked_ids, refused.key if refused is not None else None)
        memos = self.memos
        # a. place
        miss = memos.misses.get(signature)
        if miss is None:
            outcome = placer(
                self.work, job, self.policy, blocked, self._queued(job), job_shape, refused
            )
            if isinstance(outcome, Placement):
                return Assignment(mode=Mode.FITS, placement=outcome)
            miss = memos.misses[signature] = outcome.reason
        # b. preempt
        preempting = self._victims(job, blocked, refused, placer, signature)
        if isinstance(preempting, Assignment):
            return preempting
        # c. hold
        if signature not in memos.behind:
            memos.note_behind(signature, self._behind(job, blocked, placer, job_shape))
        behind = memos.behind[signature][0]
        hold, note = self._hold(job, job_shape, signature)
        if behind:
            parts = [behind]
        elif note.startswith("reserved"):
            parts = [note, miss, preempting]
        else:
            parts = [miss, preempting, note]
        return Assignment(mode=Mode.WAITS, reason="; ".join(p for p in parts if p), hold=hold)

    def _hold(self, job: Job, job_shape: Shape, signature: Signature) -> tuple[Hold | None, str]:
        """What the backfill policy has `job` hold while it waits, and the note for its reason;
        asked once for jobs alike while nothing changes (`engine.memos`)."""
        at = self.work.table.last_change
        # The plan reads the nodes the job's lease rules out, not the rest of what it may not
        # use (the holds): those, shared by jobs alike, go in the key as well.
        leased_out = id(self.lease_blocks.for_job(job)) if self.lease_blocks is not None else 0
        key = ((*signature, leased_out), len(self.planner.reservations))
        note = self.memos.no_hold(at, key)
        if note is not None:
            return None, note
        fits = PlanFits(self.work, self.policy, job, job_shape, self.lease_blocks)
        hold, note = self.base_policy.backfill.hold(job, self.planner, fits)
        if hold is None and len(self.planner.reservations) == key[1]:
            self.memos.note_no_hold(at, key, note)
        return hold, note

    def _queued(self, job: Job) -> tuple[GangDemand, ...]:
        return tuple(d for d in self.demands if d.job_id != job.id and d.job_id not in self.fresh)

    def _behind(
        self, job: Job, blocked: Mapping[str, str], placer: Placer, job_shape: Shape
    ) -> tuple[str, frozenset[str]]:
        """ "waiting behind job 7's reservation ..." when only a hold keeps `job` back, and
        the nodes of the placement that says so (none: the answer holds whatever is bound)."""
        memos = self.memos
        if not blocked or job_shape in memos.hopeless or (job_shape, (), None) in memos.misses:
            return "", frozenset()
        free = placer(self.work, job, self.policy, {}, self._queued(job), job_shape, None)
        if not isinstance(free, Placement):
            memos.hopeless.add(job_shape)
            return "", frozenset()
        used = frozenset(free.node_ids)
        ends = ends_if_started(job, self.now)
        for hold in self.holds:
            if used & set(hold.blocked(ends)):
                return hold.waiting(job, self.now), used
        return "", used

    def _bind(self, job: Job, placement: Placement, order: QueueOrder) -> None:
        started = replace(job, state=JobState.RUNNING, placement=placement, started_at=self.now)
        self.work.assume(job.id, placement, started)
        self.memos.bound(started, len(self.holds))
        self.bindings.append(Binding(job_id=job.id, placement=placement))
        self.fresh.add(job.id)
        order.started(job, placement_gpus(placement))
        if any(d.job_id == job.id for d in self.demands):
            self.demands = tuple(d for d in self.demands if d.job_id != job.id)
            self._prepare()

    def _candidates(self, job: Job) -> tuple[Victim, ...]:
        """Who `job` may preempt, cheapest first: all of them."""
        preemption = self.base_policy.preemption
        return self.memos.candidates(
            preemption.key(job),
            lambda: preemption.candidates(job, self.work.jobs(), self.now, self.fresh),
        )

    def _without(self, job: Job, candidates: Sequence[Victim]) -> Snapshot:
        """The working snapshot without all of `candidates`, kept per what the preemptor says
        they depend on (its `key`)."""
        key = self.base_policy.preemption.key(job)
        return self.memos.without(key, self.work, {v.job.id for v in candidates})

    def _victims(
        self,
        job: Job,
        blocked: Mapping[str, str],
        refused: Refused | None,
        placer: Placer,
        signature: tuple[Any, ...],
    ) -> Assignment | str:
        """The cheapest lower-priority work whose preemption lets `job` fit, and where it then
        goes; else a note for its reason ("" when there is nobody to preempt)."""
        candidates = self._candidates(job)[:MAX_CANDIDATES]
        if not candidates:
            return ""
        key = (*signature, job.spec.priority)
        if key in self.memos.no_room:
            return self.memos.no_room[key]
        freed = self._without(job, candidates)
        job_shape = signature[0]

        def place(trial: Snapshot) -> Placement | None:
            outcome = placer(
                trial, job, self.policy, blocked, self._queued(job), job_shape, refused
            )
            return outcome if isinstance(outcome, Placement) else None

        chosen = choose_victims(self.work, candidates, place, without=freed)
        if chosen is None:
            note = (
                f"preempting {plural(len(candidates), 'lower-priority preemptible job')} "
                "would not make room"
            )
            self.memos.no_room[key] = note
            return note
        victims, placement = chosen
        lost = sum(v.gpu_hours for v in victims)
        placement = replace(
            placement,
            reason=f"{placement.reason}; preempted {plural(len(victims), 'job')} "
            f"({ids([v.job.id for v in victims])}), {lost:.3g} GPU-hours lost",
        )
        return Assignment(
            mode=Mode.FITS_AFTER_PREEMPTION, placement=placement, victims=tuple(victims)
        )

    def _preempt(self, job: Job, victims: Sequence[Victim], order: QueueOrder) -> None:
        """Stop `victims` for `job`, and forget what their running ruled out."""
        why = f"preempted by job {job.id} (priority {job.spec.priority})"
        for v in victims:
            self.work.forget(v.job.id)
            order.stopped(v.job, placement_gpus(v.job.placement))
            self.preemptions.append(Preemption(job_id=v.job.id, for_job_id=job.id, reason=why))
        self.memos.preempted(victims)

    def _wait(self, job: Job, reason: str) -> None:
        self.waiting.append(Unschedulable(job_id=job.id, reason=reason))
