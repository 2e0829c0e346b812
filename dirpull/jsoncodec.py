"""JSON encoding for fingerprints and stored JSON columns, through orjson (5–10× faster than the
standard library on these records), with the standard library as the fallback for what orjson
refuses (writing: integers beyond 64 bits; reading: NaN, a lone surrogate). Reading, orjson takes an
integer beyond 64 bits as a float, as JavaScript would; none of the five vendors sends one (Google
writes int64 values as strings, the HR reports write every number as a string).

The bytes match `json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)` (with
`sort_keys=True` for `canonical`) for everything a connector produces — strings, integers,
booleans, None, lists, string-keyed dicts, and datetimes (passed to `str`, as before) — so stored
fingerprints stay valid. Floats are written by a different shortest-round-trip algorithm: a
record holding one may get a new fingerprint once, which rewrites its row without an event
(`diff.build_writes` tells nobody about a change without changed values).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
_SORTED = _OPTS | orjson.OPT_SORT_KEYS
_SURROGATE = re.compile("[\ud800-\udfff]")

# What stands for a value nested too deep to read (see `loads_any`). Its NUL characters make the
# diff look at it (it checks each record's JSON for a NUL already), which quarantines the record.
TOO_DEEP = "\x00dirpull: nested too deep\x00"
TOO_DEEP_JSON = b"\\u0000dirpull: nested too deep\\u0000"
MAX_DEPTH = 200  # levels a vendor body is read to: below orjson's encoder limit (255), and a
# normalizer walking a record recursively stays far from the recursion limit
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def canonical(value: Any) -> bytes:
    """Compact, key-sorted UTF-8 JSON: the input of a fingerprint."""
    try:
        return orjson.dumps(value, option=_SORTED, default=str)
    except (TypeError, orjson.JSONEncodeError):
        try:
            return _utf8(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str))
        except RecursionError:
            return canonical(_cut_value(value))


def dumps(value: Any) -> str:
    """Compact JSON text in the value's own key order (stored JSON columns)."""
    return compact(value).decode()


def compact(value: Any) -> bytes:
    """Compact UTF-8 JSON in the value's own key order (`dumps` without the str round trip)."""
    try:
        return orjson.dumps(value, option=_OPTS, default=str)
    except (TypeError, orjson.JSONEncodeError):
        try:
            return _utf8(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))
        except RecursionError:
            return compact(_cut_value(value))


def _cut_value(value: Any, depth: int = 0) -> Any:
    """`value` with each list or dict deeper than `MAX_DEPTH` levels replaced by `TOO_DEEP`: a
    value orjson parsed (up to 1,024 levels) that neither encoder can write (orjson: 255 levels;
    the standard library: the recursion limit) failed every run of its tenant. The diff
    quarantines a record holding `TOO_DEEP`. Recursive: at most `MAX_DEPTH` frames deep."""
    if isinstance(value, dict):
        return TOO_DEEP if depth >= MAX_DEPTH else {k: _cut_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return TOO_DEEP if depth >= MAX_DEPTH else [_cut_value(v, depth + 1) for v in value]
    return value


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone UTF-16 surrogate (a vendor's "\ud83d": an emoji cut in half, which Python's JSON
        # parser lets through) has no UTF-8 form, and one such value failed every run of its
        # tenant. U+FFFD takes its place, as it does for bytes a UTF-8 decoder cannot read.
        return _SURROGATE.sub("\ufffd", text).encode()


def loads(text: str | bytes) -> Any:
    return orjson.loads(text)


def loads_any(text: str | bytes) -> Any:
    """`loads` for vendor bodies: the standard library takes what orjson refuses (NaN, a lone
    surrogate), so such a body still parses; a lone surrogate becomes U+FFFD."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            # One record's attribute nested thousands of levels deep failed every run of its
            # tenant (a RecursionError in the standard library's parser): it is read as
            # `TOO_DEEP` below `MAX_DEPTH` levels, and the diff quarantines its record.
            text = _cut_deep(text if isinstance(text, str) else text.decode("utf-8", "surrogatepass"))
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass
        return without_surrogates(json.loads(text))


def _cut_deep(text: str) -> str:
    """`text` with each array or object that opens deeper than `MAX_DEPTH` levels replaced by the
    JSON string `TOO_DEEP`."""
    out: list[str] = []
    depth = 0
    kept = 0  # where the text not yet copied to `out` starts
    cut_at = -1  # where the value being cut out began (-1: none)
    sentinel = json.dumps(TOO_DEEP)
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok[0] == '"':
            continue
        if tok in "[{":
            depth += 1
            if depth > MAX_DEPTH and cut_at < 0:
                cut_at = m.start()
        else:
            depth -= 1
            if depth == MAX_DEPTH and cut_at >= 0:
                out += (text[kept:cut_at], sentinel)
                kept, cut_at = m.end(), -1
    out.append(text[kept:])
    return "".join(out)


def loads_lenient(text: str | bytes) -> Any:
    """`loads`, except that a value nested deeper than orjson reads is read as `TOO_DEEP` (as in
    `loads_any`), and a lone surrogate escape ("\\ud83d", half an emoji from a vendor whose
    strings are UTF-16), which orjson refuses, is read as U+FFFD. Anything else orjson refuses
    raises its error, so a caller can still take it for a cut in the wrong place."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            # A report row nested too deep: read as in `loads_any` (the diff quarantines it). A
            # text that still does not parse is a cut in the wrong place, as before.
            try:
                return orjson.loads(_cut_deep(text if isinstance(text, str) else text.decode("utf-8", "surrogatepass")))
            except (orjson.JSONDecodeError, UnicodeDecodeError):
                raise exc from None
        if "surrogate" not in str(exc):
            raise
        try:
            value = json.loads(text)
        except ValueError:
            raise exc from None
        return without_surrogates(value)


def has_lone_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate (what has no UTF-8 form)."""
    return _SURROGATE.search(text) is not None


def without_surrogates(value: Any) -> Any:
    """`value` with each lone surrogate in its strings (dict keys too) replaced by U+FFFD: a
    surrogate in a Python string is always a lone one, and it has no UTF-8 form."""
    if isinstance(value, str):
        return value if value.isascii() else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {without_surrogates(k): without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_surrogates(v) for v in value]
    return value
