"""The `bloat` job: flag tables (heap and TOAST) with many dead tuples or much wasted space, and
B-tree indexes with much wasted space; optionally VACUUM the tables and REINDEX the indexes.

Set-based catalog reads estimate every table and index (catalog.py, estimate.py, indexes.py);
`pgstattuple_approx` and `pgstatindex`, where allowed, re-measure the worst candidates under a
time budget (measure.py); flagged tables may get `VACUUM (ANALYZE)` (vacuum.py), flagged and
invalid indexes `REINDEX INDEX CONCURRENTLY` inside the window (reindex.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.bloat.catalog import Settings, TableRow, read_settings, read_tables
from pgupkeep.jobs.bloat.estimate import TableBloat, estimate, rank_key, rollup
from pgupkeep.jobs.bloat.indexes import (
    IndexBloat,
    IndexRow,
    estimate_index,
    index_rank_key,
    read_indexes,
)
from pgupkeep.jobs.bloat.measure import functions, refine
from pgupkeep.jobs.bloat.reindex import (
    Rebuild,
    in_window,
    rebuild_steps,
    reindex_sql,
    reindex_state,
)
from pgupkeep.jobs.bloat.vacuum import VacuumSession, vacuum_step
from pgupkeep.policy import BloatSection
from pgupkeep.results import Finding, JobOutput, Plan, Sample, Step

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
class Assessment:
    tables: list[TableBloat] = field(default_factory=list)  # >= min_table_size
    rollups: list[TableBloat] = field(default_factory=list)  # partition trees >= min_table_size
    indexes: list[IndexBloat] = field(default_factory=list)  # valid B-trees >= min_index_size
    index_rows: list[IndexRow] = field(default_factory=list)  # every index read (invalid ones too)
    findings: list[Finding] = field(default_factory=list)  # skipped (locked), measurement limits


@dataclass
class Judgement:
    findings: list[Finding] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    vacuum: list[TableBloat] = field(default_factory=list)
    rebuild: list[Rebuild] = field(default_factory=list)
    leftovers: list[IndexRow] = field(default_factory=list)


# --------------------------------------------------------------------------- read and measure


def assess(
    conn: psycopg.Connection, section: BloatSection, clock: Callable[[], float] = time.monotonic,
    memo: dict[str, Any] | None = None,
) -> Assessment:  # fmt: skip
    memo = {} if memo is None else memo
    settings = read_settings(conn)
    rows = read_tables(conn, section.min_table_size, settings, memo)
    out = Assessment()
    out.findings += [
        skipped_finding(r) for r in rows
        if r.size_bytes is None and r.lock_granted is not None and r.relpages * settings.block_size >= section.min_table_size
    ]  # fmt: skip
    measured = [estimate(r, settings) for r in rows if r.size_bytes is not None]
    out.tables = [t for t in measured if t.size_bytes >= section.min_table_size]
    grown = [r.oid for r in rows if r.size_bytes is not None and _grown(r)]
    out.index_rows = read_indexes(conn, section.min_index_size, grown, settings, memo)
    out.findings += [
        index_skipped_finding(i) for i in out.index_rows
        if i.size_bytes is None and i.lock_granted is not None and i.relpages * settings.block_size >= section.min_index_size
    ]  # fmt: skip
    out.indexes = [
        estimate_index(i, settings) for i in out.index_rows
        if i.am == "btree" and i.valid and not i.transient and i.size_bytes is not None and i.size_bytes >= section.min_index_size
    ]  # fmt: skip
    fns = functions(conn, section)
    out.findings += fns.findings
    refine(conn, out.tables, out.indexes, section, settings, fns, clock)
    # Partitions count per partition, and every measured partition counts in its tree's total.
    out.rollups = [r for r in rollup(measured) if r.size_bytes >= section.min_table_size]
    return out


def _grown(r: TableRow) -> bool:
    return r.n_live_tup + r.n_dead_tup > 2 * max(r.reltuples, 0) + 1000


# --------------------------------------------------------------------------- judge (pure)


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
    detail: dict[str, Any] = {
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
    if t.heap is not None:
        detail["heap"] = t.heap.to_dict()
        detail["toast"] = t.toast.to_dict() if t.toast is not None else None
    if t.partitions:
        detail["partitions"] = t.partitions
    parts = ""
    if t.toast is not None and t.toast.size_bytes and t.heap is not None:
        parts = f" (heap {t.heap.bloat_bytes} of {t.heap.size_bytes}, TOAST {t.toast.bloat_bytes} of {t.toast.size_bytes})"
    return Finding(
        kind="bloated_table",
        object=t.table,
        value=round(t.bloat_ratio, 4),
        message=(
            f"{t.table}: {t.bloat_ratio:.0%} of {t.size_bytes} bytes wasted{parts} ({t.method}), "
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


def index_skipped_finding(row: IndexRow) -> Finding:
    state = "held" if row.lock_granted else "awaited"
    return Finding(
        kind="index_skipped_locked",
        object=row.qualified,
        value=None,
        message=(
            f"{row.qualified}: skipped, an ACCESS EXCLUSIVE lock on it or its table {row.table} is {state} by pids "
            f"{list(row.lock_pids)}; measuring it would wait behind that lock. It is measured again on the next run"
        ),
        detail={"index": row.qualified, "table": row.table, "lock": state, "blocking_pids": list(row.lock_pids)},
    )


def index_finding(i: IndexBloat, state: str, sql_text: str) -> Finding:
    if state == "planned":
        remedy_text = f"{sql_text} is planned (reindex: true)"
    else:
        remedy_text = f"{sql_text} rebuilds it online and gives the space back"
        if state != "off":
            remedy_text += f"; not run by pgupkeep now: {state.replace('_', ' ')}"
    return Finding(
        kind="bloated_index",
        object=i.index,
        value=round(i.bloat_ratio, 4),
        message=f"{i.index} on {i.table}: {i.bloat_ratio:.0%} of {i.size_bytes} bytes wasted ({i.method}); {remedy_text}",
        detail={
            "index": i.index, "table": i.table, "size_bytes": i.size_bytes, "bloat_ratio": round(i.bloat_ratio, 4),
            "bloat_bytes": i.bloat_bytes, "method": i.method, "reindex": state, "remedy": remedy_text,
        },
    )  # fmt: skip


def judge(
    tables: Sequence[TableBloat],
    rollups: Sequence[TableBloat],
    section: BloatSection,
    *,
    standby: bool,
    indexes: Sequence[IndexBloat] = (),
    index_rows: Sequence[IndexRow] = (),
    open_window: bool = True,
) -> Judgement:
    """Findings, gauges, the tables to vacuum and the indexes to rebuild, from measured figures.

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
    judge_indexes(out, indexes, index_rows, section, standby=standby, open_window=open_window)
    return out


def judge_indexes(
    out: Judgement, indexes: Sequence[IndexBloat], rows: Sequence[IndexRow], section: BloatSection,
    *, standby: bool, open_window: bool,
) -> None:  # fmt: skip
    ranked = sorted(indexes, key=index_rank_key)
    flagged = [i for i in ranked if i.bloat_ratio > section.max_index_bloat_ratio]
    for i in flagged:
        state = reindex_state(i.row, section, standby=standby, open_window=open_window)
        if state == "planned":
            out.rebuild.append(Rebuild(i.row, "bloat", i.bloat_ratio))
        out.findings.append(index_finding(i, state, _sql_text(i.row)))
    for row in rows:
        if row.valid or row.build_running or row.size_bytes is None:
            continue  # a build in progress elsewhere owns its invalid index; a locked one waits
        if row.transient:
            if section.reindex and not standby:
                out.leftovers.append(row)
        elif reindex_state(row, section, standby=standby, open_window=open_window) == "planned":
            out.rebuild.append(Rebuild(row, "invalid"))
    out.samples.append(Sample("bloated_indexes", float(len(flagged))))
    for i in ranked[: section.report_top]:
        labels = {"index": i.index}
        out.samples += [
            Sample("index_bloat_ratio", round(i.bloat_ratio, 6), labels),
            Sample("index_bloat_bytes", float(i.bloat_bytes), labels),
        ]


def _sql_text(row: IndexRow) -> str:
    return reindex_sql(row).as_string(None)


# --------------------------------------------------------------------------- plan


def plan(ctx: JobContext) -> Plan:
    section: BloatSection = ctx.section
    a = assess(ctx.conn, section, memo=ctx.memo)
    open_window = in_window(section.reindex_window, ctx.now, ctx.timezone)
    j = judge(a.tables, a.rollups, section, standby=ctx.standby, indexes=a.indexes, index_rows=a.index_rows, open_window=open_window)
    session = VacuumSession(ctx)

    def settle(applied: Sequence[Step]) -> JobOutput:
        session.close()
        return JobOutput()

    steps = [vacuum_step(ctx, t, session) for t in j.vacuum]
    steps += rebuild_steps(ctx, j.rebuild, j.leftovers)
    return Plan(steps=steps, findings=[*j.findings, *a.findings], samples=j.samples, settle=settle)


KIND = JobKind(name="bloat", plan=plan, writes=False)

__all__ = ["KIND", "Settings", "TableBloat", "assess", "judge", "plan"]
