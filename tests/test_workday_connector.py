"""The Workday connector against the Workday emulator over loopback HTTP: connector-level pulls
and sync-level runs through the real store (tests/harness.py)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from hostile import Answer, proxying
from redirects import redirecting

from dirpull.config import WorkdayTenant
from dirpull.connectors.base import AuthError, ConfigurationError, ConnectorError, Done, Page
from dirpull.connectors.http import RetryPolicy
from dirpull.connectors.workday import WorkdayConnector, derived_group_id, fill_prompt, report_url
from dirpull.emulators.org import Org
from dirpull.emulators.workday_api import WorkdayEmulator, employee_id, group_id
from dirpull.spool import SpoolError

TODAY = date.today()  # the emulator, without a date prompt, reports as of the real today


def fast_policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=3, base_delay=0.0, jitter=0.0, sleep=lambda s: None)


@pytest.fixture
def org() -> Org:
    return Org.generate(people=60, seed=7)


@pytest.fixture
def emu(org: Org) -> Iterator[WorkdayEmulator]:
    with WorkdayEmulator(org) as e:
        yield e


def tenant(e: WorkdayEmulator, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    cfg = e.tenant_config("t1", tmp_path)
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def connector(cfg: dict[str, Any], today: date = TODAY, **kw: Any) -> WorkdayConnector:
    return WorkdayConnector(
        "t1", WorkdayTenant.model_validate(cfg), policy_factory=fast_policy, today=lambda: today, **kw
    )


def pull(c: WorkdayConnector) -> tuple[list[Page], Done]:
    items = list(c.pull(None, full=False))
    assert isinstance(items[-1], Done) and all(isinstance(i, Page) for i in items[:-1])
    return items[:-1], items[-1]


def users_of(pages: list[Page]) -> dict[str, Any]:
    return {u.idp_id: u for p in pages for u in p.users}


# --- connector level -------------------------------------------------------------------------------


def test_initial_pull_normalizes_workers_and_flattens_groups(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    parent = org.create_group("Parent")
    child = next(g for g in org.listed_groups() if g.name == "Finance")
    org.add_subgroup(parent.n, child.n)
    org.add_member(parent.n, 1)
    pages, done = pull(connector(tenant(emu, tmp_path), page_size=25))
    assert done.snapshot and done.mode == "full" and done.requests == 2
    users = users_of(pages)
    assert max(len(p.users) for p in pages) <= 25 and len(pages) >= 3  # paged, not one list
    assert set(users) == {employee_id(p.n) for p in org.listed_people()}
    for p in org.listed_people():
        u = users[employee_id(p.n)]
        assert u.state == p.state
        assert (u.first_name, u.last_name, u.display_name) == (p.given, p.family, p.display)
        assert u.email == p.email and u.job_title == p.title and u.department == p.department
        assert u.employee_number == employee_id(p.n)
        assert u.manager_idp_id == (employee_id(p.manager) if p.manager else None)
        assert u.raw_attributes["Employee_ID"] == u.idp_id
    groups = {g.idp_id: g for p in pages for g in p.groups}
    members = {m for p in pages for m in p.pairs()}
    assert set(groups) == {group_id(g.n) for g in org.listed_groups()}
    expected = {
        (group_id(g.n), employee_id(n)) for g in org.listed_groups() for n in org.transitive_members(g.n)
    }
    assert members == expected
    legal = {employee_id(n) for n in org.direct_members(child.n)[0]}
    assert legal and {u for g, u in members if g == group_id(parent.n)} == legal | {employee_id(1)}
    assert "Members_group" not in groups[group_id(parent.n)].raw_attributes
    assert [p for p in emu.prompts_log] == [{"Effective_as_of_Date": TODAY.isoformat()}] * 2


def test_prompts_placeholders_and_format_json_added() -> None:
    day = date(2026, 5, 2)
    assert fill_prompt("{today}", day) == "2026-05-02"
    assert fill_prompt("{today:%Y-%m-%d-07:00}", day) == "2026-05-02-07:00"
    url = report_url(
        "https://wd2.example/ccx/service/customreport2/acme/ISU/Workers",
        {"Effective_as_of_Date": "{today}", "Worker_Type!WID": "a1!b2"},
        day,
    )
    assert url == (
        "https://wd2.example/ccx/service/customreport2/acme/ISU/Workers?format=json"
        "&Effective_as_of_Date=2026-05-02&Worker_Type!WID=a1!b2"
    )
    assert report_url("https://h/x?format=json&A=1", {}, day) == "https://h/x?format=json&A=1"


@pytest.mark.parametrize("fmt", ["csv", "simplexml"])
def test_a_report_url_copied_in_another_format_is_read_as_json(
    emu: WorkdayEmulator, org: Org, tmp_path: Path, fmt: str
) -> None:
    """Actions › Web Service › View URLs offers the report as JSON, CSV, XML…: a URL copied with
    another format than json is still read as JSON, not failed with its rows (people's names and
    emails) quoted into the run's error."""
    cfg = tenant(emu, tmp_path)
    for key in ("users_report_url", "groups_report_url"):
        cfg[key] = cfg[key].replace("format=json", f"format={fmt}")
    pages, _ = pull(connector(cfg))
    assert set(users_of(pages)) == {employee_id(p.n) for p in org.listed_people()}
    assert {g.idp_id for p in pages for g in p.groups} == {group_id(g.n) for g in org.listed_groups()}
    assert [path.count("format=") for _, path in emu.request_log] == [1, 1]
    assert all("format=json" in path for _, path in emu.request_log)


def test_groups_derived_from_a_column(emu: WorkdayEmulator, org: Org, tmp_path: Path) -> None:
    cfg = tenant(emu, tmp_path, groups_report_url=None, group_column="Supervisory_Organization")
    pages, done = pull(connector(cfg))
    assert done.requests == 1
    groups = {g.idp_id: g.name for p in pages for g in p.groups}
    depts = {p.department for p in org.listed_people() if p.department}
    assert groups == {derived_group_id("Supervisory_Organization", d): d for d in depts}
    members = {m for p in pages for m in p.pairs()}
    assert members == {
        (derived_group_id("Supervisory_Organization", p.department), employee_id(p.n))
        for p in org.listed_people()
        if p.department
    }


def test_custom_column_mapping(org: Org, tmp_path: Path) -> None:
    aliases = {
        "Employee_ID": "Worker_Reference_ID",
        "Email_Address": "Email_-_Primary_Work",
        "Active_Status": "Is_Active",
        "Job_Title": "Position_Title",
        "Manager_Employee_ID": "Mgr_ID",
    }
    e = WorkdayEmulator(org, aliases=aliases)
    e.start()
    try:
        fields = {
            "idp_id": "Worker_Reference_ID",
            "email": "Email_-_Primary_Work",
            "state": "Is_Active",
            "job_title": "Position_Title",
            "manager": "Mgr_ID",
        }
        cfg = tenant(e, tmp_path, fields=fields, attributes={"cost_center": "Cost_Center"})
        org.deactivate(30)
        pages, _ = pull(connector(cfg))
    finally:
        e.stop()
    users = users_of(pages)
    p = org.person(31)
    u = users[employee_id(31)]
    assert (u.email, u.job_title, u.manager_idp_id) == (p.email, p.title, employee_id(p.manager))
    assert u.custom_attributes == {"cost_center": p.cost_center}
    assert users[employee_id(30)].state == "inactive"


def test_default_alternative_columns(org: Org, tmp_path: Path) -> None:
    cols = ["Employee_ID", "First_Name", "Last_Name", "Email_Address", "Worker_Status", "Job_Title"]
    e = WorkdayEmulator(
        org,
        columns=cols,
        aliases={"Employee_ID": "Worker_ID", "Email_Address": "Work_Email", "Job_Title": "Business_Title"},
    )
    e.start()
    try:
        org.deactivate(20)
        pages, done = pull(connector(tenant(e, tmp_path)))
    finally:
        e.stop()
    u = users_of(pages)[employee_id(21)]
    p = org.person(21)
    assert (u.email, u.job_title, u.display_name) == (p.email, p.title, p.display)
    assert users_of(pages)[employee_id(20)].state == "inactive"  # Worker_Status "Terminated"
    assert any("manager column" in n for n in done.notes)


@pytest.mark.parametrize(
    ("columns", "fields", "needle"),
    [
        # an explicitly mapped column the report does not have
        (None, {"email": "Work_Email"}, "email → Work_Email"),
        # no id column at all
        (["Legal_Name", "Email_Address", "Active_Status"], {}, "worker id column"),
        # no status column: would leave every terminated worker active
        (["Employee_ID", "Legal_Name", "Email_Address"], {}, "status column"),
    ],
)
def test_missing_columns_are_configuration_errors(
    org: Org, tmp_path: Path, columns: Any, fields: dict[str, str], needle: str
) -> None:
    e = WorkdayEmulator(org, columns=columns)
    e.start()
    try:
        c = connector(tenant(e, tmp_path, fields=fields))
        with pytest.raises(ConfigurationError, match=needle):
            list(c.pull(None, full=False))
    finally:
        e.stop()


@pytest.mark.parametrize(
    ("renamed", "needle"),
    [
        ({"Members_group": "Worker_group"}, r"members column \(tried Members_group, .*fields\.group_members"),
        ({"Group_ID": "Team_ID"}, r"group id column \(tried Group_ID, .*fields\.group_id"),
    ],
)
def test_a_groups_report_without_its_id_or_members_column_is_a_configuration_error(
    org: Org, tmp_path: Path, renamed: dict[str, str], needle: str
) -> None:
    # An alias renamed in Workday must not read as every group, or every membership, gone.
    e = WorkdayEmulator(org, aliases=renamed)
    e.start()
    try:
        with pytest.raises(ConfigurationError, match=needle):
            list(connector(tenant(e, tmp_path)).pull(None, full=False))
        field = "group_members" if "Members_group" in renamed else "group_id"
        pages, _ = pull(connector(tenant(e, tmp_path, fields={field: next(iter(renamed.values()))})))
    finally:
        e.stop()
    expected = {
        (group_id(g.n), employee_id(n)) for g in org.listed_groups() for n in org.transitive_members(g.n)
    }
    assert {m for p in pages for m in p.pairs()} == expected  # mapped, the report reads as before


def test_a_nested_column_with_one_entry_sent_as_an_object_is_read_as_a_list_of_one(
    org: Org, tmp_path: Path
) -> None:
    solo, wrapper = org.create_group("Solo"), org.create_group("Wrapper")
    org.add_member(solo.n, 1)
    org.add_subgroup(wrapper.n, solo.n)  # one subgroup, no direct members
    from dirpull.emulators.workday_api import WORKER_COLUMNS

    # No Email_Address column: the emails come from the nested group alone.
    e = WorkdayEmulator(org, columns=[c for c in WORKER_COLUMNS if c != "Email_Address"])
    e.lone_objects = True
    e.start()
    try:
        groups = {r["Group_ID"]: r for r in json.loads(e._groups_body())["Report_Entry"]}
        assert groups[group_id(solo.n)]["Members_group"] == {"Employee_ID": employee_id(1)}
        assert groups[group_id(wrapper.n)]["Subgroups_group"] == {"Group_ID": group_id(solo.n)}
        pages, _ = pull(connector(tenant(e, tmp_path)))
        mapped_email = tenant(e, tmp_path, groups_report_url=None, fields={"email": "Email_Address_group"})
        mapped, _ = pull(connector(mapped_email))
    finally:
        e.stop()
    members = {m for p in pages for m in p.pairs()}
    assert {(group_id(solo.n), employee_id(1)), (group_id(wrapper.n), employee_id(1))} <= members
    expected = {
        (group_id(g.n), employee_id(n)) for g in org.listed_groups() for n in org.transitive_members(g.n)
    }
    assert members == expected
    single = [p for p in org.listed_people() if p.email and p.n % 5]  # one (work) email: an object
    assert single
    for p in single:
        assert users_of(pages)[employee_id(p.n)].emails == [p.email]
        assert users_of(mapped)[employee_id(p.n)].email == p.email


def test_an_attribute_path_into_a_one_entry_column_sent_as_an_object_finds_its_value(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """`attributes` paths with a selector (`Email_Address_group[Usage_Type=WORK]…`) read a one-entry
    `_group` column sent as the object itself as the list of one it stands for: the attribute was
    missing for every worker with a single email."""
    attributes = {"work_email": "Email_Address_group[Usage_Type=WORK].Email_Address"}
    single = [p for p in org.listed_people() if p.email and p.n % 5]
    assert single
    emu.lone_objects = True
    h = sync_harness(harness, tenant(emu, tmp_path, groups_report_url=None, attributes=attributes), Clock())
    assert h.sync("t1").status == "succeeded"
    stored = h.users("t1")
    for p in single:
        assert stored[employee_id(p.n)]["custom_attributes"] == {"work_email": p.email}


def test_numeric_worker_ids_are_read_as_their_digits(emu: WorkdayEmulator, org: Org, tmp_path: Path) -> None:
    emu.numeric_ids = True  # a calculated field: Employee_ID 21004, not "21004"
    assert isinstance(json.loads(emu._groups_body())["Report_Entry"][0]["Members_group"][0]["Employee_ID"], int)
    pages, _ = pull(connector(tenant(emu, tmp_path)))
    assert not [q for p in pages for q in p.quarantined]
    users = users_of(pages)
    assert set(users) == {employee_id(p.n) for p in org.listed_people()}
    for p in org.listed_people():
        u = users[employee_id(p.n)]
        assert u.employee_number == employee_id(p.n)
        assert u.manager_idp_id == (employee_id(p.manager) if p.manager else None)
    expected = {
        (group_id(g.n), employee_id(n)) for g in org.listed_groups() for n in org.transitive_members(g.n)
    }
    assert {m for p in pages for m in p.pairs()} == expected
    from dirpull.connectors.workday import _text

    assert _text(True) is None and _text(21001.0) is None  # a flag or a float is no id


def test_an_empty_cell_reads_as_an_omitted_one_and_does_not_hide_the_next_column(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """RaaS usually omits a field with no value (directory-apis.md §5.1); a report that sends it as
    "" (or blanks) must normalize the same: the next alias tried still counts."""
    real_body = emu._users_body
    leaver = next(p for p in org.listed_people() if p.n > 20 and p.state == "active" and p.email)
    mover = next(p for p in org.listed_people() if p.n > leaver.n and p.state == "active" and p.email)

    def blanks(*args: Any) -> bytes:
        doc = json.loads(real_body(*args))
        for row in doc["Report_Entry"]:
            if row["Employee_ID"] == employee_id(leaver.n):  # a status text after an empty flag
                row.update(Active_Status=" ", Worker_Status="Terminated")
            if row["Employee_ID"] == employee_id(mover.n):  # the work email in the second alias
                row.update(Email_Address="", Work_Email="mover@work.example", Job_Title="")
        return json.dumps(doc).encode()

    emu._users_body = blanks  # type: ignore[method-assign]
    users = users_of(pull(connector(tenant(emu, tmp_path)))[0])
    assert users[employee_id(leaver.n)].state == "inactive"
    moved = users[employee_id(mover.n)]
    assert (moved.email, moved.username, moved.job_title) == ("mover@work.example", mover.username, None)


def test_a_padded_email_is_listed_once_trimmed_not_again_as_sent(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """The primary column's address was trimmed, the email group's copy of it not: `emails` held
    the address twice, once with its padding."""
    ann = next(p for p in org.listed_people() if p.state == "active" and p.email)
    address = ann.email
    org.update_person(ann.n, email=f" {address}\t")
    users = users_of(pull(connector(tenant(emu, tmp_path)))[0])
    worker = users[employee_id(ann.n)]
    assert worker.email == address
    assert worker.emails == [address]


def test_a_worker_whose_manager_is_themselves_has_no_manager(emu: WorkdayEmulator, org: Org, tmp_path: Path) -> None:
    """The head of a supervisory organization may be listed as their own manager: no manager, as
    Google's connector reads it, not a manager_idp_id naming the worker."""
    head = next(p for p in org.listed_people() if p.manager is not None)
    org.update_person(head.n, manager=head.n)
    users = users_of(pull(connector(tenant(emu, tmp_path)))[0])
    assert users[employee_id(head.n)].manager_idp_id is None
    assert sum(u.manager_idp_id is not None for u in users.values()) > len(users) // 2


def test_empty_report_is_refused(emu: WorkdayEmulator, tmp_path: Path) -> None:
    from dirpull.emulators.workday_api import wid

    cfg = tenant(emu, tmp_path, prompts={"Worker_Type!WID": wid("Worker_Type", "Nobody")})
    with pytest.raises(ConfigurationError, match="no rows"):
        list(connector(cfg).pull(None, full=False))


def test_state_future_termination_and_rehire(tmp_path: Path) -> None:
    org = Org.generate(people=30, seed=1)
    when = TODAY + timedelta(days=10)
    leaving, rehired = [p.n for p in org.listed_people() if p.state == "active" and p.n > 1][:2]
    org.schedule_termination(leaving, when.isoformat())
    org.update_person(rehired, termination_date="2021-03-31", hire_date="2022-01-10")  # rehired since
    e = WorkdayEmulator(org)
    e.start()
    try:
        cfg = tenant(e, tmp_path, prompts={})
        state = lambda day: {k: u.state for k, u in users_of(pull(connector(cfg, day))[0]).items()}  # noqa: E731
        assert state(TODAY)[employee_id(leaving)] == "active"
        assert state(when)[employee_id(leaving)] == "active"  # the last day worked
        assert state(when + timedelta(days=1))[employee_id(leaving)] == "inactive"
        assert state(TODAY)[employee_id(rehired)] == "active"
    finally:
        e.stop()


def test_xml_error_body_is_reported_readably(emu: WorkdayEmulator, tmp_path: Path) -> None:
    emu.faults.update({"error": 10})
    with pytest.raises(ConnectorError) as info:
        list(connector(tenant(emu, tmp_path)).pull(None, full=False))
    msg = str(info.value)
    assert "HTTP 500" in msg and "An unexpected error occurred while running the report" in msg
    assert "<" not in msg and "\n" not in msg and emu.password not in msg
    assert emu.requests == 3  # retried up to the policy's cap


@pytest.mark.parametrize("wrong", ["report", "owner", "tenant"])
def test_a_report_url_naming_no_report_fails_at_once_saying_what_to_check(
    emu: WorkdayEmulator, tmp_path: Path, wrong: str
) -> None:
    """Workday answers a report it will not run for this user (a wrong name, owner or tenant in the
    URL) with a 500 carrying a SOAP Client fault: retried, the run failed ~15 s later all the same,
    as if Workday were down."""
    url = emu.report_url(emu.users_report)
    bad = {"report": "Worker_Directry", "owner": "ISU_Synk", "tenant": "dirpull_dem0"}[wrong]
    good = {"report": emu.users_report, "owner": emu.owner, "tenant": emu.tenant}[wrong]
    cfg = tenant(emu, tmp_path, users_report_url=url.replace(f"/{good}", f"/{bad}", 1))
    with pytest.raises(ConnectorError) as info:
        list(connector(cfg).pull(None, full=True))
    msg = str(info.value)
    assert emu.requests == 1 and not info.value.retriable, msg
    assert "HTTP 500" in msg and "not found in tenant" in msg and "check the report URL" in msg, msg
    assert "shared with the integration user" in msg and emu.password not in msg and "<" not in msg


def test_forbidden_html_page_is_an_auth_error(emu: WorkdayEmulator, tmp_path: Path) -> None:
    emu.forbidden.add("Worker_Groups")
    with pytest.raises(AuthError, match=r"403.*not authorized: Worker_Groups") as info:
        list(connector(tenant(emu, tmp_path)).pull(None, full=False))
    assert str(info.value).endswith("; check that the report is shared with the integration user (or API client)")


@pytest.mark.parametrize("auth", ["basic", "oauth"])
def test_refused_credentials_name_the_keys_this_tenant_signs_in_with(
    emu: WorkdayEmulator, tmp_path: Path, auth: str
) -> None:
    """"users report: HTTP 401 from …: credentials refused or not permitted (…)" named none of the
    tenant's keys (BambooHR's says api_key and company_domain, Okta's api_token)."""
    cfg = tenant(emu, tmp_path, password="wrong-password") if auth == "basic" else oauth_tenant(emu, tmp_path)
    if auth == "oauth":
        emu.faults.update({"expire_auth": 10, "path": "customreport2"})  # the reports refused, after a refresh too
    with pytest.raises(AuthError) as info:
        list(connector(cfg).pull(None, full=False))
    msg = str(info.value)
    assert msg.startswith("users report: HTTP 401 from http://"), msg
    expected = "check username and password" if auth == "basic" else "check client_id, client_secret and refresh_token"
    assert msg.endswith(f"; {expected}") and "wrong-password" not in msg, msg


def test_a_json_report_labelled_otherwise_fails_without_quoting_its_rows(emu: WorkdayEmulator, tmp_path: Path) -> None:
    """A proxy relabelling the report (text/plain): the run fails on the content type, and the error,
    which lands in the run record and the log, quoted the report's first rows (names, emails)."""
    emu.json_content_type = "text/plain; charset=utf-8"
    with pytest.raises(ConnectorError, match=r"expected JSON from the report but got text/plain") as info:
        list(connector(tenant(emu, tmp_path)).pull(None, full=True))
    first = emu.org.person(min(p.n for p in emu.org.listed_people()))
    msg = str(info.value)
    assert "Report_Entry" in msg and "(values not shown)" in msg, msg
    assert first.email not in msg and first.family not in msg, msg


def test_non_json_200_and_broken_json(emu: WorkdayEmulator, tmp_path: Path) -> None:
    emu.login_page = True
    with pytest.raises(ConnectorError, match=r"expected JSON.*text/html.*Sign In"):
        list(connector(tenant(emu, tmp_path)).pull(None, full=False))
    emu.login_page = False
    emu.faults.update({"malformed": 3, "path": "Worker_Directory"})  # as often as it is asked for
    with pytest.raises(ConnectorError, match=r"not valid JSON.*Report_Entry.*gave up after 3 attempts") as info:
        list(connector(tenant(emu, tmp_path)).pull(None, full=False))
    # How the body began, but not its first rows: the message lands in the run record and the log.
    first = emu.org.person(min(p.n for p in emu.org.listed_people()))
    assert first.email and first.email not in str(info.value) and first.family not in str(info.value)


def test_a_broken_groups_report_is_reported_without_quoting_its_values(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """The groups report is parsed by ijson, whose yajl backend appends the body text around the
    fault to its message: that text (member ids, group names) must not reach the run's error."""
    emu.faults.update({"malformed": 3, "path": emu.groups_report})  # as often as it is asked for
    with pytest.raises(ConnectorError, match=r"groups report: the report is not valid JSON") as info:
        list(connector(tenant(emu, tmp_path)).pull(None, full=False))
    msg = str(info.value)
    assert "right here" not in msg and '"Employee_ID"' not in msg and '"Group_' not in msg
    assert not [g.name for g in org.listed_groups() if g.name in msg]
    assert msg.endswith('it began: {"Report_Entry":[ … (values not shown): gave up after 3 attempts')


def test_a_report_cut_off_before_a_row_was_handed_on_is_asked_for_again(
    emu: WorkdayEmulator, org: Org, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection dropped mid-report failed the run at once, "after 0 bytes (ProtocolError
    (IncompleteRead(1953 bytes read, …)))", although no row of it had been handed on: asked for
    again (the users report streamed into the diff, the groups report read ahead), and the run
    fails only once the attempts are spent, saying how many and, once, how much had arrived."""
    listed = {employee_id(p.n) for p in org.listed_people()}
    for report in ("Worker_Directory", "Worker_Groups"):
        emu.faults.clear()
        emu.faults.update({"drop": 1, "path": report})
        before = emu.requests
        pages, done = pull(connector(tenant(emu, tmp_path), page_size=10))
        assert set(users_of(pages)) == listed and any(p.groups for p in pages), report
        assert emu.requests - before == done.requests == 3, report
        assert "the connection failed while the report was read after" in caplog.text
        emu.faults.update({"drop": 3})
        items: list[Any] = []
        with pytest.raises(ConnectorError) as info:
            for item in connector(tenant(emu, tmp_path), page_size=10).pull(None, full=False):
                items.append(item)
        assert not any(isinstance(i, Done) for i in items), report
        msg = str(info.value)
        step = "users report" if report == "Worker_Directory" else "groups report"
        found = re.fullmatch(
            step + r": the connection failed while the report was read after (\d+) bytes of it had arrived "
            r"\(ProtocolError \(IncompleteRead\((\d+) bytes read, \d+ more expected\)\)\): gave up after 3 attempts",
            msg,
        )
        assert found and found.group(1) == found.group(2) != "0", msg
        assert info.value.retriable and emu.password not in msg


@pytest.mark.parametrize("buffering", [0, -1])  # failing at a write, or at the last buffer's flush
def test_a_full_tmpdir_under_the_groups_report_fails_once_naming_it_not_the_connection(
    emu: WorkdayEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffering: int
) -> None:
    """A groups report beyond its memory share goes to a temporary file: with no room left in
    TMPDIR, the run blamed the connection ("the connection failed while the report was read …
    (OSError (No space left on device))"), downloaded the whole report again five times, and gave
    up saying nothing of the directory or what to do."""
    monkeypatch.setattr("dirpull.connectors.workday.SPOOL_BYTES", 1)
    # /dev/full: every write the kernel gets fails with ENOSPC, as on a full TMPDIR.
    monkeypatch.setattr("tempfile.TemporaryFile", lambda **_: open("/dev/full", "w+b", buffering=buffering))  # noqa: SIM115
    with pytest.raises(SpoolError) as info:
        pull(connector(tenant(emu, tmp_path)))
    msg = str(info.value)
    assert msg.startswith("cannot write the temporary file of the groups report in ")
    assert "No space left on device" in msg and "TMPDIR" in msg and "nothing applied" in msg
    assert sum("Worker_Groups" in path for _, path in emu.request_log) == 1


def test_a_users_report_that_breaks_after_rows_were_handed_on_fails_without_asking_again(
    emu: WorkdayEmulator, tmp_path: Path
) -> None:
    # Rows handed on are in the diff already: the report is not streamed into it a second time.
    emu.faults.update({"malformed": 1, "path": "Worker_Directory"})
    items: list[Any] = []
    with pytest.raises(ConnectorError, match=r"users report: the report is not valid JSON .*not asked again"):
        for item in connector(tenant(emu, tmp_path), page_size=10).pull(None, full=False):
            items.append(item)
    assert items and not any(isinstance(i, Done) for i in items)
    assert [p for _, p in emu.request_log].count(next(p for _, p in emu.request_log if "Worker_Directory" in p)) == 1


def test_groups_report_is_requested_while_the_users_report_is_still_being_read(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    gen = connector(tenant(emu, tmp_path), page_size=10).pull(None, full=False)
    first = next(gen)
    assert isinstance(first, Page) and first.users and not first.groups
    deadline = time.monotonic() + 5
    while emu.requests < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert emu.requests == 2  # both reports asked for; 50 of the 60 workers not yet handed on
    rest = list(gen)
    assert isinstance(rest[-1], Done) and rest[-1].requests == 2
    groups = {g.idp_id for p in rest[:-1] for g in p.groups}
    assert groups == {group_id(g.n) for g in org.listed_groups()}


def test_a_groups_report_that_breaks_fails_the_pull_and_an_abandoned_pull_stops_reading(
    emu: WorkdayEmulator, tmp_path: Path
) -> None:
    emu.faults.update({"drop": 3, "path": "Worker_Groups"})  # as often as it is asked for
    items: list[Any] = []
    with pytest.raises(ConnectorError, match="groups report"):
        for item in connector(tenant(emu, tmp_path), page_size=10).pull(None, full=False):
            items.append(item)
    assert items and not any(isinstance(i, Done) for i in items)

    gen = connector(tenant(emu, tmp_path), page_size=10).pull(None, full=False)
    next(gen)
    gen.close()  # e.g. the run was stopped: the read-ahead thread ends with the pull (not waited for)
    deadline = time.monotonic() + 2
    while [t for t in threading.enumerate() if t.name.startswith("workday-groups-report")]:
        assert time.monotonic() < deadline, "the groups report is still being read"
        time.sleep(0.05)


def test_busy_and_5xx_responses_are_retried(emu: WorkdayEmulator, org: Org, tmp_path: Path) -> None:
    emu.faults.update({"rate_limit": 1, "error": 1, "error_status": 502})
    pages, done = pull(connector(tenant(emu, tmp_path)))
    assert len(users_of(pages)) == sum(1 for _ in org.listed_people())
    assert done.requests == 4 == emu.requests


def test_timeout_is_retried_then_fails(emu: WorkdayEmulator, tmp_path: Path) -> None:
    emu.faults.update({"delay": 0.6})
    with pytest.raises(ConnectorError, match="Timeout"):
        list(connector(tenant(emu, tmp_path, timeout=0.2)).pull(None, full=False))
    assert emu.requests == 3


def oauth_tenant(e: WorkdayEmulator, tmp_path: Path) -> dict[str, Any]:
    return tenant(
        e,
        tmp_path,
        username=None,
        password=None,
        token_url=e.token_url,
        client_id=e.client_id,
        client_secret=e.client_secret,
        refresh_token=e.refresh_token,
    )


def test_oauth_refresh_token_flow(emu: WorkdayEmulator, org: Org, tmp_path: Path) -> None:
    pages, done = pull(connector(oauth_tenant(emu, tmp_path)))
    assert len(users_of(pages)) == sum(1 for _ in org.listed_people())
    assert emu.tokens_issued == 1 and done.requests == 3  # one token, cached for both reports
    # A token that expires mid-pull is refreshed once.
    emu.faults.update({"expire_auth": 1, "path": "Worker_Groups"})
    pages, done = pull(connector(oauth_tenant(emu, tmp_path)))
    assert emu.tokens_issued == 3 and done.requests == 5
    bad = oauth_tenant(emu, tmp_path)
    bad["refresh_token"] = "revoked"
    with pytest.raises(AuthError, match="invalid_grant") as info:
        list(connector(bad).pull(None, full=False))
    assert "revoked" not in str(info.value)
    # The token endpoint failing with 5xx is a transient failure, not a credentials problem.
    emu.faults.update({"error": 10, "path": "/ccx/oauth2/"})
    with pytest.raises(ConnectorError) as info:
        list(connector(oauth_tenant(emu, tmp_path)).pull(None, full=False))
    assert not isinstance(info.value, AuthError) and info.value.retriable


@pytest.mark.parametrize("secret", ["pa€ss-wörd", "pässwörd", "パスワード-2026"])
def test_a_password_or_client_secret_beyond_ascii_signs_in(org: Org, tmp_path: Path, secret: str) -> None:
    """Basic credentials go in UTF-8 (RFC 7617). requests encodes strings as Latin-1: "pa€ss-wörd"
    failed the run with UnicodeEncodeError (an "unexpected error" and a traceback, nothing naming
    the password), and "pässwörd" was sent as bytes the server does not read as the password."""
    with WorkdayEmulator(org, password=secret, client_secret=secret) as e:
        pages, _ = pull(connector(tenant(e, tmp_path)))
        assert len(users_of(pages)) == sum(1 for _ in org.listed_people())
        pages, _ = pull(connector(oauth_tenant(e, tmp_path)))  # the token request's client secret
        assert len(users_of(pages)) == sum(1 for _ in org.listed_people()) and e.tokens_issued == 1


def test_a_token_answer_without_access_token_quotes_only_the_oauth_error(
    emu: WorkdayEmulator, tmp_path: Path
) -> None:
    # The body may carry a refresh_token; the error reaches the run record and the log.
    emu.token_response = {
        "token_type": "Bearer",
        "refresh_token": emu.refresh_token,
        "scope": "Staffing",
        "error": "temporarily_unavailable",
        "error_description": "Try again later",
    }
    with pytest.raises(AuthError) as info:
        list(connector(oauth_tenant(emu, tmp_path)).pull(None, full=False))
    msg = str(info.value)
    assert msg.endswith("without an access_token: temporarily_unavailable – Try again later")
    assert emu.refresh_token not in msg and "Staffing" not in msg
    emu.token_response = {"token_type": "Bearer", "refresh_token": emu.refresh_token}
    with pytest.raises(AuthError) as info:
        list(connector(oauth_tenant(emu, tmp_path)).pull(None, full=False))
    assert str(info.value).endswith("without an access_token and without an error")
    # … and an error text that echoes the refresh token sent does not quote it.
    emu.token_response = {"error": "invalid_request", "error_description": f"bad token {emu.refresh_token}"}
    with pytest.raises(AuthError) as info:
        list(connector(oauth_tenant(emu, tmp_path)).pull(None, full=False))
    assert str(info.value).endswith("invalid_request – bad token …")
    assert emu.requests == 3  # no report was asked for without a token


@pytest.mark.parametrize("status", [307, 308, 302])
def test_a_token_endpoint_redirecting_to_another_host_gets_no_refresh_token_there(
    emu: WorkdayEmulator, tmp_path: Path, status: int
) -> None:
    # A 307/308 makes requests send the form again: the refresh token went to the other host, and
    # its 401 was reported as Workday refusing the credentials at the configured token_url.
    with redirecting(status) as servers:
        cfg = oauth_tenant(emu, tmp_path)
        cfg["token_url"] = f"{servers.redirector}/ccx/oauth2/acme/token"
        with pytest.raises(ConnectorError) as info:
            list(connector(cfg).pull(None, full=False))
    assert servers.seen == []
    msg = str(info.value)
    assert f"HTTP {status} from {servers.redirector}/ccx/oauth2/acme/token redirects to another host" in msg
    assert f"({servers.foreign}/ccx/oauth2/acme/token)" in msg and "not following it" in msg
    assert emu.refresh_token not in msg


def test_a_report_redirecting_to_another_host_is_not_followed(emu: WorkdayEmulator, tmp_path: Path) -> None:
    with redirecting(302) as servers:
        cfg = tenant(emu, tmp_path, users_report_url=f"{servers.redirector}/ccx/service/customreport2/acme/R")
        with pytest.raises(ConnectorError, match=r"^users report: HTTP 302 from .* redirects to another host") as info:
            list(connector(cfg).pull(None, full=False))
    assert servers.seen == [] and not info.value.retriable
    assert "credentials refused" not in str(info.value)


# --- sync level ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.today = TODAY

    def factory(self, tenant_id: str, settings: Any) -> WorkdayConnector:
        return WorkdayConnector(tenant_id, settings, policy_factory=fast_policy, today=lambda: self.today)


def sync_harness(harness: Any, cfg: dict[str, Any], clock: Clock) -> Any:
    return harness({"t1": cfg}, connector_factory=clock.factory)


def test_sync_round_of_changes_exact_events(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    clock = Clock()
    cfg = tenant(emu, tmp_path, groups_report_url=None, group_column="Supervisory_Organization", prompts={})
    h = sync_harness(harness, cfg, clock)
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    listed = [p for p in org.listed_people()]
    assert len(h.users("t1")) == len(listed)
    assert r.events == len(h.events("t1")) > len(listed)
    assert h.sync("t1").events == 0  # unchanged directory: no events

    dept = lambda d: derived_group_id("Supervisory_Organization", d)  # noqa: E731
    seq = h.last_seq()
    leaves = [p for p in listed if p.n > 20 and p.state == "active" and p.department]
    quit_now, leaving, promoted, mover, gone = leaves[:5]
    new_dept = next(d for d in ("Legal", "Security", "Data") if d != mover.department)
    when = TODAY + timedelta(days=14)
    hired = org.hire("Nova", "Hire", department="Research", manager=2)
    org.deactivate(quit_now.n, termination_date=TODAY.isoformat())
    org.schedule_termination(leaving.n, when.isoformat())
    org.update_person(promoted.n, manager=3)
    old_dept = mover.department
    org.update_person(mover.n, department=new_dept)
    org.delete(gone.n)
    groups_before = set(h.groups("t1"))
    groups_after = {dept(p.department) for p in org.listed_people() if p.department}
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    got = sorted(h.changes("t1", after=seq))
    expected = sorted(
        [
            ("user.created", employee_id(hired.n)),
            ("group.user_added", dept("Research"), employee_id(hired.n)),
            ("user.updated", employee_id(quit_now.n), ("raw_attributes", "state")),
            ("user.updated", employee_id(leaving.n), ("raw_attributes",)),
            ("user.updated", employee_id(promoted.n), ("manager_idp_id", "raw_attributes")),
            ("user.updated", employee_id(mover.n), ("department", "raw_attributes")),
            ("group.user_removed", dept(old_dept), employee_id(mover.n)),
            ("group.user_added", dept(new_dept), employee_id(mover.n)),
            ("user.deleted", employee_id(gone.n)),
            ("group.user_removed", dept(gone.department), employee_id(gone.n)),
        ]
        # A department group appears with its first member and goes with its last one.
        + [("group.created", g) for g in groups_after - groups_before]
        + [("group.deleted", g) for g in groups_before - groups_after]
    )
    assert got == expected
    users = h.users("t1")
    assert users[employee_id(quit_now.n)]["state"] == "inactive"
    assert users[employee_id(leaving.n)]["state"] == "active"
    assert employee_id(gone.n) not in users
    assert h.sync("t1").events == 0

    # The scheduled termination takes effect once its date has passed, with no change in Workday.
    seq = h.last_seq()
    clock.today = when
    assert h.sync("t1").events == 0
    clock.today = when + timedelta(days=1)
    r = h.sync("t1")
    assert r.status == "succeeded"
    assert h.changes("t1", after=seq) == [("user.updated", employee_id(leaving.n), ("state",))]
    assert h.sync("t1").events == 0


def test_an_unreadable_row_keeps_its_worker_and_the_derived_group_only_they_are_in(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """A quarantined worker is left as stored, memberships included: the department group whose
    only member they are is not deleted from under the membership kept for them."""
    solo = next(p for p in org.listed_people() if p.n > 20 and p.state == "active")
    org.update_person(solo.n, department="Solo Studio")
    cfg = tenant(emu, tmp_path, groups_report_url=None, group_column="Supervisory_Organization", prompts={})
    h = sync_harness(harness, cfg, Clock())
    assert h.sync("t1").status == "succeeded"
    group = derived_group_id("Supervisory_Organization", "Solo Studio")
    seq = h.last_seq()
    org.update_person(solo.n, hire_date="31/12/2020")  # a date the connector cannot read
    r = h.sync("t1")
    assert r.status == "succeeded" and r.counts["quarantined"] == 1
    assert h.changes("t1", after=seq) == []
    assert group in h.groups("t1") and (group, employee_id(solo.n)) in h.members("t1")
    org.update_person(solo.n, hire_date="2020-12-31")
    r = h.sync("t1")
    assert h.changes("t1", after=seq) == [("user.updated", employee_id(solo.n), ("raw_attributes",))]


def test_an_unreadable_row_naming_another_department_makes_no_group_and_keeps_the_old_one(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """A quarantined worker is left as stored: the department group they alone are in is neither
    deleted (under the membership kept for them) nor replaced by an empty group of the department
    the unreadable row names."""
    solo = next(p for p in org.listed_people() if p.n > 20 and p.state == "active")
    org.update_person(solo.n, department="Solo Studio")
    cfg = tenant(emu, tmp_path, groups_report_url=None, group_column="Supervisory_Organization", prompts={})
    h = sync_harness(harness, cfg, Clock())
    assert h.sync("t1").status == "succeeded"
    old = derived_group_id("Supervisory_Organization", "Solo Studio")
    new = derived_group_id("Supervisory_Organization", "New Studio")
    seq = h.last_seq()
    org.update_person(solo.n, hire_date="31/12/2020", department="New Studio")  # unreadable date
    r = h.sync("t1")
    assert r.status == "succeeded" and r.counts["quarantined"] == 1
    assert h.changes("t1", after=seq) == []
    assert old in h.groups("t1") and new not in h.groups("t1")
    assert {g for g, u in h.members("t1") if u == employee_id(solo.n)} == {old}
    org.update_person(solo.n, hire_date="2020-12-31")  # readable again: the move is applied
    assert h.sync("t1").status == "succeeded"
    assert sorted(c[0] for c in h.changes("t1", after=seq)) == [
        "group.created", "group.deleted", "group.user_added", "group.user_removed", "user.updated",
    ]  # fmt: skip
    assert {g for g, u in h.members("t1") if u == employee_id(solo.n)} == {new} and old not in h.groups("t1")


def test_sync_a_run_busy_past_its_retry_budget_can_be_given_more(
    harness: Any, emu: WorkdayEmulator, tmp_path: Path
) -> None:
    """The run's retry budget was a fixed 300 s: a tenant whose Workday kept asking it to wait
    longer failed every run with nothing to raise. `max_retry_wait` is that budget (scaled down:
    the emulator's Retry-After of 1 s passes 0.5 s); `max_retry_attempts` caps the attempts."""
    cfg = tenant(emu, tmp_path, groups_report_url=None)
    emu.faults.update({"rate_limit": 1})
    r = harness({"t1": {**cfg, "max_retry_wait": 0.5}}).sync("t1")
    assert r.status == "failed" and "the 0.5s cap on retry waits" in (r.error or ""), r.error
    emu.faults.update({"rate_limit": 1})
    r = harness({"t1": {**cfg, "max_retry_attempts": 1}}).sync("t1")
    assert r.status == "failed" and "gave up after 1 attempts" in (r.error or ""), r.error
    emu.faults.update({"rate_limit": 1})
    h = harness({"t1": {**cfg, "max_retry_wait": 2}})
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    assert emu.faults.rate_limit == 0 and h.users("t1")


def test_sync_with_groups_report(harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path) -> None:
    h = sync_harness(harness, tenant(emu, tmp_path), Clock())
    assert h.sync("t1").status == "succeeded"
    expected = {
        (group_id(g.n), employee_id(n)) for g in org.listed_groups() for n in org.transitive_members(g.n)
    }
    assert h.members("t1") == expected
    g = next(g for g in org.listed_groups() if g.members)
    n = next(p.n for p in org.listed_people() if p.n not in org.transitive_members(g.n))
    seq = h.last_seq()
    org.add_member(g.n, n)
    assert h.sync("t1").status == "succeeded"
    added = [c for c in h.changes("t1", after=seq)]
    assert ("group.user_added", group_id(g.n), employee_id(n)) in added
    assert all(c[0] == "group.user_added" for c in added)  # also added to the groups containing g


def test_a_group_listed_twice_with_different_data_is_left_as_stored_with_the_groups_nesting_it(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    parent = org.create_group("Parent")
    child = next(g for g in org.listed_groups() if g.name == "Finance")
    org.add_subgroup(parent.n, child.n)
    twin = next(g for g in org.listed_groups() if g.members and g.n not in (parent.n, child.n))
    h = sync_harness(harness, tenant(emu, tmp_path), Clock())
    assert h.sync("t1").status == "succeeded"
    before = (h.groups("t1"), h.members("t1"))
    seq = h.last_seq()
    real_body = emu._groups_body

    def twice() -> bytes:
        doc = json.loads(real_body())
        rows = doc["Report_Entry"]
        for row in list(rows):
            if row["Group_ID"] == group_id(child.n):  # a second row, renamed and one member short
                rows.append({**row, "Group_Name": "Finance (old)", "Members_group": row["Members_group"][1:]})
            if row["Group_ID"] == group_id(twin.n):  # the very same row again
                rows.insert(0, row)
        return json.dumps(doc).encode()

    emu._groups_body = twice  # type: ignore[method-assign]
    r = h.sync("t1")
    assert r.status == "succeeded" and r.counts["quarantined"] == 2
    assert sorted(q["idp_id"] for q in h.store.runs("t1", 1)[0]["quarantined"]) == sorted(
        [group_id(child.n), group_id(parent.n)]
    )
    assert h.changes("t1", after=seq) == [] and (h.groups("t1"), h.members("t1")) == before
    emu._groups_body = real_body  # type: ignore[method-assign]
    org.add_member(child.n, next(p.n for p in org.listed_people() if p.n not in org.transitive_members(child.n)))
    assert h.sync("t1").status == "succeeded"
    assert {c[0] for c in h.changes("t1", after=seq)} == {"group.user_added"}  # both groups sync again


def test_a_worker_the_report_lists_twice_is_quarantined_with_neither_row_applied(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """Which of two rows with one worker id is right cannot be told, so neither is applied: the
    first copy, handed over pages before the second arrives, is withdrawn with the department
    memberships it named. A stored worker stays as stored, memberships included; a new worker is
    not created; a department only the first copy names gets no group."""
    cfg = tenant(emu, tmp_path, groups_report_url=None, group_column="Supervisory_Organization", prompts={})
    h = harness(
        {"t1": cfg},
        connector_factory=lambda t, s: WorkdayConnector(t, s, policy_factory=fast_policy, page_size=10),
    )
    assert h.sync("t1").status == "succeeded"
    stored, mover = [p for p in org.listed_people() if p.n > 20 and p.state == "active" and p.department][:2]
    other = next(p.department for p in org.listed_people() if p.department not in (None, stored.department))
    hired = org.hire("Twin", "Row", department="Research", manager=2)
    ids = {"stored": employee_id(stored.n), "mover": employee_id(mover.n), "hired": employee_id(hired.n)}
    before = snapshot(h)
    real_body = emu._users_body

    def twice(*args: Any) -> bytes:
        doc = json.loads(real_body(*args))
        rows, tail = [], []
        for row in doc["Report_Entry"]:
            eid = row["Employee_ID"]
            if eid == ids["stored"]:  # another title in each row (and department), the second pages later
                rows.append({**row, "Job_Title": "First Row Title", "Supervisory_Organization": other})
                tail.append({**row, "Job_Title": "Second Row Title"})
            elif eid == ids["hired"]:  # a new worker, the two rows next to each other
                rows += [row, {**row, "Job_Title": "Second Row Title"}]
            elif eid == ids["mover"]:  # the first row names a department nobody else is in
                rows.append({**row, "Supervisory_Organization": "Twin Studio"})
                tail.append(row)
            else:
                rows.append(row)
        doc["Report_Entry"] = rows + tail
        return json.dumps(doc).encode()

    emu._users_body = twice  # type: ignore[method-assign]
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    assert {q["idp_id"]: q["reason"] for q in h.store.runs("t1", 1)[0]["quarantined"]} == {
        i: "worker id appears twice in the report" for i in ids.values()
    }
    assert h.changes("t1", after=before[-1]) == []
    assert snapshot(h) == before  # users, groups and memberships as stored
    assert derived_group_id("Supervisory_Organization", "Twin Studio") not in h.groups("t1")
    emu._users_body = real_body  # type: ignore[method-assign]
    assert h.sync("t1").status == "succeeded"
    assert {c[1] for c in h.changes("t1", after=before[-1]) if c[0].startswith("user.")} == {ids["hired"]}


def test_identical_copies_of_a_worker_are_one_row_applied_once(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report joined on a multi-valued field it does not show (positions, emails) repeats a
    worker's row, byte for byte, once per value: that is one row, applied once — not the worker
    held out of every run until the report is fixed. A stored worker with a change is updated once,
    a new hire created once, an unchanged worker's copies recognized by their text (the report's
    last row, always parsed, too) and left as stored; their groups report memberships stand. Only
    another row with an id holds it."""
    h = harness(
        {"t1": tenant(emu, tmp_path, prompts={})},
        connector_factory=lambda t, s: WorkdayConnector(t, s, policy_factory=fast_policy, page_size=10),
    )
    assert h.sync("t1").status == "succeeded"
    plain = [p for p in org.listed_people() if p.n > 20 and p.state == "active" and not p.termination_date]
    changed, same, clash = plain[:3]
    assert any(same.n in org.transitive_members(g.n) for g in org.listed_groups())  # memberships to keep
    org.update_person(changed.n, title="Principal Engineer")
    hired = org.hire("Twin", "Row")
    ids = {"changed": employee_id(changed.n), "same": employee_id(same.n), "hired": employee_id(hired.n)}
    clash_id = employee_id(clash.n)
    seq = h.last_seq()
    real_body = emu._users_body

    def copies(*args: Any) -> bytes:
        doc = json.loads(real_body(*args))
        rows, tail = [], []
        for row in doc["Report_Entry"]:
            rows.append(row)
            if row["Employee_ID"] in ids.values():
                rows.append(row)  # one copy next to it, one pages later
                tail.append(row)
            elif row["Employee_ID"] == clash_id:
                tail.append({**row, "Job_Title": "Second Row Title"})
        tail.sort(key=lambda r: r["Employee_ID"] == ids["same"])  # the unchanged one's copy last
        doc["Report_Entry"] = rows + tail
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    emu._users_body = copies  # type: ignore[method-assign]
    normalized: list[str] = []
    real_user = WorkdayConnector._user

    def user(self: WorkdayConnector, idp_id: str, *args: Any) -> Any:
        normalized.append(idp_id)
        return real_user(self, idp_id, *args)

    monkeypatch.setattr(WorkdayConnector, "_user", user)
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    assert {q["idp_id"]: q["reason"] for q in h.store.runs("t1", 1)[0]["quarantined"]} == {
        clash_id: "worker id appears twice in the report"
    }
    assert sorted(c[:2] for c in h.changes("t1", after=seq)) == [
        ("user.created", ids["hired"]), ("user.updated", ids["changed"]),
    ]  # fmt: skip
    assert h.users("t1")[ids["changed"]]["job_title"] == "Principal Engineer"
    assert ids["same"] not in normalized and len(h.users("t1")) == len(list(org.listed_people()))


@pytest.mark.parametrize(
    "where",
    ["copy last", "first row, copy in the middle", "copy after a long nested column", "copy last, many nested columns"],
)
def test_a_spaced_report_repeating_a_recognized_row_keeps_the_worker_unquarantined(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path, where: str
) -> None:
    """A report printed with spaces and line breaks (not as orjson writes JSON) that repeats a
    worker's row: on a resync the first copy is recognized by its text, and the other must still
    count as that very row. As the last row (parsed with the document's end) it was digested as a
    parsed row, which never matches a spaced text; as the array's first row, its text began with
    the line break and indent after `[`, which the copy's does not; after a row nesting more
    entries than the reader tries cuts in, the rest of the report was read without texts; as the
    last row with more nested columns than the reader tried cuts in (16), it had no text either.
    Each way every unchanged resync quarantined the worker as listed twice with different rows."""
    h = harness(
        {"t1": tenant(emu, tmp_path, prompts={})},
        connector_factory=lambda t, s: WorkdayConnector(t, s, policy_factory=fast_policy),
    )
    twin = next(p for p in org.listed_people() if p.n > 20 and p.state == "active" and not p.termination_date)
    real_body = emu._users_body

    def spaced(*args: Any) -> bytes:
        doc = json.loads(real_body(*args))
        rows = doc["Report_Entry"]
        row = next(r for r in rows if r["Employee_ID"] == employee_id(twin.n))
        if where == "copy last, many nested columns":
            row.update({f"Extra_{k}_group": [{"ID": f"X{k}"}] for k in range(20)})
        if where.startswith("copy last"):
            rows.append(row)
        else:
            rows.remove(row)
            rows.insert(0, row)
            if where == "copy after a long nested column":
                rows[1] = {**rows[1], "Organizations_group": [{"Organization": f"Org {k}"} for k in range(30)]}
            rows.insert(len(rows) // 2, row)
        return json.dumps(doc, indent=2, ensure_ascii=False).encode()

    emu._users_body = spaced  # type: ignore[method-assign]
    seq = 0
    for _ in range(4):  # first sync, digests of the texts, then resyncs that recognize them
        r = h.sync("t1")
        assert r.status == "succeeded" and r.counts["quarantined"] == 0, (r.error, r.counts)
        if seq:
            assert h.changes("t1", after=seq) == []
        seq = h.last_seq()
    org.update_person(twin.n, title="Principal Engineer")
    r = h.sync("t1")
    assert r.status == "succeeded" and r.counts["quarantined"] == 0
    assert h.changes("t1", after=seq) == [("user.updated", employee_id(twin.n), ("job_title", "raw_attributes"))]


def test_identical_copies_on_a_first_sync_make_one_worker_and_one_membership(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """On a first sync (every row parsed, groups derived from a column) a worker whose row comes
    twice is created once, and the department only that worker is in is made with them in it."""
    loner = next(p for p in org.listed_people() if p.n > 20 and p.state == "active")
    org.update_person(loner.n, department="Twin Studio")
    twins = {employee_id(loner.n), employee_id(org.hire("Twin", "Row", department="Research").n)}
    real_body = emu._users_body

    def copies(*args: Any) -> bytes:
        doc = json.loads(real_body(*args))
        rows = doc["Report_Entry"]
        doc["Report_Entry"] = [r for r in rows for _ in range(2 if r["Employee_ID"] in twins else 1)]
        doc["Report_Entry"] += [r for r in rows if r["Employee_ID"] in twins]
        return json.dumps(doc).encode()

    emu._users_body = copies  # type: ignore[method-assign]
    cfg = tenant(emu, tmp_path, groups_report_url=None, group_column="Supervisory_Organization", prompts={})
    h = harness(
        {"t1": cfg},
        connector_factory=lambda t, s: WorkdayConnector(t, s, policy_factory=fast_policy, page_size=10),
    )
    r = h.sync("t1")
    assert r.status == "succeeded" and r.counts["quarantined"] == 0, r.error
    created = [c[1] for c in h.changes("t1") if c[0] == "user.created"]
    assert sorted(created) == sorted(employee_id(p.n) for p in org.listed_people())
    studio = derived_group_id("Supervisory_Organization", "Twin Studio")
    assert [u for g, u in h.members("t1") if g == studio] == [employee_id(loner.n)]
    seq = h.last_seq()
    assert h.sync("t1").status == "succeeded" and h.changes("t1", after=seq) == []


def test_a_worker_listed_twice_keeps_their_stored_groups_and_an_unreadable_first_row_counts(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """With a groups report, a worker listed twice is not added to a group the groups report now
    puts them in: their stored memberships stand. A first row that cannot be read does not let the
    second one through."""
    h = sync_harness(harness, tenant(emu, tmp_path), Clock())
    assert h.sync("t1").status == "succeeded"
    twin, odd = [p for p in org.listed_people() if p.n > 20 and p.state == "active"][:2]
    g = next(g for g in org.listed_groups() if g.members and twin.n not in org.transitive_members(g.n))
    org.add_member(g.n, twin.n)
    before = snapshot(h)
    real_body = emu._users_body

    def twice(*args: Any) -> bytes:
        doc = json.loads(real_body(*args))
        rows = doc["Report_Entry"]
        for i, row in enumerate(list(rows)):
            if row["Employee_ID"] == employee_id(twin.n):
                rows.append({**row, "Job_Title": "Second Row Title"})
            if row["Employee_ID"] == employee_id(odd.n):  # a date it cannot read, then another title
                rows[i] = {**row, "Hire_Date": "31/12/2020"}
                rows.append({**row, "Job_Title": "Second Row Title"})
        return json.dumps(doc).encode()

    emu._users_body = twice  # type: ignore[method-assign]
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    quarantined = {q["idp_id"] for q in h.store.runs("t1", 1)[0]["quarantined"]}
    assert quarantined == {employee_id(twin.n), employee_id(odd.n)}
    assert h.changes("t1", after=before[-1]) == [] and snapshot(h) == before
    emu._users_body = real_body  # type: ignore[method-assign]
    assert h.sync("t1").status == "succeeded"
    added = h.changes("t1", after=before[-1])
    assert ("group.user_added", group_id(g.n), employee_id(twin.n)) in added
    assert {c[0] for c in added} == {"group.user_added"}


def test_a_resync_recognizes_unchanged_rows_by_their_text_and_parses_only_the_rest(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    # Configured columns must still be found in a report whose rows are never parsed. (No date
    # prompt: the report is as of the emulator's today, whatever the connector's clock says.)
    fields = {"email": "Email_Address", "department": "Supervisory_Organization"}
    cfg = tenant(emu, tmp_path, fields=fields, prompts={})
    h = sync_harness(harness, cfg, clock)
    leaving = next(p for p in org.listed_people() if p.n > 10 and p.state == "active")
    when = TODAY + timedelta(days=3)
    org.schedule_termination(leaving.n, when.isoformat())
    first = h.sync("t1")
    assert first.status == "succeeded", first.error
    parsed: list[str] = []  # rows handed over parsed (recognized ones are not)
    normalized: list[str] = []
    real_user_row, real_user = WorkdayConnector._user_row, WorkdayConnector._user

    def user_row(self: WorkdayConnector, row: Any, *args: Any, **kw: Any) -> None:
        parsed.append(row["Employee_ID"])
        real_user_row(self, row, *args, **kw)

    def user(self: WorkdayConnector, idp_id: str, *args: Any) -> Any:
        normalized.append(idp_id)
        return real_user(self, idp_id, *args)

    monkeypatch.setattr(WorkdayConnector, "_user_row", user_row)
    monkeypatch.setattr(WorkdayConnector, "_user", user)
    listed = sorted(org.listed_people(), key=lambda p: p.n)
    # A row with a termination date is parsed: whether the date has passed is not in its text.
    dated = {employee_id(p.n) for p in listed if p.termination_date}
    last = employee_id(listed[-1].n)  # parsed with the document's end
    seq = h.last_seq()
    again = h.sync("t1")
    assert again.status == "succeeded" and again.events == 0, again.error
    assert normalized == [] and set(parsed) == dated | {last} and employee_id(leaving.n) in dated
    assert len(h.users("t1")) == len(listed)  # recognized rows count as seen: nobody deleted
    # A changed row is parsed and normalized; the unchanged ones still are not.
    parsed.clear()
    org.update_person(listed[3].n, title="Principal Engineer")
    changed = h.sync("t1")
    assert changed.status == "succeeded" and normalized == [employee_id(listed[3].n)]
    assert set(parsed) == dated | {last, employee_id(listed[3].n)}
    title = ("user.updated", employee_id(listed[3].n), ("job_title", "raw_attributes"))
    assert h.changes("t1", after=seq) == [title]
    # The scheduled termination still takes effect when its date passes, the report unchanged.
    seq = h.last_seq()
    normalized.clear()
    clock.today = when + timedelta(days=1)
    r = h.sync("t1")
    assert r.status == "succeeded" and normalized == [employee_id(leaving.n)]
    assert h.changes("t1", after=seq) == [("user.updated", employee_id(leaving.n), ("state",))]


def test_a_recognized_row_listed_again_is_one_row_or_quarantined_and_checks_still_see_its_columns(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    import json

    cfg = tenant(emu, tmp_path, fields={"email": "Email_Address"})
    sources: dict[str, str] = {}
    owners: dict[str, str] = {}

    class Known:
        def __call__(self, idp_id: str, digest: str) -> bool:
            return sources.get(idp_id) == digest

        def owner(self, digest: str) -> str | None:
            return owners.get(digest)

        def owns_any(self) -> bool:
            return bool(owners)

    first = list(connector(cfg).pull(None, full=True, known=Known()))
    sources.update({k: v for p in first[:-1] for k, v in p.user_sources.items()})
    owners.update({v: k for k, v in sources.items()})
    real_body = emu._users_body
    twins: list[str] = []

    def twice(*args: Any) -> bytes:
        doc = json.loads(real_body(*args))
        rows = doc["Report_Entry"]
        rows.insert(5, rows[2])  # the very same row: one row
        rows.insert(6, {**rows[3], "Job_Title": "Second Row Title"})  # another row: neither applied
        twins.extend((rows[2]["Employee_ID"], rows[3]["Employee_ID"]))
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    emu._users_body = twice  # type: ignore[method-assign]
    items = list(connector(cfg).pull(None, full=True, known=Known()))
    pages, done = items[:-1], items[-1]
    assert isinstance(done, Done)
    unchanged = [u for p in pages for u in p.unchanged_users]
    quarantined = [(q.idp_id, q.reason) for p in pages for q in p.quarantined]
    assert unchanged.count(twins[0]) == 1 and len(unchanged) > len(sources) // 2
    assert quarantined == [(twins[1], "worker id appears twice in the report")]
    assert [u for p in pages for u in p.removed_users] == [twins[1]]  # its recognized copy withdrawn
    # Nothing parsed said which columns the report has; the rows' texts did.
    emu.columns = tuple(c for c in emu.columns if c != "Email_Address")
    emu._users_body = real_body  # type: ignore[method-assign]
    with pytest.raises(ConfigurationError, match=r"configured column.*Email_Address"):
        list(connector(cfg).pull(None, full=True, known=Known()))


def test_columns_of_a_recognized_text_are_read_as_keys() -> None:
    from dirpull.connectors.workday import _Columns

    columns = _Columns([("Email_Address",), ("Active_Status", "Worker_Status"), ("Job_Title", "Business_Title")])
    columns.add_text(b'{"Employee_ID":"1","Worker_Status" : "Active","Note":"Job_Title","X":"\\\\"}')
    assert columns.seen == {"Worker_Status"}  # a value is not a key; whitespace before a colon is fine
    columns.add_text(b'{"Employee_ID":"2","Note":"say \\"Email_Address\\": x"}')
    assert columns.seen == {"Worker_Status"}  # inside a string, a key's look-alike is escaped
    columns.add_row({"Business_Title": "Boss"})
    columns.add_text(b'{"Employee_ID":"3","Email_Address":"a@b","Job_Title":"x"}')
    assert columns.seen == {"Worker_Status", "Business_Title", "Email_Address"}  # a found group stops


def snapshot(h: Any) -> tuple[Any, ...]:
    return h.users("t1"), h.groups("t1"), h.members("t1"), h.last_seq()


def test_failed_runs_leave_the_store_unchanged(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    clock = Clock()
    cfg = tenant(emu, tmp_path, fields={"email": "Email_Address"}, timeout=0.3)
    h = sync_harness(harness, cfg, clock)
    assert h.sync("t1").status == "succeeded"
    before = snapshot(h)
    org.deactivate(25)
    org.delete(26)

    # The report loses a mapped column.
    emu.columns = tuple(c for c in emu.columns if c != "Email_Address")
    r = h.sync("t1")
    assert r.status == "failed" and "Email_Address" in r.error and "configured column" in r.error
    assert snapshot(h) == before

    # The report loses its status columns: never a tenant of active-forever workers.
    emu.columns = tuple(c for c in emu.columns if c not in ("Active_Status", "Worker_Status"))
    r = h.sync("t1")
    assert r.status == "failed" and snapshot(h) == before

    from dirpull.emulators.workday_api import WORKER_COLUMNS

    emu.columns = WORKER_COLUMNS
    # An XML error body, after the retries.
    emu.faults.update({"error": 5})
    r = h.sync("t1")
    assert r.status == "failed" and "unexpected error occurred while running the report" in r.error
    assert snapshot(h) == before
    emu.faults.clear()

    # A report that is too slow.
    emu.faults.update({"delay": 0.6, "path": "Worker_Groups"})
    r = h.sync("t1")
    assert r.status == "failed" and "Timeout" in r.error
    assert snapshot(h) == before
    emu.faults.clear()

    r = h.sync("t1")
    assert r.status == "succeeded"
    assert sorted(c[0] for c in h.changes("t1", after=before[3]) if c[0].startswith("user")) == [
        "user.deleted",
        "user.updated",
    ]


def test_a_renamed_members_column_fails_the_run_and_keeps_the_memberships(
    harness: Any, emu: WorkdayEmulator, tmp_path: Path
) -> None:
    h = sync_harness(harness, tenant(emu, tmp_path), Clock())
    assert h.sync("t1").status == "succeeded"
    before = snapshot(h)
    assert before[2]  # memberships to lose
    emu.aliases = {"Members_group": "Worker_group"}
    r = h.sync("t1")
    assert r.status == "failed" and "members column" in r.error and "fields.group_members" in r.error
    assert snapshot(h) == before
    emu.aliases = {"Group_ID": "Team_ID"}
    r = h.sync("t1")
    assert r.status == "failed" and "group id column" in r.error and snapshot(h) == before


def test_an_emptied_groups_report_is_held_though_the_tenant_has_few_groups(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A groups report that comes back with no rows (a filter added to its definition, a security
    change) is read as every group deleted. With 8 groups, under the guard's `min_count` of 20, the
    run was applied: every group and membership gone downstream in one run."""
    h = sync_harness(harness, tenant(emu, tmp_path), Clock())
    assert h.sync("t1").status == "succeeded"
    before = snapshot(h)
    assert 0 < len(before[1]) <= 20 and before[2]
    monkeypatch.setattr(emu, "_groups_body", lambda: emu._encode(iter(())))
    r = h.sync("t1")
    assert r.status == "held" and r.exit_code == 3, r.error
    stored = len(before[1])
    assert f"the directory returned no groups while the store holds {stored} (would delete {stored} with" in r.error
    assert snapshot(h) == before
    assert h.sync("t1", force=True).status == "succeeded" and h.groups("t1") == {} and h.members("t1") == set()
    # A tenant with no groups stored (none configured, or none left) is not held for listing none.
    again = h.sync("t1")
    assert again.status == "succeeded" and again.events == 0, again.error


def test_a_groups_report_with_emptied_member_lists_is_held(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every group still listed, but only one with members (a calculated members field that a
    security change blanked): every other membership would go in one run, and the access that
    downstream apps grant by group with it."""
    h = sync_harness(harness, tenant(emu, tmp_path), Clock())
    assert h.sync("t1").status == "succeeded"
    before = snapshot(h)
    keep = next(iter(org.listed_groups()))
    row = emu.group_row

    def emptied(g: Any) -> dict[str, Any]:
        out = row(g)
        if g.n != keep.n:
            out.pop("Members_group", None)
            out.pop("Subgroups_group", None)
        return out

    monkeypatch.setattr(emu, "group_row", emptied)
    r = h.sync("t1")
    assert r.status == "held" and r.exit_code == 3, r.error
    assert f"of {len(before[2])} group memberships (threshold 10% and more than 20)" in r.error
    assert snapshot(h) == before
    forced = h.sync("t1", force=True)
    assert forced.status == "succeeded" and set(h.groups("t1")) == set(before[1])
    assert 0 < len(h.members("t1")) < len(before[2]) // 10


def test_sync_with_oauth(harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path) -> None:
    h = sync_harness(harness, oauth_tenant(emu, tmp_path), Clock())
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    assert len(h.users("t1")) == sum(1 for _ in org.listed_people())
    assert emu.tokens_issued == 1


# --- cost ----------------------------------------------------------------------------------------


def _serve(people: int, q: Any, stop: Any) -> None:
    e = WorkdayEmulator(Org.generate(people=people, seed=1))
    e.start()
    q.put(e.tenant_config("bench", Path(".")))
    stop.wait(300)
    e.stop()


@pytest.mark.skipif(not os.environ.get("DIRPULL_BENCH"), reason="set DIRPULL_BENCH=<workers> to measure")
def test_bench_pull_cost_per_user() -> None:
    """DIRPULL_BENCH=10000 pytest tests/test_workday_connector.py -k bench -s
    The emulator runs in a child process so its JSON encoding does not share the GIL with the pull."""
    import multiprocessing
    import time
    import tracemalloc

    import requests

    people = int(os.environ["DIRPULL_BENCH"])
    ctx = multiprocessing.get_context("fork")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(people, q, stop))
    proc.start()
    try:
        cfg = q.get(timeout=300)
        cfg.pop("groups_report_url")
        settings = WorkdayTenant.model_validate(cfg)
        t = time.perf_counter()
        size = len(
            requests.get(
                cfg["users_report_url"], auth=(cfg["username"], cfg["password"]), timeout=300
            ).content
        )
        serve = time.perf_counter() - t
        best, users = float("inf"), 0
        for _ in range(3):
            t = time.perf_counter()
            users = sum(
                len(i.users)
                for i in WorkdayConnector("b", settings).pull(None, full=True)
                if isinstance(i, Page)
            )
            best = min(best, time.perf_counter() - t)
        tracemalloc.start()
        for _ in WorkdayConnector("b", settings).pull(None, full=True):
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        stop.set()
        proc.join(30)
    assert users > 0.9 * people
    print(
        f"\n{users} workers, report {size / 1e6:.1f} MB: "
        f"pull {best:.2f} s = {best / users * 1e6:.0f} µs/user "
        f"(emulator serving + download alone: {serve / users * 1e6:.0f} µs/user); "
        f"peak Python memory during a pull {peak / 1e6:.1f} MB"
    )


@pytest.mark.parametrize("refused", ["refresh_token", "client_secret"])
def test_a_token_endpoint_quoting_the_credential_sent_does_not_put_it_in_the_run_or_the_log(
    emu: WorkdayEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    """An OAuth server may quote what it refused ("Invalid refresh token: …"): the run's error keeps
    the vendor's words and the step, but not the credential — in `sync --json`, `runs`, `status`
    and the debug log alike."""
    from typer.testing import CliRunner

    from dirpull.cli import app

    emu.echo_grant = True
    secret = f"wd-{refused}-that-was-revoked"
    monkeypatch.setenv("WD_CLIENT_SECRET", secret if refused == "client_secret" else emu.client_secret)
    monkeypatch.setenv("WD_REFRESH_TOKEN", secret if refused == "refresh_token" else emu.refresh_token)
    monkeypatch.delenv("DIRPULL_STORE_URL", raising=False)
    config = tmp_path / "dirpull.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "store.db"}"\n\n[tenants.wd]\nprovider = "workday"\n'
        f'users_report_url = "{emu.report_url(emu.users_report)}"\ntoken_url = "{emu.token_url}"\n'
        f'client_id = "{emu.client_id}"\nclient_secret = "env:WD_CLIENT_SECRET"\n'
        'refresh_token = "env:WD_REFRESH_TOKEN"\n'
    )
    runner = CliRunner()
    sync = runner.invoke(app, ["--config", str(config), "--log-level", "debug", "sync", "wd", "--json"])
    assert sync.exit_code == 1, sync.output
    error = json.loads(sync.stdout.splitlines()[0])["error"]
    assert ("invalid_grant" if refused == "refresh_token" else "invalid_client") in error and "token" in error
    outputs = [sync.stdout, sync.stderr]
    for args in (["runs", "wd", "--json"], ["runs", "wd"], ["status", "--json"], ["status"]):
        r = runner.invoke(app, ["--config", str(config), *args])
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
    for text in outputs:
        assert secret not in text, text


def test_a_token_answer_cut_short_is_retried_and_then_fails_naming_the_step(
    emu: WorkdayEmulator, tmp_path: Path
) -> None:
    emu.faults.update({"drop": 1, "path": "/ccx/oauth2/"})
    pages, _ = pull(connector(oauth_tenant(emu, tmp_path)))
    assert users_of(pages) and emu.tokens_issued == 2  # the first answer was cut short, then retried
    emu.faults.update({"drop": 100, "path": "/ccx/oauth2/"})
    with pytest.raises(ConnectorError) as info:  # not a bare ChunkedEncodingError with a traceback
        list(connector(oauth_tenant(emu, tmp_path)).pull(None, full=False))
    assert info.value.retriable and str(info.value).startswith("token: ChunkedEncodingError (IncompleteRead(")
    assert " on POST http://" in str(info.value)
    assert "gave up after 3 attempts" in str(info.value)


def test_a_password_in_the_report_url_query_is_not_shown_in_errors(emu: WorkdayEmulator, tmp_path: Path) -> None:
    url = emu.report_url(emu.users_report) + "&pwd=hunter2-pwd&pass=hunter2-pass&sessionid=hunter2-session"
    emu.faults.update({"expire_auth": 10})
    with pytest.raises(AuthError) as info:
        list(connector(tenant(emu, tmp_path, users_report_url=url, groups_report_url=None)).pull(None, full=False))
    msg = str(info.value)
    assert msg.startswith("users report: HTTP 401 from http://") and "pwd=***&pass=***&sessionid=***" in msg, msg
    assert "hunter2" not in msg


def test_a_run_held_after_a_fields_change_says_the_change_may_be_the_cause(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """Workday keeps no cursor (every run reads the whole report), and the settings a run was made
    under were stored only beside a connector's cursor: a hold after `fields` was pointed at another
    column never said that the operator's own edit may be its cause (Okta's and BambooHR's did)."""
    for n in sorted(org.people)[-10:]:  # a Termination_Date column filled for ten workers only
        org.deactivate(n, termination_date="2020-01-31")
    cfg = tenant(emu, tmp_path)
    guard = {"max_percent": 10, "min_count": 5}
    assert harness({"t1": cfg}, guard=guard).sync("t1").status == "succeeded"
    remapped = {**cfg, "fields": {**(cfg.get("fields") or {}), "department": "Termination_Date"}}
    held = harness({"t1": remapped}, guard=guard).sync("t1")
    assert held.status == "held", held.error
    assert "would empty department" in (held.error or "")
    assert "the tenant's settings changed since its last applied sync" in (held.error or ""), held.error
    # The settings put back: the next run is as before, nothing to apply, no hold.
    again = harness({"t1": cfg}, guard=guard).sync("t1")
    assert again.status == "succeeded" and again.events == 0, again.error


def test_a_failed_pull_does_not_wait_out_the_groups_reports_back_off(emu: WorkdayEmulator, tmp_path: Path) -> None:
    """The users report fails (here: not a report) while the groups report, asked for beside it,
    is in a back-off after a 503: the pull ends at once, instead of waiting that back-off out (up to
    a minute) before the run could say it failed."""
    from hostile import Answer, proxying

    emu.faults.update({"error": 100, "error_status": 503, "path": "Worker_Groups"})

    def not_a_report(a: Answer) -> Answer | None:
        return Answer(a.path, 200, a.headers, b'{"Report": []}') if "Worker_Directory" in a.path else None

    slow = RetryPolicy(max_attempts=6, base_delay=20.0, jitter=0.0)  # real, interruptible waits
    with proxying(emu.base_url, not_a_report) as proxy:
        cfg = json.loads(json.dumps(tenant(emu, tmp_path)).replace(emu.base_url, proxy.base_url))
        c = WorkdayConnector("t1", WorkdayTenant.model_validate(cfg), policy_factory=lambda: slow, today=lambda: TODAY)
        started = time.monotonic()
        with pytest.raises(ConnectorError, match="users report"):
            list(c.pull(None, full=False))
        took = time.monotonic() - started
    assert emu.faults.error < 100  # the groups report was asked for, and refused
    assert took < 5, f"the pull waited {took:.1f}s for the groups report's back-off"


def _flatten_org(org: Org) -> None:
    for g in org.listed_groups():
        g.subgroups.clear()


def test_a_configured_subgroups_column_that_no_group_has_yet_is_no_reason_to_fail(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """`fields.group_subgroups` set, and no group nests another (yet): Workday leaves an empty list
    out of a row, so the column is in no row. Every run failed with "no row has the configured
    column(s) group_subgroups → …", for an organization with nothing wrong in it."""
    _flatten_org(org)
    cfg = tenant(emu, tmp_path, fields={"group_subgroups": "Subgroups_group"})
    pages, done = pull(connector(cfg))
    assert {g.idp_id for p in pages for g in p.groups} == {group_id(g.n) for g in org.listed_groups()}
    assert any("group_subgroups" in n and "no group nests another" in n for n in done.notes), done.notes


def test_every_group_empty_is_refused_by_default_and_read_once_the_members_column_is_configured(
    emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """Workday leaves an empty member list out: with every group empty no row has a members
    column, which by default reads as a renamed alias (refused, lest every membership be deleted).
    The refusal says how to confirm it: name the column in fields.group_members; then it is read."""
    _flatten_org(org)
    for g in org.listed_groups():
        for n in list(org.direct_members(g.n)[0]):
            org.remove_member(g.n, n)
    with pytest.raises(ConfigurationError) as err:
        pull(connector(tenant(emu, tmp_path)))
    assert "no row has a members column" in str(err.value)
    assert "if every group is empty" in str(err.value) and "fields.group_members" in str(err.value)

    pages, done = pull(connector(tenant(emu, tmp_path, fields={"group_members": "Members_group"})))
    assert {g.idp_id for p in pages for g in p.groups} == {group_id(g.n) for g in org.listed_groups()}
    assert [pair for p in pages for pair in p.pairs()] == []
    assert any("group_members" in n and "every group read as empty" in n for n in done.notes), done.notes


def test_a_failed_pull_does_not_wait_for_the_groups_report_still_being_built(
    emu: WorkdayEmulator, tmp_path: Path
) -> None:
    """The users report fails (here: not a report) while Workday is still building the groups
    report asked for beside it (nothing is sent until it is): the pull ends at once, instead of
    waiting for that report (up to the request timeout, 300 s) before the run could say it failed."""
    from hostile import Answer, proxying

    emu.faults.update({"delay": 6.0, "path": "Worker_Groups"})

    def not_a_report(a: Answer) -> Answer | None:
        return Answer(a.path, 200, a.headers, b'{"Report": []}') if "Worker_Directory" in a.path else None

    with proxying(emu.base_url, not_a_report) as proxy:
        cfg = json.loads(json.dumps(tenant(emu, tmp_path)).replace(emu.base_url, proxy.base_url))
        c = WorkdayConnector("t1", WorkdayTenant.model_validate(cfg), today=lambda: TODAY)
        started = time.monotonic()
        with pytest.raises(ConnectorError, match="users report"):
            list(c.pull(None, full=False))
        took = time.monotonic() - started
        # The request left behind ends when its answer comes: not left to later tests.
        deadline = time.monotonic() + 15
        while [t for t in threading.enumerate() if t.name.startswith("workday-groups-report")]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert took < 4.5, f"the pull waited {took:.1f}s for the groups report"


def test_a_resync_getting_multi_instance_columns_in_another_order_is_silent(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path
) -> None:
    """Workday promises no order for a multi-instance column's entries (a worker's emails, a
    group's subgroups): the same report with them in another order is no change (no event, no
    row), and the worker's `emails` keep one order. Dropping one of the addresses still is one."""
    worker = employee_id(next(p for p in org.listed_people() if p.n != 1).n)
    state = {"reversed": False, "drop": False}

    def present(answer: Answer) -> Answer | None:
        if answer.status != 200 or "customreport2" not in answer.path:
            return None
        body = json.loads(answer.body)
        for row in body["Report_Entry"]:
            if row.get("Employee_ID") == worker:
                extra = [f"w{i}.{worker}@example.test" for i in range(1, 4 - state["drop"])]
                row["Email_Address_group"] = [
                    {"Email_Address": row["Email_Address"], "Usage_Type": "WORK", "Primary": "1"},
                    *({"Email_Address": e, "Usage_Type": "WORK", "Primary": "0"} for e in extra),
                ]
            if row.get("Subgroups_group") and len(row["Subgroups_group"]) == 1:
                row["Subgroups_group"].append({"Group_ID": group_id(1)})  # a group nesting nothing
            if state["reversed"]:
                for value in row.values():
                    if isinstance(value, list):
                        value.reverse()
        return Answer(answer.path, answer.status, answer.headers, json.dumps(body).encode())

    with proxying(emu.base_url, present) as proxy:
        cfg = tenant(emu, tmp_path)
        cfg = {k: v.replace(emu.base_url, proxy.base_url) if k.endswith("_url") else v for k, v in cfg.items()}
        h = sync_harness(harness, cfg, Clock())
        assert h.sync("t1").status == "succeeded"
        assert any(len(g["raw_attributes"].get("Subgroups_group") or []) > 1 for g in h.groups("t1").values())
        emails = h.users("t1")[worker]["emails"]
        assert len(emails) == 4
        state["reversed"] = True
        for full in (True, False):
            again = h.sync("t1", full=full)
            assert again.status == "succeeded", again.error
            assert (again.events, again.counts["rows_written"]) == (0, 0), h.changes("t1")
        assert h.users("t1")[worker]["emails"] == emails

        seq = h.last_seq()
        state["drop"] = True
        assert h.sync("t1").status == "succeeded"
        assert h.changes("t1", after=seq) == [("user.updated", worker, ("emails", "raw_attributes"))]
        assert f"w3.{worker}@example.test" not in h.users("t1")[worker]["emails"]


@pytest.mark.parametrize(
    ("settings", "read"),
    [
        ({"fields": {"email": "Email_Address_group"}}, lambda user: user["email"]),
        # An `attributes` path's `[primary]`: the entry flagged `"Primary": "1"`, not the first.
        (
            {"attributes": {"primary_email": "Email_Address_group[primary].Email_Address"}},
            lambda user: user["custom_attributes"].get("primary_email"),
        ),
    ],
    ids=["field", "attribute"],
)
def test_a_field_read_from_a_multi_instance_column_is_its_primary_entry_whatever_the_order(
    harness: Any, emu: WorkdayEmulator, org: Org, tmp_path: Path, settings: dict[str, Any], read: Any
) -> None:
    """`fields.email` naming the worker's email group (or an attribute path's `[primary]` into it):
    the entry flagged Primary is the email, however the report orders the entries. Taking the first
    one, a report listing the home address first changed every such worker's email to it (and back
    on the next run)."""
    state = {"reversed": False}

    def present(answer: Answer) -> Answer | None:
        if answer.status != 200 or "customreport2" not in answer.path or not state["reversed"]:
            return None
        body = json.loads(answer.body)
        for row in body["Report_Entry"]:
            if isinstance(row.get("Email_Address_group"), list):
                row["Email_Address_group"].reverse()
        return Answer(answer.path, answer.status, answer.headers, json.dumps(body).encode())

    with proxying(emu.base_url, present) as proxy:
        cfg = tenant(emu, tmp_path, **settings)
        cfg = {k: v.replace(emu.base_url, proxy.base_url) if k.endswith("_url") else v for k, v in cfg.items()}
        h = sync_harness(harness, cfg, Clock())
        assert h.sync("t1").status == "succeeded"
        stored = h.users("t1")
        with_home = [p for p in org.listed_people() if len(stored[employee_id(p.n)]["raw_attributes"].get(
            "Email_Address_group") or []) > 1]  # fmt: skip
        assert with_home
        for p in with_home:
            assert read(h.users("t1")[employee_id(p.n)]) == p.email
        state["reversed"] = True
        again = h.sync("t1", full=True)
        assert (again.events, again.counts["rows_written"]) == (0, 0), h.changes("t1")
        assert all(read(h.users("t1")[employee_id(p.n)]) == p.email for p in with_home)


@pytest.mark.parametrize("refused", ["client_id", "client_secret", "refresh_token"])
def test_a_refused_token_grant_names_the_keys_to_check(emu: WorkdayEmulator, tmp_path: Path, refused: str) -> None:
    """The token endpoint refusing the client (401) or its refresh token (400 invalid_grant) said
    "OAuth refresh-token grant failed: token: HTTP 401 … credentials refused or not permitted (…)",
    naming none of the tenant's keys, where a refused report names them."""
    cfg = oauth_tenant(emu, tmp_path)
    cfg[refused] = f"wrong-{refused}"
    with pytest.raises(AuthError) as info:
        list(connector(cfg).pull(None, full=False))
    msg = str(info.value)
    assert msg.startswith("OAuth refresh-token grant failed: token: HTTP "), msg
    assert msg.endswith("; check client_id, client_secret and refresh_token"), msg
    assert f"wrong-{refused}" not in msg or refused == "client_id", msg


def _in_zone(monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """The machine's local zone, as a worker's TZ sets it (restored by monkeypatch, then tzset)."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()


@pytest.fixture
def _restore_tz() -> Iterator[None]:
    yield
    time.tzset()  # after monkeypatch has put TZ back (fixtures end in reverse order)


@pytest.mark.parametrize("timezone", [None, "UTC"])
def test_workers_in_different_zones_agree_on_today_once_the_tenant_names_its_zone(
    _restore_tz: None, monkeypatch: pytest.MonkeyPatch, harness: Any, emu: WorkdayEmulator, org: Org,
    tmp_path: Path, timezone: str | None,
) -> None:  # fmt: skip
    """Two workers sharing a store, one whose machine is at UTC-12 and one at UTC+14 (their dates
    always differ), each read a worker terminated "today" against its own date: every run of one
    flipped them inactive, every run of the other back to active. With `timezone` set, both read
    the tenant's date, and the prompt's `{today}` is that date too."""
    from datetime import UTC, datetime

    behind, ahead = "Etc/GMT+12", "Etc/GMT-14"  # POSIX names: the sign is inverted
    _in_zone(monkeypatch, behind)
    leaving = next(p for p in org.listed_people() if p.state == "active" and p.n > 2)
    org.schedule_termination(leaving.n, date.today().isoformat())  # the last day worked, at UTC-12
    cfg = tenant(emu, tmp_path, groups_report_url=None, timezone=timezone)
    h = harness({"t1": cfg})
    states = []
    for zone in (behind, ahead, behind):
        _in_zone(monkeypatch, zone)
        r = h.sync("t1")
        assert r.status == "succeeded", r.error
        states.append(h.users("t1")[employee_id(leaving.n)]["state"])
    if timezone is None:  # the documented default: each machine's own date
        assert states == ["active", "inactive", "active"]
        return
    utc_today = datetime.now(UTC).date()
    expected = "inactive" if date.fromisoformat(leaving.termination_date or "") < utc_today else "active"
    assert states == [expected] * 3
    assert [p["Effective_as_of_Date"] for p in emu.prompts_log[-3:]] == [utc_today.isoformat()] * 3


def test_an_unknown_timezone_is_a_mistake_in_the_tenants_table(emu: WorkdayEmulator, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown time zone 'Mars/Olympus'.*IANA"):
        WorkdayTenant.model_validate(tenant(emu, tmp_path, timezone="Mars/Olympus"))
