"""Sequences and integer keys: every sequence (serial and identity ones included) with the share
of its range it has used, where the range ends at the first limit it meets: its own MAXVALUE or
the type of a column it feeds (an integer column fed by a bigint sequence fails at 2^31 - 1).

One catalog statement finds every sequence and its limits. Reading a sequence's value takes a lock
on it until the transaction ends, so the values are read in batches of max_locks_per_transaction
(the lock budget PostgreSQL sizes per transaction): one statement over 20,000 sequences takes
20,000 locks and fails with "out of shared memory" on a default server, and starves other
sessions' lock requests long before that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.db import read_past_exclusive_locks
from pgupkeep.jobs.health.common import bounded, count
from pgupkeep.policy import HealthSection
from pgupkeep.results import Finding, JobOutput, Sample

# Each sequence with the columns it feeds: OWNED BY (serial) and identity links, and column
# defaults that call nextval() on it without OWNED BY. A domain column counts as its base type.
# Sequences another session holds (or awaits) a lock on that conflicts with reading it (ALTER or
# DROP SEQUENCE in an open transaction) are flagged, to be skipped rather than waited for.
CATALOG_SQL = """
WITH fed AS (
    SELECT d.objid AS seq, d.refobjid AS rel, d.refobjsubid AS attnum
    FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
    UNION
    SELECT d.refobjid, ad.adrelid, ad.adnum
    FROM pg_depend d
    JOIN pg_attrdef ad ON ad.oid = d.objid
    WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
),
columns AS (
    SELECT f.seq, format('%s.%s.%s', tn.nspname, t.relname, a.attname) AS name,
           format_type(a.atttypid, a.atttypmod) AS type,
           CASE coalesce(nullif(ty.typbasetype, 0), ty.oid)
               WHEN 'int2'::regtype THEN 32767::numeric WHEN 'int4'::regtype THEN 2147483647::numeric
               WHEN 'int8'::regtype THEN 9223372036854775807::numeric END AS type_max,
           CASE coalesce(nullif(ty.typbasetype, 0), ty.oid)
               WHEN 'int2'::regtype THEN -32768::numeric WHEN 'int4'::regtype THEN -2147483648::numeric
               WHEN 'int8'::regtype THEN -9223372036854775808::numeric END AS type_min
    FROM fed f
    JOIN pg_class t ON t.oid = f.rel AND t.relkind IN ('r', 'p', 'f')
    JOIN pg_namespace tn ON tn.oid = t.relnamespace
    JOIN pg_attribute a ON a.attrelid = f.rel AND a.attnum = f.attnum AND NOT a.attisdropped
    JOIN pg_type ty ON ty.oid = a.atttypid
),
conflicting_locks AS (
    SELECT DISTINCT l.relation
    FROM pg_locks l
    WHERE l.locktype = 'relation'
      AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.pid IS DISTINCT FROM pg_backend_pid()
)
SELECT c.oid, format('%s.%s', n.nspname, c.relname) AS sequence, format_type(s.seqtypid, NULL) AS type,
       s.seqstart::numeric AS start, s.seqincrement::numeric AS increment, s.seqmin::numeric AS min,
       s.seqmax::numeric AS max, s.seqcycle AS cycle,
       has_sequence_privilege(c.oid, 'SELECT,USAGE') AS readable,
       -- an unlogged sequence has no value on a standby
       NOT (pg_is_in_recovery() AND c.relpersistence = 'u') AS has_value,
       lk.relation IS NOT NULL AS locked,
       coalesce(jsonb_agg(jsonb_build_object('column', col.name, 'type', col.type, 'max', col.type_max, 'min', col.type_min)
                          ORDER BY col.name) FILTER (WHERE col.name IS NOT NULL), '[]') AS feeds,
       current_setting('max_locks_per_transaction')::int AS lock_budget
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN columns col ON col.seq = c.oid
LEFT JOIN conflicting_locks lk ON lk.relation = c.oid
WHERE NOT pg_is_other_temp_schema(n.oid)
GROUP BY c.oid, n.nspname, c.relname, s.seqtypid, s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcycle,
         c.relpersistence, lk.relation
ORDER BY c.oid
"""

# One batch of values (NULL: never called). Each statement is its own transaction (autocommit),
# so its locks are released before the next batch. The lock check is repeated here only when a
# batch met a lock taken after the catalog read (LockNotAvailable after lock_timeout).
VALUES_SQL = """
SELECT s.oid, pg_sequence_last_value(s.oid)::numeric AS last_value
FROM unnest(%(oids)s::oid[]) AS s(oid)
"""
VALUES_PAST_LOCKS_SQL = """
SELECT s.oid, k.locked,
       CASE WHEN NOT k.locked THEN pg_sequence_last_value(s.oid)::numeric END AS last_value
FROM unnest(%(oids)s::oid[]) AS s(oid)
CROSS JOIN LATERAL (SELECT EXISTS (
           SELECT 1 FROM pg_locks l
           WHERE l.locktype = 'relation' AND l.relation = s.oid AND l.pid IS DISTINCT FROM pg_backend_pid()
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')) AS locked) k
"""


@dataclass(frozen=True)
class SequenceUse:
    sequence: str
    ratio: float
    last_value: int | None
    limit: int  # the last value nextval() can return
    left: int  # values left before the limit
    limited_by: str  # "sequence" (its own MAXVALUE/MINVALUE) or "column"
    column: Mapping[str, Any] | None  # the column whose type sets the limit
    type: str
    cycle: bool
    feeds: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


@dataclass(frozen=True)
class Sequences:
    used: Sequence[SequenceUse] = field(default_factory=tuple)
    unreadable: int = 0  # no privilege, or an unlogged sequence on a standby
    skipped_locked: tuple[str, ...] = ()


def read(conn: psycopg.Connection) -> Sequences:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(CATALOG_SQL).fetchall()
        wanted = [r["oid"] for r in rows if r["readable"] and r["has_value"] and not r["locked"]]
        batch = max(16, int(rows[0]["lock_budget"])) if rows else 0
        values: dict[int, Any] = {}
        for i in range(0, len(wanted), batch or 1):
            oids = wanted[i : i + batch]
            try:
                got = cur.execute(VALUES_SQL, {"oids": oids}).fetchall()
            except psycopg.errors.LockNotAvailable:
                got = read_past_exclusive_locks(lambda oids=oids: cur.execute(VALUES_PAST_LOCKS_SQL, {"oids": oids}).fetchall())
                got = [r for r in got if not r["locked"]]
            values.update((r["oid"], r["last_value"]) for r in got)
    used, unreadable, locked = [], 0, []
    for r in rows:
        if not (r["readable"] and r["has_value"]):
            unreadable += 1
        elif r["locked"] or r["oid"] not in values:
            locked.append(r["sequence"])
        else:
            used.append(usage(r, values[r["oid"]]))
    return Sequences(used=used, unreadable=unreadable, skipped_locked=tuple(locked))


def usage(row: Mapping[str, Any], last_value: Any) -> SequenceUse:
    """The share of the range used between the start and the first limit the sequence meets."""
    start, step = int(row["start"]), int(row["increment"])
    ascending = step > 0
    feeds = list(row["feeds"])
    limit, limited_by, column = (int(row["max"]) if ascending else int(row["min"])), "sequence", None
    for col in feeds:
        bound = col["max"] if ascending else col["min"]
        if bound is None:
            continue
        bound = int(bound)
        if (ascending and bound < limit) or (not ascending and bound > limit):
            limit, limited_by, column = bound, "column", col
    value = int(last_value) if last_value is not None else None
    at = value if value is not None else start - step  # never called: the next value is the start
    span = (limit - start) if ascending else (start - limit)
    done = (at - start) if ascending else (start - at)
    ratio = 1.0 if span <= 0 else min(1.0, max(0.0, done / span))
    return SequenceUse(
        sequence=row["sequence"], ratio=ratio, last_value=value, limit=limit, left=max(0, span - done), limited_by=limited_by,
        column=column, type=row["type"], cycle=bool(row["cycle"]), feeds=feeds,
    )  # fmt: skip


def judge(seqs: Sequences, section: HealthSection) -> JobOutput:
    out = JobOutput()
    worst = sorted(seqs.used, key=lambda u: (-u.ratio, u.sequence))
    out.samples += [Sample("sequence_used_ratio", round(u.ratio, 6), {"sequence": u.sequence}) for u in worst[: section.report_top]]
    out.samples.append(Sample("sequences_unreadable", float(seqs.unreadable)))
    over = [_finding(u, section) for u in worst if u.ratio >= section.sequence_warn]
    out.findings += bounded(over, section.report_top)
    return out


def _finding(u: SequenceUse, section: HealthSection) -> Finding:
    if u.column is not None:
        col = u.column
        where = f"feeds {col['column']} ({col['type']}), which ends at {count(u.limit)}"
        fix = (
            f"widen the column before it runs out: ALTER TABLE ... ALTER COLUMN ... TYPE bigint on {col['column']} "
            "(a table rewrite under an ACCESS EXCLUSIVE lock: plan it, or migrate through a new bigint column)"
        )
    else:
        where = f"ends at its own {'MAXVALUE' if u.limit > 0 else 'MINVALUE'} {count(u.limit)} ({u.type})"
        fix = f"raise it: ALTER SEQUENCE {u.sequence} AS bigint NO MAXVALUE (and widen the columns it feeds)"
    if u.cycle:
        fix += "; it CYCLEs, so at the end it restarts and repeats values a unique key refuses"
    return Finding(
        kind="sequence_exhausting",
        object=u.sequence,
        value=round(u.ratio, 6),
        message=(
            f"{u.sequence} {where}: {u.ratio:.0%} used, {count(u.left)} values left (warn at {section.sequence_warn:.0%}); "
            f"inserts fail when it runs out; {fix}"
        ),
        detail={
            "sequence": u.sequence,
            "ratio": round(u.ratio, 6),
            "last_value": u.last_value,
            "limit": u.limit,
            "limited_by": u.limited_by,
            "column": u.column["column"] if u.column else None,
            "column_type": u.column["type"] if u.column else None,
            "sequence_type": u.type,
            "cycle": u.cycle,
            "feeds": [c["column"] for c in u.feeds],
        },
    )
