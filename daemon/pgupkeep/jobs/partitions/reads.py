"""The partitions job's reads of the tables themselves, each one statement for many tables (a
chunk at a time): integer max keys, exact default-partition counts, and free names for new
partitions. A table whose own read fails is left alone this run; the others are read regardless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgupkeep.jobs.partitions import grid
from pgupkeep.jobs.partitions.catalog import Table
from pgupkeep.jobs.partitions.locks import read_failure

NAMES_SQL = """
SELECT n.nspname, c.relname
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
"""

# Many tables' probes go in one statement, but each SELECT locks its tables until the statement
# ends; chunks keep that lock count bounded.
PROBE_CHUNK = 100
# Errors that belong to one table's read (a lock that outlasted lock_timeout, a missing grant):
# the chunk is read again table by table, so only that table fails.
ITEM_ERRORS = (psycopg.errors.LockNotAvailable, psycopg.errors.InsufficientPrivilege)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read_each(
    conn: psycopg.Connection,
    tables: Sequence[Table],
    select: Callable[[int, Table], sql.Composed],
    take: Callable[[Table, tuple[Any, ...]], None],
) -> None:
    """Run `select` for many tables a chunk at a time (rows start with the table's index in the
    chunk); a table whose own read fails gets `blocked` and the others are read regardless."""
    for chunk in _chunks(tables, PROBE_CHUNK):
        try:
            rows = conn.execute(sql.SQL(" UNION ALL ").join(select(i, t) for i, t in enumerate(chunk))).fetchall()
        except ITEM_ERRORS:
            rows = []
            for i, t in enumerate(chunk):
                try:
                    rows.extend(conn.execute(select(i, t)).fetchall())
                except ITEM_ERRORS as exc:
                    t.blocked = read_failure(conn, t, exc)
        for row in rows:
            take(chunk[row[0]], row[1:])


def read_integer_bases(conn: psycopg.Connection, tables: Sequence[Table]) -> None:
    """The current max key of each integer table (the default partition's rows left out: one stray
    value there must not move the grid)."""

    def select(i: int, t: Table) -> sql.Composed:
        where = (
            sql.SQL(" WHERE tableoid <> {}::regclass").format(
                sql.Literal(sql.Identifier(t.default.schema, t.default.name).as_string(conn))
            )
            if t.default
            else sql.SQL("")
        )
        return sql.SQL("SELECT {}::int AS i, (SELECT max({})::bigint FROM {}{})").format(
            sql.Literal(i), sql.Identifier(t.key_name), sql.Identifier(*t.name.parts), where
        )

    def take(t: Table, row: tuple[Any, ...]) -> None:
        finite = [p.lo for p in grid.attached(t.parts) if not math.isinf(p.lo)]
        t.base = row[0] if row[0] is not None else (min(finite) if finite else 0)

    _read_each(conn, tables, select, take)


def _range_cond(t: Table, lo: grid.Bound, hi: grid.Bound) -> sql.Composed:
    k = sql.Identifier(t.key_name)
    parts = [sql.SQL("{} >= {}").format(k, sql.Literal(grid.key_to_python(int(lo), t.kind)))] if not math.isinf(lo) else []
    parts += [sql.SQL("{} < {}").format(k, sql.Literal(grid.key_to_python(int(hi), t.kind)))] if not math.isinf(hi) else []
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def probe_defaults(conn: psycopg.Connection, tables: Sequence[Table]) -> None:
    """Exact row counts of default partitions, total and inside each range to create. A table
    whose count could not be taken is `blocked`: nothing is created over rows not counted."""

    def select(i: int, t: Table) -> sql.Composed:
        assert t.default is not None
        ranges = [sql.Literal(0)] + [
            sql.SQL("count(*) FILTER (WHERE {})").format(_range_cond(t, s.lo, s.hi)) for s in t.creates
        ]
        return sql.SQL("SELECT {}::int, count(*), ARRAY[{}]::bigint[] FROM {}").format(
            sql.Literal(i), sql.SQL(", ").join(ranges), sql.Identifier(t.default.schema, t.default.name)
        )

    def take(t: Table, row: tuple[Any, ...]) -> None:
        total, counts = row
        t.default_rows = total
        t.conflicts = {s.lo: n for s, n in zip(t.creates, counts[1:], strict=True) if n}

    _read_each(conn, tables, select, take)


def assign_names(conn: psycopg.Connection, tables: Sequence[Table]) -> None:
    """Spec names for new partitions, made unique against every relation in the schema."""
    wanted = [(t, s) for t in tables for s in t.creates]
    taken: set[tuple[str, str]] = set()
    attempt: dict[tuple[int, int], int] = {}
    pending = wanted
    for _ in range(8):
        if not pending:
            return
        candidates = {}
        for t, s in pending:
            n = attempt.get((id(t), s.lo), 1)
            name = grid.partition_name(t.name.name, s.suffix if n == 1 else f"{s.suffix}_{n}")
            candidates[(id(t), s.lo)] = (t, s, name)
        keys = [(t.name.schema, name) for t, _, name in candidates.values()]
        rows = conn.execute(NAMES_SQL, ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
        taken |= {(r[0], r[1]) for r in rows}
        retry = []
        for key, (t, s, name) in candidates.items():
            if (t.name.schema, name) in taken:
                attempt[key] = attempt.get(key, 1) + 1
                retry.append((t, s))
            else:
                taken.add((t.name.schema, name))
                t.names[s.lo] = name
        pending = retry
    raise RuntimeError("could not find free names for new partitions")  # pragma: no cover
