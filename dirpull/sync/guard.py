"""The mass-change guard: a run that would deactivate, reactivate, delete or remove from their
groups too much is held, not applied.

Directories fail in ways that look like data: an expired credential that lists nothing, a scope
change, a report missing a column or with its status column changed. Applying such a run would
deprovision real people downstream, or give terminated ones their access back, so past a
threshold a human decides (`dirpull sync T --dry-run`, then `--force`).
"""

from __future__ import annotations

from collections.abc import Mapping
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
    seen_groups: int,
    stored_users: int,
    stored_active_users: int,
    stored_groups: int,
    user_deletes: int,
    active_user_deletes: int,
    user_deactivations: int,
    group_deletes: int,
    user_reactivations: int = 0,
    quarantined_users: int = 0,
    member_removes: int = 0,
    stored_memberships: int = 0,
    cleared: Mapping[str, int] | None = None,
) -> Verdict:
    """`stored_users` counts every stored user, `stored_active_users` the active ones;
    `active_user_deletes` is how many of the `user_deletes` were active, `user_deactivations` how
    many active users the run turns inactive, `user_reactivations` how many stored inactive users it
    turns active (users it creates are not counted). `member_removes` counts the memberships removed
    between a user and a group that both stay (those of deleted ones are the deletions' share);
    `stored_memberships` need only be counted when `member_removes` exceeds `min_count`.
    `cleared`: for each user field, how many stored users the run empties it for."""
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
    threshold = f"threshold {settings.max_percent:g}% and more than {settings.min_count}"
    # What deprovisions people downstream, measured against the people who have access: HR
    # sources keep terminated workers as inactive records, often several times the workforce, and
    # counted in they diluted a bad report deactivating 40% of the active staff to under 10%.
    lost = user_deactivations + active_user_deletes
    if _exceeds(lost, stored_active_users, settings):
        return Verdict(
            True,
            f"would deactivate or delete {lost} of {stored_active_users} active users "
            f"({user_deactivations} deactivated, {active_user_deletes} deleted) ({threshold})",
        )
    if snapshot and 1 < stored_active_users == lost <= settings.min_count:
        # Everyone's access at once, in a tenant at or under the floor: a listing that keeps none
        # of the people with access is far more often another directory (an org URL, tenant id or
        # domain edited to another one's, a status column misread) than everyone leaving, as an
        # empty listing is. Under `min_count` it was applied: every person deprovisioned.
        return Verdict(
            True,
            f"would deactivate or delete every one of the {stored_active_users} active users "
            f"({user_deactivations} deactivated, {active_user_deletes} deleted; under the threshold's floor of "
            f"{settings.min_count}, but all of them); is it still the tenant's directory?",
        )
    # What gives access back to people who should have none: a report whose status column or
    # filter changed, or a status mapping edited, can turn many terminated workers active in one
    # run. Measured, as the deactivations, against the people who have access now: against all
    # stored users, the terminated records an HR source keeps (often several times the workforce)
    # would dilute a run giving access back to ex-employees half as many as the workforce to under
    # 10%; against the inactive ones, likewise.
    # With no one active, any number past the floor is a share past every threshold.
    stored_inactive = stored_users - stored_active_users
    if _exceeds(user_reactivations, stored_active_users, settings) or (
        stored_active_users == 0 and user_reactivations > settings.min_count
    ):
        share = (
            f"as many as {round(user_reactivations * 100.0 / stored_active_users, 1):g}% of the "
            f"{stored_active_users} active ones"
            if stored_active_users
            else "while none is active"
        )
        return Verdict(
            True,
            f"would reactivate {user_reactivations} of {stored_inactive} inactive users, {share} ({threshold}); "
            f"is the directory's status of those users right (a report, filter or status column changed)?",
        )
    # Records going, active or not: a report that silently drops every terminated worker
    # deprovisions nobody but still loses their history downstream.
    if _exceeds(user_deletes, stored_users, settings):
        return Verdict(
            True, f"would delete {user_deletes} of {stored_users} stored users, active or inactive ({threshold})"
        )
    if snapshot and seen_groups == 0 and group_deletes:
        # As for users: a listing with no groups at all (a Workday groups report emptied by a
        # filter or a security change, a scope change) would delete every group and membership of
        # a tenant with a handful of groups, under `min_count`, in one run. A tenant whose
        # provider has no groups (BambooHR) stores none, so it is never held for this.
        return Verdict(
            True,
            f"the directory returned no groups while the store holds {stored_groups} "
            f"(would delete {group_deletes} with their memberships)",
        )
    if _exceeds(group_deletes, stored_groups, settings):
        return Verdict(True, f"would delete {group_deletes} of {stored_groups} groups ({threshold})")
    # Downstream apps grant access by group: a listing that still names every group and person
    # but with emptied member lists (a groups report whose members column a filter blanked, a
    # scope that lost the members' permission) takes everyone's access away in one run.
    if _exceeds(member_removes, stored_memberships, settings):
        return Verdict(True, f"would remove {member_removes} of {stored_memberships} group memberships ({threshold})")
    # A field emptied for everyone at once is far more often the directory no longer returning it
    # (an API key that lost a permission, a scope change) than a company that dropped its emails:
    # applied, every consumer keyed on it loses it together.
    for name, count in sorted((cleared or {}).items(), key=lambda item: (-item[1], item[0])):
        if _exceeds(count, stored_users, settings):
            return Verdict(
                True,
                f"would empty {name} for {count} of {stored_users} stored users ({threshold}); "
                f"has the directory stopped returning it (a permission or scope lost)?",
            )
        break  # the most emptied field is under the threshold: so is every other
    return Verdict(False)


def next_steps(tenant: str, mode: str, provider: str | None = None) -> str:
    """What the operator runs after a hold. A held full run is reviewed and applied as a full one:
    without --full the next manual run may be incremental, and on a vendor whose deletions only a
    full listing shows (Okta) it would apply none of the deletions that were held."""
    if provider == "google_workspace":
        # Every Google run is a full snapshot already: "--full" sent the operator to a resync
        # that reads the same listing and is held again. What changes the outcome is the scope
        # (a typo in org_units / groups) or the admin's access, or applying it.
        return (
            f"every Google Workspace run reads the whole directory (--full changes nothing): if the tenant's "
            f"org_units / groups or the admin's access are wrong, fix them and sync again; otherwise review with "
            f"`dirpull sync {tenant} --dry-run`, apply with `dirpull sync {tenant} --force`"
        )
    flags = " --full" if mode == "full" else ""
    return f"review with `dirpull sync {tenant}{flags} --dry-run`, apply with `dirpull sync {tenant}{flags} --force`"
