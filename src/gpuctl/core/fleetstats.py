"""Figures about the fleet and the queue that an operator watches (gpuctld's metrics): pure
functions of a snapshot and the jobs, with bounded outputs (classes and states, never job
ids).

- `gpu_states`: every GPU counted once, as allocated (the share of it jobs hold) or, for the
  rest, by what its node can do with it: free, draining, degraded, lost.
- `fragmented_gpus`: free GPUs on schedulable nodes that no queued rank shape can use.
- `reason_class`: what a pending job waits for, as one of `REASON_CLASSES`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime

from gpuctl.core import services
from gpuctl.core.model import MILLI_PER_GPU, Job, LeaseState, Node, NodeLease, NodeState
from gpuctl.core.plugins.base import CycleContext, RankRequest
from gpuctl.core.snapshot import NodeView, Snapshot

GPU_STATES = ("allocated", "free", "draining", "degraded", "lost")
LIVE_LEASES = (LeaseState.REQUESTED, LeaseState.ACTIVE, LeaseState.RELEASING)  # not ended
_UNALLOCATED = {
    NodeState.READY: "free",
    NodeState.DRAINING: "draining",
    NodeState.DEGRADED: "degraded",
    NodeState.LOST: "lost",
}

# The pending job's reason, as a bounded label. The phrases are those the cycle writes
# (core.backfill, core.leasing.phase); a reason made of several parts is
# classed by the first class whose phrase it has, in this order.
REASON_CLASSES = ("new", "queue_order", "reserved", "leasing", "resources")
_PHRASES = (
    ("queue_order", ("waiting behind job",)),  # a strict-FIFO barrier or a reservation ahead
    ("reserved", ("reserved: starts by",)),  # next in line: nodes held for it
    ("leasing", ("leased node", "leasing ", "no offer to lease", "budget")),
)
FRAGMENT_SHAPES = 16  # the most common queued shapes `fragmented_gpus` weighs


def reason_class(reason: str) -> str:
    """What a pending job with this reason waits for: `new` (no cycle has looked at it yet),
    `queue_order` (jobs ahead of it hold the nodes), `reserved` (it holds a reservation and
    starts when they free), `leasing` (nodes are being leased for it, or no offer or budget
    allows one) or `resources` (nothing free fits it now)."""
    if not reason:
        return "new"
    for name, phrases in _PHRASES:
        if any(p in reason for p in phrases):
            return name
    return "resources"


def views_now(
    nodes: Sequence[Node], jobs: Sequence[Job], now: datetime
) -> tuple[tuple[NodeView, ...], tuple[Job, ...]]:
    """Every node with what the active `jobs` hold on it, and what waits to be placed (as the
    cycle sees them: a service's missing replicas wait too)."""
    given = services.cycle_input(jobs, now)
    return Snapshot.build(nodes, given.holding).nodes, given.pending


def paid_per_hour(leases: Iterable[NodeLease]) -> Counter[str]:
    """Dollars an hour paid now, by provider: leases granted and not yet ended."""
    paid: Counter[str] = Counter()
    for lease in leases:
        if lease.state in (LeaseState.ACTIVE, LeaseState.RELEASING):
            paid[lease.provider] += lease.price_per_hour
    return paid


def gpu_states(views: Iterable[NodeView]) -> Counter[tuple[str, str]]:
    """GPUs by (model, state): what jobs hold is `allocated` (in GPUs: shares add up), the
    rest takes its node's state. The figures of one model add up to its GPUs."""
    out: Counter[tuple[str, str]] = Counter()
    for view in views:
        state = _UNALLOCATED.get(view.node.state)
        if state is None:  # a released node has no GPUs of ours
            continue
        for gpu, free in zip(view.gpus, view.gpu_free_milli, strict=True):
            if free < MILLI_PER_GPU:
                out[(gpu.model, "allocated")] += (MILLI_PER_GPU - free) / MILLI_PER_GPU
            if free:
                out[(gpu.model, state)] += free / MILLI_PER_GPU
    return out


def fragmented_gpus(views: Iterable[NodeView], pending: Sequence[Job]) -> float:
    """Free GPUs (in GPUs: free shares add up) on schedulable nodes that no queued rank shape
    can use: on each node, a GPU's free share counts unless one of the `FRAGMENT_SHAPES` most
    common shapes of `pending` both fits the node now (CPU, memory, model and enough GPUs
    with room) and could take that GPU. With nothing queued, nothing is fragmented."""
    shapes = [(r, _models(r)) for r, _ in CycleContext.mix_of(pending)[:FRAGMENT_SHAPES] if r.milli]
    if not shapes:
        return 0.0
    stuck = 0
    for view in views:
        if not view.schedulable or not view.free_gpu_milli:
            continue
        usable = [False] * view.gpu_count
        model = view.node.profile.gpu_model.casefold()
        for request, models in shapes:
            if models and model not in models:
                continue
            if view.cpu_free_milli < request.cpu_milli or view.memory_free_mib < request.memory_mib:
                continue
            taking = _could_take(view, request)
            if taking is not None:
                usable = [u or t for u, t in zip(usable, taking, strict=True)]
        stuck += sum(f for f, u in zip(view.gpu_free_milli, usable, strict=True) if not u)
    return stuck / MILLI_PER_GPU


def _models(request: RankRequest) -> frozenset[str]:
    return frozenset(m.casefold() for m in request.gpu_models)


def _could_take(view: NodeView, request: RankRequest) -> list[bool] | None:
    """Which of the node's GPUs `request` could take a part of, if it fits the node at all."""
    if request.gpu_milli:  # a share of one GPU with room (and the GPU memory asked)
        room = [
            f >= request.gpu_milli and g.memory_mib >= request.gpu_memory_mib
            for g, f in zip(view.gpus, view.gpu_free_milli, strict=True)
        ]
        return room if any(room) else None
    per_gpu = -(-request.gpu_memory_mib // request.gpus) if request.gpu_memory_mib else 0
    whole = [
        f == MILLI_PER_GPU and g.memory_mib >= per_gpu
        for g, f in zip(view.gpus, view.gpu_free_milli, strict=True)
    ]
    return whole if sum(whole) >= request.gpus else None
