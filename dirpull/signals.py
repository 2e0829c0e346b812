"""SIGTERM and SIGINT as a request to stop: the work in progress ends at its next safe point (a
sync applies nothing and is recorded as failed) instead of the process dying mid-write. A second
one while stopping exits at once (`force_exit`), for a run stuck in a slow vendor request."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("dirpull")


@contextlib.contextmanager
def stop_on_signals(
    stop: threading.Event,
    *,
    force_exit: bool = False,
    before_exit: Callable[[], None] | None = None,
    announce: str | None = None,
) -> Iterator[threading.Event]:
    """Set `stop` on SIGTERM/SIGINT while inside; the previous handlers come back on leaving.
    Only the main thread can take signals: elsewhere this changes nothing.

    `force_exit`: a second signal ends the process at once, exit 128 + its number (130 for
    Ctrl-C, 143 for SIGTERM), after `before_exit`. The first stop waits for a run to reach a safe
    point, which a long commit can hold for a while (a request hanging in the vendor's answer is
    given up after ~10 s, `prefetch.JOIN_S`): the operator's second Ctrl-C did nothing more, and
    only SIGKILL ended it, without a word.
    `announce`: logged at the first signal, so that the wait that follows is not taken for a hang."""
    previous: dict[int, Any] = {}
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if force_exit and received:
            _exit_now(signum, before_exit)
        if announce and not received:
            log.info("%s: %s", signal.Signals(signum).name, announce)
        received.append(signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)


def _exit_now(signum: int, before_exit: Callable[[], None] | None) -> None:
    """Ends the process, every thread with it, without waiting for them. os._exit, not SystemExit:
    the interpreter's exit joins the sync threads, which is the wait being cut short. Nothing is
    half-applied: a run is written in one transaction, and a transaction not committed is rolled
    back by the database (SQLite at its next open, PostgreSQL when the connection drops)."""
    code = 128 + signum
    log.warning(
        "%s again while stopping: exiting now (exit %d) without waiting for the runs in progress; "
        "a run not committed yet is not applied (a run is written in one transaction), its tenant "
        "stays leased until lease_ttl passes, and the tenant's next run marks it failed",
        signal.Signals(signum).name, code,
    )  # fmt: skip
    with contextlib.suppress(Exception):
        if before_exit is not None:
            before_exit()
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)
