"""The Entra ID connector through msgraph-sdk against the Graph emulator over loopback HTTP:
connector-level pulls, and syncs through the real store (tests/harness.py)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import pytest
import requests
from hostile import Answer, proxying
from loopback_tls import self_signed_pem
from redirects import redirecting

from dirpull.config import parse_config
from dirpull.connectors.base import AuthError, ConnectorError, Done, Page
from dirpull.connectors.entra_id import EXPIRED_NOTE, EntraConnector, build
from dirpull.connectors.http import RetryPolicy
from dirpull.emulators.graph_api import GraphEmulator, group_id, user_id
from dirpull.emulators.org import Org


@pytest.fixture
def org() -> Org:
    return Org.generate(80, groups=10, seed=11)


@pytest.fixture
def graph(org: Org) -> Iterator[GraphEmulator]:
    with GraphEmulator(org, delta_page_size=30, member_chunk_size=7, retry_after="0.01") as emu:
        yield emu


def tenant(graph: GraphEmulator, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {**graph.tenant_config("t1", tmp_path), **extra}


def connector(
    graph: GraphEmulator, tmp_path: Path, *, sleeps: list[float] | None = None, **extra: Any
) -> EntraConnector:
    cfg = parse_config({"tenants": {"t1": tenant(graph, tmp_path, **extra)}}, tmp_path / "dirpull.toml")
    policy = RetryPolicy(
        max_attempts=5, max_total_wait=10, sleep=(sleeps.append if sleeps is not None else lambda s: None)
    )
    return build("t1", cfg.tenants["t1"], policy=policy)


def pull(c: EntraConnector, cursor: dict[str, Any] | None = None, full: bool = False) -> tuple[list[Page], Done]:
    items = list(c.pull(cursor, full=full))
    done = items[-1]
    assert isinstance(done, Done) and all(isinstance(p, Page) for p in items[:-1])
    return items[:-1], done  # type: ignore[return-value]


def expected_members(org: Org) -> set[tuple[str, str]]:
    """Flattened memberships of visible groups and users, as dirpull should store them."""
    return {(group_id(g.n), user_id(n)) for g in org.listed_groups() for n in org.transitive_members(g.n)}


# --- connector level -----------------------------------------------------------------------------


def test_initial_pull_is_a_flattened_snapshot(graph: GraphEmulator, org: Org, tmp_path: Path) -> None:
    org.soft_delete(5)
    pages, done = pull(connector(graph, tmp_path))
    assert done.snapshot and done.mode == "full" and done.notes == []
    users = {u.idp_id: u for p in pages for u in p.users}
    assert set(users) == {user_id(p.n) for p in org.listed_people()}
    assert {g.idp_id for p in pages for g in p.groups} == {group_id(g.n) for g in org.listed_groups()}
    assert {m for p in pages for m in p.pairs()} == expected_members(org)
    one = users[user_id(7)]
    person = org.person(7)
    assert (one.username, one.email, one.first_name, one.last_name) == (
        person.username, person.email, person.given, person.family)  # fmt: skip
    assert one.employee_number == person.employee_number and one.job_title == person.title
    assert one.manager_idp_id == user_id(person.manager)
    assert users[user_id(10)].emails == [org.person(10).email, org.person(10).email.replace("@", "@alias.")]
    inactive = [p.n for p in org.listed_people() if p.state == "inactive"]
    assert inactive and all(users[user_id(n)].state == "inactive" for n in inactive)
    assert set(done.cursor) == {"users", "groups", "select", "nesting"}
    assert done.cursor["nesting"] == {
        group_id(g.n): sorted(group_id(s) for s in g.subgroups) for g in org.groups.values() if g.subgroups
    }
    assert graph.tokens_issued == 1  # cached for the whole pull
    assert done.requests == graph.requests


def test_a_user_listed_as_their_own_manager_has_no_manager(graph: GraphEmulator, org: Org, tmp_path: Path) -> None:
    """No manager, as Google's connector reads it, not a manager_idp_id naming the user."""
    head = next(p for p in org.listed_people() if p.manager is not None)
    org.update_person(head.n, manager=head.n)
    users = {u.idp_id: u for p in pull(connector(graph, tmp_path))[0] for u in p.users}
    assert users[user_id(head.n)].manager_idp_id is None
    assert sum(u.manager_idp_id is not None for u in users.values()) > len(users) // 2


def test_extension_attributes_and_mapping_are_selected(graph: GraphEmulator, org: Org, tmp_path: Path) -> None:
    from dirpull.emulators.graph_api import COST_CENTER_EXTENSION

    c = connector(graph, tmp_path, extension_attributes=[COST_CENTER_EXTENSION],
                  attributes={"cost_center": COST_CENTER_EXTENSION,
                              "ext1": "onPremisesExtensionAttributes.extensionAttribute1"})  # fmt: skip
    pages, _ = pull(c)
    u = next(u for p in pages for u in p.users if u.idp_id == user_id(3))
    assert u.custom_attributes == {"cost_center": org.person(3).cost_center, "ext1": org.person(3).cost_center}


def test_cloud_picks_hosts_and_tokens_stay_on_the_graph_host(tmp_path: Path) -> None:
    import asyncio

    from dirpull.connectors.entra_id import ClientCredentialsProvider

    base = {"provider": "entra_id", "tenant_id": "t", "client_id": "c", "client_secret": "sekret-value-123"}
    for cloud, login, graph_url in (
        ("global", "https://login.microsoftonline.com", "https://graph.microsoft.com/v1.0"),
        ("usgov", "https://login.microsoftonline.us", "https://graph.microsoft.us/v1.0"),
        ("china", "https://login.chinacloudapi.cn", "https://microsoftgraph.chinacloudapi.cn/v1.0"),
    ):
        cfg = parse_config({"tenants": {"x": {**base, "cloud": cloud}}}, tmp_path / "d.toml")
        c = build("x", cfg.tenants["x"])
        assert (c.login_url, c.graph_url) == (login, graph_url)
        assert "sekret" not in repr(c)
    provider = ClientCredentialsProvider(None, "https://login.example/t/oauth2/v2.0/token", "c", "x", "scope",  # type: ignore[arg-type]
                                         "https://graph.microsoft.com/v1.0")  # fmt: skip
    for elsewhere in ("https://evil.example/v1.0/users", "http://graph.microsoft.com/v1.0/users",
                      "https://graph.microsoft.com:8443/v1.0/users"):  # fmt: skip
        assert asyncio.run(provider.get_authorization_token(elsewhere)) == ""


def test_graph_hosts_get_the_sdks_telemetry_headers_and_other_hosts_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's telemetry headers (client-request-id for support cases, sdkVersion) go to Graph's
    hosts only, as the SDK decides, though dirpull answers the host check itself (it is cheaper)."""
    import asyncio
    import time

    import httpx
    from msgraph_core.middleware import GraphTelemetryHandler

    from dirpull.connectors.entra_id import _Session, _telemetry_handler_class

    long_link = "https://graph.microsoft.com/v1.0/users/delta?$skiptoken=" + "aB3-_" * 200
    urls = [long_link, "https://graph.microsoft.us/v1.0/groups", "https://dod-graph.microsoft.us/v1.0/users",
            "https://microsoftgraph.chinacloudapi.cn/v1.0/users", "https://GRAPH.microsoft.com/beta/users",
            "http://graph.microsoft.com/v1.0/users", "https://graph.microsoft.com:8443/v1.0/users",
            "https://graph.microsoft.com.evil.example/v1.0/users", "http://127.0.0.1:8080/v1.0/users",
            "http://[::1]:8080/v1.0/users"]  # fmt: skip
    ours, sdks = _telemetry_handler_class()(), GraphTelemetryHandler()
    assert [ours.is_graph_url(httpx.URL(u)) for u in urls] == [sdks.is_graph_url(httpx.URL(u)) for u in urls]

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"value": []})

    # The Graph client's transport (the session makes its own, to close it)
    monkeypatch.setattr(httpx, "AsyncHTTPTransport", lambda **_: httpx.MockTransport(answer))
    cfg = parse_config({"tenants": {"x": {"provider": "entra_id", "tenant_id": "t", "client_id": "c",
                                          "client_secret": "s"}}}, tmp_path / "d.toml")  # fmt: skip

    async def one_request(graph_url: str) -> httpx.Request:
        session = _Session(cfg.tenants["x"], RetryPolicy(), "http://127.0.0.1:9", graph_url, "scope")  # type: ignore[arg-type]
        session.auth._token, session.auth._expires = "token", time.time() + 3600
        try:
            await session.get(session.users_delta(["id"]), step="users delta")
        finally:
            await session.close()
        return seen[-1]

    to_graph = asyncio.run(one_request("https://graph.microsoft.com/v1.0"))
    assert to_graph.headers["client-request-id"]
    assert to_graph.headers["sdkVersion"].startswith("graph-python/")
    to_loopback = asyncio.run(one_request("http://127.0.0.1:9/v1.0"))
    assert "sdkVersion" not in to_loopback.headers and "client-request-id" not in to_loopback.headers


@pytest.fixture
def untrusted_tls(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTPS server on loopback with a self-signed certificate: its URL and the paths it served."""
    import http.server
    import ssl
    import threading

    pem = self_signed_pem(tmp_path)
    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            served.append(self.path)
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_host_whose_certificate_is_not_trusted_gets_no_request(
    graph: GraphEmulator, tmp_path: Path, untrusted_tls: tuple[str, list[str]]
) -> None:
    url, served = untrusted_tls
    # Twice: the TLS settings are made once per process, and the second pull must verify too.
    for _ in range(2):
        with pytest.raises(ConnectorError, match="ConnectError"):
            pull(connector(graph, tmp_path, login_url=url))
    assert served == []  # the client secret never left


class _FailedImports:
    """Last on sys.meta_path, so asked only for the modules no other finder has."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: Sequence[str] | None, target: object = None) -> ModuleSpec | None:
        self.names.append(name)
        return None


def test_a_request_runs_no_import_that_fails(
    graph: GraphEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpcore asks sniffio which async library runs, several times a request. Without sniffio
    # installed every ask was a failed import searching the whole path: ~50 µs each, on the thread
    # every page waits for (~0.3 s of CPU in a 100,000-user pull).
    c = connector(graph, tmp_path)
    pull(c, full=True)  # what a first pull imports, once
    failed = _FailedImports()
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, failed])
    before = graph.requests
    pull(c, full=True)
    assert graph.requests - before >= 10
    assert failed.names == []


@pytest.mark.parametrize("status", [307, 302])
def test_a_graph_or_login_url_redirecting_to_another_host_is_not_followed(
    graph: GraphEmulator, tmp_path: Path, status: int
) -> None:
    # kiota drops the bearer token there: the other host's 401 cost a second token and read as
    # Graph refusing the app at graph_url; the token endpoint's redirect read as an answer
    # "without an access_token".
    with redirecting(status) as servers:
        with pytest.raises(ConnectorError) as err:
            pull(connector(graph, tmp_path, graph_url=f"{servers.redirector}/v1.0"))
        api = str(err.value)
        with pytest.raises(ConnectorError) as err:
            pull(connector(graph, tmp_path, login_url=servers.redirector))
        token = str(err.value)
    assert servers.seen == []
    assert f"delta: the answer from {servers.redirector}/v1.0/" in api and not isinstance(err.value, AuthError)
    assert f"redirects to another host ({servers.foreign}/v1.0/" in api and graph.tokens_issued == 1
    path = f"/{graph.tenant_id}/oauth2/v2.0/token"
    assert token.startswith(f"HTTP {status} from {servers.redirector}{path} redirects to another host")
    assert f"({servers.foreign}{path})" in token and "login_url" in token


def test_token_refresh_after_expiry(graph: GraphEmulator, org: Org, tmp_path: Path) -> None:
    c = connector(graph, tmp_path)
    _, done = pull(c)
    graph.faults.update({"expire_auth": 1, "path": "/v1.0/"})  # the token is refused once mid-pull
    _, done = pull(c, done.cursor)
    assert not done.snapshot and graph.tokens_issued == 3  # one per pull, plus one refresh


def test_a_token_answer_cut_off_on_the_way_is_tried_again_and_said_as_such(
    graph: GraphEmulator, org: Org, tmp_path: Path
) -> None:
    # A 200 whose body breaks off (a proxy, a connection cut mid-answer) failed the run at once as
    # "token endpoint answered without an access_token", as if Microsoft had sent no token, while
    # the same garbled body on a Graph page is an outage that is tried again.
    sleeps: list[float] = []
    graph.faults.update({"malformed": 1, "path": "/oauth2/v2.0/token"})
    pages, _ = pull(connector(graph, tmp_path, sleeps=sleeps), full=True)
    assert sum(len(p.users) for p in pages) == len(list(org.listed_people())) and len(sleeps) == 1
    graph.faults.update({"malformed": 10})
    with pytest.raises(ConnectorError) as err:
        pull(connector(graph, tmp_path), full=True)
    msg = str(err.value)
    assert msg.startswith(f"token: malformed JSON from POST {graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token")
    assert "gave up after 5 attempts" in msg and "without an access_token" not in msg


def test_wrong_secret_is_an_auth_error_without_the_secret(graph: GraphEmulator, tmp_path: Path) -> None:
    c = connector(graph, tmp_path, client_secret="not-the-secret-xyz")
    with pytest.raises(AuthError) as exc:
        pull(c)
    assert "AADSTS7000215" in str(exc.value) and "not-the-secret-xyz" not in str(exc.value)


@pytest.mark.parametrize(
    ("status", "content_type", "body", "said"),
    [
        (401, "application/json", b'{"error":"invalid_client"}', "refused: invalid_client"),
        (400, "application/json", b'{"error":"invalid_request","error_description":""}', "refused: invalid_request"),
        (401, "text/html", b"<html><body><h1>401 Authorization Required</h1><p>client_secret=SECRET</p></body></html>",
         "refused: HTTP 401: 401 Authorization Required client_secret=***"),
        (403, "text/plain", b"", "refused: HTTP 403, no reason given"),
    ],
)
def test_a_token_refusal_quotes_what_the_endpoint_said(
    graph: GraphEmulator, tmp_path: Path, status: int, content_type: str, body: bytes, said: str
) -> None:
    """A token endpoint (or a gateway before it) refusing with an `error` but no
    `error_description`, or with a page that is not JSON: the run's error read only "refused:
    HTTP 401", dropping the `invalid_client` that says which credential to check."""

    def refuse(answer: Answer) -> Answer | None:
        if "/oauth2/v2.0/token" not in answer.path:
            return None
        return Answer(answer.path, status, [("Content-Type", content_type)],
                      body.replace(b"SECRET", graph.client_secret.encode()))  # fmt: skip

    with proxying(graph.base_url, refuse) as proxy, pytest.raises(AuthError) as exc:
        pull(connector(graph, tmp_path, login_url=proxy.base_url))
    message = str(exc.value)
    assert message == f"token request to {proxy.base_url}/{graph.tenant_id}/oauth2/v2.0/token {said}"
    assert graph.client_secret not in message


@pytest.mark.parametrize("host", ["login_url", "graph_url"])
def test_a_host_that_cannot_be_reached_is_named_in_the_error(graph: GraphEmulator, tmp_path: Path, host: str) -> None:
    """A run that gives up on a dropped or refused connection says where it tried to go: the token
    endpoint's failure named no URL at all ("token: ConnectError"), and Graph's first request
    only its path, so a wrong `login_url`/`graph_url` or cloud could not be told from an outage."""
    from harness import closed_port

    with closed_port() as port:
        closed = f"http://127.0.0.1:{port}"
        url = closed if host == "login_url" else closed + "/v1.0"
        with pytest.raises(ConnectorError, match="gave up after 5 attempts") as exc:
            pull(connector(graph, tmp_path, **{host: url}))
    assert closed in str(exc.value) and "ConnectError" in str(exc.value)
    assert graph.client_secret not in str(exc.value)


def test_429_storm_is_retried_honouring_retry_after(graph: GraphEmulator, tmp_path: Path) -> None:
    sleeps: list[float] = []
    graph.retry_after = "1.5"
    graph.faults.update({"rate_limit": 3, "path": "/v1.0/users/delta"})
    pages, done = pull(connector(graph, tmp_path, sleeps=sleeps))
    assert done.snapshot and sleeps == [1.5, 1.5, 1.5]
    assert len({u.idp_id for p in pages for u in p.users}) == 80


def throttled_once(graph: GraphEmulator, tmp_path: Path, retry_after: str, sleeps: list[float]) -> EntraConnector:
    """A connector with the default retry budget (300 s of waiting), its first users page a 429."""
    cfg = parse_config({"tenants": {"t1": tenant(graph, tmp_path)}}, tmp_path / "dirpull.toml")
    graph.retry_after = retry_after
    graph.faults.update({"rate_limit": 1, "path": "/v1.0/users/delta"})
    return build("t1", cfg.tenants["t1"], policy=RetryPolicy(max_total_wait=300, sleep=sleeps.append))


def test_a_retry_after_longer_than_a_backoff_step_is_waited_in_full(graph: GraphEmulator, tmp_path: Path) -> None:
    # Retried after 60 s (the backoff's own cap) when Graph asked for 90: another 429, an attempt spent.
    sleeps: list[float] = []
    _, done = pull(throttled_once(graph, tmp_path, "90", sleeps))
    assert done.snapshot and sleeps == [90.0]


def test_a_retry_after_past_the_runs_wait_budget_fails_at_once(graph: GraphEmulator, tmp_path: Path) -> None:
    sleeps: list[float] = []
    with pytest.raises(ConnectorError, match=r"waiting 400\.0s more would pass the 300s cap"):
        pull(throttled_once(graph, tmp_path, "400", sleeps))
    assert sleeps == []


def test_retry_caps_fail_the_pull(graph: GraphEmulator, tmp_path: Path) -> None:
    sleeps: list[float] = []
    graph.faults.update({"error": 100, "error_status": 503, "path": "/v1.0/groups/delta"})
    with pytest.raises(ConnectorError, match="gave up after 5 attempts"):
        pull(connector(graph, tmp_path, sleeps=sleeps))
    assert len(sleeps) == 4


def test_users_and_groups_rounds_are_walked_side_by_side(graph: GraphEmulator, org: Org, tmp_path: Path) -> None:
    pages, done = pull(connector(graph, tmp_path))
    paths = [path for method, path in graph.request_log if method == "GET"]
    users_at = [i for i, p in enumerate(paths) if "/users/delta" in p]
    groups_at = [i for i, p in enumerate(paths) if "/groups/delta" in p]
    assert len(users_at) >= 3 and len(groups_at) >= 3
    assert groups_at[0] < users_at[0]  # the groups round's cut-off comes first...
    assert users_at[0] < groups_at[-1]  # ...and the users round begins while it is under way
    assert {u.idp_id for p in pages for u in p.users} == {user_id(p.n) for p in org.listed_people()}
    assert {m for p in pages for m in p.pairs()} == expected_members(org)
    assert set(done.cursor or {}) >= {"users", "groups"}


def test_delta_round_merges_chunks_and_rereads_nested_groups(graph: GraphEmulator, org: Org, tmp_path: Path) -> None:
    c = connector(graph, tmp_path)
    _, done = pull(c)
    parent = next(g for g in org.groups.values() if g.subgroups)
    child = next(iter(parent.subgroups))
    joiner = next(n for n in range(80, 0, -1) if n not in org.transitive_members(parent.n))
    org.add_member(child, joiner)  # a change below a nested group
    plain = next(g for g in org.groups.values() if not g.subgroups and g.n != child
                 and not any(g.n in x.subgroups for x in org.groups.values()))  # fmt: skip
    leaver = min(plain.members)
    org.remove_member(plain.n, leaver)
    pages, done2 = pull(c, done.cursor)
    assert not done2.snapshot and done2.mode == "incremental"
    members = {m for p in pages for m in p.pairs()}
    complete = {g for p in pages for g in p.complete_groups}
    assert (group_id(child), user_id(joiner)) in members
    assert group_id(parent.n) in complete
    assert {m for m in members if m[0] == group_id(parent.n)} == {
        (group_id(parent.n), user_id(n)) for n in org.transitive_members(parent.n)
    }
    assert {m for p in pages for m in p.removed_members} == {(group_id(plain.n), user_id(leaver))}


def test_an_object_listed_twice_on_one_page_is_what_its_last_record_says(
    graph: GraphEmulator, org: Org, tmp_path: Path
) -> None:
    # Graph may list an object several times in a round (directory-apis §1.1); here a replayed
    # @removed comes first and the live record right after it, on the same page, in both rounds.
    grp = next(g for g in org.groups.values() if g.members)
    graph.stale_removals |= {user_id(7), group_id(grp.n)}
    c = connector(graph, tmp_path)
    pages, done = pull(c)
    assert not graph.stale_removals  # both replays were served (each just before its live record)
    assert user_id(7) in {u.idp_id for p in pages for u in p.users}
    assert group_id(grp.n) in {g.idp_id for p in pages for g in p.groups}
    assert [r for p in pages for r in p.removed_users + p.removed_groups] == []
    assert {m for p in pages for m in p.pairs()} == expected_members(org)

    org.rename(7, "Still", "Here")
    org.update_group(grp.n, name="Still Here")
    graph.stale_removals |= {user_id(7), group_id(grp.n)}
    pages, done = pull(c, done.cursor)
    assert done.mode == "incremental" and not graph.stale_removals
    assert [u.idp_id for p in pages for u in p.users] == [user_id(7)]
    assert [g.name for p in pages for g in p.groups] == ["Still Here"]
    assert [r for p in pages for r in p.removed_users + p.removed_groups] == []


# --- sync level ------------------------------------------------------------------------------------


@pytest.fixture
def synced(harness: Any, graph: GraphEmulator, tmp_path: Path) -> Any:
    h = harness({"t1": tenant(graph, tmp_path)}, guard={"max_percent": 50, "min_count": 20})
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    assert r.mode == "full"
    return h


def test_initial_sync_then_unchanged_sync_emits_nothing(synced: Any, org: Org) -> None:
    h = synced
    assert set(h.users("t1")) == {user_id(p.n) for p in org.listed_people()}
    assert h.members("t1") == expected_members(org)
    seq = h.last_seq()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental"
    assert h.changes("t1", after=seq) == []
    r = h.sync("t1", full=True)
    assert r.status == "succeeded" and r.mode == "full"
    assert h.changes("t1", after=seq) == []


def test_a_property_graph_clears_or_leaves_out_is_none_whichever_round_reads_it(
    synced: Any, graph: GraphEmulator, org: Org
) -> None:
    """Graph's delta sends a cleared property as null and leaves out one never set (the emulator
    does both): either way it is None in the store, and a delta and a full walk agree on it."""
    h = synced
    seq = h.last_seq()
    org.update_person(40, title=None, department=None)  # cleared: sent as null
    org.update_group(3, description=None)
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert h.changes("t1", after=seq) == [
        ("user.updated", user_id(40), ("department", "job_title", "raw_attributes")),
        ("group.updated", group_id(3), ("description", "raw_attributes")),
    ]
    seq = h.last_seq()
    org.rename(40, "Still", "Untitled")  # now never set as far as Graph says: left out of the record
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert h.changes("t1", after=seq) == [
        ("user.updated", user_id(40), ("display_name", "first_name", "last_name", "raw_attributes")),
    ]
    user = h.users("t1")[user_id(40)]
    assert user["job_title"] is None and user["department"] is None
    assert "jobTitle" not in user["raw_attributes"] and "department" not in user["raw_attributes"]
    assert h.groups("t1")[group_id(3)]["description"] is None
    seq = h.last_seq()
    assert h.sync("t1", full=True).mode == "full"
    assert h.changes("t1", after=seq) == []


def test_guest_users_are_synced_with_their_user_type_and_turn_into_members(
    synced: Any, graph: GraphEmulator, org: Org
) -> None:
    """Graph lists invited external users (userType Guest, an #EXT# userPrincipalName) with the
    members; dirpull syncs them as users, and consumers tell them apart by raw_attributes.userType.
    Turning a guest into a member (or back) changes userType and the UPN: an update."""
    h = synced
    seq = h.last_seq()
    guest = org.hire("Gina", "Partner", manager=None)
    org.update_person(guest.n, guest=True)
    org.update_person(44, guest=True)
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    local, domain = guest.username.split("@")
    ext = f"{local}_{domain}#EXT#@{domain.split('.')[0]}.onmicrosoft.com"
    assert sorted(c[:2] for c in h.changes("t1", after=seq)) == [
        ("user.created", user_id(guest.n)), ("user.updated", user_id(44))]  # fmt: skip
    stored = h.users("t1")[user_id(guest.n)]
    assert (stored["username"], stored["email"], stored["state"]) == (ext, guest.email, "active")
    assert stored["raw_attributes"]["userType"] == "Guest"
    assert h.users("t1")[user_id(44)]["raw_attributes"]["userType"] == "Guest"

    seq = h.last_seq()
    org.update_person(guest.n, guest=False)  # converted to an internal member
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert h.changes("t1", after=seq) == [("user.updated", user_id(guest.n), ("raw_attributes", "username"))]
    stored = h.users("t1")[user_id(guest.n)]
    assert stored["username"] == guest.username and stored["raw_attributes"]["userType"] == "Member"
    seq = h.last_seq()
    assert h.sync("t1", full=True).mode == "full"
    assert h.changes("t1", after=seq) == []


def test_a_round_of_changes_gives_exactly_the_expected_events(synced: Any, org: Org) -> None:
    h = synced
    before_members = expected_members(org)
    seq = h.last_seq()
    org.soft_delete(20)
    h.sync("t1")  # soft delete now, restore in the next round
    seq_restore = h.last_seq()
    assert ("user.deleted", user_id(20)) in h.changes("t1", after=seq)

    parent = next(g for g in org.groups.values() if g.subgroups)
    child = next(iter(parent.subgroups))
    other = next(g for g in org.groups.values() if g.n not in (parent.n, child) and g.members and not g.subgroups
                 and not any(g.n in x.subgroups for x in org.groups.values()))  # fmt: skip
    doomed = next(g for g in org.groups.values() if g.n not in (parent.n, child, other.n) and g.members
                  and not any(g.n in x.subgroups for x in org.groups.values()) and not g.subgroups)  # fmt: skip
    hire = org.hire("Nova", "Hire", manager=1)  # hire
    org.add_member(other.n, hire.n)  # group join
    active = [p.n for p in org.listed_people() if p.state == "active" and p.n > 20]
    disabled, soft, hard, renamed = active[:4]
    org.deactivate(disabled)  # disable
    org.soft_delete(soft)  # soft delete
    org.delete(hard)  # hard delete
    org.rename(renamed, "Renamed", "Person")  # rename
    org.restore(20)  # restore
    leaver = min(other.members - {hire.n})
    org.remove_member(other.n, leaver)  # group leave
    org.delete_group(doomed.n)  # group delete
    newcomer = next(n for n in active[4:] if n not in org.transitive_members(parent.n))
    org.add_member(child, newcomer)  # nested group change

    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    after_members = expected_members(org)
    got = h.changes("t1", after=seq_restore)
    expected_users = {
        ("user.created", user_id(hire.n)),
        ("user.created", user_id(20)),
        ("user.updated", user_id(disabled), ("raw_attributes", "state")),
        ("user.updated", user_id(renamed), ("display_name", "first_name", "last_name", "raw_attributes")),
        ("user.deleted", user_id(soft)),
        ("user.deleted", user_id(hard)),
        ("group.deleted", group_id(doomed.n)),
    }
    before_round = before_members - {(g, u) for g, u in before_members if u == user_id(20)}
    expected_member_events = {("group.user_added", g, u) for g, u in after_members - before_round} | {
        ("group.user_removed", g, u) for g, u in before_round - after_members
    }
    assert len(got) == len(set(got))
    assert set(got) == expected_users | expected_member_events
    assert ("group.user_added", group_id(parent.n), user_id(newcomer)) in expected_member_events
    assert h.members("t1") == after_members
    seq = h.last_seq()
    assert h.sync("t1").status == "succeeded" and h.changes("t1", after=seq) == []


def test_a_replayed_removal_before_the_live_record_on_one_page_deletes_nothing(
    synced: Any, graph: GraphEmulator, org: Org
) -> None:
    h = synced
    seq, members = h.last_seq(), h.members("t1")
    grp = next(g for g in org.groups.values() if g.members)
    org.rename(7, "Still", "Here")
    org.update_group(grp.n, description="still here")
    graph.stale_removals |= {user_id(7), group_id(grp.n)}
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert not graph.stale_removals
    assert {c[:2] for c in h.changes("t1", after=seq)} == {
        ("user.updated", user_id(7)), ("group.updated", group_id(grp.n))}  # fmt: skip
    assert user_id(7) in h.users("t1") and group_id(grp.n) in h.groups("t1")
    assert h.members("t1") == members == expected_members(org)


class _CutOffRace(GraphEmulator):
    """Runs `change` once, between the cut-offs of a run's two delta rounds (a round's cut-off is
    its first request): when the other round's first request comes in, before it is answered."""

    change: Any = None
    first_round: str | None = None

    def _delta_inner(self, req: Any, kind: str) -> Any:
        if self.change is not None and req.arg("$skiptoken") is None:
            if self.first_round is None:
                self.first_round = kind
            elif kind != self.first_round:
                change, self.change = self.change, None
                change()
        return super()._delta_inner(req, kind)


@pytest.mark.parametrize("first_sync", [False, True], ids=["incremental", "full"])
def test_a_user_created_between_the_two_rounds_cut_offs_keeps_their_memberships(
    harness: Any, tmp_path: Path, first_sync: bool
) -> None:
    org = Org.generate(40, groups=5, seed=4)
    # One page per users round: the round has ended when the change comes.
    with _CutOffRace(org, delta_page_size=1000, member_chunk_size=7, retry_after="0.01") as graph:
        h = harness({"t1": tenant(graph, tmp_path)}, guard={"max_percent": 100, "min_count": 1000})
        if not first_sync:
            assert h.sync("t1").status == "succeeded"
        target = next(g for g in org.groups.values() if g.members and not g.subgroups
                      and not any(g.n in x.subgroups for x in org.groups.values()))  # fmt: skip
        hired: list[int] = []

        def hire_and_add() -> None:
            p = org.hire("Race", "Condition")
            org.add_member(target.n, p.n)
            hired.append(p.n)

        graph.change = hire_and_add
        r = h.sync("t1")
        assert r.status == "succeeded" and r.mode == ("incremental" if not first_sync else "full"), r.error
        assert hired
        new_user_stored = user_id(hired[0]) in h.users("t1")
        pair = (group_id(target.n), user_id(hired[0]))
        r = h.sync("t1")  # the membership is in this run's groups round, if it was not in the last
        assert r.status == "succeeded" and r.mode == "incremental"
        assert pair in h.members("t1")
        assert h.members("t1") == expected_members(org)
        # The users round began after the change: the user came in the same run.
        assert new_user_stored


class _LeaveBetweenChunks(GraphEmulator):
    """Runs `change` once, between two pages of a groups round that both carry a chunk of
    `group`'s members@delta: right after the page with its first chunk is answered."""

    group: str | None = None
    change: Any = None
    _pending: Any = None

    def _delta_inner(self, req: Any, kind: str) -> Any:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending()
        resp = super()._delta_inner(req, kind)
        body = resp.body if isinstance(resp.body, dict) else {}
        chunked = any(i.get("id") == self.group and "members@delta" in i for i in body.get("value", ()))
        if self.change is not None and kind == "groups" and chunked and "@odata.nextLink" in body:
            self._pending, self.change = self.change, None
        return resp


def test_a_member_leaving_while_a_walk_reads_a_large_group_hides_no_other_member(
    harness: Any, org: Org, tmp_path: Path
) -> None:
    """A large group's members come in chunks over several pages of a round. A member who leaves
    between two of those pages must not take another member's place: that member never changes,
    so no later round would name them, and their membership was gone until a full walk that
    happened not to race a change."""
    big = next(g for g in sorted(org.groups.values(), key=lambda g: -len(g.members))
               if not g.subgroups and not any(g.n in x.subgroups for x in org.groups.values()))  # fmt: skip
    assert len(big.members) > 2 * 7  # three chunks at least
    with _LeaveBetweenChunks(org, delta_page_size=30, member_chunk_size=7, retry_after="0.01") as graph:
        graph.group = group_id(big.n)
        graph.change = lambda: org.remove_member(big.n, min(big.members))
        h = harness({"t1": tenant(graph, tmp_path)}, guard={"max_percent": 50, "min_count": 20})
        r = h.sync("t1")
        assert r.status == "succeeded" and r.mode == "full", r.error
        assert graph.change is None  # the member left between two chunks
        r = h.sync("t1")  # the leave itself comes in this round
        assert r.status == "succeeded" and r.mode == "incremental", r.error
        assert h.members("t1") == expected_members(org)


@pytest.mark.parametrize("first_sync", [True, False], ids=["full", "incremental"])
def test_a_replayed_group_removal_between_two_member_chunks_keeps_the_earlier_chunks(
    harness: Any, org: Org, tmp_path: Path, first_sync: bool
) -> None:
    """Graph may replay an object's @removed in a round, the live record following (§1.1 "Delta
    caveats"); a large group comes back on several pages, a chunk of members@delta on each. A
    replay that lands between two chunks must not drop the chunks before it: in a full walk that
    deleted those memberships, in a delta it lost the member changes they named."""
    big = next(g for g in sorted(org.groups.values(), key=lambda g: -len(g.members))
               if not g.subgroups and not any(g.n in x.subgroups for x in org.groups.values()))  # fmt: skip
    with _LeaveBetweenChunks(org, delta_page_size=30, member_chunk_size=7, retry_after="0.01") as graph:
        graph.group = group_id(big.n)
        h = harness({"t1": tenant(graph, tmp_path)}, guard={"max_percent": 100, "min_count": 1000})
        if not first_sync:
            assert h.sync("t1").status == "succeeded"
            joiners = [n for n in range(80, 0, -1) if n not in big.members and org.people[n].visible][:10]
            for n in joiners:  # more member changes than one chunk holds
                org.add_member(big.n, n)
        graph.change = lambda: graph.stale_removals.add(group_id(big.n))
        r = h.sync("t1")
        assert r.status == "succeeded" and r.mode == ("full" if first_sync else "incremental"), r.error
        assert graph.change is None and not graph.stale_removals  # replayed before the second chunk
        assert group_id(big.n) in h.groups("t1")
        assert h.members("t1") == expected_members(org)


class _ChangeBeforeMembersRead(GraphEmulator):
    """Runs `change` once, when `/groups/{group}/members` is asked for, before it is answered."""

    group: str | None = None
    change: Any = None

    def _members(self, req: Any) -> Any:
        if self.change is not None and req.params.get("gid") == self.group:
            change, self.change = self.change, None
            change()
        return super()._members(req)


def test_a_nested_group_changed_while_its_parent_is_reread_is_corrected_by_the_next_delta(
    harness: Any, tmp_path: Path
) -> None:
    """A delta re-reads a changed parent group's tree with /groups/{id}/members. A subgroup read
    there is not replaced in the store (only the parent is), so the nesting the cursor keeps for it
    must stay what its stored members were flattened from. It took what was just read instead: a
    child group taken out of it between the round's cut-off and that read made the next round's
    "child removed" look like a change to a group without children, and the child's users stayed
    members of it until the next full reconciliation."""
    org = Org.generate(60, groups=8, seed=3)
    for g in org.groups.values():  # no nesting but the one made here
        for child in list(g.subgroups):
            org.remove_subgroup(g.n, child)
    top, middle, bottom = sorted(org.groups.values(), key=lambda g: -len(g.members))[:3]
    org.add_subgroup(top.n, middle.n)
    org.add_subgroup(middle.n, bottom.n)
    assert bottom.members - middle.members - top.members  # users the nesting alone puts in top and middle
    with _ChangeBeforeMembersRead(org, delta_page_size=30, member_chunk_size=7, retry_after="0.01") as graph:
        h = harness({"t1": tenant(graph, tmp_path)}, guard={"max_percent": 100, "min_count": 1000})
        assert h.sync("t1").status == "succeeded"
        assert h.members("t1") == expected_members(org)
        org.add_member(top.n, next(n for n in range(60, 0, -1) if n not in top.members))  # top is re-read
        graph.group = group_id(middle.n)
        graph.change = lambda: org.remove_subgroup(middle.n, bottom.n)
        r = h.sync("t1")
        assert r.status == "succeeded" and r.mode == "incremental", r.error
        assert graph.change is None  # the subgroup left as the middle group was read
        r = h.sync("t1")  # the round that lists that change
        assert r.status == "succeeded" and r.mode == "incremental", r.error
        assert h.members("t1") == expected_members(org)


@pytest.mark.parametrize("every_change", [True, False], ids=["manager-repeated", "manager-only-on-change"])
def test_a_later_round_keeps_managers_whichever_way_graph_names_them(
    harness: Any, graph: GraphEmulator, org: Org, tmp_path: Path, every_change: bool
) -> None:
    """Whether a later delta round repeats an unchanged manager in manager@delta is not settled (users
    report it does not): a user listed for another change keeps their manager either way, and a
    manager changed or taken away is seen either way."""
    graph.manager_on_every_change = every_change
    h = harness({"t1": tenant(graph, tmp_path)}, guard={"max_percent": 50, "min_count": 20})
    assert h.sync("t1").status == "succeeded"
    managed = [p.n for p in org.listed_people() if p.manager is not None and org.people[p.manager].visible]
    retitled, moved, unmanaged = managed[:3]
    new_boss = next(n for n in managed[3:] if n not in (retitled, moved, unmanaged, org.people[moved].manager))
    org.update_person(retitled, title="Chief Delta Officer")
    org.update_person(moved, manager=new_boss)
    org.update_person(unmanaged, manager=None)
    seq = h.last_seq()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert sorted(h.changes("t1", after=seq)) == sorted([
        ("user.updated", user_id(retitled), ("job_title", "raw_attributes")),
        ("user.updated", user_id(moved), ("manager_idp_id",)),
        ("user.updated", user_id(unmanaged), ("manager_idp_id",)),
    ])  # fmt: skip
    stored = h.users("t1")
    assert stored[user_id(retitled)]["manager_idp_id"] == user_id(org.people[retitled].manager)
    assert stored[user_id(moved)]["manager_idp_id"] == user_id(new_boss)
    assert stored[user_id(unmanaged)]["manager_idp_id"] is None


@pytest.mark.parametrize("how", ["deleted", "soft-deleted"])
@pytest.mark.parametrize("every_change", [True, False], ids=["manager-repeated", "manager-only-on-change"])
def test_reports_of_a_deleted_manager_lose_that_manager_in_the_next_delta(
    harness: Any, graph: GraphEmulator, org: Org, tmp_path: Path, how: str, every_change: bool
) -> None:
    """Deleting a manager takes the manager link off their reports (`GET /users/{id}/manager`
    answers 404, a full walk names no manager), but Graph is not known to list those reports in
    users/delta: the incremental run must still leave them as a full run would, not naming a
    manager who no longer exists until the next full reconciliation."""
    graph.manager_on_every_change = every_change
    h = harness({"t1": tenant(graph, tmp_path)}, guard={"max_percent": 50, "min_count": 20})
    assert h.sync("t1").status == "succeeded"
    bosses = sorted({p.manager for p in org.listed_people() if p.manager not in (None, 1)})
    boss = bosses[0]
    reports = sorted(p.n for p in org.listed_people() if p.manager == boss)
    assert len(reports) >= 2
    retitled, untouched = reports[0], reports[1:]
    org.update_person(retitled, title="Listed Anyway")  # listed in the round for another reason
    (org.delete if how == "deleted" else org.soft_delete)(boss)
    seq = h.last_seq()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    stored = h.users("t1")
    assert all(stored[user_id(n)]["manager_idp_id"] is None for n in reports)
    updates = {c[1]: c[2] for c in h.changes("t1", after=seq) if c[0] == "user.updated"}
    assert updates[user_id(retitled)] == ("job_title", "manager_idp_id", "raw_attributes")
    assert all(updates[user_id(n)] == ("manager_idp_id",) for n in untouched)
    assert ("user.deleted", user_id(boss)) in h.changes("t1", after=seq)
    # The periodic full reconciliation finds nothing left to correct.
    seq = h.last_seq()
    r = h.sync("t1", full=True)
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert h.changes("t1", after=seq) == []


def test_manager_reads_throttled_together_wait_once(
    harness: Any, graph: GraphEmulator, org: Org, tmp_path: Path
) -> None:
    """The manager reads of a later round are in flight eight at a time, and Graph throttles them
    together: the run waits out one Retry-After for all of them, not eight in turn, each charged
    to max_retry_wait (a run that should have paused a second failed as having waited too long)."""
    graph.manager_on_every_change = False
    graph.retry_after = "1"
    h = harness({"t1": tenant(graph, tmp_path, max_retry_wait=3)}, guard={"max_percent": 50, "min_count": 20})
    assert h.sync("t1").status == "succeeded"
    managed = [p.n for p in org.listed_people() if p.manager is not None and org.people[p.manager].visible]
    for n in managed[:16]:
        org.update_person(n, title=f"Retitled {n}")
    graph.faults.update({"rate_limit": 8, "path": "/manager"})
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert graph.faults.rate_limit == 0  # all eight were throttled
    stored = h.users("t1")
    assert all(stored[user_id(n)]["manager_idp_id"] == user_id(org.people[n].manager) for n in managed[:16])
    # One wait: ~1.1 s idle, 1.65 s on a loaded CI machine; eight in turn take 8 s or more.
    assert r.duration_s < 6


def test_a_manager_read_that_fails_the_run_does_not_wait_out_another_reads_back_off(
    harness: Any, graph: GraphEmulator, org: Org, tmp_path: Path
) -> None:
    """One manager read of a later round is refused (403) while another, beside it, waits out a
    Retry-After: the run fails at once, instead of waiting that back-off out (up to max_retry_wait)
    before it could say it failed."""
    graph.manager_on_every_change = False
    h = harness({"t1": tenant(graph, tmp_path, max_retry_wait=120)}, guard={"max_percent": 50, "min_count": 20})
    assert h.sync("t1").status == "succeeded"
    managed = [p.n for p in org.listed_people() if p.manager is not None and org.people[p.manager].visible]
    for n in managed[:16]:
        org.update_person(n, title=f"Retitled {n}")
    graph.retry_after = "20"
    graph.faults.update({"rate_limit": 1, "error": 1, "error_status": 403, "path": "/manager"})
    r = h.sync("t1")
    assert r.status == "failed" and "user manager" in (r.error or ""), r.error
    assert graph.faults.rate_limit == 0 and graph.faults.error == 0
    assert r.duration_s < 10, f"the run waited {r.duration_s:.1f}s for another manager read's back-off"


def test_devices_service_principals_and_contacts_in_groups_are_not_memberships(
    synced: Any, graph: GraphEmulator, org: Org
) -> None:
    """Graph groups hold devices, service principals and org contacts too (in members@delta and in
    /members): they are not users, so never memberships, and do not upset a nested group's re-read."""
    h = synced
    holder = next(n for n in sorted(graph.foreign_members) if not org.groups[n].deleted)
    kinds = {m["@odata.type"] for m in graph_members(graph, holder)}
    assert {"#microsoft.graph.device", "#microsoft.graph.servicePrincipal", "#microsoft.graph.orgContact"} <= kinds
    assert h.members("t1") == expected_members(org)
    # Make the holder a parent: the next delta re-reads it with /groups/{id}/members.
    child = next(g.n for g in org.groups.values() if g.n != holder and g.members and not g.deleted
                 and holder not in org.groups[g.n].subgroups)  # fmt: skip
    org.add_subgroup(holder, child)
    joiner = next(n for n in range(80, 0, -1) if n not in org.transitive_members(holder) and org.people[n].visible)
    org.add_member(child, joiner)
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", r.error
    assert h.members("t1") == expected_members(org)
    assert (group_id(holder), user_id(joiner)) in h.members("t1")


def graph_members(graph: GraphEmulator, n: int) -> list[dict[str, Any]]:
    form = {"grant_type": "client_credentials", "client_id": graph.client_id, "client_secret": graph.client_secret,
            "scope": "https://graph.microsoft.com/.default"}  # fmt: skip
    token = requests.post(f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token", data=form, timeout=5).json()
    resp = requests.get(f"{graph.base_url}/v1.0/groups/{group_id(n)}/members",
                        headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=5)  # fmt: skip
    assert resp.status_code == 200, resp.text
    return list(resp.json()["value"])


def test_expired_delta_token_falls_back_to_a_full_walk(synced: Any, graph: GraphEmulator, org: Org) -> None:
    h = synced
    seq = h.last_seq()
    org.update_person(30, title="Head of Resyncs")
    graph.expire_delta_tokens()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "full"
    assert EXPIRED_NOTE in r.notes
    assert h.changes("t1", after=seq) == [("user.updated", user_id(30), ("job_title", "raw_attributes"))]

    seq = h.last_seq()
    graph.force_resync(1)  # 410 Gone
    org.rename(31, "Gone", "Again")
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "full" and EXPIRED_NOTE in r.notes
    assert [c[:2] for c in h.changes("t1", after=seq)] == [("user.updated", user_id(31))]
    assert h.sync("t1").mode == "incremental"


@pytest.mark.parametrize(
    ("status", "code"), [(400, "BadRequest"), (400, "SyncStateNotFound"), (403, "syncStateNotFound")]
)
def test_an_expired_delta_token_is_recognized_whatever_its_status_and_code(
    synced: Any, graph: GraphEmulator, org: Org, status: int, code: str
) -> None:
    """The reference is unsure how Graph words an expired delta token (syncStateNotFound in the
    overview, BadRequest in the dev blog; SyncStateNotFound has been seen): every wording starts a
    full walk, instead of failing every run until the next scheduled full sync."""
    h = synced
    graph.sync_state_status, graph.sync_state_code = status, code
    seq = h.last_seq()
    org.update_person(30, title="Head of Resyncs")
    graph.expire_delta_tokens()
    r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert EXPIRED_NOTE in r.notes
    assert h.changes("t1", after=seq) == [("user.updated", user_id(30), ("job_title", "raw_attributes"))]
    assert h.sync("t1").mode == "incremental"


def test_a_delta_link_refused_for_another_reason_is_not_reported_as_expired(
    synced: Any, graph: GraphEmulator, org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    """Any 400 on a stored deltaLink starts a full walk, expired or not. One that does not speak of
    expiry is named on the run and warned about: were it to refuse every deltaLink, every run would
    be a full walk, and the run said "delta token expired" while the log said it only at INFO."""
    h = synced
    seq = h.last_seq()
    org.update_person(30, title="Head of Resyncs")
    graph.faults.update({"error": 1, "error_status": 400, "path": "/groups/delta"})
    with caplog.at_level(logging.INFO, logger="dirpull.connectors.entra_id"):
        r = h.sync("t1")
    assert r.status == "succeeded" and r.mode == "full", r.error
    assert EXPIRED_NOTE not in r.notes
    note = next(n for n in r.notes if n.startswith("deltaLink refused, not as an expired token"))
    assert "HTTP 400" in note and "generalException" in note and note.endswith("full resync")
    warned = [rec for rec in caplog.records if rec.levelno == logging.WARNING and "deltaLink" in rec.getMessage()]
    assert len(warned) == 1 and "generalException" in warned[0].getMessage()
    assert h.changes("t1", after=seq) == [("user.updated", user_id(30), ("job_title", "raw_attributes"))]
    assert h.sync("t1").mode == "incremental"


def test_429_storm_then_success_through_the_runner(synced: Any, graph: GraphEmulator, org: Org) -> None:
    h = synced
    seq = h.last_seq()
    org.rename(33, "Storm", "Chaser")
    graph.faults.update({"rate_limit": 4, "path": "/v1.0/"})
    r = h.sync("t1")
    assert r.status == "succeeded", r.error
    assert [c[:2] for c in h.changes("t1", after=seq)] == [("user.updated", user_id(33))]


def test_persistent_5xx_fails_the_run_and_leaves_the_store(harness: Any, graph: GraphEmulator, org: Org,
                                                          tmp_path: Path) -> None:  # fmt: skip
    h = harness({"t1": tenant(graph, tmp_path, max_retry_attempts=2)}, guard={"max_percent": 50, "min_count": 20})
    assert h.sync("t1").status == "succeeded"
    users, members, seq = h.users("t1"), h.members("t1"), h.last_seq()
    org.rename(34, "Never", "Stored")
    org.delete(35)
    graph.faults.update({"error": 1000, "error_status": 503, "path": "/v1.0/groups/delta"})
    r = h.sync("t1")
    assert r.status == "failed" and "503" in (r.error or "")
    assert h.users("t1") == users and h.members("t1") == members and h.last_seq() == seq
    graph.faults.clear()
    r = h.sync("t1")  # the old cursor is still there: the same changes arrive now
    assert r.status == "succeeded" and r.mode == "incremental"
    assert {c[:2] for c in h.changes("t1", after=seq)} >= {("user.updated", user_id(34)), ("user.deleted", user_id(35))}


def test_a_changed_timeout_or_retry_setting_keeps_the_next_run_incremental(
    synced: Any, graph: GraphEmulator, harness: Any, tmp_path: Path
) -> None:
    """How requests are made (a timeout raised after a slow day, fewer retries) changes nothing a
    sync reads: the next run stays incremental. What it reads (an attribute mapping) still makes
    the next run a full one."""
    guard = {"max_percent": 50, "min_count": 20}
    tuned = tenant(graph, tmp_path, timeout=30.0, max_retry_attempts=3, max_retry_wait=20.0, schedule="5m")
    r = harness({"t1": tuned}, guard=guard).sync("t1")
    assert r.status == "succeeded" and r.mode == "incremental", (r.error, r.notes)
    mapped = harness({"t1": {**tuned, "attributes": {"office": "officeLocation"}}}, guard=guard).sync("t1")
    assert mapped.status == "succeeded" and mapped.mode == "full", mapped.error
    assert "the tenant's settings changed since the last sync: full sync" in mapped.notes
