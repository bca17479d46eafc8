"""Benchmark B4's simulator: the workload (training floors, the diurnal replica curve), each
fleet's dollars and GPU-hours on small workloads computed by hand, the idle timer, SLO
attainment, the targets, the JSON and the bare command.

Prices are per node and hour; the expected arithmetic is in the comments.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpuctl.cli.simulate import simulate
from gpuctl.cli.simulate_cost import DEFAULT_CATALOG, DEFAULT_TRACE, cost_command
from gpuctl.core.leasing import Offer
from gpuctl.core.model import JobKind, JobSpec
from gpuctl.core.plugins import build_policy
from gpuctl.sim import cost
from gpuctl.sim.lease_replay import Served, tokens_per_s
from gpuctl.sim.synthetic import SimJob
from gpuctl.sim.workload import (
    DEFAULT_SERVICES,
    Service,
    Workload,
    build,
    replica_intervals,
    training_spec,
    training_window,
)

H = 3600.0
POLICY = build_policy("default")
BOOT = 300.0

# -- offers: datasheet figures, round prices --------------------------------------------------

H100_IB = Offer(
    provider="cat", sku="h100x8-ib", gpu_model="H100 SXM", gpu_count=8, gpu_memory_mib=81920,
    hbm_gbps=3350, nvlink_gbps=900, network_gbps=3200, price_per_hour=16.0,
)  # fmt: skip
H100_X8 = replace(H100_IB, sku="h100x8", network_gbps=0, price_per_hour=12.0)
H100_1 = replace(H100_IB, sku="h100x1", gpu_count=1, nvlink_gbps=0, network_gbps=0,
                 price_per_hour=2.0)  # fmt: skip
L40S_1 = Offer(
    provider="cat", sku="l40s", gpu_model="L40S", gpu_count=1, gpu_memory_mib=46080,
    hbm_gbps=864, price_per_hour=1.0,
)  # fmt: skip
L4_1 = Offer(
    provider="cat", sku="l4", gpu_model="L4", gpu_count=1, gpu_memory_mib=24576, hbm_gbps=300,
    price_per_hour=0.5,
)  # fmt: skip
OFFERS = (H100_IB, H100_X8, H100_1, L40S_1, L4_1)

# 16 GB of weights at 40 tokens/s: a 640 GB/s floor. The L40S (864) meets it, the L4 (300)
# does not; one replica wanted all the time.
CHAT = Service(
    name="chat", weights_gb=16, gpus_per_replica=1, tokens_per_s=40, min_replicas=1,
    max_replicas=1,
)  # fmt: skip


def training(name: str, nodes: int, gpus: int, arrival_s: float, run_s: float) -> SimJob:
    spec = JobSpec(
        kind=JobKind.TRAINING, command=("t",), name=name, num_nodes=nodes, gpus_per_node=gpus
    )
    return SimJob(
        name=name,
        spec=replace(training_spec(spec), time_limit_s=int(1.5 * run_s)),
        arrival_s=arrival_s,
        duration_s=run_s,
    )


def gang_and_chat() -> Workload:
    """A 2 x 8 gang arriving at 0 for 2 h, and one chat replica, over a 3 h window."""
    return build([training("gang", 2, 8, 0.0, 2 * H)], [CHAT], window_s=3 * H)


# -- the workload -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "gpus", "nvlink", "net"),
    [(1, 1, 0.0, 0.0), (1, 4, 900.0, 0.0), (2, 8, 900.0, 1600.0)],
    ids=["one-gpu", "one-node", "gang"],
)
def test_training_floors(nodes: int, gpus: int, nvlink: float, net: float) -> None:
    spec = training_spec(
        JobSpec(kind=JobKind.TRAINING, command=("t",), num_nodes=nodes, gpus_per_node=gpus)
    )
    assert (spec.gpu_model, spec.min_nvlink_gbps, spec.min_net_gbps) == ("H100 SXM", nvlink, net)


def test_the_window_of_a_trace() -> None:
    jobs = [training(f"j{i}", 1, 1, t, H) for i, t in enumerate((10.0, 100.0, 200.0, 400.0))]
    chosen = training_window(jobs, start_s=100.0, window_s=300.0, limit=0)
    # arrivals in [100, 400): 100 and 200, made relative to 100
    assert [(j.name, j.arrival_s) for j in chosen] == [("j1", 0.0), ("j2", 100.0)]
    assert [j.name for j in training_window(jobs, start_s=0.0, window_s=H, limit=3)] == [
        "j0",
        "j1",
        "j2",
    ]


def test_the_diurnal_curve() -> None:
    svc = DEFAULT_SERVICES[0]  # 4..24 replicas, peak at 14h
    # 4 + 20 x (1 + cos(2 pi (t - 14h) / 24h)) / 2: 24 at 14h, 4 at 2h, 14 at 8h and 20h
    assert [svc.replicas_at(h * H) for h in (14, 2, 8, 20, 38)] == [24, 4, 14, 14, 24]


def test_replica_stretches_last_added_first_removed() -> None:
    svc = Service(
        name="s", weights_gb=1, gpus_per_replica=1, tokens_per_s=1, min_replicas=1,
        max_replicas=3, peak_hour=12,
    )  # fmt: skip
    # read every 6 h over a day: 1 at 0h (cos = -1), 2 at 6h, 3 at 12h, 2 at 18h
    assert replica_intervals(svc, 24 * H, 6 * H) == (
        (1, 0.0, 24 * H),
        (2, 6 * H, 24 * H),
        (3, 12 * H, 18 * H),
    )


def test_build_numbers_demands_in_arrival_order() -> None:
    work = build([training("late", 1, 1, 50.0, H)], [CHAT], window_s=H)
    assert [(d.id, d.name, d.arrival_s) for d in work.demands] == [
        (1, "chat-r1@0.00h", 0.0),
        (2, "late", 50.0),
    ]
    assert work.replicas[0].until_s == H
    assert work.replicas[0].spec.hbm_floor_gbps == 640  # 40 tokens/s x 16 GB


# -- the fleets, by hand --------------------------------------------------------------------------


def test_cheapest_matching_instance() -> None:
    work = gang_and_chat()
    gang, chat = work.training[0], work.replicas[0]
    # the gang's nodes need a fabric: only h100x8-ib has one
    assert cost.cheapest(gang.spec, OFFERS) == H100_IB
    # the replica needs 640 GB/s: l40s ($1) is the cheapest that has it, l4 ($0.5) is too slow
    assert cost.cheapest(chat.spec, OFFERS) == L40S_1
    # (a)'s node: the cheapest that meets a gang's floors at 8 GPUs a node
    assert cost.training_shape(OFFERS) == H100_IB


def test_idle_timer_fleet() -> None:
    work = gang_and_chat()
    out = cost.idle_timer_fleet(work, OFFERS, boot_s=BOOT, idle_s=300.0)
    r = cost.report(cost.IDLE_TIMER, work, out)
    # gang: 2 x h100x8-ib launched at 0, up at 300 s, runs to 7,500 s, released 300 s later at
    # 7,800 s: 2 x $16 x 7,800/3,600 = $69.333; 16 GPUs x 2.1667 h = 34.667 GPU-hours paid.
    # chat: an l40s launched at 0, serving from 300 s to the window's end (10,800 s), paid
    # inside the window: $1 x 3 h = $3, 3 GPU-hours.
    assert r.dollars == pytest.approx(2 * 16 * 7800 / H + 3.0)
    assert r.gpu_hours_paid == pytest.approx(16 * 7800 / H + 3.0)
    # used: 16 GPUs x 2 h + 1 GPU x 10,500 s
    assert r.gpu_hours_used == pytest.approx(32 + 10500 / H)
    assert r.avg_jct_s == pytest.approx(BOOT + 2 * H)  # boot, then its run time
    # the replica's target is not met while its node boots: 10,500 / 10,800
    assert r.slo_attainment == pytest.approx(10500 / 10800)
    assert (r.nodes_paid, r.peak_nodes) == (3, 3)


@pytest.mark.parametrize(
    ("until_s", "idle_s", "served", "released"),
    [
        (3600.0, 300.0, (300.0, 3600.0), 3900.0),  # work ends at 3,600: released 300 s later
        (3600.0, 0.0, (300.0, 3600.0), 3600.0),  # no timer: released when the work ends
        (100.0, 300.0, None, 600.0),  # unwanted before its node is up: 300 s after it is up
    ],
    ids=["timer", "no-timer", "unwanted-while-booting"],
)
def test_the_idle_timer_starts_when_the_node_is_up_and_idle(
    until_s: float, idle_s: float, served: tuple[float, float] | None, released: float
) -> None:
    work = build([], [CHAT], window_s=H)
    work = replace(work, demands=(replace(work.demands[0], until_s=until_s),))
    out = cost.idle_timer_fleet(work, OFFERS, boot_s=BOOT, idle_s=idle_s)
    assert [(b.start_s, b.end_s) for b in out.bills] == [(0.0, released)]
    assert [(s.start_s, s.end_s) for s in out.served] == ([served] if served else [])


def test_gpuctl_fleet_releases_on_completion() -> None:
    work = gang_and_chat()
    out = cost.gpuctl_fleet(work, OFFERS, POLICY, boot_s=BOOT, idle_grace_s=300.0)
    r = cost.report(cost.GPUCTL, work, out)
    # At 0 the core leases 2 x h100x8-ib for the gang (the cheapest with a fabric) and one
    # l40s for the replica (the best HBM per dollar meeting 640 GB/s: 640/$1 against 640/$2
    # and 640/$12). Both are up at 300 s. The gang ends at 7,500 s and its nodes are given
    # back at once (no queued job fits them): 2 x $16 x 7,500/3,600 = $66.667. The l40s
    # serves to the window's end: $3.
    assert sorted((b.sku, b.start_s, b.end_s) for b in out.bills) == [
        ("h100x8-ib", 0.0, 7500.0),
        ("h100x8-ib", 0.0, 7500.0),
        ("l40s", 0.0, 3 * H),
    ]
    assert r.dollars == pytest.approx(2 * 16 * 7500 / H + 3.0)
    assert r.gpu_hours_paid == pytest.approx(16 * 7500 / H + 3.0)
    assert r.gpu_hours_used == pytest.approx(32 + 10500 / H)
    assert r.avg_jct_s == pytest.approx(BOOT + 2 * H)
    assert r.slo_attainment == pytest.approx(10500 / 10800)
    assert r.cycles > 0


def test_gpuctl_fleet_places_on_free_gpus_of_a_leased_node() -> None:
    # a: 6 GPUs with NVLink -> one h100x8 ($12, the cheapest with 6 GPUs and NVLink), leased
    # at 0, running 300..3,900 s. b: one GPU at 600 s fits the 2 GPUs a leaves free: placed
    # there at once (no lease, no boot) and runs to 4,200 s, so the node is kept until then.
    work = build([training("a", 1, 6, 0.0, H), training("b", 1, 1, 600.0, H)], [], window_s=4 * H)
    out = cost.gpuctl_fleet(work, OFFERS, POLICY, boot_s=BOOT, idle_grace_s=0.0)
    assert [(b.sku, b.start_s, b.end_s) for b in out.bills] == [("h100x8", 0.0, 4200.0)]
    r = cost.report(cost.GPUCTL, work, out)
    assert r.dollars == pytest.approx(12 * 4200 / H)  # $14
    assert r.avg_jct_s == pytest.approx((BOOT + H + H) / 2)  # a waited for a boot, b did not
    # (b) launches an h100x8 for a (0..4,200 with its timer) and an h100x1 for b (600 s to
    # 600 + 300 + 3,600 + 300 = 4,800 s): $12 x 4,200/3,600 + $2 x 4,200/3,600 = $16.333
    b = cost.idle_timer_fleet(work, OFFERS, boot_s=BOOT, idle_s=300.0)
    assert cost.report(cost.IDLE_TIMER, work, b).dollars == pytest.approx(14 * 4200 / H)


@pytest.mark.parametrize("warm", [0, 1])
def test_a_warm_node_spares_the_next_job_a_boot(warm: int) -> None:
    # a: 1 GPU for an hour from 0 -> an h100x1 ($2, the cheapest with a GPU of its kind),
    # running 300..3,900 s. b, alike, comes at 7,200 s. Without a warm pool the node goes back
    # at 3,900 s and b waits out a new one's boot; with one warm node b starts at once on it.
    work = build([training("a", 1, 1, 0.0, H), training("b", 1, 1, 2 * H, H)], [], window_s=4 * H)
    out = cost.gpuctl_fleet(work, OFFERS, POLICY, boot_s=BOOT, idle_grace_s=300.0, warm_nodes=warm)
    r = cost.report(cost.GPUCTL, work, out)
    if warm:
        # One node from 0 to b's end (10,800 s): $2 x 3 h.
        assert [(b.sku, b.start_s) for b in out.bills] == [("h100x1", 0.0)]
        assert r.avg_jct_s == pytest.approx((BOOT + H + H) / 2)
        assert r.dollars == pytest.approx(2 * 3.0)
    else:
        # 0..3,900 s, then 7,200..11,100 s: $2 x 7,800/3,600.
        assert [(b.sku, b.start_s, b.end_s) for b in out.bills] == [
            ("h100x1", 0.0, BOOT + H),
            ("h100x1", 2 * H, 2 * H + BOOT + H),
        ]
        assert r.avg_jct_s == pytest.approx(BOOT + H)
        assert r.dollars == pytest.approx(2 * 7800 / H)


def test_single_shape_fleet() -> None:
    work = gang_and_chat()
    # peak: 16 GPUs of the gang + 1 of the replica = 17 -> 3 nodes of 8
    assert cost.peak_gpus(work) == 17
    out, nodes = cost.single_shape_fleet(work, H100_IB, 0, POLICY)
    r = cost.report(cost.SINGLE_SHAPE, work, out)
    assert nodes == 3
    # 3 nodes x $16 x the 3 h window = $144; 24 GPUs x 3 h = 72 GPU-hours paid
    assert r.dollars == pytest.approx(144.0)
    assert r.gpu_hours_paid == pytest.approx(72.0)
    # nothing boots: 16 GPUs x 2 h + the replica's GPU for 3 h
    assert r.gpu_hours_used == pytest.approx(35.0)
    assert r.avg_jct_s == pytest.approx(2 * H)
    assert r.slo_attainment == 1.0


def test_floor_dollars() -> None:
    # the gang at $16/8 = $2 a GPU (the only offer with a fabric) x 16 GPUs x 2 h = $64; the
    # replica at the l40s's $1 a GPU x 3 h = $3
    assert cost.floor_dollars(gang_and_chat(), OFFERS) == pytest.approx(67.0)


def test_dollars_count_inside_the_window_only() -> None:
    # a job of 10 h in a 1 h window: each fleet pays for the first hour only, and the job
    # still runs to completion (its JCT counts)
    work = build([training("long", 1, 1, 0.0, 10 * H)], [], window_s=H)
    r = cost.report(
        cost.IDLE_TIMER, work, cost.idle_timer_fleet(work, OFFERS, boot_s=BOOT, idle_s=300.0)
    )
    assert r.dollars == pytest.approx(2.0)  # h100x1 at $2 x 1 h
    assert r.gpu_hours_used == pytest.approx((H - BOOT) / H)
    assert r.avg_jct_s == pytest.approx(BOOT + 10 * H)


# -- SLO attainment ------------------------------------------------------------------------------


def test_tokens_per_s() -> None:
    assert tokens_per_s(16, 864, 1) == 54  # an L40S: 864 GB/s / 16 GB
    assert tokens_per_s(140, 2039, 2) == pytest.approx(29.129, abs=1e-3)  # 2 x A100 80GB


@pytest.mark.parametrize(
    ("served", "expected"),
    [
        # A on an L40S (54 tokens/s) from 50 s, B on an H100 (209.4) from 0 to 100 s: 80 wanted
        # before 100 s, 40 after; always met
        ([("a", 50.0, 200.0, 54.0), ("b", 0.0, 100.0, 209.375)], 1.0),
        # B never placed: 0 < 80 on [0, 50), 54 < 80 on [50, 100), 54 >= 40 on [100, 200)
        ([("a", 50.0, 200.0, 54.0)], 0.5),
        # A never placed, B's H100 carries both until 100 s (209 >= 80), nothing after
        ([("b", 0.0, 100.0, 209.375)], 0.5),
    ],
    ids=["met", "one-missing", "a-faster-replica-covers"],
)
def test_slo_attainment(served: list[tuple[str, float, float, float]], expected: float) -> None:
    svc = replace(CHAT, max_replicas=2)
    work = build([], [svc], window_s=200.0)
    a = replace(work.demands[0], until_s=200.0)
    b = replace(work.demands[0], id=2, until_s=100.0)
    work = replace(work, demands=(a, b))
    ids = {"a": 1, "b": 2}
    runs = [
        Served(demand_id=ids[k], start_s=s, end_s=e, gpus=1, tokens_per_s=t)
        for k, s, e, t in served
    ]
    assert cost.slo_attainment(work, runs) == {"chat": pytest.approx(expected)}


# -- targets and the command --------------------------------------------------------------------


def _report(fleet: str, dollars: float, jct: float, slo: float) -> cost.FleetReport:
    return cost.FleetReport(
        fleet=fleet, dollars=dollars, gpu_hours_paid=1, gpu_hours_used=1, avg_jct_s=jct,
        p50_jct_s=jct, completed=1, training_jobs=1, slo_attainment=slo,
    )  # fmt: skip


def test_targets() -> None:
    a = _report(cost.SINGLE_SHAPE, 100.0, 10.0, 1.0)
    b = _report(cost.IDLE_TIMER, 70.0, 10.0, 0.9)
    k = _report(cost.KARPENTER, 80.0, 12.0, 0.85)
    c = _report(cost.GPUCTL, 59.5, 10.5, 0.9)
    # against the cheaper, faster and better of (b) and (b'): here (b) each time.
    # 59.5 / 100 = 0.595 <= 0.6; 59.5 / 70 = 0.85 <= 0.85; 10.5 / 10 = 1.05; 0.9 >= 0.9
    found = cost.targets(a, b, k, c)
    assert [(t.value, t.met) for t in found] == [
        (pytest.approx(0.595), True),
        (pytest.approx(0.85), True),
        (pytest.approx(1.05), True),
        (pytest.approx(0.0), True),
    ]
    assert [t.name for t in found][1:] == [
        "dollars gpuctl / idle_timer",
        "avg JCT gpuctl / idle_timer",
        "SLO attainment gpuctl - idle_timer",
    ]
    worse = replace(c, dollars=61.0, avg_jct_s=10.6, slo_attainment=0.8)
    assert [t.met for t in cost.targets(a, b, k, worse)] == [False, False, False, False]
    # a Karpenter fleet cheaper and better than (b) is what (c) is held to
    k = replace(k, dollars=60.0, slo_attainment=0.95)
    assert [(t.name, t.met) for t in cost.targets(a, b, k, c)][1::2] == [
        ("dollars gpuctl / karpenter", False),  # 59.5 / 60 = 0.99
        ("SLO attainment gpuctl - karpenter", False),  # 0.9 < 0.95
    ]


# -- (b') Karpenter, by hand ------------------------------------------------------------------


def test_karpenter_packs_a_batch_onto_the_model_teams_name_and_consolidates_empty_nodes() -> None:
    from gpuctl.sim.karpenter import BATCH_IDLE_S, karpenter_fleet

    work = gang_and_chat()
    out = karpenter_fleet(work, OFFERS, boot_s=BOOT, consolidate_after_s=300.0)
    # One batch at 0, closed 1 s after its last pod (t = 1): the gang's two 8-GPU pods and the
    # chat replica's pod, all naming the H100 (the model the team trains on), most GPUs first.
    # Each gang pod opens an h100x8-ib (the only H100 with a fabric); the replica's 1-GPU pod
    # then opens the H100 type with the least $ per GPU it can fill: h100x1 at $2 (h100x8 at
    # $12 / 1 GPU to fill = $12). Up at 301 s; the gang runs 301 .. 7,501 s.
    assert sorted(b.sku for b in out.bills) == ["h100x1", "h100x8-ib", "h100x8-ib"]
    assert out.ended[work.training[0].id] == pytest.approx(BATCH_IDLE_S + BOOT + 2 * H)
    gang_nodes = [b for b in out.bills if b.sku == "h100x8-ib"]
    # empty from 7,501 s, deleted 300 s later
    assert [b.end_s for b in gang_nodes] == [pytest.approx(7801.0)] * 2
    (replica,) = [s for s in out.served if s.tokens_per_s]
    assert replica.start_s == pytest.approx(301.0)
    assert replica.tokens_per_s == pytest.approx(3350 / 16)  # on an H100, not an L40S
    r = cost.report(cost.KARPENTER, work, out)
    # 2 x $16 x (7,801 - 1) / 3,600 + $2 x (10,800 - 1) / 3,600
    assert r.dollars == pytest.approx(2 * 16 * 7800 / H + 2 * 10799 / H)


def test_karpenter_binds_a_gangs_pods_one_by_one_as_room_appears() -> None:
    from gpuctl.sim.karpenter import karpenter_fleet

    # Two 2 x 8 gangs: the first takes both nodes of its batch; the second arrives at 1 h and
    # gets nodes of its own (nothing frees before 2 h), so it starts at 1 h + 1 s + boot.
    work = build([training("g1", 2, 8, 0.0, 2 * H), training("g2", 2, 8, H, H)], [], window_s=4 * H)
    out = karpenter_fleet(work, OFFERS, boot_s=BOOT, consolidate_after_s=300.0)
    g1, g2 = work.training
    assert out.ended[g1.id] == pytest.approx(1 + BOOT + 2 * H)
    assert out.ended[g2.id] == pytest.approx(H + 1 + BOOT + H)
    assert len(out.bills) == 4


needs_shared = pytest.mark.skipif(
    not (DEFAULT_TRACE.is_file() and DEFAULT_CATALOG.is_file()),
    reason="needs ../shared/traces/gavel and config/catalog.csv",
)


@needs_shared
def test_the_bare_command_on_a_tiny_window(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    result = CliRunner().invoke(
        simulate, ["cost", "--hours", "6", "--limit", "4", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "single_shape" in result.output and "dollars gpuctl / idle_timer" in result.output
    figures = json.loads(out.read_text())
    assert set(figures["fleets"]) == {"single_shape", "idle_timer", "karpenter", "gpuctl"}
    for fleet in figures["fleets"].values():
        assert {"dollars", "gpu_hours_paid", "gpu_hours_used", "avg_jct_s", "slo_attainment"} <= (
            set(fleet)
        )
        assert fleet["dollars"] > 0 and 0 <= fleet["slo_attainment"] <= 1
    assert figures["workload"]["training_jobs"] == 4
    assert [s["name"] for s in figures["workload"]["services"]] == [
        s.name for s in DEFAULT_SERVICES
    ]


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "none.trace"
    result = CliRunner().invoke(cost_command, ["--trace", str(missing)])
    assert result.exit_code != 0 and "--trace" in result.output
    result = CliRunner().invoke(cost_command, ["--policy", "nope"])
    assert result.exit_code != 0 and "--policy" in result.output


@pytest.mark.parametrize("grace", [0.0, 1800.0])
def test_a_service_grace_spares_a_scale_up_a_boot(grace: float) -> None:
    # CHAT wants 1, 2, 1, 2 replicas, 15 minutes each. Replica 2 comes at 900 s: an l40s is
    # leased for it ($1/h) and serves from 1,200 s. At 1,800 s the service scales down. With
    # no service grace that node goes back at once, and replica 2's return at 2,700 s waits
    # out another boot, to 3,000 s. With one, the node is kept for the service (its replica 1
    # still runs) and replica 2 starts on it at once.
    svc = replace(CHAT, min_replicas=1, max_replicas=2, curve=(1, 2, 1, 2), curve_step_s=900.0)
    work = build([], [svc], window_s=3600.0, step_s=900.0)
    out = cost.gpuctl_fleet(
        work, OFFERS, POLICY, boot_s=BOOT, idle_grace_s=300.0, service_grace_s=grace
    )
    served = sorted((s.start_s, s.end_s) for s in out.served)
    bills = sorted((b.start_s, b.end_s) for b in out.bills)
    r = cost.report(cost.GPUCTL, work, out)
    if grace:
        assert served == [(300.0, 3600.0), (1200.0, 1800.0), (2700.0, 3600.0)]
        assert bills == [(0.0, 3600.0), (900.0, 3600.0)]
        # Short of the target while replica 1 boots (0..300) and replica 2 boots (900..1,200).
        assert r.slo_attainment == pytest.approx(1 - 600 / 3600)
    else:
        assert served == [(300.0, 3600.0), (1200.0, 1800.0), (3000.0, 3600.0)]
        assert bills == [(0.0, 3600.0), (900.0, 1800.0), (2700.0, 3600.0)]
        assert r.slo_attainment == pytest.approx(1 - 900 / 3600)


def test_the_simulators_lease_defaults_are_gpuctlds() -> None:
    from gpuctl.runtime.config import DaemonConfig
    from gpuctl.runtime.leases import LeaseSettings

    config, settings = DaemonConfig(), LeaseSettings()
    assert cost.DEFAULT_IDLE_GRACE_S == config.lease_idle_grace_s == settings.idle_grace_s
    assert cost.DEFAULT_SERVICE_GRACE_S == config.lease_service_grace_s == settings.service_grace_s


@pytest.mark.parametrize("headroom", [0, 1])
def test_service_headroom_leases_ahead_so_a_scale_up_starts_at_once(headroom: int) -> None:
    # CHAT wants 1 replica, then 2 from 900 s. Replica 1's l40s ($1/h) is up at 300 s. With a
    # headroom of 1, the cycle that starts replica 1 leases another l40s for the service (up
    # at 600 s); replica 2 starts on it at 900 s, and the next headroom is leased then. With
    # none, replica 2 waits out a boot to 1,200 s.
    svc = replace(CHAT, min_replicas=1, max_replicas=2, curve=(1, 2), curve_step_s=900.0)
    work = build([], [svc], window_s=1800.0, step_s=900.0)
    out = cost.gpuctl_fleet(
        work, OFFERS, POLICY, boot_s=BOOT, idle_grace_s=300.0, service_headroom=headroom
    )
    served = sorted((s.start_s, s.end_s) for s in out.served)
    bills = sorted((b.start_s, b.end_s) for b in out.bills)
    r = cost.report(cost.GPUCTL, work, out)
    if headroom:
        assert served == [(300.0, 1800.0), (900.0, 1800.0)]
        assert bills == [(0.0, 1800.0), (300.0, 1800.0), (900.0, 1800.0)]
        assert r.slo_attainment == pytest.approx(1 - 300 / 1800)  # replica 1's boot alone
    else:
        assert served == [(300.0, 1800.0), (1200.0, 1800.0)]
        assert bills == [(0.0, 1800.0), (900.0, 1800.0)]
        assert r.slo_attainment == pytest.approx(1 - 600 / 1800)
