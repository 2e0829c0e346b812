"""The mass-change guard: a run that would deactivate or delete too much is held, not applied.

Directories fail in ways that look like data: an expired credential that lists nothing, a scope
change, a report missing a column. Applying such a run would deprovision real people downstream,
so past a threshold a human decides (`dirpull sync T --dry-run`, then `--force`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dirpull.config import GuardSettings


@dataclass(frozen=True)
class Verdict:
    held: bool
    reason: str | None = None


def _exceeds(count: int, total: int, settings: GuardSettings) -> bool:
    if count <= settings.min_count or total == 0:
        return False
    return count * 100.0 / total > settings.max_percent


def check(
    *,
    settings: GuardSettings,
    first_sync: bool,
    snapshot: bool,
    seen_users: int,
    stored_users: int,
    stored_groups: int,
    user_deletes: int,
    user_deactivations: int,
    group_deletes: int,
    quarantined_users: int = 0,
) -> Verdict:
    if first_sync:
        return Verdict(False)
    if snapshot and seen_users == 0 and stored_users > 0:
        # An empty listing is far more often a failure (credentials, scope, a silent API fault)
        # than a company that let everyone go: never apply it without a human.
        if quarantined_users:
            # Not an empty listing: every user in it was unreadable (`dirpull runs` says why).
            return Verdict(
                True,
                f"none of the {quarantined_users} users the directory returned could be read (quarantined) "
                f"while the store holds {stored_users}",
            )
        return Verdict(True, f"the directory returned no users while the store holds {stored_users}")
    lost = user_deletes + user_deactivations
    if _exceeds(lost, stored_users, settings):
        return Verdict(
            True,
            f"would deactivate {user_deactivations} and delete {user_deletes} of {stored_users} users "
            f"(threshold {settings.max_percent:g}% and more than {settings.min_count})",
        )
    if _exceeds(group_deletes, stored_groups, settings):
        return Verdict(
            True,
            f"would delete {group_deletes} of {stored_groups} groups "
            f"(threshold {settings.max_percent:g}% and more than {settings.min_count})",
        )
    return Verdict(False)


def next_steps(tenant: str, mode: str) -> str:
    """What the operator runs after a hold. A held full run is reviewed and applied as a full one:
    without --full the next manual run may be incremental, and on a vendor whose deletions only a
    full listing shows (Okta) it would apply none of the deletions that were held."""
    flags = " --full" if mode == "full" else ""
    return f"review with `dirpull sync {tenant}{flags} --dry-run`, apply with `dirpull sync {tenant}{flags} --force`"
