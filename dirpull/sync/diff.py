"""The diff: stored fingerprints + fresh records → changes. Pure: no I/O or clock of its own; it
asks a `StoredState` what is stored (the runner answers from the store).

It runs in two steps, so a sync never loads full stored rows it does not need:
1. `Diff` consumes the connector's pages, comparing each fresh record's fingerprint with the stored
   one, and keeps only what differs (new or changed records, as their canonical JSON in a
   `RecordSpool` on disk: a first sync holds the whole tenant this way), the ids it saw, and
   memberships.
2. `Diff.finish()` works out deletions and membership changes (snapshot or delta semantics) and
   returns a `Plan`; `build_writes()` turns the plan plus the stored rows of the changed and
   deleted objects into rows to write and events (with `previous_attributes`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from sys import intern
from typing import Any, Literal, Protocol

from dirpull.connectors.base import Done, Page, Quarantined
from dirpull.jsoncodec import MAX_DEPTH, TOO_DEEP_JSON, canonical, has_lone_surrogate, loads, without_surrogates
from dirpull.model import EventType, User, digest, without_nul
from dirpull.spool import RecordSpool, SpooledJson
from dirpull.storage.store import WriteSet

CHANGED_GROUPS_BATCH = 250  # groups whose stored pairs are read and compared at once


class StoredState(Protocol):
    """What the diff may ask of the stored tenant. `LoadedState` holds it all in memory (snapshots
    compare everything anyway); the runner answers deltas with narrow queries instead, so an
    incremental run of a large tenant never loads every fingerprint and membership."""

    def user_fingerprints(self, ids: Collection[str]) -> Mapping[str, str]: ...
    def group_fingerprints(self, ids: Collection[str]) -> Mapping[str, str]: ...
    def user_sources(self, ids: Collection[str]) -> Mapping[str, str]: ...
    def group_member_digests(self) -> Mapping[str, str]: ...
    def user_ids(self) -> set[str]: ...
    def group_ids(self) -> set[str]: ...
    def member_pairs(self) -> set[tuple[str, str]]: ...
    def member_pairs_of(self, groups: Collection[str], users: Collection[str]) -> set[tuple[str, str]]: ...
    def group_members(self, groups: Collection[str]) -> Mapping[str, set[str]]: ...
    def existing_pairs(self, pairs: Collection[tuple[str, str]]) -> set[tuple[str, str]]: ...


@dataclass
class LoadedState:
    users: Mapping[str, str]  # idp_id → fingerprint
    groups: Mapping[str, str]
    # The stored pairs, or a function answering them once they are needed (`finish()`): the runner
    # reads them in the background while the first pages are diffed.
    pairs: set[tuple[str, str]] | Callable[[], set[tuple[str, str]]]
    sources: Mapping[str, str] = field(default_factory=dict)  # idp_id → source digest, where known
    member_digests: Mapping[str, str] = field(default_factory=dict)  # group → `members_digest`, where known
    # Answer `member_pairs_of` and `group_members` while `pairs` is not loaded (the runner: narrow
    # store queries), so reading a few groups' pairs never loads them all.
    pairs_of: Callable[[Collection[str], Collection[str]], set[tuple[str, str]]] | None = None
    members_of: Callable[[Collection[str]], Mapping[str, set[str]]] | None = None

    @property
    def members(self) -> set[tuple[str, str]]:
        if callable(self.pairs):
            self.pairs = self.pairs()
        return self.pairs

    def user_fingerprints(self, ids: Collection[str]) -> Mapping[str, str]:
        return self.users

    def group_fingerprints(self, ids: Collection[str]) -> Mapping[str, str]:
        return self.groups

    def user_sources(self, ids: Collection[str]) -> Mapping[str, str]:
        return self.sources

    def group_member_digests(self) -> Mapping[str, str]:
        return self.member_digests

    def user_ids(self) -> set[str]:
        return set(self.users)

    def group_ids(self) -> set[str]:
        return set(self.groups)

    def member_pairs(self) -> set[tuple[str, str]]:
        return self.members

    def member_pairs_of(self, groups: Collection[str], users: Collection[str]) -> set[tuple[str, str]]:
        if not groups and not users:
            return set()
        if callable(self.pairs) and self.pairs_of is not None:
            return self.pairs_of(groups, users)
        return {(g, u) for g, u in self.members if g in groups or u in users}

    def group_members(self, groups: Collection[str]) -> Mapping[str, set[str]]:
        if callable(self.pairs) and self.members_of is not None:
            return self.members_of(groups)
        out: dict[str, set[str]] = defaultdict(set)
        for g, u in self.member_pairs_of(groups, ()):
            out[g].add(u)
        return out

    def existing_pairs(self, pairs: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        return {p for p in pairs if p in self.members}


@dataclass
class Plan:
    snapshot: bool
    # records that are new or changed, by idp_id, as canonical JSON (`jsoncodec.canonical` of
    # their fields) in the diff's spool, and their fingerprints
    users: dict[str, SpooledJson]
    groups: dict[str, SpooledJson]
    user_deletes: set[str]
    group_deletes: set[str]
    # (group, user) pairs, sorted: the order their events are written in
    member_adds: list[tuple[str, str]]
    member_removes: list[tuple[str, str]]
    quarantined: list[Quarantined]
    seen_users: int
    seen_groups: int
    members_skipped: int = 0
    user_fingerprints: dict[str, str] = field(default_factory=dict)
    group_fingerprints: dict[str, str] = field(default_factory=dict)
    # Ids among `users`/`groups` that are stored already (updates, not creates).
    stored_users: set[str] = field(default_factory=set)
    stored_groups: set[str] = field(default_factory=set)
    spool: RecordSpool | None = None  # where `users`/`groups` are held
    # Source digests to store with the pending users, and digests to refresh on users whose row
    # stays as it is (`WriteSet.source_refreshes`).
    user_sources: dict[str, str] = field(default_factory=dict)
    source_refreshes: dict[str, str] = field(default_factory=dict)
    # Snapshot: the `members_digest` of every group whose stored one differs. Delta: None (the
    # groups whose members change lose theirs).
    member_digests: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)  # what the run should say about this plan

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
    stored: StoredState
    spool: RecordSpool = field(default_factory=RecordSpool)
    _users: dict[str, SpooledJson] = field(default_factory=dict)
    _groups: dict[str, SpooledJson] = field(default_factory=dict)
    _user_fps: dict[str, str] = field(default_factory=dict)
    _group_fps: dict[str, str] = field(default_factory=dict)
    _stored_users: set[str] = field(default_factory=set)  # pending records that exist in the store
    _stored_groups: set[str] = field(default_factory=set)
    _seen_users: set[str] = field(default_factory=set)
    _seen_groups: set[str] = field(default_factory=set)
    # `Page.members` gathered group by group as pages arrive (a snapshot's finish then has only
    # each group's set to make); a pair removed after it was added is dropped at the finish.
    _paired: dict[str, list[str]] = field(default_factory=dict)
    _member_lists: dict[str, list[str]] = field(default_factory=dict)  # `Page.member_lists`, merged
    _removed_members: set[tuple[str, str]] = field(default_factory=set)
    _removed_users: set[str] = field(default_factory=set)
    _removed_groups: set[str] = field(default_factory=set)
    _complete_groups: set[str] = field(default_factory=set)
    _quarantined: list[Quarantined] = field(default_factory=list)
    _quarantined_ids: set[tuple[str, str]] = field(default_factory=set)
    _bad_ids: set[tuple[str, str]] = field(default_factory=set)  # (kind, id as given): see _quarantine_bad_id
    _notes: list[str] = field(default_factory=list)
    _user_sources: dict[str, str] = field(default_factory=dict)
    _source_refreshes: dict[str, str] = field(default_factory=dict)

    def add(self, page: Page) -> None:
        self._add_unchanged(page.unchanged_users)
        for records, lookup, pending, fps, existing, seen, removed in (
            (page.users, self.stored.user_fingerprints, self._users, self._user_fps, self._stored_users,
             self._seen_users, self._removed_users),
            (page.groups, self.stored.group_fingerprints, self._groups, self._group_fps, self._stored_groups,
             self._seen_groups, self._removed_groups),
        ):  # fmt: skip
            if not records:
                continue
            stored = lookup([r.idp_id for r in records])
            for record in records:
                if not record.idp_id.isascii() and has_lone_surrogate(record.idp_id):
                    # Neither store can take such an id (no UTF-8 form), and U+FFFD in its place
                    # could name another record.
                    self._quarantine_bad_id(
                        "user" if isinstance(record, User) else "group", record.idp_id,
                        "its id holds a lone UTF-16 surrogate, which the store cannot keep",
                    )  # fmt: skip
                    continue
                # The model's own field dict: the same canonical bytes as `record_fields(record)`
                # (every field is a JSON type) without model_dump's deep copy, 3 µs per record.
                blob = canonical(record.__dict__)
                if b"\\u0000" in blob:  # a NUL in a value (rare: checked on the JSON, not field by field)
                    if TOO_DEEP_JSON in blob:
                        # Read in part only (`jsoncodec.loads_any`): stored, it would be a
                        # record the vendor never sent. It stays as stored until it is readable.
                        self._quarantine_bad_id(
                            "user" if isinstance(record, User) else "group", record.idp_id,
                            f"an attribute is nested more than {MAX_DEPTH} levels deep",
                        )  # fmt: skip
                        continue
                    if "\x00" in record.idp_id:
                        # PostgreSQL cannot hold such an id (every run of the tenant failed there,
                        # with a traceback), and dropping the NUL could name another record.
                        self._quarantine_bad_id(
                            "user" if isinstance(record, User) else "group", record.idp_id,
                            "its id holds a NUL character, which the store cannot keep",
                        )  # fmt: skip
                        continue
                    # The id stays as the vendor gave it: it names the record in pairs and removals.
                    blob = canonical({**without_nul(record.__dict__), "idp_id": record.idp_id})
                fp = digest(blob)
                # One string object per id, however many pages and pairs name it.
                key = intern(record.idp_id)
                seen.add(key)
                # The same object can come twice in one pull (Graph delta replays): the later one wins.
                removed.discard(key)
                before = stored.get(key)
                if before == fp:
                    pending.pop(key, None)
                    fps.pop(key, None)
                else:
                    pending[key] = self.spool.put(blob, key)
                    fps[key] = fp
                    if before is not None:
                        existing.add(key)
        if page.users:
            self._note_sources(page)
        for key in page.removed_users:
            self._removed_users.add(key)
            self._users.pop(key, None)
            self._user_fps.pop(key, None)
            self._user_sources.pop(key, None)
            self._source_refreshes.pop(key, None)
            self._seen_users.discard(key)
        for key in page.removed_groups:
            self._removed_groups.add(key)
            self._groups.pop(key, None)
            self._group_fps.pop(key, None)
            self._seen_groups.discard(key)
        if page.members:
            self._add_pairs(page.members)
        self._removed_members.update(page.removed_members)
        for g, users in page.member_lists:
            # A group given twice gets both lists. (The connector shares id strings if it wants:
            # interning here cost more than the memory it saved.)
            self._member_lists.setdefault(g, []).extend(users)
        self._complete_groups.update(page.complete_groups)
        for q in page.quarantined:
            # A record the connector met more than once (Okta lists a user again in each of its
            # groups) is one record to look at, counted once.
            if q.idp_id and (q.kind, q.idp_id) in self._quarantined_ids:
                continue
            if q.idp_id:
                self._quarantined_ids.add((q.kind, q.idp_id))
            self._quarantined.append(q)

    def _quarantine_bad_id(self, kind: Literal["user", "group"], idp_id: str, reason: str) -> None:
        """Quarantine a record whose id holds a NUL character or a lone surrogate (or that was read
        in part only: nested too deep). The run reports
        it with U+FFFD in place of each (a run record cannot hold either); the id itself is kept
        as given, so a record SQLite stored under it is left as stored, like any quarantined one.
        Memberships naming it name no record the run knows, and are skipped."""
        if (kind, idp_id) in self._bad_ids:
            return
        self._bad_ids.add((kind, idp_id))
        self._quarantined.append(Quarantined(kind, without_surrogates(idp_id.replace("\x00", "\ufffd")), reason))

    def _add_pairs(self, pairs: list[tuple[str, str]]) -> None:
        paired, removed = self._paired, self._removed_members
        users: list[str] = []
        last: str | None = None
        for g, u in pairs:
            if g != last:  # connectors hand a group's pairs over together: one lookup per run
                last = g
                found = paired.get(g)
                users = paired[intern(g)] = [] if found is None else found
            users.append(intern(u))
            if removed:
                removed.discard((g, u))  # added again after a removal: the addition stands

    def _pairs(self) -> set[tuple[str, str]]:
        """Every pair added and not removed since (consumes what `add()` gathered)."""
        removed = self._removed_members
        out = {(g, u) for g, users in self._paired.items() for u in users}
        self._paired.clear()
        return out - removed if removed else out

    def _add_unchanged(self, ids: list[str]) -> None:
        """Users the connector found stored exactly as sent: seen, and nothing pending for them
        (a later copy in the same pull supersedes an earlier, changed one)."""
        for key in map(intern, ids):
            self._seen_users.add(key)
            self._removed_users.discard(key)
            if key in self._users:
                del self._users[key]
                self._user_fps.pop(key, None)
            self._user_sources.pop(key, None)
            self._source_refreshes.pop(key, None)

    def _note_sources(self, page: Page) -> None:
        """Where each normalized user's source digest goes: with its pending row, or — its row
        unchanged — as a refresh of the stored digest if that differs."""
        given = page.user_sources
        stored = self.stored.user_sources(list(given)) if given else {}
        bad_ids = self._bad_ids
        for record in page.users:
            key = record.idp_id
            if bad_ids and ("user", key) in bad_ids:
                continue  # quarantined: nothing of it is stored
            source = given.get(key)
            if key in self._users:
                self._source_refreshes.pop(key, None)
                if source is None:
                    self._user_sources.pop(key, None)
                else:
                    self._user_sources[key] = source
            else:
                self._user_sources.pop(key, None)
                if source is not None and stored.get(key) != source:
                    self._source_refreshes[key] = source
                else:
                    self._source_refreshes.pop(key, None)

    def finish(self, done: Done) -> Plan:
        quarantined_users = {q.idp_id for q in self._quarantined if q.kind == "user" and q.idp_id}
        quarantined_groups = {q.idp_id for q in self._quarantined if q.kind == "group" and q.idp_id}
        quarantined_users |= {i for k, i in self._bad_ids if k == "user"}
        quarantined_groups |= {i for k, i in self._bad_ids if k == "group"}
        member_digests = None
        if done.snapshot:
            adds, removes, user_deletes, group_deletes, skipped, member_digests = self._finish_snapshot(
                quarantined_users, quarantined_groups, groups_from_users=done.groups_from_users
            )
        else:
            adds, removes, user_deletes, group_deletes, skipped = self._finish_delta()
        return Plan(
            spool=self.spool,
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
            user_fingerprints=self._user_fps,
            group_fingerprints=self._group_fps,
            stored_users=self._stored_users & set(self._users),
            stored_groups=self._stored_groups & set(self._groups),
            user_sources={k: v for k, v in self._user_sources.items() if k in self._users},
            source_refreshes=self._source_refreshes,
            member_digests=member_digests,
            notes=self._notes,
        )

    def _finish_snapshot(self, q_users: set[str], q_groups: set[str], *, groups_from_users: bool) -> tuple[Any, ...]:
        stored_users, stored_groups = self.stored.user_ids(), self.stored.group_ids()
        # A quarantined record is left as stored: never counted as deleted, memberships kept. One
        # without an id could be any stored record this snapshot did not list, so all of those are.
        idless = {q.kind for q in self._quarantined if not q.idp_id}
        user_deletes = stored_users - self._seen_users - q_users
        if user_deletes and "user" in idless:
            self._notes.append(f"{len(user_deletes)} stored users not listed were kept, not deleted: a quarantined "
                               "user record has no id, so which of them it is cannot be told")  # fmt: skip
            q_users, user_deletes = q_users | user_deletes, set()
        group_deletes = stored_groups - self._seen_groups - q_groups
        if group_deletes and "group" in idless:
            self._notes.append(f"{len(group_deletes)} stored groups not listed were kept, not deleted: a quarantined "
                               "group record has no id, so which of them it is cannot be told")  # fmt: skip
            q_groups, group_deletes = q_groups | group_deletes, set()
        held: set[str] = set()
        if group_deletes and q_users and groups_from_users:
            # Groups made from the users' records: one only a quarantined user is in is not listed,
            # yet may well exist (a Workday group derived from a column whose only member's row is
            # unreadable): it is not deleted from under that user's kept membership. A group the
            # vendor lists itself and no longer does is gone, with every membership of it.
            held = {g for g, _ in self.stored.member_pairs_of((), q_users)} & group_deletes
            if held:
                self._notes.append(f"{len(held)} stored groups not listed were kept, not deleted: they hold "
                                   "the stored memberships of quarantined users")  # fmt: skip
                group_deletes -= held
        known_users = self._seen_users | (q_users & stored_users)
        known_groups = self._seen_groups | (q_groups & stored_groups) | held
        by_group, unknown = self._members_by_group(known_groups, known_users)
        stored_digests = self.stored.group_member_digests()
        fresh = {g: members_digest(users) for g, users in by_group.items()}
        if not (q_users or q_groups) and stored_digests:
            # Only groups whose member digest differs (or that go) have their stored pairs read:
            # a resync where memberships did not change reads none of them.
            changed = sorted({g for g, d in fresh.items() if stored_digests.get(g) != d} | group_deletes)
            adds: list[tuple[str, str]] = []
            removes: list[tuple[str, str]] = []
            # Group by group in order, each one's users sorted: the pairs come out sorted. A few
            # hundred groups at a time: when most groups changed, no second copy of every pair is
            # held at once.
            for i in range(0, len(changed), CHANGED_GROUPS_BATCH):
                batch = changed[i : i + CHANGED_GROUPS_BATCH]
                before = self.stored.group_members(batch)
                for g in batch:
                    now, was = by_group.get(g, set()), before.get(g, set())
                    adds.extend((g, u) for u in sorted(now - was))
                    removes.extend((g, u) for u in sorted(was - now))
        else:
            # No digests to go by (a first sync, a store just upgraded) or quarantined records
            # whose stored memberships stand: every pair is compared.
            stored_members = self.stored.member_pairs()
            if not stored_members and not (q_users or q_groups):
                # A first sync: every pair is new (up to a million at 100,000 users), in order.
                adds = [(g, u) for g in sorted(by_group) for u in sorted(by_group[g])]
                removes = []
            else:
                target = {(g, u) for g, users in by_group.items() for u in users}
                if q_users or q_groups:
                    kept: dict[str, set[str]] = {}
                    for g, u in self.stored.member_pairs_of(q_groups, q_users):
                        if u in user_deletes or g in group_deletes:
                            continue  # a user (group) deleted now leaves (loses) quarantined ones too
                        kept.setdefault(g, set()).add(u)
                        target.add((g, u))
                    # The digest describes the members stored, kept ones included: one of the
                    # pulled members alone would match the vendor's list later and hide a kept
                    # pair that is gone by then.
                    for g in kept.keys() & fresh.keys():
                        fresh[g] = members_digest(by_group.get(g, set()) | kept[g])
                adds, removes = sorted_pairs(target - stored_members), sorted_pairs(stored_members - target)
        digests = {g: d for g, d in fresh.items() if stored_digests.get(g) != d}
        return adds, removes, user_deletes, group_deletes, unknown, digests

    def _members_by_group(
        self, known_groups: set[str], known_users: set[str]
    ) -> tuple[dict[str, set[str]], int]:
        """Each known group's members among the known users (every known group is a key: an empty
        group has a digest too), from pairs and lists alike; and how many distinct pairs named
        someone unknown. Consumes what `add()` gathered."""
        lists = self._member_lists
        removed: dict[str, set[str]] = {}
        for g, u in self._removed_members:
            removed.setdefault(g, set()).add(u)
        for g, users in self._paired.items():
            if g in removed:
                gone = removed[g]
                users = [u for u in users if u not in gone]
            lists.setdefault(g, []).extend(users)
        self._paired.clear()
        by_group: dict[str, set[str]] = {g: set() for g in known_groups}
        unknown = 0
        while lists:
            g, given = lists.popitem()
            users = set(given)
            if g not in known_groups:
                unknown += len(users)
                continue
            if not users <= known_users:
                kept = users & known_users
                unknown += len(users) - len(kept)
                users = kept
            by_group[g] = users
        return by_group, unknown

    def _finish_delta(self) -> tuple[Any, ...]:
        stored = self.stored
        members = self._pairs()
        # Lists are meant for snapshots; in a delta they are pairs (a later removal still wins).
        for g, users in self._member_lists.items():
            members.update((g, u) for u in users if (g, u) not in self._removed_members)
        self._member_lists.clear()
        user_deletes = set(stored.user_fingerprints(self._removed_users)) & self._removed_users
        group_deletes = set(stored.group_fingerprints(self._removed_groups)) & self._removed_groups
        # Who a membership may name: what this pull saw, or what is stored and not deleted now.
        users_named = {u for _, u in members} - self._seen_users
        groups_named = {g for g, _ in members} - self._seen_groups
        known_users = self._seen_users | (set(stored.user_fingerprints(users_named)) & users_named)
        known_groups = self._seen_groups | (set(stored.group_fingerprints(groups_named)) & groups_named)
        known_users -= user_deletes
        known_groups -= group_deletes
        target = {(g, u) for g, u in members if g in known_groups and u in known_users}
        skipped = len(members) - len(target)

        adds = target - stored.existing_pairs(target)
        removes = stored.existing_pairs(self._removed_members)
        complete = self._complete_groups
        if complete:
            by_group: dict[str, set[str]] = defaultdict(set)
            for g, u in target:
                by_group[g].add(u)
            removes |= {
                (g, u) for g, u in stored.member_pairs_of(complete, ()) if u not in by_group.get(g, ())
            }
        removes |= stored.member_pairs_of(group_deletes, user_deletes)
        return sorted_pairs(adds - removes), sorted_pairs(removes), user_deletes, group_deletes, skipped


def sorted_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """`sorted(pairs)`, a group at a time: sorting a million (group, user) tuples compares tuples;
    sorting each group's users compares strings (2.0 s → 0.9 s at 886,000 pairs)."""
    by_group: dict[str, list[str]] = {}
    for g, u in pairs:
        users = by_group.get(g)
        if users is None:
            by_group[g] = [u]
        else:
            users.append(u)
    return [(g, u) for g in sorted(by_group) for u in sorted(by_group[g])]


def members_digest(users: Collection[str]) -> str:
    """A digest of one group's member ids, whatever their order."""
    return digest("\n".join(sorted(users)).encode())


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
        if _same(before, value):
            continue
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            # A key that comes or goes with a null value changed too: compared by value alone it
            # left `{}`, an update that named nothing.
            out[key] = {
                k: before.get(k)
                for k in sorted({*before, *value})
                if (k in before) != (k in value) or not _same(before.get(k), value.get(k))
            }
        else:
            out[key] = before
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as the JSON a consumer reads. Python's == takes True for 1 and 1 for 1.0: a vendor
    attribute going from true to 1 changed the fingerprint and the stored row, but no event."""
    if a != b:
        return False
    return a is None or isinstance(a, str) or canonical(a) == canonical(b) or _same_as_stored(a, b)


def _same_as_stored(old: Any, new: Any) -> bool:
    """`old`, read back from the store, is `new` as written there. PostgreSQL's jsonb keeps a
    number, not its spelling: a float written with an exponent (orjson writes 1e16 and up so) comes
    back as an integer, 10000000000000000, and named an unchanged attribute in the event of another
    change. Anything else of another type is a change (1 → 1.0 included, as on SQLite). Only
    reached for values that are == yet written differently: what an update changes, nothing more."""
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same_as_stored(v, new[k]) for k, v in old.items())
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(map(_same_as_stored, old, new))
    if type(old) is int and type(new) is float:
        return old == new and b"e" in canonical(new)
    return type(old) is type(new) and old == new


def build_writes(
    plan: Plan, old_users: Mapping[str, dict[str, Any]], old_groups: Mapping[str, dict[str, Any]]
) -> WriteSet:
    """Rows to write and events to emit. `old_*` hold the stored rows of every changed or deleted
    object (the plan names which). A created record stays in the spool, named by its row and its
    event (the store reads it back while writing); only updates are decoded here, to compare."""
    ws = WriteSet(
        [], [], sorted(plan.user_deletes), [], [], sorted(plan.group_deletes),
        plan.member_adds, plan.member_removes, [],
        user_fingerprints=plan.user_fingerprints, group_fingerprints=plan.group_fingerprints,
        user_sources=plan.user_sources, source_refreshes=plan.source_refreshes,
        member_digests=plan.member_digests,
    )  # fmt: skip
    for kind, pending, old, creates, updates, unchanged in (
        ("user", plan.users, old_users, ws.user_creates, ws.user_updates, ws.unchanged_users),
        ("group", plan.groups, old_groups, ws.group_creates, ws.group_updates, ws.unchanged_groups),
    ):
        # A kind's creations before its updates: an update naming a new manager comes after
        # that manager's user.created, whatever their ids' order.
        updated: list[dict[str, Any]] = []
        for key in sorted(pending):
            spooled = pending[key]
            before = old.get(key)
            if before is None:
                creates.append(spooled)
                ws.events.append({"type": f"{kind}.created", "object_id": key, "data": spooled})
                continue
            fields = loads(spooled.read())
            updates.append(fields)
            previous = changed_fields(before, fields)
            # No previous values: same content under a new fingerprint (e.g. an upgrade changed
            # the digest). The row is refreshed, its updated_at left alone; nobody is told.
            if not previous:
                unchanged.add(key)
            else:
                # The object as stored: its created_at stays (the store adds updated_at).
                data = {**fields, "created_at": before["created_at"]} if "created_at" in before else fields
                updated.append(
                    {"type": f"{kind}.updated", "object_id": key, "data": data, "previous_attributes": previous}
                )
        ws.events += updated
    for kind, keys, old in (
        (EventType.GROUP_DELETED, ws.group_deletes, old_groups),
        (EventType.USER_DELETED, ws.user_deletes, old_users),
    ):
        for key in keys:
            ws.tail_events.append({"type": kind.value, "object_id": key, "data": old.get(key, {"idp_id": key})})
    return ws


def cleared_fields(events: Iterable[dict[str, Any]], mapped: Collection[str] | None = None) -> dict[str, int]:
    """For each user field, how many of the run's updates empty it (a value stored, none now);
    a mapped attribute as `custom_attributes.KEY`. The vendor's own `raw_attributes` are left out.
    For the guard: a directory that stops returning a field (an API key that lost a permission:
    BambooHR silently leaves out what the key may not read) reads as that value removed from
    everyone. `mapped`: the keys of the tenant's `attributes` table now; a key no longer in it
    is emptied by the operator's own edit, not by the directory, and is not counted."""
    mapped_keys = None if mapped is None else set(mapped)
    counts: dict[str, int] = {}
    for e in events:
        if e["type"] != "user.updated":
            continue
        now = e["data"]
        for name, old in (e.get("previous_attributes") or {}).items():
            if name == "raw_attributes":
                continue
            if name == "custom_attributes" and isinstance(old, Mapping):
                now_mapped = now.get(name) or {}
                for key, was in old.items():
                    if mapped_keys is not None and key not in mapped_keys:
                        continue
                    if _filled(was) and not _filled(now_mapped.get(key)):
                        counts[f"{name}.{key}"] = counts.get(f"{name}.{key}", 0) + 1
            elif _filled(old) and not _filled(now.get(name)):
                counts[name] = counts.get(name, 0) + 1
    return counts


def _filled(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def clear_deleted_managers(plan: Plan, reports: Mapping[str, dict[str, Any]]) -> int:
    """A delta that deletes users, from a vendor where a deleted manager is no one's manager any
    more but their reports are not listed as changed (Entra ID): every report this plan keeps
    loses that manager, as the next snapshot would say. `reports` are the stored rows whose
    manager is among `plan.user_deletes` (`Store.load_reports`). A report listed in this pull
    keeps the manager it came with, unless that is one of the deleted. Returns how many changed."""
    gone = plan.user_deletes
    spool = plan.spool
    assert spool is not None
    changed = 0
    targets: dict[str, dict[str, Any]] = {}
    for key, spooled in plan.users.items():  # one at a time: a large delta stays in its spool
        fields = loads(spooled.read())
        if fields.get("manager_idp_id") in gone:
            targets[key] = fields
    for key, row in reports.items():
        if key in gone or key in plan.users or row.get("manager_idp_id") not in gone:
            continue
        targets[key] = row
    for key, fields in sorted(targets.items()):
        record = User.model_validate({**fields, "manager_idp_id": None})
        blob = canonical(record.__dict__)
        plan.users[key] = spool.put(blob, key)
        plan.user_fingerprints[key] = digest(blob)
        # The stored source digest described the vendor record with the old manager.
        plan.user_sources.pop(key, None)
        plan.source_refreshes.pop(key, None)
        if key in reports:
            plan.stored_users.add(key)
        changed += 1
    return changed


def state_changes(plan: Plan, old_users: Mapping[str, dict[str, Any]]) -> tuple[int, int]:
    """(deactivated, reactivated): the stored users this plan turns from active to inactive, and
    from inactive to active. A user created active is neither: only a stored inactive record
    turned active gives someone their access back."""
    deactivated = reactivated = 0
    for key, before in old_users.items():
        if key not in plan.users:
            continue
        was = before.get("state")
        now = loads(plan.users[key].read()).get("state")
        if was == "active" and now == "inactive":
            deactivated += 1
        elif was == "inactive" and now == "active":
            reactivated += 1
    return deactivated, reactivated
