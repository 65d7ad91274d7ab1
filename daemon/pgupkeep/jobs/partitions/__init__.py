"""The `partitions` job: keep `premake` range partitions ready after the current one, each owned
and granted as its parent; retire old ones crash-safely; report runway, gaps, overlaps,
default-partition rows and integer keys near the end of their type. This module orchestrates; the
catalog read lives in catalog, the reads of the tables in reads (other sessions' locks in locks),
the DDL in ddl and retirement, owner and grants in privileges, the calendar in grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.partitions import grid
from pgupkeep.jobs.partitions.catalog import Settled, Table, read_catalog, rebuilt, validate
from pgupkeep.jobs.partitions.ddl import DdlStep, create_steps, storage_problem
from pgupkeep.jobs.partitions.grid import Partition
from pgupkeep.jobs.partitions.locks import lock_in_the_way
from pgupkeep.jobs.partitions.privileges import rights_problem
from pgupkeep.jobs.partitions.reads import assign_names, probe_defaults, read_integer_bases
from pgupkeep.jobs.partitions.retirement import (
    apply_step,
    detached_after,
    finish_steps,
    retire_steps,
)
from pgupkeep.results import Finding, ItemError, JobOutput, Plan, Sample, Step


def plan_table(t: Table, now: datetime, tz: ZoneInfo) -> list[Finding]:
    """The wanted grid against the existing bounds: which slots to create, what to report."""
    p = t.policy
    if isinstance(p.interval, int):
        assert t.base is not None and t.key_type is not None
        slots = grid.integer_slots(t.base, p.interval, p.premake, t.key_type)
    else:
        slots = grid.time_slots(now, p.interval, t.kind, tz, p.premake)
    t.slots = grid.classify(slots, t.parts)
    t.creates = [s.slot for s in t.slots if s.state == "create"]
    findings = []
    gaps, overlaps = grid.gaps_and_overlaps(t.parts)
    for a, b in gaps:
        if grid.covered(a.hi, b.lo, t.creates):
            continue  # ranges of the grid this run creates (or withholds, and says why)
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
    if t.kind == "integer":
        findings.extend(key_findings(t))
    return findings


def key_findings(t: Table) -> list[Finding]:
    """partition_key_exhausting once the max key has used `key_exhaustion_warn` of its type."""
    assert t.base is not None and t.key_type is not None
    share = grid.key_used_share(t.base, t.key_type)
    if share < t.policy.key_exhaustion_warn:
        return []
    top = grid.INTEGER_LIMITS[t.key_type][1]
    bigger = "" if t.key_type == "int8" else "; convert it to bigint (ALTER TABLE ... ALTER COLUMN ... TYPE bigint rewrites the table) before it runs out"
    return [Finding(
        "partition_key_exhausting", t.label, round(share, 6),
        f"{t.label}: the partition key {t.key_name} ({t.key_type}) has reached {t.base}, {share:.1%} of its type's "
        f"maximum {top} (key_exhaustion_warn {t.policy.key_exhaustion_warn:g}); the last partition ends at MAXVALUE"
        + bigger,
        {"table": t.label, "key_type": t.key_type, "max_key": t.base, "type_max": top, "share": round(share, 6),
         "warn": t.policy.key_exhaustion_warn},
    )]


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


def settle_key(ctx: JobContext, t: Table, version: int) -> tuple[object, ...] | None:
    """What a time-keyed table's plan depends on besides its catalog row and partitions: the
    calendar slots it wants now, the partitions due for retirement now, the server and the
    timezone. None for integer keys, whose plan depends on the max key read each run."""
    p = t.policy
    if isinstance(p.interval, int):
        return None
    slots = tuple(grid.time_slots(ctx.now, p.interval, t.kind, ctx.timezone, p.premake))
    due: tuple[Partition, ...] = ()
    if p.retention is not None and not t.referenced:
        due = tuple(grid.retirable(t.parts, grid.time_cutoff(ctx.now, p.retention, t.kind, ctx.timezone), slots[0].lo))
    return slots, due, version, ctx.timezone


def plan(ctx: JobContext) -> Plan:
    out = Plan()
    tz, version = ctx.timezone, ctx.conn.info.server_version
    known = ctx.memo.setdefault("partitions", {})
    previous: dict[int, Table] = ctx.memo.setdefault("settled", {})
    tables = read_catalog(ctx.conn, ctx.section.tables, known, previous, ctx.connect) if ctx.section.tables else []
    # A table the last run planned with nothing to do, whose catalog row and partitions are the
    # same, is not planned again unless the clock moved what it wants (see Settled). At 10,000
    # tables planning each again was half of a run that had nothing to do.
    for i, t in enumerate(tables):
        if t.settled is not None and t.settled.key != settle_key(ctx, t, version):
            tables[i] = rebuilt(t)
    ok = []
    for t in tables:
        error = None if t.settled else validate(t)
        if error:
            out.errors.append(ItemError(t.label, error))
        else:
            ok.append(t)
    for t in ok:
        if t.settled:
            continue
        # A table whose reads would wait behind another session's lock is left alone this run,
        # before any read of it could stall (or, in a shared statement, fail) the others. One
        # pgupkeep may not change is read no further: its DDL would fail half-way.
        t.blocked = lock_in_the_way(t)
        t.denied = rights_problem(t.label, t.name.schema, t.rights, version) or storage_problem(t, version)
    read_integer_bases(ctx.conn, [t for t in ok if t.kind == "integer" and not (t.blocked or t.denied)])
    planned = [t for t in ok if t.kind != "integer" or t.base is not None]
    growth = ctx.memo.setdefault("growth", {})
    found: dict[int, list[Finding]] = {}  # id(table) -> what planning it found
    for t in planned:
        if t.settled:
            out.findings.extend(t.settled.findings)
            continue
        found[id(t)] = plan_table(t, ctx.now, tz)
        out.findings.extend(found[id(t)])
        if t.kind == "integer":
            assert t.base is not None
            t.growth, growth[t.label] = grid.key_growth(growth.get(t.label, ()), ctx.now.timestamp(), t.base)
    # An empty default partition (0 bytes) holds no rows: only the others are counted, including
    # any whose size was not read (None). The count is exact, taken just before the DDL; a row
    # arriving after it makes ATTACH fail for that table alone.
    todo = [t for t in planned if not (t.settled or t.blocked or t.denied)]
    probe_defaults(ctx.conn, [t for t in todo if t.default is not None and t.default_bytes != 0])
    assign_names(ctx.conn, todo)
    gauged: list[Table] = []
    previous.clear()
    for position, t in enumerate(tables, start=1):
        if t.settled:
            gauged.append(t)
            previous[position] = t
        elif t.blocked or t.denied:
            out.errors.append(ItemError(t.label, t.blocked or t.denied or ""))
            if t in planned:
                gauged.append(t)
        elif id(t) in found:
            errors = len(out.errors)
            table_steps(ctx, t, out)
            gauged.append(t)
            if not (t.steps or len(out.errors) > errors or t.default_rows or t.kind == "integer"
                    or (t.default is not None and t.default_bytes != 0)):
                key = settle_key(ctx, t, version)
                assert key is not None
                t.settled = Settled(key, tuple(found[id(t)]))
                t.slots = []  # each slot exists: kept for the next run, they would only take memory
                previous[position] = t

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
    """The table's findings, errors and steps, in order: creates, retirements an earlier run left
    half-done, then this run's retirements."""
    tz, p = ctx.timezone, t.policy
    findings, error = default_findings(t, tz)
    out.findings.extend(findings)
    if error:
        out.errors.append(error)
    steps = create_steps(ctx, t) + finish_steps(ctx, t)
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
    """premade / runway / default rows / targets as they stand after this run (before it, in plan
    mode)."""
    labels = {"table": t.label}
    p = t.policy
    integer = t.kind == "integer"
    at = t.base if integer else grid.now_key(ctx.now, t.kind, ctx.timezone)
    assert at is not None
    if t.settled is not None and t.gauged is not None and t.gauged[0] <= at < t.gauged[1]:
        # A settled table whose current partition is the same: only the runway moved.
        end, kept = t.gauged[2], t.gauged[3]
        return [*kept, Sample("partition_runway_seconds", (end - at) / grid.US, labels)]
    premade, reach = grid.runway(parts, at)
    want = p.runway_warn if p.runway_warn is not None else p.premake
    premake = p.premake
    if integer:
        # Near the end of its type fewer partitions fit than premake asks: the targets are what fits.
        assert t.key_type is not None and isinstance(p.interval, int)
        room = len(grid.integer_slots(at, p.interval, p.premake, t.key_type)) - 1
        premake, want = min(premake, room), min(want, room)
    samples = [
        Sample("partition_premade", float(premade), labels),
        Sample("partition_premake_target", float(premake), labels),
        Sample("partition_runway_warn", float(want), labels),
    ]
    if not (t.blocked or t.denied):  # a default partition that could not be counted must not read as empty
        samples.append(Sample("partition_default_rows", float(t.default_rows), labels))
    runway: dict[str, Any] = {}
    if integer:
        assert t.key_type is not None
        values = min(at + reach, grid.INTEGER_LIMITS[t.key_type][1] + 1) - at
        samples.append(Sample("partition_runway_values", float(values), labels))
        runway["runway_keys"] = values
        if t.growth is not None:
            runway["runway_seconds"] = values / t.growth if t.growth > 0 else math.inf
            samples.append(Sample("partition_runway_seconds", runway["runway_seconds"], labels))
    else:
        runway["runway_seconds"] = reach / grid.US
        samples.append(Sample("partition_runway_seconds", runway["runway_seconds"], labels))
    if p.retention is not None or t.marked:
        samples.append(Sample("partitions_detached", float(detached_after(t, t.steps)), labels))
    # Settled (a time key, no steps): the samples hold while the key stays in the current partition.
    if t.settled is not None and premade >= want and (current := grid.holding(parts, at)) is not None:
        t.gauged = (current.lo, current.hi, at + reach, tuple(s for s in samples if s.metric != "partition_runway_seconds"))
    if premade < want:
        out.findings.append(Finding(
            "partition_runway_low", t.label, premade,
            f"{t.label}: only {premade} partitions are ready after the current one (want {want}); "
            "see this run's errors or findings for what stopped pgupkeep from creating more",
            {"table": t.label, "premade": premade, "want": want, **runway},
        ))
    return samples


KIND = JobKind(name="partitions", plan=plan, writes=True)
