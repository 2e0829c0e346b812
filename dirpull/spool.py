"""Records held on disk while a run is planned and applied.

A first sync creates every record of the tenant: at 100,000 users their canonical JSON is 90–140 MB,
which would otherwise sit in the sync's memory from the moment the diff sees a record until the
store writes it. `RecordSpool` appends each to an anonymous temporary file (gone when closed or
when the process ends, whatever happens) and hands back a `SpooledJson` — an offset and a length,
~60 bytes in memory — that the store reads back when it writes the row and the event.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SpoolError(Exception):
    """The spool file cannot be made or written (a full disk, a TMPDIR that does not exist): the
    run fails with one line saying where and what to do, instead of an OSError's traceback."""


def spool_error(exc: OSError, doing: str, of: str = "the run's pending records") -> SpoolError:
    try:
        where = tempfile.gettempdir()
    except OSError:  # no usable temporary directory at all
        where = os.environ.get("TMPDIR") or "the temporary directory"
    return SpoolError(
        f"cannot {doing} the temporary file of {of} in {where} "
        f"({exc.strerror or exc}): free space there or set TMPDIR to a directory with room; nothing applied"
    )


@contextmanager
def spool_errors(doing: str, of: str) -> Iterator[None]:
    """A connector's own temporary file (Google's users, a Workday report beyond its memory share)
    failing as the run's spool does: with the directory and what to do, not an OSError's traceback,
    and not taken for the vendor's connection failing (which would ask the vendor again)."""
    try:
        yield
    except OSError as exc:
        raise spool_error(exc, doing, of) from None


class RecordSpool:
    def __init__(self) -> None:
        try:
            self._file = tempfile.TemporaryFile(prefix="dirpull-records-")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise spool_error(exc, "create") from None
        self._end = 0
        self._unflushed = False
        self._lock = threading.Lock()

    def put(self, blob: bytes, key: str | None = None) -> SpooledJson:
        with self._lock:
            offset = self._end
            try:
                self._file.write(blob)
            except OSError as exc:
                raise spool_error(exc, "write") from None
            self._end += len(blob)
            self._unflushed = True
        return SpooledJson(self, offset, len(blob), key)

    def read(self, offset: int, length: int) -> bytes:
        if self._unflushed:
            with self._lock:
                try:
                    self._file.flush()
                except OSError as exc:
                    raise spool_error(exc, "write") from None
                self._unflushed = False
        return os.pread(self._file.fileno(), length, offset)

    @property
    def size(self) -> int:
        return self._end

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # its last buffer found the disk full: the file goes all the same
            pass


class SpooledJson:
    """One record's canonical JSON in a `RecordSpool`, and the record's idp_id if the spooler gave
    it (the store then writes the row without decoding the JSON in Python)."""

    __slots__ = ("_length", "_offset", "_spool", "key")

    def __init__(self, spool: RecordSpool, offset: int, length: int, key: str | None = None) -> None:
        self._spool, self._offset, self._length = spool, offset, length
        self.key = key

    def read(self) -> bytes:
        return self._spool.read(self._offset, self._length)

    def __repr__(self) -> str:
        return f"SpooledJson({self._length} bytes)"
