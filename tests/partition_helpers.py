"""Helpers of the partitions tests: running the job with an injected clock, reading bounds back,
and catalog states that take more than one session to reach."""

from __future__ import annotations

from datetime import datetime

import psycopg
import pytest

from pgupkeep import db
from pgupkeep.jobs import partitions
from pgupkeep.jobs.base import JobContext
from pgupkeep.policy import parse_policy
from pgupkeep.results import JobOutput
from pgupkeep.runner import execute_job


def run_job(dsn: str, tables_yaml: str, now: datetime, *, apply: bool = True, timezone: str = "UTC",
            session: str = "", sleep=lambda s: None, memo: dict | None = None) -> JobOutput:
    text = (
        f"version: 1\ndaemon:\n  timezone: {timezone}\n"
        f"targets:\n  - name: t\n    dsn: \"${{DSN}}\"\n{session}"
        f"    partitions:\n      tables:\n{tables_yaml}"
    )
    policy = parse_policy(text, environ={"DSN": dsn})
    target = policy.targets[0]
    with db.connect(target) as c:
        ctx = JobContext(target=target, section=target.partitions, conn=c, now=now,
                         timezone=policy.daemon.zone, apply=apply, sleep=sleep,
                         connect=lambda **kw: db.connect(target, **kw), memo={} if memo is None else memo)
        return execute_job(partitions.KIND, ctx)


def bounds(conn: psycopg.Connection, parent: str) -> list[tuple[str, str]]:
    """(partition, bound expression) of a parent, by name, read in UTC."""
    conn.execute("SET TimeZone = 'UTC'")
    return conn.execute(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass ORDER BY 1""",
        (parent,),
    ).fetchall()


def actions(out: JobOutput) -> list[tuple[str, str, bool]]:
    return [(a.action, a.object, a.applied) for a in out.actions]


def samples(out: JobOutput) -> dict[tuple[str, str], float]:
    return {(s.metric, s.labels["table"]): s.value for s in out.samples}


def mark(parent: str, action: str) -> str:
    """The COMMENT statement that marks a partition of public.<parent> as being retired."""
    fate = ("it is dropped once detached; a run that stopped half-way is finished by the next one" if action == "drop"
            else "it is detached and kept: archive or drop it yourself")
    return (f"IS 'pgupkeep:retire:{action}:\"public\".\"{parent}\"\npgupkeep retired this partition of public.{parent} "
            f"(retention_action: {action}); {fate}.';\n")



def leave_detach_pending(dsn: str, parent: str, partition: str) -> None:
    """A concurrent detach that gives up while waiting for an older snapshot stays pending."""
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as other:
        holder.execute(f"SELECT count(*) FROM {parent}")  # an open transaction with a snapshot
        other.execute("SET lock_timeout = '100ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute(f"ALTER TABLE {parent} DETACH PARTITION {partition} CONCURRENTLY")
        holder.rollback()
