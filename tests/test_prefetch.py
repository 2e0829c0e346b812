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
