"""The SQL tables of the store: the only sqlmodel table classes in gpuctl.

Nested values (job spec, placement, node profile, labels) are JSON text, so the schema does not
follow every dataclass change; real columns exist for what queries filter or sort on.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Dialect, Index, Integer, Text, TypeDecorator
from sqlmodel import Field, SQLModel

# BIGINT ids on PostgreSQL; SQLite only makes "INTEGER PRIMARY KEY" an auto-assigned rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no zone-aware type and hands back naive values; PostgreSQL's timestamptz hands them
    back in the session's zone. Both come back aware UTC. A naive value is refused, not guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times only")
        value = value.astimezone(UTC)
        # Stored as naive UTC text on SQLite, so that text order is time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    # AUTOINCREMENT: SQLite must never hand out an id again, even if the newest row were deleted.
    # Lists filtered by owner or queue go in id order a page at a time: (owner, id) and (queue,
    # id) read a page of a user's jobs without sorting all of them (PostgreSQL; SQLite's
    # indexes end with the rowid anyway).
    __table_args__ = (
        Index("ix_jobs_owner_id", "owner", "id"),
        Index("ix_jobs_queue_id", "queue", "id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    request_id: str | None = Field(default=None, unique=True)  # NULL: no idempotency key
    # owner, queue, name, kind and priority repeat the spec so that list filters are indexed.
    owner: str
    queue: str
    name: str
    kind: str
    state: str = Field(index=True)
    priority: int
    attempt: int
    revision: int = Field(index=True, sa_type=BigInteger)
    spec: str = Field(sa_type=Text)  # JSON of JobSpec
    placement: str | None = Field(default=None, sa_type=Text)  # JSON of Placement
    reason: str = Field(sa_type=Text)
    exit_code: int | None = None
    end_state: str | None = None  # a cancelling job's end state: cancelled or timeout
    created_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # Indexed for retention: the oldest finished jobs are found without reading the rest.
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime, index=True)
    updated_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class NodeRow(SQLModel, table=True):
    __tablename__ = "nodes"

    id: str = Field(primary_key=True)
    address: str
    fabric: str = Field(index=True)
    provider: str
    sku: str
    region: str
    labels: str = Field(sa_type=Text)  # JSON list of [key, value]
    cpu_milli: int = Field(sa_type=BigInteger)
    memory_mib: int = Field(sa_type=BigInteger)
    profile: str = Field(sa_type=Text)  # JSON of BandwidthProfile
    price_per_hour: float
    state: str
    state_reason: str = Field(sa_type=Text)
    health_issues: str = Field(default="[]", sa_type=Text)  # JSON list of strings
    lease_id: str
    registered_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_heartbeat: datetime | None = Field(default=None, sa_type=UtcDateTime)


class LeaseRow(SQLModel, table=True):
    __tablename__ = "leases"

    id: str = Field(primary_key=True)
    provider: str
    provider_lease_id: str
    node_id: str = Field(index=True)
    sku: str
    price_per_hour: float
    acquired_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    released_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    for_job_id: int | None = Field(default=None, sa_type=BigInteger)
    state: str = Field(index=True)
    idle_since: datetime | None = Field(default=None, sa_type=UtcDateTime)


class FailedOfferRow(SQLModel, table=True):
    """A (provider, sku) that failed a job's lease lately: the cycle asks for the next-best."""

    __tablename__ = "failed_offers"

    job_id: int = Field(primary_key=True, sa_type=BigInteger)
    provider: str = Field(primary_key=True)
    sku: str = Field(primary_key=True)
    at: datetime = Field(sa_type=UtcDateTime, index=True)


class EventRow(SQLModel, table=True):
    __tablename__ = "events"
    # `time` is in the index so "latest N of one object" is a backwards index scan.
    __table_args__ = (
        Index("ix_events_object", "object_kind", "object_id", "time"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    object_kind: str
    object_id: str
    time: datetime = Field(sa_type=UtcDateTime)
    type: str
    message: str = Field(sa_type=Text)


class ChargeRow(SQLModel, table=True):
    """An attempt of a job that ended in a requeue, as charged then (`AttemptCharge`)."""

    __tablename__ = "charges"

    job_id: int = Field(primary_key=True, sa_type=BigInteger)
    attempt: int = Field(primary_key=True)
    queue: str
    owner: str
    started_at: datetime = Field(sa_type=UtcDateTime)
    ended_at: datetime = Field(sa_type=UtcDateTime, index=True)
    dollars: float
    gpu_hours: float


class RevisionCounter(SQLModel, table=True):
    """One row (id 1) holding the last store-wide revision handed out.

    Writers bump it with UPDATE ... RETURNING inside their own transaction; the row lock that
    takes is held to commit, so revisions become visible in increasing order (a sequence would
    let a later commit carry a smaller revision, which a resuming watcher would skip).
    """

    __tablename__ = "revision_counter"

    id: int = Field(primary_key=True)
    value: int = Field(sa_type=BigInteger)


class TokenRow(SQLModel, table=True):
    """A token the daemon issued (`core.trust.ApiToken`): its secret only as a hash."""

    __tablename__ = "tokens"

    id: str = Field(primary_key=True)
    kind: str
    principal: str = Field(index=True)
    secret_hash: str
    description: str = Field(sa_type=Text)
    created_by: str
    created_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class AuditRow(SQLModel, table=True):
    """One mutating call (`core.trust.AuditEntry`)."""

    __tablename__ = "audit"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    time: datetime = Field(sa_type=UtcDateTime, index=True)
    principal: str = Field(index=True)
    role: str
    via: str
    peer: str
    action: str
    target: str
    outcome: str
    detail: str = Field(sa_type=Text)


class LeaderRow(SQLModel, table=True):
    """One row (id 1): which gpuctld leads, since when (`epoch`), and until when.

    Times are the database's clock in seconds since 1970, so that head nodes whose clocks
    disagree still agree on whether the lease ran out. Every write of the leader checks
    `epoch` in its own transaction (fencing); see `store.sql.SqlStore.claim_leadership`.
    """

    __tablename__ = "leader"

    id: int = Field(primary_key=True)
    holder: str  # the gpuctld's [ha] name
    address: str  # where people reach it ("" when it did not say)
    agent_address: str  # where agents reach it
    epoch: int = Field(sa_type=BigInteger)  # +1 at every claim: 1, 2, ...
    acquired_s: float
    expires_s: float
