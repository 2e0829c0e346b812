#!/usr/bin/env python3
"""What SQLite's page cache does to a first sync's biggest write (why `Store.apply` raises it).

Inserts N membership rows (in the (group, user) order a sync writes them, so the user index fills
in random order) and as many membership events into a fresh WAL-mode file with the store's schema
settings, once per cache size, and prints the seconds each part took:

    .venv/bin/python scripts/bench_sqlite_cache.py --pairs 886000 --cache-kib 0 32768 65536

`--cache-kib 0` is SQLite's default (2 MB). No network; a temporary file, removed afterwards.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

SCHEMA = (
    "CREATE TABLE memberships (tenant TEXT, group_idp_id TEXT, user_idp_id TEXT, created_at TEXT, "
    "PRIMARY KEY (tenant, group_idp_id, user_idp_id))",
    "CREATE INDEX ix_memberships_tenant_user ON memberships (tenant, user_idp_id)",
    "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, run_id INT, type TEXT, "
    "object_id TEXT, data TEXT, previous_attributes TEXT, created_at TEXT)",
    "CREATE INDEX ix_events_tenant_seq ON events (tenant, seq)",
)
BULK = 2000
TS = "2026-11-29 04:00:00.000000"


def run(path: Path, cache_kib: int, pairs: list[tuple[str, str]]) -> dict[str, float]:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if cache_kib:
            conn.execute(f"PRAGMA cache_size=-{cache_kib}")
        for ddl in SCHEMA:
            conn.execute(ddl)
        conn.commit()
        started = time.perf_counter()
        conn.execute("BEGIN")
        for i in range(0, len(pairs), BULK):
            conn.executemany(
                "INSERT INTO memberships VALUES (?, ?, ?, ?)", [("t", g, u, TS) for g, u in pairs[i : i + BULK]]
            )
        rows_done = time.perf_counter()
        for i in range(0, len(pairs), BULK):
            conn.executemany(
                "INSERT INTO events (tenant, run_id, type, object_id, data, previous_attributes, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [("t", 1, "group.user_added", g, f'{{"group":"{g}","user":"{u}"}}', None, TS)
                 for g, u in pairs[i : i + BULK]],
            )  # fmt: skip
        events_done = time.perf_counter()
        conn.commit()
        committed = time.perf_counter()
    finally:
        conn.close()
    return {
        "memberships_s": rows_done - started,
        "events_s": events_done - rows_done,
        "commit_s": committed - events_done,
        "total_s": committed - started,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=886_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=2_000)
    ap.add_argument("--cache-kib", type=int, nargs="+", default=[0, 32 * 1024])
    args = ap.parse_args()
    rng = random.Random(1)
    groups = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(args.groups)]
    users = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(args.users)]
    wanted = min(args.pairs, args.users * args.groups)
    chosen: set[tuple[str, str]] = set()
    while len(chosen) < wanted:
        chosen.add((rng.choice(groups), rng.choice(users)))
    pairs = sorted(chosen)
    with tempfile.TemporaryDirectory(prefix="dirpull-sqlite-cache-") as tmp:
        for i, kib in enumerate(args.cache_kib):
            took = run(Path(tmp) / f"cache-{i}.db", kib, pairs)
            label = f"{kib} KiB" if kib else "default (2 MB)"
            print(f"cache {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in took.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
