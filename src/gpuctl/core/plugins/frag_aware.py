"""The `frag-aware` score."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import ColumnScore
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind
from gpuctl.core.packing import PodRequest, ReplicaLoss, Workload, contention
from gpuctl.core.plugins.base import (
    FEW_MISSED,
    MEMO_ROWS,
    MIX_TYPES,
    OK,
    CycleContext,
    RankRequest,
    Score,
    pick_gpus,
)
from gpuctl.core.plugins.gpu_fit import GpuFit
from gpuctl.core.snapshot import NodeView


@dataclass(frozen=True, slots=True)
class FragAware(ColumnScore):
    """Replicas where the cluster loses least capacity, by gpuctl's packing policy
    (`core.packing`, benchmark B1): the growth of FGD's expected fragmentation plus the GPU
    stranded behind CPU or memory, for the GPU the replica would take. 1 when the placement
    loses nothing beyond what the replica itself takes, falling as the loss grows.

    The fragmentation is measured against the mix of work the cycle sees (`CycleContext.mix`:
    the rank shapes of the jobs queued and running, the `MIX_TYPES` most common, weighted by
    their ranks), as benchmark B1 measures it against the trace's; with no mix, against more
    replicas like the one placed and requests of 1, 2, 4 and 8 whole GPUs.

    On a fleet of several GPU models the loss also counts capacity taken from a model that
    the mix's model-constrained work wants beyond the fleet's average model
    (`core.packing.contention`, from the models the mix's jobs accept and each model's GPUs):
    work that can run anywhere leaves the scarce models to the work that cannot.

    The loss depends only on the node's shape and what it has free, and many nodes look
    alike (every idle node of one SKU), so it is memoised for the cycle (`prepare`).
    """

    name: ClassVar[str] = "frag-aware"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    mix: tuple[tuple[RankRequest, int], ...] = ()
    excess: tuple[tuple[str, float], ...] = ()  # GPU model -> its contention, where above 0
    _memo: dict[tuple, float] = field(default_factory=dict, compare=False)
    _losses: dict[RankRequest, ReplicaLoss] = field(default_factory=dict, compare=False)
    # `excess` by model index, per tuple of model names a table has (one a cycle)
    _excess_of: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict, compare=False)
    _workload: Workload | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mix:
            workload = Workload.counted((_pod_request(r), n) for r, n in self.mix)
            object.__setattr__(self, "_workload", workload)

    def prepare(self, context: CycleContext) -> Score | None:
        mix = context.mix[:MIX_TYPES]
        t = context.table
        if t is None or not any(r.gpu_models for r, _ in mix):
            return FragAware(mix=mix)
        # The models each entry accepts, as the fleet names them (a spec's names compare
        # case-insensitively), and each model's GPUs.
        named = tuple(
            (replace(r, gpu_models=_fleet_names(r.gpu_models, t.models)) if r.gpu_models else r, n)
            for r, n in mix
        )
        workload = Workload.counted((_pod_request(r), n) for r, n in named)
        capacity = np.bincount(t.model, weights=t.gpu_count, minlength=len(t.models))
        excess = contention(workload, t.models, capacity)
        return FragAware(
            mix=named,
            excess=tuple((m, e) for m, e in zip(t.models, excess.tolist(), strict=True) if e > 0),
        )

    def _loss(self, request: RankRequest) -> ReplicaLoss:
        found = self._losses.get(request)
        if found is None:
            found = self._losses[request] = ReplicaLoss(
                _pod_request(request), self._workload, dict(self.excess)
            )
        return found

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        gpus = pick_gpus(node, request) if request.milli else ()
        if gpus is None:
            return 0.0
        n = node.node
        gpu = [g.index for g in node.gpus].index(gpus[0]) if request.gpu_milli else None
        key = (
            request,
            n.cpu_milli,
            n.memory_mib,
            n.profile.gpu_model,
            node.gpu_free_milli,
            node.cpu_free_milli,
            node.memory_free_mib,
            gpu,
        )
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) > 100_000:  # an instance kept across cycles stays bounded
                self._memo.clear()
            lost = self._loss(request).loss(
                node.gpu_free_milli,
                node.cpu_free_milli,
                node.memory_free_mib,
                n.profile.gpu_model,
                gpu,
            )
            found = self._memo[key] = (
                0.0 if lost is None else 1.0 / (1.0 + max(0, lost + request.milli) / MILLI_PER_GPU)
            )
        return found

    @staticmethod
    def _value(request: RankRequest, fits: np.ndarray, loss: np.ndarray) -> np.ndarray:
        return np.where(
            fits, 1.0 / (1.0 + np.maximum(0, loss + request.milli) / MILLI_PER_GPU), 0.0
        )

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        if len(rows) > MEMO_ROWS:
            return self._scores(job, request, table, rows)
        # The rows that changed since the job shape last looked, most of them in states seen
        # before (by this shape or another with the same request): remembered per node kind
        # and what it has free.
        entry = table.memos.frag_aware.get(id(self))
        if entry is None or entry[0] is not self:
            entry = table.memos.frag_aware[id(self)] = (self, {})
        memo: dict[tuple[Any, ...], float] = entry[1]
        keys = [
            (request, k, tuple(f), c, m)
            for k, f, c, m in zip(
                table.kind[rows].tolist(),
                table.gpu_free[rows].tolist(),
                table.cpu_free[rows].tolist(),
                table.mem_free[rows].tolist(),
                strict=True,
            )
        ]
        out = np.empty(len(rows))
        missed = []
        for i, k in enumerate(keys):
            found = memo.get(k)
            if found is None:
                missed.append(i)
            else:
                out[i] = found
        if len(missed) > FEW_MISSED:
            out[missed] = values = self._scores(job, request, table, rows[missed])
            for i, value in zip(missed, values.tolist(), strict=True):
                memo[keys[i]] = value
        else:  # node by node, in plain Python
            views = table.views
            for i in missed:
                out[i] = memo[keys[i]] = self.score(job, request, views[int(rows[i])])
        return out

    def _scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        out = np.zeros(len(rows))
        free = table.gpu_free[rows]
        gpu = None
        if request.gpu_milli:  # the GPU pick_gpus takes: tightest fit, lowest index on ties
            room = (free >= request.gpu_milli) & (table.gpu_mem[rows] >= request.gpu_memory_mib)
            order = np.where(room, free * (1 << 32) + table.gpu_index[rows], np.iinfo(np.int64).max)
            gpu = np.argmin(order, axis=1)
            picked = room.any(axis=1)
        elif request.gpus:
            picked = table.whole[rows] >= request.gpus  # pick_gpus found whole GPUs
            if request.gpu_memory_mib:
                picked &= GpuFit().codes(job, request, table, rows)[0] == OK
        else:
            picked = np.ones(len(rows), dtype=bool)
        if not picked.any():
            return out
        rows, free = rows[picked], free[picked]
        loss = self._loss(request)
        excess = None
        if self.excess:
            of_model = self._excess_of.get(table.models)
            if of_model is None:
                by_name = dict(self.excess)
                of_model = self._excess_of[table.models] = np.array(
                    [by_name.get(m, 0.0) for m in table.models]
                )
            excess = of_model[table.model[rows]]
        fits, lost = loss.losses(
            free,
            table.cpu_free[rows],
            table.mem_free[rows],
            loss.model_ok(table.models)[table.model[rows]],
            gpu[picked] if gpu is not None else None,
            excess,
        )
        out[picked] = self._value(request, fits, lost)
        return out


def _pod_request(request: RankRequest) -> PodRequest:
    gpus = 1 if request.gpu_milli else request.gpus
    return PodRequest(
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
        num_gpu=gpus,
        gpu_milli=request.gpu_milli or (MILLI_PER_GPU if request.gpus else 0),
        gpu_models=tuple(sorted(request.gpu_models)) if gpus else (),
    )


def _fleet_names(wanted: tuple[str, ...], models: tuple[str, ...]) -> tuple[str, ...]:
    """The fleet's names (`models`) of the GPU models `wanted` names, in any case."""
    folded = {m.casefold() for m in wanted}
    return tuple(m for m in models if m.casefold() in folded) or wanted
