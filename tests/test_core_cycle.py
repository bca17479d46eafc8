"""Table tests of one scheduling cycle: gangs on fabrics and islands, replicas, filters,
workload-aware node choice, queue order and fair share, reservations and backfill,
preemption, and the reasons left on waiting jobs.

Clusters and jobs come from small fluent builders; expected arithmetic is in the comments.
Times: T0 = 00:00 UTC, the cycle runs at NOW = 01:00 UTC.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuctl.core import CycleResult, schedule
from gpuctl.core.cycle import Binding, Preemption, Reservation
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
MEMORY = {"H100 SXM": 81920, "A100 80GB": 81920, "L4": 23034, "L40S": 46068}
# Datasheet figures (src/gpuctl/data/gpu_specs.csv): HBM GB/s, NVLink GB/s, dense BF16 TFLOPS.
DATASHEET = {"H100 SXM": (3350.0, 900.0, 989.4), "L40S": (864.0, 0.0, 362.05)}


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
        self._price = 0.0
        self._tflops = 0.0

    def gpus(
        self,
        model: str,
        count: int,
        *,
        memory_mib: int = 0,
        nvlink_gbps: float | None = None,
        hbm_gbps: float | None = None,
    ) -> NodeBuilder:
        mib = memory_mib or MEMORY.get(model, 81920)
        hbm, nvlink, tflops = DATASHEET.get(model, (3350.0, 900.0, 0.0))
        self._tflops = tflops * count
        self._gpus = tuple(
            Gpu(
                index=i,
                uuid=f"GPU-{self._id}-{i}",
                model=model,
                memory_mib=mib,
                hbm_gbps=hbm if hbm_gbps is None else hbm_gbps,
                nvlink_gbps=nvlink if nvlink_gbps is None else nvlink_gbps,
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

    def net(self, gbps: float, kind: NetKind = NetKind.INFINIBAND, ports: int = 1) -> NodeBuilder:
        self._net = Network(kind=kind, ports=ports, gbps_per_port=gbps)
        return self

    def price(self, per_hour: float) -> NodeBuilder:
        self._price = per_hour
        return self

    def build(self) -> Node:
        return Node(
            id=self._id,
            address=f"{self._id}.cluster",
            fabric=self._fabric,
            cpu_milli=self._cpu,
            memory_mib=self._memory,
            profile=BandwidthProfile(gpus=self._gpus, network=self._net, bf16_tflops=self._tflops),
            state=self._state,
            price_per_hour=self._price,
        )


def node(node_id: str) -> NodeBuilder:
    return NodeBuilder(node_id)


def h100(node_id: str, count: int = 8) -> NodeBuilder:
    return node(node_id).gpus("H100 SXM", count)


def h100_ib(node_id: str, fabric: str) -> NodeBuilder:
    """An 8 x H100 SXM node with 8 x 400 Gb/s InfiniBand at $23.60/h (Nebius, $2.95/GPU-h)."""
    return h100(node_id).fabric(fabric).net(400, ports=8).price(23.60)


def l40s_eth(node_id: str, fabric: str) -> NodeBuilder:
    """An 8 x L40S node with 100 Gb/s Ethernet at $18.28/h (Nebius, $2.2844/GPU-h x 8)."""
    return node(node_id).gpus("L40S", 8).fabric(fabric).net(100, NetKind.ETHERNET).price(18.2752)


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
    min_nvlink_gbps: float = 0.0,
    limit_min: int = 0,
    owner: str = "",
    queue: str = "default",
) -> Job:
    spec = JobSpec(
        kind=JobKind.TRAINING,
        command=("train",),
        num_nodes=nodes,
        gpus_per_node=gpus,
        gpu_model=model,
        priority=priority,
        min_net_gbps=min_net_gbps,
        min_nvlink_gbps=min_nvlink_gbps,
        time_limit_s=limit_min * 60,
        owner=owner,
        queue=queue,
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
    priority: int = 0,
    tokens_per_s: float = 0.0,
    weights_gb: float = 0.0,
    limit_min: int = 0,
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
        priority=priority,
        target_tokens_per_s=tokens_per_s,
        weights_gb=weights_gb,
        time_limit_s=limit_min * 60,
    )
    return _job(job_id, spec, created)


def holding(job_id: int, node_id: str, gpus: tuple[int, ...], milli: int = 1000) -> Job:
    """A running job holding `gpus` (at `milli` each) of one node."""
    return running(job_id).on(node_id, gpus, milli).build()


ALL = tuple(range(8))


class RunningBuilder:
    """`running(9).on("a").on("b").started(30).limit(120).priority(1).preemptible()`: a job
    holding resources; times in minutes before NOW and of its time limit."""

    def __init__(self, job_id: int) -> None:
        self._id = job_id
        self._ranks: list[RankPlacement] = []
        self._spec = JobSpec(kind=JobKind.INFERENCE, command=("x",))
        self._started: datetime | None = None
        self._state = JobState.RUNNING

    def on(self, node_id: str, gpus: tuple[int, ...] = ALL, milli: int = 1000) -> RunningBuilder:
        self._ranks.append(
            RankPlacement(rank=len(self._ranks), node_id=node_id, gpu_indices=gpus, gpu_milli=milli)
        )
        return self

    def started(self, minutes_ago: float) -> RunningBuilder:
        self._started = NOW - timedelta(minutes=minutes_ago)
        return self

    def limit(self, minutes: int) -> RunningBuilder:
        self._spec = replace(self._spec, time_limit_s=minutes * 60)
        return self

    def priority(self, priority: int) -> RunningBuilder:
        self._spec = replace(self._spec, priority=priority)
        return self

    def preemptible(self) -> RunningBuilder:
        self._spec = replace(self._spec, preemptible=True)
        return self

    def owner(self, owner: str, queue: str = "default") -> RunningBuilder:
        self._spec = replace(self._spec, owner=owner, queue=queue)
        return self

    def cancelling(self) -> RunningBuilder:
        self._state = JobState.CANCELLING
        return self

    def build(self) -> Job:
        return Job(
            id=self._id,
            spec=self._spec,
            state=self._state,
            placement=Placement(ranks=tuple(self._ranks)),
            started_at=self._started,
        )


def running(job_id: int) -> RunningBuilder:
    return RunningBuilder(job_id)


@dataclass(frozen=True)
class Case:
    nodes: tuple[NodeBuilder, ...]
    pending: tuple[Job, ...]
    running: tuple[Job | RunningBuilder, ...] = ()
    bound: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = field(
        default_factory=dict
    )  # in rank order
    waiting: dict[int, str] = field(default_factory=dict)  # job id -> the whole reason
    reserved: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # HH:MM, nodes
    preempted: dict[int, int] = field(default_factory=dict)  # victim -> for job
    policy: str = DEFAULT_POLICY


def run(case: Case, policy: Policy | None = None) -> CycleResult:
    held = [r.build() if isinstance(r, RunningBuilder) else r for r in case.running]
    snapshot = Snapshot.build([b.build() for b in case.nodes], held)
    return schedule(snapshot, case.pending, policy or build_policy(case.policy), now=NOW)


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
                1: "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib-a, leaf ib-a/s1/l1), 2 across 2 fabrics (node c with 4 of 8 GPUs free); "
                "no reservation: the nodes it needs are held by jobs with no time limit (9), "
                "which never free up for planning"
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
                1: "needs 2 nodes x 8 GPUs (H100 SXM) on one fabric; largest free island has 1 node "
                "(fabric ib-a, leaf ib-a/s1/l1) (node a draining, node c with 4 of 8 GPUs free); "
                "no reservation: the nodes it needs are held by jobs with no time limit (9), "
                "which never free up for planning"
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
            # job 2 was placed first in this cycle, with no time limit: nothing to plan by
            waiting={
                1: "needs 1 node x 8 GPUs; no node fits (node n1 with 0 of 8 GPUs free); "
                "no reservation: the nodes it needs are held by jobs with no time limit (2), "
                "which never free up for planning"
            },
        ),
        id="higher-priority-first",
    ),
    pytest.param(
        Case(
            nodes=(h100("n1"),),
            pending=(training(1, created=10), training(2, created=0)),
            bound={2: (("n1", ALL),)},
            waiting={
                1: "needs 1 node x 8 GPUs; no node fits (node n1 with 0 of 8 GPUs free); "
                "no reservation: the nodes it needs are held by jobs with no time limit (2), "
                "which never free up for planning"
            },
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
    # -- topology: whole nodes, leaves, islands ---------------------------------------------
    pytest.param(
        Case(
            # ib-a: 2 x 16-GPU nodes on one leaf, each rank leaves 8 GPUs idle (2 partial);
            # ib-b: 2 x 8-GPU nodes on 2 leaves (0 partial). Whole nodes come before leaves.
            nodes=(
                h100("p1", 16).fabric("ib-a/s1/l1"),
                h100("p2", 16).fabric("ib-a/s1/l1"),
                h100("w1").fabric("ib-b/s1/l1"),
                h100("w2").fabric("ib-b/s1/l2"),
            ),
            pending=(training(1, nodes=2, gpus=8),),
            bound={1: (("w1", ALL), ("w2", ALL))},
        ),
        id="gang-whole-nodes-before-fewest-leaves",
    ),
    pytest.param(
        Case(
            # ib-a spans 2 leaves, ib-b holds the gang on 1 leaf (ib-a would win on the name)
            nodes=(
                h100("a1").fabric("ib-a/s1/l1"),
                h100("a2").fabric("ib-a/s1/l2"),
                h100("b1").fabric("ib-b/s1/l1"),
                h100("b2").fabric("ib-b/s1/l1"),
            ),
            pending=(training(1, nodes=2, gpus=8),),
            bound={1: (("b1", ALL), ("b2", ALL))},
        ),
        id="gang-fewest-leaves-across-fabrics",
    ),
    pytest.param(
        Case(
            # job 2 (4 nodes) is queued behind job 1 (2 nodes). On ib-a job 1 would leave ib-a
            # 4 - 2 = 2 and ib-b 2: job 2 fits nowhere (0 gangs fit). On ib-b it leaves ib-a 4:
            # job 2 fits (1 gang fits), so job 1 takes ib-b and both start.
            nodes=(
                *(h100(f"a{i}").fabric("ib-a/s1/l1") for i in range(1, 5)),
                h100("b1").fabric("ib-b/s1/l1"),
                h100("b2").fabric("ib-b/s1/l1"),
            ),
            pending=(training(1, nodes=2), training(2, nodes=4, created=10)),
            bound={
                1: (("b1", ALL), ("b2", ALL)),
                2: (("a1", ALL), ("a2", ALL), ("a3", ALL), ("a4", ALL)),
            },
        ),
        id="gang-leaves-the-island-a-queued-gang-needs",
    ),
    pytest.param(
        Case(
            # c and d talk over PCIe (NVLink 0 < 400); b is full: the island on ib-a is a alone
            nodes=(
                h100("a").fabric("ib-a/s1/l3"),
                h100("b").fabric("ib-a/s1/l3"),
                node("c").gpus("H100 PCIe", 8, nvlink_gbps=0).fabric("pcie/s1/l1"),
                node("d").gpus("H100 PCIe", 8, nvlink_gbps=0).fabric("pcie/s1/l1"),
            ),
            running=(holding(9, "b", ALL),),
            pending=(training(1, nodes=2, min_nvlink_gbps=400),),
            waiting={
                1: "needs 2 nodes x 8 GPUs (NVLink >= 400 GB/s) on one fabric; largest free "
                "island has 1 node (fabric ib-a, leaf ib-a/s1/l3) (node b with 0 of 8 GPUs free, "
                "2 nodes with NVLink 0 gbps (floor 400) (c, d)); no reservation: the nodes it "
                "needs are held by jobs with no time limit (9), which never free up for planning"
            },
        ),
        id="gang-reason-names-the-largest-island",
    ),
    # -- workload-aware node choice ----------------------------------------------------------
    pytest.param(
        Case(
            # Gang: both fabrics whole and 1 leaf, nothing queued behind it: the scores decide.
            # training-fit = mean(net/3200, NVLink/900, TFLOPS/989.4): H100 (1 + 1 + 1)/3 = 1,
            # L40S (100/3200 + 0 + 362.05/989.4)/3 = 0.13 -> H100s h1, h2.
            # Replicas (30 tokens/s x 14 GB = 420 GB/s floor, both meet it): hbm-per-dollar
            # counts up to the floor: H100 420/2.95 = 142, L40S 420/2.2844 = 184 -> 0.77 vs 1;
            # interconnect-thrift: H100 1 - mean(3200/3200, 900/900) = 0, L40S
            # 1 - mean(100/3200, 0/900) = 0.98. Mean with best-fit 0.125 and spread 1:
            # H100 (0.125 + 1 + 0.77 + 0)/4 = 0.47 < L40S (0.125 + 1 + 1 + 0.98)/4 = 0.78,
            # though h3 and h4 are free. Job 3 (no target): H100 3350/2.95 = 1136 GB/s per $
            # -> 1, L40S 864/2.2844 = 378 -> 0.33; H100 (0.125 + 1 + 1 + 0)/4 = 0.53 < l1
            # (1 - 6/8 + 1 + 0.33 + 0.98)/4 = 0.64: still the L40S.
            nodes=(
                *(h100_ib(f"h{i}", "ib-a/s1/l1") for i in range(1, 5)),
                l40s_eth("l1", "eth/s1/l1"),
                l40s_eth("l2", "eth/s1/l1"),
            ),
            pending=(
                training(1, nodes=2),
                inference(2, replicas=2, tokens_per_s=30, weights_gb=14, created=1),
                inference(3, created=2),
            ),
            bound={
                1: (("h1", ALL), ("h2", ALL)),
                2: (("l1", (0,)), ("l2", (0,))),
                3: (("l1", (1,)),),
            },
        ),
        id="mixed-cluster-training-on-h100-inference-on-l40s",
    ),
    pytest.param(
        Case(
            # job 1: 50 tokens/s x 40 GB = 2000 GB/s: L40S 864 < 2000, H100 3350 >= 2000.
            # job 2: 100 x 40 = 4000 GB/s: more than either.
            nodes=(h100_ib("h1", "ib-a/s1/l1"), l40s_eth("l1", "eth/s1/l1")),
            pending=(
                inference(1, tokens_per_s=50, weights_gb=40),
                inference(2, tokens_per_s=100, weights_gb=40, created=1),
            ),
            bound={1: (("h1", (0,)),)},
            waiting={
                2: "needs 1 replica x 1 GPU with HBM >= 4000 GB/s; node h1 with HBM 3350 GB/s "
                "per replica (floor 4000: 100 tokens/s x 40 GB), node l1 with HBM 864 GB/s per "
                "replica (floor 4000: 100 tokens/s x 40 GB)"
            },
        ),
        id="hbm-floor-from-tokens-per-second",
    ),
    pytest.param(
        Case(
            # 60 tokens/s x 28 GB = 1680 GB/s: two L40S in tensor parallel stream
            # 2 x 864 = 1728 >= 1680; one alone 864 < 1680 goes to an H100
            nodes=(h100_ib("h1", "ib-a/s1/l1"), l40s_eth("l1", "eth/s1/l1")),
            pending=(
                inference(1, gpus=2, tokens_per_s=60, weights_gb=28),
                inference(2, gpus=1, tokens_per_s=60, weights_gb=28, created=1),
            ),
            bound={1: (("l1", (0, 1)),), 2: (("h1", (0,)),)},
        ),
        id="hbm-floor-counts-tensor-parallel-gpus",
    ),
    pytest.param(
        Case(
            # 60 GB = 57220 MiB of weights > 46068 MiB of one L40S: only the H100 holds them
            nodes=(h100_ib("h1", "ib-a/s1/l1"), l40s_eth("l1", "eth/s1/l1")),
            pending=(inference(1, weights_gb=60),),
            bound={1: (("h1", (0,)),)},
        ),
        id="weights-must-fit-gpu-memory",
    ),
    pytest.param(
        Case(
            # Job 2's largest island is {a, b} on ib-a (c alone on ib-b): island-guard scores
            # a and b 0, c 1, so the replica (ahead by priority) leaves {a, b} to the gang.
            nodes=(
                h100("a").fabric("ib-a/s1/l1"),
                h100("b").fabric("ib-a/s1/l1"),
                h100("c").fabric("ib-b/s1/l1"),
            ),
            pending=(inference(1, priority=5), training(2, nodes=2, created=1)),
            bound={1: (("c", (0,)),), 2: (("a", ALL), ("b", ALL))},
        ),
        id="replica-leaves-the-island-a-queued-gang-needs",
    ),
    # -- queue order -------------------------------------------------------------------------
    pytest.param(
        Case(
            # alice holds 8 GPUs, bob 0: bob's younger job goes first
            nodes=(h100("n1"), h100("n2")),
            running=(running(9).on("n1").owner("alice"),),
            pending=(training(1, owner="alice"), training(2, owner="bob", created=10)),
            bound={2: (("n2", ALL),)},
            waiting={
                1: "needs 1 node x 8 GPUs; no node fits (2 nodes with 0 of 8 GPUs free (n1, n2)); "
                "no reservation: the nodes it needs are held by jobs with no time limit (2, 9), "
                "which never free up for planning"
            },
        ),
        id="fair-share-owner-with-fewer-gpus-first",
    ),
    pytest.param(
        Case(
            # queue research holds 8 GPUs (alice's), prod 0: alice's prod job before bob's
            # research job, though alice holds more than bob
            nodes=(h100("n1"), h100("n2")),
            running=(running(9).on("n1").owner("alice", "research"),),
            pending=(
                training(1, owner="bob", queue="research"),
                training(2, owner="alice", queue="prod", created=10),
            ),
            bound={2: (("n2", ALL),)},
            waiting={
                1: "needs 1 node x 8 GPUs; no node fits (2 nodes with 0 of 8 GPUs free (n1, n2)); "
                "no reservation: the nodes it needs are held by jobs with no time limit (2, 9), "
                "which never free up for planning"
            },
        ),
        id="fair-share-queue-before-owner",
    ),
    pytest.param(
        Case(
            # fifo: arrival order only, priority 5 does not jump the queue
            nodes=(h100("n1"),),
            pending=(training(1), training(2, priority=5, created=10)),
            bound={1: (("n1", ALL),)},
            waiting={2: "needs 1 node x 8 GPUs; no node fits (node n1 with 0 of 8 GPUs free)"},
            policy="fifo",
        ),
        id="fifo-is-arrival-order",
    ),
    pytest.param(
        Case(
            # fifo: job 1 cannot start, so nothing behind it does, though n2 is free
            nodes=(h100("n1").fabric("ib/s1/l1"), h100("n2").fabric("ib/s1/l1")),
            running=(holding(9, "n1", ALL),),
            pending=(training(1, nodes=2), training(2, created=10)),
            waiting={
                1: "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1) (node n1 with 0 of 8 GPUs free)",
                2: "waiting behind job 1 (strict FIFO: nothing starts before it)",
            },
            policy="fifo",
        ),
        id="fifo-blocked-head-stops-the-queue",
    ),
    pytest.param(
        Case(
            # first fit: job 2 takes n2 and job 1 waits on (and may starve)
            nodes=(h100("n1").fabric("ib/s1/l1"), h100("n2").fabric("ib/s1/l1")),
            running=(holding(9, "n1", ALL),),
            pending=(training(1, nodes=2), training(2, created=10)),
            bound={2: (("n2", ALL),)},
            waiting={
                1: "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1) (node n1 with 0 of 8 GPUs free)"
            },
            policy="first-fit",
        ),
        id="first-fit-lets-later-jobs-pass",
    ),
    # -- reservations and backfill (NOW = 01:00) ---------------------------------------------
    pytest.param(
        Case(
            # job 9 started 00:30 with a 2h limit: a frees at 02:30; b is free now
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1")),
            running=(running(9).on("a").started(30).limit(120),),
            pending=(training(1, nodes=2),),
            reserved={1: ("02:30", ("a", "b"))},
            waiting={
                1: "reserved: starts by 02:30 UTC when job 9 reaches its time limit (nodes a, b); "
                "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1) (node a with 0 of 8 GPUs free)"
            },
        ),
        id="blocked-gang-reserves-from-time-limits",
    ),
    pytest.param(
        Case(
            # job 2 ends by 01:00 + 1h = 02:00 <= 02:30: it backfills on b without delaying job 1
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1")),
            running=(running(9).on("a").started(30).limit(120),),
            pending=(training(1, nodes=2), training(2, limit_min=60, created=10)),
            bound={2: (("b", ALL),)},
            reserved={1: ("02:30", ("a", "b"))},
            waiting={
                1: "reserved: starts by 02:30 UTC when job 9 reaches its time limit (nodes a, b); "
                "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1) (node a with 0 of 8 GPUs free)"
            },
        ),
        id="short-job-backfills-before-the-reservation",
    ),
    pytest.param(
        Case(
            # job 2 would end 01:00 + 2h = 03:00 > 02:30 on b: it waits (1h30m of room left);
            # job 3 has no limit at all: it waits too
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1")),
            running=(running(9).on("a").started(30).limit(120),),
            pending=(
                training(1, nodes=2),
                training(2, limit_min=120, created=10),
                inference(3, created=20),
            ),
            reserved={1: ("02:30", ("a", "b"))},
            waiting={
                1: "reserved: starts by 02:30 UTC when job 9 reaches its time limit (nodes a, b); "
                "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1) (node a with 0 of 8 GPUs free)",
                2: "waiting behind job 1's reservation (starts by 02:30 UTC on a, b); "
                "a time limit of at most 1h30m would let it start now",
                3: "waiting behind job 1's reservation (starts by 02:30 UTC on a, b); "
                "a time limit of at most 1h30m would let it start now",
            },
        ),
        id="long-job-waits-behind-the-reservation",
    ),
    pytest.param(
        Case(
            # c is on another fabric, so not reserved: job 2 (no limit) goes there, not to b
            # (b and c tie on score; without the reservation b would win on its name)
            nodes=(
                h100("a").fabric("ib/s1/l1"),
                h100("b").fabric("ib/s1/l1"),
                h100("c").fabric("ib-b/s1/l1"),
            ),
            running=(running(9).on("a").started(30).limit(120),),
            pending=(training(1, nodes=2), training(2, created=10)),
            bound={2: (("c", ALL),)},
            reserved={1: ("02:30", ("a", "b"))},
            waiting={
                1: "reserved: starts by 02:30 UTC when job 9 reaches its time limit (nodes a, b); "
                "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1), 2 across 2 fabrics (node a with 0 of 8 GPUs free)"
            },
        ),
        id="long-job-backfills-off-the-reserved-nodes",
    ),
    pytest.param(
        Case(
            # d is free; gang 9 frees a and b at 00:30 + 1h = 01:30; job 8 frees c at
            # 00:00 + 4h = 04:00. The third node is ready at 01:30: a, b, d.
            nodes=tuple(h100(n).fabric("ib/s1/l1") for n in "abcd"),
            running=(
                running(9).on("a").on("b").started(30).limit(60),
                running(8).on("c").started(60).limit(240),
            ),
            pending=(training(1, nodes=3),),
            reserved={1: ("01:30", ("a", "b", "d"))},
            waiting={
                1: "reserved: starts by 01:30 UTC when job 9 reaches its time limit "
                "(nodes a, b, d); needs 3 nodes x 8 GPUs on one fabric; largest free island has "
                "1 node (fabric ib, leaf ib/s1/l1) (3 nodes with 0 of 8 GPUs free (a, b, c))"
            },
        ),
        id="reservation-counts-the-earliest-nodes",
    ),
    pytest.param(
        Case(
            # job 9 started 00:30 with a 48h limit: a frees 2025-01-03 00:30, 47h30m from now
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1")),
            running=(running(9).on("a").started(30).limit(48 * 60),),
            pending=(training(1, nodes=2), inference(2, created=10)),
            reserved={1: ("00:30", ("a", "b"))},
            waiting={
                1: "reserved: starts by 2025-01-03 00:30 UTC when job 9 reaches its time limit "
                "(nodes a, b); needs 2 nodes x 8 GPUs on one fabric; largest free island has "
                "1 node (fabric ib, leaf ib/s1/l1) (node a with 0 of 8 GPUs free)",
                2: "waiting behind job 1's reservation (starts by 2025-01-03 00:30 UTC on a, b); "
                "a time limit of at most 1d23h30m would let it start now",
            },
        ),
        id="reservation-days-away-names-the-date",
    ),
    pytest.param(
        Case(
            # a cancelling job lets go as soon as its ranks stop: planned as ending now
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1")),
            running=(running(9).on("a").cancelling(),),
            pending=(training(1, nodes=2),),
            reserved={1: ("01:00", ("a", "b"))},
            waiting={
                1: "reserved: starts by 01:00 UTC when job 9 finishes stopping (nodes a, b); "
                "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1) (node a with 0 of 8 GPUs free)"
            },
        ),
        id="cancelling-job-frees-its-nodes-first",
    ),
    pytest.param(
        Case(
            # fifo-backfill: arrival order, and EASY backfilling around the blocked head
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1")),
            running=(running(9).on("a").started(30).limit(120),),
            pending=(training(1, nodes=2), training(2, limit_min=60, priority=5, created=10)),
            bound={2: (("b", ALL),)},
            reserved={1: ("02:30", ("a", "b"))},
            waiting={
                1: "reserved: starts by 02:30 UTC when job 9 reaches its time limit (nodes a, b); "
                "needs 2 nodes x 8 GPUs on one fabric; largest free island has 1 node "
                "(fabric ib, leaf ib/s1/l1) (node a with 0 of 8 GPUs free)"
            },
            policy="fifo-backfill",
        ),
        id="fifo-backfill-reserves-the-head",
    ),
    # -- preemption --------------------------------------------------------------------------
    pytest.param(
        Case(
            # job 8: 8 GPUs x 2h = 16 GPU-hours lost; job 9: 8 x 1h = 8: job 9 goes
            nodes=(h100("a"), h100("b")),
            running=(
                running(8).on("a").started(120).preemptible(),
                running(9).on("b").started(60).preemptible(),
            ),
            pending=(training(1, priority=5),),
            bound={1: (("b", ALL),)},
            preempted={9: 1},
        ),
        id="preempts-the-fewest-gpu-hours",
    ),
    pytest.param(
        Case(
            # gang 7 on a and b: 16 GPUs x 10m = 2.67 GPU-hours < job 8's 8 x 1h = 8: the whole
            # gang goes, though the job needs one node
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1"), h100("c")),
            running=(
                running(7).on("a").on("b").started(10).preemptible(),
                running(8).on("c").started(60).preemptible(),
            ),
            pending=(training(1, priority=5),),
            bound={1: (("a", ALL),)},
            preempted={7: 1},
        ),
        id="preempts-whole-gangs",
    ),
    pytest.param(
        Case(
            # cheapest first: 7 (4 GPUs x 1h = 4), 9 (8 x 45m = 6), 8 (4 x 2h = 8). {7, 9}
            # is the shortest prefix that fits; the reprieve drops 7 (a keeps only 4 free
            # without 8): 6 GPU-hours lost instead of {7, 8}'s 12.
            nodes=(h100("a"), h100("b")),
            running=(
                running(7).on("a", (0, 1, 2, 3)).started(60).preemptible(),
                running(8).on("a", (4, 5, 6, 7)).started(120).preemptible(),
                running(9).on("b").started(45).preemptible(),
            ),
            pending=(training(1, priority=5),),
            bound={1: (("b", ALL),)},
            preempted={9: 1},
        ),
        id="preemption-reprieves-victims-it-does-not-need",
    ),
    pytest.param(
        Case(
            # 8 is not preemptible; 9 is, but at the same priority
            nodes=(h100("a"), h100("b")),
            running=(running(8).on("a").started(60), running(9).on("b").priority(5).preemptible()),
            pending=(training(1, priority=5),),
            waiting={
                1: "needs 1 node x 8 GPUs; no node fits (2 nodes with 0 of 8 GPUs free (a, b)); "
                "no reservation: the nodes it needs are held by jobs with no time limit (8, 9), "
                "which never free up for planning"
            },
        ),
        id="never-preempts-protected-or-equal-priority-work",
    ),
    pytest.param(
        Case(
            # preempting 8 frees a, but b stays held by 9 (not preemptible): 1 of 2 nodes
            nodes=(h100("a").fabric("ib/s1/l1"), h100("b").fabric("ib/s1/l1")),
            running=(running(8).on("a").preemptible(), running(9).on("b")),
            pending=(training(1, nodes=2, priority=5),),
            waiting={
                1: "needs 2 nodes x 8 GPUs on one fabric; no node fits (2 nodes with 0 of 8 GPUs "
                "free (a, b)); preempting 1 lower-priority preemptible job would not make room; "
                "no reservation: the nodes it needs are held by jobs with no time limit (8, 9), "
                "which never free up for planning"
            },
        ),
        id="no-preemption-that-would-not-make-room",
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
    reserved = {r.job_id: (f"{r.start:%H:%M}", r.node_ids) for r in result.reservations}
    assert reserved == case.reserved
    assert {p.job_id: p.for_job_id for p in result.preemptions} == case.preempted


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


def test_assume_uses_what_was_staged_for_that_placement_only() -> None:
    nodes = [h100("n1", 2).cpu(8000, 1024).build(), h100("n2", 2).cpu(8000, 1024).build()]
    one = Placement(ranks=(RankPlacement(rank=0, node_id="n1", gpu_indices=(0,), cpu_milli=10),))
    other = Placement(ranks=(RankPlacement(rank=0, node_id="n2", gpu_indices=(1,)),))
    plain, staged = Snapshot.build(nodes, ()), Snapshot.build(nodes, ())
    assert len(plain.table) == len(staged.table) == 2  # built first: assume keeps them in step
    after = staged.node("n1").take(1, one.ranks)
    staged.stage(one, {"n1": after})
    staged.assume(1, one)
    plain.assume(1, one)
    assert staged.node("n1") is after
    assert staged.nodes == plain.nodes
    assert (staged.table.gpu_free == plain.table.gpu_free).all()
    assert (staged.table.cpu_free == plain.table.cpu_free).all()
    # staged for one placement, another is worked out (and checked) as usual
    staged.stage(one, {"n1": after})
    staged.assume(2, other)
    plain.assume(2, other)
    assert staged.nodes == plain.nodes
    with pytest.raises(ValueError, match="already holds"):
        staged.assume(1, one)


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
    # "bestfit" is the default with best-fit packing of replicas (the default has frag-aware)
    policy = build_policy("bestfit")
    assert policy.filters[0].name == "node-ready"
    assert [(s.name, w) for s, w in policy.scores] == [
        ("best-fit", 1.0),
        ("spread", 1.0),
        ("whole-node", 1.0),
        ("training-fit", 1.0),
        ("hbm-per-dollar", 1.0),
        ("interconnect-thrift", 1.0),
        ("island-guard", 1.0),
    ]
    assert (policy.queue_sort.name, policy.backfill.name, policy.preemption.name) == (
        "fair-share",
        "easy",
        "priority",
    )


@pytest.mark.parametrize(
    ("name", "queue_sort", "backfill", "preemption"),
    [
        pytest.param("fifo", "fifo", "strict", "none", id="fifo"),
        pytest.param("fifo-backfill", "fifo", "easy", "none", id="fifo-backfill"),
        pytest.param("first-fit", "priority", "none", "none", id="first-fit"),
    ],
)
def test_presets_differ_only_in_how_the_queue_goes(
    name: str, queue_sort: str, backfill: str, preemption: str
) -> None:
    policy, default = build_policy(name), build_policy(DEFAULT_POLICY)
    assert (policy.queue_sort.name, policy.backfill.name, policy.preemption.name) == (
        queue_sort,
        backfill,
        preemption,
    )
    assert (policy.filters, policy.scores) == (default.filters, default.scores)


def test_weights_override_drop_and_reach_the_cycle() -> None:
    weights = {"spread": 0.0, "best-fit": 2.0, "hbm-per-dollar": 0.0, "interconnect-thrift": 0}
    policy = build_policy("bestfit", weights)
    assert [(s.name, w) for s, w in policy.scores] == [
        ("best-fit", 2.0),
        ("whole-node", 1.0),
        ("training-fit", 1.0),
        ("island-guard", 1.0),
    ]
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


# -- preemption, reservations: values and invariants ----------------------------------------


def test_preemptor_placement_says_whom_it_stopped() -> None:
    case = Case(
        nodes=(h100("a"),),
        running=(running(9).on("a").started(90).preemptible(),),
        pending=(training(1, priority=5),),
    )
    result = run(case)
    (binding,) = result.bindings
    # 8 GPUs x 1.5h = 12 GPU-hours
    assert binding.placement.reason == (
        "node a (no fabric), 1 leaf, 1 whole node; preempted 1 job (9), 12 GPU-hours lost"
    )
    assert result.preemptions == (
        Preemption(job_id=9, for_job_id=1, reason="preempted by job 1 (priority 5)"),
    )


def test_preempted_gpus_go_to_the_preemptor_not_the_queue_behind_it() -> None:
    # job 1 preempts 9; job 2 (priority 4, also above 9) finds a taken and 9 already gone
    case = Case(
        nodes=(h100("a"),),
        running=(running(9).on("a").started(90).preemptible(),),
        pending=(training(1, priority=5), training(2, priority=4, created=1)),
    )
    result = run(case)
    assert [b.job_id for b in result.bindings] == [1]
    assert [p.job_id for p in result.preemptions] == [9]
    (waiting,) = result.unschedulable
    assert waiting.job_id == 2


def test_preemption_leaves_the_snapshot_as_it_was() -> None:
    snapshot = Snapshot.build(
        [h100("a").build()], [running(9).on("a").started(90).preemptible().build()]
    )
    before = snapshot.nodes
    result = schedule(snapshot, [training(1, priority=5)], build_policy(DEFAULT_POLICY), now=NOW)
    assert len(result.preemptions) == 1
    assert snapshot.nodes == before
    assert snapshot.placement_of(9) is not None


def test_reservation_and_preemption_are_frozen_values() -> None:
    r = Reservation(job_id=1, start=NOW, node_ids=("a",))
    assert r == Reservation(job_id=1, start=NOW, node_ids=("a",))
    with pytest.raises(AttributeError):
        r.start = T0  # type: ignore[misc]
    assert CycleResult().reservations == () and CycleResult().preemptions == ()


def test_starvation_is_bounded_for_a_gang_under_a_stream_of_small_jobs() -> None:
    """A 2-node gang behind a steady stream of 1-GPU jobs (30 min each, limit 45 min, one
    arriving every 5 minutes) starts under EASY backfilling, and never under first fit.

    01:00 16 older jobs fill both nodes until 01:30 (limits: 01:45); the stream's 01:00 job
    waits. 01:05 the gang arrives: reserved for 01:45. 01:30 the 16 end; the 01:00 job is
    older than the gang and starts (limit: 02:15), so the reservation moves to 02:15; younger
    jobs backfill only if they end by then (01:30 + 45m = 02:15: they may). 02:00 every
    running job has ended after its 30 minutes: the gang starts, 55 minutes after it came.
    """

    def gang_start(policy: str) -> datetime | None:
        nodes = [h100(n).fabric("ib/s1/l1").build() for n in "ab"]
        now = NOW
        pending: dict[int, Job] = {}
        held: dict[int, tuple[Job, datetime]] = {}  # job -> (running job, its end)
        next_id = 100
        # the cluster is busy with small jobs when the gang arrives
        for i in range(16):
            pending[next_id] = inference(next_id, limit_min=45, created=-3600 + i)
            next_id += 1
        for step in range(60):  # 5 minutes apart: 5 hours
            if step == 1:
                gang = training(1, nodes=2, created=int((now - T0).total_seconds()))
                pending[1] = gang
            pending[next_id] = inference(
                next_id, limit_min=45, created=int((now - T0).total_seconds())
            )
            next_id += 1
            for job_id in [j for j, (_, end) in held.items() if end <= now]:
                del held[job_id]
            snapshot = Snapshot.build(nodes, [j for j, _ in held.values()])
            result = schedule(snapshot, list(pending.values()), build_policy(policy), now=now)
            for b in result.bindings:
                job = replace(
                    pending.pop(b.job_id),
                    state=JobState.RUNNING,
                    placement=b.placement,
                    started_at=now,
                )
                if b.job_id == 1:
                    return now
                held[b.job_id] = (job, now + timedelta(minutes=30))
            now += timedelta(minutes=5)
        return None

    assert gang_start(DEFAULT_POLICY) == NOW + timedelta(hours=1)
    assert gang_start("fifo-backfill") == NOW + timedelta(hours=1)
    assert gang_start("first-fit") is None
