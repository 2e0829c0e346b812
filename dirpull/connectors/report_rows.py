"""The rows of a report's top-level JSON array, streamed: `rows(stream, key)` yields the rows
`ijson.items(stream, f"{key}.item", use_float=True)` yields — for one-document reports such as
BambooHR's custom report (`employees`): 100,000 rows and 40 MB in one body.

Why not ijson alone: building the rows one at a time through ijson is ~3.7 µs a row, as slow as
`json.loads` of the whole body, and a third of a no-change BambooHR resync. Here the body is read a
megabyte at a time, cut after the last whole row the buffer holds, and those rows are parsed in one
`orjson.loads` — memory still holds about one chunk, never the body.

Why a cut is safe: a cut is tried after a `}` followed by `,` and `{` (whitespace allowed), and kept
only if `[` + everything before it + `]` parses. A `}` inside a string leaves that string
unterminated, and one closing a nested object leaves its row unclosed, so a wrong cut never
parses: what parses is exactly a run of whole rows. What remains after the last cut is parsed at
the end together with the document's opening, which checks the document as a whole (its other
keys, its closing brackets). Rows are expected mostly flat, as these reports' are: where the last
few candidate cuts of a chunk fall inside nested objects, or 8 MB are held that way, ijson reads
the rest; a row taken alone (with a recognizer) whose first cut does not parse is cut where its
brackets outside strings close, checked the same way, so the rows after one with a long nested
column keep their texts.
A document laid out otherwise (the array not a top-level value, no
such key in the first 8 MB) goes to ijson unchanged. Differences from ijson: an integer beyond
64 bits, which it refuses, comes out as a float (these reports print numbers as strings); a whole
body under 8 MB with no list at `key` (none, null, an object: a gateway's JSON, not the report),
in which it finds no rows, raises `NoRowsList`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

import ijson
import orjson

from dirpull.connectors.base import ConnectorError
from dirpull.connectors.http import BOM, RUN_ENDED, Ended
from dirpull.jsoncodec import loads_lenient

CHUNK = 1 << 20
HEAD_LIMIT = 8 << 20  # the array must open within this many bytes, else ijson reads the body
CUT_TRIES = 4  # candidate cuts tried per chunk, from the last one back
STUCK_LIMIT = 8 << 20  # rows no cut could free: ijson reads the rest (rows with nested objects)
_ROW_BOUNDARY = re.compile(rb"\}\s*,\s*\{")
_ARRAY_END = re.compile(rb"\}\s*\]")


# A row's exact JSON text → a token (say, the id of the stored user last normalized from exactly
# that text) or None.
Recognize = Callable[[bytes], Any]

# The fingerprint of a row a `recognize` said yes to (see `fingerprint`): the text the stored user
# was last normalized from, one text per user, so two rows recognized as one id are that text.
# A plain object: no int equals it.
RECOGNIZED: Any = object()


def fingerprint(row: Any) -> Any:
    """What tells apart two parsed rows of a report that carry one id (a report joined on a
    multi-valued column it does not show repeats a row, identical, once per value): a 64-bit hash
    of the row as orjson writes it. Equal, they are one row, whichever copy is normalized; two
    copies spaced or escaped differently, or one parsed without its text (a report's last row is
    parsed with the document's end), still agree; keys in another order count as another row. A
    row orjson cannot write gets a fingerprint equal to nothing. Cheap next to normalizing the row
    (a fifth of a microsecond), and small to keep for each id of a 100,000-row report. (`hash` of
    bytes is SipHash, keyed at random per process unless PYTHONHASHSEED fixes it: a report cannot
    aim at a clash.) A row recognized by its text is not parsed: it is `RECOGNIZED`, and a parsed
    copy of it is the same row if it digests as the stored user's (`SourceDigests.unchanged`)."""
    try:
        return hash(orjson.dumps(row))
    except (TypeError, orjson.JSONEncodeError):
        return object()


class NotJSON(ValueError):
    """The report body is not valid JSON (or not the document asked for)."""


class ByteOrderMark(NotJSON):
    """The report body begins with a UTF-8 byte order mark, which JSON text must not (RFC 8259
    §8.1) and these parsers refuse: unlike a body cut off or garbled on the way, every copy of the
    report begins with it, so asking again does not help."""

    def __init__(self) -> None:
        super().__init__("it begins with a UTF-8 byte order mark, which JSON does not allow")


class NoRowsList(NotJSON):
    """The report body is JSON, but has no list of rows under its key: what it has instead, by
    the document's type or top-level keys only (the values may be people)."""

    def __init__(self, key: str, document: Any) -> None:
        if not isinstance(document, dict):
            what = f"a JSON {type(document).__name__}, not an object"
        elif key not in document:
            keys = ", ".join(repr(k) for k in list(document)[:5])
            what = f"no {key!r} in it (its keys: {keys})" if keys else "an empty object"
        else:
            what = f"its {key!r} is {type(document[key]).__name__}, not a list"
        super().__init__(what)
        self.key = key


def parse_error(exc: Exception) -> str:
    """What a JSON parser found wrong, without the lines of body text ijson's yajl backends add
    after it (`… "Legal_Name":"Ada Lovelace" … (right here) ------^`): the values are people, and
    the message lands in the run record and the log."""
    return str(exc).strip().split("\n", 1)[0]


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class RunEnded(ConnectorError):
    """The run a report was read for has ended (cut at its `max_run_time`, stopped, its lease
    lost): the rest of the body is not read."""


class WhileRunning:
    """A streamed response body (urllib3's) read only while the run it is read for goes on
    (`RUN_ENDED`, as set where this is made). urllib3's `read(n)` returns only once n bytes have
    come: a report trickled a few bytes a second (a vendor's, a proxy's), within every read timeout,
    kept the pull thread, its connection and the vendor's request for as long as it kept sending,
    long after its run was cut. Here a read is made of what each socket read gives (`read1`), the
    run looked at between them: a look at an event per socket read, never per row."""

    def __init__(self, raw: Any, ended: Ended | None = None) -> None:
        self._raw = raw
        self._ended = ended if ended is not None else RUN_ENDED.get()

    def read(self, size: int = -1) -> bytes:
        ended = self._ended
        if ended is None:  # no run to end (a connector used on its own)
            return bytes(self._raw.read(size if size >= 0 else None))
        pieces: list[bytes] = []
        got = 0
        while size < 0 or got < size:
            if ended.is_set():
                raise RunEnded("the run has ended: the rest of the report is not read")
            piece = self._raw.read1(size - got if size >= 0 else CHUNK)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def rows(
    stream: Readable, key: str, recognizer: Callable[[], Recognize | None] | None = None, *,
    chunk_size: int = CHUNK, others: dict[str, Any] | None = None,
) -> Iterator[tuple[bytes | None, Any, Any]]:  # fmt: skip
    """`(text, row, token)` for each row of the array: `text` is the row's exact JSON text where it
    is at hand (None otherwise), `row` the parsed row. `recognizer()` is called once, when the array
    opens (whatever it needs has had the request's time to load), and may give a `recognize`: each
    row's text is then first offered to it, a result other than None comes back as `token`, and
    that row is not parsed (`row` None). `recognize` must only say yes to a text it has seen as a
    whole row before (a digest of it): a piece of text between two wrong cuts is never one, so what
    it recognizes needs no parsing to be trusted. Without one, rows are parsed in batches.

    `others`, if given, receives the document's other top-level values (a report's header, say):
    those before the array once it opens, those after it at the end. Where ijson reads the whole
    document (no array within HEAD_LIMIT), it receives none."""
    opened = _open(stream, key, chunk_size)
    if isinstance(opened, bytes):
        if len(opened) <= HEAD_LIMIT:  # the whole body, and no array opens at `key` in it
            try:
                document = _loads(opened)
            except NotJSON:
                document = None  # ijson says what is wrong, as for a longer body
            else:
                listed = document.get(key) if isinstance(document, dict) else None
                if not isinstance(listed, list):
                    # ijson found no rows in it and said nothing: a JSON document that is not the
                    # report (a gateway's, a proxy's) read as a report with no rows.
                    raise NoRowsList(key, document)
                _keep_others(others, document, key)
                for row in listed:
                    yield None, row, None
                return
        for row in _ijson(opened, stream, key):
            yield None, row, None
        return
    head, buf, more = opened
    if others is not None:
        _keep_others(others, loads_lenient(head + b"[]}"), key)  # `_open` saw it parse so
    recognize = recognizer() if recognizer is not None else None
    while more:
        chunk = stream.read(chunk_size)
        more = bool(chunk)
        buf += chunk
        if recognize is None:
            batch, buf = _whole_rows(buf)
            for row in batch:
                yield None, row, None
        else:
            buf = yield from _row_by_row(buf, recognize)
        if len(buf) > STUCK_LIMIT:
            for row in _ijson(head + b"[" + buf, stream, key):  # the same document, minus the rows read
                yield None, row, None
            return
    # The last row, the array's end and the document's: parsed with the opening, which checks the
    # document as a whole.
    document = _loads(head + b"[" + buf)
    rest = document.get(key) if isinstance(document, dict) else None
    if not isinstance(rest, list):
        raise NotJSON(f"the report's {key!r} is not a list")
    _keep_others(others, document, key)
    # The last row comes with its text too, where it can be cut from the document's end: a
    # connector digests a row by its text where it has one, and a report spaced or escaped
    # otherwise than orjson writes digests differently as a parsed row — a copy of a row
    # recognized earlier then looked like another row with its id (and was quarantined).
    last = _last_text(buf, rest[0]) if recognize is not None and len(rest) == 1 else None
    for row in rest:
        yield last, row, None


def _keep_others(others: dict[str, Any] | None, document: Any, key: str) -> None:
    if others is not None and isinstance(document, dict):
        others.update((k, v) for k, v in document.items() if k != key)


def _open(stream: Readable, key: str, chunk_size: int) -> tuple[bytes, bytes, bool] | bytes:
    """(the document up to the array's `[`, what follows it, whether more may come) — or, where
    the array does not open as a top-level value within HEAD_LIMIT, everything read so far."""
    opening = re.compile(rb'"' + re.escape(json.dumps(key).encode()[1:-1]) + rb'"\s*:\s*\[')
    buf, searched, chunk = b"", 0, b"-"
    while chunk and len(buf) <= HEAD_LIMIT:
        chunk = stream.read(chunk_size)
        buf += chunk
        if buf.startswith(BOM):
            raise ByteOrderMark
        for match in opening.finditer(buf, searched):
            if _opens_top_level(buf[: match.end() - 1], key):
                return buf[: match.end() - 1], buf[match.end() :], bool(chunk)
            searched = match.end()  # the key inside something else: look further on
    return buf


def _row_by_row(buf: bytes, recognize: Recognize) -> Generator[tuple[bytes, Any, Any], None, bytes]:
    """Each whole row at the start of `buf`, as its text: recognized, or else parsed. Returns the
    rest."""
    # Whether the current row is being cut where its brackets close (its first cut did not parse).
    start, pos, closed = 0, 0, False
    while (boundary := _ROW_BOUNDARY.search(buf, pos)) is not None:
        # From the row's `{`: the array's first row comes after the `[` with the report's line
        # break and indent, which no later copy of it has (a spaced report), so its text, digested
        # and stored, never matched that copy again: the worker was "listed twice" every resync.
        text = buf[start : boundary.start() + 1].lstrip()
        token = recognize(text)
        if token is not None:
            yield text, None, token
        else:
            try:
                row = loads_lenient(text)
            except orjson.JSONDecodeError:
                # A cut inside a string or a nested object (a `_group` column): the row goes on to
                # where its brackets close. Trying the cuts one by one cost a parse of the row so
                # far each; after 16 the rest of the report went to ijson, whose rows have no
                # text, and a copy there of a row recognized earlier, digested as parsed, never
                # matched that row's text: the worker was "listed twice" every resync.
                if closed:
                    # Not even where its brackets close: the row is not all here yet (a string
                    # cut off at the buffer's end). A document that is not JSON at all fails at
                    # its end, or at STUCK_LIMIT in ijson.
                    return buf[start:]
                end = _row_end(buf, start)
                if end is None:
                    return buf[start:]  # the row goes on in the next chunk
                pos, closed = end - 1, True
                continue
            yield text, row, None
        start = pos = boundary.end() - 1
        closed = False
    return buf[start:]


# Up to the next bracket outside strings, whole strings (escapes included) and whole objects with
# no bracket inside (a nested column's entries) skipped in one step. Possessive: where no bracket
# follows (a string cut off at the buffer's end), it fails without backtracking.
_PLAIN = rb'[^"{}\[\]]++'
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_FLAT = rb"\{(?:" + _PLAIN + rb"|" + _STRING + rb")*+\}"
_TO_BRACKET = re.compile(rb"(?:" + _PLAIN + rb"|" + _STRING + rb"|" + _FLAT + rb")*+[{}\[\]]", re.S)


def _row_end(buf: bytes, start: int) -> int | None:
    """Just past the `}` closing the object that opens first at or after `buf[start]`, brackets
    inside strings skipped; None where it does not close within `buf`. A step for each bracket of
    the row outside its flat objects, and none past its end: braces counted as if none were in a
    string (a row's cuts) never balanced again after a row with a `{` in a string, and were
    counted to the buffer's end for each such row — a chunk of them took minutes. Only a guess
    where the text is not JSON (or a string is cut off): the caller takes the cut only if the
    text up to it parses."""
    opening = buf.find(b"{", start)
    if opening < 0:
        return None
    depth, pos = 1, opening + 1
    while (bracket := _TO_BRACKET.match(buf, pos)) is not None:
        pos = bracket.end()
        depth += 1 if buf[pos - 1] in b"{[" else -1
        if depth == 0:
            return pos
    return None


def _last_text(buf: bytes, row: Any) -> bytes | None:
    """The text of `row`, the one row at the start of `buf` (which goes on with the array's and the
    document's end): up to where its brackets close, if a `]` follows and it is a whole object
    equal to `row`. Found by the first `}` before a `]` that parsed, within 16 tries, a last row
    with more nested columns than that (`_group`s) had no text, and a copy of it recognized earlier
    quarantined the worker as listed twice on every resync."""
    text = buf.lstrip()
    end = _row_end(text, 0)
    if end is None or _ARRAY_END.match(text, end - 1) is None:
        return None
    try:
        parsed = loads_lenient(text[:end])
    except orjson.JSONDecodeError:
        return None
    return text[:end] if parsed == row else None


def _opens_top_level(head: bytes, key: str) -> bool:
    """Whether `head` is a document's opening up to the value of its top-level `key`."""
    try:
        opened = loads_lenient(head + b"[]}")
    except orjson.JSONDecodeError:
        return False
    return isinstance(opened, dict) and opened.get(key) == []


def _whole_rows(buf: bytes) -> tuple[list[Any], bytes]:
    """The whole rows at the start of `buf` (which starts at a row, or is empty) and the rest."""
    ends = [m.start() + 1 for m in _ROW_BOUNDARY.finditer(buf)]
    for end in reversed(ends[-CUT_TRIES:]):
        try:
            rows = loads_lenient(b"[" + buf[:end] + b"]")
        except orjson.JSONDecodeError:
            continue  # this `}` was inside a string or a nested object: an earlier one, then
        return rows, buf[buf.index(b"{", end) :]
    return [], buf


def _loads(data: bytes) -> Any:
    try:
        return loads_lenient(data)
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
        raise NotJSON(parse_error(exc)) from None
