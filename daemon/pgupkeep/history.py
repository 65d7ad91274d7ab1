"""The run history (`daemon.history`): one row per job run, of every kind, in a table of a database
the policy names, so "what did pgupkeep do last night" is a SQL query.

A sink like the log and the metrics, that must never block or fail a job: `record()` only puts the
result on a bounded queue; a thread of its own writes it on its own time-boxed session. While that
database is down the rows wait in the queue (retried with backoff); what does not fit is dropped
and counted. Old rows go by the history's own retention, hourly, in batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from pgupkeep import db
from pgupkeep.db.session import SESSION_KEEPALIVES
from pgupkeep.logs import get_logger
from pgupkeep.policy import HistoryPolicy
from pgupkeep.results import JobResult

QUEUE_SIZE = 1000  # runs waiting to be written; more are dropped (counted)
WRITE_BATCH = 200  # rows per INSERT transaction
RETRY_MAX = 10.0  # seconds between attempts to reach the database, at most
RETENTION_EVERY = 3600.0
RETENTION_BATCH = 10_000
# The history session's own budgets: it waits for nobody for long, and nobody waits for it.
CONNECT_TIMEOUT = timedelta(seconds=5)
STATEMENT_TIMEOUT = timedelta(seconds=30)
LOCK_TIMEOUT = timedelta(seconds=5)
IDLE_IN_TRANSACTION_TIMEOUT = timedelta(minutes=1)
# An advisory-lock key of our own: replicas that find the table missing create it one at a time.
DDL_LOCK = int.from_bytes(hashlib.sha256(b"pgupkeep history table").digest()[:8], "big", signed=True)

CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target text NOT NULL,
    job text NOT NULL,
    item text,
    outcome text NOT NULL,
    reason text,
    started_at timestamptz NOT NULL,
    duration_seconds double precision NOT NULL,
    actions jsonb NOT NULL DEFAULT '[]',
    findings jsonb NOT NULL DEFAULT '[]',
    error text,
    replica text
)"""
CREATE_INDEX = "CREATE INDEX IF NOT EXISTS {index} ON {table} (started_at)"
EXISTS_SQL = "SELECT to_regnamespace(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL"
INSERT = """
INSERT INTO {table} (target, job, item, outcome, reason, started_at, duration_seconds, actions, findings, error, replica)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""
# In batches, oldest first, each its own transaction: a first purge of a large table never holds
# one long transaction or lock.
PURGE = """
DELETE FROM {table} WHERE id IN (
    SELECT id FROM {table}
    WHERE started_at < now() - make_interval(months => %s, days => %s, secs => %s)
    ORDER BY started_at LIMIT %s)"""


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


def row(result: JobResult, replica: str) -> tuple[Any, ...]:
    out = result.to_dict()
    return (
        result.target, result.job, result.item, result.outcome, result.reason,
        datetime.fromtimestamp(result.started_at, UTC), result.duration_seconds,
        Jsonb(out["actions"], dumps=_dumps), Jsonb(out["findings"], dumps=_dumps), result.error, replica,
    )  # fmt: skip


class History:
    """The sink: `record` (never blocks), `start`, `close`."""

    def __init__(
        self,
        policy: HistoryPolicy,
        on_failure: Callable[[str, int], None] = lambda reason, rows: None,
        on_dropped: Callable[[str, int], None] = lambda reason, rows: None,
        queue_size: int = QUEUE_SIZE,
        retry_max: float = RETRY_MAX,
    ):
        self.policy = policy
        self._on_failure = on_failure
        self._on_dropped = on_dropped
        self._queue: queue.Queue[JobResult] = queue.Queue(maxsize=queue_size)
        self._retry_max = retry_max
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._next_attempt = 0.0
        self._attempts = 0
        self._outage: tuple[float, int] | None = None  # (since, rows dropped since) while failing
        self._outage_lock = threading.Lock()  # record() drops on the jobs' threads
        self._next_purge = 0.0
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.log = get_logger(component="history", table=str(policy.table))

    # ------------------------------------------------------------------ the sink

    def record(self, result: JobResult) -> None:
        """Queue a run for the history; never blocks, never raises."""
        # `plan` changed nothing; a replica that does not lead ran nothing (the leader writes).
        if not result.applied or result.reason == "not_leader":
            return
        try:
            self._queue.put_nowait(result)
        except queue.Full:
            self._dropped("queue_full", 1)

    def start(self) -> History:
        self._thread = threading.Thread(target=self._loop, name="history-writer", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued within `timeout`, then stop; what is left is dropped (counted)."""
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            # A write in flight when time is up dies with the process (the server rolls it back).
            self._thread.join(timeout + 1)

    def queued(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ the writer thread

    def _loop(self) -> None:
        pending: list[JobResult] = []
        try:
            while True:
                try:
                    if not pending:
                        pending = self._take()
                        if not pending:
                            if self._stop.is_set():
                                return
                            self._purge_when_due()
                            continue
                    if self._stop.is_set() and time.monotonic() >= self._deadline:
                        self._dropped("shutdown", len(pending) + self._queue.qsize())
                        return
                    if not self._connected():
                        self._stop.wait(min(max(self._next_attempt - time.monotonic(), 0.05), 1.0))
                        continue
                    if self._write(pending):
                        pending = []
                    self._purge_when_due()
                except Exception as exc:  # a bug here must not end the history for good
                    self._disconnect()
                    self._failed("rejected", exc)
                    self._dropped("rejected", len(pending))
                    pending = []
        finally:
            self._disconnect()

    def _take(self) -> list[JobResult]:
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < WRITE_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _connected(self) -> bool:
        if self._conn is not None and not self._conn.closed:
            return True
        if time.monotonic() < self._next_attempt:
            return False
        try:
            self._conn = self._connect()
            self._ensure_table(self._conn)
            return True
        except psycopg.Error as exc:
            self._disconnect()
            self._failed("unavailable", exc)
            return False

    def _connect(self) -> psycopg.Connection:
        params = conninfo_to_dict(self.policy.dsn)
        params.update(
            application_name=db.APPLICATION_NAME,
            connect_timeout=str(int(CONNECT_TIMEOUT.total_seconds())),
            options=db.session_options(
                lock_timeout=LOCK_TIMEOUT,
                statement_timeout=STATEMENT_TIMEOUT,
                idle_in_transaction_session_timeout=IDLE_IN_TRANSACTION_TIMEOUT,
                existing=params.pop("options", None),
            ),
            **SESSION_KEEPALIVES,
        )
        try:
            return psycopg.connect(make_conninfo(**params), autocommit=True)
        except psycopg.Error as exc:
            raise psycopg.OperationalError(db.redact(str(exc).strip(), self.policy.dsn)) from None

    def _ensure_table(self, conn: psycopg.Connection) -> None:
        # Only what is missing is created: CREATE ... IF NOT EXISTS checks the CREATE privilege
        # even when the object exists, and a role may have been given a table made for it.
        t = self.policy.table
        table = sql.Identifier(*t.parts)
        schema_ok, table_ok = conn.execute(EXISTS_SQL, (sql.Identifier(t.schema).as_string(conn), table.as_string(conn))).fetchone() or (False, False)
        if schema_ok and table_ok:
            return
        index = sql.Identifier(f"{t.name[:48]}_started_at_idx")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK,))
            if not schema_ok:
                conn.execute(sql.SQL(CREATE_SCHEMA).format(schema=sql.Identifier(t.schema)))
            conn.execute(sql.SQL(CREATE_TABLE).format(table=table))
            conn.execute(sql.SQL(CREATE_INDEX).format(index=index, table=table))
        self.log.info("history_table_created", message=f"created {t} for the run history (if it was missing)")

    def _write(self, results: list[JobResult]) -> bool:
        """Insert the rows in one transaction. True: done (written, or rejected and dropped);
        False: the database is out of reach and the rows wait."""
        assert self._conn is not None
        query = sql.SQL(INSERT).format(table=sql.Identifier(*self.policy.table.parts))
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.executemany(query, [row(r, self.replica) for r in results])
        except psycopg.OperationalError as exc:
            self._disconnect()
            self._failed("unavailable", exc)
            return False
        except psycopg.Error as exc:
            # The database refused these rows (a table of another shape, a privilege): retrying
            # them would fail alike. Dropped; the table is checked again on a new session.
            self._disconnect()
            self._failed("rejected", exc)
            self._dropped("rejected", len(results))
            return True
        self._recovered()
        return True

    def _purge_when_due(self) -> None:
        # Due at start-up too: the table is made (or its absence reported) before the first run ends.
        if time.monotonic() < self._next_purge or not self._connected():
            return
        assert self._conn is not None
        self._next_purge = time.monotonic() + RETENTION_EVERY
        r = self.policy.retention
        query = sql.SQL(PURGE).format(table=sql.Identifier(*self.policy.table.parts))
        removed = 0
        try:
            while not self._stop.is_set():
                deleted = self._conn.execute(query, (r.months, r.days, r.seconds, RETENTION_BATCH)).rowcount
                removed += max(deleted, 0)
                if deleted < RETENTION_BATCH:
                    break
        except psycopg.Error as exc:
            self.log.warning("history_purge_failed", error=db.redact(str(exc).strip(), self.policy.dsn))
            if isinstance(exc, psycopg.OperationalError):
                self._disconnect()
            return
        if removed:
            self.log.info("history_purged", rows=removed, retention=str(r))

    # ------------------------------------------------------------------ bookkeeping

    def _failed(self, reason: str, exc: BaseException) -> None:
        self._attempts += 1
        self._next_attempt = time.monotonic() + min(self._retry_max, 0.5 * 2 ** min(self._attempts, 10))
        self._on_failure(reason, 1)
        with self._outage_lock:
            first = self._outage is None
            if first:
                self._outage = (time.monotonic(), 0)
        if first:  # one line per outage, not per attempt
            self.log.warning(
                "history_write_failed", reason=reason, error=db.redact(str(exc).strip(), self.policy.dsn),
                queued=self._queue.qsize(),
                message="job runs go on; the history is written again once its database answers "
                        f"(rows wait in a queue of {self._queue.maxsize}; beyond that they are dropped and counted)",
            )  # fmt: skip

    def _dropped(self, reason: str, rows: int) -> None:
        if rows <= 0:
            return
        self._on_dropped(reason, rows)
        with self._outage_lock:
            if self._outage is not None:
                since, dropped = self._outage
                self._outage = (since, dropped + rows)

    def _recovered(self) -> None:
        self._attempts = 0
        with self._outage_lock:
            outage, self._outage = self._outage, None
        if outage is not None:
            since, dropped = outage
            self.log.info("history_write_resumed", failing_seconds=round(time.monotonic() - since, 1), dropped=dropped)

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # a broken session is gone either way
                self.log.debug("history_session_close_failed")
            self._conn = None
