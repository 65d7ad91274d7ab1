"""The `query_insights` job: what a DBA looks at to decide what to fix next. Read-only.

- statements.py, verdicts.py: slow and N+1-shaped statements from pg_stat_statements, as deltas
  between runs (the previous snapshot is kept in the job's memo; the first run after start only
  takes it);
- foreign_keys.py: foreign keys without an index, with the statements that create one;
- sizes.py: the largest tables (heap, indexes, TOAST), partitions rolled up to their root.

Without pg_stat_statements the job says exactly what to do, and the other two checks still run.
"""

from __future__ import annotations

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.query_insights import foreign_keys, sizes, statements, verdicts
from pgupkeep.policy import QueryInsightsSection
from pgupkeep.results import Plan, Sample
from pgupkeep.units import query_text_read_limit

MEMO_SNAPSHOT = "statements"
MEMO_TOP = "top_statements"


def plan(ctx: JobContext) -> Plan:
    section: QueryInsightsSection = ctx.section
    out = Plan()

    text_mode = ctx.target.log_query_text or "truncated"
    reading = statements.read(ctx.conn, ctx.now, query_text_read_limit(text_mode))
    if isinstance(reading, statements.Unavailable):
        # Once it can be read, the next run starts from a fresh snapshot.
        ctx.memo.pop(MEMO_SNAPSHOT, None)
        ctx.memo.pop(MEMO_TOP, None)
        out.findings.append(verdicts.unavailable_finding(reading, ctx.conn.info.user))
        out.samples.append(Sample("statement_stats_available", 0.0))
    else:
        span = statements.interval(ctx.memo.get(MEMO_SNAPSHOT), reading.snapshot)
        judged = verdicts.judge(reading, span, section, ctx.memo.get(MEMO_TOP, ()), text_mode)
        ctx.memo[MEMO_SNAPSHOT] = reading.snapshot
        ctx.memo[MEMO_TOP] = tuple(judged.top)
        if reading.snapshot.hidden:
            out.findings.append(verdicts.hidden_finding(reading.snapshot, ctx.conn.info.dbname, ctx.conn.info.user))
        out.findings.extend(judged.out.findings)
        out.samples.extend(judged.out.samples)

    unindexed = foreign_keys.read(ctx.conn, section.min_table_size)
    out.findings.extend(foreign_keys.finding(key) for key in unindexed)
    out.samples.append(Sample("unindexed_foreign_keys", float(len(unindexed))))

    out.samples.extend(sizes.samples(sizes.read(ctx.conn, section.report_top)))
    return out


KIND = JobKind(name="query_insights", plan=plan, writes=False)
