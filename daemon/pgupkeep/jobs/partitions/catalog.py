"""The partitions job's catalog read: every managed table with its partitions, bounds, owner,
grants, replica identity, pgupkeep's rights on it and the tables its retirements marked, in one
statement (bounds deparsed again only where they changed since the last run); and its checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from pgupkeep.db import EXCLUSIVE_LOCKS_CTE, read_past_exclusive_locks
from pgupkeep.jobs.partitions import grid
from pgupkeep.jobs.partitions.grid import Partition, Slot
from pgupkeep.jobs.partitions.locks import Lock
from pgupkeep.jobs.partitions.privileges import Grant, Rights
from pgupkeep.policy import PartitionTable
from pgupkeep.units import QualifiedName

if TYPE_CHECKING:
    from pgupkeep.jobs.partitions.ddl import DdlStep
    from pgupkeep.results import Finding

# A digest of one attached partition: its name, schema, bound and pending-detach flag, hashed
# together as one row and seeded with its oid, so that any change to them (ATTACH, DETACH, RENAME,
# two partitions swapping names, SET SCHEMA) changes its table's digest, the XOR of its partitions'
# digests. The schema is taken by oid: looking its name up for each of 80,000 partitions was half
# the cost of the digest. A schema renamed changes NAMESPACES_DIGEST instead, and every table is
# read again. The bound's stored node tree is hashed as it is, which costs a tenth of deparsing
# it; hashing content rather than comparing row versions (xmin) holds however the server updates
# its catalog rows.
PART_DIGEST = """hash_record_extended(ROW(pc.relname, pc.relnamespace, i.inhdetachpending, pc.relpartbound::text), pc.oid::bigint)"""
NAMESPACES_DIGEST = "(SELECT bit_xor(hashtextextended(nspname::text, oid::bigint)) FROM pg_namespace)"

# One row per managed table, in policy order (a missing or unpartitioned table still has its row):
# what the policy's checks need, the count and digest of its attached partitions, and other
# sessions' ACCESS EXCLUSIVE locks on it and its partitions. pg_relation_size tells an empty
# default partition (0 bytes) from one that needs a count; it takes and releases an ACCESS SHARE
# lock, so no locks pile up. It is the only call here that locks a relation, so it is skipped
# (NULL: count it, or skip the table) where pg_locks shows an ACCESS EXCLUSIVE lock held or
# queued: it would wait lock_timeout and fail the whole statement, every table's read with it.
# Catalog reads take no relation locks.
# What a new partition takes from its parent comes along: the owner, the table and column GRANTs
# to other roles, the replica identity; and what pgupkeep's role may do (the owner's privileges,
# becoming the owner ({may_set}: SET on 16+, membership before), CREATE in the schema, for it and
# for the owner). So do the tables a retirement marked (see retirement.py), matched to their
# parent by the name in the mark.
TABLES_SQL = "WITH " + EXCLUSIVE_LOCKS_CTE + r""", referenced AS MATERIALIZED (
  -- Once for all tables: a correlated EXISTS per table made the planner's estimate large
  -- enough to switch on JIT compilation, which then cost more than the whole read. MATERIALIZED:
  -- inlined, the planner may put this scan of pg_constraint on the inner side of a nested loop
  -- over the managed tables; once the catalogs' statistics grew (180,000 relations) it did, and
  -- one read of 10,000 tables took 200 s instead of 0.8 s.
  -- Only retention needs it: without retention in the policy the scan is skipped.
  SELECT DISTINCT confrelid FROM pg_constraint WHERE contype = 'f' AND %(retention)s
), marked AS MATERIALIZED (
  SELECT substr(k.line, length(split_part(k.line, ':', 3)) + 18) AS parent,
         json_agg(json_build_array(k.nspname, k.relname, split_part(k.line, ':', 3), k.relispartition)
                  ORDER BY k.nspname, k.relname) AS rels
  FROM (
    SELECT split_part(d.description, E'\n', 1) AS line, kn.nspname, kc.relname, kc.relispartition
    FROM pg_description d
    JOIN pg_class kc ON kc.oid = d.objoid
    JOIN pg_namespace kn ON kn.oid = kc.relnamespace
    WHERE d.classoid = 'pg_class'::regclass AND d.objsubid = 0 AND d.description LIKE 'pgupkeep:retire:%%'
  ) k
  GROUP BY 1
), managed AS (
  SELECT m.ord + %(offset)s AS ord, c.oid AS parent_oid, c.relkind, pt.partstrat, pt.partnatts, pt.partdefid,
         a.attname AS key_name, t.typname AS key_type, ts.spcname AS tablespace,
         fk.confrelid IS NOT NULL AS referenced, c.relowner, c.relnamespace, c.relacl, c.relreplident,
         '"' || replace(m.nsp, '"', '""') || '"."' || replace(m.rel, '"', '""') || '"' AS quoted
  FROM unnest(%(schemas)s::text[], %(names)s::text[]) WITH ORDINALITY AS m(nsp, rel, ord)
  LEFT JOIN pg_namespace n ON n.nspname = m.nsp
  LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = m.rel
  LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = pt.partattrs[0] AND pt.partattrs[0] > 0
  LEFT JOIN pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace
  LEFT JOIN referenced fk ON fk.confrelid = c.oid
), rights AS (
  -- Once per owner and schema, which a thousand tables mostly share.
  SELECT o.relowner, o.relnamespace, pg_get_userbyid(o.relowner)::text AS owner,
         pg_has_role(o.relowner, 'USAGE') AS usage, pg_has_role(o.relowner, 'MEMBER') AS member,
         {may_set} AS may_set, has_schema_privilege(o.relnamespace, 'CREATE') AS may_create,
         has_schema_privilege(o.relowner, o.relnamespace, 'CREATE') AS owner_may_create
  FROM (SELECT DISTINCT relowner, relnamespace FROM managed WHERE relowner IS NOT NULL) o
), me AS MATERIALIZED (
  SELECT current_user::text AS role, current_setting('is_superuser') = 'on' AS superuser,
         """ + NAMESPACES_DIGEST + r""" AS namespaces
)
SELECT mg.ord, mg.parent_oid, mg.relkind::text, mg.partstrat::text, mg.partnatts,
       mg.key_name, mg.key_type, mg.tablespace, mg.referenced, ml.granted, ml.pids, p.n, p.digest,
       CASE WHEN mg.partdefid <> 0 AND dl.relation IS NULL THEN pg_relation_size(mg.partdefid) END AS default_bytes,
       (SELECT json_agg(json_build_array(ln.nspname, lc.relname, l.granted, l.pids))
          FROM exclusive_locks l
          JOIN pg_inherits li ON li.inhrelid = l.relation AND li.inhparent = mg.parent_oid
          JOIN pg_class lc ON lc.oid = l.relation
          JOIN pg_namespace ln ON ln.oid = lc.relnamespace) AS part_locks,
       me.role, me.superuser, r.owner, r.usage, r.member, r.may_set, r.may_create, r.owner_may_create,
       CASE WHEN mg.relacl IS NOT NULL THEN
         (SELECT json_agg(json_build_array(CASE WHEN g.grantee <> 0 THEN pg_get_userbyid(g.grantee)::text END,
                                           g.privilege_type, g.is_grantable, NULL))
          FROM aclexplode(mg.relacl) g WHERE g.grantee <> mg.relowner) END AS grants,
       (SELECT json_agg(json_build_array(CASE WHEN g.grantee <> 0 THEN pg_get_userbyid(g.grantee)::text END,
                                         g.privilege_type, g.is_grantable, pa.attname) ORDER BY pa.attnum)
          FROM pg_attribute pa, aclexplode(pa.attacl) g
          WHERE pa.attrelid = mg.parent_oid AND pa.attnum > 0 AND NOT pa.attisdropped AND pa.attacl IS NOT NULL
            AND g.grantee <> mg.relowner) AS column_grants,
       mg.relreplident::text AS replident,
       CASE WHEN mg.relreplident = 'i' THEN
         (SELECT ic.relname FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
          WHERE x.indrelid = mg.parent_oid AND x.indisreplident) END AS replident_index,
       mk.rels AS marked, me.namespaces
FROM managed mg
CROSS JOIN me
LEFT JOIN rights r ON r.relowner = mg.relowner AND r.relnamespace = mg.relnamespace
LEFT JOIN exclusive_locks ml ON ml.relation = mg.parent_oid
LEFT JOIN exclusive_locks dl ON dl.relation = mg.partdefid
LEFT JOIN marked mk ON mk.parent = mg.quoted
-- Table by table, so partitions are found by index rather than by hashing all of pg_class; not at
-- all when nothing is known from an earlier run (every table's bounds are read then anyway).
LEFT JOIN LATERAL (
  SELECT count(*) AS n, bit_xor(""" + PART_DIGEST + """) AS digest
  FROM pg_inherits i
  JOIN pg_class pc ON pc.oid = i.inhrelid
  WHERE i.inhparent = mg.parent_oid AND %(digests)s
) p ON true
ORDER BY mg.ord
"""
# Where a TABLES_SQL row holds what read_catalog needs before the row becomes a Table (see _table).
OID, STRATEGY, KEY_COLUMNS, KEY_TYPE, COUNT, DIGEST, DEFAULT_BYTES, NAMESPACES = 1, 3, 4, 6, 11, 12, 13, 28
MAY_SET_16 = "pg_has_role(o.relowner, 'SET')"
MAY_SET_15 = "pg_has_role(o.relowner, 'MEMBER')"

# The attached partitions of the given tables with their bounds, deparsed, cast back to the key's
# type in the same session that printed them (so TimeZone and DateStyle round-trip) and returned
# as numbers; and each partition's digest, computed as in TABLES_SQL.
PARTS_SQL = r"""
WITH bounds AS MATERIALIZED (
  -- Deparsed once per partition: the CTE is materialized so the planner can neither push
  -- pg_get_expr into a pg_class scan nor repeat it for each use of the bound below. The
  -- partitions are found table by table by index (OFFSET 0 keeps the planner from turning that
  -- into a scan of all of pg_class).
  SELECT w.parent_oid, w.key_type, x.*,
         CASE WHEN left(x.e, 17) = 'FOR VALUES FROM (' THEN btrim(substr(x.e, 18, strpos(x.e, ') TO (') - 18), '''') END AS lo_raw,
         CASE WHEN left(x.e, 17) = 'FOR VALUES FROM (' THEN
           btrim(substr(x.e, strpos(x.e, ') TO (') + 6, length(x.e) - strpos(x.e, ') TO (') - 6), '''') END AS hi_raw
  FROM unnest(%(oids)s::oid[], %(key_types)s::text[]) AS w(parent_oid, key_type),
  LATERAL (
    SELECT pn.nspname AS part_schema, pc.relname AS part_name, i.inhdetachpending AS pending,
           pc.oid = (SELECT partdefid FROM pg_partitioned_table WHERE partrelid = w.parent_oid) AS is_default,
           """ + PART_DIGEST + r""" AS digest,
           -- No regular expression (a backtracking match costs more than all the rest), and
           -- OFFSET 0 keeps the deparsed text from being recomputed for each of its uses.
           (SELECT pg_get_expr(pc.relpartbound, 0) OFFSET 0) AS e
    FROM pg_inherits i
    JOIN pg_class pc ON pc.oid = i.inhrelid
    JOIN pg_namespace pn ON pn.oid = pc.relnamespace
    WHERE i.inhparent = w.parent_oid
    OFFSET 0
  ) x
)
SELECT p.parent_oid, p.digest, p.part_schema, p.part_name, p.pending, p.is_default, p.lo_raw, p.hi_raw,
       CASE WHEN p.lo_raw IS NULL OR p.lo_raw ILIKE '%%infinity%%' OR p.lo_raw IN ('MINVALUE', 'MAXVALUE') THEN NULL
            WHEN p.key_type = 'timestamptz' THEN (extract(epoch FROM p.lo_raw::timestamptz) * 1000000)::bigint
            WHEN p.key_type = 'timestamp' THEN (extract(epoch FROM p.lo_raw::timestamp) * 1000000)::bigint
            WHEN p.key_type = 'date' THEN (extract(epoch FROM p.lo_raw::date) * 1000000)::bigint
            WHEN p.key_type IN ('int2', 'int4', 'int8') THEN p.lo_raw::bigint END AS lo,
       CASE WHEN p.hi_raw IS NULL OR p.hi_raw ILIKE '%%infinity%%' OR p.hi_raw IN ('MINVALUE', 'MAXVALUE') THEN NULL
            WHEN p.key_type = 'timestamptz' THEN (extract(epoch FROM p.hi_raw::timestamptz) * 1000000)::bigint
            WHEN p.key_type = 'timestamp' THEN (extract(epoch FROM p.hi_raw::timestamp) * 1000000)::bigint
            WHEN p.key_type = 'date' THEN (extract(epoch FROM p.hi_raw::date) * 1000000)::bigint
            WHEN p.key_type IN ('int2', 'int4', 'int8') THEN p.hi_raw::bigint END AS hi
FROM bounds p
"""

@dataclass(frozen=True)
class Marked:
    """A table a retirement marked (see retirement.py): its name, the retention_action it was
    retired by, and whether it is still a partition (attached, or pending detach)."""

    schema: str
    name: str
    action: str
    is_partition: bool

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(slots=True)  # a run keeps its settled tables for the next: 10,000 of them
class Table:
    """One managed table: its policy, what the catalog says, and what this run plans for it."""

    policy: PartitionTable
    label: str = field(init=False)
    found: bool = False
    relkind: str | None = None
    strategy: str | None = None
    key_columns: int | None = None
    key_name: str | None = None
    key_type: str | None = None
    tablespace: str | None = None
    referenced: bool = False
    parts: list[Partition] = field(default_factory=list)
    default: Partition | None = None
    default_bytes: int | None = 0  # None: not measured (locked), so it must be counted
    default_rows: int = 0
    base: int | None = None  # integer keys: the max key value (or a fallback)
    growth: float | None = None  # integer keys: key values per second lately (None: not measured yet)
    slots: list[grid.SlotState] = field(default_factory=list)
    creates: list[Slot] = field(default_factory=list)
    conflicts: dict[grid.Bound, int] = field(default_factory=dict)  # slot.lo -> rows in the default
    names: dict[grid.Bound, str] = field(default_factory=dict)  # slot.lo -> new partition name
    locks: dict[str, Lock] = field(default_factory=dict)  # relation -> lock in the way of a read
    blocked: str | None = None  # why this run leaves the table alone (a lock in the way of a read)
    steps: list[DdlStep] = field(default_factory=list)  # this run's planned DDL, in order
    rights: Rights = field(default_factory=Rights)  # the parent's owner, grants, identity; pgupkeep's rights
    marked: list[Marked] = field(default_factory=list)  # tables a retirement of this parent marked
    denied: str | None = None  # why pgupkeep may not change this table (a right or setting missing)
    row: tuple[Any, ...] = ()  # the catalog row it was read from
    known: Known | None = None  # its partitions as read (None: not a single-key range table)
    settled: Settled | None = None  # set once planned with nothing to do: what the plan found
    # A settled table's gauges while the key stays in [lo, hi), its current partition: (lo, hi,
    # the end of its chain of partitions, every sample but the runway's).
    gauged: tuple[grid.Bound, grid.Bound, grid.Bound, tuple[Any, ...]] | None = None

    @property
    def name(self) -> QualifiedName:
        return self.policy.table

    def __post_init__(self) -> None:
        self.label = str(self.policy.table)

    @property
    def kind(self) -> str:
        return grid.KEY_KINDS[self.key_type or ""]


@dataclass(frozen=True)
class Known:
    """One table's attached partitions as last read, kept between runs (see read_catalog)."""

    count: int
    digest: int | None
    namespaces: int  # NAMESPACES_DIGEST when read: a schema renamed since means every table is read again
    key_type: str
    parts: tuple[Partition, ...]
    default: Partition | None


@dataclass(frozen=True)
class Settled:
    """A table's plan that found nothing to do (no DDL, no read of the table itself, no error),
    kept for the next run: while the catalog row, the partitions and `key` (the calendar slots,
    the partitions due for retirement, the server and timezone) are all the same, planning again
    would give the same findings and nothing to do, so the next run reuses them."""

    key: tuple[Any, ...]
    findings: tuple[Finding, ...]


# From this many tables on, the catalog read is split in two halves read at once, the second on a
# session of its own: the server's work (index lookups for 80,000 partitions, a size for each
# default partition) is what a large steady run waits for, and it spreads over two cores.
SPLIT_TABLES = 2000


def _table_rows(
    conn: psycopg.Connection,
    tables: Sequence[PartitionTable],
    digests: bool,
    connect: Callable[[], psycopg.Connection] | None = None,
) -> list[tuple[Any, ...]]:
    query = TABLES_SQL.replace("{may_set}", MAY_SET_16 if conn.info.server_version >= 160000 else MAY_SET_15)
    retention = any(t.retention is not None for t in tables)

    def read(session: psycopg.Connection, offset: int, part: Sequence[PartitionTable]) -> list[tuple[Any, ...]]:
        params = {"schemas": [t.table.schema for t in part], "names": [t.table.name for t in part], "offset": offset,
                  "digests": digests, "retention": retention}
        return read_past_exclusive_locks(lambda: session.execute(query, params).fetchall())

    half = len(tables) // 2
    if connect is None or len(tables) < SPLIT_TABLES:
        return read(conn, 0, tables)

    def second() -> list[tuple[Any, ...]]:
        try:
            session = connect()
        except Exception:
            # No second session: refused (max_connections), or its fence is not free yet (a run of
            # an earlier leader still writing, which the run's own fence reports before any write).
            # The halves are read one after the other.
            return read(conn, half, tables[half:])
        with session:
            return read(session, half, tables[half:])

    with ThreadPoolExecutor(1) as pool:
        rest = pool.submit(second)
        first = read(conn, 0, tables[:half])
        return first + rest.result()


def _read_partitions(conn: psycopg.Connection, wanted: dict[int, str], namespaces: int) -> dict[int, Known]:
    """The partitions and bounds of the tables in `wanted` (parent oid -> key type)."""
    rows = conn.execute(PARTS_SQL, {"oids": list(wanted), "key_types": list(wanted.values())}).fetchall()
    parts: dict[int, list[Partition]] = {oid: [] for oid in wanted}
    defaults: dict[int, Partition] = {}
    digests: dict[int, int] = {}  # XORed as bit_xor does in TABLES_SQL
    for oid, digest, schema, name, pending, is_default, lo_raw, hi_raw, lo, hi in rows:
        digests[oid] = digests.get(oid, 0) ^ digest
        if is_default:
            defaults[oid] = Partition(schema, name, -math.inf, math.inf)
            continue
        lo_v: grid.Bound = lo if lo is not None else (math.inf if lo_raw == "MAXVALUE" else -math.inf)
        hi_v: grid.Bound = hi if hi is not None else (-math.inf if hi_raw == "MINVALUE" else math.inf)
        parts[oid].append(Partition(schema, name, lo_v, hi_v, bool(pending)))
    return {
        oid: Known(len(ps) + (oid in defaults), digests.get(oid), namespaces, wanted[oid],
                   tuple(sorted(ps, key=lambda p: (p.lo, p.hi, p.name))), defaults.get(oid))
        for oid, ps in parts.items()
    }


def read_catalog(
    conn: psycopg.Connection,
    tables: Sequence[PartitionTable],
    known: dict[int, Known] | None = None,
    previous: dict[int, Table] | None = None,
    connect: Callable[[], psycopg.Connection] | None = None,
) -> list[Table]:
    """Every managed table as the catalog shows it now.

    Deparsing bounds is most of the cost of a read, and bounds seldom change: `known` (parent oid
    -> Known, kept by the caller between runs) holds each table's partitions as last read, and
    only tables whose partition count or digest has changed since are read again. `known` is
    updated in place to hold this read's tables only.

    `previous` (policy position -> Table, kept by the caller) holds the tables the last run planned
    with nothing to do (see Settled): one whose catalog row and partitions are unchanged is
    returned as it was, `settled` and all, and one whose partitions changed is built afresh.
    `connect` opens another session to read half of a long list of tables on (see SPLIT_TABLES)."""
    known = {} if known is None else known
    previous = {} if previous is None else previous
    out: list[Table | None] = [None] * len(tables)
    current: dict[int, tuple[int, int | None, int, str]] = {}  # parent oid -> (count, digest, namespaces, key type)
    namespaces_now = 0  # the same in every row
    for row in _table_rows(conn, tables, bool(known), connect):
        ord_, oid, key_type, namespaces = row[0], row[OID], row[KEY_TYPE], row[NAMESPACES]
        policy, namespaces_now = tables[ord_ - 1], namespaces
        kept = previous.get(ord_)
        # The table as the last run planned it, if its row is the same: it is not built again.
        out[ord_ - 1] = kept if kept is not None and kept.policy is policy and kept.row == row else _table(policy, row)
        if row[STRATEGY] == "r" and row[KEY_COLUMNS] == 1 and key_type is not None:
            current[oid] = (row[COUNT], row[DIGEST], namespaces, key_type)
    stale = {
        oid: key_type
        for oid, (count, digest, namespaces, key_type) in current.items()
        if (k := known.get(oid)) is None or (k.count, k.digest, k.namespaces, k.key_type) != (count, digest, namespaces, key_type)
    }
    for oid in [oid for oid in known if oid not in current]:
        del known[oid]
    if stale:
        known.update(_read_partitions(conn, stale, namespaces_now))
    result = []
    for t in out:
        assert t is not None
        k = known.get(t.row[OID]) if t.row[OID] in current else None
        if t.settled is None:
            result.append(_with_partitions(t, k))
        elif t.known is k:
            result.append(t)  # kept from the last run, partitions and all
        else:
            result.append(_with_partitions(_table(t.policy, t.row), k))  # its partitions changed
    return result


def rebuilt(t: Table) -> Table:
    """A table kept from the last run, built afresh from the same row and partitions, to be
    planned again."""
    return _with_partitions(_table(t.policy, t.row), t.known)


def _with_partitions(t: Table, k: Known | None) -> Table:
    t.known = k
    if k is not None:
        t.parts, t.default = list(k.parts), k.default
        if t.default is not None:
            t.default_bytes = t.row[DEFAULT_BYTES]
    return t


def _table(policy: PartitionTable, row: tuple[Any, ...]) -> Table:
    (_, oid, relkind, strat, natts, key_name, key_type, tablespace, referenced, t_granted, t_pids,
     _count, _digest, _default_bytes, part_locks, role, superuser, owner, usage, member, may_set, may_create,
     owner_may_create, grants, column_grants, replident, replident_index, marked, _namespaces) = row
    t = Table(policy=policy, row=row)
    t.found, t.relkind, t.strategy, t.key_columns = oid is not None, relkind, strat, natts
    t.key_name, t.key_type, t.tablespace, t.referenced = key_name, key_type, tablespace, referenced
    if t_granted is not None:
        parent = f"{t.name.schema}.{t.name.name}"
        t.locks[parent] = Lock(parent, t_granted, tuple(t_pids))
    for schema, name, granted, pids in part_locks or ():
        t.locks[f"{schema}.{name}"] = Lock(f"{schema}.{name}", granted, tuple(pids))
    t.rights = Rights(
        role, owner or "", superuser, bool(usage), bool(member), bool(may_set), bool(may_create),
        bool(owner_may_create), [Grant(*g) for g in (grants or []) + (column_grants or [])],
        replident or "d", replident_index,
    )
    if marked:
        t.marked = [Marked(*m) for m in marked]
    return t


def validate(t: Table) -> str | None:
    name = t.label
    if not t.found:
        return f"{name}: table does not exist; create it PARTITION BY RANGE or remove it from the policy"
    if t.relkind != "p":
        return f"{name}: is not a partitioned table; recreate it PARTITION BY RANGE (<key>) or remove it from the policy"
    if t.strategy != "r":
        by = {"l": "list", "h": "hash"}.get(t.strategy or "", t.strategy)
        return f"{name}: is partitioned by {by}, pgupkeep manages only PARTITION BY RANGE tables; remove it from the policy"
    if t.key_columns != 1 or t.key_name is None:
        return f"{name}: the partition key must be a single column (not an expression or several columns); remove it from the policy"
    mismatch = grid.key_mismatch(t.policy.interval, t.key_type or "")
    return f"{name}: {mismatch}" if mismatch else None
