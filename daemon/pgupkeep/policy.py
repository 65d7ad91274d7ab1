"""The policy: YAML in, a frozen and typed `Policy` out, or every problem at once.

Each problem carries the file, line, column and key path it is about, so an operator can go
straight to it. A `Policy` only exists once it is valid; the scheduler accepts nothing else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
)

from pgupkeep.schedules import Schedule, parse_schedule
from pgupkeep.units import (
    QualifiedName,
    Retention,
    format_duration,
    parse_duration,
    parse_qualified_name,
    parse_retention,
    parse_size,
)

JOB_KINDS = ("partitions", "materialized_views", "long_running_queries", "bloat", "health")

Duration = Annotated[
    timedelta,
    PlainValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d|w)$", "examples": ["30s", "5m"]}),
]
Size = Annotated[
    int,
    PlainValidator(parse_size),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "pattern": r"^\d+(\.\d+)?\s*[kKmMgGtT]?i?[bB]$"}, {"type": "integer", "minimum": 0}]}
    ),
]
ScheduleText = Annotated[
    Schedule,
    PlainValidator(parse_schedule),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {"type": "string", "description": "five-field cron (0 and 7 are Sunday) or 'every <duration>'", "examples": ["every 30s", "15 * * * *"]}
    ),
]
RetentionText = Annotated[
    Retention,
    PlainValidator(parse_retention),
    PlainSerializer(lambda r: r.integer if r.integer is not None else r.text),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "examples": ["90 days", "24 months", "2 years"]}, {"type": "integer", "minimum": 1}]}
    ),
]
RelationName = Annotated[
    QualifiedName,
    PlainValidator(parse_qualified_name),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "schema-qualified name", "examples": ["public.orders"]}),
]

_INTERVALS = ("hourly", "daily", "weekly", "monthly", "quarterly", "yearly")
INTERVAL_HELP = "must be one of hourly, daily, weekly, monthly, quarterly, yearly or a positive integer"


def _parse_interval(value: object) -> str | int:
    if isinstance(value, bool):
        raise ValueError(INTERVAL_HELP)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(INTERVAL_HELP)
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _INTERVALS:
            return text
        if text.isdigit() and int(text) > 0:
            return int(text)
    raise ValueError(INTERVAL_HELP)


Interval = Annotated[
    str | int,
    PlainValidator(_parse_interval),
    WithJsonSchema({"anyOf": [{"enum": list(_INTERVALS)}, {"type": "integer", "minimum": 1}]}),
]


def _parse_timezone(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be an IANA time zone such as UTC or Europe/Berlin")
    try:
        ZoneInfo(value.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value.strip()!r}; use an IANA name such as Europe/Berlin") from None
    return value.strip()


TimezoneName = Annotated[str, PlainValidator(_parse_timezone), WithJsonSchema({"type": "string", "examples": ["UTC"]})]

_LISTEN_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]*):(\d{1,5})$")


def _parse_listen(value: object) -> str:
    if isinstance(value, str):
        match = _LISTEN_RE.match(value.strip())
        if match and 0 <= int(match.group(2)) <= 65535:
            return value.strip()
    raise ValueError('must be "host:port" such as "0.0.0.0:9188"')


Listen = Annotated[str, PlainValidator(_parse_listen), WithJsonSchema({"type": "string", "examples": ["0.0.0.0:9188"]})]


def _parse_dsn(value: object) -> str:
    # Messages here never quote the value: it may hold a password.
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a libpq connection URI or key=value string (is its environment variable set?)")
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(value)
    except Exception:
        raise ValueError("is not a valid libpq connection URI or key=value string") from None
    return value


Dsn = Annotated[str, PlainValidator(_parse_dsn), WithJsonSchema({"type": "string", "examples": ["${SHOP_DATABASE_URL}"]})]
TargetName = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,63}$")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


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
    """On SIGTERM, running jobs get this long to finish before they are cancelled on the server."""
    reload_on_change: bool = True
    """Re-read the policy when the file changes (as well as on SIGHUP)."""
    max_leases: int | None = Field(None, ge=1)
    """Lead at most this many targets in this replica, so a fleet spreads over replicas (null: no cap)."""
    jitter: Duration = Field(timedelta(0))
    """Random delay added to each scheduled run, to spread a fleet."""
    misfire_grace: Duration = Field(timedelta(seconds=30))
    """A run that could not start within this of its scheduled time is skipped."""

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class SessionSettings(_Model):
    connect_timeout: Duration = timedelta(seconds=5)
    """How long to wait for a connection (libpq rounds below 2s up to 2s)."""
    lock_timeout: Duration = timedelta(seconds=2)
    """No statement of pgupkeep waits longer than this for a lock."""
    lock_retries: int = Field(5, ge=0, le=100)
    """DDL that gave up on a lock is retried this many times, with jittered backoff."""
    statement_timeout: Duration = timedelta(minutes=15)
    """Upper bound of any statement pgupkeep runs (a view refresh uses its own timeout)."""
    idle_in_transaction_session_timeout: Duration = timedelta(minutes=1)
    """Upper bound of an idle transaction of pgupkeep's own sessions."""


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
    """When the default partition holds rows of a partition to create: fail, skip that partition, or move the rows."""
    runway_warn: int | None = Field(
        None, ge=0, description="Finding partition_runway_low when fewer partitions than this are ready (default: premake)."
    )


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
    timeout: Duration = timedelta(minutes=10)
    """statement_timeout of the refresh."""
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
    warn_after: Duration = timedelta(minutes=5)
    """Active queries older than this (from query_start) are flagged."""
    idle_in_transaction_after: Duration = timedelta(minutes=1)
    """Sessions idle in transaction longer than this (from state_change) are flagged."""
    cancel_after: Duration | None = None
    """Cancel active queries older than this (off unless set)."""
    terminate_after: Duration | None = None
    """Terminate sessions (active or idle in transaction) older than this (off unless set)."""
    dry_run: bool = False
    """Log and count what would be signalled; signal nothing."""
    ignore_users: tuple[str, ...] = ()
    """Sessions of these users are never flagged or signalled."""
    ignore_applications: tuple[str, ...] = ()
    """Sessions of these application_names are never flagged or signalled."""


class BloatSection(_Model):
    schedule: ScheduleText = parse_schedule("every 1h")
    """When tables are checked for bloat."""
    min_table_size: Size = 10 * 1024**2
    """Smaller tables are not checked."""
    max_dead_tuple_ratio: float = Field(0.2, ge=0, le=1)
    """Flag a table whose dead tuples exceed this share (with at least min_dead_tuples)."""
    min_dead_tuples: int = Field(1000, ge=0)
    """Fewer dead tuples than this never flag a table by the dead-tuple ratio."""
    max_bloat_ratio: float = Field(0.5, ge=0, le=1)
    """Flag a table whose estimated wasted share exceeds this."""
    report_top: int = Field(50, ge=0, le=10_000)
    """At most this many (the worst) tables get per-table series."""
    vacuum: bool = False
    """VACUUM (ANALYZE) flagged tables, one at a time (never FULL)."""
    exact_time_budget: Duration = Field(
        timedelta(seconds=10), description="Time spent on exact pgstattuple_approx figures for the worst candidates; the rest keep the estimate."
    )
    vacuum_timeout: Duration = Field(timedelta(hours=1), description="statement_timeout of each VACUUM.")


class HealthSection(_Model):
    schedule: ScheduleText = parse_schedule("every 1m")
    """When the health checks run."""
    xid_age_threshold: int = Field(1_200_000_000, ge=1, le=2_147_483_647)
    """Finding xid_wraparound when age(datfrozenxid) passes this."""
    unused_index_min_size: Size = 10 * 1024**2
    """Unused indexes smaller than this are not reported."""
    connections_warn_ratio: float = Field(0.8, ge=0, le=1)
    """Finding connections_high above this share of max_connections."""


class Target(_Model):
    name: TargetName
    """Unique name of the target ([a-z0-9_-]); the `target` label."""
    dsn: Dsn
    """libpq URI or key=value string; PG* environment variables and ~/.pgpass apply."""
    connect_timeout: Duration | None = None
    """Overrides defaults.connect_timeout."""
    lock_timeout: Duration | None = None
    """Overrides defaults.lock_timeout."""
    lock_retries: int | None = Field(None, ge=0, le=100)
    """Overrides defaults.lock_retries."""
    statement_timeout: Duration | None = None
    """Overrides defaults.statement_timeout."""
    idle_in_transaction_session_timeout: Duration | None = None
    """Overrides defaults.idle_in_transaction_session_timeout."""
    partitions: PartitionsSection | None = None
    """Pre-create and retire time or integer range partitions."""
    materialized_views: MaterializedViewsSection | None = None
    """Refresh materialized views."""
    long_running_queries: LongRunningQueriesSection | None = None
    """Flag (and optionally signal) long-running and idle-in-transaction sessions."""
    bloat: BloatSection | None = None
    """Flag (and optionally vacuum) bloated tables."""
    health: HealthSection | None = None
    """Connections, transaction-ID age, invalid and unused indexes, database size."""

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


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


Path_ = tuple[str | int, ...]
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Reader:
    """Builds plain Python values from a YAML node tree, remembering where each key stood."""

    def __init__(self, file: str, environ: Mapping[str, str]):
        self.file = file
        self.environ = environ
        self.marks: dict[Path_, tuple[int, int]] = {}
        self.problems: list[Problem] = []

    def problem(self, path: Path_, message: str) -> None:
        line, col = self.where(path)
        self.problems.append(Problem(self.file, line, col, _format_path(path), message))

    def where(self, path: Path_) -> tuple[int, int]:
        while path not in self.marks and path:
            path = path[:-1]
        return self.marks.get(path, (1, 1))

    def expand(self, text: str, path: Path_) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    self.problem(path, f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")
                    return ""
                return default
            return value

        return _VAR_RE.sub(substitute, text)

    def build(self, node: yaml.Node, path: Path_, loader: yaml.SafeLoader) -> Any:
        self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    key = str(key)
                child = (*path, key)
                self.marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key in out:
                    self.problem(child, "duplicate key")
                    continue
                out[key] = self.build(value_node, child, loader)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), loader) for i, item in enumerate(node.value)]
        value = loader.construct_object(node, deep=True)
        if isinstance(value, str):
            value = self.expand(value, path)
        return value


def _message(error: Mapping[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "literal_error":
        msg = "must be one of " + msg.removeprefix("Input should be ").replace("'", "")
    if kind == "string_pattern_mismatch":
        if "a-z0-9_-" in str(error.get("ctx", {}).get("pattern", "")):
            return "must be 1 to 63 characters of a-z, 0-9, _ and -"
        return "must match " + str(error.get("ctx", {}).get("pattern", "the allowed pattern"))
    return msg[0].lower() + msg[1:] if msg else msg


def _merge_defaults(policy: Policy) -> Policy:
    targets = []
    for target in policy.targets:
        fill = {
            key: getattr(policy.defaults, key)
            for key in SessionSettings.model_fields
            if getattr(target, key) is None
        }
        targets.append(target.model_copy(update=fill))
    return policy.model_copy(update={"targets": tuple(targets)})


def _items(raw: Any, *keys: str) -> list[tuple[int, Any]]:
    """Enumerate a list found under nested keys of the raw document, tolerating any shape."""
    node = raw
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return list(enumerate(node)) if isinstance(node, list) else []


def _try(parse: Any, value: Any) -> Any:
    try:
        return parse(value)
    except (ValueError, TypeError):
        return None


def _cross_checks(raw: dict[str, Any], reader: _Reader) -> None:
    """Checks that span several keys; run on the raw document so they add to other problems."""
    seen: dict[Any, int] = {}
    for i, target in _items(raw, "targets"):
        if not isinstance(target, dict):
            continue
        name = target.get("name")
        if isinstance(name, str):
            if name in seen:
                reader.problem(("targets", i, "name"), f"duplicate target name {name!r} (also targets[{seen[name]}])")
            seen.setdefault(name, i)
        tables: dict[QualifiedName, int] = {}
        for j, table in _items(target, "partitions", "tables"):
            if not isinstance(table, dict):
                continue
            path = ("targets", i, "partitions", "tables", j)
            qn = _try(parse_qualified_name, table.get("table"))
            if qn is not None:
                if qn in tables:
                    reader.problem((*path, "table"), f"duplicate table {qn} (also tables[{tables[qn]}])")
                tables.setdefault(qn, j)
            interval = _try(_parse_interval, table.get("interval"))
            retention = _try(parse_retention, table.get("retention")) if table.get("retention") is not None else None
            if interval is not None and retention is not None:
                if isinstance(interval, int) and retention.integer is None:
                    reader.problem((*path, "retention"), "integer intervals take an integer retention (a number of key values)")
                if isinstance(interval, str) and retention.integer is not None:
                    reader.problem((*path, "retention"), "time intervals take a time retention such as 90 days or 24 months")
        views: dict[QualifiedName, int] = {}
        for j, view in _items(target, "materialized_views", "views"):
            qn = _try(parse_qualified_name, view.get("view")) if isinstance(view, dict) else None
            if qn is not None:
                if qn in views:
                    reader.problem(
                        ("targets", i, "materialized_views", "views", j, "view"), f"duplicate view {qn} (also views[{views[qn]}])"
                    )
                views.setdefault(qn, j)
        lrq = target.get("long_running_queries")
        if isinstance(lrq, dict) and lrq.get("cancel_after") is not None and lrq.get("terminate_after") is not None:
            cancel, terminate = _try(parse_duration, lrq["cancel_after"]), _try(parse_duration, lrq["terminate_after"])
            if cancel is not None and terminate is not None and terminate < cancel:
                reader.problem(
                    ("targets", i, "long_running_queries", "terminate_after"),
                    "must not be shorter than cancel_after (a session is cancelled before it is terminated)",
                )


def parse_policy(text: str, file: str = "<policy>", environ: Mapping[str, str] | None = None) -> Policy:
    """Parse and validate a policy; raise PolicyError listing every problem."""
    reader = _Reader(file, os.environ if environ is None else environ)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            raw = reader.build(node, (), loader) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or str(exc)
        raise PolicyError([Problem(file, line, col, "", f"not valid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(file, 1, 1, "", f"not valid YAML: {exc}")]) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise PolicyError([Problem(file, 1, 1, "", f"not a policy: {exc}")]) from None
    if raw is None:
        raise PolicyError([Problem(file, 1, 1, "", "the policy is empty; it needs at least `version: 1`")])
    if not isinstance(raw, dict):
        raise PolicyError([Problem(file, 1, 1, "", "the policy must be a mapping with `version: 1` at the top")])
    policy = None
    expanded = {p.path for p in reader.problems}
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            path = tuple(p for p in error["loc"] if isinstance(p, (str, int)))
            if _format_path(path) not in expanded:  # an unset ${VAR} already said why
                reader.problem(path, _message(error))
    _cross_checks(raw, reader)
    if reader.problems:
        unique = list(dict.fromkeys(reader.problems))
        unique.sort(key=lambda p: (p.line, p.column))
        raise PolicyError(unique)
    assert policy is not None
    return _merge_defaults(policy)


def load_policy(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Policy:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([Problem(str(file), 1, 1, "", f"cannot read the policy: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise PolicyError([Problem(str(file), 1, 1, "", "the policy is not UTF-8 text")]) from None
    return parse_policy(text, str(file), environ)


def policy_schema() -> dict[str, Any]:
    schema = Policy.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pgupkeep policy"
    return schema
