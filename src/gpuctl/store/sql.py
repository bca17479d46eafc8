"""`SqlStore`: the `Store` protocol on SQLite (laptop, demo, tests) or PostgreSQL (production).

Each call runs in its own session and transaction, so one store serves the daemon's gRPC threads
and its scheduler thread at once.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Engine,
    Row,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from gpuctl.core.cost import AttemptCharge
from gpuctl.core.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    NotLeader,
    Unavailable,
)
from gpuctl.core.model import Event, Job, JobSpec, JobState, Node, NodeLease
from gpuctl.core.trust import ApiToken, AuditEntry
from gpuctl.store import schema
from gpuctl.store.base import (
    DEFAULT_PAGE_SIZE,
    ENDED_LEASE_STATES,
    SPEC_COLUMNS,
    JobPage,
    Leadership,
    decode_page_token,
    encode_page_token,
    page_limit,
    utc,
)
from gpuctl.store.groupcommit import GroupCommit, Write
from gpuctl.store.mapping import (
    FIXED_AT_CREATION,
    as_stored,
    audit_from_row,
    audit_values,
    charge_from_row,
    charge_row,
    event_from_row,
    event_values,
    job_from_row,
    job_state_values,
    job_values,
    lease_from_row,
    lease_values,
    node_from_row,
    node_values,
    token_from_row,
    token_row,
)
from gpuctl.store.tables import (
    AuditRow,
    ChargeRow,
    EventRow,
    FailedOfferRow,
    JobRow,
    LeaderRow,
    LeaseRow,
    NodeRow,
    RevisionCounter,
    TokenRow,
)

# Writers queue behind one another on SQLite; one write is milliseconds, so 10 s of waiting
# means something is stuck, and the caller gets `Unavailable`.
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Any fixed key: it only has to be the same in every gpuctld sharing the database.
_SCHEMA_LOCK_KEY = 0x67707563746C  # "gpuctl"
_Row = TypeVar("_Row", NodeRow, LeaseRow)
# The tables, and the statements of the hot paths built once: building one costs more than
# running it.
_JOBS = JobRow.__table__  # type: ignore[attr-defined]
_EVENTS = EventRow.__table__  # type: ignore[attr-defined]
_COUNTER = RevisionCounter.__table__  # type: ignore[attr-defined]
_LEADER_ROW = LeaderRow.__table__  # type: ignore[attr-defined]
# Jobs in one statement, their ids in the order of their rows.
_INSERT_JOBS = insert(_JOBS).returning(_JOBS.c.id, sort_by_parameter_order=True)
_INSERT_EVENT = insert(_EVENTS)
_NODES = NodeRow.__table__  # type: ignore[attr-defined]
_TOUCH_NODE = (
    update(_NODES).where(_NODES.c.id == bindparam("b_id")).values(last_heartbeat=bindparam("b_at"))
)
_INSERT_AUDIT = insert(AuditRow.__table__)  # type: ignore[attr-defined]
_JOB_BY_ID = select(_JOBS).where(_JOBS.c.id == bindparam("id"))
_JOB_BY_REQUEST_ID = select(_JOBS).where(_JOBS.c.request_id == bindparam("request_id"))
_JOBS_BY_REQUEST_ID = select(_JOBS).where(
    _JOBS.c.request_id.in_(bindparam("request_ids", expanding=True))
)
_EVENTS_OF = (
    select(_EVENTS)
    .where(_EVENTS.c.object_kind == bindparam("kind"), _EVENTS.c.object_id == bindparam("id"))
    .order_by(_EVENTS.c.time.desc(), _EVENTS.c.id.desc())
    .limit(bindparam("limit"))
)
_LEADER = select(_LEADER_ROW).where(_LEADER_ROW.c.id == 1)
_LEADER_FOR_SHARE = _LEADER.with_for_update(read=True)
_TAKE_REVISIONS = (
    update(_COUNTER)
    .where(_COUNTER.c.id == 1)
    .values(value=_COUNTER.c.value + bindparam("count"))
    .returning(_COUNTER.c.value)
)
_UPDATED = [c.name for c in _JOBS.columns if c.name not in {"id", *FIXED_AT_CREATION}]
_UPDATE_JOB = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in _UPDATED})
)
_FIXED_OF = select(_JOBS.c.id, _JOBS.c.request_id, _JOBS.c.created_at).where(
    _JOBS.c.id.in_(bindparam("ids", expanding=True))
)
_IN_CHUNK = 5000  # ids in one IN (...): far below any backend's limit on parameters
_DECODED_JOBS = 50_000  # jobs kept decoded: a long queue listed again (see LISTED_VIEWS)


def open_store(url: str, *, migrate: bool = False) -> SqlStore:
    """Open the store at `sqlite:///path` or `postgresql://...`: an empty one gets the tables,
    an older one is upgraded only with `migrate` (see `store.schema`)."""
    return SqlStore(url, migrate=migrate)


class SqlStore:
    """The store on SQLAlchemy; see `store.base.Store` for the contract of each method."""

    def __init__(self, url: str, *, migrate: bool = False) -> None:
        self._engine = _create_engine(url)
        self._insert = _UPSERTS[self._engine.dialect.name]
        self._epoch: int | None = None  # see `fence`
        self.token_generation = 0  # see `Store.token_generation`
        self.local = self._engine.dialect.name == "sqlite"
        self._reads = sessionmaker(self._engine, class_=Session, expire_on_commit=False)
        self._one_read = self._engine.execution_options(gpuctl_one_statement=True)  # `_reading`
        # Jobs as decoded, by (id, revision): a revision names one version of one job, so a
        # hit is never stale. Pages of jobs read again (`gpuctl jobs`, ListJobs) skip decoding
        # their JSON. Emptied when full: bounded, and cheap to keep.
        self._decoded: dict[tuple[int, int], Job] = {}
        self._writes = sessionmaker(
            self._engine.execution_options(gpuctl_write=True),
            class_=Session,
            expire_on_commit=False,
        )
        # Every write but the schema's: batched, fenced unless told otherwise (see `fence`).
        self._write: GroupCommit[Session] = GroupCommit(self._commit_batch)
        db = self._engine.url.database if self.local else None
        self._one_writer = _WriterLock(_writer_lock_path(Path(db))) if db else None
        try:
            self.schema = self._prepare_schema(migrate)
        except BaseException:
            self._engine.dispose()
            raise

    def _prepare_schema(self, migrate: bool) -> schema.SchemaState:
        with self._transaction(self._writes) as session:
            if self._engine.dialect.name == "postgresql":
                # Several gpuctld may start at once (HA) and CREATE TABLE races are not safe in
                # PostgreSQL; the lock ends with this transaction.
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            found = schema.prepare(session.connection(), migrate=migrate)
            session.execute(
                self._insert(RevisionCounter).values(id=1, value=0).on_conflict_do_nothing()
            )
            # The lease row exists from the start, lapsed: claims only ever UPDATE it.
            session.execute(
                self._insert(LeaderRow)
                .values(id=1, holder="", address="", agent_address="", epoch=0)
                .values(acquired_s=0.0, expires_s=0.0)
                .on_conflict_do_nothing()
            )
            return found

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(
        self,
        spec: JobSpec,
        *,
        request_id: str,
        now: datetime,
        events: Callable[[Job], Sequence[Event]] | None = None,
        audit: Callable[[Job], AuditEntry] | None = None,
    ) -> tuple[Job, bool]:

        create = _Create(spec, request_id, now, events, audit)
        try:
            return self._write(create)
        except IntegrityError:
            # Another caller with this request_id committed between our check and our insert
            # (PostgreSQL; SQLite writers are serialized): its job is the answer.
            if request_id:
                with self._reading() as conn:
                    if row := _job_row_by_request_id(conn, request_id):
                        return job_from_row(row), False
            raise

    def load_jobs(self, jobs: Sequence[Job], events: Sequence[Event]) -> None:
        """Insert `jobs` with the ids they carry, and `events`, in one transaction, the fast
        way (benchmarks, imports): each job gets a new revision; later ids follow the largest."""

        def load(session: Session) -> None:
            revisions = _next_revisions(session, len(jobs))
            rows = [
                {"id": job.id, **job_values(replace(job, revision=revision))}
                for job, revision in zip(jobs, revisions, strict=True)
            ]
            session.execute(insert(_JOBS), rows)
            _insert_events(session, events)
            if self._engine.dialect.name == "postgresql" and jobs:
                session.execute(
                    text(
                        "SELECT setval(pg_get_serial_sequence('jobs', 'id'), "
                        "greatest(max(id), 1)) FROM jobs"
                    )
                )

        if jobs or events:
            self._write(load)

    def analyze(self) -> None:
        """Bring PostgreSQL's planner statistics up to date (ANALYZE), as after a bulk load:
        autovacuum would, but only in a while. Nothing on SQLite: gpuctl never gathers its
        statistics, which keep only averages, and with those a page of one user's jobs among
        a million of someone else's is read by scanning them all."""
        if self._engine.dialect.name == "postgresql":
            self._write(lambda s: s.execute(text("ANALYZE")), fenced=False)

    def get_job(self, job_id: int) -> Job:
        with self._reading() as conn:
            row = conn.execute(_JOB_BY_ID, {"id": job_id}).first()
        if row is None:
            raise NotFound("job", str(job_id))
        return self._job_of(row)

    def list_jobs(
        self,
        *,
        states: Sequence[JobState] = (),
        queue: str = "",
        owner: str = "",
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> JobPage:
        """Jobs in id order; `page_size` 0 means the default, above `MAX_PAGE_SIZE` is cut."""
        size = page_limit(page_size)
        query = select(_JOBS).where(_JOBS.c.id > decode_page_token(page_token))
        if states:
            query = query.where(_JOBS.c.state.in_([JobState(s).value for s in states]))
        if queue:
            query = query.where(_JOBS.c.queue == queue)
        if owner:
            query = query.where(_JOBS.c.owner == owner)
        # One row past the page says whether another page exists.
        query = query.order_by(_JOBS.c.id).limit(size + 1)
        with self._reading() as conn:
            rows = conn.execute(query).all()
        jobs = tuple(self._job_of(r) for r in rows[:size])
        token = encode_page_token(jobs[-1].id) if len(rows) > size else ""
        return JobPage(jobs=jobs, next_page_token=token)

    def _job_of(self, row: Row[Any]) -> Job:
        key = (row.id, row.revision)
        job = self._decoded.get(key)
        if job is None:
            if len(self._decoded) >= _DECODED_JOBS:
                self._decoded.clear()
            job = self._decoded[key] = job_from_row(row)
        return job

    def page_token_after(self, job_id: int) -> str:
        return encode_page_token(job_id)

    def count_jobs(self, *, states: Sequence[JobState] = (), owner: str = "") -> int:
        query = select(func.count()).select_from(JobRow)
        if states:
            query = query.where(col(JobRow.state).in_([JobState(s).value for s in states]))
        if owner:
            query = query.where(JobRow.owner == owner)
        with self._transaction(self._reads) as session:
            return int(session.exec(query).one())

    def active_jobs(self) -> tuple[Job, ...]:
        active = [s.value for s in JobState if not s.finished]
        query = select(_JOBS).where(_JOBS.c.state.in_(active)).order_by(_JOBS.c.id)
        with self._reading() as conn:
            return tuple(job_from_row(r) for r in conn.execute(query))

    def current_revision(self) -> int:
        with self._transaction(self._reads) as session:
            counter = session.get(RevisionCounter, 1)
            return counter.value if counter is not None else 0

    def jobs_since(self, revision: int) -> tuple[Job, ...]:
        query = select(_JOBS).where(_JOBS.c.revision > revision).order_by(_JOBS.c.revision)
        with self._reading() as conn:
            return tuple(job_from_row(r) for r in conn.execute(query))

    def update_jobs(self, jobs: Sequence[Job], events: Sequence[Event] = ()) -> tuple[Job, ...]:
        """Write the jobs' state (not what creation fixed: `mapping.FIXED_AT_CREATION`), and
        `events` in the same transaction."""
        if not jobs and not events:
            return ()
        return self._write(lambda session: _update_jobs(session, jobs, events))

    def respec_job(self, job: Job, events: Sequence[Event] = ()) -> Job:
        """Write `job` as `update_jobs` does, and its changed spec (a service scaled). What the
        row repeats of the spec for filters (owner, queue, name, kind, priority) must not
        change."""
        after = job_values(job)

        def respec(session: Session) -> Job:
            row = session.execute(_JOB_BY_ID, {"id": job.id}).first()
            if row is None:
                raise NotFound("job", str(job.id))
            if any(getattr(row, k) != after[k] for k in SPEC_COLUMNS):
                raise ValueError(f"job {job.id}: only the spec's other fields may change")
            (written,) = _update_jobs(session, [job], events)
            session.execute(update(_JOBS).where(_JOBS.c.id == job.id).values(spec=after["spec"]))
            return written

        return self._write(respec)

    # -- nodes and leases -----------------------------------------------------------------------

    def put_node(self, node: Node) -> Node:
        values = node_values(node)
        return self._write(lambda s: node_from_row(self._upsert(s, NodeRow, values)))

    def touch_node(self, node_id: str, last_heartbeat: datetime) -> None:
        at = {"b_id": node_id, "b_at": utc(last_heartbeat)}

        def touch(session: Session) -> None:
            if session.execute(_TOUCH_NODE, at).rowcount == 0:
                raise NotFound("node", node_id)

        self._write(touch)

    def get_node(self, node_id: str) -> Node:
        with self._transaction(self._reads) as session:
            row = session.get(NodeRow, node_id)
            if row is None:
                raise NotFound("node", node_id)
            return node_from_row(row)

    def list_nodes(self, ids: Sequence[str] | None = None) -> tuple[Node, ...]:
        query = select(NodeRow).order_by(col(NodeRow.id))
        if ids is not None:
            query = query.where(col(NodeRow.id).in_(sorted(set(ids))))
        with self._transaction(self._reads) as session:
            return tuple(node_from_row(r) for r in session.exec(query))

    def put_lease(self, lease: NodeLease) -> NodeLease:
        """Insert or replace a lease by id."""
        values = lease_values(lease)
        return self._write(lambda s: lease_from_row(self._upsert(s, LeaseRow, values)))

    def list_leases(self, *, include_released: bool = False) -> tuple[NodeLease, ...]:
        """Leases in id order; without `include_released`, only those not yet ended
        (released, expired or failed)."""
        query = select(LeaseRow).order_by(col(LeaseRow.id))
        if not include_released:
            query = query.where(col(LeaseRow.state).not_in([s.value for s in ENDED_LEASE_STATES]))
        with self._transaction(self._reads) as session:
            return tuple(lease_from_row(r) for r in session.exec(query))

    def note_failed_offer(self, job_id: int, provider: str, sku: str, at: datetime) -> None:
        values = {"job_id": job_id, "provider": provider, "sku": sku, "at": at}
        statement = (
            self._insert(FailedOfferRow)
            .values(**values)
            .on_conflict_do_update(index_elements=["job_id", "provider", "sku"], set_=values)
        )
        self._write(lambda s: s.execute(statement))

    def failed_offers(self, *, since: datetime) -> tuple[tuple[int, str, str, datetime], ...]:
        query = select(FailedOfferRow).where(FailedOfferRow.at > since)
        with self._transaction(self._reads) as session:
            rows = session.exec(query.order_by(col(FailedOfferRow.at)))
            return tuple((r.job_id, r.provider, r.sku, r.at) for r in rows)

    def forget_failed_offers(self, *, before: datetime) -> None:
        statement = delete(FailedOfferRow).where(col(FailedOfferRow.at) <= before)
        self._write(lambda s: s.execute(statement))

    def _upsert(self, session: Session, table: type[_Row], values: dict[str, Any]) -> _Row:
        # One statement rather than read-then-write: two writers of one id cannot both insert.
        statement = (
            self._insert(table)
            .values(**values)
            .on_conflict_do_update(index_elements=["id"], set_=values)
            .returning(table)
        )
        return session.scalars(statement).one()

    # -- events ---------------------------------------------------------------------------------

    def add_events(self, events: Sequence[Event]) -> None:
        if events:
            self._write(lambda s: _insert_events(s, events))

    def list_events(
        self, object_kind: str, object_id: str, *, limit: int = 100
    ) -> tuple[Event, ...]:
        """The latest `limit` events of one object, oldest first (none when `limit` <= 0)."""
        if limit <= 0:
            return ()
        params = {"kind": object_kind, "id": object_id, "limit": limit}
        with self._reading() as conn:
            latest = [event_from_row(r) for r in conn.execute(_EVENTS_OF, params)]
        return tuple(reversed(latest))

    def add_charges(self, charges: Sequence[AttemptCharge]) -> None:
        def merge(session: Session) -> None:
            for charge in charges:
                session.merge(charge_row(charge))

        if charges:
            self._write(merge)

    def list_charges(self, *, since: datetime | None = None) -> tuple[AttemptCharge, ...]:
        query = select(ChargeRow).order_by(col(ChargeRow.job_id), col(ChargeRow.attempt))
        if since is not None:
            query = query.where(ChargeRow.ended_at > since)
        with self._transaction(self._reads) as session:
            return tuple(charge_from_row(r) for r in session.exec(query))

    def put_token(self, token: ApiToken) -> ApiToken:
        try:
            self._write(lambda s: s.merge(token_row(token)))
        finally:  # even when the commit's outcome is unknown
            self.token_generation += 1
        return token

    def get_token(self, token_id: str) -> ApiToken:
        with self._transaction(self._reads) as session:
            row = session.get(TokenRow, token_id)
            if row is None:
                raise NotFound("token", token_id)
            return token_from_row(row)

    def list_tokens(self, *, principal: str = "") -> tuple[ApiToken, ...]:
        query = select(TokenRow).order_by(col(TokenRow.created_at), col(TokenRow.id))
        if principal:
            query = query.where(TokenRow.principal == principal)
        with self._transaction(self._reads) as session:
            return tuple(token_from_row(r) for r in session.exec(query))

    def add_audit(self, entry: AuditEntry) -> None:
        values = audit_values(entry)
        self._write(lambda s: s.execute(_INSERT_AUDIT, values))

    def list_audit(
        self, *, since: datetime | None = None, principal: str = "", limit: int = 100
    ) -> tuple[AuditEntry, ...]:
        """The latest `limit` entries (after `since`, by `principal`), oldest first."""
        query = select(AuditRow).order_by(col(AuditRow.id).desc()).limit(max(0, limit))
        if since is not None:
            query = query.where(AuditRow.time > since)
        if principal:
            query = query.where(AuditRow.principal == principal)
        with self._transaction(self._reads) as session:
            latest = [audit_from_row(r) for r in session.exec(query)]
        return tuple(reversed(latest))

    # -- retention ------------------------------------------------------------------------------

    def purge_finished_jobs(self, before: datetime, *, limit: int) -> tuple[int, ...]:
        finished = [s.value for s in JobState if s.finished]
        query = (
            select(JobRow.id)
            .where(col(JobRow.state).in_(finished), col(JobRow.finished_at) < before)
            .order_by(col(JobRow.finished_at), col(JobRow.id))
            .limit(max(0, limit))
        )

        def purge(session: Session) -> tuple[int, ...]:
            ids = tuple(int(i) for i in session.exec(query))
            if ids:
                session.execute(
                    delete(EventRow).where(
                        EventRow.object_kind == "job",
                        col(EventRow.object_id).in_([str(i) for i in ids]),
                    )
                )
                session.execute(delete(JobRow).where(col(JobRow.id).in_(ids)))
            return ids

        return self._write(purge)

    def purge_events(self, kinds: Sequence[str], before: datetime, *, limit: int) -> int:
        """Delete the oldest `limit` events of objects of `kinds` from before `before`."""
        query = (
            select(EventRow.id)
            .where(col(EventRow.object_kind).in_(list(kinds)), EventRow.time < before)
            .order_by(col(EventRow.id))
            .limit(max(0, limit))
        )

        def purge(session: Session) -> int:
            ids = list(session.exec(query))
            if ids:
                session.execute(delete(EventRow).where(col(EventRow.id).in_(ids)))
            return len(ids)

        return self._write(purge)

    def purge_audit(self, before: datetime, *, limit: int) -> int:
        query = (
            select(AuditRow.id)
            .where(AuditRow.time < before)
            .order_by(col(AuditRow.id))
            .limit(max(0, limit))
        )

        def purge(session: Session) -> int:
            ids = list(session.exec(query))
            if ids:
                session.execute(delete(AuditRow).where(col(AuditRow.id).in_(ids)))
            return len(ids)

        return self._write(purge)

    # -- leadership -----------------------------------------------------------------------------

    def claim_leadership(
        self, holder: str, *, address: str, agent_address: str, ttl_s: float
    ) -> Leadership:

        def claim(session: Session) -> Leadership:
            now = self._db_now(session)
            row = session.get(LeaderRow, 1, with_for_update=True)
            assert row is not None, "made with the schema"
            if row.holder == holder or row.expires_s <= now:
                row.holder, row.address, row.agent_address = holder, address, agent_address
                row.epoch += 1
                row.acquired_s, row.expires_s = now, now + ttl_s
            return _leadership(row, now)

        return self._write(claim, fenced=False)

    def renew_leadership(self, holder: str, epoch: int, ttl_s: float) -> bool:

        def renew(session: Session) -> bool:
            now = self._db_now(session)
            row = session.get(LeaderRow, 1, with_for_update=True)
            if row is None or (row.holder, row.epoch) != (holder, epoch):
                return False
            row.expires_s = now + ttl_s
            return True

        return self._write(renew, fenced=False)

    def resign_leadership(self, holder: str, epoch: int) -> None:

        def resign(session: Session) -> None:
            row = session.get(LeaderRow, 1, with_for_update=True)
            if row is not None and (row.holder, row.epoch) == (holder, epoch):
                row.expires_s = 0.0

        self._write(resign, fenced=False)

    def leader(self) -> Leadership:
        with self._transaction(self._reads) as session:
            row = session.get(LeaderRow, 1)
            assert row is not None, "made with the schema"
            return _leadership(row, self._db_now(session))

    def before_waiting(self, hook: Callable[[], None]) -> None:
        """`hook()` runs in each writer just before it waits for its batch's commit."""
        self._write.before_waiting = hook

    def fence(self, epoch: int | None) -> None:
        self._epoch = epoch

    def _db_now(self, session: Session) -> float:
        """Seconds since 1970 by the database's clock: the one clock every gpuctld shares."""
        if self._engine.dialect.name == "postgresql":
            query = text("SELECT extract(epoch FROM clock_timestamp())")
        else:
            query = text("SELECT (julianday('now') - 2440587.5) * 86400.0")
        return float(session.execute(query).scalar_one())

    def _check_epoch(self, session: Session) -> None:
        """Fencing: this write commits only under our epoch. On PostgreSQL the row is locked
        FOR SHARE until commit, so a claim (an UPDATE of it) waits for the writes in flight and
        every later write sees the new epoch; SQLite's writers are serialized already."""
        postgres = self._engine.dialect.name == "postgresql"
        row = session.execute(_LEADER_FOR_SHARE if postgres else _LEADER).one()
        if row.epoch != self._epoch:
            live = row.expires_s > self._db_now(session)
            raise NotLeader(row.address if live else "", row.agent_address if live else "")

    def close(self) -> None:
        self._engine.dispose()
        if self._one_writer is not None:
            self._one_writer.close()

    def _commit_batch(self, batch: Sequence[Write[Session]]) -> None:
        """Run a batch of writes (see `store.groupcommit`) in one transaction, fenced ones under
        one check of the epoch. Should a write fail, nothing of the batch is kept and each
        write runs again alone, in a transaction of its own, so that it fails alone: writes are
        functions of the session and run again the same (a savepoint for each would cost every
        write a third more, for a failure that is rare). A failed commit fails every write of
        the batch: its outcome may be unknown, and nothing may be written twice."""
        with self._one_writer or nullcontext():
            self._commit_batch_alone(batch)

    def _commit_batch_alone(self, batch: Sequence[Write[Session]]) -> None:
        if len(batch) > 1:
            # The unfenced writes (the leader lease's) first: a renewal locks the lease row FOR
            # UPDATE, and must not wait for that while holding the revision counter, which a
            # transaction of another process of ours (an API worker) may wait for while it holds
            # the row FOR SHARE (its fence): PostgreSQL would find the deadlock after 1 s and
            # fail one of them. The writes are independent of one another.
            batch = sorted(batch, key=lambda w: w.fenced)
            failed = False
            try:
                with self._writes.begin() as session:
                    fence = self._fence_error(session, batch)
                    results: list[tuple[NotLeader | None, Any]] = []
                    for run in _runs(batch):
                        if run[0].fenced and fence is not None:
                            results.extend((fence, None) for _ in run)
                            continue
                        try:
                            if len(run) > 1:  # submits: one statement of each kind for all
                                creates = [cast(_Create, w.fn) for w in run]
                                made = _create_many(session.connection(), creates)
                                results.extend((None, m) for m in made)
                            else:
                                results.append((None, run[0].fn(session)))
                        except Exception:
                            failed = True
                            raise
            except Exception as e:
                if not failed:
                    error = _unavailable(e) if isinstance(e, OperationalError) else e
                    for w in batch:
                        w.error = error
                    return
            else:
                for w, (error, result) in zip(batch, results, strict=True):
                    w.error, w.result = error, result
                return
        for w in batch:
            try:
                with self._writes.begin() as session:
                    if (fence := self._fence_error(session, [w])) is not None:
                        raise fence
                    w.result = w.fn(session)
            except OperationalError as e:
                w.error = _unavailable(e)
            except Exception as e:
                w.error = e

    def _fence_error(self, session: Session, batch: Sequence[Write[Session]]) -> NotLeader | None:
        if self._epoch is None or not any(w.fenced for w in batch):
            return None
        try:
            self._check_epoch(session)
        except NotLeader as e:
            return e
        return None

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection for one read statement, in Core: the hot reads (jobs, events) skip the
        ORM session, which costs more than the query (~0.1 ms a read). Every use runs one
        statement, which reads one snapshot by itself: on SQLite no BEGIN is sent for it
        (`_sqlite_begin`), two round trips fewer a read."""
        try:
            with self._one_read.connect() as conn, conn.begin():
                yield conn
        except OperationalError as e:
            raise _unavailable(e) from e

    @contextmanager
    def _transaction(self, sessions: sessionmaker[Session]) -> Iterator[Session]:
        """A session in one transaction: committed on return, rolled back on error (reads,
        and the schema at start; every other write goes through `_write`)."""
        try:
            with sessions.begin() as session:
                yield session
        except OperationalError as e:
            raise _unavailable(e) from e


class _Create:
    """One `create_job` write. Creates next to one another in a batch run together
    (`_create_many`): six statements for the lot instead of four or five each, which on
    PostgreSQL are round trips, all made while the batch holds the commit."""

    __slots__ = ("audit", "events", "job", "request_id", "values")

    def __init__(
        self,
        spec: JobSpec,
        request_id: str,
        now: datetime,
        events: Callable[[Job], Sequence[Event]] | None,
        audit: Callable[[Job], AuditEntry] | None,
    ) -> None:
        self.request_id, self.events, self.audit = request_id, events, audit
        # The job and its row, but for id and revision, made by the caller's thread before
        # its write queues: the batch that runs it holds the commit (and on SQLite the file's
        # write lock, which other processes wait for) for less (the spec's JSON is the most).
        self.job = as_stored(
            Job(id=0, spec=spec, request_id=request_id, created_at=now, updated_at=now)
        )
        self.values = job_values(self.job)

    def __call__(self, session: Session) -> tuple[Job, bool]:
        return _create_many(session.connection(), [self])[0]


def _runs(batch: Sequence[Write[Session]]) -> Iterator[list[Write[Session]]]:
    """The batch in order, creates next to one another together, every other write alone."""
    run: list[Write[Session]] = []
    for w in batch:
        if run and not (isinstance(w.fn, _Create) and w.fenced == run[0].fenced):
            yield run
            run = []
        run.append(w)
        if not isinstance(w.fn, _Create):
            yield run
            run = []
    if run:
        yield run


def _create_many(conn: Connection, creates: Sequence[_Create]) -> list[tuple[Job, bool]]:
    """Store a job for each create, or find the one stored before under its request_id (an
    earlier create of these included): what each would have done run one after another.
    Core statements (no ORM objects, none of the ORM's execution path): the hottest path
    there is."""
    asked = sorted({c.request_id for c in creates if c.request_id})
    before: dict[str, Job] = {}
    for start in range(0, len(asked), _IN_CHUNK):
        chunk = asked[start : start + _IN_CHUNK]
        for row in conn.execute(_JOBS_BY_REQUEST_ID, {"request_ids": chunk}):
            before[row.request_id] = job_from_row(row)
    new: list[int] = []  # indexes of the creates that store a job
    first: dict[str, int] = {}  # request_id -> the create in this lot that stores it
    for i, c in enumerate(creates):
        if not c.request_id:
            new.append(i)
        elif c.request_id not in before and c.request_id not in first:
            first[c.request_id] = i
            new.append(i)
    made: dict[int, Job] = {}
    if new:
        revisions = _next_revisions(conn, len(new))
        rows = [{**creates[i].values, "revision": r} for i, r in zip(new, revisions, strict=True)]
        ids = list(conn.execute(_INSERT_JOBS, rows).scalars())
        events: list[Event] = []
        audits: list[dict[str, Any]] = []
        for i, revision, new_id in zip(new, revisions, ids, strict=True):
            c = creates[i]
            created = made[i] = replace(c.job, id=new_id, revision=revision)
            # In the same transaction: a crash never leaves a job without its events.
            if c.events is not None:
                events.extend(c.events(created))
            if c.audit is not None:
                audits.append(audit_values(c.audit(created)))
        _insert_events(conn, events)
        if audits:
            conn.execute(_INSERT_AUDIT, audits)
    results: list[tuple[Job, bool]] = []
    for i, c in enumerate(creates):
        if i in made:
            results.append((made[i], True))
        elif c.request_id in before:
            results.append((before[c.request_id], False))
        else:  # the same request_id as an earlier create of this lot
            results.append((made[first[c.request_id]], False))
    return results


def _unavailable(e: OperationalError) -> Unavailable:
    # Connection lost, server down, SQLite locked past the busy timeout: all may pass.
    error = Unavailable(f"store: {e.orig or e}")
    error.__cause__ = e
    return error


def _leadership(row: LeaderRow, now: float) -> Leadership:
    return Leadership(
        holder=row.holder,
        address=row.address,
        agent_address=row.agent_address,
        epoch=row.epoch,
        expires_in_s=row.expires_s - now,
    )


def _insert_events(session: Session | Connection, events: Sequence[Event]) -> None:
    if events:  # a Core insert: none of the ORM's unit of work for rows never read back
        session.execute(_INSERT_EVENT, [event_values(e) for e in events])


def _job_row_by_request_id(session: Session | Connection, request_id: str) -> Row[Any] | None:
    return session.execute(_JOB_BY_REQUEST_ID, {"request_id": request_id}).first()


def _update_jobs(session: Session, jobs: Sequence[Job], events: Sequence[Event]) -> tuple[Job, ...]:
    ids = sorted({job.id for job in jobs})
    fixed = {}  # what creation fixed, as stored
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        fixed.update({r.id: r for r in session.execute(_FIXED_OF, {"ids": chunk})})
    if missing := [i for i in ids if i not in fixed]:
        raise NotFound("job", str(missing[0]))
    written, params = [], []
    for job, revision in zip(jobs, _next_revisions(session, len(jobs)), strict=True):
        row = fixed[job.id]
        job = replace(
            job, revision=revision, request_id=row.request_id or "", created_at=row.created_at
        )
        values = job_state_values(job)
        params.append({"b_id": job.id, **{f"b_{k}": values[k] for k in _UPDATED}})
        written.append(as_stored(job))
    if params:
        session.execute(_UPDATE_JOB, params)
    _insert_events(session, events)
    return tuple(written)


def _next_revisions(session: Session | Connection, count: int) -> range:
    """Take `count` new store-wide revisions in this transaction.

    The UPDATE locks the counter row until commit, so transactions that write jobs commit in
    revision order and a watcher resuming after revision r misses nothing. Every job write takes
    this lock before any job row lock, so writers cannot deadlock on one another.
    """
    last = session.execute(_TAKE_REVISIONS, {"count": count}).scalar_one()
    return range(last - count + 1, last + 1)


# Both dialects spell INSERT ... ON CONFLICT the same way.
_UPSERTS: dict[str, Callable[..., Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None
    backend = parsed.get_backend_name() if parsed is not None else ""
    if parsed is not None and backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # A file only: each pooled connection would get its own empty in-memory database.
        _private_sqlite_files(Path(parsed.database))
        engine = create_engine(
            parsed.set(drivername="sqlite+pysqlite"), connect_args={"check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed is not None and backend in ("postgresql", "postgres"):
        # pre_ping: a pooled connection may have died with a PostgreSQL failover.
        return create_engine(parsed.set(drivername="postgresql+psycopg"), pool_pre_ping=True)
    raise InvalidArgument(
        [FieldViolation("url", "want sqlite:///path/to/file.db or postgresql://...")]
    )


class _WriterLock:
    """One writing process at a time on a SQLite file (gpuctld and its API workers), taken
    before BEGIN IMMEDIATE: a process that finds the lock taken sleeps in the kernel and wakes
    as it is released, where SQLite's own busy wait polls (1, 2, 5, 10 ms... apart)."""

    def __init__(self, path: Path) -> None:
        self._path = path  # made with the database (`_private_sqlite_files`)
        self._fd = -1  # opened at the first write

    def __enter__(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # lets go of the GIL while it waits

    def __exit__(self, *_exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _writer_lock_path(db: Path) -> Path:
    return db.with_name(db.name + "-writer")


def _private_sqlite_files(db: Path) -> None:
    """The database file exists, 0600, before SQLite opens it: SQLite would create it 0644 less
    the umask, and gives the -wal, -shm and -journal files it creates the database file's mode,
    so they follow. The writers' lock file (`_WriterLock`) is made beside it, 0600, at once.
    Files an older version left open to other accounts are tightened.

    Explicit modes rather than a process umask: the umask is process-wide (the daemon's socket
    and port file have modes of their own), and the store is opened by tests and tools too."""
    db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (db, _writer_lock_path(db)):
        if not path.exists():
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    suffixes = ("-wal", "-shm", "-journal", "-writer")
    for path in (db, *(db.with_name(db.name + suffix) for suffix in suffixes)):
        try:
            loose = stat.S_IMODE(path.stat().st_mode) & 0o077
        except FileNotFoundError:
            continue
        if loose:
            path.chmod(0o600)


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # Take transactions away from the sqlite3 module (which BEGINs lazily, DEFERRED) so that
    # `_sqlite_begin` decides how each one starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers do not block the writer. FULL: an acknowledged submission survives power loss.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # A write transaction takes the write lock up front: a DEFERRED one that read first could not
    # upgrade once another writer committed (SQLITE_BUSY at once, no busy wait).
    options = connection.get_execution_options()
    if options.get("gpuctl_one_statement", False):
        return  # one read statement: SQLite reads it from one snapshot in autocommit
    connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get("gpuctl_write", False) else "BEGIN")
