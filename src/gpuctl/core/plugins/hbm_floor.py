"""The `hbm-floor` filter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnFilter
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    SUCCESS,
    Code,
    RankRequest,
    Status,
    by_kind,
    largest_sum,
    plural,
    replica_share,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class HbmFloor(ColumnFilter):
    """A replica's weights fit its GPUs, and their HBM bandwidth meets its tokens/s target:
    decoding streams every weight once per token, so tokens/s ~ HBM GB/s / weight GB."""

    name: ClassVar[str] = "hbm-floor"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    reads_free: ClassVar[bool] = False

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        spec = job.spec
        if spec.weights_gb > 0:
            need = spec.weights_gb * 1000**3 / 1024**2
            count = max(1, request.gpus)
            largest = sorted((g.memory_mib for g in node.gpus), reverse=True)[:count]
            if sum(largest) < need:
                reason = f"with {sum(largest)} MiB on {plural(count, 'GPU')} ({spec.weights_gb:g} GB of weights)"
                return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        floor = spec.hbm_floor_gbps
        if floor > 0:
            have = node.node.profile.hbm_gbps * replica_share(request)
            if have < floor:
                reason = (
                    f"with HBM {have:g} GB/s per replica (floor {floor:g}: "
                    f"{spec.target_tokens_per_s:g} tokens/s x {spec.weights_gb:g} GB)"
                )
                return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        return SUCCESS

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        spec = job.spec
        out = np.zeros(len(rows), dtype=bool)
        if spec.weights_gb > 0:
            need = spec.weights_gb * 1000**3 / 1024**2
            out |= largest_sum(table, rows, max(1, request.gpus)) < need
        floor = spec.hbm_floor_gbps
        if floor > 0:
            out |= table.hbm[rows] * replica_share(request) < floor
        return by_kind(table, rows, out)
