"""What one cycle remembers from job to job, and every rule for forgetting it.

The cycle (`core.cycle`) asks the same questions of many jobs: most of a queue is alike in
everything placement reads. A job's *signature* is what its placement depends on: its shape
(`verdicts.shape`), the ids of the nodes it may not use (holds and lease blocks), and the key
of its lease refusal. Jobs with one signature fit alike, so the cycle keeps:

- `misses`: signature -> why it did not fit as the cluster is;
- `hopeless`: shapes that fit nowhere even with no node held back;
- `no_room`: (signature, priority) -> why preempting would not make room;
- `behind`: signature -> "waiting behind job 7's reservation" (or ""), with the nodes of the
  placement that showed it;
- `candidates`: the preemptor's key -> who a job may preempt, cheapest first;
- the working snapshot without those candidates, per key (`without`);
- the holds' merged blocked nodes, per mix of holds (`blocked`);
- `no_hold`: (signature, reservations made) -> the reason's note of a job that holds nothing.

Why each stays true, and what ends it (the two events of a cycle, `bound` and `preempted`):

- Placing a job only takes capacity, and no filter passes a node with less free that it
  failed with more: misses, hopeless shapes and "no room" stay true until a preemption
  frees something, and then all of them go.
- A "behind a hold" answer holds while the placement that showed it keeps its nodes: a bind
  on one of them ends it (with several holds, any bind: which hold a job is behind depends
  on where it would go).
- Preemption candidates change only by preemption (a job placed in this cycle is never a
  victim): a preemption takes the victims out of every list, keeping the order.
- The snapshot without candidates is brought up to date by replaying what the cycle did
  since (`changes`), not copied anew.
- A hold of nothing depends on the job's signature, the working snapshot and the
  reservations made (`backfill.Backfill`): kept while the table's last change is the same,
  and keyed by how many reservations were made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gpuctl.core.engine.verdicts import Shape
from gpuctl.core.model import Job

if TYPE_CHECKING:
    from gpuctl.core.preempt import Victim
    from gpuctl.core.snapshot import Snapshot

# (shape, ids of the nodes the job may not use, its lease refusal's key or None)
Signature = tuple[Any, ...]


class CycleMemos:
    """The memos of one cycle (see the module docstring for the rules)."""

    def __init__(self) -> None:
        self.misses: dict[Signature, str] = {}
        self.hopeless: set[Shape] = set()
        self.no_room: dict[tuple[Any, ...], str] = {}
        self.behind: dict[Signature, tuple[str, frozenset[str]]] = {}
        self._behind_on: dict[str, list[Signature]] = {}  # node -> `behind` keys using it
        self._candidates: dict[Any, tuple[Victim, ...]] = {}
        self._freed: dict[Any, _Freed] = {}
        self.changes: list[tuple[Job, bool]] = []  # (job, bound: True / preempted: False)
        # (signature, reservations made) -> the note of a hold of nothing, at one table state
        self._no_hold: dict[tuple[Signature, int], str] = {}
        self._no_hold_at = -1
        self._blocked_by: dict[
            tuple[int, ...], tuple[list[Mapping[str, str]], dict[str, str], tuple[str, ...]]
        ] = {}

    # -- answers ---------------------------------------------------------------------------

    def note_behind(self, signature: Signature, found: tuple[str, frozenset[str]]) -> None:
        self.behind[signature] = found
        for node_id in found[1]:
            self._behind_on.setdefault(node_id, []).append(signature)

    def no_hold(self, at: int, key: tuple[Signature, int]) -> str | None:
        """The note of alike jobs that held nothing, the table as it was at `at` (its
        `last_change`) and with as many reservations made; None: not asked yet."""
        if at != self._no_hold_at:
            self._no_hold.clear()
            self._no_hold_at = at
        return self._no_hold.get(key)

    def note_no_hold(self, at: int, key: tuple[Signature, int], note: str) -> None:
        if at == self._no_hold_at:
            self._no_hold[key] = note

    def candidates(self, key: Any, find: Callable[[], tuple[Victim, ...]]) -> tuple[Victim, ...]:
        """Who a job whose preemptor key is `key` may preempt (`find()` the first time)."""
        found = self._candidates.get(key)
        if found is None:
            found = self._candidates[key] = find()
        return found

    def without(self, key: Any, work: Snapshot, gone: set[int]) -> Snapshot:
        """`work` without the running jobs `gone` (the candidates under `key`)."""
        freed = self._freed.get(key)
        if freed is None:
            freed = self._freed[key] = _Freed(work.copy(), len(self.changes))
        freed.update(work, self.changes, gone)
        return freed.snapshot

    def blocked(self, parts: list[Mapping[str, str]]) -> tuple[Mapping[str, str], tuple[str, ...]]:
        """`parts` (node id -> why not) merged, the first why of a node kept; and the ids,
        sorted. Holds and lease blocks hand alike jobs the same mappings: each mix is merged
        once (the entry keeps the mappings its key names by id)."""
        key = tuple(id(p) for p in parts)
        hit = self._blocked_by.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], parts, strict=True)):
            return hit[1], hit[2]
        merged: dict[str, str] = {}
        for part in parts:
            for node_id, why in part.items():
                merged.setdefault(node_id, why)
        ids = tuple(sorted(merged))
        self._blocked_by[key] = (parts, merged, ids)
        return merged, ids

    # -- the two events that end answers ----------------------------------------------------

    def bound(self, started: Job, holds: int) -> None:
        """`started` (running, placed) was bound in the cycle, which has `holds` holds."""
        assert started.placement is not None
        self.changes.append((started, True))
        if holds > 1:
            self._forget_behind()
            return
        for node_id in started.placement.node_ids:
            for signature in self._behind_on.pop(node_id, ()):
                self.behind.pop(signature, None)

    def preempted(self, victims: Sequence[Victim]) -> None:
        """`victims` were stopped: room was made, so what failed before may fit now."""
        self.changes.extend((v.job, False) for v in victims)
        self.misses.clear()
        self.hopeless.clear()
        self.no_room.clear()
        self._forget_behind()
        gone = {v.job.id for v in victims}
        self._candidates = {
            k: tuple(c for c in listed if c.job.id not in gone)
            for k, listed in self._candidates.items()
        }

    def _forget_behind(self) -> None:
        self.behind.clear()
        self._behind_on.clear()


class _Freed:
    """The working snapshot without some running jobs (`gone`), brought up to date on use."""

    def __init__(self, snapshot: Snapshot, synced: int) -> None:
        self.snapshot = snapshot
        self.synced = synced  # how many of the cycle's changes it has seen
        self.gone: set[int] = set()

    def update(self, work: Snapshot, changes: Sequence[tuple[Job, bool]], gone: set[int]) -> None:
        """Replay the cycle's binds and preemptions since, then let go of exactly `gone`
        (jobs `work` holds): as `work.copy()` with `gone` forgotten would be."""
        for job, bound in changes[self.synced :]:
            if bound:
                assert job.placement is not None
                self.snapshot.assume(job.id, job.placement, job)
            elif job.id in self.gone:
                self.gone.discard(job.id)  # gone here already, and from `work` now too
            else:
                self.snapshot.forget(job.id)
        self.synced = len(changes)
        for job_id in sorted(self.gone - gone):
            placement = work.placement_of(job_id)
            if placement is not None:
                self.snapshot.hold(job_id, placement, work.job(job_id))
        self.snapshot.forget_all(sorted(gone - self.gone))
        self.gone = set(gone)
