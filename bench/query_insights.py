"""query_insights at scale: 5,000 distinct statements in pg_stat_statements and 10,000 tables.

Measures one job run (first run: snapshot only; steady state: deltas, findings, sizes) and the
series it adds, and beside it the series postgres_exporter exports for pg_stat_statements on the
same server. Run by hand, never by the test suite:

    python bench/query_insights.py [--tables 10000] [--statements 5000] [--runs 5]

The system PostgreSQL 15 at 127.0.0.1:5432 is used only if it already preloads pg_stat_statements
(the script never restarts a shared server); otherwise the script starts a throwaway PostgreSQL 15
from the same binaries with it preloaded, and removes it at the end. Its one database,
`insights_bench`, is dropped at the end either way.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from prometheus_client import CollectorRegistry
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import fmt_s, machine, median, print_header, table, which  # noqa: E402

from pgupkeep import db  # noqa: E402
from pgupkeep.jobs import query_insights  # noqa: E402
from pgupkeep.jobs.base import JobContext  # noqa: E402
from pgupkeep.metrics import Metrics  # noqa: E402
from pgupkeep.pgserver import LocalServer, free_port, start_server  # noqa: E402
from pgupkeep.policy import parse_policy  # noqa: E402
from pgupkeep.results import JobResult  # noqa: E402
from pgupkeep.runner import execute_job  # noqa: E402

DB = "insights_bench"
BINDIR = Path("/usr/lib/postgresql/15/bin")
EXPORTER = "prometheus-postgres-exporter"
# The Debian package (0.11) has no stat_statements collector (upstream added
# --collector.stat_statements in 0.13); its pg_stat_statements series come from the example
# queries.yaml shipped with it. That query uses the pre-13 column names (total_time, ...); here it is
# with PostgreSQL 13+'s names and otherwise as shipped: every entry, 19 series each.
EXPORTER_QUERIES = """
pg_stat_statements:
  query: "SELECT t2.rolname, t3.datname, queryid, calls, total_exec_time / 1000 as total_time_seconds, min_exec_time / 1000 as min_time_seconds, max_exec_time / 1000 as max_time_seconds, mean_exec_time / 1000 as mean_time_seconds, stddev_exec_time / 1000 as stddev_time_seconds, rows, shared_blks_hit, shared_blks_read, shared_blks_dirtied, shared_blks_written, local_blks_hit, local_blks_read, local_blks_dirtied, local_blks_written, temp_blks_read, temp_blks_written, blk_read_time / 1000 as blk_read_time_seconds, blk_write_time / 1000 as blk_write_time_seconds FROM pg_stat_statements t1 JOIN pg_roles t2 ON (t1.userid=t2.oid) JOIN pg_database t3 ON (t1.dbid=t3.oid) WHERE t2.rolname != 'rdsadmin'"
  master: true
  metrics:
    - rolname: {usage: LABEL, description: "Name of user"}
    - datname: {usage: LABEL, description: "Name of database"}
    - queryid: {usage: LABEL, description: "Query ID"}
    - calls: {usage: COUNTER, description: "Number of times executed"}
    - total_time_seconds: {usage: COUNTER, description: "Total time"}
    - min_time_seconds: {usage: GAUGE, description: "Minimum time"}
    - max_time_seconds: {usage: GAUGE, description: "Maximum time"}
    - mean_time_seconds: {usage: GAUGE, description: "Mean time"}
    - stddev_time_seconds: {usage: GAUGE, description: "Stddev of time"}
    - rows: {usage: COUNTER, description: "Rows"}
    - shared_blks_hit: {usage: COUNTER, description: "Shared block hits"}
    - shared_blks_read: {usage: COUNTER, description: "Shared blocks read"}
    - shared_blks_dirtied: {usage: COUNTER, description: "Shared blocks dirtied"}
    - shared_blks_written: {usage: COUNTER, description: "Shared blocks written"}
    - local_blks_hit: {usage: COUNTER, description: "Local block hits"}
    - local_blks_read: {usage: COUNTER, description: "Local blocks read"}
    - local_blks_dirtied: {usage: COUNTER, description: "Local blocks dirtied"}
    - local_blks_written: {usage: COUNTER, description: "Local blocks written"}
    - temp_blks_read: {usage: COUNTER, description: "Temp blocks read"}
    - temp_blks_written: {usage: COUNTER, description: "Temp blocks written"}
    - blk_read_time_seconds: {usage: COUNTER, description: "Block read time"}
    - blk_write_time_seconds: {usage: COUNTER, description: "Block write time"}
"""
# The upstream collector (0.13+, --collector.stat_statements): 5 series per statement
# (calls_total, seconds_total, rows_total, block_read_seconds_total, block_write_seconds_total), the
# 100 statements with the most cumulative time; with include_query one more, the text as a label.
UPSTREAM_SERIES = (5, 100)
PARTITIONS = 1000


@contextmanager
def server() -> Iterator[str]:
    """The admin DSN of a server with pg_stat_statements preloaded (see the module docstring)."""
    shared = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    try:
        with psycopg.connect(shared, connect_timeout=3) as c:
            preload = c.execute("SHOW shared_preload_libraries").fetchone()[0]
        if "pg_stat_statements" in preload:
            print("server: the system PostgreSQL 15 at 127.0.0.1:5432 (pg_stat_statements preloaded)", flush=True)
            yield shared
            return
    except psycopg.OperationalError:
        pass
    print("server: 127.0.0.1:5432 does not preload pg_stat_statements; a throwaway PostgreSQL 15 with it", flush=True)
    local: LocalServer = start_server(
        BINDIR,
        settings={
            "pg_stat_statements.max": "10000",  # the 5,000 statements and everyone else's, no eviction
            "pg_stat_statements.track_utility": "off",  # 10,000 CREATE TABLEs are not the workload
            "max_locks_per_transaction": "1024",
            "shared_buffers": "256MB",
        },
    )
    try:
        yield local.dsn("postgres")
    finally:
        local.remove()


@contextmanager
def database(admin: str) -> Iterator[str]:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=DB)
    try:
        yield dsn
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))


def build(dsn: str, tables: int) -> None:
    """`tables` relations: one partitioned table of 1,000 partitions, the rest plain tables with a
    foreign key each (nine in ten indexed), some with rows so that sizes differ."""
    plain = tables - PARTITIONS - 2
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        c.execute("CREATE TABLE parents (id int PRIMARY KEY)")
        c.execute("INSERT INTO parents SELECT generate_series(1, 1000)")
        c.execute("CREATE TABLE events (id int NOT NULL, parent_id int REFERENCES parents, v text) PARTITION BY RANGE (id)")
        for start in range(0, PARTITIONS, 100):
            c.execute(
                ";".join(
                    f"CREATE TABLE events_{p:04d} PARTITION OF events FOR VALUES FROM ({p * 1000}) TO ({(p + 1) * 1000})"
                    for p in range(start, start + 100)
                )
            )
        c.execute("INSERT INTO events SELECT g, 1 + g % 1000, md5(g::text) FROM generate_series(0, 999999, 7) g")
        for start in range(0, plain, 200):
            stmts = []
            for i in range(start, min(start + 200, plain)):
                stmts.append(f"CREATE TABLE t{i:05d} (id int PRIMARY KEY, parent_id int REFERENCES parents, v text)")
                if i % 10:
                    stmts.append(f"CREATE INDEX ON t{i:05d} (parent_id)")
            c.execute(";".join(stmts))
        for i in range(0, 200):
            c.execute(f"INSERT INTO t{i:05d} SELECT g, 1 + g % 1000, repeat('x', {10 + i}) FROM generate_series(1, {200 * (i + 1)}) g")
        c.execute("ANALYZE")
        n = c.execute("SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'p') AND relnamespace = 'public'::regnamespace").fetchone()[0]
    print(f"built {n} tables in {time.monotonic() - t0:.0f} s", flush=True)


def workload(dsn: str, statements: int) -> None:
    """`statements` distinct statements, once each; and one N+1-shaped loop and one slow statement."""
    with psycopg.connect(dsn, autocommit=True) as c:
        for i in range(statements):
            c.execute(f"SELECT v FROM t{i:05d} WHERE id = %s", (i,))
        for i in range(7000):
            c.execute("SELECT v FROM t00100 WHERE id = %s", (1 + i % 20000,))
        for _ in range(5):
            c.execute("SELECT pg_sleep(0.12), count(*) FROM events WHERE v LIKE %s", ("%ab%",))


def pgss_entries(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return int(c.execute("SELECT count(*) FROM pg_stat_statements").fetchone()[0])


class Job:
    def __init__(self, dsn: str) -> None:
        policy = parse_policy('version: 1\ntargets:\n  - name: bench\n    dsn: "${DSN}"\n    query_insights: {}\n', environ={"DSN": dsn})
        self.target = policy.targets[0]
        self.zone = policy.daemon.zone
        self.memo: dict = {}
        self.now = datetime(2026, 11, 25, tzinfo=UTC)

    def run(self) -> tuple[float, float, JobResult]:
        """(wall seconds, CPU seconds of the job's server backend and this process, result)."""
        self.now += timedelta(minutes=5)
        with db.connect(self.target) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            ctx = JobContext(target=self.target, section=self.target.query_insights, conn=conn, now=self.now, timezone=self.zone, memo=self.memo)
            t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(backend)
            out = execute_job(query_insights.KIND, ctx)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0 + cpu_seconds(backend) - s0
        result = JobResult(
            "bench", "query_insights", "success", wall, time.time(),
            findings=tuple(out.findings), samples=tuple(out.samples), target_up=True,
        )  # fmt: skip
        return wall, cpu, result


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a local process (the server backend): unlike wall time, it does not
    grow when other work shares the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def series(registry: CollectorRegistry) -> int:
    return sum(len(family.samples) for family in registry.collect())


def exporter_scrape(dsn: str) -> tuple[int, int, float]:
    """(pg_stat_statements series, all series, scrape seconds) of one postgres_exporter scrape."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="insights-exporter-") as tmp:
        queries = Path(tmp) / "queries.yaml"
        queries.write_text(EXPORTER_QUERIES)
        env = dict(
            os.environ,
            DATA_SOURCE_NAME=f"postgresql://{params['user']}@{params['host']}:{params['port']}/{params['dbname']}?sslmode=disable",
        )
        log = open(Path(tmp) / "exporter.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [which(EXPORTER), f"--web.listen-address=127.0.0.1:{port}", f"--extend.query-path={queries}", "--log.level=warn"],
            env=env, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(url, timeout=60).read()  # warm-up: connects, learns the server
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            t0 = time.perf_counter()
            body = urllib.request.urlopen(url, timeout=120).read().decode()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
    lines = [line for line in body.splitlines() if line and not line.startswith("#")]
    pgss = [line for line in lines if line.startswith("pg_stat_statements_")]
    if not pgss:
        raise SystemExit("postgres_exporter exported no pg_stat_statements series: check its log")
    return len(pgss), len(lines), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tables", type=int, default=10_000)
    ap.add_argument("--statements", type=int, default=5_000, help="at most tables - 1,002")
    ap.add_argument("--runs", type=int, default=5, help="steady-state runs (each after one round of the workload)")
    args = ap.parse_args()
    with server() as admin, database(admin) as dsn:
        print_header("query_insights: 5,000 statements, 10,000 tables; series beside postgres_exporter")
        with psycopg.connect(dsn, autocommit=True) as c:
            print("server: " + c.execute("SELECT version()").fetchone()[0].split(" on ")[0])
        build(dsn, args.tables)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT pg_stat_statements_reset()")
        workload(dsn, args.statements)
        job = Job(dsn)
        metrics = Metrics(CollectorRegistry())
        before = series(metrics.registry)
        load = os.getloadavg()[0]
        first, first_cpu, result = job.run()
        metrics.record(result)
        steady: list[float] = []
        steady_cpu: list[float] = []
        kinds: dict[str, int] = {}
        for _ in range(args.runs):
            workload(dsn, args.statements)
            load = max(load, os.getloadavg()[0])
            wall, cpu, result = job.run()
            steady.append(wall)
            steady_cpu.append(cpu)
            metrics.record(result)
            kinds = {}
            for f in result.findings:
                kinds[f.kind] = kinds.get(f.kind, 0) + 1
        added = series(metrics.registry) - before
        ours = len(result.samples)  # each sample is one series (the two counters included)
        entries = pgss_entries(dsn)
        pgss_series, exporter_all, exporter_wall = exporter_scrape(dsn)

    print(f"\npg_stat_statements entries: {entries} (server-wide); findings of the last run: {kinds}")
    print(f"steady-state walls: {[round(x, 3) for x in steady]}, CPU: {[round(x, 3) for x in steady_cpu]}")
    print(f"highest 1-minute load average seen: {load:.1f} on {os.cpu_count()} CPUs\n")
    print(table(
        ["measure", "pgupkeep query_insights", "target"],
        [
            ["first run (snapshot only): wall", fmt_s(first), "< 1 s"],
            ["first run: CPU (server backend + pgupkeep)", fmt_s(first_cpu), ""],
            [f"steady-state run, median of {args.runs}: wall", fmt_s(median(steady)), "< 1 s"],
            [f"steady-state run, median of {args.runs}: CPU (server backend + pgupkeep)", fmt_s(median(steady_cpu)), ""],
            ["series of the job's own families", ours, "< 200"],
            ["series added in all (incl. job_runs, duration histogram)", added, "< 200"],
        ],
    ))  # fmt: skip
    per, top = UPSTREAM_SERIES
    print()
    print(table(
        ["peer", "pg_stat_statements series", "scrape"],
        [
            ["postgres_exporter 0.11 (Debian), example queries.yaml", pgss_series, fmt_s(exporter_wall)],
            [f"postgres_exporter 0.13+ --collector.stat_statements (not run: {per} per statement, top {top})", per * min(top, entries), "n/a"],
        ],
    ))  # fmt: skip
    print(f"\n(exporter total series in that scrape: {exporter_all}; machine: {machine()})")


if __name__ == "__main__":
    main()
