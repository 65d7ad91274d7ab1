"""The `partitions` job: keep `premake` range partitions ready after the current one, retire old
ones, and report runway, gaps, overlaps and default-partition rows. This module orchestrates; the
catalog reads live in partitions_catalog (other sessions' locks in partitions_locks), the DDL in
partitions_ddl, the calendar in partitions_plan.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from pgupkeep.jobs import partitions_plan as plan
from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.partitions_catalog import (
    Table,
    assign_names,
    probe_defaults,
    read_catalog,
    read_integer_bases,
    validate,
)
from pgupkeep.jobs.partitions_ddl import apply_step, create_steps, retire_steps
from pgupkeep.jobs.partitions_locks import lock_in_the_way
from pgupkeep.jobs.partitions_plan import Partition
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Sample


def plan_table(t: Table, now: datetime, tz: ZoneInfo) -> list[Finding]:
    """The wanted grid against the existing bounds: which slots to create, what to report."""
    p = t.policy
    if isinstance(p.interval, int):
        assert t.base is not None
        slots = plan.integer_slots(t.base, p.interval, p.premake)
    else:
        slots = plan.time_slots(now, p.interval, t.kind, tz, p.premake)
    t.slots = plan.classify(slots, t.parts)
    t.creates = [s.slot for s in t.slots if s.state == "create"]
    findings = []
    gaps, overlaps = plan.gaps_and_overlaps(t.parts)
    for a, b in gaps:
        rng = plan.describe(a.hi, b.lo, t.kind, tz)
        findings.append(Finding(
            "partition_gap", t.label, None,
            f"{t.label}: no partition covers {rng} between {a.qualified} and {b.qualified}; rows there go to the "
            "default partition or fail. pgupkeep does not guess: create a partition for that range by hand",
            {"table": t.label, "range": rng, "before": a.qualified, "after": b.qualified},
        ))
    for a, b in overlaps:
        findings.append(Finding(
            "partition_overlap", t.label, None,
            f"{t.label}: partitions {a.qualified} and {b.qualified} overlap; check their bounds",
            {"table": t.label, "partitions": [a.qualified, b.qualified]},
        ))
    for s in t.slots:
        if s.state == "overlap":
            rng = plan.describe(s.slot.lo, s.slot.hi, t.kind, tz)
            names = [q.qualified for q in s.overlapping]
            findings.append(Finding(
                "partition_overlap", t.label, None,
                f"{t.label}: the {p.interval} range {rng} is partly covered by {', '.join(names)}; "
                "pgupkeep will not create an overlapping partition: align those bounds to the interval by hand",
                {"table": t.label, "range": rng, "partitions": names},
            ))
    return findings


def default_findings(t: Table, tz: ZoneInfo) -> tuple[list[Finding], ItemError | None]:
    mode = t.policy.on_default_conflict
    findings, error = [], None
    assert t.default is not None or not t.conflicts
    for s in t.creates:
        rows = t.conflicts.get(s.lo)
        if not rows:
            continue
        rng = plan.describe(s.lo, s.hi, t.kind, tz)
        name = f"{t.name.schema}.{t.names.get(s.lo, s.suffix)}"
        message = f"{t.label}: {rows} rows in the default partition {t.default.qualified} fall in {rng}, the range of new partition {name}"
        if mode == "fail":
            message += "; move them out, or set on_default_conflict: move (or skip)"
        elif mode == "skip":
            message += "; that partition is left out (on_default_conflict: skip) until they are moved"
        else:
            message += "; moving them into the new partition (on_default_conflict: move)"
        findings.append(Finding("default_partition_rows", t.label, rows, message,
                                {"table": t.label, "conflict": True, "range": rng, "resolution": mode,
                                 "default_partition": t.default.qualified, "partition": name}))
        if mode == "fail" and error is None:
            error = ItemError(t.label, message)
    if t.default_rows and not findings:
        assert t.default is not None
        findings.append(Finding(
            "default_partition_rows", t.label, t.default_rows,
            f"{t.label}: {t.default_rows} rows sit in the default partition {t.default.qualified}, outside any "
            "range pgupkeep is about to create; create partitions for them and move them out",
            {"table": t.label, "conflict": False, "range": None, "resolution": None,
             "default_partition": t.default.qualified},
        ))
    return findings, error


def run(ctx: JobContext) -> JobOutput:
    out = JobOutput()
    tz = ctx.timezone
    known = ctx.memo.setdefault("partitions", {})
    tables = read_catalog(ctx.conn, ctx.section.tables, known) if ctx.section.tables else []
    ok = []
    for t in tables:
        error = validate(t)
        if error:
            out.errors.append(ItemError(t.label, error))
        else:
            ok.append(t)
    for t in ok:
        # A table whose reads would wait behind another session's lock is left alone this run,
        # before any read of it could stall (or, in a shared statement, fail) the others.
        t.blocked = lock_in_the_way(t)
    read_integer_bases(ctx.conn, [t for t in ok if t.kind == "integer" and not t.blocked])
    planned = [t for t in ok if t.kind != "integer" or t.base is not None]
    for t in planned:
        out.findings.extend(plan_table(t, ctx.now, tz))
    # An empty default partition (0 bytes) holds no rows: only the others are counted, including
    # any whose size was not read (None). The count is exact, taken just before the DDL; a row
    # arriving after it makes ATTACH fail for that table alone.
    probe_defaults(ctx.conn, [t for t in planned if not t.blocked and t.default is not None and t.default_bytes != 0])
    assign_names(ctx.conn, [t for t in planned if not t.blocked])
    for t in ok:
        if t.blocked:
            out.errors.append(ItemError(t.label, t.blocked))
            if t in planned:
                out.samples.extend(gauges(ctx, t, t.parts, out))
        else:
            out.extend(run_table(ctx, t))
    out.findings.extend(ctx.lock_findings())
    return out


def run_table(ctx: JobContext, t: Table) -> JobOutput:
    out = JobOutput()
    tz, p = ctx.timezone, t.policy
    findings, error = default_findings(t, tz)
    out.findings.extend(findings)
    if error:
        out.errors.append(error)
    steps = create_steps(ctx, t)
    if p.retention is not None:
        if t.referenced:
            out.errors.append(ItemError(t.label, (
                f"{t.label}: a foreign key references this table, so retiring partitions would break it or "
                "fail; retention is refused: drop the foreign key or remove retention from the policy")))
        else:
            current_lo = t.slots[0].slot.lo
            if isinstance(p.interval, int):
                assert t.base is not None and p.retention.integer is not None
                cutoff: plan.Bound = t.base - p.retention.integer
            else:
                cutoff = plan.time_cutoff(ctx.now, p.retention, t.kind, tz)
            steps.extend(retire_steps(ctx, t, cutoff, current_lo))
    parts = list(t.parts)
    for step in steps:
        if not ctx.apply:
            out.actions.append(step.action)
            continue
        failure = apply_step(ctx, t, step)
        if failure:
            out.actions.append(step.action)
            out.errors.append(ItemError(t.label, failure))
            break  # the table's next steps would meet the same lock or leave a hole
        out.actions.append(Action(step.action.action, step.action.object, step.action.sql, True, step.action.detail))
        if step.made is not None:
            parts.append(step.made)
            t.default_rows -= step.action.detail.get("rows", 0)
        else:
            parts = [q for q in parts if q.qualified != step.action.object]
    out.samples.extend(gauges(ctx, t, parts, out))
    return out


def gauges(ctx: JobContext, t: Table, parts: list[Partition], out: JobOutput) -> list[Sample]:
    """premade / runway / default rows as they stand after this run (before it, in plan mode)."""
    labels = {"table": t.label}
    integer = t.kind == "integer"
    at = t.base if integer else plan.now_key(ctx.now, t.kind, ctx.timezone)
    assert at is not None
    premade, reach = plan.runway(parts, at)
    samples = [Sample("partition_premade", float(premade), labels)]
    if not t.blocked:  # a default partition that could not be counted must not read as empty
        samples.append(Sample("partition_default_rows", float(t.default_rows), labels))
    if not integer:
        samples.append(Sample("partition_runway_seconds", reach / plan.US, labels))
    want = t.policy.runway_warn if t.policy.runway_warn is not None else t.policy.premake
    if premade < want:
        runway = {"runway_keys": reach} if integer else {"runway_seconds": reach / plan.US}
        out.findings.append(Finding(
            "partition_runway_low", t.label, premade,
            f"{t.label}: only {premade} partitions are ready after the current one (want {want}); "
            "see this run's errors or findings for what stopped pgupkeep from creating more",
            {"table": t.label, "premade": premade, "want": want, **runway},
        ))
    return samples


KIND = JobKind(name="partitions", run=run, writes=True)
