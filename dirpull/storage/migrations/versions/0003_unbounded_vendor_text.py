"""vendor values of any length: text instead of varchar(n) on PostgreSQL

PostgreSQL enforces a varchar's length (SQLite does not): one user whose job title, department or
name was longer than the column's 255 or 512 characters failed every run of its tenant on
PostgreSQL, while the same directory synced on SQLite. Vendors set their own limits (or none), so
the columns holding what a vendor sends are unbounded.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# table → {column: its length before this revision}
COLUMNS = {
    "users": {
        "idp_id": 255,
        "username": 512,
        "email": 512,
        "first_name": 255,
        "last_name": 255,
        "display_name": 512,
        "job_title": 255,
        "department": 255,
        "employee_number": 255,
        "manager_idp_id": 255,
    },
    "groups": {"idp_id": 255, "name": 512, "email": 512},
    "memberships": {"group_idp_id": 255, "user_idp_id": 255},
    "events": {"object_id": 255},
}


def upgrade() -> None:
    # SQLite never enforced the lengths, and changing a column there rebuilds the table (a copy of
    # every row): nothing to do. On PostgreSQL varchar → text is binary-compatible: no rewrite.
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        for column, length in columns.items():
            op.alter_column(table, column, type_=sa.Text(), existing_type=sa.String(length=length))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        for column, length in columns.items():
            op.alter_column(table, column, type_=sa.String(length=length), existing_type=sa.Text())
