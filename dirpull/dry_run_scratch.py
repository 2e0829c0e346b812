"""The scratch folder of a `dirpull sync --dry-run` that has no store yet, and the sweep of those
that killed dry runs left behind."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time

DRY_RUN_PREFIX = "dirpull-dry-run-"
LEFTOVER_AGE_S = 86400.0


def sweep_leftovers() -> None:
    """Remove the scratch stores of dry runs that were killed (SIGKILL, OOM, power loss) before
    their own cleanup: each left a folder in TMPDIR holding a planned copy of the directory's
    people. SQLite needs the folder while the run lasts (its -wal and -shm files are made and
    reopened there), so it cannot be unlinked early; a later dry run removes it instead. Only a
    folder of this account's, untouched for a day, whose process (named in it) is gone: a live
    dry run, however long, keeps its own."""
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(DRY_RUN_PREFIX)]
    except OSError:
        return
    now = time.time()
    for name in names:
        pid = name.removeprefix(DRY_RUN_PREFIX).partition("-")[0]
        if not pid.isdigit() or _process_lives(int(pid)):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            with os.scandir(path) as entries:
                newest = max([st.st_mtime, *(e.stat(follow_symlinks=False).st_mtime for e in entries)])
        except OSError:
            continue
        if now - newest > LEFTOVER_AGE_S:
            shutil.rmtree(path, ignore_errors=True)


def _process_lives(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id: left alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another account's live process
        return True
    return True


def make_scratch() -> str:
    """A new scratch folder (0700) in TMPDIR named with this process's id, after sweeping the
    leftovers of dead ones."""
    sweep_leftovers()
    return tempfile.mkdtemp(prefix=f"{DRY_RUN_PREFIX}{os.getpid()}-")
