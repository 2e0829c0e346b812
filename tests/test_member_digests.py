"""Group member digests: a full resync reads the stored memberships only of groups whose members
changed, and still gets every membership change right."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from scripted import Directory, ScriptedConnector, people

from dirpull.connectors.base import Done, Page
from dirpull.model import Group, fingerprint, record_fields
from dirpull.storage import schema as t
from dirpull.storage.store import Store
from dirpull.sync.diff import Diff, LoadedState, members_digest

TENANT = {"t": {"provider": "bamboohr", "company_domain": "acme", "api_key": "literal-key"}}
SNAPSHOT = Done(snapshot=True, cursor=None, mode="full")


# --- the diff ----------------------------------------------------------------------------------------


def _never() -> set[tuple[str, str]]:
    raise AssertionError("every stored pair was loaded")


def test_digest_is_order_free_and_tells_member_sets_apart():
    assert members_digest(["b", "a"]) == members_digest(["a", "b"])
    assert members_digest(["a"]) != members_digest(["a", "b"]) != members_digest([])


def test_only_groups_whose_digest_differs_have_their_pairs_read():
    asked: list[set[str]] = []
    stored_pairs = {("g1", "u1"), ("g1", "u2"), ("g2", "u1")}

    def pairs_of(groups: Any, users: Any) -> set[tuple[str, str]]:
        asked.append(set(groups))
        return {p for p in stored_pairs if p[0] in groups}

    users = {u: "fp" for u in ("u1", "u2")}
    records = [Group(idp_id=g, name=g) for g in ("g1", "g2", "g3")]
    groups = {g.idp_id: fingerprint(record_fields(g)) for g in records}
    digests = {"g1": members_digest(["u1", "u2"]), "g2": members_digest(["u1"]), "g3": members_digest([])}
    state = LoadedState(users, groups, _never, {}, digests, pairs_of)
    d = Diff(state)
    d.add(Page(unchanged_users=["u1", "u2"]))
    # g1 and g3 unchanged, g2 loses u1 and gains u2; the users come unnormalized (unchanged)
    d.add(Page(groups=records, members=[("g1", "u2"), ("g1", "u1"), ("g2", "u2")]))
    plan = d.finish(SNAPSHOT)
    assert not plan.groups  # the groups themselves came unchanged
    assert asked == [{"g2"}]
    assert set(plan.member_adds) == {("g2", "u2")} and set(plan.member_removes) == {("g2", "u1")}
    assert plan.member_digests == {"g2": members_digest(["u2"])}


def test_member_lists_diff_like_the_pairs_they_stand_for():
    stored_pairs = {("g1", "u1"), ("g1", "u2"), ("g2", "u1")}
    users = {u: "fp" for u in ("u1", "u2", "u3")}
    records = [Group(idp_id=g, name=g) for g in ("g1", "g2", "g3")]
    groups = {g.idp_id: fingerprint(record_fields(g)) for g in records}
    digests = {"g1": members_digest(["u1", "u2"]), "g2": members_digest(["u1"]), "g3": members_digest([])}
    d = Diff(LoadedState(users, groups, _never, {}, digests, lambda g, u: {p for p in stored_pairs if p[0] in g}))
    d.add(Page(unchanged_users=["u1", "u2", "u3"]))
    # g1 as a list (one id twice, in another order) plus a pair; g2 split over two lists, one
    # naming a user and a group nobody has seen.
    d.add(Page(groups=records, members=[("g1", "u1")], member_lists=[("g1", ["u2", "u1", "u2"]), ("g2", ["u3"])]))
    d.add(Page(member_lists=[("g2", ["u1", "ghost"]), ("nowhere", ["u1"])]))
    plan = d.finish(SNAPSHOT)
    assert set(plan.member_adds) == {("g2", "u3")} and set(plan.member_removes) == set()
    assert plan.members_skipped == 2  # (g2, ghost) and (nowhere, u1)
    assert plan.member_digests == {"g2": members_digest(["u1", "u3"])}

    first = Diff(LoadedState({}, {}, set()))
    first.add(Page(users=[], groups=records[:1], member_lists=[("g1", ["u1"])]))
    first.add(Page(unchanged_users=["u1"]))
    assert first.finish(SNAPSHOT).member_adds == [("g1", "u1")]


@pytest.mark.stores
def test_group_members_reads_ids_that_hold_the_separator(harness):
    odd = "u\x1f1"  # the separator `group_members` joins ids with
    d = Directory(
        users=[*people(4), *[u.model_copy(update={"idp_id": odd}) for u in people(1, start=9)]],
        groups=[Group(idp_id="g1", name="G1"), Group(idp_id="g2", name="G2"), Group(idp_id="g3", name="G3")],
        members=[("g1", "u1"), ("g1", odd), ("g2", "u2"), ("g2", "u3")],
    )
    h = harness(TENANT, connector_factory=lambda tenant, settings: ScriptedConnector(d))
    assert h.sync("t", full=True).status == "succeeded"
    assert h.store.group_members("t", ["g1", "g2", "g3"]) == {"g1": {"u1", odd}, "g2": {"u2", "u3"}}


# --- through the runner and the real store -----------------------------------------------------------


class _Delta(ScriptedConnector):
    """Serves the directory's members of g1 as a delta: adds and removes, nothing else."""

    def __init__(self, directory: Directory, add: list[tuple[str, str]], remove: list[tuple[str, str]]) -> None:
        super().__init__(directory)
        self.add, self.remove = add, remove

    def pull(self, cursor: dict[str, Any] | None, *, full: bool) -> Iterator[Page | Done]:
        if full:
            yield from super().pull(cursor, full=full)
            return
        yield Page(members=self.add, removed_members=self.remove)
        yield Done(snapshot=False, cursor={"delta": 1}, mode="incremental", requests=1)


def _digests(store: Store) -> dict[str, str | None]:
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.select(t.groups.c.idp_id, t.groups.c.members_digest)).all())


def _counting(monkeypatch: pytest.MonkeyPatch, store: Store) -> list[Any]:
    """Records each read of stored memberships: None for all of them, else the groups asked for."""
    calls: list[Any] = []
    real_pairs, real_members = store.membership_pairs, store.group_members

    def pairs(tenant: str, *, groups: Any = None, users: Any = None) -> set[tuple[str, str]]:
        calls.append(None if groups is None and users is None else sorted(groups or ()))
        return real_pairs(tenant, groups=groups, users=users)

    def members(tenant: str, groups: Any) -> dict[str, set[str]]:
        calls.append(sorted(groups))
        return real_members(tenant, groups)

    monkeypatch.setattr(store, "membership_pairs", pairs)
    monkeypatch.setattr(store, "group_members", members)
    return calls


@pytest.mark.stores
def test_full_resync_reads_stored_pairs_of_changed_groups_only(harness, monkeypatch):
    d = Directory(
        users=people(30),
        groups=[Group(idp_id=f"g{i}", name=f"G{i}") for i in range(1, 4)],
        members=[("g1", "u1"), ("g1", "u2"), ("g2", "u3"), ("g3", "u4")],
    )
    connector: dict[str, Any] = {"c": ScriptedConnector(d)}
    h = harness(TENANT, connector_factory=lambda tenant, settings: connector["c"])
    assert h.sync("t", full=True).counts["members_added"] == 4
    assert _digests(h.store) == {
        "g1": members_digest(["u1", "u2"]), "g2": members_digest(["u3"]), "g3": members_digest(["u4"])
    }  # fmt: skip
    calls = _counting(monkeypatch, h.store)

    same = h.sync("t", full=True)
    assert same.events == 0 and same.counts["rows_written"] == 0
    assert calls == []  # no stored pair read at all

    d.members = [("g1", "u1"), ("g1", "u5"), ("g2", "u3"), ("g3", "u4")]
    before = h.last_seq()
    moved = h.sync("t", full=True)
    assert calls == [["g1"]]
    assert h.changes("t", before) == [("group.user_added", "g1", "u5"), ("group.user_removed", "g1", "u2")]
    assert h.members("t") == {("g1", "u1"), ("g1", "u5"), ("g2", "u3"), ("g3", "u4")}
    assert _digests(h.store)["g1"] == members_digest(["u1", "u5"]) and moved.status == "succeeded"

    # A deleted group's memberships go with it; a deleted user leaves every group it was in.
    calls.clear()
    d.groups = [g for g in d.groups if g.idp_id != "g3"]
    d.users = [u for u in d.users if u.idp_id != "u3"]
    d.members = [("g1", "u1"), ("g1", "u5")]
    h.sync("t", full=True)
    assert calls == [["g2", "g3"]]
    assert h.members("t") == {("g1", "u1"), ("g1", "u5")}
    assert _digests(h.store) == {"g1": members_digest(["u1", "u5"]), "g2": members_digest([])}


@pytest.mark.stores
def test_an_incremental_membership_change_forgets_the_digest_until_the_next_full_run(harness, monkeypatch):
    d = Directory(
        users=people(30),
        groups=[Group(idp_id="g1", name="G1"), Group(idp_id="g2", name="G2")],
        members=[("g1", "u1"), ("g2", "u2")],
    )
    connector: dict[str, Any] = {"c": ScriptedConnector(d)}
    h = harness(TENANT, connector_factory=lambda tenant, settings: connector["c"])
    assert h.sync("t", full=True).status == "succeeded"
    connector["c"] = _Delta(d, add=[("g1", "u7")], remove=[])
    incr = h.sync("t")
    assert incr.mode == "incremental" and incr.counts["members_added"] == 1
    assert _digests(h.store) == {"g1": None, "g2": members_digest(["u2"])}

    # The vendor's full listing now agrees with the delta: g1's pairs are read, nothing changes,
    # and its digest is known again.
    d.members = [("g1", "u1"), ("g1", "u7"), ("g2", "u2")]
    calls = _counting(monkeypatch, h.store)
    full = h.sync("t", full=True)
    assert full.events == 0 and full.counts["rows_written"] == 0
    assert calls == [["g1"]]
    assert _digests(h.store) == {"g1": members_digest(["u1", "u7"]), "g2": members_digest(["u2"])}
