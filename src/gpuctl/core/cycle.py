"""One scheduling cycle: pending jobs in queue order, each gang or replica set placed whole
or not at all on a copy of the snapshot, and for every job left waiting a reason to act on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, Placement, RankPlacement
from gpuctl.core.plugins import NodeReady, Policy, RankRequest, Status, pick_gpus, plural
from gpuctl.core.snapshot import NodeView, Snapshot

# Scores are sums of floats; rounding keeps two equal placements equal whatever the
# summation order, so ties fall to the readable tie-breakers (leaf, node id).
_SCORE_DIGITS = 9
# A reason lists at most this many groups of nodes: enough to act on, short enough to read.
_REASON_GROUPS = 4
_REASON_IDS = 3


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


def queue_order(job: Job) -> tuple[int, bool, datetime | None, int]:
    """Higher priority first, then older, then lower id (jobs with no creation time last)."""
    return (-job.spec.priority, job.created_at is None, job.created_at, job.id)


def schedule(
    snapshot: Snapshot, pending: Sequence[Job], policy: Policy, *, now: datetime
) -> CycleResult:
    """Place what fits of `pending`; `snapshot` itself is left as it was.

    1. order the queue; 2. place each job whole or not at all; 3. assume what was placed,
    on a copy of the snapshot, so later jobs in the same cycle see it.
    """
    del now  # reservations and backfill will need it; this version decides on free capacity only
    work = snapshot.copy()
    bindings: list[Binding] = []
    waiting: list[Unschedulable] = []
    for job in sorted(pending, key=queue_order):
        outcome = _PLACERS[job.spec.kind](work, job, policy)
        if isinstance(outcome, Unschedulable):
            waiting.append(outcome)
            continue
        work.assume(job.id, outcome)
        bindings.append(Binding(job_id=job.id, placement=outcome))
    return CycleResult(bindings=tuple(bindings), unschedulable=tuple(waiting))


def _check(policy: Policy, job: Job, request: RankRequest, node: NodeView) -> Status:
    # Whatever filters a policy names, nothing new goes on a node that is not READY.
    if not node.schedulable:
        return NodeReady().filter(job, request, node)
    return policy.check(job, request, node)


def _score(policy: Policy, job: Job, request: RankRequest, node: NodeView) -> float:
    return round(policy.score(job, request, node), _SCORE_DIGITS)


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
    if spec.gpu_model and request.milli:
        text += f" ({spec.gpu_model})"
    if request.gpu_memory_mib and request.milli:
        text += f" with {request.gpu_memory_mib} MiB"
    return text


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_REASON_IDS])
    return shown + (f" +{len(ids) - _REASON_IDS} more" if len(ids) > _REASON_IDS else "")


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


@dataclass(frozen=True, slots=True, kw_only=True)
class _Gang:
    fabric: str
    nodes: tuple[NodeView, ...]
    leaves: int
    score: float


def _leaf(node: NodeView) -> str:
    return node.node.leaf or f"node {node.id}"


def _best_in_island(fabric: str, members: Sequence[tuple[NodeView, float]], n: int) -> _Gang | None:
    """The `n` nodes of one fabric spanning the fewest leaves, best total score among those."""
    if len(members) < n:
        return None
    by_leaf: dict[str, list[tuple[NodeView, float]]] = {}
    for m in members:
        by_leaf.setdefault(_leaf(m[0]), []).append(m)
    leaves = sorted(by_leaf.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    # Fewest leaves: the biggest leaves first is optimal for the count of leaves spanned.
    k, covered = 0, 0
    while covered < n:
        covered += len(leaves[k][1])
        k += 1

    def top(candidates: Sequence[tuple[NodeView, float]]) -> list[tuple[NodeView, float]]:
        return sorted(candidates, key=lambda m: (-m[1], m[0].node.fabric, m[0].id))[:n]

    if k == 1:
        # Any leaf that holds the whole gang: the best-scoring, then the smallest (keeping
        # big leaves whole for bigger gangs), then by name.
        options = [(top(ms), len(ms), leaf) for leaf, ms in leaves if len(ms) >= n]
        chosen, _, _ = min(
            options, key=lambda o: (-round(sum(s for _, s in o[0]), _SCORE_DIGITS), o[1], o[2])
        )
    else:
        chosen = top([m for _, ms in leaves[:k] for m in ms])
    return _Gang(
        fabric=fabric,
        nodes=tuple(v for v, _ in chosen),
        leaves=len({_leaf(v) for v, _ in chosen}),
        score=round(sum(s for _, s in chosen), _SCORE_DIGITS),
    )


def _place_gang(snapshot: Snapshot, job: Job, policy: Policy) -> Placement | Unschedulable:
    n = job.spec.num_nodes
    request = RankRequest.of(job.spec)
    islands: dict[tuple[str, str], list[tuple[NodeView, float]]] = {}
    failures: list[tuple[str, str]] = []
    for view in snapshot.nodes:
        status = _check(policy, job, request, view)
        if not status.ok:
            failures.append((view.id, status.reason))
        elif n > 1 and not view.node.fabric_name:
            failures.append((view.id, "with no fabric path (a gang of one only)"))
        else:
            # A node with no fabric is an island of its own.
            key = (view.node.fabric_name, "" if view.node.fabric_name else view.id)
            islands.setdefault(key, []).append((view, _score(policy, job, request, view)))
    gangs = [
        g for (fabric, _), ms in sorted(islands.items()) if (g := _best_in_island(fabric, ms, n))
    ]
    if not gangs:
        return Unschedulable(job_id=job.id, reason=_gang_reason(job, request, islands, failures))
    best = min(gangs, key=lambda g: (g.leaves, -g.score, g.fabric))
    ordered = sorted(best.nodes, key=lambda v: (v.node.fabric, v.id))
    whole = sum(1 for v in ordered if v.idle and request.gpus == v.gpu_count)
    where = f"fabric {best.fabric}" if best.fabric else f"node {ordered[0].id} (no fabric)"
    shape = plural(whole, "whole node") if whole else ""
    if whole < n:
        shape += (" + " if whole else "") + plural(n - whole, "partial node")
    return Placement(
        ranks=tuple(_rank(i, v, request) for i, v in enumerate(ordered)),
        master_addr=ordered[0].node.address,
        reason=f"{where}, {plural(best.leaves, 'leaf', 'leaves')}, {shape}",
    )


def _gang_reason(
    job: Job,
    request: RankRequest,
    islands: dict[tuple[str, str], list[tuple[NodeView, float]]],
    failures: Sequence[tuple[str, str]],
) -> str:
    n = job.spec.num_nodes
    text = _need(job, request, n, "node") + (" on one fabric" if n > 1 else "")
    if not islands and not failures:
        return text + "; the cluster has no nodes"
    if islands:
        (fabric, _), members = min(islands.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        on = f" on fabric {fabric}" if fabric else ""
        text += f"; largest fit: {plural(len(members), 'node')}{on}"
        fitting = sum(len(ms) for ms in islands.values())
        if fitting >= n:
            text += f", {fitting} across {len(islands)} fabrics"
    else:
        text += "; no node fits"
    if failures:
        text += f" ({_explain(failures)})"
    return text


# -- inference: replicas -------------------------------------------------------------------


def _place_replicas(snapshot: Snapshot, job: Job, policy: Policy) -> Placement | Unschedulable:
    request = RankRequest.of(job.spec)
    # The views as they would be with the replicas placed so far; only the node that took
    # the last replica changes, so only it is filtered and scored again.
    views = {v.id: v for v in snapshot.nodes}
    verdicts = {v.id: _verdict(policy, job, request, v) for v in views.values()}
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
        verdicts[node_id] = _verdict(policy, job, request, views[node_id])
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


_PLACERS: dict[JobKind, Callable[[Snapshot, Job, Policy], Placement | Unschedulable]] = {
    JobKind.TRAINING: _place_gang,
    JobKind.INFERENCE: _place_replicas,
}
