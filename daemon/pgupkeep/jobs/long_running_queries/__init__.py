"""The `long_running_queries` job: session judgement in one place. Flag long-running queries,
idle-in-transaction sessions and blocking chains of the target's database (of the whole server with
`scope: server`), and cancel or terminate sessions only where the policy says so.

Read-only (it only signals), so it runs on a standby too. activity.py measures and judges
sessions, blocking.py lock chains, signals.py sends (or, in dry_run, reports) the signals.
"""

from __future__ import annotations

from psycopg import sql

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.policy import LongRunningQueriesSection
from pgupkeep.results import ItemError, Plan

from . import activity, blocking
from .activity import Activity, Judgement, Signal, judge, measure
from .signals import signal_sql, signal_steps

__all__ = ["KIND", "Activity", "Judgement", "Signal", "blocking", "judge", "measure", "plan", "signal_sql", "signal_steps"]


def plan(ctx: JobContext) -> Plan:
    section: LongRunningQueriesSection = ctx.section
    j = judge(measure(ctx.conn, section, ctx.target.log_query_text or "truncated"), section)
    terminating = {s.activity.pid for s in j.signals if s.action == "terminate_backend"}
    chains = blocking.judge(blocking.read(ctx.conn, section), section, terminating)
    errors = []
    hidden, role = activity.hidden(ctx.conn, section)
    if hidden:
        errors.append(
            ItemError(
                "pg_stat_activity",
                f"pg_stat_activity: {hidden} sessions of other roles are hidden from role {role}, so they "
                f"cannot be measured; GRANT pg_read_all_stats TO {sql.Identifier(role).as_string(ctx.conn)}",
            )
        )
    return Plan(
        steps=signal_steps(ctx, [*j.signals, *chains.signals]),
        findings=[*j.findings, *chains.findings],
        samples=[*j.samples, *chains.samples],
        errors=errors,
    )


KIND = JobKind(name="long_running_queries", plan=plan, writes=False)
