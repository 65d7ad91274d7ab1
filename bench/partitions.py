"""Partitions, side by side: pg_partman 4.7 (Debian's postgresql-15-partman) and pgupkeep on the
same PostgreSQL, same database, identical sets of monthly tables (premake 3), one run.

    python bench/partitions.py [--tables 100 1000] [--runs 5] [--lock-tables 100]

Workloads, each a median of --runs runs, interleaved so both tools see the same machine load:
  steady  nothing to create: partman.run_maintenance() (--steady proc: run_maintenance_proc()) vs
          pgupkeep's partitions job (a runner that has run before, and a fresh one: the first run
          after a start reads every bound);
  one-new the newest partition of every table dropped before each run, so each tool creates one
          partition per table: CALL partman.run_maintenance_proc() vs pgupkeep;
  lock    a reader holds ACCESS SHARE on one table (parent, partitions, default) for 5 s while the
          tool has to ATTACH a partition there; an inserter measures every insert's latency.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from datetime import UTC, datetime

import psycopg
from benchlib import (
    connect,
    dsn,
    ensure_packages,
    ensure_server,
    fmt_s,
    median,
    print_header,
    ratio,
    scratch_database,
    table,
)
from psycopg import sql

from pgupkeep.policy import parse_policy
from pgupkeep.runner import Runner

PREMAKE = 3
SIDES = ("pm", "pu")  # pm: managed by pg_partman; pu: managed by pgupkeep
CHUNK = 50  # tables per setup transaction (keeps the lock table small)
LOCK_HOLD = 5.0
LOCK_TIMEOUT = "1s"
DEFAULT_ROW_TS = "2001-01-01 00:00:00+00"  # outside every partition: lands in the default partition

COLUMNS = "id bigint NOT NULL, created_at timestamptz NOT NULL, payload text, PRIMARY KEY (id, created_at)"


def month_start(now: datetime, offset: int) -> datetime:
    m = now.year * 12 + now.month - 1 + offset
    return datetime(m // 12, m % 12 + 1, 1, tzinfo=UTC)


def names(side: str, n: int) -> list[str]:
    return [f"t{i:04d}" for i in range(1, n + 1)]


def setup(db: str, n: int) -> None:
    """pg_partman's side through create_parent(); pgupkeep's side given the same partitions
    (current month -3 .. +3, a default partition) by plain DDL."""
    now = datetime.now(UTC)
    with connect(db) as c:
        c.execute("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman; CREATE SCHEMA pm; CREATE SCHEMA pu")
        t0 = time.perf_counter()
        tabs = names("pm", n)
        for i in range(0, n, CHUNK):
            stmts = []
            for t in tabs[i : i + CHUNK]:
                stmts.append(sql.SQL("CREATE TABLE pm.{} ({}) PARTITION BY RANGE (created_at)").format(sql.Identifier(t), sql.SQL(COLUMNS)))
                stmts.append(sql.SQL("SELECT partman.create_parent({}, 'created_at', 'native', 'monthly', p_premake := {})").format(
                    sql.Literal(f"pm.{t}"), sql.Literal(PREMAKE)))
            c.execute(sql.SQL(";\n").join(stmts))
        t1 = time.perf_counter()
        for i in range(0, n, CHUNK):
            stmts = []
            for t in tabs[i : i + CHUNK]:
                parent = sql.Identifier("pu", t)
                stmts.append(sql.SQL("CREATE TABLE {} ({}) PARTITION BY RANGE (created_at)").format(parent, sql.SQL(COLUMNS)))
                stmts.append(sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(sql.Identifier("pu", f"{t}_default"), parent))
                for k in range(-PREMAKE, PREMAKE + 1):
                    lo, hi = month_start(now, k), month_start(now, k + 1)
                    stmts.append(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier("pu", f"{t}_{lo:%Y_%m}"), parent, sql.Literal(lo), sql.Literal(hi)))
            c.execute(sql.SQL(";\n").join(stmts))
        # Rows in the current month on both sides: pg_partman (infinite_time_partitions off, its
        # default) premakes from the newest data, so an empty table would never get new partitions.
        for side in SIDES:
            for i in range(0, n, CHUNK):
                c.execute(sql.SQL(";\n").join(
                    sql.SQL("INSERT INTO {} SELECT g, now() - g * interval '1 minute', 'x' FROM generate_series(1, 10) g").format(
                        sql.Identifier(side, t)) for t in tabs[i : i + CHUNK]))
        c.execute("VACUUM ANALYZE")
        print(f"setup {n} tables: pg_partman create_parent {t1 - t0:.1f} s, plain DDL {time.perf_counter() - t1:.1f} s", flush=True)


def drop_newest(db: str, side: str, only: list[str] | None = None) -> int:
    """Drop each table's newest partition (the month at +premake), so the next run creates one."""
    lo = month_start(datetime.now(UTC), PREMAKE)
    prefix = f"FOR VALUES FROM ('{lo:%Y-%m-%d} 00:00:00+00')"
    with connect(db, options="-c TimeZone=UTC") as c:
        rows = c.execute(
            """SELECT pn.nspname, pc.relname FROM pg_inherits i
               JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace
               JOIN pg_class pc ON pc.oid = i.inhrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
               WHERE n.nspname = %s AND (%s::text[] IS NULL OR p.relname = ANY(%s))
                 AND starts_with(pg_get_expr(pc.relpartbound, pc.oid), %s)""",
            (side, only, only, prefix),
        ).fetchall()
        for i in range(0, len(rows), CHUNK):
            c.execute(sql.SQL(";").join(sql.SQL("DROP TABLE {}").format(sql.Identifier(*r)) for r in rows[i : i + CHUNK]))
    return len(rows)


def count_newest(db: str, side: str) -> int:
    lo = month_start(datetime.now(UTC), PREMAKE)
    with connect(db, options="-c TimeZone=UTC") as c:
        return c.execute(
            """SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace n ON n.oid = p.relnamespace JOIN pg_class pc ON pc.oid = i.inhrelid
               WHERE n.nspname = %s AND starts_with(pg_get_expr(pc.relpartbound, pc.oid), %s)""",
            (side, f"FOR VALUES FROM ('{lo:%Y-%m-%d} 00:00:00+00')"),
        ).fetchone()[0]


def pgupkeep_runner(db: str, n: int) -> Runner:
    tables = "\n".join(f"        - {{table: pu.t{i:04d}, interval: monthly, premake: {PREMAKE}}}" for i in range(1, n + 1))
    text = f"""
version: 1
daemon: {{listen: "127.0.0.1:0", timezone: UTC}}
targets:
  - name: bench
    dsn: "{dsn(db)}"
    lock_timeout: {LOCK_TIMEOUT}
    partitions:
      schedule: "every 1h"
      tables:
{tables}
"""
    return Runner(parse_policy(text, file="bench-partitions.yaml", environ={}))


def run_pgupkeep(runner: Runner, expect_creates: int | None = None) -> float:
    res = runner.run("bench", "partitions")
    created = sum(1 for a in res.actions if a.action == "create_partition" and a.applied)
    if res.outcome != "success" or (expect_creates is not None and created != expect_creates):
        raise SystemExit(f"pgupkeep partitions: outcome {res.outcome}, created {created} (want {expect_creates}): {res.error}")
    return res.duration_seconds


def timed_sql(db: str, statement: str) -> float:
    with connect(db) as c:
        t0 = time.perf_counter()
        c.execute(statement)
        return time.perf_counter() - t0


STEADY_CALLS = {"fn": ("SELECT partman.run_maintenance()", "run_maintenance()"),
                "proc": ("CALL partman.run_maintenance_proc()", "run_maintenance_proc()")}


def bench_tables(n: int, runs: int, fn_runs: int = 2, steady: str = "fn", keep: bool = False, reuse: bool = False,
                 new_runs: int | None = None) -> list[list[str]]:
    rows = []
    name = f"bench_partitions_{n}"
    # --reuse: the database a run with --keep left (at 10,000 tables the setup takes 20-30 min).
    with contextlib.nullcontext(name) if reuse else scratch_database(name, keep=keep) as db:
        if not reuse:
            setup(db, n)
        runner = pgupkeep_runner(db, n)
        if reuse:  # an earlier run may have stopped between a drop and the recreation
            timed_sql(db, "CALL partman.run_maintenance_proc()")
            run_pgupkeep(runner)
        # Warm-up, and a check that both sides start at the same steady state.
        steady_sql, steady_name = STEADY_CALLS[steady]
        timed_sql(db, steady_sql)
        run_pgupkeep(runner, expect_creates=0)
        # pgupkeep's runner keeps each table's bounds between runs and re-reads only tables whose
        # partitions changed; a fresh runner's first run (a daemon just started, `once`, `plan`)
        # reads them all, so it is measured too.
        pm_steady, pu_steady, pu_first = [], [], []
        for _ in range(runs):
            pm_steady.append(timed_sql(db, steady_sql))
            pu_steady.append(run_pgupkeep(runner, expect_creates=0))
            pu_first.append(run_pgupkeep(pgupkeep_runner(db, n), expect_creates=0))
        pm_m, pu_m, first_m = median(pm_steady), median(pu_steady), median(pu_first)
        rows.append([f"{n} tables, steady state", steady_name, fmt_s(pm_m), fmt_s(pu_m), ratio(pu_m, pm_m)])
        rows.append([f"{n} tables, steady state, first run after start", steady_name, fmt_s(pm_m), fmt_s(first_m),
                     ratio(first_m, pm_m)])
        print(f"  steady {n}: partman {[round(x, 3) for x in pm_steady]} pgupkeep {[round(x, 3) for x in pu_steady]} "
              f"first run {[round(x, 3) for x in pu_first]}", flush=True)

        pm_new, pu_new, pm_fn = [], [], []
        for r in range(runs if new_runs is None else new_runs):
            assert drop_newest(db, "pm") == n
            pm_new.append(timed_sql(db, "CALL partman.run_maintenance_proc()"))
            if count_newest(db, "pm") != n:
                raise SystemExit("pg_partman did not recreate every newest partition")
            assert drop_newest(db, "pu") == n
            pu_new.append(run_pgupkeep(runner, expect_creates=n))
            if r < fn_runs:  # the single-transaction function too, for reference (fewer runs: it is slow)
                assert drop_newest(db, "pm") == n
                try:
                    pm_fn.append(timed_sql(db, "SELECT partman.run_maintenance()"))
                except psycopg.Error as exc:
                    print(f"  run_maintenance() failed: {str(exc).strip().splitlines()[0]}", flush=True)
                    pm_fn.append(float("nan"))
                    timed_sql(db, "CALL partman.run_maintenance_proc()")
        if not pm_new:
            return rows
        pm_m, pu_m = median(pm_new), median(pu_new)
        rows.append([f"{n} tables, one new partition each", "run_maintenance_proc()", fmt_s(pm_m), fmt_s(pu_m), ratio(pu_m, pm_m)])
        ok = [x for x in pm_fn if x == x]
        if pm_fn:
            fn_m = median(ok) if ok else float("nan")
            fn_text = fmt_s(fn_m) if len(ok) == len(pm_fn) else f"failed {len(pm_fn) - len(ok)}/{len(pm_fn)}" + (f", {fmt_s(fn_m)}" if ok else "")
            rows.append([f"{n} tables, one new partition each", "run_maintenance() (ref.)", fn_text, fmt_s(pu_m), ratio(pu_m, fn_m) if ok else "n/a"])
        print(f"  one-new {n}: proc {[round(x, 3) for x in pm_new]} fn {[round(x, 3) for x in pm_fn]} "
              f"pgupkeep {[round(x, 3) for x in pu_new]}", flush=True)
    return rows


# --------------------------------------------------------------------------- lock contention


class Inserter(threading.Thread):
    """Inserts a row into the current month and one into the default partition, in turn, every
    10 ms, recording (start, latency, stream)."""

    def __init__(self, db: str, parent: str):
        super().__init__(daemon=True)
        self.db, self.parent = db, parent
        self.samples: list[tuple[float, float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        schema, name = self.parent.split(".")
        stmt = sql.SQL("INSERT INTO {} (id, created_at, payload) VALUES (%s, {}, 'ins')")
        current = stmt.format(sql.Identifier(schema, name), sql.SQL("now()"))
        default = stmt.format(sql.Identifier(schema, name), sql.Literal(DEFAULT_ROW_TS))
        with connect(self.db, application_name="bench-inserter") as c:
            i = 1_000_000
            while not self.stop.is_set():
                for stream, s in (("current", current), ("default", default)):
                    i += 1
                    t0 = time.perf_counter()
                    c.execute(s, (i,))
                    self.samples.append((t0, time.perf_counter() - t0, stream))
                time.sleep(0.01)


def lock_round(db: str, side: str, tool: callable) -> dict[str, float]:
    parent = f"{side}.t0001"
    drop_newest(db, side, only=["t0001"])
    ins = Inserter(db, parent)
    ins.start()
    time.sleep(0.5)
    reader = psycopg.connect(dsn(db, application_name="bench-reader"))  # not autocommit: holds its locks
    reader.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*parent.split("."))))
    held_from = time.perf_counter()
    release = threading.Timer(LOCK_HOLD, reader.commit)
    release.start()
    time.sleep(0.1)
    t0 = time.perf_counter()
    outcome = tool()
    t1 = time.perf_counter()
    release.join()
    time.sleep(0.5)
    ins.stop.set()
    ins.join()
    reader.close()
    created = _has_newest(db, side, "t0001")
    with connect(db) as c:
        c.execute(sql.SQL("DELETE FROM {} WHERE payload = 'ins'").format(sql.Identifier(*parent.split("."))))
    during = [s for s in ins.samples if held_from <= s[0] <= max(t1, held_from + LOCK_HOLD)]
    return {
        "tool_s": t1 - t0,
        "current_max": max((lat for _, lat, st in during if st == "current"), default=0.0),
        "default_max": max((lat for _, lat, st in during if st == "default"), default=0.0),
        "created": float(created),
        "outcome": outcome,
    }


def _has_newest(db: str, side: str, name: str) -> bool:
    lo = month_start(datetime.now(UTC), PREMAKE)
    with connect(db, options="-c TimeZone=UTC") as c:
        return bool(c.execute(
            """SELECT count(*) FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhrelid
               WHERE i.inhparent = %s::regclass AND starts_with(pg_get_expr(pc.relpartbound, pc.oid), %s)""",
            (f"{side}.{name}", f"FOR VALUES FROM ('{lo:%Y-%m-%d} 00:00:00+00')"),
        ).fetchone()[0])


def bench_lock(n: int, runs: int) -> list[list[str]]:
    with scratch_database(f"bench_partitions_lock_{n}") as db:
        setup(db, n)
        runner = pgupkeep_runner(db, n)

        def partman() -> str:
            timed_sql(db, "CALL partman.run_maintenance_proc()")
            return "created after the wait"

        def pgupkeep() -> str:
            res = runner.run("bench", "partitions")
            waits = sum(1 for f in res.findings if f.kind == "lock_timeout")
            return f"{res.outcome}, {waits} lock_timeout attempts"

        results: dict[str, list[dict]] = {"pm": [], "pu": []}
        for _ in range(runs):
            results["pm"].append(lock_round(db, "pm", partman))
            results["pu"].append(lock_round(db, "pu", pgupkeep))
    rows = []
    for side, label in (("pm", "pg_partman run_maintenance_proc()"), ("pu", f"pgupkeep (lock_timeout {LOCK_TIMEOUT})")):
        rs = results[side]
        rows.append([
            label,
            fmt_s(median([r["default_max"] for r in rs])),
            fmt_s(max(r["default_max"] for r in rs)),
            fmt_s(median([r["current_max"] for r in rs])),
            fmt_s(median([r["tool_s"] for r in rs])),
            f"{sum(r['created'] for r in rs):.0f}/{len(rs)}",
            "; ".join(sorted({r["outcome"] for r in rs})),
        ])
        print(f"  lock {side}: {rs}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lock-tables", type=int, default=100, help="tables in the lock-contention database (0: skip)")
    ap.add_argument("--lock-runs", type=int, default=3)
    ap.add_argument("--steady", choices=sorted(STEADY_CALLS), default="fn",
                    help="pg_partman's steady-state call: run_maintenance() (one transaction; out of shared memory "
                         "at 10,000 tables on a default server) or run_maintenance_proc() (a transaction a table)")
    ap.add_argument("--keep", action="store_true", help="keep each bench_partitions_N database (for --reuse)")
    ap.add_argument("--reuse", action="store_true", help="run on the bench_partitions_N databases --keep left, without setup")
    ap.add_argument("--new-runs", type=int, help="runs of the one-new workload (default: --runs; 0: skip)")
    ap.add_argument("--fn-runs", type=int, default=2,
                    help="runs of the single-transaction run_maintenance() beside run_maintenance_proc() (0: skip)")
    args = ap.parse_args()
    ensure_packages()
    ensure_server()
    print_header("Partitions: pg_partman vs pgupkeep")
    with connect() as c:
        print("server: " + ", ".join(f"{k} {c.execute(f'SHOW {k}').fetchone()[0]}" for k in ("shared_buffers", "huge_pages")))
    rows = []
    for n in args.tables:
        rows += bench_tables(n, args.runs, args.fn_runs, args.steady, args.keep, args.reuse, args.new_runs)
    print(f"\nmedians of {args.runs} runs; ratio = pgupkeep / pg_partman\n")
    print(table(["workload", "pg_partman call", "pg_partman", "pgupkeep", "ratio"], rows), flush=True)
    if args.lock_tables:
        lrows = bench_lock(args.lock_tables, args.lock_runs)
        print(f"\nlock contention ({args.lock_tables} tables, reader holds ACCESS SHARE for {LOCK_HOLD:.0f} s, "
              f"{args.lock_runs} runs; insert delays = longest single INSERT while the lock was held)\n")
        print(table(["tool", "longest insert into default (median)", "(worst)", "longest insert into current month (median)",
                     "tool run time (median)", "partition created", "outcome"], lrows), flush=True)


if __name__ == "__main__":
    main()
