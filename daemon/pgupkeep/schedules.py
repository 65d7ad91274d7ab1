"""Schedules: five-field cron (with cron's own weekday numbers) or `every <duration>`.

APScheduler's CronTrigger numbers weekdays from Monday = 0 and ANDs day-of-month with
day-of-week; cron numbers them from Sunday = 0 (7 is Sunday too) and ORs the two when both are
restricted. Both differences are translated here, so a policy means what it would in crontab.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, timedelta, tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from pgupkeep.units import DURATION_HELP, parse_duration

SCHEDULE_HELP = (
    'must be a five-field cron expression such as "15 * * * *" or "every <duration>" such as "every 30s"'
)
_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]


@dataclass(frozen=True)
class Schedule:
    text: str
    every: timedelta | None = None  # set for `every <duration>`
    minute: str = "*"
    hour: str = "*"
    day: str = "*"
    month: str = "*"
    day_of_week: str = "*"  # already in APScheduler's names (mon..sun)

    def __str__(self) -> str:
        return self.text

    def period(self) -> timedelta:
        """A bound on the time between two runs, used for misfire grace and stale checks."""
        if self.every is not None:
            return self.every
        if self.hour == "*":
            return timedelta(hours=1)
        if self.day == "*" and self.day_of_week == "*":
            return timedelta(days=1)
        if self.month == "*":
            return timedelta(days=31)
        return timedelta(days=366)

    def trigger(self, timezone: tzinfo, jitter: timedelta | None = None) -> BaseTrigger:
        jitter_s = int(jitter.total_seconds()) if jitter else None
        if self.every is not None:
            return IntervalTrigger(
                seconds=self.every.total_seconds(), timezone=timezone, jitter=jitter_s or None
            )
        common = {"minute": self.minute, "hour": self.hour, "month": self.month, "timezone": timezone}
        if self.day != "*" and self.day_of_week != "*":
            return OrTrigger(
                [
                    CronTrigger(day=self.day, day_of_week="*", **common),
                    CronTrigger(day="*", day_of_week=self.day_of_week, **common),
                ],
                jitter=jitter_s or None,
            )
        return CronTrigger(
            day=self.day, day_of_week=self.day_of_week, jitter=jitter_s or None, **common
        )


def _cron_weekday(token: str) -> int:
    low = token.lower()
    if low in _DAY_NAMES:
        return _DAY_NAMES.index(low)
    if not low.isdigit() or not 0 <= int(low) <= 7:
        raise ValueError(f"day of week {token!r} " + "must be 0-7 (0 and 7 are Sunday) or sun-sat")
    return int(low) % 7


def _translate_day_of_week(field: str) -> str:
    """Cron day-of-week (0/7 = Sunday) -> APScheduler's comma list of day names."""
    if field == "*" or field == "?":
        return "*"
    days: set[int] = set()
    for item in field.split(","):
        rng, _, step_s = item.partition("/")
        step = 1
        if step_s:
            if not step_s.isdigit() or int(step_s) == 0:
                raise ValueError(f"bad step in day of week {item!r}")
            step = int(step_s)
        if rng == "*":
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = _cron_weekday(a), _cron_weekday(b)
            if b.strip() == "7":
                hi = 7
            if hi < lo:
                raise ValueError(f"day-of-week range {rng!r} runs backwards")
        else:
            lo = _cron_weekday(rng)
            hi = 6 if step_s else lo
        days.update(d % 7 for d in range(lo, hi + 1, step))
    # APScheduler counts Monday first; list the days by name so no numbering can be misread.
    order = [1, 2, 3, 4, 5, 6, 0]
    return ",".join(_DAY_NAMES[d] for d in order if d in days)


def parse_schedule(value: object) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(SCHEDULE_HELP)
    text = " ".join(value.split())
    if text.lower().startswith("every "):
        try:
            every = parse_duration(text[6:])
        except ValueError:
            raise ValueError(f"{SCHEDULE_HELP}; after 'every': {DURATION_HELP}") from None
        if every < timedelta(seconds=1):
            raise ValueError("must not fire more often than every second")
        return Schedule(text=text, every=every)
    fields = text.split(" ")
    if len(fields) != 5:
        raise ValueError(SCHEDULE_HELP)
    minute, hour, day, month, dow = fields
    schedule = Schedule(
        text=text,
        minute=minute,
        hour=hour,
        day=day,
        month=month.lower(),
        day_of_week=_translate_day_of_week(dow),
    )
    try:  # let APScheduler judge the other four fields, exactly as it will run them
        schedule.trigger(timezone=UTC)
    except ValueError as exc:
        raise ValueError(f"{SCHEDULE_HELP}: {exc}") from None
    return schedule
