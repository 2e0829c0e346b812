"""The Okta emulator against directory-apis.md §3 / §6 rule 3, over raw HTTP and through the official
okta SDK (proves the wire format is readable by Okta's own client)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from dirpull.emulators.okta_api import API_TOKEN, OktaEmulator, group_id, user_id
from dirpull.emulators.org import Org

AUTH = {"Authorization": f"SSWS {API_TOKEN}"}


@pytest.fixture
def org() -> Org:
    return Org.generate(people=450, seed=3)


@pytest.fixture
def emu(org: Org) -> Iterator[OktaEmulator]:
    with OktaEmulator(org) as e:
        yield e


def get(e: OktaEmulator, path: str, **params: Any) -> requests.Response:
    return requests.get(e.base_url + path, params=params, headers=AUTH, timeout=10)


def walk(e: OktaEmulator, path: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Follow Link rel="next" to the end: (records, pages)."""
    out: list[dict[str, Any]] = []
    url: str | None = e.base_url + path
    pages = 0
    while url and pages < 100:
        r = requests.get(url, params=params if pages == 0 else None, headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        out += r.json()
        pages += 1
        url = r.links.get("next", {}).get("url")
    return out, pages


def deprovisioned(org: Org) -> set[str]:
    return {user_id(p.n) for p in org.people.values() if p.state == "inactive" and p.inactive_reason != "suspended"}


# --- raw HTTP ---------------------------------------------------------------------------------------


def test_link_paging_limits_and_self_then_next(emu: OktaEmulator, org: Org) -> None:
    r = get(emu, "/api/v1/users", limit=500)
    assert len(r.json()) == 200  # limit is capped at 200
    links = [v for k, v in r.raw.headers.items() if k.lower() == "link"]
    assert links[0].endswith('rel="self"') and links[-1].endswith('rel="next"')
    default = get(emu, "/api/v1/users")
    assert len(default.json()) == 200  # default 200
    users, pages = walk(emu, "/api/v1/users", limit=100)
    assert pages == 5
    ids = [u["id"] for u in users]
    assert len(ids) == len(set(ids))


def test_q_is_a_prefix_lookup_without_paging_that_hides_deprovisioned(emu: OktaEmulator, org: Org) -> None:
    # `q` is no listing: 10 results unless `limit` says otherwise, never a next page, and like the
    # plain list it leaves DEPROVISIONED users out. An emulator that ignored it answered every user.
    given = Counter(p.given for p in org.listed_people()).most_common(1)[0][0]
    matching = {user_id(p.n) for p in org.listed_people()
                if any(v and v.lower().startswith(given.lower()) for v in (p.given, p.family, p.email))}  # fmt: skip
    assert len(matching) > 10
    first = get(emu, "/api/v1/users", q=given)
    assert first.status_code == 200 and len(first.json()) == 10 and "next" not in first.links
    assert {u["id"] for u in first.json()} <= matching
    wide = get(emu, "/api/v1/users", q=given, limit=200)
    assert {u["id"] for u in wide.json()} == matching - deprovisioned(org) and "next" not in wide.links
    groups = get(emu, "/api/v1/groups", q="every").json()
    assert [g["profile"]["name"] for g in groups] == ["Everyone"]


def test_plain_list_hides_deprovisioned_filter_and_search_show_them(emu: OktaEmulator, org: Org) -> None:
    gone = deprovisioned(org)
    assert gone
    plain = {u["id"] for u in walk(emu, "/api/v1/users")[0]}
    assert not plain & gone
    filtered = walk(emu, "/api/v1/users", filter='status eq "DEPROVISIONED"')[0]
    assert {u["id"] for u in filtered} == gone
    searched = {u["id"] for u in walk(emu, "/api/v1/users", search='status eq "DEPROVISIONED"')[0]}
    assert searched == gone
    everyone = {u["id"] for u in walk(emu, "/api/v1/users", filter='lastUpdated gt "2000-01-01T00:00:00.000Z"')[0]}
    assert everyone == plain | gone and len(everyone) == 450


def test_filter_last_updated_and_bad_filter(emu: OktaEmulator, org: Org) -> None:
    time.sleep(0.01)
    mark = Org.iso(time.time())
    time.sleep(0.01)
    org.update_person(10, title="CTO")
    org.deactivate(11)
    got = walk(emu, "/api/v1/users", filter=f'lastUpdated gt "{mark}"')[0]
    assert {u["id"]: u["status"] for u in got} == {user_id(10): "ACTIVE", user_id(11): "DEPROVISIONED"}
    both = walk(emu, "/api/v1/users", filter=f'lastUpdated gt "{mark}" and status eq "ACTIVE"')[0]
    assert [u["id"] for u in both] == [user_id(10)]
    for bad in ('title eq "CTO"', 'status gt "A"', "lastUpdated gt 5", 'profile.login sw "a"'):
        r = get(emu, "/api/v1/users", filter=bad)
        assert r.status_code == 400 and r.json()["errorCode"] == "E0000053", bad


def test_last_updated_bounds_hold_to_the_millisecond_for_a_manager_rename_and_under_or(
    emu: OktaEmulator, org: Org
) -> None:
    """The listing passes over whoever surely changed before a `lastUpdated gt/ge` bound without
    running the filter on them: a record stamped at the bound's very millisecond, or moved past it
    only by its manager's rename, is still judged, and under `or` the bound rules out nobody."""
    at = float(int(time.time()) + 3600)  # later than every generated stamp
    with org.clock_at(at - 7200):
        org.deactivate(13, "suspended")
    with org.clock_at(at):
        org.update_person(10, title="Edited")
    managers = {p.manager for p in org.people.values()}
    skip = {1, 10, 13, org.people[10].manager, org.people[13].manager}
    boss = next(n for n in sorted(org.people) if n not in skip and n in managers)
    reports = {user_id(p.n) for p in org.people.values() if p.manager == boss and p.visible}
    with org.clock_at(at + 1):
        org.rename(boss, "Renamed", "Boss")

    def ids(filt: str) -> set[str]:
        return {u["id"] for u in walk(emu, "/api/v1/users", filter=filt)[0]}

    later = {user_id(boss)} | reports
    assert reports and user_id(10) not in reports
    assert ids(f'lastUpdated gt "{Org.iso(at)}"') == later
    assert ids(f'lastUpdated ge "{Org.iso(at)}"') == later | {user_id(10)}
    assert ids(f'lastUpdated gt "{Org.iso(at - 0.001)}"') == later | {user_id(10)}
    assert ids(f'lastUpdated gt "{Org.iso(at + 1)}"') == set()
    either = ids(f'lastUpdated gt "{Org.iso(at + 1)}" or status eq "SUSPENDED"')
    assert user_id(13) in either and either == {user_id(p.n) for p in org.people.values()
                                                if p.visible and emu.status_of(p) == "SUSPENDED"}  # fmt: skip
    searched = {u["id"] for u in walk(emu, "/api/v1/users", search=f'lastUpdated ge "{Org.iso(at)}"')[0]}
    assert searched == later | {user_id(10)}


def test_deleted_user_vanishes_and_statuses(emu: OktaEmulator, org: Org) -> None:
    org.delete(12)
    assert get(emu, f"/api/v1/users/{user_id(12)}").json()["errorCode"] == "E0000007"
    assert get(emu, f"/api/v1/users/{user_id(12)}").status_code == 404
    all_ids = {u["id"] for u in walk(emu, "/api/v1/users", search='lastUpdated gt "2000-01-01T00:00:00.000Z"')[0]}
    assert user_id(12) not in all_ids
    org.deactivate(13, "suspended")
    emu.status_overrides[14] = "LOCKED_OUT"
    assert get(emu, f"/api/v1/users/{user_id(13)}").json()["status"] == "SUSPENDED"
    rec = get(emu, f"/api/v1/users/{user_id(14)}").json()
    assert rec["status"] == "LOCKED_OUT"
    assert {"login", "email", "firstName", "lastName", "displayName", "employeeNumber"} <= set(rec["profile"])
    assert rec["profile"]["managerId"] == user_id(org.people[14].manager)  # type: ignore[arg-type]


def test_groups_types_members_and_404(emu: OktaEmulator, org: Org) -> None:
    groups = get(emu, "/api/v1/groups").json()
    types = {g["type"] for g in groups}
    assert types == {"BUILT_IN", "OKTA_GROUP", "APP_GROUP"}
    assert [g["profile"]["name"] for g in groups if g["type"] == "BUILT_IN"] == ["Everyone"]
    okta_only = get(emu, "/api/v1/groups", filter='type eq "OKTA_GROUP"').json()
    assert {g["type"] for g in okta_only} == {"OKTA_GROUP"}
    # Nested Org groups are served flattened; the default member page is 1000.
    nested = next(g for g in org.groups.values() if g.subgroups)
    members = get(emu, f"/api/v1/groups/{group_id(nested.n)}/users").json()
    assert {u["id"] for u in members} == {user_id(n) for n in org.transitive_members(nested.n)}
    assert "profile" in members[0]
    everyone = get(emu, f"/api/v1/groups/{group_id(0)}/users").json()
    assert len(everyone) == 450
    r = get(emu, "/api/v1/groups/00gnosuchgroup/users")
    assert r.status_code == 404 and r.json()["errorCode"] == "E0000007"
    # Membership changes bump lastMembershipUpdated (and a parent's, for a nested child).
    before = get(emu, f"/api/v1/groups/{group_id(3)}").json()["lastMembershipUpdated"]
    time.sleep(0.01)
    newcomer = next(n for n in sorted(org.people) if n not in org.transitive_members(3))
    org.add_member(3, newcomer)
    after = get(emu, f"/api/v1/groups/{group_id(3)}").json()
    assert after["lastMembershipUpdated"] > before
    got = get(emu, "/api/v1/groups", filter=f'lastMembershipUpdated gt "{before}"').json()
    assert group_id(3) in {g["id"] for g in got}


def test_rate_limit_headers_window_and_429(org: Org) -> None:
    e = OktaEmulator(org, rate_limit=3, rate_window=0.5)
    e.start()
    try:
        statuses = []
        for path in ("/api/v1/users", "/api/v1/users?limit=2", "/api/v1/users/nope", "/api/v1/users"):
            r = requests.get(e.base_url + path, headers=AUTH, timeout=10)
            statuses.append(r.status_code)
            names = ("X-Rate-Limit-Limit", "X-Rate-Limit-Remaining", "X-Rate-Limit-Reset", "Date")
            assert all(h in r.headers for h in names)  # any case
        assert statuses == [200, 200, 404, 429]
        assert r.json()["errorCode"] == "E0000047" and r.headers["X-Rate-Limit-Remaining"] == "0"
        assert int(r.headers["X-Rate-Limit-Reset"]) >= int(time.time())
        # Unauthorized requests carry the headers too.
        bad = requests.get(e.base_url + "/api/v1/groups", headers={"Authorization": "SSWS nope"}, timeout=10)
        assert bad.status_code == 401 and bad.json()["errorCode"] == "E0000011"
        assert "X-Rate-Limit-Remaining" in bad.headers
        time.sleep(0.6)
        assert requests.get(e.base_url + "/api/v1/users", headers=AUTH, timeout=10).status_code == 200
        # Faulted 429s, with and without the headers.
        e.faults.update({"rate_limit": 2})
        e.rate_limit_headers = False
        r = requests.get(e.base_url + "/api/v1/users", headers=AUTH, timeout=10)
        assert r.status_code == 429 and "X-Rate-Limit-Reset" not in r.headers and "Date" in r.headers
        e.rate_limit_headers = True
        r = requests.get(e.base_url + "/api/v1/users", headers=AUTH, timeout=10)
        assert r.status_code == 429 and "X-Rate-Limit-Reset" in r.headers
    finally:
        e.stop()


def test_system_log_polling_never_ends(emu: OktaEmulator, org: Org) -> None:
    first = get(emu, "/api/v1/logs")
    assert first.status_code == 200 and first.json() == [] and "next" in first.links
    org.deactivate(20)
    org.delete(21)
    newcomer = next(n for n in sorted(org.people) if n not in org.groups[2].members and org.people[n].visible)
    org.add_member(2, newcomer)
    r = requests.get(first.links["next"]["url"], headers=AUTH, timeout=10)
    types = [ev["eventType"] for ev in r.json()]
    assert "user.lifecycle.deactivate" in types and "user.lifecycle.delete.completed" in types
    assert "group.user_membership.add" in types
    add = next(ev for ev in r.json() if ev["eventType"] == "group.user_membership.add")
    assert {t["type"] for t in add["target"]} == {"User", "UserGroup"}
    again = requests.get(r.links["next"]["url"], headers=AUTH, timeout=10)
    assert again.json() == [] and "next" in again.links  # polling: always a next link
    only = get(emu, "/api/v1/logs", filter='eventType sw "user.lifecycle.delete"').json()
    assert {ev["eventType"] for ev in only} == {
        "user.lifecycle.delete.initiated",
        "user.lifecycle.delete.completed",
    }
    bounded = get(emu, "/api/v1/logs", since="2020-01-01T00:00:00Z", until=Org.iso(time.time() + 60))
    assert bounded.status_code == 400  # since older than 180 days


def test_system_log_polling_filters_by_persistence_time_bounded_by_published(emu: OktaEmulator, org: Org) -> None:
    """A polling request (no `until`) filters by when Okta stored an event, so an event stored
    late is still returned after a `since` later than its `published`; a bounded request filters
    by `published` (directory-apis.md §3.1 System Log)."""
    since = time.time() - 60
    late = org.deactivate(20)
    late.updated_at = since - 3600  # published an hour before `since`, stored only now
    polled = get(emu, "/api/v1/logs", since=Org.iso(since)).json()
    assert [(ev["eventType"], ev["published"]) for ev in polled] == [
        ("user.lifecycle.deactivate", Org.iso(since - 3600))
    ]
    bounded = get(emu, "/api/v1/logs", since=Org.iso(since), until=Org.iso(time.time() + 60))
    assert bounded.status_code == 200 and bounded.json() == []
    assert get(emu, "/api/v1/logs", since=Org.iso(time.time() + 60)).json() == []  # stored before it


def test_system_log_logs_group_deletions_after_the_membership_removals(org: Org) -> None:
    child, parent = next((c, g.n) for g in org.groups.values() for c in sorted(g.subgroups))
    assert org.transitive_members(child)
    before = next(n for n in sorted(org.groups) if n not in (child, parent) and child not in org.groups[n].subgroups)
    org.delete_group(before)  # deleted before the emulator exists: not logged (as with people)
    with OktaEmulator(org) as e:
        first = get(e, "/api/v1/logs")
        assert first.status_code == 200 and first.json() == []
        org.delete_group(child)  # also removes its (flattened) members from the parent
        r = requests.get(first.links["next"]["url"], headers=AUTH, timeout=10)
        events = r.json()
        kinds = [ev["eventType"] for ev in events]
        assert kinds.count("group.lifecycle.delete") == 1 and kinds[-1] == "group.lifecycle.delete"
        removals = [ev for ev in events if ev["eventType"] == "group.user_membership.remove"]
        assert len(removals) == len(org.transitive_members(child))  # all of them before the deletion
        parent_target = next(t for t in removals[0]["target"] if t["type"] == "UserGroup")
        assert parent_target["id"] == group_id(parent)
        deletion = events[-1]
        assert deletion["target"] == [
            {
                "id": group_id(child),
                "type": "UserGroup",
                "alternateId": "unknown",
                "displayName": org.groups[child].name,
            }
        ]
        assert deletion["target"][0].keys() == parent_target.keys()  # shaped like the membership events' group
        assert deletion["published"] == Org.iso(org.groups[child].updated_at)
        again = requests.get(r.links["next"]["url"], headers=AUTH, timeout=10)
        assert again.json() == []  # logged once
        every = get(e, "/api/v1/logs", filter='eventType eq "group.lifecycle.delete"').json()
        assert [ev["target"][0]["id"] for ev in every] == [group_id(child)]


def test_auth_forms(emu: OktaEmulator) -> None:
    for header in (f"SSWS {API_TOKEN}", f"SSWS{API_TOKEN}"):
        assert requests.get(emu.base_url + "/api/v1/groups", headers={"Authorization": header}, timeout=10).ok
    r = requests.get(emu.base_url + "/api/v1/groups", timeout=10)
    assert r.status_code == 401 and r.json()["errorCode"] == "E0000011"


# --- through the okta SDK -------------------------------------------------------------------------


def sdk_client(e: OktaEmulator) -> Any:
    from dirpull.connectors.okta import Throttle, _client, _transport_class

    def transport(cfg: dict[str, Any]) -> Any:
        t = _transport_class()(cfg)
        t.throttle, t.requests, t.last = Throttle(), 0, None
        return t

    return _client(e.base_url, True, {"authorizationMode": "SSWS", "token": API_TOKEN}, transport)


def test_sdk_reads_pages_statuses_groups_and_logs(emu: OktaEmulator, org: Org) -> None:
    from okta.pagination import PaginationHelper

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with sdk_client(emu) as client:
            for name, kw in (
                ("plain", {}),
                ("filter", {"filter": 'lastUpdated gt "2000-01-01T00:00:00.000Z"'}),
                ("search", {"search": 'status eq "DEPROVISIONED"'}),
            ):
                ids, after, pages = [], None, 0
                while pages < 20:
                    page, resp, err = await client.list_users(limit=200, after=after, **kw)
                    assert err is None, err
                    # A plain dict, its keys as Okta wrote them (lower-case).
                    assert {"x-rate-limit-limit", "x-rate-limit-remaining", "x-rate-limit-reset"} <= set(resp.headers)
                    ids += [u.id for u in page]
                    pages += 1
                    after = PaginationHelper.extract_next_cursor(resp.headers)
                    if not after:
                        break
                out[name] = (ids, pages)
            groups, _, err = await client.list_groups()
            assert err is None
            out["groups"] = {g.type.value for g in groups}
            members, _, err = await client.list_group_users(groups[1].id, limit=10)
            assert err is None and len(members) == 10
            events, resp, err = await client.list_log_events()
            assert err is None and events == [] and 'rel="next"' in resp.headers["Link"]
        return out

    out = asyncio.run(main())
    gone = deprovisioned(org)
    assert len(out["plain"][0]) == 450 - len(gone) and out["plain"][1] == 3
    assert len(out["filter"][0]) == 450 and not set(out["plain"][0]) & gone
    assert set(out["search"][0]) == gone
    assert out["groups"] == {"BUILT_IN", "OKTA_GROUP", "APP_GROUP"}


def test_sdk_rejects_malformed_user_page(emu: OktaEmulator) -> None:
    from pydantic import ValidationError

    emu.malformed_users.add(5)

    async def main() -> None:
        async with sdk_client(emu) as client:
            await client.list_users(limit=10)

    with pytest.raises(ValidationError):
        asyncio.run(main())


def oauth_client(e: OktaEmulator, client_id: str) -> str:
    """Register a service app with a new RSA key on the emulator; its private key, PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    e.register_oauth_client(client_id, public.decode())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def test_dpop_required_refuses_what_rfc_9449_refuses(emu: OktaEmulator) -> None:
    """`dpop_required`: the token endpoint wants a proof with its nonce; the token it then issues is
    good only as `DPoP <token>` with a fresh proof of the same key, bound to that token."""
    import jwt
    from okta.dpop import DPoPProofGenerator

    pem = oauth_client(emu, "0oadpop")
    emu.dpop_required = True
    url = f"{emu.base_url}/oauth2/v1/token"

    def form() -> dict[str, str]:
        now = int(time.time())
        claims = {"iss": "0oadpop", "sub": "0oadpop", "aud": url, "iat": now, "exp": now + 60,
                  "jti": secrets.token_hex(8)}  # fmt: skip
        return {"grant_type": "client_credentials", "scope": "okta.users.read",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": jwt.encode(claims, pem, algorithm="RS256")}  # fmt: skip

    missing = requests.post(url, data=form(), timeout=10)
    assert missing.status_code == 400 and missing.json() == {
        "error": "invalid_dpop_proof", "error_description": "The DPoP proof JWT header is missing."}  # fmt: skip
    dpop = DPoPProofGenerator({})
    challenge = requests.post(url, data=form(), headers={"DPoP": dpop.generate_proof_jwt("POST", url)}, timeout=10)
    assert challenge.status_code == 400 and challenge.json()["error"] == "use_dpop_nonce"
    nonce = challenge.headers["DPoP-Nonce"]
    answer = requests.post(url, data=form(), headers={"DPoP": dpop.generate_proof_jwt("POST", url, nonce=nonce)},
                           timeout=10).json()  # fmt: skip
    assert answer["token_type"] == "DPoP"
    token, users = answer["access_token"], f"{emu.base_url}/api/v1/users"

    def call(proof: str, scheme: str = "DPoP") -> int:
        headers = {"Authorization": f"{scheme} {token}", "DPoP": proof}
        return requests.get(users, headers=headers, timeout=10).status_code

    good = dpop.generate_proof_jwt("GET", users, access_token=token)
    assert call(good) == 200
    assert call(good) == 401  # a proof used twice
    assert call(dpop.generate_proof_jwt("GET", users, access_token=token), scheme="Bearer") == 401
    assert call(dpop.generate_proof_jwt("GET", users, access_token="another-token")) == 401  # ath
    assert call(dpop.generate_proof_jwt("GET", f"{emu.base_url}/api/v1/groups", access_token=token)) == 401  # htu
    assert call(DPoPProofGenerator({}).generate_proof_jwt("GET", users, access_token=token)) == 401  # other key
    assert call(dpop.generate_proof_jwt("GET", users, access_token=token)) == 200


def test_a_client_assertion_is_refused_once_read_whatever_the_first_answer(emu: OktaEmulator) -> None:
    """Okta keeps the `jti` of each `client_assertion` it reads and refuses it again, also after an
    error answer (the SDK signs a new one for its `use_dpop_nonce` retry for that reason)."""
    import jwt

    pem = oauth_client(emu, "0oajti")
    url = f"{emu.base_url}/oauth2/v1/token"
    now = int(time.time())

    def post(jti: str, scope: str = "okta.users.read") -> requests.Response:
        claims = {"iss": "0oajti", "sub": "0oajti", "aud": url, "iat": now, "exp": now + 60, "jti": jti}
        return requests.post(url, timeout=10, data={
            "grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jwt.encode(claims, pem, algorithm="RS256")})  # fmt: skip

    used = {"error": "invalid_client", "error_description": "The client_assertion token has already been used."}
    assert post("a").status_code == 200
    again = post("a")
    assert again.status_code == 401 and again.json() == used
    assert post("b", scope="okta.apps.read").json()["error"] == "invalid_scope"  # read, then refused
    assert post("b").json() == used
    assert post("c").status_code == 200


def test_system_log_since_defaults_to_seven_days_before_until(emu: OktaEmulator, org: Org) -> None:
    """Without `since`, a bounded request starts 7 days before its `until`, not before now
    (directory-apis.md §3.1 System Log): a window that ended more than a week ago still has its
    events. Taking 7 days before now answered such a window empty."""
    now = time.time()
    old = org.deactivate(20)
    old.updated_at = now - 10 * 86400  # published 10 days ago
    window = get(emu, "/api/v1/logs", until=Org.iso(now - 9 * 86400))
    assert window.status_code == 200
    assert [(ev["eventType"], ev["target"][0]["id"]) for ev in window.json()] == [
        ("user.lifecycle.deactivate", user_id(20))
    ]
    assert "next" not in window.links  # bounded: finite pages
    # 7 days before `until` and no further back.
    assert get(emu, "/api/v1/logs", until=Org.iso(now - 2 * 86400)).json() == []


def test_groups_expand_stats_counts_the_members_on_every_page(emu: OktaEmulator, org: Org) -> None:
    """`expand=stats` puts each group's member count in `_embedded.stats.usersCount` (directory-apis.md
    §3.1 Groups list), on the pages its next links lead to as well; without it there is no
    `_embedded`. The emulator used to ignore `expand`."""
    groups, pages = walk(emu, "/api/v1/groups", limit=4, expand="stats")
    assert pages > 1
    for g in groups:
        members, _ = walk(emu, f"/api/v1/groups/{g['id']}/users", limit=200)
        assert g["_embedded"] == {"stats": {"usersCount": len(members)}}, g["profile"]["name"]
    one = get(emu, f"/api/v1/groups/{groups[1]['id']}", expand="stats").json()
    assert one["_embedded"] == groups[1]["_embedded"]
    assert all("_embedded" not in g for g in get(emu, "/api/v1/groups").json())


def test_search_takes_only_the_attributes_okta_searches(emu: OktaEmulator, org: Org) -> None:
    """User search takes any profile attribute plus id, status, created, activated, statusChanged,
    lastUpdated and type.id; group search every property but `_embedded`, `_links` and `objectClass`
    (directory-apis.md §3.1). Anything else is a 400, not an empty (or full) answer that reads as
    "no match"."""
    city = org.people[1].location
    in_city = walk(emu, "/api/v1/users", search=f'profile.city eq "{city}" and type.id pr')[0]
    assert in_city and {u["profile"]["city"] for u in in_city} == {city}
    for bad in ('foo eq "x"', 'lastLogin gt "2020-01-01T00:00:00.000Z"', 'credentials.provider.type eq "OKTA"'):
        r = get(emu, "/api/v1/users", search=bad)
        assert r.status_code == 400 and r.json()["errorCode"] == "E0000053", bad
    assert len(get(emu, "/api/v1/groups", search='type eq "BUILT_IN"').json()) == 1
    assert get(emu, "/api/v1/groups", search='profile.name sw "E"').status_code == 200
    for bad in ('objectClass eq "okta:user_group"', '_links.users.href sw "http"', "_embedded.stats.usersCount pr"):
        r = get(emu, "/api/v1/groups", search=bad)
        assert r.status_code == 400 and r.json()["errorCode"] == "E0000053", bad


def test_system_log_keeps_ninety_days_of_events(emu: OktaEmulator, org: Org) -> None:
    """The System Log keeps 90 days of events (directory-apis.md §3.1): a `since` between 90 and
    180 days back is accepted, but what happened more than 90 days ago is gone, from a polling
    request and a bounded one alike. The emulator used to serve events of any age."""
    now = time.time()
    purged, kept = org.deactivate(20), org.deactivate(21)
    purged.updated_at = now - 95 * 86400
    kept.updated_at = now - 85 * 86400
    since = Org.iso(now - 100 * 86400)
    bounded = get(emu, "/api/v1/logs", since=since, until=Org.iso(now + 60))
    assert bounded.status_code == 200
    assert [ev["target"][0]["id"] for ev in bounded.json()] == [user_id(21)]
    polled = get(emu, "/api/v1/logs", since=since)
    assert polled.status_code == 200
    assert [ev["target"][0]["id"] for ev in polled.json()] == [user_id(21)]


def test_a_bounded_system_log_request_comes_ordered_by_published(emu: OktaEmulator, org: Org) -> None:
    """A bounded request (`since` and `until`) is ordered by `published`, ascending unless
    `sortOrder=DESCENDING`, over its pages too; only a polling request may return events out of
    `published` order (directory-apis.md §3.1 System Log). The emulator served bounded requests in
    the order events were stored."""
    now = time.time()
    for n, hours_ago in ((20, 1), (21, 3), (22, 2)):  # stored 20, 21, 22
        org.deactivate(n).updated_at = now - hours_ago * 3600
    deactivations = 'eventType eq "user.lifecycle.deactivate"'
    window = {"since": Org.iso(now - 86400), "until": Org.iso(now + 60), "filter": deactivations}

    def targets(**params: Any) -> tuple[list[str], int]:
        events, pages = walk(emu, "/api/v1/logs", **window, **params)
        return [ev["target"][0]["id"] for ev in events], pages

    assert targets(limit=2) == ([user_id(21), user_id(22), user_id(20)], 2)
    assert targets(limit=2, sortOrder="DESCENDING") == ([user_id(20), user_id(22), user_id(21)], 2)
    polled = get(emu, "/api/v1/logs", since=window["since"], filter=window["filter"]).json()
    assert [ev["target"][0]["id"] for ev in polled] == [user_id(20), user_id(21), user_id(22)]  # as stored


def test_a_timestamp_searched_with_a_string_operator_is_a_400_not_a_server_error(emu: OktaEmulator) -> None:
    """`sw` and `co` are string operators (directory-apis.md §3.1 search): a user or group search
    that applies one to a timestamp is a malformed search, 400 E0000053. The emulator crashed on
    it with a 500, which a client retries as an Okta outage."""
    when = '"2026-01-01T00:00:00.000Z"'
    for path, attr in (
        ("/api/v1/users", "lastUpdated"),
        ("/api/v1/users", "created"),
        ("/api/v1/users", "statusChanged"),
        ("/api/v1/groups", "lastMembershipUpdated"),
    ):
        for op in ("sw", "co"):
            r = get(emu, path, search=f"{attr} {op} {when}")
            assert r.status_code == 400 and r.json()["errorCode"] == "E0000053", (path, attr, op)
    assert get(emu, "/api/v1/users", search=f"lastUpdated ge {when}").status_code == 200


def test_a_search_on_activated_finds_only_users_whose_record_has_it(emu: OktaEmulator, org: Org) -> None:
    """A STAGED user was never activated: the record says `activated: null`, and a search on
    `activated` (directory-apis.md §3.1) must not find them. The emulator searched its own creation
    time instead, and served STAGED users whose `activated` contradicted the search that found them."""
    emu.status_overrides[5] = "STAGED"
    staged = get(emu, f"/api/v1/users/{user_id(5)}").json()
    assert staged["status"] == "STAGED" and staged["activated"] is None
    for search in ("activated pr", 'activated gt "1970-01-01T00:00:00.000Z"'):
        found = walk(emu, "/api/v1/users", search=search)[0]
        assert found and all(u["activated"] is not None for u in found), search
        assert user_id(5) not in {u["id"] for u in found}, search
    assert user_id(5) in {u["id"] for u in walk(emu, "/api/v1/users", search='status eq "STAGED"')[0]}


def test_link_and_rate_limit_headers_have_the_lower_case_names_okta_sends(emu: OktaEmulator) -> None:
    """Okta writes `link` and `x-rate-limit-*` in lower case (directory-apis.md §3.1, the recorded
    cassettes). The okta SDK hands a response's headers over as a plain dict whose keys are the names
    as written; aiohttp rewrites `link` to `Link`, but not the rate-limit names. The emulator wrote
    `X-Rate-Limit-Reset`, so code reading that key passed here and found nothing against Okta."""
    r = get(emu, "/api/v1/users", limit=2)
    on_the_wire = set(r.headers)  # requests keeps each name as the server wrote it
    assert {"link", "x-rate-limit-limit", "x-rate-limit-remaining", "x-rate-limit-reset"} <= on_the_wire
    assert not {"Link", "X-Rate-Limit-Limit", "X-Rate-Limit-Remaining", "X-Rate-Limit-Reset"} & on_the_wire
    assert r.links["next"]["url"] and int(r.headers["x-rate-limit-remaining"]) >= 0
    emu.faults.update({"rate_limit": 1})
    limited = get(emu, "/api/v1/users")
    assert limited.status_code == 429 and "x-rate-limit-reset" in set(limited.headers)

    async def sdk_headers() -> dict[str, Any]:
        async with sdk_client(emu) as client:
            _, resp, err = await client.list_users(limit=2)
            assert err is None, err
            return resp.headers

    headers = asyncio.run(sdk_headers())
    assert "X-Rate-Limit-Reset" not in headers and int(headers["x-rate-limit-reset"]) > 0
