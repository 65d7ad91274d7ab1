"""The test harness itself: a real server, of a supported version, with the extensions jobs use."""

import psycopg


def test_server_is_real_and_supported(pg_server):
    assert pg_server.version_num >= 140000


def test_extensions_available(conn: psycopg.Connection):
    names = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}
    assert {"pgstattuple", "pg_stat_statements"} <= names
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    assert conn.execute("SELECT count(*) >= 0 FROM pg_stat_statements").fetchone()[0] is True
    conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    conn.execute("CREATE TABLE probe (id int)")
    assert conn.execute("SELECT table_len FROM pgstattuple('probe')").fetchone()[0] == 0


def test_fresh_database_per_module(database: str, pg_server):
    with psycopg.connect(database) as c:
        name = c.execute("SELECT current_database()").fetchone()[0]
    assert name.startswith("test_harness_")
