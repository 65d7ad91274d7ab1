"""The partitions job's DDL steps and how they run: create-then-attach (optionally moving
default-partition rows in the same transaction), each new partition given its parent's owner,
grants, replica identity and the policy's storage parameters before it is attached. Retirement
steps are built in retirement.py and run here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from pgupkeep import reloptions
from pgupkeep.db import LockTimeoutError
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.partitions import grid, privileges
from pgupkeep.jobs.partitions.catalog import Table
from pgupkeep.jobs.partitions.grid import Partition, Slot
from pgupkeep.results import Action, Step
from pgupkeep.units import QualifiedName

COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
ORDER BY attnum
"""
LIKE_OPTIONS = sql.SQL(
    "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS "
    "INCLUDING GENERATED INCLUDING COMPRESSION"
)


def _noop(relation: str, point: str) -> None:
    return None


# Called each time a step has committed a statement (or its whole transaction, "committed") with
# the relation it is about and the point reached: "marked", "detached", "finalized", "dropped".
# The crash tests replace it to kill the process at a named point; it does nothing otherwise.
reached: Callable[[str, str], None] = _noop


def bound(value: grid.Bound, kind: str, tz: ZoneInfo) -> sql.Composable:
    text = grid.literal(value, kind, tz)
    if kind == "integer" or text in ("MINVALUE", "MAXVALUE"):
        return sql.SQL(text)
    return sql.Literal(text.strip("'"))


def _cond(t: Table, lo: grid.Bound, hi: grid.Bound, tz: ZoneInfo) -> sql.Composed:
    k = sql.Identifier(t.key_name)
    parts = [sql.SQL("{} >= {}").format(k, bound(lo, t.kind, tz))] if lo != -math.inf else []
    parts += [sql.SQL("{} < {}").format(k, bound(hi, t.kind, tz))] if hi != math.inf else []
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def storage_clause(t: Table) -> sql.Composable:
    params = t.policy.storage_parameters
    values = params.model_dump(by_alias=True, exclude_none=True) if params is not None else {}
    if not values:
        return sql.SQL("")
    return sql.SQL(" WITH ({})").format(
        sql.SQL(", ").join(sql.SQL(f"{name} = {reloptions.sql_value(v)}") for name, v in values.items())
    )


def storage_problem(t: Table, server_version: int) -> str | None:
    """A storage parameter this server does not know yet, as the operator's message."""
    params = t.policy.storage_parameters
    if params is None:
        return None
    for name in params.model_dump(by_alias=True, exclude_none=True):
        since = reloptions.RELOPTIONS[name].since
        if server_version < since:
            return (f"{t.label}: storage parameter {name} needs PostgreSQL {since // 10000} or later and the server "
                    f"runs {server_version // 10000}; remove it from storage_parameters")
    return None


def create_statements(t: Table, slot: Slot, name: str, tz: ZoneInfo, columns: Sequence[str] | None = None) -> list[sql.Composed]:
    """A standalone table shaped like the parent, made the parent's in owner, grants and replica
    identity, then ATTACHed (SHARE UPDATE EXCLUSIVE on the parent, where CREATE TABLE ...
    PARTITION OF takes ACCESS EXCLUSIVE), all in one transaction. With `columns`, the default
    partition's rows in the range move in that transaction too, so readers see them either in the
    default partition or in the attached new one, never nowhere; the partition comes out as any
    other."""
    parent = sql.Identifier(*t.name.parts)
    new = sql.Identifier(t.name.schema, name)
    r = t.rights
    create = sql.SQL("CREATE TABLE {} (LIKE {} {}){}").format(new, parent, LIKE_OPTIONS, storage_clause(t))
    if t.tablespace:
        create = sql.SQL("{} TABLESPACE {}").format(create, sql.Identifier(t.tablespace))
    shape = [create]
    if r.owner and r.owner != r.role:
        shape.append(sql.SQL("ALTER TABLE {} OWNER TO {}").format(new, sql.Identifier(r.owner)))
    if t.policy.inherit_privileges:
        shape += privileges.grant_statements(r.grants, new)
    shape += privileges.identity_before_attach(r, new)
    attach = sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
        parent, new, bound(slot.lo, t.kind, tz), bound(slot.hi, t.kind, tz)
    )
    after = privileges.identity_after_attach(r, t.name.schema, new)
    if columns is None:
        return [*shape, attach, *after]
    assert t.default is not None
    check = sql.Identifier(grid.partition_name(name, "bounds"))
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    return [
        *shape,
        # The constraint lets ATTACH skip its validation scan of the new table under the lock.
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL AND {})").format(
            new, check, sql.Identifier(t.key_name), _cond(t, slot.lo, slot.hi, tz)
        ),
        sql.SQL("WITH moved AS (DELETE FROM {} WHERE {} RETURNING {}) INSERT INTO {} ({}) SELECT {} FROM moved").format(
            sql.Identifier(t.default.schema, t.default.name), _cond(t, slot.lo, slot.hi, tz), cols, new, cols, cols
        ),
        attach,
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(new, check),
        *after,
    ]


def text(conn: psycopg.Connection, statements: Sequence[sql.Composable]) -> str:
    return ";\n".join(s.as_string(conn) for s in statements) + ";"


@dataclass
class DdlStep:
    """One short unit of DDL for one table: its action, statements and how to run them.

    A step that is not one transaction commits statement by statement; `points` names what each
    one reached ("marked", "detached", ...), so a failure or a crash half-way is known exactly."""

    action: Action
    statements: list[sql.Composed]
    relations: list[QualifiedName]
    transaction: bool = True
    points: list[str] = field(default_factory=list)
    made: Partition | None = None  # the partition a create step adds
    retired: str | None = None  # the relation a retire or finish step is about
    detached_if_done: bool = False  # that relation is left detached (kept) once the step is done
    detached: bool | None = None  # set when run: the relation is detached and kept (True) or not (False)
    step: Step | None = None  # the runner's step that applies it


def create_steps(ctx: JobContext, t: Table) -> list[DdlStep]:
    """One step per range to create. A range the default partition holds rows of is withheld
    (fail, skip) or gets them moved in (move); the ranges after it are created regardless."""
    tz, conn = ctx.timezone, ctx.conn
    mode = t.policy.on_default_conflict
    columns = None
    if t.conflicts and mode == "move":
        columns = [r[0] for r in conn.execute(COLUMNS_SQL, (sql.Identifier(*t.name.parts).as_string(conn),))]
    steps = []
    relations = [t.name] + ([QualifiedName(t.default.schema, t.default.name)] if t.default else [])
    for s in t.creates:
        rows = t.conflicts.get(s.lo, 0)
        if rows and mode != "move":
            continue
        name = t.names[s.lo]
        stmts = create_statements(t, s, name, tz, columns if rows else None)
        detail = {"table": t.label, "range": grid.describe(s.lo, s.hi, t.kind, tz), "interval": t.policy.interval}
        if rows:
            detail |= {"rows": rows, "partition": f"{t.name.schema}.{name}"}
        kind = "move_default_rows" if rows else "create_partition"
        action = Action(kind, f"{t.name.schema}.{name}", text(conn, stmts), False, detail)
        steps.append(DdlStep(action, stmts, relations, made=Partition(t.name.schema, name, s.lo, s.hi)))
    return steps


class Interrupted(Exception):
    """A step that commits statement by statement stopped after `done` of them."""

    def __init__(self, done: int, cause: Exception):
        super().__init__(str(cause))
        self.done = done
        self.cause = cause


def run(ctx: JobContext, step: DdlStep, statements: Sequence[sql.Composed] | None = None,
        points: Sequence[str] | None = None) -> None:
    """Run a step's statements (or the given tail of them), telling `reached` each commit."""
    statements = step.statements if statements is None else statements
    points = step.points if points is None else points
    if step.transaction:
        ctx.run_ddl(statements, relations=step.relations, transaction=True)
        if step.retired:
            step.detached = step.detached_if_done
        reached(step.action.object, "committed")
        return
    for i, (stmt, point) in enumerate(zip(statements, points, strict=True)):
        try:
            ctx.run_ddl([stmt], relations=step.relations, transaction=False)
        except (LockTimeoutError, psycopg.Error) as exc:
            raise Interrupted(i, exc) from exc
        if point in ("detached", "finalized"):
            step.detached = True
        elif point == "dropped":
            step.detached = False
        reached(step.action.object, point)


def failure_message(t: Table, step: DdlStep, failure: Exception) -> str:
    what = step.action.action.replace("_", " ")
    message = f"{t.label}: {what} {step.action.object} failed: {str(failure).strip()}"
    if isinstance(failure, psycopg.errors.CheckViolation) and step.made is not None:
        # ATTACH re-checks the default partition under its lock, so rows that arrived after the
        # count never end up outside their partition's bounds; the step rolled back whole.
        message += ("; rows in its range reached the default partition after pgupkeep counted them: "
                    "the next run counts again and applies on_default_conflict")
    return message
