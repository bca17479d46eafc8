"""Scheduling plugins, after the Kubernetes scheduler framework: a filter says whether one
rank of a job can go on a node, a score ranks the nodes that can take it.

A `Policy` is a name plus ordered filters and weighted scores, built by name from the tables here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from gpuctl.core.backfill import BACKFILLS, Backfill, FirstFit
from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.framework import ColumnFilter, ColumnScore, FilterPlugin, ScorePlugin
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, JobSpec
from gpuctl.core.nodetable import NodeTable
from gpuctl.core.packing import (
    PodRequest,
    ReplicaLoss,
    Workload,
)
from gpuctl.core.preempt import PREEMPTORS, NoPreemption, Preemptor
from gpuctl.core.queue import QUEUE_SORTS, PriorityFifo, QueueSort
from gpuctl.core.snapshot import NodeView

BOTH = frozenset(JobKind)


class Code(enum.IntEnum):
    """How the queue should read a filter's answer; ordered from best to worst."""

    SUCCESS = 0
    UNSCHEDULABLE = 1  # not now: fits once running work on the node ends
    UNRESOLVABLE = 2  # not on this node as it is: model, size, interconnect, state


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    code: Code = Code.SUCCESS
    reason: str = ""  # reads after "node x" or "3 nodes", e.g. "with 4 of 8 GPUs free"
    plugin: str = ""

    @property
    def ok(self) -> bool:
        return self.code is Code.SUCCESS


SUCCESS = Status()


@dataclass(frozen=True, slots=True, kw_only=True)
class RankRequest:
    """What one rank (training) or replica (inference) takes on its node."""

    gpus: int = 0  # whole GPUs
    gpu_milli: int = 0  # a share of one GPU; 0 = whole GPUs (or none)
    gpu_memory_mib: int = 0  # across the rank's GPUs
    cpu_milli: int = 0
    memory_mib: int = 0

    @classmethod
    def of(cls, spec: JobSpec) -> RankRequest:
        share = spec.gpu_milli if spec.kind is JobKind.INFERENCE else 0
        return cls(
            gpus=0 if share else spec.gpus_per_node,
            gpu_milli=share,
            gpu_memory_mib=spec.gpu_memory_mib,
            cpu_milli=spec.cpu_milli,
            memory_mib=spec.memory_mib,
        )

    @property
    def milli(self) -> int:
        """GPU capacity the rank takes, in milli-GPU."""
        return self.gpu_milli or self.gpus * MILLI_PER_GPU

    def describe(self) -> str:
        if self.gpu_milli:
            return f"{self.gpu_milli} milli-GPU"
        if self.gpus:
            return plural(self.gpus, "GPU")
        return "CPU only"


def plural(n: float, word: str, many: str = "") -> str:
    """ "1 GPU", "2 GPUs", "0.5 GPUs"; `many` for irregular words."""
    return f"{n:g} {word}" if n == 1 else f"{n:g} {many or word + 's'}"


def pick_gpus(node: NodeView, request: RankRequest) -> tuple[int, ...] | None:
    """The GPUs a rank takes on `node`, or None when none fit.

    One function for the fit filter and the cycle, so what a filter passes is what gets bound.
    A share takes the tightest GPU that still fits (lowest index on ties), keeping whole GPUs
    whole; whole GPUs are the lowest-index free ones.
    """
    if request.gpu_milli:
        fits = [
            (free, g.index)
            for g, free in zip(node.gpus, node.gpu_free_milli, strict=True)
            if free >= request.gpu_milli and g.memory_mib >= request.gpu_memory_mib
        ]
        return (min(fits)[1],) if fits else None
    if not request.gpus:
        return ()
    whole = node.whole_free_gpus
    if len(whole) < request.gpus:
        return None
    chosen = whole[: request.gpus]
    if sum(g.memory_mib for g in chosen) < request.gpu_memory_mib:
        # Only a node of mixed GPUs gets here: take its largest free ones instead.
        chosen = sorted(whole, key=lambda g: (-g.memory_mib, g.index))[: request.gpus]
        if sum(g.memory_mib for g in chosen) < request.gpu_memory_mib:
            return None
    return tuple(sorted(g.index for g in chosen))


# The extension points (core.framework): every plugin below declares what it can do.
Filter = FilterPlugin
Score = ScorePlugin


# Column forms. Every plugin here also answers for many nodes at once, from the columns of
# a `NodeTable` (`rows`: which rows), with exactly the figures its per-node method gives
# (the same float operations in the same order: the cycle compares scores exactly). The
# cycle uses them when every plugin of its policy has one (`core.verdicts`); a policy with
# one plugin without is asked node by node, as before. The contract, which lets the cycle
# cache answers per job shape and per node state:
# - a node is read only through the table's columns; a node holding ranks of the job itself
#   is always asked node by node (that is how `spread` sees the job's own replicas);
# - a job is read only through its shape (`core.verdicts.shape`: the spec without what
#   placement ignores), plus what `facet(job)` returns where a plugin defines one;
# - `reads_free = False`: the plugin reads only what a node is, never what it has free, so
#   its answer for a node holds all cycle (without it, the node is asked again whenever it
#   changes).


# Up to this many rows, frag-aware looks each node's state up in what it has worked out
# before (about a microsecond a row) instead of working out every row again.
_MEMO_ROWS = 512
# Up to this many states not seen before, frag-aware works them out node by node.
_FEW_MISSED = 4
# Rank shapes of the cycle's mix that frag-aware packs for: FGD's "typical pods". The cost of
# each score grows with it; a mix rarely has more that matter.
MIX_TYPES = 8
_OK = np.int8(Code.SUCCESS)
_NOT_NOW = np.int8(Code.UNSCHEDULABLE)
_NEVER = np.int8(Code.UNRESOLVABLE)


def _all_ok(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(rows), dtype=np.int8), np.zeros(len(rows), dtype=np.int64)


def _by_kind(table: NodeTable, rows: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and keys of a filter that reads only what a node is: rows ruled out (`out`)
    are keyed by their kind, which settles the reason."""
    key = np.zeros(len(rows), dtype=np.int64)
    if out.any():
        key[out] = table.kind[rows[out]]
    return np.where(out, _NEVER, _OK), key


def _largest_sum(table: NodeTable, rows: np.ndarray, count: int) -> np.ndarray:
    """Per row: the sum of its `count` largest GPU memories (all of them if it has fewer)."""
    if count <= 0:
        return np.zeros(len(rows), dtype=np.int64)
    return table.mem_desc_cum[rows, min(count, table.width) - 1]


# -- filters -------------------------------------------------------------------------------


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
        return _by_kind(table, rows, ~table.ready[rows])


@dataclass(frozen=True, slots=True)
class GpuModel(ColumnFilter):
    name: ClassVar[str] = "gpu-model"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    reads_free: ClassVar[bool] = False

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        want = job.spec.gpu_model
        have = node.node.profile.gpu_model
        if not want or not request.milli or want.casefold() == have.casefold():
            return SUCCESS
        return Status(code=Code.UNRESOLVABLE, reason=f"with {have or 'no'} GPUs", plugin=self.name)

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        want = job.spec.gpu_model
        if not want or not request.milli:
            return _all_ok(rows)
        match = np.array([m.casefold() == want.casefold() for m in table.models], dtype=bool)
        model = table.model[rows]
        return np.where(match[model], _OK, _NEVER), model


@dataclass(frozen=True, slots=True)
class GpuMemory(ColumnFilter):
    """The node's GPUs can hold the replica's weights and KV cache at all."""

    name: ClassVar[str] = "gpu-memory"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    reads_free: ClassVar[bool] = False

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        need = request.gpu_memory_mib
        if not need or not request.milli:
            return SUCCESS
        count = 1 if request.gpu_milli else request.gpus
        largest = sorted((g.memory_mib for g in node.gpus), reverse=True)[:count]
        if len(largest) == count and sum(largest) >= need:
            return SUCCESS
        per_gpu = largest[0] if largest else 0
        return Status(
            code=Code.UNRESOLVABLE,
            reason=f"with {per_gpu} MiB per GPU (needs {need} MiB on {plural(count, 'GPU')})",
            plugin=self.name,
        )

    def codes(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        need = request.gpu_memory_mib
        if not need or not request.milli:
            return _all_ok(rows)
        count = 1 if request.gpu_milli else request.gpus
        ok = (table.gpu_count[rows] >= count) & (_largest_sum(table, rows, count) >= need)
        return _by_kind(table, rows, ~ok)


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
            return _all_ok(rows)
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
        code = np.where(ok, _OK, np.where(never, _NEVER, _NOT_NOW))
        return code, np.where(never, count, key)


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
            (request.cpu_milli, table.cpu_cap, _NEVER),
            (request.memory_mib, table.mem_cap, _NEVER),
            (request.cpu_milli, table.cpu_free, _NOT_NOW),
            (request.memory_mib, table.mem_free, _NOT_NOW),
        )
        for tag, (need, have, why) in enumerate(checks):
            figure = have[rows]
            out = (code == _OK) & (need > figure)
            code[out] = why
            key[out] = figure[out] * 4 + tag
        return code, key


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
        return _by_kind(table, rows, out)


# -- scores --------------------------------------------------------------------------------


def _left(free: int, taken: int, capacity: int) -> float:
    return (free - taken) / capacity if capacity > 0 else 0.0


@dataclass(frozen=True, slots=True)
class BestFit(ColumnScore):
    """Tight packing: the less GPU (and CPU) capacity the node keeps free after, the better."""

    name: ClassVar[str] = "best-fit"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        parts = []
        if node.gpu_count:
            gpu_capacity = node.gpu_count * MILLI_PER_GPU
            parts.append(_left(node.free_gpu_milli, request.milli, gpu_capacity))
        if node.node.cpu_milli:
            parts.append(_left(node.cpu_free_milli, request.cpu_milli, node.node.cpu_milli))
        if not parts:
            return 0.0
        return min(1.0, max(0.0, 1.0 - sum(parts) / len(parts)))

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        count = table.gpu_count[rows]
        cpu_cap = table.cpu_cap[rows]
        gpu_capacity = count * MILLI_PER_GPU
        has_gpu, has_cpu = count > 0, cpu_cap > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            gpu_left = (table.gpu_free[rows].sum(axis=1) - request.milli) / gpu_capacity
            cpu_left = (table.cpu_free[rows] - request.cpu_milli) / cpu_cap
        # sum(parts) / len(parts), in the same order as the per-node form
        both = (gpu_left + cpu_left) / 2
        mean = np.where(has_gpu & has_cpu, both, np.where(has_gpu, gpu_left, cpu_left))
        out = np.minimum(1.0, np.maximum(0.0, 1.0 - mean))
        return np.where(has_gpu | has_cpu, out, 0.0)


@dataclass(frozen=True, slots=True)
class Spread(ColumnScore):
    """Replicas of one service on different nodes, so losing a node loses one replica."""

    name: ClassVar[str] = "spread"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    reads_free: ClassVar[bool] = False

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        return 1.0 / (1 + node.ranks_of(job.id))

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        return np.ones(len(rows))  # a node with ranks of the job itself is asked by itself


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

    The loss depends only on the node's shape and what it has free, and many nodes look
    alike (every idle node of one SKU), so it is memoised for the cycle (`prepare`).
    """

    name: ClassVar[str] = "frag-aware"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    mix: tuple[tuple[RankRequest, int], ...] = ()
    _memo: dict[tuple, float] = field(default_factory=dict, compare=False)
    _losses: dict[RankRequest, ReplicaLoss] = field(default_factory=dict, compare=False)
    _workload: Workload | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mix:
            workload = Workload.counted((_pod_request(r), n) for r, n in self.mix)
            object.__setattr__(self, "_workload", workload)

    def prepare(self, context: CycleContext) -> Score | None:
        return FragAware(mix=context.mix[:MIX_TYPES])

    def _loss(self, request: RankRequest) -> ReplicaLoss:
        found = self._losses.get(request)
        if found is None:
            found = self._losses[request] = ReplicaLoss(_pod_request(request), self._workload)
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
        if len(rows) > _MEMO_ROWS:
            return self._scores(job, request, table, rows)
        # The rows that changed since the job shape last looked, most of them in states seen
        # before (by this shape or another with the same request): remembered per node kind
        # and what it has free.
        key = ("frag-aware", id(self))
        entry = table.cache.get(key)
        if entry is None or entry[0] is not self:
            entry = table.cache[key] = (self, {})
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
        if len(missed) > _FEW_MISSED:
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
                picked &= GpuFit().codes(job, request, table, rows)[0] == _OK
        else:
            picked = np.ones(len(rows), dtype=bool)
        if not picked.any():
            return out
        rows, free = rows[picked], free[picked]
        loss = self._loss(request)
        fits, lost = loss.losses(
            free,
            table.cpu_free[rows],
            table.mem_free[rows],
            loss.model_ok(table.models)[table.model[rows]],
            gpu[picked] if gpu is not None else None,
        )
        out[picked] = self._value(request, fits, lost)
        return out


def _pod_request(request: RankRequest) -> PodRequest:
    return PodRequest(
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
        num_gpu=1 if request.gpu_milli else request.gpus,
        gpu_milli=request.gpu_milli or (MILLI_PER_GPU if request.gpus else 0),
    )


# -- workload-aware node choice: the measured profile decides ------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CycleContext:
    """What a score may know of the whole cycle (the framework's PreScore and CycleState)."""

    nodes: tuple[NodeView, ...] = ()  # every node as the cycle starts
    # idle node -> the queued gangs whose largest island it is part of
    protected: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # The same nodes as columns (None: not built); what a score takes from every node's
    # fixed figures it can read from here in one pass.
    table: NodeTable | None = None
    # The mix of work: each rank shape of the jobs queued and running, with how many ranks
    # (or replicas) have it, the most common first.
    mix: tuple[tuple[RankRequest, int], ...] = ()

    @staticmethod
    def mix_of(jobs: Iterable[Job]) -> tuple[tuple[RankRequest, int], ...]:
        """`mix` for `jobs`: ranks counted by shape, the most common first (ties: by shape)."""
        # counted by what RankRequest.of reads first (one request built per kind of spec, not
        # per job: thousands queue at scale), then by request
        by_spec: dict[tuple[Any, ...], tuple[JobSpec, int]] = {}
        for job in jobs:
            spec = job.spec
            inference = spec.kind is JobKind.INFERENCE
            key = (
                inference,
                spec.gpu_milli,
                spec.gpus_per_node,
                spec.gpu_memory_mib,
                spec.cpu_milli,
                spec.memory_mib,
            )
            ranks = spec.replicas if inference else spec.num_nodes
            seen = by_spec.get(key)
            by_spec[key] = (spec, ranks + (seen[1] if seen is not None else 0))
        counts: dict[RankRequest, int] = {}
        for spec, ranks in by_spec.values():
            request = RankRequest.of(spec)
            counts[request] = counts.get(request, 0) + ranks
        return tuple(
            sorted(
                counts.items(),
                key=lambda kv: (
                    -kv[1],
                    kv[0].gpus,
                    kv[0].gpu_milli,
                    kv[0].gpu_memory_mib,
                    kv[0].cpu_milli,
                    kv[0].memory_mib,
                ),
            )
        )


def replica_share(request: RankRequest) -> float:
    """GPUs' worth one replica takes: whole GPUs, or the share of one."""
    return request.gpus or request.gpu_milli / MILLI_PER_GPU


def _price_per_gpu(node: NodeView) -> float:
    n = node.node
    return n.price_per_hour / node.gpu_count if node.gpu_count and n.price_per_hour > 0 else 0.0


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
            out |= _largest_sum(table, rows, max(1, request.gpus)) < need
        floor = spec.hbm_floor_gbps
        if floor > 0:
            out |= table.hbm[rows] * replica_share(request) < floor
        return _by_kind(table, rows, out)


@dataclass(frozen=True, slots=True)
class TrainingFit(ColumnScore):
    """Training on interconnect-rich, fast nodes: the mean of the node's network Gb/s, NVLink
    GB/s and per-GPU dense TFLOPS, each as a share of the best in the cluster."""

    name: ClassVar[str] = "training-fit"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.TRAINING})
    reads_free: ClassVar[bool] = False
    best_net: float = 0.0
    best_nvlink: float = 0.0
    best_tflops: float = 0.0

    @staticmethod
    def _figures(node: NodeView) -> tuple[float, float, float]:
        p = node.node.profile
        tflops = p.bf16_tflops / node.gpu_count if node.gpu_count else 0.0
        return p.network.total_gbps, p.nvlink_gbps, tflops

    def prepare(self, context: CycleContext) -> Score | None:
        t = context.table
        if t is not None:
            columns = (t.net, t.nvlink, t.tflops_per_gpu)
            best = [float(c.max()) if len(c) else 0.0 for c in columns]
        else:
            figures = [self._figures(v) for v in context.nodes]
            best = [max((f[i] for f in figures), default=0.0) for i in range(3)]
        if not any(best):
            return None  # nothing measured tells the nodes apart
        return TrainingFit(*best)

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        best = (self.best_net, self.best_nvlink, self.best_tflops)
        pairs = zip(self._figures(node), best, strict=True)
        parts = [have / best for have, best in pairs if best > 0]
        return sum(parts) / len(parts) if parts else 0.0

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        columns = (table.net, table.nvlink, table.tflops_per_gpu)
        pairs = [(c[rows], b) for c, b in zip(columns, self._best(), strict=True) if b > 0]
        return _mean([have / best for have, best in pairs], len(rows), 0.0)

    def _best(self) -> tuple[float, float, float]:
        return (self.best_net, self.best_nvlink, self.best_tflops)


@dataclass(frozen=True, slots=True)
class HbmPerDollar(ColumnScore):
    """Inference on the most HBM bandwidth per dollar, counting only the bandwidth the replica
    can use: up to its floor when it has a tokens/s target. A share of the best node for the
    same replica; 0.5 on a node with no price."""

    name: ClassVar[str] = "hbm-per-dollar"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    reads_free: ClassVar[bool] = False
    nodes: tuple[NodeView, ...] = ()
    _best: dict[tuple[float, float], float] = field(default_factory=dict, compare=False)

    # GPU count, price and HBM of every node as columns, when the cycle has them (the columns
    # only: a table caches its scores, and a score holding its table would keep the two
    # alive in a loop that only the garbage collector can break)
    columns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, compare=False)

    def prepare(self, context: CycleContext) -> Score | None:
        t = context.table
        columns = (t.gpu_count, t.price, t.hbm) if t is not None else None
        return HbmPerDollar(context.nodes, columns=columns)

    @staticmethod
    def _value(node: NodeView, share: float, floor: float) -> float | None:
        price = _price_per_gpu(node)
        if not price or not node.gpu_count:
            return None
        bandwidth = node.node.profile.hbm_gbps * share
        useful = min(bandwidth, floor) if floor > 0 else bandwidth
        return useful / (price * share)

    @staticmethod
    def _values(
        table: NodeTable, rows: np.ndarray | slice, share: float, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(value, has a value) per row: `_value` over columns, in the same operations."""
        return HbmPerDollar._of_columns(
            table.gpu_count[rows], table.price[rows], table.hbm[rows], share, floor
        )

    @staticmethod
    def _of_columns(
        count: np.ndarray, price: np.ndarray, hbm: np.ndarray, share: float, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        has = (count > 0) & (price > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_gpu = np.where(has, price / np.where(has, count, 1), 0.0)
            bandwidth = hbm * share
            useful = np.minimum(bandwidth, floor) if floor > 0 else bandwidth
            value = useful / (per_gpu * share)
        return np.where(has, value, 0.0), has

    def _best_for(self, share: float, floor: float) -> float:
        key = (share, floor)
        if key not in self._best:
            if self.columns is not None:
                values, has = self._of_columns(*self.columns, share, floor)
                self._best[key] = float(values[has].max()) if has.any() else 0.0
            else:
                found = (self._value(v, share, floor) for v in self.nodes)
                self._best[key] = max((v for v in found if v is not None), default=0.0)
        return self._best[key]

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        share = replica_share(request)
        if not share:
            return 0.5
        floor = job.spec.hbm_floor_gbps
        value = self._value(node, share, floor)
        if value is None:
            return 0.5
        best = self._best_for(share, floor)
        return min(1.0, value / best) if best > 0 else 0.5

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        share = replica_share(request)
        if not share:
            return np.full(len(rows), 0.5)
        floor = job.spec.hbm_floor_gbps
        value, has = self._values(table, rows, share, floor)
        best = self._best_for(share, floor)
        if not best > 0:
            return np.full(len(rows), 0.5)
        return np.where(has, np.minimum(1.0, value / best), 0.5)


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
        return _mean([1.0 - have / best for have, best in unused if best > 0], len(rows), 1.0)


@dataclass(frozen=True, slots=True)
class IslandGuard(ColumnScore):
    """Leave alone the idle nodes a queued gang needs: 0 on a node of another queued gang's
    largest island, 1 elsewhere. Consulted only while gangs are queued."""

    name: ClassVar[str] = "island-guard"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    protected: Mapping[str, frozenset[int]] = field(default_factory=dict)

    # by the table's ids (held, so their id is not reused): holding the table itself would
    # tie it and its cache of scores into a loop only the garbage collector breaks
    _columns: dict[int, tuple[tuple[str, ...], np.ndarray, np.ndarray]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _guarded: frozenset[int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        gangs = frozenset(j for ids in self.protected.values() for j in ids)
        object.__setattr__(self, "_guarded", gangs)

    def prepare(self, context: CycleContext) -> Score | None:
        return IslandGuard(context.protected) if context.protected else None

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        gangs = self.protected.get(node.id)
        return 0.0 if gangs and node.idle and gangs - {job.id} else 1.0

    def facet(self, job: Job) -> Any:
        """What of the job, beyond its shape, the score reads: whether it is a guarded gang."""
        return job.id if job.id in self._guarded else None

    def scores(
        self, job: Job, request: RankRequest, table: NodeTable, rows: np.ndarray
    ) -> np.ndarray:
        guarded, alone = self._columns_of(table)
        # 0 where guarded for some gang other than this job: any gang when several guard it
        spared = guarded[rows] & table.idle[rows] & (alone[rows] != job.id)
        return np.where(spared, 0.0, 1.0)

    def _columns_of(self, table: NodeTable) -> tuple[np.ndarray, np.ndarray]:
        """Per row of `table` (its static part): guarded at all, and the one gang guarding it
        (-1 when several do)."""
        cached = self._columns.get(id(table.ids))
        if cached is not None and cached[0] is table.ids:
            return cached[1], cached[2]
        guarded = np.zeros(len(table), dtype=bool)
        alone = np.full(len(table), -1, dtype=np.int64)
        for node_id, gangs in self.protected.items():
            row = table.pos.get(node_id)
            if row is None or not gangs:
                continue
            guarded[row] = True
            if len(gangs) == 1:
                alone[row] = next(iter(gangs))
        self._columns[id(table.ids)] = (table.ids, guarded, alone)
        return guarded, alone


def _mean(parts: Sequence[np.ndarray], rows: int, empty: float) -> np.ndarray:
    """sum(parts) / len(parts) per row, summed left to right as Python's sum does."""
    if not parts:
        return np.full(rows, empty)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total / len(parts)


# -- registry and policies -----------------------------------------------------------------

FILTERS: Mapping[str, type[Filter]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            NodeReady,
            GpuModel,
            GpuMemory,
            GpuFit,
            CpuMemoryFit,
            Interconnect,
            HbmFloor,
        )
    }
)
SCORES: Mapping[str, type[Score]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            BestFit,
            FragAware,
            Spread,
            WholeNode,
            TrainingFit,
            HbmPerDollar,
            InterconnectThrift,
            IslandGuard,
        )
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyPreset:
    """A policy as config names it: filters in order, scores with default weights."""

    filters: tuple[str, ...]
    scores: tuple[tuple[str, float], ...]
    # How the queue is ordered, what a blocked job holds, who may be preempted: by name from
    # QUEUE_SORTS, BACKFILLS and PREEMPTORS. The defaults are the plain priority queue.
    queue_sort: str = PriorityFifo.name
    backfill: str = FirstFit.name
    preemption: str = NoPreemption.name


# Every preset filters and scores alike, so presets differ only in how the queue goes.
_FILTERS = (
    # Cheap, static checks first: most nodes are ruled out before counting free GPUs.
    "node-ready",
    "gpu-model",
    "interconnect",
    "gpu-memory",
    "hbm-floor",
    "gpu-fit",
    "cpu-memory-fit",
)
_SCORES = (
    ("frag-aware", 1.0),  # inference packing: core.packing's default policy (benchmark B1)
    ("spread", 1.0),
    ("whole-node", 1.0),
    ("training-fit", 1.0),
    ("hbm-per-dollar", 1.0),
    ("interconnect-thrift", 1.0),
    ("island-guard", 1.0),
)

DEFAULT_POLICY = "default"
POLICIES: Mapping[str, PolicyPreset] = MappingProxyType(
    {
        # Priority, fair share, age; a blocked gang reserves, the rest backfill around it;
        # higher priority may preempt preemptible work.
        DEFAULT_POLICY: PolicyPreset(
            filters=_FILTERS,
            scores=_SCORES,
            queue_sort="fair-share",
            backfill="easy",
            preemption="priority",
        ),
        # The baselines the simulator compares with: arrival order, a blocked job stopping
        # the queue; the same with EASY backfilling; and greedy first fit (gangs can starve).
        "fifo": PolicyPreset(
            filters=_FILTERS, scores=_SCORES, queue_sort="fifo", backfill="strict"
        ),
        "fifo-backfill": PolicyPreset(
            filters=_FILTERS, scores=_SCORES, queue_sort="fifo", backfill="easy"
        ),
        "first-fit": PolicyPreset(filters=_FILTERS, scores=_SCORES),
        # The default with the published best-fit packing of replicas instead of frag-aware.
        "bestfit": PolicyPreset(
            filters=_FILTERS,
            scores=tuple(("best-fit", w) if s == "frag-aware" else (s, w) for s, w in _SCORES),
            queue_sort="fair-share",
            backfill="easy",
            preemption="priority",
        ),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    name: str
    filters: tuple[Filter, ...]
    scores: tuple[tuple[Score, float], ...]
    queue_sort: QueueSort = field(default_factory=PriorityFifo)
    backfill: Backfill = field(default_factory=FirstFit)
    preemption: Preemptor = field(default_factory=NoPreemption)

    def prepared(self, context: CycleContext) -> Policy:
        """This policy with every PreScore prepared for one cycle (dropped where it says so)."""
        scores = []
        for s, weight in self.scores:
            ready = s.prepare(context)
            if ready is not None:
                scores.append((ready, weight))
        return replace(self, scores=tuple(scores))

    def check(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        """The first filter that rules `node` out, or SUCCESS."""
        for f in self.filters:
            if job.spec.kind in f.kinds:
                status = f.filter(job, request, node)
                if not status.ok:
                    return status
        return SUCCESS

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        """Weighted mean of the scores that apply to the job's kind: 0 to 1."""
        total = weights = 0.0
        for s, weight in self.scores:
            if job.spec.kind in s.kinds:
                total += weight * s.score(job, request, node)
                weights += weight
        return total / weights if weights else 0.0


def build_policy(name: str, weights: Mapping[str, float] | None = None) -> Policy:
    """The policy `name` with score weights overridden (0 drops a score, a new name adds one)."""
    preset = POLICIES.get(name)
    violations: list[FieldViolation] = []
    if preset is None:
        known = ", ".join(sorted(POLICIES))
        raise InvalidArgument(
            [FieldViolation("scheduler.policy", f"unknown policy {name!r}; known: {known}")]
        )
    weights = dict(weights or {})
    for key, value in sorted(weights.items()):
        if key not in SCORES:
            known = ", ".join(sorted(SCORES))
            violations.append(
                FieldViolation(f"scheduler.weights.{key}", f"unknown score plugin; known: {known}")
            )
        elif not (math.isfinite(value) and value >= 0):
            violations.append(
                FieldViolation(
                    f"scheduler.weights.{key}", f"must be a finite number >= 0, got {value}"
                )
            )
    if violations:
        raise InvalidArgument(violations)
    named = dict(preset.scores)
    order = [s for s, _ in preset.scores] + sorted(k for k in weights if k not in named)
    chosen = tuple((s, weights.get(s, named.get(s, 0.0))) for s in order)
    return Policy(
        name=name,
        filters=tuple(FILTERS[f]() for f in preset.filters),
        scores=tuple((SCORES[s](), w) for s, w in chosen if w > 0),
        queue_sort=QUEUE_SORTS[preset.queue_sort](),
        backfill=BACKFILLS[preset.backfill](),
        preemption=PREEMPTORS[preset.preemption](),
    )
