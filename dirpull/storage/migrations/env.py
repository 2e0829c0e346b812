"""Alembic environment: dirpull runs migrations programmatically (`dirpull db upgrade`, or on a
brand-new store), handing the connection in through `config.attributes`."""

from __future__ import annotations

from alembic import context

from dirpull.storage.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` command line, for developers writing a migration
    from sqlalchemy import create_engine

    url = context.config.get_main_option("sqlalchemy.url") or "sqlite:///dirpull.db"
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
