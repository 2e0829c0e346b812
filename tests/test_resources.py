"""A long-running daemon must give back what each run takes: many syncs in one process, through
the real SDKs against the emulators and the real store, leave no more file descriptors (vendor
connections, temporary files) or threads open than the first ones did. The cyclic garbage
collector is off while they run: what only it would give back stays with a busy daemon for as
long as it takes to come (and in a daemon that syncs once a night, all day)."""

from __future__ import annotations

import gc
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SyncHarness

from dirpull.emulators import emulator_class
from dirpull.emulators.org import Org

FD_DIR = Path("/proc/self/fd")
pytestmark = pytest.mark.skipif(not FD_DIR.is_dir(), reason="needs /proc/self/fd (Linux)")

PROVIDERS = ["okta", "entra_id", "google_workspace", "workday", "bamboohr"]
ROUNDS = 4


def open_fds() -> list[str]:
    out = []
    for fd in os.listdir(FD_DIR):
        try:
            out.append(os.readlink(FD_DIR / fd))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return out


def settled_fds(expected: int | None) -> list[str]:
    """The descriptors open once there are `expected` (None: once their number stops changing), or
    after 3 s. The emulator's handler threads close their side of a connection a moment after the
    client."""
    deadline = time.monotonic() + 3
    fds = open_fds()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        before, fds = fds, open_fds()
        if (len(fds) == len(before)) if expected is None else len(fds) <= expected:
            break
    return fds


@pytest.fixture
def emu(request: pytest.FixtureRequest) -> Iterator[Any]:
    e = emulator_class(request.param)(Org.generate(40, groups=5, seed=3))
    if hasattr(e, "fault_reset_in"):
        e.fault_reset_in = 0
    e.start()
    try:
        yield e
    finally:
        e.stop()


def run_rounds(emu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, failing: bool) -> None:
    """ROUNDS syncs (each a failed one if `failing`: the vendor refuses the credentials), with
    directory changes between them; after each, no run's spool file is open and the process holds
    as many descriptors and threads as after the first."""
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))  # where the runs' spool files go
    tenant = emu.name
    h = SyncHarness(tmp_path, {tenant: emu.tenant_config(tenant, tmp_path)})
    rng = random.Random(5)
    fds: list[int] = []
    threads: list[int] = []
    if failing:
        assert h.sync(tenant).status == "succeeded"  # a cursor: the failed runs are incremental ones
    gc.collect()
    gc.disable()
    try:
        for k in range(ROUNDS):
            with emu.org.lock:
                emu.org.random_changes(3, rng)
            if failing:
                emu.faults.update({"expire_auth": 100})
            result = h.sync(tenant, full=k % 2 == 1)
            emu.faults.clear()
            assert result.status == ("failed" if failing else "succeeded"), result
            left = settled_fds(fds[0] if fds else None)
            assert [f for f in left if f.startswith(str(spool_dir))] == []  # no run's spool file left open
            fds.append(len(left))
            threads.append(threading.active_count())
    finally:
        gc.enable()
        h.close()
    assert fds == [fds[0]] * ROUNDS
    assert threads == [threads[0]] * ROUNDS


@pytest.mark.parametrize("emu", PROVIDERS, indirect=True)
def test_syncs_leave_no_vendor_connection_open(emu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Entra's runs each left their Graph connection open (msgraph's transport wrapper does not
    # close the one it wraps), until the garbage collector came by.
    run_rounds(emu, tmp_path, monkeypatch, failing=False)


@pytest.mark.parametrize("emu", PROVIDERS, indirect=True)
def test_failed_syncs_give_back_their_temporary_file_at_once(
    emu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed run kept its pending records' spool file open (a descriptor and its disk space), its
    # diff and the stored fingerprints in memory, until a full garbage collection: a reference
    # cycle through the failure's traceback (the pull thread's hand-over; Okta's and Entra's
    # event loop, whose task holds the exception).
    run_rounds(emu, tmp_path, monkeypatch, failing=True)
