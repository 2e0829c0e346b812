"""an index on runs (trigger, tenant, id): a tenant's newest scheduled run without reading its others

`dirpull status` shows each tenant's next run, counted from its newest scheduled run
(`Store.last_runs(trigger="schedule")`). Along the (tenant, id) index, filtered by trigger, a tenant
synced by hand only (disabled in the daemon, run by an external cron) had every run of it read in
each `dirpull status`: 105,000 runs (three years of 15-minute runs) cost it 70 ms on SQLite and
40 ms on PostgreSQL, now a look-up. The trigger comes first: the query reads the tenant as a range
(PostgreSQL would otherwise walk the primary key back, `last_runs`), and only an equality before
the range lets the index seek, and stop at, the tenant's end of that trigger's runs. One more
index entry per run: no row a sync writes in bulk.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_trigger_tenant", "runs", ["trigger", "tenant", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_runs_trigger_tenant", table_name="runs")
