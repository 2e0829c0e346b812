"""One synthetic organization that every vendor emulator serves.

People, groups and memberships are generated from a seed, so two runs with the same seed serve the
same company. The organization changes like a real one (hires, terminations, deletions, renames,
moves, manager changes, group joins and leaves, group create/delete), either by scripted calls
(tests) or at random (demo, benchmarks). Every change bumps `version` and stamps the object, and
membership changes are logged, so the delta-style APIs (Graph delta, Okta lastUpdated, BambooHR
changed) can answer "what changed since X" without a second copy of the data.

Vendor ids are derived from `Person.n` / `Group.n` by each protocol layer; this module knows nothing
of any vendor.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

GIVEN = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Margaret",
    "Ken",
    "Radia",
    "Linus",
    "Frances",
    "John",
    "Katherine",
    "Dennis",
    "Hedy",
    "Tim",
    "Sophie",
    "Guido",
    "Anita",
    "Niklaus",
    "Zoë",
    "José",
    "Björn",
    "Chloé",
    "Łukasz",
    "Søren",
    "Mário",
    "François",
    "Ngozi",
    "Aiko",
    "Jürgen",
    "Siobhán",
    "Renée",
    "İlkay",
    "Dvořák",
    "Øystein",
    "Nuño",
    "Aleš",
    "Thảo",
    "Zuzana",
]
FAMILY = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Perlman",
    "Torvalds",
    "Allen",
    "Backus",
    "Johnson",
    "Ritchie",
    "Lamarr",
    "Berners-Lee",
    "Wilson",
    "van Rossum",
    "Borg",
    "Wirth",
    "Müller",
    "García",
    "Nakamura",
    "O'Brien",
    "Ødegaard",
    "Kowalski",
    "Nguyễn",
    "Šimek",
    "Ōta",
    "Adeyemi",
    "Fernández",
    "Bäcklund",
    "Çelik",
    "Dubois",
]
DEPARTMENTS = [
    "Engineering",
    "Sales",
    "Marketing",
    "Finance",
    "People",
    "Legal",
    "Support",
    "Research",
    "Operations",
    "Design",
    "Security",
    "Data",
]
TITLES = ["Engineer", "Senior Engineer", "Manager", "Director", "Analyst", "Specialist", "Associate", "Lead"]
LOCATIONS = ["Berlin", "London", "New York", "Tokyo", "São Paulo", "Lagos", "Sydney", "Toronto"]

State = Literal["active", "inactive"]
# Why an inactive person is inactive; vendors render it differently (Google suspended/archived,
# Okta SUSPENDED/DEPROVISIONED, Entra accountEnabled=false, HR systems terminated).
InactiveReason = Literal["terminated", "suspended", "archived"]


@dataclass(slots=True)
class Person:
    n: int
    given: str
    family: str
    email: str | None
    username: str
    title: str | None
    department: str | None
    employee_number: str
    manager: int | None
    location: str
    cost_center: str
    hire_date: str
    state: State = "active"
    inactive_reason: InactiveReason | None = None
    termination_date: str | None = None
    soft_deleted: bool = False
    deleted: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0
    renamed_at: float = 0.0  # the last change of `given` or `family` (a vendor may copy the name)
    # When the person became inactive for `inactive_reason` (Google's suspensionTime/archivalTime).
    inactive_at: float = 0.0
    # An invited external user (Graph's userType Guest, with an #EXT# userPrincipalName); the other
    # vendors have no such thing and ignore it.
    guest: bool = False

    @property
    def display(self) -> str:
        return f"{self.given} {self.family}"

    @property
    def visible(self) -> bool:
        """Listed by the vendor at all (not hard- or soft-deleted)."""
        return not self.deleted and not self.soft_deleted


@dataclass(slots=True)
class Group:
    n: int
    name: str
    description: str | None
    email: str | None
    members: set[int] = field(default_factory=set)  # Person.n
    subgroups: set[int] = field(default_factory=set)  # Group.n
    deleted: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0
    members_updated_at: float = 0.0
    members_version: int = 0


@dataclass(slots=True, frozen=True)
class MemberChange:
    version: int
    at: float
    group: int
    member_kind: Literal["user", "group"]
    member: int
    added: bool


class Org:
    """The organization. All reads and writes go through `lock` (the emulators are threaded)."""

    def __init__(self, domain: str = "example.test", customer_id: str = "C01dirpull") -> None:
        self.domain = domain
        self.customer_id = customer_id
        self.people: dict[int, Person] = {}
        self.groups: dict[int, Group] = {}
        self.member_log: list[MemberChange] = []
        self.version = 0
        self.lock = threading.RLock()
        self._next_person = 1
        self._next_group = 1
        self._last_ts = 0.0
        self._pinned: float | None = None
        self.rng = random.Random(0)

    # --- time and versions ---------------------------------------------------------------------

    def now(self) -> float:
        # Strictly increasing, so "changed after T" is never ambiguous within one process.
        t = time.time() if self._pinned is None else self._pinned
        if t <= self._last_ts:
            t = self._last_ts + 0.001
        self._last_ts = t
        return t

    @contextlib.contextmanager
    def clock_at(self, at: float | None) -> Iterator[None]:
        """Changes made inside are stamped from `at` on (each a millisecond after the last), not
        from the wall clock: forked emulator workers making the same seeded changes stamp them
        alike. None: the wall clock."""
        self._pinned = at
        try:
            yield
        finally:
            self._pinned = None

    def _touch(self, obj: Person | Group) -> None:
        self.version += 1
        obj.version = self.version
        obj.updated_at = self.now()

    @staticmethod
    def iso(ts: float) -> str:
        """ISO-8601 UTC with milliseconds, the way Okta and Google print timestamps."""
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"

    # --- generation ------------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        people: int = 50,
        groups: int | None = None,
        seed: int = 1,
        domain: str = "example.test",
        memberships_per_person: float = 3.0,
    ) -> Org:
        org = cls(domain=domain)
        org.rng = rng = random.Random(seed)
        groups = max(8, people // 50) if groups is None else groups
        start = datetime(2020, 1, 1, tzinfo=UTC)
        for _ in range(people):
            given, family = rng.choice(GIVEN), rng.choice(FAMILY)
            n = org._next_person
            # A tree: person 1 is the CEO, everyone else reports to someone hired earlier.
            manager = None if n == 1 else max(1, (n - 2) // 6 + 1)
            org._add_person(
                given=given,
                family=family,
                with_email=rng.random() > 0.02 or n == 1,
                title=rng.choice(TITLES),
                department=rng.choice(DEPARTMENTS),
                manager=manager,
                hire_date=(start + timedelta(days=rng.randrange(0, 2000))).date().isoformat(),
            )
        for person in org.people.values():
            if person.n != 1 and rng.random() < 0.06:
                person.state = "inactive"
                person.inactive_reason = rng.choice(["terminated", "suspended", "archived"])
                person.inactive_at = person.created_at
                if person.inactive_reason == "terminated":
                    person.termination_date = "2025-06-30"
        ids = list(org.people)
        nested: list[int] = []
        departments = min(len(DEPARTMENTS), groups // 2)
        for g in range(groups):
            dept = DEPARTMENTS[g] if g < departments else None
            name = dept if dept else f"Team {g:04d}"
            group = org._add_group(name=name, description=f"{name} group" if g % 3 else None)
            if g == groups - 1:
                continue  # one empty group
            if dept:
                group.members.update(p.n for p in org.people.values() if p.department == dept)
            else:
                size = max(1, min(len(ids), int(rng.expovariate(1 / (memberships_per_person * people / groups)))))
                group.members.update(rng.sample(ids, min(size, len(ids))))
            # Some teams contain another team (nested groups), the way real directories do.
            if not dept and nested and g % 3 == 0:
                group.subgroups.add(rng.choice(nested))
            elif not dept:
                nested.append(group.n)
        org.member_log.clear()
        return org

    def _add_person(
        self,
        *,
        given: str,
        family: str,
        with_email: bool = True,
        title: str | None = None,
        department: str | None = None,
        manager: int | None = None,
        hire_date: str | None = None,
    ) -> Person:
        n = self._next_person
        self._next_person += 1
        username = f"{_ascii(given)}.{_ascii(family)}.{n}".lower()
        person = Person(
            n=n,
            given=given,
            family=family,
            email=f"{username}@{self.domain}" if with_email else None,
            username=f"{username}@{self.domain}",
            title=title,
            department=department,
            employee_number=f"E{n:06d}",
            manager=manager,
            location=LOCATIONS[n % len(LOCATIONS)],
            cost_center=f"CC-{(n % 40) + 10}",
            hire_date=hire_date or datetime.now(UTC).date().isoformat(),
        )
        self._touch(person)
        person.created_at = person.updated_at
        self.people[n] = person
        return person

    def _add_group(self, *, name: str, description: str | None) -> Group:
        n = self._next_group
        self._next_group += 1
        slug = _ascii(name).lower().replace(" ", "-")
        group = Group(n=n, name=name, description=description, email=f"{slug}-{n}@{self.domain}")
        self._touch(group)
        group.created_at = group.updated_at
        group.members_updated_at = group.updated_at
        group.members_version = group.version
        self.groups[n] = group
        return group

    # --- reads -----------------------------------------------------------------------------------

    def person(self, n: int) -> Person:
        return self.people[n]

    def group(self, n: int) -> Group:
        return self.groups[n]

    def listed_people(self) -> Iterator[Person]:
        return (p for p in self.people.values() if p.visible)

    def listed_groups(self) -> Iterator[Group]:
        return (g for g in self.groups.values() if not g.deleted)

    def direct_members(self, g: int) -> tuple[list[int], list[int]]:
        """(people, subgroups) directly in group g, skipping deleted objects."""
        group = self.groups[g]
        people = sorted(n for n in group.members if self.people[n].visible)
        subs = sorted(n for n in group.subgroups if not self.groups[n].deleted)
        return people, subs

    def transitive_members(self, g: int) -> set[int]:
        seen: set[int] = set()
        out: set[int] = set()
        stack = [g]
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            people, subs = self.direct_members(cur)
            out.update(people)
            stack.extend(subs)
        return out

    def member_changes_since(self, version: int) -> list[MemberChange]:
        # member_log is appended in version order: bisect would do, a scan from the end is enough.
        out = []
        for change in reversed(self.member_log):
            if change.version <= version:
                break
            out.append(change)
        out.reverse()
        return out

    # --- changes ---------------------------------------------------------------------------------

    def hire(
        self,
        given: str = "New",
        family: str = "Hire",
        *,
        title: str | None = "Associate",
        department: str | None = "Engineering",
        manager: int | None = 1,
        with_email: bool = True,
    ) -> Person:
        with self.lock:
            return self._add_person(
                given=given,
                family=family,
                with_email=with_email,
                title=title,
                department=department,
                manager=manager,
            )

    def update_person(self, n: int, **changes: object) -> Person:
        """Change any Person field (rename, title/department move, manager change, …)."""
        with self.lock:
            person = self.people[n]
            was = (person.state, person.inactive_reason)
            for key, value in changes.items():
                if not hasattr(person, key) or key in (
                    "n", "version", "created_at", "updated_at", "renamed_at", "inactive_at",
                ):  # fmt: skip
                    raise KeyError(f"cannot change {key!r}")
                setattr(person, key, value)
            self._touch(person)
            if person.state == "inactive" and (person.state, person.inactive_reason) != was:
                person.inactive_at = person.updated_at
            if "given" in changes or "family" in changes:
                person.renamed_at = person.updated_at
            return person

    def rename(self, n: int, given: str, family: str) -> Person:
        return self.update_person(n, given=given, family=family)

    def deactivate(self, n: int, reason: InactiveReason = "terminated", termination_date: str | None = None) -> Person:
        changes: dict[str, object] = {"state": "inactive", "inactive_reason": reason}
        if reason == "terminated":
            changes["termination_date"] = termination_date or datetime.now(UTC).date().isoformat()
        return self.update_person(n, **changes)

    def schedule_termination(self, n: int, termination_date: str) -> Person:
        """A termination in the future: the person stays active until that date (HR systems)."""
        return self.update_person(n, termination_date=termination_date)

    def reactivate(self, n: int) -> Person:
        return self.update_person(n, state="active", inactive_reason=None, termination_date=None)

    def soft_delete(self, n: int) -> Person:
        """Deleted but restorable (Entra deletedItems, Google undelete)."""
        return self.update_person(n, soft_deleted=True)

    def restore(self, n: int) -> Person:
        return self.update_person(n, soft_deleted=False)

    def delete(self, n: int) -> Person:
        """Gone for good. Memberships go with the person."""
        with self.lock:
            person = self.update_person(n, deleted=True, soft_deleted=False)
            for group in self.groups.values():
                if n in group.members:
                    self._member_change(group, "user", n, added=False)
            return person

    def add_member(self, g: int, n: int) -> None:
        with self.lock:
            if n not in self.groups[g].members:
                self._member_change(self.groups[g], "user", n, added=True)

    def remove_member(self, g: int, n: int) -> None:
        with self.lock:
            if n in self.groups[g].members:
                self._member_change(self.groups[g], "user", n, added=False)

    def add_subgroup(self, g: int, child: int) -> None:
        with self.lock:
            if child == g:
                raise ValueError("a group cannot contain itself")
            if child not in self.groups[g].subgroups:
                self._member_change(self.groups[g], "group", child, added=True)

    def remove_subgroup(self, g: int, child: int) -> None:
        with self.lock:
            if child in self.groups[g].subgroups:
                self._member_change(self.groups[g], "group", child, added=False)

    def _member_change(self, group: Group, kind: Literal["user", "group"], member: int, *, added: bool) -> None:
        target = group.members if kind == "user" else group.subgroups
        if added:
            target.add(member)
        else:
            target.discard(member)
        self.version += 1
        group.members_version = self.version
        group.members_updated_at = self.now()
        self.member_log.append(MemberChange(self.version, group.members_updated_at, group.n, kind, member, added))

    def create_group(self, name: str, description: str | None = None) -> Group:
        with self.lock:
            return self._add_group(name=name, description=description)

    def update_group(self, g: int, **changes: object) -> Group:
        with self.lock:
            group = self.groups[g]
            for key, value in changes.items():
                if key not in ("name", "description", "email"):
                    raise KeyError(f"cannot change {key!r}")
                setattr(group, key, value)
            self._touch(group)
            return group

    def delete_group(self, g: int) -> Group:
        with self.lock:
            group = self.groups[g]
            group.deleted = True
            self._touch(group)
            for parent in self.groups.values():
                if g in parent.subgroups:
                    self._member_change(parent, "group", g, added=False)
            return group

    def random_changes(self, count: int, rng: random.Random | None = None) -> list[str]:
        """Apply `count` plausible changes at random; return a line describing each."""
        rng = rng or self.rng
        done: list[str] = []
        with self.lock:
            for _ in range(count):
                people = [p for p in self.people.values() if p.visible]
                groups = [g for g in self.groups.values() if not g.deleted]
                roll = rng.random()
                if roll < 0.10 or not people:
                    p = self.hire(
                        rng.choice(GIVEN),
                        rng.choice(FAMILY),
                        department=rng.choice(DEPARTMENTS),
                        manager=rng.choice(people).n if people else None,
                    )
                    done.append(f"hire {p.display}")
                elif roll < 0.20:
                    p = rng.choice(people)
                    if p.state == "active" and p.n != 1:
                        self.deactivate(p.n, rng.choice(["terminated", "suspended"]))
                        done.append(f"deactivate {p.display}")
                    else:
                        self.reactivate(p.n)
                        done.append(f"reactivate {p.display}")
                elif roll < 0.25:
                    p = rng.choice(people)
                    if p.n != 1:
                        self.delete(p.n)
                        done.append(f"delete {p.display}")
                elif roll < 0.40:
                    p = rng.choice(people)
                    self.update_person(p.n, title=rng.choice(TITLES))
                    done.append(f"new title for {p.display}")
                elif roll < 0.50:
                    p = rng.choice(people)
                    self.update_person(p.n, department=rng.choice(DEPARTMENTS))
                    done.append(f"department move for {p.display}")
                elif roll < 0.55:
                    p = rng.choice(people)
                    self.rename(p.n, p.given, rng.choice(FAMILY))
                    done.append(f"rename {p.display}")
                elif roll < 0.62:
                    p, m = rng.choice(people), rng.choice(people)
                    if p.n != m.n and p.n != 1:
                        self.update_person(p.n, manager=m.n)
                        done.append(f"new manager for {p.display}")
                elif roll < 0.80 and groups:
                    g, p = rng.choice(groups), rng.choice(people)
                    self.add_member(g.n, p.n)
                    done.append(f"{p.display} joins {g.name}")
                elif roll < 0.95 and groups:
                    g = rng.choice(groups)
                    if g.members:
                        n = rng.choice(sorted(g.members))
                        self.remove_member(g.n, n)
                        done.append(f"{self.people[n].display} leaves {g.name}")
                elif roll < 0.975:
                    g = self.create_group(f"Project {rng.randrange(10_000):04d}")
                    done.append(f"create group {g.name}")
                elif groups:
                    g = rng.choice(groups)
                    self.delete_group(g.n)
                    done.append(f"delete group {g.name}")
        return done


def _ascii(text: str) -> str:
    import unicodedata

    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(c for c in folded if c.isalnum() or c in " -") or "x"
