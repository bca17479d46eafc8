"""Leasing in the pure core: which offer to lease for work the leased nodes cannot take (an
island of the cheapest SKU meeting a gang's floors; the best HBM GB/s per dollar for replicas),
what a queue's budget allows, which nodes a job may not use because of their lease, and which
leases to give back. Offers are plain values: the core never sees a provider.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from gpuctl.core.engine.nodetable import NodeTable
from gpuctl.core.engine.verdicts import shape
from gpuctl.core.model import MILLI_PER_GPU, Job, JobKind, JobSpec, LeaseState, NodeLease
from gpuctl.core.plugins import RankRequest, plural, replica_share
from gpuctl.core.snapshot import NodeView

# Queued jobs looked at when deciding whether an idle leased node is worth its idle grace:
# the next few to start, which is who would take it.
_GRACE_CANDIDATES = 32
# Offers named in a reason when none fits: enough to see the pattern.
_REASON_WHY = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """One SKU a provider can lease, as the core ranks it (the runtime builds these from the
    providers' catalogs)."""

    provider: str  # the configured provider that acquires it
    sku: str
    gpu_model: str = ""
    gpu_count: int = 0
    gpu_memory_mib: int = 0  # per GPU
    hbm_gbps: float = 0.0  # per GPU
    nvlink_gbps: float = 0.0  # per GPU; 0: no NVLink domain
    network_gbps: float = 0.0  # between nodes, per node; 0: it cannot join a fabric
    bf16_tflops: float = 0.0  # per GPU
    cpu_milli: int = 0  # 0: not stated (assumed to fit)
    memory_mib: int = 0  # 0: not stated
    region: str = ""
    price_per_hour: float = 0.0  # the whole node
    max_lease_s: float = 0.0  # how long one grant lasts; 0: unlimited
    renewable: bool = True  # the provider can extend a grant before it ends


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """What a queue may lease: dollars per hour held at once, and dollars in all (0: no cap)."""

    dollars_per_hour: float = 0.0
    dollars: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Spend:
    """What a queue holds now ($/h of its open leases) and has been charged so far."""

    dollars_per_hour: float = 0.0
    dollars: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Leasing:
    """The lease side of a cycle's input; without it (`schedule(..., leasing=None)`) the cycle
    neither requests nor releases leases."""

    offers: tuple[Offer, ...] = ()
    # Every lease not yet ended (requested, active, releasing), managed or self-registered.
    leases: tuple[NodeLease, ...] = ()
    renewable: frozenset[str] = frozenset()  # providers whose leases can be extended
    budgets: Mapping[str, Budget] = field(default_factory=dict)  # by queue
    spend: Mapping[str, Spend] = field(default_factory=dict)  # by queue
    # job -> (provider, sku) that failed it lately: the cycle asks for the next-best instead
    failed: Mapping[int, frozenset[tuple[str, str]]] = field(default_factory=dict)
    idle_since: Mapping[str, datetime] = field(default_factory=dict)  # leased node -> since
    idle_grace_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRequest:
    """Lease `count` nodes of `sku` from `provider` for `job_id` (one fabric for a gang)."""

    job_id: int
    provider: str
    sku: str
    count: int
    price_per_hour: float  # per node
    same_fabric: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRelease:
    """Give lease `lease_id` back. `unusable`: the job it was leased for could not use its
    node, so that offer counts as failed for the job."""

    lease_id: str
    node_id: str = ""
    reason: str = ""
    job_id: int | None = None
    unusable: bool = False


def managed(lease: NodeLease) -> bool:
    """A lease gpuctl asked a provider for (not a node that registered by itself)."""
    return bool(lease.provider_lease_id) or lease.state is LeaseState.REQUESTED


def _hours(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


# -- lease expiry and reserved nodes: what a job may not use ----------------------------------


class LeaseBlocks:
    """Nodes a job may not use because of their lease: it ends before the job's time limit
    and cannot be renewed, it is being released, or it was leased for another waiting job
    (`for_job`: few nodes, by id); or keeping it for the job costs more than leasing the job a
    node of its own (`refused`, thrift: possibly most of a leased fleet, as a row mask).

    Each rule refuses a node from some time limit on, so jobs share the mapping (the same
    rows) of their time limit's place among those thresholds: a cycle over thousands of jobs
    and leases does not look at every pair."""

    def __init__(
        self,
        leasing: Leasing,
        waiting: frozenset[int],
        now: datetime,
        *,
        busy_s: Mapping[str, float] | None = None,
    ) -> None:
        """`busy_s`: per node, the seconds from `now` until the last job on it reaches its time
        limit (inf: a job there has none); a node not in it is idle."""
        self.releasing: set[str] = set()
        self.reserved: dict[str, int] = {}
        ending: list[tuple[float, str, str]] = []  # (seconds left, node, why)
        self.priced: dict[str, tuple[float, float, int | None]] = {}  # node -> ($/h, busy, for)
        self.offers = leasing.offers
        self.limits = _grant_limits(leasing.offers)
        self.failed = leasing.failed
        self.budgets = BudgetBook(leasing)  # what the queues may lease (this cycle's asks aside)
        busy_s = busy_s or {}
        for lease in leasing.leases:
            if not lease.node_id:
                continue
            if lease.state is LeaseState.RELEASING:
                self.releasing.add(lease.node_id)
            elif lease.state is not LeaseState.ACTIVE:
                continue
            if lease.expires_at is not None and lease.provider not in leasing.renewable:
                left = max(0.0, (lease.expires_at - now).total_seconds())
                why = (
                    f"with {_hours(left)} of lease left and no renewal from {lease.provider} "
                    "(its time limit is longer, or it has none)"
                )
                ending.append((left, lease.node_id, why))
            if managed(lease) and lease.for_job_id in waiting:
                self.reserved[lease.node_id] = lease.for_job_id
            if managed(lease) and lease.state is LeaseState.ACTIVE and lease.price_per_hour > 0:
                self.priced[lease.node_id] = (
                    lease.price_per_hour,
                    busy_s.get(lease.node_id, 0.0),
                    lease.for_job_id,
                )
        self.ending = _Prefixes(ending)
        self.owners = {owner for *_, owner in self.priced.values()}
        self.reserved_for = set(self.reserved.values())
        self.own: dict[tuple[object, ...], _Option | None] = {}
        self.alike: dict[tuple[object, ...], dict[str, str]] = {}
        self.columns: tuple[object, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.thresholds: dict[int, tuple[_Option, np.ndarray]] = {}  # id(own) -> per row

    def __bool__(self) -> bool:
        return bool(self.ending or self.releasing or self.reserved or self.priced)

    def for_job(self, job: Job) -> Mapping[str, str]:
        """Node -> why `job` may not use it (the mapping is shared: do not change it)."""
        limit = float(job.spec.time_limit_s) or math.inf
        key = (self.ending.count(limit), job.id if job.id in self.reserved_for else None)
        if key not in self.alike:
            out = {n: f"leased for job {o}" for n, o in self.reserved.items() if o != job.id}
            out.update(self.ending.first(limit))
            out.update((n, "with its lease being released") for n in self.releasing)
            self.alike[key] = out
        return self.alike[key]

    def refused(self, job: Job, table: NodeTable) -> Refused | None:
        """Thrift: the rows of `table` (leased nodes) that placing `job` would keep up past
        their other work at more than its own lease would cost for its time limit T: price x
        (T - busy) > own $/h x T, which holds from T > price x busy / (price - own $/h) on
        (no time limit: always). Never a node leased for the job itself, nor one whose work has
        no time limit; nothing when the job is a gang or it could lease nothing instead (no
        offer fits it, or its queue's budget allows none). None: none refused."""
        if not self.priced or _is_gang(job):
            return None
        own = self._own(job)
        if own is None:
            return None
        owner = self._columns(table)[3]
        threshold = self._thresholds(own, table)
        mask = threshold < (float(job.spec.time_limit_s) or math.inf)
        if job.id in self.owners:
            mask &= owner != job.id
        count = int(mask.sum())
        if not count:
            return None
        why = (
            f"kept up for it: dearer than its own {own.offer.sku} from {own.offer.provider} "
            f"at ${own.dollars_per_hour:.2f}/h"
        )
        key = (id(own), count, job.id if job.id in self.owners else None)
        return Refused(rows=mask, why=why, key=key)

    def _columns(self, table: NodeTable) -> tuple[object, np.ndarray, np.ndarray, np.ndarray]:
        """Per row of `table`: lease price ($/h, 0: none), busy seconds, owner job (-1: none).
        Tables of one cycle share their rows (copies keep them), so this is worked out once."""
        if self.columns is None or self.columns[0] is not table.ids:
            price = np.zeros(len(table))
            busy = np.zeros(len(table))
            owner = np.full(len(table), -1, dtype=np.int64)
            for node_id, (p, b, o) in self.priced.items():
                row = table.pos.get(node_id)
                if row is not None:
                    price[row], busy[row], owner[row] = p, b, -1 if o is None else o
            self.columns = (table.ids, price, busy, owner)
            self.thresholds = {}
        return self.columns

    def _thresholds(self, own: _Option, table: NodeTable) -> np.ndarray:
        """Per row: the time limit past which a job whose own lease is `own` is refused there
        (inf: never)."""
        _, price, busy, _ = self._columns(table)
        hit = self.thresholds.get(id(own))
        if hit is None or hit[0] is not own:
            rate = own.dollars_per_hour
            dearer = (price > rate) & np.isfinite(busy)
            with np.errstate(divide="ignore", invalid="ignore"):
                at = np.where(dearer, price * busy / (price - rate), math.inf)
            hit = self.thresholds[id(own)] = (own, at)
        return hit[1]

    def _own(self, job: Job) -> _Option | None:
        """The node `job` would lease for itself (one replica, or its one node); None when no
        offer fits it or its queue's budget allows none."""
        excluded = self.failed.get(job.id, frozenset())
        queue = job.spec.queue if job.spec.queue in self.budgets.budgets else ""
        key = (_shape(job.spec, self.limits), excluded, queue)
        if key not in self.own:
            offers = [o for o in self.offers if (o.provider, o.sku) not in excluded]
            if job.spec.kind is JobKind.TRAINING:
                options, _ = gang_options(job, offers)
            else:
                options, _ = replica_options(job, 1, offers)
            affordable = (o for o in options if not self.budgets.over(job, o))
            self.own[key] = next(affordable, None)
        return self.own[key]


@dataclass(frozen=True, slots=True)
class Refused:
    """Rows of a node table a job may not use (`LeaseBlocks.refused`), all for one reason;
    `key` tells refusals apart (the same key: the same rows)."""

    rows: np.ndarray  # bool per row
    why: str
    key: tuple[object, ...]


class _Prefixes:
    """Nodes each refused from a threshold on: a job with time limit T (inf: none) is refused
    those whose threshold is below T, a prefix of them sorted by threshold."""

    def __init__(self, entries: Sequence[tuple[float, str, str]]) -> None:
        ordered = sorted(entries)
        self.thresholds = [t for t, _, _ in ordered]
        self.items = [(node_id, why) for _, node_id, why in ordered]

    def __bool__(self) -> bool:
        return bool(self.items)

    def count(self, limit: float) -> int:
        return bisect.bisect_left(self.thresholds, limit)

    def first(self, limit: float) -> dict[str, str]:
        return dict(self.items[: self.count(limit)])


def busy_seconds(jobs: Sequence[Job], now: datetime) -> dict[str, float]:
    """Per node holding work: seconds from `now` until the last job there reaches its time
    limit (inf when one has none); what `LeaseBlocks` weighs the cost of keeping a node by."""
    out: dict[str, float] = {}
    for job in jobs:
        if job.placement is None:
            continue
        limit = job.spec.time_limit_s
        if not limit:
            left = math.inf
        else:
            started = job.started_at or now
            left = max(0.0, limit - (now - started).total_seconds())
        for node_id in job.placement.node_ids:
            out[node_id] = max(out.get(node_id, 0.0), left)
    return out


# -- which offer ---------------------------------------------------------------------------


def floors(spec: JobSpec, request: RankRequest) -> str:
    unit = "node" if spec.kind is JobKind.TRAINING else "replica"
    parts = [f"{request.describe()} per {unit}"]
    if spec.gpu_model:
        parts.append(spec.gpu_model)
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
    if spec.gpu_model and request.milli and spec.gpu_model.casefold() != offer.gpu_model.casefold():
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
class _Option:
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


def gang_options(job: Job, offers: Sequence[Offer]) -> tuple[tuple[_Option, ...], str]:
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
        _Option(
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
) -> tuple[tuple[_Option, ...], str]:
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
        _Option(
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

    def over(self, job: Job, option: _Option) -> str:
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
                f"; {option.count}x {option.offer.sku} for its {_hours(job.spec.time_limit_s)} "
                f"would cost ${option.dollars_per_hour * hours:.2f}"
                if hours and spent < budget.dollars
                else ""
            )
            return (
                f"over budget: queue {queue} spent ${spent:.2f} of its ${budget.dollars:.2f}{more}"
            )
        return ""

    def take(self, job: Job, option: _Option) -> None:
        queue = job.spec.queue
        self.planned_rate[queue] = self.planned_rate.get(queue, 0.0) + option.dollars_per_hour
        self.planned_dollars[queue] = self.planned_dollars.get(queue, 0.0) + (
            option.dollars_per_hour * job.spec.time_limit_s / 3600
        )


# -- the cycle's lease phase ----------------------------------------------------------------


Fits = Callable[[Job, NodeView], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class LeasePlan:
    requests: tuple[LeaseRequest, ...] = ()
    releases: tuple[LeaseRelease, ...] = ()
    notes: Mapping[int, str] = field(default_factory=dict)  # job -> what leasing does for it


def _shape(spec: JobSpec, limits: Sequence[float] = ()) -> tuple[object, ...]:
    """What offers read of `spec`, as a key: its placement shape (`core.engine.verdicts.shape`) and
    its time limit. `limits`: the grant lengths (sorted) of the offers that cannot renew, the
    only ones a time limit matters to: the limit is kept as the least that exceeds the same
    of them."""
    limit = spec.time_limit_s
    if limit:
        below = bisect.bisect_left(limits, limit)
        limit = int(limits[below - 1]) + 1 if below else 1
    return (shape(spec), limit)


def _grant_limits(offers: Sequence[Offer]) -> tuple[float, ...]:
    """The grant lengths of the offers that cannot renew, sorted (see `_shape`)."""
    return tuple(sorted({o.max_lease_s for o in offers if o.max_lease_s and not o.renewable}))


def _is_gang(job: Job) -> bool:
    return job.spec.kind is JobKind.TRAINING and job.spec.num_nodes > 1


def plan_leases(
    leasing: Leasing,
    waiting: Sequence[Job],
    *,
    nodes: Sequence[NodeView],
    barred: frozenset[int],
    replicas_short: Callable[[Job], int],
    fits: Fits,
    now: datetime,
) -> LeasePlan:
    """After the cycle placed what it could: lease for the `waiting` jobs (in queue order) that
    the leased nodes cannot take, and give back leases nothing will use.

    `nodes`: every node as the cycle leaves it; `barred`: waiting jobs held back by the queue
    itself (new nodes would not start them); `replicas_short(job)`: replicas of an inference
    job that do not fit on the nodes now; `fits(job, node)`: the policy's filters.
    """
    by_node = {v.id: v for v in nodes}
    requested: dict[int, list[NodeLease]] = {}
    for lease in leasing.leases:
        if lease.state is LeaseState.REQUESTED and lease.for_job_id is not None:
            requested.setdefault(lease.for_job_id, []).append(lease)
    releases = _releases(leasing, waiting, by_node, requested, fits, now)
    gone = {r.lease_id for r in releases}
    book = BudgetBook(leasing)
    limits = _grant_limits(leasing.offers)
    memo: dict[tuple[object, ...], tuple[tuple[_Option, ...], str]] = {}
    requests: list[LeaseRequest] = []
    notes: dict[int, str] = {}
    for job in waiting:
        if job.id in barred:
            continue
        inflight = [x for x in requested.get(job.id, ()) if x.id not in gone]
        if inflight:
            skus = sorted({f"{x.sku} from {x.provider}" for x in inflight})
            notes[job.id] = (
                f"waiting for {plural(len(inflight), 'leased node')} ({', '.join(skus)}) "
                "to register"
            )
            continue
        if not leasing.offers:
            continue
        excluded = leasing.failed.get(job.id, frozenset())
        short = job.spec.num_nodes
        if job.spec.kind is JobKind.INFERENCE:
            short = replicas_short(job)
            if short <= 0:
                continue
        # Jobs alike in what offers look at get the same options: rank the catalog once.
        key = (_shape(job.spec, limits), excluded, short)
        if key not in memo:
            offers = [o for o in leasing.offers if (o.provider, o.sku) not in excluded]
            if job.spec.kind is JobKind.TRAINING:
                memo[key] = gang_options(job, offers)
            else:
                memo[key] = replica_options(job, short, offers)
        options, none_why = memo[key]
        failed_note = (
            f" ({plural(len(excluded), 'offer')} failed for it lately)" if excluded else ""
        )
        if not options:
            notes[job.id] = f"no offer to lease fits ({none_why}){failed_note}"
            continue
        chosen, over = None, ""
        for option in options:
            why = book.over(job, option)
            if not why:
                chosen = option
                break
            over = over or why
        if chosen is None:
            notes[job.id] = over
            continue
        book.take(job, chosen)
        offer = chosen.offer
        within = "; within budget" if over else ""
        reason = (
            f"leasing {chosen.count}x {offer.sku} from {offer.provider} at "
            f"${offer.price_per_hour:.2f}/h each: {chosen.why}{within}{failed_note}"
        )
        requests.append(
            LeaseRequest(
                job_id=job.id,
                provider=offer.provider,
                sku=offer.sku,
                count=chosen.count,
                price_per_hour=offer.price_per_hour,
                same_fabric=_is_gang(job),
                reason=reason,
            )
        )
        notes[job.id] = reason
    return LeasePlan(requests=tuple(requests), releases=releases, notes=notes)


def _releases(
    leasing: Leasing,
    waiting: Sequence[Job],
    by_node: Mapping[str, NodeView],
    requested: Mapping[int, Sequence[NodeLease]],
    fits: Fits,
    now: datetime,
) -> tuple[LeaseRelease, ...]:
    """Leases nothing will use: requested for a job that no longer waits; a node its job could
    not use; an idle node no queued job fits, or one idle past the grace."""
    waiting_by_id = {j.id: j for j in waiting}
    candidates = list(waiting)[:_GRACE_CANDIDATES]
    grace = leasing.idle_grace_s
    out: list[LeaseRelease] = []
    for lease in leasing.leases:
        if not managed(lease):
            continue
        owner = lease.for_job_id
        if lease.state is LeaseState.REQUESTED:
            if owner not in waiting_by_id:
                why = f"job {owner} no longer waits for it" if owner else "no job waits for it"
                out.append(
                    LeaseRelease(lease_id=lease.id, node_id=lease.node_id, reason=why, job_id=owner)
                )
            continue
        if lease.state is not LeaseState.ACTIVE:
            continue
        view = by_node.get(lease.node_id)
        if view is None or not view.idle:
            continue
        idle_for = (now - leasing.idle_since.get(view.id, now)).total_seconds()
        job = waiting_by_id.get(owner) if owner is not None else None
        if job is not None:
            usable = fits(job, view)
            if requested.get(job.id):
                continue  # the rest of its nodes are on their way
            if not _is_gang(job) and usable and idle_for < grace:
                continue
            why = (
                f"job {job.id} could not use node {view.id}"
                if not usable
                else f"job {job.id} did not start on it within the idle grace"
                if not _is_gang(job)
                else f"job {job.id}'s gang could not be completed around it; leasing anew"
            )
            out.append(
                LeaseRelease(
                    lease_id=lease.id,
                    node_id=view.id,
                    reason=why,
                    job_id=job.id,
                    unusable=not usable,
                )
            )
            continue
        if idle_for < grace:
            taker = next((c for c in candidates if fits(c, view)), None)
            if taker is not None:
                continue
            why = f"idle; no queued job fits node {view.id}"
        elif grace > 0:
            why = f"idle for {_hours(idle_for)} (idle grace {_hours(grace)})"
        else:
            why = "idle; no idle grace"
        done = f"job {owner} no longer needs it; " if owner is not None else ""
        out.append(
            LeaseRelease(lease_id=lease.id, node_id=view.id, reason=done + why, job_id=owner)
        )
    return tuple(out)
