"""The `partitions` job: keep `premake` range partitions ready after the current one, retire old
ones, and report runway, gaps, overlaps and default-partition rows. Existing partitions are known by
their bounds (one catalog query for the whole target); every change is short, lock-bounded DDL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from pgupkeep.db import LockTimeoutError
from pgupkeep.jobs import partitions_plan as plan
from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.partitions_plan import Partition, Slot
from pgupkeep.policy import PartitionTable
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Sample
from pgupkeep.units import QualifiedName

# One row per (managed table, attached partition), in policy order; a table with no partitions, or
# that is missing or not partitioned, still has one row. Bounds are cast back to the key's type in
# the same session that printed them (so TimeZone and DateStyle round-trip) and returned as numbers.
# pg_relation_size tells an empty default partition (0 bytes) from one that needs a count; it
# takes and releases an ACCESS SHARE lock per default partition, so no locks pile up.
CATALOG_SQL = r"""
WITH managed AS (
  SELECT m.ord, c.oid AS parent_oid, c.relkind, pt.partstrat, pt.partnatts, pt.partdefid,
         a.attname AS key_name, t.typname AS key_type, ts.spcname AS tablespace,
         EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.confrelid = c.oid) AS referenced
  FROM unnest(%(schemas)s::text[], %(names)s::text[]) WITH ORDINALITY AS m(nsp, rel, ord)
  LEFT JOIN pg_namespace n ON n.nspname = m.nsp
  LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = m.rel
  LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = pt.partattrs[0] AND pt.partattrs[0] > 0
  LEFT JOIN pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace
), parts AS MATERIALIZED (
  SELECT mg.ord, pc.oid AS part_oid, pn.nspname AS part_schema, pc.relname AS part_name,
         i.inhdetachpending AS pending, pc.oid = mg.partdefid AS is_default, pc.relpartbound, mg.key_type
  FROM managed mg
  JOIN pg_inherits i ON i.inhparent = mg.parent_oid
  JOIN pg_class pc ON pc.oid = i.inhrelid
  JOIN pg_namespace pn ON pn.oid = pc.relnamespace
  WHERE mg.partstrat = 'r' AND mg.partnatts = 1 AND mg.key_type IS NOT NULL
), bounds AS MATERIALIZED (
  -- Deparsed once per managed partition (both CTEs are materialized so the planner can neither
  -- push pg_get_expr into a pg_class scan nor repeat it for each use of the bound below).
  SELECT pp.ord, pp.part_schema, pp.part_name, pp.pending, pp.is_default, pp.part_oid, pp.key_type,
         CASE WHEN left(b.e, 17) = 'FOR VALUES FROM (' THEN btrim(substr(b.e, 18, strpos(b.e, ') TO (') - 18), '''') END AS lo_raw,
         CASE WHEN left(b.e, 17) = 'FOR VALUES FROM (' THEN
           btrim(substr(b.e, strpos(b.e, ') TO (') + 6, length(b.e) - strpos(b.e, ') TO (') - 6), '''') END AS hi_raw
  FROM parts pp,
  -- No regular expression (a backtracking match costs more than all the rest), and OFFSET 0 keeps
  -- the deparsed text from being recomputed for each of its uses.
  LATERAL (SELECT pg_get_expr(pp.relpartbound, 0) AS e OFFSET 0) b
)
SELECT mg.ord, mg.parent_oid IS NOT NULL AS found, mg.relkind::text, mg.partstrat::text, mg.partnatts,
       mg.key_name, mg.key_type, mg.tablespace, mg.referenced,
       p.part_schema, p.part_name, p.pending, p.is_default,
       CASE WHEN p.is_default THEN pg_relation_size(p.part_oid) END AS default_bytes,
       p.lo_raw, p.hi_raw,
       CASE WHEN x.lo IS NULL OR x.lo ILIKE '%%infinity%%' OR x.lo IN ('MINVALUE', 'MAXVALUE') THEN NULL
            WHEN p.key_type = 'timestamptz' THEN (extract(epoch FROM x.lo::timestamptz) * 1000000)::bigint
            WHEN p.key_type = 'timestamp' THEN (extract(epoch FROM x.lo::timestamp) * 1000000)::bigint
            WHEN p.key_type = 'date' THEN (extract(epoch FROM x.lo::date) * 1000000)::bigint
            WHEN p.key_type IN ('int2', 'int4', 'int8') THEN x.lo::bigint END AS lo,
       CASE WHEN x.hi IS NULL OR x.hi ILIKE '%%infinity%%' OR x.hi IN ('MINVALUE', 'MAXVALUE') THEN NULL
            WHEN p.key_type = 'timestamptz' THEN (extract(epoch FROM x.hi::timestamptz) * 1000000)::bigint
            WHEN p.key_type = 'timestamp' THEN (extract(epoch FROM x.hi::timestamp) * 1000000)::bigint
            WHEN p.key_type = 'date' THEN (extract(epoch FROM x.hi::date) * 1000000)::bigint
            WHEN p.key_type IN ('int2', 'int4', 'int8') THEN x.hi::bigint END AS hi
FROM managed mg
LEFT JOIN bounds p ON p.ord = mg.ord
LEFT JOIN LATERAL (SELECT p.lo_raw AS lo, p.hi_raw AS hi) x ON true
ORDER BY mg.ord
"""

NAMES_SQL = """
SELECT n.nspname, c.relname
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
"""

PENDING_SQL = "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass(%s)"
COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
ORDER BY attnum
"""
LIKE_OPTIONS = sql.SQL(
    "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS "
    "INCLUDING GENERATED INCLUDING COMPRESSION"
)
# Many tables' probes go in one statement, but each SELECT locks its tables until the statement
# ends; chunks keep that lock count bounded.
PROBE_CHUNK = 100


@dataclass
class Table:
    """One managed table: its policy, what the catalog says, and what this run plans for it."""

    policy: PartitionTable
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
    default_bytes: int = 0
    default_rows: int = 0
    base: int | None = None  # integer keys: the max key value (or a fallback)
    slots: list[plan.SlotState] = field(default_factory=list)
    creates: list[Slot] = field(default_factory=list)
    conflicts: dict[int, int] = field(default_factory=dict)  # slot.lo -> rows in the default
    names: dict[int, str] = field(default_factory=dict)  # slot.lo -> new partition name
    error: str | None = None

    @property
    def name(self) -> QualifiedName:
        return self.policy.table

    @property
    def label(self) -> str:
        return str(self.policy.table)

    @property
    def kind(self) -> str:
        return plan.KEY_KINDS[self.key_type or ""]


def read_catalog(conn: psycopg.Connection, tables: Sequence[PartitionTable]) -> list[Table]:
    out = [Table(policy=t) for t in tables]
    rows = conn.execute(
        CATALOG_SQL,
        {"schemas": [t.table.schema for t in tables], "names": [t.table.name for t in tables]},
    ).fetchall()
    for row in rows:
        (ord_, found, relkind, strat, natts, key_name, key_type, tablespace, referenced,
         p_schema, p_name, pending, is_default, default_bytes, lo_raw, hi_raw, lo, hi) = row
        t = out[ord_ - 1]
        t.found, t.relkind, t.strategy, t.key_columns = found, relkind, strat, natts
        t.key_name, t.key_type, t.tablespace, t.referenced = key_name, key_type, tablespace, referenced
        if p_name is None:
            continue
        if is_default:
            t.default = Partition(p_schema, p_name, -math.inf, math.inf)
            t.default_bytes = default_bytes or 0
            continue
        lo_v: plan.Bound = lo if lo is not None else (math.inf if lo_raw == "MAXVALUE" else -math.inf)
        hi_v: plan.Bound = hi if hi is not None else (-math.inf if hi_raw == "MINVALUE" else math.inf)
        t.parts.append(Partition(p_schema, p_name, lo_v, hi_v, bool(pending)))
    return out


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
    mismatch = plan.key_mismatch(t.policy.interval, t.key_type or "")
    return f"{name}: {mismatch}" if mismatch else None


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def read_integer_bases(conn: psycopg.Connection, tables: Sequence[Table]) -> None:
    """The current max key of each integer table (the default partition's rows left out: one stray
    value there must not move the grid)."""
    for chunk in _chunks(tables, PROBE_CHUNK):
        parts = []
        for i, t in enumerate(chunk):
            where = (
                sql.SQL(" WHERE tableoid <> {}::regclass").format(
                    sql.Literal(sql.Identifier(t.default.schema, t.default.name).as_string(conn))
                )
                if t.default
                else sql.SQL("")
            )
            parts.append(
                sql.SQL("SELECT {}::int AS i, (SELECT max({})::bigint FROM {}{})").format(
                    sql.Literal(i), sql.Identifier(t.key_name), sql.Identifier(*t.name.parts), where
                )
            )
        for i, value in conn.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall():
            t = chunk[i]
            finite = [p.lo for p in plan.attached(t.parts) if not math.isinf(p.lo)]
            t.base = value if value is not None else (min(finite) if finite else 0)


def _range_cond(t: Table, lo: int, hi: int) -> sql.Composed:
    return sql.SQL("{k} >= {lo} AND {k} < {hi}").format(
        k=sql.Identifier(t.key_name),
        lo=sql.Literal(plan.key_to_python(lo, t.kind)),
        hi=sql.Literal(plan.key_to_python(hi, t.kind)),
    )


def probe_defaults(conn: psycopg.Connection, tables: Sequence[Table]) -> None:
    """Exact row counts of non-empty default partitions, total and inside each range to create."""
    for chunk in _chunks(tables, PROBE_CHUNK):
        stmts = []
        for i, t in enumerate(chunk):
            assert t.default is not None
            ranges = [sql.Literal(0)] + [
                sql.SQL("count(*) FILTER (WHERE {})").format(_range_cond(t, s.lo, s.hi)) for s in t.creates
            ]
            stmts.append(
                sql.SQL("SELECT {}::int, count(*), ARRAY[{}]::bigint[] FROM {}").format(
                    sql.Literal(i), sql.SQL(", ").join(ranges), sql.Identifier(t.default.schema, t.default.name)
                )
            )
        for i, total, counts in conn.execute(sql.SQL(" UNION ALL ").join(stmts)).fetchall():
            t = chunk[i]
            t.default_rows = total
            t.conflicts = {s.lo: n for s, n in zip(t.creates, counts[1:], strict=True) if n}


def plan_table(t: Table, now: datetime, tz: ZoneInfo) -> list[Finding]:
    """The wanted grid against the existing bounds: which slots to create, what to report."""
    p = t.policy
    if isinstance(p.interval, int):
        assert t.base is not None
        slots = plan.integer_slots(t.base, p.interval, p.premake)
    else:
        slots = plan.time_slots(now, p.interval, t.kind, tz, p.premake)
    t.slots = plan.classify(slots, t.parts)
    t.creates = [s.slot for s in t.slots if s.state == "create"]
    findings = []
    gaps, overlaps = plan.gaps_and_overlaps(t.parts)
    for a, b in gaps:
        rng = plan.describe(a.hi, b.lo, t.kind, tz)
        findings.append(Finding(
            "partition_gap", t.label, None,
            f"{t.label}: no partition covers {rng} between {a.qualified} and {b.qualified}; rows there go to the "
            "default partition or fail. pgupkeep does not guess: create a partition for that range by hand",
            {"table": t.label, "range": rng, "before": a.qualified, "after": b.qualified},
        ))
    for a, b in overlaps:
        findings.append(Finding(
            "partition_overlap", t.label, None,
            f"{t.label}: partitions {a.qualified} and {b.qualified} overlap; check their bounds",
            {"table": t.label, "partitions": [a.qualified, b.qualified]},
        ))
    for s in t.slots:
        if s.state == "overlap":
            rng = plan.describe(s.slot.lo, s.slot.hi, t.kind, tz)
            names = [q.qualified for q in s.overlapping]
            findings.append(Finding(
                "partition_overlap", t.label, None,
                f"{t.label}: the {p.interval} range {rng} is partly covered by {', '.join(names)}; "
                "pgupkeep will not create an overlapping partition: align those bounds to the interval by hand",
                {"table": t.label, "range": rng, "partitions": names},
            ))
    return findings


def assign_names(conn: psycopg.Connection, tables: Sequence[Table]) -> None:
    """Spec names for new partitions, made unique against every relation in the schema."""
    wanted = [(t, s) for t in tables for s in t.creates]
    taken: set[tuple[str, str]] = set()
    attempt: dict[tuple[int, int], int] = {}
    pending = wanted
    for _ in range(8):
        if not pending:
            return
        candidates = {}
        for t, s in pending:
            n = attempt.get((id(t), s.lo), 1)
            name = plan.partition_name(t.name.name, s.suffix if n == 1 else f"{s.suffix}_{n}")
            candidates[(id(t), s.lo)] = (t, s, name)
        keys = [(t.name.schema, name) for t, _, name in candidates.values()]
        rows = conn.execute(NAMES_SQL, ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
        taken |= {(r[0], r[1]) for r in rows}
        retry = []
        for key, (t, s, name) in candidates.items():
            if (t.name.schema, name) in taken:
                attempt[key] = attempt.get(key, 1) + 1
                retry.append((t, s))
            else:
                taken.add((t.name.schema, name))
                t.names[s.lo] = name
        pending = retry
    raise RuntimeError("could not find free names for new partitions")  # pragma: no cover


def _bound(value: plan.Bound, kind: str, tz: ZoneInfo) -> sql.Composable:
    text = plan.literal(value, kind, tz)
    if kind == "integer" or text in ("MINVALUE", "MAXVALUE"):
        return sql.SQL(text)
    return sql.Literal(text.strip("'"))


def _cond(t: Table, lo: int, hi: int, tz: ZoneInfo) -> sql.Composed:
    return sql.SQL("{k} >= {lo} AND {k} < {hi}").format(
        k=sql.Identifier(t.key_name), lo=_bound(lo, t.kind, tz), hi=_bound(hi, t.kind, tz)
    )


def create_statements(t: Table, slot: Slot, name: str, tz: ZoneInfo, columns: Sequence[str] | None = None) -> list[sql.Composed]:
    """A standalone table shaped like the parent, then ATTACH (SHARE UPDATE EXCLUSIVE on the
    parent, where CREATE TABLE ... PARTITION OF takes ACCESS EXCLUSIVE). With `columns`, the
    default partition's rows in the range move in the same transaction, so readers see them
    either in the default partition or in the attached new one, never nowhere."""
    parent = sql.Identifier(*t.name.parts)
    new = sql.Identifier(t.name.schema, name)
    create = sql.SQL("CREATE TABLE {} (LIKE {} {})").format(new, parent, LIKE_OPTIONS)
    if t.tablespace:
        create = sql.SQL("{} TABLESPACE {}").format(create, sql.Identifier(t.tablespace))
    attach = sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
        parent, new, _bound(slot.lo, t.kind, tz), _bound(slot.hi, t.kind, tz)
    )
    if columns is None:
        return [create, attach]
    assert t.default is not None
    check = sql.Identifier(plan.partition_name(name, "bounds"))
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    return [
        create,
        # The constraint lets ATTACH skip its validation scan of the new table under the lock.
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL AND {})").format(
            new, check, sql.Identifier(t.key_name), _cond(t, slot.lo, slot.hi, tz)
        ),
        sql.SQL("WITH moved AS (DELETE FROM {} WHERE {} RETURNING {}) INSERT INTO {} ({}) SELECT {} FROM moved").format(
            sql.Identifier(t.default.schema, t.default.name), _cond(t, slot.lo, slot.hi, tz), cols, new, cols, cols
        ),
        attach,
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(new, check),
    ]


def _text(conn: psycopg.Connection, statements: Sequence[sql.Composable]) -> str:
    return ";\n".join(s.as_string(conn) for s in statements) + ";"


@dataclass
class Step:
    """One short unit of DDL for one table: its action, statements and how to run them."""

    action: Action
    statements: list[sql.Composed]
    relations: list[QualifiedName]
    transaction: bool = True
    made: Partition | None = None  # the partition a create step adds


def default_findings(t: Table, tz: ZoneInfo) -> tuple[list[Finding], ItemError | None]:
    mode = t.policy.on_default_conflict
    findings, error = [], None
    assert t.default is not None or not t.conflicts
    for s in t.creates:
        rows = t.conflicts.get(s.lo)
        if not rows:
            continue
        rng = plan.describe(s.lo, s.hi, t.kind, tz)
        name = f"{t.name.schema}.{t.names.get(s.lo, s.suffix)}"
        message = f"{t.label}: {rows} rows in the default partition {t.default.qualified} fall in {rng}, the range of new partition {name}"
        if mode == "fail":
            message += "; move them out, or set on_default_conflict: move (or skip)"
        elif mode == "skip":
            message += "; that partition is left out (on_default_conflict: skip) until they are moved"
        else:
            message += "; moving them into the new partition (on_default_conflict: move)"
        findings.append(Finding("default_partition_rows", t.label, rows, message,
                                {"table": t.label, "conflict": True, "range": rng, "resolution": mode,
                                 "default_partition": t.default.qualified, "partition": name}))
        if mode == "fail" and error is None:
            error = ItemError(t.label, message)
    if t.default_rows and not findings:
        assert t.default is not None
        findings.append(Finding(
            "default_partition_rows", t.label, t.default_rows,
            f"{t.label}: {t.default_rows} rows sit in the default partition {t.default.qualified}, outside any "
            "range pgupkeep is about to create; create partitions for them and move them out",
            {"table": t.label, "conflict": False, "range": None, "resolution": None,
             "default_partition": t.default.qualified},
        ))
    return findings, error


def create_steps(ctx: JobContext, t: Table) -> list[Step]:
    tz, conn = ctx.timezone, ctx.conn
    mode = t.policy.on_default_conflict
    if t.conflicts and mode == "fail":
        return []
    columns = None
    if t.conflicts and mode == "move":
        columns = [r[0] for r in conn.execute(COLUMNS_SQL, (sql.Identifier(*t.name.parts).as_string(conn),))]
    steps = []
    relations = [t.name] + ([QualifiedName(t.default.schema, t.default.name)] if t.default else [])
    for s in t.creates:
        rows = t.conflicts.get(s.lo, 0)
        if rows and mode == "skip":
            continue
        name = t.names[s.lo]
        stmts = create_statements(t, s, name, tz, columns if rows else None)
        detail = {"table": t.label, "range": plan.describe(s.lo, s.hi, t.kind, tz), "interval": t.policy.interval}
        if rows:
            detail |= {"rows": rows, "partition": f"{t.name.schema}.{name}"}
        kind = "move_default_rows" if rows else "create_partition"
        action = Action(kind, f"{t.name.schema}.{name}", _text(conn, stmts), False, detail)
        steps.append(Step(action, stmts, relations, made=Partition(t.name.schema, name, s.lo, s.hi)))
    return steps


def retire_steps(ctx: JobContext, t: Table, cutoff: plan.Bound, current_lo: int) -> list[Step]:
    conn, tz, p = ctx.conn, ctx.timezone, t.policy
    parent = sql.Identifier(*t.name.parts)
    # DETACH ... CONCURRENTLY: 14+, no default partition, outside a transaction block.
    concurrent = conn.info.server_version >= 140000 and t.default is None
    relations = [t.name] + ([QualifiedName(t.default.schema, t.default.name)] if t.default else [])
    steps = []
    # A pending detach is finished first: PostgreSQL allows one per parent at a time.
    old_parts = sorted(plan.retirable(t.parts, cutoff, current_lo), key=lambda q: not q.pending_detach)
    for part in old_parts:
        old = sql.Identifier(part.schema, part.name)
        if part.pending_detach:
            stmts = [sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, old)]
            transaction = False
        elif concurrent:
            stmts = [sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, old)]
            transaction = False
        else:
            stmts = [sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, old)]
            transaction = True
        if p.retention_action == "drop":
            # Dropped once detached: DROP TABLE on an attached partition would lock the parent
            # ACCESS EXCLUSIVE.
            stmts.append(sql.SQL("DROP TABLE {}").format(old))
        detail = {
            "table": t.label,
            "range": plan.describe(part.lo, part.hi, t.kind, tz),
            "retention": str(p.retention),
            "mode": "finalize" if part.pending_detach else ("concurrent" if concurrent else "plain"),
        }
        action = Action(f"{p.retention_action}_partition", part.qualified, _text(conn, stmts), False, detail)
        steps.append(Step(action, stmts, relations + [QualifiedName(part.schema, part.name)], transaction))
    return steps


def _pending(conn: psycopg.Connection, part: QualifiedName) -> bool:
    row = conn.execute(PENDING_SQL, (sql.Identifier(*part.parts).as_string(conn),)).fetchone()
    return bool(row and row[0])


def apply_step(ctx: JobContext, t: Table, step: Step) -> str | None:
    """Run one step; None on success, else the operator's message."""
    try:
        ctx.run_ddl(step.statements, relations=step.relations, transaction=step.transaction)
        return None
    except (LockTimeoutError, psycopg.Error) as exc:
        failure = exc
    if step.action.detail.get("mode") == "concurrent" and _pending(ctx.conn, step.relations[-1]):
        # The first transaction of DETACH ... CONCURRENTLY committed, the wait for older
        # snapshots gave up: the partition is pending detach; FINALIZE completes it.
        parent, old = sql.Identifier(*t.name.parts), sql.Identifier(*step.relations[-1].parts)
        stmts = [sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, old), *step.statements[1:]]
        try:
            ctx.run_ddl(stmts, relations=step.relations, transaction=False)
            return None
        except (LockTimeoutError, psycopg.Error) as exc:
            return (f"{t.label}: {step.action.object} is half detached (pending); the next run finishes it "
                    f"with DETACH PARTITION ... FINALIZE: {str(exc).strip()}")
    what = step.action.action.replace("_", " ")
    return f"{t.label}: {what} {step.action.object} failed: {str(failure).strip()}"


def run(ctx: JobContext) -> JobOutput:
    out = JobOutput()
    tz = ctx.timezone
    tables = read_catalog(ctx.conn, ctx.section.tables) if ctx.section.tables else []
    ok = []
    for t in tables:
        error = validate(t)
        if error:
            out.errors.append(ItemError(t.label, error))
        else:
            ok.append(t)
    read_integer_bases(ctx.conn, [t for t in ok if t.kind == "integer"])
    for t in ok:
        out.findings.extend(plan_table(t, ctx.now, tz))
    # An empty default partition (0 bytes) holds no rows: only non-empty ones are counted.
    probe_defaults(ctx.conn, [t for t in ok if t.default is not None and t.default_bytes > 0])
    assign_names(ctx.conn, ok)
    for t in ok:
        out.extend(run_table(ctx, t))
    out.findings.extend(ctx.lock_findings())
    return out


def run_table(ctx: JobContext, t: Table) -> JobOutput:
    out = JobOutput()
    tz, p = ctx.timezone, t.policy
    findings, error = default_findings(t, tz)
    out.findings.extend(findings)
    if error:
        out.errors.append(error)
    steps = create_steps(ctx, t)
    if p.retention is not None:
        if t.referenced:
            out.errors.append(ItemError(t.label, (
                f"{t.label}: a foreign key references this table, so retiring partitions would break it or "
                "fail; retention is refused: drop the foreign key or remove retention from the policy")))
        else:
            current_lo = t.slots[0].slot.lo
            if isinstance(p.interval, int):
                assert t.base is not None and p.retention.integer is not None
                cutoff: plan.Bound = t.base - p.retention.integer
            else:
                cutoff = plan.time_cutoff(ctx.now, p.retention, t.kind, tz)
            steps.extend(retire_steps(ctx, t, cutoff, current_lo))
    parts = list(t.parts)
    for step in steps:
        if not ctx.apply:
            out.actions.append(step.action)
            continue
        failure = apply_step(ctx, t, step)
        if failure:
            out.actions.append(step.action)
            out.errors.append(ItemError(t.label, failure))
            break  # the table's next steps would meet the same lock or leave a hole
        out.actions.append(Action(step.action.action, step.action.object, step.action.sql, True, step.action.detail))
        if step.made is not None:
            parts.append(step.made)
            t.default_rows -= step.action.detail.get("rows", 0)
        else:
            parts = [q for q in parts if q.qualified != step.action.object]
    out.samples.extend(gauges(ctx, t, parts, out))
    return out


def gauges(ctx: JobContext, t: Table, parts: list[Partition], out: JobOutput) -> list[Sample]:
    """premade / runway / default rows as they stand after this run (before it, in plan mode)."""
    labels = {"table": t.label}
    integer = t.kind == "integer"
    at = t.base if integer else plan.now_key(ctx.now, t.kind, ctx.timezone)
    assert at is not None
    premade, reach = plan.runway(parts, at)
    samples = [Sample("partition_premade", float(premade), labels),
               Sample("partition_default_rows", float(t.default_rows), labels)]
    if not integer:
        samples.append(Sample("partition_runway_seconds", reach / plan.US, labels))
    want = t.policy.runway_warn if t.policy.runway_warn is not None else t.policy.premake
    if premade < want:
        runway = {"runway_keys": reach} if integer else {"runway_seconds": reach / plan.US}
        out.findings.append(Finding(
            "partition_runway_low", t.label, premade,
            f"{t.label}: only {premade} partitions are ready after the current one (want {want}); "
            "see this run's errors or findings for what stopped pgupkeep from creating more",
            {"table": t.label, "premade": premade, "want": want, **runway},
        ))
    return samples


KIND = JobKind(name="partitions", run=run, writes=True)
