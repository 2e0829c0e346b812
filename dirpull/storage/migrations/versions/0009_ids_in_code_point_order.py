"""ids compared by code point on PostgreSQL: users and groups listed in the same order as on SQLite

`dirpull users` and `dirpull groups` list by idp_id. SQLite compares text by code point; PostgreSQL
by the database's collation, which a server takes from its machine's locale (en_US.UTF-8 on most):
there "_x", "a", "b", "B", "é", "Z" came out in that order, on SQLite as "B", "Z", "_x", "a", "b",
"é", so the same directory was listed in two orders, and a script comparing listings or paging by
the last id it saw went wrong on one of them. The id columns collate "C" (by code point, in UTF-8)
on any server. Only the indexes holding these columns are rebuilt, not the tables. Nothing to do
on SQLite.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = {"users": ["idp_id"], "groups": ["idp_id"], "memberships": ["group_idp_id", "user_idp_id"]}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        changes = ", ".join(f'ALTER COLUMN {c} TYPE text COLLATE "C"' for c in columns)
        op.execute(f"ALTER TABLE {table} {changes}")  # one statement: each index rebuilt once


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        changes = ", ".join(f'ALTER COLUMN {c} TYPE text COLLATE "default"' for c in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
