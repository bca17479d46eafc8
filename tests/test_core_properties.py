"""Invariants of the scheduling cycle over generated clusters and queues (Hypothesis).

Cycles run back to back on a virtual clock: the first's bindings become running jobs (with
time limits, priorities, owners and preemptible flags), so the second schedules around work
already holding GPUs, CPU and memory, and may reserve, backfill and preempt; a third, with the
second's decisions applied, checks that backfilling delayed no reservation.
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
from gpuctl.core.plugins import DEFAULT_POLICY, Policy, build_policy
from gpuctl.core.snapshot import Snapshot

T0 = datetime(2025, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=10)  # the second cycle: the first's jobs have run 10 minutes
POLICY = build_policy(DEFAULT_POLICY)
POLICIES = st.sampled_from(
    (POLICY, build_policy("fifo"), build_policy("fifo-backfill"), build_policy("first-fit"))
)
BOUNDED = settings(max_examples=100, deadline=None)

FABRICS = ("", "ib-a/s1/l1", "ib-a/s1/l1", "ib-a/s1/l2", "ib-a/s2/l3", "ib-b/s1/l1")
MODELS = ("H100 SXM", "A100 80GB")
REASONS = ("needs ", "reserved: ", "waiting behind ")


@st.composite
def nodes(draw: st.DrawFn) -> list[Node]:
    # Mostly one GPU model and few fabrics, so multi-node gangs often fit; the odd node out
    # (other model, small GPUs, no fabric, PCIe only, draining) keeps the filters busy.
    main_model = draw(st.sampled_from(MODELS))
    out = []
    for i in range(draw(st.integers(1, 8))):
        model = draw(st.sampled_from((main_model,) * 4 + MODELS))
        memory = draw(st.sampled_from((81920,) * 3 + (24576,)))
        nvlink = draw(st.sampled_from((900.0, 900.0, 0.0)))
        hbm = draw(st.sampled_from((3350.0, 3350.0, 864.0)))
        gpus = tuple(
            Gpu(
                index=g,
                uuid=f"GPU-{i}-{g}",
                model=model,
                memory_mib=memory,
                hbm_gbps=hbm,
                nvlink_gbps=nvlink,
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
                price_per_hour=draw(st.sampled_from((0.0, 18.28, 23.6))),
                profile=BandwidthProfile(
                    gpus=gpus,
                    bf16_tflops=draw(st.sampled_from((0.0, 2896.0, 7915.0))),
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
def specs(draw: st.DrawFn, *, same_owner: bool = False) -> JobSpec:
    common = {
        "command": ("x",),
        "priority": draw(st.integers(0, 2)),
        "owner": "alice" if same_owner else draw(st.sampled_from(("alice", "bob"))),
        "queue": "default" if same_owner else draw(st.sampled_from(("default", "prod"))),
        "time_limit_s": draw(st.sampled_from((0, 0, 1800, 3600, 7200))),
        "preemptible": draw(st.booleans()),
        "gpu_model": draw(st.sampled_from(("", "", *MODELS))),
        "gpu_memory_mib": draw(st.sampled_from((0, 0, 0, 20000, 40000))),
        "cpu_milli": draw(st.sampled_from((0, 0, 0, 2000, 16000))),
        "memory_mib": draw(st.sampled_from((0, 0, 0, 4096))),
        "min_net_gbps": draw(st.sampled_from((0.0, 0.0, 0.0, 200.0))),
        "min_nvlink_gbps": draw(st.sampled_from((0.0, 0.0, 0.0, 400.0))),
    }
    if draw(st.booleans()):
        return JobSpec(
            kind=JobKind.TRAINING,
            num_nodes=draw(st.integers(1, 3)),
            gpus_per_node=draw(st.sampled_from((1, 2, 4, 8))),
            **common,
        )
    milli = draw(st.sampled_from((0, 0, 250, 500, 700)))
    tokens, weights = draw(st.sampled_from(((0.0, 0.0), (0.0, 0.0), (30.0, 14.0), (100.0, 14.0))))
    return JobSpec(
        kind=JobKind.INFERENCE,
        replicas=draw(st.integers(1, 4)),
        gpu_milli=milli,
        gpus_per_node=draw(st.sampled_from((0, 1))) if milli else draw(st.integers(0, 4)),
        target_tokens_per_s=tokens,
        weights_gb=weights,
        **common,
    )


@st.composite
def queues(draw: st.DrawFn, first_id: int, *, same_owner: bool = False) -> list[Job]:
    return [
        Job(id=first_id + i, spec=spec, created_at=T0 + timedelta(seconds=draw(st.integers(0, 5))))
        for i, spec in enumerate(
            draw(st.lists(specs(same_owner=same_owner), min_size=1, max_size=8))
        )
    ]


def applied(result: CycleResult, held: list[Job], pending: list[Job], now: datetime) -> list[Job]:
    """The jobs holding resources once `result` is applied: victims gone, bindings started."""
    victims = {p.job_id for p in result.preemptions}
    by_id = {j.id: j for j in pending}
    started = [
        replace(by_id[b.job_id], state=JobState.RUNNING, placement=b.placement, started_at=now)
        for b in result.bindings
    ]
    return [j for j in held if j.id not in victims] + started


def two_cycles(
    cluster: list[Node], first: list[Job], second: list[Job], policy: Policy = POLICY
) -> tuple[list[Job], CycleResult]:
    before = applied(schedule(Snapshot.build(cluster, ()), first, policy, now=T0), [], first, T0)
    return before, schedule(Snapshot.build(cluster, before), second, policy, now=T1)


@BOUNDED
@given(cluster=nodes(), first=queues(1), second=queues(100), policy=POLICIES)
def test_nothing_is_oversubscribed_once_preemptions_are_applied(
    cluster: list[Node], first: list[Job], second: list[Job], policy: Policy
) -> None:
    before, result = two_cycles(cluster, first, second, policy)
    after = applied(result, before, second, T1)
    gpu_milli: dict[tuple[str, int], int] = defaultdict(int)
    cpu: dict[str, int] = defaultdict(int)
    memory: dict[str, int] = defaultdict(int)
    by_id = {n.id: n for n in cluster}
    for job in after:
        assert job.placement is not None
        for r in job.placement.ranks:
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
@given(cluster=nodes(), first=queues(1), second=queues(100), policy=POLICIES)
def test_every_job_placed_whole_where_it_may_go_or_told_why(
    cluster: list[Node], first: list[Job], second: list[Job], policy: Policy
) -> None:
    _, result = two_cycles(cluster, first, second, policy)
    bound = {b.job_id: b.placement for b in result.bindings}
    waiting = {u.job_id: u.reason for u in result.unschedulable}
    assert not bound.keys() & waiting.keys()
    assert bound.keys() | waiting.keys() == {j.id for j in second}
    assert all(reason.startswith(REASONS) for reason in waiting.values()), waiting
    by_id = {n.id: n for n in cluster}
    for job in second:
        placement = bound.get(job.id)
        if placement is None:
            continue
        spec = job.spec
        assert [r.rank for r in placement.ranks] == list(range(spec.rank_count))
        assert placement.master_addr == by_id[placement.ranks[0].node_id].address
        for r in placement.ranks:
            profile = by_id[r.node_id].profile
            if spec.gpu_model and r.gpu_indices:
                assert profile.gpu_model == spec.gpu_model
            assert profile.nvlink_gbps >= spec.min_nvlink_gbps
            assert profile.network.total_gbps >= spec.min_net_gbps
            share = len(r.gpu_indices) * r.gpu_milli / MILLI_PER_GPU
            assert profile.hbm_gbps * share >= spec.hbm_floor_gbps
        if spec.kind is JobKind.TRAINING:
            # a gang: distinct nodes, one fabric (no fabric: a gang of one), whole GPUs,
            # ranks in fabric-path order
            assert len(set(placement.node_ids)) == spec.num_nodes
            fabrics = {by_id[n].fabric_name for n in placement.node_ids}
            assert len(fabrics) == 1
            assert spec.num_nodes == 1 or fabrics != {""}
            assert all(len(r.gpu_indices) == spec.gpus_per_node for r in placement.ranks)
            assert all(r.gpu_milli == MILLI_PER_GPU for r in placement.ranks)
            paths = [(by_id[n].fabric, n) for n in placement.node_ids]
            assert paths == sorted(paths)
        elif spec.gpu_milli:
            assert all(
                len(r.gpu_indices) == 1 and r.gpu_milli == spec.gpu_milli for r in placement.ranks
            )
        else:
            assert all(len(r.gpu_indices) == spec.gpus_per_node for r in placement.ranks)


@BOUNDED
@given(cluster=nodes(), first=queues(1), second=queues(100), policy=POLICIES)
def test_preemption_is_of_whole_lower_priority_preemptible_jobs_for_a_job_it_starts(
    cluster: list[Node], first: list[Job], second: list[Job], policy: Policy
) -> None:
    before, result = two_cycles(cluster, first, second, policy)
    held = {j.id: j for j in before}
    pending = {j.id: j for j in second}
    bound = {b.job_id for b in result.bindings}
    for p in result.preemptions:
        victim, preemptor = held[p.job_id], pending[p.for_job_id]
        assert victim.spec.preemptible
        assert victim.spec.priority < preemptor.spec.priority
        assert p.for_job_id in bound  # never a preemption that did not make room
        assert p.reason == f"preempted by job {preemptor.id} (priority {preemptor.spec.priority})"
    assert len({p.job_id for p in result.preemptions}) == len(result.preemptions)


@BOUNDED
@given(cluster=nodes(), first=queues(1), second=queues(100), data=st.data())
def test_same_input_same_decision(
    cluster: list[Node], first: list[Job], second: list[Job], data: st.DataObject
) -> None:
    before, result = two_cycles(cluster, first, second)
    snapshot = Snapshot.build(cluster, before)
    untouched = snapshot.nodes
    assert schedule(snapshot, second, POLICY, now=T1) == result
    assert snapshot.nodes == untouched  # the cycle works on its own copy
    shuffled_nodes = data.draw(st.permutations(cluster))
    shuffled_running = data.draw(st.permutations(before))
    shuffled_queue = data.draw(st.permutations(second))
    again = schedule(
        Snapshot.build(shuffled_nodes, shuffled_running), shuffled_queue, POLICY, now=T1
    )
    assert again == result


@BOUNDED
@given(
    cluster=nodes(),
    first=queues(1, same_owner=True),
    second=queues(100, same_owner=True),
    policy=st.sampled_from((build_policy("fifo-backfill"), build_policy(DEFAULT_POLICY))),
)
def test_backfilled_jobs_never_delay_a_reservation(
    cluster: list[Node], first: list[Job], second: list[Job], policy: Policy
) -> None:
    # One owner and queue, so fair share cannot reorder the queue between the cycles; no
    # preemptible work, so the third cycle cannot preempt what the second backfilled.
    first = [replace(j, spec=replace(j.spec, preemptible=False)) for j in first]
    second = [replace(j, spec=replace(j.spec, preemptible=False)) for j in second]
    before, result = two_cycles(cluster, first, second, policy)
    after = applied(result, before, second, T1)
    placed = {b.job_id for b in result.bindings}
    still = [j for j in second if j.id not in placed]
    again = schedule(Snapshot.build(cluster, after), still, policy, now=T1)
    later = {r.job_id: r for r in again.reservations}
    started = {b.job_id for b in again.bindings}
    for r in result.reservations:
        assert r.job_id in started or (r.job_id in later and later[r.job_id].start <= r.start), (
            r,
            later.get(r.job_id),
        )


@BOUNDED
@given(cluster=nodes(), first=queues(1))
def test_forgetting_every_job_frees_everything(cluster: list[Node], first: list[Job]) -> None:
    before = applied(schedule(Snapshot.build(cluster, ()), first, POLICY, now=T0), [], first, T0)
    empty = Snapshot.build(cluster, ()).nodes
    snapshot = Snapshot.build(cluster, before)
    for job in before:
        snapshot.forget(job.id)
    assert snapshot.nodes == empty
    assert snapshot.jobs() == ()
    for job in before:  # and assuming them again fits, as it did in the cycle
        assert job.placement is not None
        snapshot.assume(job.id, job.placement, job)
    assert snapshot.nodes == Snapshot.build(cluster, before).nodes
    assert snapshot.jobs() == Snapshot.build(cluster, before).jobs()
