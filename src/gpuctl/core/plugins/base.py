"""What every plugin shares: the status a filter answers with, the rank request, the cycle's
context (PreScore), and the column helpers. The extension points themselves are declared in
`core.framework`."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.framework import FilterPlugin, ScorePlugin
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, JobSpec
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
    # The GPU models the rank accepts, in `CycleContext.mix` only (what frag-aware packs for);
    # placement reads them from the spec (the gpu-model filter).
    gpu_models: tuple[str, ...] = ()

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
# cycle uses them when every plugin of its policy has one (`core.engine.verdicts`); a policy with
# one plugin without is asked node by node, as before. The contract, which lets the cycle
# cache answers per job shape and per node state:
# - a node is read only through the table's columns; a node holding ranks of the job itself
#   is always asked node by node (that is how `spread` sees the job's own replicas);
# - a job is read only through its shape (`core.engine.verdicts.shape`: the spec without what
#   placement ignores), plus what `facet(job)` returns where a plugin defines one;
# - `reads_free = False`: the plugin reads only what a node is, never what it has free, so
#   its answer for a node holds all cycle (without it, the node is asked again whenever it
#   changes).


# Up to this many rows, frag-aware looks each node's state up in what it has worked out
# before (about a microsecond a row) instead of working out every row again.
MEMO_ROWS = 512
# Up to this many states not seen before, frag-aware works them out node by node.
FEW_MISSED = 4
# Rank shapes of the cycle's mix that frag-aware packs for: FGD's "typical pods". The cost of
# each score grows with it; a mix rarely has more that matter.
MIX_TYPES = 8
OK = np.int8(Code.SUCCESS)
NOT_NOW = np.int8(Code.UNSCHEDULABLE)
NEVER = np.int8(Code.UNRESOLVABLE)


def all_ok(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(rows), dtype=np.int8), np.zeros(len(rows), dtype=np.int64)


def by_kind(table: NodeTable, rows: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and keys of a filter that reads only what a node is: rows ruled out (`out`)
    are keyed by their kind, which settles the reason."""
    key = np.zeros(len(rows), dtype=np.int64)
    if out.any():
        key[out] = table.kind[rows[out]]
    return np.where(out, NEVER, OK), key


def largest_sum(table: NodeTable, rows: np.ndarray, count: int) -> np.ndarray:
    """Per row: the sum of its `count` largest GPU memories (all of them if it has fewer)."""
    if count <= 0:
        return np.zeros(len(rows), dtype=np.int64)
    return table.mem_desc_cum[rows, min(count, table.width) - 1]


def share_left(free: int, taken: int, capacity: int) -> float:
    return (free - taken) / capacity if capacity > 0 else 0.0


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
                spec.gpu_model,
            )
            ranks = spec.replicas if inference else spec.num_nodes
            seen = by_spec.get(key)
            by_spec[key] = (spec, ranks + (seen[1] if seen is not None else 0))
        counts: dict[RankRequest, int] = {}
        for spec, ranks in by_spec.values():
            request = RankRequest.of(spec)
            if spec.gpu_model and request.milli:
                request = replace(request, gpu_models=spec.gpu_models)
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
                    kv[0].gpu_models,
                ),
            )
        )


def replica_share(request: RankRequest) -> float:
    """GPUs' worth one replica takes: whole GPUs, or the share of one."""
    return request.gpus or request.gpu_milli / MILLI_PER_GPU


def price_per_gpu(node: NodeView) -> float:
    n = node.node
    return n.price_per_hour / node.gpu_count if node.gpu_count and n.price_per_hour > 0 else 0.0


def mean_of(parts: Sequence[np.ndarray], rows: int, empty: float) -> np.ndarray:
    """sum(parts) / len(parts) per row, summed left to right as Python's sum does."""
    if not parts:
        return np.full(rows, empty)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total / len(parts)
