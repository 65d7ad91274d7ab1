"""The `materialized_views` job: refresh the due views, CONCURRENTLY where the policy asks, in
dependency order, each on its own time-boxed session and behind a per-view advisory lock.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import errors, sql

from pgupkeep import db
from pgupkeep.db import DdlRunner, LockTimeoutError
from pgupkeep.jobs.base import JobContext, JobKind, ScheduleGroup, shared_schedules
from pgupkeep.jobs.materialized_views.refreshes import (
    Mode,
    Refresh,
    ViewState,
    guard_key,
    plan_refreshes,
    refresh_sql,
    rows_estimate,
)
from pgupkeep.policy import MaterializedViewsSection, ViewPolicy
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Plan, Sample, Step
from pgupkeep.units import QualifiedName, format_duration, pg_milliseconds

# One row per configured view, in policy order. A usable unique index is what PostgreSQL's
# is_usable_unique_index() accepts: btree, unique, immediate, valid, no predicate, plain columns.
# Refreshing takes ownership (or MAINTAIN on 17+), checked up front so the message can say so.
CATALOG_SQL = """
SELECT w.schema, w.name, c.oid::bigint, c.relkind::text, coalesce(c.relispopulated, false),
       EXISTS (
         SELECT 1
         FROM pg_index i
         JOIN pg_class ic ON ic.oid = i.indexrelid
         JOIN pg_am am ON am.oid = ic.relam
         WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate AND i.indisvalid
           AND am.amname = 'btree' AND i.indpred IS NULL AND i.indexprs IS NULL
           AND i.indnatts > 0 AND 0 < ALL (i.indkey::int2[])
       ),
       CASE WHEN c.oid IS NOT NULL THEN {may_refresh} END,
       pg_get_userbyid(c.relowner)::text, current_user::text, c.reltuples::float8
FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS w(schema, name, ord)
LEFT JOIN pg_namespace n ON n.nspname = w.schema
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.name
ORDER BY w.ord
"""
MAY_REFRESH_17 = "has_table_privilege(c.oid, 'MAINTAIN')"
MAY_REFRESH_14 = "pg_has_role(c.relowner, 'USAGE')"

# Which of the given matviews each one reads, directly or through plain views (a matview reads
# another's stored rows, so recursion stops there). The view's query is its _RETURN rule, whose
# pg_depend rows name every relation it reads; UNION keeps cyclic plain views finite.
READS_SQL = """
WITH RECURSIVE reads(root, rel) AS (
    SELECT r.ev_class, d.refobjid
    FROM pg_rewrite r
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
    WHERE r.ev_class = ANY (%(oids)s::oid[])
  UNION
    SELECT reads.root, d.refobjid
    FROM reads
    JOIN pg_class c ON c.oid = reads.rel AND c.relkind = 'v'
    JOIN pg_rewrite r ON r.ev_class = c.oid
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                    AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
)
SELECT DISTINCT root::bigint, rel::bigint FROM reads WHERE rel = ANY (%(oids)s::oid[]) AND rel <> root
"""

ROWS_SQL = "SELECT reltuples::float8 FROM pg_class WHERE oid = %s::oid"
TRY_GUARD_SQL = "SELECT pg_try_advisory_lock(%s)"
RELEASE_GUARD_SQL = "SELECT pg_advisory_unlock(%s)"
ARM_SQL = "SELECT set_config('statement_timeout', %s, false)"

# --------------------------------------------------------------------------- catalog


def read_catalog(
    conn: psycopg.Connection, views: Sequence[QualifiedName]
) -> tuple[dict[QualifiedName, ViewState], dict[QualifiedName, set[QualifiedName]], bool]:
    """Every configured view's state, which of them reads which, and whether MAINTAIN exists."""
    maintain = conn.info.server_version >= 170000
    query = sql.SQL(CATALOG_SQL).format(may_refresh=sql.SQL(MAY_REFRESH_17 if maintain else MAY_REFRESH_14))
    rows = conn.execute(query, ([v.schema for v in views], [v.name for v in views])).fetchall()
    states = {
        QualifiedName(schema, name): ViewState(
            QualifiedName(schema, name), oid, relkind, populated, unique_index, bool(may), owner, role, reltuples
        )
        for schema, name, oid, relkind, populated, unique_index, may, owner, role, reltuples in rows
    }
    by_oid = {s.oid: s.view for s in states.values() if s.oid is not None and s.relkind == "m"}
    reads: dict[QualifiedName, set[QualifiedName]] = {}
    if by_oid:
        for root, rel in conn.execute(READS_SQL, {"oids": list(by_oid)}).fetchall():
            reads.setdefault(by_oid[root], set()).add(by_oid[rel])
    return states, reads, maintain


# --------------------------------------------------------------------------- apply


class _OutOfTime(Exception):
    """The view's overall timeout ran out while its refresh was waiting for the lock."""


class _Skipped(Exception):
    """Another session holds the view's refresh guard."""


@dataclass
class _Attempt:
    """The refresh as it goes: its mode and SQL can change once (preferred's fallback)."""

    mode: Mode
    sql: str
    fallback_reason: str | None
    started: float = 0.0
    seconds: float = 0.0
    rows: int | None = None


def _budgeted_runner(ctx: JobContext, session: psycopg.Connection, deadline: float) -> DdlRunner:
    """A DdlRunner whose retries stay within the view's overall timeout.

    It shares the context runner's lock-wait record, so `ctx.lock_findings()` reports these too.
    Before each retry the session's statement_timeout is re-armed to the time left.
    """
    base = ctx.ddl_runner
    assert base is not None

    def sleep(seconds: float) -> None:
        if deadline - time.monotonic() <= seconds:
            raise _OutOfTime
        ctx.sleep(seconds)
        _arm(session, deadline)

    return DdlRunner(lock_timeout=base.lock_timeout, retries=base.retries, sleep=sleep, rng=base.rng, waits=base.waits)


def _arm(session: psycopg.Connection, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _OutOfTime
    session.execute(ARM_SQL, (pg_milliseconds(timedelta(seconds=left)),))


def _refresh(ctx: JobContext, r: Refresh, session: psycopg.Connection, attempt: _Attempt) -> None:
    assert r.oid is not None
    deadline = attempt.started + r.policy.timeout.total_seconds()
    runner = _budgeted_runner(ctx, session, deadline)
    waits_before = len(runner.waits)
    try:
        try:
            # REFRESH ... CONCURRENTLY cannot run inside a transaction block.
            runner.execute(session, [refresh_sql(r.view, attempt.mode)], relations=[r.view], transaction=False)
        except (errors.FeatureNotSupported, errors.ObjectNotInPrerequisiteState) as exc:
            # The catalog said CONCURRENTLY would work but the view changed since (index dropped,
            # refreshed WITH NO DATA): `preferred` still falls back, `required` reports it.
            if attempt.mode != "concurrent" or r.policy.concurrently != "preferred":
                raise
            stmt = refresh_sql(r.view, "blocking")
            attempt.mode, attempt.sql = "blocking", stmt.as_string(session)
            attempt.fallback_reason = f"cannot refresh concurrently: {exc.diag.message_primary}"
            _arm(session, deadline)
            runner.execute(session, [stmt], relations=[r.view], transaction=False)
    except errors.QueryCanceled:
        # Re-armed to the time left after lock retries, the statement timeout ends a lock wait too.
        if len(runner.waits) > waits_before:
            raise _OutOfTime from None
        raise
    attempt.seconds = time.monotonic() - attempt.started
    row = session.execute(ROWS_SQL, (r.oid,)).fetchone()
    attempt.rows = rows_estimate(row[0] if row else None)


def _guarded_refresh(ctx: JobContext, r: Refresh, connect: Callable[..., psycopg.Connection], attempt: _Attempt) -> None:
    assert r.oid is not None
    key = guard_key(r.oid)
    # The view's own session: its statement_timeout is the view's timeout.
    with connect(statement_timeout=r.policy.timeout) as session:
        got = session.execute(TRY_GUARD_SQL, (key,)).fetchone()
        if not (got and got[0]):
            raise _Skipped
        attempt.started = time.monotonic()
        try:
            _refresh(ctx, r, session, attempt)
        finally:
            # Closing the session releases the guard anyway; unlock early when we still can.
            with contextlib.suppress(psycopg.Error):
                session.execute(RELEASE_GUARD_SQL, (key,))


def error_message(view: QualifiedName, exc: Exception, policy: ViewPolicy, mode: Mode) -> str:
    """An operator-actionable message for a refresh that failed."""
    if isinstance(exc, LockTimeoutError):
        return f"{view}: {str(exc).removeprefix(f'{view}: ')}"
    if isinstance(exc, _OutOfTime):
        return (
            f"{view}: its lock was not granted within the view's timeout {format_duration(policy.timeout)}; "
            "see the lock_timeout findings for the blocking pids, then retry or raise timeout"
        )
    if isinstance(exc, errors.CardinalityViolation):
        return (
            f"{view}: the new data contains duplicate rows without any null column, which a concurrent "
            "refresh cannot apply; make the view's rows distinct (SELECT DISTINCT or a key column) "
            "or set concurrently: never"
        )
    if isinstance(exc, errors.UniqueViolation):
        index = exc.diag.constraint_name or "a unique index"
        return (
            f"{view}: the new data violates unique index {index} (duplicate key); fix the view's query "
            "so the key is unique, or change the index"
        )
    if isinstance(exc, errors.UndefinedTable):
        return f"{view}: materialized view does not exist; create it or remove it from the policy"
    if isinstance(exc, errors.InsufficientPrivilege):
        return (
            f"{view}: permission denied ({exc.diag.message_primary}); the session's role must own the view: "
            f"ALTER MATERIALIZED VIEW {view} OWNER TO <pgupkeep's role>"
        )
    if isinstance(exc, errors.QueryCanceled):
        return (
            f"{view}: refresh did not finish within the view's timeout {format_duration(policy.timeout)}; "
            "raise timeout or make the view's query faster"
        )
    if isinstance(exc, errors.FeatureNotSupported | errors.ObjectNotInPrerequisiteState) and mode == "concurrent":
        return (
            f"{view}: cannot refresh CONCURRENTLY: {exc.diag.message_primary}; create a unique index on plain "
            "columns without a WHERE clause and populate the view with one plain refresh, or set concurrently: preferred"
        )
    if isinstance(exc, psycopg.Error):
        state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        return f"{view}: refresh failed{state}: {str(exc).strip()}; fix the view's query or its data and retry"
    return f"{view}: refresh failed: {exc}"


def _fallback(reason: str | None) -> dict[str, str]:
    return {"fallback_reason": reason} if reason else {}


def _action(r: Refresh, sql_text: str, applied: bool, detail: dict[str, Any]) -> Action:
    detail = {"view": str(r.view), **detail}
    return Action("refresh_materialized_view", str(r.view), sql_text, applied, detail)


def plan(ctx: JobContext) -> Plan:
    section: MaterializedViewsSection = ctx.section
    out = Plan()
    run_started = time.monotonic()
    states, reads, maintain = read_catalog(ctx.conn, [p.view for p in section.views])
    refreshes = plan_refreshes(section, states, reads, items=ctx.items, maintain=maintain)
    connect = ctx.connect or functools.partial(db.connect, ctx.target)
    last: dict[str, tuple[float, float]] = ctx.memo.setdefault("last_refresh", {})  # view -> (finished, seconds)
    for gone in set(last) - {str(p.view) for p in section.views}:
        del last[gone]
    for r in refreshes:
        planned_sql = refresh_sql(r.view, r.mode).as_string(ctx.conn)
        planned = _action(r, planned_sql, False, {"mode": r.mode, "rows": r.rows, **_fallback(r.fallback_reason)})
        if r.problem is not None:
            out.errors.append(ItemError(str(r.view), r.problem))
            # Reported as a failed refresh when applying; printed as what would be tried in a plan.
            failed = _action(r, planned_sql, False, {"mode": r.mode, "outcome": "failure", "duration_seconds": 0.0, "rows": None})
            out.steps.append(Step(planned, lambda failed=failed: JobOutput(actions=[failed]), item=str(r.view), writes=False))
            continue
        out.steps.append(Step(planned, functools.partial(_refresh_step, ctx, r, connect, planned_sql, last, run_started), item=str(r.view)))

    def settle(applied: Sequence[Step]) -> JobOutput:
        result = JobOutput()
        if not ctx.apply:
            return result
        # Every view of the run keeps its last successful refresh (from an earlier run in this
        # process if this one failed or was skipped): a result's gauges replace the run's previous
        # ones, and a failing view's age must go on growing for PgupkeepMatviewStale.
        for r in refreshes:
            if (view := str(r.view)) in last:
                finished, seconds = last[view]
                result.samples.append(Sample("matview_last_refresh_timestamp_seconds", finished, {"view": view}))
                result.samples.append(Sample("matview_refresh_duration_seconds", seconds, {"view": view}))
        return result

    out.settle = settle
    return out


def _refresh_step(
    ctx: JobContext,
    r: Refresh,
    connect: Callable[..., psycopg.Connection],
    planned_sql: str,
    last: dict[str, tuple[float, float]],
    run_started: float,
) -> JobOutput:
    out = JobOutput()
    attempt = _Attempt(r.mode, planned_sql, r.fallback_reason, started=time.monotonic())
    try:
        _guarded_refresh(ctx, r, connect, attempt)
    except _Skipped:
        out.findings.append(
            Finding(
                "matview_refresh_skipped",
                str(r.view),
                None,
                f"{r.view}: another session is refreshing it (refresh guard held); skipped this run, "
                "the next scheduled run refreshes it",
                {"view": str(r.view), "reason": "refresh_in_progress"},
            )
        )
        return out
    except (psycopg.Error, LockTimeoutError, _OutOfTime) as exc:
        if ctx.stopping():
            raise  # a shutdown cancelled it: the runner reports the run cancelled, not a failed view
        out.errors.append(ItemError(str(r.view), error_message(r.view, exc, r.policy, attempt.mode)))
        seconds = time.monotonic() - attempt.started
        detail = {"mode": attempt.mode, "outcome": "failure", "duration_seconds": seconds, "rows": None}
        out.actions.append(_action(r, attempt.sql, False, {**detail, **_fallback(attempt.fallback_reason)}))
        return out
    detail = {"mode": attempt.mode, "outcome": "success", "duration_seconds": attempt.seconds, "rows": attempt.rows}
    out.actions.append(_action(r, attempt.sql, True, {**detail, **_fallback(attempt.fallback_reason)}))
    # The refresh's end on the run's (injected) clock: ctx.now plus the time since the run began.
    last[str(r.view)] = (ctx.now.timestamp() + (time.monotonic() - run_started), attempt.seconds)
    return out


def _schedule_groups(section: MaterializedViewsSection) -> list[ScheduleGroup]:
    return shared_schedules((str(v.view), section.schedule_of(v)) for v in section.views)


KIND = JobKind(name="materialized_views", plan=plan, writes=True, schedule_groups=_schedule_groups)
