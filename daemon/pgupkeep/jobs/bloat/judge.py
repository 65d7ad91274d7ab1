"""Judging measured figures (pure): which tables and indexes are flagged, the findings and gauges
that say so, and which tables to vacuum and indexes to rebuild."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgupkeep.jobs.bloat.catalog import TableRow
from pgupkeep.jobs.bloat.estimate import TableBloat, rank_key
from pgupkeep.jobs.bloat.indexes import IndexBloat, IndexRow, index_rank_key
from pgupkeep.jobs.bloat.reindex import Rebuild, reindex_sql, reindex_state
from pgupkeep.policy import BloatSection
from pgupkeep.results import Finding, Sample

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
    rebuild: list[Rebuild] = field(default_factory=list)
    leftovers: list[IndexRow] = field(default_factory=list)


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
    stale = ""
    if t.basis == "pg_stats_stale":  # a measured heap has basis "measured"
        detail["changed_since_analyze"] = t.changed_since_analyze
        stale = (
            f"; the heap figure is estimated from column statistics taken before {t.changed_since_analyze} rows "
            f"changed (ANALYZE {t.table}, or allow pgstattuple_approx, for a firmer figure)"
        )
    parts = ""
    if t.toast is not None and t.toast.size_bytes and t.heap is not None:
        parts = f" (heap {t.heap.bloat_bytes} of {t.heap.size_bytes}, TOAST {t.toast.bloat_bytes} of {t.toast.size_bytes})"
    return Finding(
        kind="bloated_table",
        object=t.table,
        value=round(t.bloat_ratio, 4),
        message=(
            f"{t.table}: {t.bloat_ratio:.0%} of {t.size_bytes} bytes wasted{parts} ({t.method}), "
            f"{t.dead_tuples} dead tuples ({t.dead_tuple_ratio:.0%}); {text}{stale}"
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
