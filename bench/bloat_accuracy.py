"""Accuracy and speed benchmark of the bloat job (run by hand; results in bench/results-bloat.md).

Builds tables with known bloat, then compares the wasted share the job reports, from the
statistical estimate alone and from pgstattuple_approx, with exact `pgstattuple`
((dead_tuple_len + free_space) / table_len). Then times the whole job on a database of N tables.

    python bench/bloat_accuracy.py [--dsn DSN] [--big-gb 1.0] [--tables 10000]

Without --dsn (or $PGUPKEEP_BENCH_DSN) it starts a throwaway server (fsync off).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import UTC, datetime

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep import db
from pgupkeep.jobs import bloat
from pgupkeep.jobs.base import JobContext
from pgupkeep.pgserver import start_server
from pgupkeep.policy import parse_policy
from pgupkeep.runner import execute_job

ROWS = 200_000
PAYLOAD = "repeat(md5(g::text), 3)"  # 96 characters
# Incompressible ~8 kB values: stored out of line in TOAST, an 18-byte pointer in the heap.
TOAST_PAYLOAD = "(SELECT string_agg(md5((g * 1000 + i)::text), '') FROM generate_series(1, 256) i)"
# Widths from 0 to 299 characters and 10% nulls: the layout model works from averages here.
VARIED_PAYLOAD = "CASE WHEN g % 10 = 0 THEN NULL ELSE repeat(chr(65 + g % 26), (g * 7919) % 300) END"
WIDE_PAYLOAD = "(SELECT string_agg(md5((g * 100 + i)::text), '') FROM generate_series(1, 45) i)"  # 1440 bytes


def execute(dsn: str, *statements: str) -> None:
    """Each call in its own session: its statistics are flushed when the backend exits."""
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s)


def settle(dsn: str, table: str, live: int, dead: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,)
            ).fetchone()
        if row == (live, dead) or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def build(dsn: str, name: str, rows: int, payload: str, *, delete_mod: tuple[int, int] | None = None,
          vacuum: bool = False, update_indexed: bool = False, external: bool = False) -> str:
    """Create, fill, analyze; then delete `k` of every `m` rows (scattered), VACUUM or non-HOT update."""
    execute(
        dsn,
        f"CREATE TABLE {name} (id int PRIMARY KEY, k int, payload text) WITH (autovacuum_enabled = off)",
        f"ALTER TABLE {name} ALTER COLUMN payload SET STORAGE EXTERNAL" if external else "SELECT 1",
        f"INSERT INTO {name} SELECT g, g, {payload} FROM generate_series(1, {rows}) g",
    )
    settle(dsn, name, rows, 0)
    execute(dsn, f"ANALYZE {name}")
    live, dead = rows, 0
    if delete_mod:
        k, m = delete_mod
        execute(dsn, f"DELETE FROM {name} WHERE id % {m} < {k}")
        dead = sum(1 for i in range(1, rows + 1) if i % m < k)
        live = rows - dead
    if update_indexed:
        # k is indexed: every update is non-HOT and leaves a dead version behind.
        execute(dsn, f"CREATE INDEX ON {name} (k)", f"UPDATE {name} SET k = k + 1")
        dead = rows
    settle(dsn, name, live, dead)
    if vacuum:
        execute(dsn, f"VACUUM {name}")
        settle(dsn, name, live, 0)
    return name


def section_for(dsn: str, budget: str, min_size: str = "0") -> tuple:
    text = (
        'version: 1\ntargets:\n  - name: bench\n    dsn: "${DSN}"\n    statement_timeout: 1h\n'
        f"    bloat:\n      min_table_size: {min_size}\n      report_top: 10000\n      exact_time_budget: {budget}\n"
    )
    policy = parse_policy(text, environ={"DSN": dsn})
    return policy, policy.targets[0]


def measure(dsn: str, budget: str) -> dict[str, bloat.TableBloat]:
    _, target = section_for(dsn, budget)
    with db.connect(target) as c:
        tables, _, _ = bloat.assess(c, target.bloat)
    return {t.table: t for t in tables}


def run_job_timed(dsn: str, min_size: str, budget: str) -> tuple[float, int]:
    policy, target = section_for(dsn, budget, min_size)
    with db.connect(target) as c:
        ctx = JobContext(target=target, section=target.bloat, conn=c, now=datetime.now(UTC), timezone=policy.daemon.zone)
        started = time.monotonic()
        out = execute_job(bloat.KIND, ctx)
        return time.monotonic() - started, len(out.findings)


def with_db(dsn: str, name: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo(**params)


def fresh_db(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_db(admin_dsn, name)


def accuracy(admin_dsn: str, big_gb: float) -> list[str]:
    dsn = fresh_db(admin_dsn, "bloat_bench")
    execute(dsn, "CREATE EXTENSION pgstattuple")
    tables = [
        build(dsn, "del_00", ROWS, PAYLOAD),
        build(dsn, "del_20", ROWS, PAYLOAD, delete_mod=(1, 5)),
        build(dsn, "del_50", ROWS, PAYLOAD, delete_mod=(1, 2)),
        build(dsn, "del_80", ROWS, PAYLOAD, delete_mod=(4, 5)),
        build(dsn, "del_50_vacuumed", ROWS, PAYLOAD, delete_mod=(1, 2), vacuum=True),
        build(dsn, "del_80_vacuumed", ROWS, PAYLOAD, delete_mod=(4, 5), vacuum=True),
        build(dsn, "varied_nulls_del_50", ROWS, VARIED_PAYLOAD, delete_mod=(1, 2)),
        build(dsn, "varied_nulls_del_50_vacuumed", ROWS, VARIED_PAYLOAD, delete_mod=(1, 2), vacuum=True),
        build(dsn, "non_hot_updates", ROWS, PAYLOAD, update_indexed=True),
        build(dsn, "wide_rows_del_30", 40_000, WIDE_PAYLOAD, delete_mod=(3, 10)),
        build(dsn, "toast_del_50", 20_000, TOAST_PAYLOAD, delete_mod=(1, 2), external=True),
    ]
    if big_gb > 0:
        rows = int(big_gb * 1024**3 / 150)  # ~150 bytes a row with its line pointer
        tables.append(build(dsn, "big_del_30", rows, PAYLOAD, delete_mod=(3, 10)))
    estimated = measure(dsn, "0s")
    started = time.monotonic()
    approx = measure(dsn, "1h")
    approx_seconds = time.monotonic() - started
    lines = [
        "| table | size | exact pgstattuple | pgstattuple_approx | error (points) | estimate | error (points) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    worst_a = worst_e = 0.0
    with psycopg.connect(dsn, autocommit=True) as c:
        for name in tables:
            exact = c.execute(
                "SELECT (dead_tuple_len + free_space)::float8 / table_len, table_len FROM pgstattuple(%s::regclass)",
                (name,),
            ).fetchone()
            e, a = estimated[f"public.{name}"], approx[f"public.{name}"]
            assert a.method == "pgstattuple_approx", a
            err_a, err_e = (a.bloat_ratio - exact[0]) * 100, (e.bloat_ratio - exact[0]) * 100
            worst_a, worst_e = max(worst_a, abs(err_a)), max(worst_e, abs(err_e))
            lines.append(
                f"| {name} | {exact[1] / 1024**2:.1f} MB | {exact[0]:.1%} | {a.bloat_ratio:.1%} | {err_a:+.1f} "
                f"| {e.bloat_ratio:.1%} | {err_e:+.1f} |"
            )
    lines += [
        "",
        f"Worst error: pgstattuple_approx {worst_a:.1f} points (target 5), estimate alone {worst_e:.1f} points (target 12).",
        f"pgstattuple_approx over all {len(tables)} tables took {approx_seconds:.1f} s.",
    ]
    return lines


def many_tables(admin_dsn: str, count: int) -> list[str]:
    dsn = fresh_db(admin_dsn, "bloat_bench_many")
    started = time.monotonic()
    batch = 500
    for lo in range(0, count, batch):
        execute(
            dsn,
            f"DO $$ BEGIN FOR i IN {lo}..{min(lo + batch, count) - 1} LOOP "
            "EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, payload text)', i); "
            "EXECUTE format('INSERT INTO t_%s SELECT g, md5(g::text) FROM generate_series(1, 20) g', i); "
            "END LOOP; END $$",
        )
    execute(dsn, "ANALYZE")
    built = time.monotonic() - started
    default_s, _ = run_job_timed(dsn, "10MB", "10s")
    all_s, n_findings = run_job_timed(dsn, "0", "0s")
    return [
        f"{count} tables (id int primary key, payload text; 20 rows each), built and analyzed in {built:.0f} s.",
        "",
        "| run | policy | job duration |",
        "|---|---|---:|",
        f"| defaults | min_table_size 10MB, exact_time_budget 10s | {default_s:.2f} s |",
        f"| every table assessed | min_table_size 0, exact_time_budget 0s | {all_s:.2f} s ({n_findings} findings) |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", default=os.environ.get("PGUPKEEP_BENCH_DSN"))
    ap.add_argument("--big-gb", type=float, default=1.0, help="size of the large table; 0 skips it")
    ap.add_argument("--tables", type=int, default=10_000, help="tables for the timing run; 0 skips it")
    args = ap.parse_args()
    server = None
    if not args.dsn:
        server = start_server()
        args.dsn = server.dsn("postgres")
    try:
        with psycopg.connect(args.dsn) as c:
            version = c.execute("SELECT version()").fetchone()[0]
        print(f"# bloat benchmark, {datetime.now(UTC):%Y-%m-%d}\n")
        print(f"- machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}")
        print(f"- server: {version}\n")
        print("## Accuracy\n")
        print("\n".join(accuracy(args.dsn, args.big_gb)))
        if args.tables:
            print("\n## Speed\n")
            print("\n".join(many_tables(args.dsn, args.tables)))
    finally:
        if server is not None:
            server.remove()


if __name__ == "__main__":
    main()
