"""Shared fixtures: a real PostgreSQL server (throwaway unless DFSFS_TEST_DATABASE_URL is
set) and a fresh database per test module.

`database_url` names the owner role (root reaches it by peer authentication, as on an
embedded server): `dfsfs` commands given it have the owner's credentials, and their
mounts connect as the client role of the same server (`client_url`)."""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dfsfs.auth import login
from dfsfs.config import CLIENT_ROLE
from dfsfs.embedded import PostgresServer
from dfsfs.meta.db import create_engine
from dfsfs.meta.migrations import migrate
from dfsfs.session import LoginResult, session_engine

# Cheap argon2 parameters keep account tests fast; production uses the defaults.
os.environ.setdefault("DFSFS_ARGON2_PROFILE", "test")


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the whole test session, stopped at the end."""
    if os.environ.get("DFSFS_TEST_DATABASE_URL"):
        yield None
        return
    # A short path the postgres user can reach (pytest's tmp_path under /root is not).
    base = Path(tempfile.mkdtemp(prefix="dfsfs-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    server = PostgresServer(base / "pg", port=5432, durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def database_factory(postgres_server):
    """Make a new empty database and return its URL."""
    created = []

    def make() -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        if postgres_server is None:
            admin_url = os.environ["DFSFS_TEST_DATABASE_URL"]
            admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            admin.dispose()
            url = sa.engine.make_url(admin_url).set(database=name).render_as_string(
                hide_password=False
            )
        else:
            postgres_server.ensure_database(name)
            url = postgres_server.url(name)
        created.append(name)
        return url

    return make


@pytest.fixture(scope="module")
def database_url(database_factory):
    """A fresh, migrated database for each test module."""
    url = database_factory()
    engine = create_engine(url)
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def admin_engine(database_url):
    """An engine of the owner role: every row of every account."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def client_url(database_url):
    """The URL of the client role on the module's database (no rights without a login)."""
    return client_url_of(database_url)


def client_url_of(url: str) -> str:
    return sa.engine.make_url(url).set(username=CLIENT_ROLE, password=None).render_as_string(
        hide_password=False)


def login_as(url: str, name: str, password: str, purpose: str = "mount") -> LoginResult:
    """A login session of `name`, through the client role of `url`'s server (as a mount's)."""
    anonymous = create_engine(client_url_of(url), pool_size=1)
    try:
        return login(anonymous, name, password, purpose=purpose)
    finally:
        anonymous.dispose()


def scoped_engine(url: str, name: str, password: str, **options) -> Engine:
    """An engine of the client role whose connections act under a new login of `name`."""
    return session_engine(client_url_of(url), login_as(url, name, password), **options)
