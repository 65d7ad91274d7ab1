"""Daemon footprint: RSS and CPU of an idle `pgupkeep run` with 10 and 100 targets (databases in
one server), and start-up time to ready (/readyz answers 200).

    python bench/footprint.py [--targets 10 100] [--starts 5] [--idle 60]

Each target has the monitoring jobs on their usual schedules (long_running_queries every 30s,
health every 1m, bloat every 1h), so "idle" is the daemon's routine: nothing to fix, jobs still
running on schedule. The daemon holds one lease connection per target, so the script raises
max_connections if needed (ALTER SYSTEM + restart, restored at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchlib import (
    PYTHON,
    REPO,
    connect,
    dsn,
    ensure_server,
    fmt_s,
    median,
    print_header,
    server_settings,
    table,
)
from monitoring import http_get
from psycopg import sql

PORT = 19189
JOBS = ("long_running_queries", "bloat", "health")


def database_names(n: int) -> list[str]:
    return [f"bench_fp_{i:03d}" for i in range(1, n + 1)]


@contextlib.contextmanager
def databases(n: int) -> Iterator[list[str]]:
    names = database_names(n)
    with connect() as c:
        for name in names:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield names
    finally:
        with connect() as c:
            for name in names:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def policy(names: list[str]) -> str:
    targets = "\n".join(
        f"""  - name: {name.replace("bench_", "")}
    dsn: "{dsn(name)}"
    long_running_queries: {{schedule: "every 30s"}}
    health: {{schedule: "every 1m"}}
    bloat: {{schedule: "every 1h"}}"""
        for name in names
    )
    return f"""version: 1
daemon: {{listen: "127.0.0.1:{PORT}", log_format: json, log_level: warning}}
targets:
{targets}
"""


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure (VmRSS and VmHWM in kB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def start(config: Path, log: Path) -> tuple[subprocess.Popen, float]:
    """Start the daemon; seconds until /readyz says 200."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([PYTHON, "-m", "pgupkeep", "run", "--config", str(config)], cwd=REPO, stdout=out, stderr=out)
    while True:
        try:
            status, _ = http_get(PORT, "/readyz", timeout=5)
            if status == 200:
                return proc, time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-20:])
            raise SystemExit(f"daemon exited with {proc.returncode}:\n{tail}")
        time.sleep(0.005)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def all_reported(n: int) -> bool:
    status, body = http_get(PORT)
    lines = [x for x in body.decode().splitlines() if x.startswith("pgupkeep_job_last_success_timestamp_seconds{")]
    return status == 200 and len(lines) >= n * len(JOBS)


def bench(names: list[str], starts: int, idle: float, workdir: Path) -> list[str]:
    n = len(names)
    config = workdir / f"footprint-{n}.yaml"
    config.write_text(policy(names))
    log = workdir / f"daemon-{n}.log"
    ready = []
    for _ in range(starts - 1):
        proc, t = start(config, log)
        ready.append(t)
        stop(proc)
    proc, t = start(config, log)
    ready.append(t)
    try:
        t0 = time.perf_counter()
        while not all_reported(n):  # the start-up round of every job on every target
            if time.perf_counter() - t0 > 300:
                raise SystemExit(f"not every job reported within 300 s: see {log}")
            time.sleep(0.5)
        first_round = time.perf_counter() - t0 + t
        time.sleep(5)  # let the start-up round's stragglers settle
        cpu0, w0 = proc_cpu(proc.pid), time.perf_counter()
        time.sleep(idle)
        cpu = (proc_cpu(proc.pid) - cpu0) / (time.perf_counter() - w0)
        rss, hwm = proc_status(proc.pid, "VmRSS") / 1024, proc_status(proc.pid, "VmHWM") / 1024
        threads = proc_status(proc.pid, "Threads")
    finally:
        stop(proc)
    print(f"  {n} targets: ready {[round(x, 3) for x in ready]}", flush=True)
    return [f"{n}", f"{rss:.1f} MiB", f"{hwm:.1f} MiB", f"{cpu * 100:.2f} %", fmt_s(median(ready)), fmt_s(max(ready)),
            fmt_s(first_round), str(threads)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--no-restore", action="store_true")
    args = ap.parse_args()
    ensure_server()
    rows = []
    need = max(args.targets) + 50  # lease connections + job sessions + everyone else
    with server_settings(min_connections=need, restore=not args.no_restore), tempfile.TemporaryDirectory() as tmp:
        print_header("Daemon footprint")
        with databases(max(args.targets)) as names:
            for n in args.targets:
                rows.append(bench(names[:n], args.starts, args.idle, Path(tmp)))
    print(f"\nidle = {args.idle:.0f} s after the start-up round; CPU = (utime+stime)/wall of the daemon process; "
          f"ready = start to /readyz 200, median of {args.starts}\n")
    print(table(["targets", "RSS", "peak RSS (VmHWM)", "CPU (one core)", "start-up to ready (median)", "(worst)",
                 "first round of every job done", "threads"], rows), flush=True)


if __name__ == "__main__":
    main()
