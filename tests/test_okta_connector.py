"""The Okta connector through the official okta SDK against the Okta emulator over loopback HTTP:
connector-level pulls and sync-level runs through the real store (tests/harness.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dirpull.config import ConfigError, OktaTenant, parse_config
from dirpull.connectors.base import ConfigurationError, ConnectorError, Done, Page
from dirpull.connectors.okta import OktaConnector, check_org_url
from dirpull.emulators.okta_api import OktaEmulator, group_id, user_id
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
    from dirpull.connectors.okta import _client

    with pytest.raises(ValueError, match="https"):
        _client("http://127.0.0.1:9", False, {"authorizationMode": "SSWS", "token": "t"}, lambda cfg: None)


def test_settings_never_show_the_token(emu: OktaEmulator, tmp_path: Path) -> None:
    c = connector(tenant(emu, tmp_path))
    assert emu.api_token not in repr(c) and emu.api_token not in repr(c.settings)


# --- connector-level ----------------------------------------------------------------------------


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
    c = connector(tenant(emu, tmp_path, cursor_holdback=0))
    _, done = pull(c)
    org.update_person(9, title="Chief Tester")
    pages, delta = pull(c, done.cursor)
    assert not delta.snapshot and delta.mode == "incremental"
    assert set(users_of(pages)) == {user_id(9)}
    assert delta.cursor["users_since"] > done.cursor["users_since"]  # type: ignore[index]
    # The default holdback keeps the cursor 5 minutes behind: the same change is re-read (duplicates
    # are harmless: the diff sees nothing new).
    c2 = connector(tenant(emu, tmp_path))
    _, d2 = pull(c2)
    pages2, _ = pull(c2, d2.cursor)
    assert len(users_of(pages2)) == PEOPLE


def test_429_storm_with_reset_headers(emu: OktaEmulator, tmp_path: Path) -> None:
    sleeps = Sleeps()
    emu.faults.update({"rate_limit": 4, "path": "/api/v1/users"})
    pages, done = pull(connector(tenant(emu, tmp_path), sleeps))
    assert len(users_of(pages)) == PEOPLE
    assert len(sleeps.calls) == 4 and all(s <= 1.1 for s in sleeps.calls)  # waited for X-Rate-Limit-Reset
    assert done.requests == 4 + 1 + 1 + len({g.idp_id for p in pages for g in p.groups})


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


def test_connection_refused_fails(org: Org, tmp_path: Path) -> None:
    e = OktaEmulator(org)
    e.start()
    cfg = tenant(e, tmp_path)
    e.stop()
    sleeps = Sleeps()
    with pytest.raises(ConnectorError, match="attempts"):
        pull(connector(cfg, sleeps))
    assert len(sleeps.calls) == 5


def test_malformed_user_is_quarantined_alone(emu: OktaEmulator, tmp_path: Path) -> None:
    emu.malformed_users.add(8)
    pages, _ = pull(connector(tenant(emu, tmp_path)))
    users = users_of(pages)
    assert len(users) == PEOPLE - 1 and user_id(8) not in users
    bad = [q for p in pages for q in p.quarantined]
    assert {q.idp_id for q in bad} == {user_id(8)} and "SDK rejects" in bad[0].reason
    # Still a member of its groups: a quarantined record is never counted as gone.
    assert any(m[1] == user_id(8) for p in pages for m in p.members)


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

    import okta.client  # noqa: F401  # the 2 s import is not part of the per-user cost

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


def test_oauth_service_app_private_key_jwt(emu: OktaEmulator, tmp_path: Path) -> None:
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
    cfg = {
        "provider": "okta",
        "org_url": emu.base_url,
        "client_id": "0oadirpull",
        "private_key": f"file:{tmp_path / 'okta.pem'}",
    }
    pages, _ = pull(connector(cfg))
    assert len(users_of(pages)) == PEOPLE
    assert ("POST", "/oauth2/v1/token") in emu.request_log
