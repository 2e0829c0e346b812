"""Workday Report-as-a-Service (RaaS) over the synthetic organization.

directory-apis.md §5.1 and §6 rule 5: `GET /ccx/service/customreport2/{tenant}/{owner}/{report}`
returns ONE unpaged `{"Report_Entry": [...]}`. Keys are the columns' aliases, every value is a string
(booleans `"1"`/`"0"`), a field with no value is omitted (never null), multi-valued fields are nested
arrays of objects whose alias ends in `_group`. Prompts are query parameters (`Effective_as_of_Date=…`,
an XML Schema date with an optional zone, anything else a 400; reference prompts `X!WID=wid1!wid2`).
Auth is HTTP Basic for an integration system user, or a Bearer token from
`POST /ccx/oauth2/{tenant}/token` (grant_type=refresh_token). Errors come back as XML or HTML
even when `format=json` was asked for. A report comes in the format its URL names, as the URLs under
Actions › Web Service › View URLs do: `format=json`, `format=csv` (nested `_group` values joined with
"; "), or XML (`wd:Report_Data`) without a format (RaaS's default) or with `format=xml`/`simplexml`.

Two reports are served:
  * the worker report (default name `Worker_Directory`), one row per listed person; terminated
    workers stay in it with `Active_Status` "0"; a deleted person is simply absent (Workday has no
    deletions, a row that disappears is how a "deleted" worker looks to a report consumer);
  * the groups report (default name `Worker_Groups`), one row per group with its direct members and
    its direct subgroups as nested `_group` arrays.

Switches (constructor arguments, or attributes a test may change while the emulator runs; over HTTP
at `POST /_emulator/workday`):
  columns        the worker report's column set (standard names below); None = all of them
  aliases        standard column name → the alias this tenant's report uses (e.g. Email_Address →
                 Work_Email), to emulate a tenant whose report was built with other aliases; applies
                 to the groups report's columns too (e.g. Members_group → Worker_group)
  error_format   "xml" (SOAP-ish fault), "html" (an error page) or "json", for 4xx/5xx bodies
  forbidden      report names the integration user may not run → 403 with an HTML page
  login_page     answer report requests with 200 and an HTML sign-in page (an SSO redirect gone wrong)
  lone_objects   a nested `_group` column with a single entry comes as that object instead of an
                 array of one (as some XML-to-JSON conversions send it)
  numeric_ids    worker ids (`Employee_ID`, `Manager_Employee_ID`, also inside `Members_group`) as
                 JSON numbers, as a calculated field may send them
  token_response a JSON object the token endpoint answers a valid grant with (200) instead of a
                 token, e.g. one without `access_token`; None = a token
  echo_grant     the token endpoint's invalid_client/invalid_grant errors quote the client secret
                 or refresh token sent, as some OAuth servers do ("Invalid refresh token: …")
  json_content_type  the Content-Type a JSON report is labelled with (a proxy may relabel it,
                 e.g. text/plain); default application/json

A report this user cannot run (an unknown tenant, owner or report name in the URL) is a 500 with a
SOAP `Client.validationError` fault; an outage's 5xx carries a `Server` fault.

Faults (server.Faults) apply as everywhere: `error` → 5xx with the XML/HTML body above, `rate_limit`
→ 503 + Retry-After (Workday documents no 429), `expire_auth` → 401 (a bearer token is forgotten),
`delay` → a slow report, `drop`/`malformed` → a cut or broken body.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import secrets
import threading
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from dirpull.emulators.org import Group, Org, Person
from dirpull.emulators.server import Emulator, Request, Response, flag, one_of

WORKER_COLUMNS: tuple[str, ...] = (
    "Employee_ID",
    "Worker",
    "Legal_Name",
    "First_Name",
    "Last_Name",
    "Email_Address",
    "Email_Address_group",
    "User_Name",
    "Active_Status",
    "Worker_Status",
    "Hire_Date",
    "Termination_Date",
    "Manager",
    "Manager_Employee_ID",
    "Supervisory_Organization",
    "Job_Title",
    "Cost_Center",
    "Location",
    "Worker_Type",
)
GROUP_COLUMNS: tuple[str, ...] = (
    "Group_ID",
    "Group_Name",
    "Group_Description",
    "Members_group",
    "Subgroups_group",
)

# Report rows are encoded this many at a time into one growing buffer: the body exists once.
_CHUNK_ROWS = 1000


def employee_id(n: int) -> str:
    """The Workday Employee_ID of Person n (also what Manager_Employee_ID refers to)."""
    return str(21000 + n)


def group_id(n: int) -> str:
    return f"WG-{n:05d}"


def wid(kind: str, value: str) -> str:
    """A Workday ID (32 hex digits) for a reference value, stable across runs."""
    return hashlib.md5(f"{kind}:{value}".encode()).hexdigest()


class WorkdayEmulator(Emulator):
    name = "workday"

    def __init__(
        self,
        org: Org,
        *,
        tenant: str = "dirpull_demo",
        owner: str = "ISU_Sync",
        users_report: str = "Worker_Directory",
        groups_report: str = "Worker_Groups",
        username: str = "ISU_Sync@dirpull_demo",
        password: str = "wd-isu-password",
        client_id: str = "wd-api-client",
        client_secret: str = "wd-client-secret",
        refresh_token: str = "wd-refresh-token",
        columns: list[str] | tuple[str, ...] | None = None,
        aliases: dict[str, str] | None = None,
        error_format: str = "xml",
    ) -> None:
        super().__init__(org)
        self.tenant = tenant
        self.owner = owner
        self.users_report = users_report
        self.groups_report = groups_report
        self.username = username
        self.password = password
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.columns = tuple(columns) if columns is not None else WORKER_COLUMNS
        self.aliases = dict(aliases or {})
        self.error_format = error_format
        self.forbidden: set[str] = set()
        # Answer report requests with 200 and an HTML sign-in page (an SSO redirect gone wrong).
        self.login_page = False
        # The Content-Type of a JSON report (a proxy in between may relabel it).
        self.json_content_type = "application/json"
        # A `_group` column with one entry as that object, not an array of one.
        self.lone_objects = False
        # Worker ids as JSON numbers (a calculated field), not strings.
        self.numeric_ids = False
        # The token endpoint's 200 body for a valid grant instead of a token (None = a token).
        self.token_response: dict[str, Any] | None = None
        self.echo_grant = False
        # Every report request's prompts (query parameters minus `format`), for tests.
        self.prompts_log: list[dict[str, str]] = []
        self.tokens: set[str] = set()
        self.tokens_issued = 0
        self._tok_lock = threading.Lock()
        self.route(
            "GET",
            r"/ccx/service/customreport2/(?P<tenant>[^/]+)/(?P<owner>[^/]+)/(?P<report>[^/]+)",
            self._report,
        )
        self.route("POST", r"/ccx/oauth2/(?P<tenant>[^/]+)/token", self._token)
        self.switch_route(
            "/_emulator/workday",
            {
                "columns": lambda v: tuple(str(c) for c in v),
                "aliases": lambda v: {str(k): str(a) for k, a in dict(v).items()},
                "error_format": one_of("xml", "html", "json"),
                "forbidden": lambda v: {str(r) for r in v},
                "login_page": flag,
                "lone_objects": flag,
                "numeric_ids": flag,
                "token_response": lambda v: None if v is None else dict(v),
                "echo_grant": flag,
                "json_content_type": str,
            },
        )

    # --- vendor wording of errors ------------------------------------------------------------------

    def error(
        self, status: int, message: str, *, fault: str = "Processing error occurred",
        faultcode: str = "SOAP-ENV:Client.validationError",
    ) -> Response:  # fmt: skip
        """An error in the configured body style; Workday ignores `format=json` for errors. A SOAP
        fault's code says whose fault it is: `Client…` for a request that is wrong as sent (a report
        that does not exist for this user), `Server` for an outage (SOAP 1.1 §4.4.1)."""
        if self.error_format == "json":
            return Response(status, {"error": fault, "errors": [{"error": message}]})
        if self.error_format == "html":
            title = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}.get(status, "Error")
            page = (
                f"<!DOCTYPE html><html><head><title>{title}</title>"
                "<style>body{font-family:sans-serif}</style></head>"
                f"<body><h1>{status} {title}</h1><p>{_esc(message)}</p><hr>"
                "<address>Workday</address></body></html>"
            )
            return Response(status, page, content_type="text/html")
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/">'
            f"<SOAP-ENV:Body><SOAP-ENV:Fault><faultcode>{_esc(faultcode)}</faultcode>"
            f"<faultstring>{_esc(fault)}</faultstring><detail>"
            '<wd:Error xmlns:wd="urn:com.workday/bsvc">'
            f"<wd:Message>{_esc(message)}</wd:Message></wd:Error>"
            "</detail></SOAP-ENV:Fault></SOAP-ENV:Body></SOAP-ENV:Envelope>"
        )
        return Response(status, xml, content_type="text/xml")

    def authenticate(self, req: Request) -> Response | None:
        if req.path.startswith("/ccx/oauth2/"):
            return None  # the token endpoint checks the client itself
        header = req.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, pwd = base64.b64decode(value).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return self.unauthorized(req)
            # As bytes: compare_digest refuses str with a character beyond ASCII.
            if secrets.compare_digest(user.encode(), self.username.encode()) and secrets.compare_digest(
                pwd.encode(), self.password.encode()
            ):
                return None
        elif scheme.lower() == "bearer":
            with self._tok_lock:
                if value in self.tokens:
                    return None
        return self.unauthorized(req)

    def unauthorized(self, req: Request) -> Response:
        # An expired bearer token is forgotten, so the client must refresh.
        header = req.headers.get("Authorization") or ""
        if header.lower().startswith("bearer "):
            with self._tok_lock:
                self.tokens.discard(header[7:])
        resp = self.error(401, "Invalid username or password", fault="Authentication failed")
        resp.headers.append(("WWW-Authenticate", 'Basic realm="Workday"'))
        return resp

    def rate_limited(self, req: Request) -> Response:
        resp = self.error(
            503, "The server is temporarily unable to service your request", fault="Busy", faultcode="SOAP-ENV:Server"
        )
        resp.headers.append(("Retry-After", "1"))
        return resp

    def server_error(self, req: Request, status: int) -> Response:
        return self.error(
            status,
            "An unexpected error occurred while running the report. Please contact Workday support.",
            faultcode="SOAP-ENV:Server",
        )

    def not_found(self, req: Request) -> Response:
        return self.error(404, f"Resource not found: {req.path}", fault="Invalid request")

    # --- OAuth -------------------------------------------------------------------------------------

    def _token(self, req: Request) -> Response:
        if req.params["tenant"] != self.tenant:
            return self.not_found(req)
        form = {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        cid, csecret = form.get("client_id"), form.get("client_secret")
        header = req.headers.get("Authorization") or ""
        if header.lower().startswith("basic "):
            try:
                cid, _, csecret = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                cid = csecret = None
        if cid != self.client_id or csecret != self.client_secret:
            said = f"Invalid client: {cid}:{csecret}" if self.echo_grant else "Invalid client"
            return Response(401, {"error": "invalid_client", "error_description": said})
        if form.get("grant_type") != "refresh_token":
            return Response(400, {"error": "unsupported_grant_type"})
        if form.get("refresh_token") != self.refresh_token:
            said = f"Invalid refresh token: {form.get('refresh_token')}" if self.echo_grant else "Invalid refresh token"
            return Response(400, {"error": "invalid_grant", "error_description": said})
        if self.token_response is not None:
            return Response(200, self.token_response)
        token = secrets.token_urlsafe(24)
        with self._tok_lock:
            self.tokens.add(token)
            self.tokens_issued += 1
        return Response(
            200, {"access_token": token, "token_type": "Bearer", "refresh_token": self.refresh_token}
        )

    # --- reports -----------------------------------------------------------------------------------

    def _report(self, req: Request) -> Response:
        p = req.params
        if p["tenant"] != self.tenant or p["owner"] != self.owner:
            return self.error(500, f"Invalid request: report {p['owner']}/{p['report']} not found in tenant")
        if p["report"] in self.forbidden:
            return self.error_page_forbidden(p["report"])
        if self.login_page:
            page = (
                "<!DOCTYPE html><html><head><title>Workday</title></head><body>"
                "<h1>Sign In</h1><p>Your session has expired. Please sign in.</p></body></html>"
            )
            return Response(200, page, content_type="text/html")
        prompts = {k: v[0] for k, v in req.query.items() if k != "format"}
        with self._lock:
            self.prompts_log.append(prompts)
        # The report in the format its URL names (Actions › Web Service › View URLs lists JSON,
        # CSV, XML, …); without one, RaaS answers XML.
        fmt = (req.arg("format") or "xml").lower()
        if fmt not in ("json", "csv", "xml", "simplexml"):
            return self.error(400, f"format {fmt} is not served by this emulator", fault="Invalid request")
        as_of = _as_of(prompts.get("Effective_as_of_Date"))
        if as_of is None:
            return self.error(
                400, "Invalid value for prompt Effective_as_of_Date", fault="Validation error occurred"
            )
        if p["report"] == self.users_report:
            if fmt == "json":
                return Response(200, self._users_body(prompts, as_of), content_type=self.json_content_type)
            rows = self._users_rows(prompts, as_of)
        elif p["report"] == self.groups_report:
            if fmt == "json":
                return Response(200, self._groups_body(), content_type=self.json_content_type)
            rows = self._groups_rows()
        else:
            return self.error(500, f"Invalid request: report {p['owner']}/{p['report']} not found in tenant")
        if fmt == "csv":
            return Response(200, self._csv(rows), content_type="text/csv; charset=utf-8")
        return Response(200, self._xml(rows, p["report"]), content_type="text/xml; charset=utf-8")

    def error_page_forbidden(self, report: str) -> Response:
        page = (
            "<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body><h1>Forbidden</h1>"
            f"<p>The task submitted is not authorized: {_esc(report)}</p></body></html>"
        )
        return Response(403, page, content_type="text/html")

    def _users_body(self, prompts: dict[str, str], as_of: date) -> bytes:
        return self._encode(self._users_rows(prompts, as_of))

    def _groups_body(self) -> bytes:
        return self._encode(self._groups_rows())

    def _users_rows(self, prompts: dict[str, str], as_of: date) -> Any:
        filters = {
            k[: -len("!WID")]: set(v.split("!")) for k, v in prompts.items() if k.endswith("!WID") and v
        }
        columns = self.columns
        names = {c: self.aliases.get(c, c) for c in columns}

        def rows() -> Any:
            for person in self.org.listed_people():
                row = self.worker_row(person, as_of)
                if filters and not all(wid(col, row.get(col, "")) in ws for col, ws in filters.items()):
                    continue
                row = self._shaped(row)
                yield {names[c]: row[c] for c in columns if c in row}

        return rows()

    def _groups_rows(self) -> Any:
        def rows() -> Any:
            for group in self.org.listed_groups():
                yield {self.aliases.get(k, k): v for k, v in self._shaped(self.group_row(group)).items()}

        return rows()

    def _shaped(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row (standard column names) as sent: with `numeric_ids`, worker ids are numbers; with
        `lone_objects`, a one-entry `_group` array becomes its entry."""
        if self.numeric_ids:
            row = _numeric_ids(row)
        if self.lone_objects:
            row = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in row.items()}
        return row

    def _encode(self, rows: Any) -> bytes:
        """`{"Report_Entry":[…]}` built chunk by chunk into one buffer, under the org lock."""
        buf = io.BytesIO()
        buf.write(b'{"Report_Entry":[')
        enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        # backslashreplace: a lone surrogate in a value goes out as its JSON escape (server.Response)
        first = True
        chunk: list[str] = []
        with self.org.lock:
            for row in rows:
                chunk.append(enc(row))
                if len(chunk) >= _CHUNK_ROWS:
                    buf.write((("" if first else ",") + ",".join(chunk)).encode("utf-8", "backslashreplace"))
                    first, chunk = False, []
            if chunk:
                buf.write((("" if first else ",") + ",".join(chunk)).encode("utf-8", "backslashreplace"))
        buf.write(b"]}")
        return buf.getvalue()

    def _csv(self, rows: Any) -> bytes:
        """The report as CSV: a header of every column any row has, one line per row; a nested
        `_group` column's values joined with "; " (its entries' first values)."""
        with self.org.lock:
            listed = list(rows)
        header = list(dict.fromkeys(k for row in listed for k in row))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(header)
        for row in listed:
            writer.writerow([_flat(row.get(k)) for k in header])
        return out.getvalue().encode("utf-8", "backslashreplace")

    def _xml(self, rows: Any, report: str) -> bytes:
        """The report as RaaS's XML: `wd:Report_Data` of `wd:Report_Entry` elements, a nested
        `_group` column as one element per entry."""
        ns = f"urn:com.workday.report/{report}"
        root = ET.Element("wd:Report_Data", {"xmlns:wd": ns})

        def put(parent: ET.Element, key: str, value: Any) -> None:
            if isinstance(value, list):
                for item in value:
                    put(parent, key, item)
            elif isinstance(value, dict):
                el = ET.SubElement(parent, f"wd:{key}")
                for k, v in value.items():
                    put(el, k, v)
            else:
                ET.SubElement(parent, f"wd:{key}").text = str(value)

        with self.org.lock:
            for row in rows:
                entry = ET.SubElement(root, "wd:Report_Entry")
                for key, value in row.items():
                    put(entry, key, value)
        return b"<?xml version='1.0' encoding='UTF-8'?>\n" + ET.tostring(root, encoding="utf-8", xml_declaration=False)

    def worker_row(self, p: Person, as_of: date) -> dict[str, Any]:
        """Every standard column of one worker; empty values are left out, as Workday does."""
        people = self.org.people
        terminated = p.state == "inactive" and p.inactive_reason == "terminated"
        # A termination takes effect the day after the termination date (the last day worked);
        # one before the hire date belongs to an earlier employment (a rehire).
        if p.termination_date and p.hire_date <= p.termination_date < as_of.isoformat():
            terminated = True
        active = p.state == "active" and not terminated
        row: dict[str, Any] = {
            "Employee_ID": employee_id(p.n),
            "Worker": _name(p),
            "Legal_Name": _name(p),
            "First_Name": p.given,
            "Last_Name": p.family,
            "User_Name": p.username,
            "Active_Status": "1" if active else "0",
            "Worker_Status": "Active" if active else ("Terminated" if terminated else "Inactive"),
            "Hire_Date": p.hire_date,
            "Location": p.location,
            "Cost_Center": p.cost_center,
            "Worker_Type": "Contingent Worker" if p.n % 10 == 7 else "Employee",
        }
        if p.email:
            row["Email_Address"] = p.email
            emails = [{"Email_Address": p.email, "Usage_Type": "WORK", "Primary": "1"}]
            if p.n % 5 == 0:
                emails.append(
                    {
                        "Email_Address": f"{p.username.split('@')[0]}@home.invalid",
                        "Usage_Type": "HOME",
                        "Primary": "0",
                    }
                )
            row["Email_Address_group"] = emails
        if p.termination_date:
            row["Termination_Date"] = p.termination_date
        manager = people.get(p.manager) if p.manager is not None else None
        if manager is not None and manager.visible:
            row["Manager"] = _name(manager)
            row["Manager_Employee_ID"] = employee_id(manager.n)
        if p.department:
            row["Supervisory_Organization"] = p.department
        if p.title:
            row["Job_Title"] = p.title
        # A field with no value is left out of the row, never sent as "" (a worker with one name
        # has no First_Name; a blank location no Location).
        return {k: v for k, v in row.items() if v != ""}

    def group_row(self, g: Group) -> dict[str, Any]:
        people, subs = self.org.direct_members(g.n)
        row: dict[str, Any] = {"Group_ID": group_id(g.n), "Group_Name": g.name}
        if g.description:
            row["Group_Description"] = g.description
        if people:
            row["Members_group"] = [{"Employee_ID": employee_id(n)} for n in people]
        if subs:
            row["Subgroups_group"] = [{"Group_ID": group_id(n)} for n in subs]
        return row

    # --- configuration for dirpull -----------------------------------------------------------------

    def report_url(self, report: str) -> str:
        return f"{self.base_url}/ccx/service/customreport2/{self.tenant}/{self.owner}/{report}?format=json"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/ccx/oauth2/{self.tenant}/token"

    def tenant_config(self, tenant: str, workdir: Path) -> dict[str, Any]:
        return {
            "provider": "workday",
            "users_report_url": self.report_url(self.users_report),
            "groups_report_url": self.report_url(self.groups_report),
            "username": self.username,
            "password": self.password,
            "prompts": {"Effective_as_of_Date": "{today}"},
            "timeout": 120.0,
        }


# A date prompt's value in the XML Schema date form Workday's prompts take: the day, optionally
# with a zone (`2018-10-01`, `2018-10-01-07:00`, `2018-10-01Z`). Python's `date.fromisoformat`
# alone also reads `20181001`, `2018-W40-1` and a datetime, which a date prompt refuses.
_XS_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})(?:Z|[+-]\d{2}:\d{2})?")


def _as_of(value: str | None) -> date | None:
    """`Effective_as_of_Date` as Workday takes it: `2018-10-01` or `2018-10-01-07:00`."""
    if not value:
        return datetime.now(UTC).date()  # as the org dates hires and terminations
    matched = _XS_DATE.fullmatch(value)
    if matched is None:
        return None
    try:
        return date.fromisoformat(matched.group(1))
    except ValueError:  # a day that does not exist: 2018-02-30
        return None


def _name(p: Person) -> str:
    """A worker's name as Workday shows it: the names it has, without the space of a missing one."""
    return " ".join(part for part in (p.given, p.family) if part)


def _flat(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return "; ".join(_flat(next(iter(v.values()), None) if isinstance(v, dict) else v) for v in value)
    return str(value)


def _numeric_ids(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in ("Employee_ID", "Manager_Employee_ID"):
            v = int(v)
        elif isinstance(v, list):
            v = [_numeric_ids(i) if isinstance(i, dict) else i for i in v]
        out[k] = v
    return out


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
