"""Schema migrations: a store written by gpuctl 0.1.0 (the committed fixture) upgrades without
losing a row; older stores are refused until migrated; newer ones are never downgraded; and a
new store's tables are exactly what the migrations build."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from gpuctl.core.errors import FailedPrecondition
from gpuctl.core.model import JobState, LeaseState
from gpuctl.runtime import daemon
from gpuctl.store import open_store, schema
from gpuctl.store.tables import SQLModel

FIXTURE = Path(__file__).parent / "fixtures" / "store-v0.sqlite"
V0_TABLES = ("jobs", "nodes", "leases", "events", "charges", "tokens", "audit", "revision_counter")


@pytest.fixture
def v0(tmp_path: Path) -> Path:
    path = tmp_path / "store.db"
    shutil.copyfile(FIXTURE, path)
    path.chmod(0o600)
    return path


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(path) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in V0_TABLES}


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_store_of_0_1_0_upgrades_keeping_every_row(v0: Path) -> None:
    before = _rows(v0)
    assert all(before.values()), "the fixture holds a row of every table"
    store = open_store(f"sqlite:///{v0}", migrate=True)
    assert (store.schema.current, store.schema.head) == (schema.BASELINE, schema.head())
    try:
        jobs = store.list_jobs().jobs
        assert [j.state for j in jobs] == [
            JobState.PENDING,
            JobState.RUNNING,
            JobState.SUCCEEDED,
            JobState.FAILED,
        ]
        assert jobs[1].placement is not None and jobs[1].placement.master_port == 29500
        assert store.get_job(jobs[0].id).request_id == "req-0"
        assert [e.type for e in store.list_events("job", str(jobs[0].id))] == ["Submitted"]
        assert [n.id for n in store.list_nodes()] == ["n1", "n2"]
        assert len(store.list_nodes()[0].profile.gpus) == 8
        leases = store.list_leases(include_released=True)
        assert [(lease.id, lease.state) for lease in leases] == [
            ("lease-1", LeaseState.ACTIVE),
            ("lease-2", LeaseState.RELEASED),
        ]
        assert [c.dollars for c in store.list_charges()] == [23.92]
        assert [t.principal for t in store.list_tokens()] == ["alice"]
        assert [a.action for a in store.list_audit()] == ["CreateJob"]
        # It still works as a store: ids and revisions carry on from where 0.1.0 left them.
        job, created = store.create_job(jobs[0].spec, request_id="after", now=jobs[0].created_at)
        assert created and job.id == jobs[-1].id + 1 and job.revision > jobs[-1].revision
    finally:
        store.close()
    after = _rows(v0)
    unchanged = [t for t in V0_TABLES if t not in ("jobs", "revision_counter", "leases")]
    assert {t: after[t] for t in unchanged} == {t: before[t] for t in unchanged}
    # The new job came after, the old ones unchanged but for 0006's end_state.
    assert after["jobs"][:4] == [(*row, None) for row in before["jobs"]]
    assert after["leases"] == [(*row, None) for row in before["leases"]]  # 0004: idle_since
    assert {"leader", "failed_offers"} <= _tables(v0)


def test_an_older_store_is_refused_until_migrated_and_left_untouched(v0: Path) -> None:
    before = _rows(v0)
    with pytest.raises(FailedPrecondition, match=r"revision 0001 .* run `gpuctld migrate`"):
        open_store(f"sqlite:///{v0}")
    assert _rows(v0) == before
    assert "alembic_version" not in _tables(v0)


def test_a_newer_store_is_never_downgraded(v0: Path) -> None:
    open_store(f"sqlite:///{v0}", migrate=True).close()
    with sqlite3.connect(v0) as db:
        db.execute("UPDATE alembic_version SET version_num = 'f00d'")
    for migrate in (False, True):
        with pytest.raises(
            FailedPrecondition, match=r"newer than this gpuctld.*does not downgrade"
        ):
            open_store(f"sqlite:///{v0}", migrate=migrate)


def test_gpuctld_migrate_upgrades_once_then_has_nothing_to_do(
    v0: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{v0}"
    assert daemon.main(["migrate", "--store-url", url]) == 0
    assert f"upgraded from revision 0001 to {schema.head()}" in capsys.readouterr().out
    assert daemon.main(["migrate", "--store-url", url]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_gpuctld_refuses_to_serve_an_older_store_without_migrate(
    v0: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = daemon.main(
        ["--store-url", f"sqlite:///{v0}", "--state-dir", str(tmp_path / "state"), "--listen", ""]
    )
    assert code == 1
    assert "gpuctld migrate" in caplog.text


def _migrated_from_empty(url: str) -> list[object]:
    """The differences between the tables the migrations build and the models."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config = schema._config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()


def test_the_migrations_build_what_the_models_say_sqlite(tmp_path: Path) -> None:
    assert _migrated_from_empty(f"sqlite:///{tmp_path / 'm.db'}") == []


@pytest.mark.postgres
def test_the_migrations_build_what_the_models_say_postgres(postgres_url: str) -> None:
    assert (
        _migrated_from_empty(postgres_url.replace("postgresql://", "postgresql+psycopg://")) == []
    )


@pytest.mark.postgres
def test_a_postgres_store_at_the_baseline_upgrades_keeping_its_rows(postgres_url: str) -> None:
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    engine = create_engine(url)
    with engine.begin() as connection:
        config = schema._config()
        config.attributes["connection"] = connection
        command.upgrade(config, schema.BASELINE)
        connection.exec_driver_sql("INSERT INTO revision_counter (id, value) VALUES (1, 7)")
        connection.exec_driver_sql(
            "INSERT INTO nodes (id, address, fabric, provider, sku, region, labels, cpu_milli, "
            "memory_mib, profile, price_per_hour, state, state_reason, health_issues, lease_id) "
            "VALUES ('n1', '10.0.0.1', 'ib0', 'static', '', '', '[]', 1000, 1024, '{\"gpus\": []}', "
            "1.5, 'ready', '', '[]', '')"
        )
    engine.dispose()
    with pytest.raises(FailedPrecondition, match="gpuctld migrate"):
        open_store(postgres_url)
    store = open_store(postgres_url, migrate=True)
    try:
        assert store.schema.current == schema.BASELINE
        assert store.current_revision() == 7
        assert [n.id for n in store.list_nodes()] == ["n1"]
    finally:
        store.close()
