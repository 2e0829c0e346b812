"""BambooHR, as ../shared/directory-apis.md §4 describes it, over the shared synthetic `Org`.

Served under both base prefixes: the legacy `/api/gateway.php/{companyDomain}/v1/...` (only the
configured company) and the host-style `/api/v1/...` (any company: the real host names the company,
here everything is 127.0.0.1).

  GET  v1/employees/directory         Active employees only; 403 when directory sharing is off
  POST v1/reports/custom?format=JSON  Active AND Inactive; string values; unknown fields omitted
  GET  v1/employees/changed?since=    {"latest", "employees": {"<id>": {...}}} — keyed by id
  GET  v1/employees/{id}?fields=      one employee; 404 once deleted; 400 + header on a bad field
  GET  v1/meta/fields                 the field list

Everything answers XML unless `Accept: application/json` (the custom report follows `format=`,
JSON or XML; CSV/PDF/XLS are not served, and `onlyCurrent` is accepted and ignored). Auth is HTTP
Basic with the API key as the user name and any password. Vendor semantics over the Org: employee
id = str(Person.n); hard- and soft-deleted people are both "Deleted" (BambooHR has no soft delete);
any inactive person is status "Inactive" with a terminationDate (their termination date, else the
day of their last change). A future hire (hireDate after `today`) is status "Inactive" too, with an
empty terminationDate ("Future hires have a status of Inactive"; a rehire keeps the earlier
employment's, [U] whether BambooHR clears it), left out of the directory, and
turns "Active" on their hire date. A termination entered ahead of time (an active person with a
termination date, `Org.schedule_termination`) is status "Active" with that terminationDate until
the date, and "Inactive" (left out of the directory) from the date on. `lastChanged` has second
precision and `changed?since=` compares against it strictly.

Switches (attributes, set them before or while serving; over HTTP at `POST /_emulator/bamboohr`,
dates as "YYYY-MM-DD"):
  directory_sharing     False → directory answers 403
  permitted             False → a valid key is answered 403 everywhere (the key's user lacks access)
  throttle_429_from     the date BambooHR moves throttling from 503 to 429 (2026-09-16); `today`
                        before it → 503 + Retry-After, on/after it → 429 + Retry-After
  today                 the emulator's idea of today's date (default None: the wall clock's date by UTC):
                        throttling, which hires are future hires and which scheduled
                        terminations have taken effect
  hire_flip_changes     whether the day a future hire starts (status Inactive → Active) moves their
                        lastChanged, so that `employees/changed` lists them [U; default False: it
                        does not]. The moment is the hire date's midnight (UTC) under the wall
                        clock, or when `today` was set past the hire date
  termination_flip_changes  the same for the day a scheduled termination takes effect (status
                        Active → Inactive) [U; default False: it does not]. The moment is the
                        termination date's midnight (UTC), or when `today` was set past it
  retry_after           the Retry-After value sent when throttling
  error_header          "X-BambooHR-Error-Message" or the misspelled "X-BambooHR-Error-Messsage" [U]
  supervisor_ids_swapped  False: supervisorEId = supervisor's employee id, supervisorId = the
                        supervisor's employeeNumber; True: the other reading (Workato's labels) [U]
  empty_date            how an empty date is rendered ("0000-00-00" [U], or None)
  forbidden_fields      fields the key's user may not see: silently dropped from reports
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from dirpull.emulators.org import Org, Person
from dirpull.emulators.server import Emulator, Request, Response, flag, one_of

DEFAULT_KEY = "demo-bamboohr-api-key"
DEFAULT_COMPANY = "acme"
NEW_THROTTLE_DATE = date(2026, 9, 16)
MAX_REPORT_FIELDS = 400

_GATEWAY = r"/api/gateway\.php/(?P<company>[^/]+)/v1"
_HOSTSTYLE = r"/api/v1"

# field id → (type, label). The order is the order `meta/fields` lists them.
FIELDS: dict[str, tuple[str, str]] = {
    "id": ("int", "Employee ID"),
    "employeeNumber": ("text", "Employee #"),
    "firstName": ("text", "First Name"),
    "lastName": ("text", "Last Name"),
    "preferredName": ("text", "Preferred Name"),
    "displayName": ("text", "Display Name"),
    "workEmail": ("email", "Work Email"),
    "homeEmail": ("email", "Home Email"),
    "bestEmail": ("email", "Email"),
    "status": ("status", "Status"),
    "employmentHistoryStatus": ("list", "Employment Status"),
    "department": ("list", "Department"),
    "division": ("list", "Division"),
    "location": ("list", "Location"),
    "jobTitle": ("list", "Job Title"),
    "supervisor": ("employee", "Supervisor"),
    "supervisorEId": ("int", "Supervisor EID"),
    "supervisorId": ("text", "Supervisor ID"),
    "supervisorEmail": ("email", "Supervisor Email"),
    "hireDate": ("date", "Hire Date"),
    "originalHireDate": ("date", "Original Hire Date"),
    "terminationDate": ("date", "Termination Date"),
    "lastChanged": ("timestamp", "Last Changed"),
    "customCostCenter": ("list", "Cost Center"),
}
DATE_FIELDS = frozenset(k for k, (t, _) in FIELDS.items() if t == "date")
DIRECTORY_FIELDS = [
    "displayName",
    "firstName",
    "lastName",
    "preferredName",
    "jobTitle",
    "workEmail",
    "department",
    "location",
    "division",
    "supervisor",
]
_DIVISIONS = {
    "Engineering": "R&D",
    "Research": "R&D",
    "Data": "R&D",
    "Design": "R&D",
    "Security": "R&D",
    "Sales": "Go To Market",
    "Marketing": "Go To Market",
    "Support": "Go To Market",
}


def iso_seconds(ts: float) -> str:
    """BambooHR's timestamp form: seconds precision with an explicit offset."""
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def parse_since(text: str | None) -> float | None:
    """An ISO-8601 date-time with a zone (Z or ±hh:mm), or a bare date; None when invalid."""
    if not text:
        return None
    value = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        value += "T00:00:00+00:00"
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


class BambooHREmulator(Emulator):
    name = "bamboohr"

    def __init__(self, org: Org, *, api_key: str = DEFAULT_KEY, company_domain: str = DEFAULT_COMPANY) -> None:
        super().__init__(org)
        self.api_key = api_key
        self.company_domain = company_domain
        self.directory_sharing = True
        self.permitted = True
        self.throttle_429_from = NEW_THROTTLE_DATE
        self._today: date | None = None
        # "hire" / "termination" → person → when `today` was set past their hire / termination date
        self._flipped: dict[str, dict[int, float]] = {"hire": {}, "termination": {}}
        self.hire_flip_changes = False
        self.termination_flip_changes = False
        self.retry_after = "1"
        self.error_header = "X-BambooHR-Error-Message"
        self.supervisor_ids_swapped = False
        self.empty_date: str | None = "0000-00-00"
        self.forbidden_fields: set[str] = set()
        for prefix in (_GATEWAY, _HOSTSTYLE):
            self.route("GET", prefix + r"/employees/directory", self._directory)
            self.route("POST", prefix + r"/reports/custom", self._custom_report)
            self.route("GET", prefix + r"/employees/changed", self._changed)
            self.route("GET", prefix + r"/meta/fields", self._meta_fields)
            self.route("GET", prefix + r"/employees/(?P<eid>[^/]+)", self._employee)
        self.switch_route(
            "/_emulator/bamboohr",
            {
                "directory_sharing": flag,
                "permitted": flag,
                "throttle_429_from": date.fromisoformat,
                "today": lambda v: None if v is None else date.fromisoformat(v),
                "hire_flip_changes": flag,
                "termination_flip_changes": flag,
                "retry_after": str,
                "error_header": one_of("X-BambooHR-Error-Message", "X-BambooHR-Error-Messsage"),
                "supervisor_ids_swapped": flag,
                "empty_date": lambda v: None if v is None else str(v),
                "forbidden_fields": lambda v: {str(f) for f in v},
            },
        )

    # --- today ------------------------------------------------------------------------------------

    @property
    def today(self) -> date | None:
        return self._today

    @today.setter
    def today(self, value: date | None) -> None:
        before = self.current_date()
        self._today = value
        after = self.current_date()
        if after > before:
            # The hires whose first day arrives now start now, and the scheduled terminations
            # whose day arrives take effect now: with `hire_flip_changes` / `termination_flip_changes`,
            # that is their lastChanged (a clock of its own would put it in the past or the future).
            at = time.time()
            with self.org.lock:
                for p in self.org.people.values():
                    for kind, day in (("hire", p.hire_date), ("termination", p.termination_date)):
                        if day and before.isoformat() < day <= after.isoformat():
                            self._flipped[kind][p.n] = at

    def current_date(self) -> date:
        # The wall clock's date by UTC, not the machine's zone: a first day's flip is stamped at that
        # date's midnight UTC (`_flipped_at`), which on a machine ahead of UTC had not come yet, and
        # a lastChanged in the future carried the connector's cursor past the changes made until then.
        return self._today if self._today is not None else datetime.now(UTC).date()

    def _future_hire(self, p: Person) -> bool:
        return p.state == "active" and p.hire_date > self.current_date().isoformat()

    def _ended(self, p: Person) -> bool:
        """An active person whose scheduled termination has taken effect: BambooHR shows them
        Inactive from the termination date on. A termination date before the hire date is an
        earlier employment's (a rehire), as in the Workday emulator."""
        ended = p.termination_date
        return p.state == "active" and ended is not None and p.hire_date <= ended <= self.current_date().isoformat()

    def _flipped_at(self, p: Person, kind: str) -> float | None:
        """When a hire's first day made them Active (`kind` "hire") or a scheduled termination's
        day made them Inactive ("termination"), if that counts as a change (`hire_flip_changes`,
        `termination_flip_changes`)."""
        if kind == "hire":
            on, day = self.hire_flip_changes and p.state == "active" and not self._future_hire(p), p.hire_date
        else:
            on, day = self.termination_flip_changes and self._ended(p), p.termination_date
        if not on or not day:
            return None
        if p.n in self._flipped[kind]:
            return self._flipped[kind][p.n]
        if self._today is None:  # the wall clock: the date's midnight, which has passed
            try:
                return datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC).timestamp()
            except ValueError:
                return None
        return None

    # --- vendor wording ----------------------------------------------------------------------------

    def _error(self, status: int, message: str | None = None, headers: list[tuple[str, str]] | None = None) -> Response:
        # BambooHR puts error details in a header and sends an (almost) empty body.
        hdrs = list(headers or [])
        if message:
            hdrs.append((self.error_header, message))
        return Response(status, b"", hdrs, content_type="text/html")

    def authenticate(self, req: Request) -> Response | None:
        company = _company_of(req.path)
        if company is not None and company != self.company_domain:
            return self._error(404, f"Company {company!r} not found")
        header = req.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return self.unauthorized(req)
        try:
            user, _, _password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return self.unauthorized(req)
        if user != self.api_key:
            return self.unauthorized(req)
        if not self.permitted:
            return self._error(403, "You do not have access to this resource")
        return None

    def unauthorized(self, req: Request) -> Response:
        return self._error(401, "Invalid API key", [("WWW-Authenticate", 'Basic realm="api"')])

    def rate_limited(self, req: Request) -> Response:
        status = 429 if self.current_date() >= self.throttle_429_from else 503
        return self._error(status, None, [("Retry-After", self.retry_after)])

    def server_error(self, req: Request, status: int) -> Response:
        return self._error(status, None)

    def not_found(self, req: Request) -> Response:
        return self._error(404, None)

    # --- rendering ---------------------------------------------------------------------------------

    def _row(self, p: Person, wanted: list[str]) -> dict[str, Any]:
        """One employee as BambooHR prints it: string values, None for empty."""
        boss = self.org.people.get(p.manager) if p.manager is not None else None
        if boss is not None and not boss.visible:
            boss = None
        row: dict[str, Any] = {"id": str(p.n)}
        for f in wanted:
            if f != "id":
                row[f] = self._value(p, f, boss)
        return row

    def _value(self, p: Person, f: str, boss: Person | None) -> Any:
        match f:
            case "employeeNumber":
                return p.employee_number
            case "firstName":
                return p.given
            case "lastName":
                return p.family
            case "preferredName":
                return None
            case "displayName":
                return p.display
            case "workEmail":
                return p.email
            case "homeEmail":
                return None
            case "bestEmail":
                return p.email
            case "status":
                active = p.state == "active" and not self._future_hire(p) and not self._ended(p)
                return "Active" if active else "Inactive"
            case "employmentHistoryStatus":
                return "Terminated" if p.state == "inactive" or self._ended(p) else "Full-Time"
            case "department":
                return p.department
            case "division":
                return _DIVISIONS.get(p.department or "", "Corporate") if p.department else None
            case "location":
                return p.location
            case "jobTitle":
                return p.title
            case "supervisor":
                return f"{boss.family}, {boss.given}" if boss else None
            case "supervisorEId" | "supervisorId":
                if boss is None:
                    return None
                wants_id = (f == "supervisorEId") != self.supervisor_ids_swapped
                return str(boss.n) if wants_id else boss.employee_number
            case "supervisorEmail":
                return boss.email if boss else None
            case "hireDate" | "originalHireDate":
                return p.hire_date
            case "terminationDate":
                if self._future_hire(p):  # not terminated: not started yet
                    return p.termination_date or self.empty_date
                return p.termination_date or self._inactive_date(p) or self.empty_date
            case "lastChanged":
                return iso_seconds(self._changed_at(p))
            case "customCostCenter":
                return p.cost_center
        return None

    def _changed_at(self, p: Person) -> float:
        """When the employee last changed. Deleting a supervisor empties the supervisor fields of
        their reports, which is a change to those reports too."""
        ts = p.updated_at
        boss = self.org.people.get(p.manager) if p.manager is not None else None
        if boss is not None and not boss.visible and boss.updated_at > ts:
            ts = boss.updated_at
        for kind in ("hire", "termination"):
            flipped = self._flipped_at(p, kind)
            if flipped is not None and flipped > ts:
                ts = flipped
        return ts

    @staticmethod
    def _inactive_date(p: Person) -> str | None:
        # Every inactive BambooHR employee carries a termination date; the org only dates
        # terminations, so a suspension is dated by the person's last change.
        if p.state != "inactive":
            return None
        return datetime.fromtimestamp(p.updated_at, UTC).date().isoformat()

    def _wants_json(self, req: Request) -> bool:
        return "application/json" in (req.headers.get("Accept") or "").lower()

    @staticmethod
    def _xml(root: ET.Element) -> Response:
        body = b'<?xml version="1.0"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False)
        return Response(200, body, content_type="text/xml; charset=utf-8")

    @staticmethod
    def _xml_fields(parent: ET.Element, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key == "id":
                continue
            field = ET.SubElement(parent, "field", id=key)
            if value is not None:
                field.text = str(value)

    def _known(self, f: str) -> bool:
        return f in FIELDS and f not in self.forbidden_fields

    # --- endpoints ---------------------------------------------------------------------------------

    def _directory(self, req: Request) -> Response:
        if not self.directory_sharing:
            return self._error(403, "Directory sharing is disabled for this company")
        wanted = [f for f in DIRECTORY_FIELDS if self._known(f)]
        with self.org.lock:
            rows = []
            for p in self.org.listed_people():
                if p.state != "active" or self._future_hire(p) or self._ended(p):
                    continue
                row = self._row(p, wanted)
                row["photoUploaded"] = False
                row["photoUrl"] = f"https://images.bamboohr.example/photo_person_{p.n}.jpg"
                row["canUploadPhoto"] = 1
                rows.append(row)
        if not rows:
            return self._error(404, "No employees")
        fields = [{"id": f, "type": FIELDS[f][0], "name": FIELDS[f][1]} for f in wanted]
        if self._wants_json(req):
            return Response(200, {"fields": fields, "employees": rows})
        root = ET.Element("directory")
        fieldset = ET.SubElement(root, "fieldset")
        for f in fields:
            ET.SubElement(fieldset, "field", id=f["id"]).text = f["name"]
        employees = ET.SubElement(root, "employees")
        for row in rows:
            emp = ET.SubElement(employees, "employee", id=row["id"])
            self._xml_fields(emp, {k: v for k, v in row.items() if k in FIELDS})
        return self._xml(root)

    def _custom_report(self, req: Request) -> Response:
        spec = self._report_request(req)
        if isinstance(spec, Response):
            return spec
        title, requested, filters = spec
        if len(requested) > MAX_REPORT_FIELDS:
            return self._error(400, f"Too many fields: at most {MAX_REPORT_FIELDS} are allowed")
        # Unknown or forbidden fields are silently left out (BambooHR still answers 200).
        wanted = list(dict.fromkeys(f for f in requested if self._known(f)))
        ids_filter = filters.get("employeeIds")
        changed_filter = filters.get("lastChanged")
        changed_since = None
        if isinstance(changed_filter, dict) and changed_filter.get("value"):
            changed_since = parse_since(str(changed_filter["value"]))
            if changed_since is None:
                return self._error(400, "Invalid lastChanged filter value")
        with self.org.lock:
            if ids_filter is not None:
                people = []
                for raw in ids_filter if isinstance(ids_filter, list) else [ids_filter]:
                    try:
                        p = self.org.people.get(int(str(raw)))
                    except ValueError:
                        continue
                    if p is not None and p.visible:
                        people.append(p)
            else:
                people = list(self.org.listed_people())
            if changed_since is not None:
                people = [p for p in people if int(self._changed_at(p)) >= int(changed_since)]
            rows = [self._row(p, wanted) for p in people]
        fmt = (req.arg("format") or ("JSON" if self._wants_json(req) else "XML")).upper()
        fields = [{"id": f, "type": FIELDS[f][0], "name": FIELDS[f][1]} for f in wanted if f != "id"]
        if fmt == "JSON":
            return Response(200, {"title": title, "fields": fields, "employees": rows})
        if fmt != "XML":
            return self._error(400, f"The emulator serves format=JSON or XML, not {fmt}")
        root = ET.Element("report")
        ET.SubElement(root, "title").text = title
        fields_el = ET.SubElement(root, "fields")
        for f in fields:
            ET.SubElement(fields_el, "field", id=f["id"], type=f["type"]).text = f["name"]
        employees = ET.SubElement(root, "employees")
        for row in rows:
            self._xml_fields(ET.SubElement(employees, "employee", id=row["id"]), row)
        return self._xml(root)

    def _report_request(self, req: Request) -> tuple[str, list[str], dict[str, Any]] | Response:
        """(title, fields, filters) from the body: JSON only when Content-Type is exactly
        application/json, else the body is read as XML (a JSON body then is 'Malformed XML')."""
        ctype = (req.headers.get("Content-Type") or "").strip().lower()
        if ctype == "application/json":
            try:
                body = req.json()
            except ValueError:
                return self._error(400, "Malformed JSON")
            if not isinstance(body, dict) or not isinstance(body.get("fields"), list):
                return self._error(400, "The report needs a list of fields")
            filters = body.get("filters") or {}
            return str(body.get("title") or ""), [str(f) for f in body["fields"]], filters
        try:
            root = ET.fromstring(req.body or b"")
        except ET.ParseError:
            return self._error(400, "Malformed XML")
        fields = [el.get("id", "") for el in root.iter("field")]
        filters: dict[str, Any] = {}
        changed = root.find("./filters/lastChanged")
        if changed is not None and changed.text:
            filters["lastChanged"] = {"includeNull": changed.get("includeNull", "no"), "value": changed.text}
        return (root.findtext("title") or ""), fields, filters

    def _changed(self, req: Request) -> Response:
        since_text = req.arg("since")
        since = parse_since(since_text)
        if since is None:
            # A '+' sent unencoded arrives as a space and lands here too.
            return self._error(400, "Invalid or missing since parameter")
        kind = (req.arg("type") or "all").lower()
        if kind not in ("all", "inserted", "updated", "deleted"):
            return self._error(400, f"Invalid type {kind!r}")
        entries: dict[str, dict[str, str]] = {}
        newest = None
        with self.org.lock:
            for p in self.org.people.values():
                # lastChanged has second precision and "since" compares against it, so a change
                # later within the cursor's second is not reported (clients overlap their window).
                changed_at = self._changed_at(p) if p.visible else p.updated_at
                if int(changed_at) <= since:
                    continue
                if not p.visible:
                    action = "Deleted"
                elif int(p.created_at) > since:
                    action = "Inserted"
                else:
                    action = "Updated"
                if kind != "all" and action.lower() != kind:
                    continue
                eid = str(p.n)
                entries[eid] = {"id": eid, "action": action, "lastChanged": iso_seconds(changed_at)}
                newest = changed_at if newest is None or changed_at > newest else newest
        latest = iso_seconds(newest) if newest is not None else iso_seconds(since)
        if self._wants_json(req):
            return Response(200, {"latest": latest, "employees": entries})
        root = ET.Element("changes", latest=latest)
        for entry in entries.values():
            ET.SubElement(root, "employee", id=entry["id"], action=entry["action"], lastChanged=entry["lastChanged"])
        return self._xml(root)

    def _employee(self, req: Request) -> Response:
        try:
            n = int(req.params["eid"])
        except ValueError:
            return self._error(404, None)
        requested = [f for f in (req.arg("fields") or "firstName,lastName").split(",") if f]
        bad = [f for f in requested if f not in FIELDS]
        if bad:
            return self._error(400, f'Invalid field: "{bad[0]}"')
        wanted = [f for f in requested if f not in self.forbidden_fields]
        with self.org.lock:
            p = self.org.people.get(n)
            if p is None or not p.visible:
                return self._error(404, None)
            row = self._row(p, wanted)
        if self._wants_json(req):
            return Response(200, row)
        emp = ET.Element("employee", id=row["id"])
        self._xml_fields(emp, row)
        return self._xml(emp)

    def _meta_fields(self, req: Request) -> Response:
        fields = [{"id": f, "name": label, "type": kind, "alias": f} for f, (kind, label) in FIELDS.items()]
        if self._wants_json(req):
            return Response(200, fields)
        root = ET.Element("fields")
        for f in fields:
            ET.SubElement(root, "field", id=f["id"], type=f["type"], alias=f["alias"]).text = f["name"]
        return self._xml(root)

    # --- wiring ------------------------------------------------------------------------------------

    def tenant_config(self, tenant: str, workdir: Path) -> dict[str, Any]:
        return {
            "provider": "bamboohr",
            "company_domain": self.company_domain,
            "api_key": self.api_key,
            "api_url": f"{self.base_url}/api/gateway.php",
        }


def _company_of(path: str) -> str | None:
    m = re.match(_GATEWAY, path)
    return m.group("company") if m else None
