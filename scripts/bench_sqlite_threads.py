#!/usr/bin/env python3
"""Why the store writes SQLite rows with multi-row INSERTs (`store._insert_sqlite`).

CPython's sqlite3 lets go of the GIL around every step of a statement; executemany steps once per
row. Alone that costs nothing, but while any other thread of the process is busy (the daemon syncs
several tenants at once; the store builds its next rows in a helper thread) each row waits to get
the GIL back. This inserts user rows into a fresh store of the real schema four ways — driver
executemany and the store's own insert, each alone and beside a thread that only computes — and
prints rows per second; then deletes memberships and rewrites users beside a busy thread both
ways, and reads a tenant's fingerprints (packed by SQLite) alone and beside a busy thread:

    .venv/bin/python scripts/bench_sqlite_threads.py --rows 100000 --convoy-rows 2000

executemany beside a busy thread is so slow that it gets only --convoy-rows rows (its deletes and
updates too). No network; a temporary file, removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dirpull.jsoncodec import dumps, loads  # noqa: E402
from dirpull.model import USER_FIELDS  # noqa: E402
from dirpull.storage import schema as t  # noqa: E402
from dirpull.storage.store import (  # noqa: E402
    Store,
    _bound,
    _delete_pairs,
    _insert_many,
    _json_columns,
    _update_rows,
)

JSON_FIELDS = _json_columns(t.users)
NAMES = ["tenant", *USER_FIELDS, "fingerprint", "source_digest", "created_at", "updated_at"]


def user_rows(count: int, ts: Any, prefix: str, tenant: str = "bench") -> list[tuple[Any, ...]]:
    rows = []
    for i in range(count):
        values: dict[str, Any] = {
            "idp_id": f"{prefix}{i:08d}", "username": f"user{i}@example.test", "email": f"user{i}@example.test",
            "emails": [f"user{i}@example.test"], "first_name": "Ada", "last_name": f"Person {i}",
            "display_name": f"Ada Person {i}", "state": "active", "job_title": "Engineer", "department": "R&D",
            "employee_number": f"E{i:06d}", "manager_idp_id": f"{prefix}{i // 7:08d}", "custom_attributes": {},
            "raw_attributes": {"id": str(i), "status": "Active", "division": "Go To Market"},
        }  # fmt: skip
        fields = [dumps(values[n]) if n in JSON_FIELDS else values[n] for n in USER_FIELDS]
        rows.append((tenant, *fields, f"{i:032x}", None, ts, ts))
    return rows


class Busy:
    """A thread that only computes, as another tenant's normalization would."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1

    def __enter__(self) -> Busy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def timed(store: Store, write: Callable[[Any, list[tuple[Any, ...]]], None], rows: list[tuple[Any, ...]],
          busy: bool) -> float:  # fmt: skip
    with store.engine.begin() as conn:
        started = time.perf_counter()
        if busy:
            with Busy():
                write(conn, rows)
        else:
            write(conn, rows)
        return time.perf_counter() - started


def executemany(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    sql = f"INSERT INTO users ({', '.join(NAMES)}) VALUES ({', '.join('?' * len(NAMES))})"
    raw = conn.connection.driver_connection
    for i in range(0, len(rows), 2000):
        raw.executemany(sql, rows[i : i + 2000])


def delete_executemany(conn: Any, tenant: str, pairs: list[tuple[str, str]]) -> None:
    raw = conn.connection.driver_connection
    sql = "DELETE FROM memberships WHERE tenant = ? AND group_idp_id = ? AND user_idp_id = ?"
    for i in range(0, len(pairs), 500):
        raw.executemany(sql, [(tenant, g, u) for g, u in pairs[i : i + 500]])


UPDATED = [n for n in USER_FIELDS if n != "idp_id"]


def update_executemany(conn: Any, rows: list[dict[str, Any]], ts: Any) -> None:
    raw = conn.connection.driver_connection
    sql = f"UPDATE users SET {', '.join(f'{n} = ?' for n in UPDATED)}, updated_at = ? WHERE tenant = ? AND idp_id = ?"
    for i in range(0, len(rows), 500):
        raw.executemany(sql, [(*[r[n] for n in UPDATED], ts, r["tenant"], r["idp_id"]) for r in rows[i : i + 500]])


def update_store(conn: Any, rows: list[dict[str, Any]], ts: Any) -> None:
    # The store binds values as the columns' types do: JSON columns as the objects, not their text.
    objects = [{**r, **{n: loads(r[n]) for n in JSON_FIELDS}} for r in rows]
    _update_rows(conn, t.users, "bench", UPDATED, objects, datetime.now(UTC))


def store_insert(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    _insert_many(conn, t.users, NAMES, rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--convoy-rows", type=int, default=2_000, help="rows for executemany beside a busy thread")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dirpull-sqlite-threads-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        try:
            store.upgrade()
            with store.engine.connect() as conn:
                ts = _bound(t.TS, datetime.now(UTC), conn)
            cases = [
                ("executemany alone", executemany, args.rows, False),
                ("executemany beside a busy thread", executemany, args.convoy_rows, True),
                ("store insert alone", store_insert, args.rows, False),
                ("store insert beside a busy thread", store_insert, args.rows, True),
            ]
            for i, (label, write, count, busy) in enumerate(cases):
                took = timed(store, write, user_rows(count, ts, f"c{i}-"), busy)
                print(f"{label}: {count} rows in {took:.2f} s ({count / took:,.0f} rows/s)", flush=True)
            # Deleting memberships: executemany, and the store's join to the primary key.
            m_names = ["tenant", "group_idp_id", "user_idp_id", "created_at"]
            for label, count, delete in (
                ("membership delete executemany beside a busy thread", args.convoy_rows, delete_executemany),
                ("store membership delete beside a busy thread", args.rows, _delete_pairs),
            ):  # fmt: skip
                pairs = [(f"g{i % 97}", f"{label[:5]}{i:08d}") for i in range(count)]
                with store.engine.begin() as conn:
                    _insert_many(conn, t.memberships, m_names, (("bench", g, u, ts) for g, u in pairs))
                with store.engine.begin() as conn:
                    started = time.perf_counter()
                    with Busy():
                        delete(conn, "bench", pairs)
                    took = time.perf_counter() - started
                print(f"{label}: {count} rows in {took:.2f} s ({count / took:,.0f} rows/s)", flush=True)
            # Rewriting changed users: executemany, and the store's UPDATE … FROM (VALUES …).
            changed = [dict(zip(NAMES, row, strict=True)) for row in user_rows(args.rows, ts, "c2-")]
            for label, count, update in (
                ("row update executemany beside a busy thread", args.convoy_rows, update_executemany),
                ("store row update beside a busy thread", args.rows, update_store),
            ):  # fmt: skip
                with store.engine.begin() as conn:
                    started = time.perf_counter()
                    with Busy():
                        update(conn, [{**r, "job_title": "Manager"} for r in changed[:count]], ts)
                    took = time.perf_counter() - started
                print(f"{label}: {count} rows in {took:.2f} s ({count / took:,.0f} rows/s)", flush=True)
            # Reads of a whole tenant, packed by SQLite.
            with store.engine.begin() as conn:
                store_insert(conn, user_rows(args.convoy_rows, ts, "r-", tenant="read"))
            for label, busy in (("store read of every fingerprint alone", False),
                                ("store read of every fingerprint beside a busy thread", True)):  # fmt: skip
                started = time.perf_counter()
                with Busy() if busy else contextlib.nullcontext():
                    count = len(store.user_digests("read")[0])
                took = time.perf_counter() - started
                print(f"{label}: {count} rows in {took:.2f} s ({count / took:,.0f} rows/s)", flush=True)
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
