"""Records held on disk while a run is planned and applied.

A first sync creates every record of the tenant: at 100,000 users their canonical JSON is 90–140 MB,
which would otherwise sit in the sync's memory from the moment the diff sees a record until the
store writes it. `RecordSpool` appends each to an anonymous temporary file (gone when closed or
when the process ends, whatever happens) and hands back a `SpooledJson` — an offset and a length,
~60 bytes in memory — that the store reads back when it writes the row and the event.

The store reads records back in about the order they were put, twice (rows, then events): reads
are served from a window of the file read ahead (`WINDOW` bytes), one system call per few hundred
records instead of one each.
"""

from __future__ import annotations

import os
import tempfile
import threading

WINDOW = 256 * 1024


class RecordSpool:
    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="dirpull-records-")  # noqa: SIM115 (closed by close())
        self._end = 0
        self._unflushed = False
        self._lock = threading.Lock()
        # Bytes of the file from `_window_at` on. What is written is never rewritten, so a window
        # stays true; a record beyond its end (put since, or just further on) reads a new one.
        self._window_at = 0
        self._window = b""

    def put(self, blob: bytes, key: str | None = None) -> SpooledJson:
        with self._lock:
            offset = self._end
            self._file.write(blob)
            self._end += len(blob)
            self._unflushed = True
        return SpooledJson(self, offset, len(blob), key)

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            start = offset - self._window_at
            if start >= 0 and start + length <= len(self._window):
                return self._window[start : start + length]
            if self._unflushed:
                self._file.flush()
                self._unflushed = False
            if length >= WINDOW:
                return os.pread(self._file.fileno(), length, offset)
            self._window_at, self._window = offset, os.pread(self._file.fileno(), WINDOW, offset)
            return self._window[:length]

    @property
    def size(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()


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
