"""SIGTERM and SIGINT as a request to stop: the work in progress ends at its next safe point (a
sync applies nothing and is recorded as failed) instead of the process dying mid-write."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """Set `stop` on SIGTERM/SIGINT while inside; the previous handlers come back on leaving.
    Only the main thread can take signals: elsewhere this changes nothing."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
