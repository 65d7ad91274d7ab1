"""Lock-bounded DDL: every statement runs under `lock_timeout`, is retried with jittered backoff,
and on giving up names the sessions that held the lock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgupkeep.units import QualifiedName

BLOCKERS_SQL = """
SELECT coalesce(array_agg(DISTINCT l.pid ORDER BY l.pid), '{}')
FROM pg_locks l
WHERE l.granted
  AND l.pid <> pg_backend_pid()
  AND l.relation IN (SELECT to_regclass(r) FROM unnest(%s::text[]) AS r)
"""


class LockTimeoutError(Exception):
    """DDL gave up after every retry; carries the pids that held the lock."""

    def __init__(self, relation: str, attempts: int, blocking_pids: Sequence[int], lock_timeout: timedelta):
        self.relation = relation
        self.attempts = attempts
        self.blocking_pids = list(blocking_pids)
        super().__init__(
            f"{relation}: could not get a lock within lock_timeout {lock_timeout.total_seconds():g}s "
            f"after {attempts} attempts; blocked by pids {self.blocking_pids or 'unknown'} "
            "(see pg_stat_activity; raise lock_timeout/lock_retries or retry later)"
        )


@dataclass(frozen=True)
class LockWait:
    """One DDL attempt that gave up on its lock."""

    relation: str
    attempt: int
    blocking_pids: tuple[int, ...]
    statement: str


@dataclass
class DdlRunner:
    """Runs DDL under `lock_timeout` with jittered, bounded retries."""

    lock_timeout: timedelta
    retries: int
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    waits: list[LockWait] = field(default_factory=list)

    def backoff(self, attempt: int) -> float:
        # Short, growing, jittered pauses: between attempts the application's queued lock
        # requests (which waited at most lock_timeout behind ours) drain.
        base = min(0.1 * 2**attempt, 5.0)
        return base * self.rng.uniform(0.5, 1.5)

    def execute(
        self,
        conn: psycopg.Connection,
        statements: Sequence[sql.Composable | str],
        *,
        relations: Iterable[QualifiedName],
        transaction: bool = True,
        params: Sequence[Any] | None = None,
        blockers: Callable[[], Sequence[int]] | None = None,
        label: str | None = None,
    ) -> int:
        """Run `statements` (in one transaction, or each in autocommit); returns the rows the last
        one affected (-1 when it reports none).

        With `params` each statement is sent as written, with PostgreSQL's own `$n` parameters,
        through the extended protocol (which runs exactly one statement). `blockers` names the
        sessions that held the lock where `relations` cannot (a statement of unknown relations);
        `label` names what waited in messages.
        """
        relations = list(relations)
        rel_names = [sql.Identifier(*r.parts).as_string(conn) for r in relations]
        label = label or ", ".join(str(r) for r in relations) or "?"
        run = self._runner(conn, params)
        rows = -1
        attempt = 0
        done = 0  # outside a transaction each statement commits: a retry resumes at the one that failed
        while True:
            attempt += 1
            try:
                if transaction:
                    with conn.transaction():
                        for stmt in statements:
                            rows = run(stmt)
                else:
                    for stmt in statements[done:]:
                        rows = run(stmt)
                        done += 1
                return rows
            except psycopg.errors.LockNotAvailable as exc:
                pids = list(blockers()) if blockers is not None else self._blockers(conn, rel_names)
                failed = statements[0 if transaction else done]
                text = failed.as_string(conn) if isinstance(failed, sql.Composable) else str(failed)
                self.waits.append(LockWait(label, attempt, tuple(pids), text))
                if attempt > self.retries:
                    raise LockTimeoutError(label, attempt, pids, self.lock_timeout) from exc
                self.sleep(self.backoff(attempt))

    @staticmethod
    def _runner(conn: psycopg.Connection, params: Sequence[Any] | None) -> Callable[[sql.Composable | str], int]:
        if params is None:
            return lambda stmt: conn.execute(stmt).rowcount
        values = list(params)
        # A prepared statement: Parse accepts one statement only, whatever the text holds.
        return lambda stmt: psycopg.RawCursor(conn).execute(stmt, values, prepare=True).rowcount

    @staticmethod
    def _blockers(conn: psycopg.Connection, rel_names: list[str]) -> list[int]:
        try:
            row = conn.execute(BLOCKERS_SQL, (rel_names,)).fetchone()
            return list(row[0]) if row else []
        except psycopg.Error:
            return []


