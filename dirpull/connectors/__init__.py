"""Connectors: one module per provider, loaded only when a tenant of that provider syncs
(each vendor SDK costs 0.2–0.4 s and tens of MB to import)."""

from __future__ import annotations

import importlib
from typing import Any

from dirpull.connectors.base import Connector, ConnectorError
from dirpull.connectors.http import ca_variable_problem

CONNECTOR_MODULES = {
    "bamboohr": "dirpull.connectors.bamboohr",
    "entra_id": "dirpull.connectors.entra_id",
    "google_workspace": "dirpull.connectors.google_workspace",
    "okta": "dirpull.connectors.okta",
    "workday": "dirpull.connectors.workday",
}


def make_connector(tenant: str, settings: Any) -> Connector:
    """The connector for one tenant. Each module exposes `build(tenant, settings) -> Connector`."""
    # Before the import: httplib2 checks its CA variable as it is imported.
    if (problem := ca_variable_problem(settings.provider)) is not None:
        raise ConnectorError(problem, retriable=False)
    module = importlib.import_module(CONNECTOR_MODULES[settings.provider])
    return module.build(tenant, settings)


def is_available(provider: str) -> bool:
    return importlib.util.find_spec(CONNECTOR_MODULES[provider]) is not None
