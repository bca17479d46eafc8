"""The `interconnect` filter."""

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
class Interconnect(ColumnFilter):
    """The job's floors on NVLink (inside the node) and network (between nodes) bandwidth."""

    name: ClassVar[str] = "interconnect"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    reads_free: ClassVar[bool] = False

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        profile = node.node.profile
        spec = job.spec
        if spec.min_nvlink_gbps > 0 and spec.min_nvlink_gbps > profile.nvlink_gbps:
            reason = f"with NVLink {profile.nvlink_gbps:g} gbps (floor {spec.min_nvlink_gbps:g})"
            return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        if spec.min_net_gbps > 0 and spec.min_net_gbps > profile.network.total_gbps:
            reason = (
                f"with network {profile.network.total_gbps:g} gbps (floor {spec.min_net_gbps:g})"
            )
            return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        return SUCCESS

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        spec = job.spec
        out = (spec.min_nvlink_gbps > table.nvlink[rows]) | (spec.min_net_gbps > table.net[rows])
        return by_kind(table, rows, out)
