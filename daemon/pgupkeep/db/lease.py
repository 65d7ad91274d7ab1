"""Leases that fence: one session-level advisory lock per target, held on a dedicated session.

The lease session is kept alive by server-side keepalives and `tcp_user_timeout` (so the server
frees the lock within seconds of the holder's host vanishing, not two hours) and exempt from
`idle_session_timeout`, which would otherwise close it while it idles. A run confirms the lease
before every write step. A second lock, the fence, keeps a new leader's writes from overlapping the
last steps of the old leader's runs: every run that writes holds it shared, and a new leader must
once take it exclusively (so no run of any earlier leader is still writing) before it writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable

import psycopg

from pgupkeep.db.session import connect
from pgupkeep.policy import Target

# The server probes an idle lease session after 5 s and gives up after 3 more probes 2 s apart;
# unacknowledged data gives up after 10 s. The lock is then free: measured takeover is in
# docs/operations.md.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 10_000
LEASE_OPTIONS = (
    f"-c tcp_keepalives_idle={KEEPALIVE_IDLE}",
    f"-c tcp_keepalives_interval={KEEPALIVE_INTERVAL}",
    f"-c tcp_keepalives_count={KEEPALIVE_COUNT}",
    f"-c tcp_user_timeout={USER_TIMEOUT_MS}",
    # The lease session idles between confirmations: neither timeout may close it.
    "-c idle_session_timeout=0",
    "-c idle_in_transaction_session_timeout=0",
)
LEASE_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": str(KEEPALIVE_IDLE),
    "keepalives_interval": str(KEEPALIVE_INTERVAL),
    "keepalives_count": str(KEEPALIVE_COUNT),
    "tcp_user_timeout": str(USER_TIMEOUT_MS),
}

# The advisory lock, held by this very backend: a session advisory lock through a pooler in
# transaction mode would be held by whichever backend ran the statement.
CONFIRM_SQL = """
SELECT pg_backend_pid() = %(pid)s AND EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND mode = 'ExclusiveLock'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = %(classid)s::bigint::oid AND objid = %(objid)s::bigint::oid AND objsubid = 1)
"""
TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(%s), pg_backend_pid()"
UNLOCK_SQL = "SELECT pg_advisory_unlock(%s)"
TRY_FENCE_SQL = "SELECT pg_try_advisory_lock(%s)"
TRY_FENCE_SHARED_SQL = "SELECT pg_try_advisory_lock_shared(%s)"
BACKEND_PID_SQL = "SELECT pg_backend_pid()"

OnChange = Callable[[str, str, str], None]  # (target, change, reason); change = acquired | lost | released


class TransactionPoolingError(psycopg.OperationalError):
    """The lease session's statements ran on different backends: a pooler in transaction mode."""


def _key(kind: str, target_name: str) -> int:
    digest = hashlib.sha256(f"pgupkeep {kind} {target_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lease_key(target_name: str) -> int:
    return _key("lease", target_name)


def fence_key(target_name: str) -> int:
    return _key("fence", target_name)


def _lock_ids(key: int) -> dict[str, int]:
    """pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return {"classid": unsigned >> 32, "objid": unsigned & 0xFFFF_FFFF}


def connect_lease(target: Target) -> psycopg.Connection:
    return connect(target, extra_options=LEASE_OPTIONS, keepalives=LEASE_KEEPALIVES)


class _Lease:
    def __init__(self, conn: psycopg.Connection, pid: int):
        self.conn = conn
        self.pid = pid
        self.clear = False  # the fence was taken once: no earlier leader's run is still writing


class Leases:
    """One fencing lease per target, each held on its own session.

    `holds(target)` is asked before every run: it confirms a held lease or tries to take a free
    one, so a replica takes over within one schedule period of the holder's death. `confirm` is
    asked before every write step, `watch` every few seconds, so a lost lease is seen at once.
    """

    def __init__(
        self,
        connect_fn: Callable[[Target], psycopg.Connection] | None = None,
        max_leases: int | None = None,
        on_change: OnChange | None = None,
    ):
        self._connect = connect_fn or connect_lease
        self._max = max_leases
        self._on_change = on_change
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def held(self) -> list[str]:
        with self._guard:
            return sorted(self._leases)

    def _changed(self, name: str, change: str, reason: str) -> None:
        if self._on_change is not None:
            self._on_change(name, change, reason)

    def _alive(self, name: str, lease: _Lease) -> bool:
        """The lease session answers and this backend holds the lock; else the lease is dropped."""
        try:
            row = lease.conn.execute(CONFIRM_SQL, {"pid": lease.pid, **_lock_ids(lease_key(name))}).fetchone()
            if row and row[0]:
                return True
            reason = "the advisory lock is no longer held by the lease session"
        except psycopg.Error as exc:
            reason = f"the lease session failed: {str(exc).strip() or type(exc).__name__}"
        self._drop(name)
        self._changed(name, "lost", reason)
        return False

    def holds(self, target: Target) -> bool:
        with self._lock_for(target.name):
            with self._guard:
                lease = self._leases.get(target.name)
            if lease is not None and self._alive(target.name, lease):
                return True
            with self._guard:
                if self._max is not None and len(self._leases) >= self._max:
                    return False
            conn = self._connect(target)
            try:
                got, pid = conn.execute(TRY_LOCK_SQL, (lease_key(target.name),)).fetchone()  # type: ignore[misc]
                if got:
                    self._check_session_pooling(conn, pid)
            except psycopg.Error:
                conn.close()
                raise
            if not got:
                conn.close()
                return False
            with self._guard:
                self._leases[target.name] = _Lease(conn, pid)
            self._changed(target.name, "acquired", "the lease was free")
            return True

    @staticmethod
    def _check_session_pooling(conn: psycopg.Connection, pid: int) -> None:
        for _ in range(3):
            row = conn.execute(BACKEND_PID_SQL).fetchone()
            if not row or row[0] != pid:
                conn.close()
                raise TransactionPoolingError(
                    "the lease session's statements ran on different server backends: a connection "
                    "pooler in transaction (or statement) mode is in between, and a session advisory "
                    "lock means nothing there; connect pgupkeep directly or through session pooling"
                )

    def confirm(self, target: Target) -> bool:
        """Before a write step: is the lease still ours (session alive, lock held by it)?"""
        with self._lock_for(target.name):
            with self._guard:
                lease = self._leases.get(target.name)
            return lease is not None and self._alive(target.name, lease)

    def fence(self, target: Target, run_conn: psycopg.Connection) -> bool:
        """Take the target's fence shared on a run's session (held until that session closes);
        False while a run of an earlier leader may still be writing."""
        key = fence_key(target.name)
        with self._lock_for(target.name):
            with self._guard:
                lease = self._leases.get(target.name)
            if lease is None:
                return False
            if not lease.clear:
                try:
                    row = lease.conn.execute(TRY_FENCE_SQL, (key,)).fetchone()
                    if not (row and row[0]):
                        return False
                    lease.conn.execute(UNLOCK_SQL, (key,))
                except psycopg.Error:
                    return False
                lease.clear = True
        row = run_conn.execute(TRY_FENCE_SHARED_SQL, (key,)).fetchone()
        return bool(row and row[0])

    def watch(self) -> None:
        """Confirm every held lease (a lost one is dropped and reported at once)."""
        for name in self.held():
            with self._lock_for(name):
                with self._guard:
                    lease = self._leases.get(name)
                if lease is not None:
                    self._alive(name, lease)

    def _drop(self, name: str) -> None:
        with self._guard:
            lease = self._leases.pop(name, None)
        if lease is not None:
            # A broken connection may fail to close; it is gone either way.
            with contextlib.suppress(Exception):
                lease.conn.close()

    def release(self, name: str) -> None:
        with self._lock_for(name):
            with self._guard:
                lease = self._leases.get(name)
            if lease is None:
                return
            with contextlib.suppress(psycopg.Error):
                lease.conn.execute(UNLOCK_SQL, (lease_key(name),))
            self._drop(name)
            self._changed(name, "released", "released")

    def release_all(self) -> None:
        for name in self.held():
            self.release(name)
