"""Microsoft Graph (Entra ID) over the shared organization: ../shared/directory-apis.md §1.

Served on one port:
  POST /{tenant}/oauth2/v2.0/token              client credentials → bearer token (login host)
  GET  /v1.0/users, /v1.0/groups                 plain lists, $select/$top, @odata.nextLink ($skiptoken; $skip: 400);
                                                 users take $expand=manager[($select=…)]
  GET  /v1.0/users/{id}/manager                  the user's manager (404 when there is none)
  GET  /v1.0/directory/deletedItems/microsoft.graph.user
                                                 soft-deleted users (restorable), with deletedDateTime;
                                                 paged as the plain lists
  GET  /v1.0/groups/{id}/members                 direct members (users, groups, and in some groups a
                                                 device, a service principal, an org contact), @odata.type
  GET  /v1.0/users/delta[()], /v1.0/groups/delta[()]
                                                 delta rounds: nextLink XOR deltaLink, @removed,
                                                 members@delta chunks, manager@delta, $deltatoken=latest,
                                                 $filter only as id eq '…' (≤50, joined by or),
                                                 Prefer: return=minimal (later rounds: changed props only)
                                                 never-set properties left out (lists send null)
Every GET under /v1.0 answers with `x-ms-resource-unit`, what it cost (`resource_units`).
  POST /_emulator/graph                          Graph-only switches (expire delta tokens, force 410, …)

How deltas are answered without copying the organization: a delta token carries the org version the
round started at and the round's $select. A later round lists the objects whose `version` is newer
and whose *selected* properties changed. Which property changed when is learnt by `_Tracker`, which
keeps, per object, the field values it last saw (references to the Person's own strings, no copy of
the rendered record) and the version at which each one last changed. An object the tracker has not
seen before counts as "everything changed at its current version" — that can only cause a replay,
which Graph clients must tolerate anyway, never a missed change.

An object may be listed more than once in a round (§1.1 "Delta caveats"): `stale_removals` holds
ids whose next listing, in any round, is preceded on the same page by an `@removed` record of that
object (a replayed removal that the live record after it overrides).

Switches for what the reference marks [U]: the status and code of an expired token
(`sync_state_status`, `sync_state_code`: the overview says syncStateNotFound, the dev blog
BadRequest, and Graph has been seen sending SyncStateNotFound),
the 410 body (`gone_body`), whether member removals caused by deleting a user show in groups/delta
(`user_delete_removes_members`), whether `@removed` objects show in an initial round
(`initial_removed`), whether 429s carry a Retry-After (`retry_after=None`), and whether a later
round repeats an unchanged manager in `manager@delta` (`manager_on_every_change`, the reference's
"unchanged properties repeat their old values"), or names it only when it changed, an empty list
when it was taken away (False: what users report, microsoft-graph-explorer-v4 #4018).
"""

from __future__ import annotations

import base64
import bisect
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from dirpull.emulators.org import Group, Org, Person
from dirpull.emulators.server import Emulator, Request, Response, signed_token, token_claims

USER_PREFIX = "0b7f2d1e-1111-4a4a-9c9c-"
GROUP_PREFIX = "5c1d9f00-2222-4b4b-8d8d-"
EXTENSION_APP_ID = "b7e1c0de00004000800000000000a11e"
COST_CENTER_EXTENSION = f"extension_{EXTENSION_APP_ID}_costCenter"
GRAPH_SCOPES = frozenset(
    {
        "https://graph.microsoft.com/.default",
        "https://graph.microsoft.us/.default",
        "https://microsoftgraph.chinacloudapi.cn/.default",
    }
)
JWT_HEADER = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9"  # what an Entra access token starts with
JSON_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"


def user_id(n: int) -> str:
    return f"{USER_PREFIX}{n:012d}"


def group_id(n: int) -> str:
    return f"{GROUP_PREFIX}{n:012d}"


# Directory objects a group can hold besides users and groups (§1.1 "Membership delta").
FOREIGN_KINDS = ("device", "servicePrincipal", "orgContact")


def foreign_id(kind: str, n: int) -> str:
    return f"{FOREIGN_KINDS.index(kind) + 1:08d}-3333-4c4c-8e8e-{n:012d}"


def _parse_id(value: str, prefix: str) -> int | None:
    if not value.startswith(prefix) or len(value) != len(prefix) + 12 or not value[-12:].isdigit():
        return None
    return int(value[-12:])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_unified(g: Group) -> bool:
    # Every fourth group is a Microsoft 365 group; the rest are mail-enabled security groups.
    return g.n % 4 == 0


def _guest_upn(p: Person) -> str:
    """A guest's userPrincipalName: their own address, `@` made `_`, then `#EXT#@` and the
    tenant's initial domain (jane@fabrikam.com → jane_fabrikam.com#EXT#@contoso.onmicrosoft.com)."""
    local, _, domain = p.username.partition("@")
    return f"{local}_{domain}#EXT#@{domain.split('.')[0]}.onmicrosoft.com"


# --- properties: how each Graph property renders, and which org fields it depends on -----------

Render = Callable[[Any], Any]

# name → (render, org fields whose change makes the property change)
USER_PROPERTIES: dict[str, tuple[Render, tuple[str, ...]]] = {
    "id": (lambda p: user_id(p.n), ()),
    "displayName": (lambda p: p.display, ("given", "family")),
    "givenName": (lambda p: p.given, ("given",)),
    "surname": (lambda p: p.family, ("family",)),
    "mail": (lambda p: p.email, ("email",)),
    "otherMails": (
        lambda p: [p.email.replace("@", "@alias.", 1)] if p.email and p.n % 5 == 0 else [],
        ("email",),
    ),
    "userPrincipalName": (lambda p: _guest_upn(p) if p.guest else p.username, ("username", "guest")),
    "accountEnabled": (lambda p: p.state == "active", ("state",)),
    "jobTitle": (lambda p: p.title, ("title",)),
    "department": (lambda p: p.department, ("department",)),
    "companyName": (lambda p: "Example Corp", ()),
    "employeeId": (lambda p: p.employee_number, ("employee_number",)),
    "employeeType": (lambda p: "Employee", ()),
    "officeLocation": (lambda p: p.location, ("location",)),
    "userType": (lambda p: "Guest" if p.guest else "Member", ("guest",)),
    "createdDateTime": (lambda p: _iso(p.created_at), ()),
    # Set only while the user is soft-deleted (in deletedItems); null on a live user.
    "deletedDateTime": (lambda p: _iso(p.updated_at) if p.soft_deleted and not p.deleted else None, ("soft_deleted",)),
    "employeeHireDate": (lambda p: f"{p.hire_date}T00:00:00Z", ("hire_date",)),
    "employeeLeaveDateTime": (
        lambda p: f"{p.termination_date}T00:00:00Z" if p.termination_date else None,
        ("termination_date",),
    ),
    "businessPhones": (lambda p: [], ()),
    "mobilePhone": (lambda p: None, ()),
    "preferredLanguage": (lambda p: None, ()),
    "onPremisesExtensionAttributes": (
        lambda p: {f"extensionAttribute{i}": (p.cost_center if i == 1 else None) for i in range(1, 16)},
        ("cost_center",),
    ),
    COST_CENTER_EXTENSION: (lambda p: p.cost_center, ("cost_center",)),
}
USER_DEFAULT = (
    "businessPhones", "displayName", "givenName", "id", "jobTitle", "mail", "mobilePhone",
    "officeLocation", "preferredLanguage", "surname", "userPrincipalName",
)  # fmt: skip
# deletedItems lists users with the default properties and when each was deleted.
DELETED_USER_DEFAULT = (*USER_DEFAULT, "deletedDateTime")
# Navigation properties: selectable in delta only (manager@delta).
USER_NAVIGATION = {"manager": ("manager",)}
# Properties kept outside the directory store: selecting them gives 501 NotImplemented.
OUT_OF_STORE = frozenset(
    {
        "skills",
        "aboutMe",
        "birthday",
        "hireDate",
        "interests",
        "mySite",
        "pastProjects",
        "preferredName",
        "responsibilities",
        "schools",
        "mailboxSettings",
    }
)

GROUP_PROPERTIES: dict[str, tuple[Render, tuple[str, ...]]] = {
    "id": (lambda g: group_id(g.n), ()),
    "displayName": (lambda g: g.name, ("name",)),
    "description": (lambda g: g.description, ("description",)),
    "mail": (lambda g: g.email, ("email",)),
    "mailEnabled": (lambda g: True, ()),
    "mailNickname": (lambda g: (g.email or f"group{g.n}").split("@")[0], ("email",)),
    "securityEnabled": (lambda g: not _is_unified(g), ()),
    "groupTypes": (lambda g: ["Unified"] if _is_unified(g) else [], ()),
    "visibility": (lambda g: "Private" if _is_unified(g) else None, ()),
    "createdDateTime": (lambda g: _iso(g.created_at), ()),
}
GROUP_DEFAULT = tuple(GROUP_PROPERTIES)
GROUP_NAVIGATION = {"members": ()}

USER_FIELDS = (
    "given", "family", "email", "username", "state", "title", "department", "employee_number",
    "location", "hire_date", "termination_date", "cost_center", "manager", "soft_deleted", "deleted", "guest",
)  # fmt: skip
GROUP_FIELDS = ("name", "description", "email", "deleted")


def resource_units(req: Request) -> int:
    """What a GET costs in the identity service's token bucket (§1.1 "Identity limits"): listing
    users 2, a group's members 3, any other GET 1; `$select` takes one off, `$expand` adds one,
    `$top` under 20 takes one off, never below 1."""
    if req.path == "/v1.0/users":
        cost = 2
    elif re.fullmatch(r"/v1\.0/groups/[^/]+/members", req.path):
        cost = 3
    else:
        cost = 1
    if req.arg("$select") is not None:
        cost -= 1
    if req.arg("$expand") is not None:
        cost += 1
    top = req.arg("$top")
    if top is not None and top.isdigit() and int(top) < 20:
        cost -= 1
    return max(1, cost)


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or []


# --- change tracking ----------------------------------------------------------------------------


class _Tracker:
    """Per object: the field values last seen and the version each field last changed at."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields
        self.index = {f: i for i, f in enumerate(fields)}
        # n → [version seen, values, base version, {field index: changed-at version}]
        self.seen: dict[int, list[Any]] = {}

    def observe(self, obj: Person | Group) -> list[Any]:
        rec = self.seen.get(obj.n)
        if rec is not None and rec[0] == obj.version:
            return rec
        values = tuple(getattr(obj, f) for f in self.fields)
        if rec is None:
            rec = [obj.version, values, obj.version, {}]
            self.seen[obj.n] = rec
            return rec
        old = rec[1]
        changed = rec[3]
        for i, (a, b) in enumerate(zip(old, values, strict=True)):
            if a != b:
                changed[i] = obj.version
        rec[0], rec[1] = obj.version, values
        return rec

    def changed_after(self, obj: Person | Group, fields: Iterable[int], since: int) -> bool:
        rec = self.observe(obj)
        base, changed = rec[2], rec[3]
        return any(changed.get(i, base) > since for i in fields)


# --- tokens ---------------------------------------------------------------------------------------


def _encode(state: dict[str, Any]) -> str:
    raw = json.dumps(state, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        state = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GraphError(400, "BadRequest", "The provided skip/delta token is invalid.") from None
    if not isinstance(state, dict):
        raise GraphError(400, "BadRequest", "The provided skip/delta token is invalid.")
    return state


@dataclass
class _Round:
    kind: str  # "users" | "groups"
    initial: bool
    since: int  # changes with a version above this are listed
    upto: int  # org version when the round started: the next round's `since`
    select: list[str] | None
    pos: int = 0  # last object n fully emitted
    # The key (`_member_key`) of the last members@delta entry emitted of object pos + 1 (groups),
    # None before its first chunk. A key, not an offset: members leaving between two pages would
    # shift an offset past a member who never changed, named in no round at all.
    chunk: list[int] | None = None
    # The objects (n) a `$filter=id eq '…'` round tracks; None: all of them.
    ids: list[int] | None = None
    # `Prefer: return=minimal` on this request of a later round: only changed properties (not in
    # the token: a request header, sent with each request).
    minimal: bool = False

    def token(self, generation: int) -> str:
        return _encode(
            {
                "k": self.kind,
                "i": int(self.initial),
                "s": self.since,
                "u": self.upto,
                "f": self.select,
                "p": self.pos,
                "c": self.chunk,
                "x": self.ids,
                "g": generation,
                "t": round(time.time(), 3),
                "r": secrets.token_hex(4),
            }
        )


class GraphEmulator(Emulator):
    name = "graph"
    # Access tokens are signed and skip/delta tokens say where they are; the member cache is a cache,
    # and a worker whose _Tracker has not seen an object can only replay it (see above).
    parallel = True

    def __init__(
        self,
        org: Org,
        *,
        tenant_id: str = "0785ef7c-0000-4000-8000-00000000d1e7",
        client_id: str = "9a3d526c-0000-4000-8000-0000000c11e7",
        client_secret: str = "emulator-client-secret",
        token_lifetime: float = 3599.0,
        delta_page_size: int = 200,
        delta_scan_limit: int = 5000,
        member_chunk_size: int = 500,
        delta_token_ttl: float = 7 * 86400.0,
        retry_after: str | None = "2.128",
        sync_state_status: int = 400,
        sync_state_code: str = "syncStateNotFound",
        gone_body: bool = False,
        initial_removed: bool = True,
        removed_retention: float = 30 * 86400.0,
        user_delete_removes_members: bool = True,
        manager_on_every_change: bool = True,
    ) -> None:
        super().__init__(org)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime = token_lifetime
        self.delta_page_size = delta_page_size
        self.delta_scan_limit = delta_scan_limit
        self.member_chunk_size = member_chunk_size
        self.delta_token_ttl = delta_token_ttl
        self.retry_after = retry_after
        self.sync_state_status = sync_state_status
        self.sync_state_code = sync_state_code
        self.gone_body = gone_body
        self.initial_removed = initial_removed
        self.removed_retention = removed_retention
        self.user_delete_removes_members = user_delete_removes_members
        self.manager_on_every_change = manager_on_every_change
        self.resync_required = 0  # the next N deltaLink calls answer 410 Gone
        # User or group ids whose next listing comes right after a stale @removed of the same object.
        self.stale_removals: set[str] = set()
        self.tokens_issued = 0
        # Access tokens are signed, not remembered: any worker of a forked emulator accepts them.
        self._token_key = secrets.token_bytes(32)
        self._token_epoch = 0  # bumped to revoke every access token issued so far
        self._generation = 0  # bumped to expire every delta token issued so far
        self._users = _Tracker(USER_FIELDS)
        self._groups = _Tracker(GROUP_FIELDS)
        self._member_cache: dict[tuple[int, int], dict[int, list[tuple[str, int, bool]]]] = {}
        # Members that are neither users nor groups (a device, a service principal, an org contact),
        # vendor-only and fixed, keyed by Group.n: every seventh group from the second holds one of each.
        self.foreign_members: dict[int, list[str]] = {
            n: list(FOREIGN_KINDS) for n in org.groups if n % 7 == 2
        }
        self._state_lock = threading.Lock()

        self.route("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", self._token)
        self.route("GET", r"/v1\.0/users", self._list_users)
        self.route("GET", r"/v1\.0/groups", self._list_groups)
        self.route("GET", r"/v1\.0/users/delta(?:\(\))?", lambda r: self._delta(r, "users"))
        self.route("GET", r"/v1\.0/groups/delta(?:\(\))?", lambda r: self._delta(r, "groups"))
        self.route("GET", r"/v1\.0/groups/(?P<gid>[^/]+)/members", self._members)
        self.route("GET", r"/v1\.0/users/(?P<uid>[^/]+)/manager", self._manager)
        self.route("GET", r"/v1\.0/directory/deletedItems/microsoft\.graph\.user", self._deleted_users)
        self.route("POST", r"/_emulator/graph", self._control)

    # --- switches ----------------------------------------------------------------------------------

    def expire_delta_tokens(self) -> None:
        """Every delta token issued so far now answers `syncStateNotFound`."""
        with self._state_lock:
            self._generation += 1

    def force_resync(self, count: int = 1) -> None:
        """The next `count` deltaLink calls answer 410 Gone with a Location to restart from."""
        with self._state_lock:
            self.resync_required = count

    def expire_access_tokens(self) -> None:
        with self._state_lock:
            self._token_epoch += 1

    def _mint(self, expiry: float) -> str:
        claims = {"exp": expiry, "epoch": self._token_epoch, "jti": secrets.token_hex(8)}
        return f"{JWT_HEADER}.{signed_token(self._token_key, claims)}"

    def _token_expiry(self, token: str) -> float | None:
        """When a token this emulator signed expires; None for anything else (or revoked)."""
        header, _, rest = token.partition(".")
        body = token_claims(self._token_key, rest) if header == JWT_HEADER else None
        return float(body["exp"]) if body is not None and body.get("epoch") == self._token_epoch else None

    _SETTINGS = (
        "token_lifetime",
        "delta_page_size",
        "delta_scan_limit",
        "member_chunk_size",
        "delta_token_ttl",
        "retry_after",
        "sync_state_status",
        "sync_state_code",
        "gone_body",
        "initial_removed",
        "user_delete_removes_members",
        "manager_on_every_change",
    )
    _ACTIONS = ("expire_delta_tokens", "expire_access_tokens", "resync", "stale_removals")

    def _control(self, req: Request) -> Response:
        body = req.json() or {}
        if not isinstance(body, dict):
            return Response(400, {"error": "expected a JSON object"})
        # As the other emulators' switch routes: a misspelt switch is refused, naming the valid
        # ones, not answered ok while the test it sets up runs without it.
        known = (*self._ACTIONS, *self._SETTINGS)
        unknown = sorted(set(body) - set(known))
        if unknown:
            return Response(400, {"error": f"unknown switch {unknown[0]!r}", "switches": sorted(known)})
        if body.get("expire_delta_tokens"):
            self.expire_delta_tokens()
        if body.get("expire_access_tokens"):
            self.expire_access_tokens()
        if "resync" in body:
            self.force_resync(int(body["resync"]))
        if "stale_removals" in body:
            with self.org.lock:
                self.stale_removals.update(str(i) for i in body["stale_removals"])
        for key in self._SETTINGS:
            if key in body:
                setattr(self, key, body[key])
        return Response(200, {"ok": True})

    # --- configuration for dirpull -----------------------------------------------------------------

    def tenant_config(self, tenant: str, workdir: Path) -> dict[str, Any]:
        return {
            "provider": "entra_id",
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "login_url": self.base_url,
            "graph_url": self.base_url + "/v1.0",
        }

    # --- vendor wording of errors ------------------------------------------------------------------

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        headers: list[tuple[str, str]] | None = None,
        req: Request | None = None,
    ) -> Response:
        request_id = str(uuid.uuid4())
        inner = {
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "request-id": request_id,
            "client-request-id": (req.headers.get("client-request-id") if req else None) or request_id,
        }
        hdrs = [("request-id", request_id), *(headers or [])]
        return Response(
            status,
            {"error": {"code": code, "message": message, "innerError": inner}},
            hdrs,
            content_type="application/json",
        )

    def rate_limited(self, req: Request) -> Response:
        headers = [
            ("x-ms-throttle-scope", f"Tenant_Application/ReadWrite/{self.client_id}/{self.tenant_id}"),
            ("x-ms-throttle-information", "ResourceUnitLimitExceeded"),
        ]
        if self.retry_after is not None:
            headers.insert(0, ("Retry-After", str(self.retry_after)))
        resp = self._error(429, "TooManyRequests", "Please retry again later.", headers, req)
        resp.body["error"]["innerError"].update({"code": "429", "message": "Please retry after", "status": "429"})
        return resp

    def server_error(self, req: Request, status: int) -> Response:
        code, message = {
            503: ("serviceNotAvailable", "The service is temporarily unavailable. Please retry."),
            504: ("gatewayTimeout", "The operation timed out."),
        }.get(status, ("generalException", "An unspecified error has occurred."))
        return self._error(status, code, message, req=req)

    def unauthorized(self, req: Request) -> Response:
        return self._error(
            401,
            "InvalidAuthenticationToken",
            "Lifetime validation failed, the token is expired.",
            [
                (
                    "WWW-Authenticate",
                    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize"',
                )
            ],
            req,
        )

    def not_found(self, req: Request) -> Response:
        return self._error(404, "UnknownError", f"Resource not found for the segment '{req.path}'.", req=req)

    def authenticate(self, req: Request) -> Response | None:
        if not req.path.startswith("/v1.0/"):
            return None  # the token endpoint authenticates the client itself
        header = req.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._error(401, "InvalidAuthenticationToken", "Access token is empty.", req=req)
        expiry = self._token_expiry(token.strip())
        if expiry is None:
            return self._error(401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed.", req=req)
        if expiry <= time.time():
            return self.unauthorized(req)
        return None

    def handle(self, req: Request) -> tuple[Response, str | None]:
        resp, fault = super().handle(req)
        if req.path.startswith("/v1.0/") and not any(k.lower() == "request-id" for k, _ in resp.headers):
            resp.headers.append(("request-id", str(uuid.uuid4())))
        if req.method == "GET" and req.path.startswith("/v1.0/"):
            resp.headers.append(("x-ms-resource-unit", str(resource_units(req))))
        return resp, fault

    # --- token endpoint ----------------------------------------------------------------------------

    def _aad_error(self, status: int, error: str, code: int, description: str) -> Response:
        now = datetime.now(UTC)
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: "
            f"{corr}\r\nTimestamp: {now.strftime('%Y-%m-%d %H:%M:%SZ')}",
            "error_codes": [code],
            "timestamp": now.strftime("%Y-%m-%d %H:%M:%SZ"),
            "trace_id": trace,
            "correlation_id": corr,
        }
        return Response(status, body, content_type="application/json")

    def _token(self, req: Request) -> Response:
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return self._aad_error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            )
        form = {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        tenant = req.params["tenant"]
        if tenant != self.tenant_id:
            return self._aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return self._aad_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form.get("client_id") != self.client_id:
            return self._aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the directory '{tenant}'.",
            )
        if not secrets.compare_digest(form.get("client_secret", ""), self.client_secret):
            return self._aad_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID.",
            )
        if form.get("scope") not in GRAPH_SCOPES:
            return self._aad_error(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope "
                f"{form.get('scope')} is not valid.",
            )
        with self._state_lock:
            token = self._mint(time.time() + self.token_lifetime)
            self.tokens_issued += 1
        lifetime = int(self.token_lifetime)
        return Response(
            200,
            {
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": token,
            },
        )

    # --- helpers -----------------------------------------------------------------------------------

    def _url(self, path: str, params: Iterable[tuple[str, str]]) -> str:
        query = "&".join(f"{k}={quote(v, safe=',')}" for k, v in params)
        return f"{self.base_url}/v1.0/{path}" + (f"?{query}" if query else "")

    @staticmethod
    def _select(
        req: Request, table: dict[str, Any], navigation: dict[str, Any], default: tuple[str, ...], kind: str
    ) -> list[str] | None:
        raw = req.arg("$select")
        if raw is None:
            return None
        names = [s.strip() for s in raw.split(",") if s.strip()]
        for name in names:
            if name in OUT_OF_STORE:
                raise GraphError(
                    501,
                    "NotImplemented",
                    f"This operation target is not yet supported. Property '{name}' is stored outside the directory.",
                )
            if name not in table and name not in navigation and not name.startswith("extension_"):
                raise GraphError(
                    400,
                    "BadRequest",
                    f"Could not find a property named '{name}' on type 'microsoft.graph.{kind}'.",
                )
        return names

    @staticmethod
    def _render(obj: Any, table: dict[str, tuple[Render, tuple[str, ...]]], names: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": table["id"][0](obj)}
        for name in names:
            entry = table.get(name)
            if entry is not None:
                out[name] = entry[0](obj)
        return out

    def _top(self, req: Request, default: int = 100) -> int:
        if req.arg("$skip") is not None:
            # Directory collections page by $skiptoken only; Graph refuses $skip rather than ignore it.
            raise GraphError(400, "Request_BadRequest", "'$skip' is not supported by the service.")
        raw = req.arg("$top")
        if raw is None:
            return default
        try:
            top = int(raw)
        except ValueError:
            top = -1
        if not 1 <= top <= 999:
            raise GraphError(
                400,
                "Request_BadRequest",
                f"Invalid page size specified: '{raw}'. Must be between 1 and 999 inclusive.",
            )
        return top

    def _json(self, body: dict[str, Any]) -> Response:
        return Response(200, body, content_type=JSON_TYPE)

    def _guarded(self, fn: Callable[[], Response], req: Request) -> Response:
        try:
            return fn()
        except GraphError as exc:
            return self._error(exc.status, exc.code, exc.message, exc.headers, req)

    # --- plain lists -------------------------------------------------------------------------------

    def _page_list(
        self,
        req: Request,
        path: str,
        kind: str,
        objects: Callable[[int], Any | None],
        count: Callable[[], int],
        render: Callable[[Any, list[str]], dict[str, Any]],
        default: tuple[str, ...],
        table: dict[str, Any],
        navigation: dict[str, Any],
        context: str,
        expandable: bool = False,
    ) -> Response:
        skiptoken = req.arg("$skiptoken")
        if skiptoken is not None:
            state = _decode(skiptoken)
            select, top, pos = state.get("f"), int(state.get("n", 100)), int(state.get("p", 0))
            expand = state.get("e")
        else:
            select = self._select(req, table, navigation, default, kind)
            top, pos = self._top(req), 0
            expand = self._expand_manager(req) if expandable else None
        names = [s for s in select if s in table] if select is not None else list(default)
        items: list[dict[str, Any]] = []
        with self.org.lock:
            hi = count()
            n = pos
            while n < hi and len(items) < top:
                n += 1
                obj = objects(n)
                if obj is not None:
                    item = render(obj, names)
                    if expand is not None:
                        self._add_manager(item, obj, expand)
                    items.append(item)
            more = n < hi  # the last page may be empty: Graph allows that
        ctx = f"{self.base_url}/v1.0/$metadata#{context}" + (f"({','.join(select)})" if select else "")
        body: dict[str, Any] = {"@odata.context": ctx}
        if more:
            params = [("$top", str(top))] if req.arg("$top") or skiptoken else []
            if select:
                params.insert(0, ("$select", ",".join(select)))
            state = {"p": n, "n": top, "f": select}
            if expand is not None:
                state["e"] = expand
            params.append(("$skiptoken", _encode(state)))
            body["@odata.nextLink"] = self._url(path, params)
        body["value"] = items
        return self._json(body)

    @staticmethod
    def _expand_manager(req: Request) -> list[str] | None:
        """The manager properties `$expand=manager` (or `manager($select=a,b)`) asks for: the list
        (the default user properties when none are selected), or None without that expand. Other
        navigation properties are left as they were: not modelled here."""
        raw = req.arg("$expand")
        if raw is None:
            return None
        for part in re.split(r",(?![^(]*\))", raw):
            m = re.fullmatch(r"\s*manager\s*(?:\(\s*\$select\s*=\s*([^)]*)\))?\s*", part)
            if m is None:
                continue
            if m.group(1) is None:
                return list(USER_DEFAULT)
            names = [x.strip() for x in m.group(1).split(",") if x.strip()]
            for name in names:
                if name not in USER_PROPERTIES:
                    raise GraphError(
                        400, "BadRequest", f"Could not find a property named '{name}' on type 'microsoft.graph.user'."
                    )
            return names
        return None

    def _add_manager(self, item: dict[str, Any], p: Person, names: list[str]) -> None:
        """The user's manager, expanded in place (§1.1 user fields: `manager`, `$expand=manager`);
        left out when the user has none, as Graph leaves out an empty single-valued navigation."""
        mgr = self.org.people.get(p.manager) if p.manager is not None else None
        if mgr is not None and mgr.visible:
            item["manager"] = {"@odata.type": "#microsoft.graph.user", **self._render(mgr, USER_PROPERTIES, names)}

    def _visible_person(self, n: int) -> Person | None:
        p = self.org.people.get(n)
        return p if p is not None and p.visible else None

    def _visible_group(self, n: int) -> Group | None:
        g = self.org.groups.get(n)
        return g if g is not None and not g.deleted else None

    def _list_users(self, req: Request) -> Response:
        return self._guarded(
            lambda: self._page_list(
                req,
                "users",
                "user",
                self._visible_person,
                lambda: len(self.org.people),
                lambda p, names: self._render(p, USER_PROPERTIES, names),
                USER_DEFAULT,
                USER_PROPERTIES,
                {},
                "users",
                expandable=True,
            ),
            req,
        )

    def _list_groups(self, req: Request) -> Response:
        return self._guarded(
            lambda: self._page_list(
                req,
                "groups",
                "group",
                self._visible_group,
                lambda: len(self.org.groups),
                lambda g, names: self._render(g, GROUP_PROPERTIES, names),
                GROUP_DEFAULT,
                GROUP_PROPERTIES,
                {},
                "groups",
            ),
            req,
        )

    def _soft_deleted_person(self, n: int) -> Person | None:
        p = self.org.people.get(n)
        return p if p is not None and p.soft_deleted and not p.deleted else None

    def _deleted_users(self, req: Request) -> Response:
        """Soft-deleted users, restorable until deleted for good (§1.1 "Endpoints", "Deleted user in
        users/delta": `reason` `changed`); a user deleted for good is in neither list."""
        return self._guarded(
            lambda: self._page_list(
                req,
                "directory/deletedItems/microsoft.graph.user",
                "user",
                self._soft_deleted_person,
                lambda: len(self.org.people),
                lambda p, names: self._render(p, USER_PROPERTIES, names),
                DELETED_USER_DEFAULT,
                USER_PROPERTIES,
                {},
                "directory/deletedItems/microsoft.graph.user",
            ),
            req,
        )

    def _manager(self, req: Request) -> Response:
        uid = req.params["uid"]
        n = _parse_id(uid, USER_PREFIX)
        with self.org.lock:
            p = self.org.people.get(n) if n is not None else None
            if p is None or not p.visible:
                return self._error(404, "Request_ResourceNotFound", f"Resource '{uid}' does not exist or one of "
                                   "its queried reference-property objects are not present.", req=req)  # fmt: skip
            mgr = self.org.people.get(p.manager) if p.manager is not None else None
            if mgr is None or not mgr.visible:
                return self._error(404, "Request_ResourceNotFound", "Resource 'manager' does not exist or one of "
                                   "its queried reference-property objects are not present.", req=req)  # fmt: skip

            def render() -> Response:
                select = self._select(req, USER_PROPERTIES, {}, (), "user")
                names = [x for x in select if x in USER_PROPERTIES] if select is not None else USER_DEFAULT
                ctx = f"{self.base_url}/v1.0/$metadata#directoryObjects/$entity"
                item = self._render(mgr, USER_PROPERTIES, names)
                return self._json({"@odata.context": ctx, "@odata.type": "#microsoft.graph.user", **item})

            return self._guarded(render, req)

    def _members(self, req: Request) -> Response:
        gid = req.params["gid"]
        n = _parse_id(gid, GROUP_PREFIX)
        with self.org.lock:
            group = self.org.groups.get(n) if n is not None else None
            if group is None or group.deleted:
                return self._error(
                    404,
                    "Request_ResourceNotFound",
                    f"Resource '{gid}' does not exist or one of its queried reference-property "
                    "objects are not present.",
                    req=req,
                )
            people, subs = self.org.direct_members(group.n)
        # Members in a stable order: users then groups, addressed by index (1-based) for paging.
        members: list[tuple[str, int]] = [("user", p) for p in people] + [("group", s) for s in subs]
        members += [(kind, group.n) for kind in self.foreign_members.get(group.n, ())]

        def render(m: tuple[str, int], names: list[str]) -> dict[str, Any]:
            kind, num = m
            if kind in FOREIGN_KINDS:
                return {"@odata.type": f"#microsoft.graph.{kind}", "id": foreign_id(kind, num)}
            if kind == "user":
                obj, table = self.org.people[num], USER_PROPERTIES
            else:
                obj, table = self.org.groups[num], GROUP_PROPERTIES
            # A $select names user properties; a group member gets those it has (and vice versa).
            chosen = names if names is not _DEFAULT_MARK else (USER_DEFAULT if kind == "user" else GROUP_DEFAULT)
            return {"@odata.type": f"#microsoft.graph.{kind}", **self._render(obj, table, chosen)}

        both = {**USER_PROPERTIES, **GROUP_PROPERTIES}
        return self._guarded(lambda: self._members_page(req, gid, members, render, both), req)

    def _members_page(
        self,
        req: Request,
        gid: str,
        members: list[tuple[str, int]],
        render: Callable[[tuple[str, int], Any], dict[str, Any]],
        both: dict[str, Any],
    ) -> Response:
        skiptoken = req.arg("$skiptoken")
        after: list[int] | None = None  # the `_member_key` of the last member the previous page named
        if skiptoken is not None:
            state = _decode(skiptoken)
            select, top, after = state.get("f"), int(state.get("n", 100)), state.get("a")
        else:
            select = self._select(req, both, {}, (), "directoryObject")
            top = self._top(req)
        names: Any = [s for s in select if s in both] if select is not None else _DEFAULT_MARK
        # Resume after that member, not at an offset: a member leaving between two pages would
        # shift an offset past one who stayed (`members` is in `_member_key` order).
        pos = bisect.bisect_right(members, tuple(after), key=lambda m: _member_key(*m)) if after else 0
        page = members[pos : pos + top]
        with self.org.lock:
            items = [render(m, names) for m in page]
        end = pos + len(items)
        ctx = f"{self.base_url}/v1.0/$metadata#directoryObjects" + (f"({','.join(select)})" if select else "")
        body: dict[str, Any] = {"@odata.context": ctx}
        if end < len(members):
            params = [("$select", ",".join(select))] if select else []
            params.append(("$skiptoken", _encode({"a": list(_member_key(*page[-1])), "n": top, "f": select})))
            body["@odata.nextLink"] = self._url(f"groups/{gid}/members", params)
        body["value"] = items
        return self._json(body)

    # --- delta -------------------------------------------------------------------------------------

    def _delta(self, req: Request, kind: str) -> Response:
        return self._guarded(lambda: self._delta_inner(req, kind), req)

    def _delta_inner(self, req: Request, kind: str) -> Response:
        deltatoken = req.arg("$deltatoken")
        if deltatoken is None:
            deltatoken = req.arg("$deltaToken")
        if deltatoken == "":
            deltatoken = None  # a 410's Location (`$deltaToken=`): start over with a full round
        skiptoken = req.arg("$skiptoken")
        table, navigation = (
            (USER_PROPERTIES, USER_NAVIGATION) if kind == "users" else (GROUP_PROPERTIES, GROUP_NAVIGATION)
        )
        if deltatoken == "latest":
            select = self._select(req, table, navigation, (), kind[:-1])
            ids = self._delta_filter(req, kind)
            with self.org.lock:
                rnd = _Round(kind, False, self.org.version, self.org.version, select, ids=ids)
            return self._delta_body(kind, [], None, rnd, select)
        if deltatoken is not None:
            # The query parameters of a deltaLink are all in the token: any others are ignored.
            with self._state_lock:
                if self.resync_required > 0:
                    self.resync_required -= 1
                    location = f"{self.base_url}/v1.0/{kind}/delta?$deltaToken="
                    if self.gone_body:
                        raise GraphError(
                            410,
                            "resyncRequired",
                            "Resync required. Replace any local cached data with the data from a full sync.",
                            [("Location", location)],
                        )
                    return Response(410, None, [("Location", location)])
            state = _decode(deltatoken)
            if state.get("k") != kind:
                raise GraphError(400, "BadRequest", "The delta token does not belong to this resource.")
            expired = state.get("g") != self._generation or time.time() - float(state.get("t", 0)) > (
                self.delta_token_ttl
            )
            if expired:
                raise GraphError(
                    self.sync_state_status,
                    self.sync_state_code,
                    "The sync state generation is not found. The delta token is expired and data "
                    "must be synchronized again.",
                )
            with self.org.lock:
                rnd = _Round(kind, False, int(state["u"]), self.org.version, state.get("f"), ids=state.get("x"))
        elif skiptoken is not None:
            state = _decode(skiptoken)
            if state.get("k") != kind:
                raise GraphError(400, "BadRequest", "The skip token does not belong to this resource.")
            rnd = _Round(
                kind,
                bool(state["i"]),
                int(state["s"]),
                int(state["u"]),
                state.get("f"),
                int(state["p"]),
                state.get("c"),
                state.get("x"),
            )
        else:
            # A new round. $top is not supported on delta and is silently ignored.
            select = self._select(req, table, navigation, (), kind[:-1])
            ids = self._delta_filter(req, kind)
            with self.org.lock:
                rnd = _Round(kind, True, 0, self.org.version, select, ids=ids)
        # §1.1 "Delta property semantics": with `Prefer: return=minimal` a later round's records
        # carry only the properties that changed (an initial round has nothing to compare with).
        prefer = req.headers.get("Prefer") or ""
        rnd.minimal = not rnd.initial and any(
            p.strip().lower().replace(" ", "") == "return=minimal" for p in prefer.split(",")
        )
        with self.org.lock:
            if kind == "users":
                items, more = self._users_page(rnd)
            else:
                items, more = self._groups_page(rnd)
        return self._delta_body(kind, items, more, rnd, rnd.select)

    def _delta_filter(self, req: Request, kind: str) -> list[int] | None:
        """The objects a first delta request's `$filter` names. users/groups delta take `$filter`
        only as `id eq '…'` (several joined by `or`, at most 50 ids: §1.1 "Delta query params"); it
        is not ignored, which would answer every object. The wording of the refusals is not
        documented."""
        raw = req.arg("$filter")
        if raw is None:
            return None
        terms = re.split(r"\s+or\s+", raw.strip(), flags=re.IGNORECASE)
        values: list[str] = []
        for term in terms:
            m = re.fullmatch(r"\s*\(?\s*id\s+eq\s+'([^']*)'\s*\)?\s*", term, flags=re.IGNORECASE)
            if m is None:
                raise GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"Unsupported query: delta on {kind} takes $filter only as id eq '…' (joined by 'or').",
                )
            values.append(m.group(1))
        if len(values) > 50:
            raise GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Unsupported query: $filter names {len(values)} ids; delta takes at most 50.",
            )
        prefix = USER_PREFIX if kind == "users" else GROUP_PREFIX
        # An id of no object of this kind matches nothing (as an id that never existed).
        return sorted({n for v in values if (n := _parse_id(v.lower(), prefix)) is not None})

    def _delta_body(
        self, kind: str, items: list[dict[str, Any]], more: bool | None, rnd: _Round, select: list[str] | None
    ) -> Response:
        ctx = f"{self.base_url}/v1.0/$metadata#{kind}" + (f"({','.join(select)})" if select else "")
        body: dict[str, Any] = {"@odata.context": ctx}
        if more:
            body["@odata.nextLink"] = self._url(f"{kind}/delta", [("$skiptoken", rnd.token(self._generation))])
        else:
            done = _Round(kind, False, rnd.upto, rnd.upto, select, ids=rnd.ids)
            body["@odata.deltaLink"] = self._url(f"{kind}/delta", [("$deltatoken", done.token(self._generation))])
        body["value"] = items
        return self._json(body)

    def _recently(self, ts: float) -> bool:
        return time.time() - ts <= self.removed_retention

    def _users_page(self, rnd: _Round) -> tuple[list[dict[str, Any]], bool]:
        people = self.org.people
        select = rnd.select
        names = [s for s in select if s in USER_PROPERTIES] if select is not None else list(USER_DEFAULT)
        with_manager = select is not None and "manager" in select
        tracked = {
            self._users.index[f]
            for name in (select or USER_DEFAULT)
            for f in (USER_PROPERTIES.get(name) or (None, USER_NAVIGATION.get(name, ())))[1]
        }
        gone = (self._users.index["soft_deleted"], self._users.index["deleted"])
        tracked |= set(gone)
        items: list[dict[str, Any]] = []
        hi = len(people)
        only = frozenset(rnd.ids) if rnd.ids is not None else None
        n, scanned = rnd.pos, 0
        while n < hi and len(items) < self.delta_page_size and scanned < self.delta_scan_limit:
            n += 1
            scanned += 1
            p = people.get(n)
            if p is None or (only is not None and n not in only):
                continue
            if rnd.initial:
                self._users.observe(p)
                if not p.visible:
                    if self.initial_removed and self._recently(p.updated_at):
                        items.append(self._removed(user_id(n), p))
                    continue
            else:
                if p.version <= rnd.since or not self._users.changed_after(p, tracked, rnd.since):
                    continue
                if not p.visible:
                    items.append(self._removed(user_id(n), p))
                    continue
            item = self._render(p, USER_PROPERTIES, names)
            self._omit_never_set(item, p, self._users, USER_PROPERTIES, rnd)
            if rnd.minimal and not self._users.changed_after(p, gone, rnd.since):
                # (A user restored since comes whole: the client has nothing to apply changes to.)
                self._keep_changed(item, p, self._users, USER_PROPERTIES, rnd)
            self._stale_removal(item["id"], items)
            # Named in every record, or (`manager_on_every_change` off, or return=minimal) only when
            # it changed, then as an empty list when it was taken away.
            every = self.manager_on_every_change and not rnd.minimal
            if with_manager and (
                rnd.initial or every or self._users.changed_after(p, (self._users.index["manager"],), rnd.since)
            ):
                mgr = people.get(p.manager) if p.manager is not None else None
                if mgr is not None and mgr.visible:
                    item["manager@delta"] = [{"@odata.type": "#microsoft.graph.user", "id": user_id(mgr.n)}]
                elif not rnd.initial and not every:
                    item["manager@delta"] = []  # the manager was taken away
            items.append(item)
        rnd.pos = n
        return items, n < hi

    @staticmethod
    def _omit_never_set(
        item: dict[str, Any],
        obj: Person | Group,
        tracker: _Tracker,
        table: dict[str, tuple[Render, tuple[str, ...]]],
        rnd: _Round,
    ) -> None:
        """Delta leaves out never-set properties (§1.1 "Delta property semantics"), where a plain
        list sends them as null. A property that changed to null since the round's `since` is a
        change and is sent as null; one that is null and unchanged counts as never set."""
        for name in [k for k, v in item.items() if v is None]:
            fields = table[name][1]
            if (
                rnd.initial
                or not fields
                or not tracker.changed_after(obj, [tracker.index[f] for f in fields], rnd.since)
            ):
                del item[name]

    @staticmethod
    def _keep_changed(
        item: dict[str, Any],
        obj: Person | Group,
        tracker: _Tracker,
        table: dict[str, tuple[Render, tuple[str, ...]]],
        rnd: _Round,
    ) -> None:
        """`Prefer: return=minimal`: only the id and the properties changed since the round's `since`."""
        for name in [k for k in item if k != "id"]:
            fields = table[name][1]
            if not fields or not tracker.changed_after(obj, [tracker.index[f] for f in fields], rnd.since):
                del item[name]

    def _stale_removal(self, oid: str, items: list[dict[str, Any]]) -> None:
        """A replayed `@removed` of an object about to be listed live, when the test asked for one."""
        if oid in self.stale_removals:
            self.stale_removals.discard(oid)
            items.append({"id": oid, "@removed": {"reason": "changed"}})

    @staticmethod
    def _removed(oid: str, p: Person) -> dict[str, Any]:
        return {"id": oid, "@removed": {"reason": "deleted" if p.deleted else "changed"}}

    def _member_changes(self, since: int, upto: int) -> dict[int, list[tuple[str, int, bool]]]:
        """Group n → net (kind, member n, added) changes in (since, upto]: the membership log, plus the
        effect of soft-deleting or restoring a user (their memberships hide and come back)."""
        key = (since, upto)
        cached = self._member_cache.get(key)
        if cached is not None:
            return cached
        net: dict[tuple[int, str, int], bool] = {}
        for ch in self.org.member_changes_since(since):
            if ch.version > upto:
                break
            hidden = not ch.added and ch.member_kind == "user" and not self.user_delete_removes_members
            if hidden and self.org.people[ch.member].deleted:
                continue
            net[(ch.group, ch.member_kind, ch.member)] = ch.added
        soft = self._users.index["soft_deleted"]
        flipped: dict[int, bool] = {}
        for p in self.org.people.values():
            if p.version > since and not p.deleted and self._users.changed_after(p, (soft,), since):
                if p.soft_deleted and not self.user_delete_removes_members:
                    continue
                flipped[p.n] = not p.soft_deleted
        if flipped:
            for g in self.org.groups.values():
                for m in g.members & flipped.keys():
                    net.setdefault((g.n, "user", m), flipped[m])
        out: dict[int, list[tuple[str, int, bool]]] = {}
        for (g, kind, m), added in sorted(net.items()):
            out.setdefault(g, []).append((kind, m, added))
        if len(self._member_cache) > 16:
            self._member_cache.clear()
        self._member_cache[key] = out
        return out

    def _groups_page(self, rnd: _Round) -> tuple[list[dict[str, Any]], bool]:
        groups = self.org.groups
        select = rnd.select
        names = [s for s in select if s in GROUP_PROPERTIES] if select is not None else list(GROUP_DEFAULT)
        with_members = select is not None and "members" in select
        tracked = {
            self._groups.index[f]
            for name in (select or GROUP_DEFAULT)
            for f in (GROUP_PROPERTIES.get(name) or (None, ()))[1]
        }
        tracked.add(self._groups.index["deleted"])
        changes = self._member_changes(rnd.since, rnd.upto) if with_members and not rnd.initial else {}
        items: list[dict[str, Any]] = []
        hi = len(groups)
        n, scanned, chunk = rnd.pos, 0, rnd.chunk
        only = frozenset(rnd.ids) if rnd.ids is not None else None
        more_members = False
        while n < hi and len(items) < self.delta_page_size and scanned < self.delta_scan_limit:
            cur = n + 1
            scanned += 1
            g = groups.get(cur)
            n = cur
            after, chunk = chunk, None  # a chunk key only applies to the group a page resumes
            if g is None or (only is not None and cur not in only):
                continue
            if rnd.initial:
                self._groups.observe(g)
                if g.deleted:
                    if self.initial_removed and self._recently(g.updated_at):
                        items.append(self._group_removed(g))
                    continue
                # Member keys (`_member_key`) in order: users, groups, then the vendor-only kinds.
                member_list: list[tuple[int, int]] | None = None
                removed: set[tuple[int, int]] = set()
                if with_members:
                    people, subs = self.org.direct_members(g.n)  # each sorted
                    member_list = [(0, m) for m in people]
                    member_list += [(1, m) for m in subs]
                    member_list += sorted(_member_key(kind, g.n) for kind in self.foreign_members.get(g.n, ()))
            else:
                prop_changed = g.version > rnd.since and self._groups.changed_after(g, tracked, rnd.since)
                member_changes = changes.get(g.n)
                if not prop_changed and not member_changes:
                    continue
                if g.deleted:
                    if prop_changed:
                        items.append(self._group_removed(g))
                    continue
                member_list = None
                removed = set()
                if member_changes:
                    member_list = []
                    for kind, m, added in member_changes:
                        member_list.append(_member_key(kind, m))
                        if not added:
                            removed.add(member_list[-1])
                    member_list.sort()
            item = self._render(g, GROUP_PROPERTIES, names)
            self._omit_never_set(item, g, self._groups, GROUP_PROPERTIES, rnd)
            if rnd.minimal and not self._groups.changed_after(g, (self._groups.index["deleted"],), rnd.since):
                self._keep_changed(item, g, self._groups, GROUP_PROPERTIES, rnd)
            self._stale_removal(item["id"], items)
            if member_list:
                # A large group comes back on several pages, each with a chunk of its members: those
                # after the last one the previous page named.
                # Only the chunk's entries are made: a large group is on many pages.
                start = bisect.bisect_right(member_list, tuple(after)) if after else 0
                part = member_list[start : start + self.member_chunk_size]
                if part:
                    item["members@delta"] = [_member_entry(k, g.n, k in removed) for k in part]
                if start + self.member_chunk_size < len(member_list):
                    items.append(item)
                    chunk = list(part[-1])
                    n = cur - 1  # come back to this group on the next page
                    more_members = True
                    break
            items.append(item)
        rnd.pos, rnd.chunk = n, chunk
        return items, more_members or n < hi

    @staticmethod
    def _group_removed(g: Group) -> dict[str, Any]:
        # A deleted Microsoft 365 group is restorable ("changed"); a security group is gone ("deleted").
        return {"id": group_id(g.n), "@removed": {"reason": "changed" if _is_unified(g) else "deleted"}}


_DEFAULT_MARK: Any = object()


_MEMBER_KINDS = ("user", "group", *FOREIGN_KINDS)


def _member_entry(key: tuple[int, int], group: int, removed: bool) -> dict[str, Any]:
    """The members@delta entry of a member key (`_member_key`) of `group`."""
    kind, n = _MEMBER_KINDS[key[0]], key[1]
    oid = user_id(n) if kind == "user" else group_id(n) if kind == "group" else foreign_id(kind, group)
    entry: dict[str, Any] = {"@odata.type": f"#microsoft.graph.{kind}", "id": oid}
    if removed:
        entry["@removed"] = {"reason": "deleted"}
    return entry


def _member_key(kind: str, n: int) -> tuple[int, int]:
    """Where a member stands in a group's member order: users, groups, then the vendor-only
    kinds (`FOREIGN_KINDS`), each by number. Paging resumes after a key, whatever left since."""
    return (0 if kind == "user" else 1 if kind == "group" else 2 + FOREIGN_KINDS.index(kind), n)
