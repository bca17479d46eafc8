"""The `gpu-memory` filter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnFilter
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    BOTH,
    SUCCESS,
    Code,
    RankRequest,
    Status,
    all_ok,
    by_kind,
    largest_sum,
    plural,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class GpuMemory(ColumnFilter):
    """The node's GPUs can hold the replica's weights and KV cache at all."""

    name: ClassVar[str] = "gpu-memory"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    reads_free: ClassVar[bool] = False

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        need = request.gpu_memory_mib
        if not need or not request.milli:
            return SUCCESS
        count = 1 if request.gpu_milli else request.gpus
        largest = sorted((g.memory_mib for g in node.gpus), reverse=True)[:count]
        if len(largest) == count and sum(largest) >= need:
            return SUCCESS
        per_gpu = largest[0] if largest else 0
        return Status(
            code=Code.UNRESOLVABLE,
            reason=f"with {per_gpu} MiB per GPU (needs {need} MiB on {plural(count, 'GPU')})",
            plugin=self.name,
        )

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        need = request.gpu_memory_mib
        if not need or not request.milli:
            return all_ok(rows)
        count = 1 if request.gpu_milli else request.gpus
        ok = (table.gpu_count[rows] >= count) & (largest_sum(table, rows, count) >= need)
        return by_kind(table, rows, ~ok)
