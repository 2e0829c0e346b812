"""an index on runs (tenant, status, finished_at): a tenant's runs by outcome without reading them all

Every run's start marks its tenant's run still recorded as running cut off (`Store.start_run`),
every guard check asks whether the tenant ever succeeded (`has_succeeded`), and `dirpull status`
when each tenant last succeeded (`last_success`). By (tenant, id) alone each of these read all of
the tenant's runs, ever more of them as the years go by: 105,000 runs (three years of 15-minute
runs) cost each run's start 40 ms under the store's write lock, and each `dirpull status` 0.14 s.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_tenant_status", "runs", ["tenant", "status", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_runs_tenant_status", table_name="runs")
