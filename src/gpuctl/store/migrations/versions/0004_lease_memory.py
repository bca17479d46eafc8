"""What the lease keeper remembered in memory only: since when an active leased node has been
idle (leases.idle_since) and which offers failed a job lately (failed_offers), so that a
gpuctld taking over, or restarting, goes on from the same place.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 04:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("idle_since", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "failed_offers",
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("sku", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "provider", "sku"),
    )
    op.create_index("ix_failed_offers_at", "failed_offers", ["at"], unique=False)


def downgrade() -> None:
    raise NotImplementedError("gpuctl does not downgrade a store: restore the backup taken before")
