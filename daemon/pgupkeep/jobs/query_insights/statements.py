"""pg_stat_statements as what changed between two runs: one read per run (`read`), the interval
between two snapshots (`interval`, pure), and the slow and N+1-shaped statements in it (`judge`).

The figures are cumulative since the last reset; only differences between two snapshots of this
process say anything about now. An entry whose counters went backwards, or whose `stats_since`
moved, was reset or evicted and re-added in between: its interval is skipped, never reported as a
negative figure or as a spike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgupkeep.results import Finding, JobOutput, Sample
from pgupkeep.units import format_duration

EXTENSION = "pg_stat_statements"
# Until the daemon-wide `log_query_text` (full | truncated | none) lands, query text in findings
# is truncated to this many characters (its future default).
QUERY_TEXT_CHARS = 200
# "About one row per call": a lookup by key finds one row or none.
N_PLUS_ONE_MAX_ROWS_PER_CALL = 1.5
# A newcomer takes a top-N series from an incumbent only with more than this many times its time,
# so statements of about equal weight do not swap series from one run to the next.
TOP_HYSTERESIS = 2.0
# An incumbent keeps its series while it ranks within this many times report_top.
TOP_KEEP_RANKS = 2

# Where the extension lives in this database, and which columns its installed version has
# (`toplevel` from 1.9, `stats_since` from 1.11; an old version survives a server upgrade).
EXTENSION_SQL = """
SELECT n.nspname AS schema, e.extversion AS version,
       EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = to_regclass(format('%I.pg_stat_statements', n.nspname))
                 AND a.attname = 'toplevel' AND NOT a.attisdropped) AS has_toplevel,
       EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = to_regclass(format('%I.pg_stat_statements', n.nspname))
                 AND a.attname = 'stats_since' AND NOT a.attisdropped) AS has_stats_since,
       to_regclass(format('%I.pg_stat_statements_info', n.nspname)) IS NOT NULL AS has_info,
       (SELECT oid FROM pg_database WHERE datname = current_database()) AS dbid
FROM pg_extension e
JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""
# Readable only with pg_read_all_settings (a member of pg_monitor); else no row.
PRELOAD_SQL = "SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'"
# Top-level statements only: a statement run inside a function is part of its caller's time, and
# a loop inside the server is no round trip. `param_equality` feeds the N+1 heuristic: a WHERE
# with an equality to a parameter or a constant (pg_stat_statements shows both as $n).
STATEMENTS_SQL = """
SELECT s.userid, s.queryid, s.calls, s.total_exec_time AS exec_ms, s.rows, s.shared_blks_read,
       {stats_since} AS stats_since,
       s.query ~* '\\mwhere\\M.*[^<>!=]=\\s*\\$[0-9]+' AS param_equality,
       left(s.query, {text_chars}) AS query
FROM {view} s
WHERE s.dbid = %(dbid)s {toplevel}
"""
INFO_SQL = "SELECT dealloc, stats_reset FROM {}"


def shown_query_text(text: str | None) -> str | None:
    """Query text as a finding may carry it (other people's statements are personal data)."""
    if text is None:
        return None
    return text if len(text) <= QUERY_TEXT_CHARS else text[:QUERY_TEXT_CHARS] + "…"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Entry:
    """One pg_stat_statements entry's cumulative counters (key: userid, queryid)."""

    calls: int
    exec_ms: float
    rows: int
    blks_read: int
    stats_since: datetime | None = None


@dataclass(frozen=True)
class Snapshot:
    """What one run read; the previous run's is kept in the job's memo (numbers only, no text)."""

    taken_at: datetime
    dbid: int
    stats_reset: datetime | None
    dealloc: int | None
    entries: Mapping[tuple[int, int], Entry]
    hidden: int = 0  # entries of other roles this role may not see (queryid NULL)


@dataclass(frozen=True)
class Statement:
    """What this run knows of a queryid besides its counters."""

    query: str | None
    param_equality: bool


@dataclass(frozen=True)
class Reading:
    snapshot: Snapshot
    statements: Mapping[int, Statement]


@dataclass(frozen=True)
class Unavailable:
    """pg_stat_statements cannot be read: why, and what to do."""

    reason: str  # not_installed | not_preloaded
    database: str
    preloaded: bool | None  # None: this role may not read shared_preload_libraries


@dataclass(frozen=True)
class Delta:
    """One queryid's figures in the interval (its entries of every role summed)."""

    queryid: int
    calls: int
    exec_ms: float
    rows: int
    blks_read: int

    @property
    def mean_ms(self) -> float:
        return self.exec_ms / self.calls if self.calls else 0.0

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class Interval:
    seconds: float
    deltas: Sequence[Delta] = ()
    skipped: int = 0  # entries whose interval could not be measured (reset, evicted and re-added)
    reason: str | None = None  # why the whole interval was skipped: first_run, stats_reset


# --------------------------------------------------------------------------- read


def read(conn: psycopg.Connection, now: datetime) -> Reading | Unavailable:
    """One read of pg_stat_statements (and its _info view) for the connected database."""
    with conn.cursor(row_factory=dict_row) as cur:
        ext = cur.execute(EXTENSION_SQL).fetchone()
        database = conn.info.dbname
        if ext is None:
            return Unavailable("not_installed", database, _preloaded(conn))
        schema = ext["schema"]
        query = sql.SQL(STATEMENTS_SQL).format(
            view=sql.Identifier(schema, "pg_stat_statements"),
            stats_since=sql.SQL("s.stats_since" if ext["has_stats_since"] else "NULL::timestamptz"),
            toplevel=sql.SQL("AND s.toplevel" if ext["has_toplevel"] else ""),
            text_chars=sql.Literal(QUERY_TEXT_CHARS + 1),
        )
        try:
            rows = cur.execute(query, {"dbid": ext["dbid"]}).fetchall()
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # "pg_stat_statements must be loaded via shared_preload_libraries"
            return Unavailable("not_preloaded", database, False)
        info: dict[str, Any] = {"dealloc": None, "stats_reset": None}
        if ext["has_info"]:
            info = cur.execute(sql.SQL(INFO_SQL).format(sql.Identifier(schema, "pg_stat_statements_info"))).fetchone() or info
    return reading_from_rows(rows, now=now, dbid=int(ext["dbid"]), stats_reset=info["stats_reset"], dealloc=info["dealloc"])


def _preloaded(conn: psycopg.Connection) -> bool | None:
    row = conn.execute(PRELOAD_SQL).fetchone()
    if row is None:
        return None
    return EXTENSION in [lib.strip().strip('"') for lib in str(row[0]).split(",")]


def reading_from_rows(
    rows: Sequence[Mapping[str, Any]], *, now: datetime, dbid: int, stats_reset: datetime | None, dealloc: int | None
) -> Reading:
    entries: dict[tuple[int, int], Entry] = {}
    statements: dict[int, Statement] = {}
    hidden = 0
    for r in rows:
        if r["queryid"] is None:  # another role's statement, without pg_read_all_stats
            hidden += 1
            continue
        qid = int(r["queryid"])
        entries[(int(r["userid"]), qid)] = Entry(
            calls=int(r["calls"]), exec_ms=float(r["exec_ms"]), rows=int(r["rows"]),
            blks_read=int(r["shared_blks_read"]), stats_since=r["stats_since"],
        )  # fmt: skip
        known = statements.get(qid)
        statements[qid] = Statement(
            query=r["query"] if known is None else known.query,
            param_equality=bool(r["param_equality"]) or (known is not None and known.param_equality),
        )
    snap = Snapshot(taken_at=now, dbid=dbid, stats_reset=stats_reset, dealloc=dealloc, entries=entries, hidden=hidden)
    return Reading(snapshot=snap, statements=statements)


# --------------------------------------------------------------------------- interval (pure)


def interval(prev: Snapshot | None, cur: Snapshot) -> Interval:
    """What happened between two snapshots, per queryid; skipped where it cannot be known."""
    if prev is None or prev.dbid != cur.dbid:
        return Interval(0.0, reason="first_run")
    seconds = (cur.taken_at - prev.taken_at).total_seconds()
    if seconds <= 0:
        return Interval(0.0, reason="clock")
    if prev.stats_reset != cur.stats_reset:  # pg_stat_statements_reset() of everything
        return Interval(seconds, skipped=len(cur.entries), reason="stats_reset")
    sums: dict[int, list[float]] = {}
    skipped = 0
    for key, now in cur.entries.items():
        before = prev.entries.get(key)
        if before is None:
            # Created after the last snapshot (that one read every entry of this database), so
            # all its counts fall in the interval.
            d = (now.calls, now.exec_ms, now.rows, now.blks_read)
        elif (
            now.stats_since != before.stats_since
            or now.calls < before.calls
            or now.exec_ms < before.exec_ms
            or now.rows < before.rows
            or now.blks_read < before.blks_read
        ):
            skipped += 1  # reset or evicted and re-added since: this interval is unknown
            continue
        else:
            d = (now.calls - before.calls, now.exec_ms - before.exec_ms, now.rows - before.rows, now.blks_read - before.blks_read)
        acc = sums.setdefault(key[1], [0, 0.0, 0, 0])
        for i, v in enumerate(d):
            acc[i] += v
    deltas = [
        Delta(queryid=q, calls=int(c), exec_ms=float(t), rows=int(r), blks_read=int(b))
        for q, (c, t, r, b) in sums.items()
        if c > 0
    ]
    return Interval(seconds, deltas=deltas, skipped=skipped)


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
    section: Any,
    incumbents: Sequence[int] = (),
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
        out.findings.append(slow_finding(d, reading.statements.get(d.queryid), span, slow_ms))

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
        out.findings.append(n_plus_one_finding(d, reading.statements.get(d.queryid), span))

    top = choose_top(span.deltas, incumbents, section.report_top)
    j.top = [d.queryid for d in top]
    out.samples += [Sample("top_statement_seconds", d.exec_ms / 1000, {"queryid": str(d.queryid)}) for d in top]
    return j


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


def slow_finding(d: Delta, st: Statement | None, span: Interval, slow_ms: float) -> Finding:
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
        detail={**_figures(d, span), "query": shown_query_text(st.query if st else None)},
    )


def n_plus_one_finding(d: Delta, st: Statement | None, span: Interval) -> Finding:
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
            "query": shown_query_text(st.query if st else None),
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
