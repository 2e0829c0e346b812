"""A connector whose pages a test writes by hand: for the runner's own behaviour (guard, leases,
failures mid-fetch), independent of any vendor. Vendor connectors are tested against emulators."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dirpull.connectors.base import ConnectorError, Done, Page, Quarantined
from dirpull.model import Group, User


def people(n: int, *, start: int = 0, **overrides: Any) -> list[User]:
    return [
        User(
            idp_id=f"u{i}",
            username=f"user{i}@example.test",
            email=f"user{i}@example.test",
            display_name=f"User {i}",
            state="active",
            **overrides,
        )
        for i in range(start, start + n)
    ]


@dataclass
class Directory:
    """What the scripted vendor serves; tests edit it between syncs."""

    users: list[User] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    members: list[tuple[str, str]] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)  # sent with the groups
    fail_after_pages: int | None = None  # raise after yielding this many pages
    page_size: int = 10
    pulls: int = 0
    cursors_seen: list[Any] = field(default_factory=list)
    gate: threading.Event | None = None  # a pull waits here after its first page
    entered: threading.Event = field(default_factory=threading.Event)
    on_page: Callable[[int], None] | None = None
    hands_over_pages: bool = True  # False: the runner diffs each page in the pull's thread


class ScriptedConnector:
    provider = "scripted"

    def __init__(self, directory: Directory) -> None:
        self.d = directory
        self.hands_over_pages = directory.hands_over_pages

    def pull(self, cursor: dict[str, Any] | None, *, full: bool) -> Iterator[Page | Done]:
        d = self.d
        d.pulls += 1
        d.cursors_seen.append(cursor)
        users = list(d.users)
        pages = 0
        for i in range(0, max(1, len(users)), d.page_size):
            if d.fail_after_pages is not None and pages >= d.fail_after_pages:
                raise ConnectorError("HTTP 500 from the directory (scripted)")
            yield Page(users=users[i : i + d.page_size])
            pages += 1
            d.entered.set()
            if d.on_page:
                d.on_page(pages)
            if d.gate is not None:
                d.gate.wait(10)
        yield Page(groups=list(d.groups), members=list(d.members), quarantined=list(d.quarantined))
        yield Done(snapshot=True, cursor={"pull": d.pulls}, mode="full", requests=pages + 1)


def factory(directory: Directory) -> Callable[[str, Any], ScriptedConnector]:
    return lambda tenant, settings: ScriptedConnector(directory)
