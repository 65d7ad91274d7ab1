"""The largest tables, by heap, index and TOAST bytes, with partitions rolled up to their root.

One read for the database: a table of 1,000 partitions is one row, and only the top `report_top`
rows become series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.db import EXCLUSIVE_LOCKS_CTE, read_past_exclusive_locks
from pgupkeep.results import Sample

PARTS = ("heap", "indexes", "toast")

# Two steps, so that a database of 10,000 tables costs what its largest ones do. First the catalog
# alone ranks every table (and materialized view), each counted under its partition root, by the
# pages pg_class records for it, its TOAST table and their indexes (as of their last VACUUM, ANALYZE
# or CREATE INDEX); sizing every relation instead opens each one and its indexes (measured: seconds
# at 10,000 tables). Then the top `report_top` roots are measured exactly. pg_table_size includes
# the TOAST table and its index, so heap = table - toast. A relation that someone holds or awaits an
# ACCESS EXCLUSIVE lock on (it, its TOAST table or one of its indexes) is left out of the exact
# sums this run: sizing it would wait behind that lock.
TABLE_SIZES_SQL = "WITH " + EXCLUSIVE_LOCKS_CTE + """, index_pages AS (
    SELECT x.indrelid, sum(greatest(i.relpages, 0)) AS pages
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    GROUP BY x.indrelid
), rel AS (
    SELECT c.oid, c.reltoastrelid,
           CASE WHEN c.relispartition THEN pg_partition_root(c.oid) ELSE c.oid END AS root,
           c.relpages::bigint + coalesce(t.relpages, 0) + coalesce(ci.pages, 0) + coalesce(ti.pages, 0) AS pages
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
    LEFT JOIN index_pages ci ON ci.indrelid = c.oid
    LEFT JOIN index_pages ti ON ti.indrelid = c.reltoastrelid
    WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
), top AS (
    SELECT root, count(*) AS relations
    FROM rel
    GROUP BY root
    ORDER BY sum(pages) DESC, root
    LIMIT %(top)s
), free AS (
    SELECT r.*
    FROM rel r
    JOIN top USING (root)
    WHERE NOT EXISTS (SELECT 1 FROM exclusive_locks l WHERE l.relation IN (r.oid, r.reltoastrelid))
      AND NOT EXISTS (SELECT 1 FROM pg_index x JOIN exclusive_locks l ON l.relation = x.indexrelid
                      WHERE x.indrelid = r.oid)
), sized AS (
    SELECT root, pg_table_size(oid) AS table_bytes, pg_indexes_size(oid) AS index_bytes,
           CASE WHEN reltoastrelid <> 0 THEN pg_total_relation_size(reltoastrelid) ELSE 0 END AS toast_bytes
    FROM free
), rolled AS (
    SELECT top.root, top.relations, coalesce(sum(table_bytes - toast_bytes), 0) AS heap,
           coalesce(sum(index_bytes), 0) AS indexes, coalesce(sum(toast_bytes), 0) AS toast
    FROM top
    LEFT JOIN sized USING (root)
    GROUP BY top.root, top.relations
)
SELECT n.nspname AS schema, c.relname AS name, r.heap, r.indexes, r.toast, r.relations
FROM rolled r
JOIN pg_class c ON c.oid = r.root
JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY r.heap + r.indexes + r.toast DESC, n.nspname, c.relname
"""


@dataclass(frozen=True)
class TableSize:
    table: str  # schema.name of the table, or of the root of its partitions
    heap: int
    indexes: int
    toast: int
    relations: int = 1  # the partitions rolled up into it (1 for a plain table)

    @property
    def total(self) -> int:
        return self.heap + self.indexes + self.toast


def read(conn: psycopg.Connection, top: int) -> list[TableSize]:
    if top <= 0:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        rows = read_past_exclusive_locks(lambda: cur.execute(TABLE_SIZES_SQL, {"top": top}).fetchall())
    return [size_from_row(r) for r in rows]


def size_from_row(r: Mapping[str, Any]) -> TableSize:
    return TableSize(
        table=f"{r['schema']}.{r['name']}",
        heap=int(r["heap"]), indexes=int(r["indexes"]), toast=int(r["toast"]), relations=int(r["relations"]),
    )  # fmt: skip


def samples(tables: Sequence[TableSize]) -> list[Sample]:
    return [
        Sample("table_size_bytes", float(getattr(t, part)), {"table": t.table, "part": part})
        for t in tables
        for part in PARTS
    ]
