"""A loopback proxy in front of an emulator that rewrites chosen answers: well-formed HTTP whose
body or headers are surprising (a login page with 200, a body of the wrong shape, a lying
Content-Type). Absolute URLs of the emulator in bodies and headers are rewritten to the proxy's."""

from __future__ import annotations

import http.client
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Answer:
    path: str  # the request's path and query
    status: int
    headers: list[tuple[str, str]]
    body: bytes


Rewrite = Callable[[Answer], Answer | None]  # None: send the emulator's answer unchanged


@dataclass
class Proxy:
    base_url: str
    rewrite: Rewrite | None = None
    paths: list[str] = field(default_factory=list)  # every request's path, in order


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up on an answer (a test's pull that failed first) is expected here;
        # socketserver printed a traceback to stderr for each.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def proxying(upstream: str, rewrite: Rewrite | None = None) -> Iterator[Proxy]:
    up = urlsplit(upstream)
    proxy = Proxy("", rewrite)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read().replace(upstream.encode(), proxy.base_url.encode())
            out = [
                (k, v.replace(upstream, proxy.base_url))
                for k, v in resp.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            ]
            conn.close()
            proxy.paths.append(self.path)
            answer = Answer(self.path, resp.status, out, data)
            if proxy.rewrite is not None:
                answer = proxy.rewrite(answer) or answer
            self.send_response(answer.status)
            for k, v in answer.headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        do_GET = do_POST = _any

    server = _QuietServer(("127.0.0.1", 0), Handler)
    proxy.base_url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
