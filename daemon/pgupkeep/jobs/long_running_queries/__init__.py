"""The `long_running_queries` job: flag long-running queries and idle-in-transaction sessions of
client backends, and cancel or terminate them only where the policy says so.

Read-only (it only signals), so it runs on a standby too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import kwargs_row

from pgupkeep.db import APPLICATION_NAME
from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.policy import LongRunningQueriesSection
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Plan, Sample, Step
from pgupkeep.units import format_duration, query_text, query_text_read_limit

IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")
STATES = ("active", "idle_in_transaction")  # the bounded `state` label values
# After cancelling a query that is also due for termination, how long to give the cancel to take
# effect before terminating (the terminate statement skips a session whose query already ended).
CANCEL_GRACE_STEPS = 40
CANCEL_GRACE_STEP_SECONDS = 0.05

# Client backends only: autovacuum, walsenders, parallel and background workers are never ours to
# judge. pgupkeep's own sessions are this one, and those named `pgupkeep` that logged in as the
# same role as this one; a session of another role that merely calls itself `pgupkeep` is still
# measured and flagged (but, being named so, never signalled: see SIGNAL_SQL).
# Every session in a transaction is read (the oldest-transaction gauge needs them all);
# thresholds are applied by `plan`. Ages come from the server clock.
MEASURE_SQL = """
SELECT a.pid,
       a.usename::text AS usename,
       a.datname::text AS datname,
       a.application_name,
       host(a.client_addr) AS client_addr,
       a.state,
       a.wait_event_type,
       a.wait_event,
       a.backend_start,
       a.xact_start,
       a.query_start,
       a.state_change,
       -- A backend still 'starting' has xact_start but neither query_start nor state_change yet.
       coalesce(extract(epoch FROM now() - CASE WHEN a.state = 'active' THEN a.query_start ELSE a.state_change END), 0)::float8
           AS age_seconds,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_seconds,
       left(a.query, %(query_limit)s) AS query,
       coalesce(r.rolsuper, true) AS superuser
FROM pg_stat_activity AS a
LEFT JOIN pg_roles AS r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
  AND a.pid <> pg_backend_pid()
  AND NOT (a.application_name = %(app)s AND a.usename = session_user)
  -- An aborted transaction block has no xact_start, yet is idle in transaction all the same.
  AND (a.xact_start IS NOT NULL OR a.state = 'idle in transaction (aborted)')
ORDER BY a.pid
"""

# One statement checks that the backend is still the one measured (pid and backend_start), in the
# same state (the same query, or the same idle stretch), still over the limit and still fair game,
# and signals it, so a session that moved on since the measurement (or a new session that reused
# its pid) is never signalled. It is printed as the action's SQL, literals and all.
SIGNAL_SQL = """\
SELECT {function}(a.pid) FROM pg_stat_activity AS a JOIN pg_roles AS r ON r.oid = a.usesysid \
WHERE a.pid = {pid} AND a.backend_start = {backend_start} AND a.backend_type = 'client backend' \
AND a.state = {state} AND {same} AND now() - {since} > {limit} \
AND NOT r.rolsuper AND a.pid <> pg_backend_pid() AND a.application_name <> {app} \
AND a.usename::text <> ALL ({ignore_users}::text[]) AND a.application_name <> ALL ({ignore_apps}::text[])"""

# Without pg_read_all_stats (or pg_monitor) other roles' sessions show no state, query or times:
# they cannot be measured, and saying nothing would read as "all is well".
HIDDEN_SQL = """
SELECT count(*) FILTER (WHERE a.query = '<insufficient privilege>' AND a.datid IS NOT NULL), current_user
FROM pg_stat_activity AS a
"""

GRACE_SQL = """
SELECT count(*) FROM pg_stat_activity AS a
JOIN unnest(%s::int[], %s::timestamptz[]) AS c(pid, query_start) USING (pid)
WHERE a.state = 'active' AND a.query_start = c.query_start
"""


@dataclass(frozen=True)
class Activity:
    """One client backend with an open transaction, as measured."""

    pid: int
    usename: str | None
    datname: str | None
    application_name: str
    client_addr: str | None
    state: str | None
    wait_event_type: str | None
    wait_event: str | None
    backend_start: datetime
    xact_start: datetime | None  # None in an aborted transaction block
    query_start: datetime | None
    state_change: datetime | None
    age_seconds: float
    xact_age_seconds: float | None
    query: str | None
    superuser: bool

    @property
    def kind(self) -> str | None:
        """The bounded state label: active, idle_in_transaction, or None (not judged)."""
        if self.state == "active":
            return "active"
        if self.state in IDLE_IN_TRANSACTION:
            return "idle_in_transaction"
        return None

    @property
    def object(self) -> str:
        return f"pid {self.pid}"

    def describe(self) -> str:
        return (
            f"pid {self.pid} (user {self.usename}, database {self.datname}, "
            f"application {self.application_name or '-'})"
        )


@dataclass(frozen=True)
class Signal:
    """A session the policy says to cancel or terminate."""

    action: str  # cancel_backend | terminate_backend
    activity: Activity
    limit: timedelta


@dataclass
class Judgement:
    findings: list[Finding]
    samples: list[Sample]
    signals: list[Signal]


def measure(conn: psycopg.Connection, log_query_text: str = "truncated") -> list[Activity]:
    """The sessions, their query text already cut to what `log_query_text` allows."""
    with conn.cursor(row_factory=kwargs_row(Activity)) as cur:
        rows = cur.execute(
            MEASURE_SQL, {"query_limit": query_text_read_limit(log_query_text), "app": APPLICATION_NAME}
        ).fetchall()
    return [replace(a, query=query_text(a.query, log_query_text)) for a in rows]


def _ignored(a: Activity, section: LongRunningQueriesSection) -> bool:
    return a.usename in section.ignore_users or a.application_name in section.ignore_applications


def _seconds(value: float) -> float:
    return round(value, 3)


def judge(rows: Sequence[Activity], section: LongRunningQueriesSection) -> Judgement:
    """Findings, gauges and signals for the measured sessions (pure: rows + policy)."""
    # Ignored users and applications are left out of every figure, not only out of the findings:
    # whoever ignores pg_dump does not want its hour-long transaction in the oldest-transaction
    # alert either.
    judged = [a for a in rows if not _ignored(a, section)]
    findings: list[Finding] = []
    signals: list[Signal] = []
    flagged = dict.fromkeys(STATES, 0)
    longest = dict.fromkeys(STATES, 0.0)
    for a in sorted(judged, key=lambda a: (-a.age_seconds, a.pid)):
        kind = a.kind
        if kind is None:
            continue
        longest[kind] = max(longest[kind], _seconds(a.age_seconds))
        warn = section.warn_after if kind == "active" else section.idle_in_transaction_after
        if a.age_seconds <= warn.total_seconds():
            continue
        flagged[kind] += 1
        findings.append(_finding(a, warn, section))
        # Never superusers' sessions, nor anything calling itself pgupkeep (see MEASURE_SQL).
        if a.superuser or a.application_name == APPLICATION_NAME:
            continue
        cancel, terminate = section.cancel_after, section.terminate_after
        if kind == "active" and cancel is not None and a.age_seconds > cancel.total_seconds():
            signals.append(Signal("cancel_backend", a, cancel))
        if terminate is not None and a.age_seconds > terminate.total_seconds():
            signals.append(Signal("terminate_backend", a, terminate))
    oldest = max(
        (_seconds(a.xact_age_seconds) for a in judged if a.xact_age_seconds is not None),
        default=0.0,
    )
    samples = [Sample("long_running_queries", float(flagged[s]), {"state": s}) for s in STATES]
    samples += [Sample("longest_query_seconds", longest[s], {"state": s}) for s in STATES]
    samples.append(Sample("oldest_transaction_seconds", oldest))
    # Cancels go first: a query cancelled here may make its termination unnecessary.
    signals.sort(key=lambda s: s.action != "cancel_backend")
    return Judgement(findings, samples, signals)


def _finding(a: Activity, warn: timedelta, section: LongRunningQueriesSection) -> Finding:
    age = _seconds(a.age_seconds)
    # A hint to set a key only while it is unset: once set, the signal's own event says what it did.
    if a.kind == "active":
        kind = "long_running_query"
        what = f"query active for {age:g}s, over warn_after {format_duration(warn)}"
        hint = "check it in pg_stat_activity"
        if section.cancel_after is None:
            hint += "; set cancel_after to have such queries cancelled"
    else:
        kind = "idle_in_transaction"
        what = f"{a.state} for {age:g}s, over idle_in_transaction_after {format_duration(warn)}"
        hint = "the application should commit or roll back"
        if section.terminate_after is None:
            hint += "; set terminate_after to end such sessions"
    return Finding(
        kind=kind,
        object=a.object,
        value=age,
        message=f"{a.describe()}: {what}; {hint}",
        detail={
            "pid": a.pid,
            "usename": a.usename,
            "datname": a.datname,
            "application_name": a.application_name,
            "client_addr": a.client_addr,
            "state": a.state,
            "wait_event_type": a.wait_event_type,
            "wait_event": a.wait_event,
            "age_seconds": age,
            "xact_age_seconds": None
            if a.xact_age_seconds is None
            else _seconds(a.xact_age_seconds),
            "query": a.query,
            "backend_start": a.backend_start.isoformat(),
        },
    )


def signal_sql(s: Signal, section: LongRunningQueriesSection) -> sql.Composed:
    a = s.activity
    if a.kind == "active":
        same, since = (
            sql.SQL("a.query_start = {}").format(sql.Literal(a.query_start)),
            sql.SQL("a.query_start"),
        )
    else:
        # Still idle since the measurement: the idle time restarts whenever the session runs a query.
        same, since = (
            sql.SQL("a.state_change = {}").format(sql.Literal(a.state_change)),
            sql.SQL("a.state_change"),
        )
    return sql.SQL(SIGNAL_SQL).format(
        function=sql.SQL(
            "pg_cancel_backend" if s.action == "cancel_backend" else "pg_terminate_backend"
        ),
        pid=sql.Literal(a.pid),
        backend_start=sql.Literal(a.backend_start),
        state=sql.Literal(a.state),
        same=same,
        since=since,
        limit=sql.Literal(s.limit),
        app=sql.Literal(APPLICATION_NAME),
        ignore_users=sql.Literal(list(section.ignore_users)),
        ignore_apps=sql.Literal(list(section.ignore_applications)),
    )


def signal_steps(ctx: JobContext, signals: Sequence[Signal]) -> list[Step]:
    """One step per planned signal, each re-checked in SQL when sent; in dry_run, steps that only
    report what would have been sent."""
    section: LongRunningQueriesSection = ctx.section
    cancelled: list[Activity] = []
    grace = {"done": False}
    steps = []
    for s in signals:
        a = s.activity
        text = signal_sql(s, section).as_string(ctx.conn)
        detail: dict[str, Any] = {
            "pid": a.pid,
            "dry_run": section.dry_run,
            "usename": a.usename,
            "application_name": a.application_name,
            "datname": a.datname,
            "state": a.state,
            "age_seconds": _seconds(a.age_seconds),
            "limit_seconds": s.limit.total_seconds(),
        }
        planned = Action(s.action, a.object, text, applied=False, detail=detail)
        if section.dry_run:
            steps.append(Step(planned, lambda planned=planned: JobOutput(actions=[planned]), item=a.object, writes=False))
        else:
            steps.append(Step(planned, functools.partial(_send, ctx, s, planned, cancelled, grace), item=a.object))
    return steps


def _send(ctx: JobContext, s: Signal, planned: Action, cancelled: list[Activity], grace: dict[str, bool]) -> JobOutput:
    a, out = s.activity, JobOutput()
    detail = dict(planned.detail)
    if s.action == "terminate_backend" and cancelled and not grace["done"]:
        _await_cancels(ctx, cancelled)
        grace["done"] = True
    verb = "cancel the query of" if s.action == "cancel_backend" else "terminate"
    try:
        row = ctx.conn.execute(planned.sql).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        role = ctx.conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
        message = (
            f"{a.describe()}: not allowed to {verb} it ({exc.diag.message_primary}); "
            f"GRANT pg_signal_backend TO {sql.Identifier(role).as_string(ctx.conn)} to let pgupkeep signal "
            "other roles' sessions, or unset cancel_after/terminate_after"
        )
        out.errors.append(ItemError(a.object, message))
        detail["skipped_reason"] = "permission denied"
        out.actions.append(Action(s.action, a.object, planned.sql, applied=False, detail=detail))
        return out
    except psycopg.Error as exc:
        out.errors.append(ItemError(a.object, f"{a.describe()}: could not {verb} it: {str(exc).strip()}"))
        detail["skipped_reason"] = "error"
        out.actions.append(Action(s.action, a.object, planned.sql, applied=False, detail=detail))
        return out
    if row is None and a in cancelled:
        detail["skipped_reason"] = "the query ended when it was cancelled"
    elif row is None:
        detail["skipped_reason"] = (
            "the session ended or changed since it was measured (not the same pid and backend_start, "
            "state, query or transaction, or no longer over the limit)"
        )
    elif not row[0]:
        detail["skipped_reason"] = "the backend was gone when the signal was sent"
    applied = "skipped_reason" not in detail
    if applied and s.action == "cancel_backend":
        cancelled.append(a)
    out.actions.append(Action(s.action, a.object, planned.sql, applied=applied, detail=detail))
    return out


def _await_cancels(ctx: JobContext, cancelled: Sequence[Activity]) -> None:
    """Give just-cancelled queries a moment to end before their sessions are considered for terminating."""
    params = ([a.pid for a in cancelled], [a.query_start for a in cancelled])
    for _ in range(CANCEL_GRACE_STEPS):
        row = ctx.conn.execute(GRACE_SQL, params).fetchone()
        if not row or not row[0]:
            return
        ctx.sleep(CANCEL_GRACE_STEP_SECONDS)


def plan(ctx: JobContext) -> Plan:
    j = judge(measure(ctx.conn, ctx.target.log_query_text or "truncated"), ctx.section)
    errors = []
    hidden, role = ctx.conn.execute(HIDDEN_SQL).fetchone()  # type: ignore[misc]
    if hidden:
        errors.append(
            ItemError(
                "pg_stat_activity",
                f"pg_stat_activity: {hidden} sessions of other roles are hidden from role {role}, so they "
                f"cannot be measured; GRANT pg_read_all_stats TO {sql.Identifier(role).as_string(ctx.conn)}",
            )
        )
    return Plan(steps=signal_steps(ctx, j.signals), findings=j.findings, samples=j.samples, errors=errors)


KIND = JobKind(name="long_running_queries", plan=plan, writes=False)
