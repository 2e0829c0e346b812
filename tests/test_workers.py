"""Several `dirpull run` worker processes sharing one store: every tenant synced, never by two
workers at once, a SIGKILLed worker's tenants picked up after its lease expires (its run applied
nothing), and a consumer reading the event log meanwhile sees no duplicate and no gap."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from dirpull.emulators.bamboohr_api import BambooHREmulator
from dirpull.emulators.org import Org
from dirpull.storage.store import Store

TENANTS = 20
WORKERS = 3
RUN_SECONDS = 24.0  # each worker's --max-seconds: time for a takeover after the kill, even when the
# workers were slow to start (a loaded machine, tests in parallel)
LEASE_TTL = 3.0
REQUEST_DELAY = 0.3  # every emulator request: a sync lasts long enough to be killed mid-run


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _write_config(path: Path, store_url: str, emulators: dict[str, BambooHREmulator]) -> None:
    lines = [
        "[store]",
        f"url = {json.dumps(store_url)}",
        "[defaults]",
        'schedule = "2s"',
        f'lease_ttl = "{int(LEASE_TTL)}s"',
        "max_concurrent_syncs = 4",
    ]
    for name, emulator in emulators.items():
        lines.append(f"[tenants.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in emulator.tenant_config(name, path.parent).items()]
    path.write_text("\n".join(lines) + "\n")


def _dirpull(config: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DIRPULL_STORE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", str(config), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
    )


@pytest.mark.stores
@pytest.mark.timeout(180)
def test_three_workers_share_tenants_survive_a_sigkill_and_never_overlap(store_url: str, tmp_path: Path):
    rng = random.Random(8)
    orgs = {f"t{i:02d}": Org.generate(12, seed=100 + i) for i in range(TENANTS)}
    emulators = {name: BambooHREmulator(org) for name, org in orgs.items()}
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    try:
        for emulator in emulators.values():
            emulator.start()
            emulator.faults.update({"delay": REQUEST_DELAY})
        config = tmp_path / "dirpull.toml"
        _write_config(config, store_url, emulators)

        # The documented procedure: migrate once, then start the same config on every machine.
        up = _dirpull(config, "db", "upgrade", log=tmp_path / "upgrade.log")
        assert up.wait(60) == 0, (tmp_path / "upgrade.log").read_text()

        store = Store(store_url)
        seen: list[int] = []
        consumer_errors: list[BaseException] = []

        def consume() -> None:  # what `dirpull events --after N` in a loop does, store-wide
            last = 0
            try:
                while True:
                    final = stop.is_set()
                    for e in store.iter_events(None, after=last):
                        seen.append(e["seq"])
                        last = e["seq"]
                    if final:
                        return
                    time.sleep(0.02)
            except BaseException as exc:
                consumer_errors.append(exc)

        def churn() -> None:  # the directories keep changing, so runs keep emitting events
            while not stop.wait(0.25):
                rng.choice(list(orgs.values())).random_changes(2)

        helpers = [threading.Thread(target=consume), threading.Thread(target=churn)]
        for h in helpers:
            h.start()

        started = time.monotonic()
        for i in range(WORKERS):
            procs.append(_dirpull(config, "run", "--max-seconds", str(RUN_SECONDS), log=tmp_path / f"worker{i}.log"))
        victim = procs[0]
        victim_name = f":{victim.pid}-"  # HOST:PID-TAG

        # Kill worker 0 with SIGKILL while one of its runs is in progress (after it has done some work).
        killed_run = None
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and killed_run is None:
            if time.monotonic() - started > 4:
                for tenant in orgs:
                    run = store.runs(tenant, 1)
                    if run and run[0]["status"] == "running" and victim_name in run[0]["worker"]:
                        killed_run = run[0]
                        break
            if killed_run is None:
                time.sleep(0.05)
        assert killed_run is not None, "worker 0 never ran a sync"
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        killed_tenant = killed_run["tenant"]
        dead_lease = store.lease(killed_tenant)

        for p in procs[1:]:
            assert p.wait(RUN_SECONDS + 40) == 0, "a worker did not stop cleanly"
        assert killed_at - started < RUN_SECONDS - LEASE_TTL - 5, "the kill came too late to see a takeover"
        stop.set()
        for h in helpers:
            h.join(30)
        assert not consumer_errors, consumer_errors

        runs = {tenant: list(reversed(store.runs(tenant, 1000))) for tenant in orgs}
        workers_used = {r["worker"] for rs in runs.values() for r in rs}
        assert len(workers_used) == WORKERS, workers_used

        # Every tenant synced.
        for tenant, rs in runs.items():
            assert any(r["status"] == "succeeded" for r in rs), (tenant, [r["status"] for r in rs])
            assert sorted(u["idp_id"] for u in store.iter_users(tenant)), tenant

        # Never two workers on one tenant: each run starts after the previous one ended.
        for tenant, rs in runs.items():
            for before, after in itertools.pairwise(rs):
                assert before["finished_at"] is not None, (tenant, before)
                assert _ts(before["finished_at"]) <= _ts(after["started_at"]), (tenant, before, after)

        # The killed run applied nothing, was marked failed by the worker that took over, and
        # that happened only once the dead worker's lease had expired.
        final = {r["id"]: r for r in runs[killed_tenant]}[killed_run["id"]]
        assert final["status"] == "failed" and final["error"].startswith("interrupted"), final
        assert not [e for e in store.iter_events(killed_tenant) if e["run_id"] == killed_run["id"]]
        later = [r for r in runs[killed_tenant] if r["id"] > killed_run["id"]]
        assert later and any(r["status"] == "succeeded" for r in later), later
        assert victim_name not in later[0]["worker"]
        assert dead_lease.expires_at is not None
        assert _ts(later[0]["started_at"]) >= dead_lease.expires_at, (later[0], dead_lease)

        # The consumer saw every event exactly once, in order, with nothing appearing behind it.
        table = [e["seq"] for e in store.iter_events(None)]
        assert len(table) > TENANTS * 12  # the first syncs alone create every user
        assert seen == sorted(set(seen)), "duplicate or out-of-order event"
        assert seen == table, "the consumer missed events"
        store.close()
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for emulator in emulators.values():
            emulator.stop()
