"""Fabrics, leaves and islands: which nodes a gang may span, the subset of one fabric that
spans the fewest leaf switches, and what a placement leaves intact for the gangs still queued.

A fabric path is `fabric/spine/leaf`: nodes sharing the first part can be ganged, nodes sharing
the whole path hang off one leaf switch. An *island* is the free whole nodes of one fabric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.snapshot import NodeView

# Scores are sums of floats; rounding keeps two equal placements equal whatever the
# summation order, so ties fall to the readable tie-breakers (leaf, node id).
SCORE_DIGITS = 9


def leaf_of(node: NodeView) -> str:
    """The leaf switch of `node`; a node with no fabric path is a leaf of its own."""
    return node.node.leaf or f"node {node.id}"


def island_of(node: NodeView) -> tuple[str, str]:
    """(fabric, "") for a node on a fabric; ("", node id) for one with none: an island alone."""
    fabric = node.node.fabric_name
    return (fabric, "" if fabric else node.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """A node that can take one rank of the gang being placed, with its score."""

    view: NodeView
    score: float
    whole: bool  # the rank would take every GPU of an idle node


@dataclass(frozen=True, slots=True, kw_only=True)
class GangChoice:
    fabric: str
    nodes: tuple[NodeView, ...]  # in rank order: by fabric path, then node id
    leaves: int
    partial: int  # ranks that share their node or leave GPUs of it idle
    score: float


def _fewest_leaves(members: Sequence[Member], n: int) -> list[Member] | None:
    """The `n` members spanning the fewest leaves, best total score among those."""
    if len(members) < n:
        return None
    by_leaf: dict[str, list[Member]] = {}
    for m in members:
        by_leaf.setdefault(leaf_of(m.view), []).append(m)
    leaves = sorted(by_leaf.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    # Fewest leaves: the biggest leaves first is optimal for the count of leaves spanned.
    k, covered = 0, 0
    while covered < n:
        covered += len(leaves[k][1])
        k += 1

    def top(candidates: Iterable[Member]) -> list[Member]:
        return sorted(candidates, key=lambda m: (-m.score, m.view.node.fabric, m.view.id))[:n]

    if k == 1:
        # Any leaf that holds the whole gang: the best-scoring, then the smallest (keeping
        # big leaves whole for bigger gangs), then by name.
        options = [(top(ms), len(ms), leaf) for leaf, ms in leaves if len(ms) >= n]
        chosen, _, _ = min(
            options, key=lambda o: (-round(sum(m.score for m in o[0]), SCORE_DIGITS), o[1], o[2])
        )
        return chosen
    return top(m for _, ms in leaves[:k] for m in ms)


def best_gang(fabric: str, members: Sequence[Member], n: int) -> GangChoice | None:
    """The best `n` nodes of one fabric: whole nodes if there are enough, then fewest leaves.
    The reference form, node by node; what runs is `best_gang_rows`."""
    whole = [m for m in members if m.whole]
    chosen = _fewest_leaves(whole, n) if len(whole) >= n else _fewest_leaves(members, n)
    if chosen is None:
        return None
    ordered = sorted(chosen, key=lambda m: (m.view.node.fabric, m.view.id))
    return GangChoice(
        fabric=fabric,
        nodes=tuple(m.view for m in ordered),
        leaves=len({leaf_of(m.view) for m in chosen}),
        partial=sum(1 for m in chosen if not m.whole),
        score=round(sum(m.score for m in chosen), SCORE_DIGITS),
    )


def best_gang_rows(
    t: NodeTable, rows: np.ndarray, scores: np.ndarray, whole: np.ndarray, n: int
) -> GangChoice | None:
    """`best_gang` over the table's arrays, the form placement and the reservation planner
    use (a differential test holds the two together): the `n` best of `rows` (positions in
    `t`, all on one fabric, with their `scores` and whether each would be taken `whole`).
    Whole nodes if there are enough, then the `n` nodes spanning the fewest leaves (the
    biggest leaves first), best total score among those."""
    if np.count_nonzero(whole) >= n:
        rows, scores, whole = rows[whole], scores[whole], whole[whole]
    if len(rows) < n:
        return None
    leaf = t.leaf[rows]
    # np.unique(leaf, return_inverse=True, return_counts=True), by counting: leaf ids are
    # small integers (ids into the table's leaves)
    per_leaf = np.bincount(leaf)
    leaves = np.flatnonzero(per_leaf)
    counts = per_leaf[leaves]
    index = np.zeros(len(per_leaf), dtype=np.int64)
    index[leaves] = np.arange(len(leaves))
    leaf_of = index[leaf]
    biggest = np.lexsort((leaves, -counts))
    k = int(np.searchsorted(np.cumsum(counts[biggest]), n)) + 1
    # Within the candidates: best score, then fabric path (the leaf), then node id.
    ranked = np.lexsort((rows, leaf, -scores))
    if k == 1:
        # Any leaf that holds the whole gang: the best-scoring, then the smallest (keeping
        # big leaves whole for bigger gangs), then by name.
        by_leaf = ranked[np.argsort(leaf_of[ranked], kind="stable")]
        starts = np.searchsorted(leaf_of[by_leaf], np.arange(len(leaves)))
        options = []
        for u in np.flatnonzero(counts >= n).tolist():
            top = by_leaf[starts[u] : starts[u] + n]
            total = round(sum(scores[top].tolist()), SCORE_DIGITS)
            options.append((-total, int(counts[u]), int(leaves[u]), u))
        chosen = by_leaf[starts[min(options)[3]] :][:n]
    else:
        keep = np.isin(leaf_of, biggest[:k])
        chosen = ranked[keep[ranked]][:n]
    in_order = chosen[np.lexsort((rows[chosen], leaf[chosen]))]
    first = t.views[int(rows[in_order[0]])]
    return GangChoice(
        fabric=first.node.fabric_name,
        nodes=tuple(t.views[r] for r in rows[in_order].tolist()),
        leaves=len(set(leaf[chosen].tolist())),
        partial=len(chosen) - np.count_nonzero(whole[chosen]),
        score=round(sum(scores[chosen].tolist()), SCORE_DIGITS),
    )


# -- islands the queued gangs need ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GangDemand:
    """A queued multi-node gang: how many whole free nodes it needs and which could serve it."""

    job_id: int
    nodes: int
    eligible: frozenset[str]  # idle nodes on a fabric that pass its filters now
    by_fabric: tuple[tuple[str, int], ...]  # eligible nodes per fabric, largest first

    @property
    def best_fabric(self) -> str:
        return self.by_fabric[0][0] if self.by_fabric else ""

    def largest_after(self, fabric: str, taken: Iterable[str]) -> int:
        """Its largest island once the nodes `taken`, all on `fabric`, are no longer free."""
        gone = len(self.eligible.intersection(taken))
        if not gone:
            return self.by_fabric[0][1] if self.by_fabric else 0
        return max(count - gone if f == fabric else count for f, count in self.by_fabric)


def damage(choice: GangChoice | None, demands: Sequence[GangDemand]) -> tuple[int, int]:
    """How much `choice` hurts the queued gangs: (-gangs that still fit, -their islands' sum);
    smaller is better, and (0, 0) when no gang is queued. None: taking nothing (the least any
    choice can do)."""
    if not demands:
        return (0, 0)
    fabric = choice.fabric if choice is not None else ""
    taken = [v.id for v in choice.nodes] if choice is not None else []  # all on one island
    still = after = 0
    for d in demands:
        largest = d.largest_after(fabric, taken)
        after += largest
        still += largest >= d.nodes
    return (-still, -after)
