"""The gang simulator: Gavel trace reading, synthetic clusters, the discrete-event replay
through `core.schedule` (with hand-computed figures), bounded starvation, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpuctl.cli.simulate_gang import gang
from gpuctl.core.model import JobKind, JobSpec
from gpuctl.core.plugins import DEFAULT_POLICY, build_policy
from gpuctl.sim import gavel
from gpuctl.sim.replay import replay
from gpuctl.sim.synthetic import Pod, SimJob, cluster, gang_shape, mixed_workload, with_limit

MIN = 60
# The traces sit beside the checkout, as the Makefile's TRACES default has it.
GAVEL = Path(__file__).resolve().parents[2] / "shared" / "traces" / "gavel"
VC = GAVEL / "msr" / "seed=0" / "11cb48.trace"

# A trace of three jobs in the 7-field format, and a throughput table for it.
TRACE = (
    "ResNet-50 (batch size 128)\tpython3 main.py\t--num_minibatches\t1\t1000\t0.000000\t1\n"
    "A3C\tpython3 main.py\t--max-steps\t0\t700\t60.000000\t4\n"
    "ResNet-50 (batch size 128)\tpython3 main.py\t--num_minibatches\t1\t3000\t120.000000\t16\n"
)
THROUGHPUTS = {
    "v100": {
        "('ResNet-50 (batch size 128)', 1)": {"null": 2.5},
        "('ResNet-50 (batch size 128)', 8)": {"null": 10.0},
        "('A3C', 1)": {"null": 7.0},
    }
}


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    """gavel/msr/seed=0/vc.trace with gavel/simulation_throughputs.json, as in ../shared."""
    folder = tmp_path / "gavel" / "msr" / "seed=0"
    folder.mkdir(parents=True)
    (tmp_path / "gavel" / "simulation_throughputs.json").write_text(json.dumps(THROUGHPUTS))
    path = folder / "vc.trace"
    path.write_text(TRACE)
    return path


# -- the trace ------------------------------------------------------------------------------


def test_trace_lines_and_run_times(trace: Path) -> None:
    jobs = gavel.read_trace(trace)
    assert [(j.job_type, j.total_steps, j.arrival_s, j.gpus) for j in jobs] == [
        ("ResNet-50 (batch size 128)", 1000, 0.0, 1),
        ("A3C", 700, 60.0, 4),
        ("ResNet-50 (batch size 128)", 3000, 120.0, 16),
    ]
    table = gavel.read_throughputs(gavel.default_throughputs(trace))
    # 1000 / 2.5 = 400 s; A3C measured on 1 GPU only: 700 / 7 = 100 s; 16 GPUs use the
    # 8-GPU figure: 3000 / 10 = 300 s
    assert [gavel.duration_s(j, table) for j in jobs] == [400.0, 100.0, 300.0]
    work = gavel.workload(jobs, table, slack=1.5)
    # 16 GPUs -> 2 nodes x 8; limits 1.5 x run time + 1 s, at least a minute
    assert [(w.spec.num_nodes, w.spec.gpus_per_node) for w in work] == [(1, 1), (1, 4), (2, 8)]
    assert [w.spec.time_limit_s for w in work] == [601, 151, 451]
    assert all(w.spec.kind is JobKind.TRAINING for w in work)


def test_a_bad_trace_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.trace"
    path.write_text(TRACE + "A3C\tonly\tfour\tfields\n")
    with pytest.raises(gavel.TraceError, match=r"bad.trace:4: 4 fields, expected 7"):
        gavel.read_trace(path)


@pytest.mark.skipif(not VC.is_file(), reason="needs ../shared/traces/gavel")
def test_the_real_trace_reads_whole() -> None:
    jobs = gavel.read_trace(VC)
    assert len(jobs) == 2000
    assert max(j.gpus for j in jobs) == 64
    assert [j.arrival_s for j in jobs] == sorted(j.arrival_s for j in jobs)
    work = gavel.workload(jobs, gavel.read_throughputs(gavel.default_throughputs(VC)))
    assert all(w.duration_s > 0 for w in work)


@pytest.mark.parametrize(
    ("gpus", "shape"),
    [(1, (1, 1)), (7, (1, 7)), (8, (1, 8)), (12, (2, 6)), (20, (4, 5)), (24, (3, 8)), (64, (8, 8))],
)
def test_gang_shape(gpus: int, shape: tuple[int, int]) -> None:
    assert gang_shape(gpus) == shape


def test_synthetic_cluster_lays_out_fabrics_and_leaves() -> None:
    nodes = cluster([Pod(sku="h100-sxm-ib", fabrics=2, leaves=2, nodes_per_leaf=3)])
    assert len(nodes) == 12
    assert {n.fabric_name for n in nodes} == {"h100-sxm-ib-f0", "h100-sxm-ib-f1"}
    assert len({n.leaf for n in nodes}) == 4
    assert nodes[0].profile.network.total_gbps == 3200
    assert nodes[0].price_per_hour == 23.60


def test_mixed_workload_is_seeded_and_mixed() -> None:
    work = mixed_workload(seed=1, jobs=200, jobs_per_hour=30)
    assert work == mixed_workload(seed=1, jobs=200, jobs_per_hour=30)
    kinds = {w.spec.kind for w in work}
    assert kinds == {JobKind.TRAINING, JobKind.INFERENCE}
    assert all(w.spec.time_limit_s >= w.duration_s for w in work)
    assert [w.arrival_s for w in work] == sorted(w.arrival_s for w in work)
    with pytest.raises(ValueError, match="slack"):
        with_limit(work[0].spec, 60, 0.5)


# -- the replay -----------------------------------------------------------------------------


def job(name: str, arrival_min: float, run_min: float, *, nodes: int = 1, **kw) -> SimJob:
    """A job whose time limit is exactly 1.5 x its run time."""
    spec = JobSpec(
        kind=JobKind.TRAINING,
        command=("x",),
        name=name,
        num_nodes=nodes,
        gpus_per_node=8,
        time_limit_s=int(1.5 * run_min * MIN),
        **kw,
    )
    return SimJob(name=name, spec=spec, arrival_s=arrival_min * MIN, duration_s=run_min * MIN)


TWO_NODES = cluster([Pod(sku="h100-sxm-ib", fabrics=1, leaves=1, nodes_per_leaf=2)])
# A (1 node, 100m), B (2-node gang, 50m), C (1 node, 30m), D (1 node, 200m)
WORK = (
    job("A", 0, 100),
    job("B", 10, 50, nodes=2),
    job("C", 20, 30),
    job("D", 30, 200),
)


@pytest.mark.parametrize(
    ("policy", "starts", "avg_jct", "avg_queue", "utilisation"),
    [
        pytest.param(
            # B waits for A (100); C and D wait behind B; at 150 both start.
            # JCT 100 + 140 + 160 + 320 = 720 / 4 = 180; queue 0 + 90 + 130 + 120 = 85;
            # GPU-minutes 800 + 16 x 50 + 240 + 1600 = 3440 / (16 x 350) = 0.614
            "fifo",
            {"A": 0, "B": 100, "C": 150, "D": 150},
            180,
            85,
            3440 / (16 * 350),
            id="fifo",
        ),
        pytest.param(
            # B reserves both nodes from A's limit, 150. C ends by 20 + 45 = 65 <= 150:
            # backfills at 20. D would end 30 + 300 > 150: waits for B.
            # JCT 100 + 140 + 30 + 320 = 590 / 4 = 147.5; queue 0 + 90 + 0 + 120 = 52.5
            "fifo-backfill",
            {"A": 0, "B": 100, "C": 20, "D": 150},
            147.5,
            52.5,
            3440 / (16 * 350),
            id="fifo-backfill",
        ),
        pytest.param(
            # C at 20, D at 50 on the node C left: B waits for D, to 250.
            # JCT 100 + 290 + 30 + 220 = 640 / 4 = 160; queue 0 + 240 + 0 + 20 = 65;
            # 3440 / (16 x 300) = 0.717
            "first-fit",
            {"A": 0, "B": 250, "C": 20, "D": 50},
            160,
            65,
            3440 / (16 * 300),
            id="first-fit",
        ),
    ],
)
def test_replay_figures(
    policy: str, starts: dict[str, float], avg_jct: float, avg_queue: float, utilisation: float
) -> None:
    report, records = replay(TWO_NODES, WORK, build_policy(policy))
    assert {r.name: r.start_s / MIN for r in records} == starts
    assert report.avg_jct_s / MIN == pytest.approx(avg_jct)
    assert report.avg_queue_s / MIN == pytest.approx(avg_queue)
    assert report.gpu_utilisation == pytest.approx(utilisation)
    assert (report.jobs, report.completed, report.never_started) == (4, 4, 0)


def test_replay_preempts_and_restarts_the_victim() -> None:
    one = cluster([Pod(sku="h100-sxm-ib", nodes_per_leaf=1)])
    work = (job("low", 0, 100, preemptible=True), job("high", 10, 20, priority=5))
    report, records = replay(one, work, build_policy(DEFAULT_POLICY))
    low, high = records
    # high preempts low at 10 and runs to 30; low starts over at 30 and ends at 130
    assert (high.start_s / MIN, high.end_s / MIN) == (10, 30)
    assert (low.start_s / MIN, low.end_s / MIN, low.preempted) == (30, 130, 1)
    assert report.preemptions == 1
    # 8 x (10 + 20 + 100) GPU-minutes over 8 GPUs x 130 minutes
    assert report.gpu_utilisation == pytest.approx(1.0)


def test_a_64_gpu_gang_starts_under_a_steady_stream_of_1_gpu_jobs() -> None:
    """8 nodes x 8 GPUs on one fabric. 64 one-GPU jobs (60m, limit 90m) fill it at 0; one
    more arrives every minute for 4 hours; the 64-GPU gang arrives at 10.

    EASY: at 60 the 64 end; the 10 jobs that came before the gang start (limit: 150) and the
    gang reserves every node from 150; the 50 younger jobs queued by then end by
    60 + 90 = 150 and backfill; later ones would not, so they wait. At 120 everything has
    ended after its 60 minutes: the gang starts, 110 minutes after it came.
    First fit: the stream never lets all 64 GPUs go free while it lasts."""
    nodes = cluster([Pod(sku="h100-sxm-ib", leaves=2, nodes_per_leaf=4)])

    def one_gpu(name: str, arrival_min: float) -> SimJob:
        spec = JobSpec(
            kind=JobKind.TRAINING,
            command=("x",),
            name=name,
            gpus_per_node=1,
            time_limit_s=90 * MIN,
        )
        return SimJob(name=name, spec=spec, arrival_s=arrival_min * MIN, duration_s=60 * MIN)

    stream = [one_gpu(f"burst-{i}", 0) for i in range(64)]
    stream += [one_gpu(f"small-{t}", t) for t in range(1, 240)]
    big = SimJob(
        name="gang",
        spec=JobSpec(
            kind=JobKind.TRAINING,
            command=("x",),
            num_nodes=8,
            gpus_per_node=8,
            time_limit_s=120 * MIN,
        ),
        arrival_s=10 * MIN + 0.5,
        duration_s=60 * MIN,
    )
    work = sorted([*stream, big], key=lambda w: w.arrival_s)

    def gang_start(policy: str) -> float:
        _, records = replay(nodes, work, build_policy(policy))
        (record,) = [r for r in records if r.name == "gang"]
        assert record.start_s is not None
        return record.start_s / MIN

    assert gang_start(DEFAULT_POLICY) == 120
    assert gang_start("first-fit") >= 240  # only once the stream has stopped


# -- the command ----------------------------------------------------------------------------


def test_gang_command_compares_policies_in_one_run(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(gang, ["--trace", str(trace), "--json", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("vc.trace: 3 jobs; 16 x v100-sxm2-ib nodes (128 GPUs)")
    assert lines[1].split()[:3] == ["policy", "done", "avg"]
    assert [line.split()[0] for line in lines[2:5]] == ["fifo", "fifo-backfill", "default"]
    figures = json.loads(out.read_text())
    assert [p["policy"] for p in figures["policies"]] == ["fifo", "fifo-backfill", "default"]
    assert figures["cluster"]["gpus"] == 128
    # nothing waits on 128 GPUs: JCT is the mean run time, (400 + 100 + 300) / 3 s
    assert all(p["avg_jct_s"] == pytest.approx(800 / 3) for p in figures["policies"])
    assert all(p["completed"] == 3 and p["wall_s"] >= 0 for p in figures["policies"])


def test_gang_command_refuses_an_unknown_policy(trace: Path) -> None:
    result = CliRunner().invoke(gang, ["--trace", str(trace), "--policy", "fastest"])
    assert result.exit_code == 2
    assert "unknown policy 'fastest'" in result.output
