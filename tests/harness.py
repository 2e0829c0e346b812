"""A real store and runner for sync-level tests: configure tenants, sync, read what changed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dirpull.config import Config, parse_config
from dirpull.storage.store import Store
from dirpull.sync.runner import Runner, RunResult


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on, for as long as the block runs: bound, not listening, so
    a connection to it is refused. A port bound and let go at once is free for the kernel to give
    to the next process binding port 0 (another test worker's emulator, proxy or PostgreSQL relay),
    which then answers the test's connections."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


class SyncHarness:
    def __init__(
        self,
        tmp_path: Path,
        tenants: dict[str, dict[str, Any]],
        *,
        guard: dict[str, Any] | None = None,
        store_url: str | None = None,
        defaults: dict[str, Any] | None = None,
        store: dict[str, Any] | None = None,
        **runner_kwargs: Any,
    ) -> None:
        raw: dict[str, Any] = {
            "store": {"url": store_url or f"sqlite:///{tmp_path / 'store.db'}", **(store or {})},
            "defaults": {"guard": guard or {"max_percent": 10, "min_count": 20}, **(defaults or {})},
            "tenants": tenants,
        }
        self.config: Config = parse_config(raw, tmp_path / "dirpull.toml")
        settings = self.config.store
        self.store = Store(settings.url, pool_size=settings.pool_size, connect_timeout=settings.connect_timeout)
        self.store.ensure_schema()
        self.runner = Runner(self.config, self.store, **runner_kwargs)

    def close(self) -> None:
        self.store.close()

    def sync(self, tenant: str, **kwargs: Any) -> RunResult:
        return self.runner.sync(tenant, **kwargs)

    def events(self, tenant: str, after: int = 0) -> list[dict[str, Any]]:
        return list(self.store.iter_events(tenant, after=after))

    def changes(self, tenant: str, after: int = 0) -> list[tuple[Any, ...]]:
        """Events in a compact form that is easy to compare in tests."""
        out: list[tuple[Any, ...]] = []
        for e in self.events(tenant, after):
            if e["type"] in ("group.user_added", "group.user_removed"):
                out.append((e["type"], e["data"]["group"], e["data"]["user"]))
            elif e["type"].endswith(".updated"):
                out.append((e["type"], e["data"]["idp_id"], tuple(sorted(e["previous_attributes"]))))
            else:
                out.append((e["type"], e["data"]["idp_id"]))
        return out

    def users(self, tenant: str) -> dict[str, dict[str, Any]]:
        return {u["idp_id"]: u for u in self.store.iter_users(tenant)}

    def groups(self, tenant: str) -> dict[str, dict[str, Any]]:
        return {g["idp_id"]: g for g in self.store.iter_groups(tenant)}

    def members(self, tenant: str) -> set[tuple[str, str]]:
        return set(self.store.iter_memberships(tenant))

    def last_seq(self) -> int:
        return self.store.last_seq()
