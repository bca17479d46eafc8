"""Policies: the registries of filters and scores by name, the presets config names, and
`build_policy`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from gpuctl.core.backfill import BACKFILLS, Backfill, FirstFit
from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import Job, JobKind
from gpuctl.core.plugins.base import (
    SUCCESS,
    CycleContext,
    Filter,
    RankRequest,
    Score,
    Status,
)
from gpuctl.core.plugins.best_fit import BestFit
from gpuctl.core.plugins.cpu_memory_fit import CpuMemoryFit
from gpuctl.core.plugins.frag_aware import FragAware
from gpuctl.core.plugins.gpu_fit import GpuFit
from gpuctl.core.plugins.gpu_memory import GpuMemory
from gpuctl.core.plugins.gpu_model import GpuModel
from gpuctl.core.plugins.hbm_floor import HbmFloor
from gpuctl.core.plugins.hbm_per_dollar import HbmPerDollar
from gpuctl.core.plugins.interconnect import Interconnect
from gpuctl.core.plugins.interconnect_thrift import InterconnectThrift
from gpuctl.core.plugins.island_guard import IslandGuard
from gpuctl.core.plugins.node_ready import NodeReady
from gpuctl.core.plugins.spread import Spread
from gpuctl.core.plugins.training_fit import TrainingFit
from gpuctl.core.plugins.whole_node import WholeNode
from gpuctl.core.preempt import PREEMPTORS, NoPreemption, Preemptor
from gpuctl.core.queue import QUEUE_SORTS, PriorityFifo, QueueSort
from gpuctl.core.snapshot import NodeView

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

    def share(self, name: str, kind: JobKind) -> float:
        """How much score `name` can move the weighted mean for a job of `kind`: its weight
        over the weights of every score that applies (0 where the policy has no such score)."""
        weights = [(s.name, w) for s, w in self.scores if kind in s.kinds]
        total = sum(w for _, w in weights)
        return sum(w for n, w in weights if n == name) / total if total else 0.0

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
