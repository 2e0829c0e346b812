"""Attribute paths into a vendor record, for the tenant's `attributes` mapping and the
connectors' own field picking.

A path is dotted keys; a list step may pick an element by `[primary]` (the element whose
`primary` is true, or the vendor's own flag (`extract`), else the first), by `[key=value]`, or by index `[0]`:
  organizations[primary].costCenter · relations[type=manager].value · customSchemas.Employment.Type
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dirpull.jsoncodec import canonical

_STEP = re.compile(r"([^.\[\]]+)((?:\[[^\]]*\])*)")
_SELECTOR = re.compile(r"\[([^\]]*)\]")


def _spelled(value: Any) -> str:
    """A value as a `[key=value]` selector spells it: JSON's `true`/`false` (the records are JSON;
    `str()` gave Python's `True`, so `[primary=true]` never matched)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _primary(item: Any) -> bool:
    return isinstance(item, Mapping) and item.get("primary") is True


def _select(items: list[Any], selector: str, primary: Callable[[Any], bool] = _primary) -> Any:
    if selector == "primary":
        for item in items:
            if primary(item):
                return item
        return items[0] if items else None
    if "=" in selector:
        key, _, value = selector.partition("=")
        for item in items:
            if isinstance(item, Mapping) and _spelled(item.get(key)) == value:
                return item
        return None
    if selector.lstrip("-").isdigit():
        idx = int(selector)
        return items[idx] if -len(items) <= idx < len(items) else None
    raise ValueError(f"bad list selector [{selector}]")


_SELECTOR_FORMS = "[primary], [key=value] or [N]"
_PATH = re.compile(r"[^.\[\]]+(?:\[[^\[\]]*\])*(?:\.[^.\[\]]+(?:\[[^\[\]]*\])*)*")


def check_path(path: str) -> str:
    """`path` if `extract` can follow it, else a ValueError saying why. Checked when the
    configuration loads: a typo found only while normalizing quarantined every record whose
    value is a list at that step, with a run that still succeeded."""
    if not _PATH.fullmatch(path):
        raise ValueError(f"bad attribute path {path!r}: dotted keys, each optionally followed by {_SELECTOR_FORMS}")
    for selector in _SELECTOR.findall(path):
        if selector != "primary" and "=" not in selector and not selector.lstrip("-").isdigit():
            raise ValueError(f"bad list selector [{selector}] in {path!r}: use {_SELECTOR_FORMS}")
    return path


def extract(
    record: Mapping[str, Any], path: str, *, lone_lists: bool = False, primary: Callable[[Any], bool] = _primary
) -> Any:
    """The value at `path`, or None when any step is missing. `lone_lists`: a list step finding
    one object reads it as a list of one (Workday's `_group` columns with one entry may come as
    that object: a selector found nothing for every worker with a single email). `primary`: which
    element `[primary]` picks, for a vendor that flags it otherwise than `"primary": true`
    (Workday's `"Primary": "1"`: the first element, in no promised order, was taken)."""
    cur: Any = record
    for m in _STEP.finditer(path):
        key, selectors = m.group(1), m.group(2)
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
        for sel in _SELECTOR.findall(selectors):
            if lone_lists and isinstance(cur, Mapping):
                cur = [cur]
            if not isinstance(cur, list):
                return None
            cur = _select(cur, sel, primary)
        if cur is None:
            return None
    return cur


def mapping_root(path: str) -> str:
    """The top-level key an attribute path starts at (`profile` for `profile.costCenter`)."""
    m = _STEP.match(path)
    return m.group(1) if m else path


def map_attributes(
    record: Mapping[str, Any],
    mapping: Mapping[str, str],
    *,
    lone_lists: bool = False,
    primary: Callable[[Any], bool] = _primary,
) -> dict[str, Any]:
    """custom_attributes for one record from the tenant's `attributes` table (missing → absent);
    `lone_lists` and `primary` as for `extract`."""
    out = {}
    for name, path in mapping.items():
        value = extract(record, path, lone_lists=lone_lists, primary=primary)
        if value is not None:
            out[name] = value
    return out


def without(record: Mapping[str, Any], volatile: Iterable[str]) -> dict[str, Any]:
    """The record minus volatile top-level keys (last-login times, etags) that must never
    make a record look changed."""
    out = dict(record)  # a C-level copy, then a pop per volatile key: cheaper than filtering each key
    for key in volatile:
        out.pop(key, None)
    return out


def unordered_lists(record: dict[str, Any], first: Callable[[Any], bool] = lambda item: False) -> dict[str, Any]:
    """The record with each top-level list in one order: the items `first` picks (a primary
    entry), then the rest by their canonical JSON. For vendors whose multi-valued fields (Google's
    emails and aliases, Workday's `_group` columns) come in no promised order: the order they
    happen to be sent in must not read as a change. The record itself when no list moves."""
    out: dict[str, Any] | None = None
    for key, value in record.items():
        if isinstance(value, list) and len(value) > 1:
            ordered = sorted(value, key=lambda item: (not first(item), canonical(item)))
            if ordered != value:
                if out is None:
                    out = dict(record)
                out[key] = ordered
    return record if out is None else out


def without_nulls(value: Any) -> Any:
    """`value` with every null-valued object key left out, at any depth. For vendors that may send
    a property as null in one answer and leave it out of the next (Okta's compatibility rules):
    the same record either way."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value
