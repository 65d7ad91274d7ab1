"""What the bloat job reads: one set-based query for the tables that may be large enough to judge,
one for the column statistics of those that are (cached until the next ANALYZE), and the settings.

Sizes cost a relation open each (a cold session pays ~25 us a relation, 0.24 s for 10,000
tables), so only tables whose last known size (relpages, as of VACUUM/ANALYZE) or whose row
counters since then suggest they may reach min_table_size are measured with pg_relation_size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.db import EXCLUSIVE_LOCKS_CTE, read_past_exclusive_locks
from pgupkeep.jobs.bloat.layout import Column

# A table is measured when nobody holds or awaits an ACCESS EXCLUSIVE lock on it or its TOAST
# table (pg_relation_size takes ACCESS SHARE and would queue behind it) and it may be large: its
# tree's or its own pages as of the last VACUUM/ANALYZE reach half the threshold, or it has had
# many more rows since (autovacuum off, or not yet run).
TABLES_SQL = "WITH " + EXCLUSIVE_LOCKS_CTE + """, rels AS (
    SELECT c.oid, n.nspname, c.relname, c.reltuples, c.relpages, c.relnatts, c.reloptions, c.reltoastrelid,
           c.relispartition, coalesce(t.relpages, 0) AS toast_relpages,
           CASE WHEN c.relispartition THEN pg_partition_root(c.oid) END AS root,
           pg_stat_get_live_tuples(c.oid) + pg_stat_get_dead_tuples(c.oid) AS tuples
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
    WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
), sized AS (
    SELECT r.*, sum(r.relpages + r.toast_relpages) OVER (PARTITION BY r.root) AS tree_pages
    FROM rels r
), picked AS (
    SELECT s.*, lk.granted AS lock_granted, lk.pids AS lock_pids,
           lk.relation IS NULL AND tl.relation IS NULL AND (
               s.relpages + s.toast_relpages >= %(min_pages)s
               OR (s.root IS NOT NULL AND s.tree_pages >= %(min_pages)s)
               OR s.tuples > 2 * greatest(s.reltuples, 0) + 1000
           ) AS measure
    FROM sized s
    LEFT JOIN exclusive_locks lk ON lk.relation = s.oid
    LEFT JOIN exclusive_locks tl ON tl.relation = s.reltoastrelid
    WHERE lk.relation IS NOT NULL OR tl.relation IS NOT NULL OR %(min_pages)s = 0
       OR s.relpages + s.toast_relpages >= %(min_pages)s
       OR (s.root IS NOT NULL AND s.tree_pages >= %(min_pages)s)
       OR s.tuples > 2 * greatest(s.reltuples, 0) + 1000
)
SELECT p.oid, p.nspname, p.relname, rn.nspname AS root_schema, rc.relname AS root_name,
       p.reltuples, p.relpages, p.relnatts, p.reloptions, p.lock_granted, coalesce(p.lock_pids, lt.pids) AS lock_pids,
       coalesce(p.lock_granted, lt.granted) AS any_lock_granted,
       CASE WHEN p.measure THEN pg_relation_size(p.oid) END AS size_bytes,
       CASE WHEN p.measure AND p.reltoastrelid <> 0 THEN pg_relation_size(p.reltoastrelid) END AS toast_bytes,
       nullif(p.reltoastrelid, 0) AS toast_oid,
       pg_stat_get_live_tuples(p.oid) AS n_live_tup, pg_stat_get_dead_tuples(p.oid) AS n_dead_tup,
       pg_stat_get_tuples_updated(p.oid) + pg_stat_get_tuples_deleted(p.oid) AS n_tup_gone,
       CASE WHEN p.reltoastrelid <> 0 THEN pg_stat_get_live_tuples(p.reltoastrelid) END AS toast_live_tup,
       CASE WHEN p.reltoastrelid <> 0 THEN pg_stat_get_dead_tuples(p.reltoastrelid) END AS toast_dead_tup,
       CASE WHEN p.reltoastrelid <> 0 THEN pg_stat_get_tuples_inserted(p.reltoastrelid) END AS toast_inserted,
       CASE WHEN p.reltoastrelid <> 0 THEN pg_stat_get_vacuum_count(p.reltoastrelid)
                                           + pg_stat_get_autovacuum_count(p.reltoastrelid) END AS toast_vacuums,
       CASE WHEN p.reltoastrelid <> 0 THEN pg_stat_get_ins_since_vacuum(p.reltoastrelid) END AS toast_ins_since_vacuum,
       pg_stat_get_last_vacuum_time(p.oid) AS last_vacuum, pg_stat_get_last_autovacuum_time(p.oid) AS last_autovacuum,
       greatest(pg_stat_get_last_analyze_time(p.oid), pg_stat_get_last_autoanalyze_time(p.oid)) AS last_analyze,
       pg_stat_get_mod_since_analyze(p.oid) AS mod_since_analyze
FROM picked p
LEFT JOIN exclusive_locks lt ON lt.relation = p.reltoastrelid
LEFT JOIN pg_class rc ON rc.oid = p.root
LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
"""

# Column statistics of the tables to judge. For string columns the stored widths of the values
# ANALYZE kept (most common values with their frequencies, histogram bounds) give the spread of
# widths that the padding depends on; a value's stored width is its length plus a 1-byte header
# (4 bytes above 126).
COLUMNS_SQL = """
WITH st AS MATERIALIZED (
    -- Constant name filters reach inside the pg_stats view (its name comparisons are leakproof),
    -- so it reads the statistics of these tables only; a join alone makes it build all of them.
    SELECT s.schemaname, s.tablename, s.attname, s.avg_width, s.null_frac,
           s.most_common_vals::text AS mcv, s.most_common_freqs, s.histogram_bounds::text AS hist
    FROM pg_stats s
    WHERE s.tablename = ANY(%(names)s::name[]) AND s.schemaname = ANY(%(schemas)s::name[]) AND NOT s.inherited
)
SELECT a.attrelid AS oid, a.attlen, a.attalign::text AS attalign, st.avg_width, st.null_frac,
       CASE WHEN a.attlen = -1 AND ty.typcategory = 'S' THEN
           (SELECT array_agg(octet_length(v)) FROM unnest(st.mcv::text[]) v) END AS mcv_len,
       CASE WHEN a.attlen = -1 AND ty.typcategory = 'S' THEN st.most_common_freqs END AS mcv_freq,
       CASE WHEN a.attlen = -1 AND ty.typcategory = 'S' THEN
           (SELECT array_agg(octet_length(v)) FROM unnest(st.hist::text[]) v) END AS hist_len
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type ty ON ty.oid = a.atttypid
LEFT JOIN st ON st.schemaname = n.nspname AND st.tablename = c.relname AND st.attname = a.attname
WHERE c.oid = ANY(%(oids)s::oid[])
ORDER BY a.attrelid, a.attnum
"""

SETTINGS_SQL = """
SELECT name, setting FROM pg_settings
WHERE name IN ('block_size', 'autovacuum', 'autovacuum_vacuum_threshold',
               'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_max_threshold',
               'autovacuum_analyze_threshold', 'autovacuum_analyze_scale_factor')
"""


@dataclass(frozen=True)
class Settings:
    block_size: int = 8192
    autovacuum: bool = True
    vacuum_threshold: float = 50
    vacuum_scale_factor: float = 0.2
    vacuum_max_threshold: float = -1  # PostgreSQL 18+; -1 disables
    analyze_threshold: float = 50
    analyze_scale_factor: float = 0.1


@dataclass(frozen=True)
class TableRow:
    """One table as the catalog query returns it."""

    oid: int
    schema: str
    name: str
    root: str | None  # the partition tree's root, "schema.name", for partitions
    reltuples: float
    relpages: int  # as of the last VACUUM/ANALYZE: a size hint for tables we may not measure
    natts: int
    reloptions: Mapping[str, str]
    size_bytes: int | None  # heap; None when not measured (locked, or too small to judge)
    lock_granted: bool | None  # None: no ACCESS EXCLUSIVE lock; False: one is waiting
    lock_pids: tuple[int, ...]
    n_live_tup: int
    n_dead_tup: int
    stats_seen: bool
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    columns: tuple[Column, ...] = ()
    toast_oid: int | None = None
    toast_bytes: int = 0
    toast_live_tup: int = 0
    toast_dead_tup: int = 0
    toast_inserted: int = 0  # chunks ever written (since the statistics were reset)
    toast_vacuums: int = 0
    toast_ins_since_vacuum: int = 0
    n_tup_gone: int = 0  # rows updated or deleted since the statistics were reset
    last_analyze: datetime | None = None
    mod_since_analyze: int = 0  # rows inserted, updated or deleted since the column statistics were taken

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def parse_reloptions(options: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in options or ():
        key, _, value = item.partition("=")
        out[key] = value
    return out


def settings_from_rows(rows: Sequence[tuple[str, str]]) -> Settings:
    values = dict(rows)
    return Settings(
        block_size=int(values.get("block_size", 8192)),
        autovacuum=values.get("autovacuum", "on") == "on",
        vacuum_threshold=float(values.get("autovacuum_vacuum_threshold", 50)),
        vacuum_scale_factor=float(values.get("autovacuum_vacuum_scale_factor", 0.2)),
        vacuum_max_threshold=float(values.get("autovacuum_vacuum_max_threshold", -1)),
        analyze_threshold=float(values.get("autovacuum_analyze_threshold", 50)),
        analyze_scale_factor=float(values.get("autovacuum_analyze_scale_factor", 0.1)),
    )


def _int(value: Any) -> int:
    return int(value or 0)


def row_from_record(rec: Mapping[str, Any], columns: tuple[Column, ...] = ()) -> TableRow:
    root = f"{rec['root_schema']}.{rec['root_name']}" if rec["root_name"] else None
    granted = rec["lock_granted"] if rec["lock_granted"] is not None else rec.get("any_lock_granted")
    return TableRow(
        oid=int(rec["oid"]),
        schema=rec["nspname"],
        name=rec["relname"],
        root=root,
        reltuples=float(rec["reltuples"]),
        relpages=int(rec["relpages"]),
        natts=int(rec["relnatts"]),
        reloptions=parse_reloptions(rec["reloptions"]),
        size_bytes=None if rec["size_bytes"] is None else int(rec["size_bytes"]),
        lock_granted=granted,
        lock_pids=tuple(rec["lock_pids"] or ()),
        n_live_tup=_int(rec["n_live_tup"]),
        n_dead_tup=_int(rec["n_dead_tup"]),
        stats_seen=bool(rec["last_vacuum"] or rec["last_autovacuum"] or rec["last_analyze"]),
        last_vacuum=rec["last_vacuum"],
        last_autovacuum=rec["last_autovacuum"],
        columns=columns,
        toast_oid=rec["toast_oid"],
        toast_bytes=_int(rec["toast_bytes"]),
        toast_live_tup=_int(rec["toast_live_tup"]),
        toast_dead_tup=_int(rec["toast_dead_tup"]),
        toast_inserted=_int(rec["toast_inserted"]),
        toast_vacuums=_int(rec["toast_vacuums"]),
        toast_ins_since_vacuum=_int(rec["toast_ins_since_vacuum"]),
        n_tup_gone=_int(rec["n_tup_gone"]),
        last_analyze=rec["last_analyze"],
        mod_since_analyze=_int(rec.get("mod_since_analyze")),
    )


def widths_of(mcv_len: Sequence[int] | None, mcv_freq: Sequence[float] | None,
              hist_len: Sequence[int] | None, null_frac: float | None) -> tuple[tuple[int, float], ...]:
    """Stored widths of a string column's values and their shares of the non-null values."""
    present = 1.0 - (null_frac or 0.0)
    if present <= 0 or (not mcv_len and not hist_len):
        return ()
    shares: dict[int, float] = {}
    mcv_share = 0.0
    for length, freq in zip(mcv_len or (), mcv_freq or (), strict=False):
        share = float(freq) / present
        shares[_stored(length)] = shares.get(_stored(length), 0.0) + share
        mcv_share += share
    rest = max(0.0, 1.0 - mcv_share)
    if hist_len:
        for length in hist_len:
            shares[_stored(length)] = shares.get(_stored(length), 0.0) + rest / len(hist_len)
    elif rest > 0.02:
        return ()  # values outside the sample (too wide for it): their widths are unknown
    total = sum(shares.values())
    return tuple(sorted((w, s / total) for w, s in shares.items())) if total else ()


def _stored(length: int) -> int:
    return length + (1 if length + 1 <= 127 else 4)


def column_from_record(rec: Mapping[str, Any]) -> Column:
    w, nf = rec["avg_width"], rec["null_frac"]
    widths = widths_of(rec["mcv_len"], rec["mcv_freq"], rec["hist_len"], nf) if w is not None else ()
    return Column(int(rec["attlen"]), str(rec["attalign"]), None if w is None else int(w), None if nf is None else float(nf), widths)


def grouped(records: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    """Per-column rows (ordered) by their relation's oid."""
    out: dict[int, list[Mapping[str, Any]]] = {}
    for rec in records:
        out.setdefault(int(rec["oid"]), []).append(rec)
    return out


def read_settings(conn: psycopg.Connection) -> Settings:
    return settings_from_rows(conn.execute(SETTINGS_SQL).fetchall())


def read_tables(conn: psycopg.Connection, min_size: int, settings: Settings, memo: dict[str, Any]) -> list[TableRow]:
    """Every table that may reach `min_size` (with its columns' statistics), and every table
    another session holds or awaits an ACCESS EXCLUSIVE lock on.

    Column statistics change only with ANALYZE: `memo` keeps them per table and last-analyze time.
    """
    min_pages = -(-min_size // (2 * settings.block_size))

    def read() -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(TABLES_SQL, {"min_pages": min_pages}).fetchall()

    records = read_past_exclusive_locks(read)
    cache: dict[int, tuple[Any, tuple[Column, ...]]] = memo.setdefault("columns", {})
    wanted = [r for r in records if r["size_bytes"] is not None]
    stale = [int(r["oid"]) for r in wanted if cache.get(int(r["oid"]), (None,))[0] != (r["last_analyze"], r["relnatts"])]
    if stale:
        by_oid = {int(r["oid"]): r for r in wanted}
        with conn.cursor(row_factory=dict_row) as cur:
            params = {"oids": stale, "names": sorted({by_oid[o]["relname"] for o in stale}),
                      "schemas": sorted({by_oid[o]["nspname"] for o in stale})}  # fmt: skip
            per_table = grouped(cur.execute(COLUMNS_SQL, params).fetchall())
        fetched = {oid: tuple(column_from_record(c) for c in cols) for oid, cols in per_table.items()}
        for oid in stale:
            cache[oid] = ((by_oid[oid]["last_analyze"], by_oid[oid]["relnatts"]), fetched.get(oid, ()))
    live = {int(r["oid"]) for r in records}
    for oid in [o for o in cache if o not in live]:
        del cache[oid]
    return [row_from_record(r, cache.get(int(r["oid"]), (None, ()))[1]) for r in records]
