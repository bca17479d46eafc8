"""Scheduling plugins, after the Kubernetes scheduler framework: a filter says whether one
rank of a job can go on a node, a score ranks the nodes that can take it.

A `Policy` is a name plus ordered filters and weighted scores, built by name from the tables here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Protocol

from gpuctl.core.errors import FieldViolation, InvalidArgument
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


class Filter(Protocol):
    """Can one rank of `job` go on `node`? A status value, never an exception."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[JobKind]]

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status: ...


class Score(Protocol):
    """How good `node` is for one rank of `job`: 0 (worst) to 1 (best), so weights compare."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[JobKind]]

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float: ...


# -- filters -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeReady:
    name: ClassVar[str] = "node-ready"
    kinds: ClassVar[frozenset[JobKind]] = BOTH

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        if node.schedulable:
            return SUCCESS
        why = f" ({node.node.state_reason})" if node.node.state_reason else ""
        return Status(
            code=Code.UNRESOLVABLE, reason=f"{node.node.state.value}{why}", plugin=self.name
        )


@dataclass(frozen=True, slots=True)
class GpuModel:
    name: ClassVar[str] = "gpu-model"
    kinds: ClassVar[frozenset[JobKind]] = BOTH

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        want = job.spec.gpu_model
        have = node.node.profile.gpu_model
        if not want or not request.milli or want.casefold() == have.casefold():
            return SUCCESS
        return Status(code=Code.UNRESOLVABLE, reason=f"with {have or 'no'} GPUs", plugin=self.name)


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """The node's GPUs can hold the replica's weights and KV cache at all."""

    name: ClassVar[str] = "gpu-memory"
    kinds: ClassVar[frozenset[JobKind]] = BOTH

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


@dataclass(frozen=True, slots=True)
class GpuFit:
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


@dataclass(frozen=True, slots=True)
class CpuMemoryFit:
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


@dataclass(frozen=True, slots=True)
class Interconnect:
    """The job's floors on NVLink (inside the node) and network (between nodes) bandwidth."""

    name: ClassVar[str] = "interconnect"
    kinds: ClassVar[frozenset[JobKind]] = BOTH

    def filter(self, job: Job, request: RankRequest, node: NodeView) -> Status:
        profile = node.node.profile
        spec = job.spec
        if spec.min_nvlink_gbps > profile.nvlink_gbps:
            reason = f"with NVLink {profile.nvlink_gbps:g} gbps (floor {spec.min_nvlink_gbps:g})"
            return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        if spec.min_net_gbps > profile.network.total_gbps:
            reason = (
                f"with network {profile.network.total_gbps:g} gbps (floor {spec.min_net_gbps:g})"
            )
            return Status(code=Code.UNRESOLVABLE, reason=reason, plugin=self.name)
        return SUCCESS


# -- scores --------------------------------------------------------------------------------


def _left(free: int, taken: int, capacity: int) -> float:
    return (free - taken) / capacity if capacity > 0 else 0.0


@dataclass(frozen=True, slots=True)
class BestFit:
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


@dataclass(frozen=True, slots=True)
class Spread:
    """Replicas of one service on different nodes, so losing a node loses one replica."""

    name: ClassVar[str] = "spread"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        return 1.0 / (1 + node.ranks_of(job.id))


@dataclass(frozen=True, slots=True)
class WholeNode:
    """A gang rank alone on a node it fills: no neighbour on its NVLink, PCIe or NICs."""

    name: ClassVar[str] = "whole-node"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.TRAINING})

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        free = len(node.whole_free_gpus)
        fills = min(1.0, request.gpus / free) if free else 0.0
        return 0.5 * float(node.idle) + 0.5 * fills


# -- registry and policies -----------------------------------------------------------------

FILTERS: Mapping[str, type[Filter]] = MappingProxyType(
    {cls.name: cls for cls in (NodeReady, GpuModel, GpuMemory, GpuFit, CpuMemoryFit, Interconnect)}
)
SCORES: Mapping[str, type[Score]] = MappingProxyType(
    {cls.name: cls for cls in (BestFit, Spread, WholeNode)}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyPreset:
    """A policy as config names it: filters in order, scores with default weights."""

    filters: tuple[str, ...]
    scores: tuple[tuple[str, float], ...]


DEFAULT_POLICY = "default"
POLICIES: Mapping[str, PolicyPreset] = MappingProxyType(
    {
        DEFAULT_POLICY: PolicyPreset(
            # Cheap, static checks first: most nodes are ruled out before counting free GPUs.
            filters=(
                "node-ready",
                "gpu-model",
                "interconnect",
                "gpu-memory",
                "gpu-fit",
                "cpu-memory-fit",
            ),
            scores=(("best-fit", 1.0), ("spread", 1.0), ("whole-node", 1.0)),
        ),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    name: str
    filters: tuple[Filter, ...]
    scores: tuple[tuple[Score, float], ...]

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
    )
