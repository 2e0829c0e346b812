"""Okta connector on the official `okta` SDK (3.4.x, asyncio/aiohttp).

One pull = one event loop (`asyncio.Runner`, so the runner may call `pull()` from any worker
thread) and one `async with Client(...)`: one aiohttp session for every request of the run.

Full pull (snapshot): users through `filter=lastUpdated gt "1970-01-01T00:00:00.000Z"` (one pass that
includes DEPROVISIONED, which the plain list hides — see docs/providers/okta.md for why not two
passes), groups (OKTA_GROUP, APP_GROUP; `Everyone` only with `include_everyone`), then each group's
members. Incremental pull (delta): `filter=lastUpdated gt "<cursor>"` for users, `lastUpdated` or
`lastMembershipUpdated` for groups (a group whose members changed is re-listed completely and
named in `complete_groups`), plus, with `poll_system_log`, the System Log for deletions.

The SDK's sharp edges (../shared/sdk-notes.md §2) and what this module does about them:
* it reads ./okta.yaml, ~/.okta/okta.yaml and OKTA_CLIENT_* → `_client()` builds the SDK client
  from our own config dict only, and passes the "allow http" testing flag in that dict only for a
  loopback host: nothing process-global is touched, so one tenant can never lift the https check
  for another, whatever thread builds its client at the same time;
* its retry sleeps on its own and crashes (AttributeError) without rate-limit headers → its retry is
  off (`maxRetries: 0`) and `_Transport` (our HTTPClient subclass, the single place every request
  passes) paces, retries, counts and caps every wait itself;
* a model it cannot parse raises ValidationError for the whole page → the page's raw JSON (kept by
  `_Transport`) is validated record by record and only the offending records are quarantined;
* `paginate_all` stops silently on errors → never used; every call's `err` is checked.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dirpull.connectors.base import AuthError, ConfigurationError, ConnectorError, Done, Page, Quarantined
from dirpull.connectors.http import PagingGuard, interruptible_async_sleep, readable_body, redact_url
from dirpull.connectors.mapping import map_attributes, without
from dirpull.model import Group, User

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
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(
            f"org_url {redact_url(url)!r}: http:// is allowed only for a local emulator on a loopback "
            "address (127.0.0.1, ::1, localhost); use https:// for a real Okta org"
        )
    return normalized, True


# --- time helpers ------------------------------------------------------------------------------------


def _ts(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


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


# --- rate limits, retries, counting -------------------------------------------------------------------


Sleep = Callable[[float], Awaitable[Any]]


@dataclass
class Throttle:
    """The run's rate-limit budget: what the last response said, and how long we have waited.

    Okta's per-minute quota is shared with every other integration of the customer's org, so we
    stop while `reserve` of the window is still left, and wait for `X-Rate-Limit-Reset` (measured
    against the response's own `Date`, not our clock) rather than hammering it.
    """

    reserve: float = 0.30
    max_wait: float = 300.0
    backoff_base: float = 1.0
    sleep: Sleep = interruptible_async_sleep
    waited: float = 0.0
    waits: list[tuple[str, float]] = field(default_factory=list)
    limit: float | None = None
    remaining: float | None = None
    reset_in: float | None = None  # seconds from `observed_at` until the window resets
    observed_at: float = 0.0

    def observe(self, headers: Any) -> None:
        limit, remaining, reset = (
            _num(_header(headers, "X-Rate-Limit-Limit")),
            _num(_header(headers, "X-Rate-Limit-Remaining")),
            _num(_header(headers, "X-Rate-Limit-Reset")),
        )
        if limit is None or remaining is None or reset is None:
            return
        self.limit, self.remaining = limit, remaining
        self.reset_in = reset - _server_now(headers)
        self.observed_at = time.monotonic()

    def reset_wait(self, headers: Any) -> float | None:
        reset = _num(_header(headers, "X-Rate-Limit-Reset"))
        if reset is None:
            return None
        return max(0.05, reset - _server_now(headers))

    def backoff(self, attempt: int) -> float:
        delay = min(MAX_BACKOFF, self.backoff_base * (2 ** (attempt - 1)))
        return delay + random.uniform(0, 0.25 * delay)

    async def wait(self, seconds: float, why: str) -> None:
        if self.waited + seconds > self.max_wait:
            raise ConnectorError(
                f"{why}: waiting {seconds:.1f}s more would pass max_rate_limit_wait "
                f"({self.max_wait:.0f}s, {self.waited:.1f}s already waited); failing the run"
            )
        self.waited += seconds
        self.waits.append((why, seconds))
        await self.sleep(seconds)

    async def pace(self) -> None:
        """Before a request: if the window is down to the reserve, sleep until it resets."""
        if self.limit is None or self.remaining is None or self.reset_in is None:
            return
        if self.remaining > self.reserve * self.limit:
            return
        left = self.reset_in - (time.monotonic() - self.observed_at)
        if left > 0:
            await self.wait(left, f"rate limit reserve reached ({self.remaining:.0f}/{self.limit:.0f} left)")
        self.remaining = None  # unknown until the next response


def _num(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.split(",")[0])
    except ValueError:
        return None


def _server_now(headers: Any) -> float:
    date = _header(headers, "Date")
    if date:
        try:
            return email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError):
            pass
    return time.time()


@dataclass
class LastResponse:
    status: int
    headers: Any
    body: str
    url: str


_TRANSPORT_CLASS: type | None = None


def _transport_class() -> type:
    """`_Transport`: the okta SDK's HTTPClient with our retry/rate-limit policy (built lazily, so the
    two-second SDK import happens only when an Okta tenant syncs)."""
    global _TRANSPORT_CLASS
    if _TRANSPORT_CLASS is not None:
        return _TRANSPORT_CLASS
    from okta.http_client import HTTPClient

    class _Transport(HTTPClient):
        throttle: Throttle
        requests: int
        last: LastResponse | None

        async def send_request(self, request: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
            url = request["url"]
            what = f"{request['method']} {redact_url(url)}"
            attempt = 0
            while True:
                attempt += 1
                await self.throttle.pace()
                self.requests += 1
                req_info, resp, body, error = await super().send_request(request)
                if resp is None:
                    # Connection refused, reset, timeout: the SDK would crash on this later.
                    reason = f"{type(error).__name__}: {error}" if error else "no response"
                    if attempt >= MAX_TRANSIENT_ATTEMPTS:
                        raise ConnectorError(f"{what}: {reason} (after {attempt} attempts)")
                    await self.throttle.wait(self.throttle.backoff(attempt), f"{what}: {reason}")
                    continue
                self.throttle.observe(resp.headers)
                self.last = LastResponse(resp.status, resp.headers, body or "", url)
                if resp.status == 429:
                    if attempt >= MAX_RATE_LIMITED_ATTEMPTS:
                        return req_info, resp, body, error  # classified by the caller
                    hint = self.throttle.reset_wait(resp.headers)
                    delay = hint if hint is not None else self.throttle.backoff(attempt)
                    await self.throttle.wait(delay, f"{what}: HTTP 429 {_error_code(body) or ''}".strip())
                    continue
                if resp.status in (500, 502, 503, 504):
                    if attempt >= MAX_TRANSIENT_ATTEMPTS:
                        return req_info, resp, body, error  # classified by the caller
                    await self.throttle.wait(self.throttle.backoff(attempt), f"{what}: HTTP {resp.status}")
                    continue
                return req_info, resp, body, error

    _TRANSPORT_CLASS = _Transport
    return _Transport


def _error_code(body: str | None) -> str | None:
    try:
        data = json.loads(body or "")
    except ValueError:
        return None
    return data.get("errorCode") if isinstance(data, dict) else None


def _client(org_url: str, allow_http: bool, auth: dict[str, Any], transport: Any) -> Any:
    """An okta SDK Client built from our settings only (no okta.yaml, no OKTA_* environment)."""
    import logging

    from okta.cache.no_op_cache import NoOpCache
    from okta.client import Client
    from okta.config.config_validator import ConfigValidator
    from okta.request_executor import RequestExecutor

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

    logging.getLogger("okta-sdk-python").disabled = True  # it would log request headers at DEBUG
    return _HermeticClient()


# --- the connector ---------------------------------------------------------------------------------


class _Run:
    """State of one pull: the SDK client, the transport, what was seen."""

    def __init__(self, client: Any, transport: Any) -> None:
        self.client = client
        self.transport = transport
        self.seen_users: set[str] = set()
        self.notes: list[str] = []
        self.newest_user: datetime | None = None
        self.newest_group: datetime | None = None
        self.newest_members: datetime | None = None


class OktaConnector:
    provider = "okta"

    def __init__(self, tenant: str, settings: Any, *, sleep: Sleep | None = None) -> None:
        self.tenant = tenant
        self.settings = settings
        self.org_url, self.allow_http = check_org_url(settings.org_url)
        self.page_size = int(getattr(settings, "page_size", 200))
        self.holdback = timedelta(seconds=float(getattr(settings, "cursor_holdback", 300.0)))
        inactive = getattr(settings, "inactive_statuses", None) or DEFAULT_INACTIVE
        self.inactive = frozenset(s.upper() for s in inactive) | ALWAYS_INACTIVE
        self.sleep = sleep or interruptible_async_sleep
        self.last_throttle: Throttle | None = None

    def __repr__(self) -> str:
        return f"OktaConnector({self.tenant!r}, {redact_url(self.org_url)!r})"

    # --- sync face --------------------------------------------------------------------------------

    def pull(self, cursor: dict[str, Any] | None, *, full: bool) -> Iterator[Page | Done]:
        runner = asyncio.Runner()
        agen = self._pull(cursor, full)
        try:
            while True:
                try:
                    item = runner.run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
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
            }
        except Exception as exc:  # ConfigError from a secret reference; its message has no secret
            raise ConfigurationError(f"okta credentials: {exc}") from None

    # --- the pull -----------------------------------------------------------------------------------

    async def _pull(self, cursor: dict[str, Any] | None, full: bool) -> AsyncIterator[Page | Done]:
        s = self.settings
        throttle = Throttle(
            reserve=float(getattr(s, "rate_limit_reserve", 0.30)),
            max_wait=float(getattr(s, "max_rate_limit_wait", 300.0)),
            backoff_base=float(getattr(s, "backoff_base", 1.0)),
            sleep=self.sleep,
        )
        self.last_throttle = throttle
        transport_cls = _transport_class()
        timeout = float(getattr(s, "request_timeout", 60.0))

        def make_transport(cfg: dict[str, Any]) -> Any:
            t = transport_cls({**cfg, "requestTimeout": timeout})
            t.throttle, t.requests, t.last = throttle, 0, None
            holder.append(t)
            return t

        holder: list[Any] = []
        try:
            client = _client(self.org_url, self.allow_http, self._auth(), make_transport)
        except ValueError as exc:
            raise ConfigurationError(f"okta SDK refused the configuration: {_first_line(exc)}") from None
        transport = holder[0]
        run = _Run(client, transport)

        state = _parse_cursor(cursor) if not full else None
        if not full and cursor and state is None:
            run.notes.append("stored cursor unreadable: full resync")
        mode = "incremental" if state is not None else "full"
        async with client:
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
        if throttle.waited:
            run.notes.append(f"rate limits: waited {throttle.waited:.1f}s over {len(throttle.waits)} pauses")
        yield Done(
            snapshot=mode == "full",
            cursor=new_cursor,
            mode=mode,  # type: ignore[arg-type]
            requests=transport.requests,
            notes=run.notes,
        )

    def _cursor(self, run: _Run, prev: dict[str, Any] | None, log_next: str | None) -> dict[str, Any]:
        """Each timestamp held back `cursor_holdback` behind the newest one seen (Okta's lists are
        eventually consistent), never moving backwards."""

        def held(newest: datetime | None, key: str) -> str:
            before = _ts(prev.get(key)) if prev else None
            value = newest - self.holdback if newest is not None else None
            candidates = [v for v in (before, value) if v is not None]
            return _iso(max(candidates)) if candidates else EPOCH

        return {
            "v": CURSOR_VERSION,
            "users_since": held(run.newest_user, "users_since"),
            "groups_since": held(run.newest_group, "groups_since"),
            "members_since": held(run.newest_members, "members_since"),
            "log_next": log_next,
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
        async for records, bad in self._paged("list users", run.client.list_users, "user", filter=filt):
            page = Page(quarantined=bad)
            for rec in records:
                run.newest_user = _newest(run.newest_user, rec.get("lastUpdated"))
                self._add_user(run, page, rec)
            yield page

    def _add_user(self, run: _Run, page: Page, rec: dict[str, Any]) -> None:
        uid = rec.get("id")
        if not isinstance(uid, str) or uid in run.seen_users:
            return
        try:
            page.users.append(self.normalize_user(rec))
            run.seen_users.add(uid)
        except Exception as exc:  # a record we cannot read is quarantined, never dropped silently
            page.quarantined.append(Quarantined("user", uid, f"cannot normalize: {_first_line(exc)}"))

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
            manager_idp_id=profile.get("managerId") or None,
            custom_attributes=map_attributes(rec, self.settings.attributes),
            raw_attributes=without(rec, VOLATILE_USER),
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
        kwargs = {"filter": filt} if filt else {}
        async for records, bad in self._paged("list groups", run.client.list_groups, "group", **kwargs):
            page = Page(quarantined=bad)
            ids: list[str] = []
            for rec in records:
                gtype = rec.get("type")
                if gtype == "BUILT_IN" and not self.settings.include_everyone:
                    continue
                if gtype not in ("OKTA_GROUP", "APP_GROUP", "BUILT_IN"):
                    continue
                run.newest_group = _newest(run.newest_group, rec.get("lastUpdated"))
                run.newest_members = _newest(run.newest_members, rec.get("lastMembershipUpdated"))
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
            raw_attributes=without(rec, VOLATILE_GROUP),
        )

    async def _members(self, run: _Run, gid: str, *, complete: bool = False) -> AsyncIterator[Page]:
        first = True
        try:
            async for records, bad in self._paged(
                f"list members of group {gid}", run.client.list_group_users, "user", group_id=gid
            ):
                page = Page(quarantined=bad)
                if complete and first:
                    page.complete_groups.append(gid)
                first = False
                for rec in records:
                    uid = rec.get("id")
                    if not isinstance(uid, str):
                        continue
                    page.members.append((gid, uid))
                    # A member the user listing did not return (created since, or index lag).
                    self._add_user(run, page, rec)
                # A quarantined member is still a member: keep the pair so it is not removed.
                page.members.extend((gid, q.idp_id) for q in bad if q.idp_id)
                yield page
        except _NotFound:
            run.notes.append(f"group {gid} vanished while its members were read")
            if complete:
                yield Page(removed_groups=[gid])

    # --- System Log -------------------------------------------------------------------------------

    async def _log_start(self, run: _Run) -> str | None:
        """A polling position from (now − holdback): events before it are covered by this snapshot."""
        since = _iso(datetime.now(UTC) - self.holdback)
        link: str | None = None
        after: str | None = None
        guard = PagingGuard("system log")
        while True:
            records, headers = await self._log_page(run, since=since, after=after)
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
        kwargs: dict[str, Any] = {"filter": LOG_FILTER, "limit": 1000, "sort_order": "ASCENDING"}
        if after:
            kwargs["after"] = after
        elif since:
            kwargs["since"] = since
        records, _bad, headers = await self._call("read system log", run.client.list_log_events, None, **kwargs)
        return records, headers

    async def _log(self, run: _Run, state: dict[str, Any], refreshed: set[str]) -> AsyncIterator[Page]:
        link = state.get("log_next")
        after = next_after({"Link": f'<{link}>; rel="next"'}) if link else None
        if after is None:
            state["log_next"] = await self._log_start(run)
            run.notes.append("system log position missing: started polling from now")
            return
        removed_users: list[str] = []
        removed_groups: list[str] = []
        groups: list[str] = []
        guard = PagingGuard("system log")
        while True:
            try:
                records, headers = await self._log_page(run, after=after)
            except ConnectorError as exc:
                if exc.status != 400:
                    raise
                run.notes.append("system log position rejected: started polling from now")
                state["log_next"] = await self._log_start(run)
                break
            state["log_next"] = next_link(headers) or state.get("log_next")
            for ev in records:
                kind = str(ev.get("eventType") or "")
                targets = ev.get("target") or []
                users = [t.get("id") for t in targets if t.get("type") == "User" and t.get("id")]
                grps = [t.get("id") for t in targets if t.get("type") == "UserGroup" and t.get("id")]
                if kind.startswith("user.lifecycle.delete.completed"):
                    removed_users += [u for u in users if u not in run.seen_users]
                elif kind == "group.lifecycle.delete":
                    removed_groups += grps
                elif kind.startswith("group.user_membership"):
                    groups += [g for g in grps if g not in refreshed and g not in groups]
            nxt = next_after(headers)
            if not records or nxt is None or nxt == after:
                break
            guard.next(nxt)
            after = nxt
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
        self, step: str, method: Callable[..., Awaitable[Any]], kind: str | None, **kwargs: Any
    ) -> AsyncIterator[tuple[list[dict[str, Any]], list[Quarantined]]]:
        """Pages of raw records (and the quarantined ones) of one listing, following Link rel="next"."""
        guard = PagingGuard(step)
        after: str | None = None
        while True:
            records, bad, headers = await self._call(step, method, kind, limit=self.page_size, after=after, **kwargs)
            yield records, bad
            after = next_after(headers)
            guard.next(after)
            if after is None:
                return

    async def _call(
        self, step: str, method: Callable[..., Awaitable[Any]], kind: str | None, **kwargs: Any
    ) -> tuple[list[dict[str, Any]], list[Quarantined], Any]:
        """One SDK call → (raw records the SDK's models accept, quarantined records, headers).

        Errors are returned by the SDK, not raised; some failures raise AttributeError instead and a
        record its models reject raises ValidationError for the whole page: all become either a
        ConnectorError or a per-record quarantine, never an empty page.
        """
        from pydantic import ValidationError

        transport = self._transport_of(method)
        transport.last = None
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        rejected = False
        try:
            data, _resp, err = await method(**kwargs)
        except ValidationError:
            data, err, rejected = None, None, True
        except AttributeError as exc:
            raise self._failure(step, transport, f"the okta SDK failed ({_first_line(exc)})") from None
        last = transport.last
        if err is not None or last is None or not 200 <= last.status <= 299:
            raise self._failure(step, transport, _first_line(err) if err is not None else "no response")
        try:
            raw = json.loads(last.body) if last.body else []
        except ValueError:
            raise ConnectorError(
                f"{step}: the response is not JSON ({readable_body(last.body, 120)})", step=step
            ) from None
        if not isinstance(raw, list):
            raise ConnectorError(f"{step}: expected a JSON array, got {type(raw).__name__}", step=step)
        if not rejected and data is not None and len(data) != len(raw):
            raise ConnectorError(f"{step}: the SDK returned {len(data)} records for {len(raw)} on the wire", step=step)
        if rejected and kind is None:
            raise ConnectorError(f"{step}: the okta SDK could not read a page", step=step)
        good, bad = raw, []
        if rejected:
            good, bad = _validate_each(raw, kind or "user")
        return good, bad, last.headers

    def _transport_of(self, method: Any) -> Any:
        return method.__self__._request_executor._http_client

    def _failure(self, step: str, transport: Any, detail: str) -> ConnectorError:
        last: LastResponse | None = transport.last
        if last is None:
            return ConnectorError(f"{step}: {detail}", step=step)
        code = _error_code(last.body)
        summary = readable_body(last.body, 200)
        msg = f"{step}: HTTP {last.status} from {redact_url(last.url)}: {summary}"
        if last.status in (401, 403):
            return AuthError(msg + " (check api_token / OAuth app scopes)", step=step, status=last.status)
        if last.status == 404 and code == "E0000007":
            return _NotFound(msg, step=step, status=404)
        return ConnectorError(msg, retriable=last.status >= 500 or last.status == 429, step=step, status=last.status)


class _NotFound(ConnectorError):
    pass


def _validate_each(raw: list[Any], kind: str) -> tuple[list[dict[str, Any]], list[Quarantined]]:
    """The records of a page the SDK rejected, one by one: keep the readable, quarantine the rest."""
    from okta.models import Group as OktaGroup
    from okta.models import User as OktaUser

    model = OktaUser if kind == "user" else OktaGroup
    good: list[dict[str, Any]] = []
    bad: list[Quarantined] = []
    for rec in raw:
        rid = rec.get("id") if isinstance(rec, dict) else None
        try:
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            model.from_dict(rec)
        except Exception as exc:
            bad.append(Quarantined(kind, rid, f"the okta SDK rejects this record: {_first_line(exc, 200)}"))
            continue
        good.append(rec)
    return good, bad


def _parse_cursor(cursor: dict[str, Any] | None) -> dict[str, Any] | None:
    if not cursor or cursor.get("v") != CURSOR_VERSION:
        return None
    keys = ("users_since", "groups_since", "members_since")
    if any(_ts(cursor.get(k)) is None for k in keys):
        return None
    return {**{k: _iso(_ts(cursor[k])) for k in keys}, "log_next": cursor.get("log_next")}  # type: ignore[arg-type]


def _str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _first_line(exc: object, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:limit]


def build(tenant: str, settings: Any) -> OktaConnector:
    return OktaConnector(tenant, settings)
