from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SyncHarness

# Keep the SDKs hermetic: no ambient credentials, config files or proxies leak into tests.
for _name in list(os.environ):
    if _name.startswith(("OKTA_CLIENT_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_")):
        del os.environ[_name]
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Any]:
    """`harness(tenants, **kw)` builds a SyncHarness on a fresh store; closed after the test."""
    made: list[SyncHarness] = []

    def make(tenants: dict[str, dict[str, Any]], **kwargs: Any) -> SyncHarness:
        h = SyncHarness(tmp_path, tenants, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
