"""Cost accounting, pure: every lease accrues its price by the second, and each job is charged
its share of each node it held GPUs on (GPUs held / GPUs on the node x the node's price x the
time held), for every attempt: an attempt that ended in a requeue (preempted, node lost) is
charged when it ends (`attempt_charge`) and kept, since the job itself then forgets where it
ran. What the leases cost beyond the jobs' charges is idle capacity.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from gpuctl.core.model import MILLI_PER_GPU, Job, Node, NodeLease, Placement


class CostBy(enum.StrEnum):
    JOB = "job"
    QUEUE = "queue"
    USER = "user"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePrice:
    gpu_count: int
    price_per_hour: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Charge:
    """What one job is charged over a window."""

    job_id: int
    queue: str
    owner: str
    dollars: float
    gpu_hours: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptCharge:
    """An attempt of a job that ended without the job ending (it was requeued), as charged
    when it ended: the whole attempt, from its start to its end."""

    job_id: int
    attempt: int
    queue: str
    owner: str
    started_at: datetime
    ended_at: datetime
    dollars: float
    gpu_hours: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CostRow:
    key: str  # the job id, queue or user
    dollars: float
    gpu_hours: float
    jobs: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CostReport:
    rows: tuple[CostRow, ...]
    charged_dollars: float  # what the rows add up to
    leased_dollars: float  # what every lease accrued over the same window

    @property
    def idle_dollars(self) -> float:
        """Paid for, charged to no job: leased nodes (or parts of them) nothing held."""
        return max(0.0, self.leased_dollars - self.charged_dollars)


def _window(start: datetime, end: datetime, since: datetime | None) -> float:
    """Seconds of [start, end) at or after `since`."""
    if since is not None and since > start:
        start = since
    return max(0.0, (end - start).total_seconds())


def lease_dollars(lease: NodeLease, *, now: datetime, since: datetime | None = None) -> float:
    """What `lease` accrued (since `since`): by the second from acquisition to its end."""
    if lease.acquired_at is None:
        return 0.0
    end = lease.released_at or now
    return _window(lease.acquired_at, end, since) / 3600 * lease.price_per_hour


def job_charge(
    job: Job, prices: Mapping[str, NodePrice], *, now: datetime, since: datetime | None = None
) -> Charge | None:
    """`job`'s charge from its start to its end (or `now`); None when it never held anything.

    A rank holding 2 whole GPUs of an 8-GPU node at $24/h for 30 minutes is charged
    2 / 8 x $24 x 0.5 = $3 and 2 x 0.5 = 1 GPU-hour; a 250-milli share counts as 0.25 GPU.
    """
    if job.placement is None or job.started_at is None:
        return None
    seconds = _window(job.started_at, job.finished_at or now, since)
    if seconds <= 0:
        return None
    hours = seconds / 3600
    gpu_hours = sum(_held_gpus(job.placement).values()) * hours
    return Charge(
        job_id=job.id,
        queue=job.spec.queue,
        owner=job.spec.owner,
        dollars=hourly_rate(job, prices) * hours,
        gpu_hours=gpu_hours,
    )


def prices_of(nodes: Iterable[Node]) -> dict[str, NodePrice]:
    """Each node's GPU count and price per hour (a leased node's is its lease's)."""
    return {n.id: NodePrice(gpu_count=n.gpu_count, price_per_hour=n.price_per_hour) for n in nodes}


def charged_now(
    jobs: Iterable[Job], prices: Mapping[str, NodePrice]
) -> Iterator[tuple[Job, float]]:
    """Each job being charged now (started, holding GPUs), with its `hourly_rate`."""
    for job in jobs:
        if job.state.holds_resources and job.started_at is not None:
            yield job, hourly_rate(job, prices)


def hourly_rate(job: Job, prices: Mapping[str, NodePrice]) -> float:
    """Dollars an hour `job` is charged while it holds what it holds now (its share of each
    node, as `job_charge` counts it); 0 when it holds nothing."""
    if job.placement is None:
        return 0.0
    dollars = 0.0
    for node_id, gpus in _held_gpus(job.placement).items():
        price = prices.get(node_id)
        if price is not None and price.gpu_count > 0:
            dollars += gpus / price.gpu_count * price.price_per_hour
    return dollars


def _held_gpus(placement: Placement) -> dict[str, float]:
    """GPUs held on each node (a 250-milli share counts as 0.25)."""
    held: dict[str, float] = {}
    for r in placement.ranks:
        held[r.node_id] = (
            held.get(r.node_id, 0.0) + len(r.gpu_indices) * r.gpu_milli / MILLI_PER_GPU
        )
    return held


def attempt_charge(
    job: Job, prices: Mapping[str, NodePrice], *, ended_at: datetime
) -> AttemptCharge | None:
    """`job`'s current attempt, ending at `ended_at`, as a record to keep (None: it never
    started or held nothing)."""
    charge = job_charge(job, prices, now=ended_at)
    if charge is None or job.started_at is None:
        return None
    return AttemptCharge(
        job_id=job.id,
        attempt=job.attempt,
        queue=job.spec.queue,
        owner=job.spec.owner,
        started_at=job.started_at,
        ended_at=ended_at,
        dollars=charge.dollars,
        gpu_hours=charge.gpu_hours,
    )


def ended_charge(ended: AttemptCharge, *, since: datetime | None = None) -> Charge | None:
    """The part of an ended attempt's charge at or after `since` (by the second)."""
    whole = (ended.ended_at - ended.started_at).total_seconds()
    seconds = _window(ended.started_at, ended.ended_at, since)
    if whole <= 0 or seconds <= 0:
        return None
    share = seconds / whole
    return Charge(
        job_id=ended.job_id,
        queue=ended.queue,
        owner=ended.owner,
        dollars=ended.dollars * share,
        gpu_hours=ended.gpu_hours * share,
    )


def charges(
    jobs: Iterable[Job],
    prices: Mapping[str, NodePrice],
    *,
    now: datetime,
    since: datetime | None = None,
    ended: Iterable[AttemptCharge] = (),
) -> tuple[Charge, ...]:
    """What each job was charged (since `since`): its current attempt, and its `ended` ones
    (an ended record of the attempt a job is still on is not counted twice)."""
    jobs = list(jobs)
    live = {(job.id, job.attempt) for job in jobs}
    current = [job_charge(job, prices, now=now, since=since) for job in jobs]
    before = [ended_charge(e, since=since) for e in ended if (e.job_id, e.attempt) not in live]
    return tuple(c for c in (*current, *before) if c is not None)


def report(
    charged: Sequence[Charge],
    leases: Iterable[NodeLease],
    by: CostBy,
    *,
    now: datetime,
    since: datetime | None = None,
) -> CostReport:
    """Charges grouped `by` job, queue or user, most dollars first."""
    groups: dict[str, list[Charge]] = {}
    for c in charged:
        key = {CostBy.JOB: str(c.job_id), CostBy.QUEUE: c.queue, CostBy.USER: c.owner}[by]
        groups.setdefault(key or "-", []).append(c)
    rows = [
        CostRow(
            key=key,
            dollars=sum(c.dollars for c in cs),
            gpu_hours=sum(c.gpu_hours for c in cs),
            jobs=len({c.job_id for c in cs}),
        )
        for key, cs in groups.items()
    ]
    rows.sort(key=lambda r: (-r.dollars, -r.gpu_hours, r.key))
    return CostReport(
        rows=tuple(rows),
        charged_dollars=sum(c.dollars for c in charged),
        leased_dollars=sum(lease_dollars(x, now=now, since=since) for x in leases),
    )
