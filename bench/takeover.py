"""How long until another replica leads after the leader's host vanishes (run by hand, as root).

A vanished host answers nothing: not even the TCP keepalive probes its kernel would answer for a
process that is merely stopped. This benchmark makes one: two daemons lead and follow on a
throwaway server; the leader is frozen (SIGSTOP) and every packet of its lease session is dropped
on loopback with iptables (both directions). It measures, on the follower, the time until
`pgupkeep_target_leader` is 1, and until a run of the follower succeeds.

    python bench/takeover.py [--runs 3]

Needs root and iptables (Debian: apt-get install iptables); the rules are removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon_helpers import Daemon, wait_until, write_policy  # noqa: E402
from pgupkeep import __version__  # noqa: E402
from pgupkeep.db.lease import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, lease_key  # noqa: E402
from pgupkeep.pgserver import start_server  # noqa: E402


def lease_port(dsn: str, target: str) -> int:
    key = lease_key(target) & 0xFFFF_FFFF_FFFF_FFFF
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::bigint::oid "
            "AND l.objid = %s::bigint::oid AND l.objsubid = 1",
            (key >> 32, key & 0xFFFF_FFFF),
        ).fetchone()
    assert row, "no lease held"
    return int(row[0])


@contextlib.contextmanager
def dropped(port: int):
    rules = [["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port)], ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port)]]
    for r in rules:
        subprocess.run(["iptables", "-I", *r, "-j", "DROP"], check=True)
    try:
        yield
    finally:
        for r in rules:
            subprocess.run(["iptables", "-D", *r, "-j", "DROP"], check=False)


def one_run(dsn: str, workdir: Path) -> tuple[float, float]:
    config = write_policy(workdir / "p.yaml", [{"name": "t", "dsn": dsn, "health": {"schedule": "every 1s"}}])
    with Daemon(config, name="leader") as leader, Daemon(config, name="follower") as follower:
        leader.start()
        wait_until(lambda: leader.value("pgupkeep_target_leader", target="t") == 1, 30, "the first daemon to lead")
        follower.start()
        follower.wait_event("job_finished", target="t", outcome="skipped", reason="not_leader")
        port = lease_port(dsn, "t")
        assert leader.proc is not None
        with dropped(port):
            os.kill(leader.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            wait_until(lambda: follower.value("pgupkeep_target_leader", target="t") == 1, 600, "the follower to lead", every=0.1)
            leads = time.monotonic() - t0
            mark = follower.mark()
            follower.wait_event("job_finished", after=mark, target="t", outcome="success", timeout=60)
            runs = time.monotonic() - t0
            leader.kill()
        follower.stop()
    return leads, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    server = start_server()
    try:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
            version = c.execute("SHOW server_version").fetchone()[0]
            c.execute("CREATE DATABASE takeover")
        print(f"pgupkeep {__version__}, PostgreSQL {version}, {platform.platform()}, {os.cpu_count()} cores")
        print(f"lease keepalives: idle {KEEPALIVE_IDLE}s, interval {KEEPALIVE_INTERVAL}s, count {KEEPALIVE_COUNT}; health every 1s")
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                leads, runs = one_run(server.dsn("takeover"), Path(tmp))
            print(f"run {i + 1}: follower leads after {leads:.1f}s, first successful run after {runs:.1f}s", flush=True)
    finally:
        server.remove()


if __name__ == "__main__":
    main()
