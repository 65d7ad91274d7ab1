"""The `sql` job against a real PostgreSQL: batching, lock budgets, autocommit statements,
parameters, plan and EXPLAIN, `check`; and through real daemons: overrun, shutdown between
batches, two replicas, metrics."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

from daemon_helpers import REPO, SECONDS, ActivitySampler, Daemon, wait_until, write_policy
from pgupkeep import db
from pgupkeep.jobs import sql as sql_kind
from pgupkeep.jobs.base import JobContext
from pgupkeep.policy import PolicyError, Target, parse_policy
from pgupkeep.results import Action, ItemError, JobOutput, Sample
from pgupkeep.runner import Runner, execute_job
from pgupkeep.scheduler import planned_jobs
from pgupkeep.sqltext import SqlTextError, read_statement
from test_runner import standby  # noqa: F401  (the fixture: a streaming standby of the test server)

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
# A nap inside a statement makes each batch's transaction last long enough to be seen from outside.
NAP = "CREATE FUNCTION app.nap(s float8) RETURNS boolean LANGUAGE sql VOLATILE AS $$ SELECT true FROM pg_sleep(s) $$"




def target_for(dsn: str, jobs: list[dict], **session: object) -> Target:
    text = json.dumps(
        {
            "version": 1,
            "targets": [{"name": "t", "dsn": "${DSN}", "lock_timeout": "200ms", "lock_retries": 2, **session, "sql": {"jobs": jobs}}],
        }
    )
    return parse_policy(text, environ={"DSN": dsn}).targets[0]


def run_job(target: Target, *, apply: bool = True, items: tuple[str, ...] | None = None, memo: dict | None = None) -> JobOutput:
    with db.connect(target) as c:
        ctx = JobContext(
            target=target,
            section=target.sql,
            conn=c,
            now=NOW,
            timezone=ZoneInfo("UTC"),
            apply=apply,
            items=items,
            memo={} if memo is None else memo,
            connect=lambda **kw: db.connect(target, **kw),
        )
        return execute_job(sql_kind.KIND, ctx)


def ran(name: str, sql: str, rows: int | None, per_batch: list[int | None], *, applied: bool = True,
        outcome: str = "success", transaction: bool = True, **extra: object) -> Action:
    detail = {
        "name": name, "outcome": outcome, "rows": rows, "batches": len(per_batch), "rows_per_batch": per_batch,
        "duration_seconds": SECONDS, "transaction": transaction, **extra,
    }  # fmt: skip
    return Action("run_sql", name, sql, applied, detail)


@pytest.fixture
def app(database: str) -> Iterator[psycopg.Connection]:
    """A clean `app` schema in the module's database."""
    with psycopg.connect(database, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS app CASCADE")
        c.execute("CREATE SCHEMA app")
        c.execute(NAP)
        yield c


class XactWatch(ActivitySampler):
    """Every transaction of pgupkeep's sessions running a statement that starts with `prefix`, with
    the oldest age it was seen at (sampled every 10 ms)."""

    every = 0.01

    def __init__(self, dsn: str, prefix: str):
        super().__init__(dsn)
        self.prefix = prefix
        self.seen: dict[tuple[int, datetime], float] = {}

    def sample(self, conn: psycopg.Connection) -> None:
        for pid, start, age in conn.execute(
            "SELECT pid, xact_start, extract(epoch FROM clock_timestamp() - xact_start)::float8 "
            "FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'pgupkeep' "
            "AND xact_start IS NOT NULL AND query LIKE %s",
            (self.prefix + "%",),
        ).fetchall():
            self.seen[(pid, start)] = max(age, self.seen.get((pid, start), 0.0))


# --------------------------------------------------------------------------- reading the SQL (pure)


@pytest.mark.parametrize(
    "text, statement",
    [
        ("SELECT 1", "SELECT 1"),
        ("DELETE FROM t WHERE a = ';' ;  -- done\n", "DELETE FROM t WHERE a = ';'"),
        ("SELECT $$ a; b $$, $x$ $$; $x$", "SELECT $$ a; b $$, $x$ $$; $x$"),
        ("SELECT E'it\\'s; fine', 'it''s; fine'", "SELECT E'it\\'s; fine', 'it''s; fine'"),
        ('SELECT "a;b" FROM t /* x; /* nested; */ y; */', 'SELECT "a;b" FROM t /* x; /* nested; */ y; */'),
        ("SELECT a$1 FROM t", "SELECT a$1 FROM t"),  # $ inside an identifier is no parameter
    ],
)
def test_one_statement_is_read_past_quotes_dollar_quotes_and_comments(text: str, statement: str) -> None:
    assert read_statement(text).text == statement


@pytest.mark.parametrize(
    "text, message, where",
    [
        ("SELECT 1; SELECT 2", "holds more than one statement: the second begins at line 1, column 11", (1, 11)),
        ("SELECT 'a\\'; DROP TABLE t; --'", "holds more than one statement", (1, 14)),  # standard strings: no \ escape
        ("SELECT 1;\n  -- and\n  UPDATE t SET a = 1", "the second begins at line 3, column 3", (3, 3)),
        ("", "is empty", (1, 1)),
        ("  -- nothing\n /* here */ ", "is empty", (1, 1)),
        ("SELECT 'abc", "unterminated quoted string starting at line 1, column 8", (1, 8)),
        ("SELECT $x$ abc $y$", "unterminated dollar-quoted string", (1, 8)),
        ("SELECT 1 /* a /* b */", "unterminated /* comment", (1, 10)),
        ("COMMIT", "must not control transactions", (1, 1)),
    ],
)
def test_anything_but_exactly_one_statement_is_refused_with_its_place(text: str, message: str, where: tuple[int, int]) -> None:
    with pytest.raises(SqlTextError) as err:
        read_statement(text)
    assert message in str(err.value) and (err.value.line, err.value.column) == where


def test_check_rejects_a_multi_statement_string_at_its_place_in_the_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        """version: 1
targets:
  - name: shop
    dsn: "host=localhost"
    sql:
      jobs:
        - name: purge
          schedule: "@daily"
          sql: "DELETE FROM app.sessions WHERE expires_at < now(); DROP TABLE app.sessions"
        - name: purge
          schedule: "every 5m"
          sql: |
            VACUUM app.events;
            ANALYZE app.events
        - name: empty
          schedule: "61 * * * *"
          sql: "  -- nothing  "
          params: [1]
        - name: vacuum
          schedule: "every 1h"
          sql: VACUUM app.events
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pgupkeep", "check", "--config", str(policy)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    f = str(policy)
    assert proc.stdout.splitlines() == [
        f"{f}:9:68: targets[0].sql.jobs[0].sql: holds more than one statement: the second begins at line 1, column 52 "
        "of the SQL ('DROP TABLE app.sessions'); give each statement an entry of its own",
        f"{f}:10:11: targets[0].sql.jobs[1].name: duplicate name 'purge' (also jobs[0])",
        f"{f}:14:13: targets[0].sql.jobs[1].sql: holds more than one statement: the second begins at line 2, column 1 "
        "of the SQL ('ANALYZE app.events'); give each statement an entry of its own",
        f"{f}:16:11: targets[0].sql.jobs[2].schedule: must be a five-field cron expression such as \"15 * * * *\", a macro "
        'such as @daily, or "every <duration>" such as "every 30s": Error validating expression \'61\': the last '
        "value (61) is higher than the maximum value (59)",
        f"{f}:17:17: targets[0].sql.jobs[2].sql: is empty: write one SQL statement (comments and quoted text alone are not one)",
        f"{f}:19:11: targets[0].sql.jobs[3].transaction: cannot run inside a transaction block: VACUUM; set transaction: false",
    ]
    # The positions are the file's: line 9, column 68 is where `DROP TABLE` stands.
    assert policy.read_text().splitlines()[8][67:].startswith("DROP TABLE")


def test_params_must_match_the_statements_placeholders_and_schedules_are_per_statement() -> None:
    def problems(job: dict) -> list[str]:
        text = json.dumps({"version": 1, "targets": [{"name": "t", "dsn": "host=x", "sql": {"jobs": [job]}}]})
        with pytest.raises(PolicyError) as err:
            parse_policy(text)
        return [p.message for p in err.value.problems]

    base = {"name": "p", "schedule": "every 1m"}
    assert problems({**base, "sql": "DELETE FROM t WHERE a < $2", "params": [1, 2]}) == [
        "the sql does not use $1; list exactly the values of $1..$2"
    ]
    assert problems({**base, "sql": "DELETE FROM t WHERE a < $1"}) == ["the sql uses $1 but params lists 0 values"]
    assert problems({**base, "sql": "ANALYZE t", "explain": True}) == [
        "only SELECT, INSERT, UPDATE, DELETE, MERGE, VALUES, TABLE and WITH statements have a plan to explain"
    ]
    assert problems({**base, "sql": "SELECT 1", "params": [[1, 2]]})  # only scalars
    policy = parse_policy(
        json.dumps({"version": 1, "targets": [{"name": "t", "dsn": "host=x", "sql": {"jobs": [
            {"name": "a", "schedule": "@daily", "sql": "SELECT 1"},
            {"name": "b", "schedule": "@daily", "sql": "SELECT 2"},
            {"name": "c", "schedule": "every 10m", "sql": "SELECT 3"},
        ]}}]})  # fmt: skip
    )
    # One scheduler job per statement, even where two share a schedule; cron ones only at their times.
    assert [(j.id, j.items, str(j.schedule), j.at_start) for j in planned_jobs(policy)] == [
        ("t:sql:a", ("a",), "@daily", False),
        ("t:sql:b", ("b",), "@daily", False),
        ("t:sql:c", ("c",), "every 10m", True),
    ]


# --------------------------------------------------------------------------- running statements


def test_a_batched_purge_runs_ten_batches_and_never_holds_one_long_transaction(database: str, app: psycopg.Connection) -> None:
    app.execute("CREATE TABLE app.sessions (id bigserial PRIMARY KEY, expires_at timestamptz NOT NULL)")
    app.execute("INSERT INTO app.sessions (expires_at) SELECT now() - interval '2 days' FROM generate_series(1, 95000)")
    app.execute("INSERT INTO app.sessions (expires_at) SELECT now() + interval '1 day' FROM generate_series(1, 500)")
    purge = (
        "DELETE FROM app.sessions WHERE ctid IN (SELECT ctid FROM app.sessions "
        "WHERE expires_at < now() - $1::interval LIMIT 10000) AND (SELECT app.nap(0.15))"
    )
    target = target_for(database, [{
        "name": "purge_sessions", "schedule": "*/10 * * * *", "sql": purge, "params": ["1 day"],
        "repeat_until_rows_below": 10000, "max_batches": 100, "pause_between_batches": "50ms", "timeout": "5m",
    }])  # fmt: skip
    memo: dict = {}
    started = time.time()
    with XactWatch(database, "DELETE FROM app.sessions") as watch:
        out = run_job(target, memo=memo)
    took = time.time() - started
    per_batch = [10000] * 9 + [5000]
    assert out == JobOutput(
        actions=[ran("purge_sessions", purge, 95000, per_batch, complete=True)],
        samples=[
            Sample("sql_period_seconds", 600.0, {"name": "purge_sessions"}),
            Sample("sql_last_success_timestamp_seconds", out.samples[1].value, {"name": "purge_sessions"}),
            Sample("sql_last_duration_seconds", out.samples[2].value, {"name": "purge_sessions"}),
        ],
    )
    assert out.samples[1].value >= NOW.timestamp() and 0 < out.samples[2].value <= took
    assert app.execute("SELECT count(*) FILTER (WHERE expires_at < now()), count(*) FROM app.sessions").fetchone() == (0, 500)
    # Ten transactions, one per batch, each seen for at most about one batch (0.15 s of nap plus
    # the delete), while the whole purge took ten times that.
    assert len(watch.seen) == 10, watch.seen
    assert max(watch.seen.values()) < 0.6 < took, (watch.seen, took)
    assert len({pid for pid, _ in watch.seen}) == 1  # one session for the run's batches


def test_max_batches_ends_a_run_that_still_finds_rows_and_says_so(database: str, app: psycopg.Connection) -> None:
    app.execute("CREATE TABLE app.events (id int)")
    app.execute("INSERT INTO app.events SELECT generate_series(1, 100)")
    stmt = "DELETE FROM app.events WHERE ctid IN (SELECT ctid FROM app.events LIMIT 10)"
    target = target_for(database, [{"name": "trim", "schedule": "every 1h", "sql": stmt, "repeat_until_rows_below": 10, "max_batches": 3}])
    out = run_job(target)
    assert out.actions == [ran("trim", stmt, 30, [10, 10, 10], complete=False)]
    assert app.execute("SELECT count(*) FROM app.events").fetchone() == (70,)


def test_a_statement_blocked_by_a_lock_gives_up_after_lock_timeout_times_retries_naming_the_blocker(
    database: str, app: psycopg.Connection
) -> None:
    app.execute("CREATE TABLE app.jobs (id int)")
    stmt = "DELETE FROM app.jobs"
    target = target_for(database, [{"name": "clear_jobs", "schedule": "every 1h", "sql": stmt}])  # lock_timeout 200ms, 2 retries
    with psycopg.connect(database) as blocker:
        blocker.execute("LOCK TABLE app.jobs IN ACCESS EXCLUSIVE MODE")
        pid = blocker.info.backend_pid
        t0 = time.monotonic()
        out = run_job(target)
        took = time.monotonic() - t0
        blocker.rollback()
    message = (
        f"clear_jobs: could not get a lock within lock_timeout 0.2s after 3 attempts; blocked by pids [{pid}] "
        "(see pg_stat_activity; raise lock_timeout/lock_retries or retry later)"
    )
    assert out.errors == [ItemError("clear_jobs", message)]
    assert out.actions == [ran("clear_jobs", stmt, None, [], applied=False, outcome="failure")]
    assert [(f.kind, f.object, f.value, f.detail["blocking_pids"], f.detail["sql"]) for f in out.findings] == [
        ("lock_timeout", "clear_jobs", attempt, [pid], stmt) for attempt in (1, 2, 3)
    ]
    assert took >= 3 * 0.2, took


def test_a_row_lock_wait_names_the_session_holding_the_row(database: str, app: psycopg.Connection) -> None:
    app.execute("CREATE TABLE app.jobs (id int PRIMARY KEY, done bool NOT NULL DEFAULT false)")
    app.execute("INSERT INTO app.jobs SELECT generate_series(1, 10)")
    stmt = "UPDATE app.jobs SET done = true WHERE id <= 5"
    target = target_for(database, [{"name": "finish_jobs", "schedule": "every 1h", "sql": stmt}], lock_retries=0)
    with psycopg.connect(database) as holder:
        holder.execute("SELECT 1 FROM app.jobs WHERE id = 3 FOR UPDATE")
        out = run_job(target)
        pid = holder.info.backend_pid
    assert out.errors[0].message.startswith(f"finish_jobs: could not get a lock within lock_timeout 0.2s after 1 attempts; blocked by pids [{pid}]")
    assert app.execute("SELECT count(*) FROM app.jobs WHERE done").fetchone() == (0,)


def test_transaction_false_runs_vacuum_and_create_index_concurrently(database: str, app: psycopg.Connection) -> None:
    app.execute("CREATE TABLE app.events (id int, at timestamptz)")
    app.execute("INSERT INTO app.events SELECT g, now() FROM generate_series(1, 1000) g")
    app.execute("DELETE FROM app.events WHERE id % 2 = 0")
    jobs = [
        {"name": "vacuum_events", "schedule": "@daily", "sql": "VACUUM (ANALYZE) app.events", "transaction": False},
        {"name": "index_events", "schedule": "@daily", "sql": "CREATE INDEX CONCURRENTLY IF NOT EXISTS events_at ON app.events (at)",
         "transaction": False},
    ]  # fmt: skip
    out = run_job(target_for(database, jobs))
    assert out.errors == [] and out.actions == [
        ran("vacuum_events", "VACUUM (ANALYZE) app.events", None, [None], transaction=False),
        ran("index_events", "CREATE INDEX CONCURRENTLY IF NOT EXISTS events_at ON app.events (at)", None, [None], transaction=False),
    ]
    # ANALYZE counted the live rows; the VACUUM shows in the table's statistics (a moment later
    # before PostgreSQL 15, whose statistics collector reports asynchronously).
    assert app.execute("SELECT reltuples FROM pg_class WHERE oid = 'app.events'::regclass").fetchone() == (500,)

    def vacuumed() -> bool:
        app.execute("SELECT pg_stat_clear_snapshot()")
        return app.execute("SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relid = 'app.events'::regclass").fetchone()[0]

    wait_until(vacuumed, 10, "the VACUUM in the table's statistics")
    assert app.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'app.events_at'::regclass").fetchone() == (True,)


def test_a_procedure_that_commits_runs_with_transaction_false_and_says_what_to_do_without(
    database: str, app: psycopg.Connection
) -> None:
    app.execute("CREATE TABLE app.log (n int)")
    app.execute(
        "CREATE PROCEDURE app.housekeeping() LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO app.log VALUES (1); COMMIT; INSERT INTO app.log VALUES (2); COMMIT; END $$"
    )
    out = run_job(target_for(database, [{"name": "hk", "schedule": "@daily", "sql": "CALL app.housekeeping()", "transaction": False}]))
    assert out.errors == [] and app.execute("SELECT count(*) FROM app.log").fetchone() == (2,)
    out = run_job(target_for(database, [{"name": "hk", "schedule": "@daily", "sql": "CALL app.housekeeping()"}]))
    assert out.errors == [
        ItemError("hk", "hk failed [2D000]: invalid transaction termination; a statement that commits must run outside a "
                  "transaction block: set transaction: false")
    ]  # fmt: skip
    assert app.execute("SELECT count(*) FROM app.log").fetchone() == (2,)


def test_parameters_are_bound_never_spliced(database: str, app: psycopg.Connection) -> None:
    app.execute("CREATE TABLE app.notes (note text)")
    hostile = "x'; DROP TABLE app.notes; --"
    app.execute("INSERT INTO app.notes VALUES (%s), ('keep')", (hostile,))
    stmt = "DELETE FROM app.notes WHERE note = $1 AND note LIKE '%--'"  # a literal % needs no escaping
    out = run_job(target_for(database, [{"name": "drop_note", "schedule": "@daily", "sql": stmt, "params": [hostile]}]))
    assert out.actions == [ran("drop_note", stmt, 1, [1])]
    assert app.execute("SELECT note FROM app.notes").fetchall() == [("keep",)]


def test_timeouts_read_only_statements_and_errors_say_what_to_do(database: str, app: psycopg.Connection) -> None:
    app.execute("CREATE TABLE app.t (a int)")
    jobs = [
        {"name": "slow", "schedule": "@daily", "sql": "SELECT pg_sleep(2)", "timeout": "300ms"},
        {"name": "sneaky", "schedule": "@daily", "sql": "INSERT INTO app.t VALUES (1)", "writes": False},
        {"name": "reader", "schedule": "@daily", "sql": "SELECT count(*) FROM app.t", "writes": False},
        {"name": "broken", "schedule": "@daily", "sql": "SELECT * FROM app.no_such_table"},
    ]
    out = run_job(target_for(database, jobs))
    assert out.errors == [
        ItemError("slow", "slow did not finish within timeout 300ms; raise timeout, or batch the statement"),
        ItemError("sneaky", "sneaky failed [25006]: cannot execute INSERT in a read-only transaction; the statement writes: "
                            "set writes: true (and it does not run on a standby)"),
        ItemError("broken", 'broken failed [42P01]: relation "app.no_such_table" does not exist'),
    ]  # fmt: skip
    assert [(a.object, a.detail["outcome"], a.applied) for a in out.actions] == [
        ("slow", "failure", False), ("sneaky", "failure", False), ("reader", "success", True), ("broken", "failure", False),
    ]  # fmt: skip
    assert app.execute("SELECT count(*) FROM app.t").fetchone() == (0,)


def test_plan_shows_each_statement_and_its_explain_without_running_it(database: str, app: psycopg.Connection, tmp_path: Path) -> None:
    app.execute("CREATE TABLE app.sessions (id int, expires_at timestamptz)")
    app.execute("INSERT INTO app.sessions SELECT g, now() - interval '2 days' FROM generate_series(1, 100) g")
    jobs = [
        {"name": "purge", "schedule": "*/10 * * * *", "explain": True, "params": [1],
         "sql": "DELETE FROM app.sessions WHERE expires_at < now() - $1 * interval '1 day'"},
        {"name": "analyze", "schedule": "@daily", "sql": "ANALYZE app.sessions"},
    ]  # fmt: skip
    config = write_policy(tmp_path / "p.yaml", [{"name": "t", "dsn": database, "sql": {"jobs": jobs}}], listen="127.0.0.1:0")
    proc = subprocess.run(
        [sys.executable, "-m", "pgupkeep", "plan", "--config", str(config), "--json"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    [result] = [json.loads(line) for line in proc.stdout.splitlines()]
    purge, analyze = result["actions"]
    explain = purge.pop("explain")
    assert explain[0].startswith("Delete on sessions") and any("Filter: (expires_at < " in line for line in explain)
    assert purge == {
        "action": "run_sql", "object": "purge", "sql": jobs[0]["sql"], "applied": False, "name": "purge",
        "schedule": "*/10 * * * *", "next_run": purge["next_run"], "transaction": True, "writes": True, "timeout": "15m",
    }  # fmt: skip
    assert datetime.fromisoformat(purge["next_run"]).minute % 10 == 0
    assert analyze["sql"] == "ANALYZE app.sessions" and analyze["schedule"] == "@daily" and "explain" not in analyze
    assert app.execute("SELECT count(*) FROM app.sessions").fetchone() == (100,)
    human = subprocess.run(
        [sys.executable, "-m", "pgupkeep", "plan", "--config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=60
    ).stdout
    assert "  planned run_sql purge\n" in human and "    plan:\n      Delete on sessions" in human


def test_a_cron_statements_period_is_its_longest_gap() -> None:
    target = target_for("host=unused", [
        {"name": "weekdays", "schedule": "0 9 * * 1-5", "sql": "SELECT 1"},
        {"name": "often", "schedule": "*/10 * * * *", "sql": "SELECT 1"},
    ])  # fmt: skip
    ctx = JobContext(target=target, section=target.sql, conn=None, now=NOW, timezone=ZoneInfo("Europe/Berlin"), apply=False)  # type: ignore[arg-type]
    plan = sql_kind.plan(ctx)
    assert plan.samples == [
        Sample("sql_period_seconds", 3 * 86400.0, {"name": "weekdays"}),  # Friday to Monday
        Sample("sql_period_seconds", 600.0, {"name": "often"}),
    ]


# --------------------------------------------------------------------------- real daemons


def _count_active(dsn: str, like: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
            "AND application_name = 'pgupkeep' AND query LIKE %s",
            (like,),
        ).fetchone()[0]


def test_an_overrunning_statement_is_skipped_not_queued_and_reported(fresh_database: str, tmp_path: Path) -> None:
    jobs = [{"name": "slow", "schedule": "every 1s", "sql": "SELECT pg_sleep(2.5)", "writes": False}]
    config = write_policy(tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "sql": {"jobs": jobs}}])
    most = 0
    with Daemon(config) as d:
        d.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 7:
            most = max(most, _count_active(fresh_database, "SELECT pg_sleep(2.5)%"))
            time.sleep(0.05)
        skipped = d.find("job_skipped", job="sql", reason="overrun")
        rows = ("pgupkeep_sql_rows_total", frozenset({("target", "t"), ("name", "slow")}))

        def settled() -> dict | None:
            # Each run of `SELECT pg_sleep()` returns one row: the counter moves once per run.
            m, runs = d.metrics(), len(d.find("job_finished", job="sql", item="slow"))
            return m if runs and m.get(rows) == runs else None

        m = wait_until(settled, 10, "the rows counter to count every run")
        finished = d.find("job_finished", job="sql", item="slow")
        assert d.stop() == 0
    # Due every second, each run takes 2.5 s: about one run in three starts, the others are skipped,
    # and a skipped run never starts later (at most one in flight; no burst after the long one).
    assert most == 1
    assert len(skipped) >= 3, skipped
    assert 2 <= len(finished) <= 4, finished
    assert all(e["outcome"] == "success" for e in finished)
    assert m[("pgupkeep_job_skipped_overrun_total", frozenset({("target", "t"), ("job", "sql")}))] >= 3
    assert m[("pgupkeep_sql_period_seconds", frozenset({("target", "t"), ("name", "slow")}))] == 1.0
    assert m[("pgupkeep_sql_last_duration_seconds", frozenset({("target", "t"), ("name", "slow")}))] >= 2.5
    assert m[("pgupkeep_sql_last_success_timestamp_seconds", frozenset({("target", "t"), ("name", "slow")}))] > time.time() - 60


@pytest.mark.parametrize(
    "stop, pause",
    [
        ("sigterm", "0s"),  # lands in a batch: the runner's check before the next batch stops the run
        ("sigterm", "1s"),  # lands in a pause: the pause is cut short
        ("lease", "0s"),  # the lease session dies: the check before the next batch finds the lease gone
    ],
)
def test_a_run_stops_between_batches_as_cancelled(fresh_database: str, tmp_path: Path, stop: str, pause: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("CREATE SCHEMA app; " + NAP)
        c.execute("CREATE TABLE app.queue (id int)")
        c.execute("INSERT INTO app.queue SELECT generate_series(1, 1000)")
    stmt = "DELETE FROM app.queue WHERE ctid IN (SELECT ctid FROM app.queue LIMIT 100) AND (SELECT app.nap(0.5))"
    jobs = [{"name": "drain", "schedule": "every 1h", "sql": stmt, "repeat_until_rows_below": 100, "pause_between_batches": pause}]
    config = write_policy(tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "sql": {"jobs": jobs}}], shutdown_grace="10s")
    with Daemon(config) as d:
        d.start()
        wait_until(lambda: _count_active(fresh_database, "DELETE FROM app.queue%"), 20, "the first batch")
        time.sleep(0.8)  # into the second batch, or the pause after the first
        if stop == "sigterm":
            d.send(signal.SIGTERM)
            assert d.wait(30) == 0
            reason = "shutdown"
        else:
            with psycopg.connect(fresh_database, autocommit=True) as c:
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND mode = 'ExclusiveLock' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            d.wait_event("job_finished", job="sql")
            reason = "lease_lost"
    [finished] = d.find("job_finished", job="sql")
    assert (finished["outcome"], finished["reason"]) == ("cancelled", reason)
    [run] = d.find("sql_run", object="drain")
    assert run["outcome"] == "cancelled" and run["applied"] is True
    assert 1 <= run["batches"] <= 3 and run["rows_per_batch"] == [100] * run["batches"] and run["rows"] == 100 * run["batches"]
    with psycopg.connect(fresh_database) as c:
        # Every batch that began committed whole, and none began after the stop.
        assert c.execute("SELECT count(*) FROM app.queue").fetchone() == (1000 - run["rows"],)
    assert not [e for e in d.events if e["level"] == "error"]


@pytest.mark.slow
def test_two_replicas_never_run_a_statement_at_once(fresh_database: str, tmp_path: Path) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("CREATE SCHEMA app")
        c.execute("CREATE TABLE app.runs (started timestamptz, finished timestamptz)")
        c.execute(
            "CREATE FUNCTION app.tick() RETURNS void LANGUAGE plpgsql AS $$ DECLARE s timestamptz := clock_timestamp(); "
            "BEGIN PERFORM pg_sleep(0.6); INSERT INTO app.runs VALUES (s, clock_timestamp()); END $$"
        )
    jobs = [{"name": "tick", "schedule": "every 1s", "sql": "SELECT app.tick()"}]
    config = write_policy(tmp_path / "p.yaml", [{"name": "t", "dsn": fresh_database, "sql": {"jobs": jobs}}])
    most = 0
    with Daemon(config, name="a") as a, Daemon(config, name="b") as b:
        a.start()
        b.start()
        t0 = time.monotonic()
        killed = False
        while time.monotonic() - t0 < 14:
            most = max(most, _count_active(fresh_database, "SELECT app.tick()%"))
            if not killed and time.monotonic() - t0 > 5:
                # The leader vanishes in the middle of things; the other replica takes over.
                leader = a if a.find("lease_acquired") else b
                with psycopg.connect(fresh_database) as c:
                    before_kill = c.execute("SELECT count(*) FROM app.runs").fetchone()[0]
                leader.kill()
                killed = True
            time.sleep(0.03)
        survivor = b if leader is a else a
        assert survivor.stop() == 0
    with psycopg.connect(fresh_database) as c:
        runs = c.execute("SELECT started, finished FROM app.runs ORDER BY started").fetchall()
    overlaps = [(x, y) for x, y in itertools.pairwise(runs) if y[0] < x[1]]
    assert most == 1 and overlaps == []
    assert before_kill >= 2 and len(runs) >= before_kill + 2  # the survivor went on
    assert survivor.find("lease_acquired") and survivor.find("sql_run", object="tick")


def test_a_writing_statement_is_skipped_on_a_standby_and_a_reading_one_runs(database: str, standby: str) -> None:  # noqa: F811
    policy = parse_policy(
        json.dumps({"version": 1, "targets": [{"name": "replica", "dsn": "${DSN}", "sql": {"jobs": [
            {"name": "purge", "schedule": "@daily", "sql": "DELETE FROM app.nothing"},
            {"name": "count", "schedule": "@daily", "sql": "SELECT count(*) FROM pg_class", "writes": False},
        ]}}]}),  # fmt: skip
        environ={"DSN": standby},
    )
    runner = Runner(policy)
    # Each statement is its own scheduler job: the writing one is skipped as the kind would be...
    purge = runner.run("replica", "sql", ("purge",))
    assert (purge.outcome, purge.reason, purge.actions) == ("skipped", "standby", ())
    # ... the reading one runs there, in a read-only session.
    count = runner.run("replica", "sql", ("count",))
    assert count.outcome == "success" and count.actions[0].detail["outcome"] == "success"
    # `once` runs both: the reader runs, the writer says why it did not.
    both = runner.run("replica", "sql")
    assert both.outcome == "success"
    assert [(a.object, a.applied, a.detail["outcome"], a.detail.get("reason")) for a in both.actions] == [
        ("purge", False, "skipped", "standby"), ("count", True, "success", None),
    ]  # fmt: skip


def test_the_runner_reports_the_statement_as_the_item_of_its_run(database: str, app: psycopg.Connection) -> None:
    app.execute("CREATE TABLE app.t (a int)")
    policy = parse_policy(
        json.dumps({"version": 1, "targets": [{"name": "t", "dsn": "${DSN}", "sql": {"jobs": [
            {"name": "fill", "schedule": "@daily", "sql": "INSERT INTO app.t SELECT generate_series(1, 7)"},
            {"name": "other", "schedule": "@daily", "sql": "SELECT 1"},
        ]}}]}),  # fmt: skip
        environ={"DSN": database},
    )
    result = Runner(policy).run("t", "sql", ("fill",))
    assert (result.outcome, result.item, [a.object for a in result.actions]) == ("success", "fill", ["fill"])
    assert result.actions[0].detail["rows"] == 7
