"""The daemon: tenants on their schedules, a failing tenant backs off alone, stop is clean."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from scripted import Directory, ScriptedConnector, factory, people

from dirpull.sync.daemon import Daemon, next_fire, trigger_for

pytestmark = pytest.mark.stores  # each test runs on SQLite and on PostgreSQL

TENANTS = {
    name: {"provider": "bamboohr", "company_domain": "acme", "api_key": "k", "schedule": "1s"}
    for name in ("good", "bad")
}


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_failing_tenant_backs_off_while_the_other_keeps_syncing(harness, caplog):
    caplog.set_level("WARNING")
    dirs = {"good": Directory(users=people(3)), "bad": Directory(users=people(3), fail_after_pages=0)}
    h = harness(TENANTS)
    daemon = Daemon(h.config, h.store, backoff_base=60.0, connector_factory=lambda t, s: ScriptedConnector(dirs[t]))
    daemon.start()
    try:
        assert wait_for(lambda: dirs["good"].pulls >= 3)
    finally:
        daemon.shutdown()
    assert dirs["bad"].pulls == 1  # failed once, then backing off for a minute
    assert daemon.failures == {"bad": 1}
    # (The last "good" run may be one the shutdown interrupted: look at all of them.)
    good = [r.status for r in daemon.results if r.tenant == "good"]
    bad = [r.status for r in daemon.results if r.tenant == "bad"]
    assert good.count("succeeded") >= 2 and bad == ["failed"]
    assert len(h.users("good")) == 3 and h.users("bad") == {}
    assert {r["trigger"] for r in h.store.runs("good")} == {"schedule"}
    # An operator logging warnings only sees why, not just that it failed.
    [warning] = [r.getMessage() for r in caplog.records if "in a row" in r.getMessage()]
    assert warning.startswith("tenant bad: failed 1 time(s) in a row: HTTP 500 from the directory (scripted);")


def stop_mid_run(daemon: Daemon, d: Directory, gate: threading.Event) -> threading.Thread:
    """Start the daemon, shut it down while its first sync is inside the pull (held at `gate`),
    then let the pull go on; the thread that ran the shutdown, joined."""
    daemon.start()
    assert d.entered.wait(10)
    stopper = threading.Thread(target=daemon.shutdown)
    stopper.start()
    time.sleep(0.2)
    gate.set()
    stopper.join(15)
    return stopper


def first_fires(h: Any, d: Directory) -> dict[str, timedelta]:
    """How long after a new worker's start it first fires each tenant (it is stopped at once,
    having run none)."""
    daemon = Daemon(h.config, h.store, connector_factory=factory(d))
    daemon.scheduler.start = functools.partial(daemon.scheduler.start, paused=True)
    started = datetime.now(UTC)
    daemon.start()
    try:
        return {job.id: job.next_run_time - started for job in daemon.scheduler.get_jobs()}
    finally:
        daemon.shutdown()


def test_shutdown_interrupts_a_running_sync_and_applies_nothing(harness):
    gate = threading.Event()
    d = Directory(users=people(50), gate=gate)
    h = harness({"good": TENANTS["good"]})
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(d))
    stopper = stop_mid_run(daemon, d, gate)
    assert not stopper.is_alive()
    assert h.users("good") == {}
    run = h.store.runs("good")[0]
    assert run["status"] == "failed" and "interrupted" in run["error"]


def test_run_forever_returns_after_max_seconds(harness, caplog):
    """And says why it stops and, last, that it has stopped: a log that ended at "stopping" could
    be a process killed while it waited for its syncs."""
    d = Directory(users=people(2))
    h = harness({"good": TENANTS["good"]})
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(d))
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="dirpull.daemon"):
        daemon.run_forever(max_seconds=1.5)
    assert time.monotonic() - t0 < 10
    assert d.pulls >= 1 and not daemon.scheduler.running
    mine = [r.getMessage() for r in caplog.records if r.name == "dirpull.daemon"]
    assert mine[-1] == "stopped"
    assert any(m.startswith("stopping (--max-seconds 1.5 reached): waiting") for m in mine)


def test_a_cron_tenant_waits_for_its_time_on_restart_unless_it_missed_one(harness):
    """A restart used to sync every cron tenant within 10 s, whatever its cron said ("0 2 * * *":
    at 02:00, e.g. because the vendor allows its reports only at night). Now a cron tenant first
    fires at its next cron time, unless it never ran or a cron time passed while no run started."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from dirpull.storage import schema

    yearly = "cron: 0 0 1 1 *"
    tenants = {"nightly": {**TENANTS["good"], "schedule": yearly}, "often": TENANTS["good"]}
    d = Directory(users=people(2))
    h = harness(tenants, connector_factory=lambda t, s: ScriptedConnector(d))

    soon = timedelta(seconds=11)
    assert all(wait <= soon for wait in first_fires(h, d).values())  # never synced: both at once

    h.sync("nightly", trigger="schedule")  # it ran after its last cron time
    fires = first_fires(h, d)
    assert fires["nightly"] > timedelta(days=1) and fires["often"] <= soon
    assert datetime.now(UTC) + fires["nightly"] - next_fire(yearly, None) < soon

    with h.store.engine.begin() as conn:  # its last run was before the last cron time: missed
        conn.execute(sa.update(schema.runs).values(started_at=datetime(2020, 5, 1, tzinfo=UTC)))
    assert first_fires(h, d)["nightly"] <= soon


def test_a_worker_whose_machine_slept_through_a_cron_time_fires_soon_after_it_wakes(harness, monkeypatch):
    """The scheduler slept until the next fire on the monotonic clock, which stands still while
    the machine is suspended: a host asleep through 02:00 fired its nightly tenant hours late,
    as long as it had slept. The wall clock is looked at every `max_sleep` now."""
    import apscheduler.schedulers.base as aps_base

    from dirpull.sync.daemon import _QuietStopScheduler

    nightly = "cron: 0 2 * * *"
    d = Directory(users=people(2))
    h = harness({"nightly": {**TENANTS["good"], "schedule": nightly}}, connector_factory=factory(d))
    h.sync("nightly", trigger="schedule")  # it ran after its last cron time: waits for the next
    slept = [timedelta()]

    class WallClock(datetime):  # the wall clock the scheduler reads; the monotonic one goes on
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.now(tz) + slept[0]

    monkeypatch.setattr(aps_base, "datetime", WallClock)
    monkeypatch.setattr(_QuietStopScheduler, "max_sleep", 0.2, raising=False)  # a minute in production
    daemon = Daemon(h.config, h.store, connector_factory=factory(d))
    daemon.start()
    try:
        time.sleep(0.5)
        assert d.pulls == 1  # waiting for 02:00
        # The machine wakes up a second after 02:00, having slept through it.
        slept[0] = next_fire(nightly, None) - datetime.now(UTC) + timedelta(seconds=1)
        assert wait_for(lambda: d.pulls == 2, timeout=5)
        # The pull is counted as it starts: on a loaded machine the shutdown would cut the run off.
        assert wait_for(lambda: daemon.results)
    finally:
        daemon.shutdown()
    assert [r.status for r in daemon.results] == ["succeeded"]


def test_a_worker_started_after_a_failed_cron_run_tries_it_again_soon(harness):
    """A nightly run failed (a vendor outage at 02:00) and the worker was restarted before its
    in-memory retry (an upgrade, a reboot): the new worker took the failed run for that night's
    and waited for the next cron time, a day without a sync."""
    yearly = "cron: 0 0 1 1 *"
    d = Directory(users=people(2), fail_after_pages=0)
    h = harness({"nightly": {**TENANTS["good"], "schedule": yearly}}, connector_factory=factory(d))

    assert h.sync("nightly", trigger="schedule").status == "failed"  # after the last cron time
    assert first_fires(h, d)["nightly"].total_seconds() < 11
    d.fail_after_pages = None
    assert h.sync("nightly", trigger="schedule").status == "succeeded"
    assert first_fires(h, d)["nightly"].total_seconds() > 86400


def test_a_cron_run_cut_off_by_a_restart_is_caught_up_when_the_worker_starts_again(harness, monkeypatch):
    """`systemctl restart` during a nightly cron run: the run stops and applies nothing. The
    restarted worker took it for that night's run (it began after the cron time) and waited for
    the next cron time, so the tenant went a whole period without a sync, while `dirpull status`
    showed only "interrupted" and flagged nothing. So did a run left `running` by a killed worker."""
    import sqlalchemy as sa

    import dirpull.sync.daemon as daemon_module
    from dirpull.storage import schema

    monkeypatch.setattr(daemon_module, "first_fire_delay", lambda schedule: 0.0)
    yearly = "cron: 0 0 1 1 *"
    gate = threading.Event()
    d = Directory(users=people(30), gate=gate)
    h = harness(
        {"nightly": {**TENANTS["good"], "schedule": yearly}}, connector_factory=lambda t, s: ScriptedConnector(d)
    )
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(d))
    stop_mid_run(daemon, d, gate)  # it never ran: its first fire is now
    [cut] = h.store.runs("nightly")
    assert cut["status"] == "failed" and cut["error"].startswith("interrupted: the worker is stopping")

    assert first_fires(h, d)["nightly"].total_seconds() < 5
    with h.store.engine.begin() as conn:  # as left by a worker killed mid-run
        conn.execute(sa.update(schema.runs).values(status="running", error=None, finished_at=None))
    assert first_fires(h, d)["nightly"].total_seconds() < 5
    d.gate = None
    result = h.sync("nightly", trigger="schedule")
    assert result.status == "succeeded", result.error  # a run that ended: no catch-up
    assert first_fires(h, d)["nightly"].total_seconds() > 86400


def test_a_fire_that_waited_behind_long_syncs_still_runs(harness, monkeypatch):
    """With every pool thread busy on long syncs (a hundred tenants, four at a time), a tenant's
    fire waits in the queue. One that waited more than five minutes used to be dropped as a
    misfire, so the tenant was skipped that round while the threads went idle."""
    from datetime import datetime, timedelta

    import apscheduler.executors.base as aps_executor

    class TenMinutesLater(datetime):  # what the clock says when the queued fire finally starts
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(minutes=10)

    monkeypatch.setattr(aps_executor, "datetime", TenMinutesLater)
    d = Directory(users=people(2))
    h = harness({"good": TENANTS["good"]}, connector_factory=lambda t, s: ScriptedConnector(d))
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(d))
    daemon.start()
    try:  # the fire ran, and the daemon was not stopped before its run was recorded
        assert wait_for(lambda: any(r["status"] == "succeeded" for r in h.store.runs("good")), timeout=8)
    finally:
        daemon.shutdown()
    assert d.pulls >= 1


def test_schedules():
    assert trigger_for("15m").interval.total_seconds() == 900
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, 7, tzinfo=UTC)
    assert next_fire("cron: */15 * * * *", None, now) == datetime(2026, 1, 1, 12, 15, tzinfo=UTC)
    assert next_fire("15m", datetime(2026, 1, 1, 12, 0, tzinfo=UTC), now) == datetime(2026, 1, 1, 12, 15, tzinfo=UTC)


def test_a_cron_line_naming_a_day_and_a_weekday_fires_on_either_as_crontab_does():
    """"0 2 1 * mon" in crontab: the 1st of each month and every Monday. APScheduler's own reading
    (both must match) fired only on a 1st that is a Monday: once or twice a year."""
    from datetime import UTC, datetime

    trigger = trigger_for("cron: 0 2 1 * mon")
    fire = trigger.get_next_fire_time(None, datetime(2026, 12, 1, 3, 0, tzinfo=UTC))
    fires = []
    while fire < datetime(2027, 2, 2, tzinfo=UTC):
        fires.append(fire.date().isoformat())
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    assert fires == ["2026-12-07", "2026-12-14", "2026-12-21", "2026-12-28", "2027-01-01", "2027-01-04",
                     "2027-01-11", "2027-01-18", "2027-01-25", "2027-02-01"]  # fmt: skip
    # One field left open keeps the other's meaning alone.
    assert next_fire("cron: 0 2 * * mon", None, datetime(2027, 1, 1, tzinfo=UTC)).date().isoformat() == "2027-01-04"
    assert next_fire("cron: 0 2 1 * *", None, datetime(2027, 1, 2, tzinfo=UTC)).date().isoformat() == "2027-02-01"


def test_shutdown_cuts_a_vendor_retry_wait_short(harness):
    """A vendor that asks for long waits must not hold SIGTERM: the wait ends, nothing is applied."""
    from dirpull.connectors.base import Done, Page
    from dirpull.connectors.http import RetryPolicy

    waiting = threading.Event()

    class Throttled:
        provider = "x"

        def pull(self, cursor, *, full):
            yield Page(users=people(2))
            waiting.set()
            RetryPolicy(max_delay=600, max_total_wait=600).wait(1, 300.0, what="HTTP 429")
            yield Done(snapshot=True, cursor=None, mode="full")

    h = harness({"good": TENANTS["good"]})
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: Throttled())
    daemon.start()
    assert waiting.wait(10)
    t0 = time.monotonic()
    daemon.shutdown()
    assert time.monotonic() - t0 < 30  # not the 300 s retry wait (a loaded CI machine has room)
    assert h.users("good") == {}
    # Recorded as cut off by the stop (`dirpull status`: interrupted), not as the vendor failing.
    assert h.store.runs("good")[0]["error"].startswith("interrupted: the worker is stopping; nothing applied")


def test_the_start_up_log_names_the_store_and_the_tenants_not_scheduled(harness, caplog):
    """An operator reading the daemon's log learns which store it writes to ($DIRPULL_STORE_URL
    may override the file's) and why a configured tenant never syncs."""
    caplog.set_level("INFO", logger="dirpull.daemon")
    h = harness({**TENANTS, "off": {**TENANTS["good"], "enabled": False}})
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(Directory(users=people(1))))
    daemon.start()
    daemon.shutdown()
    lines = [r.getMessage() for r in caplog.records]
    [start] = [line for line in lines if " starting: " in line]
    assert f"store {h.store.safe_url}" in start and "2 of 3 tenants enabled" in start
    assert "tenant off (bamboohr) is disabled: not scheduled" in lines
    assert not [line for line in lines if line.startswith("scheduled tenant off ")]


def test_workers_sharing_a_store_sync_a_tenant_once_per_interval_not_once_each(harness):
    # Every worker schedules every tenant; with runs shorter than the interval the lease is free
    # again when the next worker fires, so each worker synced the tenant every interval: three
    # workers pulled the vendor three times as often as the schedule says (and its rate limits).
    d = Directory(users=people(3))
    h = harness({"good": {**TENANTS["good"], "schedule": "2s"}})
    workers = [
        Daemon(h.config, h.store, worker=f"host:{n}", connector_factory=lambda t, s: ScriptedConnector(d))
        for n in range(3)
    ]
    for w in workers:
        w.start()
    try:
        t0 = time.monotonic()
        time.sleep(9.0)
        elapsed = time.monotonic() - t0
        runs = [r for r in h.store.runs("good", 100) if r["status"] == "succeeded"]
        # One run per 2 s interval across the three workers (one per worker was 13 runs).
        assert 3 <= len(runs) <= elapsed / 2 + 2, [(r["worker"], r["started_at"]) for r in runs]
        skipped = [r for w in workers for r in w.results if r.status == "skipped"]
        assert len(skipped) >= 6 and all(
            " was synced by host:" in (r.error or "") or " is being synced by host:" in (r.error or "") for r in skipped
        ), [r.error for r in skipped]
        assert not [r for w in workers for r in w.results if r.status == "failed"]

        # The worker that has been syncing it stops: another one takes the tenant over.
        owner = next(w for w in workers if w.runner.worker == runs[0]["worker"])
        owner.shutdown()
        last_id = h.store.runs("good", 1)[0]["id"]
        assert wait_for(
            lambda: any(
                r["id"] > last_id and r["status"] == "succeeded" and r["worker"] != owner.runner.worker
                for r in h.store.runs("good", 10)
            ),
            timeout=8,
        )
    finally:
        for w in workers:
            w.shutdown()


def test_a_sync_longer_than_its_interval_is_not_a_warning_every_interval(harness, caplog):
    # APScheduler warned 'Execution of job "sync good (trigger: …)" skipped: maximum number of
    # running instances reached (1)' at every fire during a long sync (a big tenant's first sync):
    # the documented one-fire-at-a-time behaviour, not a problem, in a log watched for warnings.
    caplog.set_level("INFO")
    gate = threading.Event()
    d = Directory(users=people(20), gate=gate)
    h = harness({"good": {**TENANTS["good"], "schedule": "1s"}})
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(d))
    daemon.start()
    try:
        assert d.entered.wait(10)
        time.sleep(3.5)  # three fires or so while the first sync waits at the gate
        gate.set()
        assert wait_for(lambda: any(r.status == "succeeded" for r in daemon.results))
    finally:
        gate.set()
        daemon.shutdown()
    assert [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")] == []
    overlaps = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert overlaps and overlaps[0].startswith("tenant good: its previous sync is still running")


def test_a_fire_waiting_for_a_free_thread_is_not_logged_as_a_sync_still_running(harness, caplog, monkeypatch):
    """Hundreds of tenants, `max_concurrent_syncs` at a time: a tenant whose fire waits behind
    the busy threads skips its later fires. The log said "its previous sync is still running" for
    it, a tenant with no sync running, perhaps one that never synced: the operator looking for
    the stuck sync found none, and nothing said the worker was short of threads."""
    import dirpull.sync.daemon as daemon_module

    delays = iter([0.0, 0.3])  # big first, then small, in the order of the tenants' tables
    monkeypatch.setattr(daemon_module, "first_fire_delay", lambda schedule: next(delays))
    caplog.set_level("INFO", logger="dirpull.daemon")
    gate = threading.Event()
    dirs = {"big": Directory(users=people(20), gate=gate), "small": Directory(users=people(2))}
    h = harness({name: {**TENANTS["good"], "schedule": "1s"} for name in dirs}, defaults={"max_concurrent_syncs": 1})
    daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(dirs[t]))
    daemon.start()
    try:
        assert dirs["big"].entered.wait(10)
        time.sleep(2.5)  # two fires or so of small while its first waits for the thread
        assert dirs["small"].pulls == 0
    finally:
        gate.set()
        daemon.shutdown()
    skipped = [r.getMessage() for r in caplog.records if "this fire is skipped" in r.getMessage()]
    assert "tenant small: its previous sync is still running; this fire is skipped" not in skipped
    assert (
        "tenant small: its previous fire is still waiting for a free sync thread "
        "(all 1 of max_concurrent_syncs are busy); this fire is skipped"
    ) in skipped
    # The tenant whose sync does run is still told apart.
    assert "tenant big: its previous sync is still running; this fire is skipped" in skipped


@pytest.mark.postgres  # the pool is PostgreSQL's: a SQLite file's writes go one at a time anyway
@pytest.mark.timeout(120)
def test_more_syncs_at_once_than_pool_size_all_apply(store_url, tmp_path):
    """`dirpull run` with max_concurrent_syncs = 16 and the default pool_size = 5: sixteen tenants
    applying at once (here: waiting for a lock on the users table) hold two connections each, the
    applying transaction and the lease heartbeat waiting for its lock on the lease row. The pool
    opened at most ten: the other syncs waited for a connection and failed after connect_timeout."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import sqlalchemy as sa

    from dirpull.emulators.bamboohr_api import BambooHREmulator
    from dirpull.emulators.org import Org
    from dirpull.storage.store import Store

    tenants = [f"t{i:02d}" for i in range(16)]
    emulator = BambooHREmulator(Org.generate(3, seed=5))
    emulator.start()
    store = Store(store_url)
    store.ensure_schema()
    blocker = sa.create_engine(store_url, poolclass=sa.pool.NullPool)
    proc = None
    try:
        # connect_timeout: how long a sync waits for a pooled connection (the defect: they ran
        # out); an apply waits 3× as long for a lock (here the users table's) before it fails.
        lines = ["[store]", f"url = {json.dumps(store_url)}", "connect_timeout = 5", "[defaults]",
                 'schedule = "2s"', 'lease_ttl = "3s"', "max_concurrent_syncs = 16"]  # fmt: skip
        for name in tenants:
            lines.append(f"[tenants.{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in emulator.tenant_config(name, tmp_path).items()]
        config = tmp_path / "dirpull.toml"
        config.write_text("\n".join(lines) + "\n")
        log = tmp_path / "run.log"
        with blocker.connect() as conn:
            conn.execute(sa.text("LOCK TABLE users IN SHARE MODE"))  # every first apply waits here
            env = {k: v for k, v in os.environ.items() if k != "DIRPULL_STORE_URL"}
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dirpull.cli", "--config", str(config), "run", "--max-seconds", "60"],
                    stdout=out, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
            waiting = sa.text(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'users'::regclass"
            )
            wait_for(lambda: conn.execute(waiting).scalar_one() == len(tenants), timeout=20)
            # The heartbeats (every second) wait on the lease rows; a wait for the pool would time
            # out (5 s) while every apply still waits for the lock (15 s).
            time.sleep(6)
            conn.rollback()
        assert wait_for(lambda: all(store.has_succeeded(name) for name in tenants), timeout=30), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "no free connection" not in text and "Traceback" not in text, text
        for name in tenants:  # (a later round's run may be one the SIGTERM interrupted)
            failed = [run["error"] for run in store.runs(name) if run["status"] != "succeeded"]
            assert all(error.startswith("interrupted: the worker is stopping") for error in failed), (name, failed)
            assert store.runs(name)[-1]["status"] == "succeeded"  # the first
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        blocker.dispose()
        store.close()
        emulator.stop()


@contextlib.contextmanager
def _daemon_held_at_its_store(store_url: str, tmp_path: Path) -> Iterator[Any]:
    """`dirpull run` (one BambooHR tenant) in a process of its own, whose PostgreSQL store is
    reached through a relay that holds its connections unanswered (a server slow to answer) until
    `relay.release()`: yields (the process, its combined output pipe, the relay) once it has
    connected, still opening its store."""
    import json
    import os
    import subprocess
    import sys

    from pg_relay import CommitCutter

    from dirpull.emulators.bamboohr_api import BambooHREmulator
    from dirpull.emulators.org import Org

    emulator = BambooHREmulator(Org.generate(3, seed=5))
    emulator.start()
    relay = CommitCutter(store_url)
    relay.hold()
    proc = None
    try:
        lines = ["[store]", f"url = {json.dumps(relay.url_for(store_url))}", "connect_timeout = 30",
                 "[defaults]", 'schedule = "2s"', "[tenants.hr]"]  # fmt: skip
        lines += [f"{k} = {json.dumps(v)}" for k, v in emulator.tenant_config("hr", tmp_path).items()]
        config = tmp_path / "dirpull.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if k != "DIRPULL_STORE_URL"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "dirpull.cli", "--config", str(config), "run", "--max-seconds", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )  # fmt: skip
        assert relay.accepted.wait(60), "the daemon never connected to its store"
        yield proc, relay
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        relay.close()
        emulator.stop()


@pytest.mark.postgres  # a server slow to answer: what keeps a daemon in its start-up long enough
@pytest.mark.timeout(120)
def test_sigterm_while_the_daemon_opens_its_store_stops_it_cleanly(store_url, tmp_path):
    """SIGTERM (systemd stopping the service, a rolling restart) while `dirpull run` was still
    opening its store, a PostgreSQL server slow to answer, ended the process by the default
    action: exit 143, no "stopped" line, where a stop at any later moment is clean, exit 0."""
    import signal

    from dirpull.storage.store import Store

    with _daemon_held_at_its_store(store_url, tmp_path) as (proc, relay):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # delivered while the connection still waits for the server's answer
        relay.release()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert out.rstrip().endswith("stopped"), out
    store = Store(store_url)
    try:
        assert store.runs("hr") == [], "a sync was begun after the stop was asked for"
    finally:
        store.close()


def test_a_fire_that_found_the_lease_taken_does_not_skip_the_next_interval_for_that_run(harness):
    # Worker B fires while worker A's run is in progress (lease taken: skipped). A's run began
    # before B's fire: it was the interval B's fire belonged to. B's next fire, an interval later,
    # skipped again "synced by A" for that same run: with A gone by then (stopped, crashed, a
    # rolling restart) the tenant went an interval without a sync.
    gate = threading.Event()
    d = Directory(users=people(3), gate=gate)
    h = harness({"good": {**TENANTS["good"], "schedule": "1h"}})
    a = Daemon(h.config, h.store, worker="host:a", connector_factory=lambda t, s: ScriptedConnector(d))
    b = Daemon(h.config, h.store, worker="host:b", connector_factory=lambda t, s: ScriptedConnector(d))
    a._seen_run = {"good": 0}  # as `start()` leaves it on an empty store
    b._seen_run = {"good": 0}
    first = threading.Thread(target=a.fire, args=("good",))
    first.start()
    try:
        assert d.entered.wait(10)
        skipped = b.fire("good")
        assert skipped is not None and skipped.status == "skipped"
        assert " is being synced by host:a" in (skipped.error or "")
    finally:
        gate.set()
        first.join(30)
    assert [r.status for r in a.results] == ["succeeded"]

    # An interval later A is gone; B's fire is this interval's sync.
    later = b.fire("good")
    assert later is not None and later.status == "succeeded", later.error


def test_a_fire_that_finds_the_lease_held_tries_again_soon_not_next_interval(harness, caplog, monkeypatch):
    """A fire that found the tenant's lease held was skipped (at debug level) and the tenant waited
    for its next fire. The holder may be a `dirpull sync T --dry-run`, which applies nothing, or a
    run that then fails: on an hourly schedule an hour without a sync, a day on a nightly cron."""
    from datetime import UTC, datetime, timedelta

    import dirpull.sync.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "first_fire_delay", lambda schedule: 0.0)
    caplog.set_level("DEBUG", logger="dirpull.daemon")
    d = Directory(users=people(3))
    h = harness({"good": {**TENANTS["good"], "schedule": "1h"}})
    h.store.ensure_tenant("good", "bamboohr")
    dry_run = "ops-laptop:4242/1a2b3c4d"  # what `dirpull sync good --dry-run` holds while it pulls
    assert h.store.acquire_lease("good", dry_run, timedelta(minutes=5)) is None
    daemon = Daemon(h.config, h.store, lease_retry_base=0.3, connector_factory=lambda t, s: ScriptedConnector(d))
    daemon.start()
    try:
        assert wait_for(lambda: len(daemon.results) >= 2, timeout=10)  # its fire and a retry: both skipped
        assert d.pulls == 0 and h.store.runs("good") == []
        h.store.release_lease("good", dry_run)
        released = time.monotonic()
        assert wait_for(lambda: any(r["status"] == "succeeded" for r in h.store.runs("good")), timeout=10)
        assert time.monotonic() - released < 5  # not an hour later
        regular = daemon.scheduler.get_job("good").next_run_time  # its schedule is left as it was
        assert regular - datetime.now(UTC) > timedelta(minutes=50)
    finally:
        daemon.shutdown()
    assert len(h.users("good")) == 3 and d.pulls == 1
    skipped = [r for r in daemon.results if r.status == "skipped"]
    assert len(skipped) >= 2 and all(r.holder == dry_run for r in skipped)
    # An operator sees who held it, once, not at every retry.
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and dry_run in r.getMessage()]
    assert len(infos) == 1 and infos[0].startswith(f"tenant good: tenant good is being synced by {dry_run}"), infos
    assert "trying again in" in infos[0]


def test_a_retry_after_another_workers_scheduled_run_skips_instead_of_syncing_again(harness, monkeypatch):
    """The retry of a fire that found another worker's scheduled run holding the lease applies the
    once-per-interval rule like any fire: that run succeeded, so the retry skips. (Also when this
    worker started while that run was going.)"""
    import dirpull.sync.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "first_fire_delay", lambda schedule: 0.0)
    gate = threading.Event()
    d = Directory(users=people(20), page_size=5, gate=gate)
    h = harness({"good": {**TENANTS["good"], "schedule": "1h"}})
    a, b = (
        Daemon(h.config, h.store, worker=f"host:{n}", lease_retry_base=0.3,
               connector_factory=lambda t, s: ScriptedConnector(d))
        for n in (1, 2)
    )  # fmt: skip
    a.start()
    try:
        assert d.entered.wait(10)  # a's scheduled run is pulling, its lease held
        b.start()
        assert wait_for(lambda: len(b.results) >= 2, timeout=10)  # b's fire and a retry found it held
        gate.set()
        assert wait_for(lambda: any(" was synced by host:1 " in (r.error or "") for r in b.results), timeout=10)
        time.sleep(1.0)  # no retry is left to sync it again
        assert b.scheduler.get_job("good (retry)") is None
    finally:
        gate.set()
        a.shutdown()
        b.shutdown()
    runs = h.store.runs("good")
    assert [(r["worker"], r["status"]) for r in runs] == [("host:1", "succeeded")]
    assert d.pulls == 1 and len(h.users("good")) == 20
    assert [r.status for r in b.results] == ["skipped"] * len(b.results)


def test_replicas_with_the_same_host_and_pid_still_sync_a_tenant_once_per_interval(harness):
    """Worker names were HOST:PID. Container replicas typically all run as PID 1, and with a fixed
    hostname (docker --hostname, a StatefulSet pod recreated under its name) two live workers had
    one name: each took the other's scheduled runs for its own, and every replica synced every
    tenant every interval. Two daemons in one process have one host and PID, as those replicas do."""
    import os
    import socket

    d = Directory(users=people(3))
    h = harness({"good": {**TENANTS["good"], "schedule": "1h"}})
    a, b = (Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(d)) for _ in range(2))
    assert a.runner.worker != b.runner.worker
    # Still says which machine and process ran a run (`dirpull runs`, the log).
    assert a.runner.worker.startswith(f"{socket.gethostname()}:{os.getpid()}")
    a._seen_run = {"good": 0}  # as `start()` leaves it on an empty store
    b._seen_run = {"good": 0}
    first = a.fire("good")
    assert first is not None and first.status == "succeeded", first.error
    second = b.fire("good")
    assert second is not None and second.status == "skipped", second.error
    assert f" was synced by {a.runner.worker} (run {first.run_id}," in (second.error or "")
    assert d.pulls == 1 and len(h.store.runs("good")) == 1


class FailingFirst:
    """A connector factory whose first `failures` pulls fail (a vendor down for a few minutes),
    then serves `directory`; `pulls` is when each pull began (time.monotonic())."""

    def __init__(self, directory: Directory, failures: int) -> None:
        self.directory, self.failures = directory, failures
        self.pulls: list[float] = []

    def __call__(self, tenant, settings) -> ScriptedConnector:
        self.pulls.append(time.monotonic())
        failing = len(self.pulls) <= self.failures
        return ScriptedConnector(Directory(users=[], fail_after_pages=0) if failing else self.directory)


YEARLY = {**TENANTS["good"], "schedule": "cron: 0 0 1 1 *"}  # its next regular fire is months away


@pytest.fixture
def no_jitter(monkeypatch):
    """First fires at once, back-off delays exactly as computed (no ±20%; interval jitter halved)."""
    import dirpull.sync.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "first_fire_delay", lambda schedule: 0.0)
    monkeypatch.setattr(daemon_module.random, "uniform", lambda a, b: (a + b) / 2)


def test_a_failed_cron_run_is_retried_after_its_back_off_not_at_the_next_cron_time(harness, caplog, no_jitter):
    """A nightly cron tenant whose 02:00 run met a vendor outage of a few minutes stayed unsynced
    until 02:00 the next day: the back-off only made later regular fires skip. Now each failure is
    retried at the end of its back-off, which doubles while the tenant keeps failing."""
    caplog.set_level("WARNING", logger="dirpull.daemon")
    d = Directory(users=people(3))
    vendor = FailingFirst(d, failures=3)
    h = harness({"nightly": YEARLY})
    daemon = Daemon(h.config, h.store, backoff_base=0.2, connector_factory=vendor)
    daemon.start()  # never ran: its catch-up fire is now
    try:
        assert wait_for(lambda: h.store.has_succeeded("nightly"), timeout=10)
        assert daemon.scheduler.get_job("nightly").next_run_time - datetime.now(UTC) > timedelta(days=1)
        time.sleep(0.5)
        assert daemon.scheduler.get_job("nightly (retry)") is None  # the success ended the retries
    finally:
        daemon.shutdown()
    assert len(h.users("nightly")) == 3 and daemon.failures == {}
    runs = h.store.runs("nightly")
    assert [(r["trigger"], r["status"]) for r in reversed(runs)] == [("schedule", "failed")] * 3 + [
        ("schedule", "succeeded")
    ]
    gaps = [b - a for a, b in zip(vendor.pulls, vendor.pulls[1:], strict=False)]
    assert len(gaps) == 3 and gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps  # 0.2 s doubling
    # The log says when the next attempt is, at each failure.
    warnings = [r.getMessage() for r in caplog.records if "in a row" in r.getMessage()]
    assert len(warnings) == 3 and all("; trying again at 20" in w for w in warnings), warnings
    assert warnings[2].startswith("tenant nightly: failed 3 time(s) in a row: HTTP 500 from the directory")


def test_the_retry_of_a_failed_run_skips_when_another_worker_synced_the_tenant_meanwhile(harness, no_jitter):
    """Once per interval across workers holds for the retry of a failed run too: if another worker's
    scheduled run succeeded since, the retry does not sync the tenant again."""
    d = Directory(users=people(3))
    vendor = FailingFirst(d, failures=1)
    h = harness({"nightly": YEARLY})
    a = Daemon(h.config, h.store, worker="host:a", backoff_base=1.0, connector_factory=vendor)
    b = Daemon(h.config, h.store, worker="host:b", connector_factory=vendor)
    b._seen_run = {"nightly": 0}  # as `start()` leaves it on an empty store
    a.start()
    try:
        assert wait_for(lambda: [r.status for r in a.results] == ["failed"], timeout=10)
        other = b.fire("nightly")  # b's fire comes before a's retry
        assert other is not None and other.status == "succeeded", other.error
        assert wait_for(lambda: len(a.results) >= 2, timeout=10)  # a's retry, a second later
    finally:
        a.shutdown()
    retry = a.results[1]
    assert retry.status == "skipped" and " was synced by host:b " in (retry.error or ""), retry.error
    assert len(vendor.pulls) == 2 and len(h.store.runs("nightly")) == 2


def test_a_retry_of_a_failed_run_that_finds_the_lease_held_tries_again_once_it_is_free(harness, no_jitter):
    """The retry of a failed run and the retry of a fire that found the lease held are one job of
    the tenant: one leads to the other, and neither is lost."""
    d = Directory(users=people(3))
    vendor = FailingFirst(d, failures=1)
    h = harness({"nightly": YEARLY})
    daemon = Daemon(h.config, h.store, backoff_base=0.5, lease_retry_base=0.3, connector_factory=vendor)
    daemon.start()
    dry_run = "ops-laptop:4242/1a2b3c4d"
    try:
        assert wait_for(lambda: [r.status for r in daemon.results] == ["failed"], timeout=10)
        assert h.store.acquire_lease("nightly", dry_run, timedelta(minutes=5)) is None  # before the retry
        assert wait_for(lambda: len(daemon.results) >= 2, timeout=10)
        assert daemon.results[1].status == "skipped" and daemon.results[1].holder == dry_run
        h.store.release_lease("nightly", dry_run)
        assert wait_for(lambda: h.store.has_succeeded("nightly"), timeout=10)
    finally:
        daemon.shutdown()
    assert len(h.users("nightly")) == 3 and len(vendor.pulls) == 2


def test_a_tenant_failing_for_weeks_still_backs_off_an_hour_and_is_retried(harness, caplog, no_jitter):
    """A tenant left broken fails every hour, the longest back-off: after 1,025 failures in a row
    (six weeks) working out the next back-off raised OverflowError, so each fire ended in a
    traceback and no retry was scheduled."""
    caplog.set_level("WARNING")
    d = Directory(users=people(3), fail_after_pages=0)
    h = harness({"bad": TENANTS["bad"]})
    daemon = Daemon(h.config, h.store, connector_factory=factory(d))
    daemon.failures["bad"] = 1100  # six and a half weeks of hourly failures
    try:
        assert daemon.fire("bad", after_failure=True).status == "failed"
        assert daemon.failures == {"bad": 1101}
        assert 3500 < daemon.retry_at["bad"] - time.monotonic() <= 3600
        assert daemon.scheduler.get_job("bad (retry)") is not None
        assert any("failed 1101 time(s) in a row" in r.getMessage() for r in caplog.records)
    finally:
        daemon.shutdown()


def test_a_failing_tenant_is_retried_at_most_an_hour_apart_with_the_jitter_too(harness, caplog, monkeypatch):
    """The README says a failed run is tried again "±20%, at most an hour apart": the ±20% was
    applied after the hour's cap, so a tenant left broken was tried up to 72 minutes apart."""
    import dirpull.sync.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "first_fire_delay", lambda schedule: 0.0)
    monkeypatch.setattr(daemon_module.random, "uniform", lambda a, b: b)  # the jitter's longest
    caplog.set_level("WARNING")
    d = Directory(users=people(3), fail_after_pages=0)
    h = harness({"bad": TENANTS["bad"]})
    daemon = Daemon(h.config, h.store, connector_factory=factory(d))
    daemon.failures["bad"] = 20
    try:
        assert daemon.fire("bad", after_failure=True).status == "failed"
        assert 3500 < daemon.retry_at["bad"] - time.monotonic() <= 3600
        retry = daemon.scheduler.get_job("bad (retry)")
        assert retry is not None and (retry.trigger.run_date - datetime.now(UTC)).total_seconds() <= 3600
    finally:
        daemon.shutdown()


def test_regular_fires_during_a_back_off_still_skip_and_leave_the_retry_pending(harness, caplog, no_jitter):
    """A tenant on a 1 s interval with a 2 s back-off: the fires in between skip, as before, and the
    next attempt is at the end of the back-off."""
    caplog.set_level("INFO", logger="dirpull.daemon")
    d = Directory(users=people(3))
    vendor = FailingFirst(d, failures=1)
    h = harness({"good": TENANTS["good"]})
    daemon = Daemon(h.config, h.store, backoff_base=2.0, connector_factory=vendor)
    daemon.start()
    try:
        assert wait_for(lambda: h.store.has_succeeded("good"), timeout=10)
    finally:
        daemon.shutdown()
    assert vendor.pulls[1] - vendor.pulls[0] >= 1.9, vendor.pulls
    assert any(r.getMessage().startswith("tenant good: backing off after 1 failures") for r in caplog.records)


def test_no_retry_of_a_failed_run_after_the_daemon_stops(harness, no_jitter):
    d = Directory(users=people(3))
    vendor = FailingFirst(d, failures=1)
    h = harness({"nightly": YEARLY})
    daemon = Daemon(h.config, h.store, backoff_base=0.5, connector_factory=vendor)
    daemon.start()
    try:
        assert wait_for(lambda: [r.status for r in daemon.results] == ["failed"], timeout=10)
        # (the result is kept before the fire schedules its retry)
        assert wait_for(lambda: daemon.scheduler.get_job("nightly (retry)") is not None, timeout=10)
    finally:
        t0 = time.monotonic()
        daemon.shutdown()
    # A pending retry does not hold the stop (were it run, the pulls below would say so); only a
    # hang is told by the time, so a loaded CI machine has room.
    assert time.monotonic() - t0 < 15
    time.sleep(1.0)
    assert len(vendor.pulls) == 1 and [r["status"] for r in h.store.runs("nightly")] == ["failed"]


@pytest.mark.timeout(60)
def test_a_stop_that_meets_a_failed_fire_adding_its_retry_does_not_hang(harness, no_jitter):
    """A failed fire past its "stopping?" check as the stop came added its retry while the stop
    waited for the running fires holding APScheduler's job-store lock, which the addition waits
    for: the daemon never stopped (SIGTERM did nothing; CI caught it as a 300 s test timeout)."""
    d = Directory(users=people(3))
    vendor = FailingFirst(d, failures=1)
    h = harness({"nightly": YEARLY})
    daemon = Daemon(h.config, h.store, backoff_base=0.5, connector_factory=vendor)
    reached, go = threading.Event(), threading.Event()
    add_job = daemon.scheduler.add_job

    def add_job_when_let(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("id") == "nightly (retry)":
            reached.set()
            go.wait(10)
        return add_job(*args, **kwargs)

    daemon.scheduler.add_job = add_job_when_let  # type: ignore[method-assign]
    daemon.start()
    stopper = threading.Thread(target=daemon.shutdown, daemon=True)
    try:
        assert reached.wait(10), "the failed fire never scheduled its retry"
        stopper.start()
        assert wait_for(daemon.stop_event.is_set, timeout=5)
        time.sleep(0.3)  # the stop now waits for the running fire
        go.set()
        stopper.join(10)
        assert not stopper.is_alive(), "the daemon's stop hung on the fire adding its retry"
    finally:
        go.set()
    time.sleep(1.0)  # the retry was due at once: it never runs
    assert len(vendor.pulls) == 1


def _write_config(path, store_url: str, tenants: dict[str, dict]) -> None:
    """`tenants` as a configuration file's `[tenants.X]` tables (values as TOML literals)."""
    import json

    lines = ["[store]", f"url = {json.dumps(store_url)}"]
    for name, table in tenants.items():
        lines += [f"[tenants.{name}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")


def _daemon_on_file(h: Any, tmp_path: Path, tenants: dict[str, dict], **kwargs: Any) -> tuple[Daemon, Any]:
    """A daemon on a configuration file holding `tenants`, as `dirpull run` loads it, and the
    function that rewrites that file (before a `reload()`, as an operator before SIGHUP)."""
    from dirpull.config import load_config

    path = tmp_path / "dirpull.toml"

    def rewrite(tables: dict[str, dict]) -> None:
        _write_config(path, h.config.store.url, tables)

    rewrite(tenants)
    return Daemon(load_config(path, isolate_tenants=True), h.store, **kwargs), rewrite


def test_a_reload_gives_a_tenant_its_new_settings_at_its_next_sync_and_ends_its_back_off(
    harness, caplog, tmp_path, no_jitter
):
    """SIGHUP (`Daemon.reload`): a tenant's changed settings are used from its next sync on, while
    its sync under way goes on with those it started with; a tenant backing off after failures is
    tried again at its next fire once its settings changed (the change may be the fix), not after
    the back-off (an hour, after a few failures)."""
    caplog.set_level("INFO", logger="dirpull.daemon")
    gate = threading.Event()
    dirs = {"good": Directory(users=people(20), gate=gate), "bad": Directory(users=people(3))}
    used: list[tuple[str, str]] = []

    def connector(tenant: str, settings) -> ScriptedConnector:
        used.append((tenant, settings.company_domain))
        dirs[tenant].fail_after_pages = 0 if settings.company_domain == "wrong" else None
        return ScriptedConnector(dirs[tenant])

    tenants = {"good": TENANTS["good"], "bad": {**TENANTS["bad"], "company_domain": "wrong"}}
    h = harness(tenants)
    daemon, rewrite = _daemon_on_file(h, tmp_path, tenants, backoff_base=600.0, connector_factory=connector)
    daemon.start()
    try:
        assert dirs["good"].entered.wait(10)  # good's first sync, held inside its pull
        assert wait_for(lambda: daemon.failures == {"bad": 1})
        rewrite({"good": {**TENANTS["good"], "company_domain": "acme2"}, "bad": TENANTS["bad"]})
        daemon.reload()
        gate.set()
        assert wait_for(lambda: h.store.has_succeeded("bad"), timeout=10)  # at its next 1 s fire
        assert wait_for(lambda: ("good", "acme2") in used)
    finally:
        daemon.shutdown()
    assert [d for t, d in used if t == "bad"][:2] == ["wrong", "acme"], used
    assert [d for t, d in used if t == "good"][:2] == ["acme", "acme2"], used
    first_good = next(r for r in daemon.results if r.tenant == "good")
    assert first_good.status == "succeeded"  # the reload did not cut it off
    assert "bad" not in daemon.failures
    lines = [r.getMessage() for r in caplog.records]
    assert "configuration reloaded: 2 tenants scheduled (changed: good, bad)" in lines, lines


def test_a_tenant_removed_by_a_reload_while_it_syncs_ends_that_sync_and_is_not_tried_again(
    harness, caplog, tmp_path, no_jitter
):
    """A removed tenant's sync under way is not cut off: one that succeeds applies (it failed, its
    guard looked up in the new configuration), one that fails is not retried after a back-off as
    it was when the tenant was still configured; no fire of either follows."""
    caplog.set_level("INFO", logger="dirpull.daemon")
    gate = threading.Event()
    dirs = {
        "good": Directory(users=people(3)),
        "bad": Directory(users=people(20), gate=gate, fail_after_pages=1),
        "gone": Directory(users=people(20), gate=gate),
    }
    tenants = {**TENANTS, "gone": TENANTS["good"]}
    h = harness(tenants)
    daemon, rewrite = _daemon_on_file(
        h, tmp_path, tenants,
        backoff_base=0.2, connector_factory=lambda t, s: ScriptedConnector(dirs[t]),
    )
    daemon.start()
    try:
        assert dirs["bad"].entered.wait(10) and dirs["gone"].entered.wait(10)  # their syncs are under way
        rewrite({"good": TENANTS["good"]})
        daemon.reload()
        assert daemon.scheduler.get_job("bad") is None and daemon.scheduler.get_job("gone") is None
        gate.set()
        assert wait_for(lambda: {r.tenant for r in daemon.results} >= {"bad", "gone"})
        pulls = dirs["good"].pulls
        assert wait_for(lambda: dirs["good"].pulls >= pulls + 2)  # the other one syncs on
    finally:
        daemon.shutdown()
    assert [r.status for r in daemon.results if r.tenant == "gone"] == ["succeeded"]
    assert len(h.users("gone")) == 20
    assert [r.status for r in daemon.results if r.tenant == "bad"] == ["failed"]
    assert dirs["bad"].pulls == 1 and "bad" not in daemon.failures
    assert daemon.scheduler.get_job("bad (retry)") is None
    lines = [r.getMessage() for r in caplog.records]
    assert "configuration reloaded: 1 tenants scheduled (removed: bad, gone)" in lines, lines
    assert "tenant bad: failed: HTTP 500 from the directory (scripted); no longer scheduled (configuration " \
        "reloaded): not tried again" in lines, lines  # fmt: skip


def test_a_cron_run_that_fails_after_a_reload_changed_its_tenant_is_still_retried(harness, caplog, tmp_path, no_jitter):
    """A nightly run failed while a SIGHUP changed the tenant's settings (here the fix of its
    wrong company_domain; it could be any key): the failure was put down to the old settings and
    not retried, "its next fire uses them", and for a cron tenant that fire is the next night's."""
    caplog.set_level("WARNING", logger="dirpull.daemon")
    gate = threading.Event()
    used: list[str] = []

    def connector(tenant: str, settings) -> ScriptedConnector:
        used.append(settings.company_domain)
        wrong = settings.company_domain == "wrong"  # fails once the reload has happened
        return ScriptedConnector(Directory(users=people(20), gate=gate if wrong else None,
                                           fail_after_pages=1 if wrong else None))  # fmt: skip

    h = harness({"nightly": YEARLY})
    daemon, rewrite = _daemon_on_file(
        h, tmp_path, {"nightly": {**YEARLY, "company_domain": "wrong"}},
        backoff_base=0.2, connector_factory=connector,
    )
    daemon.start()  # never ran: its catch-up fire is now
    try:
        assert wait_for(lambda: used == ["wrong"])
        time.sleep(0.2)  # inside its pull
        rewrite({"nightly": YEARLY})
        daemon.reload()
        gate.set()
        assert wait_for(lambda: h.store.has_succeeded("nightly"), timeout=10)
    finally:
        gate.set()
        daemon.shutdown()
    assert used == ["wrong", "acme"] and len(h.users("nightly")) == 20
    assert daemon.failures == {}
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("tenant nightly: failed with the settings it started with (reloaded since): HTTP 500")
        for line in lines
    ), lines


def test_a_reload_that_fixes_a_backing_off_cron_tenant_tries_it_soon_not_after_the_back_off(
    harness, caplog, tmp_path, no_jitter
):
    """A nightly tenant failing on a mistake in its settings backs off (up to an hour between
    tries). The operator fixes the table and reloads: the back-off was reset, but the retry stayed
    where the back-off had put it, so the fixed tenant waited up to an hour; a restart syncs it at once."""

    used: list[str] = []

    def connector(tenant: str, settings) -> ScriptedConnector:
        used.append(settings.company_domain)
        wrong = settings.company_domain == "wrong"
        return ScriptedConnector(Directory(users=people(3), fail_after_pages=0 if wrong else None))

    h = harness({"nightly": YEARLY})
    daemon, rewrite = _daemon_on_file(
        h, tmp_path, {"nightly": {**YEARLY, "company_domain": "wrong"}},
        backoff_base=600.0, connector_factory=connector,
    )
    daemon.start()  # never ran: its catch-up fire is now
    try:
        assert wait_for(lambda: daemon.failures == {"nightly": 1})
        rewrite({"nightly": YEARLY})
        daemon.reload()
        assert wait_for(lambda: h.store.has_succeeded("nightly"), timeout=10)
    finally:
        daemon.shutdown()
    assert used == ["wrong", "acme"] and len(h.users("nightly")) == 3
    assert daemon.scheduler.get_job("nightly (retry)") is None


def test_a_tenant_removed_by_a_reload_as_its_run_fails_keeps_no_retry(harness, tmp_path, no_jitter):
    """The retry of a failed run was added after the fire let go of the daemon's lock: a reload
    (SIGHUP) that removed the tenant in between found no retry to remove, and one was left pending
    for a tenant no longer configured (fired later, or synced it again if the name came back)."""
    tenants = {"good": {**TENANTS["good"], "schedule": "1h"}, "gone": YEARLY}
    dirs = {"good": Directory(users=people(3)), "gone": Directory(users=people(3), fail_after_pages=0)}
    h = harness(tenants)
    daemon, rewrite = _daemon_on_file(
        h, tmp_path, tenants,
        backoff_base=600.0, connector_factory=lambda t, s: ScriptedConnector(dirs[t]),
    )
    failing, reloaded = threading.Event(), threading.Event()
    retry_failed = daemon._retry_failed

    def late(*args, **kwargs) -> None:  # the SIGHUP lands just as the failed run is being retried
        failing.set()
        reloaded.wait(1.0)
        retry_failed(*args, **kwargs)

    daemon._retry_failed = late
    daemon.start()
    try:
        assert failing.wait(10)
        rewrite({"good": tenants["good"]})
        daemon.reload()
        reloaded.set()
        assert wait_for(lambda: any(r.tenant == "gone" for r in daemon.results))
        time.sleep(0.2)
        assert daemon.scheduler.get_job("gone (retry)") is None
        assert "gone" not in daemon.failures and "gone" not in daemon.retry_at
    finally:
        reloaded.set()
        daemon.shutdown()


def test_a_tenant_put_on_a_cron_schedule_by_a_reload_before_it_ever_synced_still_syncs_soon(
    harness, tmp_path, monkeypatch
):
    """A tenant added on "1h", its first fire still a few seconds away, is moved to a nightly
    cron by a reload: it waited for the cron time, where a restart (or adding it on the cron
    schedule) syncs a cron tenant that never synced at once."""
    import dirpull.sync.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "first_fire_delay", lambda schedule: 5.0)
    h = harness({"x": {**TENANTS["good"], "schedule": "1h"}})
    daemon, rewrite = _daemon_on_file(
        h, tmp_path, {"x": {**TENANTS["good"], "schedule": "1h"}},
        connector_factory=lambda t, s: ScriptedConnector(Directory(users=people(1))),
    )
    daemon.scheduler.start = functools.partial(daemon.scheduler.start, paused=True)  # run none
    daemon.start()
    try:
        rewrite({"x": YEARLY})
        daemon.reload()
        first = daemon.scheduler.get_job("x").next_run_time - datetime.now(UTC)
    finally:
        daemon.shutdown()
    assert first < timedelta(seconds=6), first


def test_a_reload_landing_as_a_fire_starts_its_sync_neither_fails_it_nor_swaps_its_settings(
    harness, caplog, tmp_path, no_jitter
):
    """The fire checked the tenant against the configuration, then the runner read it again: a
    SIGHUP in between that removed the tenant made the run an ERROR ("sync could not run: unknown
    tenant"), and one that changed it ran the new settings as if they were the old ones (a failure
    of the fix then counted against nothing and was put down to the replaced settings)."""
    caplog.set_level("WARNING", logger="dirpull.daemon")
    tenants = {"good": {**TENANTS["good"], "schedule": "1h"}, "gone": {**TENANTS["good"], "schedule": "1h"}}
    used: list[tuple[str, str]] = []

    def connector(tenant: str, settings) -> ScriptedConnector:
        used.append((tenant, settings.company_domain))
        return ScriptedConnector(Directory(users=people(3)))

    h = harness(tenants)
    daemon, rewrite = _daemon_on_file(h, tmp_path, {"gone": tenants["gone"]}, connector_factory=connector)
    sync = daemon.runner.sync

    def racing(tenant: str, **kwargs):  # the SIGHUP lands as the fire hands the tenant to the runner
        rewrite({"good": tenants["good"]})
        daemon.reload()
        return sync(tenant, **kwargs)

    daemon.runner.sync = racing
    try:
        result = daemon.fire("gone")
    finally:
        daemon.shutdown()
    assert result is not None and result.status == "succeeded", result.error  # a run already under way
    assert used == [("gone", "acme")] and len(h.users("gone")) == 3
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_the_daemon_syncs_an_interval_tenant_on_a_machine_whose_tz_is_a_posix_rule(harness, monkeypatch):
    """TZ="JST-9" or "UTC0" is a valid POSIX zone that every C program honours, but no zoneinfo
    name: APScheduler's interval trigger took the machine's zone by default (tzlocal), which refuses
    such a TZ, so `dirpull run` failed at start on it though schedules are in UTC and intervals are
    elapsed seconds whatever the zone."""
    import tzlocal.unix

    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    monkeypatch.setattr(tzlocal.unix, "_cache_tz", None)  # tzlocal reads TZ once per process
    monkeypatch.setattr(tzlocal.unix, "_cache_tz_name", None)
    try:
        d = Directory(users=people(2))
        h = harness({"good": TENANTS["good"]})
        daemon = Daemon(h.config, h.store, connector_factory=lambda t, s: ScriptedConnector(d))
        daemon.start()
        try:
            assert wait_for(lambda: any(r["status"] == "succeeded" for r in h.store.runs("good")), timeout=8)
        finally:
            daemon.shutdown()
    finally:
        monkeypatch.undo()
        time.tzset()
        tzlocal.unix._cache_tz = None
        tzlocal.unix._cache_tz_name = None


def test_an_interval_tenant_fires_once_per_interval_however_long_the_daemon_runs(harness):
    """The jitter (up to 10%, at most 30 s) was added to each fire counted from the previous fire,
    jitter included: it piled up, so a "15m" tenant synced every 15 min 15 s on average, 8 hours
    behind its schedule after three weeks, and a "30s" one 5% less often than configured. Each fire
    now lands within the jitter of its own slot, one interval after the previous slot."""
    d = Directory(users=people(2))
    h = harness({"good": {**TENANTS["good"], "schedule": "15m"}}, connector_factory=factory(d))
    daemon = Daemon(h.config, h.store, connector_factory=factory(d))
    daemon.scheduler.start = functools.partial(daemon.scheduler.start, paused=True)  # none run
    daemon.start()
    try:
        job = daemon.scheduler.get_job("good")
        fires = [job.next_run_time]
        while len(fires) <= 2000:  # three weeks of fires, each computed as APScheduler does
            fires.append(job.trigger.get_next_fire_time(fires[-1], fires[-1]))
    finally:
        daemon.shutdown()
    interval, jitter = timedelta(minutes=15), timedelta(seconds=30)
    assert fires[-1] - fires[0] - 2000 * interval <= jitter, fires[-1] - fires[0] - 2000 * interval
    assert all(interval - jitter <= b - a <= interval + jitter for a, b in itertools.pairwise(fires))


def test_interval_tenants_and_retries_still_come_on_time_after_the_clock_is_stepped_back(
    harness, monkeypatch, no_jitter
):
    """A wall clock stepped back (NTP correcting a clock that ran fast, a VM restored from a
    snapshot) left every interval tenant's next fire, and a failed run's retry, that much in the
    future: an hour's step, an hour without a sync of a "2s" tenant or a retry due in a second."""
    import apscheduler.schedulers.base as aps_base

    import dirpull.sync.daemon as daemon_module
    from dirpull.sync.daemon import _QuietStopScheduler

    dirs = {"good": Directory(users=people(2)), "bad": Directory(users=people(2), fail_after_pages=0)}
    tenants = {"good": {**TENANTS["good"], "schedule": "2s"}, "bad": {**TENANTS["bad"], "schedule": "1h"}}
    h = harness(tenants)
    stepped = [timedelta()]

    class WallClock(datetime):  # the machine's wall clock; the monotonic one goes on
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.now(tz) + stepped[0]

    monkeypatch.setattr(aps_base, "datetime", WallClock)  # the scheduler's
    monkeypatch.setattr(daemon_module, "datetime", WallClock)  # the retries'
    monkeypatch.setattr(_QuietStopScheduler, "max_sleep", 0.2, raising=False)  # a minute in production
    daemon = Daemon(h.config, h.store, backoff_base=1.5, connector_factory=lambda t, s: ScriptedConnector(dirs[t]))
    daemon.start()
    try:
        assert wait_for(lambda: dirs["good"].pulls >= 1 and dirs["bad"].pulls == 1)
        stepped[0] = -timedelta(hours=1)  # as the bad tenant's retry waits
        good = dirs["good"].pulls
        assert wait_for(lambda: dirs["good"].pulls >= good + 2, timeout=8), dirs["good"].pulls
        assert wait_for(lambda: dirs["bad"].pulls >= 2, timeout=5)
    finally:
        daemon.shutdown()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_daemon_whose_sqlite_file_is_deleted_or_replaced_fails_its_syncs_instead_of_losing_them(
    harness, caplog, store_kind, how
):
    """The pooled connections went on writing to the file the daemon opened: every sync
    "succeeded" into a file no one could read any more (deleted), or one moved aside while the
    file in its place (a backup restored over it) saw no sync, and the log said nothing."""
    if store_kind != "sqlite":
        pytest.skip("a SQLite store's file")
    d = Directory(users=people(2))
    h = harness({"good": TENANTS["good"]})
    daemon = Daemon(h.config, h.store, backoff_base=60.0, connector_factory=factory(d))
    daemon.start()
    try:
        assert wait_for(lambda: any(r.status == "succeeded" for r in daemon.results))
        path = Path(h.store.engine.url.database)
        if how == "replaced":  # moved aside, a copy in its place
            path.rename(path.with_name("moved-aside.db"))
            path.write_bytes(path.with_name("moved-aside.db").read_bytes())
        else:
            path.unlink()
        assert wait_for(lambda: daemon.results[-1].status == "failed")
    finally:
        daemon.shutdown()
    assert f"its file was {how} since this process opened it" in daemon.results[-1].error
    assert any("restart dirpull" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_failed_run_the_store_could_not_take_is_recorded_with_its_error_once_the_store_is_back(
    harness, store_kind
):
    """A run that failed while the store was out (its write lock held by another process past the
    busy timeout) stayed `running`; the tenant's next run marked it "interrupted: worker stopped
    or lost its lease", so the history and `dirpull status` read a restart where the vendor had
    failed, and the error was lost."""
    import sqlite3

    if store_kind != "sqlite":
        pytest.skip("a SQLite store's write lock, held from another process")
    gate = threading.Event()
    d = Directory(users=people(30), fail_after_pages=1, gate=gate)
    h = harness({"good": TENANTS["good"]}, store={"connect_timeout": 0.2}, connector_factory=factory(d))
    first = threading.Thread(target=h.sync, args=("good",), kwargs={"trigger": "schedule"})
    first.start()
    assert d.entered.wait(10)
    other = sqlite3.connect(h.store.engine.url.database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the store's write lock, held as the run fails
        gate.set()
        first.join(15)
        assert not first.is_alive()
    finally:
        other.execute("ROLLBACK")
        other.close()
    d.fail_after_pages, d.gate = None, None
    assert h.sync("good", trigger="schedule").status == "succeeded"
    runs = h.store.runs("good")
    assert [r["status"] for r in runs] == ["succeeded", "failed"]
    assert runs[1]["error"] == "HTTP 500 from the directory (scripted)"


def test_a_retry_scheduled_just_after_the_clock_is_stepped_back_still_waits_its_back_off(
    harness, monkeypatch, no_jitter
):
    """A retry scheduled after the wall clock was stepped back, before the scheduler's next pass
    noticed the step, was counted on the new clock already and then moved back once more by that
    pass: an hour's step, and a failed run was retried at once instead of after its back-off."""
    import apscheduler.schedulers.base as aps_base

    import dirpull.sync.daemon as daemon_module

    stepped = [timedelta()]

    class WallClock(datetime):  # the machine's wall clock; the monotonic one goes on
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.now(tz) + stepped[0]

    def step_back(_pages: int) -> None:  # NTP steps the clock while the run reads
        stepped[0] = -timedelta(hours=1)

    bad = Directory(users=people(2), page_size=1, fail_after_pages=1, on_page=step_back)
    h = harness({"bad": {**TENANTS["bad"], "schedule": "1h"}})
    monkeypatch.setattr(aps_base, "datetime", WallClock)  # the scheduler's
    monkeypatch.setattr(daemon_module, "datetime", WallClock)  # the retries'
    daemon = Daemon(h.config, h.store, backoff_base=30.0, connector_factory=lambda t, s: ScriptedConnector(bad))
    daemon.start()
    try:
        assert wait_for(lambda: bad.pulls == 1 and daemon.failures.get("bad", 0) == 1)
        time.sleep(2)  # the retry is due in 30 s
        assert bad.pulls == 1
    finally:
        daemon.shutdown()



@pytest.mark.postgres  # a server slow to answer: what keeps a daemon in its start-up long enough
@pytest.mark.timeout(120)
def test_a_second_sigterm_while_the_daemon_opens_its_store_exits_at_once(store_url, tmp_path):
    """A second SIGTERM or Ctrl-C ends a stop at once (exit 143 / 130). While `dirpull run` still
    opened its store (a server slow to answer) the second one did nothing: the process waited for
    the server however many signals came."""
    import signal

    with _daemon_held_at_its_store(store_url, tmp_path) as (proc, _relay):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)  # the server is held for 30 s
        assert proc.returncode == 143, out
        assert "SIGTERM again while stopping: exiting now" in out, out


