"""The health job at size: a database of 10,000 tables and 10,000 sequences (each table's serial
key), on the system PostgreSQL 15. Issue 17 asks for a run under 1 s and under 2,000 series.

    python bench/health.py [--tables 10000] [--runs 7] [--moving 100]

Each run is what the daemon does: a new session, then the whole job (plan; health has no steps),
with the job's memo kept from run to run as the runner keeps it. Between runs `--moving`
sequences are used (nextval), so steady-state runs read those again and no others. Reported apart:
the first run (every sequence read: also what a run costs once an hour, and every run on a
standby), and the steady state. Beside the wall time, the CPU time of the server backend (from
/proc, the server is local) and of the client, which a loaded machine inflates far less.
With --one-statement, side by side: the one statement the issue suggested for sequence values
(all of pg_sequences in a new session) against the job's first-run read (state and catalog
statements + batches of max_locks_per_transaction). Off by default: that statement takes one lock
per sequence, and on a shared server with 10,000 sequences it failed with "out of shared memory"
(and, while it held them, left other sessions short of lock slots). The database is named
bench_health_* and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from benchlib import (
    connect,
    dsn,
    ensure_server,
    fmt_s,
    median,
    print_header,
    ratio,
    scratch_database,
    table,
)
from prometheus_client import CollectorRegistry, generate_latest

from pgupkeep import db
from pgupkeep.jobs import health
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.health import horizon, replication, sequences, tables
from pgupkeep.metrics import Metrics
from pgupkeep.policy import parse_policy
from pgupkeep.results import JobResult
from pgupkeep.runner import execute_job

CHUNK = 100  # tables a setup transaction creates: each holds a few locks until it commits


def setup(name: str, n: int) -> None:
    """n tables with a serial key (n sequences feeding integer columns), 10 rows each."""
    t0 = time.perf_counter()
    with connect(name) as c:
        for lo in range(1, n + 1, CHUNK):
            hi = min(lo + CHUNK, n + 1) - 1
            c.execute(
                "DO $$ BEGIN FOR i IN " + str(lo) + ".." + str(hi) + " LOOP "
                "EXECUTE format('CREATE TABLE public.h%s (id serial PRIMARY KEY, v int)', lpad(i::text, 5, '0')); "
                "EXECUTE format('INSERT INTO public.h%s (v) SELECT g FROM generate_series(1, 10) g', lpad(i::text, 5, '0')); "
                "EXECUTE format('ANALYZE public.h%s', lpad(i::text, 5, '0')); "
                "END LOOP; END $$"
            )
        count = c.execute("SELECT count(*) FROM pg_sequence").fetchone()[0]
    print(f"setup: {n} tables, {count} sequences in {time.perf_counter() - t0:.1f} s", flush=True)


def target_of(name: str):
    policy = parse_policy(f'version: 1\ntargets:\n  - name: bench\n    dsn: "{dsn(name)}"\n    health: {{}}\n')
    return policy, policy.targets[0]


def backend_cpu(pid: int) -> float:
    """CPU seconds a local server backend has used (nan when /proc does not show it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    wall: float
    backend: float
    client: float
    result: JobResult


def run_job(name: str, memo: dict) -> Run:
    policy, target = target_of(name)
    t0, c0 = time.perf_counter(), time.process_time()
    with db.connect(target) as conn:
        pid = conn.info.backend_pid
        b0 = backend_cpu(pid)
        ctx = JobContext(target=target, section=target.health, conn=conn, now=datetime.now(UTC), timezone=policy.daemon.zone, memo=memo)
        out = execute_job(health.KIND, ctx)
        b1 = backend_cpu(pid)
    took = time.perf_counter() - t0
    assert not out.errors, out.errors
    result = JobResult("bench", "health", "success", took, time.time(), findings=tuple(out.findings), samples=tuple(out.samples))
    return Run(took, b1 - b0, time.process_time() - c0, result)


def move_sequences(name: str, n: int) -> None:
    if n:
        with connect(name) as c:
            c.execute("SELECT nextval(seqrelid) FROM (SELECT seqrelid FROM pg_sequence ORDER BY random() LIMIT %s) s", (n,))


def parts(name: str) -> dict[str, float]:
    """Each noun's read alone, on one session (warm), so the total can be attributed."""
    policy, target = target_of(name)
    section = target.health
    with db.connect(target) as conn:
        steps = {
            "basic checks (connections, xid age, indexes, size): 4 statements": lambda: health.read(conn, section),
            "replication: 3 statements": lambda: replication.read(conn),
            "horizon: 2 statements": lambda: horizon.read(conn, section),
            "sequences, first run (state, catalog, every value in batches)": lambda: sequences.read(conn, datetime.now(UTC), {}),
            "tables (freeze age, autovacuum lag): 1 statement": lambda: tables.read(conn, section),
        }
        out = {}
        for label, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            out[label] = time.perf_counter() - t0
    return out


def one_statement_sequences(name: str) -> float:
    """The issue's suggestion: every value in one statement (a new session, as a run has); nan
    when the server refuses it for want of lock slots."""
    with psycopg.connect(dsn(name), autocommit=True) as c:
        t0 = time.perf_counter()
        try:
            c.execute("SELECT count(last_value) FROM pg_sequences").fetchone()
        except psycopg.errors.OutOfMemory as exc:
            print(f"one statement over every sequence failed: {exc}".splitlines()[0], flush=True)
            return float("nan")
        return time.perf_counter() - t0


def batched_sequences(name: str) -> float:
    """The job's read of every sequence (a first run) in a new session."""
    _, target = target_of(name)
    with db.connect(target) as conn:
        t0 = time.perf_counter()
        sequences.read(conn, datetime.now(UTC), {})
        return time.perf_counter() - t0


def series(result: JobResult) -> tuple[int, int]:
    metrics = Metrics(CollectorRegistry())
    metrics.record(result)
    lines = [ln for ln in generate_latest(metrics.registry).decode().splitlines() if ln and not ln.startswith("#")]
    return len(result.samples), len([ln for ln in lines if 'target="bench"' in ln and "pgupkeep_job" not in ln])


def cpu(x: float) -> str:
    return "n/a" if x != x else fmt_s(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--moving", type=int, default=100, help="sequences used between runs")
    ap.add_argument("--keep", action="store_true", help="keep the database (for poking around)")
    ap.add_argument("--one-statement", action="store_true", help="also time all of pg_sequences in one statement (see above)")
    args = ap.parse_args()
    ensure_server()
    print_header(f"health job: {args.tables:,} tables and sequences")
    with scratch_database(f"bench_health_{secrets.token_hex(3)}", keep=args.keep) as name:
        setup(name, args.tables)
        memo: dict = {}
        first = run_job(name, memo)
        steady: list[Run] = []
        for _ in range(args.runs):
            move_sequences(name, args.moving)
            steady.append(run_job(name, memo))
        # A full read again, each with an empty memo: what every run after a start costs (and
        # once an hour, and every run on a standby). The very first run above also met a cold
        # database: its catalogs had never been read by any session.
        full = [run_job(name, {}) for _ in range(args.runs)]
        # Apart from the runs above: reading every sequence moves every page-fetch count, which
        # would make each following run read every value again.
        seq_one, seq_all = [], []
        for _ in range(args.runs):  # interleaved, so both see the same machine load
            if args.one_statement:
                seq_one.append(one_statement_sequences(name))
            seq_all.append(batched_sequences(name))
        load = os.getloadavg()
        samples, exposed = series(steady[-1].result)
        split = parts(name)
        with connect(name) as c:
            budget = int(c.execute("SHOW max_locks_per_transaction").fetchone()[0])
        batches = -(-args.tables // budget)

    walls = [r.wall for r in steady]
    print(f"load average during the runs: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on {os.cpu_count()} cores\n")
    print(table(
        ["health job, new session each run", "wall", "server backend CPU", "client CPU", "target", "verdict (wall)"],
        [
            ["very first run on the new database (every sequence read)", fmt_s(first.wall), cpu(first.backend),
             cpu(first.client), "< 1 s", "met" if first.wall < 1 else "NOT met"],
            [f"first run after a start (every sequence read), median of {args.runs}", fmt_s(median([r.wall for r in full])),
             cpu(median([r.backend for r in full])), cpu(median([r.client for r in full])), "< 1 s",
             "met" if median([r.wall for r in full]) < 1 else "NOT met"],
            ["first run after a start, worst run", fmt_s(max(r.wall for r in full)), "", "", "< 1 s",
             "met" if max(r.wall for r in full) < 1 else "NOT met"],
            [f"steady state, median of {args.runs} ({args.moving} sequences used between runs)", fmt_s(median(walls)),
             cpu(median([r.backend for r in steady])), cpu(median([r.client for r in steady])), "< 1 s",
             "met" if median(walls) < 1 else "NOT met"],
            ["steady state, worst run", fmt_s(max(walls)), "", "", "< 1 s", "met" if max(walls) < 1 else "NOT met"],
        ],
    ))  # fmt: skip
    print()
    print(table(
        ["series from health", "value", "target", "verdict"],
        [["samples / exposed lines", f"{samples} / {exposed}", "< 2,000", "met" if exposed < 2000 else "NOT met"],
         ["findings", str(len(steady[-1].result.findings)), "", ""]],
    ))  # fmt: skip
    print()
    rows = [[f"state + catalog statements + {batches} batches of {budget} (the job's first run)", fmt_s(median(seq_all)), ""]]
    if seq_one:
        done = [x for x in seq_one if x == x]
        rows.insert(0, ["one statement (pg_sequences, the issue's suggestion)",
                        f"{fmt_s(median(done))}, {len(seq_one) - len(done)} of {len(seq_one)} failed", "1.000"])
        rows[1][2] = ratio(median(seq_all), median(done)) if done else "n/a"
    print(table(["every sequence value, new session", "median", "ratio to one statement"], rows))
    print()
    print(table(["part (one warm session)", "time"], [[k, fmt_s(v)] for k, v in split.items()]))


if __name__ == "__main__":
    main()
