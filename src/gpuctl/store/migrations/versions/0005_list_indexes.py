"""Jobs indexed by (owner, id) and (queue, id) instead of owner and queue alone: a page of one
user's or one queue's jobs, in id order, is read without sorting all of them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 04:55:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_id", "jobs", ["owner", "id"], unique=False)
    op.create_index("ix_jobs_queue_id", "jobs", ["queue", "id"], unique=False)
    op.drop_index("ix_jobs_owner", table_name="jobs")
    op.drop_index("ix_jobs_queue", table_name="jobs")


def downgrade() -> None:
    raise NotImplementedError("gpuctl does not downgrade a store: restore the backup taken before")
