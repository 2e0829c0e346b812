"""The store's tables (SQLAlchemy Core). Migrations in `migrations/versions` create them; this module
is what queries are written against. Nothing here is SQLite-only: JSON columns become `jsonb` on
PostgreSQL, sequence numbers are BIGINT there. What a vendor sends is text of any length (0003):
PostgreSQL would refuse a value longer than a varchar's limit, and fail the whole run with it."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


class JSONType(sa.types.TypeDecorator[Any]):
    """JSON, `jsonb` on PostgreSQL. A decorator rather than `JSON().with_variant(JSONB())`: the
    variant needs PostgreSQL's dialect imported with this module (~38 ms, a sixth of every
    command's start-up), which a SQLite store never uses."""

    impl = sa.JSON
    cache_ok = True
    should_evaluate_none = True  # as JSON's: None is stored as JSON null, not SQL NULL
    hashable = False

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(sa.JSON())

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
SeqType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("idp_id", sa.Text, primary_key=True),
    sa.Column("username", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("emails", JSONType, nullable=False),
    sa.Column("first_name", sa.Text),
    sa.Column("last_name", sa.Text),
    sa.Column("display_name", sa.Text),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("job_title", sa.Text),
    sa.Column("department", sa.Text),
    sa.Column("employee_number", sa.Text),
    sa.Column("manager_idp_id", sa.Text),
    sa.Column("custom_attributes", JSONType, nullable=False),
    sa.Column("raw_attributes", JSONType, nullable=False),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    # The digest of the vendor record this row was normalized from (`connectors.source`); NULL
    # when unknown. Not part of any output.
    sa.Column("source_digest", sa.String(32)),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    # `dirpull users T --state S`, already in idp_id order (0007), and users counted by state.
    sa.Index("ix_users_tenant_state_id", "tenant", "state", "idp_id"),
    # A deleted manager's reports (`Store.load_reports`, 0004).
    sa.Index("ix_users_tenant_manager", "tenant", "manager_idp_id"),
)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("idp_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("raw_attributes", JSONType, nullable=False),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    # The digest of the group's member ids (`sync.diff.members_digest`) as of the last full run;
    # NULL when unknown (an incremental run changed its members). Not part of any output.
    sa.Column("members_digest", sa.String(32)),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("group_idp_id", sa.Text, primary_key=True),
    sa.Column("user_idp_id", sa.Text, primary_key=True),
    sa.Column("created_at", TS, nullable=False),
    # A user's groups, answered from the index alone (0005): SQLite preferred scanning the
    # tenant's whole primary key, which holds both ids, to an index by user that did not.
    sa.Index("ix_memberships_tenant_user_group", "tenant", "user_idp_id", "group_idp_id"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", SeqType, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("object_id", sa.Text, nullable=False),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("previous_attributes", JSONType),
    sa.Column("created_at", TS, nullable=False),
    sa.Index("ix_events_tenant_seq", "tenant", "seq"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("worker", sa.String(128), nullable=False),
    sa.Column("started_at", TS, nullable=False),
    sa.Column("finished_at", TS),
    sa.Column("duration_s", sa.Float),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("counts", JSONType, nullable=False),
    sa.Column("notes", JSONType, nullable=False),
    sa.Column("quarantined", JSONType, nullable=False),
    sa.Column("error", sa.Text),
    sa.Index("ix_runs_tenant_id", "tenant", "id"),
    # A tenant's runs by outcome (0006): the run still marked running that a new one marks cut
    # off, whether it ever succeeded, when it last did (`dirpull status`).
    sa.Index("ix_runs_tenant_status", "tenant", "status", "finished_at"),
    # A tenant's newest run of a trigger (0008): `dirpull status`'s newest scheduled run. The trigger
    # first: the tenant is a range in that query (`Store.last_runs`), which would stop a (tenant,
    # trigger) index from seeking the trigger.
    sa.Index("ix_runs_trigger_tenant", "trigger", "tenant", "id"),
)

cursors = sa.Table(
    "cursors",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("value", JSONType),
    sa.Column("last_full_at", TS),
    sa.Column("updated_at", TS, nullable=False),
)

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(128)),
    sa.Column("acquired_at", TS),
    sa.Column("expires_at", TS),
)
