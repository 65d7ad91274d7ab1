"""Retirement that survives a crash: a partition past retention is first marked (a COMMENT naming
its parent and the retention_action), then detached (CONCURRENTLY where possible) and, with
`drop`, dropped. Every statement that commits leaves the table in a state a later run can read
back from the catalog: marked and attached (retired again if still due), pending detach
(finished with DETACH ... FINALIZE), detached (dropped, or with `detach` kept and counted).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgupkeep.db import LockTimeoutError
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.partitions import grid
from pgupkeep.jobs.partitions.catalog import Table
from pgupkeep.jobs.partitions.ddl import DdlStep, Interrupted, failure_message, run, text
from pgupkeep.results import Action
from pgupkeep.units import QualifiedName

MARK_PREFIX = "pgupkeep:retire:"
PENDING_SQL = "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass(%s)"


def quoted(name: QualifiedName) -> str:
    """`"schema"."name"`, as TABLES_SQL spells a parent to find the tables marked for it."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.parts)


def mark_text(t: Table, action: str) -> str:
    """The comment that marks a partition being retired: a first line pgupkeep reads back
    (`pgupkeep:retire:<drop|detach>:"schema"."parent"`), then one for people."""
    fate = ("it is dropped once detached; a run that stopped half-way is finished by the next one" if action == "drop"
            else "it is detached and kept: archive or drop it yourself")
    return (f"{MARK_PREFIX}{action}:{quoted(t.name)}\n"
            f"pgupkeep retired this partition of {t.label} (retention_action: {action}); {fate}.")


def _mark(t: Table, relation: sql.Identifier, action: str) -> sql.Composed:
    return sql.SQL("COMMENT ON TABLE {} IS {}").format(relation, sql.Literal(mark_text(t, action)))


def _relations(t: Table, schema: str, name: str) -> list[QualifiedName]:
    default = [QualifiedName(t.default.schema, t.default.name)] if t.default else []
    return [t.name, *default, QualifiedName(schema, name)]


def finish_steps(ctx: JobContext, t: Table) -> list[DdlStep]:
    """Finish what an earlier run's retirement left half-done: a marked partition pending detach
    is finalized, a marked detached one dropped. The table's policy now decides whether it is
    dropped: only when both the mark and the policy say `drop`; otherwise it is kept and marked so
    (counted in pgupkeep_partitions_detached)."""
    if not t.marked:
        return []
    p, conn = t.policy, ctx.conn
    drop_now = p.retention is not None and p.retention_action == "drop"
    pending = {q.qualified for q in t.parts if q.pending_detach}
    parent = sql.Identifier(*t.name.parts)
    steps = []
    for m in t.marked:
        if m.is_partition and m.qualified not in pending:
            continue  # attached (retired again when due), or another table's partition now
        old = sql.Identifier(m.schema, m.name)
        stmts, points = [], []
        if m.is_partition:
            stmts.append(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, old))
            points.append("finalized")
        drop = m.action == "drop" and drop_now
        if drop:
            stmts.append(sql.SQL("DROP TABLE {}").format(old))
            points.append("dropped")
        elif m.action == "drop":
            stmts.append(_mark(t, old, "detach"))
            points.append("marked")
        if not stmts:
            continue  # detached and kept: done
        detail = {"table": t.label, "state": "pending" if m.is_partition else "detached",
                  "retention_action": "drop" if drop else "detach"}
        action = Action("finish_retirement", m.qualified, text(conn, stmts), False, detail)
        steps.append(DdlStep(action, stmts, _relations(t, m.schema, m.name), transaction=False, points=points,
                             retired=m.qualified, detached_if_done=not drop))
    return steps


def retire_steps(ctx: JobContext, t: Table, cutoff: grid.Bound, current_lo: grid.Bound) -> list[DdlStep]:
    conn, tz, p = ctx.conn, ctx.timezone, t.policy
    parent = sql.Identifier(*t.name.parts)
    # DETACH ... CONCURRENTLY: 14+, no default partition, outside a transaction block.
    concurrent = conn.info.server_version >= 140000 and t.default is None
    finishing = {m.qualified for m in t.marked}
    steps = []
    # A pending detach is finished first: PostgreSQL allows one per parent at a time.
    old_parts = sorted(grid.retirable(t.parts, cutoff, current_lo), key=lambda q: not q.pending_detach)
    for part in old_parts:
        if part.pending_detach and part.qualified in finishing:
            continue  # a finish step takes it
        old = sql.Identifier(part.schema, part.name)
        stmts = [_mark(t, old, p.retention_action)]
        if part.pending_detach:
            stmts.append(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, old))
            transaction, points = False, ["marked", "finalized"]
        elif concurrent:
            stmts.append(sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, old))
            transaction, points = False, ["marked", "detached"]
        else:
            stmts.append(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, old))
            transaction, points = True, []
        if p.retention_action == "drop":
            # Dropped once detached: DROP TABLE on an attached partition would lock the parent
            # ACCESS EXCLUSIVE.
            stmts.append(sql.SQL("DROP TABLE {}").format(old))
            points += [] if transaction else ["dropped"]
        detail = {
            "table": t.label,
            "range": grid.describe(part.lo, part.hi, t.kind, tz),
            "retention": str(p.retention),
            "mode": "finalize" if part.pending_detach else ("concurrent" if concurrent else "plain"),
        }
        action = Action(f"{p.retention_action}_partition", part.qualified, text(conn, stmts), False, detail)
        steps.append(DdlStep(action, stmts, _relations(t, part.schema, part.name), transaction, points,
                             retired=part.qualified, detached_if_done=p.retention_action == "detach"))
    return steps


def _pending(conn: psycopg.Connection, part: QualifiedName) -> bool:
    row = conn.execute(PENDING_SQL, (sql.Identifier(*part.parts).as_string(conn),)).fetchone()
    return bool(row and row[0])


def apply_step(ctx: JobContext, t: Table, step: DdlStep) -> str | None:
    """Run one step; None on success, else the operator's message, which says what state a
    retirement was left in (every such state is finished by the next run)."""
    try:
        run(ctx, step)
        return None
    except Interrupted as stop:
        return _interrupted(ctx, t, step, stop)
    except (LockTimeoutError, psycopg.Error) as exc:
        return failure_message(t, step, exc)


def _interrupted(ctx: JobContext, t: Table, step: DdlStep, stop: Interrupted) -> str | None:
    point, part = step.points[stop.done], step.relations[-1]
    cause = str(stop.cause).strip()
    if point == "detached" and _pending(ctx.conn, part):
        # The first transaction of DETACH ... CONCURRENTLY committed, the wait for older
        # snapshots gave up: the partition is pending detach; FINALIZE completes it.
        finalize = sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(
            sql.Identifier(*t.name.parts), sql.Identifier(*part.parts))
        try:
            run(ctx, step, [finalize, *step.statements[stop.done + 1 :]], ["finalized", *step.points[stop.done + 1 :]])
            return None
        except Interrupted as again:
            if again.done == 0:
                return (f"{t.label}: {step.action.object} is half detached (pending) and marked as being retired; "
                        f"the next run finishes it with DETACH PARTITION ... FINALIZE: {str(again.cause).strip()}")
            cause = str(again.cause).strip()
            point = "dropped"
    if point == "dropped":
        return (f"{t.label}: {step.action.object} was detached but not dropped: {cause}; it is marked as being retired "
                "and the next run drops it (finish_retirement)")
    if point == "finalized":
        return (f"{t.label}: {step.action.object} is still pending detach: {cause}; it is marked as being retired and "
                "the next run finishes it with DETACH PARTITION ... FINALIZE")
    return failure_message(t, step, stop.cause)


def detached_after(t: Table, steps: list[DdlStep]) -> int:
    """Tables of this parent detached and kept once this run's steps ran (as read, in plan mode)."""
    kept = {m.qualified for m in t.marked if not m.is_partition}
    for step in steps:
        if step.retired is None or step.detached is None:
            continue
        if step.detached:
            kept.add(step.retired)
        else:
            kept.discard(step.retired)
    return len(kept)

