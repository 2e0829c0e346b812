"""users.source_digest and groups.members_digest: what a full resync compares before doing the work

users.source_digest: a digest of the vendor record the row was normalized from, so an unchanged
record skips normalization. groups.members_digest: a digest of the group's member ids, so a group
whose members did not change never has its stored memberships read.

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
    # Nullable, no backfill: NULL means "not known", and the next full run fills them in.
    op.add_column("users", sa.Column("source_digest", sa.String(length=32), nullable=True))
    op.add_column("groups", sa.Column("members_digest", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_column("members_digest")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("source_digest")
