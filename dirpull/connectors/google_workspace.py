"""Google Workspace through the Admin SDK Directory API (google-api-python-client).

The Directory API has no delta, so every run is a full snapshot:

1. users.list (500 a page, `projection=full` only when the attribute mapping reads customSchemas),
   every page to the end. Raw records are spooled to an anonymous temporary file while small maps
   (email → id, the ids in the org-unit scope) are built: a manager is named by email and may
   appear on any later page, so users are normalized only once every page has been read. Memory
   holds one page of full records plus those maps.
2. groups.list (200 a page), then members.list (200 a page) for every group, fetched by
   `member_workers` threads, each with its own service object and httplib2 connection
   (httplib2 is not thread-safe). GROUP members are fetched too and flattened transitively
   (cycles are safe); a CUSTOMER member (the whole domain) is expanded to every user in scope;
   EXTERNAL members (and USER members who are not users of this domain) cannot be memberships
   because a membership names a user idp_id, so their addresses are kept on the group, in
   `raw_attributes["externalMembers"]`. A USER member with an address of the listed users'
   domains whom users.list did not return is looked up with users.get (at most UNLISTED_READS a
   run): someone hired while the run read is a user of this run, an account Google does not find
   is external, one it will not show is left out (see `_resolve_unlisted`).
3. Users (scoped) are yielded as soon as their scope is known — right after users.list, before any
   member is fetched, unless a group scope is configured — then groups, then flattened
   memberships; `Done(snapshot=True)`.

Throttling (403 userRateLimitExceeded/rateLimitExceeded/quotaExceeded, 429) and 5xx are retried
with exponential backoff and jitter from the shared RetryPolicy (Google sends no Retry-After),
capped in attempts (a throttle gets more: Google's quota is per minute) and total wait; then the
run fails and nothing is applied. So is a token
request answered with a 5xx or what google-auth marks retryable (429, 408); any other refusal is
an AuthError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import json
import logging
import os
import queue
import socket
import tempfile
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from sys import intern
from typing import Any
from urllib.parse import urljoin, urlsplit

import httplib2
from googleapiclient.model import JsonModel

from dirpull.connectors.base import (
    AuthError,
    ConfigurationError,
    ConnectorError,
    CountsRequests,
    Done,
    Page,
    Quarantined,
)
from dirpull.connectors.deadline import DEADLINES
from dirpull.connectors.http import (
    PagingGuard,
    RetriesExhausted,
    RetryPolicy,
    ending_also_with,
    env_ca_file,
    fail_if_unhealable,
    readable_body,
    redact_url,
    tenant_prefix,
    transport_reason,
    warn_plain_http,
)
from dirpull.connectors.mapping import map_attributes, mapping_root, unordered_lists, without
from dirpull.connectors.nesting import nested_groups
from dirpull.connectors.source import Known, SourceDigests
from dirpull.jsoncodec import compact, loads_any
from dirpull.model import Group, User
from dirpull.prefetch import DaemonPool, Prefetch
from dirpull.spool import spool_error, spool_errors

log = logging.getLogger(__name__)

PROVIDER = "google_workspace"
DEFAULT_API_URL = "https://admin.googleapis.com"
SCOPES = (
    "https://www.googleapis.com/auth/admin.directory.user.readonly",
    "https://www.googleapis.com/auth/admin.directory.group.readonly",
)
USER_PAGE = 500
GROUP_PAGE = 200
MEMBER_PAGE = 200
YIELD_PAGE = 500
HTTP_TIMEOUT = 60.0
# 403 reasons that mean "slow down", not "forbidden".
THROTTLE_REASONS = frozenset({"userRateLimitExceeded", "rateLimitExceeded", "quotaExceeded"})
# Google's per-user quota is counted per minute and it sends no Retry-After: a throttled request
# keeps backing off (0.5 s, 1 s, … 32 s: over a minute of waits by the 8th) until a new minute's
# quota is certain to have come, where an outage (5xx) gives up after the policy's max_attempts.
THROTTLE_ATTEMPTS = 9
# users.get reads a run may make for members users.list did not return (see `_resolve_unlisted`):
# usually none or a handful; a directory full of unmanaged accounts with company addresses would
# otherwise cost a request for each of them, every run.
UNLISTED_READS = 100
USER_VOLATILE = ("etag", "lastLoginTime", "thumbnailPhotoEtag")
GROUP_VOLATILE = ("etag", "directMembersCount")


def make_policy(template: RetryPolicy | None, settings: Any) -> RetryPolicy:
    """A fresh retry policy for one pull (its wait budget is per run): a copy of `template` (tests
    record sleeps instead of sleeping), else the tenant's `max_retry_attempts` and
    `max_retry_wait`. A throttled request still gets at least THROTTLE_ATTEMPTS."""
    if template is not None:
        return dataclasses.replace(template)
    return RetryPolicy.of(settings)


class _CountingHttp(httplib2.Http):
    """httplib2 with a shared request counter (API calls, retries and token requests)."""

    def __init__(self, counter: _Counter, timeout: float) -> None:
        # httplib2 reads certifi's bundle, or HTTPLIB2_CA_CERTS; SSL_CERT_FILE as the other
        # connectors do when only that is set (connectors.http.env_ca_file).
        ca = None if os.environ.get("HTTPLIB2_CA_CERTS") else env_ca_file()
        super().__init__(timeout=timeout, ca_certs=ca)
        self._seconds = timeout
        self._counter = counter
        # The URL of the request last sent (one instance per thread): a connection that fails may
        # be the token endpoint's (the key file's token_uri, another host than api_url).
        self.last_uri: str | None = None
        # The status of the last token request (the only POST): google-auth's RefreshError does not
        # carry it, and tells no 502 from a refusal of the grant.
        self.token_status: int | None = None
        # Where a redirect answering the token request pointed (httplib2 follows a POST's 308
        # only, refused above when it leaves the origin; a 302 or 307 comes back as the answer).
        self.token_location: str | None = None
        # The URL whose answer is being handled: httplib2 follows a redirect by calling `request`
        # again from inside it, so a request made while this is set is a redirect of it.
        self._redirected_from: str | None = None

    def _conn_request(self, conn: Any, *args: Any, **kwargs: Any) -> Any:
        # httplib2's timeout bounds each socket read: a server trickling a byte now and then, or a
        # chunked body that never ends, held the run for good. The whole answer must come within
        # the timeout ("60 s per request"): past it the connection is shut, which ends the read.
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)

        key = DEADLINES.arm(self._seconds, expire)
        try:
            answer = super()._conn_request(conn, *args, **kwargs)
        except BaseException:
            if not expired.is_set():
                raise
            answer = None
        finally:
            DEADLINES.disarm(key)  # after this `expire` cannot run: the connection may be reused
        if expired.is_set():  # even a body read "to the end": the end was the shutdown's
            conn.close()
            raise TimeoutError(f"timed out: no whole answer within {self._seconds:g}s")
        return answer

    def request(self, *args: Any, **kwargs: Any) -> Any:
        uri = str(kwargs.get("uri") or (args[0] if args else ""))
        origin = self._redirected_from
        if origin is not None and _origin(uri) != _origin(origin):
            # httplib2 drops the Authorization header there, but sends a POST's body again on 308:
            # the token request's signed grant, which the other host could trade for a token. A
            # GET's 401 there read as a refused delegation at api_url.
            raise _ForeignRedirect(
                f"the answer from {redact_url(origin)} redirects to another host ({redact_url(uri)}); not "
                f"following it with the service account's credentials (if that is the right address, "
                f"put it in the configuration: api_url, or the key file's token_uri)"
            )
        self._counter.add()
        self.last_uri = uri
        method = kwargs.get("method") or (args[1] if len(args) > 1 else "GET")
        if method == "POST":
            self.token_status = None  # unknown until answered (a connection that fails)
            self.token_location = None
        self._redirected_from = uri
        try:
            resp, content = super().request(*args, **kwargs)
        finally:
            self._redirected_from = origin
        # The only POST is google-auth's token request. Its 200 answer that is not a JSON object
        # (a proxy's page, a cut body) would surface as google-auth's bare TypeError.
        if method == "POST":
            self.token_status = resp.status
            self.token_location = resp.get("location") if 300 <= resp.status < 400 else None
        if method == "POST" and resp.status == 200:
            try:
                ok = isinstance(json.loads(content), dict)
            except (ValueError, TypeError):
                ok = False
            if not ok:
                ctype = resp.get("content-type") or "no content type"
                raise _BadTokenAnswer(f"the token endpoint answered 200 with a body that is not a JSON object "
                                      f"({ctype}, {len(content or b'')} bytes)")  # fmt: skip
        return resp, content


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


class _ForeignRedirect(Exception):
    pass


class _BadTokenAnswer(Exception):
    pass


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


class _GroupGone(Exception):
    """members.list answered 404: the group was deleted while the run was reading."""


class _GroupForbidden(Exception):
    """members.list answered 403 (not a throttle): the admin may not read this group's members."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(where)
        self.where, self.message = where, message


@dataclass(slots=True)
class _Direct:
    users: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    customer: bool = False
    external: list[str] = field(default_factory=list)
    # USER members with an address of this directory whom users.list did not return: (userKey, address)
    unlisted: list[tuple[str, str]] = field(default_factory=list)
    unreadable: bool = False  # a nested group whose members the admin may not read (403)


class _MemberReads:
    """Direct members of the root groups and of every group nested in them, read `workers` requests
    at a time from `start()` on, while the caller does other work; `result()` waits for them all.
    Leaving the `with` block cancels what has not started and waits for what has, whose retry
    waits end then: a pull failing on one group waited out another's back-off before it could end."""

    def __init__(self, read: Callable[[str], _Direct | None], workers: int) -> None:
        self._read = read
        self._stop = threading.Event()
        self._pool = DaemonPool(workers, "google-members")  # left behind by a stop, not waited for at exit
        # Finished requests queue up here: `wait(FIRST_COMPLETED)` over thousands of pending futures
        # re-registers on every one of them per completion (0.7 s of CPU at 2,000 groups).
        self._finished: queue.SimpleQueue[tuple[str, Future[_Direct | None]]] = queue.SimpleQueue()
        self._submitted: set[str] = set()
        self._pending = 0

    def __enter__(self) -> _MemberReads:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read_one(self, gid: str) -> _Direct | None:
        with ending_also_with(self._stop):
            return self._read(gid)

    def start(self, roots: list[str]) -> None:
        for gid in roots:
            if gid not in self._submitted:
                self._submit(gid)

    def _submit(self, gid: str) -> None:
        self._submitted.add(gid)
        self._pending += 1
        fut = self._pool.submit(self._read_one, gid)
        fut.add_done_callback(lambda f: self._finished.put((gid, f)))

    def result(self) -> dict[str, _Direct]:
        """Each group's direct members; a group gone meanwhile is left out."""
        out: dict[str, _Direct] = {}
        while self._pending:
            # Every request has its own timeout and bounded retries, so each future finishes.
            gid, fut = self._finished.get()
            self._pending -= 1
            result = fut.result()  # raises the worker's ConnectorError: the run fails
            if result is None:
                continue
            out[gid] = result
            for sub in result.groups:
                if sub not in self._submitted:
                    self._submit(sub)
        return out


def _refresh_detail(exc: Exception) -> str:
    """What google-auth's RefreshError quotes of the token endpoint's answer. For an OAuth error
    without `error_description` it words it "invalid_grant: None" (or "invalid_grant: " when empty):
    the `error` alone, not a None read as the reason."""
    data = exc.args[1] if len(exc.args) > 1 else None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str) and error.strip() and not str(data.get("error_description") or "").strip():
        return error
    if isinstance(error, dict):
        # The API's error shape (a front end's answer, not the OAuth server's): google-auth quotes
        # the dict as Python writes it, "{'code': 403, 'message': …".
        reason, message = _api_error(error)
        return f"{message} ({reason})" if message and reason else message or reason or "refused"
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else "refused"


def _token_throttled(exc: Exception) -> bool:
    """The token endpoint's answer is a throttling in the API's error shape (403 or 429 with
    userRateLimitExceeded, rateLimitExceeded, quotaExceeded): a rate limit, not a refusal."""
    data = exc.args[1] if len(exc.args) > 1 else None
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and _api_error(error)[0] in THROTTLE_REASONS


def _refused(where: str, message: str, step: str, *, directory: str | None = None) -> AuthError:
    checks = "the subject, domain-wide delegation and the read-only scopes"
    if directory:
        # Google answers a customer or domain that is not the subject's with the same 403
        # "Not Authorized to access this resource/api" as a missing delegation.
        checks = f"{directory}, {checks}"
    return AuthError(f"{where}: {message or 'not permitted'} (check {checks})", step=step)


def _error_reason(exc: Any) -> tuple[str, str]:
    """(reason, message) from a Google JSON error body."""
    try:
        return _api_error(json.loads(exc.content)["error"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "", ""


def _api_error(err: Any) -> tuple[str, str]:
    """(reason, message) of the API's `error` object."""
    try:
        first = (err.get("errors") or [{}])[0]
        return str(first.get("reason") or err.get("status") or ""), str(err.get("message") or "")
    except (KeyError, TypeError, AttributeError, IndexError):
        return "", ""


class _FastJsonModel(JsonModel):
    """The client's JSON model, parsing bodies with orjson: the standard library's parser was a
    fifth of a 100,000-user pull's CPU, spent while the member workers wait for the GIL."""

    def deserialize(self, content: Any) -> Any:
        try:
            body = loads_any(content)
        except ValueError:
            return super().deserialize(content)  # not JSON: the client hands back the text
        if self._data_wrapper and isinstance(body, dict) and "data" in body:
            body = body["data"]
        return body


SPOOLED_USERS = "the users read so far"  # what the temporary file holds, as its errors name it


@dataclass
class _UserSpool:
    """The users read so far, one JSON line each on disk, and per line what telling "unchanged"
    takes without reading the line back: the id, the record's digest share, the manager relation."""

    file: Any
    ids: list[str] = field(default_factory=list)
    parts: list[bytes | None] = field(default_factory=list)
    managers: list[str | None] = field(default_factory=list)

    def add(self, raw: dict[str, Any], uid: str, part: bytes | None, manager_value: str | None) -> None:
        try:  # not `with spool_errors(…)`: a context manager's cost for every user of the listing
            self.file.write(compact(raw))  # one line: JSON escapes every newline in a string
            self.file.write(b"\n")
        except OSError as exc:
            raise spool_error(exc, "write", SPOOLED_USERS) from None
        self.ids.append(uid)
        self.parts.append(part)
        self.managers.append(manager_value)


@functools.lru_cache(maxsize=16)
def _service_account(key: str) -> Any:
    """A service-account key's credentials, parsed once per process and key text (a file is read
    every run, so a rotated key takes effect): checking the RSA key takes ~35 ms, in every run
    otherwise. Each run signs with its own copy (`with_subject`); this one is never refreshed."""
    from google.oauth2 import service_account

    return service_account.Credentials.from_service_account_info(json.loads(key), scopes=list(SCOPES))


class _Session:
    """Credentials and one service object per thread, all counting into one counter."""

    def __init__(self, settings: Any, policy: RetryPolicy, tenant: str = "") -> None:
        self.policy = policy
        self.tenant = tenant
        self.counter = _Counter()
        self.api_url = (settings.api_url or DEFAULT_API_URL).rstrip("/")
        # What a refused listing names among the things to check.
        self.directory = (
            f"domain {settings.domain!r}" if settings.domain else f"customer {settings.customer or 'my_customer'!r}"
        )
        ref = settings.credentials_file
        try:
            path = getattr(ref, "path", None)
            if path is not None:
                # utf-8-sig: a byte-order mark (a key saved by a Windows editor) is not part of the
                # JSON, as for every other file: secret.
                key = path.read_text(encoding="utf-8-sig")
            else:
                key = ref.get() if hasattr(ref, "get") else str(ref)
            creds = _service_account(key)
            # Public (the Admin console lists it): what a delegation that is missing must name.
            info = json.loads(key)
            self.client_id = str(info.get("client_id") or "") or None
            # The access token comes back from it (and the signed grant goes to it) in every run.
            warn_plain_http(tenant, "the credentials file's token_uri", str(info.get("token_uri") or ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never echo the file: it holds a private key.
            raise ConfigurationError(
                f"credentials_file {getattr(ref, 'reference', '***')}: not a readable service-account "
                f"JSON key ({type(exc).__name__})",
                step="credentials",
            ) from None
        self.credentials = creds.with_subject(settings.subject)
        self._local = threading.local()
        self._https: list[httplib2.Http] = []
        self._lock = threading.Lock()

    def service(self) -> Any:
        svc = getattr(self._local, "service", None)
        if svc is None:
            from google_auth_httplib2 import AuthorizedHttp
            from googleapiclient.discovery import build as build_service

            raw = _CountingHttp(self.counter, HTTP_TIMEOUT)
            with self._lock:
                self._https.append(raw)
            svc = build_service(
                "admin",
                "directory_v1",
                http=AuthorizedHttp(self.credentials, http=raw),
                model=_FastJsonModel(),
                static_discovery=True,
                cache_discovery=False,
                client_options={"api_endpoint": self.api_url},
            )
            self._local.service = svc
            self._local.http = raw
        return svc

    def close(self) -> None:
        with self._lock:
            for h in self._https:
                h.close()
            self._https.clear()

    def _retry(self, what: str, attempt: int, step: str, *, attempts: int | None = None) -> None:
        """Wait before trying again after failed `attempt`, saying so in the log, as the other
        connectors do: the log line comes once the policy has granted the wait. Logged first, the
        last attempt's failure read "retrying (attempt 6)" just before the run gave up after 6."""
        delay = self.policy.begin_wait(attempt, None, what=what, step=step, attempts=attempts)
        log.warning(
            "%s%s; retrying in %.1fs (attempt %d of %d)", tenant_prefix(self.tenant), what, delay, attempt + 1,
            attempts or self.policy.max_attempts,
        )  # fmt: skip
        try:
            self.policy.sleep(delay)
        finally:
            self.policy.end_wait()

    def execute(self, request: Any, step: str, *, may_vanish: bool = False) -> dict[str, Any]:
        """One API call under the retry policy. `may_vanish`: a 404 means the object listed (a
        group) was deleted meanwhile (`_GroupGone`), and a 403 is the caller's to judge
        (`_GroupForbidden`); otherwise a 404 is a configuration error and a 403 an AuthError."""
        from google.auth.exceptions import RefreshError, TransportError
        from googleapiclient.errors import HttpError

        attempt = 0
        while True:
            attempt += 1
            try:
                body = request.execute(num_retries=0)
            except HttpError as exc:
                status = exc.resp.status
                reason, message = _error_reason(exc)
                if not reason and not message:
                    # Not the API's error format (a proxy's or gateway's page): what it says, not
                    # nothing (a 400 ended on a colon) or a guess such as "not permitted".
                    said = readable_body(exc.content or b"", 200)
                    message = f"not Google's error format: {said}" if said else ""
                label = f"HTTP {status} {reason}" if reason else f"HTTP {status}"
                where = f"{step}: {label} from {redact_url(str(exc.uri))}"
                throttled = status == 429 or (status == 403 and reason in THROTTLE_REASONS)
                if throttled or status >= 500:
                    limit = max(self.policy.max_attempts, THROTTLE_ATTEMPTS) if throttled else None
                    self._retry(where, attempt, step, attempts=limit)
                    continue
                if status == 404 and may_vanish:
                    raise _GroupGone(where) from None
                if status == 403 and may_vanish:
                    raise _GroupForbidden(where, message) from None
                if status == 404:
                    # Nothing of this directory's is addressed here: the URL or the directory is wrong.
                    raise ConfigurationError(
                        f"{where}: {message or 'not found'} (check api_url, the host root such as "
                        f"{DEFAULT_API_URL} without /admin/directory/v1, and customer / domain)",
                        step=step,
                    ) from None
                if status in (401, 403):
                    raise _refused(where, message, step, directory=self.directory if status == 403 else None) from None
                if status == 400:
                    raise ConfigurationError(f"{where}: {message}", step=step) from None
                raise ConnectorError(f"{where}: {message}", retriable=False, step=step) from None
            except RefreshError as exc:
                detail = _refresh_detail(exc)
                raw = getattr(self._local, "http", None)
                token_status = getattr(raw, "token_status", None)
                if token_status is not None and 300 <= token_status < 400:
                    # google-auth reads the redirect's empty answer as a refusal with nothing to
                    # quote: "refused the service-account grant: ", which sent the admin to the
                    # delegation. The key file's token_uri is what to check.
                    where = getattr(raw, "token_location", None)
                    to = f", a redirect to {redact_url(urljoin(raw.last_uri or '', where))}" if where else ""
                    raise ConnectorError(
                        f"{step}: the token endpoint {redact_url(raw.last_uri or '')} answered HTTP {token_status}"
                        f"{to}; not followed with the service account's signed grant (if that is the right "
                        f"address, put it in the key file's token_uri)",
                        retriable=False,
                        step=step,
                        status=token_status,
                    ) from None
                if token_status is not None and token_status >= 500:
                    # Any 5xx is Google's outage, not a refusal of the grant: google-auth retries
                    # 500, 503 and 504 itself (3 tries by now) but not 502, which failed runs as an
                    # AuthError that said "refused" and sent the admin to check the delegation.
                    what = (f"{step}: the token endpoint failed with HTTP {token_status} (an outage at Google, "
                            f"not a refusal of the service account): {readable_body(detail, 200)}")  # fmt: skip
                    self._retry(what, attempt, step)
                    continue
                if _token_throttled(exc):
                    what = f"{step}: the token endpoint is rate limited: {readable_body(detail, 200)}"
                    self._retry(what, attempt, step, attempts=max(self.policy.max_attempts, THROTTLE_ATTEMPTS))
                    continue
                if getattr(exc, "retryable", False):
                    # A 429/408 or a server_error/temporarily_unavailable from the token endpoint
                    # (google-auth has tried it 3 times by now): an outage, not a refusal.
                    what = f"{step}: the token endpoint failed: {readable_body(detail, 200)}"
                    self._retry(what, attempt, step)
                    continue
                hint = ""
                if detail.startswith("unauthorized_client"):
                    # Google's wording names neither the delegation nor what to enter in it.
                    client = f"client id {self.client_id}" if self.client_id else "the service account's client id"
                    hint = (f" (domain-wide delegation: a super admin must authorize {client} for the scopes "
                            f"{','.join(SCOPES)} in the Admin console: Security > API controls > Domain-wide "
                            f"delegation)")  # fmt: skip
                # An answer with no body (a gateway's bare 403) left nothing to quote after the colon.
                said = readable_body(detail, 200)
                said = said or (f"HTTP {token_status}, no reason given" if token_status else "no reason given")
                raise AuthError(
                    f"{step}: the token endpoint refused the service-account grant: {said}{hint}", step=step
                ) from None
            except _ForeignRedirect as exc:
                raise ConnectorError(f"{step}: {exc}", retriable=False, step=step) from None
            except _BadTokenAnswer as exc:
                what = f"{step}: {exc}"
                self._retry(what, attempt, step)
                continue
            except (
                TransportError,
                OSError,
                httplib2.HttpLib2Error,
                http.client.HTTPException,
                UnicodeDecodeError,
            ) as exc:
                raw = getattr(self._local, "http", None)
                url = getattr(raw, "last_uri", None) or self.api_url
                detail = f"{transport_reason(exc)} talking to {redact_url(url)}"
                fail_if_unhealable(exc, step, detail, step)
                what = f"{step}: {detail}"
                self._retry(what, attempt, step)
                continue
            if not isinstance(body, dict):
                # googleapiclient hands back the raw text when a 2xx body is not JSON.
                what = f"{step}: the response body was not JSON"
                self._retry(what, attempt, step)
                continue
            return body

    def collection(self, name: str) -> Any:
        """This thread's `users`, `groups` or `members` collection of the service. Kept: asked for
        again, googleapiclient builds the collection's methods from the discovery document anew
        (0.34 ms, twice per group: 1.3 s of CPU in a run over 2,000 groups)."""
        collections = getattr(self._local, "collections", None)
        if collections is None:
            collections = self._local.collections = {}
        found = collections.get(name)
        if found is None:
            found = collections[name] = getattr(self.service(), name)()
        return found

    def pages(self, name: str, step: str, *, may_vanish: bool = False, **params: Any) -> Iterator[dict[str, Any]]:
        """Every page of the `name` collection's listing with these parameters."""
        collection = self.collection(name)
        request = collection.list(**params)
        guard = PagingGuard(step)
        while request is not None:
            body = self.execute(request, step, may_vanish=may_vanish)
            guard.next(body.get("nextPageToken"))
            yield body
            request = collection.list_next(request, body)


def _records(body: dict[str, Any], key: str, step: str) -> list[Any]:
    """The records of a listing page. Google leaves `key` out of a page with none; anything but a
    list there is no Directory API answer, and read as no records (as it was) a page of users or
    members was lost without a word, or a record that is not an object failed the run with an
    AttributeError naming neither the listing nor the problem."""
    if key not in body:
        return []
    records = body[key]
    if not isinstance(records, list):
        kind = {dict: "an object", type(None): "null", str: "a string"}.get(type(records), "a number")
        raise ConnectorError(f"{step}: the page's {key!r} is {kind}, not a list of records", step=step)
    return records


class GoogleWorkspaceConnector(CountsRequests):
    provider = PROVIDER
    source_digests = True  # a pull takes `known=` (connectors.source)

    def __init__(self, tenant: str, settings: Any, *, policy: RetryPolicy | None = None) -> None:
        self.tenant = tenant
        self.settings = settings
        self.policy = policy
        warn_plain_http(tenant, "api_url", settings.api_url)  # the bearer token goes in every request
        self.customer = None if settings.domain else (settings.customer or "my_customer")
        self.domain = settings.domain
        self.mapping: dict[str, str] = dict(settings.attributes or {})
        self.projection = (
            "full" if any(p.startswith("customSchemas") for p in self.mapping.values()) else "basic"
        )
        self.org_units = [_norm_ou(ou) for ou in settings.org_units or []]
        self.group_filter = {g.strip().lower() for g in settings.groups or [] if g.strip()}
        self.workers = max(1, int(getattr(settings, "member_workers", 4) or 4))

    def _scope_args(self) -> dict[str, str]:
        return {"customer": self.customer} if self.customer else {"domain": self.domain}

    def pull(
        self, cursor: dict[str, Any] | None, *, full: bool, known: Known | None = None
    ) -> Iterator[Page | Done]:
        # No delta exists: `cursor` and `full` change nothing, every run is a full snapshot.
        self._new_pull()
        session = _Session(self.settings, make_policy(self.policy, self.settings), self.tenant)
        self._counting(lambda: session.counter.value)
        sources = SourceDigests(known, self.settings, [__name__]) if known else None
        try:
            with spool_errors("create", SPOOLED_USERS):
                file = tempfile.TemporaryFile(prefix="dirpull-users-")  # noqa: SIM115 - closed below
            try:
                yield from self._pull(session, _UserSpool(file), sources)
            finally:
                with contextlib.suppress(OSError):  # its last buffer found the disk full: the file goes all the same
                    file.close()
        except ConnectorError as exc:
            exc.requests = session.counter.value
            raise
        finally:
            session.close()

    # --- the run ---------------------------------------------------------------------------------

    def _pull(
        self, session: _Session, spool: _UserSpool, sources: SourceDigests | None = None
    ) -> Iterator[Page | Done]:
        notes: list[str] = []
        quarantined: list[Quarantined] = []
        email_to_id: dict[str, str] = {}
        domain_ids: set[str] = set()
        user_domains: set[str] = set()  # the domains of the listed users' addresses
        customer_ids: set[Any] = set()  # the listed users' customerId
        ou_scope: set[str] | None = set() if self.org_units else None
        paths: set[str | None] = set()  # the org units users were listed in (only with an org-unit scope)
        # Login times and etags change without changing the user: left out of the digest, unless
        # the attribute mapping reads them.
        whole = bool({mapping_root(p) for p in self.mapping.values()} & set(USER_VOLATILE))

        # 1. Users: spool raw records, build the small maps. The listing runs a page ahead in its
        # own thread: the server renders the next page while this one is spooled, instead of
        # each side waiting for the other (1.4 of the 4.7 s the listing took at 100,000 users).
        # Its retry waits end once the listing is closed: a page this side could not read (or a
        # failure of its own) otherwise waited out the next page's back-off, JOIN_S and then behind
        # the failed run, still calling Google.
        stop = threading.Event()

        def index(raw: dict[str, Any], uid: str, email: str) -> bytes | None:
            """Makes a user's addresses known (managers and members name users by address) and
            returns the record's share of its source digest."""
            email_to_id[email.lower()] = uid
            for alias in raw.get("aliases") or []:
                if isinstance(alias, str):
                    email_to_id.setdefault(alias.lower(), uid)
            return sources.record_part(raw if whole else without(raw, USER_VOLATILE)) if sources else None

        def list_users() -> Iterator[dict[str, Any]]:
            with ending_also_with(stop):
                yield from session.pages(
                    "users", "users.list", maxResults=USER_PAGE, projection=self.projection, **self._scope_args()
                )

        listing = Prefetch(list_users, depth=2, name="google-users", stop=stop)
        with listing:
            for body in listing:
                for raw in _records(body, "users", "users.list"):
                    if not isinstance(raw, dict):
                        quarantined.append(Quarantined("user", None, "user record is not an object"))
                        continue
                    uid, email = raw.get("id"), raw.get("primaryEmail")
                    if not isinstance(uid, str) or not uid:
                        quarantined.append(Quarantined("user", None, "user record without id"))
                        continue
                    # Google promises no order for a user's emails, aliases, organizations…: one
                    # listing may send them in another order than the last, the same user.
                    raw = unordered_lists(raw, _primary)
                    customer_ids.add(raw.get("customerId"))
                    # Known to the domain even when unreadable, so its memberships are not mistaken
                    # for external ones.
                    domain_ids.add(intern(uid))
                    if ou_scope is not None:
                        path = raw.get("orgUnitPath")
                        paths.add(path if isinstance(path, str) else None)
                        if _in_ous(path, self.org_units):
                            ou_scope.add(uid)
                    if not isinstance(email, str) or not email:
                        quarantined.append(Quarantined("user", uid, "user record without primaryEmail"))
                        continue
                    user_domains.add(_domain(email))
                    spool.add(raw, uid, index(raw, uid, email), _manager_value(raw))
        if not spool.ids:
            notes.append("users.list returned no users")
        elif self.org_units:
            # As for `groups`: a misspelt org unit is named, not only an emptied (or, on a first
            # run, silently empty) tenant.
            empty = [ou for ou in self.org_units if not any(_in_ous(p, [ou]) for p in paths)]
            if empty:
                notes.append(f"configured org units with no user in or under them: {', '.join(empty)}")

        def in_ous(uid: str) -> bool:
            return ou_scope is None or uid in ou_scope

        # 2. Groups (scoped by settings.groups), then their members, flattened.
        groups: list[dict[str, Any]] = []
        # Every group of this directory, in the scope or not: a 403 on one of them is the admin's
        # access, not another organization's group (see `_members_of`).
        listed: set[str] = set()
        for body in session.pages("groups", "groups.list", maxResults=GROUP_PAGE, **self._scope_args()):
            for raw in _records(body, "groups", "groups.list"):
                if not isinstance(raw, dict):
                    quarantined.append(Quarantined("group", None, "group record is not an object"))
                    continue
                gid = raw.get("id")
                if not isinstance(gid, str) or not gid:
                    quarantined.append(Quarantined("group", None, "group record without id"))
                    continue
                listed.add(gid)
                if self.group_filter and not self._group_selected(raw):
                    continue
                groups.append(unordered_lists(raw))  # aliases, nonEditableAliases: no promised order
        if self.group_filter:
            found = {k for raw in groups for k in _group_keys(raw)}
            missing = sorted(self.group_filter - found)
            if missing:
                notes.append(f"configured groups not found: {', '.join(missing)}")

        keep: set[str] = set()

        def members_of(gid: str) -> _Direct | None:
            return self._members_of(session, gid, domain_ids, listed, user_domains)

        with _MemberReads(members_of, self.workers) as reads:
            reads.start([g["id"] for g in groups])
            if not self.group_filter:
                # The scope is known already: hand the users on now, so the sync diffs them while
                # the members are read (the longest part of a run: one request per group and page).
                keep = yield from self._emit_users(spool, quarantined, email_to_id, domain_ids, in_ous, sources)
            direct = reads.result()
        customers = {c for c in customer_ids if isinstance(c, str) and c}
        hired: list[tuple[dict[str, Any], bytes | None]] = []
        for raw in self._resolve_unlisted(session, direct, domain_ids, customers, notes):
            # Read by users.get instead of users.list: known to the domain and scoped alike.
            uid = raw["id"]
            domain_ids.add(intern(uid))
            if ou_scope is not None and _in_ous(raw.get("orgUnitPath"), self.org_units):
                ou_scope.add(uid)
            hired.append((raw, index(raw, uid, raw["primaryEmail"])))
        unreadable = sorted(gid for gid, d in direct.items() if d.unreadable)
        if unreadable:
            shown = ", ".join(unreadable[:10]) + (" …" if len(unreadable) > 10 else "")
            notes.append(f"{len(unreadable)} nested group(s) whose members this admin may not read (HTTP 403, "
                         f"e.g. another organization's group) counted as empty: {shown}")  # fmt: skip
        gone = [g["id"] for g in groups if g["id"] not in direct]
        if gone:
            notes.append(f"{len(gone)} group(s) disappeared while the run read them")
            groups = [g for g in groups if g["id"] in direct]

        # 3. With a group scope: users in the scoped groups (and the org units, when both are set).
        in_scope = in_ous
        if self.group_filter:
            member_scope: set[str] = set()
            for g in groups:
                users, customer, _ = _flatten(g["id"], direct)
                if customer:
                    member_scope = domain_ids
                    break
                member_scope |= users

            def in_scope(uid: str) -> bool:
                return in_ous(uid) and uid in member_scope

            keep = yield from self._emit_users(spool, quarantined, email_to_id, domain_ids, in_scope, sources)
        if hired:
            # Hired while the run read the groups: users of this run as if listed, normalized the
            # same way and with the same digest (the next run, which lists them, finds them unchanged).
            with spool_errors("create", SPOOLED_USERS):
                file = tempfile.TemporaryFile(prefix="dirpull-users-")  # noqa: SIM115 - closed below
            try:
                hires = _UserSpool(file)
                for raw, part in hired:
                    hires.add(raw, raw["id"], part, _manager_value(raw))
                keep |= yield from self._emit_users(hires, [], email_to_id, domain_ids, in_scope, sources)
            finally:
                with contextlib.suppress(OSError):
                    file.close()

        # 5. Groups, with the addresses of members who are not users of this domain.
        page = Page(quarantined=[q for q in quarantined if q.kind == "group"])
        for raw in groups:
            _, _, external = _flatten(raw["id"], direct)
            page.groups.append(self._group(raw, external))
        yield page

        # 6. Flattened memberships.
        page, listed = Page(), 0
        for raw in groups:
            users, customer, _ = _flatten(raw["id"], direct)
            members = keep if customer else users & keep
            page.member_lists.append((raw["id"], list(members)))
            listed += len(members)
            if listed >= YIELD_PAGE * 10:
                yield page
                page, listed = Page(), 0
        if page.member_lists:
            yield page

        yield Done(snapshot=True, cursor=None, mode="full", requests=session.counter.value, notes=notes)

    def _emit_users(
        self,
        spool: _UserSpool,
        quarantined: list[Quarantined],
        email_to_id: dict[str, str],
        domain_ids: set[str],
        in_scope: Callable[[str], bool],
        sources: SourceDigests | None = None,
    ) -> Generator[Page, None, set[str]]:
        """4. The spooled users in scope, normalized now that every manager's email is known.
        Returns the ids whose memberships stand: those emitted, and those quarantined (a
        quarantined user is left as stored, memberships included)."""
        emitted: set[str] = set()
        with spool_errors("write", SPOOLED_USERS):
            spool.file.seek(0)  # the last buffer goes to disk here
        # A broken record outside the scope is none of this tenant's business: reported, it was
        # counted on every run and named by the guard as the reason an empty scope was held.
        page = Page(
            quarantined=[q for q in quarantined if q.kind == "user" and (q.idp_id is None or in_scope(q.idp_id))]
        )
        for line, uid, part, manager_value in zip(spool.file, spool.ids, spool.parts, spool.managers, strict=True):
            if not in_scope(uid):
                continue
            digest = None
            if sources is not None and part is not None:
                # The manager is resolved through other users' addresses: that result is an input
                # too. An unchanged user's line is never parsed again.
                digest = sources.combine(part, _resolve_manager(manager_value, email_to_id, domain_ids))
                if digest is not None and sources.unchanged(uid, digest):
                    emitted.add(uid)
                    page.unchanged_users.append(uid)
                    if len(page.unchanged_users) >= YIELD_PAGE:
                        yield page
                        page = Page()
                    continue
            raw = loads_any(line)
            try:
                user = self._user(raw, email_to_id, domain_ids)
            except (ValueError, TypeError) as exc:
                page.quarantined.append(Quarantined("user", uid, f"cannot normalize: {exc}"[:300]))
                continue
            emitted.add(user.idp_id)
            page.users.append(user)
            if digest is not None:
                page.user_sources[uid] = digest
            if len(page.users) >= YIELD_PAGE:
                yield page
                page = Page()
        if page.users or page.quarantined or page.unchanged_users:
            yield page
        return emitted | {q.idp_id for q in quarantined if q.kind == "user" and q.idp_id and in_scope(q.idp_id)}

    def _resolve_unlisted(
        self, session: _Session, direct: dict[str, _Direct], domain_ids: set[str], customers: set[str],
        notes: list[str],
    ) -> list[dict[str, Any]]:
        """Asks Google (users.get) about each USER member with an address of this directory whom
        users.list did not return, and files them in `direct` by its answer. Returns the records of
        those who are users of this tenant (hired while the run read the groups): their memberships
        stand. A 404 (or another customer's account: an unmanaged account using a company address)
        is an outsider, kept by address as any other. One this admin may not read (403, or the read
        failing) is left out of the run, as are those past UNLISTED_READS: kept by address, they
        would read as an outsider who joins, then leaves once a run lists them."""
        keys: dict[str, str] = {}  # userKey → address
        for d in direct.values():
            for key, address in d.unlisted:
                keys.setdefault(key, address)
        if not keys:
            return []
        ordered = sorted(keys)
        users: dict[str, str] = {}  # userKey → user id
        found: dict[str, dict[str, Any]] = {}  # user id → record
        outsiders: set[str] = set()
        unreadable = 0
        for key in ordered[:UNLISTED_READS]:
            request = session.collection("users").get(userKey=key, projection=self.projection)
            try:
                raw = session.execute(request, "users.get", may_vanish=True)
            except _GroupGone:  # 404: not a user of this customer
                outsiders.add(key)
                continue
            except (_GroupForbidden, RetriesExhausted) as exc:
                log.warning("%s%s: a member users.list did not return, left out of this run",
                            tenant_prefix(self.tenant), getattr(exc, "where", exc))  # fmt: skip
                unreadable += 1
                continue
            uid, email = raw.get("id"), raw.get("primaryEmail")
            if not isinstance(uid, str) or not uid or not isinstance(email, str) or not email:
                unreadable += 1  # a record that cannot be a user: left to a run that lists them
            elif (customers and raw.get("customerId") not in customers) or (
                self.domain and _domain(email) != self.domain.lower()
            ):
                # Another customer's, or another domain of this one than the tenant's: what
                # users.list would not have listed either.
                outsiders.add(key)
            else:
                users[key] = intern(uid)
                if uid not in domain_ids:
                    found.setdefault(uid, unordered_lists(raw, _primary))
        for d in direct.values():
            for key, address in d.unlisted:
                if key in users:
                    d.users.append(users[key])
                elif key in outsiders:
                    d.external.append(address)
            d.unlisted = []
        if unreadable:
            notes.append(
                f"{unreadable} member(s) with an address of this directory that users.list did not return and "
                "users.get could not read (not visible to this admin, or failing) left out until a run lists them"
            )
        unchecked = len(ordered) - UNLISTED_READS
        if unchecked > 0:
            notes.append(
                f"{unchecked} member(s) with an address of this directory that users.list did not return not "
                f"checked (users.get is asked about at most {UNLISTED_READS} a run) left out until a run lists them"
            )
        if found:
            log.info("%s%d user(s) hired while the run read the groups, read with users.get",
                     tenant_prefix(self.tenant), len(found))  # fmt: skip
        return list(found.values())

    def _group_selected(self, raw: dict[str, Any]) -> bool:
        return any(k in self.group_filter for k in _group_keys(raw))

    def _members_of(
        self, session: _Session, gid: str, domain_ids: set[str], listed: set[str], user_domains: set[str]
    ) -> _Direct | None:
        result = _Direct()
        try:
            for body in session.pages("members", "members.list", may_vanish=True, groupKey=gid,
                                      maxResults=MEMBER_PAGE):  # fmt: skip
                for m in _records(body, "members", f"members.list of group {gid}"):
                    if not isinstance(m, dict):
                        # Whose membership it is cannot be told: skipped, a member would be removed.
                        step = f"members.list of group {gid}"
                        raise ConnectorError(f"{step}: a member record is not an object", step=step)
                    kind, mid, email = m.get("type"), m.get("id"), m.get("email")
                    if kind == "GROUP" and isinstance(mid, str):
                        result.groups.append(mid)
                    elif kind == "CUSTOMER":
                        result.customer = True
                    elif kind == "USER" and mid in domain_ids:
                        # One string per user however many groups list them (~8 at 100k users).
                        result.users.append(intern(mid))
                    elif kind == "USER" and isinstance(email, str) and _domain(email) in user_domains:
                        # An address of this directory whom users.list did not return: hired after
                        # the listing passed them (Google has no delta; a run reads for minutes), or
                        # an account that is not this customer's. Google is asked which, once the
                        # members are read (`_resolve_unlisted`).
                        key = mid if isinstance(mid, str) and mid else email
                        result.unlisted.append((key, email.lower()))
                    elif kind in ("USER", "EXTERNAL") and isinstance(email, str):
                        # Not a user of this domain (a consumer account, a partner): no idp_id to
                        # pair with, so it is kept on the group by address.
                        result.external.append(email.lower())
        except _GroupGone:
            return None
        except _GroupForbidden as exc:
            if gid in listed:
                # A group this admin lists but may not read: delegation or scopes. Also one outside
                # a `groups` scope, nested in a scoped group: counted as empty, its people would be
                # removed from the scoped group and from the tenant.
                raise _refused(exc.where, exc.message, "members.list") from None
            # A group nested from outside this directory (another organization's, which Google lets
            # a group hold): no one here can read it, and failing on it failed every run for good.
            log.warning(
                "%s%s: a nested group this admin may not read; counted as empty", tenant_prefix(self.tenant), exc.where
            )
            return _Direct(unreadable=True)
        return result

    # --- normalization ---------------------------------------------------------------------------

    def _user(self, raw: dict[str, Any], email_to_id: dict[str, str], domain_ids: set[str]) -> User:
        name = raw.get("name") or {}
        org = _pick(raw.get("organizations"), lambda o: o.get("primary") is True)
        ext = _pick(raw.get("externalIds"), lambda e: e.get("type") == "organization", fallback=False)
        manager = _manager(raw, email_to_id, domain_ids)
        primary = raw["primaryEmail"]
        emails = [primary]
        for e in raw.get("emails") or []:
            addr = e.get("address") if isinstance(e, dict) else None
            if isinstance(addr, str) and addr.lower() not in {x.lower() for x in emails}:
                emails.append(addr)
        return User(
            idp_id=raw["id"],
            username=primary,
            email=primary,
            emails=emails,
            first_name=name.get("givenName"),
            last_name=name.get("familyName"),
            display_name=name.get("displayName") or name.get("fullName"),
            state="inactive" if raw.get("suspended") or raw.get("archived") else "active",
            job_title=(org or {}).get("title") or None,
            department=(org or {}).get("department") or None,
            employee_number=(ext or {}).get("value") or None,
            manager_idp_id=manager if manager != raw["id"] else None,
            custom_attributes=map_attributes(raw, self.mapping),
            raw_attributes=without(raw, USER_VOLATILE),
        )

    def _group(self, raw: dict[str, Any], external: set[str]) -> Group:
        attrs = without(raw, GROUP_VOLATILE)
        if external:
            attrs["externalMembers"] = sorted(external)
        return Group(
            idp_id=raw["id"],
            name=raw.get("name") or None,
            description=raw.get("description") or None,
            email=raw.get("email") or None,
            raw_attributes=attrs,
        )


def _primary(item: Any) -> bool:
    return isinstance(item, dict) and item.get("primary") is True


def _pick(
    items: Any, pred: Callable[[dict[str, Any]], bool], *, fallback: bool = True
) -> dict[str, Any] | None:
    if not isinstance(items, list):
        return None
    dicts = [i for i in items if isinstance(i, dict)]
    for item in dicts:
        if pred(item):
            return item
    return dicts[0] if fallback and dicts else None


def _manager(raw: dict[str, Any], email_to_id: dict[str, str], domain_ids: set[str]) -> str | None:
    """The manager's user id: the `manager` relation holds an id or an address of this domain."""
    return _resolve_manager(_manager_value(raw), email_to_id, domain_ids)


def _manager_value(raw: dict[str, Any]) -> str | None:
    rel = _pick(raw.get("relations"), lambda r: r.get("type") == "manager", fallback=False)
    if rel and isinstance(rel.get("value"), str):
        return intern(rel["value"].strip())  # one string per manager, however many reports
    return None


def _resolve_manager(value: str | None, email_to_id: dict[str, str], domain_ids: set[str]) -> str | None:
    if value is None:
        return None
    return value if value in domain_ids else email_to_id.get(value.lower())


def _norm_ou(ou: str) -> str:
    ou = ou.strip().strip("/")
    return "/" + ou if ou else "/"


def _in_ous(path: Any, ous: list[str]) -> bool:
    """Under one of the org units (an org unit includes every org unit below it)."""
    p = _norm_ou(path) if isinstance(path, str) else "/"
    return any(ou == "/" or p == ou or p.startswith(ou + "/") for ou in ous)


def _group_keys(raw: dict[str, Any]) -> set[str]:
    keys = {str(raw.get("id", "")).lower(), str(raw.get("email", "")).lower()}
    # Both kinds of alias Google lists a group with: the admin's (`aliases`) and those it makes
    # itself (`nonEditableAliases`: the group's address in a domain alias, or on test-google-a.com).
    # Each is a groupKey of members.list and an address mail reaches the group by.
    for name in ("aliases", "nonEditableAliases"):
        aliases = raw.get(name)
        if isinstance(aliases, list):
            keys.update(str(a).lower() for a in aliases)
    keys.discard("")
    return keys


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _flatten(gid: str, direct: dict[str, _Direct]) -> tuple[set[str], bool, set[str]]:
    """(users, whole-domain?, external addresses) of a group and every group nested in it."""
    users: set[str] = set()
    external: set[str] = set()
    customer = False
    none = _Direct()
    for cur in nested_groups(gid, lambda g: direct.get(g, none).groups):
        d = direct.get(cur, none)
        users.update(d.users)
        external.update(d.external)
        customer = customer or d.customer
    return users, customer, external


def build(tenant: str, settings: Any, *, policy: RetryPolicy | None = None) -> GoogleWorkspaceConnector:
    return GoogleWorkspaceConnector(tenant, settings, policy=policy)
