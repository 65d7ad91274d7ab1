"""Retirement survives kill -9. A real `pgupkeep once` process is killed at each point of a
retirement (after the mark, after DETACH ... CONCURRENTLY, in its wait for older snapshots, after
FINALIZE, after DROP), then a normal run finishes what it left: nothing is orphaned, nothing
attached is lost, and `retirement_finished` says what was finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from partition_helpers import run_job, samples

# Runs the real CLI, but kills itself (SIGKILL, as kill -9 does) when a retirement of the given
# relation reaches the given point, the moment that point's statement has committed.
KILLED_AT = """
import os, signal, sys
from pgupkeep.jobs.partitions import ddl
def reached(relation, point):
    if (relation, point) == (sys.argv[1], sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
ddl.reached = reached
from pgupkeep.cli import main
sys.exit(main(sys.argv[3:]))
"""
OLD, KEPT = range(4), range(4, 8)  # p0..p3 are past retention; p4 is recent, p6 current, p7 next


@pytest.fixture
def database(fresh_database: str) -> str:
    return fresh_database


def month_start(offset: int) -> datetime:
    now = datetime.now(UTC)
    index = now.year * 12 + now.month - 1 + offset
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def history(conn: psycopg.Connection, name: str) -> None:
    """Eight monthly partitions around today (by the real clock, as `once` reads it), a row each."""
    conn.execute(f"CREATE TABLE {name} (id bigint, k timestamptz NOT NULL) PARTITION BY RANGE (k)")
    for i in range(8):
        lo, hi = month_start(i - 6), month_start(i - 5)
        conn.execute(f"CREATE TABLE {name}_p{i} PARTITION OF {name} FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')")
        conn.execute(f"INSERT INTO {name} VALUES (%s, %s)", (i, lo))


def policy(tmp_path: Path, name: str, action: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        'version: 1\ndaemon:\n  log_format: json\ntargets:\n  - name: t\n    dsn: "${DSN}"\n    lock_timeout: 30s\n'
        f"    partitions:\n      tables:\n        - table: public.{name}\n          interval: monthly\n"
        f"          premake: 1\n          retention: 2 months\n          retention_action: {action}\n"
    )
    return path


def once(config: Path, dsn: str, killed_at: tuple[str, str] | None = None) -> subprocess.Popen[str]:
    head = [sys.executable, "-c", KILLED_AT, *killed_at] if killed_at else [sys.executable, "-m", "pgupkeep"]
    return subprocess.Popen([*head, "once", "--config", str(config), "--job", "partitions", "--json"],
                            env={**os.environ, "DSN": dsn},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(config: Path, dsn: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A normal run after the crash: its result and its log events."""
    proc = once(config, dsn)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (0, 1), stderr
    (result,) = [json.loads(line) for line in stdout.splitlines()]
    return result, [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def wait_sessions_gone(conn: psycopg.Connection) -> None:
    """The killed process's sessions (its lease among them) end on the server."""
    deadline = time.monotonic() + 20
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgupkeep' AND datname = current_database()"
    while conn.execute(query).fetchone()[0]:
        assert time.monotonic() < deadline, "the killed run's sessions did not end"
        time.sleep(0.1)


def state(conn: psycopg.Connection, name: str) -> dict[str, str]:
    """Each of the eight tables: attached, pending, detached (a plain table) or gone, with its mark."""
    out = {}
    for i in range(8):
        row = conn.execute(
            """SELECT c.relispartition, i.inhdetachpending, split_part(obj_description(c.oid, 'pg_class'), E'\n', 1)
               FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid WHERE c.oid = to_regclass(%s)""",
            (f"{name}_p{i}",),
        ).fetchone()
        if row is None:
            out[f"p{i}"] = "gone"
            continue
        where = "detached" if not row[0] else ("pending" if row[1] else "attached")
        out[f"p{i}"] = where + (f" {row[2]}" if row[2] else "")
    return out


def assert_kept(conn: psycopg.Connection, name: str) -> None:
    """Nothing attached lost: the recent partitions are attached with their rows."""
    rows = conn.execute(f"SELECT tableoid::regclass::text, count(*) FROM {name} GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [(f"{name}_p{i}", 1) for i in KEPT]


def kill_at(conn: psycopg.Connection, config: Path, dsn: str, name: str, point: str) -> None:
    proc = once(config, dsn, (f"public.{name}_p0", point))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr
    wait_sessions_gone(conn)


def kill_in_the_wait(conn: psycopg.Connection, config: Path, dsn: str, name: str) -> None:
    """kill -9 while DETACH ... CONCURRENTLY waits for an older snapshot (its first transaction has
    committed), then end its server session as the server does once it notices the client gone."""
    with psycopg.connect(dsn) as holder:
        holder.execute(f"SELECT count(*) FROM {name}")  # an open transaction with a snapshot
        proc = once(config, dsn)
        deadline, pid = time.monotonic() + 30, None
        while pid is None:
            assert time.monotonic() < deadline and proc.poll() is None, "the run never waited in DETACH CONCURRENTLY"
            time.sleep(0.05)
            row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgupkeep' AND "
                               "query LIKE '%%DETACH PARTITION%%CONCURRENTLY' AND wait_event_type = 'Lock'").fetchone()
            pid = row[0] if row else None
        proc.kill()
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        holder.rollback()
    wait_sessions_gone(conn)


def mark(name: str, action: str) -> str:
    return f'pgupkeep:retire:{action}:"public"."{name}"'


def finished(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["object"], e["state"], e["retention_action"]) for e in events if e["event"] == "retirement_finished"]


def test_killed_after_the_mark(conn: psycopg.Connection, database: str, tmp_path: Path) -> None:
    history(conn, "ka")
    config = policy(tmp_path, "ka", "drop")
    kill_at(conn, config, database, "ka", "marked")
    assert state(conn, "ka")["p0"] == f"attached {mark('ka', 'drop')}"  # marked, still attached: nothing lost
    result, events = finish(config, database)
    assert (result["outcome"], finished(events)) == ("success", [])  # simply retired again
    assert [(a["action"], a["object"]) for a in result["actions"]] == [("drop_partition", f"public.ka_p{i}") for i in OLD]
    assert set(state(conn, "ka").values()) == {"gone", "attached"}
    assert_kept(conn, "ka")


def test_killed_after_detach_concurrently_committed(conn: psycopg.Connection, database: str, tmp_path: Path) -> None:
    history(conn, "kd")
    config = policy(tmp_path, "kd", "drop")
    kill_at(conn, config, database, "kd", "detached")
    assert state(conn, "kd")["p0"] == f"detached {mark('kd', 'drop')}"  # invisible to the bounds: only the mark finds it
    result, events = finish(config, database)
    assert result["outcome"] == "success"
    assert finished(events) == [("public.kd_p0", "detached", "drop")]
    assert [(a["action"], a["object"]) for a in result["actions"]] == [("finish_retirement", "public.kd_p0")] + [
        ("drop_partition", f"public.kd_p{i}") for i in OLD[1:]]
    assert result["actions"][0]["sql"] == 'DROP TABLE "public"."kd_p0";'
    assert [state(conn, "kd")[f"p{i}"] for i in OLD] == ["gone"] * 4
    assert_kept(conn, "kd")


def test_killed_in_the_wait_of_detach_concurrently(conn: psycopg.Connection, database: str, tmp_path: Path) -> None:
    history(conn, "kw")
    config = policy(tmp_path, "kw", "drop")
    kill_in_the_wait(conn, config, database, "kw")
    assert state(conn, "kw")["p0"] == f"pending {mark('kw', 'drop')}"  # half detached
    result, events = finish(config, database)
    assert result["outcome"] == "success"
    assert finished(events) == [("public.kw_p0", "pending", "drop")]
    assert result["actions"][0]["sql"] == ('ALTER TABLE "public"."kw" DETACH PARTITION "public"."kw_p0" FINALIZE;\n'
                                           'DROP TABLE "public"."kw_p0";')
    assert [state(conn, "kw")[f"p{i}"] for i in OLD] == ["gone"] * 4
    assert_kept(conn, "kw")


def test_killed_after_finalize_of_a_pending_detach(conn: psycopg.Connection, database: str, tmp_path: Path) -> None:
    history(conn, "kf")
    config = policy(tmp_path, "kf", "drop")
    kill_in_the_wait(conn, config, database, "kf")
    kill_at(conn, config, database, "kf", "finalized")  # the run that finishes it is killed too
    assert state(conn, "kf")["p0"] == f"detached {mark('kf', 'drop')}"
    result, events = finish(config, database)
    assert (result["outcome"], finished(events)) == ("success", [("public.kf_p0", "detached", "drop")])
    assert [state(conn, "kf")[f"p{i}"] for i in OLD] == ["gone"] * 4
    assert_kept(conn, "kf")


def test_killed_after_the_drop(conn: psycopg.Connection, database: str, tmp_path: Path) -> None:
    history(conn, "kr")
    config = policy(tmp_path, "kr", "drop")
    kill_at(conn, config, database, "kr", "dropped")
    assert [state(conn, "kr")[f"p{i}"] for i in OLD] == ["gone", "attached", "attached", "attached"]
    result, events = finish(config, database)
    assert (result["outcome"], finished(events)) == ("success", [])
    assert [(a["action"], a["object"]) for a in result["actions"]] == [("drop_partition", f"public.kr_p{i}") for i in OLD[1:]]
    assert_kept(conn, "kr")


def test_detach_mode_killed_in_the_wait_keeps_the_table_and_counts_it(conn: psycopg.Connection, database: str,
                                                                      tmp_path: Path) -> None:
    history(conn, "kk")
    config = policy(tmp_path, "kk", "detach")
    kill_in_the_wait(conn, config, database, "kk")
    result, events = finish(config, database)
    assert (result["outcome"], finished(events)) == ("success", [("public.kk_p0", "pending", "detach")])
    assert result["actions"][0]["sql"] == 'ALTER TABLE "public"."kk" DETACH PARTITION "public"."kk_p0" FINALIZE;'
    assert [state(conn, "kk")[f"p{i}"] for i in OLD] == [f"detached {mark('kk', 'detach')}"] * 4
    assert [conn.execute(f"SELECT count(*) FROM kk_p{i}").fetchone()[0] for i in OLD] == [1] * 4  # kept whole
    assert_kept(conn, "kk")
    again, _ = finish(config, database)
    assert (again["outcome"], again["actions"]) == ("success", [])
    tables = config.read_text().split("      tables:\n")[1]
    assert samples(run_job(database, tables, datetime.now(UTC)))[("partitions_detached", "public.kk")] == 4.0
