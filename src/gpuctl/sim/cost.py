"""Benchmark B4, the cost of a fleet: one mixed workload on (a) one training-shaped fleet kept
for the whole window, (b) the cheapest matching instance per job with an idle timer before
release (SkyPilot's autostop), (b') a Kubernetes cluster Karpenter provisions
(`sim.karpenter`), (c) gpuctl's core leasing for the work and releasing on completion.
Dollars and GPU-hours are counted inside the window; every job runs to completion.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from gpuctl.core.leasing import Offer, offer_misfit
from gpuctl.core.model import JobKind, JobSpec
from gpuctl.core.plugins import Policy, RankRequest, replica_share
from gpuctl.sim.karpenter import DEFAULT_CONSOLIDATE_AFTER_S, karpenter_fleet
from gpuctl.sim.lease_replay import Bill, Outcome, Served, fixed_fleet, replay, tokens_per_s
from gpuctl.sim.workload import Workload, training_spec

SINGLE_SHAPE, IDLE_TIMER, KARPENTER, GPUCTL = "single_shape", "idle_timer", "karpenter", "gpuctl"
FLEETS = (SINGLE_SHAPE, IDLE_TIMER, KARPENTER, GPUCTL)

DEFAULT_BOOT_S = 300.0  # request to registered, for every leased node of (b) and (c) alike
DEFAULT_IDLE_TIMER_S = 300.0  # SkyPilot's default autostop: 5 idle minutes
DEFAULT_IDLE_GRACE_S = 300.0  # gpuctld's leases.idle_grace_s default (runtime/config.py)
DEFAULT_SERVICE_GRACE_S = 1800.0  # gpuctld's leases.service_grace_s default

# The targets of B4 for (c): dollars against (a) and the cheaper of (b) and (b'), JCT against
# the faster of them.
MAX_COST_VS_SINGLE_SHAPE = 0.60
MAX_COST_VS_IDLE_TIMER = 0.85
MAX_JCT_VS_IDLE_TIMER = 1.05
_EPS = 1e-9
_HOUR = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetReport:
    fleet: str
    dollars: float  # inside the window
    gpu_hours_paid: float  # GPUs of the nodes paid for x hours, inside the window
    gpu_hours_used: float  # GPUs jobs and replicas held x hours, inside the window
    avg_jct_s: float  # training: end - arrival, over the jobs that completed
    p50_jct_s: float
    completed: int  # training jobs that completed (all, unless one never fitted)
    training_jobs: int
    slo_attainment: float  # share of service-time the placed replicas met the target
    slo_by_service: Mapping[str, float] = field(default_factory=dict)
    nodes_paid: int = 0  # leases (or fixed nodes) paid for at some point in the window
    peak_nodes: int = 0
    dollars_by_sku: Mapping[str, float] = field(default_factory=dict)
    cycles: int = 0  # scheduling cycles run (0: the fleet needs no scheduler)

    @property
    def used_share(self) -> float:
        return self.gpu_hours_used / self.gpu_hours_paid if self.gpu_hours_paid > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["slo_by_service"] = dict(self.slo_by_service)
        out["dollars_by_sku"] = dict(self.dollars_by_sku)
        out["used_share"] = self.used_share
        return out


# -- what a fleet paid and did ---------------------------------------------------------------


def _inside(start: float, end: float, window_s: float) -> float:
    return max(0.0, min(end, window_s) - max(start, 0.0))


def paid(bills: Sequence[Bill], window_s: float) -> tuple[float, float]:
    """(dollars, GPU-hours) of `bills` inside [0, window_s]: by the second."""
    dollars = gpu_hours = 0.0
    for b in bills:
        hours = _inside(b.start_s, b.end_s, window_s) / _HOUR
        dollars += b.price_per_hour * hours
        gpu_hours += b.gpus * hours
    return dollars, gpu_hours


def used(served: Sequence[Served], window_s: float) -> float:
    """GPU-hours the work held inside [0, window_s]."""
    return sum(s.gpus * _inside(s.start_s, s.end_s, window_s) for s in served) / _HOUR


def peak_nodes(bills: Sequence[Bill], window_s: float) -> int:
    """The most nodes paid for at once inside the window."""
    steps = sorted(
        step
        for b in bills
        if _inside(b.start_s, b.end_s, window_s) > 0
        for step in ((max(b.start_s, 0.0), 1), (min(b.end_s, window_s), -1))
    )
    peak = now = 0
    for _, change in steps:  # at one instant, a release (-1) sorts before a lease (+1)
        now += change
        peak = max(peak, now)
    return peak


def slo_attainment(workload: Workload, served: Sequence[Served]) -> dict[str, float]:
    """Per service, the share of the window in which the replicas placed deliver what the
    replicas wanted would at their target: sum over placed replicas of HBM GB/s / weights GB
    >= replicas wanted x target tokens/s."""
    demands = {d.id: d for d in workload.demands}
    out = {}
    for service in workload.services:
        # (time, change in tokens/s wanted, change in tokens/s delivered)
        steps: list[tuple[float, float, float]] = []
        for d in workload.replicas:
            if d.service == service.name:
                steps.append((d.arrival_s, service.tokens_per_s, 0.0))
                steps.append((d.until_s, -service.tokens_per_s, 0.0))
        for s in served:
            if demands[s.demand_id].service == service.name:
                steps.append((s.start_s, 0.0, s.tokens_per_s))
                steps.append((s.end_s, 0.0, -s.tokens_per_s))
        steps.sort()
        met = wanted = delivered = 0.0
        t = 0.0
        for when, d_want, d_have in steps:
            when = min(max(when, 0.0), workload.window_s)
            if delivered >= wanted - _EPS:
                met += when - t
            t = when
            wanted += d_want
            delivered += d_have
        if delivered >= wanted - _EPS:
            met += workload.window_s - t
        out[service.name] = met / workload.window_s if workload.window_s > 0 else 1.0
    return out


def report(fleet: str, workload: Workload, outcome: Outcome) -> FleetReport:
    window = workload.window_s
    dollars, gpu_hours_paid = paid(outcome.bills, window)
    by_sku: dict[str, float] = {}
    for b in outcome.bills:
        by_sku[b.sku] = by_sku.get(b.sku, 0.0) + paid((b,), window)[0]
    training = workload.training
    jct = sorted(outcome.ended[d.id] - d.arrival_s for d in training if d.id in outcome.ended)
    slo = slo_attainment(workload, outcome.served)
    return FleetReport(
        fleet=fleet,
        dollars=dollars,
        gpu_hours_paid=gpu_hours_paid,
        gpu_hours_used=used(outcome.served, window),
        avg_jct_s=statistics.fmean(jct) if jct else 0.0,
        p50_jct_s=statistics.median(jct) if jct else 0.0,
        completed=len(jct),
        training_jobs=len(training),
        slo_attainment=statistics.fmean(slo.values()) if slo else 1.0,
        slo_by_service=slo,
        nodes_paid=sum(1 for b in outcome.bills if _inside(b.start_s, b.end_s, window) > 0),
        peak_nodes=peak_nodes(outcome.bills, window),
        dollars_by_sku=dict(sorted(by_sku.items(), key=lambda kv: -kv[1])),
        cycles=outcome.cycles,
    )


# -- (a) one training-shaped fleet -----------------------------------------------------------


def _price_order(o: Offer) -> tuple[object, ...]:
    # Cheapest; then the richer interconnect and compute for the same money (as gang_options).
    return (o.price_per_hour, -o.network_gbps, -o.nvlink_gbps, -o.bf16_tflops, o.provider, o.sku)


def cheapest(spec: JobSpec, offers: Sequence[Offer]) -> Offer | None:
    """The cheapest offer one node (training) or one replica (inference) of `spec` can run on,
    meeting every floor; a gang's nodes must be able to join a fabric."""
    request = RankRequest.of(spec)
    fitting = [
        o
        for o in offers
        if not offer_misfit(spec, request, o)
        and (spec.kind is not JobKind.TRAINING or spec.num_nodes == 1 or o.network_gbps > 0)
    ]
    return min(fitting, key=_price_order, default=None)


def training_shape(offers: Sequence[Offer], gpus_per_node: int = 8) -> Offer | None:
    """(a)'s node: the cheapest offer meeting the training floors of a gang of full nodes."""
    spec = training_spec(
        JobSpec(kind=JobKind.TRAINING, command=("train",), num_nodes=2, gpus_per_node=gpus_per_node)
    )
    return cheapest(spec, offers)


def peak_gpus(workload: Workload) -> float:
    """The most GPUs the workload holds at once inside the window if everything starts the
    moment it arrives (training for its run time, replicas while wanted)."""
    steps: list[tuple[float, float]] = []
    for d in workload.demands:
        end = d.arrival_s + d.duration_s if d.training else d.until_s
        start, end = d.arrival_s, min(end, workload.window_s)
        if end > start:
            steps += [(start, d.gpus), (end, -d.gpus)]
    steps.sort()  # at one instant, what ends frees its GPUs first
    peak = now = 0.0
    for _, change in steps:
        now += change
        peak = max(peak, now)
    return peak


def single_shape_fleet(
    workload: Workload, offer: Offer, nodes: int, policy: Policy
) -> tuple[Outcome, int]:
    """(a): `nodes` of `offer` up for the whole window (0: as many as the peak needs), every job
    and replica placed on them by the core. Returns the outcome and the node count."""
    count = nodes or max(1, math.ceil(peak_gpus(workload) / offer.gpu_count))
    return replay(workload, policy, nodes=fixed_fleet(offer, count)), count


def floor_dollars(workload: Workload, offers: Sequence[Offer]) -> float:
    """The least any fleet could pay inside the window: every demand on the lowest price per GPU
    among the offers meeting its floors, from the moment it arrives for as long as it runs (or
    is wanted), no boot, no GPU ever idle. A target below it cannot be met by placement."""
    total = 0.0
    memo: dict[JobSpec, float] = {}
    for d in workload.demands:
        key = replace(d.spec, name="", command=())
        if key not in memo:
            request = RankRequest.of(d.spec)
            per_gpu = [
                o.price_per_hour / o.gpu_count
                for o in offers
                if o.gpu_count
                and not offer_misfit(d.spec, request, o)
                and (not d.training or d.spec.num_nodes == 1 or o.network_gbps > 0)
            ]
            memo[key] = min(per_gpu, default=0.0)
        end = d.arrival_s + d.duration_s if d.training else d.until_s
        total += memo[key] * d.gpus * _inside(d.arrival_s, end, workload.window_s) / _HOUR
    return total


# -- (b) cheapest instance per job, idle timer -----------------------------------------------


def idle_timer_fleet(
    workload: Workload, offers: Sequence[Offer], *, boot_s: float, idle_s: float
) -> Outcome:
    """(b): each job launches its own nodes when it arrives: a gang N nodes of the cheapest
    offer meeting its floors, a replica one node of the cheapest offer meeting its floors. They
    are up `boot_s` later, the work runs at once, and each node is released `idle_s` after its
    work ends (a replica no longer wanted before its node is up: `idle_s` after it is up)."""
    bills: list[Bill] = []
    served: list[Served] = []
    ended: dict[int, float] = {}
    memo: dict[JobSpec, Offer | None] = {}
    for d in workload.demands:
        key = replace(d.spec, name="", command=())
        if key not in memo:
            memo[key] = cheapest(d.spec, offers)
        offer = memo[key]
        if offer is None:
            continue  # nothing matches: it never runs
        ready = d.arrival_s + boot_s
        if d.training:
            end = ready + d.duration_s
            served.append(Served(demand_id=d.id, start_s=ready, end_s=end, gpus=d.gpus))
            ended[d.id] = end
            release = end + idle_s
            count = d.spec.num_nodes
        else:
            if ready < d.until_s:
                share = replica_share(RankRequest.of(d.spec))
                rate = tokens_per_s(d.spec.weights_gb, offer.hbm_gbps, share)
                served.append(
                    Served(
                        demand_id=d.id,
                        start_s=ready,
                        end_s=d.until_s,
                        gpus=d.gpus,
                        tokens_per_s=rate,
                    )
                )
            release = max(ready, d.until_s) + idle_s
            count = 1
        bills.extend(
            Bill(
                sku=offer.sku,
                gpus=offer.gpu_count,
                price_per_hour=offer.price_per_hour,
                start_s=d.arrival_s,
                end_s=release,
            )
            for _ in range(count)
        )
    return Outcome(bills=tuple(bills), served=tuple(served), ended=ended)


# -- (c) gpuctl --------------------------------------------------------------------------------


def gpuctl_fleet(
    workload: Workload,
    offers: Sequence[Offer],
    policy: Policy,
    *,
    boot_s: float,
    idle_grace_s: float,
    warm_nodes: int = 0,
    service_grace_s: float = 0.0,
    service_headroom: int = 0,
) -> Outcome:
    """(c): the core places on leased nodes, asks for leases for what waits, gives back what
    nothing uses (with its idle grace for nodes a queued job fits, its service grace for nodes
    a running service scaled down from, its warm pool), and leases the services' headroom."""
    return replay(
        workload,
        policy,
        offers=offers,
        boot_s=boot_s,
        idle_grace_s=idle_grace_s,
        warm_nodes=warm_nodes,
        service_grace_s=service_grace_s,
        service_headroom=service_headroom,
    )


# -- the comparison ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str
    value: float
    limit: float
    met: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def targets(a: FleetReport, b: FleetReport, b2: FleetReport, c: FleetReport) -> tuple[Target, ...]:
    """B4: (c) costs <= 0.6 x (a) and <= 0.85 x the cheaper of (b) and (b'), its average JCT
    is within 5 % of the faster of them, and its SLO attainment is no worse than the better."""

    def ratio(x: float, y: float) -> float:
        return x / y if y > 0 else math.inf

    cheaper = min((b, b2), key=lambda r: r.dollars)
    faster = min((b, b2), key=lambda r: (r.avg_jct_s, -r.completed))
    better = max((b, b2), key=lambda r: r.slo_attainment)
    cost_a = ratio(c.dollars, a.dollars)
    cost_b = ratio(c.dollars, cheaper.dollars)
    # no training in the workload: no JCT to compare
    jct = ratio(c.avg_jct_s, faster.avg_jct_s) if c.training_jobs else 1.0
    return (
        Target(
            name="dollars gpuctl / single_shape",
            value=cost_a,
            limit=MAX_COST_VS_SINGLE_SHAPE,
            met=cost_a <= MAX_COST_VS_SINGLE_SHAPE,
        ),
        Target(
            name=f"dollars gpuctl / {cheaper.fleet}",
            value=cost_b,
            limit=MAX_COST_VS_IDLE_TIMER,
            met=cost_b <= MAX_COST_VS_IDLE_TIMER,
        ),
        Target(
            name=f"avg JCT gpuctl / {faster.fleet}",
            value=jct,
            limit=MAX_JCT_VS_IDLE_TIMER,
            met=jct <= MAX_JCT_VS_IDLE_TIMER and c.completed >= faster.completed,
        ),
        Target(
            name=f"SLO attainment gpuctl - {better.fleet}",
            value=c.slo_attainment - better.slo_attainment,
            limit=0.0,
            met=c.slo_attainment >= better.slo_attainment - _EPS,
        ),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    reports: tuple[FleetReport, ...]  # in FLEETS order
    targets: tuple[Target, ...]
    fleet_sku: str  # (a)'s node
    fleet_nodes: int
    floor_dollars: float  # `floor_dollars`: what no fleet can beat
    wall_s: Mapping[str, float]  # per fleet

    def as_dict(self) -> dict[str, object]:
        return {
            "fleets": {
                r.fleet: {**r.as_dict(), "wall_s": round(self.wall_s[r.fleet], 3)}
                for r in self.reports
            },
            "targets": [t.as_dict() for t in self.targets],
            "single_shape_fleet": {"sku": self.fleet_sku, "nodes": self.fleet_nodes},
            "floor_dollars": self.floor_dollars,
        }


def compare(
    workload: Workload,
    offers: Sequence[Offer],
    policy: Policy,
    *,
    boot_s: float = DEFAULT_BOOT_S,
    idle_timer_s: float = DEFAULT_IDLE_TIMER_S,
    idle_grace_s: float = DEFAULT_IDLE_GRACE_S,
    warm_nodes: int = 0,
    service_grace_s: float = DEFAULT_SERVICE_GRACE_S,
    service_headroom: int = 0,
    consolidate_after_s: float = DEFAULT_CONSOLIDATE_AFTER_S,
    fleet_offer: Offer | None = None,
    fleet_nodes: int = 0,
) -> Comparison:
    """The three fleets on `workload` at the prices of `offers`; (a)'s node is `fleet_offer`
    (default: `training_shape`), `fleet_nodes` of them (default: the peak's worth)."""
    shape = fleet_offer or training_shape(offers)
    if shape is None:
        raise ValueError("no offer meets the training floors: (a) has no node to be made of")
    wall: dict[str, float] = {}
    started = time.perf_counter()
    a, count = single_shape_fleet(workload, shape, fleet_nodes, policy)
    wall[SINGLE_SHAPE] = time.perf_counter() - started
    started = time.perf_counter()
    b = idle_timer_fleet(workload, offers, boot_s=boot_s, idle_s=idle_timer_s)
    wall[IDLE_TIMER] = time.perf_counter() - started
    started = time.perf_counter()
    b2 = karpenter_fleet(workload, offers, boot_s=boot_s, consolidate_after_s=consolidate_after_s)
    wall[KARPENTER] = time.perf_counter() - started
    started = time.perf_counter()
    c = gpuctl_fleet(
        workload,
        offers,
        policy,
        boot_s=boot_s,
        idle_grace_s=idle_grace_s,
        warm_nodes=warm_nodes,
        service_grace_s=service_grace_s,
        service_headroom=service_headroom,
    )
    wall[GPUCTL] = time.perf_counter() - started
    reports = (
        report(SINGLE_SHAPE, workload, a),
        report(IDLE_TIMER, workload, b),
        report(KARPENTER, workload, b2),
        report(GPUCTL, workload, c),
    )
    return Comparison(
        reports=reports,
        targets=targets(*reports),
        fleet_sku=shape.sku,
        fleet_nodes=count,
        floor_dollars=floor_dollars(workload, offers),
        wall_s=wall,
    )
