from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SyncHarness

# Keep the SDKs hermetic: no ambient credentials, config files or proxies leak into tests.
for _name in list(os.environ):
    if _name.startswith(("OKTA_CLIENT_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_")):
        del os.environ[_name]
os.environ.pop("DIRPULL_STORE_URL", None)  # it would override every test's store
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

PG_ENV = "DIRPULL_TEST_PG_URL"
STORES = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def _fresh_dpop_keys() -> Iterator[None]:
    """Each test as a process of its own: an Okta DPoP tenant's key (and the nonce Okta gave it)
    is kept from run to run of a process, and would save a later test's run its nonce challenge."""
    from dirpull.connectors import okta

    okta._DPOP_GENERATORS.clear()
    yield
    okta._DPOP_GENERATORS.clear()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stores: run the test once on SQLite and once on PostgreSQL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests (or modules) marked `stores` get the `store_url` fixture on both stores; the rest
    # keep SQLite. A test marked `postgres` runs on PostgreSQL only.
    if "store_kind" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers():  # the closest (function, class, module) first
        if marker.name in ("stores", "postgres"):
            kinds = STORES if marker.name == "stores" else ["postgresql"]
            metafunc.parametrize("store_kind", kinds, indirect=True)
            return


def pg_url_or_skip() -> str:
    """A database of this test process's own on the PostgreSQL server for tests; skipped by hand
    without a server, a failure in CI."""
    url = os.environ.get(PG_ENV)
    if url:
        return _own_database(url)
    message = f'PostgreSQL tests need {PG_ENV} (start a throw-away server: export {PG_ENV}="$(scripts/postgres start)")'
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {message}", pytrace=False)
    pytest.skip(message)


_OWN_DATABASES: list[tuple[Any, str]] = []  # (the server's URL, a database made on it) to drop at the end
# Names of the databases test processes make: `<the URL's database>_tp_<worker>_<8 hex>`. Each such
# process keeps a connection to the URL's database whose application_name is its database's name
# for as long as it lives, so a process gone without its session's end (an xdist worker that
# crashed and was restarted, a run killed with SIGKILL) is told from a live one, here or on another
# machine: only the databases of gone ones are swept.
_OWN_MARK = "_tp_"
_HOLDERS: list[Any] = []  # the connections that say this process's databases are in use


@functools.cache
def _own_database(server_url: str) -> str:
    """`pg_locks` is per database, not per schema: parallel test workers (pytest-xdist), or two
    test runs sharing one server, would see each other's waiters (and, before the store's advisory
    locks were keyed by its schema, wait on each other's locks). So each test process gets a database
    of its own, made on first use and dropped when the session ends. Those of test processes that
    never reached their end are dropped first: on a developer's own server they added up, a
    database per crashed worker or killed run."""
    import sqlalchemy as sa

    base = sa.engine.make_url(server_url)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"{base.database}{_OWN_MARK}{worker}_{uuid.uuid4().hex[:8]}"
    # Held before the database exists: another process sweeping meanwhile never takes it for a leftover.
    holder = sa.create_engine(
        base.update_query_dict({"application_name": name}), poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    _HOLDERS.append((holder, holder.connect()))
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            _drop_leftovers(conn, f"{base.database}{_OWN_MARK}")
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    _OWN_DATABASES.append((base, name))
    return base.set(database=name).render_as_string(hide_password=False)


def _drop_leftovers(conn: Any, prefix: str) -> None:
    """Drop the test databases (`prefix`…) whose process no longer holds its connection."""
    import sqlalchemy as sa

    names = [n for (n,) in conn.execute(sa.text("SELECT datname FROM pg_database")) if n.startswith(prefix)]
    # Read after the names: a database listed was made after its holder connected, so a live one's
    # holder is seen here.
    live = {a for (a,) in conn.execute(sa.text("SELECT application_name FROM pg_stat_activity"))}
    for name in names:
        if name not in live:
            try:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except sa.exc.DBAPIError:
                pass  # another account's (must be owner), or dropped by another process sweeping too


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sqlalchemy as sa

    try:
        for base, name in _OWN_DATABASES:
            admin = sa.create_engine(base, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
            try:
                with admin.connect() as conn:
                    # FORCE: a connection a test left open (a killed worker's, a pool's) must not keep it.
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            finally:
                admin.dispose()
    finally:
        for engine, conn in _HOLDERS:
            conn.close()
            engine.dispose()


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def pg_schema_url() -> Iterator[Any]:
    """`make()` returns the URL of a fresh, empty PostgreSQL schema (its own search_path), dropped
    after the test: tests never see each other's rows, and creating one is quick."""
    import sqlalchemy as sa

    base = sa.engine.make_url(pg_url_or_skip())
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        made.append(name)
        url = base.update_query_dict({"options": f"-csearch_path={name}"})
        return url.render_as_string(hide_password=False)

    yield make
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SET lock_timeout = '20s'"))
            for name in made:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    finally:
        admin.dispose()


@pytest.fixture
def store_url(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty store: SQLite in tmp_path, or a new PostgreSQL schema."""
    if store_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_schema_url")()


@pytest.fixture
def harness(tmp_path: Path, store_url: str) -> Iterator[Any]:
    """`harness(tenants, **kw)` builds a SyncHarness on a fresh store; closed after the test.
    SQLite unless the test is marked `stores` (both) or `postgres`."""
    made: list[SyncHarness] = []

    def make(tenants: dict[str, dict[str, Any]], **kwargs: Any) -> SyncHarness:
        kwargs.setdefault("store_url", store_url)
        h = SyncHarness(tmp_path, tenants, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
