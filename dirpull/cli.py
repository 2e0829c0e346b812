"""The `dirpull` command. Thin: parse options, call the runner/store, print.

Exit codes: 0 ok · 1 failed · 2 bad usage, configuration or unknown tenant · 3 held by the guard
(`sync --dry-run`: would be held) · 141 stdout (or stderr) closed by its reader (`… | head -1`).
`--json` prints JSON Lines on stdout and nothing else there; messages go to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dirpull import logs
from dirpull.config import Config, ConfigError, load_config
from dirpull.model import in_contract_order
from dirpull.storage.store import Store, StoreError, WriteSet
from dirpull.sync import guard

# click's UsageError, found through Typer's public BadParameter: Typer ≥ 0.22 carries its own copy
# of click (typer._click), older ones use the click package.
UsageError: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `dirpull` alone: click prints the help
            raise
        where = exc.ctx.command_path if exc.ctx is not None else "dirpull"
        misplaced = _misplaced_global_option(exc)
        if misplaced is not None:
            raise fail(misplaced, exc.exit_code) from None
        # Typer's validation of a choice (`--state gone`) words it as pydantic does, "Value error, …":
        # the words are for the operator, the prefix is the library's.
        message = exc.format_message().replace(": Value error, ", ": ", 1)
        raise fail(f"{message} (see '{where} --help')", exc.exit_code) from None


def _misplaced_global_option(exc: Exception) -> str | None:
    """`dirpull status -c dirpull.toml`: "No such option: -c" read as if dirpull had no such
    option at all, when it only has to come before the command."""
    option = getattr(exc, "option_name", None)
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ != "NoSuchOption" or not option or ctx is None or ctx.parent is None:
        return None
    root = ctx.find_root()
    if not any(option in p.opts or option in p.secondary_opts for p in root.command.params):
        return None
    command = ctx.command_path[len(root.command_path) :].strip()
    return (
        f"{option} is a global option: give it before the command, `{root.command_path} {option} … {command} …`"
        f" (see '{root.command_path} --help')"
    )


# 128 + SIGPIPE: what a shell shows for a command killed by SIGPIPE, as `cat` or `grep` are when
# the reader of their output exits early.
CLOSED_PIPE_EXIT = 141


@contextlib.contextmanager
def _quiet_exit_on_a_closed_pipe() -> Iterator[None]:
    """The reader of the output went away (`dirpull users T --json | head -1`): exit 141, printing
    nothing. Python ignores SIGPIPE, so the write raised BrokenPipeError instead of the process
    ending as `cat` does, and click turned it into exit 1, the code of "no store"."""
    try:
        yield
    except BrokenPipeError:
        # What is still buffered would be flushed again at interpreter exit, failing with
        # "Exception ignored … BrokenPipeError" on stderr and exit 120: both streams go to
        # /dev/null instead, as the Python docs' "Note on SIGPIPE" does for stdout (stderr may be
        # the same pipe, `2>&1 | head`). Nothing more is said: the process ends here.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):  # replaced or closed
                os.dup2(devnull, stream.fileno())
        raise typer.Exit(CLOSED_PIPE_EXIT) from None


class _Group(TyperGroup):
    """A bad option, argument or command: one line `dirpull: ...` on stderr and exit 2, instead of
    click's usage block or Typer's Rich box. Sub-commands' mistakes surface through invoke()."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _quiet_exit_on_a_closed_pipe(), _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Pull users, groups and memberships from directory APIs into one store with an event log.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Store schema: check and migrate.", no_args_is_help=True)
app.add_typer(db_app, name="db")

log = logging.getLogger("dirpull")


class _Opts:
    config: str | None = None


OPTS = _Opts()


# The stores' BIGINT: a larger --after or --limit is a bad option (exit 2), not an OverflowError
# from the database driver.
MAX_INT = 2**63 - 1
# Any longer and a wait or a deadline overflows what the clock and the thread waits take.
MAX_SECONDS = 10 * 365 * 86400.0


class StateFilter(StrEnum):
    active = "active"
    inactive = "inactive"


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(logs.last_word(message), err=True)
    return typer.Exit(code)


@app.callback()
def main_options(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="Configuration file (default $DIRPULL_CONFIG, else ./dirpull.toml)."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option("--log-format", help="text or json.")] = "text",
) -> None:
    log_format = log_format.lower()  # as --log-level: JSON in a unit file is what the operator meant
    logs.set_format(log_format if log_format == "json" else "text")  # this command's errors are said so
    if log_format not in ("text", "json"):
        raise fail("--log-format must be text or json")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise fail("--log-level must be debug, info, warning or error")
    if config is not None and not config.strip():
        # As an empty $DIRPULL_CONFIG: `--config "$CFG"` in a unit or script whose variable came
        # out empty read $DIRPULL_CONFIG or ./dirpull.toml, another deployment's, without a word.
        raise fail("--config is empty; give the configuration file's path, or leave the option out to use "
                   "$DIRPULL_CONFIG or ./dirpull.toml")  # fmt: skip
    OPTS.config = config
    logs.setup(log_level, log_format)


def _config() -> Config:
    try:
        # A mistake in one tenant's table makes that tenant broken, not every command unusable:
        # each command below says what it means for it (`Config.broken`).
        return load_config(OPTS.config, isolate_tenants=True)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def _warn_broken(config: Config, names: Iterable[str]) -> None:
    """One line on stderr per named tenant whose table has a mistake."""
    for name in names:
        if (broken := config.broken.get(name)) is not None:
            typer.echo(f"dirpull: warning: tenant {name} is not synced until its configuration is fixed: "
                       f"{broken.message}", err=True)  # fmt: skip


def _store(config: Config, *, create: bool = True, syncs: int = 1, reading: bool = False) -> Store:
    """The configured store, its pool holding enough connections for `syncs` syncs at once.
    `reading`: a command that only reads refuses a SQLite file that is not there instead of
    creating one (run from the wrong folder, a relative URL made a stray empty store there and
    the command printed nothing, as if the real store were empty), and a database without
    dirpull's schema instead of migrating it (a PostgreSQL URL naming the wrong database)."""
    if reading:
        _refuse_missing_sqlite(config.store.url)
    # A sync holds up to two connections for as long as it writes (its applying transaction and,
    # on PostgreSQL, the lease heartbeat waiting for that transaction's lock on the lease row), and
    # the pool opens up to twice pool_size. `dirpull run` with more syncs at once than pool_size
    # (max_concurrent_syncs = 16, the default pool_size = 5) left the syncs beyond the first five
    # applying waiting for a connection, and after connect_timeout they failed.
    pool_size = max(config.store.pool_size, syncs)
    try:
        store = Store(config.store.url, pool_size=pool_size, connect_timeout=config.store.connect_timeout)
        if reading and store.schema_state()[0] is None:
            # Migrated here, an empty database (the wrong one named, or a SQLite file left empty)
            # got every table and the command printed nothing, as if the real store were empty.
            store.close()
            raise fail(
                f"no store at {store.safe_url}: the database has no dirpull schema; nothing created "
                "(`dirpull sync` or `dirpull db upgrade` makes one)",
                1,
            )
        store.ensure_schema(create_if_empty=create)
        return store
    except StoreError as exc:
        raise fail(str(exc), 1) from None


def _missing_sqlite(url: str) -> str | None:
    """A SQLite store's file that is not there: its path, and for a relative URL which folder it
    was looked for in. None for a store that exists (or is not a SQLite file)."""
    from dirpull.storage.store import missing_sqlite_file, parse_store_url

    if (missing := missing_sqlite_file(url)) is None:
        return None
    database = parse_store_url(url).database or ""
    if not os.path.isabs(database):
        return f"{missing} (the store url's {database} is relative to the current folder, {os.getcwd()})"
    return missing


def _no_store_yet(config: Config) -> str | None:
    """Where a dry run finds no store to plan against: a SQLite file that is not there, or a
    database with no tables at all (one holding another application's is refused as a sync
    refuses it). None when there is a store."""
    if (missing := _missing_sqlite(config.store.url)) is not None:
        return missing
    try:
        store = Store(config.store.url, pool_size=1, connect_timeout=config.store.connect_timeout)
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    try:
        if store.schema_state()[0] is None and not store.holds_other_tables():
            return f"{store.safe_url} (the database has no dirpull schema)"
        return None
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    finally:
        store.close()


def _refuse_missing_sqlite(url: str) -> None:
    if (missing := _missing_sqlite(url)) is None:
        return
    # Exit 1, as for a store that cannot be opened: nothing was read.
    raise fail(f"no store at {missing}; nothing created (`dirpull sync` or `dirpull db upgrade` makes one)", 1)


def _configured(config: Config, tenant: str) -> bool:
    return tenant in config.tenants or tenant in config.broken


def _unknown_tenant(config: Config, tenant: str) -> typer.Exit:
    known = ", ".join(sorted([*config.tenants, *config.broken])) or "none configured"
    return fail(f"unknown tenant {tenant!r} (known: {known})")


def _tenant(config: Config, tenant: str) -> None:
    """Refuse a tenant the configuration does not name. One whose table has a mistake is named:
    its data is still in the store, so the query commands read it (saying why it is not synced)."""
    if not _configured(config, tenant):
        raise _unknown_tenant(config, tenant)
    _warn_broken(config, [tenant])


def _has_store(config: Config) -> bool:
    """Whether there is a store with dirpull's schema: not a SQLite file missing, nor an empty
    database. A store that cannot be opened is one line and exit 1, as for every command."""
    if _missing_sqlite(config.store.url) is not None:
        return False
    try:
        with contextlib.closing(Store(config.store.url, connect_timeout=config.store.connect_timeout)) as probe:
            return probe.schema_state()[0] is not None
    except StoreError as exc:
        raise fail(str(exc), 1) from None


def _query_store(config: Config, tenant: str) -> Store:
    """The store, for a query command about `tenant`. A tenant removed from the configuration (a
    customer offboarded) is still served while the store holds it: before, it was an unknown tenant,
    exit 2, and a consumer could not drain its last events nor an operator look at its runs. Only
    a tenant neither configured nor in the store is refused, as before."""
    if _configured(config, tenant):
        _tenant(config, tenant)
        return _store(config, reading=True)
    if not _has_store(config):  # nothing is known of it anywhere: a typo, as before
        raise _unknown_tenant(config, tenant)
    store = _store(config, reading=True)
    if not store.tenant_exists(tenant):
        store.close()
        raise _unknown_tenant(config, tenant)
    where = f" {config.path}" if config.path else ""
    typer.echo(f"dirpull: note: tenant {tenant} is not in the configuration{where}; showing what the store holds of it",
               err=True)  # fmt: skip
    return store


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        v = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return v.isoformat(timespec="microseconds").replace("+00:00", "Z")  # as the store's (`store._iso`)
    return str(value)


def _utf8(stream: Any) -> bool:
    return str(getattr(stream, "encoding", "") or "").lower().replace("-", "").replace("_", "") == "utf8"


def _jsonl(rows: Iterable[dict[str, Any]]) -> None:
    out = sys.stdout
    # Where stdout is not UTF-8 (PYTHONIOENCODING=latin-1, a Latin-1 locale), a name in another
    # script raised UnicodeEncodeError halfway through the output: escaped, it is the same JSON.
    ascii_only = not _utf8(out)
    for row in rows:
        line = json.dumps(row, ensure_ascii=ascii_only, default=_json_default, separators=(",", ":"))
        if not line.isascii():  # O(1) for str: ASCII lines skip the scans below
            # JSON leaves these raw in strings, and str.splitlines() (like other readers) takes
            # them for line ends: a vendor value holding one (U+2028 comes with text pasted from
            # word processors) cut its object in two. Escaped, they decode to the same string.
            line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
        out.write(line)
        out.write("\n")
    out.flush()


# Tabs and line breaks inside a value (a vendor's job title, a multi-line error) would shift or
# split a row of the tab-separated tables: shown as spaces there (--json keeps them).
_BREAKS = "\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"

# The other control characters (ESC, BEL, NUL, DEL, the C1 set) in a vendor's value or a quoted
# error page reached the terminal as they were, and it obeyed them: `\x1b[2J` cleared the screen,
# `\x1b]0;…\x07` retitled the window, `\x1b[8m` hid what followed. Shown escaped (`\x1b`) instead.
_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in _BREAKS}
_CONTROLS = str.maketrans(_ESCAPED)
_CELL = str.maketrans({**_ESCAPED, **{ord(c): " " for c in _BREAKS}})  # one pass per cell


def _shown(text: Any) -> str:
    """A vendor-derived text for the terminal: its control characters escaped, not obeyed."""
    return str(text).translate(_CONTROLS)


def _cells(*values: Any) -> str:
    """One row of a tab-separated table."""
    return "\t".join("" if v is None else str(v).translate(_CELL) for v in values)


def _table(rows: Iterator[dict[str, Any]], columns: list[str]) -> int:
    typer.echo("\t".join(columns))
    n = 0
    for row in rows:
        typer.echo(_cells(*(row.get(c) for c in columns)))
        n += 1
    return n


# --- sync ------------------------------------------------------------------------------------------


def _progress(dry_run: bool = False) -> tuple[Any, Any]:
    """A live progress line on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True, soft_wrap=True),  # log lines printed above it keep their length
        transient=True,
    )
    task = progress.add_task("connecting…")

    def update(tenant: str, pages: int, users: int, groups: int, read_all: bool = False) -> None:
        read = f"{tenant}: {pages} pages · {users:,} users · {groups:,} groups read"
        if not read_all:
            progress.update(task, description=read)
            return
        # The rest of the run (the diff's end, the writes) reads nothing more: without this the
        # line said "… read" for the ten seconds a 100,000-user first sync then spends writing.
        then = "comparing with the store (dry run)" if dry_run else "comparing with the store and writing"
        progress.update(task, description=f"{read} · {then}…")
        progress.refresh()

    return progress, update


def _restore_terminal() -> None:
    """Before a forced exit under the progress line: the cursor Rich hid shown again, and the
    shell's prompt on a line of its own instead of after the progress line."""
    if sys.__stderr__ is not None:
        sys.__stderr__.write("\n\x1b[?25h")


def _before_exit(*, restore_terminal: bool, scratch: str | None) -> None:
    """What a forced exit (a second SIGTERM or Ctrl-C) still does: the process ends without its
    `finally` blocks, and a dry run's scratch store (a planned copy of the directory's people)
    stayed in TMPDIR until a later dry run swept it, a day on."""
    if restore_terminal:
        _restore_terminal()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


LOSSES = ("user.deleted", "group.deleted")


def _state_flip(event: dict[str, Any]) -> str | None:
    """The dry run's mark of an update that turns a user inactive (" deactivated") or active
    (" reactivated"); None for any other event."""
    if event["type"] != "user.updated":
        return None
    was, now = (event.get("previous_attributes") or {}).get("state"), event["data"].get("state")
    if was == "active" and now == "inactive":
        return " deactivated"
    if was == "inactive" and now == "active":
        return " reactivated"
    return None


def _describe(writes: WriteSet, limit: int = 200) -> Iterator[str]:
    sign = {"created": "+", "updated": "~", "deleted": "-", "user_added": "+", "user_removed": "-"}
    # Deletions, deactivations and reactivations first: they are what the guard holds a run for,
    # and in the event order they come behind every create, update and membership change, so a
    # held run's review showed 200 of those and not one of the people it would remove (or give
    # their access back).
    losses = [*writes.tail_events, *(e for e in writes.events if _state_flip(e))]
    rest = (e for e in writes.all_events() if e["type"] not in LOSSES and not _state_flip(e))
    for i, e in enumerate(itertools.chain(losses, rest)):
        if i == limit:
            yield f"… and {writes.event_count - limit} more (--json lists every one)"
            return
        kind = e["type"].split(".", 1)[1]
        if e["type"].startswith("group.user_"):
            yield f"{sign[kind]} {e['type']} group={e['data']['group']} user={e['data']['user']}"
        else:
            name = e["data"].get("username") or e["data"].get("name") or e["data"].get("display_name") or ""
            changed = f" ({', '.join(sorted(e['previous_attributes']))})" if e.get("previous_attributes") else ""
            lost = _state_flip(e) or ""
            yield f"{sign[kind]} {e['type']} {e['object_id']} {name}{changed}{lost}"


def _planned(tenant: str, event: dict[str, Any]) -> dict[str, Any]:
    """A dry run's event with every field the applied event has, its object too. What only the
    commit sets has no value yet: the event's `seq`, `run_id` and `created_at`, the object's
    `updated_at` (and a created object's `created_at`) are null, not a guessed value a consumer
    could take for the one the store will show; an updated object's `created_at` is the stored
    one, as applied. Without them a consumer's code for applied events failed on a planned one
    (no `tenant`, and no `previous_attributes` but on updates)."""
    if event["type"].endswith((".created", ".updated")):
        data = event["data"]
        event = {**event, "data": {**data, "created_at": data.get("created_at"), "updated_at": None}}
    return {
        "planned": True,
        "seq": None,
        "type": event["type"],
        "tenant": tenant,
        "run_id": None,
        "data": in_contract_order(event["type"], event["data"]),
        "previous_attributes": in_contract_order(event["type"], event.get("previous_attributes")),
        "created_at": None,
        "object_id": event["object_id"],
    }


@app.command()
def sync(
    tenant: Annotated[str, typer.Argument(help="Tenant id from the configuration.")],
    full: Annotated[bool, typer.Option("--full", help="Ignore cursors: walk the whole directory.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planned changes; apply none.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Apply a run the mass-change guard would hold.")] = False,
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="Seconds to wait if another worker is syncing this tenant.", min=0, max=MAX_SECONDS
        ),
    ] = 0.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run (and with --dry-run the planned events) as JSON Lines.")
    ] = False,
) -> None:
    """Sync one tenant now (manual resync).

    Exit 0: applied, or nothing to do.
    Exit 1: failed, or skipped because another worker is syncing it (see --wait).
    Exit 2: a mistake in the configuration, or an unreadable secret.
    Exit 3: held by the guard (--dry-run: would be held; with --force: 0).
    Exit 130 / 143: a second Ctrl-C / SIGTERM ended it at once (nothing half-applied)."""
    from dirpull.connectors.http import SHUTDOWN
    from dirpull.signals import stop_on_signals
    from dirpull.sync.runner import Runner

    config = _config()
    if tenant in config.broken:
        raise fail("\n".join(config.broken[tenant].errors))
    _tenant(config, tenant)
    _warn_broken(config, config.broken)  # this one syncs; the operator learns of the others
    if problems := config.secret_problems(tenant):
        raise fail("\n".join(problems))
    scratch: str | None = None
    if dry_run and (missing := _no_store_yet(config)) is not None:
        # A dry run changes nothing: it made the store file (run from the wrong folder with a
        # relative URL, a stray one there), or every table in an empty database (the one just made
        # for dirpull, or the wrong one named). It plans against an empty store, as the first sync
        # would find, made in a temporary folder that goes when it ends.
        from dirpull.dry_run_scratch import make_scratch

        scratch = make_scratch()
        url = f"sqlite:///{os.path.join(scratch, 'dirpull.db')}"
        config = config.model_copy(update={"store": config.store.model_copy(update={"url": url})})
        typer.echo(f"dirpull: no store at {missing} yet: planned against an empty one; nothing created", err=True)
    try:
        store = _store(config)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    progress, update = (None, None) if as_json else _progress(dry_run)
    try:
        if progress:
            progress.start()
        # SIGTERM (cron's timeout, systemd) or Ctrl-C: the run stops at its next page (a retry's
        # wait ends at once), applies nothing and is recorded as failed, its lease given back. A
        # second one exits at once (signals.py), the terminal's cursor shown again.
        with stop_on_signals(
            SHUTDOWN,
            force_exit=True,
            before_exit=functools.partial(_before_exit, restore_terminal=progress is not None, scratch=scratch),
            announce="stopping at the run's next page; nothing applied (a second SIGTERM or Ctrl-C exits at once)",
        ) as stop:
            runner = Runner(config, store, stop=stop)
            result = runner.sync(tenant, full=full, dry_run=dry_run, force=force, wait=wait, progress=update)
    finally:
        SHUTDOWN.clear()
        if progress:
            progress.stop()
        store.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "tenant": tenant,
        "status": result.status,
        "run_id": result.run_id,
        "mode": None if result.status == "skipped" else result.mode,  # no run was made
        "counts": result.counts,
        "requests": result.requests,
        "events": result.events,
        "duration_s": result.duration_s,
        "notes": result.notes,
        "error": result.error,
    }
    if as_json:
        rows: list[dict[str, Any]] = [summary]
        if dry_run and result.writes is not None:
            rows += [_planned(tenant, e) for e in result.writes.all_events()]
        _jsonl(rows)
    elif result.status == "skipped":
        # Nothing was read: not "no changes", which says the directory was found unchanged.
        typer.echo(f"{tenant}: skipped: another worker is syncing it; nothing was read or applied")
        typer.echo(f"  {result.error}; `dirpull sync {tenant} --wait SECONDS` waits for it", err=True)
    else:
        if dry_run and result.writes is not None:
            for line in _describe(result.writes):
                typer.echo(_cells(line))
        counts = ", ".join(f"{k} {v}" for k, v in result.counts.items() if v and not k.endswith("_seen"))
        # A held or failed run's counts are what it would have written: said so, not read as done.
        done = result.status in ("succeeded", "planned")
        planned = "" if done or not counts else "nothing applied, planned: "
        # "no changes" says the directory was read and found unchanged: a failed run read nothing,
        # or not all of it.
        typer.echo(
            f"{tenant}: {result.status} ({result.mode}) in {result.duration_s:.2f}s, {result.requests} requests"
            + (f"; {planned}{counts}" if counts else "; no changes" if done else "; nothing applied")
        )
        for note in result.notes:
            typer.echo(f"  note: {_shown(note)}")
        if result.error:
            typer.echo(f"  {_shown(result.error)}", err=True)
    raise typer.Exit(result.exit_code)


# --- queries ---------------------------------------------------------------------------------------

USER_COLUMNS = ["idp_id", "state", "username", "email", "display_name", "department", "job_title"]


@app.command()
def users(
    tenant: str,
    state: Annotated[StateFilter | None, typer.Option("--state", help="active or inactive.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="Only members of this group (idp_id).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines, every field.")] = False,
) -> None:
    """Users in the store.

    Exit 0: printed (nothing to print too).
    Exit 1: no store, or its schema is behind or ahead of this dirpull."""
    config = _config()
    store = _query_store(config, tenant)
    rows: Iterator[dict[str, Any]] = iter(())
    if group is None or _known(store, tenant, "group", group):
        rows = store.iter_users(tenant, state=state.value if state else None, group=group)
    _jsonl(rows) if as_json else _table(rows, USER_COLUMNS)


@app.command()
def groups(
    tenant: str,
    user: Annotated[str | None, typer.Option("--user", help="Only groups this user (idp_id) is in.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines, every field.")] = False,
) -> None:
    """Groups in the store.

    Exit 0: printed (nothing to print too).
    Exit 1: no store, or its schema is behind or ahead of this dirpull."""
    config = _config()
    store = _query_store(config, tenant)
    rows: Iterator[dict[str, Any]] = iter(())
    if user is None or _known(store, tenant, "user", user):
        rows = store.iter_groups(tenant, user=user)
    _jsonl(rows) if as_json else _table(rows, ["idp_id", "name", "email", "description"])


def _known(store: Store, tenant: str, kind: str, key: str) -> bool:
    """Whether the tenant has the group or user `key` (an idp_id); if not, one line on stderr
    saying so, naming the idp_id to give when `key` is the name, username or email of exactly one.
    Without it an unknown id (a typo, a group's name) printed nothing, as a group without members
    does. The exit code stays 0, as the contract has it for the query commands: the group may
    have been deleted by a sync since the caller listed it."""
    found = store.find_group(tenant, key) if kind == "group" else store.find_user(tenant, key)
    if found and found[0]["idp_id"] == key:
        return True
    listing = "groups" if kind == "group" else "users"
    if len(found) == 1:
        other = found[0]
        label = (other.get("name") if kind == "group" else other.get("username")) or other.get("email")
        named = f" ({_cells(label)})" if label and label != other["idp_id"] else ""
        hint = f"; did you mean --{kind} {shlex.quote(other['idp_id'])}{named}?"
    elif found:
        fields = "name or email" if kind == "group" else "username or email"
        hint = f" (the {fields} of more than one {kind}: give the idp_id, see dirpull {listing} {tenant})"
    else:
        hint = f" (give its idp_id: see dirpull {listing} {tenant})"
    typer.echo(f"dirpull: no {kind} {key!r} in tenant {tenant}{hint}", err=True)
    return False


@app.command()
def events(
    tenant: str,
    after: Annotated[
        int, typer.Option("--after", help="Only events with seq greater than this.", min=0, max=MAX_INT)
    ] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many.", min=1, max=MAX_INT)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False,
) -> None:
    """The event log, oldest first. Store the last seq you read and pass it as --after.

    Exit 0: printed (nothing to print too).
    Exit 1: no store, or its schema is behind or ahead of this dirpull."""
    config = _config()
    store = _query_store(config, tenant)
    rows = store.iter_events(tenant, after=after, limit=limit)
    if as_json:
        _jsonl(rows)
        return
    # A header as the other tables have, on a terminal and in a pipe alike: `tail -n +2` skips it.
    typer.echo("seq\tcreated_at\ttype\tobject")
    for e in rows:
        d = e["data"]
        what = f"group={d['group']} user={d['user']}" if "group" in d and "user" in d else d.get("idp_id", "")
        changed = f" changed={','.join(sorted(e['previous_attributes']))}" if e["previous_attributes"] else ""
        typer.echo(_cells(e["seq"], _json_default(e["created_at"]), e["type"], f"{what}{changed}"))


@app.command()
def runs(
    tenant: str,
    limit: Annotated[int, typer.Option("--limit", help="The newest this many runs.", min=1, max=MAX_INT)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False,
) -> None:
    """Sync runs, newest first.

    Exit 0: printed (nothing to print too).
    Exit 1: no store, or its schema is behind or ahead of this dirpull."""
    config = _config()
    store = _query_store(config, tenant)
    rows = [_with_events(r) for r in store.runs(tenant, limit)]
    if as_json:
        _jsonl(rows)
        return
    typer.echo("id\tstarted_at\ttrigger\tmode\tstatus\tduration_s\trequests\tevents\terror")
    for r in rows:
        typer.echo(_cells(r["id"], r["started_at"], r["trigger"], r["mode"], r["status"], r["duration_s"],
                          r["requests"], r["events"], r["error"] or ""))  # fmt: skip


def _with_events(run: dict[str, Any]) -> dict[str, Any]:
    """The run with `events`, the events it wrote, after `requests` as in `sync --json`. Its
    `counts.events` is not that: a held or failed run's counts are what it would have written,
    so a consumer reading them took a held run's planned events for new ones in the log."""
    events = run["counts"].get("events", 0) if run["status"] == "succeeded" else 0
    out: dict[str, Any] = {}
    for key, value in run.items():
        out[key] = value
        if key == "requests":
            out["events"] = events
    out.setdefault("events", events)
    return out


def _stale_at(schedule: str, last_success: datetime) -> datetime | None:
    """When a tenant whose last successful sync ended at `last_success` has missed three
    scheduled syncs: three intervals later, or on a cron schedule the fourth fire after it (by
    then the third fire's run has had a whole period to finish)."""
    if not schedule.startswith("cron:"):
        from dirpull.config import parse_duration

        return last_success + parse_duration(schedule) * 3
    from dirpull.config import cron_trigger

    trigger = cron_trigger(schedule[5:].strip())
    fire = last_success
    for _ in range(4):
        # get_next_fire_time returns `now` itself when it is a fire time: step past it.
        following = trigger.get_next_fire_time(None, fire + timedelta(seconds=1))
        if following is None:
            return None
        fire = following
    return fire


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False) -> None:
    """Every tenant: provider, last run, result, next run — and what needs attention.

    Exit 0: printed (nothing to print too).
    Exit 1: no store, or its schema is behind or ahead of this dirpull."""
    from dirpull.sync.daemon import next_fire

    config = _config()
    store = _store(config, reading=True)
    last = store.last_runs()
    # The daemon fires an interval tenant an interval after its previous fire, whatever manual
    # syncs came in between: the next run counts from the newest scheduled run.
    fired = store.last_runs(trigger="schedule")
    ok = store.last_success()
    now = datetime.now(UTC)
    rows = []
    for name in sorted([*config.tenants, *config.broken]):
        tenant = config.tenants.get(name)
        broken = config.broken.get(name)
        run = last.get(name)
        schedule = config.schedule_of(name) if tenant is not None else None
        scheduled = fired.get(name)
        started = datetime.fromisoformat(scheduled["started_at"].replace("Z", "+00:00")) if scheduled else None
        # A table with a mistake: the daemon does not schedule it (it logs why at start).
        attention = [] if broken is None else [f"configuration error: {broken.message}"]
        result = run["status"] if run else "never synced"
        # A run cut off by a clean stop (a daemon restart, Ctrl-C) is no failure of the tenant: the
        # run before it tells whether the tenant was failing or held.
        outcome = run
        if run and _stopped(run):
            result = "interrupted"
            outcome = next((r for r in store.runs(name, 20) if r["status"] != "running" and not _stopped(r)), None)
        if outcome and outcome["status"] == "held":
            # Why, as the run recorded it (what tripped the guard, then what to run), as a failing
            # tenant shows its error; the steps alone for a run recorded without one.
            provider = tenant.provider if tenant is not None else None
            recorded = str(outcome.get("error") or "").removeprefix("held by the mass-change guard: ")
            attention.append(f"held by the guard: {recorded or guard.next_steps(name, outcome['mode'], provider)}")
        if outcome and outcome["status"] == "failed":
            attention.append(f"failing: {outcome['error']}")
        if run and run["status"] == "running" and _abandoned(store, name, run):
            attention.append(
                f"run {run['id']} never finished: its worker {run['worker']} no longer holds the lease "
                "(killed, crashed or cut off from the store); nothing of it was applied"
            )
        scheduled_next = tenant is not None and tenant.enabled and schedule is not None
        # A disabled tenant is not synced on purpose: its age is no sign of trouble.
        if scheduled_next and schedule and name in ok and (stale := _stale_at(schedule, ok[name])) and now > stale:
            attention.append(f"no successful sync since {_json_default(ok[name])}")
        if tenant is not None and not tenant.enabled:
            attention.append("disabled")
        next_run = next_fire(schedule, started, now) if scheduled_next and schedule is not None else None
        if (
            next_run is not None
            and schedule is not None
            and schedule.startswith("cron:")
            and _cron_due(store, schedule, run, now)
        ):
            # A starting daemon (or one reloaded with the tenant new) syncs a cron tenant that
            # never synced, or missed a cron time, within seconds, not at its next cron time
            # (`Daemon._missed_cron_fires`); a running one has done so already, or its fire waits
            # for a free thread: it is due now, as an interval tenant would be.
            next_run = now
        rows.append(
            {
                "tenant": name,
                "provider": tenant.provider if tenant is not None else broken.provider if broken else None,
                "schedule": schedule,
                "last_run": run["finished_at"] or run["started_at"] if run else None,
                "result": result,
                "next_run": _json_default(next_run) if next_run is not None else None,
                "attention": attention,
            }
        )
    if as_json:
        _jsonl(rows)
        return
    typer.echo("tenant\tprovider\tlast_run\tresult\tnext_run\tattention")
    for r in rows:
        typer.echo(_cells(r["tenant"], r["provider"] or "-", r["last_run"] or "-", r["result"], r["next_run"] or "-",
                          "; ".join(r["attention"])))  # fmt: skip


def _stopped(run: dict[str, Any]) -> bool:
    """A run that failed only because its worker was stopped (SIGTERM/SIGINT): it applied nothing."""
    from dirpull.sync.runner import STOPPED

    return run["status"] == "failed" and (run["error"] or "").startswith(STOPPED)


def _cron_due(store: Store, schedule: str, run: dict[str, Any] | None, now: datetime) -> bool:
    """A cron tenant the daemon syncs now, not at its next cron time: it never synced, or a cron
    time came after the start of its last run that ended (none is under way): the daemon was down
    then."""
    from dirpull.sync.daemon import cron_time_passed
    from dirpull.sync.runner import cut_off

    if run is None or _never_ended(store, run):
        return True
    if run["status"] == "running":  # this cron time's run, under way
        return False
    ended = run if not cut_off(run) else next((r for r in store.runs(run["tenant"], 20) if not cut_off(r)), None)
    return ended is None or cron_time_passed(schedule, ended["started_at"], now)


def _never_ended(store: Store, run: dict[str, Any] | None) -> bool:
    """The tenant has no run that reached an end of its own (none at all, or only runs cut off by a
    stop or a dead worker), and none is under way: the daemon's "never synced"."""
    from dirpull.sync.runner import cut_off

    if run is None:
        return True
    if run["status"] == "running" or not cut_off(run):
        return False
    return all(cut_off(r) for r in store.runs(run["tenant"], 20))


def _abandoned(store: Store, tenant: str, run: dict[str, Any]) -> bool:
    """A run recorded as running whose worker holds no lease on its tenant: killed (SIGKILL, OOM,
    power loss) before it could record an outcome. It stays `running` until the tenant's next run
    starts, which may be a schedule interval away, or never if no daemon runs."""
    lease = store.lease(tenant)
    if lease.holder is not None and lease.holder.startswith(f"{run['worker']}/"):
        return False
    again = store.runs(tenant, 1)  # it may have finished, or a new run begun, since it was read
    return bool(again) and again[0]["id"] == run["id"] and again[0]["status"] == "running"


# --- daemon ----------------------------------------------------------------------------------------


@app.command()
def run(
    max_seconds: Annotated[
        float | None,
        typer.Option("--max-seconds", help="Stop after this long (tests, demos).", min=0, max=MAX_SECONDS),
    ] = None,
) -> None:
    """The daemon: every tenant on its schedule until SIGTERM/SIGINT; SIGHUP reloads the configuration.

    Exit 0: stopped cleanly.
    Exit 1: the store cannot be opened or made, or its schema is behind or ahead of this dirpull.
    Exit 2: a mistake in the configuration, or every tenant's table has one.
    Exit 130 / 143: a second Ctrl-C / SIGTERM ended the stop at once."""
    from dirpull.signals import stop_on_signals
    from dirpull.sync.daemon import Daemon

    config = _config()
    if not config.tenants and config.broken:  # nothing to schedule: as a mistake in the file always was
        raise fail("\n".join(line for broken in config.broken.values() for line in broken.errors))
    if not config.tenants:  # said before the store is opened, which would create an empty one
        # What to do, not only what is missing: a first `dirpull run` on a file with only [store].
        raise fail(
            f"{config.path}: no tenants configured; add a [tenants.<id>] table for each directory to sync "
            "(see config/dirpull.example.toml)"
        )
    stopping = threading.Event()
    # Taken from here on: a SIGTERM while the store opens (a PostgreSQL server slow to answer, the
    # schema being made) ended the process by the default action, exit 143 and no "stopped" line,
    # where a stop at any later moment is clean, exit 0. A second one exits at once, as later: the
    # store may be waited for a while (a file locked by another process, connect_timeout).
    with stop_on_signals(stopping, force_exit=True):
        store = _store(config, create=True, syncs=config.defaults.max_concurrent_syncs)
        try:
            for tenant in (name for name, t in config.tenants.items() if t.enabled):  # a disabled one never runs
                for problem in config.secret_problems(tenant):
                    log.error("%s (its runs fail until this is fixed; the other tenants sync)", problem)
            Daemon(config, store).run_forever(until=stopping, max_seconds=max_seconds)
        finally:
            store.close()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending schema migrations."""
    config = _config()
    try:
        store = Store(config.store.url, connect_timeout=config.store.connect_timeout)
        foreign = store.holds_other_tables()  # asked first: the upgrade adds tables
        before, head = store.upgrade()
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    was = "none: dirpull's tables added beside the database's own" if foreign else (before or "empty")
    typer.echo(f"schema at {head}" + (f" (was {was})" if before != head else " (already current)"))


UPGRADE_MAKES_IT = " (`dirpull db upgrade` makes it)"


@db_app.command("check")
def db_check() -> None:
    """Exit 0 when the schema is current, 1 otherwise."""
    from dirpull.storage.store import HEAD_REVISION, missing_sqlite_file

    config = _config()
    if (missing := missing_sqlite_file(config.store.url)) is not None:
        # A check creates nothing: run from the wrong folder it would leave a stray empty store.
        typer.echo(f"schema empty (no store at {missing}), needed {HEAD_REVISION}{UPGRADE_MAKES_IT}")
        raise typer.Exit(1)
    try:
        store = Store(config.store.url, connect_timeout=config.store.connect_timeout)
        current, head = store.schema_state()
        newer = current != head and store.schema_is_newer(current)
        foreign = store.holds_other_tables()
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    hint = " (newer than this dirpull: upgrade dirpull)" if newer else ""
    if current != head and not newer:
        # The unit's ExecStartPre: the journal showed only the two revisions, the unit restarting
        # every 10 s, and not the command that ends it.
        hint = UPGRADE_MAKES_IT if current is None else " (behind: run `dirpull db upgrade`)"
    if foreign:
        hint = (" (the database has tables, none of them dirpull's: another application's database, "
                "or the wrong one named?)")  # fmt: skip
    typer.echo(f"schema {current or 'empty'}, needed {head}{hint}")
    raise typer.Exit(0 if current == head else 1)


# --- emulators and demo ----------------------------------------------------------------------------


def _provider_list(provider: list[str] | None) -> list[str] | None:
    from dirpull.emulators import EMULATOR_CLASSES

    for p in provider or []:
        if p not in EMULATOR_CLASSES:
            raise fail(f"unknown provider {p!r}; use one of: {', '.join(EMULATOR_CLASSES)}")
    return provider or None


@app.command()
def emulate(
    provider: Annotated[
        list[str] | None, typer.Option("--provider", "-p", help="Only this provider (repeatable).")
    ] = None,
    people: Annotated[int, typer.Option("--people", min=1, max=1_000_000)] = 200,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    write_config: Annotated[
        Path | None, typer.Option("--write-config", help="Write the config here instead of printing it.")
    ] = None,
    store_url: Annotated[str, typer.Option("--store-url")] = "sqlite:///dirpull.db",
    changes_every: Annotated[
        float,
        typer.Option("--changes-every", help="Seconds between random changes (0: none).", min=0, max=MAX_SECONDS),
    ] = 0.0,
    max_seconds: Annotated[
        float | None,
        typer.Option("--max-seconds", help="Stop after this long (default: at Ctrl-C).", min=0, max=MAX_SECONDS),
    ] = None,
) -> None:
    """Serve local emulators of the vendors' APIs on 127.0.0.1 and print a config for them.

    Exit 0: stopped (Ctrl-C, or --max-seconds).
    Exit 2: a bad option, or --write-config naming a file it did not write."""
    from dirpull.emulators.cluster import Cluster, holds_another_config, write_private
    from dirpull.emulators.org import Org

    chosen = _provider_list(provider)
    if write_config and holds_another_config(write_config):
        raise fail(
            f"--write-config {write_config}: the file exists and is not a configuration dirpull emulate wrote;"
            " nothing overwritten (give another path, or remove the file first)"
        )
    workdir = (write_config.parent if write_config else Path(tempfile.mkdtemp(prefix="dirpull-emulate-"))).resolve()
    cluster = Cluster(Org.generate(people, seed=seed))
    cluster.start(chosen)
    stop = threading.Event()
    try:
        try:  # the configuration and the Google emulator's key file go into write_config's folder
            # The key file is named after the config: two configs written into one folder each
            # keep their own emulator's key (a shared name had the second replace the first's).
            prefix = f"{write_config.name}-" if write_config else ""
            text = cluster.config_toml(workdir, store_url=store_url, key_prefix=prefix)
            if write_config:
                write_private(write_config, text)
        except OSError as exc:
            raise fail(f"--write-config {write_config}: cannot write ({exc.strerror})") from None
        if write_config:
            typer.echo(f"wrote {write_config}", err=True)
        else:
            typer.echo(text)
        for p, why in cluster.skipped.items():
            typer.echo(f"skipped {p}: {why}", err=True)
        for p, em in cluster.emulators.items():
            typer.echo(f"{p}: {em.base_url}", err=True)
        typer.echo("serving; Ctrl-C stops", err=True)
        _serve(cluster, stop, changes_every, max_seconds)
    finally:
        cluster.stop()
        if not write_config:  # its throw-away Google key: the printed config dies with the emulators
            shutil.rmtree(workdir, ignore_errors=True)


def _serve(cluster: Any, stop: threading.Event, changes_every: float, max_seconds: float | None) -> None:
    from dirpull.signals import stop_on_signals

    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    next_change = time.monotonic() + changes_every if changes_every else None
    with stop_on_signals(stop):
        while not stop.wait(0.2):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if next_change is not None and now >= next_change:
                for line in cluster.org.random_changes(3):
                    log.info("directory change: %s", line)
                next_change = now + changes_every


def _schedule_option(value: str) -> str:
    # Checked here: the demo writes it into its configuration, whose loader would only fail later,
    # with the emulators already up and a traceback.
    from dirpull.config import _check_schedule

    try:
        return _check_schedule(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def demo(
    people: Annotated[int, typer.Option("--people", min=5, max=100_000)] = 60,
    duration: Annotated[
        float, typer.Option("--duration", help="Seconds to run (0: until Ctrl-C).", min=0, max=MAX_SECONDS)
    ] = 45.0,
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule", help='How often each tenant syncs (30s, 5m or "cron: ...").', callback=_schedule_option
        ),
    ] = "5s",
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo config and store go.")] = Path("demo"),
) -> None:
    """Emulators for every provider, the real daemon syncing them into SQLite, and the events as they arrive.

    Exit 0: stopped (Ctrl-C, or --duration).
    Exit 2: a bad option, or a --workdir whose dirpull.toml the demo did not write."""
    from dirpull.demo import run_demo
    from dirpull.emulators.cluster import holds_another_config

    # `dirpull demo --workdir .` in the folder of the operator's own dirpull.toml replaced it with
    # the emulators' configuration, as `emulate --write-config` never does.
    if holds_another_config(workdir / "dirpull.toml"):
        raise fail(
            f"--workdir {workdir}: its dirpull.toml is not a configuration dirpull demo wrote; nothing overwritten "
            "(give another folder, or remove the file first)"
        )
    raise typer.Exit(run_demo(people=people, duration=duration, schedule=schedule, workdir=workdir))


def main() -> None:
    for stream in (sys.stdout, sys.stderr):
        if not _utf8(stream) and hasattr(stream, "reconfigure"):
            # The tables and messages on a stdout that is not UTF-8: a character it cannot hold
            # shows as "?" instead of a traceback halfway through (--json escapes it instead).
            stream.reconfigure(errors="replace")
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except StoreError as exc:  # the database went away mid-command: one line, no traceback
        typer.echo(logs.last_word(str(exc)), err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
