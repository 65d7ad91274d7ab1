"""`VACUUM (ANALYZE)` of flagged tables, one step each (never FULL), on one session for the run."""

from __future__ import annotations

import contextlib

import psycopg
from psycopg import sql

from pgupkeep.db import LockTimeoutError
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.bloat.estimate import TableBloat
from pgupkeep.results import Action, ItemError, JobOutput, Step
from pgupkeep.units import QualifiedName


def vacuum_sql(t: TableBloat) -> sql.Composed:
    assert t.ident is not None
    return sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(*t.ident))


class VacuumSession:
    """One session for all of a run's VACUUMs, opened at the first, with the vacuum timeout; it
    collects the WARNINGs by which VACUUM says it skipped a table."""

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.conn: psycopg.Connection | None = None
        self.warnings: list[str] = []

    def get(self) -> psycopg.Connection:
        if self.conn is None:
            ctx = self.ctx
            self.conn = ctx.connect(statement_timeout=ctx.section.vacuum_timeout) if ctx.connect else ctx.conn
            self.conn.add_notice_handler(
                lambda d: self.warnings.append(d.message_primary or "") if d.severity_nonlocalized == "WARNING" else None
            )
        return self.conn

    def close(self) -> None:
        if self.conn is not None and self.conn is not self.ctx.conn:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()


def vacuum_step(ctx: JobContext, t: TableBloat, session: VacuumSession) -> Step:
    """VACUUM (ANALYZE) one table (never FULL)."""
    assert t.ident is not None
    stmt = vacuum_sql(t)
    text = stmt.as_string(ctx.conn)

    def apply() -> JobOutput:
        conn = session.get()
        session.warnings.clear()
        failed = JobOutput(actions=[_action(t, text, applied=False, outcome="failure")])
        try:
            # VACUUM cannot run in a transaction block; the session is autocommit.
            ctx.run_ddl([stmt], relations=[QualifiedName(*t.ident)], transaction=False, conn=conn)
        except LockTimeoutError as exc:
            failed.errors.append(ItemError(t.table, f"{exc}; VACUUM will be tried again on the next run"))
            return failed
        except psycopg.errors.QueryCanceled:
            failed.errors.append(ItemError(
                t.table, f"{t.table}: VACUUM did not finish within vacuum_timeout; raise vacuum_timeout or vacuum it by hand"))
            return failed
        except psycopg.Error as exc:
            failed.errors.append(ItemError(t.table, f"{t.table}: VACUUM failed: {str(exc).strip()}"))
            return failed
        skipped = [w for w in session.warnings if "skipping" in w]
        if skipped:
            # Not the owner (nor MAINTAIN): VACUUM only warns and does nothing.
            failed.errors.append(ItemError(
                t.table, f"{t.table}: VACUUM skipped it ({skipped[0]}); grant the pgupkeep role ownership or MAINTAIN"))
            return failed
        return JobOutput(actions=[_action(t, text, applied=True, outcome="success")])

    return Step(_action(t, text, applied=False), apply, item=t.table)


def _action(t: TableBloat, text: str, *, applied: bool, outcome: str | None = None) -> Action:
    detail: dict[str, object] = {"table": t.table, "dead_tuples": t.dead_tuples, "bloat_ratio": round(t.bloat_ratio, 4)}
    if outcome:
        detail["outcome"] = outcome
    return Action(action="vacuum_table", object=t.table, sql=text, applied=applied, detail=detail)
