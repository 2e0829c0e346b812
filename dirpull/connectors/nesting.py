"""Nested groups, flattened: dirpull stores a user as a member of every group above the one they
are directly in. Directories allow cycles and diamonds; both are cut here, once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping


def nested_groups(group: str, children: Callable[[str], Iterable[str]]) -> Iterator[str]:
    """`group` and every group below it, each once, whatever cycles the directory holds."""
    seen: set[str] = set()
    stack = [group]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        stack.extend(children(current))


def flatten(group: str, direct: Mapping[str, Iterable[str]], children: Mapping[str, Iterable[str]]) -> set[str]:
    """Users directly in `group` or in any group nested below it."""
    users: set[str] = set()
    for g in nested_groups(group, lambda g: children.get(g, ())):
        users.update(direct.get(g, ()))
    return users
