"""Sessions, leases and lock-bounded DDL.

Every session is named `pgupkeep`, autocommit and time-boxed, so nothing pgupkeep does can hold a
lock or a transaction open for long. Leases are session-level advisory locks held on a dedicated
connection: when a replica dies its connection drops and the lock is free for another one.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep.policy import Target
from pgupkeep.units import QualifiedName, pg_milliseconds

APPLICATION_NAME = "pgupkeep"


def redact(text: str, dsn: str) -> str:
    """Remove the DSN's password from any text that might quote it."""
    try:
        password = conninfo_to_dict(dsn).get("password")
    except Exception:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


def session_options(
    *,
    lock_timeout: timedelta,
    statement_timeout: timedelta,
    idle_in_transaction_session_timeout: timedelta,
    existing: str | None = None,
) -> str:
    opts = [
        f"-c lock_timeout={pg_milliseconds(lock_timeout)}",
        f"-c statement_timeout={pg_milliseconds(statement_timeout)}",
        f"-c idle_in_transaction_session_timeout={pg_milliseconds(idle_in_transaction_session_timeout)}",
        # Catalog reads over thousands of relations get cost estimates that switch JIT on, and
        # compiling then takes longer than the read itself (measured: 1.2 s of a 1.4 s read).
        "-c jit=off",
    ]
    return " ".join(([existing] if existing else []) + opts)


def connect(
    target: Target,
    *,
    statement_timeout: timedelta | None = None,
    lock_timeout: timedelta | None = None,
) -> psycopg.Connection:
    """Open a named, time-boxed, autocommit session to a target."""
    s = target.session
    params = conninfo_to_dict(target.dsn)
    options = session_options(
        lock_timeout=lock_timeout or s.lock_timeout,
        statement_timeout=statement_timeout or s.statement_timeout,
        idle_in_transaction_session_timeout=s.idle_in_transaction_session_timeout,
        existing=params.pop("options", None),
    )
    params.update(
        application_name=APPLICATION_NAME,
        # libpq treats anything below 2 seconds as 2.
        connect_timeout=str(max(2, int(s.connect_timeout.total_seconds() + 0.999))),
        options=options,
        keepalives="1",
        keepalives_idle="30",
        keepalives_interval="10",
        keepalives_count="3",
    )
    try:
        return psycopg.connect(make_conninfo(**params), autocommit=True)
    except psycopg.Error as exc:
        raise psycopg.OperationalError(redact(str(exc).strip(), target.dsn)) from None


# --------------------------------------------------------------------------- leases


def lease_key(target_name: str) -> int:
    digest = hashlib.sha256(f"pgupkeep lease {target_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leases:
    """One advisory-lock lease per target, each held on its own connection.

    `holds(target)` is asked before every job run: it checks the lease connection is alive and
    tries to take a free lease, so a replica takes over within one schedule period of the
    holder's death.
    """

    def __init__(
        self,
        connect_fn: Callable[[Target], psycopg.Connection] | None = None,
        max_leases: int | None = None,
    ):
        self._connect = connect_fn or connect
        self._max = max_leases
        self._conns: dict[str, psycopg.Connection] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def held(self) -> list[str]:
        with self._guard:
            return sorted(self._conns)

    def holds(self, target: Target) -> bool:
        with self._lock_for(target.name):
            conn = self._conns.get(target.name)
            if conn is not None:
                try:
                    conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    self._drop(target.name)
            with self._guard:
                if self._max is not None and len(self._conns) >= self._max:
                    return False
            conn = self._connect(target)
            try:
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (lease_key(target.name),)).fetchone()
            except psycopg.Error:
                conn.close()
                raise
            if got and got[0]:
                with self._guard:
                    self._conns[target.name] = conn
                return True
            conn.close()
            return False

    def _drop(self, name: str) -> None:
        with self._guard:
            conn = self._conns.pop(name, None)
        if conn is not None:
            # A broken connection may fail to close; it is gone either way.
            with contextlib.suppress(Exception):
                conn.close()

    def release(self, name: str) -> None:
        with self._lock_for(name):
            with self._guard:
                conn = self._conns.get(name)
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (lease_key(name),))
            self._drop(name)

    def release_all(self) -> None:
        for name in self.held():
            self.release(name)


# --------------------------------------------------------------------------- lock-bounded DDL

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
    ) -> None:
        rel_names = [sql.Identifier(*r.parts).as_string(conn) for r in relations]
        label = ", ".join(str(r) for r in relations) or "?"
        attempt = 0
        done = 0  # outside a transaction each statement commits: a retry resumes at the one that failed
        while True:
            attempt += 1
            try:
                if transaction:
                    with conn.transaction():
                        for stmt in statements:
                            conn.execute(stmt)
                else:
                    for stmt in statements[done:]:
                        conn.execute(stmt)
                        done += 1
                return
            except psycopg.errors.LockNotAvailable as exc:
                pids = self._blockers(conn, rel_names)
                failed = statements[0 if transaction else done]
                text = failed.as_string(conn) if isinstance(failed, sql.Composable) else str(failed)
                self.waits.append(LockWait(label, attempt, tuple(pids), text))
                if attempt > self.retries:
                    raise LockTimeoutError(label, attempt, pids, self.lock_timeout) from exc
                self.sleep(self.backoff(attempt))

    @staticmethod
    def _blockers(conn: psycopg.Connection, rel_names: list[str]) -> list[int]:
        try:
            row = conn.execute(BLOCKERS_SQL, (rel_names,)).fetchone()
            return list(row[0]) if row else []
        except psycopg.Error:
            return []


def server_is_standby(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])



# --------------------------------------------------------------------------- reads past locks

# A CTE, `exclusive_locks(relation, granted, pids)`: relations of this database on which another
# session holds (granted) or awaits an ACCESS EXCLUSIVE lock. Size functions take ACCESS SHARE and
# would queue behind such a lock, failing the whole set-based statement; catalog reads take no
# relation locks. Queries call size functions only for relations not listed here.
EXCLUSIVE_LOCKS_CTE = """exclusive_locks AS (
    SELECT l.relation, bool_or(l.granted) AS granted,
           array_remove(array_agg(DISTINCT l.pid ORDER BY l.pid), NULL) AS pids
    FROM pg_locks l
    WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.pid IS DISTINCT FROM pg_backend_pid()
    GROUP BY l.relation
)"""
READ_ATTEMPTS = 3
T = TypeVar("T")


def read_past_exclusive_locks(read: Callable[[], T], attempts: int = READ_ATTEMPTS) -> T:
    """Run a statement built on EXCLUSIVE_LOCKS_CTE, again if a lock was taken between its
    reading pg_locks and calling a size function (it then sees that lock and steps around it)."""
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except psycopg.errors.LockNotAvailable:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
