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
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.bloat.catalog import Settings, TableRow, read_settings, read_tables
from pgupkeep.jobs.bloat.estimate import TableBloat, estimate, rollup
from pgupkeep.jobs.bloat.indexes import IndexBloat, IndexRow, estimate_index, read_indexes
from pgupkeep.jobs.bloat.judge import index_skipped_finding, judge, skipped_finding
from pgupkeep.jobs.bloat.measure import functions, refine
from pgupkeep.jobs.bloat.reindex import in_window, rebuild_steps
from pgupkeep.jobs.bloat.vacuum import VacuumSession, vacuum_step
from pgupkeep.policy import BloatSection
from pgupkeep.results import Finding, JobOutput, Plan, Step


@dataclass
class Assessment:
    tables: list[TableBloat] = field(default_factory=list)  # >= min_table_size
    rollups: list[TableBloat] = field(default_factory=list)  # partition trees >= min_table_size
    indexes: list[IndexBloat] = field(default_factory=list)  # valid B-trees >= min_index_size
    index_rows: list[IndexRow] = field(default_factory=list)  # every index read (invalid ones too)
    findings: list[Finding] = field(default_factory=list)  # skipped (locked), measurement limits


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
    # Where a table's counters were not believed (estimate.live_tuples), its indexes' entries follow.
    counted = {t.oid: t.live_tuples + t.dead_tuples for t in measured if t.oid is not None}
    out.index_rows = [
        replace(i, table_tuples=counted[i.table_oid])
        if i.table_oid in counted and counted[i.table_oid] < i.table_tuples else i
        for i in out.index_rows
    ]
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
