"""sim.fgd and sim.alibaba: the B1 protocol's arrival sequence and metric, the placement log
and its independent checker, trace readers, workload mixes, and `gpuctl simulate fgd`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpuctl.cli.main import cli
from gpuctl.sim import fgd
from gpuctl.sim.alibaba import TraceError, TraceNode, TracePod, read_nodes, read_pods
from gpuctl.sim.mix import MixError, apply_mix, mix_summary, parse_mix

NODE_HEADER = "sn,cpu_milli,memory_mib,gpu,model\n"
POD_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
    "creation_time,deletion_time,scheduled_time\n"
)


def node(name: str, gpus: int, cpu: int = 32_000, model: str = "A") -> TraceNode:
    return TraceNode(name=name, cpu_milli=cpu, memory_mib=65_536, gpus=gpus, model=model)


def pod(name: str, num_gpu: int = 0, milli: int = 0, cpu: int = 1000, spec=()) -> TracePod:
    return TracePod(
        name=name, cpu_milli=cpu, memory_mib=1024, num_gpu=num_gpu, gpu_milli=milli, gpu_spec=spec
    )


# -- the canonical arrival sequence --------------------------------------------------------


def test_arrivals_pop_down_to_the_target_then_stop_at_a_too_big_draw() -> None:
    # 1 GPU: target 1.3 * 1 * 1000 = 1300. random.Random(42): shuffle(a, b, c) -> b, a, c;
    # total 1000 + 500 + 0 = 1500 > 1300, randrange(3) = 0 pops b -> 1000;
    # randrange(3) = 2 draws c: 1000 + 0 <= 1300, appended as c-tuned-0;
    # randrange(3) = 1 draws b: 1000 + 500 > 1300: stop.
    pods = [pod("a", 1, 1000), pod("b", 1, 500), pod("c")]
    arrivals = fgd.canonical_arrivals(pods, 42, total_gpus=1)
    assert [a.name for a in arrivals] == ["a", "c", "c-tuned-0"]
    assert [a.index for a in arrivals] == [0, 1, 2]
    assert arrivals[2].pod.name == "c"


def test_arrivals_check_the_per_gpu_milli_sic() -> None:
    # 3 GPUs: target 3900. random.Random(42): shuffle -> b, a, c; total 300 + 2000 = 2300.
    # randrange(3) = 0 draws a (2 GPUs): the check adds a's per-GPU milli, 2300 + 1000 <= 3900,
    # so a-tuned-0 is appended although its request takes the total to 4300 (sic, upstream).
    pods = [pod("a", 2, 1000), pod("b", 1, 300), pod("c")]
    arrivals = fgd.canonical_arrivals(pods, 42, total_gpus=3)
    assert [a.name for a in arrivals] == ["b", "a", "c", "a-tuned-0"]
    assert sum(a.request.milli for a in arrivals) == 4300


def test_arrivals_ignore_the_file_order() -> None:
    pods = [pod(f"p{i:02d}", 1, 100 * (i % 9 + 1)) for i in range(30)]
    assert fgd.canonical_arrivals(pods, 7, total_gpus=4) == fgd.canonical_arrivals(
        list(reversed(pods)), 7, total_gpus=4
    )


# -- the metric ----------------------------------------------------------------------------


def test_column_and_value_round_as_published() -> None:
    # 3106000 / 6212 / 10 = 50.0; 3109106 / 6212 / 10 = 50.05 -> 50
    assert fgd.column_of(3_106_000, 6212) == 50
    assert fgd.column_of(3_109_106, 6212) == 50
    # Python's round: 3137060 / 6212 / 10 = 50.5 exactly -> 50 (half to even); 51.5 -> 52
    assert fgd.column_of(3_137_060, 6212) == 50
    assert fgd.column_of(3_199_180, 6212) == 52
    # used 5,906,000 of 6,212 GPUs: 95.0740... -> 95.07
    assert fgd.value_of(5_906_000, 6212) == 95.07


def test_an_empty_column_takes_its_neighbours_values() -> None:
    events = [(0, 1.0), (0, 3.0), (2, 5.0), (4, 9.0)]
    # column 1 is empty: columns 0 and 2 pooled, (1 + 3 + 5) / 3 = 3.0;
    # column 3 is empty: (5 + 9) / 2 = 7.0
    assert fgd.column_means(events) == (2.0, 3.0, 5.0, 7.0, 9.0)
    assert fgd.column_means([]) == ()


# -- a run, its placement log and the checker ----------------------------------------------

NODES = (
    node("n0", 2, cpu=16_000),
    node("n1", 4, cpu=32_000, model="B"),
    node("n2", 1, cpu=8_000),
    node("n3", 8, cpu=64_000, model="B"),
)


def tiny_pods() -> tuple[TracePod, ...]:
    shapes = [(0, 0), (1, 1000), (1, 500), (1, 250), (2, 1000), (1, 800), (4, 1000)]
    specs = [(), (), ("A",), (), ("B",), ("A", "B"), ()]
    return tuple(
        pod(f"p{i:02d}", *shapes[i % 7], cpu=1000 * (i % 5 + 1), spec=specs[i % 7] if i % 7 else ())
        for i in range(40)
    )


@pytest.mark.parametrize("policy", ["bestfit", "random", "fgd", "gpuctl"])
def test_placement_log_replays_through_the_checker(tmp_path: Path, policy: str) -> None:
    pods = tiny_pods()
    (result,) = fgd.run(NODES, pods, [policy], seeds=(1, 2, 3), keep_placements=True)
    path = tmp_path / "placements.csv"
    fgd.write_placements(result, path)
    report = fgd.check_placements(path, NODES, pods)
    assert report.seeds == (1, 2, 3)
    assert report.rows == sum(len(r.placed) for r in result.runs)
    assert report.placed > 0
    for column in (*fgd.REPORT_COLUMNS, 50):
        assert report.unallocated(column) == pytest.approx(result.unallocated(column))


def test_the_daemons_core_places_the_pods_and_its_log_passes_the_checker(tmp_path: Path) -> None:
    # Policy "daemon": every pod through core.schedule with the default policy; a pod that
    # allows two models is a job that accepts either.
    pods = tiny_pods()
    assert any(len(p.gpu_spec) > 1 for p in pods)
    (result,) = fgd.run(NODES, pods, ["daemon"], seeds=(1, 2), keep_placements=True)
    path = tmp_path / "placements.csv"
    fgd.write_placements(result, path)
    report = fgd.check_placements(path, NODES, pods)
    assert report.placed > 0
    assert report.unallocated(100) == pytest.approx(result.unallocated(100))


def test_a_pod_allowing_two_models_is_a_job_accepting_either() -> None:
    two = pod("p", 1, 1000, spec=("A", "B"))
    (result,) = fgd.run(NODES, (two,), ["daemon"], seeds=(1,), keep_placements=True)
    placed = [p.node for p in result.runs[0].placed if p.node]
    models = {n.name: n.model for n in NODES}
    assert {models[n] for n in placed} == {"A", "B"}  # either model takes it


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fgd.PLACEMENT_COLUMNS)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    (result,) = fgd.run(NODES, tiny_pods(), ["bestfit"], seeds=(5,), keep_placements=True)
    path = tmp_path / "log.csv"
    fgd.write_placements(result, path)
    return path


def test_checker_catches_an_overfull_gpu(log: Path) -> None:
    rows = _rows(log)
    placed = [r for r in rows if r["node"] and r["gpu_milli"] == "1000" and not r["gpu_spec"]]
    first = placed[0]
    later = next(r for r in placed[1:] if r["num_gpu"] == "1")
    # the later whole GPU onto the first one's first GPU: 1000 + 1000 milli
    later["node"], later["gpu_alloc"] = first["node"], first["gpu_alloc"].split(";")[0]
    _write(log, rows)
    with pytest.raises(fgd.PlacementLogError, match=r"of n\d would hold 2000 milli"):
        fgd.check_placements(log, NODES, tiny_pods())


def test_checker_catches_a_reordered_arrival(log: Path) -> None:
    rows = _rows(log)
    rows[0], rows[1] = rows[1], rows[0]
    _write(log, rows)
    with pytest.raises(fgd.PlacementLogError, match="is not the canonical"):
        fgd.check_placements(log, NODES, tiny_pods())


def test_checker_catches_a_gpu_spec_violation(log: Path) -> None:
    rows = _rows(log)
    row = next(r for r in rows if r["gpu_spec"] == "B" and r["node"])
    row["node"] = "n2"  # a 1-GPU model-A node
    row["gpu_alloc"] = ";".join(f"{g}:1000" for g in range(int(row["num_gpu"])))
    _write(log, rows)
    with pytest.raises(fgd.PlacementLogError, match="node n2 has A GPUs; gpu_spec allows B"):
        fgd.check_placements(log, NODES, tiny_pods())


def test_checker_catches_a_needless_drop(log: Path) -> None:
    rows = _rows(log)
    first = rows[0]  # the cluster is empty: the first arrival fits somewhere
    first["node"], first["gpu_alloc"] = "", ""
    _write(log, rows)
    with pytest.raises(fgd.PlacementLogError, match="was dropped but fits"):
        fgd.check_placements(log, NODES, tiny_pods())


def test_json_has_the_documented_shape() -> None:
    results = fgd.run(NODES, tiny_pods(), ["bestfit", "gpuctl"], seeds=(1, 2))
    body = results[0].to_json()
    assert list(body) == [
        "policy",
        "seeds",
        "unallocated_pct",
        "per_seed_unallocated_at_100",
        "wall_s_per_seed",
    ]
    assert body["policy"] == "bestfit" and body["seeds"] == [1, 2]
    assert list(body["unallocated_pct"]) == ["90", "95", "100", "110", "130"]
    assert len(body["per_seed_unallocated_at_100"]) == 2


def test_policies_see_the_same_arrivals() -> None:
    a, b = fgd.run(NODES, tiny_pods(), ["bestfit", "fgd"], seeds=(3,), keep_placements=True)
    assert [p.arrival for p in a.runs[0].placed] == [p.arrival for p in b.runs[0].placed]


# -- readers -------------------------------------------------------------------------------


def test_readers_read_every_column(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.csv"
    nodes.write_text(NODE_HEADER + "n1,64000,262144,2,P100\n")
    pods = tmp_path / "pods.csv"
    pods.write_text(
        POD_HEADER
        + "p1,6000,12288,1,460,V100M16|T4,LS,Running,0,100,5\n"
        + "p2,8000,0,0,0,T4,BE,Pending,3,,\n"
    )
    assert read_nodes(nodes) == (
        TraceNode(name="n1", cpu_milli=64000, memory_mib=262144, gpus=2, model="P100"),
    )
    p1, p2 = read_pods(pods)
    assert p1.gpu_spec == ("V100M16", "T4") and p1.qos == "LS" and p1.scheduled_time == 5
    assert p1.request.gpu_models == ("T4", "V100M16") and p1.request.gpu_milli == 460
    assert p2.scheduled_time is None and p2.deletion_time is None
    assert p2.request.gpu_models == ()  # gpu_spec binds GPU pods only


# fmt: off
BAD_PODS = [
    ("not-an-int",   "p1,6k,1,1,460,,LS,Running,0,1,0\n",   "pods.csv:2: cpu_milli must be an integer, got '6k'"),
    ("milli-range",  "p1,1,1,1,1200,,LS,Running,0,1,0\n",   "pods.csv:2: gpu_milli must be 0..1000, got 1200"),
    ("zero-share",   "p1,1,1,1,0,,LS,Running,0,1,0\n",      "pods.csv:2: a 1-GPU pod needs gpu_milli 1..1000, got 0"),
    ("too-many-gpu", "p1,1,1,9,1000,,LS,Running,0,1,0\n",   "pods.csv:2: num_gpu must be 0..8, got 9"),
    ("short-row",    "p1,1,1,1\n",                          "pods.csv:2: expected 11 fields"),
    ("empty-model",  "p1,1,1,1,500,T4|,LS,Running,0,1,0\n", "pods.csv:2: gpu_spec 'T4|' has an empty model name"),
    ("duplicate",    "p1,1,1,0,0,,LS,Running,0,1,0\np1,1,1,0,0,,LS,Running,0,1,0\n", "pods.csv:3: pod 'p1' already on line 2"),
]
# fmt: on


@pytest.mark.parametrize(
    ("row", "message"), [c[1:] for c in BAD_PODS], ids=[c[0] for c in BAD_PODS]
)
def test_a_bad_pod_row_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "pods.csv"
    path.write_text(POD_HEADER + row)
    with pytest.raises(TraceError) as caught:
        read_pods(path)
    assert message in str(caught.value)


def test_a_bad_node_list_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "nodes.csv"
    path.write_text(NODE_HEADER + "n1,64000,1,2,P100\nn2,64000,1,2,\n")
    with pytest.raises(TraceError, match=r"nodes.csv:3: node 'n2' has 2 GPUs but no model"):
        read_nodes(path)
    path.write_text("sn,cpu_milli,gpu,model\n")
    with pytest.raises(TraceError, match=r"nodes.csv:1: missing column\(s\) memory_mib"):
        read_nodes(path)


# -- mixes ---------------------------------------------------------------------------------


def test_mixes_reach_their_shares_and_are_deterministic() -> None:
    pods = tuple(
        pod(f"p{i:03d}", *[(0, 0), (1, 1000), (1, 500), (4, 1000)][i % 4]) for i in range(400)
    )
    assert apply_mix(pods, NODES, parse_mix("default")) == pods
    mixed = apply_mix(pods, NODES, parse_mix("gpushare:0.6,cpu:0.4,gpuspec:0.5"))
    assert len(mixed) == len(pods)
    assert len({p.name for p in mixed}) == len(mixed)
    shares = mix_summary(mixed)
    assert shares["cpu"] == pytest.approx(0.4, abs=0.01)
    assert shares["gpushare"] == pytest.approx(0.6, abs=0.01)
    assert shares["gpuspec"] == pytest.approx(0.5, abs=0.01)
    # constraints name models that exist on nodes big enough for the pod
    for p in mixed:
        if p.gpu_spec:
            assert any(n.model in p.gpu_spec and n.gpus >= p.num_gpu for n in NODES)
    assert mixed == apply_mix(pods, NODES, parse_mix("gpushare:0.6,cpu:0.4,gpuspec:0.5"))


@pytest.mark.parametrize("text", ["gpushare", "gpushare:2", "luck:0.5", "cpu:x", "cpu:0.1,cpu:0.2"])
def test_a_bad_mix_is_refused(text: str) -> None:
    with pytest.raises(MixError):
        parse_mix(text)


# -- the CLI -------------------------------------------------------------------------------


def write_trace(tmp_path: Path) -> tuple[Path, Path]:
    nodes = tmp_path / "nodes.csv"
    nodes.write_text(
        NODE_HEADER
        + "".join(f"{n.name},{n.cpu_milli},{n.memory_mib},{n.gpus},{n.model}\n" for n in NODES)
    )
    pods = tmp_path / "pods.csv"
    pods.write_text(
        POD_HEADER
        + "".join(
            f"{p.name},{p.cpu_milli},{p.memory_mib},{p.num_gpu},{p.gpu_milli},"
            f"{'|'.join(p.gpu_spec)},LS,Running,0,1,0\n"
            for p in tiny_pods()
        )
    )
    return nodes, pods


def test_simulate_fgd_compares_policies_and_writes_json(tmp_path: Path) -> None:
    nodes, pods = write_trace(tmp_path)
    out, log = tmp_path / "out.json", tmp_path / "log.csv"
    result = CliRunner().invoke(
        cli,
        ["simulate", "fgd", "--nodes", str(nodes), "--pods", str(pods), "--seeds", "1-2",
         "--policy", "bestfit", "--policy", "gpuctl", "--jobs", "1",
         "--json", str(out), "--placements", str(log)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["policy", "90%", "95%", "100%", "110%", "130%", "s/seed"]
    assert [line.split()[0] for line in lines[2:4]] == ["bestfit", "gpuctl"]
    body = json.loads(out.read_text())
    assert [b["policy"] for b in body] == ["bestfit", "gpuctl"]
    assert all(set(b["unallocated_pct"]) == {"90", "95", "100", "110", "130"} for b in body)
    for policy in ("bestfit", "gpuctl"):
        report = fgd.check_placements(tmp_path / f"log.{policy}.csv", NODES, tiny_pods())
        assert report.seeds == (1, 2)


def test_simulate_fgd_defaults_to_the_daemons_policy(tmp_path: Path) -> None:
    nodes, pods = write_trace(tmp_path)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        cli,
        ["simulate", "fgd", "--nodes", str(nodes), "--pods", str(pods), "--seeds", "3",
         "--json", str(out), "--mix", "gpushare:0.5", "--jobs", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    body = json.loads(out.read_text())
    assert (body["policy"], body["mix"], body["seeds"]) == ("gpuctl", "gpushare:0.5", [3])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "luck"], "unknown policy 'luck'"),
        (["--seeds", "51-42"], "range runs backwards"),
        (["--mix", "luck:1"], "error: mix 'luck:1'"),
    ],
)
def test_simulate_fgd_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    nodes, pods = write_trace(tmp_path)
    result = CliRunner().invoke(
        cli, ["simulate", "fgd", "--nodes", str(nodes), "--pods", str(pods), *args]
    )
    assert result.exit_code != 0
    assert message in result.output


def test_pinned_mixes_pin_demand_to_the_scarce_models_as_lists() -> None:
    # GPUs by model: A 3 (n0, n2), B 12 (n1, n3): B is the dominant model, A the scarce one.
    pods = tuple(pod(f"p{i:03d}", *[(0, 0), (1, 1000), (1, 500)][i % 3]) for i in range(300))
    mixed = apply_mix(pods, NODES, parse_mix("pinned:0.4"))
    gpu = [p for p in mixed if p.num_gpu]
    pinned = [p for p in gpu if p.gpu_spec]
    assert len(pinned) == round(0.4 * len(gpu))
    # Never the dominant model alone; with two models, every list names the scarce one.
    assert all(p.gpu_spec != ("B",) and "A" in p.gpu_spec for p in pinned)
    assert mixed == apply_mix(pods, NODES, parse_mix("pinned:0.4"))


def test_a_pod_list_of_only_the_five_request_columns_reads(tmp_path: Path) -> None:
    path = tmp_path / "pods.csv"
    path.write_text(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np1,4000,1024,1,500\np2,0,0,2,1000\n"
    )
    p1, p2 = read_pods(path)
    assert (p1.num_gpu, p1.gpu_milli, p1.gpu_spec, p1.creation_time) == (1, 500, (), None)
    assert p2.request.milli == 2000
    path.write_text("name,cpu_milli,memory_mib,num_gpu\np1,4000,1024,1\n")
    with pytest.raises(TraceError, match=r"missing column\(s\) gpu_milli"):
        read_pods(path)
