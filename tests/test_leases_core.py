"""The pure core's lease phase: which offer a waiting job gets (a gang: the cheapest SKU that
meets its floors, on one fabric; replicas: the best HBM GB/s per dollar that fits), budgets,
lease expiry as a placement constraint, and which leases are given back.

Prices are per node and hour; the expected arithmetic is in the comments.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuctl.core import schedule
from gpuctl.core.errors import IllegalTransition
from gpuctl.core.leasing import Budget, LeaseBlocks, Leasing, Offer, Spend
from gpuctl.core.lifecycle import LEASE_TRANSITIONS, LeaseEvent, next_lease_state
from gpuctl.core.model import (
    BandwidthProfile,
    Gpu,
    Job,
    JobKind,
    JobSpec,
    JobState,
    LeaseState,
    NetKind,
    Network,
    Node,
    NodeLease,
    Placement,
    RankPlacement,
)
from gpuctl.core.plugins import build_policy
from gpuctl.core.snapshot import Snapshot

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
POLICY = build_policy("default")
FIFO = build_policy("fifo")

# -- offers: datasheet HBM / NVLink / memory, plausible list prices ----------------------------

H100_IB = Offer(
    provider="cloud", sku="h100-ib", gpu_model="H100 SXM", gpu_count=8, gpu_memory_mib=81920,
    hbm_gbps=3350, nvlink_gbps=900, network_gbps=3200, price_per_hour=30.0,
)  # fmt: skip
H100_IB_CHEAP = replace(H100_IB, provider="neo", sku="h100-ib-neo", price_per_hour=25.0)
H100_NO_NET = replace(H100_IB, sku="h100-solo", network_gbps=0, price_per_hour=10.0)
A100_IB = Offer(
    provider="cloud", sku="a100-ib", gpu_model="A100 80GB SXM", gpu_count=8, gpu_memory_mib=81920,
    hbm_gbps=2039, nvlink_gbps=600, network_gbps=1600, price_per_hour=15.0,
)  # fmt: skip
H100_X4 = replace(H100_IB, sku="h100-x4", gpu_count=4, price_per_hour=8.0)
L40S_1 = Offer(
    provider="cloud", sku="l40s-1", gpu_model="L40S", gpu_count=1, gpu_memory_mib=46068,
    hbm_gbps=864, price_per_hour=1.0,
)  # fmt: skip
L4_1 = Offer(
    provider="cloud", sku="l4-1", gpu_model="L4", gpu_count=1, gpu_memory_mib=23034,
    hbm_gbps=300, price_per_hour=0.8,
)  # fmt: skip
H100_8_PLAIN = replace(H100_IB, sku="h100-8", network_gbps=0, price_per_hour=24.0)

TRAINING_OFFERS = (H100_IB, H100_IB_CHEAP, H100_NO_NET, A100_IB, H100_X4)
INFERENCE_OFFERS = (H100_8_PLAIN, L40S_1, L4_1)


def gang(job_id: int = 1, nodes: int = 2, gpus: int = 8, **kw) -> Job:
    spec = JobSpec(
        kind=JobKind.TRAINING, command=("train",), num_nodes=nodes, gpus_per_node=gpus, **kw
    )
    return Job(
        id=job_id, spec=spec, created_at=NOW - timedelta(hours=1) + timedelta(seconds=job_id)
    )


def service(job_id: int = 1, replicas: int = 1, gpus: int = 1, **kw) -> Job:
    spec = JobSpec(
        kind=JobKind.INFERENCE, command=("serve",), replicas=replicas, gpus_per_node=gpus, **kw
    )
    return Job(
        id=job_id, spec=spec, created_at=NOW - timedelta(hours=1) + timedelta(seconds=job_id)
    )


def h100_node(name: str, *, lease_id: str = "", fabric: str = "ib/s1/l1") -> Node:
    gpus = tuple(
        Gpu(index=i, uuid=f"{name}-{i}", model="H100 SXM", memory_mib=81920, hbm_gbps=3350,
            nvlink_gbps=900)
        for i in range(8)
    )  # fmt: skip
    return Node(
        id=name,
        address=name,
        fabric=fabric,
        lease_id=lease_id,
        price_per_hour=30.0,
        profile=BandwidthProfile(
            gpus=gpus, network=Network(kind=NetKind.INFINIBAND, ports=8, gbps_per_port=400)
        ),
    )


def lease(
    lease_id: str,
    node_id: str = "",
    *,
    state: LeaseState = LeaseState.ACTIVE,
    for_job: int | None = None,
    provider: str = "cloud",
    expires_at: datetime | None = None,
) -> NodeLease:
    return NodeLease(
        id=lease_id,
        provider=provider,
        provider_lease_id=f"p-{lease_id}" if state is not LeaseState.REQUESTED else "",
        node_id=node_id,
        sku="h100-ib",
        price_per_hour=30.0,
        acquired_at=NOW - timedelta(hours=1),
        expires_at=expires_at,
        for_job_id=for_job,
        state=state,
    )


def running(job: Job, node_id: str) -> Job:
    placement = Placement(
        ranks=(RankPlacement(rank=0, node_id=node_id, gpu_indices=tuple(range(8))),)
    )
    return replace(job, state=JobState.RUNNING, placement=placement, started_at=NOW)


def cycle(pending, *, nodes=(), busy=(), policy=POLICY, **leasing_kw):  # -> CycleResult
    leasing_kw.setdefault("offers", TRAINING_OFFERS + INFERENCE_OFFERS)
    return schedule(
        Snapshot.build(list(nodes), list(busy)),
        list(pending),
        policy,
        now=NOW,
        leasing=Leasing(**leasing_kw),
    )


def reason(result, job_id: int) -> str:
    return next(u.reason for u in result.unschedulable if u.job_id == job_id)


# -- the lease state table ----------------------------------------------------------------------

S = LeaseState
E = LeaseEvent


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (S.REQUESTED, E.GRANTED, S.REQUESTED),
        (S.REQUESTED, E.REGISTERED, S.ACTIVE),
        (S.REQUESTED, E.FAILED, S.FAILED),
        (S.REQUESTED, E.RELEASE, S.RELEASING),
        (S.ACTIVE, E.RENEWED, S.ACTIVE),
        (S.ACTIVE, E.RELEASE, S.RELEASING),
        (S.ACTIVE, E.EXPIRED, S.EXPIRED),
        (S.RELEASING, E.RELEASED, S.RELEASED),
        (S.RELEASING, E.EXPIRED, S.RELEASED),
    ],
    ids=lambda v: v.value if hasattr(v, "value") else None,
)
def test_lease_transitions(state, event, after):
    assert next_lease_state("l1", state, event) is after


@pytest.mark.parametrize("ended", [S.RELEASED, S.EXPIRED, S.FAILED], ids=str)
def test_an_ended_lease_never_moves_so_it_is_never_released_twice(ended):
    assert LEASE_TRANSITIONS[ended] == {}
    for event in LeaseEvent:
        with pytest.raises(IllegalTransition, match=f"lease l1 is {ended.value}"):
            next_lease_state("l1", ended, event)


def test_an_active_lease_cannot_fail_and_a_requested_one_cannot_be_renewed():
    with pytest.raises(IllegalTransition):
        next_lease_state("l1", S.ACTIVE, E.FAILED)
    with pytest.raises(IllegalTransition):
        next_lease_state("l1", S.REQUESTED, E.RENEWED)


# -- which offer --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "sku", "count", "why"),
    [
        # 2 x 8 GPUs, NVLink >= 900, network >= 1600: a100 (NVLink 600), h100-solo (no network),
        # h100-x4 (4 GPUs) are out; of h100-ib ($30) and h100-ib-neo ($25) the cheaper wins.
        (gang(nodes=2, min_nvlink_gbps=900, min_net_gbps=1600), "h100-ib-neo", 2, "cheapest of 2"),
        # No floors, 2 nodes: still one fabric, so h100-solo ($10, no network) cannot gang; the
        # cheapest that can is h100-x4 ($8), with 4 GPUs: too few for 8 per node; a100 ($15).
        (gang(nodes=2), "a100-ib", 2, "cheapest of 3"),
        # One node needs no fabric: h100-solo at $10 beats a100 at $15.
        (gang(nodes=1), "h100-solo", 1, "cheapest of 4"),
        # 4 GPUs per node: h100-x4 at $8.
        (gang(nodes=3, gpus=4), "h100-x4", 3, "cheapest of 4"),
    ],
    ids=["floors", "one-fabric", "one-node", "four-gpus"],
)
def test_a_gang_leases_an_island_of_the_cheapest_sku_meeting_its_floors(job, sku, count, why):
    result = cycle([job], offers=TRAINING_OFFERS)
    (request,) = result.lease_requests
    assert (request.job_id, request.sku, request.count) == (job.id, sku, count)
    assert request.same_fabric is (job.spec.num_nodes > 1)
    assert why in request.reason
    assert "leasing" in reason(result, job.id)  # said on the job too


@pytest.mark.parametrize(
    ("job", "sku", "count"),
    [
        # 1 replica on 1 GPU with 40 GB: l4 (22.5 GiB) cannot hold it. l40s: 864 GB/s for $1 =
        # 864 per $/h; a whole h100 node for one replica: 3350 / $24 = 140.
        (service(gpu_memory_mib=40_000), "l40s-1", 1),
        # 8 replicas: one h100 node holds them all, 8 x 3350 / $24 = 1117 per $/h; beats
        # 8 l40s nodes, 8 x 864 / $8 = 864, and 8 l4 nodes, 8 x 300 / $6.40 = 375.
        (service(replicas=8), "h100-8", 1),
        # ... unless they only need 800 GB/s each (20 tokens/s x 40 GB): h100 8 x 800 / $24 =
        # 267, l40s 8 x 800 / $8 = 800 — the bandwidth past the floor is worth nothing.
        (service(replicas=8, target_tokens_per_s=20, weights_gb=40), "l40s-1", 8),
        # A floor of 1000 GB/s (25 x 40): only the h100 has it.
        (service(replicas=2, target_tokens_per_s=25, weights_gb=40), "h100-8", 1),
        # 3 replicas of 4 GPUs: h100 holds 2 per node, so 2 nodes; nothing else has 4 GPUs.
        (service(replicas=3, gpus=4), "h100-8", 2),
    ],
    ids=["memory", "many-replicas", "hbm-floor-caps-value", "hbm-floor", "two-per-node"],
)
def test_replicas_lease_the_best_hbm_per_dollar_that_fits(job, sku, count):
    result = cycle([job], offers=INFERENCE_OFFERS)
    (request,) = result.lease_requests
    assert (request.sku, request.count, request.same_fabric) == (sku, count, False)
    assert "HBM per dollar" in request.reason


def test_replicas_lease_only_what_the_leased_nodes_cannot_take():
    # 10 one-GPU replicas, 8 fit on the idle h100 node a: 2 more, best on 2 x l40s.
    result = cycle([service(replicas=10)], nodes=[h100_node("a")], offers=INFERENCE_OFFERS)
    (request,) = result.lease_requests
    assert (request.sku, request.count) == ("l40s-1", 2)


def test_nothing_fits_says_why_per_offer():
    result = cycle([gang(nodes=1, gpus=8, min_nvlink_gbps=2000)], offers=TRAINING_OFFERS)
    assert result.lease_requests == ()
    assert "no offer to lease fits (of 5 offers: 4 NVLink too slow, 1 too few GPUs)" in reason(
        result, 1
    )


def test_an_offer_that_failed_for_the_job_is_skipped_for_the_next_best():
    job = gang(nodes=2, min_net_gbps=1600, min_nvlink_gbps=900)
    result = cycle([job], offers=TRAINING_OFFERS, failed={1: frozenset({("neo", "h100-ib-neo")})})
    (request,) = result.lease_requests
    assert (request.provider, request.sku) == ("cloud", "h100-ib")
    assert "1 offer failed for it lately" in request.reason


def test_a_job_with_leases_on_their_way_asks_for_no_more():
    job = gang(nodes=2)
    inflight = (lease("l1", state=LeaseState.REQUESTED, for_job=1),) * 1
    result = cycle([job], offers=TRAINING_OFFERS, leases=inflight)
    assert result.lease_requests == ()
    assert "waiting for 1 leased node (h100-ib from cloud) to register" in reason(result, 1)


def test_without_leasing_the_cycle_neither_requests_nor_releases():
    result = schedule(Snapshot.build([], []), [gang()], POLICY, now=NOW)
    assert (result.lease_requests, result.lease_releases) == ((), ())


def test_jobs_behind_a_strict_queue_head_get_no_lease():
    # FIFO without backfill: job 1 blocks the queue; a lease for it, none for job 2 behind it.
    result = cycle([gang(1, nodes=2), gang(2, nodes=1)], policy=FIFO, offers=TRAINING_OFFERS)
    assert [r.job_id for r in result.lease_requests] == [1]


# -- budgets ------------------------------------------------------------------------------------


def test_a_job_over_its_queues_hourly_budget_stays_pending_with_that_reason():
    # 2 x h100-ib-neo at $25 = $50/h; the queue holds $20/h already, cap $60/h: $70 > $60.
    job = gang(nodes=2, min_net_gbps=1600, min_nvlink_gbps=900, queue="research")
    result = cycle(
        [job],
        offers=TRAINING_OFFERS,
        budgets={"research": Budget(dollars_per_hour=60)},
        spend={"research": Spend(dollars_per_hour=20)},
    )
    assert result.lease_requests == ()
    assert (
        "over budget: queue research leases $20.00/h of its $60.00/h; 2x h100-ib-neo would "
        "add $50.00/h" in reason(result, job.id)
    )


def test_the_budget_counts_this_cycles_requests_too():
    # Two one-node jobs at $10/h each (h100-solo) against a $15/h cap: the first fits, not both.
    jobs = [gang(1, nodes=1, queue="q"), gang(2, nodes=1, queue="q")]
    result = cycle(jobs, offers=TRAINING_OFFERS, budgets={"q": Budget(dollars_per_hour=15)})
    assert [r.job_id for r in result.lease_requests] == [1]
    assert "over budget" in reason(result, 2)


def test_a_total_budget_counts_the_time_limit():
    # $100 spent of $150; 2 h of h100-solo at $10/h = $20 fits; 6 h = $60 does not.
    budgets = {"q": Budget(dollars=150)}
    spend = {"q": Spend(dollars=100)}
    short = gang(1, nodes=1, queue="q", time_limit_s=2 * 3600)
    long = gang(2, nodes=1, queue="q", time_limit_s=6 * 3600)
    result = cycle([short, long], offers=TRAINING_OFFERS, budgets=budgets, spend=spend)
    assert [r.job_id for r in result.lease_requests] == [1]
    assert "queue q spent $120.00 of its $150.00" in reason(result, 2)  # $100 + job 1's $20


def test_within_budget_a_pricier_best_gives_way_to_a_cheaper_fit():
    # 8 replicas: the h100 node ($24/h) is the best HBM per dollar, but the cap is $10/h:
    # 8 x l40s at $1 = $8/h fits.
    result = cycle(
        [service(replicas=8, queue="web")],
        offers=INFERENCE_OFFERS,
        budgets={"web": Budget(dollars_per_hour=10)},
    )
    (request,) = result.lease_requests
    assert (request.sku, request.count) == ("l40s-1", 8)
    assert "within budget" in request.reason


# -- lease expiry and releasing nodes as placement constraints ---------------------------------


@pytest.mark.parametrize(
    ("time_limit_h", "renewable", "placed"),
    [(0.5, False, True), (2, False, False), (0, False, False), (2, True, True)],
    ids=["fits-the-lease", "outlives-the-lease", "no-limit", "renewable"],
)
def test_a_job_is_not_placed_where_its_time_limit_outlives_the_lease(
    time_limit_h, renewable, placed
):
    node = h100_node("a", lease_id="l1")
    ends = lease("l1", "a", expires_at=NOW + timedelta(hours=1))
    job = gang(nodes=1, time_limit_s=int(time_limit_h * 3600))
    result = cycle(
        [job],
        nodes=[node],
        leases=(ends,),
        offers=(),
        renewable=frozenset({"cloud"}) if renewable else frozenset(),
    )
    assert bool(result.bindings) is placed
    if not placed:
        assert "1:00:00 of lease left and no renewal from cloud" in reason(result, job.id)


def test_a_node_whose_lease_is_being_released_takes_no_new_work():
    result = cycle(
        [gang(nodes=1)],
        nodes=[h100_node("a", lease_id="l1")],
        leases=(lease("l1", "a", state=LeaseState.RELEASING),),
        offers=(),
    )
    assert result.bindings == ()
    assert "lease being released" in reason(result, 1)


def test_a_node_leased_for_a_waiting_job_is_kept_for_it():
    # Job 2 comes first in the queue, but node a was leased for job 3.
    nodes = [h100_node("a", lease_id="l1")]
    leases = (lease("l1", "a", for_job=3),)
    result = cycle([gang(2, nodes=1), gang(3, nodes=1)], nodes=nodes, leases=leases, offers=())
    assert [b.job_id for b in result.bindings] == [3]
    assert "leased for job 3" in reason(result, 2)


# -- thrift: keeping a leased node for a job costs no more than leasing its own ---------------


def small(job_id: int, hours: float) -> Job:
    """One H100 for `hours`: its own lease would be h100-x4 at $8/h (the cheapest that fits)."""
    return gang(job_id, nodes=1, gpus=1, gpu_model="H100 SXM", time_limit_s=int(hours * 3600))


def holding(job: Job, node_id: str, gpus: int) -> Job:
    placement = Placement(
        ranks=(RankPlacement(rank=0, node_id=node_id, gpu_indices=tuple(range(gpus))),)
    )
    return replace(job, state=JobState.RUNNING, placement=placement, started_at=NOW)


def test_a_small_job_leases_its_own_node_rather_than_keep_an_idle_dear_one():
    # Node a ($30/h) is idle; keeping it 2 h for one GPU costs $60, an h100-x4 $16: job 2 leases
    # that, and node a, which no queued job will take, is given back at once.
    result = cycle(
        [small(2, hours=2)],
        nodes=[h100_node("a", lease_id="l1")],
        leases=(lease("l1", "a", for_job=1),),
        idle_grace_s=300,
    )
    assert result.bindings == ()
    assert "node a kept up for it: dearer than its own h100-x4 from cloud at $8.00/h" in reason(
        result, 2
    )
    assert [(r.job_id, r.sku) for r in result.lease_requests] == [(2, "h100-x4")]
    assert [r.node_id for r in result.lease_releases] == ["a"]


@pytest.mark.parametrize(
    ("others_h", "job_h", "placed"),
    [(10, 2, True), (1, 1.2, True), (1, 2, False), (0, 2, False)],
    ids=["others-outlast-it", "a-little-longer", "much-longer", "idle"],
)
def test_a_job_goes_on_a_dear_leased_node_only_where_its_extra_time_costs_less(
    others_h, job_h, placed
):
    # Node a ($30/h) holds job 5 (4 GPUs) for `others_h` more hours. Job 2 would keep it
    # job_h - others_h longer: 1.2 h -> 0.2 h x $30 = $6 <= 1.2 h x $8 = $9.60 of its own lease.
    busy = [holding(small(5, others_h), "a", 4)] if others_h else []
    result = cycle(
        [small(2, hours=job_h)],
        nodes=[h100_node("a", lease_id="l1")],
        busy=busy,
        leases=(lease("l1", "a", for_job=5 if others_h else 1),),
    )
    assert [b.job_id for b in result.bindings] == ([2] if placed else [])


def test_thrift_spares_a_jobs_own_lease_jobs_with_no_offer_and_jobs_with_no_limit_say_why():
    node = h100_node("a", lease_id="l1")
    # Its own lease: used whatever it costs.
    own = cycle([small(2, hours=5)], nodes=[node], leases=(lease("l1", "a", for_job=2),))
    assert [b.job_id for b in own.bindings] == [2]
    # No offer fits: the dear node is all there is.
    none = cycle(
        [small(2, hours=5)], nodes=[node], leases=(lease("l1", "a", for_job=1),), offers=()
    )
    assert [b.job_id for b in none.bindings] == [2]
    # No time limit: it would keep the node for as long as it runs, at more per hour.
    endless = cycle([small(2, hours=0)], nodes=[node], leases=(lease("l1", "a", for_job=1),))
    assert endless.bindings == ()
    assert "node a kept up for it: dearer than its own h100-x4" in reason(endless, 2)


# -- releases -----------------------------------------------------------------------------------


def test_when_its_job_is_done_a_leased_node_is_released_at_once():
    nodes = [h100_node("a", lease_id="l1")]
    result = cycle([], nodes=nodes, leases=(lease("l1", "a", for_job=1),), idle_grace_s=300)
    (release,) = result.lease_releases
    assert (release.lease_id, release.node_id, release.unusable) == ("l1", "a", False)
    assert "no queued job fits node a" in release.reason


def test_a_busy_leased_node_and_a_self_registered_one_are_kept():
    busy = running(gang(5, nodes=1), "a")
    own = replace(lease("l2", "b"), provider_lease_id="")  # registered by itself: not ours
    result = cycle(
        [],
        nodes=[h100_node("a", lease_id="l1"), h100_node("b", lease_id="l2")],
        busy=[busy],
        leases=(lease("l1", "a", for_job=1), own),
    )
    assert result.lease_releases == ()


def test_idle_grace_keeps_a_node_a_queued_job_will_use_then_lets_it_go():
    # Job 2 (2 nodes) cannot start on node a alone, but would use it: kept for 300 s.
    nodes = [h100_node("a", lease_id="l1")]
    leases = (lease("l1", "a", for_job=1),)
    waiting = [gang(2, nodes=2)]
    kept = cycle(
        waiting, nodes=nodes, leases=leases, idle_grace_s=300,
        idle_since={"a": NOW - timedelta(seconds=299)},
    )  # fmt: skip
    assert kept.lease_releases == ()
    assert kept.lease_kept == {"l1": "for job 2, queued (idle grace, 0:00:01 left)"}
    gone = cycle(
        waiting, nodes=nodes, leases=leases, idle_grace_s=300,
        idle_since={"a": NOW - timedelta(seconds=300)},
    )  # fmt: skip
    (release,) = gone.lease_releases
    assert "idle for 0:05:00 (idle grace 0:05:00)" in release.reason


@pytest.mark.parametrize(
    ("warm", "released"),
    [(0, ["l1", "l2", "l3", "l4"]), (1, ["l1", "l2", "l4"]), (2, ["l2", "l4"]), (9, [])],
)
def test_a_warm_pool_keeps_the_cheapest_idle_nodes(warm: int, released: list[str]):
    # Four idle leased nodes nothing waits for, on a, b, c and d at $30, $30, $12 and $40 an
    # hour: the warm pool keeps the cheapest (c's l3), then at one price the first node (a's).
    prices = {"l1": 30.0, "l2": 30.0, "l3": 12.0, "l4": 40.0}
    nodes = [h100_node(n, lease_id=f"l{i}") for i, n in enumerate("abcd", start=1)]
    leases = tuple(
        replace(lease(f"l{i}", n, for_job=i), price_per_hour=prices[f"l{i}"])
        for i, n in enumerate("abcd", start=1)
    )
    result = cycle([], nodes=nodes, leases=leases, warm_nodes=warm)
    assert [r.lease_id for r in result.lease_releases] == released
    kept = sorted(set(prices) - set(released))
    assert result.lease_kept == {x: f"warm pool ({len(kept)} of {warm} kept)" for x in kept}
    assert all("no longer needs it; idle" in r.reason for r in result.lease_releases)


@pytest.mark.parametrize(
    ("owner", "idle_s", "grace_s", "released"),
    [
        (7, 1799, 1800, ""),  # service 7 runs on node b: node a kept for its next scale-up
        (7, 1800, 1800, "service 7 has not scaled back onto it within the service grace"),
        (7, 10, 0, "job 7 no longer needs it; idle"),  # no service grace: as any idle node
        (8, 10, 1800, "job 8 no longer needs it; idle"),  # job 8 is done: nothing to scale
        (9, 10, 1800, "job 9 no longer needs it; idle"),  # service 9 accepts L40S only
    ],
    ids=["within", "past", "no-grace", "done", "does-not-fit"],
)
def test_a_service_grace_keeps_a_node_a_running_service_scaled_down_from(
    owner: int, idle_s: int, grace_s: float, released: str
):
    # Node a was leased for `owner` and is idle since `idle_s` ago; services 7 and 9 run one
    # replica each on node b. Nothing is queued.
    busy = [
        running(service(7, gpus=1), "b"),
        running(service(9, gpus=1, gpu_model="L40S"), "b"),
    ]
    result = cycle(
        [],
        nodes=[h100_node("a", lease_id="l1"), h100_node("b")],
        busy=busy,
        leases=(lease("l1", "a", for_job=owner),),
        idle_since={"a": NOW - timedelta(seconds=idle_s)},
        service_grace_s=grace_s,
    )
    if not released:
        assert result.lease_releases == ()
        assert result.lease_kept == {
            "l1": "for service 7's next scale-up (service grace, 0:00:01 left)"
        }
    else:
        (release,) = result.lease_releases
        assert release.lease_id == "l1"
        assert released in release.reason
        assert result.lease_kept == {}


def test_service_headroom_leases_ahead_keeps_what_it_leased_and_counts_replicas_alike_once():
    # Services 7 and 8 are replicas alike (one service, as an autoscaler submits them), running
    # on node b, which has no room left. Headroom 1: one l40s-1 ($1/h, the best HBM per dollar
    # for a replica with no floor: 864 GB/s per $/h against 375 of the l4 and 112 of the h100).
    alike = [running(service(7, gpus=1), "b"), running(service(8, gpus=1), "b")]
    nodes = [h100_node("b")]
    (request,) = cycle([], nodes=nodes, busy=alike, service_headroom=1).lease_requests
    assert (request.job_id, request.sku, request.count) == (7, "l40s-1", 1)
    assert request.reason.startswith("headroom for service 7 (1 replica more ready): leasing")
    # On its way: kept, and nothing more asked.
    asked = (lease("l1", state=LeaseState.REQUESTED, for_job=7),)
    on_way = cycle([], nodes=nodes, busy=alike, leases=asked, service_headroom=1)
    assert (on_way.lease_requests, on_way.lease_releases) == ((), ())
    assert on_way.lease_kept == {"l1": "headroom for service 7: on its way"}
    # Up and idle: kept as the headroom, however long; a second idle node of the service goes.
    ready = (lease("l1", "a", for_job=7), lease("l2", "c", for_job=8))
    up = cycle(
        [], nodes=[*nodes, h100_node("a", lease_id="l1"), h100_node("c", lease_id="l2")],
        busy=alike, leases=ready, service_headroom=1,
        idle_since={"a": NOW - timedelta(days=1), "c": NOW - timedelta(days=1)},
    )  # fmt: skip
    assert up.lease_requests == ()
    assert up.lease_kept == {"l1": "headroom for service 7 (1 of 1)"}
    assert [r.lease_id for r in up.lease_releases] == ["l2"]
    # Without headroom nothing is asked.
    assert cycle([], nodes=nodes, busy=alike).lease_requests == ()


def test_a_requested_lease_whose_job_no_longer_waits_is_released():
    leases = (lease("l1", state=LeaseState.REQUESTED, for_job=9),)
    (release,) = cycle([], leases=leases).lease_releases
    assert (release.lease_id, release.reason) == ("l1", "job 9 no longer waits for it")


def test_a_gang_keeps_its_first_node_while_the_rest_are_on_their_way():
    nodes = [h100_node("a", lease_id="l1")]
    leases = (
        lease("l1", "a", for_job=1),
        lease("l2", state=LeaseState.REQUESTED, for_job=1),
    )
    result = cycle([gang(1, nodes=2)], nodes=nodes, leases=leases)
    assert result.lease_releases == ()
    assert result.lease_requests == ()


def test_a_node_its_job_cannot_use_is_released_as_unusable():
    # Leased for a job needing NVLink >= 1000: the node that came up has 900.
    nodes = [h100_node("a", lease_id="l1")]
    result = cycle([gang(1, nodes=1, min_nvlink_gbps=1000)], nodes=nodes,
                   leases=(lease("l1", "a", for_job=1),), offers=())  # fmt: skip
    (release,) = result.lease_releases
    assert release.unusable and release.job_id == 1
    assert "job 1 could not use node a" in release.reason


def test_a_job_whose_queue_cannot_afford_its_own_lease_may_use_a_dear_leased_node():
    # Its own h100-x4 would add $8/h to a queue capped at $5/h: the idle $30/h node it is.
    job = replace(small(2, hours=2), spec=replace(small(2, hours=2).spec, queue="lab"))
    result = cycle(
        [job],
        nodes=[h100_node("a", lease_id="l1")],
        leases=(lease("l1", "a", for_job=1),),
        budgets={"lab": Budget(dollars_per_hour=5)},
    )
    assert [b.job_id for b in result.bindings] == [2]


def test_thrift_refuses_exactly_the_nodes_the_cost_rule_names():
    # Many leased nodes at random prices and busy times, jobs with random time limits: the
    # rows refused are those where price x (T - busy) > own $/h x T (no limit: dearer per hour
    # and busy ending), never the job's own lease nor a node whose work has no time limit.
    rng = random.Random(7)
    nodes = [h100_node(f"n{i:03d}", lease_id=f"l{i}") for i in range(200)]
    prices = [rng.choice([4.0, 8.0, 12.0, 30.0]) for _ in nodes]
    busy = [rng.choice([0.0, 600.0, 3600.0, 7200.0, math.inf]) for _ in nodes]
    leases = tuple(
        replace(lease(f"l{i}", n.id, for_job=100 + i % 3), price_per_hour=prices[i])
        for i, n in enumerate(nodes)
    )
    leasing = Leasing(offers=TRAINING_OFFERS, leases=leases)
    blocks = LeaseBlocks(
        leasing, frozenset(), NOW, busy_s={n.id: b for n, b in zip(nodes, busy, strict=True)}
    )
    table = Snapshot.build(nodes, []).table
    for job_id in (1, 100, 101):
        for hours in (0, 0.5, 1, 2, 4, 24):
            job = small(job_id, hours)
            refused = blocks.refused(job, table)
            got = set() if refused is None else {table.ids[r] for r in refused.rows.nonzero()[0]}
            limit = hours * 3600 or math.inf
            want = {
                n.id
                for i, n in enumerate(nodes)
                if prices[i] > 8.0  # its own: h100-x4 at $8/h
                and math.isfinite(busy[i])
                and 100 + i % 3 != job_id
                and (math.isinf(limit) or prices[i] * (limit - busy[i]) > 8.0 * limit)
            }
            assert got == want, (job_id, hours)
