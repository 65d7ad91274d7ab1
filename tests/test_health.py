"""The health job against real PostgreSQL: connections, wraparound age, invalid and unused indexes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

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
BASIC_METRICS = {"connections", "connections_max", "server_connections", "database_xid_age", "invalid_indexes", "unused_indexes",
                 "database_size_bytes"}


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
    assert {k for k in got if k[0] in BASIC_METRICS} == {("connections", s) for s in STATES} | {
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


# --------------------------------------------------------------------------- outages coming
# A server of this module's own: wal_level=logical for a logical slot, prepared transactions
# allowed, and a streaming standby of it. Stopped at module end.


def by_metric(out: JobOutput, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A gauge family's values by labels, without `server` (what every server-wide series carries)."""
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k != "server")): s.value for s in out.samples if s.metric == metric}


def servers(out: JobOutput, *metrics: str) -> set[str]:
    return {s.labels.get("server", "") for s in out.samples if s.metric in metrics}


def findings(out: JobOutput, kind: str) -> list[dict]:
    return [f.to_dict() for f in out.findings if f.kind == kind]


def run_at(dsn: str, extra: str = "", now: datetime = NOW, memo: dict | None = None, target: str = "") -> JobOutput:
    from pgupkeep.policy import parse_policy

    lines = "".join(f"      {line}\n" for line in extra.strip().splitlines())
    text = 'version: 1\ntargets:\n  - name: t\n    dsn: "${DSN}"\n' + (f"    {target}\n" if target else "")
    policy = parse_policy(text + "    health:\n" + (lines or "      {}\n"), environ={"DSN": dsn})
    target = policy.targets[0]
    with db.connect(target) as c:
        ctx = JobContext(target=target, section=target.health, conn=c, now=now, timezone=policy.daemon.zone, memo=memo if memo is not None else {})
        return execute_job(health.KIND, ctx)


def burn_xids(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for _ in range(n):
            c.execute("SELECT txid_current()")


def wait_for(check, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_prepared_transactions": "5",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby_feedback": "off",
}


@pytest.fixture(scope="module")
def own_server():
    import os

    from pgupkeep.pgserver import candidate_bindirs, start_server

    if not candidate_bindirs():
        message = "no PostgreSQL server binaries to start a server with wal_level=logical"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = start_server(settings=SERVER_SETTINGS)
    try:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
            c.execute("CREATE DATABASE app")
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def primary(own_server) -> str:
    return own_server.dsn("app")


@pytest.fixture(scope="module")
def replica(own_server) -> str:
    """A streaming standby of the module's server, as a DSN to its `app` database."""
    import tempfile
    from pathlib import Path

    from pgupkeep.pgserver import LocalServer

    root = Path(tempfile.mkdtemp(prefix="pgupkeep-health-standby-"))
    server = LocalServer(bindir=own_server.bindir, datadir=root / "pgdata", settings=SERVER_SETTINGS)
    server.init(primary_dsn=own_server.dsn("postgres") + "?application_name=health_standby")
    server._tmp = root  # removed with the server
    # pg_basebackup -R writes every libpq option it knows (sslnegotiation on 17); the server's
    # walreceiver may load an older libpq that refuses them. Only these are needed.
    with open(server.datadir / "postgresql.auto.conf", "a") as conf:
        conf.write(f"primary_conninfo = 'host=127.0.0.1 port={own_server.port} user=postgres application_name=health_standby'\n")
    try:
        server.start()
        dsn = server.dsn("app")
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        yield dsn
    finally:
        server.remove()


def slot_figure(dsn: str, slot: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        return float(c.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()[0])  # fmt: skip


def test_inactive_physical_slot_keeping_wal_is_found_with_the_servers_figure(primary: str):
    execute(primary, "SELECT pg_create_physical_replication_slot('health_abandoned', true)")
    try:
        # The test server runs synchronous_commit=off: the checkpoint writes out all of that WAL.
        execute(primary, "CREATE TABLE wal_filler WITH (autovacuum_enabled = false) AS "
                         "SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 40000) g", "CHECKPOINT")  # fmt: skip
        with psycopg.connect(primary) as c:
            tracks = c.info.server_version >= 170000  # inactive_since; before 17 the memo times it

        memo: dict = {}
        # The server's own figure just before and just after the job (background WAL, such as
        # autovacuum of the catalogs, may be written in between).
        before = slot_figure(primary, "health_abandoned")
        first = run_at(primary, "slot_retained_warn: 8MB", memo=memo)
        after = slot_figure(primary, "health_abandoned")
        later = run_at(primary, "slot_retained_warn: 8MB\nslot_inactive_after: 0s" if tracks else "slot_retained_warn: 8MB",
                       now=NOW + timedelta(minutes=11), memo=memo)  # fmt: skip
    finally:
        execute(primary, "SELECT pg_drop_replication_slot('health_abandoned')", "DROP TABLE IF EXISTS wal_filler")

    retained = by_metric(first, "replication_slot_retained_bytes")[(("slot", "health_abandoned"),)]
    assert before > 16 * 1024**2 and before * 0.99 <= retained <= after * 1.01 and after <= before * 1.01
    assert by_metric(first, "replication_slot_active") == {(("slot", "health_abandoned"),): 0.0}
    [kept] = findings(first, "replication_slot_wal_retained")
    assert kept["object"] == "health_abandoned" and kept["value"] == retained and kept["wal_status"] in ("reserved", "extended")
    assert "max_slot_wal_keep_size is unlimited" in kept["message"] and "pg_drop_replication_slot('health_abandoned')" in kept["message"]
    assert findings(first, "replication_slot_inactive") == []  # inactive for seconds, not 10 minutes

    [idle] = findings(later, "replication_slot_inactive")
    assert idle["object"] == "health_abandoned" and idle["slot_type"] == "physical" and idle["active"] is False
    assert idle["since_first_seen"] is (not tracks)
    if not tracks:
        assert idle["inactive_seconds"] == 660.0  # from the first run that saw it, by pgupkeep's clock
    assert idle["message"].startswith("physical slot health_abandoned has had no consumer for")
    assert dict(by_metric(later, "health_findings"))[(("kind", "replication_slot_inactive"),)] == 1


def test_a_lost_slot_is_its_own_finding(primary: str):
    execute(primary, "SELECT pg_create_physical_replication_slot('health_lost', true)")
    try:
        execute(primary, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'", "SELECT pg_reload_conf()")
        for _ in range(4):  # past the limit, then checkpoints that remove what the slot needed
            execute(primary, "CREATE TABLE filler AS SELECT repeat('x', 500) FROM generate_series(1, 20000)",
                    "DROP TABLE filler", "SELECT pg_switch_wal()", "CHECKPOINT")  # fmt: skip
        with psycopg.connect(primary) as c:
            status = c.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'health_lost'").fetchone()[0]
        assert status == "lost"
        out = run_at(primary)
    finally:
        execute(primary, "SELECT pg_drop_replication_slot('health_lost')", "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")

    [lost] = findings(out, "replication_slot_lost")
    assert lost["object"] == "health_lost" and lost["wal_status"] == "lost"
    assert "rebuild that standby" in lost["message"]
    assert findings(out, "replication_slot_inactive") == findings(out, "replication_slot_wal_retained") == []


def test_a_logical_slot_holding_catalog_xmin_is_named_as_the_horizon_holder(primary: str):
    execute(primary, "SELECT pg_create_logical_replication_slot('health_logical', 'pgoutput')")
    try:
        burn_xids(primary, 20)
        out = run_at(primary, "xmin_horizon_warn: 10")
        with psycopg.connect(primary) as c:
            age = c.execute("SELECT age(catalog_xmin) FROM pg_replication_slots WHERE slot_name = 'health_logical'").fetchone()[0]
    finally:
        execute(primary, "SELECT pg_drop_replication_slot('health_logical')")

    [held] = findings(out, "xmin_horizon_held")
    assert held["object"] == "health_logical" and held["holder_kind"] == "replication_slot"
    assert held["holds"] == "catalog_xmin" and held["slot_type"] == "logical" and held["database"] == "app"
    assert 20 <= held["value"] <= age and "pg_drop_replication_slot('health_logical')" in held["message"]
    assert by_metric(out, "xmin_horizon_age")[(("holder_kind", "replication_slot"),)] == held["value"]


def test_a_prepared_transaction_is_named_as_the_horizon_holder_and_found_old(primary: str):
    execute(primary, "CREATE TABLE IF NOT EXISTS ledger (id int)")
    with psycopg.connect(primary, autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("INSERT INTO ledger VALUES (1)")
        c.execute("PREPARE TRANSACTION 'health-gid-1'")
    try:
        burn_xids(primary, 20)
        quiet = run_at(primary)  # defaults: 100M transactions, 5 minutes
        out = run_at(primary, "xmin_horizon_warn: 10\nprepared_transaction_after: 0s")
    finally:
        execute(primary, "ROLLBACK PREPARED 'health-gid-1'")

    assert findings(quiet, "xmin_horizon_held") == findings(quiet, "prepared_transaction_old") == []
    [held] = findings(out, "xmin_horizon_held")
    assert held["object"] == "health-gid-1" and held["holder_kind"] == "prepared_transaction" and held["value"] >= 20
    assert "ROLLBACK PREPARED 'health-gid-1'" in held["message"]
    [old] = findings(out, "prepared_transaction_old")
    assert old["object"] == "health-gid-1" and old["owner"] == "postgres" and old["xid_age"] >= 20
    assert by_metric(out, "xmin_horizon_age")[(("holder_kind", "prepared_transaction"),)] == held["value"]


def test_a_session_idle_in_a_snapshot_is_named_as_the_horizon_holder(primary: str):
    with psycopg.connect(primary) as holder:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")  # the snapshot stays while the transaction sits idle
        burn_xids(primary, 20)
        out = run_at(primary, "xmin_horizon_warn: 10")
        pid = holder.info.backend_pid
    [held] = findings(out, "xmin_horizon_held")
    assert (held["object"], held["holder_kind"], held["pid"], held["state"]) == (str(pid), "session", pid, "idle in transaction")
    assert f"pg_terminate_backend({pid})" in held["message"]


def test_a_paused_standby_reports_its_replay_delay(primary: str, replica: str):
    execute(primary, "CREATE TABLE IF NOT EXISTS beat (at timestamptz)", "INSERT INTO beat VALUES (now())")
    with psycopg.connect(replica, autocommit=True) as r:
        wait_for(lambda: r.execute("SELECT count(*) FROM pg_class WHERE relname = 'beat'").fetchone()[0], "beat on the standby")
        caught_up = run_at(replica, "replication_lag_warn: 1s")
        r.execute("SELECT pg_wal_replay_pause()")
        try:
            execute(primary, "INSERT INTO beat VALUES (now())")
            wait_for(lambda: r.execute("SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()").fetchone()[0], "unreplayed WAL")
            time.sleep(1.2)
            out = run_at(replica, "replication_lag_warn: 1s")
            on_primary = run_at(primary)
        finally:
            r.execute("SELECT pg_wal_replay_resume()")

    assert findings(caught_up, "replication_lag") == []
    assert by_metric(caught_up, "standby_replay_delay_seconds") == {(): 0.0}
    [lag] = findings(out, "replication_lag")
    assert lag["replay_paused"] is True and lag["receiving"] is True and lag["unreplayed_bytes"] > 0
    assert lag["value"] > 1 and "pg_wal_replay_resume()" in lag["message"]
    assert by_metric(out, "standby_replay_delay_seconds")[()] == pytest.approx(lag["value"], abs=1e-3)
    lags = by_metric(on_primary, "replication_lag_seconds")
    assert set(lags) == {(("kind", k), ("standby", "health_standby")) for k in ("write", "flush", "replay")}
    assert all(v >= 0 for v in lags.values())
    # Server-wide figures carry the server they were measured on: the standby is not its primary.
    [standby_server] = servers(out, "standby_replay_delay_seconds", "health_findings")
    [primary_server] = servers(on_primary, "replication_lag_seconds", "health_findings")
    assert standby_server != primary_server and f":{conninfo_to_dict(replica)['port']}/" in standby_server
    assert lag["server"] == standby_server


def test_an_integer_column_fed_by_a_bigint_sequence_is_judged_by_the_column(primary: str):
    execute(
        primary,
        "CREATE SEQUENCE order_ids AS bigint",
        "CREATE TABLE orders (id int NOT NULL DEFAULT nextval('order_ids'), note text)",
        f"SELECT setval('order_ids', {int(0.8 * 2147483647)})",
        "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, small_id smallserial)",
        "SELECT setval('events_small_id_seq', 3276)",  # 10% of smallint
        "CREATE SEQUENCE tickets MAXVALUE 1000",
        "SELECT setval('tickets', 900)",
    )
    try:
        out = run_at(primary)
    finally:
        execute(primary, "DROP TABLE orders, events", "DROP SEQUENCE order_ids, tickets")

    ratios = {dict(k)["sequence"]: v for k, v in by_metric(out, "sequence_used_ratio").items()}
    assert ratios["public.order_ids"] == pytest.approx(0.8, abs=1e-6)
    assert ratios["public.events_small_id_seq"] == pytest.approx(0.1, abs=1e-3)
    assert ratios["public.tickets"] == pytest.approx(0.9, abs=1e-2) and ratios["public.events_id_seq"] == 0.0
    got = {f["object"]: f for f in findings(out, "sequence_exhausting")}
    assert set(got) == {"public.order_ids", "public.tickets"}
    order = got["public.order_ids"]
    assert (order["column"], order["column_type"], order["sequence_type"], order["limit"], order["limited_by"]) == (
        "public.orders.id", "integer", "bigint", 2147483647, "column",
    )  # fmt: skip
    assert "ALTER COLUMN ... TYPE bigint on public.orders.id" in order["message"]
    assert got["public.tickets"]["limited_by"] == "sequence" and "ALTER SEQUENCE public.tickets" in got["public.tickets"]["message"]
    assert by_metric(out, "sequences_unreadable") == {(): 0.0}


def test_only_sequences_used_since_the_last_run_are_read_again(primary: str):
    execute(primary, "CREATE SEQUENCE quiet_ids MAXVALUE 1000", "CREATE SEQUENCE busy_ids MAXVALUE 1000",
            "SELECT nextval('quiet_ids'), nextval('busy_ids')")  # fmt: skip

    def fetched() -> dict[str, int]:
        with psycopg.connect(primary) as c:  # a new session: statistics as flushed so far
            return dict(c.execute(
                "SELECT relname::text, pg_stat_get_blocks_fetched(oid) FROM pg_class WHERE relname IN ('quiet_ids', 'busy_ids')"
            ).fetchall())  # fmt: skip

    try:
        start = wait_for(lambda: (f := fetched()) and all(f.values()) and f, "the nextval()s counted")
        memo: dict = {}
        first = run_at(primary, memo=memo)  # reads every value
        read = wait_for(lambda: (f := fetched())["busy_ids"] > start["busy_ids"] and f, "the job's reads counted")
        assert read == {name: n + 1 for name, n in start.items()}  # each value read once, each read one fetch
        execute(primary, "SELECT setval('busy_ids', 900)")
        moved = wait_for(lambda: (f := fetched())["busy_ids"] > read["busy_ids"] and f, "setval counted")
        second = run_at(primary, now=NOW + timedelta(minutes=1), memo=memo)
        after = wait_for(lambda: (f := fetched())["busy_ids"] > moved["busy_ids"] and f, "the second run counted")
    finally:
        execute(primary, "DROP SEQUENCE quiet_ids, busy_ids")

    assert after["quiet_ids"] == read["quiet_ids"]  # not used since the first run: not read again
    ratio = lambda out, seq: {dict(k)["sequence"]: v for k, v in by_metric(out, "sequence_used_ratio").items()}[seq]  # noqa: E731
    assert ratio(first, "public.busy_ids") == 0.0 and ratio(second, "public.busy_ids") == pytest.approx(0.899, abs=1e-3)
    assert ratio(second, "public.quiet_ids") == 0.0  # the value read before
    assert [f["object"] for f in findings(second, "sequence_exhausting")] == ["public.busy_ids"]


def test_a_column_widened_since_the_last_run_is_seen(primary: str):
    from pgupkeep.jobs.health import sequences

    execute(primary, "CREATE SEQUENCE invoice_ids AS bigint", "CREATE TABLE invoices (id int DEFAULT nextval('invoice_ids'))",
            f"SELECT setval('invoice_ids', {int(0.9 * 2147483647)})")  # fmt: skip

    def changes() -> int:
        with psycopg.connect(primary) as c:  # a new session: statistics as flushed so far
            return c.execute(sequences.STATE_SQL).fetchone()[7]

    try:
        memo: dict = {}
        first = run_at(primary, memo=memo)
        before = changes()
        execute(primary, "ALTER TABLE invoices ALTER COLUMN id TYPE bigint")
        wait_for(lambda: changes() != before, "the DDL counted in the catalogs' statistics")
        second = run_at(primary, now=NOW + timedelta(minutes=1), memo=memo)
    finally:
        execute(primary, "DROP TABLE invoices", "DROP SEQUENCE invoice_ids")

    assert [f["column_type"] for f in findings(first, "sequence_exhausting")] == ["integer"]
    assert findings(second, "sequence_exhausting") == []
    ratio = {dict(k)["sequence"]: v for k, v in by_metric(second, "sequence_used_ratio").items()}["public.invoice_ids"]
    assert ratio == pytest.approx(0.9 * 2147483647 / 9223372036854775807, rel=1e-3)


def test_a_sequence_locked_or_dropped_under_the_read_is_stepped_around(primary: str):
    from pgupkeep.jobs.health import sequences

    execute(primary, "CREATE SEQUENCE altered_ids MAXVALUE 1000", "SELECT setval('altered_ids', 800)",
            "CREATE SEQUENCE dropped_ids")  # fmt: skip
    try:
        memo: dict = {}
        first = run_at(primary, memo=memo)
        with psycopg.connect(primary) as migration:  # ALTER SEQUENCE in a transaction left open
            migration.execute("ALTER SEQUENCE altered_ids MAXVALUE 2000")
            started = time.monotonic()
            second = run_at(primary, now=NOW + timedelta(minutes=1), memo=memo, target="lock_timeout: 20s")
            waited = time.monotonic() - started
        with psycopg.connect(primary, autocommit=True) as c:
            gone = c.execute("SELECT 'dropped_ids'::regclass::oid").fetchone()[0]
            c.execute("DROP SEQUENCE dropped_ids")
            # What a batch meets when a sequence is dropped after the catalog read, and its retry.
            with pytest.raises(sequences.CHANGED_UNDER):
                c.execute(sequences.VALUES_SQL, {"oids": [gone]})
            assert c.execute(sequences.VALUES_CAREFULLY_SQL, {"oids": [gone]}).fetchall() == []
    finally:
        execute(primary, "DROP SEQUENCE IF EXISTS altered_ids, dropped_ids")

    ratio = lambda out: {dict(k)["sequence"]: v for k, v in by_metric(out, "sequence_used_ratio").items()}["public.altered_ids"]  # noqa: E731
    assert ratio(first) == ratio(second) == pytest.approx(0.7998, abs=1e-3)  # the value read before the lock
    assert waited < 10  # never queued behind the migration's lock (lock_timeout is 20s)


def test_sequences_a_role_may_not_read_are_counted_not_guessed(own_server, primary: str):
    execute(primary, "CREATE SEQUENCE secret_ids", "DROP ROLE IF EXISTS health_watcher", "CREATE ROLE health_watcher LOGIN",
            "GRANT pg_monitor TO health_watcher")  # fmt: skip
    try:
        out = run_at(psycopg.conninfo.make_conninfo(primary, user="health_watcher"))
    finally:
        execute(primary, "DROP SEQUENCE secret_ids", "DROP ROLE health_watcher")
    assert by_metric(out, "sequences_unreadable")[()] >= 1
    assert "public.secret_ids" not in {dict(k)["sequence"] for k in by_metric(out, "sequence_used_ratio")}


def test_a_table_past_its_own_freeze_max_age_share_is_found(primary: str):
    execute(primary, "CREATE TABLE old_rows (id int) WITH (autovacuum_freeze_max_age = 100000, autovacuum_enabled = false)",
            "INSERT INTO old_rows VALUES (1)")  # fmt: skip
    try:
        burn_xids(primary, 300)
        out = run_at(primary, "freeze_age_warn: 0.002")
        with psycopg.connect(primary) as c:
            age = c.execute("SELECT age(relfrozenxid) FROM pg_class WHERE oid = 'old_rows'::regclass").fetchone()[0]
    finally:
        execute(primary, "DROP TABLE old_rows")

    [f] = findings(out, "table_freeze_age")  # every other table is judged against 200 million
    assert f["object"] == "public.old_rows" and f["value"] == f["xid_age"] and f["xid_age"] >= 300
    assert f["freeze_max_age"] == 100000 and f["share"] == pytest.approx(f["xid_age"] / 100000)
    assert "VACUUM (FREEZE, VERBOSE) public.old_rows" in f["message"]
    ages = {dict(k)["table"]: v for k, v in by_metric(out, "table_freeze_age").items()}
    assert next(iter(ages)) == "public.old_rows" and ages["public.old_rows"] == pytest.approx(age, abs=5)
    assert len(ages) == 50  # report_top


def test_a_table_over_its_autovacuum_threshold_for_an_hour_is_lagging(primary: str):
    execute(primary, "CREATE TABLE churn (id int) WITH (autovacuum_enabled = false)",
            "INSERT INTO churn SELECT generate_series(1, 1000)", "ANALYZE churn", "DELETE FROM churn WHERE id <= 500")  # fmt: skip
    try:
        def dead() -> bool:
            with psycopg.connect(primary) as c:
                return c.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'churn'").fetchone()[0] >= 500

        wait_for(dead, "dead tuples in the statistics")
        memo: dict = {}
        first = run_at(primary, now=NOW, memo=memo)
        soon = run_at(primary, now=NOW + timedelta(minutes=30), memo=memo)
        later = run_at(primary, now=NOW + timedelta(hours=2), memo=memo)
    finally:
        execute(primary, "DROP TABLE churn")

    assert findings(first, "autovacuum_lagging") == findings(soon, "autovacuum_lagging") == []
    [f] = findings(later, "autovacuum_lagging")
    assert f["object"] == "public.churn" and f["dead_tuples"] >= 500 and f["value"] == 7200.0
    assert f["autovacuum_threshold"] == 250.0 and f["autovacuum_enabled"] is False  # 50 + 0.2 * 1000
    assert "ALTER TABLE public.churn RESET (autovacuum_enabled)" in f["message"]


def test_series_of_a_dropped_slot_vanish_from_metrics(primary: str):
    from prometheus_client import CollectorRegistry

    from pgupkeep.metrics import Metrics
    from pgupkeep.results import JobResult

    metrics = Metrics(CollectorRegistry())

    def record(out: JobOutput) -> set[str]:
        metrics.record(JobResult("t", "health", "success", 0.1, 0.0, samples=tuple(out.samples)))
        return {
            s.labels["slot"]
            for family in metrics.registry.collect() if family.name == "pgupkeep_replication_slot_active"
            for s in family.samples
        }  # fmt: skip

    execute(primary, "SELECT pg_create_physical_replication_slot('health_gone')")
    try:
        assert record(run_at(primary)) == {"health_gone"}
    finally:
        execute(primary, "SELECT pg_drop_replication_slot('health_gone')")
    assert record(run_at(primary)) == set()


# --------------------------------------------------------------------------- pure judgements


def slot_row(**kw) -> dict:
    row = {
        "slot_name": "s1", "slot_type": "physical", "database": None, "temporary": False, "active": False,
        "wal_status": "reserved", "safe_wal_size": None, "retained_bytes": 1024.0, "knows_inactive_since": False,
        "inactive_seconds": None, "conflicting": False, "invalidation_reason": None, "synced": False,
        "max_slot_wal_keep_size": "-1",
    }  # fmt: skip
    return {**row, **kw}


def test_before_17_a_slot_is_timed_from_when_pgupkeep_first_saw_it_inactive():
    from pgupkeep.jobs.health import replication
    from pgupkeep.policy_model import HealthSection

    section, memo = HealthSection(), {}
    server = {"in_recovery": False}

    def judge(now: datetime, **kw) -> list[str]:
        rep = replication.Replication(server=server, slots=[slot_row(**kw)])
        return [f.kind for f in replication.judge(rep, section, now, memo).findings]

    assert judge(NOW) == []
    assert judge(NOW + timedelta(minutes=9)) == []
    assert judge(NOW + timedelta(minutes=10)) == ["replication_slot_inactive"]
    assert judge(NOW + timedelta(minutes=11), active=True) == []  # consumed again: the clock restarts
    assert judge(NOW + timedelta(minutes=12)) == []
    assert memo == {"slot_inactive_since": {"s1": NOW + timedelta(minutes=12)}}
    assert judge(NOW, wal_status="unreserved", safe_wal_size=-5.0) == ["replication_slot_wal_retained"]
    assert judge(NOW + timedelta(hours=1), synced=True) == []  # a standby's copy of its primary's slot


def test_standbys_sharing_a_name_are_told_apart_by_address():
    from pgupkeep.jobs.health.replication import standby_names

    rows = [{"application_name": "walreceiver", "client_addr": "10.0.0.1"},
            {"application_name": "walreceiver", "client_addr": None}, {"application_name": "eu", "client_addr": "10.0.0.3"}]  # fmt: skip
    assert standby_names(rows) == ["walreceiver@10.0.0.1", "walreceiver@local", "eu"]


def seq_row(**kw) -> dict:
    row = {"sequence": "public.s", "type": "bigint", "start": 1, "increment": 1, "min": 1, "max": 9223372036854775807,
           "cycle": False, "column_name": None, "column_type": None, "column_max": None, "column_min": None}  # fmt: skip
    return {**row, **kw}


def test_sequence_use_counts_from_its_start_to_the_first_limit_it_meets():
    from pgupkeep.jobs.health.sequences import usage

    col = {"column_name": "public.t.id", "column_type": "integer", "column_max": 2147483647, "column_min": -2147483648}
    fed = usage(seq_row(**col), 1073741824)
    assert (fed.limit, fed.limited_by, fed.column, round(fed.ratio, 6), fed.left) == (2147483647, "column", "public.t.id", 0.5, 1073741823)
    # A numeric column does not limit it: its own MAXVALUE does.
    own = usage(seq_row(max=1000, column_name="public.u.id", column_type="numeric"), 900)
    assert (own.limit, own.limited_by, own.column, round(own.ratio, 3)) == (1000, "sequence", "public.u.id", 0.9)
    # Descending from -1 towards an integer column's minimum; never called yet: nothing used.
    down = seq_row(start=-1, increment=-1, min=-9223372036854775808, max=-1, **col)
    assert usage(down, -1610612737).ratio == pytest.approx(0.75) and usage(down, None).ratio == 0.0
    # Started past the column's end: exhausted before its first value.
    assert usage(seq_row(start=3_000_000_000, **col), None).ratio == 1.0


def test_per_object_findings_are_bounded_and_counted_in_full():
    from pgupkeep.jobs.health.common import bounded
    from pgupkeep.results import Finding

    many = [Finding("table_freeze_age", f"public.t{i}", i) for i in range(7)]
    kept = bounded(many, 3)
    assert [f.object for f in kept] == ["public.t0", "public.t1", "public.t2"]
    assert {f.detail["over_threshold"] for f in kept} == {7}
    counts = health.finding_counts(kept)
    assert counts["table_freeze_age"] == 7 and set(counts) == set(health.FINDING_KINDS)
