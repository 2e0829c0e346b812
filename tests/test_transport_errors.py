"""A connection that fails below HTTP (refused, a certificate that does not verify, a proxy that
refuses the tunnel) ends the run with an error that says why, not only the exception's type: each
connector through its real SDK, over loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import closed_port
from loopback_tls import self_signed_pem

from dirpull.config import BambooHRTenant, EntraTenant, GoogleTenant, OktaTenant, WorkdayTenant
from dirpull.connectors.base import Connector, ConnectorError
from dirpull.connectors.http import _CA_VARIABLES, RetryPolicy

SECRET = "s3cr3t-never-shown"


def _reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    """A loopback server's whole answer: `body` with its length."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)



class _OktaSleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


def _policy(sleeps: list[float]) -> RetryPolicy:
    return RetryPolicy(max_attempts=2, base_delay=0.0, jitter=0.0, sleep=sleeps.append)


def _google_key(tmp_path: Path, token_uri: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "0" * 40,
        "private_key": pem,
        "client_email": "sync@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path = tmp_path / "key.json"
    path.write_text(json.dumps(info))
    return f"file:{path}"


def connector(provider: str, base: str, tmp_path: Path, sleeps: list[float]) -> Connector:
    """`provider`'s connector with every URL (API and token endpoint) at `base`, retrying once."""
    if provider == "bamboohr":
        from dirpull.connectors.bamboohr import build as bamboo

        s = BambooHRTenant.model_validate(
            {"provider": provider, "company_domain": "acme", "api_key": SECRET, "api_url": f"{base}/api/gateway.php"}
        )
        return bamboo("t1", s, policy=_policy(sleeps))
    if provider == "workday":
        from dirpull.connectors.workday import WorkdayConnector

        s = WorkdayTenant.model_validate(
            {
                "provider": provider,
                "users_report_url": f"{base}/ccx/service/customreport2/acme/ISU/Workers?format=json",
                "username": "isu",
                "password": SECRET,
            }
        )
        return WorkdayConnector("t1", s, policy_factory=lambda: _policy(sleeps))
    if provider == "entra_id":
        from dirpull.connectors.entra_id import build as entra

        s = EntraTenant.model_validate(
            {
                "provider": provider,
                "tenant_id": "t",
                "client_id": "c",
                "client_secret": SECRET,
                "login_url": base,
                "graph_url": f"{base}/v1.0",
            }
        )
        return entra("t1", s, policy=_policy(sleeps))
    if provider == "google_workspace":
        from dirpull.connectors.google_workspace import build as google

        s = GoogleTenant.model_validate(
            {
                "provider": provider,
                "credentials_file": _google_key(tmp_path, f"{base}/token"),
                "subject": "admin@example.com",
                "customer": "my_customer",
                "api_url": base,
            }
        )
        return google("t1", s, policy=_policy(sleeps))
    assert provider == "okta"
    from dirpull.connectors.okta import OktaConnector

    s = OktaTenant.model_validate({"provider": provider, "org_url": base, "api_token": SECRET, "backoff_base": 0.01})
    return OktaConnector("t1", s, sleep=_OktaSleeps())


PROVIDERS = ["bamboohr", "workday", "entra_id", "google_workspace", "okta"]


def run_error(provider: str, base: str, tmp_path: Path) -> str:
    c = connector(provider, base, tmp_path, [])
    with pytest.raises(ConnectorError) as info:
        list(c.pull(None, full=False))
    message = str(info.value)
    assert SECRET not in message
    assert "\n" not in message
    return message


@pytest.fixture
def closed_url() -> Iterator[str]:
    with closed_port() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refused_connection_is_named_in_the_error(provider: str, closed_url: str, tmp_path: Path) -> None:
    """The error named only the type ("ConnectError", "ConnectionError", "ClientConnectorError"):
    a refused connection could not be told from a DNS failure, a timeout or a proxy's certificate."""
    message = run_error(provider, closed_url, tmp_path)
    assert "Connection refused" in message, message
    assert closed_url.removeprefix("http://") in message  # where it tried to go, as before


class _Recorder(http.server.BaseHTTPRequestHandler):
    served: list[str]

    def _any(self) -> None:
        self.served.append(self.path)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[type[http.server.BaseHTTPRequestHandler], bool], str]]:
    """Starts a loopback HTTP server (HTTPS with a self-signed certificate if asked): its URL."""
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start(handler: type[http.server.BaseHTTPRequestHandler], tls: bool) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self_signed_pem(tmp_path))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_certificate_that_does_not_verify_is_named_in_the_error(
    provider: str, serve: Callable[..., str], tmp_path: Path
) -> None:
    """Behind a proxy that re-signs TLS with its own (untrusted) root, every run failed with
    "SSLError" or "ConnectError" alone; the certificate problem is what the operator must fix."""
    served: list[str] = []
    handler = type("Handler", (_Recorder,), {"served": served})
    message = run_error(provider, serve(handler, True), tmp_path)
    assert "certificate verify failed: self-signed certificate" in message, message
    assert served == []  # nothing was sent over a connection that did not verify


@pytest.mark.parametrize("provider", ["bamboohr", "workday", "google_workspace"])
def test_the_ca_bundle_named_by_ssl_cert_file_is_trusted(
    provider: str, serve: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSL_CERT_FILE, the CA setting docs/providers/entra_id.md gives and the Entra and Okta
    connectors honour (their HTTP libraries read it), was ignored by requests and httplib2: behind
    a TLS-inspecting proxy with its root in that file, Workday, BambooHR and Google kept failing
    with "certificate verify failed". (Their own variables, set, still win.)"""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPLIB2_CA_CERTS", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    served: list[str] = []
    handler = type("Handler", (_Recorder,), {"served": served})
    base = serve(handler, True)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "server.pem"))  # the server's own certificate
    message = run_error(provider, base, tmp_path)
    assert "certificate" not in message and "HTTP 500" in message, message
    assert served


class _RefusingProxy(http.server.BaseHTTPRequestHandler):
    """A corporate proxy that does not allow the tunnel."""

    def do_CONNECT(self) -> None:
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_proxy_refusing_the_tunnel_is_named_and_no_query_secret_is_shown(
    serve: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests' own text of such a failure holds the pool, the request path and its query
    (`... Max retries exceeded with url: /ccx/...?access_token=...`): the reason is taken from
    it, the query secret is not. The host is never resolved here: the proxy (loopback) is asked."""
    proxy = serve(_RefusingProxy, False)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    monkeypatch.setenv("https_proxy", proxy)
    s = WorkdayTenant.model_validate(
        {
            "provider": "workday",
            "users_report_url": f"https://wd.example.test/ccx/service/customreport2/acme/ISU/Workers"
            f"?format=json&access_token={SECRET}",
            "username": "isu",
            "password": "pw",
        }
    )
    from dirpull.connectors.workday import WorkdayConnector

    c = WorkdayConnector("t1", s, policy_factory=lambda: _policy([]))
    with pytest.raises(ConnectorError) as info:
        list(c.pull(None, full=False))
    message = str(info.value)
    assert "403 Forbidden" in message, message
    assert SECRET not in message and "access_token=***" in message


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refused_connection_is_logged_while_it_is_retried(
    provider: str, closed_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A vendor that is down shows in the daemon's log as each attempt fails, not only in the error
    of the run that finally gives up: Entra's connector retried its token and Graph requests in
    silence (17 s at the default policy, minutes with Retry-After hints on 5xx)."""
    caplog.set_level("WARNING", logger="dirpull")
    message = run_error(provider, closed_url, tmp_path)
    retries = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Connection refused" in line for line in retries), (message, retries)
    assert all(SECRET not in line for line in retries)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "okta"])  # Okta's SDK transport: its own tries
def test_no_retry_is_announced_after_the_last_attempt(
    provider: str, closed_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two attempts, one retry: one "retrying" line, saying which attempt of how many comes next.
    Google's connector logged "retrying (attempt 2)" for the last attempt too, an instant before
    the run gave up after 2 attempts, and numbered the attempt that failed, not the next one."""
    caplog.set_level("WARNING", logger="dirpull")
    message = run_error(provider, closed_url, tmp_path)
    assert "gave up after 2 attempts" in message, message
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 1 and retries[0].endswith("(attempt 2 of 2)"), retries


@pytest.mark.parametrize("provider", PROVIDERS)
def test_credentials_bound_for_another_host_over_plain_http_are_warned_of(
    provider: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An http:// URL to another machine sends the token, API key or password in clear. Entra
    warned of it; Google, BambooHR and Workday said nothing (Okta's SDK refuses it outright)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dirpull"):
        connector(provider, "http://127.0.0.1:9", tmp_path, [])  # a local emulator: nothing to say
        assert not [r for r in caplog.records if "plain http" in r.getMessage()]
        if provider == "okta":  # refused when the configuration loads
            with pytest.raises(ValueError, match="http:// is allowed only for a local emulator"):
                connector(provider, "http://sso.example.test", tmp_path, [])
            return
        connector(provider, "http://sso.example.test", tmp_path, [])
    if provider == "google_workspace":  # the key file's token_uri, read as a pull's session opens
        from dirpull.connectors.google_workspace import _Session

        with caplog.at_level(logging.WARNING, logger="dirpull"):  # no request made: loopback only
            for base in ("http://127.0.0.1:9", "http://sso.example.test"):
                google = connector(provider, base, tmp_path, [])
                _Session(google.settings, RetryPolicy(), "t1")  # type: ignore[attr-defined]
    warned = [r.getMessage() for r in caplog.records if "plain http" in r.getMessage()]
    keys = {"bamboohr": ["api_url"], "workday": ["users_report_url"],
            "google_workspace": ["api_url", "api_url", "the credentials file's token_uri"],
            "entra_id": ["login_url", "graph_url"]}[provider]  # fmt: skip
    assert len(warned) == len(keys), warned
    for key, message in zip(keys, warned, strict=True):
        assert message.startswith(f"tenant t1: {key} http://sso.example.test"), message
        assert message.endswith("is plain http: credentials travel unencrypted") and SECRET not in message


class _EchoingGateway(http.server.BaseHTTPRequestHandler):
    """A gateway whose error page shows the request it refused, headers included (a debugging
    page, some WAFs): the Authorization header holds the credentials."""

    body_first = False  # the request's body (a token form) before its headers

    def _any(self) -> None:
        shown = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in self.headers.items())
        sent = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
        parts = [f"<table>{shown}</table>", f"<pre>{sent}</pre>"]
        page = "".join(reversed(parts) if self.body_first else parts)
        body = f"<html><body><h1>400 Bad Request</h1>{page}</body></html>".encode()
        _reply(self, 400, body, "text/html")

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("provider", ["workday", "bamboohr"])
def test_a_page_echoing_the_authorization_header_is_quoted_without_the_credentials(
    provider: str, serve: Callable[..., str], harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Basic auth is the password (BambooHR: the API key) in base64: masking the configured secret
    left its base64 in the run's error and `dirpull runs` (and in retry warnings quoting a page)."""
    import base64

    base = serve(_EchoingGateway, False)
    if provider == "workday":
        tenant = {"provider": provider, "username": "isu", "password": SECRET,
                  "users_report_url": f"{base}/ccx/service/customreport2/acme/ISU/Workers?format=json"}  # fmt: skip
        encoded = base64.b64encode(f"isu:{SECRET}".encode()).decode()
    else:
        tenant = {"provider": provider, "company_domain": "acme", "api_key": SECRET,
                  "api_url": f"{base}/api/gateway.php"}  # fmt: skip
        encoded = base64.b64encode(f"{SECRET}:x".encode()).decode()
    # The same settings, built by this module's `connector` (one retry, no waiting).
    h = harness({"t1": tenant}, connector_factory=lambda name, settings: connector(provider, base, Path("."), []))
    with caplog.at_level("WARNING"):
        result = h.sync("t1")
    stored = h.store.runs("t1")[0]["error"]
    assert result.status == "failed" and "Authorization Basic ***" in stored, stored
    for text in (result.error, stored, caplog.text):
        assert encoded not in text and SECRET not in text


class _FieldEchoingGateway(http.server.BaseHTTPRequestHandler):
    """A vendor's error page echoing credentials under its own field names (a form or query field,
    a JSON key, a header), none of them a setting of the tenant, next to prose naming such fields."""

    page = (
        b'{"error": "invalid_request", "query": "?oauth_access_token=abcd1234efgh5678&page=2", '
        b'"user_password": "pw12345678ab", "headers": "X-Api-Token: tok9876543210abc", '
        b'"hint": "check the api_token: configuration and the WD_PASSWORD: environment"}'
    )

    def _any(self) -> None:
        _reply(self, 400, self.page, "application/json")

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


def test_credentials_echoed_under_prefixed_field_names_are_masked_and_prose_is_not(
    serve: Callable[..., str], harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a field named exactly `access_token`, `password`… was masked: a page echoing
    `oauth_access_token=…`, `"user_password": "…"` or `X-Api-Token: …` put the value in the run's
    error, `dirpull runs` and the log. A name before a bare `:` in prose stays as written."""
    base = serve(_FieldEchoingGateway, False)
    tenant = {"provider": "workday", "username": "isu", "password": SECRET,
              "users_report_url": f"{base}/ccx/service/customreport2/acme/ISU/Workers?format=json"}  # fmt: skip
    h = harness({"t1": tenant}, connector_factory=lambda name, settings: connector("workday", base, Path("."), []))
    with caplog.at_level("INFO"):
        result = h.sync("t1")
    stored = h.store.runs("t1")[0]["error"]
    assert result.status == "failed", result.error
    for shown in ("oauth_access_token=***&page=2", '"user_password": "***"', "X-Api-Token: ***",
                  "check the api_token: configuration and the WD_PASSWORD: environment"):  # fmt: skip
        assert shown in stored, stored
    for text in (result.error, stored, caplog.text):
        for value in ("abcd1234efgh5678", "pw12345678ab", "tok9876543210abc"):
            assert value not in text, text


@pytest.mark.parametrize("provider", ["okta", "entra_id"])
def test_a_short_secret_echoed_by_a_gateway_is_masked_where_it_stands_as_a_credential(
    provider: str, serve: Callable[..., str], harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Configured secrets under 8 characters were never masked (they could be any word), nor
    by the credential patterns (12 and 8 characters and more): a 6-character Okta API token echoed
    as `Authorization: SSWS ab12cd`, or a client secret in an echoed token form
    (`client_secret=ab12cd&`), went into the run's error, `dirpull runs` and the log as sent."""
    from dirpull.connectors.entra_id import build as entra
    from dirpull.connectors.okta import OktaConnector

    short = "ab12cd"
    base = serve(type("FormEchoingGateway", (_EchoingGateway,), {"body_first": True}), False)
    if provider == "okta":
        tenant = {"provider": provider, "org_url": base, "api_token": short, "backoff_base": 0.01}
        h = harness({"t1": tenant}, connector_factory=lambda name, s: OktaConnector(name, s, sleep=_OktaSleeps()))
        shown = "Authorization SSWS ***"
    else:
        tenant = {"provider": provider, "tenant_id": "t", "client_id": "c", "client_secret": short,
                  "login_url": base, "graph_url": f"{base}/v1.0"}  # fmt: skip
        h = harness({"t1": tenant}, connector_factory=lambda name, s: entra(name, s, policy=_policy([])))
        shown = "client_secret=***&"
    with caplog.at_level("INFO"):
        result = h.sync("t1")
    stored = h.store.runs("t1")[0]["error"]
    assert result.status == "failed" and shown in stored, stored
    for text in (result.error, stored, caplog.text):
        assert short not in text


@pytest.mark.parametrize("short", ["ab+1c", "a b1c", "ab&1c"])
def test_a_short_secret_echoed_url_encoded_in_a_token_form_is_masked(
    short: str, serve: Callable[..., str], harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The token form is sent URL-encoded: a short client secret with a `+`, a space or a `&` in it
    came back from a gateway echoing the form as `client_secret=ab%2B1c`, which neither the
    configured secret (`ab+1c`) nor the credential patterns (8 characters and more) matched, and
    went into the run's error, `dirpull runs` and the log, decoded by anyone."""
    from urllib.parse import quote_plus

    from dirpull.connectors.entra_id import build as entra

    base = serve(type("FormEchoingGateway", (_EchoingGateway,), {"body_first": True}), False)
    tenant = {"provider": "entra_id", "tenant_id": "t", "client_id": "c", "client_secret": short,
              "login_url": base, "graph_url": f"{base}/v1.0"}  # fmt: skip
    h = harness({"t1": tenant}, connector_factory=lambda name, s: entra(name, s, policy=_policy([])))
    with caplog.at_level("INFO"):
        result = h.sync("t1")
    stored = h.store.runs("t1")[0]["error"]
    assert result.status == "failed" and "client_secret=***&" in stored, stored
    for text in (result.error, stored, caplog.text):
        assert quote_plus(short) not in text and short not in text


_CA_NAMES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPLIB2_CA_CERTS")


def test_the_readme_names_every_ca_variable_a_connector_reads() -> None:
    """CURL_CA_BUNDLE, which wins over SSL_CERT_FILE for Workday and BambooHR (requests reads it),
    and SSL_CERT_DIR were named nowhere: an operator behind a re-signing proxy whose environment
    set CURL_CA_BUNDLE for curl could not tell why SSL_CERT_FILE did not apply to those two."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    named = {name for names in _CA_VARIABLES.values() for name in names}
    assert {name for name in named if f"`{name}`" not in readme} == set()


@pytest.mark.parametrize(
    ("provider", "name", "folder"),
    [
        ("bamboohr", "REQUESTS_CA_BUNDLE", False),
        ("bamboohr", "SSL_CERT_DIR", False),
        ("workday", "SSL_CERT_FILE", False),
        ("entra_id", "SSL_CERT_FILE", False),
        ("entra_id", "SSL_CERT_FILE", True),  # a folder where a file belongs: cannot be read either
        ("google_workspace", "SSL_CERT_FILE", False),
        ("google_workspace", "HTTPLIB2_CA_CERTS", False),
    ],
)
def test_a_ca_variable_naming_a_file_that_cannot_be_read_fails_the_run_in_one_line(
    provider: str, name: str, folder: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA variable naming a missing or unreadable file failed `dirpull sync` as an "unexpected
    error" with a traceback in the log (httpx's bare "FileNotFoundError: [Errno 2] No such file or
    directory", requests' OSError, httplib2's RuntimeError as it was imported) or, for Google, as a
    connection retried for minutes. Now the run fails (exit 1, recorded) saying which variable
    names which path."""
    from typer.testing import CliRunner

    from dirpull.cli import app
    from dirpull.emulators import Org
    from dirpull.emulators.cluster import TENANT_NAMES, Cluster

    for other in _CA_NAMES:
        monkeypatch.delenv(other, raising=False)
    path = str(tmp_path) if folder else str(tmp_path / "no-such" / "proxy-ca.pem")
    cluster = Cluster(Org.generate(5))
    cluster.start([provider])
    try:
        config = tmp_path / "dirpull.toml"
        config.write_text(cluster.config_toml(tmp_path, store_url=f"sqlite:///{tmp_path / 'store.db'}"))
        monkeypatch.setenv(name, path)
        r = CliRunner().invoke(app, ["--config", str(config), "sync", TENANT_NAMES[provider]])
        status = CliRunner().invoke(app, ["--config", str(config), "runs", TENANT_NAMES[provider], "--json"])
    finally:
        cluster.stop()
    assert r.exit_code == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr, r.stderr
    why = "Is a directory" if folder else "No such file or directory"
    line = f"{name} in dirpull's environment names {path!r}, which cannot be read ({why})"
    assert f"  {line}" in r.stderr.splitlines()[-1], r.stderr
    [run] = [json.loads(row) for row in status.stdout.splitlines()]
    assert run["status"] == "failed" and line in run["error"]


def _failing_gateway(
    upstream: str, path: str, status: int, page: Callable[[str, str, bytes], tuple[bytes, str]], times: int = 1
) -> type[http.server.BaseHTTPRequestHandler]:
    """A gateway in front of `upstream` (an emulator) whose first `times` answers to a request for
    `path` are a `status` page made by `page(user, password, body)` from the request's basic-auth
    credentials (decoded) and body: (the page, its Content-Type). Every other request goes through."""
    import base64
    import http.client
    from urllib.parse import urlsplit

    target = urlsplit(upstream)
    left = [times]
    lock = threading.Lock()

    class Gateway(http.server.BaseHTTPRequestHandler):
        def _any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            with lock:
                fail = left[0] > 0 and path in self.path
                left[0] -= fail
            if fail:
                auth = self.headers.get("Authorization") or ""
                basic = base64.b64decode(auth[6:]).decode() if auth.lower().startswith("basic ") else ""
                user, _, password = basic.partition(":")
                text, kind = page(user, password, body)
                _reply(self, status, text, kind)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _any

        def log_message(self, *args: Any) -> None:
            pass

    return Gateway


def _quoting_gateway(upstream: str, path: str, status: int) -> type[http.server.BaseHTTPRequestHandler]:
    """`_failing_gateway` whose page quotes the credentials the request carried (the basic-auth user
    and password; the form's fields): a vendor's or a proxy's 5xx saying which key it could not
    check, or a debugging page showing the request."""
    from urllib.parse import parse_qsl

    def page(user: str, password: str, body: bytes) -> tuple[bytes, str]:
        said = [f"<p>could not check the credentials of {user} (password {password}, key {user})</p>"] if user else []
        said += [f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in parse_qsl(body.decode(errors="replace"))]
        return f"<html><body><h1>{status} upstream unavailable</h1>{''.join(said)}</body></html>".encode(), "text/html"

    return _failing_gateway(upstream, path, status, page)


@pytest.mark.parametrize("provider", ["workday", "bamboohr"])
def test_a_retried_answer_quoting_a_configured_secret_does_not_put_it_in_the_log(
    provider: str, serve: Callable[..., str], harness: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retry warnings quote the vendor's 5xx page as it happens (the answers not streamed: Workday's
    token endpoint, BambooHR's employees/changed). They were masked only for credential-shaped text,
    not for the tenant's configured secrets as the run's error is: a page saying which client
    secret, refresh token or API key it could not check put it in the daemon's log and in
    `dirpull sync`'s. The runs succeed after the retry."""
    from dirpull.emulators import Org, emulator_class

    emu: Any = emulator_class(provider)(Org.generate(5, seed=2))
    emu.start()
    try:
        tenant = emu.tenant_config("t1", tmp_path)
        if provider == "workday":  # OAuth: the client secret in basic auth, the refresh token in the form
            base = serve(_quoting_gateway(emu.base_url, "/token", 503), False)
            tenant = {k: v.replace(emu.base_url, base) if isinstance(v, str) else v for k, v in tenant.items()
                      if k not in ("username", "password")}  # fmt: skip
            tenant |= {"token_url": emu.token_url.replace(emu.base_url, base), "client_id": emu.client_id,
                       "client_secret": emu.client_secret, "refresh_token": emu.refresh_token}  # fmt: skip
            secrets = [emu.client_secret, emu.refresh_token]
        else:  # the second, incremental run asks employees/changed
            base = serve(_quoting_gateway(emu.base_url, "/employees/changed", 503), False)
            tenant["api_url"] = tenant["api_url"].replace(emu.base_url, base)
            secrets = [tenant["api_key"]]
        h = harness({"t1": tenant})
        with caplog.at_level("INFO"):
            results = [h.sync("t1") for _ in range(1 if provider == "workday" else 2)]
    finally:
        emu.stop()
    assert [r.status for r in results] == ["succeeded"] * len(results), [r.error for r in results]
    lines = [r.getMessage() for r in caplog.records]
    retries = [line for line in lines if "upstream unavailable" in line]
    assert len(retries) == 1, "\n".join(lines)  # the page was quoted as it happened, the secrets masked
    for secret in secrets:
        assert not [line for line in lines if secret in line], "\n".join(lines)
    assert ("(password ***," if provider == "workday" else "key ***)") in retries[0], retries


def _cutting_gateway(
    upstream: str, path: str, status: int, at: int, times: int = 1
) -> type[http.server.BaseHTTPRequestHandler]:
    """`_failing_gateway` whose page is long, quoting the credential the request carried (the
    basic-auth password, or the user where the password is a placeholder: BambooHR's API key) from
    character `at` of its text on."""

    def page(user: str, password: str, body: bytes) -> tuple[bytes, str]:
        head = f"{status} upstream unavailable: the gateway could not check the credential "
        quoted = password if len(password) > 1 else user
        return (head + "." * (at - len(head)) + quoted + " (sorry)").encode(), "text/plain"

    return _failing_gateway(upstream, path, status, page, times)


@pytest.mark.parametrize(
    ("provider", "status", "at"),
    [
        ("workday", 503, 190),  # the token endpoint's retried answer, quoting the client secret
        ("workday", 401, 290),  # the report's refusal, quoting the password
        ("bamboohr", 503, 190),  # employees/changed's retried answer, quoting the API key
    ],
)
def test_a_vendor_page_cut_short_in_the_middle_of_a_secret_shows_none_of_it(
    provider: str, status: int, at: int, serve: Callable[..., str], harness: Any, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A vendor's page is quoted up to 200 characters (a retry warning) or 300 (the run's error),
    cut with `…`. The tenant's secrets were masked after the cut, whole: one the cut went through
    (a long page quoting the API key or password near its end) was not found, and its first part
    stayed in the daemon's log and in the run record: `…credential ....wd-isu-pas…`."""
    from dirpull.emulators import Org, emulator_class

    emu: Any = emulator_class(provider)(Org.generate(5, seed=2))
    emu.start()
    try:
        tenant = emu.tenant_config("t1", tmp_path)
        path = {503: "/token", 401: "/customreport2/"}[status] if provider == "workday" else "/employees/changed"
        base = serve(_cutting_gateway(emu.base_url, path, status, at), False)
        tenant = {k: v.replace(emu.base_url, base) if isinstance(v, str) else v for k, v in tenant.items()}
        secret = tenant.get("password") or tenant["api_key"]
        if provider == "workday" and status == 503:  # OAuth: the client secret in basic auth
            del tenant["username"], tenant["password"]
            tenant |= {"token_url": emu.token_url.replace(emu.base_url, base), "client_id": emu.client_id,
                       "client_secret": emu.client_secret, "refresh_token": emu.refresh_token}  # fmt: skip
            secret = emu.client_secret
        h = harness({"t1": tenant})
        with caplog.at_level("INFO"):
            results = [h.sync("t1") for _ in range(2 if provider == "bamboohr" else 1)]
    finally:
        emu.stop()
    assert [r.status for r in results][-1] == ("succeeded" if status == 503 else "failed"), results[-1].error
    lines = [r.getMessage() for r in caplog.records]
    # The retry warnings, or the run's error (in `dirpull runs`, and in the log's "sync end" line).
    quoted = [line for line in [*lines, *[r.error for r in results if r.error]] if "upstream unavailable" in line]
    assert quoted and all("…" in line for line in quoted), "\n".join(lines)
    for text in quoted:
        assert ".***…" in text, text  # masked up to the cut
        assert secret[:3] not in text.split("credential ")[1], text


def _lease_lost_in_a_retry(
    serve: Callable[..., str], harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, hold: float,
    policy: RetryPolicy, watch: float,
) -> tuple[Any, Any, float, list[float]]:  # fmt: skip
    """A Workday OAuth run whose token endpoint keeps answering 503 through a gateway, quoting the
    client secret, and whose lease another worker takes at the first request, whose answer the
    gateway holds `hold` seconds. Returns the emulator, the run's result, when the run ended and
    when each request reached the gateway, `watch` seconds after the run ended."""
    from datetime import timedelta

    from dirpull import prefetch
    from dirpull.connectors import workday
    from dirpull.emulators import Org, emulator_class
    from dirpull.storage import schema
    from dirpull.storage.store import utcnow

    monkeypatch.setattr(prefetch, "JOIN_S", 0.1)  # the run waits this long for its pull to stop
    monkeypatch.setattr(workday, "POLICY_FACTORY", lambda: policy)
    emu: Any = emulator_class("workday")(Org.generate(5, seed=2))
    emu.start()
    stolen = threading.Event()
    h: Any = None
    arrived: list[float] = []

    class Failing(_cutting_gateway(emu.base_url, "/token", 503, 90, times=100)):  # type: ignore[misc]
        def _any(self) -> None:
            arrived.append(time.time())
            if not stolen.is_set() and h is not None:  # another worker takes the tenant over
                with h.store.engine.begin() as conn:
                    conn.execute(
                        schema.leases.update().values(holder="other", expires_at=utcnow() + timedelta(minutes=5))
                    )
                stolen.set()
                time.sleep(hold)
            super()._any()

        do_GET = do_POST = _any

    try:
        tenant = emu.tenant_config("t1", tmp_path)
        base = serve(Failing, False)
        tenant = {k: v.replace(emu.base_url, base) if isinstance(v, str) else v for k, v in tenant.items()}
        del tenant["username"], tenant["password"]  # OAuth: the client secret in basic auth
        tenant |= {"token_url": emu.token_url.replace(emu.base_url, base), "client_id": emu.client_id,
                   "client_secret": emu.client_secret, "refresh_token": emu.refresh_token}  # fmt: skip
        h = harness({"t1": tenant}, defaults={"lease_ttl": "1s"})
        result = h.sync("t1")
        ended = time.time()
        assert result.status == "failed" and "lease lost" in result.error, result.error
        time.sleep(watch)
    finally:
        emu.stop()
    return emu, result, ended, arrived


def test_a_pull_left_behind_by_a_lost_lease_keeps_the_tenants_secrets_masked(
    serve: Callable[..., str], harness: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """A run that loses its lease ends without waiting for its pull, whose request in flight ends
    later and is logged as a retry, quoting the vendor's page. The tenant's secrets were unmasked
    as the run ended: the page quoting the password put it in the log, the other runs of the
    process syncing meanwhile."""
    with caplog.at_level("INFO"):
        emu, _, ended, _ = _lease_lost_in_a_retry(
            serve, harness, tmp_path, monkeypatch, hold=2.0, policy=RetryPolicy(max_attempts=4, jitter=0), watch=2.5
        )
    lines = [r.getMessage() for r in caplog.records]
    behind = [r.getMessage() for r in caplog.records if r.created > ended]
    assert [line for line in behind if "upstream unavailable" in line], "\n".join(lines)  # logged after the run
    assert not [line for line in lines if emu.client_secret in line], "\n".join(lines)


def test_a_pull_left_behind_by_a_lost_lease_stops_calling_the_vendor(
    serve: Callable[..., str], harness: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that lost its lease ended, and its pull, in a retry wait, went on retrying the vendor
    for up to the run's retry budget (300 s), while the worker's next run of the tenant could be
    pulling beside it. Its wait now ends with its run, and it makes no request more."""
    policy = RetryPolicy(max_attempts=20, base_delay=0.3, max_delay=0.6, jitter=0)
    _, _, ended, arrived = _lease_lost_in_a_retry(
        serve, harness, tmp_path, monkeypatch, hold=0.0, policy=policy, watch=3.0
    )
    assert len([t for t in arrived if t <= ended]) >= 1
    assert [round(t - ended, 2) for t in arrived if t > ended] == []


@pytest.mark.parametrize(
    "text",
    [
        "401: invalid token SSWS ab12cd.",  # the end of a sentence
        "GET /api/v1/users?token=ab12cd#top",  # a fragment
        "token=ab12cd/ refused",
        "Authorization: SSWS ab12cd?",
        "Authorization: SSWS ab12cd…",  # a quoted page cut right after it
    ],
)
def test_a_short_secret_as_a_credential_is_masked_whatever_punctuation_follows(text: str) -> None:
    """A short secret in a credential's place was kept when a `.`, `#`, `/`, `?` or the cut mark
    followed it: only spaces, quotes and a few brackets counted as its end."""
    from dirpull.sync.runner import _mask_secrets

    masked = _mask_secrets(text, ["ab12cd"])
    assert "ab12cd" not in masked and "***" in masked, masked


class _Trickling(http.server.BaseHTTPRequestHandler):
    """A vendor that answers the token request, then sends each API answer's body one byte every
    0.2 s, well within any read timeout: a declared length it never reaches, or a chunked body
    that never ends. Bounded here (20 s), so a run that waits for it all still ends."""

    protocol_version = "HTTP/1.1"
    chunked = False

    def _any(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.command == "POST":  # a token endpoint (Entra's, Google's)
            body = json.dumps({"access_token": "a" * 40, "token_type": "Bearer", "expires_in": 3600}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header(*(("Transfer-Encoding", "chunked") if self.chunked else ("Content-Length", "100000")))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up and closed the connection
            for _ in range(100):
                self.wfile.write(b"1\r\n \r\n" if self.chunked else b" ")
                self.wfile.flush()
                time.sleep(0.2)

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("chunked", [False, True], ids=["trickled body", "endless chunked body"])
@pytest.mark.parametrize("provider", ["entra_id", "google_workspace", "okta"])
def test_an_answer_trickled_past_the_timeout_ends_the_run_within_it(
    provider: str, chunked: bool, serve: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entra's `timeout` is "seconds for one HTTP response", Google's "60 s per request", but
    httpx and httplib2 bound each read only: a gateway or vendor sending a byte now and then (a
    slow-loris body, a chunked body that never ends) held the run, and its tenant's lease, for as
    long as it kept sending. Now each attempt ends at the timeout and the run fails saying so."""
    import dirpull.connectors.google_workspace as google

    monkeypatch.setattr(google, "HTTP_TIMEOUT", 1.0)
    base = serve(type("Handler", (_Trickling,), {"chunked": chunked}), False)
    c = connector(provider, base, tmp_path, [])
    key = "request_timeout" if provider == "okta" else "timeout"
    if provider != "google_workspace":
        c.settings = c.settings.model_copy(update={key: 1.0})  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(ConnectorError) as info:
        list(c.pull(None, full=False))
    took = time.monotonic() - started
    assert "timed out" in str(info.value), str(info.value)
    assert took < 8, took  # two attempts (one retry) of 1 s each, not the 20 s the server trickles


class _EndlessDelta(http.server.BaseHTTPRequestHandler):
    """A Graph whose delta always says "more": an empty page and a new nextLink each time (a
    deltaLink only after 300 pages, so a run that follows them all still ends here)."""

    protocol_version = "HTTP/1.1"
    pages: list[str]

    def _any(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        host = f"http://{self.headers['Host']}"
        path = self.path.split("?")[0]
        if self.command == "POST":
            answer: dict[str, Any] = {"access_token": "a" * 40, "token_type": "Bearer", "expires_in": 3600}
        elif len(self.pages) < 300:
            self.pages.append(self.path)
            answer = {"value": [], "@odata.nextLink": f"{host}{path}?$skiptoken={len(self.pages)}"}
        else:
            answer = {"value": [], "@odata.deltaLink": f"{host}{path}?$deltatoken=1"}
        _reply(self, 200, json.dumps(answer).encode(), "application/json")

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


def test_an_entra_delta_that_always_says_more_ends_at_the_page_cap(
    serve: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entra's paging stopped only on a repeated link, where the other connectors' listings also
    stop at a page cap: a delta answering empty pages with a new nextLink each time was followed
    for as long as the server kept answering, the run (and its lease) never ending."""
    import dirpull.connectors.http

    monkeypatch.setattr(dirpull.connectors.http, "MAX_PAGES", 50)  # the cap, small enough to reach here
    pages: list[str] = []
    base = serve(type("Handler", (_EndlessDelta,), {"pages": pages}), False)
    with pytest.raises(ConnectorError) as info:
        list(connector("entra_id", base, tmp_path, []).pull(None, full=False))
    assert "more than 50 pages, giving up" in str(info.value), str(info.value)
    assert len(pages) <= 2 * 51  # the users and the groups delta, walked side by side


class _HugeErrorPage(http.server.BaseHTTPRequestHandler):
    """A gateway answering `status` with a page of 64 MiB, sent as fast as it is read (a misrouted
    request landing on a download, a proxy streaming a log): only its opening is worth quoting."""

    protocol_version = "HTTP/1.1"
    sent: list[int]
    status = 404

    def _any(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(64 << 20))
        self.end_headers()
        chunk = b"Not Found. " * 6000
        with contextlib.suppress(OSError):  # the client stopped reading and closed the connection
            for _ in range((64 << 20) // len(chunk)):
                self.wfile.write(chunk)
                self.sent[0] += len(chunk)
            self.wfile.write(b" " * ((64 << 20) % len(chunk)))

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("provider, status", [("workday", 404), ("bamboohr", 404), ("workday", 500)])
def test_a_huge_error_page_for_a_report_is_quoted_from_its_opening_only(
    provider: str, status: int, serve: Callable[..., str], tmp_path: Path
) -> None:
    """The report is asked for streamed, but an error answer's whole body was read to quote 300
    characters of it (Workday's retried 5xx too, kept for the run's error): a 64 MiB page took a
    gigabyte of the worker's memory at its peak, a page that never ends all it had. Now only its
    opening is read, and the connection closed."""
    import tracemalloc

    sent = [0]
    base = serve(type("Handler", (_HugeErrorPage,), {"sent": sent, "status": status}), False)
    tracemalloc.start()
    try:
        message = run_error(provider, base, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"HTTP {status}" in message and "Not Found. Not Found." in message, message
    assert peak < 8 << 20, peak


def test_a_vendor_page_with_terminal_escapes_is_quoted_with_them_escaped(
    serve: Callable[..., str], harness: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway's error page holding ESC sequences (`\\x1b[2J`, a window title `\\x1b]0;…\\x07`)
    was quoted as it was in the run's error and the log's line ending the run: the daemon's log on a terminal
    (and `journalctl`, `less -R`) obeyed them, clearing the screen or hiding the lines after it. The
    quote shows them escaped."""
    from dirpull.emulators import Org, emulator_class

    def page(user: str, password: str, body: bytes) -> tuple[bytes, str]:
        return "401 upstream \x1b[2J\x1b]0;owned\x07unavailable\x1b[8m\x9b8m hidden\x7f".encode(), "text/plain"

    emu: Any = emulator_class("workday")(Org.generate(5, seed=2))
    emu.start()
    try:
        tenant = emu.tenant_config("t1", tmp_path)
        base = serve(_failing_gateway(emu.base_url, "/customreport2/", 401, page), False)
        tenant = {k: v.replace(emu.base_url, base) if isinstance(v, str) else v for k, v in tenant.items()}
        h = harness({"t1": tenant})
        with caplog.at_level("INFO"):
            result = h.sync("t1")
    finally:
        emu.stop()
    assert result.status == "failed"
    lines = [r.getMessage() for r in caplog.records if "upstream" in r.getMessage()]
    assert lines and "upstream" in (result.error or ""), result.error
    for text in [*lines, result.error or ""]:
        assert not any(c in text for c in "\x1b\x07\x9b\x7f"), text
    assert "upstream \\x1b[2J\\x1b]0;owned\\x07unavailable\\x1b[8m\\x9b8m hidden\\x7f" in result.error


class _TricklingReport(http.server.BaseHTTPRequestHandler):
    """A Workday or BambooHR report sent one byte of valid JSON every 0.3 s, well within any read
    timeout, its declared length far off; `closed` is set once the client has closed the
    connection. Bounded here (30 s), so a run that waits for it all still ends."""

    protocol_version = "HTTP/1.1"
    closed: threading.Event

    def _any(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = b"employees" if "/reports/custom" in self.path else b"Report_Entry"
        rows = b",".join(b'{"id":"%d","Employee_ID":"%d","firstName":"Ada"}' % (i, i) for i in range(100))
        body = b'{"' + key + b'":[' + rows + b"]}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(100):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:  # the client closed the connection: the second write after it fails
            self.closed.set()

    do_GET = do_POST = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("provider", ["workday", "bamboohr"])
def test_a_trickled_report_is_cut_at_max_run_time_and_its_reading_ends_with_the_run(
    provider: str, serve: Callable[..., str], tmp_path: Path
) -> None:
    """A report trickled a byte every 0.3 s never trips the 2 s read timeout: the run went on for
    as long as the server did, and, once a time limit cut it, its pull thread went on reading
    (urllib3 reads a whole megabyte before it returns), holding the connection and the vendor's
    request behind the ended run. Now the run ends at `max_run_time`, recorded failed with
    nothing applied, and its pull thread stops reading and closes the connection."""
    from harness import SyncHarness

    closed = threading.Event()
    base = serve(type("Handler", (_TricklingReport,), {"closed": closed}), False)
    tables = {
        "workday": {"users_report_url": f"{base}/ccx/service/customreport2/acme/ISU/Workers", "username": "isu"},
        "bamboohr": {"company_domain": "acme", "api_url": f"{base}/api/gateway.php"},
    }
    secret = {"workday": "password", "bamboohr": "api_key"}[provider]
    tenant = {"provider": provider, **tables[provider], secret: SECRET, "timeout": 2, "max_run_time": 1.5}
    h = SyncHarness(tmp_path, {"t": tenant})
    try:
        started = time.monotonic()
        r = h.sync("t")
        took = time.monotonic() - started
        assert r.status == "failed" and r.error == "the run took longer than max_run_time (1.5s); nothing applied"
        assert took < 4, took  # not the 30 s the server trickles for
        assert h.users("t") == {} and h.store.lease("t").holder is None
        ended = time.monotonic() + 2
        while time.monotonic() < ended and any(t.name == "pull-t" for t in threading.enumerate()):
            time.sleep(0.05)
        assert not any(t.name == "pull-t" for t in threading.enumerate())
        assert closed.wait(2)  # the report's connection, not left open behind the run
    finally:
        h.close()


def _emulated_tenant(provider: str, emu: Any, base: str, tmp_path: Path) -> dict[str, Any]:
    """The emulator's tenant configuration with every URL (the Google key's token_uri too) at `base`."""
    tenant: dict[str, Any] = json.loads(json.dumps(emu.tenant_config("t1", tmp_path)).replace(emu.base_url, base))
    if provider == "google_workspace":
        key = Path(tenant["credentials_file"].removeprefix("file:"))
        key.write_text(key.read_text().replace(emu.base_url, base))
    return tenant


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("problem", ["plain http", "untrusted certificate"])
def test_a_connection_no_retry_can_heal_fails_the_run_at_once_saying_what_to_check(
    provider: str, problem: str, serve: Callable[..., str], harness: Any, tmp_path: Path
) -> None:
    """A tenant configured with https:// for a server speaking plain HTTP (ssl: wrong version
    number), or one whose certificate does not verify, was retried like an outage: the run failed
    after ~19 s (Okta's after 35 s) and six identical attempts, "gave up after 6 attempts". Every
    attempt meets the same server: the run now fails at the first, saying what to check."""
    from dirpull.emulators import Org, emulator_class

    emu: Any = emulator_class(provider)(Org.generate(5, seed=2))
    emu.start()
    try:
        if problem == "plain http":
            base = emu.base_url.replace("http://", "https://")
            check = "the server does not speak TLS: is the URL's scheme right (http://, not https://)?"
            reason = "wrong version number"
        else:
            base = serve(type("Handler", (_Recorder,), {"served": []}), True)
            check = "certificate does not verify: is the URL's host right, and is the CA that signed it trusted"
            reason = "certificate verify failed: self-signed certificate"
        h = harness({"t1": _emulated_tenant(provider, emu, base, tmp_path)})  # the default retry policy
        started = time.monotonic()
        result = h.sync("t1")
        took = time.monotonic() - started
    finally:
        emu.stop()
    assert result.status == "failed" and check in result.error and reason in result.error, result.error
    assert "attempts" not in result.error and "\n" not in result.error
    assert took < 2.5, took
    assert h.store.runs("t1")[0]["error"] == result.error


class _Resetting(http.server.BaseHTTPRequestHandler):
    """A server that resets every connection as it comes, before a byte of TLS or HTTP."""

    def setup(self) -> None:
        import socket
        import struct

        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()

    def handle(self) -> None:
        pass

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_connection_reset_is_still_retried(
    provider: str, scheme: str, serve: Callable[..., str], tmp_path: Path
) -> None:
    """A reset (a TLS handshake cut short included) may heal: it is retried, as before."""
    base = serve(_Resetting, False).replace("http://", f"{scheme}://")
    message = run_error(provider, base, tmp_path)
    assert "attempts" in message and "does not speak TLS" not in message, message
