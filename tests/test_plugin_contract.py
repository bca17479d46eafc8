"""Every registered filter and score keeps the contract `core.framework` declares, checked one
plugin at a time so a new plugin is covered by registering it:

- its column form gives exactly the per-node figures (codes, and scores bit for bit, on the
  nodes the filters pass), on random odd clusters and on a B2 cluster, partly used;
- `reads_free = False` holds: its answers do not change when what a node has free does;
- it reads a job only through its shape and `facet`: two jobs alike in those get the same
  answers.

The whole-policy comparison (every decision of a cycle by columns and node by node) is in
`test_sim_scale.py`.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from gpuctl.core import schedule
from gpuctl.core.engine.verdicts import shape
from gpuctl.core.framework import FilterPlugin, ScorePlugin
from gpuctl.core.model import Job, JobKind, JobSpec, JobState, Node
from gpuctl.core.plugins import FILTERS, POLICIES, SCORES, CycleContext, RankRequest, build_policy
from gpuctl.core.snapshot import Snapshot
from gpuctl.sim import scale
from tests.test_sim_scale import odd_cluster, odd_jobs

SEEDS = range(12)


def _instances() -> tuple[dict[str, FilterPlugin], dict[str, list[ScorePlugin]]]:
    """Every registered plugin as the presets build it (some scores take settings)."""
    filters: dict[str, FilterPlugin] = {}
    scores: dict[str, list[ScorePlugin]] = {}
    for preset in POLICIES:
        policy = build_policy(preset)
        for f in policy.filters:
            filters.setdefault(f.name, f)
        for s, _ in policy.scores:
            if all(s != other for other in scores.get(s.name, [])):
                scores.setdefault(s.name, []).append(s)
    return filters, scores


FILTER_OF, SCORES_OF = _instances()


def test_every_registered_plugin_is_checked() -> None:
    """A plugin no preset builds would escape the checks below: build it in a preset (or
    here) first."""
    assert set(FILTER_OF) == set(FILTERS)
    assert set(SCORES_OF) == set(SCORES)


def edge_jobs(rng: random.Random, first: int, count: int) -> list[Job]:
    """Jobs whose floors land on either side of what the odd clusters' nodes have: weights
    from a few GB to more than one GPU holds, tokens/s targets, memory and CPU asks."""
    out = []
    for i in range(count):
        common = {
            "command": ("x",),
            "gpu_model": rng.choice(("", "H100 SXM", "A100 80GB", "l40s", "B200")),
            "gpu_memory_mib": rng.choice((0, 10000, 24576, 46068, 50000, 81920, 90000)),
            "cpu_milli": rng.choice((0, 1000, 8000, 16000, 64000)),
            "memory_mib": rng.choice((0, 4096, 65536, 100000)),
            "min_net_gbps": rng.choice((0.0, 100.0, 200.0, 400.0, 800.0)),
            "min_nvlink_gbps": rng.choice((0.0, 400.0, 600.0, 900.0)),
        }
        if rng.random() < 0.4:
            spec = JobSpec(
                kind=JobKind.TRAINING,
                num_nodes=rng.randint(1, 3),
                gpus_per_node=rng.choice((1, 2, 4, 8)),
                **common,
            )
        else:
            milli = rng.choice((0, 0, 100, 500, 999))
            spec = JobSpec(
                kind=JobKind.INFERENCE,
                replicas=rng.randint(1, 3),
                gpu_milli=milli,
                gpus_per_node=0 if milli else rng.choice((0, 1, 2, 4, 8)),
                target_tokens_per_s=rng.choice((0.0, 10.0, 50.0, 150.0, 400.0)),
                weights_gb=rng.choice((0.0, 7.0, 14.0, 40.0, 70.0, 140.0, 400.0)),
                **common,
            )
        out.append(Job(id=first + i, spec=spec, created_at=scale.NOW))
    return out


def _clusters() -> list[tuple[str, Snapshot, list[Job]]]:
    out = []
    for seed in SEEDS:
        rng = random.Random(seed)
        cluster = odd_cluster(rng)
        first = odd_jobs(rng, 1, rng.randint(1, 10))
        policy = build_policy("default")
        result = schedule(Snapshot.build(cluster, ()), first, policy, now=scale.NOW)
        running, _ = scale.applied(result, [], first, scale.NOW)
        jobs = odd_jobs(rng, 100, 30) + edge_jobs(rng, 200, 60)
        out.append((f"odd-{seed}", Snapshot.build(cluster, running), jobs))
    cluster = scale.scale_cluster(64)
    running = list(scale.background(cluster, seed=3, utilisation=0.6))
    jobs = list(scale.pending_jobs(60, seed=4)) + edge_jobs(random.Random(5), 1000, 60)
    out.append(("b2", Snapshot.build(cluster, running), jobs))
    return out


CLUSTERS = _clusters()
CASES = [pytest.param(s, j, id=name) for name, s, j in CLUSTERS]


def _context(snapshot: Snapshot, jobs: list[Job]) -> CycleContext:
    return CycleContext(
        nodes=snapshot.nodes,
        table=snapshot.table,
        mix=CycleContext.mix_of([*jobs, *snapshot.jobs()]),
    )


@pytest.mark.parametrize("name", sorted(FILTERS))
@pytest.mark.parametrize(("snapshot", "jobs"), CASES)
def test_a_filter_answers_alike_by_columns_and_node_by_node(
    name: str, snapshot: Snapshot, jobs: list[Job]
) -> None:
    plugin = FILTER_OF[name]
    assert plugin.column_form, f"{name}: every built-in filter has a column form"
    t = snapshot.table
    rows = np.arange(len(t))
    for job in jobs:
        if job.spec.kind not in plugin.kinds:
            continue
        request = RankRequest.of(job.spec)
        codes, _ = plugin.codes(job, request, t, rows)  # type: ignore[attr-defined]
        expected = [int(plugin.filter(job, request, t.views[r]).code) for r in rows.tolist()]
        assert codes.tolist() == expected, f"{name}, job {job.id}"


@pytest.mark.parametrize("name", sorted(SCORES))
@pytest.mark.parametrize(("snapshot", "jobs"), CASES)
def test_a_score_answers_alike_by_columns_and_node_by_node(
    name: str, snapshot: Snapshot, jobs: list[Job]
) -> None:
    t = snapshot.table
    check = build_policy("default")
    for instance in SCORES_OF[name]:
        plugin = instance.prepare(_context(snapshot, jobs))
        if plugin is None or not plugin.column_form:
            continue
        for job in jobs:
            if job.spec.kind not in plugin.kinds:
                continue
            request = RankRequest.of(job.spec)
            passing = np.array(
                [r for r in range(len(t)) if check.check(job, request, t.views[r]).ok],
                dtype=np.int64,
            )
            got = plugin.scores(job, request, t, passing)  # type: ignore[attr-defined]
            expected = [plugin.score(job, request, t.views[r]) for r in passing.tolist()]
            assert got.tolist() == expected, f"{name}, job {job.id}"


def _emptied(snapshot: Snapshot) -> Snapshot:
    """The same nodes with nothing running on them."""
    nodes: list[Node] = [v.node for v in snapshot.nodes]
    return Snapshot.build(nodes, ())


@pytest.mark.parametrize("name", sorted(n for n, f in FILTER_OF.items() if not f.reads_free))
def test_a_filter_that_says_it_reads_nothing_free_does_not(name: str) -> None:
    plugin = FILTER_OF[name]
    for _, snapshot, jobs in CLUSTERS:
        empty = _emptied(snapshot)
        for job in jobs:
            if job.spec.kind not in plugin.kinds:
                continue
            request = RankRequest.of(job.spec)
            for used, idle in zip(snapshot.nodes, empty.nodes, strict=True):
                a = plugin.filter(job, request, used)
                b = plugin.filter(job, request, idle)
                assert (a.code, a.reason) == (b.code, b.reason), f"{name} on {used.id}"


@pytest.mark.parametrize("name", sorted(SCORES))
def test_a_score_that_says_it_reads_nothing_free_does_not(name: str) -> None:
    for instance in SCORES_OF[name]:
        if instance.reads_free:
            continue
        for _, snapshot, jobs in CLUSTERS:
            plugin = instance.prepare(_context(snapshot, jobs))
            if plugin is None:
                continue
            empty = _emptied(snapshot)
            for job in jobs:
                if job.spec.kind not in plugin.kinds:
                    continue
                request = RankRequest.of(job.spec)
                for used, idle in zip(snapshot.nodes, empty.nodes, strict=True):
                    assert plugin.score(job, request, used) == plugin.score(job, request, idle)


def _twin(job: Job) -> Job:
    """`job` changed in everything placement does not read (its shape stays)."""
    spec = replace(
        job.spec,
        command=("other",),
        name="twin",
        owner="someone-else",
        queue="elsewhere",
        priority=job.spec.priority + 1,
        env=(("X", "1"),),
        time_limit_s=job.spec.time_limit_s + 60,
        preemptible=not job.spec.preemptible,
    )
    return replace(job, id=job.id + 10_000, spec=spec, state=JobState.PENDING)


@pytest.mark.parametrize(("snapshot", "jobs"), CASES)
def test_plugins_read_a_job_only_through_its_shape_and_facet(
    snapshot: Snapshot, jobs: list[Job]
) -> None:
    context = _context(snapshot, jobs)
    scores = [p for ps in SCORES_OF.values() for i in ps if (p := i.prepare(context)) is not None]
    for job in jobs:
        twin = _twin(job)
        assert shape(twin.spec) == shape(job.spec)
        request = RankRequest.of(job.spec)
        for view in snapshot.nodes:
            for f in FILTER_OF.values():
                if job.spec.kind in f.kinds:
                    a, b = f.filter(job, request, view), f.filter(twin, request, view)
                    assert (a.code, a.reason) == (b.code, b.reason), f.name
            for s in scores:
                if job.spec.kind in s.kinds and s.facet(job) == s.facet(twin):
                    assert s.score(job, request, view) == s.score(twin, request, view), s.name
