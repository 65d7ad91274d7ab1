"""The health job against real PostgreSQL: connections, wraparound age, invalid and unused indexes."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgupkeep import db
from pgupkeep.jobs import health
from pgupkeep.jobs.base import JobContext
from pgupkeep.results import JobOutput
from pgupkeep.runner import execute_job

NOW = datetime(2026, 11, 25, tzinfo=UTC)
STATES = ["active", "idle", "idle_in_transaction", "idle_in_transaction_aborted", "fastpath_function_call", "disabled", "unknown"]


def run_job(dsn: str, extra: str = "") -> JobOutput:
    from pgupkeep.policy import parse_policy

    lines = "".join(f"      {line}\n" for line in extra.strip().splitlines())
    text = 'version: 1\ntargets:\n  - name: t\n    dsn: "${DSN}"\n    health:\n      unused_index_min_size: 64kB\n' + lines
    policy = parse_policy(text, environ={"DSN": dsn})
    target = policy.targets[0]
    with db.connect(target) as c:
        ctx = JobContext(target=target, section=target.health, conn=c, now=NOW, timezone=policy.daemon.zone)
        return execute_job(health.KIND, ctx)


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s)


def samples(out: JobOutput) -> dict[tuple[str, str], float]:
    return {(s.metric, s.labels.get("state", "")): s.value for s in out.samples}


@pytest.fixture(scope="module")
def indexed(database: str) -> str:
    """Indexes of every kind: unused, used, constraint-backed, too small, and one left invalid."""
    execute(
        database,
        "CREATE TABLE items (id int PRIMARY KEY, code int UNIQUE, k int, v int)",
        "INSERT INTO items SELECT g, g, g % 100, g FROM generate_series(1, 20000) g",
        "CREATE INDEX items_v_unused ON items (v)",
        "CREATE INDEX items_k_used ON items (k)",
        "CREATE TABLE tiny (a int)",
        "CREATE INDEX tiny_a_unused ON tiny (a)",
        "ANALYZE items",
    )
    with pytest.raises(psycopg.errors.UniqueViolation):
        # Duplicate keys: the concurrent build fails and leaves the index behind, invalid.
        execute(database, "CREATE UNIQUE INDEX CONCURRENTLY items_k_dup ON items (k)")
    execute(database, "SET enable_seqscan = off; SELECT count(*) FROM items WHERE k = 7")
    deadline = time.monotonic() + 15
    while True:
        with psycopg.connect(database, autocommit=True) as c:
            scans = c.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'items_k_used'").fetchone()[0]
        if scans:
            return database
        assert time.monotonic() < deadline, "index scan never showed in pg_stat_user_indexes"
        time.sleep(0.05)


def test_health_finds_invalid_and_unused_indexes_and_reports_gauges(indexed: str):
    out = run_job(indexed)

    assert out.actions == [] and out.errors == []
    by_kind = {(f.kind, f.object): f.to_dict() for f in out.findings}
    assert set(by_kind) == {("invalid_index", "public.items_k_dup"), ("unused_index", "public.items_v_unused")}
    invalid = by_kind[("invalid_index", "public.items_k_dup")]
    assert invalid == {
        "kind": "invalid_index",
        "object": "public.items_k_dup",
        "value": None,
        "message": invalid["message"],
        "index": "public.items_k_dup",
        "table": "public.items",
    }
    assert "REINDEX INDEX CONCURRENTLY public.items_k_dup" in invalid["message"]
    unused = by_kind[("unused_index", "public.items_v_unused")]
    with psycopg.connect(indexed, autocommit=True) as c:
        size = c.execute("SELECT pg_relation_size('items_v_unused')").fetchone()[0]
        db_size = c.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        max_conn = int(c.execute("SHOW max_connections").fetchone()[0])
    assert unused == {
        "kind": "unused_index",
        "object": "public.items_v_unused",
        "value": size,
        "message": unused["message"],
        "index": "public.items_v_unused",
        "table": "public.items",
        "size_bytes": size,
        "stats_reset": unused["stats_reset"],
    }

    got = samples(out)
    assert set(got) == {("connections", s) for s in STATES} | {
        ("connections_max", ""),
        ("server_connections", ""),
        ("database_xid_age", ""),
        ("invalid_indexes", ""),
        ("unused_indexes", ""),
        ("database_size_bytes", ""),
    }
    assert got[("connections", "active")] >= 1  # this job's own session
    assert got[("connections_max", "")] == max_conn
    assert got[("invalid_indexes", "")] == 1 and got[("unused_indexes", "")] == 1
    assert got[("database_size_bytes", "")] == pytest.approx(db_size, rel=0.05)
    assert 0 < got[("database_xid_age", "")] < 1_200_000_000


def test_xid_age_over_threshold_is_a_wraparound_finding(indexed: str):
    for _ in range(3):
        execute(indexed, "SELECT txid_current()")  # burn a few transaction ids

    out = run_job(indexed, "xid_age_threshold: 1")

    [f] = [f.to_dict() for f in out.findings if f.kind == "xid_wraparound"]
    database = conninfo_to_dict(indexed)["dbname"]
    age = samples(out)[("database_xid_age", "")]
    assert f == {
        "kind": "xid_wraparound",
        "object": database,
        "value": age,
        "message": f["message"],
        "database": database,
        "xid_age": age,
        "threshold": 1,
        "cluster_xid_age": f["cluster_xid_age"],
        "oldest_database": f["oldest_database"],
    }
    assert f["cluster_xid_age"] >= age and f["message"].startswith(f"{database}: age(datfrozenxid) is {int(age)}")


def test_connections_over_warn_ratio_are_a_finding(indexed: str):
    out = run_job(indexed, "connections_warn_ratio: 0")

    [f] = [f.to_dict() for f in out.findings if f.kind == "connections_high"]
    in_database = sum(v for (m, _), v in samples(out).items() if m == "connections")
    used = samples(out)[("server_connections", "")]
    server = next(s.labels["server"] for s in out.samples if s.metric == "server_connections")
    assert f["object"] == f["server"] == server
    assert f["value"] == used and f["connections"] == used and f["database_connections"] == in_database
    assert f["active"] >= 1 and used >= in_database
    assert f["max_connections"] == samples(out)[("connections_max", "")]
    assert f["message"].startswith(f"server {server}: {int(used)} of max_connections {f['max_connections']} client connections")
    assert run_job(indexed, "connections_warn_ratio: 1").findings == run_job(indexed).findings


def test_connections_count_the_database_and_server_figures_carry_the_server(pg_server):
    """Two targets on one server: each counts its own database's sessions; max_connections and the
    server's sessions are the same series values under the same `server` label for both."""
    names = [pg_server.create_database("health_scope") for _ in range(2)]
    dsns = [pg_server.dsn(n) for n in names]
    held = [psycopg.connect(dsns[0]) for _ in range(3)] + [psycopg.connect(dsns[1])]
    try:
        for c in held[:3]:
            c.execute("SELECT 1")  # idle in transaction, in the first database
        outs = [run_job(dsn) for dsn in dsns]
        with pg_server.admin() as admin:
            sysid = admin.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]
            everyone = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0]
    finally:
        for c in held:
            c.close()
        for n in names:
            pg_server.drop_database(n)

    a, b = (samples(out) for out in outs)
    # This job's own session is the one active session of each database.
    assert (a[("connections", "idle_in_transaction")], a[("connections", "idle")], a[("connections", "active")]) == (3, 0, 1)
    assert (b[("connections", "idle_in_transaction")], b[("connections", "idle")], b[("connections", "active")]) == (0, 1, 1)
    params = conninfo_to_dict(dsns[0])
    server = f"{params['host']}:{params['port']}/{sysid}"
    for out in outs:
        assert {s.metric: dict(s.labels) for s in out.samples if s.metric in ("connections_max", "server_connections")} == {
            "connections_max": {"server": server},
            "server_connections": {"server": server},
        }
    # The admin session counted now stands for the job's own session counted then.
    assert a[("server_connections", "")] == b[("server_connections", "")] == everyone


def test_connection_states_are_normalised_and_complete():
    counts = health.connection_counts({"active": 2, "idle in transaction (aborted)": 1, None: 4, "idle": 3})
    assert counts == {
        "active": 2,
        "idle": 3,
        "idle_in_transaction": 0,
        "idle_in_transaction_aborted": 1,
        "fastpath_function_call": 0,
        "disabled": 0,
        "unknown": 4,
    }
