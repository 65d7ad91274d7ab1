"""The partitions job's view of other sessions' locks: which ACCESS EXCLUSIVE locks stand in the
way of the reads a managed table needs, and the operator's message naming them and their pids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from pgupkeep.db import EXCLUSIVE_LOCKS_CTE

if TYPE_CHECKING:
    from pgupkeep.jobs.partitions.catalog import Table

# Who holds or awaits the one lock mode that blocks a read (ACCESS EXCLUSIVE), on given relations.
LOCKS_SQL = "WITH " + EXCLUSIVE_LOCKS_CTE + """
SELECT n.nspname || '.' || c.relname, l.granted, l.pids
FROM exclusive_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.relation IN (SELECT to_regclass(r) FROM unnest(%s::text[]) AS r)
ORDER BY 1
"""


@dataclass(frozen=True)
class Lock:
    """An ACCESS EXCLUSIVE lock another session holds (or waits for) on one relation."""

    relation: str
    granted: bool
    pids: tuple[int, ...]


def _read_relations(t: Table) -> tuple[list[tuple[str, str]], str]:
    """The relations this run must read for a table (so a lock on them is in the way), and what."""
    default = [(t.default.schema, t.default.name)] if t.default else []
    if t.kind == "integer":
        # max(key) over the parent opens every partition, the default one included.
        parts = [(p.schema, p.name) for p in t.parts]
        return [t.name.parts, *default, *parts], "the current max key"
    return default, "the default partition"


def _lock_phrase(locks: Sequence[Lock]) -> str:
    groups: dict[tuple[bool, tuple[int, ...]], list[str]] = {}
    for lock in locks:
        groups.setdefault((lock.granted, lock.pids), []).append(lock.relation)
    phrases = []
    for (granted, pids), unsorted in groups.items():
        rels = sorted(unsorted)
        shown = ", ".join(rels[:3]) + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")
        state = "held" if granted else "awaited"
        lock = "an ACCESS EXCLUSIVE lock on" if len(rels) == 1 else "ACCESS EXCLUSIVE locks on"
        by = f"pids {list(pids)}" if pids else "a prepared transaction (see pg_prepared_xacts)"
        phrases.append(f"{lock} {shown} {'is' if len(rels) == 1 else 'are'} {state} by {by}")
    return "; ".join(phrases)


def lock_in_the_way(t: Table) -> str | None:
    """Why the table cannot be read without waiting behind another session's lock, if it cannot."""
    relations, what = _read_relations(t)
    locks = [t.locks[f"{s}.{n}"] for s, n in relations if f"{s}.{n}" in t.locks]
    if not locks:
        return None
    return (f"{t.label}: {_lock_phrase(locks)}; pgupkeep does not wait behind it (it must read {what} first): "
            "the table is skipped and retried on the next run; see pg_stat_activity for those sessions")


def read_failure(conn: psycopg.Connection, t: Table, exc: psycopg.Error) -> str:
    relations, what = _read_relations(t)
    if not isinstance(exc, psycopg.errors.LockNotAvailable):
        return f"{t.label}: reading {what} failed: {str(exc).strip()}; grant pgupkeep's role SELECT on the table"
    names = [sql.Identifier(*r).as_string(conn) for r in relations]
    locks = [Lock(r, g, tuple(p)) for r, g, p in conn.execute(LOCKS_SQL, (names,)).fetchall()]
    held = _lock_phrase(locks) if locks else "the lock was released meanwhile"
    return (f"{t.label}: reading {what} waited out lock_timeout: {held}; the table is skipped and retried on "
            "the next run; see pg_stat_activity for those sessions")
