"""Parsing of the policy's small languages: durations, sizes, retention, schedules, names.

Each parser takes what a person wrote and returns a typed value or raises ValueError with a
message that says what is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

_DURATION_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
DURATION_HELP = "must be a duration such as 500ms, 30s, 5m, 2h or 1d"


def parse_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(DURATION_HELP)
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(DURATION_HELP)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(value: timedelta) -> str:
    total_ms = round(value.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if total_ms and total_ms % size == 0:
            return f"{total_ms // size}{unit}"
    return f"{total_ms}ms" if total_ms else "0s"


def pg_milliseconds(value: timedelta) -> str:
    """A duration as a PostgreSQL GUC value in milliseconds ("0" means no limit there)."""
    return str(max(1, round(value.total_seconds() * 1000)))


_SIZE_UNITS = {
    "b": 1,
    "kb": 1024,
    "mb": 1024**2,
    "gb": 1024**3,
    "tb": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)\s*$", re.IGNORECASE)
SIZE_HELP = "must be a size such as 512kB, 10MB or 1GB (or a number of bytes)"


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(SIZE_HELP)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(SIZE_HELP)
        return value
    if not isinstance(value, str):
        raise ValueError(SIZE_HELP)
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(SIZE_HELP)
    unit = match.group(2).lower().replace("i", "")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


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


def parse_retention(value: object) -> Retention:
    if isinstance(value, Retention):
        return value
    if isinstance(value, bool):
        raise ValueError(RETENTION_HELP)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(RETENTION_HELP)
        return Retention(integer=value, text=str(value))
    if not isinstance(value, str):
        raise ValueError(RETENTION_HELP)
    if value.strip().isdigit():
        return parse_retention(int(value.strip()))
    match = _RETENTION_RE.match(value)
    if not match:
        raise ValueError(RETENTION_HELP)
    count, unit = int(match.group(1)), match.group(2).lower()
    if count <= 0:
        raise ValueError(RETENTION_HELP)
    text = value.strip()
    if unit in ("y", "year", "years"):
        return Retention(months=12 * count, text=text)
    if unit in ("mo", "month", "months"):
        return Retention(months=count, text=text)
    if unit in ("w", "week", "weeks"):
        return Retention(days=7 * count, text=text)
    if unit in ("d", "day", "days"):
        return Retention(days=count, text=text)
    if unit in ("h", "hour", "hours"):
        return Retention(seconds=3600.0 * count, text=text)
    if unit in ("m", "minute", "minutes"):
        return Retention(seconds=60.0 * count, text=text)
    return Retention(seconds=float(count), text=text)


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
