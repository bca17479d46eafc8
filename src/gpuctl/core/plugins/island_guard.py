"""The `island-guard` score."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnScore
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    BOTH,
    CycleContext,
    RankRequest,
    Score,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class IslandGuard(ColumnScore):
    """Leave alone the idle nodes a queued gang needs: 0 on a node of another queued gang's
    largest island, 1 elsewhere. Consulted only while gangs are queued."""

    name: ClassVar[str] = "island-guard"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    protected: Mapping[str, frozenset[int]] = field(default_factory=dict)

    # by the table's ids (held, so their id is not reused): holding the table itself would
    # tie it and its cache of scores into a loop only the garbage collector breaks
    _columns: dict[int, tuple[tuple[str, ...], np.ndarray, np.ndarray]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _guarded: frozenset[int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        gangs = frozenset(j for ids in self.protected.values() for j in ids)
        object.__setattr__(self, "_guarded", gangs)

    def prepare(self, context: CycleContext) -> Score | None:
        return IslandGuard(context.protected) if context.protected else None

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        gangs = self.protected.get(node.id)
        return 0.0 if gangs and node.idle and gangs - {job.id} else 1.0

    def facet(self, job: Job) -> Any:
        """What of the job, beyond its shape, the score reads: whether it is a guarded gang."""
        return job.id if job.id in self._guarded else None

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        guarded, alone = self._columns_of(table)
        # 0 where guarded for some gang other than this job: any gang when several guard it
        spared = guarded[rows] & table.idle[rows] & (alone[rows] != job.id)
        return np.where(spared, 0.0, 1.0)

    def _columns_of(self, table: NodeTable) -> tuple[np.ndarray, np.ndarray]:
        """Per row of `table` (its static part): guarded at all, and the one gang guarding it
        (-1 when several do)."""
        cached = self._columns.get(id(table.ids))
        if cached is not None and cached[0] is table.ids:
            return cached[1], cached[2]
        guarded = np.zeros(len(table), dtype=bool)
        alone = np.full(len(table), -1, dtype=np.int64)
        for node_id, gangs in self.protected.items():
            row = table.pos.get(node_id)
            if row is None or not gangs:
                continue
            guarded[row] = True
            if len(gangs) == 1:
                alone[row] = next(iter(gangs))
        self._columns[id(table.ids)] = (table.ids, guarded, alone)
        return guarded, alone
