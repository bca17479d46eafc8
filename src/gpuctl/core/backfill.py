"""What a job that cannot start now does to the jobs behind it: nothing (first fit), stop the
queue (strict FIFO), or reserve its earliest start and let later jobs backfill around it (EASY).

A reservation is planned from the running jobs' time limits: each ends at its start plus its
limit; a job with no limit never frees its nodes for planning. A later job may start now only
if it ends (by its own limit) before the reservation starts or uses none of the reserved nodes,
so backfilling never delays a reservation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import ClassVar, Protocol

import numpy as np

from gpuctl.core.model import Job, JobKind, JobState
from gpuctl.core.snapshot import NodeView, Snapshot
from gpuctl.core.topology import best_gang_rows, island_of

# Fits(node) for the job being planned: True fits now, False fits once work there ends,
# None never (wrong model, too small, floors not met, not ready).
Fits = Callable[[NodeView], bool | None]
_NOTHING: Mapping[str, str] = MappingProxyType({})

_REASON_IDS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Reservation:
    """`job_id` starts by `start` on `node_ids`; later jobs must not delay it."""

    job_id: int
    start: datetime
    node_ids: tuple[str, ...]


def end_of(job: Job, now: datetime) -> datetime | None:
    """When `job` lets go of its nodes at the latest: start + time limit; None without a limit."""
    if job.state is JobState.CANCELLING:
        return now  # being stopped already
    if not job.spec.time_limit_s:
        return None
    end = (job.started_at or now) + timedelta(seconds=job.spec.time_limit_s)
    return max(end, now)


def ends_if_started(job: Job, now: datetime) -> datetime | None:
    """When `job` would end at the latest if it started now."""
    limit = job.spec.time_limit_s
    return now + timedelta(seconds=limit) if limit else None


def clock(t: datetime, now: datetime) -> str:
    """ "14:05 UTC" today, "2025-01-02 14:05 UTC" on another day."""
    t, now = t.astimezone(UTC), now.astimezone(UTC)
    return t.strftime("%H:%M UTC" if t.date() == now.date() else "%Y-%m-%d %H:%M UTC")


def span(delta: timedelta) -> str:
    """ "25m", "1h30m", "2d3h": whole minutes, rounded down, at least 1m."""
    minutes = max(1, int(delta.total_seconds()) // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = (
        f"{days}d" if days else "",
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
    )
    return "".join(parts)


def ids(values: Sequence[object]) -> str:
    shown = ", ".join(str(v) for v in values[:_REASON_IDS])
    more = len(values) - _REASON_IDS
    return shown + (f" +{more} more" if more > 0 else "")


# -- holds: what a blocked job keeps from the jobs behind it --------------------------------


class Hold(Protocol):
    job_id: int

    @property
    def blocks_all(self) -> bool: ...

    def blocked(self, ends: datetime | None) -> Mapping[str, str]:
        """Nodes a job ending at `ends` (None: never) may not use, each with why."""
        ...

    def waiting(self, job: Job, now: datetime) -> str:
        """The reason of a job that would start but for this hold."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Barrier:
    """Strict order: nothing behind `job_id` starts before it does."""

    job_id: int

    @property
    def blocks_all(self) -> bool:
        return True

    def blocked(self, ends: datetime | None) -> Mapping[str, str]:
        return _NOTHING

    def waiting(self, job: Job, now: datetime) -> str:
        return f"waiting behind job {self.job_id} (strict FIFO: nothing starts before it)"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationHold:
    reservation: Reservation
    now: datetime
    # The nodes held and why, worded once: every job behind the reservation asks.
    _held: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        r = self.reservation
        why = f"reserved for job {r.job_id} from {clock(r.start, self.now)}"
        object.__setattr__(self, "_held", MappingProxyType(dict.fromkeys(r.node_ids, why)))

    @property
    def job_id(self) -> int:
        return self.reservation.job_id

    @property
    def blocks_all(self) -> bool:
        return False

    def blocked(self, ends: datetime | None) -> Mapping[str, str]:
        r = self.reservation
        if ends is not None and ends <= r.start:
            return _NOTHING  # it is gone before the reservation starts
        return self._held

    def waiting(self, job: Job, now: datetime) -> str:
        r = self.reservation
        text = (
            f"waiting behind job {r.job_id}'s reservation "
            f"(starts by {clock(r.start, now)} on {ids(r.node_ids)})"
        )
        room = r.start - now
        if room >= timedelta(minutes=1):
            text += f"; a time limit of at most {span(room)} would let it start now"
        return text


# -- planning a reservation -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NoReservation:
    reason: str  # reads after "no reservation: "


class Planner:
    """Earliest starts from the running jobs' time limits, on the cycle's working snapshot."""

    def __init__(self, snapshot: Snapshot, now: datetime) -> None:
        self.snapshot = snapshot
        self.now = now
        self.reservations: list[Reservation] = []
        self._freed_by: dict[int, int | None] = {}  # reserved job -> the job whose end frees it

    def reserved(self) -> frozenset[str]:
        return frozenset(n for r in self.reservations for n in r.node_ids)

    @contextlib.contextmanager
    def rewound(self, count: int) -> Iterator[None]:
        """The planner with its first `count` reservations only, for the time of the `with`;
        then as it was, whatever was reserved meanwhile."""
        kept = self.reservations, dict(self._freed_by)
        self.reservations = self.reservations[:count]
        try:
            yield
        finally:
            self.reservations, self._freed_by = kept

    def _ready(
        self, view: NodeView, verdict: bool, fits: Fits
    ) -> tuple[datetime | None, int | None, list[int]]:
        """When `view` (that `fits` with `verdict` now) can take the rank: (time, the job whose
        end frees it, jobs with no limit in the way); time None: never."""
        if verdict:
            return self.now, None, []
        ends: list[tuple[datetime, int]] = []
        unlimited: list[int] = []
        for job_id, _ in view.ranks:
            job = self.snapshot.job(job_id)
            end = end_of(job, self.now) if job is not None else None
            if end is None:
                unlimited.append(job_id)
            else:
                ends.append((end, job_id))
        freed: list[int] = []
        for end, job_id in sorted(ends):
            freed.append(job_id)
            if fits(self.snapshot.without(view.id, freed)):
                return end, job_id, []
        return None, None, unlimited

    def reserve(self, job: Job, fits: Fits) -> Reservation | NoReservation:
        """Plan `job`'s earliest start on nodes no earlier reservation holds, and record it."""
        n = job.spec.num_nodes
        taken = self.reserved()
        ready: dict[tuple[str, str], list[tuple[datetime, NodeView, int | None]]] = {}
        could: dict[tuple[str, str], int] = {}
        unlimited: set[int] = set()
        for view in self.snapshot.nodes:
            if view.id in taken or (n > 1 and not view.node.fabric_name):
                continue
            verdict = fits(view)
            if verdict is None:
                continue
            at, by, blocking = self._ready(view, verdict, fits)
            key = island_of(view)
            could[key] = could.get(key, 0) + 1
            unlimited.update(blocking)
            if at is not None:
                ready.setdefault(key, []).append((at, view, by))
        options = []
        for key, nodes in ready.items():
            if len(nodes) >= n:
                nodes.sort(key=lambda t: (t[0], t[1].id))
                options.append((nodes[n - 1][0], key, nodes))
        if not options:
            if not could:  # no node could ever take it: the job's own reason says why
                return NoReservation(reason="")
            most = max(could.values())
            if most < n:
                held = " outside earlier reservations" if taken else ""
                return NoReservation(
                    reason=f"it never fits as the cluster is: one fabric has at most {most} "
                    f"of the {n} nodes it needs{held}"
                )
            return NoReservation(
                reason=f"the nodes it needs are held by jobs with no time limit "
                f"({ids(sorted(unlimited))}), which never free up for planning"
            )
        start, key, nodes = min(options, key=lambda o: (o[0], o[1]))
        # Of the nodes ready by then, the fewest leaves, chosen as the gang itself will be.
        table = self.snapshot.table
        rows = np.array([table.pos[v.id] for t, v, _ in nodes if t <= start], dtype=np.int64)
        zeros = np.zeros(len(rows))
        choice = best_gang_rows(table, rows, zeros, zeros.astype(bool), n)
        assert choice is not None  # at least n nodes are ready by `start`
        reservation = Reservation(
            job_id=job.id, start=start, node_ids=tuple(v.id for v in choice.nodes)
        )
        self.reservations.append(reservation)
        chosen = set(reservation.node_ids)
        self._freed_by[job.id] = next(
            (by for t, v, by in nodes if t == start and by is not None and v.id in chosen), None
        )
        return reservation

    def describe(self, reservation: Reservation) -> str:
        """ "reserved: starts by 14:05 UTC when job 12 reaches its time limit (nodes a, b)"."""
        by = self._freed_by.get(reservation.job_id)
        text = f"reserved: starts by {clock(reservation.start, self.now)}"
        if by is not None:
            holder = self.snapshot.job(by)
            ending = (
                "finishes stopping"
                if holder is not None and holder.state is JobState.CANCELLING
                else "reaches its time limit"
            )
            text += f" when job {by} {ending}"
        return text + f" (nodes {ids(reservation.node_ids)})"


# -- the plugins ----------------------------------------------------------------------------


class Backfill(Protocol):
    """Called for each job that cannot start now: what it holds, and what its reason adds.

    `hold` reads a job only through its shape (`engine.verdicts.shape`), the planner and
    `fits`: so jobs alike that hold nothing while neither the working snapshot nor the
    planner's reservations change get the same note, and the cycle asks once for them all
    (`engine.memos`)."""

    name: ClassVar[str]

    def hold(self, job: Job, planner: Planner, fits: Fits) -> tuple[Hold | None, str]: ...


@dataclass(frozen=True, slots=True)
class FirstFit:
    """A blocked job holds nothing: later jobs take whatever fits (big gangs can starve)."""

    name: ClassVar[str] = "none"

    def hold(self, job: Job, planner: Planner, fits: Fits) -> tuple[Hold | None, str]:
        return None, ""


@dataclass(frozen=True, slots=True)
class StrictOrder:
    """A blocked job stops the queue: nothing behind it starts (plain FIFO)."""

    name: ClassVar[str] = "strict"

    def hold(self, job: Job, planner: Planner, fits: Fits) -> tuple[Hold | None, str]:
        return Barrier(job_id=job.id), ""


@dataclass(frozen=True, slots=True)
class EasyBackfill:
    """The first blocked training job reserves its earliest start; later jobs backfill only
    where they do not delay it (EASY backfilling, as Slurm's backfill and Maui do it)."""

    name: ClassVar[str] = "easy"
    depth: int = 1  # blocked jobs that get a reservation; 1 is EASY

    def hold(self, job: Job, planner: Planner, fits: Fits) -> tuple[Hold | None, str]:
        if job.spec.kind is not JobKind.TRAINING or len(planner.reservations) >= self.depth:
            return None, ""
        planned = planner.reserve(job, fits)
        if isinstance(planned, NoReservation):
            return None, f"no reservation: {planned.reason}" if planned.reason else ""
        return ReservationHold(reservation=planned, now=planner.now), planner.describe(planned)


BACKFILLS: Mapping[str, type[Backfill]] = MappingProxyType(
    {cls.name: cls for cls in (FirstFit, StrictOrder, EasyBackfill)}
)
