"""JSON encoding for fingerprints and stored JSON columns, through orjson (5–10× faster than the
standard library on these records), with the standard library as the fallback for what orjson
refuses (integers beyond 64 bits).

The bytes match `json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)` (with
`sort_keys=True` for `canonical`) for everything a connector produces — strings, integers,
booleans, None, lists, string-keyed dicts, and datetimes (passed to `str`, as before) — so stored
fingerprints stay valid. Floats are written by a different shortest-round-trip algorithm: a
record holding one may get a new fingerprint once, which rewrites its row without an event
(`diff.build_writes` tells nobody about a change without changed values).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
_SORTED = _OPTS | orjson.OPT_SORT_KEYS


def canonical(value: Any) -> bytes:
    """Compact, key-sorted UTF-8 JSON: the input of a fingerprint."""
    try:
        return orjson.dumps(value, option=_SORTED, default=str)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def dumps(value: Any) -> str:
    """Compact JSON text in the value's own key order (stored JSON columns)."""
    return compact(value).decode()


def compact(value: Any) -> bytes:
    """Compact UTF-8 JSON in the value's own key order (`dumps` without the str round trip)."""
    try:
        return orjson.dumps(value, option=_OPTS, default=str)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def loads(text: str | bytes) -> Any:
    return orjson.loads(text)


def loads_any(text: str | bytes) -> Any:
    """`loads` for vendor bodies: the standard library takes what orjson refuses (integers beyond
    64 bits), so such a body still parses as it did before."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
