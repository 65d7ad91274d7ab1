"""Blocking chains in the long_running_queries job, with real locks: the root blocker named once with
the sessions behind it, and idle-in-transaction roots terminated only when the policy says so."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgupkeep import db
from pgupkeep.jobs import long_running_queries as lrq
from pgupkeep.metrics import Metrics
from pgupkeep.results import Action, Finding, JobOutput, JobResult, Plan, Sample
from pgupkeep.runner import Fence, apply_plan
from session_helpers import Held, Sessions, context, dsn_as, run_job, target_for

THRESHOLD = 0.2  # seconds: lock_wait_after and terminate_idle_blockers_after in these tests


@dataclass
class Chain:
    """root (idle in transaction, holding ACCESS SHARE) <- ALTER TABLE (waits) <- SELECT (queued behind it)."""

    table: str
    root: Held
    alter: Held
    select: Held


@pytest.fixture
def chain(database: str, conn: psycopg.Connection, app: str, sessions: Sessions) -> Iterator[Chain]:
    # The classic outage: a transaction left open after a read, a migration's ALTER TABLE queued
    # behind it, and every later query of the table queued behind the ALTER.
    table = f"chain_{secrets.token_hex(3)}"
    ident = sql.Identifier(table)
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int)").format(ident))
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 0)").format(ident))
    conn.execute(sql.SQL("GRANT SELECT, UPDATE ON {} TO PUBLIC").format(ident))
    root = sessions.idle_in_transaction(app)
    root.conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident))
    sessions.wait(root, "idle in transaction")
    alter = sessions.waiter(
        dsn_as(database, application_name="migrate"),
        sql.SQL("ALTER TABLE {} ADD COLUMN note text").format(ident).as_string(conn),
    )
    select = sessions.waiter(dsn_as(app, application_name="web"), sql.SQL("SELECT count(*) FROM {}").format(ident).as_string(conn))
    sessions.waiting(select, older_than=THRESHOLD)
    yield Chain(table, root, alter, select)


def lock_waits(out: JobOutput) -> list[Finding]:
    return [f for f in out.findings if f.kind == "lock_wait"]


def user_of(h: Held, conn: psycopg.Connection) -> str:
    return conn.execute("SELECT usename::text FROM pg_stat_activity WHERE pid = %s", (h.pid,)).fetchone()[0]


def expected_chain_finding(out: JobOutput, c: Chain, conn: psycopg.Connection, roles: dict[str, str], hint: str) -> Finding:
    (actual,) = lock_waits(out)
    d = actual.detail
    held = d["blocking_seconds"]
    alter_wait, select_wait = (w["wait_seconds"] for w in d["waiters"])
    # The ALTER has waited on the root since it began; the SELECT queued behind it later.
    assert THRESHOLD < select_wait < alter_wait == held < d["state_seconds"] <= d["xact_age_seconds"]
    dbname = conninfo_to_dict(conn.info.dsn)["dbname"]
    relation = f"public.{c.table}"
    return Finding(
        kind="lock_wait",
        object=f"pid {c.root.pid}",
        value=held,
        message=(
            f"pid {c.root.pid} (user {roles['app']}, database {dbname}, application shop), idle in transaction for "
            f"{d['state_seconds']:g}s, blocks 2 sessions waiting on locks on {relation} for up to {held:g}s, over "
            f"lock_wait_after 200ms; {hint}"
        ),
        detail={
            "pid": c.root.pid,
            "backend_type": "client backend",
            "usename": roles["app"],
            "datname": dbname,
            "application_name": "shop",
            "client_addr": "127.0.0.1",
            "state": "idle in transaction",
            "idle_in_transaction": True,
            "state_seconds": d["state_seconds"],
            "xact_age_seconds": d["xact_age_seconds"],
            "backend_start": c.root.info["backend_start"].isoformat(),
            "blocking_seconds": held,
            "waiting_sessions": 2,
            "relations": [relation],
            "waiters": [
                {"pid": c.alter.pid, "usename": user_of(c.alter, conn), "datname": dbname, "application_name": "migrate",
                 "wait_seconds": alter_wait, "locktype": "relation", "mode": "AccessExclusiveLock", "relation": relation},
                {"pid": c.select.pid, "usename": roles["app"], "datname": dbname, "application_name": "web",
                 "wait_seconds": select_wait, "locktype": "relation", "mode": "AccessShareLock", "relation": relation},
            ],
        },
    )  # fmt: skip


def counter(m: Metrics, name: str, **labels: str) -> float | None:
    text = generate_latest(m.registry).decode()
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name and s.labels == labels]
    return found[0] if found else None


def lock_samples(out: JobOutput) -> list[Sample]:
    return [s for s in out.samples if s.metric in ("lock_waiting_sessions", "longest_lock_wait_seconds")]


def expected_terminate(out: JobOutput, c: Chain, conn: psycopg.Connection, roles: dict[str, str], *, applied: bool,
                       dry_run: bool, repeat: bool | None = None) -> Action:  # fmt: skip
    (actual,) = [a for a in out.actions if a.action == "terminate_backend"]
    (finding,) = lock_waits(out)
    dbname = conninfo_to_dict(conn.info.dsn)["dbname"]
    # The statement re-checks the session (pid, backend_start, state, state_change), its
    # database, and that it still holds up a session for longer than the limit.
    for check in (
        f"a.pid = {c.root.pid} ",
        "a.backend_start = '",
        f"a.datname = '{dbname}' AND a.datname = current_database()",
        "a.state = 'idle in transaction' AND a.state_change = '",
        "a.pid = ANY (pg_blocking_pids(l.pid)) AND w.datname = current_database()",
        "> '0:00:00.200000'::interval)",
    ):
        assert check in actual.sql, (check, actual.sql)
    return Action(
        "terminate_backend",
        f"pid {c.root.pid}",
        actual.sql,
        applied=applied,
        detail={
            "pid": c.root.pid,
            "dry_run": dry_run,
            "reason": "terminate_idle_blockers_after",
            "usename": roles["app"],
            "application_name": "shop",
            "datname": dbname,
            "state": "idle in transaction",
            "age_seconds": finding.detail["state_seconds"],
            "limit_seconds": THRESHOLD,
            "blocking_seconds": finding.detail["blocking_seconds"],
            "waiting_sessions": 2,
            **({"repeat": repeat} if repeat is not None else {}),
        },
    )


def test_a_chain_is_one_finding_naming_the_idle_root_and_its_two_waiters(chain, conn, roles):
    out, _ = run_job(conn.info.dsn, lock_wait_after="200ms")

    hint = (
        f"the application should commit or roll back; end it with SELECT pg_terminate_backend({chain.root.pid}), "
        "or set terminate_idle_blockers_after to have such blockers terminated"
    )
    finding = expected_chain_finding(out, chain, conn, roles, hint)
    assert lock_waits(out) == [finding]
    assert lock_samples(out) == [
        Sample("lock_waiting_sessions", 2.0),
        Sample("longest_lock_wait_seconds", finding.value),
    ]
    assert out.actions == [] and out.errors == []


def test_young_lock_waits_are_measured_but_not_reported(chain, conn):
    out, _ = run_job(conn.info.dsn, lock_wait_after="1h", terminate_idle_blockers_after="200ms")

    assert lock_waits(out) == [] and out.actions == []
    longest = next(s.value for s in out.samples if s.metric == "longest_lock_wait_seconds")
    assert lock_samples(out) == [Sample("lock_waiting_sessions", 0.0), Sample("longest_lock_wait_seconds", longest)]
    assert longest > THRESHOLD


def test_dry_run_terminates_nothing_and_is_counted_once(chain, conn, roles, sessions):
    memo: dict = {}
    section = {"lock_wait_after": "200ms", "terminate_idle_blockers_after": "200ms", "dry_run": "true"}

    first, _ = run_job(conn.info.dsn, memo=memo, **section)
    second, _ = run_job(conn.info.dsn, memo=memo, **section)

    assert first.actions == [expected_terminate(first, chain, conn, roles, applied=False, dry_run=True, repeat=False)]
    assert second.actions == [expected_terminate(second, chain, conn, roles, applied=False, dry_run=True, repeat=True)]
    assert sessions.state(chain.root.pid) == "idle in transaction"
    assert chain.alter.thread.is_alive() and chain.select.thread.is_alive()
    m = Metrics()
    for out in (first, second):
        m.record(JobResult("t", "long_running_queries", "success", 0.1, 1000.0, actions=tuple(out.actions)))
    assert counter(m, "pgupkeep_backend_signals_total", target="t", action="terminate", dry_run="true") == 1


def test_idle_root_is_terminated_and_its_waiters_proceed(chain, conn, roles, sessions):
    out, _ = run_job(conn.info.dsn, lock_wait_after="200ms", terminate_idle_blockers_after="200ms")

    assert out.actions == [expected_terminate(out, chain, conn, roles, applied=True, dry_run=False)]
    assert out.errors == []
    hint = f"the application should commit or roll back; end it with SELECT pg_terminate_backend({chain.root.pid})"
    assert lock_waits(out) == [expected_chain_finding(out, chain, conn, roles, hint)]
    sessions.gone(chain.root.pid)
    assert chain.alter.finish() is None and chain.select.finish() is None  # both statements completed
    column = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'note'", (f"public.{chain.table}",)
    ).fetchone()
    assert column == ("note",)


def test_a_chain_that_dissolved_since_the_measurement_spares_its_root(chain, conn, sessions):
    target, policy = target_for(conn.info.dsn, lock_wait_after="200ms", terminate_idle_blockers_after="200ms")
    with db.connect(target) as c:
        chains = lrq.blocking.judge(lrq.blocking.read(c, target.long_running_queries), target.long_running_queries)
    assert [s.activity.pid for s in chains.signals] == [chain.root.pid]
    chain.alter.conn.cancel()  # the migration gives up; the query queued behind it then runs
    assert isinstance(chain.alter.finish(), psycopg.errors.QueryCanceled)
    assert chain.select.finish() is None

    with db.connect(target) as c:
        out = JobOutput()
        apply_plan(Plan(steps=lrq.signal_steps(context(target, policy, c), chains.signals)), out, Fence(threading.Event()))

    assert [(a.applied, a.detail["skipped_reason"]) for a in out.actions] == [
        (False, "the session ended, ran a query or no longer blocks a session waiting longer than the limit since it was measured")
    ]
    assert sessions.state(chain.root.pid) == "idle in transaction"  # still open, and judged by terminate_after only


def test_row_lock_chain_names_the_table_of_the_row(database, conn, app, sessions, roles):
    table = f"rows_{secrets.token_hex(3)}"
    ident = sql.Identifier(table)
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int)").format(ident))
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 0)").format(ident))
    conn.execute(sql.SQL("GRANT SELECT, UPDATE ON {} TO PUBLIC").format(ident))
    update = sql.SQL("UPDATE {} SET v = v + 1 WHERE id = 1").format(ident).as_string(conn)
    root = sessions.idle_in_transaction(app)
    root.conn.execute(update)
    sessions.wait(root, "idle in transaction")
    first = sessions.waiter(app, update)  # waits for the root's transaction, holding the row's tuple lock
    second = sessions.waiter(app, update)  # waits for that tuple lock
    sessions.waiting(second, older_than=THRESHOLD)

    out, _ = run_job(database, lock_wait_after="200ms")

    (finding,) = lock_waits(out)
    assert finding.object == f"pid {root.pid}" and finding.detail["waiting_sessions"] == 2
    assert [(w["pid"], w["locktype"], w["mode"], w["relation"]) for w in finding.detail["waiters"]] == [
        (first.pid, "transactionid", "ShareLock", f"public.{table}"),
        (second.pid, "tuple", "ExclusiveLock", f"public.{table}"),
    ]
    assert finding.detail["relations"] == [f"public.{table}"]


# --------------------------------------------------------------------------- judging, with plain values


START = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def wait(root: int, waiter: int, seconds: float, *, direct: bool = True, **kw) -> lrq.blocking.LockWait:
    values = dict(
        root_pid=root, root_seen=root != 0, root_backend_type="client backend" if root else None,
        root_in_database=root != 0, root_usename="app" if root else None, root_datname="shop" if root else None,
        root_application_name="web" if root else None, root_client_addr=None,
        root_state="idle in transaction" if root else None, root_wait_event_type=None, root_wait_event=None,
        root_backend_start=START if root else None, root_xact_start=START if root else None,
        root_query_start=START if root else None, root_state_change=START if root else None,
        root_age_seconds=100.0 if root else 0.0, root_xact_age_seconds=101.0 if root else None, root_superuser=False,
        waiter_pid=waiter, waiter_usename="app", waiter_datname="shop", waiter_application_name="web",
        direct=direct, wait_seconds=seconds, locktype="relation", mode="AccessExclusiveLock", relation="public.t",
    )  # fmt: skip
    values.update(kw)
    return lrq.blocking.LockWait(**values)


def section(**keys: str):
    target, _ = target_for("postgresql://x@localhost/db", lock_wait_after="30s", **keys)
    return target.long_running_queries


def test_judge_one_finding_per_root_over_the_limit_and_gauges_of_every_wait():
    rows = [
        wait(10, 11, 60.0),
        wait(10, 12, 90.0, direct=False),  # waited on 11 before 11 waited on 10: not held up by 10 as long
        wait(10, 13, 5.0, direct=False),  # young, but behind the same root: counted in its chain
        wait(20, 21, 10.0),  # a chain under lock_wait_after: measured, not reported
        wait(30, 31, 45.0, waiter_usename="replicator"),  # an ignored waiter: nowhere
        wait(0, 41, 40.0),  # a prepared transaction
    ]

    j = lrq.blocking.judge(rows, section(ignore_users="[replicator]", terminate_idle_blockers_after="50s"))

    assert [(f.object, f.value, f.detail["waiting_sessions"], [w["pid"] for w in f.detail["waiters"]]) for f in j.findings] == [
        ("pid 10", 60.0, 3, [12, 11, 13]),
        ("prepared transaction", 40.0, 1, [41]),
    ]
    assert j.findings[1].message == (
        "a prepared transaction blocks 1 session waiting on locks on public.t for up to 40s, over lock_wait_after 30s; "
        "COMMIT PREPARED or ROLLBACK PREPARED it (see pg_prepared_xacts)"
    )
    assert j.samples == [Sample("lock_waiting_sessions", 3.0), Sample("longest_lock_wait_seconds", 90.0)]
    assert [(s.activity.pid, s.reason, s.limit, dict(s.detail)) for s in j.signals] == [
        (10, "idle_blocker", timedelta(seconds=50), {"blocking_seconds": 60.0, "waiting_sessions": 3})
    ]


@pytest.mark.parametrize(
    ("why", "row", "keys"),
    [
        ("held up the chain for less than the limit", wait(10, 11, 40.0), {}),
        ("active, not idle in transaction", wait(10, 11, 60.0, root_state="active"), {}),
        ("a superuser's session", wait(10, 11, 60.0, root_superuser=True), {}),
        ("named pgupkeep", wait(10, 11, 60.0, root_application_name="pgupkeep"), {}),
        ("an ignored application", wait(10, 11, 60.0, root_application_name="pg_dump"), {"ignore_applications": "[pg_dump]"}),
        ("an autovacuum worker", wait(10, 11, 60.0, root_backend_type="autovacuum worker"), {}),
        ("in another database", wait(10, 11, 60.0, root_in_database=False, root_datname="other"), {}),
        ("ended since", wait(10, 11, 60.0, root_seen=False, root_backend_start=None), {}),
    ],
)
def test_judge_names_but_never_terminates_a_root_that_is(why, row, keys):
    j = lrq.blocking.judge([row], section(terminate_idle_blockers_after="50s", **keys))

    assert [f.object for f in j.findings] == ["pid 10"], why
    assert j.signals == [], why


def test_judge_a_root_in_another_database_may_be_terminated_with_scope_server():
    row = wait(10, 11, 60.0, root_in_database=False, root_datname="other")
    j = lrq.blocking.judge([row], section(terminate_idle_blockers_after="50s", scope="server"))
    assert [s.activity.pid for s in j.signals] == [10]


def test_judge_leaves_a_root_already_due_for_terminate_after_to_it():
    j = lrq.blocking.judge([wait(10, 11, 60.0)], section(terminate_idle_blockers_after="50s"), terminating={10})
    assert [f.object for f in j.findings] == ["pid 10"] and j.signals == []


def test_plan_puts_idle_blocker_terminations_after_the_other_signals_once_each(chain, conn, roles):
    out, _ = run_job(
        conn.info.dsn, apply=False, lock_wait_after="200ms", terminate_after="200ms", terminate_idle_blockers_after="200ms"
    )
    # The root is idle in transaction past terminate_after too: one terminate, for that reason.
    terminates = [(a.object, a.detail["reason"]) for a in out.actions if a.action == "terminate_backend"]
    assert terminates.count((f"pid {chain.root.pid}", "terminate_after")) == 1
    assert [o for o, _ in terminates].count(f"pid {chain.root.pid}") == 1
    assert [f.object for f in lock_waits(out)] == [f"pid {chain.root.pid}"]
