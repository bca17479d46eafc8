"""One scheduling cycle: pending jobs in queue order, each gang or replica set placed whole
or not at all on a copy of the snapshot (preempting, reserving or backfilling as the policy
says), and for every job left waiting a reason to act on.

Placement reads every node at once: the policy's filters and scores come as arrays over the
snapshot's `NodeTable` (`core.verdicts`), kept up to date row by row as jobs are placed, and a
gang is chosen fabric by fabric from those arrays.

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
import functools
import gc
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np

from gpuctl.core.backfill import Hold, Planner, Reservation, ends_if_started, ids
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
from gpuctl.core.model import (
    MILLI_PER_GPU,
    Job,
    JobKind,
    JobState,
    Placement,
    RankPlacement,
)
from gpuctl.core.nodetable import NodeTable
from gpuctl.core.plugins import (
    Code,
    CycleContext,
    Policy,
    RankRequest,
    Status,
    pick_gpus,
    plural,
)
from gpuctl.core.preempt import MAX_CANDIDATES, Preemption, Victim, choose_victims
from gpuctl.core.queue import QueueOrder, Usage, placement_gpus
from gpuctl.core.snapshot import NodeView, Snapshot
from gpuctl.core.topology import (
    SCORE_DIGITS,
    GangChoice,
    GangDemand,
    best_gang_rows,
    damage,
)
from gpuctl.core.verdicts import (
    ReasonBook,
    Shape,
    Verdicts,
    check,
    columnar,
    explain,
    filter_codes,
    recheck,
    score,
    shape,
    verdicts,
)

_REASON_IDS = 3
# Queued gangs whose islands the cycle keeps intact where it can: the next few to start. Each
# costs one filter pass over the idle nodes per cycle.
_QUEUED_GANGS = 4
_NO_FABRIC = "with no fabric path (a gang of one only)"

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


class _Miss:
    """A placer's "does not fit": the reason is worded only when asked for (most misses are
    trial placements whose reason nobody reads)."""

    __slots__ = ("_reason", "_why")

    def __init__(self, why: Callable[[], str]) -> None:
        self._why: Callable[[], str] | None = why
        self._reason = ""

    @property
    def reason(self) -> str:
        if self._why is not None:
            self._reason, self._why = self._why(), None
        return self._reason


# A placer puts one job (of shape `shape(job.spec)`) on a snapshot, never using the `blocked`
# nodes (id -> why not) nor the `refused` rows of its table.
_Placer = Callable[
    [Snapshot, Job, Policy, Mapping[str, str], Sequence[GangDemand], Shape, Refused | None],
    Placement | _Miss,
]


class _Cycle:
    """The working state of one cycle; `run` is the whole of it."""

    def __init__(
        self, work: Snapshot, policy: Policy, now: datetime, leasing: Leasing | None = None
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
        self.blocked_by: dict[
            tuple[int, ...], tuple[list[Any], dict[str, str], tuple[str, ...]]
        ] = {}
        self.demands: tuple[GangDemand, ...] = ()
        self.mix: tuple[tuple[RankRequest, int], ...] = ()  # what frag-aware packs for
        self.eligible_rows: dict[int, np.ndarray] = {}  # queued gang -> its eligible rows
        self.start_nodes: tuple[NodeView, ...] = work.nodes
        self.fresh: set[int] = set()  # placed in this cycle: never a victim in it
        # Jobs alike in everything placement looks at fail alike until something frees up.
        self.misses: dict[tuple[Any, ...], str] = {}
        # Shapes that fit nowhere even with no node held back. Placing a job only takes
        # capacity, and no filter passes a node with less free that it failed with more, so
        # these stay unplaceable until a preemption frees something.
        self.hopeless: set[Shape] = set()
        self.no_room: dict[tuple[Any, ...], str] = {}
        self.behind: dict[tuple[Any, ...], tuple[str, frozenset[str]]] = {}
        self.behind_on: dict[str, list[tuple[Any, ...]]] = {}  # node -> `behind` keys using it
        # Preemption candidates by the preemptor's key (its candidates depend on the job only
        # through it): placing a job never changes them (a job placed in this cycle is never a
        # victim), preempting does.
        self.candidates: dict[Any, tuple[Victim, ...]] = {}
        # ... and the working snapshot without all of them: the first question of every
        # preemption search is whether the job fits even then. Kept by replaying what the
        # cycle did since (`changes`) and the change in candidates, not copied anew.
        self.freed: dict[Any, _Freed] = {}
        self.changes: list[tuple[Job, bool]] = []  # (job, bound: True / preempted: False)
        self.bindings: list[Binding] = []
        self.waiting: list[Unschedulable] = []
        self.preemptions: list[Preemption] = []

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
        gangs = list(itertools.islice((j for j in order.preview() if _is_gang(j)), _QUEUED_GANGS))
        self.demands = self._demands(gangs)
        self._prepare()
        # 3. place, preempt or hold, job by job
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
        )

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
            return job.spec.replicas - _replicas_fitting(views, job, self.base_policy)

        plan = plan_leases(
            self.leasing,
            waiting,
            nodes=self.work.nodes,
            barred=frozenset(self.barred),
            replicas_short=replicas_short,
            fits=fits,
            now=self.now,
        )
        if plan.notes:
            self.waiting = [
                replace(w, reason=f"{w.reason}; {plan.notes[w.job_id]}")
                if w.job_id in plan.notes
                else w
                for w in self.waiting
            ]
        return plan

    def _blocked(self, job: Job) -> tuple[Mapping[str, str], tuple[str, ...]]:
        """Nodes `job` may not use, and why: held for a reservation ahead of it, or ruled out
        by their lease; and their ids, sorted."""
        ends = ends_if_started(job, self.now)
        parts = [hold.blocked(ends) for hold in self.holds]
        if self.lease_blocks is not None:
            parts.append(self.lease_blocks.for_job(job))
        # Holds (and lease blocks) hand alike jobs the same mapping: merge each mix once.
        key = tuple(id(p) for p in parts)
        hit = self.blocked_by.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], parts, strict=True)):
            return hit[1], hit[2]
        blocked: dict[str, str] = {}
        for part in parts:
            for node_id, why in part.items():
                blocked.setdefault(node_id, why)
        ids = tuple(sorted(blocked))
        self.blocked_by[key] = (parts, blocked, ids)
        return blocked, ids

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
        placer = _PLACERS[job.spec.kind]
        job_shape = shape(job.spec)
        signature = (job_shape, blocked_ids, refused.key if refused is not None else None)
        # a. place
        miss = self.misses.get(signature)
        if miss is None:
            outcome = placer(
                self.work, job, self.policy, blocked, self._queued(job), job_shape, refused
            )
            if isinstance(outcome, Placement):
                return Assignment(mode=Mode.FITS, placement=outcome)
            miss = self.misses[signature] = outcome.reason
        # b. preempt
        preempting = self._victims(job, blocked, refused, placer, signature)
        if isinstance(preempting, Assignment):
            return preempting
        # c. hold
        if signature not in self.behind:
            self.behind[signature] = found = self._behind(job, blocked, placer, job_shape)
            for node_id in found[1]:
                self.behind_on.setdefault(node_id, []).append(signature)
        behind = self.behind[signature][0]
        fits = _Fits(self.work, self.policy, job, job_shape, self.lease_blocks)
        hold, note = self.base_policy.backfill.hold(job, self.planner, fits)
        if behind:
            parts = [behind]
        elif note.startswith("reserved"):
            parts = [note, miss, preempting]
        else:
            parts = [miss, preempting, note]
        return Assignment(mode=Mode.WAITS, reason="; ".join(p for p in parts if p), hold=hold)

    def _queued(self, job: Job) -> tuple[GangDemand, ...]:
        return tuple(d for d in self.demands if d.job_id != job.id and d.job_id not in self.fresh)

    def _behind(
        self, job: Job, blocked: Mapping[str, str], placer: _Placer, job_shape: Shape
    ) -> tuple[str, frozenset[str]]:
        """ "waiting behind job 7's reservation ..." when only a hold keeps `job` back, and
        the nodes of the placement that says so (none: the answer holds whatever is bound)."""
        if not blocked or job_shape in self.hopeless or (job_shape, (), None) in self.misses:
            return "", frozenset()
        free = placer(self.work, job, self.policy, {}, self._queued(job), job_shape, None)
        if not isinstance(free, Placement):
            self.hopeless.add(job_shape)
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
        self.changes.append((started, True))
        self.bindings.append(Binding(job_id=job.id, placement=placement))
        self.fresh.add(job.id)
        # What fitted but for a hold may not fit at all now, if the placement that showed it
        # lost a node. One that kept its nodes still fits, so only a hold keeps it back: with
        # one hold, that hold (with several, which one depends on where it would go).
        if len(self.holds) > 1:
            self._forget_behind()
        else:
            for node_id in placement.node_ids:
                for signature in self.behind_on.pop(node_id, ()):
                    self.behind.pop(signature, None)
        order.started(job, placement_gpus(placement))
        if any(d.job_id == job.id for d in self.demands):
            self.demands = tuple(d for d in self.demands if d.job_id != job.id)
            self._prepare()

    def _forget_behind(self) -> None:
        self.behind.clear()
        self.behind_on.clear()

    def _candidates(self, job: Job) -> tuple[Victim, ...]:
        """Who `job` may preempt, cheapest first: all of them."""
        preemption = self.base_policy.preemption
        key = preemption.key(job)
        if key not in self.candidates:
            self.candidates[key] = preemption.candidates(
                job, self.work.jobs(), self.now, self.fresh
            )
        return self.candidates[key]

    def _without(self, job: Job, candidates: Sequence[Victim]) -> Snapshot:
        """The working snapshot without all of `candidates`, kept per what the preemptor says
        they depend on (its `key`)."""
        key = self.base_policy.preemption.key(job)
        freed = self.freed.get(key)
        if freed is None:
            freed = self.freed[key] = _Freed(self.work.copy(), len(self.changes))
        freed.update(self.work, self.changes, {v.job.id for v in candidates})
        return freed.snapshot

    def _victims(
        self,
        job: Job,
        blocked: Mapping[str, str],
        refused: Refused | None,
        placer: _Placer,
        signature: tuple[Any, ...],
    ) -> Assignment | str:
        """The cheapest lower-priority work whose preemption lets `job` fit, and where it then
        goes; else a note for its reason ("" when there is nobody to preempt)."""
        candidates = self._candidates(job)[:MAX_CANDIDATES]
        if not candidates:
            return ""
        key = (*signature, job.spec.priority)
        if key in self.no_room:
            return self.no_room[key]
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
            self.no_room[key] = note
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
            self.changes.append((v.job, False))
            order.stopped(v.job, placement_gpus(v.job.placement))
            self.preemptions.append(Preemption(job_id=v.job.id, for_job_id=job.id, reason=why))
        # Room was made: what failed before may fit now.
        self.misses.clear()
        self.hopeless.clear()
        self.no_room.clear()
        self._forget_behind()
        # The victims run no more; nobody else stops or starts being a candidate (a job
        # placed in this cycle never is one), so the lists lose them and keep their order.
        gone = {v.job.id for v in victims}
        self.candidates = {
            k: tuple(c for c in listed if c.job.id not in gone)
            for k, listed in self.candidates.items()
        }

    def _wait(self, job: Job, reason: str) -> None:
        self.waiting.append(Unschedulable(job_id=job.id, reason=reason))


class _Freed:
    """The working snapshot without some running jobs (`gone`), brought up to date on use."""

    def __init__(self, snapshot: Snapshot, synced: int) -> None:
        self.snapshot = snapshot
        self.synced = synced  # how many of the cycle's changes it has seen
        self.gone: set[int] = set()

    def update(self, work: Snapshot, changes: Sequence[tuple[Job, bool]], gone: set[int]) -> None:
        """Replay the cycle's binds and preemptions since, then let go of exactly `gone`
        (jobs `work` holds): as `work.copy()` with `gone` forgotten would be."""
        for job, bound in changes[self.synced :]:
            if bound:
                assert job.placement is not None
                self.snapshot.assume(job.id, job.placement, job)
            elif job.id in self.gone:
                self.gone.discard(job.id)  # gone here already, and from `work` now too
            else:
                self.snapshot.forget(job.id)
        self.synced = len(changes)
        for job_id in sorted(self.gone - gone):
            placement = work.placement_of(job_id)
            if placement is not None:
                self.snapshot.hold(job_id, placement, work.job(job_id))
        self.snapshot.forget_all(sorted(gone - self.gone))
        self.gone = set(gone)


class _Fits:
    """Fits(node) of one job for planning a reservation: True fits now, False once work there
    ends, None never (or not because of its lease).

    Nodes as the cycle has them are read off the verdicts; the what-if nodes the planner
    builds (a node with some jobs gone) are checked once per likeness, since the filters read
    nothing but the node's kind and what it has free (`core.plugins`)."""

    def __init__(
        self,
        work: Snapshot,
        policy: Policy,
        job: Job,
        job_shape: Shape,
        lease_blocks: LeaseBlocks | None,
    ) -> None:
        self.work = work
        self.policy = policy
        self.job = job
        self.job_shape = job_shape
        self.lease_blocks = lease_blocks
        self.codes: np.ndarray | None = None
        self.alike: dict[tuple[Any, ...], bool | None] = {}
        self.ready = False  # the rest is worked out on the first call: most holds make none

    def _get_ready(self) -> None:
        self.request = RankRequest.of(self.job.spec)
        # A node its lease rules out is no node to reserve either.
        blocks = self.lease_blocks
        self.leased_out = blocks.for_job(self.job) if blocks is not None else {}
        refused = blocks.refused(self.job, self.work.table) if blocks is not None else None
        self.refused = refused.rows if refused is not None else None
        self.columnar = columnar(self.policy)
        self.ready = True

    def __call__(self, view: NodeView) -> bool | None:
        if not self.ready:
            self._get_ready()
        if view.id in self.leased_out:
            return None
        t = self.work.table
        row = t.pos[view.id]
        if self.refused is not None and self.refused[row]:
            return None
        if self.columnar and t.views[row] is view:
            if self.codes is None:
                self.codes = filter_codes(
                    self.work, self.policy, self.job, self.request, self.job_shape
                )
            return _fit(int(self.codes[row]))
        if not self.columnar:
            return _fit(check(self.policy, self.job, self.request, view).code)
        key = (int(t.kind[row]), view.gpu_free_milli, view.cpu_free_milli, view.memory_free_mib)
        if key not in self.alike:
            self.alike[key] = _fit(check(self.policy, self.job, self.request, view).code)
        return self.alike[key]


def _fit(code: int) -> bool | None:
    return True if code == Code.SUCCESS else (None if code == Code.UNRESOLVABLE else False)


def _is_gang(job: Job) -> bool:
    return job.spec.kind is JobKind.TRAINING and job.spec.num_nodes > 1


def _rank(index: int, node: NodeView, request: RankRequest) -> RankPlacement:
    gpus = pick_gpus(node, request)
    if gpus is None:  # the gpu-fit filter passed this node; the same function chose
        raise AssertionError(f"node {node.id} passed the filters but has no GPUs for {request}")
    return RankPlacement(
        rank=index,
        node_id=node.id,
        gpu_indices=gpus,
        gpu_milli=request.gpu_milli or MILLI_PER_GPU,
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
    )


# -- reasons -------------------------------------------------------------------------------


def _need(job: Job, request: RankRequest, count: int, unit: str) -> str:
    spec = job.spec
    text = f"needs {plural(count, unit)} \N{MULTIPLICATION SIGN} {request.describe()}"
    extras = []
    if spec.gpu_model and request.milli:
        extras.append(spec.gpu_model)
    if spec.min_nvlink_gbps:
        extras.append(f"NVLink >= {spec.min_nvlink_gbps:g} GB/s")
    if spec.min_net_gbps:
        extras.append(f"network >= {spec.min_net_gbps:g} Gb/s")
    if extras:
        text += f" ({', '.join(extras)})"
    if request.gpu_memory_mib and request.milli:
        text += f" with {request.gpu_memory_mib} MiB"
    if spec.hbm_floor_gbps:
        text += f" with HBM >= {spec.hbm_floor_gbps:g} GB/s"
    return text


def _ids(values: Sequence[str]) -> str:
    shown = ", ".join(values[:_REASON_IDS])
    return shown + (f" +{len(values) - _REASON_IDS} more" if len(values) > _REASON_IDS else "")


class _Failures:
    """The nodes ruled out for one job, each with why, to be grouped into its reason."""

    def __init__(self, table: NodeTable) -> None:
        self.table = table
        self.book = ReasonBook()
        self.rows: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []

    def add(self, rows: np.ndarray, ids: np.ndarray) -> None:
        self.rows.append(rows)
        self.ids.append(ids)

    def add_text(self, rows: np.ndarray, texts: Sequence[str]) -> None:
        self.add(rows, np.array([self.book.id_of(x) for x in texts], dtype=np.int64))

    def add_same(self, rows: np.ndarray, text: str) -> None:
        """`add_text` with one text for all of `rows`."""
        self.add(rows, np.full(len(rows), self.book.id_of(text) if len(rows) else 0))

    def __bool__(self) -> bool:
        return any(len(r) for r in self.rows)

    def explain(self) -> str:
        if not self.rows:
            return ""
        rows = np.concatenate(self.rows)
        ids = np.concatenate(self.ids)
        order = np.argsort(rows, kind="stable")
        return explain(self.table, rows[order], ids[order], self.book)


# -- training: gangs -----------------------------------------------------------------------


def _island_keys(t: NodeTable, rows: np.ndarray) -> np.ndarray:
    """A sort key per row for its island: a node with no fabric is an island alone, ("", id),
    and those sort before the fabrics, which sort by name."""
    fabric = t.fabric[rows]
    on_fabric = np.array([bool(f) for f in t.fabrics], dtype=bool)[fabric]
    return np.where(on_fabric, len(t) + fabric, rows)


def _place_gang(
    snapshot: Snapshot,
    job: Job,
    policy: Policy,
    blocked: Mapping[str, str],
    queued: Sequence[GangDemand],
    job_shape: Shape,
    refused: Refused | None = None,
) -> Placement | _Miss:
    n = job.spec.num_nodes
    request = RankRequest.of(job.spec)
    t = snapshot.table
    v = verdicts(snapshot, policy, job, request, job_shape)
    ok = v.ok
    usable = ok.copy()
    blocked_rows = t.rows(blocked) if blocked else np.zeros(0, dtype=np.int64)
    usable[blocked_rows] = False
    if refused is not None:
        usable &= ~refused.rows
    nofab = np.zeros(len(t), dtype=bool)
    if n > 1:
        nofab = usable & ~np.array([bool(f) for f in t.fabrics], dtype=bool)[t.fabric]
        usable &= ~nofab
    members = np.flatnonzero(usable)
    scores = v.score[members]
    whole = t.idle[members] & (t.gpu_count[members] == request.gpus)
    islands = _island_keys(t, members)
    if n == 1:
        gangs = _single_node_gangs(t, members, scores, whole, islands)
    else:
        memo = _IslandMemo.of(t, policy, job, job_shape, blocked, refused)
        gangs = _gangs(t, members, scores, whole, islands, n, memo)
    if not gangs:
        return _Miss(
            lambda: _gang_reason(
                job, request, t, v, members, islands, blocked, blocked_rows, nofab, refused
            )
        )
    # Whole nodes, then fewest leaves, then what stays intact for the queued gangs, then the
    # scores (interconnect and TFLOPS among them), then the fabric's name.
    lead = min((g.partial, g.leaves) for g in gangs)
    best = _least_damage([g for g in gangs if (g.partial, g.leaves) == lead], queued)
    ordered = best.nodes
    whole_nodes = n - best.partial
    where = f"fabric {best.fabric}" if best.fabric else f"node {ordered[0].id} (no fabric)"
    shape_text = plural(whole_nodes, "whole node") if whole_nodes else ""
    if best.partial:
        shape_text += (" + " if whole_nodes else "") + plural(best.partial, "partial node")
    return Placement(
        ranks=tuple(_rank(i, node, request) for i, node in enumerate(ordered)),
        master_addr=ordered[0].node.address,
        reason=f"{where}, {plural(best.leaves, 'leaf', 'leaves')}, {shape_text}",
    )


def _least_damage(choices: Sequence[GangChoice], queued: Sequence[GangDemand]) -> GangChoice:
    """min(choices, key=(damage, -score, fabric)), working damage out for few of them: no
    choice can do better than leaving every queued gang its largest island, so the best
    scoring choice that does so wins."""
    if len(choices) == 1 or not queued:
        return min(choices, key=lambda g: (-g.score, g.fabric))
    untouched = damage(None, queued)
    by_score = sorted(choices, key=lambda g: (-g.score, g.fabric))  # stable: ties keep order
    for g in by_score:
        if damage(g, queued) == untouched:
            return g
    return min(by_score, key=lambda g: (damage(g, queued), -g.score, g.fabric))


def _single_node_gangs(
    t: NodeTable, rows: np.ndarray, scores: np.ndarray, whole: np.ndarray, islands: np.ndarray
) -> list[GangChoice]:
    """The best node of each island for a gang of one (`topology.best_gang` with n = 1, for
    every island at once): whole nodes if the island has one; then the best score, the
    smallest leaf (keeping big leaves whole for bigger gangs), the leaf's name, the node id."""
    if not len(rows):
        return []
    island_ids, island_of = np.unique(islands, return_inverse=True)
    island_of = island_of.reshape(-1)
    has_whole = np.zeros(len(island_ids), dtype=bool)
    has_whole[island_of[whole]] = True
    cand = whole | ~has_whole[island_of]
    rows, scores, whole, island_of = rows[cand], scores[cand], whole[cand], island_of[cand]
    leaf = t.leaf[rows]
    pairs, pair_of = np.unique(island_of * len(t.leaves) + leaf, return_inverse=True)
    leaf_size = np.bincount(pair_of.reshape(-1), minlength=len(pairs))[pair_of.reshape(-1)]
    order = np.lexsort((rows, leaf, leaf_size, -scores, island_of))
    firsts = order[np.flatnonzero(np.diff(island_of[order], prepend=-1) != 0)]
    out = []
    for i in firsts.tolist():
        view = t.views[int(rows[i])]
        out.append(
            GangChoice(
                fabric=view.node.fabric_name,
                nodes=(view,),
                leaves=1,
                partial=0 if whole[i] else 1,
                score=round(float(scores[i]), SCORE_DIGITS),
            )
        )
    return out


class _IslandMemo:
    """Each island's best gang for one kind of job (shape, size, what it may not use), kept on
    the table: an island none of whose nodes changed since has the same best gang, and a burst
    cycle changes an island or two between two gangs alike."""

    __slots__ = ("choices", "known", "seen")

    def __init__(self, table: NodeTable, known: dict[int, GangChoice | None]) -> None:
        self.known = known  # island key -> its best gang (None: none), still valid
        self.choices: dict[int, GangChoice | None] = {}
        self.seen = table.now

    @classmethod
    def of(
        cls,
        t: NodeTable,
        policy: Policy,
        job: Job,
        job_shape: Shape,
        blocked: Mapping[str, str],
        refused: Refused | None,
    ) -> _IslandMemo:
        facets = tuple(s.facet(job) for s, _ in policy.scores)
        key = (
            id(policy.filters),
            id(policy.scores),
            job_shape,
            facets,
            id(blocked),
            refused.key if refused is not None else None,
        )
        hit = t.memos.islands.get(key)
        known: dict[int, GangChoice | None] = {}
        # (the entry holds what its key names by id, so no id is reused while it is kept)
        if hit is not None and hit[0] is policy.filters and hit[1] is policy.scores:
            memo = hit[3]
            touched = set(_island_keys(t, t.changed_since(memo.seen)).tolist())
            known = {k: c for k, c in memo.choices.items() if k not in touched}
        out = cls(t, known)
        t.memos.islands[key] = (policy.filters, policy.scores, blocked, out)
        return out


def _gangs(
    t: NodeTable,
    rows: np.ndarray,
    scores: np.ndarray,
    whole: np.ndarray,
    islands: np.ndarray,
    n: int,
    memo: _IslandMemo | None = None,
) -> list[GangChoice]:
    """`topology.best_gang` of each island (in island order) with at least `n` members; those
    `memo` knows are not worked out again, and what is worked out is recorded there."""
    out: list[GangChoice] = []
    if not len(rows):
        return out
    keys, sizes = np.unique(islands, return_counts=True)
    by_island = np.argsort(islands, kind="stable")
    offset = 0
    for island, size in zip(keys.tolist(), sizes.tolist(), strict=True):
        members = by_island[offset : offset + size]
        offset += size
        if size < n:
            continue
        if memo is not None and island in memo.known:
            choice = memo.known[island]
        else:
            choice = best_gang_rows(t, rows[members], scores[members], whole[members], n)
        if memo is not None:
            memo.choices[island] = choice
        if choice is not None:
            out.append(choice)
    return out


def _gang_reason(
    job: Job,
    request: RankRequest,
    t: NodeTable,
    v: Verdicts,
    members: np.ndarray,
    islands: np.ndarray,
    blocked: Mapping[str, str],
    blocked_rows: np.ndarray,
    nofab: np.ndarray,
    refused: Refused | None,
) -> str:
    n = job.spec.num_nodes
    text = _need(job, request, n, "node") + (" on one fabric" if n > 1 else "")
    failures = _Failures(t)
    ruled_out = np.flatnonzero(~v.ok)
    failures.add(ruled_out, v.reason_ids(ruled_out, failures.book))
    held = blocked_rows[v.ok[blocked_rows]]
    failures.add_text(held, [blocked[t.ids[r]] for r in held.tolist()])
    if refused is not None:
        kept = np.flatnonzero(refused.rows & v.ok)
        kept = kept[~np.isin(kept, blocked_rows)]
        failures.add_same(kept, refused.why)
    failures.add_same(np.flatnonzero(nofab), _NO_FABRIC)
    if not len(members) and not failures:
        return text + "; the cluster has no nodes"
    if len(members):
        keys, counts = np.unique(islands, return_counts=True)
        largest = keys[np.lexsort((keys, -counts))[0]]
        rows = members[islands == largest]
        text += f"; largest free island has {plural(len(rows), 'node')} ({_describe(t, rows)})"
        if len(members) >= n:
            text += f", {len(members)} across {len(keys)} fabrics"
    else:
        text += "; no node fits"
    if failures:
        text += f" ({failures.explain()})"
    return text


def _describe(t: NodeTable, rows: np.ndarray) -> str:
    """ "fabric ib-a, leaf ib-a/s1/l3" or "fabric ib-a, 3 leaves" for the nodes of one island."""
    node = t.views[int(rows[0])].node
    if not node.fabric_name:
        return f"node {node.id}, no fabric"
    leaves = np.unique(t.leaf[rows])
    where = f"leaf {t.leaves[leaves[0]]}" if len(leaves) == 1 else f"{len(leaves)} leaves"
    return f"fabric {node.fabric_name}, {where}"


# -- inference: replicas -------------------------------------------------------------------


def _replicas_fitting(views: Sequence[NodeView], job: Job, policy: Policy) -> int:
    """How many replicas of `job` fit on `views`, first fit: what leasing must add is the rest."""
    request = RankRequest.of(job.spec)
    fitted = 0
    for view in views:
        while fitted < job.spec.replicas and check(policy, job, request, view).ok:
            view = view.take(job.id, (_rank(fitted, view, request),))
            fitted += 1
    return fitted


def _place_replicas(
    snapshot: Snapshot,
    job: Job,
    policy: Policy,
    blocked: Mapping[str, str],
    queued: Sequence[GangDemand],
    job_shape: Shape,
    refused: Refused | None = None,
) -> Placement | _Miss:
    request = RankRequest.of(job.spec)
    t = snapshot.table
    v = verdicts(snapshot, policy, job, request, job_shape)
    best = v.score  # -inf where ruled out; copied before it changes
    if blocked or refused is not None:  # would fit, but a reservation or its lease holds it
        best = best.copy()
        if blocked:
            best[_rows_of(t, blocked)] = -np.inf
        if refused is not None:
            best[refused.rows] = -np.inf
    elif job.spec.replicas > 1:
        best = best.copy()
    fitting_at_start = np.count_nonzero(best != -np.inf)
    # The nodes as they would be with the replicas placed so far; only the node that took
    # the last replica changes, so only it is filtered and scored again.
    views: dict[int, NodeView] = {}
    local: dict[int, Status] = {}
    ranks: list[RankPlacement] = []
    for index in range(job.spec.replicas):
        row = int(best.argmax()) if len(best) else 0  # the best, then the smallest id
        if not len(best) or best[row] == -np.inf:
            why = functools.partial(
                _replica_reason, job, request, ranks, t, v, blocked, refused, local
            )
            return _Miss(why)
        view = views.get(row, t.views[row])
        rank = _rank(index, view, request)
        ranks.append(rank)
        view = views[row] = view.take(job.id, (rank,))
        if index == job.spec.replicas - 1:
            break  # the last: nothing is placed after it, so its node is not asked again
        status = recheck(policy, job, request, view)  # it passed them all before this replica
        if status.ok and view.id in blocked:
            status = Status(code=Code.UNSCHEDULABLE, reason=blocked[view.id])
        local[row] = status
        best[row] = score(policy, job, request, view) if status.ok else -np.inf
    taken = {w.id: w for w in views.values()}
    placement = Placement(
        ranks=tuple(ranks),
        master_addr=taken[ranks[0].node_id].node.address,
        reason=_replica_where(ranks, taken, request, fitting_at_start),
    )
    snapshot.stage(placement, taken)
    return placement


def _rows_of(t: NodeTable, node_ids: Mapping[str, str]) -> np.ndarray:
    """`t.rows(node_ids)`, kept on the table for the mapping: alike jobs share one."""
    hit = t.memos.rows_of.get(id(node_ids))
    if hit is None or hit[0] is not node_ids:
        hit = t.memos.rows_of[id(node_ids)] = (node_ids, t.rows(node_ids))
    return hit[1]


def _replica_where(
    ranks: Sequence[RankPlacement], views: dict[str, NodeView], request: RankRequest, fitting: int
) -> str:
    best_of = f"best of {plural(fitting, 'fitting node')}"
    if len(ranks) > 1:
        nodes = list(dict.fromkeys(r.node_id for r in ranks))
        return f"{len(ranks)} replicas on {plural(len(nodes), 'node')} ({_ids(nodes)}), {best_of}"
    r = ranks[0]
    view = views[r.node_id]
    if request.gpu_milli:
        gpu = r.gpu_indices[0]
        left = next(
            m for g, m in zip(view.gpus, view.gpu_free_milli, strict=True) if g.index == gpu
        )
        keeps = f"GPU {gpu} keeps {left} milli free"
    elif request.gpus:
        keeps = f"keeps {plural(view.free_gpu_milli / MILLI_PER_GPU, 'GPU')} free"
    else:
        keeps = f"keeps {view.cpu_free_milli} cpu-milli free"
    return f"node {r.node_id} {keeps}, {best_of}"


def _replica_reason(
    job: Job,
    request: RankRequest,
    ranks: Sequence[RankPlacement],
    t: NodeTable,
    v: Verdicts,
    blocked: Mapping[str, str],
    refused: Refused | None,
    local: Mapping[int, Status],
) -> str:
    text = _need(job, request, job.spec.replicas, "replica")
    held = np.zeros(len(t), dtype=bool)  # would fit, but a reservation or its lease holds it
    if blocked:
        held[_rows_of(t, blocked)] = True
    if refused is not None:
        held |= refused.rows
    held &= v.ok
    if not len(t):
        return text + "; the cluster has no nodes"
    if ranks:
        nodes = list(dict.fromkeys(r.node_id for r in ranks))
        text += f"; {len(ranks)} fit ({_ids(nodes)}), then"
    else:
        text += ";"
    failures = _Failures(t)
    changed = np.zeros(len(t), dtype=bool)
    changed[list(local)] = True
    ruled_out = np.flatnonzero(~v.ok & ~changed)
    failures.add(ruled_out, v.reason_ids(ruled_out, failures.book))
    held_rows = np.flatnonzero(held & ~changed)
    failures.add_text(
        held_rows,
        [blocked.get(t.ids[r]) or (refused.why if refused else "") for r in held_rows.tolist()],
    )
    rows = sorted(local)
    failures.add_text(np.array(rows, dtype=np.int64), [local[r].reason for r in rows])
    return f"{text} {failures.explain()}"


_PLACERS: dict[JobKind, _Placer] = {
    JobKind.TRAINING: _place_gang,
    JobKind.INFERENCE: _place_replicas,
}
