"""The `gpu-model` filter."""

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
    OK,
    SUCCESS,
    Code,
    RankRequest,
    Status,
    all_ok,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class GpuModel(ColumnFilter):
    name: ClassVar[str] = "gpu-model"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    reads_free: ClassVar[bool] = False

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        have = node.node.profile.gpu_model
        if not request.milli or job.spec.accepts(have):
            return SUCCESS
        return Status(code=Code.UNRESOLVABLE, reason=f"with {have or 'no'} GPUs", plugin=self.name)

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if not job.spec.gpu_model or not request.milli:
            return all_ok(rows)
        match = np.array([job.spec.accepts(m) for m in table.models], dtype=bool)
        model = table.model[rows]
        return np.where(match[model], OK, NEVER), model
