"""A TCP relay in front of the test PostgreSQL server that can lose a transaction's COMMIT, or only
the server's answer to it: what a network cut or a failover at the wrong moment does to a client."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import sqlalchemy as sa

# The wire protocol's messages: a simple-query "COMMIT" (psycopg commits so), and the server's
# CommandComplete saying it committed.
COMMIT_QUERY = b"Q\x00\x00\x00\x0bCOMMIT\x00"
COMMITTED = b"C\x00\x00\x00\x0bCOMMIT\x00"


class CommitCutter:
    """Relays 127.0.0.1:`port` to the server of `url`. `arm(conn, after_commit)` marks one client
    connection: at its next COMMIT the relay closes it, after passing the COMMIT on and reading the
    server's "committed" (`after_commit`: the commit done, its confirmation lost), or without
    passing it on (the transaction never committed; the server rolls it back)."""

    def __init__(self, url: str) -> None:
        target = sa.engine.make_url(url)
        self.target = (target.host or "127.0.0.1", target.port or 5432)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._armed: dict[int, bool] = {}  # client port → after_commit
        self._refuse_after_cut = 0
        self._refuse = 0  # new connections still to close at once
        self.cut: list[str] = []  # "after commit" / "before commit", as they happened
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.accepted = threading.Event()  # a client has connected
        self._open = threading.Event()  # cleared by `hold()`: clients wait before the server is reached
        self._open.set()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._spawn(self._accept)

    def url_for(self, schema_url: str) -> str:
        """`schema_url` (the test's own PostgreSQL schema) reached through the relay."""
        url = sa.engine.make_url(schema_url).set(host="127.0.0.1", port=self.port)
        # sslmode=disable: the relay reads the protocol's messages.
        return url.update_query_dict({"sslmode": "disable"}).render_as_string(hide_password=False)

    def arm(self, conn: Any, *, after_commit: bool, refuse: int = 0) -> None:
        """Cut the SQLAlchemy connection `conn` at its next COMMIT; then close the next `refuse`
        connections made through the relay at once (the server still out of reach)."""
        fd = conn.connection.dbapi_connection.pgconn.socket
        with socket.socket(fileno=socket.dup(fd)) as sock:
            port = sock.getsockname()[1]
        with self._lock:
            self._armed[port] = after_commit
            self._refuse_after_cut = refuse

    def hold(self) -> None:
        """Keep each new client waiting, connected but unanswered (a server slow to answer), until
        `release()` (or 30 s)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stopped.set()
        self._open.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self._threads:
            thread.join(5)
        self.listener.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, (_, port) = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                refused = self._refuse > 0
                self._refuse -= refused
            if refused:
                client.close()
                continue
            self.accepted.set()
            self._open.wait(30)
            client.settimeout(None)
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._client_to_server, client, server, port)

    def _cut(self, client: socket.socket, server: socket.socket, what: str) -> None:
        with self._lock:
            self.cut.append(what)
            self._refuse, self._refuse_after_cut = self._refuse_after_cut, 0
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _client_to_server(self, client: socket.socket, server: socket.socket, port: int) -> None:
        answers = threading.Event()
        self._spawn(self._server_to_client, client, server, answers)
        try:
            while data := client.recv(65536):
                with self._lock:
                    after_commit = self._armed.get(port)
                if after_commit is not None and COMMIT_QUERY in data:
                    with self._lock:
                        del self._armed[port]
                    if not after_commit:
                        self._cut(client, server, "before commit")
                        return
                    answers.set()  # the answer to this COMMIT goes no further
                server.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)

    def _server_to_client(self, client: socket.socket, server: socket.socket, answers: threading.Event) -> None:
        seen = b""
        try:
            while data := server.recv(65536):
                if answers.is_set():
                    seen += data
                    if COMMITTED in seen:  # the server has committed: its answer is lost
                        self._cut(client, server, "after commit")
                        return
                    continue
                client.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
