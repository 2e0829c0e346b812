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


class RecordSpool:
    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="dirpull-records-")  # noqa: SIM115 (closed by close())
        self._end = 0
        self._unflushed = False
        self._lock = threading.Lock()

    def put(self, blob: bytes, key: str | None = None) -> SpooledJson:
        with self._lock:
            offset = self._end
            self._file.write(blob)
            self._end += len(blob)
            self._unflushed = True
        return SpooledJson(self, offset, len(blob), key)

    def read(self, offset: int, length: int) -> bytes:
        if self._unflushed:
            with self._lock:
                self._file.flush()
                self._unflushed = False
        return os.pread(self._file.fileno(), length, offset)

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
