"""Deadlines for blocking calls, kept by one thread per process.

A `threading.Timer` per HTTP request cost ~0.3 ms to start (a thread each, and a context switch
before `start()` returns): a second of a 100,000-user Google sync's 3,400 requests, for a
deadline that almost never fires. Here a call is armed and disarmed under a lock, and one thread
wakes only at the earliest deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# The keeper's longest sleep: it looks again at least this often, whatever it waits for.
_LONGEST_WAIT = 60.0


class Deadlines:
    """`arm(seconds, fire)` → a key; `disarm(key)`. `fire` runs in the keeper's thread, under its
    lock, unless disarmed first: after `disarm` returns it can no longer run, so the caller may
    reuse what `fire` would have touched (a pooled connection). `fire` must be quick."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()
        self._keeper: threading.Thread | None = None

    def arm(self, seconds: float, fire: Callable[[], None]) -> int:
        with self._lock:
            key = next(self._keys)
            self._armed[key] = fire
            earliest = self._heap[0][0] if self._heap else None
            due = time.monotonic() + seconds
            heapq.heappush(self._heap, (due, key))
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=self._keep, name="deadlines", daemon=True)
                self._keeper.start()
            elif earliest is None or due < earliest:
                self._lock.notify()
            return key

    def disarm(self, key: int) -> None:
        with self._lock:
            self._armed.pop(key, None)

    def _keep(self) -> None:
        with self._lock:
            while True:
                # Disarmed calls leave their entry behind; they are dropped once at the front.
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    if not self._lock.wait(_LONGEST_WAIT) and not self._heap:
                        self._keeper = None  # idle for a while: a later `arm` starts another
                        return
                    continue
                due, key = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._lock.wait(min(wait, _LONGEST_WAIT))
                    continue
                heapq.heappop(self._heap)
                fire = self._armed.pop(key)
                try:
                    fire()
                except Exception:  # one failing callback must not stop the other deadlines
                    log.exception("a deadline's callback failed")


DEADLINES = Deadlines()
