"""Memos a node table keeps for placement between questions (its `memos`, `engine.nodetable`):
each island's best gang per kind of job, and the rows of a mapping of node ids.

An entry is worked out at a reading of the table's clock and brought up to date from
`changed_since`: an island none of whose nodes changed since has the same best gang (a burst
cycle changes an island or two between two gangs alike).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.engine.verdicts import Shape
from gpuctl.core.model import Job
from gpuctl.core.topology import GangChoice

if TYPE_CHECKING:
    from gpuctl.core.leasing import Refused
    from gpuctl.core.plugins import Policy


def island_keys(t: NodeTable, rows: np.ndarray) -> np.ndarray:
    """A sort key per row for its island: a node with no fabric is an island alone, ("", id),
    and those sort before the fabrics, which sort by name."""
    fabric = t.fabric[rows]
    on_fabric = np.array([bool(f) for f in t.fabrics], dtype=bool)[fabric]
    return np.where(on_fabric, len(t) + fabric, rows)


class IslandMemo:
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
    ) -> IslandMemo:
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
            touched = set(island_keys(t, t.changed_since(memo.seen)).tolist())
            known = {k: c for k, c in memo.choices.items() if k not in touched}
        out = cls(t, known)
        t.memos.islands[key] = (policy.filters, policy.scores, blocked, out)
        return out


def rows_of(t: NodeTable, node_ids: Mapping[str, str]) -> np.ndarray:
    """`t.rows(node_ids)`, kept on the table for the mapping: alike jobs share one."""
    hit = t.memos.rows_of.get(id(node_ids))
    if hit is None or hit[0] is not node_ids:
        hit = t.memos.rows_of[id(node_ids)] = (node_ids, t.rows(node_ids))
    return hit[1]
