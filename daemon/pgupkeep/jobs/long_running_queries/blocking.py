"""Blocking chains: sessions waiting on a lock, followed to the root blocker that is not itself
waiting (one set-based read); one `lock_wait` finding per root, the lock-wait gauges, and the idle
roots to terminate when `terminate_idle_blockers_after` says so (pure given the rows).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import kwargs_row

from pgupkeep.db import APPLICATION_NAME
from pgupkeep.policy import LongRunningQueriesSection
from pgupkeep.results import Finding, Sample
from pgupkeep.units import format_duration

from .activity import IDLE_IN_TRANSACTION, Activity, Signal, ignored, seconds, signallable

# pg_blocking_pids() is called once per backend waiting on a lock, in SQL: the (waiter, blocker)
# pairs are closed transitively with UNION, which ends cycles (a deadlock not yet detected) and
# keeps the work at pairs, not paths (a queue of N exclusive waiters has 2^N paths). A root is a
# blocker that is not itself waiting; pid 0 is a prepared transaction. Waiters are the client
# backends in scope (the target's database unless `scope: server`), pgupkeep's own excepted (its
# statements wait at most lock_timeout). A wait is timed from pg_locks.waitstart, which is briefly
# null when a wait begins. The relation is the awaited lock's, or, for a row lock (a wait on a
# transaction id), that of the tuple lock the waiter holds meanwhile.
CHAINS_SQL = """
WITH RECURSIVE waiting AS MATERIALIZED (
    SELECT a.pid, pg_blocking_pids(a.pid) AS blockers
    FROM pg_stat_activity AS a
    WHERE a.wait_event_type = 'Lock'
), reach (waiter, blocker, direct) AS (
    SELECT w.pid, bp.pid, true
    FROM waiting AS w, unnest(w.blockers) AS bp(pid)
    UNION
    SELECT r.waiter, bp.pid, false
    FROM reach AS r JOIN waiting AS w ON w.pid = r.blocker, unnest(w.blockers) AS bp(pid)
), roots AS (
    SELECT r.waiter, r.blocker AS root, bool_or(r.direct) AS direct
    FROM reach AS r
    WHERE NOT EXISTS (SELECT 1 FROM waiting AS x WHERE x.pid = r.blocker AND cardinality(x.blockers) > 0)
    GROUP BY r.waiter, r.blocker
)
SELECT rt.root AS root_pid,
       b.pid IS NOT NULL AS root_seen,
       b.backend_type AS root_backend_type,
       coalesce(b.datname = current_database(), false) AS root_in_database,
       b.usename::text AS root_usename,
       b.datname::text AS root_datname,
       b.application_name AS root_application_name,
       host(b.client_addr) AS root_client_addr,
       b.state AS root_state,
       b.wait_event_type AS root_wait_event_type,
       b.wait_event AS root_wait_event,
       b.backend_start AS root_backend_start,
       b.xact_start AS root_xact_start,
       b.query_start AS root_query_start,
       b.state_change AS root_state_change,
       coalesce(extract(epoch FROM now() - CASE WHEN b.state = 'active' THEN b.query_start ELSE b.state_change END), 0)::float8
           AS root_age_seconds,
       extract(epoch FROM now() - b.xact_start)::float8 AS root_xact_age_seconds,
       coalesce(br.rolsuper, true) AS root_superuser,
       w.pid AS waiter_pid,
       w.usename::text AS waiter_usename,
       w.datname::text AS waiter_datname,
       w.application_name AS waiter_application_name,
       rt.direct,
       greatest(extract(epoch FROM now() - coalesce(l.waitstart, w.query_start)), 0)::float8 AS wait_seconds,
       l.locktype,
       l.mode,
       CASE WHEN rel.oid IS NULL THEN NULL
            WHEN c.oid IS NOT NULL THEN format('%%I.%%I', n.nspname, c.relname)
            ELSE 'oid ' || rel.oid END AS relation
FROM roots AS rt
JOIN pg_stat_activity AS w ON w.pid = rt.waiter
JOIN pg_database AS d ON d.datname = current_database()
LEFT JOIN LATERAL (
    SELECT l.locktype, l.mode, l.waitstart, l.database, l.relation
    FROM pg_locks AS l WHERE l.pid = w.pid AND NOT l.granted LIMIT 1
) AS l ON true
LEFT JOIN LATERAL (
    SELECT t.database, t.relation
    FROM pg_locks AS t WHERE t.pid = w.pid AND t.granted AND t.locktype = 'tuple' LIMIT 1
) AS t ON l.relation IS NULL
CROSS JOIN LATERAL (SELECT coalesce(l.relation, t.relation) AS oid, coalesce(l.database, t.database) AS database) AS rel
-- Relations of another database (scope: server) are named by oid; shared catalogs have database 0.
LEFT JOIN pg_class AS c ON c.oid = rel.oid AND rel.database IN (d.oid, 0)
LEFT JOIN pg_namespace AS n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_activity AS b ON b.pid = rt.root AND rt.root <> 0
LEFT JOIN pg_roles AS br ON br.oid = b.usesysid
WHERE w.backend_type = 'client backend'
  AND (%(server_scope)s OR w.datname = current_database())
  AND w.pid <> pg_backend_pid()
  AND NOT (w.application_name = %(app)s AND w.usename = session_user)
ORDER BY rt.root, w.pid
"""


@dataclass(frozen=True)
class LockWait:
    """One session waiting on a lock, with one root of its chain (a waiter may have several)."""

    root_pid: int
    root_seen: bool  # False: a prepared transaction (pid 0), or a root that ended meanwhile
    root_backend_type: str | None
    root_in_database: bool
    root_usename: str | None
    root_datname: str | None
    root_application_name: str | None
    root_client_addr: str | None
    root_state: str | None
    root_wait_event_type: str | None
    root_wait_event: str | None
    root_backend_start: datetime | None
    root_xact_start: datetime | None
    root_query_start: datetime | None
    root_state_change: datetime | None
    root_age_seconds: float
    root_xact_age_seconds: float | None
    root_superuser: bool
    waiter_pid: int
    waiter_usename: str | None
    waiter_datname: str | None
    waiter_application_name: str | None
    direct: bool  # the root blocks this waiter itself, not through another waiter
    wait_seconds: float
    locktype: str | None
    mode: str | None
    relation: str | None

    def root(self) -> Activity | None:
        """The root as a measured session, if it is one that could be signalled at all."""
        if not self.root_seen or self.root_backend_start is None:
            return None
        return Activity(
            pid=self.root_pid,
            usename=self.root_usename,
            datname=self.root_datname,
            application_name=self.root_application_name or "",
            client_addr=self.root_client_addr,
            state=self.root_state,
            wait_event_type=self.root_wait_event_type,
            wait_event=self.root_wait_event,
            backend_start=self.root_backend_start,
            xact_start=self.root_xact_start,
            query_start=self.root_query_start,
            state_change=self.root_state_change,
            age_seconds=self.root_age_seconds,
            xact_age_seconds=self.root_xact_age_seconds,
            query=None,
            superuser=self.root_superuser,
        )


@dataclass
class Chains:
    findings: list[Finding]
    samples: list[Sample]
    signals: list[Signal]


def read(conn: psycopg.Connection, section: LongRunningQueriesSection) -> list[LockWait]:
    with conn.cursor(row_factory=kwargs_row(LockWait)) as cur:
        params = {"app": APPLICATION_NAME, "server_scope": section.scope == "server"}
        return cur.execute(CHAINS_SQL, params).fetchall()


def judge(rows: Sequence[LockWait], section: LongRunningQueriesSection, terminating: Collection[int] = ()) -> Chains:
    """One finding per root holding up a session longer than lock_wait_after, the gauges, and the
    idle roots to terminate (`terminating`: pids already due for terminate_after)."""
    # Ignored users' and applications' waits are not counted (as everywhere in this job); an
    # ignored root is still named, since the sessions it holds up are not ignored, but never signalled.
    rows = [r for r in rows if not ignored(r.waiter_usename, r.waiter_application_name, section)]
    waits = {r.waiter_pid: r.wait_seconds for r in rows}
    limit = section.lock_wait_after.total_seconds()
    samples = [
        Sample("lock_waiting_sessions", float(sum(1 for w in waits.values() if w > limit))),
        Sample("longest_lock_wait_seconds", seconds(max(waits.values(), default=0.0))),
    ]
    by_root: dict[int, list[LockWait]] = {}
    for r in rows:
        by_root.setdefault(r.root_pid, []).append(r)
    chains = []
    for behind in by_root.values():
        if max(r.wait_seconds for r in behind) <= limit:
            continue
        # How long the root has held the chain up: since its first direct waiter began waiting (a
        # waiter further down may have waited longer, on a lock of the session in front of it).
        held = max((r.wait_seconds for r in behind if r.direct), default=max(r.wait_seconds for r in behind))
        chains.append((seconds(held), sorted(behind, key=lambda r: (-r.wait_seconds, r.waiter_pid))))
    chains.sort(key=lambda c: (-c[0], c[1][0].root_pid))
    findings, signals = [], []
    for held, behind in chains:
        findings.append(_finding(behind, held, section))
        signal = _idle_blocker(behind[0], held, len(behind), section)
        if signal is not None and signal.activity.pid not in terminating:
            signals.append(signal)
    return Chains(findings, samples, signals)


def _idle_blocker(r: LockWait, held: float, waiting: int, section: LongRunningQueriesSection) -> Signal | None:
    after = section.terminate_idle_blockers_after
    root = r.root()
    if (
        after is None
        or root is None
        or held <= after.total_seconds()
        or r.root_backend_type != "client backend"
        or root.state not in IDLE_IN_TRANSACTION
        or not signallable(root)
        or ignored(root.usename, root.application_name, section)
        or not (r.root_in_database or section.scope == "server")
    ):
        return None
    return Signal(
        "terminate_backend", root, after, reason="idle_blocker",
        detail={"blocking_seconds": held, "waiting_sessions": waiting},
    )  # fmt: skip


def _describe_root(r: LockWait) -> str:
    if r.root_pid == 0:
        return "a prepared transaction"
    if not r.root_seen:
        return f"pid {r.root_pid} (ended since)"
    who = f"pid {r.root_pid} (user {r.root_usename}, database {r.root_datname}, application {r.root_application_name or '-'})"
    if r.root_backend_type != "client backend":
        return f"{r.root_backend_type} {who}"
    return who


def _root_state(r: LockWait) -> str:
    if not r.root_seen:
        return ""
    age = seconds(r.root_age_seconds)
    if r.root_state in IDLE_IN_TRANSACTION:
        return f", {r.root_state} for {age:g}s,"
    if r.root_state == "active":
        return f", running a query for {age:g}s,"
    if r.root_state:
        return f", {r.root_state} for {age:g}s,"
    return ""


def _hint(r: LockWait, section: LongRunningQueriesSection) -> str:
    if r.root_pid == 0:
        return "COMMIT PREPARED or ROLLBACK PREPARED it (see pg_prepared_xacts)"
    if r.root_state in IDLE_IN_TRANSACTION:
        hint = f"the application should commit or roll back; end it with SELECT pg_terminate_backend({r.root_pid})"
        if section.terminate_idle_blockers_after is None:
            hint += ", or set terminate_idle_blockers_after to have such blockers terminated"
        return hint
    if r.root_state == "active":
        return f"check its query in pg_stat_activity; SELECT pg_cancel_backend({r.root_pid}) if it should not hold these locks"
    return "check it in pg_stat_activity and pg_locks"


def _finding(behind: Sequence[LockWait], held: float, section: LongRunningQueriesSection) -> Finding:
    r = behind[0]
    relations = sorted({w.relation for w in behind if w.relation})
    on = f" on {', '.join(relations)}" if relations else ""
    n = len(behind)
    longest = seconds(behind[0].wait_seconds)
    message = (
        f"{_describe_root(r)}{_root_state(r)} blocks {n} session{'s' if n != 1 else ''} waiting on locks{on} "
        f"for up to {longest:g}s, over lock_wait_after {format_duration(section.lock_wait_after)}; {_hint(r, section)}"
    )
    detail: dict[str, Any] = {
        "pid": r.root_pid,
        "backend_type": "prepared transaction" if r.root_pid == 0 else r.root_backend_type,
        "usename": r.root_usename,
        "datname": r.root_datname,
        "application_name": r.root_application_name,
        "client_addr": r.root_client_addr,
        "state": r.root_state,
        "idle_in_transaction": r.root_state in IDLE_IN_TRANSACTION,
        "state_seconds": seconds(r.root_age_seconds) if r.root_seen else None,
        "xact_age_seconds": None if r.root_xact_age_seconds is None else seconds(r.root_xact_age_seconds),
        "backend_start": r.root_backend_start.isoformat() if r.root_backend_start else None,
        "blocking_seconds": held,
        "waiting_sessions": n,
        "relations": relations,
        "waiters": [
            {
                "pid": w.waiter_pid,
                "usename": w.waiter_usename,
                "datname": w.waiter_datname,
                "application_name": w.waiter_application_name,
                "wait_seconds": seconds(w.wait_seconds),
                "locktype": w.locktype,
                "mode": w.mode,
                "relation": w.relation,
            }
            for w in behind
        ],
    }
    return Finding(kind="lock_wait", object=_object(r), value=held, message=message, detail=detail)


def _object(r: LockWait) -> str:
    return "prepared transaction" if r.root_pid == 0 else f"pid {r.root_pid}"
