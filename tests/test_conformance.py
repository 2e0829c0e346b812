"""One suite every connector passes against its emulator, over loopback HTTP through the real store:
the first sync mirrors the organization, an unchanged resync writes nothing, and after a round of
random changes the incremental result equals what a full walk finds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile import Answer, proxying

from dirpull.connectors import is_available as connector_available
from dirpull.emulators import EMULATOR_CLASSES, emulator_class
from dirpull.emulators import is_available as emulator_available
from dirpull.emulators.org import Org

PROVIDERS = [p for p in EMULATOR_CLASSES if emulator_available(p) and connector_available(p)]
# Providers whose groups are the organization's groups (BambooHR has none; Workday derives its own).
ORG_GROUPS = {"entra_id", "google_workspace", "okta"}
# Google's emulator also serves a CUSTOMER member (the whole domain) that the connector expands,
# so its flattened memberships are a superset of the organization's.
SUPERSET_MEMBERS = {"google_workspace"}
SECRET_KEYS = ("api_key", "api_token", "client_secret", "password", "refresh_token")


@pytest.fixture(params=PROVIDERS)
def tenant(request, tmp_path: Path, harness):
    provider = request.param
    org = Org.generate(120, groups=10, seed=11)
    emulator = emulator_class(provider)(org)
    emulator.start()
    try:
        table = emulator.tenant_config("t", tmp_path)
        h = harness({"t": table}, guard={"max_percent": 50, "min_count": 50})
        h.emulator = emulator
        h.secrets = [str(table[k]) for k in SECRET_KEYS if k in table]
        yield provider, org, h
    finally:
        emulator.stop()


def emulator_auth_fails(h) -> None:
    """Every request from now on is refused as unauthorized (a revoked credential)."""
    h.emulator.faults.update({"expire_auth": 10_000})


def org_state(org: Org) -> dict[str, int]:
    people = [p for p in org.people.values() if p.visible]
    return {
        "active": sum(1 for p in people if p.state == "active"),
        "inactive": sum(1 for p in people if p.state == "inactive"),
    }


def store_state(h) -> dict[str, int]:
    users = h.users("t").values()
    return {
        "active": sum(1 for u in users if u["state"] == "active"),
        "inactive": sum(1 for u in users if u["state"] == "inactive"),
    }


def flattened_members(org: Org) -> int:
    return sum(len(org.transitive_members(g.n)) for g in org.listed_groups())


def check_members(provider: str, org: Org, h) -> None:
    stored = len(h.members("t"))
    if provider in SUPERSET_MEMBERS:
        assert stored >= flattened_members(org)
    else:
        assert stored == flattened_members(org)


def test_first_sync_mirrors_the_organization_and_resync_is_silent(tenant, caplog):
    caplog.set_level("DEBUG")
    provider, org, h = tenant
    first = h.sync("t")
    assert first.status == "succeeded", first.error
    assert first.requests > 0
    assert store_state(h) == org_state(org)
    if provider in ORG_GROUPS:
        assert len(h.groups("t")) == sum(1 for _ in org.listed_groups())
        check_members(provider, org, h)
    seq = h.last_seq()
    again = h.sync("t")
    assert again.status == "succeeded", again.error
    assert again.events == 0 and again.counts["rows_written"] == 0
    assert h.last_seq() == seq
    for secret in h.secrets:
        assert secret not in caplog.text
        assert all(secret not in str(run) for run in h.store.runs("t"))


def test_a_lone_surrogate_in_a_vendor_value_is_stored_as_a_replacement_character(tenant):
    """A vendor whose strings are UTF-16 can send half an emoji ("\\ud83d", a name cut at a length
    limit). It has no UTF-8 form: it used to fail every run of the tenant (or, from Graph, be
    retried as malformed JSON and then fail). It is stored as U+FFFD, and a resync is silent."""
    _, org, h = tenant
    person = next(p for p in org.people.values() if p.visible and p.state == "active")
    org.update_person(person.n, given="Ana\ud83d")
    first = h.sync("t")
    assert first.status == "succeeded", first.error
    [stored] = [u for u in h.users("t").values() if u["first_name"] and u["first_name"].startswith("Ana")]
    assert stored["first_name"] == "Ana\ufffd"
    again = h.sync("t", full=True)
    assert again.status == "succeeded", again.error
    assert again.events == 0 and again.counts["rows_written"] == 0


def test_a_failing_vendor_fails_the_run_and_changes_nothing(tenant, caplog):
    caplog.set_level("DEBUG")
    _, org, h = tenant
    assert h.sync("t").status == "succeeded"
    seq, users = h.last_seq(), h.users("t")
    org.random_changes(10)
    emulator_auth_fails(h)
    r = h.sync("t", full=True)
    assert r.status == "failed" and r.error
    assert h.last_seq() == seq and h.users("t") == users
    for secret in h.secrets:
        assert secret not in caplog.text and secret not in r.error


def test_a_failed_run_records_the_requests_it_made(tenant):
    """`dirpull runs` and the 'sync end' line of a failed run count what it sent, not 0."""
    provider, _, h = tenant
    api = {"entra_id": "/v1.0/", "google_workspace": "/admin/directory/", "okta": "/api/v1/",
           "workday": "/ccx/service/", "bamboohr": "/api/gateway.php/"}[provider]  # fmt: skip
    h.emulator.faults.update({"error": 10_000, "error_status": 400, "path": api})  # sign-in works
    before = h.emulator.requests
    r = h.sync("t", full=True)
    assert r.status == "failed" and r.error
    assert r.requests == h.emulator.requests - before > 0
    assert h.store.runs("t", 1)[0]["requests"] == r.requests


@pytest.mark.parametrize("how", ["interrupted", "spool-full", "diff-bug"])
def test_a_run_that_fails_outside_the_connector_records_the_requests_it_made(tenant, monkeypatch, how):
    """A Ctrl-C or SIGTERM during the pull, a disk that fills under the run's pending records, or a
    bug in the diff fails the run after the vendor was asked: `dirpull runs` counts those requests,
    not 0."""
    _, _, h = tenant
    progress = None
    if how == "interrupted":
        stop = h.runner.stop
        progress = lambda *_: stop.set()  # noqa: E731 - what the signal handler does, after a page
    elif how == "spool-full":
        from dirpull.spool import RecordSpool, SpoolError

        def full_disk(self, blob, key=None):
            raise SpoolError("cannot write the temporary file (No space left on device); nothing applied")

        monkeypatch.setattr(RecordSpool, "put", full_disk)
    else:
        from dirpull.sync.diff import Diff

        def bug(self, page):
            raise KeyError("a bug in the diff")

        monkeypatch.setattr(Diff, "add", bug)
    before = h.emulator.requests
    r = h.sync("t", full=True, progress=progress)
    assert r.status == "failed"
    assert {"interrupted": "interrupted", "spool-full": "No space left", "diff-bug": "a bug"}[how] in r.error
    assert r.requests == h.emulator.requests - before > 0
    assert h.store.runs("t", 1)[0]["requests"] == r.requests
    assert h.users("t") == {}


def test_incremental_after_changes_agrees_with_a_full_walk(tenant):
    provider, org, h = tenant
    assert h.sync("t").status == "succeeded"
    import random

    org.random_changes(25, random.Random(5))
    r = h.sync("t")
    assert r.status == "succeeded", r.error
    assert r.events > 0
    assert store_state(h) == org_state(org) or provider == "okta"  # Okta deletes need reconciliation
    seq = h.last_seq()
    full = h.sync("t", full=True)
    assert full.status == "succeeded", full.error
    leftovers = h.changes("t", seq)
    if provider == "okta":
        # Okta lists no tombstones: deletions (and their memberships) surface only on a full walk.
        assert {c[0] for c in leftovers} <= {"user.deleted", "group.user_removed", "group.deleted"}
    else:
        assert leftovers == []
    assert store_state(h) == org_state(org)
    if provider in ORG_GROUPS:
        check_members(provider, org, h)


def test_full_resync_skips_unchanged_records_and_never_misses_a_change(tenant, monkeypatch):
    """Connectors with source digests: a full resync normalizes only what the vendor changed, and
    what it stores is what normalizing everything again finds (0 events then)."""
    import random

    from dirpull.sync import runner as runner_module

    provider, org, h = tenant
    assert h.sync("t").status == "succeeded"
    assert getattr(h.runner.connector_factory("t", h.config.tenant("t")), "source_digests", False), provider
    seen = {"normalized": 0, "unchanged": 0}

    class Spy(runner_module.Diff):
        def add(self, page):  # type: ignore[no-untyped-def]
            seen["normalized"] += len(page.users)
            seen["unchanged"] += len(page.unchanged_users)
            super().add(page)

    monkeypatch.setattr(runner_module, "Diff", Spy)
    again = h.sync("t", full=True)
    assert again.events == 0 and again.counts["rows_written"] == 0
    assert seen == {"normalized": 0, "unchanged": again.counts["users_seen"]} and seen["unchanged"] > 0

    org.random_changes(20, random.Random(3))
    seen.update(normalized=0, unchanged=0)
    changed = h.sync("t", full=True)
    assert changed.status == "succeeded" and changed.events > 0
    assert 0 < seen["normalized"] < changed.counts["users_seen"]

    make = h.runner.connector_factory

    def without_digests(tenant_name, settings):  # type: ignore[no-untyped-def]
        connector = make(tenant_name, settings)
        connector.source_digests = False
        return connector

    monkeypatch.setattr(h.runner, "connector_factory", without_digests)
    seen.update(normalized=0, unchanged=0)
    check = h.sync("t", full=True)
    assert check.status == "succeeded" and check.events == 0 and seen["unchanged"] == 0


def test_a_retry_in_the_log_names_its_tenant(tenant, caplog):
    """The daemon logs every tenant's runs into one stream, and a retry's step and URL do not tell
    two tenants of a provider apart (every Entra tenant calls graph.microsoft.com, every Google one
    googleapis.com as `my_customer`): a throttled or failing vendor's lines named no tenant."""
    provider, _org, h = tenant
    caplog.set_level("INFO")
    # Google's token endpoint is retried by google-auth itself: the fault goes to the API.
    path = "/users" if provider == "google_workspace" else ""
    h.emulator.faults.update({"error": 1, "error_status": 503, "path": path})
    assert h.sync("t").status == "succeeded"
    retries = [m for r in caplog.records if r.name.startswith("dirpull.connectors") and "503" in (m := r.getMessage())]
    assert retries, caplog.text
    assert all(line.startswith("tenant t: ") for line in retries), retries


def _reversed(value: object) -> object:
    """The same JSON with every array and every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: _reversed(v) for k, v in reversed(value.items())}
    if isinstance(value, list):
        return [_reversed(v) for v in reversed(value)]
    return value


def _without_nulls(value: object) -> object:
    """The same JSON with every null-valued object key left out."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("provider", "rewrite"),
    [(p, _reversed) for p in PROVIDERS]
    # Graph leaves never-set properties out of some answers (directory-apis.md §1.1, delta property
    # semantics); Okta may leave null-valued properties out of any (§3, "core API compatibility").
    + [("entra_id", _without_nulls), ("okta", _without_nulls)],
)
def test_a_resync_of_the_same_directory_sent_in_another_form_is_silent(
    provider, rewrite, tmp_path: Path, harness
):
    """Vendors send the same data in another form from one call to the next: records within a
    page, keys within an object, entries of a multi-valued field (emails, aliases, members) whose
    order they never promised in another order; a null-valued property left out where the vendor
    may leave it out. None of that is a change: no event, no row, full or incremental."""
    org = Org.generate(60, groups=8, seed=11)
    flipped = {"on": False}

    def present(answer: Answer) -> Answer | None:
        if not flipped["on"] or answer.status != 200 or "token" in answer.path:
            return None
        try:
            body = json.loads(answer.body)
        except ValueError:
            return None  # not JSON (an XML answer, an empty one): as sent
        return Answer(answer.path, answer.status, answer.headers, json.dumps(rewrite(body)).encode())

    with emulator_class(provider)(org) as emulator, proxying(emulator.base_url, present) as proxy:
        table = {
            k: v.replace(emulator.base_url, proxy.base_url) if isinstance(v, str) else v
            for k, v in emulator.tenant_config("t", tmp_path).items()
        }
        h = harness({"t": table}, guard={"max_percent": 50, "min_count": 50})
        assert h.sync("t").status == "succeeded"
        assert proxy.paths  # the vendor was read through the proxy
        seq = h.last_seq()
        flipped["on"] = True
        for full in (True, False):
            again = h.sync("t", full=full)
            assert again.status == "succeeded", again.error
            assert (again.events, again.counts["rows_written"]) == (0, 0), h.changes("t", after=seq)
        # A value that really went (a title cleared) is still a change, sent in that form too.
        untitled = sum(1 for u in h.users("t").values() if u["job_title"] is None)
        person = next(p for p in org.people.values() if p.visible and p.state == "active" and p.title)
        org.update_person(person.n, title=None)
        cleared = h.sync("t", full=True)
        assert cleared.status == "succeeded" and cleared.events >= 1, cleared.error
        assert sum(1 for u in h.users("t").values() if u["job_title"] is None) == untitled + 1
