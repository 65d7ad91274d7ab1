"""Running one named statement: its own session, each batch its own transaction (or autocommit),
lock waits bounded by lock_timeout with retries, and the sessions that blocked it named.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import errors

from pgupkeep.db import LockTimeoutError
from pgupkeep.jobs.base import JobContext
from pgupkeep.policy import SqlJob
from pgupkeep.results import Action
from pgupkeep.units import format_duration

# The sessions a statement waits for, while it waits for a lock (heavyweight or row): sampled from
# another session, since once lock_timeout has fired the waiting backend has nothing left to show.
WAITING_FOR_SQL = """
SELECT pg_blocking_pids(a.pid)
FROM pg_stat_activity a
WHERE a.pid = %s AND a.wait_event_type = 'Lock'
"""
READ_ONLY = "-c default_transaction_read_only=on"


class BlockerWatch:
    """Samples, from `conn`, which sessions block backend `pid`, while a statement runs there."""

    def __init__(self, conn: psycopg.Connection, pid: int, lock_timeout: timedelta):
        self._conn = conn
        self._pid = pid
        self._every = min(max(lock_timeout.total_seconds() / 4, 0.02), 0.5)
        # A sample older than the last lock wait cannot be about it.
        self._fresh_for = lock_timeout.total_seconds() + 2 * self._every
        self._last: tuple[float, list[int]] = (0.0, [])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sql-blockers-{pid}", daemon=True)

    def __enter__(self) -> BlockerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def blockers(self) -> list[int]:
        """The sessions the last lock wait waited for (empty when none was seen)."""
        seen, pids = self._last
        return pids if time.monotonic() - seen <= self._fresh_for else []

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                row = self._conn.execute(WAITING_FOR_SQL, (self._pid,)).fetchone()
            except psycopg.Error:
                return  # the run's session is gone: the statement's own error says why
            if row and row[0]:
                self._last = (time.monotonic(), sorted(row[0]))


@dataclass
class StatementRun:
    """One run of a named statement, batch by batch; what settles into its `run_sql` action."""

    job: SqlJob
    timeout: timedelta
    rows: list[int] = field(default_factory=list)  # per batch; -1 when the statement reports none
    started: float | None = None
    seconds: float = 0.0
    outcome: str | None = None  # success | failure; None while going (or stopped between batches)
    complete: bool = False  # ended by affecting fewer rows than the threshold (or not batching)
    session: psycopg.Connection | None = None

    @property
    def name(self) -> str:
        return self.job.name

    def batch(self, ctx: JobContext, connect: Callable[..., psycopg.Connection]) -> int:
        """Run one more batch; returns the rows it affected."""
        if self.started is None:
            self.started = time.monotonic()
        if self.session is None:
            options = () if self.job.writes else (READ_ONLY,)
            self.session = connect(statement_timeout=self.timeout, extra_options=options)
        assert ctx.ddl_runner is not None
        runner = ctx.ddl_runner
        with BlockerWatch(ctx.conn, self.session.info.backend_pid, runner.lock_timeout) as watch:
            rows = runner.execute(
                self.session, [self.job.sql], relations=(), transaction=self.job.transaction,
                params=self.job.params, blockers=watch.blockers, label=self.name,
            )  # fmt: skip
        self.rows.append(rows)
        self.seconds = time.monotonic() - self.started
        return rows

    def wants_more(self, rows: int) -> bool:
        threshold = self.job.repeat_until_rows_below
        if threshold is None or rows < threshold:
            self.complete = True
            return False
        return len(self.rows) < self.job.max_batches

    def finish(self, outcome: str) -> None:
        self.outcome = outcome
        if self.started is not None:
            self.seconds = time.monotonic() - self.started
        self.close()

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):  # a broken session is gone either way
                self.session.close()
            self.session = None

    def total_rows(self) -> int | None:
        counted = [r for r in self.rows if r >= 0]
        return sum(counted) if counted else None

    def action(self) -> Action:
        """The run as an applied (or attempted) `run_sql` action; a run that neither finished nor
        failed was stopped between batches (shutdown, lost lease)."""
        outcome = self.outcome or "cancelled"
        detail: dict[str, Any] = {
            "name": self.name,
            "outcome": outcome,
            "rows": self.total_rows(),
            "batches": len(self.rows),
            "rows_per_batch": [r if r >= 0 else None for r in self.rows],
            "duration_seconds": round(self.seconds, 6),
            "transaction": self.job.transaction,
        }
        if self.job.repeat_until_rows_below is not None:
            # False: max_batches ran out while batches still affected repeat_until_rows_below rows.
            detail["complete"] = self.complete
        return Action("run_sql", self.name, self.job.sql, bool(self.rows), detail)


def error_message(run: StatementRun, exc: BaseException) -> str:
    """What went wrong with a batch, and what the operator can do about it."""
    name, batch = run.name, len(run.rows) + 1
    where = f"{name}: batch {batch}" if run.job.repeat_until_rows_below is not None else name
    if isinstance(exc, LockTimeoutError):
        return str(exc)
    if isinstance(exc, errors.QueryCanceled) and "statement timeout" in str(exc):
        return f"{where} did not finish within timeout {format_duration(run.timeout)}; raise timeout, or batch the statement"
    if not isinstance(exc, psycopg.Error):
        return f"{where} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:  # no answer from the server
        return f"{where} failed: {str(exc).strip()}"
    state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
    text = (exc.diag.message_primary or str(exc)).strip()
    hint = _HINTS.get(type(exc))
    return f"{where} failed{state}: {text}" + (f"; {hint}" if hint else "")


_HINTS: dict[type[BaseException], str] = {
    errors.ActiveSqlTransaction: "set transaction: false",
    errors.InvalidTransactionTermination: "a statement that commits must run outside a transaction block: set transaction: false",
    errors.ReadOnlySqlTransaction: "the statement writes: set writes: true (and it does not run on a standby)",
    errors.InsufficientPrivilege: "grant pgupkeep's role what the statement needs (docs/least-privilege.md)",
}


def explain(conn: psycopg.Connection, job: SqlJob) -> list[str]:
    """The statement's plan, in a read-only transaction rolled back at once (EXPLAIN without
    ANALYZE runs nothing; the parameters are bound as they would be)."""
    with conn.transaction(force_rollback=True):
        conn.execute("SET TRANSACTION READ ONLY")
        rows: Sequence[Any] = psycopg.RawCursor(conn).execute("EXPLAIN " + job.sql, list(job.params), prepare=True).fetchall()
    return [str(row[0]) for row in rows]
