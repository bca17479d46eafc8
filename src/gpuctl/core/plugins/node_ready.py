"""The `node-ready` filter."""

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
    by_kind,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class NodeReady(ColumnFilter):
    name: ClassVar[str] = "node-ready"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    reads_free: ClassVar[bool] = False

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        if node.schedulable:
            return SUCCESS
        why = f" ({node.node.state_reason})" if node.node.state_reason else ""
        return Status(
            code=Code.UNRESOLVABLE, reason=f"{node.node.state.value}{why}", plugin=self.name
        )

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return by_kind(table, rows, ~table.ready[rows])
