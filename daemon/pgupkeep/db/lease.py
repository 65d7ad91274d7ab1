"""Leases that fence: one session-level advisory lock per target, held on a lease session.

A lease session belongs to a *home*: a target's own database, or, for the databases a target
discovers on a server, one agreed database of that server, so a replica holds one lease session per
server however many databases it leads there. It is kept alive by server-side keepalives and
`tcp_user_timeout` (the server frees the locks within seconds of the holder's host vanishing, not
two hours) and exempt from `idle_session_timeout`, which would otherwise close it while it idles.
A run confirms its lease before every write step. A second lock, the fence, keeps a new leader's
writes from overlapping the last steps of the old leader's runs: every session of a run that writes
holds it shared, and a new leader must once take it exclusively (so no run of any earlier leader
is still writing) before it writes. Each replica also holds a presence lock on every lease session,
so replicas can count each other and take a fair share of a server's databases.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping

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
# Presence locks use the two-int4 advisory key space (objsubid 2), apart from the bigint leases.
PRESENCE_CLASS = 0x70676B70  # "pgkp"
SHARE_TTL = 5.0

# The advisory locks held by this very backend: a session advisory lock through a pooler in
# transaction mode would be held by whichever backend ran the statement. pg_locks shows a bigint
# key as classid (high 32 bits) and objid (low 32 bits); shifted back together they give the key.
HELD_SQL = """
SELECT pg_backend_pid() = %(pid)s,
       coalesce(array_agg((classid::bigint << 32) | objid::bigint) FILTER (WHERE objsubid = 1), '{}')
FROM pg_locks
WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND mode = 'ExclusiveLock'
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
REPLICAS_SQL = """
SELECT count(DISTINCT objid) FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %s::bigint::oid
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(%s)"
TRY_LOCKS_SQL = "SELECT k FROM unnest(%s::bigint[]) AS u(k) WHERE pg_try_advisory_lock(k) LIMIT %s"
UNLOCK_SQL = "SELECT pg_advisory_unlock(%s)"
# Shared: one replica may have several lease sessions in one database (targets of its own).
PRESENCE_SQL = "SELECT pg_advisory_lock_shared(%s, %s)"
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


def connect_lease(target: Target) -> psycopg.Connection:
    return connect(target, extra_options=LEASE_OPTIONS, keepalives=LEASE_KEEPALIVES)


class _Home:
    """One lease session and the leases this replica holds on it."""

    def __init__(self, conn: psycopg.Connection, pid: int):
        self.conn = conn
        self.pid = pid
        self.held: set[str] = set()


class Leases:
    """One fencing lease per target, held on one session per home.

    `holds(target)` is asked before every run: it confirms a held lease or tries to take a free
    one (within this replica's fair share of the home's targets), so a replica takes over within
    one schedule period of the holder's death. `confirm` is asked before every write step, `watch`
    every few seconds, so a lost lease is seen at once.
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
        self._homes: dict[str, _Home] = {}  # home name -> its session
        self._home_of: dict[str, Target] = {}  # target name -> the target whose DSN is its home
        self._members: dict[str, tuple[str, ...]] = {}  # shared home -> the targets it leases
        self._clear: set[str] = set()  # targets whose fence this replica took once since leading
        self._locks: dict[str, threading.RLock] = {}
        self._replicas: dict[str, tuple[int, float]] = {}  # shared home -> (replicas present, read at)
        self._guard = threading.Lock()
        # This replica's presence on every lease session: replicas count each other by it.
        self.replica_id = random.SystemRandom().randrange(1, 2**31)

    # ------------------------------------------------------------------ homes

    def set_homes(self, homes: Mapping[str, tuple[Target, Iterable[str]]]) -> None:
        """Targets that share a lease session: home name -> (the target to connect as, members)."""
        with self._guard:
            self._home_of = {m: parent for name, (parent, members) in homes.items() for m in members}
            self._members = {name: tuple(sorted(members)) for name, (_, members) in homes.items()}
            for name, (parent, _) in homes.items():
                self._home_of.setdefault(name, parent)

    def _home_name(self, target: Target) -> str:
        with self._guard:
            parent = self._home_of.get(target.name)
        return parent.name if parent is not None and parent.name != target.name else target.name

    def _home_target(self, target: Target) -> Target:
        with self._guard:
            return self._home_of.get(target.name, target)

    def _lock_for(self, name: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(name, threading.RLock())

    def held(self) -> list[str]:
        with self._guard:
            return sorted(n for home in self._homes.values() for n in home.held)

    def sessions(self) -> int:
        with self._guard:
            return len(self._homes)

    def _changed(self, name: str, change: str, reason: str) -> None:
        if self._on_change is not None:
            self._on_change(name, change, reason)

    def _open(self, home_name: str, target: Target) -> _Home:
        """The home's lease session, opened (with this replica's presence) if need be."""
        with self._guard:
            home = self._homes.get(home_name)
        if home is not None:
            return home
        conn = self._connect(self._home_target(target))
        try:
            pid = conn.execute(BACKEND_PID_SQL).fetchone()[0]  # type: ignore[index]
            self._check_session_pooling(conn, pid)
            conn.execute(PRESENCE_SQL, (PRESENCE_CLASS, self.replica_id))
        except psycopg.Error:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        home = _Home(conn, pid)
        with self._guard:
            self._homes[home_name] = home
        return home

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

    def _verify(self, home_name: str) -> bool:
        """Is the home's session alive on the same backend, holding every lease it should? Leases
        no longer held are dropped and reported; a dead session loses them all."""
        with self._guard:
            home = self._homes.get(home_name)
        if home is None:
            return False
        try:
            same, keys = home.conn.execute(HELD_SQL, {"pid": home.pid}).fetchone()  # type: ignore[misc]
            if not same:
                raise TransactionPoolingError("the lease session moved to another server backend (a pooler in transaction mode?)")
            present = {int(k) for k in keys}  # the bigint keys, as signed as they were taken
            lost = {n for n in home.held if lease_key(n) not in present}
            reason = "the advisory lock is no longer held by the lease session"
        except psycopg.Error as exc:
            lost = set(home.held)
            reason = f"the lease session failed: {str(exc).strip() or type(exc).__name__}"
            self._close(home_name)
        for name in sorted(lost):
            home.held.discard(name)
            self._clear.discard(name)
            self._changed(name, "lost", reason)
        return home_name in self._homes

    # ------------------------------------------------------------------ leases

    def holds(self, target: Target) -> bool:
        home_name = self._home_name(target)
        with self._lock_for(home_name):
            with self._guard:
                home = self._homes.get(home_name)
            if home is not None and target.name in home.held and self._verify(home_name) and target.name in home.held:
                return True
            if not self._may_take(home_name):
                return False
            home = self._open(home_name, target)
            try:
                got = home.conn.execute(TRY_LOCK_SQL, (lease_key(target.name),)).fetchone()
            except psycopg.Error:
                self._verify(home_name)
                raise
            if not (got and got[0]):
                return False
            home.held.add(target.name)
            self._changed(target.name, "acquired", "the lease was free")
            return True

    def _may_take(self, home_name: str) -> bool:
        """Within max_leases, and within this replica's fair share of a shared home's targets."""
        with self._guard:
            total = sum(len(h.held) for h in self._homes.values())
            home = self._homes.get(home_name)
            members = self._members.get(home_name)
        if self._max is not None and total >= self._max:
            return False
        if members is None or home is None:
            return True
        return len(home.held) < self.fair_share(home_name)

    def fair_share(self, home_name: str, fresh: bool = False) -> int:
        """ceil(targets of the home / replicas present there), this one included. The replica
        count is read at most every SHARE_TTL seconds (a follower asks at every run of every
        database); `rebalance` reads it fresh."""
        with self._guard:
            home = self._homes.get(home_name)
            members = self._members.get(home_name, ())
            cached = self._replicas.get(home_name)
        if home is None:
            return len(members)
        now = time.monotonic()
        if fresh or cached is None or now - cached[1] > SHARE_TTL:
            try:
                row = home.conn.execute(REPLICAS_SQL, (PRESENCE_CLASS,)).fetchone()
            except psycopg.Error:
                return 0
            cached = (max(1, int(row[0])) if row else 1, now)
            with self._guard:
                self._replicas[home_name] = cached
        return math.ceil(len(members) / cached[0])

    def rebalance(self, homes: Iterable[tuple[str, Target]] = ()) -> tuple[list[str], list[str]]:
        """Bring this replica to its fair share of each shared home: release the leases beyond it
        (another replica joined), take free ones up to it (one left or died). Returns (released,
        taken). Never two leaders: a lease is released before anyone else can take it, so at worst a
        database has no leader until the next rebalance or run."""
        released, taken = [], []
        for home_name, home_target in homes:
            with self._lock_for(home_name):
                try:
                    home = self._open(home_name, home_target)
                except psycopg.Error:
                    continue
                self._verify(home_name)
                share = self.fair_share(home_name, fresh=True)
                with self._guard:
                    members = self._members.get(home_name, ())
                    total = sum(len(h.held) for h in self._homes.values())
                excess = sorted(home.held, key=lease_key)[share:]
                for name in excess:
                    self.release(name, reason="rebalanced")
                    released.append(name)
                want = share - len(home.held)
                if self._max is not None:
                    want = min(want, self._max - total + len(excess))
                free = [n for n in members if n not in home.held]
                if want <= 0 or not free:
                    continue
                by_key = {lease_key(n): n for n in free}
                try:
                    # One statement, stopping at the first `want` locks it gets.
                    rows = home.conn.execute(TRY_LOCKS_SQL, (list(by_key), want)).fetchall()
                except psycopg.Error:
                    self._verify(home_name)
                    continue
                for (key,) in rows:
                    name = by_key[int(key)]
                    home.held.add(name)
                    taken.append(name)
                    self._changed(name, "acquired", "free, within this replica's fair share")
        return released, taken

    def confirm(self, target: Target) -> bool:
        """Before a write step: is the lease still ours (session alive, lock held by it)?"""
        home_name = self._home_name(target)
        with self._lock_for(home_name):
            with self._guard:
                home = self._homes.get(home_name)
            if home is None or target.name not in home.held:
                return False
            return self._verify(home_name) and target.name in home.held

    def fence(self, target: Target, run_conn: psycopg.Connection) -> bool:
        """Take the target's fence shared on a run's session (held until that session closes);
        False while a run of an earlier leader may still be writing."""
        key = fence_key(target.name)
        # One run of this replica clears the fence; its sibling runs (other jobs of the target,
        # started together) wait for that rather than mistake each other for an old leader's.
        with self._lock_for(f"fence {target.name}"):
            with self._guard:
                clear = target.name in self._clear
            if not clear:
                # Exclusive once, in the target's own database where every run takes it shared.
                row = run_conn.execute(TRY_LOCK_SQL, (key,)).fetchone()
                if not (row and row[0]):
                    return False
                run_conn.execute(UNLOCK_SQL, (key,))
                with self._guard:
                    self._clear.add(target.name)
        row = run_conn.execute(TRY_FENCE_SHARED_SQL, (key,)).fetchone()
        return bool(row and row[0])

    def watch(self) -> None:
        """Confirm every held lease (a lost one is dropped and reported at once)."""
        with self._guard:
            names = list(self._homes)
        for home_name in names:
            with self._lock_for(home_name):
                self._verify(home_name)

    # ------------------------------------------------------------------ letting go

    def _close(self, home_name: str) -> None:
        with self._guard:
            home = self._homes.pop(home_name, None)
        if home is not None:
            # A broken connection may fail to close; it is gone either way.
            with contextlib.suppress(Exception):
                home.conn.close()

    def release(self, name: str, reason: str = "released") -> None:
        with self._guard:
            home_name = next((h for h, home in self._homes.items() if name in home.held), None)
        if home_name is None:
            return
        with self._lock_for(home_name):
            with self._guard:
                home = self._homes.get(home_name)
            if home is None or name not in home.held:
                return
            with contextlib.suppress(psycopg.Error):
                home.conn.execute(UNLOCK_SQL, (lease_key(name),))
            home.held.discard(name)
            self._clear.discard(name)
            if not home.held and home_name not in self._members:
                self._close(home_name)
            self._changed(name, "released", reason)

    def release_all(self) -> None:
        for name in self.held():
            self.release(name)
        with self._guard:
            names = list(self._homes)
        for home_name in names:
            self._close(home_name)
