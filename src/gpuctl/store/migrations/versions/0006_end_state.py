"""The end state a cancelling job reaches once its ranks are stopped (jobs.end_state):
cancelled, or timeout for a job stopped at its time limit. New end states timeout and node-lost
need nothing of the schema (the state column is text).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("end_state", sa.String(), nullable=True))


def downgrade() -> None:
    raise NotImplementedError("gpuctl does not downgrade a store: restore the backup taken before")
