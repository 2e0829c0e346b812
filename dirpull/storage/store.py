"""The store: normalized users, groups and memberships, the event log, runs, cursors and leases.

Everything a sync changes is written by `apply()` in ONE transaction (rows, events, the new cursor,
the run record), so a run applies completely or not at all. The store knows nothing of providers.

Two cross-process guarantees live here:
- Leases: a row per tenant with holder and expiry, taken with one conditional UPDATE, kept alive by
  a heartbeat and re-checked inside the applying transaction (a fencing check), so a worker that
  lost its lease cannot commit.
- Event order: on PostgreSQL, `apply()` takes a transaction-level advisory lock right before it
  inserts events, so transactions that write events commit in the order of their sequence
  numbers. A consumer reading `seq > N` can never later see a lower seq appear (no outbox gap).
  SQLite has a single writer, which gives the same order for free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from sys import intern
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dirpull.jsoncodec import compact, dumps, loads
from dirpull.model import GROUP_FIELDS, USER_FIELDS, in_contract_order
from dirpull.prefetch import Prefetch
from dirpull.spool import SpooledJson
from dirpull.storage import schema as t

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD_REVISION = "0009"  # the newest migration's revision
BATCH = 500
BULK = 2000  # rows per driver executemany call
SQLITE_ROWS_PER_INSERT = 1000  # rows per multi-row INSERT on SQLite (fewer when columns × rows > its limit)
SQLITE_ROWS_PER_READ = 20_000  # rows per aggregated read of a whole tenant on SQLite (`_tenant_rows`)
SQLITE_KEYED_ROWS = 400  # (key, value) rows per UPDATE … FROM (VALUES …) / DELETE on SQLite (2 variables each)
# A run writing at least this many rows and events gets a WRITE_CACHE_KIB page cache on SQLite.
BIG_WRITE_ROWS = 50_000
WRITE_CACHE_KIB = 32 * 1024
TIMESTAMPS = ("created_at", "updated_at")  # a user's or group's, after its fields (contract: Objects)
MEMBER_SEPARATOR = "\x1f"  # joins a group's member ids in `group_members` (ASCII unit separator)
# Advisory locks: one serializes a store's event commits, one its migrations. A store is a schema
# (the URL's search_path can name one), and advisory locks are per database: each key is the lock's
# kind in its high 32 bits and the schema's oid in its low 32, so stores in two schemas of one
# database never wait for each other, and two processes on one store always do.
EVENT_LOCK_KEY = 0x64697270  # "dirp"
MIGRATION_LOCK_KEY = EVENT_LOCK_KEY + 1
_SCHEMA_LOCK = sa.text(
    "SELECT pg_advisory_xact_lock(CAST(:kind AS bigint) * 4294967296"
    " + coalesce((SELECT oid::bigint FROM pg_namespace WHERE nspname = current_schema()), 0))"
)


def lock_schema(conn: Connection, kind: int) -> None:
    """Take the advisory lock `kind` (EVENT_LOCK_KEY, MIGRATION_LOCK_KEY) of the store `conn` is in,
    until its transaction ends (PostgreSQL)."""
    conn.execute(_SCHEMA_LOCK, {"kind": kind})
# How long a migration's statement waits for a table another session is using (PostgreSQL). While
# an ALTER TABLE waits, every later query on that table queues behind its lock request: unbounded,
# a long `dirpull events` or an analyst's open transaction stalled every consumer of the store.
# 10 s outlasts the store's ordinary short queries (a page of events, `dirpull status`), so a busy
# but healthy store still migrates, and keeps the stall it causes under consumers' usual 30 s
# timeouts; a session holding a table longer is not going to let go within any wait worth making.
MIGRATION_LOCK_TIMEOUT_S = 10


class StoreError(Exception):
    """The store cannot be used (unreachable, schema behind); phrased for the operator."""


class StoreUnavailable(StoreError):
    """The database could not be reached or failed a statement (one line, no password, no SQL)."""

    def __init__(self, message: str, *, lost_connection: bool = False) -> None:
        super().__init__(message)
        # An open connection dropped: a statement (a COMMIT) sent on it may have been carried out.
        self.lost_connection = lost_connection


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """`value` in UTC. SQLite hands back naive datetimes (stored in UTC) even for timezone=True
    columns; PostgreSQL hands them back in the session's TimeZone, the server's own unless set (often
    local time): every timestamp dirpull prints is UTC, on either store."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    # Always six fraction digits: isoformat() leaves them out when they are all zero (one timestamp
    # in a million), and a consumer parsing one fixed format failed on that one.
    value = _aware(value)
    return value.isoformat(timespec="microseconds").replace("+00:00", "Z") if value else None


@dataclass(slots=True)
class CursorState:
    value: dict[str, Any] | None
    last_full_at: datetime | None


@dataclass(slots=True)
class Lease:
    holder: str | None
    expires_at: datetime | None


@dataclass
class WriteSet:
    """What one run changes, computed by the diff; written by `Store.apply`.

    Membership events are not materialized: a first sync of a large tenant has hundreds of
    thousands of them, so `all_events()` makes them from `member_adds`/`member_removes` while they
    are written, in the event order consumers see: user creates, user updates, group creates,
    group updates (`events`), members added, members removed, then deletions (`tail_events`).
    """

    # Created rows: field dicts, or their canonical JSON in the diff's spool (read on write).
    user_creates: list[dict[str, Any] | SpooledJson]
    user_updates: list[dict[str, Any]]
    user_deletes: list[str]
    group_creates: list[dict[str, Any] | SpooledJson]
    group_updates: list[dict[str, Any]]
    group_deletes: list[str]
    member_adds: list[tuple[str, str]]
    member_removes: list[tuple[str, str]]
    # {"type", "object_id", "data", "previous_attributes"}; `data` may be a SpooledJson.
    events: list[dict[str, Any]]
    tail_events: list[dict[str, Any]] = field(default_factory=list)
    # Fingerprints of created/updated rows whose dicts do not carry one, by idp_id.
    user_fingerprints: dict[str, str] = field(default_factory=dict)
    group_fingerprints: dict[str, str] = field(default_factory=dict)
    # Source digests (`connectors.source`) of created/updated users, by idp_id; an updated user
    # without one gets NULL. `source_refreshes`: users whose row is unchanged but whose vendor
    # record was not (e.g. a last-login time): only the digest is rewritten, no event.
    user_sources: dict[str, str] = field(default_factory=dict)
    source_refreshes: dict[str, str] = field(default_factory=dict)
    # A full run: each group's new `members_digest`, for the groups whose digest changed. An
    # incremental run (None): the groups whose members change forget theirs.
    member_digests: dict[str, str] | None = None
    # Ids among the updated users (groups) whose values did not change, only their fingerprint
    # (an earlier release's digest): rewritten without moving `updated_at`, as no event is written.
    unchanged_users: set[str] = field(default_factory=set)
    unchanged_groups: set[str] = field(default_factory=set)

    @property
    def rows(self) -> int:
        return (
            len(self.user_creates)
            + len(self.user_updates)
            + len(self.user_deletes)
            + len(self.group_creates)
            + len(self.group_updates)
            + len(self.group_deletes)
            + len(self.member_adds)
            + len(self.member_removes)
        )

    @property
    def event_count(self) -> int:
        return len(self.events) + len(self.member_adds) + len(self.member_removes) + len(self.tail_events)

    def all_events(self, *, as_written: bool = False) -> Iterator[dict[str, Any]]:
        """Every event in order. `data` held in the diff's spool is read and decoded unless
        `as_written` (the store writes that JSON as it is)."""
        for e in self.events:
            data = e["data"]
            yield e if as_written or not isinstance(data, SpooledJson) else {**e, "data": loads(data.read())}
        for kind, pairs in (("group.user_added", self.member_adds), ("group.user_removed", self.member_removes)):
            for g, u in pairs:
                yield {"type": kind, "object_id": g, "data": {"group": g, "user": u}}
        yield from self.tail_events

    def event_rows(self, stamp: str | None = None) -> Iterator[tuple[str, str, str, str | None]]:
        """`all_events()` as the store writes them: (type, object_id, data as JSON, previous
        attributes as JSON or None). Membership events go straight to their JSON: a first sync of
        100,000 users has half a million to a million of them. `stamp` (the commit's time, as
        `_iso` writes it) completes a created or updated object's `data` with the timestamps its
        row gets: the contract's event data is the whole object."""
        for e in self.events:
            yield _event_row(e, stamp)
        for kind, pairs in (("group.user_added", self.member_adds), ("group.user_removed", self.member_removes)):
            for g, u in pairs:
                yield kind, g, dumps({"group": g, "user": u}), None
        for e in self.tail_events:
            yield _event_row(e)


def _event_row(e: Mapping[str, Any], stamp: str | None = None) -> tuple[str, str, str, str | None]:
    previous = e.get("previous_attributes")
    kind, data = e["type"], e["data"]
    if stamp is not None and kind.endswith((".created", ".updated")):
        # An updated object's `created_at` comes with its data (`diff.build_writes`, from the row).
        if isinstance(data, SpooledJson):  # a created record's canonical JSON object: `{…}`
            stamps = f',"created_at":"{stamp}","updated_at":"{stamp}"}}'.encode()
            text = (data.read()[:-1] + stamps).decode()
            return kind, e["object_id"], text, None if previous is None else dumps(previous)
        data = (
            {**data, "updated_at": stamp}
            if kind.endswith(".updated")
            else {**data, "created_at": stamp, "updated_at": stamp}
        )
    return kind, e["object_id"], _json_text(data), None if previous is None else dumps(previous)


class Store:
    def __init__(self, url: str, *, pool_size: int = 5, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.engine = _make_engine(url, pool_size=pool_size, connect_timeout=connect_timeout)
        self.dialect = self.engine.dialect.name
        _one_line_errors(self.engine, self.safe_url, lock_wait=self._lock_wait)
        self._file = _sqlite_file(url)

    def check_file(self) -> None:
        """A SQLite store's file is still the one this Store opened. Deleted or replaced (moved
        aside, a backup restored over it) under a running daemon, the pooled connections went on
        writing to the old one: every sync succeeded into a file no one could read any more,
        `dirpull status` said there was no store, and the log said nothing."""
        if self._file is None:
            return
        path, opened = self._file
        try:
            now: tuple[int, int] | None = _identity(path)
        except FileNotFoundError:
            now = None
        if now != opened:
            raise StoreUnavailable(
                f"store {self.safe_url}: its file was {'deleted' if now is None else 'replaced'} since this process "
                "opened it; nothing is written to the old one: restart dirpull to use the file there now"
            )

    @property
    def _lock_wait(self) -> float:
        """How long a write waits for another session's lock: a SQLite statement for another
        process's write lock (`_make_engine`), a PostgreSQL apply for any lock (`apply`)."""
        return self.connect_timeout * 3

    def _now(self, conn: Connection) -> datetime:
        """Lease times come from the database's clock on PostgreSQL, so the workers' machines may
        disagree about the time without two of them holding one lease. SQLite is one machine."""
        if self.dialect == "postgresql":
            return _aware(conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one())
        return utcnow()

    def close(self) -> None:
        self.engine.dispose()

    # --- schema ------------------------------------------------------------------------------------

    def _alembic(self, conn: Connection | None) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        return cfg

    def schema_state(self) -> tuple[str | None, str]:
        """(current revision or None for an empty database, head revision)."""
        with self.engine.connect() as conn:  # unreachable: StoreUnavailable, one line
            # A current store is told by one plain query: importing alembic and reading its
            # scripts is ~70 ms of every command (tests/test_store.py keeps HEAD_REVISION true).
            if sa.inspect(conn).has_table("alembic_version"):
                found = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
                if found == [HEAD_REVISION]:
                    return HEAD_REVISION, HEAD_REVISION
            from alembic.runtime.migration import MigrationContext
            from alembic.script import ScriptDirectory

            current = MigrationContext.configure(conn).get_current_revision()
            head = ScriptDirectory.from_config(self._alembic(conn)).get_current_head()
        return current, head or ""

    def upgrade(self, *, only_if_empty: bool = False) -> tuple[str | None, str]:
        """Apply pending migrations in one transaction, one process at a time; returns (from, to).

        Several workers started at once on an empty store: one migrates, the others wait for its
        lock and then find the schema current. With `only_if_empty`, refuse a store that has
        tables but is not current (that needs an explicit `dirpull db upgrade`)."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        before, head = self.schema_state()
        if before == head:
            return before, head
        if self.schema_is_newer(before):
            raise self._behind(before, head)
        engine = self._migration_engine()
        try:
            with engine.begin() as conn:
                if self.dialect == "postgresql":  # DDL is transactional there
                    lock_schema(conn, MIGRATION_LOCK_KEY)
                    # Set after the advisory lock: a second `dirpull db upgrade` (or a worker
                    # starting on an empty store) waits for the first to finish, however long.
                    ms = int(MIGRATION_LOCK_TIMEOUT_S * 1000)
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = {ms}"))
                current = MigrationContext.configure(conn).get_current_revision()
                if current == head:
                    # Another process migrated it while this one waited for the lock: this one
                    # changed nothing, and says so (it said "was 0001" as the one that did).
                    return current, head
                if only_if_empty and (current is not None or sa.inspect(conn).get_table_names()):
                    raise self._behind(current, head)
                command.upgrade(self._alembic(conn), "head")
        except StoreUnavailable as exc:
            if getattr(exc.__cause__, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            raise StoreError(
                f"store {self.safe_url}: schema upgrade from {before or 'empty'} to {head} gave up after waiting "
                f"{MIGRATION_LOCK_TIMEOUT_S:g}s for a table another session is using (a long query or a transaction "
                "left open); nothing changed; retry when it has finished"
            ) from None
        except sa.exc.DBAPIError as exc:
            # A migration the database refuses (PostgreSQL 15's "permission denied for schema
            # public", a table of that name from another application) was alembic's traceback with
            # the SQL. The migrations run in one transaction: it is rolled back, nothing changed.
            raise StoreError(
                f"store {self.safe_url}: schema upgrade from {before or 'empty'} to {head} failed, "
                f"nothing changed ({_first_line(exc)})"
            ) from None
        finally:
            if engine is not self.engine:
                engine.dispose()
        return before, head

    def _migration_engine(self) -> Engine:
        if self.dialect != "sqlite":
            return self.engine
        engine = _make_engine(self.url, pool_size=1, connect_timeout=self.connect_timeout, migrating=True)
        _one_line_errors(engine, self.safe_url, lock_wait=self._lock_wait)
        return engine

    def ensure_schema(self, *, create_if_empty: bool = True) -> None:
        """Refuse an outdated schema; create it on a brand-new, empty store (zero set-up)."""
        current, head = self.schema_state()
        if current == head:
            return
        if current is None and create_if_empty:
            self.upgrade(only_if_empty=True)
            return
        raise self._behind(current, head)

    def schema_is_newer(self, current: str | None) -> bool:
        """The schema is at a revision this dirpull has no migration for: a newer one migrated it."""
        if current is None:
            return False
        from alembic.script import ScriptDirectory

        scripts = ScriptDirectory.from_config(self._alembic(None))
        return current not in {s.revision for s in scripts.walk_revisions()}

    def _behind(self, current: str | None, head: str) -> StoreError:
        if self.schema_is_newer(current):
            return StoreError(
                f"store {self.safe_url}: schema is at revision {current}, newer than this dirpull "
                f"(which needs {head}): a newer dirpull migrated it; upgrade dirpull here"
            )
        if current is None:
            # Tables, but none of them dirpull's (`upgrade(only_if_empty=True)`): "schema is at
            # revision none" read as an old dirpull store, when it is most likely the wrong database.
            return StoreError(
                f"store {self.safe_url}: the database has tables but no dirpull schema (another application's "
                "database, or the wrong one named?); nothing changed: point the store url at dirpull's database, "
                "or run `dirpull db upgrade` to add dirpull's tables beside them"
            )
        return StoreError(
            f"store {self.safe_url}: schema is at revision {current}, this dirpull needs {head}; "
            "run `dirpull db upgrade`"
        )

    def _has_tables(self) -> bool:
        return bool(sa.inspect(self.engine).get_table_names())

    def holds_other_tables(self) -> bool:
        """Whether a database without dirpull's schema has tables of its own (another
        application's database, most likely: not an empty store waiting for `dirpull db upgrade`)."""
        return self.schema_state()[0] is None and self._has_tables()

    @property
    def safe_url(self) -> str:
        # hide_password covers only user:password@; libpq also takes ?password=… in the query.
        return mask_password(self.engine.url.render_as_string(hide_password=True))

    # --- tenants -----------------------------------------------------------------------------------

    def ensure_tenant(self, tenant: str, provider: str) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(t.tenants.c.provider).where(t.tenants.c.id == tenant)).first()
            if row is None:
                try:
                    # A savepoint: on PostgreSQL a failed statement would abort the whole transaction.
                    with conn.begin_nested():
                        conn.execute(t.tenants.insert().values(id=tenant, provider=provider, created_at=utcnow()))
                except sa.exc.IntegrityError:
                    pass  # another worker created it at the same moment
            elif row.provider != provider:
                conn.execute(t.tenants.update().where(t.tenants.c.id == tenant).values(provider=provider))

    def tenant_exists(self, tenant: str) -> bool:
        if not self._could_be_stored(tenant):
            return False
        with self.engine.connect() as conn:
            return conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.id == tenant)).first() is not None

    # --- state the diff needs --------------------------------------------------------------------

    def user_fingerprints(self, tenant: str, ids: Iterable[str] | None = None) -> dict[str, str]:
        """idp_id → fingerprint of the tenant's users (or only of `ids`)."""
        return self._fingerprints(t.users, tenant, ids)

    def group_fingerprints(self, tenant: str, ids: Iterable[str] | None = None) -> dict[str, str]:
        return self._fingerprints(t.groups, tenant, ids)

    def user_digests(self, tenant: str) -> tuple[dict[str, str], dict[str, str]]:
        """Every user's fingerprint and (where known) source digest, by idp_id, in one read."""
        return self._with_digests(t.users, "source_digest", tenant)

    def group_digests(self, tenant: str) -> tuple[dict[str, str], dict[str, str]]:
        """Every group's fingerprint and (where known) members digest, by idp_id, in one read."""
        return self._with_digests(t.groups, "members_digest", tenant)

    def _with_digests(self, table: sa.Table, column: str, tenant: str) -> tuple[dict[str, str], dict[str, str]]:
        fps: dict[str, str] = {}
        digests: dict[str, str] = {}
        with self.engine.connect() as conn:
            for key, fp, digest in _tenant_rows(conn, table, ["idp_id", "fingerprint", column], tenant):
                key = intern(key)  # the diff holds these ids in several sets at once
                fps[key] = fp
                if digest is not None:
                    digests[key] = digest
        return fps, digests

    def user_sources(self, tenant: str, ids: Iterable[str]) -> dict[str, str]:
        """idp_id → source digest of the given users that have one."""
        return {k: v for k, v in self._fingerprints(t.users, tenant, ids, column="source_digest").items() if v}

    def _fingerprints(
        self, table: sa.Table, tenant: str, ids: Iterable[str] | None, *, column: str = "fingerprint"
    ) -> dict[str, str]:
        q = sa.select(table.c.idp_id, table.c[column]).where(table.c.tenant == tenant)
        with self.engine.connect() as conn:
            if ids is None:
                # Interned: the diff holds these ids in several sets at once.
                return {intern(k): v for k, v in _tenant_rows(conn, table, ["idp_id", column], tenant)}
            out: dict[str, str] = {}
            id_list = [k for k in ids if self._could_be_stored(k)]  # as in membership_pairs
            for i in range(0, len(id_list), BATCH):
                out.update((k, v) for k, v in conn.execute(q.where(table.c.idp_id.in_(id_list[i : i + BATCH]))))
            return out

    def membership_pairs(
        self, tenant: str, *, groups: Iterable[str] | None = None, users: Iterable[str] | None = None
    ) -> set[tuple[str, str]]:
        """Every (group, user) pair of the tenant, or those of the given groups or users."""
        m = t.memberships.c
        q = sa.select(m.group_idp_id, m.user_idp_id).where(m.tenant == tenant)
        with self.engine.connect() as conn:
            if groups is None and users is None:
                pairs = _tenant_rows(conn, t.memberships, ["group_idp_id", "user_idp_id"], tenant)
                return {(intern(g), intern(u)) for g, u in pairs}
            out: set[tuple[str, str]] = set()
            for column, keys in ((m.group_idp_id, groups), (m.user_idp_id, users)):
                # An id no row can hold (a NUL on PostgreSQL: a quarantined record's) names no
                # pair, and PostgreSQL would refuse the whole query over it.
                key_list = [k for k in keys or () if self._could_be_stored(k)]
                for i in range(0, len(key_list), BATCH):
                    out.update(_driver_rows(conn, q.where(column.in_(key_list[i : i + BATCH]))))
            return out

    def group_members(self, tenant: str, groups: Iterable[str]) -> dict[str, set[str]]:
        """The stored members of the given groups (a group without any is left out).

        One row per group, its members joined by the database: a full resync after changes spread
        over most groups reads them all, and half a million rows cost more to fetch than the
        database took to join them."""
        m = t.memberships.c
        joined = sa.func.aggregate_strings(m.user_idp_id, MEMBER_SEPARATOR)
        out: dict[str, set[str]] = {}
        odd: list[str] = []
        group_list = list(groups)
        with self.engine.connect() as conn:
            for i in range(0, len(group_list), BATCH):
                q = (
                    sa.select(m.group_idp_id, sa.func.count(), joined)
                    .where(m.tenant == tenant, m.group_idp_id.in_(group_list[i : i + BATCH]))
                    .group_by(m.group_idp_id)
                )
                for g, count, text in _driver_rows(conn, q):
                    users = text.split(MEMBER_SEPARATOR)
                    if len(users) == count:
                        out[g] = set(users)
                    else:  # an id holding the separator itself: read that group row by row
                        odd.append(g)
        for g, u in self.membership_pairs(tenant, groups=odd) if odd else ():
            out.setdefault(g, set()).add(u)
        return out

    def existing_pairs(self, tenant: str, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The given (group, user) pairs that are stored."""
        wanted = set(pairs)
        if not wanted:
            return set()
        # By group, through the primary key's (tenant, group_idp_id) prefix: a row-value IN list
        # is not an index lookup on SQLite.
        return wanted & self.membership_pairs(tenant, groups={g for g, _ in wanted})

    def load_users(self, tenant: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored users, as `iter_users` gives them (the objects' timestamps included)."""
        return self._load(t.users, [*USER_FIELDS, *TIMESTAMPS], tenant, ids)

    def load_groups(self, tenant: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored groups, as `iter_groups` gives them (the objects' timestamps included)."""
        return self._load(t.groups, [*GROUP_FIELDS, *TIMESTAMPS], tenant, ids)

    def load_reports(self, tenant: str, managers: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored users whose `manager_idp_id` is one of `managers`, by idp_id."""
        return self._load(t.users, USER_FIELDS, tenant, managers, key=t.users.c.manager_idp_id)

    def _load(
        self, table: sa.Table, names: Sequence[str], tenant: str, ids: Iterable[str],
        *, key: sa.Column[Any] | None = None,
    ) -> dict[str, dict[str, Any]]:  # fmt: skip
        cols = [table.c[n] for n in names]
        by = table.c.idp_id if key is None else key
        out: dict[str, dict[str, Any]] = {}
        id_list = list(ids)
        with self.engine.connect() as conn:
            for i in range(0, len(id_list), BATCH):
                chunk = id_list[i : i + BATCH]
                q = sa.select(*cols).where(table.c.tenant == tenant, by.in_(chunk))
                for row in conn.execute(q).mappings():
                    found = out[row["idp_id"]] = dict(row)
                    for stamp in TIMESTAMPS:
                        if stamp in found:
                            found[stamp] = _iso(found[stamp])
        return out

    def count_users(self, tenant: str) -> dict[str, int]:
        q = sa.select(t.users.c.state, sa.func.count()).where(t.users.c.tenant == tenant).group_by(t.users.c.state)
        with self.engine.connect() as conn:
            return {k: v for k, v in conn.execute(q)}

    def count_groups(self, tenant: str) -> int:
        q = sa.select(sa.func.count()).select_from(t.groups).where(t.groups.c.tenant == tenant)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def count_memberships(self, tenant: str) -> int:
        q = sa.select(sa.func.count()).select_from(t.memberships).where(t.memberships.c.tenant == tenant)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def get_cursor(self, tenant: str) -> CursorState:
        q = sa.select(t.cursors.c.value, t.cursors.c.last_full_at).where(t.cursors.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        if row is None:
            return CursorState(None, None)
        return CursorState(row.value, _aware(row.last_full_at))

    def has_succeeded(self, tenant: str) -> bool:
        q = sa.select(t.runs.c.id).where(t.runs.c.tenant == tenant, t.runs.c.status == "succeeded").limit(1)
        with self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    # --- leases ----------------------------------------------------------------------------------

    def acquire_lease(
        self, tenant: str, holder: str, ttl: timedelta, *, reclaim: tuple[str, int] | None = None
    ) -> Lease | None:
        """Take the tenant's lease. Returns None when taken, else the current holder's lease.

        `reclaim` (prefix, length): a holder of that prefix and length is the caller's own, from a
        run of it that has ended (its release failed, the store out at that moment): taken back
        before it expires. The caller guarantees no holder of that form is in use.

        One conditional UPDATE: of two workers racing for an expired lease, PostgreSQL makes the
        second wait for the first's row lock and then re-checks the WHERE against the new holder.
        Once more if the lease was released between that UPDATE and the read of its holder."""
        L = t.leases.c
        with self.engine.begin() as conn:
            now = self._now(conn)
            free = [L.holder.is_(None), L.expires_at < now]
            if reclaim is not None:
                prefix, length = reclaim
                # substr, not LIKE: exact on both databases (SQLite's LIKE ignores ASCII case).
                mine = sa.and_(sa.func.substr(L.holder, 1, len(prefix)) == prefix, sa.func.length(L.holder) == length)
                free.append(mine)
            take = (
                t.leases.update()
                .where(L.tenant == tenant, sa.or_(*free))
                .values(holder=holder, acquired_at=now, expires_at=now + ttl)
            )
            if conn.execute(take).rowcount:
                return None
            row = conn.execute(sa.select(L.holder, L.expires_at).where(L.tenant == tenant)).first()
            if row is not None and row.holder is None:
                # Released after the UPDATE found it held (PostgreSQL reads each statement's own
                # snapshot): free now, so take it, rather than be skipped as "synced by None".
                if conn.execute(take).rowcount:
                    return None
                row = conn.execute(sa.select(L.holder, L.expires_at).where(L.tenant == tenant)).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            t.leases.insert().values(
                                tenant=tenant, holder=holder, acquired_at=now, expires_at=now + ttl
                            )
                        )
                    return None
                except sa.exc.IntegrityError:
                    row = conn.execute(sa.select(L.holder, L.expires_at).where(L.tenant == tenant)).first()
            assert row is not None
            return Lease(row.holder, _aware(row.expires_at))

    def renew_lease(self, tenant: str, holder: str, ttl: timedelta) -> bool:
        L = t.leases.c
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    t.leases.update()
                    .where(L.tenant == tenant, L.holder == holder)
                    .values(expires_at=self._now(conn) + ttl)
                ).rowcount
            )

    def release_lease(self, tenant: str, holder: str) -> None:
        L = t.leases.c
        with self.engine.begin() as conn:
            conn.execute(
                t.leases.update().where(L.tenant == tenant, L.holder == holder).values(holder=None, expires_at=None)
            )

    def lease(self, tenant: str) -> Lease:
        L = t.leases.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(L.holder, L.expires_at).where(L.tenant == tenant)).first()
            now = self._now(conn)
        if row is None or row.holder is None or _aware(row.expires_at) < now:
            return Lease(None, None)
        return Lease(row.holder, _aware(row.expires_at))

    # --- runs --------------------------------------------------------------------------------------

    def start_run(self, tenant: str, *, trigger: str, mode: str, worker: str) -> int:
        with self.engine.begin() as conn:
            # A run still marked running was cut off (its worker died): this worker holds the
            # lease now, so that run can no longer commit.
            conn.execute(
                t.runs.update()
                .where(t.runs.c.tenant == tenant, t.runs.c.status == "running")
                .values(status="failed", finished_at=utcnow(), error="interrupted: worker stopped or lost its lease")
            )
            return int(
                conn.execute(
                    t.runs.insert().values(
                        tenant=tenant,
                        trigger=trigger,
                        mode=mode,
                        status="running",
                        worker=worker,
                        started_at=utcnow(),
                        counts={},
                        notes=[],
                        quarantined=[],
                        requests=0,
                    )
                ).inserted_primary_key[0]
            )

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        mode: str,
        counts: Mapping[str, int],
        requests: int,
        notes: Sequence[str] = (),
        quarantined: Sequence[Mapping[str, Any]] = (),
        error: str | None = None,
        conn: Connection | None = None,
        holder: str | None = None,
        only_running: bool = False,
        duration_s: float | None = None,
    ) -> bool:
        """Record a run's outcome. With `holder`, only while it still holds the run's tenant's
        lease (LeaseLost otherwise, nothing written): a held run's record is its commit, and a
        worker that lost its lease must not turn a run already marked cut off (by the worker that
        took over, `start_run`) into an outcome asking the operator to act on it. With
        `only_running`, only if the run is still recorded running (a commit that may have landed
        must not be re-marked failed). `duration_s`: the run's, as the runner timed it on the
        monotonic clock; else the wall clock's finish minus its start. Returns whether the run's
        record was written."""
        values = dict(
            status=status,
            mode=mode,
            counts=dict(counts),
            requests=requests,
            notes=list(notes),
            quarantined=list(quarantined),
            error=error,
            finished_at=utcnow(),
        )

        tenants: list[str] = []

        def _write(c: Connection) -> bool:
            tenant, started = c.execute(
                sa.select(t.runs.c.tenant, t.runs.c.started_at).where(t.runs.c.id == run_id)
            ).one()
            tenants.append(tenant)
            if holder is not None:
                self._fence(c, tenant, holder)
            values["duration_s"] = (
                duration_s if duration_s is not None else round((utcnow() - _aware(started)).total_seconds(), 3)
            )
            update = t.runs.update().where(t.runs.c.id == run_id)
            if only_running:
                update = update.where(t.runs.c.status == "running")
            return bool(c.execute(update.values(**values)).rowcount)

        if conn is not None:
            return _write(conn)
        committing = False
        try:
            with self.engine.begin() as c:
                written = _write(c)
                committing = True  # leaving the block commits
        except StoreUnavailable as exc:
            if holder is None or not committing or not exc.lost_connection:
                raise
            # A held run's record is its commit, as `apply`'s is a succeeded run's: its answer lost,
            # the store tells whether it landed (then it stays held, not re-marked failed).
            self._settle_lost_commit(tenants[0], run_id, status, exc)
            return True
        return written

    def runs(self, tenant: str, limit: int = 20) -> list[dict[str, Any]]:
        # A range of the (tenant, id) index read back from its end, as in `last_runs`. Asked for
        # `tenant = T ORDER BY id DESC`, PostgreSQL walked the primary key back from the newest run
        # of all when the tenant had half the runs or more (its statistics' estimate): for a tenant
        # whose runs stopped (disabled, or run by hand) it read every later run of the others
        # first, in each `dirpull runs` and for each tenant in each `dirpull status`.
        r = t.runs.c
        q = sa.select(t.runs).where(r.tenant >= tenant, r.tenant <= tenant).order_by(r.tenant.desc(), r.id.desc())
        q = q.limit(limit)
        with self.engine.connect() as conn:
            return [_run_dict(r) for r in conn.execute(q).mappings()]

    def last_runs(self, *, trigger: str | None = None) -> dict[str, dict[str, Any]]:
        """The newest run of every tenant (`trigger`: the newest with that trigger, e.g. "schedule")."""
        # Tenant by tenant (every run's tenant has its row, `ensure_tenant`), each read from the
        # end of its part of the (tenant, id) index. Grouped over the runs table, every run ever
        # recorded was read (three tenants' 105,000 runs each: 0.16 s of each `dirpull status`).
        # The tenant is a range, in the index's order, not `= tenant` and max(id): for that
        # PostgreSQL walked the primary key back from the newest run of all, which read every run
        # for a tenant with none (a tenant configured but never synced) or only old ones.
        r = t.runs.alias("r")
        newest = (
            sa.select(r.c.id)
            .where(r.c.tenant >= t.tenants.c.id, r.c.tenant <= t.tenants.c.id)
            .order_by(r.c.tenant.desc(), r.c.id.desc())
            .limit(1)
        )
        if trigger is not None:
            # By the (trigger, tenant, id) index (0008): the same range, one look-up. Along the
            # (tenant, id) index, a tenant with no recent run of that trigger (one synced by hand
            # only) had every run of it read, in each `dirpull status`.
            newest = newest.where(r.c.trigger == trigger)
        ids = sa.select(newest.correlate(t.tenants).scalar_subquery()).select_from(t.tenants)
        with self.engine.connect() as conn:
            # Two queries: joined to the runs by id, PostgreSQL (taking the small tenants table,
            # which autovacuum never analyzes, for hundreds of rows) hashed all runs for it.
            found = [run_id for run_id in conn.execute(ids).scalars() if run_id is not None]
            q = sa.select(t.runs).where(t.runs.c.id.in_(found))
            return {r["tenant"]: _run_dict(r) for r in conn.execute(q).mappings()}

    def scheduled_run_after(
        self, tenant: str, after_id: int, *, other_than: str
    ) -> tuple[dict[str, Any] | None, int]:
        """The newest scheduled run of `tenant` with an id above `after_id` (begun after that run
        was recorded: the database's order, not any machine's clock) that another worker than
        `other_than` brought to an end (succeeded or held): that fire's work is done. And the
        tenant's newest run id. Only its latest runs are looked at (a few per interval)."""
        r = t.runs.c
        q = (
            sa.select(r.id, r.worker, r.trigger, r.status, r.finished_at)
            .where(r.tenant == tenant, r.id > after_id)
            .order_by(r.id.desc())
            .limit(50)
        )
        with self.engine.connect() as conn:
            rows = list(conn.execute(q).mappings())
        newest = rows[0]["id"] if rows else after_id
        for row in rows:
            if row["trigger"] == "schedule" and row["status"] in ("succeeded", "held") and row["worker"] != other_than:
                return {**row, "finished_at": _aware(row["finished_at"])}, newest
        return None, newest

    def last_success(self) -> dict[str, datetime]:
        """When each tenant's last successful run finished (a tenant without one is left out)."""
        # Tenant by tenant, each one look-up of the (tenant, status, finished_at) index (0006), as
        # in `last_runs`.
        r = t.runs.alias("r")
        latest = sa.select(sa.func.max(r.c.finished_at)).where(r.c.tenant == t.tenants.c.id, r.c.status == "succeeded")
        q = sa.select(t.tenants.c.id, latest.correlate(t.tenants).scalar_subquery())
        with self.engine.connect() as conn:
            return {tenant: _aware(ts) for tenant, ts in conn.execute(q) if ts is not None}

    # --- apply ---------------------------------------------------------------------------------------

    def apply(
        self,
        tenant: str,
        run_id: int,
        writes: WriteSet,
        *,
        holder: str,
        cursor: dict[str, Any] | None,
        full: bool,
        run_fields: Mapping[str, Any],
    ) -> int:
        """Write one run in one transaction; returns the number of events written.

        Raises LeaseLost (and writes nothing) if `holder` no longer holds the tenant's lease.
        The connection lost during the COMMIT: returns if the store has the run committed after all
        (its answer lost), raises StoreUnavailable if not, CommitUnconfirmed if it cannot be asked.
        """
        committing = False
        try:
            with self.engine.connect() as conn, self._write_cache(conn, writes), conn.begin():
                if self.dialect == "postgresql":
                    # A session holding a lock the apply needs (a psql transaction left open on a
                    # table, a stuck worker's event lock) held the run, and its tenant, for good,
                    # saying nothing: it now waits as long as a SQLite store's write does.
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = {max(1, int(self._lock_wait * 1000))}"))
                now = self._now(conn)
                self._fence(conn, tenant, holder)
                self._write_rows(conn, tenant, writes, now)
                written = self._write_events(conn, tenant, run_id, writes, now)
                self._write_cursor(conn, tenant, cursor, full, now, run_id)
                self.finish_run(run_id, conn=conn, **run_fields)
                committing = True  # leaving the block commits
        except StoreUnavailable as exc:
            if not committing or not exc.lost_connection:
                raise  # any answer from the server to the COMMIT says it did not commit
            self._settle_lost_commit(tenant, run_id, run_fields["status"], exc)
        return written

    def _settle_lost_commit(self, tenant: str, run_id: int, status: str, lost: StoreUnavailable) -> None:
        """The connection was lost during the run's COMMIT: the server may have committed it, only
        its answer lost (a network cut, a failover). Recorded failed on that error, a committed run
        (its events already read by consumers) showed as failing. The run's row, written in that
        transaction, tells: returns if it is committed, raises if not.

        FOR UPDATE waits for that transaction to end if the server has not yet seen the connection
        go (its row lock on the run): then committed or rolled back, never both. The server ends
        it within its keepalives or idle_in_transaction_session_timeout (`_make_engine`)."""
        try:
            with self.engine.begin() as conn:
                found = conn.execute(
                    sa.select(t.runs.c.status).where(t.runs.c.id == run_id).with_for_update()
                ).scalar_one()
        except (StoreError, sa.exc.SQLAlchemyError) as exc:
            log.warning(
                "tenant %s: run %d: the store's confirmation of the commit was lost (%s), and the store could "
                "not be asked whether it was committed (%s)", tenant, run_id, lost, _first_line(exc),
            )  # fmt: skip
            raise CommitUnconfirmed(
                f"{lost} at the commit; whether the run was applied is not known: the store could not be asked "
                f"({_first_line(exc)}); `dirpull runs {tenant}` shows it once the store is back"
            ) from None
        if found == status:
            log.warning(
                "tenant %s: run %d: the store's confirmation of the commit was lost (%s); the store shows the run "
                "was committed: it %s", tenant, run_id, lost, status,
            )  # fmt: skip
            return
        log.warning(
            "tenant %s: run %d: the store's confirmation of the commit was lost (%s); the store shows the run "
            "was not committed: nothing applied", tenant, run_id, lost,
        )  # fmt: skip
        raise StoreUnavailable(
            f"{lost} at the commit; the store shows the run was not committed: nothing applied"
        ) from None

    def _fence(self, conn: Connection, tenant: str, holder: str) -> None:
        """The fencing check, and on PostgreSQL a row lock on the lease until the transaction
        commits: no other worker can take the lease between this check and the commit.

        The lease is this run's while it names this run's holder, expired or not, as for
        `renew_lease`: a worker takes a lease by writing its own holder there, and cannot until
        this transaction ends (the row lock; SQLite's write lock). A run whose machine slept past
        the lease's expiry, no one taking it meanwhile, reached its commit before its heartbeat
        (on the monotonic clock, stopped during the sleep) renewed the lease, and failed."""
        L = t.leases.c
        fenced = conn.execute(
            t.leases.update().where(L.tenant == tenant, L.holder == holder).values(expires_at=L.expires_at)
        ).rowcount
        if not fenced:
            raise LeaseLost(f"tenant {tenant}: lease lost before commit; nothing applied")

    @contextlib.contextmanager
    def _write_cache(self, conn: Connection, writes: WriteSet) -> Iterator[None]:
        """SQLite: a large page cache while a large run is written, back to what it was after.

        A first sync inserts up to a million memberships, whose (tenant, user) index is filled in
        random order: with SQLite's default 2 MB cache the B-tree pages go back and forth to the
        WAL (886,000 memberships: 7.4 s; with 32 MB: 4.4 s). The cache is given back once the run
        is committed, so an idle worker does not keep it."""
        if self.dialect != "sqlite" or writes.rows + writes.event_count < BIG_WRITE_ROWS:
            yield
            return
        raw = conn.connection.driver_connection
        assert raw is not None
        before = raw.execute("PRAGMA cache_size").fetchone()[0]
        raw.execute(f"PRAGMA cache_size=-{WRITE_CACHE_KIB}")
        try:
            yield
        finally:
            raw.execute(f"PRAGMA cache_size={int(before)}")

    def _write_rows(self, conn: Connection, tenant: str, w: WriteSet, now: datetime) -> None:
        ts = _bound(t.TS, now, conn)
        for table, names, creates, updates, deletes, fps, sources, quiet in (
            (t.users, USER_FIELDS, w.user_creates, w.user_updates, w.user_deletes, w.user_fingerprints,
             w.user_sources, w.unchanged_users),
            (t.groups, GROUP_FIELDS, w.group_creates, w.group_updates, w.group_deletes, w.group_fingerprints,
             None, w.unchanged_groups),
        ):  # fmt: skip
            extra = ["source_digest"] if sources is not None else []
            if creates and _sqlite_json(conn):
                creates = _insert_records_sqlite(conn, table, names, tenant, ts, creates, fps, sources)
            if creates:
                json_cols = _json_columns(table)
                _insert_many(
                    conn,
                    table,
                    ["tenant", *names, "fingerprint", *extra, "created_at", "updated_at"],
                    (
                        (
                            tenant,
                            *[dumps(row[n]) if n in json_cols else row[n] for n in names],
                            row["fingerprint"] if "fingerprint" in row else fps.get(row["idp_id"]),
                            *([sources.get(row["idp_id"])] if sources is not None else []),
                            ts,
                            ts,
                        )
                        for row in map(_as_dict, creates)
                    ),
                )
            if updates:
                updates = [{"fingerprint": fps.get(r["idp_id"]), **r} for r in updates]
                if sources is not None:
                    # A row rewritten without a digest of its vendor record must not keep an old one.
                    updates = [{**r, "source_digest": sources.get(r["idp_id"])} for r in updates]
                names = [n for n in updates[0] if n != "idp_id"]
                changed = [r for r in updates if r["idp_id"] not in quiet] if quiet else updates
                if changed:
                    _update_rows(conn, table, tenant, names, changed, now)
                if quiet:
                    _update_rows(conn, table, tenant, names, [r for r in updates if r["idp_id"] in quiet], None)
            for chunk in _chunks(deletes, BATCH):
                conn.execute(table.delete().where(table.c.tenant == tenant, table.c.idp_id.in_(chunk)))
        if w.source_refreshes:
            _set_by_id(conn, t.users, "source_digest", tenant, sorted(w.source_refreshes.items()))
        m = t.memberships
        _insert_many(
            conn,
            m,
            ["tenant", "group_idp_id", "user_idp_id", "created_at"],
            ((tenant, g, u, ts) for g, u in w.member_adds),
        )
        if w.member_removes:
            _delete_pairs(conn, tenant, w.member_removes)
        self._write_member_digests(conn, tenant, w)

    def _write_member_digests(self, conn: Connection, tenant: str, w: WriteSet) -> None:
        g = t.groups
        if w.member_digests is not None:
            _set_by_id(conn, g, "members_digest", tenant, sorted(w.member_digests.items()))
            return
        touched = sorted({grp for grp, _ in w.member_adds} | {grp for grp, _ in w.member_removes})
        for chunk in _chunks(touched, BATCH):
            conn.execute(
                g.update().where(g.c.tenant == tenant, g.c.idp_id.in_(chunk)).values(members_digest=None)
            )

    def _write_events(self, conn: Connection, tenant: str, run_id: int, writes: WriteSet, now: datetime) -> int:
        if not writes.event_count:
            return 0
        if self.dialect == "postgresql":
            lock_schema(conn, EVENT_LOCK_KEY)
        ts = _bound(t.TS, now, conn)
        return _insert_many(
            conn,
            t.events,
            ["tenant", "run_id", "type", "object_id", "data", "previous_attributes", "created_at"],
            (
                (tenant, run_id, kind, key, data, previous, ts)
                for kind, key, data, previous in writes.event_rows(_iso(now))
            ),
        )

    def _write_cursor(
        self, conn: Connection, tenant: str, cursor: dict[str, Any] | None, full: bool, now: datetime, run_id: int
    ) -> None:
        c = t.cursors.c
        values: dict[str, Any] = {"value": cursor, "updated_at": now}
        if full:
            # When the full walk started, not when it committed: `full_sync_every` counts from
            # there as the schedule does. From the commit, a tenant on a daily cron (or any
            # schedule that divides `full_sync_every`) found the next full sync due a few minutes
            # after its next fire, and walked in full every other day.
            values["last_full_at"] = sa.select(t.runs.c.started_at).where(t.runs.c.id == run_id).scalar_subquery()
        updated = conn.execute(t.cursors.update().where(c.tenant == tenant).values(**values)).rowcount
        if not updated:
            conn.execute(t.cursors.insert().values(tenant=tenant, **values))

    # --- queries (streamed: a tenant of 100,000 users never sits in memory) -------------------------

    def iter_users(
        self, tenant: str, *, state: str | None = None, group: str | None = None
    ) -> Iterator[dict[str, Any]]:
        u = t.users
        q = sa.select(*[u.c[n] for n in USER_FIELDS], u.c.created_at, u.c.updated_at).where(u.c.tenant == tenant)
        if state:
            q = q.where(u.c.state == state)
        if group is not None:  # "" (an unset shell variable) is a group no one is in, not no filter
            m = t.memberships.c
            q = q.where(u.c.idp_id.in_(sa.select(m.user_idp_id).where(m.tenant == tenant, m.group_idp_id == group)))
        yield from self._stream(q.order_by(u.c.idp_id))

    def iter_groups(self, tenant: str, *, user: str | None = None) -> Iterator[dict[str, Any]]:
        g = t.groups
        q = sa.select(*[g.c[n] for n in GROUP_FIELDS], g.c.created_at, g.c.updated_at).where(g.c.tenant == tenant)
        if user is not None:  # as for `group` above
            m = t.memberships.c
            q = q.where(g.c.idp_id.in_(sa.select(m.group_idp_id).where(m.tenant == tenant, m.user_idp_id == user)))
        yield from self._stream(q.order_by(g.c.idp_id))

    def find_user(self, tenant: str, key: str) -> list[dict[str, Any]]:
        """The user whose idp_id is `key`; if there is none, the users (at most two) whose idp_id,
        username or email is `key` ignoring case: what an operator typed for an idp_id."""
        return self._find(t.users, ["idp_id", "username", "email", "display_name"], ["username", "email"], tenant, key)

    def find_group(self, tenant: str, key: str) -> list[dict[str, Any]]:
        """The group whose idp_id is `key`; if there is none, the groups (at most two) whose idp_id,
        name or email is `key` ignoring case."""
        return self._find(t.groups, ["idp_id", "name", "email"], ["name", "email"], tenant, key)

    def _find(
        self, table: sa.Table, names: Sequence[str], others: Sequence[str], tenant: str, key: str
    ) -> list[dict[str, Any]]:
        if not (self._could_be_stored(tenant) and self._could_be_stored(key)):
            return []
        q = sa.select(*[table.c[n] for n in names]).where(table.c.tenant == tenant)
        with self.engine.connect() as conn:
            # The primary key: a query given a right id costs one index lookup.
            if (row := conn.execute(q.where(table.c.idp_id == key)).mappings().first()) is not None:
                return [dict(row)]
            if not key:  # no record has an empty id, and an empty name or email is no hint
                return []
            # Only for a wrong id: the tenant's rows are scanned (no index on these columns). The
            # database lowers both sides: SQLite only ASCII letters, so a hint may be missed there.
            lowered = sa.func.lower(key)
            alike = sa.or_(*[sa.func.lower(table.c[n]) == lowered for n in ("idp_id", *others)])
            return [dict(r) for r in conn.execute(q.where(alike).order_by(table.c.idp_id).limit(2)).mappings()]

    def _could_be_stored(self, key: str) -> bool:
        """Whether `key` (an id an operator typed) can name anything in the store. A command-line
        argument that is not UTF-8 (typed in a Latin-1 terminal) reaches Python holding lone
        surrogates, which neither driver can send: the query commands ended in a traceback instead
        of saying there is no such tenant, user or group. Stored text never holds one (replaced on
        the way in), nor, on PostgreSQL, a NUL."""
        try:
            key.encode()
        except UnicodeEncodeError:
            return False
        return self.dialect != "postgresql" or "\x00" not in key

    def iter_events(self, tenant: str | None, *, after: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        e = t.events
        q = sa.select(e)
        if tenant is None:
            q = q.where(e.c.seq > after).order_by(e.c.seq)
        elif self.dialect == "postgresql":
            # Said as a range of the (tenant, seq) index, in its order, not as `tenant = T AND seq
            # > N ORDER BY seq`. For that PostgreSQL weighed the primary key, already in seq order,
            # against the index, and took the key: it expects the tenant's events spread evenly
            # over the log. A consumer polling a quiet tenant at its head (nothing new) then read
            # every other tenant's event after N, only to find none of its own (a million: 0.2 s a
            # poll). Here the key would have to read and sort all events. (SQLite plans
            # `tenant = ?` by the index, and would not use this range beyond the tenant.)
            start = sa.tuple_(sa.literal(tenant, e.c.tenant.type), sa.literal(after, e.c.seq.type))
            q = q.where(sa.tuple_(e.c.tenant, e.c.seq) > start, e.c.tenant <= tenant)
            q = q.order_by(e.c.tenant, e.c.seq)
        else:
            q = q.where(e.c.tenant == tenant, e.c.seq > after).order_by(e.c.seq)
        if limit is not None:
            q = q.limit(limit)
        for row in self._stream(q):
            yield {
                "seq": row["seq"],
                "type": row["type"],
                "tenant": row["tenant"],
                "run_id": row["run_id"],
                "data": in_contract_order(row["type"], row["data"]),
                "previous_attributes": in_contract_order(row["type"], row["previous_attributes"]),
                "created_at": row["created_at"],
            }

    def iter_memberships(self, tenant: str) -> Iterator[tuple[str, str]]:
        m = t.memberships.c
        q = sa.select(m.group_idp_id, m.user_idp_id).where(m.tenant == tenant).order_by(m.group_idp_id, m.user_idp_id)
        with self.engine.connect() as conn:
            self._unhurried(conn)
            yield from conn.execution_options(yield_per=2000).execute(q)

    def last_seq(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.events.c.seq), 0))).scalar_one())

    def _unhurried(self, conn: Connection) -> None:
        """A streamed read waits for its consumer between batches (`dirpull events --json` piped
        into a program that handles each event slowly), inside the transaction that holds its
        server-side cursor. The connection's idle-in-transaction limit is for a vanished writer
        holding the lease row and the event lock: it ended a slow reader after two minutes, its
        output cut short with a traceback. A read holds neither; a vanished reader is still found
        by the TCP keepalives."""
        if self.dialect == "postgresql":
            conn.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = 0"))

    def _stream(self, q: sa.Select[Any]) -> Iterator[dict[str, Any]]:
        with self.engine.connect() as conn:
            self._unhurried(conn)
            for row in conn.execution_options(yield_per=1000).execute(q).mappings():
                out = dict(row)
                for key in ("created_at", "updated_at"):
                    if key in out:
                        out[key] = _iso(out[key])
                yield out


class LeaseLost(StoreError):
    pass


class CommitUnconfirmed(StoreError):
    """The connection was lost during a run's commit and the store could not be asked whether it
    was committed: the run may be applied."""


def _run_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("started_at", "finished_at"):
        out[key] = _iso(out[key])
    return out


def _insert_many(conn: Connection, table: sa.Table, names: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> int:
    """INSERT rows (value tuples in `names` order, ready for the driver: JSON as text, timestamps
    bound by `_bound`), in batches, straight through the driver.

    This skips SQLAlchemy's per-row parameter processing, which on a first sync of 100,000 users
    (~1,200,000 rows and events) cost more than the database itself.
    """
    prep = conn.dialect.identifier_preparer
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    head = f"INSERT INTO {prep.format_table(table)} ({', '.join(prep.quote(n) for n in names)}) VALUES "
    one = f"({', '.join([mark] * len(names))})"
    if conn.dialect.name == "sqlite":
        return _insert_sqlite(conn, head, one, len(names), rows)
    sql = head + one
    written = 0
    batch: list[tuple[Any, ...]] = []
    json_at = [i for i, n in enumerate(names) if isinstance(table.c[n].type, t.JSONType)]
    for row in rows:
        if json_at:
            row = tuple(_jsonb_text(v) if i in json_at and v is not None else v for i, v in enumerate(row))
        batch.append(row)
        if len(batch) == BULK:
            conn.exec_driver_sql(sql, batch)
            written += len(batch)
            batch = []
    if batch:
        conn.exec_driver_sql(sql, batch)
        written += len(batch)
    return written


def _insert_sqlite(
    conn: Connection, head: str, one: str, width: int, rows: Iterable[tuple[Any, ...]], *, tail: str = "",
    lead: tuple[Any, ...] = (),
) -> int:  # fmt: skip
    """SQLite: multi-row INSERTs, each statement's values built in another thread while SQLite
    writes the one before.

    CPython's sqlite3 lets go of the GIL around every step of a statement, and executemany steps
    once per row: with any other thread busy (the next rows being built; another tenant's sync in
    the daemon) each row waits for the GIL to come back. scripts/bench_sqlite_threads.py, user
    rows: executemany 0.45 s for 100,000 alone, 143–266 rows/s beside a busy thread; this 0.32 s
    alone, ~100,000 rows/s beside one. One step per statement also lets SQLite's own work run
    beside the Python that builds the next values (Workday's first sync: 6.4 → 5.7 s to apply).

    The statement is `head` + `one` per row + `tail`; `lead` holds the values of the variables in
    `head`, bound once per statement."""
    raw = conn.connection.driver_connection
    assert raw is not None
    limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - len(lead)
    per = max(1, min(SQLITE_ROWS_PER_INSERT, limit // width))
    statements: dict[int, str] = {}

    def insert(count: int, values: tuple[Any, ...]) -> int:
        sql = statements.get(count)
        if sql is None:
            sql = statements[count] = head + ", ".join([one] * count) + tail
        conn.exec_driver_sql(sql, lead + values if lead else values)
        return count

    batches = _flat_batches(rows, per)
    first = next(batches, None)
    if first is None:
        return 0
    written = insert(*first)
    if first[0] < per:
        return written  # one statement held them all: no helper thread for a small run
    with Prefetch(lambda: batches, depth=2, name="store-rows") as ahead:
        for count, values in ahead:
            written += insert(count, values)
    return written


def _sqlite_json(conn: Connection) -> bool:
    """SQLite with the JSON `->`/`->>` operators (3.38+, built in unless compiled out)."""
    return conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 38)


def _insert_records_sqlite(
    conn: Connection, table: sa.Table, names: Sequence[str], tenant: str, ts: Any,
    records: Iterable[dict[str, Any] | SpooledJson], fps: Mapping[str, str], sources: Mapping[str, str] | None,
) -> list[dict[str, Any] | SpooledJson]:  # fmt: skip
    """Insert created users or groups on SQLite, each given as its JSON, which SQLite takes apart;
    returns the records left for the caller to insert from Python: those holding a NUL character,
    which SQLite's `->>` would cut a string short at.

    A spooled record goes from the spool to SQLite as it is: decoding it in Python and encoding
    its JSON columns again cost more than the insert (100,000 BambooHR users: 1.0 s of Python
    beside 0.5 s in SQLite, now 0.4 s and 0.7 s — SQLite's share needs no GIL). A JSON column
    holds its value's JSON exactly as the record's JSON has it: the same compact text `dumps`
    would write, since the record's JSON is compact."""
    json_cols = _json_columns(table)
    prep = conn.dialect.identifier_preparer
    extra = ["source_digest"] if sources is not None else []
    columns = ["tenant", *names, "fingerprint", *extra, "created_at", "updated_at"]
    picks = [f"v.column1 {'->' if n in json_cols else '->>'} '$.{n}'" for n in names]
    picks += [f"v.column{2 + i}" for i in range(1 + len(extra))]
    head = (
        f"INSERT INTO {prep.format_table(table)} ({', '.join(prep.quote(c) for c in columns)}) "
        f"SELECT ?, {', '.join(picks)}, ?, ? FROM (VALUES "
    )
    width = 2 + len(extra)
    # The JSON is bound as bytes (no str made of it) and read by SQLite as the UTF-8 text it is.
    one = f"(CAST(? AS TEXT), {', '.join(['?'] * (width - 1))})"

    left: list[dict[str, Any] | SpooledJson] = []

    def rows() -> Iterator[tuple[Any, ...]]:
        for record in records:
            if isinstance(record, SpooledJson) and record.key is not None:
                key, blob = record.key, record.read()
                fp = fps.get(key)
            else:
                fields = _as_dict(record)
                key, blob = fields["idp_id"], compact(fields)
                fp = fields["fingerprint"] if "fingerprint" in fields else fps.get(key)
            if b"\\u0000" in blob:
                left.append(record)
                continue
            yield (blob, fp, sources.get(key)) if sources is not None else (blob, fp)

    _insert_sqlite(conn, head, one, width, rows(), tail=") AS v", lead=(tenant, ts, ts))
    return left


def _flat_batches(rows: Iterable[tuple[Any, ...]], size: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """(row count, the rows' values in one tuple), `size` rows at a time."""
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield size, tuple(v for r in batch for v in r)
            batch = []
    if batch:
        yield len(batch), tuple(v for r in batch for v in r)


def _update_rows(
    conn: Connection, table: sa.Table, tenant: str, names: Sequence[str], rows: Sequence[Mapping[str, Any]],
    now: datetime | None,
) -> None:  # fmt: skip
    """Rewrite the `names` columns of the tenant's rows, by idp_id, and updated_at unless `now` is
    None (a digest is a cache, not a change). On SQLite, one `UPDATE … FROM (VALUES …)` per
    SQLITE_KEYED_ROWS rows with the values as the columns' own types would bind them (one step
    each, see `_insert_sqlite`); elsewhere (and before SQLite 3.33), executemany."""
    stamp = [] if now is None else ["updated_at"]
    if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 33):
        dialect, prep = conn.dialect, conn.dialect.identifier_preparer
        procs = [table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]
        name = prep.format_table(table)
        sets = ", ".join([*(f"{prep.quote(n)} = v.column{i + 2}" for i, n in enumerate(names)),
                          *(f"{n} = ?" for n in stamp)])  # fmt: skip
        one = f"({', '.join(['?'] * (len(names) + 1))})"
        raw = conn.connection.driver_connection
        assert raw is not None
        limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - 2  # updated_at and the tenant
        per = max(1, min(SQLITE_KEYED_ROWS, limit // (len(names) + 1)))
        head = [_bound(t.TS, now, conn)] if now is not None else []
        for chunk in _chunks(rows, per):
            values: list[Any] = []
            for r in chunk:
                values.append(r["idp_id"])
                values.extend(p(r[n]) if p else r[n] for n, p in zip(names, procs, strict=True))
            conn.exec_driver_sql(
                f"UPDATE {name} SET {sets} FROM (VALUES {', '.join([one] * len(chunk))}) AS v "
                f"WHERE {name}.tenant = ? AND {name}.idp_id = v.column1",
                (*head, *values, tenant),
            )
        return
    stmt = (
        table.update()
        .where(table.c.tenant == sa.bindparam("_tenant"), table.c.idp_id == sa.bindparam("_id"))
        .values({n: sa.bindparam(n) for n in [*names, *stamp]})
    )
    extra = {"_tenant": tenant} if now is None else {"_tenant": tenant, "updated_at": now}
    for chunk in _chunks(rows, BATCH):
        conn.execute(stmt, [{**{n: r[n] for n in names}, **extra, "_id": r["idp_id"]} for r in chunk])


def _set_by_id(conn: Connection, table: sa.Table, column: str, tenant: str, values: Sequence[tuple[str, Any]]) -> None:
    """`column` = value for each (idp_id, value) of the tenant's rows, updated_at left alone."""
    _update_rows(conn, table, tenant, [column], [{"idp_id": key, column: value} for key, value in values], None)


def _delete_pairs(conn: Connection, tenant: str, pairs: Sequence[tuple[str, str]]) -> None:
    """Delete the tenant's (group, user) memberships. On SQLite, one statement per
    SQLITE_KEYED_ROWS pairs (one step each, see `_insert_sqlite`): the pairs joined to the primary
    key, whose rows go by rowid (a row-value `IN (VALUES …)` used only the key's tenant column:
    10× slower than executemany); elsewhere, executemany."""
    m = t.memberships
    if conn.dialect.name == "sqlite":
        for chunk in _chunks(pairs, SQLITE_KEYED_ROWS):
            conn.exec_driver_sql(
                "DELETE FROM memberships WHERE rowid IN (SELECT m.rowid FROM "
                f"(VALUES {', '.join(['(?, ?)'] * len(chunk))}) AS v JOIN memberships AS m "
                "ON m.tenant = ? AND m.group_idp_id = v.column1 AND m.user_idp_id = v.column2)",
                (*[x for pair in chunk for x in pair], tenant),
            )
        return
    stmt = m.delete().where(
        m.c.tenant == tenant, m.c.group_idp_id == sa.bindparam("_g"), m.c.user_idp_id == sa.bindparam("_u")
    )
    for chunk in _chunks(pairs, BATCH):
        conn.execute(stmt, [{"_g": g, "_u": u} for g, u in chunk])


def _tenant_rows(conn: Connection, table: sa.Table, columns: Sequence[str], tenant: str) -> Iterator[Sequence[Any]]:
    """Every row of `tenant` in `table`: the given plain string columns (the key among them).

    On SQLite the database packs SQLITE_ROWS_PER_READ rows at a time into one JSON array, one step
    of a statement each. Fetched row by row, CPython's sqlite3 lets go of the GIL for every row,
    and next to a busy thread (another tenant's sync in the daemon, the sync's own pull) each row
    waited to get it back (scripts/bench_sqlite_threads.py: 2,000 fingerprints in 2.9 s instead
    of 3 ms)."""
    keys = [c for c in table.primary_key.columns if c.name != "tenant"]
    cols = [table.c[n] for n in columns]
    if conn.dialect.name != "sqlite":
        yield from _driver_rows(conn, sa.select(*cols).where(table.c.tenant == tenant))
        return
    at = [columns.index(k.name) for k in keys]  # the key columns are among those read
    after: tuple[Any, ...] | None = None
    while True:
        page = sa.select(*cols).where(table.c.tenant == tenant)
        if after is not None:
            page = page.where(sa.tuple_(*keys) > sa.tuple_(*after))
        sub = page.order_by(*keys).limit(SQLITE_ROWS_PER_READ).subquery()
        packed = conn.execute(sa.select(sa.func.json_group_array(sa.func.json_array(*sub.c)))).scalar_one()
        rows = loads(packed)
        yield from rows
        if len(rows) < SQLITE_ROWS_PER_READ:
            return
        # The aggregate's order is SQLite's to choose: the next page starts after the largest key.
        after = max(tuple(row[i] for i in at) for row in rows)


def _driver_rows(conn: Connection, q: sa.Select[Any], size: int = 5000) -> Iterator[tuple[Any, ...]]:
    """A SELECT of plain string columns, its rows as the driver's own tuples. For the reads that
    return a whole large tenant (every fingerprint, every membership pair): building SQLAlchemy
    Row objects for them cost more than the database's part (1.4 s of 4.6 s on a 100,000-user
    Workday resync)."""
    compiled = q.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params: Any = compiled.construct_params()
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())
    cursor = conn.connection.cursor()
    try:
        cursor.execute(str(compiled), params)
        while rows := cursor.fetchmany(size):
            yield from rows
    finally:
        cursor.close()


def _as_dict(row: dict[str, Any] | SpooledJson) -> dict[str, Any]:
    return loads(row.read()) if isinstance(row, SpooledJson) else row


# A JSON number in exponent form with a positive exponent, and the strings to step over to find one.
_JSON_STRING_OR_BIG_FLOAT = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?[eE]\+?\d+')
# What could start such a number in compact JSON (a string holding this is stepped over).
_MAYBE_BIG_FLOAT = re.compile(r"[:,\[]-?\d+(?:\.\d+)?[eE]\+?\d")


def _jsonb_text(text: str) -> str:
    """JSON `text` as PostgreSQL's jsonb is to keep it: a float written in exponent form (1e18, every
    float from 1e16 up) with its digits and a fraction. jsonb keeps a number's digits, not its JSON
    type: 1e18 read back as the integer 1000000000000000000, where SQLite gives back the float, so
    `users --json` and event data printed another type on PostgreSQL."""
    if not _MAYBE_BIG_FLOAT.search(text):
        return text

    def spelled_out(m: re.Match[str]) -> str:
        token = m.group()
        if token.startswith('"'):
            return token
        digits = f"{Decimal(token):f}"
        return digits if "." in digits else f"{digits}.0"

    return _JSON_STRING_OR_BIG_FLOAT.sub(spelled_out, text)


def _json_text(value: Any) -> str:
    return value.read().decode() if isinstance(value, SpooledJson) else dumps(value)


def _bound(type_: sa.types.TypeEngine[Any], value: Any, conn: Connection) -> Any:
    """`value` as the column type's bind processing would hand it to the driver."""
    process = type_.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    return process(value) if process else value


def _json_columns(table: sa.Table) -> frozenset[str]:
    return frozenset(c.name for c in table.columns if isinstance(c.type, t.JSONType))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _first_line(exc: BaseException | None) -> str:
    text = str(getattr(exc, "orig", exc) or "").strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def failed_statement(exc: BaseException) -> tuple[str, str] | None:
    """A failed statement as (its database's one-line message, its SQL without the parameters), or
    None for any other error. The rest of the database's message may quote the row it refused."""
    if not isinstance(exc, sa.exc.StatementError):
        return None
    return f"{type(exc).__name__}: {_first_line(exc)}", str(exc.statement or "")


def _one_line_errors(engine: Engine, safe_url: str, *, lock_wait: float | None = None) -> None:
    """Connection and database failures become one StoreUnavailable line naming the store (host and
    port, password hidden), instead of a driver traceback with the SQL and its parameters.
    `lock_wait`: a write's wait for another session's lock, named when it ran out."""

    @sa.event.listens_for(engine, "handle_error")
    def _handle(ctx: sa.engine.ExceptionContext) -> BaseException | None:
        if ctx.is_pre_ping:  # the pool reconnects by itself
            return None
        # A role without a grant (a read-only role for `dirpull events`, say) is the operator's to
        # fix, as an unreachable server: one line, not a traceback with the SQL.
        refused = getattr(ctx.original_exception, "sqlstate", None) == "42501"  # insufficient_privilege
        # SQLite's plain DatabaseError (not a subclass such as IntegrityError) is the file itself:
        # "file is not a database" (the store url naming some other file), "database disk image is
        # malformed". It was a traceback from every command, the pragma it failed on and all.
        unusable_file = type(ctx.original_exception) is sqlite3.DatabaseError
        if not (refused or unusable_file) and not isinstance(
            ctx.sqlalchemy_exception, (sa.exc.OperationalError, sa.exc.InterfaceError)
        ):
            return None  # integrity errors and the like are handled by the caller
        if ctx.connection is None:
            what = "cannot connect"
        elif ctx.is_disconnect:
            what = "lost the connection"
        else:
            what = "database error"
        detail = _first_line(ctx.original_exception)
        if lock_wait is not None and detail == "database is locked":
            # SQLite's words alone do not say that it waited, how long, or for whom.
            detail += (f": another process (a sync, `dirpull db upgrade`, a tool with the file open) held"
                       f" the store's write lock for over {lock_wait:g}s, 3 × [store] connect_timeout")  # fmt: skip
        if lock_wait is not None and getattr(ctx.original_exception, "sqlstate", None) == "55P03":
            # PostgreSQL's "canceling statement due to lock timeout" does not say for what.
            detail += (f": another session (a worker's commit, a transaction left open in psql, a migration)"
                       f" held a lock this write needed for over {lock_wait:g}s,"
                       f" 3 × [store] connect_timeout")  # fmt: skip
        if lock_wait is not None and detail.startswith("attempt to write a readonly database"):
            detail += _unwritable(engine.url.database)
        return StoreUnavailable(
            f"store {safe_url}: {what} ({detail})",
            lost_connection=ctx.connection is not None and ctx.is_disconnect,
        )


def _unwritable(database: str | None) -> str:
    """What this user cannot write of a SQLite store, for SQLite's "attempt to write a readonly
    database". It says that also when the file is writable and its folder is not (a store file
    handed to the service's user in a folder still owned by root): SQLite could not make the -wal
    and -shm files it needs beside the file even to read, and the operator looked at the file."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return ""
    path = os.path.abspath(database)
    folder = os.path.dirname(path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f": this user cannot write {path}"
    for extra in (f"{path}-wal", f"{path}-shm"):
        if os.path.exists(extra) and not os.access(extra, os.W_OK):
            return f": this user cannot write {extra}"
    if not os.access(folder, os.W_OK):
        return f": this user cannot write its folder {folder}, where SQLite makes the store's -wal and -shm files"
    return ""


_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:?//")
# No \b before it: libpq's `sslpassword=` (the client key's passphrase) is a password too, and
# was shown in every store error.
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&#\s]*")


def mask_password(url: str) -> str:
    """`url` with any password replaced by ***, even when it is too broken to parse: whatever looks
    like `user:password@` (also with the `:` or the `//` after the scheme missing), and a
    `password=` query parameter. When unsure it hides more, never less."""
    at = url.rfind("@")  # a raw password may contain "@" or "//": the host follows the last "@"
    if at >= 0:
        authority = _AUTHORITY.match(url)
        if authority:  # scheme://user:password@ → keep the user
            start = authority.end()
            user, colon, _ = url[start:at].partition(":")
            if colon:
                url = f"{url[:start]}{user}:***{url[at:]}"
        elif ":" in url[:at]:  # no // to go by: hide everything from the first ":"
            url = f"{url[: url.index(':')]}:***{url[at:]}"
    return _PASSWORD_PARAM.sub(r"\1***", url)


def parse_store_url(url: str) -> sa.URL:
    """The parsed store URL; StoreError (naming the URL without its password) if dirpull cannot use it."""
    example = "e.g. sqlite:///dirpull.db or postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE"
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError(f"store url: {mask_password(url)!r} is not a database URL ({example})") from None
    except ValueError:  # the one int() in make_url: the port
        raise StoreError(f"store url: {mask_password(url)!r}: the port is not a number") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"store url: unsupported database {backend!r} (use sqlite or postgresql+psycopg)")
    driver, wanted = parsed.get_driver_name(), {"sqlite": "pysqlite", "postgresql": "psycopg"}[backend]
    if driver != wanted:
        # `postgresql+psycopg2://` (and plain `postgresql://` on SQLAlchemy 2.0, whose default that
        # is) named a driver dirpull does not install: a ModuleNotFoundError traceback from every
        # command. Refused at load, naming the one to write.
        scheme = "postgresql+psycopg://…" if backend == "postgresql" else "sqlite:///…"
        raise StoreError(
            f"store url: unsupported driver {driver!r} for {backend} (dirpull uses {wanted}: write {scheme})"
        )
    if backend == "sqlite" and (parsed.host or parsed.port or parsed.username or parsed.password):
        # `sqlite://dirpull.db` (two slashes) names a host, not a file: SQLAlchemy refused it only
        # when the store was opened, with a traceback from every command.
        raise StoreError(
            f"store url: {mask_password(url)!r}: a SQLite URL has no host; the path follows three slashes "
            "(sqlite:///dirpull.db, relative to the current folder, or sqlite:////var/lib/dirpull/dirpull.db)"
        )
    if parsed.host and "@" in parsed.host:
        # A raw "@" in the password ends it early: the rest would be taken for the host and shown,
        # with the driver's "cannot resolve host", in every store error.
        raise StoreError(
            f"store url: {mask_password(url)!r}: an '@' in the password or user name must be written %40"
        )
    try:
        # What the driver is given: a query parameter it cannot take (`?port=x`, more ports than
        # hosts, SQLite's `?timeout=abc`) was a traceback from every command, not a config mistake.
        parsed.get_dialect()().create_connect_args(parsed)
    except (sa.exc.ArgumentError, ValueError, TypeError) as exc:
        raise StoreError(f"store url: {mask_password(url)!r}: {mask_password(str(exc))}") from None
    return parsed


def missing_sqlite_file(url: str) -> str | None:
    """The absolute path of a SQLite store's file when it does not exist yet, else None."""
    try:
        parsed = parse_store_url(url)
    except StoreError:
        return None  # the store's own opening says what is wrong with it
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    path = os.path.abspath(database)
    # A folder that is not there either (a relative `sqlite:///data/dirpull.db` from the wrong
    # folder) is no store too, not the driver's "unable to open database file".
    return None if os.path.exists(path) else path


def _refuse_missing_folder(url: str, database: str | None) -> None:
    """A new SQLite store's folder must exist: SQLite creates the file, not the folders, and said
    only "cannot connect (unable to open database file)", which reads like a permissions or
    locking problem."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = os.path.dirname(os.path.abspath(database))
    if os.path.isdir(folder):
        return
    where = "" if os.path.isabs(database) else f", taken from the current folder, {os.getcwd()}"
    raise StoreUnavailable(
        f"store {mask_password(url)}: cannot create {os.path.abspath(database)}: its folder {folder} does not "
        f"exist (create it, or fix the store url{where})"
    )


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _sqlite_file(url: str) -> tuple[str, tuple[int, int]] | None:
    """A SQLite store's file (absolute: the process may change folder) and its identity as opened."""
    parsed = parse_store_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = os.path.abspath(database)
    try:
        return path, _identity(path)
    except OSError:  # not made (a folder it cannot be made in): opening it says why
        return None


def _create_private(database: str | None) -> None:
    """Create a new SQLite store's file readable by its owner only. It holds a whole company's
    people (names, emails, managers, titles); made by SQLite, it got the umask's 0644, readable by
    every local account. SQLite gives its -wal and -shm files the database file's mode. An
    existing file keeps the mode its owner gave it."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:  # it exists, or cannot be made: SQLite opens it or says why it cannot
        pass


def _wal_is_ours_to_set(cur: sqlite3.Cursor) -> bool:
    """Whether a SQLite file is to be switched to WAL: not already, and new (no tables) or
    dirpull's. The journal mode is written in the file's header and stays: a store url naming
    another application's database switched it for good, even from a command that only reads and
    then refused it for having no dirpull schema."""
    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return False
    tables = {name for (name,) in cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return not tables or "alembic_version" in tables


def _pool_class(parsed: sa.URL, *, hint: str | None) -> type[sa.pool.QueuePool]:
    """A QueuePool whose timeout is one StoreUnavailable line naming the store. SQLAlchemy's own
    TimeoutError is none of the errors a run reports as a store's: every syncing thread busy (more
    syncs at once than the pool holds connections for) failed runs as an "unexpected error" with a
    traceback, its message pointing at sqlalche.me instead of the setting to change."""
    name = mask_password(parsed.render_as_string(hide_password=True))  # as `Store.safe_url`

    class _Pool(sa.pool.QueuePool):
        # SQLAlchemy names a pool's logger after its class: under "dirpull." its INFO lines ("Pool
        # disposed", "Pool recreating") would reach dirpull's log. They stay SQLAlchemy's (warnings only).
        _sqla_logger_namespace = "sqlalchemy.pool.impl.QueuePool"

        def connect(self) -> Any:
            try:
                return super().connect()
            except sa.exc.TimeoutError:
                limit = self.size() + max(0, self._max_overflow)
                advice = f"; raise {hint}" if hint else ""
                raise StoreUnavailable(
                    f"store {name}: no free connection after {self.timeout():g}s "
                    f"(all {limit} of this process's connections are in use{advice})"
                ) from None

    return _Pool


def _make_engine(url: str, *, pool_size: int, connect_timeout: float, migrating: bool = False) -> Engine:
    parsed = parse_store_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        from sqlalchemy import event

        _refuse_missing_folder(url, parsed.database)
        _create_private(parsed.database)
        busy = connect_timeout * 3
        connect_args: dict[str, Any] = {"timeout": busy}
        if migrating:
            # pysqlite runs DDL outside any transaction; with its own transaction handling off and
            # BEGIN IMMEDIATE, a migration is atomic and takes the write lock first, so a second
            # process waits and then sees it done.
            connect_args["isolation_level"] = None
        pooled: dict[str, Any] = {}
        if issubclass(parsed.get_dialect().get_pool_class(parsed), sa.pool.QueuePool):  # a file, not :memory:
            # SQLAlchemy's own pool for a file (5 connections kept, 10 more at peak). It waits for
            # a free one as long as a statement waits for the write lock: the connections in use
            # may be waiting that long themselves.
            pooled = {"poolclass": _pool_class(parsed, hint=None), "pool_timeout": busy}
        # hide_parameters: as for PostgreSQL below.
        engine = sa.create_engine(url, connect_args=connect_args, json_serializer=dumps, json_deserializer=loads,
                                  hide_parameters=True, **pooled)  # fmt: skip
        if migrating:
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers (CLI queries) run while a sync writes; a busy timeout makes
            # concurrent writers queue instead of failing.
            cur.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
            # Switching a new file to WAL needs an exclusive lock and does not wait for it: retry
            # while another process is creating the store at the same moment.
            deadline = time.monotonic() + busy
            while _wal_is_ours_to_set(cur):
                try:
                    cur.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
            # FULL: a commit is on disk when it returns. With NORMAL a power loss can take back
            # the last runs after a consumer has read their events, and the seqs would then be
            # handed out again to the re-derived events, which that consumer skips. It costs an
            # fsync per commit (~0.2 ms here), nothing per row.
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return engine
    if backend == "postgresql":
        # A worker whose machine vanishes mid-transaction would hold its lease row and the event
        # lock until the server notices: TCP keepalives find a dead peer in about a minute, and
        # a session idle inside a transaction for two minutes is ended by the server.
        options = " ".join(
            [
                str(parsed.query.get("options", "")),
                "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3",
                "-c idle_in_transaction_session_timeout=120000",
            ]
        ).strip()
        connect_args: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout)), "options": options}
        if "application_name" not in parsed.query:
            connect_args["application_name"] = "dirpull"
        return sa.create_engine(
            url,
            poolclass=_pool_class(parsed, hint="[store] pool_size"),
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_timeout=connect_timeout,
            connect_args=connect_args,
            json_serializer=lambda value: _jsonb_text(dumps(value)),
            json_deserializer=loads,
            # A failed statement's parameters are the tenant's people (names, emails, attributes):
            # never in an error, a run record or a log line.
            hide_parameters=True,
        )
    raise StoreError(f"store url: unsupported database {backend!r} (use sqlite or postgresql+psycopg)")
