"""Pure planning for the partitions job: the interval calendar, bounds arithmetic, and which ranges
to create or retire, from catalog rows + policy + now. Nothing here touches a database.

Bounds live in one numeric "key domain" per table so that gaps, overlaps and coverage are plain
integer comparisons: microseconds since the epoch for time keys (the instant for timestamptz, the
wall clock read as UTC for timestamp and date), the value itself for integer keys, and +-inf for
MINVALUE/MAXVALUE.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from pgupkeep.units import Retention

US = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_INTERVALS = ("hourly", "daily", "weekly", "monthly", "quarterly", "yearly")
# typname -> key kind
KEY_KINDS = {
    "timestamptz": "timestamptz",
    "timestamp": "timestamp",
    "date": "date",
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
}
# typname -> (min, max) of an integer key: no bound may lie outside them, so the slot that would
# end past the max ends at MAXVALUE instead (and one that would start below the min at MINVALUE).
INTEGER_LIMITS = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1), "int8": (-(2**63), 2**63 - 1)}
MAX_NAME_BYTES = 63

Bound = int | float  # float only for -inf / +inf (MINVALUE, MAXVALUE, infinity)


@dataclass(frozen=True)
class Partition:
    """An attached partition as the catalog shows it."""

    schema: str
    name: str
    lo: Bound
    hi: Bound
    pending_detach: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Slot:
    """One range of the interval grid: [lo, hi) in the key domain, and its name suffix. Only an
    integer key's slot at the end of its type has an infinite bound (MINVALUE, MAXVALUE)."""

    lo: Bound
    hi: Bound
    suffix: str


# --------------------------------------------------------------------------- key domain


def micros(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * US + delta.microseconds


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def to_key(local: datetime, kind: str, tz: ZoneInfo) -> int:
    """A naive local wall-clock time as a key-domain value."""
    if kind == "timestamptz":
        return micros(local.replace(tzinfo=tz))
    return micros(local.replace(tzinfo=UTC))


def now_key(now: datetime, kind: str, tz: ZoneInfo) -> int:
    if kind == "timestamptz":
        return micros(now)
    return micros(now.astimezone(tz).replace(tzinfo=UTC))


def key_to_python(value: int, kind: str) -> int | datetime | date:
    """A key-domain value as the Python value psycopg adapts to the key's type."""
    if kind == "integer":
        return value
    moment = from_micros(value)
    if kind == "timestamptz":
        return moment
    if kind == "date":
        return moment.date()
    return moment.replace(tzinfo=None)


def literal(value: Bound, kind: str, tz: ZoneInfo) -> str:
    """A bound as SQL literal text (DateStyle-independent ISO input), or MINVALUE/MAXVALUE."""
    if value == -math.inf:
        return "MINVALUE"
    if value == math.inf:
        return "MAXVALUE"
    assert isinstance(value, int)
    if kind == "integer":
        return str(value)
    moment = from_micros(value)
    if kind == "timestamptz":
        # Local wall clock with its offset: the operator reads local midnights.
        text = moment.astimezone(tz).isoformat(sep=" ")
    elif kind == "date":
        text = moment.date().isoformat()
    else:
        text = moment.replace(tzinfo=None).isoformat(sep=" ")
    return f"'{text}'"


def describe(lo: Bound, hi: Bound, kind: str, tz: ZoneInfo) -> str:
    return f"[{literal(lo, kind, tz).strip(chr(39))}, {literal(hi, kind, tz).strip(chr(39))})"


# --------------------------------------------------------------------------- validation


def key_mismatch(interval: str | int, key_type: str) -> str | None:
    """Why this interval cannot partition a key of this type, or None."""
    kind = KEY_KINDS.get(key_type)
    if kind is None:
        return f"the partition key has type {key_type}; pgupkeep manages timestamptz, timestamp, date and integer keys"
    if isinstance(interval, int):
        if kind != "integer":
            return f"interval {interval} is an integer width but the partition key has type {key_type}; use a time interval such as monthly"
        return None
    if kind == "integer":
        return f"interval {interval} needs a time key but the partition key has type {key_type}; use an integer width"
    if kind == "date" and interval == "hourly":
        return "interval hourly needs a timestamp or timestamptz key, the partition key has type date; use daily or longer"
    return None


# --------------------------------------------------------------------------- calendar


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    days = (date(year + (month == 12), month % 12 + 1, 1) - date(year, month, 1)).days
    return moment.replace(year=year, month=month, day=min(moment.day, days))


def period_start(local: datetime, interval: str) -> datetime:
    """The naive local start of the period holding `local`."""
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None, fold=0)
    if interval == "hourly":
        return local.replace(minute=0, second=0, microsecond=0, tzinfo=None, fold=0)
    if interval == "daily":
        return day
    if interval == "weekly":
        return day - timedelta(days=day.weekday())  # ISO weeks start on Monday
    if interval == "monthly":
        return day.replace(day=1)
    if interval == "quarterly":
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    return day.replace(month=1, day=1)


def period_add(start: datetime, interval: str, n: int) -> datetime:
    if interval == "hourly":
        return start + timedelta(hours=n)
    if interval == "daily":
        return start + timedelta(days=n)
    if interval == "weekly":
        return start + timedelta(weeks=n)
    months = {"monthly": 1, "quarterly": 3, "yearly": 12}[interval]
    return _add_months(start, months * n)


def suffix(start: datetime, interval: str) -> str:
    if interval == "hourly":
        return start.strftime("%Y_%m_%d_%H")
    if interval == "daily":
        return start.strftime("%Y_%m_%d")
    if interval == "weekly":
        iso = start.isocalendar()
        return f"{iso.year:04d}_w{iso.week:02d}"
    if interval == "monthly":
        return start.strftime("%Y_%m")
    if interval == "quarterly":
        return f"{start.year:04d}_q{(start.month - 1) // 3 + 1}"
    return f"{start.year:04d}"


def covered(lo: Bound, hi: Bound, slots: Sequence[Slot]) -> bool:
    """Whether [lo, hi) lies wholly inside the union of `slots`."""
    reach = lo
    for s in sorted(slots, key=lambda s: s.lo):
        if s.lo > reach:
            break
        reach = max(reach, s.hi)
    return reach >= hi


def time_slots(now: datetime, interval: str, kind: str, tz: ZoneInfo, count: int) -> list[Slot]:
    """The current period's slot and `count` more after it, by the clock in `tz`."""
    return list(_time_slots(now, interval, kind, tz, count))


@functools.lru_cache(maxsize=256)  # a thousand tables usually share a handful of calendars
def _time_slots(now: datetime, interval: str, kind: str, tz: ZoneInfo, count: int) -> tuple[Slot, ...]:
    local = now.astimezone(tz)
    if interval == "hourly" and kind == "timestamptz":
        # Hours are instants apart: across a DST change the wall clock repeats or skips an hour,
        # and stepping by wall clock would duplicate or lose a partition.
        start = micros(local.replace(minute=0, second=0, microsecond=0))
        slots = []
        for i in range(count + 1):
            lo = start + i * 3600 * US
            wall = from_micros(lo).astimezone(tz)
            text = wall.strftime("%Y_%m_%d_%H")
            if wall.fold and wall.utcoffset() != wall.replace(fold=0).utcoffset():
                text += "_2"  # the second occurrence of a repeated wall-clock hour
            slots.append(Slot(lo, lo + 3600 * US, text))
        return tuple(slots)
    first = period_start(local, interval)
    starts = [period_add(first, interval, i) for i in range(count + 2)]
    return tuple(
        Slot(to_key(starts[i], kind, tz), to_key(starts[i + 1], kind, tz), suffix(starts[i], interval))
        for i in range(count + 1)
    )


def integer_slots(base: int, width: int, count: int, key_type: str = "int8") -> list[Slot]:
    """The slot holding `base` (the current max key) and `count` more after it, none past the end
    of the key's type: the last one there ends at MAXVALUE, and fewer follow."""
    low, high = INTEGER_LIMITS[key_type]
    first = base // width * width
    out = []
    for i in range(count + 1):
        start = first + i * width
        lo: Bound = start if start >= low else -math.inf
        hi: Bound = start + width if start + width <= high else math.inf
        out.append(Slot(lo, hi, str(start if start >= low else low).replace("-", "m")))
        if hi == math.inf:
            break
    return out


def key_used_share(base: int, key_type: str) -> float:
    """How much of an integer type's positive range the max key has used, 0-1."""
    return max(base, 0) / INTEGER_LIMITS[key_type][1]


def partition_name(parent: str, slot_suffix: str) -> str:
    """`<parent>_<suffix>`, the parent part cut (on a character boundary) to fit 63 bytes."""
    room = MAX_NAME_BYTES - len(slot_suffix.encode()) - 1
    base = parent.encode()[:room].decode(errors="ignore")
    return f"{base}_{slot_suffix}"


# --------------------------------------------------------------------------- bounds analysis


def attached(parts: Sequence[Partition]) -> list[Partition]:
    return sorted((p for p in parts if not p.pending_detach), key=lambda p: (p.lo, p.hi))


def gaps_and_overlaps(parts: Sequence[Partition]) -> tuple[list[tuple[Partition, Partition]], list[tuple[Partition, Partition]]]:
    """Neighbouring partitions with a hole between them, and ones whose ranges intersect."""
    ordered = attached(parts)
    gaps, overlaps = [], []
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.lo > a.hi:
            gaps.append((a, b))
        elif b.lo < a.hi:
            overlaps.append((a, b))
    return gaps, overlaps


@dataclass(frozen=True)
class SlotState:
    slot: Slot
    state: str  # "exists" (covered by existing bounds) | "create" | "overlap" (partly covered)
    overlapping: tuple[Partition, ...] = ()


def classify(slots: Sequence[Slot], parts: Sequence[Partition]) -> list[SlotState]:
    """Match the wanted grid against existing bounds; names play no part."""
    out = []
    for slot in slots:
        hits = sorted((p for p in parts if p.lo < slot.hi and p.hi > slot.lo), key=lambda p: p.lo)
        if not hits:
            out.append(SlotState(slot, "create"))
            continue
        reach: Bound = slot.lo
        for p in hits:
            if p.lo > reach:
                break
            reach = max(reach, p.hi)
        out.append(SlotState(slot, "exists" if reach >= slot.hi else "overlap", tuple(hits)))
    return out


def runway(parts: Sequence[Partition], at: int) -> tuple[int, Bound]:
    """(partitions ready after the one holding `at`, key distance from `at` to the end of that chain).

    Only a contiguous chain counts: a partition beyond a gap does not keep rows out of the default.
    """
    ordered = attached(parts)
    current = holding(ordered, at)
    if current is None:
        return 0, 0
    by_lo = {p.lo: p for p in ordered}
    count, end = 0, current.hi
    while end in by_lo and count <= len(ordered):
        end = by_lo[end].hi
        count += 1
    return count, end - at


def holding(parts: Sequence[Partition], at: int) -> Partition | None:
    """The attached partition whose range holds `at` (attached ranges never overlap)."""
    return next((p for p in parts if not p.pending_detach and p.lo <= at < p.hi), None)


GROWTH_WINDOW = 3600.0  # seconds: an integer key's growth is measured over one to two of these


def key_growth(anchors: Sequence[tuple[float, int]], now: float, base: int) -> tuple[float | None, list[tuple[float, int]]]:
    """(key values per second since the older anchor or None, the anchors to keep): at most two
    (time, max key) observations, a new one taken once the newer is GROWTH_WINDOW old, so the rate
    spans one to two windows however often the job runs. A key that went back starts over."""
    kept = list(anchors)
    if kept and base < kept[-1][1]:
        kept = []
    rate = (base - kept[0][1]) / (now - kept[0][0]) if kept and now > kept[0][0] else None
    if not kept or now - kept[-1][0] >= GROWTH_WINDOW:
        kept = [*kept, (now, base)][-2:]
    return rate, kept


@functools.lru_cache(maxsize=256)  # as _time_slots: a thousand tables usually share a few retentions
def time_cutoff(now: datetime, retention: Retention, kind: str, tz: ZoneInfo) -> int:
    """Partitions whose upper bound is at or before this key are older than `retention`.

    Months and days are calendar units on the local wall clock; seconds are elapsed time.
    """
    local = now.astimezone(tz).replace(tzinfo=None)
    if retention.months:
        local = _add_months(local, -retention.months)
    local -= timedelta(days=retention.days)
    return to_key(local, kind, tz) - round(retention.seconds * US)


def retirable(parts: Sequence[Partition], cutoff: Bound, current_lo: int) -> list[Partition]:
    """Partitions the bounds prove old: a finite upper bound at or before both the cutoff and the
    start of the current period (so never the current partition nor a future one)."""
    return [
        p
        for p in sorted(parts, key=lambda p: p.lo)
        if not math.isinf(p.hi) and p.hi <= cutoff and p.hi <= current_lo
    ]
