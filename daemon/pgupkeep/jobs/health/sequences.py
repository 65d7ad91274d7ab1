"""Sequences and integer keys: every sequence (serial and identity ones included) with the share
of its range it has used, where the range ends at the first limit it meets: its own MAXVALUE or
the type of a column it feeds (an integer column fed by a bigint sequence fails at 2^31 - 1).

Each run reads one small row per sequence (STATE_SQL: may we read it, is it locked, how often was
its page fetched) and, only when the catalog moved, the statement that finds every sequence's
limits and columns (CATALOG_SQL). Reading a sequence's value takes a lock on it until the
transaction ends and opens it (cold in every new session: about 30 us each), so:
- values are read in batches of max_locks_per_transaction (the lock budget PostgreSQL sizes per
  transaction): one statement over 20,000 sequences takes 20,000 locks and fails with "out of
  shared memory" on a default server, and starves other sessions' lock requests long before that;
- only sequences used since the last run are read again. nextval() and setval() read the
  sequence's page, which the statistics count (pg_stat_get_blocks_fetched, read without opening
  anything); a sequence whose count has not moved keeps the value read before. Likewise the
  catalog statement runs again only when the row counts of the catalogs it reads moved (DDL).
  Counts are flushed when the session that moved them ends its transaction, so a value is at most
  a transaction (and the statistics' flush delay) late; everything is read again at least every
  FULL_READ_EVERY, and on every run when track_counts is off or on a standby (replay moves
  sequences without counting).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.db import read_past_exclusive_locks
from pgupkeep.jobs.health.common import bounded, count, percent
from pgupkeep.policy import HealthSection
from pgupkeep.results import Finding, JobOutput, Sample

# Each sequence with the tightest column it feeds: of its OWNED BY (serial) and identity links and
# the column defaults that call nextval() on it (OWNED BY or not), the one whose type ends first.
# A domain column counts as its base type.
CATALOG_SQL = """
WITH fed AS (
    SELECT d.objid AS seq, d.refobjid AS rel, d.refobjsubid::int2 AS attnum
    FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
    UNION ALL
    SELECT d.refobjid, ad.adrelid, ad.adnum
    FROM pg_depend d
    JOIN pg_attrdef ad ON ad.oid = d.objid
    WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'n'
),
tightest AS (  -- of the columns a sequence feeds, the one whose type ends first
    SELECT DISTINCT ON (f.seq) f.seq, f.rel, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
           CASE coalesce(nullif(ty.typbasetype, 0), ty.oid)
               WHEN 'int2'::regtype THEN 32767 WHEN 'int4'::regtype THEN 2147483647
               WHEN 'int8'::regtype THEN 9223372036854775807 END AS type_max,
           CASE coalesce(nullif(ty.typbasetype, 0), ty.oid)
               WHEN 'int2'::regtype THEN -32768 WHEN 'int4'::regtype THEN -2147483648
               WHEN 'int8'::regtype THEN -9223372036854775807 - 1 END AS type_min
    FROM fed f
    JOIN pg_attribute a ON a.attrelid = f.rel AND a.attnum = f.attnum AND NOT a.attisdropped
    JOIN pg_type ty ON ty.oid = a.atttypid
    ORDER BY f.seq, 5 NULLS LAST
)
SELECT c.oid, n.nspname || '.' || c.relname AS sequence, format_type(s.seqtypid, NULL) AS type,
       s.seqstart AS start, s.seqincrement AS increment, s.seqmin AS min, s.seqmax AS max, s.seqcycle AS cycle,
       c.relpersistence = 'u' AS unlogged,
       tn.nspname || '.' || t.relname || '.' || k.attname AS column_name, k.type AS column_type,
       k.type_max AS column_max, k.type_min AS column_min
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN tightest k ON k.seq = c.oid
LEFT JOIN pg_class t ON t.oid = k.rel
LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE NOT pg_is_other_temp_schema(n.oid)
"""

# Every run: each sequence's page fetches and whether this role may read it; whether another
# session holds (or awaits) a lock that conflicts with reading it (ALTER or DROP SEQUENCE in an open
# transaction: skipped rather than waited for); and how many rows the catalogs CATALOG_SQL reads
# have had inserted, updated or deleted (what DDL moves; a GRANT moves pg_class).
STATE_SQL = """
WITH settings AS MATERIALIZED (
    SELECT current_setting('track_counts')::bool AND NOT pg_is_in_recovery() AS counted,
           pg_is_in_recovery() AS in_recovery,
           current_setting('max_locks_per_transaction')::int AS lock_budget,
           (SELECT sum(pg_stat_get_tuples_inserted(r) + pg_stat_get_tuples_updated(r) + pg_stat_get_tuples_deleted(r))
            FROM unnest('{pg_class,pg_attribute,pg_attrdef,pg_depend,pg_sequence,pg_type,pg_namespace}'::regclass[]) AS r
           )::bigint AS catalog_changes
),
conflicting_locks AS (
    SELECT DISTINCT l.relation
    FROM pg_locks l
    WHERE l.locktype = 'relation'
      AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.pid IS DISTINCT FROM pg_backend_pid()
)
SELECT s.seqrelid AS oid, pg_stat_get_blocks_fetched(s.seqrelid) AS fetched,
       has_sequence_privilege(s.seqrelid, 'SELECT,USAGE') AS readable, lk.relation IS NOT NULL AS locked,
       st.counted, st.in_recovery, st.lock_budget, st.catalog_changes
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
CROSS JOIN settings st
LEFT JOIN conflicting_locks lk ON lk.relation = s.seqrelid
WHERE NOT pg_is_other_temp_schema(c.relnamespace)
"""

# One batch of values (NULL: never called). Each statement is its own transaction (autocommit),
# so its locks are released before the next batch.
VALUES_SQL = """
SELECT s.oid, pg_sequence_last_value(s.oid)::numeric AS last_value
FROM unnest(%(oids)s::oid[]) AS s(oid)
"""
# The same batch again, when something changed since the catalog read: a lock taken on one of them
# (LockNotAvailable after lock_timeout), a sequence dropped (could not open relation) or a
# privilege revoked. Its own snapshot no longer lists the dropped ones; the others are skipped.
VALUES_CAREFULLY_SQL = """
SELECT s.oid, k.skip,
       CASE WHEN NOT k.skip THEN pg_sequence_last_value(s.oid)::numeric END AS last_value
FROM unnest(%(oids)s::oid[]) AS s(oid)
JOIN pg_class c ON c.oid = s.oid AND c.relkind = 'S'
CROSS JOIN LATERAL (SELECT NOT has_sequence_privilege(s.oid, 'SELECT,USAGE') OR EXISTS (
           SELECT 1 FROM pg_locks l
           WHERE l.locktype = 'relation' AND l.relation = s.oid AND l.pid IS DISTINCT FROM pg_backend_pid()
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')) AS skip) k
"""
# What a batch may meet when the catalog moved under it.
CHANGED_UNDER = (psycopg.errors.LockNotAvailable, psycopg.errors.InternalError_, psycopg.errors.InsufficientPrivilege)


@dataclass(frozen=True)
class SequenceUse:
    sequence: str
    ratio: float
    last_value: int | None
    limit: int  # the last value nextval() can return
    left: int  # values left before the limit
    limited_by: str  # "sequence" (its own MAXVALUE/MINVALUE) or "column"
    column: str | None  # the tightest column it feeds (schema.table.column)
    column_type: str | None
    type: str
    cycle: bool


@dataclass(frozen=True)
class Sequences:
    used: Sequence[SequenceUse] = field(default_factory=tuple)
    unreadable: int = 0  # no privilege, or an unlogged sequence on a standby
    skipped_locked: tuple[str, ...] = ()
    read: int = 0  # values read this run (the others had not moved)


FULL_READ_EVERY = timedelta(hours=1)
MEMO_CATALOG = "sequence_catalog"  # (catalog_changes, {oid: catalog row}) as last read
MEMO_VALUES = "sequence_values"  # oid -> (page fetches once our own read is counted, last_value)
MEMO_USE = "sequence_use"  # oid -> SequenceUse, for sequences whose value and catalog row held
MEMO_FULL_READ = "sequence_values_read_at"


def read(conn: psycopg.Connection, now: datetime, memo: MutableMapping[str, Any]) -> Sequences:
    full_at = memo.get(MEMO_FULL_READ)
    with conn.cursor(row_factory=dict_row) as cur:
        state = cur.execute(STATE_SQL).fetchall()
        if not state:
            memo.pop(MEMO_CATALOG, None)
            return Sequences()
        head = state[0]
        full = not head["counted"] or full_at is None or now - full_at >= FULL_READ_EVERY
        catalog_at, catalog = memo.get(MEMO_CATALOG, (None, {}))
        fresh_catalog = full or catalog_at != head["catalog_changes"] or any(r["oid"] not in catalog for r in state)
        if fresh_catalog:
            catalog = {r["oid"]: r for r in cur.execute(CATALOG_SQL).fetchall()}
        cached: dict[int, tuple[int, Any]] = {} if full else memo.get(MEMO_VALUES, {})
        wanted = [
            r["oid"] for r in state
            if r["oid"] in catalog and r["readable"] and not r["locked"]
            and not (head["in_recovery"] and catalog[r["oid"]]["unlogged"])  # no value on a standby
            and cached.get(r["oid"], (None,))[0] != r["fetched"]
        ]  # fmt: skip
        batch = max(16, int(head["lock_budget"]))
        fresh: dict[int, Any] = {}
        for i in range(0, len(wanted), batch):
            oids = wanted[i : i + batch]
            try:
                got = cur.execute(VALUES_SQL, {"oids": oids}).fetchall()
            except CHANGED_UNDER:
                got = read_past_exclusive_locks(lambda oids=oids: cur.execute(VALUES_CAREFULLY_SQL, {"oids": oids}).fetchall())
                got = [r for r in got if not r["skip"]]
            fresh.update((r["oid"], r["last_value"]) for r in got)
    uses: dict[int, SequenceUse] = {} if fresh_catalog else memo.get(MEMO_USE, {})
    values: dict[int, tuple[int, Any]] = {}
    kept: dict[int, SequenceUse] = {}
    unreadable, locked = 0, []
    for r in state:
        oid = r["oid"]
        row = catalog.get(oid)
        if row is None:  # created after the catalog read: the next run has it
            continue
        if not r["readable"] or (head["in_recovery"] and row["unlogged"]):
            unreadable += 1
            continue
        if oid in fresh:
            # Our own read counts one more page fetch, flushed when this session ends.
            values[oid] = (int(r["fetched"]) + 1, fresh[oid])
        elif oid in cached:  # unchanged, or locked right now: the value read before
            values[oid] = cached[oid]
        else:
            locked.append(row["sequence"])
            continue
        kept[oid] = uses[oid] if oid in uses and oid not in fresh else usage(row, values[oid][1])
    if head["counted"]:
        memo[MEMO_CATALOG] = (head["catalog_changes"], catalog)
    else:
        memo.pop(MEMO_CATALOG, None)
    memo[MEMO_VALUES] = values
    memo[MEMO_USE] = kept
    if full:
        memo[MEMO_FULL_READ] = now
    return Sequences(used=list(kept.values()), unreadable=unreadable, skipped_locked=tuple(locked), read=len(fresh))


def usage(row: Mapping[str, Any], last_value: Any) -> SequenceUse:
    """The share of the range used between the start and the first limit the sequence meets: its
    own MAXVALUE (MINVALUE when descending), or the end of the type of the column it feeds."""
    start, step = int(row["start"]), int(row["increment"])
    ascending = step > 0
    limit, limited_by = (int(row["max"]) if ascending else int(row["min"])), "sequence"
    bound = row["column_max"] if ascending else row["column_min"]
    if bound is not None and (int(bound) < limit if ascending else int(bound) > limit):
        limit, limited_by = int(bound), "column"
    value = int(last_value) if last_value is not None else None
    at = value if value is not None else start - step  # never called: the next value is the start
    span = (limit - start) if ascending else (start - limit)
    done = (at - start) if ascending else (start - at)
    ratio = 1.0 if span <= 0 else min(1.0, max(0.0, done / span))
    return SequenceUse(
        sequence=row["sequence"], ratio=ratio, last_value=value, limit=limit, left=max(0, span - done),
        limited_by=limited_by, column=row["column_name"], column_type=row["column_type"], type=row["type"],
        cycle=bool(row["cycle"]),
    )  # fmt: skip


def judge(seqs: Sequences, section: HealthSection) -> JobOutput:
    out = JobOutput()
    worst = sorted(seqs.used, key=lambda u: (-u.ratio, u.sequence))
    out.samples += [Sample("sequence_used_ratio", u.ratio, {"sequence": u.sequence}) for u in worst[: section.report_top]]
    out.samples.append(Sample("sequences_unreadable", float(seqs.unreadable)))
    over = [_finding(u, section) for u in worst if u.ratio >= section.sequence_warn]
    out.findings += bounded(over, section.report_top)
    return out


def _finding(u: SequenceUse, section: HealthSection) -> Finding:
    if u.limited_by == "column":
        where = f"feeds {u.column} ({u.column_type}), which ends at {count(u.limit)}"
        fix = (
            f"widen the column before it runs out: ALTER TABLE ... ALTER COLUMN ... TYPE bigint on {u.column} "
            "(a table rewrite under an ACCESS EXCLUSIVE lock: plan it, or migrate through a new bigint column)"
        )
    else:
        bound = "MAXVALUE" if u.limit > 0 else "MINVALUE"
        where = f"ends at its own {bound} {count(u.limit)} ({u.type})"
        widen = "" if u.type == "bigint" else "AS bigint "
        fed = f" (and widen {u.column}, {u.column_type}, which it feeds)" if u.column and u.column_type != "bigint" else ""
        fix = f"raise it: ALTER SEQUENCE {u.sequence} {widen}NO {bound}{fed}"
    if u.cycle:
        fix += "; it CYCLEs, so at the end it restarts and repeats values a unique key refuses"
    return Finding(
        kind="sequence_exhausting",
        object=u.sequence,
        value=round(u.ratio, 6),
        message=(
            f"{u.sequence} {where}: {percent(u.ratio)} used, {count(u.left)} {'value' if u.left == 1 else 'values'} left "
            f"(warn at {percent(section.sequence_warn)}); "
            f"inserts fail when it runs out; {fix}"
        ),
        detail={
            "sequence": u.sequence,
            "ratio": round(u.ratio, 6),
            "last_value": u.last_value,
            "limit": u.limit,
            "limited_by": u.limited_by,
            "column": u.column,
            "column_type": u.column_type,
            "sequence_type": u.type,
            "cycle": u.cycle,
        },
    )
