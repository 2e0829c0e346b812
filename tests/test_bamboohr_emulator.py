"""The BambooHR emulator against ../shared/directory-apis.md §4 and §6 rule 4.

There is no official BambooHR Python SDK to drive it with (the vendor publishes an OpenAPI spec,
not a client on PyPI), so these tests speak plain HTTP the way the documentation shows.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import date

import pytest
import requests

from dirpull.emulators.bamboohr_api import DEFAULT_KEY, BambooHREmulator
from dirpull.emulators.org import Org

AUTH = (DEFAULT_KEY, "x")
JSON = {"Accept": "application/json"}
TIMEOUT = 10


def age(org: Org, seconds: float = 3600) -> None:
    """Move every existing object's timestamps into the past, so 'changed since' tests do not
    depend on the wall clock's second boundaries."""
    with org.lock:
        for p in org.people.values():
            p.created_at -= seconds
            p.updated_at -= seconds


@pytest.fixture
def emu() -> Iterator[BambooHREmulator]:
    org = Org.generate(60, seed=3)
    age(org)
    with BambooHREmulator(org) as emulator:
        yield emulator


def gw(emu: BambooHREmulator, path: str, company: str = "acme") -> str:
    return f"{emu.base_url}/api/gateway.php/{company}/v1/{path}"


def report(emu: BambooHREmulator, fields: list[str], filters: dict | None = None, **kw) -> requests.Response:
    body: dict = {"title": "t", "fields": fields}
    if filters:
        body["filters"] = filters
    return requests.post(
        gw(emu, "reports/custom"), params={"format": "JSON", "onlyCurrent": "true"},
        json=body, auth=AUTH, timeout=TIMEOUT, **kw,
    )  # fmt: skip


def visible(org: Org) -> list:
    return [p for p in org.people.values() if p.visible]


# --- wire format -----------------------------------------------------------------------------------


def test_directory_is_xml_unless_json_is_accepted(emu: BambooHREmulator) -> None:
    xml = requests.get(gw(emu, "employees/directory"), auth=AUTH, timeout=TIMEOUT)
    assert xml.status_code == 200
    assert xml.headers["Content-Type"].startswith("text/xml")
    root = ET.fromstring(xml.content)
    assert root.tag == "directory"
    assert [f.get("id") for f in root.find("fieldset")][:3] == ["displayName", "firstName", "lastName"]
    xml_ids = [e.get("id") for e in root.find("employees")]

    js = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert js.headers["Content-Type"].startswith("application/json")
    body = js.json()
    assert set(body) == {"fields", "employees"}
    assert {"id", "type", "name"} <= set(body["fields"][0])
    assert [e["id"] for e in body["employees"]] == xml_ids
    first = body["employees"][0]
    assert isinstance(first["id"], str) and isinstance(first["canUploadPhoto"], int)


def test_changed_and_report_also_render_real_xml(emu: BambooHREmulator) -> None:
    emu.org.update_person(2, title="Chief Tea Officer")
    changed = requests.get(
        gw(emu, "employees/changed"), params={"since": "2020-01-01T00:00:00Z"}, auth=AUTH, timeout=TIMEOUT
    )
    root = ET.fromstring(changed.content)
    assert root.tag == "changes" and root.get("latest")
    assert {e.get("action") for e in root} == {"Inserted"}
    rep = requests.post(
        gw(emu, "reports/custom"), params={"format": "XML"}, json={"fields": ["firstName", "jobTitle"]},
        auth=AUTH, timeout=TIMEOUT,
    )  # fmt: skip
    root = ET.fromstring(rep.content)
    emp = root.find("./employees/employee[@id='2']")
    assert emp is not None
    assert emp.find("./field[@id='jobTitle']").text == "Chief Tea Officer"


def test_both_base_prefixes_serve_the_same_data(emu: BambooHREmulator) -> None:
    legacy = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT)
    hoststyle = requests.get(f"{emu.base_url}/api/v1/employees/directory", auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert legacy.status_code == hoststyle.status_code == 200
    assert legacy.json() == hoststyle.json()
    # On the legacy prefix the company is in the path and must be the right one.
    other = requests.get(gw(emu, "employees/directory", company="globex"), auth=AUTH, timeout=TIMEOUT)
    assert other.status_code == 404


# --- auth --------------------------------------------------------------------------------------------


def test_basic_auth_with_the_api_key_and_any_password(emu: BambooHREmulator) -> None:
    url = gw(emu, "employees/1")
    assert requests.get(url, timeout=TIMEOUT).status_code == 401
    bad = requests.get(url, auth=("not-the-key", "x"), timeout=TIMEOUT)
    assert bad.status_code == 401
    assert bad.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(url, auth=(DEFAULT_KEY, "anything at all"), timeout=TIMEOUT).status_code == 200
    bearer = requests.get(url, headers={"Authorization": f"Bearer {DEFAULT_KEY}"}, timeout=TIMEOUT)
    assert bearer.status_code == 401
    emu.permitted = False
    assert requests.get(url, auth=AUTH, timeout=TIMEOUT).status_code == 403


# --- directory vs custom report --------------------------------------------------------------------


def test_directory_lists_active_only_but_the_report_includes_inactive(emu: BambooHREmulator) -> None:
    org = emu.org
    org.deactivate(7, "terminated", "2026-05-01")
    org.deactivate(8, "suspended")
    org.delete(9)
    active = {str(p.n) for p in visible(org) if p.state == "active"}
    everyone = {str(p.n) for p in visible(org)}
    assert active != everyone

    directory = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT).json()
    assert {e["id"] for e in directory["employees"]} == active

    rep = report(emu, ["status", "terminationDate"]).json()
    rows = {e["id"]: e for e in rep["employees"]}
    assert set(rows) == everyone
    assert rows["7"] == {"id": "7", "status": "Inactive", "terminationDate": "2026-05-01"}
    # Any inactive employee carries a termination date; active ones print the empty date.
    assert rows["8"]["status"] == "Inactive" and rows["8"]["terminationDate"] != "0000-00-00"
    assert rows["1"] == {"id": "1", "status": "Active", "terminationDate": "0000-00-00"}


def _row(emu: BambooHREmulator, n: int, fields: list[str]) -> dict:
    """Employee `n`'s row of a custom report of `fields`."""
    return next(r for r in report(emu, fields, headers=JSON).json()["employees"] if r["id"] == str(n))


def _in_directory(emu: BambooHREmulator, n: int) -> bool:
    body = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT).json()
    return str(n) in {e["id"] for e in body["employees"]}


@pytest.mark.parametrize("flip_changes", [False, True])
def test_a_future_hire_is_inactive_until_their_hire_date(emu: BambooHREmulator, flip_changes: bool) -> None:
    # directory-apis.md §4.1: "Future hires have a status of Inactive". Not terminated: no
    # terminationDate (an empty date, as BambooHR prints one). Whether the day they start moves
    # lastChanged is not known [U]: the switch covers both readings.
    emu.hire_flip_changes = flip_changes
    emu.today = date(2026, 3, 1)
    n = emu.org.hire("Future", "Hire").n
    emu.org.update_person(n, hire_date="2026-03-02")
    fields = ["status", "hireDate", "terminationDate", "lastChanged"]

    def row() -> dict:
        return _row(emu, n, fields)

    def in_directory() -> bool:
        return _in_directory(emu, n)

    before = row()
    assert before["status"] == "Inactive" and before["terminationDate"] == "0000-00-00"
    assert before["hireDate"] == "2026-03-02" and not in_directory()
    since = before["lastChanged"]

    time.sleep(1.1)  # lastChanged has second precision
    emu.today = date(2026, 3, 2)
    after = row()
    assert after["status"] == "Active" and after["terminationDate"] == "0000-00-00" and in_directory()
    changed = requests.get(
        gw(emu, "employees/changed"), params={"since": since}, auth=AUTH, headers=JSON, timeout=TIMEOUT
    ).json()["employees"]
    assert (str(n) in changed) is flip_changes
    assert (after["lastChanged"] > since) is flip_changes


@pytest.mark.parametrize("flip_changes", [False, True])
def test_a_scheduled_termination_is_active_until_its_date_then_inactive(
    emu: BambooHREmulator, flip_changes: bool
) -> None:
    # directory-apis.md §4.1: termination sets status Inactive and terminationDate. Entered ahead
    # of time, the employee stays Active (with the date) until it comes; whether that day moves
    # lastChanged is not known [U]: the switch covers both readings.
    emu.termination_flip_changes = flip_changes
    emu.today = date(2026, 3, 1)
    n = next(p.n for p in visible(emu.org) if p.n > 1 and p.state == "active")
    emu.org.schedule_termination(n, "2026-03-02")
    fields = ["status", "employmentHistoryStatus", "terminationDate", "lastChanged"]

    def row() -> dict:
        return _row(emu, n, fields)

    def in_directory() -> bool:
        return _in_directory(emu, n)

    before = row()
    assert before["status"] == "Active" and before["terminationDate"] == "2026-03-02" and in_directory()
    assert before["employmentHistoryStatus"] == "Full-Time"
    since = before["lastChanged"]

    time.sleep(1.1)  # lastChanged has second precision
    emu.today = date(2026, 3, 2)
    after = row()
    assert after["status"] == "Inactive" and after["terminationDate"] == "2026-03-02" and not in_directory()
    assert after["employmentHistoryStatus"] == "Terminated"
    changed = requests.get(
        gw(emu, "employees/changed"), params={"since": since}, auth=AUTH, headers=JSON, timeout=TIMEOUT
    ).json()["employees"]
    assert (str(n) in changed) is flip_changes
    assert (after["lastChanged"] > since) is flip_changes
    # Over HTTP too: the switch is set on an emulator served in its own process.
    resp = requests.post(
        f"{emu.base_url}/_emulator/bamboohr", json={"termination_flip_changes": not flip_changes}, timeout=TIMEOUT
    )
    assert resp.status_code < 300 and emu.termination_flip_changes is not flip_changes


def test_directory_sharing_off_is_403(emu: BambooHREmulator) -> None:
    emu.directory_sharing = False
    resp = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert resp.status_code == 403
    assert report(emu, ["firstName"]).status_code == 200


def test_report_values_are_strings_and_unknown_fields_are_silently_omitted(emu: BambooHREmulator) -> None:
    emu.forbidden_fields = {"homeEmail"}
    resp = report(emu, ["id", "firstName", "supervisorEId", "supervisorId", "lastChanged", "jobTitl", "homeEmail"])
    assert resp.status_code == 200
    body = resp.json()
    assert body["title"] == "t"
    assert [f["id"] for f in body["fields"]] == ["firstName", "supervisorEId", "supervisorId", "lastChanged"]
    for row in body["employees"]:
        assert set(row) == {"id", "firstName", "supervisorEId", "supervisorId", "lastChanged"}
        assert all(v is None or isinstance(v, str) for v in row.values())
    rows = {e["id"]: e for e in body["employees"]}
    p = emu.org.people[20]
    boss = emu.org.people[p.manager]
    # supervisorEId is the supervisor's employee id, supervisorId its employee number.
    assert rows["20"]["supervisorEId"] == str(boss.n)
    assert rows["20"]["supervisorId"] == boss.employee_number
    assert rows["1"]["supervisorEId"] is None
    assert rows["20"]["lastChanged"].endswith("+00:00")

    emu.supervisor_ids_swapped = True  # the other reading of the [U] fact
    rows = {e["id"]: e for e in report(emu, ["supervisorEId", "supervisorId"]).json()["employees"]}
    assert rows["20"] == {"id": "20", "supervisorEId": boss.employee_number, "supervisorId": str(boss.n)}


def test_report_content_type_must_be_exactly_application_json(emu: BambooHREmulator) -> None:
    url = gw(emu, "reports/custom") + "?format=JSON"
    body = json.dumps({"fields": ["firstName"]})
    for ctype in ("text/plain", "application/json; charset=utf-8", None):
        headers = {"Content-Type": ctype} if ctype else {}
        resp = requests.post(url, data=body, headers=headers, auth=AUTH, timeout=TIMEOUT)
        assert resp.status_code == 400, ctype
        assert resp.headers["X-BambooHR-Error-Message"] == "Malformed XML"
    # Read as XML, an XML report request works.
    xml = '<report><title>x</title><fields><field id="firstName"/></fields></report>'
    resp = requests.post(url, data=xml, headers={"Content-Type": "text/xml"}, auth=AUTH, timeout=TIMEOUT)
    assert resp.status_code == 200
    assert set(resp.json()["employees"][0]) == {"id", "firstName"}


def test_report_filters_by_employee_ids_and_last_changed(emu: BambooHREmulator) -> None:
    rows = report(emu, ["firstName"], {"employeeIds": [3, "5", 9999]}).json()["employees"]
    assert [r["id"] for r in rows] == ["3", "5"]
    emu.org.update_person(11, title="Moved")
    # Everyone else was aged an hour into the past; only person 11 changed in the last minute.
    cutoff = _iso(emu.org.people[11].updated_at - 60)
    recent = report(emu, ["jobTitle"], {"lastChanged": {"includeNull": "no", "value": cutoff}})
    assert recent.json()["employees"] == [{"id": "11", "jobTitle": "Moved"}]
    everyone = report(emu, ["jobTitle"], {"lastChanged": {"includeNull": "no", "value": "2020-01-01T00:00:00Z"}})
    assert len(everyone.json()["employees"]) == len(visible(emu.org))


def test_too_many_report_fields_is_400(emu: BambooHREmulator) -> None:
    resp = report(emu, [f"custom{i}" for i in range(401)])
    assert resp.status_code == 400
    assert "400" in resp.headers["X-BambooHR-Error-Message"]


# --- changed employees -------------------------------------------------------------------------------


def test_changed_is_an_object_keyed_by_id(emu: BambooHREmulator) -> None:
    org = emu.org
    since = _iso(max(p.updated_at for p in org.people.values()) + 1)
    org.update_person(4, title="Director")
    hired = org.hire("Neu", "Person")
    org.delete(30)
    org.soft_delete(12)  # not a BambooHR concept: shows as deleted (12 manages nobody here)
    org.deactivate(13)  # termination is an update, not a deletion
    org.delete(10)  # manages 56-60: their supervisor fields empty, so they changed too
    reports = {str(p.n): "Updated" for p in org.people.values() if p.manager == 10}
    assert set(reports) == {"56", "57", "58", "59", "60"}
    resp = requests.get(gw(emu, "employees/changed"), params={"since": since}, auth=AUTH, headers=JSON,
                        timeout=TIMEOUT)  # fmt: skip
    assert resp.status_code == 200
    body = resp.json()
    assert isinstance(body["employees"], dict)
    actions = {k: v["action"] for k, v in body["employees"].items()}
    assert actions == {
        "4": "Updated",
        str(hired.n): "Inserted",
        "30": "Deleted",
        "12": "Deleted",
        "13": "Updated",
        "10": "Deleted",
        **reports,
    }
    for key, entry in body["employees"].items():
        assert entry["id"] == key and entry["lastChanged"] <= body["latest"]
    assert body["latest"] == max(e["lastChanged"] for e in body["employees"].values())
    only = requests.get(gw(emu, "employees/changed"), params={"since": since, "type": "deleted"}, auth=AUTH,
                        headers=JSON, timeout=TIMEOUT).json()  # fmt: skip
    assert set(only["employees"]) == {"30", "12", "10"}


def test_changed_needs_a_valid_since_with_plus_encoded(emu: BambooHREmulator) -> None:
    url = gw(emu, "employees/changed")
    assert requests.get(url, auth=AUTH, headers=JSON, timeout=TIMEOUT).status_code == 400
    bad = requests.get(url + "?since=yesterday", auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert bad.status_code == 400 and bad.headers["X-BambooHR-Error-Message"]
    # A raw '+' is a space once decoded: the offset is lost and the request refused.
    raw = requests.get(url + "?since=2026-01-01T00:00:00+00:00", auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert raw.status_code == 400
    ok = requests.get(url + "?since=2026-01-01T00:00:00%2B00:00", auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert ok.status_code == 200


def test_single_employee_fields_deleted_404_and_bad_field_400(emu: BambooHREmulator) -> None:
    url = gw(emu, "employees/5")
    resp = requests.get(url, params={"fields": "firstName,jobTitle,status"}, auth=AUTH, headers=JSON,
                        timeout=TIMEOUT)  # fmt: skip
    p = emu.org.people[5]
    assert resp.json() == {"id": "5", "firstName": p.given, "jobTitle": p.title, "status": "Active"}
    bad = requests.get(url, params={"fields": "firstName,jobTitl"}, auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert bad.status_code == 400
    assert bad.headers["X-BambooHR-Error-Message"] == 'Invalid field: "jobTitl"'
    emu.error_header = "X-BambooHR-Error-Messsage"  # the [U] misspelling of one help page
    bad = requests.get(url, params={"fields": "jobTitl"}, auth=AUTH, timeout=TIMEOUT)
    assert "X-BambooHR-Error-Messsage" in bad.headers
    emu.org.delete(5)
    assert requests.get(url, auth=AUTH, headers=JSON, timeout=TIMEOUT).status_code == 404


# --- throttling and faults ---------------------------------------------------------------------------


def test_throttling_is_429_from_2026_09_16_and_503_before_with_retry_after(emu: BambooHREmulator) -> None:
    emu.retry_after = "7"
    emu.faults.rate_limit = 1
    new = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert new.status_code == 429 and new.headers["Retry-After"] == "7"
    emu.today = date(2026, 9, 15)
    emu.faults.rate_limit = 1
    old = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert old.status_code == 503 and old.headers["Retry-After"] == "7"
    assert requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT).ok
    # A real outage is a 503 without Retry-After.
    emu.faults.update({"error": 1, "error_status": 503})
    down = requests.get(gw(emu, "employees/directory"), auth=AUTH, headers=JSON, timeout=TIMEOUT)
    assert down.status_code == 503 and "Retry-After" not in down.headers


def test_tenant_config_points_at_the_gateway_prefix(emu: BambooHREmulator, tmp_path) -> None:
    cfg = emu.tenant_config("hr", tmp_path)
    assert cfg["provider"] == "bamboohr"
    url = f"{cfg['api_url']}/{cfg['company_domain']}/v1/employees/1"
    assert requests.get(url, auth=(cfg["api_key"], "x"), timeout=TIMEOUT).status_code == 200


def _iso(ts: float) -> str:
    from dirpull.emulators.bamboohr_api import iso_seconds

    return iso_seconds(ts)
