"""The `sql` job: named statements, each on its own schedule, run on the target's leader with the
session settings of every pgupkeep session, its own timeout, and batching that never holds one
long transaction.

Each batch is a step: before it the runner checks the lease and shutdown, so a run stops between
batches. A batch that wants another adds the next step right after itself.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import psycopg

from pgupkeep import db
from pgupkeep.db import LockTimeoutError
from pgupkeep.jobs.base import JobContext, JobKind, ScheduleGroup
from pgupkeep.jobs.sql.batches import StatementRun, error_message, explain
from pgupkeep.policy import SqlJob, SqlSection
from pgupkeep.results import Action, ItemError, JobOutput, Plan, Sample, Step
from pgupkeep.schedules import Schedule, longest_gap
from pgupkeep.units import format_duration


def _planned(ctx: JobContext, job: SqlJob, timeout: str) -> Action:
    following = job.schedule.trigger(ctx.timezone).get_next_fire_time(None, ctx.now)
    detail: dict[str, object] = {
        "name": job.name,
        "schedule": str(job.schedule),
        "next_run": following.isoformat() if following else None,
        "transaction": job.transaction,
        "writes": job.writes,
        "timeout": timeout,
    }
    if job.repeat_until_rows_below is not None:
        detail.update(repeat_until_rows_below=job.repeat_until_rows_below, max_batches=job.max_batches)
    return Action("run_sql", job.name, job.sql, False, detail)


def _period(ctx: JobContext, schedule: Schedule) -> float:
    """Seconds between two runs at most (cached: walking a cron schedule takes a while)."""
    periods: dict[str, float] = ctx.memo.setdefault("periods", {})
    key = f"{schedule}|{ctx.timezone}"
    if key not in periods:
        periods[key] = longest_gap(schedule, ctx.timezone, ctx.now).total_seconds()
    return periods[key]


def plan(ctx: JobContext) -> Plan:
    section: SqlSection = ctx.section
    jobs = [j for j in section.jobs if ctx.items is None or j.name in ctx.items]
    connect = ctx.connect or functools.partial(db.connect, ctx.target)
    # name -> (finished, seconds) of its last successful run in this process, for the gauges.
    last: dict[str, tuple[float, float]] = ctx.memo.setdefault("last_success", {})
    for gone in set(last) - {j.name for j in section.jobs}:
        del last[gone]
    run_started = time.monotonic()
    out = Plan()
    runs: list[StatementRun] = []
    for job in jobs:
        out.samples.append(Sample("sql_period_seconds", _period(ctx, job.schedule), {"name": job.name}))
        timeout = job.timeout or ctx.target.session.statement_timeout
        planned = _planned(ctx, job, format_duration(timeout))
        if ctx.standby and job.writes:
            # Only in a run that mixes reading and writing statements (once, plan): the others
            # run, this one waits for a primary.
            skipped = Action("run_sql", job.name, job.sql, False, {**planned.detail, "outcome": "skipped", "reason": "standby"})
            out.steps.append(Step(skipped, lambda s=skipped: JobOutput(actions=[s]), item=job.name, writes=False))
            continue
        if job.explain and not ctx.apply:
            try:
                planned = Action("run_sql", job.name, job.sql, False, {**planned.detail, "explain": explain(ctx.conn, job)})
            except psycopg.Error as exc:
                out.errors.append(ItemError(job.name, f"{job.name}: EXPLAIN failed [{exc.sqlstate}]: {str(exc).strip()}"))
        run = StatementRun(job, timeout)
        runs.append(run)
        out.steps.append(_batch_step(ctx, run, planned, connect, out.steps))

    def settle(applied: Sequence[Step]) -> JobOutput:
        result = JobOutput()
        for run in runs:
            run.close()  # a run stopped between batches still holds its session
            if run.started is None:
                continue
            result.actions.append(run.action())
            if run.outcome == "success":
                last[run.name] = (ctx.now.timestamp() + (time.monotonic() - run_started), run.seconds)
        for job in jobs:
            if job.name in last:
                when, seconds = last[job.name]
                result.samples.append(Sample("sql_last_success_timestamp_seconds", when, {"name": job.name}))
                result.samples.append(Sample("sql_last_duration_seconds", seconds, {"name": job.name}))
        return result

    out.settle = settle
    return out


def _batch_step(
    ctx: JobContext, run: StatementRun, planned: Action, connect: Callable[..., psycopg.Connection], steps: list[Step]
) -> Step:
    """The step that runs the next batch of `run` and, while more are wanted, adds the step of the
    batch after it (so the runner checks lease and shutdown before each batch)."""
    step: Step

    def apply() -> JobOutput:
        try:
            rows = run.batch(ctx, connect)
        except (psycopg.Error, LockTimeoutError) as exc:
            if ctx.stopping():
                raise  # a shutdown cancelled it: the runner reports the run cancelled
            message = error_message(run, exc)
            run.finish("failure")
            return JobOutput(errors=[ItemError(run.name, message)])
        # Anything else (the runner's stop: a shutdown in a retry's pause, a lease lost while the
        # session opened) goes to the runner, which ends the run there; settle closes the session.
        if not run.wants_more(rows):
            run.finish("success")
            return JobOutput()
        # The pause first, then the next step: the runner's fence check comes right before the
        # batch it guards. A shutdown during the pause ends the run here (RunStopped).
        if run.job.pause_between_batches.total_seconds() > 0:
            ctx.sleep(run.job.pause_between_batches.total_seconds())
        here = next(i for i, s in enumerate(steps) if s is step)
        steps.insert(here + 1, _batch_step(ctx, run, planned, connect, steps))
        return JobOutput()

    step = Step(planned, apply, item=run.name, writes=run.job.writes)
    return step


def _schedule_groups(section: SqlSection) -> list[ScheduleGroup]:
    # Each statement alone: a long one never delays another, and each is skipped (not queued) on
    # its own overrun. A cron schedule fires at its times only, as in cron; `every` also at
    # start-up, so restarts more frequent than the interval cannot starve it.
    return [ScheduleGroup((job.name,), job.schedule, key=job.name, at_start=job.schedule.every is not None) for job in section.jobs]


def _writes(section: SqlSection, items: tuple[str, ...] | None) -> bool:
    return all(job.writes for job in section.jobs if items is None or job.name in items)


KIND = JobKind(name="sql", plan=plan, writes=True, schedule_groups=_schedule_groups, writes_items=_writes)
