"""The BambooHR connector over loopback HTTP against the BambooHR emulator: connector-level pulls
(pages and Done) and sync-level runs through the real store (tests/harness.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from redirects import redirecting

from dirpull.config import BambooHRTenant, ConfigError, load_config
from dirpull.connectors.bamboohr import REPORT_FIELDS, BambooHRConnector, build
from dirpull.connectors.base import AuthError, ConnectorError, Done, Page
from dirpull.connectors.http import RetryPolicy
from dirpull.emulators.bamboohr_api import BambooHREmulator
from dirpull.emulators.org import Org

SECRET = "s3cr3t-bamboo-key-do-not-log"


def age(org: Org, seconds: float = 3600) -> None:
    """Move the generated org an hour into the past, so what changes during a test is the only
    thing `employees/changed` reports, whatever the wall clock's second boundaries."""
    with org.lock:
        for p in org.people.values():
            p.created_at -= seconds
            p.updated_at -= seconds


@pytest.fixture
def emu() -> Iterator[BambooHREmulator]:
    org = Org.generate(40, seed=5)
    age(org)
    with BambooHREmulator(org, api_key=SECRET) as emulator:
        yield emulator


class Sleeps(list):
    """An injected sleep: records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def settings(emu: BambooHREmulator, **extra: Any) -> BambooHRTenant:
    return BambooHRTenant.model_validate({**emu.tenant_config("hr", Path(".")), **extra})


def connector(emu: BambooHREmulator, sleeps: Sleeps | None = None, **extra: Any) -> BambooHRConnector:
    policy = RetryPolicy(max_attempts=4, sleep=sleeps if sleeps is not None else Sleeps(), jitter=0)
    return build("hr", settings(emu, **extra), policy=policy)


def pull(c: BambooHRConnector, cursor: dict | None = None, full: bool = False) -> tuple[list[Page], Done]:
    out = list(c.pull(cursor, full=full))
    done = out[-1]
    assert isinstance(done, Done)
    assert all(isinstance(p, Page) for p in out[:-1])
    return out[:-1], done


def users(pages: list[Page]) -> dict[str, Any]:
    return {u.idp_id: u for p in pages for u in p.users}


# --- connector level -----------------------------------------------------------------------------


def test_full_pull_is_a_snapshot_of_active_and_inactive_employees(emu: BambooHREmulator) -> None:
    org = emu.org
    org.deactivate(3, "terminated", "2026-04-30")
    org.delete(4)
    pages, done = pull(connector(emu, page_size=15))
    assert done.snapshot and done.mode == "full"
    assert done.requests == 1  # one custom report, streamed
    assert [len(p.users) for p in pages] == [15, 15, 9]
    got = users(pages)
    assert set(got) == {str(p.n) for p in org.people.values() if p.visible}

    ceo, p2, p3 = got["1"], got["2"], got["3"]
    person2 = org.people[2]
    assert p2.first_name == person2.given and p2.last_name == person2.family
    assert p2.email == p2.username == person2.email and p2.emails == [person2.email]
    assert p2.display_name == person2.display
    assert p2.state == "active" and p2.employee_number == person2.employee_number
    assert p2.job_title == person2.title and p2.department == person2.department
    assert p2.manager_idp_id == "1" and ceo.manager_idp_id is None
    # A terminated employee is inactive, not gone; empty dates are None, not "0000-00-00".
    assert p3.state == "inactive" and p3.raw_attributes["terminationDate"] == "2026-04-30"
    assert p2.raw_attributes["terminationDate"] is None
    assert "lastChanged" not in p2.raw_attributes  # volatile
    assert done.cursor == {
        "since": max(_iso(p.updated_at) for p in org.people.values() if p.visible),
        "fields": sorted(f for f in REPORT_FIELDS if f != "id"),  # what the report's header lists
    }


def one_second_each(org: Org) -> str:
    """Each employee's last change in a second of their own, ten seconds apart, an hour ago: the
    overlap of an incremental run then re-reads one of them, the newest, whose id is returned."""
    base = int(time.time()) - 3600
    with org.lock:
        for p in org.people.values():
            p.created_at = p.updated_at = base - 10 * p.n
    return str(min(org.people))


def test_incremental_pull_reads_only_what_changed_and_moves_the_cursor_forward(emu: BambooHREmulator) -> None:
    org = emu.org
    newest = one_second_each(org)
    c = connector(emu)  # changed_overlap: 1 s, the default and the least accepted
    _, first = pull(c)
    stamp = int(time.time()) + 1
    with org.clock_at(stamp):  # every change in one second (after every stamp the org has made)
        org.update_person(5, title="Principal")
        org.deactivate(6)  # terminated → inactive
        org.delete(30)
        hired = org.hire("Ngozi", "Adeyemi", manager=5)
    # BambooHR's clock (its `Date`) has reached them: the cursor is not held back at a clock behind them.
    time.sleep(max(0.0, stamp - time.time()))
    pages, done = pull(c, first.cursor)
    assert not done.snapshot and done.mode == "incremental"
    got = users(pages)
    # What changed, and the first run's newest employee: the cursor's own second is read again
    # (a change made in it after that run is not missed; the sync-level test shows that costs no events).
    assert set(got) == {"5", "6", str(hired.n), newest}
    assert got["5"].job_title == "Principal"
    ended = datetime.now(UTC).date().isoformat()  # the org dates a termination by UTC, as the emulator
    assert got["6"].state == "inactive" and got["6"].raw_attributes["terminationDate"] == ended
    assert got[str(hired.n)].manager_idp_id == "5"
    assert [r for p in pages for r in p.removed_users] == ["30"]
    assert done.cursor["since"] > first.cursor["since"]
    assert done.requests == 2  # changed + one report batch
    changed_call = [path for _, path in emu.request_log if "employees/changed" in path][-1]
    assert "%2B00%3A00" in changed_call or "%2B00:00" in changed_call

    # Nothing changed since: only the cursor's own second is read again, and the cursor stays.
    pages, again = pull(c, done.cursor)
    assert again.cursor == done.cursor
    assert set(users(pages)) == {"5", "6", str(hired.n)} and again.requests == 2


def test_a_refused_changed_employees_call_without_a_reason_turns_full_saying_so_plainly(
    emu: BambooHREmulator,
) -> None:
    """A 400 with no X-BambooHR-Error-Message and an empty body: the note read
    "…/employees/changed: ): full sync instead", a reason left empty after its colon."""
    c = connector(emu)
    _, first = pull(c)
    emu.faults.update({"error": 1, "error_status": 400, "path": "employees/changed"})
    pages, done = pull(c, first.cursor)
    assert done.snapshot and len(users(pages)) == sum(1 for _ in emu.org.listed_people())
    [note] = [n for n in done.notes if "employees/changed refused" in n]
    pattern = r"employees/changed refused since=\S+ \(changed employees: HTTP 400 from \S+/employees/changed\)"
    assert re.fullmatch(pattern + ": full sync instead", note), note


def test_incremental_reads_changed_employees_in_batches(emu: BambooHREmulator) -> None:
    newest = one_second_each(emu.org)
    c = connector(emu, batch_size=4)
    _, first = pull(c)
    for n in range(10, 20):
        emu.org.update_person(n, department="Legal")
    pages, done = pull(c, first.cursor)
    assert [len(p.users) for p in pages] == [4, 4, 3]  # ten changed, and the newest of the overlap
    assert done.requests == 1 + 3
    got = users(pages)
    assert set(got) == {str(n) for n in range(10, 20)} | {newest}
    assert all(u.department == "Legal" for eid, u in got.items() if eid != newest)


def test_a_change_made_in_the_cursors_second_is_read_by_the_next_run(emu: BambooHREmulator) -> None:
    """BambooHR's `since` is compared with `lastChanged` in whole seconds, strictly: the overlap
    (at least a second; less is refused at load) asks from the second before the cursor's, so a
    change made in the cursor's own second after the run that took it is still reported."""
    org = emu.org
    second = int(time.time()) + 1  # after every stamp the org has made (its clock never goes back)
    with org.clock_at(second):
        org.update_person(3, title="The Newest Change")
    # BambooHR's clock (its `Date`) has reached the change: no cursor passes its clock.
    time.sleep(max(0.0, second - time.time()))
    c = connector(emu, changed_overlap=1)
    _, first = pull(c)
    assert datetime.fromisoformat(first.cursor["since"]).timestamp() == second
    with org.clock_at(second + 0.5):  # after that run, in the cursor's second
        org.update_person(7, title="Edited In The Cursor's Second")
    pages, _ = pull(c, first.cursor)
    assert users(pages)["7"].job_title == "Edited In The Cursor's Second"


def test_the_cursor_after_a_full_walk_is_the_newest_change_whatever_form_it_is_printed_in() -> None:
    from dirpull.connectors.bamboohr import _Newest

    def newest(*texts: Any) -> str | None:
        n = _Newest()
        for text in texts:
            n.add(text)
        return None if n.when is None else n.when.isoformat()

    usual = ["2025-01-02T03:04:05+00:00", "2025-06-30T23:59:59+00:00", "2025-03-01T00:00:00+00:00"]
    assert newest(*usual) == "2025-06-30T23:59:59+00:00"
    # Other forms are compared by their time, not their text.
    assert newest(*usual, "2025-07-01T01:30:00+02:00") == "2025-06-30T23:59:59+00:00"
    assert newest(*usual, "2025-07-01T03:00:00+02:00") == "2025-07-01T03:00:00+02:00"
    assert newest(*usual, "2025-06-30T23:59:59.5Z") == "2025-06-30T23:59:59.500000+00:00"
    # A text of the usual shape that is no time never hides a real one after it.
    assert newest("2025-99-99T99:99:99+00:00", *usual) == "2025-06-30T23:59:59+00:00"
    assert newest(None, "", "0000-00-00", 20250101) is None


class OddLastChanged(BambooHREmulator):
    """Prints employee 3's `lastChanged` as `odd_last_changed`, when set."""

    odd_last_changed: str | None = None

    def _value(self, p: Any, f: str, boss: Any) -> Any:
        value = super()._value(p, f, boss)
        return self.odd_last_changed if f == "lastChanged" and p.n == 3 and self.odd_last_changed else value


def odd_last_changed_sync(harness: Any, text: str) -> tuple[Any, OddLastChanged]:
    """A harness over an emulator printing employee 3's `lastChanged` as `text`, after a first sync."""
    org = Org.generate(40, seed=5)
    one_second_each(org)
    emu = OddLastChanged(org, api_key=SECRET)
    emu.odd_last_changed = text
    emu.start()
    h = harness({"hr": emu.tenant_config("hr", Path("."))})
    return h, emu


@pytest.mark.parametrize(
    "last_changed",
    [
        "9999-12-31T23:59:59-05:00",  # past year 9999 in UTC: it failed every run of the tenant
        "9999-12-31T23:59:59+00:00",  # ahead of BambooHR's clock: it carried the cursor past later changes
    ],
)
def test_a_bogus_last_changed_neither_fails_runs_nor_hides_later_changes(harness: Any, last_changed: str) -> None:
    h, emu = odd_last_changed_sync(harness, last_changed)
    try:
        first = h.sync("hr")
        assert first.status == "succeeded", first.error
        assert len(h.users("hr")) == 40
        emu.org.update_person(5, title="Changed After")
        again = h.sync("hr")
        assert again.status == "succeeded" and again.mode == "incremental", again.error
        assert h.users("hr")["5"]["job_title"] == "Changed After"
    finally:
        emu.stop()


def test_a_stored_cursor_ahead_of_bamboohrs_clock_turns_the_run_full(emu: BambooHREmulator) -> None:
    """A cursor an earlier version took from a bogus `lastChanged`: an increment from it reads nothing."""
    emu.org.update_person(5, title="Changed Before")
    pages, done = pull(connector(emu), {"since": "9999-12-31T23:59:59+00:00"})
    assert done.mode == "full" and done.snapshot
    assert users(pages)["5"].job_title == "Changed Before"
    assert any("ahead of BambooHR's clock" in n for n in done.notes)
    assert datetime.fromisoformat(done.cursor["since"]) <= datetime.now(UTC)


def test_the_current_host_style_base_url_is_used_as_given(emu: BambooHREmulator) -> None:
    """BambooHR's current spec serves `https://{companyDomain}.bamboohr.com/api/v1/...` (the host
    names the company); the reference is unsure the legacy gateway stays: an api_url ending in
    /v1 is that base, not a gateway to put the company after."""
    emu.org.update_person(5, title="Principal")
    c = connector(emu, api_url=f"{emu.base_url}/api/v1")
    pages, first = pull(c)
    assert first.snapshot and len(users(pages)) == 40 and users(pages)["5"].job_title == "Principal"
    emu.org.update_person(6, title="Host Style")
    pages, done = pull(c, first.cursor)
    assert not done.snapshot and users(pages)["6"].job_title == "Host Style"
    paths = [path for _, path in emu.request_log]
    assert paths and all(path.startswith("/api/v1/") and "gateway.php" not in path for path in paths)


def test_full_flag_ignores_the_cursor(emu: BambooHREmulator) -> None:
    c = connector(emu)
    _, first = pull(c)
    pages, done = pull(c, first.cursor, full=True)
    assert done.snapshot and len(users(pages)) == 40


def test_rejected_or_unreadable_cursor_falls_back_to_a_full_walk(emu: BambooHREmulator) -> None:
    c = connector(emu)
    pages, done = pull(c, {"since": "not a date"})
    assert done.snapshot and len(users(pages)) == 40
    assert "full sync" in done.notes[0]


@pytest.mark.parametrize(("today", "status"), [(date(2026, 9, 16), 429), (date(2026, 9, 15), 503)])
def test_throttling_is_retried_honouring_retry_after(emu: BambooHREmulator, today: date, status: int) -> None:
    emu.today = today
    emu.retry_after = "13"
    emu.faults.rate_limit = 2
    sleeps = Sleeps()
    pages, done = pull(connector(emu, sleeps))
    assert sleeps == [13.0, 13.0]  # the server's hint, not the backoff
    assert done.requests == 3 and len(users(pages)) == 40


def test_throttling_that_does_not_stop_fails_the_pull(emu: BambooHREmulator) -> None:
    emu.faults.rate_limit = 100
    sleeps = Sleeps()
    with pytest.raises(ConnectorError, match="gave up after 4 attempts"):
        pull(connector(emu, sleeps))
    assert len(sleeps) == 3


@pytest.mark.parametrize("permitted", [True, False])
def test_refused_key_fails_with_a_clear_message_without_the_key(emu: BambooHREmulator, permitted: bool) -> None:
    emu.permitted = permitted
    extra = {} if not permitted else {"api_key": "wrong-key-also-secret"}
    with pytest.raises(AuthError) as info:
        pull(connector(emu, **extra))
    msg = str(info.value)
    assert ("HTTP 403" in msg and "not permitted" in msg) if not permitted else ("HTTP 401" in msg)
    assert "acme" in msg
    assert SECRET not in msg and "wrong-key-also-secret" not in msg and SECRET not in repr(info.value)


def test_an_api_url_redirecting_to_another_host_is_not_followed(emu: BambooHREmulator) -> None:
    # requests drops the key there, and the other host's 401 read as "the API key was refused".
    with redirecting(308) as servers, pytest.raises(ConnectorError) as info:
        pull(connector(emu, api_url=f"{servers.redirector}/api/gateway.php"))
    assert servers.seen == [] and not isinstance(info.value, AuthError)
    assert f"HTTP 308 from {servers.redirector}/api/gateway.php/acme/v1/" in str(info.value)
    assert f"redirects to another host ({servers.foreign}/api/gateway.php/acme/v1/" in str(info.value)


def test_rows_without_an_id_or_status_are_quarantined(emu: BambooHREmulator) -> None:
    c = connector(emu)
    assert c.normalize({"firstName": "Ghost", "status": "Active"}).reason.startswith("employee row without an id")
    odd = c.normalize({"id": "9", "status": "Furloughed"})
    assert odd.idp_id == "9" and "unknown status" in odd.reason
    emu.forbidden_fields = {"status"}
    pages, done = pull(c)
    assert done.snapshot and not users(pages)
    assert len([q for p in pages for q in p.quarantined]) == 40


def test_manager_field_is_configurable_for_both_readings(emu: BambooHREmulator) -> None:
    emu.supervisor_ids_swapped = True  # supervisorEId then holds the employee number
    pages, _ = pull(connector(emu, manager_field_holds="employee_number"))
    assert users(pages)["20"].manager_idp_id == str(emu.org.people[20].manager)
    pages, _ = pull(connector(emu, manager_field="supervisorId"))
    assert users(pages)["20"].manager_idp_id == str(emu.org.people[20].manager)


def test_a_padded_manager_id_or_employee_number_still_names_the_manager(emu: BambooHREmulator) -> None:
    # The employee's own id is trimmed; a manager field or employee number with the same padding
    # named no one (or, holding " 0", a manager "0").
    row = {"id": " 7 ", "status": "Active", "workEmail": "ann@example.com"}
    by_id = connector(emu)
    assert by_id.normalize({**row, "supervisorEId": " 12 "}).manager_idp_id == "12"
    assert by_id.normalize({**row, "supervisorEId": " 0"}).manager_idp_id is None
    by_number = connector(emu, manager_field_holds="employee_number")
    assert by_number.normalize({**row, "supervisorEId": "E12 "}, {"E12": "12"}).manager_idp_id == "12"
    # Through the emulator: the boss's employee number padded, in the employee-number report and
    # in the manager field alike.
    emu.supervisor_ids_swapped = True  # supervisorEId then holds the employee number
    boss = emu.org.people[20].manager
    assert boss is not None
    with emu.org.lock:
        emu.org.people[boss].employee_number = f" {emu.org.people[boss].employee_number}\t"
    pages, _ = pull(by_number)
    assert users(pages)["20"].manager_idp_id == str(boss)


def test_an_employee_who_is_their_own_supervisor_has_no_manager(emu: BambooHREmulator) -> None:
    """No manager, as Google's connector reads it, for both readings of the manager field."""
    emu.org.update_person(20, manager=20)
    assert users(pull(connector(emu))[0])["20"].manager_idp_id is None
    emu.supervisor_ids_swapped = True  # supervisorEId then holds the employee number
    by_number = users(pull(connector(emu, manager_field_holds="employee_number"))[0])
    assert by_number["20"].manager_idp_id is None
    assert by_number["21"].manager_idp_id == str(emu.org.people[21].manager)


def test_custom_attributes_come_from_report_fields(emu: BambooHREmulator) -> None:
    pages, _ = pull(connector(emu, attributes={"cost_center": "customCostCenter", "division": "division"}))
    u = users(pages)["2"]
    assert u.custom_attributes == {
        "cost_center": emu.org.people[2].cost_center,
        "division": u.raw_attributes["division"],
    }
    assert u.custom_attributes["division"]  # requested by the core field list anyway


def test_settings_asking_the_report_for_more_than_400_fields_are_refused_at_load(
    emu: BambooHREmulator, tmp_path: Path
) -> None:
    """BambooHR's custom report takes at most 400 fields and answers 400 over that: settings mapping
    that many attributes loaded, and every run of the tenant then failed at its first request."""
    core = len({*REPORT_FIELDS, "supervisorEId"})
    widest = {f"a{i}": f"custom{i}" for i in range(400 - core)}
    pages, done = pull(connector(emu, attributes=widest))  # exactly 400: BambooHR takes it
    assert done.snapshot and len(users(pages)) == 40
    text = f"""[store]
url = "sqlite:///{tmp_path / 'store.db'}"
[tenants.hr]
provider = "bamboohr"
company_domain = "acme"
api_key = "k"
manager_field = "supervisorId"
[tenants.hr.attributes]
division = "division"
""" + "".join(f'a{i} = "custom{i}[0].value"\n' for i in range(400 - core))
    (tmp_path / "dirpull.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:  # supervisorId is one more field than the report takes
        load_config(tmp_path / "dirpull.toml")
    assert str(info.value) == (
        f"{tmp_path / 'dirpull.toml'}: tenants.hr: the custom report would ask for 401 fields and BambooHR "
        f"takes at most 400: map fewer attributes ({core + 1} of them are dirpull's own, manager_field included)"
    )


def test_a_report_cut_off_or_garbled_before_a_page_was_handed_on_is_asked_for_again(
    emu: BambooHREmulator,
) -> None:
    """A connection dropped mid-report, or a body garbled on the way, failed the run at once,
    although nothing of the report had been handed on: asked for again (as Entra's pages are),
    and the run fails only once the attempts are spent, saying how many."""
    for fault in ("drop", "malformed"):
        emu.faults.clear()
        emu.faults.update({fault: 1, "path": "reports/custom"})
        sleeps = Sleeps()
        before = emu.requests
        pages, done = pull(connector(emu, sleeps), full=True)
        assert len(users(pages)) == 40 and done.snapshot, fault
        assert sleeps == [0.5] and emu.requests - before == 2, fault
        emu.faults.update({fault: 10})
        with pytest.raises(ConnectorError) as err:
            pull(connector(emu), full=True)
        msg = str(err.value)
        assert msg.startswith("custom report: the ") and msg.endswith("gave up after 4 attempts"), msg
        assert err.value.retriable and SECRET not in msg


def test_a_report_that_breaks_after_a_page_was_handed_on_fails_without_asking_again(
    emu: BambooHREmulator,
) -> None:
    # Rows handed on are in the diff already: the report is not streamed into it a second time.
    emu.faults.update({"malformed": 1, "path": "reports/custom"})
    sleeps = Sleeps()
    items: list[Any] = []
    with pytest.raises(ConnectorError, match=r"custom report: the report body is not valid JSON .*not asked again"):
        for item in connector(emu, sleeps, page_size=5).pull(None, full=True):
            items.append(item)
    assert items and not any(isinstance(i, Done) for i in items)
    assert sleeps == [] and emu.requests == 1


def test_a_changed_list_or_report_garbled_on_the_way_is_asked_for_again(emu: BambooHREmulator) -> None:
    """`employees/changed` (and the report read by ids) that came garbled failed the run at once as
    "not valid JSON", while the same answer cut off was retried."""
    _, done = pull(connector(emu))
    emu.org.update_person(5, title="Principal")
    for path in ("employees/changed", "reports/custom"):
        emu.faults.clear()
        emu.faults.update({"malformed": 1, "path": path})
        sleeps = Sleeps()
        pages, _ = pull(connector(emu, sleeps), done.cursor)
        assert users(pages)["5"].job_title == "Principal" and sleeps == [0.5], path
    emu.faults.update({"malformed": 10, "path": "employees/changed"})
    with pytest.raises(ConnectorError) as err:
        pull(connector(emu), done.cursor)
    msg = str(err.value)
    url = f"{emu.base_url}/api/gateway.php/acme/v1/employees/changed"
    assert msg.startswith(f"changed employees: the answer from GET {url}?since="), msg
    assert "is not valid JSON" in msg and msg.endswith("gave up after 4 attempts"), msg


def _iso(ts: float) -> str:
    from dirpull.emulators.bamboohr_api import iso_seconds

    return iso_seconds(ts)


# --- sync level: the real runner and store ---------------------------------------------------------


@pytest.fixture
def synced(emu: BambooHREmulator, harness: Any) -> tuple[Any, Sleeps]:
    """A harness whose tenant 'hr' points at the emulator, after a first (full) sync."""
    sleeps = Sleeps()

    def factory(tenant: str, tenant_settings: Any) -> BambooHRConnector:
        return build(tenant, tenant_settings, policy=RetryPolicy(max_attempts=4, sleep=sleeps, jitter=0))

    h = harness({"hr": emu.tenant_config("hr", Path("."))}, connector_factory=factory)
    first = h.sync("hr")
    assert first.status == "succeeded" and first.mode == "full", first.error
    assert len(h.users("hr")) == 40
    return h, sleeps


def test_sync_a_round_of_changes_emits_exactly_these_events(emu: BambooHREmulator, synced: Any) -> None:
    h, _ = synced
    org = emu.org
    seq = h.last_seq()
    org.update_person(5, title="Principal")
    org.deactivate(6, "terminated", "2026-06-30")
    org.delete(30)  # manages nobody, so no one else's supervisor changes
    hired = org.hire("Ngozi", "Adeyemi", manager=5)
    org.update_person(8, manager=5)
    org.delete(7)  # manages 38, 39 and 40: their supervisor empties, which BambooHR counts as a change
    assert {p.n for p in org.people.values() if p.manager == 7} == {38, 39, 40}
    r = h.sync("hr")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert sorted(h.changes("hr", after=seq)) == sorted(
        [
            ("user.updated", "5", ("job_title", "raw_attributes")),
            ("user.updated", "6", ("raw_attributes", "state")),
            ("user.deleted", "30"),
            ("user.created", str(hired.n)),
            ("user.updated", "8", ("manager_idp_id", "raw_attributes")),
            ("user.deleted", "7"),
            ("user.updated", "38", ("manager_idp_id", "raw_attributes")),
            ("user.updated", "39", ("manager_idp_id", "raw_attributes")),
            ("user.updated", "40", ("manager_idp_id", "raw_attributes")),
        ]
    )
    stored = h.users("hr")
    assert stored["6"]["state"] == "inactive"
    assert stored["6"]["raw_attributes"]["terminationDate"] == "2026-06-30"
    assert "30" not in stored and stored["8"]["manager_idp_id"] == "5"
    assert h.groups("hr") == {} and h.members("hr") == set()  # BambooHR has no groups


@pytest.mark.parametrize(("flip_changes", "capitals"), [(False, False), (True, False), (False, True)])
def test_a_future_hire_is_stored_inactive_and_turns_active_at_the_first_run_of_their_first_day(
    emu: BambooHREmulator, synced: Any, flip_changes: bool, capitals: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _ = synced
    # Whether the day a future hire starts moves their lastChanged is not known [U]: if it does
    # not, employees/changed never lists them, and they stayed inactive until the next periodic
    # full run (24 h by default) — through their first day.
    emu.hire_flip_changes = flip_changes
    if capitals:
        # A status in another case ("INACTIVE") is read as the status it names: the periodic
        # full run that recognized the hire's row by its text dropped them from those to read
        # back, and they stayed inactive through their first day.
        value = emu._value
        shout = lambda p, f, boss: value(p, f, boss).upper() if f == "status" else value(p, f, boss)  # noqa: E731
        monkeypatch.setattr(emu, "_value", shout)
    today = datetime.now(UTC).date()
    emu.today = today
    n = str(emu.org.hire("Future", "Hire", manager=5).n)
    emu.org.update_person(int(n), hire_date=(today + timedelta(days=1)).isoformat())
    emu.org.hire("Already", "Started", manager=5)  # the report's last row, which is always parsed
    assert h.sync("hr").status == "succeeded"
    stored = h.users("hr")[n]
    assert stored["state"] == "inactive"  # BambooHR: "Future hires have a status of Inactive"
    assert stored["raw_attributes"]["terminationDate"] is None

    time.sleep(2.1)  # lastChanged has second precision, and the next run re-reads the cursor's second
    emu.org.update_person(6, title="Principal")
    assert h.sync("hr").status == "succeeded"  # the cursor moves past the hire's last change
    assert h.users("hr")[n]["state"] == "inactive"
    # A periodic full run recognizes the unchanged row by its text without parsing it, and still
    # keeps the hire to read back.
    for _ in range(2):  # the first stores the row's digest, the second recognizes the row by it
        full = h.sync("hr", full=True)
        assert full.status == "succeeded" and full.events == 0
    seq = h.last_seq()

    emu.today = today + timedelta(days=1)  # their first day: BambooHR shows them Active
    r = h.sync("hr")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert h.users("hr")[n]["state"] == "active"
    assert h.changes("hr", after=seq) == [("user.updated", n, ("raw_attributes", "state"))]


def test_a_rehire_entered_ahead_turns_active_at_the_first_run_of_their_first_day(
    emu: BambooHREmulator, synced: Any
) -> None:
    h, _ = synced
    # A former employee rehired with a start date to come: BambooHR shows them Inactive, as any
    # future hire, but their terminationDate is the earlier employment's, not empty. Whether their
    # first day moves lastChanged is not known [U] (off here): if it does not, only the cursor's
    # `starts` brings them back, and they stayed inactive until the next periodic full run.
    assert emu.hire_flip_changes is False
    today = datetime.now(UTC).date()
    emu.today = today
    rehired = 10
    emu.org.deactivate(rehired, "terminated", "2024-01-31")
    assert h.sync("hr").status == "succeeded"
    emu.org.update_person(
        rehired, state="active", inactive_reason=None, hire_date=(today + timedelta(days=1)).isoformat()
    )
    emu.org.hire("Already", "Started", manager=5)  # the report's last row, which is always parsed
    assert h.sync("hr").status == "succeeded"
    stored = h.users("hr")[str(rehired)]
    assert stored["state"] == "inactive" and stored["raw_attributes"]["terminationDate"] == "2024-01-31"

    time.sleep(2.1)  # lastChanged has second precision, and the next run re-reads the cursor's second
    emu.org.update_person(6, title="Principal")
    assert h.sync("hr").status == "succeeded"  # the cursor moves past the rehire's last change
    assert h.users("hr")[str(rehired)]["state"] == "inactive"
    # A periodic full run recognizes the unchanged row by its text and still keeps the rehire.
    for _ in range(2):  # the first stores the row's digest, the second recognizes the row by it
        full = h.sync("hr", full=True)
        assert full.status == "succeeded" and full.events == 0
    seq = h.last_seq()

    emu.today = today + timedelta(days=1)  # their first day back: BambooHR shows them Active
    r = h.sync("hr")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert h.users("hr")[str(rehired)]["state"] == "active"
    assert h.changes("hr", after=seq) == [("user.updated", str(rehired), ("raw_attributes", "state"))]


def test_the_cursor_keeps_future_hires_until_they_start_or_their_day_is_long_past(emu: BambooHREmulator) -> None:
    today = datetime.now(UTC).date()
    emu.today = today
    org = emu.org
    org.update_person(10, hire_date=(today + timedelta(days=30)).isoformat())  # a future hire
    org.update_person(11, hire_date=(today + timedelta(days=1)).isoformat())  # starts tomorrow
    org.deactivate(12, "terminated", "2026-01-01")  # terminated: not a future hire
    newest = one_second_each(org)  # re-read by every increment (the cursor's own second)
    c = connector(emu)
    _, first = pull(c)
    assert first.cursor["starts"] == {"10": org.people[10].hire_date, "11": org.people[11].hire_date}
    # An increment reads back only the one whose day may have come (the company's date may be a
    # day ahead of UTC's), though nothing changed.
    before = len(emu.request_log)
    pages, done = pull(c, first.cursor)
    assert set(users(pages)) == {"11", newest} and users(pages)["11"].state == "inactive"
    assert done.cursor["starts"] == first.cursor["starts"] and len(emu.request_log) - before == 2
    emu.today = today + timedelta(days=1)
    pages, done = pull(c, done.cursor)
    assert users(pages)["11"].state == "active" and done.cursor["starts"] == {"10": org.people[10].hire_date}
    # One whose day is long past (the sync was stopped for days) is read back once more, then not
    # again: a hire that never started (cancelled, still Inactive) is not read back for ever.
    stale = {**done.cursor, "starts": {"10": org.people[10].hire_date, "13": "2026-01-01"}}
    pages, done = pull(c, stale)
    assert set(users(pages)) == {newest, "13"} and done.cursor["starts"] == {"10": org.people[10].hire_date}


def test_a_scheduled_termination_turns_the_user_inactive_at_the_first_run_of_its_day(
    emu: BambooHREmulator, synced: Any
) -> None:
    h, _ = synced
    # HR enters terminations ahead of time: BambooHR shows the leaver Active, with the date, until
    # it comes. Whether that day (Active → Inactive) moves lastChanged is not known [U]; if it does
    # not, employees/changed never lists them, and the ex-employee stayed active until the next
    # periodic full run (24 h by default).
    assert emu.termination_flip_changes is False
    today = datetime.now(UTC).date()
    emu.today = today
    leaving = "10"
    emu.org.schedule_termination(int(leaving), (today + timedelta(days=1)).isoformat())
    emu.org.hire("Already", "Started", manager=5)  # the report's last row, which is always parsed
    assert h.sync("hr").status == "succeeded"
    stored = h.users("hr")[leaving]
    assert (
        stored["state"] == "active"
        and stored["raw_attributes"]["terminationDate"] == (today + timedelta(days=1)).isoformat()
    )

    time.sleep(2.1)  # lastChanged has second precision, and the next run re-reads the cursor's second
    emu.org.update_person(6, title="Principal")
    assert h.sync("hr").status == "succeeded"  # the cursor moves past the leaver's last change
    assert h.users("hr")[leaving]["state"] == "active"
    # A periodic full run recognizes the unchanged row by its text without parsing every row, and
    # still keeps the leaver to read back.
    for _ in range(2):  # the first stores the row's digest, the second recognizes the row by it
        full = h.sync("hr", full=True)
        assert full.status == "succeeded" and full.events == 0
    seq = h.last_seq()

    emu.today = today + timedelta(days=1)  # the termination takes effect: BambooHR shows Inactive
    r = h.sync("hr")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert h.users("hr")[leaving]["state"] == "inactive"
    assert h.changes("hr", after=seq) == [("user.updated", leaving, ("raw_attributes", "state"))]


def test_the_cursor_keeps_scheduled_terminations_until_they_take_effect(emu: BambooHREmulator) -> None:
    today = datetime.now(UTC).date()
    emu.today = today
    org = emu.org
    org.schedule_termination(10, (today + timedelta(days=30)).isoformat())  # leaves next month
    org.schedule_termination(11, (today + timedelta(days=1)).isoformat())  # leaves tomorrow
    org.update_person(12, termination_date="2021-03-31", hire_date="2022-01-10")  # a rehire: active
    org.deactivate(13, "terminated", "2026-01-01")  # already gone: Inactive
    newest = one_second_each(org)  # re-read by every increment (the cursor's own second)
    c = connector(emu)
    _, first = pull(c)
    assert first.cursor["ends"] == {"10": org.people[10].termination_date, "11": org.people[11].termination_date}
    # Before the day it stays active, and an increment reads back only the one whose day may have
    # come (the company's date may be a day ahead of UTC's), though nothing changed.
    before = len(emu.request_log)
    pages, done = pull(c, first.cursor)
    assert set(users(pages)) == {"11", newest} and users(pages)["11"].state == "active"
    assert done.cursor["ends"] == first.cursor["ends"] and len(emu.request_log) - before == 2
    emu.today = today + timedelta(days=1)
    pages, done = pull(c, done.cursor)
    assert users(pages)["11"].state == "inactive" and done.cursor["ends"] == {"10": org.people[10].termination_date}
    # Stale and garbled entries are harmless: one whose day is long past is read back once (it is
    # Inactive: dropped), the ones that are not dates are dropped unread, and the run succeeds.
    garbled = {"10": org.people[10].termination_date, "13": "2026-01-01", "14": "soon", "15": 7, "16": None}
    pages, done = pull(c, {**done.cursor, "ends": garbled})
    assert set(users(pages)) == {newest, "13"} and users(pages)["13"].state == "inactive"
    assert done.cursor["ends"] == {"10": org.people[10].termination_date}
    _, done = pull(c, {**done.cursor, "ends": ["10"]})  # not even an object
    assert "ends" not in done.cursor


def test_an_unchanged_directory_emits_no_events_incremental_or_full(emu: BambooHREmulator, synced: Any) -> None:
    h, _ = synced
    seq = h.last_seq()
    again = h.sync("hr")
    assert again.status == "succeeded" and again.mode == "incremental" and again.events == 0
    full = h.sync("hr", full=True)
    assert full.status == "succeeded" and full.mode == "full" and full.events == 0
    assert h.last_seq() == seq
    # A full walk notices a deletion as a missing row.
    emu.org.delete(33)
    assert h.sync("hr", full=True).status == "succeeded"
    assert h.changes("hr", after=seq) == [("user.deleted", "33")]


def test_a_changed_attribute_mapping_reaches_every_user_at_the_next_sync(
    emu: BambooHREmulator, synced: Any, harness: Any
) -> None:
    """An incremental run re-reads only the employees BambooHR reports as changed: after a new
    `attributes` entry one user got the new custom attribute and the other 39 waited for the
    periodic full sync (24 h by default). A settings change now makes the next run a full one."""
    h, _ = synced
    emu.org.update_person(5, title="Principal")
    assert h.sync("hr").mode == "incremental"  # the cursor is now past everyone but person 5
    seq = h.last_seq()

    def factory(tenant: str, tenant_settings: Any) -> BambooHRConnector:
        return build(tenant, tenant_settings, policy=RetryPolicy(max_attempts=4, sleep=Sleeps(), jitter=0))

    config = {**emu.tenant_config("hr", Path(".")), "attributes": {"division": "division"}}
    mapped = harness({"hr": config}, connector_factory=factory)
    r = mapped.sync("hr")
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert "the tenant's settings changed since the last sync: full sync" in r.notes
    assert all(u["custom_attributes"]["division"] for u in mapped.users("hr").values())
    changes = mapped.changes("hr", after=seq)
    assert len(changes) == 40 and {c[0] for c in changes} == {"user.updated"}
    assert {c[2] for c in changes} == {("custom_attributes",)}
    assert mapped.events("hr", after=seq)[0]["previous_attributes"] == {"custom_attributes": {"division": None}}
    again = mapped.sync("hr")
    assert again.mode == "incremental" and again.events == 0
    # A setting that only says when to sync changes nothing a sync makes: no full walk for it.
    rescheduled = harness({"hr": {**config, "schedule": "1h", "full_sync_every": "48h"}}, connector_factory=factory)
    assert rescheduled.sync("hr").mode == "incremental"


def test_a_full_resync_recognizes_unchanged_rows_by_their_text_and_parses_only_the_rest(
    emu: BambooHREmulator, synced: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _ = synced
    seq = h.last_seq()
    parsed: list[str] = []  # rows handed over parsed (recognized ones are not)
    normalized: list[str] = []
    real_add, real_normalize = BambooHRConnector._add, BambooHRConnector.normalize

    def add(self: BambooHRConnector, page: Page, row: Any, *args: Any) -> None:
        parsed.append(str(row.get("id")))
        real_add(self, page, row, *args)

    def normalize(self: BambooHRConnector, row: Any, *args: Any) -> Any:
        normalized.append(str(row.get("id")))
        return real_normalize(self, row, *args)

    monkeypatch.setattr(BambooHRConnector, "_add", add)
    monkeypatch.setattr(BambooHRConnector, "normalize", normalize)
    # The newest change is an employee's whose row the resync will recognize, not parse.
    emu.org.update_person(12, title="Staff Engineer")
    assert h.sync("hr").status == "succeeded"  # an increment: row 12 stored without a source digest
    assert h.sync("hr", full=True).events == 0  # …so a full walk normalizes it once more
    parsed.clear()
    normalized.clear()
    full = h.sync("hr", full=True)
    assert full.status == "succeeded" and full.mode == "full" and full.events == 0
    assert normalized == []
    assert parsed == ["40"]  # only the document's last row, parsed with the document's end
    assert len(h.users("hr")) == 40  # recognized rows count as seen: nobody deleted
    # Its cursor is the newest change the report shows, read from a row that was not parsed.
    _, walked = pull(connector(emu), full=True)
    stored_cursor = h.store.get_cursor("hr").value
    assert {k: v for k, v in stored_cursor.items() if k != "dirpull_settings"} == walked.cursor
    # A changed row is parsed and normalized; the others still are not.
    parsed.clear()
    normalized.clear()
    emu.org.update_person(5, title="Principal")
    changed = h.sync("hr", full=True)
    assert changed.status == "succeeded" and normalized == ["5"] and parsed == ["5", "40"]
    assert h.changes("hr", after=seq)[-1] == ("user.updated", "5", ("job_title", "raw_attributes"))


def test_a_recognized_row_gives_its_last_change_however_it_is_written() -> None:
    from dirpull.connectors.bamboohr import _Newest, _recognizer
    from dirpull.connectors.source import SourceDigests

    texts = [
        b'{"id":"1","lastChanged":"2025-01-02T03:04:05+00:00"}',
        b'{"id":"2", "lastChanged" : "2025-03-01T00:00:00+00:00"}',
        b'{"id":"3","note":"\\"lastChanged\\":\\"2099-01-01T00:00:00+00:00\\"","lastChanged":null}',
        b'{"id":"4","lastChanged":"2025-02-01T00:00:00\\u002B00:00"}',
        b'{"id":"5"}',
    ]

    class Known:
        def __init__(self, owners: dict[str, str]) -> None:
            self.owners = owners

        def __call__(self, idp_id: str, digest: str) -> bool:
            return self.owners.get(digest) == idp_id

        def owner(self, digest: str) -> str | None:
            return self.owners.get(digest)

    known = Known({})
    sources = SourceDigests(known, {"tenant": "hr"}, [])
    known.owners = {sources.digest_text(t): str(i + 1) for i, t in enumerate(texts)}
    latest = _Newest()
    recognize = _recognizer(sources, latest)
    assert [recognize(t) for t in texts] == ["1", "2", "3", "4", "5"]
    assert recognize(b'{"id":"1","lastChanged":"2025-01-02T03:04:05+00:00" }') is None  # another text
    # Row 3's quoted look-alike is inside a string and its own value is null; row 4's is escaped.
    assert latest.when is not None and latest.when.isoformat() == "2025-03-01T00:00:00+00:00"


def test_an_employee_the_report_lists_twice_is_quarantined_and_left_as_stored(
    emu: BambooHREmulator, synced: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither of two different rows with one id wins (in a full walk the earlier one was already
    handed over when the later came): the employee stays as stored, not deleted; a new one listed
    twice is not created. The very same row twice is one row."""
    h, _ = synced
    seq = h.last_seq()
    org = emu.org
    hired = org.hire("Twin", "Row")
    org.update_person(9, title="First Row Title")
    title = h.users("hr")["9"]["job_title"]

    def listing_twice(handler: Any) -> Any:
        def handle(req: Any) -> Any:
            resp = handler(req)
            if isinstance(resp.body, dict):
                for row in list(resp.body["employees"]):
                    if row["id"] == "5":  # the very same row again
                        resp.body["employees"].append(row)
                    if row["id"] in ("9", str(hired.n)):  # another row, another title
                        resp.body["employees"].append({**row, "jobTitle": "Second Row Title"})
            return resp

        return handle

    routes = [(m, pattern, listing_twice(f) if "reports" in pattern.pattern else f) for m, pattern, f in emu._routes]
    monkeypatch.setattr(emu, "_routes", routes)
    for full in (True, False):  # a full walk, then the rows of 9 and the new hire read by id
        r = h.sync("hr", full=full)
        assert r.status == "succeeded" and r.mode == ("full" if full else "incremental"), r.error
        quarantined = {q["idp_id"] for q in h.store.runs("hr", 1)[0]["quarantined"]}
        assert quarantined == {"9", str(hired.n)}
        assert h.changes("hr", after=seq) == [] and str(hired.n) not in h.users("hr")
        assert h.users("hr")["9"]["job_title"] == title != "First Row Title"
    monkeypatch.undo()
    assert h.sync("hr", full=True).status == "succeeded"
    assert sorted(c[:2] for c in h.changes("hr", after=seq)) == [("user.created", str(hired.n)), ("user.updated", "9")]


def test_a_php_escaped_report_whose_last_row_copies_a_recognized_one_is_not_quarantined(
    emu: BambooHREmulator, harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custom report written as PHP's json_encode writes it by default (`\\/` and `\\u00e9`
    escapes, not orjson's text) that repeats an employee's row as its last row: on a resync the
    first copy is recognized by its text, and the last one (parsed with the document's end) is
    that very row, not another one. It was digested as a parsed row, which never matches such a
    text: every unchanged resync quarantined the employee as listed twice."""
    emu.org.update_person(5, title="R/D Lead", given="José")

    def php_copies(handler: Any) -> Any:
        def handle(req: Any) -> Any:
            resp = handler(req)
            if isinstance(resp.body, dict):
                rows = resp.body["employees"]
                rows += [dict(r) for r in rows if r["id"] == "5"]
                resp.body = json.dumps(resp.body).replace("/", "\\/").encode()
            return resp

        return handle

    routes = [(m, p, php_copies(f) if "reports" in p.pattern else f) for m, p, f in emu._routes]
    monkeypatch.setattr(emu, "_routes", routes)
    h = harness({"hr": emu.tenant_config("hr", Path("."))}, connector_factory=build)
    seq = 0
    for _ in range(4):  # first sync, digests of the texts, then resyncs that recognize them
        r = h.sync("hr", full=True)
        assert r.status == "succeeded" and r.counts["quarantined"] == 0, (r.error, r.counts)
        if seq:
            assert h.changes("hr", after=seq) == []
        seq = h.last_seq()
    assert h.users("hr")["5"]["first_name"] == "José" and h.users("hr")["5"]["job_title"] == "R/D Lead"


def test_identical_copies_of_an_employee_are_one_row_applied_once(
    emu: BambooHREmulator, harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custom report joined on a field it does not show (one row per email, per position)
    repeats an employee's row, the very same text: that is one row, applied once — not the
    employee held out of every run until the report is fixed. In a full walk (the copies pages
    apart; parsed on a first sync, recognized by their text on a resync) and in an increment's
    report read by ids."""
    org = emu.org
    copies = {"3", "5"}

    def listing_copies(handler: Any) -> Any:
        def handle(req: Any) -> Any:
            resp = handler(req)
            if isinstance(resp.body, dict):
                rows = resp.body["employees"]
                for row in list(rows):
                    if row["id"] in copies:  # one copy next to it, one pages later
                        rows.insert(rows.index(row), dict(row))
                        rows.append(dict(row))
            return resp

        return handle

    routes = [(m, p, listing_copies(f) if "reports" in p.pattern else f) for m, p, f in emu._routes]
    monkeypatch.setattr(emu, "_routes", routes)
    normalized: list[str] = []
    real_normalize = BambooHRConnector.normalize

    def normalize(self: BambooHRConnector, row: Any, *args: Any) -> Any:
        normalized.append(str(row.get("id")))
        return real_normalize(self, row, *args)

    monkeypatch.setattr(BambooHRConnector, "normalize", normalize)
    h = harness({"hr": {**emu.tenant_config("hr", Path(".")), "page_size": 10}}, connector_factory=build)

    def run(full: bool) -> list[tuple[str, str]]:
        seq = h.last_seq()
        r = h.sync("hr", full=full)
        assert r.status == "succeeded" and r.mode == ("full" if full else "incremental"), r.error
        assert h.store.runs("hr", 1)[0]["quarantined"] == []
        return [c[:2] for c in h.changes("hr", after=seq)]

    created = run(True)  # a first sync: every row parsed
    assert sorted(created) == sorted(("user.created", str(n)) for n in range(1, 41)) and len(h.users("hr")) == 40
    normalized.clear()
    assert run(True) == [] and {"3", "5"}.isdisjoint(normalized)  # recognized by their text, never parsed
    org.update_person(5, title="Principal")
    hired = org.hire("Twin", "Row")
    copies.add(str(hired.n))
    assert sorted(run(True)) == [("user.created", str(hired.n)), ("user.updated", "5")]
    assert h.users("hr")["5"]["job_title"] == "Principal" and len(h.users("hr")) == 41
    org.update_person(3, title="Staff")
    assert run(False) == [("user.updated", "3")]  # read back by id, the copies in one response
    assert h.users("hr")["3"]["job_title"] == "Staff"


def test_a_run_failing_mid_fetch_leaves_the_store_unchanged(emu: BambooHREmulator, synced: Any) -> None:
    h, _ = synced
    before_users, seq = h.users("hr"), h.last_seq()
    emu.org.update_person(5, title="Principal")
    emu.org.delete(31)
    # Each broken as often as the run asks (4 attempts), so that the run fails.
    for fault in ({"drop": 4, "path": "reports/custom"}, {"malformed": 4, "path": "reports/custom"}):
        emu.faults.update(fault)
        r = h.sync("hr", full=True)
        assert r.status == "failed" and r.error
        assert h.users("hr") == before_users and h.last_seq() == seq
    emu.faults.clear()
    # The cursor did not move either: the next good run still sees both changes.
    r = h.sync("hr")
    assert r.status == "succeeded" and r.mode == "incremental"
    assert sorted(h.changes("hr", after=seq)) == [
        ("user.deleted", "31"),
        ("user.updated", "5", ("job_title", "raw_attributes")),
    ]


def test_a_refused_key_fails_the_run_with_a_clear_message(emu: BambooHREmulator, synced: Any) -> None:
    h, _ = synced
    seq = h.last_seq()
    emu.org.update_person(5, title="Principal")
    emu.faults.expire_auth = 1
    r = h.sync("hr")
    assert r.status == "failed" and "HTTP 401" in r.error and "API key was refused" in r.error
    emu.permitted = False
    r = h.sync("hr")
    assert r.status == "failed" and "HTTP 403" in r.error
    assert SECRET not in r.error and h.last_seq() == seq


def test_a_throttled_sync_waits_as_told_and_succeeds(emu: BambooHREmulator, synced: Any) -> None:
    h, sleeps = synced
    emu.org.update_person(5, title="Principal")
    emu.retry_after = "2"
    emu.faults.rate_limit = 2
    r = h.sync("hr")
    assert r.status == "succeeded" and r.events == 1
    assert sleeps == [2.0, 2.0]


def test_a_sync_throttled_past_its_retry_budget_can_be_given_more(emu: BambooHREmulator, harness: Any) -> None:
    """The run's retry budget was a fixed 300 s: a company whose BambooHR kept asking it to wait
    longer failed every run with nothing to raise. `max_retry_wait` is that budget (scaled down:
    a Retry-After of 1 s passes 0.5 s); `max_retry_attempts` caps the attempts."""
    cfg = emu.tenant_config("hr", Path("."))
    emu.retry_after = "1"
    emu.faults.rate_limit = 1
    r = harness({"hr": {**cfg, "max_retry_wait": 0.5}}).sync("hr")
    assert r.status == "failed" and "cap on retry waits" in (r.error or ""), r.error
    emu.faults.rate_limit = 1
    r = harness({"hr": {**cfg, "max_retry_attempts": 1}}).sync("hr")
    assert r.status == "failed" and "gave up after 1 attempts" in (r.error or ""), r.error
    emu.faults.rate_limit = 1
    h = harness({"hr": {**cfg, "max_retry_wait": 2}})
    r = h.sync("hr")
    assert r.status == "succeeded", r.error
    assert emu.faults.rate_limit == 0 and h.users("hr")


def test_a_cursor_stored_before_the_retry_settings_existed_keeps_its_next_run_incremental(
    emu: BambooHREmulator, synced: Any
) -> None:
    """A tenant last synced by the dirpull that digested every setting it had into the cursor,
    from before BambooHR had `max_retry_attempts` and `max_retry_wait`, then upgraded: its
    untouched settings must not read as changed (a full walk noted "the tenant's settings changed")."""
    from dirpull.jsoncodec import canonical
    from dirpull.model import digest
    from dirpull.storage import schema

    h, _ = synced
    every = h.config.tenants["hr"].model_dump(mode="json")
    skipped = {"schedule", "full_sync_every", "guard", "enabled", "max_retry_attempts", "max_retry_wait",
               "max_run_time"}  # nor had it max_run_time, added later still
    older = {k: v for k, v in every.items() if k not in skipped}
    cursor = {**h.store.get_cursor("hr").value, "dirpull_settings": digest(canonical(older))}
    with h.store.engine.begin() as conn:
        conn.execute(schema.cursors.update().values(value=cursor))
    emu.org.update_person(5, title="Principal")
    r = h.sync("hr")
    assert r.status == "succeeded" and r.mode == "incremental", (r.error, r.notes)
    assert not any("settings changed" in n for n in r.notes), r.notes


# --- cost measurement (opt-in) -------------------------------------------------------------------


def _serve_org(n: int, queue: Any, stop: Any) -> None:
    org = Org.generate(n, seed=1)
    with org.lock:  # spread creation times over the past day so 'changed since' means something
        for p in org.people.values():
            p.created_at = p.updated_at = p.updated_at - 86_400 + p.n * 0.5
    emulator = BambooHREmulator(org)
    emulator.start()
    try:
        queue.put(emulator.tenant_config("bench", Path(".")))
        stop.wait(600)
    finally:
        emulator.stop()


@pytest.mark.skipif(not os.environ.get("DIRPULL_BENCH"), reason="set DIRPULL_BENCH=<employees> to measure")
def test_pull_cost_per_user() -> None:
    """DIRPULL_BENCH=10000 pytest tests/test_bamboohr_connector.py -k pull_cost -s
    The emulator runs in a child process, so the CPU and heap numbers are the connector's alone."""
    n = int(os.environ["DIRPULL_BENCH"])
    ctx = multiprocessing.get_context("fork")
    queue, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_serve_org, args=(n, queue, stop), daemon=True)
    child.start()
    try:
        cfg = queue.get(timeout=600)
        c = build("bench", BambooHRTenant.model_validate(cfg))
        for label in ("full", "full (heap traced)"):
            traced = label != "full"  # tracemalloc slows Python down: time the first run only
            wall, cpu, count = time.perf_counter(), time.process_time(), 0
            if traced:
                tracemalloc.start()
            for item in c.pull(None, full=True):
                count += len(item.users) if isinstance(item, Page) else 0
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert count == n and isinstance(item, Done)
            if traced:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                print(f"connector heap peak during a full pull: {peak / 2**20:.1f} MiB")
            else:
                print(
                    f"\n{label}: {count} users, {item.requests} request(s), {wall:.2f}s wall "
                    f"({wall / count * 1e6:.0f} us/user), connector CPU {cpu / count * 1e6:.0f} us/user"
                )
        cursor = item.cursor
        base = cfg["api_url"].split("/api/")[0]
        requests.post(f"{base}/_emulator/changes", json={"random": n // 100, "seed": 7}, timeout=60)
        wall, count = time.perf_counter(), 0
        for item in c.pull(cursor, full=False):
            count += len(item.users) + len(item.removed_users) if isinstance(item, Page) else 0
        print(
            f"incremental after {n // 100} random changes: {count} users read or removed, "
            f"{item.requests} requests, {time.perf_counter() - wall:.2f}s wall"
        )
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()


def test_a_field_the_key_may_no_longer_read_is_held_not_emptied_for_everyone(
    emu: BambooHREmulator, synced: Any
) -> None:
    """BambooHR silently leaves out the fields an API key may not read (still 200): a key that lost
    access to work emails made the next full sync empty every user's email, and it was applied."""
    h, _ = synced
    seq = h.last_seq()
    with_email = sum(1 for u in h.users("hr").values() if u["email"])
    assert with_email > 20
    emu.forbidden_fields = {"workEmail"}
    r = h.sync("hr", full=True)
    assert r.status == "held" and r.exit_code == 3, r.error
    assert f"would empty email for {with_email} of 40 stored users" in r.error
    assert "stopped returning it (a permission or scope lost)" in r.error
    assert h.last_seq() == seq and sum(1 for u in h.users("hr").values() if u["email"]) == with_email
    emu.forbidden_fields = set()  # access given back: nothing to apply, nothing held
    again = h.sync("hr", full=True)
    assert again.status == "succeeded" and again.events == 0, again.error


def test_an_increment_after_the_key_lost_a_field_turns_full_and_is_held_not_clearing_it_quietly(
    emu: BambooHREmulator, synced: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A key whose access level lost work emails made each incremental run clear the email of
    everyone it read back (3 people changed: 3 emails emptied, under the guard's thresholds, with
    no word), a few more each run, while the full run was held. The increment now turns full, says
    which field went and why, and the guard weighs the field emptied for everyone."""
    h, _ = synced
    org = emu.org
    org.update_person(9, title="Principal")
    assert h.sync("hr").mode == "incremental"  # the cursor now past the generated org's second
    seq = h.last_seq()
    emails = {idp_id: u["email"] for idp_id, u in h.users("hr").items()}
    assert sum(1 for e in emails.values() if e) > 20
    emu.forbidden_fields = {"workEmail"}
    for n in (5, 6, 7):
        org.update_person(n, title="Principal")
    r = h.sync("hr")
    assert r.status == "held" and r.mode == "full", r.error
    assert "would empty email for" in (r.error or "") and "apply with `dirpull sync hr --full --force`" in r.error
    note = "the custom report no longer has workEmail (the API key may have lost access to it): full sync instead"
    assert note in r.notes and note in h.store.runs("hr")[0]["notes"]
    assert f"tenant hr: {note}" in caplog.messages
    assert h.last_seq() == seq and {i: u["email"] for i, u in h.users("hr").items()} == emails
    # Held again while the key cannot read it: the next increment turns full the same way.
    again = h.sync("hr")
    assert again.status == "held" and note in again.notes, again.error
    # Accepted: applied once, and the increments after it go on without the field.
    forced = h.sync("hr", force=True)
    assert forced.status == "succeeded" and forced.mode == "full", forced.error
    assert not any(u["email"] for u in h.users("hr").values())
    org.update_person(8, title="Principal")
    after = h.sync("hr")
    assert after.status == "succeeded" and after.mode == "incremental" and not after.notes, after.error
    assert h.users("hr")["8"]["job_title"] == "Principal"


def test_an_increment_after_the_key_was_given_a_field_back_turns_full_and_fills_it_for_everyone(
    emu: BambooHREmulator, synced: Any
) -> None:
    """The key lost work emails and the emptied field was accepted (--force); access given back,
    the increments read the emails back only for the employees who changed: everyone else's
    stayed empty until the periodic full run, a day later by default."""
    h, _ = synced
    org = emu.org
    org.update_person(9, title="Principal")
    assert h.sync("hr").mode == "incremental"
    emails = {idp_id: u["email"] for idp_id, u in h.users("hr").items()}
    emu.forbidden_fields = {"workEmail"}
    org.update_person(5, title="Principal")
    assert h.sync("hr", force=True).status == "succeeded"
    assert not any(u["email"] for u in h.users("hr").values())
    emu.forbidden_fields = set()
    org.update_person(6, title="Principal")
    r = h.sync("hr")
    assert r.status == "succeeded" and r.mode == "full", r.error
    note = (
        "the custom report now has workEmail, which the last run's did not (the API key may have been "
        "given access to it): full sync instead"
    )
    assert note in r.notes
    assert {i: u["email"] for i, u in h.users("hr").items()} == emails
    org.update_person(7, title="Principal")
    after = h.sync("hr")
    assert after.status == "succeeded" and after.mode == "incremental" and not after.notes, after.error


def test_a_field_the_key_never_could_read_leaves_increments_incremental(emu: BambooHREmulator) -> None:
    """Only a field a report sent before counts as lost: a key that never could read home emails
    (or a cursor from before the sent fields were kept, which this run records) stays incremental."""
    emu.forbidden_fields = {"homeEmail"}
    c = connector(emu)
    _, first = pull(c)
    assert "homeEmail" not in first.cursor["fields"] and "workEmail" in first.cursor["fields"]
    emu.org.update_person(5, title="Principal")
    pages, done = pull(c, first.cursor)
    assert done.mode == "incremental" and not done.notes and users(pages)["5"].job_title == "Principal"
    assert done.cursor["fields"] == first.cursor["fields"]
    old = {"since": first.cursor["since"]}  # written by a dirpull that kept no fields
    pages, done = pull(c, old)
    assert done.mode == "incremental" and not done.notes and "5" in users(pages)
    assert done.cursor["fields"] == first.cursor["fields"]
    # A run that reads no report (nothing changed) keeps the fields the last one had.
    age(emu.org)  # every change an hour before the cursor (one ahead of BambooHR's clock turns the run full)
    _, quiet = pull(c, {**done.cursor, "since": _iso(time.time())})
    assert quiet.mode == "incremental" and quiet.cursor["fields"] == first.cursor["fields"]


def test_a_field_taken_out_of_the_settings_is_not_reported_lost(emu: BambooHREmulator) -> None:
    """A custom field the operator removed from `attributes` is no longer asked for, so no longer
    sent: that is their edit, not a permission lost, and the increment stays incremental."""
    _, first = pull(connector(emu, attributes={"site": "location"}))
    assert "location" in first.cursor["fields"]
    emu.org.update_person(5, title="Principal")
    pages, done = pull(connector(emu), first.cursor)
    assert done.mode == "incremental" and not done.notes and "5" in users(pages)
    assert "location" not in done.cursor["fields"]


def test_a_field_lost_between_two_reports_of_one_increment_applies_nothing(emu: BambooHREmulator) -> None:
    """Access taken away while an increment reads its changed employees batch by batch: its first
    batches were handed on already (they cannot be taken back to turn the run full), so the run
    fails, and the next one, from the same cursor, turns full."""
    c = connector(emu, batch_size=2)
    _, first = pull(c)
    for n in (5, 6, 7, 8):
        emu.org.update_person(n, title="Principal")
    items = c.pull({**first.cursor, "since": _iso(time.time() - 30)}, full=False)
    assert isinstance(next(items), Page)
    emu.forbidden_fields = {"workEmail"}
    with pytest.raises(ConnectorError, match=r"workEmail stopped coming during the run .* nothing applied"):
        list(items)
    _, done = pull(c, first.cursor)
    assert done.mode == "full" and "the custom report no longer has workEmail" in done.notes[0]
    assert "workEmail" not in done.cursor["fields"]


def test_a_report_deactivating_many_active_workers_among_many_terminated_ones_is_held(harness: Any) -> None:
    """BambooHR keeps terminated employees: 240 of them next to about 60 active people. A run
    marking 25 active people terminated (over 40% of the workforce) was 25 of some 300 stored users,
    under the 10% threshold, and was applied: 25 people deprovisioned downstream. Purging 25 old
    records of terminated employees deprovisions nobody and is still applied."""
    org = Org.generate(300, seed=11)
    for p in list(org.people.values()):
        if p.n > 60 and p.state == "active":
            org.deactivate(p.n, "terminated", "2025-06-30")
    age(org)
    active = [p.n for p in org.people.values() if p.state == "active"]
    assert 50 <= len(active) <= 60

    def factory(tenant: str, tenant_settings: Any) -> BambooHRConnector:
        return build(tenant, tenant_settings, policy=RetryPolicy(max_attempts=4, sleep=Sleeps(), jitter=0))

    with BambooHREmulator(org, api_key=SECRET) as emu:
        h = harness({"hr": emu.tenant_config("hr", Path("."))}, connector_factory=factory)
        assert h.sync("hr").status == "succeeded"
        for n in range(276, 301):  # terminated long ago
            org.delete(n)
        purged = h.sync("hr")
        assert purged.status == "succeeded" and purged.counts["users_deleted"] == 25, purged.error
        seq = h.last_seq()
        for n in active[1:26]:
            org.deactivate(n, "terminated", "2026-05-31")
        r = h.sync("hr")
        assert r.status == "held" and r.exit_code == 3, r.error
        assert (
            f"would deactivate or delete 25 of {len(active)} active users (25 deactivated, 0 deleted) "
            "(threshold 10% and more than 20)"
        ) in r.error
        assert h.last_seq() == seq
        assert sum(u["state"] == "active" for u in h.users("hr").values()) == len(active)
        assert h.store.runs("hr")[0]["status"] == "held"


def test_a_report_reactivating_many_terminated_workers_is_held_and_force_applies_it(harness: Any) -> None:
    """A report that turns terminated employees active (its status field or filter changed) gave
    ex-employees their access back downstream, and no number of them was held: 22 of 239 terminated
    workers reactivated next to some 85 active people were applied. Measured against the active
    people, as deactivations are (22 of 325 stored, or of 239 inactive, is under 10%). A handful of
    rehires is applied, and new hires, created active, are not counted."""
    org = Org.generate(300, seed=11)
    for p in list(org.people.values()):
        if p.n > 60 and p.state == "active":
            org.deactivate(p.n, "terminated", "2025-06-30")
    age(org)
    inactive = [p.n for p in org.people.values() if p.state == "inactive"]
    assert len(inactive) > 200

    def factory(tenant: str, tenant_settings: Any) -> BambooHRConnector:
        return build(tenant, tenant_settings, policy=RetryPolicy(max_attempts=4, sleep=Sleeps(), jitter=0))

    def active_count() -> int:
        return sum(u["state"] == "active" for u in h.users("hr").values())

    with BambooHREmulator(org, api_key=SECRET) as emu:
        h = harness({"hr": emu.tenant_config("hr", Path("."))}, connector_factory=factory)
        assert h.sync("hr").status == "succeeded"
        for n in inactive[:5]:  # rehired
            org.reactivate(n)
        for _ in range(25):
            org.hire()
        applied = h.sync("hr")
        assert applied.status == "succeeded", applied.error
        assert applied.counts["users_reactivated"] == 5 and applied.counts["users_created"] == 25
        active, stored = active_count(), len(h.users("hr"))
        assert 80 <= active <= 90
        seq = h.last_seq()
        for n in inactive[5:27]:
            org.reactivate(n)
        r = h.sync("hr")
        assert r.status == "held" and r.exit_code == 3, r.error
        share = round(22 * 100 / active, 1)
        assert (
            f"would reactivate 22 of {stored - active} inactive users, as many as {share:g}% of the {active} "
            "active ones (threshold 10% and more than 20); is the directory's status of those users right"
        ) in r.error
        assert h.last_seq() == seq and active_count() == active
        run = h.store.runs("hr")[0]
        assert run["status"] == "held" and run["counts"]["users_reactivated"] == 22
        forced = h.sync("hr", force=True)
        assert forced.status == "succeeded" and forced.counts["users_reactivated"] == 22, forced.error
        assert active_count() == active + 22


def test_an_attribute_removed_from_the_mapping_is_dropped_from_everyone_not_held(
    emu: BambooHREmulator, harness: Any
) -> None:
    """An operator who removed an `attributes` entry had the next (full) run held by the guard as
    "would empty custom_attributes.division for 40 of 40 stored users … has the directory stopped
    returning it?": the daemon then held every run of the tenant (new hires, terminations) until
    someone ran --force. The edit is the human's decision. A mapped key that the directory stops
    filling is still held."""

    def factory(tenant: str, tenant_settings: Any) -> BambooHRConnector:
        return build(tenant, tenant_settings, policy=RetryPolicy(max_attempts=4, sleep=Sleeps(), jitter=0))

    base = emu.tenant_config("hr", Path("."))
    guard = {"max_percent": 10, "min_count": 5}
    mapped = harness({"hr": {**base, "attributes": {"division": "division", "site": "location"}}},
                     connector_factory=factory, guard=guard)  # fmt: skip
    assert mapped.sync("hr").status == "succeeded"
    assert all(u["custom_attributes"].keys() == {"division", "site"} for u in mapped.users("hr").values())
    seq = mapped.last_seq()

    unmapped = harness({"hr": {**base, "attributes": {"site": "location"}}}, connector_factory=factory, guard=guard)
    r = unmapped.sync("hr")
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert all(u["custom_attributes"].keys() == {"site"} for u in unmapped.users("hr").values())
    assert unmapped.events("hr", after=seq)[0]["previous_attributes"]["custom_attributes"].keys() == {"division"}

    # A key still mapped, to a field nothing fills any more (a typo, or a permission lost): held.
    typo = harness({"hr": {**base, "attributes": {"site": "locaton"}}}, connector_factory=factory, guard=guard)
    held = typo.sync("hr")
    assert held.status == "held", held.error
    assert "would empty custom_attributes.site for 40 of 40 stored users" in (held.error or "")


def test_a_run_held_after_a_settings_change_says_the_change_may_be_the_cause(
    emu: BambooHREmulator, harness: Any
) -> None:
    """A mapped attribute whose path the operator mistyped empties it for everyone: the hold asked
    only whether the directory had stopped returning it (a lost permission), sending the operator
    to the vendor's admin console instead of their own edit."""

    def factory(tenant: str, tenant_settings: Any) -> BambooHRConnector:
        return build(tenant, tenant_settings, policy=RetryPolicy(max_attempts=4, sleep=Sleeps(), jitter=0))

    base = emu.tenant_config("hr", Path("."))
    guard = {"max_percent": 10, "min_count": 5}
    h = harness({"hr": {**base, "attributes": {"site": "location"}}}, connector_factory=factory, guard=guard)
    assert h.sync("hr").status == "succeeded"
    typo = harness({"hr": {**base, "attributes": {"site": "locaton"}}}, connector_factory=factory, guard=guard)
    held = typo.sync("hr")
    assert held.status == "held", held.error
    assert held.error == (
        "held by the mass-change guard: would empty custom_attributes.site for 40 of 40 stored users (threshold 10% "
        "and more than 5); has the directory stopped returning it (a permission or scope lost)?; the tenant's "
        "settings changed since its last applied sync: if this is what the change does, review with "
        "`dirpull sync hr --full --dry-run`, apply with `dirpull sync hr --full --force`; if not, correct the settings"
    )
    # The settings put back, nothing is held: the next run applies what the directory says.
    again = h.sync("hr")
    assert again.status == "succeeded" and again.events == 0, again.error


def test_a_first_day_on_a_machine_ahead_of_utc_does_not_stamp_a_change_in_the_future(
    emu: BambooHREmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The emulator's wall-clock date was the machine's local one, and a first day's flip is
    # stamped at that date's midnight UTC: on a machine a day ahead of UTC (Kiritimati, UTC+14)
    # that midnight had not come, the connector's cursor moved to it, and the increments until
    # then never heard of the changes made meanwhile.
    if datetime.now(UTC).hour < 10:
        pytest.skip("no time zone's date is ahead of UTC's before 10:00 UTC")
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        assert date.today() > datetime.now(UTC).date()
        emu.hire_flip_changes = True
        one_second_each(emu.org)
        first = emu.org.hire("First", "Day", manager=5).n
        emu.org.update_person(first, hire_date=date.today().isoformat())  # the day it is in Kiritimati
        c = connector(emu)
        _, done = pull(c)
        assert datetime.fromisoformat(done.cursor["since"]) <= datetime.now(UTC)
        emu.org.update_person(6, title="Principal")
        pages, _ = pull(c, done.cursor)
        assert users(pages)["6"].raw_attributes["jobTitle"] == "Principal"
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_a_retry_after_date_without_a_zone_is_read_as_gmt_whatever_the_machines_zone(
    emu: BambooHREmulator, monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    # HTTP-date has three forms, all GMT, and a client must take each (RFC 9110 5.6.7); the
    # asctime one names no zone. Read as the machine's local time, a 30 s wait became none at all
    # ahead of UTC (the retries burnt in a moment, the run failed) and the longest wait behind it.
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        emu.retry_after = time.asctime(time.gmtime(time.time() + 30))  # "Mon Nov 30 22:49:37 2026"
        emu.faults.rate_limit = 1
        sleeps = Sleeps()
        pages, _ = pull(connector(emu, sleeps))
        assert len(sleeps) == 1 and 25 <= sleeps[0] <= 31, sleeps
        assert len(users(pages)) == 40
    finally:
        monkeypatch.undo()
        time.tzset()
