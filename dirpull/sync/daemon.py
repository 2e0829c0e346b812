"""`dirpull run`: every tenant on its schedule, in one process (or several, sharing a store).

APScheduler 3 fires one job per tenant in a bounded thread pool. Overlapping fires of one tenant
are skipped in-process (`max_instances=1`) and across processes by the tenant's lease in the store,
so several workers can load the same configuration; a fire also skips when another worker finished
a scheduled run of the tenant since this worker's previous fire (once per interval, not per
worker). A fire that finds the lease held tries again a few times before the tenant's next fire
(the holder may be a dry run, or a run that fails). A failing tenant backs off exponentially
without slowing the others, and is tried again at the end of each back-off, not at the first
regular fire after it (for a nightly cron, the next night). SIGTERM/SIGINT stop new fires,
interrupt running syncs at the next page boundary (an interrupted run applies nothing) and wait
for them to finish; a second one exits at once (`dirpull.signals`). SIGHUP reloads the configuration
file (`Daemon.reload`) without interrupting the running syncs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import apscheduler.schedulers.base as aps_base
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from dirpull.config import Config, ConfigError, cron_trigger, interval_jitter, load_config, parse_duration
from dirpull.connectors.http import SHUTDOWN
from dirpull.signals import stop_on_signals
from dirpull.storage.store import Store
from dirpull.sync.runner import Runner, RunResult, cut_off

log = logging.getLogger("dirpull.daemon")

MAX_BACKOFF = timedelta(hours=1)
# A fire that finds the tenant's lease held tries again after `lease_retry_base` seconds, doubling,
# at most this many times, and never at or after the tenant's next regular fire.
MAX_LEASE_RETRIES = 5


class _QuietStopScheduler(BackgroundScheduler):
    # Longest the scheduler sleeps between looks at the wall clock (seconds).
    max_sleep = 60.0

    # APScheduler 3.x runs one more pass over due jobs after shutdown() and loses those fires
    # (agronholm/apscheduler#285, #985; see shared/sdk-notes.md). Pinned to 3.11.
    def _process_jobs(self) -> float | None:
        if self.state == STATE_STOPPED:
            return None
        # It sleeps until the next fire on the monotonic clock, which stands still while the
        # machine is suspended and ignores a step of the wall clock: a worker whose host slept
        # through 02:00 fired its nightly tenant as many hours late as it slept (or, with no
        # fire due, waited up to 49 days). Waking every minute fires it within a minute of the
        # wall clock's time (agronholm/apscheduler#794).
        self._follow_clock_step_back()
        wait = super()._process_jobs()
        return self.max_sleep if wait is None else min(wait, self.max_sleep)

    # A wall clock that lost more than this against the monotonic one between two passes was
    # stepped back (NTP slews a few milliseconds a minute; the passes are at most a minute apart).
    clock_step_tolerance = timedelta(seconds=1)
    _clock: tuple[datetime, float] | None = None

    def _follow_clock_step_back(self) -> None:
        """A wall clock stepped back (NTP correcting a clock that ran fast, a VM restored from a
        snapshot) left every fire counted in elapsed time (an interval tenant's, a retry's) that
        much further away: an hour's step, an hour without a sync of a "5m" tenant. Those fires
        move back with the clock, so they still come when they were due; a cron tenant's stays at
        its wall-clock time. A step forward needs nothing: the fires it passed over are due, once."""
        with self._jobstores_lock:  # also called by the threads adding jobs (`_real_add_job`)
            # The clock the scheduler compares fire times with (its module's `datetime`).
            wall, mono = aps_base.datetime.now(UTC), time.monotonic()
            last, self._clock = self._clock, (wall, mono)
            if last is None:
                return
            self._move_back((wall - last[0]) - timedelta(seconds=mono - last[1]))

    def _move_back(self, step: timedelta) -> None:
        if step > -self.clock_step_tolerance:
            return
        log.warning(
            "the wall clock was stepped back %.0fs: interval fires and retries move back with it", -step.total_seconds()
        )
        for job in self.get_jobs():
            if job.next_run_time is None or not isinstance(job.trigger, IntervalTrigger | DateTrigger):
                continue  # a cron tenant's (CronTrigger, OrTrigger) fires at its wall-clock time
            changes: dict[str, Any] = {"next_run_time": job.next_run_time + step}
            if isinstance(job.trigger, IntervalTrigger):  # its slots too, or the one after is off them
                trigger = copy.copy(job.trigger)
                trigger.start_date = trigger.start_date + step
                changes["trigger"] = trigger
            with contextlib.suppress(JobLookupError):  # a fire of its own just removed it (a retry)
                job.modify(**changes)

    # A job added or changed (a retry, a reloaded tenant) is counted on the wall clock as it is now:
    # the jobs already there are brought onto that clock first. Left to the next pass, which the
    # addition itself wakes, a step just before it moved the new job back too, a second time: a
    # failed run's retry came at once, an hour's step ahead of its back-off.
    def _real_add_job(self, job: Any, jobstore_alias: str, replace_existing: bool) -> None:
        self._follow_clock_step_back()
        super()._real_add_job(job, jobstore_alias, replace_existing)

    def modify_job(self, job_id: str, jobstore: str | None = None, **changes: Any) -> Any:
        self._follow_clock_step_back()  # a call of its own (`job.modify`) finds no step: it was just taken
        return super().modify_job(job_id, jobstore, **changes)


class _NoOverlapWarning(logging.Filter):
    """Drops APScheduler's warning for a fire skipped because the tenant's previous sync is still
    running ('Execution of job … skipped: maximum number of running instances reached'): that is
    how a sync longer than its interval is meant to go, not a problem, and it came at every fire.
    The daemon logs its own line (INFO) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('Execution of job "%s" skipped: maximum number of running')


_NO_OVERLAP_WARNING = _NoOverlapWarning()


class _SlottedInterval(IntervalTrigger):
    """An interval trigger whose jitter does not pile up. APScheduler 3 counts the next fire from
    the previous one as it fired, its jitter (always added, never taken off) included: each
    interval was half the jitter longer on average, a "15m" tenant 8 hours behind its schedule
    after three weeks, a "30s" one firing 5% less often than configured. The next fire is counted
    from the previous fire's own slot on the grid from `start_date`, then jittered."""

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        if previous_fire_time is not None:
            start = self.start_date.timestamp()
            # The jitter is under a tenth of the interval: the nearest slot to the fire less half
            # of it is the fire's own, whatever rounding the timestamps have.
            slot = round((previous_fire_time.timestamp() - (self.jitter or 0) / 2 - start) / self.interval_length)
            previous_fire_time = datetime.fromtimestamp(start + slot * self.interval_length, self.timezone)
        return super().get_next_fire_time(previous_fire_time, now)


def trigger_for(schedule: str, start: datetime | None = None) -> BaseTrigger:
    """The tenant's trigger; an interval one counts its slots from `start` (its first fire), by
    default one interval from now."""
    if schedule.startswith("cron:"):
        return cron_trigger(schedule[5:].strip())
    seconds = parse_duration(schedule).total_seconds()
    # In UTC, as every other trigger here: by default it takes the machine's zone (tzlocal), which
    # raises for a POSIX TZ such as "UTC0" or "JST-9", and `dirpull run` failed at start. The zone
    # changes nothing else: intervals are counted in elapsed seconds.
    return _SlottedInterval(seconds=seconds, jitter=interval_jitter(schedule) or None, start_date=start, timezone=UTC)


def first_fire_delay(schedule: str) -> float:
    """Seconds before a tenant's first fire: soon, but at a random point of the first interval
    (at most 10 s). Every worker schedules every tenant; the first to fire takes the lease, so a
    random phase per worker and tenant is what spreads the tenants over the workers."""
    window = 10.0 if schedule.startswith("cron:") else min(10.0, parse_duration(schedule).total_seconds())
    return random.uniform(0, window)


def next_fire(schedule: str, last_start: datetime | None, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    if schedule.startswith("cron:"):
        fire = cron_trigger(schedule[5:].strip()).get_next_fire_time(None, now)
        return fire or now
    if last_start is None:
        return now
    return max(now, last_start + parse_duration(schedule))


def cron_time_passed(schedule: str, started_at: str, now: datetime) -> bool:
    """A cron time of `schedule` came after a run that started at `started_at` (as the store
    records it), by `now`: that run was not the sync of it."""
    since = datetime.fromisoformat(started_at.replace("Z", "+00:00")) + timedelta(seconds=1)
    return next_fire(schedule, None, since) <= now


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        worker: str | None = None,
        backoff_base: float = 30.0,
        lease_retry_base: float = 20.0,
        **runner_kwargs: Any,
    ) -> None:
        self.config = config
        self.store = store
        self.stop_event = threading.Event()
        self.runner = Runner(config, store, worker=worker, stop=self.stop_event, **runner_kwargs)
        self.backoff_base = backoff_base
        self.lease_retry_base = lease_retry_base
        # Tenants with a fire running in this process: a retry of a skipped fire is a second job,
        # not covered by the regular job's `max_instances`.
        self._busy: set[str] = set()
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.results: list[RunResult] = []
        self._lock = threading.Lock()
        # Each tenant's newest run id at this worker's previous fire of it (at its start, before the
        # first): a scheduled run another worker has begun and finished since was this interval's
        # sync. Run ids, not times: the workers' clocks may disagree.
        self._seen_run: dict[str, int] = {}
        # Bumped by a reload that changes or unschedules the tenant: a run that started before it
        # used the settings replaced since, and its failure does not back off the new ones.
        self._generation: dict[str, int] = {}
        self._executor = ThreadPoolExecutor(config.defaults.max_concurrent_syncs)
        self.scheduler = _QuietStopScheduler(
            executors={"default": self._executor},
            # No misfire grace limit: APScheduler checks it when a pool thread takes the fire, so
            # with every thread busy on long syncs a tenant's fire that queued longer than the grace
            # was dropped ("Run time of job … was missed") and the tenant skipped that round, the
            # threads idle meanwhile. Late fires run; `coalesce` makes several one.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        logging.getLogger("apscheduler.scheduler").addFilter(_NO_OVERLAP_WARNING)  # once: same object
        self.scheduler.add_listener(self._overlap, EVENT_JOB_MAX_INSTANCES)

    def _overlap(self, event: JobSubmissionEvent) -> None:
        tenant = event.job_id.removesuffix(_retry_id(""))
        with self._lock:
            running = tenant in self._busy
        if running:
            log.info("tenant %s: its previous sync is still running; this fire is skipped", tenant)
            return
        # APScheduler counts a fire queued for a pool thread as running: with every thread busy
        # (many tenants, a few slow ones) the tenant has no sync under way, perhaps never had one,
        # and what holds it back is the worker's number of threads, not a long sync.
        log.info(
            "tenant %s: its previous fire is still waiting for a free sync thread (all %d of "
            "max_concurrent_syncs are busy); this fire is skipped",
            tenant, self.config.defaults.max_concurrent_syncs,
        )  # fmt: skip

    def fire(
        self, tenant: str, attempt: int = 0, due_after: int | None = None, after_failure: bool = False
    ) -> RunResult | None:
        """One fire of the tenant: its regular one (`attempt` 0), a retry of one that found the
        tenant's lease held, with the `due_after` of that fire (the holder's run, once it ends, is
        the sync of that fire's interval: the retry skips for it), or the retry of a failed run at
        the end of its back-off (`after_failure`)."""
        if self.stop_event.is_set():
            return None
        with self._lock:
            # The regular fire supersedes a retry still pending from the last one; not one it skips
            # for the back-off: the retry pending then is the attempt at the back-off's end.
            if attempt == 0 and not after_failure and time.monotonic() >= self.retry_at.get(tenant, 0.0):
                with contextlib.suppress(JobLookupError):
                    self.scheduler.remove_job(_retry_id(tenant))
            if not self._scheduled(tenant):  # a reload unscheduled it after this fire was due
                return None
            if tenant in self._busy:  # the other job of this tenant is syncing it: that is this turn's
                if attempt == 0:
                    log.info("tenant %s: its previous sync is still running; this fire is skipped", tenant)
                return None
            self._busy.add(tenant)
            generation = self._generation.get(tenant, 0)
            # The configuration this fire was checked against: a reload right after this lock is
            # let go must not hand the run settings its generation does not know, or none at all.
            config = self.config
        try:
            return self._fire(tenant, attempt, due_after, after_failure, generation, config)
        finally:
            with self._lock:
                self._busy.discard(tenant)

    def _scheduled(self, tenant: str) -> bool:
        settings = self.config.tenants.get(tenant)
        return settings is not None and settings.enabled

    def _fire(
        self,
        tenant: str,
        attempt: int,
        due_after: int | None,
        after_failure: bool,
        generation: int = 0,
        config: Config | None = None,
    ) -> RunResult | None:
        wait_until = self.retry_at.get(tenant, 0.0)
        # The retry of a failed run is the backed-off attempt (it may fire a moment before
        # `retry_at`: the scheduler's clock is not the monotonic one).
        if not after_failure and time.monotonic() < wait_until:
            log.info(
                "tenant %s: backing off after %d failures, %.0fs left",
                tenant,
                self.failures.get(tenant, 0),
                wait_until - time.monotonic(),
            )
            return None
        try:
            # Every worker fires every tenant once an interval; the first to take the lease syncs it
            # and the others skip their fires until the next interval, instead of each running it.
            # So does the retry of a failed run: if another worker synced the tenant since, it skips.
            if attempt == 0:
                due_after = self._seen_run.get(tenant)
            result = self.runner.sync(tenant, trigger="schedule", due_after=due_after, config=config)
        except Exception as exc:  # store unreachable, bad tenant config: keep the daemon alive
            log.error("tenant %s: sync could not run: %s", tenant, exc)
            result = RunResult(tenant, "failed", "-", error=str(exc))
        held = False
        backoff: tuple[int, float] | None = None  # failures in a row, delay before the retry
        retry_soon: float | None = None  # the delay before retrying a run of settings since reloaded
        with self._lock:
            # A reload since this run started removed the tenant, or changed its settings (the
            # change may be the fix): no back-off of the new settings; a retry only if still scheduled.
            outdated = not self._scheduled(tenant) or self._generation.get(tenant, 0) != generation
            if result.run_id is not None:  # our own run: whatever another worker begins after it counts
                self._seen_run[tenant] = result.run_id
            elif result.newest_run is not None:
                self._seen_run[tenant] = result.newest_run
            self.results.append(result)
            del self.results[:-1000]
            if result.status == "skipped" and result.lease_held:
                # The lease is held. The holder may be a `dirpull sync --dry-run`, which applies
                # nothing, or a run that fails: waiting for the next fire could cost a whole
                # interval (a day for a nightly cron), so try again (below).
                held = True
            elif result.status == "skipped":  # another worker synced it this interval: not a failure
                log.debug("tenant %s: %s", tenant, result.error)
            elif result.status == "failed" and self.stop_event.is_set():
                pass  # interrupted by our own shutdown: not the tenant's failure, no back-off
            elif result.status == "failed" and outdated and self._scheduled(tenant):
                # Not a failure of the new settings (nothing counted), but still one to retry: the
                # next regular fire may be a day away (a nightly cron), and the reload that landed
                # during the run (perhaps only to fix another key) did not make the sync needless.
                retry_soon = self.backoff_base * random.uniform(0.8, 1.2)
            elif result.status == "failed" and outdated:
                log.warning(
                    "tenant %s: failed: %s; no longer scheduled (configuration reloaded): not tried again",
                    tenant, result.error,
                )  # fmt: skip
            elif result.status == "failed":
                n = self.failures[tenant] = self.failures.get(tenant, 0) + 1
                # The exponent capped: after 1,025 failures in a row (six weeks of hourly retries
                # of a tenant left broken) 2 ** (n - 1) no longer converts to a float
                # (OverflowError), and every fire after that ended in a traceback, not a back-off.
                delay = self.backoff_base * 2 ** min(n - 1, 64) * random.uniform(0.8, 1.2)
                # Capped after the jitter: capped before it, a tenant left broken was tried up to
                # 72 minutes apart, where the README says at most an hour.
                delay = min(MAX_BACKOFF.total_seconds(), delay)
                self.retry_at[tenant] = time.monotonic() + delay
                backoff = n, delay
            elif result.status in ("succeeded", "held"):
                self.failures.pop(tenant, None)
                self.retry_at.pop(tenant, None)
            # Under the lock: a reload that unschedules the tenant (removes its jobs) comes before
            # the retry is added, and so sees it, or after, and this fire sees it unscheduled.
            if held and self._scheduled(tenant):
                self._retry_held(tenant, attempt, result, due_after)
            elif backoff is not None:
                self._retry_failed(tenant, result, *backoff)
            elif retry_soon is not None:
                self._retry_failed(tenant, result, 0, retry_soon)
        return result

    def _retry_failed(self, tenant: str, result: RunResult, n: int, delay: float) -> None:
        """Schedule the retry of a failed run at the end of its back-off. The back-off skips the
        regular fires meanwhile, so without it a failed run waited for the first regular fire after
        the back-off: a day on a nightly cron, after a five-minute vendor outage at its hour. Each
        failure in a row doubles the delay (up to MAX_BACKOFF); a success ends the chain, and a
        regular fire after the back-off supersedes a retry still pending (`fire`). `n` 0: the run
        used settings a reload has replaced since; its failure does not count against the new ones."""
        failed = f"failed {n} time(s) in a row" if n else "failed with the settings it started with (reloaded since)"
        if self.stop_event.is_set():  # the worker is stopping: no fire starts any more
            log.warning("tenant %s: %s: %s", tenant, failed, result.error)
            return
        run_at = datetime.now(UTC) + timedelta(seconds=delay)
        log.warning(
            "tenant %s: %s: %s; trying again at %s (in %.0fs)",
            tenant, failed, result.error, run_at.isoformat(timespec="seconds"), delay,
        )  # fmt: skip
        # One retry job per tenant, shared with `_retry_held`: a tenant has at most one retry pending
        # (each is scheduled by the fire before it, when that fire ends).
        self.scheduler.add_job(
            self.fire,
            DateTrigger(run_date=run_at, timezone="UTC"),
            args=[tenant],
            kwargs={"after_failure": True},
            id=_retry_id(tenant),
            name=f"retry sync {tenant}",
            replace_existing=True,
        )

    def _retry_held(self, tenant: str, attempt: int, result: RunResult, due_after: int | None) -> None:
        """Schedule the next try of a fire that found the lease held: a one-off job after a doubling
        delay, at most MAX_LEASE_RETRIES of them and none at or after the next regular fire (which
        is the next try anyway). The retry applies `due_after` like any fire, so if the holder was
        another worker's scheduled run that succeeded, it skips instead of syncing again."""
        if self.stop_event.is_set():
            return
        job = self.scheduler.get_job(tenant)
        next_regular = job.next_run_time if job is not None else None
        delay = self.lease_retry_base * 2**attempt * random.uniform(0.9, 1.1)
        run_at = datetime.now(UTC) + timedelta(seconds=delay)
        if attempt >= MAX_LEASE_RETRIES or next_regular is None or run_at >= next_regular:
            if attempt > 0:  # the first skip was logged at INFO: say how it ended
                log.info(
                    "tenant %s: %s; gave up after %d tries, next regular fire at %s",
                    tenant, result.error, attempt,
                    next_regular.isoformat(timespec="seconds") if next_regular else "-",
                )  # fmt: skip
            else:  # the next regular fire comes sooner than a retry would
                log.debug("tenant %s: %s", tenant, result.error)
            return
        if attempt == 0:  # once per fire, not at every retry
            log.info("tenant %s: %s; this fire is skipped, trying again in %.0fs", tenant, result.error, delay)
        else:
            log.debug("tenant %s: %s; trying again in %.0fs", tenant, result.error, delay)
        self.scheduler.add_job(
            self.fire,
            DateTrigger(run_date=run_at, timezone="UTC"),
            args=[tenant],
            kwargs={"attempt": attempt + 1, "due_after": due_after},
            id=_retry_id(tenant),
            name=f"retry sync {tenant}",
            replace_existing=True,
        )

    def start(self) -> None:
        now = datetime.now(UTC)
        tenants = [name for name, t in self.config.tenants.items() if t.enabled]
        # Which store this worker writes to ($DIRPULL_STORE_URL may override the file's) and why a
        # configured tenant never syncs: nothing in the log said either.
        log.info(
            "worker %s starting: config %s, store %s, %d of %d tenants enabled",
            self.runner.worker, self.config.path, self.store.safe_url, len(tenants), len(self.config.tenants),
        )  # fmt: skip
        for name, t in self.config.tenants.items():
            if not t.enabled:
                log.info("tenant %s (%s) is disabled: not scheduled", name, t.provider)
        for name, broken in self.config.broken.items():  # a mistake in its table: the others run
            log.error("tenant %s is not scheduled: %s", name, broken.message)
        self._seen_run = self._last_seen(tenants)
        missed = self._missed_cron_fires(tenants, now)
        for name in tenants:
            self._add_job(name, now, missed)
        self.scheduler.start()

    def _last_seen(self, tenants: list[str]) -> dict[str, int]:
        """Each tenant's newest run id in the store, as `_seen_run` starts (empty if unreadable)."""
        try:
            last = self.store.last_runs()
            # A run still going at our start is this interval's sync once it ends: counted, so a
            # fire of ours that finds its lease held and retries does not sync the tenant again.
            return {
                name: last[name]["id"] - int(last[name]["status"] == "running") if name in last else 0
                for name in tenants
            }
        except Exception as exc:  # the store blinked: each tenant's first fire just takes the lease
            log.warning("cannot read the last runs (%s): first fires do not check for other workers' runs", exc)
            return {}

    def _add_job(self, name: str, now: datetime, missed: set[str]) -> None:
        schedule = self.config.schedule_of(name)
        # First fire soon, spread out so a restart is not a thundering herd. Except a cron
        # tenant that has not missed a fire: it waits for its cron time ("0 2 * * *" means at
        # 02:00, not whenever the daemon happens to restart; a vendor may allow its reports only
        # at night).
        first_at = (
            None
            if schedule.startswith("cron:") and name not in missed
            else now + timedelta(seconds=first_fire_delay(schedule))
        )
        first = {} if first_at is None else {"next_run_time": first_at}
        self.scheduler.add_job(
            self.fire,
            trigger_for(schedule, first_at),
            args=[name],
            id=name,
            name=f"sync {name}",
            replace_existing=True,
            **first,
        )
        log.info("scheduled tenant %s (%s) every %s", name, self.config.tenants[name].provider, schedule)

    def reload(self) -> None:
        """SIGHUP: read the configuration file again, as `dirpull run` did at start, and apply it
        without interrupting the running syncs. A file that does not load (or has no tenant table
        without a mistake, as `dirpull run` refuses at start) changes nothing: one ERROR line; one
        whose tenants are all disabled is applied, as at start, scheduling none. What only a
        restart can change (the store, the size of the thread pool) is kept as it is, with a
        warning naming it. Tenants added (and enabled) are scheduled as at start; removed,
        disabled or now broken ones unscheduled (a sync of one already running ends normally, not
        retried); a new schedule replaces the tenant's trigger; other settings apply from the
        tenant's next sync, its back-off reset."""
        old = self.config
        try:
            new = load_config(old.path, isolate_tenants=True)
            if not new.tenants:  # as `dirpull run` refuses to start with none
                raise ConfigError(
                    "\n".join(line for b in new.broken.values() for line in b.errors)
                    or f"{new.path}: no tenants configured"
                )
        except ConfigError as exc:
            log.error(
                "configuration not reloaded, the daemon goes on with the one it has: %s",
                "; ".join(str(exc).splitlines()),
            )
            return
        # Read once at start: the store is open (its URL, pool and timeout) and the pool's threads
        # run. Named, never shown: the store URL may hold a password.
        refused = [
            f"store.{key}" for key in type(old.store).model_fields if getattr(old.store, key) != getattr(new.store, key)
        ]
        if new.defaults.max_concurrent_syncs != old.defaults.max_concurrent_syncs:
            refused.append("defaults.max_concurrent_syncs")
        if refused:
            log.warning(
                "configuration reload: %s cannot change while the daemon runs; kept as at start (restart to apply)",
                ", ".join(refused),
            )
            defaults = new.defaults.model_copy(update={"max_concurrent_syncs": old.defaults.max_concurrent_syncs})
            new = new.model_copy(update={"store": old.store, "defaults": defaults})

        before = [name for name, t in old.tenants.items() if t.enabled]
        after = [name for name, t in new.tenants.items() if t.enabled]
        added = [name for name in after if name not in before]
        removed = [name for name in before if name not in after]
        rescheduled = [name for name in after if name in before and old.schedule_of(name) != new.schedule_of(name)]
        changed = [name for name in after if name in before and _settings(old, name) != _settings(new, name)]
        for name, broken in new.broken.items():  # as at start
            log.error("tenant %s is not scheduled: %s", name, broken.message)
        for name in after:  # as `dirpull run` at start: the enabled ones, the others never run
            for problem in new.secret_problems(name):
                log.error("%s (its runs fail until this is fixed; the other tenants sync)", problem)

        with self._lock:
            # At once for every sync that starts from now on; one under way keeps its settings.
            self.config = self.runner.config = new
            for name in removed:
                for job in (name, _retry_id(name)):
                    with contextlib.suppress(JobLookupError):
                        self.scheduler.remove_job(job)
                self._seen_run.pop(name, None)
            for name in [*removed, *changed]:
                # The change may be the fix: the back-off of the old settings does not hold it back.
                self.failures.pop(name, None)
                self.retry_at.pop(name, None)
                self._generation[name] = self._generation.get(name, 0) + 1
            for name in changed:
                # Nor does the retry of its failed run, pending at the end of that back-off (up to an
                # hour): for a cron tenant it is the next fire, the regular one a day away. Soon, as
                # a restarted worker fires a cron tenant whose last run failed.
                job = self.scheduler.get_job(_retry_id(name))
                soon = datetime.now(UTC) + timedelta(seconds=first_fire_delay(new.schedule_of(name)))
                if job is not None and job.kwargs.get("after_failure") and (job.next_run_time or soon) > soon:
                    job.modify(next_run_time=soon)
            for name in rescheduled:
                self.scheduler.reschedule_job(name, trigger=trigger_for(new.schedule_of(name)))
                log.info("rescheduled tenant %s (%s) every %s", name, new.tenants[name].provider, new.schedule_of(name))
        if added or rescheduled:
            now = datetime.now(UTC)
            seen = self._last_seen(added) if added else {}
            # A tenant put on a cron schedule catches up as at start too: one that never synced (its
            # first fire on the old schedule had not come yet) or whose last run failed waited for
            # the new cron time (02:00), where a restart syncs it at once.
            missed = self._missed_cron_fires([*added, *rescheduled], now)
            with self._lock:
                self._seen_run.update(seen)
                for name in added:
                    self._add_job(name, now, missed)
                for name in rescheduled:
                    job = self.scheduler.get_job(name)
                    soon = now + timedelta(seconds=first_fire_delay(new.schedule_of(name)))
                    if name in missed and job is not None and (job.next_run_time or soon) > soon:
                        job.modify(next_run_time=soon)

        def why(name: str) -> str:
            if name in new.broken:
                return f"{name} (configuration error)"
            return f"{name} (disabled)" if name in new.tenants else name

        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("added", added),
                ("removed", [why(name) for name in removed]),
                ("rescheduled", rescheduled),
                ("changed", changed),
            )
            if names
        ]
        log.info("configuration reloaded: %d tenants scheduled (%s)", len(after), "; ".join(parts) or "no change")

    def _missed_cron_fires(self, tenants: list[str], now: datetime) -> set[str]:
        """The cron tenants due for a catch-up: never run, their last run failed, or a cron time
        has passed since their last run started (the daemon was down then). A run cut off before it
        could end (a restart in the middle of it, a killed worker) applied nothing: the run before
        it counts."""
        cron = [name for name in tenants if self.config.schedule_of(name).startswith("cron:")]
        if not cron:
            return set()
        try:
            last = self.store.last_runs()
            for name in cron:
                if name in last and cut_off(last[name]):
                    ended = next((r for r in self.store.runs(name, 20) if not cut_off(r)), None)
                    if ended is None:
                        del last[name]
                    else:
                        last[name] = ended
        except Exception as exc:  # the store blinked: fire them all soon, as if missed
            log.warning("cannot read the last runs (%s): cron tenants sync now", exc)
            return set(cron)
        missed = set()
        for name in cron:
            started = last[name]["started_at"] if name in last else None
            # A failed run was to be retried after its back-off, by a worker that may have been
            # restarted since and forgot the retry: without this, a day without a sync.
            if started is None or last[name]["status"] == "failed":
                missed.add(name)
                continue
            if cron_time_passed(self.config.schedule_of(name), started, now):
                missed.add(name)
        return missed

    def shutdown(self, wait: bool = True) -> None:
        self.stop_event.set()
        SHUTDOWN.set()
        try:
            if self.scheduler.running:
                # The running fires are waited for outside the scheduler's locks: APScheduler's own
                # wait holds its job-store lock, and a fire ending just then with a retry to add
                # (past its stop check as the stop came) waited for that lock: the daemon hung on
                # its stop for good. Stopped first, the scheduler files such a job as pending.
                self.scheduler.shutdown(wait=False)
                if wait:
                    self._executor.shutdown(wait=True)
        finally:
            SHUTDOWN.clear()

    def run_forever(self, until: threading.Event | None = None, max_seconds: float | None = None) -> None:
        """Run until SIGTERM/SIGINT (or `until` is set, or `max_seconds` pass)."""
        # A second signal while the running syncs are awaited exits at once (signals.py).
        with stop_on_signals(until or threading.Event(), force_exit=True) as stop, _hangups() as hangup:
            if stop.is_set():  # asked to stop while starting up: no sync is begun only to be interrupted
                log.info("stopped")
                return
            self.start()
            why = "asked to stop"
            try:
                deadline = None if max_seconds is None else time.monotonic() + max_seconds
                while not stop.wait(0.5):
                    if hangup.is_set():
                        hangup.clear()
                        log.info("SIGHUP: reloading the configuration from %s", self.config.path)
                        try:
                            self.reload()
                        except Exception as exc:  # a reload never stops the daemon and its syncs
                            log.error("configuration reload failed, the daemon goes on: %s", exc)
                    if deadline is not None and time.monotonic() >= deadline:
                        why = f"--max-seconds {max_seconds:g} reached"
                        break
            finally:
                log.info(
                    "stopping (%s): waiting for running syncs to finish or abort (a second SIGTERM or "
                    "Ctrl-C exits at once)", why,
                )  # fmt: skip
                self.shutdown(wait=True)
            # The last line of a daemon's log says it ended cleanly: without it, a log that stops
            # after "stopping" could be a process killed while it waited for its syncs.
            log.info("stopped")


def _retry_id(tenant: str) -> str:
    return f"{tenant} (retry)"


def _settings(config: Config, name: str) -> tuple[Any, ...]:
    """What a tenant's runs use, its schedule aside (a reload compares them): its own settings
    (secrets by their reference or literal value) and what it takes from `[defaults]`."""
    return (
        config.tenants[name].model_copy(update={"schedule": None}),
        config.guard_of(name),
        config.full_sync_every_of(name),
    )


@contextlib.contextmanager
def _hangups() -> Iterator[threading.Event]:
    """SIGHUP, the usual "reload" signal, sets an event the main loop reloads the configuration on
    (`Daemon.reload`), instead of killing the process: by default it ended the daemon at once, its
    running syncs left `running` with their leases held, and under systemd for good
    (Restart=on-failure counts death by SIGHUP as a clean exit)."""
    hangup = threading.Event()
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None or threading.current_thread() is not threading.main_thread():
        yield hangup
        return
    previous = signal.signal(sighup, lambda *_: hangup.set())
    try:
        yield hangup
    finally:
        signal.signal(sighup, previous)
