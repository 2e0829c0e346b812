"""The store on SQLite and on PostgreSQL: leases, fencing, event order under concurrent commits,
schema checks and the operator-facing errors."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import PG_ENV, pg_url_or_skip
from harness import closed_port
from typer.testing import CliRunner

from dirpull.cli import app
from dirpull.storage import schema as t
from dirpull.storage import store as store_module
from dirpull.storage.store import LeaseLost, Store, WriteSet

pytestmark = pytest.mark.stores

CURRENT = store_module.HEAD_REVISION
NEXT = f"{int(CURRENT) + 1:04d}"  # the revision a newer dirpull would bring


def writes(tenant: str, n: int, tag: str) -> WriteSet:
    users = [
        {
            "idp_id": f"{tag}-{i}",
            "username": f"{tag}-{i}@example.test",
            "email": None,
            "emails": [],
            "first_name": None,
            "last_name": None,
            "display_name": None,
            "state": "active",
            "job_title": None,
            "department": None,
            "employee_number": None,
            "manager_idp_id": None,
            "custom_attributes": {},
            "raw_attributes": {"n": i},
            "fingerprint": "x",
        }
        for i in range(n)
    ]
    events = [{"type": "user.created", "object_id": u["idp_id"], "data": {"idp_id": u["idp_id"]}} for u in users]
    return WriteSet(users, [], [], [], [], [], [], [], events)


def commit_run(store: Store, tenant: str, holder: str, n: int, tag: str) -> int:
    run_id = store.start_run(tenant, trigger="test", mode="full", worker=holder)
    return store.apply(
        tenant,
        run_id,
        writes(tenant, n, tag),
        holder=holder,
        cursor={"tag": tag},
        full=True,
        run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0},
    )


@pytest.fixture
def store(store_url: str):
    s = Store(store_url)
    s.ensure_schema()
    s.ensure_tenant("t", "bamboohr")
    yield s
    s.close()


# --- leases ----------------------------------------------------------------------------------------


def test_lease_is_exclusive_renewable_and_expires(store):
    ttl = timedelta(seconds=30)
    assert store.acquire_lease("t", "a", ttl) is None
    taken = store.acquire_lease("t", "b", ttl)
    assert taken is not None and taken.holder == "a"
    assert store.lease("t").holder == "a"
    assert store.renew_lease("t", "a", ttl) and not store.renew_lease("t", "b", ttl)
    store.release_lease("t", "a")
    assert store.lease("t").holder is None
    b_from, b_ttl = datetime.now(UTC), timedelta(seconds=0.3)
    assert store.acquire_lease("t", "b", b_ttl) is None
    # b died without releasing: a takes its lease once it runs out, not before. Told by the time a
    # took it, not by a's first try: a loaded machine can stall past so short a lease in between.
    deadline = time.monotonic() + 30
    while (held := store.acquire_lease("t", "a", ttl)) is not None:
        assert held.holder == "b" and time.monotonic() < deadline, held
        time.sleep(0.05)
    taken_at = store.lease("t").expires_at - ttl
    assert taken_at >= b_from + b_ttl, f"a took b's lease at {taken_at}, before it ran out"
    assert not store.renew_lease("t", "b", ttl)  # b cannot come back


@pytest.mark.postgres  # SQLite's write lock, taken by the UPDATE, keeps the release out until the read
def test_a_lease_released_while_another_worker_asks_for_it_is_taken_not_said_held_by_none(store_url: str, store):
    """A worker asks for the lease while its holder releases it, the release committed between the
    conditional UPDATE (held: nothing taken) and the read of the holder. On PostgreSQL the read saw
    the free lease, so the run was skipped as "tenant t is being synced by None (lease until ?)"."""
    assert store.acquire_lease("t", "a", timedelta(seconds=30)) is None
    asking = Store(store_url)
    released: list[bool] = []

    @sa.event.listens_for(asking.engine, "before_cursor_execute")
    def release_first(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "leases" in statement and not released:
            released.append(True)
            store.release_lease("t", "a")  # a's run ends, in its own transaction

    try:
        taken = asking.acquire_lease("t", "b", timedelta(seconds=30))
        assert released  # the release did come in between
        assert taken is None, f"not taken: held by {taken.holder} until {taken.expires_at}"
        assert store.lease("t").holder == "b"
    finally:
        asking.close()


def test_racing_workers_never_both_take_an_expired_lease(store_url: str, store):
    stores = [Store(store_url) for _ in range(4)]
    try:
        for round_ in range(8):
            store.acquire_lease("t", f"old{round_}", timedelta(seconds=-1))  # expired or created
            start = threading.Barrier(len(stores))
            won: list[str] = []

            def take(i: int, s: Store, start: threading.Barrier, won: list[str]) -> None:
                start.wait()
                if s.acquire_lease("t", f"w{i}", timedelta(seconds=30)) is None:
                    won.append(f"w{i}")

            threads = [threading.Thread(target=take, args=(i, s, start, won)) for i, s in enumerate(stores)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            assert len(won) == 1, won
            assert store.lease("t").holder == won[0]
            store.release_lease("t", won[0])
    finally:
        for s in stores:
            s.close()


def test_a_worker_that_lost_its_lease_cannot_commit(store):
    assert store.acquire_lease("t", "a", timedelta(seconds=0.2)) is None
    run_id = store.start_run("t", trigger="test", mode="full", worker="a")
    time.sleep(0.3)
    assert store.acquire_lease("t", "b", timedelta(seconds=30)) is None  # b takes over
    with pytest.raises(LeaseLost):
        store.apply(
            "t",
            run_id,
            writes("t", 3, "a"),
            holder="a",
            cursor=None,
            full=True,
            run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0},
        )
    assert list(store.iter_users("t")) == [] and store.last_seq() == 0
    assert store.get_cursor("t").value is None


def test_a_large_run_is_written_with_a_large_sqlite_cache_given_back_after(store, monkeypatch):
    if store.dialect != "sqlite":
        pytest.skip("a SQLite page-cache setting")
    monkeypatch.setattr(store_module, "BIG_WRITE_ROWS", 10)
    seen: list[int] = []
    real = Store._write_rows

    def spying(self: Store, conn: Any, *args: Any) -> None:
        seen.append(conn.connection.driver_connection.execute("PRAGMA cache_size").fetchone()[0])
        real(self, conn, *args)

    monkeypatch.setattr(Store, "_write_rows", spying)
    assert store.acquire_lease("t", "a", timedelta(seconds=30)) is None
    commit_run(store, "t", "a", 3, "small")  # 6 rows and events: the default cache
    commit_run(store, "t", "a", 20, "large")
    assert seen == [-2000, -store_module.WRITE_CACHE_KIB]
    with store.engine.connect() as conn:  # the connection the runs used, back to the default
        assert conn.connection.driver_connection.execute("PRAGMA cache_size").fetchone()[0] == -2000
    assert len(list(store.iter_users("t"))) == 23


ODD_IDS = ["plain", "O'Brien", 'quo"te', "back\\slash", "tab\there", "new\nline", "zürich", "東京", "😀", "a,b", "[1]"]


def test_finding_a_user_or_group_by_what_an_operator_typed(store):
    """`dirpull users --group X` / `groups --user X`: X as an idp_id exactly; else, ignoring case,
    the idp_id, a group's name or email, a user's username or email; of this tenant only, and
    never as a pattern."""
    ws = writes("t", 3, "u")
    ws.user_creates[0].update(username="Ann", email="ann@example.test")
    ws.user_creates[1].update(username="bob", email="ANN@example.test")
    groups = [("g%1", "Sales", "sales@example.test"), ("g_2", "Ops", None), ("G3", "ops", None)]
    ws.group_creates = [
        {"idp_id": i, "name": n, "description": None, "email": e, "raw_attributes": {}, "fingerprint": "f"}
        for i, n, e in groups
    ]
    store.ensure_tenant("other", "okta")
    for tenant, w in (("t", ws), ("other", writes("other", 1, "o"))):
        assert store.acquire_lease(tenant, "a", timedelta(seconds=30)) is None
        run_id = store.start_run(tenant, trigger="test", mode="full", worker="a")
        store.apply(tenant, run_id, w, holder="a", cursor=None, full=True,
                    run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip

    def ids(found: list[dict[str, Any]]) -> list[str]:
        return [f["idp_id"] for f in found]

    assert store.find_group("t", "g%1") == [{"idp_id": "g%1", "name": "Sales", "email": "sales@example.test"}]
    assert ids(store.find_group("t", "G3")) == ["G3"]
    assert ids(store.find_group("t", "SALES@example.test")) == ids(store.find_group("t", "sales")) == ["g%1"]
    assert ids(store.find_group("t", "g3")) == ["G3"]  # the idp_id in another case
    assert ids(store.find_group("t", "OPS")) == ["G3", "g_2"]  # two: no guess to make
    assert store.find_group("t", "g%") == store.find_group("t", "g_1") == store.find_group("t", "") == []
    assert store.find_group("other", "g%1") == []
    assert store.find_user("t", "u-2") == [
        {"idp_id": "u-2", "username": "u-2@example.test", "email": None, "display_name": None}
    ]
    assert ids(store.find_user("t", "bob")) == ["u-1"]
    assert ids(store.find_user("t", "ann@example.test")) == ["u-0", "u-1"]
    assert store.find_user("t", "o-0") == [] and ids(store.find_user("other", "O-0")) == ["o-0"]


def test_whole_tenant_reads_and_large_inserts_keep_every_row_exactly(store, monkeypatch):
    """Multi-row INSERTs split across statements and the whole-tenant reads (packed a page at a
    time on SQLite) give back exactly what was written: odd ids, NULL digests, composite keys."""
    monkeypatch.setattr(store_module, "SQLITE_ROWS_PER_INSERT", 4)  # 4 rows per statement, and a partial one
    monkeypatch.setattr(store_module, "SQLITE_ROWS_PER_READ", 3)  # pages end inside a group's pairs
    ws = writes("t", 0, "x")
    ws.user_creates = [{**writes("t", 1, "x").user_creates[0], "idp_id": i, "fingerprint": f"fp-{i}"} for i in ODD_IDS]
    ws.user_sources = {i: f"src-{i}" for i in ODD_IDS[::2]}
    groups = ["g1", "g'2", "g 3"]
    ws.group_creates = [{"idp_id": g, "name": g, "description": None, "email": None, "raw_attributes": {},
                         "fingerprint": f"gfp-{g}"} for g in groups]  # fmt: skip
    pairs = sorted((g, u) for g in groups for u in ODD_IDS[: 3 + len(g)])
    ws.member_adds = pairs
    assert store.acquire_lease("t", "a", timedelta(seconds=30)) is None
    run_id = store.start_run("t", trigger="test", mode="full", worker="a")
    written = store.apply("t", run_id, ws, holder="a", cursor=None, full=True,
                          run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
    assert written == len(pairs)  # a group.user_added event per pair (no user events in this WriteSet)
    fps, sources = store.user_digests("t")
    assert fps == {i: f"fp-{i}" for i in ODD_IDS}
    assert sources == {i: f"src-{i}" for i in ODD_IDS[::2]}
    assert store.user_fingerprints("t") == fps
    assert store.group_digests("t") == ({g: f"gfp-{g}" for g in groups}, {})
    assert store.membership_pairs("t") == set(pairs)
    with store.engine.connect() as conn:  # every row once: no page repeats or skips one
        rows = [tuple(r) for r in store_module._tenant_rows(conn, t.memberships, ["group_idp_id", "user_idp_id"], "t")]
    assert sorted(rows) == pairs
    assert sorted(u["idp_id"] for u in store.iter_users("t")) == sorted(ODD_IDS)

    # A second run: removals, member digests, source refreshes and rewritten rows by id, several
    # statements each.
    monkeypatch.setattr(store_module, "SQLITE_KEYED_ROWS", 2)
    before = {u["idp_id"]: u for u in store.iter_users("t")}
    gone = pairs[::2]
    ws = writes("t", 0, "y")
    ws.member_removes = gone
    ws.member_digests = {g: f"md-{g}" for g in groups}
    ws.source_refreshes = {i: f"new-{i}" for i in ODD_IDS[1:8]}
    rewritten = ODD_IDS[8:]  # a rewritten row's source digest is the new one, or none
    template = writes("t", 1, "z").user_creates[0]
    ws.user_updates = [
        {**template, "idp_id": i, "username": None, "job_title": f"title {i}", "emails": [i, "b@x"],
         "raw_attributes": {"n": i, "nested": {"k": [1, None]}}, "fingerprint": f"fp2-{i}"}
        for i in rewritten
    ]  # fmt: skip
    ws.user_sources = {i: f"src2-{i}" for i in rewritten[::2]}
    run_id = store.start_run("t", trigger="test", mode="full", worker="a")
    store.apply("t", run_id, ws, holder="a", cursor=None, full=True,
                run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
    assert store.membership_pairs("t") == set(pairs) - set(gone)
    assert store.group_digests("t")[1] == {g: f"md-{g}" for g in groups}
    fps, sources_now = store.user_digests("t")
    assert fps == {i: f"fp2-{i}" if i in rewritten else f"fp-{i}" for i in ODD_IDS}
    expected = {**sources, **{i: f"new-{i}" for i in ODD_IDS[1:8]}}
    expected = {k: v for k, v in expected.items() if k not in rewritten} | ws.user_sources
    assert sources_now == expected
    after = {u["idp_id"]: u for u in store.iter_users("t")}
    for i in ODD_IDS:
        if i not in rewritten:
            assert after[i] == before[i]
            continue
        assert after[i]["username"] is None and after[i]["job_title"] == f"title {i}"
        assert after[i]["emails"] == [i, "b@x"] and after[i]["raw_attributes"] == {"n": i, "nested": {"k": [1, None]}}
        assert after[i]["updated_at"] > before[i]["updated_at"] and after[i]["created_at"] == before[i]["created_at"]


def test_created_rows_from_spooled_json_are_stored_exactly(store, monkeypatch):
    """Created users and groups as the diff hands them over (their canonical JSON in the spool,
    named by id; SQLite takes the columns out of it) read back exactly as normalized, with odd
    values in every kind of column; a JSON column holds the text `dumps` gives its value."""
    from dirpull.jsoncodec import canonical, dumps, loads
    from dirpull.model import USER_FIELDS
    from dirpull.spool import RecordSpool

    monkeypatch.setattr(store_module, "SQLITE_ROWS_PER_INSERT", 4)
    template = {k: v for k, v in writes("t", 1, "x").user_creates[0].items() if k != "fingerprint"}
    # PostgreSQL's text and jsonb refuse NUL; SQLite keeps it (a NUL-bearing record takes the Python path).
    nul = "\u0000" if store.dialect == "sqlite" else ""
    odd = ['quo"te \\ back', f"tab\t nl\n nul{nul} bell\u0007", "zürich 東京 😀", "", " padded "]
    users = []
    for n, i in enumerate(ODD_IDS):
        users.append({
            **template, "idp_id": i, "username": odd[n % len(odd)], "email": None, "emails": [i, odd[n % 5]],
            "first_name": odd[(n + 1) % 5], "display_name": None, "state": "inactive" if n % 2 else "active",
            "custom_attributes": {"cost center": odd[(n + 2) % 5], "n": n, "f": 1.5 + n, "big": 2**62, "t": True},
            "raw_attributes": {"nested": {"k": [1, None, {"x": odd[n % 5]}]}, "z": None, "": [], "e": {}},
        })  # fmt: skip
    spool = RecordSpool()
    ws = writes("t", 0, "x")
    ws.user_creates = [spool.put(canonical(u), u["idp_id"]) for u in users[:-2]]
    ws.user_creates.append(spool.put(canonical(users[-2])))  # no key: decoded to find it
    ws.user_creates.append({**users[-1], "fingerprint": "own-fp"})  # a dict carrying its fingerprint
    ws.user_fingerprints = {u["idp_id"]: f"fp-{u['idp_id']}" for u in users[:-1]}
    ws.user_sources = {i: f"src-{i}" for i in ODD_IDS[::3]}
    group = {"idp_id": "g'1", "name": odd[0], "description": odd[1], "email": None, "raw_attributes": {"a": odd[2]}}
    ws.group_creates = [spool.put(canonical(group), group["idp_id"])]
    ws.group_fingerprints = {"g'1": "gfp"}
    ws.events = [
        {"type": "user.created", "object_id": u["idp_id"], "data": c}
        for u, c in zip(users, ws.user_creates, strict=True)
    ]
    assert store.acquire_lease("t", "a", timedelta(seconds=30)) is None
    run_id = store.start_run("t", trigger="test", mode="full", worker="a")
    store.apply("t", run_id, ws, holder="a", cursor=None, full=True,
                run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
    stored = {u["idp_id"]: u for u in store.iter_users("t")}
    assert {i: {k: stored[i][k] for k in USER_FIELDS} for i in stored} == {u["idp_id"]: u for u in users}
    assert store.user_digests("t") == ({**ws.user_fingerprints, users[-1]["idp_id"]: "own-fp"}, ws.user_sources)
    assert [{k: g[k] for k in group} for g in store.iter_groups("t")] == [group]
    data = [e["data"] for e in store.iter_events("t")]
    # Each object's data is completed with its row's timestamps.
    assert [(d.pop("created_at"), d.pop("updated_at")) for d in data] == [
        (stored[u["idp_id"]]["created_at"], stored[u["idp_id"]]["updated_at"]) for u in users
    ]
    assert data == [*users[:-1], {**users[-1], "fingerprint": "own-fp"}]
    if store.dialect == "sqlite":
        with store.engine.connect() as conn:
            texts = conn.exec_driver_sql("SELECT idp_id, emails, custom_attributes, raw_attributes FROM users")
            by_id = {r[0]: r[1:] for r in texts}
        # What the store wrote before SQLite took the JSON apart: each column's value as decoded
        # from the record's JSON (keys sorted, for a spooled record), through `dumps`.
        for u in [*map(loads, map(canonical, users[:-1])), users[-1]]:
            assert by_id[u["idp_id"]] == tuple(dumps(u[k]) for k in ("emails", "custom_attributes", "raw_attributes"))
    spool.close()


def test_takeover_marks_the_cut_off_run_failed(store):
    assert store.acquire_lease("t", "a", timedelta(seconds=0.1)) is None
    dead = store.start_run("t", trigger="schedule", mode="full", worker="host:1")
    time.sleep(0.2)
    assert store.acquire_lease("t", "b", timedelta(seconds=30)) is None
    store.start_run("t", trigger="schedule", mode="full", worker="host:2")
    run = {r["id"]: r for r in store.runs("t")}[dead]
    assert run["status"] == "failed" and run["error"].startswith("interrupted")


# --- the event stream ------------------------------------------------------------------------------


def test_concurrent_commits_never_open_a_gap_behind_a_reader(store_url: str, store, monkeypatch):
    """Several workers commit runs for different tenants at once while a consumer polls
    `iter_events(after=last)`. A transaction is slowed down between inserting its events and
    committing, which is exactly when a later-numbered transaction could commit first. The
    consumer must never find, later, a seq lower than one it already passed."""
    original = Store._write_cursor

    def slow_cursor(self, *args, **kwargs):
        time.sleep(random.uniform(0, 0.03))  # after the events are inserted, before the commit
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "_write_cursor", slow_cursor)
    writers, runs_each = 5, 12
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def consume() -> None:
        reader = Store(store_url)
        try:
            last = 0
            while True:
                final = stop.is_set()
                for e in reader.iter_events(None, after=last):
                    seen.append(e["seq"])
                    last = e["seq"]
                if final:
                    return
                time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)
        finally:
            reader.close()

    def work(i: int) -> None:
        s = Store(store_url)
        tenant = f"w{i}"
        try:
            s.ensure_tenant(tenant, "bamboohr")
            for n in range(runs_each):
                assert s.acquire_lease(tenant, tenant, timedelta(seconds=60)) is None
                commit_run(s, tenant, tenant, random.randint(1, 4), f"{tenant}-{n}")
                s.release_lease(tenant, tenant)
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    consumer = threading.Thread(target=consume)
    consumer.start()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    stop.set()
    consumer.join(60)
    assert not errors, errors
    table = [e["seq"] for e in store.iter_events(None)]
    assert len(table) >= writers * runs_each
    assert seen == sorted(set(seen)), "the consumer saw a seq lower than one it had already read"
    assert seen == table, "the consumer missed events that were committed behind its cursor"


_KILLED_MID_COMMIT = """
import sys, time
from datetime import timedelta
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/.."]  # this checkout's tests and dirpull
from test_store import commit_run
from dirpull.storage.store import Store

def stall(self, *args, **kwargs):  # rows and events are written, the cursor and the commit are next
    open(sys.argv[2], "w").close()
    time.sleep(120)

Store._write_cursor = stall
s = Store(sys.argv[1])
assert s.acquire_lease("t", "dying", timedelta(seconds=float(sys.argv[4]))) is None
commit_run(s, "t", "dying", 3000, "lost")
"""


def test_a_worker_killed_in_the_middle_of_its_commit_applied_nothing(store_url: str, store, tmp_path: Path):
    """SIGKILL while the applying transaction has written its rows and events but not committed: the
    store is as before (rows, events, cursor), a consumer never sees those events, and the next
    worker takes over once the lease expires, records the cut-off run as failed and commits after
    the last seq anyone saw."""
    store.acquire_lease("t", "a", timedelta(seconds=30))
    commit_run(store, "t", "a", 2, "before")
    store.release_lease("t", "a")
    seen = [e["seq"] for e in store.iter_events("t")]
    stalled = tmp_path / "stalled"
    script = tmp_path / "dying.py"
    script.write_text(_KILLED_MID_COMMIT)
    # The dying worker's lease must outlast its commit and this test's checks, on a loaded machine too.
    lease_ttl = 5.0
    worker = subprocess.Popen(
        [sys.executable, str(script), store_url, str(stalled), str(Path(__file__).parent), str(lease_ttl)]
    )
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while not stalled.exists():
            assert worker.poll() is None and time.monotonic() < deadline, "the worker never got to its commit"
            time.sleep(0.05)
        assert [e["seq"] for e in store.iter_events("t")] == seen  # uncommitted: not visible meanwhile
    finally:
        worker.kill()
        worker.wait(30)
    assert store.get_cursor("t").value == {"tag": "before"}
    assert sorted(u["idp_id"] for u in store.iter_users("t")) == ["before-0", "before-1"]
    assert [e["seq"] for e in store.iter_events("t")] == seen
    assert store.acquire_lease("t", "b", timedelta(seconds=30)) is not None  # the dead one's, until it expires
    # It was taken after `started`, once the worker's Python was up: expired at the latest soon after.
    time.sleep(max(0.0, started + lease_ttl + 0.2 - time.monotonic()))
    deadline = time.monotonic() + 30
    while (holder := store.acquire_lease("t", "b", timedelta(seconds=30))) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert holder is None
    commit_run(store, "t", "b", 1, "after")
    runs = store.runs("t")
    assert [r["status"] for r in runs] == ["succeeded", "failed", "succeeded"]
    assert runs[1]["worker"] == "dying" and runs[1]["error"].startswith("interrupted")
    assert [e["data"]["idp_id"] for e in store.iter_events("t", after=seen[-1])] == ["after-0"]
    assert store.get_cursor("t").value == {"tag": "after"}


# --- schema and errors -----------------------------------------------------------------------------


def test_workers_starting_together_on_an_empty_store_migrate_once(store_url: str):
    stores = [Store(store_url) for _ in range(3)]
    errors: list[BaseException] = []

    def start(s: Store) -> None:
        try:
            s.ensure_schema()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    try:
        assert not errors, errors
        assert stores[0].schema_state()[0] == stores[0].schema_state()[1]
    finally:
        for s in stores:
            s.close()


def _config(tmp_path: Path, url: str) -> str:
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(
        f'[store]\nurl = "{url}"\nconnect_timeout = 2\n'
        '[tenants.hr]\nprovider = "bamboohr"\ncompany_domain = "acme"\napi_key = "k"\n'
        'api_url = "http://127.0.0.1:9/api/gateway.php"\nenabled = false\n'
    )
    return str(cfg)


def _cli(config: str, *args: str):
    return CliRunner().invoke(app, ["--config", config, *args])


def test_unreachable_store_is_one_line_naming_the_host_without_the_password(store_kind: str, tmp_path: Path):
    with contextlib.ExitStack() as stack:  # the PostgreSQL port held closed until the end
        if store_kind == "postgresql":
            real = sa.engine.make_url(pg_url_or_skip())
            port = stack.enter_context(closed_port())
            url = real.set(port=port).render_as_string(hide_password=False)
            where, secret = f"127.0.0.1:{port}", real.password
        else:
            # A folder where the file should be: SQLite cannot open it. (A missing folder is named as
            # such: test_cli.py::test_a_sqlite_store_whose_folder_is_missing_is_named_not_cannot_connect.)
            (tmp_path / "a-folder").mkdir()
            url = f"sqlite:///{tmp_path / 'a-folder'}"
            where, secret = "a-folder", None
        config = _config(tmp_path, url)
        for args in (["run", "--max-seconds", "1"], ["status"], ["users", "hr"], ["db", "upgrade"], ["db", "check"]):
            r = _cli(config, *args)
            assert r.exit_code == 1, (args, r.output)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1, (args, r.stderr)
            assert where in lines[0] and "cannot connect" in lines[0], lines[0]
            assert "Traceback" not in r.output
            if secret:
                assert secret not in r.output and "***" in lines[0]


@pytest.fixture
def newer_dirpull(tmp_path: Path, monkeypatch):
    """This dirpull ships a migration the store has not had yet."""
    migrations = tmp_path / "migrations"
    shutil.copytree(store_module.MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / f"{NEXT}_test_only.py").write_text(
        '"""test only: a later migration"""\n'
        "from alembic import op\n\n"
        f'revision = "{NEXT}"\ndown_revision = "{CURRENT}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        "def upgrade() -> None:\n"
        '    op.create_index("ix_test_runs_status", "runs", ["status"])\n'
    )
    monkeypatch.setattr(store_module, "MIGRATIONS", migrations)
    monkeypatch.setattr(store_module, "HEAD_REVISION", NEXT)


def test_the_head_revision_in_code_is_the_newest_migration() -> None:
    # A current store is recognized by HEAD_REVISION alone: a migration added without bumping it
    # would never run.
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(store_module.MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == store_module.HEAD_REVISION


def test_schema_behind_daemon_refuses_and_db_upgrade_fixes_it(store_url: str, tmp_path: Path, request):
    old = Store(store_url)
    old.ensure_schema()  # a store made by the previous release
    old.close()
    request.getfixturevalue("newer_dirpull")
    config = _config(tmp_path, store_url)
    r = _cli(config, "run", "--max-seconds", "1")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        f"dirpull: store {Store(store_url).safe_url}: schema is at revision {CURRENT}, this dirpull needs {NEXT}; "
        "run `dirpull db upgrade`"
    ]
    check = _cli(config, "db", "check")  # it gave the two revisions only, not the command to run
    behind = f"schema {CURRENT}, needed {NEXT} (behind: run `dirpull db upgrade`)\n"
    assert (check.exit_code, check.stdout) == (1, behind)
    up = _cli(config, "db", "upgrade")
    assert up.exit_code == 0 and f"schema at {NEXT} (was {CURRENT})" in up.stdout
    assert _cli(config, "db", "check").exit_code == 0
    assert "already current" in _cli(config, "db", "upgrade").stdout
    ran = _cli(config, "run", "--max-seconds", "0.5")
    assert ran.exit_code == 0, ran.output


def test_a_store_migrated_by_a_newer_dirpull_says_to_upgrade_dirpull_not_the_schema(
    store_url: str, tmp_path: Path, monkeypatch, request
):
    # A rolling upgrade: one machine's newer dirpull ran `db upgrade`, an older worker restarts.
    # It used to say "run `dirpull db upgrade`", and that command then died with alembic's traceback.
    old_migrations, old_head = store_module.MIGRATIONS, store_module.HEAD_REVISION
    request.getfixturevalue("newer_dirpull")
    config = _config(tmp_path, store_url)
    assert _cli(config, "db", "upgrade").exit_code == 0
    monkeypatch.setattr(store_module, "MIGRATIONS", old_migrations)
    monkeypatch.setattr(store_module, "HEAD_REVISION", old_head)
    expected = (
        f"dirpull: store {Store(store_url).safe_url}: schema is at revision {NEXT}, newer than this dirpull "
        f"(which needs {CURRENT}): a newer dirpull migrated it; upgrade dirpull here"
    )
    for args in (["run", "--max-seconds", "0.5"], ["status"], ["db", "upgrade"]):
        r = _cli(config, *args)
        assert (r.exit_code, r.stderr.strip().splitlines()) == (1, [expected]), (args, r.output)
    check = _cli(config, "db", "check")
    assert check.exit_code == 1
    assert check.stdout.strip() == f"schema {NEXT}, needed {CURRENT} (newer than this dirpull: upgrade dirpull)"


def test_a_migration_the_database_refuses_is_one_line_and_changes_nothing(store_url: str, tmp_path: Path):
    """A database already holding another application's `users` table (or, on PostgreSQL 15, a role
    that may not create tables in `public`): `dirpull db upgrade` was alembic's traceback with
    the SQL on PostgreSQL. Now one line naming the store and the database's reason, exit 1."""
    engine = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, login TEXT)"))
            conn.execute(sa.text("INSERT INTO users VALUES (1, 'theirs')"))
        config = _config(tmp_path, store_url)
        for args in (["db", "upgrade"], ["db", "upgrade"]):  # failed once, it fails the same way again
            r = _cli(config, *args)
            assert (r.exit_code, r.stdout) == (1, ""), r.output
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in r.output, r.output
            assert lines[0].startswith(f"dirpull: store {Store(store_url).safe_url}: "), lines[0]
            assert '"users" already exists' in lines[0] or "table users already exists" in lines[0], lines[0]
            assert "CREATE TABLE" not in lines[0]
        assert sa.inspect(engine).get_table_names() == ["users"]  # nothing else was made
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id, login FROM users")).all() == [(1, "theirs")]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_role_without_a_grant_is_one_line_naming_the_store(store_url: str, tmp_path: Path):
    """A read-only role for the event consumers, its GRANT on `events` forgotten: `dirpull events`
    was a traceback with the SQL. Now one line naming the store (no password) and the refusal."""
    import uuid

    s = Store(store_url)
    s.ensure_schema()
    s.close()
    role, password = f"dirpull_ro_{uuid.uuid4().hex[:8]}", "ro-secret-pw"
    url = sa.engine.make_url(store_url)
    schema_name = url.query["options"].split("=", 1)[1]  # the test's own schema (search_path)
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{schema_name}" TO {role}'))
        for table in t.metadata.tables:
            if table != "events":
                conn.execute(sa.text(f'GRANT SELECT ON "{schema_name}".{table} TO {role}'))
        conn.execute(sa.text(f'GRANT SELECT ON "{schema_name}".alembic_version TO {role}'))
    try:
        reader = url.set(username=role, password=password).render_as_string(hide_password=False)
        config = _config(tmp_path, reader)
        assert _cli(config, "users", "hr").exit_code == 0  # what it may read, it reads
        # The real command line: the one-line error is printed by `main()`, which CliRunner skips.
        r = subprocess.run(
            [sys.executable, "-m", "dirpull.cli", "--config", config, "events", "hr", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (r.returncode, r.stdout) == (1, ""), r.stderr
        assert r.stderr.splitlines() == [
            f"dirpull: store {Store(reader).safe_url}: database error (permission denied for table events)"
        ], r.stderr
        assert password not in r.stderr
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


def test_upgrading_a_0002_store_keeps_its_rows_and_takes_long_values(store_url: str):
    from alembic import command

    s = Store(store_url)
    try:
        with s.engine.begin() as conn:
            command.upgrade(s._alembic(conn), "0002")
        s.ensure_tenant("t", "bamboohr")
        assert s.acquire_lease("t", "a", timedelta(seconds=30)) is None
        commit_run(s, "t", "a", 2, "old")
        assert s.upgrade() == ("0002", store_module.HEAD_REVISION)
        commit_run(s, "t", "a", 1, "x" * 400)  # ids and usernames over the old 255/512 limits
        assert sorted(u["idp_id"] for u in s.iter_users("t")) == ["old-0", "old-1", "x" * 400 + "-0"]
        assert [e["data"]["idp_id"] for e in s.iter_events("t")][-1] == "x" * 400 + "-0"
    finally:
        s.close()


@pytest.mark.postgres
def test_a_migration_blocked_by_an_open_transaction_gives_up_in_one_line_and_changes_nothing(
    store_url: str, tmp_path: Path, monkeypatch
):
    """`dirpull db upgrade` while an analyst's transaction has read `groups` (or a long `dirpull
    events` is streaming): the ALTER TABLE waited for it with no bound, and every later query on
    the table queued behind it, consumers included. Now it gives up after a bounded wait, exit 1
    with one line saying to retry, the tables it had already altered left as they were."""
    from alembic import command

    monkeypatch.setattr(store_module, "MIGRATION_LOCK_TIMEOUT_S", 1, raising=False)
    s = Store(store_url)
    with s.engine.begin() as conn:
        command.upgrade(s._alembic(conn), "0002")
    s.close()
    reader = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
    conn = reader.connect()
    try:
        conn.execute(sa.text("SELECT count(*) FROM groups"))  # holds its lock until the transaction ends
        release = threading.Timer(8, conn.rollback)  # without a bound, the upgrade waits for this
        release.start()
        began = time.monotonic()
        r = _cli(_config(tmp_path, store_url), "db", "upgrade")
        waited = time.monotonic() - began
        assert (r.exit_code, r.stdout) == (1, ""), r.output
        assert r.stderr.strip().splitlines() == [
            f"dirpull: store {Store(store_url).safe_url}: schema upgrade from 0002 to {CURRENT} gave up after "
            "waiting 1s for a table another session is using (a long query or a transaction left open); "
            "nothing changed; retry when it has finished"
        ], r.output
        assert waited < 6, waited
    finally:
        release.cancel()
        release.join()
        conn.close()
        reader.dispose()
    s = Store(store_url)
    try:
        assert s.schema_state() == ("0002", CURRENT)
        # `users` comes before `groups` in the migration: its change was rolled back too.
        with s.engine.connect() as c:
            length = {col["name"]: getattr(col["type"], "length", None) for col in sa.inspect(c).get_columns("users")}
        assert length["idp_id"] == 255
        assert s.upgrade() == ("0002", CURRENT)  # retried once the reader is gone, it goes through
    finally:
        s.close()


def test_upgrading_a_0001_store_keeps_its_rows_cursor_and_event_sequence(store_url: str, tmp_path: Path):
    """A store made by the first release, with a synced tenant in it, upgraded by `dirpull db upgrade`:
    every row, the cursor and the run history stay; the next run goes on from the cursor and its
    events come after the old ones."""
    from alembic import command

    s = Store(store_url)
    try:
        with s.engine.begin() as conn:
            command.upgrade(s._alembic(conn), "0001")
        then = datetime(2025, 6, 1, 8, 0, 0, 250000, tzinfo=UTC)
        user = {
            "idp_id": "u1", "username": "ada@example.test", "email": "ada@example.test",
            "emails": ["ada@example.test"], "first_name": "Ada", "last_name": "L", "display_name": "Ada L",
            "state": "active", "job_title": "Engineer", "department": "R&D", "employee_number": "7",
            "manager_idp_id": None, "custom_attributes": {"cc": "42"}, "raw_attributes": {"id": "u1"},
        }  # fmt: skip
        group = {"idp_id": "g1", "name": "Eng", "description": None, "email": None, "raw_attributes": {}}
        stamps = {"created_at": then, "updated_at": then}
        run = {
            "tenant": "hr", "trigger": "schedule", "mode": "full", "status": "succeeded", "worker": "old:1",
            "started_at": then, "finished_at": then, "duration_s": 1.0, "requests": 2, "counts": {"events": 3},
            "notes": [], "quarantined": [],
        }  # fmt: skip
        with s.engine.begin() as conn:  # only the columns 0001 has
            conn.execute(t.tenants.insert().values(id="hr", provider="bamboohr", created_at=then))
            conn.execute(t.users.insert().values(tenant="hr", fingerprint="f", **stamps, **user))
            conn.execute(t.groups.insert().values(tenant="hr", fingerprint="f", **stamps, **group))
            pair = {"group_idp_id": "g1", "user_idp_id": "u1"}
            conn.execute(t.memberships.insert().values(tenant="hr", created_at=then, **pair))
            run_id = conn.execute(t.runs.insert().values(**run)).inserted_primary_key[0]
            for kind, key, data in (
                ("user.created", "u1", user),
                ("group.created", "g1", group),
                ("group.user_added", "g1", {"group": "g1", "user": "u1"}),
            ):
                conn.execute(
                    t.events.insert().values(
                        tenant="hr", run_id=run_id, type=kind, object_id=key, data=data, created_at=then
                    )
                )
            conn.execute(t.cursors.insert().values(tenant="hr", value={"since": "2025-06-01"}, last_full_at=then,
                                                   updated_at=then))  # fmt: skip
    finally:
        s.close()

    config = _config(tmp_path, store_url)
    assert _cli(config, "db", "check").exit_code == 1
    up = _cli(config, "db", "upgrade")
    assert up.exit_code == 0 and up.stdout.strip() == f"schema at {CURRENT} (was 0001)", up.output
    assert _cli(config, "db", "check").exit_code == 0

    def out(*args: str) -> list[dict[str, Any]]:
        r = _cli(config, *args, "--json")
        assert r.exit_code == 0, r.output
        return [json.loads(line) for line in r.stdout.splitlines()]

    stamp = "2025-06-01T08:00:00.250000Z"
    assert out("users", "hr") == [{**user, "created_at": stamp, "updated_at": stamp}]
    assert out("groups", "hr", "--user", "u1") == [{**group, "created_at": stamp, "updated_at": stamp}]
    old_events = out("events", "hr")
    assert [(e["seq"], e["type"], e["run_id"], e["previous_attributes"]) for e in old_events] == [
        (1, "user.created", run_id, None), (2, "group.created", run_id, None), (3, "group.user_added", run_id, None)
    ]  # fmt: skip
    assert old_events[0]["data"] == user and old_events[2]["data"] == {"group": "g1", "user": "u1"}
    assert [(r["id"], r["status"], r["counts"], r["started_at"]) for r in out("runs", "hr")] == [
        (run_id, "succeeded", {"events": 3}, stamp)
    ]

    s = Store(store_url)
    try:
        s.ensure_schema(create_if_empty=False)
        assert s.get_cursor("hr") == store_module.CursorState({"since": "2025-06-01"}, then)
        assert s.user_digests("hr") == ({"u1": "f"}, {}) and s.group_digests("hr") == ({"g1": "f"}, {})
        assert s.acquire_lease("hr", "a", timedelta(seconds=30)) is None
        commit_run(s, "hr", "a", 1, "new")
        assert [e["seq"] for e in s.iter_events("hr", after=3)] == [4]
        assert s.membership_pairs("hr") == {("g1", "u1")}
    finally:
        s.close()


@pytest.mark.postgres
def test_a_test_process_migrates_while_another_test_run_on_the_server_holds_the_migration_lock(store_url: str):
    """The store's advisory locks are per database: while PostgreSQL tests had only a schema each
    in the server's one database, a parallel worker (pytest-xdist) or another test run migrating a
    store held up this process's migrations and commits, and showed up in its `pg_locks` counts."""
    other_run = sa.create_engine(os.environ[PG_ENV], poolclass=sa.pool.NullPool)
    s = Store(store_url)
    done = threading.Event()

    def migrate() -> None:
        s.ensure_schema()
        done.set()

    try:
        with other_run.connect() as conn:
            store_module.lock_schema(conn, store_module.MIGRATION_LOCK_KEY)
            migrating = threading.Thread(target=migrate)
            migrating.start()
            try:
                assert done.wait(30), "the migration waited for another test run's lock"
            finally:
                conn.rollback()  # releases the lock: a blocked migration goes on and the thread ends
                migrating.join(60)
        assert s.schema_state()[0] == s.schema_state()[1]
    finally:
        s.close()
        other_run.dispose()


class _PausedAtItsLock:
    """Runs `work` in a thread that stops right after the store has taken an advisory lock, inside
    the store's own transaction, until `release()`: the lock held exactly as the store holds it."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self.locked, self.go, self.done = threading.Event(), threading.Event(), threading.Event()
        self._work = work
        self._thread = threading.Thread(target=self._run)
        sa.event.listen(sa.engine.Engine, "after_cursor_execute", self._after)

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread() is self._thread and "pg_advisory_xact_lock" in statement:
            self.locked.set()
            self.go.wait(60)

    def _run(self) -> None:
        self._work()
        self.done.set()

    def __enter__(self) -> _PausedAtItsLock:
        self._thread.start()
        assert self.locked.wait(30), "the store took no advisory lock"
        return self

    def release(self) -> None:
        self.go.set()
        self._thread.join(60)

    def __exit__(self, *exc: object) -> None:
        self.release()
        sa.event.remove(sa.engine.Engine, "after_cursor_execute", self._after)


def _waits_for_a_lock(work: Callable[[], Any], seconds: float) -> bool:
    """Whether `work` is still running after `seconds` (waiting for a lock); it is left to end."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive()


@pytest.mark.postgres
def test_stores_in_two_schemas_of_one_database_do_not_wait_for_each_others_locks(
    pg_schema_url: Callable[[], str],
) -> None:
    """The store URL can name a schema (`?options=-csearch_path=acme`): two stores in one database
    (one per environment, per team) waited for each other's migrations and event commits, the
    advisory locks being keyed by the database alone. A second process on the same store still
    waits, which keeps its events in order."""
    acme, other = pg_schema_url(), pg_schema_url()
    stores = [Store(acme), Store(acme), Store(other), Store(other)]
    try:
        # A migration: holding it in `acme` holds up `acme`'s second process, not `other`'s.
        with _PausedAtItsLock(stores[0].ensure_schema) as held:
            assert not _waits_for_a_lock(stores[2].ensure_schema, 15), "waited for another schema's migration"
            assert _waits_for_a_lock(stores[1].ensure_schema, 1), "did not wait for its own schema's migration"
            held.release()
            assert held.done.wait(30)
        for s in stores:
            s.ensure_schema()
            s.ensure_tenant("hr", "bamboohr")
        assert stores[0].acquire_lease("hr", "a", timedelta(seconds=60)) is None
        assert stores[2].acquire_lease("hr", "a", timedelta(seconds=60)) is None
        # An event commit: the same.
        with _PausedAtItsLock(lambda: commit_run(stores[0], "hr", "a", 1, "first")) as held:
            assert not _waits_for_a_lock(lambda: commit_run(stores[2], "hr", "a", 1, "x"), 15), (
                "waited for another schema's event commit"
            )
            assert _waits_for_a_lock(lambda: commit_run(stores[1], "hr", "a", 1, "second"), 1), (
                "did not wait for its own schema's event commit"
            )
            held.release()
            assert held.done.wait(30)
        deadline = time.monotonic() + 30  # the waiting commit goes on once the first is in
        while len(list(stores[0].iter_events("hr"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["data"]["idp_id"] for e in stores[0].iter_events("hr")] == ["first-0", "second-0"]
        assert [e["data"]["idp_id"] for e in stores[2].iter_events("hr")] == ["x-0"]
    finally:
        for s in stores:
            s.close()


# A test process on the PostgreSQL test server: it makes its database (conftest), says its name,
# and then ends as told: "crash" without its session's end (an xdist worker that died, a run killed
# with SIGKILL), "hold" alive until its stdin closes, then ends its session, "end" at once, cleanly.
# Its databases bear a mark of their own: under the suite's, the crashed one's would be swept by
# any test process starting meanwhile on another worker, before this test sees it left behind.
_TEST_PROCESS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import conftest
conftest._OWN_MARK = "_tq_"
print(conftest.pg_url_or_skip().rsplit("/", 1)[1].split("?")[0], flush=True)
if sys.argv[2] == "crash":
    os._exit(0)
if sys.argv[2] == "hold":
    sys.stdin.read()
conftest.pytest_sessionfinish(None, 0)
"""


@pytest.mark.postgres
def test_the_databases_of_test_processes_that_never_ended_are_dropped_by_the_next_one(store_url: str) -> None:
    """Each test process makes a database on the test server, dropped at its session's end: one
    that crashed (pytest-xdist restarts it) or a run killed with SIGKILL left its database behind,
    and on a developer's own server they piled up, one more per crash. The next test process drops
    them, and never a live one's (another worker's, another run's on the same server)."""
    server = sa.create_engine(os.environ[PG_ENV], poolclass=sa.pool.NullPool)
    here = str(Path(__file__).parent)

    def process(how: str, **kwargs: Any) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-c", _TEST_PROCESS, here, how]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "CI": ""}, **kwargs)

    def databases() -> set[str]:
        with server.connect() as conn:
            return set(conn.execute(sa.text("SELECT datname FROM pg_database")).scalars())

    def sessions() -> set[str]:
        with server.connect() as conn:
            return set(conn.execute(sa.text("SELECT application_name FROM pg_stat_activity")).scalars())

    gone = held = ""
    live = process("hold", stdin=subprocess.PIPE)  # first: a process starting drops what it finds of gone ones
    try:
        held = live.stdout.readline().strip() if live.stdout else ""
        gone = process("crash").communicate(timeout=60)[0].strip()
        assert gone in databases() and held in databases()
        deadline = time.monotonic() + 10  # the server notices the crashed process's connections closed
        while gone in sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        later = process("end")
        later.communicate(timeout=60)
        assert later.returncode == 0
        left = databases()
        assert gone not in left, "a crashed test process's database was left on the server"
        assert held in left, "a live test process's database was dropped"
    finally:
        if live.stdin:
            live.stdin.close()
        live.wait(60)
        with server.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for name in {gone, held} & databases():  # what this test made, whatever it found
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


def test_two_db_upgrades_at_once_one_migrates_and_the_other_says_it_was_already_current(
    store_url: str, tmp_path: Path
):
    """`dirpull db upgrade` started on two machines at once (an init step of every replica): one
    migrates, the other waits for it. The one that waited said `schema at 0004 (was 0001)` too, so
    both logs claimed the migration."""
    from alembic import command

    s = Store(store_url)
    try:
        with s.engine.begin() as conn:
            command.upgrade(s._alembic(conn), "0001")
    finally:
        s.close()
    config = _config(tmp_path, store_url)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
    conn = holder.connect()
    pg = conn.dialect.name == "postgresql"
    # Hold the migration's own lock, so both read the schema as 0001 and then wait for it.
    if pg:
        store_module.lock_schema(conn, store_module.MIGRATION_LOCK_KEY)
    else:
        conn.close()
        conn = sqlite3.connect(sa.engine.make_url(store_url).database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
    upgrades: list[subprocess.Popen[str]] = []
    try:
        cmd = [sys.executable, "-m", "dirpull", "--config", config, "db", "upgrade"]
        upgrades = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
        ]
        deadline = time.monotonic() + 20
        if pg:
            waiting = sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            with holder.connect() as watch:
                while watch.execute(waiting).scalar_one() < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
        else:
            time.sleep(3)  # both started and past reading the schema (a busy SQLite waits 6 s)
    finally:
        conn.rollback()
        conn.close()
        holder.dispose()
    outs = []
    for p in upgrades:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out.strip())
    assert sorted(outs) == [f"schema at {CURRENT} (already current)", f"schema at {CURRENT} (was 0001)"], outs
    assert _cli(config, "db", "check").exit_code == 0


def test_a_deleted_managers_reports_are_looked_up_by_index_after_upgrading_a_0003_store(store_url: str):
    """An Entra ID delta deleting managers looks up their reports by manager (`load_reports`, up to
    500 managers a query). Before 0004 nothing indexed users.manager_idp_id: every such query read
    all of the tenant's users."""
    from alembic import command

    s = Store(store_url)
    try:
        with s.engine.begin() as conn:  # a store made by the previous release
            command.upgrade(s._alembic(conn), "0003")
        s.ensure_tenant("t", "bamboohr")
        assert s.acquire_lease("t", "a", timedelta(seconds=30)) is None
        ws = writes("t", 60, "u")
        for i, user in enumerate(ws.user_creates):
            user["manager_idp_id"] = f"u-{i % 3}" if i >= 3 else None
        run_id = s.start_run("t", trigger="test", mode="full", worker="a")
        s.apply("t", run_id, ws, holder="a", cursor=None, full=True,
                run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
        assert s.upgrade() == ("0003", CURRENT)

        indexes = {ix["name"]: ix["column_names"] for ix in sa.inspect(s.engine).get_indexes("users")}
        assert indexes.get("ix_users_tenant_manager") == ["tenant", "manager_idp_id"]

        with _statements(s.engine) as queries:
            reports = s.load_reports("t", ["u-1", "u-2"])
        assert sorted(reports) == sorted(f"u-{i}" for i in range(3, 60) if i % 3 in (1, 2))
        assert len(queries) == 1
        statement, parameters = queries[0]
        if s.dialect == "sqlite":
            with s.engine.connect() as conn:
                plan = " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters))
            assert "USING INDEX ix_users_tenant_manager (tenant=? AND manager_idp_id=?)" in plan, plan
    finally:
        s.close()


def _sqlite_plans(s: Store, call: Any) -> tuple[Any, list[str]]:
    """What `call()` returned (consumed, if an iterator) and SQLite's plan of each SELECT, UPDATE
    or DELETE it ran, as "statement: steps | …". Taken from SQLite's own trace: some of the store's
    reads go straight to the driver's cursor, unseen by SQLAlchemy's events. No ANALYZE: dirpull
    never runs it, so these are the plans SQLite makes on an operator's store."""
    if s.dialect != "sqlite":
        result = call()
        return (list(result) if hasattr(result, "__next__") else result), []
    ran: list[str] = []

    def trace(dbapi_conn: Any, *_: Any) -> None:
        dbapi_conn.set_trace_callback(ran.append)

    def untrace(dbapi_conn: Any, *_: Any) -> None:
        if dbapi_conn is not None:
            dbapi_conn.set_trace_callback(None)

    sa.event.listen(s.engine, "checkout", trace)
    sa.event.listen(s.engine, "checkin", untrace)
    try:
        result = call()
        if hasattr(result, "__next__"):  # a stream: read it while traced
            result = list(result)
    finally:
        sa.event.remove(s.engine, "checkout", trace)
        sa.event.remove(s.engine, "checkin", untrace)
    plans = []
    with s.engine.connect() as conn:
        for statement in ran:
            if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
                steps = " | ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}"))
                plans.append(f"{' '.join(statement.split())}: {steps}")
    return result, plans


@pytest.mark.stores
def test_a_users_groups_are_read_by_index_not_from_all_of_the_tenants_memberships(store_url: str):
    """An incremental run reads the stored groups of the users whose memberships changed
    (`membership_pairs(users=…)`), and `dirpull groups T --user U` a user's groups. Both read only
    the group and user ids, which the primary key holds: SQLite scanned the tenant's whole primary
    key for them (300,000 memberships: 48 ms for one user, 1.1 s for an incremental run's 5,000)
    instead of the index by user, until 0005 put the group's id in that index."""
    from alembic import command

    s = Store(store_url)
    try:
        with s.engine.begin() as conn:  # a store made by the previous release
            command.upgrade(s._alembic(conn), "0004")
        for tenant in ("t", "other"):
            s.ensure_tenant(tenant, "bamboohr")
            assert s.acquire_lease(tenant, "a", timedelta(seconds=30)) is None
            ws = writes(tenant, 30, "u")
            ws.group_creates = [
                {"idp_id": f"g-{i}", "name": f"g {i}", "description": None, "email": None, "raw_attributes": {},
                 "fingerprint": "x"} for i in range(10)
            ]  # fmt: skip
            ws.member_adds = [(f"g-{i}", f"u-{j}") for i in range(10) for j in range(30) if (i + j) % 3 == 0]
            run_id = s.start_run(tenant, trigger="test", mode="full", worker="a")
            s.apply(tenant, run_id, ws, holder="a", cursor=None, full=True,
                    run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
        assert s.upgrade() == ("0004", CURRENT)

        pairs, plans = _sqlite_plans(s, lambda: s.membership_pairs("t", users=["u-1", "u-2"]))
        assert pairs == {(f"g-{i}", f"u-{j}") for i in range(10) for j in (1, 2) if (i + j) % 3 == 0}
        groups, listing = _sqlite_plans(s, lambda: s.iter_groups("t", user="u-4"))
        assert [g["idp_id"] for g in groups] == ["g-2", "g-5", "g-8"]
        if s.dialect == "sqlite":
            by_user = [p for p in [*plans, *listing] if "memberships" in p]
            assert len(by_user) == 2, [*plans, *listing]
            by_index = "USING COVERING INDEX ix_memberships_tenant_user_group (tenant=? AND user_idp_id=?)"
            for plan in by_user:
                assert by_index in plan, plan
    finally:
        s.close()


@pytest.mark.stores
def test_listing_users_by_state_reads_only_those_users_not_the_whole_tenant(store_url: str):
    """`dirpull users T --state inactive` lists the tenant's inactive users by idp_id. SQLite read
    every user of the tenant by the primary key to keep those (100,000 users of ~2 kB: 0.19 s for
    5,000 inactive ones), and so did PostgreSQL through the stream's cursor, until 0007 put the
    idp_id in the index by state: the listing's order, no sort, no other users read."""
    from alembic import command

    s = Store(store_url)
    try:
        with s.engine.begin() as conn:  # a store made by the previous release
            command.upgrade(s._alembic(conn), "0006")
        for tenant, n in (("t", 20_000), ("other", 2_000)):
            s.ensure_tenant(tenant, "bamboohr")
            assert s.acquire_lease(tenant, "a", timedelta(seconds=60)) is None
            ws = writes(tenant, n, "u")
            for i, user in enumerate(ws.user_creates):
                user["state"] = "inactive" if i % 20 == 7 else "active"
            run_id = s.start_run(tenant, trigger="test", mode="full", worker="a")
            s.apply(tenant, run_id, ws, holder="a", cursor=None, full=True,
                    run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
        assert s.upgrade() == ("0006", CURRENT)
        if s.dialect == "postgresql":
            with s.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE users"))

        with _statements(s.engine, lambda statement: "FROM users" in statement) as queries:
            listed, plans = _sqlite_plans(s, lambda: s.iter_users("t", state="inactive"))
        expected = sorted(f"u-{i}" for i in range(20_000) if i % 20 == 7)
        assert [u["idp_id"] for u in listed] == expected and {u["state"] for u in listed} == {"inactive"}
        assert s.count_users("t") == {"active": 19_000, "inactive": 1_000}
        if s.dialect == "sqlite":
            assert len(plans) == 1, plans
            assert "USING INDEX ix_users_tenant_state_id (tenant=? AND state=?)" in plans[0], plans
            assert "TEMP B-TREE" not in plans[0], plans
        else:
            # As the stream runs it: a cursor, which PostgreSQL plans for its first rows.
            assert len(queries) == 1, queries
            statement, parameters = queries[0]
            with s.engine.begin() as conn:
                plan = " | ".join(
                    row[0].strip()
                    for row in conn.exec_driver_sql(f"EXPLAIN DECLARE plan_check CURSOR FOR {statement}", parameters)
                )
            assert "Index Scan using ix_users_tenant_state_id" in plan and "Sort" not in plan, plan
    finally:
        s.close()


@contextlib.contextmanager
def _statements(
    engine: sa.Engine, keep: Callable[[str], bool] = lambda statement: True
) -> Iterator[list[tuple[str, Any]]]:
    """The statements (with their parameters) `engine` sends while the block runs, those `keep` accepts."""
    ran: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if keep(statement):
            ran.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        yield ran
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)


def _pg_plans(s: Store, call: Any) -> tuple[Any, list[str]]:
    """As `_sqlite_plans`, on PostgreSQL: each SELECT or UPDATE `call()` ran, with EXPLAIN's plan."""
    def wanted(statement: str) -> bool:
        return statement.lstrip().upper().startswith(("SELECT", "UPDATE")) and "pg_catalog" not in statement

    with _statements(s.engine, wanted) as ran:
        result = call()
    with s.engine.connect() as conn:
        plans = [
            f"{' '.join(statement.split())}: "
            + " | ".join(row[0].strip() for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
            for statement, parameters in ran
        ]
    return result, plans


@pytest.mark.stores
def test_status_and_a_runs_start_read_a_tenants_runs_by_index_not_every_run_ever_recorded(store_url: str):
    """`dirpull status` (the newest run of each tenant, the newest scheduled one, when each last
    succeeded), a run's start (the tenant's run still marked running) and the guard's first-sync
    check read every run ever recorded, or all of the tenant's: three years of 15-minute runs of
    three tenants (315,000) cost each `dirpull status` 0.3 s and each run's start 40 ms under the
    store's write lock. Now each is a look-up per tenant, also for a tenant that never ran."""
    s = Store(store_url)
    try:
        s.ensure_schema()
        base = datetime(2025, 1, 1, tzinfo=UTC)
        rows = [("other", i, "schedule", "succeeded") for i in range(10)]
        rows += [
            ("t", i, "manual" if i % 10 == 9 else "schedule", "failed" if i % 7 == 0 else "succeeded")
            for i in range(20_000)
        ]
        for tenant in ("other", "t", "idle"):  # "idle": configured, never synced
            s.ensure_tenant(tenant, "bamboohr")
        with s.engine.begin() as conn:
            conn.execute(t.runs.insert(), [
                {"tenant": tenant, "trigger": trigger, "mode": "incremental", "status": status, "worker": "w",
                 "started_at": base + timedelta(seconds=i), "finished_at": base + timedelta(seconds=i),
                 "duration_s": 0.0, "requests": 0, "counts": {}, "notes": [], "quarantined": []}
                for tenant, i, trigger, status in rows
            ])  # fmt: skip
            ids = {
                (tenant, trigger): newest
                for tenant, trigger, newest in conn.execute(
                    sa.select(t.runs.c.tenant, t.runs.c.trigger, sa.func.max(t.runs.c.id)).group_by(
                        t.runs.c.tenant, t.runs.c.trigger
                    )
                )
            }
        if s.dialect == "postgresql":
            with s.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE runs"))
        plans_of = _sqlite_plans if s.dialect == "sqlite" else _pg_plans

        status, plans = plans_of(s, lambda: [s.last_runs(), s.last_runs(trigger="schedule"), s.last_success()])
        last, fired, ok = status
        assert {k: v["id"] for k, v in last.items()} == {"other": ids["other", "schedule"], "t": ids["t", "manual"]}
        assert {k: v["id"] for k, v in fired.items()} == {"other": ids["other", "schedule"], "t": ids["t", "schedule"]}
        assert ok == {"other": base + timedelta(seconds=9), "t": base + timedelta(seconds=19_998)}
        assert s.has_succeeded("t") and not s.has_succeeded("idle")
        run_id, started = plans_of(s, lambda: s.start_run("t", trigger="test", mode="full", worker="w"))
        assert run_id > ids["t", "manual"]
        _, succeeded = plans_of(s, lambda: s.has_succeeded("idle"))
        plans += started + succeeded
        for plan in plans:
            if s.dialect == "sqlite":
                assert "SCAN runs" not in plan and "SCAN r " not in plan, plan
            else:
                # No scan of all runs, nor the primary key walked back from the newest run of all.
                assert "Seq Scan on runs" not in plan and "runs_pkey on runs r" not in plan, plan
        assert len(plans) == 7, plans  # last_runs: the ids, then the runs; last_success; start_run; has_succeeded
        by_outcome = "ix_runs_tenant_status" + (" (tenant=? AND status=?)" if s.dialect == "sqlite" else "")
        assert by_outcome in plans[4] and by_outcome in plans[5] and by_outcome in plans[6], plans
    finally:
        s.close()


@pytest.mark.stores
def test_status_finds_the_newest_scheduled_run_of_a_tenant_synced_by_hand_without_reading_its_others(
    store_url: str,
):
    """`dirpull status` counts each tenant's next run from its newest scheduled run. Read along the
    (tenant, id) index, filtered by trigger, a tenant synced by hand only since its first
    scheduled run (disabled in the daemon, run by an external cron) had every run of it read in
    each `dirpull status` (105,000: 70 ms on SQLite, 40 ms on PostgreSQL), until 0008 indexed the
    runs by (trigger, tenant, id)."""
    s = Store(store_url)
    try:
        s.ensure_schema()
        base = datetime(2025, 1, 1, tzinfo=UTC)
        rows = [("byhand", 0, "schedule"), *[("byhand", i, "manual") for i in range(1, 20_000)]]
        rows += [("t", i, "schedule") for i in range(20_000, 20_010)]
        for tenant in ("byhand", "t", "idle"):  # "idle": configured, never synced
            s.ensure_tenant(tenant, "bamboohr")
        with s.engine.begin() as conn:
            conn.execute(t.runs.insert(), [
                {"tenant": tenant, "trigger": trigger, "mode": "incremental", "status": "succeeded", "worker": "w",
                 "started_at": base + timedelta(seconds=i), "finished_at": base + timedelta(seconds=i),
                 "duration_s": 0.0, "requests": 0, "counts": {}, "notes": [], "quarantined": []}
                for tenant, i, trigger in rows
            ])  # fmt: skip
            first = conn.execute(sa.select(sa.func.min(t.runs.c.id))).scalar_one()
        if s.dialect == "postgresql":
            with s.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE runs"))
        plans_of = _sqlite_plans if s.dialect == "sqlite" else _pg_plans

        fired, plans = plans_of(s, lambda: s.last_runs(trigger="schedule"))
        assert {k: v["id"] for k, v in fired.items()} == {"byhand": first, "t": first + 20_009}
        assert fired["byhand"]["trigger"] == "schedule"
        assert len(plans) == 2, plans  # the ids, then the runs
        if s.dialect == "sqlite":
            seek = "USING COVERING INDEX ix_runs_trigger_tenant (trigger=? AND tenant>? AND tenant<?)"
            assert seek in plans[0], plans
            assert "TEMP B-TREE" not in plans[0], plans
        else:
            assert "ix_runs_trigger_tenant on runs r" in plans[0], plans
            assert "ix_runs_tenant_id" not in plans[0] and "runs_pkey on runs r" not in plans[0], plans
    finally:
        s.close()


@pytest.mark.postgres
def test_polling_a_quiet_tenant_reads_its_own_events_not_every_later_one(store: Store):
    """`dirpull events quiet --after <its last seq> --limit 20`, a consumer polling a tenant with
    nothing new while another writes many events: PostgreSQL (statistics up to date) walked the
    primary key from that seq through all the other tenant's later events, filtering them out one
    by one (a million: 0.2 s a poll), instead of the (tenant, seq) index."""
    store.ensure_tenant("quiet", "bamboohr")
    with store.engine.begin() as conn:
        # Both tenants' runs take turns (every third event is quiet's, up to 30,000), then "t" alone.
        conn.execute(
            sa.text(
                "INSERT INTO events (tenant, run_id, type, object_id, data, created_at) "
                "SELECT CASE WHEN i % 3 = 0 AND i <= 30000 THEN 'quiet' ELSE 't' END, 1, 'user.updated', 'u' || i, "
                "'{}', now() FROM generate_series(1, 60000) AS i"
            )
        )
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE events"))

    with _statements(store.engine, lambda statement: "FROM events" in statement) as queries:
        assert [e["seq"] for e in store.iter_events("quiet", after=29990, limit=20)] == [29991, 29994, 29997, 30000]
        assert list(store.iter_events("quiet", after=30000, limit=20)) == []
        assert list(store.iter_events("quiet", after=2**40, limit=20)) == []  # a seq past 32 bits is no error
        assert [e["seq"] for e in store.iter_events("t", after=0, limit=3)] == [1, 2, 4]
    assert len(queries) == 4
    with store.engine.connect() as conn:
        for statement, parameters in queries:
            plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
            assert "Index Scan using ix_events_tenant_seq" in plan and "events_pkey" not in plan, plan


@pytest.mark.postgres
def test_listing_a_tenants_runs_reads_its_own_not_every_later_run_of_the_others(store: Store):
    """`dirpull runs quiet`, and `dirpull status` for each tenant, read the tenant's newest runs.
    For a tenant with half the runs or more whose runs stopped (disabled, or synced by hand no
    more) while another went on, PostgreSQL (statistics up to date) walked the primary key back
    from the newest run of all through every later run of the other tenant (105,000: 33 ms a
    listing, for each such tenant in each `dirpull status`), instead of the (tenant, id) index."""
    store.ensure_tenant("quiet", "bamboohr")
    with store.engine.begin() as conn:  # quiet's 30,000 runs, then t's 30,000
        conn.execute(
            sa.text(
                "INSERT INTO runs (tenant, trigger, mode, status, worker, started_at, finished_at, duration_s, "
                "requests, counts, notes, quarantined) "
                "SELECT CASE WHEN i <= 30000 THEN 'quiet' ELSE 't' END, 'schedule', 'incremental', 'succeeded', "
                "'w', now(), now(), 0, 0, '{}', '[]', '[]' FROM generate_series(1, 60000) AS i"
            )
        )
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE runs"))

    listed, plans = _pg_plans(store, lambda: [store.runs("quiet", 20), store.runs("t", 1), store.runs("none", 5)])
    quiet, t_runs, none = listed
    assert [r["id"] for r in quiet] == list(range(30000, 29980, -1)) and {r["tenant"] for r in quiet} == {"quiet"}
    assert [r["id"] for r in t_runs] == [60000] and none == []
    assert len(plans) == 3, plans
    for plan in plans:
        assert "Index Scan Backward using ix_runs_tenant_id" in plan and "runs_pkey" not in plan, plan


@pytest.mark.postgres
def test_a_slow_event_consumer_is_not_cut_off(store):
    """`dirpull events --json | slow-consumer`: the stream waits for its reader between batches of
    1,000 events. The connection's two-minute idle-in-transaction limit (shortened here to 1 s)
    ended such a stream after its first batch."""
    store.acquire_lease("t", "a", timedelta(seconds=60))
    commit_run(store, "t", "a", 2500, "u")
    store.release_lease("t", "a")
    store.close()

    def short_limit(dbapi_conn: Any, _: Any) -> None:  # the server's two minutes, made 1 s
        with dbapi_conn.cursor() as cur:
            cur.execute("SET idle_in_transaction_session_timeout = 1000")
        dbapi_conn.commit()

    sa.event.listen(store.engine, "connect", short_limit)
    read = []
    for e in store.iter_events("t"):
        read.append(e["seq"])
        if len(read) in (10, 1500):
            time.sleep(2)  # the consumer is busy with an event
    assert len(read) == 2500 and read == sorted(read)
    users = 0
    for _ in store.iter_users("t"):  # `dirpull users --json` the same
        users += 1
        if users == 1500:
            time.sleep(2)
    assert users == 2500


@pytest.mark.postgres
def test_timestamps_are_printed_in_utc_whatever_the_servers_time_zone(store_url: str, tmp_path: Path):
    """A PostgreSQL server set up in local time (initdb takes the machine's zone) handed every
    timestamp back in it: `events`, `users`, `runs` and `status` printed "…-05:00" there and "…Z"
    on SQLite, and a consumer expecting UTC misread them."""
    url = sa.engine.make_url(store_url)
    local = url.update_query_dict({"options": f"{url.query['options']} -ctimezone=America/New_York"})
    local_url = local.render_as_string(hide_password=False)
    s = Store(local_url)
    try:
        s.ensure_schema()
        s.ensure_tenant("hr", "bamboohr")
        assert s.acquire_lease("hr", "a", timedelta(seconds=30)) is None
        commit_run(s, "hr", "a", 1, "u")
        last_success = s.last_success()["hr"]  # `status` says "no successful sync since" it
    finally:
        s.close()
    config = _config(tmp_path, local_url)
    stamps = _printed_timestamps(config)
    assert len(stamps) == 6 and all(stamp.endswith("Z") for stamp in stamps), stamps
    assert last_success.utcoffset() == timedelta(0) and last_success.tzname() == "UTC"


def _printed_timestamps(config: str) -> list[str]:
    """Every timestamp the --json commands print for tenant hr."""
    stamps = []
    for args, keys in (
        (["events", "hr", "--json"], ["created_at"]),
        (["users", "hr", "--json"], ["created_at", "updated_at"]),
        (["runs", "hr", "--json"], ["started_at", "finished_at"]),
        (["status", "--json"], ["last_run"]),
    ):
        r = _cli(config, *args)
        assert r.exit_code == 0, (args, r.output)
        stamps += [json.loads(line)[k] for line in r.stdout.splitlines() for k in keys]
    return stamps


def test_timestamps_always_have_six_fraction_digits(store_url: str, tmp_path: Path, monkeypatch):
    """A timestamp that fell on a whole second was printed without its fraction ("…:30:00Z" beside
    "…:30:00.123456Z"): a consumer parsing one fixed format failed on it, once in a million."""
    monkeypatch.setattr(store_module, "utcnow", lambda: datetime(2026, 3, 1, 9, 30, tzinfo=UTC))
    s = Store(store_url)
    try:
        s.ensure_schema()
        s.ensure_tenant("hr", "bamboohr")
        assert s.acquire_lease("hr", "a", timedelta(seconds=30)) is None
        commit_run(s, "hr", "a", 1, "u")
    finally:
        s.close()
    config = _config(tmp_path, store_url)
    stamps = _printed_timestamps(config)
    shape = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
    assert len(stamps) == 6 and all(shape.fullmatch(stamp) for stamp in stamps), stamps


@pytest.mark.postgres
def test_store_recovers_when_the_server_drops_its_connections(store_url):
    # Its own application_name: only this store's connections are cut, not those of other test
    # runs (or a developer's daemon) sharing the server.
    name = f"dirpull-test-{uuid.uuid4().hex[:12]}"
    store = Store(sa.engine.make_url(store_url).update_query_dict({"application_name": name}).render_as_string(False))
    try:
        store.ensure_schema()
        assert store.last_seq() == 0
        admin = sa.create_engine(sa.engine.make_url(pg_url_or_skip()), poolclass=sa.pool.NullPool)
        with admin.connect() as conn:  # e.g. a PostgreSQL restart or failover
            cut = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            ).all()
        admin.dispose()
        assert cut  # the store's pooled connection was there to cut
        assert store.last_seq() == 0  # the pool pings, drops the dead connections and reconnects
    finally:
        store.close()


def test_a_store_password_given_in_the_query_is_hidden_in_store_errors(tmp_path: Path):
    # libpq (and so psycopg) takes the password as a query parameter too: ?password=…
    with closed_port() as port:  # no server needed
        config = _config(tmp_path, f"postgresql+psycopg://dirpull@127.0.0.1:{port}/dirpull?password=hunter2-in-query")
        for args in (["status"], ["users", "hr"], ["db", "check"]):
            r = _cli(config, *args)
            assert r.exit_code == 1, (args, r.output)
            assert f"127.0.0.1:{port}" in r.stderr and "cannot connect" in r.stderr, r.stderr
            assert "hunter2-in-query" not in r.output and "password=***" in r.stderr, r.stderr


def test_a_sqlite_commit_is_on_disk_when_it_returns(tmp_path):
    """synchronous=FULL: with NORMAL, a power loss could take back committed runs whose events a
    consumer had read, and hand their seqs out again to other events (which it would then skip)."""
    st = Store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        st.upgrade()
        with st.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        st.close()


def test_a_sqlite_write_lock_held_past_the_wait_is_named_in_the_error(tmp_path):
    """SQLite's own "database is locked" does not say that dirpull waited, how long, or for what:
    an operator seeing it after a 30 s stall could take the store for broken."""
    import sqlite3

    path = tmp_path / "s.db"
    st = Store(f"sqlite:///{path}", connect_timeout=0.1)
    other = sqlite3.connect(path, timeout=1, isolation_level=None)
    try:
        st.upgrade()
        other.execute("BEGIN IMMEDIATE")  # another process's sync holding the write lock
        with pytest.raises(store_module.StoreUnavailable) as err:
            st.ensure_tenant("acme", "okta")
        message = str(err.value)
        assert "database is locked" in message
        assert "another process" in message and "write lock for over 0.3s" in message, message
        assert "connect_timeout" in message
    finally:
        other.close()
        st.close()


def test_a_sqlite_store_url_naming_a_file_that_is_no_database_is_one_line_and_changes_nothing(tmp_path):
    """The store url naming some other file (a backup archive, a key file, an encrypted database):
    SQLite's "file is not a database" was a SQLAlchemy traceback from every command."""
    path = tmp_path / "dirpull.db"
    garbage = random.Random(1).randbytes(64 * 1024)
    path.write_bytes(garbage)
    config = _config(tmp_path, f"sqlite:///{path}")
    expected = f"dirpull: store sqlite:///{path}: cannot connect (file is not a database)"
    for args in (["users", "hr"], ["groups", "hr"], ["events", "hr"], ["runs", "hr"], ["status"],
                 ["sync", "hr"], ["run", "--max-seconds", "0.5"], ["db", "upgrade"], ["db", "check"]):  # fmt: skip
        r = _cli(config, *args)
        assert (r.exit_code, r.stderr.strip().splitlines()) == (1, [expected]), (args, r.output)
        assert isinstance(r.exception, SystemExit), (args, r.exception)
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirpull.db", "dirpull.toml"]


def test_a_sqlite_store_url_naming_another_applications_database_leaves_it_as_it_was(tmp_path):
    """dirpull switched any SQLite file it opened to WAL, a setting kept in the file's header:
    the store url naming another application's database changed that database for good (its
    readers then need write access to its folder, and WAL does not work on a network share), even
    from `dirpull users`, which then refused it for having no dirpull schema."""
    import sqlite3

    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.executescript("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'x')")
    before = path.read_bytes()
    config = _config(tmp_path, f"sqlite:///{path}")
    for args in (["users", "hr"], ["events", "hr"], ["status"], ["sync", "hr"], ["db", "check"]):
        r = _cli(config, *args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output)
    assert path.read_bytes() == before
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_syncing_into_another_applications_database_says_so_not_that_the_schema_is_old(tmp_path):
    """`dirpull sync` with the store url naming another application's database said "schema is at
    revision none, this dirpull needs …; run `dirpull db upgrade`", as for an old dirpull store."""
    import sqlite3

    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.executescript("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    config = _config(tmp_path, f"sqlite:///{path}")
    for args in (["sync", "hr"], ["run", "--max-seconds", "0.5"]):
        r = _cli(config, *args)
        assert (r.exit_code, r.stderr.strip().splitlines()) == (1, [
            f"dirpull: store sqlite:///{path}: the database has tables but no dirpull schema (another "
            "application's database, or the wrong one named?); nothing changed: point the store url at dirpull's "
            "database, or run `dirpull db upgrade` to add dirpull's tables beside them"
        ]), (args, r.output)  # fmt: skip
    check = _cli(config, "db", "check")  # not "schema empty" alone, as though no table were there
    assert (check.exit_code, check.stdout.strip()) == (1, (
        f"schema empty, needed {CURRENT} (the database has tables, none of them dirpull's: another application's "
        "database, or the wrong one named?)"
    )), check.output  # fmt: skip
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert [n for (n,) in other.execute("SELECT name FROM sqlite_master")] == ["users"]


def test_db_upgrade_of_another_applications_database_says_it_added_dirpulls_tables_beside_its_own(tmp_path):
    """It said "schema at 0004 (was empty)" of a database that held another application's tables."""
    import sqlite3

    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.executescript("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    config = _config(tmp_path, f"sqlite:///{path}")
    r = _cli(config, "db", "upgrade")
    assert (r.exit_code, r.stdout.strip()) == (0, (
        f"schema at {CURRENT} (was none: dirpull's tables added beside the database's own)"
    )), r.output  # fmt: skip
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert "invoices" in {n for (n,) in other.execute("SELECT name FROM sqlite_master")}
    (tmp_path / "new").mkdir()
    empty = _config(tmp_path / "new", "sqlite:///" + str(tmp_path / "new" / "dirpull.db"))
    assert _cli(empty, "db", "upgrade").stdout.strip() == f"schema at {CURRENT} (was empty)"


def test_a_sqlite_store_in_a_folder_this_user_cannot_write_is_named_not_the_file(tmp_path):
    """The store file handed to the service's user, its folder still someone else's: SQLite cannot
    make the -wal and -shm files it needs even to read, and says "attempt to write a readonly
    database" of a file this user can write. The operator checked the file and found nothing."""
    if os.geteuid() == 0:  # root writes anything: the commands run as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to run as another user than root")
        folder = Path(tempfile.mkdtemp(prefix="dirpull-ro-"))  # pytest's tmp_path is root's alone
        os.chmod(folder, 0o755)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        folder, prefix = tmp_path / "store", []
        folder.mkdir()
    try:
        path = folder / "dirpull.db"
        st = Store(f"sqlite:///{path}")
        st.upgrade()
        st.close()
        config = Path(_config(folder, f"sqlite:///{path}"))
        config.chmod(0o644)
        if prefix:
            os.chown(path, 65534, 65534)
        for extra in ("dirpull.db-wal", "dirpull.db-shm"):
            (folder / extra).unlink(missing_ok=True)
        folder.chmod(0o555)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        for args in (["status"], ["sync", "hr"]):
            r = subprocess.run([*prefix, sys.executable, "-m", "dirpull", "--config", str(config), *args],
                               capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert r.stderr.splitlines() == [
                f"dirpull: store sqlite:///{path}: cannot connect (attempt to write a readonly database: this user "
                f"cannot write its folder {folder}, where SQLite makes the store's -wal and -shm files)"
            ], args
    finally:
        folder.chmod(0o755)
        if prefix:
            shutil.rmtree(folder)


@contextlib.contextmanager
def _store_in_server_locale(store_kind: str, store_url: str) -> Iterator[str]:
    """`store_url`, or on PostgreSQL a database whose default collation is en-US: what a server
    installed on a machine in that locale gives every database it makes (the test server's is C)."""
    if store_kind == "sqlite":
        yield store_url
        return
    base = sa.engine.make_url(pg_url_or_skip())
    name = f"{base.database}_icu_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    # The name is under the test databases' mark: a test process starting on another worker sweeps
    # it unless a live session says it is in use (conftest's holders), as it did mid-test in CI.
    holder = sa.create_engine(
        base.update_query_dict({"application_name": name}), poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with holder.connect(), admin.connect() as conn:
            try:
                icu = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
                conn.execute(sa.text(f'CREATE DATABASE "{name}" {icu}'))
            except sa.exc.DBAPIError as exc:
                pytest.skip(f"this PostgreSQL cannot make an ICU en-US database: {exc.orig}")
            try:
                yield base.set(database=name).render_as_string(hide_password=False)
            finally:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
        holder.dispose()


def test_users_and_groups_are_listed_in_the_same_order_whatever_the_servers_collation(
    store_kind: str, store_url: str, tmp_path: Path
):
    """A PostgreSQL server whose databases collate in en-US (its machine's locale) listed users and
    groups by idp_id ignoring case and punctuation ("_x", "a", "b", "B", "é", "Z"), where SQLite
    lists them by code point ("B", "Z", "_x", "a", "b", "é"): the same directory came out in
    another order, and a script comparing two listings or paging by the last id saw changes."""
    ids = ["b", "B", "a", "_x", "é", "Z", "a b", "a-b", "10", "9", "e"]
    with _store_in_server_locale(store_kind, store_url) as url:
        s = Store(url)
        try:
            s.ensure_schema()
            s.ensure_tenant("hr", "bamboohr")
            ws = writes("hr", 0, "x")
            template = writes("hr", 1, "x").user_creates[0]
            ws.user_creates = [{**template, "idp_id": i, "username": i} for i in ids]
            ws.group_creates = [{"idp_id": i, "name": i, "description": None, "email": None, "raw_attributes": {},
                                 "fingerprint": "g"} for i in ids]  # fmt: skip
            ws.member_adds = [(g, u) for g in ids[:3] for u in ids]
            assert s.acquire_lease("hr", "a", timedelta(seconds=30)) is None
            run_id = s.start_run("hr", trigger="test", mode="full", worker="a")
            s.apply("hr", run_id, ws, holder="a", cursor=None, full=True,
                    run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
        finally:
            s.close()
        config = _config(tmp_path, url)
        for args in (["users", "hr"], ["users", "hr", "--state", "active"], ["users", "hr", "--group", "b"],
                     ["groups", "hr"], ["groups", "hr", "--user", "é"]):  # fmt: skip
            r = _cli(config, *args, "--json")
            assert r.exit_code == 0, (args, r.output)
            listed = [json.loads(line)["idp_id"] for line in r.stdout.splitlines()]
            expected = sorted(ids) if args[-1] not in ("é",) else sorted(ids[:3])
            assert listed == expected, args


def test_large_floats_in_vendor_values_read_back_as_floats(store_url: str, tmp_path: Path):
    """jsonb keeps a number's digits, not its JSON type: a vendor's 1e18 (a float, written 1e18)
    was read back from PostgreSQL as the integer 1000000000000000000, so `users --json` and event
    data printed another type, and another value for a consumer's typed parser, than on SQLite."""
    floats = {"a": 1e18, "b": -2.5e20, "c": 1e16, "d": 1e-7, "e": 3.0, "f": 1e300}
    lookalikes = {"s": "1e18", ":1e18,[2e20": [1e17, "x"], "n": {"deep": [4e19]}}
    s = Store(store_url)
    try:
        s.ensure_schema()
        s.ensure_tenant("hr", "bamboohr")
        template = writes("hr", 1, "x").user_creates[0]
        created = {**template, "idp_id": "u1", "raw_attributes": {**floats, **lookalikes}}
        ws = writes("hr", 0, "x")
        ws.user_creates = [created]
        ws.events = [{"type": "user.created", "object_id": "u1", "data": created}]
        assert s.acquire_lease("hr", "a", timedelta(seconds=30)) is None
        fields = {"status": "succeeded", "mode": "full", "counts": {}, "requests": 0}
        s.apply("hr", s.start_run("hr", trigger="test", mode="full", worker="a"), ws, holder="a", cursor=None,
                full=True, run_fields=fields)  # fmt: skip
        # A second run rewrites the row (another path to the database) with a float custom attribute.
        ws = writes("hr", 0, "y")
        ws.user_creates = [{**template, "idp_id": "u2", "custom_attributes": {"cost": 2e17}}]
        ws.user_updates = [{**created, "custom_attributes": {"cost": 5e18}}]
        s.apply("hr", s.start_run("hr", trigger="test", mode="full", worker="a"), ws, holder="a", cursor=None,
                full=True, run_fields=fields)  # fmt: skip
    finally:
        s.close()
    config = _config(tmp_path, store_url)
    users = [json.loads(line) for line in _cli(config, "users", "hr", "--json").stdout.splitlines()]
    assert users[0]["raw_attributes"] == {**floats, **lookalikes}
    assert all(type(users[0]["raw_attributes"][k]) is float for k in floats)
    assert type(users[0]["raw_attributes"][":1e18,[2e20"][0]) is float
    assert type(users[0]["raw_attributes"]["n"]["deep"][0]) is float
    assert [(u["idp_id"], u["custom_attributes"]) for u in users] == [("u1", {"cost": 5e18}), ("u2", {"cost": 2e17})]
    assert all(type(u["custom_attributes"]["cost"]) is float for u in users)
    events = [json.loads(line) for line in _cli(config, "events", "hr", "--json").stdout.splitlines()]
    assert all(type(events[0]["data"]["raw_attributes"][k]) is float for k in floats)


def test_upgrading_a_0008_store_in_a_server_locale_keeps_its_rows_and_lists_by_code_point(
    store_kind: str, store_url: str, tmp_path: Path
):
    """Migration 0009 changes the id columns' collation with the rows in place: on a database that
    collates in en-US, every user, group, membership and event stays as it was, the ids are then
    listed by code point, and the next runs find, change and remove the rows by those ids."""
    from alembic import command

    ids = ["b", "B", "a", "_x", "é", "Z", "a b", "a-b", "10", "9"]
    with _store_in_server_locale(store_kind, store_url) as url:
        s = Store(url)
        try:
            with s.engine.begin() as conn:
                command.upgrade(s._alembic(conn), "0008")
            s.ensure_tenant("hr", "bamboohr")
            ws = writes("hr", 0, "x")
            template = writes("hr", 1, "x").user_creates[0]
            ws.user_creates = [{**template, "idp_id": i, "username": i, "manager_idp_id": "a"} for i in ids]
            ws.group_creates = [{"idp_id": i, "name": i, "description": None, "email": None, "raw_attributes": {},
                                 "fingerprint": "g"} for i in ids]  # fmt: skip
            ws.member_adds = [(g, u) for g in ids[:3] for u in ids]
            ws.events = [{"type": "user.created", "object_id": i, "data": {"idp_id": i}} for i in ids]
            assert s.acquire_lease("hr", "a", timedelta(seconds=30)) is None
            run_id = s.start_run("hr", trigger="test", mode="full", worker="a")
            s.apply("hr", run_id, ws, holder="a", cursor={"since": "x"}, full=True,
                    run_fields={"status": "succeeded", "mode": "full", "counts": {}, "requests": 0})  # fmt: skip
            before = [(e["seq"], e["type"], e["data"]) for e in s.iter_events("hr")]
            assert s.upgrade() == ("0008", CURRENT)
            assert [(e["seq"], e["type"], e["data"]) for e in s.iter_events("hr")] == before
            assert s.membership_pairs("hr") == {(g, u) for g in ids[:3] for u in ids}
            assert s.user_digests("hr")[0] == dict.fromkeys(ids, "x")
            assert s.get_cursor("hr").value == {"since": "x"}
            # The next run removes a membership and changes a user, by id: the events go on after.
            ws = writes("hr", 0, "y")
            ws.member_removes = [("B", "é")]
            ws.user_updates = [{**template, "idp_id": "é", "username": "é2", "manager_idp_id": "a"}]
            ws.events = [{"type": "user.updated", "object_id": "é", "data": {"idp_id": "é"}}]
            run_id = s.start_run("hr", trigger="test", mode="incremental", worker="a")
            s.apply("hr", run_id, ws, holder="a", cursor={"since": "y"}, full=False,
                    run_fields={"status": "succeeded", "mode": "incremental", "counts": {}, "requests": 0})  # fmt: skip
            after = [(e["seq"], e["type"]) for e in s.iter_events("hr", after=before[-1][0])]
            assert after == [(before[-1][0] + 1, "user.updated"), (before[-1][0] + 2, "group.user_removed")]
            assert ("B", "é") not in s.membership_pairs("hr") and len(s.membership_pairs("hr")) == 29
            assert {u["idp_id"]: u["username"] for u in s.iter_users("hr")}["é"] == "é2"
        finally:
            s.close()
        config = _config(tmp_path, url)
        for args in (["users", "hr"], ["users", "hr", "--group", "b"], ["groups", "hr"]):
            r = _cli(config, *args, "--json")
            assert r.exit_code == 0, (args, r.output)
            assert [json.loads(line)["idp_id"] for line in r.stdout.splitlines()] == sorted(ids), args
