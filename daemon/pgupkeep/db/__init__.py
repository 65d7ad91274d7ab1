"""Sessions (session.py), leases (lease.py) and lock-bounded DDL (ddl.py).

Every session is named `pgupkeep`, autocommit and time-boxed, so nothing pgupkeep does can hold a
lock or a transaction open for long.
"""

from pgupkeep.db.ddl import BLOCKERS_SQL, DdlRunner, LockTimeoutError, LockWait
from pgupkeep.db.lease import Leases, lease_key
from pgupkeep.db.session import (
    APPLICATION_NAME,
    EXCLUSIVE_LOCKS_CTE,
    READ_ATTEMPTS,
    connect,
    read_past_exclusive_locks,
    redact,
    server_is_standby,
    session_options,
)

__all__ = [
    "APPLICATION_NAME",
    "BLOCKERS_SQL",
    "EXCLUSIVE_LOCKS_CTE",
    "READ_ATTEMPTS",
    "DdlRunner",
    "Leases",
    "LockTimeoutError",
    "LockWait",
    "connect",
    "lease_key",
    "read_past_exclusive_locks",
    "redact",
    "server_is_standby",
    "session_options",
]
