"""One sync of one tenant: lease → pull → diff → guard → apply in one transaction → release.

A failure anywhere before the commit (an HTTP error after retries, a crash, SIGTERM, a lost lease)
leaves the store as it was, with the old cursor, and the run recorded as failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote, quote_plus

from dirpull.config import Config, ConfigError, SecretRef, interval_jitter, parse_duration
from dirpull.connectors import CONNECTOR_MODULES, make_connector
from dirpull.connectors.base import Connector, ConnectorError, CountsRequests, Done, Page
from dirpull.connectors.http import RUN_ENDED, mask_credentials
from dirpull.jsoncodec import canonical
from dirpull.model import digest
from dirpull.prefetch import Prefetch
from dirpull.spool import SpoolError
from dirpull.storage.store import CommitUnconfirmed, Store, StoreError, WriteSet, failed_statement, utcnow
from dirpull.sync import guard
from dirpull.sync.collector import fewer_collections
from dirpull.sync.diff import (
    Diff,
    LoadedState,
    Plan,
    StoredState,
    build_writes,
    clear_deleted_managers,
    cleared_fields,
    state_changes,
)

log = logging.getLogger("dirpull.sync")

class Progress(Protocol):
    """Told the pages, users and groups read so far after each page; then once more with
    `read_all` when the directory is read and the run goes on to compare it with the store and
    write, which takes seconds at 100,000 users with nothing more read."""

    def __call__(self, tenant: str, pages: int, users: int, groups: int, read_all: bool = False) -> None: ...


class _LogMask(logging.Filter):
    """Masks, in the connectors' log lines, the configured secrets of every tenant this process is
    syncing, and the credentials no setting holds (`mask_credentials`), as `_without_secrets` does
    for run records. A retry warning quotes the vendor's 5xx or 429 answer as it happens: a page
    echoing the request it refused (or a vendor quoting the key it could not check) put the
    password or API key in the daemon's log, and Google's token endpoint's answer went there
    unmasked, while the run's error hid them. Logger filters do not apply to records passed up
    from child loggers: installed on each connector module's logger."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._uses: dict[str, int] = {}
        self._secrets: tuple[str, ...] = ()  # longest first, as _without_secrets masks them

    def add(self, values: list[str]) -> list[str]:
        with self._lock:
            for v in values:
                self._uses[v] = self._uses.get(v, 0) + 1
            self._secrets = tuple(sorted(self._uses, key=len, reverse=True))
        return values

    def remove(self, values: list[str]) -> None:
        with self._lock:
            for v in values:
                if (left := self._uses.get(v, 0) - 1) > 0:
                    self._uses[v] = left
                else:
                    self._uses.pop(v, None)
            self._secrets = tuple(sorted(self._uses, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = mask_credentials(_mask_secrets(text, self._secrets))
        if clean != text:
            record.msg, record.args = clean, None
        return True


_LOG_MASK = _LogMask()
for _name in ("dirpull.connectors.http", *CONNECTOR_MODULES.values()):
    logging.getLogger(_name).addFilter(_LOG_MASK)


class _Masked:
    """A run's secrets in `_LOG_MASK`, taken out once the run and every pull thread it started
    have let go: a run that ends early (a lost lease) waits for its pull only so long
    (`Prefetch.close`), and the pull goes on behind it until the request it has in flight ends,
    quoting the vendor's answer in its log lines (its retry waits end with the run)."""

    def __init__(self, values: list[str]) -> None:
        self._values = _LOG_MASK.add(values)
        self._lock = threading.Lock()
        self._holders = 1  # the run

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            _LOG_MASK.remove(self._values)


class Interrupted(Exception):
    """The worker is stopping (SIGTERM/SIGINT), lost its lease, or the run took longer than its
    `max_run_time`: the run applies nothing."""


def _duration_text(seconds: float) -> str:
    """`seconds` as the configuration would write it: 21600 → "6h", 5400 → "90m", 1.5 → "1.5s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    # Python's shortest exact form: `:g` keeps six significant digits, and 604799.5 read "604800s".
    return f"{repr(float(seconds)).removesuffix('.0')}s"


@dataclass(frozen=True)
class _RunLimit:
    """A run's `max_run_time`, from its start on the monotonic clock. The HTTP timeouts bound each
    read only: a report trickled a few bytes a second (a vendor's, a proxy's) held the run, its
    thread and the tenant's lease for as long as it kept sending, and nothing failed or was
    flagged. Cut as a stop is (nothing applied), but recorded as a failure: not an interruption."""

    seconds: float
    ends: float  # time.monotonic() past which the run is cut

    def check(self) -> None:
        if time.monotonic() > self.ends:
            raise Interrupted(
                f"the run took longer than max_run_time ({_duration_text(self.seconds)}); nothing applied"
            )


# The error of a run cut off by SIGTERM/SIGINT (a daemon restart, Ctrl-C): `dirpull status` shows
# such a run as interrupted, not as the tenant failing.
STOPPED = "interrupted: the worker is stopping; nothing applied"


def cut_off(run: Mapping[str, Any]) -> bool:
    """A recorded run that never reached an end of its own and applied nothing: still `running`
    (its worker killed, or running now), or failed as interrupted (SIGTERM/SIGINT; or its worker
    died and the next run marked it, `Store.start_run`)."""
    return run["status"] == "running" or (run["status"] == "failed" and (run["error"] or "").startswith("interrupted"))


@dataclass
class RunResult:
    tenant: str
    status: str  # succeeded | failed | held | skipped | planned
    mode: str
    run_id: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    events: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    started: float = field(default=0.0, repr=False)  # time.monotonic() at the run's start
    writes: WriteSet | None = None
    holder: str | None = None
    newest_run: int | None = None  # a `due_after` check: the tenant's newest run id it saw
    lease_held: bool = False  # skipped because another holder had the tenant's lease
    would_hold: bool = False  # a dry run the guard would hold if it were applied (without --force)

    @property
    def exit_code(self) -> int:
        if self.status == "planned" and self.would_hold:
            # A script's "dry-run, then apply" must tell a run it may apply from one that needs --force.
            return 3
        return {"succeeded": 0, "planned": 0, "held": 3}.get(self.status, 1)


def worker_name() -> str:
    """HOST:PID-TAG, a new TAG for each worker. HOST:PID alone is not unique: container replicas
    typically all run as PID 1, and a fixed hostname (docker --hostname, a StatefulSet pod
    recreated under its name) gave two live workers one name, each taking the other's scheduled
    runs for its own (`Store.scheduled_run_after`), so every replica synced every interval."""
    return f"{socket.gethostname()}:{os.getpid()}-{secrets.token_hex(3)}"


class _Heartbeat(threading.Thread):
    """Keeps the lease alive while a run is in progress; notices if it was lost."""

    def __init__(self, store: Store, tenant: str, holder: str, ttl: timedelta) -> None:
        super().__init__(name=f"lease-{tenant}", daemon=True)
        self.store, self.tenant, self.holder, self.ttl = store, tenant, holder, ttl
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        interval = max(0.2, self.ttl.total_seconds() / 3)
        while not self.stopped.wait(interval):
            try:
                if not self.store.renew_lease(self.tenant, self.holder, self.ttl):
                    self.lost = True
                    return
            except Exception as exc:  # the store blinked: keep trying until the lease expires
                log.warning("tenant %s: lease renewal failed: %s", self.tenant, exc)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def _elapsed(result: RunResult) -> float:
    """Seconds since the run started, on the monotonic clock: the run record's start and end
    times are the wall clock's, whose step (an NTP correction) during a run recorded a negative
    or minutes-long duration."""
    return round(time.monotonic() - result.started, 3)


class Runner:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        worker: str | None = None,
        stop: threading.Event | None = None,
        connector_factory: Callable[[str, Any], Connector] = make_connector,
    ) -> None:
        self.config = config
        self.store = store
        # Unique to this Runner (`worker_name`): a lease whose holder it prefixes is this Runner's own.
        self.worker = worker or worker_name()
        self.stop = stop or threading.Event()
        self.connector_factory = connector_factory
        # Syncs under way in this Runner, by tenant (a lease attempt counts as one).
        self._syncing: dict[str, int] = {}
        self._syncing_lock = threading.Lock()
        # Failed runs whose end the store could not take (it was out as they failed), by tenant
        # and run id: what `finish_run` is to record once it can.
        self._unrecorded: dict[str, dict[int, dict[str, Any]]] = {}

    def sync(
        self,
        tenant: str,
        *,
        trigger: str = "manual",
        full: bool = False,
        dry_run: bool = False,
        force: bool = False,
        wait: float = 0.0,
        progress: Progress | None = None,
        due_after: int | None = None,
        config: Config | None = None,
    ) -> RunResult:
        """`due_after`: for a scheduled fire, the tenant's newest run id at this worker's previous
        fire. If another worker has since begun a scheduled run of the tenant and brought it to an
        end, this interval's sync is done: skipped. `config`: the configuration to use instead of
        `self.config` (the daemon's fire passes the one it checked the tenant against)."""
        # The configuration as this sync starts: the daemon's reload (SIGHUP) replaces
        # `self.config`, and a sync under way goes on with the settings it started with.
        config = config or self.config
        settings = config.tenant(tenant)
        lease_ttl = parse_duration(config.defaults.lease_ttl)
        self.store.check_file()
        self.store.ensure_tenant(tenant, settings.provider)
        with self._syncing_lock:
            self._syncing[tenant] = self._syncing.get(tenant, 0) + 1
        try:
            return self._sync(tenant, config, settings, lease_ttl, trigger, full, dry_run, force, wait, progress,
                              due_after)  # fmt: skip
        finally:
            with self._syncing_lock:
                self._syncing[tenant] -= 1
                if not self._syncing[tenant]:
                    del self._syncing[tenant]

    def _sync(
        self,
        tenant: str,
        config: Config,
        settings: Any,
        lease_ttl: timedelta,
        trigger: str,
        full: bool,
        dry_run: bool,
        force: bool,
        wait: float,
        progress: Progress | None,
        due_after: int | None,
    ) -> RunResult:
        own = f"{self.worker}/"
        holder = f"{own}{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + wait
        while True:
            with self._syncing_lock:
                alone = self._syncing[tenant] == 1
            # A lease held under this Runner's name while no other sync of the tenant is under way
            # in it is left by one that has ended, its release failed (the store out at that
            # moment): taken back, instead of skipping this worker's own runs until it expires.
            current = self.store.acquire_lease(tenant, holder, lease_ttl, reclaim=(own, len(holder)) if alone else None)
            if current is None:
                break
            if time.monotonic() >= deadline or self.stop.is_set():
                until = current.expires_at.isoformat(timespec="seconds") if current.expires_at else "?"
                return RunResult(
                    tenant,
                    "skipped",
                    "-",
                    holder=current.holder,
                    newest_run=self._newest_run(tenant, due_after),
                    lease_held=True,
                    error=f"tenant {tenant} is being synced by {current.holder} (lease until {until})",
                )
            self.stop.wait(min(1.0, max(0.05, deadline - time.monotonic())))

        if due_after is not None:
            # Read under the lease: a run that ended before we took it is committed by now.
            try:
                done, newest = self.store.scheduled_run_after(tenant, due_after, other_than=self.worker)
            except BaseException:
                with contextlib.suppress(Exception):  # it expires by itself
                    self.store.release_lease(tenant, holder)
                raise
            if done is not None:
                self.store.release_lease(tenant, holder)
                at = done["finished_at"].isoformat(timespec="seconds") if done["finished_at"] else "?"
                return RunResult(
                    tenant,
                    "skipped",
                    "-",
                    holder=done["worker"],
                    newest_run=newest,
                    error=f"tenant {tenant} was synced by {done['worker']} (run {done['id']}, ended {at}) "
                    "since this worker's last turn",
                )

        heartbeat = _Heartbeat(self.store, tenant, holder, lease_ttl)
        heartbeat.start()
        try:
            with fewer_collections():
                return self._locked_sync(
                    config, tenant, settings, holder, heartbeat, trigger, full, dry_run, force, progress
                )
        finally:
            heartbeat.stop()
            try:
                self.store.release_lease(tenant, holder)
            except Exception as exc:  # it expires by itself
                log.warning("tenant %s: could not release the lease: %s", tenant, exc)

    def _newest_run(self, tenant: str, due_after: int | None) -> int | None:
        """For a scheduled fire skipped because the lease is taken: the tenant's newest run id,
        the holder's run among them (recorded as soon as it took the lease). That run was this
        fire's interval: without it, the worker's next fire skipped too, "synced by" that run."""
        if due_after is None:
            return None
        try:
            return self.store.scheduled_run_after(tenant, due_after, other_than=self.worker)[1]
        except Exception:  # the store blinked: the next fire just looks further back
            return None

    def _locked_sync(
        self,
        config: Config,
        tenant: str,
        settings: Any,
        holder: str,
        heartbeat: _Heartbeat,
        trigger: str,
        full: bool,
        dry_run: bool,
        force: bool,
        progress: Progress | None,
    ) -> RunResult:
        started = time.monotonic()
        cursor = self.store.get_cursor(tenant)
        stored_cursor, stored_settings = _split_cursor(cursor.value)
        now_settings = _settings_digest(settings)
        notes: list[str] = []
        if stored_cursor is not None and not isinstance(stored_cursor, dict):
            # Valid JSON but no object (a hand-edited store): the connectors read a cursor's keys,
            # and the run failed on an AttributeError, traceback and all, every run.
            stored_cursor = None
            notes.append("stored cursor unreadable: full resync")
        settings_changed = stored_settings is not None and not _settings_unchanged(stored_settings, settings)
        if full:
            notes.append("full sync requested")
        elif stored_cursor is not None and settings_changed:
            # An incremental run re-reads only what the vendor changed: under a new attribute
            # mapping (or state mapping, manager field…) everyone else would keep the old
            # normalization until the next periodic full sync.
            full = True
            notes.append("the tenant's settings changed since the last sync: full sync")
        elif stored_cursor is not None and cursor.last_full_at is not None:
            every = config.full_sync_every_of(tenant)
            # A fire is never exactly one period after the last full run's: interval jitter (the
            # last full run's fire late in its slot, this one early in its own: up to 30 s early),
            # a busy thread pool, the scheduler's own latency. One a little early (1% of the
            # period, or twice the jitter: still less than the interval) counts, or the full walk
            # waited for the next fire, a day later on a daily schedule.
            early = max(every / 100, timedelta(seconds=2 * interval_jitter(config.schedule_of(tenant))))
            if utcnow() >= cursor.last_full_at + every - early:
                full = True
                notes.append("periodic full reconciliation")
        planned_mode = "full" if full or stored_cursor is None else "incremental"
        if not dry_run:
            self._record_unrecorded(tenant)
        run_id = (
            None if dry_run else self.store.start_run(tenant, trigger=trigger, mode=planned_mode, worker=self.worker)
        )
        log.info(
            "sync start tenant=%s provider=%s trigger=%s mode=%s%s",
            tenant,
            settings.provider,
            trigger,
            planned_mode,
            " dry-run" if dry_run else "",
        )
        result = RunResult(tenant, "failed", planned_mode, run_id=run_id, notes=notes, started=started)
        plan: Plan | None = None
        connector: Connector | None = None
        recorded = False  # the run's outcome is committed
        masked = _Masked(_secret_values(settings))
        try:
            connector = self.connector_factory(tenant, settings)
            limit = _RunLimit(config.max_run_time_of(tenant), started + config.max_run_time_of(tenant))
            done, plan = self._pull_and_diff(
                connector, tenant, stored_cursor, full, heartbeat, progress, masked, limit
            )
            result.mode = done.mode
            result.requests = done.requests
            notes.extend(done.notes)
            notes.extend(plan.notes)
            if not plan.snapshot and plan.user_deletes and getattr(connector, "deleted_manager_leaves_reports", False):
                # The vendor drops a deleted manager from their reports without listing them
                # (connectors.base.Connector): the store knows who they are.
                clear_deleted_managers(plan, self.store.load_reports(tenant, plan.user_deletes))
            old_users = self.store.load_users(tenant, [*plan.stored_users, *plan.user_deletes])
            old_groups = self.store.load_groups(tenant, [*plan.stored_groups, *plan.group_deletes])
            writes = build_writes(plan, old_users, old_groups)
            result.counts = _counts(plan, writes, old_users)
            result.writes = writes
            stored = self.store.count_users(tenant)  # by state: one COUNT query
            guard_settings = config.guard_of(tenant)
            # Memberships removed between a user and a group that both stay. Those of a deleted
            # user or group go with it and are held (or not) with the deletions: counted here, one
            # ordinary deletion of a large group would read as a mass removal of access.
            kept_removes = len(plan.member_removes)
            if kept_removes > guard_settings.min_count and (plan.user_deletes or plan.group_deletes):
                kept_removes = sum(
                    1 for g, u in plan.member_removes if g not in plan.group_deletes and u not in plan.user_deletes
                )
            verdict = guard.check(
                settings=guard_settings,
                first_sync=not self.store.has_succeeded(tenant) and not stored,
                snapshot=plan.snapshot,
                seen_users=plan.seen_users,
                seen_groups=plan.seen_groups,
                stored_users=sum(stored.values()),
                stored_active_users=stored.get("active", 0),
                stored_groups=self.store.count_groups(tenant),
                user_deletes=len(plan.user_deletes),
                # `old_users` holds the deleted users' stored rows (loaded above for the writes)
                active_user_deletes=sum(
                    1 for key in plan.user_deletes if old_users.get(key, {}).get("state") == "active"
                ),
                user_deactivations=result.counts["users_deactivated"],
                user_reactivations=result.counts["users_reactivated"],
                group_deletes=len(plan.group_deletes),
                quarantined_users=sum(1 for q in plan.quarantined if q.kind == "user"),
                member_removes=kept_removes,
                # Counted only when the removals could trip the guard: an ordinary run pays nothing.
                stored_memberships=(
                    self.store.count_memberships(tenant) if kept_removes > guard_settings.min_count else 0
                ),
                # A key the operator removed from `attributes` goes from everyone by their edit.
                cleared=cleared_fields(writes.events, mapped=getattr(settings, "attributes", None)),
            )
            if dry_run:
                result.status = "planned"
                if verdict.held and force:
                    notes.append(f"the guard would hold this run, --force overrides it: {verdict.reason}")
                elif verdict.held:
                    result.would_hold = True
                    notes.append(f"the guard would hold this run: {verdict.reason}")
                return result
            if verdict.held and not force:
                result.status = "held"
                next_steps = guard.next_steps(tenant, result.mode, settings.provider)
                if settings_changed:
                    # The likelier cause then is the operator's own edit (an `attributes` path with a
                    # typo, a narrower filter), not the directory the reason asks about.
                    # Google's own advice (the scope, the admin's access) is for a directory that
                    # changed; every Google run is a full one already: no --full.
                    mode = "incremental" if settings.provider == "google_workspace" else result.mode
                    next_steps = (
                        "the tenant's settings changed since its last applied sync: if this is what the change "
                        f"does, {guard.next_steps(tenant, mode)}; if not, correct the settings"
                    )
                result.error = f"held by the mass-change guard: {verdict.reason}; {next_steps}"
                assert run_id is not None
                self.store.finish_run(
                    run_id,
                    status="held",
                    mode=result.mode,
                    counts=result.counts,
                    requests=result.requests,
                    notes=notes,
                    error=result.error,
                    quarantined=_quarantine_list(plan),
                    holder=holder,  # a worker that lost its lease records its run failed, as `apply`
                    duration_s=_elapsed(result),
                )
                recorded = True
                # What to do, on the line an operator watching WARNINGs sees: not only on "sync end".
                log.warning("sync held tenant=%s: %s; %s", tenant, verdict.reason, next_steps)
                return result
            if verdict.held:
                notes.append(f"guard overridden with --force: {verdict.reason}")
            self._check_still_running(heartbeat)
            assert run_id is not None
            result.status = "succeeded"
            result.events = self.store.apply(
                tenant,
                run_id,
                writes,
                holder=holder,
                cursor=_with_settings(done.cursor, now_settings),
                full=done.mode == "full",
                run_fields=dict(
                    status="succeeded",
                    mode=result.mode,
                    counts=result.counts,
                    requests=result.requests,
                    notes=notes,
                    quarantined=_quarantine_list(plan),
                    duration_s=_elapsed(result),
                ),
            )
            recorded = True
            if plan.quarantined:
                log.warning(
                    "tenant %s: %d records quarantined (see `dirpull runs %s`)", tenant, len(plan.quarantined), tenant
                )
            return result
        except (ConnectorError, ConfigError, StoreError, SpoolError, Interrupted) as exc:
            result.status = "failed"
            result.requests = _requests_made(result.requests, connector, exc)
            result.error = _without_secrets(str(exc), settings)
            return self._failed(result, notes, exc, maybe_committed=isinstance(exc, CommitUnconfirmed))
        except Exception as exc:  # a bug or an SDK surprise: recorded, never half-applied
            result.status = "failed"
            result.requests = _requests_made(result.requests, connector, exc)
            if (statement := failed_statement(exc)) is not None:
                # The database's full message quotes the row it refused (PostgreSQL's "Failing row
                # contains …"), the tenant's people: the log gets where and which statement.
                summary, sql = statement
                where = "".join(traceback.format_tb(exc.__traceback__))
                log.error("tenant %s: unexpected database error: %s\n%s%s", tenant, summary, where, sql)
                result.error = _without_secrets(summary, settings)
                return self._failed(result, notes)
            trace = traceback.format_exc()
            if (clean := _without_secrets(trace, settings)) == trace:
                log.exception("tenant %s: unexpected error", tenant)
            else:
                log.error("tenant %s: unexpected error\n%s", tenant, clean.rstrip())
            result.error = _without_secrets(f"{type(exc).__name__}: {exc}", settings)
            return self._failed(result, notes)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: recorded, then passed on
            if not recorded:
                result.status = "failed"
                result.requests = _requests_made(result.requests, connector, exc)
                result.error = f"interrupted ({type(exc).__name__}); nothing applied"
                self._failed(result, notes)
            raise
        finally:
            # The pending records' spool file goes now, not whenever the collector gets to it; a
            # dry run hands its planned writes (which read from it) to the caller instead.
            if plan is not None and plan.spool is not None and result.status != "planned":
                result.writes = None
                plan.spool.close()
            masked.release()
            result.duration_s = round(time.monotonic() - started, 3)
            log.info(
                "sync end tenant=%s provider=%s mode=%s status=%s events=%d requests=%d duration=%.2fs counts=%s%s",
                tenant,
                settings.provider,
                result.mode,
                result.status,
                result.events,
                result.requests,
                result.duration_s,
                _short_counts(result.counts),
                f" error={result.error}" if result.error else "",
            )

    def _failed(
        self, result: RunResult, notes: list[str], cause: BaseException | None = None, *, maybe_committed: bool = False
    ) -> RunResult:
        """Record the run failed. `maybe_committed`: its commit's outcome is not known
        (`CommitUnconfirmed`): recorded only if the store still has it running, not committed."""
        result.writes = None
        cut = result.error or ""
        stopped = "the worker is stopping" in cut
        if self.stop.is_set() and not cut.startswith(STOPPED) and (stopped or not _vendor_refused(cause)):
            # Cut off by the stop some other way (a vendor's retry wait cut short, a request
            # aborted): the same words, so the run reads as interrupted, with what was cut off.
            # Not a failure the vendor had already answered with, which the stop did not cause.
            result.error = STOPPED if stopped else f"{STOPPED} ({cut})"
        if result.run_id is not None:
            try:
                recorded = self.store.finish_run(
                    result.run_id,
                    status="failed",
                    mode=result.mode,
                    counts=result.counts,
                    requests=result.requests,
                    notes=notes,
                    error=result.error,
                    only_running=maybe_committed,
                    duration_s=_elapsed(result),
                )
                if not recorded:
                    log.warning(
                        "tenant %s: run %d is not recorded failed: the store no longer has it running (committed "
                        "after all, or ended by a worker that took the tenant over); see `dirpull runs %s`",
                        result.tenant, result.run_id, result.tenant,
                    )  # fmt: skip
            except Exception as exc:
                log.error("tenant %s: could not record the failed run: %s", result.tenant, exc)
                with self._syncing_lock:
                    self._unrecorded.setdefault(result.tenant, {})[result.run_id] = {
                        "status": "failed", "mode": result.mode, "counts": result.counts,
                        "requests": result.requests, "notes": notes, "error": result.error,
                        "duration_s": _elapsed(result),
                    }  # fmt: skip
        return result

    def _record_unrecorded(self, tenant: str) -> None:
        """Record the tenant's failed runs whose end the store could not take, before a new run
        starts (under the lease: no other run of the tenant can end them meanwhile). Left
        `running`, the next run marked each "interrupted: worker stopped or lost its lease": a
        vendor outage that met a store outage read as a restart in the runs' history and in
        `dirpull status`, and its error was lost."""
        with self._syncing_lock:
            pending = self._unrecorded.pop(tenant, {})
        for run_id, end in pending.items():
            try:
                # Only if still running: a worker that took the tenant over may have ended it.
                self.store.finish_run(run_id, only_running=True, **end)
            except Exception as exc:  # still out: `start_run` fails next, and this is tried again
                log.warning("tenant %s: could not record failed run %d yet: %s", tenant, run_id, exc)
                with self._syncing_lock:
                    self._unrecorded.setdefault(tenant, {})[run_id] = end

    def _check_still_running(self, heartbeat: _Heartbeat, limit: _RunLimit | None = None) -> None:
        if self.stop.is_set():
            raise Interrupted(STOPPED)
        if heartbeat.lost:
            raise Interrupted("lease lost during the run (another worker took over); nothing applied")
        if limit is not None:  # not once the directory is read: a run about to write is let finish
            limit.check()

    def _pull_and_diff(
        self,
        connector: Connector,
        tenant: str,
        cursor: dict[str, Any] | None,
        full: bool,
        heartbeat: _Heartbeat,
        progress: Progress | None,
        masked: _Masked | None = None,
        limit: _RunLimit | None = None,
    ) -> tuple[Done, Plan]:
        done: Done | None = None
        pages = users = groups = 0
        snapshot = full or cursor is None
        with ThreadPoolExecutor(1, thread_name_prefix=f"load-{tenant}") as loader:
            # A snapshot compares everything: the stored fingerprints are loaded once, in another
            # thread, while the first requests go out. Stored membership pairs (up to a million at
            # 100,000 users) are read only for groups whose member digest changed — unless no
            # group has a digest yet (the diff then compares every pair): then they all load
            # meanwhile, as they are needed only at the end.
            user_state = loader.submit(self.store.user_digests, tenant) if snapshot else None
            group_state = loader.submit(self.store.group_digests, tenant) if snapshot else None

            def preload_pairs() -> set[tuple[str, str]] | None:
                assert group_state is not None
                _, digests = group_state.result()
                return None if digests else self.store.membership_pairs(tenant)

            preloaded = loader.submit(preload_pairs) if snapshot else None

            def all_pairs() -> set[tuple[str, str]]:
                assert preloaded is not None
                loaded = preloaded.result()
                return loaded if loaded is not None else self.store.membership_pairs(tenant)

            def pairs_of(groups: Collection[str], users: Collection[str]) -> set[tuple[str, str]]:
                return self.store.membership_pairs(tenant, groups=groups, users=users)

            def members_of(groups: Collection[str]) -> dict[str, set[str]]:
                return self.store.group_members(tenant, groups)

            def pull() -> Any:
                if user_state is not None and getattr(connector, "source_digests", False):
                    # Built in the loader thread too: a 100,000-entry map is ~15 ms.
                    owners = loader.submit(_owners, user_state) if getattr(connector, "source_texts", False) else None
                    known = _Known(user_state, owners)
                    return connector.pull(None if full else cursor, full=full, known=known)  # type: ignore[call-arg]
                return connector.pull(None if full else cursor, full=full)

            def new_diff() -> Diff:
                stored: StoredState
                if user_state is not None and group_state is not None:
                    fingerprints, sources = user_state.result()
                    group_fps, member_digests = group_state.result()
                    stored = LoadedState(
                        fingerprints, group_fps, all_pairs, sources, member_digests, pairs_of, members_of
                    )
                else:
                    stored = _StoreBackedState(self.store, tenant)
                return Diff(stored)

            diffs: list[Diff] = []  # the diff, once made (by whichever thread diffs the pages)

            def pull_and_diff() -> Iterator[_Diffed | Done]:
                # A connector whose pages come back to back from one streamed body keeps the pull
                # thread busy: diffing its pages there too spares the hand-over between two busy
                # threads (BambooHR's first sync at 100,000 users: 1.5 s of CPU, see
                # docs/benchmarks.md). The main thread then only waits for the end.
                items = pull()
                try:
                    for item in items:
                        if isinstance(item, Page):
                            if not diffs:
                                diffs.append(new_diff())
                            diffs[0].add(item)
                            yield _Diffed.of(item)
                        else:
                            yield item  # Done, or something the other side refuses
                finally:
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()

            same_thread = not getattr(connector, "hands_over_pages", True)
            run_ended = threading.Event()  # set as the run leaves the pull, done or not

            def opened() -> Any:
                RUN_ENDED.set(run_ended)  # in the pull thread: its waits end with the run
                return pull_and_diff() if same_thread else pull()

            def check() -> None:  # also while the main thread waits for the next page
                self._check_still_running(heartbeat, limit)

            with Prefetch(opened, name=f"pull-{tenant}", check=check, stop=run_ended) as stream:
                stream.start()
                if masked is not None:  # the tenant's secrets stay masked while the pull goes on
                    masked.hold()
                    stream.when_ended(masked.release)
                if not same_thread:
                    diffs.append(new_diff())
                for item in stream:
                    self._check_still_running(heartbeat, limit)
                    if isinstance(item, Done):
                        done = item
                        break
                    if isinstance(item, Page):
                        diffs[0].add(item)
                        item = _Diffed.of(item)
                    elif not isinstance(item, _Diffed):
                        raise ConnectorError(f"connector yielded {type(item).__name__}, not a Page")
                    pages += 1
                    users += item.users
                    groups += item.groups
                    if progress:
                        progress(tenant, pages, users, groups)
            if done is None:
                raise ConnectorError("the connector stopped before the end of the directory; nothing applied")
            if progress:
                progress(tenant, pages, users, groups, True)  # read_all
            diff = diffs[0] if diffs else new_diff()
        return done, diff.finish(done)


class _Diffed(NamedTuple):
    """A page the pull thread has diffed: its users and groups, for the progress count."""

    users: int
    groups: int

    @classmethod
    def of(cls, page: Page) -> _Diffed:
        return cls(len(page.users) + len(page.unchanged_users), len(page.groups))


class _Known:
    """`connectors.source.Known` answered from the stored source digests, which load in another
    thread while the first request is out (the connector's first ask waits for them); and, for a
    connector that digests records before parsing them (`source_texts`), whose digest one is."""

    def __init__(
        self,
        state: Future[tuple[dict[str, str], dict[str, str]]],
        owners: Future[dict[str, str]] | None = None,
    ) -> None:
        self._state = state
        self._sources: dict[str, str] | None = None
        self._owners_future = owners
        self._owners: dict[str, str] | None = None

    def __call__(self, idp_id: str, source: str) -> bool:
        if self._sources is None:
            self._sources = self._state.result()[1]
        return self._sources.get(idp_id) == source

    def owner(self, source: str) -> str | None:
        return self._owner_map().get(source)

    def owns_any(self) -> bool:
        return bool(self._owner_map())

    def _owner_map(self) -> dict[str, str]:
        if self._owners is None:
            self._owners = self._owners_future.result() if self._owners_future is not None else {}
        return self._owners


def _owners(state: Future[tuple[dict[str, str], dict[str, str]]]) -> dict[str, str]:
    return {source: idp_id for idp_id, source in state.result()[1].items()}


class _StoreBackedState:
    """The stored tenant as the diff sees it during a delta: narrow queries for what a page names,
    instead of every fingerprint and membership of a large tenant. Should the connector turn the
    run into a snapshot after all (an expired delta token), the full reads happen then."""

    def __init__(self, store: Store, tenant: str) -> None:
        self.store, self.tenant = store, tenant

    def user_fingerprints(self, ids: Collection[str]) -> Mapping[str, str]:
        return self.store.user_fingerprints(self.tenant, ids) if ids else {}

    def group_fingerprints(self, ids: Collection[str]) -> Mapping[str, str]:
        return self.store.group_fingerprints(self.tenant, ids) if ids else {}

    def user_sources(self, ids: Collection[str]) -> Mapping[str, str]:
        return self.store.user_sources(self.tenant, ids) if ids else {}

    def group_member_digests(self) -> Mapping[str, str]:
        return {}  # a delta turned snapshot compares every stored pair instead

    def user_ids(self) -> set[str]:
        return set(self.store.user_fingerprints(self.tenant))

    def group_ids(self) -> set[str]:
        return set(self.store.group_fingerprints(self.tenant))

    def member_pairs(self) -> set[tuple[str, str]]:
        return self.store.membership_pairs(self.tenant)

    def member_pairs_of(self, groups: Collection[str], users: Collection[str]) -> set[tuple[str, str]]:
        if not groups and not users:
            return set()
        return self.store.membership_pairs(self.tenant, groups=groups, users=users)

    def group_members(self, groups: Collection[str]) -> Mapping[str, set[str]]:
        return self.store.group_members(self.tenant, groups) if groups else {}

    def existing_pairs(self, pairs: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        return self.store.existing_pairs(self.tenant, pairs) if pairs else set()


def _secret_values(settings: Any) -> list[str]:
    """The tenant's secrets as configured now, longest first, and each line of a multi-line one (a
    PEM key, a service-account file and the private key in it)."""
    values: set[str] = set()
    short: set[str] = set()  # a whole secret under MIN_ANYWHERE characters (never a line of one)
    for key in getattr(type(settings), "model_fields", {}):
        ref = getattr(settings, key, None)
        if not isinstance(ref, SecretRef):
            continue
        try:
            value = ref.get()
        except ConfigError:
            continue
        found = [value]
        if 0 < len(value.strip()) < MIN_ANYWHERE:
            # And as a token form or a query sends it (`client_secret=ab%2B1c`, `a+b1c` for `a b1c`),
            # which a gateway echoes as sent.
            short.update({value.strip(), quote_plus(value.strip()), quote(value.strip(), safe="")})
        try:
            info = json.loads(value)
        except ValueError:
            info = None
        if isinstance(info, dict) and isinstance(info.get("private_key"), str):
            found.append(info["private_key"])
        for v in found:
            values.add(v)
            values.update(line.strip() for line in v.splitlines())
    return sorted({v for v in values if len(v) >= MIN_ANYWHERE} | short, key=len, reverse=True)


def _without_secrets(text: str, settings: Any) -> str:
    """`text` with the tenant's secrets masked. Errors quote the vendor's own words, and a vendor may
    quote a credential it was sent (an OAuth server's "Invalid refresh token: …", a proxy's error
    page echoing the request): the run record and the log must not carry it on."""
    text = _mask_secrets(text, _secret_values(settings))
    return mask_credentials(text)  # and those no setting holds (an echoed Authorization header…)


CUT = "…"  # where a connector cut a quoted vendor page short (`readable_body`, `transport_reason`)
MIN_CUT_PREFIX = 3  # characters of a secret before a cut that are masked as its start
# A secret this long is masked wherever it appears; a shorter one (a 6-character password or API
# token) could be any word of the text, and is masked only where text names a credential.
MIN_ANYWHERE = 8


def _short_secret(secret: str) -> re.Pattern[str]:
    """Where a short secret shows as a credential: after an authorization scheme (`SSWS ab12cd`, a
    gateway's page echoing the request's headers) or as a field's value (`client_secret=ab12cd&`
    in an echoed form or query, `"api_token": "ab12cd"`). These are skipped by `mask_credentials`
    (they are for values of 8 or 12 characters and more) and were quoted as sent."""
    value = re.escape(secret)
    return re.compile(
        rf"""(\b(?i:Basic|Bearer|SSWS|DPoP|Token)\s+|[=:]\s*["']?){value}(?=$|[\s"'&,;}})\]<.#/?{CUT}])"""
    )


def _mask_secrets(text: str, secrets: Sequence[str]) -> str:
    """`text` with each of `secrets` (longest first) as `***`, and with the start of one that a cut
    went through: a vendor's page is quoted to 200 or 300 characters and ends in `…`, and a secret
    it quoted near its end (a gateway's page naming the key it could not check) left its first part
    in the log and the run record, the whole secret being nowhere to find. A secret shorter than
    MIN_ANYWHERE only where it stands as a credential (`_short_secret`)."""
    for secret in secrets:
        if len(secret) >= MIN_ANYWHERE:
            text = text.replace(secret, "***")
        elif secret in text:
            text = _short_secret(secret).sub(r"\1***", text)
    if CUT not in text:
        return text
    secrets = [s for s in secrets if len(s) >= MIN_ANYWHERE]
    out: list[str] = []
    start = 0
    while (cut := text.find(CUT, start)) >= 0:
        before = text[start:cut]
        for secret in secrets:
            # The longest start of the secret that the text before the cut ends with.
            k = next((k for k in range(len(secret) - 1, MIN_CUT_PREFIX - 1, -1) if before.endswith(secret[:k])), 0)
            if k:
                before = before[:-k] + "***"
                break
        out.append(before + CUT)
        start = cut + len(CUT)
    out.append(text[start:])
    return "".join(out)


# The stored cursor also remembers the settings it was made under (the connector never sees this).
SETTINGS_KEY = "dirpull_settings"
# Settings that only decide when and whether a tenant syncs, not what its records become.
_SCHEDULING_KEYS = frozenset({"schedule", "full_sync_every", "guard", "enabled"})
# Settings that only decide how requests are made (waits, retries, page and batch sizes, threads)
# and how long a run may take: the same directory comes back whatever they are. In the digest, a
# raised timeout after a slow day made the next run a full one, at 100,000 users a walk of minutes,
# and a run held then said the operator's edit may be its cause.
_TRANSPORT_KEYS = frozenset({
    "timeout", "request_timeout", "max_retry_attempts", "max_retry_wait", "max_rate_limit_wait",
    "rate_limit_reserve", "backoff_base", "page_size", "batch_size", "member_workers", "max_run_time",
})  # fmt: skip


# Settings a dirpull added after cursors began to carry SETTINGS_KEY, with their defaults. Such a
# cursor digested every setting of its dirpull, defaults included, and knew none of these (the
# retry settings: none but Entra's, which `_settings_unchanged` still matches with them).
_ADDED_SINCE_FIRST_DIGEST: dict[str, Any] = {"dpop": False, "max_retry_attempts": 6, "max_retry_wait": 300.0}
# Settings added after the digest left the transport settings out: no cursor's digest ever held
# them, so none of the older forms `_settings_unchanged` matches has them either.
_NEVER_DIGESTED = frozenset({"max_run_time"})


def _settings_digest(settings: Any) -> str:
    """A digest of the tenant's settings that can change what a sync reads or how it normalizes
    it (secrets as their references, never their values). Only settings away from their defaults:
    a setting a newer dirpull adds, left at its default, changes nothing a sync makes. With every
    setting digested, upgrading dirpull made each such tenant's next run a full walk, noted as
    "the tenant's settings changed" when nobody had edited them."""
    if not hasattr(settings, "model_dump"):
        return digest(repr(settings).encode())
    dumped = settings.model_dump(mode="json", exclude_defaults=True)
    ignored = _SCHEDULING_KEYS | _TRANSPORT_KEYS
    return digest(canonical({k: v for k, v in dumped.items() if k not in ignored}))


def _settings_unchanged(stored: str, settings: Any) -> bool:
    """Whether a cursor's settings digest was made under these settings, by this dirpull or by an
    older one that digested every setting (with or without those added since), the transport
    settings as they were or, as the release before this one did, pinned to their defaults."""
    if stored == _settings_digest(settings):
        return True
    if not hasattr(settings, "model_dump"):
        return False
    left_out = _SCHEDULING_KEYS | _NEVER_DIGESTED
    dumped = {k: v for k, v in settings.model_dump(mode="json").items() if k not in left_out}
    fields = getattr(type(settings), "model_fields", {})
    # A tenant with a raised timeout or a smaller page size, last synced by that release, would
    # otherwise match no digest here, and its first run after the upgrade was a full walk.
    pinned = {k: (fields[k].default if k in _TRANSPORT_KEYS and k in fields else v) for k, v in dumped.items()}
    added = _ADDED_SINCE_FIRST_DIGEST
    candidates = []
    for every in (dumped, pinned):
        before_added = {k: v for k, v in every.items() if k not in added or v != added[k]}
        candidates += [digest(canonical(every)), digest(canonical(before_added))]
    return stored in candidates


def _split_cursor(value: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """The connector's cursor and the settings digest stored with it (None from before it was)."""
    if not isinstance(value, dict) or SETTINGS_KEY not in value:
        return value, None
    rest = {k: v for k, v in value.items() if k != SETTINGS_KEY}
    return rest or None, value[SETTINGS_KEY]  # only the digest: a connector without a cursor


def _with_settings(cursor: dict[str, Any] | None, settings_digest: str) -> dict[str, Any]:
    # Kept for a connector without a cursor too (Google, Workday: every run a full snapshot).
    # Without it a hold after a settings change there (Workday's `fields.active` pointed at
    # another column) never said that the change may be its cause.
    return {**(cursor or {}), SETTINGS_KEY: settings_digest}


def _vendor_refused(exc: BaseException | None) -> bool:
    """A failure the vendor answered with (a refused credential, an HTTP error status, a report
    without a configured column): the run failed on its own, whether or not a stop came meanwhile.
    A SIGTERM arriving just as a 401 failed the run recorded it as interrupted, and `dirpull
    status` does not flag an interrupted run: the refused key went unseen until the next run."""
    return isinstance(exc, ConnectorError) and (exc.status is not None or not exc.retriable)


def _requests_made(so_far: int, connector: Connector | None, exc: BaseException) -> int:
    """The requests a failed run made. A ConnectorError carries the count as it leaves the pull; a
    run stopped between pages (SIGINT, SIGTERM, a lost lease) or failed after the pull (the pending
    records' disk, the diff, the store) has only the connector's own count to go by."""
    counted = connector.requests_sent() if isinstance(connector, CountsRequests) else 0
    carried = exc.requests if isinstance(exc, ConnectorError) else 0
    return max(so_far, counted, carried)


def _quarantine_list(plan: Plan) -> list[dict[str, Any]]:
    return [{"kind": q.kind, "idp_id": q.idp_id, "reason": q.reason} for q in plan.quarantined[:1000]]


def _counts(plan: Plan, writes: WriteSet, old_users: dict[str, dict[str, Any]]) -> dict[str, int]:
    deactivated, reactivated = state_changes(plan, old_users)
    return {
        "users_seen": plan.seen_users,
        "groups_seen": plan.seen_groups,
        "users_created": len(writes.user_creates),
        "users_updated": sum(1 for e in writes.events if e["type"] == "user.updated"),
        "users_deactivated": deactivated,
        "users_reactivated": reactivated,
        "users_deleted": len(writes.user_deletes),
        "groups_created": len(writes.group_creates),
        "groups_updated": sum(1 for e in writes.events if e["type"] == "group.updated"),
        "groups_deleted": len(writes.group_deletes),
        "members_added": len(writes.member_adds),
        "members_removed": len(writes.member_removes),
        "members_skipped": plan.members_skipped,
        "quarantined": len(plan.quarantined),
        "rows_written": writes.rows,
        "events": writes.event_count,
    }


def _short_counts(counts: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in counts.items() if v and k not in ("users_seen", "groups_seen")) or "-"
