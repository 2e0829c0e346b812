"""Vendor switches set over HTTP (`POST /_emulator/<vendor>`) on an emulator served in its own
process (`python -m dirpull.emulators serve`, as benchmarks and manual tests run it): the failure
modes the reference documents besides the default one can be produced there too, and the
connectors, through the vendor's SDK or client, cope with them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dirpull.config import BambooHRTenant, OktaTenant, WorkdayTenant
from dirpull.connectors.bamboohr import build as build_bamboohr
from dirpull.connectors.base import AuthError, Done, Page
from dirpull.connectors.http import RetryPolicy
from dirpull.connectors.okta import OktaConnector
from dirpull.connectors.workday import WorkdayConnector

ROOT = Path(__file__).resolve().parent.parent
PEOPLE = 40


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(provider: str) -> dict[str, Any]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dirpull.emulators", "serve", "--provider", provider, "--people", str(PEOPLE),
             "--groups", "8", "--seed", "5", "--workdir", str(tmp_path), "--age", "3600", "--max-seconds", "120"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdout is not None
        return dict(json.loads(proc.stdout.readline()))

    yield start
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()  # the emulator stops when its stdin closes
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def control(info: dict[str, Any], path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(info["base_url"] + path, json=body, timeout=10)


def pages_of(items: list[Any]) -> tuple[list[Page], Done]:
    assert isinstance(items[-1], Done) and all(isinstance(p, Page) for p in items[:-1])
    return items[:-1], items[-1]


def test_bamboohr_throttles_with_503_before_2026_09_16(serve: Any) -> None:
    info = serve("bamboohr")
    assert control(info, "/_emulator/bamboohr", {"today": "2026-09-15", "retry_after": "13"}).ok
    assert control(info, "/_emulator/faults", {"rate_limit": 1}).ok
    t = info["tenant"]
    resp = requests.get(f"{t['api_url']}/{t['company_domain']}/v1/employees/directory", auth=(t["api_key"], "x"),
                        headers={"Accept": "application/json"}, timeout=10)  # fmt: skip
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "13"

    assert control(info, "/_emulator/faults", {"rate_limit": 2}).ok
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=4, sleep=sleeps.append, jitter=0)
    connector = build_bamboohr("hr", BambooHRTenant.model_validate(t), policy=policy)
    pages, done = pages_of(list(connector.pull(None, full=True)))
    assert sleeps == [13.0, 13.0]  # the 503's Retry-After, twice, then the report
    assert len({u.idp_id for p in pages for u in p.users}) == PEOPLE and done.snapshot


@pytest.mark.parametrize(
    "switches",
    [{"rate_limit_headers": False}, {"fault_reset_in": -5}],
    ids=["429-without-rate-limit-headers", "429-whose-reset-has-passed"],
)
def test_okta_429_variants(serve: Any, switches: dict[str, Any]) -> None:
    info = serve("okta")
    assert control(info, "/_emulator/okta", switches).ok
    assert control(info, "/_emulator/faults", {"rate_limit": 3, "path": "/api/v1/groups"}).ok
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    cfg = OktaTenant.model_validate({**info["tenant"], "backoff_base": 0.01})
    pages, _ = pages_of(list(OktaConnector("t1", cfg, sleep=sleep).pull(None, full=True)))
    assert {g.idp_id for p in pages for g in p.groups}
    # No usable reset (none sent, or one already passed): an exponential backoff, not a busy retry.
    assert len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2]


def test_okta_failed_deletes_are_logged_with_their_outcome_and_the_records_stay(serve: Any) -> None:
    info = serve("okta")
    t = info["tenant"]
    auth = {"Authorization": f"SSWS {t['api_token']}"}
    users = requests.get(f"{t['org_url']}/api/v1/users", headers=auth, timeout=10).json()
    groups = requests.get(f"{t['org_url']}/api/v1/groups", headers=auth, timeout=10).json()
    uid, gid = users[0]["id"], next(g["id"] for g in groups if g["type"] == "OKTA_GROUP")
    assert control(info, "/_emulator/okta", {"failed_deletes": {uid: "FAILURE", gid: None}}).ok
    events = requests.get(f"{t['org_url']}/api/v1/logs", headers=auth, timeout=10).json()
    outcome = {(e["eventType"], e["target"][0]["id"]): e.get("outcome", {}).get("result", "none") for e in events}
    assert outcome == {
        ("user.lifecycle.delete.initiated", uid): "FAILURE",
        ("user.lifecycle.delete.completed", uid): "FAILURE",
        ("group.lifecycle.delete", gid): "none",
    }
    assert requests.get(f"{t['org_url']}/api/v1/users/{uid}", headers=auth, timeout=10).ok
    assert requests.get(f"{t['org_url']}/api/v1/groups/{gid}", headers=auth, timeout=10).ok
    again = requests.get(f"{t['org_url']}/api/v1/logs", headers=auth, timeout=10).json()
    assert len(again) == len(events)  # each logged once
    assert control(info, "/_emulator/okta", {"failed_deletes": {uid: "MAYBE"}}).status_code == 400


def test_workday_forbidden_report_and_bad_switches(serve: Any) -> None:
    info = serve("workday")
    assert control(info, "/_emulator/workday", {"forbidden": ["Worker_Groups"], "error_format": "html"}).ok
    connector = WorkdayConnector("t1", WorkdayTenant.model_validate(info["tenant"]))
    with pytest.raises(AuthError):
        list(connector.pull(None, full=True))

    for body in ({"no_such_switch": 1}, {"login_page": "false"}, {"error_format": "yaml"}):
        resp = control(info, "/_emulator/workday", body)
        assert resp.status_code == 400, body
    assert control(info, "/_emulator/okta", {}).status_code == 404  # another vendor's switches


def test_workday_token_endpoint_quoting_the_grant_sent_can_be_switched_on_over_http(serve: Any) -> None:
    """`echo_grant`, documented among the switches served over HTTP: the token endpoint quotes
    the refresh token it refused, and the connector fails the pull as a refused grant (the runner
    takes the tenant's secrets out of the run's error: test_workday_connector)."""
    info = serve("workday")
    assert control(info, "/_emulator/workday", {"echo_grant": True}).ok
    from dirpull.emulators.workday_api import WorkdayEmulator

    defaults = WorkdayEmulator.__init__.__kwdefaults__
    tenant = {k: v for k, v in info["tenant"].items() if k not in ("username", "password")}
    tenant |= {
        "token_url": f"{info['base_url']}/ccx/oauth2/{defaults['tenant']}/token",
        "client_id": defaults["client_id"],
        "client_secret": defaults["client_secret"],
        "refresh_token": "revoked-refresh-token-do-not-log",
    }
    said = requests.post(
        tenant["token_url"],
        data={"grant_type": "refresh_token", "refresh_token": tenant["refresh_token"]},
        auth=(tenant["client_id"], tenant["client_secret"]),
        timeout=10,
    ).json()
    assert said["error"] == "invalid_grant" and tenant["refresh_token"] in said["error_description"]
    connector = WorkdayConnector("t1", WorkdayTenant.model_validate(tenant))
    with pytest.raises(AuthError, match="invalid_grant"):
        list(connector.pull(None, full=True))
