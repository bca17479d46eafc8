"""Group commit: writers waiting behind a commit share the next one; a write that fails fails
alone; a commit that fails fails its whole batch and nothing is written twice."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from gpuctl.core.errors import NotFound, Unavailable
from gpuctl.core.model import Event, Job, JobKind, JobSpec, JobState
from gpuctl.core.trust import AuditEntry
from gpuctl.store import SqlStore, open_store
from gpuctl.store.groupcommit import GroupCommit, Write
from gpuctl.store.mapping import audit_values
from gpuctl.store.sql import _INSERT_AUDIT
from tests.test_e2e import wait_until
from tests.test_store_contract import node

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SPEC = JobSpec(kind=JobKind.TRAINING, command=("train",), owner="alice", gpus_per_node=8)


class Gate:
    """A first write that holds the commit lock until opened, so others queue behind it."""

    def __init__(self) -> None:
        self.entered, self.open = threading.Event(), threading.Event()

    def __call__(self, _session: object) -> str:
        self.entered.set()
        assert self.open.wait(10)
        return "gate"


def _queued_behind(
    run: Callable[[Callable[[object], object]], object],
    queue_len: Callable[[], int],
    writes: Sequence[Callable[[], object]],
) -> list[Future]:
    """Start `writes` while a gate holds the lock; return their futures once all are queued."""
    gate = Gate()
    pool = ThreadPoolExecutor(len(writes) + 1)
    first = pool.submit(run, gate)
    assert gate.entered.wait(10)
    futures = [pool.submit(w) for w in writes]
    wait_until(lambda: queue_len() == len(writes))
    gate.open.set()
    assert first.result(10) == "gate"
    pool.shutdown(wait=True)
    return futures


def test_writers_queued_behind_a_commit_share_the_next_one() -> None:
    batches: list[int] = []

    def commit(batch: Sequence[Write[object]]) -> None:
        batches.append(len(batch))
        for w in batch:
            w.result = w.fn(None)

    group: GroupCommit[object] = GroupCommit(commit)
    futures = _queued_behind(
        group, lambda: len(group._queue), [lambda i=i: group(lambda _s: i) for i in range(20)]
    )
    assert [f.result() for f in futures] == list(range(20))  # each caller gets its own result
    assert batches == [1, 20]
    assert (group.batches, group.writes) == (2, 21)


def test_batches_are_bounded() -> None:
    batches: list[int] = []

    def commit(batch: Sequence[Write[object]]) -> None:
        batches.append(len(batch))
        for w in batch:
            w.result = w.fn(None)

    group: GroupCommit[object] = GroupCommit(commit, max_batch=8)
    _queued_behind(group, lambda: len(group._queue), [lambda: group(lambda _s: 0)] * 20)
    assert batches == [1, 8, 8, 4]


def test_a_commit_that_raises_fails_its_batch_and_leaves_no_caller_waiting() -> None:
    def commit(batch: Sequence[Write[object]]) -> None:
        results = [w.fn(None) for w in batch]
        if len(batch) > 1:
            raise RuntimeError("disk on fire")
        batch[0].result = results[0]

    group: GroupCommit[object] = GroupCommit(commit)
    futures = _queued_behind(group, lambda: len(group._queue), [lambda: group(lambda _s: 0)] * 5)
    for f in futures:
        with pytest.raises(RuntimeError, match="disk on fire"):
            f.result(10)
    assert group(lambda _s: "ok") == "ok"  # and the next write goes through


# -- on the store -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'gpuctl.db'}")
    yield opened
    opened.close()


def _audit(action: str) -> AuditEntry:
    return AuditEntry(
        time=T0, principal="alice", role="user", via="token", peer="-", action=action,
        target="", outcome="ok", detail="",
    )  # fmt: skip


def test_a_failing_write_fails_alone_and_the_rest_of_its_batch_commits(store: SqlStore) -> None:
    (job,) = [store.create_job(SPEC, request_id="", now=T0)[0]]
    writes = [
        lambda: store.create_job(SPEC, request_id="a", now=T0),
        lambda: store.update_jobs([Job(id=404, spec=SPEC)]),  # no such job
        lambda: store.update_jobs(
            [replace(job, state=JobState.RUNNING)],
            [Event(object_kind="job", object_id=str(job.id), time=T0, type="Started", message="")],
        ),
        lambda: store.add_audit(_audit("CreateJob")),
        lambda: store.create_job(SPEC, request_id="a", now=T0),  # the same request again
    ]
    futures = _queued_behind(store._write, lambda: len(store._write._queue), writes)
    created, missing, updated, audited, again = futures
    assert created.result()[1] is True
    with pytest.raises(NotFound):
        missing.result()
    assert updated.result()[0].state is JobState.RUNNING
    assert audited.result() is None
    assert again.result() == (created.result()[0], False)  # it saw the write before it
    assert store.get_job(job.id).state is JobState.RUNNING
    assert [e.type for e in store.list_events("job", str(job.id))] == ["Started"]
    assert [a.action for a in store.list_audit()] == ["CreateJob"]
    assert len(store.list_jobs().jobs) == 2


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gpuctl.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_store(url)
    yield opened
    opened.close()


def test_submits_of_one_batch_share_their_statements(any_store: SqlStore) -> None:
    store = any_store
    (before, _) = store.create_job(SPEC, request_id="old", now=T0)
    statements: list[str] = []
    # Statements as the store hands them to SQLAlchemy: on PostgreSQL each is a round trip
    # (SQLite's driver may run one a row at a time, but in this process).
    event.listen(
        store._engine, "before_execute", lambda *a: statements.append(str(a[1]).split()[0])
    )

    def submit(request_id: str, name: str) -> Callable[[], tuple[Job, bool]]:
        spec = replace(SPEC, name=name)
        return lambda: store.create_job(
            spec,
            request_id=request_id,
            now=T0,
            events=lambda j: [
                Event(
                    object_kind="job",
                    object_id=str(j.id),
                    time=T0,
                    type="Submitted",
                    message=j.spec.name,
                )
            ],
            audit=lambda j: replace(_audit("CreateJob"), target=f"jobs/{j.id}"),
        )

    futures = _queued_behind(
        store._write,
        lambda: len(store._write._queue),
        [submit(rid, f"job-{k}") for k, rid in enumerate(["a", "", "old", "", "a", "d"])],
    )
    results = [f.result() for f in futures]
    ran = [s for s in statements if s in ("SELECT", "INSERT", "UPDATE")]
    a, b, old, c, a_again, d = results
    # A new job each, in the order asked; a request_id stored before, or earlier in the same
    # batch, returns that job.
    assert [created for _, created in results] == [True, True, False, True, False, True]
    assert old[0] == before and a_again[0] == a[0]
    new = [a[0], b[0], c[0], d[0]]
    assert [j.spec.name for j in new] == ["job-0", "job-1", "job-3", "job-5"]
    assert [j.id for j in new] == sorted(j.id for j in new) and before.id < new[0].id
    assert [j.revision for j in new] == list(range(new[0].revision, new[0].revision + 4))
    for job in new:
        assert store.get_job(job.id) == job
        (submitted,) = store.list_events("job", str(job.id))
        assert submitted.message == job.spec.name
    assert sorted(e.target for e in store.list_audit()) == sorted(f"jobs/{j.id}" for j in new)
    # The first submit's batch, the gate's, then one of all six: a statement of each kind,
    # not one per submit.
    assert store._write.batches == 3
    assert ran.count("UPDATE") == 1  # the store's revisions, taken once
    assert ran.count("INSERT") == 3  # jobs, events, audit
    assert ran.count("SELECT") == 1  # the request_ids asked for


def test_a_failed_commit_fails_every_write_of_its_batch_and_runs_none_twice(
    store: SqlStore,
) -> None:
    runs: list[int] = []
    failed: list[bool] = []

    def failing_commit(_conn: object) -> None:
        if runs and not failed:  # the commit of the batch that ran the writes below
            failed.append(True)
            raise OperationalError("COMMIT", {}, sqlite3.OperationalError("disk I/O error"))

    event.listen(store._engine, "commit", failing_commit)

    def write(i: int) -> Callable[[], object]:
        def run(session: Session) -> int:
            runs.append(i)
            session.execute(_INSERT_AUDIT, audit_values(_audit(f"w{i}")))
            return i

        return lambda: store._write(run)

    futures = _queued_behind(
        store._write, lambda: len(store._write._queue), [write(i) for i in range(6)]
    )
    for f in futures:
        with pytest.raises(Unavailable, match="disk I/O error"):
            f.result()
    # Each ran once: the outcome of a failed commit is unknown, so nothing is tried again.
    assert sorted(runs) == list(range(6))
    assert store._write.batches == 2
    assert store.list_audit() == ()


def test_each_write_of_a_batch_sees_the_database_not_rows_an_earlier_one_left(
    store: SqlStore,
) -> None:
    store.put_node(node("n1"))
    writes = [
        lambda: store.put_node(node("n1", address="10.0.0.2")),
        lambda: store.put_node(node("n1", address="10.0.0.3")),
    ]
    first, second = _queued_behind(store._write, lambda: len(store._write._queue), writes)
    assert first.result().address == "10.0.0.2"
    assert second.result().address == "10.0.0.3"
    assert store.get_node("n1").address == "10.0.0.3"


def test_each_writer_is_told_before_it_waits_for_its_commit() -> None:
    # The API's handlers leave their gate there (api.lanes), so the calls behind them can add
    # their writes to the batch.
    told: list[str] = []
    seen: list[list[str]] = []

    def commit(batch):
        seen.append(list(told))
        for w in batch:
            w.result = w.fn(None)

    group = GroupCommit(commit)
    group.before_waiting = lambda: told.append(threading.current_thread().name)
    assert group(lambda _s: 7) == 7
    assert told == [threading.current_thread().name] and seen == [told]


def test_a_renewal_batched_with_submits_cannot_deadlock_another_writer(postgres_url: str) -> None:
    """Two writers of one PostgreSQL under one epoch (gpuctld and an API worker): each fences
    its transaction by holding the lease row FOR SHARE, and takes the revision counter to
    submit. A renewal of the lease (FOR UPDATE of that row) in a batch with submits runs before
    them, so it never waits for the row while holding the counter the other writer waits for:
    PostgreSQL would find that deadlock after deadlock_timeout (1 s) and fail one side."""
    ours, other = open_store(postgres_url), open_store(postgres_url)
    try:
        lead = ours.claim_leadership("head-1", address="", agent_address="", ttl_s=30.0)
        ours.fence(lead.epoch)
        pids: set[int] = set()
        event.listen(ours._engine, "connect", lambda conn, _rec: pids.add(conn.info.backend_pid))
        ours._engine.dispose()  # connections from now on: their pids known
        rollbacks: list[object] = []  # a deadlock would fail our batch (then retried alone)
        event.listen(ours._engine, "rollback", rollbacks.append)
        with other._engine.connect() as worker:
            worker.execute(text("SET lock_timeout = '10s'"))
            worker.execute(text("SELECT epoch FROM leader WHERE id = 1 FOR SHARE"))  # its fence
            gate = Gate()
            pool = ThreadPoolExecutor(3)
            held = pool.submit(ours._write, gate)
            assert gate.entered.wait(10)
            submit = pool.submit(ours.create_job, SPEC, request_id="", now=T0)
            renew = pool.submit(ours.renew_leadership, "head-1", lead.epoch, 30.0)
            wait_until(lambda: len(ours._write._queue) == 2)
            gate.open.set()
            assert held.result(10) == "gate"

            def ours_waits_on_a_lock() -> bool:
                rows = worker.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                )
                return any(pid in pids for (pid,) in rows)

            wait_until(ours_waits_on_a_lock, what="the renewal to wait for the lease row")
            # The other writer now takes revisions, as a submit of its own would.
            worker.execute(text("UPDATE revision_counter SET value = value + 1 WHERE id = 1"))
            worker.commit()
            assert renew.result(10) is True
            job, created = submit.result(10)
            pool.shutdown(wait=True)
        assert created and ours.get_job(job.id) == job
        assert rollbacks == []
    finally:
        ours.close()
        other.close()
