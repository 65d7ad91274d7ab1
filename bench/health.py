"""The health job at size: a database of 10,000 tables and 10,000 sequences (each table's serial
key), on the system PostgreSQL 15. Issue 17 asks for a run under 1 s and under 2,000 series.

    python bench/health.py [--tables 10000] [--runs 7]

Each run is what the daemon does: a new session, then the whole job (plan; health has no steps).
The first run of a fresh database is reported apart (catalog caches cold). Side by side in the same
run: the one statement the issue suggested for sequence values (pg_sequences over all of them),
against the batched reads the job does (one catalog statement, then values in batches of
max_locks_per_transaction), and the statements the job runs, timed one by one.
The database is named health_bench_* and dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
from benchlib import connect, dsn, ensure_server, fmt_s, median, print_header, ratio, table
from prometheus_client import CollectorRegistry, generate_latest
from psycopg import sql

from pgupkeep import db
from pgupkeep.jobs import health
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.health import horizon, replication, sequences, tables
from pgupkeep.metrics import Metrics
from pgupkeep.policy import parse_policy
from pgupkeep.results import JobResult
from pgupkeep.runner import execute_job

CHUNK = 500


@contextlib.contextmanager
def scratch(keep: bool = False) -> Iterator[str]:
    name = f"health_bench_{secrets.token_hex(3)}"
    with connect() as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        if not keep:
            with connect() as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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
                "END LOOP; END $$"
            )
        c.execute("ANALYZE")
        count = c.execute("SELECT count(*) FROM pg_sequence").fetchone()[0]
    print(f"setup: {n} tables, {count} sequences in {time.perf_counter() - t0:.1f} s", flush=True)


def target_of(name: str):
    policy = parse_policy(f'version: 1\ntargets:\n  - name: bench\n    dsn: "{dsn(name)}"\n    health: {{}}\n')
    return policy, policy.targets[0]


def run_job(name: str) -> tuple[float, JobResult]:
    policy, target = target_of(name)
    t0 = time.perf_counter()
    with db.connect(target) as conn:
        ctx = JobContext(target=target, section=target.health, conn=conn, now=datetime.now(UTC), timezone=policy.daemon.zone)
        out = execute_job(health.KIND, ctx)
    took = time.perf_counter() - t0
    assert not out.errors, out.errors
    return took, JobResult("bench", "health", "success", took, time.time(), findings=tuple(out.findings), samples=tuple(out.samples))


def parts(name: str) -> dict[str, float]:
    """Each noun's read alone, on one session (warm), so the total can be attributed."""
    policy, target = target_of(name)
    section = target.health
    with db.connect(target) as conn:
        steps = {
            "basic checks (connections, xid age, indexes, size)": lambda: health.read(conn, section),
            "replication (3 statements)": lambda: replication.read(conn),
            "horizon (2 statements)": lambda: horizon.read(conn, section),
            "sequences (1 + batches)": lambda: sequences.read(conn),
            "tables (1 statement)": lambda: tables.read(conn, section),
        }
        out = {}
        for label, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            out[label] = time.perf_counter() - t0
    return out


def one_statement_sequences(name: str) -> float:
    """The issue's suggestion: every value in one statement (a new session, as a run has)."""
    with psycopg.connect(dsn(name), autocommit=True) as c:
        t0 = time.perf_counter()
        c.execute("SELECT count(last_value) FROM pg_sequences").fetchone()
        return time.perf_counter() - t0


def batched_sequences(name: str) -> float:
    _, target = target_of(name)
    with db.connect(target) as conn:
        t0 = time.perf_counter()
        sequences.read(conn)
        return time.perf_counter() - t0


def series(result: JobResult) -> tuple[int, int]:
    metrics = Metrics(CollectorRegistry())
    metrics.record(result)
    lines = [ln for ln in generate_latest(metrics.registry).decode().splitlines() if ln and not ln.startswith("#")]
    return len(result.samples), len([ln for ln in lines if 'target="bench"' in ln and "pgupkeep_job" not in ln])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the database (for poking around)")
    args = ap.parse_args()
    ensure_server()
    print_header(f"health job: {args.tables:,} tables and sequences")
    with scratch(args.keep) as name:
        setup(name, args.tables)
        first, _ = run_job(name)
        runs, seq_one, seq_batched = [], [], []
        result = None
        for _ in range(args.runs):  # interleaved, so each sees the same machine load
            took, result = run_job(name)
            runs.append(took)
            seq_one.append(one_statement_sequences(name))
            seq_batched.append(batched_sequences(name))
        assert result is not None
        samples, exposed = series(result)
        split = parts(name)
        with connect(name) as c:
            budget = int(c.execute("SHOW max_locks_per_transaction").fetchone()[0])
        batches = -(-args.tables // budget)

    print(table(
        ["measure", "value", "target", "verdict"],
        [
            ["health job, first run (cold caches)", fmt_s(first), "< 1 s", "met" if first < 1 else "NOT met"],
            [f"health job, median of {args.runs} (new session each)", fmt_s(median(runs)), "< 1 s",
             "met" if median(runs) < 1 else "NOT met"],
            ["health job, worst run", fmt_s(max(runs)), "< 1 s", "met" if max(runs) < 1 else "NOT met"],
            ["series from health (samples / exposed lines)", f"{samples} / {exposed}", "< 2,000",
             "met" if exposed < 2000 else "NOT met"],
            ["findings", str(len(result.findings)), "", ""],
        ],
    ))  # fmt: skip
    print()
    print(table(
        ["sequence values, new session", "median", "ratio to one statement"],
        [
            ["one statement (pg_sequences, the issue's suggestion)", fmt_s(median(seq_one)), "1.000"],
            [f"catalog statement + {batches} batches of {budget} (the job)", fmt_s(median(seq_batched)),
             ratio(median(seq_batched), median(seq_one))],
        ],
    ))  # fmt: skip
    print()
    print(table(["part (warm session)", "time"], [[k, fmt_s(v)] for k, v in split.items()]))


if __name__ == "__main__":
    main()
