"""`dirpull demo`: every emulator over one changing organization, the real daemon syncing a tenant
per provider into an SQLite store, and the events printed as they are committed."""

from __future__ import annotations

import logging
import shlex
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dirpull.config import load_config
from dirpull.emulators.cluster import Cluster, write_private
from dirpull.emulators.org import Org
from dirpull.storage.store import Store
from dirpull.sync.daemon import Daemon
from dirpull.sync.runner import STOPPED, RunResult

log = logging.getLogger("dirpull.demo")
SHOW_PER_RUN = 6


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(*, people: int, duration: float, schedule: str, workdir: Path) -> int:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The events are the show: per-run log lines would bury them (warnings still print).
    quieted = {name: logging.getLogger(name).level for name in ("dirpull.sync", "dirpull.daemon")}
    for name in quieted:
        logging.getLogger(name).setLevel(logging.WARNING)
    db = workdir / "demo.db"
    for leftover in (db, db.with_suffix(".db-wal"), db.with_suffix(".db-shm")):
        leftover.unlink(missing_ok=True)
    org = Org.generate(people, seed=7)
    cluster = Cluster(org)
    cluster.start(require_connector=True)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    daemon = None
    try:
        if not cluster.emulators:
            _say("no provider has both an emulator and a connector yet; nothing to demo")
            return 1
        config_file = workdir / "dirpull.toml"
        write_private(config_file, cluster.config_toml(workdir, store_url=f"sqlite:///{db}", schedule=schedule))
        config = load_config(config_file)
        store = Store(config.store.url)
        store.ensure_schema()
        _say(f"dirpull demo: {people} people, {len(org.groups)} groups; config {config_file}, store {db}")
        for provider, emulator in cluster.emulators.items():
            _say(f"  {provider:17} emulator at {emulator.base_url}")
        for provider, why in cluster.skipped.items():
            _say(f"  {provider:17} skipped: {why}")
        _say(f"each tenant syncs every {schedule}; the organization changes every few seconds. Ctrl-C stops.\n")
        daemon = Daemon(config, store, backoff_base=2.0)
        daemon.start()
        _tail(store, org, stop, duration, config_file)
        return 0
    finally:
        if daemon is not None:
            daemon.shutdown(wait=True)
            _summary(daemon)
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # As they were: a process going on after the demo (a test run) logged no sync or daemon line.
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)


def _tail(store: Store, org: Org, stop: threading.Event, duration: float, config_file: Path) -> None:
    deadline = None if duration <= 0 else time.monotonic() + duration
    next_change = time.monotonic() + 6.0
    last_seq = 0
    while not stop.wait(0.5):
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if now >= next_change:
            for line in org.random_changes(2):
                _say(f"~ directory change: {line}")
            next_change = now + 4.0
        # Read to the end of the log, keeping only counts and the first events of each run: a run
        # is one unbroken block of seqs, committed at once. Read 5,000 at a time, a first sync of
        # a few thousand people was printed as several runs of "5000 events", the same run each.
        counts: dict[tuple[str, int], int] = defaultdict(int)
        shown: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for e in store.iter_events(None, after=last_seq):
            last_seq = e["seq"]
            run = (e["tenant"], e["run_id"])
            counts[run] += 1
            if len(shown[run]) < SHOW_PER_RUN:
                shown[run].append(e)
        for (tenant, run_id), n in counts.items():
            _say(f"[{tenant}] run {run_id}: {n} events")
            for e in shown[(tenant, run_id)]:
                _say(f"    #{e['seq']} {_line(e)}")
            if n > SHOW_PER_RUN:
                # The command itself, to paste: "dirpull -c … events T --after …" left the file and
                # the seq to guess.
                after = shown[(tenant, run_id)][-1]["seq"]
                command = f"dirpull -c {shlex.quote(str(config_file))} events {tenant} --after {after}"
                _say(f"    … {n - SHOW_PER_RUN} more: {command}")


def _line(e: dict[str, Any]) -> str:
    d = e["data"]
    if e["type"].startswith("group.user_"):
        return f"{e['type']} group={d['group']} user={d['user']}"
    name = d.get("display_name") or d.get("name") or d.get("username") or ""
    changed = f" ({', '.join(sorted(e['previous_attributes']))})" if e.get("previous_attributes") else ""
    return f"{e['type']} {d.get('idp_id')} {name}{changed}"


def _summary(daemon: Daemon) -> None:
    results = daemon.results
    _say("\nruns by tenant:")
    per: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in results:
        per[r.tenant][_outcome(r)] += 1
    for tenant in sorted(per):
        _say(f"  {tenant:16} " + ", ".join(f"{k} {v}" for k, v in sorted(per[tenant].items())))
    failed = [r for r in results if _outcome(r) == "failed"]
    for r in failed[-5:]:
        _say(f"  failure {r.tenant}: {r.error}")


def _outcome(r: RunResult) -> str:
    # A run the demo's own stop cut off applied nothing and is no failure of its tenant, as
    # `dirpull status` has it: listed as a failure, it read as the demo going wrong at its end.
    return "interrupted" if r.status == "failed" and (r.error or "").startswith(STOPPED) else r.status
