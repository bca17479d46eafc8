"""The `cpu-memory-fit` filter."""

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
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class CpuMemoryFit(ColumnFilter):
    name: ClassVar[str] = "cpu-memory-fit"
    kinds: ClassVar[frozenset[JobKind]] = BOTH

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        n = node.node
        if request.cpu_milli > n.cpu_milli:
            reason = f"with {n.cpu_milli} cpu-milli (needs {request.cpu_milli})"
            return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        if request.memory_mib > n.memory_mib:
            reason = f"with {n.memory_mib} MiB memory (needs {request.memory_mib})"
            return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        if request.cpu_milli > node.cpu_free_milli:
            reason = f"with {node.cpu_free_milli} cpu-milli free (needs {request.cpu_milli})"
            return Status(code=Code.UNSCHEDULABLE, reason=reason, plugin=self.name)
        if request.memory_mib > node.memory_free_mib:
            reason = f"with {node.memory_free_mib} MiB memory free (needs {request.memory_mib})"
            return Status(code=Code.UNSCHEDULABLE, reason=reason, plugin=self.name)
        return SUCCESS

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        code = np.zeros(len(rows), dtype=np.int8)
        key = np.zeros(len(rows), dtype=np.int64)
        # The checks in the per-node order; a row keeps the first that rules it out. The
        # key is the figure its reason quotes, tagged with which check it was.
        checks = (
            (request.cpu_milli, table.cpu_cap, NEVER),
            (request.memory_mib, table.mem_cap, NEVER),
            (request.cpu_milli, table.cpu_free, NOT_NOW),
            (request.memory_mib, table.mem_free, NOT_NOW),
        )
        for tag, (need, have, why) in enumerate(checks):
            figure = have[rows]
            out = (code == OK) & (need > figure)
            code[out] = why
            key[out] = figure[out] * 4 + tag
        return code, key
