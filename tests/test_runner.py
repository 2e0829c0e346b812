"""The sync runner through the real store: what gets applied, held, or left alone."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import datetime, timedelta

import pytest
from scripted import Directory, factory, people

from dirpull.connectors.base import Done, Page
from dirpull.model import Group, User
from dirpull.storage.store import utcnow
from dirpull.sync.runner import cut_off

pytestmark = pytest.mark.stores  # each test runs on SQLite and on PostgreSQL

TENANT = {"t": {"provider": "bamboohr", "company_domain": "acme", "api_key": "literal-key"}}


def make(harness, directory: Directory, **kw):
    return harness(TENANT, connector_factory=factory(directory), **kw)


# Both ways the runner takes pages: diffed in this thread as the pull thread hands them over, or
# diffed in the pull thread itself (a connector with `hands_over_pages = False`).
handover = pytest.mark.parametrize("hands_over", [True, False], ids=["handed-over", "diffed-in-pull-thread"])


@handover
def test_first_sync_creates_everything_and_unchanged_resync_writes_nothing(harness, hands_over):
    d = Directory(
        users=people(25), groups=[Group(idp_id="g1", name="Eng")], members=[("g1", "u1"), ("g1", "u2")],
        hands_over_pages=hands_over,
    )  # fmt: skip
    h = make(harness, d)
    seen = []
    r = h.sync("t", progress=lambda _t, pages, users, groups, done=False: seen.append((pages, users, groups, done)))
    # Three pages of users, then the groups; then, once everything is read, that the run goes on
    # to compare and write (the terminal's line said "… read" through a long write).
    assert seen[-2:] == [(4, 25, 1, False), (4, 25, 1, True)]
    assert not any(read_all for *_, read_all in seen[:-1])
    assert r.status == "succeeded" and r.exit_code == 0
    assert r.counts["users_created"] == 25 and r.counts["members_added"] == 2
    assert len(h.users("t")) == 25 and h.members("t") == {("g1", "u1"), ("g1", "u2")}
    seq = h.last_seq()
    again = h.sync("t")
    assert again.status == "succeeded"
    assert again.events == 0 and again.counts["rows_written"] == 0
    assert h.last_seq() == seq


def test_changes_produce_exact_events_with_previous_attributes(harness):
    d = Directory(users=people(5), groups=[Group(idp_id="g1", name="Eng")], members=[("g1", "u1")])
    h = make(harness, d)
    h.sync("t")
    seq = h.last_seq()
    d.users[1] = d.users[1].model_copy(update={"state": "inactive", "job_title": "Ex"})
    d.users.pop()  # u4 gone
    d.users.append(User(idp_id="u9", username="new@example.test"))
    d.groups = [Group(idp_id="g1", name="Engineering")]
    d.members = [("g1", "u2"), ("g1", "u9")]
    r = h.sync("t")
    assert r.status == "succeeded"
    assert h.changes("t", seq) == [
        ("user.created", "u9"),
        ("user.updated", "u1", ("job_title", "state")),
        ("group.updated", "g1", ("name",)),
        ("group.user_added", "g1", "u2"),
        ("group.user_added", "g1", "u9"),
        ("group.user_removed", "g1", "u1"),
        ("user.deleted", "u4"),
    ]
    updated = next(e for e in h.events("t", seq) if e["type"] == "user.updated")
    assert updated["previous_attributes"] == {"job_title": None, "state": "active"}
    assert updated["data"]["state"] == "inactive"
    deleted = next(e for e in h.events("t", seq) if e["type"] == "user.deleted")
    assert deleted["data"]["username"] == "user4@example.test"  # the last stored object
    assert r.counts["users_deactivated"] == 1


def test_user_and_group_event_data_is_the_whole_object_with_its_timestamps(harness):
    """The contract's event `data` is the object, `created_at` and `updated_at` included, as
    `users --json` / `groups --json` show it (a deletion's: the last stored object). Without them a
    consumer mirroring the log from events alone could not tell when an object was created."""
    d = Directory(users=people(3), groups=[Group(idp_id="g1", name="Eng"), Group(idp_id="g2", name="Ops")])
    h = make(harness, d)
    h.sync("t")
    created = {e["data"]["idp_id"]: e for e in h.events("t")}
    first_users, first_groups = h.users("t"), h.groups("t")
    for key, row in [*first_users.items(), *first_groups.items()]:
        assert created[key]["data"] == row  # every field of the object, nothing more
        assert row["created_at"] == row["updated_at"] == created[key]["created_at"]
    seq = h.last_seq()
    d.users[0] = d.users[0].model_copy(update={"job_title": "Boss"})
    d.users.pop()  # u2
    d.groups = [Group(idp_id="g1", name="Engineering")]  # g2 goes
    assert h.sync("t").status == "succeeded"
    events = {(e["type"], e["data"]["idp_id"]): e for e in h.events("t", seq)}
    users, groups = h.users("t"), h.groups("t")
    for kind, key, now in [("user", "u0", users["u0"]), ("group", "g1", groups["g1"])]:
        updated = events[(f"{kind}.updated", key)]
        assert updated["data"] == now
        assert now["created_at"] == (first_users if kind == "user" else first_groups)[key]["created_at"]
        assert now["updated_at"] == updated["created_at"] != now["created_at"]
    assert events[("user.deleted", "u2")]["data"] == first_users["u2"]
    assert events[("group.deleted", "g2")]["data"] == first_groups["g2"]
    assert "fingerprint" not in events[("user.deleted", "u2")]["data"]


def test_a_key_that_comes_or_goes_with_a_null_value_is_named_in_previous_attributes(harness):
    """A vendor attribute that appears as null (a new `$select`, a new profile property) changes the
    record; its update event used to say `previous_attributes: {"raw_attributes": {}}`, naming nothing."""
    d = Directory(users=people(2, raw_attributes={"a": 1, "gone": None}, custom_attributes={"cc": "7"}))
    h = make(harness, d)
    h.sync("t")
    seq = h.last_seq()
    d.users[0] = d.users[0].model_copy(update={"raw_attributes": {"a": 1, "gone": None, "new": None}})
    d.users[1] = d.users[1].model_copy(
        update={"raw_attributes": {"a": 1}, "custom_attributes": {"cc": "7", "site": None}}
    )
    assert h.sync("t").status == "succeeded"
    assert [(e["data"]["idp_id"], e["previous_attributes"]) for e in h.events("t", seq)] == [
        ("u0", {"raw_attributes": {"new": None}}),
        ("u1", {"custom_attributes": {"site": None}, "raw_attributes": {"gone": None}}),
    ]


def test_a_value_that_changes_json_type_but_not_python_equality_is_an_update_event(harness):
    """A vendor attribute going from true to 1, 0 to false or 1 to 1.0 is a different value in the
    stored row and in `users --json`; Python's == calls them equal, so the row was rewritten and no
    event said so: a consumer mirroring the log kept the old value for good."""
    d = Directory(users=people(3, raw_attributes={"flag": True, "n": 1, "site": "a"}, custom_attributes={"c": 0}))
    h = make(harness, d)
    h.sync("t")
    seq = h.last_seq()
    d.users[0] = d.users[0].model_copy(update={"raw_attributes": {"flag": 1, "n": 1, "site": "b"}})
    d.users[1] = d.users[1].model_copy(update={"custom_attributes": {"c": False}})
    d.users[2] = d.users[2].model_copy(update={"raw_attributes": {"flag": True, "n": 1.0, "site": "a"}})
    r = h.sync("t")
    assert r.status == "succeeded" and r.counts["users_updated"] == 3
    assert [(e["data"]["idp_id"], e["previous_attributes"]) for e in h.events("t", seq)] == [
        ("u0", {"raw_attributes": {"flag": True, "site": "a"}}),
        ("u1", {"custom_attributes": {"c": 0}}),
        ("u2", {"raw_attributes": {"n": 1}}),
    ]
    assert h.events("t", seq)[0]["data"]["raw_attributes"]["flag"] == 1
    assert h.users("t")["u1"]["custom_attributes"] == {"c": False}
    seq = h.last_seq()
    assert h.sync("t").events == 0 and h.last_seq() == seq


def test_a_row_whose_fingerprint_changed_but_not_its_values_keeps_its_updated_at(harness):
    """A stored fingerprint that no longer matches unchanged content (an earlier release's digest,
    e.g. of a float written another way) is refreshed without an event, as before, and without
    moving the object's `updated_at`: nothing a consumer sees changed."""
    from dirpull.storage import schema

    d = Directory(users=people(3, raw_attributes={"score": 0.1}), groups=[Group(idp_id="g1", name="Eng")])
    h = make(harness, d)
    h.sync("t")
    before_users, before_groups, seq = h.users("t"), h.groups("t"), h.last_seq()
    with h.store.engine.begin() as conn:
        for table in (schema.users, schema.groups):
            old = table.update().where(table.c.idp_id.in_(["u0", "g1"])).values(fingerprint="from-an-old-release")
            conn.execute(old)
    r = h.sync("t")
    assert r.status == "succeeded" and r.events == 0 and r.counts["rows_written"] == 2
    assert h.users("t") == before_users and h.groups("t") == before_groups and h.last_seq() == seq
    again = h.sync("t")  # the fingerprints were refreshed
    assert again.counts["rows_written"] == 0 and again.events == 0


def test_nul_characters_in_values_are_dropped_on_both_stores(harness):
    """A vendor value holding a NUL (PostgreSQL's text and jsonb refuse one) is stored without
    it, identically on both stores, and an unchanged resync finds nothing to write."""
    odd = User(idp_id="u0", username="nul\x00name", job_title="a\x00b", emails=["x\x00@example.test"],
               raw_attributes={"k\x00ey": ["v\x00", {"n": "\x00"}], "plain": "ok"})  # fmt: skip
    d = Directory(users=[odd, *people(3, start=1)], groups=[Group(idp_id="g1", name="E\x00ng")], members=[("g1", "u0")])
    h = make(harness, d)
    r = h.sync("t")
    assert r.status == "succeeded" and r.counts["users_created"] == 4
    stored = h.users("t")["u0"]
    assert (stored["username"], stored["job_title"], stored["emails"]) == ("nulname", "ab", ["x@example.test"])
    assert stored["raw_attributes"] == {"key": ["v", {"n": ""}], "plain": "ok"}
    assert h.groups("t")["g1"]["name"] == "Eng"
    created = next(e for e in h.events("t", 0) if e["type"] == "user.created" and e["data"]["idp_id"] == "u0")
    assert created["data"]["username"] == "nulname"
    seq = h.last_seq()
    again = h.sync("t")
    assert again.status == "succeeded" and again.counts["rows_written"] == 0 and h.last_seq() == seq


@pytest.mark.parametrize(("bad", "what"), [("\x00", "a NUL character"), ("\ud83d", "a lone UTF-16 surrogate")],
                         ids=["nul", "surrogate"])  # fmt: skip
def test_a_record_whose_id_holds_what_no_store_can_keep_is_quarantined(harness, bad, what):
    """An id keeps what the vendor sent (it names the record in memberships and removals), and
    neither a NUL (PostgreSQL) nor a lone surrogate (half an emoji from a vendor whose strings are
    UTF-16: no UTF-8 form, either store) can be stored: one such user or group failed every run of
    the tenant, with a database traceback, and U+FFFD in its place could name another record. It is
    quarantined instead, on both stores alike (reported with U+FFFD), its memberships skipped, and
    the rest of the run applied."""
    d = Directory(
        users=[*people(3), User(idp_id=f"u{bad}x", username=f"n{bad}ul")],
        groups=[Group(idp_id="g1", name="Eng"), Group(idp_id=f"g{bad}2", name="Ops")],
        members=[("g1", "u0"), ("g1", f"u{bad}x"), (f"g{bad}2", "u1")],
    )
    h = make(harness, d)
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    assert set(h.users("t")) == {"u0", "u1", "u2"} and set(h.groups("t")) == {"g1"}
    assert h.members("t") == {("g1", "u0")}
    [run] = h.store.runs("t", 1)
    assert sorted((q["kind"], q["idp_id"], q["reason"]) for q in run["quarantined"]) == [
        ("group", "g\ufffd2", f"its id holds {what}, which the store cannot keep"),
        ("user", "u\ufffdx", f"its id holds {what}, which the store cannot keep"),
    ]
    seq = h.last_seq()
    again = h.sync("t", full=True)
    assert again.status == "succeeded" and again.counts["rows_written"] == 0 and h.last_seq() == seq


def test_long_vendor_values_sync_on_both_stores(harness):
    """Vendors set their own limits: a 300-character job title or a 600-character name used to
    fail every run of the tenant on PostgreSQL (varchar(255)), while SQLite stored it."""
    long_id = "id-" + "9" * 297
    odd = User(idp_id=long_id, username="u" * 600 + "@example.test", email="e" * 600 + "@example.test",
               first_name="F" * 300, last_name="L" * 300, display_name="D" * 600, job_title="Senior " * 50,
               department="Dept / " * 50, employee_number="7" * 300, manager_idp_id="m" * 300)  # fmt: skip
    group = Group(idp_id="g" * 300, name="N" * 600, email="g" * 600 + "@example.test")
    d = Directory(users=[odd, *people(2)], groups=[group], members=[(group.idp_id, long_id)])
    h = make(harness, d)
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    stored = h.users("t")[long_id]
    for field in ("username", "email", "first_name", "last_name", "display_name", "job_title", "department",
                  "employee_number", "manager_idp_id"):  # fmt: skip
        assert stored[field] == getattr(odd, field), field
    assert h.groups("t")[group.idp_id]["name"] == "N" * 600
    assert h.members("t") == {(group.idp_id, long_id)}
    assert {e["data"]["idp_id"] for e in h.events("t") if e["type"] == "user.created"} == {long_id, "u0", "u1"}
    d.users[0] = odd.model_copy(update={"job_title": "Principal " * 40})
    assert h.sync("t").counts["users_updated"] == 1
    assert h.users("t")[long_id]["job_title"] == "Principal " * 40


def test_a_lone_surrogate_from_a_connector_is_stored_as_a_replacement_character(harness):
    """A connector may hand over a string holding a lone surrogate (a vendor's half emoji): it
    has no UTF-8 form, and one used to fail every run of the tenant, on both stores."""
    odd = User(idp_id="odd", username="odd@example.test", display_name="Ana \ud83d", job_title="x\udc00y",
               raw_attributes={"title\ud83d": ["x\ud83d"]})  # fmt: skip
    group = Group(idp_id="g", name="Team \ud83d")
    d = Directory(users=[odd, *people(2)], groups=[group], members=[("g", "odd")])
    h = make(harness, d)
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    stored = h.users("t")["odd"]
    assert (stored["display_name"], stored["job_title"]) == ("Ana \ufffd", "x\ufffdy")
    assert stored["raw_attributes"] == {"title\ufffd": ["x\ufffd"]}
    assert h.groups("t")["g"]["name"] == "Team \ufffd"
    assert h.members("t") == {("g", "odd")}
    again = h.sync("t")
    assert again.status == "succeeded" and again.events == 0 and again.counts["rows_written"] == 0


def test_a_failed_statement_keeps_the_people_it_wrote_out_of_the_run_and_the_log(harness, monkeypatch, caplog):
    """A database error while applying (an integrity error, say) used to record the whole SQL and
    its parameters, the tenant's names and emails, as the run's error and in the log."""
    from dirpull.storage import schema
    from dirpull.storage.store import Store

    secret = "@".join(["private.person", "example.test"])  # built here: a traceback quotes source lines

    def failing_write(self, conn, tenant, *args, **kwargs):
        conn.execute(schema.users.insert().values(tenant=tenant, idp_id="u0", username=secret))

    d = Directory(users=people(3))
    h = make(harness, d)
    assert h.sync("t").status == "succeeded"
    d.users[0] = d.users[0].model_copy(update={"job_title": "Changed"})
    monkeypatch.setattr(Store, "_write_cursor", failing_write)
    caplog.set_level("DEBUG")
    r = h.sync("t")
    assert r.status == "failed" and r.error.startswith("IntegrityError: "), r.error
    assert "\n" not in r.error and "INSERT" not in r.error
    for text in (r.error, str(h.store.runs("t", 1)[0]), caplog.text):
        assert secret not in text
    assert "INSERT INTO users" in caplog.text  # the statement is in the log's traceback, to debug it
    assert h.users("t")["u0"]["job_title"] != "Changed"  # nothing of the run applied


def test_a_run_finding_every_store_connection_busy_fails_with_one_store_line(harness, caplog):
    """Every connection of the process busy for longer than the pool waits (other syncs holding
    them) failed the run as an "unexpected error", SQLAlchemy's traceback in the log and its
    "TimeoutError: QueuePool limit of size 5 overflow 5 reached, … (Background on this error at:
    https://sqlalche.me/…)" as the run's error. It is a store error like any other now: one line
    naming the store, in the run record and the log."""
    d = Directory(users=people(30))
    h = harness(TENANT, connector_factory=factory(d), store={"pool_size": 1, "connect_timeout": 0.2})
    held: list = []

    def take_every_connection(pages: int) -> None:  # as other syncs would, while this one pulls
        if pages == 3:
            while True:
                try:
                    held.append(h.store.engine.connect())
                except Exception:
                    return

    record_failure = h.store.finish_run

    def finish_run(*args, **kwargs):  # the other syncs are done by the time this one records its end
        for conn in held:
            conn.close()
        return record_failure(*args, **kwargs)

    d.on_page = take_every_connection
    h.store.finish_run = finish_run
    caplog.set_level("INFO", logger="dirpull.sync")  # (the demo, run in-process by its test, quiets it)
    r = h.sync("t")
    expected = f"store {h.store.safe_url}: no free connection after "
    assert r.status == "failed" and r.error.startswith(expected) and "\n" not in r.error, r.error
    assert "connections are in use" in r.error and "sqlalche.me" not in r.error
    run = h.store.runs("t", 1)[0]
    assert (run["status"], run["error"]) == ("failed", r.error)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert "Traceback" not in caplog.text and "status=failed events=0" in caplog.text
    assert h.users("t") == {}


def test_mass_deletion_is_held_and_force_applies_it(harness, caplog):
    d = Directory(users=people(100))
    h = make(harness, d, guard={"max_percent": 10, "min_count": 5})
    assert h.sync("t").status == "succeeded"
    seq = h.last_seq()
    d.users = d.users[:50]
    with caplog.at_level(logging.WARNING, logger="dirpull"):
        held = h.sync("t")
    # The WARNING an operator watching the log sees says what to do, not only what tripped.
    (warned,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sync held tenant=t:")]
    assert "delete 50 of 100" in warned and warned.endswith("apply with `dirpull sync t --full --force`"), warned
    assert held.status == "held" and held.exit_code == 3
    assert "delete 50 of 100" in held.error
    assert len(h.users("t")) == 100 and h.last_seq() == seq
    assert h.store.runs("t")[0]["status"] == "held"
    dry = h.sync("t", dry_run=True)
    assert dry.status == "planned" and dry.writes is not None and len(dry.writes.user_deletes) == 50
    assert dry.exit_code == 3  # the run it previews would be held
    assert len(h.users("t")) == 100
    forced = h.sync("t", force=True)
    assert forced.status == "succeeded" and len(h.users("t")) == 50
    assert any("guard overridden" in n for n in forced.notes)


def test_a_worker_that_lost_its_lease_does_not_record_its_run_as_held(harness):
    """The guard holds a run whose lease another worker took meanwhile (this one was paused, or
    cut off from the store past `lease_ttl`). The run was recorded `held`, over the "interrupted"
    the other worker's start had marked it, asking the operator to review and --force a run that
    is no longer in charge of the tenant. Now it fails as a lost lease does at the commit."""
    from dirpull.storage import schema

    d = Directory(users=people(100))
    h = make(harness, d, guard={"max_percent": 10, "min_count": 5})
    assert h.sync("t").status == "succeeded"
    d.users = d.users[:50]  # a run the guard holds
    taken: list[int] = []

    def take_over(n: int) -> None:
        if n == 5:  # the last page: this worker has no chance to notice before the guard
            with h.store.engine.begin() as conn:
                conn.execute(schema.leases.update().values(holder="other", expires_at=utcnow() + timedelta(minutes=5)))
            taken.append(h.store.start_run("t", trigger="schedule", mode="full", worker="other-host:1-abc"))

    d.on_page = take_over
    r = h.sync("t")
    assert taken
    assert r.status == "failed" and r.exit_code == 1 and "lease lost" in r.error, r.error
    runs = {run["id"]: run for run in h.store.runs("t")}
    assert (runs[r.run_id]["status"], runs[r.run_id]["error"]) == ("failed", r.error)
    assert runs[taken[0]]["status"] == "running"  # the other worker's run is the one in charge
    assert len(h.users("t")) == 100


def test_mass_deactivation_is_held(harness):
    d = Directory(users=people(40))
    h = make(harness, d, guard={"max_percent": 20, "min_count": 5})
    h.sync("t")
    d.users = [u.model_copy(update={"state": "inactive"}) if i < 20 else u for i, u in enumerate(d.users)]
    r = h.sync("t")
    assert r.status == "held" and "deactivate or delete 20 of 40 active users (20 deactivated, 0 deleted)" in r.error
    assert all(u["state"] == "active" for u in h.users("t").values())


def inactive(users: list[User]) -> list[User]:
    return [u.model_copy(update={"state": "inactive"}) for u in users]


def test_deactivations_are_measured_against_active_users_not_the_inactive_records_kept(harness):
    """HR sources keep terminated workers as inactive records: 60 active people next to 240 of them.
    A report marking 25 active people inactive (42% of the workforce) was 25 of 300 stored users,
    under 10%, and was applied: 25 people deprovisioned."""
    d = Directory(users=[*people(60), *inactive(people(240, start=60))])
    h = make(harness, d, guard={"max_percent": 10, "min_count": 20})
    assert h.sync("t").status == "succeeded"
    seq = h.last_seq()
    listed = d.users
    d.users = [u.model_copy(update={"state": "inactive"}) if i < 25 else u for i, u in enumerate(listed)]
    r = h.sync("t")
    assert r.status == "held" and r.exit_code == 3, r.error
    assert (
        "would deactivate or delete 25 of 60 active users (25 deactivated, 0 deleted) (threshold 10% and more than 20)"
    ) in r.error
    assert h.last_seq() == seq and sum(u["state"] == "active" for u in h.users("t").values()) == 60
    # Deleting active people counts the same as deactivating them: 3 + 20 is past the floor.
    d.users = [u.model_copy(update={"state": "inactive"}) if i < 3 else u for i, u in enumerate(listed[:20])]
    d.users += listed[40:]
    r = h.sync("t")
    assert r.status == "held"
    assert "would deactivate or delete 23 of 60 active users (3 deactivated, 20 deleted) (threshold" in r.error


def test_reactivating_many_when_no_one_is_active_is_held_past_the_floor(harness):
    """With no active user stored there is no share of them to compute: a run turning 6 inactive
    records active, past the floor of 5, is past every percentage and held; 5 are applied."""
    d = Directory(users=inactive(people(30)))
    h = make(harness, d, guard={"max_percent": 10, "min_count": 5})
    assert h.sync("t").status == "succeeded"
    listed = d.users
    d.users = [*people(6), *listed[6:]]
    r = h.sync("t")
    assert r.status == "held" and r.counts["users_reactivated"] == 6, r.error
    assert "would reactivate 6 of 30 inactive users, while none is active (threshold 10% and more than 5)" in r.error
    assert all(u["state"] == "inactive" for u in h.users("t").values())
    d.users = [*people(5), *listed[5:]]
    r = h.sync("t")
    assert r.status == "succeeded" and r.counts["users_reactivated"] == 5, r.error


def test_purging_inactive_records_is_not_deprovisioning_but_a_mass_purge_is_held(harness):
    """Deleting terminated workers' records deprovisions nobody: 25 of 240 inactive records go
    (more than 10% of the 60 active people, had they been counted against them) and the run is
    applied. A report that drops every inactive record is held all the same."""
    d = Directory(users=[*people(60), *inactive(people(240, start=60))])
    h = make(harness, d, guard={"max_percent": 10, "min_count": 20})
    assert h.sync("t").status == "succeeded"
    d.users = d.users[:-25]
    r = h.sync("t")
    assert r.status == "succeeded" and r.counts["users_deleted"] == 25, r.error
    d.users = d.users[:60]
    r = h.sync("t")
    assert r.status == "held", r.error
    assert "would delete 215 of 275 stored users, active or inactive (threshold 10% and more than 20)" in r.error
    assert len(h.users("t")) == 275


@pytest.mark.parametrize(("deleted", "status"), [(30, "succeeded"), (60, "held")])
def test_a_tenants_own_percentage_keeps_the_floor_of_defaults_guard(harness, deleted, status):
    """`[tenants.t.guard] max_percent = 10` under `[defaults.guard] min_count = 50`: the floor is
    50, not the built-in 20 (a deletion of 30 of 100 was held); past it the run is held."""
    d = Directory(users=people(100))
    tenants = {"t": {**TENANT["t"], "guard": {"max_percent": 10}}}
    h = harness(tenants, connector_factory=factory(d), guard={"max_percent": 90, "min_count": 50})
    h.sync("t")
    d.users = d.users[deleted:]
    r = h.sync("t")
    assert r.status == status, r.error
    assert len(h.users("t")) == (100 if status == "held" else 100 - deleted)
    if status == "held":
        assert "(threshold 10% and more than 50)" in r.error


def test_small_changes_below_the_floor_apply(harness):
    d = Directory(users=people(10))
    h = make(harness, d, guard={"max_percent": 10, "min_count": 5})
    h.sync("t")
    d.users = d.users[:6]  # 40% but only 4 users: under the absolute floor
    assert h.sync("t").status == "succeeded"


def test_empty_directory_after_users_is_held_whatever_the_thresholds(harness):
    d = Directory(users=people(3))
    h = make(harness, d, guard={"max_percent": 100, "min_count": 1000})
    h.sync("t")
    d.users = []
    r = h.sync("t")
    assert r.status == "held" and "no users" in r.error
    assert len(h.users("t")) == 3


def test_a_listing_whose_users_are_all_quarantined_is_held_saying_so(harness):
    """Every user unreadable (a BambooHR key that lost the status field) was held as "the
    directory returned no users": the operator went looking for an empty listing that was not."""
    from dirpull.connectors.base import Quarantined

    d = Directory(users=people(3))
    h = make(harness, d, guard={"max_percent": 100, "min_count": 1000})
    h.sync("t")
    d.users = []
    d.quarantined = [Quarantined("user", f"u{i}", "no status") for i in range(3)]
    r = h.sync("t")
    assert r.status == "held" and r.exit_code == 3
    assert "none of the 3 users the directory returned could be read (quarantined)" in r.error, r.error
    assert "returned no users" not in r.error
    assert len(h.users("t")) == 3


def test_an_empty_group_listing_is_held_below_the_floor_but_a_tenant_without_groups_is_not(harness):
    d = Directory(users=people(30), groups=[Group(idp_id=f"g{i}", name=f"G{i}") for i in range(3)])
    d.members = [("g0", "u1"), ("g1", "u2")]
    h = make(harness, d, guard={"max_percent": 10, "min_count": 20})
    assert h.sync("t").status == "succeeded"
    d.groups, d.members = [], []
    r = h.sync("t")
    assert r.status == "held", r.error
    assert "the directory returned no groups while the store holds 3 (would delete 3 with their memberships)" in r.error
    assert len(h.groups("t")) == 3 and len(h.members("t")) == 2
    d.groups = [Group(idp_id="g0", name="G0")]  # groups listed: the percentage rule alone
    assert h.sync("t").status == "succeeded" and set(h.groups("t")) == {"g0"}
    # A provider without groups (BambooHR) stores none: never held for listing none.
    users_only = harness({"u": TENANT["t"]}, connector_factory=factory(Directory(users=people(30))))
    assert users_only.sync("u").status == "succeeded"
    again = users_only.sync("u")
    assert again.status == "succeeded" and again.mode == "full", again.error


def test_emptied_member_lists_are_held_and_force_applies_them(harness):
    """Every user and group still listed, but the groups' members gone: downstream apps that grant
    access by group would take it from everyone in one run."""
    d = Directory(users=people(50), groups=[Group(idp_id=f"g{i}", name=f"G{i}") for i in range(10)])
    d.members = [(f"g{i}", f"u{j}") for i in range(10) for j in range(50)]  # 500 memberships
    h = make(harness, d, guard={"max_percent": 10, "min_count": 20})
    assert h.sync("t").status == "succeeded" and len(h.members("t")) == 500
    seq = h.last_seq()
    d.members = d.members[:50]  # only g0 keeps its members
    held = h.sync("t")
    assert held.status == "held" and held.exit_code == 3, held.error
    assert "would remove 450 of 500 group memberships (threshold 10% and more than 20)" in held.error
    assert len(h.members("t")) == 500 and h.last_seq() == seq
    dry = h.sync("t", dry_run=True)
    assert dry.status == "planned" and dry.exit_code == 3
    assert any("would remove 450 of 500 group memberships" in n for n in dry.notes)
    forced = h.sync("t", force=True)
    assert forced.status == "succeeded" and len(h.members("t")) == 50
    assert any("guard overridden with --force: would remove 450" in n for n in forced.notes)


def test_a_field_emptied_for_most_users_is_held_and_force_applies_it(harness):
    """A directory that stops returning a field (an API key that lost a permission) looked like
    everyone's email removed, and was applied: every consumer keyed on email lost it at once."""
    d = Directory(users=[u.model_copy(update={"custom_attributes": {"cost_center": f"C{i % 3}"}})
                         for i, u in enumerate(people(40))])  # fmt: skip
    # (The scripted vendor ignores the mapping; a real one fills cost_center from it.)
    tenants = {"t": {**TENANT["t"], "attributes": {"cost_center": "costCenter"}}}
    h = harness(tenants, connector_factory=factory(d), guard={"max_percent": 20, "min_count": 5})
    assert h.sync("t").status == "succeeded"
    seq = h.last_seq()
    d.users = [u.model_copy(update={"email": None}) for u in d.users]
    held = h.sync("t")
    assert held.status == "held" and held.exit_code == 3, held.error
    assert "would empty email for 40 of 40 stored users (threshold 20% and more than 5)" in held.error
    assert h.last_seq() == seq and all(u["email"] for u in h.users("t").values())
    forced = h.sync("t", force=True)
    assert forced.status == "succeeded" and not any(u["email"] for u in h.users("t").values())
    # A mapped attribute too; a few people losing a value (under the floor) is ordinary.
    d.users = [u.model_copy(update={"custom_attributes": {}}) for u in d.users]
    held = h.sync("t")
    assert held.status == "held" and "would empty custom_attributes.cost_center for 40 of 40" in held.error
    d.users = [u.model_copy(update={"custom_attributes": {"cost_center": "C0"}}) for u in d.users]
    assert h.sync("t", force=True).status == "succeeded"
    d.users = [u.model_copy(update={"job_title": None, "custom_attributes": {}}) if i < 5 else u
               for i, u in enumerate(d.users)]  # fmt: skip
    assert h.sync("t").status == "succeeded"


def test_memberships_of_a_deleted_group_or_user_do_not_count_as_removals(harness):
    """Deleting one large group (or a few people in many groups) is a deletion, measured as one:
    the memberships that go with it do not also trip the membership rule."""
    d = Directory(users=people(50), groups=[Group(idp_id=f"g{i}", name=f"G{i}") for i in range(20)])
    d.members = [("g0", f"u{j}") for j in range(50)] + [(f"g{i}", "u0") for i in range(1, 20)]
    d.members += [(f"g{i}", "u1") for i in range(1, 20)]
    h = make(harness, d, guard={"max_percent": 10, "min_count": 20})
    assert h.sync("t").status == "succeeded" and len(h.members("t")) == 88
    d.groups = d.groups[1:]  # g0 and its 50 memberships go: 1 of 20 groups
    d.members = [p for p in d.members if p[0] != "g0"]
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    assert r.counts["members_removed"] == 50
    d.users = d.users[2:]  # u0 and u1 leave: 2 of 50 users, 38 of 38 memberships
    d.members = []
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    assert r.counts["members_removed"] == 38 and not h.members("t")


def test_guard_is_skipped_on_the_first_sync(harness):
    h = make(harness, Directory(users=people(500)), guard={"max_percent": 1, "min_count": 1})
    assert h.sync("t").status == "succeeded"


@handover
def test_failure_mid_fetch_changes_nothing_and_keeps_the_cursor(harness, hands_over):
    d = Directory(users=people(30), hands_over_pages=hands_over)
    h = make(harness, d)
    h.sync("t")
    cursor = h.store.get_cursor("t")
    seq = h.last_seq()
    d.users = people(30, job_title="Changed")
    d.fail_after_pages = 2
    r = h.sync("t")
    assert r.status == "failed" and r.exit_code == 1 and "HTTP 500" in r.error
    assert all(u["job_title"] is None for u in h.users("t").values())
    assert h.last_seq() == seq
    assert h.store.get_cursor("t").value == cursor.value
    run = h.store.runs("t")[0]
    assert run["status"] == "failed" and "HTTP 500" in run["error"]


@handover
def test_a_pull_that_ends_without_done_applies_nothing(harness, hands_over):
    class Truncated:
        provider = "x"
        hands_over_pages = hands_over

        def pull(self, cursor, *, full):
            from dirpull.connectors.base import Page

            yield Page(users=people(3))

    h = harness(TENANT, connector_factory=lambda t, s: Truncated())
    r = h.sync("t")
    assert r.status == "failed" and "before the end" in r.error
    assert h.users("t") == {}


def test_concurrent_syncs_of_one_tenant_run_once(harness):
    gate = threading.Event()
    d = Directory(users=people(20), gate=gate)
    h = make(harness, d)
    results = []
    first = threading.Thread(target=lambda: results.append(h.sync("t")))
    first.start()
    assert d.entered.wait(10)
    second = h.sync("t")  # no --wait: reports who holds the lease
    gate.set()
    first.join(10)
    assert second.status == "skipped" and "is being synced by" in second.error
    assert results[0].status == "succeeded"
    assert d.pulls == 1
    assert len(h.store.runs("t")) == 1


def test_a_scheduled_fire_skips_what_another_worker_synced_since_whatever_its_clock_says(harness):
    """Several workers: a scheduled fire is skipped when another worker began and finished a
    scheduled run after this worker's previous fire, told by run ids (the database's order), so a
    worker whose clock is an hour off neither skips forever nor runs every fire."""
    import sqlalchemy as sa

    from dirpull.storage import schema
    from dirpull.sync.runner import Runner

    d = Directory(users=people(3))
    h = make(harness, d)
    other = Runner(h.config, h.store, worker="db7:4242", connector_factory=factory(d))
    mine = Runner(h.config, h.store, worker="app1:1717", connector_factory=factory(d))
    first = other.sync("t", trigger="schedule")
    assert first.status == "succeeded"
    # The other worker's clock is an hour behind: its run looks old, but began after our mark.
    with h.store.engine.begin() as conn:
        conn.execute(
            sa.update(schema.runs)
            .where(schema.runs.c.id == first.run_id)
            .values(started_at=utcnow() - timedelta(hours=1), finished_at=utcnow() - timedelta(hours=1))
        )
    skipped = mine.sync("t", trigger="schedule", due_after=first.run_id - 1)
    assert skipped.status == "skipped" and skipped.newest_run == first.run_id
    assert skipped.error.startswith(f"tenant t was synced by db7:4242 (run {first.run_id}, ended ")
    assert d.pulls == 1 and h.store.lease("t").holder is None  # nothing pulled, the lease given back
    # Nothing newer than what this worker saw last time: its turn.
    ran = mine.sync("t", trigger="schedule", due_after=skipped.newest_run)
    assert ran.status == "succeeded" and d.pulls == 2
    # Its own run, a manual run, a failed run do not make another worker's fire skip.
    manual = other.sync("t")
    d.fail_after_pages = 0
    failed = other.sync("t", trigger="schedule")
    d.fail_after_pages = None
    assert manual.status == "succeeded" and failed.status == "failed"
    assert mine.sync("t", trigger="schedule", due_after=ran.run_id).status == "succeeded"


def test_a_worker_takes_back_its_own_lease_left_by_a_release_the_store_missed(harness, monkeypatch):
    """The store was out as a run ended: its lease could not be given back. This worker's next
    syncs of the tenant were skipped as "being synced by" itself until `lease_ttl` passed. Now it
    takes back a lease its own ended run left; another worker still waits for it to expire."""
    from dirpull.storage.store import StoreUnavailable
    from dirpull.sync.runner import Runner

    d = Directory(users=people(3))
    h = make(harness, d)

    def outage(tenant: str, holder: str) -> None:
        raise StoreUnavailable("store db: lost the connection (server closed the connection unexpectedly)")

    monkeypatch.setattr(h.store, "release_lease", outage)
    assert h.sync("t").status == "succeeded"
    monkeypatch.undo()
    left = h.store.lease("t").holder
    assert left is not None and left.startswith(f"{h.runner.worker}/")  # held until lease_ttl
    other = Runner(h.config, h.store, worker=f"{h.runner.worker}x", connector_factory=factory(d))
    skipped = other.sync("t")
    assert skipped.status == "skipped" and skipped.holder == left
    d.users.append(User(idp_id="u9", username="new@example.test"))
    again = h.sync("t")
    assert again.status == "succeeded", again.error
    assert again.counts["users_created"] == 1 and d.pulls == 2
    assert h.store.lease("t").holder is None  # given back this time


def test_second_sync_with_wait_runs_after_the_first(harness):
    gate = threading.Event()
    d = Directory(users=people(20), gate=gate)
    h = make(harness, d)
    first = threading.Thread(target=h.sync, args=("t",))
    first.start()
    assert d.entered.wait(10)
    threading.Timer(0.3, gate.set).start()
    second = h.sync("t", wait=10)
    first.join(10)
    assert second.status == "succeeded" and d.pulls == 2


@handover
def test_stop_during_a_run_applies_nothing(harness, hands_over):
    stop = threading.Event()
    d = Directory(users=people(30), on_page=lambda n: stop.set() if n == 1 else None, hands_over_pages=hands_over)
    h = make(harness, d, stop=stop)
    r = h.sync("t")
    assert r.status == "failed" and "interrupted" in r.error
    assert h.users("t") == {}


@handover
def test_lost_lease_means_nothing_is_applied(harness, hands_over):
    d = Directory(users=people(5), hands_over_pages=hands_over)
    h = make(harness, d)

    def steal(n: int) -> None:
        # Another worker took over after this lease expired (e.g. this one was paused).
        with h.store.engine.begin() as conn:
            from dirpull.storage import schema

            conn.execute(schema.leases.update().values(holder="other", expires_at=utcnow() + timedelta(minutes=5)))

    d.on_page = steal
    r = h.sync("t")
    assert r.status == "failed" and "lease lost" in r.error
    assert h.users("t") == {}


@handover
def test_a_lease_that_ran_out_while_the_worker_slept_but_no_one_took_still_commits(harness, hands_over):
    """The worker's machine slept (a suspended VM or laptop, a paused container) past `lease_ttl`
    in the middle of the pull, and no other worker took the tenant meanwhile. Its heartbeat waits on
    the monotonic clock, which stood still, and had not renewed the lease yet (it would have, the
    lease still naming this run) when the run reached its commit: the run failed "lease lost before
    commit; nothing applied", and a run the guard held was recorded failed, not held. Another
    worker taking the lease still keeps it from committing (`test_lost_lease_means_nothing_is_applied`)."""
    from dirpull.storage import schema

    d = Directory(users=people(30), hands_over_pages=hands_over)
    h = make(harness, d)

    def sleep_through_the_lease(n: int) -> None:
        with h.store.engine.begin() as conn:
            conn.execute(schema.leases.update().values(expires_at=utcnow() - timedelta(minutes=5)))

    d.on_page = sleep_through_the_lease
    r = h.sync("t")
    assert (r.status, r.error) == ("succeeded", None)
    assert len(h.users("t")) == 30 and h.store.runs("t", 1)[0]["status"] == "succeeded"
    assert h.store.lease("t").holder is None  # given back as usual
    d.users = []  # a run the guard holds
    held = h.sync("t")
    assert (held.status, held.exit_code) == ("held", 3), held.error
    assert h.store.runs("t", 1)[0]["status"] == "held" and len(h.users("t")) == 30


def test_cursor_is_handed_back_and_advances_only_on_commit(harness):
    d = Directory(users=people(3))
    h = make(harness, d)
    h.sync("t")
    h.sync("t")
    assert d.cursors_seen == [None, {"pull": 1}]
    d.fail_after_pages = 0
    h.sync("t")
    d.fail_after_pages = None
    h.sync("t")
    assert d.cursors_seen[-1] == {"pull": 2}
    h.sync("t", full=True)
    assert d.cursors_seen[-1] is None


@pytest.mark.parametrize("value", [["pull", 1], "pull-1", True])
def test_a_stored_cursor_that_is_not_an_object_gives_a_full_sync_saying_so(harness, value):
    """A cursor edited by hand into JSON that is no object was handed to the connector, whose
    reading of its keys failed every run with an AttributeError and its traceback."""
    d = Directory(users=people(3))
    h = make(harness, d)
    h.sync("t")
    with h.store.engine.begin() as conn:
        from dirpull.storage import schema

        conn.execute(schema.cursors.update().values(value=value))
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    assert d.cursors_seen[-1] is None and "stored cursor unreadable: full resync" in r.notes
    h.sync("t")
    assert d.cursors_seen[-1] is not None  # the full run stored a cursor of its own


def test_periodic_full_reconciliation_ignores_the_cursor(harness):
    d = Directory(users=people(3))
    h = make(harness, d, defaults={"full_sync_every": "1s"})
    h.sync("t")
    with h.store.engine.begin() as conn:
        from dirpull.storage import schema

        conn.execute(schema.cursors.update().values(last_full_at=utcnow() - timedelta(seconds=5)))
    r = h.sync("t")
    assert d.cursors_seen[-1] is None and "periodic full reconciliation" in r.notes


def test_a_run_one_full_sync_period_after_the_last_full_ones_start_is_full(harness):
    """A tenant synced once a period (a daily cron with the default full_sync_every of 24h): its
    next run starts one period after the last full run started, a little early or late. It is a
    full one, not an incremental one because the last full run took a while to commit (the full
    walk came every other day)."""
    import time
    from datetime import datetime

    d = Directory(users=people(3), on_page=lambda _: time.sleep(1.0))  # a full walk that takes 1 s
    h = make(harness, d, defaults={"full_sync_every": "3s"})
    assert h.sync("t").status == "succeeded"
    d.on_page = None
    started = datetime.fromisoformat(h.store.runs("t", 1)[0]["started_at"].replace("Z", "+00:00"))
    time.sleep(max(0.0, (started + timedelta(seconds=2.99) - utcnow()).total_seconds()))  # its fire, 10 ms early
    r = h.sync("t")
    assert r.mode == "full" and "periodic full reconciliation" in r.notes, (r.mode, r.notes)
    assert d.cursors_seen[-1] is None



def test_a_fire_early_by_its_interval_jitter_one_full_period_on_still_does_the_full_walk(harness, monkeypatch):
    """A "5m" tenant with full_sync_every "15m": its fires land up to 30 s after their slots (the
    jitter), so the third fire after a full run's may come up to 30 s less than 15 min after it,
    more than the 1% (9 s) allowed early. That fire was incremental and the full walk waited for
    the next one, 5 min later, or every other period once the fires drifted."""
    import dirpull.sync.runner as runner_module

    d = Directory(users=people(3))
    h = make(harness, d, defaults={"schedule": "5m", "full_sync_every": "15m"})
    assert h.sync("t").status == "succeeded"
    started = datetime.fromisoformat(h.store.runs("t", 1)[0]["started_at"].replace("Z", "+00:00"))
    # The full run's fire was 28 s into its slot; the fire two slots on, 30 s into its own, is
    # still incremental, and the next one, 2 s into its own, the full walk.
    monkeypatch.setattr(runner_module, "utcnow", lambda: started + timedelta(minutes=10, seconds=2))
    r = h.sync("t")
    assert d.cursors_seen[-1] is not None and "periodic full reconciliation" not in r.notes, r.notes
    monkeypatch.setattr(runner_module, "utcnow", lambda: started + timedelta(minutes=15, seconds=-26))
    r = h.sync("t")
    assert d.cursors_seen[-1] is None and "periodic full reconciliation" in r.notes, r.notes

def test_quarantined_record_is_kept_as_stored_not_deleted(harness):
    from dirpull.connectors.base import Done, Page, Quarantined

    state = {"bad": False}

    class C:
        provider = "x"

        def pull(self, cursor, *, full):
            users = people(3)
            if state["bad"]:
                yield Page(
                    users=users[:2],
                    groups=[Group(idp_id="g", name="G")],
                    quarantined=[Quarantined("user", "u2", "login too short")],
                )
            else:
                yield Page(users=users, groups=[Group(idp_id="g", name="G")], members=[("g", "u2")])
            yield Done(snapshot=True, cursor=None, mode="full")

    h = harness(TENANT, connector_factory=lambda t, s: C())
    h.sync("t")
    state["bad"] = True
    seq = h.last_seq()
    r = h.sync("t")
    assert r.status == "succeeded" and r.counts["quarantined"] == 1
    assert "u2" in h.users("t") and ("g", "u2") in h.members("t")
    assert h.last_seq() == seq
    assert h.store.runs("t")[0]["quarantined"] == [{"kind": "user", "idp_id": "u2", "reason": "login too short"}]


def test_a_deleted_user_leaves_a_quarantined_group_too(harness):
    """A quarantined group keeps its stored members, but not one deleted by the same run: that
    membership stayed, naming a user who no longer exists, and the consumer got `user.deleted`
    without the `group.user_removed` before it."""
    from dirpull.connectors.base import Quarantined

    d = Directory(
        users=people(30), groups=[Group(idp_id="g1", name="A"), Group(idp_id="g2", name="B")],
        members=[("g1", "u1"), ("g1", "u2"), ("g2", "u1")],
    )  # fmt: skip
    h = make(harness, d)
    h.sync("t")
    seq = h.last_seq()
    d.users = [u for u in d.users if u.idp_id != "u1"]  # u1 leaves
    d.groups, d.members = [Group(idp_id="g2", name="B")], []
    d.quarantined = [Quarantined("group", "g1", "unreadable")]
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    assert h.changes("t", seq) == [
        ("group.user_removed", "g1", "u1"),
        ("group.user_removed", "g2", "u1"),
        ("user.deleted", "u1"),
    ]
    assert h.members("t") == {("g1", "u2")}
    seq = h.last_seq()
    assert h.sync("t").events == 0 and h.last_seq() == seq


@pytest.mark.parametrize("kind", ["user", "group"])
def test_a_record_quarantined_without_an_id_gets_no_one_unlisted_deleted(harness, kind):
    """An unreadable row without its id (a Workday row with no worker id) could be anyone the
    snapshot did not list: they all stay as stored, memberships too, until a clean snapshot."""
    from dirpull.connectors.base import Quarantined

    d = Directory(
        users=people(30), groups=[Group(idp_id="g1", name="A"), Group(idp_id="g2", name="B")],
        members=[("g1", "u1"), ("g1", "u7"), ("g2", "u1")],
    )  # fmt: skip
    h = make(harness, d)
    h.sync("t")
    seq = h.last_seq()
    if kind == "user":
        d.users = [u for u in d.users if u.idp_id != "u7"]
        d.members = [("g1", "u1"), ("g2", "u1")]
    else:
        d.groups = [g for g in d.groups if g.idp_id != "g2"]
        d.members = [("g1", "u1"), ("g1", "u7")]
    d.quarantined = [Quarantined(kind, None, "row has no id")]  # type: ignore[arg-type]
    r = h.sync("t")
    assert r.status == "succeeded" and r.counts["quarantined"] == 1
    assert h.last_seq() == seq  # nothing deleted, no membership removed
    assert "u7" in h.users("t") and {("g1", "u7"), ("g2", "u1")} <= h.members("t")
    assert any(f"1 stored {kind}s not listed were kept" in n for n in r.notes)
    assert any(f"1 stored {kind}s not listed were kept" in n for n in h.store.runs("t")[0]["notes"])

    d.quarantined = []  # the row is readable again, and the record is still not listed: gone
    r = h.sync("t")
    expected = (
        [("group.user_removed", "g1", "u7"), ("user.deleted", "u7")]
        if kind == "user"
        else [("group.user_removed", "g2", "u1"), ("group.deleted", "g2")]
    )
    assert h.changes("t", seq) == expected


def test_a_group_deleted_upstream_goes_with_a_quarantined_users_membership(harness):
    """A quarantined user keeps its stored memberships, but not in a group the vendor no longer
    lists: the group and every membership of it go, the quarantined user's included (the
    `group.user_removed` a deletion always brings). It stayed, with that one member, for good."""
    from dirpull.connectors.base import Quarantined

    d = Directory(
        users=people(30), groups=[Group(idp_id="g1", name="A"), Group(idp_id="g2", name="B")],
        members=[("g1", "u1"), ("g1", "u2"), ("g2", "u2")],
    )  # fmt: skip
    h = make(harness, d)
    h.sync("t")
    seq = h.last_seq()
    d.users = [u for u in d.users if u.idp_id != "u2"]  # u2 cannot be read ...
    d.quarantined = [Quarantined("user", "u2", "login too short")]
    d.groups, d.members = [Group(idp_id="g2", name="B")], [("g2", "u2")]  # ... and g1 is deleted
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    assert h.changes("t", seq) == [
        ("group.user_removed", "g1", "u1"),
        ("group.user_removed", "g1", "u2"),
        ("group.deleted", "g1"),
    ]
    assert set(h.groups("t")) == {"g2"} and h.members("t") == {("g2", "u2")} and "u2" in h.users("t")
    assert not any("were kept" in n for n in r.notes)
    seq = h.last_seq()
    assert h.sync("t").events == 0 and h.last_seq() == seq


def test_a_large_float_read_back_from_the_store_is_not_named_as_changed(harness):
    """PostgreSQL's jsonb keeps a number, not how it was written: 1e16 comes back as
    10000000000000000. When another field of the user changed, the attribute holding it was named
    in `previous_attributes` as changed too. A real change between 1 and 1.0 still is."""
    attrs = {"big": 1e16, "huge": [1.5e22, {"n": -2e300}], "one": 1}
    d = Directory(users=people(3, raw_attributes=attrs))
    h = make(harness, d)
    h.sync("t")
    seq = h.last_seq()
    d.users[1] = d.users[1].model_copy(update={"job_title": "Lead"})
    d.users[2] = d.users[2].model_copy(update={"raw_attributes": {**attrs, "one": 1.0}})
    assert h.sync("t").status == "succeeded"
    assert [(e["data"]["idp_id"], e["previous_attributes"]) for e in h.events("t", seq)] == [
        ("u1", {"job_title": None}),
        ("u2", {"raw_attributes": {"one": 1}}),
    ]
    assert h.users("t")["u0"]["raw_attributes"]["big"] == 1e16


def test_a_membership_kept_for_a_quarantined_user_goes_once_the_vendor_drops_it(harness):
    from dirpull.connectors.base import Quarantined

    d = Directory(users=people(3), groups=[Group(idp_id="g", name="G")], members=[("g", "u1"), ("g", "u2")])
    h = make(harness, d)
    h.sync("t")
    # u2's record cannot be read, and u2 has left g: the pair stays while u2 is quarantined ...
    d.users, d.members = people(2), [("g", "u1")]
    d.quarantined = [Quarantined("user", "u2", "login too short")]
    h.sync("t")
    assert ("g", "u2") in h.members("t")
    # ... and goes at the first run that can read u2 again, a full resync (which goes by the
    # groups' member digests) included.
    d.users, d.quarantined = people(3), []
    seq = h.last_seq()
    r = h.sync("t", full=True)
    assert r.counts["members_removed"] == 1 and h.members("t") == {("g", "u1")}
    assert h.changes("t", seq) == [("group.user_removed", "g", "u2")]


def test_the_pending_records_file_is_closed_when_a_run_ends_but_not_under_a_dry_run(harness, monkeypatch):
    from dirpull.spool import RecordSpool

    spools = []
    init = RecordSpool.__init__

    def tracked(self) -> None:
        init(self)
        spools.append(self)

    monkeypatch.setattr(RecordSpool, "__init__", tracked)
    h = make(harness, Directory(users=people(5)))
    dry = h.sync("t", dry_run=True)
    assert dry.status == "planned" and len(dry.writes.user_creates) == 5
    assert [e["data"]["idp_id"] for e in dry.writes.all_events()] == [f"u{i}" for i in range(5)]
    r = h.sync("t")
    assert r.status == "succeeded" and r.counts["users_created"] == 5 and r.writes is None
    assert spools[-1]._file.closed and not spools[0]._file.closed


@handover
def test_pages_are_diffed_in_the_thread_the_connector_asks_for(harness, hands_over, monkeypatch):
    from dirpull.sync.diff import Diff

    threads = set()
    add = Diff.add

    def recorded(self, page):
        threads.add(threading.current_thread().name)
        add(self, page)

    monkeypatch.setattr(Diff, "add", recorded)
    h = make(harness, Directory(users=people(25), hands_over_pages=hands_over))
    assert h.sync("t").status == "succeeded" and len(h.users("t")) == 25
    assert threads == ({threading.current_thread().name} if hands_over else {"pull-t"})


@handover
def test_a_connector_yielding_something_else_than_pages_applies_nothing(harness, hands_over):
    class Odd:
        provider = "x"
        hands_over_pages = hands_over

        def pull(self, cursor, *, full):
            from dirpull.connectors.base import Done, Page

            yield Page(users=people(3))
            yield {"users": []}
            yield Done(snapshot=True, cursor=None, mode="full")

    h = harness(TENANT, connector_factory=lambda t, s: Odd())
    r = h.sync("t")
    assert r.status == "failed" and "connector yielded dict, not a Page" in r.error
    assert h.users("t") == {}


class _DeltaAfterSnapshot:
    """A snapshot first, then deltas given by the test: `(listed users, removed user ids)`."""

    provider = "scripted"

    def __init__(self, users: list[User], deltas: list[tuple[list[User], list[str]]], leaves: bool) -> None:
        self.users, self.deltas = users, deltas
        self.deleted_manager_leaves_reports = leaves

    def pull(self, cursor, *, full):
        if cursor is None or full:
            yield Page(users=list(self.users))
            yield Done(snapshot=True, cursor={"n": 0}, mode="full")
            return
        listed, removed = self.deltas.pop(0)
        yield Page(users=listed, removed_users=removed)
        yield Done(snapshot=False, cursor={"n": cursor["n"] + 1}, mode="incremental")


@pytest.mark.parametrize("leaves", [True, False], ids=["manager-leaves-reports", "manager-stays-named"])
def test_a_delta_deleting_a_manager_clears_them_from_their_reports_where_the_vendor_does(harness, leaves):
    """A vendor whose deleted users stop being anyone's manager, without listing the reports as
    changed (Entra ID), has them cleared by the run that deletes them; a vendor that keeps naming
    them (Okta's managerId) keeps its reports as they are."""
    boss, other = User(idp_id="boss"), User(idp_id="other")
    reports = [User(idp_id=f"r{i}", manager_idp_id="boss") for i in range(3)]
    kept = User(idp_id="k", manager_idp_id="other")
    # r0 comes again in the delta (still naming the deleted boss), r1 with a new manager.
    delta = [
        reports[0].model_copy(update={"job_title": "T"}),
        reports[1].model_copy(update={"manager_idp_id": "other"}),
    ]
    conn = _DeltaAfterSnapshot([boss, other, *reports, kept, *people(20)], [(delta, ["boss"])], leaves)
    h = harness(TENANT, connector_factory=lambda tenant, settings: conn)
    assert h.sync("t").status == "succeeded"
    seq = h.last_seq()
    r = h.sync("t")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    stored = h.users("t")
    if leaves:
        assert [stored[f"r{i}"]["manager_idp_id"] for i in range(3)] == [None, "other", None]
        assert sorted(h.changes("t", seq)) == [
            ("user.deleted", "boss"),
            ("user.updated", "r0", ("job_title", "manager_idp_id")),
            ("user.updated", "r1", ("manager_idp_id",)),
            ("user.updated", "r2", ("manager_idp_id",)),
        ]
        assert r.counts["users_updated"] == 3
    else:
        assert [stored[f"r{i}"]["manager_idp_id"] for i in range(3)] == ["boss", "other", "boss"]
    assert stored["k"]["manager_idp_id"] == "other"


@pytest.mark.postgres
@pytest.mark.parametrize("landed", [True, False], ids=["committed", "not-committed"])
def test_a_commit_whose_confirmation_is_lost_is_reported_as_the_store_has_it(harness, pg_schema_url, landed, caplog):
    """The connection lost during COMMIT: the server may have committed the run (only its answer
    lost: a network cut, a failover) or not. A committed run was recorded failed afterwards, in a
    new transaction, though its rows, events and cursor were in the store and consumers had read
    its events: the tenant showed as failing, for a failure that did not happen. The store is
    asked now, and the run reported and recorded as it is there."""
    d = Directory(users=people(3))
    with _cut_at_commit(harness, pg_schema_url, d, landed=landed) as (h, relay, before):
        caplog.set_level("INFO")
        r = h.sync("t")
        assert relay.cut == ["after commit" if landed else "before commit"]
        run = h.store.runs("t", 1)[0]
        assert (r.run_id, r.status, r.error) == (run["id"], run["status"], run["error"])
        warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        if landed:
            assert (r.status, r.exit_code, r.events) == ("succeeded", 0, 1), r.error
            assert run["counts"]["users_updated"] == 1
            assert h.users("t")["u0"]["job_title"] == "Changed" and h.last_seq() == before + 1
            assert [m for m in warned if "confirmation of the commit was lost" in m and "was committed" in m], warned
        else:
            assert (r.status, r.exit_code, r.events) == ("failed", 1, 0)
            assert "lost the connection" in r.error and r.error.endswith("not committed: nothing applied"), r.error
            assert h.users("t")["u0"]["job_title"] != "Changed" and h.last_seq() == before
            assert [m for m in warned if "confirmation of the commit was lost" in m and "not committed" in m], warned
        # The next run goes on from what is in the store.
        d.users[1] = d.users[1].model_copy(update={"job_title": "Later"})
        del h.store._write_cursor  # no more cuts
        again = h.sync("t")
        assert again.status == "succeeded" and again.events == (1 if landed else 2)


@pytest.mark.postgres
@pytest.mark.parametrize("landed", [True, False], ids=["committed", "not-committed"])
def test_a_commit_whose_outcome_cannot_be_checked_is_not_recorded_failed_over_its_commit(
    harness, pg_schema_url, landed
):
    """The store out of reach just after the commit's confirmation was lost: the run fails saying
    its outcome is not known, and is recorded failed only if it did not commit. A committed run was
    re-marked failed once the store was back."""
    d = Directory(users=people(3))
    with _cut_at_commit(harness, pg_schema_url, d, landed=landed, refuse=1) as (h, relay, before):
        r = h.sync("t")
        assert relay.cut == ["after commit" if landed else "before commit"]
        assert (r.status, r.exit_code) == ("failed", 1)
        assert "whether the run was applied is not known" in r.error and "`dirpull runs t`" in r.error, r.error
        run = h.store.runs("t", 1)[0]
        assert run["id"] == r.run_id
        if landed:
            assert run["status"] == "succeeded" and run["error"] is None
            assert h.users("t")["u0"]["job_title"] == "Changed" and h.last_seq() == before + 1
        else:
            assert (run["status"], run["error"]) == ("failed", r.error)
            assert h.users("t")["u0"]["job_title"] != "Changed" and h.last_seq() == before


@contextlib.contextmanager
def _cut_at_commit(harness, pg_schema_url, d: Directory, *, landed: bool, refuse: int = 0):
    """A harness whose store goes through a relay that cuts the applying transaction's connection
    at its COMMIT (`landed`: after the server committed it), once a first sync succeeded and a user
    changed (u0's job title). Yields (harness, relay, last seq before)."""
    from pg_relay import CommitCutter

    from dirpull.storage.store import Store

    schema_url = pg_schema_url()
    relay = CommitCutter(schema_url)
    try:
        h = harness(TENANT, connector_factory=factory(d), store_url=relay.url_for(schema_url))
        assert h.sync("t").status == "succeeded"
        d.users[0] = d.users[0].model_copy(update={"job_title": "Changed"})
        write_cursor = Store._write_cursor

        def cut_at_commit(self, conn, *args, **kwargs):  # on the applying transaction's connection
            relay.arm(conn, after_commit=landed, refuse=refuse)
            return write_cursor(self, conn, *args, **kwargs)

        h.store._write_cursor = cut_at_commit.__get__(h.store)
        yield h, relay, h.last_seq()
    finally:
        relay.close()


@pytest.mark.postgres
def test_a_held_run_whose_commit_confirmation_is_lost_stays_held(harness, pg_schema_url, caplog):
    """The guard holds a run, and the connection is lost at the COMMIT of its record after the
    server committed it (a network cut, a failover). The record was then rewritten in a new
    transaction as failed with the connection error: `dirpull status` said the tenant was failing
    on the store instead of held for review, and `dirpull sync` exited 1, not 3. The store is asked
    now, as for an applied run's lost commit."""
    from pg_relay import CommitCutter

    from dirpull.storage.store import Store

    schema_url = pg_schema_url()
    relay = CommitCutter(schema_url)
    try:
        d = Directory(users=people(100))
        h = make(harness, d, guard={"max_percent": 10, "min_count": 5}, store_url=relay.url_for(schema_url))
        assert h.sync("t").status == "succeeded"
        d.users = d.users[:50]  # a run the guard holds
        fence = Store._fence

        def cut_at_commit(self, conn, *args, **kwargs):  # on the held record's transaction
            relay.arm(conn, after_commit=True)
            return fence(self, conn, *args, **kwargs)

        h.store._fence = cut_at_commit.__get__(h.store)
        caplog.set_level("INFO")
        r = h.sync("t")
        assert relay.cut == ["after commit"]
        run = h.store.runs("t", 1)[0]
        assert (r.status, r.exit_code) == ("held", 3), r.error
        assert (run["id"], run["status"]) == (r.run_id, "held")
        assert run["error"].startswith("held by the mass-change guard"), run["error"]
        assert len(h.users("t")) == 100
        warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        assert [m for m in warned if "confirmation of the commit was lost" in m and "was committed" in m], warned
    finally:
        relay.close()


def test_a_wall_clock_step_back_during_a_run_does_not_record_a_negative_duration(harness, monkeypatch):
    """An NTP correction that steps the clock back minutes while a run goes (a VM resumed, a
    clock that had drifted): `dirpull runs` showed that run's duration as minus ten minutes, its
    end minus its start on the wall clock. The duration is the run's own, on the monotonic clock."""
    import dirpull.storage.store as store_module

    real = store_module.utcnow
    step = timedelta(0)
    monkeypatch.setattr(store_module, "utcnow", lambda: real() - step)
    d = Directory(users=people(3))
    h = make(harness, d)
    start_run = h.store.start_run

    def start_then_step_back(*args, **kwargs):
        nonlocal step
        run_id = start_run(*args, **kwargs)
        step = timedelta(minutes=10)  # the clock steps back as the run begins
        return run_id

    monkeypatch.setattr(h.store, "start_run", start_then_step_back)
    assert h.sync("t").status == "succeeded"
    d.fail_after_pages = 0
    assert h.sync("t").status == "failed"
    durations = [r["duration_s"] for r in h.store.runs("t")]
    assert len(durations) == 2 and all(0 <= s < 60 for s in durations), durations


@pytest.mark.postgres
def test_a_commit_waiting_for_a_lock_another_session_holds_fails_in_bounded_time_saying_so(harness, pg_schema_url):
    """A transaction left open in psql holding a lock on `events` (or a stuck worker's event lock)
    held every run that had events to commit for as long as it stayed open, with nothing in the log
    or the run record, though a SQLite store gives up after 3 × [store] connect_timeout. The
    PostgreSQL apply now waits as long, then fails the run (nothing applied) saying what it waited
    for, and the next run applies once the lock is gone."""
    import time

    import sqlalchemy as sa

    url = pg_schema_url()
    d = Directory(users=people(3))
    h = make(harness, d, store_url=url, store={"connect_timeout": 0.5})
    assert h.sync("t").status == "succeeded"
    before = h.last_seq()
    d.users[0] = d.users[0].model_copy(update={"job_title": "Changed"})
    other = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with other.connect() as conn:
            conn.execute(sa.text("LOCK TABLE events IN EXCLUSIVE MODE"))  # an operator's open transaction
            result: list[object] = []
            sync = threading.Thread(target=lambda: result.append(h.sync("t")), daemon=True)
            started = time.monotonic()
            sync.start()
            sync.join(20)  # bounded: the lock is let go below, whatever happened
            took = time.monotonic() - started
            conn.rollback()
        sync.join(20)
    finally:
        other.dispose()
    assert took < 10, took
    r = result[0]
    assert (r.status, r.exit_code) == ("failed", 1)  # type: ignore[attr-defined]
    assert "lock timeout" in r.error and "held a lock this write needed for over 1.5s" in r.error, r.error  # type: ignore[attr-defined]
    assert h.store.runs("t", 1)[0]["error"] == r.error  # type: ignore[attr-defined]
    assert h.last_seq() == before and h.users("t")["u0"]["job_title"] != "Changed"
    assert h.sync("t").status == "succeeded" and h.users("t")["u0"]["job_title"] == "Changed"


@handover
def test_a_run_past_max_run_time_is_cut_while_waiting_for_a_page_applies_nothing_and_fails(harness, hands_over):
    """A pull that never reaches its end (a report trickled a byte at a time, within every read
    timeout) held the run, its thread and the tenant's lease for as long as the vendor went on:
    nothing failed, nothing was flagged. Past `max_run_time` the run is cut as a stop cuts it, even
    while waiting for the next page, and recorded failed, not interrupted: the tenant is flagged."""
    slow = Directory(users=people(30), on_page=lambda n: time.sleep(0.6), hands_over_pages=hands_over)
    h = make(harness, slow, defaults={"max_run_time": 0.5})
    started = time.monotonic()
    r = h.sync("t")
    assert time.monotonic() - started < 3  # cut at 0.5 s, not after the pull's 1.8 s
    assert r.status == "failed" and r.exit_code == 1
    assert r.error == "the run took longer than max_run_time (0.5s); nothing applied"
    assert not cut_off(h.store.runs("t", 1)[0])  # `dirpull status` flags it, as it does not a stop
    assert h.store.runs("t", 1)[0]["error"] == r.error
    assert h.users("t") == {} and h.store.lease("t").holder is None
    # The tenant's own limit wins over `[defaults]`'s: a generous one leaves the run alone.
    tenant = {"t": {**TENANT["t"], "max_run_time": "1h"}}
    again = harness(tenant, connector_factory=factory(slow), defaults={"max_run_time": 0.5}).sync("t")
    assert again.status == "succeeded" and len(h.users("t")) == 30, again.error


def test_setting_or_adding_max_run_time_does_not_make_the_next_run_a_full_one(harness):
    """`max_run_time` decides how long a run may take, not what it reads: editing it, or upgrading to
    a dirpull that has it from one whose cursors digested every setting it knew, must not make the
    tenant's next run a full walk noted "the tenant's settings changed since the last sync"."""
    from dirpull.jsoncodec import canonical
    from dirpull.model import digest
    from dirpull.storage import schema

    d = Directory(users=people(5))
    assert make(harness, d).sync("t").status == "succeeded"
    tenant = {"t": {**TENANT["t"], "max_run_time": "3h"}}
    h = harness(tenant, connector_factory=factory(d), defaults={"max_run_time": "2h"})
    r = h.sync("t")
    assert r.status == "succeeded" and d.cursors_seen[-1] is not None, r.notes  # its cursor: incremental
    assert not any("settings changed" in n for n in r.notes), r.notes
    # A cursor an older dirpull stored: every setting it had (defaults included), no max_run_time.
    every = make(harness, d).config.tenants["t"].model_dump(mode="json")
    older = {k: v for k, v in every.items() if k not in {"schedule", "full_sync_every", "guard", "enabled",
                                                          "max_run_time"}}  # fmt: skip
    for edited in (False, True):
        cursor = {**h.store.get_cursor("t").value, "dirpull_settings": digest(canonical(older))}
        with h.store.engine.begin() as conn:
            conn.execute(schema.cursors.update().values(value=cursor))
        r = (h if edited else make(harness, d)).sync("t")
        assert r.status == "succeeded" and d.cursors_seen[-1] is not None, (edited, r.notes)
        assert not any("settings changed" in n for n in r.notes), (edited, r.notes)


@pytest.mark.parametrize("limit", [0.2500001, "0.3s"], ids=["seconds", "duration"])
def test_a_run_cut_at_max_run_time_names_the_limit_as_configured(harness, limit):
    """The failed run's error quotes the tenant's `max_run_time`. A number of seconds with more than
    six significant digits was rounded there (604799.5 read "604800s", a week, and 0.2500001
    "0.25s"): the limit the operator looks up in the configuration is not the one quoted."""
    slow = Directory(users=people(30), on_page=lambda n: time.sleep(0.6))
    r = make(harness, slow, defaults={"max_run_time": limit}).sync("t")
    quoted = "0.2500001s" if limit == 0.2500001 else "0.3s"
    assert r.status == "failed" and r.error == f"the run took longer than max_run_time ({quoted}); nothing applied"
