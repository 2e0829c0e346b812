"""Workday through Report-as-a-Service (RaaS) custom reports.

A worker report (and optionally a groups report) is fetched as ONE unpaged JSON document
`{"Report_Entry": [...]}` (directory-apis.md §5.1). The workers report is streamed from the socket
(`report_rows`: a megabyte at a time, whole rows parsed by orjson), so memory holds about one page
of ~500 users, never the body and the parsed list at once. On a resync a row whose exact text
digests to a stored user's source digest is that user unchanged, and is not parsed at all.
Every pull is a complete snapshot: Workday has no deletions, a worker missing from the report is
deleted; terminated workers stay in the report and become inactive. A worker it lists twice is
quarantined, neither row applied (`_Workers.listed_again`) — unless the rows are the very same,
which is one row, applied once (`report_rows.fingerprint`).

Reports have no fixed schema: `settings.fields` maps normalized field names to the report's column
aliases; without it each field tries the usual aliases (see DEFAULT_COLUMNS). Because a report never
says which columns it has (empty values are simply omitted), a column counts as present when at least
one row carries it; a configured column no row carries is a ConfigurationError raised after the last
row, before `Done`, so the runner applies nothing. So is a users report without an id or status
column, and a groups report without a group id or members column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from concurrent.futures import Future
from datetime import date, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import ijson
import requests
import urllib3

from dirpull.connectors import mapping
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
    HttpClient,
    RetriesExhausted,
    RetryPolicy,
    UnreadableBody,
    body_opening,
    ending_also_with,
    keep_error_opening,
    readable_body,
    transport_reason,
    warn_plain_http,
)
from dirpull.connectors.nesting import flatten, nested_groups
from dirpull.connectors.report_rows import (
    BOM,
    RECOGNIZED,
    NoRowsList,
    Recognize,
    RunEnded,
    WhileRunning,
    fingerprint,
    parse_error,
)
from dirpull.connectors.report_rows import rows as report_rows
from dirpull.connectors.source import Known, SourceDigests
from dirpull.model import Group, User
from dirpull.prefetch import DaemonPool
from dirpull.spool import SpoolError, spool_errors

PAGE_SIZE = 500
# A groups report read ahead stays in memory up to this size, then spills to a temporary file.
SPOOL_BYTES = 32 << 20

# Normalized field → report column aliases tried in order (the first one a row carries wins).
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "idp_id": ("Employee_ID", "Worker_ID"),
    "employee_number": ("Employee_ID", "Worker_ID"),
    "email": ("Email_Address", "Work_Email", "Email_-_Work", "Primary_Work_Email"),
    "emails": ("Email_Address_group", "Email_Addresses_group"),
    "username": ("User_Name", "Username"),
    "first_name": ("First_Name", "Preferred_First_Name", "Legal_First_Name"),
    "last_name": ("Last_Name", "Preferred_Last_Name", "Legal_Last_Name"),
    "display_name": ("Legal_Name", "Preferred_Name", "Worker"),
    "active": ("Active_Status", "Active"),
    "worker_status": ("Worker_Status", "Status"),
    "hire_date": ("Hire_Date",),
    "termination_date": ("Termination_Date",),
    "manager": ("Manager_Employee_ID", "Manager_ID"),
    "job_title": ("Job_Title", "Business_Title"),
    "department": ("Department", "Supervisory_Organization"),
    # The groups report.
    "group_id": ("Group_ID", "Organization_ID", "Reference_ID"),
    "group_name": ("Group_Name", "Organization_Name", "Name"),
    "group_description": ("Group_Description", "Description"),
    "group_members": ("Members_group", "Workers_group", "Members"),
    "group_subgroups": ("Subgroups_group", "Included_Groups_group"),
}
# `fields.state` is accepted as another name for `active` (the issue text uses both).
_FIELD_SYNONYMS = {"state": "active", "manager_idp_id": "manager"}
GROUP_FIELDS = ("group_id", "group_name", "group_description", "group_members", "group_subgroups")
# Columns holding a list, which Workday leaves out of a row when it is empty: what their absence
# from every row means.
_LIST_FIELDS = {"group_members": "every group read as empty", "group_subgroups": "no group nests another"}
USER_FIELDS = tuple(k for k in DEFAULT_COLUMNS if k not in GROUP_FIELDS)

_TRUE = {"1", "true", "yes", "y", "active"}
_FALSE = {"0", "false", "no", "n", "inactive", "terminated"}
_INACTIVE_STATUS = {"terminated", "inactive", "retired", "deceased"}
_PLACEHOLDER = re.compile(r"\{today(?::([^}]*))?\}")
# Fields a users report without any of their columns gets a note about.
_NOTED_FIELDS = ("email", "first_name", "last_name", "display_name", "manager", "job_title", "department")


def _today_in(zone: str | None) -> Callable[[], date]:
    """Today's date in `zone` (the tenant's `timezone`), or the machine's local date."""
    if zone is None:
        return date.today
    tz = ZoneInfo(zone)
    return lambda: datetime.now(tz).date()


def fill_prompt(value: str, today: date) -> str:
    """`{today}` → 2026-05-02; `{today:FORMAT}` → today.strftime(FORMAT), e.g. `{today:%Y-%m-%d-07:00}`."""
    return _PLACEHOLDER.sub(lambda m: today.strftime(m.group(1)) if m.group(1) else today.isoformat(), value)


def report_url(url: str, prompts: Mapping[str, str], today: date) -> str:
    """The report URL with `format=json` and the prompts as query parameters. A URL copied from
    View URLs with another format (csv, simplexml, …) asks for JSON instead: JSON is all this reads,
    and the report in another format would fail every run with its first rows quoted."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "format"]
    query.insert(0, ("format", "json"))
    given = {k for k, _ in query}
    query += [(k, fill_prompt(v, today)) for k, v in prompts.items() if k not in given]
    # Workday wants `!` literally in reference prompts (`Worker_Type!WID=a!b`).
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, safe="!:"), ""))


def derived_group_id(column: str, value: str) -> str:
    """The idp_id of a group derived from a column value: readable and stable (same value → same id)."""
    digest = hashlib.sha1(f"{column}\x00{value}".encode()).hexdigest()[:12]
    return f"{column}:{digest}"


def _parse_date(value: Any) -> date | None:
    """Workday dates: `2026-05-01` or `2026-05-01-07:00` (a zone suffix). Raises ValueError if bad."""
    if value in (None, ""):
        return None
    return date.fromisoformat(str(value)[:10])


class _Head:
    """A file-like wrapper over the response stream that keeps the first bytes for error messages."""

    def __init__(self, raw: Any, keep: int = 2048) -> None:
        self.raw = raw
        self.keep = keep
        self.head = b""
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.bytes += len(data)
        if len(self.head) < self.keep:
            self.head += data[: self.keep - len(self.head)]
        return data


class _Read:
    """A report body read ahead (`WorkdayConnector._fetch`), in the shape `_rows` reads."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def close(self) -> None:
        self.raw.close()


class _Workers:
    """The worker ids a users report listed, as far as the rest of its pull needs them."""

    def __init__(self) -> None:
        # Every worker id met → the fingerprint of its first row (`report_rows.fingerprint`: a
        # small int, not the row), so that a second row can be told from a copy of the first.
        self.ids: dict[str, Any] = {}
        self.held: set[str] = set()  # … whose rows are not applied: unreadable, or the id listed twice
        self.twice: set[str] = set()  # … listed again with another row
        self.derived: dict[str, str] = {}  # group id → value, of the groups applied rows derive
        self._members: dict[str, int] = {}  # group id → how many applied rows derive it
        # Worker → the derived groups its applied row named (with `group_column` only), to withdraw
        # them if the id comes again; one tuple object per distinct set of groups.
        self._groups_of: dict[str, tuple[str, ...]] = {}
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}

    def listed_again(self, page: Page, idp_id: str, same: bool) -> None:
        """This id, met before, in another row: `same` if that row is the very same as the first
        (a report joined on a column it does not show repeats a row, once per value), which was
        applied once already and is left out. Otherwise which of them is right cannot be told, so
        neither is applied: the first time, the copy handed over earlier (maybe pages ago) is
        withdrawn, with the derived memberships it named (in a snapshot a removal only means "not
        listed"), and the quarantine keeps the stored worker as it is, memberships included. A
        derived group only that copy named is not listed, so it is not made."""
        if not same and idp_id not in self.twice:
            self.twice.add(idp_id)
            self.held.add(idp_id)
            page.removed_users.append(idp_id)
            for gid in self._groups_of.pop(idp_id, ()):
                page.removed_members.append((gid, idp_id))
                left = self._members[gid] - 1
                if left:
                    self._members[gid] = left
                else:
                    del self._members[gid], self.derived[gid]
            page.quarantined.append(Quarantined("user", idp_id, "worker id appears twice in the report"))

    def join(self, page: Page, idp_id: str, groups: list[tuple[str, str]]) -> None:
        """An applied row's derived groups (group id, value): its memberships, handed over now."""
        if not groups:
            return
        for gid, value in groups:
            self.derived[gid] = value
            self._members[gid] = self._members.get(gid, 0) + 1
            page.members.append((gid, idp_id))
        gids = tuple(gid for gid, _ in groups)
        self._groups_of[idp_id] = self._shared.setdefault(gids, gids)


# How long a failed pull waits for its groups report read ahead before leaving it behind: an
# answer about to come is given back at once, a report Workday is still building is not awaited.
LEAVE_READ_AHEAD_S = 2.0


def _close_unread(read_ahead: Future[tuple[_Read, int]]) -> None:
    """The groups report read ahead for a pull that failed, never parsed: its body given back."""
    if not read_ahead.cancelled() and read_ahead.exception() is None:
        read_ahead.result()[0].close()


class WorkdayConnector(CountsRequests):
    provider = "workday"
    source_digests = True  # a full pull takes `known=` (connectors.source)
    source_texts = True  # … and asks it whose digest a row's text is (`SourceDigests.owner`)
    hands_over_pages = False  # its pages come back to back from streamed reports: diffed where made

    def __init__(
        self,
        tenant: str,
        settings: Any,
        *,
        policy_factory: Callable[[], RetryPolicy] | None = None,
        today: Callable[[], date] | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.tenant = tenant
        self.settings = settings
        for name in ("users_report_url", "groups_report_url", "token_url"):  # a password or a token each
            warn_plain_http(tenant, name, getattr(settings, name, None))
        self.policy_factory = policy_factory or (
            lambda: RetryPolicy.of(settings)
        )
        self.today = today or _today_in(getattr(settings, "timezone", None))
        self.page_size = page_size
        fields = {_FIELD_SYNONYMS.get(k, k): v for k, v in (settings.fields or {}).items()}
        unknown = sorted(set(fields) - set(DEFAULT_COLUMNS))
        if unknown:
            raise ConfigurationError(
                f"workday tenant {tenant}: unknown field name(s) in fields: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(DEFAULT_COLUMNS))})",
                step="config",
            )
        # Explicitly configured columns must exist in the report; defaults are tried in order.
        self.explicit: dict[str, str] = fields
        self.columns: dict[str, tuple[str, ...]] = {
            k: ((fields[k],) if k in fields else v) for k, v in DEFAULT_COLUMNS.items()
        }
        if "employee_number" not in fields and "idp_id" in fields:
            self.columns["employee_number"] = (fields["idp_id"],)

    # --- HTTP ----------------------------------------------------------------------------------------

    def _client(self) -> HttpClient:
        s = self.settings
        auth = None
        if s.username is not None and s.password is not None:
            auth = (s.username, s.password.get())
        client = HttpClient(
            policy=self.policy_factory(),
            timeout=(min(30.0, s.timeout), s.timeout),
            headers={"Accept": "application/json", "User-Agent": "dirpull-workday"},
            auth=auth,
            retry_statuses=RETRIABLE_STATUSES,
            permanent=_client_fault,
            tenant=self.tenant,
        )
        self._counting(lambda: client.requests)  # the pull's own, or the groups report's read ahead
        # Keep the last retried error body: when retries run out, the operator must see Workday's
        # own words (a SOAP fault, an HTML page), not just "HTTP 500, gave up".
        client.last_error = ""  # type: ignore[attr-defined]

        def remember(resp: requests.Response, *args: Any, **kwargs: Any) -> None:
            if resp.status_code in RETRIABLE_STATUSES:
                keep_error_opening(resp)  # a report's answer is streamed: not a whole page of any size
                client.last_error = readable_body(resp.content)  # type: ignore[attr-defined]

        client.session.hooks["response"].append(remember)
        return client

    def _uses_oauth(self) -> bool:
        s = self.settings
        return s.refresh_token is not None and not (s.username is not None and s.password is not None)

    def _token(self, client: HttpClient) -> str:
        s = self.settings
        form = {"grant_type": "refresh_token", "refresh_token": s.refresh_token.get()}
        try:
            resp = client.request(
                "POST", s.token_url, step="token", data=form, auth=(s.client_id, s.client_secret.get())
            )
        except ConnectorError as exc:
            if exc.retriable:  # the token endpoint is down or throttling: the next run may work
                raise
            # The client refused (401/403) or its refresh token (400 invalid_grant, RFC 6749 §5.2):
            # "credentials refused or not permitted" named none of the keys, as the reports' did.
            check = "; check client_id, client_secret and refresh_token" if exc.status in (400, 401, 403) else ""
            raise AuthError(f"OAuth refresh-token grant failed: {exc}{check}", step="token") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        token = body.get("access_token") if isinstance(body, dict) else None
        if token is None:
            # Only the OAuth error fields are quoted: the body may carry a refresh_token (or echo the
            # one sent), and this message goes to the run record and the log.
            if isinstance(body, dict):
                said = [readable_body(str(body[k]), 200) for k in ("error", "error_description") if body.get(k)]
                what = ": " + " – ".join(said) if said else " and without an error"
                for secret in (form["refresh_token"], s.client_secret.get()):
                    what = what.replace(secret, "…") if secret else what
            else:
                ctype = resp.headers.get("Content-Type") or "no content type"
                what = f" (the body is not a JSON object: {ctype}, {len(resp.content)} bytes)"
            raise AuthError(f"token endpoint answered without an access_token{what}", step="token")
        if not isinstance(token, str) or not token:
            raise AuthError("token endpoint answered with an empty access_token", step="token")
        return token

    def _open(self, client: HttpClient, url: str, step: str, state: dict[str, Any]) -> requests.Response:
        """GET a report as a stream. With OAuth, a 401 gets one token refresh and one more try."""
        headers = {}
        if self._uses_oauth():
            if state.get("token") is None:
                state["token"] = self._token(client)
            headers["Authorization"] = f"Bearer {state['token']}"
        try:
            resp = self._get(client, url, step, headers)
        except AuthError as exc:
            # Only an expired/revoked token (401) is worth a refresh; a 403 is a permission problem.
            if not self._uses_oauth() or exc.status != 401:
                raise
            state["token"] = self._token(client)
            headers["Authorization"] = f"Bearer {state['token']}"
            resp = self._get(client, url, step, headers)
        ctype = resp.headers.get("Content-Type", "").lower()
        if "json" not in ctype:
            # Only how it began if it is JSON (a report a proxy relabelled: its values are people,
            # and the message lands in the run record and the log); a sign-in page as its text.
            excerpt = body_opening(resp.raw.read(4096, decode_content=True), 300)
            resp.close()
            raise ConnectorError(
                f"{step}: expected JSON from the report but got {ctype or 'no content type'}: {excerpt}",
                step=step,
            )
        return resp

    def _get(self, client: HttpClient, url: str, step: str, headers: dict[str, str]) -> requests.Response:
        try:
            return client.request("GET", url, step=step, stream=True, headers=headers)
        except AuthError as exc:
            # "credentials refused or not permitted" named none of the tenant's keys: which to check.
            if exc.status == 403:
                check = "check that the report is shared with the integration user (or API client)"
            elif self._uses_oauth():
                check = "check client_id, client_secret and refresh_token"
            else:
                check = "check username and password"
            raise AuthError(f"{exc}; {check}", step=exc.step, status=exc.status) from None
        except RetriesExhausted as exc:
            last = getattr(client, "last_error", "")
            raise RetriesExhausted(
                f"{exc}" + (f"; last response: {last}" if last else ""), step=step
            ) from None

    def _fetch(self, url: str, step: str, state: dict[str, Any], stop: threading.Event) -> tuple[_Read, int]:
        """A whole report read into a spooled temporary file (memory up to SPOOL_BYTES, then disk),
        and the requests it took; on its own client, as it runs in another thread. Its retry waits
        end once `stop` is set: the pull, failing, waits for this thread before it can end."""
        with ending_also_with(stop):
            return self._fetch_whole(url, step, state, stop)

    def _fetch_whole(self, url: str, step: str, state: dict[str, Any], stop: threading.Event) -> tuple[_Read, int]:
        client = self._client()
        try:
            attempt = 1
            while True:
                resp = self._open(client, url, step, state)
                body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - handed on, closed by _rows
                try:
                    resp.raw.decode_content = True
                    reader = WhileRunning(resp.raw)  # its run's end or `stop` (ending_also_with)
                    while not stop.is_set():
                        chunk = reader.read(1 << 20)
                        if not chunk:
                            break
                        # A full TMPDIR is no connection cut off: asking for the report again
                        # would fill it again, and the error would blame the network.
                        with spool_errors("write", f"the {step}"):
                            body.write(chunk)
                    with spool_errors("write", f"the {step}"):
                        body.seek(0)  # the last buffer goes to disk here
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                    body.close()
                    if stop.is_set():  # the pull is over: not asked again
                        raise ConnectorError(f"{step}: stopped", step=step) from None
                    # Nothing of it was handed on (it is read whole first): asked for again.
                    client.retry_body(attempt, _cut_off(step, resp, exc), step=step)
                    attempt += 1
                    continue
                except SpoolError:
                    with contextlib.suppress(OSError):  # its last buffer cannot go to disk either
                        body.close()
                    raise
                except RunEnded:
                    body.close()
                    raise
                finally:
                    resp.close()
                return _Read(body), client.requests
        except ConnectorError as exc:
            exc.requests = client.requests
            raise
        finally:
            client.close()

    def _rows(self, resp: _Read, step: str, counter: dict[str, Any]) -> Iterator[Any]:
        """A report read ahead (the groups report), its Report_Entry items parsed one at a time by
        ijson: a group row nests thousands of members, which `report_rows` would not cut between."""
        head = _Head(resp.raw)
        with self._reading(resp, head, step, counter):
            for item in ijson.items(head, "Report_Entry.item", use_float=True):
                counter["rows"] += 1
                yield item

    def _user_rows(
        self, resp: requests.Response, counter: dict[str, Any], recognizer: Callable[[], Recognize | None] | None
    ) -> Iterator[tuple[bytes | None, Any, str | None]]:
        """The workers report's rows from the socket: (text, row, id of an unchanged row), as
        `report_rows.rows` gives them."""
        # Read only while the run goes on: a trickled report held the pull thread past its run.
        head = _Head(WhileRunning(resp.raw))
        resp.raw.decode_content = True
        with self._reading(resp, head, "users report", counter):
            try:
                for item in report_rows(head, "Report_Entry", recognizer):
                    counter["rows"] += 1
                    yield item
            except NoRowsList as exc:
                # No rows: `_check_users_report` refuses it, saying what the JSON holds instead by
                # its keys and types only. Quoted, its values were people (an object of rows, a
                # gateway's wrapper around the report) in the run's error and the log.
                counter["head"] = f"JSON with {exc}"

    @contextlib.contextmanager
    def _reading(
        self, resp: requests.Response | _Read, head: _Head, step: str, counter: dict[str, Any]
    ) -> Iterator[None]:
        """Errors while a report is read, as ConnectorErrors that say how far it got and how its
        body began; the response closed however the reading ends."""
        try:
            yield
        except (ijson.JSONError, ValueError) as exc:  # also report_rows.NotJSON, a body not UTF-8
            if head.head.startswith(BOM):
                # Every copy of the report begins so: asked for again, the run failed only after
                # six downloads of it (~18 s, and the whole report each time).
                raise ConnectorError(
                    f"{step}: the report begins with a UTF-8 byte order mark, which JSON does not allow; "
                    f"not asked for again: is something between dirpull and Workday (a proxy, a gateway) "
                    f"rewriting it? It began: {body_opening(head.head)}",
                    retriable=False,
                    step=step,
                ) from None
            raise UnreadableBody(
                f"{step}: the report is not valid JSON ({readable_body(parse_error(exc), 120)}) "
                f"after {head.bytes} bytes; "
                f"it began: {body_opening(head.head)}",
                step=step,
            ) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise UnreadableBody(_cut_off(step, resp, exc), step=step) from None
        finally:
            resp.close()
        if counter["rows"] == 0 and "head" not in counter:
            counter["head"] = readable_body(head.head, 200)

    # --- pull ----------------------------------------------------------------------------------------

    def pull(
        self, cursor: dict[str, Any] | None, *, full: bool, known: Known | None = None
    ) -> Iterator[Page | Done]:
        s = self.settings
        today = self.today()
        sources = SourceDigests(known, s, [__name__]) if known else None
        notes: list[str] = []
        state: dict[str, Any] = {}
        self._new_pull()
        client = self._client()
        ahead = DaemonPool(1, "workday-groups-report")  # left behind by a stop, not waited for at exit
        stop = threading.Event()
        groups_report: Future[tuple[_Read, int]] | None = None
        try:
            workers = _Workers()
            columns = _Columns(self._checked_columns())
            stats: dict[str, Any] = {"rows": 0}
            page = Page()
            url = report_url(s.users_report_url, s.prompts, today)
            resp = self._open(client, url, "users report", state)
            if s.groups_report_url:
                # Asked for now, read while the users report is parsed: Workday builds a report
                # before it sends the first byte, and that wait would otherwise come after this one.
                groups_url = report_url(s.groups_report_url, s.prompts, today)
                groups_report = ahead.submit(self._fetch, groups_url, "groups report", state, stop)
            derives_groups = bool(s.group_column and not s.groups_report_url)

            def recognizer() -> Recognize | None:  # once the rows arrive: by then the digests have loaded
                # A derived group's members are read from each row: those rows are all parsed.
                if sources is None or derives_groups or not sources.owns_any():
                    return None
                digest_text, owner = sources.digest_text, sources.owner
                return lambda text: owner(digest_text(text))

            attempt, handed = 1, False
            while True:
                try:
                    for text, row, unchanged in self._user_rows(resp, stats, recognizer):
                        if unchanged is not None:  # a row's text exactly as last normalized: not even parsed
                            columns.add_text(text or b"")
                            first = workers.ids.get(unchanged)
                            if first is None:
                                workers.ids[unchanged] = RECOGNIZED
                                page.unchanged_users.append(unchanged)
                            else:
                                workers.listed_again(page, unchanged, first is RECOGNIZED)
                        else:
                            if isinstance(row, dict):
                                columns.add_row(row)
                            self._user_row(row, today, page, workers, sources, text)
                        if len(page.users) + len(page.quarantined) + len(page.unchanged_users) >= self.page_size:
                            handed = True
                            yield page
                            page = Page()
                    break
                except UnreadableBody as exc:
                    # Its rows go into the diff as they come: asked for again only while none was
                    # handed on, with what was read of it dropped.
                    if handed:
                        raise ConnectorError(
                            f"{exc} (rows of it were handed on: not asked again)", step=exc.step
                        ) from None
                    client.retry_body(attempt, str(exc), step="users report")
                    attempt += 1
                    workers, columns, stats, page = _Workers(), _Columns(self._checked_columns()), {"rows": 0}, Page()
                    resp = self._open(client, url, "users report", state)
            self._check_users_report(stats, columns.seen, notes)
            requests_made = client.requests
            if groups_report is not None:
                if page.users or page.quarantined or page.unchanged_users:
                    yield page
                page = Page()
                body, requests_made_ahead = groups_report.result()
                groups_report = None
                requests_made += requests_made_ahead
                # As a set: a set's intersection with a set is twice as fast as with a dict's keys
                # (0.1 s of a 2,000-group report over 100,000 workers); the copy takes 5 ms.
                user_ids = set(workers.ids)
                attempt = 1
                while True:
                    try:
                        # Parsed whole before its first page is handed on: a body that is not valid
                        # JSON is asked for again, as one cut off while it was read ahead is.
                        yield from self._groups(body, user_ids, notes, workers.held)
                        break
                    except UnreadableBody as exc:
                        client.retry_body(attempt, str(exc), step="groups report")
                        attempt += 1
                        body, requests_made_ahead = self._fetch(groups_url, "groups report", state, stop)
                        requests_made += requests_made_ahead
            elif workers.derived:
                for gid, value in sorted(workers.derived.items()):
                    page.groups.append(Group(idp_id=gid, name=value, raw_attributes={s.group_column: value}))
            if page.users or page.groups or page.members or page.quarantined or page.unchanged_users:
                yield page
            yield Done(
                snapshot=True,
                cursor=None,
                mode="full",
                requests=requests_made,
                notes=notes,
                groups_from_users=derives_groups,
            )
        except ConnectorError as exc:
            exc.requests += client.requests  # on top of the groups report's, if it is what failed
            raise
        finally:
            stop.set()
            # Waited for only briefly: a groups report still being built (Workday sends nothing
            # until it is, up to `timeout`) held a pull that had failed until it came, minutes at
            # worst, before the run could say it failed. Its retry waits end now (`stop`); a
            # request still in flight then is left behind, as the run's pull is (Prefetch.close),
            # its body given back once it ends.
            ahead.shutdown(wait=False)
            if groups_report is not None:
                futures.wait([groups_report], timeout=LEAVE_READ_AHEAD_S)
                groups_report.add_done_callback(_close_unread)
            client.close()

    def _user_row(
        self,
        row: Any,
        today: date,
        page: Page,
        workers: _Workers,
        sources: SourceDigests | None = None,
        text: bytes | None = None,
    ) -> None:
        if not isinstance(row, dict):
            page.quarantined.append(Quarantined("user", None, "report row is not an object"))
            return
        idp_id = _text(self._pick(row, "idp_id"))
        if not idp_id:
            cols = "/".join(self.columns["idp_id"])
            page.quarantined.append(Quarantined("user", None, f"row has no worker id ({cols})"))
            return
        first = workers.ids.get(idp_id)
        if first is not None:
            workers.listed_again(page, idp_id, self._same_row(first, idp_id, row, today, sources, text))
            return
        # Met, even if its row cannot be read: another row with the id is not applied either.
        workers.ids[idp_id] = fingerprint(row)
        digest = self._source_digest(sources, row, today, text) if sources is not None else None
        if sources is not None and digest is not None and sources.unchanged(idp_id, digest):
            page.unchanged_users.append(idp_id)
        else:
            try:
                user = self._user(idp_id, row, today)
            except (ValueError, TypeError) as exc:
                # The worker is left as stored, memberships included (the diff keeps the stored
                # groups those are in). The groups this unreadable row names are not listed: a
                # value it changed would make a group the worker is not in.
                page.quarantined.append(Quarantined("user", idp_id, f"cannot read row: {exc}"))
                workers.held.add(idp_id)
                return
            page.users.append(user)
            if digest is not None:
                page.user_sources[idp_id] = digest
        workers.join(page, idp_id, self._derived_groups(row))

    def _same_row(
        self, first: Any, idp_id: str, row: dict[str, Any], today: date, sources: SourceDigests | None,
        text: bytes | None,
    ) -> bool:  # fmt: skip
        """Whether a row met again with this worker id is the very same row as the first one with
        it, whose fingerprint is `first` (`report_rows.fingerprint`)."""
        if first is RECOGNIZED:
            # The first was recognized by its text, the stored worker's; this copy was parsed (the
            # report's last row always is): the same row if it digests as that worker's.
            digest = self._source_digest(sources, row, today, text) if sources is not None else None
            return sources is not None and digest is not None and sources.unchanged(idp_id, digest)
        return bool(first == fingerprint(row))

    def _derived_groups(self, row: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(group id, value) of each group `group_column` derives from this row (none without it,
        or with a groups report)."""
        column = self.settings.group_column
        if not column or self.settings.groups_report_url:
            return []
        return [(derived_group_id(column, value), value) for value in _values(row.get(column), column)]

    def _source_digest(
        self, sources: SourceDigests, row: dict[str, Any], today: date, text: bytes | None = None
    ) -> str | None:
        """The row's digest. A row with a termination date column digests with the one thing
        besides the row its normalization reads: whether that date has passed (`_state` against
        today; None when the state is unreadable). Any other row's normalization reads the row
        alone: it digests as its text (`digest_text`, which a resync's recognizer can match
        without parsing it), or as the row where the text is not at hand — the same digest when
        the text is what orjson writes. A digest with the state never equals a text's: its input
        ends after a JSON object with another value."""
        if not any(c in row for c in self.columns["termination_date"]):
            return sources.digest_text(text) if text is not None else sources.digest(row)
        try:
            state = self._state(row, today)
        except (ValueError, TypeError):
            return None
        return sources.digest(row, state)

    def _pick(self, row: Mapping[str, Any], field: str) -> Any:
        for column in self.columns[field]:
            value = row.get(column)
            # An empty cell is no value, as an omitted one is (how RaaS usually sends it): it must
            # not hide the next alias, e.g. `Email_Address: ""` before a filled `Work_Email`.
            if value is not None and not (isinstance(value, str) and not value.strip()):
                return value
        return None

    def _str(self, row: Mapping[str, Any], field: str) -> str | None:
        value = self._pick(row, field)
        if value is None:
            return None
        if isinstance(value, (list, dict)):  # a multi-valued column: its first value
            if isinstance(value, list):
                # Workday promises no order for the entries: the one flagged Primary, where one is,
                # not whichever the report happened to list first (a work email, not the home one).
                value = sorted(value, key=lambda item: not _primary_entry(item))
            values = _values(value, self.columns[field][0])
            return values[0] if values else None
        text = str(value).strip()
        return text or None

    def _user(self, idp_id: str, row: dict[str, Any], today: date) -> User:
        email = self._str(row, "email")
        emails = self._emails(row, email)
        first, last = self._str(row, "first_name"), self._str(row, "last_name")
        display = self._str(row, "display_name") or " ".join(x for x in (first, last) if x) or None
        return User(
            idp_id=idp_id,
            username=self._str(row, "username") or email,
            email=email,
            emails=emails,
            first_name=first,
            last_name=last,
            display_name=display,
            state=self._state(row, today),
            job_title=self._str(row, "job_title"),
            department=self._str(row, "department"),
            employee_number=self._str(row, "employee_number"),
            manager_idp_id=_not_self(self._str(row, "manager"), idp_id),
            # A one-entry `_group` column may come as that object: read as the list, as `_values` does;
            # `[primary]` is the entry flagged `"Primary": "1"`, whatever the order.
            custom_attributes=mapping.map_attributes(
                row, self.settings.attributes, lone_lists=True, primary=_primary_entry
            ),
            # Workday promises no order for a multi-instance column's entries: a report run again
            # may list a worker's emails (positions…) otherwise, the same worker.
            raw_attributes=mapping.unordered_lists(row, _primary_entry),
        )

    def _emails(self, row: Mapping[str, Any], email: str | None) -> list[str]:
        """All work emails: the primary first, then the nested email group's WORK entries."""
        out = [email] if email else []
        group = self._pick(row, "emails")
        if isinstance(group, dict):  # one entry, sent as the object itself (see `_values`)
            group = [group]
        if isinstance(group, list):
            for item in group:
                if not isinstance(item, dict):
                    continue
                usage = str(item.get("Usage_Type") or item.get("Type") or "WORK").upper()
                value = _text(next(
                    (v for k, v in item.items() if "email" in k.lower() and isinstance(v, str)), None
                ))  # fmt: skip
                # Trimmed as the primary column is: padding made the primary a second entry.
                if value and usage == "WORK" and value not in out:
                    out.append(value)
        # The primary column's address first, the others in one order: the group's come in none.
        return out[:1] + sorted(out[1:]) if email else sorted(out)

    def _state(self, row: Mapping[str, Any], today: date) -> str:
        """inactive when Workday says so, or when the termination date has passed (a future
        termination keeps the worker active until the day after the date). A termination date
        before the (re)hire date is an old employment and is ignored."""
        flag = self._pick(row, "active")
        if flag is not None:
            # "1"/"0" (or true/false); a status text mapped here works too (Active, Terminated, …).
            text = str(flag).strip().lower()
            if text in _FALSE or text in _INACTIVE_STATUS:
                return "inactive"
            if text.isdigit() and text not in _TRUE:
                raise ValueError(f"{self.columns['active'][0]} has an unknown value {flag!r}")
        else:
            # Worker_Status: Terminated/Inactive → inactive; Active, On Leave, … → active.
            status = self._str(row, "worker_status")
            if status is not None and status.lower() in _INACTIVE_STATUS:
                return "inactive"
        ended = _parse_date(self._str(row, "termination_date"))
        hired = _parse_date(self._str(row, "hire_date"))
        if ended is not None and ended < today and not (hired is not None and hired > ended):
            return "inactive"
        return "active"

    def _checked_columns(self) -> list[tuple[str, ...]]:
        """The columns `_check_users_report` asks about, in groups of which one present is enough."""
        s = self.settings
        checked = [(column,) for field, column in self.explicit.items() if field in USER_FIELDS]
        if s.group_column and not s.groups_report_url:
            checked.append((s.group_column,))
        checked += [self.columns["idp_id"], self.columns["active"] + self.columns["worker_status"]]
        checked += [self.columns[f] for f in _NOTED_FIELDS if f not in self.explicit]
        return checked

    def _check_users_report(self, stats: dict[str, Any], seen: set[str], notes: list[str]) -> None:
        """Refuse a report that would blank or deactivate the tenant (raised before Done: nothing applies)."""
        if stats["rows"] == 0:
            raise ConfigurationError(
                "users report: the report has no rows; refusing to treat every worker as deleted "
                f"(check the report's prompts and filters; the body began: {stats.get('head', '')})",
                step="users report",
            )
        missing = sorted(
            f"{field} → {column}"
            for field, column in self.explicit.items()
            if field in USER_FIELDS and column not in seen
        )
        if (
            self.settings.group_column
            and not self.settings.groups_report_url
            and self.settings.group_column not in seen
        ):
            missing.append(f"group_column → {self.settings.group_column}")
        if missing:
            raise ConfigurationError(
                "users report: no row has the configured column(s) "
                + ", ".join(missing)
                + f" (the report has: {', '.join(sorted(seen))})",
                step="users report",
            )
        if not any(c in seen for c in self.columns["idp_id"]):
            raise ConfigurationError(
                f"users report: no row has a worker id column (tried {', '.join(self.columns['idp_id'])}); "
                "set fields.idp_id",
                step="users report",
            )
        state_columns = self.columns["active"] + self.columns["worker_status"]
        if not any(c in seen for c in state_columns):
            raise ConfigurationError(
                f"users report: no row has a status column (tried {', '.join(state_columns)}); without it "
                "terminated workers would stay active. Add Active_Status to the report or set fields.active",
                step="users report",
            )
        for field in _NOTED_FIELDS:
            if field not in self.explicit and not any(c in seen for c in self.columns[field]):
                notes.append(f"users report has no {field} column (tried {', '.join(self.columns[field])})")

    def _check_groups_report(self, seen: set[str]) -> None:
        """Refuse a groups report none of whose rows has an id or a members column: an alias renamed
        in Workday would otherwise read as every group (or every membership) deleted."""
        for field, what in (("group_id", "group id"), ("group_members", "members")):
            if field in self.explicit:
                continue  # checked by its configured name (`_groups`)
            if not any(c in seen for c in self.columns[field]):
                # Workday leaves an empty member list out: naming the column confirms it.
                empty = (
                    "; if every group is empty (Workday leaves an empty list out of a row), setting "
                    "fields.group_members to the members column's alias confirms it"
                    if field == "group_members"
                    else ""
                )
                raise ConfigurationError(
                    f"groups report: no row has a {what} column (tried {', '.join(self.columns[field])}); "
                    f"set fields.{field} (the report has: {', '.join(sorted(seen))}){empty}",
                    step="groups report",
                )

    def _groups(self, resp: _Read, user_ids: set[str], notes: list[str], held_users: set[str]) -> Iterator[Page]:
        """The groups report: groups with direct members and subgroups, flattened here. Members
        among `held_users` (workers quarantined) are left out: their stored memberships stand.

        The whole groups report is held (groups are few next to workers) because a subgroup may be
        listed before or after its parent."""
        groups: dict[str, Group] = {}
        direct: dict[str, set[str]] = {}
        subs: dict[str, list[str]] = {}
        seen: set[str] = set()
        stats: dict[str, Any] = {"rows": 0}
        quarantined: list[Quarantined] = []
        conflicting: set[str] = set()  # group ids listed twice with different data
        member_col = self.columns["idp_id"]
        for row in self._rows(resp, "groups report", stats):
            if not isinstance(row, dict):
                quarantined.append(Quarantined("group", None, "report row is not an object"))
                continue
            seen.update(row)
            gid = self._str(row, "group_id")
            if not gid:
                quarantined.append(Quarantined("group", None, "row has no group id"))
                continue
            group = Group(
                idp_id=gid,
                name=self._str(row, "group_name"),
                description=self._str(row, "group_description"),
                raw_attributes=mapping.unordered_lists(
                    {k: v for k, v in row.items() if k not in self.columns["group_members"]}
                ),
            )
            members = set(_values(self._pick(row, "group_members"), *member_col))
            nested = _values(self._pick(row, "group_subgroups"), *self.columns["group_id"])
            if gid in groups:
                # Listed again: the same row again is one group; different data cannot tell which
                # is right, so the group is left as stored (below), as a worker listed twice is.
                if (groups[gid], direct[gid], subs[gid]) != (group, members, nested):
                    conflicting.add(gid)
                continue
            groups[gid], direct[gid], subs[gid] = group, members, nested
        missing = sorted(
            f"{f} → {c}"
            for f, c in self.explicit.items()
            if f in GROUP_FIELDS and f not in _LIST_FIELDS and c not in seen
        )
        if missing and stats["rows"]:
            raise ConfigurationError(
                "groups report: no row has the configured column(s) " + ", ".join(missing),
                step="groups report",
            )
        if stats["rows"]:
            # Workday leaves an empty list out of a row: a configured list column in no row is
            # every list empty (no group nests another, yet), not a misspelt alias.
            for f, empty in _LIST_FIELDS.items():
                if (c := self.explicit.get(f)) is not None and c not in seen:
                    notes.append(f"groups report: no row has {c} (fields.{f}): {empty}")
            self._check_groups_report(seen)
        held = self._held_groups(conflicting, groups, subs)
        quarantined += [Quarantined("group", gid, reason) for gid, reason in held.items()]
        unknown_members = listed = 0
        page = Page(quarantined=quarantined)
        for gid, group in groups.items():
            if gid in held:
                continue
            page.groups.append(group)
            flat = flatten(gid, direct, subs)
            found = flat.intersection(user_ids)
            unknown_members += len(flat) - len(found)
            members = list(found - held_users if held_users else found)
            page.member_lists.append((gid, members))
            listed += len(members)
            if len(page.groups) >= self.page_size or listed >= 20 * self.page_size:
                yield page
                page = Page()
                listed = 0
        if unknown_members:
            notes.append(f"groups report lists {unknown_members} member(s) not in the users report; ignored")
        yield page

    @staticmethod
    def _held_groups(
        conflicting: set[str], groups: Mapping[str, Group], subs: Mapping[str, list[str]]
    ) -> dict[str, str]:
        """Groups left as stored (quarantined: not deleted, memberships kept) because of a group id
        listed twice with different data: that group, and each group nesting it, whose flattened
        members depend on which of its rows is right."""
        if not conflicting:
            return {}
        held: dict[str, str] = {}
        for gid in groups:
            if gid in conflicting:
                held[gid] = "group id appears twice in the report, with different data"
                continue
            clash = next((g for g in nested_groups(gid, lambda g: subs.get(g, ())) if g in conflicting), None)
            if clash is not None:
                held[gid] = f"nests group {clash}, whose id appears twice in the report with different data"
        return held


class _Columns:
    """The columns a users report's rows carry, as far as `_check_users_report` asks: all of a
    parsed row's; of a row recognized by its text (never parsed), those of the checked groups
    (`WorkdayConnector._checked_columns`) no row has shown yet, found as keys in the text — which
    costs nothing once each group has shown one. A key inside a nested object counts too: such a
    text was stored from a report that passed these checks."""

    def __init__(self, checked: list[tuple[str, ...]]) -> None:
        self.seen: set[str] = set()
        self._pending: list[tuple[tuple[str, ...], re.Pattern[bytes], dict[bytes, str]]] = []
        for names in checked:
            keys = {json.dumps(n, ensure_ascii=False)[1:-1].encode(): n for n in names}
            pattern = re.compile(rb'"(' + b"|".join(re.escape(k) for k in keys) + rb')"\s*:')
            self._pending.append((names, pattern, keys))

    def add_row(self, row: dict[str, Any]) -> None:
        self.seen.update(row)

    def add_text(self, text: bytes) -> None:
        if not self._pending:
            return
        pending = []
        for names, pattern, keys in self._pending:
            if any(n in self.seen for n in names):
                continue
            found = pattern.search(text)
            if found is not None:
                self.seen.add(keys[found.group(1)])
            else:
                pending.append((names, pattern, keys))
        self._pending = pending


def _cut_off(step: str, resp: requests.Response | _Read, exc: BaseException) -> str:
    """Why a report's body could not be read whole, with how much of it had come over the wire
    (urllib3's count, the one its IncompleteRead quotes): the bytes handed to the parser read as
    "after 0 bytes" next to "IncompleteRead(150320 bytes read …)" where the cut came in the first
    megabyte asked for."""
    raw = getattr(resp, "raw", None)
    arrived = raw.tell() if isinstance(raw, urllib3.response.HTTPResponse) else None
    so_far = f" after {arrived} bytes of it had arrived" if arrived is not None else ""
    return f"{step}: the connection failed while the report was read{so_far} ({transport_reason(exc)})"


_CLIENT_FAULT = re.compile(rb"<faultcode>\s*(?:[\w.-]+:)?Client\b", re.I)


def _client_fault(resp: requests.Response) -> str | None:
    """Why a 500 is not worth retrying: a SOAP fault of the Client class ("the message should not be
    resent without change", SOAP 1.1 §4.4.1), which is how Workday answers a report URL that names
    no report it will run for this user (a wrong tenant, owner or report name; a report not enabled
    as a web service or not shared). Retrying it only held the run ~15 s before the same error."""
    if resp.status_code != 500 or not _CLIENT_FAULT.search(resp.content[:65536]):
        return None
    return (
        f"Workday refused the report request ({readable_body(resp.content)}): check the report URL "
        "(tenant, report owner and report name, as under the report's Actions › Web Service › View "
        "URLs), that the report is enabled as a web service and shared with the integration user "
        "or API client, and that user's credentials"
    )


def _not_self(manager: str | None, idp_id: str) -> str | None:
    """A worker's manager, None when it is the worker: Workday resolves the head of a supervisory
    organization's manager to that head. No manager, as on Google."""
    return None if manager == idp_id else manager


def _text(value: Any) -> str | None:
    """A string value, stripped; or an integer as its digits: the reference says values are strings,
    but a calculated field (a worker id) may come as a JSON number. Not a bool, not a float (which
    would read as `21001.0`); None for anything else or blank."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _primary_entry(item: Any) -> bool:
    """A multi-instance column's entry flagged primary (`"Primary": "1"`)."""
    return isinstance(item, dict) and str(item.get("Primary", "")).strip().lower() in _TRUE


def _values(value: Any, *keys: str) -> list[str]:
    """The string values of a column: a plain string (or integer, `_text`), or a nested `_group`
    array of objects (the value under one of `keys`, else the object's only/first string value).
    A `_group` column with one entry may come as that object rather than an array of one (an
    XML-to-JSON conversion does that): it is read as the array, so a one-member group keeps its member."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        v = _text(value)
        return [v] if v else []
    out: list[str] = []
    for item in value:  # a groups report's member lists: 300,000 items at 100,000 users
        v: Any = item
        if isinstance(item, dict):
            for key in keys:
                v = item.get(key)
                if isinstance(v, (str, int)) and not isinstance(v, bool):
                    break
            else:
                v = next((x for x in item.values() if isinstance(x, (str, int)) and not isinstance(x, bool)), None)
        v = _text(v)
        if v:
            out.append(v)
    return out


# Test hooks for connectors made through the registry (sync-level tests): a fast retry policy and
# a fixed "today". None = the defaults (the tenant's retry settings, date.today).
POLICY_FACTORY: Callable[[], RetryPolicy] | None = None
TODAY: Callable[[], date] | None = None


def build(tenant: str, settings: Any) -> WorkdayConnector:
    return WorkdayConnector(tenant, settings, policy_factory=POLICY_FACTORY, today=TODAY)
