"""Foreign keys whose referencing columns lead no index, with the exact statements that fix them.

Without such an index every DELETE (or key UPDATE) of a referenced row scans the referencing table,
under a lock, and joins along the key cannot use an index. One catalog read for the whole database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.results import Finding

NAMEDATALEN = 63  # bytes of an identifier; PostgreSQL truncates longer names

# A constraint counts once, where it was declared: the clones PostgreSQL makes on each partition
# (and for each partition of a referenced partitioned table) have conparentid set. An index covers
# it when its leading key columns are the constraint's columns in any order: valid, not partial,
# and of a kind that serves equality. The table's size is what the catalog records (pages of it,
# its TOAST table and their indexes, as of their last VACUUM, ANALYZE or CREATE INDEX; for a
# partitioned table, of all its partitions): measuring each referencing table would open it and
# every index (seconds at 10,000 tables). Partitions are found through pg_inherits, which takes no
# lock on them.
UNINDEXED_SQL = """WITH RECURSIVE usable AS MATERIALIZED (  -- read once, then hashed by table
    SELECT x.indrelid, x.indnkeyatts, string_to_array(x.indkey::text, ' ')::int2[] AS keys
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_am am ON am.oid = i.relam
    WHERE x.indisvalid AND x.indpred IS NULL AND am.amname IN ('btree', 'hash')
), fk AS (
    SELECT c.conname, c.conrelid, c.confrelid, c.conkey, c.confkey, t.relkind,
           nt.nspname AS schema, t.relname AS name
    FROM pg_constraint c
    JOIN pg_class t ON t.oid = c.conrelid
    JOIN pg_namespace nt ON nt.oid = t.relnamespace
    WHERE c.contype = 'f' AND c.conparentid = 0 AND t.relkind IN ('r', 'p')
      AND nt.nspname NOT IN ('pg_catalog', 'information_schema') AND nt.nspname !~ '^pg_toast'
      AND NOT EXISTS (
        SELECT 1 FROM usable u
        WHERE u.indrelid = c.conrelid AND u.indnkeyatts >= cardinality(c.conkey)
          AND u.keys[1:cardinality(c.conkey)] @> c.conkey AND u.keys[1:cardinality(c.conkey)] <@ c.conkey
      )
), tree AS (  -- each table with such a key, and all partitions under it
    SELECT DISTINCT conrelid AS top, conrelid AS relid FROM fk
    UNION ALL
    SELECT tree.top, i.inhrelid FROM tree JOIN pg_inherits i ON i.inhparent = tree.relid
), member AS MATERIALIZED (  -- the tables with such a key and their partitions: few, by oid
    SELECT tree.top, tree.relid, c.relkind, n.nspname, c.relname,
           greatest(c.relpages, 0)::bigint  -- -1: a partitioned table, no storage
             + coalesce((SELECT t.relpages FROM pg_class t WHERE t.oid = c.reltoastrelid), 0)
             + coalesce((SELECT sum(greatest(i.relpages, 0)) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                         WHERE x.indrelid IN (c.oid, c.reltoastrelid)), 0) AS pages
    FROM tree
    JOIN pg_class c ON c.oid = tree.relid
    JOIN pg_namespace n ON n.oid = c.relnamespace
), sized AS (
    SELECT top, sum(pages) * current_setting('block_size')::bigint AS size_bytes,
           coalesce(json_agg(json_build_array(nspname, relname, quote_ident(nspname) || '.' || quote_ident(relname))
                             ORDER BY nspname, relname) FILTER (WHERE relkind = 'r' AND relid <> top),
                    '[]') AS leaves
    FROM member
    GROUP BY top
)
SELECT fk.conname, fk.schema, fk.name, fk.relkind = 'p' AS partitioned,
       quote_ident(fk.schema) || '.' || quote_ident(fk.name) AS table_sql,
       nr.nspname AS ref_schema, r.relname AS ref_name,
       ARRAY(SELECT a.attname FROM unnest(fk.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = fk.conrelid AND a.attnum = k.attnum ORDER BY k.ord)::text[] AS columns,
       ARRAY(SELECT quote_ident(a.attname) FROM unnest(fk.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = fk.conrelid AND a.attnum = k.attnum ORDER BY k.ord) AS columns_sql,
       ARRAY(SELECT a.attname FROM unnest(fk.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = fk.confrelid AND a.attnum = k.attnum ORDER BY k.ord)::text[] AS ref_columns,
       CASE WHEN fk.relkind = 'p' THEN s.leaves END AS leaves,
       s.size_bytes
FROM fk
JOIN sized s ON s.top = fk.conrelid
JOIN pg_class r ON r.oid = fk.confrelid
JOIN pg_namespace nr ON nr.oid = r.relnamespace
WHERE s.size_bytes >= %(min_size)s
ORDER BY s.size_bytes DESC, fk.schema, fk.name, fk.conname
"""

# Index names as the server will take them: quoted where needed, and whether one is taken.
NAMES_SQL = """
SELECT u.schema, u.name, quote_ident(u.name) AS name_sql,
       EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = u.schema AND c.relname = u.name) AS taken
FROM unnest(%(schemas)s::text[], %(names)s::text[]) AS u(schema, name)
"""


@dataclass(frozen=True)
class UnindexedKey:
    constraint: str
    table: str  # schema.name, as the label and finding objects read
    table_sql: str  # quoted for SQL
    columns: tuple[str, ...]
    columns_sql: tuple[str, ...]
    referenced: str
    referenced_columns: tuple[str, ...]
    size_bytes: int
    partitioned: bool
    # Per statement target (the table, or each leaf partition then the parent): (relation SQL,
    # index name SQL).
    indexes: tuple[tuple[str, str], ...] = ()

    def statements(self) -> list[str]:
        """The fix: one CREATE INDEX CONCURRENTLY; on a partitioned table, one per partition, then
        the parent's index, which adopts them (metadata only: concurrent builds on a partitioned
        table are not supported)."""
        cols = ", ".join(self.columns_sql)
        if not self.partitioned:
            ((rel, name),) = self.indexes
            return [f"CREATE INDEX CONCURRENTLY {name} ON {rel} ({cols})"]
        *leaves, (parent, parent_name) = self.indexes
        return [f"CREATE INDEX CONCURRENTLY {name} ON {rel} ({cols})" for rel, name in leaves] + [
            f"CREATE INDEX {parent_name} ON {parent} ({cols})"
        ]


def index_name(table: str, columns: Sequence[str], salt: str = "") -> str:
    """`<table>_<columns>_idx` as PostgreSQL names indexes, kept within NAMEDATALEN bytes (a
    truncated or salted name ends in a short hash so it stays distinct)."""
    base = f"{table}_{'_'.join(columns)}"
    name = f"{base}_idx"
    if len(name.encode()) <= NAMEDATALEN and not salt:
        return name
    digest = hashlib.sha1(f"{base}|{salt}".encode()).hexdigest()[:8]
    tail = f"_{digest}_idx"
    cut = base.encode()[: NAMEDATALEN - len(tail)].decode(errors="ignore")
    return f"{cut}{tail}"


def read(conn: psycopg.Connection, min_size: int) -> list[UnindexedKey]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(UNINDEXED_SQL, {"min_size": min_size}).fetchall()
        if not rows:
            return []
        wanted = planned_names(rows)
        pairs = [(schema, name) for planned in wanted for schema, first, alt in planned for name in (first, alt)]
        found = cur.execute(NAMES_SQL, {"schemas": [s for s, _ in pairs], "names": [n for _, n in pairs]}).fetchall()
    names = {(r["schema"], r["name"]): (r["name_sql"], bool(r["taken"])) for r in found}
    keys = []
    for row, planned in zip(rows, wanted, strict=True):
        indexes = []
        for (schema, first, alt), rel in zip(planned, _relations(row), strict=True):
            quoted, taken = names[(schema, first)]
            # A name already taken (an index on other columns, or a table) gives way to a salted one.
            indexes.append((rel, names[(schema, alt)][0] if taken else quoted))
        keys.append(key_from_row(row, tuple(indexes)))
    return keys


def _leaves(row: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(schema, name, quoted SQL name) of each leaf partition of a partitioned table."""
    return [(str(s), str(n), str(q)) for s, n, q in (row["leaves"] or [])]


def _relations(row: Mapping[str, Any]) -> list[str]:
    """Where each planned index goes, as SQL: each leaf partition, then the table itself."""
    return [q for _, _, q in _leaves(row)] + [row["table_sql"]]


def planned_names(rows: Sequence[Mapping[str, Any]]) -> list[list[tuple[str, str, str]]]:
    """Per row, (schema, index name, alternative if taken) for each leaf partition, then the table."""
    out = []
    for row in rows:
        cols = list(row["columns"])
        rels = [(s, n) for s, n, _ in _leaves(row)] + [(row["schema"], row["name"])]
        out.append([(s, index_name(n, cols), index_name(n, cols, salt=row["conname"])) for s, n in rels])
    return out


def key_from_row(row: Mapping[str, Any], indexes: tuple[tuple[str, str], ...]) -> UnindexedKey:
    return UnindexedKey(
        constraint=row["conname"],
        table=f"{row['schema']}.{row['name']}",
        table_sql=row["table_sql"],
        columns=tuple(row["columns"]),
        columns_sql=tuple(row["columns_sql"]),
        referenced=f"{row['ref_schema']}.{row['ref_name']}",
        referenced_columns=tuple(row["ref_columns"]),
        size_bytes=int(row["size_bytes"]),
        partitioned=bool(row["partitioned"]),
        indexes=indexes,
    )


def finding(key: UnindexedKey) -> Finding:
    statements = key.statements()
    cols = ", ".join(key.columns)
    if key.partitioned:
        fix = (
            f"build it on each of its {len(statements) - 1} partitions without blocking writes, then on the parent "
            f"(which adopts them; concurrent builds on a partitioned table are not supported): {'; '.join(statements[:1])}; ...; "
            f"{statements[-1]}"
        )
    else:
        fix = statements[0]
    return Finding(
        kind="unindexed_foreign_key",
        object=f"{key.table}({cols})",
        value=key.size_bytes,
        message=(
            f"{key.table}: foreign key {key.constraint} ({cols}) -> {key.referenced} has no index leading with its "
            f"columns; every DELETE or key UPDATE on {key.referenced} scans {key.table} ({key.size_bytes} bytes) "
            f"and joins along the key cannot use an index: {fix}"
        ),
        detail={
            "table": key.table,
            "columns": list(key.columns),
            "constraint": key.constraint,
            "referenced_table": key.referenced,
            "referenced_columns": list(key.referenced_columns),
            "size_bytes": key.size_bytes,
            "partitioned": key.partitioned,
            "sql": statements,
        },
    )
