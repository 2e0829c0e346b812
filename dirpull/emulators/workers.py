"""Serve one emulator from several forked processes, as a vendor's service answers concurrent
requests in parallel (`python -m dirpull.emulators serve --workers N`, the benchmarks).

One Python process computes one response at a time (the GIL), so a client that walks two request
chains side by side — Graph's users and groups rounds — has each request queue behind the other
chain's page, a cost that comes from the emulator, not from the wire or the client. Forked after
the organization is built, the workers share the listening socket and start from the same state.

* Connections are dealt in turn (a counter the workers share): two connections opened one after
  the other — the two rounds' keep-alive connections — land in two processes, not wherever the
  kernel's wake-up race puts them. A connection whose worker does not take it within 50 ms goes to
  any worker.
* Each worker also listens on a port of its own (`urls`): the control endpoints (changes, faults,
  switches) change one process's state, so a caller sends them to every worker.
* Only emulators whose request-created state travels in the requests themselves (signed tokens,
  self-describing page tokens) may run this way: `Emulator.parallel`.
* Workers stop when the parent stops them (SIGTERM, then SIGKILL) or within a fraction of a second
  of the parent's death, however it dies.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from http.server import ThreadingHTTPServer
from typing import Any

STOP_WAIT_S = 5.0
ORPHAN_POLL_S = 0.2
REFRAIN_S = 0.0005  # how long a worker steps aside before looking at the socket again
NEW_WAIT_S = 0.01  # a longer gap between looks: another connection is waiting
TAKE_OVER_S = 0.05  # a connection waiting this long for its worker goes to any worker


class Balance:
    """Whose turn it is to accept the next connection, in memory all the forked workers share."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.index = 0  # this process's place in the turns, set in each child after the fork
        self._turn = multiprocessing.RawValue("q", 0)
        self._lock = multiprocessing.Lock()
        self._seen_at = self._last_seen = 0.0  # this process: a connection not its to take, waiting

    def mine(self) -> bool:
        if self._turn.value % self.workers == self.index:
            return True
        # A worker that cannot take its turn (gone, or stuck) must not stall new connections.
        now = time.monotonic()
        if now - self._last_seen > NEW_WAIT_S:
            self._seen_at = now
        self._last_seen = now
        return now - self._seen_at > TAKE_OVER_S

    def took(self) -> None:
        with self._lock:
            self._turn.value += 1


def balanced(server_class: type[ThreadingHTTPServer], balance: Balance) -> type[ThreadingHTTPServer]:
    """`server_class` accepting only the connections that are this worker's to take."""

    class BalancedServer(server_class):  # type: ignore[valid-type,misc]
        def server_activate(self) -> None:
            super().server_activate()
            # Every worker wakes for a new connection; those it is not for must not block.
            self.socket.setblocking(False)

        def get_request(self) -> Any:
            if not balance.mine():
                time.sleep(REFRAIN_S)
                raise BlockingIOError("another worker's turn")
            conn, addr = self.socket.accept()  # BlockingIOError when another worker took it
            balance.took()
            conn.settimeout(None)
            return conn, addr

    return BalancedServer


class Workers:
    """The forked children of a serving emulator (the parent is worker 0)."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, count: int, balance: Balance, serve_child: Any) -> list[int]:
        """Fork `count` children; each runs `serve_child(index, report)` (which must not return
        until the child should exit) and reports its control port through `report(port)`.
        Returns the children's control ports, in order."""
        ports: list[int] = []
        for index in range(1, count + 1):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns into the parent's code
                os.close(read_fd)
                status = 0
                try:
                    balance.index = index
                    _child_signals()

                    def report(port: int, fd: int = write_fd) -> None:
                        os.write(fd, f"{port}\n".encode())
                        os.close(fd)

                    serve_child(index, report)
                except BaseException:  # a child must exit here, never unwind into the parent's code
                    status = 1
                finally:
                    os._exit(status)
            os.close(write_fd)
            self.pids.append(pid)
            with os.fdopen(read_fd, "rb") as pipe:
                line = pipe.readline().strip()
            if not line:
                self.stop()
                raise RuntimeError(f"emulator worker {index} did not start")
            ports.append(int(line))
        return ports

    def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for pid in self.pids:
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:
                        time.sleep(0.02)
                        continue
                break
            else:
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
        self.pids.clear()


def _child_signals() -> None:
    # SIGTERM ends a worker at once; Ctrl-C reaches the whole process group, and the parent's
    # handlers (copied by fork) belong to the parent: a worker follows its parent instead.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait_while_parent_lives(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
