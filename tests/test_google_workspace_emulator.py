"""The Google Admin SDK Directory emulator against ../shared/directory-apis.md §2 and §6 rule 2,
driven through google-api-python-client and a real signed-JWT service-account flow (the emulator
makes a throw-away RSA key), plus raw HTTP for the exact error shapes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from google.auth.exceptions import RefreshError
from google.oauth2 import service_account
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from dirpull.emulators.google_api import GoogleEmulator, group_id, user_id
from dirpull.emulators.org import Org

RO = [
    "https://www.googleapis.com/auth/admin.directory.user.readonly",
    "https://www.googleapis.com/auth/admin.directory.group.readonly",
]


@pytest.fixture
def emu() -> Iterator[GoogleEmulator]:
    org = Org.generate(120, seed=11)
    with GoogleEmulator(org) as emulator:
        yield emulator


def service(emu: GoogleEmulator, scopes: list[str] = RO, subject: str | None = "admin") -> Any:
    info = emu.service_account_info()
    creds = service_account.Credentials.from_service_account_info(info, scopes=scopes)
    if subject is not None:
        creds = creds.with_subject(emu.admin_email() if subject == "admin" else subject)
    return build(
        "admin",
        "directory_v1",
        credentials=creds,
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": emu.base_url},
    )


def all_pages(collection: Any, request: Any, key: str) -> tuple[list[dict], int]:
    items, pages = [], 0
    while request is not None and pages < 1000:
        body = request.execute()
        pages += 1
        items += body.get(key, [])
        request = collection.list_next(request, body)
    return items, pages


def reason(exc: HttpError) -> str:
    return json.loads(exc.content)["error"]["errors"][0]["reason"]


def bearer(emu: GoogleEmulator) -> dict[str, str]:
    return {"Authorization": "Bearer " + emu.issue_token(emu.admin_email(), set(RO))}


# --- users.list ----------------------------------------------------------------------------------


def test_users_pages_follow_next_page_token_to_the_end_without_repeats(emu: GoogleEmulator) -> None:
    svc = service(emu)
    users, pages = all_pages(svc.users(), svc.users().list(customer="my_customer", maxResults=25), "users")
    assert pages == 5
    ids = [u["id"] for u in users]
    assert len(ids) == len(set(ids)) == 120
    assert all(i.isdigit() and len(i) == 21 for i in ids)
    assert ids[0] == user_id(1)
    # Default page size is 100.
    first = svc.users().list(customer="my_customer").execute()
    assert len(first["users"]) == 100 and "nextPageToken" in first


def test_users_max_results_is_capped_at_500(emu: GoogleEmulator) -> None:
    for _ in range(400):
        emu.org.hire()
    svc = service(emu)
    body = svc.users().list(domain="example.test", maxResults=1000).execute()
    assert len(body["users"]) == 500 and body["nextPageToken"]
    rest = svc.users().list_next(svc.users().list(domain="example.test", maxResults=1000), body).execute()
    assert len(rest["users"]) == 20 and "nextPageToken" not in rest
    with pytest.raises(HttpError) as err:
        svc.users().list(customer="my_customer", maxResults=0).execute()
    assert err.value.resp.status == 400


@pytest.mark.parametrize("order", [{}, {"orderBy": "email"}], ids=["plain", "ordered"])
def test_users_page_tokens_are_valid_for_three_days_only(emu: GoogleEmulator, order: dict[str, str]) -> None:
    """users.list's nextPageToken is "only valid for three days" (directory-apis.md §2.1): the next
    page asked for with an older token is refused (400), not served as if the listing were fresh.
    The lifetime is shortened over the control endpoint rather than waited out."""
    from dirpull.emulators.google_api import PAGE_TOKEN_LIFETIME

    assert PAGE_TOKEN_LIFETIME == 3 * 86400
    users = service(emu).users()
    request = users.list(customer="my_customer", maxResults=50, **order)
    first = request.execute()
    assert len(users.list_next(request, first).execute()["users"]) == 50  # fresh: served
    assert requests.post(f"{emu.base_url}/_emulator/google", json={"page_token_lifetime": 0.05}, timeout=5).ok
    time.sleep(0.1)
    with pytest.raises(HttpError) as err:
        users.list_next(request, first).execute()
    assert err.value.resp.status == 400 and reason(err.value) == "invalid"
    # A token of groups.list is not one of users.list's (the reference gives no lifetime for it).
    groups = service(emu).groups()
    request = groups.list(customer="my_customer", maxResults=2)
    assert groups.list_next(request, request.execute()).execute()["groups"]
    refused = requests.post(f"{emu.base_url}/_emulator/google", json={"page_token_lifetime": -1}, timeout=5)
    assert refused.status_code == 400


def test_users_list_needs_customer_or_domain(emu: GoogleEmulator) -> None:
    svc = service(emu)
    with pytest.raises(HttpError) as err:
        svc.users().list(maxResults=10).execute()
    assert err.value.resp.status == 400 and reason(err.value) == "badRequest"
    with pytest.raises(HttpError) as err:
        svc.users().list(customer="C999other").execute()
    assert err.value.resp.status == 403
    assert svc.users().list(customer=emu.org.customer_id, maxResults=1).execute()["users"]


def test_domain_lists_one_domain_of_a_multi_domain_customer_customer_all(emu: GoogleEmulator) -> None:
    org = emu.org
    emu.secondary_domain = "eu-" + org.domain
    emu.secondary_people = {5, 6}
    emu.secondary_groups = {3}
    svc = service(emu)
    users, _ = all_pages(svc.users(), svc.users().list(customer="my_customer", maxResults=500), "users")
    eu, _ = all_pages(svc.users(), svc.users().list(domain=emu.secondary_domain, maxResults=500), "users")
    home, _ = all_pages(svc.users(), svc.users().list(domain=org.domain, maxResults=500), "users")
    assert [u["id"] for u in eu] == [user_id(5), user_id(6)]
    assert all(u["primaryEmail"].endswith("@eu-" + org.domain) for u in eu)
    assert sorted(u["id"] for u in home + eu) == sorted(u["id"] for u in users)
    groups = svc.groups().list(domain=emu.secondary_domain).execute()["groups"]
    assert [g["id"] for g in groups] == [group_id(3)] and groups[0]["email"].endswith("@eu-" + org.domain)
    assert group_id(3) not in {g["id"] for g in svc.groups().list(domain=org.domain).execute()["groups"]}
    assert group_id(3) in {g["id"] for g in svc.groups().list(customer="my_customer").execute()["groups"]}
    assert svc.members().list(groupKey=groups[0]["email"]).execute()["members"]
    # A subject in the other domain is the customer's too; a domain the customer lacks is refused.
    emu.admins.add(5)
    assert service(emu, subject=eu[0]["primaryEmail"]).users().list(customer="my_customer").execute()["users"]
    with pytest.raises(HttpError) as err:
        svc.users().list(domain="elsewhere.example").execute()
    assert err.value.resp.status == 403


def test_suspended_and_archived_are_listed_deleted_only_with_show_deleted(emu: GoogleEmulator) -> None:
    org = emu.org
    org.deactivate(5, "suspended")
    org.deactivate(6, "archived")
    org.deactivate(7, "terminated")
    org.soft_delete(8)
    org.delete(9)
    svc = service(emu)
    users, _ = all_pages(svc.users(), svc.users().list(customer="my_customer", maxResults=500), "users")
    by_id = {u["id"]: u for u in users}
    assert by_id[user_id(5)]["suspended"] is True and by_id[user_id(5)]["suspensionReason"] == "ADMIN"
    assert by_id[user_id(6)]["archived"] is True and by_id[user_id(6)]["suspended"] is False
    assert by_id[user_id(7)]["suspended"] is True
    assert user_id(8) not in by_id and user_id(9) not in by_id
    assert not any("deletionTime" in u for u in users)
    deleted = svc.users().list(customer="my_customer", showDeleted="true").execute()["users"]
    assert {u["id"] for u in deleted} == {user_id(8), user_id(9)}
    assert all(u["deletionTime"].endswith("Z") for u in deleted)


def test_suspended_users_carry_suspension_time_and_archived_ones_archival_time(emu: GoogleEmulator) -> None:
    org = emu.org
    suspended, archived = org.deactivate(5, "suspended"), org.deactivate(6, "archived")
    when = {5: suspended.updated_at, 6: archived.updated_at}
    org.rename(5, "Renamed", "Later")  # a later change is not a new suspension
    svc = service(emu)
    users, _ = all_pages(svc.users(), svc.users().list(customer="my_customer", maxResults=500), "users")
    by_id = {u["id"]: u for u in users}
    assert by_id[user_id(5)]["suspensionTime"] == Org.iso(when[5])
    assert "archivalTime" not in by_id[user_id(5)]
    assert by_id[user_id(6)]["archivalTime"] == Org.iso(when[6])
    assert "suspensionTime" not in by_id[user_id(6)]
    active = [u for u in users if not u["suspended"] and not u["archived"]]
    assert active and not any("suspensionTime" in u or "archivalTime" in u for u in active)
    assert all("suspensionTime" in u for u in users if u["suspended"])


def test_projection_controls_custom_schemas_and_records_carry_the_documented_fields(
    emu: GoogleEmulator,
) -> None:
    svc = service(emu)
    basic = svc.users().list(customer="my_customer", maxResults=3).execute()["users"]
    assert not any("customSchemas" in u for u in basic)
    full = svc.users().list(customer="my_customer", maxResults=3, projection="full").execute()["users"]
    assert full[0]["customSchemas"]["Employment"]["EmployeeType"] in ("FTE", "Contractor")
    custom = (
        svc.users()
        .list(customer="my_customer", maxResults=3, projection="custom", customFieldMask="Employment")
        .execute()["users"]
    )
    assert "customSchemas" in custom[0]
    u = full[1]
    assert u["kind"] == "admin#directory#user" and u["etag"] and u["lastLoginTime"]
    assert u["organizations"][0]["primary"] is True and "costCenter" in u["organizations"][0]
    assert u["externalIds"] == [{"value": "E000002", "type": "organization"}]
    manager = emu.org.people[emu.org.people[2].manager]
    assert u["relations"] == [{"value": manager.email or manager.username, "type": "manager"}]


def test_query_org_unit_path_includes_sub_org_units(emu: GoogleEmulator) -> None:
    svc = service(emu)
    users, _ = all_pages(
        svc.users(),
        svc.users().list(customer="my_customer", maxResults=500, query="orgUnitPath='/Engineering'"),
        "users",
    )
    paths = {u["orgUnitPath"] for u in users}
    assert "/Engineering" in paths and any(p.startswith("/Engineering/") for p in paths)
    assert all(p == "/Engineering" or p.startswith("/Engineering/") for p in paths)
    with pytest.raises(HttpError) as err:
        svc.users().list(customer="my_customer", query="nonsense~x").execute()
    assert err.value.resp.status == 400


# --- groups and members --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order_by", "value"),
    [
        ("email", lambda u: u["primaryEmail"]),
        ("familyName", lambda u: u["name"]["familyName"]),
        ("givenName", lambda u: u["name"]["givenName"]),
    ],
)
def test_users_order_by_and_sort_order_hold_across_pages(emu: GoogleEmulator, order_by: str, value: Any) -> None:
    svc = service(emu)
    for sort in ("ASCENDING", "DESCENDING"):
        users, pages = all_pages(
            svc.users(),
            svc.users().list(customer="my_customer", maxResults=7, orderBy=order_by, sortOrder=sort),
            "users",
        )
        assert pages > 1 and len({u["id"] for u in users}) == len(users) == 120
        keys = [value(u).casefold() for u in users]  # "ascending or descending order, ignoring case"
        assert keys == sorted(keys, reverse=sort == "DESCENDING"), (order_by, sort)


def test_groups_order_by_email_holds_across_pages(emu: GoogleEmulator) -> None:
    for i in range(6):
        emu.org.create_group(f"{'zyxwvu'[i]}-late team")  # created last, sorted among the first
    svc = service(emu)
    for sort in ("ASCENDING", "DESCENDING"):
        groups, pages = all_pages(
            svc.groups(),
            svc.groups().list(customer="my_customer", maxResults=3, orderBy="email", sortOrder=sort),
            "groups",
        )
        assert pages > 1 and len(groups) == len(emu.org.groups)
        emails = [g["email"].casefold() for g in groups]
        assert emails == sorted(emails, reverse=sort == "DESCENDING")
    # sortOrder alone orders nothing: "Only of use when orderBy is also used".
    plain, _ = all_pages(svc.groups(), svc.groups().list(customer="my_customer", sortOrder="DESCENDING"), "groups")
    assert [g["id"] for g in plain] == [group_id(n) for n in sorted(emu.org.groups)]


def test_groups_query_searches_email_name_and_member_key(emu: GoogleEmulator) -> None:
    """groups.list `query` (directory-apis.md §2.1; Google's "Search for groups" guide): `email`
    and `name` with `=` or `:PREFIX*`, clauses joined by AND; `memberKey=` alone."""
    org = emu.org
    outer, inner = org.create_group("Contact Team"), org.create_group("Contactless")
    org.add_subgroup(outer.n, inner.n)
    org.add_member(outer.n, 4)
    svc = service(emu)

    def ids(query: str) -> set[str]:
        found, _ = all_pages(svc.groups(), svc.groups().list(customer="my_customer", query=query), "groups")
        return {g["id"] for g in found}

    every = {group_id(g.n) for g in org.listed_groups()}
    assert ids(f"email={outer.email}") == {group_id(outer.n)}
    assert ids(f"email:{outer.email.split('@')[0][:4]}*") == {
        group_id(g.n) for g in org.listed_groups() if g.email.startswith(outer.email.split("@")[0][:4])
    } != every
    assert ids("name='Contact Team'") == {group_id(outer.n)}
    assert ids("name:contact*") == {group_id(outer.n), group_id(inner.n)}
    assert ids(f"name:contact* email={inner.email}") == {group_id(inner.n)}
    assert ids(f"memberKey={org.people[4].email}") == {group_id(g.n) for g in org.listed_groups() if 4 in g.members}
    assert ids(f"memberKey={user_id(4)}") == ids(f"memberKey={org.people[4].email}")
    assert ids(f"memberKey={inner.email}") == {group_id(outer.n)}
    for bad in (f"memberKey={inner.email} name:contact*", "owner=someone", "name~x"):
        with pytest.raises(HttpError) as err:
            svc.groups().list(customer="my_customer", query=bad).execute()
        assert err.value.resp.status == 400, bad


def test_groups_capped_at_200_with_string_member_counts(emu: GoogleEmulator) -> None:
    for i in range(210):
        emu.org.create_group(f"Project {i}")
    svc = service(emu)
    first = svc.groups().list(customer="my_customer", maxResults=500).execute()
    assert len(first["groups"]) == 200 and first["nextPageToken"]
    groups, pages = all_pages(svc.groups(), svc.groups().list(customer="my_customer"), "groups")
    assert pages == 2 and len(groups) == len(emu.org.groups)
    assert all(isinstance(g["directMembersCount"], str) for g in groups)
    assert groups[0]["id"] == group_id(1)
    with pytest.raises(HttpError) as err:
        svc.groups().list().execute()
    assert err.value.resp.status == 400
    mine = svc.groups().list(userKey=emu.org.people[2].email).execute().get("groups", [])
    assert {g["id"] for g in mine} == {group_id(g.n) for g in emu.org.groups.values() if 2 in g.members}


def test_members_capped_at_200_and_typed_user_group_customer_external(emu: GoogleEmulator) -> None:
    org = emu.org
    big = org.create_group("Everyone-ish")
    for n in range(1, 121):
        org.add_member(big.n, n)
    for _ in range(100):
        org.add_member(big.n, org.hire().n)
    org.add_subgroup(big.n, 2)
    emu.customer_groups.add(big.n)
    emu.external_members[big.n] = {"friend@partner.example"}
    svc = service(emu)
    first = svc.members().list(groupKey=group_id(big.n), maxResults=999).execute()
    assert len(first["members"]) == 200 and first["nextPageToken"]
    members, pages = all_pages(svc.members(), svc.members().list(groupKey=group_id(big.n)), "members")
    assert pages == 2 and len(members) == 223
    by_type: dict[str, list[dict]] = {}
    for m in members:
        by_type.setdefault(m["type"], []).append(m)
    assert len(by_type["USER"]) == 220
    assert by_type["GROUP"][0]["id"] == group_id(2)
    assert by_type["CUSTOMER"] == [
        {
            "kind": "admin#directory#member",
            "etag": by_type["CUSTOMER"][0]["etag"],
            "id": org.customer_id,
            "role": "MEMBER",
            "type": "CUSTOMER",
        }
    ]
    assert by_type["EXTERNAL"][0]["email"] == "friend@partner.example"
    count = svc.groups().list(customer="my_customer", maxResults=200).execute()["groups"]
    assert next(g for g in count if g["id"] == group_id(big.n))["directMembersCount"] == "223"
    # By email too, and 404 in Google's shape for an unknown group.
    assert svc.members().list(groupKey=big.email).execute()["members"]
    # And by an alias the group is listed with (groupKey = email, alias or id).
    listed = next(g for g in count if g["id"] == group_id(big.n))
    (alias,) = listed["nonEditableAliases"]
    by_alias = svc.members().list(groupKey=alias, maxResults=200).execute()["members"]
    assert by_alias == members[:200]
    # A department's group also has an editable alias (`aliases`), which answers as well.
    eng = next(g for g in svc.groups().list(customer="my_customer").execute()["groups"] if g["name"] == "Engineering")
    (short,) = eng["aliases"]
    assert short == "engineering@" + org.domain and "aliases" not in listed
    by_short = svc.members().list(groupKey=short.upper()).execute()["members"]
    assert by_short == svc.members().list(groupKey=eng["id"]).execute()["members"]
    with pytest.raises(HttpError) as err:
        svc.members().list(groupKey="03x8tuzt9999999").execute()
    assert err.value.resp.status == 404 and reason(err.value) == "notFound"


def test_members_have_owner_manager_and_member_roles_and_roles_filters_them(emu: GoogleEmulator) -> None:
    org = emu.org
    eng = next(g for g in org.groups.values() if g.name == "Engineering")
    svc = service(emu)
    listed = svc.members().list(groupKey=group_id(eng.n)).execute()["members"]
    people = sorted(eng.members)
    roles = {m["id"]: m["role"] for m in listed if m["type"] == "USER"}
    assert roles[user_id(people[0])] == "OWNER" and roles[user_id(people[1])] == "MANAGER"
    assert {roles[user_id(n)] for n in people[2:]} == {"MEMBER"}
    for asked, want in (("OWNER", {"OWNER"}), ("manager,OWNER", {"OWNER", "MANAGER"}), ("MEMBER", {"MEMBER"})):
        got = svc.members().list(groupKey=group_id(eng.n), roles=asked).execute()["members"]
        assert {m["role"] for m in got} == want and len(got) == sum(r in want for r in roles.values())


def test_has_member_answers_direct_and_nested_membership_by_id_email_or_alias(emu: GoogleEmulator) -> None:
    """members.hasMember (directory-apis.md §2.1): {"isMember": bool}, "direct or nested, but if
    nested, the memberKey and groupKey must be entities in the same domain or an Invalid input"."""
    org = emu.org
    outer, inner = org.create_group("Outer"), org.create_group("Inner")
    org.add_subgroup(outer.n, inner.n)
    org.add_member(outer.n, 4)  # 4 has an alias (every fourth person with a mailbox)
    org.add_member(inner.n, 8)
    outsider = next(p.n for p in org.listed_people() if p.n not in org.transitive_members(outer.n) and p.n % 4)
    svc = service(emu)

    def has(group: str, member: str) -> bool:
        return svc.members().hasMember(groupKey=group, memberKey=member).execute() == {"isMember": True}

    alias = next(u for u in svc.users().list(customer="my_customer").execute()["users"] if u["id"] == user_id(4))
    for key in (user_id(4), org.people[4].email, *alias["aliases"]):
        assert has(group_id(outer.n), key), key
    assert has(outer.email, user_id(8))  # through Inner
    assert not has(group_id(outer.n), user_id(outsider)) and not has(group_id(inner.n), user_id(4))
    emu.customer_groups.add(inner.n)  # the whole domain is in Inner, so in Outer
    assert has(group_id(outer.n), user_id(outsider))
    emu.customer_groups.discard(inner.n)
    with pytest.raises(HttpError) as err:
        svc.members().hasMember(groupKey=group_id(outer.n), memberKey="nobody@" + org.domain).execute()
    assert err.value.resp.status == 404 and reason(err.value) == "notFound"
    with pytest.raises(HttpError) as err:
        svc.members().hasMember(groupKey="03x8tuzt9999999", memberKey=user_id(4)).execute()
    assert err.value.resp.status == 404 and reason(err.value) == "notFound"
    # Nested across two domains of the customer: refused; a direct member of another domain is not.
    emu.secondary_domain, emu.secondary_people = "eu-" + org.domain, {4, 8}
    assert has(group_id(outer.n), user_id(4))
    with pytest.raises(HttpError) as err:
        svc.members().hasMember(groupKey=group_id(outer.n), memberKey=user_id(8)).execute()
    assert err.value.resp.status == 400 and reason(err.value) == "invalid"
    # The member scopes read it: a token for users only does not.
    with pytest.raises(HttpError) as err:
        service(emu, scopes=RO[:1]).members().hasMember(groupKey=group_id(outer.n), memberKey=user_id(4)).execute()
    assert err.value.resp.status == 403 and reason(err.value) == "insufficientPermissions"


# --- auth ----------------------------------------------------------------------------------------


def test_missing_or_unknown_bearer_is_401_in_google_shape(emu: GoogleEmulator) -> None:
    r = requests.get(f"{emu.base_url}/admin/directory/v1/users?customer=my_customer", timeout=5)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == 401 and err["errors"][0]["reason"] == "authError"
    assert "Bearer" in r.headers["WWW-Authenticate"]
    r = requests.get(
        f"{emu.base_url}/admin/directory/v1/users?customer=my_customer",
        headers={"Authorization": "Bearer nope"},
        timeout=5,
    )
    assert r.status_code == 401


def test_token_endpoint_checks_signature_subject_and_scopes(emu: GoogleEmulator) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    # Signed with another key than the one the emulator issued: refused.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = dict(emu.service_account_info())
    forged["private_key"] = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    creds = service_account.Credentials.from_service_account_info(forged, scopes=RO).with_subject(
        emu.admin_email()
    )
    svc = build(
        "admin",
        "directory_v1",
        credentials=creds,
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": emu.base_url},
    )
    with pytest.raises(RefreshError, match="invalid_grant"):
        svc.users().list(customer="my_customer").execute()
    # A write scope was not delegated.
    with pytest.raises(RefreshError, match="unauthorized_client"):
        service(emu, scopes=["https://www.googleapis.com/auth/admin.directory.user"]).users().list(
            customer="my_customer"
        ).execute()
    # A subject outside the domain.
    with pytest.raises(RefreshError, match="invalid_grant"):
        service(emu, subject="someone@elsewhere.example").users().list(customer="my_customer").execute()
    # Without `sub` a token is issued but the service account itself sees no directory.
    with pytest.raises(HttpError) as err:
        service(emu, subject=None).users().list(customer="my_customer").execute()
    assert err.value.resp.status == 403 and reason(err.value) == "forbidden"
    # A token for users only cannot list groups.
    with pytest.raises(HttpError) as err:
        service(emu, scopes=RO[:1]).groups().list(customer="my_customer").execute()
    assert err.value.resp.status == 403 and reason(err.value) == "insufficientPermissions"
    # The raw grant answers the documented shape.
    r = requests.post(f"{emu.base_url}/token", data={"grant_type": "password"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_a_subject_who_is_not_an_admin_gets_a_token_the_directory_refuses(emu: GoogleEmulator) -> None:
    """`sub` is "the admin user to impersonate" (directory-apis.md §2.1): a user who is not an admin
    is issued a token, and the Directory API answers it 403 forbidden; the domain_public view of
    users is every user's to read."""
    person = next(p for p in emu.org.listed_people() if p.n not in emu.admins and p.email)
    svc = service(emu, subject=person.email)
    for request in (
        svc.users().list(customer="my_customer"),
        svc.users().get(userKey=person.email),
        svc.groups().list(customer="my_customer"),
        svc.members().list(groupKey=group_id(1)),
    ):
        with pytest.raises(HttpError) as err:
            request.execute()
        assert err.value.resp.status == 403 and reason(err.value) == "forbidden", request.uri
    assert svc.users().list(customer="my_customer", viewType="domain_public").execute()["users"]
    admin = service(emu).users().list(customer="my_customer", query="isAdmin=true").execute()["users"]
    assert [u["id"] for u in admin] == [user_id(1)]
    emu.admins.add(person.n)
    assert svc.groups().list(customer="my_customer").execute()["groups"]


def test_token_response_shape(emu: GoogleEmulator) -> None:
    import google.auth.transport.requests

    creds = service_account.Credentials.from_service_account_info(
        emu.service_account_info(), scopes=RO
    ).with_subject(emu.admin_email())
    creds.refresh(google.auth.transport.requests.Request())
    assert creds.token.startswith("ya29.") and creds.expiry is not None
    assert ("POST", "/token") in emu.request_log


# --- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "why"),
    [
        ("user", 403, "userRateLimitExceeded"),
        ("quota", 403, "quotaExceeded"),
        ("concurrent", 429, "rateLimitExceeded"),
    ],
)
def test_rate_limits_in_google_shape_without_retry_after(
    emu: GoogleEmulator, kind: str, status: int, why: str
) -> None:
    r = requests.post(f"{emu.base_url}/_emulator/google", json={"rate_limit_kind": kind}, timeout=5)
    assert r.ok
    emu.faults.update({"rate_limit": 1, "path": "/admin/directory"})
    r = requests.get(
        f"{emu.base_url}/admin/directory/v1/users?customer=my_customer", headers=bearer(emu), timeout=5
    )
    assert r.status_code == status and "Retry-After" not in r.headers
    err = r.json()["error"]
    assert err["code"] == status and err["errors"][0] == {
        "message": err["message"],
        "domain": "usageLimits",
        "reason": why,
    }
    # Through the official client the reason is readable too.
    emu.faults.update({"rate_limit": 1})
    with pytest.raises(HttpError) as exc:
        service(emu).users().list(customer="my_customer").execute()
    assert exc.value.resp.status == status and reason(exc.value) == why


def test_alternate_rate_limits_switch_between_403_and_429(emu: GoogleEmulator) -> None:
    emu.faults.update({"rate_limit": 2, "path": "/admin/directory"})
    url = f"{emu.base_url}/admin/directory/v1/users?customer=my_customer"
    statuses = [requests.get(url, headers=bearer(emu), timeout=5).status_code for _ in range(3)]
    assert statuses == [403, 429, 200]


def test_server_errors_in_google_shape(emu: GoogleEmulator) -> None:
    emu.faults.update({"error": 1, "error_status": 503, "path": "/admin/directory"})
    r = requests.get(
        f"{emu.base_url}/admin/directory/v1/groups?customer=my_customer", headers=bearer(emu), timeout=5
    )
    assert r.status_code == 503
    assert r.json()["error"]["errors"][0]["reason"] == "backendError"


def test_volatile_fields_change_between_reads_and_broken_users_lack_primary_email(
    emu: GoogleEmulator,
) -> None:
    svc = service(emu)
    a = svc.users().list(customer="my_customer", maxResults=5).execute()["users"]
    import time

    time.sleep(0.01)
    emu.broken_users = {3}
    b = svc.users().list(customer="my_customer", maxResults=5).execute()["users"]
    assert any(x["lastLoginTime"] != y["lastLoginTime"] for x, y in zip(a, b, strict=True))
    assert any(x["etag"] != y["etag"] for x, y in zip(a, b, strict=True))
    assert "primaryEmail" not in b[2] and b[2]["id"] == user_id(3)
    emu.silent_empty = True
    body = svc.users().list(customer="my_customer").execute()
    assert "users" not in body and body["kind"] == "admin#directory#users"


def test_switches_over_http_take_only_what_they_say(emu: GoogleEmulator) -> None:
    # An emulator served in another process is driven only this way: a string "false", a misspelt
    # switch or a bad value must be refused, not turn the listing empty or be dropped unseen.
    url = f"{emu.base_url}/_emulator/google"
    svc = service(emu)
    for body in ({"silent_empty": "false"}, {"silent_emtpy": True}, {"broken_users": ["three"]},
                 {"delegated_scopes": "none"}):  # fmt: skip
        r = requests.post(url, json=body, timeout=5)
        assert r.status_code == 400, body
    body = svc.users().list(customer="my_customer", maxResults=5).execute()
    assert len(body["users"]) == 5 and all("primaryEmail" in u for u in body["users"])
    assert requests.post(url, json={"silent_empty": True, "broken_users": [2]}, timeout=5).ok
    assert "users" not in svc.users().list(customer="my_customer").execute()
    assert requests.post(url, json={"silent_empty": False}, timeout=5).ok
    users = svc.users().list(customer="my_customer", maxResults=5).execute()["users"]
    assert "primaryEmail" not in users[1] and users[1]["id"] == user_id(2)


def test_users_get_answers_a_user_by_id_address_or_alias_and_refuses_the_rest(emu: GoogleEmulator) -> None:
    """users.get renders a user as users.list does; 404 for an account that is not the customer's
    (an unmanaged account with a company address included), 403 for a user this admin may not see."""
    users = service(emu).users()
    listed = {u["id"]: u for u in all_pages(users, users.list(customer="my_customer"), "users")[0]}
    p = emu.org.people[4]
    got = users.get(userKey=user_id(4)).execute()
    assert {k: v for k, v in got.items() if k not in ("etag", "lastLoginTime")} == {
        k: v for k, v in listed[user_id(4)].items() if k not in ("etag", "lastLoginTime")
    }
    assert users.get(userKey=p.email).execute()["id"] == user_id(4)
    assert users.get(userKey=got["aliases"][0]).execute()["id"] == user_id(4)
    emu.unmanaged_members[2] = {f"unmanaged@{emu.org.domain}"}
    member = next(m for m in service(emu).members().list(groupKey=group_id(2)).execute()["members"]
                  if m["email"] == f"unmanaged@{emu.org.domain}")  # fmt: skip
    assert member["type"] == "USER"
    for key in (member["id"], member["email"], "nobody@example.test"):
        with pytest.raises(HttpError) as err:
            users.get(userKey=key).execute()
        assert err.value.status_code == 404 and reason(err.value) == "notFound"
    emu.hidden_people.add(4)
    with pytest.raises(HttpError) as err:
        users.get(userKey=user_id(4)).execute()
    assert err.value.status_code == 403 and reason(err.value) == "forbidden"
    assert user_id(4) not in {u["id"] for u in all_pages(users, users.list(customer="my_customer"), "users")[0]}
