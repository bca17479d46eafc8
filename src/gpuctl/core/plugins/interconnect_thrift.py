"""The `interconnect-thrift` score."""

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
class InterconnectThrift(ColumnScore):
    """Replicas off the interconnect they cannot use: a replica never talks over the network,
    and one on a single GPU (or a share) never over NVLink. Keeps InfiniBand for gangs."""

    name: ClassVar[str] = "interconnect-thrift"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    reads_free: ClassVar[bool] = False
    best_net: float = 0.0
    best_nvlink: float = 0.0

    def prepare(self, context: CycleContext) -> Score | None:
        t = context.table
        if t is not None:
            net = float(t.net.max()) if len(t) else 0.0
            nvlink = float(t.nvlink.max()) if len(t) else 0.0
        else:
            net = max((v.node.profile.network.total_gbps for v in context.nodes), default=0.0)
            nvlink = max((v.node.profile.nvlink_gbps for v in context.nodes), default=0.0)
        return InterconnectThrift(net, nvlink) if net or nvlink else None

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        p = node.node.profile
        unused = [(p.network.total_gbps, self.best_net)]
        if request.gpus <= 1 and not job.spec.min_nvlink_gbps:
            unused.append((p.nvlink_gbps, self.best_nvlink))
        parts = [1.0 - have / best for have, best in unused if best > 0]
        return sum(parts) / len(parts) if parts else 1.0

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        unused = [(table.net[rows], self.best_net)]
        if request.gpus <= 1 and not job.spec.min_nvlink_gbps:
            unused.append((table.nvlink[rows], self.best_nvlink))
        return mean_of([1.0 - have / best for have, best in unused if best > 0], len(rows), 1.0)
