"""The store's schema version: Alembic migrations under `store/migrations`, applied by
`gpuctld migrate` (or at start with `--migrate`), never silently.

What `prepare` does with the database it is given:
- empty: creates every table at the newest revision (nothing to lose);
- at the newest revision: nothing;
- older (a store of an earlier release; one from before migrations has tables and no
  `alembic_version`, and is taken to be revision 0001): upgrades when asked to, else refuses
  to start, naming the command;
- newer than this release knows: refuses; gpuctl never downgrades a store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

from gpuctl.core.errors import FailedPrecondition
from gpuctl.store.tables import SQLModel

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# The revision of every store written before migrations existed (gpuctl 0.1.0).
BASELINE = "0001"


@dataclass(frozen=True, slots=True)
class SchemaState:
    current: str | None  # None: an empty database
    head: str

    @property
    def behind(self) -> bool:
        return self.current is not None and self.current != self.head


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def state(connection: Connection) -> SchemaState:
    """Where the database stands: its revision (BASELINE for a store of 0.1.0) and ours."""
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None and inspect(connection).has_table("jobs"):
        current = BASELINE
    return SchemaState(current=current, head=head())


def prepare(connection: Connection, *, migrate: bool) -> SchemaState:
    """Bring the database to the newest revision, or refuse (see the module's docstring).
    Returns the state found. The caller holds the schema lock (PostgreSQL) and commits."""
    found = state(connection)
    known = {s.revision for s in _scripts().walk_revisions()}
    if found.current is not None and found.current not in known:
        raise FailedPrecondition(
            f"the store's schema is at revision {found.current}, newer than this gpuctld "
            f"knows (up to {found.head}): it was written by a newer release. gpuctl does not "
            "downgrade a store: run the newer gpuctld, or restore the backup taken before "
            "the upgrade"
        )
    if found.current is None:
        # Empty: the tables of the newest schema, stamped as such (Alembic's recipe; a test
        # checks that these and the migrations' tables are the same).
        SQLModel.metadata.create_all(connection)
        _stamp(connection, found.head)
        return found
    if not found.behind:
        return found
    if not migrate:
        raise FailedPrecondition(
            f"the store's schema is at revision {found.current} and this gpuctld needs "
            f"{found.head}: back the store up, then run `gpuctld migrate` (or start gpuctld "
            "with --migrate)"
        )
    from alembic import command  # only here: the commands module is not needed otherwise

    if MigrationContext.configure(connection).get_current_revision() is None:
        _stamp(connection, found.current)  # a store of 0.1.0: its revision, said once
    config = _config()
    config.attributes["connection"] = connection
    command.upgrade(config, found.head)
    log.info("store schema upgraded from revision %s to %s", found.current, found.head)
    return found


def _stamp(connection: Connection, revision: str) -> None:
    MigrationContext.configure(connection).stamp(_scripts(), revision)
