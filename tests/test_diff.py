"""The diff is pure: stored fingerprints + fresh pages → a plan, then rows and events."""

from __future__ import annotations

import random

from dirpull.connectors.base import Done, Page, Quarantined
from dirpull.jsoncodec import loads
from dirpull.model import Group, User, fingerprint, record_fields
from dirpull.sync.diff import Diff, LoadedState, build_writes, changed_fields, sorted_pairs


def fp(record):
    return fingerprint(record_fields(record))


ADA = User(idp_id="1", username="ada", state="active", job_title="Engineer")
BOB = User(idp_id="2", username="bob", state="active")
ENG = Group(idp_id="g", name="Eng")

SNAPSHOT = Done(snapshot=True, cursor=None, mode="full")
DELTA = Done(snapshot=False, cursor=None, mode="incremental")


def stored(users=(ADA, BOB), groups=(ENG,), members=(("g", "1"),)):
    return Diff(LoadedState({u.idp_id: fp(u) for u in users}, {g.idp_id: fp(g) for g in groups}, set(members)))


def test_unchanged_snapshot_is_an_empty_plan():
    d = stored()
    d.add(Page(users=[ADA, BOB], groups=[ENG], members=[("g", "1")]))
    plan = d.finish(SNAPSHOT)
    assert plan.is_empty()
    assert build_writes(plan, {}, {}).rows == 0


def test_snapshot_create_update_delete_and_membership():
    d = stored()
    carol = User(idp_id="3", username="carol")
    d.add(Page(users=[ADA.model_copy(update={"state": "inactive"}), carol], groups=[ENG], members=[("g", "3")]))
    plan = d.finish(SNAPSHOT)
    assert set(plan.users) == {"1", "3"}
    assert plan.user_deletes == {"2"}
    assert set(plan.member_adds) == {("g", "3")} and set(plan.member_removes) == {("g", "1")}
    old = {"1": record_fields(ADA), "2": record_fields(BOB)}
    ws = build_writes(plan, old, {})
    events = list(ws.all_events())
    types = [e["type"] for e in events]
    assert types == ["user.created", "user.updated", "group.user_added", "group.user_removed", "user.deleted"]
    assert ws.event_count == 5
    assert events[1]["previous_attributes"] == {"state": "active"}
    assert events[0]["data"] == record_fields(carol) and "fingerprint" not in events[0]["data"]
    # Held (and written) as the record's canonical JSON on the diff's spool, shared with its row.
    held = next(ws.all_events(as_written=True))["data"]
    assert held is ws.user_creates[0] and loads(held.read()) == record_fields(carol)
    assert ws.user_fingerprints["3"] == fp(carol) and plan.stored_users == {"1"}


def test_an_update_naming_a_new_manager_comes_after_that_managers_creation():
    """Events are applied in order by consumers: a report's user.updated must not name a manager
    whose user.created comes later in the log (ids sort the other way here: "1" < "9")."""
    d = stored()
    boss = User(idp_id="9", username="boss")
    d.add(Page(users=[ADA.model_copy(update={"manager_idp_id": "9"}), BOB, boss], groups=[ENG], members=[("g", "1")]))
    ws = build_writes(d.finish(SNAPSHOT), {"1": record_fields(ADA), "2": record_fields(BOB)}, {})
    assert [(e["type"], e["object_id"]) for e in ws.all_events()] == [("user.created", "9"), ("user.updated", "1")]


def test_delta_only_explicit_removals_delete():
    d = stored()
    d.add(Page(users=[BOB.model_copy(update={"job_title": "Boss"})], removed_members=[("g", "1")]))
    plan = d.finish(DELTA)
    assert plan.user_deletes == set()  # ADA not seen, but a delta does not sweep
    assert set(plan.users) == {"2"}
    assert set(plan.member_removes) == {("g", "1")}


def test_delta_removed_user_takes_its_memberships():
    d = stored()
    d.add(Page(removed_users=["1"]))
    plan = d.finish(DELTA)
    assert plan.user_deletes == {"1"} and set(plan.member_removes) == {("g", "1")}


def test_delta_complete_group_replaces_its_member_set():
    d = stored(members=(("g", "1"),))
    d.add(Page(members=[("g", "2")], complete_groups=["g"]))
    plan = d.finish(DELTA)
    assert set(plan.member_adds) == {("g", "2")} and set(plan.member_removes) == {("g", "1")}


def test_same_object_twice_later_wins_and_removal_then_return_cancels():
    d = stored()
    d.add(Page(users=[ADA.model_copy(update={"job_title": "X"})], removed_users=["2"]))
    d.add(Page(users=[ADA, BOB]))  # back to the stored values
    plan = d.finish(DELTA)
    assert plan.is_empty()


def test_membership_pairs_follow_the_order_they_came_in() -> None:
    """Added then removed: gone; removed then added again: kept. In a snapshot and in a delta alike,
    with a group's pairs spread over pages and interleaved with another group's."""
    ops = [
        Page(members=[("g", "1"), ("g", "2"), ("h", "1")]),
        Page(removed_members=[("g", "2"), ("h", "1")]),
        Page(members=[("h", "2"), ("h", "1"), ("g", "1")]),
    ]
    for done in (SNAPSHOT, DELTA):
        d = stored(groups=(ENG, Group(idp_id="h", name="H")), members=())
        d.add(Page(users=[ADA, BOB], groups=[ENG, Group(idp_id="h", name="H")]))
        for page in ops:
            d.add(page)
        plan = d.finish(done)
        assert plan.member_adds == [("g", "1"), ("h", "1"), ("h", "2")], done.mode
        assert plan.member_removes == [], done.mode


def test_membership_to_unknown_user_is_skipped_not_stored():
    d = stored()
    d.add(Page(users=[ADA, BOB], groups=[ENG], members=[("g", "1"), ("g", "ghost")]))
    plan = d.finish(SNAPSHOT)
    assert set(plan.member_adds) == set() and plan.members_skipped == 1


def test_quarantined_user_is_not_deleted_and_keeps_memberships():
    d = stored()
    d.add(Page(users=[BOB], groups=[ENG], quarantined=[Quarantined("user", "1", "bad record")]))
    plan = d.finish(SNAPSHOT)
    assert plan.user_deletes == set() and set(plan.member_removes) == set()


def test_changed_fields_lists_old_values_only_for_differences():
    old = record_fields(ADA)
    new = record_fields(ADA.model_copy(update={"job_title": "CTO", "department": "R&D"}))
    assert changed_fields(old, new) == {"job_title": "Engineer", "department": None}


def test_changed_mapping_fields_list_only_changed_keys():
    old = record_fields(User(idp_id="1", raw_attributes={"a": 1, "b": 2, "gone": 3}))
    new = record_fields(User(idp_id="1", raw_attributes={"a": 1, "b": 5, "new": 4}))
    assert changed_fields(old, new) == {"raw_attributes": {"b": 2, "gone": 3, "new": None}}


def test_fingerprint_ignores_nothing_the_connector_kept_and_is_stable():
    a = User(idp_id="1", raw_attributes={"b": 1, "a": [1, 2]})
    b = User(idp_id="1", raw_attributes={"a": [1, 2], "b": 1})
    assert fp(a) == fp(b)
    assert fp(a) != fp(User(idp_id="1", raw_attributes={"a": [2, 1], "b": 1}))


def test_pending_records_wait_on_disk_not_in_memory() -> None:
    d = Diff(LoadedState({}, {}, set()))
    users = [User(idp_id=str(i), username=f"user{i}", raw_attributes={"n": i, "pad": "x" * 500}) for i in range(2000)]
    d.add(Page(users=users))
    plan = d.finish(SNAPSHOT)
    # Memory holds an offset and a length per record; the JSON (~600 bytes each) is in the spool.
    assert d.spool.size > 2000 * 500
    assert all(type(v).__name__ == "SpooledJson" for v in plan.users.values())
    ws = build_writes(plan, {}, {})
    expected = [record_fields(u) for u in sorted(users, key=lambda u: u.idp_id)]
    assert [loads(r.read()) for r in ws.user_creates] == expected


def test_the_diff_digests_the_same_bytes_as_the_records_fields() -> None:
    from dirpull.jsoncodec import canonical

    rich = User(
        idp_id="9", emails=["a@example.test", "b@example.test"], custom_attributes={"cost": 7, "tags": ["x"]},
        raw_attributes={"z": {"nested": [1, None, True]}, "a": "é", "m": 1.5},
    )  # fmt: skip
    group = Group(idp_id="g", name="Eng", raw_attributes={"externalMembers": ["p@partner.test"]})
    for record in (rich, group, ADA):
        assert canonical(record.__dict__) == canonical(record_fields(record))
        d = Diff(LoadedState({}, {}, set()))
        d.add(Page(users=[record]) if isinstance(record, User) else Page(groups=[record]))
        plan = d.finish(SNAPSHOT)
        fps = plan.user_fingerprints if isinstance(record, User) else plan.group_fingerprints
        assert fps[record.idp_id] == fp(record)


def test_sorted_pairs_is_sorted_pairs():
    rng = random.Random(5)
    pairs = {(f"g{rng.randrange(30)}", f"u{rng.randrange(500)}") for _ in range(3000)}
    assert sorted_pairs(pairs) == sorted(pairs)
    assert sorted_pairs([]) == []
