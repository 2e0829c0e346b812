"""The Graph emulator against ../shared/directory-apis.md §1, over loopback HTTP, and through
msgraph-sdk's own typed client (the wire format must be readable by Microsoft's SDK)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from dirpull.emulators.graph_api import GraphEmulator, group_id, user_id
from dirpull.emulators.org import Org

SCOPE = "https://graph.microsoft.com/.default"


@pytest.fixture
def org() -> Org:
    return Org.generate(60, groups=8, seed=5)


@pytest.fixture
def graph(org: Org) -> Iterator[GraphEmulator]:
    with GraphEmulator(org, delta_page_size=25) as emu:
        yield emu


def token_request(emu: GraphEmulator, **overrides: str) -> requests.Response:
    form = {"grant_type": "client_credentials", "client_id": emu.client_id,
            "client_secret": emu.client_secret, "scope": SCOPE, **overrides}  # fmt: skip
    tenant = overrides.pop("tenant", emu.tenant_id)
    form.pop("tenant", None)
    return requests.post(f"{emu.base_url}/{tenant}/oauth2/v2.0/token", data=form, timeout=5)


class Client:
    def __init__(self, emu: GraphEmulator) -> None:
        self.emu = emu
        self.session = requests.Session()
        self.session.headers["Authorization"] = "Bearer " + token_request(emu).json()["access_token"]

    def get(self, path_or_url: str, **params: Any) -> requests.Response:
        url = path_or_url if path_or_url.startswith("http") else f"{self.emu.base_url}/v1.0{path_or_url}"
        return self.session.get(url, params=params or None, timeout=5)

    def round(self, first: str, **params: Any) -> tuple[list[dict[str, Any]], str, int]:
        """All items of one delta round, the deltaLink, and the number of pages."""
        resp = self.get(first, **params)
        items, pages = [], 0
        while True:
            assert resp.status_code == 200, resp.text
            body = resp.json()
            pages += 1
            assert ("@odata.nextLink" in body) != ("@odata.deltaLink" in body), "nextLink XOR deltaLink"
            items += body["value"]
            if "@odata.deltaLink" in body:
                return items, body["@odata.deltaLink"], pages
            resp = self.get(body["@odata.nextLink"])


@pytest.fixture
def client(graph: GraphEmulator) -> Client:
    return Client(graph)


# --- token endpoint and auth --------------------------------------------------------------------


def test_token_endpoint_client_credentials(graph: GraphEmulator) -> None:
    ok = token_request(graph)
    assert ok.status_code == 200
    body = ok.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3599 and body["ext_expires_in"] == 3599
    assert body["access_token"]

    bad = token_request(graph, client_secret="wrong")
    assert bad.status_code == 401
    err = bad.json()
    assert err["error"] == "invalid_client" and err["error_codes"] == [7000215]
    assert err["error_description"].startswith("AADSTS7000215:")
    assert {"timestamp", "trace_id", "correlation_id"} <= set(err)

    scope = token_request(graph, scope="https://example.test/.default")
    assert scope.status_code == 400 and scope.json()["error"] == "invalid_scope"
    tenant = token_request(graph, tenant="other-tenant")
    assert tenant.status_code == 400 and tenant.json()["error_codes"] == [90002]


def test_graph_requires_a_valid_unexpired_bearer_token(graph: GraphEmulator) -> None:
    none = requests.get(f"{graph.base_url}/v1.0/users", timeout=5)
    assert none.status_code == 401
    assert none.json()["error"]["code"] == "InvalidAuthenticationToken"
    assert {"date", "request-id", "client-request-id"} <= set(none.json()["error"]["innerError"])

    # Long enough to be used before it expires on a loaded machine, which can stall a second or two.
    graph.token_lifetime = 2.5
    token = token_request(graph).json()
    issued = time.time()  # after the token was minted: it expires by issued + its lifetime
    assert token["expires_in"] == 2
    headers = {"Authorization": "Bearer " + token["access_token"]}
    assert requests.get(f"{graph.base_url}/v1.0/users", headers=headers, timeout=5).status_code == 200
    time.sleep(max(0.0, issued + graph.token_lifetime + 0.1 - time.time()))
    expired = requests.get(f"{graph.base_url}/v1.0/users", headers=headers, timeout=5)
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "InvalidAuthenticationToken"


def test_access_tokens_are_signed_and_can_be_revoked(graph: GraphEmulator) -> None:
    token = token_request(graph).json()["access_token"]
    header, claims, signature = token.split(".")
    users = f"{graph.base_url}/v1.0/users"

    def status(tok: str) -> int:
        return requests.get(users, headers={"Authorization": "Bearer " + tok}, timeout=5).status_code

    assert status(token) == 200
    # Claims that say something else (a later expiry) under the old signature are refused.
    forged = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    forged["exp"] += 3600
    forged_claims = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    assert status(f"{header}.{forged_claims}.{signature}") == 401
    assert status(f"{header}.{claims}.{signature[:-2]}") == 401
    assert status(f"{header}.{claims}") == 401
    # Another emulator (another key) does not honour this one's tokens.
    with GraphEmulator(graph.org) as other:
        assert requests.get(f"{other.base_url}/v1.0/users", headers={"Authorization": "Bearer " + token},
                            timeout=5).status_code == 401  # fmt: skip
    graph.expire_access_tokens()
    assert status(token) == 401
    assert status(token_request(graph).json()["access_token"]) == 200


def test_tenant_config_points_at_this_emulator(graph: GraphEmulator, tmp_path: Any) -> None:
    cfg = graph.tenant_config("t1", tmp_path)
    assert cfg["provider"] == "entra_id"
    assert cfg["login_url"] == graph.base_url and cfg["graph_url"] == graph.base_url + "/v1.0"


# --- plain lists ----------------------------------------------------------------------------------


def test_users_list_default_properties_paging_and_top_limits(client: Client, org: Org) -> None:
    org.soft_delete(3)
    org.delete(4)
    first = client.get("/users")
    body = first.json()
    assert len(body["value"]) == 58  # 60 - 2 hidden, all under the default page of 100
    assert "@odata.nextLink" not in body
    assert set(body["value"][0]) == {
        "businessPhones", "displayName", "givenName", "id", "jobTitle", "mail", "mobilePhone",
        "officeLocation", "preferredLanguage", "surname", "userPrincipalName",
    }  # fmt: skip
    assert "accountEnabled" not in body["value"][0]
    assert user_id(3) not in {u["id"] for u in body["value"]}

    for bad in ("1000", "0"):
        resp = client.get("/users", **{"$top": bad})
        assert resp.status_code == 400
        assert resp.json()["error"]["message"] == (
            f"Invalid page size specified: '{bad}'. Must be between 1 and 999 inclusive."
        )

    seen, url, pages = [], f"{client.emu.base_url}/v1.0/users?$top=7&$select=id,accountEnabled", 0
    while url:
        page = client.get(url).json()
        pages += 1
        seen += page["value"]
        url = page.get("@odata.nextLink")
        if url:
            assert url.startswith(client.emu.base_url + "/v1.0/users?") and "$skiptoken=" in url
    assert pages >= 9 and len(seen) == 58 and len({u["id"] for u in seen}) == 58
    assert all(set(u) == {"id", "accountEnabled"} for u in seen)


def test_skip_is_refused_on_directory_collections(client: Client, org: Org) -> None:
    # Graph pages users, groups and members by $skiptoken only and answers $skip with a 400: an
    # emulator that ignored it would hand a client that pages by $skip the first page again and again.
    group = next(g for g in org.groups.values() if g.members)
    for path in ("/users", "/groups", f"/groups/{group_id(group.n)}/members"):
        resp = client.get(path, **{"$top": "5", "$skip": "5"})
        assert resp.status_code == 400, path
        assert resp.json()["error"]["code"] == "Request_BadRequest"
        assert resp.json()["error"]["message"] == "'$skip' is not supported by the service."



def test_deleted_items_list_soft_deleted_users_until_restored_or_deleted_for_good(client: Client, org: Org) -> None:
    for n in (5, 6, 7):
        org.soft_delete(n)
    org.delete(6)  # gone for good: restorable no more
    org.restore(7)
    path = "/directory/deletedItems/microsoft.graph.user"
    first = client.get(path, **{"$top": "1"})
    assert first.status_code == 200, first.text
    items, body, pages = [], first.json(), 1
    while True:
        items += body["value"]
        if "@odata.nextLink" not in body or pages > 100:
            break
        body, pages = client.get(body["@odata.nextLink"]).json(), pages + 1
    assert [u["id"] for u in items] == [user_id(5)]
    assert items[0]["deletedDateTime"].endswith("Z") and items[0]["userPrincipalName"] == org.people[5].username
    picked = client.get(path, **{"$select": "id,deletedDateTime"}).json()["value"]
    assert picked == [{"id": user_id(5), "deletedDateTime": items[0]["deletedDateTime"]}]
    live = client.get("/users", **{"$select": "id,deletedDateTime", "$top": "999"}).json()["value"]
    assert user_id(5) not in {u["id"] for u in live}
    assert {u["deletedDateTime"] for u in live} == {None}

def test_groups_and_direct_members(client: Client, org: Org) -> None:
    groups = client.get("/groups").json()["value"]
    assert len(groups) == 8 and {"displayName", "mail", "groupTypes", "securityEnabled"} <= set(groups[0])
    parent = next(g for g in org.groups.values() if g.subgroups)
    child = next(iter(parent.subgroups))
    members = client.get(f"/groups/{group_id(parent.n)}/members").json()["value"]
    types = {m["@odata.type"] for m in members}
    assert types == {"#microsoft.graph.user", "#microsoft.graph.group"}
    assert {"#microsoft.graph.group": group_id(child)}.items() <= {m["@odata.type"]: m["id"] for m in members}.items()
    users = {m["id"] for m in members if m["@odata.type"] == "#microsoft.graph.user"}
    assert users == {user_id(n) for n in org.direct_members(parent.n)[0]}  # direct only, not transitive
    missing = client.get("/groups/5c1d9f00-2222-4b4b-8d8d-999999999999/members")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "Request_ResourceNotFound"


# --- users/delta -------------------------------------------------------------------------------------


def test_users_delta_rounds(client: Client, org: Org) -> None:
    org.soft_delete(5)
    org.delete(6)
    sel = "displayName,jobTitle,accountEnabled,manager"
    items, delta_link, pages = client.round("/users/delta()", **{"$select": sel, "$top": "5"})
    assert pages == 3  # the server's page size (25), not $top
    assert {"id": user_id(5), "@removed": {"reason": "changed"}} in items  # @removed in the initial round too
    assert {"id": user_id(6), "@removed": {"reason": "deleted"}} in items
    live = [i for i in items if "@removed" not in i]
    assert len(live) == 58
    ada = next(i for i in live if i["id"] == user_id(7))
    assert set(ada) == {"id", "displayName", "jobTitle", "accountEnabled", "manager@delta"}
    assert ada["manager@delta"] == [{"@odata.type": "#microsoft.graph.user", "id": user_id(org.person(7).manager)}]
    assert "$deltatoken=" in delta_link

    org.update_person(8, location="Nowhere")  # officeLocation is not selected: not tracked
    org.update_person(9, title="Chief Tester")
    org.deactivate(10)
    org.soft_delete(11)
    org.delete(12)
    org.restore(5)
    changes, delta_link2, _ = client.round(delta_link)
    by_id = {c["id"]: c for c in changes}
    assert set(by_id) == {user_id(n) for n in (9, 10, 11, 12, 5)}
    assert by_id[user_id(9)]["jobTitle"] == "Chief Tester" and "@removed" not in by_id[user_id(9)]
    assert by_id[user_id(10)]["accountEnabled"] is False
    assert by_id[user_id(11)] == {"id": user_id(11), "@removed": {"reason": "changed"}}
    assert by_id[user_id(12)] == {"id": user_id(12), "@removed": {"reason": "deleted"}}
    assert "@removed" not in by_id[user_id(5)] and by_id[user_id(5)]["displayName"]  # restored: plain object

    nothing, delta_link3, _ = client.round(delta_link2)
    assert nothing == []
    assert delta_link3 != delta_link2


def test_delta_omits_never_set_properties_and_sends_a_cleared_one_as_null(client: Client, org: Org) -> None:
    """§1.1 "Delta property semantics": never-set properties are omitted from delta answers (a plain
    list sends them as null); a property changed to null comes as null; unchanged ones repeat."""
    org.update_person(20, title=None)
    org.update_group(3, description=None)
    listed = client.get("/users", **{"$select": "id,jobTitle,mobilePhone", "$top": "999"}).json()["value"]
    assert next(u for u in listed if u["id"] == user_id(20)) == {"id": user_id(20), "jobTitle": None,
                                                                "mobilePhone": None}  # fmt: skip
    sel = "displayName,jobTitle,department,mobilePhone,employeeLeaveDateTime"
    items, link, _ = client.round("/users/delta", **{"$select": sel})
    assert all(None not in u.values() for u in items)
    twenty = next(u for u in items if u["id"] == user_id(20))
    assert "jobTitle" not in twenty and "mobilePhone" not in twenty and twenty["department"]
    groups, glink, _ = client.round("/groups/delta", **{"$select": "displayName,description,mail"})
    assert all(None not in g.values() for g in groups)
    assert "description" not in next(g for g in groups if g["id"] == group_id(3))

    org.update_person(21, department=None)  # cleared: a change, sent as null
    org.rename(20, "Still", "Untitled")  # jobTitle unchanged and never set: still omitted
    by_id = {u["id"]: u for u in client.round(link)[0]}
    assert by_id[user_id(21)]["department"] is None and "jobTitle" in by_id[user_id(21)]
    assert by_id[user_id(20)]["displayName"] == "Still Untitled" and "jobTitle" not in by_id[user_id(20)]
    assert "mobilePhone" not in by_id[user_id(21)] and "employeeLeaveDateTime" not in by_id[user_id(21)]
    org.update_group(5, description=None)
    (five,) = client.round(glink)[0]
    assert five == {"id": group_id(5), "displayName": org.group(5).name, "description": None,
                    "mail": org.group(5).email}  # fmt: skip


def test_manager_endpoint_and_a_manager_named_only_when_it_changed(
    graph: GraphEmulator, client: Client, org: Org
) -> None:
    boss = org.person(7).manager
    assert boss is not None
    found = client.get(f"/users/{user_id(7)}/manager", **{"$select": "id"})
    assert found.status_code == 200 and found.json()["id"] == user_id(boss)
    top = next(p.n for p in org.listed_people() if p.manager is None)
    assert client.get(f"/users/{user_id(top)}/manager").json()["error"]["code"] == "Request_ResourceNotFound"

    graph.manager_on_every_change = False
    items, link, _ = client.round("/users/delta", **{"$select": "displayName,jobTitle,manager"})
    assert next(i for i in items if i["id"] == user_id(7))["manager@delta"]  # an initial round names it
    org.update_person(7, title="Retitled")
    org.update_person(8, manager=7)
    org.update_person(9, manager=None)
    by_id = {i["id"]: i for i in client.round(link)[0]}
    assert "manager@delta" not in by_id[user_id(7)]
    assert by_id[user_id(8)]["manager@delta"] == [{"@odata.type": "#microsoft.graph.user", "id": user_id(7)}]
    assert by_id[user_id(9)]["manager@delta"] == []


def test_users_delta_latest_and_default_properties(client: Client, org: Org) -> None:
    resp = client.get("/users/delta", **{"$deltatoken": "latest", "$select": "displayName"})
    body = resp.json()
    assert body["value"] == [] and "@odata.deltaLink" in body and "@odata.nextLink" not in body
    org.rename(2, "Renamed", "Person")
    changes, _, _ = client.round(body["@odata.deltaLink"])
    assert [c["id"] for c in changes] == [user_id(2)] and changes[0]["displayName"] == "Renamed Person"

    resp = client.get("/users/delta", **{"$select": "skills"})
    assert resp.status_code == 501 and resp.json()["error"]["code"] == "NotImplemented"


def test_delta_filter_by_id_tracks_only_those_objects(graph: GraphEmulator, client: Client, org: Org) -> None:
    # §1.1: users/groups delta take $filter only as id eq '…' (≤50), kept in the tokens: a round
    # and every later one list only those objects, not the whole directory.
    wanted = f"id eq '{user_id(3)}' or id eq '{user_id(40)}'"
    items, link, _ = client.round("/users/delta", **{"$select": "displayName", "$filter": wanted})
    assert sorted(i["id"] for i in items) == [user_id(3), user_id(40)]
    org.rename(3, "Filtered", "In")
    org.rename(4, "Filtered", "Out")
    changes, link, _ = client.round(link)
    assert [c["id"] for c in changes] == [user_id(3)]
    org.rename(40, "Later", "Change")
    assert [c["id"] for c in client.round(link)[0]] == [user_id(40)]

    latest = client.get("/users/delta", **{"$deltatoken": "latest", "$filter": f"id eq '{user_id(5)}'"})
    org.rename(5, "After", "Latest")
    org.rename(6, "Not", "Filtered")
    assert [c["id"] for c in client.round(latest.json()["@odata.deltaLink"])[0]] == [user_id(5)]

    groups, _, _ = client.round("/groups/delta", **{"$select": "displayName", "$filter": f"id eq '{group_id(2)}'"})
    assert [g["id"] for g in groups] == [group_id(2)]

    for bad in ("displayName eq 'Ada'", " or ".join(f"id eq '{user_id(n)}'" for n in range(1, 52))):
        resp = client.get("/users/delta", **{"$filter": bad})
        assert resp.status_code == 400 and resp.json()["error"]["code"], bad


def test_prefer_return_minimal_sends_only_changed_properties_in_a_later_round(
    graph: GraphEmulator, client: Client, org: Org
) -> None:
    # §1.1 "Delta property semantics": by default a changed user repeats every selected property;
    # with Prefer: return=minimal on a deltaLink request only the changed ones come (and the id).
    select = {"$select": "displayName,jobTitle,department,accountEnabled,manager"}
    _, link, _ = client.round("/users/delta", **select)
    org.update_person(4, title="Chief Tester")
    full = client.get(link).json()["value"]
    assert {"displayName", "department", "accountEnabled", "manager@delta"} <= set(full[0])
    minimal = client.session.get(link, headers={"Prefer": "return=minimal"}, timeout=5).json()["value"]
    assert minimal == [{"id": user_id(4), "jobTitle": "Chief Tester"}]
    org.soft_delete(6)
    _, link, _ = client.round(link)
    org.restore(6)
    restored = client.session.get(link, headers={"Prefer": "return=minimal"}, timeout=5).json()["value"]
    assert [r["id"] for r in restored] == [user_id(6)] and "displayName" in restored[0]  # comes back whole

    _, link, _ = client.round("/groups/delta", **{"$select": "displayName,description,mail"})
    org.update_group(2, description="Changed")
    minimal = client.session.get(link, headers={"Prefer": "return=minimal"}, timeout=5).json()["value"]
    assert minimal == [{"id": group_id(2), "description": "Changed"}]


def test_delta_allows_empty_pages_with_a_next_link(graph: GraphEmulator, client: Client, org: Org) -> None:
    _, link, _ = client.round("/users/delta", **{"$select": "displayName"})
    graph.delta_scan_limit = 10
    org.rename(55, "Late", "Change")
    items, _, pages = client.round(link)
    assert pages == 6 and [i["id"] for i in items] == [user_id(55)]


def test_expired_and_reset_delta_tokens(graph: GraphEmulator, client: Client) -> None:
    _, link, _ = client.round("/users/delta", **{"$select": "displayName"})
    graph.expire_delta_tokens()
    expired = client.get(link)
    assert expired.status_code == 400
    assert expired.json()["error"]["code"] == "syncStateNotFound"
    assert "The delta token is expired" in expired.json()["error"]["message"]

    _, link, _ = client.round("/users/delta", **{"$select": "displayName"})
    graph.force_resync(1)
    gone = client.get(link)
    assert gone.status_code == 410
    assert gone.headers["Location"] == f"{graph.base_url}/v1.0/users/delta?$deltaToken="
    assert client.get(link).status_code == 200  # once only
    # The Location restarts with a full round: every user, then a deltaLink that works.
    everyone, restarted, _ = client.round(gone.headers["Location"])
    assert {u["id"] for u in everyone} == {user_id(p.n) for p in graph.org.listed_people()}
    assert client.get(restarted).status_code == 200

    graph.delta_token_ttl = 0.05
    _, link, _ = client.round("/users/delta", **{"$select": "displayName"})
    time.sleep(0.1)
    assert client.get(link).json()["error"]["code"] == "syncStateNotFound"


# --- groups/delta ------------------------------------------------------------------------------------


def test_groups_delta_members_chunks_and_changes(graph: GraphEmulator, client: Client, org: Org) -> None:
    graph.member_chunk_size = 3
    items, link, pages = client.round("/groups/delta()", **{"$select": "displayName,members"})
    merged: dict[str, list[dict[str, Any]]] = {}
    appearances: dict[str, int] = {}
    for item in items:
        appearances[item["id"]] = appearances.get(item["id"], 0) + 1
        merged.setdefault(item["id"], []).extend(item.get("members@delta", []))
    big = max(org.groups.values(), key=lambda g: len(g.members))
    assert appearances[group_id(big.n)] > 1 and pages > 1  # repeated over pages, a chunk each time
    people, subs = org.direct_members(big.n)
    assert {m["id"] for m in merged[group_id(big.n)]} == {user_id(n) for n in people} | {group_id(n) for n in subs}
    empty = next(g for g in org.groups.values() if not g.members and not g.subgroups)
    empty_items = [i for i in items if i["id"] == group_id(empty.n)]
    assert empty_items and all("members@delta" not in i for i in empty_items)  # omitted, not []
    parent = next(g for g in org.groups.values() if g.subgroups)
    assert any(m["@odata.type"] == "#microsoft.graph.group" for m in merged[group_id(parent.n)])

    gone_user = next(iter(sorted(big.members)))
    joiner = next(n for n in range(60, 0, -1) if n not in big.members)
    org.remove_member(big.n, gone_user)
    org.add_member(big.n, joiner)
    org.add_subgroup(empty.n, parent.n)
    security = next(g for g in org.groups.values() if g.n % 4 and g.n not in (big.n, parent.n, empty.n))
    org.delete_group(security.n)
    changes, _, _ = client.round(link)
    by_id = {c["id"]: c for c in changes}
    assert by_id[group_id(big.n)]["members@delta"] == [
        {"@odata.type": "#microsoft.graph.user", "id": user_id(gone_user), "@removed": {"reason": "deleted"}},
        {"@odata.type": "#microsoft.graph.user", "id": user_id(joiner)},
    ]
    assert by_id[group_id(empty.n)]["members@delta"] == [{"@odata.type": "#microsoft.graph.group",
                                                         "id": group_id(parent.n)}]  # fmt: skip
    assert by_id[group_id(security.n)] == {"id": group_id(security.n), "@removed": {"reason": "deleted"}}


def test_groups_hold_devices_service_principals_and_contacts(graph: GraphEmulator, client: Client) -> None:
    holder = min(graph.foreign_members)
    foreign = {"#microsoft.graph.device", "#microsoft.graph.servicePrincipal", "#microsoft.graph.orgContact"}
    listed = client.get(f"/groups/{group_id(holder)}/members").json()["value"]
    assert foreign <= {m["@odata.type"] for m in listed}
    items, _, _ = client.round("/groups/delta()", **{"$select": "displayName,members"})
    refs = [m for i in items if i["id"] == group_id(holder) for m in i.get("members@delta", [])]
    assert foreign <= {m["@odata.type"] for m in refs}


def test_groups_delta_follows_soft_delete_and_restore(graph: GraphEmulator, client: Client, org: Org) -> None:
    _, link, _ = client.round("/users/delta", **{"$select": "displayName"})
    _, glink, _ = client.round("/groups/delta", **{"$select": "displayName,members"})
    person = next(n for n in range(2, 60) if any(n in g.members for g in org.groups.values()))
    groups = {group_id(g.n) for g in org.groups.values() if person in g.members}
    org.soft_delete(person)
    client.round(link)
    changes, glink, _ = client.round(glink)
    removed = {c["id"] for c in changes for m in c.get("members@delta", []) if "@removed" in m}
    assert removed == groups
    org.restore(person)
    changes, _, _ = client.round(glink)
    added = {c["id"] for c in changes for m in c.get("members@delta", []) if m["id"] == user_id(person)}
    assert added == groups


# --- faults ------------------------------------------------------------------------------------------


def test_throttling_and_server_errors_in_graph_shape(graph: GraphEmulator, client: Client) -> None:
    graph.faults.update({"rate_limit": 1, "path": "/v1.0/"})
    throttled = client.get("/users")
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "2.128"
    assert throttled.headers["x-ms-throttle-information"] == "ResourceUnitLimitExceeded"
    assert throttled.headers["x-ms-throttle-scope"].startswith("Tenant_Application/ReadWrite/")
    assert throttled.json()["error"]["code"] == "TooManyRequests"
    graph.faults.update({"error": 2, "error_status": 503})
    assert client.get("/users").json()["error"]["code"] == "serviceNotAvailable"
    graph.faults.update({"error_status": 504})
    resp = client.get("/users")
    assert resp.status_code == 504 and set(resp.json()["error"]) == {"code", "message", "innerError"}
    assert client.get("/users").status_code == 200


def test_every_answer_says_what_it_cost_in_resource_units(client: Client, org: Org) -> None:
    group = group_id(next(g for g in org.groups.values() if g.members).n)
    costs = {
        ("/users", ()): 2,
        ("/users", (("$select", "id"),)): 1,
        ("/users", (("$top", "5"),)): 1,
        ("/users", (("$top", "50"),)): 2,
        ("/users", (("$select", "id"), ("$top", "5"))): 1,  # never below 1
        (f"/groups/{group}/members", ()): 3,
        (f"/groups/{group}/members", (("$select", "id"),)): 2,
        ("/groups", ()): 1,
        ("/users/delta", (("$select", "displayName"),)): 1,
        (f"/users/{user_id(2)}/manager", ()): 1,
    }
    for (path, params), units in costs.items():
        resp = client.get(path, **dict(params))
        assert resp.status_code == 200, (path, resp.text)
        assert resp.headers["x-ms-resource-unit"] == str(units), (path, params)
    # A page reached by its nextLink costs as the request it continues.
    nxt = client.get("/users", **{"$select": "id", "$top": "50"}).json()["@odata.nextLink"]
    assert client.get(nxt).headers["x-ms-resource-unit"] == "1"


# --- through msgraph-sdk's typed client ----------------------------------------------------------------


def _sdk_client(emu: GraphEmulator) -> Any:
    from kiota_abstractions.authentication import (
        AccessTokenProvider,
        AllowedHostsValidator,
        BaseBearerTokenAuthenticationProvider,
    )
    from kiota_http.middleware.options import RetryHandlerOption
    from msgraph import GraphRequestAdapter, GraphServiceClient
    from msgraph.graph_request_adapter import options as graph_default_options
    from msgraph_core import GraphClientFactory

    token = token_request(emu).json()["access_token"]

    class Static(AccessTokenProvider):
        async def get_authorization_token(self, uri: str, additional_authentication_context: Any = None) -> str:
            return token

        def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
            return AllowedHostsValidator(["127.0.0.1"])

    opts = dict(graph_default_options)
    opts[RetryHandlerOption.get_key()] = RetryHandlerOption(delay=0, max_retries=2)
    http = GraphClientFactory.create_with_default_middleware(options=opts)
    adapter = GraphRequestAdapter(BaseBearerTokenAuthenticationProvider(Static()), client=http)
    adapter.base_url = emu.base_url + "/v1.0"
    return GraphServiceClient(request_adapter=adapter)


def test_msgraph_sdk_reads_users_list_paging(graph: GraphEmulator, org: Org) -> None:
    from kiota_abstractions.base_request_configuration import RequestConfiguration
    from msgraph.generated.users.users_request_builder import UsersRequestBuilder

    async def main() -> list[Any]:
        client = _sdk_client(graph)
        qp = UsersRequestBuilder.UsersRequestBuilderGetQueryParameters(
            select=["id", "displayName", "accountEnabled", "employeeId"], top=20
        )
        page = await client.users.get(request_configuration=RequestConfiguration(query_parameters=qp))
        users = list(page.value)
        pages = 1
        while page.odata_next_link:
            page = await client.users.with_url(page.odata_next_link).get()
            users += page.value
            pages += 1
        assert pages == 3
        return users

    users = asyncio.run(main())
    assert len(users) == 60
    first = next(u for u in users if u.id == user_id(1))
    assert first.display_name == org.person(1).display and first.employee_id == "E000001"
    assert first.account_enabled is True


def test_msgraph_sdk_reads_managers_expanded_on_the_users_list(graph: GraphEmulator, org: Org) -> None:
    # §1.1 user fields: `manager` comes with `$expand=manager` on a plain list, on every page; a
    # user without one has no `manager`. Ignored, every user read as having no manager.
    from kiota_abstractions.base_request_configuration import RequestConfiguration
    from msgraph.generated.users.users_request_builder import UsersRequestBuilder

    org.soft_delete(org.person(9).manager or 1)

    async def main(expand: str) -> list[Any]:
        client = _sdk_client(graph)
        qp = UsersRequestBuilder.UsersRequestBuilderGetQueryParameters(select=["id"], expand=[expand], top=25)
        page = await client.users.get(request_configuration=RequestConfiguration(query_parameters=qp))
        users = list(page.value)
        while page.odata_next_link:
            page = await client.users.with_url(page.odata_next_link).get()
            users += page.value
        return users

    def manager_of(n: int) -> str | None:
        mgr = org.person(n).manager
        return user_id(mgr) if mgr is not None and org.person(mgr).visible else None

    users = asyncio.run(main("manager"))
    listed = list(org.listed_people())
    assert len(users) == len(listed)
    expected = {user_id(p.n): manager_of(p.n) for p in listed}
    assert {u.id: (u.manager.id if u.manager else None) for u in users} == expected
    assert any(expected.values()) and not all(expected.values())
    with_manager = next(u for u in users if u.manager)
    assert with_manager.manager.odata_type == "#microsoft.graph.user"
    assert with_manager.manager.user_principal_name  # the default properties

    narrow = asyncio.run(main("manager($select=id,displayName)"))
    named = next(u for u in narrow if u.manager)
    assert named.manager.display_name == org.person(int(named.manager.id[-12:])).display
    assert named.manager.user_principal_name is None


def test_msgraph_sdk_reads_users_delta(graph: GraphEmulator, org: Org) -> None:
    from kiota_abstractions.base_request_configuration import RequestConfiguration
    from msgraph.generated.users.delta.delta_request_builder import DeltaRequestBuilder

    async def main() -> tuple[list[Any], list[Any], str]:
        client = _sdk_client(graph)
        qp = DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(select=["displayName", "accountEnabled"])
        page = await client.users.delta.get(request_configuration=RequestConfiguration(query_parameters=qp))
        first: list[Any] = []
        while True:
            first += page.value
            if not page.odata_next_link:
                break
            page = await client.users.delta.with_url(page.odata_next_link).get()
        assert page.odata_delta_link
        org.deactivate(2)
        org.soft_delete(4)
        later = await client.users.delta.with_url(page.odata_delta_link).get()
        return first, list(later.value), later.odata_delta_link

    first, later, link = asyncio.run(main())
    assert len(first) == 60 and link
    by_id = {u.id: u for u in later}
    assert by_id[user_id(2)].account_enabled is False
    assert by_id[user_id(4)].additional_data == {"@removed": {"reason": "changed"}}


def test_msgraph_sdk_pages_group_members_while_one_leaves(graph: GraphEmulator, org: Org) -> None:
    """A member leaving between two pages of /groups/{id}/members must not take another member's
    place: dirpull re-reads a nested group this way and stores what it reads as the complete
    member set, so a member skipped here lost their membership until a full walk."""
    from kiota_abstractions.base_request_configuration import RequestConfiguration
    from msgraph.generated.groups.item.members.members_request_builder import MembersRequestBuilder

    big = max(org.groups.values(), key=lambda g: len(g.members))
    stayed = set(org.direct_members(big.n)[0][1:])
    assert len(stayed) > 10

    async def main() -> set[str]:
        client = _sdk_client(graph)
        builder = client.groups.by_group_id(group_id(big.n)).members
        qp = MembersRequestBuilder.MembersRequestBuilderGetQueryParameters(select=["id"], top=5)
        page = await builder.get(request_configuration=RequestConfiguration(query_parameters=qp))
        seen = {m.id for m in page.value}
        org.remove_member(big.n, min(big.members))  # named on the first page, gone before the second
        while page.odata_next_link:
            page = await builder.with_url(page.odata_next_link).get()
            seen |= {m.id for m in page.value}
        return seen

    seen = asyncio.run(main())
    assert {user_id(n) for n in stayed} <= seen


def test_skiptoken_is_opaque_and_in_a_full_url(client: Client) -> None:
    body = client.get("/users/delta", **{"$select": "displayName"}).json()
    parts = urlsplit(body["@odata.nextLink"])
    assert parts.path == "/v1.0/users/delta" and list(parse_qs(parts.query)) == ["$skiptoken"]


def test_graph_switches_over_http_refuse_a_name_they_do_not_know(graph: GraphEmulator) -> None:
    """A misspelt switch was answered {"ok": true} while the test it set up ran without it."""
    url = f"{graph.base_url}/_emulator/graph"
    bad = requests.post(url, json={"delta_page_sise": 5}, timeout=5)
    assert bad.status_code == 400 and "unknown switch 'delta_page_sise'" in bad.json()["error"]
    assert "delta_page_size" in bad.json()["switches"] and graph.delta_page_size == 25
    assert requests.post(url, json={"delta_page_size": 5, "resync": 1}, timeout=5).json() == {"ok": True}
    assert graph.delta_page_size == 5 and graph.resync_required == 1
