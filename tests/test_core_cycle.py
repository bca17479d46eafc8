"""Table tests of one scheduling cycle: gangs, replicas, filters, queue order, reasons.

Clusters and jobs come from small fluent builders; expected arithmetic is in the comments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuctl.core import CycleResult, schedule
from gpuctl.core.cycle import Binding
from gpuctl.core.errors import InvalidArgument
from gpuctl.core.model import (
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
    Placement,
    RankPlacement,
)
from gpuctl.core.plugins import DEFAULT_POLICY, Policy, build_policy
from gpuctl.core.snapshot import Snapshot

T0 = datetime(2025, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
MEMORY = {"H100 SXM": 81920, "A100 80GB": 81920, "L4": 23034}


class NodeBuilder:
    """`node("a").gpus("H100 SXM", 8).fabric("ib/s1/l1")`; no CPU or memory unless asked."""

    def __init__(self, node_id: str) -> None:
        self._id = node_id
        self._gpus: tuple[Gpu, ...] = ()
        self._fabric = ""
        self._state = NodeState.READY
        self._cpu = 0
        self._memory = 0
        self._net = Network()

    def gpus(
        self, model: str, count: int, *, memory_mib: int = 0, nvlink_gbps: float = 900.0
    ) -> NodeBuilder:
        mib = memory_mib or MEMORY.get(model, 81920)
        self._gpus = tuple(
            Gpu(
                index=i,
                uuid=f"GPU-{self._id}-{i}",
                model=model,
                memory_mib=mib,
                hbm_gbps=3350.0,
                nvlink_gbps=nvlink_gbps,
            )
            for i in range(count)
        )
        return self

    def fabric(self, path: str) -> NodeBuilder:
        self._fabric = path
        return self

    def state(self, state: NodeState) -> NodeBuilder:
        self._state = state
        return self

    def cpu(self, milli: int, memory_mib: int = 0) -> NodeBuilder:
        self._cpu, self._memory = milli, memory_mib
        return self

    def net(self, gbps: float, kind: NetKind = NetKind.INFINIBAND) -> NodeBuilder:
        self._net = Network(kind=kind, ports=1, gbps_per_port=gbps)
        return self

    def build(self) -> Node:
        return Node(
            id=self._id,
            address=f"{self._id}.cluster",
            fabric=self._fabric,
            cpu_milli=self._cpu,
            memory_mib=self._memory,
            profile=BandwidthProfile(gpus=self._gpus, network=self._net),
            state=self._state,
        )


def node(node_id: str) -> NodeBuilder:
    return NodeBuilder(node_id)


def h100(node_id: str, count: int = 8) -> NodeBuilder:
    return node(node_id).gpus("H100 SXM", count)


def _job(job_id: int, spec: JobSpec, created: int) -> Job:
    return Job(id=job_id, spec=spec, created_at=T0 + timedelta(seconds=created))


def training(
    job_id: int,
    *,
    nodes: int = 1,
    gpus: int = 8,
    model: str = "",
    priority: int = 0,
    created: int = 0,
    min_net_gbps: float = 0.0,
) -> Job:
    spec = JobSpec(
        kind=JobKind.TRAINING,
        command=("train",),
        num_nodes=nodes,
        gpus_per_node=gpus,
        gpu_model=model,
        priority=priority,
        min_net_gbps=min_net_gbps,
    )
    return _job(job_id, spec, created)


def inference(
    job_id: int,
    *,
    replicas: int = 1,
    gpus: int = 1,
    milli: int = 0,
    memory_mib: int = 0,
    model: str = "",
    cpu: int = 0,
    min_nvlink_gbps: float = 0.0,
    created: int = 0,
) -> Job:
    spec = JobSpec(
        kind=JobKind.INFERENCE,
        command=("serve",),
        replicas=replicas,
        gpus_per_node=0 if milli else gpus,
        gpu_milli=milli,
        gpu_memory_mib=memory_mib,
        gpu_model=model,
        cpu_milli=cpu,
        min_nvlink_gbps=min_nvlink_gbps,
    )
    return _job(job_id, spec, created)


def holding(job_id: int, node_id: str, gpus: tuple[int, ...], milli: int = 1000) -> Job:
    """A running job holding `gpus` (at `milli` each) of one node."""
    rank = RankPlacement(rank=0, node_id=node_id, gpu_indices=gpus, gpu_milli=milli)
    return Job(
        id=job_id,
        spec=JobSpec(kind=JobKind.INFERENCE, command=("x",)),
        state=JobState.RUNNING,
        placement=Placement(ranks=(rank,)),
    )


ALL = tuple(range(8))


@dataclass(frozen=True)
class Case:
    nodes: tuple[NodeBuilder, ...]
    pending: tuple[Job, ...]
    running: tuple[Job, ...] = ()
    bound: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = field(
        default_factory=dict
    )  # in rank order
    waiting: dict[int, str] = field(default_factory=dict)  # job id -> the whole reason


def run(case: Case, policy: Policy | None = None) -> CycleResult:
    snapshot = Snapshot.build([b.build() for b in case.nodes], case.running)
    return schedule(snapshot, case.pending, policy or build_policy(DEFAULT_POLICY), now=NOW)


CASES = [
    pytest.param(
        Case(
            # ib holds a and b (2 nodes x 8 free); roce holds only c
            nodes=(
                h100("a").fabric("ib/s1/l1"),
                h100("b").fabric("ib/s1/l1"),
                h100("c").fabric("roce/s1/l1"),
            ),
            pending=(training(1, nodes=2, gpus=8),),
            bound={1: (("a", ALL), ("b", ALL))},
        ),
        id="gang-fits-one-fabric",
    ),
    pytest.param(
        Case(
            # ib-a: a fits, c has 8 - 4 = 4 free < 8; ib-b: b fits. 2 fit in all, 1 per fabric.
            nodes=(
                h100("a").fabric("ib-a/s1/l1"),
                h100("b").fabric("ib-b/s1/l1"),
                h100("c").fabric("ib-a/s1/l1"),
            ),
            running=(holding(9, "c", (0, 1, 2, 3)),),
            pending=(training(1, nodes=2, gpus=8),),
            waiting={
                1: "needs 2 nodes x 8 GPUs on one fabric; largest fit: 1 node on fabric ib-a, "
                "2 across 2 fabrics (node c with 4 of 8 GPUs free)"
            },
        ),
        id="gang-needing-two-fabrics-waits",
    ),
    pytest.param(
        Case(
            # a alone on leaf l1; b and c share l2: {b, c} spans 1 leaf, {a, b} would span 2
            nodes=(
                h100("a").fabric("ib/s1/l1"),
                h100("b").fabric("ib/s1/l2"),
                h100("c").fabric("ib/s1/l2"),
            ),
            pending=(training(1, nodes=2, gpus=8),),
            bound={1: (("b", ALL), ("c", ALL))},
        ),
        id="gang-prefers-one-leaf",
    ),
    pytest.param(
        Case(
            nodes=(
                h100("a").fabric("ib/s1/l1").state(NodeState.DRAINING),
                h100("b").fabric("ib/s1/l1").state(NodeState.LOST),
                h100("c").fabric("ib/s1/l1"),
                h100("d").fabric("ib/s1/l1"),
            ),
            pending=(training(1, nodes=2, gpus=8),),
            bound={1: (("c", ALL), ("d", ALL))},
        ),
        id="gang-skips-draining-and-lost",
    ),
    pytest.param(
        Case(
            # a draining, c has 8 - 4 = 4 free: only b fits, 1 < 2
            nodes=(
                h100("a").fabric("ib-a/s1/l1").state(NodeState.DRAINING),
                h100("b").fabric("ib-a/s1/l1"),
                h100("c").fabric("ib-a/s1/l1"),
            ),
            running=(holding(9, "c", (4, 5, 6, 7)),),
            pending=(training(1, nodes=2, gpus=8, model="H100 SXM"),),
            waiting={
                1: "needs 2 nodes x 8 GPUs (H100 SXM) on one fabric; largest fit: 1 node on fabric ib-a "
                "(node a draining, node c with 4 of 8 GPUs free)"
            },
        ),
        id="gang-reason-names-the-nodes",
    ),
    pytest.param(
        Case(
            # z sits on leaf l1, a on l2: rank 0 follows the fabric path, not the node id
            nodes=(h100("a").fabric("ib/s1/l2"), h100("z").fabric("ib/s1/l1")),
            pending=(training(1, nodes=2, gpus=8),),
            bound={1: (("z", ALL), ("a", ALL))},
        ),
        id="rank-order-follows-fabric-path",
    ),
    pytest.param(
        Case(
            # whole-node = 0.5 x idle + 0.5 x gpus/free: a (4 GPUs) 0.5 + 0.5 x 4/4 = 1.0,
            # b (8 GPUs) 0.5 + 0.5 x 4/8 = 0.75
            nodes=(h100("b").fabric("ib/s1/l1"), h100("a", 4).fabric("ib/s1/l1")),
            pending=(training(1, nodes=1, gpus=4),),
            bound={1: (("a", (0, 1, 2, 3)),)},
        ),
        id="gang-takes-the-node-it-fills",
    ),
    pytest.param(
        Case(
            # x and y have no fabric path: never two of them in one gang, one alone is fine
            nodes=(h100("x"), h100("y")),
            pending=(training(1, nodes=2, gpus=8), training(2, nodes=1, gpus=8, created=1)),
            bound={2: (("x", ALL),)},
            waiting={
                1: "needs 2 nodes x 8 GPUs on one fabric; no node fits "
                "(2 nodes with no fabric path (a gang of one only) (x, y))"
            },
        ),
        id="no-fabric-gangs-of-one-only",
    ),
    pytest.param(
        Case(
            # best-fit = 1 - free after / capacity: n1 1 - 1/8 = 0.875, n2 1 - 7/8 = 0.125
            nodes=(h100("n1"), h100("n2")),
            running=(holding(9, "n1", (0, 1, 2, 3, 4, 5)),),
            pending=(inference(1),),
            bound={1: (("n1", (6,)),)},
        ),
        id="inference-best-fit-packs-fuller-node",
    ),
    pytest.param(
        Case(
            # replica 0: n1 and n2 tie (7/8 free after) -> n1 by id.
            # replica 1, mean of best-fit and spread 1/(1 + replicas here):
            # n1 (1 - 6/8 + 1/2) / 2 = 0.375, n2 (1 - 7/8 + 1) / 2 = 0.5625
            nodes=(h100("n1"), h100("n2")),
            pending=(inference(1, replicas=2),),
            bound={1: (("n1", (0,)), ("n2", (0,)))},
        ),
        id="inference-replicas-spread",
    ),
    pytest.param(
        Case(
            # free per GPU: 1000 - 300 = 700, 1000 - 600 = 400, 1000 - 800 = 200, 1000;
            # 300 fits in 700, 400 and 1000; 400 is the tightest
            nodes=(h100("n1", 4),),
            running=(
                holding(9, "n1", (0,), 300),
                holding(10, "n1", (1,), 600),
                holding(11, "n1", (2,), 800),
            ),
            pending=(inference(1, milli=300),),
            bound={1: (("n1", (1,)),)},
        ),
        id="gpu-share-takes-tightest-gpu",
    ),
    pytest.param(
        Case(
            # GPUs 1 and 2 both have 500 free: the tie goes to the lower index
            nodes=(h100("n1", 3),),
            running=(holding(9, "n1", (1, 2), 500),),
            pending=(inference(1, milli=250),),
            bound={1: (("n1", (1,)),)},
        ),
        id="gpu-share-tie-takes-lowest-index",
    ),
    pytest.param(
        Case(
            # n1 would be the best fit (1 of 8 free) but has A100s
            nodes=(node("n1").gpus("A100 80GB", 8), h100("n2")),
            running=(holding(9, "n1", (0, 1, 2, 3, 4, 5, 6)),),
            pending=(inference(1, model="H100 SXM"),),
            bound={1: (("n2", (0,)),)},
        ),
        id="gpu-model-filter",
    ),
    pytest.param(
        Case(
            # s1 would be the best fit (its 1 GPU, 1 - 0/1 = 1.0) but 23034 MiB < 40000 MiB
            nodes=(h100("l1"), node("s1").gpus("L4", 1)),
            pending=(inference(1, memory_mib=40000),),
            bound={1: (("l1", (0,)),)},
        ),
        id="gpu-memory-filter",
    ),
    pytest.param(
        Case(
            # whole GPUs add up: 2 x 40960 = 81920 >= 80000 MiB; 1 x 40960 would not do
            nodes=(node("n1").gpus("X", 2, memory_mib=40960),),
            pending=(
                inference(1, gpus=2, memory_mib=80000),
                inference(2, gpus=1, memory_mib=80000, created=1),
            ),
            bound={1: (("n1", (0, 1)),)},
            waiting={
                2: "needs 1 replica x 1 GPU with 80000 MiB; node n1 with 40960 MiB per GPU (needs 80000 MiB on 1 GPU)"
            },
        ),
        id="gpu-memory-sums-whole-gpus",
    ),
    pytest.param(
        Case(
            # l1 and l2 hold 1 replica each (81920 >= 40000); s1 has 23034 < 40000: 2 of 3
            nodes=(h100("l1", 1), h100("l2", 1), node("s1").gpus("L4", 1)),
            pending=(inference(1, replicas=3, memory_mib=40000),),
            waiting={
                1: "needs 3 replicas x 1 GPU with 40000 MiB; 2 fit (l1, l2), then "
                "2 nodes with 0 of 1 GPU free (l1, l2), node s1 with 23034 MiB per GPU (needs 40000 MiB on 1 GPU)"
            },
        ),
        id="replicas-short-of-memory-wait",
    ),
    pytest.param(
        Case(
            # a has 100 Gb/s < 200 floor; b has 400
            nodes=(h100("a").net(100, NetKind.ETHERNET), h100("b").net(400)),
            pending=(training(1, gpus=8, min_net_gbps=200),),
            bound={1: (("b", ALL),)},
        ),
        id="network-floor",
    ),
    pytest.param(
        Case(
            # a's GPUs talk over PCIe only (NVLink 0 < 400)
            nodes=(node("a").gpus("H100 PCIe", 8, nvlink_gbps=0), h100("b")),
            pending=(inference(1, min_nvlink_gbps=400),),
            bound={1: (("b", (0,)),)},
        ),
        id="nvlink-floor",
    ),
    pytest.param(
        Case(
            # 3 replicas > 2 GPUs: none placed, so job 2 (2 replicas) still finds both free
            nodes=(h100("n1", 2),),
            pending=(inference(1, replicas=3), inference(2, replicas=2, created=1)),
            bound={2: (("n1", (0,)), ("n1", (1,)))},
            waiting={1: "needs 3 replicas x 1 GPU; 2 fit (n1), then node n1 with 0 of 2 GPUs free"},
        ),
        id="replicas-all-or-nothing",
    ),
    pytest.param(
        Case(
            nodes=(h100("n1"),),
            pending=(training(1, created=0), training(2, priority=5, created=10)),
            bound={2: (("n1", ALL),)},
            waiting={1: "needs 1 node x 8 GPUs; no node fits (node n1 with 0 of 8 GPUs free)"},
        ),
        id="higher-priority-first",
    ),
    pytest.param(
        Case(
            nodes=(h100("n1"),),
            pending=(training(1, created=10), training(2, created=0)),
            bound={2: (("n1", ALL),)},
            waiting={1: "needs 1 node x 8 GPUs; no node fits (node n1 with 0 of 8 GPUs free)"},
        ),
        id="older-first-at-equal-priority",
    ),
    pytest.param(
        Case(
            # CPU only: n1 has 4000 cpu-milli < 8000
            nodes=(node("n1").cpu(4000), node("n2").cpu(16000)),
            pending=(inference(1, gpus=0, cpu=8000),),
            bound={1: (("n2", ()),)},
        ),
        id="cpu-fit",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_cycle(case: Case) -> None:
    result = run(case)
    bound = {
        b.job_id: tuple((r.node_id, r.gpu_indices) for r in b.placement.ranks)
        for b in result.bindings
    }
    assert bound == case.bound
    assert {u.job_id: readable(u.reason) for u in result.unschedulable} == case.waiting


def readable(reason: str) -> str:
    """Reasons print a real multiplication sign; tables spell it x (ruff flags the sign)."""
    return reason.replace("\N{MULTIPLICATION SIGN}", "x")


def test_reason_prints_a_multiplication_sign() -> None:
    (waiting,) = run(Case(nodes=(), pending=(training(1, nodes=2),))).unschedulable
    assert (
        waiting.reason
        == "needs 2 nodes \N{MULTIPLICATION SIGN} 8 GPUs on one fabric; the cluster has no nodes"
    )


def test_gang_placement_names_master_and_why() -> None:
    case = Case(
        nodes=(h100("a").fabric("ib-a/s1/l2"), h100("z").fabric("ib-a/s1/l1")),
        pending=(training(1, nodes=2),),
    )
    (binding,) = run(case).bindings
    assert [r.rank for r in binding.placement.ranks] == [0, 1]
    assert binding.placement.master_addr == "z.cluster"
    assert binding.placement.master_port == 0  # the daemon picks it
    assert binding.placement.reason == "fabric ib-a, 2 leaves, 2 whole nodes"


def test_share_placement_says_why() -> None:
    case = Case(nodes=(h100("n1", 2), h100("n2")), pending=(inference(1, milli=250),))
    (binding,) = run(case).bindings
    # n1: 1 - (2000 - 250)/2000 = 0.125 beats n2: 1 - (8000 - 250)/8000 = 0.03
    assert binding.placement.ranks[0].gpu_milli == 250
    assert binding.placement.reason == "node n1 GPU 0 keeps 750 milli free, best of 2 fitting nodes"


def test_later_jobs_see_earlier_bindings() -> None:
    case = Case(
        nodes=(h100("n1", 2),),
        pending=(inference(1), inference(2, created=1), inference(3, created=2)),
    )
    result = run(case)
    assert [(b.job_id, b.placement.ranks[0].gpu_indices) for b in result.bindings] == [
        (1, (0,)),
        (2, (1,)),
    ]
    assert [u.job_id for u in result.unschedulable] == [3]


def test_schedule_leaves_the_snapshot_as_it_was() -> None:
    snapshot = Snapshot.build([h100("n1").build()], ())
    before = snapshot.nodes
    result = schedule(snapshot, [training(1)], build_policy(DEFAULT_POLICY), now=NOW)
    assert len(result.bindings) == 1
    assert snapshot.nodes == before


def test_same_input_same_decision_whatever_the_order() -> None:
    nodes = [h100(f"n{i}").fabric(f"ib-{i % 2}/s1/l{i % 3}").build() for i in range(8)]
    pending = [training(i, nodes=2, gpus=4, created=i) for i in range(4)] + [
        inference(10 + i, replicas=3, milli=300, created=i) for i in range(4)
    ]
    policy = build_policy(DEFAULT_POLICY)
    first = schedule(Snapshot.build(nodes, ()), pending, policy, now=NOW)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(nodes)
        rng.shuffle(pending)
        assert schedule(Snapshot.build(nodes, ()), pending, policy, now=NOW) == first
    assert len(first.bindings) == 8


# -- snapshot ------------------------------------------------------------------------------


def test_snapshot_counts_running_jobs_only() -> None:
    done = replace(holding(8, "n1", (0, 1)), state=JobState.SUCCEEDED)
    cancelling = replace(holding(9, "n1", (2,), 500), state=JobState.CANCELLING)
    gone = holding(10, "elsewhere", (0,))  # on a node no longer in the cluster
    snapshot = Snapshot.build([h100("n1", 4).cpu(8000, 1024).build()], (done, cancelling, gone))
    view = snapshot.node("n1")
    assert view.gpu_free_milli == (1000, 1000, 500, 1000)
    assert view.ranks == ((9, 1),)


def test_assume_refuses_to_oversubscribe_and_forget_undoes() -> None:
    snapshot = Snapshot.build([h100("n1", 2).cpu(8000, 1024).build()], ())
    half = Placement(
        ranks=(
            RankPlacement(rank=0, node_id="n1", gpu_indices=(0,), gpu_milli=600, cpu_milli=4000),
        )
    )
    snapshot.assume(1, half)
    with pytest.raises(ValueError, match="GPU 0 of node n1 has 400 milli free"):
        snapshot.assume(2, half)
    too_much_cpu = Placement(
        ranks=(RankPlacement(rank=0, node_id="n1", gpu_indices=(1,), cpu_milli=6000),)
    )
    with pytest.raises(ValueError, match="cpu-milli"):
        snapshot.assume(3, too_much_cpu)
    assert snapshot.node("n1").gpu_free_milli == (400, 1000)  # the failed assume left no trace
    snapshot.forget(1)
    snapshot.forget(1)  # idempotent
    snapshot.forget(42)
    assert snapshot.node("n1").gpu_free_milli == (1000, 1000)
    assert snapshot.node("n1").cpu_free_milli == 8000
    snapshot.assume(2, half)


@pytest.mark.parametrize(
    ("ranks", "error"),
    [
        pytest.param(
            (RankPlacement(rank=0, node_id="nope", gpu_indices=(0,)),),
            "not in the snapshot",
            id="unknown-node",
        ),
        pytest.param(
            (RankPlacement(rank=0, node_id="n1", gpu_indices=(5,)),), "no GPU 5", id="unknown-gpu"
        ),
        pytest.param(
            (RankPlacement(rank=0, node_id="n1", gpu_indices=(0, 0)),), "twice", id="gpu-twice"
        ),
        pytest.param(
            (
                RankPlacement(rank=0, node_id="n1", gpu_indices=(0,)),
                RankPlacement(rank=1, node_id="n1", gpu_indices=(0,)),
            ),
            "has 0 milli free",
            id="two-ranks-one-gpu",
        ),
    ],
)
def test_assume_rejects_bad_placements(ranks: tuple[RankPlacement, ...], error: str) -> None:
    snapshot = Snapshot.build([h100("n1", 2).build()], ())
    with pytest.raises(ValueError, match=error):
        snapshot.assume(1, Placement(ranks=ranks))
    assert snapshot.node("n1").gpu_free_milli == (1000, 1000)


# -- policies ------------------------------------------------------------------------------


def test_default_policy_names_its_plugins() -> None:
    policy = build_policy(DEFAULT_POLICY)
    assert policy.filters[0].name == "node-ready"
    assert [(s.name, w) for s, w in policy.scores] == [
        ("best-fit", 1.0),
        ("spread", 1.0),
        ("whole-node", 1.0),
    ]


def test_weights_override_drop_and_reach_the_cycle() -> None:
    policy = build_policy(DEFAULT_POLICY, {"spread": 0.0, "best-fit": 2.0})
    assert [(s.name, w) for s, w in policy.scores] == [("best-fit", 2.0), ("whole-node", 1.0)]
    # without spread, best-fit packs both replicas on n1: 1 - 6/8 = 0.25 beats 1 - 7/8
    case = Case(nodes=(h100("n1"), h100("n2")), pending=(inference(1, replicas=2),))
    (binding,) = run(case, policy).bindings
    assert binding.placement.node_ids == ("n1", "n1")


@pytest.mark.parametrize(
    ("name", "weights", "field_name"),
    [
        pytest.param("fastest", None, "scheduler.policy", id="unknown-policy"),
        pytest.param(DEFAULT_POLICY, {"luck": 1.0}, "scheduler.weights.luck", id="unknown-score"),
        pytest.param(
            DEFAULT_POLICY, {"spread": -1.0}, "scheduler.weights.spread", id="negative-weight"
        ),
        pytest.param(
            DEFAULT_POLICY, {"spread": float("nan")}, "scheduler.weights.spread", id="nan-weight"
        ),
    ],
)
def test_bad_policy_config_names_the_field(
    name: str, weights: dict[str, float] | None, field_name: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_policy(name, weights)
    assert [v.field for v in caught.value.violations] == [field_name]


def test_binding_is_a_value() -> None:
    placement = Placement(ranks=(RankPlacement(rank=0, node_id="n1"),))
    assert Binding(job_id=1, placement=placement) == Binding(job_id=1, placement=placement)
