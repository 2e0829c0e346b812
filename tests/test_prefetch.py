"""The pull thread: order kept, errors re-raised, a stop noticed while waiting, the stream closed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from dirpull.prefetch import Prefetch


class Stopped(Exception):
    pass


def test_items_arrive_in_order_and_the_stream_runs_ahead_boundedly() -> None:
    made: list[int] = []

    def stream() -> Iterator[int]:
        for i in range(20):
            made.append(i)
            yield i

    with Prefetch(stream, depth=3) as p:
        it = iter(p)
        assert next(it) == 0
        deadline = time.monotonic() + 5
        while len(made) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        # One handed over, three queued, one made and waiting for a slot: never the whole stream.
        assert 4 <= len(made) <= 5
        assert list(it) == list(range(1, 20))


def test_an_error_in_the_pull_is_raised_in_order_with_its_own_traceback() -> None:
    def stream() -> Iterator[int]:
        yield 1
        raise ValueError("vendor said no")

    with Prefetch(stream) as p:
        got = []
        with pytest.raises(ValueError, match="vendor said no") as info:
            for item in p:
                got.append(item)
    assert got == [1]
    assert any(frame.name == "stream" for frame in info.traceback)


def test_close_stops_the_pull_and_closes_the_stream_in_its_thread() -> None:
    closed_in: list[str] = []

    def stream() -> Iterator[int]:
        try:
            yield from range(10_000)
        finally:
            closed_in.append(threading.current_thread().name)

    p = Prefetch(stream, depth=2, name="pull-test")
    for item in p:
        if item == 3:
            break
    p.close()
    assert closed_in == ["pull-test"]


def test_a_stop_is_noticed_while_waiting_for_a_slow_page() -> None:
    stop = threading.Event()
    release = threading.Event()

    def stream() -> Iterator[int]:
        yield 1
        release.wait(10)  # a page the vendor takes long to render
        yield 2

    def check() -> None:
        if stop.is_set():
            raise Stopped

    p = Prefetch(stream, check=check)
    started = time.monotonic()
    with pytest.raises(Stopped):
        for _ in p:
            stop.set()
    assert time.monotonic() - started < 5  # not after the slow page
    release.set()
    p.close()


def test_a_retry_wait_in_a_pull_or_in_the_threads_it_starts_ends_when_its_consumer_stops() -> None:
    """A run that ends without its pull (a lost lease) closes the stream; a retry wait in the pull
    thread, in a nested stream's thread or in a worker of the pull's pool (Google's member reads)
    used to sleep on, then call the vendor again."""
    from dirpull.connectors.base import ConnectorError
    from dirpull.connectors.http import RUN_ENDED, interruptible_sleep
    from dirpull.prefetch import DaemonPool

    ended = threading.Event()
    waits: dict[str, tuple[float, str]] = {}
    pool = DaemonPool(1, "test-pool")

    def wait(where: str) -> None:
        started = time.monotonic()
        try:
            interruptible_sleep(30)
            waits[where] = (time.monotonic() - started, "slept")
        except ConnectorError as exc:
            waits[where] = (time.monotonic() - started, str(exc))

    def inner() -> Iterator[int]:
        wait("nested stream")
        yield 1

    def stream() -> Iterator[int]:
        RUN_ENDED.set(ended)
        in_pool = pool.submit(wait, "pool")
        nested = Prefetch(inner, name="nested")
        nested.start()
        yield 0
        wait("pull")
        in_pool.result(10)
        nested.close()
        yield 1

    p = Prefetch(stream, stop=ended)
    with p:
        assert next(iter(p)) == 0
        time.sleep(0.2)
    deadline = time.monotonic() + 20
    while len(waits) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    pool.shutdown(wait=False)
    assert sorted(waits) == ["nested stream", "pool", "pull"]
    for where, (took, how) in waits.items():
        # Cut short, not the 30 s asked for; wide enough for a loaded CI machine.
        assert took < 15 and "the run has ended" in how, (where, took, how)
