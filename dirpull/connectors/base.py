"""The one contract every connector fulfils.

A connector is given the tenant's settings and its stored cursor. `pull()` yields `Page`s of
normalized records as it reads them from the vendor, and finally one `Done` that says whether the
pages formed a complete snapshot (anything not seen may be deleted) or a delta (only explicit
removals delete), and what the next cursor is. A pull that ends without `Done` is incomplete and
the runner applies nothing. Connectors never touch the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from dirpull.model import Group, User

Mode = Literal["full", "incremental"]


@dataclass(slots=True)
class Quarantined:
    """A vendor record the normalizer could not read: reported on the run, never deleted."""

    kind: Literal["user", "group", "member"]
    idp_id: str | None
    reason: str


@dataclass(slots=True)
class Page:
    users: list[User] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    # (group_idp_id, user_idp_id) pairs that exist, flattened (a user in a nested group counts).
    members: list[tuple[str, str]] = field(default_factory=list)
    # (group_idp_id, [user_idp_id, ...]): the same pairs, one group at a time, for connectors that
    # read a group's members together (a snapshot's groups report, a members listing). The diff
    # digests each list as given instead of building a pair per member: a full resync of 100,000
    # users names ~0.5-0.8 M of them. Snapshots only; a delta gives pairs.
    member_lists: list[tuple[str, list[str]]] = field(default_factory=list)
    # Explicit removals, for deltas. (In a snapshot a removal only withdraws a record handed over
    # earlier in the pull: it is then not listed, deleted unless also quarantined.)
    removed_users: list[str] = field(default_factory=list)
    removed_groups: list[str] = field(default_factory=list)
    removed_members: list[tuple[str, str]] = field(default_factory=list)
    # Groups whose whole member set is given by `members` over this pull (members not listed are
    # removed). In a snapshot every group is complete without being named here.
    complete_groups: list[str] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    # Users the connector recognized as stored exactly as the vendor sends them now (their source
    # digest is known: `connectors.source`), so it did not normalize them. They count as seen.
    unchanged_users: list[str] = field(default_factory=list)
    # The source digest of each user in `users` that has one, by idp_id.
    user_sources: dict[str, str] = field(default_factory=dict)

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Every (group, user) pair this page names, from `members` and `member_lists` alike."""
        yield from self.members
        for g, users in self.member_lists:
            for u in users:
                yield g, u


@dataclass(slots=True)
class Done:
    snapshot: bool
    cursor: dict[str, Any] | None
    mode: Mode
    requests: int = 0
    # Things an operator should see on the run record, e.g. "delta token expired: full resync".
    notes: list[str] = field(default_factory=list)
    # The snapshot's groups are made from the users' own records (a Workday column), not listed by
    # the vendor: a stored group not listed may be one only a quarantined user is in, and stays
    # while they do. Otherwise a group the vendor no longer lists is deleted, whoever is in it.
    groups_from_users: bool = False


class Connector(Protocol):
    provider: str

    def pull(self, cursor: dict[str, Any] | None, *, full: bool) -> Iterator[Page | Done]:
        """Read the directory. `full=True` ignores the cursor (a manual or periodic full resync).

        A connector with `source_digests = True` also takes `known=` (`connectors.source.Known`):
        given it, it may report unchanged users by id instead of normalizing them.

        A connector with `hands_over_pages = False` makes its pages back to back from streamed
        bodies (one report, say), with no wait for the vendor between them: the runner then
        diffs each page in the thread that pulls (handing a page from one busy thread to another
        costs more than it overlaps). By default the pull runs a page ahead of the diff, in a
        thread of its own.

        A connector that counts its requests (`CountsRequests`) also says, by `requests_sent()`,
        how many its latest pull has sent so far, however that pull ended.

        A connector with `deleted_manager_leaves_reports = True` speaks for a vendor where a deleted
        user is nobody's manager any more, yet a delta does not list their reports as changed:
        when a delta deletes users, the runner clears them as the manager of the stored users
        they managed (a snapshot names every user's manager anyway)."""
        ...


class CountsRequests:
    """`requests_sent()`: what the connector's latest pull has sent so far, read by the runner
    whichever way the run ends. A `ConnectorError` carries its own count as it leaves the pull, but
    a stop request (SIGINT, SIGTERM, a lost lease) closes the pull between pages, and the run can
    fail after the pull (its pending records' disk full, the store): those runs recorded 0 requests.

    A pull names its counters as it makes them (a session, a client in another thread); each
    counter is read when asked, so the count is the live one while the pull still runs."""

    _request_counters: tuple[Callable[[], int], ...] = ()

    def requests_sent(self) -> int:
        return sum(count() for count in self._request_counters)

    def _new_pull(self, *counters: Callable[[], int]) -> None:
        """A pull starts: it has sent what `counters` count (nothing, before it makes them)."""
        self._request_counters = counters

    def _counting(self, counter: Callable[[], int]) -> None:
        """The pull made another counter (in any thread): its requests count too."""
        # One assignment of a new tuple: a reader in another thread sees the old or the new one.
        self._request_counters = (*self._request_counters, counter)


class ConnectorError(Exception):
    """A pull failed. `retriable` says whether the next scheduled fire may simply try again."""

    def __init__(
        self, message: str, *, retriable: bool = True, step: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.step = step
        self.status = status  # the HTTP status that caused it, when there was one
        self.requests = 0  # the requests the pull had sent when it failed (set as it leaves the pull)


class AuthError(ConnectorError):
    """Credentials were refused (401/403): retrying will not help until an operator acts."""

    def __init__(self, message: str, *, step: str | None = None, status: int | None = None) -> None:
        super().__init__(message, retriable=False, step=step, status=status)


class ConfigurationError(ConnectorError):
    """The tenant's configuration does not match what the directory serves (e.g. a missing column)."""

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message, retriable=False, step=step)
