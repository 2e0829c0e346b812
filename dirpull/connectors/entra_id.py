"""Entra ID through Microsoft Graph delta queries, on msgraph-sdk's request pipeline.

Transport: a `GraphServiceClient` over `GraphRequestAdapter` with `GraphClientFactory`'s middleware
(redirects, query-name decoding, user agent, telemetry), `base_url` = the tenant's Graph URL.
Every response is read as raw bytes (`send_primitive_async(req, "bytes", …)`) and parsed with
orjson (`jsoncodec.loads_any`): the SDK's typed models cost ~4 ms per user to deserialize, raw JSON
microseconds.
kiota's own RetryHandler is switched off (it honours Retry-After with no cap); retries follow the
shared `RetryPolicy` instead: 429/5xx and dropped connections, Retry-After honoured (fractional
seconds too), capped in attempts and in total wait, then the run fails and nothing is applied.

Auth: OAuth 2.0 client credentials against `{login_url}/{tenant_id}/oauth2/v2.0/token`, by our own
`AccessTokenProvider`: the token is cached until shortly before it expires, refreshed once on a
401, and handed only to the configured Graph origin (scheme, host and port). http:// is accepted
only when graph_url is given explicitly (the emulators), never for the cloud defaults.

Pull:
* first sync, `full=True`, or a rejected cursor → walk `/users/delta` and `/groups/delta` (with
  `members`) to their deltaLinks: a snapshot. Nested groups are flattened from the direct
  memberships seen in the walk.
* later syncs → call the two stored deltaLinks: a delta. `@removed` (reason `changed` = soft
  delete, or `deleted`) → removed; `accountEnabled=false` → inactive; a user listed without
  `manager@delta` has the manager read (`_read_managers`); `members@delta` chunks of one
  group are merged; any `@removed` on a member is a removal; devices, service principals and
  contacts are ignored. A group whose direct membership or nesting changed and that takes part in
  nesting (it has child groups, or is an ancestor of a changed group) is re-read transitively with
  `/groups/{id}/members` and sent as a complete group.
* `syncStateNotFound` (in any case, any status), any 400 or `410 Gone` on a deltaLink → a full
  walk, noted on the run (a 400 that does not speak of expiry: with Graph's answer, and a
  warning). Both deltaLinks
  are probed before anything is yielded, so a run never mixes delta pages with a snapshot.
* The groups round always starts first: its first page is in before the users round's first
  request goes out. A round's cut-off is its first request, so every user a groups page names
  was created before the users round's cut-off (the users round lists it, or an earlier run did),
  or after the groups round's (the next groups round names the membership again). The other
  order drops a membership for good when its user is created between the two cut-offs.

The cursor: both deltaLinks, the $select they were made with, and the group-nesting map
(group → child groups), which a delta alone cannot rebuild.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from sys import intern
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from dirpull.config import EntraTenant
from dirpull.connectors.base import (
    AuthError,
    ConfigurationError,
    ConnectorError,
    CountsRequests,
    Done,
    Page,
    Quarantined,
)
from dirpull.connectors.http import (
    RETRIABLE_STATUSES,
    PagingGuard,
    RetryPolicy,
    fail_if_unhealable,
    interruptible_async_sleep,
    interruptible_sleep,
    parse_retry_after,
    readable_body,
    redact_url,
    tenant_prefix,
    transport_reason,
    warn_plain_http,
)
from dirpull.connectors.mapping import map_attributes
from dirpull.connectors.nesting import flatten
from dirpull.connectors.source import Known, SourceDigests
from dirpull.jsoncodec import loads_any
from dirpull.model import Group, User

log = logging.getLogger(__name__)

CLOUDS: dict[str, tuple[str, str, str]] = {
    # cloud → (login host, Graph v1.0 URL, token scope)
    "global": ("https://login.microsoftonline.com", "https://graph.microsoft.com/v1.0",
               "https://graph.microsoft.com/.default"),
    "usgov": ("https://login.microsoftonline.us", "https://graph.microsoft.us/v1.0",
              "https://graph.microsoft.us/.default"),
    "china": ("https://login.chinacloudapi.cn", "https://microsoftgraph.chinacloudapi.cn/v1.0",
              "https://microsoftgraph.chinacloudapi.cn/.default"),
}  # fmt: skip

# What the normalizer reads, plus a few properties worth keeping in raw_attributes.
USER_SELECT = (
    "id", "displayName", "givenName", "surname", "mail", "otherMails", "userPrincipalName",
    "accountEnabled", "jobTitle", "department", "employeeId", "employeeType", "companyName",
    "officeLocation", "userType", "manager",
)  # fmt: skip
GROUP_SELECT = (
    "id", "displayName", "description", "mail", "mailEnabled", "securityEnabled", "groupTypes", "members",
)  # fmt: skip
USER_TYPE = "#microsoft.graph.user"
GROUP_TYPE = "#microsoft.graph.group"
PAGE_PAIRS = 5000  # about this many members per yielded page of member lists
MANAGER_READS = 8  # /users/{id}/manager requests in flight at once in a later round
EXPIRED_NOTE = "delta token expired: full resync"
# Where `_Session.get` finds the body of an error answer: kiota's APIError does not carry it, and
# one it cannot read as Graph's JSON (a proxy's or gateway's page) leaves no message at all.
_ERROR_BODY: contextvars.ContextVar[list[bytes] | None] = contextvars.ContextVar("entra_error_body", default=None)


def build(tenant: str, settings: EntraTenant, **kwargs: Any) -> EntraConnector:
    return EntraConnector(tenant, settings, **kwargs)


class _Resync(Exception):
    """The server rejected a deltaLink (syncStateNotFound, 410 Gone, a 400): start over.
    `expired`: Graph's answer says the token expired or asks for a resync."""

    def __init__(self, message: str, *, expired: bool) -> None:
        super().__init__(message)
        self.expired = expired


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class _ForeignRedirect(Exception):
    pass


def _redirect_refusal(url: str, status: int | None, location: str | None) -> str:
    answer = f"HTTP {status}" if status else "the answer"
    target = urljoin(url, location or "")
    where = "another host" if _origin(target) != _origin(url) else "another URL"
    return (
        f"{answer} from {redact_url(url)} redirects to {where} ({redact_url(target)}); not following it with "
        f"the tenant's credentials (if that is the right address, set login_url / graph_url to it)"
    )


def _refuse_foreign_redirect(request: httpx.Request, original: httpx.URL) -> None:
    """kiota's RedirectHandler hook, before it follows a redirect: one to another origin is refused.
    kiota drops the bearer token there, so the other host's 401 cost a new token and then read as
    Graph refusing the app's permissions at graph_url."""
    from kiota_http.middleware.options.redirect_handler_option import default_scrub_sensitive_headers

    if _origin(str(request.url)) != _origin(str(original)):
        raise _ForeignRedirect(_redirect_refusal(str(original), None, str(request.url)))
    default_scrub_sensitive_headers(request, original)


# --- normalization ------------------------------------------------------------------------------


def _raw(rec: dict[str, Any]) -> dict[str, Any]:
    # Annotations (@odata.*, @removed, manager@delta, members@delta) are transport, not attributes;
    # nulls are dropped because Graph omits never-set properties in some answers and not in others.
    return {k: v for k, v in rec.items() if "@" not in k and v is not None}


def normalize_user(rec: dict[str, Any], attributes: dict[str, str]) -> User:
    mail = rec.get("mail")
    emails: list[str] = []
    for address in [mail, *(rec.get("otherMails") or [])]:
        if isinstance(address, str) and address and address not in emails:
            emails.append(address)
    manager = None
    for ref in rec.get("manager@delta") or []:
        if isinstance(ref, dict) and "@removed" not in ref and ref.get("id"):
            manager = ref["id"]
    if manager == rec["id"]:  # their own manager: no manager, as on Google
        manager = None
    raw = _raw(rec)
    return User(
        idp_id=rec["id"],
        username=rec.get("userPrincipalName"),
        email=mail or None,
        emails=emails,
        first_name=rec.get("givenName"),
        last_name=rec.get("surname"),
        display_name=rec.get("displayName"),
        state="inactive" if rec.get("accountEnabled") is False else "active",
        job_title=rec.get("jobTitle"),
        department=rec.get("department"),
        employee_number=rec.get("employeeId"),
        manager_idp_id=manager,
        custom_attributes=map_attributes(raw, attributes),
        raw_attributes=raw,
    )


def _record_id(rec: Any) -> str | None:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return rid if isinstance(rid, str) and rid else None


# Graph may list one object several times in a round, on one page too (a replay, or a delete and a
# restore). A page's records are a sequence; a Page is not (the diff applies its removals after its
# records), so where an id comes more than once on a page, its last record is what the Page says.


def _last_per_id(records: list[Any]) -> list[Any]:
    """A page's records keeping only the last one of each id (records without an id stay)."""
    last: dict[str, int] = {}
    with_id = 0
    for i, rec in enumerate(records):
        rid = _record_id(rec)
        if rid is not None:
            last[rid] = i
            with_id += 1
    if len(last) == with_id:
        return records  # every id once: the usual page
    kept = []
    for i, rec in enumerate(records):
        rid = _record_id(rec)
        if rid is None or last[rid] == i:
            kept.append(rec)
    return kept


def _last_group_record_wins(records: list[Any], out: Page) -> None:
    """`out` made from a page's group records in order: a group whose last record on the page is a
    removal is removed, one whose last record is live is not. (Groups are read in order rather than
    deduplicated first: a group may come twice on a page with two chunks of members@delta.)"""
    if not out.removed_groups:
        return
    removed_last: dict[str, bool] = {}
    for rec in records:
        gid = _record_id(rec)
        if gid is not None:
            removed_last[gid] = "@removed" in rec
    out.groups = [g for g in out.groups if not removed_last.get(g.idp_id)]
    out.quarantined = [q for q in out.quarantined if q.idp_id is None or not removed_last.get(q.idp_id)]
    out.removed_groups = list(dict.fromkeys(g for g in out.removed_groups if removed_last.get(g)))


def _group_record(rec: Any, out: Page) -> tuple[str | None, bool]:
    """One groups-delta record into `out`, as a group, a removal or a quarantine: its id (None
    without one) and whether it is a group read now, whose members@delta the caller takes."""
    gid = rec.get("id") if isinstance(rec, dict) else None
    if not isinstance(gid, str) or not gid:
        out.quarantined.append(Quarantined("group", None, "group record without an id"))
        return None, False
    if "@removed" in rec:
        out.removed_groups.append(gid)
        return gid, False
    try:
        out.groups.append(normalize_group(rec))
    except (ValueError, TypeError) as exc:
        out.quarantined.append(Quarantined("group", gid, f"cannot normalize: {str(exc)[:200]}"))
        return gid, False
    return gid, True


def normalize_group(rec: dict[str, Any]) -> Group:
    return Group(
        idp_id=rec["id"],
        name=rec.get("displayName"),
        description=rec.get("description"),
        email=rec.get("mail") or None,
        raw_attributes=_raw(rec),
    )


# --- auth ---------------------------------------------------------------------------------------


class ClientCredentialsProvider:
    """kiota `AccessTokenProvider`: OAuth client credentials, cached, for one Graph origin only."""

    def __init__(self, session: _Session, token_url: str, client_id: str, secret: Any, scope: str,
                 graph_url: str) -> None:  # fmt: skip
        from kiota_abstractions.authentication import AllowedHostsValidator

        self._session = session
        self._token_url = token_url
        self._client_id = client_id
        self._secret = secret
        self._scope = scope
        self._origin = _origin(graph_url)
        self._validator = AllowedHostsValidator([urlsplit(graph_url).hostname or ""])
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"ClientCredentialsProvider(token_url={redact_url(self._token_url)!r})"

    def get_allowed_hosts_validator(self) -> Any:
        return self._validator

    def invalidate(self) -> None:
        self._token, self._expires = None, 0.0

    async def get_authorization_token(self, uri: str, additional_authentication_context: Any = None) -> str:
        if _origin(uri) != self._origin:
            return ""  # never hand the token to another host
        async with self._lock:
            if self._token is None or time.time() >= self._expires:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def _fetch(self) -> None:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret.get(),
            "scope": self._scope,
        }
        attempt = 0
        while True:
            attempt += 1
            resp = await self._session.send_raw("token", self._token_url, lambda c: c.post(self._token_url, data=form))
            if resp.status_code < 300:
                try:
                    resp.json()
                except ValueError:
                    # A 200 whose body broke off or was garbled on the way is an outage, as the
                    # same body on a Graph page is (`_Session.get`): tried again, and said as such.
                    # It failed the run at once as an answer "without an access_token".
                    what = f"token: malformed JSON from POST {redact_url(self._token_url)}"
                    await self._session._wait(attempt, None, what=what, step="token")
                    continue
            break
        if resp.status_code in (400, 401, 403):
            detail = _token_refusal(resp.status_code, resp.content)
            raise AuthError(f"token request to {redact_url(self._token_url)} refused: {detail}", step="token")
        if resp.status_code >= 400:
            raise ConnectorError(f"token request to {redact_url(self._token_url)}: HTTP {resp.status_code}",
                                 retriable=resp.status_code >= 500, step="token")  # fmt: skip
        if resp.is_redirect:
            # Not followed (httpx's default): the form holds the client secret. Said as such, not
            # as "answered without an access_token".
            raise ConnectorError(_redirect_refusal(self._token_url, resp.status_code, resp.headers.get("Location")),
                                 retriable=False, step="token")  # fmt: skip
        try:
            body = resp.json()
            token, lifetime = body["access_token"], float(body.get("expires_in", 3599))
        except (ValueError, KeyError, TypeError):
            raise ConnectorError("token endpoint answered without an access_token", step="token") from None
        self._token = token
        # Refresh a little before expiry: 5 minutes, or a tenth of a short lifetime.
        self._expires = time.time() + lifetime - min(300.0, lifetime / 10)


# --- one pull's HTTP session ----------------------------------------------------------------------


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS settings httpx would make for each client (certifi's CAs, or SSL_CERT_FILE /
    SSL_CERT_DIR), made once per process: reading the CA bundle takes ~20 ms, and every pull
    opens two clients. A context is safe to share between clients, threads and event loops."""
    return httpx.create_ssl_context()


@functools.cache
def _telemetry_handler_class() -> type:
    """The SDK's Graph telemetry handler with its Graph-host check answered from a set made once.
    The SDK's own check builds that set and re-parses the request's URL with urllib3 — a Python
    loop over every character — for each request, on the event-loop thread every page waits for:
    ~0.2 ms a request on delta links of a few hundred characters (Graph's real ones are longer).
    The headers it adds, and to which hosts, are the SDK's (tests/test_entra_id_connector.py checks both)."""
    from msgraph_core import NationalClouds
    from msgraph_core.middleware import GraphTelemetryHandler

    endpoints = frozenset(cloud.value for cloud in NationalClouds)

    class GraphOnlyTelemetryHandler(GraphTelemetryHandler):  # type: ignore[misc]
        def is_graph_url(self, url: httpx.URL) -> bool:
            return f"{url.scheme}://{url.netloc.decode('ascii')}" in endpoints

    return GraphOnlyTelemetryHandler


async def _keep_error_body(response: httpx.Response) -> None:
    """httpx response hook: the opening of an error answer's body, for `_Session.get`'s message."""
    holder = _ERROR_BODY.get()
    if holder is not None and response.status_code >= 400:
        await response.aread()
        holder.append(response.content[:4096])


def _error_detail(code: str, message: str, said: list[bytes]) -> str:
    """What an error answer says: Graph's code and message, else the opening of the page that
    answered in Graph's place; never nothing (the message ended on a colon)."""
    detail = f"{code} {message}".strip()
    if detail:
        return detail
    body = readable_body(said[-1], 200) if said else ""
    return f"not Graph's error format: {body}" if body else "no reason given"


class _ResponseDeadline(httpx.AsyncByteStream):
    """A response body that must have arrived by `deadline` (the event loop's clock)."""

    def __init__(self, stream: httpx.AsyncByteStream, deadline: float, seconds: float) -> None:
        self._stream = stream
        self._deadline = deadline
        self._seconds = seconds

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._stream.__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(self._deadline):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise httpx.ReadTimeout(f"timed out: no whole answer within {self._seconds:g}s") from None
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class _DeadlineTransport(httpx.AsyncBaseTransport):
    """httpx's timeouts bound each read: a server trickling a byte now and then, or a chunked body
    that never ends, held the run for good. `timeout` is documented as the seconds for one HTTP
    response, so the whole answer, body included, must arrive within it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadline = asyncio.get_running_loop().time() + self._seconds
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._inner.handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout(f"timed out: no answer within {self._seconds:g}s", request=request) from None
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ResponseDeadline(response.stream, deadline, self._seconds)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Session:
    """The SDK client, the token provider and the request counter of one pull (one event loop)."""

    def __init__(self, settings: EntraTenant, policy: RetryPolicy, login_url: str, graph_url: str,
                 scope: str, tenant: str = "") -> None:  # fmt: skip
        from kiota_abstractions.authentication import BaseBearerTokenAuthenticationProvider
        from kiota_http.middleware import ParametersNameDecodingHandler, RedirectHandler, UserAgentHandler
        from kiota_http.middleware.options import RedirectHandlerOption
        from msgraph import GraphRequestAdapter, GraphServiceClient
        from msgraph.graph_request_adapter import options as graph_default_options
        from msgraph_core import GraphClientFactory
        from msgraph_core.middleware.options import GraphTelemetryHandlerOption

        self.policy = policy
        self.tenant = tenant
        self.graph_url = graph_url.rstrip("/")
        self.origin = _origin(self.graph_url)
        self.requests = 0
        timeout = httpx.Timeout(settings.timeout, connect=min(10.0, settings.timeout))
        tls = _tls_context()
        token_transport = _DeadlineTransport(httpx.AsyncHTTPTransport(verify=tls), settings.timeout)
        # the token endpoint (another host)
        self._plain = httpx.AsyncClient(timeout=timeout, verify=tls, transport=token_transport)
        # The default pipeline less what this connector does not use: kiota's RetryHandler (it
        # sleeps for any Retry-After, uncapped: retries are ours), UrlReplaceHandler (/me paths)
        # and the two inspection handlers (hooks for callers that read raw headers and bodies).
        # They cost ~0.25 ms per request on the event-loop thread, which every page waits for.
        telemetry = _telemetry_handler_class()(options=graph_default_options[GraphTelemetryHandlerOption.get_key()])
        redirects = RedirectHandlerOption(scrub_sensitive_headers=_refuse_foreign_redirect)
        middleware = [RedirectHandler(redirects), ParametersNameDecodingHandler(), UserAgentHandler(), telemetry]
        # Our own transport, closed by `close()`: the factory wraps the client's in msgraph's
        # AsyncGraphTransport, whose aclose() does nothing, so closing the client left the Graph
        # connection open after every run, given back only by a cyclic garbage collection.
        self._transport = _DeadlineTransport(httpx.AsyncHTTPTransport(verify=tls), settings.timeout)
        self._http = GraphClientFactory.create_with_custom_middleware(
            middleware,
            client=httpx.AsyncClient(timeout=timeout, verify=tls, transport=self._transport,
                                     event_hooks={"response": [_keep_error_body]}),
        )  # fmt: skip
        token_url = f"{login_url.rstrip('/')}/{settings.tenant_id}/oauth2/v2.0/token"
        self.auth = ClientCredentialsProvider(self, token_url, settings.client_id, settings.client_secret,
                                              scope, self.graph_url)  # fmt: skip
        adapter = GraphRequestAdapter(BaseBearerTokenAuthenticationProvider(self.auth), client=self._http)
        adapter.base_url = self.graph_url
        self.client = GraphServiceClient(request_adapter=adapter)

    async def close(self) -> None:
        await self._http.aclose()
        await self._transport.aclose()
        await self._plain.aclose()

    async def _wait(self, attempt: int, hint: float | None, *, what: str, step: str) -> None:
        """The retry policy's wait, without stopping the event loop: up to MANAGER_READS requests
        (and a walk's next page) are in flight at once, and Graph throttles them together. A
        blocking sleep made each throttled one wait in turn (eight 429s with Retry-After 10: 80 s),
        and held every other request meanwhile."""
        delay = self.policy.begin_wait(attempt, hint, what=what, step=step)
        # An outage or throttling shows in the daemon's log as it happens, as with the other
        # connectors (http.py), not only in the error of a run that finally gives up.
        log.warning("%s%s; retrying in %.1fs (attempt %d of %d)", tenant_prefix(self.tenant), what, delay, attempt + 1,
                    self.policy.max_attempts)  # fmt: skip
        try:
            if self.policy.sleep is interruptible_sleep:
                await interruptible_async_sleep(delay)
            else:  # a caller's own sleep (tests)
                await asyncio.to_thread(self.policy.sleep, delay)
        finally:
            self.policy.end_wait()

    async def send_raw(self, step: str, url: str, call: Any) -> httpx.Response:
        """A plain httpx POST to `url` (the token endpoint) under the retry policy."""
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            try:
                resp = await call(self._plain)
            except httpx.TransportError as exc:
                detail = f"{transport_reason(exc)} on POST {redact_url(url)}"
                fail_if_unhealable(exc, step, detail, step)
                await self._wait(attempt, None, what=f"{step}: {detail}", step=step)
                continue
            if resp.status_code in RETRIABLE_STATUSES:
                hint = parse_retry_after(resp.headers.get("Retry-After"))
                await self._wait(attempt, hint, what=f"{step}: HTTP {resp.status_code} on POST {redact_url(url)}",
                                 step=step)  # fmt: skip
                continue
            return resp

    def check_link(self, url: str) -> None:
        if _origin(url) != self.origin:
            raise ConnectorError(f"Graph sent a link to another host ({redact_url(url)}); not following it")

    async def get(self, request_info: Any, *, step: str, delta: bool = False) -> dict[str, Any]:
        """One Graph GET through the SDK pipeline, answered as parsed JSON."""
        from kiota_abstractions.api_error import APIError
        from msgraph.generated.models.o_data_errors.o_data_error import ODataError

        # Links the server sent were checked by link(); builder requests get base_url at send time
        # (their URL is a path until then: messages name the host too).
        url = str(request_info.url)
        if "://" not in url:
            url = self.graph_url + url
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            self.requests += 1
            said: list[bytes] = []
            _ERROR_BODY.set(said)
            try:
                body = await self.client.request_adapter.send_primitive_async(
                    request_info, "bytes", {"XXX": ODataError}
                )
                page = loads_any(body or b"{}")  # orjson; the standard library for what it refuses
                if not isinstance(page, dict):
                    raise ValueError("not a JSON object")
                return page
            except APIError as exc:
                status = exc.response_status_code or 0
                headers = exc.response_headers or {}
                err = getattr(exc, "error", None)
                code = getattr(err, "code", None) or ""
                message = getattr(err, "message", None) or ""
                what = f"{step}: HTTP {status} on GET {redact_url(url)}"
                if delta and _refused_delta_link(status, code):
                    detail = f"{what}: {code or 'Gone'} {message[:200]}".strip()
                    raise _Resync(detail, expired=_says_expired(status, code, message)) from None
                if status == 401 and not refreshed:
                    self.auth.invalidate()  # expired or revoked early: one fresh token, then give up
                    refreshed = True
                    continue
                if status in (401, 403):
                    raise AuthError(f"{what}: {_error_detail(code, message, said)}", step=step) from None
                if status in RETRIABLE_STATUSES:
                    hint = parse_retry_after(_header(headers, "Retry-After"))
                    await self._wait(attempt, hint, what=what, step=step)
                    continue
                raise ConnectorError(f"{what}: {_error_detail(code, message, said)}", retriable=status >= 500,
                                     status=status, step=step) from None  # fmt: skip
            except _ForeignRedirect as exc:
                raise ConnectorError(f"{step}: {exc}", retriable=False, step=step) from None
            except httpx.TransportError as exc:
                detail = f"{transport_reason(exc)} on GET {redact_url(url)}"
                fail_if_unhealable(exc, step, detail, step)
                await self._wait(attempt, None, what=f"{step}: {detail}", step=step)
            except ValueError:  # a truncated or malformed body
                await self._wait(attempt, None, what=f"{step}: malformed JSON from {redact_url(url)}", step=step)

    # Request builders of the SDK: the first request of a walk and links the server sent.
    def users_delta(self, select: list[str]) -> Any:
        from kiota_abstractions.base_request_configuration import RequestConfiguration
        from msgraph.generated.users.delta.delta_request_builder import DeltaRequestBuilder

        qp = DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(select=select)
        return self.client.users.delta.to_get_request_information(RequestConfiguration(query_parameters=qp))

    def groups_delta(self, select: list[str]) -> Any:
        from kiota_abstractions.base_request_configuration import RequestConfiguration
        from msgraph.generated.groups.delta.delta_request_builder import DeltaRequestBuilder

        qp = DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(select=select)
        return self.client.groups.delta.to_get_request_information(RequestConfiguration(query_parameters=qp))

    def group_members(self, group_id: str) -> Any:
        from kiota_abstractions.base_request_configuration import RequestConfiguration
        from msgraph.generated.groups.item.members.members_request_builder import MembersRequestBuilder

        qp = MembersRequestBuilder.MembersRequestBuilderGetQueryParameters(select=["id"], top=999)
        builder = self.client.groups.by_group_id(group_id).members
        return builder.to_get_request_information(RequestConfiguration(query_parameters=qp))

    def user_manager(self, user_id: str) -> Any:
        from kiota_abstractions.base_request_configuration import RequestConfiguration
        from msgraph.generated.users.item.manager.manager_request_builder import ManagerRequestBuilder

        qp = ManagerRequestBuilder.ManagerRequestBuilderGetQueryParameters(select=["id"])
        builder = self.client.users.by_user_id(user_id).manager
        return builder.to_get_request_information(RequestConfiguration(query_parameters=qp))

    def link(self, url: str) -> Any:
        self.check_link(url)
        return self.client.users.delta.with_url(url).to_get_request_information()


_WALK_DONE = object()


def _check_records(page: dict[str, Any], step: str) -> None:
    """Fails the step on a page whose `value` is not a list: Graph always sends one, `[]` when the
    page has no records. Read as `[]`, a page the proxy or gateway in between garbled (an empty
    body, another document) went unnoticed, and a full walk missing its records deleted them."""
    if not isinstance(page.get("value"), list):
        if not page:
            what = "an empty answer"
        else:
            value = page.get("value")
            kind = "no `value`" if value is None else f"a `value` that is a {type(value).__name__}"
            what = f"a page with {kind} (keys: {', '.join(sorted(page)[:5])})"
        raise ConnectorError(
            f"{step}: Graph sent {what}, not a list of records; is a proxy or gateway answering in Graph's place?",
            step=step,
        )


async def _side_by_side(*walks: AsyncIterator[Page]) -> AsyncIterator[Page]:
    """The pages of several walks as they come, each walk in its own task, a few pages buffered.
    The first error of any walk is raised here; the others are cancelled."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)

    async def run(walk: AsyncIterator[Page]) -> None:
        try:
            async with contextlib.aclosing(walk) as pages:  # type: ignore[type-var]
                async for page in pages:
                    await queue.put(page)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(exc)
            return
        await queue.put(_WALK_DONE)

    tasks = [asyncio.ensure_future(run(w)) for w in walks]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _WALK_DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _token_refusal(status: int, content: bytes) -> str:
    """What a token endpoint's 400/401/403 says: `error: first line of error_description`, the
    `error` alone when there is no description (it names the credential to check:
    invalid_client, unauthorized_client), else the opening of whatever page answered (a gateway's),
    credentials masked. The last two were dropped for a bare "HTTP 401"."""
    try:
        body = loads_any(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip():
        lines = str(body.get("error_description") or "").strip().splitlines()
        return readable_body(f"{body['error']}: {lines[0]}" if lines else body["error"], 500)
    said = readable_body(content, 200)
    return f"HTTP {status}: {said}" if said else f"HTTP {status}, no reason given"


def _refused_delta_link(status: int, code: str) -> bool:
    """Whether a stored deltaLink was answered "start over". Graph's wording of an expired token is
    not settled (syncStateNotFound in the overview, BadRequest in the dev blog, SyncStateNotFound
    seen in the wild, "40X"), so any 400 counts too: a deltaLink is refused with 400 only for its
    token, and anything else wrong would fail the full walk with its own error."""
    return status in (400, 410) or code.lower() in ("syncstatenotfound", "resyncrequired")


def _says_expired(status: int, code: str, message: str) -> bool:
    """Whether a refused deltaLink's answer names expiry or a resync (syncStateNotFound, the dev
    blog's "The sync state generation is not found. The delta token is expired…", 410 Gone)."""
    text = message.lower()
    return (status == 410 or code.lower() in ("syncstatenotfound", "resyncrequired")
            or "sync state" in text or "expired" in text)  # fmt: skip


def _header(headers: Any, name: str) -> str | None:
    if hasattr(headers, "get"):
        value = headers.get(name)
        if value is None:
            value = headers.get(name.lower())
        return value
    return None


# --- the connector --------------------------------------------------------------------------------


class EntraConnector(CountsRequests):
    provider = "entra_id"
    source_digests = True  # a full pull takes `known=` (connectors.source)
    # Deleting a user takes the manager link off their reports, but users/delta is not known to
    # list those reports (directory-apis.md says nothing of it): the runner clears that manager
    # from the stored reports when a delta deletes them (connectors.base.Connector).
    deleted_manager_leaves_reports = True

    def __init__(self, tenant: str, settings: EntraTenant, *, policy: RetryPolicy | None = None) -> None:
        self.tenant = tenant
        self.settings = settings
        self._policy = policy
        login, graph, scope = CLOUDS[settings.cloud]
        self.login_url = (settings.login_url or login).rstrip("/")
        self.graph_url = (settings.graph_url or graph).rstrip("/")
        self.scope = scope
        for name, url, explicit in (("login_url", self.login_url, settings.login_url),
                                    ("graph_url", self.graph_url, settings.graph_url)):  # fmt: skip
            parts = urlsplit(url)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ConfigurationError(f"{name} must be an http(s) URL, got {redact_url(url)}")
            if parts.scheme == "http" and not explicit:
                raise ConfigurationError(f"{name} must use https")
            warn_plain_http(tenant, name, url)

    def __repr__(self) -> str:
        return f"EntraConnector(tenant={self.tenant!r}, graph_url={self.graph_url!r})"

    def user_select(self) -> list[str]:
        select = list(USER_SELECT)
        extra = list(self.settings.extension_attributes)
        # The root property of every mapped attribute path must be selected too.
        extra += [path.split(".")[0].split("[")[0] for path in self.settings.attributes.values()]
        for name in extra:
            if name and name not in select:
                select.append(name)
        return select

    def _new_policy(self) -> RetryPolicy:
        if self._policy is not None:
            self._policy.waited = 0.0
            return self._policy
        return RetryPolicy.of(self.settings)

    # The runner calls pull() from worker threads: each pull runs its own event loop, and the SDK
    # client (tied to the loop that created it) lives and dies inside it.
    def pull(
        self, cursor: dict[str, Any] | None, *, full: bool, known: Known | None = None
    ) -> Iterator[Page | Done]:
        loop = asyncio.new_event_loop()
        agen = self._pull(cursor, full, known)
        try:
            while True:
                try:
                    item = loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            try:
                loop.run_until_complete(agen.aclose())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _pull(
        self, cursor: dict[str, Any] | None, full: bool, known: Known | None = None
    ) -> AsyncIterator[Page | Done]:
        self._new_pull()
        session = _Session(self.settings, self._new_policy(), self.login_url, self.graph_url, self.scope, self.tenant)
        self._counting(lambda: session.requests)
        try:
            notes: list[str] = []
            select = self.user_select()
            if not full and cursor and cursor.get("users") and cursor.get("groups"):
                reason = self._cursor_problem(cursor, select)
                if reason:
                    notes.append(reason)
                else:
                    try:
                        # Probe both links before yielding anything: a run is a delta or a snapshot.
                        # Groups first: its cut-off must come before the users round's (module doc).
                        first_groups = await session.get(session.link(cursor["groups"]), step="groups delta",
                                                         delta=True)  # fmt: skip
                        first_users = await session.get(session.link(cursor["users"]), step="users delta",
                                                        delta=True)  # fmt: skip
                    except _Resync as exc:
                        if exc.expired:
                            log.info("tenant %s: %s", self.tenant, exc)
                            notes.append(EXPIRED_NOTE)
                        else:
                            # A 400 that does not speak of expiry is taken as one (Graph's wording
                            # is not settled), but it may be something that refuses every deltaLink:
                            # then every run is a full walk, and only this says so.
                            log.warning("tenant %s: Graph refused the stored deltaLink, not as an expired "
                                        "token (%s): full resync", self.tenant, exc)  # fmt: skip
                            notes.append(f"deltaLink refused, not as an expired token ({exc}): full resync")
                    else:
                        # Closed here, not by the garbage collector: before the session closes.
                        incremental = self._incremental(session, cursor, first_users, first_groups)
                        async with contextlib.aclosing(incremental) as items:
                            async for item in items:
                                yield item
                        return
            sources = SourceDigests(known, self.settings, [__name__]) if known else None
            async with contextlib.aclosing(self._full(session, select, notes, sources)) as items:
                async for item in items:
                    yield item
        except ConnectorError as exc:
            exc.requests = session.requests
            raise
        finally:
            await session.close()

    def _cursor_problem(self, cursor: dict[str, Any], select: list[str]) -> str | None:
        if cursor.get("select") != select:
            return "attribute selection changed: full resync"
        origin = _origin(self.graph_url)
        if _origin(str(cursor["users"])) != origin or _origin(str(cursor["groups"])) != origin:
            return "graph_url changed: full resync"
        return None

    async def _walk(self, session: _Session, first: dict[str, Any] | Any, step: str,
                    links: dict[str, str]) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """Pages of one delta round; the round's deltaLink is left in links[step]."""
        page = first if isinstance(first, dict) else await session.get(first, step=step)
        # Graph's delta may say "more" with a new link every time, on empty pages: only a page cap
        # ends that, as the other connectors' listings have.
        guard = PagingGuard(step, cursor="page link")
        while True:
            _check_records(page, step)
            next_link = page.get("@odata.nextLink")
            delta_link = page.get("@odata.deltaLink")
            if delta_link and not next_link:
                yield page
                links[step] = delta_link
                return
            if not next_link:
                raise ConnectorError(f"{step}: a page with neither @odata.nextLink nor @odata.deltaLink")
            guard.next(next_link)
            # Ask for page N+1 before handing page N on: Graph renders it while this page is
            # normalized (in a worker thread, so this loop goes on sending the request meanwhile)
            # and diffed. Without both, the pull waited for every page: +50% on a 100k-user walk.
            ahead = asyncio.ensure_future(session.get(session.link(next_link), step=step))
            try:
                await asyncio.sleep(0)  # in the try: the run may be cancelled here too
                yield page
                page = await ahead
            finally:
                # A walk left early (the other walk failed, the run stopped): its request is
                # cancelled and waited for while the session is open. Left running, it met the
                # transport closed under it, logged a retry and died as an unretrieved task.
                if not ahead.done():
                    ahead.cancel()
                    await asyncio.wait([ahead])
                if not ahead.cancelled():
                    ahead.exception()  # retrieved; when it matters it was raised by `await ahead`

    def _user_page(self, page: dict[str, Any], sources: SourceDigests | None = None) -> Page:
        out = Page()
        attributes = self.settings.attributes
        for rec in _last_per_id(page.get("value") or []):
            rid = rec.get("id") if isinstance(rec, dict) else None
            if not isinstance(rid, str) or not rid:
                out.quarantined.append(Quarantined("user", None, "user record without an id"))
                continue
            if "@removed" in rec:
                out.removed_users.append(rid)  # soft (changed) or hard (deleted): gone for dirpull
                continue
            digest = sources.digest(rec) if sources is not None else None
            if digest is not None and sources is not None and sources.unchanged(rid, digest):
                out.unchanged_users.append(rid)
                continue
            try:
                out.users.append(normalize_user(rec, attributes))
            except (ValueError, TypeError) as exc:
                out.quarantined.append(Quarantined("user", rid, f"cannot normalize: {str(exc)[:200]}"))
                continue
            if digest is not None:
                out.user_sources[rid] = digest
        return out

    @staticmethod
    def _full_group_page(page: dict[str, Any], direct: dict[str, set[str]], children: dict[str, set[str]],
                         gone: set[str]) -> Page:  # fmt: skip
        """A walk's page of groups: the groups, and their members gathered into `direct` and
        `children` (handed over once the walk is done, a list per group: `_full`); `gone`: the
        groups whose latest record in the walk is a removal."""
        out = Page()
        records = page.get("value") or []
        for rec in records:
            gid, live = _group_record(rec, out)
            if gid is not None and "@removed" in rec:
                # Members gathered so far are kept: a replayed removal may come between two chunks
                # of a group's members, its live record after it (a group gone for good is left
                # out at the end).
                gone.add(gid)
            elif gid is not None:
                gone.discard(gid)
            if gid is None or not live:
                continue
            users = direct.setdefault(gid, set())
            refs = rec.get("members@delta") or []
            # A walk's members are users being added, nearly all: those in one pass at C speed (a
            # full walk names ~500,000 at 100,000 users), one string per user however many groups
            # list them.
            added = [ref.get("id") for ref in refs if ref.get("@odata.type") == USER_TYPE and "@removed" not in ref]
            if len(added) == len(refs):
                users.update(map(intern, filter(None, added)))
                continue
            for ref in refs:  # in order: a removal or a group among them
                kind, mid = ref.get("@odata.type"), ref.get("id")
                if not mid:
                    continue
                removed = "@removed" in ref
                if kind == USER_TYPE:
                    if removed:
                        users.discard(mid)
                    else:
                        users.add(intern(mid))
                elif kind == GROUP_TYPE:
                    kids = children.setdefault(gid, set())
                    (kids.discard if removed else kids.add)(mid)
        _last_group_record_wins(records, out)
        return out

    async def _full(
        self, session: _Session, select: list[str], notes: list[str], sources: SourceDigests | None = None
    ) -> AsyncIterator[Page | Done]:
        links: dict[str, str] = {}
        direct: dict[str, set[str]] = {}
        children: dict[str, set[str]] = {}
        gone: set[str] = set()  # groups whose latest record in the walk is a removal

        # The groups round's first page before the users round's first request: the groups
        # round's cut-off comes first (module doc). One page's wait; then the walks overlap.
        first_groups = await session.get(session.groups_delta(list(GROUP_SELECT)), step="groups delta")

        # Each async generator below is closed by its reader (aclosing), not whenever the garbage
        # collector gets to it: its finally (a walk's request in flight) runs before the session closes.
        async def users() -> AsyncIterator[Page]:
            walk = self._walk(session, session.users_delta(select), "users delta", links)
            async with contextlib.aclosing(walk) as pages:
                async for page in pages:
                    yield await asyncio.to_thread(self._user_page, page, sources)

        async def groups() -> AsyncIterator[Page]:
            async with contextlib.aclosing(self._walk(session, first_groups, "groups delta", links)) as pages:
                async for page in pages:
                    yield await asyncio.to_thread(self._full_group_page, page, direct, children, gone)

        # Within a round Graph hands out one page at a time (each names the next), so a round is a
        # chain of round trips; the users and groups rounds walk side by side. (A snapshot's
        # memberships are matched to users only at the end, so the order of pages is free.)
        async with contextlib.aclosing(_side_by_side(groups(), users())) as items:
            async for item in items:
                yield item

        # Each group's members, once the walk has seen them all (a group's members may come over
        # several pages, a subgroup's before or after it): a user in a group below G is a member of G.
        for gid in gone:
            direct.pop(gid, None)
            children.pop(gid, None)
        lists: list[tuple[str, list[str]]] = []
        listed = 0
        for gid, users in direct.items():
            members = flatten(gid, direct, children) if children.get(gid) else users
            lists.append((gid, list(members)))
            listed += len(members)
            if listed >= PAGE_PAIRS:
                yield Page(member_lists=lists)
                lists, listed = [], 0
        if lists:
            yield Page(member_lists=lists)
        nesting = {g: sorted(k) for g, k in children.items() if k}
        cursor = {"users": links["users delta"], "groups": links["groups delta"], "select": select,
                  "nesting": nesting}  # fmt: skip
        yield Done(snapshot=True, cursor=cursor, mode="full", requests=session.requests, notes=notes)

    async def _incremental(self, session: _Session, cursor: dict[str, Any], first_users: dict[str, Any],
                           first_groups: dict[str, Any]) -> AsyncIterator[Page | Done]:  # fmt: skip
        links: dict[str, str] = {}
        async with contextlib.aclosing(self._walk(session, first_users, "users delta", links)) as pages:
            async for page in pages:
                out = await asyncio.to_thread(self._user_page, page)
                await self._read_managers(session, page, out)
                yield out

        old_nesting = {g: set(k) for g, k in (cursor.get("nesting") or {}).items()}
        nesting = {g: set(k) for g, k in old_nesting.items()}
        # group → member id → (kind, added); later entries win (chunks and replays merge here).
        changes: dict[str, dict[str, tuple[str, bool]]] = {}
        removed_groups: set[str] = set()
        async with contextlib.aclosing(self._walk(session, first_groups, "groups delta", links)) as pages:
            async for page in pages:
                out = Page()
                records = page.get("value") or []
                for rec in records:
                    gid, live = _group_record(rec, out)
                    if gid is None:
                        continue
                    if "@removed" in rec:
                        # The member changes gathered so far stay: a replayed removal may come between
                        # two chunks of a group's members@delta, its live record after it. (Those of a
                        # group gone for good name a deleted group: nothing is applied for them.)
                        removed_groups.add(gid)
                        continue
                    removed_groups.discard(gid)
                    if not live:
                        continue
                    for ref in rec.get("members@delta") or []:
                        kind, mid = ref.get("@odata.type"), ref.get("id")
                        if mid and kind in (USER_TYPE, GROUP_TYPE):
                            changes.setdefault(gid, {})[mid] = (kind, "@removed" not in ref)
                _last_group_record_wins(records, out)
                if out.groups or out.removed_groups or out.quarantined:
                    yield out

        for gid, delta in changes.items():
            for mid, (kind, added) in delta.items():
                if kind == GROUP_TYPE:
                    kids = nesting.setdefault(gid, set())
                    (kids.add if added else kids.discard)(mid)
        for gid in removed_groups:
            nesting.pop(gid, None)
            for kids in nesting.values():
                kids.discard(gid)

        # Which groups need a full transitive re-read: those with children whose membership
        # changed, and every ancestor (before or after this round) of a group that changed.
        parents: dict[str, set[str]] = {}
        for tree in (old_nesting, nesting):
            for g, kids in tree.items():
                for k in kids:
                    parents.setdefault(k, set()).add(g)
        reread: set[str] = set()
        for gid in changes:
            if old_nesting.get(gid) or nesting.get(gid):
                reread.add(gid)
            stack = list(parents.get(gid, ()))
            while stack:
                p = stack.pop()
                if p not in reread:
                    reread.add(p)
                    stack.extend(parents.get(p, ()))
        for gid in removed_groups:  # a deleted group's ancestors lose its members
            stack = list(parents.get(gid, ()))
            while stack:
                p = stack.pop()
                if p not in reread:
                    reread.add(p)
                    stack.extend(parents.get(p, ()))
        reread -= removed_groups

        out = Page()
        for gid, delta in changes.items():
            if gid in reread:
                continue
            for mid, (kind, added) in delta.items():
                if kind == USER_TYPE:
                    (out.members if added else out.removed_members).append((gid, mid))
        if out.members or out.removed_members:
            yield out

        direct: dict[str, set[str]] = {}
        kids_read: dict[str, set[str]] = {}
        for gid in sorted(reread):
            await self._read_tree(session, gid, direct, kids_read)
            members = sorted(flatten(gid, direct, kids_read))
            for i in range(0, max(1, len(members)), PAGE_PAIRS):
                chunk = [(gid, uid) for uid in members[i : i + PAGE_PAIRS]]
                yield Page(members=chunk, complete_groups=[gid] if i == 0 else [])
        # The nesting kept is what each stored member set was flattened from. A re-read group was
        # just replaced with what was read, so its children are what was read; a group read only
        # as a subgroup of one keeps its stored members, so its nesting stays as the deltas have it
        # (a child it lost since the cut-off comes in the next round, which re-reads it then).
        for gid in reread:
            nesting[gid] = set(kids_read.get(gid, ()))

        new_cursor = {
            "users": links["users delta"],
            "groups": links["groups delta"],
            "select": cursor.get("select"),
            "nesting": {g: sorted(k) for g, k in nesting.items() if k},
        }
        yield Done(snapshot=False, cursor=new_cursor, mode="incremental", requests=session.requests)

    async def _read_managers(self, session: _Session, page: dict[str, Any], out: Page) -> None:
        """The manager of each user a later round lists without `manager@delta`. Whether Graph
        repeats an unchanged manager there is not settled (users report it names the manager only
        when it changed), so an absent one is no proof of "no manager": it is read, which also
        covers a Graph that does repeat it (then only users without a manager are read)."""
        unnamed = {
            rid
            for rec in _last_per_id(page.get("value") or [])
            if isinstance(rec, dict) and "@removed" not in rec and "manager@delta" not in rec
            and (rid := _record_id(rec)) is not None
        }  # fmt: skip
        users = [u for u in out.users if u.idp_id in unnamed]
        if not users:
            return
        limit = asyncio.Semaphore(MANAGER_READS)

        async def read(user: User) -> None:
            async with limit:
                try:
                    found = await session.get(session.user_manager(user.idp_id), step="user manager")
                except ConnectorError as exc:
                    if exc.status != 404:  # 404: no manager (or the user is gone since the delta)
                        raise
                    found = {}
            manager = found.get("id")
            own = manager == user.idp_id  # no manager, as in a user's listing naming them
            user.manager_idp_id = manager if isinstance(manager, str) and manager and not own else None

        # The first failure fails the run at once: the other reads are cancelled (their retry waits
        # with them) and waited for. Run to their ends, the run waited out another read's back-off
        # (a Retry-After, up to max_retry_wait) before it could say it failed, still calling Graph.
        tasks = [asyncio.ensure_future(read(u)) for u in users]
        try:
            for finished in asyncio.as_completed(tasks):
                await finished
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_tree(self, session: _Session, root: str, direct: dict[str, set[str]],
                         kids: dict[str, set[str]]) -> None:  # fmt: skip
        """Direct members of `root` and of every group below it, via /groups/{id}/members."""
        stack = [root]
        while stack:
            gid = stack.pop()
            if gid in direct:
                continue
            users: set[str] = set()
            groups: set[str] = set()
            direct[gid], kids[gid] = users, groups
            try:
                page = await session.get(session.group_members(gid), step="group members")
            except ConnectorError as exc:
                if exc.status == 404:
                    continue  # deleted since the delta: no members
                raise
            guard = PagingGuard("group members", cursor="page link")
            while True:
                _check_records(page, "group members")
                for ref in page.get("value") or []:
                    kind, mid = ref.get("@odata.type"), ref.get("id")
                    if kind == USER_TYPE and mid:
                        users.add(mid)
                    elif kind == GROUP_TYPE and mid:
                        groups.add(mid)
                        stack.append(mid)
                nxt = page.get("@odata.nextLink")
                if not nxt:
                    break
                guard.next(nxt)
                page = await session.get(session.link(nxt), step="group members")
