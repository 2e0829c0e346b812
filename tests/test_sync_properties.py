"""Property-based check of the whole sync: a scripted directory changes at random between syncs
(users edited, deactivated, deleted and re-created under the same id or another one's email,
managers, groups renamed, deleted and re-created, membership churn), synced as full snapshots and
as deltas through the real diff and the real store on SQLite. After every sync:

- the store holds exactly what the directory serves;
- the event log read from the start (`dirpull events --after 0`), applied by a strict consumer,
  gives exactly the stored users, groups and memberships: every event applicable in its order (a
  membership added only while its user and group exist, gone before either is deleted; an update
  to an existing object, naming the old values of what changed and nothing else);
- the run's events have consecutive sequence numbers and are the run's own;
- a resync of the unchanged directory (full after a delta, a delta after a full run) writes no
  rows and emits no events: incremental and full runs reach the same state.

The guard is kept out of the way (`force=True`): it is tested in test_runner.py. Deterministic
(derandomized, no example database) and bounded to a few seconds. Memberships of a deleted user
or group are asserted gone before its deletion event (the store's order: `WriteSet`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import SyncHarness
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dirpull.connectors.base import Done, Page
from dirpull.jsoncodec import canonical
from dirpull.model import Group, User

TENANT = {"t": {"provider": "bamboohr", "company_domain": "acme", "api_key": "literal-key"}}
USER_IDS = [f"u{i}" for i in range(5)]
GROUP_IDS = [f"g{i}" for i in range(3)]
EMAILS = ["ann@example.test", "bob@example.test", "cy@example.test", None]
# Values that are equal in Python but not as JSON (1, 1.0, True), empty and null ones.
VALUES = st.sampled_from([None, "", "x", "y", 1, 1.0, True, 0, [], {}, ["a"], {"k": 1}])
ATTRS = st.dictionaries(st.sampled_from(["a", "b", "c"]), VALUES, max_size=3)


@dataclass
class State:
    users: dict[str, User] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    members: set[tuple[str, str]] = field(default_factory=set)

    def copy(self) -> State:
        return State(dict(self.users), dict(self.groups), set(self.members))


users = st.builds(
    lambda email, name, state, title, dept, manager, custom, raw: {
        "email": email,
        "username": email,
        "emails": [email] if email else [],
        "display_name": name,
        "state": state,
        "job_title": title,
        "department": dept,
        "manager_idp_id": manager,
        "custom_attributes": custom,
        "raw_attributes": raw,
    },
    st.sampled_from(EMAILS),
    st.sampled_from(["Ann", "Bob", None]),
    st.sampled_from(["active", "inactive"]),
    st.sampled_from([None, "Eng", "Boss"]),
    st.sampled_from([None, "R&D", ""]),
    st.sampled_from([None, *USER_IDS[:3]]),
    ATTRS,
    ATTRS,
)
USER_FIELDS = ["email", "display_name", "job_title", "department", "manager_idp_id", "first_name", "employee_number"]

uid, gid = st.sampled_from(USER_IDS), st.sampled_from(GROUP_IDS)
ops = st.one_of(
    st.tuples(st.just("user_put"), uid, users),
    st.tuples(st.just("user_set"), uid, st.sampled_from(USER_FIELDS), st.sampled_from([None, "", "v1", "v2", "u1"])),
    st.tuples(st.just("user_attr"), uid, st.sampled_from(["custom_attributes", "raw_attributes"]), ATTRS),
    st.tuples(st.just("user_flip"), uid),
    st.tuples(st.just("user_del"), uid),
    st.tuples(st.just("group_put"), gid, st.sampled_from(["Eng", "Ops", None]), st.sampled_from([None, "d"]), ATTRS),
    st.tuples(st.just("group_rename"), gid, st.sampled_from(["Eng", "Ops", "Sales", None])),
    st.tuples(st.just("group_del"), gid),
    st.tuples(st.just("member_add"), gid, uid),
    st.tuples(st.just("member_add"), gid, uid),
    st.tuples(st.just("member_del"), gid, uid),
    st.tuples(st.just("member_del"), gid, uid),
)
# The directory of the first sync: most ids in use, with memberships, so later steps change them.
initial = st.tuples(
    st.dictionaries(uid, users, min_size=2),
    st.dictionaries(gid, st.sampled_from(["Eng", "Ops", None]), min_size=1),
    st.sets(st.tuples(gid, uid)),
).map(
    lambda t: (
        [("user_put", k, v) for k, v in sorted(t[0].items())]
        + [("group_put", k, name, None, {}) for k, name in sorted(t[1].items())]
        + [("member_add", g, u) for g, u in sorted(t[2])]
    )
)
# How a delta source words a change (each is one a real vendor API uses).
delta_styles = st.fixed_dictionaries(
    {
        # Memberships of a deleted user or group are listed as removed too (or left implied).
        "list_implied_removals": st.booleans(),
        # A changed group's whole member list, named complete (or pairs added and removed).
        "complete_groups": st.booleans(),
        # A changed user comes twice, an older copy first (Graph delta replays).
        "replay_stale_copy": st.booleans(),
        # Re-created ids are removed in an earlier page, then listed again.
        "remove_then_relist": st.booleans(),
        "page_size": st.integers(1, 4),
    }
)
PLAIN = {"list_implied_removals": True, "complete_groups": False, "replay_stale_copy": False,
         "remove_then_relist": False, "page_size": 3}  # fmt: skip
steps = st.lists(
    st.tuples(st.lists(ops, min_size=1, max_size=6), st.sampled_from(["full", "delta"]), delta_styles),
    min_size=1,
    max_size=7,
)


def apply_op(s: State, op: tuple[Any, ...]) -> None:
    kind, *args = op
    if kind == "user_put":
        key, fields = args
        s.users[key] = User(idp_id=key, **fields)
    elif kind in ("user_set", "user_attr", "user_flip") and args[0] in s.users:
        u = s.users[args[0]]
        if kind == "user_flip":
            update = {"state": "inactive" if u.state == "active" else "active"}
        else:
            update = {args[1]: args[2]}
        s.users[args[0]] = u.model_copy(update=update)
    elif kind == "user_del" and args[0] in s.users:
        del s.users[args[0]]
        s.members = {(g, u) for g, u in s.members if u != args[0]}
    elif kind == "group_put":
        key, name, description, raw = args
        s.groups[key] = Group(idp_id=key, name=name, description=description, raw_attributes=raw)
    elif kind == "group_rename" and args[0] in s.groups:
        s.groups[args[0]] = s.groups[args[0]].model_copy(update={"name": args[1]})
    elif kind == "group_del" and args[0] in s.groups:
        del s.groups[args[0]]
        s.members = {(g, u) for g, u in s.members if g != args[0]}
    elif kind == "member_add" and args[0] in s.groups and args[1] in s.users:
        s.members.add((args[0], args[1]))
    elif kind == "member_del":
        s.members.discard((args[0], args[1]))


class ScriptedDirectory:
    """Serves `state`: a snapshot when asked for one (no cursor, or `full`), else a delta from the
    version its cursor names, worded as `style` says."""

    provider = "scripted"

    def __init__(self) -> None:
        self.state = State()
        self.versions: list[State] = []
        self.style: dict[str, Any] = PLAIN
        # Per version: the ids deleted and re-created since the one before (the same id, a new object).
        self.recreated: list[tuple[set[str], set[str]]] = []

    def publish(self, recreated_users: set[str], recreated_groups: set[str]) -> None:
        self.versions.append(self.state.copy())
        self.recreated.append((recreated_users, recreated_groups))

    def pull(self, cursor: dict[str, Any] | None, *, full: bool) -> Iterator[Page | Done]:
        now, size = len(self.versions) - 1, self.style["page_size"]
        new = self.versions[now]
        if cursor is None or full:
            users = sorted(new.users.values(), key=lambda u: u.idp_id)
            for i in range(0, max(1, len(users)), size):
                yield Page(users=users[i : i + size])
            yield Page(groups=sorted(new.groups.values(), key=lambda g: g.idp_id), members=sorted(new.members))
            yield Done(snapshot=True, cursor={"v": now}, mode="full")
            return
        since = cursor["v"]
        old = self.versions[since]
        re_users = set().union(*(r[0] for r in self.recreated[since + 1 : now + 1]))
        re_groups = set().union(*(r[1] for r in self.recreated[since + 1 : now + 1]))
        style = self.style
        gone_users = sorted(old.users.keys() - new.users.keys())
        gone_groups = sorted(old.groups.keys() - new.groups.keys())
        if style["remove_then_relist"]:
            yield Page(removed_users=sorted(re_users & new.users.keys()),
                       removed_groups=sorted(re_groups & new.groups.keys()))  # fmt: skip
        changed = [u for key, u in sorted(new.users.items()) if old.users.get(key) != u or key in re_users]
        if style["replay_stale_copy"]:
            stale = [old.users[u.idp_id] for u in changed if u.idp_id in old.users]
            changed = stale + changed
        for i in range(0, len(changed), size):
            yield Page(users=changed[i : i + size])
        yield Page(removed_users=gone_users)
        groups = [g for key, g in sorted(new.groups.items()) if old.groups.get(key) != g or key in re_groups]
        added = new.members - old.members
        removed = old.members - new.members
        if not style["list_implied_removals"]:
            # Left implied: a pair of a user or group that is gone now (not re-created).
            removed = {(g, u) for g, u in removed if g in new.groups and u in new.users}
        page = Page(groups=groups, removed_groups=gone_groups)
        if style["complete_groups"]:
            touched = sorted({g for g, _ in added | removed} & new.groups.keys())
            page.members = [(g, u) for g, u in sorted(new.members) if g in touched]
            page.complete_groups = touched
            page.removed_members = sorted((g, u) for g, u in removed if g not in new.groups)
        else:
            page.members = sorted(added)
            page.removed_members = sorted(removed)
        yield page
        yield Done(snapshot=False, cursor={"v": now}, mode="incremental")


def stored_state(h: SyncHarness) -> tuple[dict[str, Any], dict[str, Any], set[tuple[str, str]]]:
    return h.users("t"), h.groups("t"), h.members("t")


def without_stamps(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("created_at", "updated_at")}


def same(a: Any, b: Any) -> bool:
    return canonical(a) == canonical(b)


def expected_previous(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in without_stamps(new):
        if same(old.get(key), new.get(key)):
            continue
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            out[key] = {
                k: before.get(k)
                for k in sorted({*before, *after})
                if (k in before) != (k in after) or not same(before.get(k), after.get(k))
            }
        else:
            out[key] = before
    return out


class Replay:
    """A consumer that mirrors the store from the event log alone, refusing any event it could
    not apply in the order given."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.members: set[tuple[str, str]] = set()

    def apply(self, e: dict[str, Any]) -> None:
        kind, data = e["type"], e["data"]
        where = f"event {e['seq']} {kind} {data.get('idp_id', data)}"
        if kind in ("group.user_added", "group.user_removed"):
            pair = (data["group"], data["user"])
            if kind == "group.user_added":
                assert pair[0] in self.groups and pair[1] in self.users, f"{where}: its user or group does not exist"
                assert pair not in self.members, f"{where}: already a member"
                self.members.add(pair)
            else:
                assert pair in self.members, f"{where}: not a member"
                self.members.discard(pair)
            return
        objects = self.users if kind.startswith("user.") else self.groups
        key = data["idp_id"]
        if kind.endswith(".created"):
            assert key not in objects, f"{where}: exists already"
            assert e["previous_attributes"] is None, where
            objects[key] = data
        elif kind.endswith(".updated"):
            assert key in objects, f"{where}: does not exist"
            old = objects[key]
            assert e["previous_attributes"], f"{where}: names no change"
            assert e["previous_attributes"] == expected_previous(old, data), where
            assert data["created_at"] == old["created_at"], where
            objects[key] = data
        else:
            assert key in objects, f"{where}: does not exist"
            assert same(data, objects[key]), f"{where}: not the last object the log gave"
            column = 1 if kind == "user.deleted" else 0
            left = [p for p in self.members if p[column] == key]
            assert not left, f"{where}: memberships {left} were never removed"
            del objects[key]


ORDER = ["user.created", "user.updated", "group.created", "group.updated", "group.user_added", "group.user_removed",
         "group.deleted", "user.deleted"]  # fmt: skip


def check_run(h: SyncHarness, r: Any, after: int, replay: Replay) -> int:
    assert r.status == "succeeded", r.error
    events = h.events("t", after)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(after + 1, after + 1 + len(events))), seqs  # one run at a time: no gaps
    assert len(events) == r.events == r.counts["events"]
    assert all(e["run_id"] == r.run_id for e in events)
    ranks = [ORDER.index(e["type"]) for e in events]
    assert ranks == sorted(ranks), [e["type"] for e in events]
    for e in events:
        replay.apply(e)
    return seqs[-1] if seqs else after


def check_store(h: SyncHarness, want: State, replay: Replay) -> None:
    users, groups, members = stored_state(h)
    assert {k: without_stamps(v) for k, v in users.items()} == {k: u.model_dump() for k, u in want.users.items()}
    assert {k: without_stamps(v) for k, v in groups.items()} == {k: g.model_dump() for k, g in want.groups.items()}
    assert members == want.members
    assert replay.users == users
    assert replay.groups == groups
    assert replay.members == members


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    # No shrinking: each example is a dozen syncs, and shrinking a failure took over five minutes
    # (past the test timeout, so nothing was shown). The failing example is printed as found;
    # add Phase.shrink here to shrink one locally.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(first=initial, steps=steps)
def test_store_and_replayed_event_log_match_the_directory_after_every_full_or_delta_sync(first, steps):
    source = ScriptedDirectory()
    with tempfile.TemporaryDirectory() as tmp:
        h = SyncHarness(Path(tmp), TENANT, connector_factory=lambda tenant, settings: source)
        try:
            replay = Replay()
            seq = 0
            for ops_, mode, style in [(first, "full", PLAIN), *steps]:
                before = source.state.copy()
                for op in ops_:
                    apply_op(source.state, op)
                # Ids deleted and re-created by this step's operations: a new object, the same id.
                dropped_users = {op[1] for op in ops_ if op[0] == "user_del" and op[1] in before.users}
                dropped_groups = {op[1] for op in ops_ if op[0] == "group_del" and op[1] in before.groups}
                source.publish(dropped_users & source.state.users.keys(), dropped_groups & source.state.groups.keys())
                source.style = style
                r = h.sync("t", full=mode == "full", force=True)
                seq = check_run(h, r, seq, replay)
                check_store(h, source.state, replay)
                # The same directory again, the other way: nothing to write.
                again = h.sync("t", full=mode == "delta", force=True)
                assert again.status == "succeeded", again.error
                assert again.counts["rows_written"] == 0 and again.events == 0, (again.mode, again.counts)
                assert h.last_seq() == seq
                check_store(h, source.state, replay)
        finally:
            h.close()
