"""Sessions with an open transaction: measure them (one read of pg_stat_activity) and judge them
against the policy (pure): findings, gauges, and the sessions to cancel or terminate.

Only the target's database is read, unless the section's `scope` is `server`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import kwargs_row

from pgupkeep.db import APPLICATION_NAME
from pgupkeep.policy import LongRunningQueriesSection
from pgupkeep.results import Finding, Sample
from pgupkeep.units import format_duration, query_text, query_text_read_limit

IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")
STATES = ("active", "idle_in_transaction")  # the bounded `state` label values

# Client backends only: autovacuum, walsenders, parallel and background workers are never ours to
# judge. pgupkeep's own sessions are this one, and those named `pgupkeep` that logged in as the
# same role as this one; a session of another role that merely calls itself `pgupkeep` is still
# measured and flagged (but, being named so, never signalled: see signals.SIGNAL_SQL).
# Every session in a transaction is read (the oldest-transaction gauge needs them all);
# thresholds are applied by `judge`. Ages come from the server clock. A target is one database:
# other databases' sessions are read only with `scope: server`.
MEASURE_SQL = """
SELECT a.pid,
       a.usename::text AS usename,
       a.datname::text AS datname,
       a.application_name,
       host(a.client_addr) AS client_addr,
       a.state,
       a.wait_event_type,
       a.wait_event,
       a.backend_start,
       a.xact_start,
       a.query_start,
       a.state_change,
       -- A backend still 'starting' has xact_start but neither query_start nor state_change yet.
       coalesce(extract(epoch FROM now() - CASE WHEN a.state = 'active' THEN a.query_start ELSE a.state_change END), 0)::float8
           AS age_seconds,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_seconds,
       left(a.query, %(query_limit)s) AS query,
       coalesce(r.rolsuper, true) AS superuser
FROM pg_stat_activity AS a
LEFT JOIN pg_roles AS r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
  AND (%(server_scope)s OR a.datname = current_database())
  AND a.pid <> pg_backend_pid()
  AND NOT (a.application_name = %(app)s AND a.usename = session_user)
  -- An aborted transaction block has no xact_start, yet is idle in transaction all the same.
  AND (a.xact_start IS NOT NULL OR a.state = 'idle in transaction (aborted)')
ORDER BY a.pid
"""

# Without pg_read_all_stats (or pg_monitor) other roles' sessions show no state, query or times:
# they cannot be measured, and saying nothing would read as "all is well".
HIDDEN_SQL = """
SELECT count(*) FILTER (WHERE a.query = '<insufficient privilege>' AND a.datid IS NOT NULL
                          AND (%(server_scope)s OR a.datname = current_database())),
       current_user
FROM pg_stat_activity AS a
"""


@dataclass(frozen=True)
class Activity:
    """One backend as measured: a client backend with an open transaction, or a lock chain's root."""

    pid: int
    usename: str | None
    datname: str | None
    application_name: str
    client_addr: str | None
    state: str | None
    wait_event_type: str | None
    wait_event: str | None
    backend_start: datetime
    xact_start: datetime | None  # None in an aborted transaction block
    query_start: datetime | None
    state_change: datetime | None
    age_seconds: float
    xact_age_seconds: float | None
    query: str | None
    superuser: bool

    @property
    def kind(self) -> str | None:
        """The bounded state label: active, idle_in_transaction, or None (not judged)."""
        if self.state == "active":
            return "active"
        if self.state in IDLE_IN_TRANSACTION:
            return "idle_in_transaction"
        return None

    @property
    def object(self) -> str:
        return f"pid {self.pid}"

    def describe(self) -> str:
        return (
            f"pid {self.pid} (user {self.usename}, database {self.datname}, "
            f"application {self.application_name or '-'})"
        )


@dataclass(frozen=True)
class Signal:
    """A session the policy says to cancel or terminate.

    `reason` is `age` (over cancel_after / terminate_after) or `idle_blocker` (idle in transaction
    at the root of a lock chain held longer than terminate_idle_blockers_after); `detail` is added
    to the action.
    """

    action: str  # cancel_backend | terminate_backend
    activity: Activity
    limit: timedelta
    reason: str = "age"
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Judgement:
    findings: list[Finding]
    samples: list[Sample]
    signals: list[Signal]


def measure(conn: psycopg.Connection, section: LongRunningQueriesSection, log_query_text: str = "truncated") -> list[Activity]:
    """The sessions in scope, their query text already cut to what `log_query_text` allows."""
    with conn.cursor(row_factory=kwargs_row(Activity)) as cur:
        params = {
            "query_limit": query_text_read_limit(log_query_text),
            "app": APPLICATION_NAME,
            "server_scope": section.scope == "server",
        }
        rows = cur.execute(MEASURE_SQL, params).fetchall()
    return [replace(a, query=query_text(a.query, log_query_text)) for a in rows]


def hidden(conn: psycopg.Connection, section: LongRunningQueriesSection) -> tuple[int, str]:
    """How many sessions in scope this role may not see, and the role."""
    row = conn.execute(HIDDEN_SQL, {"server_scope": section.scope == "server"}).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def ignored(usename: str | None, application_name: str | None, section: LongRunningQueriesSection) -> bool:
    return usename in section.ignore_users or application_name in section.ignore_applications


def signallable(a: Activity) -> bool:
    """Never superusers' sessions, nor anything calling itself pgupkeep (see MEASURE_SQL)."""
    return not a.superuser and a.application_name != APPLICATION_NAME


def seconds(value: float) -> float:
    return round(value, 3)


def judge(rows: Sequence[Activity], section: LongRunningQueriesSection) -> Judgement:
    """Findings, gauges and signals for the measured sessions (pure: rows + policy)."""
    # Ignored users and applications are left out of every figure, not only out of the findings:
    # whoever ignores pg_dump does not want its hour-long transaction in the oldest-transaction
    # alert either.
    judged = [a for a in rows if not ignored(a.usename, a.application_name, section)]
    findings: list[Finding] = []
    signals: list[Signal] = []
    flagged = dict.fromkeys(STATES, 0)
    longest = dict.fromkeys(STATES, 0.0)
    for a in sorted(judged, key=lambda a: (-a.age_seconds, a.pid)):
        kind = a.kind
        if kind is None:
            continue
        longest[kind] = max(longest[kind], seconds(a.age_seconds))
        warn = section.warn_after if kind == "active" else section.idle_in_transaction_after
        if a.age_seconds <= warn.total_seconds():
            continue
        flagged[kind] += 1
        findings.append(_finding(a, warn, section))
        if not signallable(a):
            continue
        cancel, terminate = section.cancel_after, section.terminate_after
        if kind == "active" and cancel is not None and a.age_seconds > cancel.total_seconds():
            signals.append(Signal("cancel_backend", a, cancel))
        if terminate is not None and a.age_seconds > terminate.total_seconds():
            signals.append(Signal("terminate_backend", a, terminate))
    oldest = max(
        (seconds(a.xact_age_seconds) for a in judged if a.xact_age_seconds is not None),
        default=0.0,
    )
    samples = [Sample("long_running_queries", float(flagged[s]), {"state": s}) for s in STATES]
    samples += [Sample("longest_query_seconds", longest[s], {"state": s}) for s in STATES]
    samples.append(Sample("oldest_transaction_seconds", oldest))
    # Cancels go first: a query cancelled here may make its termination unnecessary.
    signals.sort(key=lambda s: s.action != "cancel_backend")
    return Judgement(findings, samples, signals)


def _finding(a: Activity, warn: timedelta, section: LongRunningQueriesSection) -> Finding:
    age = seconds(a.age_seconds)
    # A hint to set a key only while it is unset: once set, the signal's own event says what it did.
    if a.kind == "active":
        kind = "long_running_query"
        what = f"query active for {age:g}s, over warn_after {format_duration(warn)}"
        hint = "check it in pg_stat_activity"
        if section.cancel_after is None:
            hint += "; set cancel_after to have such queries cancelled"
    else:
        kind = "idle_in_transaction"
        what = f"{a.state} for {age:g}s, over idle_in_transaction_after {format_duration(warn)}"
        hint = "the application should commit or roll back"
        if section.terminate_after is None:
            hint += "; set terminate_after to end such sessions"
    return Finding(
        kind=kind,
        object=a.object,
        value=age,
        message=f"{a.describe()}: {what}; {hint}",
        detail={
            "pid": a.pid,
            "usename": a.usename,
            "datname": a.datname,
            "application_name": a.application_name,
            "client_addr": a.client_addr,
            "state": a.state,
            "wait_event_type": a.wait_event_type,
            "wait_event": a.wait_event,
            "age_seconds": age,
            "xact_age_seconds": None
            if a.xact_age_seconds is None
            else seconds(a.xact_age_seconds),
            "query": a.query,
            "backend_start": a.backend_start.isoformat(),
        },
    )
