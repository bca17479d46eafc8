"""Invariants of every packing policy on random small clusters and request streams: no GPU
over 1000 milli, CPU and memory never oversubscribed, gpu_spec respected, a pod dropped only
when it fits nowhere, and the same input giving the same placements."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctl.core.packing import Kind, PodRequest, ReplicaLoss, Workload
from gpuctl.sim.baselines import PACKING_POLICIES, make_policy
from gpuctl.sim.cluster import (
    ClusterState,
    GpuctlPacking,
    NodeCapacity,
    PolicyContext,
    StateFragmentation,
)

MODELS = ("A", "B", "C")

nodes_st = st.lists(
    st.builds(
        lambda gpus, cpu, mem, model: (gpus, cpu, mem, model),
        st.integers(0, 8),
        st.integers(0, 64).map(lambda c: c * 1000),
        st.integers(0, 64).map(lambda m: m * 1024),
        st.sampled_from(MODELS),
    ),
    min_size=1,
    max_size=5,
)


@st.composite
def requests_st(draw: st.DrawFn) -> PodRequest:
    kind = draw(st.sampled_from(["cpu", "share", "whole"]))
    cpu = draw(st.integers(0, 24)) * 1000
    mem = draw(st.integers(0, 24)) * 1024
    models = tuple(sorted(draw(st.sets(st.sampled_from(MODELS), max_size=2))))
    if kind == "cpu":
        return PodRequest(cpu_milli=cpu, memory_mib=mem)
    if kind == "share":
        milli = draw(st.integers(1, 999))
        return PodRequest(
            cpu_milli=cpu, memory_mib=mem, num_gpu=1, gpu_milli=milli, gpu_models=models
        )
    n = draw(st.sampled_from([1, 1, 2, 4, 8]))
    return PodRequest(cpu_milli=cpu, memory_mib=mem, num_gpu=n, gpu_milli=1000, gpu_models=models)


def build(nodes: list[tuple[int, int, int, str]]) -> ClusterState:
    return ClusterState(
        [
            NodeCapacity(name=f"n{i}", cpu_milli=cpu, memory_mib=mem, gpus=gpus, model=model)
            for i, (gpus, cpu, mem, model) in enumerate(nodes)
        ]
    )


def fits_somewhere(state: ClusterState, r: PodRequest) -> bool:
    """Plain Python, independent of ClusterState.feasible."""
    for i in range(len(state)):
        if state.cpu_free[i] < r.cpu_milli or state.mem_free[i] < r.memory_mib:
            continue
        if not r.num_gpu:
            return True
        if r.gpu_models and state.models[state.model_of[i]] not in r.gpu_models:
            continue
        free = [int(f) for f in state.gpu_free[i, : state.gpu_count[i]]]
        if r.kind is Kind.SHARE and any(f >= r.gpu_milli for f in free):
            return True
        if r.kind is Kind.WHOLE and sum(f == 1000 for f in free) >= r.num_gpu:
            return True
    return False


def replay(policy: str, nodes: list, requests: list[PodRequest], seed: int) -> list:
    state = build(nodes)
    cpu_cap, mem_cap = state.cpu_cap.copy(), state.mem_cap.copy()
    chooser = make_policy(policy, PolicyContext(workload=Workload.of(requests), seed=seed))
    out = []
    for r in requests:
        choice = chooser.place(state, r)
        if choice is None:
            assert not fits_somewhere(state, r), f"{policy} dropped {r} that fits"
            out.append(None)
            continue
        n = choice.node
        if r.num_gpu and r.gpu_models:
            assert state.models[state.model_of[n]] in r.gpu_models
        assert len(choice.gpus) == r.num_gpu
        assert all(0 <= g < state.gpu_count[n] and m == r.gpu_milli for g, m in choice.gpus)
        state.bind(r, choice)
        assert (state.gpu_free >= 0).all() and (state.gpu_free <= 1000).all()
        # a GPU a node does not have never takes anything
        absent = np.arange(state.width)[None, :] >= state.gpu_count[:, None]
        assert (state.gpu_free[absent] == 0).all()
        assert (state.cpu_free >= 0).all() and (state.cpu_free <= cpu_cap).all()
        assert (state.mem_free >= 0).all() and (state.mem_free <= mem_cap).all()
        out.append((state.names[n], choice.gpus))
    return out


@settings(max_examples=30, deadline=None)
@given(
    nodes=nodes_st,
    requests=st.lists(requests_st(), min_size=1, max_size=30),
    seed=st.integers(0, 1000),
)
def test_every_policy_keeps_the_invariants_and_is_deterministic(
    nodes: list, requests: list[PodRequest], seed: int
) -> None:
    for policy in sorted(PACKING_POLICIES):
        first = replay(policy, nodes, requests, seed)
        assert replay(policy, nodes, requests, seed) == first, policy


@settings(max_examples=40, deadline=None)
@given(
    nodes=nodes_st,
    workload=st.lists(requests_st(), min_size=1, max_size=12),
    taken=st.lists(requests_st(), max_size=12),
    foreign=st.booleans(),
)
def test_vectorised_fragmentation_matches_the_definition(
    nodes: list, workload: list[PodRequest], taken: list[PodRequest], foreign: bool
) -> None:
    state = build(nodes)
    bestfit = make_policy("bestfit")
    for r in taken:  # some state to measure
        c = bestfit.place(state, r)
        if c is not None:
            state.bind(r, c)
    w = Workload.of(workload)
    frag = StateFragmentation(w, state, foreign=foreign)
    got = frag.expected(state.gpu_free, state.cpu_free, np.arange(len(state)))
    for i in range(len(state)):
        free = [int(f) for f in state.gpu_free[i, : state.gpu_count[i]]]
        model = state.models[state.model_of[i]]
        expected = 0
        for t, weight in w.types:
            allowed = not t.gpu_models or model in t.gpu_models
            if not t.num_gpu:
                f = sum(free)
            elif not allowed and not foreign:
                f = 0
            elif (
                allowed
                and state.cpu_free[i] >= t.cpu_milli
                and sum(x >= t.gpu_milli for x in free) >= t.num_gpu
            ):
                f = sum(x for x in free if x < t.gpu_milli)
            else:
                f = sum(free)
            expected += weight * f
        assert got[i] == expected
        ok = frag.models_ok((model,))[0].tolist()
        assert frag.expected_one(free, int(state.cpu_free[i]), ok) == expected


@settings(max_examples=60, deadline=None)
@given(
    nodes=nodes_st,
    workload=st.lists(requests_st(), min_size=1, max_size=8),
    taken=st.lists(requests_st(), max_size=12),
    request=requests_st(),
)
def test_replica_loss_on_columns_is_the_packing_policys_node_by_node(
    nodes: list, workload: list[PodRequest], taken: list[PodRequest], request: PodRequest
) -> None:
    """The frag-aware score's loss from plain columns, every node at once (and one node in
    plain Python), is what GpuctlPacking's `loss_on` gives for that node and GPU in a
    ClusterState."""
    request = PodRequest(  # the score asks no model: its filters have matched it already
        cpu_milli=request.cpu_milli,
        memory_mib=request.memory_mib,
        num_gpu=request.num_gpu,
        gpu_milli=request.gpu_milli,
    )
    state = build(nodes)
    bestfit = make_policy("bestfit")
    for r in taken:
        c = bestfit.place(state, r)
        if c is not None:
            state.bind(r, c)
    w = Workload.of(workload)
    policy = GpuctlPacking(PolicyContext(workload=w))
    excess = policy.excess(state)  # what pinned demand makes of each model (often nothing)
    loss = ReplicaLoss(request, w, excess)
    per_row = np.array([excess[m] for m in state.models])[state.model_of]
    # every GPU of the widest node as the one a share takes, in range or not
    for g in range(-1, state.width + 1):
        gpu = np.full(len(state), g) if request.kind is Kind.SHARE else None
        fits, lost = loss.losses(
            state.gpu_free,
            state.cpu_free,
            state.mem_free,
            loss.model_ok(state.models)[state.model_of],
            gpu,
            per_row,
        )
        for i in range(len(state)):
            want = policy.loss_on(state, i, request, g if gpu is not None else None)
            assert bool(fits[i]) == (want is not None), (i, g)
            if want is not None:
                assert int(lost[i]) == want, (i, g)
            one = loss.loss(  # the same node alone, in plain Python
                state.gpu_free[i, : state.gpu_count[i]].tolist(),
                int(state.cpu_free[i]),
                int(state.mem_free[i]),
                state.models[state.model_of[i]],
                g if gpu is not None else None,
            )
            assert one == want, (i, g)
        if gpu is None:
            break
