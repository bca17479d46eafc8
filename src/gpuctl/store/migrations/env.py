"""Alembic's environment for gpuctl's store: always run from `gpuctl.store.schema`, which hands
over an open connection (under PostgreSQL's schema lock), never from alembic's own CLI config."""

from alembic import context

from gpuctl.store import tables  # noqa: F401  (registers every table on SQLModel.metadata)
from gpuctl.store.tables import SQLModel

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
