"""Fault injection: the world breaks under a running daemon and nothing is lost or left half-done.

The server goes away and comes back, pgupkeep's session is killed mid-DDL, a refresh hits its
timeout, the policy file turns to garbage, the disk "fills", and a fleet has dead members.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from daemon_helpers import Daemon, policy_text, wait_until, write_policy
from pgupkeep.pgserver import LocalServer, free_port, start_server
from pgupkeep.policy import parse_policy
from pgupkeep.runner import Runner

EVERY_SECOND = {"schedule": "every 1s"}


@pytest.fixture(scope="module")
def private_server() -> Iterator[LocalServer]:
    """A server of our own to stop and restart, so the session's server is never disturbed."""
    server = start_server()
    try:
        yield server
    finally:
        server.remove()


def _pgupkeep_sessions(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
            "WHERE application_name = 'pgupkeep' AND datname = current_database()"
        ).fetchall()


def test_server_stopped_and_restarted_under_the_running_daemon(private_server: LocalServer, tmp_path: Path) -> None:
    dsn = private_server.dsn("postgres")
    config = write_policy(tmp_path / "p.yaml", [{"name": "db", "dsn": dsn, "health": EVERY_SECOND}])
    with Daemon(config) as d:
        d.start()
        d.wait_event("job_finished", target="db", outcome="success")
        wait_until(lambda: d.value("pgupkeep_target_up", target="db") == 1, 10, "target_up 1")
        pid = d.proc.pid

        private_server.stop()
        try:
            wait_until(lambda: d.value("pgupkeep_target_up", target="db") == 0, 30, "target_up 0")
            mark = d.mark()
            d.wait_event("target_unreachable", after=mark, target="db")
            d.wait_event("job_finished", after=mark, target="db", outcome="failure")
            assert d.running and d.get("/healthz")[0] == 200 and d.get("/readyz")[0] == 200
        finally:
            private_server.start()  # same port: LocalServer keeps it
        mark = d.mark()
        wait_until(lambda: d.value("pgupkeep_target_up", target="db") == 1, 30, "target_up 1 again")
        d.wait_event("job_finished", after=mark, target="db", outcome="success")
        wait_until(lambda: d.value("pgupkeep_target_leader", target="db") == 1, 10, "the lease again")
        assert d.proc.pid == pid and d.running
        # The dead lease session was replaced, not piled up: one lease, at most one job session.
        assert 1 <= len(_pgupkeep_sessions(dsn)) <= 2
        assert d.stop() == 0
    assert private_server.is_running()


def _orders(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE orders (id bigint, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at)")


def _layout(dsn: str) -> tuple[list[str], list[str]]:
    """(attached partitions of orders, other plain tables in public)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        attached = [r[0] for r in c.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'public.orders'::regclass ORDER BY 1"
        )]  # fmt: skip
        loose = [r[0] for r in c.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relkind = 'r' AND NOT relispartition ORDER BY 1"
        )]  # fmt: skip
    return attached, loose


def test_session_killed_mid_ddl_leaves_nothing_half_made_and_the_next_run_completes(fresh_database: str, tmp_path: Path) -> None:
    _orders(fresh_database)
    section = {"schedule": "every 1s", "tables": [{"table": "public.orders", "interval": "daily", "premake": 2}]}
    config = write_policy(
        tmp_path / "p.yaml",
        [{"name": "t", "dsn": fresh_database, "lock_timeout": "60s", "lock_retries": 0, "partitions": section}],
    )
    with psycopg.connect(fresh_database) as blocker, Daemon(config) as d:
        # SHARE UPDATE EXCLUSIVE on the parent: CREATE TABLE (LIKE ...) goes through, ATTACH waits.
        blocker.execute("LOCK TABLE orders IN SHARE UPDATE EXCLUSIVE MODE")
        d.start()

        def waiting() -> int | None:
            rows = [r for r in _pgupkeep_sessions(fresh_database) if r[2] == "Lock" and "ATTACH PARTITION" in r[3]]
            return rows[0][0] if rows else None

        pid = wait_until(waiting, 30, "pgupkeep's ATTACH to wait on the lock")
        mark = d.mark()
        with psycopg.connect(fresh_database, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        failed = d.wait_event("job_finished", after=mark, target="t", job="partitions")
        assert failed["outcome"] == "failure", failed
        assert "public.orders" in failed["error"], failed
        # The CREATE and the ATTACH were one transaction: the kill rolled both back.
        assert _layout(fresh_database) == ([], [])

        blocker.rollback()
        mark = d.mark()
        done = d.wait_event("job_finished", after=mark, target="t", job="partitions", outcome="success", timeout=30)
        assert done["actions"] == 3
        assert d.stop() == 0
    attached, loose = _layout(fresh_database)
    assert len(attached) == 3 and loose == []
    assert _pgupkeep_sessions(fresh_database) == []


def _slow_view(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE knob (secs float8)")
        c.execute("INSERT INTO knob VALUES (0)")
        c.execute(
            "CREATE FUNCTION slow(secs float8) RETURNS int LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM pg_sleep(secs); RETURN 1; END$$"
        )
        c.execute("CREATE MATERIALIZED VIEW slow_mv AS SELECT slow(secs) AS x, 'old'::text AS tag FROM knob")


def test_statement_timeout_mid_refresh_fails_that_view_and_keeps_its_rows(fresh_database: str) -> None:
    _slow_view(fresh_database)
    policy = parse_policy(
        f"""
version: 1
targets:
  - name: t
    dsn: '{fresh_database}'
    materialized_views:
      views:
        - view: public.slow_mv
          concurrently: never
          timeout: 1s
""",
        file="p.yaml",
    )
    runner = Runner(policy)
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("UPDATE knob SET secs = 5")
        started = time.monotonic()
        res = runner.run("t", "materialized_views")
        assert time.monotonic() - started < 4
        assert res.outcome == "failure", res
        assert [e.object for e in res.errors] == ["public.slow_mv"]
        assert "timeout" in res.errors[0].message and "public.slow_mv" in res.error
        (action,) = res.actions
        assert (action.action, action.applied, action.detail["outcome"]) == ("refresh_materialized_view", False, "failure")
        # Nothing lost: the view still answers with what it held.
        assert c.execute("SELECT x, tag FROM slow_mv").fetchall() == [(1, "old")]
        assert _pgupkeep_sessions(fresh_database) == []

        c.execute("UPDATE knob SET secs = 0")
        assert runner.run("t", "materialized_views").outcome == "success"


def test_policy_file_replaced_by_garbage_mid_run(database: str, tmp_path: Path) -> None:
    config = write_policy(
        tmp_path / "p.yaml", [{"name": "t", "dsn": database, "health": EVERY_SECOND}], reload_on_change=True
    )
    good = config.read_text()
    with Daemon(config) as d:
        d.start()
        d.wait_event("job_finished", target="t", outcome="success")
        for garbage in (b"\x00\xff\xfe{{{: [\n\t- ]]", b"", b"version: 1\ntargets: 7\n"):
            mark = d.mark()
            config.write_bytes(garbage)
            failed = d.wait_event("policy_reload_failed", after=mark, reason="file_changed")
            assert failed["problems"] and all(p.startswith(str(config)) or "p.yaml" in p for p in failed["problems"]), failed
            wait_until(lambda: d.value("pgupkeep_policy_last_reload_successful") == 0, 10, "the reload metric at 0")
            d.wait_event("job_finished", after=d.mark(), target="t", outcome="success")
        assert d.running and d.get("/healthz")[0] == 200

        mark = d.mark()
        config.write_text(good)
        d.wait_event("policy_loaded", after=mark, reason="file_changed")
        wait_until(lambda: d.value("pgupkeep_policy_last_reload_successful") == 1, 10, "the reload metric at 1")
        assert d.stop() == 0


DISK_FULL_TRIGGER = """
CREATE FUNCTION disk_full() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'could not extend file "base/1/2": No space left on device'
    USING ERRCODE = 'disk_full', HINT = 'Check free disk space.';
END$$;
CREATE EVENT TRIGGER disk_full ON ddl_command_start WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION disk_full();
"""


def test_disk_full_is_a_clear_failure_and_loses_nothing(fresh_database: str) -> None:
    _orders(fresh_database)
    today = datetime.now(UTC).date()
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("CREATE TABLE orders_default PARTITION OF orders DEFAULT")
        c.execute("INSERT INTO orders SELECT g, now() - g * interval '1 day' FROM generate_series(1, 100) g")
        c.execute(DISK_FULL_TRIGGER)
    policy = parse_policy(
        f"""
version: 1
targets:
  - name: t
    dsn: '{fresh_database}'
    partitions:
      tables:
        - table: public.orders
          interval: monthly
          premake: 1
          on_default_conflict: move
""",
        file="p.yaml",
    )
    runner = Runner(policy)
    res = runner.run("t", "partitions")
    assert res.outcome == "failure", res
    assert [e.object for e in res.errors] == ["public.orders"]
    assert "No space left on device" in res.error and "public.orders" in res.error
    assert not any(a.applied for a in res.actions)
    attached, loose = _layout(fresh_database)
    assert (attached, loose) == (["orders_default"], [])
    with psycopg.connect(fresh_database, autocommit=True) as c:
        assert c.execute("SELECT count(*), sum(id) FROM orders").fetchone() == (100, 5050)
        c.execute("DROP EVENT TRIGGER disk_full")
    res = runner.run("t", "partitions")
    assert res.outcome == "success", res
    attached, loose = _layout(fresh_database)
    assert f"orders_{today:%Y_%m}" in attached and loose == []
    with psycopg.connect(fresh_database, autocommit=True) as c:
        assert c.execute("SELECT count(*), sum(id) FROM orders").fetchone() == (100, 5050)


@contextlib.contextmanager
def _black_holes(n: int) -> Iterator[list[int]]:
    """Ports that accept TCP connections and never answer: a server hung or behind a dead link."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(512)
            socks.append(s)
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_fifty_targets_of_which_ten_unreachable_the_other_forty_keep_their_schedule(database: str, tmp_path: Path) -> None:
    with _black_holes(5) as holes:
        dead = [f"postgresql://u@127.0.0.1:{free_port()}/x" for _ in range(5)]  # refused at once
        dead += [f"postgresql://u@127.0.0.1:{port}/x" for port in holes]  # hang until connect_timeout
        targets = [{"name": f"good{i:02d}", "dsn": database, "health": {"schedule": "every 5s"}} for i in range(40)]
        targets += [{"name": f"dead{i:02d}", "dsn": dsn, "health": {"schedule": "every 5s"}} for i, dsn in enumerate(dead)]
        config = tmp_path / "p.yaml"
        config.write_text(policy_text(targets))
        with Daemon(config) as d:
            d.start()
            # Warm-up: every target has run once.
            for i in range(40):
                d.wait_event("job_finished", target=f"good{i:02d}", outcome="success", timeout=60)
            mark, window = d.mark(), 15.0
            time.sleep(window)
            ran = d.events[mark:]
            for i in range(40):
                name = f"good{i:02d}"
                runs = [e for e in ran if e.get("event") == "job_finished" and e.get("target") == name]
                assert len(runs) >= window // 5 - 1, (name, len(runs))
                assert all(e["outcome"] == "success" for e in runs), runs
            for i in range(10):
                assert d.value("pgupkeep_target_up", target=f"dead{i:02d}") == 0
            assert not d.find("job_missed")
            assert d.stop() == 0
