"""The `bloat` job: flag tables with many dead tuples or much wasted space, optionally VACUUM them.

One catalog query estimates every table (estimate.py); `pgstattuple_approx`, where installed,
re-measures the worst candidates under a time budget; flagged tables may get `VACUUM (ANALYZE)`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgupkeep.db import LockTimeoutError, read_past_exclusive_locks
from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.bloat.estimate import (
    SETTINGS_SQL,
    TABLES_SQL,
    Settings,
    TableBloat,
    TableRow,
    approx_wasted,
    estimate,
    rank_key,
    rollup,
    row_from_record,
    settings_from_rows,
)
from pgupkeep.policy import BloatSection
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Plan, Sample, Step
from pgupkeep.units import QualifiedName

APPROX_SCHEMA_SQL = """
SELECT n.nspname
FROM pg_extension e
JOIN pg_namespace n ON n.oid = e.extnamespace
JOIN pg_proc p ON p.pronamespace = n.oid AND p.proname = 'pgstattuple_approx'
WHERE e.extname = 'pgstattuple'
LIMIT 1
"""
APPROX_SQL = "SELECT table_len, dead_tuple_len, approx_free_space FROM {}(%s::oid::regclass)"
MIN_APPROX_SECONDS = 0.05  # below this a call cannot finish; keep the estimate

REMEDY_VACUUM = "VACUUM (ANALYZE) {t} makes the dead tuples' space reusable"
REMEDY_REPACK = (
    "VACUUM does not return free space inside the table to the operating system: run pg_repack "
    "(online) or VACUUM FULL (takes an ACCESS EXCLUSIVE lock) in a maintenance window; pgupkeep never runs either"
)
REMEDY_OVERDUE = (
    "autovacuum is overdue by the table's own threshold: check for busy autovacuum workers, "
    "long transactions holding back the xmin horizon, or autovacuum disabled on the table"
)


@dataclass
class Judgement:
    findings: list[Finding] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    vacuum: list[TableBloat] = field(default_factory=list)


# --------------------------------------------------------------------------- read


def read_tables(conn: psycopg.Connection) -> tuple[list[TableRow], Settings]:
    settings = settings_from_rows(conn.execute(SETTINGS_SQL).fetchall())

    def read() -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(TABLES_SQL).fetchall()

    return [row_from_record(r) for r in read_past_exclusive_locks(read)], settings


def approx_function(conn: psycopg.Connection) -> sql.Identifier | None:
    """pgstattuple_approx, schema-qualified, if the extension is installed in this database."""
    row = conn.execute(APPROX_SCHEMA_SQL).fetchone()
    return sql.Identifier(row[0], "pgstattuple_approx") if row else None


def approx_candidates(tables: Sequence[TableBloat], section: BloatSection) -> list[TableBloat]:
    """Worst first: tables near or over a threshold, and every table that may get a series."""
    ranked = sorted(tables, key=rank_key)
    return [
        t
        for i, t in enumerate(ranked)
        if i < section.report_top or dead_flagged(t, section) or t.bloat_ratio >= section.max_bloat_ratio / 2
    ]


def refine(
    conn: psycopg.Connection,
    tables: Sequence[TableBloat],
    section: BloatSection,
    settings: Settings,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Replace estimates by pgstattuple_approx figures, worst candidates first, within the budget."""
    budget = section.exact_time_budget.total_seconds()
    fn = approx_function(conn) if budget > 0 else None
    if fn is None:
        return
    query = sql.SQL(APPROX_SQL).format(fn)
    deadline = clock() + budget
    for t in approx_candidates(tables, section):
        remaining = deadline - clock()
        if remaining < MIN_APPROX_SECONDS:
            return
        try:
            with conn.transaction():
                # The call may not outlive what is left of the budget.
                conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(int(remaining * 1000)),))
                row = conn.execute(query, (t.oid,)).fetchone()
        except psycopg.errors.QueryCanceled:
            return  # budget spent
        except psycopg.errors.InsufficientPrivilege:
            return  # needs superuser or pg_stat_scan_tables: the estimates stand
        except psycopg.Error:
            continue  # locked meanwhile (lock_timeout) or dropped: keep this table's estimate
        if row is None:
            continue
        table_len, dead_len, free = (int(v) for v in row)
        t.size_bytes = table_len
        t.bloat_bytes = approx_wasted(table_len, dead_len, free, t.fillfactor, settings.block_size)
        t.method, t.basis = "pgstattuple_approx", "measured"


# --------------------------------------------------------------------------- plan (pure)


def dead_flagged(t: TableBloat, section: BloatSection) -> bool:
    return t.dead_tuples >= section.min_dead_tuples and t.dead_tuple_ratio > section.max_dead_tuple_ratio


def space_flagged(t: TableBloat, section: BloatSection) -> bool:
    return t.bloat_ratio > section.max_bloat_ratio


def remedy(t: TableBloat, section: BloatSection) -> str:
    parts = []
    if t.partitions:
        parts.append("act on the flagged partitions")
    elif t.dead_tuples >= section.min_dead_tuples:
        parts.append(REMEDY_VACUUM.format(t=t.table))
    if space_flagged(t, section):
        parts.append(REMEDY_REPACK)
    if t.autovacuum_overdue:
        parts.append(REMEDY_OVERDUE)
    return "; ".join(parts)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def finding(t: TableBloat, section: BloatSection, vacuum: str) -> Finding:
    text = remedy(t, section)
    detail = {
        "table": t.table,
        "size_bytes": t.size_bytes,
        "dead_tuples": t.dead_tuples,
        "dead_tuple_ratio": round(t.dead_tuple_ratio, 4),
        "bloat_ratio": round(t.bloat_ratio, 4),
        "bloat_bytes": t.bloat_bytes,
        "method": t.method,
        "estimate_basis": t.basis,
        "last_vacuum": _iso(t.last_vacuum),
        "last_autovacuum": _iso(t.last_autovacuum),
        "autovacuum_overdue": t.autovacuum_overdue,
        "over": [name for name, hit in (("dead_tuples", dead_flagged(t, section)), ("bloat", space_flagged(t, section))) if hit],
        "vacuum": vacuum,
        "remedy": text,
    }
    if t.partitions:
        detail["partitions"] = t.partitions
    return Finding(
        kind="bloated_table",
        object=t.table,
        value=round(t.bloat_ratio, 4),
        message=(
            f"{t.table}: {t.bloat_ratio:.0%} of {t.size_bytes} bytes wasted ({t.method}), "
            f"{t.dead_tuples} dead tuples ({t.dead_tuple_ratio:.0%}); {text}"
        ),
        detail=detail,
    )


def skipped_finding(row: TableRow) -> Finding:
    state = "held" if row.lock_granted else "awaited"
    return Finding(
        kind="table_skipped_locked",
        object=row.qualified,
        value=None,
        message=(
            f"{row.qualified}: skipped, an ACCESS EXCLUSIVE lock is {state} by pids {list(row.lock_pids)}; "
            "measuring it would wait behind that lock. It is measured again on the next run"
        ),
        detail={"table": row.qualified, "lock": state, "blocking_pids": list(row.lock_pids)},
    )


def judge(
    tables: Sequence[TableBloat],
    rollups: Sequence[TableBloat],
    section: BloatSection,
    *,
    standby: bool,
) -> Judgement:
    """Findings, gauges and the tables to vacuum, from measured tables (already >= min_table_size).

    Roll-ups (partition trees) are flagged and ranked like tables but never counted in
    `bloated_tables` and never vacuumed themselves: their flagged partitions are.
    """
    out = Judgement()
    flagged = [t for t in sorted(tables, key=rank_key) if dead_flagged(t, section) or space_flagged(t, section)]
    # VACUUM helps only where there are dead tuples to reclaim; space without them needs a rewrite.
    to_vacuum = [t for t in flagged if t.dead_tuples >= section.min_dead_tuples]
    if section.vacuum and not standby:
        out.vacuum = to_vacuum
    vacuum_names = {t.table for t in out.vacuum}
    for t in flagged:
        if t.table in vacuum_names:
            state = "planned"
        elif not section.vacuum:
            state = "off"
        elif standby and t in to_vacuum:
            state = "skipped_standby"
        else:
            state = "not_useful"
        out.findings.append(finding(t, section, state))
    for r in sorted(rollups, key=rank_key):
        if dead_flagged(r, section) or space_flagged(r, section):
            out.findings.append(finding(r, section, "partitions"))
    out.samples.append(Sample("bloated_tables", float(len(flagged))))
    for t in sorted([*tables, *rollups], key=rank_key)[: section.report_top]:
        labels = {"table": t.table}
        out.samples += [
            Sample("table_dead_tuples", float(t.dead_tuples), labels),
            Sample("table_dead_tuple_ratio", round(t.dead_tuple_ratio, 6), labels),
            Sample("table_bloat_ratio", round(t.bloat_ratio, 6), labels),
            Sample("table_bloat_bytes", float(t.bloat_bytes), labels),
        ]
    return out


# --------------------------------------------------------------------------- apply


def vacuum_sql(t: TableBloat) -> sql.Composed:
    assert t.ident is not None
    return sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(*t.ident))


class _VacuumSession:
    """One session for all of a run's VACUUMs, opened at the first, with the vacuum timeout; it
    collects the WARNINGs by which VACUUM says it skipped a table."""

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.conn: psycopg.Connection | None = None
        self.warnings: list[str] = []

    def get(self) -> psycopg.Connection:
        if self.conn is None:
            ctx = self.ctx
            self.conn = ctx.connect(statement_timeout=ctx.section.vacuum_timeout) if ctx.connect else ctx.conn
            self.conn.add_notice_handler(
                lambda d: self.warnings.append(d.message_primary or "") if d.severity_nonlocalized == "WARNING" else None
            )
        return self.conn

    def close(self) -> None:
        if self.conn is not None and self.conn is not self.ctx.conn:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()


def vacuum_step(ctx: JobContext, t: TableBloat, session: _VacuumSession) -> Step:
    """VACUUM (ANALYZE) one table (never FULL)."""
    assert t.ident is not None
    stmt = vacuum_sql(t)
    text = stmt.as_string(ctx.conn)

    def apply() -> JobOutput:
        conn = session.get()
        session.warnings.clear()
        failed = JobOutput(actions=[_action(t, text, applied=False, outcome="failure")])
        try:
            # VACUUM cannot run in a transaction block; the session is autocommit.
            ctx.run_ddl([stmt], relations=[QualifiedName(*t.ident)], transaction=False, conn=conn)
        except LockTimeoutError as exc:
            failed.errors.append(ItemError(t.table, f"{exc}; VACUUM will be tried again on the next run"))
            return failed
        except psycopg.errors.QueryCanceled:
            failed.errors.append(ItemError(
                t.table, f"{t.table}: VACUUM did not finish within vacuum_timeout; raise vacuum_timeout or vacuum it by hand"))
            return failed
        except psycopg.Error as exc:
            failed.errors.append(ItemError(t.table, f"{t.table}: VACUUM failed: {str(exc).strip()}"))
            return failed
        skipped = [w for w in session.warnings if "skipping" in w]
        if skipped:
            # Not the owner (nor MAINTAIN): VACUUM only warns and does nothing.
            failed.errors.append(ItemError(
                t.table, f"{t.table}: VACUUM skipped it ({skipped[0]}); grant the pgupkeep role ownership or MAINTAIN"))
            return failed
        return JobOutput(actions=[_action(t, text, applied=True, outcome="success")])

    return Step(_action(t, text, applied=False), apply, item=t.table)


def _action(t: TableBloat, text: str, *, applied: bool, outcome: str | None = None) -> Action:
    detail: dict[str, object] = {"table": t.table, "dead_tuples": t.dead_tuples, "bloat_ratio": round(t.bloat_ratio, 4)}
    if outcome:
        detail["outcome"] = outcome
    return Action(action="vacuum_table", object=t.table, sql=text, applied=applied, detail=detail)


# --------------------------------------------------------------------------- run


def assess(
    conn: psycopg.Connection, section: BloatSection, clock: Callable[[], float] = time.monotonic
) -> tuple[list[TableBloat], list[TableBloat], list[Finding]]:
    """(tables >= min_table_size, partition-tree roll-ups >= min_table_size, skipped-locked findings)."""
    rows, settings = read_tables(conn)
    skipped = [
        skipped_finding(r)
        for r in rows
        if r.size_bytes is None and r.lock_granted is not None and r.relpages * settings.block_size >= section.min_table_size
    ]
    measured = [estimate(r, settings) for r in rows if r.size_bytes is not None]
    tables = [t for t in measured if t.size_bytes >= section.min_table_size]
    refine(conn, tables, section, settings, clock)
    # Partitions count per partition, and every measured partition counts in its tree's total.
    rollups = [r for r in rollup(measured) if r.size_bytes >= section.min_table_size]
    return tables, rollups, skipped


def plan(ctx: JobContext) -> Plan:
    section: BloatSection = ctx.section
    tables, rollups, skipped = assess(ctx.conn, section)
    j = judge(tables, rollups, section, standby=ctx.standby)
    session = _VacuumSession(ctx)

    def settle(applied: Sequence[Step]) -> JobOutput:
        session.close()
        return JobOutput()

    steps = [vacuum_step(ctx, t, session) for t in j.vacuum]
    return Plan(steps=steps, findings=[*j.findings, *skipped], samples=j.samples, settle=settle)


KIND = JobKind(name="bloat", plan=plan, writes=False)
