"""The `gpu-fit` filter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnFilter
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    BOTH,
    NEVER,
    NOT_NOW,
    OK,
    SUCCESS,
    Code,
    RankRequest,
    Status,
    all_ok,
    pick_gpus,
    plural,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class GpuFit(ColumnFilter):
    """Enough whole GPUs free, or one GPU with the share free."""

    name: ClassVar[str] = "gpu-fit"
    kinds: ClassVar[frozenset[JobKind]] = BOTH

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        if not request.milli or pick_gpus(node, request) is not None:
            return SUCCESS
        if request.gpus > node.gpu_count or not node.gpu_count:
            reason = f"with {plural(node.gpu_count, 'GPU')}"
            return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        if request.gpu_milli:
            most = max(node.gpu_free_milli)
            reason = f"with at most {most} milli free on one GPU"
        else:
            reason = f"with {len(node.whole_free_gpus)} of {plural(node.gpu_count, 'GPU')} free"
        return Status(code=Code.UNSCHEDULABLE, reason=reason, plugin=self.name)

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if not request.milli:
            return all_ok(rows)
        count = table.gpu_count[rows]
        if request.gpu_milli:  # as pick_gpus: one GPU with the share free and the memory
            room = (table.gpu_free[rows] >= request.gpu_milli) & (
                table.gpu_mem[rows] >= request.gpu_memory_mib
            )
            ok = room.any(axis=1)
            key = table.most[rows]
        else:  # as pick_gpus: enough whole GPUs, whose largest hold the memory asked
            whole = table.whole[rows]
            ok = whole >= request.gpus
            if request.gpu_memory_mib and request.gpus <= table.width:
                free_memory = np.where(table.whole_free(rows), table.gpu_mem[rows], 0)
                top = np.cumsum(-np.sort(-free_memory, axis=1), axis=1)[:, request.gpus - 1]
                ok &= top >= request.gpu_memory_mib
            elif request.gpus > table.width:
                ok[:] = False
            key = whole * (table.width + 1) + count
        never = (count < request.gpus) | (count == 0)
        code = np.where(ok, OK, np.where(never, NEVER, NOT_NOW))
        return code, np.where(never, count, key)
