"""The verdicts on one pg_stat_statements interval (pure): slow and N+1-shaped statements, the
top statements' series (stable between runs), and what to do when the view cannot be read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pgupkeep.jobs.query_insights.statements import (
    EXTENSION,
    Delta,
    Interval,
    Reading,
    Snapshot,
    Unavailable,
)
from pgupkeep.policy import QueryInsightsSection
from pgupkeep.results import Finding, JobOutput, Sample
from pgupkeep.units import format_duration, query_text

# "About one row per call": a lookup by key finds one row or none.
N_PLUS_ONE_MAX_ROWS_PER_CALL = 1.5
# A newcomer takes a top-N series from an incumbent only with more than this many times its time,
# so statements of about equal weight do not swap series from one run to the next.
TOP_HYSTERESIS = 2.0
# An incumbent keeps its series while it ranks within this many times report_top.
TOP_KEEP_RANKS = 2


def choose_top(
    deltas: Sequence[Delta], incumbents: Sequence[int], n: int
) -> list[Delta]:
    """The statements that get a `top_statement_seconds` series: at most `n`, stable between runs.

    An incumbent keeps its series while it ranks within TOP_KEEP_RANKS * n; a newcomer from the top
    n takes a free series, or the weakest incumbent's when it spent TOP_HYSTERESIS times its time.
    """
    if n <= 0:
        return []
    ranked = sorted(deltas, key=lambda d: (-d.exec_ms, d.queryid))
    rank = {d.queryid: i for i, d in enumerate(ranked)}
    by_id = {d.queryid: d for d in ranked}
    kept = [by_id[q] for q in incumbents if q in rank and rank[q] < TOP_KEEP_RANKS * n]
    kept_ids = {d.queryid for d in kept}
    for d in ranked[:n]:
        if d.queryid in kept_ids:
            continue
        if len(kept) < n:
            kept.append(d)
            kept_ids.add(d.queryid)
            continue
        weakest = min(kept, key=lambda k: (k.exec_ms, -rank[k.queryid]))
        if d.exec_ms <= TOP_HYSTERESIS * weakest.exec_ms:
            break  # the rest of the newcomers are weaker still
        kept.remove(weakest)
        kept_ids.discard(weakest.queryid)
        kept.append(d)
        kept_ids.add(d.queryid)
    return sorted(kept, key=lambda d: rank[d.queryid])


# --------------------------------------------------------------------------- judge (pure)


@dataclass
class Judgement:
    out: JobOutput = field(default_factory=JobOutput)
    top: list[int] = field(default_factory=list)  # queryids with a series, for the next run


def judge(
    reading: Reading,
    span: Interval,
    section: QueryInsightsSection,
    incumbents: Sequence[int] = (),
    log_query_text: str = "truncated",
) -> Judgement:
    """Findings and samples of one interval. A skipped interval moves the counters by nothing."""
    j = Judgement()
    out = j.out
    calls = sum(d.calls for d in span.deltas)
    seconds = sum(d.exec_ms for d in span.deltas) / 1000
    # The counters' series exist from the first run on, so rate() has a start.
    out.samples.append(Sample("statement_calls_total", float(calls)))
    out.samples.append(Sample("statement_time_seconds_total", seconds))
    out.samples.append(Sample("statement_stats_available", 1.0))
    if span.reason is not None:
        j.top = list(incumbents)
        return j

    slow_ms = section.slow_mean_after.total_seconds() * 1000
    slow = sorted(
        (d for d in span.deltas if d.calls >= section.min_calls and d.mean_ms > slow_ms),
        key=lambda d: (-d.exec_ms, d.queryid),
    )
    out.samples.append(Sample("slow_statements", float(len(slow))))
    for d in slow[: section.report_top]:
        out.findings.append(slow_finding(d, _text(reading, d, log_query_text), span, slow_ms))

    rate = section.n_plus_one_calls_per_second
    tiny_ms = section.n_plus_one_mean_under.total_seconds() * 1000
    shaped = sorted(
        (
            d
            for d in span.deltas
            if d.calls / span.seconds > rate
            and d.mean_ms < tiny_ms
            and d.rows_per_call <= N_PLUS_ONE_MAX_ROWS_PER_CALL
            and (st := reading.statements.get(d.queryid)) is not None
            and st.param_equality
        ),
        key=lambda d: (-d.calls, d.queryid),
    )
    out.samples.append(Sample("n_plus_one_statements", float(len(shaped))))
    for d in shaped[: section.report_top]:
        out.findings.append(n_plus_one_finding(d, _text(reading, d, log_query_text), span))

    top = choose_top(span.deltas, incumbents, section.report_top)
    j.top = [d.queryid for d in top]
    out.samples += [Sample("top_statement_seconds", d.exec_ms / 1000, {"queryid": str(d.queryid)}) for d in top]
    return j


def _text(reading: Reading, d: Delta, log_query_text: str) -> str | None:
    """The statement's text as `log_query_text` allows (other people's statements are personal data)."""
    st = reading.statements.get(d.queryid)
    return query_text(st.query if st else None, log_query_text)


def _span_text(span: Interval) -> str:
    return format_duration(timedelta(seconds=round(span.seconds)))


def _figures(d: Delta, span: Interval) -> dict[str, Any]:
    return {
        "queryid": str(d.queryid),
        "calls": d.calls,
        "mean_ms": round(d.mean_ms, 3),
        "total_ms": round(d.exec_ms, 3),
        "rows_per_call": round(d.rows_per_call, 3),
        "shared_blks_read": d.blks_read,
        "interval_seconds": round(span.seconds, 3),
    }


def slow_finding(d: Delta, text: str | None, span: Interval, slow_ms: float) -> Finding:
    return Finding(
        kind="slow_statement",
        object=str(d.queryid),
        value=round(d.mean_ms, 3),
        message=(
            f"statement {d.queryid}: mean {d.mean_ms:.1f} ms over {d.calls} calls in the last {_span_text(span)} "
            f"(total {d.exec_ms:.0f} ms, {d.rows_per_call:.1f} rows per call, {d.blks_read} blocks read), over "
            f"slow_mean_after {slow_ms:g} ms: EXPLAIN (ANALYZE, BUFFERS) it with typical parameters and look for "
            "sequential scans, a missing index or a plan that reads far more rows than it returns"
        ),
        detail={**_figures(d, span), "query": text},
    )


def n_plus_one_finding(d: Delta, text: str | None, span: Interval) -> Finding:
    rate = d.calls / span.seconds
    return Finding(
        kind="n_plus_one_statement",
        object=str(d.queryid),
        value=d.calls,
        message=(
            f"statement {d.queryid}: {d.calls} calls in the last {_span_text(span)} ({rate:.0f} per second), "
            f"{d.mean_ms:.3f} ms and {d.rows_per_call:.1f} rows each, filtered by an equality to a parameter: "
            "the shape of an N+1 loop (one query per row of an earlier result); fetch the rows in one statement "
            "with `= ANY($1)` and an array of keys, or a join"
        ),
        detail={
            **_figures(d, span),
            "calls_per_second": round(rate, 3),
            "suggestion": "batch the lookups: WHERE key = ANY($1) with an array of keys, or a join",
            "query": text,
        },
    )


def unavailable_finding(u: Unavailable, role: str) -> Finding:
    """The one finding of a run that cannot read pg_stat_statements: exactly what to do."""
    grant = f"GRANT pg_read_all_stats TO {role} (or pg_monitor) so it sees every role's statements"
    preload = (
        "add pg_stat_statements to shared_preload_libraries (ALTER SYSTEM SET shared_preload_libraries = "
        "'pg_stat_statements', keeping any libraries already listed) and restart PostgreSQL"
    )
    create = f"CREATE EXTENSION pg_stat_statements in database {u.database} (as its owner or a superuser)"
    if u.reason == "not_preloaded":
        steps = [preload, grant]
        head = f"{u.database}: pg_stat_statements is installed but not loaded (not in shared_preload_libraries)"
    elif u.preloaded:
        steps = [create, grant]
        head = f"{u.database}: the pg_stat_statements extension is not installed in this database"
    elif u.preloaded is False:
        steps = [preload, create, grant]
        head = f"{u.database}: pg_stat_statements is neither installed in this database nor in shared_preload_libraries"
    else:
        steps = [create, f"make sure it is in shared_preload_libraries (else {preload})", grant]
        head = f"{u.database}: the pg_stat_statements extension is not installed in this database"
    return Finding(
        kind="extension_missing",
        object=EXTENSION,
        message=f"{head}; slow and N+1 statements are not checked until then: "
        + "; ".join(f"{i}. {s}" for i, s in enumerate(steps, 1)),
        detail={"extension": EXTENSION, "database": u.database, "reason": u.reason, "preloaded": u.preloaded, "steps": steps},
    )


def hidden_finding(snap: Snapshot, database: str, role: str) -> Finding:
    return Finding(
        kind="extension_missing",
        object=EXTENSION,
        value=snap.hidden,
        message=(
            f"{database}: {snap.hidden} pg_stat_statements entries of other roles are hidden from {role}, so their "
            f"statements are not checked: GRANT pg_read_all_stats TO {role} (or pg_monitor)"
        ),
        detail={"extension": EXTENSION, "database": database, "reason": "not_readable", "hidden": snap.hidden},
    )
