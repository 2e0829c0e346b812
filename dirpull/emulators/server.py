"""The HTTP plumbing every emulator shares: a threaded loopback server, a small route table,
switchable fault injection and control endpoints.

A protocol layer (graph.py, google.py, …) subclasses `Emulator`, registers its routes and says how
its vendor words errors (rate limit, 5xx, 401). Everything else is here, once.

Control endpoints, served by every emulator (for tests, the demo and benchmarks that run the
emulator in another process):
  GET  /_emulator/health            {"ok": true, "requests": N}
  POST /_emulator/faults            {"rate_limit": 3, "error": 2, "error_status": 503, "drop": 1,
                                     "malformed": 1, "expire_auth": 1, "delay": 0.5, "path": "/users"}
  POST /_emulator/changes           {"random": 100, "seed": 7, "at": 1795000000.0 (optional)}
plus each vendor's own switches at POST /_emulator/<vendor> (graph, google, okta, bamboohr, workday).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from dirpull.emulators.org import Org
from dirpull.emulators.workers import Balance, Workers, balanced, wait_while_parent_lives

LOOPBACK = "127.0.0.1"


class Headers(dict[str, str]):
    """Request headers, looked up without regard to case (SDKs send lower-case names)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


def signed_token(key: bytes, claims: dict[str, Any]) -> str:
    """`<base64url JSON claims>.<base64url HMAC-SHA256>`: an access token that any forked worker
    holding `key` can check without having remembered it (`token_claims`)."""
    text = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{text}.{_mac(key, text)}"


def token_claims(key: bytes, token: str) -> dict[str, Any] | None:
    """The claims of a token `signed_token` made with `key`; None for anything else."""
    text, _, signature = token.rpartition(".")
    if not text or not hmac.compare_digest(signature.encode(), _mac(key, text).encode()):
        return None
    claims = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return claims if isinstance(claims, dict) else None


def _mac(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def flag(value: Any) -> bool:
    """A switch value that must be a JSON boolean (bool("false") would be True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return check


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Headers
    body: bytes
    raw_path: str
    params: dict[str, str] = field(default_factory=dict)  # named groups of the matched route

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: Any = None  # bytes, str, or an object encoded as JSON
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        # A lone surrogate in a value (Graph's and Google's strings are UTF-16) goes out as the
        # "\\ud83d" escape their JSON writers use: backslashreplace writes exactly that.
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


@dataclass
class Faults:
    """Misbehaviour for the next N matching requests (each counter counts down), plus a delay."""

    rate_limit: int = 0
    error: int = 0
    error_status: int = 500
    drop: int = 0
    malformed: int = 0
    expire_auth: int = 0
    delay: float = 0.0
    path: str | None = None  # only requests whose path contains this are affected

    def take(self, name: str, path: str) -> bool:
        if self.path and self.path not in path:
            return False
        left = getattr(self, name)
        if left > 0:
            setattr(self, name, left - 1)
            return True
        return False

    def update(self, values: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise KeyError(key)
            setattr(self, key, value)

    def clear(self) -> None:
        self.update({f.name: f.default for f in fields(self)})


Handler = Callable[[Request], Response]


class Emulator:
    """Base of the vendor emulators. Subclasses call `self.route()` in `__init__`."""

    name = "emulator"
    # True when everything a request creates travels in later requests (signed tokens, page tokens
    # that say where they are) or is a cache: then forked workers answer alike (workers.py).
    parallel = False

    def __init__(self, org: Org) -> None:
        self.org = org
        self.faults = Faults()
        self.requests = 0
        self.request_log: list[tuple[str, str]] = []  # (method, path?query) for tests
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._server: ThreadingHTTPServer | None = None
        self._extra_servers: list[ThreadingHTTPServer] = []  # each worker's own port (workers > 1)
        self._threads: list[threading.Thread] = []
        self._workers = Workers()
        self.worker_urls: list[str] = []  # with workers > 1: where each worker answers on its own
        self._lock = threading.Lock()
        self.route("GET", r"/_emulator/health", self._health)
        self.route("POST", r"/_emulator/faults", self._set_faults)
        self.route("POST", r"/_emulator/changes", self._changes)

    # --- vendor-specific wording (override) ----------------------------------------------------

    def authenticate(self, req: Request) -> Response | None:
        """None when the request may proceed, else the vendor's 401/403 response."""
        return None

    def rate_limited(self, req: Request) -> Response:
        return Response(429, {"error": "rate limited"}, [("Retry-After", "1")])

    def server_error(self, req: Request, status: int) -> Response:
        return Response(status, {"error": f"HTTP {status}"})

    def unauthorized(self, req: Request) -> Response:
        return Response(401, {"error": "unauthorized"})

    def not_found(self, req: Request) -> Response:
        return Response(404, {"error": f"no route for {req.method} {req.path}"})

    # --- routing ---------------------------------------------------------------------------------

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern + r"$"), handler))

    def switch_route(self, path: str, switches: dict[str, Callable[[Any], Any]]) -> None:
        """`POST {path} {"<switch>": value, …}` sets vendor switches (attributes of the emulator),
        each value through its converter: an emulator served in another process (`python -m
        dirpull.emulators serve`) has no other way to produce the vendor's other failure modes."""

        def handler(req: Request) -> Response:
            body = req.json() or {}
            if not isinstance(body, dict):
                return Response(400, {"error": "expected a JSON object"})
            unknown = sorted(set(body) - set(switches))
            if unknown:
                return Response(400, {"error": f"unknown switch {unknown[0]!r}", "switches": sorted(switches)})
            try:
                values = {name: switches[name](value) for name, value in body.items()}
            except (TypeError, ValueError) as exc:
                return Response(400, {"error": f"bad switch value: {exc}"})
            with self._lock:
                for name, value in values.items():
                    setattr(self, name, value)
            return Response(200, {"ok": True})

        self.route("POST", path, handler)

    def is_control(self, req: Request) -> bool:
        return req.path.startswith("/_emulator/")

    def handle(self, req: Request) -> tuple[Response, str | None]:
        """The response and the fault to apply while sending it ('drop', 'malformed' or None)."""
        control = self.is_control(req)
        if not control:
            with self._lock:
                self.requests += 1
                self.request_log.append((req.method, req.raw_path))
                f = self.faults
                if f.take("rate_limit", req.path):
                    return self.rate_limited(req), None
                if f.take("error", req.path):
                    return self.server_error(req, f.error_status), None
                if f.take("expire_auth", req.path):
                    return self.unauthorized(req), None
                delay = f.delay if (not f.path or f.path in req.path) else 0.0
                wire_fault = "drop" if f.take("drop", req.path) else None
                wire_fault = wire_fault or ("malformed" if f.take("malformed", req.path) else None)
            if delay:
                threading.Event().wait(delay)
        for method, pattern, handler in self._routes:
            m = pattern.match(req.path)
            if m and method == req.method:
                if not control:
                    denied = self.authenticate(req)
                    if denied is not None:
                        return denied, None
                req.params = {k: v for k, v in m.groupdict().items() if v is not None}
                return handler(req), (None if control else wire_fault)
        return self.not_found(req), None

    # --- control endpoints -----------------------------------------------------------------------

    def _health(self, req: Request) -> Response:
        return Response(200, {"ok": True, "emulator": self.name, "requests": self.requests})

    def _set_faults(self, req: Request) -> Response:
        body = req.json() or {}
        with self._lock:
            if body.get("clear"):
                self.faults.clear()
                body = {k: v for k, v in body.items() if k != "clear"}
            try:
                self.faults.update(body)
            except KeyError as exc:
                return Response(400, {"error": f"unknown fault {exc.args[0]!r}"})
        return Response(200, {"ok": True})

    def _changes(self, req: Request) -> Response:
        body = req.json() or {}
        rng = random.Random(body.get("seed"))
        at = body.get("at")  # the changes' time, the same in every worker of a forked emulator
        with self.org.lock, self.org.clock_at(float(at) if at is not None else None):
            done = self.org.random_changes(int(body.get("random", 0)), rng)
        return Response(200, {"ok": True, "changes": done})

    # --- serving ---------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{self.name} emulator is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def before_fork(self) -> None:
        """Make, once, what every worker must share (keys, accounts): called once the port is bound,
        before the workers fork."""

    def start(self, host: str = LOOPBACK, port: int = 0, *, workers: int = 1) -> str:
        """Serve on `host:port` (0: any free port); `workers` > 1 forks that many processes in all
        (see workers.py), for emulators whose state allows it (`parallel`)."""
        if host not in (LOOPBACK, "localhost", "::1"):
            raise ValueError("emulators listen on loopback only")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if workers > 1 and not self.parallel:
            raise ValueError(f"the {self.name} emulator keeps state per process: it serves from one worker")
        emulator = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # stdlib writes headers and body separately: without this Nagle + delayed ACK add ~40 ms.
            disable_nagle_algorithm = True
            server_version = f"dirpull-{emulator.name}-emulator"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = Request(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers=Headers(list(self.headers.items())),
                    body=body,
                    raw_path=self.path,
                )
                try:
                    resp, wire_fault = emulator.handle(req)
                except Exception as exc:  # an emulator bug must show up as a 500, not a hang
                    resp, wire_fault = Response(500, {"error": f"emulator error: {exc!r}"}), None
                payload = resp.encoded()
                if wire_fault == "malformed":
                    payload = payload[: max(1, len(payload) // 2)] + b"\x00}{not json"
                self.send_response(resp.status)
                has_ct = any(k.lower() == "content-type" for k, _ in resp.headers)
                if payload and not has_ct:
                    ctype = resp.content_type
                    if ctype.startswith(("application/json", "text/")) and "charset" not in ctype:
                        ctype += "; charset=utf-8"
                    self.send_header("Content-Type", ctype)
                for key, value in resp.headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if wire_fault == "drop":
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

        class _Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that hangs up mid-response (timeouts, dropped-connection tests) is normal.
                import sys

                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        if workers == 1:
            self._server = _Server((host, port), _Handler)
            self._serve(self._server)
            return self.base_url
        balance = Balance(workers)
        self._server = balanced(_Server, balance)((host, port), _Handler)
        self.before_fork()
        parent = os.getpid()

        def serve_child(index: int, report: Callable[[int], None]) -> None:
            own = _Server((host, 0), _Handler)
            report(own.server_address[1])
            self._serve(self._server)
            self._serve(own)
            wait_while_parent_lives(parent)

        ports = self._workers.fork(workers - 1, balance, serve_child)
        own = _Server((host, 0), _Handler)
        self._extra_servers.append(own)
        self._serve(self._server)
        self._serve(own)
        self.worker_urls = [f"http://{host}:{p}" for p in (own.server_address[1], *ports)]
        return self.base_url

    @property
    def worker_pids(self) -> list[int]:
        """The forked workers' process ids (empty when serving from one process)."""
        return list(self._workers.pids)

    def _serve(self, server: ThreadingHTTPServer) -> None:
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"{self.name}-emulator", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._workers.stop()
        for server in [*self._extra_servers, *([self._server] if self._server else [])]:
            server.shutdown()
            server.server_close()
        self._server = None
        self._extra_servers.clear()
        self.worker_urls = []
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
