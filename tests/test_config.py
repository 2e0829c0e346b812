"""Configuration mistakes are reported with the file, the tenant and the key — never a traceback —
and secrets never show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dirpull.config import ConfigError, load_config, parse_duration
from dirpull.storage.store import Store, StoreError, mask_password

GOOD = """
[store]
url = "sqlite:///x.db"
[defaults]
schedule = "15m"
[tenants.acme-hr]
provider = "bamboohr"
company_domain = "acme"
api_key = "env:ACME_BAMBOO_KEY"
api_url = "http://127.0.0.1:8080/api/gateway.php"
schedule = "cron: */5 * * * *"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dirpull.toml"
    p.write_text(text, encoding="utf-8")
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    return str(exc.value)


def test_good_config_loads_and_resolves_secrets_lazily(tmp_path, monkeypatch):
    monkeypatch.setenv("ACME_BAMBOO_KEY", "s3cret-value")
    cfg = load_config(write(tmp_path, GOOD))
    t = cfg.tenant("acme-hr")
    assert t.provider == "bamboohr" and cfg.schedule_of("acme-hr") == "cron: */5 * * * *"
    assert t.api_key.get() == "s3cret-value"
    assert "s3cret" not in repr(t) and "s3cret" not in json.dumps(cfg.model_dump(mode="json"), default=str)


def test_missing_env_secret_is_that_tenants_problem_naming_file_tenant_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("ACME_BAMBOO_KEY", raising=False)
    cfg = load_config(write(tmp_path, GOOD))  # the other tenants stay usable
    assert cfg.secret_problems("acme-hr") == [
        f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.api_key: environment variable ACME_BAMBOO_KEY is not set"
    ]
    with pytest.raises(ConfigError, match="ACME_BAMBOO_KEY: environment variable is not set"):
        cfg.tenant("acme-hr").api_key.get()
    monkeypatch.setenv("ACME_BAMBOO_KEY", "s3cret-value")
    assert cfg.secret_problems("acme-hr") == []


def test_an_env_secret_from_a_windows_env_file_is_read_without_its_line_break(tmp_path, monkeypatch):
    """`KEY=value` lines of an env file written on Windows end in `\r`, which docker's --env-file
    and systemd's EnvironmentFile keep: the key went to the vendor with it and was refused, where
    the same key in a `file:` secret worked."""
    cfg = load_config(write(tmp_path, GOOD))
    monkeypatch.setenv("ACME_BAMBOO_KEY", "s3cret-value\r")
    assert cfg.tenant("acme-hr").api_key.get() == "s3cret-value"
    assert cfg.secret_problems("acme-hr") == []
    monkeypatch.setenv("ACME_BAMBOO_KEY", "\r\n")  # nothing but the line break: empty, said now
    assert cfg.secret_problems("acme-hr") == [
        f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.api_key: environment variable ACME_BAMBOO_KEY is empty"
    ]


def test_a_tenants_partial_guard_takes_its_other_keys_from_defaults_guard(tmp_path, monkeypatch):
    """A tenant that sets only its percentage was guarded at the built-in floor of 20, not at the
    operator's `[defaults.guard] min_count = 500`: its mass deletion of 400 was held."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    text = GOOD.replace("[tenants.acme-hr]", "[defaults.guard]\nmin_count = 500\nmax_percent = 5\n[tenants.acme-hr]")
    text += "[tenants.acme-hr.guard]\nmax_percent = 25\n"
    text += '[tenants.b]\nprovider = "bamboohr"\ncompany_domain = "b"\napi_key = "k"\n'
    text += '[tenants.c]\nprovider = "bamboohr"\ncompany_domain = "c"\napi_key = "k"\n'
    text += "[tenants.c.guard]\nmin_count = 7\n"
    text += '[tenants.d]\nprovider = "bamboohr"\ncompany_domain = "d"\napi_key = "k"\n'
    text += "[tenants.d.guard]\nmax_percent = 50\nmin_count = 0\n"
    cfg = load_config(write(tmp_path, text))
    thresholds = {n: (cfg.guard_of(n).max_percent, cfg.guard_of(n).min_count) for n in ("acme-hr", "b", "c", "d")}
    assert thresholds == {"acme-hr": (25, 500), "b": (5, 500), "c": (5, 7), "d": (50, 0)}
    # Without [defaults.guard], a key left out is the built-in one.
    cfg = load_config(write(tmp_path, GOOD + "[tenants.acme-hr.guard]\nmin_count = 3\n"))
    assert (cfg.guard_of("acme-hr").max_percent, cfg.guard_of("acme-hr").min_count) == (10, 3)
    # A mistake still names the file, the tenant and the key.
    msg = error_of(tmp_path, GOOD + "[tenants.acme-hr.guard]\nmax_percent = 150\nmin_count = 5\n")
    assert msg == (
        f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.guard.max_percent: Input should be less than or equal to 100"
    )
    msg = error_of(tmp_path, GOOD + "[tenants.acme-hr.guard]\nmin_cout = 5\n")
    assert msg == f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.guard.min_cout: unknown key; did you mean min_count?"


def test_file_secret_relative_to_config(tmp_path):
    (tmp_path / "key.txt").write_text("from-file\n")
    cfg = load_config(write(tmp_path, GOOD.replace("env:ACME_BAMBOO_KEY", "file:key.txt")))
    assert cfg.tenant("acme-hr").api_key.get() == "from-file"
    cfg = load_config(write(tmp_path, GOOD.replace("env:ACME_BAMBOO_KEY", "file:missing.txt")))
    assert cfg.secret_problems("acme-hr") == [
        f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.api_key: secret file missing.txt ({tmp_path / 'missing.txt'}) "
        "does not exist"
    ]
    (tmp_path / "missing.txt").write_text("mounted later\n")  # read at the next run, no restart
    assert cfg.secret_problems("acme-hr") == [] and cfg.tenant("acme-hr").api_key.get() == "mounted later"


@pytest.mark.parametrize(("value", "problem"), [("env:", "env: needs a variable name"), ("", "is empty")])
def test_a_malformed_secret_reference_fails_the_load(tmp_path, value, problem):
    msg = error_of(tmp_path, GOOD.replace('"env:ACME_BAMBOO_KEY"', f'"{value}"'))
    assert msg == f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.api_key: {problem}"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('provider = "bamboohr"', 'provider = "ldap"'), "tenants.acme-hr: unknown provider 'ldap'; use"),
        (('company_domain = "acme"', ""), "tenants.acme-hr.company_domain: Field required"),
        (('schedule = "15m"', 'schedule = "often"'), "defaults.schedule: 'often' is not a duration"),
        (('schedule = "cron: */5 * * * *"', 'schedule = "cron: 99 * * * *"'), "tenants.acme-hr.schedule: bad cron"),
        (("[tenants.acme-hr]", "[tenants.acme-hr]\napi_secret = 1"), "tenants.acme-hr.api_secret: unknown key"),
        (('schedule = "15m"', 'schedule = "99999999999d"'), "defaults.schedule: '99999999999d' is too long"),
        (("[defaults]", '[defaults]\nfull_sync_every = "9999999999d"'), "defaults.full_sync_every: '9999999999d' is"),
        (("[defaults]", '[defaults]\nlease_ttl = "99999999999d"'), "defaults.lease_ttl: '99999999999d' is too long"),
        (("[tenants.acme-hr]", '[tenants.acme-hr]\nfull_sync_every = "99999999999d"'), "acme-hr.full_sync_every: "),
    ],
)
def test_mistakes_name_the_key(tmp_path, monkeypatch, change, expected):
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    msg = error_of(tmp_path, GOOD.replace(*change))
    assert expected in msg
    assert "Traceback" not in msg


def test_a_misspelt_key_is_reported_with_the_key_it_is_close_to(tmp_path, monkeypatch):
    """Before, `shedule` or `api_tokn` was only "unknown key": the operator had to find which of
    the documented keys was meant. Only keys are shown, never a value."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    text = GOOD.replace("[store]", 'stor = 1\n[store]').replace('url = "sqlite', 'pool_sise = 2\nurl = "sqlite')
    text = text.replace("[defaults]", '[defaults]\nlease_tl = "30s"')
    text = text.replace("[tenants.acme-hr]", "[defaults.guard]\nmax_percnt = 5\n[tenants.acme-hr]")
    text = text.replace('schedule = "cron', 'shedule = "cron')
    text = text.replace("company_domain", 'colour = "blue"\ncompany_domain')
    text += '[tenants.ok]\nprovider = "okta"\norg_url = "https://acme.okta.com"\napi_tokn = "s3cret-token"\n'
    f = tmp_path / "dirpull.toml"
    msg = error_of(tmp_path, text)
    assert "s3cret" not in msg
    assert msg.splitlines() == [
        f"{f}: store.pool_sise: unknown key; did you mean pool_size?",
        f"{f}: defaults.guard.max_percnt: unknown key; did you mean max_percent?",
        f"{f}: defaults.lease_tl: unknown key; did you mean lease_ttl?",
        f"{f}: tenants.acme-hr.colour: unknown key",  # nothing close: as before
        f"{f}: tenants.acme-hr.shedule: unknown key; did you mean schedule?",
        f"{f}: tenants.ok.api_tokn: unknown key; did you mean api_token?",
        f"{f}: stor: unknown key; did you mean store?",
    ]


@pytest.mark.parametrize("isolate", [False, True])
def test_a_top_level_path_key_fails_the_load_as_any_unknown_top_level_key(tmp_path, monkeypatch, isolate):
    """`path = "/var/lib/dirpull/dirpull.db"` above the tables loaded without a word (the name of
    Config's own record of the file it was read from), and the store stayed ./dirpull.db."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, 'path = "/var/lib/dirpull/dirpull.db"\n' + GOOD), isolate_tenants=isolate)
    assert str(exc.value) == (
        f"{tmp_path / 'dirpull.toml'}: path: unknown key; the store's file goes in [store] url = \"sqlite:///PATH\""
    )


def test_a_misspelt_provider_key_is_named_beside_provider_is_missing(tmp_path):
    """Before, `providr = "okta"` gave only "provider is missing": the line with the typo is
    not reported otherwise, as the table's keys are not checked without a provider."""
    table = '[tenants.ok]\nprovidr = "okta"\norg_url = "https://acme.okta.com"\napi_token = "s3cret-token"\n'
    msg = error_of(tmp_path, table)
    assert msg == (
        f"{tmp_path / 'dirpull.toml'}: tenants.ok: provider is missing (is 'providr' a misspelling of it?); "
        "use one of: entra_id, google_workspace, okta, workday, bamboohr"
    )
    # No key close to it: as before.
    msg = error_of(tmp_path, table.replace("providr", "vendor"))
    assert msg == (
        f"{tmp_path / 'dirpull.toml'}: tenants.ok: provider is missing; "
        "use one of: entra_id, google_workspace, okta, workday, bamboohr"
    )


@pytest.mark.parametrize(("value", "shown"), [('"okta "', "'okta '"), ('"Okta"', "'Okta'"), ("5", "5")])
def test_an_unknown_provider_is_quoted_as_given(tmp_path, value, shown):
    """Before, "unknown provider" did not say which: a trailing space or a capital was not seen."""
    msg = error_of(tmp_path, f'[tenants.ok]\nprovider = {value}\norg_url = "https://acme.okta.com"\n')
    assert msg == (
        f"{tmp_path / 'dirpull.toml'}: tenants.ok: unknown provider {shown}; "
        "use one of: entra_id, google_workspace, okta, workday, bamboohr"
    )


def test_an_unknown_workday_field_name_fails_the_load_naming_the_key(tmp_path):
    """Before, `fields.emial` loaded and every run of the tenant failed instead."""
    table = """
[tenants.wd]
provider = "workday"
users_report_url = "https://wd2-impl-services1.workday.com/ccx/service/customreport2/acme/ISU/Workers"
username = "ISU"
password = "x"
[tenants.wd.fields]
email = "Work_Email"
state = "Active_Status"
"""
    cfg = load_config(write(tmp_path, table))  # known names and their synonyms load
    assert cfg.tenant("wd").fields == {"email": "Work_Email", "state": "Active_Status"}
    msg = error_of(tmp_path, table + 'emial = "Work_Email"\n')
    assert f"{tmp_path / 'dirpull.toml'}: tenants.wd.fields: unknown field name(s) emial; known: " in msg
    assert "job_title" in msg and "Traceback" not in msg


WORKDAY_BASIC = """
[tenants.wd]
provider = "workday"
users_report_url = "https://wd2-impl-services1.workday.com/ccx/service/customreport2/acme/ISU/Workers"
username = "ISU"
password = "env:WD_PASSWORD"
"""
WORKDAY_OAUTH = {
    "token_url": '"https://wd2-impl-services1.workday.com/ccx/oauth2/acme/token"',
    "client_id": '"client"',
    "client_secret": '"env:WD_CLIENT_SECRET"',
    "refresh_token": '"env:WD_REFRESH_TOKEN"',
}


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        (["client_id"], "token_url, client_secret, refresh_token"),
        (["token_url", "client_id", "client_secret"], "refresh_token"),
    ],
)
def test_a_partial_workday_oauth_set_fails_the_load_naming_the_missing_keys(tmp_path, given, missing):
    """Beside username/password, an OAuth set missing a key was ignored: the operator who meant to
    move to OAuth kept syncing with the password, until it was revoked and every run failed."""
    oauth = "".join(f"{k} = {WORKDAY_OAUTH[k]}\n" for k in given)
    msg = error_of(tmp_path, WORKDAY_BASIC + oauth)
    assert msg == (
        f"{tmp_path / 'dirpull.toml'}: tenants.wd: OAuth needs token_url, client_id, client_secret and "
        f"refresh_token together; missing: {missing}; or leave them all out to use username and password"
    )
    without_basic = WORKDAY_BASIC.replace('username = "ISU"\npassword = "env:WD_PASSWORD"\n', "")
    msg = error_of(tmp_path, without_basic + oauth)
    assert msg.endswith(
        f"tenants.wd: OAuth needs token_url, client_id, client_secret and refresh_token together; missing: {missing}"
    )
    # A complete set, with or without username/password beside it, and username/password alone load.
    everything = "".join(f"{k} = {v}\n" for k, v in WORKDAY_OAUTH.items())
    for text in (WORKDAY_BASIC, WORKDAY_BASIC + everything, without_basic + everything):
        assert load_config(write(tmp_path, text)).tenant("wd").provider == "workday"


def test_a_plain_http_okta_org_url_is_refused_naming_every_address_it_is_allowed_on(tmp_path):
    """The message named 127.0.0.1 only, while ::1 and localhost load as well."""
    table = '[tenants.ok]\nprovider = "okta"\norg_url = "{}"\napi_token = "x"\n'
    msg = error_of(tmp_path, table.format("http://acme.okta.com"))
    assert msg == f"{tmp_path / 'dirpull.toml'}: tenants.ok.org_url: must use https:// (http:// is allowed only " \
        "for a local emulator on a loopback address: 127.0.0.1, ::1, localhost)"
    for url in ("http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost:8080"):
        assert load_config(write(tmp_path, table.format(url))).tenant("ok").org_url == url


@pytest.mark.parametrize("org_url", ["https://acme.okta.com/api/v1", "https://acme-admin.okta.com/admin/dashboard"])
def test_an_okta_org_url_with_a_path_fails_the_load_naming_the_key(tmp_path, org_url):
    """Before, it loaded and every run of the tenant failed ("must be the bare org URL")."""
    table = f'[tenants.ok]\nprovider = "okta"\norg_url = "{org_url}"\napi_token = "x"\n'
    msg = error_of(tmp_path, table)
    assert msg == f"{tmp_path / 'dirpull.toml'}: tenants.ok.org_url: must be the bare org URL, without a path " \
        "(https://YOUR-ORG.okta.com)"
    assert load_config(write(tmp_path, table.replace(org_url, "https://acme.okta.com/"))).tenant("ok").org_url == (
        "https://acme.okta.com"
    )


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("organizations[Primary].costCenter", "bad list selector [Primary] in 'organizations[Primary].costCenter'"),
        ("emails[type work]", "bad list selector [type work]"),
        ("relations[type=manager.value", "bad attribute path 'relations[type=manager.value'"),
        ("profile..costCenter", "bad attribute path 'profile..costCenter'"),
        ("", "bad attribute path ''"),
    ],
)
def test_a_bad_attribute_path_fails_the_load_naming_the_key(tmp_path, path, problem):
    """A typo in a mapping path used to load fine, then quarantine every user whose record holds a
    list at that step ("cannot normalize: bad list selector"), while the run succeeded (exit 0)."""
    text = GOOD + f'[tenants.acme-hr.attributes]\ncost_center = "{path}"\n'
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.attributes.cost_center: {problem}"), msg


def test_good_attribute_paths_load(tmp_path):
    paths = {
        "a": "organizations[primary].costCenter", "b": "relations[type=manager].value", "c": "x[0].y[-1]",
        "d": "customSchemas.Employment.Type", "e": "extension_b7e1c0de_costCenter", "f": "4001", "g": "Cost Center",
    }  # fmt: skip
    lines = "".join(f'{k} = "{v}"\n' for k, v in paths.items())
    cfg = load_config(write(tmp_path, GOOD + "[tenants.acme-hr.attributes]\n" + lines))
    assert cfg.tenant("acme-hr").attributes == paths


def test_okta_system_log_polling_needs_a_full_sync_within_its_retention(tmp_path):
    okta = '[tenants.o]\nprovider = "okta"\norg_url = "https://acme.okta.com"\napi_token = "t"\n'
    polling = okta + "poll_system_log = true\n"
    assert load_config(write(tmp_path, polling + 'full_sync_every = "90d"\n')).tenants["o"].poll_system_log
    assert load_config(write(tmp_path, '[defaults]\nfull_sync_every = "100d"\n' + okta)).tenants["o"]
    for text in (polling + 'full_sync_every = "91d"\n', '[defaults]\nfull_sync_every = "100d"\n' + polling):
        assert error_of(tmp_path, text) == (
            f"{tmp_path / 'dirpull.toml'}: tenants.o.full_sync_every: with poll_system_log at most 90d "
            "(the System Log keeps 90 days)"
        )


def test_bad_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in error_of(tmp_path, "[store\nurl=")
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.toml")


def test_env_overrides_store_url_and_config_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("DIRPULL_CONFIG", str(path))
    monkeypatch.setenv("DIRPULL_STORE_URL", "sqlite:///other.db")
    assert load_config().store.url == "sqlite:///other.db"


@pytest.mark.parametrize("store_url", [None, "sqlite:///other.db"])
def test_a_section_that_is_not_a_table(tmp_path, monkeypatch, store_url):
    """`store = "x"` is the same mistake whether or not $DIRPULL_STORE_URL overrides the url."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    if store_url:
        monkeypatch.setenv("DIRPULL_STORE_URL", store_url)
    path = tmp_path / "dirpull.toml"
    tenant = GOOD[GOOD.index("[tenants.acme-hr]") :]
    assert error_of(tmp_path, 'store = "x"\n' + tenant) == f"{path}: store: must be a table ([store])"
    assert error_of(tmp_path, "tenants = 1\n") == f"{path}: tenants: must be a table ([tenants])"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://u:hunter2@db:5432x/d", "'postgresql+psycopg://u:***@db:5432x/d': the port is not"),
        ("postgresql+psycopg//u:hunter2@db/d", "'postgresql+psycopg//u:***@db/d' is not a database URL (e.g. sqlite:"),
        ("postgresql+psycopg:u:hunter2@db/d", "'postgresql+psycopg:***@db/d' is not a database URL"),
        ("mysql://u:hunter2@db/d", "unsupported database 'mysql' (use sqlite or postgresql+psycopg)"),
        # Query parameters the driver cannot take: a traceback from every command, not a mistake.
        ("postgresql+psycopg://u:hunter2@db/d?port=x", "'postgresql+psycopg://u:***@db/d?port=x': Received non-"),
        ("postgresql+psycopg://u:hunter2@a,b/d?port=1,2,3", "'postgresql+psycopg://u:***@a,b/d?port=1,2,3': number of"),
        ("sqlite:///x.db?timeout=soon", "'sqlite:///x.db?timeout=soon': could not convert string to float: 'soon'"),
        # In memory: every command (every `dirpull sync`) opened an empty store of its own, so
        # syncs succeeded and every query found nothing.
        ("sqlite://", "'sqlite://' is an in-memory SQLite database, gone when the command ends; name a file"),
        ("sqlite:///:memory:", "'sqlite:///:memory:' is an in-memory SQLite database, gone when the command"),
        # A raw "@" in the password: the part after it was taken for the host and shown as such.
        (
            "postgresql+psycopg://u:p@hunter2@127.0.0.1:5432/d",
            "'postgresql+psycopg://u:***@127.0.0.1:5432/d': an '@' in the password or user name must be written %40",
        ),
    ],
)
@pytest.mark.parametrize("from_env", [False, True])
def test_bad_store_url_names_the_key_and_hides_the_password(tmp_path, monkeypatch, url, expected, from_env):
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    if from_env:
        monkeypatch.setenv("DIRPULL_STORE_URL", url)
    msg = error_of(tmp_path, GOOD if from_env else GOOD.replace("sqlite:///x.db", url))
    where = "store.url (from $DIRPULL_STORE_URL)" if from_env else "store.url"
    assert msg.startswith(f"{tmp_path / 'dirpull.toml'}: {where}: {expected}")
    assert "hunter2" not in msg and "\n" not in msg


@pytest.mark.parametrize("value", ["inf", "1e7"])
def test_a_store_connect_timeout_too_long_is_a_mistake_naming_the_key(tmp_path, monkeypatch, value):
    """`inf` loaded, then every command failed with an OverflowError traceback (SQLite's busy
    timeout is 3 × connect_timeout in milliseconds, a 32-bit number); `1e7` wrapped round to no
    wait at all for another process's write lock."""
    from typer.testing import CliRunner

    from dirpull.cli import app

    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    monkeypatch.chdir(tmp_path)
    with_timeout = GOOD.replace('url = "sqlite:///x.db"', 'url = "sqlite:///x.db"\nconnect_timeout = {}')
    path = write(tmp_path, with_timeout.format(value))
    r = CliRunner().invoke(app, ["--config", str(path), "status"])
    assert r.exit_code == 2, r.output
    assert r.stderr == f"dirpull: {path}: store.connect_timeout: Input should be less than or equal to 86400\n"
    assert not (tmp_path / "x.db").exists()
    assert load_config(write(tmp_path, with_timeout.format(86400))).store.connect_timeout == 86400


def test_store_refuses_a_bad_url_without_showing_the_password():
    for url in ("postgresql+psycopg://u:hunter2@db:5432x/d", "postgresql+psycopg//u:hunter2@db/d"):
        with pytest.raises(StoreError) as exc:
            Store(url)
        assert "hunter2" not in str(exc.value) and "u:***@db" in str(exc.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg://u:hunter2@db:5432/d", "postgresql+psycopg://u:***@db:5432/d"),
        ("postgresql+psycopg://u:hun@ter//2@db/d", "postgresql+psycopg://u:***@db/d"),
        ("postgresql+psycopg//u:hunter2@db/d", "postgresql+psycopg//u:***@db/d"),
        ("pg:u:hun//ter2@db/d", "pg:***@db/d"),
        ("u:hunter2@db", "u:***@db"),
        ("postgresql://db/d?sslmode=require&password=hunter2", "postgresql://db/d?sslmode=require&password=***"),
        ("postgresql://u@db/d?sslcert=c.pem&sslpassword=hunter2", "postgresql://u@db/d?sslcert=c.pem&sslpassword=***"),
        ("postgresql://u@db/d", "postgresql://u@db/d"),
        ("sqlite:////srv/a@b/dirpull.db", "sqlite:////srv/a@b/dirpull.db"),
    ],
)
def test_mask_password(url, masked):
    assert mask_password(url) == masked


def test_unknown_tenant_lists_known_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    cfg = load_config(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"unknown tenant 'nope' \(known: acme-hr\)"):
        cfg.tenant("nope")


def test_durations():
    assert parse_duration("30s").total_seconds() == 30
    assert parse_duration("6h").total_seconds() == 21600
    with pytest.raises(ValueError):
        parse_duration("0s")
    assert parse_duration("36500d").days == 36500
    for huge in ("36501d", "99999999999d", "1" + "9" * 400 + "s"):
        with pytest.raises(ValueError, match="is too long; at most 36500d"):
            parse_duration(huge)


def test_the_annotated_example_uses_only_known_keys(monkeypatch):
    """config/dirpull.example.toml documents every provider: its only errors may be the secrets
    and key files that exist on a real installation, not here."""
    example = Path(__file__).parent.parent / "config" / "dirpull.example.toml"
    cfg = load_config(example)
    problems = [line for tenant in cfg.tenants for line in cfg.secret_problems(tenant)]
    assert problems
    for line in problems:
        assert line.endswith(("is not set", "does not exist")), line


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('provider = "entra_id"\ntenant_id = "t"\nclient_id = "c"\nclient_secret = "s"\n'
         'graph_url = "graph.microsoft.us/v1.0"\n', "graph_url"),
        ('provider = "entra_id"\ntenant_id = "t"\nclient_id = "c"\nclient_secret = "s"\n'
         'login_url = "login.microsoftonline.us"\n', "login_url"),
        ('provider = "bamboohr"\ncompany_domain = "acme"\napi_key = "k"\n'
         'api_url = "api.bamboohr.com/api/gateway.php"\n', "api_url"),
        ('provider = "google_workspace"\ncredentials_file = "file:k.json"\nsubject = "a@b.c"\n'
         'api_url = "admin.googleapis.com"\n', "api_url"),
        ('provider = "workday"\nusers_report_url = "https:/wd5.myworkday.com/ccx/x"\nusername = "u"\npassword = "p"\n',
         "users_report_url"),
        ('provider = "workday"\nusers_report_url = "https://wd5.myworkday.com/ccx/x"\nusername = "u"\npassword = "p"\n'
         'groups_report_url = "wd5.myworkday.com/ccx/groups"\n', "groups_report_url"),
    ],
)  # fmt: skip
def test_an_endpoint_url_without_scheme_or_host_fails_the_load_naming_the_key(tmp_path, table, key):
    """Before, it loaded and every run of the tenant failed ("must be an http(s) URL", or the
    HTTP library's own "No connection adapters were found")."""
    msg = error_of(tmp_path, "[tenants.t1]\n" + table)
    assert msg == f"{tmp_path / 'dirpull.toml'}: tenants.t1.{key}: must be an http(s) URL, like https://host/path"


def test_an_okta_oauth_app_polling_the_system_log_gets_or_is_told_the_logs_scope(tmp_path):
    """Before, the default scopes lacked okta.logs.read and every run failed with a 403 on
    /api/v1/logs; explicit scopes without it now fail the load instead."""
    table = '[tenants.ok]\nprovider = "okta"\norg_url = "https://acme.okta.com"\nclient_id = "0oa1"\n' \
        'private_key = "file:k.pem"\npoll_system_log = true\n'
    assert load_config(write(tmp_path, table)).tenant("ok").scopes == [
        "okta.users.read", "okta.groups.read", "okta.logs.read",
    ]
    msg = error_of(tmp_path, table + 'scopes = ["okta.users.read", "okta.groups.read"]\n')
    assert msg == f"{tmp_path / 'dirpull.toml'}: tenants.ok: poll_system_log needs the okta.logs.read scope: " \
        "add it to scopes"
    without_polling = load_config(write(tmp_path, table.replace("true", "false"))).tenant("ok")
    assert without_polling.scopes == ["okta.users.read", "okta.groups.read"]


def test_okta_credentials_of_both_kinds_are_a_mistake_even_without_client_id(tmp_path):
    """A private_key next to api_token, client_id forgotten: the key was silently unused and the
    run went on with the token, though the operator had set up OAuth."""
    okta = '[tenants.o]\nprovider = "okta"\norg_url = "https://acme.okta.com"\napi_token = "t"\n'
    for extra in ('private_key = "file:key.pem"\n', 'client_id = "0oa1"\nprivate_key = "file:key.pem"\n',
                  'client_id = "0oa1"\n'):  # fmt: skip
        assert error_of(tmp_path, okta + extra) == (
            f"{tmp_path / 'dirpull.toml'}: tenants.o: give api_token or client_id/private_key, not both"
        )
    assert load_config(write(tmp_path, okta)).tenant("o").private_key is None


def test_an_okta_cursor_holdback_under_a_millisecond_fails_the_load_naming_the_key_and_the_minimum(tmp_path):
    """`cursor_holdback = 0` loaded, and the next run asked `lastUpdated gt` the very millisecond
    of the cursor: a change made in it, to a user on a page already read, was skipped by every
    incremental run until the next full sync."""
    okta = '[tenants.o]\nprovider = "okta"\norg_url = "https://acme.okta.com"\napi_token = "t"\n'
    for value in ("0", "0.0005", "-1", "nan"):
        assert error_of(tmp_path, okta + f"cursor_holdback = {value}\n") == (
            f"{tmp_path / 'dirpull.toml'}: tenants.o.cursor_holdback: must be at least 0.001 (seconds: one "
            "millisecond, the precision of Okta's lastUpdated); with less, a change made in the cursor's "
            "millisecond is skipped by every later run"
        )
    cfg = load_config(write(tmp_path, okta + "cursor_holdback = 0.001\n"), isolate_tenants=True)
    assert cfg.tenant("o").cursor_holdback == 0.001
    for value in ("inf", "1e12", "86401"):  # inf loaded, then every run failed with an OverflowError
        assert error_of(tmp_path, okta + f"cursor_holdback = {value}\n") == (
            f"{tmp_path / 'dirpull.toml'}: tenants.o.cursor_holdback: must be at most 86400 (seconds: a day, "
            "re-read by every incremental run)"
        )
    assert load_config(write(tmp_path, okta + "cursor_holdback = 86400\n")).tenant("o").cursor_holdback == 86400
    # Loaded by the daemon, the mistake makes only that tenant broken, saying why.
    cfg = load_config(write(tmp_path, GOOD + okta + "cursor_holdback = 0\n"), isolate_tenants=True)
    assert set(cfg.tenants) == {"acme-hr"}
    assert cfg.broken["o"].message.endswith("tenants.o.cursor_holdback: must be at least 0.001 (seconds: one "
        "millisecond, the precision of Okta's lastUpdated); with less, a change made in the cursor's "
        "millisecond is skipped by every later run")  # fmt: skip


def test_a_bamboohr_changed_overlap_under_a_second_fails_the_load_naming_the_key_and_the_minimum(tmp_path):
    """`changed_overlap = 0` loaded, and the next run asked `employees/changed?since=` the cursor's
    own second, which BambooHR compares strictly and to the second: a change made in that second
    after the run was never reported (until a full sync)."""
    for value in ("0", "0.5", "-1"):
        assert error_of(tmp_path, GOOD + f"changed_overlap = {value}\n") == (
            f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.changed_overlap: must be at least 1 (seconds: "
            "BambooHR's `since` has one-second precision); with less, a change made in the cursor's second "
            "is missed by every later run"
        )
    assert load_config(write(tmp_path, GOOD + "changed_overlap = 1\n")).tenant("acme-hr").changed_overlap == 1


def _as_acme_hr(table: str) -> str:
    """GOOD with its acme-hr tenant's table replaced by `table` (a `[tenants.acme-hr]` table)."""
    return GOOD[: GOOD.index("[tenants.acme-hr]")] + table


OKTA = _as_acme_hr('''[tenants.acme-hr]
provider = "okta"
org_url = "https://acme.okta.com"
api_token = "t"
''')
WORKDAY = _as_acme_hr('''[tenants.acme-hr]
provider = "workday"
users_report_url = "https://wd2.example/ccx/service/customreport2/acme/ISU/Workers"
username = "ISU"
password = "p"
''')


@pytest.mark.parametrize(
    ("table", "key"), [(GOOD, "timeout"), (OKTA, "request_timeout"), (WORKDAY, "timeout")],
    ids=["bamboohr", "okta", "workday"],
)
@pytest.mark.parametrize("value", ["inf", "1e10"])
def test_an_http_timeout_too_long_fails_the_load_naming_the_key(tmp_path, table, key, value):
    """BambooHR's and Workday's `timeout` and Okta's `request_timeout` of `inf` (or 1e10 s) loaded,
    then every run of the tenant failed with "OverflowError: timestamp out of range for platform
    time_t" (the socket's timeout) or "cannot convert float infinity to integer" (aiohttp's)."""
    assert error_of(tmp_path, table + f"{key} = {value}\n") == (
        f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.{key}: Input should be less than or equal to 86400"
    )
    assert getattr(load_config(write(tmp_path, table + f"{key} = 86400\n")).tenant("acme-hr"), key) == 86400


def test_a_tenant_id_ending_in_a_line_break_is_a_mistake(tmp_path, monkeypatch):
    """`[tenants."acme\\n"]` loaded as tenant "acme⏎": `dirpull sync acme` was an unknown tenant
    listing "known: acme" over two lines, and every log line and status row naming it broke."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    table = GOOD[GOOD.index("[tenants.acme-hr]") :]
    text = GOOD + table.replace("[tenants.acme-hr]", '[tenants."acme\\n"]')
    path = write(tmp_path, text)
    expected = f"{path}: tenants: tenant id 'acme\\n': use letters, digits, '-', '_' or '.'"
    assert error_of(tmp_path, text) == expected
    cfg = load_config(path, isolate_tenants=True)
    assert list(cfg.tenants) == ["acme-hr"] and cfg.broken["acme\n"].errors == (expected,)


@pytest.mark.parametrize(
    ("tenant", "problem"),
    [
        ("a" * 64, "too long (64 characters; at most 63)"),
        ("_staging", "must start with a letter or a digit"),
        ("-acme", "must start with a letter or a digit"),
        ("acme corp", "use letters, digits, '-', '_' or '.'"),
        ("é", "use letters, digits, '-', '_' or '.'"),
    ],
)
def test_a_bad_tenant_id_is_told_what_is_wrong_with_it(tmp_path, monkeypatch, tenant, problem):
    """An id of letters and digits that was too long, or one starting with '_', was told to "use
    letters, digits, '-', '_' or '.'", which it did."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    text = GOOD.replace("[tenants.acme-hr]", f'[tenants."{tenant}"]')
    assert error_of(tmp_path, text) == f"{tmp_path / 'dirpull.toml'}: tenants: tenant id {tenant!r}: {problem}"
    assert list(load_config(write(tmp_path, text.replace(tenant, "a" * 63))).tenants) == ["a" * 63]


@pytest.mark.parametrize("value", ["0.1s", "0.0000001s"])
def test_a_lease_ttl_shorter_than_its_heartbeat_can_renew_fails_the_load(tmp_path, monkeypatch, value):
    """The lease is renewed every lease_ttl / 3, at most every 0.2 s: a shorter one loaded and every
    run that lasted longer (with "0.0000001s", zero once rounded: every run) failed with "lease lost
    before commit; nothing applied"."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    text = GOOD.replace("[defaults]", "[defaults]\nlease_ttl = \"{}\"")
    assert error_of(tmp_path, text.format(value)) == (
        f"{tmp_path / 'dirpull.toml'}: defaults.lease_ttl: {value!r} is too short; at least 1s"
    )
    assert load_config(write(tmp_path, text.format("1s"))).defaults.lease_ttl == "1s"


@pytest.mark.parametrize("value", ["-5", "0", "inf", "nan"])
def test_a_bare_number_that_is_no_duration_with_a_unit_either_is_not_told_to_take_one(tmp_path, monkeypatch, value):
    """`lease_ttl = -5` was told to write "-5s", "-5m", … and `inf` "infs": each refused in turn."""
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    text = GOOD.replace("[defaults]", f"[defaults]\nlease_ttl = {value}")
    assert error_of(tmp_path, text) == (
        f'{tmp_path / "dirpull.toml"}: defaults.lease_ttl: must be a duration in quotes: "30s", "15m", "6h" or "1d"'
    )
    assert "60 has no unit" in error_of(tmp_path, GOOD.replace("[defaults]", "[defaults]\nlease_ttl = 60"))


def test_okta_dpop_is_for_an_oauth_app_and_refused_with_an_api_token(tmp_path):
    """`dpop = true` binds OAuth tokens (RFC 9449); with api_token it would silently do nothing."""
    base = '[tenants.o]\nprovider = "okta"\norg_url = "https://acme.okta.com"\ndpop = true\n'
    assert load_config(write(tmp_path, base + 'client_id = "0oa1"\nprivate_key = "file:k.pem"\n')).tenant("o").dpop
    assert error_of(tmp_path, base + 'api_token = "t"\n') == (
        f"{tmp_path / 'dirpull.toml'}: tenants.o: dpop applies to OAuth service apps (client_id and private_key), "
        "not to api_token"
    )


ENTRA = _as_acme_hr('''[tenants.acme-hr]
provider = "entra_id"
tenant_id = "t"
client_id = "c"
client_secret = "s"
''')


@pytest.mark.parametrize(
    ("text", "where", "last_good", "first_bad", "problem"),
    [
        (GOOD.replace("[store]\n", "[store]\npool_size = {}\n"), "store.pool_size", "100", "101", "<= 100"),
        (GOOD.replace("[defaults]\n", "[defaults]\nmax_concurrent_syncs = {}\n"), "defaults.max_concurrent_syncs",
         "64", "65", "<= 64"),
        (GOOD + "batch_size = {}\n", "tenants.acme-hr.batch_size", "5000", "5001", "<= 5000"),
        (GOOD + "page_size = {}\n", "tenants.acme-hr.page_size", "100000", "100001", "<= 100000"),
        (GOOD + "changed_overlap = {}\n", "tenants.acme-hr.changed_overlap", "86400", "86401", "<= 86400"),
        (ENTRA + "max_retry_attempts = {}\n", "tenants.acme-hr.max_retry_attempts", "20", "21", "<= 20"),
        (GOOD + "max_retry_attempts = {}\n", "tenants.acme-hr.max_retry_attempts", "20", "21", "<= 20"),
        (WORKDAY + "max_retry_attempts = {}\n", "tenants.acme-hr.max_retry_attempts", "20", "21", "<= 20"),
        (OKTA + "rate_limit_reserve = {}\n", "tenants.acme-hr.rate_limit_reserve", "0.99", "1", "< 1"),
        (ENTRA + "max_retry_wait = {}\n", "tenants.acme-hr.max_retry_wait", "604800", "inf", "<= 604800"),
        (GOOD + "max_retry_wait = {}\n", "tenants.acme-hr.max_retry_wait", "604800", "604801", "<= 604800"),
        (OKTA + "max_rate_limit_wait = {}\n", "tenants.acme-hr.max_rate_limit_wait", "604800", "inf", "<= 604800"),
        (OKTA + "max_run_time = {}\n", "tenants.acme-hr.max_run_time", "604800", "604801", "<= 604800"),
        (GOOD.replace("[defaults]\n", "[defaults]\nmax_run_time = {}\n"), "defaults.max_run_time",
         '"7d"', '"8d"', "<= 604800"),
    ],
    ids=["pool_size", "max_concurrent_syncs", "batch_size", "page_size", "changed_overlap", "max_retry_attempts",
         "bamboohr_max_retry_attempts", "workday_max_retry_attempts", "rate_limit_reserve",
         "max_retry_wait", "bamboohr_max_retry_wait", "max_rate_limit_wait", "max_run_time",
         "defaults_max_run_time"],
)
def test_the_documented_upper_limits_of_numeric_keys_hold(tmp_path, monkeypatch, text, where, last_good, first_bad,
                                                            problem):  # fmt: skip
    """The limits README.md, config/dirpull.example.toml and the provider pages give for these keys
    (they gave only the defaults: an operator raising one learnt its limit from a refused load)."""
    monkeypatch.delenv("DIRPULL_STORE_URL", raising=False)
    load_config(write(tmp_path, text.format(last_good)))
    words = {"<=": "less than or equal to", "<": "less than"}[problem.split()[0]]
    assert error_of(tmp_path, text.format(first_bad)) == (
        f"{tmp_path / 'dirpull.toml'}: {where}: Input should be {words} {problem.split()[1]}"
    )


@pytest.mark.parametrize("form", ["env", "file"])
def test_the_store_url_may_be_an_env_or_file_secret_as_any_secret_value(tmp_path, monkeypatch, form):
    # It holds the database's password; refused as "not a database URL" before.
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    url = f"sqlite:///{tmp_path / 'from-secret.db'}"
    if form == "env":
        monkeypatch.setenv("DIRPULL_TEST_STORE_URL", url + "\n")
        ref = "env:DIRPULL_TEST_STORE_URL"
    else:
        (tmp_path / "store-url").write_text(url + "\n", encoding="utf-8")
        ref = "file:store-url"  # relative: to the configuration's folder, as every file: secret
    assert load_config(write(tmp_path, GOOD.replace("sqlite:///x.db", ref))).store.url == url


def test_a_store_url_secret_that_cannot_be_read_names_the_key_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ACME_BAMBOO_KEY", "k")
    monkeypatch.delenv("DIRPULL_TEST_STORE_URL", raising=False)
    msg = error_of(tmp_path, GOOD.replace("sqlite:///x.db", "env:DIRPULL_TEST_STORE_URL"))
    assert msg == f"{tmp_path / 'dirpull.toml'}: store.url: environment variable DIRPULL_TEST_STORE_URL is not set"


def test_a_workday_timezone_naming_a_folder_or_a_data_file_of_the_zone_database_fails_the_load_naming_the_key(
    tmp_path,
):
    """`timezone = "America"` (a zone's region without its city) raised IsADirectoryError out of
    the load: a traceback from every command instead of the tenant's one-line mistake."""
    table = WORKDAY_BASIC
    for zone in ("America", "Europe", "zone.tab"):
        msg = error_of(tmp_path, table + f'timezone = "{zone}"\n')
        assert f"tenants.wd.timezone: unknown time zone '{zone}'" in msg, msg
    # Loaded by the daemon, the mistake makes only that tenant broken, saying why.
    cfg = load_config(write(tmp_path, GOOD + table + 'timezone = "America"\n'), isolate_tenants=True)
    assert set(cfg.tenants) == {"acme-hr"}
    assert "tenants.wd.timezone: unknown time zone 'America'" in cfg.broken["wd"].message
    assert load_config(write(tmp_path, table + 'timezone = "America/New_York"\n')).tenant("wd").timezone


@pytest.mark.parametrize("tenant", [GOOD, WORKDAY, OKTA, ENTRA], ids=["bamboohr", "workday", "okta", "entra_id"])
def test_max_run_time_is_seconds_or_a_duration_in_defaults_and_per_tenant(tmp_path, monkeypatch, tenant):
    """A run's time limit (default 6 hours): `[defaults]`'s, or the tenant's own, as a number of
    seconds or a duration; a bad value is refused at load, naming the key."""
    monkeypatch.delenv("DIRPULL_STORE_URL", raising=False)
    assert load_config(write(tmp_path, tenant)).max_run_time_of("acme-hr") == 6 * 3600
    with_defaults = tenant.replace("[defaults]\n", '[defaults]\nmax_run_time = "90m"\n')
    assert load_config(write(tmp_path, with_defaults)).max_run_time_of("acme-hr") == 5400
    assert load_config(write(tmp_path, with_defaults + "max_run_time = 1.5\n")).max_run_time_of("acme-hr") == 1.5
    assert load_config(write(tmp_path, tenant + 'max_run_time = "2h"\n')).max_run_time_of("acme-hr") == 7200
    where = f"{tmp_path / 'dirpull.toml'}: tenants.acme-hr.max_run_time"
    assert error_of(tmp_path, tenant + "max_run_time = 0\n") == f"{where}: Input should be greater than 0"
    assert error_of(tmp_path, tenant + "max_run_time = -5\n") == f"{where}: Input should be greater than 0"
    assert error_of(tmp_path, tenant + "max_run_time = nan\n") == f"{where}: Input should be greater than 0"
    assert error_of(tmp_path, tenant + 'max_run_time = "0s"\n') == f"{where}: a duration must be positive"
    assert error_of(tmp_path, tenant + 'max_run_time = "6 hours"\n') == (
        f"{where}: '6 hours' is not a duration like 30s, 15m, 6h or 1d; or seconds as a number, without quotes"
    )
    assert error_of(tmp_path, tenant + "max_run_time = true\n") == (
        f'{where}: must be seconds as a number, or a duration like "6h" or "90m"'
    )
    assert error_of(tmp_path, tenant.replace("[defaults]\n", "[defaults]\nmax_run_time = 0\n")) == (
        f"{tmp_path / 'dirpull.toml'}: defaults.max_run_time: Input should be greater than 0"
    )
