"""How much of a table is wasted, without reading it: the statistical model for heap and TOAST.

The heap's needed space is rebuilt from the columns' statistics (layout.py); what the table takes
beyond it, and beyond its fillfactor reserve, is wasted. Measured like pgstattuple's
dead_tuple_len + free_space, so the figures compare directly. A table's figures cover its heap
and its TOAST relation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pgupkeep.jobs.bloat.catalog import Settings, TableRow
from pgupkeep.jobs.bloat.layout import LINE_POINTER, MAXALIGN, heap_tuple

PAGE_HEADER = 24  # SizeOfPageHeaderData
# pgstattuple's free space leaves room for one more line pointer on each page (PageGetHeapFreeSpace).
PAGE_OVERHEAD = PAGE_HEADER + LINE_POINTER


@dataclass
class Part:
    """One relation's figures: the heap, or its TOAST relation."""

    size_bytes: int
    bloat_bytes: int
    method: str  # "estimate" | "pgstattuple_approx"

    def to_dict(self) -> dict[str, object]:
        return {"size_bytes": self.size_bytes, "bloat_bytes": self.bloat_bytes, "method": self.method}


@dataclass
class TableBloat:
    """Figures for one table, heap plus TOAST (or, with `partitions` > 0, a partition tree's roll-up)."""

    table: str
    size_bytes: int
    dead_tuples: int
    live_tuples: int
    bloat_bytes: int
    method: str  # "estimate" | "pgstattuple_approx" | "mixed"
    basis: str  # what the heap estimate rests on: "pg_stats" | "pg_stats_stale" | "dead_tuples" | "none" | "measured" | "rollup"
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
    heap: Part | None = None
    toast: Part | None = None  # None: the table has no TOAST relation
    toast_oid: int | None = None
    changed_since_analyze: int = 0  # with basis "pg_stats_stale": rows changed since the statistics

    @property
    def dead_tuple_ratio(self) -> float:
        total = self.dead_tuples + self.live_tuples
        return self.dead_tuples / total if total else 0.0

    @property
    def bloat_ratio(self) -> float:
        return min(1.0, self.bloat_bytes / self.size_bytes) if self.size_bytes else 0.0

    def set_parts(self, heap: Part, toast: Part | None) -> None:
        self.heap, self.toast = heap, toast
        self.size_bytes = heap.size_bytes + (toast.size_bytes if toast else 0)
        self.bloat_bytes = heap.bloat_bytes + (toast.bloat_bytes if toast else 0)
        methods = {heap.method} | ({toast.method} if toast and toast.size_bytes else set())
        self.method = methods.pop() if len(methods) == 1 else "mixed"


def fillfactor(row: TableRow) -> int:
    try:
        return max(10, min(100, int(row.reloptions.get("fillfactor", "100"))))
    except ValueError:
        return 100


def reserve_bytes(pages: float, ff: int, block_size: int) -> float:
    """Free space a fillfactor below 100 keeps on purpose: not waste."""
    return pages * block_size * (100 - ff) / 100


# Counters claiming this many times more rows than the pages can hold are not believed.
IMPOSSIBLE_ROWS = 1.25


def live_tuples(row: TableRow, s: Settings, layout: tuple[float, float] | None) -> int:
    """The table's live rows by its counters, unless they are impossible for its size.

    n_live_tup follows every insert and delete at once, while reltuples waits for the next
    VACUUM/ANALYZE; after a statistics reset (all counters zero) reltuples is all we have. A bulk
    load followed by ANALYZE in the same session double-counts: ANALYZE sets n_live_tup, then the
    load's own counts (flushed later) add to it. More rows than the pages can hold (at the
    statistics' average layout, `heap_tuple`) are such a count; reltuples (as of that ANALYZE)
    stands in for it.
    """
    if not (row.stats_seen or row.n_live_tup or row.n_dead_tup):
        return max(0, int(row.reltuples))
    live = row.n_live_tup
    if layout is not None and row.size_bytes is not None:
        fits = row.size_bytes / s.block_size * math.floor((s.block_size - PAGE_OVERHEAD) / layout[0])
        if live + row.n_dead_tup > IMPOSSIBLE_ROWS * fits:
            live = int(min(max(row.reltuples, 0.0), max(0.0, fits - row.n_dead_tup)))
    return live


def _reloption(row: TableRow) -> Callable[[str, float], float]:
    """A numeric reloption of the table, or the given server default where unset or unreadable."""

    def opt(name: str, default: float) -> float:
        try:
            return float(row.reloptions[name]) if name in row.reloptions else default
        except ValueError:
            return default

    return opt


def autovacuum_threshold(row: TableRow, s: Settings) -> tuple[float, bool]:
    """(dead-tuple threshold, autovacuum enabled) by the table's reloptions, else the server's."""
    opt = _reloption(row)
    base = opt("autovacuum_vacuum_threshold", s.vacuum_threshold)
    scale = opt("autovacuum_vacuum_scale_factor", s.vacuum_scale_factor)
    cap = opt("autovacuum_vacuum_max_threshold", s.vacuum_max_threshold)
    threshold = base + scale * max(0.0, row.reltuples)
    if cap >= 0:
        threshold = min(threshold, cap)
    enabled = s.autovacuum and row.reloptions.get("autovacuum_enabled", "true").lower() not in ("false", "off", "0", "no")
    return threshold, enabled


def statistics_stale(row: TableRow, s: Settings) -> bool:
    """More rows changed since the column statistics were taken than would make autovacuum
    ANALYZE the table again (its reloptions honoured): the rows may no longer look like the
    statistics say. A delete that took mostly narrow (or null) rows leaves wider rows than the
    statistics describe, which no model from statistics can see: the figure is then marked, and
    measuring (pgstattuple_approx) or an ANALYZE settles it."""
    opt = _reloption(row)
    threshold = opt("autovacuum_analyze_threshold", s.analyze_threshold) + opt(
        "autovacuum_analyze_scale_factor", s.analyze_scale_factor
    ) * max(0.0, row.reltuples)
    return row.mod_since_analyze > threshold


def heap_wasted(row: TableRow, s: Settings, layout: tuple[float, float] | None, live: int) -> tuple[float, str]:
    """(wasted heap bytes, what the figure rests on).

    Needed = page headers + live rows (aligned tuple and line pointer) + dead rows' line pointers
    and padding (their t_len is dead_tuple_len, i.e. waste) + line pointers VACUUM freed but left on
    the page + the fillfactor reserve. Without column statistics the dead share stands in.
    """
    assert row.size_bytes is not None
    size = row.size_bytes
    if size == 0:
        return 0.0, "pg_stats" if row.columns else "none"
    pages = size / s.block_size
    ff = fillfactor(row)
    if layout is not None:
        per_tuple, t_len = layout
        # Line pointers of rows VACUUM removed stay on the page (unused, 4 bytes each) until a new
        # row takes them: at most as many as rows have gone, at most what the pages once held.
        capacity = pages * math.floor((s.block_size - PAGE_OVERHEAD) * ff / 100 / per_tuple)
        gone = max(0, row.n_tup_gone - row.n_dead_tup)
        unused = max(0.0, min(gone, capacity - live - row.n_dead_tup))
        needed = (
            pages * PAGE_OVERHEAD
            + live * per_tuple
            + row.n_dead_tup * (per_tuple - t_len)
            + unused * LINE_POINTER
            + reserve_bytes(pages, ff, s.block_size)
        )
        return max(0.0, size - needed), "pg_stats_stale" if statistics_stale(row, s) else "pg_stats"
    if live + row.n_dead_tup > 0:
        return size * row.n_dead_tup / (live + row.n_dead_tup), "dead_tuples"
    return 0.0, "none"


def toast_chunk_bytes(block_size: int) -> int:
    """Bytes a full TOAST chunk takes on its page, line pointer included (TOAST_TUPLES_PER_PAGE = 4)."""
    tuple_max = (block_size - _maxalign(PAGE_HEADER + 4 * LINE_POINTER)) // 4
    return tuple_max // MAXALIGN * MAXALIGN + LINE_POINTER


def _maxalign(n: int) -> int:
    return -(-n // MAXALIGN) * MAXALIGN


def toast_wasted(row: TableRow, s: Settings) -> float:
    """Wasted TOAST bytes from the TOAST relation's own counters.

    Chunk sizes are in no statistics (the last chunk of each value is smaller than the others).
    While no freed space can have been reused (no VACUUM since the counters began, or one with no
    insert since), the chunks ever written fill the relation, which gives their average size.
    Otherwise each live chunk counts as a full one: the needed space is overstated and the
    figure a lower bound. pgstattuple_approx on the TOAST relation replaces it for the worst tables.
    """
    size = row.toast_bytes
    if size == 0:
        return 0.0
    pages = size / s.block_size
    usable = size - pages * PAGE_OVERHEAD
    per_chunk = float(toast_chunk_bytes(s.block_size))
    unreused = row.toast_vacuums == 0 or (row.toast_vacuums == 1 and row.toast_ins_since_vacuum == 0)
    if unreused and row.toast_inserted > 0:
        per_chunk = min(per_chunk, usable / row.toast_inserted)
    return max(0.0, usable - row.toast_live_tup * per_chunk)


def estimate(row: TableRow, s: Settings) -> TableBloat:
    """A table's figures, heap plus TOAST, from the catalog alone."""
    assert row.size_bytes is not None
    layout = heap_tuple(row.columns, row.natts)
    live = live_tuples(row, s, layout)
    heap_waste, basis = heap_wasted(row, s, layout, live)
    threshold, enabled = autovacuum_threshold(row, s)
    t = TableBloat(
        table=row.qualified,
        size_bytes=0,
        dead_tuples=row.n_dead_tup,
        live_tuples=live,
        bloat_bytes=0,
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
        fillfactor=fillfactor(row),
        toast_oid=row.toast_oid,
        changed_since_analyze=row.mod_since_analyze if basis == "pg_stats_stale" else 0,
    )
    heap = Part(row.size_bytes, int(min(heap_waste, row.size_bytes)), "estimate")
    toast = Part(row.toast_bytes, int(toast_wasted(row, s)), "estimate") if row.toast_oid else None
    t.set_parts(heap, toast)
    return t


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
