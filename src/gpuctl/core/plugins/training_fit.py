"""The `training-fit` score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnScore
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    CycleContext,
    RankRequest,
    Score,
    mean_of,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class TrainingFit(ColumnScore):
    """Training on interconnect-rich, fast nodes: the mean of the node's network Gb/s, NVLink
    GB/s and per-GPU dense TFLOPS, each as a share of the best in the cluster."""

    name: ClassVar[str] = "training-fit"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.TRAINING})
    reads_free: ClassVar[bool] = False
    best_net: float = 0.0
    best_nvlink: float = 0.0
    best_tflops: float = 0.0

    @staticmethod
    def _figures(node: NodeView) -> tuple[float, float, float]:
        p = node.node.profile
        tflops = p.bf16_tflops / node.gpu_count if node.gpu_count else 0.0
        return p.network.total_gbps, p.nvlink_gbps, tflops

    def prepare(self, context: CycleContext) -> Score | None:
        t = context.table
        if t is not None:
            columns = (t.net, t.nvlink, t.tflops_per_gpu)
            best = [float(c.max()) if len(c) else 0.0 for c in columns]
        else:
            figures = [self._figures(v) for v in context.nodes]
            best = [max((f[i] for f in figures), default=0.0) for i in range(3)]
        if not any(best):
            return None  # nothing measured tells the nodes apart
        return TrainingFit(*best)

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        best = (self.best_net, self.best_nvlink, self.best_tflops)
        pairs = zip(self._figures(node), best, strict=True)
        parts = [have / best for have, best in pairs if best > 0]
        return sum(parts) / len(parts) if parts else 0.0

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        columns = (table.net, table.nvlink, table.tflops_per_gpu)
        pairs = [(c[rows], b) for c, b in zip(columns, self._best(), strict=True) if b > 0]
        return mean_of([have / best for have, best in pairs], len(rows), 0.0)

    def _best(self) -> tuple[float, float, float]:
        return (self.best_net, self.best_nvlink, self.best_tflops)
