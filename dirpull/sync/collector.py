"""Fewer cyclic garbage collections while a sync runs.

A large sync allocates millions of short-lived containers (parsed pages, records, member pairs).
With CPython's default thresholds the cyclic collector ran thousands of times per 100,000-user
sync, and each full collection walks every object the process holds (for Entra the SDK's
thousands of generated classes too): 0.6 s of GIL time in a 7.5 s Entra resync, 1.3 s of its
initial sync, 0.7–1.0 s of BambooHR's and Workday's initial syncs (`scripts/profile_sync.py`
prints the collector's time). What a sync builds is freed by reference counting; the few
cycles it leaves (asyncio and httpx: ~36,000 objects in an Entra resync) are still collected,
once per `YOUNG` allocations instead of once per 700.

Process-wide, as the collector is: the first sync to start raises the thresholds, the last one to
end puts back what was there before.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG = 50_000  # allocations between young collections (CPython's default: 700)

_lock = threading.Lock()
_running = 0
_saved: tuple[int, ...] = ()


@contextmanager
def fewer_collections() -> Iterator[None]:
    global _running, _saved
    with _lock:
        if _running == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(max(YOUNG, _saved[0]), *_saved[1:])
        _running += 1
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                gc.set_threshold(*_saved)
