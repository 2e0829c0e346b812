"""An emulator served by several forked processes (`serve --workers N`, workers.py): requests and
tokens work whichever worker answers, connections are spread over the workers, a sync through the
real SDK sees one consistent directory, and the workers never outlive their parent."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dirpull.config import load_config
from dirpull.emulators.okta_api import OktaEmulator
from dirpull.emulators.org import Org
from dirpull.storage.store import Store
from dirpull.sync.runner import Runner

ROOT = Path(__file__).resolve().parent.parent
SCOPE = "https://graph.microsoft.com/.default"


def _serve(tmp_path: Path, *extra: str, provider: str = "entra_id") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dirpull.emulators", "serve", "--provider", provider, "--people", "300",
         "--groups", "12", "--seed", "4", "--workdir", str(tmp_path), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    proc = _serve(tmp_path, "--workers", "2")
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        info["proc"] = proc
        yield info
    finally:
        _stop(proc)


def _token(info: dict[str, Any], session: requests.Session) -> str:
    t = info["tenant"]
    form = {"grant_type": "client_credentials", "client_id": t["client_id"], "client_secret": t["client_secret"],
            "scope": SCOPE}  # fmt: skip
    resp = session.post(f"{info['base_url']}/{t['tenant_id']}/oauth2/v2.0/token", data=form, timeout=5)
    resp.raise_for_status()
    return str(resp.json()["access_token"])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # exited; only its parent (or init) has yet to reap it


def _wait_gone(pids: list[int], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_connections_are_spread_over_the_workers_and_a_token_is_good_on_each(served: dict[str, Any]) -> None:
    assert len(served["workers"]) == 2 and len(served["worker_pids"]) == 1
    # Two keep-alive connections side by side, as the Entra connector's two delta rounds hold: the
    # second goes to the worker that holds none.
    sessions = [requests.Session(), requests.Session()]
    token = _token(served, sessions[0])
    headers = {"Authorization": "Bearer " + token}
    for _ in range(3):
        for s in sessions:
            assert s.get(f"{served['base_url']}/v1.0/users?$top=5", headers=headers, timeout=5).status_code == 200
    counts = [requests.get(w + "/_emulator/health", timeout=5).json()["requests"] for w in served["workers"]]
    assert sorted(counts) == [3, 4], counts  # the token request, then three on each connection
    # A token is only good if this emulator signed it, whichever worker is asked.
    for worker in served["workers"]:
        bad = requests.get(f"{worker}/v1.0/users", headers={"Authorization": "Bearer " + token + "x"}, timeout=5)
        assert bad.status_code == 401
        assert requests.get(f"{worker}/v1.0/users", headers=headers, timeout=5).status_code == 200


@contextlib.contextmanager
def _runner(tenant: dict[str, Any], tmp_path: Path) -> Iterator[Runner]:
    """A runner over a fresh SQLite store for the served tenant, configured as the benchmark does."""
    spec = importlib.util.spec_from_file_location("dirpull_bench", ROOT / "scripts" / "bench.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config_path = tmp_path / "dirpull.toml"
    bench.write_config(config_path, f"sqlite:///{tmp_path / 'store.db'}", "t", tenant)
    store = Store(load_config(str(config_path)).store.url)
    try:
        store.upgrade()
        yield Runner(load_config(str(config_path)), store)
    finally:
        store.close()


def test_a_sync_through_the_sdk_sees_one_directory_across_workers(served: dict[str, Any], tmp_path: Path) -> None:
    with _runner(served["tenant"], tmp_path) as runner:
        first = runner.sync("t")
        assert first.status == "succeeded" and first.counts["rows_written"] > 300

        # The same seeded changes, applied by every worker, come out the same.
        answers = [
            requests.post(w + "/_emulator/changes", json={"random": 20, "seed": 9}, timeout=10).json()
            for w in served["workers"]
        ]
        assert answers[0]["changes"] and answers[0]["changes"] == answers[1]["changes"]
        delta = runner.sync("t")
        assert delta.status == "succeeded" and delta.mode == "incremental"
        assert delta.counts["events"] > 0
        # The delta rounds, answered by both workers, left nothing for a full walk to find.
        full = runner.sync("t", full=True)
        assert full.status == "succeeded"
        assert full.counts["rows_written"] == 0 and full.counts["events"] == 0


def test_google_served_by_workers_syncs_through_the_sdk(tmp_path: Path) -> None:
    """The service account's key is made before the workers fork and access tokens are signed:
    whichever worker grants the token and whichever answers each of the connector's concurrent
    member listings, a sync sees one directory."""
    proc = _serve(tmp_path, "--workers", "2", provider="google_workspace")
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert len(info["workers"]) == 2
        with _runner(info["tenant"], tmp_path) as runner:
            first = runner.sync("t")
            assert first.status == "succeeded", first.error
            assert first.counts["rows_written"] > 300
            # Changes made now: a new account's creationTime is the same in both workers.
            change = {"random": 20, "seed": 9, "at": time.time()}
            answers = [requests.post(w + "/_emulator/changes", json=change, timeout=10).json() for w in info["workers"]]
            assert answers[0]["changes"] and answers[0]["changes"] == answers[1]["changes"]
            changed = runner.sync("t")
            assert changed.status == "succeeded" and changed.counts["events"] > 0, changed.error
            again = runner.sync("t")
            assert again.status == "succeeded" and again.counts["events"] == 0, again.counts
    finally:
        _stop(proc)


def test_workers_stop_with_the_parent_however_it_ends(tmp_path: Path) -> None:
    for how in (signal.SIGTERM, signal.SIGKILL):
        proc = _serve(tmp_path, "--workers", "3")
        try:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            assert len(info["worker_pids"]) == 2 and not any(_gone(p) for p in info["worker_pids"])
            os.kill(proc.pid, how)
            proc.wait(10)
            assert _wait_gone(info["worker_pids"]), f"workers outlived a parent ended by {how!r}"
        finally:
            _stop(proc)


def test_an_emulator_that_keeps_state_per_process_serves_from_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one worker"):
        OktaEmulator(Org.generate(10, groups=2, seed=1)).start(workers=2)
    proc = subprocess.run(
        [sys.executable, "-m", "dirpull.emulators", "serve", "--provider", "okta", "--workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "serves from one process only" in proc.stderr
