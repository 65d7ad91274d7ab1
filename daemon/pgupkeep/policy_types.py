"""The policy's value types: each a pydantic-annotated type with its parser and JSON Schema."""

from __future__ import annotations

import difflib
import re
from datetime import timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, PlainSerializer, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from pgupkeep.schedules import Schedule, parse_schedule
from pgupkeep.sqltext import SqlTextError, read_statement
from pgupkeep.units import (
    BIGINT_MAX,
    MAX_DURATION,
    PG_INT_MAX,
    PG_TIMEOUT_MAX,
    DurationRange,
    QualifiedName,
    Retention,
    format_duration,
    parse_qualified_name,
    parse_retention,
    parse_size,
    split_listen,
)

_DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)\s*$"


def _duration_type(accepted: DurationRange) -> Any:
    return Annotated[
        timedelta,
        PlainValidator(accepted),
        PlainSerializer(format_duration, return_type=str),
        WithJsonSchema(
            {
                "type": "string",
                "pattern": _DURATION_PATTERN,
                "description": f"a duration: {accepted.describe()}",
                "examples": ["30s", "5m"],
            }
        ),
    ]


_MS = timedelta(milliseconds=1)
# Any duration up to MAX_DURATION, 0 included (shutdown_grace, jitter).
Duration = _duration_type(DurationRange(low=_MS, high=MAX_DURATION, zero=""))
# More than 0 (warn_after, cancel_after, ...): 0 would read as "off" to some and "at once" to others.
PositiveDuration = _duration_type(
    DurationRange(low=_MS, high=MAX_DURATION, why_not_zero="to turn a check or signal off, leave its key out")
)
# A PostgreSQL timeout GUC (statement_timeout, lock_timeout, idle_in_transaction_session_timeout):
# whole milliseconds in an int, and 0 is PostgreSQL's "no limit", passed to the server as 0.
PgTimeout = _duration_type(
    DurationRange(low=_MS, high=PG_TIMEOUT_MAX, zero="no limit", why_high="PostgreSQL's limit for a timeout")
)
# A statement_timeout pgupkeep sets for one kind of statement (a refresh, a VACUUM): never "no limit".
StatementTimeout = _duration_type(
    DurationRange(
        low=_MS, high=PG_TIMEOUT_MAX, why_high="PostgreSQL's limit for statement_timeout",
        why_not_zero="pgupkeep always bounds its own refreshes and VACUUMs",
    )
)
# A time budget spent in statements bounded by it (0: spend none).
StatementBudget = _duration_type(
    DurationRange(low=_MS, high=PG_TIMEOUT_MAX, zero="none is spent", why_high="PostgreSQL's limit for statement_timeout")
)
# libpq's connect_timeout: 0 would wait forever; below 2s libpq waits 2s.
ConnectTimeout = _duration_type(DurationRange(low=_MS, high=MAX_DURATION, why_not_zero="libpq would wait forever"))
# How often something recurs on the scheduler (discovery): at most once a second.
Period = _duration_type(
    DurationRange(low=timedelta(seconds=1), high=MAX_DURATION, why_not_zero="it would run without pause")
)
# APScheduler's misfire grace is whole seconds; 0 would skip every run that starts late at all.
MisfireGrace = _duration_type(DurationRange(low=timedelta(seconds=1), high=MAX_DURATION))
Size = Annotated[
    int,
    PlainValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[kKmMgGtT]?i?[bB]\s*$"},
                {"type": "integer", "minimum": 0, "maximum": BIGINT_MAX},
            ]
        }
    ),
]
ScheduleText = Annotated[
    Schedule,
    PlainValidator(parse_schedule),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "five-field cron (0 and 7 are Sunday), @hourly, @daily, @weekly, @monthly, @yearly, "
            "or 'every <duration>' (1s to 3650d)",
            "examples": ["every 30s", "15 * * * *", "@daily"],
        }
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
        {
            "anyOf": [
                {"type": "string", "examples": ["90 days", "24 months", "2 years"]},
                {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX},
            ]
        }
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
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 20:
        value = int(value.strip())
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(INTERVAL_HELP)
        if value > BIGINT_MAX:
            raise ValueError(f"is too large: at most {BIGINT_MAX} (PostgreSQL's bigint)")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _INTERVALS:
            return text
    raise ValueError(INTERVAL_HELP)


Interval = Annotated[
    str | int,
    PlainValidator(parse_interval),
    WithJsonSchema({"anyOf": [{"enum": list(_INTERVALS)}, {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}]}),
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

def _parse_listen(value: object) -> str:
    split_listen(value)  # the same parser the HTTP server binds with
    return str(value).strip()


Listen = Annotated[str, PlainValidator(_parse_listen), WithJsonSchema({"type": "string", "examples": ["0.0.0.0:9188", "[::]:9188"]})]


# Options whose values libpq checks only when it connects (so a typo would pass `check` and fail
# every run): their allowed values, as libpq 18 defines them.
_DSN_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslcompression": ("0", "1"),
    "sslsni": ("0", "1"),
    "gssdelegation": ("0", "1"),
}
_DSN_PROTOCOLS = ("tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3")  # compared case-blind by libpq
_DSN_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout")
_AUTH_METHODS = ("password", "md5", "gss", "sspi", "scram-sha-256", "oauth", "none")
_INT_RE = re.compile(r"^\s*[+-]?\d+\s*$")


def _dsn_keywords() -> list[str]:
    from psycopg import pq

    return [d.keyword.decode() for d in pq.Conninfo.get_defaults()]


def _check_dsn_values(params: dict[str, str]) -> None:
    for key, allowed in _DSN_CHOICES.items():
        if key in params and params[key] not in allowed:
            raise ValueError(f"{key} {params[key]!r} is not one of {', '.join(allowed)}")
    for key in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        if params.get(key) and params[key].lower() not in _DSN_PROTOCOLS:
            raise ValueError(f"{key} {params[key]!r} is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3")
    for key in _DSN_INTEGERS:
        value = params.get(key)
        if value and (not _INT_RE.match(value) or abs(int(value)) > PG_INT_MAX):
            raise ValueError(f"{key} {value!r} is not a whole number")
    ports = [p for p in params.get("port", "").split(",")] if params.get("port") else []
    for port in ports:
        if port.strip() and (not port.strip().isdigit() or not 1 <= int(port) <= 65535):
            raise ValueError(f"port {port.strip()!r} is not a port number (1 to 65535)")
    hosts = len((params.get("host") or params.get("hostaddr") or "").split(","))
    if len(ports) > 1 and len(ports) != hosts:
        raise ValueError(f"has {len(ports)} ports for {hosts} hosts; give one port, or one for each host")
    if params.get("require_auth"):
        methods = params["require_auth"].split(",")
        negated = {m.startswith("!") for m in methods}
        unknown = [m for m in methods if m.lstrip("!") not in _AUTH_METHODS]
        if unknown or len(negated) > 1:
            raise ValueError(
                f"require_auth {params['require_auth']!r} must list methods among {', '.join(_AUTH_METHODS)}, "
                "all with ! or none"
            )


def _parse_dsn(value: object) -> str:
    # Messages here never quote a value that could be a password: only option names, and the
    # values of options chosen from a list.
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a libpq connection URI or key=value string (is its environment variable set?)")
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(value)
    except Exception as exc:
        unknown = re.search(r'invalid (?:connection|URI query parameter|URI) option "([A-Za-z0-9_]+)"', str(exc)) or re.search(
            r'invalid URI query parameter: "([A-Za-z0-9_]+)"', str(exc)
        )
        if unknown:
            name = unknown.group(1)
            close = difflib.get_close_matches(name, _dsn_keywords(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"has an unknown connection option {name!r}{hint}") from None
        raise ValueError("is not a valid libpq connection URI or key=value string") from None
    _check_dsn_values({k: str(v) for k, v in params.items()})
    return value


Dsn = Annotated[str, PlainValidator(_parse_dsn), WithJsonSchema({"type": "string", "examples": ["${SHOP_DATABASE_URL}"]})]
TargetName = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,63}$")]


def _parse_sql(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a SQL statement (a string)")
    try:
        return read_statement(value).text
    except SqlTextError as exc:
        # Where in the text: the policy loader turns it into the file's line and column.
        raise PydanticCustomError("sql_text", "{message}", {"message": str(exc), "line": exc.line, "column": exc.column}) from None


SqlText = Annotated[
    str,
    PlainValidator(_parse_sql),
    WithJsonSchema({"type": "string", "minLength": 1, "description": "exactly one SQL statement"}),
]
