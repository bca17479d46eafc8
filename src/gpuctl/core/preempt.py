"""Preemption: which running jobs a job that does not fit may stop, and the fewest GPU-hours of
them that make it fit. Whole jobs only (a gang loses all its ranks or none); a plugin chosen by
name says who may be a victim, the search here is the same for every plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import ClassVar, Protocol

from gpuctl.core.model import Job, JobState, Placement
from gpuctl.core.queue import placement_gpus
from gpuctl.core.snapshot import Snapshot

# Placement attempts one search may make: a binary search over the cheapest victims first
# (log2 of 256 = 8 attempts) and one reprieve attempt per victim it settles on.
MAX_CANDIDATES = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class Preemption:
    """Running job `job_id` is stopped and requeued so that `for_job_id` can start."""

    job_id: int
    for_job_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Victim:
    job: Job
    gpu_hours: float  # GPUs x time run so far: what stopping it throws away


def gpu_hours(job: Job, now: datetime) -> float:
    if job.started_at is None:
        return 0.0
    hours = max(0.0, (now - job.started_at).total_seconds() / 3600)
    return placement_gpus(job.placement) * hours


class Preemptor(Protocol):
    """Who `job` may preempt, cheapest first (all of them: a search tries the cheapest
    MAX_CANDIDATES).

    `key(job)`: what of `job` its candidates depend on. The cycle lists candidates once per
    key (until a preemption changes who runs) rather than once per job that does not fit:
    thousands of jobs per cycle at scale.
    """

    name: ClassVar[str]

    def key(self, job: Job) -> Hashable: ...

    def candidates(
        self, job: Job, running: Sequence[Job], now: datetime, fresh: Collection[int]
    ) -> tuple[Victim, ...]: ...


@dataclass(frozen=True, slots=True)
class NoPreemption:
    name: ClassVar[str] = "none"

    def key(self, job: Job) -> Hashable:
        return None

    def candidates(
        self, job: Job, running: Sequence[Job], now: datetime, fresh: Collection[int]
    ) -> tuple[Victim, ...]:
        return ()


@dataclass(frozen=True, slots=True)
class PriorityPreemption:
    """Preemptible running jobs of lower priority, fewest GPU-hours lost first (then the
    lowest priority, then the youngest id). Jobs placed in this same cycle are never victims."""

    name: ClassVar[str] = "priority"

    def key(self, job: Job) -> Hashable:
        return job.spec.priority

    def candidates(
        self, job: Job, running: Sequence[Job], now: datetime, fresh: Collection[int]
    ) -> tuple[Victim, ...]:
        ranked = []
        for r in running:
            if (
                r.state is JobState.RUNNING
                and r.spec.preemptible
                and r.spec.priority < job.spec.priority
                and r.id not in fresh
            ):
                lost = gpu_hours(r, now)
                ranked.append((round(lost, 6), r.spec.priority, -r.id, lost, r))
        ranked.sort(key=lambda v: v[:3])  # ids are unique: no two keys are equal
        return tuple(Victim(job=r, gpu_hours=lost) for *_, lost, r in ranked)


PREEMPTORS: Mapping[str, type[Preemptor]] = MappingProxyType(
    {cls.name: cls for cls in (NoPreemption, PriorityPreemption)}
)


def choose_victims(
    snapshot: Snapshot,
    candidates: Sequence[Victim],
    place: Callable[[Snapshot], Placement | None],
    *,
    without: Snapshot | None = None,
) -> tuple[tuple[Victim, ...], Placement] | None:
    """The victims to stop and where the job then goes; None when stopping every candidate
    would not make it fit. `without`, if given, is `snapshot` with every candidate gone
    already (the caller keeps one), so the usual answer, no, costs no copy.

    1. all candidates gone: does it fit at all? 2. the shortest cheapest-first prefix that
    makes it fit (binary search: freeing more never hurts); 3. reprieve, dearest first, every
    victim the job fits without.

    `place` must find a placement whenever the nodes of one it found before are as they were
    then (a gang needs n usable nodes of one island, replicas a slot each: both placers do),
    so a victim on none of the nodes of the last placement found is reprieved without asking.
    """
    if not candidates or (without is not None and place(without) is None):
        return None
    # One trial snapshot, moved from attempt to attempt by forgetting and holding back only
    # the victims that differ (an attempt from a fresh copy costs the whole cluster).
    trial = snapshot.copy()
    held = {v.job.id: snapshot.placement_of(v.job.id) for v in candidates}
    gone: list[Victim] = []  # trial = snapshot without these

    def regive(v: Victim) -> None:
        placement = held[v.job.id]
        if placement is not None:
            trial.hold(v.job.id, placement, v.job)

    def attempt(victims: Sequence[Victim]) -> Placement | None:
        nonlocal gone
        keep = {v.job.id for v in victims}
        for v in gone:
            if v.job.id not in keep:
                regive(v)
        out = {v.job.id for v in gone}
        trial.forget_all(v.job.id for v in victims if v.job.id not in out)
        gone = list(victims)
        return place(trial)

    found = attempt(candidates)
    if found is None:
        return None
    lo, hi = 1, len(candidates)  # the shortest prefix that fits is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        fits = attempt(candidates[:mid])
        if fits is not None:
            hi, found = mid, fits
        else:
            lo = mid + 1
    chosen = list(candidates[:hi])
    used = set(found.node_ids)  # of the last placement found: every victim reprieved since
    # is on none of them, so it still fits as long as the next one is on none either
    for v in sorted(chosen, key=lambda v: (-v.gpu_hours, v.job.id)):
        rest = [c for c in chosen if c is not v]
        if not rest:
            continue
        if _untouched(used, held[v.job.id]):
            chosen = rest
            continue
        fits = attempt(rest)
        if fits is not None:
            chosen, used = rest, set(fits.node_ids)
    placement = attempt(chosen)
    assert placement is not None  # the last attempt that kept `chosen` fitted
    return tuple(sorted(chosen, key=lambda v: v.job.id)), placement


def _untouched(used: set[str], placement: Placement | None) -> bool:
    """`placement` (of a victim) is on none of the nodes `used`."""
    return placement is None or used.isdisjoint(placement.node_ids)
