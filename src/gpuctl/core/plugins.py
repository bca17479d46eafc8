"""Scheduling plugins, after the Kubernetes scheduler framework: a filter says whether one
rank of a job can go on a node, a score ranks the nodes that can take it.

A `Policy` is a name plus ordered filters and weighted scores, built by name from the tables here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import ClassVar, Protocol

from gpuctl.core.backfill import BACKFILLS, Backfill, FirstFit
from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, JobSpec
from gpuctl.core.packing import NodeCapacity, PodRequest, node_loss
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


@dataclass(frozen=True, slots=True)
class FragAware:
    """Replicas where the cluster loses least capacity, by gpuctl's packing policy
    (`core.packing`, benchmark B1): the growth of FGD's expected fragmentation plus the GPU
    stranded behind CPU or memory, for the GPU the replica would take. 1 when the placement
    loses nothing beyond what the replica itself takes, falling as the loss grows.

    The loss depends only on the node's shape and what it has free, and many nodes look
    alike (every idle node of one SKU), so it is memoised for the cycle (`prepare`).
    """

    name: ClassVar[str] = "frag-aware"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    _memo: dict[tuple, int | None] = field(default_factory=dict, compare=False)

    def prepare(self, context: CycleContext) -> Score | None:
        return FragAware()

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
        if key not in self._memo:
            if len(self._memo) > 100_000:  # an instance kept across cycles stays bounded
                self._memo.clear()
            self._memo[key] = node_loss(
                PodRequest(
                    cpu_milli=request.cpu_milli,
                    memory_mib=request.memory_mib,
                    num_gpu=1 if request.gpu_milli else request.gpus,
                    gpu_milli=request.gpu_milli or (MILLI_PER_GPU if request.gpus else 0),
                ),
                NodeCapacity(
                    name=n.id,
                    cpu_milli=n.cpu_milli,
                    memory_mib=n.memory_mib,
                    gpus=node.gpu_count,
                    model=n.profile.gpu_model,
                ),
                gpu_free=node.gpu_free_milli,
                cpu_free=node.cpu_free_milli,
                memory_free=node.memory_free_mib,
                gpu=gpu,
            )
        loss = self._memo[key]
        if loss is None:
            return 0.0
        return 1.0 / (1.0 + max(0, loss + request.milli) / MILLI_PER_GPU)


# -- workload-aware node choice: the measured profile decides ------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CycleContext:
    """What a score may know of the whole cycle (the framework's PreScore and CycleState)."""

    nodes: tuple[NodeView, ...] = ()  # every node as the cycle starts
    # idle node -> the queued gangs whose largest island it is part of
    protected: Mapping[str, frozenset[int]] = field(default_factory=dict)


class PreScore(Protocol):
    """A score that looks at the whole cycle first; None: not consulted in this cycle."""

    def prepare(self, context: CycleContext) -> Score | None: ...


def replica_share(request: RankRequest) -> float:
    """GPUs' worth one replica takes: whole GPUs, or the share of one."""
    return request.gpus or request.gpu_milli / MILLI_PER_GPU


def _price_per_gpu(node: NodeView) -> float:
    n = node.node
    return n.price_per_hour / node.gpu_count if node.gpu_count and n.price_per_hour > 0 else 0.0


@dataclass(frozen=True, slots=True)
class HbmFloor:
    """A replica's weights fit its GPUs, and their HBM bandwidth meets its tokens/s target:
    decoding streams every weight once per token, so tokens/s ~ HBM GB/s / weight GB."""

    name: ClassVar[str] = "hbm-floor"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})

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


@dataclass(frozen=True, slots=True)
class TrainingFit:
    """Training on interconnect-rich, fast nodes: the mean of the node's network Gb/s, NVLink
    GB/s and per-GPU dense TFLOPS, each as a share of the best in the cluster."""

    name: ClassVar[str] = "training-fit"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.TRAINING})
    best_net: float = 0.0
    best_nvlink: float = 0.0
    best_tflops: float = 0.0

    @staticmethod
    def _figures(node: NodeView) -> tuple[float, float, float]:
        p = node.node.profile
        tflops = p.bf16_tflops / node.gpu_count if node.gpu_count else 0.0
        return p.network.total_gbps, p.nvlink_gbps, tflops

    def prepare(self, context: CycleContext) -> Score | None:
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


@dataclass(frozen=True, slots=True)
class HbmPerDollar:
    """Inference on the most HBM bandwidth per dollar, counting only the bandwidth the replica
    can use: up to its floor when it has a tokens/s target. A share of the best node for the
    same replica; 0.5 on a node with no price."""

    name: ClassVar[str] = "hbm-per-dollar"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    nodes: tuple[NodeView, ...] = ()
    _best: dict[tuple[float, float], float] = field(default_factory=dict, compare=False)

    def prepare(self, context: CycleContext) -> Score | None:
        return HbmPerDollar(context.nodes)

    @staticmethod
    def _value(node: NodeView, share: float, floor: float) -> float | None:
        price = _price_per_gpu(node)
        if not price or not node.gpu_count:
            return None
        bandwidth = node.node.profile.hbm_gbps * share
        useful = min(bandwidth, floor) if floor > 0 else bandwidth
        return useful / (price * share)

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        share = replica_share(request)
        if not share:
            return 0.5
        floor = job.spec.hbm_floor_gbps
        value = self._value(node, share, floor)
        if value is None:
            return 0.5
        key = (share, floor)
        if key not in self._best:
            values = (self._value(v, share, floor) for v in self.nodes)
            self._best[key] = max((v for v in values if v is not None), default=0.0)
        best = self._best[key]
        return min(1.0, value / best) if best > 0 else 0.5


@dataclass(frozen=True, slots=True)
class InterconnectThrift:
    """Replicas off the interconnect they cannot use: a replica never talks over the network,
    and one on a single GPU (or a share) never over NVLink. Keeps InfiniBand for gangs."""

    name: ClassVar[str] = "interconnect-thrift"
    kinds: ClassVar[frozenset[JobKind]] = frozenset({JobKind.INFERENCE})
    best_net: float = 0.0
    best_nvlink: float = 0.0

    def prepare(self, context: CycleContext) -> Score | None:
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


@dataclass(frozen=True, slots=True)
class IslandGuard:
    """Leave alone the idle nodes a queued gang needs: 0 on a node of another queued gang's
    largest island, 1 elsewhere. Consulted only while gangs are queued."""

    name: ClassVar[str] = "island-guard"
    kinds: ClassVar[frozenset[JobKind]] = BOTH
    protected: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def prepare(self, context: CycleContext) -> Score | None:
        return IslandGuard(context.protected) if context.protected else None

    def score(self, job: Job, request: RankRequest, node: NodeView) -> float:
        gangs = self.protected.get(node.id)
        return 0.0 if gangs and node.idle and gangs - {job.id} else 1.0


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
            prepare = getattr(s, "prepare", None)
            ready = prepare(context) if prepare is not None else s
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
