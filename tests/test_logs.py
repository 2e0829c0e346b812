"""Log lines as an operator reads them."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from dirpull import logs


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set to one that is not UTC."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_are_stamped_in_utc_whatever_the_machines_time_zone(
    berlin: None, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("info", fmt)
        when = datetime(2026, 5, 1, 2, 0, 0, tzinfo=UTC).timestamp()
        monkeypatch.setattr(time, "time", lambda: when)  # LogRecord.created
        monkeypatch.setattr(time, "time_ns", lambda: int(when * 1e9))
        logging.getLogger("dirpull.sync").warning("tenant t: trying again at 2026-05-01T02:05:00+00:00")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = err.getvalue()
    # Berlin's clock said 04:00 then (summer time): the line says the UTC time, marked as such.
    assert "2026-05-01T02:00:00.000Z" in line and "04:00" not in line, line
