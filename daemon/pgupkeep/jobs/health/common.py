"""What the health checks share: reloption lookups in SQL, top-N bounds on per-object findings,
and number formatting for messages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from pgupkeep.results import Finding
from pgupkeep.units import format_duration


def reloption(options: str, name: str) -> str:
    """SQL text reading one storage parameter (`name=value`) from a reloptions array column, NULL
    when unset. Anchored on the separator so `toast.<name>` on the main table never matches: the
    TOAST table's own parameters live in its own reloptions."""
    assert name.replace("_", "").isalnum()  # a constant of this package, never user input
    return f"substring(array_to_string({options}, ',') FROM '(?:^|,){name}=([^,]*)')"


def bounded(findings: Sequence[Finding], top: int) -> list[Finding]:
    """The first `top` findings (callers sort worst first), each told how many there were in all,
    so a database with thousands of objects over a threshold logs `top` events a run, not all."""
    total = len(findings)
    return [
        Finding(f.kind, f.object, f.value, f.message, {**f.detail, "over_threshold": total})
        for f in findings[:top]
    ]


def count(n: float) -> str:
    return f"{int(n):,}"


def percent(share: float) -> str:
    """A share for a message: 84%, and two significant digits below 1% (0.055%), never a bare 0%."""
    if share == 0 or abs(share) >= 0.01:
        return f"{share:.0%}"
    return f"{share * 100:.2g}%"


def size(n: float) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def seconds(n: float) -> str:
    """A duration for a message: 42s, 12m, 3h (rounded down to the largest whole unit)."""
    whole = max(0, int(n))
    for unit, width in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if whole >= width:
            return f"{whole // width}{unit}"
    return f"{whole}s"


def threshold(value: timedelta) -> str:
    return format_duration(value)
