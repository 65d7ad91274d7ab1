"""A fleet from one policy: one server with many databases, one discovering target, 1 and 3 replicas.

    python bench/fleet.py [--databases 100 300 1000] [--idle 60] [--replicas 3]

Runs by hand, never in the test suite. It starts a throwaway PostgreSQL (the one the tests use),
makes N databases from a template holding 5 partitioned tables (monthly, 3 premade), and runs
`pgupkeep run` with one target discovering them: long_running_queries every 30s, health every 1m,
bloat every 1h, partitions every 1h on the 5 tables, discovery every 30s. For each N it reports:

- time until one replica leads every database, then over an idle window: RSS, CPU share of a core,
  connections held to the server (sampled), missed and overrun runs;
- time until a database created mid-run is reporting (its first successful run);
- with 3 replicas: each one's share of the leases, and after SIGKILL of one, the time until the
  survivors lead every database again.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon_helpers import Daemon, wait_until, write_policy  # noqa: E402
from pgupkeep import __version__  # noqa: E402
from pgupkeep.pgserver import start_server  # noqa: E402

TEMPLATE = "fleet_template"
TABLES = 5
SEED = """
CREATE TABLE public.events_{i} (id bigint NOT NULL, created_at timestamptz NOT NULL, payload text)
    PARTITION BY RANGE (created_at);
"""


def _month(offset: int) -> str:
    t = time.gmtime()
    y, m = t.tm_year, t.tm_mon - 1 + offset
    return f"{y + m // 12:04d}-{m % 12 + 1:02d}-01"


def make_template(admin: str) -> None:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    with psycopg.connect(admin.replace("dbname=postgres", f"dbname={TEMPLATE}"), autocommit=True) as c:
        for i in range(TABLES):
            c.execute(SEED.format(i=i))
            for k in range(-1, 5):  # last month .. 4 ahead: nothing to create in steady state
                c.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier("public", f"events_{i}_{_month(k)[:7].replace('-', '_')}"),
                        sql.Identifier("public", f"events_{i}"),
                        sql.Literal(_month(k)),
                        sql.Literal(_month(k + 1)),
                    )
                )


def make_databases(admin: str, names: list[str]) -> None:
    with psycopg.connect(admin, autocommit=True) as c:
        have = {r[0] for r in c.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in have:
                c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))


def policy(path: Path, admin: str) -> Path:
    tables = [{"table": f"public.events_{i}", "interval": "monthly", "premake": 3} for i in range(TABLES)]
    target = {
        "name": "fleet",
        "dsn": admin,
        "discover": {"include": ["tenant_*"], "every": "30s"},
        "long_running_queries": {"schedule": "every 30s"},
        "health": {"schedule": "every 1m"},
        "bloat": {"schedule": "every 1h"},
        "partitions": {"schedule": "every 1h", "tables": tables},
    }
    return write_policy(path, [target], shutdown_grace="5s", misfire_grace="30s")


def connections(admin: str) -> int:
    with psycopg.connect(admin, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgupkeep'").fetchone()[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def leading(d: Daemon) -> float:
    return d.value("pgupkeep_targets", state="leading") or 0.0


def total(d: Daemon, name: str) -> float:
    return sum(v for (n, _), v in d.metrics().items() if n == name)


def runs_of(d: Daemon, job: str) -> float:
    """Runs of one job over every target, whatever their outcome."""
    return sum(v for (n, labels), v in d.metrics().items() if n == "pgupkeep_job_runs_total" and ("job", job) in labels)


def one_size(admin: str, n: int, idle: float, replicas: int, workdir: Path) -> None:
    names = [f"tenant_{i:04d}" for i in range(n)]
    t0 = time.monotonic()
    make_databases(admin, names)
    print(f"\n== {n} databases (made in {time.monotonic() - t0:.0f}s)", flush=True)
    config = policy(workdir / "p.yaml", admin)
    with Daemon(config, name="r1") as r1:
        started = time.monotonic()
        r1.start(timeout=120)
        wait_until(lambda: leading(r1) >= n, 900, f"one replica to lead {n} databases", every=1)
        print(f"leads all {n} after {time.monotonic() - started:.0f}s", flush=True)
        assert r1.proc is not None
        pid = r1.proc.pid
        # Warm-up: every database's first health run (every 1m). Runs of one schedule are spread
        # over its period, the hourly bloat and partitions runs too (about one every 3.6 s a job
        # at 1,000 databases), so the idle window that follows sees the steady state.
        cpu_w, t_w = cpu_seconds(pid), time.monotonic()
        wait_until(lambda: min(runs_of(r1, job) for job in ("health", "long_running_queries")) >= n, 900,
                   "every database's first runs", every=1)
        print(f"warm-up (every database's first health run) ended {time.monotonic() - started:.0f}s after the start, "
              f"CPU {(cpu_seconds(pid) - cpu_w) / (time.monotonic() - t_w) * 100:.0f}% of a core meanwhile, "
              f"RSS {rss_mb(pid):.0f} MB", flush=True)
        cpu0, t_idle, rss, conns = cpu_seconds(pid), time.monotonic(), [], []
        while time.monotonic() - t_idle < idle:
            rss.append(rss_mb(pid))
            conns.append(connections(admin))
            time.sleep(2)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t_idle)
        missed, overrun = total(r1, "pgupkeep_job_missed_total"), total(r1, "pgupkeep_job_skipped_overrun_total")
        print(
            f"idle {idle:.0f}s: RSS max {max(rss):.0f} MB (end {rss[-1]:.0f}), CPU {cpu * 100:.1f}% of a core, "
            f"connections held min {min(conns)} / median {statistics.median(conns):.0f} / max {max(conns)}, "
            f"missed {missed:.0f}, overrun {overrun:.0f}",
            flush=True,
        )
        fresh = f"tenant_new_{n}"
        mark = r1.mark()
        made = time.monotonic()
        make_databases(admin, [fresh])
        r1.wait_event("job_finished", timeout=300, after=mark, target=f"fleet/{fresh}", outcome="success")
        print(f"a database created mid-run reported after {time.monotonic() - made:.1f}s (discovery every 30s)", flush=True)
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(fresh)))
        if replicas > 1:
            others = [Daemon(config, name=f"r{k}") for k in range(2, replicas + 1)]
            try:
                for d in others:
                    d.start(timeout=120)
                everyone = [r1, *others]
                share = -(-n // replicas)

                def balanced() -> bool:
                    counts = [leading(d) for d in everyone]
                    return sum(counts) == n and max(counts) <= share

                t_bal = time.monotonic()
                wait_until(balanced, 900, f"{replicas} replicas to share {n} databases", every=1)
                counts = [int(leading(d)) for d in everyone]
                spread = max(abs(c - n / replicas) / (n / replicas) for c in counts)
                print(f"{replicas} replicas: shares {counts} after {time.monotonic() - t_bal:.0f}s "
                      f"(largest deviation from a third {spread * 100:.1f}%)", flush=True)
                victim = others[-1]
                victim.kill()
                killed = time.monotonic()
                survivors = [d for d in everyone if d is not victim]
                wait_until(lambda: sum(leading(d) for d in survivors) >= n, 900, "the survivors to lead all", every=0.5)
                print(f"after SIGKILL of one replica, all {n} led again after {time.monotonic() - killed:.1f}s", flush=True)
            finally:
                for d in others:
                    if d.running:
                        d.stop()
        r1.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--databases", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--idle", type=float, default=60)
    ap.add_argument("--replicas", type=int, default=3)
    args = ap.parse_args()
    server = start_server(settings={"max_connections": "500", "shared_buffers": "256MB", "max_locks_per_transaction": "256"})
    try:
        admin = server.dsn("postgres")
        with psycopg.connect(admin) as c:
            version = c.execute("SHOW server_version").fetchone()[0]
        print(f"pgupkeep {__version__}, PostgreSQL {version}, Python {platform.python_version()}, "
              f"{platform.platform()}, {os.cpu_count()} cores")
        make_template(admin)
        for n in sorted(args.databases):
            with tempfile.TemporaryDirectory() as tmp:
                one_size(admin, n, args.idle, args.replicas, Path(tmp))
    finally:
        server.remove()


if __name__ == "__main__":
    main()
