"""Answers that are well-formed HTTP but not what the vendor documents (a body of the wrong shape,
a record without its id, a byte order mark), put between each connector's real SDK and its
emulator by a loopback proxy (tests/hostile.py): the pull fails in one line saying what was wrong,
or reads the records it can and quarantines the others, and never takes a garbled page for an
empty one (a full snapshot that silently lost a page deletes its people)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import Answer, Rewrite, proxying

from dirpull.connectors.base import Connector, ConnectorError, Done, Page
from dirpull.connectors.http import RetryPolicy
from dirpull.emulators.org import Org


def _policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=2, base_delay=0.0, jitter=0.0, sleep=lambda s: None)


class _OktaSleeps:
    async def __call__(self, seconds: float) -> None:
        await asyncio.sleep(0)


def _emulator(provider: str, org: Org) -> Any:
    if provider == "entra_id":
        from dirpull.emulators.graph_api import GraphEmulator

        return GraphEmulator(org, delta_page_size=15, member_chunk_size=7, retry_after="0.01")
    if provider == "okta":
        from dirpull.emulators.okta_api import OktaEmulator

        emu = OktaEmulator(org)
        emu.fault_reset_in = 0
        return emu
    if provider == "bamboohr":
        from dirpull.emulators.bamboohr_api import BambooHREmulator

        return BambooHREmulator(org)
    if provider == "google_workspace":
        from dirpull.emulators.google_api import GoogleEmulator

        return GoogleEmulator(org)
    assert provider == "workday"
    from dirpull.emulators.workday_api import WorkdayEmulator

    return WorkdayEmulator(org)


def _connector(provider: str, settings: dict[str, Any]) -> Connector:
    if provider == "entra_id":
        from dirpull.config import EntraTenant
        from dirpull.connectors.entra_id import build as entra

        return entra("t1", EntraTenant.model_validate(settings), policy=_policy())
    if provider == "okta":
        from dirpull.config import OktaTenant
        from dirpull.connectors.okta import OktaConnector

        return OktaConnector("t1", OktaTenant.model_validate({**settings, "backoff_base": 0.01}), sleep=_OktaSleeps())
    if provider == "bamboohr":
        from dirpull.config import BambooHRTenant
        from dirpull.connectors.bamboohr import build as bamboo

        return bamboo("t1", BambooHRTenant.model_validate(settings), policy=_policy())
    if provider == "google_workspace":
        from dirpull.config import GoogleTenant
        from dirpull.connectors.google_workspace import build as google

        return google("t1", GoogleTenant.model_validate(settings), policy=_policy())
    from dirpull.config import WorkdayTenant
    from dirpull.connectors.workday import WorkdayConnector

    return WorkdayConnector("t1", WorkdayTenant.model_validate(settings), policy_factory=_policy)


class Vendor:
    """A provider's emulator behind a rewriting proxy, and the tenant settings pointing at the proxy."""

    def __init__(self, provider: str, org: Org, tmp_path: Path) -> None:
        self.provider = provider
        self.org = org
        self.emu = _emulator(provider, org)
        self.tmp_path = tmp_path
        self.rewrite: Rewrite | None = None

    def settings(self, base: str) -> dict[str, Any]:
        upstream = self.emu.base_url
        configured = json.dumps(self.emu.tenant_config("t1", self.tmp_path))
        settings: dict[str, Any] = json.loads(configured.replace(upstream, base))
        if self.provider == "google_workspace":  # the key file names the token endpoint
            key = Path(settings["credentials_file"][len("file:") :])
            key.write_text(key.read_text().replace(upstream, base))
        return settings

    def pull(self, rewrite: Rewrite) -> tuple[list[Page], Done]:
        with proxying(self.emu.base_url, rewrite) as proxy:
            items = list(_connector(self.provider, self.settings(proxy.base_url)).pull(None, full=True))
        done = items[-1]
        assert isinstance(done, Done) and all(isinstance(p, Page) for p in items[:-1])
        return items[:-1], done  # type: ignore[return-value]

    def error(self, rewrite: Rewrite) -> str:
        with pytest.raises(ConnectorError) as info:
            self.pull(rewrite)
        message = str(info.value)
        assert "\n" not in message and "Traceback" not in message
        return message


@pytest.fixture
def vendor(tmp_path: Path) -> Iterator[Any]:
    started: list[Vendor] = []

    def make(provider: str, people: int = 40, groups: int = 6) -> Vendor:
        v = Vendor(provider, Org.generate(people, groups=groups, seed=11), tmp_path)
        v.emu.start()
        started.append(v)
        return v

    yield make
    for v in started:
        v.emu.stop()


def answers(path_part: str, change: Rewrite, *, nth: int | None = None) -> Rewrite:
    """`change` applied to the 200 answers to requests whose path holds `path_part` (only the
    `nth` of them, 1-based, if given)."""
    seen = [0]

    def rewrite(a: Answer) -> Answer | None:
        if path_part not in a.path or a.status != 200:
            return None
        seen[0] += 1
        return change(a) if nth is None or seen[0] == nth else None

    return rewrite


def person_values(org: Org) -> list[str]:
    """What a message must not quote: people's names and email addresses."""
    out: list[str] = []
    for p in org.listed_people():
        out += [v for v in (p.email, p.given, p.family, p.username) if v]
    return out


# --- a UTF-8 byte order mark before a JSON body ---------------------------------------------------


@pytest.mark.parametrize(("provider", "listing"), [("workday", "Worker_Directory"), ("okta", "/api/v1/users?")])
def test_a_body_behind_a_byte_order_mark_is_refused_without_quoting_people(
    vendor: Any, provider: str, listing: str
) -> None:
    v = vendor(provider)
    message = v.error(answers(listing, lambda a: Answer(a.path, a.status, a.headers, b"\xef\xbb\xbf" + a.body)))
    assert "byte order mark" in message and "values not shown" in message
    assert not [x for x in person_values(v.org) if x in message], message


@pytest.mark.parametrize(
    ("provider", "report"),
    [("workday", "Worker_Directory"), ("workday", "Worker_Groups"), ("bamboohr", "/reports/custom")],
)
def test_a_report_behind_a_byte_order_mark_is_refused_at_the_first_download(
    vendor: Any, provider: str, report: str
) -> None:
    """A Workday or BambooHR report behind a byte order mark was asked for again as if cut off on
    the way: six whole downloads (~18 s) at the default policy, each beginning with the mark,
    before the run failed. It fails at the first, saying what the body began with."""
    v = vendor(provider)
    rewrite = answers(report, lambda a: Answer(a.path, a.status, a.headers, b"\xef\xbb\xbf" + a.body))
    with proxying(v.emu.base_url, rewrite) as proxy, pytest.raises(ConnectorError) as info:
        list(_connector(provider, v.settings(proxy.base_url)).pull(None, full=True))
    message = str(info.value)
    assert "begins with a UTF-8 byte order mark, which JSON does not allow; not asked for again" in message, message
    assert "attempts" not in message and not info.value.retriable
    assert len([p for p in proxy.paths if report in p]) == 1, proxy.paths
    assert not [x for x in person_values(v.org) if x in message], message


@pytest.mark.parametrize("answer", ["/employees/changed", "/reports/custom"])
def test_a_bamboohr_increment_behind_a_byte_order_mark_is_refused_at_the_first_download(
    vendor: Any, answer: str
) -> None:
    """An increment's answers (the changed employees, then their custom report) are read whole,
    not streamed: one behind a byte order mark was still asked for again as if garbled on the
    way, six times at the default policy, though every copy begins with the mark."""
    v = vendor("bamboohr")
    first = list(_connector("bamboohr", v.settings(v.emu.base_url)).pull(None, full=True))[-1]
    assert isinstance(first, Done)
    v.org.update_person(5, title="Principal")
    rewrite = answers(answer, lambda a: Answer(a.path, a.status, a.headers, b"\xef\xbb\xbf" + a.body))
    with proxying(v.emu.base_url, rewrite) as proxy, pytest.raises(ConnectorError) as info:
        list(_connector("bamboohr", v.settings(proxy.base_url)).pull(first.cursor, full=False))
    message = str(info.value)
    assert "begins with a UTF-8 byte order mark, which JSON does not allow; not asked for again" in message, message
    assert "attempts" not in message and not info.value.retriable
    assert len([p for p in proxy.paths if answer in p]) == 1, proxy.paths
    assert not [x for x in person_values(v.org) if x in message], message


# --- a page of the wrong shape --------------------------------------------------------------------


def _json(change: Any) -> Rewrite:
    def rewrite(a: Answer) -> Answer:
        return Answer(a.path, a.status, a.headers, json.dumps(change(json.loads(a.body))).encode())

    return rewrite


def _without(key: str) -> Any:
    return lambda doc: {k: v for k, v in doc.items() if k != key}


def _set(key: str, value: Any) -> Any:
    return lambda doc: {**doc, key: value}


@pytest.mark.parametrize(
    "change", [_without("value"), _set("value", None), _set("value", {})], ids=["missing", "null", "object"]
)
def test_an_entra_delta_page_without_its_value_list_fails_the_pull_instead_of_losing_its_users(
    vendor: Any, change: Any
) -> None:
    v = vendor("entra_id")
    # The second of three pages of the users walk (15 a page): read as empty, 15 people were left
    # out of a full snapshot, to be deleted.
    message = v.error(answers("/users/delta", _json(change), nth=2))
    assert message.startswith("users delta: Graph sent a page with ") and "not a list of records" in message


def test_an_entra_group_members_page_without_its_value_list_fails_the_pull(vendor: Any) -> None:
    v = vendor("entra_id")
    parent, child = [g.n for g in v.org.listed_groups()][:2]
    v.org.add_subgroup(parent, child)
    with proxying(v.emu.base_url) as proxy:
        c = _connector("entra_id", v.settings(proxy.base_url))
        done = list(c.pull(None, full=True))[-1]
        assert isinstance(done, Done)
        # A change below a nested group: the next round re-reads the parent's tree through
        # /groups/{id}/members, whose pages are garbled.
        v.org.add_member(child, next(n for n in v.org.people if n not in v.org.transitive_members(parent)))
        proxy.rewrite = answers("/members", _json(_without("value")))
        with pytest.raises(ConnectorError, match=r"^group members: Graph sent a page with no `value`"):
            list(c.pull(done.cursor, full=False))


@pytest.mark.parametrize("moment", ["next page just asked for", "page being normalized"])
def test_an_entra_walk_failing_at_once_leaves_no_request_of_the_other_walk_to_retry_and_log_a_traceback(
    vendor: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, moment: str
) -> None:
    from dirpull.connectors import entra_id

    v = vendor("entra_id")  # 4 pages of groups, 3 of users
    # The users walk fails on its first page while the groups walk, side by side, has its next
    # page asked for (answered slowly: still in flight when the run fails). Each wait below ends
    # on an event, not a guess of the machine's speed.
    closing = threading.Event()
    pending_at_close: list[str] = []
    session_close, session_get = entra_id._Session.close, entra_id._Session.get
    group_page = entra_id.EntraConnector._full_group_page

    async def close(self: Any) -> None:
        # What the connector started and left running when the session's transport closes.
        pending_at_close.extend(repr(t) for t in asyncio.all_tasks() if t is not asyncio.current_task())
        closing.set()
        await session_close(self)

    groups_read = [0]
    second_groups_page = asyncio.Event()
    users_waiting = threading.Event()

    async def get(self: Any, request_info: Any, *, step: str, delta: bool = False) -> dict[str, Any]:
        page = await session_get(self, request_info, step=step, delta=delta)
        if step == "groups delta":
            groups_read[0] += 1
            if groups_read[0] == 2:
                second_groups_page.set()
        elif moment == "next page just asked for":
            # The users walk's failure reaches the run as the groups walk has just asked for
            # its third page (the event loop wakes the waiters in order).
            users_waiting.set()
            await second_groups_page.wait()
        return page

    def busy_group_page(*args: Any) -> Page:
        if moment == "page being normalized":
            closing.wait(10)  # the groups walk is busy with its first page when the run fails
        return group_page(*args)

    monkeypatch.setattr(entra_id._Session, "close", close)
    monkeypatch.setattr(entra_id._Session, "get", get)
    monkeypatch.setattr(entra_id.EntraConnector, "_full_group_page", staticmethod(busy_group_page))
    slow = 3 if moment == "next page just asked for" else 2  # the groups page in flight
    skips = [0]

    def rewrite(a: Answer) -> Answer | None:
        if "/users/delta" in a.path:
            return Answer(a.path, 200, a.headers, b'{"x": 1}')
        if "/groups/delta" in a.path and "skiptoken=" in a.path:
            skips[0] += 1
            if skips[0] == 1 and moment == "next page just asked for":
                users_waiting.wait(10)  # the second page comes after the users walk's failed first
            if skips[0] == slow - 1:
                closing.wait(10)
                time.sleep(0.3)
        return None

    caplog.set_level(logging.WARNING)
    with proxying(v.emu.base_url, rewrite) as proxy:
        c = _connector("entra_id", v.settings(proxy.base_url))
        with pytest.raises(ConnectorError, match=r"^users delta: Graph sent a page with no `value`"):
            list(c.pull(None, full=True))
        assert skips[0] <= slow - 1  # no page asked for again, none after the slow one
    gc.collect()  # an unretrieved task's exception is logged when the task is collected
    # The operator's log holds the run's error only: no retry of a walk the failure cancelled
    # (its connection closed under it), no "Task exception was never retrieved" traceback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert pending_at_close == []


# --- Okta -----------------------------------------------------------------------------------------


def test_an_okta_listing_answered_with_an_empty_body_fails_the_pull_instead_of_losing_a_page(vendor: Any) -> None:
    v = vendor("okta")
    message = v.error(answers("/api/v1/users?", lambda a: Answer(a.path, a.status, a.headers, b""), nth=1))
    assert message.startswith("list users: HTTP 200 from http://127.0.0.1:") and "/api/v1/users" in message
    assert "with an empty body" in message


def _without_after(a: Answer) -> Answer:
    """The answer with its Link rel="next" pointing at the same listing but without `after`."""
    headers = [(k, re.sub(r"([?&])after=[^&>]*&?", r"\1", v) if k.lower() == "link" else v) for k, v in a.headers]
    return Answer(a.path, a.status, headers, a.body)


@pytest.mark.parametrize(
    ("path_part", "groups"),
    [("/api/v1/users?", 6), ("/api/v1/groups?", 210), ("/users?", 6)],
    ids=["users", "groups", "members"],
)
def test_an_okta_next_page_link_without_its_cursor_fails_the_pull_instead_of_ending_the_listing(
    vendor: Any, path_part: str, groups: int
) -> None:
    # More than a page (200) of users; of groups with 210; of a group's members with 6 (450, 376…).
    v = vendor("okta", people=450, groups=groups)
    seen: list[str] = []

    def rewrite(a: Answer) -> Answer | None:
        if path_part not in a.path or a.status != 200 or seen:
            return None
        if path_part == "/users?" and "/groups/" not in a.path:
            return None
        links = " ".join(val for k, val in a.headers if k.lower() == "link")
        if 'rel="next"' not in links:
            return None  # a one-page listing (a small group): nothing to take the cursor from
        seen.append(a.path)
        return _without_after(a)

    message = v.error(rewrite)
    assert seen, "no listing of more than one page was answered"
    assert "next-page link has no `after` cursor" in message
    assert "not taken as complete" in message


def _okta_user_ids(change: Any) -> Rewrite:
    """`change` applied to each user record of the users listing."""

    def rewrite(a: Answer) -> Answer:
        return Answer(a.path, a.status, a.headers, json.dumps([change(r) for r in json.loads(a.body)]).encode())

    return answers("/api/v1/users?", rewrite)


@pytest.mark.parametrize("id_value", [None, ""], ids=["missing", "empty"])
def test_an_okta_user_record_without_an_id_is_quarantined_and_deletes_no_one(
    vendor: Any, harness: Any, id_value: str | None
) -> None:
    from dirpull.connectors.okta import OktaConnector
    from dirpull.emulators.okta_api import user_id

    v = vendor("okta")
    n = 5
    for g in v.org.listed_groups():  # in no group: the members listings do not name them either
        if n in g.members:
            v.org.remove_member(g.n, n)
    unreadable = user_id(n)

    def strip(rec: dict[str, Any]) -> dict[str, Any]:
        if rec.get("id") != unreadable:
            return rec
        return {k: val for k, val in rec.items() if k != "id"} | ({} if id_value is None else {"id": id_value})

    with proxying(v.emu.base_url) as proxy:
        h = harness(
            {"t1": v.settings(proxy.base_url)},
            connector_factory=lambda name, settings: OktaConnector(name, settings, sleep=_OktaSleeps()),
        )
        assert h.sync("t1").status == "succeeded"
        before, seq = h.users("t1"), h.last_seq()
        assert unreadable in before
        proxy.rewrite = _okta_user_ids(strip)
        r = h.sync("t1", full=True)
    assert r.status == "succeeded", r.error
    assert h.users("t1") == before and h.changes("t1", after=seq) == []  # nobody deleted, no user ""
    assert r.counts["quarantined"] == 1
    assert [(q["idp_id"], q["reason"]) for q in h.store.runs("t1", 1)[0]["quarantined"]] == [
        (None, "user record without an id")
    ]


# --- BambooHR -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_without("employees"), "no 'employees' in it (its keys: 'title', 'fields')"),
        (_set("employees", None), "its 'employees' is NoneType, not a list"),
        (_set("employees", {}), "its 'employees' is dict, not a list"),
        (lambda doc: [doc], "a JSON list, not an object"),
    ],
    ids=["missing", "null", "object", "list"],
)
def test_a_bamboohr_report_without_its_employees_list_fails_the_pull_instead_of_listing_nobody(
    vendor: Any, harness: Any, change: Any, why: str
) -> None:
    from dirpull.connectors.bamboohr import build

    v = vendor("bamboohr")
    with proxying(v.emu.base_url) as proxy:
        h = harness(
            {"hr": v.settings(proxy.base_url)},
            connector_factory=lambda name, settings: build(name, settings, policy=_policy()),
        )
        proxy.rewrite = answers("reports/custom", _json(change))
        r = h.sync("hr")
    # Not a first sync that succeeds with nobody, nor a later one held as "the directory
    # returned no users" (sending the operator to check credentials that are fine).
    assert r.status == "failed" and h.users("hr") == {}
    assert r.error is not None and r.error.startswith("custom report: the answer from http://127.0.0.1:")
    assert f"is JSON but not a report of employees ({why})" in r.error


# --- Google Workspace -----------------------------------------------------------------------------


def _first_record(key: str, value: Any) -> Any:
    return lambda doc: {**doc, key: [value, *doc[key][1:]]}


@pytest.mark.parametrize(("listing", "key", "kind"), [("/users?", "users", "user"), ("/groups?", "groups", "group")])
@pytest.mark.parametrize("record", [None, "x"], ids=["null", "string"])
def test_a_google_record_that_is_not_an_object_is_quarantined_not_an_attribute_error(
    vendor: Any, listing: str, key: str, kind: str, record: Any
) -> None:
    v = vendor("google_workspace")
    pages, done = v.pull(answers(listing, _json(_first_record(key, record))))
    assert [(q.kind, q.idp_id, q.reason) for p in pages for q in p.quarantined] == [
        (kind, None, f"{kind} record is not an object")
    ]
    assert done.snapshot


@pytest.mark.parametrize(("listing", "key"), [("/users?", "users"), ("/groups?", "groups"), ("/members?", "members")])
@pytest.mark.parametrize(("value", "kind"), [({"0": {"id": "1"}}, "an object"), (None, "null")], ids=["object", "null"])
def test_a_google_page_whose_records_are_not_a_list_fails_the_pull_in_one_line(
    vendor: Any, listing: str, key: str, value: Any, kind: str
) -> None:
    v = vendor("google_workspace")
    message = v.error(answers(listing, _json(_set(key, value)), nth=1))
    assert f"the page's {key!r} is {kind}, not a list of records" in message
    assert message.startswith(f"{key}.list")


def test_a_google_member_record_that_is_not_an_object_fails_the_pull_naming_the_group(vendor: Any) -> None:
    v = vendor("google_workspace")
    message = v.error(answers("/members?", _json(_first_record("members", None)), nth=1))
    assert message.startswith("members.list of group ") and message.endswith(": a member record is not an object")


def test_a_google_pull_failing_on_one_group_does_not_wait_out_another_groups_back_off(vendor: Any) -> None:
    """One group's members answer is unreadable while another group's members read, beside it, is
    in a back-off after a 503: the pull fails at once, instead of waiting that back-off out (up to a
    minute a wait) before the run could say it failed."""
    from dirpull.config import GoogleTenant
    from dirpull.connectors.google_workspace import build as google

    v = vendor("google_workspace")
    seen: list[str] = []
    outage = b'{"error": {"code": 503, "message": "Backend Error", "errors": [{"reason": "backendError"}]}}'
    unreadable = _json(_first_record("members", None))

    def rewrite(a: Answer) -> Answer | None:
        if "/members?" not in a.path or a.status != 200:
            return None
        seen.append(a.path)
        if len(seen) == 1:
            return Answer(a.path, 503, [("Content-Type", "application/json")], outage)
        return unreadable(a) if len(seen) == 2 else None

    slow = RetryPolicy(max_attempts=3, base_delay=20.0, jitter=0.0)  # real, interruptible waits
    with proxying(v.emu.base_url, rewrite) as proxy:
        c = google("t1", GoogleTenant.model_validate(v.settings(proxy.base_url)), policy=slow)
        started = time.monotonic()
        with pytest.raises(ConnectorError, match="a member record is not an object"):
            list(c.pull(None, full=True))
        took = time.monotonic() - started
    assert len(seen) >= 2
    assert took < 5, f"the pull waited {took:.1f}s for another group's back-off"


def test_a_google_users_page_that_fails_the_pull_stops_the_listing_read_ahead_of_it(vendor: Any) -> None:
    """The first users page is unreadable while the next one, read ahead in its own thread, is in a
    back-off after a 503: the pull fails at once, and Google is not asked for that page again,
    instead of the pull waiting 10 s for the listing thread and leaving it behind still calling."""
    from dirpull.config import GoogleTenant
    from dirpull.connectors.google_workspace import build as google

    v = vendor("google_workspace", people=600)  # two pages of users (500 a page)
    seen: list[str] = []
    outage = b'{"error": {"code": 503, "message": "Backend Error", "errors": [{"reason": "backendError"}]}}'

    def rewrite(a: Answer) -> Answer | None:
        if "/users?" not in a.path or a.status != 200:
            return None
        seen.append(a.path)
        if len(seen) == 1:
            return _json(_set("users", "x"))(a)
        return Answer(a.path, 503, [("Content-Type", "application/json")], outage)

    slow = RetryPolicy(max_attempts=4, base_delay=2.0, jitter=0.0)  # real, interruptible waits
    with proxying(v.emu.base_url, rewrite) as proxy:
        c = google("t1", GoogleTenant.model_validate(v.settings(proxy.base_url)), policy=slow)
        started = time.monotonic()
        with pytest.raises(ConnectorError, match="the page's 'users' is a string"):
            list(c.pull(None, full=True))
        took = time.monotonic() - started
        asked = len(seen)
        time.sleep(2.5)  # one back-off: a listing left behind asks again
        after = len(seen) - asked
    assert took < 5, f"the pull waited {took:.1f}s for the listing's back-off"
    assert after == 0, f"Google was asked {after} more time(s) after the pull had failed"


# --- Workday --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "shape"),
    [
        (lambda doc: {"Report_Entry": dict(enumerate(doc["Report_Entry"]))}, "its 'Report_Entry' is dict, not a list"),
        (lambda doc: {"data": doc}, "no 'Report_Entry' in it (its keys: 'data')"),
    ],
    ids=["object-of-rows", "wrapped"],
)
def test_a_workday_report_with_its_rows_not_where_expected_is_refused_without_quoting_them(
    vendor: Any, change: Any, shape: str
) -> None:
    v = vendor("workday")
    message = v.error(answers("Worker_Directory", _json(change)))
    assert message.startswith("users report: the report has no rows; refusing to treat every worker as deleted")
    assert f"the body began: JSON with {shape}" in message
    assert not [x for x in person_values(v.org) if x in message], message


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_without("employees"), "no 'employees' in it (its keys: 'title', 'fields')"),
        (_set("employees", None), "its 'employees' is NoneType, not a list"),
        (lambda doc: [doc], "a JSON list, not an object"),
    ],
    ids=["missing", "null", "list"],
)
def test_a_bamboohr_increments_report_without_its_employees_list_fails_instead_of_skipping_the_changes(
    vendor: Any, harness: Any, change: Any, why: str
) -> None:
    """The report reading back the changed employees answered 200 with JSON that is not the report
    (a gateway's): read as listing none of them, the run succeeded noting them "not in the report",
    and moved the cursor past their changes, which no increment read again."""
    from dirpull.connectors.bamboohr import build

    v = vendor("bamboohr")
    with proxying(v.emu.base_url) as proxy:
        h = harness(
            {"hr": v.settings(proxy.base_url)},
            connector_factory=lambda name, settings: build(name, settings, policy=_policy()),
        )
        assert h.sync("hr").status == "succeeded"
        v.org.update_person(5, title="Principal")
        proxy.rewrite = answers("reports/custom", _json(change))
        r = h.sync("hr")
        assert r.status == "failed" and r.mode == "incremental", (r.status, r.notes)
        assert r.error is not None and r.error.startswith("custom report (changed employees): the answer from ")
        assert f"is JSON but not a report of employees ({why})" in r.error
        proxy.rewrite = None
        again = h.sync("hr")
    assert again.status == "succeeded" and again.mode == "incremental", again.error
    assert h.users("hr")["5"]["job_title"] == "Principal"


def test_a_bamboohr_employee_numbers_report_without_its_employees_list_fails_instead_of_clearing_managers(
    vendor: Any,
) -> None:
    """Managers given by employee number are resolved through a report of every employee's number:
    a 200 answer to it that is not the report (a gateway's JSON) read as no numbers at all, and
    every employee's manager was cleared."""
    v = vendor("bamboohr")
    with proxying(v.emu.base_url, answers("reports/custom", _json(_without("employees")), nth=1)) as proxy:
        by_number = {"manager_field": "supervisorId", "manager_field_holds": "employee_number"}
        settings = {**v.settings(proxy.base_url), **by_number}
        with pytest.raises(ConnectorError) as info:
            list(_connector("bamboohr", settings).pull(None, full=True))
    assert str(info.value).startswith("custom report (employee numbers): the answer from http://127.0.0.1:")
    why = "no 'employees' in it (its keys: 'title', 'fields')"
    assert f"is JSON but not a report of employees ({why})" in str(info.value)


# --- an error answer that is not the vendor's error format ------------------------------------------

_PROXY_PAGE = b"<html><body><h1>Access denied</h1><p>Blocked by policy 7 of the corporate proxy</p></body></html>"


@pytest.mark.parametrize("status", [400, 403, 404])
def test_an_entra_error_answered_by_a_proxys_page_quotes_the_page(vendor: Any, status: int) -> None:
    """kiota reads an error body as Graph's JSON only: a proxy's or gateway's page in its place
    left the run's error ending on a colon, with nothing of what the page said."""
    v = vendor("entra_id")
    page = answers("/users/delta", lambda a: Answer(a.path, status, [("Content-Type", "text/html")], _PROXY_PAGE))
    message = v.error(page)
    assert message.startswith(f"users delta: HTTP {status} on GET http://127.0.0.1:")
    assert message.endswith(": not Graph's error format: Access denied Blocked by policy 7 of the corporate proxy")


@pytest.mark.parametrize("status", [400, 403, 404])
def test_a_google_error_answered_by_a_proxys_page_quotes_the_page(vendor: Any, status: int) -> None:
    """googleapiclient's HttpError holds the page; dirpull read only the API's JSON error from it:
    a 400 ended on a colon, a 403 or 404 said "not permitted" or "not found" for a proxy's refusal."""
    v = vendor("google_workspace")
    page = answers("/users?", lambda a: Answer(a.path, status, [("Content-Type", "text/html")], _PROXY_PAGE))
    message = v.error(page)
    assert message.startswith(f"users.list: HTTP {status} from http://127.0.0.1:")
    assert ": not Google's error format: Access denied Blocked by policy 7 of the corporate proxy" in message


# --- a record nested too deep to parse ------------------------------------------------------------


def _tenant_connector(provider: str) -> Any:
    """The harness's connector factory for `provider` (it is given the tenant's settings model)."""
    if provider == "okta":
        from dirpull.connectors.okta import OktaConnector

        return lambda name, settings: OktaConnector(name, settings, sleep=_OktaSleeps())
    return lambda name, settings: _connector(provider, settings)


@pytest.mark.parametrize(
    ("provider", "listing", "records"),
    [
        ("entra_id", "/users/delta", lambda doc: doc["value"]),
        ("okta", "/api/v1/users?", lambda doc: [r["profile"] for r in doc]),
        ("google_workspace", "/users?", lambda doc: doc["users"]),
        ("workday", "Worker_Directory", lambda doc: doc["Report_Entry"]),
        ("bamboohr", "reports/custom", lambda doc: doc["employees"]),
    ],
)
@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_a_user_with_an_attribute_nested_thousands_of_levels_deep_is_quarantined_and_the_tenant_syncs(
    vendor: Any, harness: Any, provider: str, listing: str, records: Any, depth: int
) -> None:
    """A value nested deeper than a JSON parser goes (orjson: 1,024 levels; the standard library:
    the recursion limit), or than an encoder goes (orjson: 255; the standard library: the recursion
    limit), failed every run of the tenant with a RecursionError, for as long as the vendor kept
    the record: the whole directory stopped syncing over one user."""
    v = vendor(provider)
    deep = "[" * depth + "1" + "]" * depth

    def nest(a: Answer) -> Answer:
        doc = json.loads(a.body)
        recs = records(doc)
        if not recs:
            return a
        recs[0]["deepAttribute"] = "@@deep@@"
        return Answer(a.path, a.status, a.headers, json.dumps(doc).replace('"@@deep@@"', deep).encode())

    with proxying(v.emu.base_url, answers(listing, nest)) as proxy:
        h = harness({"t1": v.settings(proxy.base_url)}, connector_factory=_tenant_connector(provider))
        first = h.sync("t1", full=True)
        again = h.sync("t1", full=True)  # the vendor still sends it: the tenant goes on
    for r, run in zip((again, first), h.store.runs("t1", 2), strict=True):
        assert r.status == "succeeded", r.error
        # Okta's normalizer walks the profile (dropping nulls) and gives up first on 1,000 levels.
        assert {q["reason"] for q in run["quarantined"]} <= {
            "an attribute is nested more than 200 levels deep",
            "cannot normalize: maximum recursion depth exceeded",
        }
        assert 0 < r.counts["quarantined"] < r.counts["users_seen"]
    users = h.users("t1")
    assert users and not [u for u in users.values() if "deepAttribute" in json.dumps(u)]
