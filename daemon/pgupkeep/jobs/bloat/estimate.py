"""How much of a table is wasted, without reading it: the catalog query and the statistical model.

One query reads every table's size, statistics-view counters and per-column `pg_stats` widths;
the model rebuilds the heap tuple layout from those widths and compares the space live rows need
with the space the table takes. Refinement by `pgstattuple_approx` lives in `bloat.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgupkeep.db import EXCLUSIVE_LOCKS_CTE

# The size function is only called for tables nobody holds or awaits an ACCESS EXCLUSIVE lock on:
# pg_relation_size takes ACCESS SHARE, which would queue behind such a lock (up to lock_timeout)
# and fail the whole statement. Catalog and statistics reads take no relation locks.
TABLES_SQL = "WITH " + EXCLUSIVE_LOCKS_CTE + """, rels AS (
    SELECT c.oid, n.nspname, c.relname, c.reltuples, c.relpages, c.relnatts, c.reloptions, c.relispartition,
           CASE WHEN c.relispartition THEN pg_partition_root(c.oid) END AS root
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
), cols AS (
    SELECT a.attrelid AS oid,
           array_agg(a.attlen ORDER BY a.attnum) AS attlen,
           array_agg(a.attalign::text ORDER BY a.attnum) AS attalign,
           array_agg(s.avg_width ORDER BY a.attnum) AS avg_width,
           array_agg(s.null_frac ORDER BY a.attnum) AS null_frac
    FROM rels r
    JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_stats s ON s.schemaname = r.nspname AND s.tablename = r.relname
                        AND s.attname = a.attname AND NOT s.inherited
    GROUP BY a.attrelid
)
SELECT r.oid, r.nspname, r.relname, rn.nspname AS root_schema, rc.relname AS root_name,
       r.reltuples, r.relpages, r.relnatts, r.reloptions,
       lk.granted AS lock_granted, lk.pids AS lock_pids,
       CASE WHEN lk.relation IS NULL THEN pg_relation_size(r.oid) END AS size_bytes,
       st.n_live_tup, st.n_dead_tup, st.last_vacuum, st.last_autovacuum,
       (st.last_vacuum IS NOT NULL OR st.last_autovacuum IS NOT NULL
        OR st.last_analyze IS NOT NULL OR st.last_autoanalyze IS NOT NULL) AS stats_seen,
       co.attlen, co.attalign, co.avg_width, co.null_frac
FROM rels r
LEFT JOIN exclusive_locks lk ON lk.relation = r.oid
LEFT JOIN pg_stat_all_tables st ON st.relid = r.oid
LEFT JOIN cols co ON co.oid = r.oid
LEFT JOIN pg_class rc ON rc.oid = r.root
LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
"""

SETTINGS_SQL = """
SELECT name, setting FROM pg_settings
WHERE name IN ('block_size', 'autovacuum', 'autovacuum_vacuum_threshold',
               'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_max_threshold')
"""

PAGE_HEADER = 24  # SizeOfPageHeaderData
LINE_POINTER = 4  # sizeof(ItemIdData)
TUPLE_HEADER = 23  # offsetof(HeapTupleHeaderData, t_bits)
MAXALIGN = 8
SHORT_VARLENA_MAX = 126  # a varlena this small has a 1-byte header and is stored unaligned
_ALIGN = {"c": 1, "s": 2, "i": 4, "d": 8}


@dataclass(frozen=True)
class Column:
    attlen: int
    attalign: str
    avg_width: int | None  # None: no pg_stats row (never analyzed)
    null_frac: float | None


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
    size_bytes: int | None  # None when skipped because of an ACCESS EXCLUSIVE lock (or dropped)
    lock_granted: bool | None  # None: no ACCESS EXCLUSIVE lock; False: one is waiting
    lock_pids: tuple[int, ...]
    n_live_tup: int
    n_dead_tup: int
    stats_seen: bool
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    columns: tuple[Column, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Settings:
    block_size: int = 8192
    autovacuum: bool = True
    vacuum_threshold: float = 50
    vacuum_scale_factor: float = 0.2
    vacuum_max_threshold: float = -1  # PostgreSQL 18+; -1 disables


@dataclass
class TableBloat:
    """Figures for one table (or, with `partitions` > 0, a partition tree's roll-up)."""

    table: str
    size_bytes: int
    dead_tuples: int
    live_tuples: int
    bloat_bytes: int
    method: str  # "estimate" | "pgstattuple_approx" | "mixed" (roll-ups)
    basis: str  # what the estimate rests on: "pg_stats" | "dead_tuples" | "none" | "measured"
    oid: int | None = None
    ident: tuple[str, str] | None = None  # (schema, name) of a real table; None for roll-ups
    root: str | None = None
    last_vacuum: datetime | None = None
    last_autovacuum: datetime | None = None
    autovacuum_overdue: bool = False
    autovacuum_threshold: float = 0.0
    fillfactor: int = 100
    partitions: int = 0
    parts: list[TableBloat] = field(default_factory=list)

    @property
    def dead_tuple_ratio(self) -> float:
        total = self.dead_tuples + self.live_tuples
        return self.dead_tuples / total if total else 0.0

    @property
    def bloat_ratio(self) -> float:
        return min(1.0, self.bloat_bytes / self.size_bytes) if self.size_bytes else 0.0


def row_from_record(rec: Mapping[str, Any]) -> TableRow:
    cols: tuple[Column, ...] = ()
    if rec["attlen"] is not None:
        cols = tuple(
            Column(int(al), str(aa), None if w is None else int(w), None if nf is None else float(nf))
            for al, aa, w, nf in zip(rec["attlen"], rec["attalign"], rec["avg_width"], rec["null_frac"], strict=True)
        )
    root = f"{rec['root_schema']}.{rec['root_name']}" if rec["root_name"] else None
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
        lock_granted=rec["lock_granted"],
        lock_pids=tuple(rec["lock_pids"] or ()),
        n_live_tup=int(rec["n_live_tup"] or 0),
        n_dead_tup=int(rec["n_dead_tup"] or 0),
        stats_seen=bool(rec["stats_seen"]),
        last_vacuum=rec["last_vacuum"],
        last_autovacuum=rec["last_autovacuum"],
        columns=cols,
    )


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
    )


def _align(offset: float, alignment: int) -> float:
    return math.ceil(offset / alignment - 1e-9) * alignment


def tuple_layout(columns: Sequence[Column], natts: int) -> tuple[float, float] | None:
    """(bytes one row takes on a heap page, its t_len): aligned tuple plus line pointer, and raw.

    Follows heap_form_tuple: a 23-byte header plus a null bitmap when any column has nulls,
    MAXALIGNed; then each column aligned to its attalign (short varlenas are not aligned).
    Null columns take no space. None when a column has no statistics.
    """
    if not columns or any(c.avg_width is None for c in columns):
        return None
    has_nulls = any((c.null_frac or 0) > 0 for c in columns)
    header = _align(TUPLE_HEADER + (math.ceil(natts / 8) if has_nulls else 0), MAXALIGN)
    offset = 0.0
    for c in columns:
        present = 1.0 - (c.null_frac or 0.0)
        width = float(c.avg_width or 0)
        unaligned = c.attlen == -1 and width <= SHORT_VARLENA_MAX
        pad = 0.0 if unaligned else _align(offset, _ALIGN.get(c.attalign, 1)) - offset
        offset += present * (pad + width)
    return _align(header + offset, MAXALIGN) + LINE_POINTER, header + offset


def tuple_bytes(columns: Sequence[Column], natts: int) -> float | None:
    layout = tuple_layout(columns, natts)
    return layout[0] if layout else None


def fillfactor(row: TableRow) -> int:
    try:
        return max(10, min(100, int(row.reloptions.get("fillfactor", "100"))))
    except ValueError:
        return 100


def reserve_bytes(pages: float, ff: int, block_size: int) -> float:
    """Free space a fillfactor below 100 keeps on purpose: not waste."""
    return pages * block_size * (100 - ff) / 100


def live_tuples(row: TableRow) -> int:
    # n_live_tup follows every insert and delete at once, while reltuples waits for the next
    # VACUUM/ANALYZE; after a statistics reset (all counters zero) reltuples is all we have.
    if row.stats_seen or row.n_live_tup or row.n_dead_tup:
        return row.n_live_tup
    return max(0, int(row.reltuples))


def autovacuum_threshold(row: TableRow, s: Settings) -> tuple[float, bool]:
    """(dead-tuple threshold, autovacuum enabled) by the table's reloptions, else the server's."""
    opts = row.reloptions

    def opt(name: str, default: float) -> float:
        try:
            return float(opts[name]) if name in opts else default
        except ValueError:
            return default

    base = opt("autovacuum_vacuum_threshold", s.vacuum_threshold)
    scale = opt("autovacuum_vacuum_scale_factor", s.vacuum_scale_factor)
    cap = opt("autovacuum_vacuum_max_threshold", s.vacuum_max_threshold)
    threshold = base + scale * max(0.0, row.reltuples)
    if cap >= 0:
        threshold = min(threshold, cap)
    enabled = s.autovacuum and opts.get("autovacuum_enabled", "true").lower() not in ("false", "off", "0", "no")
    return threshold, enabled


def estimate(row: TableRow, s: Settings) -> TableBloat:
    """Wasted bytes = size - page headers - what live rows need - fillfactor reserve - dead rows' overhead.

    Measured like pgstattuple's dead_tuple_len + free_space, so the figures compare directly.
    Without column statistics the dead-tuple share of the table stands in.
    """
    assert row.size_bytes is not None
    size = row.size_bytes
    pages = size / s.block_size
    live = live_tuples(row)
    ff = fillfactor(row)
    layout = tuple_layout(row.columns, row.natts)
    if size == 0:
        wasted, basis = 0.0, "pg_stats" if layout is not None else "none"
    elif layout is not None:
        per_tuple, t_len = layout
        # A dead tuple's line pointer and alignment padding are overhead, not dead_tuple_len.
        overhead = live * per_tuple + row.n_dead_tup * (per_tuple - t_len)
        needed = pages * PAGE_HEADER + overhead + reserve_bytes(pages, ff, s.block_size)
        wasted, basis = max(0.0, size - needed), "pg_stats"
    elif live + row.n_dead_tup > 0:
        wasted, basis = size * row.n_dead_tup / (live + row.n_dead_tup), "dead_tuples"
    else:
        wasted, basis = 0.0, "none"
    threshold, enabled = autovacuum_threshold(row, s)
    return TableBloat(
        table=row.qualified,
        size_bytes=size,
        dead_tuples=row.n_dead_tup,
        live_tuples=live,
        bloat_bytes=int(min(wasted, size)),
        method="estimate",
        basis=basis,
        oid=row.oid,
        ident=(row.schema, row.name),
        root=row.root,
        last_vacuum=row.last_vacuum,
        last_autovacuum=row.last_autovacuum,
        # Overdue: past the table's own threshold, so autovacuum should have (or never will) run.
        autovacuum_overdue=row.n_dead_tup > threshold,
        autovacuum_threshold=threshold if enabled else math.inf,
        fillfactor=ff,
    )


def approx_wasted(table_len: int, dead_tuple_len: int, free_space: int, ff: int, block_size: int) -> int:
    """Wasted bytes from pgstattuple_approx, less the free space fillfactor reserves on purpose."""
    pages = table_len / block_size
    return int(max(0.0, min(table_len, dead_tuple_len + free_space - reserve_bytes(pages, ff, block_size))))


def rollup(figures: Sequence[TableBloat]) -> list[TableBloat]:
    """One roll-up per partition tree root, summed over all its measured partitions."""
    trees: dict[str, list[TableBloat]] = {}
    for f in figures:
        if f.root:
            trees.setdefault(f.root, []).append(f)
    out = []
    for root, parts in sorted(trees.items()):
        methods = {p.method for p in parts}
        out.append(
            TableBloat(
                table=root,
                size_bytes=sum(p.size_bytes for p in parts),
                dead_tuples=sum(p.dead_tuples for p in parts),
                live_tuples=sum(p.live_tuples for p in parts),
                bloat_bytes=sum(p.bloat_bytes for p in parts),
                method=methods.pop() if len(methods) == 1 else "mixed",
                basis="rollup",
                last_vacuum=max((p.last_vacuum for p in parts if p.last_vacuum), default=None),
                last_autovacuum=max((p.last_autovacuum for p in parts if p.last_autovacuum), default=None),
                autovacuum_overdue=any(p.autovacuum_overdue for p in parts),
                partitions=len(parts),
                parts=list(parts),
            )
        )
    return out


def rank_key(f: TableBloat) -> tuple[int, str]:
    """Worst first, stable between runs.

    Wasted bytes are bucketed in quarter-octaves (~19% wide) and ties broken by name, so the
    small run-to-run drift of an estimate does not reorder tables or churn the report_top set;
    a table moves only when its waste changes by a real fraction.
    """
    bucket = int(math.floor(math.log2(f.bloat_bytes + 1) * 4))
    return (-bucket, f.table)
