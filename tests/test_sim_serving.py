"""Workload W2 of benchmark B4 (`gpuctl.sim.serving`): the Azure trace read per minute, the
diurnal curve, the autoscaler's replicas, by hand; and the command on the real trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpuctl.cli.simulate_cost import DEFAULT_AZURE, DEFAULT_CATALOG, cost_command
from gpuctl.core.model import JobKind
from gpuctl.sim import serving
from gpuctl.sim.serving import Model, ServingTraceError, diurnal, load, per_minute, services
from gpuctl.sim.workload import build

H = 3600.0


def test_the_trace_is_read_per_minute(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:01.0,100,60\n"
        "2023-11-16 18:15:59.9,100,120\n"
        "2023-11-16 18:17:30.0,100,30\n"
    )
    # 180 tokens in 18:15, none in 18:16, 30 in 18:17: per second 3, 0, 0.5
    assert per_minute(path) == (3.0, 0.0, 0.5)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:01.0,1,x\n")
    with pytest.raises(ServingTraceError, match=r"t.csv:2"):
        per_minute(path)


def test_the_diurnal_curve_and_the_traces_own_hour() -> None:
    # 0.3 + 0.7 x (1 + cos(2 pi (t - 14 h) / 24 h)) / 2: 1 at 14:00, 0.3 at 02:00, 0.65 at 08:00
    assert [diurnal(h * H) for h in (14, 2, 8)] == pytest.approx([1.0, 0.3, 0.65])
    rates = [float(m) for m in range(60)]
    # at 18:45 (the trace's own hour) a minute's rate is as measured; minute 30 of any hour
    # reads the trace's minute 30
    assert load(rates, 18.75 * H) == pytest.approx(45.0)
    assert load(rates, 14 * H + 30 * 60) / load(rates, 2 * H + 30 * 60) == pytest.approx(
        diurnal(14.5 * H) / diurnal(2.5 * H)
    )


def test_the_autoscaler_asks_for_the_peak_minute_over_one_replicas_target() -> None:
    flat = [100.0] * 60
    model = Model(name="m", weights_gb=16, gpus=1, tokens_per_s=40, trace="t", share=0.5)
    (svc,) = services({"t": flat}, window_s=24 * H, step_s=6 * H, models=(model,))
    # 100 tok/s x share 0.5 = 50 at 18:45; scaled by diurnal / diurnal(18:45) = / 0.7625. The
    # peak minute of each 6 h step, over 40 tok/s a replica: 00-06 h at 05:59 (0.474) -> 31.1
    # -> 1 replica; 06-12 h at 11:59 (0.952) -> 62.4 -> 2; 12-18 h at 14:00 (1) -> 65.6 -> 2;
    # 18-24 h at 18:00 (0.825) -> 54.1 -> 2
    assert svc.curve == (1, 2, 2, 2)
    assert (svc.min_replicas, svc.max_replicas) == (1, 2)
    assert [svc.replicas_at(t * H) for t in (0, 5.9, 6, 23.9)] == [1, 1, 2, 2]


def test_a_small_models_replica_takes_a_share_of_a_gpu() -> None:
    svc = services({"conv": [10.0] * 60, "code": [10.0] * 60}, window_s=H)[0]
    spec = svc.spec("r")
    assert svc.name == "chat-1b"
    assert (spec.kind, spec.gpus_per_node, spec.gpu_milli) == (JobKind.INFERENCE, 0, 250)
    assert spec.hbm_floor_gbps == 120  # 60 tok/s x 2 GB
    work = build([], [svc], window_s=H)
    assert work.replicas and not work.training


@pytest.mark.skipif(
    not (DEFAULT_AZURE / "AzureLLMInferenceTrace_conv.csv").is_file(),
    reason="needs ../shared/traces/azure-llm-2023",
)
def test_w2_on_the_real_trace(tmp_path: Path) -> None:
    out = tmp_path / "w2.json"
    result = CliRunner().invoke(
        cost_command,
        ["--workload", "w2", "--catalog", str(DEFAULT_CATALOG), "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "gpuctl dollars by SKU: " in result.output
    figures = json.loads(out.read_text())
    assert figures["workload"]["name"] == "w2"
    assert figures["workload"]["training_jobs"] == 0
    fleets = figures["fleets"]
    assert set(fleets) == {"single_shape", "idle_timer", "karpenter", "gpuctl"}
    # every fleet pays at least the floor, and the autoscaler's replicas all get served
    assert all(f["dollars"] >= figures["floor_dollars"] for f in fleets.values())
    assert all(f["slo_attainment"] > 0.9 for f in fleets.values())
    assert len({s["name"] for s in figures["workload"]["services"]}) == len(serving.W2_MODELS)


def test_w3_trains_then_serves_what_it_trained_among_smaller_jobs() -> None:
    from gpuctl.core.model import JobSpec
    from gpuctl.sim.serving import w3
    from gpuctl.sim.synthetic import SimJob

    def job(name: str, nodes: int) -> SimJob:
        spec = JobSpec(kind=JobKind.TRAINING, command=("t",), num_nodes=nodes, gpus_per_node=8)
        return SimJob(name=name, spec=spec, arrival_s=H, duration_s=H)

    training, (svc,) = w3([job("small", 1), job("gang", 2)], {"conv": [100.0] * 60}, step_s=H)
    run, *rest = training
    # the run: 8 x 8 H100 on one fabric for 24 h from the start; the 2-node job is left out
    assert (run.spec.num_nodes, run.spec.gpus_per_node, run.spec.gpu_model) == (8, 8, "H100 SXM")
    assert (run.arrival_s, run.duration_s, run.spec.min_net_gbps) == (0.0, 24 * H, 1600.0)
    assert [j.name for j in rest] == ["small"]
    # serving starts when the run ends (hour 24 of 72), on 2 GPUs a replica
    assert svc.curve[:24] == (0,) * 24 and min(svc.curve[24:]) >= 1 and len(svc.curve) == 72
    assert svc.spec("r").gpus_per_node == 2
