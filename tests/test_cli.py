"""The `dirpull` command end to end: real config file, real store, the BambooHR emulator over HTTP."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from dirpull.cli import app
from dirpull.config import ConfigError, load_config
from dirpull.emulators.bamboohr_api import BambooHREmulator
from dirpull.emulators.cluster import Cluster
from dirpull.emulators.org import Org
from dirpull.storage import schema
from dirpull.storage.store import HEAD_REVISION, Store

if TYPE_CHECKING:
    from dirpull.sync.daemon import Daemon

# Every test that uses a store runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.stores

EVENT_KEYS = {"seq", "type", "tenant", "run_id", "data", "previous_attributes", "created_at"}
# In the contract's order (CONTRACT.md: Objects), as `users --json` prints them.
USER_ORDER = [
    "idp_id",
    "username",
    "email",
    "emails",
    "first_name",
    "last_name",
    "display_name",
    "state",
    "job_title",
    "department",
    "employee_number",
    "manager_idp_id",
    "custom_attributes",
    "raw_attributes",
    "created_at",
    "updated_at",
]
USER_KEYS = set(USER_ORDER)
GROUP_ORDER = ["idp_id", "name", "description", "email", "raw_attributes", "created_at", "updated_at"]


@pytest.fixture
def env(tmp_path: Path, store_url: str) -> Iterator[dict]:
    org = Org.generate(60, seed=3)
    emulator = BambooHREmulator(org)
    emulator.start()
    try:
        table = emulator.tenant_config("hr", tmp_path)
        secret = table["api_key"]
        (tmp_path / "key").write_text(secret + "\n")
        table["api_key"] = "file:key"
        config = tmp_path / "dirpull.toml"
        lines = [
            "[store]",
            f'url = "{store_url}"',
            "[defaults.guard]",
            "max_percent = 10",
            "min_count = 5",
            "[tenants.hr]",
        ]
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
        config.write_text("\n".join(lines) + "\n")
        yield {"config": str(config), "org": org, "emulator": emulator, "secret": secret, "tmp": tmp_path}
    finally:
        emulator.stop()


def run(env: dict, *args: str) -> object:
    result = CliRunner().invoke(app, ["--config", env["config"], *args], catch_exceptions=False)
    assert env["secret"] not in result.stdout + result.stderr
    return result


def test_an_empty_dirpull_config_variable_is_refused_not_taken_for_the_default_file(env, tmp_path, monkeypatch):
    """A unit whose DIRPULL_CONFIG came out empty read ./dirpull.toml from the working folder, another
    configuration (other tenants, another store) than the one meant, without a word."""
    monkeypatch.chdir(tmp_path)
    fallback = tmp_path / "dirpull.toml"  # the file the fallback would read
    if not fallback.exists():
        fallback.write_text(Path(env["config"]).read_text())
    assert run(env, "sync", "hr").exit_code == 0
    monkeypatch.setenv("DIRPULL_CONFIG", "")
    r = CliRunner().invoke(app, ["users", "hr"], catch_exceptions=False)
    assert (r.exit_code, r.stdout) == (2, ""), r.output
    assert r.stderr == "dirpull: $DIRPULL_CONFIG is set but empty; give it the configuration file's path, or unset " \
        "it to use ./dirpull.toml\n"
    assert CliRunner().invoke(app, ["--config", "dirpull.toml", "users", "hr"]).exit_code == 0  # --config wins
    monkeypatch.delenv("DIRPULL_CONFIG")
    assert CliRunner().invoke(app, ["users", "hr"]).exit_code == 0


def test_an_empty_config_option_is_refused_not_taken_for_the_default_file(env, tmp_path, monkeypatch):
    """`dirpull --config "$CFG"` with $CFG empty read $DIRPULL_CONFIG, else ./dirpull.toml from the
    working folder: another configuration than the one meant, without a word."""
    monkeypatch.chdir(tmp_path)
    fallback = tmp_path / "dirpull.toml"  # the file the fallback would read
    if not fallback.exists():
        fallback.write_text(Path(env["config"]).read_text())
    assert run(env, "sync", "hr").exit_code == 0
    for value in ("", " "):
        r = CliRunner().invoke(app, ["--config", value, "users", "hr"], catch_exceptions=False)
        assert (r.exit_code, r.stdout) == (2, ""), r.output
        assert r.stderr == "dirpull: --config is empty; give the configuration file's path, or leave the option " \
            "out to use $DIRPULL_CONFIG or ./dirpull.toml\n"
    assert CliRunner().invoke(app, ["users", "hr"]).exit_code == 0


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_sync_then_query_everything_as_json(env):
    r = run(env, "sync", "hr")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "hr: succeeded (full)" in r.stdout

    users = jsonl(run(env, "users", "hr", "--json").stdout)
    visible = [p for p in env["org"].people.values() if not p.deleted]
    assert len(users) == len(visible)
    assert set(users[0]) == USER_KEYS
    inactive = jsonl(run(env, "users", "hr", "--state", "inactive", "--json").stdout)
    assert inactive and all(u["state"] == "inactive" for u in inactive)
    assert len(inactive) == sum(1 for p in visible if p.state == "inactive")

    events = jsonl(run(env, "events", "hr", "--json").stdout)
    assert len(events) == len(users) and all(set(e) == EVENT_KEYS for e in events)
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert {e["type"] for e in events} == {"user.created"}
    after = jsonl(run(env, "events", "hr", "--after", str(events[9]["seq"]), "--limit", "5", "--json").stdout)
    assert [e["seq"] for e in after] == [e["seq"] for e in events[10:15]]

    runs = jsonl(run(env, "runs", "hr", "--json").stdout)
    assert runs[0]["status"] == "succeeded" and runs[0]["trigger"] == "manual"

    status = jsonl(run(env, "status", "--json").stdout)
    assert status[0]["tenant"] == "hr" and status[0]["result"] == "succeeded" and status[0]["provider"] == "bamboohr"
    plain = run(env, "status")
    assert plain.exit_code == 0 and "hr\tbamboohr" in plain.stdout


def test_a_dry_run_without_a_store_creates_none(env, store_url, tmp_path, monkeypatch):
    """`dirpull sync T --dry-run` promises to apply nothing, but on a store that did not exist it
    created the SQLite file: run from the wrong folder with a relative URL, a stray store was left
    there. It plans against an empty store instead (every user a creation, as the first sync
    would find), says there is none, and creates nothing; the real sync then makes the store."""
    if not store_url.startswith("sqlite"):
        pytest.skip("a SQLite file")
    monkeypatch.chdir(tmp_path)
    config = Path(env["config"])
    config.write_text(config.read_text().replace(store_url, "sqlite:///data.db"))
    r = run(env, "sync", "hr", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / "data.db").exists()
    assert r.stderr.startswith(
        f"dirpull: no store at {tmp_path / 'data.db'} (the store url's data.db is relative to the current folder, "
        f"{tmp_path}) yet: planned against an empty one; nothing created\n"
    ), r.stderr
    visible = sum(1 for p in env["org"].people.values() if not p.deleted)
    assert "hr: planned (full)" in r.stdout and f"users_created {visible}" in r.stdout, r.stdout
    planned = jsonl(run(env, "sync", "hr", "--dry-run", "--json").stdout)
    assert planned[0]["status"] == "planned" and len(planned) == 1 + visible
    assert not (tmp_path / "data.db").exists()
    assert run(env, "sync", "hr").exit_code == 0
    assert len(jsonl(run(env, "users", "hr", "--json").stdout)) == visible


def test_a_dry_run_on_an_empty_database_leaves_it_empty(env, store_url):
    """The database just made for dirpull (README: create it, then `dirpull sync T --dry-run`), or
    the wrong one named: the dry run that promises to apply nothing created every table of
    dirpull's schema in it. It plans against an empty store instead and leaves the database as it
    was; the real sync then makes the schema."""
    engine = sa.create_engine(store_url)
    if store_url.startswith("sqlite"):
        with engine.begin() as conn:  # an empty SQLite file: a database with no tables
            conn.exec_driver_sql("VACUUM")
    r = run(env, "sync", "hr", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "(the database has no dirpull schema) yet: planned against an empty one; nothing created" in r.stderr
    visible = sum(1 for p in env["org"].people.values() if not p.deleted)
    assert "hr: planned (full)" in r.stdout and f"users_created {visible}" in r.stdout, r.stdout
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()
    assert run(env, "sync", "hr").exit_code == 0
    assert len(jsonl(run(env, "users", "hr", "--json").stdout)) == visible


def test_a_killed_dry_runs_scratch_store_is_removed_by_a_later_dry_run(env, store_url, tmp_path, monkeypatch):
    """A dry run with no store yet plans against a scratch store in TMPDIR; SIGKILLed, its folder
    (a planned copy of the directory's people) stayed there for good. The next dry run removes
    such folders once their process is gone and they have been untouched for a day, and no other."""
    if not store_url.startswith("sqlite"):
        pytest.skip("a SQLite file")
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    config = Path(env["config"])
    config.write_text(config.read_text().replace(store_url, f"sqlite:///{tmp_path / 'none.db'}"))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # as a dry run SIGKILLed
    killed.kill()
    killed.wait(10)
    dead = killed.pid
    day_old = time.time() - 86400 - 60

    def leftover(name: str, *, age: float | None = day_old) -> Path:
        folder = scratch_root / name
        folder.mkdir(mode=0o700)
        (folder / "dirpull.db").write_bytes(b"planned people")
        if age is not None:
            for p in (folder / "dirpull.db", folder):
                os.utime(p, (age, age))
        return folder

    stale = leftover(f"dirpull-dry-run-{dead}-abc123")
    recent = leftover(f"dirpull-dry-run-{dead}-def456", age=None)
    alive = leftover(f"dirpull-dry-run-{os.getpid()}-ghi789")  # a long dry run still going
    unnamed = leftover("dirpull-dry-run-jkl012")  # no process named: cannot tell it is over
    r = run(env, "sync", "hr", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert not stale.exists()
    assert sorted(scratch_root.iterdir()) == sorted([recent, alive, unnamed])


@pytest.mark.parametrize(("signals", "code"), [(1, 1), (2, 143)], ids=["one-SIGTERM", "two-SIGTERMs"])
def test_a_dry_run_stopped_by_sigterm_leaves_no_scratch_store(env, store_url, tmp_path, signals, code):
    """A dry run with no store yet keeps a planned copy of the directory's people in TMPDIR. A
    second SIGTERM (exiting at once, past the cleanup) left that folder there for a day, until a
    later dry run swept it."""
    if not store_url.startswith("sqlite"):
        pytest.skip("a SQLite file")
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    config = Path(env["config"])
    config.write_text(config.read_text().replace(store_url, f"sqlite:///{tmp_path / 'none.db'}"))
    env["emulator"].faults.update({"delay": 30.0})  # every request hangs
    asked = env["emulator"].requests
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], "sync", "hr", "--dry-run"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(scratch_root)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        # Signalled once its pull waits in a request: a busy machine (CI) had a signal sent a fixed
        # second after the scratch store reach a run not asking yet, which stopped at once, and the
        # second signal then met a process already past its handler.
        while (not any(scratch_root.iterdir()) or env["emulator"].requests == asked) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(scratch_root.iterdir()), "the dry run made no scratch store"
        assert env["emulator"].requests > asked, "the dry run asked the vendor nothing"
        time.sleep(0.3)  # the request's answer is awaited
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert "Traceback" not in err
        assert list(scratch_root.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        env["emulator"].faults.clear()


def test_unchanged_resync_and_a_change(env):
    run(env, "sync", "hr")
    last = jsonl(run(env, "events", "hr", "--json").stdout)[-1]["seq"]
    again = run(env, "sync", "hr", "--json")
    assert jsonl(again.stdout)[0]["events"] == 0
    old_title = env["org"].people[5].title
    env["org"].update_person(5, title="Chief Emulator")
    changed = run(env, "sync", "hr")
    assert changed.exit_code == 0
    new = jsonl(run(env, "events", "hr", "--after", str(last), "--json").stdout)
    assert [(e["type"], e["data"]["idp_id"]) for e in new] == [("user.updated", "5")]
    assert new[0]["previous_attributes"] == {"job_title": old_title, "raw_attributes": {"jobTitle": old_title}}
    assert new[0]["data"]["job_title"] == "Chief Emulator"


def test_json_lines_stay_one_object_per_line_whatever_the_vendor_sends(env):
    """A title pasted from a word processor holds U+2028: every --json output still splits into
    one object per line, with str.splitlines() too, and decodes to the vendor's value."""
    title = "Head\x85of\u2028Opera\u2029tions"
    env["org"].update_person(5, title=title)
    assert run(env, "sync", "hr").exit_code == 0
    users = [json.loads(line) for line in run(env, "users", "hr", "--json").stdout.splitlines()]
    assert len(users) == len(env["org"].people)
    assert {u["idp_id"]: u["job_title"] for u in users}["5"] == title
    events = [json.loads(line) for line in run(env, "events", "hr", "--json").stdout.splitlines()]
    assert len(events) == len(users)


def test_a_secret_file_written_by_a_windows_editor(env):
    """A key file with a byte-order mark is read without it; one in UTF-16 (PowerShell's
    Out-File) is a secret that cannot be read, as the README has it: `dirpull sync` exits 2 naming
    the file, tenant and key, before any run (it ran, failed and exited 1), not with a decoding
    traceback."""
    key = env["tmp"] / "key"
    key.write_bytes(b"\xef\xbb\xbf" + env["secret"].encode() + b"\r\n")
    r = run(env, "sync", "hr")
    assert r.exit_code == 0, r.stderr
    runs = len(jsonl(run(env, "runs", "hr", "--json").stdout))
    key.write_bytes(env["secret"].encode("utf-16"))
    r = run(env, "sync", "hr", "--json")
    assert (r.exit_code, r.stdout) == (2, ""), r.output
    assert r.stderr == (
        f"dirpull: {env['config']}: tenants.hr.api_key: secret file key ({key}) is not UTF-8 text; save it as UTF-8\n"
    )
    assert len(jsonl(run(env, "runs", "hr", "--json").stdout)) == runs  # no failed run recorded


def test_guard_hold_dry_run_and_force_exit_codes(env):
    run(env, "sync", "hr")
    for n in range(2, 32):
        env["org"].delete(n)
    held = run(env, "sync", "hr")
    assert held.exit_code == 3 and "held by the mass-change guard" in held.stderr
    dry = run(env, "sync", "hr", "--dry-run")
    # Exit 3, not 0: a script's "dry-run, then apply" tells this run from one it may apply as is.
    assert dry.exit_code == 3 and dry.stdout.count("- user.deleted") == 30
    # 28 of the 30 deleted were active (the org's 60 people include 3 inactive ones)
    held_for = "would deactivate or delete 28 of 57 active users (0 deactivated, 28 deleted)"
    assert f"note: the guard would hold this run: {held_for}" in dry.stdout
    assert jsonl(run(env, "sync", "hr", "--dry-run", "--json").stdout)[0]["status"] == "planned"
    assert run(env, "sync", "hr", "--dry-run", "--json").exit_code == 3
    overridden = run(env, "sync", "hr", "--dry-run", "--force")  # what --force would apply: it is not held
    assert overridden.exit_code == 0 and f"--force overrides it: {held_for}" in overridden.stdout
    assert len(jsonl(run(env, "users", "hr", "--json").stdout)) == 60
    forced = run(env, "sync", "hr", "--force")
    assert forced.exit_code == 0
    assert len(jsonl(run(env, "users", "hr", "--json").stdout)) == 30
    st = jsonl(run(env, "status", "--json").stdout)[0]
    assert st["result"] == "succeeded"
    env["org"].delete(32)  # one more: under the floor, a dry run that would apply exits 0
    small = run(env, "sync", "hr", "--dry-run")
    assert small.exit_code == 0 and "would hold" not in small.stdout and "- user.deleted 32" in small.stdout


def test_dry_run_json_objects_have_the_applied_shape_with_the_commit_times_null(env):
    """A planned update showed `created_at` but no `updated_at`, a planned create neither: the
    planned object now has every field the applied event's has, the times the commit sets null."""
    run(env, "sync", "hr")
    n = next(p.n for p in env["org"].people.values() if p.visible and p.state == "active")
    env["org"].update_person(n, title="Principal")
    env["org"].hire()
    seq = max(e["seq"] for e in jsonl(run(env, "events", "hr", "--json").stdout))
    dry = jsonl(run(env, "sync", "hr", "--dry-run", "--json").stdout)[1:]
    planned = {e["type"]: e["data"] for e in dry}
    assert set(planned) == {"user.created", "user.updated"}
    assert planned["user.created"]["created_at"] is None and planned["user.created"]["updated_at"] is None
    assert planned["user.updated"]["created_at"] is not None and planned["user.updated"]["updated_at"] is None
    assert run(env, "sync", "hr").exit_code == 0
    applied = {e["type"]: e["data"] for e in jsonl(run(env, "events", "hr", "--after", str(seq), "--json").stdout)}
    assert {k: set(v) for k, v in applied.items()} == {k: set(v) for k, v in planned.items()}
    assert set(planned["user.updated"]) == USER_KEYS
    assert planned["user.updated"]["created_at"] == applied["user.updated"]["created_at"]


def test_a_held_full_run_says_to_review_and_apply_it_as_a_full_one(env):
    """After `sync --full` is held, `--force` alone would run incrementally: on a vendor whose
    deletions only a full listing shows it would apply none of them. The hold says what to run."""
    run(env, "sync", "hr")
    for n in range(2, 32):
        env["org"].delete(n)
    held = run(env, "sync", "hr", "--full")
    assert held.exit_code == 3
    steps = "review with `dirpull sync hr --full --dry-run`, apply with `dirpull sync hr --full --force`"
    assert held.stderr.rstrip().endswith(steps), held.stderr
    # Why it is held (as `runs` records it), then what to run.
    attention = jsonl(run(env, "status", "--json").stdout)[0]["attention"]
    assert len(attention) == 1 and attention[0].endswith(steps), attention
    assert attention[0].startswith("held by the guard: would deactivate or delete 28 of "), attention
    again = run(env, "sync", "hr")  # an incremental run held too: no --full in what it says
    assert again.exit_code == 3 and "apply with `dirpull sync hr --force`" in again.stderr, again.stderr
    assert run(env, "sync", "hr", "--full", "--force").exit_code == 0
    assert len(jsonl(run(env, "users", "hr", "--json").stdout)) == 30


def _every_run_failed(store_url: str, error: str) -> None:
    """The store's runs recorded as failed with `error`, as a vendor's words would come back."""
    store = Store(store_url)
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.update(schema.runs).values(status="failed", error=error))
    finally:
        store.close()


def test_tabs_and_line_breaks_in_values_keep_the_tables_one_row_each(env, store_url):
    """A tab or a line break in a vendor value or a run's error shifted the columns of the
    tab-separated tables or split a row in two; --json keeps the value as it is."""
    n = next(p.n for p in env["org"].people.values() if p.visible and p.state == "active")
    env["org"].update_person(n, title="Head of\tPeople\nand Culture")
    assert run(env, "sync", "hr").exit_code == 0
    _every_run_failed(store_url, "unexpected\nsecond line\tand a tab")
    for args in (("users", "hr"), ("runs", "hr"), ("status",)):
        header, *rows = run(env, *args).stdout.splitlines()
        assert rows and all(row.count("\t") == header.count("\t") for row in rows), args
    # The event log's rows: four columns each, an id holding a tab or a line break too.
    store = Store(store_url)
    try:
        with store.engine.begin() as conn:  # an id as odd as a vendor may send
            conn.execute(sa.update(schema.events).where(schema.events.c.seq == 1).values(
                data={"idp_id": "odd\tid\nhere"}))  # fmt: skip
    finally:
        store.close()
    header, *rows = run(env, "events", "hr").stdout.splitlines()
    assert rows and all(row.count("\t") == header.count("\t") == 3 for row in rows), \
        [r for r in rows if r.count("\t") != 3][:3]
    assert "odd id here" in rows[0]
    assert "Head of People and Culture" in run(env, "users", "hr").stdout
    assert "unexpected second line and a tab" in run(env, "runs", "hr").stdout
    assert "failing: unexpected second line and a tab" in run(env, "status").stdout
    titles = {u["job_title"] for u in jsonl(run(env, "users", "hr", "--json").stdout)}
    assert "Head of\tPeople\nand Culture" in titles


def test_the_event_log_table_has_a_header_line_as_the_other_tables_do(env):
    """`dirpull events T` printed its rows with no header, where `users`, `groups`, `runs` and
    `status` each begin with one (in a pipe too): the columns were left to guess, and a script
    skipping the other tables' first line with `tail -n +2` dropped an event here."""
    assert run(env, "sync", "hr").exit_code == 0
    events = jsonl(run(env, "events", "hr", "--json").stdout)
    header, *rows = run(env, "events", "hr").stdout.splitlines()
    assert header.split("\t") == ["seq", "created_at", "type", "object"]
    assert [row.split("\t")[0] for row in rows] == [str(e["seq"]) for e in events]
    assert rows[0].split("\t")[1:3] == [events[0]["created_at"], events[0]["type"]]
    # Nothing after --after: the header alone, as an empty group's `users --group` prints.
    r = run(env, "events", "hr", "--after", str(events[-1]["seq"]))
    assert (r.exit_code, r.stdout) == (0, f"{header}\n")
    assert run(env, "events", "hr", "--json", "--after", str(events[-1]["seq"])).stdout == ""


def test_an_argument_that_is_not_utf8_is_an_unknown_tenant_user_or_group_not_a_traceback(env):
    """A tenant, --group or --user typed in a Latin-1 terminal ("\xc9quipe") reaches dirpull
    holding a lone surrogate, which neither store's driver can send: every query command ended
    in a UnicodeEncodeError traceback instead of saying there is no such tenant, group or user."""
    assert run(env, "sync", "hr").exit_code == 0
    latin1 = "\udcc9quipe"  # b"\xc9quipe" as Python decodes a command line that is not UTF-8
    for command in ("users", "groups", "events", "runs"):
        r = run(env, command, latin1)
        assert r.exit_code == 2, (command, r.stdout + r.stderr)
        assert r.stderr.startswith("dirpull: unknown tenant") and len(r.stderr.splitlines()) == 1
    for command, option in (("users", "--group"), ("groups", "--user")):
        r = run(env, command, "hr", option, latin1, "--json")
        assert r.exit_code == 0 and r.stdout == "", (command, r.stdout + r.stderr)
        assert r.stderr.startswith(f"dirpull: no {option[2:]} ") and len(r.stderr.splitlines()) == 1


def test_a_stdout_that_is_not_utf8_gets_escaped_json_and_tables_without_a_traceback(env):
    """With PYTHONIOENCODING=latin-1 (or a Latin-1 locale), a name in another script raised
    UnicodeEncodeError halfway through `users --json`, and the tables likewise."""
    n = next(p.n for p in env["org"].people.values() if p.visible and p.state == "active")
    env["org"].update_person(n, title="山田 Łukasz 😀 Zoë")
    assert run(env, "sync", "hr").exit_code == 0
    latin1 = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    cmd = [sys.executable, "-m", "dirpull.cli", "--config", env["config"]]
    out = subprocess.run([*cmd, "users", "hr", "--json"], env=latin1, capture_output=True, timeout=60)
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr.decode("latin-1")
    users = [json.loads(line) for line in out.stdout.decode("latin-1").splitlines()]
    assert "山田 Łukasz 😀 Zoë" in {u["job_title"] for u in users}
    table = subprocess.run([*cmd, "users", "hr"], env=latin1, capture_output=True, timeout=60)
    assert table.returncode == 0 and b"Traceback" not in table.stderr, table.stderr.decode("latin-1")
    assert "?? ?ukasz ? Zoë" in table.stdout.decode("latin-1")


def test_a_held_run_is_not_reported_as_having_written_events(env):
    """A held run writes nothing, yet `dirpull sync` said "rows_written 59, events 59" after it
    and `dirpull runs` showed 59 in its events column, as if a consumer had 59 new events."""
    run(env, "sync", "hr")
    for n in range(2, 32):
        env["org"].delete(n)
    held = run(env, "sync", "hr")
    assert held.exit_code == 3
    assert held.stdout.startswith("hr: held (")
    assert "; nothing applied, planned: " in held.stdout and "users_deleted 30," in held.stdout
    header, *rows = run(env, "runs", "hr").stdout.splitlines()
    columns = header.split("\t")
    latest = dict(zip(columns, rows[0].split("\t"), strict=True))
    assert latest["status"] == "held" and latest["events"] == "0"
    first = dict(zip(columns, rows[1].split("\t"), strict=True))
    assert first["status"] == "succeeded" and first["events"] != "0"
    assert jsonl(run(env, "runs", "hr", "--json").stdout)[0]["counts"]["users_deleted"] == 30  # what it would do


def test_runs_json_says_how_many_events_each_run_wrote_as_sync_json_does(env):
    """A run object of `runs --json` had no `events`, which `sync --json` and the `runs` table
    show: only `counts.events`, which for a held run is what it would have written, so a consumer
    counting from it expected events in the log that were never written."""
    first = jsonl(run(env, "sync", "hr", "--json").stdout)[0]
    for n in range(2, 32):
        env["org"].delete(n)
    held = run(env, "sync", "hr", "--json")
    assert held.exit_code == 3
    written: dict[int, int] = {}
    for e in jsonl(run(env, "events", "hr", "--json").stdout):
        written[e["run_id"]] = written.get(e["run_id"], 0) + 1
    latest, applied = jsonl(run(env, "runs", "hr", "--json").stdout)
    assert applied["id"] == first["run_id"] and applied["events"] == first["events"] == written[applied["id"]] > 0
    assert latest["status"] == "held" and latest["events"] == jsonl(held.stdout)[0]["events"] == 0
    assert latest["counts"]["events"] > 0  # what it would have written, kept as it was
    assert list(latest)[list(latest).index("requests") + 1] == "events"


def test_a_held_runs_dry_run_names_who_would_be_removed_first(env):
    """The guard says "review with --dry-run": its bounded listing names the people the run would
    delete or deactivate even when hundreds of other changes come before them in event order."""
    run(env, "sync", "hr")
    for _ in range(250):
        env["org"].hire()
    for n in range(2, 12):
        env["org"].delete(n)
    active = [p.n for p in env["org"].people.values() if p.n >= 12 and p.state == "active"][:10]
    for n in active:
        env["org"].deactivate(n)
    assert run(env, "sync", "hr").exit_code == 3
    dry = run(env, "sync", "hr", "--dry-run")
    assert dry.exit_code == 3
    lines = dry.stdout.splitlines()
    assert sum(1 for line in lines if line[:1] in "+-~") == 200
    assert {line.split()[2] for line in lines if line.startswith("- user.deleted")} == {str(n) for n in range(2, 12)}
    deactivated = {line.split()[2] for line in lines if line.endswith(" deactivated")}
    assert deactivated == {str(n) for n in active}
    assert any(line.startswith("… and ") and "--json" in line for line in lines)


def test_a_run_reactivating_many_is_held_its_dry_run_names_them_first_and_status_says_why(env):
    """Terminated people turned active again (a report whose status field changed) were applied
    as ordinary updates: their access given back downstream, and the review listed them behind
    every other change. Now the run is held, `status` says why and the dry run names them first."""
    org = env["org"]
    terminated = [p.n for p in org.people.values() if p.visible and p.state == "active"][-20:]
    for n in terminated:
        org.deactivate(n, "terminated", "2025-06-30")
    assert run(env, "sync", "hr").exit_code == 0
    active = len(jsonl(run(env, "users", "hr", "--state", "active", "--json").stdout))
    inactive = len(jsonl(run(env, "users", "hr", "--state", "inactive", "--json").stdout))
    for _ in range(250):  # created active: not counted, and listed before the updates in event order
        org.hire()
    for n in terminated[:10]:
        org.reactivate(n)
    held = run(env, "sync", "hr")
    assert held.exit_code == 3, held.stdout + held.stderr
    reason = f"would reactivate 10 of {inactive} inactive users, as many as {round(1000 / active, 1):g}% of the "
    assert reason in held.stderr
    attention = jsonl(run(env, "status", "--json").stdout)[0]["attention"]
    assert len(attention) == 1 and attention[0].startswith(f"held by the guard: {reason}"), attention
    assert "users_reactivated 10" in held.stdout
    dry = run(env, "sync", "hr", "--dry-run")
    assert dry.exit_code == 3
    lines = dry.stdout.splitlines()
    assert sum(1 for line in lines if line[:1] in "+-~") == 200
    reactivated = [line.split()[2] for line in lines if line.endswith(" reactivated")]
    assert reactivated and set(reactivated) == {str(n) for n in terminated[:10]}
    forced = run(env, "sync", "hr", "--force")
    assert forced.exit_code == 0, forced.stdout + forced.stderr
    assert len(jsonl(run(env, "users", "hr", "--state", "active", "--json").stdout)) == active + 250 + 10


def test_a_new_sqlite_store_is_readable_by_its_owner_only(env, store_url):
    """The store holds the whole directory (names, emails, managers): created under the usual
    umask 022 it was 0644, readable by every account on the machine; its WAL files follow."""
    if not store_url.startswith("sqlite"):
        pytest.skip("a file only on SQLite")
    old = os.umask(0o022)
    try:
        assert run(env, "sync", "hr").exit_code == 0
    finally:
        os.umask(old)
    path = Path(store_url.removeprefix("sqlite:///"))
    made = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    assert path in made
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: "0o600" for p in made}


def test_a_full_disk_under_the_spool_is_one_clear_line(env, monkeypatch):
    """The run's pending records wait in a temporary file: with no room left there, the run failed
    with a traceback in the log and "OSError: [Errno 28] No space left on device" as its error,
    naming neither the directory nor what to do."""
    # /dev/full: every write the kernel gets fails with ENOSPC, as on a full TMPDIR.
    monkeypatch.setattr("dirpull.spool.tempfile.TemporaryFile", lambda **_: open("/dev/full", "w+b"))  # noqa: SIM115
    r = run(env, "sync", "hr")
    assert r.exit_code == 1
    assert "Traceback" not in r.stderr
    [error] = [line.strip() for line in r.stderr.splitlines() if line.startswith("  ")]
    assert "No space left on device" in error and "TMPDIR" in error and "nothing applied" in error
    assert jsonl(run(env, "runs", "hr", "--json").stdout)[0]["error"] == error
    assert jsonl(run(env, "users", "hr", "--json").stdout) == []


def test_failed_sync_exits_1_without_leaking_the_key(env):
    env["emulator"].faults.update({"expire_auth": 5})
    r = run(env, "sync", "hr")
    assert r.exit_code == 1 and "401" in r.stderr
    # Not "; no changes", which says the directory was read and found unchanged.
    assert r.stdout.startswith("hr: failed (full) in ") and r.stdout.endswith(" requests; nothing applied\n"), r.stdout
    assert jsonl(run(env, "users", "hr", "--json").stdout) == []
    status = jsonl(run(env, "status", "--json").stdout)[0]
    assert status["result"] == "failed" and status["attention"]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_sync_stopped_by_a_signal_applies_nothing_and_says_so(env, store_url, how):
    """cron's `timeout` or Ctrl-C mid-run: the run is recorded as failed, not left `running`, and
    its lease is given back at once (the next sync is not refused for a lease TTL)."""
    assert run(env, "sync", "hr").exit_code == 0
    env["org"].random_changes(5)  # something to apply, were the run to apply anything
    env["emulator"].faults.update({"delay": 2.0})  # the report takes a while to come
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], "sync", "hr", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    store = Store(store_url)
    events = len(list(store.iter_events("hr", after=0)))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and store.runs("hr", 1)[0]["status"] != "running":
            time.sleep(0.05)
        assert store.runs("hr", 1)[0]["status"] == "running"
        time.sleep(0.3)  # into the report's request
        proc.send_signal(how)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err
        summary = jsonl(out.decode())[0]
        assert summary["status"] == "failed" and "stopping" in summary["error"]
        last = store.runs("hr", 1)[0]
        assert last["status"] == "failed" and "stopping" in last["error"]
        assert len(list(store.iter_events("hr", after=0))) == events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.close()
    env["emulator"].faults.clear()
    assert run(env, "sync", "hr").exit_code == 0  # not refused: the lease was given back


def test_a_sync_refused_because_another_worker_holds_the_tenant_says_so(env, store_url):
    """A manual sync while a worker is syncing the tenant: it said "skipped (-) in 0.00s, 0
    requests; no changes", as if the directory had been read and found unchanged."""
    store = Store(store_url)
    try:
        store.ensure_schema()
        store.ensure_tenant("hr", "bamboohr")
        assert store.acquire_lease("hr", "db7:4242/abcd1234", timedelta(seconds=60)) is None
        r = run(env, "sync", "hr")
        assert r.exit_code == 1
        assert r.stdout == "hr: skipped: another worker is syncing it; nothing was read or applied\n"
        assert "tenant hr is being synced by db7:4242/abcd1234 (lease until " in r.stderr
        assert "--wait SECONDS" in r.stderr
        summary = jsonl(run(env, "sync", "hr", "--json").stdout)[0]
        assert summary["status"] == "skipped" and "being synced by db7:4242" in summary["error"]
        assert summary["mode"] is None and summary["run_id"] is None  # no run: not a mode named "-"
        assert store.runs("hr") == []
    finally:
        store.close()


def _age_runs(store_url: str, age: timedelta) -> None:
    """Every recorded run as though it had started and ended `age` ago."""
    store = Store(store_url)
    try:
        with store.engine.begin() as conn:
            old = datetime.now(UTC) - age
            conn.execute(sa.update(schema.runs).values(started_at=old, finished_at=old))
    finally:
        store.close()


@pytest.mark.parametrize("schedule", ["5m", "cron: */5 * * * *"])
def test_status_shows_a_tenant_not_synced_for_too_long(env, store_url, schedule):
    """Whatever the schedule form: a tenant whose last success is three scheduled syncs old (the
    daemon is down, say) needs attention in `dirpull status`; one that synced just now does not."""
    config = Path(env["config"])
    config.write_text(config.read_text() + f"schedule = {json.dumps(schedule)}\n")
    assert run(env, "sync", "hr").exit_code == 0
    assert jsonl(run(env, "status", "--json").stdout)[0]["attention"] == []
    _age_runs(store_url, timedelta(hours=2))
    row = jsonl(run(env, "status", "--json").stdout)[0]
    assert row["result"] == "succeeded"
    assert [a for a in row["attention"] if a.startswith("no successful sync since")], row
    assert "no successful sync since" in run(env, "status").stdout


def test_status_next_run_follows_the_schedule_not_a_manual_sync(env, store_url):
    """The daemon fires an interval tenant an interval after its previous fire: a manual `dirpull
    sync` in between does not move that. `dirpull status` counted the interval from the newest run
    of any kind, so after a manual sync of a daily tenant it showed the next run a day after that
    sync, while the daemon would run it at its usual time, hours earlier."""
    config = Path(env["config"])
    config.write_text(config.read_text() + 'schedule = "1d"\n')
    assert run(env, "sync", "hr").exit_code == 0
    fired = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    store = Store(store_url)
    try:  # that run was the daemon's, six hours ago
        with store.engine.begin() as conn:
            conn.execute(sa.update(schema.runs).values(trigger="schedule", started_at=fired, finished_at=fired))
    finally:
        store.close()
    assert run(env, "sync", "hr").exit_code == 0  # a manual resync now
    [row] = jsonl(run(env, "status", "--json").stdout)
    assert row["result"] == "succeeded" and row["attention"] == []
    assert datetime.fromisoformat(row["next_run"].replace("Z", "+00:00")) == fired + timedelta(days=1)


def test_status_of_a_disabled_tenant_says_disabled_with_no_next_run(env, store_url):
    """As the README's `status` row says: `enabled = false` is shown in the attention column, and the
    tenant, which the daemon does not schedule, has no next run (`null` in `--json`), its schedule
    still shown; `dirpull sync` of it still works. Parked for weeks, it is not also flagged as not
    synced for too long: nothing is supposed to sync it."""
    config = Path(env["config"])
    config.write_text(config.read_text() + "enabled = false\n")
    assert run(env, "sync", "hr").exit_code == 0
    _age_runs(store_url, timedelta(days=30))
    [row] = jsonl(run(env, "status", "--json").stdout)
    assert row["result"] == "succeeded" and row["attention"] == ["disabled"]
    assert row["next_run"] is None and row["schedule"] == "15m"
    [line] = run(env, "status").stdout.splitlines()[1:]
    assert line.split("\t")[4:] == ["-", "disabled"]


@contextlib.contextmanager
def _paused_daemon(env: dict) -> Iterator[Daemon]:
    """A started Daemon on the env's configuration whose scheduler runs nothing: its jobs' fire
    times, as `dirpull run` would schedule them."""
    from dirpull.config import load_config
    from dirpull.sync.daemon import Daemon

    config = load_config(env["config"])
    store = Store(config.store.url)
    daemon = Daemon(config, store)
    daemon.scheduler.start = functools.partial(daemon.scheduler.start, paused=True)  # none run
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.shutdown()
        store.close()


def test_status_next_run_of_a_cron_tenant_never_synced_is_when_the_daemon_syncs_it(env, store_url):
    """A starting daemon syncs a cron tenant that never synced within seconds, not at its cron
    time. `dirpull status` showed the next cron time (here, next New Year's Day) for it, so an
    operator who had just added the tenant expected nothing before then. Once synced, the cron
    time it is."""
    config = Path(env["config"])
    config.write_text(config.read_text() + 'schedule = "cron: 0 3 1 1 *"\n')
    assert run(env, "db", "upgrade").exit_code == 0
    before = datetime.now(UTC)
    [row] = jsonl(run(env, "status", "--json").stdout)
    assert row["result"] == "never synced"
    shown = datetime.fromisoformat(row["next_run"].replace("Z", "+00:00"))

    with _paused_daemon(env) as daemon:
        fires_at = daemon.scheduler.get_job("hr").next_run_time
    assert fires_at - before < timedelta(seconds=15)  # the daemon's first fire: within seconds
    assert abs(shown - fires_at) < timedelta(seconds=15), (shown, fires_at)

    assert run(env, "sync", "hr").exit_code == 0
    [row] = jsonl(run(env, "status", "--json").stdout)
    shown = datetime.fromisoformat(row["next_run"].replace("Z", "+00:00"))
    assert (shown.month, shown.day, shown.hour, shown.minute) == (1, 1, 3, 0) and shown > before, row



def test_status_next_run_of_a_cron_tenant_that_missed_its_time_is_when_the_daemon_syncs_it(env, store_url):
    """The daemon was down over a nightly tenant's cron time: a starting daemon catches the tenant
    up within seconds, and one whose fire waits for a free thread runs it as soon as one is free.
    `dirpull status` showed the next night's cron time for it, a day off, where an interval tenant
    overdue shows now. A run that ended since the cron time puts it back on its cron time."""
    config = Path(env["config"])
    config.write_text(config.read_text() + 'schedule = "cron: 0 3 * * *"\n')
    assert run(env, "sync", "hr").exit_code == 0
    _age_runs(store_url, timedelta(days=2))  # the last run: before last night's 03:00
    before = datetime.now(UTC)
    [row] = jsonl(run(env, "status", "--json").stdout)
    shown = datetime.fromisoformat(row["next_run"].replace("Z", "+00:00"))

    with _paused_daemon(env) as daemon:
        fires_at = daemon.scheduler.get_job("hr").next_run_time
    assert fires_at - before < timedelta(seconds=15)  # the daemon's catch-up: within seconds
    assert abs(shown - fires_at) < timedelta(seconds=15), (shown, fires_at)

    assert run(env, "sync", "hr").exit_code == 0
    [row] = jsonl(run(env, "status", "--json").stdout)
    shown = datetime.fromisoformat(row["next_run"].replace("Z", "+00:00"))
    assert (shown.hour, shown.minute) == (3, 0) and shown > before, row

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


@pytest.mark.parametrize(
    ("cron", "days"),
    [
        ("0 2 * * 0", ["Sunday"]),
        ("0 2 * * 7", ["Sunday"]),
        ("0 2 * * 1-5", WEEKDAYS),
        ("0 2 * * mon-fri", WEEKDAYS),
        ("0 2 * * 0,6", ["Saturday", "Sunday"]),
        ("0 2 * * */3", ["Sunday", "Wednesday", "Saturday"]),
    ],
)
def test_a_cron_weekday_is_the_crontab_one(env, cron, days):
    """In crontab 0 and 7 are Sunday and 1-5 Monday to Friday. APScheduler 3 counts weekdays from
    Monday = 0 (agronholm/apscheduler#286): "0 2 * * 0" synced on Mondays, "1-5" Tuesday to
    Saturday (and `dirpull status` said so), and "7" was refused as a bad cron expression."""
    config = Path(env["config"])
    config.write_text(config.read_text() + f"schedule = {json.dumps('cron: ' + cron)}\n")
    assert run(env, "sync", "hr").exit_code == 0  # it ran now: the daemon waits for the cron time
    [row] = jsonl(run(env, "status", "--json").stdout)
    shown = datetime.fromisoformat(row["next_run"].replace("Z", "+00:00"))

    with _paused_daemon(env) as daemon:
        job = daemon.scheduler.get_job("hr")
        fires = [job.next_run_time]
        while len(fires) < 10:  # ten fires in a row: every weekday of the schedule shows up
            fires.append(job.trigger.get_next_fire_time(fires[-1], fires[-1] + timedelta(seconds=1)))
    assert shown == fires[0]  # `dirpull status` shows the daemon's next fire
    assert {f.strftime("%A") for f in fires} == set(days)
    assert all((f.hour, f.minute) == (2, 0) for f in fires)


@pytest.mark.parametrize("provider", ["okta", "workday", "bamboohr"])
def test_throttling_is_a_warning_in_the_log(tmp_path, provider):
    """DESIGN, Operating it: throttling is a warning in the log when it happens, for every
    provider (Graph's and Google's connectors already said so), and the run still succeeds."""
    cluster = Cluster(Org.generate(10))
    cluster.start([provider])
    try:
        config = tmp_path / "dirpull.toml"
        config.write_text(cluster.config_toml(tmp_path, store_url=f"sqlite:///{tmp_path / 'store.db'}"))
        cluster.emulators[provider].faults.update({"rate_limit": 1})
        r = CliRunner().invoke(app, ["--config", str(config), "sync", f"demo-{provider}"])
    finally:
        cluster.stop()
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and any(code in warnings[0] for code in ("429", "503")), r.stderr


def _on_a_terminal(env: dict, *args: str) -> tuple[int, str, str]:
    """`dirpull ARGS` with stderr on a pseudo-terminal (stdout a pipe): exit code, stdout, and
    the raw bytes the terminal got, decoded."""
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], *args],
        stdout=subprocess.PIPE, stderr=secondary, stdin=subprocess.DEVNULL,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "200"},
    )  # fmt: skip
    os.close(secondary)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def _terminal_rows(raw: str) -> list[str]:
    """What stays on each row of the terminal: a row's text after its last erase-line, without
    escape sequences and carriage returns (enough for Rich's one-line progress display)."""
    rows = []
    for row in raw.replace("\r\n", "\n").split("\n"):
        row = row.rsplit("\x1b[2K", 1)[-1]
        rows.append(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", row).replace("\r", ""))
    return rows


def test_log_lines_on_a_terminal_do_not_land_in_the_progress_line(env):
    """A sync on a terminal shows a live progress line on stderr; its log lines (sync start, a
    rate-limit wait, sync end) were written into that line, so the terminal kept rows like
    "⠋ connecting… 0:00:00 2026-… INFO dirpull.sync: sync start …". Each is a row of its own."""
    code, out, raw = _on_a_terminal(env, "sync", "hr")
    assert code == 0, raw
    assert "hr: succeeded (full)" in out
    rows = _terminal_rows(raw)
    logged = [row for row in rows if " INFO dirpull.sync: sync " in row]
    assert len(logged) == 2, rows
    own_row = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO dirpull.sync: sync (start|end) ")
    assert all(own_row.match(row) for row in logged), logged


def test_the_progress_line_says_when_the_directory_is_read_and_the_run_writes(env):
    """After the last page a first sync of 100,000 users spends seconds comparing and writing with
    nothing more to read: the line kept saying "… read" meanwhile, as if the pull had stalled."""
    code, _out, raw = _on_a_terminal(env, "sync", "hr")
    assert code == 0, raw
    line = r"hr: \d+ pages · [\d,]+ users · [\d,]+ groups read · comparing with the store and writing…"
    assert re.search(line, raw), raw


def test_status_shows_a_run_whose_process_was_killed(env, store_url):
    """SIGKILL (the OOM killer, `kill -9`) leaves the run recorded as `running`: once its lease has
    lapsed, `dirpull status` says the run never finished, instead of showing a sync in progress
    until the tenant's next run (a schedule interval away, or never without a daemon)."""
    config = Path(env["config"])
    # Not the shortest lease: while the run is alive its lease must stay renewed, and a loaded CI
    # machine can leave the run's process without the CPU for a second or two.
    config.write_text(config.read_text().replace("[defaults.guard]", '[defaults]\nlease_ttl = "5s"\n[defaults.guard]'))
    assert run(env, "db", "upgrade").exit_code == 0
    env["emulator"].faults.update({"delay": 30.0})  # the run stays in its report's request until killed
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], "sync", "hr"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    store = Store(store_url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            store.runs("hr", 1) and store.runs("hr", 1)[0]["status"] == "running"
        ):
            time.sleep(0.05)
        [running] = store.runs("hr", 1)
        assert running["status"] == "running"
        live = jsonl(run(env, "status", "--json").stdout)[0]
        assert live["result"] == "running" and live["attention"] == []  # alive: nothing to flag
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30  # its lease lapses
        while not (row := jsonl(run(env, "status", "--json").stdout)[0])["attention"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert row["result"] == "running"
        assert row["attention"] == [
            f"run {running['id']} never finished: its worker {running['worker']} no longer holds the lease "
            "(killed, crashed or cut off from the store); nothing of it was applied"
        ]
        assert list(store.iter_users("hr")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.close()
        env["emulator"].faults.clear()
    assert run(env, "sync", "hr").exit_code == 0
    assert jsonl(run(env, "status", "--json").stdout)[0]["attention"] == []
    assert store.runs("hr", 2)[1]["status"] == "failed"  # the next run marked it


def wait_for_a_running_run(store: Store, tenant: str, *, after: int, timeout: float = 30) -> dict[str, object]:
    """The tenant's run newer than `after`, once it is running (waits at most `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (
        (last := store.runs(tenant, 1)[0])["id"] > after and last["status"] == "running"
    ):
        time.sleep(0.05)
    assert last["id"] > after and last["status"] == "running", last
    return last


@pytest.mark.parametrize(
    ("args", "how", "code"),
    [(["run", "--max-seconds", "120"], signal.SIGTERM, 143), (["sync", "hr"], signal.SIGINT, 130)],
    ids=["run-SIGTERM", "sync-Ctrl-C"],
)
def test_a_second_signal_while_stopping_exits_at_once_applying_nothing(env, store_url, args, how, code):
    """A run stuck in a slow vendor request: the first SIGTERM/Ctrl-C waits for it to reach a safe
    point, and a second one did nothing more, so the operator had to SIGKILL. It now exits at once
    (128 + the signal's number), says so in one line, prints no traceback and applies nothing: the
    run is left `running` and the tenant's next run, once the lease has lapsed, marks it failed."""
    config = Path(env["config"])
    text = config.read_text().replace("[defaults.guard]", '[defaults]\nlease_ttl = "2s"\n[defaults.guard]')
    config.write_text(text + 'schedule = "1m"\n')  # the daemon's first fire within 10 s
    assert run(env, "sync", "hr").exit_code == 0
    env["org"].random_changes(5)  # something to apply, were the run to apply anything
    env["emulator"].faults.update({"delay": 30.0})  # the report hangs
    asked = env["emulator"].requests
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    store = Store(store_url)
    try:
        before = store.runs("hr", 1)[0]["id"]
        events = len(list(store.iter_events("hr", after=0)))
        last = wait_for_a_running_run(store, "hr", after=before)
        deadline = time.monotonic() + 20  # into the report's request, on a busy machine too
        while env["emulator"].requests == asked and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(how)
        time.sleep(1.0)
        assert proc.poll() is None  # the first signal waits for the run to reach a safe point
        proc.send_signal(how)
        started = time.monotonic()
        _, err = proc.communicate(timeout=20)
        # Not the 30 s the report would take; wide enough for a loaded CI machine.
        assert time.monotonic() - started < 15, err
        assert proc.returncode == code, err
        assert "Traceback" not in err
        assert "exits at once" in err, err  # said at the first signal
        assert "again while stopping: exiting now" in err, err
        assert store.runs("hr", 1)[0]["id"] == last["id"]
        assert store.runs("hr", 1)[0]["status"] == "running"  # left for the next run to mark
        assert len(list(store.iter_events("hr", after=0))) == events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        env["emulator"].faults.clear()
    try:
        assert run(env, "sync", "hr", "--wait", "10").exit_code == 0  # once the lease lapses
        [cut_off] = [r for r in store.runs("hr", 5) if r["id"] == last["id"]]
        assert cut_off["status"] == "failed" and cut_off["error"].startswith("interrupted")
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "code"), [(["run", "--max-seconds", "300"], 0), (["sync", "hr"], 1)], ids=["run", "sync"]
)
def test_one_sigterm_stops_a_run_stuck_in_a_vendor_request_without_waiting_for_its_timeout(env, store_url, args, code):
    """README ("A second signal while stopping exits at once"): a run waiting for a vendor's answer
    reaches its safe point within about 10 s, as its pull is then left behind, so a request hanging
    until its timeout (Workday's 300 s, past the systemd unit's TimeoutStopSec of 120 s) does not
    hold the clean stop. The run is recorded as interrupted, nothing applied, its lease given back."""
    config = Path(env["config"])
    config.write_text(config.read_text() + 'schedule = "1m"\n')  # the daemon's first fire within 10 s
    assert run(env, "sync", "hr").exit_code == 0
    env["org"].random_changes(5)  # something to apply, were the run to apply anything
    env["emulator"].faults.update({"delay": 60.0})  # the report hangs, well within the 120 s read timeout
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    store = Store(store_url)
    try:
        before = store.runs("hr", 1)[0]["id"]
        events = len(list(store.iter_events("hr", after=0)))
        last = wait_for_a_running_run(store, "hr", after=before)
        time.sleep(0.3)  # into the report's request
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=40)
        assert time.monotonic() - started < 20, err  # not the 60 s the report would take
        assert proc.returncode == code, err
        assert "Traceback" not in err
        stopped = store.runs("hr", 1)[0]
        assert stopped["id"] == last["id"] and stopped["status"] == "failed", stopped
        assert stopped["error"].startswith("interrupted: the worker is stopping"), stopped
        assert len(list(store.iter_events("hr", after=0))) == events
        env["emulator"].faults.clear()
        assert run(env, "sync", "hr").exit_code == 0  # the lease was given back: no --wait needed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        env["emulator"].faults.clear()
        store.close()


@pytest.mark.parametrize(
    ("provider", "tenant", "hung"),
    [("workday", "demo-workday", "Worker_Groups"), ("google_workspace", "demo-google", "/members")],
    ids=["workday-groups-report", "google-member-reads"],
)
def test_one_sigterm_ends_the_process_while_a_side_request_of_the_pull_still_hangs(
    tmp_path, store_url, provider, tenant, hung
):
    """README ("A second signal while stopping exits at once"): the clean stop does not wait for a
    vendor request hanging until its timeout. Workday's groups report and Google's member reads
    are made beside the pull, on thread pools the interpreter's exit joined: the run was recorded
    as interrupted after ~10 s, but the process lived on until the request ended (Workday's
    timeout is 300 s, systemd's TimeoutStopSec 120 s, after which the unit is SIGKILLed)."""
    cluster = Cluster(Org.generate(20, seed=7))
    cluster.start([provider])
    config = tmp_path / "dirpull.toml"
    config.write_text(cluster.config_toml(tmp_path, store_url=store_url))
    emulator = cluster.emulators[provider]
    proc: subprocess.Popen[str] | None = None
    store = Store(store_url)
    try:
        first = CliRunner().invoke(app, ["--config", str(config), "sync", tenant], catch_exceptions=False)
        assert first.exit_code == 0, first.output
        before = store.runs(tenant, 1)[0]["id"]
        emulator.request_log.clear()
        emulator.faults.update({"delay": 60.0, "path": hung})  # within the connectors' read timeouts
        proc = subprocess.Popen(
            [sys.executable, "-m", "dirpull.cli", "--config", str(config), "sync", tenant],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        run_ = wait_for_a_running_run(store, tenant, after=before)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(hung in path for _, path in emulator.request_log):
            time.sleep(0.05)
        assert any(hung in path for _, path in emulator.request_log), emulator.request_log
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=90)
        assert time.monotonic() - started < 25, err  # not the 60 s the hanging request takes
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        stopped = store.runs(tenant, 1)[0]
        assert stopped["id"] == run_["id"] and stopped["error"].startswith("interrupted: the worker is stopping")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        emulator.faults.clear()
        cluster.stop()
        store.close()


def _stop_mid_run(env: dict, store_url: str, *args: str) -> None:
    """Starts `dirpull ARGS`, sends SIGTERM while its run is pulling, waits for it to end."""
    env["emulator"].faults.update({"delay": 2.0})  # the report takes a while to come
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    store = Store(store_url)
    try:
        before = store.runs("hr", 1)[0]["id"]
        last = wait_for_a_running_run(store, "hr", after=before)
        time.sleep(0.3)  # into the report's request
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        last = store.runs("hr", 1)[0]
        assert last["id"] > before and last["status"] == "failed", last  # `dirpull runs` as before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.close()
        env["emulator"].faults.clear()


def test_status_after_a_clean_stop_says_interrupted_not_failing(env, store_url):
    """Restarting the daemon (an upgrade, `systemctl restart`) cuts off the run in progress: it
    applies nothing, and the next fire syncs the tenant. `dirpull status` showed the tenant as
    failed ("failing: interrupted: the worker is stopping…") until then, an alarm about nothing.
    A failure before the stop still shows: the stop does not hide it."""
    config = Path(env["config"])
    config.write_text(config.read_text() + 'schedule = "1m"\n')  # first fire within 10 s
    assert run(env, "sync", "hr").exit_code == 0
    _stop_mid_run(env, store_url, "run", "--max-seconds", "60")
    row = jsonl(run(env, "status", "--json").stdout)[0]
    assert row["result"] == "interrupted" and row["attention"] == [], row
    assert "\tinterrupted\t" in run(env, "status").stdout

    env["emulator"].faults.update({"expire_auth": 5})
    failed = run(env, "sync", "hr")
    assert failed.exit_code == 1
    [error] = [line.strip() for line in failed.stderr.splitlines() if line.startswith("  ")]
    env["emulator"].faults.clear()
    _stop_mid_run(env, store_url, "sync", "hr")  # Ctrl-C of a manual retry
    row = jsonl(run(env, "status", "--json").stdout)[0]
    assert row["result"] == "interrupted" and row["attention"] == [f"failing: {error}"], row


def test_a_refused_key_as_a_stop_comes_is_the_failure_status_flags(env, store_url):
    """The vendor refuses the key (HTTP 401) just as SIGTERM arrives (a deploy restarting the
    daemon): the run was recorded "interrupted: … (… HTTP 401 …)", which `dirpull status` does not
    flag, so the refused key went unseen until the next run. It is the vendor's failure, flagged."""
    from dirpull.config import load_config
    from dirpull.connectors import make_connector
    from dirpull.sync.runner import Runner

    stop = threading.Event()

    class StoppedAsItFails:
        """The real connector; the stop arrives as its pull fails."""

        def __init__(self, tenant: str, settings: object) -> None:
            self.real = make_connector(tenant, settings)

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def pull(self, *args: object, **kwargs: object) -> Iterator[object]:
            try:
                yield from self.real.pull(*args, **kwargs)
            except BaseException:
                stop.set()
                raise

    env["emulator"].faults.update({"expire_auth": 1})
    store = Store(store_url)
    try:
        store.ensure_schema()
        runner = Runner(load_config(env["config"]), store, stop=stop, connector_factory=StoppedAsItFails)
        result = runner.sync("hr")
    finally:
        store.close()
        env["emulator"].faults.clear()
    assert stop.is_set() and result.status == "failed" and "HTTP 401" in (result.error or ""), result.error
    assert not result.error.startswith("interrupted"), result.error
    row = jsonl(run(env, "status", "--json").stdout)[0]
    assert row["result"] == "failed" and row["attention"] == [f"failing: {result.error}"], row


class _Daemon:
    """`dirpull run` as a subprocess on the env's configuration, its log in a file read as it goes."""

    def __init__(self, env: dict, store_url: str) -> None:
        self.log = Path(env["tmp"]) / "daemon.log"
        self._err = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dirpull.cli", "--config", env["config"], "run", "--max-seconds", "180"],
            stdout=subprocess.DEVNULL, stderr=self._err,
        )  # fmt: skip
        self.store = Store(store_url)

    def succeeded(self, tenant: str) -> int:
        with contextlib.suppress(Exception):  # the daemon may still be creating the schema
            return sum(1 for r in self.store.runs(tenant, 1000) if r["status"] == "succeeded")
        return 0

    def runs(self, tenant: str) -> int:
        with contextlib.suppress(Exception):
            return len(self.store.runs(tenant, 1000))
        return 0

    def wait(self, predicate: Callable[[], bool], timeout: float = 45) -> None:  # a busy CI machine
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def reload(self, expected: str) -> list[str]:
        """SIGHUP, and the log lines it brought once one of them holds `expected`."""
        seen = len(self.log.read_text())
        self.proc.send_signal(signal.SIGHUP)
        self.wait(lambda: expected in self.log.read_text()[seen:])
        time.sleep(0.1)  # the lines logged with it
        return self.log.read_text()[seen:].splitlines()

    def synced_again(self, tenant: str) -> None:
        before = self.succeeded(tenant)
        self.wait(lambda: self.succeeded(tenant) > before)

    def stop(self) -> str:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._err.close()
            self.store.close()
        return self.log.read_text()


def test_sighup_applies_an_added_a_fixed_and_a_removed_tenant_without_a_restart(env, store_url):
    """SIGHUP was logged and ignored: adding a customer, fixing one tenant's table or removing one
    needed a restart, which cut off every running sync (they applied nothing and started over).
    It now reloads the file (`systemctl reload dirpull`): the new tenant and the fixed one sync,
    the removed one stops, and the tenant that stayed syncs on without a pause."""
    config = Path(env["config"])
    hr = config.read_text() + 'schedule = "1s"\n'
    table = hr[hr.index("[tenants.hr]") :]
    broken = table.replace("[tenants.hr]", "[tenants.fixme]") + 'colour = "blue"\n'
    config.write_text(hr + broken)
    daemon = _Daemon(env, store_url)
    try:
        daemon.wait(lambda: daemon.succeeded("hr") >= 1)
        assert daemon.runs("fixme") == 0

        config.write_text(hr + broken.replace('colour = "blue"\n', "") + table.replace("[tenants.hr]", "[tenants.new]"))
        logged = daemon.reload("configuration reloaded")
        assert any(line.endswith(" INFO dirpull.daemon: configuration reloaded: 3 tenants scheduled "
                                 "(added: fixme, new)") for line in logged), logged  # fmt: skip
        daemon.wait(lambda: daemon.succeeded("fixme") >= 1 and daemon.succeeded("new") >= 1)
        daemon.synced_again("hr")

        config.write_text(hr + broken.replace('colour = "blue"\n', ""))  # `new` removed
        logged = daemon.reload("configuration reloaded")
        assert any(line.endswith("configuration reloaded: 2 tenants scheduled (removed: new)") for line in logged)
        # A fire of `new` that passed its check just before the reload runs to its end (with the
        # settings it started with): its run row is there once a second has gone by. Two syncs of
        # hr, not one: the first may be a run already under way at the reload, which ends at once.
        daemon.synced_again("hr")
        daemon.synced_again("hr")
        daemon.wait(lambda: all(r["status"] != "running" for r in daemon.store.runs("new", 5)))
        runs = daemon.runs("new")
        daemon.synced_again("fixme")
        daemon.synced_again("hr")
        assert daemon.runs("new") == runs  # not synced any more
        assert daemon.proc.poll() is None
    finally:
        # The stop itself may cut off a fire of the 1 s schedule ("interrupted"): only the reloads
        # must have interrupted nothing.
        before_stop = daemon.log.read_text()
        err = daemon.stop()
    assert daemon.proc.returncode == 0, err
    assert "Traceback" not in err and "interrupted" not in before_stop, err
    assert env["secret"] not in err


def test_sighup_with_a_mistake_in_the_file_keeps_the_daemon_syncing(env, store_url):
    """A reload that cannot apply must not stop the daemon: a TOML syntax error is one ERROR line
    and the running configuration stays; a new store URL is refused with a warning naming it (the
    daemon keeps the store it opened), the rest of that file applied."""
    config = Path(env["config"])
    good = config.read_text() + 'schedule = "1s"\n'
    config.write_text(good)
    daemon = _Daemon(env, store_url)
    other = Path(env["tmp"]) / "other.db"
    try:
        daemon.wait(lambda: daemon.succeeded("hr") >= 1)

        config.write_text(good + "[tenants.hr\n")
        logged = daemon.reload("configuration not reloaded")
        [error] = [line for line in logged if " ERROR " in line]
        assert error.split(" ERROR ", 1)[1].startswith(
            f"dirpull.daemon: configuration not reloaded, the daemon goes on with the one it has: {config}: "
            "not valid TOML: "
        ), error
        daemon.synced_again("hr")

        text = good.replace(f'url = "{store_url}"', f'url = "sqlite:///{other}"')
        assert text != good
        config.write_text(text.replace('schedule = "1s"', 'schedule = "2s"'))
        logged = daemon.reload("configuration reloaded")
        assert [line.split(" WARNING ", 1)[1] for line in logged if " WARNING " in line] == [
            "dirpull.daemon: configuration reload: store.url cannot change while the daemon runs; "
            "kept as at start (restart to apply)"
        ], logged
        assert any(line.endswith("configuration reloaded: 1 tenants scheduled (rescheduled: hr)") for line in logged)
        daemon.synced_again("hr")  # in the store it started with
        assert daemon.proc.poll() is None
    finally:
        err = daemon.stop()
    assert daemon.proc.returncode == 0, err
    assert not other.exists()


def test_unknown_tenant_and_bad_usage_exit_2(env):
    r = run(env, "users", "nope")
    assert r.exit_code == 2 and r.stderr.strip() == "dirpull: unknown tenant 'nope' (known: hr)"
    r = run(env, "users", "hr", "--state", "gone")
    assert r.exit_code == 2


def test_a_tenant_removed_from_the_configuration_is_still_queried_from_the_store(env):
    """A tenant taken out of the configuration (a customer offboarded) was an unknown tenant to
    every query, exit 2, though the store holds its data: a consumer could not drain its last
    events, nor an operator look at its runs. The queries read it now, with a note; `sync`
    still refuses it, and a tenant the store does not know either is still unknown."""
    assert run(env, "sync", "hr").exit_code == 0
    users = jsonl(run(env, "users", "hr", "--json").stdout)
    events = jsonl(run(env, "events", "hr", "--json").stdout)
    config = Path(env["config"])
    config.write_text(config.read_text().replace("[tenants.hr]", "[tenants.next]"))  # hr removed
    note = f"dirpull: note: tenant hr is not in the configuration {config}; showing what the store holds of it\n"

    r = run(env, "events", "hr", "--after", str(events[-4]["seq"]), "--json")
    assert (r.exit_code, r.stderr) == (0, note) and jsonl(r.stdout) == events[-3:]
    r = run(env, "users", "hr", "--json")
    assert (r.exit_code, r.stderr) == (0, note) and jsonl(r.stdout) == users
    r = run(env, "runs", "hr", "--json")
    assert (r.exit_code, r.stderr) == (0, note) and [row["status"] for row in jsonl(r.stdout)] == ["succeeded"]
    r = run(env, "groups", "hr")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "idp_id\tname\temail\tdescription\n", note)

    r = run(env, "sync", "hr")
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", "dirpull: unknown tenant 'hr' (known: next)\n")
    for command in ("users", "groups", "events", "runs"):
        r = run(env, command, "nope")
        assert (r.exit_code, r.stdout, r.stderr) == (2, "", "dirpull: unknown tenant 'nope' (known: next)\n")


@pytest.fixture
def okta(tmp_path: Path, store_url: str) -> Iterator[dict]:
    """A tenant with groups (BambooHR has none): `demo-okta`, synced from the Okta emulator."""
    org = Org.generate(30, seed=5)
    cluster = Cluster(org)
    cluster.start(["okta"])
    try:
        config = tmp_path / "dirpull.toml"
        config.write_text(cluster.config_toml(tmp_path, store_url=store_url))
        okta = {"config": str(config), "org": org, "secret": cluster.emulators["okta"].api_token}
        assert run(okta, "sync", "demo-okta").exit_code == 0
        yield okta
    finally:
        cluster.stop()


def test_dry_run_json_events_have_every_field_of_the_applied_ones(okta):
    """A planned event had no `tenant`, and no `previous_attributes` but on updates: a consumer
    reading it with its code for applied events failed on a KeyError. Each now has every field of
    the event the sync then writes; what only the commit sets (seq, run_id, created_at) is null."""
    org = okta["org"]
    person = next(p for p in org.people.values() if p.visible and p.state == "active" and p.n > 1)
    org.update_person(person.n, title="Principal")
    org.hire()
    group = next(iter(org.groups))
    outside = next(p.n for p in org.people.values() if p.visible and p.n not in org.groups[group].members)
    org.add_member(group, outside)
    org.delete(next(p.n for p in org.people.values() if p.visible and p.n not in (1, person.n, outside)))
    seq = max(e["seq"] for e in jsonl(run(okta, "events", "demo-okta", "--json").stdout))
    r = run(okta, "sync", "demo-okta", "--full", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    planned = jsonl(r.stdout)[1:]
    assert {"user.created", "user.updated", "user.deleted", "group.user_added"} <= {e["type"] for e in planned}
    for e in planned:
        assert set(e) >= EVENT_KEYS | {"planned"}, e
        assert (e["planned"], e["tenant"], e["seq"], e["run_id"], e["created_at"]) == (
            True, "demo-okta", None, None, None
        ), e  # fmt: skip
        assert (e["previous_attributes"] is None) == (not e["type"].endswith(".updated")), e
    assert run(okta, "sync", "demo-okta", "--full").exit_code == 0
    applied = jsonl(run(okta, "events", "demo-okta", "--after", str(seq), "--json").stdout)
    assert [(e["type"], e["tenant"], e["previous_attributes"]) for e in applied] == [
        (e["type"], e["tenant"], e["previous_attributes"]) for e in planned
    ]


def test_event_data_lists_the_objects_fields_in_the_contracts_order(okta):
    """A user or group event's `data` is the object, but its fields came in the stored JSON's order:
    alphabetical on SQLite (`idp_id` between `first_name` and `job_title`), PostgreSQL's jsonb order
    (shortest key first) there, unlike `users --json` and `groups --json`, which follow the contract.
    Planned (`sync --dry-run --json`) and applied events now list them as those do, on both stores."""
    org = okta["org"]
    person = next(p for p in org.people.values() if p.visible and p.state == "active" and p.n > 1)
    org.update_person(person.n, title="Principal")
    org.hire()
    groups = list(org.groups)
    org.update_group(groups[0], description="Everyone who builds")
    org.delete_group(groups[-1])
    org.delete(next(p.n for p in org.people.values() if p.visible and p.n not in (1, person.n)))
    user_order = list(jsonl(run(okta, "users", "demo-okta", "--json").stdout)[0])
    group_order = list(jsonl(run(okta, "groups", "demo-okta", "--json").stdout)[0])
    assert (user_order, group_order) == (USER_ORDER, GROUP_ORDER)
    seq = max(e["seq"] for e in jsonl(run(okta, "events", "demo-okta", "--json").stdout))
    planned = jsonl(run(okta, "sync", "demo-okta", "--full", "--dry-run", "--json").stdout)[1:]
    assert run(okta, "sync", "demo-okta", "--full").exit_code == 0
    applied = jsonl(run(okta, "events", "demo-okta", "--after", str(seq), "--json").stdout)
    everything = jsonl(run(okta, "events", "demo-okta", "--json").stdout)
    kinds = {"user.created", "user.updated", "user.deleted", "group.created", "group.updated", "group.deleted"}
    for events in (planned, applied, everything):
        objects = [e for e in events if e["type"] in kinds]
        assert {e["type"] for e in objects} >= (kinds if events is everything else kinds - {"group.created"})
        for e in objects:
            order = user_order if e["type"].startswith("user.") else group_order
            assert list(e["data"]) == order, e["type"]
            if e["previous_attributes"] is not None:  # the changed fields, in the object's order too
                assert list(e["previous_attributes"]) == [k for k in order if k in e["previous_attributes"]]


def test_an_empty_group_or_user_id_lists_no_one(okta):
    """`--group "$G"` with G unset or empty: no user is in a group without an id. It listed every
    user of the tenant as a member (and `--user ""` every group as one the user is in)."""
    assert jsonl(run(okta, "users", "demo-okta", "--json").stdout)
    for args in (["users", "demo-okta", "--group", ""], ["groups", "demo-okta", "--user", ""]):
        r = run(okta, *args, "--json")
        assert (r.exit_code, r.stdout) == (0, ""), args


def test_a_group_or_user_not_in_the_store_is_said_apart_from_one_without_members(okta):
    """`--group`/`--user` naming no group or user of the tenant (a typo, a group's name, a user's
    email) printed nothing and exited 0, as a group without members does: one line on stderr says
    so now, naming the idp_id to give when the name, username or email is of exactly one. Exit 0
    and stdout are as before; a real group, empty or not, says nothing on stderr."""
    groups = {g["idp_id"]: g for g in jsonl(run(okta, "groups", "demo-okta", "--json").stdout)}
    users = {u["idp_id"]: u for u in jsonl(run(okta, "users", "demo-okta", "--json").stdout)}
    members = {g: jsonl(run(okta, "users", "demo-okta", "--group", g, "--json").stdout) for g in groups}
    full = next(g for g in groups if members[g])
    empty = next(g for g in groups if not members[g])
    for g in (full, empty):
        r = run(okta, "users", "demo-okta", "--group", g, "--json")
        assert (r.exit_code, r.stderr, len(jsonl(r.stdout))) == (0, "", len(members[g]))

    def said(*args: str) -> str:
        """stderr of the query, which lists no one and exits 0, with --json or not."""
        r = run(okta, *args, "--json")
        assert (r.exit_code, r.stdout) == (0, "")
        plain = run(okta, *args)
        assert (plain.exit_code, plain.stderr) == (0, r.stderr)
        assert len(plain.stdout.splitlines()) == 1  # the table's header, as before
        return r.stderr

    name = groups[full]["name"]
    assert said("users", "demo-okta", "--group", "no-such-group") == (
        "dirpull: no group 'no-such-group' in tenant demo-okta (give its idp_id: see dirpull groups demo-okta)\n"
    )
    assert said("users", "demo-okta", "--state", "active", "--group", name.upper()) == (
        f"dirpull: no group {name.upper()!r} in tenant demo-okta; did you mean --group {full} ({name})?\n"
    )
    user = next(u for u in users.values() if u["email"])
    assert said("groups", "demo-okta", "--user", user["email"]) == (
        f"dirpull: no user {user['email']!r} in tenant demo-okta; did you mean --user {user['idp_id']} "
        f"({user['username']})?\n"
    )
    assert said("groups", "demo-okta", "--user", "nobody") == (
        "dirpull: no user 'nobody' in tenant demo-okta (give its idp_id: see dirpull users demo-okta)\n"
    )
    assert said("groups", "demo-okta", "--user", "") == (
        "dirpull: no user '' in tenant demo-okta (give its idp_id: see dirpull users demo-okta)\n"
    )

    # Two groups of one name: no guess, the idp_id it takes.
    other = next(g for g in okta["org"].groups.values() if g.name != name)
    okta["org"].update_group(other.n, name=name)
    assert run(okta, "sync", "demo-okta").exit_code == 0
    assert said("users", "demo-okta", "--group", name) == (
        f"dirpull: no group {name!r} in tenant demo-okta (the name or email of more than one group: give the "
        "idp_id, see dirpull groups demo-okta)\n"
    )


def test_after_and_limit_beyond_any_seq(env):
    """`--after` past the end is nothing to read; a number no store can hold is a bad option
    (exit 2, one line), not a traceback."""
    assert run(env, "sync", "hr").exit_code == 0
    r = run(env, "events", "hr", "--after", str(2**63 - 1), "--limit", str(2**63 - 1), "--json")
    assert (r.exit_code, r.stdout) == (0, "")
    huge = "1" + "0" * 20
    for args in (["events", "hr", "--after", huge], ["events", "hr", "--limit", huge], ["runs", "hr", "--limit", huge]):
        r = run(env, *args)
        assert (r.exit_code, r.stdout) == (2, ""), args
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"dirpull: Invalid value for '{args[2]}'")


def test_a_tenant_whose_secret_is_missing_fails_alone(env, monkeypatch):
    """One tenant's unset variable: `sync` of it exits 2 naming file, tenant and key; the daemon
    still starts, syncs the other tenants, and records that tenant's runs as failed with the cause."""
    monkeypatch.delenv("DIRPULL_TEST_UNSET_KEY", raising=False)
    config = Path(env["config"])
    text = config.read_text().replace("[defaults.guard]", '[defaults]\nschedule = "1s"\n[defaults.guard]')
    config.write_text(
        text + '[tenants.broken]\nprovider = "bamboohr"\ncompany_domain = "x"\napi_key = "env:DIRPULL_TEST_UNSET_KEY"\n'
    )
    r = run(env, "sync", "broken")
    assert r.exit_code == 2
    why = "tenants.broken.api_key: environment variable DIRPULL_TEST_UNSET_KEY is not set"
    assert r.stderr == f"dirpull: {config}: {why}\n"

    r = run(env, "run", "--max-seconds", "4")
    assert r.exit_code == 0
    assert why in r.stderr
    # The stop at 4 s may cut off hr's newest run (recorded as interrupted); the others succeeded.
    hr_runs = jsonl(run(env, "runs", "hr", "--json").stdout)
    assert any(r["status"] == "succeeded" for r in hr_runs)
    assert all(r["status"] == "succeeded" or r["error"].startswith("interrupted") for r in hr_runs), hr_runs
    assert len(jsonl(run(env, "users", "hr", "--json").stdout)) == len(env["org"].people)
    broken = jsonl(run(env, "runs", "broken", "--json").stdout)
    assert broken and all(r["status"] == "failed" and "DIRPULL_TEST_UNSET_KEY" in r["error"] for r in broken)


# A name ending in PASSWORD, and one that is exactly a credential field's name (as the vendor's
# console calls the setting): both were taken for an echoed field.
@pytest.mark.parametrize("variable", ["DIRPULL_TEST_UNSET_PASSWORD", "CLIENT_SECRET", "PASSWORD"])
def test_a_missing_secret_named_like_a_password_is_quoted_whole_in_the_runs_error(env, monkeypatch, variable):
    """A variable whose name ends in PASSWORD (or CLIENT_SECRET, TOKEN…): the run's error quoted
    the cause as "env:WD_PASSWORD: *** variable is not set", the masking of echoed password fields
    taking dirpull's own word "environment" for a password."""
    monkeypatch.delenv(variable, raising=False)
    config = Path(env["config"])
    text = config.read_text().replace("[defaults.guard]", '[defaults]\nschedule = "1s"\n[defaults.guard]')
    config.write_text(
        text + '[tenants.broken]\nprovider = "bamboohr"\ncompany_domain = "x"\n'
        f'api_key = "env:{variable}"\n'
    )
    assert run(env, "run", "--max-seconds", "2").exit_code == 0
    broken = jsonl(run(env, "runs", "broken", "--json").stdout)
    assert broken and all(f"{variable}: environment variable is not set" in r["error"] for r in broken), broken
    status = jsonl(run(env, "status", "--json").stdout)
    (attention,) = [s["attention"] for s in status if s["tenant"] == "broken"]
    assert any("environment variable is not set" in a for a in attention), attention


def test_a_disabled_tenants_missing_secret_is_not_logged_as_failing_runs(env, monkeypatch):
    """A tenant set aside with `enabled = false` (its secret already removed) never runs: the
    daemon's start must not say "its runs fail until this is fixed" about it, an ERROR an operator
    would chase, nor record runs for it."""
    monkeypatch.delenv("DIRPULL_TEST_UNSET_KEY", raising=False)
    config = Path(env["config"])
    config.write_text(config.read_text() + '[tenants.parked]\nprovider = "bamboohr"\ncompany_domain = "x"\n'
                      'api_key = "env:DIRPULL_TEST_UNSET_KEY"\nenabled = false\n')  # fmt: skip
    r = run(env, "run", "--max-seconds", "1")
    assert r.exit_code == 0, r.stderr
    assert "DIRPULL_TEST_UNSET_KEY" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "parked" in line and " ERROR " in line] == [], r.stderr
    assert "tenant parked (bamboohr) is disabled: not scheduled" in r.stderr
    assert jsonl(run(env, "runs", "parked", "--json").stdout) == []


def test_an_empty_secret_is_named_not_sent_to_the_vendor(env, monkeypatch):
    """A variable set to nothing (`KEY=` in a unit file) or a secret file mounted empty: `sync`
    exits 2 naming the file, tenant and key, as for an unset one, and the daemon's runs of the
    tenant fail saying so. Before, the empty key went to the vendor and the run failed with its 401."""
    config = Path(env["config"])
    text = config.read_text().replace("[defaults.guard]", '[defaults]\nschedule = "1s"\n[defaults.guard]')
    monkeypatch.setenv("DIRPULL_TEST_EMPTY_KEY", "")
    config.write_text(text.replace('api_key = "file:key"', 'api_key = "env:DIRPULL_TEST_EMPTY_KEY"'))
    r = run(env, "sync", "hr")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == f"dirpull: {config}: tenants.hr.api_key: environment variable DIRPULL_TEST_EMPTY_KEY is empty\n"

    r = run(env, "run", "--max-seconds", "3")
    assert r.exit_code == 0
    runs = jsonl(run(env, "runs", "hr", "--json").stdout)
    failed = [r for r in runs if not r["error"].startswith("interrupted")]
    why = "bamboohr: api_key: secret env:DIRPULL_TEST_EMPTY_KEY: environment variable is empty"
    assert failed and all(r["status"] == "failed" and r["error"] == why for r in failed), [r["error"] for r in runs]

    (env["tmp"] / "key").write_text("\n")
    config.write_text(text)
    r = run(env, "sync", "hr")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == f"dirpull: {config}: tenants.hr.api_key: secret file key ({env['tmp'] / 'key'}) is empty\n"


def test_a_relative_secret_file_that_is_missing_is_named_where_it_was_looked_for(env):
    """`file:acme.key` is taken from the configuration file's folder, not the current one (the
    systemd unit runs in /var/lib/dirpull with its configuration in /etc/dirpull). `sync` said
    "secret file acme.key does not exist", and the operator looked for it in the wrong folder; it
    now names the path it looked at too. An absolute path is shown once, as written."""
    config = Path(env["config"])
    assert Path.cwd() != env["tmp"]
    config.write_text(config.read_text().replace('api_key = "file:key"', 'api_key = "file:acme.key"'))
    r = run(env, "sync", "hr")
    assert (r.exit_code, r.stdout) == (2, "")
    why = f"secret file acme.key ({env['tmp'] / 'acme.key'}) does not exist"
    assert r.stderr == f"dirpull: {config}: tenants.hr.api_key: {why}\n"
    absolute = env["tmp"] / "elsewhere.key"
    config.write_text(config.read_text().replace('"file:acme.key"', f'"file:{absolute}"'))
    r = run(env, "sync", "hr")
    assert r.stderr == f"dirpull: {config}: tenants.hr.api_key: secret file {absolute} does not exist\n"


def test_a_duration_given_as_a_bare_number_is_told_to_take_a_unit(env):
    """`lease_ttl = 60` or a tenant's `schedule = 5`, written as `timeout` and `cursor_holdback`
    take seconds: the message was "Input should be a valid string", which did not say that the
    unit (and the quotes) were missing. It now shows the value with the units to choose from."""
    config = Path(env["config"])
    text = config.read_text()
    config.write_text(text.replace("[defaults.guard]", "[defaults]\nlease_ttl = 60\n[defaults.guard]"))
    r = run(env, "status")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == (
        f'dirpull: {config}: defaults.lease_ttl: 60 has no unit: write it in quotes with one, "60s", "60m", '
        '"60h" or "60d"\n'
    )
    config.write_text(text + "schedule = 5\n")  # [tenants.hr] is the last table
    r = run(env, "sync", "hr")
    assert r.exit_code == 2
    assert r.stderr == (
        f'dirpull: {config}: tenants.hr.schedule: 5 has no unit: write it in quotes with one, "5s", "5m", "5h" '
        'or "5d", or "cron: …"\n'
    )


def test_a_secret_file_that_is_a_directory_is_named_as_one(env):
    """`file:` naming a mounted secret's folder instead of the file in it: `sync` exits 2 saying it
    is a directory, naming the file, tenant and key. Before, it said the file "does not exist",
    while `ls` showed it there."""
    config = Path(env["config"])
    (env["tmp"] / "secrets").mkdir()
    config.write_text(config.read_text().replace('api_key = "file:key"', 'api_key = "file:secrets"'))
    r = run(env, "sync", "hr")
    assert (r.exit_code, r.stdout) == (2, "")
    why = f"secret file secrets ({env['tmp'] / 'secrets'}) is a directory; name the file that holds the secret"
    assert r.stderr == f"dirpull: {config}: tenants.hr.api_key: {why}\n"


def test_a_secret_file_that_is_a_named_pipe_is_named_as_one_and_never_waited_on(env):
    """`file:` naming a FIFO (a secrets agent's pipe, a mistake): `sync` exits 2 saying it is not a
    regular file. Before, it said the file "does not exist" while `ls` showed it, and a run that
    read it anyway (the daemon's) blocked on the open forever, no writer coming."""
    config = Path(env["config"])
    pipe = env["tmp"] / "pipe"
    os.mkfifo(pipe)
    config.write_text(config.read_text().replace('api_key = "file:key"', 'api_key = "file:pipe"'))
    r = run(env, "sync", "hr")
    assert (r.exit_code, r.stdout) == (2, "")
    why = f"secret file pipe ({pipe}) is not a regular file (a pipe, a socket, a device); name the file that holds it"
    assert r.stderr == f"dirpull: {config}: tenants.hr.api_key: {why}\n"
    secret = load_config(str(config)).tenants["hr"].api_key
    said: list[str] = []

    def read() -> None:
        try:
            secret.get()
        except ConfigError as exc:
            said.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)  # daemon: a reader left waiting ends with the tests
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "reading the secret waited for a writer to open the pipe"
    assert said and "is not a regular file" in said[0], said


def test_a_secret_file_that_cannot_be_examined_is_named_without_a_traceback(env):
    """A `file:` path that stat() refuses with an error other than "no such file" (a folder the
    daemon's user may not enter: EACCES; here, as tests run as root, a name too long) is one line
    naming the file, tenant and key, exit 2. Before, it was a PermissionError/OSError traceback."""
    config = Path(env["config"])
    long = "k" * 300
    config.write_text(config.read_text().replace('api_key = "file:key"', f'api_key = "file:{long}"'))
    r = run(env, "sync", "hr")
    assert (r.exit_code, r.stdout) == (2, "")
    why = f"secret file {long} ({env['tmp'] / long}) cannot be examined (File name too long)"
    assert r.stderr == f"dirpull: {config}: tenants.hr.api_key: {why}\n"


@pytest.mark.parametrize("args", [("users", "hr", "--json"), ("events", "hr", "--json")], ids=["users", "events"])
def test_a_reader_that_stops_early_ends_dirpull_quietly_with_141(env, args):
    """`dirpull users T --json | head -1`: once the reader has gone, dirpull stops, prints nothing
    and exits 141 (128 + SIGPIPE), as `cat` would. Before, it exited 1, README's code for "no
    store", failing a `set -o pipefail` script as if the store were missing."""
    for _ in range(400):  # ~350 kB of JSON Lines: far beyond what the pipe holds once the reader is gone
        env["org"].hire()
    assert run(env, "sync", "hr").exit_code == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", "--config", env["config"], *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        proc.stdout.close()  # as `head -1` exits
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert first["idp_id"] if args[0] == "users" else first["seq"]
    assert (proc.returncode, err) == (141, b"")


def _break_tenants(env: dict, *, schedule: str | None = None) -> tuple[Path, dict[str, list[str]]]:
    """To the env's configuration (tenant hr, good): `other`, a copy of hr whose table has two
    mistakes, `gone` with a provider nobody knows, `g` with a Google key given as a bare path,
    `bad id` and `okt` polling Okta's System Log with full syncs rarer than it keeps events.
    The configuration file, and each broken tenant's error lines as a strict load words them."""
    config = Path(env["config"])
    text = config.read_text()
    if schedule:
        text = text.replace("[defaults.guard]", f'[defaults]\nschedule = "{schedule}"\n[defaults.guard]')
    hr = text[text.index("[tenants.hr]") :].replace("[tenants.hr]", "[tenants.other]")
    config.write_text(
        text + hr + 'schedule = "often"\ncolour = "blue"\n'
        '[tenants.gone]\nprovider = "ldap"\n'
        '[tenants.g]\nprovider = "google_workspace"\ncredentials_file = "/etc/dirpull/sa.json"\nsubject = "a@b.c"\n'
        '[tenants."bad id"]\nprovider = "okta"\n'
        '[tenants.okt]\nprovider = "okta"\norg_url = "https://acme.okta.com"\napi_token = "t"\n'
        'poll_system_log = true\nfull_sync_every = "100d"\n'
    )
    return config, {
        "other": [
            f"{config}: tenants.other.schedule: 'often' is not a duration like 30s, 15m, 6h or 1d",
            f"{config}: tenants.other.colour: unknown key",
        ],
        "gone": [
            f"{config}: tenants.gone: unknown provider 'ldap'; "
            "use one of: entra_id, google_workspace, okta, workday, bamboohr"
        ],
        "g": [
            f"{config}: tenants.g.credentials_file: must be file:PATH (the key's file), env:NAME or the JSON key "
            "itself; a path is written file:PATH"
        ],
        "bad id": [f"{config}: tenants: tenant id 'bad id': use letters, digits, '-', '_' or '.'"],
        "okt": [
            f"{config}: tenants.okt.full_sync_every: with poll_system_log at most 90d (the System Log keeps 90 days)"
        ],
    }


def test_a_mistake_in_one_tenants_table_leaves_the_other_tenants_usable(env):
    """DESIGN, Operating it: a bad configuration of one tenant does not stop the rest. Before, one
    unknown key or bad schedule in one `[tenants.X]` table failed every command, exit 2: no tenant
    could be synced, queried or shown in `dirpull status`. Now that tenant alone is refused by
    `sync` (exit 2, its lines as before), shown in `status` with the mistake, and still queried."""
    config = Path(env["config"])
    good = config.read_text()
    config.write_text(good + good[good.index("[tenants.hr]") :].replace("[tenants.hr]", "[tenants.other]"))
    assert run(env, "sync", "other").exit_code == 0  # its data is in the store before the mistake
    config.write_text(good)
    config, errors = _break_tenants(env)

    r = run(env, "sync", "other")
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", "dirpull: " + "\n".join(errors["other"]) + "\n")
    for name in ("g", "bad id", "okt"):
        r = run(env, "sync", name)
        assert (r.exit_code, r.stdout, r.stderr) == (2, "", f"dirpull: {errors[name][0]}\n")

    r = run(env, "sync", "hr")
    assert r.exit_code == 0 and r.stdout.startswith("hr: succeeded (full)"), r.output
    assert [line for line in r.stderr.splitlines() if line.startswith("dirpull: ")] == [
        f"dirpull: warning: tenant {name} is not synced until its configuration is fixed: {'; '.join(lines)}"
        for name, lines in errors.items()
    ]

    r = run(env, "users", "other", "--json")  # read from the store, with why it is not synced
    assert r.exit_code == 0 and len(jsonl(r.stdout)) == len(env["org"].people)
    assert r.stderr == f"dirpull: warning: tenant other is not synced until its configuration is fixed: " \
        f"{'; '.join(errors['other'])}\n"  # fmt: skip
    assert [row["status"] for row in jsonl(run(env, "runs", "other", "--json").stdout)] == ["succeeded"]
    r = run(env, "users", "hr", "--json")  # a good tenant's query: no warnings about the others
    assert r.exit_code == 0 and r.stderr == "" and len(jsonl(r.stdout)) == len(env["org"].people)
    r = run(env, "users", "nope")
    assert r.exit_code == 2 and r.stderr == "dirpull: unknown tenant 'nope' (known: bad id, g, gone, hr, okt, other)\n"

    r = run(env, "status", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["tenant"]: row for row in jsonl(r.stdout)}
    assert list(rows) == ["bad id", "g", "gone", "hr", "okt", "other"]
    assert rows["hr"]["attention"] == [] and rows["hr"]["next_run"] is not None
    for name, lines in errors.items():
        assert rows[name]["attention"] == [f"configuration error: {'; '.join(lines)}"], rows[name]
        assert (rows[name]["schedule"], rows[name]["next_run"]) == (None, None)  # not scheduled
    assert [row["provider"] for row in rows.values()] == [
        "okta", "google_workspace", None, "bamboohr", "okta", "bamboohr"
    ]  # fmt: skip
    assert (rows["other"]["result"], rows["g"]["result"]) == ("succeeded", "never synced")
    plain = run(env, "status").stdout.splitlines()
    assert plain[3] == f"gone\t-\t-\tnever synced\t-\tconfiguration error: {errors['gone'][0]}"
    assert run(env, "db", "check").exit_code == 0

    # A mistake outside the tenant tables still fails every command, listing every mistake (those of
    # the tenants' own checks, made once the tables load, aside).
    config.write_text(config.read_text().replace("[defaults.guard]", "[defaults]\nlease_ttl = 5\n[defaults.guard]"))
    r = run(env, "status")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr.startswith(f"dirpull: {config}: defaults.lease_ttl: 5 has no unit: write it in quotes with one, ")
    assert all(line in r.stderr for name in ("other", "gone", "g", "bad id") for line in errors[name]), r.stderr


def test_the_daemon_syncs_the_good_tenants_while_one_tenants_table_has_a_mistake(env, store_url):
    """Before, `dirpull run` exited 2 on one tenant's mistake and no tenant synced (systemd
    restarted it every 10 s, forever). Now it logs one ERROR line per broken tenant and syncs
    the rest; only when no tenant is left does it exit 2 with the mistakes."""
    config, errors = _break_tenants(env, schedule="1s")
    r = run(env, "run", "--max-seconds", "4")
    assert r.exit_code == 0, r.output
    logged = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert [line.split(" ERROR ", 1)[1].split(": ", 1)[1] for line in logged] == [
        f"tenant {name} is not scheduled: {'; '.join(lines)}" for name, lines in errors.items()
    ], r.stderr
    runs = jsonl(run(env, "runs", "hr", "--json").stdout)
    assert sum(1 for row in runs if row["status"] == "succeeded") >= 2, runs
    assert len(jsonl(run(env, "users", "hr", "--json").stdout)) == len(env["org"].people)
    assert all(run(env, "runs", name, "--json").stdout == "" for name in errors)

    # Every tenant broken: nothing to run, exit 2 with the mistakes, as before.
    text = config.read_text()
    config.write_text(text.replace("[tenants.hr]", "[tenants.hr]\ncolour = 1", 1))
    r = run(env, "run", "--max-seconds", "4")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr.startswith(f"dirpull: {config}: tenants.hr.colour: unknown key\n"), r.stderr
    assert all(line in r.stderr for lines in errors.values() for line in lines), r.stderr


def test_config_mistake_exits_2_with_file_tenant_and_key(tmp_path):
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text('[tenants.hr]\nprovider = "bamboohr"\ncompany_domain = "acme"\n')
    for command in ("sync hr", "run"):  # the daemon with no tenant it can schedule
        r = CliRunner().invoke(app, ["--config", str(cfg), *command.split()])
        assert (r.exit_code, r.stdout) == (2, ""), command
        assert r.stderr == f"dirpull: {cfg}: tenants.hr.api_key: Field required\n", command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirpull.toml"]  # no store made


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["events", "hr", "--bogus"], "No such option: --bogus (see 'dirpull events --help')"),
        (["events", "hr", "--jsn"], "No such option: --jsn (Possible options: --json) (see 'dirpull events --help')"),
        (["events"], "Missing argument 'tenant'. (see 'dirpull events --help')"),
        (["events", "hr", "--after", "x"], "Invalid value for '--after': "),
        (["users", "hr", "--state", "gone"], "Invalid value for '--state': 'gone' is not one of 'active', 'inactive'."),
        (["nosuch"], "No such command 'nosuch'. (see 'dirpull --help')"),
        (["--bogus", "status"], "No such option: --bogus (see 'dirpull --help')"),
        (["db", "check", "--bogus"], "No such option: --bogus (see 'dirpull db check --help')"),
        (["demo", "--schedule", "5x"], "Invalid value for '--schedule': '5x' is not a duration like 30s"),
        (["sync", "hr", "--wait", "-5"], "Invalid value for '--wait': Input should be greater than or equal to 0"),
        (["run", "--max-seconds", "-1"], "Invalid value for '--max-seconds': Input should be greater than or equal"),
        (["emulate", "--changes-every", "-1"], "Invalid value for '--changes-every': Input should be greater than"),
        (["demo", "--duration", "1e300"], "Invalid value for '--duration': Input should be less than or equal to "),
        # A global option after the command: "No such option: -c" read as if there were none.
        (["status", "-c", "x.toml"], "-c is a global option: give it before the command, `dirpull -c … status …`"),
        (
            ["db", "check", "--log-level=debug"],
            "--log-level is a global option: give it before the command, `dirpull --log-level … db check …`",
        ),
        (
            ["sync", "hr", "--log-format", "json"],
            "--log-format is a global option: give it before the command, `dirpull --log-format … sync …`",
        ),
    ],
)
def test_bad_usage_is_one_line_exit_2(args, expected):
    """As the contract says: exit 2 and one line on stderr (with where to find help), not a usage
    block or a Rich box."""
    r = CliRunner().invoke(app, args, prog_name="dirpull")
    assert (r.exit_code, r.stdout) == (2, "")
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"dirpull: {expected}") and "--help" in r.stderr


BAMBOO = '[tenants.hr]\nprovider = "bamboohr"\ncompany_domain = "acme"\napi_key = "k"\n'


@pytest.mark.parametrize(
    ("toml", "env_vars", "expected"),
    [
        ('[defaults]\nschedule = "9999999999d"\n', {}, "defaults.schedule: '9999999999d' is too long; at most 36500d"),
        ('[defaults]\nlease_ttl = "99999999h"\n', {}, "defaults.lease_ttl: '99999999h' is too long; at most 36500d"),
        # Parses, but there is no February 31st: the tenant never synced and status said its next run was now.
        (
            '[defaults]\nschedule = "cron: 0 0 31 2 *"\n',
            {},
            "defaults.schedule: cron expression '0 0 31 2 *' never fires (no such date)",
        ),
        ('store = "x"\n', {"DIRPULL_STORE_URL": "sqlite:///s.db"}, "store: must be a table ([store])"),
        # A short key's slip (two letters swapped, one off) gets the hint too; an unrelated key none.
        ('[store]\nulr = "sqlite:///s.db"\n', {}, "store.ulr: unknown key; did you mean url?"),
        ('[store]\nurk = "sqlite:///s.db"\n', {}, "store.urk: unknown key; did you mean url?"),
        ('[store]\nuid = "dirpull"\n', {}, "store.uid: unknown key"),
        ('[store]\nuser = "dirpull"\n', {}, "store.user: unknown key"),
        # Set but empty (a templated unit whose variable came out empty): the file's URL, or the
        # default ./dirpull.db, was used without a word.
        (
            '[store]\nurl = "sqlite:///s.db"\n',
            {"DIRPULL_STORE_URL": ""},
            "store.url (from $DIRPULL_STORE_URL): the variable is set but empty; give it the store's URL, or unset"
            " it to use the file's store.url",
        ),
        (
            "",
            {"DIRPULL_STORE_URL": " "},
            "store.url (from $DIRPULL_STORE_URL): the variable is set but empty; give it the store's URL, or unset"
            " it to use the file's store.url",
        ),
        (
            '[store]\nurl = "postgresql+psycopg://u:hunter2@db:5432x/d"\n',
            {},
            "store.url: 'postgresql+psycopg://u:***@db:5432x/d': the port is not a number",
        ),
        (
            "",
            {"DIRPULL_STORE_URL": "postgresql+psycopg//u:hunter2@db/d"},
            "store.url (from $DIRPULL_STORE_URL): 'postgresql+psycopg//u:***@db/d' is not a database URL"
            " (e.g. sqlite:///dirpull.db or postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE)",
        ),
        # Two slashes: a host, not a file. Before, every command ended in SQLAlchemy's traceback.
        (
            '[store]\nurl = "sqlite://dirpull.db"\n',
            {},
            "store.url: 'sqlite://dirpull.db': a SQLite URL has no host; the path follows three slashes"
            " (sqlite:///dirpull.db, relative to the current folder, or sqlite:////var/lib/dirpull/dirpull.db)",
        ),
        (
            "",
            {"DIRPULL_STORE_URL": "sqlite://u:hunter2@db/dirpull.db"},
            "store.url (from $DIRPULL_STORE_URL): 'sqlite://u:***@db/dirpull.db': a SQLite URL has no host; the path"
            " follows three slashes (sqlite:///dirpull.db, relative to the current folder, or"
            " sqlite:////var/lib/dirpull/dirpull.db)",
        ),
        # A driver dirpull does not install: before, every command ended in a ModuleNotFoundError
        # traceback (psycopg2 is also plain postgresql://'s driver on SQLAlchemy 2.0).
        (
            "",
            {"DIRPULL_STORE_URL": "postgresql+psycopg2://u:hunter2@db/d"},
            "store.url (from $DIRPULL_STORE_URL): unsupported driver 'psycopg2' for postgresql (dirpull uses"
            " psycopg: write postgresql+psycopg://…)",
        ),
        (
            '[store]\nurl = "sqlite+aiosqlite:///dirpull.db"\n',
            {},
            "store.url: unsupported driver 'aiosqlite' for sqlite (dirpull uses pysqlite: write sqlite:///…)",
        ),
    ],
)
def test_config_mistake_is_one_line_exit_2(tmp_path, monkeypatch, toml, env_vars, expected):
    """No traceback, whatever the mistake: one line naming the file and the key, exit 2."""
    for name, value in env_vars.items():
        monkeypatch.setenv(name, value)
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(toml + BAMBOO)
    r = CliRunner().invoke(app, ["--config", str(cfg), "status"])
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", f"dirpull: {cfg}: {expected}\n")
    assert "hunter2" not in r.stdout + r.stderr


@pytest.mark.parametrize(
    ("credentials", "key"),
    [
        ('username = ""\npassword = "hunter2"\n', "username"),
        ('token_url = "https://127.0.0.1:9/token"\nclient_id = ""\nclient_secret = "hunter2"\n'
         'refresh_token = "hunter2"\n', "client_id"),
    ],
)
def test_an_empty_workday_user_name_or_client_id_is_a_mistake_named_at_load(tmp_path, store_url, credentials, key):
    """A Workday tenant's empty `username` or `client_id` (a template whose value came out empty)
    loaded, and each run sent it to Workday and failed on its 401, exit 1, naming no key. As an
    empty secret or Entra's empty client_id, it is now the tenant's configuration mistake: `sync`
    exits 2 naming the file, the tenant and the key, and sends nothing."""
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(f'[store]\nurl = "{store_url}"\n[tenants.wd]\nprovider = "workday"\n'
                   f'users_report_url = "https://127.0.0.1:9/report"\n{credentials}')  # fmt: skip
    r = CliRunner().invoke(app, ["--config", str(cfg), "sync", "wd", "--json"])
    assert (r.exit_code, r.stdout) == (2, ""), r.output
    assert r.stderr == f"dirpull: {cfg}: tenants.wd.{key}: String should have at least 1 character\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("acme.bamboohr.com", "'acme.bamboohr.com' is the whole address; give only the company's part of it: 'acme'"),
        ("https://acme.bamboohr.com/", "'https://acme.bamboohr.com/' is the whole address; give only the company's"),
        ("acme corp", "'acme corp' is not a BambooHR company subdomain (the 'acme' of acme.bamboohr.com: letters,"),
    ],
)
def test_a_bamboohr_company_domain_given_as_the_whole_address_says_which_part_to_give(
    tmp_path, monkeypatch, value, expected
):
    """The host pasted from the browser's address bar: the message was pydantic's regex, "String
    should match pattern '^[A-Za-z0-9][A-Za-z0-9-]*$'", not what to write instead."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(BAMBOO.replace('company_domain = "acme"', f'company_domain = "{value}"'))
    r = CliRunner().invoke(app, ["--config", str(cfg), "sync", "hr"])
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr.startswith(f"dirpull: {cfg}: tenants.hr.company_domain: {expected}"), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "pattern" not in r.stderr


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ('timeout = "2m"', "tenants.hr.timeout: '2m' is not a number: this key takes seconds, without quotes or a unit:"
         " timeout = 120"),
        ('timeout = "soon"', "tenants.hr.timeout: 'soon' is not a number: write a number, without quotes"),
        ('batch_size = "lots"', "tenants.hr.batch_size: 'lots' is not a whole number: write a whole number,"
         " without quotes"),
    ],
)  # fmt: skip
def test_a_number_written_as_text_says_how_to_write_it(tmp_path, monkeypatch, key, expected):
    """`timeout = "2m"`, as `schedule` takes "2m": pydantic's "Input should be a valid number,
    unable to parse string as a number" said neither that the key takes seconds nor how to write it."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(BAMBOO + key + "\n")
    r = CliRunner().invoke(app, ["--config", str(cfg), "sync", "hr"])
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", f"dirpull: {cfg}: {expected}\n")


def test_a_list_written_as_one_string_says_to_put_it_in_brackets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(
        '[tenants.g]\nprovider = "google_workspace"\ncredentials_file = "file:sa.json"\nsubject = "a@b.example"\n'
        'org_units = "/Engineering"\n'
    )
    r = CliRunner().invoke(app, ["--config", str(cfg), "sync", "g"])
    expected = f'dirpull: {cfg}: tenants.g.org_units: must be a list, in brackets: org_units = ["/Engineering"]\n'
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", expected)


def test_a_config_file_not_in_utf8_is_named_and_a_bom_is_fine(tmp_path, monkeypatch):
    """Saved as Latin-1: one line naming the file and where, not a UnicodeDecodeError traceback.
    Saved by an editor that writes a byte-order mark: loads."""
    monkeypatch.chdir(tmp_path)  # the default store, ./dirpull.db, goes there
    cfg = tmp_path / "dirpull.toml"
    cfg.write_bytes("# Acme café\n".encode("latin-1") + BAMBOO.encode())
    r = CliRunner().invoke(app, ["--config", str(cfg), "status"])
    expected = f"dirpull: {cfg}: not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8\n"
    assert (r.exit_code, r.stdout, r.stderr) == (2, "", expected)
    cfg.write_bytes(b"\xef\xbb\xbf" + BAMBOO.encode())
    assert CliRunner().invoke(app, ["--config", str(cfg), "db", "upgrade"]).exit_code == 0  # status makes no store
    r = CliRunner().invoke(app, ["--config", str(cfg), "status"])
    assert r.exit_code == 0 and "hr\tbamboohr" in r.stdout, r.stderr


def test_db_commands(env):
    assert run(env, "db", "upgrade").exit_code == 0
    check = run(env, "db", "check")
    assert check.exit_code == 0 and f"schema {HEAD_REVISION}" in check.stdout


def test_the_systemd_unit_starts_the_daemon(env, monkeypatch):
    """config/dirpull.service as written: its ExecStartPre and ExecStart, with the configuration
    from its Environment=, once the store is migrated as its comment says."""
    unit = (Path(__file__).parent.parent / "config" / "dirpull.service").read_text()
    lines = [line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")]
    assert ["Environment", "DIRPULL_CONFIG=/etc/dirpull/dirpull.toml"] in lines
    # The runs spool people's records to TMPDIR: a /tmp of the unit's own, not the one every
    # service shares; a disk-backed TMPDIR is shown for hosts whose /tmp is RAM.
    assert ["PrivateTmp", "true"] in lines
    assert "# Environment=TMPDIR=/var/lib/dirpull/tmp\n" in unit
    config = Path(env["config"])
    config.write_text(config.read_text().replace("[defaults.guard]", '[defaults]\nschedule = "1s"\n[defaults.guard]'))
    monkeypatch.setenv("DIRPULL_CONFIG", str(config))
    pre = [shlex.split(v)[1:] for k, v in lines if k == "ExecStartPre"]
    start = [shlex.split(v)[1:] for k, v in lines if k == "ExecStart"]
    assert len(start) == 1
    assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 0
    for args in pre:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, [*start[0], "--max-seconds", "3"])
    assert r.exit_code == 0, r.stderr
    logged = jsonl(r.stderr)  # --log-format json: every line is a JSON object
    assert any(line["msg"].startswith("sync end tenant=hr") for line in logged)


def test_log_format_like_log_level_takes_any_case(env):
    args = ["--config", env["config"], "--log-format", "JSON", "--log-level", "INFO", "sync", "hr"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.stderr
    logged = jsonl(r.stderr)
    assert logged and any(line["msg"].startswith("sync end tenant=hr") for line in logged)
    bad = CliRunner().invoke(app, ["--config", env["config"], "--log-format", "xml", "status"])
    assert bad.exit_code == 2 and "--log-format must be text or json" in bad.stderr


def test_emulate_writes_a_config_that_loads(tmp_path):
    target = tmp_path / "emu.toml"
    r = CliRunner().invoke(
        app,
        ["emulate", "--provider", "bamboohr", "--people", "10", "--write-config", str(target), "--max-seconds", "0.5"],
    )
    assert r.exit_code == 0, r.stderr
    from dirpull.config import load_config

    cfg = load_config(target)
    assert [t.provider for t in cfg.tenants.values()] == ["bamboohr"]
    assert cfg.tenants["demo-bamboohr"].api_url.startswith("http://127.0.0.1:")


def test_two_emulator_configs_in_one_folder_keep_their_own_google_key(tmp_path: Path) -> None:
    """`emulate --write-config DIR/a.toml` and `DIR/b.toml` wrote the same
    `DIR/demo-google-google-service-account.json`: the second replaced the first's key, and the
    first config's Google tenant then failed to sign in to its own, still running, emulator."""
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    store = f"sqlite:///{tmp_path / 'a.db'}"
    root = Path(__file__).resolve().parent.parent
    args = ["emulate", "-p", "google_workspace", "--people", "5", "--max-seconds", "120", "--store-url", store]
    serving = subprocess.Popen(
        [sys.executable, "-m", "dirpull.cli", *args, "--write-config", str(first)],
        stderr=subprocess.PIPE, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    try:
        assert serving.stderr is not None
        lines = [serving.stderr.readline() for _ in range(3)]  # "wrote …", the emulator's URL, "serving"
        assert lines[-1].startswith("serving"), lines
        r = CliRunner().invoke(app, ["emulate", "-p", "google_workspace", "--people", "5", "--max-seconds", "0.1",
                                     "--write-config", str(second)])  # fmt: skip
        assert r.exit_code == 0, r.stderr
        keys = {load_config(p).tenants["demo-google"].credentials_file for p in (first, second)}
        assert len(keys) == 2, keys
        synced = CliRunner().invoke(app, ["--config", str(first), "sync", "demo-google", "--json"])
        assert synced.exit_code == 0, synced.output
        assert json.loads(synced.stdout.splitlines()[-1])["status"] == "succeeded"
    finally:
        serving.terminate()
        serving.wait(30)


def test_emulate_writes_its_config_readable_by_its_owner_only(tmp_path):
    """The config holds the emulators' secrets inline (client_secret, api_token, password,
    api_key): under the usual umask 022 it was written 0644, readable by every local account."""
    target, kept = tmp_path / "emu.toml", tmp_path / "kept.toml"
    kept.write_text("")
    kept.chmod(0o400 | 0o200)
    old = os.umask(0o022)
    try:
        for path in (target, kept):
            args = ["emulate", "-p", "okta", "--people", "5", "--write-config", str(path), "--max-seconds", "0.1"]
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0, r.stderr
    finally:
        os.umask(old)
    assert "api_token" in target.read_text()
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert oct(kept.stat().st_mode & 0o777) == "0o600" and "api_token" in kept.read_text()


def test_emulate_does_not_write_over_a_configuration_it_did_not_write(tmp_path):
    """`dirpull emulate --write-config dirpull.toml` beside the operator's own dirpull.toml wrote
    the emulators' tenants over it, without a word. Its own earlier file it still rewrites."""
    own = tmp_path / "dirpull.toml"
    own.write_text('[tenants.acme-hr]\nprovider = "bamboohr"\ncompany_domain = "acme"\napi_key = "env:K"\n')
    before = own.read_text()
    args = ["emulate", "-p", "okta", "--people", "5", "--write-config", str(own), "--max-seconds", "0.1"]
    r = CliRunner().invoke(app, args)
    assert (r.exit_code, r.stdout, own.read_text()) == (2, "", before)
    assert r.stderr == (
        f"dirpull: --write-config {own}: the file exists and is not a configuration dirpull emulate wrote;"
        " nothing overwritten (give another path, or remove the file first)\n"
    )
    emulated = tmp_path / "emu.toml"
    for _ in range(2):
        args[-3] = str(emulated)
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.stderr
    assert "demo-okta" in emulated.read_text()


def test_emulate_printing_its_config_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Before, every run left a /tmp/dirpull-emulate-* folder holding the Google emulator's key."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = CliRunner().invoke(app, ["emulate", "-p", "google_workspace", "--people", "5", "--max-seconds", "0.3"])
    assert r.exit_code == 0, r.stderr
    key = re.search(r'credentials_file = "file:([^"]+)"', r.stdout)
    assert key and Path(key.group(1)).parent.parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_emulate_into_a_missing_folder_is_one_line_exit_2(tmp_path):
    target = tmp_path / "no-such-dir" / "emu.toml"
    r = CliRunner().invoke(app, ["emulate", "-p", "okta", "--people", "5", "--write-config", str(target)])
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == f"dirpull: --write-config {target}: cannot write (No such file or directory)\n"


def test_cluster_config_toml_round_trips(tmp_path):
    cluster = Cluster(Org.generate(10))
    cluster.start(["bamboohr"])
    try:
        text = cluster.config_toml(tmp_path, store_url="sqlite:///x.db", schedule="10s")
    finally:
        cluster.stop()
    assert "[tenants.demo-bamboohr]" in text and 'schedule = "10s"' in text


def test_a_demo_schedule_with_a_line_break_runs_the_demo_not_a_traceback(tmp_path):
    """`dirpull demo --schedule` takes what a tenant's `schedule` takes, a line break after the
    interval too ("5m\\n" from a file or a template). The demo wrote it into its configuration
    unescaped: TOML refuses a line break inside a string, and the demo ended in a TOMLDecodeError
    traceback, exit 1, its emulators up until then. Any character is now written escaped."""
    args = ["demo", "--schedule", "5m\n", "--duration", "0.2", "--people", "5", "--workdir", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert load_config(tmp_path / "dirpull.toml").defaults.schedule == "5m\n"


def test_db_check_of_a_store_that_does_not_exist_creates_nothing(tmp_path, monkeypatch):
    """Before, it created an empty database file there (run from the wrong folder: a stray store)
    and said "schema empty" without saying where it had looked."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text('[store]\nurl = "sqlite:///dirpull.db"\n')
    r = CliRunner().invoke(app, ["--config", str(cfg), "db", "check"])
    assert r.exit_code == 1
    # It did not say what makes one: under the unit's ExecStartPre the service restarted every 10 s.
    expected = f"schema empty (no store at {tmp_path / 'dirpull.db'}), needed {HEAD_REVISION}"
    assert r.stdout == f"{expected} (`dirpull db upgrade` makes it)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirpull.toml"]

    assert CliRunner().invoke(app, ["--config", str(cfg), "db", "upgrade"]).exit_code == 0
    r = CliRunner().invoke(app, ["--config", str(cfg), "db", "check"])
    assert (r.exit_code, r.stdout) == (0, f"schema {HEAD_REVISION}, needed {HEAD_REVISION}\n")


READ_ONLY = [["users", "hr", "--json"], ["groups", "hr"], ["events", "hr", "--json"], ["runs", "hr"], ["status"]]


def test_read_only_commands_refuse_a_missing_sqlite_store_and_create_nothing(tmp_path, monkeypatch):
    """Before, each of them run from the wrong folder created an empty store file there (the URL
    is relative) and printed no rows, or "never synced": the store looked empty."""
    emulator = BambooHREmulator(Org.generate(8, seed=5))
    emulator.start()
    try:
        table = emulator.tenant_config("hr", tmp_path)
        cfg = tmp_path / "dirpull.toml"
        lines = ["[store]", 'url = "sqlite:///dirpull.db"', "[tenants.hr]"]
        cfg.write_text("\n".join([*lines, *(f"{k} = {json.dumps(v)}" for k, v in table.items())]) + "\n")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        for args in READ_ONLY:
            r = CliRunner().invoke(app, ["--config", str(cfg), *args])
            assert (r.exit_code, r.stdout) == (1, ""), (args, r.output)
            assert r.stderr == (
                f"dirpull: no store at {elsewhere / 'dirpull.db'} (the store url's dirpull.db is relative to the "
                f"current folder, {elsewhere}); nothing created (`dirpull sync` or `dirpull db upgrade` makes one)\n"
            ), args
            assert list(elsewhere.iterdir()) == [], args

        # An absolute path says only where it looked.
        absolute = cfg.read_text().replace("sqlite:///dirpull.db", f"sqlite:///{tmp_path / 'gone.db'}")
        (tmp_path / "absolute.toml").write_text(absolute)
        r = CliRunner().invoke(app, ["--config", str(tmp_path / "absolute.toml"), "status", "--json"])
        assert (r.exit_code, r.stdout) == (1, "")
        assert r.stderr.startswith(f"dirpull: no store at {tmp_path / 'gone.db'}; nothing created"), r.stderr
        assert not (tmp_path / "gone.db").exists()

        # A sync still creates the store, and then the same commands read it.
        monkeypatch.chdir(tmp_path)
        assert CliRunner().invoke(app, ["--config", str(cfg), "sync", "hr"]).exit_code == 0
        for args in READ_ONLY:
            r = CliRunner().invoke(app, ["--config", str(cfg), *args])
            assert r.exit_code == 0 and r.stdout, (args, r.output)
        assert len(jsonl(CliRunner().invoke(app, ["--config", str(cfg), "events", "hr", "--json"]).stdout)) == 8
    finally:
        emulator.stop()


def test_read_only_commands_refuse_an_empty_database_and_create_no_schema_in_it(tmp_path, store_url):
    """A store URL naming an empty database (the wrong PostgreSQL database, a SQLite file left
    empty): each query command migrated it, making every table there, and printed no rows or
    "never synced", as if the real store were empty."""
    if store_url.startswith("sqlite:"):
        (tmp_path / "store.db").touch()
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(
        f'[store]\nurl = "{store_url}"\n[tenants.hr]\nprovider = "bamboohr"\n'
        'company_domain = "acme"\napi_key = "k"\napi_url = "http://127.0.0.1:9/api/gateway.php"\n'
    )
    for args in READ_ONLY:
        r = CliRunner().invoke(app, ["--config", str(cfg), *args])
        assert (r.exit_code, r.stdout) == (1, ""), (args, r.output)
        assert r.stderr.startswith("dirpull: no store at ") and r.stderr.count("\n") == 1, r.stderr
        assert "the database has no dirpull schema; nothing created" in r.stderr, r.stderr
    engine = sa.create_engine(store_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    # `dirpull db upgrade` makes the store, and then they read it.
    assert CliRunner().invoke(app, ["--config", str(cfg), "db", "upgrade"]).exit_code == 0
    for args in READ_ONLY:
        assert CliRunner().invoke(app, ["--config", str(cfg), *args]).exit_code == 0, args


def test_a_sqlite_store_whose_folder_is_missing_is_named_not_cannot_connect(tmp_path, monkeypatch):
    """`sqlite:///data/dirpull.db` run from a folder without data/ (or a /var/lib/dirpull not made
    yet): every command said "cannot connect (unable to open database file)", as for a lock or a
    permission; the query commands did not say "no store at" as for a missing file."""
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(
        '[store]\nurl = "sqlite:///data/dirpull.db"\n[tenants.hr]\nprovider = "bamboohr"\n'
        'company_domain = "acme"\napi_key = "k"\napi_url = "http://127.0.0.1:9/api/gateway.php"\n'
    )
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "data" / "dirpull.db"
    for args in READ_ONLY:
        r = CliRunner().invoke(app, ["--config", str(cfg), *args])
        assert (r.exit_code, r.stdout) == (1, ""), (args, r.output)
        relative = "(the store url's data/dirpull.db is relative"
        assert r.stderr.startswith(f"dirpull: no store at {missing} {relative}"), r.stderr
    r = CliRunner().invoke(app, ["--config", str(cfg), "db", "check"])
    expected = f"schema empty (no store at {missing}), needed {HEAD_REVISION} (`dirpull db upgrade` makes it)\n"
    assert (r.exit_code, r.stdout) == (1, expected)
    for args in (["db", "upgrade"], ["sync", "hr"], ["run", "--max-seconds", "1"]):
        r = CliRunner().invoke(app, ["--config", str(cfg), *args])
        assert (r.exit_code, r.stdout) == (1, ""), (args, r.output)
        assert r.stderr == (
            f"dirpull: store sqlite:///data/dirpull.db: cannot create {missing}: its folder {missing.parent} does "
            f"not exist (create it, or fix the store url, taken from the current folder, {tmp_path})\n"
        ), (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirpull.toml"]
    (tmp_path / "data").mkdir()
    assert CliRunner().invoke(app, ["--config", str(cfg), "db", "upgrade"]).exit_code == 0
    assert missing.exists()


def test_the_daemon_without_tenants_says_so_and_creates_no_store(tmp_path, monkeypatch):
    """It opened (and so created) the store before saying there was nothing to run, leaving an
    empty dirpull.db behind, which the read commands then took for a store."""
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text('[store]\nurl = "sqlite:///dirpull.db"\n')
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["--config", str(cfg), "run", "--max-seconds", "1"])
    assert r.exit_code == 2, r.output
    # It said only "no tenants configured", not what to add.
    assert r.stderr == (
        f"dirpull: {cfg}: no tenants configured; add a [tenants.<id>] table for each directory to sync "
        "(see config/dirpull.example.toml)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirpull.toml"]


def test_a_command_on_a_sqlite_store_does_not_load_postgresqls_dialect(tmp_path):
    """Importing PostgreSQL's dialect took ~38 ms, a sixth of every command's start-up, for a store
    that never uses it."""
    cfg = tmp_path / "dirpull.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "s.db"}"\n')
    assert CliRunner().invoke(app, ["--config", str(cfg), "db", "upgrade"]).exit_code == 0
    code = (
        "import sys\nfrom dirpull.cli import main\nsys.argv = ['dirpull', '-c', sys.argv[1], 'status', '--json']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('sqlalchemy.dialects.postgresql')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_python_dash_m_dirpull_is_the_dirpull_command(tmp_path):
    """Where the `dirpull` script is not on PATH (a container's system Python, a venv not
    activated), `python -m dirpull` runs the same CLI, exit codes included."""
    env = {**os.environ, "DIRPULL_CONFIG": str(tmp_path / "missing.toml")}
    shown = subprocess.run([sys.executable, "-m", "dirpull", "--help"], capture_output=True, text=True,
                           timeout=60, env=env)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "python -m dirpull" in shown.stdout and "sync" in shown.stdout
    wrong = subprocess.run([sys.executable, "-m", "dirpull", "sink"], capture_output=True, text=True,
                           timeout=60, env=env)  # fmt: skip
    assert wrong.returncode == 2 and "No such command 'sink'" in wrong.stderr, wrong.stderr


def test_a_secret_file_that_is_missing_fails_the_daemons_runs_saying_so(env):
    """The daemon logs a missing secret file at start as missing, then syncs: each run of the tenant
    failed saying the file "is not a regular file (a pipe, a socket, a device)", in the log, in
    `dirpull runs` and `dirpull status`, sending the operator after a pipe that is not there."""
    config = Path(env["config"])
    text = config.read_text().replace("[defaults.guard]", '[defaults]\nschedule = "1s"\n[defaults.guard]')
    config.write_text(text.replace('api_key = "file:key"', 'api_key = "file:gone.key"'))
    daemon = run(env, "run", "--max-seconds", "3")
    assert daemon.exit_code == 0, daemon.stderr
    runs = jsonl(run(env, "runs", "hr", "--json").stdout)
    failed = [r for r in runs if not r["error"].startswith("interrupted")]
    why = "bamboohr: api_key: secret file:gone.key: does not exist"
    assert failed and all(r["status"] == "failed" and r["error"] == why for r in failed), [r["error"] for r in runs]
    assert "not a regular file" not in daemon.stderr, daemon.stderr


@pytest.mark.parametrize("command", ["run", "sync", "users", "groups", "events", "runs", "status", "emulate", "demo"])
def test_help_lists_every_exit_code_the_readme_gives(command):
    """`dirpull sync --help` and `run --help` said nothing of 130 / 143 (and `run`'s of any code),
    which the README's command table gives; the query commands' and `emulate`'s said nothing of
    their 1 (no store) or 2 (a file --write-config did not write)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith(f"| `dirpull {command} "))
    codes = set(re.findall(r"\b(0|1|2|3|130|143)\b", row.rsplit("|", 2)[1]))
    r = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0
    said = set(re.findall(r"Exit (\d+)(?: / (\d+))?:", r.stdout))
    assert codes == {c for pair in said for c in pair if c}, r.stdout


def test_the_demo_does_not_overwrite_a_dirpull_toml_it_did_not_write(tmp_path):
    """`dirpull demo --workdir .` beside the operator's own dirpull.toml replaced it with the
    emulators' configuration (`emulate --write-config` refuses that)."""
    mine = tmp_path / "dirpull.toml"
    mine.write_text('[store]\nurl = "sqlite:///dirpull.db"\n')
    r = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--duration", "1", "--people", "5"])
    assert (r.exit_code, r.stdout) == (2, ""), r.output
    assert r.stderr == (
        f"dirpull: --workdir {tmp_path}: its dirpull.toml is not a configuration dirpull demo wrote; nothing "
        "overwritten (give another folder, or remove the file first)\n"
    )
    assert mine.read_text() == '[store]\nurl = "sqlite:///dirpull.db"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirpull.toml"]


def test_terminal_escapes_in_vendor_values_are_shown_not_obeyed_by_the_tables(env, store_url):
    """A vendor value holding ESC (a title with `\\x1b]0;…\\x07`, `\\x1b[2J`), NUL or another
    control character reached the terminal from the tables and the dry run's list as it was: the
    terminal obeyed it (cleared the screen, retitled the window, hid the text after it). They are
    shown escaped; --json keeps the value as it is."""
    hostile = "Head\x1b[2J\x1b]0;owned\x07of\x00People\x7f\x9b31m"
    n = next(p.n for p in env["org"].people.values() if p.visible and p.state == "active")
    env["org"].update_person(n, title=hostile, username="ev\x1b[8mil")
    planned = run(env, "sync", "hr", "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert run(env, "sync", "hr").exit_code == 0
    _every_run_failed(store_url, "vendor said \x1b[31mred\x1b[0m")
    for args in (("users", "hr"), ("events", "hr"), ("runs", "hr"), ("status",)):
        out = run(env, *args).stdout
        assert not any(c in out for c in "\x1b\x07\x00\x7f\x9b"), (args, out[:300])
    assert not any(c in planned.stdout for c in "\x1b\x07\x00\x7f\x9b"), planned.stdout[:300]
    # (the NUL is dropped when the record is read, as the store cannot hold one)
    assert "Head\\x1b[2J\\x1b]0;owned\\x07ofPeople\\x7f\\x9b31m" in run(env, "users", "hr").stdout
    assert "vendor said \\x1b[31mred\\x1b[0m" in run(env, "runs", "hr").stdout
    titles = {u["job_title"] for u in jsonl(run(env, "users", "hr", "--json").stdout)}
    assert hostile.replace("\x00", "") in titles


def test_a_fatal_error_under_log_format_json_is_a_json_line(env, tmp_path):
    """The unit runs `dirpull --log-format json run`: the error that stops the daemon at start (its
    configuration, its store) reaches the log shipper as JSON too, as every other line does."""
    config = Path(env["config"])
    broken = tmp_path / "broken.toml"
    broken.write_text(config.read_text().replace('provider = "bamboohr"', 'provider = "bamboohr"\nbogus_key = 1', 1))
    r = CliRunner().invoke(app, ["--config", str(broken), "--log-format", "json", "run", "--max-seconds", "1"])
    assert r.exit_code == 2, r.stderr
    [line] = jsonl(r.stderr)
    assert line["level"] == "error" and "bogus_key" in line["msg"] and not line["msg"].startswith("dirpull:")
    # The same mistake in text, as before.
    r = CliRunner().invoke(app, ["--config", str(broken), "run", "--max-seconds", "1"])
    assert r.exit_code == 2 and r.stderr.startswith("dirpull: ") and "bogus_key" in r.stderr


def test_a_sync_past_max_run_time_fails_and_status_flags_the_tenant(env):
    """A vendor that keeps a run waiting past the tenant's `max_run_time` (a report that never
    ends): `dirpull sync` fails as any failed run does, and `dirpull status` flags the tenant,
    where a run cut by a clean stop is not flagged. It held the run and the lease without end."""
    config = Path(env["config"])
    config.write_text(config.read_text() + "max_run_time = 1\n")
    env["emulator"].faults.update({"delay": 2.5})
    try:
        r = run(env, "sync", "hr")
    finally:
        env["emulator"].faults.clear()
    error = "the run took longer than max_run_time (1s); nothing applied"
    assert r.exit_code == 1 and error in r.stderr, r.stdout + r.stderr
    row = jsonl(run(env, "status", "--json").stdout)[0]
    assert row["result"] == "failed" and row["attention"] == [f"failing: {error}"], row
    assert run(env, "users", "hr", "--json").stdout == ""
