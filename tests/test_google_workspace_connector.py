"""The Google Workspace connector through google-api-python-client and a real signed-JWT
service-account flow, against the Google emulator over loopback: connector-level pulls (pages and
Done) and sync-level runs through the real store (tests/harness.py)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile import Answer, proxying
from redirects import redirecting

from dirpull.config import GoogleTenant
from dirpull.connectors.base import AuthError, ConfigurationError, ConnectorError, Done, Page
from dirpull.connectors.google_workspace import GoogleWorkspaceConnector, build
from dirpull.connectors.http import RetryPolicy
from dirpull.emulators.google_api import GoogleEmulator, group_id, user_id
from dirpull.emulators.org import Org
from dirpull.emulators.server import Request, Response
from dirpull.spool import SpoolError


class Sleeps(list):
    """An injected sleep: records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def emu() -> Iterator[GoogleEmulator]:
    org = Org.generate(60, seed=7)
    with GoogleEmulator(org) as emulator:
        yield emulator


def tenant(emu: GoogleEmulator, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {**emu.tenant_config("g1", tmp_path), **extra}


def connector(
    emu: GoogleEmulator, tmp_path: Path, sleeps: Sleeps | None = None, **extra: Any
) -> GoogleWorkspaceConnector:
    settings = GoogleTenant.model_validate(tenant(emu, tmp_path, **extra))
    policy = RetryPolicy(max_attempts=5, sleep=sleeps if sleeps is not None else Sleeps())
    return build("g1", settings, policy=policy)


def with_token_uri(emu: GoogleEmulator, tmp_path: Path, token_uri: str, sleeps: Sleeps) -> GoogleWorkspaceConnector:
    """A connector whose key file names `token_uri` (another host than api_url, as Google's is)."""
    cfg = tenant(emu, tmp_path)
    path = Path(cfg["credentials_file"][5:])
    path.write_text(json.dumps({**json.loads(path.read_text()), "token_uri": token_uri}))
    return build("g1", GoogleTenant.model_validate(cfg), policy=RetryPolicy(max_attempts=2, sleep=sleeps))


def pull(c: GoogleWorkspaceConnector) -> tuple[list[Page], Done]:
    out = list(c.pull(None, full=False))
    done = out[-1]
    assert isinstance(done, Done) and all(isinstance(p, Page) for p in out[:-1])
    return out[:-1], done


def users(pages: list[Page]) -> dict[str, Any]:
    return {u.idp_id: u for p in pages for u in p.users}


def groups(pages: list[Page]) -> dict[str, Any]:
    return {g.idp_id: g for p in pages for g in p.groups}


def members(pages: list[Page]) -> set[tuple[str, str]]:
    return {m for p in pages for m in p.pairs()}


def expected_members(emu: GoogleEmulator, people: set[int] | None = None) -> set[tuple[str, str]]:
    """Flattened pairs computed from the organization itself (not from the connector's code):
    nested groups transitively, a CUSTOMER member as the whole domain."""
    org = emu.org
    listed = {p.n for p in org.listed_people()} if people is None else people
    out = set()
    for g in org.listed_groups():
        reach, stack = set(), [g.n]
        while stack:
            cur = stack.pop()
            if cur not in reach:
                reach.add(cur)
                stack.extend(org.direct_members(cur)[1])
        who = listed if reach & emu.customer_groups else org.transitive_members(g.n) & listed
        out |= {(group_id(g.n), user_id(n)) for n in who}
    return out


# --- connector level -----------------------------------------------------------------------------


def test_full_pull_normalizes_users_groups_and_flattened_members(emu: GoogleEmulator, tmp_path: Path) -> None:
    org = emu.org
    org.deactivate(10, "suspended")
    org.deactivate(11, "archived")
    org.soft_delete(12)
    before = emu.requests
    pages, done = pull(connector(emu, tmp_path))
    assert done.snapshot and done.mode == "full" and done.cursor is None
    assert done.requests == emu.requests - before  # token + every listing page, counted
    us = users(pages)
    assert set(us) == {user_id(p.n) for p in org.listed_people()}
    assert us[user_id(10)].state == "inactive" and us[user_id(11)].state == "inactive"
    assert user_id(12) not in us
    p2 = org.people[2]
    u2 = us[user_id(2)]
    assert (u2.email, u2.first_name, u2.last_name, u2.job_title, u2.department, u2.employee_number) == (
        p2.email,
        p2.given,
        p2.family,
        p2.title,
        p2.department,
        p2.employee_number,
    )
    assert u2.manager_idp_id == user_id(p2.manager)
    assert all(
        u.manager_idp_id == user_id(org.people[int(i[4:])].manager)
        for i, u in us.items()
        if org.people[int(i[4:])].manager
    )
    assert "lastLoginTime" not in u2.raw_attributes and "etag" not in u2.raw_attributes
    gs = groups(pages)
    assert set(gs) == {group_id(g.n) for g in org.listed_groups()}
    assert all("directMembersCount" not in g.raw_attributes for g in gs.values())
    # EXTERNAL members are kept on the group by address (flattened into parents too).
    ext = {a for n, s in emu.external_members.items() for a in s}
    assert {a for g in gs.values() for a in g.raw_attributes.get("externalMembers", [])} == ext
    # Nested groups flattened, the CUSTOMER member expanded to the whole domain.
    assert members(pages) == expected_members(emu)
    (cust,) = emu.customer_groups
    assert {u for g, u in members(pages) if g == group_id(cust)} == set(us)
    assert any(org.groups[g].subgroups for g in org.groups)


def test_owners_and_managers_are_members_like_everyone_else(emu: GoogleEmulator, tmp_path: Path) -> None:
    """members.list gives each member a role (OWNER, MANAGER, MEMBER); every role is a membership."""
    import requests

    scope = "https://www.googleapis.com/auth/admin.directory.group.readonly"
    headers = {"Authorization": "Bearer " + emu.issue_token(emu.admin_email(), {scope})}
    by_role: dict[str, set[tuple[str, str]]] = {}
    for g in emu.org.listed_groups():
        url = f"{emu.base_url}/admin/directory/v1/groups/{group_id(g.n)}/members?roles=OWNER,MANAGER"
        for m in requests.get(url, headers=headers, timeout=5).json().get("members", []):
            by_role.setdefault(m["role"], set()).add((group_id(g.n), m["id"]))
    assert by_role.get("OWNER") and by_role.get("MANAGER")
    pages, _ = pull(connector(emu, tmp_path))
    assert by_role["OWNER"] | by_role["MANAGER"] <= members(pages)


def test_a_second_pull_of_an_unchanged_directory_is_identical(emu: GoogleEmulator, tmp_path: Path) -> None:
    c = connector(emu, tmp_path)
    a, _ = pull(c)
    b, _ = pull(c)
    assert users(a) == users(b) and groups(a) == groups(b) and members(a) == members(b)


def test_attribute_mapping_reads_custom_schemas_with_projection_full(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    attrs = {
        "cost_center": "organizations[primary].costCenter",
        "employee_type": "customSchemas.Employment.EmployeeType",
        "badge": "externalIds[type=organization].value",
    }
    pages, _ = pull(connector(emu, tmp_path, attributes=attrs))
    u = users(pages)[user_id(7)]
    assert u.custom_attributes == {
        "cost_center": emu.org.people[7].cost_center,
        "employee_type": "Contractor",
        "badge": "E000007",
    }
    assert any("projection=full" in path for _, path in emu.request_log)
    emu.request_log.clear()
    pull(connector(emu, tmp_path, attributes={"cost_center": "organizations[primary].costCenter"}))
    user_calls = [p for _, p in emu.request_log if "/users?" in p]
    assert user_calls and all("projection=basic" in p and "maxResults=500" in p for p in user_calls)


def test_an_attribute_path_selects_list_items_by_a_json_boolean(emu: GoogleEmulator, tmp_path: Path) -> None:
    """`[primary=true]` is how JSON spells the flag Google sets on an email or an organization; it
    was compared with Python's `True` and never matched, so the attribute was silently absent."""
    attrs = {"mail": "emails[primary=true].address", "cost_center": "organizations[primary=true].costCenter",
             "not_primary": "organizations[primary=false].costCenter"}  # fmt: skip
    pages, _ = pull(connector(emu, tmp_path, attributes=attrs))
    p = emu.org.people[7]
    assert users(pages)[user_id(7)].custom_attributes == {"mail": p.email, "cost_center": p.cost_center}


def test_org_unit_scope_includes_sub_org_units(emu: GoogleEmulator, tmp_path: Path) -> None:
    pages, _ = pull(connector(emu, tmp_path, org_units=["/Engineering"]))
    us = users(pages)
    want = {user_id(p.n) for p in emu.org.listed_people() if p.department == "Engineering"}
    assert set(us) == want
    assert {u.raw_attributes["orgUnitPath"] for u in us.values()} >= {"/Engineering"}
    assert any(u.raw_attributes["orgUnitPath"].startswith("/Engineering/") for u in us.values())
    assert members(pages) == {(g, u) for g, u in expected_members(emu) if u in want}


def test_a_domain_tenant_of_a_multi_domain_customer_reads_that_domain_only(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    """`domain` lists one domain's users and groups, `customer` every domain's (a multi-domain
    account). A member whose address is in the other domain is no user of a `domain` tenant: kept
    on the group by address, as documented, and no membership pair."""
    org = emu.org
    eng = next(g for g in org.groups.values() if g.name == "Engineering")
    moved = max(eng.members)  # an engineer whose account is in the other domain
    team = next(g for g in org.groups.values() if g.name.startswith("Team ") and not g.subgroups
                and moved not in g.members and eng.n not in g.subgroups)  # fmt: skip
    emu.secondary_domain = "eu-" + org.domain
    emu.secondary_people = {moved}
    emu.secondary_groups = {team.n}
    everyone = {user_id(p.n) for p in org.listed_people()}
    all_groups = {group_id(g.n) for g in org.listed_groups()}
    moved_address = org.people[moved].email.rpartition("@")[0] + "@eu-" + org.domain

    pages, _ = pull(connector(emu, tmp_path, customer=None, domain=org.domain))
    assert set(users(pages)) == everyone - {user_id(moved)}
    assert set(groups(pages)) == all_groups - {group_id(team.n)}
    assert (group_id(eng.n), user_id(moved)) not in members(pages)
    assert moved_address in groups(pages)[group_id(eng.n)].raw_attributes["externalMembers"]

    pages, _ = pull(connector(emu, tmp_path, customer=None, domain=emu.secondary_domain))
    assert set(users(pages)) == {user_id(moved)} and users(pages)[user_id(moved)].email == moved_address
    assert set(groups(pages)) == {group_id(team.n)}

    pages, _ = pull(connector(emu, tmp_path))  # customer=my_customer: both domains
    assert set(users(pages)) == everyone and set(groups(pages)) == all_groups
    assert (group_id(eng.n), user_id(moved)) in members(pages)
    assert "externalMembers" not in groups(pages)[group_id(eng.n)].raw_attributes


def test_an_org_unit_no_user_is_in_is_named_in_the_notes(emu: GoogleEmulator, tmp_path: Path) -> None:
    """A misspelt org unit ("/engineering" for "/Engineering") made an empty tenant on its first
    run without a word, where a group that matches nothing is named ("configured groups not found")."""
    pages, done = pull(connector(emu, tmp_path, org_units=["/Engineering", "/engineering", "Nowhere/"]))
    want = {user_id(p.n) for p in emu.org.listed_people() if p.department == "Engineering"}
    assert set(users(pages)) == want and want
    assert "configured org units with no user in or under them: /engineering, /Nowhere" in done.notes
    _, done = pull(connector(emu, tmp_path, org_units=["/engineering"]))
    assert done.notes == ["configured org units with no user in or under them: /engineering"]
    _, done = pull(connector(emu, tmp_path, org_units=["/Engineering", "/"]))
    assert not done.notes


def test_group_scope_keeps_only_those_groups_and_their_flattened_members(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    org = emu.org
    parent = next(g for g in org.groups.values() if g.subgroups and g.n not in emu.customer_groups)
    pages, done = pull(connector(emu, tmp_path, groups=[parent.email.upper(), "nope@example.test"]))
    assert set(groups(pages)) == {group_id(parent.n)}
    want = {user_id(n) for n in org.transitive_members(parent.n)}
    assert set(users(pages)) == want and want
    assert members(pages) == {(group_id(parent.n), u) for u in want}
    assert any("nope@example.test" in n for n in done.notes)


def test_group_scope_names_a_group_by_either_kind_of_alias_google_lists(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    """groups.list gives a group's `aliases` (the admin's) and `nonEditableAliases` (Google's own:
    the address in a domain alias or on test-google-a.com); both reach the group and are groupKeys.
    A scope naming the group by its non-editable alias matched nothing: "configured groups not
    found", no group and no user (an emptied tenant, held only once it had been synced)."""
    org = emu.org
    eng = next(g for g in org.groups.values() if g.name == "Engineering")
    listed = emu.render_group(eng)
    (alias,) = listed["aliases"]
    (google_alias,) = listed["nonEditableAliases"]
    want = {user_id(n) for n in org.transitive_members(eng.n)}
    for key in (alias.upper(), google_alias):
        pages, done = pull(connector(emu, tmp_path, groups=[key]))
        assert set(groups(pages)) == {group_id(eng.n)}, key
        assert set(users(pages)) == want and want
        assert groups(pages)[group_id(eng.n)].raw_attributes["aliases"] == [alias]
        assert not any("not found" in n for n in done.notes), done.notes


@pytest.mark.parametrize(
    ("faults", "kind"),
    [
        ({"rate_limit": 3}, "user"),  # 403 userRateLimitExceeded
        ({"rate_limit": 3}, "quota"),  # 403 quotaExceeded
        ({"rate_limit": 3}, "concurrent"),  # 429 rateLimitExceeded
        ({"rate_limit": 4}, "alternate"),
        ({"error": 3, "error_status": 503}, "user"),
        ({"error": 2, "error_status": 500}, "user"),
        ({"drop": 1, "malformed": 1}, "user"),
    ],
)
def test_throttling_and_transient_errors_are_retried_with_backoff(
    emu: GoogleEmulator, tmp_path: Path, faults: dict[str, Any], kind: str
) -> None:
    clean, _ = pull(connector(emu, tmp_path))
    emu.rate_limit_kind = kind  # type: ignore[assignment]
    emu.faults.update({**faults, "path": "/admin/directory"})
    sleeps = Sleeps()
    pages, done = pull(connector(emu, tmp_path, sleeps))
    assert users(pages) == users(clean) and members(pages) == members(clean)
    retries = sum(v for k, v in faults.items() if k != "error_status")
    assert len(sleeps) == retries
    assert all(0 < s <= 60 for s in sleeps)
    assert done.requests >= retries + 1


def test_a_401_mid_run_refreshes_the_token_and_continues(emu: GoogleEmulator, tmp_path: Path) -> None:
    emu.faults.update({"expire_auth": 1, "path": "/admin/directory/v1/groups"})
    sleeps = Sleeps()
    pages, _ = pull(connector(emu, tmp_path, sleeps))
    assert groups(pages) and not sleeps
    assert [m for m, p in emu.request_log].count("POST") == 2  # the first token, then a fresh one


def test_members_storm_is_retried_across_worker_threads(emu: GoogleEmulator, tmp_path: Path) -> None:
    clean, _ = pull(connector(emu, tmp_path))
    # Fewer throttled answers than one request's attempts (5): whichever worker threads draw them,
    # no single request can run out of retries.
    emu.faults.update({"rate_limit": 4, "path": "/members"})
    sleeps = Sleeps()
    pages, _ = pull(connector(emu, tmp_path, sleeps, member_workers=4))
    assert members(pages) == members(clean) and len(sleeps) == 4


def test_persistent_throttling_fails_cleanly_without_done(emu: GoogleEmulator, tmp_path: Path) -> None:
    emu.faults.update({"rate_limit": 1000, "path": "/admin/directory/v1/groups"})
    sleeps = Sleeps()
    seen: list[Any] = []
    with pytest.raises(ConnectorError, match="gave up"):
        for item in connector(emu, tmp_path, sleeps).pull(None, full=False):
            seen.append(item)
    assert not any(isinstance(x, Done) for x in seen)
    # Throttled: eight waits, over a minute in all (Google's quota is per minute), then give up.
    assert len(sleeps) == 8 and sum(sleeps) > 60
    # Exponential: each wait (before jitter) doubles.
    assert sleeps[0] < sleeps[2] < sleeps[3] < sleeps[5] < sleeps[7]


@pytest.mark.parametrize("kind", ["user", "concurrent"])
def test_a_throttle_longer_than_an_outages_attempts_is_waited_out(
    emu: GoogleEmulator, tmp_path: Path, kind: str
) -> None:
    """Google's per-user quota is per minute: a request throttled for a minute must not fail the
    run after the 15 s of waits an outage (5xx) is given."""
    clean, _ = pull(connector(emu, tmp_path))
    emu.rate_limit_kind = kind  # type: ignore[assignment]
    emu.faults.update({"rate_limit": 7, "path": "/admin/directory/v1/users"})
    sleeps = Sleeps()
    pages, _ = pull(connector(emu, tmp_path, sleeps))  # max_attempts=5
    assert users(pages) == users(clean) and members(pages) == members(clean)
    assert len(sleeps) == 7 and sum(sleeps) > 30
    emu.faults.update({"error": 7, "error_status": 503, "path": "/admin/directory/v1/users"})
    with pytest.raises(ConnectorError, match="gave up after 5 attempts"):
        pull(connector(emu, tmp_path))


def test_members_read_while_the_users_are_handed_over_fail_the_pull_after_them(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    emu.faults.update({"rate_limit": 1000, "path": "/members"})
    seen: list[Any] = []
    with pytest.raises(ConnectorError, match=r"members\.list"):
        for item in connector(emu, tmp_path).pull(None, full=False):
            seen.append(item)
    assert users(seen) and not any(isinstance(x, Done) for x in seen)


def test_a_pull_closed_while_the_users_are_handed_over_stops_its_reads(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    import threading
    import time

    emu.faults.update({"delay": 1.0, "path": "/members"})  # slow member reads: the close comes mid-way
    stream = connector(emu, tmp_path, member_workers=4).pull(None, full=False)
    first = next(stream)
    assert isinstance(first, Page) and first.users  # the member reads have started by now
    stream.close()
    asked = len(emu.request_log)
    left = [t.name for t in threading.enumerate() if t.name.startswith(("google-members", "google-users"))]
    assert left == []
    # The reads under way finished; those not started never will.
    assert sum("/members" in path for _, path in emu.request_log) <= 4 < len(list(emu.org.listed_groups()))
    time.sleep(0.5)
    assert len(emu.request_log) == asked


@pytest.mark.parametrize("buffering", [0, -1])  # failing at a write, or at the last buffer's flush
def test_a_full_tmpdir_under_the_spooled_users_is_one_line_naming_it(
    emu: GoogleEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffering: int
) -> None:
    """The users read wait in a temporary file until every manager's email is known: with no room
    left in TMPDIR the run failed with an OSError traceback in the log and "OSError: [Errno 28] No
    space left on device" as its error, naming neither the directory nor what to do."""
    # /dev/full: every write the kernel gets fails with ENOSPC, as on a full TMPDIR.
    monkeypatch.setattr("tempfile.TemporaryFile", lambda **_: open("/dev/full", "w+b", buffering=buffering))  # noqa: SIM115
    with pytest.raises(SpoolError) as info:
        pull(connector(emu, tmp_path))
    msg = str(info.value)
    assert msg.startswith("cannot write the temporary file of the users read so far in ")
    assert "No space left on device" in msg and "TMPDIR" in msg and "nothing applied" in msg


def test_a_404_from_users_or_groups_list_is_a_configuration_error(emu: GoogleEmulator, tmp_path: Path) -> None:
    # api_url given as the API root rather than the host root: every path is doubled, and 404s.
    api_root = tenant(emu, tmp_path)["api_url"] + "/admin/directory/v1"
    with pytest.raises(ConfigurationError, match=r"^users\.list: HTTP 404 .*check api_url.*customer / domain"):
        pull(connector(emu, tmp_path, api_url=api_root))
    emu.faults.update({"error": 1, "error_status": 404, "path": "/admin/directory/v1/groups"})
    with pytest.raises(ConfigurationError, match=r"^groups\.list: HTTP 404 .*check api_url"):
        pull(connector(emu, tmp_path))



@pytest.mark.parametrize("suffix", ["", "/"])
def test_an_api_url_with_a_proxys_path_prefix_is_kept(tmp_path: Path, suffix: str) -> None:
    """A proxy that serves the Directory API under a path (https://proxy.example.com/google/): every
    request, paging and members included, goes under that path, not to the host root."""
    with GoogleEmulator(Org.generate(60, seed=7), prefix="/google") as prefixed:
        api_url = tenant(prefixed, tmp_path)["api_url"]
        assert api_url == prefixed.base_url + "/google"
        pages, _ = pull(connector(prefixed, tmp_path, api_url=api_url + suffix))
        assert set(users(pages)) == {user_id(p.n) for p in prefixed.org.listed_people()}
        assert members(pages) == expected_members(prefixed)
        paths = [p for _, p in prefixed.request_log]
        assert any("/members?" in p for p in paths)
        assert all(p.startswith("/google/") for p in paths), paths
        # The host root is not the API there: the same pull without the prefix is refused.
        with pytest.raises(ConfigurationError, match=r"^users\.list: HTTP 404 .*check api_url"):
            pull(connector(prefixed, tmp_path, api_url=prefixed.base_url))


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"customer": None, "domain": "acme.exmaple"}, "domain 'acme.exmaple'"),
        ({"customer": "C0typo"}, "customer 'C0typo'"),
    ],
)
def test_a_customer_or_domain_not_the_subjects_is_named_in_the_refusal(
    emu: GoogleEmulator, tmp_path: Path, extra: dict[str, Any], named: str
) -> None:
    # Google answers it with the 403 "Not Authorized to access this resource/api" that a missing
    # delegation gets: the message must not send the admin to check only the delegation.
    refused = rf"^users\.list: HTTP 403 forbidden .*\(check {named}, the subject, domain-wide"
    with pytest.raises(AuthError, match=refused):
        pull(connector(emu, tmp_path, **extra))

def test_sync_with_a_subject_who_is_not_an_admin_fails_naming_the_subject(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """Domain-wide delegation lets the service account act as any user, but only an admin reads the
    directory: a subject who is not one fails the run as Google refuses it (403 forbidden), with
    the subject among what to check, and nothing is applied."""
    user = next(p for p in emu.org.listed_people() if p.n not in emu.admins and p.email)
    h = harness({"g1": tenant(emu, tmp_path, subject=user.email)}, connector_factory=fast)
    r = h.sync("g1")
    assert r.status == "failed"
    refused = r"users\.list: HTTP 403 forbidden .*Not Authorized.*the subject, domain-wide"
    assert re.match(refused, r.error or ""), r.error
    assert h.users("g1") == {} and h.last_seq() == 0


def test_a_404_from_members_list_leaves_the_group_out(emu: GoogleEmulator, tmp_path: Path) -> None:
    emu.faults.update({"error": 1, "error_status": 404, "path": "/members"})  # deleted while read
    pages, done = pull(connector(emu, tmp_path, member_workers=1))
    assert len(groups(pages)) == sum(1 for _ in emu.org.listed_groups()) - 1
    assert "1 group(s) disappeared while the run read them" in done.notes


@pytest.fixture
def quick_token_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """google-auth tries the token endpoint 3 times before it raises, sleeping ~1 s and ~2 s
    between: the same 3 tries here, without the sleeps (its backoff module's only use of `time`)."""
    import types

    from google.auth import _exponential_backoff

    monkeypatch.setattr(_exponential_backoff, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def test_a_token_endpoint_outage_is_retried_under_the_retry_policy(
    emu: GoogleEmulator, tmp_path: Path, quick_token_retries: None
) -> None:
    clean, _ = pull(connector(emu, tmp_path))
    emu.request_log.clear()
    # Four 503s: google-auth's three tries fail (a retryable RefreshError), the policy waits once,
    # then google-auth's next try fails and the one after gets the token.
    emu.faults.update({"error": 4, "error_status": 503, "path": "/token"})
    sleeps = Sleeps()
    pages, _ = pull(connector(emu, tmp_path, sleeps))
    assert users(pages) == users(clean) and members(pages) == members(clean)
    assert len(sleeps) == 1
    assert [m for m, p in emu.request_log if p.startswith("/token")] == ["POST"] * 5

    emu.faults.update({"error": 1000, "error_status": 500, "path": "/token"})  # it stays down
    sleeps = Sleeps()
    with pytest.raises(ConnectorError, match=r"token endpoint failed.*gave up after 5 attempts") as err:
        pull(connector(emu, tmp_path, sleeps))
    assert not isinstance(err.value, AuthError) and err.value.retriable
    assert len(sleeps) == 4


@pytest.mark.parametrize("status", [502, 501])
def test_a_5xx_google_auth_does_not_retry_from_the_token_endpoint_is_an_outage_not_a_refusal(
    emu: GoogleEmulator, tmp_path: Path, quick_token_retries: None, status: int
) -> None:
    """google-auth marks no 502 (nor 501) retryable: it raised them as a refusal, the run failed at
    once as an AuthError saying the grant was "refused", as if the delegation were wrong."""
    clean, _ = pull(connector(emu, tmp_path))
    emu.request_log.clear()
    emu.faults.update({"error": 2, "error_status": status, "path": "/token"})
    sleeps = Sleeps()
    pages, _ = pull(connector(emu, tmp_path, sleeps))
    assert users(pages) == users(clean) and members(pages) == members(clean)
    assert len(sleeps) == 2  # each 502 is one attempt of the policy
    assert [m for m, p in emu.request_log if p.startswith("/token")] == ["POST"] * 3

    emu.faults.update({"error": 1000, "error_status": status, "path": "/token"})  # it stays down
    sleeps = Sleeps()
    with pytest.raises(ConnectorError) as err:
        pull(connector(emu, tmp_path, sleeps))
    assert not isinstance(err.value, AuthError) and err.value.retriable
    message = str(err.value)
    assert f"token endpoint failed with HTTP {status} (an outage at Google" in message
    assert "refused" not in message and "gave up after 5 attempts" in message
    assert len(sleeps) == 4


def test_a_refused_service_account_is_an_auth_error_without_secrets(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    cfg = tenant(emu, tmp_path)
    path = Path(cfg["credentials_file"][5:])
    info = json.loads(path.read_text())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(json.dumps(info))
    sleeps = Sleeps()
    c = build("g1", GoogleTenant.model_validate(cfg), policy=RetryPolicy(sleep=sleeps))
    with pytest.raises(AuthError) as err:
        list(c.pull(None, full=False))
    assert "invalid_grant" in str(err.value)
    assert sleeps == []  # a refusal is not retried
    assert "PRIVATE KEY" not in str(err.value) and info["private_key_id"] not in str(err.value)


@pytest.mark.parametrize(
    "delegated",
    [
        [],  # domain-wide delegation never set up for the client id
        # group.member.readonly instead of group.readonly: members readable, groups.list not
        ["https://www.googleapis.com/auth/admin.directory.user.readonly",
         "https://www.googleapis.com/auth/admin.directory.group.member.readonly"],
    ],
)  # fmt: skip
def test_a_delegation_missing_a_scope_says_which_client_id_and_scopes_to_authorize(
    emu: GoogleEmulator, tmp_path: Path, delegated: list[str]
) -> None:
    """Google refuses the token with `unauthorized_client: Client is unauthorized to retrieve
    access tokens using this method, or client not authorized for any of the scopes requested.`:
    it names neither the domain-wide delegation nor what to enter there. The run said only that."""
    import json

    import requests

    assert requests.post(f"{emu.base_url}/_emulator/google", json={"delegated_scopes": delegated}, timeout=5).ok
    cfg = tenant(emu, tmp_path)
    client_id = json.loads(Path(cfg["credentials_file"][5:]).read_text())["client_id"]
    sleeps = Sleeps()
    c = build("g1", GoogleTenant.model_validate(cfg), policy=RetryPolicy(sleep=sleeps))
    with pytest.raises(AuthError) as err:
        list(c.pull(None, full=False))
    message = str(err.value)
    assert message.startswith("users.list: the token endpoint refused the service-account grant: unauthorized_client")
    assert f"authorize client id {client_id} for the scopes " in message and "Domain-wide delegation" in message
    assert ("https://www.googleapis.com/auth/admin.directory.user.readonly,"
            "https://www.googleapis.com/auth/admin.directory.group.readonly") in message  # fmt: skip
    assert sleeps == []  # a refusal is not retried
    assert "PRIVATE KEY" not in message


def test_a_key_file_rewritten_between_runs_takes_effect_in_the_next(emu: GoogleEmulator, tmp_path: Path) -> None:
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    cfg = tenant(emu, tmp_path)
    path = Path(cfg["credentials_file"][5:])
    good = path.read_text()
    c = build("g1", GoogleTenant.model_validate(cfg), policy=RetryPolicy(sleep=Sleeps()))
    assert isinstance(list(c.pull(None, full=False))[-1], Done)
    # A key parsed once per process must not outlive the file: a revoked key fails at once...
    info = json.loads(good)
    info["private_key"] = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(json.dumps(info))
    with pytest.raises(AuthError):
        list(c.pull(None, full=False))
    # ...and the good one, put back, works again in the same process.
    path.write_text(good)
    assert isinstance(list(c.pull(None, full=False))[-1], Done)


def test_a_key_file_with_a_byte_order_mark_is_read(emu: GoogleEmulator, tmp_path: Path) -> None:
    """Every file: secret has its byte-order mark stripped (config/dirpull.example.toml); the
    service-account key file failed instead ("not a readable service-account JSON key")."""
    cfg = tenant(emu, tmp_path)
    path = Path(cfg["credentials_file"][5:])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    _, done = pull(build("g1", GoogleTenant.model_validate(cfg), policy=RetryPolicy(sleep=Sleeps())))
    assert done.snapshot and done.requests > 0


def test_a_user_record_that_cannot_be_normalized_is_quarantined(emu: GoogleEmulator, tmp_path: Path) -> None:
    emu.broken_users = {4}
    pages, _ = pull(connector(emu, tmp_path))
    q = [q for p in pages for q in p.quarantined]
    assert [(x.kind, x.idp_id) for x in q] == [("user", user_id(4))]
    assert user_id(4) not in users(pages)
    assert len(users(pages)) == sum(1 for _ in emu.org.listed_people()) - 1


def test_nested_group_cycles_terminate(emu: GoogleEmulator, tmp_path: Path) -> None:
    org = emu.org
    org.add_subgroup(2, 3)
    org.add_subgroup(3, 2)
    pages, _ = pull(connector(emu, tmp_path))
    got = members(pages)
    both = {user_id(n) for n in org.transitive_members(2)}
    assert {u for g, u in got if g == group_id(2)} == both == {u for g, u in got if g == group_id(3)}


# --- sync level ----------------------------------------------------------------------------------


def fast(tenant_name: str, settings: Any) -> GoogleWorkspaceConnector:
    return build(tenant_name, settings, policy=RetryPolicy(max_attempts=4, sleep=Sleeps()))


def test_sync_initial_round_of_changes_and_idempotence(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    org = emu.org
    h = harness({"g1": tenant(emu, tmp_path)}, connector_factory=fast)
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    assert set(h.users("g1")) == {user_id(p.n) for p in org.listed_people()}
    assert h.members("g1") == expected_members(emu)
    assert h.sync("g1").events == 0  # unchanged directory: nothing written

    seq = h.last_seq()
    before_members = h.members("g1")
    active_leaves = [
        p.n
        for p in org.listed_people()
        if p.state == "active" and p.n > 20 and not any(q.manager == p.n for q in org.people.values())
    ]
    suspended, archived, deleted, renamed, moved = active_leaves[:5]
    hire = org.hire("Nia", "Newcomer", department="Engineering", manager=2)
    org.deactivate(suspended, "suspended")
    org.deactivate(archived, "archived")
    org.delete(deleted)
    org.rename(renamed, "Renée", "Renamed")
    org.update_person(moved, manager=3)
    org.add_member(6, 9)  # join (team 6 is nested in another team)
    leaver = sorted(org.groups[1].members)[0]
    org.remove_member(1, leaver)  # leave
    org.add_subgroup(8, 2)  # nested group change: Sales inside the empty team
    org.delete_group(4)  # group delete

    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    after_members = expected_members(emu)
    assert h.members("g1") == after_members
    want = Counter(
        [
            ("user.created", user_id(hire.n)),
            ("user.updated", user_id(suspended), ("raw_attributes", "state")),
            ("user.updated", user_id(archived), ("raw_attributes", "state")),
            ("user.deleted", user_id(deleted)),
            ("user.updated", user_id(renamed), ("display_name", "first_name", "last_name", "raw_attributes")),
            ("user.updated", user_id(moved), ("manager_idp_id", "raw_attributes")),
            ("group.deleted", group_id(4)),
        ]
        + [("group.user_added", g, u) for g, u in after_members - before_members]
        + [("group.user_removed", g, u) for g, u in before_members - after_members]
    )
    assert Counter(h.changes("g1", after=seq)) == want
    assert ("group.user_added", group_id(8), user_id(sorted(org.groups[2].members)[0])) in want
    assert ("group.user_removed", group_id(1), user_id(leaver)) in want
    assert h.users("g1")[user_id(moved)]["manager_idp_id"] == user_id(3)
    assert h.sync("g1").events == 0


def test_sync_a_nested_group_of_another_organization_does_not_fail_every_run(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """A group may hold another organization's group; its members.list answers 403 to this admin.
    That group is counted as empty and named on the run, instead of failing every run as an
    authentication error. A 403 on a group of this directory still fails the run."""
    org = emu.org
    h = harness({"g1": tenant(emu, tmp_path)}, connector_factory=fast)
    assert h.sync("g1").status == "succeeded"
    holder = next(g.n for g in org.listed_groups() if g.members)
    emu.foreign_subgroups[holder] = {"sales-team@partner.example"}
    seq = h.last_seq()
    org.rename(sorted(org.groups[holder].members)[0], "Still", "Synced")
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    assert any("1 nested group(s)" in n and "403" in n for n in r.notes), r.notes
    assert h.members("g1") == expected_members(emu)
    assert [c[0] for c in h.changes("g1", after=seq)] == ["user.updated"]

    emu.faults.update({"error": 1, "error_status": 403, "path": f"/groups/{group_id(holder)}/members"})
    r = h.sync("g1")
    assert r.status == "failed" and "403" in (r.error or "")


def test_sync_a_403_on_a_group_of_this_directory_outside_the_group_scope_fails_the_run(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """With a `groups` scope, a group of this directory nested in a scoped group but not itself in
    the scope answered 403 and was counted as empty: the run succeeded, removed its people from the
    scoped group and deleted them from the tenant. groups.list returned it, so the admin's access is
    what is wrong (as without a scope, where the same group fails the run): nothing is applied."""
    org = emu.org
    sales = next(g for g in org.groups.values() if g.name == "Sales")
    marketing = next(g for g in org.groups.values() if g.name == "Marketing")
    org.add_subgroup(sales.n, marketing.n)
    only_nested = marketing.members - sales.members
    assert only_nested
    h = harness({"g1": tenant(emu, tmp_path, groups=[sales.email])}, connector_factory=fast)
    assert h.sync("g1").status == "succeeded"
    stored, stored_members, seq = h.users("g1"), h.members("g1"), h.last_seq()
    assert {user_id(n) for n in only_nested} <= set(stored)
    emu.faults.update({"error": 1, "error_status": 403, "path": f"/groups/{group_id(marketing.n)}/members"})
    r = h.sync("g1")
    assert r.status == "failed", (r.status, r.notes)
    assert "members.list: HTTP 403" in (r.error or "") and "domain-wide delegation" in (r.error or "")
    assert h.users("g1") == stored and h.members("g1") == stored_members and h.last_seq() == seq


def test_sync_member_workers_throttled_together_are_charged_one_wait(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """Google's 429 rateLimitExceeded is its limit on concurrent requests: the member workers hit it
    together and back off side by side. The run was held for one backoff, and that is what its
    retry budget counts; it counted every worker's wait, so eight workers throttled for half a
    second used up four seconds of it and many workers failed runs that should have waited."""
    emu.rate_limit_kind = "concurrent"

    def real_sleeps(tenant_name: str, settings: Any) -> GoogleWorkspaceConnector:
        return build(tenant_name, settings, policy=RetryPolicy(max_attempts=4, max_total_wait=2))

    h = harness({"g1": tenant(emu, tmp_path, member_workers=8)}, connector_factory=real_sleeps)
    emu.faults.update({"rate_limit": 8, "path": "/members"})
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    assert emu.faults.rate_limit == 0
    assert h.members("g1") == expected_members(emu)


def test_sync_a_tenant_throttled_past_its_retry_budget_can_be_given_more(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """A large tenant spends minutes of each run waiting on Google's per-minute quota: the run's
    retry budget was a fixed 300 s, and a tenant that needed more failed every run with nothing to
    raise. `max_retry_wait` is that budget (scaled down here: one backoff of 0.5 s passes 0.4 s)."""
    h = harness({"g1": tenant(emu, tmp_path, max_retry_wait=0.4)})
    emu.faults.update({"rate_limit": 1, "path": "/admin/directory/v1/users"})
    r = h.sync("g1")
    assert r.status == "failed" and "cap on retry waits" in (r.error or ""), r.error
    raised = harness({"g1": tenant(emu, tmp_path, max_retry_wait=5)})
    emu.faults.update({"rate_limit": 1, "path": "/admin/directory/v1/users"})
    r = raised.sync("g1")
    assert r.status == "succeeded", r.error
    assert emu.faults.rate_limit == 0 and raised.members("g1") == expected_members(emu)


def test_sync_max_retry_attempts_caps_an_outage_but_not_the_quotas_minimum(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """`max_retry_attempts` gives up on an outage after that many attempts; a throttled request
    still gets its 9 (Google's quota is per minute)."""
    h = harness({"g1": tenant(emu, tmp_path, max_retry_attempts=1)})
    emu.faults.update({"error": 1, "error_status": 503, "path": "/admin/directory/v1/users"})
    r = h.sync("g1")
    assert r.status == "failed" and "gave up after 1 attempts" in (r.error or ""), r.error
    emu.faults.update({"rate_limit": 1, "path": "/admin/directory/v1/users"})
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    assert emu.faults.rate_limit == 0


def test_sync_persistent_failure_leaves_the_store_unchanged(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    h = harness({"g1": tenant(emu, tmp_path)}, connector_factory=fast)
    assert h.sync("g1").status == "succeeded"
    users_before, members_before, seq = h.users("g1"), h.members("g1"), h.last_seq()
    emu.org.hire("Late", "Arrival")
    emu.org.delete(30)
    emu.faults.update({"error": 1000, "error_status": 503, "path": "/members"})
    r = h.sync("g1")
    assert r.status == "failed" and "503" in (r.error or "")
    assert h.users("g1") == users_before and h.members("g1") == members_before and h.last_seq() == seq
    emu.faults.clear()
    r = h.sync("g1")
    assert r.status == "succeeded" and r.counts["users_created"] == 1 and r.counts["users_deleted"] == 1


class _ChangesAfterTheListing(GoogleEmulator):
    """Runs `then` once, right after serving the last page of users.list: a change made while a
    run reads, after its user listing and before its groups' members."""

    then: Callable[[], None] | None = None

    def _users_list(self, req: Request) -> Response:
        answer = super()._users_list(req)
        if self.then is not None and answer.status == 200 and "nextPageToken" not in answer.body:
            then, self.then = self.then, None
            then()
        return answer


@pytest.mark.parametrize(
    "scope", [{}, {"groups": [group_id(1)]}, {"org_units": ["/Engineering"]}, {"org_units": ["/Sales"]}]
)
def test_sync_a_person_hired_while_the_run_reads_is_a_user_of_that_run(
    tmp_path: Path, harness: Any, scope: dict[str, Any]
) -> None:
    """Google has no delta. A person hired after users.list has passed them, and put in a group
    before its members are read, is a member the run has no user for: kept on the group as an
    external address (a `group.updated`, another once the next run listed them), then left out of
    the run until one listed them. Google says who they are (users.get): a user of this run, with
    their memberships (in the tenant's scope as users.list would have scoped them), and the next run
    has nothing to change."""
    org = Org.generate(60, seed=7)
    with _ChangesAfterTheListing(org) as emu:
        h = harness({"g1": tenant(emu, tmp_path, **scope)}, connector_factory=fast)
        assert h.sync("g1").status == "succeeded"
        hired: list[int] = []

        def hire() -> None:
            hired.append(org.hire("Mia", "Midrun").n)
            org.add_member(1, hired[0])

        emu.then = hire
        seq = h.last_seq()
        r = h.sync("g1")
        assert r.status == "succeeded", r.error
        uid = user_id(hired[0])
        if scope.get("org_units") == ["/Sales"]:  # hired into Engineering: not this tenant's
            assert h.changes("g1", after=seq) == [] and uid not in h.users("g1")
        else:
            assert (group_id(1), uid) in h.members("g1")
            assert Counter(h.changes("g1", after=seq)) == Counter(
                [("user.created", uid)]
                + [("group.user_added", g, u) for g, u in expected_members(emu) if u == uid and g in h.groups("g1")]
            )
        address = org.people[hired[0]].email
        assert not [g for g in h.groups("g1").values() if address in g["raw_attributes"].get("externalMembers", [])]
        assert not [n for n in r.notes if "users.list did not return" in n]

        r = h.sync("g1")
        assert r.status == "succeeded" and r.events == 0, r.error
        # Stored as the listing gives it: the next run's digest matched without a users.get.
        assert not [p for _, p in emu.request_log if f"/users/{uid}" in p.split("?")[0]][1:]


def test_sync_an_unmanaged_account_with_a_company_address_stays_an_external_member(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """A Google account using a company address that is not the customer's (an unmanaged,
    "conflicting" account) is a USER member users.list never returns: it was left out of every
    run with the same note. Google does not find it (users.get 404): an outsider, kept on the group
    by address, without a note, and the next run changes nothing."""
    address = f"old.contractor@{emu.org.domain}"
    emu.unmanaged_members[2] = {address}
    h = harness({"g1": tenant(emu, tmp_path)}, connector_factory=fast)
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    assert address in h.groups("g1")[group_id(2)]["raw_attributes"]["externalMembers"]
    assert not [n for n in r.notes if "users.list did not return" in n]
    assert set(h.users("g1")) == {user_id(p.n) for p in emu.org.listed_people()}
    r = h.sync("g1")
    assert r.status == "succeeded" and r.events == 0, r.error
    assert not [n for n in r.notes if "users.list did not return" in n]


@pytest.mark.parametrize("refusal", ["forbidden", "failing"])
def test_sync_a_member_users_get_cannot_read_is_left_out_with_a_note(
    emu: GoogleEmulator, tmp_path: Path, harness: Any, refusal: str
) -> None:
    """A member users.list did not return and users.get may not read (a user outside what this
    admin sees: 403) or cannot (it keeps failing): who they are is not known, so they are left out
    of the run, neither a user nor an external address that would flip once a run lists them, and
    the run says so."""
    org = emu.org
    hidden = next(n for n in sorted(org.groups[3].members) if n != 1)
    emu.hidden_people.add(hidden)  # users.list leaves them out, users.get answers 403
    if refusal == "failing":
        emu.faults.update({"error": 1000, "error_status": 503, "path": "/admin/directory/v1/users/"})
    listed = {p.n for p in org.listed_people()} - {hidden}
    h = harness({"g1": tenant(emu, tmp_path)}, connector_factory=fast)
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    uid = user_id(hidden)
    assert uid not in h.users("g1") and not [m for m in h.members("g1") if m[1] == uid]
    assert h.members("g1") == expected_members(emu, listed)
    address = emu._email(org.people[hidden])
    assert not [g for g in h.groups("g1").values() if address in g["raw_attributes"].get("externalMembers", [])]
    assert "1 member(s) with an address of this directory that users.list did not return and users.get " \
        "could not read" in " ".join(r.notes)
    r = h.sync("g1")
    assert r.status == "succeeded" and r.events == 0, r.error


def test_sync_asks_users_get_about_a_bounded_number_of_unlisted_members(
    emu: GoogleEmulator, tmp_path: Path, harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory whose groups hold many accounts users.list does not return (unmanaged accounts
    with company addresses) costs at most UNLISTED_READS users.get a run; the rest are left out,
    and the run says how many were not checked."""
    monkeypatch.setattr("dirpull.connectors.google_workspace.UNLISTED_READS", 2)
    emu.unmanaged_members[2] = {f"unmanaged.{i}@{emu.org.domain}" for i in range(3)}
    h = harness({"g1": tenant(emu, tmp_path)}, connector_factory=fast)
    emu.request_log.clear()
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    assert len([p for _, p in emu.request_log if "/admin/directory/v1/users/" in p]) == 2
    assert len(h.groups("g1")[group_id(2)]["raw_attributes"].get("externalMembers", [])) == 2
    assert "1 member(s) with an address of this directory that users.list did not return not checked " \
        "(users.get is asked about at most 2 a run)" in " ".join(r.notes)
    r = h.sync("g1")
    assert r.status == "succeeded" and r.events == 0, r.error


def test_sync_with_api_url_set_to_the_api_root_fails_with_a_configuration_error(
    emu: GoogleEmulator, tmp_path: Path, harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tenant(emu, tmp_path)
    cfg["api_url"] += "/admin/directory/v1"
    h = harness({"g1": cfg}, connector_factory=fast)
    with caplog.at_level("ERROR"):
        r = h.sync("g1")
    assert r.status == "failed" and "check api_url" in (r.error or "")
    assert not [rec for rec in caplog.records if "unexpected error" in rec.getMessage()]
    assert h.users("g1") == {}


def test_sync_a_silent_empty_listing_is_held_not_applied(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    h = harness({"g1": tenant(emu, tmp_path)}, connector_factory=fast)
    assert h.sync("g1").status == "succeeded"
    stored, seq = h.users("g1"), h.last_seq()
    emu.silent_empty = True  # users.list answers 200 with no `users` key
    r = h.sync("g1")
    assert r.status == "held"
    assert h.users("g1") == stored and h.last_seq() == seq


def test_a_held_run_says_what_helps_for_google_not_a_full_sync(
    emu: GoogleEmulator, tmp_path: Path, store_url: str
) -> None:
    """The guard's hold said to review and apply with `dirpull sync T --full`: every Google run is
    a full snapshot already, so that resync read the same listing and was held again. The hold (in
    the run's error and in `dirpull status`) says what does help."""
    import json

    from typer.testing import CliRunner

    from dirpull.cli import app

    config = tmp_path / "dirpull.toml"
    table = tenant(emu, tmp_path)
    lines = ["[store]", f'url = "{store_url}"', "[defaults.guard]", "max_percent = 10", "min_count = 5", "[tenants.g1]"]
    config.write_text("\n".join([*lines, *(f"{k} = {json.dumps(v)}" for k, v in table.items())]) + "\n")

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, ["--config", str(config), *args], catch_exceptions=False)

    assert cli("sync", "g1").exit_code == 0
    for n in range(20, 40):
        emu.org.delete(n)
    steps = ("every Google Workspace run reads the whole directory (--full changes nothing): if the tenant's "
             "org_units / groups or the admin's access are wrong, fix them and sync again; otherwise review with "
             "`dirpull sync g1 --dry-run`, apply with `dirpull sync g1 --force`")  # fmt: skip
    for args in (("sync", "g1"), ("sync", "g1", "--full")):
        held = cli(*args)
        assert held.exit_code == 3 and held.stderr.rstrip().endswith(steps), held.stderr
        assert "sync g1 --full" not in held.stderr
    status = [json.loads(line) for line in cli("status", "--json").stdout.splitlines() if line.strip()]
    (attention,) = status[0]["attention"]
    assert attention.startswith("held by the guard: would deactivate or delete "), attention
    assert attention.endswith(steps), attention
    assert cli("sync", "g1", "--force").exit_code == 0


def test_sync_a_user_leaving_the_org_unit_scope_is_deleted(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    org = emu.org
    h = harness({"g1": tenant(emu, tmp_path, org_units=["/Engineering"])}, connector_factory=fast)
    assert h.sync("g1").status == "succeeded"
    eng = sorted(p.n for p in org.listed_people() if p.department == "Engineering")
    assert set(h.users("g1")) == {user_id(n) for n in eng}
    seq = h.last_seq()
    mover = eng[-1]
    org.update_person(mover, department="Sales")
    r = h.sync("g1")
    assert r.status == "succeeded"
    changes = h.changes("g1", after=seq)
    assert ("user.deleted", user_id(mover)) in changes
    assert all(c[0] in ("user.deleted", "group.user_removed") for c in changes)
    assert {c[2] for c in changes if c[0] == "group.user_removed"} <= {user_id(mover)}
    assert user_id(mover) not in h.users("g1")



def test_sync_a_broken_record_outside_the_scope_is_not_this_tenants_quarantine(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    org = emu.org
    h = harness({"g1": tenant(emu, tmp_path, org_units=["/Engineering"])}, connector_factory=fast)
    assert h.sync("g1").status == "succeeded"
    eng = sorted(p.n for p in org.listed_people() if p.department == "Engineering")
    outside = next(p.n for p in org.listed_people() if p.department != "Engineering")
    emu.broken_users = {outside, eng[-1]}  # served without primaryEmail
    r = h.sync("g1")
    assert r.status == "succeeded", r.error
    assert r.counts["quarantined"] == 1  # the Engineering one only
    assert user_id(eng[-1]) in h.users("g1")  # left as stored


def test_sync_an_emptied_group_scope_is_held_as_empty_not_as_unreadable(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    org = emu.org
    eng = next(g for g in org.groups.values() if g.name == "Engineering")
    h = harness({"g1": tenant(emu, tmp_path, groups=[eng.email])}, connector_factory=fast)
    assert h.sync("g1").status == "succeeded"
    outside = next(p.n for p in org.listed_people() if p.n not in eng.members)
    emu.broken_users = {outside}
    org.delete_group(eng.n)  # the configured group is gone: no user is in scope
    r = h.sync("g1")
    assert r.status == "held"
    assert "the directory returned no users" in (r.error or "") + " ".join(r.notes)
    assert "quarantined" not in (r.error or "") + " ".join(r.notes)

# --- cost (opt-in: DIRPULL_BENCH=10000 pytest tests/test_google_workspace_connector.py -k cost -s) -----


def _serve(people: int, workdir: str, conn: Any) -> None:
    org = Org.generate(people, seed=1)
    emulator = GoogleEmulator(org)
    emulator.start()
    try:
        conn.send(emulator.tenant_config("bench", Path(workdir)))
        conn.recv()  # until the parent is done
    finally:
        emulator.stop()


@pytest.mark.skipif(not os.environ.get("DIRPULL_BENCH"), reason="benchmark: set DIRPULL_BENCH=<people>")
def test_cost_per_user(tmp_path: Path) -> None:
    import multiprocessing
    import resource
    import time

    people = int(os.environ["DIRPULL_BENCH"])
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(people, str(tmp_path), child), daemon=True)
    proc.start()
    try:
        settings = GoogleTenant.model_validate(parent.recv())
        c = build("bench", settings)
        for run in range(2):
            start = time.perf_counter()
            n_users = n_members = 0
            for item in c.pull(None, full=True):
                if isinstance(item, Page):
                    n_users += len(item.users)
                    n_members += sum(1 for _ in item.pairs())
                else:
                    done = item
            took = time.perf_counter() - start
            print(
                f"\nrun {run + 1}: {n_users} users, {n_members} memberships, {done.requests} requests, "
                f"{took:.2f}s, {took / n_users * 1e6:.0f} µs/user, "
                f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
            )
    finally:
        parent.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()


def test_a_token_answer_that_is_not_json_is_retried_and_then_fails_naming_the_token_endpoint(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    clean, _ = pull(connector(emu, tmp_path))
    emu.faults.update({"malformed": 1, "path": "/token"})
    sleeps = Sleeps()
    pages, _ = pull(connector(emu, tmp_path, sleeps))
    assert users(pages) == users(clean) and len(sleeps) == 1
    emu.faults.update({"malformed": 1000, "path": "/token"})
    with pytest.raises(ConnectorError) as err:  # not google-auth's bare TypeError
        pull(connector(emu, tmp_path, Sleeps()))
    assert str(err.value).startswith(
        "users.list: the token endpoint answered 200 with a body that is not a JSON object (application/json"
    )
    assert "gave up after 5 attempts" in str(err.value) and err.value.retriable


def test_a_token_endpoint_answering_a_rate_limit_is_waited_out_not_taken_for_a_refused_grant(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    """A throttling in the API's error shape from the token endpoint (403 userRateLimitExceeded)
    failed the run at once as "the token endpoint refused the service-account grant", quoting the
    error as a Python dict. (A 429 google-auth retries itself.)"""
    clean, _ = pull(connector(emu, tmp_path))
    emu.rate_limit_kind = "user"
    emu.faults.update({"rate_limit": 2, "path": "/token"})
    sleeps = Sleeps()
    pages, _ = pull(connector(emu, tmp_path, sleeps))
    assert users(pages) == users(clean) and len(sleeps) >= 1
    emu.faults.update({"rate_limit": 1000, "path": "/token"})
    with pytest.raises(ConnectorError) as err:
        pull(connector(emu, tmp_path, Sleeps()))
    msg = str(err.value)
    assert msg.startswith("users.list: the token endpoint is rate limited: "), msg
    assert "Rate Limit Exceeded (" in msg and "{'code'" not in msg and err.value.retriable
    assert not isinstance(err.value, AuthError)


def test_a_token_endpoint_that_cannot_be_reached_is_the_url_named(emu: GoogleEmulator, tmp_path: Path) -> None:
    """The key file's token_uri is another host than api_url (oauth2.googleapis.com beside
    admin.googleapis.com): a proxy or firewall blocking it was reported as a failure talking to
    api_url, which answers fine."""
    from harness import closed_port

    with closed_port() as port:
        closed = f"http://127.0.0.1:{port}"
        sleeps = Sleeps()
        c = with_token_uri(emu, tmp_path, f"{closed}/token", sleeps)
        with pytest.raises(ConnectorError) as err:
            list(c.pull(None, full=False))
    message = str(err.value)
    assert f"talking to {closed}/token" in message and "Connection refused" in message, message
    assert emu.base_url not in message and len(sleeps) == 1


def test_a_token_refusal_with_an_empty_body_says_so_instead_of_ending_on_a_colon(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    """A gateway in front of the token endpoint answering a bare 403: google-auth quotes the empty
    body, and the run's error read "refused the service-account grant: " with nothing after it."""

    def bare_403(answer: Answer) -> Answer | None:
        return Answer(answer.path, 403, [], b"") if answer.path.startswith("/token") else None

    with proxying(emu.base_url, bare_403) as proxy:
        c = with_token_uri(emu, tmp_path, f"{proxy.base_url}/token", Sleeps())
        with pytest.raises(AuthError) as err:
            list(c.pull(None, full=False))
    refused = "users.list: the token endpoint refused the service-account grant"
    assert str(err.value) == f"{refused}: HTTP 403, no reason given"


@pytest.mark.parametrize(
    ("status", "content_type", "body", "said"),
    [
        (400, "application/json", b'{"error":"invalid_grant"}', "invalid_grant"),
        (401, "application/json", b'{"error":"invalid_client","error_description":null}', "invalid_client"),
        (400, "application/json", b'{"error":"invalid_grant","error_description":" "}', "invalid_grant"),
        (401, "text/html", b"<html><body><h1>401 Authorization Required</h1><p>assertion=eyJhbGciOi.eyJpc3Mi.c2ln"
         b"</p></body></html>", "401 Authorization Required assertion=***"),
    ],
)
def test_a_token_refusal_without_a_description_quotes_the_error_alone(
    emu: GoogleEmulator, tmp_path: Path, status: int, content_type: str, body: bytes, said: str
) -> None:
    """A token endpoint answering an OAuth `error` without `error_description`: google-auth words it
    "invalid_grant: None", and the run's error quoted that None as if it were the reason."""

    def refuse(answer: Answer) -> Answer | None:
        token = answer.path.startswith("/token")
        return Answer(answer.path, status, [("Content-Type", content_type)], body) if token else None

    with proxying(emu.base_url, refuse) as proxy:
        c = with_token_uri(emu, tmp_path, f"{proxy.base_url}/token", Sleeps())
        with pytest.raises(AuthError) as err:
            list(c.pull(None, full=False))
    assert str(err.value) == f"users.list: the token endpoint refused the service-account grant: {said}"


def test_a_long_token_refusal_is_cut_with_an_ellipsis_on_one_line(emu: GoogleEmulator, tmp_path: Path) -> None:
    """A gateway's page or a long error_description: the run's error shows its first 200 characters
    on one line and says it was cut, instead of ending mid-word as though that were all of it."""
    page = ("Access denied by policy.\n" + "Contact your administrator about this request. " * 20).encode()

    def long_403(answer: Answer) -> Answer | None:
        token = answer.path.startswith("/token")
        return Answer(answer.path, 403, [("Content-Type", "text/plain")], page) if token else None

    with proxying(emu.base_url, long_403) as proxy:
        c = with_token_uri(emu, tmp_path, f"{proxy.base_url}/token", Sleeps())
        with pytest.raises(AuthError) as err:
            list(c.pull(None, full=False))
    message = str(err.value)
    assert message.startswith("users.list: the token endpoint refused the service-account grant: "), message
    assert message.endswith("…") and "\n" not in message, message
    assert len(message) < 400


def test_a_run_held_after_an_attributes_change_says_the_change_may_be_the_cause(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """Google keeps no cursor (every run is a full snapshot), and the settings a run was made under
    were stored only beside a connector's cursor: a hold after an `attributes` path was mistyped
    asked only about the scope and the admin's access, never about the operator's own edit."""
    guard = {"max_percent": 10, "min_count": 5}
    mapped = tenant(emu, tmp_path, attributes={"cost_center": "organizations[primary].costCenter"})
    assert harness({"g1": mapped}, guard=guard).sync("g1").status == "succeeded"
    typo = {**mapped, "attributes": {"cost_center": "organizations[primary].costCentre"}}
    held = harness({"g1": typo}, guard=guard).sync("g1")
    assert held.status == "held", held.error
    assert (held.error or "").endswith(
        "; the tenant's settings changed since its last applied sync: if this is what the change does, review with "
        "`dirpull sync g1 --dry-run`, apply with `dirpull sync g1 --force`; if not, correct the settings"
    ), held.error
    again = harness({"g1": mapped}, guard=guard).sync("g1")
    assert again.status == "succeeded" and again.events == 0, again.error


def test_a_token_endpoint_redirecting_to_another_host_gets_no_signed_grant_there(
    emu: GoogleEmulator, tmp_path: Path
) -> None:
    # httplib2 sends a POST's body again on 308: the signed grant, which the other host could
    # trade for an access token to the whole directory.
    with redirecting(308) as servers:
        c = with_token_uri(emu, tmp_path, f"{servers.redirector}/token", Sleeps())
        with pytest.raises(ConnectorError) as err:
            list(c.pull(None, full=False))
    assert servers.seen == []
    assert str(err.value).startswith(
        f"users.list: the answer from {servers.redirector}/token redirects to another host ({servers.foreign}/token)"
    )
    assert not err.value.retriable


@pytest.mark.parametrize("status", [302, 307])
def test_a_token_endpoint_answering_a_redirect_says_where_it_pointed(
    emu: GoogleEmulator, tmp_path: Path, status: int
) -> None:
    """httplib2 does not follow a POST's 302 or 307 (good: no grant goes elsewhere), and google-auth
    read the empty answer as a refusal: "the token endpoint refused the service-account grant: "
    with nothing after it, an AuthError that sent the admin to check the delegation."""
    with redirecting(status) as servers:
        sleeps = Sleeps()
        c = with_token_uri(emu, tmp_path, f"{servers.redirector}/token", sleeps)
        with pytest.raises(ConnectorError) as err:
            list(c.pull(None, full=False))
    assert servers.seen == [] and sleeps == []
    assert str(err.value).startswith(
        f"users.list: the token endpoint {servers.redirector}/token answered HTTP {status}, a redirect to "
        f"{servers.foreign}/token; not followed with the service account's signed grant"
    ), str(err.value)
    assert not isinstance(err.value, AuthError) and not err.value.retriable


@pytest.mark.parametrize("status", [302, 307])
def test_an_api_url_redirecting_to_another_host_is_not_followed(
    emu: GoogleEmulator, tmp_path: Path, status: int
) -> None:
    # httplib2 drops the bearer token there: the other host's 401 read as a refused delegation.
    with redirecting(status) as servers:
        sleeps = Sleeps()
        with pytest.raises(ConnectorError) as err:
            pull(connector(emu, tmp_path, sleeps, api_url=servers.redirector))
    assert servers.seen == [] and sleeps == [] and not isinstance(err.value, AuthError)
    assert f"from {servers.redirector}/admin/directory/v1/users?" in str(err.value)
    assert f"redirects to another host ({servers.foreign}/admin/directory/v1/users?" in str(err.value)


def test_a_resync_getting_a_users_emails_and_a_groups_aliases_in_another_order_is_silent(
    emu: GoogleEmulator, tmp_path: Path, harness: Any
) -> None:
    """Google promises no order for a user's `emails`, `aliases` or `organizations`, nor a group's
    aliases: the same directory listed with them in another order is no change (no event, no row),
    and the user's `emails` come in one order, the primary first. Dropping an alias still is one."""
    person = next(p for p in emu.org.listed_people() if p.n != 1)
    uid, gid = user_id(person.n), group_id(next(iter(emu.org.listed_groups())).n)
    order = {"reversed": False, "drop": False}

    def present(answer: Answer) -> Answer | None:
        if answer.status != 200 or "/admin/directory/v1/" not in answer.path:
            return None
        body = json.loads(answer.body)
        for user in body.get("users") or []:
            if user["id"] == uid:
                primary = user["primaryEmail"]
                extra = [f"x{i}.{person.n}@{emu.org.domain}" for i in range(1, 4)]
                if order["drop"]:
                    extra.pop()
                user["aliases"] = extra
                user["emails"] = [{"address": primary, "primary": True}] + [{"address": a} for a in extra]
                user["organizations"] = [{"title": "Lead", "department": "Ops"}, {"title": "Adviser"}]
        for group in body.get("groups") or []:
            if group["id"] == gid:
                group["aliases"] = [f"g{i}@{emu.org.domain}" for i in range(1, 4)]
        if order["reversed"]:
            for user in body.get("users") or []:
                for key in ("emails", "aliases", "organizations"):
                    if isinstance(user.get(key), list):
                        user[key].reverse()
            for group in body.get("groups") or []:
                if isinstance(group.get("aliases"), list):
                    group["aliases"].reverse()
        return Answer(answer.path, answer.status, answer.headers, json.dumps(body).encode())

    with proxying(emu.base_url, present) as proxy:
        h = harness({"g1": tenant(emu, tmp_path, api_url=proxy.base_url)}, connector_factory=fast)
        assert h.sync("g1").status == "succeeded"
        stored = h.users("g1")[uid]
        assert stored["emails"][0] == stored["email"] and len(stored["emails"]) == 4
        assert stored["job_title"] == "Lead"
        order["reversed"] = True
        again = h.sync("g1")
        assert again.status == "succeeded", again.error
        assert (again.events, again.counts["rows_written"]) == (0, 0), h.changes("g1")
        assert h.users("g1")[uid]["emails"] == stored["emails"]
        assert h.users("g1")[uid]["job_title"] == "Lead"

        seq = h.last_seq()
        order["drop"] = True
        assert h.sync("g1").status == "succeeded"
        assert h.changes("g1", after=seq) == [("user.updated", uid, ("emails", "raw_attributes"))]
        assert f"x3.{person.n}@{emu.org.domain}" not in h.users("g1")[uid]["emails"]
