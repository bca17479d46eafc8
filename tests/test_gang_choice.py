"""One gang chooser: `topology.best_gang_rows` (over the node table's arrays) is what placement
and the reservation planner both run; `topology.best_gang` (node by node) is its readable
reference. Here the two must choose alike on generated fabrics and on a B2 cluster, ties
included (scores drawn from a few values, whole and partial nodes mixed)."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctl.core.model import BandwidthProfile, Gpu, Node
from gpuctl.core.snapshot import Snapshot
from gpuctl.core.topology import GangChoice, Member, best_gang, best_gang_rows
from gpuctl.sim.scale import scale_cluster

LEAVES = ("ib/s1/l1", "ib/s1/l2", "ib/s2/l3", "ib/s2/l4", "ib/s3/l5")
SCORES = (0.0, 0.25, 0.5, 1.0, 1 / 3)


def _node(i: int, leaf: str) -> Node:
    gpus = tuple(
        Gpu(index=g, uuid=f"GPU-{i}-{g}", model="H100 SXM", memory_mib=81920, hbm_gbps=3350.0)
        for g in range(8)
    )
    return Node(id=f"n{i:03d}", address=f"n{i}", fabric=leaf, profile=BandwidthProfile(gpus=gpus))


def _same(reference: GangChoice | None, fast: GangChoice | None) -> None:
    if reference is None or fast is None:
        assert reference is fast
        return
    assert [v.id for v in fast.nodes] == [v.id for v in reference.nodes]
    assert (fast.fabric, fast.leaves, fast.partial) == (
        reference.fabric,
        reference.leaves,
        reference.partial,
    )
    assert fast.score == reference.score


def _both(snapshot: Snapshot, ids, scores, whole, n) -> None:
    t = snapshot.table
    views = {v.id: v for v in snapshot.nodes}
    members = [
        Member(view=views[i], score=s, whole=w) for i, s, w in zip(ids, scores, whole, strict=True)
    ]
    fabric = views[ids[0]].node.fabric_name if ids else ""
    rows = np.array([t.pos[i] for i in ids], dtype=np.int64)
    fast = best_gang_rows(t, rows, np.array(scores, dtype=float), np.array(whole, dtype=bool), n)
    _same(best_gang(fabric, members, n), fast)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_fast_gang_choice_is_the_reference_one(data: st.DataObject) -> None:
    leaves = data.draw(st.lists(st.sampled_from(LEAVES), min_size=1, max_size=14))
    snapshot = Snapshot.build([_node(i, leaf) for i, leaf in enumerate(leaves)], [])
    ids = sorted(data.draw(st.sets(st.sampled_from([v.id for v in snapshot.nodes]), min_size=1)))
    scores = [data.draw(st.sampled_from(SCORES)) for _ in ids]
    whole = [data.draw(st.booleans()) for _ in ids]
    n = data.draw(st.integers(1, len(ids) + 1))  # one past the members: no gang
    _both(snapshot, ids, scores, whole, n)


def test_the_fast_gang_choice_is_the_reference_one_on_a_b2_cluster() -> None:
    cluster = scale_cluster(300)
    snapshot = Snapshot.build(cluster, [])
    by_fabric: dict[str, list[str]] = {}
    for v in snapshot.nodes:
        if v.node.fabric_name:
            by_fabric.setdefault(v.node.fabric_name, []).append(v.id)
    rng = random.Random(7)
    for _ in range(200):
        fabric = rng.choice(sorted(by_fabric))
        ids = sorted(rng.sample(by_fabric[fabric], rng.randint(1, len(by_fabric[fabric]))))
        scores = [rng.choice(SCORES) for _ in ids]
        whole = [rng.random() < 0.7 for _ in ids]
        _both(snapshot, ids, scores, whole, rng.randint(1, min(len(ids), 64)))
