"""Which offer to lease for work the leased nodes cannot take (an island of the cheapest SKU
meeting a gang's floors; the best HBM GB/s per dollar for replicas), and what a queue's
budget allows."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from gpuctl.core.engine.verdicts import shape
from gpuctl.core.leasing.terms import Leasing, Offer, Spend, duration
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, JobSpec
from gpuctl.core.plugins import RankRequest, plural, replica_share

# Offers named in a reason when none fits: enough to see the pattern.
_REASON_WHY = 3


# -- which offer ---------------------------------------------------------------------------


def floors(spec: JobSpec, request: RankRequest) -> str:
    unit = "node" if spec.kind is JobKind.TRAINING else "replica"
    parts = [f"{request.describe()} per {unit}"]
    if spec.gpu_model:
        parts.append(" or ".join(spec.gpu_models))
    if spec.min_nvlink_gbps:
        parts.append(f"NVLink >= {spec.min_nvlink_gbps:g} GB/s")
    if spec.min_net_gbps:
        parts.append(f"network >= {spec.min_net_gbps:g} Gb/s")
    if spec.hbm_floor_gbps:
        parts.append(f"HBM >= {spec.hbm_floor_gbps:g} GB/s")
    return ", ".join(p for p in parts if p)


def offer_misfit(spec: JobSpec, request: RankRequest, offer: Offer) -> str:
    """Why one rank (or replica) of `spec` cannot run on a node of `offer`; "" when it can."""
    gpus = 1 if request.gpu_milli else request.gpus
    if request.milli and not spec.accepts(offer.gpu_model):
        return "another GPU model"
    if gpus > offer.gpu_count:
        return "too few GPUs"
    if (
        request.gpu_memory_mib
        and request.milli
        and offer.gpu_memory_mib * gpus < request.gpu_memory_mib
    ):
        return "too little GPU memory"
    if spec.min_nvlink_gbps > offer.nvlink_gbps:
        return "NVLink too slow"
    if spec.min_net_gbps > offer.network_gbps:
        return "network too slow"
    if spec.kind is JobKind.INFERENCE:
        if spec.weights_gb > 0 and offer.gpu_memory_mib * max(1, gpus) < (
            spec.weights_gb * 1000**3 / 1024**2
        ):
            return "too little GPU memory for the weights"
        if spec.hbm_floor_gbps and offer.hbm_gbps * replica_share(request) < spec.hbm_floor_gbps:
            return "HBM too slow"
    if offer.cpu_milli and request.cpu_milli > offer.cpu_milli:
        return "too few CPUs"
    if offer.memory_mib and request.memory_mib > offer.memory_mib:
        return "too little memory"
    if offer.max_lease_s and not offer.renewable:
        limit = spec.time_limit_s
        if not limit or limit > offer.max_lease_s:
            return "lease too short and not renewable"
    return ""


def _per_node(request: RankRequest, offer: Offer) -> int:
    """Replicas one node of `offer` holds."""
    if request.gpu_milli:
        count = offer.gpu_count * (MILLI_PER_GPU // request.gpu_milli)
    elif request.gpus:
        count = offer.gpu_count // request.gpus
    else:
        count = 1
    if request.cpu_milli and offer.cpu_milli:
        count = min(count, offer.cpu_milli // request.cpu_milli)
    if request.memory_mib and offer.memory_mib:
        count = min(count, offer.memory_mib // request.memory_mib)
    return max(1, count)


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    offer: Offer
    count: int
    why: str  # what made it the choice, for the job's reason

    @property
    def dollars_per_hour(self) -> float:
        return self.count * self.offer.price_per_hour


def _misfits_line(misfits: Sequence[str], total: int) -> str:
    counts: dict[str, int] = {}
    for why in misfits:
        counts[why] = counts.get(why, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_REASON_WHY]
    return f"of {plural(total, 'offer')}: " + ", ".join(f"{n} {why}" for why, n in ordered)


def gang_options(job: Job, offers: Sequence[Offer]) -> tuple[tuple[Option, ...], str]:
    """Offers for a whole gang, cheapest first: `num_nodes` fresh nodes of one SKU that meets
    every floor (and can join one fabric when there is more than one node). The second value
    says why none fits."""
    spec = job.spec
    request = RankRequest.of(spec)
    n = spec.num_nodes
    fitting, misfits = [], []
    for offer in offers:
        why = offer_misfit(spec, request, offer)
        if not why and n > 1 and offer.network_gbps <= 0:
            why = "no network to gang over"
        if why:
            misfits.append(why)
        else:
            fitting.append(offer)
    if not fitting:
        return (), _misfits_line(misfits, len(offers))
    # Cheapest; then the richer interconnect and compute for the same money.
    fitting.sort(
        key=lambda o: (
            o.price_per_hour,
            -o.network_gbps,
            -o.nvlink_gbps,
            -o.bf16_tflops,
            o.provider,
            o.sku,
        )
    )
    where = " on one fabric" if n > 1 else ""
    return tuple(
        Option(
            offer=o,
            count=n,
            why=f"the cheapest of {plural(len(fitting), 'offer')} meeting "
            f"{floors(spec, request)}{where}"
            if i == 0
            else f"next-best of {plural(len(fitting), 'offer')} meeting {floors(spec, request)}",
        )
        for i, o in enumerate(fitting)
    ), ""


def replica_options(
    job: Job, replicas: int, offers: Sequence[Offer]
) -> tuple[tuple[Option, ...], str]:
    """Offers for `replicas` replicas, best HBM GB/s per dollar first: the bandwidth the
    replicas can use (up to the floor their tokens/s target sets) over what the nodes cost,
    counting the part of the last node they leave empty."""
    spec = job.spec
    request = RankRequest.of(spec)
    share = replica_share(request)
    scored: list[tuple[float, float, Offer, int]] = []
    misfits = []
    for offer in offers:
        why = offer_misfit(spec, request, offer)
        if not why and not share:
            why = "CPU-only replicas are not leased for"
        if why:
            misfits.append(why)
            continue
        nodes = math.ceil(replicas / _per_node(request, offer))
        bandwidth = offer.hbm_gbps * share
        useful = min(bandwidth, spec.hbm_floor_gbps) if spec.hbm_floor_gbps else bandwidth
        dollars = nodes * offer.price_per_hour
        value = replicas * useful / dollars if dollars > 0 else math.inf
        scored.append((value, dollars, offer, nodes))
    if not scored:
        return (), _misfits_line(misfits, len(offers))
    scored.sort(key=lambda s: (-s[0], s[1], s[2].provider, s[2].sku))

    def per_dollar(value: float) -> str:
        return "free" if math.isinf(value) else f"{value:.0f} GB/s per $/h"

    return tuple(
        Option(
            offer=o,
            count=nodes,
            why=(
                f"the best HBM per dollar of {plural(len(scored), 'fitting offer')} "
                f"({per_dollar(value)})"
                if i == 0
                else f"next-best HBM per dollar of {plural(len(scored), 'fitting offer')} "
                f"({per_dollar(value)})"
            ),
        )
        for i, (value, _, o, nodes) in enumerate(scored)
    ), ""


# -- budgets ------------------------------------------------------------------------------


class BudgetBook:
    """Each queue's budget, what it spends, and what this cycle's requests add to it."""

    def __init__(self, leasing: Leasing) -> None:
        self.budgets = leasing.budgets
        self.spend = leasing.spend
        self.planned_rate: dict[str, float] = {}
        self.planned_dollars: dict[str, float] = {}

    def over(self, job: Job, option: Option) -> str:
        """Why leasing `option` for `job` would break its queue's budget; "" when it fits."""
        queue = job.spec.queue
        budget = self.budgets.get(queue)
        if budget is None:
            return ""
        spend = self.spend.get(queue, Spend())
        rate = spend.dollars_per_hour + self.planned_rate.get(queue, 0.0)
        if budget.dollars_per_hour and rate + option.dollars_per_hour > budget.dollars_per_hour:
            return (
                f"over budget: queue {queue} leases ${rate:.2f}/h of its "
                f"${budget.dollars_per_hour:.2f}/h; {option.count}x {option.offer.sku} would add "
                f"${option.dollars_per_hour:.2f}/h"
            )
        spent = spend.dollars + self.planned_dollars.get(queue, 0.0)
        hours = job.spec.time_limit_s / 3600
        if budget.dollars and (
            spent >= budget.dollars or spent + option.dollars_per_hour * hours > budget.dollars
        ):
            more = (
                f"; {option.count}x {option.offer.sku} for its {duration(job.spec.time_limit_s)} "
                f"would cost ${option.dollars_per_hour * hours:.2f}"
                if hours and spent < budget.dollars
                else ""
            )
            return (
                f"over budget: queue {queue} spent ${spent:.2f} of its ${budget.dollars:.2f}{more}"
            )
        return ""

    def take(self, job: Job, option: Option) -> None:
        queue = job.spec.queue
        self.planned_rate[queue] = self.planned_rate.get(queue, 0.0) + option.dollars_per_hour
        self.planned_dollars[queue] = self.planned_dollars.get(queue, 0.0) + (
            option.dollars_per_hour * job.spec.time_limit_s / 3600
        )


def offer_key(spec: JobSpec, limits: Sequence[float] = ()) -> tuple[object, ...]:
    """What offers read of `spec`, as a key: its placement shape (`core.engine.verdicts.shape`) and
    its time limit. `limits`: the grant lengths (sorted) of the offers that cannot renew, the
    only ones a time limit matters to: the limit is kept as the least that exceeds the same
    of them."""
    limit = spec.time_limit_s
    if limit:
        below = bisect.bisect_left(limits, limit)
        limit = int(limits[below - 1]) + 1 if below else 1
    return (shape(spec), limit)


def grant_limits(offers: Sequence[Offer]) -> tuple[float, ...]:
    """The grant lengths of the offers that cannot renew, sorted (see `offer_key`)."""
    return tuple(sorted({o.max_lease_s for o in offers if o.max_lease_s and not o.renewable}))
