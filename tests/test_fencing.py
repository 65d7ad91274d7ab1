"""Fencing and shutdown, seen from outside: real daemons, a real server, real sessions.

A run stops at a step boundary when its lease is lost or the daemon is asked to stop; the step in
flight is cancelled only past `shutdown_grace`; leases are released after every run returned; a
stopped run is `cancelled`, never an error.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest

from daemon_helpers import ActivitySampler, Daemon, wait_until, write_policy
from pgupkeep.db.lease import lease_key

VIEWS = ("v1", "v2", "v3", "v4")
# Every refresh of a view reads `nap()`, which sleeps for the seconds in `delay`: 0 while the
# views are created, then as long as the test wants each refresh to take.
SETUP = """
CREATE TABLE delay (s float8 NOT NULL);
INSERT INTO delay VALUES (0);
CREATE FUNCTION public.nap() RETURNS int LANGUAGE sql VOLATILE AS $$ SELECT 1 FROM pg_sleep((SELECT s FROM public.delay)) $$;
"""


def _slow_views(dsn: str, seconds: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SETUP)
        for v in VIEWS:
            c.execute(f"CREATE MATERIALIZED VIEW public.{v} AS SELECT public.nap() AS x")
        c.execute("UPDATE delay SET s = %s", (seconds,))


def _section() -> dict:
    # One group (one schedule): a run refreshes v1..v4 one after the other, a step each.
    return {"schedule": "every 1h", "views": [{"view": f"public.{v}", "concurrently": "never"} for v in VIEWS]}


def _refreshes(conn_or_dsn: psycopg.Connection | str) -> list[tuple[int, str, float]]:
    """REFRESH statements running now: (pid, view, query_start as server epoch)."""
    if isinstance(conn_or_dsn, str):
        with psycopg.connect(conn_or_dsn, autocommit=True) as c:
            return _refreshes(c)
    rows = conn_or_dsn.execute(
        "SELECT pid, query, extract(epoch FROM query_start)::float8 FROM pg_stat_activity "
        "WHERE datname = current_database() AND state = 'active' AND query LIKE 'REFRESH MATERIALIZED VIEW%%'"
    ).fetchall()
    return [(pid, query.split()[-1].strip('"').split('"."')[-1].strip('";'), start) for pid, query, start in rows]


class Watcher(ActivitySampler):
    """Every REFRESH it saw start (sampled every 50 ms)."""

    def __init__(self, dsn: str):
        super().__init__(dsn)
        self.seen: dict[tuple[int, float], str] = {}

    def sample(self, conn: psycopg.Connection) -> None:
        for pid, view, start in _refreshes(conn):
            self.seen.setdefault((pid, start), view)

    def started_after(self, epoch: float) -> list[str]:
        return sorted(view for (_, start), view in self.seen.items() if start > epoch)


def _server_now(dsn: str) -> float:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]


def _lease_sessions(dsn: str, target: str) -> list[int]:
    key = lease_key(target) & 0xFFFF_FFFF_FFFF_FFFF
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock' "
            "AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1",
            (key >> 32, key & 0xFFFF_FFFF),
        ).fetchall()
    return [r[0] for r in rows]


def test_sigterm_stops_at_a_step_cancels_the_one_in_flight_and_releases_leases_last(
    fresh_database: str, tmp_path: Path
) -> None:
    _slow_views(fresh_database, 4)
    config = write_policy(
        tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "materialized_views": _section()}], shutdown_grace="1s"
    )
    with Daemon(config) as d, Watcher(fresh_database) as watcher:
        d.start()
        wait_until(lambda: _refreshes(fresh_database), 20, "the first refresh to run")
        sent_at = _server_now(fresh_database)
        t0 = time.monotonic()
        d.send(signal.SIGTERM)
        assert d.wait(timeout=30) == 0
        took = time.monotonic() - t0
    assert took < 1 + 5, took
    # No refresh started after SIGTERM; the one in flight was cancelled past the grace.
    assert watcher.started_after(sent_at) == []
    assert [v for v in watcher.seen.values()] == ["v1"]
    finished = d.find("job_finished", job="materialized_views")
    assert [(e["outcome"], e.get("reason")) for e in finished] == [("cancelled", "shutdown")], finished
    assert "did not finish" not in str(finished) and "timeout" not in str(finished[0].get("error"))
    assert not [e for e in d.events if e["level"] == "error"], [e for e in d.events if e["level"] == "error"]
    events = [e["event"] for e in d.events]
    # Leases are released only once every run has returned.
    assert events.index("job_finished") < events.index("lease_released") < events.index("daemon_stopped")
    assert events[-1] == "daemon_stopped"
    assert _lease_sessions(fresh_database, "t") == []


def test_a_lost_lease_stops_the_run_at_its_next_step(fresh_database: str, tmp_path: Path) -> None:
    _slow_views(fresh_database, 2)
    config = write_policy(tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "materialized_views": _section()}])
    with Daemon(config) as d, Watcher(fresh_database) as watcher:
        d.start()
        wait_until(lambda: _refreshes(fresh_database), 20, "the first refresh to run")
        holders = _lease_sessions(fresh_database, "t")
        assert len(holders) == 1
        with psycopg.connect(fresh_database, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (holders[0],))
        killed_at = _server_now(fresh_database)
        finished = d.wait_event("job_finished", timeout=30, job="materialized_views")
        lost = d.wait_event("lease_lost", target="t")
        assert lost["level"] == "warning"
        # v1 was in flight and finishes; no later step starts without the lease.
        assert (finished["outcome"], finished.get("reason")) == ("cancelled", "lease_lost"), finished
        assert watcher.started_after(killed_at) == []
        assert sorted(watcher.seen.values()) == ["v1"]
        wait_until(lambda: d.value("pgupkeep_lease_changes_total", target="t", change="lost") == 1, 10, "the lost lease counted")
        assert d.stop() == 0


def _sleeps(dsn: str) -> list[tuple[int, float, int]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT pid, extract(epoch FROM query_start)::float8, client_port FROM pg_stat_activity "
            "WHERE datname = current_database() AND state = 'active' AND application_name = 'pgupkeep' "
            "AND query LIKE 'REFRESH%%'"
        ).fetchall()


@pytest.mark.slow
def test_two_replicas_never_write_at_once_under_idle_session_timeout(fresh_database: str, tmp_path: Path) -> None:
    # The database closes idle sessions after 2 s: the lease session idles between runs, and a
    # run's own session idles while its view refreshes on another. Each view takes 3 s, each is
    # due every second, and the leader's lease session is also killed twice on purpose.
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute(f"ALTER DATABASE {psycopg.conninfo.conninfo_to_dict(fresh_database)['dbname']} SET idle_session_timeout = '2s'")
    _slow_views(fresh_database, 0)
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("UPDATE delay SET s = 3")
    views = {"schedule": "every 1s", "views": [{"view": f"public.{v}", "concurrently": "never"} for v in VIEWS[:2]]}
    config = write_policy(tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "materialized_views": views}])
    # Within one replica a run refreshes its views one after the other and the next run of the
    # group never starts before it ends: two REFRESHes at once means two replicas writing.
    overlaps: list[list[tuple[int, float, int]]] = []
    with Daemon(config, name="a") as a, Daemon(config, name="b") as b:
        a.start()
        b.start()
        deadline = time.monotonic() + 20
        kills = 0
        next_kill = time.monotonic() + 5
        while time.monotonic() < deadline:
            running = _sleeps(fresh_database)
            if len(running) > 1:
                overlaps.append(running)
            if time.monotonic() > next_kill and kills < 2:
                for pid in _lease_sessions(fresh_database, "t"):
                    with psycopg.connect(fresh_database, autocommit=True) as c:
                        c.execute("SELECT pg_terminate_backend(%s)", (pid,))
                kills += 1
                next_kill = time.monotonic() + 6
            time.sleep(0.05)
        lost = a.find("lease_lost") + b.find("lease_lost")
        refreshed = a.find("matview_refreshed") + b.find("matview_refreshed")
        assert a.stop() == 0 and b.stop() == 0
    assert overlaps == [], overlaps[:3]
    assert len(lost) >= 1
    # Work went on: both replicas' refreshes together kept the views fresh.
    assert len(refreshed) >= 4
