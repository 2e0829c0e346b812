"""Configuration file → validated settings.

The file is TOML, found at `--config PATH`, else `$DIRPULL_CONFIG`, else `./dirpull.toml`. Every
mistake is reported as `FILE: tenants.NAME.KEY: what is wrong`, never as a traceback. Secret values
may be `env:NAME` or `file:PATH`; they are resolved only when a connector needs them and never
appear in a repr, a log line or an error. One that cannot be read now is not a load error but that
tenant's (`Config.secret_problems`). Loaded with `isolate_tenants` (the CLI does), a mistake inside
one `[tenants.X]` table makes only that tenant broken (`Config.broken`), not the whole load.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dirpull.connectors.mapping import check_path, mapping_root

DEFAULT_CONFIG = "dirpull.toml"
PROVIDERS = ("entra_id", "google_workspace", "okta", "workday", "bamboohr")


class ConfigError(Exception):
    """A configuration mistake, already phrased for the operator."""


# --- secrets -----------------------------------------------------------------------------------


class _Unreadable(Exception):
    """Why a secret file's text cannot be had, phrased to follow its name."""


_NOT_REGULAR = "is not a regular file (a pipe, a socket, a device); name the file that holds it"


def _env_secret(value: str) -> str:
    """An `env:` secret's value without the line break an env file written on Windows leaves at
    its end (`KEY=value\r`: docker's --env-file and systemd's EnvironmentFile keep the `\r`), as a
    `file:` secret's is read: sent with it, the key was refused by the vendor, as though wrong."""
    return value.rstrip("\r\n")


def _secret_file_text(path: Path) -> str:
    """A secret file's text without a byte-order mark (Windows editors write one) or trailing line
    breaks."""
    try:
        if not path.is_file():  # a named pipe with no writer blocked the run (and a daemon worker) on open
            # A file removed (or never there) is not a pipe: the daemon's runs said it was one.
            raise _Unreadable(_NOT_REGULAR if path.exists() else "does not exist")
        raw = path.read_bytes()
    except OSError as exc:  # a key mode 0600 owned by another user than the daemon's
        raise _Unreadable(f"cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:  # e.g. PowerShell's UTF-16; the message would quote a byte of it
        raise _Unreadable("is not UTF-8 text; save it as UTF-8") from None


class SecretRef:
    """A secret given literally, as `env:NAME` or as `file:PATH`. Resolved on each `get()`."""

    __slots__ = ("_base", "_value")

    def __init__(self, value: str, base: Path | None = None) -> None:
        self._value = value
        self._base = base

    @property
    def reference(self) -> str:
        """What the configuration says, safe to show (literal secrets are masked)."""
        if self._value.startswith(("env:", "file:")):
            return self._value
        return "***"

    def mistake(self) -> str | None:
        """What is wrong with the reference itself, on any machine, or None."""
        if self._value == "env:":
            return "env: needs a variable name"
        if self._value == "file:":
            return "file: needs a path"
        if not self._value:
            return "is empty"
        return None

    def check(self) -> str | None:
        """Why the secret cannot be read right now (a mistake, an unset or empty variable, a
        missing or empty file), or None."""
        if problem := self.mistake():
            return problem
        if self._value.startswith("env:"):
            name = self._value[4:]
            if name not in os.environ:
                return f"environment variable {name} is not set"
            if not _env_secret(os.environ[name]):
                return f"environment variable {name} is empty"
        elif self._value.startswith("file:"):
            path = self.path
            try:
                is_dir, is_file = path is not None and path.is_dir(), path is not None and path.is_file()
            except OSError as exc:  # a folder on the way this user may not enter, a name too long
                return f"secret file {self._where()} cannot be examined ({exc.strerror or exc})"
            if is_dir:
                # A mounted secret's folder (/run/secrets/acme) instead of its key's file in it.
                return f"secret file {self._where()} is a directory; name the file that holds the secret"
            if not is_file:
                if path is not None and path.exists():
                    return f"secret file {self._where()} {_NOT_REGULAR}"
                return f"secret file {self._where()} does not exist"
            # Said now, naming the file, tenant and key, as the README promises for a secret that
            # cannot be read: `dirpull sync` exits 2 and the daemon logs it at start. Unreadable
            # or not UTF-8 was passed over, and the run failed (exit 1) instead.
            try:
                text = _secret_file_text(path)
            except _Unreadable as exc:
                return f"secret file {self._where()} {exc}"
            if not text:  # said now, naming the key, not by the vendor's 401
                return f"secret file {self._where()} is empty"
        return None

    def _where(self) -> str:
        """The `file:` path as written, and where it was looked for when that is not the same: a
        relative one is taken from the configuration file's folder, not the current one (the
        systemd unit runs in /var/lib/dirpull, its configuration in /etc/dirpull), so "secret file
        okta.token does not exist" sent the operator to look in the wrong folder."""
        written, path = self._value[5:], self.path
        return written if path is None or str(path) == written else f"{written} ({path})"

    @property
    def path(self) -> Path | None:
        if not self._value.startswith("file:"):
            return None
        p = Path(self._value[5:]).expanduser()
        return p if p.is_absolute() or self._base is None else self._base / p

    def get(self) -> str:
        if self._value.startswith("env:"):
            value = os.environ.get(self._value[4:])
            if value is None:
                raise ConfigError(f"secret {self._value}: environment variable is not set")
            value = _env_secret(value)
            if not value:  # `KEY=` in a unit or a template that left it blank: sent as is, the vendor says 401
                raise ConfigError(f"secret {self._value}: environment variable is empty")
            return value
        if self._value.startswith("file:"):
            assert self.path is not None
            if not (value := self._read_file(self.path)):  # a secret mounted before its content was written
                raise ConfigError(f"secret {self._value}: the file is empty")
            return value
        return self._value

    def _read_file(self, path: Path) -> str:
        try:
            return _secret_file_text(path)
        except _Unreadable as exc:
            raise ConfigError(f"secret {self._value}: {exc}") from None

    def __repr__(self) -> str:
        return f"SecretRef({self.reference!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretRef) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _to_secret(value: Any) -> SecretRef:
    if isinstance(value, SecretRef):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("secret", "must be a string: a literal, env:NAME or file:PATH")
    ref = SecretRef(value, _CONFIG_DIR.get())
    # Only a mistake in the reference fails the load. An unset variable or a missing file is one
    # tenant's trouble (`Config.secret_problems`): the daemon syncs the others meanwhile.
    problem = ref.mistake()
    if problem:
        raise PydanticCustomError("secret", "{problem}", {"problem": problem})
    return ref


class _ConfigDir:
    """The directory of the file being loaded, so `file:` paths are relative to it."""

    value: Path | None = None

    def get(self) -> Path | None:
        return self.value


_CONFIG_DIR = _ConfigDir()

Secret = Annotated[
    Any,
    BeforeValidator(_to_secret),
    PlainSerializer(lambda s: s.reference, return_type=str),
]


# --- schedules and durations --------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A hundred years: far beyond any schedule, yet "last run + duration" stays a valid date and a
# lease's heartbeat interval a valid timeout.
_MAX_DAYS = 36500


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 6h or 1d")
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > _MAX_DAYS * 86400:  # also inf: timedelta() would raise OverflowError
        raise ValueError(f"{text!r} is too long; at most {_MAX_DAYS}d")
    return timedelta(seconds=seconds)


def interval_jitter(schedule: str) -> float:
    """The most an interval tenant's fire may come after its slot (seconds); 0 on a cron schedule.
    A little (10%, at most 30 s) keeps many tenants on the same interval from hitting the store at
    once, and makes workers sharing a store race fairly for each fire."""
    if schedule.startswith("cron:"):
        return 0.0
    return min(30.0, parse_duration(schedule).total_seconds() * 0.1)


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_DAY_TERM = re.compile(r"^(?:(\*)|([A-Za-z0-9]+)(?:-([A-Za-z0-9]+))?)(?:/([0-9]+))?$")


def _crontab_day(text: str) -> int:
    """A crontab weekday: 0 to 7 (both Sunday), or a name (sun … sat: 0 … 6)."""
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text.lower() in _CRON_DAYS:
        return _CRON_DAYS.index(text.lower())
    raise ValueError(f"weekday {text!r}: use 0-7 (0 and 7 are Sunday) or sun, mon, … sat")


def _crontab_weekdays(field: str) -> str:
    """The crontab weekday field as APScheduler's, which names the days: APScheduler 3 counts
    numbers from Monday = 0 (agronholm/apscheduler#286), so crontab's "0" (Sunday) meant Monday,
    "1-5" Tuesday to Saturday, and "7" (Sunday) was refused."""
    if field in ("*", "?"):
        return field
    days: set[int] = set()
    for term in field.split(","):
        m = _CRON_DAY_TERM.match(term)
        if m is None:
            raise ValueError(f"weekday field {field!r}: cannot read {term!r}")
        every, first, last, step = m.groups()
        lo = 0 if every else _crontab_day(first)
        hi = 6 if every or (step and last is None) else _crontab_day(last or first)  # "1/2": 1 to the end
        if hi == 0 and lo > 0:  # "sat-sun": Sunday at the end of the week, as 7
            hi = 7
        if hi < lo:
            raise ValueError(f"weekday range {term!r} goes backwards")
        if step is not None and int(step) == 0:
            raise ValueError(f"weekday step in {term!r} must be positive")
        days.update(d % 7 for d in range(lo, hi + 1, int(step or 1)))
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def cron_trigger(expr: str) -> Any:
    """The APScheduler trigger (UTC) of a crontab expression "minute hour day month weekday", its
    weekdays numbered as in crontab (0 or 7 is Sunday)."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        return CronTrigger.from_crontab(expr, timezone="UTC")  # its own message for a wrong count
    minute, hour, day, month, weekday = fields
    days = _crontab_weekdays(weekday)
    if day.startswith("*") or weekday.startswith("*"):
        return CronTrigger.from_crontab(f"{minute} {hour} {day} {month} {days}", timezone="UTC")
    # Both restricted ("0 2 1 * mon": the 1st and every Monday): crontab fires when either matches,
    # APScheduler only when both do.
    from apscheduler.triggers.combining import OrTrigger

    return OrTrigger([CronTrigger.from_crontab(f"{minute} {hour} {day} {month} *", timezone="UTC"),
                      CronTrigger.from_crontab(f"{minute} {hour} * {month} {days}", timezone="UTC")])  # fmt: skip


def _check_schedule(value: str) -> str:
    if value.startswith("cron:"):
        expr = value[5:].strip()
        try:
            trigger = cron_trigger(expr)
        except ValueError as exc:
            raise ValueError(f"bad cron expression {expr!r}: {exc}") from None
        # "0 0 31 2 *" (February 31st) parses but never fires: the tenant would never sync, while
        # `dirpull status` showed its next run as "now".
        if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
            raise ValueError(f"cron expression {expr!r} never fires (no such date)")
        return value
    parse_duration(value)
    return value


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


# --- settings -----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


MAX_STORE_TIMEOUT = 86_400.0  # seconds


class StoreSettings(_Strict):
    url: str = "sqlite:///dirpull.db"
    pool_size: int = Field(5, ge=1, le=100)
    # At most a day: SQLite waits 3 × this for the write lock, in milliseconds held in a 32-bit
    # busy_timeout, so past ~8 days the wait wrapped round to none at all, and `inf` failed every
    # command with an OverflowError traceback.
    connect_timeout: float = Field(10.0, gt=0, le=MAX_STORE_TIMEOUT)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from dirpull.storage.store import StoreError, parse_store_url

        if v.startswith(("env:", "file:")):
            # A PostgreSQL URL holds the database's password: a secret value, which the contract
            # lets be `env:NAME` or `file:PATH`. It was refused as "not a database URL".
            ref = SecretRef(v, _CONFIG_DIR.get())
            if problem := ref.check():
                raise ValueError(problem)
            v = ref.get()
        try:
            parsed = parse_store_url(v)
        except StoreError as exc:  # phrased without the password
            raise ValueError(str(exc).removeprefix("store url: ")) from None
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
            # Each command (and each run of `dirpull sync`) opened an empty store of its own:
            # syncs succeeded, and every query found nothing.
            raise ValueError(
                f"{v!r} is an in-memory SQLite database, gone when the command ends; name a file "
                "(sqlite:///dirpull.db, sqlite:////var/lib/dirpull/dirpull.db)"
            )
        return v


class GuardSettings(_Strict):
    """Hold a run that would deactivate or delete more than `max_percent` of the tenant's active
    users, reactivate inactive users as many as that share of its active ones, delete that share of
    all its stored users or of its groups, or remove that share of its group memberships, and more
    than `min_count` objects: both must be exceeded (`sync.guard.check`)."""

    max_percent: float = Field(10.0, ge=0, le=100)
    min_count: int = Field(20, ge=0)


class TenantGuard(_Strict):
    """A tenant's `[tenants.X.guard]`: each key it leaves out comes from `[defaults.guard]`
    (`Config.guard_of`), so an operator who raised the floor there keeps it on a tenant that
    only sets its own percentage."""

    max_percent: float | None = Field(None, ge=0, le=100)
    min_count: int | None = Field(None, ge=0)


MIN_LEASE_TTL = timedelta(seconds=1)
# A run's time from its start to its writes, at most: the HTTP timeouts bound each read, not a
# report a vendor (or a proxy) trickles a few bytes a second, which held the run, its thread and the
# tenant's lease for as long as it kept sending, failing nothing and flagging nothing.
DEFAULT_MAX_RUN_TIME = 6 * 3600.0  # seconds
MAX_RUN_TIME = 7 * 86_400.0  # a week, as MAX_RETRY_WAIT


def _run_time_seconds(value: Any) -> Any:
    """`max_run_time` as seconds: a number as given, a duration text ("6h", "90m") converted."""
    if isinstance(value, bool):  # a float field takes `true` as 1 s
        raise PydanticCustomError("run_time", 'must be seconds as a number, or a duration like "6h" or "90m"')
    if isinstance(value, str):
        try:
            return parse_duration(value).total_seconds()
        except ValueError as exc:
            problem = str(exc) if _DURATION.match(value) else f"{exc}; or seconds as a number, without quotes"
            raise PydanticCustomError("run_time", "{problem}", {"problem": problem}) from None
    return value


RunTime = Annotated[float, BeforeValidator(_run_time_seconds)]


class Defaults(_Strict):
    schedule: str = "15m"
    full_sync_every: str = "24h"
    guard: GuardSettings = GuardSettings()
    max_concurrent_syncs: int = Field(4, ge=1, le=64)
    lease_ttl: str = "60s"
    max_run_time: RunTime = Field(DEFAULT_MAX_RUN_TIME, gt=0, le=MAX_RUN_TIME)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return _check_schedule(v)

    @field_validator("full_sync_every")
    @classmethod
    def _duration(cls, v: str) -> str:
        return _check_duration(v)

    @field_validator("lease_ttl")
    @classmethod
    def _lease_ttl(cls, v: str) -> str:
        # The heartbeat renews the lease every lease_ttl / 3 but no more often than every 0.2 s
        # (sync/runner.py): a shorter lease ("0.1s", or "0.0000001s", zero once rounded) expired
        # between renewals, and every run longer than it failed with "lease lost before commit;
        # nothing applied". A second leaves three renewals per lease.
        if parse_duration(v) < MIN_LEASE_TTL:
            raise ValueError(f"{v!r} is too short; at least {MIN_LEASE_TTL.total_seconds():g}s")
        return v


AttributePath = Annotated[str, AfterValidator(check_path)]


def _check_http_url(v: str) -> str:
    # Without a scheme or a host every run of the tenant would fail ("graph.microsoft.us/v1.0"):
    # refused at load, naming the key. https-only rules stay with each connector.
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(v.strip())
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a malformed [IPv6] host, say
        ok = False
    if not ok:
        raise ValueError("must be an http(s) URL, like https://host/path")
    return v.strip()


HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


class TenantBase(_Strict):
    schedule: str | None = None
    # How often a delta-capable provider does a full walk to catch what deltas miss.
    full_sync_every: str | None = None
    guard: TenantGuard | None = None
    # custom_attributes name → provider attribute path (dotted), e.g. cost_center = "organizations.costCenter"
    attributes: dict[str, AttributePath] = Field(default_factory=dict)
    enabled: bool = True
    # Seconds (or "6h") a run may pull and compare before it is cut; None: `[defaults]`'s.
    max_run_time: RunTime | None = Field(None, gt=0, le=MAX_RUN_TIME)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        return None if v is None else _check_schedule(v)

    @field_validator("full_sync_every")
    @classmethod
    def _full(cls, v: str | None) -> str | None:
        return None if v is None else _check_duration(v)


# Waiting of a run, at most: `inf` loaded, and then a vendor's Retry-After of 1e20 was slept as
# given, an OverflowError out of the sleep. A week outlasts any throttling worth waiting out.
MAX_RETRY_WAIT = 7 * 86_400.0  # seconds


class RetryingTenant(TenantBase):
    """A tenant whose connector retries under the shared `RetryPolicy` (connectors/http.py)."""

    # Throttling and outages (429, 5xx, dropped connections): give up after this many attempts per
    # request or this many seconds of waiting in one run, whatever Retry-After says. Only Entra's
    # could be raised: a large Google tenant, whose per-minute quota holds it for more than the
    # fixed 300 s of a run, failed every run with nothing to set. Okta's waits have their own
    # `max_rate_limit_wait`.
    max_retry_attempts: int = Field(6, ge=1, le=20)
    max_retry_wait: float = Field(300.0, gt=0, le=MAX_RETRY_WAIT)


# A response timeout of `inf` (or ~1e10 s and more) loaded, then every run of the tenant failed
# with an OverflowError from the socket or aiohttp's timer: at most a day, far beyond any report.
MAX_HTTP_TIMEOUT = 86_400.0  # seconds
MIN_CHANGED_OVERLAP = 1.0  # seconds: BambooHR's timestamps are to the second


# What a BambooHR pull asks the custom report for, besides manager_field and the attributes' fields.
BAMBOOHR_REPORT_FIELDS = (
    "id", "employeeNumber", "firstName", "lastName", "preferredName", "displayName", "workEmail",
    "homeEmail", "status", "department", "division", "jobTitle", "supervisorEId", "hireDate",
    "terminationDate", "lastChanged",
)  # fmt: skip
# The company's subdomain, the "acme" of acme.bamboohr.com: it goes into every request's path.
_BAMBOOHR_COMPANY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
BAMBOOHR_MAX_REPORT_FIELDS = 400  # the custom report answers 400 over that (directory-apis.md §4.1)


class BambooHRTenant(RetryingTenant):
    provider: Literal["bamboohr"]
    company_domain: str
    api_key: Secret
    api_url: HttpUrl = "https://api.bamboohr.com/api/gateway.php"
    # Which report field names the manager, and what it holds. The reference is unsure whether
    # supervisorEId or supervisorId is the employee id (the other being the employeeNumber).
    manager_field: str = Field("supervisorEId", min_length=1)
    manager_field_holds: Literal["employee_id", "employee_number"] = "employee_id"
    # Employees fetched per custom-report request in an incremental run (filters.employeeIds).
    batch_size: int = Field(200, ge=1, le=5000)
    # Users per yielded page when streaming the full report.
    page_size: int = Field(1000, ge=1, le=100_000)
    # Seconds subtracted from the stored `since` (BambooHR timestamps have second precision).
    changed_overlap: float = Field(1.0, le=86_400)
    timeout: float = Field(120.0, gt=0, le=MAX_HTTP_TIMEOUT)

    @field_validator("company_domain")
    @classmethod
    def _company(cls, v: str) -> str:
        # pydantic's own words were its regex ("String should match pattern '^[A-Za-z0-9]…'"), for
        # what is most often the whole host pasted from the browser's address bar.
        if _BAMBOOHR_COMPANY.fullmatch(v):
            return v
        host = re.sub(r"^[a-z]+://", "", v.strip(), flags=re.IGNORECASE).split("/")[0]
        company = host.split(".")[0]
        if "." in host and _BAMBOOHR_COMPANY.fullmatch(company):
            raise ValueError(f"{v!r} is the whole address; give only the company's part of it: {company!r}")
        raise ValueError(
            f"{v!r} is not a BambooHR company subdomain (the 'acme' of acme.bamboohr.com: letters, digits and '-')"
        )

    @field_validator("changed_overlap")
    @classmethod
    def _overlap(cls, v: float) -> float:
        # `employees/changed?since=` compares whole seconds, strictly: with less than a second of
        # overlap the next run asks `since` = the cursor's own second and never hears of a change
        # made in it after this run's answer.
        if not v >= MIN_CHANGED_OVERLAP:
            raise ValueError(
                f"must be at least {MIN_CHANGED_OVERLAP:g} (seconds: BambooHR's `since` has one-second precision); "
                "with less, a change made in the cursor's second is missed by every later run"
            )
        return v

    def report_fields(self) -> list[str]:
        """The fields every custom report of a pull asks for, each once."""
        extra = [self.manager_field, *(mapping_root(path) for path in self.attributes.values())]
        return list(dict.fromkeys([*BAMBOOHR_REPORT_FIELDS, *extra]))

    @model_validator(mode="after")
    def _report_width(self) -> BambooHRTenant:
        # Over the limit, every run of the tenant failed at its first request, on an HTTP 400.
        asked = len(self.report_fields())
        if asked > BAMBOOHR_MAX_REPORT_FIELDS:
            own = len({*BAMBOOHR_REPORT_FIELDS, self.manager_field})
            raise ValueError(
                f"the custom report would ask for {asked} fields and BambooHR takes at most "
                f"{BAMBOOHR_MAX_REPORT_FIELDS}: map fewer attributes ({own} of them are dirpull's own, "
                "manager_field included)"
            )
        return self


class EntraTenant(RetryingTenant):
    provider: Literal["entra_id"]
    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    client_secret: Secret
    cloud: Literal["global", "usgov", "china"] = "global"
    login_url: HttpUrl | None = None
    graph_url: HttpUrl | None = None
    # Extension attributes to $select, e.g. "extension_abc123_costCenter" or "onPremisesExtensionAttributes".
    extension_attributes: list[str] = Field(default_factory=list)
    # Seconds to wait for one HTTP response.
    timeout: float = Field(60.0, gt=0)


class GoogleTenant(RetryingTenant):
    provider: Literal["google_workspace"]
    credentials_file: Secret
    subject: str = Field(min_length=3)
    customer: str | None = None
    domain: str | None = None
    api_url: HttpUrl | None = None
    org_units: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    member_workers: int = Field(4, ge=1, le=32)

    @field_validator("credentials_file")
    @classmethod
    def _key_or_reference(cls, v: SecretRef) -> SecretRef:
        # A bare path (the key's name says "file") was taken for the key itself: every run failed
        # with "credentials_file ***: not a readable service-account JSON key".
        if v.reference == "***" and not v.get().lstrip().startswith("{"):
            raise ValueError(
                "must be file:PATH (the key's file), env:NAME or the JSON key itself; a path is written file:PATH"
            )
        return v

    @model_validator(mode="after")
    def _customer_or_domain(self) -> GoogleTenant:
        if self.customer and self.domain:
            raise ValueError("give customer or domain, not both")
        return self


DEFAULT_SCOPES = ("okta.users.read", "okta.groups.read")
MIN_CURSOR_HOLDBACK = 0.001  # seconds: Okta's timestamps are to the millisecond
MAX_CURSOR_HOLDBACK = 86_400.0
LOGS_SCOPE = "okta.logs.read"


class OktaTenant(TenantBase):
    provider: Literal["okta"]
    org_url: str = Field(min_length=8)
    api_token: Secret | None = None
    client_id: str | None = None
    private_key: Secret | None = None
    scopes: list[str] = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    # The OAuth app "Requires Demonstrating Proof of Possession (DPoP)": DPoP-bound tokens (RFC 9449).
    dpop: bool = False
    include_everyone: bool = False
    poll_system_log: bool = False
    rate_limit_reserve: float = Field(0.30, ge=0, lt=1)
    max_rate_limit_wait: float = Field(300.0, gt=0, le=MAX_RETRY_WAIT)
    # Incremental cursors stay this many seconds behind the newest lastUpdated seen (Okta's lists
    # are eventually consistent); records in that window are re-read and de-duplicated by the diff.
    cursor_holdback: float = 300.0
    # Okta statuses mapped to inactive; SUSPENDED and DEPROVISIONED always are.
    inactive_statuses: list[
        Literal[
            "STAGED", "PROVISIONED", "RECOVERY", "PASSWORD_EXPIRED", "LOCKED_OUT",
            "SUSPENDED", "DEPROVISIONED",
        ]
    ] = Field(default_factory=lambda: ["STAGED", "SUSPENDED", "DEPROVISIONED"])
    page_size: int = Field(200, ge=1, le=200)
    request_timeout: float = Field(60.0, gt=0, le=MAX_HTTP_TIMEOUT)
    # First wait of the exponential backoff used when Okta gives no X-Rate-Limit-Reset (and for 5xx).
    backoff_base: float = Field(1.0, gt=0)

    @field_validator("org_url")
    @classmethod
    def _org_url(cls, v: str) -> str:
        from ipaddress import ip_address
        from urllib.parse import urlsplit

        parts = urlsplit(v.strip())
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError("must look like https://YOUR-ORG.okta.com")
        if parts.path.strip("/") or parts.query:  # the connector refuses it: every run would fail
            raise ValueError("must be the bare org URL, without a path (https://YOUR-ORG.okta.com)")
        if parts.scheme == "http":
            try:
                loopback = host == "localhost" or ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    "must use https:// (http:// is allowed only for a local emulator on a loopback address: "
                    "127.0.0.1, ::1, localhost)"
                )
        return v.strip().rstrip("/")

    @field_validator("cursor_holdback")
    @classmethod
    def _holdback(cls, v: float) -> float:
        # The next run asks `lastUpdated gt CURSOR`, to the millisecond: a cursor less than one
        # behind the run's start (or the newest change seen) skips, for good, a change made in that
        # very millisecond to a record on a page already read. `not >=` also refuses NaN.
        if not v >= MIN_CURSOR_HOLDBACK:
            raise ValueError(
                f"must be at least {MIN_CURSOR_HOLDBACK} (seconds: one millisecond, the precision of Okta's "
                "lastUpdated); with less, a change made in the cursor's millisecond is skipped by every later run"
            )
        if v > MAX_CURSOR_HOLDBACK:  # inf loaded, then failed every run with an OverflowError
            raise ValueError(
                f"must be at most {MAX_CURSOR_HOLDBACK:g} (seconds: a day, re-read by every incremental run)"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _logs_scope(cls, data: Any) -> Any:
        # System Log polling reads /api/v1/logs: the default scopes include what it needs.
        oauth = isinstance(data, dict) and bool(data.get("client_id"))
        if oauth and data.get("poll_system_log") is True and "scopes" not in data:
            return {**data, "scopes": [*DEFAULT_SCOPES, LOGS_SCOPE]}
        return data

    @model_validator(mode="after")
    def _auth(self) -> OktaTenant:
        if self.api_token is None and not (self.client_id and self.private_key is not None):
            raise ValueError("give api_token, or client_id and private_key (OAuth service app)")
        if self.api_token is not None and (self.client_id or self.private_key is not None):
            # A private_key beside api_token (client_id forgotten) was silently unused: the
            # operator meant OAuth, and the run used the token.
            raise ValueError("give api_token or client_id/private_key, not both")
        if self.dpop and self.api_token is not None:
            # DPoP binds OAuth access tokens; an API token has none: the setting would do nothing.
            raise ValueError("dpop applies to OAuth service apps (client_id and private_key), not to api_token")
        if self.client_id and self.poll_system_log and LOGS_SCOPE not in self.scopes:
            # The token would lack it: every run would fail with a 403 on /api/v1/logs.
            raise ValueError(f"poll_system_log needs the {LOGS_SCOPE} scope: add it to scopes")
        return self


class WorkdayTenant(RetryingTenant):
    provider: Literal["workday"]
    users_report_url: HttpUrl
    groups_report_url: HttpUrl | None = None
    prompts: dict[str, str] = Field(default_factory=dict)
    # Empty (a template's value that came out blank), each run sent it and failed on Workday's 401.
    username: str | None = Field(None, min_length=1)
    password: Secret | None = None
    token_url: HttpUrl | None = None
    client_id: str | None = Field(None, min_length=1)
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    fields: dict[str, str] = Field(default_factory=dict)
    group_column: str | None = None
    timeout: float = Field(300.0, gt=0, le=MAX_HTTP_TIMEOUT)
    # Whose "today" the `{today}` prompt and the termination dates are read against: an IANA zone
    # (the company's), or unset for the worker's local date. Workers in different zones sharing
    # one store each flipped a worker's state on the day they disagreed on.
    timezone: str | None = Field(None, min_length=1)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        # OSError: a folder of the zone database ("America", a region without its city), which
        # ZoneInfo opens as a file; it came out of the load as a traceback.
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown time zone {v!r}: an IANA name such as \"America/New_York\" or \"UTC\"") from None
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        # A misspelled field name would otherwise load fine and fail every run of the tenant.
        if not v:
            return v
        from dirpull.connectors.workday import _FIELD_SYNONYMS, DEFAULT_COLUMNS

        unknown = sorted(k for k in v if _FIELD_SYNONYMS.get(k, k) not in DEFAULT_COLUMNS)
        if unknown:
            known = sorted({*DEFAULT_COLUMNS, *_FIELD_SYNONYMS})
            raise ValueError(f"unknown field name(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _auth(self) -> WorkdayTenant:
        basic = self.username is not None and self.password is not None
        oauth = {
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": self.refresh_token,
        }
        missing = [key for key, value in oauth.items() if value is None]
        if 0 < len(missing) < len(oauth):
            # Beside username/password a partial set was ignored (Basic wins): an operator moving
            # to OAuth who left a key out went on using the password without being told.
            raise ValueError(
                "OAuth needs token_url, client_id, client_secret and refresh_token together; "
                f"missing: {', '.join(missing)}"
                + ("; or leave them all out to use username and password" if basic else "")
            )
        if not basic and missing:
            raise ValueError(
                "give username and password, or token_url, client_id, client_secret and refresh_token"
            )
        return self


TenantSettings = Annotated[
    BambooHRTenant | EntraTenant | GoogleTenant | OktaTenant | WorkdayTenant,
    Field(discriminator="provider"),
]

# Each provider's tenant model, by its `provider` tag: taken from the union, so no second list.
_TENANT_MODELS: dict[str, type[TenantBase]] = {
    get_args(model.model_fields["provider"].annotation)[0]: model for model in get_args(get_args(TenantSettings)[0])
}

_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _tenant_id_problem(name: str) -> str | None:
    # fullmatch: `$` also matches before a final line break, and `[tenants."acme\n"]` was a tenant
    # whose id broke every line naming it (`unknown tenant 'acme' (known: acme⏎, b)`).
    if _TENANT_ID.fullmatch(name):
        return None
    # Said as it is: an id of the right characters that is too long, or starts with '-', '_' or
    # '.', was told to "use letters, digits, '-', '_' or '.'", which it did.
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return f"tenant id {name!r}: use letters, digits, '-', '_' or '.'"
    if name[0] in "-_.":
        return f"tenant id {name!r}: must start with a letter or a digit"
    return f"tenant id {name!r}: too long ({len(name)} characters; at most 63)"


@dataclass(frozen=True)
class BrokenTenant:
    """A `[tenants.X]` table with a mistake, kept out of `Config.tenants` so the others still run.
    `errors`: the lines a strict load reports for it (`FILE: tenants.X.KEY: what is wrong`, never a
    secret value); `provider`: the table's, when it names a known one."""

    errors: tuple[str, ...]
    provider: str | None = None

    @property
    def message(self) -> str:
        """The errors on one line (a log line, a cell of `dirpull status`)."""
        return "; ".join(self.errors)


class Config(_Strict):
    store: StoreSettings = StoreSettings()
    defaults: Defaults = Defaults()
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    path: Path | None = Field(None, exclude=True)
    # Not a field: no key of the file can set it (`parse_config(isolate_tenants=True)` fills it).
    _broken: dict[str, BrokenTenant] = PrivateAttr(default_factory=dict)

    @property
    def broken(self) -> dict[str, BrokenTenant]:
        """The tenants whose table has a mistake, by id: not in `tenants`, so not synced."""
        return self._broken

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenant_ids(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for name in v:
                if problem := _tenant_id_problem(name):
                    raise ValueError(problem)
        return v

    def tenant(self, name: str) -> TenantSettings:
        try:
            return self.tenants[name]
        except KeyError:
            if name in self.broken:  # configured, but its table has a mistake: say which
                raise ConfigError("\n".join(self.broken[name].errors)) from None
            known = ", ".join(sorted(self.tenants)) or "none configured"
            raise ConfigError(f"unknown tenant {name!r} (known: {known})") from None

    def secret_problems(self, name: str) -> list[str]:
        """Why this tenant's secrets cannot be read now, as `FILE: tenants.NAME.KEY: problem`
        lines. Not a load error: the daemon syncs the other tenants, and this one's runs fail with
        the same cause until it is fixed (a `file:` secret that appears is read at the next run)."""
        settings = self.tenant(name)
        return [
            f"{self.path}: tenants.{name}.{key}: {problem}"
            for key in type(settings).model_fields
            if isinstance(ref := getattr(settings, key), SecretRef) and (problem := ref.check())
        ]

    def schedule_of(self, name: str) -> str:
        return self.tenants[name].schedule or self.defaults.schedule

    def guard_of(self, name: str) -> GuardSettings:
        """The tenant's thresholds, key by key: its own, else `[defaults.guard]`'s, else built in."""
        own = self.tenants[name].guard
        if own is None:
            return self.defaults.guard
        return self.defaults.guard.model_copy(update=own.model_dump(exclude_none=True))

    def full_sync_every_of(self, name: str) -> timedelta:
        return parse_duration(self.tenants[name].full_sync_every or self.defaults.full_sync_every)

    def max_run_time_of(self, name: str) -> float:
        """Seconds the tenant's run may take before its writes: its own, else `[defaults]`'s."""
        own = self.tenants[name].max_run_time
        return self.defaults.max_run_time if own is None else own


def _format_errors(path: Path, exc: ValidationError, *, url_from_env: bool = False) -> str:
    return "\n".join(_error_lines(path, exc.errors(), url_from_env=url_from_env))


def _error_lines(path: Path, errors: Any, *, url_from_env: bool = False) -> list[str]:
    lines = []
    for err in errors:
        loc = [str(p) for p in err["loc"]]
        # The discriminated union puts the provider name in the location: drop it.
        if len(loc) >= 3 and loc[0] == "tenants" and loc[2] in PROVIDERS:
            del loc[2]
        where = ".".join(loc) if loc else "(top level)"
        if url_from_env and where == "store.url":
            where = "store.url (from $DIRPULL_STORE_URL)"
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":
            # The value given (never a secret), as the TOML has it: "okta " or "Okta" is then seen.
            given = err["input"].get("provider") if isinstance(err["input"], dict) else None
            msg = f"unknown provider {given!r}; use one of: {', '.join(PROVIDERS)}"
        elif err["type"] == "union_tag_not_found":
            msg = f"provider is missing; use one of: {', '.join(PROVIDERS)}"
            # The union fails before the table's keys are checked: `providr` is reported nowhere else.
            keys = [k for k in err["input"] if isinstance(k, str)] if isinstance(err["input"], dict) else []
            if typo := _closest("provider", keys):
                msg = f"provider is missing (is {typo!r} a misspelling of it?); use one of: {', '.join(PROVIDERS)}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
            if match := _closest(str(err["loc"][-1]), _known_keys(err["loc"])):
                msg += f"; did you mean {match}?"
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"must be a table ([{where}])"
        elif err["type"] == "string_type" and _is_duration_key(err["loc"]):
            # `lease_ttl = 60`, as `timeout` and `cursor_holdback` take seconds as a number: the
            # unit is what is missing, which "Input should be a valid string" did not say.
            given = err["input"]
            msg = 'must be a duration in quotes: "30s", "15m", "6h" or "1d"'
            if loc[-1] == "schedule":
                msg += ', or "cron: …"'
            # Only for a number that is a duration once given a unit: `-5`, `0` or `inf` was told to
            # write "-5s", "0s" or "infs", each refused in turn.
            if isinstance(given, int | float) and not isinstance(given, bool) and 0 < given < float("inf"):
                units = ", ".join(f'"{given}{u}"' for u in "smh")
                msg = f'{given} has no unit: write it in quotes with one, {units} or "{given}d"'
                if loc[-1] == "schedule":
                    msg += ', or "cron: …"'
        elif err["type"] in ("float_parsing", "int_parsing") and isinstance(err["input"], str):
            msg = _not_a_number(loc[-1], err["input"], integer=err["type"] == "int_parsing")
        elif err["type"] == "list_type" and isinstance(err["input"], str):
            # `org_units = "/Engineering"`: "Input should be a valid list" did not say what a list is.
            msg = f"must be a list, in brackets: {loc[-1]} = [{json.dumps(err['input'], ensure_ascii=False)}]"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{path}: {where}: {msg}")
    return lines


_DURATION_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", re.IGNORECASE)


def _not_a_number(key: str, given: str, *, integer: bool) -> str:
    """A number written as text: `timeout = "2m"`, as `schedule` and `lease_ttl` take "2m", where
    pydantic said "Input should be a valid number, unable to parse string as a number"."""
    kind = "a whole number" if integer else "a number"
    if not integer and (m := _DURATION_TEXT.fullmatch(given)):
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2).lower()]
        return f"{given!r} is not a number: this key takes seconds, without quotes or a unit: {key} = {seconds:g}"
    return f"{given!r} is not {kind}: write {kind}, without quotes"


# Keys whose value is a duration string ("60s"): a bare number there is a common mistake.
_DURATION_KEYS = ("schedule", "full_sync_every", "lease_ttl")


def _is_duration_key(loc: tuple[Any, ...]) -> bool:
    """`[defaults]`'s or a tenant's own key (not one in a table of it, such as Workday's prompts)."""
    # A tenant's: ("tenants", its id, its provider, the key).
    own = (len(loc) == 2 and loc[0] == "defaults") or (len(loc) == 4 and loc[0] == "tenants")
    return own and loc[-1] in _DURATION_KEYS


def _closest(key: str, known: list[str]) -> str | None:
    """The known key `key` is most likely a misspelling of, or None (only keys are ever shown)."""
    if match := next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.8)), None):
        return match
    # difflib's ratio is too strict for a short key: `ulr` (two letters swapped) or `urk` (one
    # off) scores 0.67 against `url`. One slip of the kind a typist makes is a match there; a
    # key of one or two letters is too short to tell a slip from another word.
    if len(key) < 3:
        return None
    return next((k for k in known if _one_slip(key, k)), None)


def _one_slip(a: str, b: str) -> bool:
    """`a` and `b` differ by one letter added, dropped or changed, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (
            len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
        )
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((i for i in range(len(short)) if short[i] != long[i]), len(short))
    return short[i:] == long[i + 1 :]


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the table holding `loc`'s last key may have: its model's fields (a tenant's are its
    provider's, the discriminated union's tag being `loc[2]`). Empty when that is not known."""
    model: Any = Config
    parts = list(loc[:-1])
    if parts[:1] == ["tenants"]:
        if len(parts) < 3 or parts[2] not in _TENANT_MODELS:
            return []
        model, parts = _TENANT_MODELS[parts[2]], parts[3:]
    for part in parts:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        # `TenantGuard | None` → TenantGuard; a dict or a list has no known keys.
        model = next((a for a in get_args(field.annotation) or (field.annotation,)
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)  # fmt: skip
        if model is None:
            return []
    # `path` is not a key of the file: parse_config sets it.
    return [name for name, f in model.model_fields.items() if not f.exclude]


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or os.environ.get("DIRPULL_CONFIG") or DEFAULT_CONFIG)


def load_config(explicit: str | os.PathLike[str] | None = None, *, isolate_tenants: bool = False) -> Config:
    named = os.environ.get("DIRPULL_CONFIG")
    if not explicit and named is not None and not named.strip():
        # As $DIRPULL_STORE_URL: a templated unit whose value came out empty read ./dirpull.toml
        # from wherever the process started, another deployment's tenants and store, without a word.
        raise ConfigError(
            f"$DIRPULL_CONFIG is set but empty; give it the configuration file's path, or unset it to use "
            f"./{DEFAULT_CONFIG}"
        )
    path = config_path(explicit)
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not a TOML syntax error.
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (use --config PATH or set DIRPULL_CONFIG; "
            "see config/dirpull.example.toml)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(raw, path, isolate_tenants=isolate_tenants)


def parse_config(raw: dict[str, Any], path: Path, *, isolate_tenants: bool = False) -> Config:
    """The validated configuration; a mistake raises ConfigError listing every one. With
    `isolate_tenants`, a mistake inside one `[tenants.X]` table (a bad or unknown key, schedule or
    secret reference) makes that tenant broken (`Config.broken`) instead: the daemon syncs the
    others. Mistakes outside the tenant tables still fail the load."""
    store_url = os.environ.get("DIRPULL_STORE_URL")
    if store_url is not None and not store_url.strip():
        # Most likely a deployment mistake (a templated unit or secrets file whose value came out
        # empty): ignored, the file's URL (or the default ./dirpull.db) was used without a word,
        # a new empty store where the real one was meant.
        raise ConfigError(
            f"{path}: store.url (from $DIRPULL_STORE_URL): the variable is set but empty; give it the "
            "store's URL, or unset it to use the file's store.url"
        )
    from_env = bool(store_url) and isinstance(raw.get("store", {}), dict)  # anything else is reported below
    if from_env:
        raw = {**raw, "store": {**raw.get("store", {}), "url": store_url}}
    stray_path: list[str] = []
    if "path" in raw:
        # Config's `path` is where the file was read from, set below: a `path = …` line of the file
        # was overwritten without a word, where any other unknown top-level key fails the load.
        raw = {k: v for k, v in raw.items() if k != "path"}
        stray_path = [f'{path}: path: unknown key; the store\'s file goes in [store] url = "sqlite:///PATH"']
    broken: dict[str, BrokenTenant] = {}
    tables = raw.get("tenants")
    order = list(tables) if isinstance(tables, dict) else []
    if isolate_tenants and isinstance(tables, dict):
        for name in tables:
            if problem := _tenant_id_problem(name):
                broken[name] = BrokenTenant((f"{path}: tenants: {problem}",), _provider_of(tables[name]))
        raw = {**raw, "tenants": {k: v for k, v in tables.items() if k not in broken}}
    _CONFIG_DIR.value = path.resolve().parent
    try:
        try:
            cfg = Config.model_validate({**raw, "path": path})
        except ValidationError as exc:
            mine = _tenant_errors(exc.errors()) if isolate_tenants else None
            if mine is None:  # every mistake listed, the bad tenant ids set aside above too
                lines = [*_error_lines(path, exc.errors(), url_from_env=from_env), *stray_path]
                raise ConfigError("\n".join([*lines, *(line for b in broken.values() for line in b.errors)])) from None
            tables = raw["tenants"]
            for name, errs in mine.items():
                broken[name] = BrokenTenant(tuple(_error_lines(path, errs)), _provider_of(tables[name]))
            rest = {**raw, "tenants": {k: v for k, v in tables.items() if k not in broken}, "path": path}
            try:
                cfg = Config.model_validate(rest)
            except ValidationError as again:  # not expected: a mistake that only showed without them
                raise ConfigError(_format_errors(path, again, url_from_env=from_env)) from None
    finally:
        _CONFIG_DIR.value = None
    if stray_path:
        raise ConfigError("\n".join(stray_path))
    for name, t in list(cfg.tenants.items()):
        # A System Log position keeps the `since` of the full sync that took it; Okta refuses one
        # older than 180 days and keeps 90 days of events: with rarer full syncs, incrementals
        # would restart polling from "now" and skip what happened in between.
        if isinstance(t, OktaTenant) and t.poll_system_log and cfg.full_sync_every_of(name) > timedelta(days=90):
            problem = (f"{path}: tenants.{name}.full_sync_every: with poll_system_log at most 90d "
                       "(the System Log keeps 90 days)")  # fmt: skip
            if not isolate_tenants:
                raise ConfigError(problem)
            broken[name] = BrokenTenant((problem,), t.provider)
    if broken:
        cfg = cfg.model_copy(update={"tenants": {k: v for k, v in cfg.tenants.items() if k not in broken}})
        # In the file's order, as the errors of a strict load.
        cfg._broken.update({k: broken[k] for k in order if k in broken})
    return cfg


def _tenant_errors(errors: Any) -> dict[str, list[Any]] | None:
    """The validation errors by the tenant whose table holds them; None if any is outside the
    tenant tables (in `[store]`, `[defaults]`, a top-level key, `tenants` itself), which fails
    the whole load."""
    by_tenant: dict[str, list[Any]] = {}
    for err in errors:
        loc = err["loc"]
        if len(loc) < 2 or loc[0] != "tenants" or not isinstance(loc[1], str):
            return None
        by_tenant.setdefault(loc[1], []).append(err)
    return by_tenant


def _provider_of(table: Any) -> str | None:
    provider = table.get("provider") if isinstance(table, dict) else None
    return provider if provider in PROVIDERS else None
