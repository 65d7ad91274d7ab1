"""Soak: the daemon runs every job each second for ten minutes against a database under pgbench.

Not in the default run. Run it with

    python -m pytest -m soak tests/test_soak.py            # 10 minutes
    PGUPKEEP_SOAK_SECONDS=120 python -m pytest -m soak tests/test_soak.py   # a shorter pass

It asserts no growth of failures, RSS within 10 % of its post-warm-up size, a stable number of
pgupkeep sessions (no leaks), and no run missed beyond the misfire grace.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from daemon_helpers import Daemon, wait_until, write_policy
from pgupkeep.pgserver import LocalServer, start_server

DURATION = float(os.environ.get("PGUPKEEP_SOAK_SECONDS", "600"))
WARMUP = max(20.0, DURATION * 0.1)
JOBS = ("partitions", "materialized_views", "long_running_queries", "bloat", "health")

pytestmark = pytest.mark.soak


@pytest.fixture
def loaded_server() -> Iterator[LocalServer]:
    server = start_server()
    try:
        yield server
    finally:
        server.remove()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _sessions(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgupkeep'").fetchone()[0]


def _counter(d: Daemon, outcome: str) -> float:
    m = d.metrics()
    return sum(v for (name, labels), v in m.items() if name == "pgupkeep_job_runs_total" and ("outcome", outcome) in labels)


def test_soak_under_pgbench(loaded_server: LocalServer, tmp_path: Path) -> None:
    dsn = loaded_server.dsn("postgres")
    pgbench = str(loaded_server.bindir / "pgbench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    conn_args = ["-h", "127.0.0.1", "-p", str(loaded_server.port), "-U", loaded_server.superuser, "postgres"]
    subprocess.run([pgbench, "-i", "-q", "-s", "2", *conn_args], check=True, capture_output=True, env=env)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE events (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at)")
        c.execute(
            "CREATE MATERIALIZED VIEW branch_totals AS "
            "SELECT bid, sum(abalance) AS total, count(*) AS n FROM pgbench_accounts GROUP BY bid"
        )
        c.execute("CREATE UNIQUE INDEX ON branch_totals (bid)")
    every = {"schedule": "every 1s"}
    config = write_policy(
        tmp_path / "p.yaml",
        [
            {
                "name": "bench",
                "dsn": dsn,
                "partitions": {**every, "tables": [{"table": "public.events", "interval": "daily", "premake": 2}]},
                "materialized_views": {**every, "views": [{"view": "public.branch_totals"}]},
                "long_running_queries": {**every, "warn_after": "30s", "dry_run": True, "cancel_after": "60s"},
                "bloat": {**every, "min_table_size": "0B"},
                "health": every,
            }
        ],
        max_parallel_jobs=4,
    )
    load = subprocess.Popen(
        [pgbench, "-n", "-c", "4", "-j", "2", "-T", str(int(DURATION + WARMUP + 30)), "-R", "200", *conn_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        with Daemon(config) as d:
            d.start()
            for job in JOBS:
                d.wait_event("job_finished", target="bench", job=job, outcome="success", timeout=60)
            time.sleep(WARMUP)
            pid = d.proc.pid
            base_rss, base_failures = _rss_kib(pid), _counter(d, "failure")
            base_success = _counter(d, "success")
            sessions = []
            deadline = time.monotonic() + DURATION
            while time.monotonic() < deadline:
                time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
                sessions.append(_sessions(dsn))
                assert d.running, d.output()
            end_rss, end_failures = _rss_kib(pid), _counter(d, "failure")
            ran = _counter(d, "success") - base_success
            assert d.stop(timeout=60) == 0
    finally:
        load.terminate()
        load.wait(30)

    assert end_rss <= base_rss * 1.10, (base_rss, end_rss)
    # One lease plus at most one session per parallel job (a refresh adds its own): never growing.
    assert max(sessions) <= 1 + 2 * 4, sessions
    assert not d.find("job_missed"), d.find("job_missed")[:5]
    # Every job once a second, less the runs skipped while a slow one overran.
    overruns = len(d.find("job_skipped"))
    assert ran + overruns >= 0.8 * len(JOBS) * DURATION, (ran, overruns)
    wait_until(lambda: _sessions(dsn) == 0, 10, "pgupkeep's sessions to close after stop")
    failures = [(e["job"], e.get("error")) for e in d.find("job_finished") if e["outcome"] == "failure"]
    assert end_failures == base_failures, failures[-5:]
