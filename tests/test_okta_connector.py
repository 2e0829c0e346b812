"""The Okta connector through the official okta SDK against the Okta emulator over loopback HTTP:
connector-level pulls and sync-level runs through the real store (tests/harness.py)."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import typing
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import pytest
import requests
from redirects import redirecting

from dirpull.config import MIN_CURSOR_HOLDBACK, ConfigError, OktaTenant, parse_config
from dirpull.connectors.base import AuthError, ConfigurationError, ConnectorError, Done, Page
from dirpull.connectors.okta import MAX_TRANSIENT_ATTEMPTS, OktaConnector, check_org_url
from dirpull.emulators.okta_api import EVERYONE, OktaEmulator, group_id, user_id
from dirpull.emulators.okta_api import _error as okta_error
from dirpull.emulators.org import Org

PEOPLE = 120


class Sleeps:
    """Recorded instead of slept, so rate-limit tests take milliseconds."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def org() -> Org:
    return Org.generate(people=PEOPLE, seed=11)


@pytest.fixture
def emu(org: Org) -> Iterator[OktaEmulator]:
    e = OktaEmulator(org)
    e.fault_reset_in = 0  # a faulted 429 says "the window resets now": tiny waits
    e.start()
    try:
        yield e
    finally:
        e.stop()


def tenant(e: OktaEmulator, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    cfg = e.tenant_config("t1", tmp_path)
    cfg.update({"backoff_base": 0.01, **overrides})
    return cfg


def connector(cfg: dict[str, Any], sleep: Sleeps | None = None) -> OktaConnector:
    return OktaConnector("t1", OktaTenant.model_validate(cfg), sleep=sleep or Sleeps())


def pull(c: OktaConnector, cursor: dict[str, Any] | None = None, full: bool = False) -> tuple[list[Page], Done]:
    items = list(c.pull(cursor, full=full))
    assert isinstance(items[-1], Done) and all(isinstance(i, Page) for i in items[:-1])
    return items[:-1], items[-1]


def users_of(pages: list[Page]) -> dict[str, Any]:
    return {u.idp_id: u for p in pages for u in p.users}


def age(org: Org, days: float = 30.0) -> Org:
    """History spread over the past month, an hour apart, like a real org (`Org.generate` stamps
    everything within a second of now, so every record is inside any cursor holdback)."""
    base = time.time() - days * 86400
    for p in org.people.values():
        p.created_at = p.updated_at = base + p.n * 3600
    for g in org.groups.values():
        g.created_at = g.updated_at = g.members_updated_at = base + g.n * 3600 + 1800
    return org


def outsider(org: Org, g: int) -> int:
    return next(
        n
        for n in sorted(org.people)
        if n != 1 and n not in org.transitive_members(g) and org.people[n].visible and org.people[n].state == "active"
    )


def leaf(org: Org, exclude: set[int]) -> int:
    """An active person nobody reports to (so deleting them changes nobody else's record)."""
    managers = {p.manager for p in org.people.values()}
    return next(
        n
        for n in sorted(org.people, reverse=True)
        if n not in managers and n not in exclude and org.people[n].state == "active"
    )


# --- configuration ------------------------------------------------------------------------------


def test_http_only_for_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_org_url("https://acme.okta.com/") == ("https://acme.okta.com", False)
    assert check_org_url("http://127.0.0.1:8080")[1] is True
    with pytest.raises(ConfigurationError, match="loopback"):
        check_org_url("http://acme.okta.com")
    with pytest.raises(ConfigError, match="org_url"):
        parse_config(
            {"tenants": {"t": {"provider": "okta", "org_url": "http://10.0.0.5", "api_token": "x"}}},
            tmp_path / "dirpull.toml",
        )
    # The SDK's own switches (env, okta.yaml) are ignored: nothing can lift the check from outside.
    monkeypatch.setenv("OKTA_TESTING_TESTINGDISABLEHTTPSCHECK", "true")
    monkeypatch.setenv("OKTA_CLIENT_TOKEN", "ambient-token")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "okta.yaml").write_text("okta:\n  testing:\n    testingDisableHttpsCheck: true\n")
    from dirpull.connectors.okta import _client, _sdk

    for build in (_sdk, _client):  # the pull's pipeline, and the full SDK client
        with pytest.raises(ValueError, match="https"):
            build("http://127.0.0.1:9", False, {"authorizationMode": "SSWS", "token": "t"}, lambda cfg: None)


def test_settings_never_show_the_token(emu: OktaEmulator, tmp_path: Path) -> None:
    c = connector(tenant(emu, tmp_path))
    assert emu.api_token not in repr(c) and emu.api_token not in repr(c.settings)


# --- connector-level ----------------------------------------------------------------------------


def test_the_api_token_is_sent_as_okta_documents_it_with_the_space(emu: OktaEmulator, tmp_path: Path) -> None:
    """The SDK writes `Authorization: SSWS<token>` (sdk-notes §2 pitfall 3); Okta documents `SSWS
    {token}`. Against an Okta that holds to its documentation every API-token run would fail 401."""
    emu.ssws_space_required = True
    pages, done = pull(connector(tenant(emu, tmp_path)), full=True)
    assert done.snapshot and len(users_of(pages)) == sum(1 for _ in emu.org.listed_people())


def test_full_pull_users_groups_members(emu: OktaEmulator, org: Org, tmp_path: Path) -> None:
    emu.status_overrides.update({2: "STAGED", 3: "LOCKED_OUT", 4: "PASSWORD_EXPIRED", 5: "PROVISIONED"})
    pages, done = pull(connector(tenant(emu, tmp_path)))
    assert done.snapshot and done.mode == "full" and done.cursor and done.cursor["v"] == 1
    users = users_of(pages)
    assert len(users) == PEOPLE  # DEPROVISIONED included (the plain list hides them)
    for p in org.people.values():
        u = users[user_id(p.n)]
        expected = "inactive" if p.state == "inactive" or p.n == 2 else "active"
        assert u.state == expected, (p.n, u.raw_attributes["status"])
    u = users[user_id(7)]
    p7 = org.people[7]
    assert (u.username, u.email, u.first_name, u.job_title, u.employee_number) == (
        p7.username,
        p7.email,
        p7.given,
        p7.title,
        p7.employee_number,
    )
    assert u.manager_idp_id == user_id(p7.manager)  # type: ignore[arg-type]
    assert "lastLogin" not in u.raw_attributes and "lastUpdated" not in u.raw_attributes
    groups = {g.idp_id for p in pages for g in p.groups}
    assert groups == {group_id(g.n) for g in org.listed_groups()}  # no Everyone by default
    members = {m for p in pages for m in p.members}
    assert members == {(group_id(g.n), user_id(n)) for g in org.listed_groups() for n in org.transitive_members(g.n)}
    # One page of users (≤200) + groups + one members page per group.
    assert done.requests == 1 + 1 + len(groups)
    assert all(len(p.users) <= 200 for p in pages)


def test_everyone_only_when_asked(emu: OktaEmulator, tmp_path: Path) -> None:
    pages, _ = pull(connector(tenant(emu, tmp_path, include_everyone=True)))
    assert group_id(0) in {g.idp_id for p in pages for g in p.groups}
    assert sum(1 for p in pages for m in p.members if m[0] == group_id(0)) == PEOPLE


def test_incremental_uses_held_back_cursor(emu: OktaEmulator, org: Org, tmp_path: Path) -> None:
    # Records older than the second of Okta's `Date`, which bounds the cursor even without holdback.
    age(org)
    c = connector(tenant(emu, tmp_path, cursor_holdback=MIN_CURSOR_HOLDBACK))
    _, done = pull(c)
    org.update_person(9, title="Chief Tester")
    pages, delta = pull(c, done.cursor)
    assert not delta.snapshot and delta.mode == "incremental"
    # The smallest holdback re-reads the cursor's own millisecond: the newest user of the first run.
    assert set(users_of(pages)) == {user_id(9), user_id(PEOPLE)}
    assert delta.cursor["users_since"] > done.cursor["users_since"]  # type: ignore[index]
    # The default holdback keeps the cursor 5 minutes behind: the same change is re-read (duplicates
    # are harmless: the diff sees nothing new).
    c2 = connector(tenant(emu, tmp_path))
    _, d2 = pull(c2)
    pages2, _ = pull(c2, d2.cursor)
    assert set(users_of(pages2)) == {user_id(9)}


@pytest.mark.parametrize("ahead", [0, 600], ids=["clocks-agree", "our-clock-10-min-ahead"])
def test_a_change_on_a_page_already_read_is_not_skipped_by_the_cursor(
    emu: OktaEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead: int
) -> None:
    """The user listing is paged by id, not by time: a user on a page already read may change
    while the walk goes on, before a user on a later page changes more than `cursor_holdback` later
    (a long walk: a large org, rate-limit pacing). The cursor must not pass the earlier change,
    however far the worker's clock runs ahead of Okta's."""
    import dirpull.connectors.okta as okta_connector

    monkeypatch.setattr(okta_connector, "_now", lambda: datetime.now(UTC) + timedelta(seconds=ahead))
    age(org)
    c = connector(tenant(emu, tmp_path, page_size=50))  # default cursor_holdback: 300 s
    stream = c.pull(None, full=True)
    first = next(stream)
    assert isinstance(first, Page) and user_id(1) in {u.idp_id for u in first.users}
    edited = org.update_person(1, title="Edited During The Walk").updated_at  # page 1 is already read
    with org.clock_at(edited + 400):  # the walk goes on; 400 s later, on a page not read yet:
        org.update_person(110, title="Edited Later")
    items = [first, *stream]
    done = items[-1]
    assert isinstance(done, Done) and done.cursor
    assert users_of(items[:-1])[user_id(110)].job_title == "Edited Later"  # type: ignore[arg-type]
    pages, _ = pull(c, done.cursor)
    users = users_of(pages)
    assert set(users) == {user_id(1), user_id(110)}
    assert users[user_id(1)].job_title == "Edited During The Walk"


@pytest.mark.parametrize("into_the_second", [0.5, 0.0], ids=["later-in-the-second", "its-first-millisecond"])
def test_a_change_in_the_second_of_oktas_date_is_not_skipped_by_the_smallest_holdback(
    emu: OktaEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, into_the_second: float
) -> None:
    """Okta's `Date` is whole seconds, rounded down: a change made after its first answer is
    stamped `Date` or later. A worker whose clock ran ahead of Okta's took the run's start as
    `Date` + 1 s, so with a `cursor_holdback` under a second the next run skipped a change made in
    that second to a user on a page already read (and the System Log position, a deletion logged
    in it), until the next full sync. The smallest holdback accepted (a millisecond) also re-reads
    a change stamped `Date` itself, the run's start to the millisecond: with none the next run asked
    `lastUpdated gt` that very millisecond."""
    import email.utils

    import dirpull.connectors.okta as okta_connector

    okta_date = int(time.time()) + 5  # every answer's `Date`; its record stamps are pinned below
    monkeypatch.setattr(
        BaseHTTPRequestHandler, "date_time_string", lambda self, ts=None: email.utils.formatdate(okta_date, usegmt=True)
    )
    monkeypatch.setattr(okta_connector, "_now", lambda: datetime.now(UTC) + timedelta(seconds=600))
    age(org)
    c = connector(tenant(emu, tmp_path, page_size=50, cursor_holdback=MIN_CURSOR_HOLDBACK))
    stream = c.pull(None, full=True)
    first = next(stream)
    assert isinstance(first, Page) and user_id(1) in {u.idp_id for u in first.users}
    with org.clock_at(okta_date + into_the_second):  # page 1 is already read; in the second of the `Date`
        org.update_person(1, title="Edited During The Walk")
    with org.clock_at(okta_date + 400):  # the walk goes on, a page not read yet
        org.update_person(110, title="Edited Later")
    done = [first, *stream][-1]
    assert isinstance(done, Done) and done.cursor
    users = users_of(pull(c, done.cursor)[0])
    assert user_id(1) in users and users[user_id(1)].job_title == "Edited During The Walk"


def test_429_storm_with_reset_headers(emu: OktaEmulator, tmp_path: Path) -> None:
    sleeps = Sleeps()
    emu.faults.update({"rate_limit": 4, "path": "/api/v1/users"})
    pages, done = pull(connector(tenant(emu, tmp_path), sleeps))
    assert len(users_of(pages)) == PEOPLE
    assert len(sleeps.calls) == 4 and all(s <= 1.1 for s in sleeps.calls)  # the window resets now: short waits
    assert done.requests == 4 + 1 + 1 + len({g.idp_id for p in pages for g in p.groups})


def test_a_429_whose_reset_has_passed_backs_off(emu: OktaEmulator, tmp_path: Path) -> None:
    """The concurrent limit's reset is only an estimate: one already past is no reason to retry at
    once, again and again, while 75 requests are still in flight."""
    sleeps = Sleeps()
    emu.fault_reset_in = -5
    emu.faults.update({"rate_limit": 4, "path": "/api/v1/users"})
    pages, _ = pull(connector(tenant(emu, tmp_path), sleeps))
    assert len(users_of(pages)) == PEOPLE
    assert len(sleeps.calls) == 4 and sleeps.calls == sorted(set(sleeps.calls))  # exponential


def test_429_storm_without_headers_backs_off(emu: OktaEmulator, tmp_path: Path) -> None:
    sleeps = Sleeps()
    emu.rate_limit_headers = False
    emu.faults.update({"rate_limit": 3, "path": "/api/v1/groups"})
    pages, _ = pull(connector(tenant(emu, tmp_path), sleeps))
    assert {g.idp_id for p in pages for g in p.groups}
    assert len(sleeps.calls) == 3 and sleeps.calls[0] < sleeps.calls[1] < sleeps.calls[2]  # exponential


def test_endless_429_fails_after_the_wait_cap(emu: OktaEmulator, tmp_path: Path) -> None:
    emu.rate_limit_headers = False
    emu.faults.update({"rate_limit": 10_000})
    sleeps = Sleeps()
    with pytest.raises(ConnectorError, match="max_rate_limit_wait"):
        pull(connector(tenant(emu, tmp_path, max_rate_limit_wait=0.5), sleeps))
    assert sum(sleeps.calls) <= 0.5


def test_slows_down_before_the_reserve_is_spent(org: Org, tmp_path: Path) -> None:
    e = OktaEmulator(org, rate_limit=8, rate_window=0.4)
    e.start()
    try:
        c = OktaConnector("t1", OktaTenant.model_validate(tenant(e, tmp_path, rate_limit_reserve=0.5)))
        pages, done = pull(c)  # real sleeps: the emulator's window must really reset
        assert len(users_of(pages)) == PEOPLE
        assert c.last_throttle is not None
        reasons = [why for why, _ in c.last_throttle.waits]
        assert reasons and all("reserve" in why for why in reasons)  # paced, never hit a 429
        assert done.requests == 2 + len({g.idp_id for p in pages for g in p.groups})
    finally:
        e.stop()


def test_a_low_system_log_quota_paces_the_log_reads_not_the_user_listing(org: Org, tmp_path: Path) -> None:
    """Okta's limits are per endpoint (§3.1: 500 vs 1000 in recorded headers). A SIEM polling the
    System Log keeps /api/v1/logs near its limit; before, the run took that bucket's `Remaining`
    for the whole org and slept until the log's window reset before listing a single user."""
    e = OktaEmulator(org, rate_limits={"/api/v1/logs": 10})
    e.start()
    try:
        org.add_member(1, outsider(org, 1))  # an event: the run's log position is two pages away
        auth = {"Authorization": f"SSWS {e.api_token}"}
        for _ in range(8):  # the SIEM's reads of this minute
            assert requests.get(f"{e.base_url}/api/v1/logs", headers=auth, timeout=10).status_code == 200
        sleeps = Sleeps()
        c = connector(tenant(e, tmp_path, poll_system_log=True), sleeps)
        pages, done = pull(c)
        assert len(users_of(pages)) == PEOPLE and done.cursor["log_next"]
        assert c.last_throttle is not None
        # The log's second page waits for the log's window (1 of its 10 left); nothing else waits.
        assert [why for why, _ in c.last_throttle.waits] == ["rate limit reserve reached (1/10 left)"]
        assert len(sleeps.calls) == 1
        listing = requests.get(f"{e.base_url}/api/v1/users", headers=auth, timeout=10)
        assert listing.headers["X-Rate-Limit-Limit"] == "600"  # the users' own window
    finally:
        e.stop()


def test_connection_refused_fails_naming_the_listing_after_the_attempts_of_an_http_error(
    org: Org, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The final error of a request that kept failing below HTTP said only `GET URL: reason`: the
    run's error (and `ConnectorError.step`) did not say which listing failed, as HTTP errors do."""
    e = OktaEmulator(org)
    e.start()
    try:
        cfg = tenant(e, tmp_path)
        # An outage answered 503 by Okta: the attempts one request gets.
        e.faults.update({"error": 10_000, "error_status": 503})
        with pytest.raises(ConnectorError) as http_error:
            pull(connector(cfg))
    finally:
        e.stop()
    attempts = http_error.value.requests
    assert http_error.value.step == "list users" and attempts == MAX_TRANSIENT_ATTEMPTS
    sleeps = Sleeps()
    with caplog.at_level(logging.WARNING, logger="dirpull"), pytest.raises(ConnectorError) as info:
        pull(connector(cfg, sleeps))  # the same port, closed now
    err, port = info.value, urlsplit(cfg["org_url"]).port
    # The daemon's log says which listing is being retried as it happens, not only the URL.
    retries = [m for r in caplog.records if "Connection refused" in (m := r.getMessage()) and "; waiting " in m]
    assert len(retries) == attempts - 1
    listing = f"tenant t1: list users: GET http://127.0.0.1:{port}/api/v1/users?"
    assert all(m.startswith(listing) for m in retries), retries
    assert str(err).startswith(f"list users: GET http://127.0.0.1:{port}/api/v1/users?"), str(err)
    assert "Connection refused" in str(err) and str(err).endswith(f"(after {attempts} attempts)")
    assert err.step == "list users" and err.retriable
    assert err.requests == attempts and len(sleeps.calls) == attempts - 1
    # The run's cap on waiting (max_rate_limit_wait) ends the retries sooner, naming the listing too.
    with pytest.raises(ConnectorError) as capped:
        pull(connector({**cfg, "backoff_base": 1.0, "max_rate_limit_wait": 2.0}))
    assert str(capped.value).startswith("list users: GET ") and "would pass max_rate_limit_wait" in str(capped.value)
    assert capped.value.step == "list users" and capped.value.requests < attempts


@pytest.mark.parametrize(
    ("path", "poll", "step"),
    [
        ("/api/v1/groups/", False, r"list members of group (00g\w+)"),
        ("/api/v1/logs", True, r"read system log"),
    ],
    ids=["members", "system-log"],
)
def test_an_answer_cut_short_every_time_names_the_step_that_failed(
    emu: OktaEmulator, tmp_path: Path, path: str, poll: bool, step: str
) -> None:
    """The connection dropped mid-answer on every attempt: the run's error named only the URL,
    not the step (a group's member listing, the System Log), unlike an HTTP error there."""
    import re

    emu.faults.update({"drop": 10_000, "path": path})
    with pytest.raises(ConnectorError) as info:
        pull(connector(tenant(emu, tmp_path, poll_system_log=poll)), full=True)
    err = info.value
    m = re.match(rf"({step}): GET http://127\.0\.0\.1:\d+{re.escape(path)}", str(err))
    assert m is not None, str(err)
    assert err.step == m.group(1) and "ClientPayloadError (" in str(err)
    assert str(err).endswith(f"(after {MAX_TRANSIENT_ATTEMPTS} attempts)")
    # Why, without aiohttp's internal "400" (no HTTP status was answered) or a mangled remainder.
    assert "ClientPayloadError (Not enough data to satisfy content length header (received " in str(err), str(err)


def test_the_next_page_is_asked_for_while_this_one_is_handed_over(
    emu: OktaEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def users_requests() -> int:
        return sum(1 for _, path in emu.request_log if path.startswith("/api/v1/users"))

    stream = connector(tenant(emu, tmp_path, page_size=50)).pull(None, full=True)  # 3 pages of users
    first = next(stream)
    assert isinstance(first, Page) and len(first.users) == 50
    # The pull is suspended here (its event loop stopped): page 2 was asked for before page 1 came.
    deadline = time.monotonic() + 5
    while users_requests() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert users_requests() == 2
    stream.close()  # with page 2 in flight: dropped, nothing left running or unreported
    time.sleep(0.2)
    assert users_requests() == 2
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_a_failure_of_the_page_asked_ahead_comes_after_the_page_before(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str | None] = []

    async def call(self: OktaConnector, run: Any, step: str, path: str, query: list[tuple[str, Any]],
                   *args: Any) -> tuple[list[dict[str, Any]], list[Any], dict[str, str]]:  # fmt: skip
        asked.append(dict(query).get("after"))
        if len(asked) == 1:
            return [{"id": "00u1"}], [], {"Link": f'<{emu.base_url}/api/v1/users?after=00u1&limit=200>; rel="next"'}
        raise ConnectorError(f"{step}: HTTP 500 from {path}", step=step)

    monkeypatch.setattr(OktaConnector, "_call", call)
    got: list[Any] = []

    async def listing() -> None:
        async for records, _bad in connector(tenant(emu, tmp_path))._paged(None, "list users", "/api/v1/users",
                                                                            "user"):  # fmt: skip
            got.append(records)

    with pytest.raises(ConnectorError, match="HTTP 500"):
        asyncio.run(listing())
    assert got == [[{"id": "00u1"}]] and asked == [None, "00u1"]  # page 1 handed on, then page 2's error


def test_cancelling_the_listing_while_it_drops_the_page_ahead_still_cancels_it(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropping = asyncio.Event()

    async def call(self: OktaConnector, run: Any, step: str, path: str, query: list[tuple[str, Any]],
                   *args: Any) -> tuple[list[dict[str, Any]], list[Any], dict[str, str]]:  # fmt: skip
        if dict(query).get("after") is None:
            return [{"id": "00u1"}], [], {"Link": f'<{emu.base_url}/api/v1/users?after=00u1&limit=200>; rel="next"'}
        try:
            await asyncio.sleep(30)  # page 2, still in flight when page 1 is done with
        except asyncio.CancelledError:
            dropping.set()
            await asyncio.sleep(0.2)  # a transport that takes a moment to shut its connection
            raise
        raise AssertionError("page 2 was never cancelled")

    monkeypatch.setattr(OktaConnector, "_call", call)
    finished: list[str] = []

    async def listing() -> None:
        pages = connector(tenant(emu, tmp_path))._paged(None, "list users", "/api/v1/users", "user")
        async for _records, _bad in pages:
            break
        await pages.aclose()  # waits for page 2's cancellation to finish
        finished.append("after aclose")

    async def main() -> None:
        task = asyncio.ensure_future(listing())
        await asyncio.wait_for(dropping.wait(), timeout=5)
        task.cancel()  # e.g. the daemon shutting down, while the page ahead is being dropped
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)

    asyncio.run(main())
    assert finished == []  # the cancellation was not swallowed by the listing's clean-up


def test_a_user_whose_manager_id_is_their_own_has_no_manager(emu: OktaEmulator, org: Org, tmp_path: Path) -> None:
    """Google's connector already read it so; here the user named themselves, a manager no one
    could follow. A cycle of two is kept as sent: each names someone else."""
    boss = next(p for p in org.listed_people() if p.manager is not None)
    org.update_person(boss.n, manager=boss.n)
    users = users_of(pull(connector(tenant(emu, tmp_path)))[0])
    assert users[user_id(boss.n)].manager_idp_id is None
    assert sum(u.manager_idp_id is not None for u in users.values()) > len(users) // 2


def test_malformed_user_is_quarantined_alone(emu: OktaEmulator, tmp_path: Path) -> None:
    emu.malformed_users.add(8)
    pages, _ = pull(connector(tenant(emu, tmp_path)))
    users = users_of(pages)
    assert len(users) == PEOPLE - 1 and user_id(8) not in users
    bad = [q for p in pages for q in p.quarantined]
    assert {q.idp_id for q in bad} == {user_id(8)} and "SDK rejects" in bad[0].reason
    # Still a member of its groups: a quarantined record is never counted as gone.
    assert any(m[1] == user_id(8) for p in pages for m in p.members)


def test_a_quarantined_user_names_the_field_the_sdk_refused_without_its_value(
    emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """`dirpull runs` said only "1 validation error for UserProfile" for every record the SDK
    rejects: which field, and why, was cut off. The reason names both, and never quotes the value
    (a person's name)."""
    org.update_person(9, given="Maximiliana" * 6)  # Okta's SDK takes a firstName of 50 at most
    pages, _ = pull(connector(tenant(emu, tmp_path)))
    [bad] = [q for p in pages for q in p.quarantined]
    assert bad.idp_id == user_id(9)
    assert bad.reason == (
        "the okta SDK rejects this record: UserProfile.firstName: String should have at most 50 characters"
    )


def test_a_page_cut_short_fails_without_quoting_the_people_on_it(emu: OktaEmulator, tmp_path: Path) -> None:
    """The error names the step and how the answer began, not the users on the page: it lands
    in the run record and the log."""
    emu.faults.update({"malformed": 100, "path": "/api/v1/users"})
    with pytest.raises(ConnectorError, match=r"not JSON") as info:
        pull(connector(tenant(emu, tmp_path)))
    first = min(p.n for p in emu.org.listed_people())
    assert "is not JSON ([ … (values not shown))" in str(info.value)
    assert user_id(first) not in str(info.value)
    assert str(info.value).endswith(f"(after {MAX_TRANSIENT_ATTEMPTS} attempts)")


@pytest.mark.parametrize("path", ["/api/v1/users", "/api/v1/groups/", "/api/v1/logs"])
def test_an_answer_garbled_on_the_way_is_asked_for_again(
    emu: OktaEmulator, tmp_path: Path, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 whose body a proxy cut or garbled: the run failed on the first one, where the other
    connectors (and this one, for a dropped connection) ask again."""
    whole, _ = pull(connector(tenant(emu, tmp_path, poll_system_log=True)), full=True)
    emu.faults.update({"malformed": 2, "path": path})
    with caplog.at_level(logging.WARNING, logger="dirpull"):
        again, done = pull(connector(tenant(emu, tmp_path, poll_system_log=True)), full=True)
    assert emu.faults.malformed == 0  # both garbled answers were served
    # Retries, not rate limits: the run's note said "rate limits: waited …" for them.
    assert any(n.startswith("waited ") and n.endswith("over 2 pauses (rate limits and retries)") for n in done.notes)
    assert sorted(u.idp_id for p in again for u in p.users) == sorted(u.idp_id for p in whole for u in p.users)
    assert sorted(m for p in again for m in p.pairs()) == sorted(m for p in whole for m in p.pairs())
    assert sum("with a body that is not JSON" in r.getMessage() for r in caplog.records) == 2
    assert any(p.pairs() for p in whole) and any(p.users for p in whole)


def test_bad_token_is_an_auth_error(emu: OktaEmulator, tmp_path: Path) -> None:
    from dirpull.connectors.base import AuthError

    with pytest.raises(AuthError) as info:
        pull(connector(tenant(emu, tmp_path, api_token="wrong-token-value")))
    assert "wrong-token-value" not in str(info.value)


def test_system_log_finds_deletions_between_full_syncs(emu: OktaEmulator, org: Org, tmp_path: Path) -> None:
    c = connector(tenant(emu, tmp_path, poll_system_log=True))
    _, done = pull(c)
    assert done.cursor and done.cursor["log_next"]
    victim = leaf(org, set())
    org.delete(victim)
    pages, delta = pull(c, done.cursor)
    assert [u for p in pages for u in p.removed_users] == [user_id(victim)]
    assert delta.cursor and delta.cursor["log_next"] != done.cursor["log_next"]


@pytest.mark.parametrize("include_everyone", [False, True])
def test_a_hire_logged_as_joining_everyone_lists_everyones_members_only_when_everyone_is_synced(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path, include_everyone: bool
) -> None:
    """Okta logs each new user as joining Everyone (`group.user_membership.add`): with
    `poll_system_log`, the next incremental run listed all of Everyone's members (a request per
    200 users of the org) for a group that is not synced. Synced (`include_everyone`), the new
    member is still stored."""
    age(org)
    everyone = group_id(EVERYONE)
    h = make_harness(harness, emu, tmp_path, poll_system_log=True, include_everyone=include_everyone)
    assert h.sync("t1").status == "succeeded"
    hired = user_id(org.hire("Eve", "Newcomer").n)
    n0 = len(emu.request_log)
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    logged = [e for e in emu._events if e["eventType"] == "group.user_membership.add"]
    assert [[t["id"] for t in e["target"]] for e in logged] == [[hired, everyone]]  # the event was there
    listed = [p for _, p in emu.request_log[n0:] if p.startswith(f"/api/v1/groups/{everyone}/users")]
    assert hired in h.users("t1")
    if include_everyone:
        assert len(listed) == 1 and (everyone, hired) in h.members("t1"), listed
    else:
        assert listed == [] and everyone not in h.groups("t1")


def test_a_deletion_the_system_log_says_failed_leaves_the_user_and_group_stored(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """A `user.lifecycle.delete.completed` or `group.lifecycle.delete` whose outcome is FAILURE
    (DENY, SKIPPED…, or no outcome at all) did not delete anything in Okta. Acting on it deleted
    a user or group that still exists: downstream apps deprovisioned them until the next full sync
    created them again. A deletion that succeeded in the same log is still applied."""
    age(org)
    h = make_harness(harness, emu, tmp_path, poll_system_log=True)
    assert h.sync("t1").status == "succeeded"
    gone_user = leaf(org, set())
    kept_user, kept_user2 = [n for n in sorted(org.people) if n != gone_user and org.people[n].state == "active"][:2]
    kept_group = next(g.n for g in org.listed_groups() if g.members)
    emu.failed_deletes = {user_id(kept_user): "FAILURE", group_id(kept_group): "DENY", user_id(kept_user2): None}
    org.delete(gone_user)
    seq = h.last_seq()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert len(emu._logged_failed_deletes) == 3  # the System Log did carry the three failed attempts
    deleted = [c for c in h.changes("t1", after=seq) if c[0] in ("user.deleted", "group.deleted")]
    assert deleted == [("user.deleted", user_id(gone_user))]
    assert {user_id(kept_user), user_id(kept_user2)} <= set(h.users("t1"))
    assert group_id(kept_group) in h.groups("t1")
    named = (f"{user_id(kept_user)} FAILURE", f"{group_id(kept_group)} DENY", f"{user_id(kept_user2)} without outcome")
    assert any("3 deletion events not applied" in n and all(x in n for x in named) for n in r.notes), r.notes


class MidRun(OktaConnector):
    """Runs `during` once, after the pull has handed over the first page `when` accepts (by
    default its first page: the user listing's)."""

    during: Any = None
    when: Any = staticmethod(lambda item: True)

    def pull(self, cursor: Any, *, full: bool, known: Any = None) -> Iterator[Page | Done]:
        for item in super().pull(cursor, full=full, known=known):
            yield item
            if self.during is not None and self.when(item):
                during, self.during = self.during, None
                during()


def mid_run(during: list[Any], when: Any = None) -> Any:
    """A connector factory whose next pull runs the last of `during` (if any) once, after the
    first page `when` accepts (default: the first page)."""

    def factory(name: str, settings: Any) -> MidRun:
        c = MidRun(name, settings, sleep=Sleeps())
        if during:
            c.during = during.pop()
            if when is not None:
                c.when = when
        return c

    return factory


def test_a_user_deleted_after_the_listing_returned_them_is_deleted_by_the_system_log(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """Okta never reuses a user id: a `user.lifecycle.delete.completed` in the System Log is final
    even when this run's user listing still returned the user (deleted after it was read, or
    listed by a lagging index). Keeping the user then lost the deletion until the next full sync:
    the next run's log position is past the event, and no listing returns the user again."""
    age(org)
    during: list[Any] = []
    h = harness({"t1": tenant(emu, tmp_path, poll_system_log=True)}, connector_factory=mid_run(during))
    assert h.sync("t1").status == "succeeded"
    victim = leaf(org, set())
    org.deactivate(victim)  # Okta deletes only deactivated users: the deactivation is in the delta
    during.append(lambda: org.delete(victim))  # ...and the deletion comes after the listing
    seq = h.last_seq()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert org.people[victim].deleted and not during
    assert ("user.deleted", user_id(victim)) in h.changes("t1", after=seq)
    assert user_id(victim) not in h.users("t1")


def test_a_user_hired_and_deleted_between_two_system_log_reads_is_deleted(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """Okta logs a deletion whenever it happens. The emulator logged only the hire of a user
    created and deleted between two System Log reads: a run that listed the new hire and saw the
    deletion only in the log kept them stored until the next full sync."""
    age(org)
    during: list[Any] = []
    h = harness({"t1": tenant(emu, tmp_path, poll_system_log=True)}, connector_factory=mid_run(during))
    assert h.sync("t1").status == "succeeded"
    hire = org.hire("Short", "Stay").n
    during.append(lambda: org.delete(hire))  # after the listing returned the hire, before the log is read
    seq = h.last_seq()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert org.people[hire].deleted and not during
    assert user_id(hire) not in h.users("t1")
    assert [c for c in h.changes("t1", after=seq) if user_id(hire) in c] == []  # created and gone in one run


def test_a_group_deleted_during_a_full_walk_is_deleted_not_kept_empty(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """A group listed by a full sync and deleted before its members are read (404 E0000007) is
    gone from Okta: the snapshot deletes it, as an incremental run does, rather than keeping it in
    the store with every member removed until the next full sync."""
    during: list[Any] = []
    after_groups = mid_run(during, when=lambda item: isinstance(item, Page) and bool(item.groups))
    h = harness({"t1": tenant(emu, tmp_path)}, connector_factory=after_groups)
    assert h.sync("t1").status == "succeeded"
    parents = {g for grp in org.listed_groups() for g in grp.subgroups}
    gone = next(g.n for g in org.listed_groups() if g.members and g.n not in parents and not g.subgroups)
    members = {user_id(n) for n in org.transitive_members(gone)}
    assert members <= {u for g, u in h.members("t1") if g == group_id(gone)}
    during.append(lambda: org.delete_group(gone))  # after the group listing, before its members
    seq = h.last_seq()
    r = h.sync("t1", full=True)
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert org.groups[gone].deleted and not during
    assert group_id(gone) not in h.groups("t1")
    assert not {u for g, u in h.members("t1") if g == group_id(gone)}
    assert ("group.deleted", group_id(gone)) in h.changes("t1", after=seq)


def test_system_log_position_is_taken_on_oktas_clock(
    emu: OktaEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose clock runs ahead of Okta's by more than `cursor_holdback` took its System
    Log position after events of the full walk itself: a user the walk had listed and who was
    deleted during it stayed stored until the next full sync."""
    import dirpull.connectors.okta as okta_connector

    monkeypatch.setattr(okta_connector, "_now", lambda: datetime.now(UTC) + timedelta(seconds=600))
    c = connector(tenant(emu, tmp_path, poll_system_log=True))  # default cursor_holdback: 300 s
    stream = c.pull(None, full=True)
    first = next(stream)
    victim = leaf(org, set())
    assert isinstance(first, Page) and user_id(victim) in users_of([first])
    org.delete(victim)  # during the walk, after the user listing read them
    done = [first, *stream][-1]
    assert isinstance(done, Done) and done.cursor
    pages, _ = pull(c, done.cursor)
    assert [u for p in pages for u in p.removed_users] == [user_id(victim)]


def test_system_log_finds_group_deletions_between_full_syncs(emu: OktaEmulator, org: Org, tmp_path: Path) -> None:
    c = connector(tenant(emu, tmp_path, poll_system_log=True))
    _, done = pull(c)
    child, parent = next((c, g.n) for g in org.groups.values() for c in sorted(g.subgroups))
    org.delete_group(child)
    pages, _ = pull(c, done.cursor)
    assert [g for p in pages for g in p.removed_groups] == [group_id(child)]
    # Its members left the parent (Okta groups are flat): the parent is re-listed in full.
    complete = [g for p in pages for g in p.complete_groups]
    assert group_id(parent) in complete and group_id(child) not in complete


def pause_okta(monkeypatch: pytest.MonkeyPatch, days: int) -> None:
    """The tenant is paused for `days`: Okta's clock (its `Date` header too) and ours move on."""
    import dirpull.connectors.okta as okta_connector
    import dirpull.emulators.okta_api as okta_api

    real_time, date_header = time.time, BaseHTTPRequestHandler.date_time_string
    okta_time = SimpleNamespace(time=lambda: real_time() + days * 86400, sleep=time.sleep, monotonic=time.monotonic)
    monkeypatch.setattr(okta_api, "time", okta_time)
    monkeypatch.setattr(
        BaseHTTPRequestHandler,
        "date_time_string",
        lambda self, timestamp=None: date_header(self, okta_time.time() if timestamp is None else timestamp),
    )
    monkeypatch.setattr(okta_connector, "_now", lambda: datetime.now(UTC) + timedelta(days=days))


def test_system_log_position_keeps_its_since_through_a_long_pause(
    emu: OktaEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored polling link's `since` is sent with its `after`: without it Okta takes 7 days
    before now, so a tenant paused for more than a week silently skipped older events, and a
    position older than 180 days (400 E0000053) was never noticed."""

    def log_position(link: str) -> tuple[str | None, str | None]:
        query = parse_qs(urlsplit(link).query)
        return query.get("since", [None])[0], query.get("after", [None])[0]

    c = connector(tenant(emu, tmp_path, poll_system_log=True))
    _, done = pull(c)
    assert done.cursor
    stored_since, stored_after = log_position(done.cursor["log_next"])
    assert stored_since and stored_after
    victim = leaf(org, set())
    org.delete(victim)

    def log_requests(since: int) -> list[dict[str, list[str]]]:
        return [parse_qs(urlsplit(p).query) for _, p in emu.request_log[since:] if p.startswith("/api/v1/logs")]

    # A link stored by an older version, without `since`: followed with `after` only, as before.
    n0 = len(emu.request_log)
    parts = urlsplit(done.cursor["log_next"])
    no_since = parts._replace(query=urlencode([kv for kv in parse_qsl(parts.query) if kv[0] != "since"])).geturl()
    assert log_position(no_since) == (None, stored_after)
    pages, _ = pull(c, {**done.cursor, "log_next": no_since})
    assert [u for p in pages for u in p.removed_users] == [user_id(victim)]
    asked = log_requests(n0)
    assert asked and all("since" not in q for q in asked) and asked[0]["after"] == [stored_after]

    real_time = time.time

    # 8 days: beyond Okta's default `since`, well within the 90 days the log keeps.
    pause_okta(monkeypatch, 8)
    n0 = len(emu.request_log)
    pages, delta = pull(c, done.cursor)
    assert [u for p in pages for u in p.removed_users] == [user_id(victim)] and not delta.notes
    asked = log_requests(n0)
    assert len(asked) == 2  # the page with the deletion, then the (empty) next page
    assert all(q["since"] == [stored_since] for q in asked) and asked[0]["after"] == [stored_after]

    # 181 days: Okta refuses the position (400 E0000053); the next run is a full one, which takes
    # a new position.
    pause_okta(monkeypatch, 181)
    pages, delta = pull(c, done.cursor)
    assert not [u for p in pages for u in p.removed_users]
    assert delta.notes == ["system log position rejected as too old (400 E0000053): the next run is a full sync"]
    assert delta.cursor and delta.cursor["log_next"] is None
    pages, full = pull(c, delta.cursor)
    assert full.snapshot and full.notes == ["system log position missing: full resync"]
    assert user_id(victim) not in users_of(pages)
    assert full.cursor
    new_since, new_after = log_position(full.cursor["log_next"])
    assert new_since and new_after and new_since > Org.iso(real_time() + 180 * 86400)


def test_a_system_log_position_okta_no_longer_accepts_makes_the_next_run_a_full_one(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored position Okta refuses as too old (400 E0000053, a tenant paused for half a year)
    used to restart polling from "now": a user deleted in the gap stayed stored, and active
    downstream, until the next periodic full sync. The next run is a full one now: it lists
    everything, deletes what is gone, and takes a new position that later runs poll from."""

    age(org)
    h = make_harness(harness, emu, tmp_path, poll_system_log=True)
    assert h.sync("t1").status == "succeeded"
    victim = leaf(org, set())
    org.delete(victim)
    real_time = time.time
    pause_okta(monkeypatch, 181)
    seq = h.last_seq()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert "system log position rejected as too old (400 E0000053): the next run is a full sync" in r.notes
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert "system log position missing: full resync" in r.notes
    assert ("user.deleted", user_id(victim)) in h.changes("t1", after=seq)
    assert user_id(victim) not in h.users("t1")
    since = parse_qs(urlsplit(h.store.get_cursor("t1").value["log_next"]).query)["since"][0]
    assert since > Org.iso(real_time() + 180 * 86400)  # a new position, taken at that run's start
    r = h.sync("t1")  # and the next run polls from it again
    assert r.status == "succeeded" and r.mode == "incremental" and not r.notes, (r.error, r.notes)


class RefusesLogPosition(OktaEmulator):
    """Answers a System Log request from one position (`after`) with a 400 that is not E0000053."""

    refuse: str | None = None  # the `after` to refuse, None: serve the log

    def _list_logs(self, req: Any) -> Any:
        if self.refuse and req.arg("after") == self.refuse:
            return okta_error(400, "E0000031", "Invalid search criteria.", ["after: not accepted"])
        return super()._list_logs(req)


def test_a_system_log_400_other_than_e0000053_fails_the_run_and_keeps_the_position(
    harness: Any, org: Org, tmp_path: Path
) -> None:
    """Only 400 E0000053 says the stored position is too old. Any other 400 (E0000031 invalid
    search criteria, E0000001 validation) also moved the position to "now" and the run succeeded:
    every deletion logged since the stored position was skipped until the next full sync."""
    age(org)
    emu = RefusesLogPosition(org)
    emu.start()
    try:
        h = make_harness(harness, emu, tmp_path, poll_system_log=True)
        assert h.sync("t1").status == "succeeded"
        stored = h.store.get_cursor("t1").value
        victim = leaf(org, set())
        org.delete(victim)
        emu.refuse = parse_qs(urlsplit(stored["log_next"]).query)["after"][0]
        r = h.sync("t1")
        assert r.status == "failed" and "E0000031" in (r.error or "") and "position is kept" in (r.error or "")
        assert h.store.get_cursor("t1").value == stored
        assert user_id(victim) in h.users("t1")
        emu.refuse = None  # whatever Okta refused is fixed: the next run finds the deletion
        seq = h.last_seq()
        r = h.sync("t1")
        assert r.status == "succeeded" and r.mode == "incremental", r.error
        assert ("user.deleted", user_id(victim)) in h.changes("t1", after=seq)

        # A position Okta's validation refuses (an `after` it cannot read: 400 E0000001) fails alike.
        parts = urlsplit(stored["log_next"])
        query = [(k, "garbage" if k == "after" else v) for k, v in parse_qsl(parts.query)]
        bad = {**stored, "log_next": parts._replace(query=urlencode(query)).geturl()}
        with pytest.raises(ConnectorError, match=r"E0000001.*position is kept"):
            pull(connector(tenant(emu, tmp_path, poll_system_log=True)), bad)
    finally:
        emu.stop()


# --- records judged one by one, as the SDK's models would ---------------------------------------


class OddRecords(OktaEmulator):
    """Records a real org can hold: some the SDK's models reject, some only look unusual."""

    bad_group: int = -1

    def user_json(self, p: Any) -> dict[str, Any]:
        r = super().user_json(p)
        if p.n == 3:  # other ISO 8601 forms: not the fast check's, fine for the SDK
            r["created"] = r["created"][:19] + "Z"
            r["lastUpdated"] = r["lastUpdated"][:19] + "+00:00"
        elif p.n == 4:
            r["profile"]["firstName"] = "F" * 51  # the SDK allows 50
        elif p.n == 5:
            r["credentials"]["provider"]["type"] = "NOT_A_PROVIDER"
        elif p.n == 6:
            r["profile"]["costCenter"] = 1234  # a number where the SDK wants a string
        elif p.n == 7:
            r["profile"]["badgeNumber"] = 1234  # a custom attribute: anything goes
        return r

    def group_json(self, n: int, gtype: str) -> dict[str, Any]:
        g = super().group_json(n, gtype)
        if n == self.bad_group:
            g["objectClass"] = "not-a-list"
        return g


class ZonelessTimes(OktaEmulator):
    """Prints one user's `lastUpdated` and every group's `lastMembershipUpdated` without a zone
    (`2026-05-05T18:15:44.000`), a form the SDK's models accept."""

    zoneless_user: int = 3

    def user_json(self, p: Any) -> dict[str, Any]:
        r = super().user_json(p)
        if p.n == self.zoneless_user:
            r["lastUpdated"] = r["lastUpdated"].removesuffix("Z")
        return r

    def group_json(self, n: int, gtype: str) -> dict[str, Any]:
        g = super().group_json(n, gtype)
        g["lastMembershipUpdated"] = g["lastMembershipUpdated"].removesuffix("Z")
        return g


def test_timestamps_without_a_zone_are_read_as_utc_not_a_failed_run(
    harness: Any, org: Org, tmp_path: Path
) -> None:
    e = ZonelessTimes(age(org))
    with e:
        h = make_harness(harness, e, tmp_path)
        first = h.sync("t1")
        assert first.status == "succeeded", first.error
        assert user_id(e.zoneless_user) in h.users("t1")
        seq = h.last_seq()
        org.rename(e.zoneless_user, "Zoe", "Zoneless")
        again = h.sync("t1")
        assert again.status == "succeeded", again.error
        assert again.mode == "incremental"
        assert h.users("t1")[user_id(e.zoneless_user)]["first_name"] == "Zoe"
        assert ("user.updated", user_id(e.zoneless_user)) in {c[:2] for c in h.changes("t1", after=seq)}


def test_records_the_sdk_rejects_are_quarantined_one_by_one(org: Org, tmp_path: Path) -> None:
    e = OddRecords(org)
    e.bad_group = bad_group = sorted(g.n for g in org.listed_groups())[1]
    with e:
        pages, _ = pull(connector(tenant(e, tmp_path)))
    users = users_of(pages)
    rejected = {user_id(4), user_id(5), user_id(6)}
    assert set(users) == {user_id(p.n) for p in org.people.values()} - rejected
    assert users[user_id(3)].raw_attributes["created"].endswith("Z")  # the slow path (the SDK) took it
    assert users[user_id(7)].raw_attributes["profile"]["badgeNumber"] == 1234
    bad = {(q.kind, q.idp_id) for p in pages for q in p.quarantined}
    assert bad == {("user", u) for u in rejected} | {("group", group_id(bad_group))}
    assert all(q.reason.startswith("the okta SDK rejects this record: ") for p in pages for q in p.quarantined)
    groups = {g.idp_id for p in pages for g in p.groups}
    assert group_id(bad_group) not in groups and len(groups) == len(list(org.listed_groups())) - 1
    members = {m for p in pages for m in p.members}
    assert any(uid in rejected for _, uid in members)  # a quarantined user keeps its memberships


def test_well_formed_users_never_reach_the_sdk_models(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dirpull.connectors.okta as okta_connector

    asked: list[str] = []
    real = okta_connector._sdk_rejects

    def counting(rec: Any, kind: str) -> str | None:
        asked.append(kind)
        return real(rec, kind)

    monkeypatch.setattr(okta_connector, "_sdk_rejects", counting)
    emu.status_overrides.update({2: "STAGED", 3: "LOCKED_OUT", 4: "PASSWORD_EXPIRED", 5: "PROVISIONED"})
    pages, _ = pull(connector(tenant(emu, tmp_path, include_everyone=True)))
    assert "user" not in asked  # every user record passed the fast check
    assert asked.count("group") == len({g.idp_id for p in pages for g in p.groups})


def test_an_empty_inactive_statuses_leaves_only_suspended_and_deprovisioned_inactive(
    emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """docs/providers/okta.md: remove STAGED from `inactive_statuses` to treat staged users as
    active; SUSPENDED and DEPROVISIONED always are inactive. An empty list kept STAGED inactive."""
    emu.status_overrides.update({2: "STAGED", 3: "SUSPENDED"})
    users = users_of(pull(connector(tenant(emu, tmp_path, inactive_statuses=[])))[0])
    assert users[user_id(2)].state == "active"
    assert users[user_id(3)].state == "inactive"
    assert {u.state for u in users.values() if u.raw_attributes["status"] == "DEPROVISIONED"} <= {"inactive"}


def test_a_member_record_of_a_user_already_taken_is_not_judged_again(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dirpull.connectors.okta as okta_connector

    judged: list[str] = []
    real = okta_connector._user_ok

    def counting(rec: Any) -> bool:
        judged.append(rec["id"])
        return real(rec)

    monkeypatch.setattr(okta_connector, "_user_ok", counting)
    emu.malformed_users.add(8)  # rejected by the users listing: its member records are judged each time
    pages, _ = pull(connector(tenant(emu, tmp_path)))
    members = [m for p in pages for m in p.members]
    listed = {u.idp_id for p in pages for u in p.users}
    assert len(listed) == PEOPLE - 1 and len(members) > len(listed)  # more member records than users
    assert Counter(judged)[user_id(8)] == 1 + sum(u == user_id(8) for _, u in members)
    assert all(n == 1 for uid, n in Counter(judged).items() if uid != user_id(8))  # once, in the listing
    assert {q.idp_id for p in pages for q in p.quarantined} == {user_id(8)}


def _sdk_user_example() -> dict[str, Any]:
    """A user with every part of the SDK's User model present and valid."""
    link = {"href": "https://acme.okta.com/api/v1/users/00u1", "hints": {"allow": ["GET", "POST"]}, "name": "n"}
    from okta.models import UserLinks

    links = {info.alias or name: link for name, info in UserLinks.model_fields.items()}
    return {
        "id": "00u1b2c3d4fakeA",
        "status": "ACTIVE",
        "created": "2024-04-04T15:56:05.000Z",
        "activated": "2024-04-04T16:00:00.000Z",
        "statusChanged": "2024-04-04T16:00:00.000Z",
        "lastLogin": "2026-05-04T19:50:52.000Z",
        "lastUpdated": "2026-05-05T18:15:44.000Z",
        "passwordChanged": "2024-04-04T16:00:22.000Z",
        "transitioningToStatus": "ACTIVE",
        "realmId": "guo1fake",
        "type": {"id": "oty1fakeType"},
        "profile": {
            **{k: "Value" for k in ("city", "costCenter", "department", "displayName", "title", "timezone")},
            "login": "ada@example.com",
            "email": "ada@example.com",
            "secondEmail": "ada2@example.com",
            "firstName": "Ada",
            "lastName": "Lovelace",
            "countryCode": "GB",
            "zipCode": "N1 9GU",
            "mobilePhone": None,
            "costCenterCustom": [1, 2],
        },
        "credentials": {
            "password": {},
            "recovery_question": {"question": "Favourite engine?"},
            "provider": {"type": "OKTA", "name": "OKTA"},
        },
        "_embedded": {"classification": {"type": "STANDARD"}},
        "_links": copy.deepcopy(links),
    }


_PROBES: list[Any] = [
    None, "", "a", "abcd", "abcde", "Zoë Ünïcode-ñame", "x" * 2, "x" * 3, "x" * 50, "x" * 51, "x" * 100,
    "x" * 101, "x" * 128, "x" * 129, "x" * 1024, "x" * 1025, "x" * 4097, "ab\ud800cdef", "\udc00", 0, 1, -1,
    1.5, 2**70, True, False, [], ["GET"], ["GET", "BOGUS"], [None], {}, {"id": "x"}, {"id": 1},
    {"href": "https://x"}, {"href": 1}, {"allow": ["GET"]}, {"allow": "GET"}, {"a": {}}, {"a": 1},
    {"type": "OKTA"}, {"type": "NOPE"}, {"question": 1}, {"value": "secret"}, {"hash": {"algorithm": "BCRYPT"}},
    "ACTIVE", "DEPROVISIONED", "SUSPENDED", "ACTIVATING", "active", "OKTA", "LDAP", "GET",
    "2024-05-01T19:15:32.000Z", "2024-02-29T00:00:00.000Z", "2023-02-29T00:00:00.000Z", "2024-04-31T00:00:00.000Z",
    "2024-04-30T00:00:00.000Z", "2024-13-01T00:00:00.000Z", "0000-01-01T00:00:00.000Z", "0001-01-01T00:00:00.000Z",
    "9999-12-31T23:59:59.999Z", "2024-05-01T24:00:00.000Z", "2024-05-01T23:59:60.000Z", "2024-05-01T19:15:32Z",
    "2024-05-01T19:15:32.000+05:00", "2024-W18-3T19:15:32.000Z", "2024-05-01T19:15:32,000Z",
    "2024-05-01t19:15:32.000Z", "2024-05-01T19:15:32.000z", "2024-05-01 19:15:32.000Z", "2024-05-01T191532.0000Z",
    "\u0662\u0660\u0662\u0664-05-01T19:15:32.000Z", "2024-05-01T19:15:32.00\u0660Z", "1714590932", 1714590932,
]  # fmt: skip


def test_fast_user_check_never_passes_what_the_sdk_rejects() -> None:
    """`_user_ok` may send a good record to the SDK (the slow path), never pass one the SDK rejects:
    every field of the SDK's User model and of the models inside it, found in the installed SDK
    itself, is set to good and bad values and judged by both."""
    from okta.models import User as OktaUser
    from pydantic import BaseModel

    from dirpull.connectors.okta import _sdk_rejects, _user_ok

    base = _sdk_user_example()
    assert _user_ok(base) and _sdk_rejects(base, "user") is None

    def inner_model(annotation: Any) -> type[BaseModel] | None:
        """The model in an annotation such as Optional[List[HttpMethod]] / Optional[UserProfile]."""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        for arg in typing.get_args(annotation):
            found = inner_model(arg)
            if found is not None:
                return found
        return None

    def paths(model: type[BaseModel], prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        for name, info in model.model_fields.items():
            if name == "additional_properties":
                continue
            path = (*prefix, info.alias or name)
            yield path
            sub = inner_model(info.annotation)
            if sub is not None and len(path) < 4:
                yield from paths(sub, path)

    def at(rec: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
        for key in path[:-1]:
            nxt = rec.get(key)
            if not isinstance(nxt, dict):
                nxt = rec[key] = {"href": "https://x"} if key in base["_links"] else {}
            rec = nxt
        return rec

    every = list(paths(OktaUser, ()))
    assert len(every) > 100 and ("profile", "login") in every and ("_links", "self", "hints", "allow") in every
    passed = rejected = 0
    for path in [*every, ("profile", "aCustomAttribute"), ("_links", "aCustomLink"), ("aTopLevelExtra",)]:
        for probe in [*_PROBES, "<deleted>"]:
            rec = copy.deepcopy(base)
            parent = at(rec, path)
            assert parent is not None
            if probe == "<deleted>":
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = probe
            sdk = _sdk_rejects(rec, "user")
            rejected += sdk is not None
            if _user_ok(rec):
                passed += 1
                assert sdk is None, f"{'.'.join(path)} = {probe!r}: the fast check passes what the SDK rejects: {sdk}"
    assert passed > 1000 and rejected > 1000  # both sides were really exercised
    for odd in ([], "x", 1, None, [base]):
        assert not _user_ok(odd)


def test_requests_are_serialized_as_the_sdk_methods_do() -> None:
    """Same method, URL (path, query order, encoding) and headers as the SDK's own list_* calls."""
    from okta.api.group_api import GroupApi
    from okta.api.system_log_api import SystemLogApi
    from okta.api.user_api import UserApi

    from dirpull.connectors.okta import LOG_FILTER, _sdk, _transport_class

    def sdk_side(serializer: Any, api: Any, **kw: Any) -> Any:
        params = {name: None for name in inspect.signature(serializer).parameters if name != "self"}
        return serializer(api, **{**params, **kw})

    filt = 'lastUpdated gt "2026-05-01T00:00:00.000Z" or lastMembershipUpdated gt "2026-05-01T00:00:00.000Z"'
    for auth in ({"authorizationMode": "SSWS", "token": "00tokenvalue"}, {"authorizationMode": "Bearer", "token": "x"}):
        sdk = _sdk("https://acme.okta.com", False, auth, _transport_class())
        cases = [
            (
                sdk_side(UserApi._list_users_serialize, sdk.api, filter=filt, limit=200),
                sdk.serialize("/api/v1/users", [("filter", filt), ("limit", 200)]),
            ),
            (
                sdk_side(UserApi._list_users_serialize, sdk.api, filter=filt, after="00u1x", limit=7),
                sdk.serialize("/api/v1/users", [("filter", filt), ("after", "00u1x"), ("limit", 7)]),
            ),
            (
                sdk_side(GroupApi._list_groups_serialize, sdk.api, limit=200),
                sdk.serialize("/api/v1/groups", [("limit", 200)]),
            ),
            (
                sdk_side(GroupApi._list_groups_serialize, sdk.api, filter=filt, after="00g9", limit=200),
                sdk.serialize("/api/v1/groups", [("filter", filt), ("after", "00g9"), ("limit", 200)]),
            ),
            (
                sdk_side(GroupApi._list_group_users_serialize, sdk.api, group_id="00g 1/é", after="00u2", limit=200),
                sdk.serialize(
                    "/api/v1/groups/{groupId}/users", [("after", "00u2"), ("limit", 200)], {"groupId": "00g 1/é"}
                ),
            ),
            (
                sdk_side(
                    SystemLogApi._list_log_events_serialize,
                    sdk.api,
                    since="2026-05-01T00:00:00.000Z",
                    filter=LOG_FILTER,
                    limit=1000,
                    sort_order="ASCENDING",
                ),
                sdk.serialize(
                    "/api/v1/logs",
                    [
                        ("since", "2026-05-01T00:00:00.000Z"),
                        ("filter", LOG_FILTER),
                        ("limit", 1000),
                        ("sortOrder", "ASCENDING"),
                    ],
                ),
            ),
            (
                sdk_side(
                    SystemLogApi._list_log_events_serialize,
                    sdk.api,
                    since="2026-05-01T00:00:00.000Z",
                    after="1627500044869_1",
                    filter=LOG_FILTER,
                    limit=1000,
                    sort_order="ASCENDING",
                ),
                sdk.serialize(
                    "/api/v1/logs",
                    [
                        ("since", "2026-05-01T00:00:00.000Z"),
                        ("after", "1627500044869_1"),
                        ("filter", LOG_FILTER),
                        ("limit", 1000),
                        ("sortOrder", "ASCENDING"),
                    ],
                ),
            ),
            (
                sdk_side(
                    SystemLogApi._list_log_events_serialize,
                    sdk.api,
                    after="1627500044869_1",
                    filter=LOG_FILTER,
                    limit=1000,
                    sort_order="ASCENDING",
                ),
                sdk.serialize(
                    "/api/v1/logs",
                    [("after", "1627500044869_1"), ("filter", LOG_FILTER), ("limit", 1000), ("sortOrder", "ASCENDING")],
                ),
            ),
        ]
        for theirs, ours in cases:
            assert ours == theirs


def test_a_pull_does_not_import_the_sdk_client(emu: OktaEmulator, tmp_path: Path) -> None:
    """`okta.client` (every API and model of the SDK: two seconds) stays unimported."""
    code = (
        "import json, sys\n"
        "from dirpull.config import OktaTenant\n"
        "from dirpull.connectors.okta import OktaConnector\n"
        "c = OktaConnector('t1', OktaTenant.model_validate(json.loads(sys.argv[1])))\n"
        "items = list(c.pull(None, full=True))\n"
        "print(json.dumps([sum(len(i.users) for i in items[:-1]), sorted(m for m in sys.modules\n"
        "    if m == 'okta.client' or m.startswith('okta.api.'))]))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "NO_PROXY": "127.0.0.1,localhost"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(tenant(emu, tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=root,
        check=True,
    )
    assert json.loads(out.stdout) == [PEOPLE, []]


def test_pages_are_not_formatted_while_pulling(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio.Runner.run (3.11, main thread) formats repr(task), result included, twice per call:
    a Page must never be that result (its repr covers every record of the page)."""
    formatted: list[int] = []
    monkeypatch.setattr(Page, "__repr__", lambda self: formatted.append(1) or "Page(...)")
    pages, _ = pull(connector(tenant(emu, tmp_path)))
    assert pages and formatted == []


# --- sync-level through the store ----------------------------------------------------------------


def make_harness(
    harness: Any, emu: OktaEmulator, tmp_path: Path, sleeps: Sleeps | None = None, **overrides: Any
) -> Any:
    s = sleeps or Sleeps()
    return harness(
        {"t1": tenant(emu, tmp_path, **overrides)},
        connector_factory=lambda name, settings: OktaConnector(name, settings, sleep=s),
    )


def test_sync_initial_then_exact_incremental_events(harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path) -> None:
    h = make_harness(harness, emu, tmp_path)
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert len(h.users("t1")) == PEOPLE
    assert h.sync("t1").events == 0  # unchanged: nothing (lastLogin changes every read)

    seq = h.last_seq()
    g = 3
    joiner = outsider(org, g)
    victim = leaf(org, {joiner})
    victim_groups = {gg.n for gg in org.listed_groups() if victim in org.transitive_members(gg.n)}
    title_p, suspend_p, deact_p = [
        n for n in sorted(org.people) if n not in (1, joiner, victim) and org.people[n].state == "active"
    ][:3]
    org.update_person(title_p, title="Chief Tester")
    org.deactivate(suspend_p, "suspended")
    org.deactivate(deact_p, "terminated")
    org.add_member(g, joiner)
    org.delete(victim)
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    got = sorted(h.changes("t1", after=seq))
    expected = sorted(
        [
            ("user.updated", user_id(title_p), ("job_title", "raw_attributes")),
            ("user.updated", user_id(suspend_p), ("raw_attributes", "state")),
            ("user.updated", user_id(deact_p), ("raw_attributes", "state")),
            ("group.user_added", group_id(g), user_id(joiner)),
        ]
        + [("group.user_removed", group_id(x), user_id(victim)) for x in victim_groups]
    )
    assert got == expected
    assert h.users("t1")[user_id(deact_p)]["raw_attributes"]["status"] == "DEPROVISIONED"
    assert h.users("t1")[user_id(suspend_p)]["state"] == "inactive"
    assert user_id(victim) in h.users("t1")  # deletions are invisible to the incremental lists

    seq = h.last_seq()
    r = h.sync("t1", full=True)  # the periodic reconciliation finds the deleted user
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert h.changes("t1", after=seq) == [("user.deleted", user_id(victim))]
    seq = h.last_seq()
    assert h.sync("t1").status == "succeeded" and h.changes("t1", after=seq) == []


def test_a_renamed_manager_reaches_the_reports_in_an_incremental_sync(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """`profile.manager` is the manager's display name. The emulator rendered it from the
    manager's current name without moving the reports' `lastUpdated`: an incremental sync never
    saw the new name, and every full sync then "corrected" each report."""
    age(org)
    h = make_harness(harness, emu, tmp_path)
    assert h.sync("t1").status == "succeeded"
    boss = next(n for n in sorted(org.people) if n != 1 and any(p.manager == n for p in org.people.values()))
    reports = [user_id(p.n) for p in org.people.values() if p.manager == boss and p.visible]
    org.rename(boss, "Renamed", "Boss")
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    users = h.users("t1")
    assert reports and {users[u]["raw_attributes"]["profile"]["manager"] for u in reports} == {"Renamed Boss"}
    seq = h.last_seq()
    assert h.sync("t1", full=True).status == "succeeded"
    assert h.changes("t1", after=seq) == []


def test_sync_failures_leave_the_store_unchanged(harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path) -> None:
    h = make_harness(harness, emu, tmp_path, max_rate_limit_wait=0.2)
    assert h.sync("t1").status == "succeeded"
    before = (h.users("t1"), h.groups("t1"), h.members("t1"), h.last_seq())
    org.update_person(5, title="Changed")
    emu.faults.update({"error": 10_000, "error_status": 503, "path": "/api/v1/groups"})  # persistent 5xx
    r = h.sync("t1", full=True)
    assert r.status == "failed" and "503" in (r.error or "")
    emu.faults.clear()
    emu.faults.update({"rate_limit": 10_000})  # a 429 storm past the wait cap
    assert h.sync("t1").status == "failed"
    emu.faults.clear()
    emu.stop()  # connection refused
    r = h.sync("t1")
    assert r.status == "failed"
    assert (h.users("t1"), h.groups("t1"), h.members("t1"), h.last_seq()) == before


def test_a_small_tenant_pointed_at_another_org_is_held_not_replaced(harness: Any, tmp_path: Path) -> None:
    """A tenant of 15 people whose org_url (and token) were edited to another org's: the next run
    deleted all 15 and created the other org's people, applied because 15 is under the guard's
    floor (`min_count`, 20): everyone deprovisioned downstream. Now it is held, as an empty
    listing is, and `--force` applies it."""
    ours = Org.generate(people=15, seed=1)
    theirs = Org.generate(people=15, seed=2)
    for n in list(theirs.people):  # other people under other ids
        theirs.delete(n)
    for _ in range(15):
        theirs.hire(manager=None)
    with OktaEmulator(ours) as here, OktaEmulator(theirs) as there:
        h = make_harness(harness, here, tmp_path)
        assert h.sync("t1").status == "succeeded"
        before = (h.users("t1"), h.members("t1"), h.last_seq())
        other = tenant(there, tmp_path)
        moved = make_harness(harness, here, tmp_path, org_url=other["org_url"], api_token=other["api_token"])
        held = moved.sync("t1")
        assert held.status == "held" and held.exit_code == 3, held.error
        assert "would deactivate or delete every one of the 15 active users (0 deactivated, 15 deleted" in held.error
        assert "the tenant's settings changed since its last applied sync" in held.error
        assert (moved.users("t1"), moved.members("t1"), moved.last_seq()) == before
        forced = moved.sync("t1", force=True)
        assert forced.status == "succeeded" and forced.counts["users_deleted"] == 15, forced.error
        assert set(moved.users("t1")) == {user_id(n) for n in theirs.people if theirs.people[n].visible}


def test_sync_quarantines_malformed_record_and_applies_the_rest(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    h = make_harness(harness, emu, tmp_path)
    assert h.sync("t1").status == "succeeded"
    seq = h.last_seq()
    stored = h.users("t1")[user_id(6)]
    org.update_person(6, title="Now unreadable")
    org.update_person(7, title="Readable change")
    emu.malformed_users.add(6)
    r = h.sync("t1", full=True)
    assert r.status == "succeeded", r.error
    assert h.changes("t1", after=seq) == [("user.updated", user_id(7), ("job_title", "raw_attributes"))]
    assert h.users("t1")[user_id(6)] == stored  # left as stored, not deleted
    # Listed once as a user and again in each of its groups' member lists: one record to look at.
    assert r.counts["quarantined"] == 1
    assert [q["idp_id"] for q in h.store.runs("t1", 1)[0]["quarantined"]] == [user_id(6)]


def test_sync_a_group_deleted_upstream_goes_though_a_quarantined_user_is_in_it(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """The quarantined user's membership was kept, and held the deleted group in the store."""
    h = make_harness(harness, emu, tmp_path)
    assert h.sync("t1").status == "succeeded"
    g = next(g.n for g in org.listed_groups() if 6 in org.direct_members(g.n)[0])
    gone = group_id(g)
    members = {u for grp, u in h.members("t1") if grp == gone}
    assert user_id(6) in members
    seq = h.last_seq()
    emu.malformed_users.add(6)
    org.delete_group(g)
    r = h.sync("t1", full=True)
    assert r.status == "succeeded" and r.counts["quarantined"] == 1, r.error
    assert gone not in h.groups("t1") and not any(grp == gone for grp, _ in h.members("t1"))
    changes = h.changes("t1", after=seq)
    assert ("group.deleted", gone) in changes
    assert {c[2] for c in changes if c[:2] == ("group.user_removed", gone)} == members
    assert user_id(6) in h.users("t1")  # the quarantined user itself stays as stored


# --- benchmark (opt-in: OKTA_BENCH=10000 pytest tests/test_okta_connector.py -k bench -s) ------------


def _serve_for_bench(n: int, q: Any, stop: Any) -> None:
    e = OktaEmulator(Org.generate(people=n, seed=1), rate_limit=10**9)
    q.put(e.start())
    stop.wait(600)
    e.stop()


@pytest.mark.skipif(not os.environ.get("OKTA_BENCH"), reason="benchmark: set OKTA_BENCH=<people>")
def test_bench_full_pull() -> None:
    import multiprocessing as mp
    import time

    import okta.request_executor  # noqa: F401  # the SDK's import is not part of the per-user cost

    n = int(os.environ["OKTA_BENCH"])
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve_for_bench, args=(n, q, stop))
    proc.start()
    try:
        url = q.get(timeout=300)
        c = OktaConnector(
            "b",
            OktaTenant.model_validate({"provider": "okta", "org_url": url, "api_token": "00emulator-okta-api-token"}),
        )
        t = time.perf_counter()
        users = members = 0
        for item in c.pull(None, full=True):
            if isinstance(item, Page):
                users, members = users + len(item.users), members + len(item.members)
            else:
                done = item
        dt = time.perf_counter() - t
        print(
            f"\n{n} people: {users} users, {members} memberships, {done.requests} requests, "
            f"{dt:.2f} s, {dt / users * 1e6:.0f} µs/user"
        )
        assert users == n
    finally:
        stop.set()
        proc.join(30)


def oauth_app(emu: OktaEmulator, tmp_path: Path) -> dict[str, Any]:
    """A service app registered with the emulator: its tenant settings (private_key_jwt)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    (tmp_path / "okta.pem").write_text(pem)
    emu.register_oauth_client("0oadirpull", public)
    return {
        "provider": "okta",
        "org_url": emu.base_url,
        "client_id": "0oadirpull",
        "private_key": f"file:{tmp_path / 'okta.pem'}",
    }


@pytest.mark.parametrize("status", [307, 302])
@pytest.mark.parametrize("auth", ["api_token", "oauth"])
def test_an_org_url_redirecting_to_another_host_gets_no_credentials_there(
    emu: OktaEmulator, tmp_path: Path, auth: str, status: int
) -> None:
    # aiohttp drops the Authorization header there, but a 307 sent the token request's form again
    # (a client_assertion the other host could trade for a token), and the other host's 401 read
    # as Okta refusing the api_token at the org URL.
    with redirecting(status) as servers:
        cfg = tenant(emu, tmp_path) if auth == "api_token" else oauth_app(emu, tmp_path)
        cfg["org_url"] = servers.redirector
        with pytest.raises(ConnectorError) as info:
            pull(connector(cfg))
    assert servers.seen == []
    msg = str(info.value)
    path = "/api/v1/users?" if auth == "api_token" else "/oauth2/v1/token"
    assert msg.startswith(f"list users: HTTP {status} from {servers.redirector}{path}")
    assert f"redirects to another host ({servers.foreign}{path}" in msg and "set org_url" in msg
    assert not isinstance(info.value, AuthError) and "check api_token" not in msg


def test_oauth_service_app_private_key_jwt(emu: OktaEmulator, tmp_path: Path) -> None:
    pages, _ = pull(connector(oauth_app(emu, tmp_path)))
    assert len(users_of(pages)) == PEOPLE
    assert ("POST", "/oauth2/v1/token") in emu.request_log


@pytest.mark.parametrize("dpop", [False, True], ids=["bearer", "dpop"])
def test_an_oauth_token_refused_mid_run_is_renewed_and_the_run_goes_on(
    emu: OktaEmulator, org: Org, tmp_path: Path, dpop: bool
) -> None:
    """An access token Okta stops taking during a run (its hour ran out while a request waited out
    rate limits, or it was revoked) is 401 E0000011 on the next call: the run failed there, told
    to check client_id and private_key, where Entra's and Google's get a new token and go on."""
    cfg = {**oauth_app(emu, tmp_path), "backoff_base": 0.01, "dpop": dpop}
    emu.dpop_required = dpop
    emu.faults.update({"expire_auth": 1, "path": "/api/v1/groups"})
    pages, _ = pull(connector(cfg))
    assert len(users_of(pages)) == PEOPLE and {g.idp_id for p in pages for g in p.groups}
    assert [p for _, p in emu.request_log].count("/oauth2/v1/token") == (3 if dpop else 2)  # + the nonce round
    # A token refused again, freshly issued too, is a refusal: the run fails once, not in a loop.
    emu.faults.update({"expire_auth": 3, "path": "/api/v1/groups"})
    with pytest.raises(AuthError, match="list groups: HTTP 401"):
        pull(connector(cfg))
    assert emu.faults.expire_auth == 1


@pytest.mark.parametrize("auth", ["api_token", "oauth"])
def test_refused_credentials_name_the_keys_this_tenant_signs_in_with(
    emu: OktaEmulator, tmp_path: Path, auth: str
) -> None:
    """An OAuth app refused as invalid_client (a client_id or key Okta does not know) was told
    "(check api_token / OAuth app scopes)": an api_token it does not have, and scopes that are no
    part of a refused sign-in."""
    if auth == "api_token":
        cfg = tenant(emu, tmp_path, api_token="00wrong-token")
    else:
        cfg = {**oauth_app(emu, tmp_path), "client_id": "0oaunknown"}
    with pytest.raises(AuthError) as info:
        pull(connector({**cfg, "backoff_base": 0.01}))
    msg = str(info.value)
    assert msg.startswith("list users: HTTP 401 from "), msg
    if auth == "api_token":
        assert msg.endswith(" (check api_token)"), msg
    else:
        assert "invalid_client" in msg and "api_token" not in msg, msg
        hint = " (check client_id, private_key (the app's key pair) and the scopes granted to the app)"
        assert msg.endswith(hint), msg


def test_an_oauth_app_polling_the_system_log_asks_for_its_scope(emu: OktaEmulator, tmp_path: Path) -> None:
    """Before, the default scopes lacked okta.logs.read: with poll_system_log every run of an
    OAuth tenant failed with a 403 on /api/v1/logs, full syncs included."""
    cfg = {**oauth_app(emu, tmp_path), "poll_system_log": True, "backoff_base": 0.01}
    pages, done = pull(connector(cfg))
    assert len(users_of(pages)) == PEOPLE and "log_next" in done.cursor
    assert any(path.startswith("/api/v1/logs") for _, path in emu.request_log)

    # A token without it is refused as Okta refuses one: 403, the other APIs still answer.
    import jwt

    now = int(time.time())
    assertion = jwt.encode(
        {"iss": "0oadirpull", "sub": "0oadirpull", "aud": f"{emu.base_url}/oauth2/v1/token", "iat": now,
         "exp": now + 60, "jti": "t"},
        (tmp_path / "okta.pem").read_text(), algorithm="RS256",
    )  # fmt: skip
    token = requests.post(f"{emu.base_url}/oauth2/v1/token", timeout=10, data={
        "grant_type": "client_credentials", "scope": "okta.users.read okta.groups.read",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }).json()["access_token"]  # fmt: skip
    bearer = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{emu.base_url}/api/v1/users", headers=bearer, timeout=10).status_code == 200
    refused = requests.get(f"{emu.base_url}/api/v1/logs", headers=bearer, timeout=10)
    assert refused.status_code == 403 and refused.json()["errorCode"] == "E0000006"
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]


def test_an_app_that_requires_dpop_fails_saying_so_until_dpop_is_set_then_syncs(
    emu: OktaEmulator, tmp_path: Path
) -> None:
    """An Okta service app with "Require DPoP" answers a plain private_key_jwt token request with
    400 invalid_dpop_proof. Before, that read as a generic token error naming neither cause nor fix,
    and no setting could satisfy it; `dpop = true` now makes the SDK send proofs (RFC 9449)."""
    cfg = {**oauth_app(emu, tmp_path), "backoff_base": 0.01}
    emu.dpop_required = True
    with pytest.raises(AuthError) as err:
        pull(connector(cfg))
    assert str(err.value) == (
        "list users: Okta refused the OAuth token request with a DPoP error (invalid_dpop_proof: The DPoP "
        "proof JWT header is missing.); the Okta app requires DPoP-bound tokens: set dpop = true for this "
        'tenant, or turn off "Require Demonstrating Proof of Possession (DPoP) header in token requests" on '
        "the app in Okta"
    )
    assert not err.value.retriable

    emu.request_log.clear()
    pages, done = pull(connector({**cfg, "dpop": True, "poll_system_log": True}))
    assert len(users_of(pages)) == PEOPLE and "log_next" in done.cursor
    tokens = [p for _, p in emu.request_log if p == "/oauth2/v1/token"]
    assert len(tokens) == 2  # the nonce challenge (use_dpop_nonce), then the token
    assert len(emu._dpop_tokens) == 1  # the APIs took the DPoP-bound token, each call with its own proof

    # The token is bound: as a Bearer token, or with a proof that is not for it, it is refused.
    token = next(iter(emu._dpop_tokens))
    bearer = requests.get(f"{emu.base_url}/api/v1/users", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert bearer.status_code == 401
    no_proof = requests.get(f"{emu.base_url}/api/v1/users", headers={"Authorization": f"DPoP {token}"}, timeout=10)
    assert no_proof.status_code == 401 and 'error="invalid_dpop_proof"' in no_proof.headers["WWW-Authenticate"]


def test_a_dpop_request_retried_after_a_dropped_answer_carries_a_fresh_proof(
    emu: OktaEmulator, tmp_path: Path
) -> None:
    """A DPoP proof is for one request (RFC 9449 §11.1): Okta refuses a replayed `jti`, and a proof's
    `iat` grows stale over a rate-limit wait. Before, a call retried after a connection dropped
    once Okta had read it was resent with its first proof and failed with a 401."""
    cfg = {**oauth_app(emu, tmp_path), "backoff_base": 0.01, "dpop": True}
    emu.dpop_required = True
    emu.faults.update({"drop": 1, "path": "/api/v1/groups"})
    pages, _ = pull(connector(cfg))
    assert len(users_of(pages)) == PEOPLE
    assert sum(1 for _, p in emu.request_log if p.startswith("/api/v1/groups?")) >= 2  # the retry happened


def test_a_dpop_pull_parses_its_proof_key_once_not_for_every_request(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK hands PyJWT its DPoP key as PEM for every proof, which PyJWT parsed again each time,
    checking the 3072-bit key (~95 ms of CPU a request: six minutes of a 100k-user full sync's
    ~4,100 requests). The proofs signed with the key parsed once must still be accepted."""
    import okta.dpop

    real = okta.dpop.jwt_encode
    keys: list[type] = []  # what each proof was signed with

    def recorded(claims: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
        keys.append(type(key))
        return real(claims, key, *args, **kwargs)

    monkeypatch.setattr(okta.dpop, "jwt_encode", recorded)
    cfg = {**oauth_app(emu, tmp_path), "backoff_base": 0.01, "dpop": True, "page_size": 10}
    emu.dpop_required = True
    pages, _ = pull(connector(cfg))
    assert len(users_of(pages)) == PEOPLE  # every proof accepted
    api_calls = sum(1 for _, p in emu.request_log if p.startswith("/api/v1/"))
    assert api_calls >= 10 and len(keys) >= api_calls
    assert not [k for k in keys if issubclass(k, bytes | str)], keys  # none from PEM, parsed again


@pytest.mark.parametrize("dpop", [False, True])
def test_a_token_request_resent_after_a_dropped_answer_carries_a_fresh_client_assertion(
    emu: OktaEmulator, tmp_path: Path, dpop: bool
) -> None:
    """Okta refuses a `client_assertion` whose `jti` it has read once, whatever it answered. Before,
    a token request resent after its answer was cut short carried the same assertion, and the run
    failed with 401 invalid_client "The client_assertion token has already been used." where a
    fresh one succeeds. With DPoP the resend gets a fresh proof as well."""
    cfg = {**oauth_app(emu, tmp_path), "backoff_base": 0.01, "dpop": dpop}
    emu.dpop_required = dpop
    emu.faults.update({"drop": 1, "path": "/oauth2/v1/token"})
    pages, _ = pull(connector(cfg))
    assert len(users_of(pages)) == PEOPLE
    tokens = [p for _, p in emu.request_log if p == "/oauth2/v1/token"]
    assert len(tokens) == (3 if dpop else 2)  # the dropped answer, its resend (then the nonce retry)
    jtis = [jti for client, jti in emu._assertion_jtis if client == "0oadirpull"]
    assert len(jtis) == len(tokens)  # every request a new assertion


def test_full_pull_skips_known_users_whatever_their_login_time_unless_the_mapping_reads_it(
    emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    def digests(cfg: dict[str, Any], stored: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        items = list(connector(cfg).pull(None, full=True, known=lambda i, d: stored.get(i) == d))
        pages = [i for i in items if isinstance(i, Page)]
        return {k: v for p in pages for k, v in p.user_sources.items()}, [u for p in pages for u in p.unchanged_users]

    cfg = tenant(emu, tmp_path)
    first, unchanged = digests(cfg, {})
    assert unchanged == [] and len(first) == sum(1 for p in org.people.values() if p.visible)
    time.sleep(1.1)  # the emulator's lastLogin moves with the clock
    again, unchanged = digests(cfg, first)
    assert again == {} and sorted(unchanged) == sorted(first)

    mapped = tenant(emu, tmp_path, attributes={"last_login": "lastLogin"})
    seen, _ = digests(mapped, {})
    time.sleep(1.1)
    again, unchanged = digests(mapped, seen)
    active = {user_id(p.n) for p in org.people.values() if p.visible and p.state == "active"}
    assert active and active <= set(again) and not (active & set(unchanged))


def test_an_oauth_token_answer_that_is_not_json_fails_naming_the_token_endpoint(
    emu: OktaEmulator, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    (tmp_path / "okta.pem").write_text(pem)
    emu.register_oauth_client("0oadirpull", public)
    cfg = {"provider": "okta", "org_url": emu.base_url, "client_id": "0oadirpull",
           "private_key": f"file:{tmp_path / 'okta.pem'}"}  # fmt: skip
    emu.faults.update({"malformed": 1, "path": "/oauth2/v1/token"})
    pull(connector({**cfg, "backoff_base": 0.01}))  # garbled once: asked for again
    assert emu.faults.malformed == 0
    emu.faults.update({"malformed": 1000, "path": "/oauth2/v1/token"})
    with pytest.raises(ConnectorError) as err:  # not the SDK's bare JSONDecodeError
        pull(connector({**cfg, "backoff_base": 0.01}))
    msg = str(err.value)
    assert msg.startswith(f"list users: the answer from {emu.base_url}/oauth2/v1/token (HTTP 200, "), msg
    assert "is not JSON" in msg and "emu-at-" not in msg  # the cut answer's access token is not quoted
    # A key the SDK cannot sign with fails before any request, as a configuration error.
    (tmp_path / "okta.pem").write_text("-----BEGIN PRIVATE KEY-----\nMIIBnotakey\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigurationError) as err:
        pull(connector(cfg))
    assert str(err.value).startswith("list users: the okta SDK cannot use the credentials (")
    assert str(err.value).endswith("; check client_id and private_key") and "MIIBnotakey" not in str(err.value)


@pytest.mark.parametrize("jwk", ["public", "without_primes"])
def test_a_jwk_private_key_the_sdk_cannot_sign_with_fails_as_a_configuration_error(
    emu: OktaEmulator, tmp_path: Path, jwk: str
) -> None:
    """The public JWK Okta's console shows beside an app's key pair, given as private_key (or a JWK
    missing private members): an unexpected error with a traceback, `InvalidJWKType: Unknown type
    "No private key available"` or `TypeError: object of type 'NoneType' has no len()`."""
    from jwcrypto.jwk import JWK

    key = JWK.generate(kty="RSA", size=2048)
    members = json.loads(key.export_private())
    if jwk == "public":
        given = key.export_public()
    else:
        given = json.dumps({k: v for k, v in members.items() if k not in ("p", "q", "dp", "dq", "qi")})
    (tmp_path / "okta.jwk").write_text(given)
    cfg = {"provider": "okta", "org_url": emu.base_url, "client_id": "0oadirpull",
           "private_key": f"file:{tmp_path / 'okta.jwk'}"}  # fmt: skip
    with pytest.raises(ConfigurationError) as err:
        pull(connector(cfg))
    msg = str(err.value)
    assert msg.startswith("list users: the okta SDK cannot use the credentials ("), msg
    assert msg.endswith("check client_id and private_key: the app's private key, as PEM or as a JWK with its "
                        "private members (d, p, q, dp, dq, qi), not its public key"), msg  # fmt: skip
    assert members["n"][:20] not in msg and members["d"][:20] not in msg
    assert emu.request_log == []  # refused before any request


def test_an_api_token_no_header_can_hold_fails_as_a_configuration_error(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OKTA_TOKEN", "00first-line\n00second-line")  # a token file with two lines
    with pytest.raises(ConfigurationError) as err:  # not a bare ValueError with a traceback
        pull(connector(tenant(emu, tmp_path, api_token="env:OKTA_TOKEN")))
    msg = str(err.value)
    assert msg.startswith("list users: the okta SDK cannot use the credentials (") and msg.endswith("check api_token")
    assert "00first-line" not in msg and "00second-line" not in msg


def test_a_dpop_tenant_keeps_its_proof_key_from_run_to_run_of_a_process(
    emu: OktaEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run made the SDK a new client, which generated a new RSA-3072 key pair: 0.2-3 s of CPU
    a run, more than an incremental run's whole work (the daemon's runs every few minutes). A
    tenant's runs now share one key, as one long-lived SDK client would, and every proof signed
    with it is accepted; another tenant has its own."""
    import okta.dpop

    real = okta.dpop.RSA.generate
    generated: list[Any] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        generated.append(real(*args, **kwargs))
        return generated[-1]

    monkeypatch.setattr(okta.dpop.RSA, "generate", counted)
    emu.dpop_required = True
    cfg = {**oauth_app(emu, tmp_path), "backoff_base": 0.01, "dpop": True}
    runs = [pull(connector(cfg)) for _ in range(3)]
    assert [len(users_of(pages)) for pages, _ in runs] == [PEOPLE] * 3  # every proof accepted
    assert len(generated) == 1
    assert len(emu._dpop_tokens) == 3  # a new token each run, bound to the one key
    pages, _ = pull(OktaConnector("t2", OktaTenant.model_validate(cfg), sleep=Sleeps()))
    assert len(users_of(pages)) == PEOPLE and len(generated) == 2


def test_a_cursor_stored_before_a_setting_was_added_keeps_its_next_run_incremental(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """An Okta tenant last synced by a dirpull from before `dpop` existed, then upgraded: that
    dirpull digested every setting it had into the cursor. The upgraded one digested `dpop = false`
    too, so the operator's untouched settings read as changed: the next run was a full walk of the
    org (Okta's rate limits) noted "the tenant's settings changed since the last sync", and a held
    run blamed the operator's edit."""
    from dirpull.jsoncodec import canonical
    from dirpull.model import digest
    from dirpull.storage import schema

    h = make_harness(harness, emu, tmp_path)
    assert h.sync("t1").mode == "full"
    settings = h.config.tenants["t1"]
    every = settings.model_dump(mode="json")
    scheduling = {"schedule", "full_sync_every", "guard", "enabled"}
    # Nor had it `max_run_time`, added later still.
    older = {k: v for k, v in every.items() if k not in scheduling and k not in ("dpop", "max_run_time")}
    for stored in (older, {**older, "dpop": False}):  # the older dirpull's, the previous release's
        cursor = {**h.store.get_cursor("t1").value, "dirpull_settings": digest(canonical(stored))}
        with h.store.engine.begin() as conn:
            conn.execute(schema.cursors.update().values(value=cursor))
        seq = h.last_seq()
        title_p = next(n for n in sorted(org.people) if org.people[n].state == "active")
        org.update_person(title_p, title=f"Title {len(stored)}")
        r = h.sync("t1")
        assert r.status == "succeeded" and r.mode == "incremental", (r.error, r.notes)
        assert not any("settings changed" in n for n in r.notes), r.notes
        assert h.changes("t1", after=seq) == [("user.updated", user_id(title_p), ("job_title", "raw_attributes"))]
    # A setting the operator does change still makes the next run a full one.
    r = make_harness(harness, emu, tmp_path, include_everyone=True).sync("t1")
    assert r.mode == "full" and "the tenant's settings changed since the last sync: full sync" in r.notes


def test_a_cursor_stored_while_transport_settings_were_pinned_keeps_its_next_run_incremental(
    harness: Any, emu: OktaEmulator, org: Org, tmp_path: Path
) -> None:
    """A tenant with a raised request_timeout and a smaller page_size, last synced by the dirpull
    that digested every setting with such transport settings pinned to their defaults, then
    upgraded: its digest matched neither the new one nor the older ones, so the next run was a
    full walk of the org noted "the tenant's settings changed since the last sync"."""
    from dirpull.jsoncodec import canonical
    from dirpull.model import digest
    from dirpull.storage import schema

    h = make_harness(harness, emu, tmp_path, request_timeout=90.0, page_size=50)
    assert h.sync("t1").mode == "full"
    settings = h.config.tenants["t1"]
    fields = type(settings).model_fields
    transport = {"timeout", "request_timeout", "max_retry_attempts", "max_retry_wait", "max_rate_limit_wait",
                 "rate_limit_reserve", "backoff_base", "page_size", "batch_size", "member_workers"}  # fmt: skip
    pinned = {
        k: (fields[k].default if k in transport else v)
        for k, v in settings.model_dump(mode="json").items()
        if k not in {"schedule", "full_sync_every", "guard", "enabled", "max_run_time"}  # that release had none
    }
    cursor = {**h.store.get_cursor("t1").value, "dirpull_settings": digest(canonical(pinned))}
    with h.store.engine.begin() as conn:
        conn.execute(schema.cursors.update().values(value=cursor))
    seq = h.last_seq()
    title_p = next(n for n in sorted(org.people) if org.people[n].state == "active")
    org.update_person(title_p, title="Title pinned")
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", (r.error, r.notes)
    assert not any("settings changed" in n for n in r.notes), r.notes
    assert h.changes("t1", after=seq) == [("user.updated", user_id(title_p), ("job_title", "raw_attributes"))]
