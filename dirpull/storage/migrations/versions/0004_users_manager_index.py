"""an index on users (tenant, manager_idp_id): a deleted manager's reports found without a scan

An Entra ID delta that deletes users does not list the deleted managers' reports as changed; the
run looks them up in the store by manager (`Store.load_reports`). Without an index each lookup of
up to 500 managers read every user of the tenant.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_users_tenant_manager", "users", ["tenant", "manager_idp_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_users_tenant_manager", table_name="users")
