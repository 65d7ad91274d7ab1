"""The policy's value types: each a pydantic-annotated type with its parser and JSON Schema."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, PlainSerializer, PlainValidator, WithJsonSchema

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
def parse_window(value: object) -> Schedule:
    """A five-field cron expression whose matching minutes form a window (no `every`)."""
    if isinstance(value, str) and value.strip().lower().startswith("every"):
        raise ValueError('must be a five-field cron expression whose matching minutes form the window, such as "* 2-4 * * 0,6"')
    return parse_schedule(value)


WindowText = Annotated[
    Schedule,
    PlainValidator(parse_window),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {"type": "string", "description": "five-field cron (0 and 7 are Sunday); the minutes it matches form the window", "examples": ["* 2-4 * * 0,6"]}
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


def parse_interval(value: object) -> str | int:
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
    PlainValidator(parse_interval),
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
