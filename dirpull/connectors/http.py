"""The HTTP pieces connectors share: one retry/rate-limit policy, error classification at the
boundary, request counting, URL redaction and a paging guard.

SDK-based connectors (msgraph, okta, google) keep their SDK's transport but use `RetryPolicy` and
`PagingGuard` from here so every provider waits, gives up and reports in the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from dirpull.connectors.base import AuthError, ConnectorError

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Set while the daemon stops (SIGTERM): retry waits end at once instead of holding the shutdown
# for as long as a vendor asked us to wait.
SHUTDOWN = threading.Event()
# Set once the run a pull works for has ended without it (its lease lost, its store failed): the
# pull's retry and rate-limit waits end then too, instead of calling the vendor again for up to the
# run's retry budget while the tenant's next run may already be pulling. Set in the pull's thread by
# the runner; a Prefetch's and a DaemonPool's threads and an event loop's tasks inherit it.
class Ended(Protocol):
    """What RUN_ENDED holds: a threading.Event, or `EitherEnded` of several."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


RUN_ENDED: contextvars.ContextVar[Ended | None] = contextvars.ContextVar("run_ended", default=None)
_SECRET_PARAM = re.compile(r"(token|key|secret|pass|pwd|assertion|code|sig|auth|jwt|session|credential)", re.I)


def redact_url(url: str) -> str:
    """A URL safe for logs and errors: no userinfo, no secret-looking query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    query = urlencode(
        [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(parts.query, True)],
        safe="*$:,",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def env_ca_file() -> str | None:
    """The CA bundle named by `SSL_CERT_FILE` (OpenSSL's variable), if set.

    httpx (Entra) and aiohttp (Okta) verify against it by themselves; requests (Workday, BambooHR)
    and httplib2 (Google) read only certifi's bundle (or their own variables), so an operator
    behind a TLS-inspecting proxy who set it, as docs/providers/entra_id.md says, saw those three
    fail with "certificate verify failed" while the other two worked."""
    return os.environ.get("SSL_CERT_FILE") or None


# The variables naming trusted CAs that each connector's HTTP library reads and fails on, with a
# traceback, when the path they name cannot be read: the first set one is used (requests: its own
# two, then what HttpClient passes it; httplib2: its own, which it checks as it is imported, then
# what google_workspace passes it; httpx: SSL_CERT_FILE). Okta's aiohttp loads OpenSSL's default
# paths, which skip a missing one: not listed. A variable set but empty counts as unset, as for
# the libraries, but for httplib2's (it refuses "").
_CA_VARIABLES: dict[str, tuple[str, ...]] = {
    "bamboohr": ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"),
    "workday": ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"),
    "google_workspace": ("HTTPLIB2_CA_CERTS", "SSL_CERT_FILE"),
    "entra_id": ("SSL_CERT_FILE",),
}


def ca_variable_problem(provider: str) -> str | None:
    """Why the CA bundle the environment names for `provider`'s HTTP library cannot be used, in one
    line naming the variable and the path; None if it can (or none is named).

    Left to the library, a missing or unreadable file failed the run as an "unexpected error"
    with a traceback (httpx's bare FileNotFoundError, requests' OSError, httplib2's RuntimeError on
    import) or, for Google, as a connection retried for minutes."""
    for name in _CA_VARIABLES.get(provider, ()):
        path = os.environ.get(name)
        if path is None or (not path and name != "HTTPLIB2_CA_CERTS"):
            continue
        # requests takes a folder as well as a file (SSL_CERT_DIR is one); the others a file.
        folder_ok = provider in ("bamboohr", "workday")
        why = _unreadable(path, folder_ok=folder_ok)
        if why is None:
            return None
        kind = "a PEM file (or a folder) of the CAs to trust" if folder_ok else "a PEM file of the CAs to trust"
        return (f"{name} in dirpull's environment names {path!r}, which cannot be read ({why}): set it to "
                f"{kind}, or unset it; nothing was requested")  # fmt: skip
    return None


def _unreadable(path: str, *, folder_ok: bool) -> str | None:
    if not path:
        return "it is empty"
    if folder_ok and os.path.isdir(path):
        return None if os.access(path, os.R_OK | os.X_OK) else os.strerror(13)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_plain_http(tenant: str, name: str, url: str | None) -> None:
    """A WARNING when `url` is http:// to another host than this machine: the credentials sent to
    it (a token, an API key, a password) cross the network unencrypted. Not refused: a local
    emulator, or a TLS-terminating sidecar, is a deliberate choice; unnoticed, it is not."""
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname):
        log.warning("tenant %s: %s %s is plain http: credentials travel unencrypted", tenant, name, redact_url(url))


def transport_reason(exc: BaseException, limit: int = 200) -> str:
    """`exc`'s type and, in brackets, why the connection failed, for a run's error and the log:
    `ConnectError (Connection refused)`, `SSLError (certificate verify failed: self-signed
    certificate in certificate chain)`. The type alone could not tell a refused connection from a
    DNS failure, a timeout or a proxy's certificate that does not verify.

    The reason is the innermost useful one the SDK's wrappers carry (through `__cause__`,
    `__context__`, `args` and urllib3's `reason`), one line, at most `limit` characters, with
    no pool description, no request path or query (requests' text holds both), a URL only as
    `redact_url` renders it and no header value."""
    # Innermost first: aiohttp's wrappers are also ssl/OS errors, with less to say.
    chain = _exception_chain(exc)[::-1]
    reason = ""
    for kind in (_cert_reason, _ssl_reason, _dns_reason, _timeout_reason, _errno_reason, _aiohttp_reason,
                 _text_reason):  # fmt: skip
        reason = next((r for e in chain if (r := kind(e))), "")
        if reason:
            break
    name = type(exc).__name__
    if not reason or reason == name:
        return name
    if len(reason) > limit:
        reason = reason[: limit - 1] + "…"
    return f"{name} ({reason})"


# OpenSSL's reasons for a first answer that is no TLS record: the server speaks plain HTTP (or
# another protocol) on that port. Asking again meets the same server.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL"})


def unhealable(exc: BaseException) -> str | None:
    """What to check, in a few words, when a connection failed in a way no retry heals (the server
    does not speak TLS, its certificate does not verify); None for what may heal (refused, reset,
    timed out, a handshake cut). Retried, such a failure held the run ~19 s (Okta's 35 s) for six
    identical answers before it said what was wrong."""
    import ssl

    for e in _exception_chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return ("the server's certificate does not verify: is the URL's host right, and is the CA "
                    "that signed it trusted (SSL_CERT_FILE)?")  # fmt: skip
        if isinstance(e, ssl.SSLError) and getattr(e, "reason", None) in _NOT_TLS:
            return "the server does not speak TLS: is the URL's scheme right (http://, not https://)?"
    return None


def fail_if_unhealable(exc: BaseException, where: str, detail: str, step: str) -> None:
    """Fails the request at once, "`where`: what to check (`detail`)", for a connection no retry
    heals (`unhealable`); returns for one that may."""
    why = unhealable(exc)
    if why is not None:
        raise ConnectorError(f"{where}: {why} ({detail})", retriable=False, step=step) from None


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it wraps, outermost first."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < 20:
        e = todo.pop(0)
        if any(e is seen for seen in out):
            continue
        out.append(e)
        inner = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        todo.extend(i for i in inner if isinstance(i, BaseException))
    return out


def _cert_reason(e: BaseException) -> str:
    import ssl

    if isinstance(e, ssl.SSLCertVerificationError):
        detail = getattr(e, "verify_message", None) or ""
        return f"certificate verify failed: {detail}" if detail else _clean_reason(str(e))
    return ""


def _ssl_reason(e: BaseException) -> str:
    import ssl

    return _clean_reason(str(e)) if isinstance(e, ssl.SSLError) else ""


def _dns_reason(e: BaseException) -> str:
    import socket

    if isinstance(e, socket.gaierror):
        return f"name lookup failed: {e.strerror}" if e.strerror else _clean_reason(str(e))
    return ""


def _timeout_reason(e: BaseException) -> str:
    # socket.timeout and asyncio.TimeoutError are TimeoutError; urllib3's and httpx's own
    # timeouts wrap one or are named so.
    return "timed out" if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ else ""


def _aiohttp_reason(e: BaseException) -> str:
    # aiohttp's parser errors print as "400, message: …": an internal code, which read as the
    # server's HTTP status in a run's error (an answer cut short is no 400).
    message = getattr(e, "message", None)
    if type(e).__module__.startswith("aiohttp.") and isinstance(message, str) and message.strip():
        return _clean_reason(message)
    return ""


def _text_reason(e: BaseException) -> str:
    return _clean_reason(str(e))


def _errno_reason(e: BaseException) -> str:
    import os

    # os.strerror, not the text: asyncio's refused connection reads "Connect call failed (…)".
    if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
        return os.strerror(e.errno)
    return ""


_POOL = re.compile(r"\b\w*Connection(?:Pool)?\(host=[^)]*\):?\s*")  # urllib3's "HTTPSConnectionPool(host=…, port=…): "
_RETRIES = re.compile(r"Max retries exceeded with url: \S+\s*(?:\(Caused by )?")  # the path and query
_OBJECT = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>:?\s*")
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>()\]]+", re.I)
_HEADER_VALUE = re.compile(r"(header[^'\"]*?)[\s:]*b?['\"].*", re.I)
_QUERY_SECRET = re.compile(r"([?&;][^=&\s'\"]*)=([^&\s'\"]*)")


def _clean_reason(text: str) -> str:
    text = " ".join(text.split())
    # h11 and requests quote a header value they refuse: it may be the token.
    text = _HEADER_VALUE.sub(r"\1 (value not shown)", text)
    text = _OBJECT.sub("", _RETRIES.sub("", _POOL.sub("", text)))
    text = _SSL_SOURCE.sub("", text)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    # A query outside a URL (a path with one): secret-looking values hidden as redact_url does.
    text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}=***" if _SECRET_PARAM.search(m.group(1)) else m.group(0), text)
    return text.strip(" :;,")


def parse_http_date(value: str | None) -> datetime | None:
    """An HTTP-date (`Date`, `Retry-After`) in any of its three forms, in UTC; None if unreadable.
    All three are GMT (RFC 9110 5.6.7), but the asctime one names no zone, and the email parser
    hands it (and a "-0000") back naive: read as the machine's local time, it was hours off on a
    machine outside UTC."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: integer, fractional (Graph sends 2.128) or a date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = parse_http_date(value)
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _cut_short() -> None:
    if SHUTDOWN.is_set():
        raise ConnectorError("the worker is stopping: retry wait cut short")
    ended = RUN_ENDED.get()
    if ended is not None and ended.is_set():
        raise ConnectorError("the run has ended: retry wait cut short")


def interruptible_sleep(seconds: float) -> None:
    ended = RUN_ENDED.get()
    if ended is None:
        if SHUTDOWN.wait(seconds):
            _cut_short()
        return
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _cut_short()
        ended.wait(min(0.2, left))
    _cut_short()


class EitherEnded:
    """Ended once any of its events is set."""

    def __init__(self, *events: Ended) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)

    def wait(self, timeout: float | None = None) -> bool:
        # No event wakes a wait on another: one is waited on in short slices, the rest looked at.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._events[0].wait(0.05 if left is None else min(0.05, left))
        return True


@contextlib.contextmanager
def ending_also_with(stop: threading.Event) -> Iterator[None]:
    """Retry and rate-limit waits in this context end once `stop` is set too, as they do when the
    run ends: for work a pull hands to a thread of its own, which the pull waits for when it stops
    (a failed pull otherwise waited out that thread's back-off, minutes at worst, before the run
    could say it failed)."""
    outer = RUN_ENDED.get()
    token = RUN_ENDED.set(stop if outer is None else EitherEnded(outer, stop))
    try:
        yield
    finally:
        RUN_ENDED.reset(token)


async def interruptible_async_sleep(seconds: float) -> None:
    import asyncio

    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _cut_short()
        await asyncio.sleep(min(0.2, left))


class UnreadableBody(ConnectorError):
    """An answer whose body could not be read whole (the connection dropped, timed out or was reset
    while it came) or is not valid JSON, none of it handed on yet: asking again is safe, and a
    proxy's hiccup or a connection cut mid-answer (one whose end only the closing marks reads as
    complete) cannot be told from it. `HttpClient.retry_body` waits before asking again."""


class RetriesExhausted(ConnectorError):
    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message, retriable=True, step=step)


def tenant_prefix(tenant: str) -> str:
    """`tenant T: ` before a connector's own log line. The daemon logs every tenant's runs into one
    stream, and a retry's step and URL do not tell two tenants of a provider apart: every Entra
    tenant calls graph.microsoft.com, every Google one googleapis.com, most as `my_customer`."""
    return f"tenant {tenant}: " if tenant else ""


@dataclass
class RetryPolicy:
    """How long to wait before retry number `attempt` (1-based), and when to give up.

    A server's own hint (`Retry-After`, Okta's reset time) wins over the backoff and is waited in
    full: a retry before the vendor allows it only meets another 429 and spends an attempt (a 90 s
    `Retry-After` was retried after 60 s). `max_delay` caps the backoff's own waits, and
    `max_total_wait` every wait of the run: a vendor that keeps throttling, or asks for a wait the
    run's budget does not hold, fails the run cleanly instead of holding a worker for hours.
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 60.0
    max_total_wait: float = 300.0
    jitter: float = 0.25
    sleep: Callable[[float], None] = interruptible_sleep
    waited: float = field(default=0.0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _waiting: int = field(default=0, init=False, repr=False)  # waits in progress
    _waits_end: float = field(default=0.0, init=False, repr=False)  # when the latest ends (monotonic)

    @classmethod
    def of(cls, settings: Any) -> RetryPolicy:
        """A fresh policy (its wait budget is per run) with a tenant's `max_retry_attempts` and
        `max_retry_wait` (config.RetryingTenant)."""
        return cls(max_attempts=settings.max_retry_attempts, max_total_wait=settings.max_retry_wait)

    def backoff(self, attempt: int) -> float:
        delay = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return delay + random.uniform(0, self.jitter * delay)

    def wait(
        self, attempt: int, hint: float | None, *, what: str, step: str | None = None, attempts: int | None = None
    ) -> None:
        """Sleep before retry `attempt`, or raise `RetriesExhausted` if the budget is spent.

        `what` describes the failed attempt (status, URL, an excerpt of the vendor's error body):
        it becomes the run's error message when the budget is spent. `attempts` overrides
        `max_attempts` for this kind of failure (the run's total wait budget still applies).
        """
        delay = self.begin_wait(attempt, hint, what=what, step=step, attempts=attempts)
        try:
            self.sleep(delay)
        finally:
            self.end_wait()

    def begin_wait(
        self, attempt: int, hint: float | None, *, what: str, step: str | None = None, attempts: int | None = None
    ) -> float:
        """`wait` for a caller that sleeps by itself (an event loop): the delay, charged to the
        budget; `end_wait()` once slept. Waits that overlap are charged once: requests in flight
        together (Google's member workers, Entra's manager reads) are throttled together, and the
        budget caps how long the run is held, not the sum of every request's wait (32 workers
        throttled for 10 s used up the 300 s of a run)."""
        if attempt >= (self.max_attempts if attempts is None else attempts):
            raise RetriesExhausted(f"{what}: gave up after {attempt} attempts", step=step)
        delay = self.backoff(attempt) if hint is None else hint
        with self._lock:
            now = time.monotonic()
            overlap = max(0.0, self._waits_end - now) if self._waiting else 0.0
            charged = max(0.0, delay - overlap)
            if self.waited + charged > self.max_total_wait:
                raise RetriesExhausted(
                    f"{what}: gave up, waiting {charged:.1f}s more would pass the "
                    f"{self.max_total_wait:g}s cap on retry waits",
                    step=step,
                )
            self.waited += charged
            self._waits_end = max(self._waits_end, now + delay)
            self._waiting += 1
        return delay

    def end_wait(self) -> None:
        with self._lock:
            self._waiting -= 1


# Pages one listing may take: a server whose next link or token changes every time (empty pages
# that always say "more") is not caught by the repeat check.
MAX_PAGES = 1_000_000


class PagingGuard:
    """Stops a paging loop that would never end: a repeated cursor or too many pages."""

    def __init__(self, what: str, max_pages: int | None = None, *, cursor: str = "page cursor") -> None:
        self.what = what
        self.max_pages = MAX_PAGES if max_pages is None else max_pages
        self.cursor = cursor
        self.pages = 0
        self._seen: set[str] = set()

    def next(self, cursor: str | None) -> None:
        self.pages += 1
        if self.pages > self.max_pages:
            raise ConnectorError(f"{self.what}: more than {self.max_pages} pages, giving up")
        if cursor is None:
            return
        if cursor in self._seen:
            raise ConnectorError(f"{self.what}: the server repeated a {self.cursor}; stopping a loop")
        self._seen.add(cursor)


# Credentials in the forms a page that echoes the request shows them, whatever their value: an
# Authorization header's (Basic is the username and password in base64: Workday's, BambooHR's API
# key; Bearer an access token got during the run), a JWT (a signed grant or assertion, an access
# token), a token or password field of a form or JSON body. The value must look like one (12+
# characters, a digit or base64's +/=) so "Basic authentication failed" stays as the vendor said it.
# A field's name stands alone, not as the end of a longer word: dirpull's own "secret
# env:WD_PASSWORD: environment variable is not set" lost its "environment" to `***`. A longer name
# ending in a credential word (`oauth_access_token`, `user_password`, `X-Api-Token`) counts only
# where it can be nothing but a field: right before a form's or query's `=`, as a quoted JSON key
# (or a Python dict's) before its `:`, or as a header name (words joined by `-`, which no
# environment variable has) before its `:`. Nor is a name right after `env:` a field: it is a
# variable's, in dirpull's own "secret env:CLIENT_SECRET: environment variable is not set".
_AUTH_VALUE = re.compile(r"\b(Basic|Bearer|SSWS|DPoP)(\s+)(?=[\w+/=.~-]*[0-9+/=])[\w+/=.~-]{12,}", re.I)
_JWT = re.compile(r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*")
_TOKEN_FIELD = re.compile(
    r"""((?<![A-Za-z0-9_])(?<!env:)(?:access_token|refresh_token|id_token|client_secret|client_assertion|assertion|password)["']?\s*[=:]\s*["']?)"""
    r"""[^"'&\s,;}]{8,}""",
    re.I,
)
_CREDENTIAL_END = r"(?:token|secret|password|passwd|assertion)"
_PREFIXED_FIELD = re.compile(
    rf"""((?:(?<![\w-])[a-z0-9]+(?:[_-][a-z0-9]+)*[_-]{_CREDENTIAL_END}="""
    rf"""|(?<=["'])[a-z0-9]+(?:[_-][a-z0-9]+)*[_-]{_CREDENTIAL_END}\\?["']\s*:\s*\\?["']?"""
    rf"""|(?<![\w-])[a-z0-9]+(?:-[a-z0-9]+)*-{_CREDENTIAL_END}:\s*))"""
    r"""[^"'&\s,;}]{8,}""",
    re.I,
)


def mask_credentials(text: str) -> str:
    """`text` (a vendor's error page, an exception's message) with credentials it quotes as `***`:
    a proxy's or a gateway's error page may echo the request it refused, headers and form included.
    The tenant's configured secrets are masked besides (sync.runner); these are the ones no
    setting holds: tokens got during the run, and the base64 of a basic-auth password."""
    text = _AUTH_VALUE.sub(r"\1\2***", text)
    text = _JWT.sub("***", text)
    text = _TOKEN_FIELD.sub(r"\1***", text)
    return _PREFIXED_FIELD.sub(r"\1***", text)


# ESC, BEL, DEL and the C1 controls in a page (a gateway's coloured error text, or one crafted to) went
# as they were into the run's error and the log, and a terminal showing either obeyed them:
# `\x1b[2J` cleared the screen, `\x1b[8m` hid the lines after it. Quoted escaped (`\x1b`) instead.
_CONTROLS = str.maketrans({c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]})


def readable_body(body: bytes | str, limit: int = 300) -> str:
    """A short, single-line rendering of an error body (JSON, XML or HTML), without credentials."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if "<" in text and ">" in text:
        text = re.sub(r"<(script|style)\b.*?</\1>", " ", text, flags=re.S | re.I)
        text = re.sub(r"<[^>]+>", " ", text)
    text = mask_credentials(re.sub(r"\s+", " ", text).strip()).translate(_CONTROLS)
    return text[:limit] + ("…" if len(text) > limit else "")


def body_opening(body: bytes | str, limit: int = 200) -> str:
    """How a body that should have held the directory began, for an error message: of a JSON
    document only its opening (`{"Report_Entry":[`; the values are people, and the message lands
    in the run record and the log), anything else (an HTML or text page) as `readable_body` has it."""
    raw = body.encode() if isinstance(body, str) else body
    text = raw.lstrip()
    # A JSON document behind a UTF-8 byte order mark (which the report parsers refuse) is still
    # people's records: shown as the BOM and the opening, not as text with the first people in it.
    bom = text.startswith(BOM)
    if bom:
        text = text[len(BOM) :].lstrip()
    if text[:1] not in (b"{", b"["):
        return readable_body(raw, limit)
    opening = _ROWS_OPENING.match(text)  # `{"Report_Entry":[`: a key, no value yet
    shown = readable_body(opening.group(0) if opening else text[:1], limit) + " … (values not shown)"
    return f"a UTF-8 byte order mark, then {shown}" if bom else shown


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which JSON text must not begin with
_ROWS_OPENING = re.compile(rb'\{\s*"[^"\\]{0,100}"\s*:\s*\[')


class ForeignRedirect(ConnectorError):
    """A vendor answered with a redirect to another host, scheme or port than the one configured."""


def _same_origin_session() -> requests.Session:
    """A `requests` session that follows a redirect only within the URL's own origin.

    Left to itself, requests follows a 307/308 to any host and sends the request body again: a
    token endpoint's redirect carried the refresh token (and a report's, its prompts) to a host
    nobody configured. It drops the Authorization header there, so the other host's 401 was then
    reported as "credentials refused" at the configured URL, which sent the operator to check a
    password that was right. Refused instead, naming where the vendor pointed: an operator who
    trusts the new location sets it in the configuration."""
    import requests

    class _Session(requests.Session):
        def get_redirect_target(self, resp: requests.Response) -> str | None:
            target = super().get_redirect_target(resp)
            if target is None:
                return None
            # As resolve_redirects reads it: scheme-relative (`//host/…`) or relative to the answer.
            absolute = urljoin(resp.url, f"{urlsplit(resp.url).scheme}:{target}" if target.startswith("//") else target)
            # requests' own test of "credentials do not go there" (another host or port, https→http).
            if self.should_strip_auth(resp.url, absolute):
                resp.close()
                raise ForeignRedirect(
                    f"HTTP {resp.status_code} from {redact_url(resp.url)} redirects to another host "
                    f"({redact_url(absolute)}); not following it with the tenant's credentials (if that "
                    f"is the vendor's new address, put it in the configuration)",
                    retriable=False,
                    status=resp.status_code,
                )
            return target

    return _Session()


def utf8_basic_auth(auth: Any) -> Any:
    """A (user, password) pair as Basic credentials encoded in UTF-8 (RFC 7617), not in the Latin-1
    requests uses for strings: a password with a character Latin-1 lacks (€, a CJK one) failed the
    run as an "unexpected error" (UnicodeEncodeError, a traceback), and one with ä or é went out as
    a byte that a UTF-8 server does not read as the password. ASCII credentials are the same bytes."""
    if isinstance(auth, tuple) and len(auth) == 2 and all(isinstance(part, str) for part in auth):
        from requests.auth import HTTPBasicAuth

        return HTTPBasicAuth(auth[0].encode("utf-8"), auth[1].encode("utf-8"))
    return auth


# How much of a streamed answer's error page is read: enough to quote it and to recognise a
# vendor's fault in it (Workday's SOAP fault), not the whole page, which may be any size.
ERROR_PAGE_BYTES = 64 << 10


def keep_error_opening(resp: requests.Response) -> None:
    """Reads only the opening of a streamed error answer, as its `content`, and closes it: reading
    the whole page to quote 300 characters of it took its size in memory, many times over, and an
    error page that never ended all of the worker's memory. An answer already read is left as is."""
    if resp._content is not False:
        return
    try:
        opening = resp.raw.read(ERROR_PAGE_BYTES, decode_content=True) or b""
    except Exception:  # a page cut or garbled: nothing to quote, the status says enough
        opening = b""
    resp._content = opening
    resp._content_consumed = True
    resp.close()


class HttpClient:
    """A `requests` session with the shared policy: timeouts, retries, classification, counting."""

    def __init__(
        self,
        *,
        policy: RetryPolicy | None = None,
        timeout: tuple[float, float] = (10.0, 60.0),
        headers: Mapping[str, str] | None = None,
        auth: Any = None,
        retry_statuses: frozenset[int] = RETRIABLE_STATUSES,
        permanent: Callable[[requests.Response], str | None] | None = None,
        tenant: str = "",
    ) -> None:
        """`permanent`: for a response whose status is retried, why this one is not worth retrying
        (the vendor says the request itself is wrong), or None; a reason fails the request at once.
        `tenant`: named in the retry lines of the log, which the daemon writes for every tenant."""
        # Imported here: the SDK-based connectors share this module but not `requests` (~30 ms of
        # every `dirpull sync` that starts a process).
        import requests

        # A connection cut while the body is read (a non-streamed response) is as transient as one
        # cut before the status line: retried, and reported with the step and URL if it persists.
        self._transient = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        self.session = _same_origin_session()
        # REQUESTS_CA_BUNDLE, if set, still wins (requests reads it at each request).
        self.session.verify = env_ca_file() or os.environ.get("SSL_CERT_DIR") or True
        if headers:
            self.session.headers.update(headers)
        self.session.auth = utf8_basic_auth(auth)
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self.retry_statuses = retry_statuses
        self.permanent = permanent
        self.requests = 0
        self.tenant = tenant

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retrying(self, what: str, attempt: int) -> None:
        # Throttling and outages show in the daemon's log as they happen, not only in the error of
        # a run that finally gives up (the last attempt fails the run instead).
        if attempt < self.policy.max_attempts:
            log.warning(
                "%s%s; retrying (attempt %d of %d)", tenant_prefix(self.tenant), what, attempt + 1,
                self.policy.max_attempts,
            )

    def retry_body(self, attempt: int, what: str, *, step: str) -> None:
        """Wait before asking again for an answer whose body was unreadable (`UnreadableBody`; `what`
        says how), as for any transient failure: logged, backed off, cut short by SHUTDOWN or
        RUN_ENDED; `RetriesExhausted` naming `what` and the attempts once they are spent."""
        self._retrying(what, attempt)
        self.policy.wait(attempt, None, what=what, step=step)

    def request(self, method: str, url: str, *, step: str, stream: bool = False, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        if "auth" in kwargs:
            kwargs["auth"] = utf8_basic_auth(kwargs["auth"])
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            try:
                resp = self.session.request(method, url, stream=stream, **kwargs)
            except ForeignRedirect as exc:
                raise ConnectorError(f"{step}: {exc}", retriable=False, step=step, status=exc.status) from None
            except self._transient as exc:
                detail = f"{transport_reason(exc)} on {method} {redact_url(url)}"
                fail_if_unhealable(exc, step, detail, step)
                what = f"{step}: {detail}"
                self._retrying(what, attempt)
                self.policy.wait(attempt, None, what=what, step=step)
                continue
            if stream and resp.status_code >= 400:
                keep_error_opening(resp)
            if resp.status_code in self.retry_statuses and self.permanent is not None:
                why = self.permanent(resp)
                if why is not None:
                    resp.close()
                    raise ConnectorError(
                        f"{step}: HTTP {resp.status_code} from {redact_url(url)}: {why}",
                        retriable=False,
                        step=step,
                        status=resp.status_code,
                    )
            if resp.status_code in self.retry_statuses:
                hint = parse_retry_after(resp.headers.get("Retry-After"))
                detail = readable_body(resp.content, limit=200) if not stream else ""
                what = f"{step}: HTTP {resp.status_code} on {method} {redact_url(url)}" + (
                    f" ({detail})" if detail else ""
                )
                resp.close()
                self._retrying(what, attempt)
                self.policy.wait(attempt, hint, what=what, step=step)
                continue
            if resp.status_code in (401, 403):
                detail = readable_body(resp.content)
                raise AuthError(
                    f"{step}: HTTP {resp.status_code} from {redact_url(url)}: credentials refused or "
                    f"not permitted ({detail})",
                    step=step,
                    status=resp.status_code,
                )
            if resp.status_code >= 400:
                # BambooHR explains a 400 in a header; one of its own pages spells it with three s.
                detail = (
                    resp.headers.get("X-BambooHR-Error-Message")
                    or resp.headers.get("X-BambooHR-Error-Messsage")
                    or readable_body(resp.content)
                )
                raise ConnectorError(
                    f"{step}: HTTP {resp.status_code} from {redact_url(url)}" + (f": {detail}" if detail else ""),
                    retriable=resp.status_code >= 500,
                    step=step,
                    status=resp.status_code,
                )
            return resp
