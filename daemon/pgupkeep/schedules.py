"""Schedules: five-field cron (with cron's own weekday numbers and @hourly-style macros) or
`every <duration>`.

APScheduler's CronTrigger numbers weekdays from Monday = 0 and ANDs day-of-month with
day-of-week; cron numbers them from Sunday = 0 (7 is Sunday too) and ORs the two when both are
restricted. Both differences are translated here, so a policy means what it would in crontab.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from pgupkeep.units import DURATION_HELP, parse_duration

SCHEDULE_HELP = (
    'must be a five-field cron expression such as "15 * * * *", a macro such as @daily, '
    'or "every <duration>" such as "every 30s"'
)
# cron's macros, as Vixie cron and cronie define them.
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


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
        """An upper bound on the time between two runs (a coarse one for cron schedules)."""
        if self.every is not None:
            return self.every
        if self.hour == "*":
            return timedelta(hours=1)
        if self.day == "*" and self.day_of_week == "*":
            return timedelta(days=1)
        if self.month == "*":
            return timedelta(days=31)
        return timedelta(days=366)

    def trigger(self, timezone: tzinfo, jitter: timedelta | None = None, phase: float | None = None) -> BaseTrigger:
        """`phase` (0-1, `every` schedules only) fixes where in each period the runs fall, counted
        from the Unix epoch: runs of a fleet's databases spread over the period, the same on every
        replica."""
        # APScheduler adds uniform(0, jitter) seconds: a float keeps a sub-second jitter.
        jitter_s = jitter.total_seconds() if jitter else None
        if self.every is not None:
            seconds = self.every.total_seconds()
            start = None if phase is None else datetime.fromtimestamp(phase * seconds, tz=UTC)
            return IntervalTrigger(seconds=seconds, timezone=timezone, jitter=jitter_s or None, start_date=start)
        common = {"minute": self.minute, "hour": self.hour, "month": self.month, "timezone": timezone}
        if self.day != "*" and self.day_of_week != "*":
            return _Forward(
                OrTrigger(
                    [
                        CronTrigger(day=self.day, day_of_week="*", **common),
                        CronTrigger(day="*", day_of_week=self.day_of_week, **common),
                    ],
                    jitter=jitter_s or None,
                ),
                timezone,
            )
        return _Forward(
            CronTrigger(day=self.day, day_of_week=self.day_of_week, jitter=jitter_s or None, **common),
            timezone,
        )


def _ts(moment: datetime) -> float:
    # Aware datetimes sharing a tzinfo compare by wall clock, ignoring `fold`; instants do not.
    return moment.timestamp()


class _Forward(BaseTrigger):
    """A cron trigger that always moves forward across a DST fall-back.

    In the repeated hour APScheduler 3's CronTrigger returns the previous fire time again (or an
    earlier one), and the scheduler's catch-up loop then spins on it forever (APScheduler issue
    #1021). Here every fire time is later than the one before, and a wall-clock time fires once,
    as in cron: the second pass through the repeated hour is skipped, minute by minute (cron
    fields have no seconds), until the inner trigger answers sensibly again.
    """

    _STEP = timedelta(minutes=1)
    _LIMIT = 3 * 60  # minutes; no DST shift is longer than two hours

    def __init__(self, inner: BaseTrigger, timezone: tzinfo):
        self.inner = inner
        self.timezone = timezone

    def __str__(self) -> str:
        return str(self.inner)

    def __repr__(self) -> str:
        return f"<_Forward {self.inner!r}>"

    def _repeated(self, moment: datetime) -> bool:
        """Is this the second occurrence of an ambiguous wall-clock time?"""
        local = moment.astimezone(self.timezone)
        return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        candidate = self.inner.get_next_fire_time(previous_fire_time, now)
        floor = previous_fire_time if previous_fire_time is not None else now
        strictly = previous_fire_time is not None
        start = floor.astimezone(UTC)
        for _ in range(self._LIMIT):
            if candidate is None:
                return None
            later = _ts(candidate) > _ts(floor) if strictly else _ts(candidate) >= _ts(floor)
            if later and not self._repeated(candidate):
                return candidate
            start = (start + self._STEP).replace(second=0, microsecond=0)
            floor, strictly = start, False
            candidate = self.inner.get_next_fire_time(None, start.astimezone(self.timezone))
        return candidate


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
        except ValueError as exc:
            if str(exc).startswith(DURATION_HELP):
                raise ValueError(f"{SCHEDULE_HELP}; after 'every': {exc}") from None
            raise ValueError(f"the period after 'every' {exc}") from None
        if every < timedelta(seconds=1):
            raise ValueError("must not fire more often than every second")
        return Schedule(text=text, every=every)
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise ValueError(f"unknown cron macro {text!r}; use one of {', '.join(MACROS)}")
        return _cron(text, MACROS[text.lower()])
    return _cron(text, text)


def _cron(text: str, expression: str) -> Schedule:
    fields = expression.split(" ")
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


def longest_gap(schedule: Schedule, timezone: tzinfo, now: datetime, limit: int = 2000) -> timedelta:
    """The longest time between two consecutive runs, looking ahead from `now`.

    `period()` is a coarse upper bound for cron schedules ("*/10 * * * *" gives an hour); this
    walks the real fire times over twice that bound (at most `limit` of them), so a weekday job's
    longest gap is the weekend and a ten-minute job's is ten minutes.
    """
    if schedule.every is not None:
        return schedule.every
    trigger = schedule.trigger(timezone)
    horizon = now + 2 * schedule.period()
    previous = trigger.get_next_fire_time(None, now)
    gap = timedelta(0)
    for _ in range(limit):
        if previous is None or previous > horizon:
            break
        following = trigger.get_next_fire_time(previous, previous)
        if following is None:
            break
        gap = max(gap, following - previous)
        previous = following
    return gap or schedule.period()
