"""`dirpull demo` end to end: five emulators, the real daemon, events printed for every tenant."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from typing import Any

from typer.testing import CliRunner

from dirpull.cli import app
from dirpull.demo import run_demo
from dirpull.emulators.cluster import TENANT_NAMES, Cluster


def test_demo_syncs_every_provider_and_prints_events(tmp_path, capsys):
    levels = {name: logging.getLogger(name).level for name in ("dirpull.sync", "dirpull.daemon")}
    assert run_demo(people=20, duration=9, schedule="2s", workdir=tmp_path) == 0
    # Quieted for the show only: later tests in the process read these loggers' INFO lines.
    assert {name: logging.getLogger(name).level for name in levels} == levels
    out = capsys.readouterr().out
    for tenant in TENANT_NAMES.values():
        assert f"[{tenant}] run" in out, f"no events printed for {tenant}"
    assert "user.created" in out and "directory change:" in out
    assert (tmp_path / "dirpull.toml").is_file() and (tmp_path / "demo.db").is_file()
    # the config holds every emulator's secrets inline
    assert oct((tmp_path / "dirpull.toml").stat().st_mode & 0o777) == "0o600"


def test_a_run_the_demos_stop_cuts_off_is_not_listed_as_a_failure(tmp_path, capsys, monkeypatch):
    """The summary at the demo's end said `failed 1` and `failure demo-workday: interrupted: the
    worker is stopping; nothing applied` for a run under way as the demo stopped: no failure, as
    `dirpull status` has it (`interrupted`)."""
    start = Cluster.start

    def with_a_slow_workday(self: Cluster, *args: Any, **kwargs: Any) -> None:
        start(self, *args, **kwargs)
        # Each report answer takes longer than the demo runs: its stop finds the run waiting.
        self.emulators["workday"].faults.delay = 4.0

    monkeypatch.setattr(Cluster, "start", with_a_slow_workday)
    assert run_demo(people=5, duration=2.5, schedule="1s", workdir=tmp_path) == 0
    summary = capsys.readouterr().out.split("runs by tenant:")[1]
    workday = next(line for line in summary.splitlines() if TENANT_NAMES["workday"] in line)
    assert "interrupted 1" in workday and "failed" not in workday, summary
    assert "failure" not in summary, summary


def test_a_run_of_more_events_than_one_read_is_printed_once_with_its_count(tmp_path, capsys):
    """The demo read the log 5,000 events at a time and printed each read's events by run: a first
    sync of a few thousand people (the README suggests `--people 5000`) showed as several
    `[demo-okta] run 3: 5000 events`, the same run each time."""
    assert run_demo(people=2500, duration=12, schedule="30s", workdir=tmp_path) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"^\[(\S+)\] run (\d+): (\d+) events$", out, re.M)
    assert len(headers) == len({(tenant, run) for tenant, run, _ in headers}), headers
    with sqlite3.connect(tmp_path / "demo.db") as db:
        stored = {(t, str(r)): n for t, r, n in db.execute("SELECT tenant, run_id, count(*) FROM events GROUP BY 1, 2")}
    printed = {(t, r): int(n) for t, r, n in headers}
    assert max(printed.values()) > 5000  # a run larger than one read was
    # A run committed after the demo's last read is in the store only.
    assert printed == {run: n for run, n in stored.items() if run in printed}


def test_the_rest_of_a_runs_events_is_given_as_a_command_to_paste(tmp_path, capsys):
    """It said `… 82 more (dirpull -c … events demo-okta --after …)`: the file and the seq left out."""
    # Long enough for a first sync on a busy CI machine (with 5 s none had ended there).
    assert run_demo(people=20, duration=15, schedule="30s", workdir=tmp_path) == 0
    out = capsys.readouterr().out
    config = tmp_path.resolve() / "dirpull.toml"
    hint = rf"    … (\d+) more: dirpull -c {re.escape(str(config))} events (\S+) --after (\d+)$"
    rest = re.findall(rf"^\[(\S+)\] run (\d+): \d+ events\n(?:    #.*\n)+{hint}", out, re.M)
    assert rest, out
    for tenant, run, more, named, after in rest:
        assert named == tenant
        listed = CliRunner().invoke(app, ["-c", str(config), "events", tenant, "--after", after, "--json"])
        events = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [e["run_id"] for e in events[: int(more)]] == [int(run)] * int(more), (tenant, listed.output)
