"""Crash consistency: real `dirpull sync` processes killed with SIGKILL (the OOM killer, a lost
node) at random moments of initial, full and incremental runs, while the directory changes between
and during runs, on SQLite and PostgreSQL, against emulators with deltas (Entra, Okta) and one
without (BambooHR). Killed in the middle of the pull (after a random number of vendor requests, or
at a random time), inside the apply's transaction just before its COMMIT, and just after the
COMMIT (before the lease is given back and the process reports).

After each kill the lease is let lapse (as its TTL would) and, now and then, a clean run follows;
kills also come back to back. Then the directory stops changing and one more incremental run ends
it. Throughout and at the end, through the real store:

- the event log read from the start, applied by the strict consumer of test_sync_properties
  (`Replay`), gives exactly the stored users, groups and memberships: no event lost or twice;
- seq strictly increases, each run's events are one unbroken block, every event belongs to a
  succeeded run, and a succeeded run has exactly as many events as it counted (a killed run's
  events are nowhere);
- a killed run is never recorded succeeded unless it was killed after its COMMIT;
- after the last incremental run (its cursor left by killed and clean runs alike) the store holds
  exactly what a full sync into a fresh store finds: the cursor skipped no change made before or
  during a killed run; and a full run then writes nothing.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import SyncHarness
from test_sync_properties import ORDER, Replay, without_stamps

from dirpull.emulators import emulator_class
from dirpull.emulators.org import Org
from dirpull.storage import schema
from dirpull.storage.store import Store, utcnow

pytestmark = pytest.mark.stores

TENANT = "t"
GUARD = {"max_percent": 100, "min_count": 100_000}  # kills, not the guard, are under test here
# The killed runs, in order: how each is killed, and whether it is a `--full` one. The first ones
# find no cursor (initial runs) until one commits; full runs come early, so that no full run mends
# what the later incremental ones would leave wrong.
ROUNDS = [
    ("requests", False),
    ("before_commit", False),
    ("after_commit", False),
    ("requests", True),
    ("time", False),
    ("after_commit", False),
    ("before_commit", False),
]

# Runs `dirpull` with a SIGKILL at a fixed point of the apply: inside its transaction just before
# the COMMIT (the run's record is its last statement), or just after the COMMIT returned.
KILLER = """
import os, signal, sys
from dirpull.storage.store import Store

point = sys.argv.pop(1)
if point == "before_commit":
    finish_run = Store.finish_run

    def killing_finish_run(self, run_id, *, conn=None, **kwargs):
        if conn is not None:  # the run's record, written in the apply's transaction
            os.kill(os.getpid(), signal.SIGKILL)
        return finish_run(self, run_id, conn=conn, **kwargs)

    Store.finish_run = killing_finish_run
elif point == "after_commit":
    apply = Store.apply

    def killing_apply(self, *args, **kwargs):
        apply(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    Store.apply = killing_apply
sys.argv[0] = "dirpull"
from dirpull.cli import main

main()
"""


class Directory:
    """An emulator over an organization that a thread may change while a sync runs."""

    def __init__(self, provider: str, tmp_path: Path, store_url: str) -> None:
        self.provider = provider
        self.org = Org.generate(30, groups=5, seed=7)
        self.emulator = emulator_class(provider)(self.org)
        self.emulator.start()
        table = self.emulator.tenant_config(TENANT, tmp_path)
        # Small pages, and each answer a little late: a run is a dozen requests or so, long
        # enough to be killed in the middle of.
        self.emulator.faults.update({"delay": 0.01})
        if provider == "entra_id":
            self.emulator.delta_page_size = 8
        elif provider == "okta":
            # Deletions reach incremental runs; the cursor as close to the run's start as it may be.
            table.update(poll_system_log=True, page_size=8, cursor_holdback=0.001)
        else:
            table.update(batch_size=4)
        self.requests = 8  # of a run, as the last clean run made
        self.table = table
        self.config = tmp_path / "dirpull.toml"
        lines = ["[store]", f"url = {json.dumps(store_url)}", "[defaults.guard]"]
        lines += [f"{k} = {v}" for k, v in GUARD.items()]
        lines += [f"[tenants.{TENANT}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
        self.config.write_text("\n".join(lines) + "\n")

    def change(self, rng: random.Random, count: int) -> None:
        self.org.random_changes(count, rng)


@pytest.fixture(params=["entra_id", "okta", "bamboohr"])
def directory(request: pytest.FixtureRequest, tmp_path: Path, store_url: str) -> Iterator[Directory]:
    d = Directory(request.param, tmp_path, store_url)
    try:
        yield d
    finally:
        d.emulator.stop()


def start(d: Directory, point: str, full: bool) -> subprocess.Popen[bytes]:
    args = ["--config", str(d.config), "sync", TENANT, "--json", *(["--full"] if full else [])]
    return subprocess.Popen(
        [sys.executable, "-c", KILLER, point, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def kill_when(proc: subprocess.Popen[bytes], d: Directory, rng: random.Random, how: str) -> None:
    """SIGKILL `proc` once a random one of its vendor requests has come (`requests`: the process
    waits for the answer), or at a random time (`time`); at the commit the process kills itself
    (`KILLER`). The directory changes meanwhile, once a random one of the run's requests has come."""
    deadline = time.monotonic() + 20
    base = d.emulator.requests
    change_at = base + rng.randint(1, d.requests)
    if how == "requests":
        kill_at = time.monotonic() + 20
    elif how == "time":
        kill_at = time.monotonic() + rng.uniform(0.3, 0.5 + 0.01 * d.requests)
    else:
        kill_at = deadline
    at = base + rng.randint(1, d.requests) if how == "requests" else None
    changed = False
    while proc.poll() is None and time.monotonic() < min(kill_at, deadline):
        if not changed and d.emulator.requests >= change_at:
            d.change(rng, rng.randint(1, 4))
            changed = True
        if at is not None and d.emulator.requests >= at:
            break
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=20)
    if not changed:
        d.change(rng, rng.randint(1, 4))


def lease_lapses(store: Store) -> None:
    """What the killed worker's lease TTL does, without waiting for it."""
    with store.engine.begin() as conn:
        conn.execute(
            schema.leases.update()
            .where(schema.leases.c.tenant == TENANT)
            .values(expires_at=utcnow() - timedelta(minutes=1))
        )


def clean_run(h: SyncHarness, d: Directory, rng: random.Random) -> Any:
    """A sync that runs to its end while the directory changes under it: its cursor must not pass
    those changes."""
    base, count, done = d.emulator.requests, rng.randint(1, 4), threading.Event()

    def change_once_under_way() -> None:
        while not done.is_set() and d.emulator.requests == base:
            time.sleep(0.001)
        d.change(rng, count)

    changer = threading.Thread(target=change_once_under_way, daemon=True)
    changer.start()
    try:
        r = h.sync(TENANT)
    finally:
        done.set()
        changer.join(10)
    assert r.status == "succeeded", r.error
    return r


def check_log(h: SyncHarness, killed_after_commit: set[int]) -> None:
    """The event log, replayed from empty, gives the stored state; every event is a succeeded run's."""
    events = h.events(TENANT)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "seq not strictly increasing"
    runs = {r["id"]: r for r in h.store.runs(TENANT, 10_000)}
    by_run: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        by_run.setdefault(e["run_id"], []).append(e)
    order = [e["run_id"] for e in events]
    blocks = [r for i, r in enumerate(order) if i == 0 or order[i - 1] != r]
    assert len(blocks) == len(set(blocks)), f"runs' events interleave: {blocks}"
    for run_id, run_events in by_run.items():
        assert runs[run_id]["status"] == "succeeded", (run_id, runs[run_id])
        ranks = [ORDER.index(e["type"]) for e in run_events]
        assert ranks == sorted(ranks), [e["type"] for e in run_events]
    for run in runs.values():
        if run["status"] == "succeeded":
            assert len(by_run.get(run["id"], [])) == run["counts"]["events"], run
    replay = Replay()
    for e in events:
        replay.apply(e)
    assert replay.users == h.users(TENANT)
    assert replay.groups == h.groups(TENANT)
    assert replay.members == h.members(TENANT)
    for run_id in killed_after_commit:
        assert runs[run_id]["status"] == "succeeded", runs[run_id]


def state(h: SyncHarness) -> tuple[dict[str, Any], dict[str, Any], set[tuple[str, str]]]:
    return (
        {k: without_stamps(v) for k, v in h.users(TENANT).items()},
        {k: without_stamps(v) for k, v in h.groups(TENANT).items()},
        h.members(TENANT),
    )


def test_syncs_killed_at_any_moment_converge_without_losing_or_repeating_an_event(
    directory: Directory, tmp_path: Path, store_url: str, store_kind: str
) -> None:
    d = directory
    rng = random.Random(f"{d.provider}-{store_kind}")
    h = SyncHarness(tmp_path, {TENANT: d.table}, guard=GUARD, store_url=store_url)
    killed_after_commit: set[int] = set()
    outcomes: list[str] = []
    try:
        for i, (how, full) in enumerate(ROUNDS):
            if i:
                d.change(rng, rng.randint(1, 6))
            newest = (h.store.runs(TENANT, 1) or [{"id": 0}])[0]["id"]
            proc = start(d, how if how.endswith("commit") else "-", full)
            kill_when(proc, d, rng, how)
            # A run may end before a kill timed by requests or by the clock comes: then it succeeded.
            finished = proc.returncode == 0 and not how.endswith("commit")
            assert finished or proc.returncode == -signal.SIGKILL, (how, proc.returncode)
            [last] = h.store.runs(TENANT, 1) or [{"id": 0, "status": None}]
            ran = last["id"] > newest
            outcomes.append(
                f"{how} {last['mode'] if ran else '-'}: {last['status'] if ran else '-'}"
                f"{' (ended)' if finished else ''}"
            )
            if how == "after_commit":
                assert ran and last["status"] == "succeeded", last
                killed_after_commit.add(last["id"])
            elif finished:
                assert ran and last["status"] == "succeeded", last
            elif how != "time":  # killed in the pull or before the COMMIT: recorded running, nothing applied
                assert ran and last["status"] == "running", (how, last)
            elif ran:  # killed at a random time: before the COMMIT, or after it
                assert last["status"] in ("running", "succeeded"), last
            lease_lapses(h.store)
            check_log(h, killed_after_commit)
            if rng.random() < 0.5:  # a clean run now, or the next kill right after this one
                r = clean_run(h, d, rng)
                d.requests = max(2, r.requests)
                outcomes.append(f"clean {r.mode}")
                check_log(h, killed_after_commit)
        r = h.sync(TENANT)  # from the cursor the kills and the clean runs left
        assert r.status == "succeeded" and r.mode == "incremental", (r.mode, r.error)
        check_log(h, killed_after_commit)
        (tmp_path / "ref").mkdir()
        ref = SyncHarness(tmp_path / "ref", {TENANT: d.table}, guard=GUARD)  # a fresh SQLite store
        try:
            fresh = ref.sync(TENANT, full=True)
            assert fresh.status == "succeeded", fresh.error
            assert state(h) == state(ref), outcomes
        finally:
            ref.close()
        again = h.sync(TENANT, full=True)
        assert again.status == "succeeded", again.error
        assert again.events == 0 and again.counts["rows_written"] == 0, (again.counts, outcomes)
    finally:
        h.close()
