"""The partitions job's DDL: create-then-attach (optionally moving default-partition rows in the same
transaction), and retirement by DETACH [CONCURRENTLY | FINALIZE] and DROP; each change is one
short, lock-bounded step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from pgupkeep.db import LockTimeoutError
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.partitions import grid
from pgupkeep.jobs.partitions.catalog import Table
from pgupkeep.jobs.partitions.grid import Partition, Slot
from pgupkeep.results import Action, Step
from pgupkeep.units import QualifiedName

PENDING_SQL = "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass(%s)"
# Detached and still there: a plain table no longer under the parent (a drop step failed after its
# detach had committed).
DETACHED_SQL = "SELECT NOT relispartition FROM pg_class WHERE oid = to_regclass(%s)"
COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
ORDER BY attnum
"""
LIKE_OPTIONS = sql.SQL(
    "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS "
    "INCLUDING GENERATED INCLUDING COMPRESSION"
)


def _bound(value: grid.Bound, kind: str, tz: ZoneInfo) -> sql.Composable:
    text = grid.literal(value, kind, tz)
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
    check = sql.Identifier(grid.partition_name(name, "bounds"))
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
class DdlStep:
    """One short unit of DDL for one table: its action, statements and how to run them."""

    action: Action
    statements: list[sql.Composed]
    relations: list[QualifiedName]
    transaction: bool = True
    made: Partition | None = None  # the partition a create step adds
    step: Step | None = None  # the runner's step that applies it


def create_steps(ctx: JobContext, t: Table) -> list[DdlStep]:
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
        detail = {"table": t.label, "range": grid.describe(s.lo, s.hi, t.kind, tz), "interval": t.policy.interval}
        if rows:
            detail |= {"rows": rows, "partition": f"{t.name.schema}.{name}"}
        kind = "move_default_rows" if rows else "create_partition"
        action = Action(kind, f"{t.name.schema}.{name}", _text(conn, stmts), False, detail)
        steps.append(DdlStep(action, stmts, relations, made=Partition(t.name.schema, name, s.lo, s.hi)))
    return steps


def retire_steps(ctx: JobContext, t: Table, cutoff: grid.Bound, current_lo: int) -> list[DdlStep]:
    conn, tz, p = ctx.conn, ctx.timezone, t.policy
    parent = sql.Identifier(*t.name.parts)
    # DETACH ... CONCURRENTLY: 14+, no default partition, outside a transaction block.
    concurrent = conn.info.server_version >= 140000 and t.default is None
    relations = [t.name] + ([QualifiedName(t.default.schema, t.default.name)] if t.default else [])
    steps = []
    # A pending detach is finished first: PostgreSQL allows one per parent at a time.
    old_parts = sorted(grid.retirable(t.parts, cutoff, current_lo), key=lambda q: not q.pending_detach)
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
            "range": grid.describe(part.lo, part.hi, t.kind, tz),
            "retention": str(p.retention),
            "mode": "finalize" if part.pending_detach else ("concurrent" if concurrent else "plain"),
        }
        action = Action(f"{p.retention_action}_partition", part.qualified, _text(conn, stmts), False, detail)
        steps.append(DdlStep(action, stmts, relations + [QualifiedName(part.schema, part.name)], transaction))
    return steps


def _pending(conn: psycopg.Connection, part: QualifiedName) -> bool:
    row = conn.execute(PENDING_SQL, (sql.Identifier(*part.parts).as_string(conn),)).fetchone()
    return bool(row and row[0])


def _left_detached(ctx: JobContext, t: Table, step: DdlStep, failure: Exception) -> str | None:
    """The message for a drop step whose DETACH committed but whose DROP failed: pgupkeep no longer
    sees that table (it is not a partition), so the operator must drop it."""
    if step.action.action != "drop_partition" or step.transaction:
        return None
    part = step.relations[-1]
    row = ctx.conn.execute(DETACHED_SQL, (sql.Identifier(*part.parts).as_string(ctx.conn),)).fetchone()
    if not (row and row[0]):
        return None
    return (f"{t.label}: {step.action.object} was detached but not dropped: {str(failure).strip()}; it is now a "
            "plain table outside the partitioned table, which pgupkeep no longer manages: drop it by hand "
            f"(DROP TABLE {sql.Identifier(*part.parts).as_string(ctx.conn)})")


def apply_step(ctx: JobContext, t: Table, step: DdlStep) -> str | None:
    """Run one step; None on success, else the operator's message."""
    try:
        ctx.run_ddl(step.statements, relations=step.relations, transaction=step.transaction)
        return None
    except (LockTimeoutError, psycopg.Error) as exc:
        failure = exc
    if left := _left_detached(ctx, t, step, failure):
        return left
    if step.action.detail.get("mode") == "concurrent" and _pending(ctx.conn, step.relations[-1]):
        # The first transaction of DETACH ... CONCURRENTLY committed, the wait for older
        # snapshots gave up: the partition is pending detach; FINALIZE completes it.
        parent, old = sql.Identifier(*t.name.parts), sql.Identifier(*step.relations[-1].parts)
        stmts = [sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, old), *step.statements[1:]]
        try:
            ctx.run_ddl(stmts, relations=step.relations, transaction=False)
            return None
        except (LockTimeoutError, psycopg.Error) as exc:
            if left := _left_detached(ctx, t, step, exc):
                return left
            return (f"{t.label}: {step.action.object} is half detached (pending); the next run finishes it "
                    f"with DETACH PARTITION ... FINALIZE: {str(exc).strip()}")
    what = step.action.action.replace("_", " ")
    message = f"{t.label}: {what} {step.action.object} failed: {str(failure).strip()}"
    if isinstance(failure, psycopg.errors.CheckViolation) and step.made is not None:
        # ATTACH re-checks the default partition under its lock, so rows that arrived after the
        # count never end up outside their partition's bounds; the step rolled back whole.
        message += ("; rows in its range reached the default partition after pgupkeep counted them: "
                    "the next run counts again and applies on_default_conflict")
    return message
