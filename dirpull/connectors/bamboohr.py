"""BambooHR connector: the custom report for full walks, `employees/changed` for increments.

Full walk (no cursor, or `full=True`): one `POST reports/custom?format=JSON` naming the fields we
need. The report includes Active and Inactive employees and has no paging, so the body is streamed
(`report_rows`: a megabyte at a time, whole rows parsed by orjson) and yielded `page_size` users at
a time (memory holds about one page, even at 100,000 people). On a resync a row whose exact text
digests to a stored user's source digest is that user unchanged, and is not parsed at all.
The result is a snapshot: an employee missing from it was deleted. An employee it lists twice is
quarantined, neither row applied (so is one the increment's report lists twice) — unless the rows
are the very same, which is one row, applied once (`report_rows.fingerprint`).

Increment (the cursor has `since`): `GET employees/changed?since=` answers an object keyed by
employee id with an action each. `Deleted` ids become removals; `Inserted`/`Updated` ids are read
back with the custom report filtered by `employeeIds`, `batch_size` at a time. The next cursor is
the response's `latest` (else the newest `lastChanged` seen), and never moves backwards.

Future hires: BambooHR shows an employee whose hire date has not come as Inactive, and whether
their first day (Inactive → Active) moves `lastChanged` is not known. So the cursor also keeps
`starts`, employee id → hire date of every one seen Inactive, not terminated, with a hire date
still to come, and an increment reads back those whose day has come (as the changed ones are)
until they show Active: a new hire is not left inactive until the next full run.

Scheduled terminations, the mirror: HR enters a termination ahead of time, and BambooHR shows the
employee Active, with that terminationDate, until the day it takes effect (then Inactive); whether
that flip moves `lastChanged` is not known either. So the cursor also keeps `ends`, employee id →
termination date of every one seen Active with a termination date still to come, read back the
same way until they show Inactive: a leaver is not left active until the next full run.

Fields the API key lost: BambooHR leaves out of the report, without a word, a field the key may
not read, and the report's `fields` header lists only those it sends. An increment that applied
such a report would clear that field for every employee it reads back, each run a few more,
never more than the mass-change guard lets through. So the cursor also keeps `fields`, those the
last run's report sent; an increment whose report no longer sends one of them, of those it asks
for, becomes a full run (the guard then weighs the field emptied for everyone), naming them. So
does one whose report sends a field the last run's did not (access given back): read back only
for the changed employees, it stayed empty for everyone else until the periodic full run.

BambooHR has no groups: the connector yields none.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

import orjson
import requests
import urllib3

from dirpull.config import BAMBOOHR_REPORT_FIELDS, BambooHRTenant, ConfigError
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
    HttpClient,
    RetryPolicy,
    UnreadableBody,
    parse_http_date,
    redact_url,
    transport_reason,
    warn_plain_http,
)
from dirpull.connectors.mapping import map_attributes, without
from dirpull.connectors.report_rows import (
    BOM,
    RECOGNIZED,
    ByteOrderMark,
    NoRowsList,
    Recognize,
    WhileRunning,
    fingerprint,
)
from dirpull.connectors.report_rows import rows as report_rows
from dirpull.connectors.source import Known, SourceDigests
from dirpull.model import User

log = logging.getLogger(__name__)

REPORT_FIELDS = BAMBOOHR_REPORT_FIELDS  # what every report asks for, plus the tenant's fields
# Changes with every edit, including edits to fields we do not read (compensation, …): keeping it
# in raw_attributes would turn those into update events that change nothing a consumer sees.
VOLATILE = ("lastChanged",)
EMPTY_VALUES = frozenset({"", "0000-00-00", "0000-00-00 00:00:00"})
REPORT_TITLE = "dirpull"
_LAST_CHANGED = re.compile(rb'"lastChanged"\s*:\s*"([^"\\]*)"')
# A row's text with a termination date that is not the empty date: the few that may be leavers.
_DATED_END = re.compile(rb'"terminationDate"\s*:\s*"(?!0000-00-00")[^"]')


def _day_to_come(value: Any, today: date) -> str | None:
    """A date on or after the day before `today` (UTC; the company's own date may be a day
    either side), else None."""
    try:
        day = date.fromisoformat(value.strip()) if isinstance(value, str) else None
    except ValueError:
        return None
    return day.isoformat() if day is not None and day >= today - timedelta(days=1) else None


def _shows(row: dict[str, Any], status: str) -> bool:
    value = row.get("status")
    return isinstance(value, str) and value.strip().lower() == status


def _pending_start(row: Any, today: date) -> str | None:
    """The hire date of an employee BambooHR shows as a future hire — Inactive, a hire date still
    to come (`_day_to_come`), and no termination date or one before that hire date (a rehire's,
    from the earlier employment) — else None."""
    if not isinstance(row, dict) or not _shows(row, "inactive"):
        return None
    start = _day_to_come(row.get("hireDate"), today)
    ended = row.get("terminationDate")
    if start is not None and isinstance(ended, str) and ended.strip() not in EMPTY_VALUES:
        # A termination on or after the hire date ends this employment (a hire cancelled before
        # the start): not one to read back. One before it is the last employment's.
        try:
            if date.fromisoformat(ended.strip()[:10]).isoformat() >= start:
                return None
        except ValueError:
            return None
    return start


def _pending_end(row: Any, today: date) -> str | None:
    """The termination date of an employee BambooHR shows as leaving — Active, with a termination
    date still to come (`_day_to_come`; an older one is a rehire's) — else None."""
    if not isinstance(row, dict) or not _shows(row, "active"):
        return None
    return _day_to_come(row.get("terminationDate"), today)


# The cursor's status flips still to come (module docstring): its key → the date a row shows.
_PENDING: dict[str, Callable[[Any, date], str | None]] = {"starts": _pending_start, "ends": _pending_end}


def _note_pending(pending: dict[str, dict[str, str]], eid: str, row: Any, today: date) -> None:
    """Keep `eid` under each of the cursor's `_PENDING` keys whose flip `row` shows still to come,
    and drop it from the others."""
    for key, still in _PENDING.items():
        if (day := still(row, today)) is not None:
            pending[key][eid] = day
        else:
            pending[key].pop(eid, None)


def _recognized_row(text: bytes | None) -> Any:
    """A row recognized by its text (not parsed), parsed if it may show a flip still to come:
    only one that says Inactive somewhere, in any case (`_shows` reads the status so), a few in a
    hundred, or has a termination date (the terminated, and the leavers) is parsed; None for the
    others."""
    if text is None or (b"nactive" not in text.lower() and _DATED_END.search(text) is None):
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _stored_days(cursor: dict[str, Any] | None, key: str) -> dict[str, str]:
    """The cursor's `key` (`_PENDING`): employee id → date; anything else in it is dropped."""
    days = cursor.get(key) if cursor else None
    if not isinstance(days, dict):
        return {}
    out: dict[str, str] = {}
    for eid, day in days.items():
        try:
            out[str(eid)] = date.fromisoformat(day).isoformat()
        except (TypeError, ValueError):
            continue
    return out


def _received_fields(header: Any) -> set[str] | None:
    """The field ids a report's `fields` header lists (`[{"id": …, "type": …, "name": …}]`); None
    when it is missing or not such a list: what the report sent is then unknown, not nothing."""
    if not isinstance(header, list):
        return None
    out: set[str] = set()
    for entry in header:
        field_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(field_id, str):
            return None
        out.add(field_id)
    return out


def _stored_fields(cursor: dict[str, Any] | None) -> set[str] | None:
    """The cursor's `fields`, those the last run's report sent; None from a cursor without them
    (written before they were kept) or with something else there."""
    fields = cursor.get("fields") if cursor else None
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        return None
    return set(fields)


def _utc_today() -> date:
    return datetime.now(UTC).date()


def build(tenant: str, settings: BambooHRTenant, **kwargs: Any) -> BambooHRConnector:
    return BambooHRConnector(tenant, settings, **kwargs)


def parse_timestamp(text: Any) -> datetime | None:
    """BambooHR's ISO-8601 timestamps (Z or an offset); None for anything else."""
    if not isinstance(text, str) or not text.strip():
        return None
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
        when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        when.astimezone(UTC)  # "9999-12-31T23:59:59-05:00" is past year 9999 in UTC: no time to compare
    except (ValueError, OverflowError):
        return None
    return when


def _not_past(when: datetime, clock: datetime | None) -> datetime:
    """`when`, or BambooHR's clock at its answer (`Date`) if that is earlier. Every change BambooHR
    reports was made by then: a `lastChanged` after it (a bogus "9999-12-31T23:59:59+00:00") would
    carry the cursor past every change to come, and each increment would read nothing."""
    return clock if clock is not None and when > clock else when


class _Newest:
    """The newest of a report's `lastChanged` timestamps. BambooHR prints them in one form
    ("2025-11-28T08:03:15+00:00"), whose text sorts as its time does: of those, only a text
    greater than the greatest seen is parsed (a dozen in 100,000 rows; parsing every one was 0.05
    s of a 100,000-user resync). Anything else is parsed as it comes."""

    def __init__(self) -> None:
        self.when: datetime | None = None
        self._text = ""  # the greatest text of the usual form that parsed

    def add(self, text: Any) -> None:
        if type(text) is str and len(text) == 25 and text.endswith("+00:00"):
            if text <= self._text:
                return
            when = parse_timestamp(text)
            if when is None:
                return
            self._text = text
        else:
            when = parse_timestamp(text)
            if when is None:
                return
        if self.when is None or when > self.when:
            self.when = when


def format_timestamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """Empty values as None: BambooHR prints an empty date as "0000-00-00" and text as "" or null."""
    return {k: (None if isinstance(v, str) and v.strip() in EMPTY_VALUES else v) for k, v in row.items()}


class BambooHRConnector(CountsRequests):
    provider = "bamboohr"
    source_digests = True  # a full pull takes `known=` (connectors.source)
    source_texts = True  # … and asks it whose digest a row's text is (`SourceDigests.owner`)
    hands_over_pages = False  # its pages come back to back from one streamed body: diffed where made

    def __init__(self, tenant: str, settings: BambooHRTenant, *, policy: RetryPolicy | None = None) -> None:
        self.tenant = tenant
        self.settings = settings
        self._policy = policy
        warn_plain_http(tenant, "api_url", settings.api_url)  # the API key goes in every request
        api = settings.api_url.rstrip("/")
        # The current spec's base, https://{companyDomain}.bamboohr.com/api/v1, names the company
        # in its host and is used as given; any other api_url is the legacy gateway, which takes
        # the company in its path (directory-apis.md §4.1: whether both stay accepted is unsure).
        self.base = api if api.endswith("/v1") else f"{api}/{settings.company_domain}/v1"
        self.fields = settings.report_fields()

    def __repr__(self) -> str:
        return f"BambooHRConnector(tenant={self.tenant!r}, company={self.settings.company_domain!r})"

    # --- the contract ------------------------------------------------------------------------------

    def pull(
        self, cursor: dict[str, Any] | None, *, full: bool, known: Known | None = None
    ) -> Iterator[Page | Done]:
        self._new_pull()
        try:
            api_key = self.settings.api_key.get()
        except ConfigError as exc:
            raise ConfigurationError(f"bamboohr: api_key: {exc}", step="credentials") from None
        client = HttpClient(
            policy=self._policy or RetryPolicy.of(self.settings),
            timeout=(10.0, self.settings.timeout),
            headers={"Accept": "application/json"},
            auth=(api_key, "x"),
            tenant=self.tenant,
        )
        self._counting(lambda: client.requests)
        notes: list[str] = []
        try:
            since = None if full or not cursor else cursor.get("since")
            if since is not None and parse_timestamp(since) is None:
                notes.append(f"stored cursor {since!r} is not a timestamp: full sync instead")
                since = None
            if since is None:
                done = yield from self._full(client, notes, known)
            else:
                stored = {key: _stored_days(cursor, key) for key in _PENDING}
                done = yield from self._incremental(client, since, notes, stored, _stored_fields(cursor))
            done.requests = client.requests
            yield done
        except AuthError as exc:
            err = self._auth_error(exc)
            err.requests = client.requests
            raise err from None
        except ConnectorError as exc:
            exc.requests = client.requests
            raise
        finally:
            client.close()

    # --- full walk ---------------------------------------------------------------------------------

    def _full(
        self, client: HttpClient, notes: list[str], known: Known | None = None
    ) -> Generator[Page, None, Done]:
        numbers = self._employee_numbers(client) if self._manager_by_number else None
        # Managers given by employee number are resolved through another report: a row alone
        # does not decide its normalization then, so every row is normalized.
        sources = SourceDigests(known, self.settings, [__name__]) if known and numbers is None else None
        done = yield from self._full_report(client, notes, numbers, sources)
        return done

    def _full_report(
        self, client: HttpClient, notes: list[str], numbers: dict[str, str] | None, sources: SourceDigests | None,
        attempt: int = 1,
    ) -> Generator[Page, None, Done]:  # fmt: skip
        """The full walk's streamed custom report, asked for the `attempt`th time. A body that
        breaks off or is not valid JSON before a page of it was handed on is asked for again, what
        was read of it dropped; once one was, the run fails: rows handed on are never sent again."""
        resp = self._report(client, {}, step="custom report", stream=True)
        handed = False
        latest = _Newest()
        page = Page()
        size, rows = self.settings.page_size, 0

        def recognizer() -> Recognize | None:  # once the rows arrive: by then the digests have loaded
            return _recognizer(sources, latest) if sources is not None and sources.owns_any() else None

        header: dict[str, Any] = {}  # the report's other top-level values: its `fields`
        # Employee id → the fingerprint of the first row met with it (`report_rows.fingerprint`:
        # a small int, not the row), so that a second row can be told from a copy of the first.
        listed: dict[str, Any] = {}
        twice: set[str] = set()  # … the ids met again with another row
        today = _utc_today()
        # Future hires and leavers: the cursor's `starts` and `ends` (employee id → date).
        pending: dict[str, dict[str, str]] = {key: {} for key in _PENDING}
        try:
            for text, row, unchanged in _stream_employees(resp, recognizer, header):
                eid = unchanged if unchanged is not None else _id_of(row)
                if unchanged is None and isinstance(row, dict):
                    latest.add(row.get("lastChanged"))
                    if eid is not None:
                        _note_pending(pending, eid, row, today)
                elif unchanged is not None and (parsed := _recognized_row(text)) is not None:
                    _note_pending(pending, unchanged, parsed, today)  # unchanged (a full run has no old cursor)
                first = listed.get(eid) if eid is not None else None
                if first is not None:
                    # The very same row again (a report joined on a field it does not show
                    # repeats it) was applied once already. Another row with the id: which is
                    # right cannot be told, so neither is applied. The copy handed over earlier
                    # is withdrawn (in a snapshot a removal only means "not listed"), and the
                    # quarantine keeps the stored employee as it is, not deleted.
                    if eid not in twice and not _same_row(first, eid, text, row, unchanged is not None, sources):
                        twice.add(eid)
                        page.removed_users.append(eid)
                        page.quarantined.append(Quarantined("user", eid, "employee id appears twice in the report"))
                elif unchanged is not None:  # a row's text exactly as last normalized: not even parsed
                    listed[unchanged] = RECOGNIZED
                    page.unchanged_users.append(unchanged)
                else:
                    if eid is not None:
                        listed[eid] = fingerprint(row)
                    self._add(page, row, numbers, sources, text)  # one user, unchanged id or quarantined
                rows += 1
                if rows >= size:
                    handed = True
                    yield page
                    page, rows = Page(), 0
        except UnreadableBody as exc:
            if handed:
                raise ConnectorError(f"{exc} (rows of it were handed on: not asked again)", step=exc.step) from None
            resp.close()
            client.retry_body(attempt, str(exc), step="custom report")
            done = yield from self._full_report(client, notes, numbers, sources, attempt + 1)
            return done
        finally:
            resp.close()
        if rows:
            yield page
        # The next increment starts at the newest change the report shows; with no rows, at the
        # server's clock.
        newest = latest.when
        clock = _date_header(resp)
        newest = clock if newest is None else _not_past(newest, clock)
        cursor: dict[str, Any] | None = {"since": format_timestamp(newest)} if newest is not None else None
        if cursor is not None:
            cursor.update({key: days for key, days in pending.items() if days})
            received = _received_fields(header.get("fields"))
            if received is not None:
                cursor["fields"] = sorted(received)
        return Done(snapshot=True, cursor=cursor, mode="full", notes=notes)

    # --- increment ---------------------------------------------------------------------------------

    def _incremental(
        self, client: HttpClient, since: str, notes: list[str], stored: dict[str, dict[str, str]],
        had: set[str] | None,
    ) -> Generator[Page, None, Done]:  # fmt: skip
        """`had`: the fields the last run's report sent (`_stored_fields`), None if not known."""
        since_at = parse_timestamp(since)
        assert since_at is not None
        ask = format_timestamp(since_at - timedelta(seconds=self.settings.changed_overlap))

        answers: list[requests.Response] = []

        def changed() -> requests.Response:
            # requests encodes the '+' of the offset as %2B, as BambooHR requires.
            resp = client.request(
                "GET", f"{self.base}/employees/changed", params={"since": ask}, step="changed employees"
            )
            answers.append(resp)
            return resp

        try:
            body = _json_answer(client, "changed employees", changed)
        except AuthError:
            raise
        except ConnectorError as exc:
            if exc.status != 400:
                raise
            notes.append(f"employees/changed refused since={ask} ({exc}): full sync instead")
            done = yield from self._full(client, notes)
            return done
        clock = _date_header(answers[-1]) if answers else None
        if clock is not None and since_at > clock:
            # A cursor BambooHR's clock has not reached (stored from a bogus `lastChanged` by an
            # earlier version): every increment from it would read nothing.
            notes.append(f"stored cursor {since!r} is ahead of BambooHR's clock ({format_timestamp(clock)}): "
                         "full sync instead")  # fmt: skip
            done = yield from self._full(client, notes)
            return done
        entries = body.get("employees") if isinstance(body, dict) else None
        if isinstance(entries, dict):
            items = [(str(k), v) for k, v in entries.items()]
        elif isinstance(entries, list):  # the reference says an object; tolerate an array too
            items = [(str(v.get("id")) if isinstance(v, dict) else "", v) for v in entries]
        elif entries is None:
            items = []
        else:
            raise ConnectorError("changed employees: 'employees' is neither an object nor a list")

        removed: list[str] = []
        wanted: list[str] = []
        quarantined: list[Quarantined] = []
        newest = since_at
        for key, entry in items:
            if not isinstance(entry, dict):
                quarantined.append(Quarantined("user", key or None, "changed entry is not an object"))
                continue
            eid = str(entry.get("id") or key or "")
            action = str(entry.get("action") or "").lower()
            changed = parse_timestamp(entry.get("lastChanged"))
            if changed is not None and changed > newest:
                newest = changed
            if not eid or eid == "None":
                quarantined.append(Quarantined("user", None, "changed entry without an employee id"))
            elif action == "deleted":
                removed.append(eid)
            elif action in ("inserted", "updated"):
                wanted.append(eid)
            else:
                quarantined.append(Quarantined("user", eid, f"unknown change action {entry.get('action')!r}"))
        latest = parse_timestamp(body.get("latest"))
        if latest is not None:
            newest = max(newest, latest)
        newest = max(since_at, _not_past(newest, clock))  # never backwards

        # Held back until the first report read by ids has shown which fields it sends: a run
        # that turns full (`_lost_fields`) must not have handed on a page of the increment.
        first_page: Page | None = Page(removed_users=removed, quarantined=quarantined)
        # Future hires and leavers whose day has come (by the company's date, which may be a day
        # ahead of UTC) are read back with the changed ones until they show Active / Inactive.
        today = _utc_today()
        horizon = (today + timedelta(days=1)).isoformat()
        changed_ids = set(wanted)
        gone = set(removed) | {q.idp_id for q in quarantined if q.idp_id}
        pending = {key: {e: d for e, d in days.items() if e not in gone} for key, days in stored.items()}
        due = list(
            dict.fromkeys(
                e for days in pending.values() for e, d in days.items() if d <= horizon and e not in changed_ids
            )
        )
        for days in pending.values():
            for eid in due:
                days.pop(eid, None)  # kept again below if still to come
        wanted = wanted + due
        numbers = self._employee_numbers(client) if (wanted and self._manager_by_number) else None
        missing = 0
        extra = False
        sent: set[str] | None = None  # the fields every report of this run sent, once one said
        size = self.settings.batch_size
        for start in range(0, len(wanted), size):
            batch = wanted[start : start + size]
            asked = set(batch)
            ids = [int(e) if e.isdigit() else e for e in batch]
            body = _json_answer(
                client, "custom report",
                partial(self._report, client, {"employeeIds": ids}, step="custom report (changed employees)"),
            )  # fmt: skip
            received = _received_fields(body.get("fields") if isinstance(body, dict) else None)
            if received is not None:
                lost = self._lost_fields(sent if sent is not None else had, received)
                # Judged on the first report only: one gained after it is left out of `sent`, so
                # the next run, which reads it first, turns full.
                gained = self._gained_fields(had, received) if sent is None else []
                if (lost or gained) and first_page is not None:
                    causes = []
                    if lost:
                        causes.append(
                            f"no longer has {', '.join(lost)} (the API key may have lost access "
                            f"to {'it' if len(lost) == 1 else 'them'})"
                        )
                    if gained:
                        causes.append(
                            f"now has {', '.join(gained)}, which the last run's did not (the API key may have "
                            f"been given access to {'it' if len(gained) == 1 else 'them'})"
                        )
                    note = f"the custom report {' and '.join(causes)}: full sync instead"
                    notes.append(note)
                    # Notes reach the run record; an operator watching the log sees the cause too.
                    log.log(logging.WARNING if lost else logging.INFO, "tenant %s: %s", self.tenant, note)
                    done = yield from self._full(client, notes)
                    return done
                if lost:
                    # Pages of this increment were handed on already: none of it is applied, and
                    # the next run, still holding the fields the last one had, turns full.
                    raise ConnectorError(
                        f"custom report (changed employees): {', '.join(lost)} stopped coming during the run (the API "
                        "key may have lost access): nothing applied",
                        step="custom report (changed employees)",
                    )
                sent = received if sent is None else sent & received
            if first_page is not None:
                if first_page.removed_users or first_page.quarantined:
                    yield first_page
                first_page = None
            rows = self._report_employees(body, "custom report (changed employees)")
            page = Page()
            seen = set()
            # As in a full walk: the very same row again is one row; another row with the id
            # means neither is applied.
            first: dict[str, Any] = {}
            clashing: set[str] = set()
            for row in rows:
                eid = _id_of(row)
                if eid is not None:
                    fp = fingerprint(row)
                    if first.setdefault(eid, fp) != fp:
                        clashing.add(eid)
            for row in rows:
                eid = _id_of(row)
                if eid is not None and eid not in asked:
                    extra = True  # the filter was not applied: keep only what was asked for
                    continue
                if eid is not None:
                    if eid in seen:  # a copy of a row applied (or an id quarantined) already
                        continue
                    seen.add(eid)
                    _note_pending(pending, eid, row, today)
                    if eid in clashing:
                        page.quarantined.append(Quarantined("user", eid, "employee id appears twice in the report"))
                        continue
                self._add(page, row, numbers)
            missing += len((asked - seen) & changed_ids)
            yield page
        if first_page is not None and (first_page.removed_users or first_page.quarantined):
            yield first_page  # no report was read: nothing changed but removals
        if missing:
            notes.append(
                f"{missing} changed employee(s) were not in the report (deleted since, or hidden from "
                "the API key): left as stored"
            )
        if extra:
            notes.append("the custom report ignored the employeeIds filter: extra rows were skipped")
        cursor: dict[str, Any] = {"since": format_timestamp(newest)}
        cursor.update({key: days for key, days in pending.items() if days})
        # Not one report read (nothing but removals), or none said: those the last run had stand.
        fields = sent if sent is not None else had
        if fields is not None:
            cursor["fields"] = sorted(fields)
        return Done(snapshot=False, cursor=cursor, mode="incremental", notes=notes)

    def _lost_fields(self, had: set[str] | None, received: set[str]) -> list[str]:
        """The fields asked for that a report sent before and this one does not. A field never
        sent (the key never could read it) is not lost, nor one no longer asked for (taken out of
        the settings)."""
        if had is None:
            return []  # a cursor from before `fields` were kept: this run records them
        return [f for f in self.fields if f in had and f not in received]

    def _gained_fields(self, had: set[str] | None, received: set[str]) -> list[str]:
        """The fields asked for that a report sends and the last run's did not: the key given
        access (back). An increment would fill them in only for the employees it reads back;
        everyone else's stayed empty (or as a forced run emptied them) until the periodic full
        run. A field newly asked for is a settings change, which makes the run full already."""
        if had is None:
            return []  # a cursor from before `fields` were kept: nothing to compare with
        return [f for f in self.fields if f not in had and f in received]

    # --- requests ----------------------------------------------------------------------------------

    def _report(
        self, client: HttpClient, filters: dict[str, Any], *, step: str, fields: list[str] | None = None,
        stream: bool = False,
    ) -> requests.Response:  # fmt: skip
        body: dict[str, Any] = {"title": REPORT_TITLE, "fields": fields or self.fields}
        if filters:
            body["filters"] = filters
        # json= sends Content-Type: application/json exactly; anything else is parsed as XML.
        return client.request(
            "POST",
            f"{self.base}/reports/custom",
            params={"format": "JSON", "onlyCurrent": "true"},
            json=body,
            step=step,
            stream=stream,
        )

    def _report_employees(self, body: Any, step: str) -> list[Any]:
        """The rows of a report read whole. JSON without its list of rows (a gateway's, a proxy's)
        is no report: read as one listing nobody, an increment noted its changed employees "not in
        the report" and moved its cursor past their changes, and the employee numbers came back
        none (every manager given by number cleared)."""
        rows = body.get("employees") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            url = redact_url(f"{self.base}/reports/custom?format=JSON&onlyCurrent=true")
            raise ConnectorError(
                f"{step}: the answer from {url} is JSON but not a report of employees "
                f"({NoRowsList('employees', body)}); is something other than BambooHR answering (a proxy, a gateway)?",
                step=step,
            )
        return rows

    @property
    def _manager_by_number(self) -> bool:
        return self.settings.manager_field_holds == "employee_number"

    def _employee_numbers(self, client: HttpClient) -> dict[str, str]:
        """employeeNumber → id for every employee, when the manager field holds employee numbers."""
        body = _json_answer(
            client, "custom report",
            lambda: self._report(client, {}, step="custom report (employee numbers)", fields=["id", "employeeNumber"]),
        )  # fmt: skip
        out: dict[str, str] = {}
        for row in self._report_employees(body, "custom report (employee numbers)"):
            # Trimmed as `normalize` trims the employee's id and the manager field: a padded
            # number or id otherwise gave a manager_idp_id naming no one.
            eid, number = _id_of(row), _text(row.get("employeeNumber")) if isinstance(row, dict) else None
            if eid is not None and number is not None:
                out[number] = eid
        return out

    # --- normalizing -------------------------------------------------------------------------------

    def _add(
        self,
        page: Page,
        row: Any,
        numbers: dict[str, str] | None,
        sources: SourceDigests | None = None,
        text: bytes | None = None,
    ) -> None:
        digest = None
        if sources is not None and isinstance(row, dict) and row.get("id") is not None:
            digest = sources.digest_text(text) if text is not None else sources.digest(row)
            eid = str(row["id"]).strip()
            if digest is not None and sources.unchanged(eid, digest):
                page.unchanged_users.append(eid)
                return
        result = self.normalize(row, numbers)
        if isinstance(result, User):
            page.users.append(result)
            if digest is not None:
                page.user_sources[result.idp_id] = digest
        else:
            page.quarantined.append(result)

    def normalize(self, row: Any, numbers: dict[str, str] | None = None) -> User | Quarantined:
        if not isinstance(row, dict):
            return Quarantined("user", None, "employee row is not an object")
        rec = clean_row(row)
        eid = rec.get("id")
        if eid is None or str(eid).strip() == "":
            name = " ".join(str(rec.get(k)) for k in ("firstName", "lastName") if rec.get(k))
            return Quarantined("user", None, f"employee row without an id ({name or 'no name'})")
        eid = str(eid).strip()
        status = rec.get("status")
        if status is None:
            return Quarantined("user", eid, "no status (may the API key read the status field?)")
        state = {"active": "active", "inactive": "inactive"}.get(str(status).strip().lower())
        if state is None:
            return Quarantined("user", eid, f"unknown status {status!r}")
        # Trimmed as the employee's own id is: a padded supervisor id named no one.
        manager = _text(rec.get(self.settings.manager_field))
        manager_id = None if manager in (None, "0") else manager
        if manager_id is not None and numbers is not None:
            manager_id = numbers.get(manager_id)
        if manager_id == eid:  # their own manager (a CEO's row): no manager, as on Google
            manager_id = None
        work, home = _text(rec.get("workEmail")), _text(rec.get("homeEmail"))
        first, last = _text(rec.get("firstName")), _text(rec.get("lastName"))
        display = _text(rec.get("displayName")) or (
            " ".join(x for x in (_text(rec.get("preferredName")) or first, last) if x) or None
        )
        try:
            return User(
                idp_id=eid,
                username=work,
                email=work,
                emails=list(dict.fromkeys(e for e in (work, home) if e)),
                first_name=first,
                last_name=last,
                display_name=display,
                state=state,
                job_title=_text(rec.get("jobTitle")),
                department=_text(rec.get("department")),
                employee_number=_text(rec.get("employeeNumber")),
                manager_idp_id=manager_id,
                custom_attributes=map_attributes(rec, self.settings.attributes),
                raw_attributes=without(rec, VOLATILE),
            )
        except ValueError as exc:
            return Quarantined("user", eid, f"cannot normalize: {exc}".splitlines()[0])

    def _auth_error(self, exc: AuthError) -> AuthError:
        status = exc.status
        company = self.settings.company_domain
        if status == 403:
            msg = (
                f"BambooHR company {company!r}: HTTP 403 at {exc.step}: the API key's user is not "
                "permitted to read this (give that user access to employee reports, or use another key)"
            )
        else:
            msg = (
                f"BambooHR company {company!r}: HTTP {status or 401} at {exc.step}: the API key was "
                f"refused (api_key = {self.settings.api_key.reference}; check the key and company_domain)"
            )
        return AuthError(msg, step=exc.step)


# --- helpers -----------------------------------------------------------------------------------------


def _id_of(row: Any) -> str | None:
    """A row's employee id as `normalize` reads it; None for a row without one (or not an object)."""
    if not isinstance(row, dict):
        return None
    eid = row.get("id")
    text = None if eid is None else str(eid).strip()
    return text or None


def _same_row(
    first: Any, eid: str, text: bytes | None, row: Any, recognized: bool, sources: SourceDigests | None
) -> bool:
    """Whether a row met again with id `eid` is the very same row as the first one with it, whose
    fingerprint is `first` (`report_rows.fingerprint`)."""
    if recognized:
        return first is RECOGNIZED
    if first is RECOGNIZED:
        # The first was recognized by its text, the stored employee's; this copy was parsed (the
        # report's last row always is): the same row if it digests as that employee's, as `_add`
        # would digest it.
        if sources is None:
            return False
        digest = sources.digest_text(text) if text is not None else sources.digest(row)
        return digest is not None and sources.unchanged(eid, digest)
    return bool(first == fingerprint(row))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _check_json(resp: requests.Response, step: str) -> None:
    ctype = resp.headers.get("Content-Type", "")
    if "json" not in ctype.lower():
        resp.close()
        raise ConnectorError(
            f"{step}: expected JSON, got {ctype or 'no Content-Type'} (BambooHR answers XML when it "
            "ignores Accept: application/json)",
            step=step,
        )


def _json(resp: requests.Response, step: str) -> Any:
    _check_json(resp, step)
    try:
        return resp.json()
    except ValueError as exc:
        if resp.content.startswith(BOM):
            # Every copy of the answer begins so: asked for again, an increment failed only after
            # six downloads of it, as the full walk's streamed report did.
            raise ConnectorError(
                f"{step}: the answer from {resp.request.method} {redact_url(resp.url)} begins with a UTF-8 byte "
                "order mark, which JSON does not allow; not asked for again: is something between dirpull and "
                "BambooHR (a proxy, a gateway) rewriting it?",
                retriable=False,
                step=step,
            ) from None
        raise UnreadableBody(
            f"{step}: the answer from {resp.request.method} {redact_url(resp.url)} is not valid JSON ({exc})", step=step
        ) from None


def _json_answer(client: HttpClient, step: str, send: Callable[[], requests.Response]) -> Any:
    """The JSON of the answer `send()` gets, asked for again while it is not valid JSON (garbled or
    cut off on the way, as Entra's pages are retried): nothing of it was used yet."""
    attempt = 1
    while True:
        try:
            return _json(send(), step)
        except UnreadableBody as exc:
            client.retry_body(attempt, str(exc), step=step)
            attempt += 1


def _recognizer(sources: SourceDigests, latest: _Newest) -> Recognize:
    """A row's text → the id of the stored user last normalized from exactly that text, or None.
    A recognized row is not parsed, so its `lastChanged` (for the next cursor) is read from the
    text: the first `"lastChanged":"…"` — rows are flat, and in JSON text `"…":` is a key —, or,
    when that is not there as a plain string, from the parsed row."""
    digest_text, owner, add = sources.digest_text, sources.owner, latest.add

    def recognize(text: bytes) -> str | None:
        idp_id = owner(digest_text(text))
        if idp_id is not None:
            found = _LAST_CHANGED.search(text)
            if found is not None:
                add(found.group(1).decode("utf-8", "replace"))
            else:  # escaped, null or absent: the recognized text is a whole row, so it parses
                row = orjson.loads(text)
                add(row.get("lastChanged") if isinstance(row, dict) else None)
        return idp_id

    return recognize


def _stream_employees(
    resp: requests.Response, recognizer: Callable[[], Recognize | None] | None = None,
    header: dict[str, Any] | None = None,
) -> Iterator[tuple[bytes | None, Any, str | None]]:  # fmt: skip
    """The report's `employees` rows as they arrive: (text, row, id of an unchanged row). `header`
    receives the report's other top-level values (its `fields`)."""
    step = "custom report"
    _check_json(resp, step)
    resp.raw.decode_content = True
    try:
        # Read only while the run goes on: a trickled report held the pull thread past its run.
        yield from report_rows(WhileRunning(resp.raw), "employees", recognizer, others=header)
    except NoRowsList as exc:
        # Read as a report with no rows, it was a snapshot with nobody in it.
        raise ConnectorError(
            f"{step}: the answer from {redact_url(resp.url)} is JSON but not a report of employees ({exc}); "
            "is something other than BambooHR answering (a proxy, a gateway)?",
            step=step,
        ) from None
    except ByteOrderMark:
        # Every copy of the report begins so: asked for again, the run failed only after six
        # downloads of it (~18 s, and the whole report each time).
        raise ConnectorError(
            f"{step}: the report from {redact_url(resp.url)} begins with a UTF-8 byte order mark, which JSON "
            "does not allow; not asked for again: is something between dirpull and BambooHR (a proxy, a "
            "gateway) rewriting it?",
            retriable=False,
            step=step,
        ) from None
    except ValueError as exc:  # report_rows.NotJSON, and a body that is not UTF-8
        raise UnreadableBody(f"{step}: the report body is not valid JSON ({exc})", step=step) from None
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
        raise UnreadableBody(
            f"{step}: the connection broke while reading the report ({transport_reason(exc)})", step=step
        ) from None


def _date_header(resp: requests.Response) -> datetime | None:
    return parse_http_date(resp.headers.get("Date"))
