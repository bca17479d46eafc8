"""Benchmark B2's pieces at small sizes: the synthetic cluster, background load and queues;
the cycle's column path deciding exactly as node-by-node plugins do on them; the steady-state
bookkeeping; and `gpuctl simulate scale` end to end. Behaviour only: nothing here is timed.
"""

from __future__ import annotations

import gc
import json
import random
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gpuctl.cli.simulate_scale import scale_command, table
from gpuctl.core import CycleResult, schedule
from gpuctl.core.engine.verdicts import columnar
from gpuctl.core.framework import FilterPlugin, ScorePlugin
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
from gpuctl.sim import scale

# -- the synthetic cluster and load ---------------------------------------------------------


def test_cluster_splits_skus_and_lays_out_fabrics_and_leaves() -> None:
    nodes = scale.scale_cluster(1000)
    assert len(nodes) == 1000
    assert len({n.id for n in nodes}) == 1000
    # 5:3:2 of 1000 nodes; fabrics of 8 leaves x 32 nodes
    assert Counter(n.sku for n in nodes) == {
        "h100-sxm-ib": 500,
        "l40s-eth": 300,
        "v100-sxm2-ib": 200,
    }
    assert all(n.gpu_count == 8 for n in nodes)
    fabrics = Counter(n.fabric_name for n in nodes)
    # h100: 256 + 244; l40s: 256 + 44; v100: 200
    assert sorted(fabrics.values()) == [44, 200, 244, 256, 256]
    leaves = Counter(n.fabric for n in nodes)
    assert max(leaves.values()) == scale.NODES_PER_LEAF
    assert all(n.fabric.startswith(n.fabric_name + "/") for n in nodes)


def test_background_holds_about_the_share_asked_and_oversubscribes_nothing() -> None:
    nodes = scale.scale_cluster(200)
    running = scale.background(nodes, seed=3, utilisation=0.6)
    by_id = {n.id: n for n in nodes}
    milli: dict[tuple[str, int], int] = defaultdict(int)
    cpu: dict[str, int] = defaultdict(int)
    for job in running:
        assert job.state is JobState.RUNNING and job.placement is not None
        assert job.spec.time_limit_s > 0
        if job.spec.kind is JobKind.TRAINING:  # gangs on one fabric
            assert len({by_id[r.node_id].fabric_name for r in job.placement.ranks}) == 1
        for r in job.placement.ranks:
            for g in r.gpu_indices:
                milli[r.node_id, g] += r.gpu_milli
            cpu[r.node_id] += r.cpu_milli
    assert max(milli.values()) <= MILLI_PER_GPU
    assert all(cpu[n] <= by_id[n].cpu_milli for n in cpu)
    used = sum(milli.values()) / MILLI_PER_GPU
    assert 0.5 <= used / (8 * len(nodes)) <= 0.62
    assert scale.background(nodes, seed=3, utilisation=0.6) == running  # one seed, one load


def test_pending_jobs_are_gangs_of_8_to_1024_gpus_and_replica_sets() -> None:
    jobs = scale.pending_jobs(2000, seed=5, first_id=10)
    assert [j.id for j in jobs] == list(range(10, 2010))
    gangs = [j.spec for j in jobs if j.spec.kind is JobKind.TRAINING]
    replicas = [j.spec for j in jobs if j.spec.kind is JobKind.INFERENCE]
    assert 0.6 < len(gangs) / len(jobs) < 0.8
    assert {int(s.total_gpus) for s in gangs} == {8, 16, 32, 64, 128, 256, 512, 1024}
    assert all(s.gpus_per_node == 8 for s in gangs)
    assert {s.replicas for s in replicas} == {1, 2, 4, 8}
    assert {s.gpu_milli for s in replicas} == {0, 250, 500}
    assert all(s.time_limit_s > 0 for s in gangs + replicas)
    assert scale.pending_jobs(2000, seed=5, first_id=10) == jobs
    assert all(j.spec.kind is JobKind.INFERENCE for j in scale.inference_jobs(50, seed=1))
    gang = scale.gang_job(512)
    assert (gang.spec.num_nodes, gang.spec.gpus_per_node) == (64, 8)


# -- the column path decides as node-by-node plugins do --------------------------------------


class NodeByNode(FilterPlugin, ScorePlugin):
    """A plugin with its column form hidden: a policy of these is asked node by node."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def kinds(self) -> frozenset[JobKind]:
        return self.inner.kinds

    def filter(self, *args: Any) -> Any:
        return self.inner.filter(*args)

    def score(self, *args: Any) -> float:
        return self.inner.score(*args)

    def prepare(self, context: Any) -> NodeByNode | None:
        ready = self.inner.prepare(context) if isinstance(self.inner, ScorePlugin) else self.inner
        return None if ready is None else NodeByNode(ready)


def node_by_node(policy: Policy) -> Policy:
    return Policy(
        name=policy.name,
        filters=tuple(NodeByNode(f) for f in policy.filters),  # type: ignore[misc]
        scores=tuple((NodeByNode(s), w) for s, w in policy.scores),  # type: ignore[misc]
        queue_sort=policy.queue_sort,
        backfill=policy.backfill,
        preemption=policy.preemption,
    )


def test_node_by_node_policies_take_the_other_path() -> None:
    policy = build_policy(DEFAULT_POLICY)
    assert columnar(policy)
    assert not columnar(node_by_node(policy))


@pytest.mark.parametrize(
    ("nodes", "pending", "utilisation", "policy", "seed"),
    [
        (40, 60, 0.6, DEFAULT_POLICY, 1),
        (60, 80, 0.85, DEFAULT_POLICY, 2),
        (90, 50, 0.3, "bestfit", 3),
        (50, 70, 0.6, "fifo-backfill", 4),
        (70, 60, 0.7, "first-fit", 5),
    ],
    ids=["default", "default-full", "bestfit", "fifo-backfill", "first-fit"],
)
def test_columns_decide_as_node_by_node_over_two_cycles(
    nodes: int, pending: int, utilisation: float, policy: str, seed: int
) -> None:
    """Placements, reasons, reservations and preemptions alike, in a burst cycle and in the
    cycle after it (decisions applied, some jobs done, new arrivals)."""
    cluster = scale.scale_cluster(nodes)
    running = list(scale.background(cluster, seed=seed, utilisation=utilisation))
    queue = list(scale.pending_jobs(pending, seed=seed + 7))
    fast, slow = build_policy(policy), node_by_node(build_policy(policy))
    now = scale.NOW
    for cycle in range(2):
        snapshot = Snapshot.build(cluster, running)
        result = schedule(snapshot, queue, fast, now=now)
        assert schedule(snapshot, queue, slow, now=now) == result
        running, queue = scale.applied(result, running, queue, now)
        now += scale.STEADY_STEP
        running, queue, _ = scale.churn(
            running, queue, seed=seed + cycle, finished=0.1, queue=pending, next_id=10_000
        )


@pytest.mark.parametrize(("nodes", "pending"), [(2000, 300), (3000, 400)])
def test_gang_choices_kept_per_island_decide_as_worked_out_afresh(
    nodes: int, pending: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Islands whose nodes did not change keep their best gang between gangs alike: the
    decisions are the ones that working every island out again gives."""
    from gpuctl.core.engine.islands import IslandMemo

    cluster = scale.scale_cluster(nodes)
    running = list(scale.background(cluster, seed=1, utilisation=0.4))
    queue = list(scale.pending_jobs(pending, seed=8))
    snapshot = Snapshot.build(cluster, running)
    policy = build_policy(DEFAULT_POLICY)
    reused = 0
    real_of = IslandMemo.of

    def counting(*args: Any) -> IslandMemo:
        nonlocal reused
        memo = real_of(*args)
        reused += len(memo.known)
        return memo

    monkeypatch.setattr(IslandMemo, "of", counting)
    kept = schedule(snapshot, queue, policy, now=scale.NOW)
    assert reused > 5  # islands were kept, or there is nothing to compare
    assert sum(1 for b in kept.bindings if len(b.placement.ranks) > 1) > 5  # gangs placed

    def afresh(*args: Any) -> IslandMemo:
        memo = real_of(*args)
        memo.known.clear()
        return memo

    monkeypatch.setattr(IslandMemo, "of", afresh)
    assert schedule(snapshot, queue, policy, now=scale.NOW) == kept


@pytest.mark.parametrize("leasing", [False, True], ids=["owned", "leased"])
def test_a_cycle_leaves_no_reference_cycles(leasing: bool) -> None:
    """All a cycle allocates is freed by reference counting, which is why `schedule` may keep
    the garbage collector off while it runs: with it off, a full collection afterwards finds
    nothing to collect."""
    cluster = scale.scale_cluster(600)
    running = list(scale.background(cluster, seed=2, utilisation=0.85))
    queue = list(scale.pending_jobs(300, seed=9))
    snapshot = Snapshot.build(cluster, running)
    lease = scale.leased(cluster) if leasing else None
    policy = build_policy(DEFAULT_POLICY)
    # once before, for what libraries set up on first use (some of it cyclic, once)
    schedule(snapshot, queue, policy, now=scale.NOW, leasing=lease)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        result = schedule(snapshot, queue, policy, now=scale.NOW, leasing=lease)
        assert result.bindings and result.unschedulable and result.preemptions
        del result
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()


def test_schedule_turns_the_collector_back_on() -> None:
    cluster = scale.scale_cluster(40)
    snapshot = Snapshot.build(cluster, ())
    assert gc.isenabled()
    schedule(snapshot, scale.pending_jobs(5, seed=1), build_policy(DEFAULT_POLICY), now=scale.NOW)
    assert gc.isenabled()
    gc.disable()
    try:  # and leaves it off when it was off
        schedule(
            snapshot, scale.pending_jobs(5, seed=1), build_policy(DEFAULT_POLICY), now=scale.NOW
        )
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize(("nodes", "seed"), [(600, 2), (1000, 1)])
def test_victims_off_the_placement_are_reprieved_as_if_asked(
    nodes: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A victim on none of the nodes of the last placement found is reprieved without a
    placement attempt; the victims and placements are the ones asking would give."""
    from gpuctl.core import preempt

    cluster = scale.scale_cluster(nodes)
    running = list(scale.background(cluster, seed=seed, utilisation=0.85))
    queue = list(scale.pending_jobs(400, seed=seed + 7))
    snapshot = Snapshot.build(cluster, running)
    policy = build_policy(DEFAULT_POLICY)
    skipped = 0
    real = preempt._untouched

    def counting(used: set[str], placement: Any) -> bool:
        nonlocal skipped
        untouched = real(used, placement)
        skipped += untouched
        return untouched

    monkeypatch.setattr(preempt, "_untouched", counting)
    quick = schedule(snapshot, queue, policy, now=scale.NOW)
    assert quick.preemptions and skipped > 10
    monkeypatch.setattr(preempt, "_untouched", lambda used, placement: False)
    assert schedule(snapshot, queue, policy, now=scale.NOW) == quick


def odd_cluster(rng: random.Random) -> list[Node]:
    """A few nodes of every oddity the filters look at: no GPUs, GPUs of mixed memory or
    out-of-order indices, no fabric, no price, draining or lost, no CPU or memory stated."""
    out = []
    for i in range(rng.randint(1, 24)):
        count = rng.choice((0, 1, 2, 4, 8, 8, 8))
        model = rng.choice(("H100 SXM", "A100 80GB", "L40S"))
        indices = list(range(count))
        if rng.random() < 0.1:
            rng.shuffle(indices)
        gpus = tuple(
            Gpu(
                index=g,
                uuid=f"GPU-{i}-{g}",
                model=model,
                memory_mib=rng.choice((81920, 81920, 24576, 46068)),
                hbm_gbps=rng.choice((3350.0, 864.0, 2039.0)),
                measured_hbm_gbps=rng.choice((None, None, 3100.0)),
                nvlink_gbps=rng.choice((900.0, 0.0, 600.0)),
            )
            for g in indices
        )
        out.append(
            Node(
                id=f"n{i:02d}",
                address=f"n{i}.cluster",
                fabric=rng.choice(("", "ib-a/s1/l1", "ib-a/s1/l2", "ib-a/s2/l3", "ib-b/s1/l1")),
                cpu_milli=rng.choice((0, 8000, 64000, 64000)),
                memory_mib=rng.choice((0, 65536, 65536)),
                price_per_hour=rng.choice((0.0, 18.28, 23.6)),
                profile=BandwidthProfile(
                    gpus=gpus,
                    bf16_tflops=rng.choice((0.0, 2896.0, 7915.0)),
                    network=Network(
                        kind=NetKind.INFINIBAND,
                        ports=1,
                        gbps_per_port=rng.choice((0, 100, 400, 400)),
                    ),
                ),
                state=rng.choice((NodeState.READY,) * 6 + (NodeState.DRAINING, NodeState.LOST)),
                state_reason=rng.choice(("", "", "bad DIMM")),
            )
        )
    return out


def odd_jobs(rng: random.Random, first: int, count: int) -> list[Job]:
    jobs = []
    for i in range(count):
        common = {
            "command": ("x",),
            "priority": rng.randint(0, 2),
            "owner": rng.choice(("a", "b")),
            "queue": rng.choice(("q1", "q2")),
            "time_limit_s": rng.choice((0, 0, 1800, 3600)),
            "preemptible": rng.random() < 0.5,
            "gpu_model": rng.choice(("", "", "H100 SXM", "l40s")),
            "gpu_memory_mib": rng.choice((0, 0, 20000, 40000, 90000)),
            "cpu_milli": rng.choice((0, 0, 2000, 16000)),
            "memory_mib": rng.choice((0, 0, 4096)),
            "min_net_gbps": rng.choice((0.0, 0.0, 200.0)),
            "min_nvlink_gbps": rng.choice((0.0, 0.0, 400.0)),
        }
        if rng.random() < 0.5:
            spec = JobSpec(
                kind=JobKind.TRAINING,
                num_nodes=rng.randint(1, 4),
                gpus_per_node=rng.choice((1, 2, 4, 8)),
                **common,
            )
        else:
            milli = rng.choice((0, 0, 250, 500, 700))
            tokens, weights = rng.choice(((0.0, 0.0), (30.0, 14.0), (100.0, 14.0)))
            spec = JobSpec(
                kind=JobKind.INFERENCE,
                replicas=rng.randint(1, 5),
                gpu_milli=milli,
                gpus_per_node=rng.choice((0, 1)) if milli else rng.randint(0, 4),
                target_tokens_per_s=tokens,
                weights_gb=weights,
                **common,
            )
        created = scale.NOW - timedelta(seconds=rng.randint(0, 600))
        jobs.append(Job(id=first + i, spec=spec, created_at=created))
    return jobs


@pytest.mark.parametrize("seed", range(40))
def test_columns_decide_as_node_by_node_on_odd_nodes(seed: int) -> None:
    rng = random.Random(seed)
    cluster = odd_cluster(rng)
    policy = build_policy(rng.choice((DEFAULT_POLICY, "fifo", "fifo-backfill", "first-fit")))
    first = odd_jobs(rng, 1, rng.randint(1, 12))
    empty = Snapshot.build(cluster, ())
    result = schedule(empty, first, policy, now=scale.NOW)
    assert schedule(empty, first, node_by_node(policy), now=scale.NOW) == result
    running, _ = scale.applied(result, [], first, scale.NOW)
    second = odd_jobs(rng, 100, rng.randint(1, 15))
    later = scale.NOW + timedelta(minutes=10)
    snapshot = Snapshot.build(cluster, running)
    expected = schedule(snapshot, second, node_by_node(policy), now=later)
    assert schedule(snapshot, second, policy, now=later) == expected


def test_default_policy_preempts_and_reserves_on_these_clusters() -> None:
    """The comparison above covers preemption and reservations, not only placements."""
    cluster = scale.scale_cluster(60)
    running = scale.background(cluster, seed=2, utilisation=0.85)
    result = schedule(
        Snapshot.build(cluster, running),
        scale.pending_jobs(80, seed=9),
        build_policy(DEFAULT_POLICY),
        now=scale.NOW,
    )
    assert result.bindings and result.unschedulable and result.reservations
    assert result.preemptions


# -- the cycle after ------------------------------------------------------------------------


def test_applied_starts_bound_jobs_and_requeues_preempted_ones() -> None:
    cluster = scale.scale_cluster(60)
    running = list(scale.background(cluster, seed=2, utilisation=0.85))
    queue = list(scale.pending_jobs(80, seed=9))
    result: CycleResult = schedule(
        Snapshot.build(cluster, running), queue, build_policy(DEFAULT_POLICY), now=scale.NOW
    )
    still, waiting = scale.applied(result, running, queue, scale.NOW)
    bound = {b.job_id for b in result.bindings}
    victims = {p.job_id for p in result.preemptions}
    assert {j.id for j in still} == ({j.id for j in running} - victims) | bound
    assert {j.id for j in waiting} == ({j.id for j in queue} - bound) | victims
    assert all(j.state is JobState.PENDING and j.placement is None for j in waiting)
    assert all(j.attempt == 1 for j in waiting if j.id in victims)
    assert all(j.started_at == scale.NOW for j in still if j.id in bound)


def test_churn_ends_a_share_of_running_jobs_and_tops_up_the_queue() -> None:
    running = list(scale.background(scale.scale_cluster(600), seed=1))
    queue = list(scale.pending_jobs(30, seed=2))
    still, waiting, next_id = scale.churn(
        running, queue, seed=4, finished=0.25, queue=50, next_id=500
    )
    assert set(still) <= set(running)
    assert 0.6 < len(still) / len(running) < 0.9
    assert len(waiting) == 50 and waiting[:30] == queue
    assert [j.id for j in waiting[30:]] == list(range(500, 520)) and next_id == 520


def test_measure_reports_every_figure() -> None:
    report = scale.measure(
        40, 30, repeats=1, steady_cycles=2, inference_count=10, gang_gpus=16
    ).as_dict()
    assert report["nodes"] == 40 and report["pending"] == 30 and report["gpus"] == 320
    assert report["gang"]["bound_jobs"] == 1 and report["gang"]["bound_ranks"] == 2
    assert report["inference"]["bound_jobs"] + report["inference"]["waiting"] == 10
    assert report["burst_cycle"]["bound_jobs"] + report["burst_cycle"]["waiting"] == 30
    assert len(report["steady_cycle"]["seconds"]) == 2
    assert len(report["steady_cycle"]["bound_per_cycle"]) == 2
    assert report["peak_rss_mib"] > 0


# -- the command ----------------------------------------------------------------------------


def test_command_runs_each_size_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    args = ["--nodes", "30", "--pending", "20", "--pending", "25", "--repeats", "1"]
    args += ["--steady-cycles", "1", "--inference-jobs", "5", "--json", str(out)]
    result = CliRunner().invoke(scale_command, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "B2"
    assert figures["machine"]["cpus"] >= 1 and figures["machine"]["cpu"]
    assert [(s["nodes"], s["pending"]) for s in figures["sizes"]] == [(30, 20), (30, 25)]
    assert "replicas/s" in result.output and "steady p99 s" in result.output
    assert table(figures["sizes"]).count("\n") == 2  # a header and a row per size


def test_the_decisions_digest_is_deterministic_and_sees_a_changed_decision() -> None:
    from gpuctl.sim import digest

    first = digest.digest(40, 120, 5, steady=1)
    assert digest.digest(40, 120, 5, steady=1) == first
    assert digest.digest(40, 120, 6, steady=1) != first  # other inputs, other decisions


# 174: a cluster where a note kept past a change of the snapshot would change a decision (a
# memo that ignored the table's changes passed every other seed of 200; checked).
@pytest.mark.parametrize("seed", [*range(20), 174])
def test_holds_of_nothing_asked_once_for_jobs_alike_decide_as_asked_each_time(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs alike that hold nothing (no reservation to be had) while nothing changes are asked
    once (`CycleMemos.no_hold`): the decisions are those of asking every job."""
    from gpuctl.core.engine.memos import CycleMemos

    rng = random.Random(seed)
    cluster = odd_cluster(rng)
    policy = build_policy(DEFAULT_POLICY)
    first = odd_jobs(rng, 1, rng.randint(1, 12))
    result = schedule(Snapshot.build(cluster, ()), first, policy, now=scale.NOW)
    running, _ = scale.applied(result, [], first, scale.NOW)
    queue = odd_jobs(rng, 100, 40)
    queue += [replace(j, id=j.id + 1000) for j in queue]  # every job has an alike twin
    snapshot = Snapshot.build(cluster, running)
    asked = 0
    real = CycleMemos.no_hold

    def counting(self: CycleMemos, at: int, key: Any) -> str | None:
        nonlocal asked
        found = real(self, at, key)
        asked += found is not None
        return found

    monkeypatch.setattr(CycleMemos, "no_hold", counting)
    kept = schedule(snapshot, queue, policy, now=scale.NOW)
    monkeypatch.setattr(CycleMemos, "no_hold", lambda self, at, key: None)
    assert schedule(snapshot, queue, policy, now=scale.NOW) == kept
    if seed == 0:
        assert asked, "the memo was never used: the comparison shows nothing"
