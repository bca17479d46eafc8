"""Queue order: which pending job the cycle tries next. Sort plugins chosen by name (FIFO,
priority, fair share); `QueueOrder` hands the jobs out one at a time, so fair share sees the
GPUs every job placed earlier in the same cycle took.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

from gpuctl.core.model import MILLI_PER_GPU, Job, Placement


def placement_gpus(placement: Placement | None) -> float:
    """GPUs a placement holds, shares counted as fractions."""
    if placement is None:
        return 0.0
    return sum([len(r.gpu_indices) * r.gpu_milli for r in placement.ranks]) / MILLI_PER_GPU


def _age(job: Job) -> tuple[bool, datetime | None, int]:
    """Older first, then lower id; jobs with no creation time last."""
    return (job.created_at is None, job.created_at, job.id)


class QueueSort(Protocol):
    """The order key of `job` given the GPUs its queue and its owner hold: lower goes first.

    Within one (priority, queue, owner) group a key must order jobs by age, so the cycle
    can keep one head per group (as Kueue keeps one head per ClusterQueue).
    """

    name: ClassVar[str]

    def key(self, job: Job, queue_gpus: float, owner_gpus: float) -> tuple[Any, ...]: ...


@dataclass(frozen=True, slots=True)
class Fifo:
    """Arrival order, nothing else: the baseline every scheduler is compared with."""

    name: ClassVar[str] = "fifo"

    def key(self, job: Job, queue_gpus: float, owner_gpus: float) -> tuple[Any, ...]:
        return _age(job)


@dataclass(frozen=True, slots=True)
class PriorityFifo:
    """Higher priority first, then arrival order."""

    name: ClassVar[str] = "priority"

    def key(self, job: Job, queue_gpus: float, owner_gpus: float) -> tuple[Any, ...]:
        return (-job.spec.priority, *_age(job))


@dataclass(frozen=True, slots=True)
class FairShare:
    """Higher priority first; at equal priority the queue, then the owner, holding fewer GPUs
    (running, or placed earlier in this cycle); then arrival order."""

    name: ClassVar[str] = "fair-share"

    def key(self, job: Job, queue_gpus: float, owner_gpus: float) -> tuple[Any, ...]:
        return (-job.spec.priority, round(queue_gpus, 3), round(owner_gpus, 3), *_age(job))


QUEUE_SORTS: Mapping[str, type[QueueSort]] = MappingProxyType(
    {cls.name: cls for cls in (Fifo, PriorityFifo, FairShare)}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """GPUs held per queue and per owner."""

    by_queue: Mapping[str, float]
    by_owner: Mapping[str, float]

    @classmethod
    def of(cls, held: Iterable[Job]) -> Usage:
        by_queue: dict[str, float] = {}
        by_owner: dict[str, float] = {}
        for job in held:
            gpus = placement_gpus(job.placement)
            by_queue[job.spec.queue] = by_queue.get(job.spec.queue, 0.0) + gpus
            by_owner[job.spec.owner] = by_owner.get(job.spec.owner, 0.0) + gpus
        return cls(by_queue=by_queue, by_owner=by_owner)


class QueueOrder:
    """The pending jobs in the order `sort` gives, re-ranked as jobs start and stop.

    Iterate it; after each job say whether it `started` (its GPUs count for its queue and
    owner from now on), and `stopped` for every preempted job.
    """

    def __init__(
        self, pending: Sequence[Job], sort: QueueSort, usage: Usage | Callable[[], Usage]
    ) -> None:
        """`usage`: the GPUs held now, or how to count them (counted only when the queue
        has more than one group: one group goes in age order whatever its key)."""
        self._sort = sort
        groups: dict[tuple[int, str, str], list[Job]] = {}
        for job in pending:
            groups.setdefault(_group(job), []).append(job)
        self._groups = {g: deque(sorted(jobs, key=_age)) for g, jobs in groups.items()}
        self._keyed = len(self._groups) > 1
        held = (usage() if callable(usage) else usage) if self._keyed else Usage.of(())
        self._queue = dict(held.by_queue)
        self._owner = dict(held.by_owner)
        # Bumped whenever a queue's or owner's GPUs change: a heap entry keyed when both were
        # as they are now is still fresh, without keying it again.
        self._queue_version: dict[str, int] = {}
        self._owner_version: dict[str, int] = {}
        self._heap: list[tuple[tuple[Any, ...], tuple[int, str, str], int]] = []
        self._rebuilds = 0
        self._rebuild()
        self._last: tuple[tuple[Any, ...], tuple[int, str, str], Job] | None = None

    def _key(self, job: Job) -> tuple[Any, ...]:
        if not self._keyed:
            return ()
        spec = job.spec
        return self._sort.key(
            job, self._queue.get(spec.queue, 0.0), self._owner.get(spec.owner, 0.0)
        )

    def _stamp(self, group: tuple[int, str, str]) -> int:
        """How often the GPUs of the group's queue and owner have changed."""
        return self._queue_version.get(group[1], 0) + self._owner_version.get(group[2], 0)

    def _entry(
        self, group: tuple[int, str, str], head: Job
    ) -> tuple[tuple[Any, ...], tuple[int, str, str], int]:
        return (self._key(head), group, self._stamp(group))

    def _rebuild(self) -> None:
        self._rebuilds += 1
        self._heap = [self._entry(g, q[0]) for g, q in self._groups.items() if q]
        heapq.heapify(self._heap)

    def preview(self) -> Iterator[Job]:
        """Every pending job in the order it would go if nothing started: for planning.

        Lazy: each group is already in key order, so merging them costs only the jobs read.
        """
        return heapq.merge(*self._groups.values(), key=self._key)

    def __iter__(self) -> Iterator[Job]:
        # Keys only grow while jobs start (usage only rises), so a stale heap entry is at most
        # too early: re-key it and push it back (a lazy heap). `stopped` lowers keys: rebuild.
        while self._heap:
            key, group, stamp = heapq.heappop(self._heap)
            queue = self._groups[group]
            if not queue:  # an entry left from before a rebuild
                continue
            if stamp != self._stamp(group):
                fresh = self._entry(group, queue[0])
                if fresh[0] != key:
                    heapq.heappush(self._heap, fresh)
                    continue
            job = queue.popleft()
            self._last = (key, group, job)
            rebuilds = self._rebuilds
            yield job
            if queue and rebuilds == self._rebuilds:  # a rebuild has queued the new head
                heapq.heappush(self._heap, self._entry(group, queue[0]))

    @property
    def last(self) -> tuple[tuple[Any, ...], tuple[int, str, str], Any] | None:
        """Where the last job iterated stands in the order: (key, group, age)."""
        if self._last is None:
            return None
        key, group, job = self._last
        return (key, group, _age(job))

    def place_of(self, job: Job) -> tuple[tuple[Any, ...], tuple[int, str, str], Any] | None:
        """Where `job` would stand in this order (as `last` says it), with the GPUs held as
        they are now; None where it would change the order of the rest (a second group in an
        order of one, which goes by age alone)."""
        group = _group(job)
        if not self._keyed and group not in self._groups:
            return None
        return (self._key(job), group, _age(job))

    def started(self, job: Job, gpus: float) -> None:
        self._add(job, gpus)

    def stopped(self, job: Job, gpus: float) -> None:
        self._add(job, -gpus)
        self._rebuild()

    def _add(self, job: Job, gpus: float) -> None:
        spec = job.spec
        self._queue[spec.queue] = self._queue.get(spec.queue, 0.0) + gpus
        self._owner[spec.owner] = self._owner.get(spec.owner, 0.0) + gpus
        self._queue_version[spec.queue] = self._queue_version.get(spec.queue, 0) + 1
        self._owner_version[spec.owner] = self._owner_version.get(spec.owner, 0) + 1


def _group(job: Job) -> tuple[int, str, str]:
    return (-job.spec.priority, job.spec.queue, job.spec.owner)
