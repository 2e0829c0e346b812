"""Source digests: a full resync recognizes vendor records that did not change and skips their
normalization, without ever missing a change (connectors.source)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dirpull.config import parse_config
from dirpull.connectors import bamboohr
from dirpull.connectors.base import Done, Page
from dirpull.connectors.source import SourceDigests
from dirpull.emulators.bamboohr_api import BambooHREmulator
from dirpull.emulators.org import Org
from dirpull.model import User, fingerprint, record_fields
from dirpull.storage import schema as t
from dirpull.storage import store as store_module
from dirpull.storage.store import Store
from dirpull.sync.diff import Diff, LoadedState, build_writes

SNAPSHOT = Done(snapshot=True, cursor=None, mode="full")
ADA = User(idp_id="1", username="ada")
BOB = User(idp_id="2", username="bob")


def fp(user: User) -> str:
    return fingerprint(record_fields(user))


# --- the diff ----------------------------------------------------------------------------------------


def test_unchanged_users_count_as_seen_and_are_not_deleted():
    d = Diff(LoadedState({"1": fp(ADA), "2": fp(BOB)}, {}, set(), {"1": "s1", "2": "s2"}))
    d.add(Page(unchanged_users=["1"], users=[BOB], user_sources={"2": "s2"}))
    plan = d.finish(SNAPSHOT)
    assert plan.is_empty() and plan.seen_users == 2
    assert plan.user_sources == {} and plan.source_refreshes == {}


def test_an_unchanged_user_not_listed_is_deleted_as_usual():
    d = Diff(LoadedState({"1": fp(ADA), "2": fp(BOB)}, {}, set(), {"1": "s1", "2": "s2"}))
    d.add(Page(unchanged_users=["1"]))
    assert d.finish(SNAPSHOT).user_deletes == {"2"}


def test_a_changed_user_carries_its_source_digest_to_the_row():
    d = Diff(LoadedState({"1": fp(ADA)}, {}, set(), {"1": "s1"}))
    changed = ADA.model_copy(update={"username": "ada2"})
    d.add(Page(users=[changed, BOB], user_sources={"1": "s1b", "2": "s2"}))
    plan = d.finish(SNAPSHOT)
    ws = build_writes(plan, {"1": record_fields(ADA)}, {})
    assert ws.user_sources == {"1": "s1b", "2": "s2"} and ws.source_refreshes == {}
    assert [e["type"] for e in ws.all_events()] == ["user.created", "user.updated"]


def test_same_row_from_a_different_vendor_record_only_refreshes_the_digest():
    d = Diff(LoadedState({"1": fp(ADA), "2": fp(BOB)}, {}, set(), {"1": "old", "2": "s2"}))
    d.add(Page(users=[ADA, BOB], user_sources={"1": "new", "2": "s2"}))
    plan = d.finish(SNAPSHOT)
    assert plan.is_empty()
    ws = build_writes(plan, {}, {})
    assert ws.source_refreshes == {"1": "new"} and ws.rows == 0 and ws.event_count == 0


def test_a_later_unchanged_copy_supersedes_an_earlier_changed_one():
    d = Diff(LoadedState({"1": fp(ADA)}, {}, set(), {"1": "s1"}))
    d.add(Page(users=[ADA.model_copy(update={"username": "x"})], user_sources={"1": "sx"}))
    d.add(Page(unchanged_users=["1"]))
    plan = d.finish(SNAPSHOT)
    assert plan.is_empty() and plan.user_sources == {}


# --- the digester ------------------------------------------------------------------------------------


def _settings(**extra: Any) -> Any:
    raw = {"tenants": {"hr": {"provider": "bamboohr", "company_domain": "acme", "api_key": "k", **extra}}}
    return parse_config(raw, Path("dirpull.toml")).tenant("hr")


def test_digest_depends_on_the_record_its_order_the_settings_and_the_extras():
    a = SourceDigests(lambda i, s: False, _settings(), ["x"])
    assert a.digest({"id": "1", "n": "a"}) == a.digest({"id": "1", "n": "a"})
    assert a.digest({"id": "1", "n": "a"}) != a.digest({"id": "1", "n": "b"})
    assert a.digest({"id": "1", "n": "a"}) != a.digest({"n": "a", "id": "1"})  # never a false match
    assert a.digest({"id": "1"}, "active") != a.digest({"id": "1"}, "inactive")
    other = SourceDigests(lambda i, s: False, _settings(attributes={"x": "division"}), ["x"])
    assert other.digest({"id": "1"}) != a.digest({"id": "1"})
    assert a.digest({"id": 2**70}) is None  # not encodable: normalized as usual
    assert len(a.digest({"id": "1"})) == 32  # the stored column's width


def test_a_digest_in_two_steps_depends_on_the_same_inputs_and_never_equals_a_one_step_digest():
    a = SourceDigests(lambda i, s: False, _settings(), ["x"])
    part = a.record_part({"id": "1", "n": "a"})
    assert part is not None and a.combine(part, "m1") == a.combine(a.record_part({"id": "1", "n": "a"}), "m1")
    assert a.combine(part, "m2") != a.combine(part, "m1")
    assert a.combine(part) != a.combine(a.record_part({"id": "1", "n": "b"}))
    assert a.combine(a.record_part({"id": "1", "n": "a"})) != a.combine(a.record_part({"n": "a", "id": "1"}))
    other = SourceDigests(lambda i, s: False, _settings(attributes={"x": "division"}), ["x"])
    assert other.combine(part) != a.combine(part)
    assert a.record_part({"id": 2**70}) is None and a.combine(part, 2**70) is None
    assert a.combine(part) != a.digest({"id": "1", "n": "a"}) and len(a.combine(part)) == 32


def test_a_secret_value_is_not_part_of_the_digest_input(monkeypatch):
    monkeypatch.setenv("BHR_KEY", "s3cret-value")
    settings = _settings(api_key="env:BHR_KEY")
    assert "s3cret-value" not in str(settings.model_dump(mode="json"))


# --- a BambooHR tenant through the real store --------------------------------------------------------


@pytest.fixture
def emulator():
    emu = BambooHREmulator(Org.generate(30, seed=11))
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def normalized(monkeypatch) -> list[str]:
    """The ids BambooHR normalizes, in order."""
    calls: list[str] = []
    real = bamboohr.BambooHRConnector.normalize

    def counting(self: Any, row: Any, numbers: Any = None) -> Any:
        calls.append(str(row.get("id")) if isinstance(row, dict) else "?")
        return real(self, row, numbers)

    monkeypatch.setattr(bamboohr.BambooHRConnector, "normalize", counting)
    return calls


def _sources(h: Any) -> dict[str, str | None]:
    with h.store.engine.connect() as conn:
        return dict(conn.execute(sa.select(t.users.c.idp_id, t.users.c.source_digest)).all())


@pytest.mark.stores
def test_full_resync_normalizes_only_what_the_vendor_changed(harness, emulator, normalized, tmp_path):
    h = harness({"hr": emulator.tenant_config("hr", tmp_path)})
    first = h.sync("hr", full=True)
    assert first.status == "succeeded" and first.counts["users_created"] == 30
    stored = _sources(h)
    assert len(stored) == 30 and all(stored.values())

    normalized.clear()
    again = h.sync("hr", full=True)
    assert again.status == "succeeded" and normalized == []
    assert again.counts["users_seen"] == 30 and again.counts["rows_written"] == 0 and again.events == 0
    assert _sources(h) == stored

    person = emulator.org.person(5)
    emulator.org.update_person(5, title="Chief Tester")
    before = h.last_seq()
    changed = h.sync("hr", full=True)
    assert changed.status == "succeeded" and normalized == [str(person.n)]
    assert h.changes("hr", before) == [("user.updated", str(person.n), ("job_title", "raw_attributes"))]
    assert h.users("hr")[str(person.n)]["job_title"] == "Chief Tester"
    now = _sources(h)
    assert now[str(person.n)] != stored[str(person.n)]
    assert {k: v for k, v in now.items() if k != str(person.n)} == {
        k: v for k, v in stored.items() if k != str(person.n)
    }

    emulator.org.delete(7)
    gone = h.sync("hr", full=True)
    assert gone.counts["users_deleted"] == 1 and gone.counts["users_seen"] == 29


@pytest.mark.stores
def test_a_settings_change_or_a_lost_digest_normalizes_again_without_events(harness, emulator, normalized, tmp_path):
    config = emulator.tenant_config("hr", tmp_path)
    h = harness({"hr": config})
    assert h.sync("hr", full=True).status == "succeeded"
    # As after `dirpull db upgrade` from a release without digests, or a row an incremental run rewrote.
    with h.store.engine.begin() as conn:
        conn.execute(t.users.update().where(t.users.c.idp_id.in_(["3", "4"])).values(source_digest=None))
    normalized.clear()
    refreshed = h.sync("hr", full=True)
    assert sorted(normalized) == ["3", "4"]
    assert refreshed.counts["rows_written"] == 0 and refreshed.events == 0 and all(_sources(h).values())

    # A setting that does not change the rows still invalidates every digest once.
    h2 = harness({"hr": {**config, "page_size": 7}})
    normalized.clear()
    rerun = h2.sync("hr", full=True)
    assert len(normalized) == 30 and rerun.counts["rows_written"] == 0 and rerun.events == 0
    normalized.clear()
    assert h2.sync("hr", full=True).events == 0 and normalized == []


@pytest.mark.stores
def test_an_incremental_update_forgets_the_digest_so_the_next_full_run_reads_the_record(
    harness, emulator, normalized, tmp_path
):
    h = harness({"hr": emulator.tenant_config("hr", tmp_path)})
    assert h.sync("hr").status == "succeeded"  # first sync: full
    emulator.org.update_person(9, title="Night Shift")
    incr = h.sync("hr")
    assert incr.mode == "incremental" and incr.counts["users_updated"] == 1
    assert _sources(h)["9"] is None
    normalized.clear()
    full = h.sync("hr", full=True)
    assert normalized == ["9"] and full.events == 0 and _sources(h)["9"]


# --- the migration -----------------------------------------------------------------------------------


@pytest.mark.stores
def test_upgrading_a_store_without_the_column_keeps_its_users(store_url: str, tmp_path: Path, monkeypatch):
    old_migrations = tmp_path / "migrations"
    shutil.copytree(store_module.MIGRATIONS, old_migrations, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (old_migrations / "versions").glob("000[2-9]_*"):
        path.unlink()
    real = store_module.MIGRATIONS
    monkeypatch.setattr(store_module, "MIGRATIONS", old_migrations)
    old = Store(store_url)
    old.ensure_schema()
    with old.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tenants (id, provider, created_at) VALUES ('t', 'bamboohr', :ts)"),
                     {"ts": store_module.utcnow()})  # fmt: skip
        conn.execute(
            sa.text(
                "INSERT INTO users (tenant, idp_id, emails, state, custom_attributes, raw_attributes, fingerprint, "
                "created_at, updated_at) VALUES ('t', 'u1', '[]', 'active', '{}', '{}', 'f1', :ts, :ts)"
            ),
            {"ts": store_module.utcnow()},
        )
    assert old.schema_state()[0] == "0001"
    old.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", real)
    new = Store(store_url)
    try:
        assert new.upgrade() == ("0001", store_module.HEAD_REVISION)
        assert new.user_digests("t") == ({"u1": "f1"}, {})
        assert [u["idp_id"] for u in new.iter_users("t")] == ["u1"]
        assert "source_digest" not in next(new.iter_users("t"))  # not part of any output
    finally:
        new.close()
