"""The event log as a downstream consumer reads it (`dirpull events TENANT --after N --json`),
through the real connectors, runner and store against each vendor's emulator, full and
incremental runs, while the directory changes at random between runs and in the ways that trip
consumers up: an address freed by a deletion and given to a new hire in the same run, two users
swapping addresses, a group deleted and re-created under its name and address, nested groups
renamed and deleted, a group deleted while its members leave, soft deletes and restores.

The consumer mirrors the directory the way an app provisioning accounts does:

- every event is applied in seq order, by `idp_id`, refused if it is not applicable then
  (`test_sync_properties.Replay`: a membership added only while its user and group exist and
  removed before either is deleted, an update to an object that exists, ...);
- users are also indexed by email and username, groups by email, unique (ignoring case) as an
  app's columns are. The README promises the per-kind order of a run (creates, updates, ...,
  deletions last), so an address can pass from one object to another within a run (a new hire
  created before the deletion of the leaver whose address they got; a swap has no order at all):
  the consumer applies each run (its events share `run_id`) as one transaction, its uniqueness
  checked at the run's end, as a deferred constraint does. Every run's events are one unbroken
  block of seqs, committed at once: a consumer that reads to the end of the log has whole runs.

The same holds with several tenants syncing at once into one store, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SyncHarness
from test_sync_properties import ORDER, Replay, without_stamps

from dirpull.emulators import emulator_class
from dirpull.emulators.org import Org
from dirpull.emulators.server import Emulator

PROVIDERS = ["entra_id", "google_workspace", "okta", "workday", "bamboohr"]
GUARD = {"max_percent": 100, "min_count": 100_000}  # the order is under test, not the guard
RUNS = 10


class Consumer(Replay):
    """`Replay` (strict, by idp_id) plus the unique keys an app puts on its accounts and groups,
    checked when a run's events have all been applied."""

    def check_unique(self, where: str) -> None:
        for label, objects, fields in (
            ("user", self.users, ("email", "username")),
            ("group", self.groups, ("email",)),
        ):
            for name in fields:
                owners: dict[str, str] = {}
                for key, obj in objects.items():
                    value = obj.get(name)
                    if not value:
                        continue
                    other = owners.setdefault(value.casefold(), key)
                    assert other == key, f"{where}: {label}s {other} and {key} both have {name} {value}"


def directory_config(provider: str, emulator: Emulator, tmp_path: Path, tenant: str) -> dict[str, Any]:
    table = emulator.tenant_config(tenant, tmp_path)
    if provider == "okta":
        # Deletions reach incremental runs; the cursor as close to the run's start as it may be.
        table.update(poll_system_log=True, page_size=7, cursor_holdback=0.001)
    elif provider == "bamboohr":
        table.update(batch_size=4)
    elif provider == "entra_id":
        emulator.delta_page_size = 7  # type: ignore[attr-defined]
    return table


def _people(org: Org) -> list[Any]:
    return [p for p in org.listed_people() if p.n != 1]


def reuse_address(org: Org, rng: random.Random) -> None:
    """A leaver deleted and a new hire given their email and username, in one run."""
    people = [p for p in _people(org) if p.email]
    if not people:
        return
    leaver = rng.choice(people)
    org.delete(leaver.n)
    hire = org.hire("Re", "Hired", manager=1)
    org.update_person(hire.n, email=leaver.email, username=leaver.username)
    groups = list(org.listed_groups())
    if groups:
        org.add_member(rng.choice(groups).n, hire.n)


def swap_addresses(org: Org, rng: random.Random) -> None:
    people = [p for p in _people(org) if p.email]
    if len(people) < 2:
        return
    a, b = rng.sample(people, 2)
    (ea, ua), (eb, ub) = (a.email, a.username), (b.email, b.username)
    org.update_person(a.n, email=eb, username=ub)
    org.update_person(b.n, email=ea, username=ua)


def recreate_group(org: Org, rng: random.Random) -> None:
    """A group deleted and a new one made under its name and address, with some of its members."""
    groups = list(org.listed_groups())
    if not groups:
        return
    old = rng.choice(groups)
    members = sorted(n for n in old.members if org.people[n].visible)[:3]
    org.delete_group(old.n)
    new = org.create_group(old.name, old.description)
    org.update_group(new.n, email=old.email)
    for n in members:
        org.add_member(new.n, n)


def nested_churn(org: Org, rng: random.Random) -> None:
    """A group nested in another, the parent renamed; then, or in a later run, the child deleted
    or emptied and deleted."""
    groups = list(org.listed_groups())
    if len(groups) < 2:
        return
    parent, child = rng.sample(groups, 2)
    if parent.n not in org.groups[child.n].subgroups:  # no cycle
        org.add_subgroup(parent.n, child.n)
    org.update_group(parent.n, name=f"{parent.name} (renamed)")
    if rng.random() < 0.5:
        for n in sorted(child.members):
            org.remove_member(child.n, n)
        org.delete_group(child.n)


def soft_delete_or_restore(org: Org, rng: random.Random) -> None:
    """Someone soft-deleted (not listed) or restored (listed again under their id). Only people
    who manage no one: the reports of a restored manager name them again without being listed as
    changed, which incremental runs of Entra ID and BambooHR miss until the next full one."""
    gone = [p for p in org.people.values() if p.soft_deleted and not p.deleted]
    if gone and rng.random() < 0.5:
        org.restore(rng.choice(gone).n)
        return
    managers = {p.manager for p in org.people.values() if not p.deleted}
    if people := [p for p in _people(org) if p.n not in managers]:
        org.soft_delete(rng.choice(people).n)


CHANGES: list[Callable[[Org, random.Random], None]] = [reuse_address, swap_addresses, recreate_group, nested_churn]
RESTORABLE = {"entra_id", "google_workspace"}  # the vendors with soft deletes (directory-apis.md)


def change(provider: str, org: Org, rng: random.Random) -> None:
    changes = [*CHANGES, soft_delete_or_restore] if provider in RESTORABLE else CHANGES
    with org.lock:
        org.random_changes(rng.randint(1, 5), rng)
        for make in rng.sample(changes, rng.randint(1, 3)):
            make(org, rng)


def check_run(h: SyncHarness, tenant: str, r: Any, after: int, consumer: Consumer) -> int:
    """The run's events, read as `events TENANT --after N`: one block of seqs, the documented
    order, each applicable in turn; at the end the consumer holds what the store does."""
    assert r.status == "succeeded", r.error
    events = h.events(tenant, after)
    assert len(events) == r.events
    assert all(e["run_id"] == r.run_id and e["tenant"] == tenant for e in events)
    ranks = [ORDER.index(e["type"]) for e in events]
    assert ranks == sorted(ranks), [e["type"] for e in events]
    for e in events:
        consumer.apply(e)
    consumer.check_unique(f"run {r.run_id} ({r.mode})")
    assert consumer.users == h.users(tenant)
    assert consumer.groups == h.groups(tenant)
    assert consumer.members == h.members(tenant)
    return events[-1]["seq"] if events else after


def state(h: SyncHarness, tenant: str) -> tuple[Any, ...]:
    return (
        {k: without_stamps(v) for k, v in h.users(tenant).items()},
        {k: without_stamps(v) for k, v in h.groups(tenant).items()},
        h.members(tenant),
    )


@pytest.fixture(params=PROVIDERS)
def directory(request: pytest.FixtureRequest) -> Iterator[tuple[str, Org, Emulator]]:
    org = Org.generate(24, groups=6, seed=PROVIDERS.index(request.param))
    emulator = emulator_class(request.param)(org)
    emulator.start()
    try:
        yield request.param, org, emulator
    finally:
        emulator.stop()


def test_a_consumer_applies_every_run_in_order_keyed_by_id_and_by_address(
    directory: tuple[str, Org, Emulator], tmp_path: Path
) -> None:
    provider, org, emulator = directory
    rng = random.Random(provider)
    table = directory_config(provider, emulator, tmp_path, "t")
    h = SyncHarness(tmp_path, {"t": table}, guard=GUARD)
    consumer, seq, modes = Consumer(), 0, []
    try:
        for i in range(RUNS):
            if i:
                change(provider, org, rng)
            r = h.sync("t", full=i % 4 == 3)
            modes.append(r.mode)
            seq = check_run(h, "t", r, seq, consumer)
        # The incremental runs missed nothing a full listing finds.
        (tmp_path / "ref").mkdir()
        ref = SyncHarness(tmp_path / "ref", {"t": table}, guard=GUARD)
        try:
            fresh = ref.sync("t", full=True)
            assert fresh.status == "succeeded", fresh.error
            assert state(h, "t") == state(ref, "t"), modes
        finally:
            ref.close()
    finally:
        h.close()


@pytest.mark.stores
def test_runs_of_tenants_syncing_at_once_are_each_one_block_of_the_log(tmp_path: Path, store_url: str) -> None:
    """Five tenants (one per provider) sync at once, several runs each, into one store: the log
    read store-wide is in seq order, each run's events one unbroken block, and each tenant's
    events, read on their own, replay to what the store holds. First syncs of 120 people (some
    700 events each) overlap their inserts: without the store's event lock on PostgreSQL, seqs
    drawn by one run interleave with another's here most of the time."""
    orgs: dict[str, Org] = {}
    emulators: list[Emulator] = []
    tables: dict[str, dict[str, Any]] = {}
    try:
        for i, provider in enumerate(PROVIDERS):
            orgs[provider] = Org.generate(120, groups=5, seed=10 + i)
            emulator = emulator_class(provider)(orgs[provider])
            emulator.start()
            emulators.append(emulator)
            tables[provider] = directory_config(provider, emulator, tmp_path, provider)
        h = SyncHarness(tmp_path, tables, guard=GUARD, store_url=store_url)
        failures: list[str] = []

        def tenant_runs(tenant: str) -> None:
            rng = random.Random(tenant)
            try:
                for i in range(4):
                    if i:
                        change(tenant, orgs[tenant], rng)
                    r = h.sync(tenant, full=i == 2)
                    if r.status != "succeeded":
                        failures.append(f"{tenant}: {r.error}")
            except Exception as exc:  # reported below, not lost in the thread
                failures.append(f"{tenant}: {exc!r}")

        threads = [threading.Thread(target=tenant_runs, args=(tenant,)) for tenant in tables]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not any(thread.is_alive() for thread in threads), "a tenant's runs did not end"
            assert not failures, failures
            events = h.events(None)  # type: ignore[arg-type]  # store-wide, as `iter_events(None)`
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(set(seqs))
            runs = [e["run_id"] for e in events]
            blocks = [run for i, run in enumerate(runs) if i == 0 or runs[i - 1] != run]
            assert len(blocks) == len(set(blocks)), f"runs' events interleave: {blocks}"
            for block in blocks:
                block_seqs = [e["seq"] for e in events if e["run_id"] == block]
                assert block_seqs == list(range(block_seqs[0], block_seqs[0] + len(block_seqs))), block
            for tenant in tables:
                consumer = Consumer()
                for e in h.events(tenant):
                    consumer.apply(e)
                consumer.check_unique(tenant)
                assert consumer.users == h.users(tenant)
                assert consumer.groups == h.groups(tenant)
                assert consumer.members == h.members(tenant)
        finally:
            h.close()
    finally:
        for emulator in emulators:
            emulator.stop()
