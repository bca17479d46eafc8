"""Inference jobs as services: a replica that ends is replaced, per the job's restart policy,
while the others keep running; the replacement is placed by the cycle like any placement.

A service's placement holds its replicas. A replica that ended stays in it, with its GPUs
held, until its replacement is placed, so that the replacement goes elsewhere; if it cannot,
the ended replica lets go of them (`release`) and the next cycle may use them. Every
replacement is a new rank number, so no agent mistakes it for the one it replaces (same job,
same attempt: the other replicas never stop).

Replacements in a row back off: the first at once, then 10 s, 20 s, ... up to 5 minutes; a
replica that ran for 10 minutes resets the count (Kubernetes' crash-loop rules). A place
whose replica failed `RESTART_LIMIT` times in a row is given up and the service is degraded;
a replica lost with its node (or degraded node) is replaced at once and never counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from gpuctl.core.lifecycle import exit_text
from gpuctl.core.model import (
    Job,
    JobKind,
    JobSpec,
    JobState,
    Placement,
    RankPlacement,
    RankState,
    RestartPolicy,
)

RESTART_LIMIT = 5  # replacements in a row of a replica that keeps failing, then given up
BACKOFF_S = 10.0  # before the second replacement in a row; doubling from there
BACKOFF_MAX_S = 300.0
RESET_AFTER_S = 600.0  # a replica that ran this long starts its place's count afresh


def is_service(job: Job) -> bool:
    """An inference job whose replicas are replaced (restart policy other than never)."""
    return job.spec.kind is JobKind.INFERENCE and job.spec.restart is not RestartPolicy.NEVER


def failed(rank: RankPlacement) -> bool:
    return rank.state is RankState.LOST or (rank.state is RankState.EXITED and rank.exit_code != 0)


def holds(rank: RankPlacement) -> bool:
    """Whether the rank still takes capacity (an ended one lets go once it is not awaited)."""
    return bool((rank.gpu_indices and rank.gpu_milli) or rank.cpu_milli or rank.memory_mib)


def release(rank: RankPlacement) -> RankPlacement:
    """The rank taking nothing any more (where it ran is kept, for `describe`)."""
    return replace(rank, gpu_milli=0, cpu_milli=0, memory_mib=0) if holds(rank) else rank


def restarts_after(rank: RankPlacement) -> int:
    """The count the replacement of ended `rank` carries: one more, unless the node was lost
    (not the replica's doing) or it ran long enough to start afresh."""
    if rank.state is RankState.LOST:
        return rank.restarts
    if (
        rank.started_at is not None
        and rank.ended_at is not None
        and (rank.ended_at - rank.started_at).total_seconds() >= RESET_AFTER_S
    ):
        return 1
    return rank.restarts + 1


def backoff_s(restarts: int) -> float:
    """How long after the replica ended its replacement (carrying `restarts`) waits."""
    if restarts <= 1:
        return 0.0
    return min(BACKOFF_S * 2 ** (restarts - 2), BACKOFF_MAX_S)


def awaited(job: Job, rank: RankPlacement) -> bool:
    """Whether ended `rank`'s place is to be filled (now or after its backoff)."""
    if rank.live or job.state is not JobState.RUNNING or not is_service(job):
        return False
    if not failed(rank) and job.spec.restart is not RestartPolicy.ALWAYS:
        return False  # done: on-failure keeps a replica that exited 0 ended
    return restarts_after(rank) <= RESTART_LIMIT


def due_at(rank: RankPlacement) -> datetime | None:
    if rank.ended_at is None or rank.state is RankState.LOST:
        return rank.ended_at  # a lost node's replicas are replaced at once
    return rank.ended_at + timedelta(seconds=backoff_s(restarts_after(rank)))


def due(job: Job, now: datetime) -> tuple[RankPlacement, ...]:
    """The ended replicas of a running service whose replacement the cycle should place now,
    in rank order."""
    if job.placement is None or not is_service(job) or job.state is not JobState.RUNNING:
        return ()
    return tuple(
        r
        for r in job.placement.ranks
        if awaited(job, r) and (when := due_at(r)) is not None and when <= now
    )


def extra(job: Job) -> int:
    """Replicas a running service was scaled up by and has not placed yet: the desired count
    beyond its places (every rank of the placement: live, awaiting its replacement, or ended
    for good, which keeps its place until the service is scaled down). While it rolls to a new
    spec: new replicas up to the desired count, at most `max_surge` beyond it in all."""
    if job.placement is None or job.state is not JobState.RUNNING or not is_service(job):
        return 0
    if rolling(job):
        places = [r for r in job.placement.ranks if r.live or awaited(job, r)]
        new = sum(r.generation == job.placement.generation for r in places)
        spec = job.spec
        return max(0, min(spec.replicas - new, spec.replicas + spec.max_surge - len(places)))
    return max(0, job.spec.replicas - len(job.placement.ranks))


def wanted(job: Job, now: datetime) -> int:
    """Replicas of a running service the cycle should place now."""
    return len(due(job, now)) + extra(job)


@dataclass(frozen=True, slots=True)
class CycleInput:
    """What a cycle places and what holds capacity, services' replacements included.

    A replacement is asked for as a pending job of the service's id with only the replicas to
    replace; the running service then holds its capacity under the negated id, so the two never
    meet in the snapshot (the cycle keys placements by job id)."""

    holding: tuple[Job, ...]
    pending: tuple[Job, ...]


def cycle_input(jobs: Sequence[Job], now: datetime) -> CycleInput:
    holding: list[Job] = []
    pending: list[Job] = []
    for job in jobs:
        if job.state is JobState.PENDING:
            pending.append(job)
        elif job.state.holds_resources:
            missing = wanted(job, now)
            if missing:
                holding.append(replace(job, id=-job.id))
                spec = replace(job.spec, replicas=missing)
                pending.append(replace(job, spec=spec, state=JobState.PENDING, placement=None))
            else:
                holding.append(job)
    return CycleInput(holding=tuple(holding), pending=tuple(pending))


def summary(job: Job, now: datetime) -> str:
    """What a running service's reason says: its replicas against the desired count, and what
    is being done about the missing ones ("" when all run)."""
    if job.placement is None:
        return ""
    ranks = job.placement.ranks
    live = sum(r.live for r in ranks)
    desired = job.spec.replicas
    parts = []
    if live < desired:
        parts.append(f"{live} of {desired} replicas running")
    if rolling(job):
        new = sum(r.live and r.generation == job.placement.generation for r in ranks)
        parts.append(
            f"updating to generation {job.placement.generation}: {new} of {desired} replicas new"
        )
    elif extra(job):
        parts.append(f"placing {extra(job)} more (scaled up)")
    given_up = [r for r in ranks if not r.live and failed(r) and not awaited(job, r)]
    if given_up:
        r = given_up[-1]
        parts.insert(
            0,
            f"degraded: replica {r.rank} on {r.node_id} failed {r.restarts + 1} times in a row "
            f"({ended_how(r)}); its place is given up",
        )
    waiting = next((r for r in ranks if awaited(job, r)), None)
    if waiting is not None:
        when = due_at(waiting)
        # An instant, not a countdown: the reason stays the same from cycle to cycle.
        wait = "" if when is None or when <= now else f" at {when.astimezone(UTC):%H:%M:%S}Z"
        parts.append(f"replacing replica {waiting.rank} ({ended_how(waiting)}){wait}")
    return "; ".join(parts)


def waiting_reason(job: Job, why: str, now: datetime) -> str:
    """A running service's reason when the cycle could not place its replacements."""
    head = summary(job, now).split("; replacing", 1)[0]
    return f"{head}; replacement waits: {why}" if head else f"replacement waits: {why}"


def ended_how(rank: RankPlacement) -> str:
    if rank.state is RankState.LOST:
        return rank.message or f"node {rank.node_id} lost"
    return exit_text(rank.exit_code, rank.message)


def merge(job: Job, placed: Placement, now: datetime) -> Job:
    """The running service with the replicas `placed` (by the cycle, for `wanted(job, now)`):
    first in place of the ended ones they replace, each carrying its place's count, then the
    ones a scale-up added. Every one is a new rank number."""
    assert job.placement is not None
    old = due(job, now)[: len(placed.ranks)]
    first = _next_rank(job.placement)
    generation = job.placement.generation  # every new replica runs the spec as it is now
    new = tuple(
        replace(r, rank=first + i, state=RankState.ASSIGNED, generation=generation)
        if i >= len(old)
        else replace(
            r,
            rank=first + i,
            state=RankState.ASSIGNED,
            generation=generation,
            # a replica of an older spec failing says nothing of the new one's
            restarts=restarts_after(old[i]) if old[i].generation == generation else 0,
            last_failure=ended_how(old[i]) if failed(old[i]) else old[i].last_failure,
        )
        for i, r in enumerate(placed.ranks)
    )
    replaced = {r.rank for r in old}
    ranks = tuple(r for r in job.placement.ranks if r.rank not in replaced) + new
    placement = replace(job.placement, ranks=ranks, next_rank=first + len(new))
    merged = replace(job, placement=placement, updated_at=now)
    return replace(merged, reason=summary(merged, now))


def holding_ended(job: Job) -> bool:
    """Whether ended replicas of the job still hold capacity (awaiting their replacement)."""
    return job.placement is not None and any(not r.live and holds(r) for r in job.placement.ranks)


def _next_rank(placement: Placement) -> int:
    return max(placement.next_rank, max((r.rank for r in placement.ranks), default=-1) + 1)


def let_go(job: Job) -> Job:
    """The service with its awaited ended replicas' capacity released: the cycle found no
    other place for their replacements, so the next may use what they held."""
    assert job.placement is not None
    ranks = tuple(release(r) if not r.live else r for r in job.placement.ranks)
    if ranks == job.placement.ranks:
        return job
    return replace(job, placement=replace(job.placement, ranks=ranks))


@dataclass(frozen=True, slots=True)
class Settled:
    job: Job
    events: tuple[tuple[str, str], ...]  # (type, message)


def settle(job: Job, now: datetime) -> Settled:
    """A running service after one of its replicas ended: still running while a replica runs
    or is to be replaced (ended replicas that are not let go of what they held), else
    succeeded (every replica exited 0) or failed."""
    assert job.placement is not None and is_service(job)
    events: list[tuple[str, str]] = []
    ranks = []
    for r in job.placement.ranks:
        if not r.live and not awaited(job, r) and holds(r):
            if failed(r):
                events.append(
                    (
                        "ReplicaGivenUp",
                        f"replica {r.rank} on {r.node_id} failed {r.restarts + 1} times in a "
                        f"row ({ended_how(r)}): not replaced",
                    )
                )
            r = release(r)
        ranks.append(r)
    job = replace(job, placement=replace(job.placement, ranks=tuple(ranks)))
    if any(r.live or awaited(job, r) for r in ranks):
        return Settled(replace(job, reason=summary(job, now)), tuple(events))
    bad = [r for r in ranks if failed(r)]
    if bad:
        last = max(bad, key=lambda r: (r.ended_at or now, r.rank))
        why = f"every replica ended; replica {last.rank} on {last.node_id} {ended_how(last)}"
        if last.state is not RankState.LOST:
            why += f" (after {last.restarts} replacement(s) in a row)"
        events.append(("Failed", why))
        code = last.exit_code if last.state is RankState.EXITED else None
        return Settled(
            replace(job, state=JobState.FAILED, reason=why, exit_code=code, finished_at=now),
            tuple(events),
        )
    events.append(("Succeeded", "every replica exited with 0"))
    return Settled(
        replace(job, state=JobState.SUCCEEDED, reason="", exit_code=0, finished_at=now),
        tuple(events),
    )


def lose(job: Job, node_ids: set[str], now: datetime, why: str) -> Job:
    """The job with its live ranks on `node_ids` ended as LOST (a running service's are then
    replaced elsewhere), the others untouched."""
    assert job.placement is not None
    if not any(r.live and r.node_id in node_ids for r in job.placement.ranks):
        return job
    ranks = tuple(
        replace(r, state=RankState.LOST, ended_at=now, message=f"node {r.node_id} {why}")
        if r.live and r.node_id in node_ids
        else r
        for r in job.placement.ranks
    )
    return replace(job, placement=replace(job.placement, ranks=ranks), updated_at=now)


def scale_down(
    job: Job, replicas: int, others_on: Mapping[str, bool]
) -> tuple[Job, tuple[RankPlacement, ...]]:
    """The service scaled down to `replicas` places, and the live replicas to stop for it.

    Places where nothing runs go first: replicas ended for good, then those awaiting their
    replacement. Then whole nodes, so that their leases can end: nodes nothing else uses
    (`others_on`: node -> whether other jobs run there) before shared ones, those with the
    fewest of its replicas first; on a node, replicas not started yet, then the newest."""
    assert job.placement is not None and replicas >= 1
    ranks = job.placement.ranks
    live = [r for r in ranks if r.live]
    by_node: dict[str, list[RankPlacement]] = {}
    for r in live:
        by_node.setdefault(r.node_id, []).append(r)
    nodes = sorted(by_node, key=lambda n: (others_on.get(n, False), len(by_node[n]), n))
    order = [
        *(r for r in ranks if not r.live and not awaited(job, r)),
        *(r for r in ranks if awaited(job, r)),
        *(
            r
            for n in nodes
            for r in sorted(by_node[n], key=lambda r: (r.state is RankState.RUNNING, -r.rank))
        ),
    ]
    gone = order[: max(0, len(ranks) - replicas)]
    dropped = {r.rank for r in gone}
    placement = replace(
        job.placement,
        ranks=tuple(r for r in ranks if r.rank not in dropped),
        next_rank=_next_rank(job.placement),
    )
    scaled = replace(job, spec=replace(job.spec, replicas=replicas), placement=placement)
    return scaled, tuple(r for r in gone if r.live)


# -- rolling updates ------------------------------------------------------------------------

ROLLBACK_AFTER = 2  # a new replica failing this many times in a row rolls the update back


def available(job: Job, rank: RankPlacement, now: datetime) -> bool:
    """Whether a running replica counts as available in a rolling update: an older spec's
    running one does; a new one once its readiness probe passed (if the spec has one) and it
    has run `min_ready_s`."""
    assert job.placement is not None
    if rank.generation != job.placement.generation:
        return True
    if job.spec.probed and not rank.ready:
        return False
    started = rank.started_at
    return started is not None and started + timedelta(seconds=job.spec.min_ready_s) <= now


def rolling(job: Job) -> bool:
    """Whether replicas of an older spec still run (or await a replacement)."""
    if job.placement is None or not is_service(job):
        return False
    current = job.placement.generation
    return any(r.generation != current for r in job.placement.ranks if r.live or awaited(job, r))


def update(job: Job, spec: JobSpec) -> Job:
    """The running service set to roll to `spec`: a new generation, the spec it leaves kept
    for a rollback. Its replicas move over step by step (`roll`)."""
    assert job.placement is not None
    p = job.placement
    generation = max(p.generation, p.previous_generation, *(r.generation for r in p.ranks)) + 1
    placement = replace(
        p, generation=generation, previous_spec=job.spec, previous_generation=p.generation
    )
    return replace(job, spec=spec, placement=placement)


@dataclass(frozen=True, slots=True)
class Rolled:
    """The service after a step (the same object when the step changed nothing; a rollback
    changes its spec too), and the events of the step as (type, message)."""

    job: Job
    events: tuple[tuple[str, str], ...] = ()


def _streak(rank: RankPlacement) -> int:
    """Failures in a row of a replica's place, counting its own end if it failed."""
    return restarts_after(rank) if failed(rank) else rank.restarts


def roll(job: Job, now: datetime) -> Rolled:
    """One step of a service's rolling update (Kubernetes' Deployment rules): replicas of the
    older spec stop as new ones become available (running `min_ready_s`), keeping at least
    `replicas - max_unavailable` available; the cycle places new ones up to `max_surge` beyond
    the desired count (`extra`). A new replica that failed `ROLLBACK_AFTER` times in a row
    rolls the update back: the older spec is the service's again, and its replicas, never
    stopped beyond what the update allowed, are the current ones. So does a new replica that
    runs `progress_deadline_s` without becoming available."""
    if job.state is not JobState.RUNNING or not rolling(job):
        return Rolled(job)
    assert job.placement is not None
    p, spec = job.placement, job.spec
    current = [r for r in p.ranks if r.generation == p.generation]
    worst = max((_streak(r) for r in current if r.live or failed(r)), default=0)
    deadline = timedelta(seconds=spec.progress_deadline_s)
    stuck = [
        r
        for r in current
        if r.state is RankState.RUNNING
        and not available(job, r, now)
        and r.started_at is not None
        and now - r.started_at >= deadline
    ]
    why = ""
    if worst >= ROLLBACK_AFTER:
        bad = next(r for r in current if _streak(r) == worst)
        why = f"failed {worst} times in a row ({bad.last_failure or ended_how(bad)})"
    elif stuck:
        why = (
            f"was not ready {spec.progress_deadline_s} s after it started (replica {stuck[0].rank})"
        )
    if why and p.previous_spec is not None:
        why = (
            f"rolled back to generation {p.previous_generation}: a replica of generation "
            f"{p.generation} {why}"
        )
        # The failed spec's ended replicas are not replaced; its live ones stop as the roll
        # back goes (they are of an older generation now).
        placement = replace(
            p,
            ranks=tuple(r for r in p.ranks if r.live or r.generation != p.generation),
            generation=p.previous_generation,
            previous_spec=None,
            previous_generation=0,
            next_rank=_next_rank(p),
        )
        back = replace(job, spec=p.previous_spec, placement=placement, updated_at=now)
        return Rolled(replace(back, reason=why), (("RolledBack", why),))
    ready = {r.rank for r in p.ranks if r.state is RankState.RUNNING and available(job, r, now)}
    old = [r for r in p.ranks if r.generation != p.generation and (r.live or awaited(job, r))]
    room = len(ready) - (spec.replicas - spec.max_unavailable)
    # Old places where nothing runs go first; then old replicas not started, then the newest.
    order = sorted(old, key=lambda r: (r.live, r.state is RankState.RUNNING, -r.rank))
    new_ready = sum(r.generation == p.generation for r in p.ranks if r.rank in ready)
    stop: list[RankPlacement] = []
    for r in order:
        if r.rank not in ready:  # nothing available is lost (awaiting a replacement, not started)
            stop.append(r)
        elif room > 0 or new_ready >= spec.replicas:
            stop.append(r)
            room -= 1
    events: list[tuple[str, str]] = []
    gone = {r.rank for r in stop}
    ranks = tuple(r for r in p.ranks if r.rank not in gone)
    placement = replace(p, ranks=ranks, next_rank=_next_rank(p))
    rolled = replace(job, placement=placement)
    if not rolling(rolled):
        placement = replace(placement, previous_spec=None, previous_generation=0)
        rolled = replace(rolled, placement=placement)
        events.append(("Updated", f"every replica runs generation {p.generation} of the spec"))
    if stop:
        live = [r for r in stop if r.live]
        if live:
            events.insert(
                0,
                (
                    "RollingUpdate",
                    "stopping "
                    + ", ".join(f"replica {r.rank} on {r.node_id}" for r in live)
                    + f" (generation {live[0].generation}); {new_ready} of {spec.replicas} new "
                    "replicas available",
                ),
            )
    if not stop and not events:
        return Rolled(job)
    return Rolled(replace(rolled, updated_at=now, reason=summary(rolled, now)), tuple(events))
