"""The diff: stored fingerprints + fresh records → changes. Pure: no I/O, no clock.

It runs in two steps, so a sync never loads full stored rows it does not need:
1. `Diff` consumes the connector's pages, comparing each fresh record's fingerprint with the stored
   one, and keeps only what differs (new or changed records), the ids it saw, and memberships.
2. `Diff.finish()` works out deletions and membership changes (snapshot or delta semantics) and
   returns a `Plan`; `build_writes()` turns the plan plus the stored rows of the changed and
   deleted objects into rows to write and events (with `previous_attributes`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dirpull.connectors.base import Done, Page, Quarantined
from dirpull.model import EventType, fingerprint, record_fields
from dirpull.storage.store import WriteSet


@dataclass
class Plan:
    snapshot: bool
    # fresh fields (+ "fingerprint") of records that are new or changed, by idp_id
    users: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    user_deletes: set[str]
    group_deletes: set[str]
    member_adds: set[tuple[str, str]]
    member_removes: set[tuple[str, str]]
    quarantined: list[Quarantined]
    seen_users: int
    seen_groups: int
    members_skipped: int = 0

    def is_empty(self) -> bool:
        return not (
            self.users
            or self.groups
            or self.user_deletes
            or self.group_deletes
            or self.member_adds
            or self.member_removes
        )


@dataclass
class Diff:
    stored_users: Mapping[str, str]  # idp_id → fingerprint
    stored_groups: Mapping[str, str]
    stored_members: set[tuple[str, str]]
    _users: dict[str, dict[str, Any]] = field(default_factory=dict)
    _groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    _seen_users: set[str] = field(default_factory=set)
    _seen_groups: set[str] = field(default_factory=set)
    _members: set[tuple[str, str]] = field(default_factory=set)
    _removed_members: set[tuple[str, str]] = field(default_factory=set)
    _removed_users: set[str] = field(default_factory=set)
    _removed_groups: set[str] = field(default_factory=set)
    _complete_groups: set[str] = field(default_factory=set)
    _quarantined: list[Quarantined] = field(default_factory=list)

    def add(self, page: Page) -> None:
        for users_or_groups, stored, pending, seen, removed in (
            (page.users, self.stored_users, self._users, self._seen_users, self._removed_users),
            (page.groups, self.stored_groups, self._groups, self._seen_groups, self._removed_groups),
        ):
            for record in users_or_groups:
                fields = record_fields(record)
                fp = fingerprint(fields)
                key = record.idp_id
                seen.add(key)
                # The same object can come twice in one pull (Graph delta replays): the later one wins.
                removed.discard(key)
                if stored.get(key) == fp:
                    pending.pop(key, None)
                else:
                    fields["fingerprint"] = fp
                    pending[key] = fields
        for key in page.removed_users:
            self._removed_users.add(key)
            self._users.pop(key, None)
            self._seen_users.discard(key)
        for key in page.removed_groups:
            self._removed_groups.add(key)
            self._groups.pop(key, None)
            self._seen_groups.discard(key)
        for pair in page.members:
            self._members.add(pair)
            self._removed_members.discard(pair)
        for pair in page.removed_members:
            self._removed_members.add(pair)
            self._members.discard(pair)
        self._complete_groups.update(page.complete_groups)
        self._quarantined.extend(page.quarantined)

    def finish(self, done: Done) -> Plan:
        quarantined_users = {q.idp_id for q in self._quarantined if q.kind == "user" and q.idp_id}
        quarantined_groups = {q.idp_id for q in self._quarantined if q.kind == "group" and q.idp_id}
        if done.snapshot:
            # A quarantined record is left as stored: never counted as deleted.
            user_deletes = set(self.stored_users) - self._seen_users - quarantined_users
            group_deletes = set(self.stored_groups) - self._seen_groups - quarantined_groups
        else:
            user_deletes = self._removed_users & set(self.stored_users)
            group_deletes = self._removed_groups & set(self.stored_groups)

        known_users = (set(self.stored_users) - user_deletes) | set(self._users)
        known_groups = (set(self.stored_groups) - group_deletes) | set(self._groups)
        if done.snapshot:
            known_users |= self._seen_users
            known_groups |= self._seen_groups
        target = {(g, u) for g, u in self._members if g in known_groups and u in known_users}
        skipped = len(self._members) - len(target)

        if done.snapshot:
            keep = {(g, u) for g, u in self.stored_members if u in quarantined_users or g in quarantined_groups}
            wanted = target | (keep & self.stored_members)
            adds = wanted - self.stored_members
            removes = self.stored_members - wanted
        else:
            by_group: dict[str, set[str]] = defaultdict(set)
            for g, u in target:
                by_group[g].add(u)
            adds = target - self.stored_members
            removes = {p for p in self._removed_members if p in self.stored_members}
            complete = self._complete_groups
            if complete:
                removes |= {(g, u) for g, u in self.stored_members if g in complete and u not in by_group.get(g, ())}
            removes |= {(g, u) for g, u in self.stored_members if g in group_deletes or u in user_deletes}
            adds -= removes
        return Plan(
            snapshot=done.snapshot,
            users=self._users,
            groups=self._groups,
            user_deletes=user_deletes,
            group_deletes=group_deletes,
            member_adds=adds,
            member_removes=removes,
            quarantined=self._quarantined,
            seen_users=len(self._seen_users),
            seen_groups=len(self._seen_groups),
            members_skipped=skipped,
        )


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Old values of the fields that differ (the event's `previous_attributes`).

    For mapping fields (raw_attributes, custom_attributes) only the changed keys are given, so a
    title change does not repeat the whole vendor record.
    """
    out: dict[str, Any] = {}
    for key, value in new.items():
        if key in ("fingerprint", "idp_id"):
            continue
        before = old.get(key)
        if before == value:
            continue
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            out[key] = {k: before.get(k) for k in sorted({*before, *value}) if before.get(k) != value.get(k)}
        else:
            out[key] = before
    return out


def _public(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "fingerprint"}


def build_writes(
    plan: Plan, old_users: Mapping[str, dict[str, Any]], old_groups: Mapping[str, dict[str, Any]]
) -> WriteSet:
    """Rows to write and events to emit. `old_*` hold the stored rows of every changed or deleted
    object (the plan names which)."""
    events: list[dict[str, Any]] = []
    ws = WriteSet([], [], sorted(plan.user_deletes), [], [], sorted(plan.group_deletes), [], [], events)

    for kind, pending, old, creates, updates in (
        ("user", plan.users, old_users, ws.user_creates, ws.user_updates),
        ("group", plan.groups, old_groups, ws.group_creates, ws.group_updates),
    ):
        for key in sorted(pending):
            fields = pending[key]
            before = old.get(key)
            if before is None:
                creates.append(fields)
                events.append({"type": f"{kind}.created", "object_id": key, "data": _public(fields)})
            else:
                previous = changed_fields(before, fields)
                if not previous:
                    # Same content under a different fingerprint (e.g. after an upgrade changed
                    # the digest): refresh the stored fingerprint, tell nobody.
                    updates.append(fields)
                    continue
                updates.append(fields)
                events.append(
                    {
                        "type": f"{kind}.updated",
                        "object_id": key,
                        "data": _public(fields),
                        "previous_attributes": previous,
                    }
                )

    ws.member_adds = sorted(plan.member_adds)
    ws.member_removes = sorted(plan.member_removes)
    for g, u in ws.member_adds:
        events.append({"type": EventType.GROUP_USER_ADDED.value, "object_id": g, "data": {"group": g, "user": u}})
    for g, u in ws.member_removes:
        events.append({"type": EventType.GROUP_USER_REMOVED.value, "object_id": g, "data": {"group": g, "user": u}})
    for key in ws.group_deletes:
        events.append(
            {
                "type": EventType.GROUP_DELETED.value,
                "object_id": key,
                "data": _public(old_groups.get(key, {"idp_id": key})),
            }
        )
    for key in ws.user_deletes:
        events.append(
            {
                "type": EventType.USER_DELETED.value,
                "object_id": key,
                "data": _public(old_users.get(key, {"idp_id": key})),
            }
        )
    return ws


def deactivations(plan: Plan, old_users: Mapping[str, dict[str, Any]]) -> int:
    """Users this plan turns from active to inactive."""
    return sum(
        1
        for key, fields in plan.users.items()
        if fields.get("state") == "inactive" and old_users.get(key, {}).get("state") == "active"
    )
