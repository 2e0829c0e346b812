"""memberships by user: the index on (tenant, user_idp_id) now holds group_idp_id too

The groups of given users (`Store.membership_pairs(users=…)`, an incremental run's member changes;
`dirpull groups T --user U`) read only the group and user ids. SQLite, which has no statistics on
a dirpull store, preferred the primary key (tenant, group_idp_id, user_idp_id) for them, which
holds both ids, over (tenant, user_idp_id), which did not: every such query read all of the
tenant's memberships (300,000: 48 ms for one user, 1.1 s for 5,000 users in batches of 500; now 6 ms and 0.1 s). With
the group's id in the index by user, it answers them alone, on PostgreSQL an index-only scan.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Made before the old one goes: no moment without an index by user (one transaction anyway).
    op.create_index(
        "ix_memberships_tenant_user_group", "memberships", ["tenant", "user_idp_id", "group_idp_id"], unique=False
    )
    op.drop_index("ix_memberships_tenant_user", table_name="memberships")


def downgrade() -> None:
    op.create_index("ix_memberships_tenant_user", "memberships", ["tenant", "user_idp_id"], unique=False)
    op.drop_index("ix_memberships_tenant_user_group", table_name="memberships")
