"""Parsing of the policy's small languages: durations, sizes, retention, schedules, names.

Each parser takes what a person wrote and returns a typed value or raises ValueError with a
message that says what is accepted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal

# PostgreSQL's limits: an `integer` GUC (statement_timeout, lock_timeout, ... are milliseconds
# in one) and a `bigint`.
PG_INT_MAX = 2_147_483_647
BIGINT_MAX = 9_223_372_036_854_775_807

_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
DURATION_HELP = "must be a duration such as 500ms, 30s, 5m, 2h or 1d"
# The longest duration any key takes: far beyond any sensible setting, and short enough that
# "now + it" stays a valid date for the scheduler and the clock arithmetic.
MAX_DURATION = timedelta(days=3650)


def parse_duration(value: object) -> timedelta:
    """A duration from 0 to MAX_DURATION; keys with narrower ranges check them with `DurationRange`."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(DURATION_HELP)
    if isinstance(value, (int, float)) or re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        # A bare 0 reads the same in every unit (and is how PostgreSQL's "no limit" is written).
        if (value if not isinstance(value, str) else Decimal(value)) == 0:
            return timedelta(0)
        raise ValueError(f"{DURATION_HELP} (a number needs its unit)")
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(DURATION_HELP)
    # Decimal, not float: `99999999999d` must be a clear "too long", not an OverflowError, and
    # `0.1s` exactly 100ms.
    ms = Decimal(match.group(1)) * _DURATION_MS[match.group(2)]
    if ms > _MAX_DURATION_MS:
        raise ValueError(f"is too long: at most {format_duration(MAX_DURATION)}")
    return timedelta(microseconds=int((ms * 1000).to_integral_value(ROUND_HALF_EVEN)))


_MAX_DURATION_MS = Decimal(int(MAX_DURATION.total_seconds()) * 1000)


def format_duration(value: timedelta) -> str:
    total_us = value // timedelta(microseconds=1)
    if total_us % 1000:
        return f"{Decimal(total_us) / 1000:f}ms"
    total_ms = total_us // 1000
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if total_ms and total_ms % size == 0:
            return f"{total_ms // size}{unit}"
    return f"{total_ms}ms" if total_ms else "0s"


@dataclass(frozen=True)
class DurationRange:
    """The durations one key accepts, and what 0 means there.

    `zero` is None when 0 is rejected, else what 0 means ("" when nothing needs saying; else it is
    said in every message, since it is what a DBA reads 0 as); `low` is the smallest value other
    than 0.
    """

    low: timedelta
    high: timedelta
    zero: str | None = None
    why_high: str = ""  # whose limit `high` is, for the message
    why_not_zero: str = ""  # why 0 is refused, for the message

    def __call__(self, value: object) -> timedelta:
        duration = parse_duration(value)
        zero = f"; 0 means {self.zero}" if self.zero else ""
        if duration == timedelta(0):
            if self.zero is None:
                why = f"; {self.why_not_zero}" if self.why_not_zero else ""
                raise ValueError(f"must be more than 0 (at least {format_duration(self.low)}){why}")
            return duration
        if duration < self.low:
            raise ValueError(f"must be at least {format_duration(self.low)}{zero}")
        if duration > self.high:
            limit = f"at most {format_duration(self.high)}"
            if self.high == PG_TIMEOUT_MAX:
                limit = f"at most {PG_INT_MAX}ms (about 24.8 days)"
            why = f", {self.why_high}" if self.why_high else ""
            raise ValueError(f"is too long: {limit}{why}{zero}")
        return duration

    def describe(self) -> str:
        """The range in words, for the reference."""
        high = f"{PG_INT_MAX}ms" if self.high == PG_TIMEOUT_MAX else format_duration(self.high)
        if self.zero == "":
            return f"0 to {high}"
        text = f"{format_duration(self.low)} to {high}"
        return f"{text}, or 0 ({self.zero})" if self.zero else text


PG_TIMEOUT_MAX = timedelta(milliseconds=PG_INT_MAX)


def pg_milliseconds(value: timedelta) -> str:
    """A duration as a PostgreSQL GUC value in milliseconds.

    0 stays 0 (PostgreSQL's "no limit"); any other value is at least 1ms, so a positive budget
    that rounds down never turns into "no limit".
    """
    if value <= timedelta(0):
        return "0"
    return str(min(PG_INT_MAX, max(1, round(value / timedelta(milliseconds=1)))))


_SIZE_UNITS = {
    "b": 1,
    "kb": 1024,
    "mb": 1024**2,
    "gb": 1024**3,
    "tb": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)\s*$", re.IGNORECASE)
SIZE_HELP = "must be a size such as 512kB, 10MB or 1GB (or a number of bytes)"
SIZE_TOO_BIG = f"is too large: at most {BIGINT_MAX} bytes (8 EiB, PostgreSQL's bigint)"


def parse_size(value: object) -> int:
    """A size in bytes, from 0 to what a bigint holds (sizes are compared in SQL)."""
    if isinstance(value, bool):
        raise ValueError(SIZE_HELP)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(SIZE_HELP)
        if value > BIGINT_MAX:
            raise ValueError(SIZE_TOO_BIG)
        return value
    if not isinstance(value, str):
        raise ValueError(SIZE_HELP)
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(SIZE_HELP)
    unit = match.group(2).lower().replace("i", "")
    size = Decimal(match.group(1)) * _SIZE_UNITS[unit]
    if size > BIGINT_MAX:
        raise ValueError(SIZE_TOO_BIG)
    return int(size)


@dataclass(frozen=True)
class Retention:
    """How old a partition's upper bound must be before it is retired.

    Calendar units keep their meaning (`24 months` is 24 calendar months, not 720 days);
    integer retention applies to integer partition keys and counts key values.
    """

    months: int = 0
    days: int = 0
    seconds: float = 0.0
    integer: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text


_RETENTION_RE = re.compile(
    r"^\s*(\d+)\s*(years?|months?|weeks?|days?|hours?|minutes?|y|mo|w|d|h|m|s)\s*$",
    re.IGNORECASE,
)
RETENTION_HELP = (
    "must be an age such as 90 days, 24 months or 2 years (also 30d, 12h), "
    "or a whole number for integer partition keys"
)


# Calendar retention reaches back from now: a thousand years keeps the cutoff a valid date.
RETENTION_MAX_YEARS = 1000
_DAYS_PER_YEAR = 365.2425
RETENTION_TOO_LONG = f"is too long: at most {RETENTION_MAX_YEARS} years"
INTEGER_RETENTION_TOO_BIG = f"is too large: at most {BIGINT_MAX} (PostgreSQL's bigint)"


def parse_retention(value: object) -> Retention:
    if isinstance(value, Retention):
        return value
    if isinstance(value, bool):
        raise ValueError(RETENTION_HELP)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(RETENTION_HELP)
        if value > BIGINT_MAX:
            raise ValueError(INTEGER_RETENTION_TOO_BIG)
        return Retention(integer=value, text=str(value))
    if not isinstance(value, str):
        raise ValueError(RETENTION_HELP)
    if value.strip().isdigit():
        if len(value.strip()) > 19:
            raise ValueError(INTEGER_RETENTION_TOO_BIG)
        return parse_retention(int(value.strip()))
    match = _RETENTION_RE.match(value)
    if not match:
        raise ValueError(RETENTION_HELP)
    if len(match.group(1)) > 12:
        raise ValueError(RETENTION_TOO_LONG)
    count, unit = int(match.group(1)), match.group(2).lower()
    if count <= 0:
        raise ValueError(RETENTION_HELP)
    text = value.strip()
    if unit in ("y", "year", "years"):
        retention = Retention(months=12 * count, text=text)
    elif unit in ("mo", "month", "months"):
        retention = Retention(months=count, text=text)
    elif unit in ("w", "week", "weeks"):
        retention = Retention(days=7 * count, text=text)
    elif unit in ("d", "day", "days"):
        retention = Retention(days=count, text=text)
    elif unit in ("h", "hour", "hours"):
        retention = Retention(seconds=3600.0 * count, text=text)
    elif unit in ("m", "minute", "minutes"):
        retention = Retention(seconds=60.0 * count, text=text)
    else:
        retention = Retention(seconds=float(count), text=text)
    days = retention.months * _DAYS_PER_YEAR / 12 + retention.days + retention.seconds / 86_400
    if days > RETENTION_MAX_YEARS * _DAYS_PER_YEAR + 1e-6:
        raise ValueError(RETENTION_TOO_LONG)
    return retention


@dataclass(frozen=True)
class QualifiedName:
    """A schema-qualified relation name, kept as its two parts."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def parts(self) -> tuple[str, str]:
        return (self.schema, self.name)


NAME_HELP = 'must be a schema-qualified name such as public.orders (quote parts with "" if needed)'


def _split_identifier(text: str) -> list[str]:
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise ValueError(NAME_HELP)
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            raw = text[i:j]
            if '"' in raw or not raw or raw != raw.strip():
                raise ValueError(NAME_HELP)
            # Unquoted identifiers fold to lower case, as PostgreSQL does.
            parts.append(raw.lower())
            i = j
        if i < n:
            if text[i] != ".":
                raise ValueError(NAME_HELP)
            i += 1
            if i == n:
                raise ValueError(NAME_HELP)
    return parts


def parse_qualified_name(value: object) -> QualifiedName:
    if isinstance(value, QualifiedName):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(NAME_HELP)
    parts = _split_identifier(value.strip())
    if len(parts) != 2 or not all(parts):
        raise ValueError(NAME_HELP)
    for part in parts:
        if len(part.encode()) > 63:
            raise ValueError("each part of the name must be at most 63 bytes (PostgreSQL's limit)")
        if "\x00" in part:
            raise ValueError(NAME_HELP)
    return QualifiedName(parts[0], parts[1])


LISTEN_HELP = (
    'must be "host:port": an IPv4 address, a host name or an IPv6 address in brackets, such as '
    '"0.0.0.0:9188", "localhost:9188", "[::1]:9188" or "[::]:9188" (all interfaces, IPv4 too), '
    "or \":9188\" for every interface"
)
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def split_listen(value: object) -> tuple[str, int]:
    """A listen address as (host, port): the host unbracketed, "" for every interface."""
    if not isinstance(value, str):
        raise ValueError(LISTEN_HELP)
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise ValueError(LISTEN_HELP)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address; {LISTEN_HELP}") from None
        return host[1:-1], int(port)
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"an IPv6 address goes in brackets, as in [::1]:9188; {LISTEN_HELP}")
    if host and re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host} is not an IPv4 address; {LISTEN_HELP}") from None
    elif host and not _HOSTNAME_RE.match(host):
        raise ValueError(f"{host!r} is not a host name; {LISTEN_HELP}")
    return host, int(port)


# Other sessions' query text is personal data: it goes into logs and findings only as the policy's
# `log_query_text` allows.
QUERY_TEXT_TRUNCATED = 200
QUERY_TEXT_MODES = ("full", "truncated", "none")
# pg_stat_activity.query is at most track_activity_query_size bytes, itself at most 1 MB.
_QUERY_TEXT_READ = {"full": 1_048_576, "truncated": QUERY_TEXT_TRUNCATED + 1, "none": 0}


def query_text(text: str | None, mode: str) -> str | None:
    """A query's text as `log_query_text` allows: all of it, its first 200 characters (with "..."
    when cut) or nothing (None)."""
    if text is None or mode == "none":
        return None
    if mode == "truncated" and len(text) > QUERY_TEXT_TRUNCATED:
        return text[:QUERY_TEXT_TRUNCATED] + "..."
    return text


def query_text_read_limit(mode: str) -> int:
    """How many characters of a query to read from the server for `mode` (one more than kept,
    so a cut can be marked)."""
    return _QUERY_TEXT_READ[mode]
