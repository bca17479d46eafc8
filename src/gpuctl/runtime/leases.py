"""The lease keeper: acts on the cycle's lease requests and releases through the configured
providers, matches a registering node to its lease, renews leases in use, fails a lease over
to the next-best offer when acquiring fails or its node never comes up, and reconciles every
lease with its provider after a restart (nothing leaked, nothing released twice).

Providers can be slow (the command provider runs scripts): they are only ever called outside
the controller's lock, and the store is read again under the lock before anything is written.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gpuctl.core.cost import charges
from gpuctl.core.cycle import CycleResult
from gpuctl.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from gpuctl.core.leasing import Budget, Leasing, Offer, Spend, managed
from gpuctl.core.lifecycle import LeaseEvent, NodeEvent, next_lease_state, next_node_state
from gpuctl.core.model import Event, Job, JobState, LeaseState, Node, NodeLease, NodeState
from gpuctl.providers.base import (
    Acquired,
    Held,
    LeaseNotHeld,
    Provider,
    ProviderError,
    ProviderMisconfigured,
    Sku,
)
from gpuctl.providers.registry import KINDS, Setting

if TYPE_CHECKING:
    from gpuctl.core.cost import NodePrice
    from gpuctl.runtime.clock import Clock
    from gpuctl.store.base import Store


class ControllerSide(Protocol):
    """What the keeper needs of the controller (`runtime.controller.Controller` is one), and
    nothing more: its store and clock, a write section (the keeper reads the store again in it
    before writing over what it read), the running jobs and what they use, writing jobs, and
    waking the cycle. The composition root hands the keeper to the controller
    (`Controller.attach_leases`) when this gpuctld starts leading."""

    store: Store
    clock: Clock

    def writing(self) -> AbstractContextManager[object]:
        """A write section: no other writer of the controller's (a cycle's decisions, a
        heartbeat, a cancel) runs while it is held, so what the keeper reads in it is what
        it writes over. Never held while a provider is called."""
        ...

    def active_jobs(self) -> tuple[Job, ...]: ...

    def node_usage(self) -> dict[str, dict[int, tuple[int, list[int]]]]: ...

    def node_prices(self) -> dict[str, NodePrice]: ...

    def jobs(self, *, queue: str = "") -> Iterable[Job]: ...

    def write_jobs(self, jobs: Sequence[Job], events: Sequence[Event]) -> tuple[Job, ...]: ...

    def keep_leases(self) -> list[str]: ...

    def wake(self) -> None: ...


log = logging.getLogger(__name__)

UNKNOWN_RELEASE = "release"
UNKNOWN_ADOPT = "adopt"
_OPEN = (LeaseState.REQUESTED, LeaseState.ACTIVE, LeaseState.RELEASING)


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseSettings:
    idle_grace_s: float = 300.0  # an idle leased node a queued job fits is kept this long
    warm_nodes: int = 0  # idle leased nodes kept beyond those (core.leasing.Leasing)
    service_grace_s: float = 1800.0  # an idle node a running service left is kept this long
    service_headroom: int = 0  # replicas of each running service kept ready, leased ahead
    boot_timeout_s: float = 600.0  # a granted node must register within this
    renew_before_s: float = 600.0  # a lease in use is renewed this long before it ends
    retry_after_s: float = 900.0  # an offer that failed a job is skipped for it this long
    unknown: str = UNKNOWN_RELEASE  # a provider's lease gpuctl does not know: release | adopt
    budgets: Mapping[str, Budget] = field(default_factory=dict)  # by queue


# -- building providers from config ----------------------------------------------------------


def build_providers(
    tables: Sequence[Mapping[str, object]],
    *,
    base_dir: Path,
    leases: Iterable[NodeLease] = (),
) -> tuple[Provider, ...]:
    """Providers from `[[provider]]` tables (see config/providers.toml). `leases` are the
    store's: the static and catalog providers keep their grants in memory, so the open ones
    are handed back to them, which is how a claim survives a restart."""
    violations: list[FieldViolation] = []
    out: list[Provider] = []
    names: set[str] = set()
    open_leases = [x for x in leases if x.provider_lease_id and x.state in _OPEN]
    for i, table in enumerate(tables):
        kind = table.get("kind")
        name = table.get("name")
        if kind not in KINDS:
            violations.append(
                FieldViolation(f"provider[{i}].kind", f"must be one of {', '.join(KINDS)}")
            )
            continue
        if isinstance(name, str) and name in names:
            violations.append(FieldViolation(f"provider[{i}].name", f"{name} is used twice"))
            continue
        held = tuple(_held(x) for x in open_leases if x.provider == name)
        try:
            provider = KINDS[kind](table, Setting(base_dir=base_dir, held=held))
        except InvalidArgument as e:
            violations.extend(
                FieldViolation(f"provider[{i}].{v.field}", v.description) for v in e.violations
            )
            continue
        names.add(provider.name)
        out.append(provider)
    if violations:
        raise InvalidArgument(violations)
    return tuple(out)


def _held(lease: NodeLease) -> Held:
    return Held(
        lease_id=lease.provider_lease_id,
        sku=lease.sku,
        node=lease.node_id,
        price_per_hour=lease.price_per_hour,
        acquired_at=lease.acquired_at,
        expires_at=lease.expires_at,
    )


def offer_of(provider: Provider, sku: Sku) -> Offer:
    """A provider's SKU as the core ranks it."""
    return sku.offer(provider=provider.name, renewable=provider.can_renew)


# -- the keeper ----------------------------------------------------------------------------


class LeaseKeeper:
    """Leases for the controller. `tick` is the daemon's periodic "leases" task; `context`,
    `apply` and `match` are called by the controller under its lock."""

    def __init__(
        self,
        controller: ControllerSide,
        providers: Sequence[Provider],
        settings: LeaseSettings | None = None,
        *,
        wake: Callable[[], None] = lambda: None,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.c = controller
        self.store = controller.store
        self.clock = controller.clock
        self.providers = {p.name: p for p in providers}
        self.settings = settings or LeaseSettings()
        self.wake = wake  # asks for a `tick` soon
        self._new_id = new_id or (lambda: f"L{uuid.uuid4().hex[:12]}")
        self.offers = tuple(offer_of(p, s) for p in providers for s in p.skus())
        self._renewable = {p.name for p in providers if p.can_renew}
        # node name -> the static provider whose inventory lists it: such a node serves only
        # while leased, like any other provider's
        self._inventory = {name: p.name for p in providers for name in p.inventory()}
        self._memory = threading.Lock()  # the dicts below: the cycle and the tick both touch them
        self._where: dict[str, tuple[str, str]] = {}  # lease id -> (address, fabric) it was given
        # job -> (provider, sku) -> when it failed the job; kept in the store too, read back
        # here, so a gpuctld taking over does not ask a failing offer again at once. (Since
        # when a leased node is idle is on its lease, in the store.)
        self._failed: dict[int, dict[tuple[str, str], datetime]] = {}
        since = self.clock.now() - timedelta(seconds=self.settings.retry_after_s)
        for job_id, provider_name, sku, at in self.store.failed_offers(since=since):
            self._failed.setdefault(job_id, {})[(provider_name, sku)] = at
        self._inflight: set[str] = set()  # intents being acquired right now
        # Idle leased nodes the last cycle kept, and why (`gpuctl leases`): not stored, the
        # next cycle says it again.
        self.kept: Mapping[str, str] = {}
        self._timing_out: set[str] = set()  # granted, never came up, being given back now
        self._unreconciled = set(self.providers)
        self._orphans_checked = False
        # Requests made before a restart whose answer was never written: failed at reconcile
        # (a grant the provider did make shows up there as a lease gpuctl does not know).
        self._stale = {
            x.id
            for x in self.store.list_leases()
            if x.state is LeaseState.REQUESTED and not x.provider_lease_id
        }

    # -- called by the controller, under its lock -------------------------------------------

    def context(self, nodes: Sequence[Node], active: Sequence[Job], now: datetime) -> Leasing:
        """The lease side of the cycle's input."""
        leases = self.store.list_leases()
        holding = {
            r.node_id
            for j in active
            if j.state.holds_resources and j.placement is not None
            for r in j.placement.ranks
        }
        node_ids = {n.id for n in nodes}
        window = now - timedelta(seconds=self.settings.retry_after_s)
        kept = []
        for lease in leases:
            if managed(lease) and lease.state is LeaseState.ACTIVE:
                idle = lease.node_id not in holding and lease.node_id in node_ids
                if idle != (lease.idle_since is not None):  # written as it changes only
                    lease = self.store.put_lease(replace(lease, idle_since=now if idle else None))
            kept.append(lease)
        leases = tuple(kept)
        idle_since = {x.node_id: x.idle_since for x in leases if _idle(x)}
        with self._memory:
            failed, expired = {}, False
            for job_id, offers in list(self._failed.items()):
                recent = frozenset(k for k, t in offers.items() if t > window)
                if recent:
                    failed[job_id] = recent
                else:
                    del self._failed[job_id]
                    expired = True
            renewable = frozenset(self._renewable)
        if expired:
            self.store.forget_failed_offers(before=window)
        return Leasing(
            offers=self.offers,
            leases=leases,
            renewable=renewable,
            budgets=self.settings.budgets,
            spend=self._spend(leases, active, now) if self.settings.budgets else {},
            failed=failed,
            idle_since=idle_since,
            idle_grace_s=self.settings.idle_grace_s,
            warm_nodes=self.settings.warm_nodes,
            service_grace_s=self.settings.service_grace_s,
            service_headroom=self.settings.service_headroom,
        )

    def _spend(
        self, leases: Sequence[NodeLease], active: Sequence[Job], now: datetime
    ) -> dict[str, Spend]:
        """Per budgeted queue: $/h of the open leases taken for its jobs, and its jobs' charges."""
        queue_of = {j.id: j.spec.queue for j in active}
        rate: dict[str, float] = {}
        for lease in leases:
            if not managed(lease) or lease.for_job_id is None:
                continue
            queue = queue_of.get(lease.for_job_id)
            if queue is None:
                try:
                    queue = self.store.get_job(lease.for_job_id).spec.queue
                except NotFound:
                    continue
            rate[queue] = rate.get(queue, 0.0) + lease.price_per_hour
        out = {}
        prices = self.c.node_prices()
        for queue, budget in self.settings.budgets.items():
            dollars = 0.0
            if budget.dollars:
                dollars = sum(c.dollars for c in charges(self.c.jobs(queue=queue), prices, now=now))
            out[queue] = Spend(dollars_per_hour=rate.get(queue, 0.0), dollars=dollars)
        return out

    def apply(self, result: CycleResult, now: datetime) -> list[Event]:
        """Write what the cycle decided about leases: new requests, releases, and which job a
        reused idle node now serves. Returns the events for the cycle's write."""
        events: list[Event] = []
        if result.lease_kept is not None:
            self.kept = result.lease_kept
        leases = {x.id: x for x in self.store.list_leases()}
        by_node = {x.node_id: x for x in leases.values() if x.node_id and managed(x)}
        idle = {x.node_id for x in leases.values() if _idle(x)}
        for binding in result.bindings:
            for node_id in dict.fromkeys(binding.placement.node_ids):
                lease = by_node.get(node_id)
                if lease is None or lease.for_job_id == binding.job_id or node_id not in idle:
                    continue
                # An idle node kept for a queued job: it serves that job now, and is given back
                # when that one is done.
                self.store.put_lease(replace(lease, for_job_id=binding.job_id))
        for request in result.lease_requests:
            ids = []
            for _ in range(request.count):
                lease = NodeLease(
                    id=self._new_id(),
                    provider=request.provider,
                    sku=request.sku,
                    price_per_hour=request.price_per_hour,
                    for_job_id=request.job_id,
                    state=LeaseState.REQUESTED,
                )
                self.store.put_lease(lease)
                ids.append(lease.id)
            events.append(_event("job", str(request.job_id), now, "LeaseRequested", request.reason))
            events.append(
                _event("lease", ids[0], now, "Requested", f"{len(ids)} lease(s): {request.reason}")
            )
            log.info("job %d: %s", request.job_id, request.reason)
        for release in result.lease_releases:
            lease = leases.get(release.lease_id)
            if lease is None or lease.state not in _OPEN:
                continue
            state = next_lease_state(lease.id, lease.state, LeaseEvent.RELEASE)
            self.store.put_lease(replace(lease, state=state))
            why = f"lease {lease.id} releasing: {release.reason}"
            events.append(_event("lease", lease.id, now, "Releasing", release.reason))
            if lease.node_id:
                self._drain(lease.node_id, lease.id, why, now, events)
            if release.unusable and release.job_id is not None:
                self._note_failure(release.job_id, lease.provider, lease.sku, now)
                events.append(
                    _event(
                        "job",
                        str(release.job_id),
                        now,
                        "LeaseUnusable",
                        f"{release.reason}; lease {lease.id} ({lease.sku} from {lease.provider}) "
                        "given back, the next cycle tries the next-best offer",
                    )
                )
            log.info("%s", why)
        if result.lease_requests or result.lease_releases:
            self.wake()
        return events

    def _drain(self, node_id: str, lease_id: str, why: str, now: datetime, events: list[Event]):
        try:
            node = self.store.get_node(node_id)
        except NotFound:
            return
        if node.lease_id != lease_id or node.state in (NodeState.LOST, NodeState.RELEASED):
            return
        state = next_node_state(node.id, node.state, NodeEvent.DRAIN)
        self.store.put_node(replace(node, state=state, state_reason=why))
        events.append(_event("node", node_id, now, "Drain", why))

    def match(self, reported: Node, known: Node | None, now: datetime) -> NodeLease | None:
        """The lease a registering node comes up under: one granted for it (by the node name
        the provider gave, else its address), or the managed lease it already has. None: a
        node that registers by itself. A node a provider lent and took back is refused."""
        leases = self.store.list_leases()
        with self._memory:
            where = dict(self._where)
        granted = [x for x in leases if x.state is LeaseState.REQUESTED and x.provider_lease_id]
        found = next((x for x in granted if x.node_id == reported.id), None)
        if found is None:
            found = next(
                (
                    x
                    for x in granted
                    if not x.node_id and where.get(x.id, ("", ""))[0] == reported.address
                ),
                None,
            )
        if found is not None:
            with self._memory:
                late = found.id in self._timing_out
            if late:
                raise FailedPrecondition(
                    f"node {reported.id} came up after its boot timeout; its lease {found.id} "
                    f"is being given back to {found.provider}"
                )
            state = next_lease_state(found.id, found.state, LeaseEvent.REGISTERED)
            lease = self.store.put_lease(replace(found, state=state, node_id=reported.id))
            self.store.add_events(
                [_event("lease", lease.id, now, "Active", f"node {reported.id} registered")]
            )
            log.info("lease %s active: node %s registered", lease.id, reported.id)
            if known is not None and known.lease_id and known.lease_id != lease.id:
                self._end_self_lease(known.lease_id, now)
            return lease
        current = None
        if known is not None and known.lease_id:
            current = next((x for x in leases if x.id == known.lease_id), None)
        if current is not None and current.provider_lease_id:
            return current
        owner = self._inventory.get(reported.id)
        if owner is not None:
            raise FailedPrecondition(
                f"node {reported.id} is in provider {owner}'s inventory and not leased now; "
                "it joins when gpuctl leases it"
            )
        if known is None or not known.lease_id or current is not None:
            return None
        ended = next(
            (x for x in self.store.list_leases(include_released=True) if x.id == known.lease_id),
            None,
        )
        if ended is not None and ended.provider_lease_id:
            raise FailedPrecondition(
                f"node {reported.id} was leased from provider {ended.provider} and its lease "
                f"{ended.id} is {ended.state.value}; it joins again when gpuctl leases it"
            )
        return None

    def fabric_of(self, lease: NodeLease) -> str:
        with self._memory:
            return self._where.get(lease.id, ("", ""))[1]

    def _end_self_lease(self, lease_id: str, now: datetime) -> None:
        """A self-registered node that a provider now lends: its own lease ends here."""
        for x in self.store.list_leases():
            if x.id == lease_id and not x.provider_lease_id and x.state is LeaseState.ACTIVE:
                self.store.put_lease(replace(x, state=LeaseState.RELEASED, released_at=now))

    # -- the periodic task ----------------------------------------------------------------

    def tick(self) -> None:
        """Reconcile (until each provider answered once), acquire what was requested, fail
        what never came up, renew what is in use, expire what ended, release what was let go."""
        if not self._orphans_checked:
            self._orphans()
            self._orphans_checked = True
        for name in sorted(self._unreconciled):
            self.reconcile(name)
        self._acquire()
        self._boot_timeouts()
        self._renew()
        self.c.keep_leases()
        self._release()

    def _open(self) -> tuple[NodeLease, ...]:
        with self.c.writing():
            return self.store.list_leases()

    # acquire -------------------------------------------------------------------------------

    def _acquire(self) -> None:
        groups: dict[tuple[str, str, int | None], list[NodeLease]] = {}
        with self.c.writing(), self._memory:
            for x in self.store.list_leases():
                if (
                    x.state is LeaseState.REQUESTED
                    and not x.provider_lease_id
                    and x.id not in self._inflight
                    and x.id not in self._stale
                    and x.provider not in self._unreconciled
                ):
                    groups.setdefault((x.provider, x.sku, x.for_job_id), []).append(x)
            for rows in groups.values():
                self._inflight.update(x.id for x in rows)
        for (name, sku, job_id), rows in groups.items():
            try:
                self._acquire_one(name, sku, job_id, rows)
            finally:
                with self._memory:
                    self._inflight.difference_update(x.id for x in rows)

    def _acquire_one(self, name: str, sku: str, job_id: int | None, rows: list[NodeLease]):
        provider = self.providers.get(name)
        if provider is None:
            self._fail(rows, f"provider {name} is not configured")
            return
        gang = False
        if job_id is not None:
            with self.c.writing():
                try:
                    job = self.store.get_job(job_id)
                    gang = job.spec.is_gang
                except NotFound:
                    pass
        now = self.clock.now()
        try:
            got = provider.acquire(sku, len(rows), now=now)
        except ProviderError as e:
            self._fail(rows, str(e))
            return
        except Exception as e:  # a provider bug must not leave the request hanging
            log.exception("provider %s: acquire of %s failed", name, sku)
            self._fail(rows, f"provider {name}: {type(e).__name__}: {e}")
            return
        fabrics = {a.fabric.split("/", 1)[0] for a in got}
        if gang and (len(fabrics) != 1 or not next(iter(fabrics))):
            shown = ", ".join(sorted(f or "none" for f in fabrics))
            for a in got:
                self._give_back(provider, a.lease_id)
            self._fail(rows, f"provider {name} gave nodes on fabrics {shown}, not one")
            return
        self._granted(provider, rows, got, now)

    def _give_back(self, provider: Provider, lease_id: str) -> None:
        try:
            provider.release(lease_id, now=self.clock.now())
        except ProviderError as e:
            log.error("giving back %s: %s (reconcile will find it)", lease_id, e)

    def _granted(
        self, provider: Provider, rows: list[NodeLease], got: Sequence[Acquired], now: datetime
    ) -> None:
        activated = False
        with self.c.writing():
            current = {x.id: x for x in self.store.list_leases()}
            events: list[Event] = []
            for row, grant in zip(rows, got, strict=True):
                lease = current.get(row.id, row)
                state = lease.state
                if state is LeaseState.REQUESTED:
                    state = next_lease_state(lease.id, state, LeaseEvent.GRANTED)
                # A lease let go of while the provider was answering stays RELEASING: with its
                # provider id it is released like any other.
                lease = self.store.put_lease(
                    replace(
                        lease,
                        state=state,
                        provider_lease_id=grant.lease_id,
                        node_id=grant.node,
                        price_per_hour=grant.price_per_hour,
                        acquired_at=grant.acquired_at or now,
                        expires_at=grant.expires_at,
                    )
                )
                with self._memory:
                    self._where[lease.id] = (grant.address, grant.fabric)
                where = f"node {grant.node}" if grant.node else f"address {grant.address or '-'}"
                events.append(
                    _event(
                        "lease",
                        lease.id,
                        now,
                        "Granted",
                        f"{provider.name} lease {grant.lease_id}: {where}, "
                        f"${grant.price_per_hour:.2f}/h",
                    )
                )
                if lease.state is LeaseState.REQUESTED and self._activate_registered(lease, now):
                    activated = True
            self.store.add_events(events)
        log.info(
            "provider %s granted %d x %s: %s",
            provider.name,
            len(got),
            rows[0].sku,
            ", ".join(a.node or a.lease_id for a in got),
        )
        if activated:
            self.c.wake()

    def _activate_registered(self, lease: NodeLease, now: datetime) -> bool:
        """A granted node whose agent is registered already (a static node that never went
        away) is active at once."""
        if not lease.node_id:
            return False
        try:
            node = self.store.get_node(lease.node_id)
        except NotFound:
            return False
        if node.state in (NodeState.LOST, NodeState.RELEASED):
            return False
        active = self.store.put_lease(
            replace(lease, state=next_lease_state(lease.id, lease.state, LeaseEvent.REGISTERED))
        )
        if node.lease_id and node.lease_id != active.id:
            self._end_self_lease(node.lease_id, now)
        self.store.put_node(
            replace(
                node,
                lease_id=active.id,
                provider=active.provider,
                sku=active.sku,
                price_per_hour=active.price_per_hour,
            )
        )
        return True

    def _fail(self, rows: Sequence[NodeLease], why: str) -> None:
        """The request could not be met: its leases FAIL (the provider holds nothing of them)
        and its job hears that the next cycle tries the next-best offer."""
        now = self.clock.now()
        first = rows[0]
        what = f"lease of {len(rows)}x {first.sku} from {first.provider}"
        message = f"{what} failed: {why}; the next cycle tries the next-best offer"
        with self.c.writing():
            current = {x.id: x for x in self.store.list_leases()}
            events = []
            for row in rows:
                lease = current.get(row.id)
                if lease is None:
                    continue
                if lease.state is LeaseState.RELEASING:  # let go meanwhile: nothing to fail over
                    state = next_lease_state(lease.id, lease.state, LeaseEvent.RELEASED)
                    self.store.put_lease(replace(lease, state=state, released_at=now))
                    continue
                if lease.state is not LeaseState.REQUESTED:
                    continue
                state = next_lease_state(lease.id, lease.state, LeaseEvent.FAILED)
                self.store.put_lease(replace(lease, state=state, released_at=now))
                events.append(_event("lease", lease.id, now, "Failed", why))
            if first.for_job_id is not None:
                self._note_failure(first.for_job_id, first.provider, first.sku, now)
                events.append(_event("job", str(first.for_job_id), now, "LeaseFailed", message))
                try:
                    job = self.store.get_job(first.for_job_id)
                except NotFound:
                    job = None
                if job is not None and job.state is JobState.PENDING:
                    self.c.write_jobs([replace(job, reason=message, updated_at=now)], ())
            self.store.add_events(events)
        log.warning("job %s: %s", first.for_job_id, message)
        self.c.wake()

    def _note_failure(self, job_id: int, provider: str, sku: str, now: datetime) -> None:
        with self._memory:
            self._failed.setdefault(job_id, {})[(provider, sku)] = now
        self.store.note_failed_offer(job_id, provider, sku, now)

    # boot timeouts ---------------------------------------------------------------------------

    def _boot_timeouts(self) -> None:
        now = self.clock.now()
        cutoff = now - timedelta(seconds=self.settings.boot_timeout_s)
        with self.c.writing(), self._memory:
            # Marked under the lock: a node registering from now on is refused, not matched to
            # a lease about to be given back.
            late = [
                x
                for x in self.store.list_leases()
                if x.state is LeaseState.REQUESTED
                and x.provider_lease_id
                and x.acquired_at is not None
                and x.acquired_at <= cutoff
            ]
            self._timing_out.update(x.id for x in late)
        for lease in late:
            try:
                provider = self.providers.get(lease.provider)
                if provider is not None:
                    try:
                        provider.release(lease.provider_lease_id, now=self.clock.now())
                    except ProviderError as e:
                        log.error("lease %s timed out, and releasing it failed: %s", lease.id, e)
                        continue  # again at the next tick: failing it now would leak the node
                with self._memory:
                    address = self._where.get(lease.id, ("", ""))[0]
                node = f"node {lease.node_id}" if lease.node_id else address or "its node"
                timeout = timedelta(seconds=self.settings.boot_timeout_s)
                self._fail([lease], f"{node} did not register within {timeout} (given back)")
            finally:
                with self._memory:
                    self._timing_out.discard(lease.id)

    # renewals --------------------------------------------------------------------------------

    def _renew(self) -> None:
        now = self.clock.now()
        soon = now + timedelta(seconds=self.settings.renew_before_s)
        with self._memory:
            renewable = set(self._renewable)
        with self.c.writing():
            in_use = set(self.c.node_usage())
            pending = {j.id for j in self.c.active_jobs() if j.state is JobState.PENDING}
            due = [
                x
                for x in self.store.list_leases()
                if x.state is LeaseState.ACTIVE
                and x.provider_lease_id
                and x.expires_at is not None
                and x.expires_at <= soon
                and x.expires_at > now
                and x.provider in renewable
                and (x.node_id in in_use or x.for_job_id in pending)
            ]
        for lease in due:
            provider = self.providers.get(lease.provider)
            if provider is None:
                continue
            try:
                expires = provider.renew(lease.provider_lease_id, now=self.clock.now())
            except LeaseNotHeld as e:
                self._lost(lease, f"renewal refused: {e}")
                continue
            except ProviderMisconfigured as e:
                log.error("%s; its leases will not be renewed", e)
                with self._memory:
                    self._renewable.discard(lease.provider)
                continue
            except ProviderError as e:
                log.warning("renewing lease %s failed (tried again next time): %s", lease.id, e)
                continue
            with self.c.writing():
                current = next((x for x in self.store.list_leases() if x.id == lease.id), None)
                if current is None or current.state is not LeaseState.ACTIVE:
                    continue
                state = next_lease_state(lease.id, current.state, LeaseEvent.RENEWED)
                self.store.put_lease(replace(current, state=state, expires_at=expires))
                until = f"{expires:%Y-%m-%d %H:%M:%S}Z" if expires else "no end"
                self.store.add_events([_event("lease", lease.id, now, "Renewed", f"until {until}")])
            log.info("lease %s renewed until %s", lease.id, expires)

    def _lost(self, lease: NodeLease, why: str) -> None:
        """The provider no longer holds a lease we thought open: it EXPIRED; its node drains."""
        now = self.clock.now()
        with self.c.writing():
            current = next((x for x in self.store.list_leases() if x.id == lease.id), None)
            if current is None or current.state not in _OPEN:
                return
            state = next_lease_state(current.id, current.state, LeaseEvent.EXPIRED)
            ended = min(now, current.expires_at) if current.expires_at else now
            self.store.put_lease(replace(current, state=state, released_at=ended))
            events = [_event("lease", current.id, now, "Expired", why)]
            if current.node_id and state is LeaseState.EXPIRED:
                self._drain(current.node_id, current.id, f"lease {current.id}: {why}", now, events)
            self.store.add_events(events)
        log.warning("lease %s: %s", lease.id, why)
        self.c.wake()

    # releases --------------------------------------------------------------------------------

    def _release(self) -> None:
        with self._memory:
            inflight = set(self._inflight)
        for lease in self._open():
            if lease.state is not LeaseState.RELEASING or lease.id in inflight:
                continue
            if lease.provider_lease_id:
                provider = self.providers.get(lease.provider)
                if provider is None:
                    log.error(
                        "lease %s: provider %s is no longer configured; release it by hand",
                        lease.id,
                        lease.provider,
                    )
                    continue
                try:
                    provider.release(lease.provider_lease_id, now=self.clock.now())
                except ProviderError as e:
                    log.warning(
                        "releasing lease %s failed (tried again next time): %s", lease.id, e
                    )
                    continue
            self._released(lease.id)

    def _released(self, lease_id: str) -> None:
        now = self.clock.now()
        with self.c.writing():
            lease = next((x for x in self.store.list_leases() if x.id == lease_id), None)
            if lease is None or lease.state is not LeaseState.RELEASING:
                return
            state = next_lease_state(lease.id, lease.state, LeaseEvent.RELEASED)
            self.store.put_lease(replace(lease, state=state, released_at=now))
            events = [_event("lease", lease.id, now, "Released", f"given back to {lease.provider}")]
            if lease.node_id:
                try:
                    node = self.store.get_node(lease.node_id)
                except NotFound:
                    node = None
                if node is not None and node.lease_id == lease.id:
                    why = f"lease {lease.id} released to {lease.provider}"
                    self.store.put_node(
                        replace(
                            node,
                            state=next_node_state(node.id, node.state, NodeEvent.RELEASE),
                            state_reason=why,
                        )
                    )
                    events.append(_event("node", node.id, now, "Released", why))
            self.store.add_events(events)
        with self._memory:
            self._where.pop(lease.id, None)
        log.info("lease %s released (node %s)", lease.id, lease.node_id or "-")

    # reconciliation ----------------------------------------------------------------------------

    def reconcile(self, name: str) -> bool:
        """Make the store and provider `name` agree (after a restart): a lease the provider
        holds that gpuctl does not know is recorded and released (or adopted, per config);
        one gpuctl thinks open that the provider does not hold has ended; one released in the
        store is never released again. False when the provider could not be asked."""
        provider = self.providers[name]
        try:
            held = provider.held()
        except ProviderError as e:
            log.warning("reconciling provider %s failed (tried again next tick): %s", name, e)
            return False
        now = self.clock.now()
        again: list[str] = []  # provider ids to give back, ended in our books already
        with self.c.writing():
            ours = [x for x in self.store.list_leases(include_released=True) if x.provider == name]
            by_pid = {x.provider_lease_id: x for x in ours if x.provider_lease_id}
            held_ids = {h.lease_id for h in held}
            events: list[Event] = []
            for h in held:
                lease = by_pid.get(h.lease_id)
                if lease is None:
                    events.extend(self._unknown(provider, h, now))
                elif lease.state is LeaseState.RELEASED:
                    log.warning(
                        "provider %s still lists lease %s, released at %s: not releasing it again",
                        name,
                        h.lease_id,
                        lease.released_at,
                    )
                elif lease.state is LeaseState.FAILED:
                    # A failed lease was given back before it was marked so: never again.
                    log.warning(
                        "provider %s still lists lease %s, given back when it failed: "
                        "not releasing it again",
                        name,
                        h.lease_id,
                    )
                elif lease.state is LeaseState.EXPIRED:
                    again.append(h.lease_id)  # never released by us: the provider kept it
                else:
                    with self._memory:
                        self._where[lease.id] = (h.address, h.fabric)
            for lease in ours:
                if lease.state not in _OPEN:
                    continue
                if lease.provider_lease_id and lease.provider_lease_id not in held_ids:
                    if lease.state is LeaseState.RELEASING:
                        state = next_lease_state(lease.id, lease.state, LeaseEvent.RELEASED)
                        self.store.put_lease(replace(lease, state=state, released_at=now))
                        events.append(_event("lease", lease.id, now, "Released", "gone already"))
                    else:
                        state = next_lease_state(lease.id, lease.state, LeaseEvent.EXPIRED)
                        self.store.put_lease(replace(lease, state=state, released_at=now))
                        why = f"provider {name} no longer holds it"
                        events.append(_event("lease", lease.id, now, "Expired", why))
                        if lease.node_id:
                            self._drain(
                                lease.node_id, lease.id, f"lease {lease.id}: {why}", now, events
                            )
                elif not lease.provider_lease_id and lease.id in self._stale:
                    event = (
                        LeaseEvent.FAILED
                        if lease.state is LeaseState.REQUESTED
                        else LeaseEvent.RELEASED  # let go of since: nothing was granted
                    )
                    state = next_lease_state(lease.id, lease.state, event)
                    self.store.put_lease(replace(lease, state=state, released_at=now))
                    events.append(
                        _event(
                            "lease",
                            lease.id,
                            now,
                            "Failed",
                            "gpuctld restarted before the provider answered",
                        )
                    )
            self.store.add_events(events)
            self._stale.difference_update(x.id for x in ours)
            self._unreconciled.discard(name)
        for pid in again:
            log.warning(
                "provider %s still holds lease %s that ended in the store: releasing", name, pid
            )
            self._give_back(provider, pid)
        log.info("provider %s reconciled: it holds %d lease(s)", name, len(held))
        self.c.wake()
        return True

    def _orphans(self) -> None:
        """Open leases of a provider no longer configured: nothing can act on them, so they
        stop holding jobs back; a granted one is left for the operator to release by hand."""
        now = self.clock.now()
        with self.c.writing():
            events: list[Event] = []
            for lease in self.store.list_leases():
                if not managed(lease) or lease.provider in self.providers:
                    continue
                if lease.state is LeaseState.REQUESTED and not lease.provider_lease_id:
                    event, why = LeaseEvent.FAILED, f"provider {lease.provider} is not configured"
                else:
                    event = LeaseEvent.EXPIRED
                    why = (
                        f"provider {lease.provider} is no longer configured: gpuctld stops "
                        f"tracking lease {lease.provider_lease_id}; release it there by hand"
                    )
                    log.error("lease %s: %s", lease.id, why)
                state = next_lease_state(lease.id, lease.state, event)
                self.store.put_lease(replace(lease, state=state, released_at=now))
                events.append(_event("lease", lease.id, now, state.value.capitalize(), why))
            self.store.add_events(events)

    def _unknown(self, provider: Provider, h: Held, now: datetime) -> list[Event]:
        adopt = self.settings.unknown == UNKNOWN_ADOPT
        lease = NodeLease(
            id=self._new_id(),
            provider=provider.name,
            provider_lease_id=h.lease_id,
            node_id=h.node,
            sku=h.sku,
            price_per_hour=h.price_per_hour,
            acquired_at=h.acquired_at or now,
            expires_at=h.expires_at,
            state=LeaseState.REQUESTED if adopt else LeaseState.RELEASING,
        )
        self.store.put_lease(lease)
        with self._memory:
            self._where[lease.id] = (h.address, h.fabric)
        if adopt:
            self._activate_registered(lease, now)
        what = "adopted" if adopt else "releasing it"
        why = f"provider {provider.name} holds lease {h.lease_id} gpuctl did not know: {what}"
        log.warning("%s", why)
        return [_event("lease", lease.id, now, "Unknown", why)]


def _event(kind: str, object_id: str, now: datetime, type_: str, message: str) -> Event:
    return Event(object_kind=kind, object_id=object_id, time=now, type=type_, message=message)


__all__ = [
    "LeaseKeeper",
    "LeaseSettings",
    "build_providers",
    "offer_of",
]


def _idle(lease: NodeLease) -> bool:
    """An active leased node with nothing on it, as the last cycle found it."""
    return managed(lease) and lease.state is LeaseState.ACTIVE and lease.idle_since is not None
