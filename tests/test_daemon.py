"""The daemon as an operator runs it: schedules, leases across replicas, signals, HTTP and logs.

Each test starts `python -m pgupkeep run` against real PostgreSQL and watches it only from
outside (HTTP, stdout, exit code). Schedules are `every 1s` and every wait polls with a generous
deadline, so the tests hold on a busy two-core machine.
"""

from __future__ import annotations

import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

from daemon_helpers import LOG_KEYS, Daemon, wait_until, write_policy
from pgupkeep.metrics import METRIC_NAMES, PROCESS_METRIC_NAMES
from pgupkeep.policy import parse_policy
from pgupkeep.runner import Runner
from pgupkeep.schedules import parse_schedule

BERLIN = ZoneInfo("Europe/Berlin")
UTC_ZONE = ZoneInfo("UTC")
# A read-only job that needs nothing set up: the daemon tests are about the daemon, not the job.
JOB = "health"
EVERY_SECOND = {"schedule": "every 1s"}


def fires(schedule: str, start: datetime, count: int, tz: ZoneInfo = UTC_ZONE) -> list[datetime]:
    """The next `count` fire times after `start`, as the scheduler would chain them."""
    trigger = parse_schedule(schedule).trigger(tz)
    out: list[datetime] = []
    previous, now = None, start
    for _ in range(count):
        nxt = trigger.get_next_fire_time(previous, now)
        assert nxt is not None
        out.append(nxt.astimezone(UTC))
        previous, now = nxt, nxt
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("dow", ["0", "7", "sun"])
def test_cron_weekday_0_and_7_are_sunday(dow: str) -> None:
    # 2026-05-04 is a Monday.
    assert fires(f"0 12 * * {dow}", utc(2026, 5, 4), 3) == [utc(2026, 5, 10, 12), utc(2026, 5, 17, 12), utc(2026, 5, 24, 12)]


def test_cron_weekday_range_ending_in_7_covers_the_weekend() -> None:
    # 2026-05-04 is a Monday: "6-7" is Saturday and Sunday.
    assert fires("0 0 * * 6-7", utc(2026, 5, 4), 4) == [utc(2026, 5, 9), utc(2026, 5, 10), utc(2026, 5, 16), utc(2026, 5, 17)]


def test_cron_day_of_month_or_day_of_week() -> None:
    # Both restricted: cron fires on the 13th OR on Fridays. April 2026: Fridays 3, 10, 17, 24; the 13th is a Monday.
    assert fires("0 0 13 * 5", utc(2026, 4, 1), 5) == [
        utc(2026, 4, 3), utc(2026, 4, 10), utc(2026, 4, 13), utc(2026, 4, 17), utc(2026, 4, 24)
    ]  # fmt: skip
    # Only one restricted: no OR, just that field.
    assert fires("0 0 13 * *", utc(2026, 4, 1), 2) == [utc(2026, 4, 13), utc(2026, 5, 13)]


def test_cron_across_spring_forward_in_berlin_fires_once_that_day() -> None:
    # 2026-03-29 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist that day.
    got = fires("30 2 * * *", datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3, BERLIN)
    assert got == [utc(2026, 3, 29, 1, 30), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]


def test_cron_across_fall_back_in_berlin_never_repeats_and_never_stalls() -> None:
    # 2026-10-25 03:00 CEST falls back to 02:00 CET (01:00 UTC); 02:00-03:00 happens twice.
    # A wall-clock time fires once, and every fire time is later than the one before: APScheduler
    # 3's CronTrigger alone returns the same time again here, and its scheduler then spins.
    daily = fires("30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3, BERLIN)
    assert daily == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]
    hourly = fires("0 * * * *", datetime(2026, 10, 24, 23, 30, tzinfo=UTC), 5, BERLIN)
    assert hourly == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 2), utc(2026, 10, 25, 3), utc(2026, 10, 25, 4), utc(2026, 10, 25, 5)]
    quarter = fires("*/15 * * * *", datetime(2026, 10, 25, 0, 50, tzinfo=UTC), 4, BERLIN)
    assert quarter == [utc(2026, 10, 25, 2), utc(2026, 10, 25, 2, 15), utc(2026, 10, 25, 2, 30), utc(2026, 10, 25, 2, 45)]


def test_fall_back_never_stalls_the_scheduler_loop() -> None:
    # What APScheduler's Job._get_run_times does with a trigger: it must terminate.
    trigger = parse_schedule("0 * * * *").trigger(BERLIN)
    previous = utc(2026, 10, 25, 1).astimezone(BERLIN)  # 02:00 CET, the repeated hour
    now = previous + timedelta(minutes=5)
    run_times, nxt = [], previous
    while nxt is not None and nxt <= now and len(run_times) < 10:
        run_times.append(nxt)
        nxt = trigger.get_next_fire_time(nxt, now)
    assert len(run_times) == 1
    assert nxt.astimezone(UTC) == utc(2026, 10, 25, 2)


def test_every_30s_interval_counts_real_seconds_even_across_fall_back() -> None:
    trigger = parse_schedule("every 30s").trigger(BERLIN)
    previous = datetime(2026, 10, 25, 2, 59, 45, tzinfo=BERLIN)  # 15 s before clocks go back
    nxt = trigger.get_next_fire_time(previous, previous)
    assert nxt.astimezone(UTC) == previous.astimezone(UTC) + timedelta(seconds=30)
    # A run missed by minutes (daemon paused) is coalesced by the scheduler: the next fire time
    # after `previous` is still one period on, and the scheduler catches up from there.
    late = trigger.get_next_fire_time(previous, previous + timedelta(minutes=5))
    assert late.astimezone(UTC) == previous.astimezone(UTC) + timedelta(seconds=30)


# --------------------------------------------------------------------------- runner-level failure


def test_a_failing_job_becomes_a_failure_result_naming_the_target(pg_server, tmp_path: Path) -> None:
    name = pg_server.create_database("doomed")
    policy = parse_policy(
        f"version: 1\ntargets:\n  - name: doomed\n    dsn: '{pg_server.dsn(name)}'\n    health: {{}}\n",
        file="p.yaml",
    )
    seen = []
    runner = Runner(policy, sinks=[seen.append])
    first = runner.run("doomed", JOB)
    assert (first.outcome, first.error, first.target_up) == ("success", None, True)
    pg_server.drop_database(name)
    second = runner.run("doomed", JOB)
    assert (second.outcome, second.target, second.job, second.target_up) == ("failure", "doomed", JOB, False)
    assert name in second.error and "does not exist" in second.error
    assert seen == [first, second]


def test_a_job_that_raises_mid_run_is_a_failure_and_the_next_run_succeeds(database: str) -> None:
    """A session killed under the job (an exception out of the job itself) is one failed run."""
    policy = parse_policy(f"version: 1\ntargets:\n  - name: t\n    dsn: '{database}'\n    health: {{}}\n", file="p.yaml")
    kills = iter([True, False])

    def connect(target, **kw):
        conn = psycopg.connect(database, autocommit=True)
        if next(kills, False):
            with psycopg.connect(database, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        return conn

    runner = Runner(policy, connect=connect)
    failed = runner.run("t", JOB)
    assert failed.outcome == "failure" and failed.target_up is False
    assert "terminat" in failed.error or "closed" in failed.error or "server" in failed.error, failed.error
    assert runner.run("t", JOB).outcome == "success"
    assert runner.inflight() == 0


# --------------------------------------------------------------------------- the daemon


def _sessions(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgupkeep' AND datname = current_database()"
        ).fetchone()[0]


def test_http_endpoints_and_json_logs(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, JOB: EVERY_SECOND}])
    with Daemon(config) as d:
        d.start()
        d.wait_event("job_finished", target="shop", job=JOB, outcome="success")
        wait_until(lambda: d.value("pgupkeep_job_runs_total", target="shop", job=JOB, outcome="success"), 20, "a counted run")

        status, headers, body = d.get("/healthz")
        assert (status, body) == (200, "ok\n")
        status, headers, body = d.get("/readyz")
        assert (status, body) == (200, "ready\n")
        assert d.get("/nope")[0] == 404

        status, headers, body = d.get("/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        status, headers, om = d.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
        assert om.rstrip().endswith("# EOF")

        m = d.metrics()
        assert m[("pgupkeep_build_info", frozenset({("version", _version())}))] == 1
        assert m[("pgupkeep_policy_last_reload_successful", frozenset())] == 1
        assert abs(m[("pgupkeep_policy_last_reload_timestamp_seconds", frozenset())] - time.time()) < 120
        assert m[("pgupkeep_target_up", frozenset({("target", "shop")}))] == 1
        assert m[("pgupkeep_target_leader", frozenset({("target", "shop")}))] == 1
        assert m[("pgupkeep_job_duration_seconds_count", frozenset({("target", "shop"), ("job", JOB)}))] >= 1
        assert m[("pgupkeep_job_last_success_timestamp_seconds", frozenset({("target", "shop"), ("job", JOB)}))] > 0
        assert m[("pgupkeep_database_size_bytes", frozenset({("target", "shop")}))] > 0
        # Nothing but the documented families, and labels only from the policy.
        families = {re.sub(r"(_bucket|_count|_sum)$", "", name) for name, _ in m}
        known = METRIC_NAMES | PROCESS_METRIC_NAMES
        assert families <= known | {n.removesuffix("_total") for n in known}, families - known
        assert {v for name, labels in m for k, v in labels if k == "target"} == {"shop"}

        assert d.stop() == 0

    assert d.bad_lines == [], "every stdout line must be one JSON object"
    for e in d.events:
        assert all(k in e for k in LOG_KEYS), e
        assert list(e)[:3] == list(LOG_KEYS), e
        assert e["level"] in ("debug", "info", "warning", "error", "critical"), e
        stamp = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == timedelta(0), e
    events = [e["event"] for e in d.events]
    assert events[:2] == ["policy_loaded", "daemon_started"]
    assert events[-1] == "daemon_stopped"
    started = d.find("daemon_started")[0]
    assert (started["port"], started["targets"], started["jobs"]) == (d.port, 1, 1)
    runs = d.find("job_finished", target="shop", job=JOB)
    assert runs and all(r["outcome"] == "success" and r["duration_seconds"] >= 0 for r in runs)
    assert d.find("daemon_stopped")[0]["cancelled_jobs"] == 0


def _version() -> str:
    from pgupkeep import __version__

    return __version__


def test_a_failing_target_never_stops_the_others_and_hides_its_password(pg_server, database: str, tmp_path: Path) -> None:
    from pgupkeep.pgserver import free_port

    dead = f"postgresql://someone:s3cret-pw@127.0.0.1:{free_port()}/nowhere"
    config = write_policy(
        tmp_path / "p.yaml",
        [{"name": "good", "dsn": database, JOB: EVERY_SECOND}, {"name": "dead", "dsn": dead, JOB: EVERY_SECOND}],
    )
    with Daemon(config) as d:
        d.start()
        wait_until(lambda: (d.value("pgupkeep_job_runs_total", target="good", job=JOB, outcome="success") or 0) >= 3, 30, "3 good runs")
        wait_until(lambda: (d.value("pgupkeep_job_runs_total", target="dead", job=JOB, outcome="failure") or 0) >= 3, 30, "3 failed runs")
        assert d.value("pgupkeep_target_up", target="dead") == 0
        assert d.value("pgupkeep_target_up", target="good") == 1
        assert d.get("/healthz")[0] == 200 and d.running
        unreachable = d.wait_event("target_unreachable", target="dead")
        failed = d.wait_event("job_finished", target="dead", outcome="failure")
        assert failed["level"] == "error" and "127.0.0.1" in failed["error"]
        assert unreachable["error"] == failed["error"]
        assert d.stop() == 0
    text = "\n".join(d.lines + d.stderr)
    assert "s3cret-pw" not in text


def test_two_daemons_lead_each_target_once_and_the_survivor_takes_over_after_sigkill(database: str, tmp_path: Path) -> None:
    targets = [{"name": n, "dsn": database, JOB: EVERY_SECOND} for n in ("alpha", "beta")]
    config = write_policy(tmp_path / "p.yaml", targets)
    with Daemon(config, name="first") as first, Daemon(config, name="second") as second:
        first.start()
        wait_until(lambda: first.value("pgupkeep_target_leader", target="beta") == 1, 20, "first to lead beta")
        second.start()
        for name in ("alpha", "beta"):
            second.wait_event("job_finished", target=name, outcome="skipped", reason="not_leader")
        for name in ("alpha", "beta"):
            leaders = [d.value("pgupkeep_target_leader", target=name) for d in (first, second)]
            assert leaders == [1, 0], (name, leaders)
        assert second.value("pgupkeep_job_runs_total", target="alpha", job=JOB, outcome="success") is None

        first.kill()  # SIGKILL: no clean release, the server notices the dropped session
        killed_at = time.monotonic()
        for name in ("alpha", "beta"):
            wait_until(lambda n=name: second.value("pgupkeep_target_leader", target=n) == 1, 20, f"second to lead {name}")
        mark = second.mark()
        second.wait_event("job_finished", after=mark, target="alpha", outcome="success")
        # One schedule period (1 s), plus the time the server takes to reap the killed session.
        assert time.monotonic() - killed_at < 15
        assert second.stop() == 0
    assert _sessions(database) == 0


def test_sighup_with_a_broken_policy_keeps_the_old_one(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "one", "dsn": database, JOB: EVERY_SECOND}])
    good = config.read_text()
    with Daemon(config) as d:
        d.start()
        d.wait_event("job_finished", target="one", outcome="success")

        config.write_text(good.replace("every 1s", "every now and then") + "  bogus: 1\n")
        mark = d.mark()
        d.send(signal.SIGHUP)
        failed = d.wait_event("policy_reload_failed", after=mark)
        assert failed["level"] == "error" and failed["reason"] == "sighup"
        assert any("p.yaml:" in p and "targets[0].health.schedule" in p for p in failed["problems"]), failed
        assert any("targets[0].bogus: unknown key" in p for p in failed["problems"]), failed
        # /metrics is rendered at most about a second after a change.
        wait_until(lambda: d.value("pgupkeep_policy_last_reload_successful") == 0, 10, "the reload metric to drop")
        # The old policy keeps running.
        d.wait_event("job_finished", after=d.mark(), target="one", outcome="success")
        assert d.get("/readyz")[0] == 200

        config.write_text(good.replace("- name: one", "- name: two"))
        mark = d.mark()
        d.send(signal.SIGHUP)
        loaded = d.wait_event("policy_loaded", after=mark, reason="sighup")
        assert (loaded["targets"], loaded["jobs"]) == (1, 1)
        wait_until(lambda: d.value("pgupkeep_policy_last_reload_successful") == 1, 10, "the reload metric to rise")
        d.wait_event("job_finished", after=mark, target="two", outcome="success")
        # The target that left the policy leaves the metrics too.
        wait_until(lambda: d.value("pgupkeep_target_up", target="one") is None, 10, "target one's series to go")
        assert d.stop() == 0


def _slow_view(dsn: str, seconds: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP MATERIALIZED VIEW IF EXISTS slow_mv; DROP TABLE IF EXISTS knob")
        c.execute("CREATE TABLE knob (secs float8)")
        c.execute("INSERT INTO knob VALUES (%s)", (seconds,))
        c.execute(
            "CREATE OR REPLACE FUNCTION slow(secs float8) RETURNS int LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM pg_sleep(secs); RETURN 1; END$$"
        )
        c.execute("CREATE MATERIALIZED VIEW slow_mv AS SELECT slow(secs) AS x FROM knob WITH NO DATA")


def _refreshing(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as c:
        return bool(
            c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgupkeep' "
                "AND datname = current_database() AND state = 'active' AND query ILIKE 'REFRESH MATERIALIZED VIEW%%'"
            ).fetchone()[0]
        )


def _views() -> dict:
    return {
        "schedule": "every 1s",
        "views": [{"view": "public.slow_mv", "concurrently": "never", "timeout": "2m"}],
    }


def test_sigterm_with_a_job_in_flight_exits_0_within_the_grace(fresh_database: str, tmp_path: Path) -> None:
    _slow_view(fresh_database, 120)
    config = write_policy(
        tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "materialized_views": _views()}], shutdown_grace="2s"
    )
    with Daemon(config) as d:
        d.start()
        wait_until(lambda: _refreshing(fresh_database), 20, "the refresh to be running")
        t0 = time.monotonic()
        assert d.stop(timeout=30) == 0
        took = time.monotonic() - t0
    # The grace, then a server-side cancel and a short unwind; never the 120 s of the query.
    assert took < 2 + 8, took
    stopped = d.find("daemon_stopped")
    assert stopped and stopped[0]["cancelled_jobs"] == 1
    assert not _refreshing(fresh_database)
    assert _sessions(fresh_database) == 0


def test_sigterm_lets_a_short_job_finish_within_the_grace(fresh_database: str, tmp_path: Path) -> None:
    _slow_view(fresh_database, 3)
    config = write_policy(
        tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "materialized_views": _views()}], shutdown_grace="30s"
    )
    with Daemon(config) as d:
        d.start()
        wait_until(lambda: _refreshing(fresh_database), 20, "the refresh to be running")
        mark = d.mark()
        assert d.stop(timeout=40) == 0
    finished = d.wait_event("job_finished", after=mark, job="materialized_views")
    assert finished["outcome"] == "success", finished
    assert [e["event"] for e in d.events][-1] == "daemon_stopped"
    assert d.find("daemon_stopped")[0]["cancelled_jobs"] == 0
    with psycopg.connect(fresh_database) as c:
        assert c.execute("SELECT x FROM slow_mv").fetchall() == [(1,)]


def test_a_run_still_going_when_the_next_is_due_is_skipped_and_counted_never_queued(
    fresh_database: str, tmp_path: Path
) -> None:
    # A 4 s refresh on an `every 1s` schedule: the runs due meanwhile are skipped, not stacked up.
    _slow_view(fresh_database, 4)
    config = write_policy(tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "materialized_views": _views()}])
    with Daemon(config) as d:
        d.start()
        skipped = d.wait_event("job_skipped", timeout=30, target="t", job="materialized_views")
        assert skipped["reason"] == "overrun"
        d.wait_event("job_finished", timeout=30, target="t", job="materialized_views", outcome="success")
        wait_until(
            lambda: (d.value("pgupkeep_job_skipped_overrun_total", target="t", job="materialized_views") or 0) >= 2,
            30,
            "overruns to be counted",
        )
        assert (d.value("pgupkeep_job_runs_total", target="t", job="materialized_views", outcome="skipped") or 0) >= 2
        # Never two refreshes of the view at once, and no backlog replayed after the slow one.
        with psycopg.connect(fresh_database, autocommit=True) as c:
            running = c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgupkeep' "
                "AND query ILIKE 'REFRESH MATERIALIZED VIEW%%' AND state = 'active'"
            ).fetchone()[0]
        assert running <= 1
        assert d.stop() == 0
