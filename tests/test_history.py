"""The run history (`daemon.history`): one row per job run of every kind, in a table pgupkeep
creates; never blocks or fails a job; survives its database being down; keeps its own retention."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from structlog.testing import capture_logs

from daemon_helpers import REPO, Daemon, wait_until, write_policy
from pgupkeep.history import History
from pgupkeep.pgserver import LocalServer, free_port
from pgupkeep.policy import HistoryPolicy
from pgupkeep.results import Action, Finding, JobResult

COLUMNS = "target, job, item, outcome, reason, started_at, duration_seconds, actions, findings, error, replica"


def result(n: int = 0, **kw: object) -> JobResult:
    base: dict = {
        "target": "shop", "job": "sql", "outcome": "success", "duration_seconds": 0.25, "started_at": time.time(),
        "item": f"purge_{n}", "actions": (Action("run_sql", f"purge_{n}", "DELETE FROM t", True, {"rows": n}),),
        "findings": (Finding("lock_timeout", f"purge_{n}", 1, "waited", {"blocking_pids": [42]}),),
    }  # fmt: skip
    base.update(kw)
    return JobResult(**base)


class Calls:
    """The counters' callbacks, as a tally of (reason -> count)."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    def failure(self, reason: str, n: int) -> None:
        self.failures[reason] += n

    def drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += n


def history(dsn: str, calls: Calls, **kw: object) -> History:
    return History(HistoryPolicy(dsn=dsn, **kw), calls.failure, calls.drop)


def rows(dsn: str, table: str = "pgupkeep.job_runs") -> list[tuple]:
    with psycopg.connect(dsn) as c:
        return c.execute(f"SELECT {COLUMNS} FROM {table} ORDER BY id").fetchall()


@pytest.fixture
def history_db(pg_server) -> Iterator[str]:
    name = pg_server.create_database("history")
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


# --------------------------------------------------------------------------- the sink alone


def test_one_row_per_run_in_a_table_it_creates(history_db: str) -> None:
    calls = Calls()
    results = [result(n) for n in range(3)] + [result(9, job="health", item=None, outcome="failure", error="boom", actions=(), findings=())]
    with capture_logs() as logs:
        h = history(history_db, calls).start()
        for r in results:
            h.record(r)
        h.record(result(7, applied=False))  # `plan`: nothing happened
        h.record(result(8, outcome="skipped", reason="not_leader"))  # the leader writes its own runs
        h.close(timeout=10)
    got = rows(history_db)
    assert [(t, j, i, o, reason, err) for t, j, i, o, reason, _, _, _, _, err, _ in got] == [
        ("shop", "sql", "purge_0", "success", None, None),
        ("shop", "sql", "purge_1", "success", None, None),
        ("shop", "sql", "purge_2", "success", None, None),
        ("shop", "health", None, "failure", None, "boom"),
    ]
    first = got[0]
    assert abs(first[5].timestamp() - results[0].started_at) < 1e-3 and first[6] == 0.25
    assert first[7] == [{"action": "run_sql", "object": "purge_0", "sql": "DELETE FROM t", "applied": True, "rows": 0}]
    assert first[8] == [{"kind": "lock_timeout", "object": "purge_0", "value": 1, "message": "waited", "blocking_pids": [42]}]
    assert first[10].endswith(f":{os.getpid()}")
    assert calls.failures == Counter() and calls.dropped == Counter()
    assert [e["event"] for e in logs] == ["history_table_created"]
    with psycopg.connect(history_db) as c:
        assert c.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'job_runs' AND indexname LIKE '%started_at%'").fetchone()


def test_recording_never_blocks_and_a_full_queue_drops_and_counts() -> None:
    calls = Calls()
    # Nothing listens on that port: the writer keeps failing to connect, and the queue fills.
    h = History(HistoryPolicy(dsn=f"host=127.0.0.1 port={free_port()} dbname=x connect_timeout=2"), calls.failure, calls.drop, queue_size=5)
    with capture_logs() as logs:
        h.start()
        slowest = 0.0
        for n in range(50):
            t0 = time.perf_counter()
            h.record(result(n))
            slowest = max(slowest, time.perf_counter() - t0)
        wait_until(lambda: calls.failures["unavailable"] >= 2, 15, "a second connection attempt")
        h.close(timeout=0.5)
    assert slowest < 0.01, slowest
    # The writer holds one batch besides the queue: 44 or 45 are dropped as the queue is full,
    # the rest when the daemon stops with the database still out of reach.
    assert calls.dropped["queue_full"] + calls.dropped["shutdown"] == 50 and calls.dropped["queue_full"] >= 44
    failed = [e for e in logs if e["event"] == "history_write_failed"]
    assert len(failed) == 1 and failed[0]["reason"] == "unavailable" and failed[0]["log_level"] == "warning"


def test_rows_the_database_refuses_are_dropped_and_counted_once_per_outage(history_db: str) -> None:
    with psycopg.connect(history_db, autocommit=True) as c:
        c.execute("CREATE SCHEMA pgupkeep")
        c.execute("CREATE TABLE pgupkeep.job_runs (id int)")  # someone else's table of that name
    calls = Calls()
    with capture_logs() as logs:
        h = history(history_db, calls).start()
        h.record(result(1))
        wait_until(lambda: calls.dropped["rejected"] == 1, 10, "the refused row to be counted")
        h.record(result(2))
        wait_until(lambda: calls.dropped["rejected"] == 2, 15, "the second refused row to be counted")
        h.close()
    assert calls.failures["rejected"] == 2
    failed = [e for e in logs if e["event"] == "history_write_failed"]
    assert len(failed) == 1 and 'column "target" of relation "job_runs" does not exist' in failed[0]["error"]


def test_old_rows_go_by_the_historys_own_retention(history_db: str) -> None:
    calls = Calls()
    h = history(history_db, calls, retention="30 days").start()
    h.record(result(1))
    h.close(timeout=10)
    with psycopg.connect(history_db, autocommit=True) as c:
        c.execute(
            "INSERT INTO pgupkeep.job_runs (target, job, outcome, started_at, duration_seconds) "
            "SELECT 'shop', 'health', 'success', now() - interval '40 days' + g * interval '1 second', 0 FROM generate_series(1, 25000) g"
        )
        c.execute(
            "INSERT INTO pgupkeep.job_runs (target, job, outcome, started_at, duration_seconds) "
            "VALUES ('shop', 'health', 'success', now() - interval '29 days', 0)"
        )
    with capture_logs() as logs:
        h = history(history_db, calls, retention="30 days").start()  # purges once connected, then hourly
        wait_until(lambda: [e for e in logs if e["event"] == "history_purged"], 20, "the purge")
        h.close()
    with psycopg.connect(history_db) as c:
        assert c.execute("SELECT count(*) FROM pgupkeep.job_runs").fetchone() == (2,)
    assert [e["rows"] for e in logs if e["event"] == "history_purged"] == [25000]


def test_a_role_without_create_writes_to_a_table_made_for_it(history_db: str, pg_server) -> None:
    calls = Calls()
    made = history(history_db, calls).start()  # by a role that may create it
    made.record(result(0))
    made.close(timeout=10)
    with psycopg.connect(history_db, autocommit=True) as c:
        c.execute("DROP ROLE IF EXISTS history_writer")
        c.execute("CREATE ROLE history_writer LOGIN")
        dbname = c.info.dbname
        c.execute(f"REVOKE CREATE ON DATABASE {dbname} FROM PUBLIC")
        c.execute("GRANT USAGE ON SCHEMA pgupkeep TO history_writer")
        c.execute("GRANT SELECT, INSERT, DELETE ON pgupkeep.job_runs TO history_writer")
    try:
        dsn = history_db.replace("user=postgres", "user=history_writer")
        h = history(dsn, calls).start()
        h.record(result(5))
        h.close(timeout=10)
        assert [r[2] for r in rows(history_db)] == ["purge_0", "purge_5"] and calls.failures == Counter()
    finally:
        with psycopg.connect(history_db, autocommit=True) as c:
            c.execute("DROP OWNED BY history_writer")
            c.execute("DROP ROLE history_writer")


# --------------------------------------------------------------------------- in the daemon


def _runs(d: Daemon) -> Counter[tuple]:
    return Counter((e["target"], e["job"], e.get("item"), e["outcome"]) for e in d.find("job_finished"))


def test_the_daemon_writes_one_row_per_run_of_every_kind(fresh_database: str, history_db: str, tmp_path: Path) -> None:
    target = {
        "name": "shop",
        "dsn": fresh_database,
        "sql": {"jobs": [{"name": "tick", "schedule": "every 1s", "sql": "SELECT 1", "writes": False}]},
        "long_running_queries": {"schedule": "every 1s"},
        "health": {"schedule": "every 1m"},
    }
    config = write_policy(tmp_path / "p.yaml", [target], history={"dsn": history_db})
    with Daemon(config) as d:
        d.start()
        wait_until(lambda: len(d.find("job_finished", job="sql")) >= 3, 30, "three runs of the statement")
        assert d.stop() == 0
    runs = _runs(d)
    assert {job for _, job, _, _ in runs} == {"sql", "long_running_queries", "health"}
    got = rows(history_db)
    assert Counter((t, j, i, o) for t, j, i, o, *_ in got) == runs
    [tick] = [r for r in got if r[1] == "sql"][:1]
    assert tick[7][0]["action"] == "run_sql" and tick[7][0]["name"] == "tick" and tick[7][0]["rows"] == 1


def _rows_if_any(dsn: str) -> list[tuple]:
    try:
        return rows(dsn)
    except psycopg.errors.UndefinedTable:  # not created yet
        return []


@pytest.fixture
def history_server() -> Iterator[LocalServer]:
    """A server of its own for the history, to stop and start while the daemon runs."""
    from pgupkeep.pgserver import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.remove()


def test_the_history_survives_its_database_being_down(fresh_database: str, history_server: LocalServer, tmp_path: Path) -> None:
    dsn = history_server.dsn("postgres")
    target = {"name": "shop", "dsn": fresh_database, "sql": {"jobs": [{"name": "tick", "schedule": "every 1s", "sql": "SELECT 1"}]}}
    config = write_policy(tmp_path / "p.yaml", [target], history={"dsn": dsn})
    with Daemon(config) as d:
        d.start()
        wait_until(lambda: len(_rows_if_any(dsn)) >= 2, 30, "the first rows")
        history_server.stop()
        down_at = len(d.find("job_finished"))
        failed = d.wait_event("history_write_failed", timeout=30)
        wait_until(lambda: len(d.find("job_finished")) >= down_at + 4, 30, "runs to go on while the history is down")
        assert {e["outcome"] for e in d.find("job_finished")} == {"success"}
        history_server.start()
        resumed = d.wait_event("history_write_resumed", timeout=60)
        failures = d.value("pgupkeep_history_write_failures_total", reason="unavailable")
        assert d.stop() == 0
    assert failed["level"] == "warning" and failed["reason"] == "unavailable" and "error" in failed
    assert len(d.find("history_write_failed")) == 1  # once per outage, not per attempt
    assert resumed["dropped"] == 0
    assert failures is not None and failures >= 1
    # Nothing was lost: the rows of the outage waited in the queue.
    got = rows(dsn)
    assert Counter((t, j, i, o) for t, j, i, o, *_ in got) == _runs(d)


def test_once_writes_its_runs_to_the_history_too(fresh_database: str, history_db: str, tmp_path: Path) -> None:
    target = {"name": "shop", "dsn": fresh_database, "sql": {"jobs": [{"name": "tick", "schedule": "@daily", "sql": "SELECT 1"}]}}
    config = write_policy(tmp_path / "p.yaml", [target], listen="127.0.0.1:0", history={"dsn": history_db})
    for command in ("plan", "once"):  # `plan` changes nothing and writes no row
        done = subprocess.run(
            [sys.executable, "-m", "pgupkeep", command, "--config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    assert [(t, j, i, o) for t, j, i, o, *_ in rows(history_db)] == [("shop", "sql", None, "success")]
