"""The policy model: frozen, typed sections with a docstring per key (the reference's source)."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
)

from pgupkeep import reloptions
from pgupkeep.policy_types import (
    ConnectTimeout,
    Dsn,
    Duration,
    Interval,
    Listen,
    MisfireGrace,
    Period,
    PgTimeout,
    PositiveDuration,
    RelationName,
    RetentionText,
    ScheduleText,
    Size,
    SqlText,
    StatementBudget,
    StatementTimeout,
    TargetName,
    TimezoneName,
    WindowText,
)
from pgupkeep.schedules import Schedule, parse_schedule
from pgupkeep.sqltext import read_statement
from pgupkeep.units import BIGINT_MAX, QualifiedName, Retention, parse_retention

JOB_KINDS = ("partitions", "materialized_views", "long_running_queries", "bloat", "health", "query_insights", "sql")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class HistoryPolicy(_Model):
    dsn: Dsn
    """The database that keeps the history (libpq URI or key=value string; PG* variables apply)."""
    table: RelationName = QualifiedName("pgupkeep", "job_runs")
    """Schema-qualified table of the history; pgupkeep creates the schema and table if missing."""
    retention: RetentionText = parse_retention("30 days")
    """Rows older than this are deleted (hourly, in batches): an age such as 30 days or 6 months."""

    @field_validator("retention")
    @classmethod
    def _an_age(cls, value: Retention) -> Retention:
        if value.integer is not None:
            raise ValueError("must be an age such as 30 days or 6 months")
        return value


class DaemonPolicy(_Model):
    listen: Listen = "0.0.0.0:9188"
    """Address of the HTTP server for /metrics, /healthz and /readyz."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """auto (JSON unless stdout is a terminal), json or console."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged: debug, info, warning or error."""
    timezone: TimezoneName = "UTC"
    """IANA time zone for partition boundaries and cron schedules."""
    max_parallel_jobs: int = Field(4, ge=1, le=64)
    """Job runs at once across the whole fleet; an overrunning job is skipped, never queued."""
    shutdown_grace: Duration = timedelta(seconds=30)
    """On SIGTERM, running jobs get this long to finish before they are cancelled on the server (0: cancelled at once)."""
    reload_on_change: bool = True
    """Re-read the policy when the file changes (as well as on SIGHUP)."""
    max_leases: int | None = Field(None, ge=1)
    """Lead at most this many targets in this replica, so a fleet spreads over replicas (null: no cap)."""
    jitter: Duration = Field(timedelta(0))
    """Random delay added to each scheduled run, to spread a fleet."""
    misfire_grace: MisfireGrace = Field(timedelta(seconds=30))
    """A run that could not start within this of its scheduled time is skipped (at least 1s)."""
    log_query_text: Literal["full", "truncated", "none"] = "truncated"
    """Other sessions' query text in logs and findings: full, truncated (the first 200 characters) or none. A target may override it."""
    history: HistoryPolicy | None = None
    """Write one row per job run (every kind) into a table of this database (off unless set)."""

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class SessionSettings(_Model):
    connect_timeout: ConnectTimeout = timedelta(seconds=5)
    """How long to wait for a connection (more than 0; libpq rounds up to whole seconds, and below 2s to 2s)."""
    lock_timeout: PgTimeout = timedelta(seconds=2)
    """No statement of pgupkeep waits longer than this for a lock (at most 2147483647ms). 0 is PostgreSQL's no limit: DDL may then queue for a lock indefinitely, and the application's queries queue behind it; not advised."""
    lock_retries: int = Field(5, ge=0, le=100)
    """DDL that gave up on a lock is retried this many times, with jittered backoff."""
    statement_timeout: PgTimeout = timedelta(minutes=15)
    """Upper bound of any statement pgupkeep runs (a view refresh uses its own timeout; 0: no limit; at most 2147483647ms)."""
    idle_in_transaction_session_timeout: PgTimeout = timedelta(minutes=1)
    """Upper bound of an idle transaction of pgupkeep's own sessions (0: no limit; at most 2147483647ms)."""


def _reloption_field(option: reloptions.Reloption) -> tuple[Any, Any]:
    schema: dict[str, Any] = {
        "int": {"type": "integer"}, "real": {"type": "number"}, "bool": {"type": "boolean"},
        "enum": {"anyOf": [{"enum": list(reloptions.ENUM_VALUES)}, {"type": "boolean"}]},
    }[option.kind]
    if option.lo is not None:
        schema = {**schema, "minimum": option.lo, "maximum": option.hi}
    kind = Annotated[Any, PlainValidator(functools.partial(reloptions.check, option.name)), WithJsonSchema(schema)]
    return kind, Field(None, alias=option.name, description=reloptions.describe(option))


StorageParameters = create_model(  # type: ignore[call-overload]
    "StorageParameters",
    __base__=_Model,
    __doc__="Storage parameters (reloptions) each new partition is created WITH.",
    **{name.replace(".", "__"): _reloption_field(option) for name, option in reloptions.RELOPTIONS.items()},
)
# A mapping of PostgreSQL's own reloption names, not policy keys of pgupkeep's: validated by the
# model above (each problem located at its key), documented from reloptions.RELOPTIONS.
StorageParameterMap = Annotated[
    Any,
    PlainValidator(lambda value: None if value is None else StorageParameters.model_validate(value)),
    WithJsonSchema({"anyOf": [StorageParameters.model_json_schema(), {"type": "null"}]}),
]


class PartitionTable(_Model):
    table: RelationName
    """Schema-qualified parent table; must already be PARTITION BY RANGE."""
    interval: Interval
    """hourly, daily, weekly (ISO weeks), monthly, quarterly, yearly, or an integer width for integer keys."""
    premake: int = Field(3, ge=0, le=1000)
    """Partitions kept ready after the current one."""
    retention: RetentionText | None = None
    """Retire partitions whose upper bound is older than this (90 days, 24 months, 2 years; a number for integer keys). Omit to keep everything."""
    retention_action: Literal["detach", "drop"] = "detach"
    """detach (DETACH ... CONCURRENTLY where possible) or drop."""
    on_default_conflict: Literal["fail", "skip", "move"] = "fail"
    """When the default partition holds rows of a range to create: fail (that range is withheld and the table reported failed; later ranges are still created), skip (withheld, not failed), or move the rows into the new partition."""
    runway_warn: int | None = Field(
        None, ge=0, description="Finding partition_runway_low when fewer partitions than this are ready (default: premake)."
    )
    inherit_privileges: bool = True
    """Copy the parent's table and column GRANTs to each new partition (it always takes the parent's owner)."""
    storage_parameters: StorageParameterMap = None
    """Storage parameters each new partition is created WITH, e.g. {fillfactor: 70, autovacuum_vacuum_scale_factor: 0.05}; see the table below."""
    key_exhaustion_warn: float = Field(0.8, gt=0, le=1)
    """Integer keys: finding partition_key_exhausting once the max key has used this share of the key type's range."""


class PartitionsSection(_Model):
    schedule: ScheduleText = parse_schedule("every 1h")
    """When the partitions job runs."""
    tables: tuple[PartitionTable, ...] = ()
    """The partitioned tables to keep."""


class ViewPolicy(_Model):
    view: RelationName
    """Schema-qualified materialized view."""
    concurrently: Literal["required", "preferred", "never"] = "required"
    """required: REFRESH ... CONCURRENTLY or fail; preferred: fall back to a blocking refresh; never: always blocking."""
    timeout: StatementTimeout = timedelta(minutes=10)
    """statement_timeout of the refresh (1ms to 2147483647ms)."""
    schedule: ScheduleText | None = None
    """This view's own schedule (default: the section's)."""


class MaterializedViewsSection(_Model):
    schedule: ScheduleText = parse_schedule("every 15m")
    """Default schedule of the views below."""
    views: tuple[ViewPolicy, ...] = ()
    """The materialized views to refresh."""

    def schedule_of(self, view: ViewPolicy) -> Schedule:
        return view.schedule or self.schedule


class LongRunningQueriesSection(_Model):
    schedule: ScheduleText = parse_schedule("every 30s")
    """When sessions are checked."""
    warn_after: PositiveDuration = timedelta(minutes=5)
    """Active queries older than this (from query_start) are flagged."""
    idle_in_transaction_after: PositiveDuration = timedelta(minutes=1)
    """Sessions idle in transaction longer than this (from state_change) are flagged."""
    cancel_after: PositiveDuration | None = None
    """Cancel active queries older than this (off unless set)."""
    terminate_after: PositiveDuration | None = None
    """Terminate sessions (active or idle in transaction) older than this (off unless set)."""
    dry_run: bool = False
    """Log and count what would be signalled; signal nothing."""
    ignore_users: tuple[str, ...] = ()
    """Sessions of these users are never flagged or signalled."""
    ignore_applications: tuple[str, ...] = ()
    """Sessions of these application_names are never flagged or signalled."""
    scope: Literal["database", "server"] = "database"
    """database: judge and signal sessions of the target's database only; server: of every database (use on one target per server)."""
    lock_wait_after: PositiveDuration = timedelta(seconds=30)
    """Finding lock_wait, naming the root blocker, when a session has waited on a lock longer than this."""
    terminate_idle_blockers_after: PositiveDuration | None = None
    """Terminate a root blocker idle in transaction that has held up a lock chain longer than this (off unless set)."""


class BloatSection(_Model):
    schedule: ScheduleText = parse_schedule("every 1h")
    """When tables are checked for bloat."""
    min_table_size: Size = 10 * 1024**2
    """Smaller tables are not checked."""
    max_dead_tuple_ratio: float = Field(0.2, ge=0, le=1)
    """Flag a table whose dead tuples exceed this share (with at least min_dead_tuples)."""
    min_dead_tuples: int = Field(1000, ge=0, le=BIGINT_MAX)
    """Fewer dead tuples than this never flag a table by the dead-tuple ratio."""
    max_bloat_ratio: float = Field(0.5, ge=0, le=1)
    """Flag a table whose estimated wasted share exceeds this."""
    report_top: int = Field(50, ge=0, le=10_000)
    """At most this many (the worst) tables get per-table series."""
    vacuum: bool = False
    """VACUUM (ANALYZE) flagged tables, one at a time (never FULL)."""
    exact_time_budget: StatementBudget = Field(
        timedelta(seconds=10),
        description="Time spent on exact pgstattuple_approx figures for the worst candidates; the rest keep the estimate (0: none).",
    )
    vacuum_timeout: StatementTimeout = Field(timedelta(hours=1), description="statement_timeout of each VACUUM (1ms to 2147483647ms).")
    min_index_size: Size = 10 * 1024**2
    """Smaller B-tree indexes are not checked for bloat."""
    max_index_bloat_ratio: float = Field(0.5, ge=0, le=1)
    """Flag a B-tree index whose wasted share (what a REINDEX would give back) exceeds this."""
    reindex: bool = False
    """REINDEX INDEX CONCURRENTLY flagged indexes and invalid ones left by a failed CREATE INDEX CONCURRENTLY, one at a time."""
    reindex_window: WindowText | None = None
    """Five-field cron expression in the daemon's timezone: a REINDEX starts only in a minute it matches ("* 2-4 * * 0,6" is 02:00-04:59 on weekends). Omit for any time."""
    max_reindex_size: Size = 10 * 1024**3
    """Indexes larger than this are never rebuilt (a REINDEX CONCURRENTLY needs as much free disk again)."""


class HealthSection(_Model):
    schedule: ScheduleText = parse_schedule("every 1m")
    """When the health checks run."""
    xid_age_threshold: int = Field(1_200_000_000, ge=1, le=2_147_483_647)
    """Finding xid_wraparound when age(datfrozenxid) passes this."""
    unused_index_min_size: Size = 10 * 1024**2
    """Unused indexes smaller than this are not reported."""
    connections_warn_ratio: float = Field(0.8, ge=0, le=1)
    """Finding connections_high above this share of max_connections."""
    slot_inactive_after: Duration = timedelta(minutes=10)
    """Finding replication_slot_inactive for a slot inactive this long (PostgreSQL 17+: since its inactive_since; before 17: since pgupkeep first saw it inactive)."""
    slot_retained_warn: Size = 10 * 1024**3
    """Finding replication_slot_wal_retained when a slot keeps this much WAL (or its wal_status is unreserved)."""
    replication_lag_warn: Duration = timedelta(minutes=5)
    """Finding replication_lag when a standby's write, flush or replay lag (on a standby: its replay delay) passes this."""
    xmin_horizon_warn: int = Field(100_000_000, ge=1, le=2_147_483_647)
    """Finding xmin_horizon_held when the oldest xmin holder (session, replication slot, prepared transaction, standby feedback) is this many transactions old."""
    prepared_transaction_after: Duration = timedelta(minutes=5)
    """Finding prepared_transaction_old for a prepared transaction of this database older than this."""
    freeze_age_warn: float = Field(0.8, gt=0, le=10)
    """Finding table_freeze_age when a table's age(relfrozenxid) or mxid_age(relminmxid) passes this share of its effective autovacuum_freeze_max_age (or multixact one; reloptions honoured; 1.0 = anti-wraparound vacuum due)."""
    autovacuum_lag_after: Duration = timedelta(hours=1)
    """Finding autovacuum_lagging for a table whose dead tuples have been over its autovacuum threshold (reloptions honoured) this long without a vacuum."""
    sequence_warn: float = Field(0.75, gt=0, le=1)
    """Finding sequence_exhausting when a sequence has used this share of its range, capped by the type of the column it feeds."""
    report_top: int = Field(50, ge=0, le=10_000)
    """At most this many (the worst) slots, sequences and tables get per-object series and findings."""


class QueryInsightsSection(_Model):
    schedule: ScheduleText = parse_schedule("every 5m")
    """When statements, foreign keys and table sizes are read; statement figures are per interval between runs."""
    slow_mean_after: Duration = timedelta(milliseconds=100)
    """Finding slow_statement when a statement's mean execution time in the interval exceeds this."""
    min_calls: int = Field(5, ge=1)
    """A statement called fewer times in the interval is never flagged slow."""
    n_plus_one_calls_per_second: float = Field(20, gt=0)
    """Finding n_plus_one_statement when a statement ran more often than this per second in the interval, and also met n_plus_one_mean_under (see docs/query-insights.md)."""
    n_plus_one_mean_under: Duration = timedelta(milliseconds=5)
    """... with a mean execution time under this, about one row per call (at most 1.5 on average) and a WHERE with an equality to a parameter (`= $1`)."""
    report_top: int = Field(20, ge=0, le=1000)
    """At most this many slow_statement and n_plus_one_statement findings a run, statements with a time series, and tables with size series."""
    min_table_size: Size = 10 * 1024**2
    """Foreign keys of smaller referencing tables are not reported."""


SqlParam = str | int | float | bool | None


class SqlJob(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,63}$")]
    """Unique name of the statement in its target ([a-z0-9_-]); the `name` label and the run's item."""
    schedule: ScheduleText
    """When the statement runs: cron (also @hourly, @daily, @weekly, @monthly, @yearly) or every <duration>; a cron schedule fires at its times only, `every` also at start-up."""
    sql: SqlText
    """Exactly one SQL statement, run as written; `$1`, `$2` ... are the params below."""
    params: tuple[SqlParam, ...] = Field((), validate_default=True)
    """Values of `$1`, `$2` ..., bound as query parameters (never spliced into the text)."""
    timeout: StatementTimeout | None = None
    """statement_timeout of each batch (default: the target's statement_timeout; 1ms to 2147483647ms)."""
    transaction: bool = Field(True, validate_default=True)
    """Run each batch in a transaction; false runs it in autocommit (VACUUM, CREATE INDEX CONCURRENTLY, CALL of a procedure that commits)."""
    writes: bool = True
    """The statement writes: skipped on a standby. false runs it on a standby too, in a read-only session."""
    repeat_until_rows_below: int | None = Field(None, ge=1, le=BIGINT_MAX)
    """Batching: run again while a batch affects at least this many rows (each batch its own transaction); off unless set."""
    max_batches: int = Field(100, ge=1, le=100_000)
    """Batching: at most this many batches per run."""
    pause_between_batches: Duration = timedelta(0)
    """Batching: pause between two batches (a shutdown cuts it short)."""
    explain: bool = Field(False, validate_default=True)
    """`pgupkeep plan` also prints the statement's EXPLAIN (never EXPLAIN ANALYZE: nothing runs)."""

    @field_validator("params")
    @classmethod
    def _params_match(cls, value: tuple[SqlParam, ...], info: ValidationInfo) -> tuple[SqlParam, ...]:
        if "sql" not in info.data:
            return value
        used = read_statement(info.data["sql"]).params
        wanted = set(range(1, len(value) + 1))
        if used - wanted:
            missing = ", ".join(f"${n}" for n in sorted(used - wanted))
            raise ValueError(f"the sql uses {missing} but params lists {len(value)} values")
        if wanted - used:
            unused = ", ".join(f"${n}" for n in sorted(wanted - used))
            raise ValueError(f"the sql does not use {unused}; list exactly the values of $1..${len(value)}")
        return value

    @field_validator("transaction")
    @classmethod
    def _fits_a_transaction(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "sql" in info.data and (why := read_statement(info.data["sql"]).needs_autocommit()):
            raise ValueError(f"{why}; set transaction: false")
        return value

    @field_validator("explain")
    @classmethod
    def _explainable(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "sql" in info.data and not read_statement(info.data["sql"]).explainable:
            raise ValueError("only SELECT, INSERT, UPDATE, DELETE, MERGE, VALUES, TABLE and WITH statements have a plan to explain")
        return value


class SqlSection(_Model):
    jobs: tuple[SqlJob, ...] = ()
    """The named statements, each on its own schedule."""

    def job(self, name: str) -> SqlJob:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)


class Discover(_Model):
    include: tuple[str, ...] = ("*",)
    """Databases to keep, as shell patterns (tenant_*); templates are never included."""
    exclude: tuple[str, ...] = ()
    """Databases to leave alone, as shell patterns (e.g. postgres); exclude wins over include."""
    every: Period = Field(timedelta(minutes=5))
    """How often the server's databases are listed again: new ones are picked up, dropped ones let go (at least 1s)."""


class Target(_Model):
    name: TargetName
    """Unique name of the target ([a-z0-9_-]); the `target` label."""
    dsn: Dsn
    """libpq URI or key=value string; PG* environment variables and ~/.pgpass apply."""
    connect_timeout: ConnectTimeout | None = None
    """Overrides defaults.connect_timeout."""
    lock_timeout: PgTimeout | None = None
    """Overrides defaults.lock_timeout."""
    lock_retries: int | None = Field(None, ge=0, le=100)
    """Overrides defaults.lock_retries."""
    statement_timeout: PgTimeout | None = None
    """Overrides defaults.statement_timeout."""
    idle_in_transaction_session_timeout: PgTimeout | None = None
    """Overrides defaults.idle_in_transaction_session_timeout."""
    log_query_text: Literal["full", "truncated", "none"] | None = None
    """Overrides daemon.log_query_text for this target."""
    partitions: PartitionsSection | None = None
    """Pre-create and retire time or integer range partitions."""
    materialized_views: MaterializedViewsSection | None = None
    """Refresh materialized views."""
    long_running_queries: LongRunningQueriesSection | None = None
    """Flag (and optionally signal) long-running and idle-in-transaction sessions."""
    bloat: BloatSection | None = None
    """Flag (and optionally vacuum) bloated tables; flag (and optionally rebuild) bloated indexes."""
    health: HealthSection | None = None
    """Connections, transaction-ID age, invalid and unused indexes, database size, replication slots and lag, sequences, xmin horizon, per-table freeze age and autovacuum lag."""
    query_insights: QueryInsightsSection | None = None
    """Slow and N+1-shaped statements (pg_stat_statements deltas), unindexed foreign keys, largest tables."""


    sql: SqlSection | None = None
    """Named SQL statements on their own schedules, with timeouts, lock budgets and batching."""
    discover: Discover | None = None
    """Make every matching database of the DSN's server a target `<name>/<database>` with these job sections (the DSN names the database discovery connects to; postgres if none)."""

    def section(self, kind: str) -> BaseModel | None:
        return getattr(self, kind)

    def job_kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind in JOB_KINDS if getattr(self, kind) is not None)

    @property
    def session(self) -> SessionSettings:
        """This target's session settings (defaults already merged in by the loader)."""
        return SessionSettings(
            **{k: getattr(self, k) for k in SessionSettings.model_fields if getattr(self, k) is not None}
        )


class Policy(_Model):
    version: Literal[1]
    """Policy format version; always 1."""
    daemon: DaemonPolicy = DaemonPolicy()
    """Settings of the daemon process itself."""
    defaults: SessionSettings = SessionSettings()
    """Session settings applied to every target; a target may override each."""
    targets: tuple[Target, ...] = ()
    """The databases to keep."""

    def target(self, name: str) -> Target:
        for target in self.targets:
            if target.name == name:
                return target
        raise KeyError(name)
