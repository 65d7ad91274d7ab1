"""Lock-bounded DDL: every statement runs under `lock_timeout`, is retried with jittered backoff,
and on giving up names the sessions that held (or were queued for) a conflicting lock.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgupkeep.units import QualifiedName

# PostgreSQL's table-level lock conflict matrix (the manual, "Table-Level Locks"): for each mode,
# the modes it conflicts with.
_ACCESS_SHARE, _ROW_SHARE, _ROW_EXCLUSIVE = "AccessShareLock", "RowShareLock", "RowExclusiveLock"
_SHARE_UPDATE_EXCLUSIVE, _SHARE, _SHARE_ROW_EXCLUSIVE = "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock"
_EXCLUSIVE, _ACCESS_EXCLUSIVE = "ExclusiveLock", "AccessExclusiveLock"
LOCK_MODES = (
    _ACCESS_SHARE, _ROW_SHARE, _ROW_EXCLUSIVE, _SHARE_UPDATE_EXCLUSIVE,
    _SHARE, _SHARE_ROW_EXCLUSIVE, _EXCLUSIVE, _ACCESS_EXCLUSIVE,
)  # fmt: skip
CONFLICTS: dict[str, frozenset[str]] = {
    _ACCESS_SHARE: frozenset({_ACCESS_EXCLUSIVE}),
    _ROW_SHARE: frozenset({_EXCLUSIVE, _ACCESS_EXCLUSIVE}),
    _ROW_EXCLUSIVE: frozenset({_SHARE, _SHARE_ROW_EXCLUSIVE, _EXCLUSIVE, _ACCESS_EXCLUSIVE}),
    _SHARE_UPDATE_EXCLUSIVE: frozenset(
        {_SHARE_UPDATE_EXCLUSIVE, _SHARE, _SHARE_ROW_EXCLUSIVE, _EXCLUSIVE, _ACCESS_EXCLUSIVE}
    ),
    _SHARE: frozenset({_ROW_EXCLUSIVE, _SHARE_UPDATE_EXCLUSIVE, _SHARE_ROW_EXCLUSIVE, _EXCLUSIVE, _ACCESS_EXCLUSIVE}),
    _SHARE_ROW_EXCLUSIVE: frozenset(
        {_ROW_EXCLUSIVE, _SHARE_UPDATE_EXCLUSIVE, _SHARE, _SHARE_ROW_EXCLUSIVE, _EXCLUSIVE, _ACCESS_EXCLUSIVE}
    ),
    _EXCLUSIVE: frozenset(set(LOCK_MODES) - {_ACCESS_SHARE}),
    _ACCESS_EXCLUSIVE: frozenset(LOCK_MODES),
}
_LOCK_STATEMENT_MODES = {
    "ACCESS SHARE": _ACCESS_SHARE, "ROW SHARE": _ROW_SHARE, "ROW EXCLUSIVE": _ROW_EXCLUSIVE,
    "SHARE UPDATE EXCLUSIVE": _SHARE_UPDATE_EXCLUSIVE, "SHARE ROW EXCLUSIVE": _SHARE_ROW_EXCLUSIVE,
    "SHARE": _SHARE, "EXCLUSIVE": _EXCLUSIVE, "ACCESS EXCLUSIVE": _ACCESS_EXCLUSIVE,
}  # fmt: skip


def requested_locks(statement: str, relations: Sequence[str]) -> dict[str, str]:
    """The table lock mode `statement` requests on each of `relations` (quoted names) it locks.

    Covers the statements pgupkeep runs under lock_timeout, with the modes the manual gives for
    them; any other statement is taken to want ACCESS EXCLUSIVE on every relation, so no blocker
    is ever missed. A relation a statement does not lock is left out.
    """
    text = " ".join(statement.split())
    upper = text.upper()
    named = [r for r in relations if _position(text, r, 0) >= 0]

    def first_after(keyword: str) -> str | None:
        start = upper.find(keyword) + len(keyword)
        found = sorted((_position(text, r, start), r) for r in named if _position(text, r, start) >= 0)
        return found[0][1] if found else None

    def named_in(mode: str) -> dict[str, str]:
        return dict.fromkeys(named, mode)

    if upper.startswith("REFRESH MATERIALIZED VIEW CONCURRENTLY"):
        return named_in(_EXCLUSIVE)
    if upper.startswith(("VACUUM", "ANALYZE")):
        return named_in(_SHARE_UPDATE_EXCLUSIVE)
    if upper.startswith("ALTER TABLE") and " DETACH PARTITION " in upper and upper.endswith(("CONCURRENTLY", "FINALIZE")):
        return named_in(_SHARE_UPDATE_EXCLUSIVE)
    if upper.startswith("ALTER TABLE") and " ATTACH PARTITION " in upper:
        # SHARE UPDATE EXCLUSIVE on the parent; ACCESS EXCLUSIVE on the partition attached and on
        # the default partition, which the statement does not name.
        locks = dict.fromkeys(relations, _ACCESS_EXCLUSIVE)
        parent = first_after("ALTER TABLE")
        if parent is not None:
            locks[parent] = _SHARE_UPDATE_EXCLUSIVE
        return locks
    if upper.startswith("CREATE TABLE") and "(LIKE " in upper:
        locks = named_in(_ACCESS_EXCLUSIVE)
        source = first_after("(LIKE ")
        if source is not None:
            locks[source] = _ACCESS_SHARE
        return locks
    if upper.startswith("WITH ") and " AS (DELETE FROM " in upper and " INSERT INTO " in upper:
        return named_in(_ROW_EXCLUSIVE)
    if upper.startswith("LOCK "):
        for words, mode in sorted(_LOCK_STATEMENT_MODES.items(), key=lambda kv: -len(kv[0])):
            if f" IN {words} MODE" in upper:
                return named_in(mode)
    return dict.fromkeys(relations, _ACCESS_EXCLUSIVE)


_SIMPLE_NAME_RE = re.compile(r'^"([a-z_][a-z0-9_$]*)"\."([a-z_][a-z0-9_$]*)"$')


def _position(text: str, relation: str, start: int) -> int:
    """Where `relation` (quoted, as sql.Identifier writes it) is first named in `text` from
    `start`, also unquoted when it needs no quotes; -1 if not at all."""
    found = [text.find(relation, start)]
    simple = _SIMPLE_NAME_RE.match(relation)
    if simple:
        bare = re.compile(rf"(?<![\w.\"]){simple.group(1)}\.{simple.group(2)}(?![\w$\"])", re.IGNORECASE)
        match = bare.search(text, start)
        found.append(match.start() if match else -1)
    hits = [f for f in found if f >= 0]
    return min(hits) if hits else -1


# The sessions of this database that hold, or were queued for before we were, a lock on one of
# the relations in a mode that conflicts with one we asked for. A session whose lock does not
# conflict (an ACCESS SHARE reader against a SHARE UPDATE EXCLUSIVE request) blocked nobody.
# Parameters: (relation, conflicting mode) pairs as two arrays, and how long we waited.
BLOCKERS_SQL = """
SELECT coalesce(array_agg(DISTINCT l.pid ORDER BY l.pid), '{}')
FROM pg_locks AS l
JOIN unnest(%s::text[], %s::text[]) AS c(relation, mode)
  ON l.relation = to_regclass(c.relation) AND l.mode = c.mode
WHERE l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid <> pg_backend_pid()
  AND (l.granted OR l.waitstart < now() - %s::interval)
"""


def conflicting_pairs(statements: Sequence[str], relations: Sequence[str]) -> tuple[list[str], list[str]]:
    """(relation, mode) pairs, as two lists, of every lock mode that conflicts with one that
    `statements` request on `relations`."""
    wanted: dict[str, set[str]] = {}
    for statement in statements:
        for relation, mode in requested_locks(statement, relations).items():
            wanted.setdefault(relation, set()).update(CONFLICTS[mode])
    for relation in relations:  # a relation no statement accounts for: assume the worst
        wanted.setdefault(relation, set(CONFLICTS[_ACCESS_EXCLUSIVE]))
    pairs = sorted((r, m) for r, modes in wanted.items() for m in modes)
    return [r for r, _ in pairs], [m for _, m in pairs]


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
                # In a transaction any of its statements may have waited; alone, the one that failed.
                unit = statements if transaction else statements[done : done + 1]
                texts = [s.as_string(conn) if isinstance(s, sql.Composable) else str(s) for s in unit]
                if blockers is not None:
                    pids = list(blockers())
                else:
                    pids = self._blockers(conn, texts, rel_names, self.lock_timeout)
                text = texts[0]
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
    def _blockers(conn: psycopg.Connection, statements: Sequence[str], rel_names: list[str], waited: timedelta) -> list[int]:
        relations, modes = conflicting_pairs(statements, rel_names)
        try:
            row = conn.execute(BLOCKERS_SQL, (relations, modes, waited)).fetchone()
            return list(row[0]) if row else []
        except psycopg.Error:
            return []
