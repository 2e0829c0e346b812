"""Log set-up: plain lines for people, `--log-format json` for log shippers."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


def _utc(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time of each record, not the one at set-up: while
    `dirpull sync` shows its progress line, Rich puts a proxy there that prints each line above
    it. A handler holding the real stderr wrote into that line instead, leaving the line's text
    glued to the front of the log line in the terminal."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


class TextFormatter(logging.Formatter):
    """`2026-05-01T02:00:00.123Z INFO dirpull.sync: …`: UTC, as the store, the schedules and every
    time in a message are. In the machine's local time with no offset (logging's default), a
    worker under TZ=Europe/Berlin stamped "03:00:00,000 … trying again at 02:05:00+00:00"."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc(record)


_format = "text"  # as `setup` set it


def last_word(message: str) -> str:
    """The line a command prints on stderr as it exits on an error: `dirpull: …`, or under
    `--log-format json` a JSON object as every log line is — a unit's log shipper parsing JSON got
    a plain line for the one error that stopped the daemon (its configuration, its store)."""
    if _format != "json":
        return f"dirpull: {message}"
    return JsonFormatter().format(logging.LogRecord("dirpull", logging.ERROR, __file__, 0, message, None, None))


def set_format(fmt: str) -> None:
    global _format
    _format = fmt


def setup(level: str = "info", fmt: str = "text") -> None:
    set_format(fmt)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The SDKs and the scheduler are chatty at INFO (and some log request URLs): warnings only.
    for noisy in (
        "apscheduler",
        "httpx",
        "httpcore",
        "urllib3",
        "okta",
        "googleapiclient",
        "kiota",
        "azure",
        "msal",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
