"""The cycle's lease phase (`core.cycle`, after placing what it could): lease for the waiting
jobs the leased nodes cannot take, and give back the leases nothing will use."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from gpuctl.core.engine.verdicts import shape
from gpuctl.core.leasing.offers import (
    BudgetBook,
    Option,
    gang_options,
    grant_limits,
    offer_key,
    replica_options,
)
from gpuctl.core.leasing.terms import LeaseRelease, LeaseRequest, Leasing, duration, managed
from gpuctl.core.model import Job, JobKind, LeaseState, NodeLease
from gpuctl.core.plugins import plural
from gpuctl.core.snapshot import NodeView

# Queued jobs looked at when deciding whether an idle leased node is worth its idle grace:
# the next few to start, which is who would take it.
_GRACE_CANDIDATES = 32


# -- the cycle's lease phase ----------------------------------------------------------------


Fits = Callable[[Job, NodeView], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class LeasePlan:
    requests: tuple[LeaseRequest, ...] = ()
    releases: tuple[LeaseRelease, ...] = ()
    notes: Mapping[int, str] = field(default_factory=dict)  # job -> what leasing does for it
    kept: Mapping[str, str] = field(default_factory=dict)  # idle lease kept -> why


def plan_leases(
    leasing: Leasing,
    waiting: Sequence[Job],
    *,
    nodes: Sequence[NodeView],
    barred: frozenset[int],
    replicas_short: Callable[[Job], int],
    fits: Fits,
    now: datetime,
    serving: Mapping[int, Job] | None = None,
) -> LeasePlan:
    """After the cycle placed what it could: lease for the `waiting` jobs (in queue order) that
    the leased nodes cannot take, and give back leases nothing will use.

    `nodes`: every node as the cycle leaves it; `barred`: waiting jobs held back by the queue
    itself (new nodes would not start them); `replicas_short(job)`: replicas of an inference
    job that do not fit on the nodes now; `fits(job, node)`: the policy's filters;
    `serving`: the inference jobs running, by id (the services whose idle nodes
    `Leasing.service_grace_s` keeps, and whose headroom `Leasing.service_headroom` leases).
    """
    by_node = {v.id: v for v in nodes}
    requested: dict[int, list[NodeLease]] = {}
    for lease in leasing.leases:
        if lease.state is LeaseState.REQUESTED and lease.for_job_id is not None:
            requested.setdefault(lease.for_job_id, []).append(lease)
    releases, kept = _releases(leasing, waiting, by_node, requested, fits, now, serving or {})
    gone = {r.lease_id for r in releases}
    book = BudgetBook(leasing)
    limits = grant_limits(leasing.offers)
    memo: dict[tuple[object, ...], tuple[tuple[Option, ...], str]] = {}
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
        key = (offer_key(job.spec, limits), excluded, short)
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
        within = "; within budget" if over else ""
        request = _request(job, chosen, f"{_leasing(chosen)}{within}{failed_note}")
        requests.append(request)
        notes[job.id] = request.reason
    if leasing.service_headroom > 0 and serving and leasing.offers:
        requests.extend(_headroom(leasing, serving, requested, gone, book, replicas_short))
    return LeasePlan(requests=tuple(requests), releases=releases, notes=notes, kept=kept)


def service_key(job: Job) -> tuple[object, ...]:
    """Running inference jobs with the same key are replicas of one service: gpuctld runs a
    service as one job, an autoscaler may submit a job per replica."""
    spec = job.spec
    return (spec.owner, spec.queue, spec.command, shape(replace(spec, replicas=1, name="")))


def _headroom(
    leasing: Leasing,
    serving: Mapping[int, Job],
    requested: Mapping[int, Sequence[NodeLease]],
    gone: set[str],
    book: BudgetBook,
    replicas_short: Callable[[Job], int],
) -> list[LeaseRequest]:
    """Leases for the headroom each running service lacks (`Leasing.service_headroom`): for
    the replicas of it the nodes cannot take now, nothing for it being on its way already."""
    groups: dict[tuple[object, ...], list[Job]] = {}
    for job in sorted(serving.values(), key=lambda j: j.id):
        groups.setdefault(service_key(job), []).append(job)
    out = []
    for members in groups.values():
        if any(x.id not in gone for j in members for x in requested.get(j.id, ())):
            continue  # its headroom, or a replica's node, is on its way
        first = members[0]
        want = replace(first, spec=replace(first.spec, replicas=leasing.service_headroom))
        short = replicas_short(want)
        if short <= 0:
            continue
        options, _ = replica_options(want, short, leasing.offers)
        chosen = next((o for o in options if not book.over(want, o)), None)
        if chosen is None:
            continue
        book.take(want, chosen)
        more = f"headroom for service {first.id} ({plural(short, 'replica')} more ready)"
        out.append(_request(want, chosen, f"{more}: {_leasing(chosen)}"))
    return out


def _leasing(chosen: Option) -> str:
    offer = chosen.offer
    return (
        f"leasing {chosen.count}x {offer.sku} from {offer.provider} at "
        f"${offer.price_per_hour:.2f}/h each: {chosen.why}"
    )


def _request(job: Job, chosen: Option, reason: str) -> LeaseRequest:
    offer = chosen.offer
    return LeaseRequest(
        job_id=job.id,
        provider=offer.provider,
        sku=offer.sku,
        count=chosen.count,
        price_per_hour=offer.price_per_hour,
        same_fabric=job.spec.is_gang,
        reason=reason,
    )


def _releases(
    leasing: Leasing,
    waiting: Sequence[Job],
    by_node: Mapping[str, NodeView],
    requested: Mapping[int, Sequence[NodeLease]],
    fits: Fits,
    now: datetime,
    serving: Mapping[int, Job],
) -> tuple[tuple[LeaseRelease, ...], dict[str, str]]:
    """Leases nothing will use: requested for a job that no longer waits; a node its job could
    not use; an idle node no queued job fits, or one idle past the grace, but for the nodes of
    services still running (`Leasing.service_grace_s`) and the warm pool
    (`Leasing.warm_nodes`). Also, for each idle leased node kept, why."""
    waiting_by_id = {j.id: j for j in waiting}
    candidates = list(waiting)[:_GRACE_CANDIDATES]
    grace = leasing.idle_grace_s
    out: list[LeaseRelease] = []
    kept: dict[str, str] = {}
    idle: list[tuple[NodeLease, NodeView]] = []  # given back as no job waits for them
    service_grace = leasing.service_grace_s
    headroom = leasing.service_headroom if serving else 0
    ready: dict[tuple[object, ...], int] = {}  # service -> idle nodes kept as its headroom
    for lease in leasing.leases:
        if not managed(lease):
            continue
        owner = lease.for_job_id
        if lease.state is LeaseState.REQUESTED:
            if headroom and owner in serving and owner not in waiting_by_id:
                kept[lease.id] = f"headroom for service {owner}: on its way"
                continue
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
                kept[lease.id] = f"for job {job.id}: the rest of its nodes are on their way"
                continue
            if not job.spec.is_gang and usable and idle_for < grace:
                left = duration(grace - idle_for)
                kept[lease.id] = f"for job {job.id}, queued (idle grace, {left} left)"
                continue
            why = (
                f"job {job.id} could not use node {view.id}"
                if not usable
                else f"job {job.id} did not start on it within the idle grace"
                if not job.spec.is_gang
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
        # A service still running that scaled down off the node (its replica fits it).
        service = serving.get(owner) if owner is not None else None
        if service is not None and not fits(service, view):
            service = None
        if service is not None and headroom:
            key = service_key(service)
            if ready.get(key, 0) < headroom:
                ready[key] = ready.get(key, 0) + 1
                kept[lease.id] = f"headroom for service {owner} ({ready[key]} of {headroom})"
                continue
        if service is not None and idle_for < service_grace:
            left = duration(service_grace - idle_for)
            kept[lease.id] = f"for service {owner}'s next scale-up (service grace, {left} left)"
            continue
        if idle_for < grace:
            taker = next((c for c in candidates if fits(c, view)), None)
            if taker is not None:
                left = duration(grace - idle_for)
                kept[lease.id] = f"for job {taker.id}, queued (idle grace, {left} left)"
                continue
            why = f"idle; no queued job fits node {view.id}"
        elif grace > 0:
            why = f"idle for {duration(idle_for)} (idle grace {duration(grace)})"
        else:
            why = "idle; no idle grace"
        if service is not None and service_grace > 0:
            done = (
                f"service {owner} has not scaled back onto it within the service grace "
                f"({duration(service_grace)}); "
            )
        else:
            done = f"job {owner} no longer needs it; " if owner is not None else ""
        out.append(
            LeaseRelease(lease_id=lease.id, node_id=view.id, reason=done + why, job_id=owner)
        )
        idle.append((lease, view))
    if warm := _kept_warm(leasing.warm_nodes, idle):
        out = [r for r in out if r.lease_id not in warm]
        kept.update((x, f"warm pool ({len(warm)} of {leasing.warm_nodes} kept)") for x in warm)
    return tuple(out), kept


def _kept_warm(warm: int, idle: Sequence[tuple[NodeLease, NodeView]]) -> frozenset[str]:
    """The leases of the `warm` cheapest idle nodes (by price, then node id), kept."""
    if warm <= 0:
        return frozenset()
    cheapest = sorted(idle, key=lambda item: (item[0].price_per_hour, item[1].id))[:warm]
    return frozenset(lease.id for lease, _ in cheapest)
