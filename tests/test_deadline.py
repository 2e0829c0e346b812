"""The one thread that keeps every Google request's deadline (connectors.deadline)."""

from __future__ import annotations

import threading
import time

from dirpull.connectors.deadline import Deadlines


def test_a_deadline_fires_once_due_even_when_armed_after_a_later_one_and_not_once_disarmed() -> None:
    deadlines = Deadlines()
    late, soon, cancelled = threading.Event(), threading.Event(), threading.Event()
    deadlines.arm(30, late.set)
    time.sleep(0.3)  # the keeper is asleep towards 30 s: it must wake for the next ones
    # Disarmed before it is due, whatever this thread's stalls on a loaded machine: the keeper
    # fires under the deadlines' lock, held here from the arms to the disarm.
    with deadlines._lock:
        gone = deadlines.arm(0.2, cancelled.set)
        deadlines.arm(0.3, soon.set)
        deadlines.disarm(gone)
    assert soon.wait(10)
    assert not cancelled.is_set() and not late.is_set()


def test_a_failing_callback_does_not_stop_the_next_deadline() -> None:
    deadlines = Deadlines()
    fired = threading.Event()

    def broken() -> None:
        raise RuntimeError("boom")

    deadlines.arm(0.05, broken)
    deadlines.arm(0.1, fired.set)
    assert fired.wait(10)
