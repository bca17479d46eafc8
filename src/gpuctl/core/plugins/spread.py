"""The `spread` score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnScore
from gpuctl.core.model import Job, JobKind, SpreadPolicy
from gpuctl.core.plugins.base import (
    RankRequest,
)
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class Spread(ColumnScore):
    """Replicas of one service on different nodes, so losing a node loses one replica; the
    same for every node when the job asks to be packed (`spread: none`). With `spread:
    fabric` this is half of the score, the node's half: the replica placer weighs the other
    half, the fabric's, since it depends on the other nodes of the fabric
    (`core.placement._FabricSpread`)."""

    name: ClassVar[str] = "spread"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    reads_free: ClassVar[bool] = False

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        if job.spec.spread is SpreadPolicy.NONE:
            return 1.0
        # A running service's replicas count for its replacements (held under -id).
        here = node.ranks_of(job.id) + node.ranks_of(-job.id)
        if job.spec.spread is SpreadPolicy.FABRIC:
            return (1.0 + 1.0 / (1 + here)) / 2
        return 1.0 / (1 + here)

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        return np.ones(len(rows))  # a node with ranks of the job itself is asked by itself
