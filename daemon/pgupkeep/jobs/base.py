"""What every job receives (`JobContext`) and how a job kind is declared (`JobKind`).

A job is `plan(ctx) -> Plan`: it reads the catalog and says what it would do, as steps. The runner
applies the steps one at a time; a job never times itself, catches its own failure, logs or counts
metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from pgupkeep.db import DdlRunner
from pgupkeep.policy import Target
from pgupkeep.results import Finding, Plan
from pgupkeep.schedules import Schedule
from pgupkeep.units import QualifiedName


@dataclass
class JobContext:
    target: Target
    section: Any  # the job's own policy section, e.g. PartitionsSection
    conn: psycopg.Connection
    now: datetime  # timezone-aware
    timezone: ZoneInfo
    apply: bool = True
    standby: bool = False  # the server is in recovery: nothing may be written
    items: tuple[str, ...] | None = None  # restrict to these items (e.g. the views that are due)
    sleep: Callable[[float], None] = time.sleep
    connect: Callable[..., psycopg.Connection] | None = None  # another session to this target
    ddl_runner: DdlRunner | None = None
    # What this job kept from its earlier runs against this target in this process (the runner
    # hands the same dict to each run); a cache only: every run must be right with it empty.
    memo: dict[str, Any] = field(default_factory=dict)
    # True once the run has been asked to stop (shutdown): a step whose statement was cancelled
    # by it must not report that as its own failure.
    stopping: Callable[[], bool] = lambda: False

    def __post_init__(self) -> None:
        if self.ddl_runner is None:
            s = self.target.session
            self.ddl_runner = DdlRunner(lock_timeout=s.lock_timeout, retries=s.lock_retries, sleep=self.sleep)

    def run_ddl(
        self,
        statements: Sequence[sql.Composable | str],
        *,
        relations: Iterable[QualifiedName],
        transaction: bool = True,
        conn: psycopg.Connection | None = None,
    ) -> None:
        """Run DDL with lock_timeout and jittered retries; raises LockTimeoutError on giving up."""
        assert self.ddl_runner is not None
        self.ddl_runner.execute(conn or self.conn, statements, relations=list(relations), transaction=transaction)

    def lock_findings(self) -> list[Finding]:
        """Each DDL attempt that gave up on a lock, as a `lock_timeout` finding."""
        assert self.ddl_runner is not None
        return [
            Finding(
                kind="lock_timeout",
                object=w.relation,
                value=w.attempt,
                message=f"{w.relation}: lock not granted within lock_timeout (attempt {w.attempt}); blocked by pids {list(w.blocking_pids)}",
                detail={"blocking_pids": list(w.blocking_pids), "attempt": w.attempt, "sql": w.statement},
            )
            for w in self.ddl_runner.waits
        ]


@dataclass(frozen=True)
class ScheduleGroup:
    """One scheduler job of a kind on a target: the items it runs (None: the whole section) on
    one schedule."""

    items: tuple[str, ...] | None
    schedule: Schedule
    key: str = ""  # tells this kind's groups of one target apart (the scheduler job id's suffix)
    at_start: bool = True  # also run right after start-up, so a fresh daemon reports at once


def whole_section(section: Any) -> list[ScheduleGroup]:
    """The default: one run of the whole section on the section's schedule."""
    return [ScheduleGroup(None, section.schedule)]


def shared_schedules(pairs: Iterable[tuple[str, Schedule]]) -> list[ScheduleGroup]:
    """Items that share a schedule are due at once and run together (views, refreshed in
    dependency order): one group per distinct schedule, keyed by it."""
    groups: dict[str, tuple[list[str], Schedule]] = {}
    for item, schedule in pairs:
        groups.setdefault(str(schedule), ([], schedule))[0].append(item)
    return [ScheduleGroup(tuple(items), schedule, key=str(schedule)) for items, schedule in groups.values()]


@dataclass(frozen=True)
class JobKind:
    name: str  # = package name = policy key = `job` label
    plan: Callable[[JobContext], Plan]
    writes: bool  # skipped on a standby when applying
    # How the section's items map to scheduler jobs: the whole section on its schedule (default),
    # items grouped by shared schedule (materialized views), or each item alone (sql statements).
    schedule_groups: Callable[[Any], list[ScheduleGroup]] = whole_section
    # Whether a run of these items (None: all) writes, when that depends on the items (sql
    # statements say so one by one); None: `writes` says it for the whole kind.
    writes_items: Callable[[Any, tuple[str, ...] | None], bool] | None = None

    def writes_for(self, section: Any, items: tuple[str, ...] | None) -> bool:
        """Whether a run of these items is skipped on a standby."""
        return self.writes if self.writes_items is None else self.writes_items(section, items)
