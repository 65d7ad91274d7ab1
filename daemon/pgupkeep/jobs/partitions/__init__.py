"""The `partitions` job: keep `premake` range partitions ready after the current one, retire old
ones, and report runway, gaps, overlaps and default-partition rows. This module orchestrates; the
catalog reads live in catalog (other sessions' locks in locks), the DDL in
ddl, the calendar in grid.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.partitions import grid
from pgupkeep.jobs.partitions.catalog import (
    Table,
    assign_names,
    probe_defaults,
    read_catalog,
    read_integer_bases,
    validate,
)
from pgupkeep.jobs.partitions.ddl import DdlStep, apply_step, create_steps, retire_steps
from pgupkeep.jobs.partitions.grid import Partition
from pgupkeep.jobs.partitions.locks import lock_in_the_way
from pgupkeep.results import Finding, ItemError, JobOutput, Plan, Sample, Step


def plan_table(t: Table, now: datetime, tz: ZoneInfo) -> list[Finding]:
    """The wanted grid against the existing bounds: which slots to create, what to report."""
    p = t.policy
    if isinstance(p.interval, int):
        assert t.base is not None
        slots = grid.integer_slots(t.base, p.interval, p.premake)
    else:
        slots = grid.time_slots(now, p.interval, t.kind, tz, p.premake)
    t.slots = grid.classify(slots, t.parts)
    t.creates = [s.slot for s in t.slots if s.state == "create"]
    findings = []
    gaps, overlaps = grid.gaps_and_overlaps(t.parts)
    for a, b in gaps:
        rng = grid.describe(a.hi, b.lo, t.kind, tz)
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
            rng = grid.describe(s.slot.lo, s.slot.hi, t.kind, tz)
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
        rng = grid.describe(s.lo, s.hi, t.kind, tz)
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


def plan(ctx: JobContext) -> Plan:
    out = Plan()
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
    gauged: list[Table] = []
    for t in ok:
        if t.blocked:
            out.errors.append(ItemError(t.label, t.blocked))
            if t in planned:
                gauged.append(t)
        else:
            table_steps(ctx, t, out)
            gauged.append(t)

    def settle(applied: Sequence[Step]) -> JobOutput:
        done = {id(step) for step in applied}
        result = JobOutput()
        for t in gauged:
            parts = list(t.parts)
            for step in t.steps:
                if id(step.step) not in done:
                    continue
                if step.made is not None:
                    parts.append(step.made)
                    t.default_rows -= step.action.detail.get("rows", 0)
                else:
                    parts = [q for q in parts if q.qualified != step.action.object]
            result.samples.extend(gauges(ctx, t, parts, result))
        return result

    out.settle = settle
    return out


def table_steps(ctx: JobContext, t: Table, out: Plan) -> None:
    """The table's findings, errors and steps, in order: creates, then retirements."""
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
                cutoff: grid.Bound = t.base - p.retention.integer
            else:
                cutoff = grid.time_cutoff(ctx.now, p.retention, t.kind, tz)
            steps.extend(retire_steps(ctx, t, cutoff, current_lo))
    for ddl_step in steps:
        ddl_step.step = Step(ddl_step.action, functools.partial(_apply, ctx, t, ddl_step), item=t.label)
        out.steps.append(ddl_step.step)
    t.steps = steps


def _apply(ctx: JobContext, t: Table, step: DdlStep) -> JobOutput | None:
    failure = apply_step(ctx, t, step)
    if failure is None:
        return None
    return JobOutput(actions=[step.action], errors=[ItemError(t.label, failure)])


def gauges(ctx: JobContext, t: Table, parts: list[Partition], out: JobOutput | Plan) -> list[Sample]:
    """premade / runway / default rows as they stand after this run (before it, in plan mode)."""
    labels = {"table": t.label}
    integer = t.kind == "integer"
    at = t.base if integer else grid.now_key(ctx.now, t.kind, ctx.timezone)
    assert at is not None
    premade, reach = grid.runway(parts, at)
    samples = [Sample("partition_premade", float(premade), labels)]
    if not t.blocked:  # a default partition that could not be counted must not read as empty
        samples.append(Sample("partition_default_rows", float(t.default_rows), labels))
    if not integer:
        samples.append(Sample("partition_runway_seconds", reach / grid.US, labels))
    want = t.policy.runway_warn if t.policy.runway_warn is not None else t.policy.premake
    if premade < want:
        runway = {"runway_keys": reach} if integer else {"runway_seconds": reach / grid.US}
        out.findings.append(Finding(
            "partition_runway_low", t.label, premade,
            f"{t.label}: only {premade} partitions are ready after the current one (want {want}); "
            "see this run's errors or findings for what stopped pgupkeep from creating more",
            {"table": t.label, "premade": premade, "want": want, **runway},
        ))
    return samples


KIND = JobKind(name="partitions", plan=plan, writes=True)
