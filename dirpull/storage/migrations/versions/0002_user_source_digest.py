"""users.source_digest: a digest of the vendor's own record, so an unchanged one skips normalization

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no backfill: a stored user without one is simply normalized on the next full run.
    op.add_column("users", sa.Column("source_digest", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("source_digest")
