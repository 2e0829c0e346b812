"""Normalized records every connector produces and the event types the store emits.

The field names here are the outside contract (../shared/CONTRACT.md): `--json` output, event
`data` and the store columns all use them.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dirpull.jsoncodec import canonical

State = Literal["active", "inactive"]


class User(BaseModel):
    model_config = ConfigDict(frozen=False, extra="forbid")

    idp_id: str
    username: str | None = None
    email: str | None = None
    emails: list[str] = Field(default_factory=list)
    first_name: str | None = None
    last_name: str | None = None
    display_name: str | None = None
    state: State = "active"
    job_title: str | None = None
    department: str | None = None
    employee_number: str | None = None
    manager_idp_id: str | None = None
    custom_attributes: dict[str, Any] = Field(default_factory=dict)
    raw_attributes: dict[str, Any] = Field(default_factory=dict)


class Group(BaseModel):
    model_config = ConfigDict(frozen=False, extra="forbid")

    idp_id: str
    name: str | None = None
    description: str | None = None
    email: str | None = None
    raw_attributes: dict[str, Any] = Field(default_factory=dict)


USER_FIELDS: tuple[str, ...] = tuple(User.model_fields)
GROUP_FIELDS: tuple[str, ...] = tuple(Group.model_fields)


# A user's or group's fields as the contract lists them (CONTRACT.md: Objects), then the times the
# store stamps: the order `dirpull users --json` and `groups --json` print.
_FIELD_ORDER = {
    "user": (*USER_FIELDS, "created_at", "updated_at"),
    "group": (*GROUP_FIELDS, "created_at", "updated_at"),
}


def in_contract_order(event_type: str, fields: dict[str, Any] | None) -> dict[str, Any] | None:
    """A user or group event's `data` (or `previous_attributes`) with its fields in the contract's
    order. Event data is stored as JSON whose key order is the store's, not the contract's: sorted
    on SQLite (the canonical JSON of a fingerprint), jsonb's shortest-key-first on PostgreSQL. A key
    the contract does not name keeps its place after those it names; membership data is as is."""
    order = _FIELD_ORDER.get(event_type.partition(".")[0])
    if fields is None or order is None or event_type.startswith("group.user_"):
        return fields
    out = {k: fields[k] for k in order if k in fields}
    if len(out) != len(fields):
        out.update(fields)
    return out


class EventType(StrEnum):
    USER_CREATED = "user.created"
    USER_UPDATED = "user.updated"
    USER_DELETED = "user.deleted"
    GROUP_CREATED = "group.created"
    GROUP_UPDATED = "group.updated"
    GROUP_DELETED = "group.deleted"
    GROUP_USER_ADDED = "group.user_added"
    GROUP_USER_REMOVED = "group.user_removed"


def record_fields(record: User | Group) -> dict[str, Any]:
    """The record as a plain dict (what is stored, fingerprinted and put in event data)."""
    return record.model_dump()


def fingerprint(fields: dict[str, Any]) -> str:
    """A stable digest of a record's fields.

    Connectors strip volatile vendor fields (last-login times, etags) before a record gets here,
    so the digest changes only when something a consumer cares about changed.
    """
    return digest(canonical(fields))


def digest(blob: bytes) -> str:
    """The fingerprint of a record's canonical JSON (`jsoncodec.canonical`)."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def without_nul(value: Any) -> Any:
    """`value` with NUL characters dropped from its strings (dict keys too): PostgreSQL's text and
    jsonb cannot hold one, and in a name or an attribute it is never meaningful."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value
