"""Signalling sessions: one step per planned cancel or terminate, each re-checked in the statement
that sends it; in dry_run, steps that only report what would have been sent (once per session).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgupkeep.db import APPLICATION_NAME
from pgupkeep.jobs.base import JobContext
from pgupkeep.policy import LongRunningQueriesSection
from pgupkeep.results import Action, ItemError, JobOutput, Step

from .activity import Activity, Signal, seconds

# After cancelling a query that is also due for termination, how long to give the cancel to take
# effect before terminating (the terminate statement skips a session whose query already ended).
CANCEL_GRACE_STEPS = 40
CANCEL_GRACE_STEP_SECONDS = 0.05

# The policy key that made each kind of signal due, as the action's `reason`.
REASONS = {
    ("cancel_backend", "age"): "cancel_after",
    ("terminate_backend", "age"): "terminate_after",
    ("terminate_backend", "idle_blocker"): "terminate_idle_blockers_after",
}

# One statement checks that the backend is still the one measured (pid and backend_start, in the
# same database), in the same state (the same query, or the same idle stretch), still over the
# limit and still fair game, and signals it, so a session that moved on since the measurement (or
# a new session that reused its pid) is never signalled. It is printed as the action's SQL,
# literals and all.
SIGNAL_SQL = """\
SELECT {function}(a.pid) FROM pg_stat_activity AS a JOIN pg_roles AS r ON r.oid = a.usesysid \
WHERE a.pid = {pid} AND a.backend_start = {backend_start} AND a.backend_type = 'client backend' \
AND a.datname = {datname}{in_scope} AND a.state = {state} AND {same} AND {over} \
AND NOT r.rolsuper AND a.pid <> pg_backend_pid() AND a.application_name <> {app} \
AND a.usename::text <> ALL ({ignore_users}::text[]) AND a.application_name <> ALL ({ignore_apps}::text[])"""

# An idle blocker is over its limit while some session still waits on a lock it holds, and has
# waited longer than the limit: a chain that dissolved since the measurement spares it.
STILL_BLOCKING_SQL = """\
EXISTS (SELECT 1 FROM pg_locks AS l JOIN pg_stat_activity AS w ON w.pid = l.pid \
WHERE NOT l.granted AND a.pid = ANY (pg_blocking_pids(l.pid)){waiter_in_scope} \
AND now() - coalesce(l.waitstart, w.query_start) > {limit})"""

IN_DATABASE = " AND {}.datname = current_database()"

GRACE_SQL = """
SELECT count(*) FROM pg_stat_activity AS a
JOIN unnest(%s::int[], %s::timestamptz[]) AS c(pid, query_start) USING (pid)
WHERE a.state = 'active' AND a.query_start = c.query_start
"""

# ctx.memo key: the would-be signals a dry run already reported, so each is counted once.
DRY_RUN_REPORTED = "dry_run_reported"


def signal_sql(s: Signal, section: LongRunningQueriesSection) -> sql.Composed:
    a = s.activity
    in_scope = sql.SQL(IN_DATABASE.format("a") if section.scope == "database" else "")
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
    if s.reason == "idle_blocker":
        over = sql.SQL(STILL_BLOCKING_SQL).format(
            waiter_in_scope=sql.SQL(IN_DATABASE.format("w") if section.scope == "database" else ""),
            limit=sql.Literal(s.limit),
        )
    else:
        over = sql.SQL("now() - {} > {}").format(since, sql.Literal(s.limit))
    return sql.SQL(SIGNAL_SQL).format(
        function=sql.SQL(
            "pg_cancel_backend" if s.action == "cancel_backend" else "pg_terminate_backend"
        ),
        pid=sql.Literal(a.pid),
        backend_start=sql.Literal(a.backend_start),
        datname=sql.Literal(a.datname),
        in_scope=in_scope,
        state=sql.Literal(a.state),
        same=same,
        over=over,
        app=sql.Literal(APPLICATION_NAME),
        ignore_users=sql.Literal(list(section.ignore_users)),
        ignore_apps=sql.Literal(list(section.ignore_applications)),
    )


def _dry_run_key(s: Signal) -> tuple[Any, ...]:
    """What a real run would signal once: a cancel per query, a terminate per session."""
    a = s.activity
    query = a.query_start if s.action == "cancel_backend" else None
    return (s.action, a.pid, a.backend_start, query)


def signal_steps(ctx: JobContext, signals: Sequence[Signal]) -> list[Step]:
    """One step per planned signal, each re-checked in SQL when sent; in dry_run, steps that only
    report what would have been sent, marked `repeat` when an earlier run already reported it."""
    section: LongRunningQueriesSection = ctx.section
    # Forget would-be signals of sessions that ended or moved on (and all of them once dry_run is
    # off), so the memo stays as small as the sessions in question.
    earlier: set[tuple[Any, ...]] = ctx.memo.get(DRY_RUN_REPORTED, set())
    due = {_dry_run_key(s) for s in signals} if section.dry_run else set()
    reported = ctx.memo[DRY_RUN_REPORTED] = earlier & due
    cancelled: list[Activity] = []
    grace = {"done": False}
    steps = []
    for s in signals:
        a = s.activity
        text = signal_sql(s, section).as_string(ctx.conn)
        detail: dict[str, Any] = {
            "pid": a.pid,
            "dry_run": section.dry_run,
            "reason": REASONS[(s.action, s.reason)],
            "usename": a.usename,
            "application_name": a.application_name,
            "datname": a.datname,
            "state": a.state,
            "age_seconds": seconds(a.age_seconds),
            "limit_seconds": s.limit.total_seconds(),
            **s.detail,
        }
        if section.dry_run:
            key = _dry_run_key(s)
            detail["repeat"] = key in reported
            planned = Action(s.action, a.object, text, applied=False, detail=detail)
            report = functools.partial(_report, planned, reported, key)
            steps.append(Step(planned, report, item=a.object, writes=False))
        else:
            planned = Action(s.action, a.object, text, applied=False, detail=detail)
            send = functools.partial(_send, ctx, s, planned, cancelled, grace)
            steps.append(Step(planned, send, item=a.object))
    return steps


def _report(planned: Action, reported: set[tuple[Any, ...]], key: tuple[Any, ...]) -> JobOutput:
    reported.add(key)
    return JobOutput(actions=[planned])


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
            f"other roles' sessions, or unset {REASONS[(s.action, s.reason)]}"
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
    elif row is None and s.reason == "idle_blocker":
        detail["skipped_reason"] = (
            "the session ended, ran a query or no longer blocks a session waiting longer than the limit "
            "since it was measured"
        )
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
