"""The `best-fit` score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnScore
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind
from gpuctl.core.plugins.base import (
    RankRequest,
    share_left,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class BestFit(ColumnScore):
    """Tight packing: the less GPU (and CPU) capacity the node keeps free after, the better."""

    name: ClassVar[str] = "best-fit"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        parts = []
        if node.gpu_count:
            gpu_capacity = node.gpu_count * MILLI_PER_GPU
            parts.append(share_left(node.free_gpu_milli, request.milli, gpu_capacity))
        if node.node.cpu_milli:
            parts.append(share_left(node.cpu_free_milli, request.cpu_milli, node.node.cpu_milli))
        if not parts:
            return 0.0
        return min(1.0, max(0.0, 1.0 - sum(parts) / len(parts)))

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        count = table.gpu_count[rows]
        cpu_cap = table.cpu_cap[rows]
        gpu_capacity = count * MILLI_PER_GPU
        has_gpu, has_cpu = count > 0, cpu_cap > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            gpu_left = (table.gpu_free[rows].sum(axis=1) - request.milli) / gpu_capacity
            cpu_left = (table.cpu_free[rows] - request.cpu_milli) / cpu_cap
        # sum(parts) / len(parts), in the same order as the per-node form
        both = (gpu_left + cpu_left) / 2
        mean = np.where(has_gpu & has_cpu, both, np.where(has_gpu, gpu_left, cpu_left))
        out = np.minimum(1.0, np.maximum(0.0, 1.0 - mean))
        return np.where(has_gpu | has_cpu, out, 0.0)
