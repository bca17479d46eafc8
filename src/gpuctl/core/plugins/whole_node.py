"""The `whole-node` score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnScore
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    RankRequest,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class WholeNode(ColumnScore):
    """A gang rank alone on a node it fills: no neighbour on its NVLink, PCIe or NICs."""

    name: ClassVar[str] = "whole-node"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.TRAINING})

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        free = len(node.whole_free_gpus)
        fills = min(1.0, request.gpus / free) if free else 0.0
        return 0.5 * float(node.idle) + 0.5 * fills

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        free = table.whole[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            fills = np.where(free > 0, np.minimum(1.0, request.gpus / free), 0.0)
        return 0.5 * table.idle[rows].astype(np.float64) + 0.5 * fills
