"""The shared vocabulary: Step, Plan, Action, Finding, Sample and JobResult.

A job plans (`Plan`: the steps it would take, what it saw); the runner applies the steps one at a
time and wraps everything in a `JobResult` with timing and outcome, and every sink (log line,
metrics, health, `--json`) reads that one value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# cancelled: stopped at a step boundary by a shutdown or a lost lease; never an error.
Outcome = Literal["success", "failure", "skipped", "cancelled"]
OUTCOMES: tuple[str, ...] = ("success", "failure", "skipped", "cancelled")

ACTIONS = (
    "create_partition",
    "detach_partition",
    "drop_partition",
    "move_default_rows",
    "refresh_materialized_view",
    "cancel_backend",
    "terminate_backend",
    "vacuum_table",
    "reindex_index",
    "drop_invalid_index",
    "run_sql",
    "finish_retirement",
)
FINDINGS = (
    "long_running_query",
    "idle_in_transaction",
    "bloated_table",
    "default_partition_rows",
    "partition_runway_low",
    "partition_gap",
    "partition_overlap",
    "invalid_index",
    "unused_index",
    "xid_wraparound",
    "lock_timeout",
    "connections_high",
    "table_skipped_locked",
    "matview_refresh_skipped",
    "lock_wait",
    "replication_slot_inactive",
    "replication_slot_wal_retained",
    "replication_slot_lost",
    "replication_lag",
    "sequence_exhausting",
    "xmin_horizon_held",
    "prepared_transaction_old",
    "table_freeze_age",
    "autovacuum_lagging",
    "slow_statement",
    "n_plus_one_statement",
    "unindexed_foreign_key",
    "bloated_index",
    "index_skipped_locked",
    "insufficient_privilege",
    "extension_missing",
    "partition_key_exhausting",
)


@dataclass(frozen=True)
class Action:
    """A change a job made (applied) or would make (plan)."""

    action: str
    object: str
    sql: str
    applied: bool = False
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "object": self.object, "sql": self.sql, "applied": self.applied}
        out.update(self.detail)
        return out


@dataclass(frozen=True)
class Finding:
    """Something a job saw that an operator should know about."""

    kind: str
    object: str
    value: float | int | None = None
    message: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "object": self.object, "value": self.value}
        if self.message:
            out["message"] = self.message
        out.update(self.detail)
        return out


@dataclass(frozen=True)
class Sample:
    """One gauge reading, named as in the spec without the `pgupkeep_` prefix; for a name in
    metrics.SAMPLE_COUNTERS, the amount its counter moves by (a delta since the last run).

    Labels hold only policy names (table, view) and bounded states, never query text or pids.
    A job reports the whole set of a gauge family each run; series it stops reporting vanish.
    """

    metric: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemError:
    """One item (table, view, session) that failed while the job went on with the rest."""

    object: str
    message: str


@dataclass
class JobOutput:
    """What a job function returns."""

    actions: list[Action] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)

    def extend(self, other: JobOutput) -> None:
        self.actions.extend(other.actions)
        self.findings.extend(other.findings)
        self.samples.extend(other.samples)
        self.errors.extend(other.errors)


@dataclass(frozen=True)
class Step:
    """One unit of change (create-and-attach one partition, refresh one view, signal one session,
    vacuum one table), applied by the runner, never by the job.

    `action` is what `pgupkeep plan` prints (the exact SQL, `applied=False`). `apply` runs it and
    raises on failure; it returns None (the action happened as planned) or a JobOutput of its own
    (its applied action with details such as rows or duration, and any findings, samples or item
    errors). A step that fails, or returns errors, ends its `item`: the item's later steps are not
    run (they would meet the same lock or leave a hole), the other items go on. Before each
    `writes` step the runner checks that the run was not asked to stop and that the lease is held.
    """

    action: Action
    apply: Callable[[], JobOutput | None]
    item: str
    writes: bool = True


@dataclass
class Plan:
    """What a job would do now: pure given the catalog rows it read.

    `settle(applied)` (optional) gives what depends on which steps were applied, such as the
    gauges as they stand after the run; `pgupkeep plan` calls it with no step applied.

    A step may insert steps into `steps` right after itself while it is applied (a statement's
    next batch, known only once this one ran): the runner takes the steps in list order as it goes,
    fencing each.
    """

    steps: list[Step] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    settle: Callable[[Sequence[Step]], JobOutput] | None = None


@dataclass(frozen=True)
class JobResult:
    target: str
    job: str
    outcome: Outcome
    duration_seconds: float
    started_at: float  # unix time
    actions: tuple[Action, ...] = ()
    findings: tuple[Finding, ...] = ()
    samples: tuple[Sample, ...] = ()
    errors: tuple[ItemError, ...] = ()
    error: str | None = None
    reason: str | None = None
    item: str | None = None  # e.g. the view, for jobs scheduled per item
    applied: bool = True  # False for `plan`
    target_up: bool | None = None  # None: no connection was attempted
    leader: bool | None = None  # None: leases not in use (plan, or no lease asked)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "job": self.job,
            "outcome": self.outcome,
            "duration_seconds": round(self.duration_seconds, 6),
            "actions": [a.to_dict() for a in self.actions],
            "findings": [f.to_dict() for f in self.findings],
            "error": self.error,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.item:
            out["item"] = self.item
        if self.errors:
            out["errors"] = [asdict(e) for e in self.errors]
        return out
