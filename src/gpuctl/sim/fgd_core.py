"""Benchmark B1 through the daemon's own scheduling core: policy "daemon" of `gpuctl simulate
fgd`. Each arriving pod is one inference job (one replica) in a cycle of `core.schedule` with
the default policy, on nodes built from the trace's node list, the pods placed before it
running. It knows no trace: what frag-aware packs for is the mix of the work it has seen
(`CycleContext.mix`), as in the daemon. So the figure is the one the daemon would give, every
filter and score at its default weight, where the other B1 policies place on the simulator's own
cluster model (`sim.cluster`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from gpuctl.core import schedule
from gpuctl.core.model import (
    MILLI_PER_GPU,
    BandwidthProfile,
    Gpu,
    Job,
    JobKind,
    JobSpec,
    JobState,
    Node,
)
from gpuctl.core.packing import PodRequest
from gpuctl.core.plugins import DEFAULT_POLICY, build_policy
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim.alibaba import TraceNode
from gpuctl.sim.cluster import Choice, ClusterState

DAEMON = "daemon"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def node_of(node: TraceNode) -> Node:
    """A trace node as an agent would register it (no profile figures the trace lacks)."""
    gpus = tuple(
        Gpu(index=i, uuid=f"{node.name}-{i}", model=node.model, memory_mib=0, hbm_gbps=0.0)
        for i in range(node.gpus)
    )
    return Node(
        id=node.name,
        address=node.name,
        cpu_milli=node.cpu_milli,
        memory_mib=node.memory_mib,
        profile=BandwidthProfile(gpus=gpus),
    )


def spec_of(request: PodRequest, name: str) -> JobSpec:
    """One pod as a one-replica inference job."""
    share = request.num_gpu == 1 and request.gpu_milli < MILLI_PER_GPU
    return JobSpec(
        kind=JobKind.INFERENCE,
        command=("pod",),
        name=name,
        replicas=1,
        gpus_per_node=0 if share else request.num_gpu,
        gpu_milli=request.gpu_milli if share else 0,
        gpu_model="|".join(request.gpu_models),
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
    )


class DaemonPacking:
    """A packing policy (`place(state, request)`) that asks `core.schedule` where each pod
    goes; `state` is the benchmark's own record, kept in step by the caller's `bind`."""

    def __init__(self, nodes: Sequence[TraceNode], policy: str = DEFAULT_POLICY) -> None:
        self.policy = build_policy(policy)
        self.snapshot = Snapshot.build([node_of(n) for n in nodes], [])
        self.count = 0
        self.index: tuple[tuple[str, ...], dict[str, int]] | None = None  # state's node order

    def place(self, state: ClusterState, request: PodRequest) -> Choice | None:
        self.count += 1
        job = Job(id=self.count, spec=spec_of(request, f"pod-{self.count}"), created_at=NOW)
        result = schedule(self.snapshot, (job,), self.policy, now=NOW)
        if not result.bindings:
            return None
        placement = result.bindings[0].placement
        running = replace(job, state=JobState.RUNNING, placement=placement, started_at=NOW)
        self.snapshot.assume(job.id, placement, running)
        (rank,) = placement.ranks
        if self.index is None or self.index[0] is not state.names:
            self.index = (state.names, {name: i for i, name in enumerate(state.names)})
        node = self.index[1][rank.node_id]
        if request.num_gpu == 0:
            return Choice(node)
        return Choice(node, tuple((g, rank.gpu_milli) for g in rank.gpu_indices))
