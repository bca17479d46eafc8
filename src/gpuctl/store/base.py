"""The `Store` protocol: what the daemon persists and how. One contract suite tests every backend."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from gpuctl.core.cost import AttemptCharge
from gpuctl.core.errors import FieldViolation, InvalidArgument
from gpuctl.core.model import Event, Job, JobSpec, JobState, LeaseState, Node, NodeLease
from gpuctl.core.trust import ApiToken, AuditEntry

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000  # larger requests are cut to this, as AIP-158 asks
_TOKEN_RE = re.compile(r"jobs:([0-9]{1,19})")

# What a job's row repeats of its spec, for filters and sorting: `respec_job` may not change it.
SPEC_COLUMNS = ("owner", "queue", "name", "kind", "priority")
# Leases `list_leases` leaves out unless asked for the released ones too.
ENDED_LEASE_STATES = frozenset({LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.FAILED})

_MaybeTime = TypeVar("_MaybeTime", datetime, None)


def utc(value: _MaybeTime) -> _MaybeTime:
    """The same instant in UTC; naive values are bugs, since the model keeps aware UTC times."""
    if value is None:
        return value
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times only")
    return value.astimezone(UTC)


def page_limit(page_size: int) -> int:
    """How many jobs a `list_jobs` page of `page_size` holds: 0 means the default, more than
    MAX_PAGE_SIZE is cut to it, a negative size is refused."""
    if page_size < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"jobs:{last_id}".encode()).rstrip(b"=").decode()


def decode_page_token(token: str) -> int:
    """The last job id of the previous page (0 for the first page)."""
    if not token:
        return 0
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        match = _TOKEN_RE.fullmatch(raw.decode("ascii"))
    except ValueError:  # binascii.Error, non-ASCII input, undecodable bytes
        match = None
    if match is None:
        raise InvalidArgument([FieldViolation("page_token", "not a token this server returned")])
    return int(match.group(1))


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: tuple[Job, ...]
    next_page_token: str  # "" on the last page


@dataclass(frozen=True, slots=True)
class Leadership:
    """Who holds the leader lease, as the store saw it (`expires_in_s` by the database's
    clock; 0 or less: lapsed, anyone may claim it)."""

    holder: str
    address: str
    agent_address: str
    epoch: int
    expires_in_s: float

    @property
    def live(self) -> bool:
        return self.expires_in_s > 0


class Store(Protocol):
    """Durable state of gpuctld. Every write is committed before the method returns.

    Jobs get increasing integer ids (1, 2, ...). Every write to a job sets its `revision` to a
    store-wide counter that only grows, so watchers can resume from the last revision seen.

    `local`: reads are answered on this host (a file, memory), with no network round trip to
    wait on, so the API may run them on its event loop's thread (api.server).
    """

    local: bool

    def create_job(
        self,
        spec: JobSpec,
        *,
        request_id: str,
        now: datetime,
        events: Callable[[Job], Sequence[Event]] | None = None,
        audit: Callable[[Job], AuditEntry] | None = None,
    ) -> tuple[Job, bool]:
        """Store a new PENDING job, and `events(job)` and `audit(job)` with it in one
        transaction; with a `request_id` seen before, return that job instead (and store no
        events and no audit entry).

        Returns (job, created). `now` is a timezone-aware datetime.
        """
        ...

    def get_job(self, job_id: int) -> Job:
        """Raises `core.errors.NotFound`."""
        ...

    def list_jobs(
        self,
        *,
        states: Sequence[JobState] = (),
        queue: str = "",
        owner: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> JobPage:
        """Jobs in id order; `page_token` is opaque (raises `InvalidArgument` when malformed)."""
        ...

    def count_jobs(self, *, states: Sequence[JobState] = (), owner: str = "") -> int:
        """How many jobs match (indexed columns only: cheap whatever the store holds)."""
        ...

    def page_token_after(self, job_id: int) -> str:
        """The `list_jobs` page token of a page that ends with job `job_id` (a page cut short)."""
        ...

    def active_jobs(self) -> tuple[Job, ...]:
        """Every job that is PENDING, RUNNING or CANCELLING, in id order."""
        ...

    def current_revision(self) -> int:
        """The last revision handed out (committed or not yet): anything that commits later
        has a greater one, so `jobs_since(current_revision())` misses nothing after it."""
        ...

    def jobs_since(self, revision: int) -> tuple[Job, ...]:
        """Jobs whose revision is greater than `revision`, in revision order."""
        ...

    def update_jobs(self, jobs: Sequence[Job], events: Sequence[Event] = ()) -> tuple[Job, ...]:
        """Write these jobs (which must exist) and `events` in one transaction; returns the jobs
        with new revisions. What the submission fixed (spec, request id, creation time) is never
        rewritten: pass the jobs as read, with their state changed."""
        ...

    def respec_job(self, job: Job, events: Sequence[Event] = ()) -> Job:
        """Write `job` as `update_jobs` does, and its changed spec (a service scaled). What the
        row repeats of the spec for filters (owner, queue, name, kind, priority) must not
        change: ValueError."""
        ...

    def put_node(self, node: Node) -> Node:
        """Insert or replace a node by id."""
        ...

    def touch_node(self, node_id: str, last_heartbeat: datetime) -> None:
        """Set only the node's last heartbeat (what a heartbeat that changed nothing else
        writes); raises `core.errors.NotFound`."""
        ...

    def get_node(self, node_id: str) -> Node:
        """Raises `core.errors.NotFound`."""
        ...

    def list_nodes(self, ids: Sequence[str] | None = None) -> tuple[Node, ...]:
        """Every node (of `ids`, where given; unknown ids are left out), in id order."""
        ...

    def put_lease(self, lease: NodeLease) -> NodeLease: ...

    def list_leases(self, *, include_released: bool = False) -> tuple[NodeLease, ...]: ...

    def note_failed_offer(self, job_id: int, provider: str, sku: str, at: datetime) -> None:
        """(provider, sku) failed a lease for `job_id` at `at` (kept: a new leader knows)."""
        ...

    def failed_offers(self, *, since: datetime) -> tuple[tuple[int, str, str, datetime], ...]:
        """(job_id, provider, sku, at) of the failures after `since`, oldest first."""
        ...

    def forget_failed_offers(self, *, before: datetime) -> None: ...

    def add_events(self, events: Sequence[Event]) -> None: ...

    def list_events(
        self, object_kind: str, object_id: str, *, limit: int = 100
    ) -> tuple[Event, ...]:
        """The latest `limit` events of one object, oldest first."""
        ...

    def add_charges(self, charges: Sequence[AttemptCharge]) -> None:
        """Keep what ended attempts were charged; one per (job, attempt): the same attempt
        written again replaces it, so nothing is charged twice."""
        ...

    def list_charges(self, *, since: datetime | None = None) -> tuple[AttemptCharge, ...]:
        """Ended attempts' charges (those ending after `since`), by job and attempt."""
        ...

    # Grows with every `put_token` through this store object: whoever keeps token records in
    # memory drops them when it moves.
    token_generation: int

    def put_token(self, token: ApiToken) -> ApiToken:
        """Insert or replace a token by id."""
        ...

    def get_token(self, token_id: str) -> ApiToken:
        """Raises `core.errors.NotFound`."""
        ...

    def list_tokens(self, *, principal: str = "") -> tuple[ApiToken, ...]:
        """Every token (of `principal` when given), revoked ones too, oldest first."""
        ...

    def add_audit(self, entry: AuditEntry) -> None: ...

    def list_audit(
        self, *, since: datetime | None = None, principal: str = "", limit: int = 100
    ) -> tuple[AuditEntry, ...]:
        """The latest `limit` entries (after `since`, by `principal`), oldest first."""
        ...

    def purge_finished_jobs(self, before: datetime, *, limit: int) -> tuple[int, ...]:
        """Delete up to `limit` jobs that finished before `before`, oldest first, with their
        events; returns their ids. Their charges stay (cost reports cover all time)."""
        ...

    def purge_audit(self, before: datetime, *, limit: int) -> int:
        """Delete up to `limit` audit entries older than `before`; returns how many."""
        ...

    def purge_events(self, kinds: Sequence[str], before: datetime, *, limit: int) -> int:
        """Delete up to `limit` events of objects of `kinds` (nodes, leases) older than
        `before`, oldest first; returns how many. (A job's events go with the job.)"""
        ...

    # -- leadership (several gpuctld on one database) -----------------------------------------

    def claim_leadership(
        self, holder: str, *, address: str, agent_address: str, ttl_s: float
    ) -> Leadership:
        """Take the lease when it lapsed or `holder` has it already (the same gpuctld
        restarted), with a new epoch; returns who holds it afterwards."""
        ...

    def renew_leadership(self, holder: str, epoch: int, ttl_s: float) -> bool:
        """Extend our lease; False when another claim came in between (we lost it)."""
        ...

    def resign_leadership(self, holder: str, epoch: int) -> None:
        """Let the lease lapse now, so that a standby takes over at once."""
        ...

    def leader(self) -> Leadership: ...

    def fence(self, epoch: int | None) -> None:
        """From now on every write commits only while the lease's epoch is `epoch`, and raises
        `NotLeader` otherwise (0: refuse every write; None: no check)."""
        ...

    def before_waiting(self, hook: Callable[[], None]) -> None:
        """Run `hook()` in each writer just before it waits for its write to commit (the API
        lets the next handler run then: api.lanes.Gate)."""
        ...

    def close(self) -> None: ...
