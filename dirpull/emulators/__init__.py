"""Local stand-ins for the vendors' directory APIs, all serving one synthetic organization.

Each protocol layer is a subclass of `server.Emulator` with `tenant_config(tenant, workdir)`,
which returns the `[tenants.<tenant>]` table that points a dirpull tenant at it.
"""

from __future__ import annotations

import importlib

from dirpull.emulators.org import Org
from dirpull.emulators.server import Emulator

EMULATOR_CLASSES = {
    "entra_id": "dirpull.emulators.graph_api:GraphEmulator",
    "google_workspace": "dirpull.emulators.google_api:GoogleEmulator",
    "okta": "dirpull.emulators.okta_api:OktaEmulator",
    "workday": "dirpull.emulators.workday_api:WorkdayEmulator",
    "bamboohr": "dirpull.emulators.bamboohr_api:BambooHREmulator",
}


def emulator_class(provider: str) -> type[Emulator]:
    module, _, name = EMULATOR_CLASSES[provider].partition(":")
    return getattr(importlib.import_module(module), name)


def is_available(provider: str) -> bool:
    module = EMULATOR_CLASSES[provider].partition(":")[0]
    return importlib.util.find_spec(module) is not None


__all__ = ["EMULATOR_CLASSES", "Emulator", "Org", "emulator_class", "is_available"]
