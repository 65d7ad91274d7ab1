"""Shared plumbing for the side-by-side benchmarks: the system PostgreSQL 15, its peers' packages,
throwaway databases, statistics and the printed tables. Run by hand, never by the test suite.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

HOST = os.environ.get("BENCH_PGHOST", "127.0.0.1")
PORT = int(os.environ.get("BENCH_PGPORT", "5432"))
USER = os.environ.get("BENCH_PGUSER", "postgres")
CLUSTER = ("15", "main")  # Debian's cluster; pg_partman and postgres_exporter are packaged for it
PACKAGES = ("postgresql-15-partman", "prometheus-postgres-exporter")
REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def dsn(db: str = "postgres", **extra: str) -> str:
    return make_conninfo(host=HOST, port=PORT, user=USER, dbname=db, **extra)


def connect(db: str = "postgres", **extra: str) -> psycopg.Connection:
    return psycopg.connect(dsn(db, **extra), autocommit=True)


# --------------------------------------------------------------------------- environment


def ensure_packages() -> None:
    """Install the peers from Debian if missing (a background apt job may be at it already)."""
    missing = [p for p in PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    print(f"installing {' '.join(missing)} ...", flush=True)
    for _ in range(120):  # wait out another apt/dpkg run holding the lock
        r = subprocess.run(["apt-get", "install", "-y", *missing], capture_output=True, text=True)
        if r.returncode == 0:
            return
        if "lock" not in (r.stderr + r.stdout).lower():
            raise SystemExit(f"apt-get install failed:\n{r.stderr}")
        time.sleep(5)
    raise SystemExit("apt-get install: dpkg lock never freed")


def ensure_server() -> None:
    try:
        connect().close()
    except psycopg.OperationalError:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *CLUSTER, "start"], check=True)
        wait_server()


def wait_server(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect().close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def restart_server() -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *CLUSTER, "restart"], check=True)
    wait_server()


@contextlib.contextmanager
def server_settings(preload_pgss: bool = False, min_connections: int = 0, restore: bool = True) -> Iterator[None]:
    """Make the server fit the run (pg_stat_statements preloaded, enough connections) with one
    ALTER SYSTEM + restart, and put the old settings back (another restart) afterwards."""
    with connect() as c:
        preload = c.execute("SHOW shared_preload_libraries").fetchone()[0]
        maxconn = int(c.execute("SHOW max_connections").fetchone()[0])
    changes: dict[str, str] = {}
    if preload_pgss and "pg_stat_statements" not in preload:
        changes["shared_preload_libraries"] = ",".join(x for x in (preload, "pg_stat_statements") if x)
    if maxconn < min_connections:
        changes["max_connections"] = str(min_connections)
    if changes:
        print(f"server: ALTER SYSTEM {changes} + restart (restored at the end)", flush=True)
        with connect() as c:
            for k, v in changes.items():
                c.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(k), sql.Literal(v)))
        restart_server()
        if "shared_preload_libraries" in changes:
            with connect() as c:  # only known once the library is loaded; a reload applies it
                c.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
                c.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        if changes and restore:
            with connect() as c:
                for k in changes:
                    c.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(k)))
                if "shared_preload_libraries" in changes:
                    c.execute("ALTER SYSTEM RESET pg_stat_statements.track_planning")
            restart_server()
            print("server: settings restored", flush=True)


@contextlib.contextmanager
def scratch_database(name: str, keep: bool = False) -> Iterator[str]:
    """A dedicated database for one workload, dropped afterwards (never touches any other)."""
    assert name.startswith("bench_"), "bench databases are named bench_*"
    with connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        if not keep:
            with connect() as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    with connect() as c:
        out["PostgreSQL"] = c.execute("SELECT version()").fetchone()[0].split(" on ")[0]
    for pkg in PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
        out[pkg] = r.stdout.strip() or "missing"
    out["Python"] = platform.python_version()
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out["pgupkeep commit"] = r.stdout.strip()
    return out


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"nproc": str(os.cpu_count()), "memory": f"{mem_kb / 1024 / 1024:.1f} GiB", "cpu": model}


def print_header(title: str) -> None:
    print(f"\n## {title}\n", flush=True)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"command: {' '.join([Path(PYTHON).name, *sys.argv])}\n", flush=True)


# --------------------------------------------------------------------------- numbers


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fmt_s(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    if x < 0.01:
        return f"{x * 1000:.2f} ms"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    return f"{x:.2f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (the README pastes it as printed)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def which(cmd: str) -> str:
    path = shutil.which(cmd)
    if not path:
        raise SystemExit(f"{cmd} not found")
    return path
