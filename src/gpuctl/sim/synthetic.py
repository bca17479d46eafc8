"""Synthetic clusters (SKUs laid out on fabrics and leaf switches) and synthetic workloads
(training gangs and inference services arriving over time), for replays of the pure core.

SKU figures are datasheet values from `gpuctl/data/gpu_specs.csv`; prices are on-demand list
prices from the Nebius catalog in `../shared/catalogs/skypilot` (V100 from Lambda's 8-GPU
instance), so a replay's dollars are of the right order, not a quote.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gpuctl.core.model import BandwidthProfile, Gpu, JobKind, JobSpec, NetKind, Network, Node


@dataclass(frozen=True, slots=True, kw_only=True)
class Sku:
    """One node type: its GPUs, interconnect and price."""

    name: str
    model: str  # gpu_specs.csv row
    gpus: int
    gpu_memory_mib: int
    hbm_gbps: float
    nvlink_gbps: float
    tflops_per_gpu: float  # dense BF16 (FP16 for V100)
    net: NetKind
    net_ports: int
    net_gbps_per_port: float
    price_per_hour: float
    cpu_milli: int = 192_000
    memory_mib: int = 2_000_000


SKUS = {
    sku.name: sku
    for sku in (
        Sku(
            name="h100-sxm-ib",
            model="H100 SXM",
            gpus=8,
            gpu_memory_mib=81_559,
            hbm_gbps=3350,
            nvlink_gbps=900,
            tflops_per_gpu=989.4,
            net=NetKind.INFINIBAND,
            net_ports=8,
            net_gbps_per_port=400,
            price_per_hour=23.60,
        ),
        Sku(
            name="l40s-eth",
            model="L40S",
            gpus=8,
            gpu_memory_mib=46_068,
            hbm_gbps=864,
            nvlink_gbps=0,
            tflops_per_gpu=362.05,
            net=NetKind.ETHERNET,
            net_ports=1,
            net_gbps_per_port=100,
            price_per_hour=18.28,
        ),
        Sku(
            name="v100-sxm2-ib",
            model="V100 SXM2 32GB",
            gpus=8,
            gpu_memory_mib=32_510,
            hbm_gbps=900,
            nvlink_gbps=300,
            tflops_per_gpu=125.0,
            net=NetKind.INFINIBAND,
            net_ports=4,
            net_gbps_per_port=100,
            price_per_hour=4.40,
        ),
    )
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Pod:
    """A block of identical nodes: `fabrics` fabrics of `leaves` leaf switches of
    `nodes_per_leaf` nodes each."""

    sku: str
    fabrics: int = 1
    leaves: int = 1
    nodes_per_leaf: int = 4
    prefix: str = ""  # fabric names start with it; default: the SKU name


def node_of(sku: Sku, node_id: str, fabric: str) -> Node:
    gpus = tuple(
        Gpu(
            index=i,
            uuid=f"GPU-{node_id}-{i}",
            model=sku.model,
            memory_mib=sku.gpu_memory_mib,
            hbm_gbps=sku.hbm_gbps,
            nvlink_gbps=sku.nvlink_gbps,
        )
        for i in range(sku.gpus)
    )
    return Node(
        id=node_id,
        address=f"{node_id}.sim",
        fabric=fabric,
        provider="sim",
        sku=sku.name,
        cpu_milli=sku.cpu_milli,
        memory_mib=sku.memory_mib,
        price_per_hour=sku.price_per_hour,
        profile=BandwidthProfile(
            gpus=gpus,
            nvlink_domain_size=sku.gpus if sku.nvlink_gbps else 0,
            network=Network(kind=sku.net, ports=sku.net_ports, gbps_per_port=sku.net_gbps_per_port),
            bf16_tflops=sku.tflops_per_gpu * sku.gpus,
            source="sim",
        ),
    )


def cluster(pods: Sequence[Pod]) -> tuple[Node, ...]:
    """The nodes of `pods`, named `<fabric>-l<leaf>-n<i>` on fabric path `<fabric>/s1/l<leaf>`."""
    nodes = []
    for pod in pods:
        sku = SKUS[pod.sku]
        for f in range(pod.fabrics):
            fabric = f"{pod.prefix or pod.sku}-f{f}"
            for leaf in range(pod.leaves):
                for i in range(pod.nodes_per_leaf):
                    node_id = f"{fabric}-l{leaf}-n{i}"
                    nodes.append(node_of(sku, node_id, f"{fabric}/s1/l{leaf}"))
    return tuple(nodes)


def gang_shape(gpus: int, gpus_per_node: int = 8) -> tuple[int, int]:
    """(nodes, GPUs per node) for a job of `gpus` GPUs: one node up to a node's worth, else
    the fewest nodes that split it evenly (12 -> 2 x 6, 20 -> 4 x 5, 64 -> 8 x 8)."""
    if gpus <= gpus_per_node:
        return 1, gpus
    nodes = -(-gpus // gpus_per_node)
    while gpus % nodes:
        nodes += 1
    return nodes, gpus // nodes


@dataclass(frozen=True, slots=True, kw_only=True)
class SimJob:
    """One job of a replayed workload: what is submitted, when, and how long it really runs."""

    name: str
    spec: JobSpec  # its time_limit_s is what the scheduler plans with
    arrival_s: float  # from the start of the replay
    duration_s: float  # how long it runs once started (never past its time limit)

    @property
    def gpus(self) -> float:
        return self.spec.total_gpus


def with_limit(spec: JobSpec, duration_s: float, slack: float) -> JobSpec:
    """`spec` with a time limit of `slack` x the real run time (users over-ask; >= 1 minute)."""
    if slack < 1:
        raise ValueError(f"slack must be >= 1 (a job may not outlive its limit), got {slack}")
    return replace(spec, time_limit_s=max(60, int(duration_s * slack) + 1))


def mixed_workload(
    *,
    seed: int,
    jobs: int,
    jobs_per_hour: float,
    inference_share: float = 0.3,
    slack: float = 1.5,
) -> tuple[SimJob, ...]:
    """Poisson arrivals of training gangs and inference services.

    Training as Gavel's continuous-multiple generator draws it: 1 (70 %), 2 (10 %), 4 (15 %)
    or 8 (5 %) GPUs, scaled up to 16-64 GPU gangs one time in ten; run time
    60 x 10^U(1.5, 3) s with probability 0.8, else 60 x 10^U(3, 4) s. Inference: 1-4 replicas
    of one GPU serving a 14 GB model at 30 tokens/s (a 420 GB/s floor), for 1-8 hours.
    """
    rng = random.Random(seed)
    out = []
    t = 0.0
    for i in range(jobs):
        t += rng.expovariate(jobs_per_hour / 3600)
        if rng.random() < inference_share:
            duration = rng.uniform(3600, 8 * 3600)
            spec = JobSpec(
                kind=JobKind.INFERENCE,
                command=("serve",),
                name=f"svc-{i}",
                replicas=rng.randint(1, 4),
                gpus_per_node=1,
                target_tokens_per_s=30.0,
                weights_gb=14.0,
            )
        else:
            gpus = rng.choices((1, 2, 4, 8), weights=(70, 10, 15, 5))[0]
            if rng.random() < 0.1:
                gpus = rng.choice((16, 32, 64))
            exponent = rng.uniform(1.5, 3) if rng.random() < 0.8 else rng.uniform(3, 4)
            duration = 60 * 10**exponent
            nodes, per_node = gang_shape(gpus)
            spec = JobSpec(
                kind=JobKind.TRAINING,
                command=("train",),
                name=f"train-{i}",
                num_nodes=nodes,
                gpus_per_node=per_node,
            )
        out.append(
            SimJob(
                name=spec.name,
                spec=with_limit(spec, duration, slack),
                arrival_s=t,
                duration_s=duration,
            )
        )
    return tuple(out)
