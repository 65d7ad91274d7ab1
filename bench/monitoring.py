"""Monitoring, side by side: pgupkeep's full collection cycle (long_running_queries, bloat, health)
and a postgres_exporter 0.11 scrape (Debian's prometheus-postgres-exporter) with its table
collectors on (pg_stat_user_tables and pg_statio_user_tables from the package's example
queries.yaml), on the same database, in one run. Then pgupkeep's /metrics scrape latency from a
real daemon with 1,000 tables reported.

    python bench/monitoring.py [--tables 1000 10000] [--runs 7] [--scrapes 1000] [--own-server BINDIR]

pg_stat_statements must be preloaded for the database-time column: the script does it with
ALTER SYSTEM + restart and restores the old setting at the end (--no-restore keeps it). With
--own-server it starts a throwaway server from BINDIR with pg_stat_statements preloaded instead,
and restarts nothing that others may be using.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import benchlib
import psycopg
import yaml
from benchlib import (
    PYTHON,
    REPO,
    connect,
    dsn,
    ensure_packages,
    ensure_server,
    fmt_s,
    median,
    percentile,
    print_header,
    ratio,
    scratch_database,
    server_settings,
    table,
    which,
)
from prometheus_client import generate_latest

from pgupkeep.metrics import Metrics
from pgupkeep.policy import parse_policy
from pgupkeep.runner import Runner

EXPORTER = "prometheus-postgres-exporter"
EXAMPLE_QUERIES = Path("/usr/share/doc/prometheus-postgres-exporter/examples/queries.yaml")
TABLE_COLLECTORS = ("pg_stat_user_tables", "pg_statio_user_tables")
EXPORTER_PORT = 19187
DAEMON_PORT = 19188
JOBS = ("long_running_queries", "bloat", "health")
CHUNK = 500


def setup(db: str, n: int) -> None:
    """n small tables (primary key, toast), 20 rows each, 5 of them updated (dead tuples)."""
    t0 = time.perf_counter()
    with connect(db) as c:
        if PGSS:
            c.execute("CREATE EXTENSION pg_stat_statements")
        for lo in range(1, n + 1, CHUNK):
            hi = min(lo + CHUNK, n + 1) - 1
            c.execute(
                "DO $$ BEGIN FOR i IN " + str(lo) + ".." + str(hi) + " LOOP "
                "EXECUTE format('CREATE TABLE public.m%s (id int PRIMARY KEY, payload text)', lpad(i::text, 5, '0')); "
                "EXECUTE format('INSERT INTO public.m%s SELECT g, md5(g::text) FROM generate_series(1, 20) g', lpad(i::text, 5, '0')); "
                "END LOOP; END $$"
            )
        c.execute("ANALYZE")
        for lo in range(1, n + 1, CHUNK):
            hi = min(lo + CHUNK, n + 1) - 1
            c.execute(
                "DO $$ BEGIN FOR i IN " + str(lo) + ".." + str(hi) + " LOOP "
                "EXECUTE format('UPDATE public.m%s SET payload = payload || ''!'' WHERE id <= 5', lpad(i::text, 5, '0')); "
                "END LOOP; END $$"
            )
    print(f"setup {n} tables: {time.perf_counter() - t0:.1f} s", flush=True)


@contextlib.contextmanager
def background_sessions(db: str) -> Iterator[None]:
    """A long-running query and an idle-in-transaction session, so long_running_queries has work."""
    long = connect(db, application_name="bench-long")
    idle = psycopg.connect(dsn(db, application_name="bench-idle"))
    proc = subprocess.Popen(["psql", dsn(db, application_name="bench-long"), "-qc", "SELECT pg_sleep(3600)"])
    idle.execute("SELECT 1")  # opens the transaction and leaves it idle
    time.sleep(1.5)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait()
        idle.close()
        long.close()


def policy_text(db: str, report_top: int, listen: str = "127.0.0.1:0", min_table_size: str = "10MB") -> str:
    # The collection cycle runs the bloat defaults (tables under 10MB are read but not judged: all
    # of these are); the scrape-latency daemon judges every table, so 1,000 get series.
    return f"""
version: 1
daemon: {{listen: "{listen}", log_format: json, log_level: warning}}
targets:
  - name: bench
    dsn: "{dsn(db)}"
    long_running_queries: {{schedule: "every 30s", warn_after: 1s, idle_in_transaction_after: 1s}}
    bloat: {{schedule: "every 1h", min_table_size: {min_table_size}, report_top: {report_top}}}
    health: {{schedule: "every 1m"}}
"""


# --------------------------------------------------------------------------- database time


def db_oid(db: str) -> int:
    with connect() as c:
        return c.execute("SELECT oid FROM pg_database WHERE datname = %s", (db,)).fetchone()[0]


PGSS = True  # pg_stat_statements preloaded (off with --no-pgss: the database-time row reads n/a)


def pgss_reset(db: str) -> None:
    if not PGSS:
        return
    with connect(db) as c:
        c.execute("SELECT pg_stat_statements_reset()")


def pgss_ms(db: str, oid: int) -> tuple[float, int]:
    """Server time (exec + plan, ms) and calls in this database since the reset."""
    if not PGSS:
        return float("nan"), 0
    with connect(db) as c:
        row = c.execute(
            """SELECT coalesce(sum(total_exec_time + total_plan_time), 0), coalesce(sum(calls), 0)
               FROM pg_stat_statements WHERE dbid = %s AND query NOT ILIKE '%%pg_stat_statements%%'""",
            (oid,),
        ).fetchone()
    return float(row[0]), int(row[1])


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def series(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


# --------------------------------------------------------------------------- the two sides


def http_get(port: int, path: str = "/metrics", timeout: float = 120) -> tuple[int, bytes]:
    """One GET on a fresh connection, as Prometheus scrapes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def exporter_queries(path: Path) -> None:
    example = yaml.safe_load(EXAMPLE_QUERIES.read_text())
    path.write_text(yaml.safe_dump({k: example[k] for k in TABLE_COLLECTORS}, sort_keys=False))


@contextlib.contextmanager
def exporter(db: str, workdir: Path) -> Iterator[subprocess.Popen]:
    queries = workdir / "queries.yaml"
    exporter_queries(queries)
    env = dict(os.environ, DATA_SOURCE_NAME=f"postgresql://postgres@{benchlib.HOST}:{benchlib.PORT}/{db}?sslmode=disable")
    with open(workdir / "exporter.log", "w") as log:
        proc = subprocess.Popen(
            [which(EXPORTER), f"--web.listen-address=127.0.0.1:{EXPORTER_PORT}", f"--extend.query-path={queries}", "--log.level=warn"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                http_get(EXPORTER_PORT, "/")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def bench_exporter(db: str, oid: int, runs: int, workdir: Path) -> dict[str, float]:
    with exporter(db, workdir) as proc:
        status, body = http_get(EXPORTER_PORT)  # warm-up: opens its connection
        assert status == 200, body[:200]
        if b'pg_stat_user_tables_n_live_tup{' not in body:
            raise SystemExit(f"exporter scrape has no table series: see {workdir / 'exporter.log'}")
        walls = []
        pgss_reset(db)
        cpu0 = cpu_of(proc.pid)
        for _ in range(runs):
            t0 = time.perf_counter()
            status, body = http_get(EXPORTER_PORT)
            walls.append(time.perf_counter() - t0)
        cpu = (cpu_of(proc.pid) - cpu0) / runs
        db_ms, calls = pgss_ms(db, oid)
    return {"wall": median(walls), "db_ms": db_ms / runs, "calls": calls / runs, "client_cpu": cpu,
            "series": series(body), "bytes": len(body), "walls": walls}


def bench_pgupkeep(db: str, oid: int, runs: int) -> dict[str, float]:
    policy = parse_policy(policy_text(db, report_top=50), file="bench-monitoring.yaml", environ={})
    metrics = Metrics()
    runner = Runner(policy, sinks=[metrics.record])

    def cycle() -> float:
        total = 0.0
        for job in JOBS:
            res = runner.run("bench", job)
            if res.outcome != "success":
                raise SystemExit(f"pgupkeep {job}: {res.outcome}: {res.error}")
            total += res.duration_seconds
        return total

    cycle()  # warm-up (imports, first catalog reads)
    pgss_reset(db)
    walls = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(runs):
        walls.append(cycle())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    db_ms, calls = pgss_ms(db, oid)
    body = generate_latest(metrics.registry)
    cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / runs
    # Each job's own share of the database time, one job at a time.
    per_job = {}
    for job in JOBS:
        pgss_reset(db)
        for _ in range(runs):
            runner.run("bench", job)
        per_job[job] = pgss_ms(db, oid)[0] / runs
    return {"wall": median(walls), "db_ms": db_ms / runs, "calls": calls / runs, "client_cpu": cpu,
            "series": series(body), "bytes": len(body), "walls": walls, "per_job": per_job}


def bench_scrapes(db: str, n: int, scrapes: int, workdir: Path) -> dict[str, float]:
    """A real daemon reporting min(n, 1000) tables (bloat report_top), scraped `scrapes` times."""
    top = min(n, 1000)
    config = workdir / "daemon.yaml"
    config.write_text(policy_text(db, report_top=top, listen=f"127.0.0.1:{DAEMON_PORT}", min_table_size="0"))
    with open(workdir / "daemon.log", "w") as log:
        proc = subprocess.Popen([PYTHON, "-m", "pgupkeep", "run", "--config", str(config)], cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while True:  # until every job has reported once
            try:
                status, body = http_get(DAEMON_PORT)
                done = {line for line in body.decode().splitlines()
                        if line.startswith("pgupkeep_job_last_success_timestamp_seconds{")}
                if status == 200 and all(any(f'job="{j}"' in line for line in done) for j in JOBS):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon never reported every job: see {workdir / 'daemon.log'}")
            time.sleep(0.2)
        lat = []
        for _ in range(scrapes):
            t0 = time.perf_counter()
            status, body = http_get(DAEMON_PORT)
            lat.append(time.perf_counter() - t0)
            assert status == 200
        tables = len({line.split(b'table="', 1)[1].split(b'"', 1)[0] for line in body.splitlines()
                      if line.startswith(b"pgupkeep_table_dead_tuples{")})
        return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat), "series": series(body),
                "bytes": len(body), "tables": tables, "report_top": top}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--scrapes", type=int, default=1000)
    ap.add_argument("--no-restore", action="store_true", help="leave pg_stat_statements preloaded")
    ap.add_argument("--no-pgss", action="store_true", help="no restart for pg_stat_statements; database time reads n/a")
    ap.add_argument("--own-server", metavar="BINDIR", help="run on a throwaway server from these binaries")
    args = ap.parse_args()
    global PGSS
    PGSS = not args.no_pgss
    ensure_packages()
    own = None
    if args.own_server:
        from pgupkeep.pgserver import start_server

        own = start_server(Path(args.own_server), settings={
            "shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track_planning": "on",
            "max_connections": "200"})  # fmt: skip
        benchlib.PORT = own.port
    else:
        ensure_server()
    try:
        run(args)
    finally:
        if own is not None:
            own.remove()


def run(args: argparse.Namespace) -> None:
    cycle_rows, size_rows, scrape_rows = [], [], []
    with server_settings(preload_pgss=PGSS, restore=not args.no_restore):
        print_header("Monitoring: pgupkeep collection cycle vs postgres_exporter scrape")
        for n in args.tables:
            with scratch_database(f"bench_monitoring_{n}") as db, tempfile.TemporaryDirectory() as tmp:
                setup(db, n)
                oid = db_oid(db)
                with background_sessions(db):
                    # Interleaved halves, so both see the same load and the same catalog caches.
                    half = max(1, args.runs // 2)
                    ex1, pu1 = bench_exporter(db, oid, half, Path(tmp)), bench_pgupkeep(db, oid, half)
                    ex2, pu2 = bench_exporter(db, oid, args.runs - half, Path(tmp)), bench_pgupkeep(db, oid, args.runs - half)
                    sc = bench_scrapes(db, n, args.scrapes, Path(tmp))
                ex = {k: (ex1[k] + ex2[k]) / 2 for k in ("db_ms", "calls", "client_cpu")} | {
                    "wall": median(ex1["walls"] + ex2["walls"]), "series": ex2["series"], "bytes": ex2["bytes"]}
                pu = {k: (pu1[k] + pu2[k]) / 2 for k in ("db_ms", "calls", "client_cpu")} | {
                    "wall": median(pu1["walls"] + pu2["walls"]), "series": pu2["series"], "bytes": pu2["bytes"]}
                print(f"  {n}: exporter walls {[round(x, 3) for x in ex1['walls'] + ex2['walls']]}", flush=True)
                print(f"  {n}: pgupkeep walls {[round(x, 3) for x in pu1['walls'] + pu2['walls']]}", flush=True)
                per_job = {j: (pu1["per_job"][j] + pu2["per_job"][j]) / 2 for j in JOBS}
                cycle_rows += [
                    [f"{n} tables", "wall time (median)", fmt_s(ex["wall"]), fmt_s(pu["wall"]), ratio(pu["wall"], ex["wall"])],
                    [f"{n} tables", "database time (pg_stat_statements exec+plan)", f"{ex['db_ms']:.1f} ms", f"{pu['db_ms']:.1f} ms",
                     ratio(pu["db_ms"], ex["db_ms"])],
                    *[[f"{n} tables", f"  of which {j} alone", "", f"{per_job[j]:.1f} ms", ""] for j in JOBS],
                    [f"{n} tables", "statements", f"{ex['calls']:.0f}", f"{pu['calls']:.0f}", ratio(pu["calls"], ex["calls"])],
                    [f"{n} tables", "client process CPU", fmt_s(ex["client_cpu"]), fmt_s(pu["client_cpu"]),
                     ratio(pu["client_cpu"], ex["client_cpu"])],
                ]
                size_rows.append([f"{n} tables", f"{ex['series']}", f"{ex['bytes'] / 1024:.0f} KiB", f"{pu['series']}",
                                  f"{pu['bytes'] / 1024:.1f} KiB"])
                scrape_rows.append([f"{n} tables", f"{sc['tables']} (report_top {sc['report_top']})", str(sc["series"]),
                                    f"{sc['bytes'] / 1024:.0f} KiB", fmt_s(sc["p50"]), fmt_s(sc["p99"]), fmt_s(sc["max"])])
        print(f"\ncollection: one pgupkeep cycle (long_running_queries + bloat + health, in-process Runner) vs one exporter "
              f"scrape; medians of {args.runs}; ratio = pgupkeep / exporter\n")
        print(table(["database", "measure", "postgres_exporter", "pgupkeep", "ratio"], cycle_rows))
        print("\nseries and bytes of one /metrics body (pgupkeep: default report_top 50)\n")
        print(table(["database", "exporter series", "exporter bytes", "pgupkeep series", "pgupkeep bytes"], size_rows))
        print(f"\npgupkeep daemon /metrics scrape latency ({args.scrapes} sequential GETs, new connection each)\n")
        print(table(["database", "tables reported", "series", "bytes", "p50", "p99", "max"], scrape_rows), flush=True)


if __name__ == "__main__":
    main()
