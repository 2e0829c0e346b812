"""Property-based check of every connector against its emulator: hypothesis builds small
organisations (5-30 people, 0-6 groups, nesting; unicode, empty, padded and long values; missing,
deleted and terminated managers; inactive, future-hire, guest, soft- and hard-deleted people; two
people with one address where the vendor allows it), the emulator serves them over loopback HTTP,
the REAL connector reads them through its real SDK, and what lands in the real store (SQLite) is
compared with an expectation derived from the Org model and docs/providers/*.md, not from the
connectors' code. Then three rounds of changes (hypothesis-chosen edits and `Org.random_changes`;
the first round made while an incremental run is reading, so the next run must find it) are each
synced incrementally and compared, then a full sync is compared; a resync of an unchanged
organisation, incremental or full, emits no events and writes nothing.

Where the expectation differs by provider it says why (the provider page, or the report of the
review that added this test: the HR connectors trim values; Entra keeps an empty string).

Deterministic (derandomized, no example database), no shrinking (each example is several syncs),
15 examples per provider; `ORGPROP_EXAMPLES=150` explores further.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import SyncHarness
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dirpull.connectors import is_available as connector_available
from dirpull.emulators import EMULATOR_CLASSES, emulator_class
from dirpull.emulators import is_available as emulator_available
from dirpull.emulators.org import Org, Person

PROVIDERS = [p for p in EMULATOR_CLASSES if emulator_available(p) and connector_available(p)]

# Names as people have them: accents, scripts, apostrophes, one long one (no empty names:
# every vendor requires a given and a family name; Okta takes at most 50, and a
# login and secondEmail of at most 100).
NAMES = st.sampled_from(
    ["Zoë", "O'Brien", "Nguyễn", "李", "Ødegaard", "van Rossum", "Anne-Marie", "X" * 35, "Ли", "𝔄da"]
)
TEXTS = st.sampled_from([None, "Engineering", "R&D", "Ünïcode Dept", "L" * 200, "Sales / EMEA", " padded ", ""])

# Google (primaryEmail) and Entra ID (mail, a proxy address) never give two accounts one address.
UNIQUE_EMAILS = {"google_workspace", "entra_id"}
# The HR reports' connectors trim their string values (workday.py, bamboohr.py; not in their docs).
TRIMMED = {"workday", "bamboohr"}

# Per Org (by id): people restored after a soft delete since the last full sync. entra_id.md,
# "Known limits": their reports get their manager back only when their own record changes or at
# the next full reconciliation.
RESTORED: dict[int, set[int]] = {}

# One edit of the organisation, applied by `apply`; indexes are taken modulo what exists.
EDITS = st.one_of(
    st.tuples(st.just("rename"), st.integers(0, 99), NAMES, NAMES),
    st.tuples(st.just("title"), st.integers(0, 99), TEXTS),
    st.tuples(st.just("department"), st.integers(0, 99), TEXTS),
    st.tuples(st.just("no_email"), st.integers(0, 99)),
    st.tuples(st.just("deactivate"), st.integers(0, 99), st.sampled_from(["terminated", "suspended", "archived"])),
    st.tuples(st.just("reactivate"), st.integers(0, 99)),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("manager"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("no_manager"), st.integers(0, 99)),
    st.tuples(st.just("join"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("leave"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("nest"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("group_rename"), st.integers(0, 99), st.sampled_from(["Ops", "Équipe", "G" * 150])),
    st.tuples(st.just("group_delete"), st.integers(0, 99)),
    st.tuples(st.just("group_describe"), st.integers(0, 99), st.sampled_from([None, "", "Ünïcode team", "D" * 300])),
    st.tuples(st.just("group_create"), st.sampled_from(["New team", "Équipe neuve"])),
    st.tuples(st.just("hire"), NAMES, NAMES, st.integers(0, 99)),
    # Two people with one address (HR systems allow it; a rehire, a shared mailbox).
    st.tuples(st.just("email_of"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("soft_delete"), st.integers(0, 99)),
    st.tuples(st.just("restore"), st.integers(0, 99)),
    st.tuples(st.just("guest"), st.integers(0, 99), st.booleans()),
    # A termination date in the past, today or to come, on a person still active (HR systems).
    st.tuples(st.just("termination"), st.integers(0, 99), st.sampled_from([-400, -1, 0, 1, 30])),
    # A hire date to come (a future hire), or after a past termination (a rehire).
    st.tuples(st.just("hire_date"), st.integers(0, 99), st.sampled_from([-30, -1, 0, 1, 20])),
)


def apply(org: Org, edit: tuple[Any, ...]) -> None:
    kind, *args = edit
    people = sorted(n for n, p in org.people.items() if p.visible)
    groups = sorted(n for n, g in org.groups.items() if not g.deleted)
    everyone = sorted(org.people)  # deleted ones too: a manager may be gone
    if kind == "hire":
        org.hire(args[0], args[1], manager=everyone[args[2] % len(everyone)] if everyone else None)
        return
    if kind == "group_create":
        org.create_group(args[0])
        return
    if kind.startswith("group_") or kind == "nest":
        if not groups:
            return
        g = groups[args[0] % len(groups)]
        if kind == "group_rename":
            org.update_group(g, name=args[1])
        elif kind == "group_delete":
            org.delete_group(g)
        elif kind == "group_describe":
            org.update_group(g, description=args[1])
        else:
            # Nesting only into a group with a higher number: no cycles (no vendor allows them).
            child = groups[args[1] % len(groups)]
            if child > g:
                g, child = child, g
            if child != g:
                org.add_subgroup(g, child)
        return
    if kind == "restore":
        hidden = sorted(n for n, p in org.people.items() if p.soft_deleted and not p.deleted)
        if hidden:
            org.restore(hidden[args[0] % len(hidden)])
            RESTORED.setdefault(id(org), set()).add(hidden[args[0] % len(hidden)])
        return
    if not people:
        return
    n = people[args[0] % len(people)]
    if kind == "rename":
        org.rename(n, args[1], args[2])
    elif kind in ("title", "department"):
        org.update_person(n, **{kind: args[1]})
    elif kind == "no_email":
        org.update_person(n, email=None)
    elif kind == "deactivate" and n != 1:
        org.deactivate(n, args[1], termination_date="2024-01-31")
    elif kind == "reactivate":
        org.reactivate(n)
    elif kind == "delete" and n != 1:
        org.delete(n)
    elif kind == "manager" and n != 1:
        m = everyone[args[1] % len(everyone)]
        if m != n:
            org.update_person(n, manager=m)
    elif kind == "email_of":
        org.update_person(n, email=org.people[people[args[1] % len(people)]].email)
    elif kind == "soft_delete" and n != 1:
        org.soft_delete(n)
    elif kind == "guest" and n != 1:
        org.update_person(n, guest=args[1])
    elif kind == "termination" and n != 1:
        org.schedule_termination(n, (date.today() + timedelta(days=args[1])).isoformat())
    elif kind == "hire_date" and n != 1:
        org.update_person(n, hire_date=(date.today() + timedelta(days=args[1])).isoformat())
    elif kind == "no_manager":
        org.update_person(n, manager=None)
    elif kind in ("join", "leave") and groups:
        g = groups[args[1] % len(groups)]
        (org.add_member if kind == "join" else org.remove_member)(g, n)


# --- the expectation, per provider, from the Org model and docs/providers/*.md --------------------


def _ids(provider: str) -> tuple[Callable[[int], str], Callable[[int], str]]:
    if provider == "okta":
        from dirpull.emulators.okta_api import group_id, user_id
    elif provider == "entra_id":
        from dirpull.emulators.graph_api import group_id, user_id
    elif provider == "google_workspace":
        from dirpull.emulators.google_api import group_id, user_id
    elif provider == "workday":
        from dirpull.emulators.workday_api import employee_id as user_id
        from dirpull.emulators.workday_api import group_id
    else:
        return str, str
    return user_id, group_id


def _trim(provider: str, text: str | None) -> str | None:
    """A title or department as stored: trimmed by the HR connectors; empty is none, but for
    Entra ID, whose Graph sends an empty string as one (the other emulators leave it out)."""
    if text is not None and provider in TRIMMED:
        text = text.strip()
    return text if provider == "entra_id" else text or None


def expected_state(provider: str, p: Person) -> str:
    utc_today = datetime.now(UTC).date().isoformat()  # the BambooHR emulator's date
    if p.state == "inactive":
        return "inactive"
    if provider == "workday" and p.termination_date and p.hire_date <= p.termination_date < date.today().isoformat():
        return "inactive"  # docs/providers/workday.md: a past Termination_Date makes the worker inactive
    if provider == "bamboohr" and p.hire_date > utc_today:
        return "inactive"  # docs/providers/bamboohr.md: a future hire is Inactive until their hire date
    if provider == "bamboohr" and p.termination_date and p.hire_date <= p.termination_date <= utc_today:
        return "inactive"  # docs/providers/bamboohr.md: a scheduled termination is Inactive from its date on
    return "active"


def expected_manager(provider: str, org: Org, p: Person, uid: Callable[[int], str]) -> str | None:
    boss = org.people.get(p.manager) if p.manager is not None else None
    if boss is None:
        return None
    if provider == "okta":
        return uid(boss.n)  # okta.md: profile.managerId is kept when the manager is deleted
    # Entra clears it when the manager is deleted (soft or hard); Google cannot resolve the address
    # of a deleted manager; BambooHR and Workday stop naming a deleted supervisor.
    return uid(boss.n) if boss.visible else None


# users by id, groups by id, (group id, user id) memberships
Directory = tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], set[tuple[str, str]]]


def expected(provider: str, org: Org, emulator: Any) -> Directory:
    uid, gid = _ids(provider)
    users: dict[str, dict[str, Any]] = {}
    for p in org.listed_people():
        email, username, number = p.email, p.username, p.employee_number
        emails = [p.email] if p.email else []
        if provider == "google_workspace":
            email = username = p.email or p.username  # every Google account has a primary address
            emails = [email]
            if p.email and p.n % 4 == 0:  # the emulator's alias, made when the account was created
                given, family = [*p.username.split("@")[0].split("."), "x", "x"][:2]
                emails.append(f"{given[:1]}{family}.{p.n}@{org.domain}")
        elif provider == "okta" and p.email and p.n % 4 == 0:
            emails.append(p.email.replace("@", "+alt@"))  # profile.secondEmail
        elif provider == "entra_id":
            if p.guest:
                from dirpull.emulators.graph_api import _guest_upn

                username = _guest_upn(p)
            if p.email and p.n % 5 == 0:
                emails.append(p.email.replace("@", "@alias.", 1))  # otherMails
        elif provider == "bamboohr":
            username = p.email  # bamboohr.md: workEmail is email and username
        elif provider == "workday":
            number = uid(p.n)  # workday.md: employee_number is the idp_id
        users[uid(p.n)] = {
            "username": username,
            "emails": emails,
            "employee_number": number,
            "email": email,
            "first_name": p.given,
            "last_name": p.family,
            "display_name": p.display,
            "state": expected_state(provider, p),
            "job_title": _trim(provider, p.title),
            "department": _trim(provider, p.department),
            "manager_idp_id": expected_manager(provider, org, p, uid),
        }
    groups: dict[str, dict[str, Any]] = {}
    members: set[tuple[str, str]] = set()
    if provider != "bamboohr":  # BambooHR has no groups
        for g in org.listed_groups():
            # An empty description is none (google_workspace.md; okta.py and workday.py alike);
            # Entra ID stores it as Graph sends it (see the report).
            description = g.description if provider == "entra_id" else g.description or None
            groups[gid(g.n)] = {"name": g.name, "description": description}
            # Every provider's memberships are flattened (Okta's groups do not nest: its emulator
            # serves the flattened members, as a nested import would).
            members.update((gid(g.n), uid(n)) for n in org.transitive_members(g.n))
            if provider == "google_workspace" and _holds_customer(org, g.n, emulator.customer_groups):
                # google_workspace.md: a CUSTOMER member (the whole domain) is expanded to every user.
                members.update((gid(g.n), key) for key in users)
    return users, groups, members


def _holds_customer(org: Org, g: int, customer_groups: set[int]) -> bool:
    """Group g or a group nested in it (at any depth) has Google's CUSTOMER member."""
    seen, stack = set(), [g]
    while stack:
        cur = stack.pop()
        if cur in seen or org.groups[cur].deleted:
            continue
        seen.add(cur)
        if cur in customer_groups:
            return True
        stack.extend(org.groups[cur].subgroups)
    return False


def after_full(when: str) -> bool:
    return when.startswith(("first full", "full"))


USER_KEYS = ("username", "emails", "employee_number", "email", "first_name", "last_name", "display_name", "state",
             "job_title", "department", "manager_idp_id")  # fmt: skip


def stored(h: SyncHarness) -> Directory:
    keys = USER_KEYS
    users = {k: {f: u[f] for f in keys} for k, u in h.users("t").items()}
    groups = {k: {"name": g["name"], "description": g["description"]} for k, g in h.groups("t").items()}
    return users, groups, h.members("t")


def check(provider: str, org: Org, emulator: Any, h: SyncHarness, when: str, *, partial: bool = False) -> None:
    """The store is what the organisation says. `partial`: deleted users and groups may still be
    stored (a deleted group with its memberships), as after an Okta incremental run; all else
    must match."""
    want_users, want_groups, want_members = expected(provider, org, emulator)
    users, groups, members = stored(h)
    if provider == "entra_id" and not after_full(when):
        uid = _ids(provider)[0]
        restored = {uid(n) for n in RESTORED.get(id(org), ())}
        for key, want in want_users.items():
            if want["manager_idp_id"] in restored and key in users and users[key]["manager_idp_id"] is None:
                want["manager_idp_id"] = None
    if partial:
        users = {k: v for k, v in users.items() if k in want_users}
        groups = {k: v for k, v in groups.items() if k in want_groups}
        # okta.md: a deleted user's memberships go at the next incremental run (deleting them
        # moves their groups' lastMembershipUpdated), before the user does.
        members = {(g, u) for g, u in members if g in want_groups}
    for key in sorted(want_users.keys() | users.keys()):
        assert users.get(key) == want_users.get(key), f"{when}: user {key}"
    assert groups == want_groups, when
    assert sorted(members - want_members) == [], f"{when}: memberships not in the organisation"
    assert sorted(want_members - members) == [], f"{when}: memberships missing"


def refused(provider: str, org: Org) -> bool:
    """workday.md: a groups report with rows none of which has a members column fails the run (a
    renamed alias would read as every membership deleted); Workday leaves an empty list out, so
    an organisation whose groups have no direct members is refused. Documented; see the report."""
    groups = list(org.listed_groups())
    return provider == "workday" and bool(groups) and not any(org.direct_members(g.n)[0] for g in groups)


def sync(h: SyncHarness, full: bool, provider: str = "", org: Org | None = None, progress: Any = None) -> Any:
    before = org is not None and refused(provider, org)
    r = h.sync("t", full=full, force=True, progress=progress)
    after = org is not None and refused(provider, org)  # changed while the run read (`progress`)?
    # Refused before and after: it must fail; refused at one end only: either outcome.
    if (before and after) or ((before or after) and r.status == "failed"):
        assert r.status == "failed" and "no row has a members column" in (r.error or ""), r.error
        raise Refused
    assert r.status == "succeeded", r.error
    assert not r.counts.get("quarantined"), r.counts
    return r


def silent(h: SyncHarness, full: bool) -> None:
    seq = h.last_seq()
    r = sync(h, full)
    assert r.events == 0 and r.counts["rows_written"] == 0, (r.mode, r.counts, h.changes("t", seq))


class Refused(Exception):
    """The run failed as documented: nothing more to compare in this example."""


ORGS = st.tuples(
    st.integers(5, 30),  # people
    st.integers(0, 6),  # groups
    st.integers(0, 10_000),  # seed
    st.lists(EDITS, max_size=12),  # before the first sync
    st.lists(EDITS, max_size=12),  # between the syncs
    st.integers(0, 8),  # random changes between the syncs
)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_store_mirrors_a_generated_organisation_through_the_real_connector(provider: str) -> None:
    @settings(
        max_examples=int(os.environ.get("ORGPROP_EXAMPLES", "15")),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(ORGS)
    def run(spec: tuple[Any, ...]) -> None:
        people, groups, seed, before, between, randoms = spec
        org = Org.generate(people, groups=groups, seed=seed)
        if provider in UNIQUE_EMAILS:
            before = [e for e in before if e[0] != "email_of"]
            between = [e for e in between if e[0] != "email_of"]
        for edit in before:
            apply(org, edit)
        emulator = emulator_class(provider)(org)
        emulator.start()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                table = emulator.tenant_config("t", Path(tmp))
                # Small pages, so a run reads in several requests and changes can land in between.
                if provider == "okta":
                    table["page_size"] = 4
                elif provider == "entra_id":
                    emulator.delta_page_size = 4
                h = SyncHarness(Path(tmp), {"t": table}, guard={"max_percent": 100, "min_count": 10_000})
                try:
                    sync(h, True, provider, org)
                    check(provider, org, emulator, h, "first full sync")
                    silent(h, full=False)
                    rng = random.Random(seed)
                    for i in range(3):  # three rounds of changes, each synced incrementally
                        pending = [between[i::3]]  # emptied once applied

                        def change(*_: Any, pending: list[list[Any]] = pending) -> None:
                            if pending:
                                for edit in pending.pop():
                                    apply(org, edit)
                                org.random_changes(randoms, rng)

                        if i == 0:
                            # While the run reads (after a page): the next run must find them.
                            sync(h, False, provider, org, progress=change)
                        change()  # no-op if applied during the run
                        sync(h, False, provider, org)
                        # Okta lists no tombstones: its deletions wait for a full sync.
                        check(provider, org, emulator, h, f"incremental sync {i + 1}", partial=provider == "okta")
                    sync(h, True, provider, org)
                    RESTORED.pop(id(org), None)
                    check(provider, org, emulator, h, "full sync after changes")
                    silent(h, full=False)
                    silent(h, full=True)
                except Refused:
                    pass
                finally:
                    h.close()
        finally:
            RESTORED.pop(id(org), None)
            emulator.stop()

    run()
