"""Sessions: every one named `pgupkeep`, autocommit and time-boxed, so nothing pgupkeep does can
hold a lock or a transaction open for long; and reads that step around other sessions' locks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep.policy import Target
from pgupkeep.units import pg_milliseconds

APPLICATION_NAME = "pgupkeep"
SESSION_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10", "keepalives_count": "3"}


# Where a password stands in text: the value of a `password` option (also sslpassword,
# PGPASSWORD=...; in libpq's quoting: '...' with backslash escapes, or unquoted up to a blank),
# and the userinfo of a URI (scheme://user:password@host).
_PASSWORD_OPTION_RE = re.compile(
    r"""(?P<key>\b[A-Za-z_]*password\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)+)""",
    re.IGNORECASE,
)
_URI_PASSWORD_RE = re.compile(r"(?P<key>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@?#]*:)(?P<value>[^\s@/?#]*)(?=@)")


def redact(text: str, dsn: str | None = None) -> str:
    """Hide passwords in text that may quote a connection string (an error message, say).

    A password is replaced only where it stands as one: the value of a password option, the
    password of a URI. Never as a substring anywhere else: a password `postgres` must not turn
    `user "postgres"` into `user "***"`. `dsn` is accepted for callers that pass it; its password
    needs no special case, since it can only appear in one of those two places.
    """
    text = _PASSWORD_OPTION_RE.sub(lambda m: m.group("key") + "***", text)
    return _URI_PASSWORD_RE.sub(lambda m: m.group("key") + "***", text)


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
        # A run's session may idle while its work goes on in another (a view's refresh) and it
        # holds the run's fence: a database's idle_session_timeout must not close it. Every
        # session ends with its run, and statement_timeout bounds what it does.
        "-c idle_session_timeout=0",
    ]
    return " ".join(([existing] if existing else []) + opts)


def connect(
    target: Target,
    *,
    statement_timeout: timedelta | None = None,
    lock_timeout: timedelta | None = None,
    extra_options: Sequence[str] = (),
    keepalives: Mapping[str, str] | None = None,
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
    if extra_options:
        options = " ".join([options, *extra_options])
    params.update(
        application_name=APPLICATION_NAME,
        # libpq treats anything below 2 seconds as 2.
        connect_timeout=str(max(2, int(s.connect_timeout.total_seconds() + 0.999))),
        options=options,
        **(keepalives or SESSION_KEEPALIVES),
    )
    try:
        return psycopg.connect(make_conninfo(**params), autocommit=True)
    except psycopg.Error as exc:
        raise psycopg.OperationalError(redact(str(exc).strip(), target.dsn)) from None


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
