"""core.packing and the simulator's cluster model (sim.cluster): the published BestFit to the
letter, GPU choice inside a node, model constraints, FGD's fragmentation, gpuctl's stranding
term, and the daemon's score plugin."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest

from gpuctl.core import schedule
from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.model import (
    BandwidthProfile,
    Gpu,
    Job,
    JobKind,
    JobSpec,
    JobState,
    Node,
    NodeState,
    Placement,
    RankPlacement,
)
from gpuctl.core.packing import PodRequest, Workload
from gpuctl.core.plugins import (
    DEFAULT_POLICY,
    MIX_TYPES,
    CycleContext,
    FragAware,
    RankRequest,
    build_policy,
)
from gpuctl.core.snapshot import NodeView, Snapshot
from gpuctl.sim.baselines import DEFAULT_PACKING_POLICY, PACKING_POLICIES, make_policy
from gpuctl.sim.cluster import (
    Choice,
    ClusterState,
    NodeCapacity,
    PolicyContext,
    StateFragmentation,
    bestfit_scores,
)


def cap(name: str, *, gpus: int = 8, cpu: int = 96_000, mem: int = 393_216, model: str = "G2"):
    return NodeCapacity(name=name, cpu_milli=cpu, memory_mib=mem, gpus=gpus, model=model)


def share(milli: int, *, cpu: int = 0, mem: int = 0, models: tuple[str, ...] = ()) -> PodRequest:
    return PodRequest(cpu_milli=cpu, memory_mib=mem, num_gpu=1, gpu_milli=milli, gpu_models=models)


def whole(n: int, *, cpu: int = 0, mem: int = 0, models: tuple[str, ...] = ()) -> PodRequest:
    return PodRequest(cpu_milli=cpu, memory_mib=mem, num_gpu=n, gpu_milli=1000, gpu_models=models)


def cpu_only(cpu: int, mem: int = 0) -> PodRequest:
    return PodRequest(cpu_milli=cpu, memory_mib=mem)


def state_with(*rows: tuple[NodeCapacity, tuple[int, ...], int, int]) -> ClusterState:
    """A state whose nodes have (gpu free per GPU, cpu free, memory free) as given."""
    state = ClusterState([c for c, *_ in rows])
    for c, gpu_free, cpu_free, mem_free in rows:
        i = state.names.index(c.name)
        state.set_free(i, gpu_free=gpu_free, cpu_free=cpu_free, memory_free=mem_free)
    return state


def place(policy: str, state: ClusterState, request: PodRequest, workload=()) -> tuple:
    chosen = make_policy(policy, PolicyContext(workload=Workload.of(workload))).place(
        state, request
    )
    return (state.names[chosen.node], chosen.gpus) if chosen is not None else None


# -- BestFit, as published -----------------------------------------------------------------

# fmt: off
BESTFIT = [
    # id, cpu free, GPU free per GPU, request, score
    # 100 * (1 - 0.5 * 48000/128000 - 0.5 * 3000/8000) = 100 * (1 - 0.1875 - 0.1875) = 62.5 -> 62
    ("half-left",     64_000,  (1000,) * 4, whole(1, cpu=16_000), 62),
    # nothing left after: 100 * (1 - 0 - 0) = 100
    ("fills-node",    32_000,  (1000,),     whole(1, cpu=32_000), 100),
    # everything left: 100 * (1 - 0.5 * 128000/128000 - 0.5 * 8000/8000) = 0
    ("cpu-pod-empty", 128_000, (1000,) * 8, cpu_only(0),          0),
    # a share counts its milli: 100 * (1 - 0.5 * 0 - 0.5 * (1000 + 600 - 400)/8000) = 92.5 -> 92
    ("share",         4_000,   (1000, 600), share(400, cpu=4_000), 92),
    # truncation, not rounding: 100 * (1 - 0.5 * 256/128000 - 0) = 99.9 -> 99
    ("truncates",     256,     (1000,),     whole(1),             99),
]
# fmt: on


@pytest.mark.parametrize(
    ("cpu_free", "gpu_free", "request_", "expected"),
    [c[1:] for c in BESTFIT],
    ids=[c[0] for c in BESTFIT],
)
def test_bestfit_score_is_the_published_formula(
    cpu_free: int, gpu_free: tuple[int, ...], request_: PodRequest, expected: int
) -> None:
    state = state_with((cap("n", gpus=len(gpu_free), cpu=128_000), gpu_free, cpu_free, 1 << 20))
    assert bestfit_scores(state, request_)[0] == expected


def test_bestfit_highest_score_wins() -> None:
    # a: 100 * (1 - 0.5 * 0 - 0.5 * 7000/8000) = 56; b: 100 * (1 - 0 - 0.5 * 1000/8000) = 93
    state = state_with(
        (cap("a"), (1000,) * 8, 0, 1000),
        (cap("b"), (1000, 1000) + (0,) * 6, 0, 1000),
    )
    assert place("bestfit", state, whole(1)) == ("b", ((0, 1000),))


def test_bestfit_ties_go_to_the_smallest_node_name() -> None:
    # identical nodes, listed out of order: the same score, so the smallest name
    state = ClusterState([cap("node-b"), cap("node-a"), cap("node-c")])
    assert place("bestfit", state, whole(1, cpu=1000))[0] == "node-a"


def test_bestfit_filters_memory_without_scoring_it() -> None:
    # b scores higher (fuller GPUs) but lacks the memory; a has plenty, memory is not scored
    state = state_with(
        (cap("a"), (1000,) * 8, 96_000, 400_000),
        (cap("b"), (1000,) + (0,) * 7, 96_000, 10),
    )
    assert place("bestfit", state, whole(1, mem=100))[0] == "a"


# fmt: off
GPU_CHOICE = [
    # id, GPU free per GPU, request, GPUs taken
    ("share-tightest",        (1000, 600, 500, 500), share(450), ((2, 450),)),  # 500 is tightest; 2 before 3
    ("share-skips-too-small", (400, 1000, 700),      share(450), ((2, 450),)),  # 400 cannot take it
    ("share-exact-fit",       (1000, 450),           share(450), ((1, 450),)),
    ("whole-lowest-free",     (1000, 300, 1000, 1000), whole(2), ((0, 1000), (2, 1000))),
    ("whole-skips-shared",    (999, 1000, 1000),     whole(1),   ((1, 1000),)),
    ("cpu-takes-no-gpu",      (1000,),               cpu_only(10), ()),
]
# fmt: on


@pytest.mark.parametrize(
    ("gpu_free", "request_", "expected"),
    [c[1:] for c in GPU_CHOICE],
    ids=[c[0] for c in GPU_CHOICE],
)
@pytest.mark.parametrize("policy", ["bestfit", "gpuctl"])
def test_gpu_choice_inside_the_node(
    policy: str, gpu_free: tuple[int, ...], request_: PodRequest, expected: tuple
) -> None:
    # gpuctl packs for whole-GPU pods here: every used GPU is equally lost to them, so its
    # tie-break (the tightest GPU) decides, as best fit's rule does
    state = state_with((cap("n", gpus=len(gpu_free)), gpu_free, 96_000, 1 << 20))
    assert place(policy, state, request_, [whole(1)]) == ("n", expected)


@pytest.mark.parametrize("policy", sorted(PACKING_POLICIES))
def test_gpu_spec_binds_gpu_pods_to_their_models(policy: str) -> None:
    state = ClusterState([cap("a-t4", model="T4"), cap("b-v100", model="V100")])
    request = share(500, models=("V100",))
    assert place(policy, state, request, [request])[0] == "b-v100"
    assert place(policy, state, whole(1, models=("A100",)), [request]) is None
    assert place(policy, state, whole(1, models=("A100", "T4")), [request])[0] == "a-t4"


def test_a_cpu_pod_carries_no_model_constraint() -> None:
    assert PodRequest.normalised(
        cpu_milli=1000, memory_mib=0, num_gpu=0, gpu_milli=0, gpu_models=("T4",)
    ) == cpu_only(1000)
    # and a multi-GPU pod takes whole GPUs whatever the row says
    assert PodRequest.normalised(cpu_milli=0, memory_mib=0, num_gpu=2, gpu_milli=500) == whole(2)


@pytest.mark.parametrize("policy", sorted(PACKING_POLICIES))
def test_nothing_fits_is_none(policy: str) -> None:
    state = state_with((cap("n", gpus=2), (1000, 100), 1000, 1000))
    assert place(policy, state, whole(2), [whole(2)]) is None
    assert place(policy, state, share(200, cpu=1000), [share(200)]) is not None
    assert place(policy, state, share(200, cpu=1001), [share(200)]) is None


def test_random_draws_from_its_own_generator() -> None:
    requests = [whole(1), share(300), cpu_only(1000)] * 20

    def run(seed: int) -> list:
        state = ClusterState([cap(f"n{i}") for i in range(6)])
        policy = make_policy("random", PolicyContext(seed=seed))
        out = []
        for r in requests:
            c = policy.place(state, r)
            state.bind(r, c)
            out.append((c.node, c.gpus))
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_registry_names_the_policies() -> None:
    assert {"bestfit", "random", "fgd", "fgd-exact", "gpuctl"} <= set(PACKING_POLICIES)
    assert DEFAULT_PACKING_POLICY == "gpuctl"
    with pytest.raises(ValueError, match="unknown packing policy 'luck'; known: bestfit"):
        make_policy("luck")


# -- fragmentation -------------------------------------------------------------------------


def reference_fragmentation(
    workload: Workload, gpu_free: list[int], cpu_free: int, model: str
) -> int:
    """FGD's expected fragmentation of one node, written out plainly."""
    total = sum(gpu_free)
    out = 0
    for t, w in workload.types:
        if not t.num_gpu:
            frag = total  # a CPU-only type uses no GPU: every free milli is idle for it
        else:
            room = [f for f in gpu_free if f >= t.gpu_milli]
            runs = (
                cpu_free >= t.cpu_milli
                and len(room) >= t.num_gpu
                and (not t.gpu_models or model in t.gpu_models)
            )
            frag = sum(f for f in gpu_free if f < t.gpu_milli) if runs else total
        out += w * frag
    return out


def test_fragmentation_matches_the_plain_definition() -> None:
    workload = Workload.of(
        [share(500)] * 3 + [share(300, cpu=8000)] * 2 + [whole(2)] + [cpu_only(100)]
    )
    state = state_with(
        (cap("a", gpus=4, cpu=16_000), (1000, 450, 250, 0), 8000, 1 << 20),
        (cap("b", gpus=2, cpu=16_000), (700, 1000), 4000, 1 << 20),
    )
    frag = StateFragmentation(workload, state)
    got = frag.expected(state.gpu_free, state.cpu_free, np.arange(2))
    # a: 500 -> 450 + 250 stuck = 700 (x3); 300 (cpu 8000 ok) -> 250 stuck (x2);
    #    2 whole GPUs: only 1 whole free -> all 1700 (x1); CPU type -> 1700 (x1)
    #    = 2100 + 500 + 1700 + 1700 = 6000
    assert got[0] == 6000 == reference_fragmentation(workload, [1000, 450, 250, 0], 8000, "G2")
    assert got[1] == reference_fragmentation(workload, [700, 1000], 4000, "G2")


def test_fgd_leaves_room_for_the_popular_type() -> None:
    # Everyone asks 500 milli. A 200 share on a's 600-free GPU leaves 400: too small for a
    # 500, so fragmentation grows by 400; on b it leaves 800, still room for a 500: no growth.
    workload = [share(500)] * 9 + [share(200)]
    state = state_with(
        (cap("a", gpus=1), (600,), 96_000, 1 << 20),
        (cap("b", gpus=1), (1000,), 96_000, 1 << 20),
    )
    assert place("bestfit", state, share(200)) == ("a", ((0, 200),))  # tightest node
    for policy in ("fgd", "fgd-exact", "gpuctl"):
        assert place(policy, state, share(200), workload) == ("b", ((0, 200),)), policy


def test_fgd_chooses_the_gpu_inside_the_node() -> None:
    # GPU 0 has 600 free, GPU 1 has 700: a 200 share on GPU 1 leaves 500 (room for the
    # popular 500s), on GPU 0 it leaves 400 (fragment): FGD takes GPU 1, best fit GPU 0.
    workload = [share(500)] * 9 + [share(200)]
    state = state_with((cap("n", gpus=2), (600, 700), 96_000, 1 << 20))
    assert place("bestfit", state, share(200)) == ("n", ((0, 200),))
    assert place("fgd-exact", state, share(200), workload) == ("n", ((1, 200),))
    assert place("gpuctl", state, share(200), workload) == ("n", ((1, 200),))


def test_gpuctl_keeps_cpu_pods_off_gpu_dense_nodes() -> None:
    # GPU pods ask 12 cpu-milli per milli-GPU. A 32-core CPU pod on the 96-core 8-GPU node
    # would leave 64000 / 12 = 5333 milli-GPU feedable of 8000: 2667 stranded. On the
    # 104-core 2-GPU node it strands nothing. FGD sees no type stop fitting on either, so
    # it ties and takes the smallest name.
    workload = [whole(1, cpu=12_000)] * 10 + [cpu_only(32_000)]
    state = ClusterState(
        [cap("a-dense", gpus=8, cpu=96_000), cap("b-rich", gpus=2, cpu=104_000, model="T4")]
    )
    assert place("fgd-exact", state, cpu_only(32_000), workload)[0] == "a-dense"
    assert place("gpuctl", state, cpu_only(32_000), workload)[0] == "b-rich"


def test_a_foreign_model_is_not_fragmentation_for_gpuctl() -> None:
    # A type that may only use T4 cannot use a G2 node. FGD counts all of the G2 node's
    # free milli as fragmentation for it; gpuctl counts none (it is not that type's node).
    workload = Workload.of([share(500, models=("T4",))])
    state = ClusterState([cap("n", gpus=2)])
    fgd = StateFragmentation(workload, state)
    ours = StateFragmentation(workload, state, foreign=False)
    nodes = np.arange(1)
    assert fgd.expected(state.gpu_free, state.cpu_free, nodes)[0] == 2000
    assert ours.expected(state.gpu_free, state.cpu_free, nodes)[0] == 0


@pytest.mark.parametrize("policy", sorted(PACKING_POLICIES))
def test_same_input_same_placements(policy: str) -> None:
    requests = [share(300), whole(1, cpu=8000), share(650, cpu=2000), cpu_only(16_000), whole(4)]
    requests = requests * 12

    def run() -> list:
        state = ClusterState([cap(f"n{i}", gpus=g) for i, g in enumerate((8, 4, 2, 8, 1))])
        chooser = make_policy(policy, PolicyContext(workload=Workload.of(requests), seed=7))
        out = []
        for r in requests:
            c = chooser.place(state, r)
            if c is not None:
                state.bind(r, c)
            out.append(c)
        return out

    assert run() == run()


def test_cached_keys_follow_every_bind() -> None:
    # the per-shape cache recomputes only changed nodes: it must agree with a fresh policy
    requests = [share(300), whole(1, cpu=8000), share(650), cpu_only(16_000), whole(2)] * 8
    state = ClusterState([cap(f"n{i}", gpus=g) for i, g in enumerate((8, 4, 2, 8))])
    context = PolicyContext(workload=Workload.of(requests))
    cached = make_policy("gpuctl", context)
    for r in requests:
        fresh = make_policy("gpuctl", context)
        assert cached.place(state, r) == fresh.place(state, r)
        c = fresh.place(state, r)
        if c is not None:
            state.bind(r, c)


def test_bind_refuses_what_does_not_fit() -> None:
    state = state_with((cap("n", gpus=2, model="T4"), (1000, 300), 1000, 1000))
    with pytest.raises(ValueError, match="cannot take 400"):
        state.bind(share(400), Choice(0, ((1, 400),)))
    with pytest.raises(ValueError, match="CPU/memory"):
        state.bind(share(100, cpu=2000), Choice(0, ((0, 100),)))
    with pytest.raises(ValueError, match="T4 GPUs"):
        state.bind(share(100, models=("V100",)), Choice(0, ((0, 100),)))
    assert state.gpu_free.tolist() == [[1000, 300]]  # nothing changed


# -- the daemon's score plugin -------------------------------------------------------------


def view(node_id: str, gpu_free: tuple[int, ...], cpu: int = 96_000) -> NodeView:
    gpus = tuple(
        Gpu(index=i, uuid=f"{node_id}-{i}", model="H100 SXM", memory_mib=81_559, hbm_gbps=3350)
        for i in range(len(gpu_free))
    )
    node = Node(
        id=node_id,
        address=node_id,
        cpu_milli=cpu,
        memory_mib=1 << 20,
        profile=BandwidthProfile(gpus=gpus),
    )
    return NodeView(node=node, gpu_free_milli=gpu_free, cpu_free_milli=cpu, memory_free_mib=1 << 20)


def replica(milli: int = 0, gpus: int = 0) -> tuple[Job, RankRequest]:
    spec = JobSpec(kind=JobKind.INFERENCE, command=("serve",), gpus_per_node=gpus, gpu_milli=milli)
    return Job(id=1, spec=spec), RankRequest.of(spec)


def test_default_policy_packs_replicas_frag_aware_and_bestfit_stays_by_name() -> None:
    default = [s.name for s, _ in build_policy(DEFAULT_POLICY).scores]
    bestfit = [s.name for s, _ in build_policy("bestfit").scores]
    assert "frag-aware" in default and "best-fit" not in default
    assert bestfit == ["best-fit" if s == "frag-aware" else s for s in default]


def test_frag_aware_keeps_whole_gpus_whole() -> None:
    # a 500 share: on the node with a half-used GPU it fills that GPU and breaks nothing;
    # on the idle node it breaks a whole GPU (and with it the node's 8-GPU capacity)
    job, request = replica(milli=500)
    half_used = view("a", (500,) + (1000,) * 7)
    idle = view("b", (1000,) * 8)
    assert FragAware().score(job, request, half_used) > FragAware().score(job, request, idle)
    assert 0.0 <= FragAware().score(job, request, idle) <= 1.0


def test_frag_aware_scores_zero_where_the_replica_does_not_fit() -> None:
    job, request = replica(gpus=2)
    assert FragAware().score(job, request, view("a", (1000, 300))) == 0.0


# -- the mix the daemon packs for: the work it sees -------------------------------------------


def test_the_cycles_mix_counts_ranks_by_shape_most_common_first() -> None:
    def job(job_id: int, **kw) -> Job:
        return Job(id=job_id, spec=JobSpec(command=("x",), **kw))

    jobs = [
        job(1, kind=JobKind.INFERENCE, gpu_milli=600, replicas=3),
        job(2, kind=JobKind.TRAINING, gpus_per_node=8, num_nodes=4),
        job(3, kind=JobKind.INFERENCE, gpu_milli=600, replicas=2),
    ]
    assert CycleContext.mix_of(jobs) == (
        (RankRequest(gpu_milli=600), 5),
        (RankRequest(gpus=8), 4),
    )


def test_frag_aware_packs_for_the_mix_it_is_given_and_keeps_its_most_common_types() -> None:
    mix = tuple((RankRequest(gpu_milli=m), 100 - m // 10) for m in range(100, 1000, 100))
    prepared = FragAware().prepare(CycleContext(mix=mix))
    assert prepared.mix == mix[:MIX_TYPES]
    # A 250 share on a fresh GPU (750 left) or on one with 800 free (550 left). Against
    # whole-GPU work (no mix: the default guess) it goes where no whole GPU is broken; against
    # work of 600-milli shares, where 600 still fits afterwards.
    job, request = replica(milli=250)
    fresh, used = view("a", (1000,)), view("b", (800,))
    guess = FragAware()
    shares = FragAware(mix=((RankRequest(gpu_milli=600), 8), (RankRequest(gpu_milli=250), 1)))
    assert guess.score(job, request, used) > guess.score(job, request, fresh)
    assert shares.score(job, request, fresh) > shares.score(job, request, used)
    # the column form (over more nodes than the per-node shortcut takes) agrees
    views = [view(f"n{i:02d}", (1000,) if i % 2 else (800,)) for i in range(2 * 16)]
    table = NodeTable.of(views)
    for score in (guess, shares):
        columns = score.scores(job, request, table, np.arange(len(views))).tolist()
        assert columns == [score.score(job, request, v) for v in views]


def test_the_cycle_packs_replicas_for_the_work_queued_and_running() -> None:
    # Node a: a fresh GPU; node b: 800 milli free. Node c (draining: it takes nothing) runs
    # eight 600-milli replicas, so the mix the cycle sees is mostly 600-milli work, and the
    # 250 share goes to a, where 750 stays free for one more of them (b would keep 550).
    def node(node_id: str, gpus: int, state: NodeState = NodeState.READY) -> Node:
        return replace(view(node_id, (1000,) * gpus).node, state=state)

    def running(job_id: int, node_id: str, gpu: int, milli: int) -> Job:
        spec = JobSpec(kind=JobKind.INFERENCE, command=("serve",), gpu_milli=milli)
        rank = RankPlacement(rank=0, node_id=node_id, gpu_indices=(gpu,), gpu_milli=milli)
        return Job(id=job_id, spec=spec, state=JobState.RUNNING,
                   placement=Placement(ranks=(rank,)))  # fmt: skip

    now = datetime(2026, 1, 1, tzinfo=UTC)
    nodes = [node("a", 1), node("b", 1), node("c", 8, NodeState.DRAINING)]
    busy = [running(10, "b", 0, 200)] + [running(11 + g, "c", g, 600) for g in range(8)]
    job, _ = replica(milli=250)
    result = schedule(Snapshot.build(nodes, busy), [job], build_policy(DEFAULT_POLICY), now=now)
    (binding,) = result.bindings
    assert binding.placement.node_ids == ("a",)


def test_contention_weighs_models_pinned_demand_wants_beyond_the_rest() -> None:
    # 80 GPUs of model A, 20 of B. Demand: 100 one-GPU pods of any model, 20 pinned to B.
    # Total demand 120 GPUs: B's share of it is 20/120 = 0.1667 against 0.2 of the capacity:
    # pressure 0.833; A's 0 (nothing pinned to it). The average over the capacity is
    # 0.2 x 0.833 = 0.1667, so B's excess is 0.833 - 0.1667 = 0.6667 and A's 0.
    from gpuctl.core.packing import contention

    one = PodRequest(num_gpu=1, gpu_milli=1000)
    pinned = PodRequest(num_gpu=1, gpu_milli=1000, gpu_models=("B",))
    workload = Workload.counted([(one, 100), (pinned, 20)])
    excess = contention(workload, ("A", "B"), (80, 20))
    assert excess.tolist() == pytest.approx([0.0, 2 / 3])
    # Demand pinned in proportion to capacity leaves no model above the rest.
    both = Workload.counted([(one, 100), (replace(pinned, gpu_models=("A",)), 80), (pinned, 20)])
    assert contention(both, ("A", "B"), (80, 20)).tolist() == pytest.approx([0.0, 0.0])
    assert not contention(Workload.of([one]), ("A", "B"), (80, 20)).any()
