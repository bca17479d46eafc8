"""Serving on a mixed fleet: replicas go to the cheapest node that meets what they need, never to
a training island while serving-class nodes fit, spread over nodes only within that class.

The fleet is the demo's (`make demo`):
- train-1, train-2: 8 x H100 SXM (80 GB, 3,350 GB/s HBM, NVLink 900 GB/s), 8 x 400 Gb/s
  InfiniBand, $23.92/h: $23.92 / 8 = $2.99 per GPU-hour;
- infer-1, infer-2: 4 x L40S (45 GB, 864 GB/s HBM, no NVLink), 100 Gb/s Ethernet, $7.32/h:
  $7.32 / 4 = $1.83 per GPU-hour.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from gpuctl.core import schedule, services
from gpuctl.core.model import (
    Job,
    JobKind,
    JobSpec,
    JobState,
    Placement,
    RankPlacement,
    RankState,
    SpreadPolicy,
)
from gpuctl.core.plugins import DEFAULT_POLICY, build_policy
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim.synthetic import SKUS, node_of

NOW = datetime(2026, 1, 1, tzinfo=UTC)
# The simulator's SKUs at the demo's sizes and prices.
H100 = replace(SKUS["h100-sxm-ib"], price_per_hour=23.92)
L40S = replace(SKUS["l40s-eth"], gpus=4, price_per_hour=7.32)
FLEET = [node_of(H100, f"train-{i}", "ib-demo/spine-1/leaf-1") for i in (1, 2)] + [
    node_of(L40S, f"infer-{i}", "eth-demo/rack-1/tor-1") for i in (1, 2)
]


def place_on(fleet, **spec: object) -> tuple[list[str], str]:
    job = Job(
        id=1,
        spec=JobSpec(kind=JobKind.INFERENCE, command=("serve",), **spec),  # type: ignore[arg-type]
        created_at=NOW,
    )
    result = schedule(Snapshot.build(fleet, ()), [job], build_policy(DEFAULT_POLICY), now=NOW)
    assert not result.unschedulable, result.unschedulable
    (binding,) = result.bindings
    return [r.node_id for r in binding.placement.ranks], binding.placement.reason


def place(**spec: object) -> tuple[list[str], str]:
    return place_on(FLEET, **spec)


def test_replicas_without_a_floor_go_to_the_cheapest_gpu_hour_spread_over_those_nodes() -> None:
    # No tokens/s floor: bandwidth buys nothing, so $1.83 beats $2.99 per GPU-hour. Spread puts
    # one replica on each L40S node, then the third on an L40S node again rather than on an
    # idle H100 node: the H100 node is a training island (NVLink and InfiniBand the replica
    # cannot use, priced in its $2.99).
    nodes, why = place(replicas=3, gpus_per_node=1)
    assert nodes == ["infer-1", "infer-2", "infer-1"]
    assert "L40S at $1.83/GPU-h, 864 GB/s HBM" in why


def test_a_four_gpu_replica_takes_a_whole_l40s_node_not_half_an_h100_island() -> None:
    # 4 x $1.83 = $7.32/h on infer-1 against 4 x $2.99 = $11.96/h on an H100 node, whose other
    # half a gang could no longer use.
    nodes, why = place(replicas=1, gpus_per_node=4)
    assert nodes == ["infer-1"]
    assert "keeps 0 GPUs free, L40S at $1.83/GPU-h" in why


def test_a_floor_both_meet_still_goes_to_the_cheaper_node() -> None:
    # 20 tokens/s x 14 GB of weights = 280 GB/s: the L40S's 864 GB/s meets it, so the extra
    # bandwidth of the H100 (3,350 GB/s) is worth nothing to this replica.
    nodes, _ = place(replicas=1, gpus_per_node=1, target_tokens_per_s=20.0, weights_gb=14.0)
    assert nodes == ["infer-1"]


def test_a_floor_only_the_h100_meets_goes_to_the_h100_and_says_what_it_pays() -> None:
    # 30 tokens/s x 40 GB = 1,200 GB/s > 864 GB/s: no L40S serves it fast enough.
    nodes, why = place(replicas=1, gpus_per_node=1, target_tokens_per_s=30.0, weights_gb=40.0)
    assert nodes == ["train-1"]
    assert "H100 SXM at $2.99/GPU-h, 3350 GB/s HBM" in why


def test_packed_replicas_share_one_serving_node() -> None:
    nodes, _ = place(replicas=3, gpus_per_node=1, spread=SpreadPolicy.NONE)
    assert nodes == ["infer-1", "infer-1", "infer-1"]


def test_replicas_spill_onto_the_h100_nodes_only_once_the_l40s_nodes_are_full() -> None:
    # 8 L40S GPUs take the first 8 replicas; the 9th and 10th have nowhere else to go.
    nodes, why = place(replicas=10, gpus_per_node=1)
    assert sorted(nodes[:8]) == ["infer-1"] * 4 + ["infer-2"] * 4
    assert sorted(nodes[8:]) == ["train-1", "train-2"]
    assert "L40S at $1.83/GPU-h, 864 GB/s HBM and H100 SXM at $2.99/GPU-h" in why


def test_a_training_job_may_not_ask_for_a_spread() -> None:
    from gpuctl.core.errors import InvalidArgument
    from gpuctl.core.validation import validate_spec

    spec = JobSpec(kind=JobKind.TRAINING, command=("x",), gpus_per_node=8, spread=SpreadPolicy.NONE)
    with pytest.raises(InvalidArgument, match="spread"):
        validate_spec(spec)


def test_a_job_accepting_several_models_goes_to_the_cheapest_of_them() -> None:
    # Either model will do: the L40S at $1.83/GPU-h. With only the H100 accepted, the H100.
    assert place(replicas=1, gpus_per_node=1, gpu_model="h100 sxm|L40S")[0] == ["infer-1"]
    assert place(replicas=1, gpus_per_node=1, gpu_model="A100 80GB|H100 SXM")[0] == ["train-1"]


# Two serving fabrics (two racks of L40S, each behind its own switch) beside the training
# island: `spread: fabric` puts replicas one to a rack first.
RACKS = [node_of(H100, f"train-{i}", "ib-demo/spine-1/leaf-1") for i in (1, 2)] + [
    node_of(L40S, f"infer-{i}", f"eth-{rack}/rack-1/tor-1")
    for i, rack in ((1, "a"), (2, "a"), (3, "b"), (4, "b"))
]


def test_spread_fabric_puts_one_replica_in_each_rack_before_doubling_up_in_one() -> None:
    # By node, the second replica goes to infer-2, in the first's rack: a rack switch lost
    # loses both. By fabric, the second goes to the other rack. With the spread score's share
    # s of the weighted mean, a node's spread value is the mean of a node half and a fabric
    # half: infer-2 (1 in its fabric, 0 on it) (1/2 + 1) / 2 = 0.75, infer-3 (0, 0) 1.
    nodes, _ = place_on(RACKS, replicas=2, gpus_per_node=1)
    assert nodes == ["infer-1", "infer-2"]
    nodes, why = place_on(RACKS, replicas=2, gpus_per_node=1, spread=SpreadPolicy.FABRIC)
    assert nodes == ["infer-1", "infer-3"]
    assert why.endswith("over 2 fabrics")
    # Four: a rack each, then a node each within the racks.
    nodes, _ = place_on(RACKS, replicas=4, gpus_per_node=1, spread=SpreadPolicy.FABRIC)
    assert nodes == ["infer-1", "infer-3", "infer-2", "infer-4"]


def test_spread_fabric_never_moves_a_replica_onto_the_training_island_while_l40s_fit() -> None:
    # The H100 fabric has none of the job's replicas, and still gets none while L40S GPUs are
    # free: the two halves of the spread value never lower an L40S node by more than s, as
    # `spread: node` at worst, and the H100's $2.99/GPU-h and unused interconnect cost more.
    nodes, _ = place_on(RACKS, replicas=16, gpus_per_node=1, spread=SpreadPolicy.FABRIC)
    assert sorted(nodes) == sorted(f"infer-{i}" for i in (1, 2, 3, 4) for _ in range(4))
    nodes, why = place_on(RACKS, replicas=17, gpus_per_node=1, spread=SpreadPolicy.FABRIC)
    assert nodes.count("train-1") + nodes.count("train-2") == 1
    assert "over 3 fabrics" in why


def test_nodes_without_a_fabric_are_each_a_fabric_of_their_own() -> None:
    loose = [node_of(L40S, f"infer-{i}", "") for i in (1, 2, 3)]
    nodes, why = place_on(loose, replicas=3, gpus_per_node=1, spread=SpreadPolicy.FABRIC)
    assert sorted(nodes) == ["infer-1", "infer-2", "infer-3"]
    assert why.endswith("over 3 fabrics")


def replacement(fleet, running: list[str], ended: tuple[str, int], **spec: object) -> list[str]:
    """Where the replacement of a 3-replica service goes: replicas 0 and 1 running on the
    nodes `running` (GPU 0), replica 2 ended on `ended` (node, GPU), its GPU held until let
    go."""
    ranks = (
        *(
            RankPlacement(rank=i, node_id=n, gpu_indices=(0,), state=RankState.RUNNING)
            for i, n in enumerate(running)
        ),
        RankPlacement(
            rank=2, node_id=ended[0], gpu_indices=(ended[1],), state=RankState.EXITED,
            exit_code=1, ended_at=NOW,
        ),
    )  # fmt: skip
    job_spec = JobSpec(
        kind=JobKind.INFERENCE, command=("serve",), replicas=3, gpus_per_node=1, **spec
    )  # type: ignore[arg-type]
    job = Job(id=7, spec=job_spec, state=JobState.RUNNING, placement=Placement(ranks=ranks))
    given = services.cycle_input([job], NOW)
    snapshot = Snapshot.build(fleet, given.holding)
    result = schedule(snapshot, given.pending, build_policy(DEFAULT_POLICY), now=NOW)
    (binding,) = result.bindings
    return [r.node_id for r in binding.placement.ranks]


def test_a_replacement_counts_the_fabrics_of_the_replicas_still_running() -> None:
    # Replicas 0 and 1 run on infer-1 and infer-2, both in rack a; replica 2 (rack b, on
    # infer-3) ended. Its replacement goes to rack b again, where none runs, and there to
    # infer-4: infer-3 still holds the ended replica's GPU until it is let go.
    placed = replacement(RACKS, ["infer-1", "infer-2"], ("infer-3", 0), spread=SpreadPolicy.FABRIC)
    assert placed == ["infer-4"]


def test_a_replacement_goes_to_the_node_with_fewest_of_the_service_s_replicas() -> None:
    # Replicas 0 and 2 on infer-1 (2 ends, its GPU still held until let go), replica 1 on
    # infer-2. The replacement goes to infer-2: one replica there against two on infer-1,
    # spread value 1/2 against 1/3 (the H100 island stays out, as for a new service).
    assert replacement(FLEET, ["infer-1", "infer-2"], ("infer-1", 1)) == ["infer-2"]
