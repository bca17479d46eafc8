"""The `hbm-per-dollar` score."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnScore
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    CycleContext,
    RankRequest,
    Score,
    price_per_gpu,
    replica_share,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class HbmPerDollar(ColumnScore):
    """Inference on the most HBM bandwidth per dollar, counting only the bandwidth the replica
    can use: up to its floor when it has a tokens/s target, none without one. So a replica
    with a floor goes to the cheapest node that meets it, and one without to the cheapest
    $/GPU-hour: bandwidth it does not need (and NVLink or InfiniBand, which the price pays
    for) buys it nothing. A share of the best node for the same replica; 0.5 on a node with
    no price."""

    name: ClassVar[str] = "hbm-per-dollar"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    reads_free: ClassVar[bool] = False
    nodes: tuple[NodeView, ...] = ()
    _best: dict[tuple[float, float], float] = field(default_factory=dict, compare=False)

    # GPU count, price and HBM of every node as columns, when the cycle has them (the columns
    # only: a table caches its scores, and a score holding its table would keep the two
    # alive in a loop that only the garbage collector can break)
    columns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, compare=False)

    def prepare(self, context: CycleContext) -> Score | None:
        t = context.table
        columns = (t.gpu_count, t.price, t.hbm) if t is not None else None
        return HbmPerDollar(context.nodes, columns=columns)

    @staticmethod
    def _value(node: NodeView, share: float, floor: float) -> float | None:
        price = price_per_gpu(node)
        if not price or not node.gpu_count:
            return None
        bandwidth = node.node.profile.hbm_gbps * share
        useful = min(bandwidth, floor) if floor > 0 else 1.0
        return useful / (price * share)

    @staticmethod
    def _values(
        table: NodeTable, rows: np.ndarray | slice, share: float, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(value, has a value) per row: `_value` over columns, in the same operations."""
        return HbmPerDollar._of_columns(
            table.gpu_count[rows], table.price[rows], table.hbm[rows], share, floor
        )

    @staticmethod
    def _of_columns(
        count: np.ndarray, price: np.ndarray, hbm: np.ndarray, share: float, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        has = (count > 0) & (price > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_gpu = np.where(has, price / np.where(has, count, 1), 0.0)
            bandwidth = hbm * share
            useful = np.minimum(bandwidth, floor) if floor > 0 else np.ones(len(hbm))
            value = useful / (per_gpu * share)
        return np.where(has, value, 0.0), has

    def _best_for(self, share: float, floor: float) -> float:
        key = (share, floor)
        if key not in self._best:
            if self.columns is not None:
                values, has = self._of_columns(*self.columns, share, floor)
                self._best[key] = float(values[has].max()) if has.any() else 0.0
            else:
                found = (self._value(v, share, floor) for v in self.nodes)
                self._best[key] = max((v for v in found if v is not None), default=0.0)
        return self._best[key]

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        share = replica_share(request)
        if not share:
            return 0.5
        floor = job.spec.hbm_floor_gbps
        value = self._value(node, share, floor)
        if value is None:
            return 0.5
        best = self._best_for(share, floor)
        return min(1.0, value / best) if best > 0 else 0.5

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        share = replica_share(request)
        if not share:
            return np.full(len(rows), 0.5)
        floor = job.spec.hbm_floor_gbps
        value, has = self._values(table, rows, share, floor)
        best = self._best_for(share, floor)
        if not best > 0:
            return np.full(len(rows), 0.5)
        return np.where(has, np.minimum(1.0, value / best), 0.5)
