"""Invariants of the scheduling cycle over generated clusters and queues (Hypothesis).

Two cycles run back to back, the first's bindings becoming running jobs, so the second
schedules around work already holding GPUs, CPU and memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctl.core import CycleResult, schedule
from gpuctl.core.model import (
    MILLI_PER_GPU,
    BandwidthProfile,
    Gpu,
    Job,
    JobKind,
    JobSpec,
    JobState,
    NetKind,
    Network,
    Node,
    NodeState,
)
from gpuctl.core.plugins import DEFAULT_POLICY, build_policy
from gpuctl.core.snapshot import Snapshot

T0 = datetime(2025, 1, 1, tzinfo=UTC)
POLICY = build_policy(DEFAULT_POLICY)
BOUNDED = settings(max_examples=100, deadline=None)

FABRICS = ("", "ib-a/s1/l1", "ib-a/s1/l1", "ib-a/s1/l2", "ib-a/s2/l3", "ib-b/s1/l1")
MODELS = ("H100 SXM", "A100 80GB")


@st.composite
def nodes(draw: st.DrawFn) -> list[Node]:
    # Mostly one GPU model and few fabrics, so multi-node gangs often fit; the odd node out
    # (other model, small GPUs, no fabric, draining) keeps the filters busy.
    main_model = draw(st.sampled_from(MODELS))
    out = []
    for i in range(draw(st.integers(1, 8))):
        model = draw(st.sampled_from((main_model,) * 4 + MODELS))
        memory = draw(st.sampled_from((81920,) * 3 + (24576,)))
        gpus = tuple(
            Gpu(
                index=g,
                uuid=f"GPU-{i}-{g}",
                model=model,
                memory_mib=memory,
                hbm_gbps=2000.0,
                nvlink_gbps=900.0,
            )
            for g in range(draw(st.sampled_from((0, 1, 2, 4, 8, 8))))
        )
        out.append(
            Node(
                id=f"n{i}",
                address=f"n{i}.cluster",
                fabric=draw(st.sampled_from(FABRICS)),
                cpu_milli=draw(st.sampled_from((0, 8000, 64000, 64000))),
                memory_mib=draw(st.sampled_from((0, 65536, 65536))),
                profile=BandwidthProfile(
                    gpus=gpus,
                    network=Network(
                        kind=NetKind.INFINIBAND,
                        ports=1,
                        gbps_per_port=draw(st.sampled_from((0, 400, 400))),
                    ),
                ),
                state=draw(
                    st.sampled_from((NodeState.READY,) * 5 + (NodeState.DRAINING, NodeState.LOST))
                ),
            )
        )
    return out


@st.composite
def specs(draw: st.DrawFn) -> JobSpec:
    common = {
        "command": ("x",),
        "priority": draw(st.integers(0, 2)),
        "gpu_model": draw(st.sampled_from(("", "", *MODELS))),
        "gpu_memory_mib": draw(st.sampled_from((0, 0, 0, 20000, 40000))),
        "cpu_milli": draw(st.sampled_from((0, 0, 0, 2000, 16000))),
        "memory_mib": draw(st.sampled_from((0, 0, 0, 4096))),
        "min_net_gbps": draw(st.sampled_from((0.0, 0.0, 0.0, 200.0))),
    }
    if draw(st.booleans()):
        return JobSpec(
            kind=JobKind.TRAINING,
            num_nodes=draw(st.integers(1, 3)),
            gpus_per_node=draw(st.sampled_from((1, 2, 4, 8))),
            **common,
        )
    milli = draw(st.sampled_from((0, 0, 250, 500, 700)))
    return JobSpec(
        kind=JobKind.INFERENCE,
        replicas=draw(st.integers(1, 4)),
        gpu_milli=milli,
        gpus_per_node=draw(st.sampled_from((0, 1))) if milli else draw(st.integers(0, 4)),
        **common,
    )


@st.composite
def queues(draw: st.DrawFn, first_id: int) -> list[Job]:
    return [
        Job(id=first_id + i, spec=spec, created_at=T0 + timedelta(seconds=draw(st.integers(0, 5))))
        for i, spec in enumerate(draw(st.lists(specs(), min_size=1, max_size=8)))
    ]


def running(result: CycleResult, jobs: list[Job]) -> list[Job]:
    by_id = {j.id: j for j in jobs}
    return [
        replace(by_id[b.job_id], state=JobState.RUNNING, placement=b.placement)
        for b in result.bindings
    ]


def two_cycles(
    cluster: list[Node], first: list[Job], second: list[Job]
) -> tuple[list[Job], CycleResult]:
    before = running(schedule(Snapshot.build(cluster, ()), first, POLICY, now=T0), first)
    return before, schedule(Snapshot.build(cluster, before), second, POLICY, now=T0)


@BOUNDED
@given(cluster=nodes(), first=queues(1), second=queues(100))
def test_nothing_is_oversubscribed(
    cluster: list[Node], first: list[Job], second: list[Job]
) -> None:
    before, result = two_cycles(cluster, first, second)
    placed = [(j.id, j.placement) for j in before] + [
        (b.job_id, b.placement) for b in result.bindings
    ]
    gpu_milli: dict[tuple[str, int], int] = defaultdict(int)
    cpu: dict[str, int] = defaultdict(int)
    memory: dict[str, int] = defaultdict(int)
    by_id = {n.id: n for n in cluster}
    for _, placement in placed:
        assert placement is not None
        for r in placement.ranks:
            assert by_id[r.node_id].state is NodeState.READY
            assert set(r.gpu_indices) <= {g.index for g in by_id[r.node_id].profile.gpus}
            for g in r.gpu_indices:
                gpu_milli[r.node_id, g] += r.gpu_milli
            cpu[r.node_id] += r.cpu_milli
            memory[r.node_id] += r.memory_mib
    assert all(m <= MILLI_PER_GPU for m in gpu_milli.values()), gpu_milli
    assert all(cpu[n] <= by_id[n].cpu_milli for n in cpu)
    assert all(memory[n] <= by_id[n].memory_mib for n in memory)


@BOUNDED
@given(cluster=nodes(), first=queues(1), second=queues(100))
def test_every_job_placed_whole_or_told_why(
    cluster: list[Node], first: list[Job], second: list[Job]
) -> None:
    _, result = two_cycles(cluster, first, second)
    bound = {b.job_id: b.placement for b in result.bindings}
    waiting = {u.job_id: u.reason for u in result.unschedulable}
    assert not bound.keys() & waiting.keys()
    assert bound.keys() | waiting.keys() == {j.id for j in second}
    assert all(reason.startswith("needs ") for reason in waiting.values())
    by_id = {n.id: n for n in cluster}
    for job in second:
        placement = bound.get(job.id)
        if placement is None:
            continue
        spec = job.spec
        assert [r.rank for r in placement.ranks] == list(range(spec.rank_count))
        assert placement.master_addr == by_id[placement.ranks[0].node_id].address
        if spec.kind is JobKind.TRAINING:
            # a gang: distinct nodes, one fabric (no fabric: a gang of one), whole GPUs
            assert len(set(placement.node_ids)) == spec.num_nodes
            fabrics = {by_id[n].fabric_name for n in placement.node_ids}
            assert len(fabrics) == 1
            assert spec.num_nodes == 1 or fabrics != {""}
            assert all(len(r.gpu_indices) == spec.gpus_per_node for r in placement.ranks)
            assert all(r.gpu_milli == MILLI_PER_GPU for r in placement.ranks)
        elif spec.gpu_milli:
            assert all(
                len(r.gpu_indices) == 1 and r.gpu_milli == spec.gpu_milli for r in placement.ranks
            )
        else:
            assert all(len(r.gpu_indices) == spec.gpus_per_node for r in placement.ranks)


@BOUNDED
@given(cluster=nodes(), first=queues(1), second=queues(100), data=st.data())
def test_same_input_same_decision(
    cluster: list[Node], first: list[Job], second: list[Job], data: st.DataObject
) -> None:
    before, result = two_cycles(cluster, first, second)
    snapshot = Snapshot.build(cluster, before)
    untouched = snapshot.nodes
    assert schedule(snapshot, second, POLICY, now=T0) == result
    assert snapshot.nodes == untouched  # the cycle works on its own copy
    shuffled_nodes = data.draw(st.permutations(cluster))
    shuffled_running = data.draw(st.permutations(before))
    shuffled_queue = data.draw(st.permutations(second))
    again = schedule(
        Snapshot.build(shuffled_nodes, shuffled_running), shuffled_queue, POLICY, now=T0
    )
    assert again == result


@BOUNDED
@given(cluster=nodes(), first=queues(1))
def test_forgetting_every_job_frees_everything(cluster: list[Node], first: list[Job]) -> None:
    before = running(schedule(Snapshot.build(cluster, ()), first, POLICY, now=T0), first)
    empty = Snapshot.build(cluster, ()).nodes
    snapshot = Snapshot.build(cluster, before)
    for job in before:
        snapshot.forget(job.id)
    assert snapshot.nodes == empty
    for job in before:  # and assuming them again fits, as it did in the cycle
        assert job.placement is not None
        snapshot.assume(job.id, job.placement)
    assert snapshot.nodes == Snapshot.build(cluster, before).nodes
