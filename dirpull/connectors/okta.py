"""Okta connector on the official `okta` SDK (3.4.x, asyncio/aiohttp).

One pull = one event loop (`asyncio.Runner`, so the runner may call `pull()` from any worker
thread) and one aiohttp session for every request of the run.

Full pull (snapshot): users through `filter=lastUpdated gt "1970-01-01T00:00:00.000Z"` (one pass that
includes DEPROVISIONED, which the plain list hides — see docs/providers/okta.md for why not two
passes), groups (OKTA_GROUP, APP_GROUP; `Everyone` only with `include_everyone`), then each group's
members. Incremental pull (delta): `filter=lastUpdated gt "<cursor>"` for users, `lastUpdated` or
`lastMembershipUpdated` for groups (a group whose members changed is re-listed completely and
named in `complete_groups`), plus, with `poll_system_log`, the System Log for deletions.

Every request goes through the SDK's own pipeline: its `ApiClient.param_serialize` builds the URL
and headers exactly as its `list_users` / `list_groups` / `list_group_users` / `list_log_events`
would, its `RequestExecutor` adds auth (SSWS, or OAuth private_key_jwt tokens, DPoP-bound with `dpop`) and sends
it through `_Transport`, our subclass of its `HTTPClient`. What is skipped is the SDK's
`okta.client.Client` (importing it loads ~1,700 modules: two seconds) and its response
deserialization (pydantic models for every record, ~100 µs per user, and the body parsed three
times): the page's body is parsed once here.

The SDK's sharp edges (../shared/sdk-notes.md §2) and what this module does about them:
* it reads ./okta.yaml, ~/.okta/okta.yaml and OKTA_CLIENT_* → `_sdk_config()` builds the SDK's
  configuration from our own settings only, and passes the "allow http" testing flag in that dict
  only for a loopback host: nothing process-global is touched, so one tenant can never lift the
  https check for another, whatever thread builds its client at the same time;
* its retry sleeps on its own and crashes (AttributeError) without rate-limit headers → its retry is
  off (`maxRetries: 0`) and `_Transport` (the single place every request passes) paces, retries,
  counts and caps every wait itself;
* its models reject records a real org can hold (a short `login`, an unknown `status`), and one
  such record used to fail the whole page → every record is checked on its own against what the
  SDK's models accept (`_user_ok`, a fast check that passes only records the models certainly
  accept; anything else, and every group, goes to the SDK's own `from_dict`); only the records the
  SDK rejects are quarantined;
* `paginate_all` stops silently on errors → never used; every response is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import random
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
    PagingGuard,
    body_opening,
    fail_if_unhealable,
    interruptible_async_sleep,
    is_loopback_host,
    parse_http_date,
    readable_body,
    redact_url,
    tenant_prefix,
    transport_reason,
)
from dirpull.connectors.mapping import map_attributes, mapping_root, without, without_nulls
from dirpull.connectors.source import Known, SourceDigests
from dirpull.jsoncodec import loads_any
from dirpull.model import Group, User

log = logging.getLogger(__name__)

EPOCH = "1970-01-01T00:00:00.000Z"
CURSOR_VERSION = 1
# Never part of raw_attributes: they change without anything a consumer cares about changing.
VOLATILE_USER = (
    "lastLogin",
    "lastUpdated",
    "passwordChanged",
    "transitioningToStatus",
    "credentials",
    "_links",
    "_embedded",
)
VOLATILE_GROUP = ("lastUpdated", "lastMembershipUpdated", "_links", "_embedded")
ALWAYS_INACTIVE = frozenset({"SUSPENDED", "DEPROVISIONED"})
DEFAULT_INACTIVE = ("STAGED", "SUSPENDED", "DEPROVISIONED")
LOG_FILTER = (
    'eventType sw "user.lifecycle.delete" or eventType sw "group.user_membership" '
    'or eventType eq "group.lifecycle.delete"'
)
MAX_TRANSIENT_ATTEMPTS = 6
MAX_RATE_LIMITED_ATTEMPTS = 50
MAX_BACKOFF = 60.0


# --- configuration ----------------------------------------------------------------------------------


def check_org_url(url: str) -> tuple[str, bool]:
    """(normalized org URL, whether it is a loopback http:// URL the SDK must be told to accept)."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigurationError(f"org_url {redact_url(url)!r} must look like https://YOUR-ORG.okta.com")
    if parts.path.strip("/") or parts.query:
        raise ConfigurationError(f"org_url {redact_url(url)!r} must be the bare org URL, without a path")
    normalized = f"{parts.scheme}://{parts.netloc}"
    if parts.scheme == "https":
        return normalized, False
    if not is_loopback_host(host):
        raise ConfigurationError(
            f"org_url {redact_url(url)!r}: http:// is allowed only for a local emulator on a loopback "
            "address (127.0.0.1, ::1, localhost); use https:// for a real Okta org"
        )
    return normalized, True


# --- time helpers ------------------------------------------------------------------------------------


def _ts(text: str | None) -> datetime | None:
    if not text or not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    # Okta prints UTC; a timestamp without a zone (which the SDK accepts) is read as UTC too, so
    # that it can be compared with the others instead of failing every run of the tenant.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _now() -> datetime:
    """The local clock (the run's start, the System Log start position)."""
    return datetime.now(UTC)


def _newest(current: datetime | None, text: str | None) -> datetime | None:
    value = _ts(text)
    if value is None:
        return current
    return value if current is None or value > current else current


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def next_after(headers: Any) -> str | None:
    """The `after` of the Link rel="next", from an aiohttp multi-dict (every Link header) or a dict."""
    links: list[str] = []
    if hasattr(headers, "getall"):
        links = list(headers.getall("Link", []))
    else:
        value = _header(headers, "Link")
        links = [value] if value else []
    for value in links:
        for part in value.split(","):
            if 'rel="next"' in part:
                url = part[part.find("<") + 1 : part.find(">")]
                after = parse_qs(urlsplit(url).query).get("after")
                return after[0] if after else None
    return None


def next_link(headers: Any) -> str | None:
    links = list(headers.getall("Link", [])) if hasattr(headers, "getall") else [_header(headers, "Link") or ""]
    for value in links:
        for part in value.split(","):
            if 'rel="next"' in part:
                return part[part.find("<") + 1 : part.find(">")]
    return None


def log_position(link: str | None) -> tuple[str | None, str | None]:
    """(since, after) of a System Log polling link (either may be missing)."""
    if not link:
        return None, None
    query = parse_qs(urlsplit(link).query)
    since, after = query.get("since"), query.get("after")
    return (since[0] if since else None), (after[0] if after else None)


# --- rate limits, retries, counting -------------------------------------------------------------------


Sleep = Callable[[float], Awaitable[Any]]


@dataclass
class Throttle:
    """The run's rate-limit budget: what the last response of each endpoint said, and how long we
    have waited.

    Okta's per-minute quota is shared with every other integration of the customer's org, so we
    stop while `reserve` of the window is still left, and wait for `X-Rate-Limit-Reset` (measured
    against the response's own `Date`, not our clock) rather than hammering it. The quotas are per
    endpoint (directory-apis §3.1: 500 vs 1000 in recorded headers): a System Log that a SIEM keeps
    near its limit says nothing about the user listing's window, so each endpoint's is kept apart.
    """

    reserve: float = 0.30
    max_wait: float = 300.0
    backoff_base: float = 1.0
    sleep: Sleep = interruptible_async_sleep
    tenant: str = ""  # named in the log's wait lines
    waited: float = 0.0
    waits: list[tuple[str, float]] = field(default_factory=list)
    # endpoint (`rate_endpoint`) → (limit, remaining, seconds from `observed_at` until the window
    # resets, observed_at), from its last response that carried the three headers.
    windows: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    def observe(self, headers: Any, endpoint: str = "") -> None:
        limit, remaining, reset = (
            _num(_header(headers, "X-Rate-Limit-Limit")),
            _num(_header(headers, "X-Rate-Limit-Remaining")),
            _num(_header(headers, "X-Rate-Limit-Reset")),
        )
        if limit is None or remaining is None or reset is None:
            return
        self.windows[endpoint] = (limit, remaining, reset - _server_now(headers), time.monotonic())

    def reset_wait(self, headers: Any) -> float | None:
        """Seconds until the window resets, on the response's own clock; None when the reset is not
        ahead of it (the concurrent limit's reset is only an estimate): the caller backs off then,
        rather than retrying at once, again and again."""
        reset = _num(_header(headers, "X-Rate-Limit-Reset"))
        if reset is None:
            return None
        wait = reset - _server_now(headers)
        return wait if wait > 0 else None

    def backoff(self, attempt: int) -> float:
        delay = min(MAX_BACKOFF, self.backoff_base * (2 ** (attempt - 1)))
        return delay + random.uniform(0, 0.25 * delay)

    async def wait(self, seconds: float, why: str, *, level: int = logging.WARNING) -> None:
        if self.waited + seconds > self.max_wait:
            raise ConnectorError(
                f"{why}: waiting {seconds:.1f}s more would pass max_rate_limit_wait "
                f"({self.max_wait:.0f}s, {self.waited:.1f}s already waited); failing the run"
            )
        self.waited += seconds
        self.waits.append((why, seconds))
        # The operator watching the daemon sees throttling as it happens, not only in the run's notes.
        log.log(level, "%s%s; waiting %.1fs", tenant_prefix(self.tenant), why, seconds)
        await self.sleep(seconds)

    async def pace(self, endpoint: str = "") -> None:
        """Before a request: if its endpoint's window is down to the reserve, sleep until it resets."""
        window = self.windows.get(endpoint)
        if window is None:
            return
        limit, remaining, reset_in, observed_at = window
        if remaining > self.reserve * limit:
            return
        left = reset_in - (time.monotonic() - observed_at)
        if left > 0:
            # Our own pacing, before Okta refuses anything: not worth a warning.
            await self.wait(left, f"rate limit reserve reached ({remaining:.0f}/{limit:.0f} left)", level=logging.INFO)
        del self.windows[endpoint]  # unknown until its next response


_ID_SEGMENT = re.compile(r"^(/api/v1/(?:users|groups))/[^/]+")


def rate_endpoint(url: str) -> str:
    """The endpoint a request counts against, for `Throttle`: its path with the user or group id
    replaced (`/api/v1/groups/{id}/users`), so every group's member listing shares one window."""
    return _ID_SEGMENT.sub(r"\1/{id}", urlsplit(url).path)


def _num(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.split(",")[0])
    except ValueError:
        return None


def _server_now(headers: Any) -> float:
    server = _server_date(headers)
    return time.time() if server is None else server


def _server_date(headers: Any) -> float | None:
    """The response's `Date` (Okta's clock, whole seconds), or None without a readable one."""
    when = parse_http_date(_header(headers, "Date"))
    return None if when is None else when.timestamp()


_UNREAD: Any = object()


@dataclass
class LastResponse:
    status: int
    headers: Any
    body: str
    url: str
    parsed: Any = _UNREAD  # a 2xx body, read once by the transport (`_Transport.send_request`)


_TRANSPORT_CLASS: type | None = None
# The step (`list users`, `read system log`…) of the request a task is making: the transport, below
# the SDK, names it in its retry warnings and errors. A context variable: each task has its own.
_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("okta_step", default=None)


def _transport_class() -> type:
    """`_Transport`: the okta SDK's HTTPClient with our retry/rate-limit policy (built lazily, so the
    SDK is imported only when an Okta tenant syncs)."""
    global _TRANSPORT_CLASS
    if _TRANSPORT_CLASS is not None:
        return _TRANSPORT_CLASS
    from okta.http_client import HTTPClient

    class _Transport(HTTPClient):
        throttle: Throttle
        requests: int
        last: LastResponse | None
        first_date: float | None = None  # the `Date` of the run's first answer (`_Run.start`)
        dpop: Any = None  # the SDK's DPoPProofGenerator, with `dpop` (`_fresh_proof`)
        assertion: Callable[[], str] | None = None  # the SDK's `OAuth.get_JWT`, with OAuth (`_fresh_assertion`)
        oauth: Any = None  # the SDK's `OAuth`, with client_id/private_key (`_renew_token`)

        async def send_request(self, request: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
            url = request["url"]
            headers = request.get("headers")
            auth = headers.get("Authorization") if isinstance(headers, dict) else None
            if isinstance(auth, str) and auth.startswith("SSWS") and not auth.startswith("SSWS "):
                # The SDK writes `SSWS<token>` (sdk-notes §2 pitfall 3); Okta documents, and every
                # other client sends, `SSWS {token}`: sent as documented, not as nobody checked.
                headers["Authorization"] = "SSWS " + auth[4:]
            step = _STEP.get()
            what = f"{step + ': ' if step else ''}{request['method']} {redact_url(url)}"
            endpoint = rate_endpoint(url)
            attempt = 0
            renewed = False
            while True:
                attempt += 1
                await self.throttle.pace(endpoint)
                if attempt > 1:
                    self._fresh_assertion(request)
                    self._fresh_proof(request)
                self.requests += 1
                req_info, resp, body, error = await super().send_request(request)
                if resp is None:
                    # Connection refused, reset, timeout: the SDK would crash on this later.
                    reason = transport_reason(error) if error else "no response"
                    if error is not None:
                        fail_if_unhealable(error, what, reason, step)
                    if attempt >= MAX_TRANSIENT_ATTEMPTS:
                        raise ConnectorError(f"{what}: {reason} (after {attempt} attempts)", step=step)
                    await self._wait(self.throttle.backoff(attempt), f"{what}: {reason}", step)
                    continue
                self.throttle.observe(resp.headers, endpoint)
                if self.first_date is None:
                    self.first_date = _server_date(resp.headers)
                self.last = LastResponse(resp.status, resp.headers, body or "", url)
                # A 401 with a DPoP-Nonce is the nonce challenge the SDK answers itself (RFC 9449 §9).
                nonce = resp.headers.get("DPoP-Nonce")
                if resp.status == 401 and not renewed and not nonce and await self._renew_token(request):
                    renewed = True  # once: a fresh token refused too is a refusal
                    continue
                if resp.status == 429:
                    if attempt >= MAX_RATE_LIMITED_ATTEMPTS:
                        return req_info, resp, body, error  # classified by the caller
                    hint = self.throttle.reset_wait(resp.headers)
                    delay = hint if hint is not None else self.throttle.backoff(attempt)
                    await self._wait(delay, f"{what}: HTTP 429 {_error_code(body) or ''}".strip(), step)
                    continue
                if resp.status in (500, 502, 503, 504):
                    if attempt >= MAX_TRANSIENT_ATTEMPTS:
                        return req_info, resp, body, error  # classified by the caller
                    await self._wait(self.throttle.backoff(attempt), f"{what}: HTTP {resp.status}", step)
                    continue
                if 200 <= resp.status <= 299 and body:
                    # A 2xx body garbled or cut on the way (a proxy, a gateway) is an outage, as a
                    # dropped connection is, and the other connectors retry it; the run failed on
                    # the first one. Read here once, so the listing does not parse it again.
                    try:
                        self.last.parsed = loads_any(body)
                    except ValueError:
                        if attempt >= MAX_TRANSIENT_ATTEMPTS:
                            return req_info, resp, body, error  # reported by the caller as not JSON
                        why = f"{what}: HTTP {resp.status} with a body that is not JSON"
                        await self._wait(self.throttle.backoff(attempt), why, step)
                        continue
                return req_info, resp, body, error

        async def _renew_token(self, request: dict[str, Any]) -> bool:
            """A new OAuth access token in `request` after a 401 on an API call: the token, taken
            before the call, can run out while it waits out rate limits and retries, or be revoked
            mid-run. False (nothing changed) with an api_token, on the token request itself, or when
            Okta gives no new token: the 401 stands."""
            headers = request.get("headers")
            auth = headers.get("Authorization") if isinstance(headers, dict) else None
            if self.oauth is None or not isinstance(auth, str) or not auth.startswith(("Bearer ", "DPoP ")):
                return False
            if urlsplit(request["url"]).path.endswith("/oauth2/v1/token"):
                return False
            refused = self.last
            self.oauth.clear_access_token()
            token, token_type, error = await self.oauth.get_oauth_token()  # through this transport
            self.last = refused  # the call's own answer, whatever the token request's was
            if error is not None or not token:
                return False
            headers["Authorization"] = f"{token_type} {token}"
            return True

        def _fresh_assertion(self, request: dict[str, Any]) -> None:
            """A new `client_assertion` for a resent token request: Okta keeps the `jti` of every
            assertion it has read, and refuses it again even when its answer was an error or never
            arrived (a dropped connection), as the SDK's own nonce retry notes."""
            form = request.get("form")
            if self.assertion is None or not isinstance(form, dict) or "client_assertion" not in form:
                return
            if urlsplit(request["url"]).path.endswith("/oauth2/v1/token"):
                form["client_assertion"] = self.assertion()

        def _fresh_proof(self, request: dict[str, Any]) -> None:
            """A new DPoP proof for a resend: a proof is for one request (RFC 9449 §11.1), its `jti`
            refused once Okta has read it, its `iat` stale after a rate-limit wait."""
            headers = request.get("headers")
            if self.dpop is None or not isinstance(headers, dict) or not headers.get("DPoP"):
                return
            import jwt

            first = jwt.decode(headers["DPoP"], options={"verify_signature": False})  # our own proof
            auth = headers.get("Authorization")
            token = auth[5:] if isinstance(auth, str) and auth.startswith("DPoP ") else None
            headers["DPoP"] = self.dpop.generate_proof_jwt(
                http_method=request["method"], http_url=request["url"], access_token=token, nonce=first.get("nonce")
            )

        async def _wait(self, seconds: float, why: str, step: str | None) -> None:
            try:
                await self.throttle.wait(seconds, why)
            except ConnectorError as exc:  # the wait cap: `why` names the step already
                if exc.step is None and step:
                    exc.step = step
                raise

    _TRANSPORT_CLASS = _Transport
    return _Transport


def _error_code(body: str | None) -> str | None:
    try:
        data = json.loads(body or "")
    except ValueError:
        return None
    return data.get("errorCode") if isinstance(data, dict) else None


def _sdk_config(org_url: str, allow_http: bool, auth: dict[str, Any]) -> dict[str, Any]:
    """The SDK's configuration from our settings only (no okta.yaml, no OKTA_* environment),
    checked by the SDK's own validator (it refuses http:// unless `allow_http`)."""
    import logging

    from okta.config.config_validator import ConfigValidator

    config: dict[str, Any] = {
        "client": {
            "orgUrl": org_url,
            "connectionTimeout": 30,
            "requestTimeout": 0,  # the SDK would also count our own waits; aiohttp gets a timeout below
            "rateLimit": {"maxRetries": 0},  # waits are ours (Throttle), counted and capped
            "cache": {"enabled": False, "defaultTtl": 300, "defaultTti": 300},
            "logging": {"enabled": False, "logLevel": logging.INFO},
            "userAgent": "dirpull",
            "oauthTokenRenewalOffset": 5,
            "raiseException": False,
            **auth,
        },
        # Only in this client's own dict, only for a loopback http:// emulator (check_org_url).
        "testing": {"testingDisableHttpsCheck": allow_http},
    }
    ConfigValidator(config)
    logging.getLogger("okta-sdk-python").disabled = True  # it would log request headers at DEBUG
    return config


class _Sdk:
    """The part of the okta SDK a pull uses: its `ApiClient` (serializes a call's URL, query and
    headers, auth header included, as its generated `*Api` methods do) and its `RequestExecutor`
    (default headers, OAuth access tokens, the send through our `_Transport`).
    `async with` opens the one aiohttp session of the run, as `okta.client.Client` does."""

    def __init__(self, config: dict[str, Any], transport: Callable[[dict[str, Any]], Any]) -> None:
        from okta.api_client import ApiClient
        from okta.cache.no_op_cache import NoOpCache
        from okta.request_executor import RequestExecutor

        self.api = ApiClient(configuration=config)
        self.executor = RequestExecutor(config, NoOpCache(), lambda cfg: transport(cfg))
        self._session: Any = None

    async def __aenter__(self) -> _Sdk:
        import aiohttp

        trace = aiohttp.TraceConfig()
        trace.on_request_redirect.append(_refuse_foreign_redirect)
        self._session = aiohttp.ClientSession(trace_configs=[trace])
        self.executor.set_session(self._session)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    def serialize(
        self, path: str, query: list[tuple[str, Any]], path_params: dict[str, str] | None = None
    ) -> tuple[str, str, dict[str, str], Any, Any]:
        """(method, url, headers, body, form) of a GET, as the SDK's `_<call>_serialize` builds it
        (tests/test_okta_connector.py compares the two)."""
        api = self.api
        return api.param_serialize(
            method="GET",
            resource_path=path,
            path_params=path_params or {},
            query_params=query,
            header_params={"Accept": api.select_header_accept(["application/json"])},
            body=None,
            post_params=[],
            files={},
            auth_settings=["apiToken", "oauth2"],
            collection_formats={},
            _host=None,
            _request_auth=None,
        )

    async def get(self, path: str, query: list[tuple[str, Any]], path_params: dict[str, str] | None = None) -> Any:
        """Send one GET the way the SDK's `execute` does, minus its cache (disabled) and its two
        parses of the body: the error, if any (the response itself is `transport.last`)."""
        method, url, headers, body, form = self.serialize(path, query, path_params)
        executor = self.executor
        request, error = await executor.create_request(
            method, url, body, headers, form or None, keep_empty_params=False
        )
        if error is not None:  # e.g. no OAuth access token
            return error
        _, _resp, _body, error = await executor.fire_request_helper(request, 0, time.time())
        return error


async def _refuse_foreign_redirect(_session: Any, _context: Any, params: Any) -> None:
    """aiohttp's `on_request_redirect`, before it follows one: a redirect to another origin than
    the request's is refused. aiohttp drops the Authorization header there but sends a POST's form
    again on 307/308: the token request's signed client_assertion, which the other host could
    trade for an access token. Followed, a GET met the other host's 401, reported as Okta refusing
    the api_token at the org URL."""
    from yarl import URL

    resp = params.response
    location = resp.headers.get("Location") or resp.headers.get("URI")
    if location is None:
        return  # aiohttp hands the 3xx back as it is
    try:
        target = params.url.join(URL(location))
        foreign = target.origin() != params.url.origin()
    except ValueError:
        return  # aiohttp refuses it with its own error
    if foreign:
        resp.close()
        raise ConnectorError(
            f"HTTP {resp.status} from {redact_url(str(params.url))} redirects to another host "
            f"({redact_url(str(target))}); not following it with the tenant's credentials (if that is "
            f"the org's new address, set org_url to it)",
            retriable=False,
            status=resp.status,
        )


def _sdk(org_url: str, allow_http: bool, auth: dict[str, Any], transport: Callable[[dict[str, Any]], Any]) -> _Sdk:
    """What a pull sends its requests through (a ValueError if the SDK refuses the settings)."""
    return _Sdk(_sdk_config(org_url, allow_http, auth), transport)


def _client(org_url: str, allow_http: bool, auth: dict[str, Any], transport: Any) -> Any:
    """The SDK's full `okta.client.Client` on the same hermetic configuration and transport, with
    its typed API methods (for tests and investigations; the pull itself uses `_sdk`, which does not
    import the SDK's ~1,700 modules)."""
    config = _sdk_config(org_url, allow_http, auth)

    from okta.cache.no_op_cache import NoOpCache
    from okta.client import Client
    from okta.request_executor import RequestExecutor

    class _HermeticClient(Client):
        def __init__(self) -> None:  # Client.__init__ minus ConfigSetter (env, yaml) and log handlers
            super(Client, self).__init__(configuration=config)
            self._config = config
            c = config["client"]
            self._authorization_mode = c["authorizationMode"]
            self._base_url = c["orgUrl"]
            self._api_token = c.get("token")
            self._client_id = c.get("clientId")
            self._scopes = c.get("scopes")
            self._private_key = c.get("privateKey")
            self._oauth_token_renewal_offset = c["oauthTokenRenewalOffset"]
            self._request_executor = RequestExecutor(config, NoOpCache(), lambda cfg: transport(cfg))

    return _HermeticClient()


# --- the connector ---------------------------------------------------------------------------------


class _Run:
    """State of one pull: the SDK pipeline, the transport, what was seen."""

    def __init__(self, sdk: _Sdk, transport: Any) -> None:
        self.sdk = sdk
        self.transport = transport
        self.started = _now()  # by the local clock; see `start()`
        self.seen_users: set[str] = set()
        self.notes: list[str] = []
        self.newest_user: datetime | None = None
        self.newest_group: datetime | None = None
        self.newest_members: datetime | None = None
        # Groups listed but not synced (Everyone without `include_everyone`, a type dirpull does not
        # read): a System Log membership change in one is no reason to list its members.
        self.unsynced_groups: set[str] = set()
        # Full pulls given `known=`: see `OktaConnector._add_user`.
        self.sources: SourceDigests | None = None
        self.digest_whole_record = False

    def start(self) -> datetime:
        """When this run started, for the cursor and the System Log position: the local clock at
        the start, or Okta's clock at its first answer when that is earlier. The timestamps
        compared with it are Okta's: a worker clock running ahead of Okta's must not move them
        past changes made during the run. `Date` is whole seconds, rounded down: Okta's clock
        read `Date` or later when it answered, so a change made after that answer is stamped
        `Date` or later. (`Date` + 1 s, an upper bound of Okta's clock, let the cursor and the
        System Log position pass changes and deletions of the second after the first answer
        when `cursor_holdback` is under a second.)"""
        first = self.transport.first_date
        if first is None:
            return self.started
        return min(self.started, datetime.fromtimestamp(first, UTC))


class OktaConnector(CountsRequests):
    provider = "okta"
    source_digests = True  # a full pull takes `known=` (connectors.source)

    def __init__(self, tenant: str, settings: Any, *, sleep: Sleep | None = None) -> None:
        self.tenant = tenant
        self.settings = settings
        self.org_url, self.allow_http = check_org_url(settings.org_url)
        self.page_size = int(getattr(settings, "page_size", 200))
        self.holdback = timedelta(seconds=float(getattr(settings, "cursor_holdback", 300.0)))
        # An empty list is a choice ("only the statuses that always are"), not "the default":
        # with `or` it put STAGED back among the inactive ones.
        inactive = getattr(settings, "inactive_statuses", None)
        if inactive is None:
            inactive = DEFAULT_INACTIVE
        self.inactive = frozenset(s.upper() for s in inactive) | ALWAYS_INACTIVE
        self.sleep = sleep or interruptible_async_sleep
        self.last_throttle: Throttle | None = None

    def __repr__(self) -> str:
        return f"OktaConnector({self.tenant!r}, {redact_url(self.org_url)!r})"

    # --- sync face --------------------------------------------------------------------------------

    def pull(
        self, cursor: dict[str, Any] | None, *, full: bool, known: Known | None = None
    ) -> Iterator[Page | Done]:
        runner = asyncio.Runner()
        agen = self._pull(cursor, full, known)
        box: list[Page | Done] = []

        async def step() -> None:
            # The item is handed over in `box`, not as the task's result: in the main thread,
            # Python 3.11's Runner.run formats repr(task) twice per call (signal.getsignal on its
            # own SIGINT handler), and a Page result would be repr'd with all its records (~10% of
            # the pull's CPU).
            box.append(await agen.__anext__())

        try:
            while True:
                try:
                    runner.run(step())
                except StopAsyncIteration:
                    return
                yield box.pop()
        finally:
            try:
                runner.run(agen.aclose())
            finally:
                runner.close()

    # --- auth -------------------------------------------------------------------------------------

    def _auth(self) -> dict[str, Any]:
        s = self.settings
        try:
            if s.api_token is not None:
                return {"authorizationMode": "SSWS", "token": s.api_token.get()}
            return {
                "authorizationMode": "PrivateKey",
                "clientId": s.client_id,
                "scopes": list(s.scopes),
                "privateKey": s.private_key.get(),
                # The SDK then sends a DPoP proof (RFC 9449) with the token request and every call.
                "dpopEnabled": bool(getattr(s, "dpop", False)),
            }
        except Exception as exc:  # ConfigError from a secret reference; its message has no secret
            raise ConfigurationError(f"okta credentials: {exc}") from None

    # --- the pull -----------------------------------------------------------------------------------

    async def _pull(
        self, cursor: dict[str, Any] | None, full: bool, known: Known | None = None
    ) -> AsyncIterator[Page | Done]:
        self._new_pull()
        s = self.settings
        throttle = Throttle(
            reserve=float(getattr(s, "rate_limit_reserve", 0.30)),
            max_wait=float(getattr(s, "max_rate_limit_wait", 300.0)),
            backoff_base=float(getattr(s, "backoff_base", 1.0)),
            sleep=self.sleep,
            tenant=self.tenant,
        )
        self.last_throttle = throttle
        transport_cls = _transport_class()
        timeout = float(getattr(s, "request_timeout", 60.0))

        def make_transport(cfg: dict[str, Any]) -> Any:
            t = transport_cls({**cfg, "requestTimeout": timeout})
            t.throttle, t.requests, t.last, t.first_date = throttle, 0, None, None
            holder.append(t)
            self._counting(lambda: t.requests)
            return t

        holder: list[Any] = []
        auth = self._auth()
        dpop = auth.pop("dpopEnabled", False)  # the SDK would generate a new key; the tenant's is below
        try:
            sdk = _sdk(self.org_url, self.allow_http, auth, make_transport)
        except ValueError as exc:
            raise ConfigurationError(f"okta SDK refused the configuration: {_first_line(exc)}") from None
        transport = holder[0]
        oauth = sdk.executor._oauth  # the SDK's OAuth (None with api_token): its DPoP key signs resends
        if dpop and oauth is not None:
            oauth._dpop_generator = _dpop_generator(self.tenant, self.org_url, auth["clientId"])
            oauth._dpop_enabled = True
        transport.dpop = oauth.get_dpop_generator() if oauth is not None else None
        transport.assertion = oauth.get_JWT if oauth is not None else None  # its signer, for resends
        transport.oauth = oauth
        run = _Run(sdk, transport)

        state = _parse_cursor(cursor) if not full else None
        if not full and cursor and state is None:
            run.notes.append("stored cursor unreadable: full resync")
        mode = "incremental" if state is not None else "full"
        if state is not None and s.poll_system_log and log_position(state.get("log_next"))[1] is None:
            # The events since the last run are unknown (a position refused as too old last run, or
            # a cursor written without one), deletions among them: this run lists everything.
            run.notes.append("system log position missing: full resync")
            mode = "full"
        if mode == "full" and known is not None:
            run.sources = SourceDigests(known, s, [__name__])
            # Last-login times and the like change all day without changing the user: they stay
            # out of the digest, unless the attribute mapping reads one of them.
            read = {mapping_root(path) for path in s.attributes.values()}
            run.digest_whole_record = bool(read & set(VOLATILE_USER))
        try:
            async with sdk:
                if mode == "full":
                    log_next = await self._log_start(run) if s.poll_system_log else None
                    async for page in self._full(run):
                        yield page
                    new_cursor = self._cursor(run, None, log_next)
                else:
                    assert state is not None
                    async for page in self._incremental(run, state):
                        yield page
                    new_cursor = self._cursor(run, state, state.get("log_next"))
        except ConnectorError as exc:
            exc.requests = transport.requests
            raise
        if throttle.waited:
            # Every wait, not only rate limits: retries of 5xx, dropped and garbled answers count
            # against the same max_rate_limit_wait.
            run.notes.append(
                f"waited {throttle.waited:.1f}s over {len(throttle.waits)} pauses (rate limits and retries)"
            )
        yield Done(
            snapshot=mode == "full",
            cursor=new_cursor,
            mode=mode,  # type: ignore[arg-type]
            requests=transport.requests,
            notes=run.notes,
        )

    def _cursor(self, run: _Run, prev: dict[str, Any] | None, log_next: str | None) -> dict[str, Any]:
        """Each timestamp held back `cursor_holdback` behind the newest one seen (Okta's lists are
        eventually consistent), never moving backwards, and never past the start of this run held
        back the same way: the lists are paged by id, not by time, so a record on a page already
        read may have changed while later pages were read, before the newest timestamp seen."""

        def held(newest: datetime | None, key: str) -> str:
            before = _ts(prev.get(key)) if prev else None
            value = min(newest, run.start()) - self.holdback if newest is not None else None
            candidates = [v for v in (before, value) if v is not None]
            return _iso(max(candidates)) if candidates else EPOCH

        return {
            "v": CURSOR_VERSION,
            "users_since": held(run.newest_user, "users_since"),
            "groups_since": held(run.newest_group, "groups_since"),
            "members_since": held(run.newest_members, "members_since"),
            "log_next": log_next,
            # Kept from run to run: an incremental run lists only the groups that changed.
            "unsynced_groups": sorted(run.unsynced_groups | set(prev.get("unsynced_groups", ()) if prev else ())),
        }

    async def _full(self, run: _Run) -> AsyncIterator[Page]:
        # One filtered pass: includes DEPROVISIONED (the plain list hides them) and every status.
        async for page in self._users(run, f'lastUpdated gt "{EPOCH}"'):
            yield page
        groups: list[str] = []
        async for page, ids in self._groups(run, None):
            groups.extend(ids)
            yield page
        for gid in groups:
            async for page in self._members(run, gid):
                yield page

    async def _incremental(self, run: _Run, state: dict[str, Any]) -> AsyncIterator[Page]:
        async for page in self._users(run, f'lastUpdated gt "{state["users_since"]}"'):
            yield page
        members_since = _ts(state["members_since"])
        refresh: list[str] = []
        gfilter = f'lastUpdated gt "{state["groups_since"]}" or lastMembershipUpdated gt "{state["members_since"]}"'
        async for page, _ids in self._groups(run, gfilter, members_since=members_since, refresh=refresh):
            yield page
        refreshed: set[str] = set()
        for gid in refresh:
            refreshed.add(gid)
            async for page in self._members(run, gid, complete=True):
                yield page
        if self.settings.poll_system_log:
            async for page in self._log(run, state, refreshed):
                yield page

    # --- users ------------------------------------------------------------------------------------

    async def _users(self, run: _Run, filt: str) -> AsyncIterator[Page]:
        async for records, bad in self._paged(run, "list users", "/api/v1/users", "user", filt=filt):
            page = Page(quarantined=bad)
            for rec in records:
                run.newest_user = _newest(run.newest_user, rec.get("lastUpdated"))
                self._add_user(run, page, rec)
            yield page

    def _add_user(self, run: _Run, page: Page, rec: dict[str, Any]) -> None:
        uid = rec.get("id")
        if not isinstance(uid, str) or not uid:
            # Dropped (or stored under ""), the user went unseen and a full sync deleted them;
            # quarantined without an id, no stored user is deleted on this run's word.
            page.quarantined.append(Quarantined("user", None, "user record without an id"))
            return
        if uid in run.seen_users:
            return
        digest = None
        if run.sources is not None:
            digest = run.sources.digest(rec if run.digest_whole_record else without(rec, VOLATILE_USER))
            if digest is not None and run.sources.unchanged(uid, digest):
                page.unchanged_users.append(uid)
                run.seen_users.add(uid)
                return
        try:
            page.users.append(self.normalize_user(rec))
            run.seen_users.add(uid)
        except Exception as exc:  # a record we cannot read is quarantined, never dropped silently
            page.quarantined.append(Quarantined("user", uid, f"cannot normalize: {_first_line(exc)}"))
            return
        if digest is not None:
            page.user_sources[uid] = digest

    def normalize_user(self, rec: dict[str, Any]) -> User:
        profile = rec.get("profile") or {}
        status = str(rec.get("status") or "").upper()
        email = profile.get("email") or None
        emails: list[str] = []
        for value in (email, profile.get("secondEmail")):
            if value and value not in emails:
                emails.append(value)
        display = profile.get("displayName") or (
            " ".join(x for x in (profile.get("firstName"), profile.get("lastName")) if x) or None
        )
        return User(
            idp_id=rec["id"],
            username=profile.get("login"),
            email=email,
            emails=emails,
            first_name=profile.get("firstName"),
            last_name=profile.get("lastName"),
            display_name=display,
            state="inactive" if status in self.inactive else "active",
            job_title=profile.get("title"),
            department=profile.get("department"),
            employee_number=_str(profile.get("employeeNumber")),
            # managerId is free text (often an HR import's): one naming the user is no manager,
            # as on Google.
            manager_idp_id=manager if (manager := profile.get("managerId") or None) != rec["id"] else None,
            custom_attributes=map_attributes(rec, self.settings.attributes),
            # Okta may leave a null-valued property out of one answer and send it in the next.
            raw_attributes=without_nulls(without(rec, VOLATILE_USER)),
        )

    # --- groups -----------------------------------------------------------------------------------

    async def _groups(
        self,
        run: _Run,
        filt: str | None,
        *,
        members_since: datetime | None = None,
        refresh: list[str] | None = None,
    ) -> AsyncIterator[tuple[Page, list[str]]]:
        async for records, bad in self._paged(run, "list groups", "/api/v1/groups", "group", filt=filt):
            page = Page(quarantined=bad)
            ids: list[str] = []
            for rec in records:
                gtype = rec.get("type")
                everyone = self.settings.include_everyone
                synced = gtype in ("OKTA_GROUP", "APP_GROUP") or (gtype == "BUILT_IN" and everyone)
                if not synced:
                    if isinstance(rec.get("id"), str):
                        run.unsynced_groups.add(rec["id"])
                    continue
                run.newest_group = _newest(run.newest_group, rec.get("lastUpdated"))
                run.newest_members = _newest(run.newest_members, rec.get("lastMembershipUpdated"))
                if not isinstance(rec.get("id"), str) or not rec["id"]:
                    page.quarantined.append(Quarantined("group", None, "group record without an id"))
                    continue
                try:
                    page.groups.append(self.normalize_group(rec))
                except Exception as exc:
                    page.quarantined.append(
                        Quarantined("group", rec.get("id"), f"cannot normalize: {_first_line(exc)}")
                    )
                    continue
                ids.append(rec["id"])
                if refresh is not None:
                    changed = _ts(rec.get("lastMembershipUpdated"))
                    if changed is None or members_since is None or changed > members_since:
                        refresh.append(rec["id"])
            yield page, ids

    @staticmethod
    def normalize_group(rec: dict[str, Any]) -> Group:
        profile = rec.get("profile") or {}
        return Group(
            idp_id=rec["id"],
            name=profile.get("name"),
            description=profile.get("description") or None,
            email=profile.get("email") or None,
            raw_attributes=without_nulls(without(rec, VOLATILE_GROUP)),
        )

    async def _members(self, run: _Run, gid: str, *, complete: bool = False) -> AsyncIterator[Page]:
        first = True
        try:
            # A member the user listing returned and took is only a pair here: its record is not
            # judged again (490,000 member records at 100,000 users, a quarter of the pull's CPU).
            async for records, bad in self._paged(
                run,
                f"list members of group {gid}",
                "/api/v1/groups/{groupId}/users",
                "user",
                path_params={"groupId": gid},
                taken=run.seen_users,
            ):
                page = Page(quarantined=bad)
                if complete and first:
                    page.complete_groups.append(gid)
                first = False
                for rec in records:
                    uid = rec.get("id")
                    if not isinstance(uid, str) or not uid:
                        continue
                    page.members.append((gid, uid))
                    # A member the user listing did not return (created since, or index lag).
                    self._add_user(run, page, rec)
                # A quarantined member is still a member: keep the pair so it is not removed.
                page.members.extend((gid, q.idp_id) for q in bad if q.idp_id)
                yield page
        except _NotFound:
            run.notes.append(f"group {gid} vanished while its members were read")
            # Gone from Okta, in a snapshot too: kept, it would stay stored with no members
            # until the next full sync.
            yield Page(removed_groups=[gid])

    # --- System Log -------------------------------------------------------------------------------

    async def _log_start(self, run: _Run) -> str | None:
        """A polling position from (start of the run − holdback): events before it are covered by
        this snapshot."""
        # A second early: Okta's `Date` (whole seconds, `_Run.start`) is then no reason to ask
        # again when the clocks agree; only a worker clock ahead of Okta's costs a second request.
        since = _iso(run.start() - self.holdback - timedelta(seconds=1))
        link: str | None = None
        after: str | None = None
        guard = PagingGuard("system log")
        while True:
            records, headers = await self._log_page(run, since=since, after=after)
            if after is None and (earlier := _iso(run.start() - self.holdback)) < since:
                # The first answer of a full run: Okta's clock is behind ours, and the `since`
                # just sent would skip what happens at the start of the walk. Again from its time.
                since = earlier
                continue
            link = next_link(headers) or link
            nxt = next_after(headers)
            # A polling link that does not move is "nothing newer yet", not a paging loop.
            if not records or nxt is None or nxt == after:
                return link
            guard.next(nxt)
            after = nxt

    async def _log_page(
        self, run: _Run, *, since: str | None = None, after: str | None = None
    ) -> tuple[list[dict[str, Any]], Any]:
        # The SDK's order (`_list_log_events_serialize`): since, until, after, filter, q, limit, sortOrder.
        # `since` goes with `after`: without it Okta takes 7 days before now, and a position older
        # than that would skip its events silently.
        query: list[tuple[str, Any]] = [("since", since)] if since else []
        if after:
            query.append(("after", after))
        query += [("filter", LOG_FILTER), ("limit", 1000), ("sortOrder", "ASCENDING")]
        records, _bad, headers = await self._call(run, "read system log", "/api/v1/logs", query, None)
        return records, headers

    async def _log(self, run: _Run, state: dict[str, Any], refreshed: set[str]) -> AsyncIterator[Page]:
        # Okta logs every new user as joining Everyone: not synced, listing its members (a request
        # per 200 users of the org) would change nothing.
        unsynced = run.unsynced_groups | set(state.get("unsynced_groups", ()))
        # The stored polling link's `since` is sent with its `after` (a link stored by an older
        # version may have none: followed with `after` only, until a full sync takes a new one).
        since, after = log_position(state.get("log_next"))
        removed_users: list[str] = []
        removed_groups: list[str] = []
        groups: list[str] = []
        not_done: list[str] = []  # deletion events whose outcome is not SUCCESS: "<target> <result>"
        guard = PagingGuard("system log")
        while True:
            try:
                records, headers = await self._log_page(run, since=since, after=after)
            except _BadRequest as exc:
                # Only E0000053 says the position is too old (`since` over 180 days). Another 400
                # (E0000001 validation, E0000031 search criteria…) is no reason to skip every event
                # since the stored position: the run fails and keeps it.
                if exc.code != "E0000053":
                    raise ConnectorError(
                        f"{exc}; the stored System Log position is kept (a full sync, `dirpull sync "
                        f"TENANT --full`, takes a new one)",
                        retriable=False,
                        step=exc.step,
                        status=exc.status,
                    ) from None
                # Polling from "now" would skip the deletions in the gap until the next periodic
                # full sync. This run has yielded its delta already, so the next one is a full
                # sync (no stored position, above); checking first would cost every run a request.
                run.notes.append("system log position rejected as too old (400 E0000053): the next run is a full sync")
                state["log_next"] = None
                break
            link = next_link(headers)
            state["log_next"] = link or state.get("log_next")
            for ev in records:
                kind = str(ev.get("eventType") or "")
                targets = ev.get("target") or []
                users = [t.get("id") for t in targets if t.get("type") == "User" and t.get("id")]
                grps = [t.get("id") for t in targets if t.get("type") == "UserGroup" and t.get("id")]
                deletion = kind.startswith("user.lifecycle.delete.completed") or kind == "group.lifecycle.delete"
                result = _outcome(ev)
                if deletion and result != "SUCCESS":
                    # A deletion that failed (was denied, skipped, deferred…) left the user or group
                    # in Okta: deleting it here deprovisions it downstream until the next full sync
                    # lists it again. An event without an outcome does not say it happened either:
                    # it is left, like any deletion without System Log polling, to the next full sync.
                    ids = users if kind.startswith("user.") else grps
                    not_done += [f"{i} {result or 'without outcome'}" for i in ids]
                elif kind.startswith("user.lifecycle.delete.completed"):
                    # Final even for a user this run listed (read before the deletion, or from a
                    # lagging index): Okta never reuses an id, and no later run lists them again.
                    removed_users += users
                elif kind == "group.lifecycle.delete":
                    removed_groups += grps
                elif kind.startswith("group.user_membership"):
                    groups += [g for g in grps if g not in refreshed and g not in groups and g not in unsynced]
            link_since, nxt = log_position(link)
            if not records or nxt is None or nxt == after:
                break
            guard.next(nxt)
            since, after = link_since or since, nxt
        if not_done:
            shown = ", ".join(not_done[:5]) + (f" and {len(not_done) - 5} more" if len(not_done) > 5 else "")
            run.notes.append(
                f"system log: {len(not_done)} deletion events not applied, their outcome is not SUCCESS "
                f"(the next full sync decides): {shown}"
            )
        if removed_users or removed_groups:
            yield Page(removed_users=sorted(set(removed_users)), removed_groups=sorted(set(removed_groups)))
        for gid in groups:
            if gid in removed_groups:
                continue
            refreshed.add(gid)
            async for page in self._members(run, gid, complete=True):
                yield page

    # --- calling the SDK --------------------------------------------------------------------------

    async def _paged(
        self,
        run: _Run,
        step: str,
        path: str,
        kind: str,
        *,
        filt: str | None = None,
        path_params: dict[str, str] | None = None,
        taken: Container[str] = (),
    ) -> AsyncIterator[tuple[list[dict[str, Any]], list[Quarantined]]]:
        """Pages of raw records (and the quarantined ones) of one listing, following Link rel="next".
        A record whose id is in `taken` is passed on unjudged (`_validate_each`)."""
        guard = PagingGuard(step)

        def call(after: str | None) -> asyncio.Future[tuple[list[dict[str, Any]], list[Quarantined], Any]]:
            # The SDK's order for /users, /groups and /groups/{id}/users: [search,] filter, [q,] after, limit.
            query: list[tuple[str, Any]] = [("filter", filt)] if filt else []
            if after is not None:
                query.append(("after", after))
            query.append(("limit", self.page_size))
            return asyncio.ensure_future(self._call(run, step, path, query, kind, path_params, taken))

        ahead = call(None)
        try:
            while True:
                records, bad, headers = await ahead
                after = next_after(headers)
                if after is None and next_link(headers) is not None:
                    # Taken for the last page, the listing would end early, and a full snapshot
                    # that lost its tail deletes those people.
                    raise ConnectorError(
                        f"{step}: Okta's next-page link has no `after` cursor; "
                        "the listing cannot go on and is not taken as complete",
                        step=step,
                    )
                guard.next(after)
                if after is None:
                    yield records, bad
                    return
                # Page N+1 is asked for before page N is handed on: Okta renders it while this
                # one is normalized and diffed (the request leaves at the sleep; its answer waits
                # in the socket until this generator is resumed). One request in flight at a time,
                # as before, so `transport.last` still belongs to the call that reads it.
                ahead = call(after)
                await asyncio.sleep(0)
                yield records, bad
        finally:
            # A page asked for but not wanted: cancelled, waited for, its outcome dropped. wait()
            # rather than `await ahead`, so that a cancellation of this task itself still propagates.
            if not ahead.done():
                ahead.cancel()
                await asyncio.wait([ahead])
            if not ahead.cancelled():
                ahead.exception()  # retrieved: asyncio would otherwise log it as never retrieved

    async def _call(
        self,
        run: _Run,
        step: str,
        path: str,
        query: list[tuple[str, Any]],
        kind: str | None,
        path_params: dict[str, str] | None = None,
        taken: Container[str] = (),
    ) -> tuple[list[dict[str, Any]], list[Quarantined], Any]:
        """One GET through the SDK → (records the SDK's models accept, quarantined records, headers).

        Any failure becomes a ConnectorError, never an empty page. A user or group the SDK's models
        reject is quarantined alone; a System Log page they reject fails the step.
        """
        transport = run.transport
        transport.last = None
        named = _STEP.set(step)
        try:
            err = await run.sdk.get(path, query, path_params)
        except ConnectorError as exc:
            if exc.step is not None:
                raise
            # From `_Transport`, which knows the request, not the step: a connection that kept
            # failing, the wait cap reached. Named like the HTTP errors, which listing failed.
            raise ConnectorError(f"{step}: {exc}", retriable=exc.retriable, step=step, status=exc.status) from None
        except AttributeError as exc:
            raise self._failure(step, transport, f"the okta SDK failed ({_first_line(exc)})") from None
        except ValueError as exc:
            last = transport.last
            if last is None:  # before any answer: a key it cannot sign with, a token no header can hold
                which = "api_token" if self.settings.api_token is not None else "client_id and private_key"
                raise ConfigurationError(
                    f"{step}: the okta SDK cannot use the credentials ({_first_line(exc)}); check {which}",
                    step=step,
                ) from None
            # The SDK's json.loads of a token answer that is not JSON. Not quoted: a token answer
            # cut short may still hold the access token.
            raise ConnectorError(
                f"{step}: the answer from {redact_url(last.url)} (HTTP {last.status}, {len(last.body)} "
                f"characters) is not JSON ({_first_line(exc)})",
                step=step,
            ) from None
        except _key_errors() as exc:
            # A JWK private_key the SDK's signer cannot use: the public key Okta's console shows
            # beside the app's key pair (jwcrypto: "No private key available"), or one missing a
            # private member (a TypeError deep in jwcrypto). Each was an unexpected error with a
            # traceback, naming neither the key nor what to give instead.
            if transport.last is not None or self.settings.private_key is None:
                raise
            raise ConfigurationError(
                f"{step}: the okta SDK cannot use the credentials ({type(exc).__name__}: {_first_line(exc)}); "
                "check client_id and private_key: the app's private key, as PEM or as a JWK with its "
                "private members (d, p, q, dp, dq, qi), not its public key",
                step=step,
            ) from None
        finally:
            _STEP.reset(named)
        last = transport.last
        if err is not None or last is None or not 200 <= last.status <= 299:
            raise self._failure(step, transport, _first_line(err) if err is not None else "no response")
        if not last.body:
            # Okta lists nothing as `[]`. An empty body taken for that (as it was) lost a page of
            # a full listing, and the users on it were deleted.
            raise ConnectorError(
                f"{step}: HTTP {last.status} from {redact_url(last.url)} with an empty body, not a JSON array",
                step=step,
            )
        raw = last.parsed
        if raw is _UNREAD:
            raise ConnectorError(
                f"{step}: the response is not JSON ({body_opening(last.body, 120)}) "
                f"(after {MAX_TRANSIENT_ATTEMPTS} attempts)",
                step=step,
            )
        if not isinstance(raw, list):
            raise ConnectorError(f"{step}: expected a JSON array, got {type(raw).__name__}", step=step)
        if kind is None:
            if not _sdk_reads_log(raw):
                raise ConnectorError(f"{step}: the okta SDK could not read a page", step=step)
            return raw, [], last.headers
        good, bad = _validate_each(raw, kind, taken)
        return good, bad, last.headers

    def _failure(self, step: str, transport: Any, detail: str) -> ConnectorError:
        last: LastResponse | None = transport.last
        if last is None:
            return ConnectorError(f"{step}: {detail}", step=step)
        code = _error_code(last.body)
        summary = readable_body(last.body, 200)
        msg = f"{step}: HTTP {last.status} from {redact_url(last.url)}: {summary}"
        dpop = _dpop_error(last)
        if dpop is not None:
            # An app that requires DPoP answers a plain private_key_jwt token request with 400
            # invalid_dpop_proof: without this, a "token error" that names neither cause nor fix.
            if getattr(self.settings, "dpop", False):
                fix = "check that the worker's clock is right; Okta refused the proofs dirpull sent"
            else:
                fix = (
                    "the Okta app requires DPoP-bound tokens: set dpop = true for this tenant, or turn "
                    'off "Require Demonstrating Proof of Possession (DPoP) header in token requests" on the app in Okta'
                )
            return AuthError(
                f"{step}: Okta refused the OAuth token request with a DPoP error ({dpop}); {fix}",
                step=step,
                status=last.status,
            )
        if last.status in (401, 403):
            # The keys this tenant signs in with: an OAuth app refused as invalid_client was told to
            # check an api_token it does not have.
            if self.settings.api_token is not None:
                check = "check api_token"
            else:
                check = "check client_id, private_key (the app's key pair) and the scopes granted to the app"
            return AuthError(f"{msg} ({check})", step=step, status=last.status)
        if last.status == 404 and code == "E0000007":
            return _NotFound(msg, step=step, status=404)
        if last.status == 400:
            return _BadRequest(msg, code=code, step=step)
        return ConnectorError(msg, retriable=last.status >= 500 or last.status == 429, step=step, status=last.status)


class _NotFound(ConnectorError):
    pass


class _BadRequest(ConnectorError):
    """A 400 from Okta; `code` is its errorCode, the only part of the answer to branch on."""

    def __init__(self, message: str, *, code: str | None, step: str) -> None:
        super().__init__(message, retriable=False, step=step, status=400)
        self.code = code


class _ParsedKey:
    """The DPoP generator's RSA key, whose `export_key()` hands PyJWT the key already parsed.

    The SDK signs each proof with `jwt.encode(claims, rsa_key.export_key(), …)`: a PEM that PyJWT
    parses again for every request, checking the 3072-bit key's primes (~95 ms of CPU a request,
    measured; 0.7 ms signing with the parsed key). A DPoP tenant's 100k-user full sync (~4,100
    requests) spent six minutes there. Anything else is the SDK's own key."""

    def __init__(self, key: Any) -> None:
        self._key = key
        self._parsed: Any = None

    def export_key(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return self._key.export_key(*args, **kwargs)
        if self._parsed is None:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            self._parsed = load_pem_private_key(self._key.export_key(), password=None)
        return self._parsed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key, name)


# A DPoP tenant's proof generator (its key pair), kept from run to run of this process, by
# (tenant, org URL, client id). The SDK makes one per client and keeps it as long as the client,
# rotating its key every 24 h; a client per run generated an RSA-3072 key pair each run: 0.2-3.2 s
# of CPU (measured: `RSA.generate(3072)`, 8 times), more than an incremental run's whole work.
_DPOP_GENERATORS: dict[tuple[str, str, str], Any] = {}
_DPOP_LOCK = threading.Lock()


def _dpop_generator(tenant: str, org_url: str, client_id: str) -> Any:
    from okta.dpop import DPoPProofGenerator

    with _DPOP_LOCK:
        key = (tenant, org_url, client_id)
        generator = _DPOP_GENERATORS.get(key)
        if generator is None:
            generator = _DPOP_GENERATORS[key] = DPoPProofGenerator({})
    return _parse_key_once(generator)  # again after the SDK rotated the key


def _parse_key_once(generator: Any) -> Any:
    """`generator` (the SDK's DPoPProofGenerator) signing with its key parsed once (`_ParsedKey`).
    A key the SDK rotates in (every 24 h by default) is parsed per proof again, as the SDK does."""
    with getattr(generator, "_lock", contextlib.nullcontext()):
        key = getattr(generator, "_rsa_key", None)
        if key is not None and hasattr(key, "export_key") and not isinstance(key, _ParsedKey):
            generator._rsa_key = _ParsedKey(key)
    return generator


def _dpop_error(last: LastResponse) -> str | None:
    """`error: description` of a DPoP error (RFC 9449 §7: invalid_dpop_proof, use_dpop_nonce, …)
    in an answer of the OAuth token endpoint, else None."""
    if not last.url.split("?", 1)[0].endswith("/oauth2/v1/token") or last.status not in (400, 401):
        return None
    try:
        data = json.loads(last.body or "")
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    from okta.errors.dpop_errors import is_dpop_error

    if not isinstance(error, str) or not is_dpop_error(error):
        return None
    description = data.get("error_description")
    return f"{error}: {description}" if isinstance(description, str) and description else error


def _validate_each(
    raw: list[Any], kind: str, taken: Container[str] = ()
) -> tuple[list[dict[str, Any]], list[Quarantined]]:
    """The records of a page the SDK's models accept, and the others quarantined one by one with
    the SDK's own reason. A user passing `_user_ok` is one the SDK's User model certainly accepts;
    any other user, and every group, is decided by the SDK's `from_dict`. A record whose id is in
    `taken` (already accepted from another listing) is passed on as it is."""
    fast = _user_ok if kind == "user" else None
    good: list[dict[str, Any]] = []
    bad: list[Quarantined] = []
    for rec in raw:
        if taken and type(rec) is dict and type(rid := rec.get("id")) is str and rid in taken:
            good.append(rec)
            continue
        if fast is not None and fast(rec):
            good.append(rec)
            continue
        reason = _sdk_rejects(rec, kind)
        if reason is None:
            good.append(rec)
        else:
            rid = rec.get("id") if isinstance(rec, dict) else None
            bad.append(Quarantined(kind, rid, f"the okta SDK rejects this record: {reason}"))
    return good, bad


def _sdk_rejects(rec: Any, kind: str) -> str | None:
    """Why the SDK's model (what its `list_users`/`list_groups` deserialize into) rejects `rec`, or None."""
    from okta.models import Group as OktaGroup
    from okta.models import User as OktaUser

    try:
        if not isinstance(rec, dict):
            raise ValueError("not an object")
        (OktaUser if kind == "user" else OktaGroup).from_dict(rec)
    except Exception as exc:
        return _validation_reason(exc) or _first_line(exc, 200)
    return None


def _validation_reason(exc: Exception) -> str | None:
    """A pydantic ValidationError as one line naming each field and what is wrong with it
    ("UserProfile.firstName: String should have at most 50 characters"), or None for another error.
    Its first line alone ("1 validation error for UserProfile") never said which field, and the
    lines after it quote the value: a name or an address has no place in a run record."""
    errors = getattr(exc, "errors", None)
    title = getattr(exc, "title", None)
    if not callable(errors) or not isinstance(title, str):
        return None
    try:
        found = errors(include_url=False, include_input=False)
    except Exception:
        return None
    if not isinstance(found, list) or not found:
        return None
    parts = []
    for err in found[:3]:
        where = ".".join(str(x) for x in (title, *err.get("loc", ())))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return ("; ".join(parts) + more)[:300]


def _outcome(event: dict[str, Any]) -> str | None:
    """A System Log event's `outcome.result` (SUCCESS, FAILURE, DENY…), None when it has none."""
    outcome = event.get("outcome")
    result = outcome.get("result") if isinstance(outcome, dict) else None
    return result if isinstance(result, str) else None


def _sdk_reads_log(raw: list[Any]) -> bool:
    """Whether the SDK's LogEvent model accepts every event of a System Log page."""
    if not raw:
        return True
    from okta.models.log_event import LogEvent

    try:
        for ev in raw:
            if not isinstance(ev, dict):
                return False
            LogEvent.from_dict(ev)
    except Exception:
        return False
    return True


# --- what the SDK's User model accepts, checked fast ------------------------------------------------
#
# `_user_ok(rec)` is True only for a record `okta.models.User.from_dict` accepts (okta 3.4.x); for
# anything it is not sure of it says False and the SDK itself decides (`_sdk_rejects`). It follows
# the model field by field: every field is Optional (None always passes); strings are strict (no
# numbers) and some have length limits; datetimes here only in Okta's own ISO 8601 form; enums by
# value; keys the model does not know are ignored by it (additional properties). Non-ASCII strings
# must encode as UTF-8: pydantic rejects lone surrogates in a length-checked string.
# tests/test_okta_connector.py probes every field of these models with good and bad values against
# the SDK, so a stricter SDK model shows up as a failing test, not as a missed quarantine.

_from_iso = datetime.fromisoformat
_ANY = sys.maxsize
_UNLIMITED = [
    "costCenter",
    "department",
    "displayName",
    "division",
    "employeeNumber",
    "honorificPrefix",
    "honorificSuffix",
    "locale",
    "manager",
    "managerId",
    "middleName",
    "nickName",
    "organization",
    "preferredLanguage",
    "profileUrl",
    "timezone",
    "title",
    "userType",
]
# UserProfile: alias → (min length, max length) of each field, every one an optional strict str.
_PROFILE: dict[str, tuple[int, int]] = {
    **dict.fromkeys(_UNLIMITED, (0, _ANY)),
    "city": (0, 128),
    "countryCode": (0, 2),
    "email": (5, 100),
    "firstName": (1, 50),
    "lastName": (1, 50),
    "login": (5, _ANY),
    "mobilePhone": (0, 100),
    "postalAddress": (0, 4096),
    "primaryPhone": (0, 100),
    "secondEmail": (0, 100),
    "state": (0, 128),
    "streetAddress": (0, 1024),
    "zipCode": (0, 50),
}
_USER_STATUS = frozenset(
    ["ACTIVE", "DEPROVISIONED", "LOCKED_OUT", "PASSWORD_EXPIRED", "PROVISIONED", "RECOVERY", "STAGED", "SUSPENDED"]
)
_TRANSITIONING = frozenset(("ACTIVE", "DEPROVISIONED", "PROVISIONED"))
_PROVIDER_TYPE = frozenset(("ACTIVE_DIRECTORY", "FEDERATION", "IMPORT", "LDAP", "OKTA", "SOCIAL"))
_HTTP_METHOD = frozenset(("DELETE", "GET", "PATCH", "POST", "PUT"))
_USER_LINKS = frozenset(
    [
        "self",
        "activate",
        "resetPassword",
        "resetFactors",
        "expirePassword",
        "forgotPassword",
        "changeRecoveryQuestion",
        "deactivate",
        "reactivate",
        "changePassword",
        "schema",
        "suspend",
        "unsuspend",
        "unlock",
        "type",
    ]
)


def _text(v: Any) -> bool:
    """A str without lone surrogates (which pydantic refuses in a length-checked str)."""
    if type(v) is not str:
        return False
    if v.isascii():
        return True
    try:
        v.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _opt_text(obj: dict[str, Any], key: str) -> bool:
    v = obj.get(key)
    return v is None or _text(v)


def _datetime(v: Any) -> bool:
    """Okta's own form, "2024-05-01T19:15:32.000Z", of a date and time that exist."""
    if type(v) is not str or len(v) != 24 or v[4:20:3] != "--T::." or v[23] != "Z" or v[11:13] > "23":
        return False
    try:
        _from_iso(v)  # digits, month, day of that month, hour, minute, second
    except ValueError:
        return False
    return True


def _profile(v: Any) -> bool:
    if type(v) is not dict:
        return False
    limits = _PROFILE
    for name, value in v.items():
        if value is None:
            continue
        lim = limits.get(name)
        if lim is not None and (
            type(value) is not str or not lim[0] <= len(value) <= lim[1] or not (value.isascii() or _text(value))
        ):
            return False
    return True


def _href(v: Any) -> bool:
    if type(v) is not dict or not _text(v.get("href")) or not _opt_text(v, "name") or not _opt_text(v, "type"):
        return False
    templated = v.get("templated")
    if templated is not None and type(templated) is not bool:
        return False
    hints = v.get("hints")
    if hints is None:
        return True
    if type(hints) is not dict:
        return False
    allow = hints.get("allow")
    return allow is None or (type(allow) is list and all(type(m) is str and m in _HTTP_METHOD for m in allow))


def _links(v: Any) -> bool:
    if type(v) is not dict:
        return False
    return all(link is None or name not in _USER_LINKS or _href(link) for name, link in v.items())


def _credentials(v: Any) -> bool:
    if type(v) is not dict:
        return False
    provider = v.get("provider")
    if provider is not None:
        if type(provider) is not dict or not _opt_text(provider, "name"):
            return False
        ptype = provider.get("type")
        if ptype is not None and not (type(ptype) is str and ptype in _PROVIDER_TYPE):
            return False
    password = v.get("password")
    if password is not None and (
        type(password) is not dict
        or password.get("hash") is not None
        or password.get("hook") is not None
        or not _opt_text(password, "value")
    ):
        return False
    question = v.get("recovery_question")
    return question is None or (
        type(question) is dict and _opt_text(question, "answer") and _opt_text(question, "question")
    )


# User: alias → check of a value that is not None.
_USER_FIELDS: dict[str, Callable[[Any], bool]] = {
    "activated": _datetime,
    "created": _datetime,
    "credentials": _credentials,
    "id": _text,
    "lastLogin": _datetime,
    "lastUpdated": _datetime,
    "passwordChanged": _datetime,
    "profile": _profile,
    "realmId": _text,
    "status": lambda v: type(v) is str and v in _USER_STATUS,
    "statusChanged": _datetime,
    "transitioningToStatus": lambda v: type(v) is str and v in _TRANSITIONING,
    "type": lambda v: type(v) is dict and _opt_text(v, "id"),
    "_embedded": lambda v: type(v) is dict and all(type(x) is dict for x in v.values()),
    "_links": _links,
}


def _user_ok(rec: Any) -> bool:
    """True only if the SDK's User model certainly accepts `rec` (see above)."""
    if type(rec) is not dict:
        return False
    fields = _USER_FIELDS
    for key, v in rec.items():
        if v is None:
            continue
        check = fields.get(key)
        if check is not None and not check(v):  # a key the model does not know is ignored by it
            return False
    return True


def _parse_cursor(cursor: dict[str, Any] | None) -> dict[str, Any] | None:
    if not cursor or cursor.get("v") != CURSOR_VERSION:
        return None
    keys = ("users_since", "groups_since", "members_since")
    if any(_ts(cursor.get(k)) is None for k in keys):
        return None
    unsynced = cursor.get("unsynced_groups")
    return {
        **{k: _iso(_ts(cursor[k])) for k in keys},  # type: ignore[arg-type]
        "log_next": cursor.get("log_next"),
        # Absent from a cursor written before it was kept: learned again from the groups listed.
        "unsynced_groups": [g for g in unsynced if isinstance(g, str)] if isinstance(unsynced, list) else [],
    }


def _str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _key_errors() -> tuple[type[Exception], ...]:
    """What the SDK's JWT signer raises for a JWK it cannot sign with. Looked up only when an
    exception is being matched: jwcrypto is not imported for an api_token tenant."""
    from jwcrypto.common import JWException

    return (JWException, TypeError, KeyError)


def _first_line(exc: object, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:limit]


def build(tenant: str, settings: Any) -> OktaConnector:
    return OktaConnector(tenant, settings)
