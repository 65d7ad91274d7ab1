"""Rebuilding indexes: `REINDEX INDEX CONCURRENTLY` of bloated indexes and of invalid ones a failed
`CREATE INDEX CONCURRENTLY` left, one step each, inside `reindex_window`, under lock_timeout with
retries; and `DROP INDEX CONCURRENTLY` of the `_ccnew`/`_ccold` copies a failed REINDEX leaves.

A REINDEX CONCURRENTLY that fails after its first transaction leaves an invalid `<index>_ccnew`
that every write to the table keeps maintaining: the step drops it before retrying and after
giving up, so a failure never leaves more bloat behind than it found.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from pgupkeep.db import DdlRunner, LockTimeoutError
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.bloat.indexes import CCNEW_SUFFIXES, IndexRow
from pgupkeep.policy import BloatSection
from pgupkeep.results import Action, ItemError, JobOutput, Step
from pgupkeep.schedules import Schedule
from pgupkeep.units import QualifiedName

# Invalid REINDEX CONCURRENTLY copies on one table, to tell which ones a failed attempt left.
TRANSIENT_SQL = r"""
SELECT c.oid, n.nspname, c.relname
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indrelid = %s AND NOT i.indisvalid AND c.relname ~ '_cc(new|old)[0-9]*$'
"""


def in_window(window: Schedule | None, moment: datetime, zone: ZoneInfo) -> bool:
    """Does the minute of `moment` (in the policy's timezone) match the window's cron fields?"""
    if window is None:
        return True
    minute = moment.astimezone(zone).replace(second=0, microsecond=0)
    fire = window.trigger(zone).get_next_fire_time(None, minute)
    return fire is not None and fire.timestamp() == minute.timestamp()


@dataclass(frozen=True)
class Rebuild:
    row: IndexRow
    reason: str  # "bloat" | "invalid"
    bloat_ratio: float | None = None

    @property
    def index(self) -> str:
        return self.row.qualified


def reindex_state(row: IndexRow, section: BloatSection, *, standby: bool, open_window: bool) -> str:
    """What becomes of an index that needs a rebuild: planned, or why not."""
    if not section.reindex:
        return "off"
    if standby:
        return "skipped_standby"
    if row.exclusion:
        return "not_supported"  # REINDEX CONCURRENTLY cannot rebuild an exclusion constraint's index
    if row.size_bytes is not None and row.size_bytes > section.max_reindex_size:
        return "too_large"
    if not open_window:
        return "outside_window"
    return "planned"


def reindex_sql(row: IndexRow) -> sql.Composed:
    return sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(sql.Identifier(row.schema, row.name))


def drop_sql(schema: str, name: str) -> sql.Composed:
    return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, name))


def _transients(conn: psycopg.Connection, table_oid: int) -> dict[int, tuple[str, str]]:
    return {int(oid): (schema, name) for oid, schema, name in conn.execute(TRANSIENT_SQL, (table_oid,)).fetchall()}


def _left_by(name: str, index: str) -> bool:
    """Is `name` a copy REINDEX CONCURRENTLY made of `index` (names are cut to fit 63 bytes)?"""
    base = name.rstrip("0123456789")
    for suffix in CCNEW_SUFFIXES:
        if base.endswith(suffix):
            stem = base[: -len(suffix)]
            return bool(stem) and index.startswith(stem)
    return False


class _Cleanup:
    """Drops the invalid copies a failed REINDEX of one index left on its table."""

    def __init__(self, ctx: JobContext, row: IndexRow, before: set[int]):
        self.ctx, self.row, self.before = ctx, row, before
        self.dropped: list[str] = []
        self.left: list[str] = []

    def run(self) -> None:
        conn = self.ctx.conn
        base = self.ctx.ddl_runner
        assert base is not None
        # One attempt each: the same blocker would make a retry wait again; a later run drops it.
        once = DdlRunner(lock_timeout=base.lock_timeout, retries=0, sleep=self.ctx.sleep, rng=base.rng, waits=base.waits)
        for oid, (schema, name) in _transients(conn, self.row.table_oid).items():
            if oid in self.before or not _left_by(name, self.row.name):
                continue
            qualified = f"{schema}.{name}"
            try:
                once.execute(conn, [drop_sql(schema, name)], relations=[QualifiedName(schema, name)], transaction=False)
                self.dropped.append(qualified)
            except (LockTimeoutError, psycopg.Error):
                self.left.append(qualified)


def reindex_step(ctx: JobContext, rebuild: Rebuild, window: Schedule | None, started: float) -> Step:
    """REINDEX INDEX CONCURRENTLY one index, under lock_timeout with jittered retries."""
    row = rebuild.row
    stmt = reindex_sql(row)
    text = stmt.as_string(ctx.conn)
    detail: dict[str, object] = {"index": row.qualified, "table": row.table, "reason": rebuild.reason, "size_bytes": row.size_bytes}
    if rebuild.bloat_ratio is not None:
        detail["bloat_ratio"] = round(rebuild.bloat_ratio, 4)
    planned = Action("reindex_index", row.qualified, text, applied=False, detail=detail)

    def apply() -> JobOutput:
        # A long run may reach a later step after the window closed: then it waits for the next.
        now = ctx.now + timedelta(seconds=time.monotonic() - started)
        if not in_window(window, now, ctx.timezone):
            return JobOutput(actions=[Action("reindex_index", row.qualified, text, False, {**detail, "skipped_reason": "reindex_window closed"})])
        conn = ctx.conn
        cleanup = _Cleanup(ctx, row, set(_transients(conn, row.table_oid)))
        base = ctx.ddl_runner
        assert base is not None

        def between_attempts(seconds: float) -> None:
            cleanup.run()
            ctx.sleep(seconds)

        runner = DdlRunner(lock_timeout=base.lock_timeout, retries=base.retries, sleep=between_attempts, rng=base.rng, waits=base.waits)
        relations = [QualifiedName(row.schema, row.name), QualifiedName(*row.table_ident)]
        t0 = time.monotonic()
        try:
            # REINDEX ... CONCURRENTLY cannot run in a transaction block; the session is autocommit.
            runner.execute(conn, [stmt], relations=relations, transaction=False)
        except (LockTimeoutError, psycopg.Error) as exc:
            cleanup.run()
            return _failed(row, planned, exc, cleanup, ctx)
        # The rebuilt index is a new relation (a new oid) under the old name.
        size = conn.execute("SELECT pg_relation_size(to_regclass(%s))", (sql.Identifier(row.schema, row.name).as_string(conn),)).fetchone()
        done = {**detail, "outcome": "success", "seconds": round(time.monotonic() - t0, 3),
                "size_bytes_after": int(size[0]) if size and size[0] is not None else None}  # fmt: skip
        if cleanup.dropped:
            done["dropped"] = cleanup.dropped
        return JobOutput(actions=[Action("reindex_index", row.qualified, text, True, done)])

    return Step(planned, apply, item=row.qualified)


def _failed(row: IndexRow, planned: Action, exc: BaseException, cleanup: _Cleanup, ctx: JobContext) -> JobOutput:
    if isinstance(exc, LockTimeoutError):
        what = f"{exc}; REINDEX will be tried again on the next run"
    elif isinstance(exc, psycopg.errors.QueryCanceled) and not ctx.stopping():
        what = f"{row.qualified}: REINDEX did not finish within statement_timeout; raise statement_timeout for this target"
    else:
        what = f"{row.qualified}: REINDEX INDEX CONCURRENTLY failed: {str(exc).strip()}"
    if cleanup.left:
        what += (f"; its invalid copies {cleanup.left} could not be dropped now (lock_timeout) and are dropped "
                 "by the next run")  # fmt: skip
    elif cleanup.dropped:
        what += f"; the invalid copies it left were dropped ({', '.join(cleanup.dropped)})"
    detail = {**planned.detail, "outcome": "failure", "dropped": cleanup.dropped}
    return JobOutput(
        actions=[Action("reindex_index", row.qualified, planned.sql, False, detail)],
        errors=[ItemError(row.qualified, what)],
    )


def leftover_step(ctx: JobContext, row: IndexRow) -> Step:
    """DROP INDEX CONCURRENTLY an invalid `_ccnew`/`_ccold` copy no REINDEX is working on."""
    stmt = drop_sql(row.schema, row.name)
    text = stmt.as_string(ctx.conn)
    detail = {"index": row.qualified, "table": row.table, "reason": "left by a failed REINDEX CONCURRENTLY", "size_bytes": row.size_bytes}
    planned = Action("drop_invalid_index", row.qualified, text, applied=False, detail=detail)

    def apply() -> JobOutput:
        try:
            ctx.run_ddl([stmt], relations=[QualifiedName(row.schema, row.name)], transaction=False)
        except LockTimeoutError as exc:
            return JobOutput(actions=[planned], errors=[ItemError(row.qualified, f"{exc}; it is dropped by a later run")])
        return JobOutput(actions=[Action("drop_invalid_index", row.qualified, text, True, {**detail, "outcome": "success"})])

    return Step(planned, apply, item=row.qualified)


def rebuild_steps(ctx: JobContext, rebuilds: Sequence[Rebuild], leftovers: Sequence[IndexRow]) -> list[Step]:
    section: BloatSection = ctx.section
    started = time.monotonic()
    steps = [leftover_step(ctx, row) for row in leftovers]
    return steps + [reindex_step(ctx, r, section.reindex_window, started) for r in rebuilds]
