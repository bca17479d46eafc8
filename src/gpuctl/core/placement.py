"""Placing one job on a snapshot: a training gang on the nodes of one fabric, or the replicas
of an inference job one by one, each where the policy scores best; or, when it does not fit,
the reason a person can act on ("needs 16 nodes x 8 GPUs on one fabric; largest free island
has 8 ...").

A placer reads every node at once: the policy's filters and scores as arrays over the
snapshot's table (`engine.verdicts`), the best gang of each island (`topology.best_gang_rows`,
kept per island by `engine.islands`). It never binds: the cycle (`core.cycle`) decides what to
do with what it found.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from gpuctl.core.engine.islands import IslandMemo, island_keys, rows_of
from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.engine.verdicts import (
    ReasonBook,
    Shape,
    Verdicts,
    check,
    explain,
    recheck,
    score,
    verdicts,
)
from gpuctl.core.leasing import Refused
from gpuctl.core.model import (
    MILLI_PER_GPU,
    Job,
    JobKind,
    Placement,
    RankPlacement,
    SpreadPolicy,
)
from gpuctl.core.plugins import Code, Policy, RankRequest, Status, pick_gpus, plural
from gpuctl.core.plugins.base import price_per_gpu
from gpuctl.core.snapshot import NodeView, Snapshot
from gpuctl.core.topology import SCORE_DIGITS, GangChoice, GangDemand, best_gang_rows, damage

_REASON_IDS = 3
_NO_FABRIC = "with no fabric path (a gang of one only)"


class Miss:
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
Placer = Callable[
    [Snapshot, Job, Policy, Mapping[str, str], Sequence[GangDemand], Shape, Refused | None],
    Placement | Miss,
]


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
        extras.append(" or ".join(spec.gpu_models))
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


def _place_gang(
    snapshot: Snapshot,
    job: Job,
    policy: Policy,
    blocked: Mapping[str, str],
    queued: Sequence[GangDemand],
    job_shape: Shape,
    refused: Refused | None = None,
) -> Placement | Miss:
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
    islands = island_keys(t, members)
    if n == 1:
        gangs = _single_node_gangs(t, members, scores, whole, islands)
    else:
        memo = IslandMemo.of(t, policy, job, job_shape, blocked, refused)
        gangs = _gangs(t, members, scores, whole, islands, n, memo)
    if not gangs:
        return Miss(
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


def _gangs(
    t: NodeTable,
    rows: np.ndarray,
    scores: np.ndarray,
    whole: np.ndarray,
    islands: np.ndarray,
    n: int,
    memo: IslandMemo | None = None,
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


def replicas_fitting(views: Sequence[NodeView], job: Job, policy: Policy) -> int:
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
) -> Placement | Miss:
    request = RankRequest.of(job.spec)
    t = snapshot.table
    v = verdicts(snapshot, policy, job, request, job_shape)
    best = v.score  # -inf where ruled out; copied before it changes
    if blocked or refused is not None:  # would fit, but a reservation or its lease holds it
        best = best.copy()
        if blocked:
            best[rows_of(t, blocked)] = -np.inf
        if refused is not None:
            best[refused.rows] = -np.inf
    elif job.spec.replicas > 1:
        best = best.copy()
    fitting_at_start = np.count_nonzero(best != -np.inf)
    fabrics = _FabricSpread.of(snapshot, job, policy)
    # The nodes as they would be with the replicas placed so far; only the node that took
    # the last replica changes, so only it is filtered and scored again.
    views: dict[int, NodeView] = {}
    local: dict[int, Status] = {}
    ranks: list[RankPlacement] = []
    for index in range(job.spec.replicas):
        pick = best if fabrics is None else fabrics.weigh(best)
        row = int(pick.argmax()) if len(best) else 0  # the best, then the smallest id
        if not len(best) or best[row] == -np.inf:
            why = functools.partial(
                _replica_reason, job, request, ranks, t, v, blocked, refused, local
            )
            return Miss(why)
        view = views.get(row, t.views[row])
        rank = _rank(index, view, request)
        ranks.append(rank)
        view = views[row] = view.take(job.id, (rank,))
        if fabrics is not None:
            fabrics.took(row)
        if index == job.spec.replicas - 1:
            break  # the last: nothing is placed after it, so its node is not asked again
        status = recheck(policy, job, request, view)  # it passed them all before this replica
        if status.ok and view.id in blocked:
            status = Status(code=Code.UNSCHEDULABLE, reason=blocked[view.id])
        local[row] = status
        best[row] = score(policy, job, request, view) if status.ok else -np.inf
    taken = {w.id: w for w in views.values()}
    reason = _replica_where(ranks, taken, request, fitting_at_start)
    if fabrics is not None:
        reason += f"; {fabrics.said(ranks, t)}"
    placement = Placement(
        ranks=tuple(ranks), master_addr=taken[ranks[0].node_id].node.address, reason=reason
    )
    snapshot.stage(placement, taken)
    return placement


class _FabricSpread:
    """`spread: fabric`: the spread score is then the mean of a node's half (in the score,
    1 / (1 + the job's replicas on the node)) and a fabric's half, weighed here since it
    depends on every node of the fabric: 1 / (1 + the job's replicas in the fabric). So
    replicas go one to a fabric, then one to a node within each, where the best nodes allow:
    the two halves together move a node's score no more than `spread: node` does, so they no
    more than it push a replica off the cheapest class of nodes (onto a training island). A
    node with no fabric is a fabric of its own; a service's running replicas count."""

    __slots__ = ("counts", "group", "share")

    def __init__(self, share: float, group: np.ndarray, counts: np.ndarray) -> None:
        self.share = share
        self.group = group  # per row: its fabric, or a number of its own
        self.counts = counts  # per group: the job's replicas there

    @classmethod
    def of(cls, snapshot: Snapshot, job: Job, policy: Policy) -> _FabricSpread | None:
        if job.spec.spread is not SpreadPolicy.FABRIC:
            return None
        share = policy.share("spread", job.spec.kind)
        if not share:
            return None
        t = snapshot.table
        group = t.fabric.astype(np.int64)
        if "" in t.fabrics:
            alone = group == t.fabrics.index("")
            group[alone] = len(t.fabrics) + np.flatnonzero(alone)
        counts = np.zeros(len(t.fabrics) + len(t.ids), dtype=np.int64)
        running = snapshot.placement_of(-job.id)  # a running service's (core.services)
        for r in running.ranks if running is not None else ():
            if r.live and r.node_id in t.pos:
                counts[group[t.pos[r.node_id]]] += 1
        return cls(share, group, counts)

    def weigh(self, best: np.ndarray) -> np.ndarray:
        return best - self.share * (1.0 - 1.0 / (1.0 + self.counts[self.group])) / 2

    def took(self, row: int) -> None:
        self.counts[self.group[row]] += 1

    def said(self, ranks: Sequence[RankPlacement], t: NodeTable) -> str:
        names = {t.fabrics[t.fabric[t.pos[r.node_id]]] or f"node {r.node_id}" for r in ranks}
        return f"over {plural(len(names), 'fabric')}"


def _replica_where(
    ranks: Sequence[RankPlacement], views: dict[str, NodeView], request: RankRequest, fitting: int
) -> str:
    best_of = f"best of {plural(fitting, 'fitting node')}"
    nodes = list(dict.fromkeys(r.node_id for r in ranks))
    what = _what_it_buys([views[n] for n in nodes])
    if what:
        best_of = f"{what}, {best_of}"
    if len(ranks) > 1:
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


def _what_it_buys(views: Sequence[NodeView]) -> str:
    """ "L40S at $1.83/GPU-h, 864 GB/s HBM" for each kind of priced node of `views`: what a
    replica pays for and gets there."""
    seen = []
    for view in views:
        price = price_per_gpu(view)
        if price:
            text = f"{view.node.profile.gpu_model} at ${price:.2f}/GPU-h, "
            text += f"{view.node.profile.hbm_gbps:g} GB/s HBM"
            if text not in seen:
                seen.append(text)
    return " and ".join(seen)


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
        held[rows_of(t, blocked)] = True
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


PLACERS: dict[JobKind, Placer] = {
    JobKind.TRAINING: _place_gang,
    JobKind.INFERENCE: _place_replicas,
}
