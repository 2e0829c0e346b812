"""Google Admin SDK Directory API (directory_v1) over the synthetic organization.

What it serves (../shared/directory-apis.md §2, §6 rule 2):
  POST /token                                   OAuth 2.0 JWT-bearer grant of a service account
                                                (RS256 signature checked against the key this
                                                emulator made; `sub` = the impersonated admin:
                                                a user not in `admins` gets a token, and 403
                                                forbidden from the directory)
  GET  /admin/directory/v1/users                users.list: customer|domain required, maxResults
                                                1..500 (default 100), pageToken (valid for
                                                three days, then 400 "Invalid pageToken"), projection,
                                                customFieldMask, showDeleted, query, orderBy
                                                (email|familyName|givenName) + sortOrder
  GET  /admin/directory/v1/users/{key}          users.get: by id, primary address or alias;
                                                projection, customFieldMask; 404 for anyone not
                                                a user of this customer, 403 for a user this
                                                admin may not see (`hidden_people`)
  GET  /admin/directory/v1/groups               groups.list: customer|domain|userKey, ≤200,
                                                orderBy=email + sortOrder, query (email, name:
                                                `=` or `:prefix*`; memberKey=, alone)
                                                (`domain`: one domain's users or groups,
                                                `customer`: every domain's; see secondary_domain)
  GET  /admin/directory/v1/groups/{key}/members members.list: ≤200, USER/GROUP/CUSTOMER/EXTERNAL
  GET  /admin/directory/v1/groups/{key}/hasMember/{member}
                                                members.hasMember: {"isMember": bool}, direct or
                                                nested (nested only within one domain)
  POST /_emulator/google                        switches: {"rate_limit_kind": "user"|"quota"|
                                                "concurrent"|"alternate", "silent_empty": bool,
                                                "broken_users": [n, …], "delegated_scopes":
                                                [scope, …] (what domain-wide delegation grants;
                                                [] = none set up: 401 unauthorized_client),
                                                "page_token_lifetime": seconds (users.list page
                                                tokens are valid for three days, then 400)}
With `prefix="/google"` the API and /token answer only under that path (as behind a proxy); the
control endpoints stay at the root.

Vendor-only state lives here, keyed by Person.n / Group.n: which group holds the CUSTOMER member
(the whole domain), which groups have EXTERNAL members, the groups' editable aliases (each
department's group answers to the department's short address too), which users are served broken.
Inactive people map through `Person.inactive_reason`: `archived` → `archived: true` with
`archivalTime`, anything else (`suspended`, `terminated`) → `suspended: true` with `suspensionReason`
and `suspensionTime` (`Person.inactive_at`). Deleted (`Person.deleted`/`soft_deleted`) people
are hidden from the list and shown, with `deletionTime`, only by `showDeleted=true`.

Ids: users "1077" + 17-digit n (a 21-digit numeric string, like Google's), groups "03x8tuzt" +
7-digit n. `lastLoginTime` and `etag` change on every read (they are volatile in the real API too).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from bisect import bisect_right
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote

from dirpull.emulators.org import Group, Org, Person
from dirpull.emulators.server import Emulator, Request, Response, flag, one_of, signed_token, token_claims

API = "/admin/directory/v1"
GOOGLE_TOKEN_AUD = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPE_ROOT = "https://www.googleapis.com/auth/"
USER_SCOPES = {SCOPE_ROOT + "admin.directory.user.readonly"}
GROUP_SCOPES = {SCOPE_ROOT + "admin.directory.group.readonly"}
MEMBER_SCOPES = {
    SCOPE_ROOT + "admin.directory.group.member.readonly",
    SCOPE_ROOT + "admin.directory.group.readonly",
}
# The domain-wide delegation this emulated customer granted: read-only directory scopes only.
DELEGATED_SCOPES = (
    USER_SCOPES | GROUP_SCOPES | MEMBER_SCOPES | {SCOPE_ROOT + "admin.directory.orgunit.readonly"}
)
TOKEN_LIFETIME = 3599
SCHEMA = "Employment"
# users.list's nextPageToken is "only valid for three days" (directory-apis.md §2.1; the reference
# says so of users.list only). An older one is refused as any bad token is: 400 "Invalid pageToken"
# (Google's exact wording for it is not in the reference).
PAGE_TOKEN_LIFETIME = 3 * 86400.0

RateLimitKind = Literal["user", "quota", "concurrent", "alternate"]


def user_id(n: int) -> str:
    return f"1077{n:017d}"


def group_id(n: int) -> str:
    return f"03x8tuzt{n:07d}"


def _parse_id(value: str, prefix: str, width: int) -> int | None:
    if len(value) == len(prefix) + width and value.startswith(prefix) and value[len(prefix) :].isdigit():
        return int(value[len(prefix) :])
    return None


def _foreign_group_id(address: str) -> str:
    """The id another organization's group has (not this customer's "03x8tuzt" form)."""
    return "04f" + hashlib.sha1(address.lower().encode()).hexdigest()[:12]


def _unmanaged_id(address: str) -> str:
    """The id of a Google account outside this customer (21 digits, not this customer's "1077")."""
    return "1099" + f"{int(hashlib.sha1(address.lower().encode()).hexdigest()[:14], 16):017d}"[:17]


def _non_editable_alias(email: str) -> str:
    """The address Google gives every group of a domain on the domain's test-google-a.com twin."""
    local, _, dom = email.partition("@")
    return f"{local}@{dom}.test-google-a.com"


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _token(kind: str, value: str) -> str:
    """A page token: its kind, when it was issued (see `_untoken`) and where the next page starts."""
    return base64.urlsafe_b64encode(f"{kind}:{time.time():.3f}:{value}".encode()).decode().rstrip("=")


def _untoken(kind: str, token: str, lifetime: float | None = None) -> str | None:
    """Where a page token of `kind` says the next page starts; None for anything else, and for a
    token issued more than `lifetime` seconds ago."""
    try:
        text = _b64url_decode(token).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    k, _, rest = text.partition(":")
    issued, _, value = rest.partition(":")
    try:
        age = time.time() - float(issued)
    except ValueError:
        return None
    if k != kind or (lifetime is not None and age > lifetime):
        return None
    return value


def google_error(status: int, message: str, reason: str, domain: str = "global", **extra: Any) -> dict:
    """The standard Google JSON error body."""
    statuses = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        502: "UNAVAILABLE",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
    err = {"message": message, "domain": domain, "reason": reason, **extra}
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [err],
            "status": statuses.get(status, "UNKNOWN"),
        }
    }


def _scope_list(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{value!r} is not a list of scopes")
    return frozenset(value)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{value!r} is not a number of seconds")
    return float(value)


def _order(req: Request, fields: tuple[str, ...]) -> tuple[str, bool] | None:
    """(orderBy, descending) of a listing, None without `orderBy`: `sortOrder` alone orders
    nothing (directory-apis.md §2.1: users by email, familyName or givenName, groups by email)."""
    by = req.arg("orderBy")
    if not by:
        return None
    if by not in fields:
        raise _bad(f"Invalid value for orderBy: {by}", "invalidParameter")
    direction = (req.arg("sortOrder") or "ASCENDING").upper()
    if direction not in ("ASCENDING", "DESCENDING"):
        raise _bad(f"Invalid value for sortOrder: {direction}", "invalidParameter")
    return by, direction == "DESCENDING"


def _ordered_page(
    objects: list[Any], value: Any, descending: bool, kind: str, token: str | None, limit: int,
    lifetime: float | None = None,
) -> tuple[list[Any], str | None]:
    """One page of `objects` (Person or Group) sorted by `value` ignoring case (then by number),
    and the token of the next. The token names the last object's place in that order, not an
    offset: an object added or removed between two pages moves no other across the boundary."""
    keyed = sorted(((str(value(o)).casefold(), o.n, o) for o in objects), key=lambda t: t[:2], reverse=descending)
    start = 0
    if token:
        raw = _untoken(kind, token, lifetime)
        try:
            last = json.loads(raw) if raw is not None else None
            mark = (str(last[0]), int(last[1]))
        except (ValueError, TypeError, IndexError, KeyError):
            raise _bad("Invalid pageToken", "invalid") from None
        start = next(
            (i for i, t in enumerate(keyed) if (t[:2] < mark if descending else t[:2] > mark)), len(keyed)
        )
    page = keyed[start : start + limit]
    more = start + limit < len(keyed)
    next_token = _token(kind, json.dumps([page[-1][0], page[-1][1]])) if more and page else None
    return [t[2] for t in page], next_token


class _BadRequest(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _bad(message: str = "Bad Request", reason: str = "badRequest") -> _BadRequest:
    return _BadRequest(Response(400, google_error(400, message, reason)))


class GoogleEmulator(Emulator):
    name = "google_workspace"
    # Access tokens are signed, page tokens say where they are, and the service account's key is
    # made before the workers fork (`before_fork`): forked workers answer alike.
    parallel = True

    def __init__(self, org: Org, *, rate_limit_kind: RateLimitKind = "alternate", prefix: str = "") -> None:
        super().__init__(org)
        self.rate_limit_kind: RateLimitKind = rate_limit_kind
        # Served under a path prefix ("/google"), as behind a reverse proxy: the API and the token
        # endpoint answer only under it (the control endpoints stay at the root).
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self._rate_limit_count = 0
        # Seconds a users.list page token is honoured (a test shortens it rather than wait 3 days).
        self.page_token_lifetime = PAGE_TOKEN_LIFETIME
        # A listing outage that looks like an empty domain (first page without `users`).
        self.silent_empty = False
        # People served without primaryEmail (a record a connector cannot normalize).
        self.broken_users: set[int] = set()
        # The scopes the customer's admin delegated to the service account's client id (Security →
        # API controls → Domain-wide delegation); none at all is a delegation never set up.
        self.delegated_scopes: frozenset[str] = DELEGATED_SCOPES
        # Vendor-only membership kinds, keyed by Group.n.
        teams = sorted(g.n for g in org.groups.values() if g.name.startswith("Team "))
        self.customer_groups: set[int] = set(teams[:1])
        self.external_members: dict[int, set[str]] = {}
        for i, g in enumerate(teams[1:3]):
            self.external_members[g] = {f"partner.{i + 1}@partner.example"}
        # Editable aliases (Group.n → addresses), listed as the group's `aliases`: each department's
        # group also answers to the department's short address, as admins commonly set up.
        self.group_aliases: dict[int, list[str]] = {
            g.n: [g.email.split("@")[0].rsplit("-", 1)[0] + "@" + org.domain]
            for g in org.groups.values()
            if g.email and not g.name.startswith("Team ")
        }
        # A second domain of the customer (a multi-domain account): the people (Person.n) and groups
        # (Group.n) set here have their addresses in it. `customer` lists every domain's, `domain`
        # one domain's. None (the default): the organization has one domain.
        self.secondary_domain: str | None = None
        self.secondary_people: set[int] = set()
        self.secondary_groups: set[int] = set()
        # Groups of another organization nested in a group (Group.n → their addresses): listed as
        # GROUP members; their own members.list answers 403, as it does for any group outside the
        # admin's customer. Empty unless a test sets it.
        self.foreign_subgroups: dict[int, set[str]] = {}
        # Google accounts with an address in the customer's domain that are not the customer's (an
        # unmanaged "conflicting" account, made before the domain was verified), Group.n → their
        # addresses: listed as USER members; users.get does not find them (404).
        self.unmanaged_members: dict[int, set[str]] = {}
        # People (Person.n) outside what this admin may see (a delegated admin's role limited to
        # some org units): users.list leaves them out and users.get answers 403, while members.list
        # still names them.
        self.hidden_people: set[int] = set()
        # The customer's super admins (Person.n, `isAdmin`): the only subjects whose impersonation
        # reads the directory. Person 1 (the CEO) is the one `tenant_config` names.
        self.admins: set[int] = {1}
        # Service accounts whose keys this emulator trusts: client_email → (key id, public key).
        self._accounts: dict[str, tuple[str, Any]] = {}
        self._default_account: dict[str, Any] | None = None
        # Access tokens are signed, not remembered: any worker of a forked emulator accepts them.
        self._token_key = secrets.token_bytes(32)
        self._state_lock = threading.Lock()
        self._keys: list[int] = []  # Person.n in order (people are only ever appended)

        self.route("POST", r"/token", self._token_endpoint)
        self.route("POST", r"/oauth2/v4/token", self._token_endpoint)
        self.route("GET", API + r"/users", self._users_list)
        self.route("GET", API + r"/users/(?P<key>[^/]+)", self._users_get)
        self.route("GET", API + r"/groups", self._groups_list)
        self.route("GET", API + r"/groups/(?P<key>[^/]+)/members", self._members_list)
        self.route("GET", API + r"/groups/(?P<key>[^/]+)/hasMember/(?P<member>[^/]+)", self._has_member)
        self.switch_route(
            "/_emulator/google",
            {
                "rate_limit_kind": one_of("user", "quota", "concurrent", "alternate"),
                "silent_empty": flag,  # "false" is not true
                "broken_users": lambda v: {int(n) for n in v},
                "delegated_scopes": _scope_list,
                "page_token_lifetime": _seconds,
            },
        )

    # --- service accounts and tokens -------------------------------------------------------------

    def service_account_info(self) -> dict[str, Any]:
        """The service-account JSON key (made once, throw-away) whose token_uri is this emulator."""
        with self._state_lock:
            if self._default_account is None:
                from cryptography.hazmat.primitives import serialization
                from cryptography.hazmat.primitives.asymmetric import rsa

                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
                kid = secrets.token_hex(20)
                email = "dirpull-sync@dirpull-emulator.iam.gserviceaccount.com"
                self._accounts[email] = (kid, key.public_key())
                self._default_account = {
                    "type": "service_account",
                    "project_id": "dirpull-emulator",
                    "private_key_id": kid,
                    "private_key": pem,
                    "client_email": email,
                    "client_id": "100000000000000000001",
                    "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                    "token_uri": "",
                    "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
                    "universe_domain": "googleapis.com",
                }
            info = dict(self._default_account)
        info["token_uri"] = self.token_url
        return info

    @property
    def token_url(self) -> str:
        return f"{self.base_url}{self.prefix}/token"

    def handle(self, req: Request) -> tuple[Response, str | None]:
        if self.prefix and not self.is_control(req):
            if not req.path.startswith(self.prefix + "/"):
                return self.not_found(req), None  # what the proxy's host serves outside the prefix
            req.path = req.path[len(self.prefix) :]
        return super().handle(req)

    def trust_service_account(self, client_email: str, key_id: str, public_key: Any) -> None:
        """Trust another service account's key (a test that brings its own throw-away key)."""
        with self._state_lock:
            self._accounts[client_email] = (key_id, public_key)

    def admin_email(self) -> str:
        with self.org.lock:
            ceo = self.org.people.get(1)
            return self._email(ceo) if ceo else f"admin@{self.org.domain}"

    def issue_token(self, subject: str | None, scopes: set[str] | frozenset[str]) -> str:
        grant = {"sub": subject, "scp": sorted(scopes), "exp": time.time() + TOKEN_LIFETIME,
                 "jti": secrets.token_hex(8)}  # fmt: skip
        return "ya29.emu-" + signed_token(self._token_key, grant)

    def _grant(self, token: str) -> tuple[str | None, frozenset[str], float] | None:
        """(subject, scopes, expiry) of an access token this emulator signed; None for anything else."""
        if not token.startswith("ya29.emu-"):
            return None
        grant = token_claims(self._token_key, token.removeprefix("ya29.emu-"))
        return None if grant is None else (grant["sub"], frozenset(grant["scp"]), float(grant["exp"]))

    def before_fork(self) -> None:
        self.service_account_info()  # the default account's key, made once for every worker

    def tenant_config(self, tenant: str, workdir: Path, *, key_prefix: str = "") -> dict[str, Any]:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"{key_prefix}{tenant}-google-service-account.json"
        path.write_text(json.dumps(self.service_account_info(), indent=2), encoding="utf-8")
        path.chmod(0o600)
        return {
            "provider": "google_workspace",
            "credentials_file": f"file:{path}",
            "subject": self.admin_email(),
            "customer": "my_customer",
            "api_url": self.base_url + self.prefix,
        }

    def _oauth_error(self, status: int, error: str, description: str) -> Response:
        return Response(status, {"error": error, "error_description": description})

    def _token_endpoint(self, req: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != JWT_BEARER:
            return self._oauth_error(
                400, "unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type')}"
            )
        assertion = form.get("assertion", "")
        parts = assertion.split(".")
        if len(parts) != 3:
            return self._oauth_error(400, "invalid_grant", "Invalid JWT: malformed assertion.")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError):
            return self._oauth_error(400, "invalid_grant", "Invalid JWT: malformed assertion.")
        if header.get("alg") != "RS256":
            return self._oauth_error(400, "invalid_grant", "Invalid JWT: only RS256 is accepted.")
        with self._state_lock:
            account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            return self._oauth_error(400, "invalid_grant", "Invalid grant: account not found")
        kid, public_key = account
        if header.get("kid") not in (None, kid):
            return self._oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            public_key.verify(
                signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return self._oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (
            not isinstance(iat, int | float)
            or not isinstance(exp, int | float)
            or exp <= now
            or iat > now + 300
            or exp - iat > 3600
        ):
            return self._oauth_error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                "Check your iat and exp values in the JWT claim.",
            )
        if claims.get("aud") not in (GOOGLE_TOKEN_AUD, self.token_url):
            return self._oauth_error(400, "invalid_grant", "Invalid JWT: audience is not the token endpoint.")
        scopes = frozenset(str(claims.get("scope", "")).split())
        if not scopes:
            return self._oauth_error(
                400, "invalid_scope", "Invalid OAuth scope or ID token audience provided."
            )
        sub = claims.get("sub")
        if sub is not None and str(sub).lower().rpartition("@")[2] not in self._domains():
            return self._oauth_error(400, "invalid_grant", "Invalid email or User ID")
        if sub is not None and not scopes <= self.delegated_scopes:
            # Impersonation needs every requested scope delegated to this client id.
            return self._oauth_error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client not "
                "authorized for any of the scopes requested.",
            )
        token = self.issue_token(sub, scopes)
        return Response(200, {"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"})

    # --- vendor wording of errors ----------------------------------------------------------------

    def authenticate(self, req: Request) -> Response | None:
        if not req.path.startswith(API):
            return None
        header = req.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        grant = self._grant(token) if scheme.lower() == "bearer" else None
        if grant is None or grant[2] < time.time():
            return self.unauthorized(req)
        subject, scopes, _ = grant
        if subject is None:
            # A service account acting as itself (no domain-wide delegation) sees no directory.
            return Response(403, google_error(403, "Not Authorized to access this resource/api", "forbidden"))
        if req.path.endswith("/members") or "/hasMember/" in req.path:
            needed = MEMBER_SCOPES
        elif req.path.startswith(API + "/groups"):
            needed = GROUP_SCOPES
        else:
            needed = USER_SCOPES
        if not scopes & needed:
            return Response(
                403,
                google_error(
                    403, "Request had insufficient authentication scopes.", "insufficientPermissions"
                ),
            )
        # `sub` must be an admin (directory-apis.md §2.1 "Auth"): a user who is not is issued a
        # token, and the directory refuses it as it refuses a customer that is not the subject's.
        # Only users.list/users.get in the `domain_public` view are any user's to read (that view
        # is served as the admin's here: the emulator does not cut it down to the public fields).
        public = req.arg("viewType") == "domain_public" and req.path.startswith(API + "/users")
        if not public and not self._is_admin(subject):
            return Response(403, google_error(403, "Not Authorized to access this resource/api", "forbidden"))
        return None

    def _is_admin(self, subject: str) -> bool:
        """Whether `subject` (the token's impersonated user) is an admin's address or alias."""
        key = subject.lower()
        with self.org.lock:
            for n in self.admins:
                p = self.org.people.get(n)
                if p is not None and p.visible and key in (self._email(p).lower(), (self._user_alias(p) or "").lower()):
                    return True
        return False

    def unauthorized(self, req: Request) -> Response:
        body = google_error(
            401,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
            "other valid authentication credential. See "
            "https://developers.google.com/identity/sign-in/web/devconsole-project.",
            "authError",
            location="Authorization",
            locationType="header",
        )
        body["error"]["errors"][0]["message"] = "Invalid Credentials"
        return Response(401, body, [("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/"')])

    def rate_limited(self, req: Request) -> Response:
        kind = self.rate_limit_kind
        if kind == "alternate":
            self._rate_limit_count += 1
            kind = "user" if self._rate_limit_count % 2 else "concurrent"
        if kind == "user":
            return Response(
                403, google_error(403, "User Rate Limit Exceeded", "userRateLimitExceeded", "usageLimits")
            )
        if kind == "quota":
            return Response(403, google_error(403, "Quota Exceeded", "quotaExceeded", "usageLimits"))
        return Response(429, google_error(429, "Rate Limit Exceeded", "rateLimitExceeded", "usageLimits"))

    def server_error(self, req: Request, status: int) -> Response:
        if status == 500:
            body = google_error(500, "Internal error encountered.", "backendError")
        else:
            body = google_error(status, "The service is currently unavailable.", "backendError")
        return Response(status, body)

    def not_found(self, req: Request) -> Response:
        return Response(
            404, google_error(404, "Resource Not Found: " + req.path.rsplit("/", 1)[-1], "notFound")
        )

    # --- rendering -------------------------------------------------------------------------------

    def _email(self, p: Person) -> str:
        # Every Google account has a primary address; people without a mailbox keep their login.
        address = p.email or p.username
        if self.secondary_domain and p.n in self.secondary_people:
            return address.rpartition("@")[0] + "@" + self.secondary_domain
        return address

    def _group_email(self, g: Group) -> str | None:
        if g.email and self.secondary_domain and g.n in self.secondary_groups:
            return g.email.rpartition("@")[0] + "@" + self.secondary_domain
        return g.email

    def _domains(self) -> tuple[str, ...]:
        """The customer's domains, primary first."""
        return (self.org.domain, self.secondary_domain) if self.secondary_domain else (self.org.domain,)

    def _user_alias(self, p: Person) -> str | None:
        """The alias made when the account was created (every fourth person with a mailbox):
        renames do not touch it."""
        if not p.email or p.n % 4:
            return None
        given, family = [*p.username.split("@")[0].split("."), "x", "x"][:2]
        return f"{given[:1]}{family}.{p.n}@{self.org.domain}"

    @staticmethod
    def org_unit(p: Person) -> str:
        """The person's org unit: their department, and for every third person a location sub-OU."""
        if not p.department:
            return "/"
        return f"/{p.department}/{p.location}" if p.n % 3 == 0 else f"/{p.department}"

    def _check_customer(self, req: Request, *, allow_user_key: bool = False) -> None:
        customer, domain = req.arg("customer"), req.arg("domain")
        user_key = req.arg("userKey") if allow_user_key else None
        if user_key and customer:
            raise _bad("Bad Request: userKey cannot be combined with customer")
        if not customer and not domain and not user_key:
            raise _bad("Bad Request")
        if customer and customer not in ("my_customer", self.org.customer_id):
            raise _BadRequest(
                Response(403, google_error(403, "Not Authorized to access this resource/api", "forbidden"))
            )
        if domain and domain.lower() not in self._domains():
            raise _BadRequest(
                Response(403, google_error(403, "Not Authorized to access this resource/api", "forbidden"))
            )

    @staticmethod
    def _max_results(req: Request, default: int, cap: int) -> int:
        raw = req.arg("maxResults")
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _bad(
                f"Invalid value '{raw}'. Values must be within the range: [1, {cap}]", "invalid"
            ) from None
        if value < 1:
            raise _bad(f"Invalid value '{raw}'. Values must be within the range: [1, {cap}]", "invalid")
        return min(value, cap)

    def render_user(self, p: Person, projection: str, mask: set[str] | None, now: float) -> dict[str, Any]:
        email = self._email(p)
        reason = p.inactive_reason if p.state == "inactive" else None
        suspended = p.state == "inactive" and reason != "archived"
        archived = reason == "archived"
        # Volatile: recent sign-ins move on every read (never-signed-in accounts show the epoch).
        last_login = "1970-01-01T00:00:00.000Z" if p.n % 11 == 0 else Org.iso(now - (p.n % 997))
        user: dict[str, Any] = {
            "kind": "admin#directory#user",
            "id": user_id(p.n),
            "etag": '"' + hashlib.sha1(f"{p.version}:{last_login}".encode()).hexdigest()[:27] + '"',
            "primaryEmail": email,
            "name": {"givenName": p.given, "familyName": p.family, "fullName": p.display},
            "isAdmin": p.n in self.admins,
            "isDelegatedAdmin": False,
            "lastLoginTime": last_login,
            "creationTime": Org.iso(p.created_at),
            "agreedToTerms": True,
            "suspended": suspended,
            "archived": archived,
            "changePasswordAtNextLogin": False,
            "ipWhitelisted": False,
            "emails": [{"address": email, "primary": True}],
            "customerId": self.org.customer_id,
            "orgUnitPath": self.org_unit(p),
            "isMailboxSetup": p.email is not None,
            "isEnrolledIn2Sv": p.n % 2 == 0,
            "isEnforcedIn2Sv": False,
            "includeInGlobalAddressList": True,
        }
        # Read-only companions of the two flags (directory-apis.md §2.1 "Suspended / archived").
        if suspended:
            user["suspensionReason"] = "ADMIN"
            user["suspensionTime"] = Org.iso(p.inactive_at)
        if archived:
            user["archivalTime"] = Org.iso(p.inactive_at)
        alias = self._user_alias(p)
        if alias:
            user["emails"].append({"address": alias})
            user["aliases"] = [alias]
        org_entry: dict[str, Any] = {"primary": True, "customType": "", "costCenter": p.cost_center}
        if p.title:
            org_entry["title"] = p.title
        if p.department:
            org_entry["department"] = p.department
        org_entry["location"] = p.location
        user["organizations"] = [org_entry]
        if p.manager is not None and p.manager in self.org.people:
            user["relations"] = [{"value": self._email(self.org.people[p.manager]), "type": "manager"}]
        user["externalIds"] = [{"value": p.employee_number, "type": "organization"}]
        if projection == "full" or (projection == "custom" and mask and SCHEMA in mask):
            user["customSchemas"] = {
                SCHEMA: {"EmployeeType": "Contractor" if p.n % 7 == 0 else "FTE", "HireDate": p.hire_date}
            }
        if p.deleted or p.soft_deleted:
            user["deletionTime"] = Org.iso(p.updated_at)
        if p.n in self.broken_users:
            del user["primaryEmail"]
        return user

    # --- users.list ------------------------------------------------------------------------------

    def _person_keys(self) -> list[int]:
        # People are only appended (with increasing n), so the cached key list only ever grows.
        if len(self._keys) != len(self.org.people):
            self._keys = list(self.org.people)
        return self._keys

    @staticmethod
    def _parse_query(query: str) -> list[tuple[str, str, str]]:
        """The (field, operator, value) clauses of a search query, joined by AND."""
        terms: list[tuple[str, str, str]] = []
        i, text = 0, query.strip()
        while i < len(text):
            if text[i].isspace():
                i += 1
                continue
            j = i
            while j < len(text) and text[j] not in "=:":
                j += 1
            if j >= len(text):
                raise _bad("Invalid Input")
            key, op = text[i:j].strip(), text[j]
            j += 1
            if j < len(text) and text[j] in "'\"":
                end = text.find(text[j], j + 1)
                if end < 0:
                    raise _bad("Invalid Input")
                value, i = text[j + 1 : end], end + 1
            else:
                end = j
                while end < len(text) and not text[end].isspace():
                    end += 1
                value, i = text[j:end], end
            terms.append((key, op, value))
        return terms

    def _matcher(self, query: str | None):  # -> Callable[[Person], bool]
        if not query:
            return lambda p: True
        checks = []
        for key, _, value in self._parse_query(query):
            if key == "orgUnitPath":
                # Matches the org unit and every org unit under it.
                ou = "/" + value.strip("/") if value.strip("/") else "/"
                checks.append(
                    lambda p, ou=ou: (
                        ou == "/" or self.org_unit(p) == ou or self.org_unit(p).startswith(ou + "/")
                    )
                )
            elif key in ("isSuspended", "isArchived"):
                want = value.lower() == "true"
                if key == "isSuspended":
                    checks.append(
                        lambda p, want=want: (
                            (p.state == "inactive" and p.inactive_reason != "archived") == want
                        )
                    )
                else:
                    checks.append(
                        lambda p, want=want: (
                            (p.state == "inactive" and p.inactive_reason == "archived") == want
                        )
                    )
            elif key == "isAdmin":
                checks.append(lambda p, want=value.lower() == "true": (p.n in self.admins) == want)
            elif key == "email":
                v = value.lower()
                if v.endswith("*"):
                    checks.append(lambda p, v=v[:-1]: self._email(p).lower().startswith(v))
                else:
                    checks.append(lambda p, v=v: self._email(p).lower() == v)
            else:
                raise _bad("Invalid Input")
        return lambda p: all(c(p) for c in checks)

    @staticmethod
    def _projection(req: Request) -> tuple[str, set[str] | None]:
        """users.list's and users.get's `projection` and `customFieldMask`, checked as Google does."""
        projection = req.arg("projection", "basic") or "basic"
        if projection not in ("basic", "custom", "full"):
            raise _bad(f"Invalid value for projection: {projection}", "invalidParameter")
        mask_arg = req.arg("customFieldMask")
        if mask_arg and projection != "custom":
            raise _bad("Invalid Input: customFieldMask needs projection=custom", "invalid")
        return projection, set(mask_arg.split(",")) if mask_arg else None

    def _users_list(self, req: Request) -> Response:
        try:
            self._check_customer(req)
            limit = self._max_results(req, 100, 500)
            projection, mask = self._projection(req)
            deleted_only = (req.arg("showDeleted") or "").lower() == "true"
            match = self._matcher(req.arg("query"))
            domain = (req.arg("domain") or "").lower()
            order = _order(req, ("email", "familyName", "givenName"))
            after = 0
            token = req.arg("pageToken")
            if token and order is None:
                value = _untoken("u", token, self.page_token_lifetime)
                if value is None or not value.isdigit():
                    raise _bad("Invalid pageToken", "invalid")
                after = int(value)
        except _BadRequest as exc:
            return exc.response
        body: dict[str, Any] = {"kind": "admin#directory#users", "etag": '"' + secrets.token_hex(8) + '"'}
        if self.silent_empty:
            return Response(200, body)
        now = time.time()
        users: list[dict[str, Any]] = []
        if order is not None:

            def wanted(p: Person) -> bool:
                gone = p.deleted or p.soft_deleted
                if gone != deleted_only or not match(p) or p.n in self.hidden_people:
                    return False
                return not domain or self._email(p).lower().endswith("@" + domain)

            sort_value = {"email": self._email, "familyName": lambda p: p.family, "givenName": lambda p: p.given}
            try:
                with self.org.lock:
                    found, next_token = _ordered_page(
                        [p for p in self.org.people.values() if wanted(p)],
                        sort_value[order[0]], order[1], "uo", token, limit, self.page_token_lifetime,
                    )  # fmt: skip
                    users = [self.render_user(p, projection, mask, now) for p in found]
            except _BadRequest as exc:
                return exc.response
            if users:
                body["users"] = users
            if next_token:
                body["nextPageToken"] = next_token
            return Response(200, body)
        with self.org.lock:
            keys = self._person_keys()
            people = self.org.people
            last = None
            more = False
            for i in range(bisect_right(keys, after), len(keys)):
                p = people[keys[i]]
                gone = p.deleted or p.soft_deleted
                if gone != deleted_only or not match(p) or p.n in self.hidden_people:
                    continue
                if domain and not self._email(p).lower().endswith("@" + domain):
                    continue
                if len(users) == limit:
                    more = True
                    break
                users.append(self.render_user(p, projection, mask, now))
                last = p.n
        if users:
            body["users"] = users
        if more and last is not None:
            body["nextPageToken"] = _token("u", str(last))
        return Response(200, body)

    # --- users.get -------------------------------------------------------------------------------

    def _users_get(self, req: Request) -> Response:
        """One user by id, primary address or alias, rendered as users.list renders it."""
        try:
            projection, mask = self._projection(req)
        except _BadRequest as exc:
            return exc.response
        with self.org.lock:
            p = self._find_person(unquote(req.params["key"]), alias=True)
            if p is None:
                # Deleted, never this customer's, or an unmanaged account with a company address.
                return Response(404, google_error(404, "Resource Not Found: userKey", "notFound"))
            if p.n in self.hidden_people:
                return Response(403, google_error(403, "Not Authorized to access this resource/api", "forbidden"))
            user = self.render_user(p, projection, mask, time.time())
        return Response(200, user)

    # --- groups.list -----------------------------------------------------------------------------

    def _direct_count(self, g: Group) -> int:
        people, subs = self.org.direct_members(g.n)
        return (
            len(people)
            + len(subs)
            + (1 if g.n in self.customer_groups else 0)
            + len(self.external_members.get(g.n, ()))
            + len(self.foreign_subgroups.get(g.n, ()))
            + len(self.unmanaged_members.get(g.n, ()))
        )

    def render_group(self, g: Group) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "admin#directory#group",
            "id": group_id(g.n),
            "etag": '"' + hashlib.sha1(f"{g.version}:{g.members_version}".encode()).hexdigest()[:27] + '"',
            "email": self._group_email(g),
            "name": g.name,
            "directMembersCount": str(self._direct_count(g)),
            "description": g.description or "",
            "adminCreated": True,
        }
        if self.group_aliases.get(g.n):
            out["aliases"] = list(self.group_aliases[g.n])
        if out["email"]:
            out["nonEditableAliases"] = [_non_editable_alias(out["email"])]
        return out

    def _find_person(self, key: str, *, alias: bool = False) -> Person | None:
        """The listed user whose id or primary address `key` is (or alias, with `alias`)."""
        n = _parse_id(key, "1077", 17)
        if n is not None:
            p = self.org.people.get(n)
            return p if p and p.visible else None
        key = key.lower()
        for p in self.org.listed_people():
            if self._email(p).lower() == key or (alias and (self._user_alias(p) or "").lower() == key):
                return p
        return None

    def _foreign_addresses(self) -> set[str]:
        return {a.lower() for addresses in self.foreign_subgroups.values() for a in addresses}

    def _find_group(self, key: str) -> Group | None:
        n = _parse_id(key, "03x8tuzt", 7)
        if n is not None:
            g = self.org.groups.get(n)
            return g if g and not g.deleted else None
        key = key.lower()
        for g in self.org.listed_groups():
            # groupKey is the group's email, an alias or its id (the aliases it is listed with).
            email = self._group_email(g)
            if email and key in (email.lower(), _non_editable_alias(email).lower()):
                return g
            if key in (a.lower() for a in self.group_aliases.get(g.n, ())):
                return g
        return None

    def _group_matcher(self, query: str | None):  # -> Callable[[Group], bool]
        """groups.list `query` (guides/search-groups): `email` and `name` with `=` (the whole value)
        or `:PREFIX*`, or `memberKey=` alone (the groups a user or group is directly in, named by
        its address, alias or id)."""
        if not query:
            return lambda g: True
        terms = self._parse_query(query)
        keys = {key for key, _, _ in terms}
        if not keys <= {"email", "name", "memberKey"} or ("memberKey" in keys and len(keys) > 1):
            raise _bad("Invalid Input")
        checks = []
        for key, op, value in terms:
            v = value.casefold()
            if key == "memberKey":
                if op != "=":
                    raise _bad("Invalid Input")
                person = self._find_person(value, alias=True)
                sub = self._find_group(value)
                checks.append(
                    lambda g, person=person, sub=sub: (
                        (person is not None and person.n in g.members) or (sub is not None and sub.n in g.subgroups)
                    )
                )
                continue
            text = (lambda g: self._group_email(g) or "") if key == "email" else (lambda g: g.name)
            if op == ":" and v.endswith("*"):
                checks.append(lambda g, text=text, v=v[:-1]: text(g).casefold().startswith(v))
            elif op == "=":
                checks.append(lambda g, text=text, v=v: text(g).casefold() == v)
            else:
                raise _bad("Invalid Input")
        return lambda g: all(c(g) for c in checks)

    def _groups_list(self, req: Request) -> Response:
        try:
            self._check_customer(req, allow_user_key=True)
            limit = self._max_results(req, 200, 200)
            order = _order(req, ("email",))
            after = 0
            token = req.arg("pageToken")
            if token and order is None:
                value = _untoken("g", token)
                if value is None or not value.isdigit():
                    raise _bad("Invalid pageToken", "invalid")
                after = int(value)
        except _BadRequest as exc:
            return exc.response
        user_key = req.arg("userKey")
        domain = (req.arg("domain") or "").lower()
        groups: list[dict[str, Any]] = []
        more = False
        last = None
        with self.org.lock:
            person = None
            if user_key:
                person = self._find_person(user_key)
                if person is None:
                    return Response(404, google_error(404, "Resource Not Found: userKey", "notFound"))
            try:
                match = self._group_matcher(req.arg("query"))
            except _BadRequest as exc:
                return exc.response
            listed = [
                g
                for g in sorted(self.org.listed_groups(), key=lambda g: g.n)
                if (person is None or person.n in g.members)
                and match(g)
                # `domain`: that domain's groups only
                and (not domain or (self._group_email(g) or "").lower().endswith("@" + domain))
            ]
            if order is not None:
                try:
                    found, next_token = _ordered_page(
                        listed, lambda g: self._group_email(g) or "", order[1], "go", token, limit
                    )
                except _BadRequest as exc:
                    return exc.response
                ordered: dict[str, Any] = {"kind": "admin#directory#groups", "etag": '"' + secrets.token_hex(8) + '"'}
                if found:
                    ordered["groups"] = [self.render_group(g) for g in found]
                if next_token:
                    ordered["nextPageToken"] = next_token
                return Response(200, ordered)
            for g in listed:
                if g.n <= after:
                    continue
                if len(groups) == limit:
                    more = True
                    break
                groups.append(self.render_group(g))
                last = g.n
        body: dict[str, Any] = {"kind": "admin#directory#groups", "etag": '"' + secrets.token_hex(8) + '"'}
        if groups:
            body["groups"] = groups
        if more and last is not None:
            body["nextPageToken"] = _token("g", str(last))
        return Response(200, body)

    # --- members.hasMember -----------------------------------------------------------------------

    def _has_member(self, req: Request) -> Response:
        """Whether a user is in a group, directly or through groups nested in it; a nested answer
        across two domains is refused ("Invalid input"), as the discovery document says."""
        key, member = unquote(req.params["key"]), unquote(req.params["member"])
        with self.org.lock:
            g = self._find_group(key)
            if g is None and any(key.lower() in (a, _foreign_group_id(a)) for a in self._foreign_addresses()):
                return Response(403, google_error(403, "Not Authorized to access this resource/api", "forbidden"))
            if g is None:
                return Response(404, google_error(404, "Resource Not Found: groupKey", "notFound"))
            p = self._find_person(member, alias=True)
            if p is None:
                return Response(404, google_error(404, "Resource Not Found: memberKey", "notFound"))
            people, subs = self.org.direct_members(g.n)
            if p.n in people or g.n in self.customer_groups:
                return Response(200, {"isMember": True})
            user_domain = self._email(p).rpartition("@")[2].lower()
            if user_domain != (self._group_email(g) or "").rpartition("@")[2].lower():
                return Response(400, google_error(400, "Invalid Input", "invalid"))
            reach, stack = set(), list(subs)
            while stack:
                cur = stack.pop()
                if cur not in reach:
                    reach.add(cur)
                    stack.extend(self.org.direct_members(cur)[1])
            nested = p.n in self.org.transitive_members(g.n) or bool(reach & self.customer_groups)
        return Response(200, {"isMember": nested})

    # --- members.list ----------------------------------------------------------------------------

    def _members_list(self, req: Request) -> Response:
        try:
            limit = self._max_results(req, 200, 200)
            offset = 0
            token = req.arg("pageToken")
            if token:
                value = _untoken("m", token)
                if value is None or not value.isdigit():
                    raise _bad("Invalid pageToken", "invalid")
                offset = int(value)
            roles = {r.strip().upper() for r in (req.arg("roles") or "").split(",") if r.strip()}
            derived = (req.arg("includeDerivedMembership") or "").lower() == "true"
        except _BadRequest as exc:
            return exc.response
        with self.org.lock:
            key = unquote(req.params["key"])
            g = self._find_group(key)
            if g is None and any(key.lower() in (a, _foreign_group_id(a)) for a in self._foreign_addresses()):
                return Response(403, google_error(403, "Not Authorized to access this resource/api", "forbidden"))
            if g is None:
                return Response(404, google_error(404, "Resource Not Found: groupKey", "notFound"))
            people, subs = self.org.direct_members(g.n)
            # The first direct member owns the group and the second manages it (of three or more).
            roles_of = dict(zip(people, ("OWNER", "MANAGER") if len(people) > 2 else ("OWNER",), strict=False))
            if derived:
                direct = set(people)
                people = people + sorted(self.org.transitive_members(g.n) - direct)
            members: list[dict[str, Any]] = []
            for n in people:
                p = self.org.people[n]
                members.append(
                    {
                        "kind": "admin#directory#member",
                        "etag": f'"m{g.n}-{n}"',
                        "id": user_id(n),
                        "email": self._email(p),
                        "role": roles_of.get(n, "MEMBER"),
                        "type": "USER",
                        "status": "ACTIVE" if p.state == "active" else "SUSPENDED",
                    }
                )
            for s in subs:
                members.append(
                    {
                        "kind": "admin#directory#member",
                        "etag": f'"g{g.n}-{s}"',
                        "id": group_id(s),
                        "email": self._group_email(self.org.groups[s]),
                        "role": "MEMBER",
                        "type": "GROUP",
                        "status": "ACTIVE",
                    }
                )
            for address in sorted(self.foreign_subgroups.get(g.n, ())):
                members.append(
                    {
                        "kind": "admin#directory#member",
                        "etag": f'"f{g.n}-{address}"',
                        "id": _foreign_group_id(address),
                        "email": address,
                        "role": "MEMBER",
                        "type": "GROUP",
                        "status": "ACTIVE",
                    }
                )
            for address in sorted(self.unmanaged_members.get(g.n, ())):
                members.append(
                    {
                        "kind": "admin#directory#member",
                        "etag": f'"u{g.n}-{address}"',
                        "id": _unmanaged_id(address),
                        "email": address,
                        "role": "MEMBER",
                        "type": "USER",
                        "status": "ACTIVE",
                    }
                )
            if g.n in self.customer_groups:
                members.append(
                    {
                        "kind": "admin#directory#member",
                        "etag": f'"c{g.n}"',
                        "id": self.org.customer_id,
                        "role": "MEMBER",
                        "type": "CUSTOMER",
                    }
                )
            for i, address in enumerate(sorted(self.external_members.get(g.n, ()))):
                members.append(
                    {
                        "kind": "admin#directory#member",
                        "etag": f'"x{g.n}-{i}"',
                        "id": f"2{int(hashlib.sha1(address.encode()).hexdigest()[:15], 16):020d}"[:21],
                        "email": address,
                        "role": "MEMBER",
                        "type": "EXTERNAL",
                        "status": "ACTIVE",
                    }
                )
        if roles:
            members = [m for m in members if m["role"] in roles]
        page = members[offset : offset + limit]
        body: dict[str, Any] = {"kind": "admin#directory#members", "etag": '"' + secrets.token_hex(8) + '"'}
        if page:
            body["members"] = page
        if offset + limit < len(members):
            body["nextPageToken"] = _token("m", str(offset + limit))
        return Response(200, body)
