"""Two loopback servers for the redirect tests: one that answers every request with a redirect to
another origin, and that other origin (another port of 127.0.0.1), standing in for a foreign host:
it records what reached it and answers 401, as a host that does not know the tenant would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Servers:
    redirector: str  # base URL of the server that redirects
    foreign: str  # base URL of the host it redirects to
    seen: list[Seen] = field(default_factory=list)  # requests that reached the foreign host


@contextmanager
def redirecting(status: int = 307) -> Iterator[Servers]:
    """A redirector answering `status` with Location = the foreign host + the request's path."""
    seen: list[Seen] = []

    class Foreign(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            seen.append(Seen(self.command, self.path, dict(self.headers), self.rfile.read(n) if n else b""))
            body = b'{"error":"unknown tenant"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _any

    foreign = ThreadingHTTPServer(("127.0.0.1", 0), Foreign)
    target = f"http://127.0.0.1:{foreign.server_port}"

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            self.send_response(status)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _any

    redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (foreign, redirector)]
    for t in threads:
        t.start()
    try:
        yield Servers(f"http://127.0.0.1:{redirector.server_port}", target, seen)
    finally:
        for s in (foreign, redirector):
            s.shutdown()
            s.server_close()
