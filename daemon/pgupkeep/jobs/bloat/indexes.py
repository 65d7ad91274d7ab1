"""B-tree index bloat without reading the index: the catalog query and the size model.

An index's needed size is rebuilt from its key columns' statistics: entries (the table's rows,
times a partial index's share), each a MAXALIGNed index tuple plus line pointer (or, where
deduplication applies, posting lists of 6-byte heap TIDs), packed into leaf pages at the index's
fillfactor as CREATE INDEX / REINDEX packs them, plus internal pages and the metapage. What the
index takes beyond that is what a REINDEX would give back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.db import EXCLUSIVE_LOCKS_CTE, read_past_exclusive_locks
from pgupkeep.jobs.bloat.catalog import Settings, column_from_record, grouped, parse_reloptions
from pgupkeep.jobs.bloat.layout import LINE_POINTER, MAXALIGN, Column, index_tuple

BTREE_SPECIAL = 16  # sizeof(BTPageOpaqueData)
BTREE_LEAF_FILLFACTOR = 90  # BTREE_DEFAULT_FILLFACTOR
BTREE_INTERNAL_FILLFACTOR = 70  # BTREE_NONLEAF_FILLFACTOR
HEAP_TID = 6  # sizeof(ItemPointerData)
CCNEW_SUFFIXES = ("_ccnew", "_ccold")  # REINDEX CONCURRENTLY's transient indexes

# Indexes that may reach min_index_size (by their pages as of the last VACUUM/ANALYZE/CREATE
# INDEX, or because their table has had many more rows since), and every invalid index. A size is
# read only where nobody holds or awaits an ACCESS EXCLUSIVE lock on the index or its table.
INDEXES_SQL = "WITH " + EXCLUSIVE_LOCKS_CTE + """, cand AS (
    SELECT c.oid FROM pg_class c WHERE c.relkind = 'i' AND c.relpages >= %(min_pages)s
    UNION
    SELECT i.indexrelid FROM pg_index i WHERE NOT i.indisvalid OR i.indrelid = ANY(%(grown)s::oid[])
), building AS (
    -- Tables with an index build in progress: its session holds SHARE UPDATE EXCLUSIVE (CONCURRENTLY)
    -- or SHARE on the table, or reports progress. Read once, not per index.
    SELECT l.relation AS oid FROM pg_locks l
    WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.mode IN ('ShareUpdateExclusiveLock', 'ShareLock')
    UNION
    SELECT p.relid FROM pg_stat_progress_create_index p WHERE p.datname = current_database()
)
SELECT ci.oid, n.nspname, ci.relname, ct.oid AS table_oid, tn.nspname AS table_schema, ct.relname AS table_name,
       am.amname, i.indisunique, i.indisprimary, i.indisvalid, i.indisready, i.indnkeyatts,
       i.indpred IS NOT NULL AS partial, ci.reloptions, ci.relpages, ci.reltuples, ct.reltuples AS table_reltuples,
       coalesce(lk.granted, lt.granted) AS lock_granted,
       array_remove(array_cat(lk.pids, lt.pids), NULL) AS lock_pids,
       CASE WHEN lk.relation IS NULL AND lt.relation IS NULL THEN pg_relation_size(ci.oid) END AS size_bytes,
       pg_stat_get_live_tuples(ct.oid) + pg_stat_get_dead_tuples(ct.oid) AS table_tuples,
       x.conindid IS NOT NULL AS exclusion,
       b.oid IS NOT NULL AS build_running
FROM cand
JOIN pg_index i ON i.indexrelid = cand.oid
JOIN pg_class ci ON ci.oid = i.indexrelid
JOIN pg_class ct ON ct.oid = i.indrelid
JOIN pg_namespace n ON n.oid = ci.relnamespace
JOIN pg_namespace tn ON tn.oid = ct.relnamespace
JOIN pg_am am ON am.oid = ci.relam
LEFT JOIN exclusive_locks lk ON lk.relation = ci.oid
LEFT JOIN exclusive_locks lt ON lt.relation = ct.oid
LEFT JOIN (SELECT DISTINCT conindid FROM pg_constraint WHERE contype = 'x') x ON x.conindid = ci.oid
LEFT JOIN (SELECT DISTINCT oid FROM building) b ON b.oid = ct.oid
WHERE ct.relkind IN ('r', 'm') AND ct.relpersistence <> 't'
  AND tn.nspname NOT IN ('pg_catalog', 'information_schema') AND tn.nspname !~ '^pg_toast'
"""

# Key columns of the indexes to judge: a plain column's statistics are its table's, an
# expression's are kept under the index itself. `equalimage`: deduplication is safe for the
# column's opclass (btequalimage support function, deterministic collation).
INDEX_COLUMNS_SQL = """
WITH k AS (
    SELECT i.indexrelid AS oid, g.n, i.indclass[g.n - 1] AS opclass, i.indcollation[g.n - 1] AS collation,
           ia.attlen, ia.attalign, ia.atttypid,
           -- where the statistics are: a plain column's under its table, an expression's under the index
           coalesce(nt.nspname, ni.nspname) AS stat_schema, coalesce(ct.relname, ci.relname) AS stat_table,
           coalesce(ta.attname, ia.attname) AS stat_column
    FROM pg_index i
    CROSS JOIN generate_series(1, i.indnatts) g(n)
    JOIN pg_class ci ON ci.oid = i.indexrelid
    JOIN pg_namespace ni ON ni.oid = ci.relnamespace
    JOIN pg_attribute ia ON ia.attrelid = ci.oid AND ia.attnum = g.n
    LEFT JOIN pg_attribute ta ON ta.attrelid = i.indrelid AND ta.attnum = i.indkey[g.n - 1] AND i.indkey[g.n - 1] <> 0
    LEFT JOIN pg_class ct ON ct.oid = ta.attrelid
    LEFT JOIN pg_namespace nt ON nt.oid = ct.relnamespace
    WHERE i.indexrelid = ANY(%(oids)s::oid[])
), st AS MATERIALIZED (
    -- Constant name filters reach inside the pg_stats view: it reads these relations' statistics only.
    SELECT ps.schemaname, ps.tablename, ps.attname, ps.avg_width, ps.null_frac, ps.n_distinct,
           ps.most_common_vals::text AS mcv, ps.most_common_freqs, ps.histogram_bounds::text AS hist
    FROM pg_stats ps
    WHERE ps.tablename = ANY(%(names)s::name[]) AND ps.schemaname = ANY(%(schemas)s::name[]) AND NOT ps.inherited
)
SELECT k.oid, k.attlen, k.attalign::text AS attalign, s.avg_width, s.null_frac, s.n_distinct,
       CASE WHEN k.attlen = -1 AND ty.typcategory = 'S' THEN
           (SELECT array_agg(octet_length(v)) FROM unnest(s.mcv::text[]) v) END AS mcv_len,
       CASE WHEN k.attlen = -1 AND ty.typcategory = 'S' THEN s.most_common_freqs END AS mcv_freq,
       CASE WHEN k.attlen = -1 AND ty.typcategory = 'S' THEN
           (SELECT array_agg(octet_length(v)) FROM unnest(s.hist::text[]) v) END AS hist_len,
       EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_amproc ap ON ap.amprocfamily = oc.opcfamily
                AND ap.amproclefttype = oc.opcintype AND ap.amprocrighttype = oc.opcintype AND ap.amprocnum = 4
               WHERE oc.oid = k.opclass)
       AND coalesce((SELECT co.collisdeterministic FROM pg_collation co WHERE co.oid = k.collation), true) AS equalimage
FROM k
JOIN pg_type ty ON ty.oid = k.atttypid
LEFT JOIN st s ON s.schemaname = k.stat_schema AND s.tablename = k.stat_table AND s.attname = k.stat_column
ORDER BY k.oid, k.n
"""


@dataclass(frozen=True)
class KeyColumn:
    column: Column
    n_distinct: float | None  # pg_stats.n_distinct: > 0 a count, < 0 minus a share of the rows


@dataclass(frozen=True)
class IndexRow:
    oid: int
    schema: str
    name: str
    table_oid: int
    table: str  # schema.name
    table_ident: tuple[str, str]
    am: str
    unique: bool
    valid: bool
    ready: bool
    partial: bool
    exclusion: bool
    build_running: bool  # another session holds a lock an index build holds, or reports progress
    nkeyatts: int
    reloptions: Mapping[str, str]
    relpages: int
    reltuples: float
    table_reltuples: float
    table_tuples: int
    size_bytes: int | None  # None: locked (or dropped meanwhile)
    lock_granted: bool | None
    lock_pids: tuple[int, ...]
    columns: tuple[KeyColumn, ...] = ()
    equalimage: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def transient(self) -> bool:
        """Named like REINDEX CONCURRENTLY's new or old copy (`_ccnew`, `_ccold`, maybe numbered)."""
        base = self.name.rstrip("0123456789")
        return base.endswith(CCNEW_SUFFIXES)


@dataclass
class IndexBloat:
    index: str
    table: str
    size_bytes: int
    bloat_bytes: int
    method: str  # "estimate" | "pgstatindex"
    row: IndexRow

    @property
    def bloat_ratio(self) -> float:
        return min(1.0, self.bloat_bytes / self.size_bytes) if self.size_bytes else 0.0


def index_from_record(rec: Mapping[str, Any], columns: tuple[KeyColumn, ...] = (), equalimage: bool = False) -> IndexRow:
    return IndexRow(
        oid=int(rec["oid"]), schema=rec["nspname"], name=rec["relname"], table_oid=int(rec["table_oid"]),
        table=f"{rec['table_schema']}.{rec['table_name']}", table_ident=(rec["table_schema"], rec["table_name"]),
        am=rec["amname"], unique=bool(rec["indisunique"]), valid=bool(rec["indisvalid"]), ready=bool(rec["indisready"]),
        partial=bool(rec["partial"]), exclusion=bool(rec["exclusion"]), build_running=bool(rec["build_running"]),
        nkeyatts=int(rec["indnkeyatts"]), reloptions=parse_reloptions(rec["reloptions"]), relpages=int(rec["relpages"]),
        reltuples=float(rec["reltuples"]), table_reltuples=float(rec["table_reltuples"]),
        table_tuples=int(rec["table_tuples"] or 0),
        size_bytes=None if rec["size_bytes"] is None else int(rec["size_bytes"]),
        lock_granted=rec["lock_granted"], lock_pids=tuple(rec["lock_pids"] or ()), columns=columns, equalimage=equalimage,
    )  # fmt: skip


def key_columns(recs: Sequence[Mapping[str, Any]]) -> tuple[tuple[KeyColumn, ...], bool]:
    cols = tuple(KeyColumn(column_from_record(r), None if r["n_distinct"] is None else float(r["n_distinct"])) for r in recs)
    return cols, all(bool(r["equalimage"]) for r in recs)


def read_indexes(
    conn: psycopg.Connection, min_size: int, grown: Sequence[int], settings: Settings, memo: dict[str, Any]
) -> list[IndexRow]:
    """Indexes that may reach `min_size` (with key statistics for those that do), every invalid
    index, and those skipped because of an ACCESS EXCLUSIVE lock. `grown`: tables with many more
    rows than at their last VACUUM/ANALYZE, whose indexes are measured whatever their relpages."""
    min_pages = -(-min_size // (2 * settings.block_size))

    def read() -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(INDEXES_SQL, {"min_pages": min_pages, "grown": list(grown)}).fetchall()

    records = read_past_exclusive_locks(read)
    wanted = [r for r in records if r["amname"] == "btree" and r["indisvalid"] and r["size_bytes"] is not None
              and r["size_bytes"] >= min_size]  # fmt: skip
    cache: dict[int, tuple[Any, tuple[tuple[KeyColumn, ...], bool]]] = memo.setdefault("index_columns", {})
    # Keyed by the row estimates, which every ANALYZE (and VACUUM) rewrites.
    stale = [r for r in wanted if cache.get(int(r["oid"]), (None,))[0] != (r["table_reltuples"], r["reltuples"])]
    if stale:
        # Statistics of a plain column are under its table, of an expression under the index.
        params = {"oids": [int(r["oid"]) for r in stale],
                  "names": sorted({n for r in stale for n in (r["relname"], r["table_name"])}),
                  "schemas": sorted({n for r in stale for n in (r["nspname"], r["table_schema"])})}  # fmt: skip
        with conn.cursor(row_factory=dict_row) as cur:
            fetched = {oid: key_columns(cols) for oid, cols in grouped(cur.execute(INDEX_COLUMNS_SQL, params).fetchall()).items()}
        for r in stale:
            cache[int(r["oid"])] = ((r["table_reltuples"], r["reltuples"]), fetched.get(int(r["oid"]), ((), False)))
    keep = {int(r["oid"]) for r in records}
    for oid in [o for o in cache if o not in keep]:
        del cache[oid]
    return [index_from_record(r, *(cache[int(r["oid"])][1] if int(r["oid"]) in cache else ((), False))) for r in records]


# --------------------------------------------------------------------------- the model (pure)


def fillfactor(row: IndexRow) -> int:
    try:
        return max(10, min(100, int(row.reloptions.get("fillfactor", str(BTREE_LEAF_FILLFACTOR)))))
    except ValueError:
        return BTREE_LEAF_FILLFACTOR


def entries(row: IndexRow) -> float:
    """Index entries: the table's live and dead rows (a dead row keeps its entry until VACUUM),
    times the share of rows a partial index holds (its reltuples against the table's)."""
    share = 1.0
    if row.partial and row.table_reltuples > 0 and row.reltuples >= 0:
        share = min(1.0, row.reltuples / row.table_reltuples)
    if row.table_tuples > 0:
        return row.table_tuples * share
    return max(0.0, row.reltuples)


def distinct_keys(row: IndexRow, n: float) -> float | None:
    """Distinct key values among n entries, from the key columns' n_distinct (None: unknown)."""
    product = 1.0
    for k in row.columns[: row.nkeyatts]:
        if k.n_distinct is None:
            return None
        product *= k.n_distinct if k.n_distinct > 0 else -k.n_distinct * n
    return max(1.0, min(n, product))


def leaf_bytes(row: IndexRow, n: float, block_size: int) -> float | None:
    """Bytes the entries take on leaf pages, line pointers included; None without statistics."""
    layout = index_tuple([k.column for k in row.columns])
    if layout is None:
        return None
    per_entry, key_part = layout
    dedup = (
        not row.unique and row.equalimage and row.reloptions.get("deduplicate_items", "on").lower() not in ("off", "false", "0")
    )
    keys = distinct_keys(row, n) if dedup else None
    if keys is None or n / keys < 2:
        return n * per_entry
    # CREATE INDEX merges duplicates into posting lists of at most ~10% of a page (_bt_load).
    per_key = n / keys
    max_posting = (block_size * 10 // 100) // MAXALIGN * MAXALIGN - LINE_POINTER
    tids_per_tuple = max(1, int((max_posting - key_part) // HEAP_TID))
    tuples = keys * math.ceil(per_key / tids_per_tuple)
    return tuples * (key_part + LINE_POINTER + MAXALIGN / 2) + n * HEAP_TID


def needed_bytes(row: IndexRow, block_size: int) -> float | None:
    """The index's size right after a REINDEX: metapage, leaf pages at fillfactor, internal pages."""
    n = entries(row)
    data = leaf_bytes(row, n, block_size)
    if data is None:
        return None
    usable = block_size - 24 - BTREE_SPECIAL
    layout = index_tuple([k.column for k in row.columns[: row.nkeyatts]])
    pivot = layout[0] if layout else 16.0
    # A page is closed once its free space would drop below (100 - fillfactor)% of the block; each
    # but the rightmost carries a high key.
    per_leaf = max(pivot, usable - block_size * (100 - fillfactor(row)) / 100 - pivot)
    leaves = max(1.0, math.ceil(data / per_leaf))
    pages, level = 1.0 + leaves, leaves
    per_internal = max(2.0, math.floor((usable - block_size * (100 - BTREE_INTERNAL_FILLFACTOR) / 100) / pivot))
    while level > 1:
        level = math.ceil(level / per_internal)
        pages += level
    return pages * block_size


def estimate_index(row: IndexRow, s: Settings) -> IndexBloat:
    assert row.size_bytes is not None
    need = needed_bytes(row, s.block_size)
    wasted = 0.0 if need is None else max(0.0, row.size_bytes - need)
    return IndexBloat(row.qualified, row.table, row.size_bytes, int(wasted), "estimate", row)


def pgstatindex_wasted(index_size: int, leaf_pages: int, empty_pages: int, deleted_pages: int,
                       avg_leaf_density: float, ff: int, block_size: int) -> int:
    """Wasted bytes by pgstatindex: leaf space below the fillfactor a rebuild packs to, plus empty
    and deleted pages. avg_leaf_density is NaN for an index without leaf entries."""
    density = 0.0 if math.isnan(avg_leaf_density) else avg_leaf_density
    sparse = leaf_pages * max(0.0, 1.0 - density / ff)
    return int(min(index_size, (sparse + empty_pages + deleted_pages) * block_size))


def index_rank_key(f: IndexBloat) -> tuple[int, str]:
    """Worst first, stable between runs (as for tables: quarter-octave buckets, then the name)."""
    return (-int(math.floor(math.log2(f.bloat_bytes + 1) * 4)), f.index)
