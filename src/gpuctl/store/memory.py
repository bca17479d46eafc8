"""`MemoryStore`: the `Store` contract kept in this process's memory, for tests and tools that
need a controller but no database. It passes the contract suite the SQL stores pass
(tests/test_store_contract.py), fencing and leadership included; nothing survives the
process, so gpuctld itself always runs on `SqlStore`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import datetime
from typing import TypeVar

from gpuctl.core.cost import AttemptCharge
from gpuctl.core.errors import NotFound, NotLeader
from gpuctl.core.model import Event, Job, JobSpec, JobState, Node, NodeLease
from gpuctl.core.trust import ApiToken, AuditEntry
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


@dataclass(slots=True)
class _Lease:
    """The leader lease, as the SQL stores keep it in their one row."""

    holder: str = ""
    address: str = ""
    agent_address: str = ""
    epoch: int = 0
    expires_s: float = 0.0  # seconds since 1970 by the store's clock


T = TypeVar("T")


def _stored(value: T) -> T:
    """`value` as a SQL store reads it back: every time in it (however deep) in UTC, and a
    naive one refused (ValueError), as the SQL stores refuse it."""
    if isinstance(value, datetime):
        return utc(value)  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(_stored(v) for v in value)  # type: ignore[return-value]
    if is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for f in fields(value):
            old = getattr(value, f.name)
            if isinstance(old, datetime | tuple) or is_dataclass(old):
                new = _stored(old)
                if new is not old:
                    changed[f.name] = new
        return replace(value, **changed) if changed else value  # type: ignore[type-var]
    return value


class MemoryStore:
    """Every method runs under one lock: one writer at a time, as SQLite has it."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.RLock()
        self._clock = clock  # seconds since 1970: the leader lease's clock
        self._epoch: int | None = None
        self.token_generation = 0
        self.local = True
        self._jobs: dict[int, Job] = {}
        self._by_request: dict[str, int] = {}
        self._next_id = 1
        self._revision = 0
        self._nodes: dict[str, Node] = {}
        self._leases: dict[str, NodeLease] = {}
        self._failed: dict[tuple[int, str, str], datetime] = {}
        self._events: list[tuple[int, Event]] = []  # (id, event), in id order
        self._event_ids = itertools.count(1)
        self._charges: dict[tuple[int, int], AttemptCharge] = {}
        self._tokens: dict[str, ApiToken] = {}
        self._audit: list[AuditEntry] = []  # in id order
        self._audit_ids = itertools.count(1)
        self._leader = _Lease()

    # -- writes -------------------------------------------------------------------------------

    def _fenced(self) -> None:
        """Fencing, as `SqlStore` does it: a write under a stale epoch is refused."""
        lease = self._leader
        if self._epoch is not None and lease.epoch != self._epoch:
            live = lease.expires_s > self._clock()
            raise NotLeader(lease.address if live else "", lease.agent_address if live else "")

    def _revisions(self, count: int) -> range:
        self._revision += count
        return range(self._revision - count + 1, self._revision + 1)

    def _add_events(self, events: Sequence[Event]) -> None:
        for e in events:
            self._events.append((next(self._event_ids), _stored(e)))

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(
        self,
        spec: JobSpec,
        *,
        request_id: str,
        now: datetime,
        events: Callable[[Job], Sequence[Event]] | None = None,
        audit: Callable[[Job], AuditEntry] | None = None,
    ) -> tuple[Job, bool]:
        with self._lock:
            self._fenced()
            if request_id and request_id in self._by_request:
                return self._jobs[self._by_request[request_id]], False
            (revision,) = self._revisions(1)
            job = _stored(
                Job(
                    id=self._next_id,
                    spec=spec,
                    request_id=request_id,
                    created_at=now,
                    updated_at=now,
                    revision=revision,
                )
            )
            new_events = tuple(events(job)) if events else ()
            entry = audit(job) if audit is not None else None
            self._next_id += 1
            self._jobs[job.id] = job
            if request_id:
                self._by_request[request_id] = job.id
            self._add_events(new_events)
            if entry is not None:
                self._add_audit(entry)
            return job, True

    def load_jobs(self, jobs: Sequence[Job], events: Sequence[Event]) -> None:
        """Insert `jobs` with the ids they carry, and `events` (benchmarks, imports)."""
        with self._lock:
            for job, revision in zip(jobs, self._revisions(len(jobs)), strict=True):
                self._jobs[job.id] = _stored(replace(job, revision=revision))
                if job.request_id:
                    self._by_request[job.request_id] = job.id
                self._next_id = max(self._next_id, job.id + 1)
            self._add_events(events)

    def get_job(self, job_id: int) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise NotFound("job", str(job_id))
            return self._jobs[job_id]

    def list_jobs(
        self,
        *,
        states: Sequence[JobState] = (),
        queue: str = "",
        owner: str = "",
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> JobPage:
        size = page_limit(page_size)
        after = decode_page_token(page_token)
        wanted = set(states)
        with self._lock:
            matching = (
                j
                for i, j in sorted(self._jobs.items())
                if i > after
                and (not wanted or j.state in wanted)
                and (not queue or j.spec.queue == queue)
                and (not owner or j.spec.owner == owner)
            )
            page = list(itertools.islice(matching, size + 1))
        jobs = tuple(page[:size])
        token = encode_page_token(jobs[-1].id) if len(page) > size else ""
        return JobPage(jobs=jobs, next_page_token=token)

    def count_jobs(self, *, states: Sequence[JobState] = (), owner: str = "") -> int:
        wanted = set(states)
        with self._lock:
            return sum(
                1
                for j in self._jobs.values()
                if (not wanted or j.state in wanted) and (not owner or j.spec.owner == owner)
            )

    def page_token_after(self, job_id: int) -> str:
        return encode_page_token(job_id)

    def active_jobs(self) -> tuple[Job, ...]:
        with self._lock:
            return tuple(j for _, j in sorted(self._jobs.items()) if not j.state.finished)

    def current_revision(self) -> int:
        with self._lock:
            return self._revision

    def jobs_since(self, revision: int) -> tuple[Job, ...]:
        with self._lock:
            newer = [j for j in self._jobs.values() if j.revision > revision]
        return tuple(sorted(newer, key=lambda j: j.revision))

    def update_jobs(self, jobs: Sequence[Job], events: Sequence[Event] = ()) -> tuple[Job, ...]:
        if not jobs and not events:
            return ()
        with self._lock:
            self._fenced()
            if missing := sorted({j.id for j in jobs} - set(self._jobs)):
                raise NotFound("job", str(missing[0]))
            written = []
            for job, revision in zip(jobs, self._revisions(len(jobs)), strict=True):
                fixed = self._jobs[job.id]
                written.append(
                    _stored(
                        replace(
                            job,
                            spec=fixed.spec,
                            request_id=fixed.request_id,
                            created_at=fixed.created_at,
                            revision=revision,
                        )
                    )
                )
            for job in written:
                self._jobs[job.id] = job
            self._add_events(events)
            return tuple(written)

    def respec_job(self, job: Job, events: Sequence[Event] = ()) -> Job:
        with self._lock:
            self._fenced()
            stored = self._jobs.get(job.id)
            if stored is None:
                raise NotFound("job", str(job.id))
            before, after = stored.spec, job.spec
            if any(getattr(before, k) != getattr(after, k) for k in SPEC_COLUMNS):
                raise ValueError(f"job {job.id}: only the spec's other fields may change")
            (revision,) = self._revisions(1)
            written = _stored(
                replace(
                    job,
                    request_id=stored.request_id,
                    created_at=stored.created_at,
                    revision=revision,
                )
            )
            self._jobs[job.id] = written
            self._add_events(events)
            return written

    # -- nodes and leases ---------------------------------------------------------------------

    def put_node(self, node: Node) -> Node:
        with self._lock:
            self._fenced()
            stored = self._nodes[node.id] = _stored(node)
            return stored

    def touch_node(self, node_id: str, last_heartbeat: datetime) -> None:
        with self._lock:
            self._fenced()
            if node_id not in self._nodes:
                raise NotFound("node", node_id)
            node = self._nodes[node_id]
            self._nodes[node_id] = replace(node, last_heartbeat=utc(last_heartbeat))

    def get_node(self, node_id: str) -> Node:
        with self._lock:
            if node_id not in self._nodes:
                raise NotFound("node", node_id)
            return self._nodes[node_id]

    def list_nodes(self, ids: Sequence[str] | None = None) -> tuple[Node, ...]:
        with self._lock:
            chosen = sorted(self._nodes) if ids is None else sorted(set(ids) & set(self._nodes))
            return tuple(self._nodes[i] for i in chosen)

    def put_lease(self, lease: NodeLease) -> NodeLease:
        with self._lock:
            self._fenced()
            stored = self._leases[lease.id] = _stored(lease)
            return stored

    def list_leases(self, *, include_released: bool = False) -> tuple[NodeLease, ...]:
        with self._lock:
            return tuple(
                lease
                for _, lease in sorted(self._leases.items())
                if include_released or lease.state not in ENDED_LEASE_STATES
            )

    def note_failed_offer(self, job_id: int, provider: str, sku: str, at: datetime) -> None:
        with self._lock:
            self._fenced()
            self._failed[(job_id, provider, sku)] = utc(at)

    def failed_offers(self, *, since: datetime) -> tuple[tuple[int, str, str, datetime], ...]:
        with self._lock:
            found = [(*k, at) for k, at in self._failed.items() if at > since]
        return tuple(sorted(found, key=lambda f: f[3]))

    def forget_failed_offers(self, *, before: datetime) -> None:
        with self._lock:
            self._fenced()
            self._failed = {k: at for k, at in self._failed.items() if at > before}

    # -- events, charges, tokens, audit -------------------------------------------------------

    def add_events(self, events: Sequence[Event]) -> None:
        if events:
            with self._lock:
                self._fenced()
                self._add_events(events)

    def list_events(
        self, object_kind: str, object_id: str, *, limit: int = 100
    ) -> tuple[Event, ...]:
        if limit <= 0:
            return ()
        with self._lock:
            mine = [
                (e.time, n, e)
                for n, e in self._events
                if e.object_kind == object_kind and e.object_id == object_id
            ]
        mine.sort(key=lambda t: (t[0], t[1]))  # by time; equal times in the order added
        return tuple(e for *_, e in mine[-limit:])

    def add_charges(self, charges: Sequence[AttemptCharge]) -> None:
        if charges:
            with self._lock:
                self._fenced()
                for c in charges:
                    self._charges[(c.job_id, c.attempt)] = _stored(c)

    def list_charges(self, *, since: datetime | None = None) -> tuple[AttemptCharge, ...]:
        with self._lock:
            return tuple(
                c for _, c in sorted(self._charges.items()) if since is None or c.ended_at > since
            )

    def put_token(self, token: ApiToken) -> ApiToken:
        with self._lock:
            try:
                self._fenced()
                self._tokens[token.id] = _stored(token)
            finally:
                self.token_generation += 1
            return self._tokens[token.id]

    def get_token(self, token_id: str) -> ApiToken:
        with self._lock:
            if token_id not in self._tokens:
                raise NotFound("token", token_id)
            return self._tokens[token_id]

    def list_tokens(self, *, principal: str = "") -> tuple[ApiToken, ...]:
        with self._lock:
            mine = [t for t in self._tokens.values() if not principal or t.principal == principal]
        return tuple(sorted(mine, key=lambda t: (t.created_at, t.id)))

    def add_audit(self, entry: AuditEntry) -> None:
        with self._lock:
            self._fenced()
            self._add_audit(entry)

    def _add_audit(self, entry: AuditEntry) -> None:
        self._audit.append(_stored(replace(entry, id=next(self._audit_ids))))

    def list_audit(
        self, *, since: datetime | None = None, principal: str = "", limit: int = 100
    ) -> tuple[AuditEntry, ...]:
        if limit <= 0:
            return ()
        with self._lock:
            mine = [
                e
                for e in self._audit
                if (since is None or e.time > since) and (not principal or e.principal == principal)
            ]
        return tuple(mine[-limit:])

    # -- retention ----------------------------------------------------------------------------

    def purge_finished_jobs(self, before: datetime, *, limit: int) -> tuple[int, ...]:
        with self._lock:
            self._fenced()
            done = sorted(
                (j.finished_at, j.id)
                for j in self._jobs.values()
                if j.state.finished and j.finished_at is not None and j.finished_at < before
            )
            ids = tuple(i for _, i in done[: max(0, limit)])
            gone = {str(i) for i in ids}
            for i in ids:
                job = self._jobs.pop(i)
                self._by_request.pop(job.request_id, None)
            self._events = [
                (n, e)
                for n, e in self._events
                if not (e.object_kind == "job" and e.object_id in gone)
            ]
            return ids

    def purge_audit(self, before: datetime, *, limit: int) -> int:
        with self._lock:
            self._fenced()
            drop = {e.id for e in self._audit if e.time < before}
            drop = set(sorted(drop)[: max(0, limit)])  # the oldest
            self._audit = [e for e in self._audit if e.id not in drop]
            return len(drop)

    def purge_events(self, kinds: Sequence[str], before: datetime, *, limit: int) -> int:
        with self._lock:
            self._fenced()
            old = [n for n, e in self._events if e.object_kind in kinds and e.time < before]
            drop = set(old[: max(0, limit)])
            self._events = [(n, e) for n, e in self._events if n not in drop]
            return len(drop)

    # -- leadership ---------------------------------------------------------------------------

    def _leadership(self) -> Leadership:
        lease = self._leader
        return Leadership(
            holder=lease.holder,
            address=lease.address,
            agent_address=lease.agent_address,
            epoch=lease.epoch,
            expires_in_s=lease.expires_s - self._clock(),
        )

    def claim_leadership(
        self, holder: str, *, address: str, agent_address: str, ttl_s: float
    ) -> Leadership:
        with self._lock:
            now, lease = self._clock(), self._leader
            if lease.holder == holder or lease.expires_s <= now:
                self._leader = _Lease(holder, address, agent_address, lease.epoch + 1, now + ttl_s)
            return self._leadership()

    def renew_leadership(self, holder: str, epoch: int, ttl_s: float) -> bool:
        with self._lock:
            lease = self._leader
            if (lease.holder, lease.epoch) != (holder, epoch):
                return False
            lease.expires_s = self._clock() + ttl_s
            return True

    def resign_leadership(self, holder: str, epoch: int) -> None:
        with self._lock:
            if (self._leader.holder, self._leader.epoch) == (holder, epoch):
                self._leader.expires_s = 0.0

    def leader(self) -> Leadership:
        with self._lock:
            return self._leadership()

    def fence(self, epoch: int | None) -> None:
        self._epoch = epoch

    def before_waiting(self, hook: Callable[[], None]) -> None:
        """Writes here never wait for a commit: nothing to run."""

    def analyze(self) -> None:
        """Planner statistics after a bulk load (`SqlStore.analyze`): none to gather here."""

    def close(self) -> None:
        pass
