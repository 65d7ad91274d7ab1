"""A fleet from one policy: discovery of a server's databases, shared lease sessions, replicas that
share the work. Real servers, real daemons."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from daemon_helpers import REPO, Daemon, wait_until, write_policy
from pgupkeep import fleet
from pgupkeep.db.lease import PRESENCE_CLASS
from pgupkeep.policy import parse_policy
from pgupkeep.scheduler import phase


def _policy(dsn: str, **discover: object):
    return parse_policy(
        f"""
version: 1
targets:
  - name: shop
    dsn: "{dsn}"
    discover: {json.dumps(discover)}
    health: {{}}
"""
    )


def test_include_exclude_and_explicit_targets_win() -> None:
    policy = _policy("host=db1 port=5432 user=u", include=["tenant_*", "shared"], exclude=["tenant_old*"])
    parent = policy.targets[0]
    rows = [
        ("postgres", True, True),
        ("tenant_a", True, True),
        ("tenant_b", True, True),
        ("tenant_old1", True, True),
        ("shared", True, True),
        ("tenant_closed", False, True),
        ("tenant_private", True, False),
    ]
    explicit = parse_policy(
        'version: 1\ntargets:\n  - {name: b, dsn: "host=db1 port=5432 dbname=tenant_b"}\n'
        '  - {name: other, dsn: "host=db2 port=5432 dbname=tenant_a"}\n'
    ).targets
    found = fleet.judge(parent, rows, explicit)
    # tenant_b has a target of its own on the same server; tenant_a on another server does not count.
    assert found.databases == ("tenant_a", "shared")
    assert set(found.skipped) == {"tenant_closed", "tenant_private"}
    assert "datallowconn" in found.skipped["tenant_closed"]
    assert "GRANT CONNECT" in found.skipped["tenant_private"]
    expanded = fleet.expand(policy, {"shop": found})
    assert [t.name for t in expanded.targets] == ["shop/tenant_a", "shop/shared"]
    a = expanded.targets[0]
    assert "dbname=tenant_a" in a.dsn and a.health is not None and a.discover is None
    # Discovery and the shared leases connect to `postgres` unless the DSN names a database.
    assert "dbname=postgres" in fleet.discovery_dsn(parent)


def test_runs_of_a_fleet_spread_over_their_period_the_same_on_every_replica() -> None:
    phases = [phase(f"shop/tenant_{i}:health") for i in range(1000)]
    assert phases == [phase(f"shop/tenant_{i}:health") for i in range(1000)]
    # Roughly uniform: every tenth of the period holds about a tenth of the runs.
    buckets = [sum(1 for p in phases if k / 10 <= p < (k + 1) / 10) for k in range(10)]
    assert min(buckets) > 60 and max(buckets) < 140, buckets


@pytest.fixture
def server_dbs(pg_server) -> Iterator[tuple[str, list[str]]]:
    """A prefix and the databases a test made on the session's server (dropped after)."""
    prefix = f"fl{secrets.token_hex(3)}"
    made: list[str] = []
    yield prefix, made
    with pg_server.admin() as c:
        for name in made:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _create(pg_server, made: list[str], name: str) -> None:
    with pg_server.admin() as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    made.append(name)


def _drop(pg_server, made: list[str], name: str) -> None:
    with pg_server.admin() as c:
        c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    made.remove(name)


def test_databases_created_and_dropped_are_picked_up_and_let_go(pg_server, server_dbs, tmp_path: Path) -> None:
    prefix, made = server_dbs
    for n in ("a", "b"):
        _create(pg_server, made, f"{prefix}_{n}")
    _create(pg_server, made, f"{prefix}_closed")
    with pg_server.admin() as c:
        c.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(f"{prefix}_closed")))
    target = {
        "name": "shop",
        "dsn": pg_server.admin_dsn,
        "discover": {"include": [f"{prefix}_*"], "every": "1s"},
        "health": {"schedule": "every 1s"},
    }
    config = write_policy(tmp_path / "p.yaml", [target])
    with Daemon(config) as d:
        d.start()
        first = d.wait_event("targets_discovered", target="shop")
        assert first["added"] == [f"shop/{prefix}_a", f"shop/{prefix}_b"]
        skipped = d.wait_event("database_skipped", target="shop", database=f"{prefix}_closed")
        assert "datallowconn" in skipped["reason"]
        for n in ("a", "b"):
            d.wait_event("job_finished", target=f"shop/{prefix}_{n}", job="health", outcome="success")
        wait_until(lambda: d.value("pgupkeep_database_size_bytes", target=f"shop/{prefix}_a"), 10, "a's gauges")

        mark = d.mark()
        _create(pg_server, made, f"{prefix}_c")
        added = d.wait_event("targets_discovered", after=mark, target="shop")
        assert added["added"] == [f"shop/{prefix}_c"] and added["removed"] == []
        d.wait_event("job_finished", after=mark, target=f"shop/{prefix}_c", job="health", outcome="success")

        mark = d.mark()
        _drop(pg_server, made, f"{prefix}_a")
        removed = d.wait_event("targets_discovered", after=mark, target="shop")
        assert removed["removed"] == [f"shop/{prefix}_a"]
        wait_until(lambda: d.value("pgupkeep_database_size_bytes", target=f"shop/{prefix}_a") is None, 10, "a's gauges to go")
        wait_until(lambda: d.value("pgupkeep_targets", state="leading") == 2, 10, "two databases led")
        # The database that takes no connections was reported once, not at every discovery.
        assert len(d.find("database_skipped", database=f"{prefix}_closed")) == 1
        assert d.stop() == 0


def test_no_connect_privilege_is_skipped_and_once_addresses_one_database(pg_server, server_dbs, tmp_path: Path) -> None:
    prefix, made = server_dbs
    role = f"{prefix}_role"
    for n in ("open", "private"):
        _create(pg_server, made, f"{prefix}_{n}")
    with pg_server.admin() as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        c.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(f"{prefix}_private")))
    try:
        params = psycopg.conninfo.conninfo_to_dict(pg_server.admin_dsn) | {"user": role}
        dsn = psycopg.conninfo.make_conninfo(**params)
        config = write_policy(tmp_path / "p.yaml", [{
            "name": "shop", "dsn": dsn, "discover": {"include": [f"{prefix}_*"]}, "health": {},
        }])  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-m", "pgupkeep", "once", "--config", str(config), "--target", f"shop/{prefix}_open", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "PGUPKEEP_TEST_PORT": "0"},
        )
        assert out.returncode == 0, out.stderr
        results = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["target"], r["job"], r["outcome"]) for r in results] == [(f"shop/{prefix}_open", "health", "success")]
        plan = subprocess.run(
            [sys.executable, "-m", "pgupkeep", "plan", "--config", str(config), "--target", "shop", "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "PGUPKEEP_TEST_PORT": "0"},
        )
        assert plan.returncode == 0, plan.stderr
        # The database this role may not connect to is no target: never an error at every run.
        assert [json.loads(line)["target"] for line in plan.stdout.splitlines()] == [f"shop/{prefix}_open"]
    finally:
        with pg_server.admin() as c:
            for name in list(made):
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                made.remove(name)
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _leaders(d: Daemon, names: list[str]) -> dict[str, float]:
    m = d.metrics()
    return {n: m.get(("pgupkeep_target_leader", frozenset({("target", n)})), 0.0) for n in names}


@pytest.mark.slow
def test_two_replicas_share_twenty_databases_and_the_survivor_takes_all(pg_server, server_dbs, tmp_path: Path) -> None:
    prefix, made = server_dbs
    for i in range(20):
        _create(pg_server, made, f"{prefix}_{i:02d}")
    names = [f"shop/{prefix}_{i:02d}" for i in range(20)]
    target = {
        "name": "shop",
        "dsn": pg_server.admin_dsn,
        "discover": {"include": [f"{prefix}_*"], "every": "3s"},
        "health": {"schedule": "every 2s"},
    }
    config = write_policy(tmp_path / "p.yaml", [target])
    double: list[str] = []

    def watch(until: float, a: Daemon, b: Daemon) -> None:
        while time.monotonic() < until:
            first, other, again = _leaders(a, names), _leaders(b, names), _leaders(a, names)
            # Led by both only if `a` led it before and after `b` was read.
            double.extend(n for n in names if first[n] == 1 and other[n] == 1 and again[n] == 1)
            time.sleep(0.1)

    with Daemon(config, name="a") as a, Daemon(config, name="b") as b:
        a.start()
        b.start()

        def balanced() -> bool:
            la, lb = _leaders(a, names), _leaders(b, names)
            led = [la[n] + lb[n] for n in names]
            return all(x == 1 for x in led) and abs(sum(la.values()) - sum(lb.values())) <= 1

        wait_until(balanced, 60, "every database led once, the two shares within one")
        watch(time.monotonic() + 8, a, b)
        assert balanced()
        # One lease session per server per replica, plus the runs in flight.
        with pg_server.admin() as c:
            lease_sessions = c.execute(
                "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
                "AND classid = %s::bigint::oid",
                (PRESENCE_CLASS,),
            ).fetchone()[0]
        assert lease_sessions == 2, lease_sessions

        b.kill()
        killed = time.monotonic()
        wait_until(lambda: all(v == 1 for v in _leaders(a, names).values()), 30, "a to lead all 20")
        assert time.monotonic() - killed < 3 + 4  # one discovery period, and slack for a busy machine
        assert a.value("pgupkeep_targets", state="leading") == 20
        assert a.stop() == 0
    assert double == []
