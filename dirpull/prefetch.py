"""Iterate a stream in its own thread, a few items ahead of the consumer.

The sync runs a connector's pull this way: while the diff works on page N the pull thread is
already waiting for page N+1 on the socket (the GIL is released there), so the vendor renders the
next page while this process diffs the last one instead of each waiting for the other (on a
100,000-user full resync that waiting was about a third of the run). The store builds the rows of
its next INSERT this way while SQLite writes the last one. The queue is bounded, so at most
`depth` items sit in memory.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

POLL_S = 0.25  # how often a waiting side looks at the other one (stop requested, thread gone)
JOIN_S = 10.0  # how long close() waits for the pull thread to notice it should stop


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PrefetchError(RuntimeError):
    """The pull thread ended without handing over an end or an error (it cannot, short of a bug)."""


class Prefetch(Generic[T]):
    """Iterate `open_stream()` in a daemon thread; hand its items over in order.

    The stream is created, iterated and closed in the pull thread (a generator must not be run
    from two threads, and connectors tie event loops to the thread that opened them). An exception
    in the pull is re-raised here, with its traceback, when its turn comes. `check` is called
    while this side waits, so a stop request is noticed during a slow page, not after it.
    `close()` (also on leaving a `with` block) stops the pull at its next page and closes the
    stream in the pull thread, and sets `stop` (an event of the caller's, for waits in the pull
    to watch). The pull thread runs in a copy of the context this object was made in.
    """

    def __init__(
        self,
        open_stream: Callable[[], Iterable[T]],
        *,
        depth: int = 3,
        name: str = "pull",
        check: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._open = open_stream
        self._queue: queue.Queue[T | _End | _Failed] = queue.Queue(maxsize=max(1, depth))
        self._cancel = stop or threading.Event()
        self._check = check
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=name, daemon=True)
        self._started = False
        self._ended = False
        self._on_end: list[Callable[[], None]] = []
        self._end_lock = threading.Lock()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def __iter__(self) -> Iterator[T]:
        self.start()
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._check:
                    self._check()
                if not self._thread.is_alive() and self._queue.empty():
                    raise PrefetchError("the pull thread stopped without finishing") from None
                continue
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                exc, item = item.exc, None
                try:
                    raise exc
                finally:
                    # The exception's traceback holds this frame: a local naming the exception
                    # would be a reference cycle, keeping everything the failed run's frames held
                    # (its diff, the records' spool file, the stored fingerprints) until a full
                    # garbage collection, which may be long in coming.
                    del exc
            yield item

    def close(self) -> None:
        self._cancel.set()
        if not self._started:
            return
        # Free a slot so a pull thread blocked on a full queue sees the cancel at once.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(JOIN_S)

    def when_ended(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the pull thread has ended: now if it has (or never started), else in that
        thread as it ends. `close()` waits for it only so long: a pull waiting for a vendor's
        answer goes on behind its run, and may log, until that request ends."""
        with self._end_lock:
            if self._started and not self._ended:
                self._on_end.append(fn)
                return
        fn()

    def _put(self, item: T | _End | _Failed) -> bool:
        while not self._cancel.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            self._pull()
        finally:
            with self._end_lock:
                self._ended = True
                callbacks, self._on_end = self._on_end, []
            for fn in callbacks:
                fn()

    def _pull(self) -> None:
        try:
            stream = self._open()
            try:
                for item in stream:
                    if not self._put(item):
                        return
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            self._put(_End())
        except BaseException as exc:  # handed to the consumer, which re-raises it
            # The ended pull's frames, in the traceback, keep their variables: an event loop's
            # (Okta's, Entra's) among them, whose task holds this very exception, a reference cycle
            # that kept everything the failed run held (its diff, the records' spool file: an open
            # descriptor and its disk space; the stored fingerprints) until a full garbage
            # collection, which may be long in coming. The traceback still prints as it was.
            traceback.clear_frames(exc.__traceback__)
            self._put(_Failed(exc))


class DaemonPool:
    """A thread pool, as `concurrent.futures.ThreadPoolExecutor` (`submit`, `shutdown`), whose
    threads are daemon threads, for a connector's vendor requests made beside its pull thread.

    The interpreter's exit joins every ThreadPoolExecutor thread (an atexit hook of
    concurrent.futures): after a clean stop had left a run's pull behind (`Prefetch.close`), a
    process whose Workday groups report or Google member read was still waiting for the vendor
    lived on until that request's timeout (up to 300 s; systemd's TimeoutStopSec is 120 s), its
    run long recorded as interrupted. A request left here ends with the process."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = max(1, workers)
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> DaemonPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            # In the submitter's context, as asyncio.to_thread runs a function: what it set for
            # its work (a run's end, connectors.http.RUN_ENDED) holds in the worker too.
            self._work.put((future, contextvars.copy_context().run, (fn, *args)))
            # One thread more per request until `workers`, as ThreadPoolExecutor starts them.
            if len(self._threads) < self._workers:
                thread = threading.Thread(target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._work.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)
            del item, future, fn, args  # not kept alive until the next request
