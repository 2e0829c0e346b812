"""Two tenants of the same provider synced at once in one process (the daemon's
`max_concurrent_syncs`, an MSP with many customers of one vendor): each gets exactly its own data,
credentials, settings and log lines, as if it had synced alone. Real SDKs, emulators on
127.0.0.1, the real store."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SyncHarness

from dirpull.connectors import make_connector, okta
from dirpull.emulators.bamboohr_api import BambooHREmulator
from dirpull.emulators.google_api import GoogleEmulator
from dirpull.emulators.graph_api import GraphEmulator
from dirpull.emulators.okta_api import OktaEmulator
from dirpull.emulators.org import Org
from dirpull.emulators.server import Emulator
from dirpull.emulators.workday_api import WorkdayEmulator

SECRET_KEYS = ("api_token", "client_secret", "password", "api_key", "refresh_token")
PROVIDERS = ["okta", "okta_oauth", "okta_dpop", "entra_id", "google_workspace", "workday", "workday_oauth", "bamboohr"]


def _okta_app(e: OktaEmulator, workdir: Path, n: int) -> dict[str, Any]:
    """A service app of customer `n`'s org: the same client id at both customers (each org has its
    own app, by the same name), each with its own key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"okta{n}.pem").write_text(pem)
    e.register_oauth_client("0oadirpull", public.decode())
    return {
        "provider": "okta",
        "org_url": e.base_url,
        "client_id": "0oadirpull",
        "private_key": f"file:{workdir / f'okta{n}.pem'}",
    }


def _emulator(provider: str, org: Org, n: int) -> Emulator:
    """The vendor's emulator for customer `n`: its own people and its own credentials."""
    if provider.startswith("okta"):
        return OktaEmulator(org, api_token=f"00okta-token-of-customer-{n}-xxxxxxxxxxxx")
    if provider == "entra_id":
        return GraphEmulator(
            org,
            tenant_id=f"0785ef7c-0000-4000-8000-00000000000{n}",
            client_id=f"9a3d526c-0000-4000-8000-00000000000{n}",
            client_secret=f"graph-secret-of-customer-{n}",
        )
    if provider == "google_workspace":
        return GoogleEmulator(org)  # each emulator makes its own service-account key
    if provider.startswith("workday"):
        return WorkdayEmulator(
            org,
            tenant=f"customer{n}",
            username=f"ISU_Sync@customer{n}",
            password=f"wd-password-of-customer-{n}",
            client_secret=f"wd-client-secret-of-customer-{n}",
            refresh_token=f"wd-refresh-token-of-customer-{n}",
        )
    return BambooHREmulator(org, api_key=f"bamboo-key-of-customer-{n}-xxxxxxxx", company_domain=f"customer{n}")


def _config(provider: str, e: Any, n: int, workdir: Path) -> dict[str, Any]:
    cfg = e.tenant_config(f"customer{n}", workdir)
    if provider in ("okta_oauth", "okta_dpop"):
        if provider == "okta_dpop":
            e.dpop_required = True
        cfg = {**_okta_app(e, workdir, n), "dpop": provider == "okta_dpop"}
    if provider == "workday_oauth":
        cfg.update(username=None, password=None, token_url=e.token_url, client_id=e.client_id,
                   client_secret=e.client_secret, refresh_token=e.refresh_token)  # fmt: skip
    return cfg


MAPPED = {
    "okta": "profile.title",
    "entra_id": "department",
    "google_workspace": "organizations[primary].costCenter",
    "workday": "Cost_Center",
    "bamboohr": "division",
}


def _settings(provider: str, n: int) -> dict[str, Any]:
    """Settings that differ between the two customers (page size, mapped attributes)."""
    out: dict[str, Any] = (
        {"attributes": {"extra": MAPPED[provider.split("_oauth")[0].split("_dpop")[0]]}} if n == 1 else {}
    )
    if provider.startswith("okta"):
        return {**out, "page_size": 7 if n == 1 else 200, "backoff_base": 0.01}
    if provider == "bamboohr":
        return {**out, "page_size": 9 if n == 1 else 1000, "batch_size": 5 if n == 1 else 200}
    return out


def _without_times(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {f: v for f, v in row.items() if f not in ("created_at", "updated_at")} for k, row in rows.items()}


@pytest.fixture
def customers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, list[Emulator], dict[str, Any]]]:
    provider = request.param
    emus: list[Emulator] = []
    tenants: dict[str, Any] = {}
    try:
        for n, (people, seed) in enumerate([(40, 3), (65, 8)], start=1):
            e = _emulator(provider, Org.generate(people=people, seed=seed), n)
            e.start()
            emus.append(e)
            tenants[f"customer{n}"] = {**_config(provider, e, n, tmp_path / "keys"), **_settings(provider, n)}
        yield provider, emus, tenants
    finally:
        for e in emus:
            e.stop()


def _state(h: SyncHarness, tenant: str) -> tuple[Any, ...]:
    return _without_times(h.users(tenant)), _without_times(h.groups(tenant)), h.members(tenant)


def _sync_at_once(h: SyncHarness, tenants: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(t: str) -> None:
        try:
            results[t] = h.sync(t)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,), name=f"sync-{t}") for t in tenants]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and all(not th.is_alive() for th in threads)
    return results


@pytest.mark.parametrize("customers", PROVIDERS, indirect=True)
def test_two_customers_of_one_vendor_synced_at_once_each_get_their_own_data(customers, tmp_path, caplog, store_url):
    provider, emus, tenants = customers
    names = list(tenants)
    barrier = threading.Barrier(len(names), timeout=30)

    def factory(tenant: str, settings: Any) -> Any:
        barrier.wait()  # both runs under way before either pulls
        return make_connector(tenant, settings)

    # Alone, one after the other, in a store of its own: what each customer's store must hold.
    (tmp_path / "alone").mkdir()
    (tmp_path / "together").mkdir()
    alone = SyncHarness(tmp_path / "alone", tenants)
    together = SyncHarness(tmp_path / "together", tenants, connector_factory=factory, store_url=store_url)
    caplog.set_level(logging.DEBUG)
    try:
        for round in range(2):
            if round:
                for i, e in enumerate(emus):  # both directories change between the runs
                    with e.org.lock:
                        e.org.random_changes(6, random.Random(i))
            okta._DPOP_GENERATORS.clear()  # each harness a worker process of its own (its DPoP keys)
            seq = alone.last_seq()
            expected, alone_requests = {}, {}
            for t in names:
                r = alone.sync(t)
                assert r.status == "succeeded", r.error
                alone_requests[t] = r.requests
                expected[t] = (_state(alone, t), alone.changes(t, seq))
            for e in emus:
                e.request_log.clear()
            # The first customer's vendor has a bad minute: its retries must not show in the other's
            # run. (Google's token endpoint's 503s are retried by google-auth itself, without a
            # word: a listing's, then.)
            path = "/admin/directory/v1/users" if provider == "google_workspace" else None
            emus[0].faults.update({"error": 2, "error_status": 503, "path": path})
            caplog.clear()
            okta._DPOP_GENERATORS.clear()
            seq = together.last_seq()
            results = _sync_at_once(together, names)
            for t in names:
                assert results[t].status == "succeeded", results[t].error
                assert (_state(together, t), together.changes(t, seq)) == expected[t]
            assert expected[names[0]][0][0].keys() != expected[names[1]][0][0].keys()
            if round == 0:
                users = [expected[t][0][0].values() for t in names]
                assert any(u["custom_attributes"].get("extra") not in (None, "") for u in users[0])
                assert not any("extra" in u["custom_attributes"] for u in users[1])
            assert results[names[1]].requests == alone_requests[names[1]]
            assert results[names[0]].requests == alone_requests[names[0]] + 2
            for e in emus:
                assert e.request_log
            secrets = [str(v) for cfg in tenants.values() for k, v in cfg.items() if k in SECRET_KEYS]
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            retries = [w for w in warnings if "retry" in w or "503" in w]
            assert retries, warnings
            for line in retries:
                assert "customer1" in line and "customer2" not in line, line
            for line in [r.getMessage() for r in caplog.records]:
                assert not any(s in line for s in secrets), line
    finally:
        alone.close()
        together.close()


@pytest.mark.parametrize("provider", ["okta", "okta_oauth", "entra_id", "google_workspace", "workday", "bamboohr"])
def test_two_tenants_of_one_directory_with_the_same_credentials_keep_their_own_settings(provider, tmp_path):
    """Two tenants reading one directory with one credential (a staging copy of production's
    configuration, a second tenant for a subset): whatever is cached by credential or URL, each
    run normalizes with its own tenant's settings."""
    e = _emulator(provider, Org.generate(people=50, seed=5), 1)
    e.start()
    try:
        base = _config(provider, e, 1, tmp_path / "keys")
        extra = {"okta": {"include_everyone": True, "inactive_statuses": []}}.get(provider.split("_")[0], {})
        tenants = {"wide": {**base, **_settings(provider, 1), **extra}, "narrow": {**base, **_settings(provider, 2)}}
        (tmp_path / "alone").mkdir()
        (tmp_path / "together").mkdir()
        alone = SyncHarness(tmp_path / "alone", tenants)
        barrier = threading.Barrier(2, timeout=30)

        def factory(tenant: str, settings: Any) -> Any:
            barrier.wait()
            return make_connector(tenant, settings)

        together = SyncHarness(tmp_path / "together", tenants, connector_factory=factory)
        try:
            expected = {}
            for t in tenants:
                r = alone.sync(t)
                assert r.status == "succeeded", r.error
                expected[t] = _state(alone, t)
            assert expected["wide"] != expected["narrow"]
            results = _sync_at_once(together, list(tenants))
            for t in tenants:
                assert results[t].status == "succeeded", results[t].error
                assert _state(together, t) == expected[t]
        finally:
            alone.close()
            together.close()
    finally:
        e.stop()
