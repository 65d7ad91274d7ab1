"""The partitions job's pure planning: calendar arithmetic, names, and bounds analysis, with plain
values (no database)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from pgupkeep.jobs.partitions import grid
from pgupkeep.jobs.partitions.grid import Partition, Slot, SlotState
from pgupkeep.units import parse_retention

BERLIN = ZoneInfo("Europe/Berlin")
US = grid.US


def utc(*args: int) -> int:
    return grid.micros(datetime(*args, tzinfo=UTC))


def wall(*args: int) -> int:
    """A timestamp/date key: the wall clock read as UTC."""
    return utc(*args)


@pytest.mark.parametrize("interval,now,expected", [
    ("hourly", datetime(2026, 12, 31, 23, 59, tzinfo=UTC), ["2026_12_31_23", "2027_01_01_00"]),
    ("daily", datetime(2028, 2, 28, 12, tzinfo=UTC), ["2028_02_28", "2028_02_29"]),
    ("weekly", datetime(2027, 1, 3, tzinfo=UTC), ["2026_w53", "2027_w01"]),  # Sunday of ISO week 53
    ("weekly", datetime(2024, 12, 31, tzinfo=UTC), ["2025_w01", "2025_w02"]),  # ISO year runs ahead
    ("monthly", datetime(2028, 1, 31, tzinfo=UTC), ["2028_01", "2028_02"]),
    ("quarterly", datetime(2026, 12, 31, tzinfo=UTC), ["2026_q4", "2027_q1"]),
    ("yearly", datetime(2027, 12, 31, 23, tzinfo=UTC), ["2027", "2028"]),
])
def test_suffixes_across_year_ends(interval: str, now: datetime, expected: list[str]) -> None:
    assert [s.suffix for s in grid.time_slots(now, interval, "timestamptz", ZoneInfo("UTC"), 1)] == expected


def test_month_lengths_and_leap_years() -> None:
    slots = grid.time_slots(datetime(2028, 1, 15, tzinfo=UTC), "monthly", "date", ZoneInfo("UTC"), 2)
    assert slots == [
        Slot(wall(2028, 1, 1), wall(2028, 2, 1), "2028_01"),
        Slot(wall(2028, 2, 1), wall(2028, 3, 1), "2028_02"),
        Slot(wall(2028, 3, 1), wall(2028, 4, 1), "2028_03"),
    ]
    assert (slots[1].hi - slots[1].lo) == 29 * 86400 * US


def test_daily_berlin_dst_days_are_23_and_25_hours() -> None:
    spring = grid.time_slots(datetime(2026, 3, 29, 12, tzinfo=BERLIN), "daily", "timestamptz", BERLIN, 0)[0]
    autumn = grid.time_slots(datetime(2026, 10, 25, 12, tzinfo=BERLIN), "daily", "timestamptz", BERLIN, 0)[0]
    assert spring == Slot(utc(2026, 3, 28, 23), utc(2026, 3, 29, 22), "2026_03_29")
    assert autumn == Slot(utc(2026, 10, 24, 22), utc(2026, 10, 25, 23), "2026_10_25")
    # A timestamp (no time zone) key keeps 24-hour wall-clock days.
    naive = grid.time_slots(datetime(2026, 3, 29, 12, tzinfo=BERLIN), "daily", "timestamp", BERLIN, 0)[0]
    assert naive == Slot(wall(2026, 3, 29), wall(2026, 3, 30), "2026_03_29")


def test_hourly_berlin_dst_is_contiguous_and_unique() -> None:
    slots = grid.time_slots(datetime(2026, 10, 24, 23, 30, tzinfo=UTC), "hourly", "timestamptz", BERLIN, 4)
    assert [s.suffix for s in slots] == ["2026_10_25_01", "2026_10_25_02", "2026_10_25_02_2", "2026_10_25_03", "2026_10_25_04"]
    assert all(b.lo == a.hi and a.hi - a.lo == 3600 * US for a, b in zip(slots, slots[1:], strict=False))
    spring = grid.time_slots(datetime(2026, 3, 29, 0, 30, tzinfo=UTC), "hourly", "timestamptz", BERLIN, 2)
    assert [s.suffix for s in spring] == ["2026_03_29_01", "2026_03_29_03", "2026_03_29_04"]


def test_integer_slots_and_names() -> None:
    assert grid.integer_slots(2500, 1000, 1) == [Slot(2000, 3000, "2000"), Slot(3000, 4000, "3000")]
    assert grid.integer_slots(-5, 10, 0) == [Slot(-10, 0, "m10")]
    name = grid.partition_name("x" * 63, "2026_01")
    assert name == "x" * 55 + "_2026_01" and len(name.encode()) == 63
    name = grid.partition_name("é" * 31, "2026_01")  # 62 bytes; cut on a character boundary
    assert name == "é" * 27 + "_2026_01" and len(name.encode()) <= 63


def test_key_mismatch() -> None:
    assert grid.key_mismatch("monthly", "timestamptz") is None
    assert grid.key_mismatch(100, "int8") is None
    assert grid.key_mismatch("daily", "date") is None
    assert grid.key_mismatch("hourly", "date") is not None
    assert grid.key_mismatch("monthly", "int4") is not None
    assert grid.key_mismatch(100, "timestamp") is not None
    assert "text" in (grid.key_mismatch("daily", "text") or "")


def part(name: str, lo: float, hi: float, pending: bool = False) -> Partition:
    return Partition("public", name, lo, hi, pending)


def test_classify_by_bounds() -> None:
    parts = [part("a", 0, 10), part("year", 10, 40), part("odd", 45, 55)]
    slots = [Slot(0, 10, "0"), Slot(10, 20, "10"), Slot(40, 50, "40"), Slot(60, 70, "60")]
    assert grid.classify(slots, parts) == [
        SlotState(slots[0], "exists", (parts[0],)),
        SlotState(slots[1], "exists", (parts[1],)),
        SlotState(slots[2], "overlap", (parts[2],)),
        SlotState(slots[3], "create"),
    ]


def test_gaps_overlaps_and_runway() -> None:
    parts = [part("a", 0, 10), part("b", 10, 20), part("c", 30, 40), part("d", 35, 50)]
    gaps, overlaps = grid.gaps_and_overlaps(parts)
    assert gaps == [(parts[1], parts[2])] and overlaps == [(parts[2], parts[3])]
    assert grid.runway(parts, 5) == (1, 15)
    assert grid.runway(parts, 25) == (0, 0)  # nothing holds `at`: no runway at all
    assert grid.runway([part("a", 0, 10), part("max", 10, math.inf)], 5) == (1, math.inf)
    assert grid.runway([part("a", 0, 10), part("p", 10, 20, pending=True)], 5) == (0, 5)


def test_retention_cutoff_and_retirable() -> None:
    now = datetime(2026, 3, 31, 12, tzinfo=BERLIN)
    months = grid.time_cutoff(now, parse_retention("1 month"), "timestamptz", BERLIN)
    assert months == grid.micros(datetime(2026, 2, 28, 12, tzinfo=BERLIN))  # calendar month, day clamped
    assert grid.time_cutoff(now, parse_retention("12h"), "timestamp", BERLIN) == wall(2026, 3, 31)
    parts = [part("min", -math.inf, 10), part("old", 10, 20), part("edge", 20, 30), part("cur", 30, 40), part("max", 40, math.inf)]
    assert grid.retirable(parts, cutoff=30, current_lo=30) == parts[:3]
    assert grid.retirable(parts, cutoff=100, current_lo=30) == parts[:3]  # never current or future
    assert grid.retirable(parts, cutoff=25, current_lo=30) == parts[:2]


def test_literals() -> None:
    value = utc(2026, 3, 29, 22)
    assert grid.literal(value, "timestamptz", BERLIN) == "'2026-03-30 00:00:00+02:00'"
    assert grid.literal(wall(2026, 3, 30), "timestamp", BERLIN) == "'2026-03-30 00:00:00'"
    assert grid.literal(wall(2026, 3, 30), "date", BERLIN) == "'2026-03-30'"
    assert grid.literal(-7, "integer", BERLIN) == "-7"
    assert grid.literal(-math.inf, "integer", BERLIN) == "MINVALUE"
    assert grid.describe(0, 10, "integer", BERLIN) == "[0, 10)"


@pytest.mark.parametrize("base,width,count,key_type,expected", [
    (5, 10, 2, "int4", [(0, 10, "0"), (10, 20, "10"), (20, 30, "20")]),
    # The slot that would end past the type's max ends at MAXVALUE, and none follows it.
    (2_050_000_000, 100_000_000, 3, "int4", [(2_000_000_000, 2_100_000_000, "2000000000"), (2_100_000_000, math.inf, "2100000000")]),
    (30_000, 8192, 2, "int2", [(24_576, math.inf, "24576")]),  # 32768 itself is no int2
    (2**63 - 5, 10, 1, "int8", [(2**63 - 8, math.inf, "9223372036854775800")]),
    (-32_768, 1000, 1, "int2", [(-math.inf, -32_000, "m32768"), (-32_000, -31_000, "m32000")]),
])
def test_integer_slots_stay_inside_the_type(base: int, width: int, count: int, key_type: str, expected: list) -> None:
    assert [(s.lo, s.hi, s.suffix) for s in grid.integer_slots(base, width, count, key_type)] == expected


def test_key_used_share() -> None:
    assert grid.key_used_share(2**31 - 1, "int4") == 1.0
    assert grid.key_used_share(-5, "int8") == 0.0
    assert grid.key_used_share(16_384, "int2") == pytest.approx(0.5, abs=1e-4)


def test_key_growth_spans_one_to_two_windows() -> None:
    w = grid.GROWTH_WINDOW
    rate, kept = grid.key_growth((), 0.0, 100)
    assert (rate, kept) == (None, [(0.0, 100)])  # the first run measures nothing yet
    rate, kept = grid.key_growth(kept, 60.0, 160)  # a minute later: from the first observation
    assert (rate, kept) == (1.0, [(0.0, 100)])
    rate, kept = grid.key_growth(kept, w, 100 + w * 2)
    assert (rate, kept) == (2.0, [(0.0, 100), (w, 100 + w * 2)])
    rate, kept = grid.key_growth(kept, 2 * w, 100 + w * 4)  # measured from the older anchor, then it is dropped
    assert (rate, kept) == (2.0, [(w, 100 + w * 2), (2 * w, 100 + w * 4)])
    assert grid.key_growth(kept, 2 * w + 60, 100 + w * 4) == (pytest.approx((w * 2) / (w + 60)), kept)
    assert grid.key_growth(kept, 3 * w, 5) == (None, [(3 * w, 5)])  # the key went back: start over


def test_a_gap_the_grid_fills_is_covered() -> None:
    slots = [Slot(10, 20, "10"), Slot(20, 30, "20")]
    assert grid.covered(10, 30, slots) and grid.covered(12, 20, slots)
    assert not grid.covered(5, 20, slots) and not grid.covered(10, 31, slots)
