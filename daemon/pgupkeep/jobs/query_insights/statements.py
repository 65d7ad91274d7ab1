"""pg_stat_statements as what changed between two runs: one read per run (`read`) and the
interval between two snapshots (`interval`, pure); verdicts.py judges it.

The figures are cumulative since the last reset; only differences between two snapshots of this
process say anything about now. An entry whose counters went backwards, or whose `stats_since`
moved, was reset or evicted and re-added in between: its interval is skipped, never reported as a
negative figure or as a spike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

EXTENSION = "pg_stat_statements"

# Where the extension lives in this database, and which columns its installed version has
# (`toplevel` from 1.9, `stats_since` from 1.11; an old version survives a server upgrade).
EXTENSION_SQL = """
SELECT n.nspname AS schema, e.extversion AS version,
       EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = to_regclass(format('%I.pg_stat_statements', n.nspname))
                 AND a.attname = 'toplevel' AND NOT a.attisdropped) AS has_toplevel,
       EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = to_regclass(format('%I.pg_stat_statements', n.nspname))
                 AND a.attname = 'stats_since' AND NOT a.attisdropped) AS has_stats_since,
       to_regclass(format('%I.pg_stat_statements_info', n.nspname)) IS NOT NULL AS has_info,
       (SELECT oid FROM pg_database WHERE datname = current_database()) AS dbid
FROM pg_extension e
JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""
# Readable only with pg_read_all_settings (a member of pg_monitor); else no row.
PRELOAD_SQL = "SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'"
# Top-level statements only: a statement run inside a function is part of its caller's time, and
# a loop inside the server is no round trip. `param_equality` feeds the N+1 heuristic: a WHERE
# with an equality to a parameter or a constant (pg_stat_statements shows both as $n).
STATEMENTS_SQL = """
SELECT s.userid, s.queryid, s.calls, s.total_exec_time AS exec_ms, s.rows, s.shared_blks_read,
       {stats_since} AS stats_since,
       s.query ~* '\\mwhere\\M.*[^<>!=]=\\s*\\$[0-9]+' AS param_equality,
       left(s.query, {text_chars}) AS query
FROM {view} s
WHERE s.dbid = %(dbid)s {toplevel}
"""
INFO_SQL = "SELECT dealloc, stats_reset FROM {}"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Entry:
    """One pg_stat_statements entry's cumulative counters (key: userid, queryid)."""

    calls: int
    exec_ms: float
    rows: int
    blks_read: int
    stats_since: datetime | None = None


@dataclass(frozen=True)
class Snapshot:
    """What one run read; the previous run's is kept in the job's memo (numbers only, no text)."""

    taken_at: datetime
    dbid: int
    stats_reset: datetime | None
    dealloc: int | None
    entries: Mapping[tuple[int, int], Entry]
    hidden: int = 0  # entries of other roles this role may not see (queryid NULL)


@dataclass(frozen=True)
class Statement:
    """What this run knows of a queryid besides its counters."""

    query: str | None
    param_equality: bool


@dataclass(frozen=True)
class Reading:
    snapshot: Snapshot
    statements: Mapping[int, Statement]


@dataclass(frozen=True)
class Unavailable:
    """pg_stat_statements cannot be read: why, and what to do."""

    reason: str  # not_installed | not_preloaded
    database: str
    preloaded: bool | None  # None: this role may not read shared_preload_libraries


@dataclass(frozen=True)
class Delta:
    """One queryid's figures in the interval (its entries of every role summed)."""

    queryid: int
    calls: int
    exec_ms: float
    rows: int
    blks_read: int

    @property
    def mean_ms(self) -> float:
        return self.exec_ms / self.calls if self.calls else 0.0

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class Interval:
    seconds: float
    deltas: Sequence[Delta] = ()
    skipped: int = 0  # entries whose interval could not be measured (reset, evicted and re-added)
    reason: str | None = None  # why the whole interval was skipped: first_run, stats_reset


# --------------------------------------------------------------------------- read


def read(conn: psycopg.Connection, now: datetime, text_chars: int) -> Reading | Unavailable:
    """One read of pg_stat_statements (and its _info view) for the connected database, with the
    first `text_chars` characters of each statement's text."""
    with conn.cursor(row_factory=dict_row) as cur:
        ext = cur.execute(EXTENSION_SQL).fetchone()
        database = conn.info.dbname
        if ext is None:
            return Unavailable("not_installed", database, _preloaded(conn))
        schema = ext["schema"]
        query = sql.SQL(STATEMENTS_SQL).format(
            view=sql.Identifier(schema, "pg_stat_statements"),
            stats_since=sql.SQL("s.stats_since" if ext["has_stats_since"] else "NULL::timestamptz"),
            toplevel=sql.SQL("AND s.toplevel" if ext["has_toplevel"] else ""),
            text_chars=sql.Literal(text_chars),
        )
        try:
            rows = cur.execute(query, {"dbid": ext["dbid"]}).fetchall()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # "pg_stat_statements must be loaded via shared_preload_libraries"
            return Unavailable("not_preloaded", database, False)
        info: dict[str, Any] = {"dealloc": None, "stats_reset": None}
        if ext["has_info"]:
            info = cur.execute(sql.SQL(INFO_SQL).format(sql.Identifier(schema, "pg_stat_statements_info"))).fetchone() or info
    return reading_from_rows(rows, now=now, dbid=int(ext["dbid"]), stats_reset=info["stats_reset"], dealloc=info["dealloc"])


def _preloaded(conn: psycopg.Connection) -> bool | None:
    row = conn.execute(PRELOAD_SQL).fetchone()
    if row is None:
        return None
    return EXTENSION in [lib.strip().strip('"') for lib in str(row[0]).split(",")]


def reading_from_rows(
    rows: Sequence[Mapping[str, Any]], *, now: datetime, dbid: int, stats_reset: datetime | None, dealloc: int | None
) -> Reading:
    entries: dict[tuple[int, int], Entry] = {}
    statements: dict[int, Statement] = {}
    hidden = 0
    for r in rows:
        if r["queryid"] is None:  # another role's statement, without pg_read_all_stats
            hidden += 1
            continue
        qid = int(r["queryid"])
        entries[(int(r["userid"]), qid)] = Entry(
            calls=int(r["calls"]), exec_ms=float(r["exec_ms"]), rows=int(r["rows"]),
            blks_read=int(r["shared_blks_read"]), stats_since=r["stats_since"],
        )  # fmt: skip
        known = statements.get(qid)
        statements[qid] = Statement(
            query=r["query"] if known is None else known.query,
            param_equality=bool(r["param_equality"]) or (known is not None and known.param_equality),
        )
    snap = Snapshot(taken_at=now, dbid=dbid, stats_reset=stats_reset, dealloc=dealloc, entries=entries, hidden=hidden)
    return Reading(snapshot=snap, statements=statements)


# --------------------------------------------------------------------------- interval (pure)


def interval(prev: Snapshot | None, cur: Snapshot) -> Interval:
    """What happened between two snapshots, per queryid; skipped where it cannot be known."""
    if prev is None or prev.dbid != cur.dbid:
        return Interval(0.0, reason="first_run")
    seconds = (cur.taken_at - prev.taken_at).total_seconds()
    if seconds <= 0:
        return Interval(0.0, reason="clock")
    if prev.stats_reset != cur.stats_reset:  # pg_stat_statements_reset() of everything
        return Interval(seconds, skipped=len(cur.entries), reason="stats_reset")
    sums: dict[int, list[float]] = {}
    skipped = 0
    for key, now in cur.entries.items():
        before = prev.entries.get(key)
        if before is None:
            # Created after the last snapshot (that one read every entry of this database), so
            # all its counts fall in the interval.
            d = (now.calls, now.exec_ms, now.rows, now.blks_read)
        elif (
            now.stats_since != before.stats_since
            or now.calls < before.calls
            or now.exec_ms < before.exec_ms
            or now.rows < before.rows
            or now.blks_read < before.blks_read
        ):
            skipped += 1  # reset or evicted and re-added since: this interval is unknown
            continue
        else:
            d = (now.calls - before.calls, now.exec_ms - before.exec_ms, now.rows - before.rows, now.blks_read - before.blks_read)
        acc = sums.setdefault(key[1], [0, 0.0, 0, 0])
        for i, v in enumerate(d):
            acc[i] += v
    deltas = [
        Delta(queryid=q, calls=int(c), exec_ms=float(t), rows=int(r), blks_read=int(b))
        for q, (c, t, r, b) in sums.items()
        if c > 0
    ]
    return Interval(seconds, deltas=deltas, skipped=skipped)
