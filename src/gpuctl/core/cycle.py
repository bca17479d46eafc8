"""One scheduling cycle: pending jobs in queue order, each gang or replica set placed whole
or not at all on a copy of the snapshot (preempting, reserving or backfilling as the policy
says), and for every job left waiting a reason to act on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from gpuctl.core.backfill import Hold, Planner, Reservation, ends_if_started, ids
from gpuctl.core.leasing import (
    LeaseBlocks,
    LeasePlan,
    LeaseRelease,
    LeaseRequest,
    Leasing,
    plan_leases,
)
from gpuctl.core.model import (
    MILLI_PER_GPU,
    Job,
    JobKind,
    JobSpec,
    JobState,
    OnNodeLost,
    Placement,
    RankPlacement,
)
from gpuctl.core.plugins import (
    Code,
    CycleContext,
    NodeReady,
    Policy,
    RankRequest,
    Status,
    pick_gpus,
    plural,
)
from gpuctl.core.preempt import Preemption, choose_victims
from gpuctl.core.queue import QueueOrder, Usage, placement_gpus
from gpuctl.core.snapshot import NodeView, Snapshot
from gpuctl.core.topology import (
    SCORE_DIGITS,
    GangDemand,
    Member,
    best_gang,
    damage,
    describe_island,
    gang_demands,
    island_of,
    protected_nodes,
)

# A reason lists at most this many groups of nodes: enough to act on, short enough to read.
_REASON_GROUPS = 4
_REASON_IDS = 3
# Queued gangs whose islands the cycle keeps intact where it can: the next few to start. Each
# costs one filter pass over the idle nodes per cycle.
_QUEUED_GANGS = 4

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
    return _Cycle(snapshot.copy(), policy, now, leasing).run(pending)


# A placer puts one job on a snapshot, never using the `blocked` nodes (id -> why not).
_Placer = Callable[
    [Snapshot, Job, Policy, Mapping[str, str], Sequence[GangDemand]], Placement | Unschedulable
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
        self.now = now
        self.planner = Planner(work, now)
        self.holds: list[Hold] = []
        self.demands: tuple[GangDemand, ...] = ()
        self.start_nodes: tuple[NodeView, ...] = work.nodes
        self.fresh: set[int] = set()  # placed in this cycle: never a victim in it
        # Jobs alike in everything placement looks at fail alike until something frees up.
        self.misses: dict[tuple[Any, ...], str] = {}
        self.no_room: dict[tuple[Any, ...], str] = {}
        self.behind: dict[tuple[Any, ...], str] = {}
        self.bindings: list[Binding] = []
        self.waiting: list[Unschedulable] = []
        self.preemptions: list[Preemption] = []

    def run(self, pending: Sequence[Job]) -> CycleResult:
        # 1. sort
        order = QueueOrder(pending, self.base_policy.queue_sort, Usage.of(self.work.jobs()))
        if self.leasing is not None:
            blocks = LeaseBlocks(self.leasing, frozenset(j.id for j in pending), self.now)
            self.lease_blocks = blocks if blocks else None
        # 2. prepare
        gangs = [j for j in order.preview() if _is_gang(j)][:_QUEUED_GANGS]
        self.demands = gang_demands(self.work.nodes, gangs, self._static_fit)
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

        def fits(job: Job, view: NodeView) -> bool:
            return _check(self.base_policy, job, RankRequest.of(job.spec), view).ok

        def replicas_short(job: Job) -> int:
            blocked = self._blocked(job)
            views = [v for v in self.work.nodes if v.id not in blocked]
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

    def _blocked(self, job: Job) -> dict[str, str]:
        """Nodes `job` may not use, and why: held for a reservation ahead of it, or ruled out
        by their lease."""
        blocked: dict[str, str] = {}
        for hold in self.holds:
            for node_id, why in hold.blocked(ends_if_started(job, self.now)).items():
                blocked.setdefault(node_id, why)
        if self.lease_blocks is not None:
            for node_id, why in self.lease_blocks.for_job(job).items():
                blocked.setdefault(node_id, why)
        return blocked

    def _static_fit(self, job: Job, view: NodeView) -> bool:
        return _check(self.base_policy, job, RankRequest.of(job.spec), view).ok

    def _prepare(self) -> None:
        protected: dict[str, frozenset[int]] = {}
        for d in self.demands:
            for node_id in protected_nodes(self.start_nodes, (d,)):
                protected[node_id] = protected.get(node_id, frozenset()) | {d.job_id}
        context = CycleContext(nodes=self.start_nodes, protected=protected)
        self.policy = self.base_policy.prepared(context)

    def _one(self, job: Job, order: QueueOrder) -> None:
        barrier = next((h for h in self.holds if h.blocks_all), None)
        if barrier is not None:
            self.barred.add(job.id)
            self._wait(job, barrier.waiting(job, self.now))
            return
        blocked = self._blocked(job)
        placer = _PLACERS[job.spec.kind]
        signature = (_shape(job.spec), tuple(sorted(blocked)))
        # a. place
        miss = self.misses.get(signature)
        if miss is None:
            outcome = placer(self.work, job, self.policy, blocked, self._queued(job))
            if isinstance(outcome, Placement):
                self._bind(job, outcome, order)
                return
            miss = self.misses[signature] = outcome.reason
        # b. preempt
        preempt_note = self._preempt(job, blocked, placer, signature, order)
        if preempt_note is None:
            return
        # c. hold
        request = RankRequest.of(job.spec)
        # A node its lease rules out is no node to reserve either.
        leased_out = self.lease_blocks.for_job(job) if self.lease_blocks is not None else {}

        def fits(view: NodeView) -> bool | None:
            if view.id in leased_out:
                return None
            status = _check(self.policy, job, request, view)
            return True if status.ok else (None if status.code is Code.UNRESOLVABLE else False)

        if signature not in self.behind:
            self.behind[signature] = self._behind(job, blocked, placer)
        behind = self.behind[signature]
        hold, note = self.base_policy.backfill.hold(job, self.planner, fits)
        if hold is not None:
            self.holds.append(hold)
        if behind:
            parts = [behind]
        elif note.startswith("reserved"):
            parts = [note, miss, preempt_note]
        else:
            parts = [miss, preempt_note, note]
        self._wait(job, "; ".join(p for p in parts if p))

    def _queued(self, job: Job) -> tuple[GangDemand, ...]:
        return tuple(d for d in self.demands if d.job_id != job.id and d.job_id not in self.fresh)

    def _behind(self, job: Job, blocked: Mapping[str, str], placer: _Placer) -> str:
        """ "waiting behind job 7's reservation ..." when only a hold keeps `job` back."""
        if not blocked:
            return ""
        free = placer(self.work, job, self.policy, {}, self._queued(job))
        if not isinstance(free, Placement):
            return ""
        used = set(free.node_ids)
        ends = ends_if_started(job, self.now)
        for hold in self.holds:
            if used & set(hold.blocked(ends)):
                return hold.waiting(job, self.now)
        return ""

    def _bind(self, job: Job, placement: Placement, order: QueueOrder) -> None:
        started = replace(job, state=JobState.RUNNING, placement=placement, started_at=self.now)
        self.work.assume(job.id, placement, started)
        self.bindings.append(Binding(job_id=job.id, placement=placement))
        self.fresh.add(job.id)
        self.behind.clear()  # what fitted but for a hold may not fit at all now
        order.started(job, placement_gpus(placement))
        if any(d.job_id == job.id for d in self.demands):
            self.demands = tuple(d for d in self.demands if d.job_id != job.id)
            self._prepare()

    def _preempt(
        self,
        job: Job,
        blocked: Mapping[str, str],
        placer: _Placer,
        signature: tuple[Any, ...],
        order: QueueOrder,
    ) -> str | None:
        """Preempt for `job` if that makes it fit (None: it was placed); else a note for its
        reason ("" when there was nobody to preempt)."""
        candidates = self.base_policy.preemption.candidates(
            job, self.work.jobs(), self.now, self.fresh
        )
        if not candidates:
            return ""
        key = (*signature, job.spec.priority)
        if key in self.no_room:
            return self.no_room[key]

        def place(trial: Snapshot) -> Placement | None:
            outcome = placer(trial, job, self.policy, blocked, self._queued(job))
            return outcome if isinstance(outcome, Placement) else None

        chosen = choose_victims(self.work, candidates, place)
        if chosen is None:
            note = (
                f"preempting {plural(len(candidates), 'lower-priority preemptible job')} "
                "would not make room"
            )
            self.no_room[key] = note
            return note
        victims, placement = chosen
        why = f"preempted by job {job.id} (priority {job.spec.priority})"
        for v in victims:
            self.work.forget(v.job.id)
            order.stopped(v.job, placement_gpus(v.job.placement))
            self.preemptions.append(Preemption(job_id=v.job.id, for_job_id=job.id, reason=why))
        lost = sum(v.gpu_hours for v in victims)
        placement = replace(
            placement,
            reason=f"{placement.reason}; preempted {plural(len(victims), 'job')} "
            f"({ids([v.job.id for v in victims])}), {lost:.3g} GPU-hours lost",
        )
        # Room was made: what failed before may fit now.
        self.misses.clear()
        self.no_room.clear()
        self.behind.clear()
        self._bind(job, placement, order)
        return None

    def _wait(self, job: Job, reason: str) -> None:
        self.waiting.append(Unschedulable(job_id=job.id, reason=reason))


def _is_gang(job: Job) -> bool:
    return job.spec.kind is JobKind.TRAINING and job.spec.num_nodes > 1


def _shape(spec: JobSpec) -> JobSpec:
    """`spec` with what placement never looks at cleared: alike shapes fit alike."""
    return replace(
        spec,
        command=(),
        name="",
        owner="",
        queue="",
        priority=0,
        env=(),
        working_dir="",
        time_limit_s=0,
        on_node_lost=OnNodeLost.REQUEUE,
        preemptible=False,
    )


def _check(policy: Policy, job: Job, request: RankRequest, node: NodeView) -> Status:
    # Whatever filters a policy names, nothing new goes on a node that is not READY.
    if not node.schedulable:
        return NodeReady().filter(job, request, node)
    return policy.check(job, request, node)


def _score(policy: Policy, job: Job, request: RankRequest, node: NodeView) -> float:
    return round(policy.score(job, request, node), SCORE_DIGITS)


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


def _explain(failures: Sequence[tuple[str, str]]) -> str:
    """Nodes grouped by why they were ruled out: "node b draining, 2 nodes with 4 GPUs (c, d)"."""
    groups: dict[str, list[str]] = {}
    for node_id, reason in failures:
        groups.setdefault(reason, []).append(node_id)
    parts = [
        f"node {ids[0]} {reason}" if len(ids) == 1 else f"{len(ids)} nodes {reason} ({_ids(ids)})"
        for reason, ids in list(groups.items())[:_REASON_GROUPS]
    ]
    rest = sum(len(ids) for ids in list(groups.values())[_REASON_GROUPS:])
    if rest:
        parts.append(f"{plural(rest, 'more node')}")
    return ", ".join(parts)


# -- training: gangs -----------------------------------------------------------------------


def _place_gang(
    snapshot: Snapshot,
    job: Job,
    policy: Policy,
    blocked: Mapping[str, str],
    queued: Sequence[GangDemand],
) -> Placement | Unschedulable:
    n = job.spec.num_nodes
    request = RankRequest.of(job.spec)
    islands: dict[tuple[str, str], list[Member]] = {}
    failures: list[tuple[str, str]] = []
    for view in snapshot.nodes:
        status = _check(policy, job, request, view)
        if not status.ok:
            failures.append((view.id, status.reason))
        elif view.id in blocked:
            failures.append((view.id, blocked[view.id]))
        elif n > 1 and not view.node.fabric_name:
            failures.append((view.id, "with no fabric path (a gang of one only)"))
        else:
            member = Member(
                view=view,
                score=_score(policy, job, request, view),
                whole=view.idle and request.gpus == view.gpu_count,
            )
            islands.setdefault(island_of(view), []).append(member)
    gangs = [g for (fabric, _), ms in sorted(islands.items()) if (g := best_gang(fabric, ms, n))]
    if not gangs:
        return Unschedulable(job_id=job.id, reason=_gang_reason(job, request, islands, failures))
    # Whole nodes, then fewest leaves, then what stays intact for the queued gangs, then the
    # scores (interconnect and TFLOPS among them), then the fabric's name.
    best = min(gangs, key=lambda g: (g.partial, g.leaves, damage(g, queued), -g.score, g.fabric))
    ordered = best.nodes
    whole = n - best.partial
    where = f"fabric {best.fabric}" if best.fabric else f"node {ordered[0].id} (no fabric)"
    shape = plural(whole, "whole node") if whole else ""
    if best.partial:
        shape += (" + " if whole else "") + plural(best.partial, "partial node")
    return Placement(
        ranks=tuple(_rank(i, v, request) for i, v in enumerate(ordered)),
        master_addr=ordered[0].node.address,
        reason=f"{where}, {plural(best.leaves, 'leaf', 'leaves')}, {shape}",
    )


def _gang_reason(
    job: Job,
    request: RankRequest,
    islands: dict[tuple[str, str], list[Member]],
    failures: Sequence[tuple[str, str]],
) -> str:
    n = job.spec.num_nodes
    text = _need(job, request, n, "node") + (" on one fabric" if n > 1 else "")
    if not islands and not failures:
        return text + "; the cluster has no nodes"
    if islands:
        _, members = min(islands.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        views = [m.view for m in members]
        text += f"; largest free island has {plural(len(views), 'node')} ({describe_island(views)})"
        fitting = sum(len(ms) for ms in islands.values())
        if fitting >= n:
            text += f", {fitting} across {len(islands)} fabrics"
    else:
        text += "; no node fits"
    if failures:
        text += f" ({_explain(failures)})"
    return text


# -- inference: replicas -------------------------------------------------------------------


def _replicas_fitting(views: Sequence[NodeView], job: Job, policy: Policy) -> int:
    """How many replicas of `job` fit on `views`, first fit: what leasing must add is the rest."""
    request = RankRequest.of(job.spec)
    fitted = 0
    for view in views:
        while fitted < job.spec.replicas and _check(policy, job, request, view).ok:
            view = view.take(job.id, (_rank(fitted, view, request),))
            fitted += 1
    return fitted


def _place_replicas(
    snapshot: Snapshot,
    job: Job,
    policy: Policy,
    blocked: Mapping[str, str],
    queued: Sequence[GangDemand],
) -> Placement | Unschedulable:
    request = RankRequest.of(job.spec)
    # The views as they would be with the replicas placed so far; only the node that took
    # the last replica changes, so only it is filtered and scored again.
    views = {v.id: v for v in snapshot.nodes}

    def verdict(view: NodeView) -> tuple[Status, float]:
        status, score = _verdict(policy, job, request, view)
        if status.ok and view.id in blocked:  # it would fit, but a reservation holds it
            return Status(code=Code.UNSCHEDULABLE, reason=blocked[view.id]), 0.0
        return status, score

    verdicts = {v.id: verdict(v) for v in views.values()}
    fitting_at_start = sum(1 for status, _ in verdicts.values() if status.ok)
    ranks: list[RankPlacement] = []
    for index in range(job.spec.replicas):
        candidates = [
            (-score, node_id) for node_id, (status, score) in verdicts.items() if status.ok
        ]
        if not candidates:
            return Unschedulable(
                job_id=job.id, reason=_replica_reason(job, request, ranks, verdicts)
            )
        node_id = min(candidates)[1]
        rank = _rank(index, views[node_id], request)
        ranks.append(rank)
        views[node_id] = views[node_id].take(job.id, (rank,))
        verdicts[node_id] = verdict(views[node_id])
    first = views[ranks[0].node_id]
    return Placement(
        ranks=tuple(ranks),
        master_addr=first.node.address,
        reason=_replica_where(ranks, views, request, fitting_at_start),
    )


def _verdict(
    policy: Policy, job: Job, request: RankRequest, node: NodeView
) -> tuple[Status, float]:
    status = _check(policy, job, request, node)
    return status, (_score(policy, job, request, node) if status.ok else 0.0)


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
    verdicts: dict[str, tuple[Status, float]],
) -> str:
    text = _need(job, request, job.spec.replicas, "replica")
    if not verdicts:
        return text + "; the cluster has no nodes"
    if ranks:
        nodes = list(dict.fromkeys(r.node_id for r in ranks))
        text += f"; {len(ranks)} fit ({_ids(nodes)}), then"
    else:
        text += ";"
    failures = [(node_id, status.reason) for node_id, (status, _) in sorted(verdicts.items())]
    return f"{text} {_explain(failures)}"


_PLACERS: dict[JobKind, _Placer] = {
    JobKind.TRAINING: _place_gang,
    JobKind.INFERENCE: _place_replicas,
}
