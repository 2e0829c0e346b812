"""The rows of a report's top-level JSON array, streamed: `items(stream, key)` yields what
`ijson.items(stream, f"{key}.item", use_float=True)` yields — for the one-document reports of
Workday (`Report_Entry`) and BambooHR (`employees`), 100,000 rows and tens of MB in one body.

Why not ijson alone: building the rows one at a time through ijson is ~3.7 µs a row, as slow as
`json.loads` of the whole body, and a third of a no-change BambooHR resync. Here the body is read a
megabyte at a time, cut after the last whole row the buffer holds, and those rows are parsed in one
`orjson.loads` — memory still holds about one chunk, never the body.

Why a cut is safe: a cut is tried after a `}` followed by `,` and `{` (whitespace allowed), and kept
only if `[` + everything before it + `]` parses. A `}` inside a string leaves that string
unterminated, and one closing a nested object leaves its row unclosed, so a wrong cut never
parses: what parses is exactly a run of whole rows. What remains after the last cut is parsed at
the end together with the document's opening, which checks the document as a whole (its other
keys, its closing brackets). Rows are expected flat, as these reports' are: where the last few
candidate cuts of a chunk all fall inside nested objects, no rows are freed, and once 8 MB are held
that way ijson reads the rest. A document laid out otherwise (the array not a top-level value, no
such key in the first 8 MB) goes to ijson unchanged. One difference from ijson, which refuses
them: an integer beyond 64 bits comes out as a float (these reports print numbers as strings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Protocol

import ijson
import orjson

CHUNK = 1 << 20
HEAD_LIMIT = 8 << 20  # the array must open within this many bytes, else ijson reads the body
CUT_TRIES = 4  # candidate cuts tried per chunk, from the last one back
STUCK_LIMIT = 8 << 20  # rows no cut could free: ijson reads the rest (rows with nested objects)
_ROW_BOUNDARY = re.compile(rb"\}\s*,\s*\{")


class NotJSON(ValueError):
    """The report body is not valid JSON (or not the document asked for)."""


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def items(stream: Readable, key: str, *, chunk_size: int = CHUNK) -> Iterator[Any]:
    opening = re.compile(rb'"' + re.escape(json.dumps(key).encode()[1:-1]) + rb'"\s*:\s*\[')
    buf, searched = b"", 0
    found: re.Match[bytes] | None = None
    while found is None:
        chunk = stream.read(chunk_size)
        buf += chunk
        for match in opening.finditer(buf, searched):
            if _opens_top_level(buf[: match.end() - 1], key):
                found = match
                break
            searched = match.end()  # the key inside something else: look further on
        if not chunk or len(buf) > HEAD_LIMIT:
            break
    if found is None:
        yield from _ijson(buf, stream, key)
        return
    head, buf = buf[: found.end() - 1], buf[found.end() :]
    while chunk:
        chunk = stream.read(chunk_size)
        buf += chunk
        rows, buf = _whole_rows(buf)
        yield from rows
        if len(buf) > STUCK_LIMIT:
            yield from _ijson(head + b"[" + buf, stream, key)  # the same document, minus the rows read
            return
    document = _loads(head + b"[" + buf)
    rest = document.get(key) if isinstance(document, dict) else None
    if not isinstance(rest, list):
        raise NotJSON(f"the report's {key!r} is not a list")
    yield from rest


def _opens_top_level(head: bytes, key: str) -> bool:
    """Whether `head` is a document's opening up to the value of its top-level `key`."""
    try:
        opened = orjson.loads(head + b"[]}")
    except orjson.JSONDecodeError:
        return False
    return isinstance(opened, dict) and opened.get(key) == []


def _whole_rows(buf: bytes) -> tuple[list[Any], bytes]:
    """The whole rows at the start of `buf` (which starts at a row, or is empty) and the rest."""
    ends = [m.start() + 1 for m in _ROW_BOUNDARY.finditer(buf)]
    for end in reversed(ends[-CUT_TRIES:]):
        try:
            rows = orjson.loads(b"[" + buf[:end] + b"]")
        except orjson.JSONDecodeError:
            continue  # this `}` was inside a string or a nested object: an earlier one, then
        return rows, buf[buf.index(b"{", end) :]
    return [], buf


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise NotJSON(str(exc)) from None


class _Prefixed:
    """`stream` with `prefix` (bytes already read from it) put back in front."""

    def __init__(self, prefix: bytes, stream: Readable) -> None:
        self._prefix, self._stream = prefix, stream

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            out = self._prefix if size < 0 else self._prefix[:size]
            self._prefix = self._prefix[len(out) :]
            return out
        return self._stream.read(size)


def _ijson(prefix: bytes, stream: Readable, key: str) -> Iterator[Any]:
    try:
        yield from ijson.items(_Prefixed(prefix, stream), f"{key}.item", use_float=True)
    except ijson.JSONError as exc:
        raise NotJSON(str(exc)) from None
