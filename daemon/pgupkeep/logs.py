"""Structured logs: structlog set-up, stdlib loggers routed through it, and `log_result`.

One JSON object a line on stdout (console rendering on a terminal). Every job run writes exactly
one `job_finished` line, plus one event per action and finding that an operator should see.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import structlog

from pgupkeep.results import Action, Finding, JobResult

_ACTION_EVENTS = {
    "create_partition": "partition_created",
    "detach_partition": "partition_retired",
    "drop_partition": "partition_retired",
    "move_default_rows": "default_rows_moved",
    "refresh_materialized_view": "matview_refreshed",
    "cancel_backend": "backend_signalled",
    "terminate_backend": "backend_signalled",
    "vacuum_table": "table_vacuumed",
    "reindex_index": "index_reindexed",
    "drop_invalid_index": "invalid_index_dropped",
    "run_sql": "sql_run",
    "finish_retirement": "retirement_finished",
}
_FINDING_EVENTS = {
    "long_running_query": ("long_running_query", "warning"),
    "idle_in_transaction": ("idle_in_transaction", "warning"),
    "bloated_table": ("bloated_table", "warning"),
    "invalid_index": ("invalid_index", "warning"),
    "unused_index": ("unused_index", "info"),
    "xid_wraparound": ("xid_wraparound_risk", "error"),
    "lock_timeout": ("lock_timeout", "warning"),
    "partition_runway_low": ("partition_runway_low", "warning"),
    "partition_gap": ("partition_gap", "warning"),
    "partition_overlap": ("partition_overlap", "error"),
    "connections_high": ("connections_high", "warning"),
    "table_skipped_locked": ("table_skipped_locked", "info"),
    "matview_refresh_skipped": ("matview_refresh_skipped", "info"),
    "lock_wait": ("lock_wait", "warning"),
    "replication_slot_inactive": ("replication_slot_inactive", "warning"),
    "replication_slot_wal_retained": ("replication_slot_wal_retained", "warning"),
    "replication_slot_lost": ("replication_slot_lost", "error"),
    "replication_lag": ("replication_lag", "warning"),
    "sequence_exhausting": ("sequence_exhausting", "warning"),
    "xmin_horizon_held": ("xmin_horizon_held", "warning"),
    "prepared_transaction_old": ("prepared_transaction_old", "warning"),
    "table_freeze_age": ("table_freeze_age", "warning"),
    "autovacuum_lagging": ("autovacuum_lagging", "warning"),
    "slow_statement": ("slow_statement", "warning"),
    "n_plus_one_statement": ("n_plus_one_statement", "info"),
    "unindexed_foreign_key": ("unindexed_foreign_key", "info"),
    "bloated_index": ("bloated_index", "warning"),
    "index_skipped_locked": ("index_skipped_locked", "info"),
    "insufficient_privilege": ("insufficient_privilege", "warning"),
    "extension_missing": ("extension_missing", "info"),
    "partition_key_exhausting": ("partition_key_exhausting", "warning"),
}


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger to share one renderer."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = ConsoleRenderer(colors=stream.isatty()) if fmt == "console" else structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            _rename_stdlib_message,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _order_keys,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level.upper()))
    # APScheduler's per-run chatter would double our job_finished lines.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))


def _rename_stdlib_message(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    record = event.get("_record")
    if record is not None and record.name and not record.name.startswith("pgupkeep"):
        event.setdefault("logger", record.name)
    return event


def _order_keys(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # timestamp, level and event first: the line reads the way people scan it.
    head = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
    return {**head, **event}


# Console lines lead with what happened and to what; the rest follows in the order logged.
CONSOLE_FIRST = ("target", "job", "item", "object", "outcome", "message", "error", "reason")
_LEVEL_COLORS = {"debug": "\x1b[2m", "info": "", "warning": "\x1b[33m", "error": "\x1b[31m", "critical": "\x1b[31;1m"}


class ConsoleRenderer:
    """A line for a person at a terminal: the event first, then the keys that matter, then the
    rest; the level only when it is not info, the time last."""

    def __init__(self, colors: bool = False):
        self.colors = colors

    def __call__(self, _: Any, __: str, event: dict[str, Any]) -> str:
        event = dict(event)
        name = str(event.pop("event", ""))
        level = str(event.pop("level", "info"))
        stamp = str(event.pop("timestamp", ""))
        exception = event.pop("exception", None)
        first = [k for k in CONSOLE_FIRST if k in event]
        keys = first + [k for k in event if k not in first]
        color, bold, reset = (_LEVEL_COLORS.get(level, ""), "\x1b[1m", "\x1b[0m") if self.colors else ("", "", "")
        head = f"{color}{bold}{name}{reset}" + (f" {color}[{level}]{reset}" if level != "info" else "")
        fields = " ".join(f"{k}={_console_value(event[k])}" for k in keys)
        line = f"{head}  {fields}" if fields else head
        if stamp:
            line += f"  ({stamp[11:19] if len(stamp) >= 19 else stamp})"
        return line + (f"\n{exception}" if exception else "")


def _console_value(value: Any) -> str:
    if not isinstance(value, str):
        return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False) if not value or any(c.isspace() or c in '"=' for c in value) else value


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("pgupkeep").bind(**context)


def log_result(result: JobResult, log: Any | None = None) -> None:
    """One canonical `job_finished` line per run, plus an event per action and finding."""
    log = (log or get_logger()).bind(target=result.target, job=result.job)
    if result.item:
        log = log.bind(item=result.item)
    mode = {} if result.applied else {"plan": True}
    if result.target_up is False:
        log.warning("target_unreachable", error=result.error)
    for action in result.actions:
        _log_action(log, action, mode)
    for finding in result.findings:
        _log_finding(log, finding, mode)
    fields: dict[str, Any] = {
        "outcome": result.outcome,
        "duration_seconds": round(result.duration_seconds, 6),
        "actions": len(result.actions),
        "findings": len(result.findings),
        **mode,
    }
    if result.reason:
        fields["reason"] = result.reason
    if result.error:
        fields["error"] = result.error
    level = "error" if result.outcome == "failure" else "info"
    getattr(log, level)("job_finished", **fields)


def _log_action(log: Any, action: Action, mode: dict[str, Any]) -> None:
    event = _ACTION_EVENTS.get(action.action, action.action)
    fields = {"action": action.action, "object": action.object, "sql": action.sql, "applied": action.applied}
    fields.update(action.detail)
    # A failed action, or a refresh that fell back to blocking readers, deserves a warning.
    warn = action.detail.get("outcome") == "failure" or "fallback_reason" in action.detail
    (log.warning if warn else log.info)(event, **fields, **mode)


def _log_finding(log: Any, finding: Finding, mode: dict[str, Any]) -> None:
    if finding.kind == "default_partition_rows":
        if not finding.detail.get("conflict"):
            return
        event, level = "default_partition_conflict", "warning"
    else:
        event, level = _FINDING_EVENTS.get(finding.kind, (finding.kind, "info"))
    fields = {"object": finding.object, "value": finding.value}
    if finding.message:
        fields["message"] = finding.message
    fields.update(finding.detail)
    getattr(log, level)(event, **fields, **mode)
