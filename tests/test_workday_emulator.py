"""The Workday RaaS emulator against directory-apis.md §5.1 / §6 rule 5."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import ijson
import pytest
import requests

from dirpull.emulators.org import Org
from dirpull.emulators.workday_api import WorkdayEmulator, employee_id, group_id, wid

T = 5  # seconds, every request


@pytest.fixture
def org() -> Org:
    return Org.generate(people=120, seed=3)


@pytest.fixture
def emu(org: Org) -> Iterator[WorkdayEmulator]:
    with WorkdayEmulator(org) as e:
        yield e


def get(e: WorkdayEmulator, report: str = "Worker_Directory", auth: Any = "isu", **params: str):
    if auth == "isu":
        auth = (e.username, e.password)
    return requests.get(e.report_url(report), params=params, auth=auth, timeout=T)


def rows(e: WorkdayEmulator, report: str = "Worker_Directory", **params: str) -> list[dict[str, Any]]:
    r = get(e, report, **params)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["Report_Entry"]
    return body["Report_Entry"]


def _all_strings(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(isinstance(i, dict) and all(_all_strings(v) for v in i.values()) for i in value)
    return False


def test_worker_report_is_one_unpaged_list_of_string_rows(emu: WorkdayEmulator, org: Org) -> None:
    entries = rows(emu)
    assert len(entries) == sum(1 for _ in org.listed_people())
    for row in entries:
        for key, value in row.items():
            assert value is not None and value != "", (key, row)
            assert _all_strings(value), (key, value)
            if key.endswith("_group"):
                assert isinstance(value, list)
        assert row["Active_Status"] in ("1", "0")


def test_the_report_comes_in_the_format_its_url_names_and_xml_without_one(emu: WorkdayEmulator, org: Org) -> None:
    import csv
    import xml.etree.ElementTree as ET

    base = emu.report_url("Worker_Directory").split("?")[0]
    auth = (emu.username, emu.password)
    listed = sorted(employee_id(p.n) for p in org.listed_people())
    r = requests.get(base, params={"format": "csv"}, auth=auth, timeout=T)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(r.text.splitlines()))
    assert sorted(row["Employee_ID"] for row in table) == listed
    for fmt in (None, "simplexml"):
        r = requests.get(base, params={"format": fmt} if fmt else {}, auth=auth, timeout=T)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/xml")
        root = ET.fromstring(r.content)
        wd = "{urn:com.workday.report/Worker_Directory}"
        assert root.tag == f"{wd}Report_Data"
        assert sorted(e.findtext(f"{wd}Employee_ID") for e in root.findall(f"{wd}Report_Entry")) == listed


def test_empty_fields_are_omitted_not_null(org: Org) -> None:
    ceo = org.person(1)
    no_mail = org.hire("No", "Mail", with_email=False, department=None, title=None)
    # A worker with one name (no first name) and a blank location and cost center.
    mononym = org.hire("", "Mononym", title="", department="")
    org.update_person(mononym.n, location="", cost_center="")
    e = WorkdayEmulator(org)
    e.start()
    try:
        by_id = {r["Employee_ID"]: r for r in rows(e)}
    finally:
        e.stop()
    assert "Manager" not in by_id[employee_id(ceo.n)] and "Manager_Employee_ID" not in by_id[employee_id(1)]
    row = by_id[employee_id(no_mail.n)]
    for key in ("Email_Address", "Email_Address_group", "Supervisory_Organization", "Job_Title"):
        assert key not in row
    assert row["Manager_Employee_ID"] == employee_id(1)
    row = by_id[employee_id(mononym.n)]
    assert all(value != "" for value in row.values()), row
    for key in ("First_Name", "Location", "Cost_Center", "Job_Title", "Supervisory_Organization"):
        assert key not in row
    assert row["Worker"] == row["Legal_Name"] == "Mononym" and row["Last_Name"] == "Mononym"


def test_emails_are_a_nested_group_array(emu: WorkdayEmulator, org: Org) -> None:
    p = next(p for p in org.listed_people() if p.email and p.n % 5 == 0)
    row = next(r for r in rows(emu) if r["Employee_ID"] == employee_id(p.n))
    group = row["Email_Address_group"]
    assert group[0] == {"Email_Address": p.email, "Usage_Type": "WORK", "Primary": "1"}
    assert group[1]["Usage_Type"] == "HOME"


def test_terminated_stay_in_report_deleted_disappear(emu: WorkdayEmulator, org: Org) -> None:
    org.deactivate(10)
    org.delete(11)
    by_id = {r["Employee_ID"]: r for r in rows(emu)}
    assert by_id[employee_id(10)]["Active_Status"] == "0"
    assert by_id[employee_id(10)]["Worker_Status"] == "Terminated"
    assert by_id[employee_id(10)]["Termination_Date"] == datetime.now(UTC).date().isoformat()  # the org dates by UTC
    assert employee_id(11) not in by_id


def test_future_termination_active_until_the_date_passes(emu: WorkdayEmulator, org: Org) -> None:
    when = date.today() + timedelta(days=10)
    org.schedule_termination(12, when.isoformat())
    row = next(r for r in rows(emu) if r["Employee_ID"] == employee_id(12))
    assert (row["Active_Status"], row["Termination_Date"]) == ("1", when.isoformat())
    # The report as of a later effective date shows the termination in effect.
    later = (when + timedelta(days=1)).isoformat() + "-07:00"
    row = next(r for r in rows(emu, Effective_as_of_Date=later) if r["Employee_ID"] == employee_id(12))
    assert (row["Active_Status"], row["Worker_Status"]) == ("0", "Terminated")
    on_the_day = when.isoformat()
    row = next(r for r in rows(emu, Effective_as_of_Date=on_the_day) if r["Employee_ID"] == employee_id(12))
    assert row["Active_Status"] == "1"


def test_prompts_are_recorded_and_reference_prompts_filter(emu: WorkdayEmulator, org: Org) -> None:
    contingent = wid("Worker_Type", "Contingent Worker")
    entries = rows(emu, **{"Worker_Type!WID": contingent, "Effective_as_of_Date": "2026-05-02-07:00"})
    expected = {employee_id(p.n) for p in org.listed_people() if p.n % 10 == 7}
    assert {r["Employee_ID"] for r in entries} == expected
    assert emu.prompts_log[-1] == {"Worker_Type!WID": contingent, "Effective_as_of_Date": "2026-05-02-07:00"}
    # Several values of one reference prompt are !-separated.
    both = contingent + "!" + wid("Worker_Type", "Employee")
    assert len(rows(emu, **{"Worker_Type!WID": both})) == len(list(org.listed_people()))
    bad = get(emu, Effective_as_of_Date="not-a-date")
    assert bad.status_code == 400 and "Effective_as_of_Date" in bad.text


@pytest.mark.parametrize(
    ("value", "served"),
    [
        ("2018-10-01", True),
        ("2018-10-01-07:00", True),
        ("2018-10-01+02:00", True),
        ("2018-10-01Z", True),
        ("20181001", False),
        ("2018-W40-1", False),
        ("2018-10-01T00:00:00", False),
        ("2018-10-01 garbage", False),
        ("2018-02-30", False),
    ],
)
def test_a_date_prompt_takes_only_the_date_form_workday_reads(emu: WorkdayEmulator, value: str, served: bool) -> None:
    # A prompt in a form Workday refuses (a compact date, a week date, a datetime) must fail here
    # too, not be read as its first ten characters and pass until production.
    r = get(emu, Effective_as_of_Date=value)
    if served:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and "Invalid value for prompt Effective_as_of_Date" in r.text


def test_groups_report_nested_members_and_subgroups(emu: WorkdayEmulator, org: Org) -> None:
    entries = {r["Group_ID"]: r for r in rows(emu, "Worker_Groups")}
    assert len(entries) == sum(1 for _ in org.listed_groups())
    for g in org.listed_groups():
        row = entries[group_id(g.n)]
        people, subs = org.direct_members(g.n)
        assert row["Group_Name"] == g.name
        assert [m["Employee_ID"] for m in row.get("Members_group", [])] == [employee_id(n) for n in people]
        assert [s["Group_ID"] for s in row.get("Subgroups_group", [])] == [group_id(n) for n in subs]
        if not people:
            assert "Members_group" not in row  # empty → omitted
    assert any("Subgroups_group" in r for r in entries.values())


def test_column_set_and_aliases_are_configurable(org: Org) -> None:
    e = WorkdayEmulator(
        org, columns=["Employee_ID", "Legal_Name", "Email_Address"], aliases={"Email_Address": "Work_Email"}
    )
    e.start()
    try:
        entries = rows(e)
    finally:
        e.stop()
    keys = set().union(*entries)
    assert keys == {"Employee_ID", "Legal_Name", "Work_Email"}


def test_basic_auth_required(emu: WorkdayEmulator) -> None:
    for auth in (None, (emu.username, "wrong"), ("someone", emu.password)):
        r = get(emu, auth=auth)
        assert r.status_code == 401
        assert r.headers["Content-Type"].startswith("text/xml")  # XML even though format=json
        assert "Invalid username or password" in r.text


def test_oauth_refresh_token_gives_a_bearer_token(emu: WorkdayEmulator) -> None:
    def token(**form: str) -> requests.Response:
        data = {"grant_type": "refresh_token", "refresh_token": emu.refresh_token, **form}
        return requests.post(emu.token_url, data=data, auth=(emu.client_id, emu.client_secret), timeout=T)

    r = token()
    assert r.status_code == 200 and r.json()["token_type"] == "Bearer"
    bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert requests.get(emu.report_url("Worker_Directory"), headers=bearer, timeout=T).status_code == 200
    assert token(refresh_token="stolen").json()["error"] == "invalid_grant"
    assert token(grant_type="client_credentials").status_code == 400
    bad_client = requests.post(
        emu.token_url,
        data={"grant_type": "refresh_token", "refresh_token": emu.refresh_token},
        auth=(emu.client_id, "nope"),
        timeout=T,
    )
    assert bad_client.status_code == 401
    bogus = {"Authorization": "Bearer not-a-token"}
    assert requests.get(emu.report_url("Worker_Directory"), headers=bogus, timeout=T).status_code == 401
    # An expired token (fault) is forgotten: the client has to refresh.
    emu.faults.update({"expire_auth": 1})
    assert requests.get(emu.report_url("Worker_Directory"), headers=bearer, timeout=T).status_code == 401
    assert requests.get(emu.report_url("Worker_Directory"), headers=bearer, timeout=T).status_code == 401


def test_a_soap_fault_says_whether_the_request_or_the_server_is_at_fault(emu: WorkdayEmulator) -> None:
    # SOAP 1.1 §4.4.1: a Client fault is a request wrong as sent (here a report this user cannot
    # run: it does not exist), a Server fault an outage the same request may get past later.
    r = get(emu, "No_Such_Report")
    assert r.status_code == 500 and "<faultcode>SOAP-ENV:Client.validationError</faultcode>" in r.text
    emu.faults.update({"error": 1})
    r = get(emu)
    assert r.status_code == 500 and "<faultcode>SOAP-ENV:Server</faultcode>" in r.text
    emu.faults.update({"rate_limit": 1})
    r = get(emu)
    assert r.status_code == 503 and "<faultcode>SOAP-ENV:Server</faultcode>" in r.text


def test_errors_are_xml_or_html_even_with_format_json(emu: WorkdayEmulator) -> None:
    emu.faults.update({"error": 1})
    r = get(emu)
    assert r.status_code == 500 and r.headers["Content-Type"].startswith("text/xml")
    assert "<wd:Error" in r.text and "unexpected error occurred" in r.text
    emu.error_format = "html"
    emu.faults.update({"error": 1, "error_status": 502})
    r = get(emu)
    assert r.status_code == 502 and r.text.startswith("<!DOCTYPE html>")
    emu.forbidden.add("Worker_Directory")
    r = get(emu)
    assert r.status_code == 403 and "not authorized" in r.text and "<html>" in r.text
    r = get(emu, "No_Such_Report")
    assert r.status_code == 500 and "not found" in r.text
    emu.login_page = True
    r = get(emu, "Worker_Groups")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")


def test_busy_is_503_with_retry_after(emu: WorkdayEmulator) -> None:
    emu.faults.update({"rate_limit": 1})
    r = get(emu)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.headers["Content-Type"].startswith("text/xml")
    assert get(emu).status_code == 200


def test_slow_response_via_fault_delay(emu: WorkdayEmulator) -> None:
    emu.faults.update({"delay": 0.5})
    auth = (emu.username, emu.password)
    with pytest.raises(requests.Timeout):
        requests.get(emu.report_url("Worker_Directory"), auth=auth, timeout=(2, 0.2))
    t = time.perf_counter()
    assert requests.get(emu.report_url("Worker_Directory"), auth=auth, timeout=T).status_code == 200
    assert time.perf_counter() - t >= 0.5


def test_large_report_is_served_quickly_and_streams() -> None:
    org = Org.generate(people=20_000, seed=5)
    e = WorkdayEmulator(org)
    e.start()
    try:
        t = time.perf_counter()
        with requests.get(
            e.report_url("Worker_Directory"), auth=(e.username, e.password), stream=True, timeout=30
        ) as r:
            r.raw.decode_content = True
            n = sum(1 for _ in ijson.items(r.raw, "Report_Entry.item"))
        elapsed = time.perf_counter() - t
    finally:
        e.stop()
    assert n == sum(1 for _ in org.listed_people())
    assert elapsed < 10, elapsed
