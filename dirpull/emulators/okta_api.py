"""Okta Management API emulator (../shared/directory-apis.md §3, §6 rule 3).

Served over the shared `Org`:
  GET  /api/v1/users                 Link-header paging (rel="self" first, rel="next" last), limit ≤ 200,
                                     opaque `after`; the plain list hides DEPROVISIONED, `filter` and
                                     `search` include them; a bad filter is 400 E0000053; `q` (a prefix
                                     of firstName, lastName or email) hides them too, 10 by default,
                                     never a next page
  GET  /api/v1/users/{id}            404 E0000007 for a deleted user (no tombstones anywhere)
  GET  /api/v1/groups                OKTA_GROUP / APP_GROUP from the Org plus a BUILT_IN `Everyone`;
                                     `filter` on id, type, lastUpdated, lastMembershipUpdated; `q` (a
                                     name prefix): 300 by default, never a next page; `expand=stats`
                                     (also on /groups/{id}): `_embedded.stats.usersCount`
  GET  /api/v1/groups/{id}/users     full User objects, default limit 1000; Org subgroups are served
                                     flattened (Okta groups do not nest)
  GET  /api/v1/logs                  System Log derived from Org changes (people, memberships, a
                                     hire's joining Everyone, group deletions); a polling request
                                     (no `until`) always carries rel="next", pages may be empty, and
                                     its `since` is compared with when the event was stored; a
                                     bounded one (`since` and `until`) compares `published`, is
                                     ordered by it (`sortOrder`) and ends; events published over 90
                                     days ago are gone
  POST /oauth2/v1/token              client_credentials + private_key_jwt (OAuth service app); an
                                     assertion whose `jti` it has read before, whatever it answered
                                     then, is refused: 401 invalid_client "The client_assertion token
                                     has already been used."

Every response carries `x-rate-limit-limit/remaining/reset` (lower-case, as Okta writes them, and
`link` too) from a real per-window counter of its endpoint family (users, groups, logs, token: each
its own window, and its own limit with `rate_limits`) and a `Date`; exhausting the window gives 429
E0000047. Switches (attributes, or over HTTP at `POST /_emulator/okta`): `status_overrides`
(Person.n → STAGED, PROVISIONED, …), `malformed_users` (Person.n served with a record the SDK's
models reject), `rate_limit_headers` (a faulted 429 with or without the X-Rate-Limit headers),
`fault_reset_in` (a faulted 429's X-Rate-Limit-Reset, seconds from now; 0 or less: not ahead of the
server's clock, as the concurrent limit's estimate can be), `app_group_every`, `failed_deletes` (an
Okta user or group id → the `outcome.result` of a deletion attempt logged for it, FAILURE, DENY, …,
or null for an event without `outcome`; the user or group stays: each is logged once, at the next
System Log request), `ssws_space_required` (refuse `SSWS<token>` without the space the reference
documents, `SSWS {token}`, with 401; default: accept both, as sdk-notes advises for fakes, since the
SDK itself sends it without), `dpop_required` (the OAuth app "Requires Demonstrating Proof of
Possession", RFC 9449 as Okta does it: a token request without a `DPoP` proof → 400
`invalid_dpop_proof`; a proof without the server's nonce → 400 `use_dpop_nonce` with a `DPoP-Nonce`
header; a verified proof → a `token_type: "DPoP"` token that the APIs take only as `Authorization:
DPoP <token>` with a proof of the same key, its `ath` the token's hash, else 401).
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from dirpull.emulators.org import Group, Org, Person
from dirpull.emulators.server import Emulator, Request, Response, flag, one_of

STATUSES = (
    "STAGED",
    "PROVISIONED",
    "ACTIVE",
    "RECOVERY",
    "PASSWORD_EXPIRED",
    "LOCKED_OUT",
    "SUSPENDED",
    "DEPROVISIONED",
)
EVERYONE = 0  # pseudo Group.n of the BUILT_IN group
API_TOKEN = "00emulator-okta-api-token"  # the token tenant_config hands out
USER_TYPE = "oty1emulatorType"
# LogOutcome.result values (okta SDK 3.4 `okta.models.log_outcome`).
OUTCOMES = (
    "SUCCESS",
    "FAILURE",
    "SKIPPED",
    "ALLOW",
    "DENY",
    "CHALLENGE",
    "UNKNOWN",
    "RATE_LIMIT",
    "DEFERRED",
    "SCHEDULED",
    "ABANDONED",
    "UNANSWERED",
)
_ID_RE = re.compile(r"^00([ug])(\d{10})emu$")


def user_id(n: int) -> str:
    return f"00u{n:010d}emu"


def group_id(n: int) -> str:
    return f"00g{n:010d}emu"


def parse_id(value: str, kind: str) -> int | None:
    m = _ID_RE.match(value or "")
    if not m or m.group(1) != kind:
        return None
    return int(m.group(2))


def parse_time(text: str) -> float:
    """An ISO-8601 timestamp (with or without milliseconds, `Z` or an offset) → epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _error(status: int, code: str, summary: str, causes: Iterable[str] = ()) -> Response:
    return Response(
        status,
        {
            "errorCode": code,
            "errorSummary": summary,
            "errorLink": code,
            "errorId": "oae" + secrets.token_hex(8),
            "errorCauses": [{"errorSummary": c} for c in causes],
        },
    )


# --- filter / search expressions ------------------------------------------------------------------


class FilterError(ValueError):
    pass


_TOKEN = re.compile(r'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([A-Za-z_][\w.:]*)|(\S+))')
Predicate = Callable[[Callable[[str], Any]], bool]
DATE_ATTRS = frozenset(
    {
        "lastUpdated",
        "lastMembershipUpdated",
        "created",
        "activated",
        "statusChanged",
        "published",
        "lastLogin",
    }
)


class Expr:
    """A parsed SCIM-style filter: `attr op "value"` joined by and/or, with parentheses.

    `allowed` maps an attribute to the operators it accepts (`prefix.*` as key: any attribute under
    `prefix`; `*`: any other attribute; an empty set: the attribute is refused).
    """

    def __init__(self, text: str, allowed: dict[str, set[str]]) -> None:
        self.allowed = allowed
        self.tokens = self._tokenize(text)
        self.pos = 0
        # A timestamp attribute → the bound of its `gt`/`ge` terms, which every match is later than
        # when nothing is joined by `or`: what an index on it would answer (`_list_users`).
        self.floors: dict[str, float] = {}
        self.predicate = self._or()
        if self.pos != len(self.tokens):
            raise FilterError(f"unexpected {self.tokens[self.pos][1]!r}")
        if any(kind == "word" and value.lower() == "or" for kind, value in self.tokens):
            self.floors = {}

    @staticmethod
    def _tokenize(text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for m in _TOKEN.finditer(text):
            if m.group(1):
                out.append(("(", "("))
            elif m.group(2):
                out.append((")", ")"))
            elif m.group(3) is not None:
                out.append(("str", m.group(3).replace('\\"', '"')))
            elif m.group(4):
                out.append(("word", m.group(4)))
            elif m.group(5):
                out.append(("other", m.group(5)))
        return out

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> tuple[str, str]:
        tok = self._peek()
        if tok is None:
            raise FilterError("unexpected end of expression")
        self.pos += 1
        return tok

    def _or(self) -> Predicate:
        parts = [self._and()]
        while (tok := self._peek()) and tok[0] == "word" and tok[1].lower() == "or":
            self.pos += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda get: any(p(get) for p in parts))

    def _and(self) -> Predicate:
        parts = [self._term()]
        while (tok := self._peek()) and tok[0] == "word" and tok[1].lower() == "and":
            self.pos += 1
            parts.append(self._term())
        return parts[0] if len(parts) == 1 else (lambda get: all(p(get) for p in parts))

    def _term(self) -> Predicate:
        kind, value = self._take()
        if kind == "(":
            inner = self._or()
            if self._take()[0] != ")":
                raise FilterError("missing )")
            return inner
        if kind != "word":
            raise FilterError(f"expected an attribute, got {value!r}")
        attr = value
        op = self._take()[1].lower()
        ops = self.allowed.get(attr)
        if ops is None:  # a `prefix.*` key covers every attribute under it, `*` any other
            prefix = next((k for k in self.allowed if k.endswith(".*") and attr.startswith(k[:-1])), "*")
            ops = self.allowed.get(prefix)
        if not ops:
            raise FilterError(f"attribute {attr!r} is not supported")
        if op not in ops:
            raise FilterError(f"operator {op!r} is not supported for {attr!r}")
        if op == "pr":
            return lambda get: get(attr) is not None
        vkind, literal = self._take()
        if vkind != "str":
            if vkind == "word" and literal in ("true", "false"):
                literal_value: Any = literal == "true"
            else:
                raise FilterError(f"value for {attr!r} must be a quoted string")
        else:
            literal_value = literal
        if attr in DATE_ATTRS:
            if op not in RANGE:
                # `sw` and `co` are string operators; a timestamp is compared, never matched as text.
                raise FilterError(f"operator {op!r} is not supported for the timestamp {attr!r}")
            try:
                bound = parse_time(str(literal_value))
            except ValueError:
                raise FilterError(f"{literal_value!r} is not an ISO-8601 timestamp") from None
            if op in ("gt", "ge"):
                self.floors[attr] = max(bound, self.floors.get(attr, bound))
            cmp = {
                "eq": lambda a, b: a == b,
                "gt": lambda a, b: a > b,
                "ge": lambda a, b: a >= b,
                "lt": lambda a, b: a < b,
                "le": lambda a, b: a <= b,
            }[op]

            def date_pred(get: Callable[[str], Any]) -> bool:
                v = get(attr)
                # Millisecond precision, like the wire format: a client echoing a timestamp it
                # received with `gt` must not get that same record back.
                return v is not None and cmp(int(v * 1000), round(bound * 1000))  # as Org.iso prints

            return date_pred
        if op == "eq":
            return lambda get: get(attr) == literal_value
        if op == "sw":
            low = str(literal_value).lower()
            return lambda get: isinstance(get(attr), str) and get(attr).lower().startswith(low)
        if op == "co":
            low = str(literal_value).lower()
            return lambda get: isinstance(get(attr), str) and low in get(attr).lower()
        cmp2 = {
            "gt": lambda a, b: a > b,
            "ge": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "le": lambda a, b: a <= b,
        }[op]
        return lambda get: get(attr) is not None and cmp2(str(get(attr)), str(literal_value))


EQ = {"eq"}
RANGE = {"eq", "gt", "ge", "lt", "le"}
USER_FILTER = {
    "status": EQ,
    "lastUpdated": RANGE,
    "id": EQ,
    "profile.login": EQ,
    "profile.email": EQ,
    "profile.firstName": EQ,
    "profile.lastName": EQ,
}
SEARCH_OPS = {"eq", "sw", "co", "gt", "ge", "lt", "le", "pr"}
# Users: any profile attribute and these (§3.1 Users list); anything else is refused.
USER_SEARCH = {
    **{a: SEARCH_OPS for a in ("id", "status", "created", "activated", "statusChanged", "lastUpdated", "type.id")},
    "profile.*": SEARCH_OPS,
}
GROUP_FILTER = {"id": EQ, "type": EQ, "lastUpdated": RANGE, "lastMembershipUpdated": RANGE}
# Groups: every property except `_embedded`, `_links` and `objectClass` (§3.1 Groups list).
GROUP_SEARCH: dict[str, set[str]] = {
    "*": SEARCH_OPS, "objectClass": set(), "_links": set(), "_links.*": set(), "_embedded": set(),
    "_embedded.*": set(),
}  # fmt: skip
LOG_FILTER = {"eventType": {"eq", "sw", "co"}, "target.id": EQ, "actor.id": EQ, "outcome.result": EQ}


def _dig(record: dict[str, Any], path: str) -> Any:
    cur: Any = record
    for key in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


# --- rate limiting ---------------------------------------------------------------------------------


class RateWindow:
    """A fixed-window counter per endpoint family, like Okta's per-minute org limits. The limit
    differs per endpoint in Okta (500 vs 1000 in recorded headers, §3.1): `limits` gives a bucket
    its own, the others have `limit`."""

    def __init__(self, limit: int, window: float, limits: dict[str, int] | None = None) -> None:
        self.limit = limit
        self.limits: dict[str, int] = dict(limits or {})
        self.window = window
        self._buckets: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def limit_of(self, bucket: str) -> int:
        return self.limits.get(bucket, self.limit)

    def hit(self, bucket: str, now: float) -> tuple[bool, int, int, int]:
        """Count one request: (allowed, limit, remaining, reset epoch seconds)."""
        limit = self.limit_of(bucket)
        with self._lock:
            start, count = self._buckets.get(bucket, (now, 0))
            if now >= start + self.window:
                start, count = now, 0
            count += 1
            self._buckets[bucket] = (start, count)
            reset = math.ceil(start + self.window)
            return count <= limit, limit, max(0, limit - count), reset

    def peek(self, bucket: str, now: float) -> tuple[int, int]:
        limit = self.limit_of(bucket)
        with self._lock:
            start, count = self._buckets.get(bucket, (now, 0))
            if now >= start + self.window:
                start, count = now, 0
            return max(0, limit - count), math.ceil(start + self.window)

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()


# The OAuth scope each API needs (an SSWS API token has its admin's rights instead).
_SCOPES = {"/api/v1/users": "okta.users.read", "/api/v1/groups": "okta.groups.read", "/api/v1/logs": "okta.logs.read"}


def _scope_needed(path: str) -> str | None:
    return _SCOPES.get(_bucket(path))


class _NonceNeeded(ValueError):
    """A DPoP proof at the token endpoint without the server's current nonce."""


def _dpop_refused(status: int, error: str, description: str) -> Response:
    # An OAuth error body, as the token endpoint writes it (RFC 6749 §5.2, RFC 9449 §7).
    resp = Response(status, {"error": error, "error_description": description})
    if status == 401:
        resp.headers.append(("WWW-Authenticate", f'DPoP error="{error}", error_description="{description}"'))
    return resp


def _bucket(path: str) -> str:
    for prefix in ("/api/v1/users", "/api/v1/groups", "/api/v1/logs", "/oauth2/v1/token"):
        if path.startswith(prefix):
            return prefix
    return "/api/v1"


# --- the emulator ----------------------------------------------------------------------------------


class OktaEmulator(Emulator):
    name = "okta"

    def __init__(
        self,
        org: Org,
        *,
        api_token: str = API_TOKEN,
        rate_limit: int = 600,
        rate_window: float = 60.0,
        rate_limits: dict[str, int] | None = None,
    ) -> None:
        super().__init__(org)
        self.api_token = api_token
        # `rate_limits`: a bucket ("/api/v1/users", "/api/v1/groups", "/api/v1/logs",
        # "/oauth2/v1/token") → its own per-window limit; the others have `rate_limit`.
        self.rates = RateWindow(rate_limit, rate_window, rate_limits)
        # Switches for tests.
        self.status_overrides: dict[int, str] = {}  # Person.n → STAGED, PROVISIONED, RECOVERY, …
        self.malformed_users: set[int] = set()  # Person.n served with a record the SDK rejects
        self.rate_limit_headers = True  # faulted 429s carry X-Rate-Limit-* (False: bare 429)
        self.fault_reset_in = 1  # a faulted 429 says the window resets this many seconds from now
        self.app_group_every = 5  # every 5th Org group is an APP_GROUP (imported from AD)
        self.ssws_space_required = False  # True: only the documented `SSWS {token}` form is accepted
        self.dpop_required = False  # True: the OAuth app requires DPoP-bound tokens (RFC 9449)
        self.dpop_nonce = "emu-nonce-" + secrets.token_urlsafe(16)  # what `use_dpop_nonce` hands out
        self._dpop_jtis: set[str] = set()  # proofs already used (a replay is refused)
        self._assertion_jtis: set[tuple[str, str]] = set()  # (client_id, jti) of assertions read
        self._dpop_tokens: dict[str, str] = {}  # DPoP-bound access token → its key's JWK thumbprint
        # Okta id → outcome.result (None: no outcome) of a deletion attempt to log, the record kept.
        self.failed_deletes: dict[str, str | None] = {}
        self._logged_failed_deletes: set[str] = set()
        # OAuth service app: client_id → public key (PEM) for private_key_jwt; issued tokens.
        self.oauth_clients: dict[str, Any] = {}
        self._access_tokens: dict[str, tuple[float, frozenset[str]]] = {}  # token → expiry, scopes
        # System Log, derived from Org changes: persisted in arrival order.
        self._events: list[dict[str, Any]] = []
        self._seen_people: dict[int, tuple[str | None, int]] = {}  # n → (status or None if gone, version)
        self._seen_member_version = 0
        self._seen_deleted_groups: set[int] = set()  # Group.n already logged as deleted
        self._log_lock = threading.Lock()
        with org.lock:
            for p in org.people.values():
                self._seen_people[p.n] = (None if not p.visible else self.status_of(p), p.version)
            self._seen_member_version = org.version
            self._seen_deleted_groups = {g.n for g in org.groups.values() if g.deleted}
        self.route("GET", r"/api/v1/users", self._list_users)
        self.route("GET", r"/api/v1/users/(?P<id>[^/]+)", self._get_user)
        self.route("GET", r"/api/v1/groups", self._list_groups)
        self.route("GET", r"/api/v1/groups/(?P<id>[^/]+)", self._get_group)
        self.route("GET", r"/api/v1/groups/(?P<id>[^/]+)/users", self._list_group_users)
        self.route("GET", r"/api/v1/logs", self._list_logs)
        self.route("POST", r"/oauth2/v1/token", self._token)
        self.switch_route(
            "/_emulator/okta",
            {
                "rate_limit_headers": flag,
                "fault_reset_in": int,
                "status_overrides": lambda v: {int(n): one_of(*STATUSES)(s) for n, s in dict(v).items()},
                "malformed_users": lambda v: {int(n) for n in v},
                "app_group_every": int,
                "ssws_space_required": flag,
                "dpop_required": flag,
                "failed_deletes": lambda v: {
                    str(k): None if r is None else one_of(*OUTCOMES)(r) for k, r in dict(v).items()
                },
            },
        )

    # --- vendor wording ---------------------------------------------------------------------------

    def authenticate(self, req: Request) -> Response | None:
        if req.path == "/oauth2/v1/token":
            return None
        auth = req.headers.get("Authorization") or ""
        # The SDK sends `SSWS<token>` without the space (sdk-notes §2 pitfall 3): accepted unless
        # `ssws_space_required`, since nothing says real Okta takes that form.
        if auth.startswith("SSWS") and (auth.startswith("SSWS ") or not self.ssws_space_required):
            if secrets.compare_digest(auth[4:].strip(), self.api_token):
                return None
        elif auth.startswith(("Bearer ", "DPoP ")):
            scheme, _, token = auth.partition(" ")
            token = token.strip()
            with self._lock:
                expires, granted = self._access_tokens.get(token, (0.0, frozenset()))
                bound = self._dpop_tokens.get(token)
            # A DPoP-bound token is good only as `DPoP <token>` with a proof of its key (RFC 9449
            # §7.1); a Bearer token never as `DPoP`.
            if bound is not None or scheme == "DPoP":
                if bound is None or scheme != "DPoP":
                    return self.unauthorized(req)
                try:
                    jkt = self._dpop_proof(req, token)
                except ValueError as exc:
                    return _dpop_refused(401, "invalid_dpop_proof", str(exc))
                if jkt != bound:
                    return _dpop_refused(401, "invalid_dpop_proof", "The DPoP proof key does not match the token.")
            if expires > time.time():
                needed = _scope_needed(req.path)
                if needed is None or needed in granted:
                    return None
                return self.insufficient_scope(needed)
        return self.unauthorized(req)

    def insufficient_scope(self, needed: str) -> Response:
        # A valid OAuth token without the scope the endpoint needs: 403, not 401.
        resp = _error(403, "E0000006", "You do not have permission to perform the requested action")
        resp.headers.append((
            "WWW-Authenticate",
            f'Bearer realm="IdpMyAccountAPI", scope="{needed}", error="insufficient_scope", '
            'error_description="The access token provided does not contain the required scopes."',
        ))
        return resp

    def unauthorized(self, req: Request) -> Response:
        return _error(401, "E0000011", "Invalid token provided")

    def not_found(self, req: Request) -> Response:
        return _error(404, "E0000007", f"Not found: Resource not found: {req.path} (path)")

    def server_error(self, req: Request, status: int) -> Response:
        return _error(status, "E0000009", "Internal Server Error")

    def rate_limited(self, req: Request) -> Response:
        resp = _error(429, "E0000047", "API call exceeded rate limit due to too many requests.")
        if self.rate_limit_headers:
            resp.headers += [
                ("x-rate-limit-limit", str(self.rates.limit_of(_bucket(req.path)))),
                ("x-rate-limit-remaining", "0"),
                ("x-rate-limit-reset", str(int(time.time()) + self.fault_reset_in)),
            ]
        resp.no_rate_headers = True  # type: ignore[attr-defined]  # the fault decides the headers
        return resp

    def handle(self, req: Request) -> tuple[Response, str | None]:
        if self.is_control(req):
            return super().handle(req)
        bucket = _bucket(req.path)
        allowed, limit, remaining, reset = self.rates.hit(bucket, time.time())
        if not allowed:
            with self._lock:
                self.requests += 1
                self.request_log.append((req.method, req.raw_path))
            resp = _error(429, "E0000047", "API call exceeded rate limit due to too many requests.")
            wire = None
        else:
            resp, wire = super().handle(req)
        if not getattr(resp, "no_rate_headers", False):
            resp.headers += [
                ("x-rate-limit-limit", str(limit)),
                ("x-rate-limit-remaining", str(remaining)),
                ("x-rate-limit-reset", str(reset)),
            ]
        resp.headers.append(("X-Okta-Request-Id", secrets.token_hex(10)))
        return resp, wire

    # --- rendering --------------------------------------------------------------------------------

    def status_of(self, p: Person) -> str:
        override = self.status_overrides.get(p.n)
        if override:
            return override
        if p.state == "active":
            return "ACTIVE"
        if p.inactive_reason == "suspended":
            return "SUSPENDED"
        return "DEPROVISIONED"  # terminated, archived

    def _profile(self, p: Person) -> dict[str, Any]:
        profile: dict[str, Any] = {
            "login": p.username,
            "firstName": p.given,
            "lastName": p.family,
            "displayName": p.display,
            "employeeNumber": p.employee_number,
            "city": p.location,
            "costCenter": p.cost_center,
            "mobilePhone": None,
        }
        if p.email:
            profile["email"] = p.email
            profile["secondEmail"] = p.email.replace("@", "+alt@") if p.n % 4 == 0 else None
        if p.title:
            profile["title"] = p.title
        if p.department:
            profile["department"] = p.department
        # managerId is a plain profile attribute in Okta: deleting the manager does not clear it.
        manager = self.org.people.get(p.manager) if p.manager else None
        if manager is not None:
            profile["managerId"] = user_id(manager.n)
            profile["manager"] = manager.display
        return profile

    def _last_updated(self, p: Person) -> float:
        """`lastUpdated`: the person's last change, or their manager's last rename when later.
        `profile.manager` is the manager's display name, a plain attribute that Okta changes only
        by a write (an HR import renaming the manager), which stamps the record. Rendered from the
        manager's current name, it must move `lastUpdated` with it, or a `lastUpdated` filter
        misses the change."""
        boss = self.org.people.get(p.manager) if p.manager else None
        return p.updated_at if boss is None else max(p.updated_at, boss.renamed_at)

    def user_json(self, p: Person) -> dict[str, Any]:
        iso = Org.iso
        status = self.status_of(p)
        uid = user_id(p.n)
        record = {
            "id": uid,
            "status": status,
            "created": iso(p.created_at),
            "activated": iso(p.created_at) if status not in ("STAGED",) else None,
            "statusChanged": iso(p.updated_at) if status != "ACTIVE" else iso(p.created_at),
            # Volatile: changes on every read, so a connector that keeps it sees phantom updates.
            "lastLogin": iso(time.time() - (p.n % 3600)) if status == "ACTIVE" else None,
            "lastUpdated": iso(self._last_updated(p)),
            "passwordChanged": iso(p.created_at) if status not in ("STAGED", "PROVISIONED") else None,
            "type": {"id": USER_TYPE},
            "profile": self._profile(p),
            "credentials": {"provider": {"type": "OKTA", "name": "OKTA"}},
            "_links": {"self": {"href": f"{self.base_url}/api/v1/users/{uid}"}},
        }
        if p.n in self.malformed_users:
            # What a real org can hold and the SDK's strict models reject (sdk-notes §2 pitfall 6).
            record["profile"]["login"] = "abc"
            record["status"] = "ACTIVATING_SOMEHOW"
        return record

    def _user_getter(self, p: Person) -> Callable[[str], Any]:
        cache: dict[str, Any] = {}

        def get(attr: str) -> Any:
            if attr == "id":
                return user_id(p.n)
            if attr == "status":
                return self.status_of(p)
            if attr == "lastUpdated":
                return self._last_updated(p)
            if attr == "created":
                return p.created_at
            if attr == "statusChanged":
                return p.updated_at if self.status_of(p) != "ACTIVE" else p.created_at
            if attr == "activated":  # as served: a STAGED user was never activated
                return p.created_at if self.status_of(p) != "STAGED" else None
            if attr == "type.id":
                return USER_TYPE
            if attr.startswith("profile."):
                if "profile" not in cache:
                    cache["profile"] = self._profile(p)
                return cache["profile"].get(attr[8:])
            return None

        return get

    def _groups_view(self) -> list[tuple[int, str]]:
        """(Group.n, type) of every listed group, Everyone first (EVERYONE = 0)."""
        out = [(EVERYONE, "BUILT_IN")]
        for g in self.org.listed_groups():
            out.append((g.n, "APP_GROUP" if g.n % self.app_group_every == 0 else "OKTA_GROUP"))
        return out

    def _group_times(self, n: int) -> tuple[float, float, float]:
        """(created, lastUpdated, lastMembershipUpdated) of a served group."""
        org = self.org
        if n == EVERYONE:
            first = min((p.created_at for p in org.people.values()), default=0.0)
            # Everyone's members change with every hire and every deletion.
            changed = max((p.created_at if not p.deleted else p.updated_at for p in org.people.values()), default=first)
            return first, first, changed
        g = org.groups[n]
        members_at = g.members_updated_at
        # Okta groups do not nest: a change in a subgroup changes this group's (flattened) members.
        seen, stack = {n}, list(g.subgroups)
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            sub = org.groups[cur]
            if not sub.deleted:
                members_at = max(members_at, sub.members_updated_at)
                stack.extend(sub.subgroups)
        return g.created_at, g.updated_at, members_at

    def group_json(self, n: int, gtype: str) -> dict[str, Any]:
        iso = Org.iso
        created, updated, members_at = self._group_times(n)
        gid = group_id(n)
        if n == EVERYONE:
            profile: dict[str, Any] = {"name": "Everyone", "description": "All users in your organization"}
        else:
            g = self.org.groups[n]
            profile = {"name": g.name, "description": g.description}
            if gtype == "APP_GROUP":
                profile.update(
                    {
                        "samAccountName": g.name.replace(" ", ""),
                        "windowsDomainQualifiedName": f"CORP\\{g.name.replace(' ', '')}",
                        "groupType": "Security",
                        "groupScope": "Global",
                    }
                )
        base = self.base_url
        return {
            "id": gid,
            "created": iso(created),
            "lastUpdated": iso(updated),
            "lastMembershipUpdated": iso(members_at),
            "objectClass": ["okta:windows_security_principal"] if gtype == "APP_GROUP" else ["okta:user_group"],
            "type": gtype,
            "profile": profile,
            "_links": {
                "users": {"href": f"{base}/api/v1/groups/{gid}/users"},
                "apps": {"href": f"{base}/api/v1/groups/{gid}/apps"},
            },
        }

    # --- paging helpers ---------------------------------------------------------------------------

    def _limit(self, req: Request, default: int, maximum: int) -> int | Response:
        raw = req.arg("limit")
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            return _error(400, "E0000001", "Api validation failed: limit", [f"limit: {raw!r} is not a number"])
        return max(1, min(value, maximum))

    def _links(self, req: Request, path: str, params: dict[str, str], next_after: str | None) -> list[tuple[str, str]]:
        base = self.base_url
        self_q = urlencode({k: v for k, v in params.items() if v is not None})
        links = [("link", f'<{base}{path}{"?" + self_q if self_q else ""}>; rel="self"')]
        if next_after is not None:
            nq = urlencode({**{k: v for k, v in params.items() if v is not None and k != "after"}, "after": next_after})
            # rel="next" LAST: the SDK keeps headers in a dict and the last Link wins. Names in
            # lower case, as Okta writes them (§3.1): a client must not depend on the case.
            links.append(("link", f'<{base}{path}?{nq}>; rel="next"'))
        return links

    # --- users ------------------------------------------------------------------------------------

    def _list_users(self, req: Request) -> Response:
        q = req.arg("q") or None
        # `q` is a quick lookup, not a listing: 10 results by default and never a next page.
        limit = self._limit(req, 10 if q else 200, 200)
        if isinstance(limit, Response):
            return limit
        filt, search = req.arg("filter"), req.arg("search")
        parsed = _predicate(filt, search, USER_FILTER, USER_SEARCH)
        if isinstance(parsed, Response):
            return parsed
        predicate, floors = parsed
        if q:
            predicate = _and(predicate, _starts_with(q, ("profile.firstName", "profile.lastName", "profile.email")))
        include_deprovisioned = bool(filt or search)
        after = req.arg("after")
        start = 1
        if after:
            n_after = parse_id(after, "u")
            if n_after is None:
                return _error(400, "E0000001", "Api validation failed: after", ["after: invalid cursor"])
            start = n_after + 1
        out: list[dict[str, Any]] = []
        last_n: int | None = None
        more = False
        org = self.org
        people = org.people
        # Okta answers a `lastUpdated gt` search from an index. Without one, running the filter's
        # predicate on each of 100,000 people took 0.2 s, most of a no-change incremental run's
        # time here: whoever surely changed before the bound is passed over first. A millisecond
        # early, as the predicate compares milliseconds; anyone nearer is left to it.
        floor = floors["lastUpdated"] - 0.001 if "lastUpdated" in floors else None
        with org.lock:
            top = next(reversed(people), 0) if people else 0
            n = start
            while n <= top:
                p = people.get(n)
                n += 1
                if p is None or not p.visible:
                    continue
                if floor is not None and p.updated_at < floor:
                    boss = people.get(p.manager) if p.manager else None
                    if boss is None or boss.renamed_at < floor:  # `_last_updated`
                        continue
                if not include_deprovisioned and self.status_of(p) == "DEPROVISIONED":
                    continue
                if predicate is not None and not predicate(self._user_getter(p)):
                    continue
                if len(out) == limit:
                    more = True
                    break
                out.append(self.user_json(p))
                last_n = p.n
        params = {"limit": str(limit), "filter": filt, "search": search, "q": q, "after": after}
        next_after = user_id(last_n) if more and last_n is not None and not q else None
        return Response(200, out, self._links(req, "/api/v1/users", params, next_after))

    def _person_by_id(self, value: str) -> Person | None:
        n = parse_id(value, "u")
        if n is None:
            # Okta also accepts the login here.
            with self.org.lock:
                for p in self.org.people.values():
                    if p.visible and p.username == value:
                        return p
            return None
        p = self.org.people.get(n)
        return p if p is not None and p.visible else None

    def _get_user(self, req: Request) -> Response:
        with self.org.lock:
            p = self._person_by_id(req.params["id"])
            if p is None:
                return _error(404, "E0000007", f"Not found: Resource not found: {req.params['id']} (User)")
            return Response(200, self.user_json(p))

    # --- groups -----------------------------------------------------------------------------------

    def _list_groups(self, req: Request) -> Response:
        q = req.arg("q") or None
        limit = self._limit(req, 300 if q else 10000, 10000)
        if isinstance(limit, Response):
            return limit
        filt, search = req.arg("filter"), req.arg("search")
        parsed = _predicate(filt, search, GROUP_FILTER, GROUP_SEARCH)
        if isinstance(parsed, Response):
            return parsed
        predicate = parsed[0]
        if q:
            predicate = _and(predicate, _starts_with(q, ("profile.name",)))
        after = req.arg("after")
        start = -1
        if after:
            n_after = parse_id(after, "g")
            if n_after is None:
                return _error(400, "E0000001", "Api validation failed: after", ["after: invalid cursor"])
            start = n_after
        out: list[dict[str, Any]] = []
        more, last_n = False, None
        with self.org.lock:
            for n, gtype in self._groups_view():
                if n <= start:
                    continue
                record = self.group_json(n, gtype)
                if predicate is not None:

                    def get(attr: str, r: dict[str, Any] = record) -> Any:
                        v = _dig(r, attr)
                        return parse_time(v) if attr in DATE_ATTRS and isinstance(v, str) else v

                    if not predicate(get):
                        continue
                if len(out) == limit:
                    more = True
                    break
                out.append(self._expanded(record, n, req.arg("expand")))
                last_n = n
        params = {
            "limit": req.arg("limit"), "filter": filt, "search": search, "q": q, "expand": req.arg("expand"),
            "after": after,
        }  # fmt: skip
        next_after = group_id(last_n) if more and last_n is not None and not q else None
        return Response(200, out, self._links(req, "/api/v1/groups", params, next_after))

    def _group_n(self, value: str) -> int | None:
        n = parse_id(value, "g")
        if n is None:
            return None
        if n == EVERYONE:
            return n
        g = self.org.groups.get(n)
        return n if g is not None and not g.deleted else None

    def _get_group(self, req: Request) -> Response:
        with self.org.lock:
            n = self._group_n(req.params["id"])
            if n is None:
                return _error(404, "E0000007", f"Not found: Resource not found: {req.params['id']} (UserGroup)")
            gtype = dict(self._groups_view())[n]
            return Response(200, self._expanded(self.group_json(n, gtype), n, req.arg("expand")))

    def _expanded(self, record: dict[str, Any], n: int, expand: str | None) -> dict[str, Any]:
        """`expand=stats`: the group's member count in `_embedded.stats.usersCount` (§3.1 Groups
        list; `expand=app`, whose `_embedded.app` shape the reference does not give, is ignored)."""
        if "stats" not in (expand or "").split(","):
            return record
        if n == EVERYONE:
            count = sum(1 for p in self.org.people.values() if p.visible)
        else:
            count = len(self.org.transitive_members(n))  # flattened, as the member listing serves them
        return {**record, "_embedded": {"stats": {"usersCount": count}}}

    def _list_group_users(self, req: Request) -> Response:
        limit = self._limit(req, 1000, 10000)
        if isinstance(limit, Response):
            return limit
        after = req.arg("after")
        start = 0
        if after:
            n_after = parse_id(after, "u")
            if n_after is None:
                return _error(400, "E0000001", "Api validation failed: after", ["after: invalid cursor"])
            start = n_after
        with self.org.lock:
            n = self._group_n(req.params["id"])
            if n is None:
                return _error(404, "E0000007", f"Not found: Resource not found: {req.params['id']} (UserGroup)")
            if n == EVERYONE:
                members = [p.n for p in self.org.people.values() if p.visible and p.n > start]
            else:
                members = sorted(m for m in self.org.transitive_members(n) if m > start)
            page = members[: limit + 1]
            more = len(page) > limit
            page = page[:limit]
            out = [self.user_json(self.org.people[m]) for m in page]
        params = {"limit": req.arg("limit"), "after": after}
        next_after = user_id(page[-1]) if more and page else None
        return Response(200, out, self._links(req, f"/api/v1/groups/{req.params['id']}/users", params, next_after))

    # --- System Log -------------------------------------------------------------------------------

    def _user_target(self, p: Person) -> dict[str, Any]:
        return {
            "id": user_id(p.n),
            "type": "User",
            "alternateId": p.username,
            "displayName": p.display,
            "detailEntry": None,
        }

    def _group_target(self, group: Group) -> dict[str, Any]:
        return {
            "id": group_id(group.n),
            "type": "UserGroup",
            "alternateId": "unknown",
            "displayName": group.name,
        }

    def _everyone_target(self) -> dict[str, Any]:
        return {"id": group_id(EVERYONE), "type": "UserGroup", "alternateId": "unknown", "displayName": "Everyone"}

    def _append_event(
        self,
        event_type: str,
        at: float,
        targets: list[dict[str, Any]],
        message: str,
        result: str | None = "SUCCESS",
    ) -> None:
        """`result`: the event's `outcome.result`; None for an event without `outcome`."""
        seq = len(self._events) + 1
        self._events.append(
            {
                "uuid": f"f7909990-0000-4000-8000-{seq:012d}",
                "published": Org.iso(at),
                "eventType": event_type,
                "version": "0",
                "severity": "INFO",
                "displayMessage": message,
                "actor": {
                    "id": "00uadminemulator",
                    "type": "User",
                    "alternateId": "admin@" + self.org.domain,
                    "displayName": "Admin",
                },
                "outcome": {"result": result, "reason": None if result == "SUCCESS" else "EMULATOR_SWITCH"},
                "target": targets,
                "transaction": {"type": "WEB", "id": f"tx{seq}", "detail": {}},
                "_seq": seq,
                "_persisted": time.time(),  # what a polling request's `since` is compared with
            }
        )
        if result is None:
            del self._events[-1]["outcome"]

    def sync_log(self) -> None:
        """Turn Org changes since the last call into System Log events (arrival order): people's
        lifecycle and profile changes, membership changes, then group deletions. Changes made before
        the emulator was built are not logged."""
        org = self.org
        with self._log_lock, org.lock:
            changed = []
            for p in org.people.values():
                seen = self._seen_people.get(p.n)
                if seen is None or seen[1] != p.version:
                    changed.append(p)
            changed.sort(key=lambda p: p.version)
            for p in changed:
                before = self._seen_people.get(p.n)
                now_status = self.status_of(p) if p.visible else None
                target = [self._user_target(p)]
                if before is None:
                    # Hired since the last call, and maybe changed or deleted since too: the
                    # hire is logged, then whatever followed it (a deletion must not go unlogged).
                    hired = self.status_overrides.get(p.n) or "ACTIVE"  # Org hires are active
                    self._append_event("user.lifecycle.create", p.created_at, target, "Create Okta user")
                    if hired == "ACTIVE":
                        self._append_event("user.lifecycle.activate", p.created_at, target, "Activate Okta user")
                    # Okta puts every new user in Everyone; logging that as a membership change is
                    # not in directory-apis.md (it is believed, not checked): the connector must
                    # stand either way, and with it logged the cost of ignoring it shows.
                    self._append_event(
                        "group.user_membership.add",
                        p.created_at,
                        [*target, self._everyone_target()],
                        "Add user to group membership",
                    )
                    before = (hired, p.version)
                    if p.updated_at == p.created_at:  # not changed since the hire
                        self._seen_people[p.n] = (now_status, p.version)
                        continue
                if now_status is None and before[0] is not None:
                    self._append_event("user.lifecycle.delete.initiated", p.updated_at, target, "Delete Okta user")
                    self._append_event("user.lifecycle.delete.completed", p.updated_at, target, "Delete Okta user")
                elif now_status != before[0]:
                    kind = {
                        "DEPROVISIONED": "user.lifecycle.deactivate",
                        "SUSPENDED": "user.lifecycle.suspend",
                        "ACTIVE": "user.lifecycle.unsuspend"
                        if before[0] == "SUSPENDED"
                        else "user.lifecycle.reactivate",
                    }.get(now_status or "", "user.lifecycle.update")
                    self._append_event(kind, p.updated_at, target, "Change Okta user status")
                else:
                    self._append_event("user.account.update_profile", p.updated_at, target, "Update user profile")
                self._seen_people[p.n] = (now_status, p.version)
            for change in org.member_changes_since(self._seen_member_version):
                group = org.groups[change.group]
                gtarget = self._group_target(group)
                people = (
                    [change.member] if change.member_kind == "user" else sorted(org.transitive_members(change.member))
                )
                kind = "group.user_membership.add" if change.added else "group.user_membership.remove"
                for m in people:
                    person = org.people[m]
                    self._append_event(
                        kind,
                        change.at,
                        [self._user_target(person), gtarget],
                        "Add user to group membership" if change.added else "Remove user from group membership",
                    )
            self._seen_member_version = org.version
            # After the membership removals a deletion causes (the parents' flattened members).
            gone = [g for g in org.groups.values() if g.deleted and g.n not in self._seen_deleted_groups]
            for group in sorted(gone, key=lambda g: g.version):
                self._append_event(
                    "group.lifecycle.delete", group.updated_at, [self._group_target(group)], "Delete Okta group"
                )
                self._seen_deleted_groups.add(group.n)
            # Deletion attempts that did not delete (the `failed_deletes` switch): the record stays.
            for okta_id, result in self.failed_deletes.items():
                if okta_id in self._logged_failed_deletes:
                    continue
                self._logged_failed_deletes.add(okta_id)
                n = parse_id(okta_id, "u")
                if n is not None and n in org.people:
                    target = [self._user_target(org.people[n])]
                    for kind in ("user.lifecycle.delete.initiated", "user.lifecycle.delete.completed"):
                        self._append_event(kind, time.time(), target, "Delete Okta user", result)
                elif (g := parse_id(okta_id, "g")) is not None and g in org.groups:
                    target = [self._group_target(org.groups[g])]
                    self._append_event("group.lifecycle.delete", time.time(), target, "Delete Okta group", result)

    def _list_logs(self, req: Request) -> Response:
        limit = self._limit(req, 100, 1000)
        if isinstance(limit, Response):
            return limit
        since, until, after, filt = req.arg("since"), req.arg("until"), req.arg("after"), req.arg("filter")
        try:
            until_ts = parse_time(until) if until else None
            # Without `since`: 7 days before `until`, or before now for a polling request (§3.1).
            since_ts = parse_time(since) if since else (until_ts or time.time()) - 7 * 86400
        except ValueError:
            return _error(400, "E0000001", "Api validation failed: since/until", ["not an ISO-8601 timestamp"])
        if since_ts < time.time() - 180 * 86400:
            return _error(400, "E0000053", "Invalid value for since parameter.", ["since is older than 180 days"])
        predicate: Predicate | None = None
        if filt:
            try:
                predicate = Expr(filt, LOG_FILTER).predicate
            except FilterError as exc:
                return _error(400, "E0000053", "Invalid value for filter parameter.", [str(exc)])
        start_seq = 0
        if after:
            try:
                start_seq = int(after.rsplit("_", 1)[1])
            except (IndexError, ValueError):
                return _error(400, "E0000001", "Api validation failed: after", ["after: invalid cursor"])
        self.sync_log()
        retained_from = time.time() - 90 * 86400
        params = {
            "since": since, "until": until, "filter": filt, "limit": req.arg("limit"),
            "sortOrder": req.arg("sortOrder"), "after": after,
        }  # fmt: skip
        if until_ts is not None:
            return self._bounded_logs(req, params, since_ts, until_ts, retained_from, predicate, limit)
        out: list[dict[str, Any]] = []
        last_seq = start_seq
        with self._log_lock:
            events = self._events
            for ev in events[start_seq:]:
                last_seq = ev["_seq"]
                # A polling request (no `until`) filters by when the event was stored, not by
                # `published`: an event stored late is not skipped (§3.1 System Log).
                if ev["_persisted"] < since_ts:
                    continue
                if parse_time(ev["published"]) < retained_from:  # the log keeps 90 days (§3.1 System Log)
                    continue
                if predicate is not None and not predicate(lambda a, e=ev: _dig(e, a)):
                    continue
                if len(out) == limit:
                    last_seq -= 1
                    break
                out.append({k: v for k, v in ev.items() if not k.startswith("_")})
        # Polling: always a next link, pages may be empty (§3.1 System Log).
        return Response(200, out, self._links(req, "/api/v1/logs", params, f"{int(time.time() * 1000)}_{last_seq}"))

    def _bounded_logs(
        self,
        req: Request,
        params: dict[str, str | None],
        since_ts: float,
        until_ts: float,
        retained_from: float,
        predicate: Predicate | None,
        limit: int,
    ) -> Response:
        """A bounded request (`since` and `until`): the events published in [since, until), ordered
        by `published` (`sortOrder` ASCENDING or DESCENDING), in finite pages. Its `after` is
        `<published ms>_<seq>` of the last event served: the next page starts past it in that order."""
        descending = (req.arg("sortOrder") or "ASCENDING").upper() == "DESCENDING"
        position: tuple[int, int] | None = None
        if params["after"]:
            try:
                ms, seq = params["after"].split("_")
                position = (int(ms), int(seq))
            except ValueError:
                return _error(400, "E0000001", "Api validation failed: after", ["after: invalid cursor"])
        with self._log_lock:
            window = []
            for ev in self._events:
                published = parse_time(ev["published"])
                if not since_ts <= published < until_ts or published < retained_from:
                    continue
                if predicate is not None and not predicate(lambda a, e=ev: _dig(e, a)):
                    continue
                window.append(((round(published * 1000), ev["_seq"]), ev))
        window.sort(key=lambda item: item[0], reverse=descending)
        if position is not None:
            window = [item for item in window if (item[0] < position if descending else item[0] > position)]
        page = window[:limit]
        out = [{k: v for k, v in ev.items() if not k.startswith("_")} for _, ev in page]
        next_after = "{}_{}".format(*page[-1][0]) if len(window) > limit else None
        return Response(200, out, self._links(req, "/api/v1/logs", params, next_after))

    # --- OAuth service app ------------------------------------------------------------------------

    def _token(self, req: Request) -> Response:
        from urllib.parse import parse_qs

        form = {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "client_credentials":
            return Response(
                400,
                {
                    "error": "unsupported_grant_type",
                    "error_description": "grant_type must be client_credentials",
                },
            )
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return Response(400, {"error": "invalid_client", "error_description": "client_assertion_type missing"})
        assertion = form.get("client_assertion", "")
        try:
            import jwt

            unverified = jwt.decode(assertion, options={"verify_signature": False})
            client_id = unverified.get("iss")
            key = self.oauth_clients.get(client_id)
            if key is None:
                raise jwt.InvalidTokenError("unknown client")
            claims = jwt.decode(
                assertion, key, algorithms=["RS256", "ES256"], audience=f"{self.base_url}/oauth2/v1/token"
            )
            if claims.get("sub") != client_id:
                raise jwt.InvalidTokenError("sub must equal iss")
        except Exception as exc:  # any bad assertion is the same 401 to the client
            return Response(
                401,
                {
                    "error": "invalid_client",
                    "error_description": f"The client_assertion is invalid: {type(exc).__name__}",
                },
            )
        # Okta keeps the `jti` of every assertion it has read (RFC 7523 §3 allows it) and refuses it
        # again, even when its first answer was an error (`use_dpop_nonce`…) or never arrived: a
        # client resending a token request must sign a new assertion (the SDK's own comments).
        used = (client_id, str(claims["jti"])) if "jti" in claims else None
        with self._lock:
            replayed = used is not None and used in self._assertion_jtis
            if used is not None:
                self._assertion_jtis.add(used)
        if replayed:
            return Response(
                401,
                {"error": "invalid_client", "error_description": "The client_assertion token has already been used."},
            )
        scopes = (form.get("scope") or "").split()
        unknown = [s for s in scopes if s not in ("okta.users.read", "okta.groups.read", "okta.logs.read")]
        if unknown:
            return Response(400, {"error": "invalid_scope", "error_description": f"unknown scopes {unknown}"})
        jkt = None
        if self.dpop_required:
            if not req.headers.get("DPoP"):
                return _dpop_refused(400, "invalid_dpop_proof", "The DPoP proof JWT header is missing.")
            try:
                jkt = self._dpop_proof(req, None)
            except _NonceNeeded:
                resp = _dpop_refused(400, "use_dpop_nonce", "Authorization server requires nonce in DPoP proof.")
                resp.headers.append(("DPoP-Nonce", self.dpop_nonce))
                return resp
            except ValueError as exc:
                return _dpop_refused(400, "invalid_dpop_proof", str(exc))
        token = "emu-at-" + secrets.token_urlsafe(24)
        with self._lock:
            self._access_tokens[token] = (time.time() + 3600, frozenset(scopes))
            if jkt is not None:
                self._dpop_tokens[token] = jkt
        return Response(
            200,
            {"token_type": "DPoP" if jkt else "Bearer", "expires_in": 3600, "access_token": token,
             "scope": " ".join(scopes)},
        )

    def _dpop_proof(self, req: Request, access_token: str | None) -> str:
        """The JWK thumbprint of the key that signed the request's valid DPoP proof (RFC 9449 §4.3):
        `typ` dpop+jwt, an asymmetric `alg`, a public `jwk` that verifies the signature; `htm` and
        `htu` this request's; `iat` within a minute; a `jti` never seen; at the token endpoint the
        current nonce (else `_NonceNeeded`), at the APIs `ath` = base64url(sha256(token)).
        ValueError says what is wrong."""
        import base64
        import hashlib

        import jwt
        from jwcrypto.jwk import JWK

        proof = req.headers.get("DPoP") or ""
        if not proof:
            raise ValueError("The DPoP proof JWT header is missing.")
        try:
            header = jwt.get_unverified_header(proof)
            if header.get("typ") != "dpop+jwt" or header.get("alg") not in ("RS256", "ES256", "PS256"):
                raise ValueError("The DPoP proof JWT has an invalid typ or alg.")
            jwk = header.get("jwk")
            if not isinstance(jwk, dict) or any(k in jwk for k in ("d", "p", "q", "dp", "dq", "qi")):
                raise ValueError("The DPoP proof JWT has no public jwk.")
            key = jwt.PyJWK(jwk, header["alg"]).key
            claims = jwt.decode(proof, key, algorithms=[header["alg"]], options={"require": ["iat", "jti"]})
        except ValueError:
            raise
        except Exception as exc:  # a bad signature, a malformed JWT or jwk
            raise ValueError(f"The DPoP proof JWT is invalid: {type(exc).__name__}.") from None
        if claims.get("htm") != req.method or claims.get("htu") != self.base_url + req.path:
            raise ValueError("The DPoP proof htm or htu does not match the request.")
        if not isinstance(claims.get("iat"), (int, float)) or abs(time.time() - claims["iat"]) > 60:
            raise ValueError("The DPoP proof iat is out of range.")
        if access_token is None:
            if claims.get("nonce") != self.dpop_nonce:
                raise _NonceNeeded
        else:
            digest = hashlib.sha256(access_token.encode("ascii")).digest()
            if claims.get("ath") != base64.urlsafe_b64encode(digest).rstrip(b"=").decode():
                raise ValueError("The DPoP proof ath does not match the access token.")
        with self._lock:
            if claims["jti"] in self._dpop_jtis:
                raise ValueError("The DPoP proof jti has already been used.")
            self._dpop_jtis.add(claims["jti"])
        return str(JWK(**jwk).thumbprint())

    def register_oauth_client(self, client_id: str, public_key_pem: str) -> None:
        self.oauth_clients[client_id] = public_key_pem

    # --- dirpull configuration -------------------------------------------------------------------

    def tenant_config(self, tenant: str, workdir: Path) -> dict[str, Any]:
        return {
            "provider": "okta",
            "org_url": self.base_url,
            "api_token": self.api_token,
        }


__all__ = ["API_TOKEN", "EVERYONE", "STATUSES", "OktaEmulator", "group_id", "parse_id", "user_id"]


def _predicate(
    filt: str | None, search: str | None, filter_fields: Any, search_fields: Any
) -> tuple[Predicate | None, dict[str, float]] | Response:
    """One predicate for `filter` and `search` together with their `Expr.floors`, or Okta's 400
    for either one malformed."""
    predicate: Predicate | None = None
    floors: dict[str, float] = {}
    try:
        for text, fields in ((filt, filter_fields), (search, search_fields)):
            if not text:
                continue
            expr = Expr(text, fields)
            predicate = expr.predicate if predicate is None else _and(predicate, expr.predicate)
            for attr, bound in expr.floors.items():  # both must hold: the later bound
                floors[attr] = max(bound, floors.get(attr, bound))
    except FilterError as exc:
        return _error(400, "E0000053", "Invalid value for filter or search parameter.", [str(exc)])
    return predicate, floors


def _starts_with(q: str, attrs: tuple[str, ...]) -> Predicate:
    """Okta's `q`: a case-insensitive prefix of any of `attrs`."""
    low = q.lower()
    return lambda get: any(isinstance(v := get(a), str) and v.lower().startswith(low) for a in attrs)


def _and(a: Predicate | None, b: Predicate) -> Predicate:
    return b if a is None else (lambda get: a(get) and b(get))
