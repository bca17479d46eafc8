"""The launch contract: the environment every rank gets, computed once from the placement.

The daemon sends it with each assignment and `gpuctl describe` shows the same values. For a
training gang it is torch.distributed's (`MASTER_ADDR`, ... and torchrun's `PET_*`), so that a
bare `torchrun train.py` on every node forms one world.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, Node, RankPlacement


def rank_env(
    job: Job, rank: RankPlacement, nodes: Mapping[str, Node] | None = None
) -> dict[str, str]:
    """The user's env plus the contract for `rank` of `job` (the contract wins)."""
    assert job.placement is not None, "rank_env needs a placed job"
    spec, placement = job.spec, job.placement
    node_ids = list(dict.fromkeys(r.node_id for r in placement.ranks))  # rank order, distinct
    env = dict(spec.env)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in rank.gpu_indices),
            "GPUCTL_JOB_ID": str(job.id),
            "GPUCTL_JOB_NAME": spec.name or f"job-{job.id}",
            "GPUCTL_ATTEMPT": str(job.attempt),
            "GPUCTL_QUEUE": spec.queue,
            "GPUCTL_NODE": rank.node_id,
            "GPUCTL_NODELIST": ",".join(node_ids),
            "GPUCTL_NUM_NODES": str(len(node_ids)),
            "GPUCTL_NODE_RANK": str(node_ids.index(rank.node_id)),
        }
    )
    if nodes is not None and rank.node_id in nodes and nodes[rank.node_id].profile.gpus:
        env["GPUCTL_GPU_MODEL"] = nodes[rank.node_id].profile.gpu_model
    if rank.gpu_indices and rank.gpu_milli < MILLI_PER_GPU:
        env["GPUCTL_GPU_MILLI"] = str(rank.gpu_milli)
    if spec.kind is JobKind.INFERENCE:
        env["GPUCTL_REPLICA_INDEX"] = str(rank.rank)
        if rank.port:
            env["GPUCTL_PORT"] = str(rank.port)  # no other replica on the node has it
        env["GPUCTL_NUM_REPLICAS"] = str(spec.replicas)  # desired, when this one was placed
        return env
    nnodes, nproc = len(placement.ranks), spec.gpus_per_node
    contract = {
        "MASTER_ADDR": placement.master_addr,
        "MASTER_PORT": str(placement.master_port),
        "WORLD_SIZE": str(nnodes * nproc),
        "NODE_RANK": str(rank.rank),
        "NNODES": str(nnodes),
        "NPROC_PER_NODE": str(nproc),
    }
    env.update(contract)
    env["GPUCTL_NODE_RANK"] = str(rank.rank)
    # torchrun reads its flags from PET_<FLAG> when they are not given on the command line.
    env.update(
        {
            "PET_NNODES": contract["NNODES"],
            "PET_NPROC_PER_NODE": contract["NPROC_PER_NODE"],
            "PET_NODE_RANK": contract["NODE_RANK"],
            "PET_MASTER_ADDR": contract["MASTER_ADDR"],
            "PET_MASTER_PORT": contract["MASTER_PORT"],
        }
    )
    return env
