"""Policy -> APScheduler jobs: one per (target, job kind), and per schedule for per-item kinds.

Every job has max_instances=1 and coalescing, so a run that overruns its schedule makes the next
one skip (counted), never queue; `max_parallel_jobs` threads bound the whole fleet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from pgupkeep.jobs import REGISTRY
from pgupkeep.policy import Policy
from pgupkeep.schedules import Schedule

PROBE_EVERY = timedelta(seconds=30)


@dataclass(frozen=True)
class PlannedJob:
    id: str
    target: str
    job: str
    items: tuple[str, ...] | None
    schedule: Schedule
    at_start: bool = True

    @property
    def item(self) -> str | None:
        """The `item` of this job's results (see Runner.run)."""
        return ",".join(self.items) if self.items else None


def discovered(target: str) -> bool:
    return "/" in target


def phase(job_id: str) -> float:
    """A fixed place in the period for a job id, 0-1, the same on every replica."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") / 2**64


def planned_jobs(policy: Policy) -> list[PlannedJob]:
    """Every scheduler job the policy asks for, in policy order."""
    out = []
    for target in policy.targets:
        if target.discover is not None:
            continue  # its databases are the targets (see fleet.expand), not its own DSN
        for job in target.job_kinds():
            kind = REGISTRY[job]
            for group in kind.schedule_groups(target.section(job)):
                suffix = f":{group.key}" if group.key else ""
                out.append(
                    PlannedJob(f"{target.name}:{job}{suffix}", target.name, job, group.items, group.schedule, group.at_start)
                )
    return out


class Scheduler:
    """A BackgroundScheduler wired to run `run(target, job, items)` for each planned job."""

    def __init__(
        self,
        run: Callable[[str, str, tuple[str, ...] | None], object],
        on_overrun: Callable[[str, str], None],
        on_missed: Callable[[str, str], None] | None = None,
        probe: Callable[[str], None] | None = None,
        watch: Callable[[], None] | None = None,
        watch_every: timedelta = timedelta(seconds=2),
        discover: Callable[[str], None] | None = None,
    ):
        self._discover = discover
        self._run = run
        self._probe = probe
        self._watch = watch
        self._watch_every = watch_every
        self._on_overrun = on_overrun
        self._on_missed = on_missed
        self._jobs: dict[str, PlannedJob] = {}
        self._sched: BackgroundScheduler | None = None

    def start(self, policy: Policy, heartbeat: Callable[[], None], heartbeat_every: timedelta) -> None:
        d = policy.daemon
        self._sched = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(d.max_parallel_jobs),
                # Its own thread, so busy jobs never starve the liveness heartbeat.
                "heartbeat": ThreadPoolExecutor(1),
                # Lease confirmations wait on the network: never on the heartbeat's thread.
                "leases": ThreadPoolExecutor(1),
                "discovery": ThreadPoolExecutor(1),
            },
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": max(1, int(d.misfire_grace.total_seconds())),
            },
            timezone=d.zone,
        )
        self._sched.add_listener(self._event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self._sched.add_job(
            heartbeat, "interval", seconds=heartbeat_every.total_seconds(), id="__heartbeat__",
            executor="heartbeat", next_run_time=datetime.now(d.zone),
        )  # fmt: skip
        if self._watch is not None:
            self._sched.add_job(
                self._watch, "interval", seconds=self._watch_every.total_seconds(), id="__leases__",
                executor="leases",
            )  # fmt: skip
        self.apply(policy)
        self._sched.start()

    def apply(self, policy: Policy, at_once: frozenset[str] = frozenset()) -> None:
        """Replace the scheduled jobs with those of `policy` (start-up and reload); the jobs of the
        targets in `at_once` (databases discovered while running) run once now, then on schedule."""
        assert self._sched is not None
        wanted = {p.id: p for p in planned_jobs(policy)}
        for job_id in list(self._jobs):
            if job_id not in wanted or wanted[job_id] != self._jobs[job_id]:
                self._sched.remove_job(job_id)
                del self._jobs[job_id]
        self._apply_probes(policy)
        for job_id, planned in wanted.items():
            if job_id in self._jobs:
                continue
            # A discovered database's runs are spread over their period (the same phase on every
            # replica) rather than all due at once; a target of its own runs once at start-up,
            # then on schedule, so a fresh daemon reports at once. A kind may ask for its schedule
            # only (a sql statement on a cron schedule runs at its times).
            spread = discovered(planned.target) and planned.target not in at_once
            trigger = planned.schedule.trigger(policy.daemon.zone, policy.daemon.jitter, phase(job_id) if spread else None)
            extra = {} if spread or not planned.at_start else {"next_run_time": datetime.now(policy.daemon.zone)}
            self._sched.add_job(
                self._run,
                trigger=trigger,
                args=(planned.target, planned.job, planned.items),
                id=job_id,
                name=job_id,
                replace_existing=True,
                **extra,
            )
            self._jobs[job_id] = planned

    def discoveries(self, every: dict[str, timedelta]) -> None:
        """One discovery job per discovering target (name -> period), run at once, then on period."""
        assert self._sched is not None
        for job in self._sched.get_jobs():
            if job.id.endswith(":__discover__") and job.id.removesuffix(":__discover__") not in every:
                job.remove()
        if self._discover is None:
            return
        for name, period in every.items():
            job_id = f"{name}:__discover__"
            existing = self._sched.get_job(job_id)
            if existing is not None and getattr(existing.trigger, "interval", None) == period:
                continue
            self._sched.add_job(
                self._discover, "interval", args=(name,), id=job_id, name=job_id, replace_existing=True,
                seconds=period.total_seconds(), executor="discovery", next_run_time=datetime.now(),
            )  # fmt: skip

    def _apply_probes(self, policy: Policy) -> None:
        # A target with no job sections is only watched for reachability (pgupkeep_target_up).
        assert self._sched is not None
        wanted = {f"{t.name}:__probe__": t.name for t in policy.targets if not t.job_kinds()}
        for job in self._sched.get_jobs():
            if job.id.endswith(":__probe__") and job.id not in wanted:
                job.remove()
        if self._probe is None:
            return
        for job_id, name in wanted.items():
            if self._sched.get_job(job_id) is None:
                self._sched.add_job(
                    self._probe, "interval", args=(name,), id=job_id, name=job_id,
                    seconds=PROBE_EVERY.total_seconds(), next_run_time=datetime.now(policy.daemon.zone),
                )  # fmt: skip

    def pause(self) -> None:
        if self._sched is not None and self._sched.running:
            self._sched.pause()

    def shutdown(self) -> None:
        if self._sched is not None and self._sched.running:
            self._sched.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return bool(self._sched and self._sched.running)

    def _event(self, event: JobEvent) -> None:
        planned = self._jobs.get(event.job_id)
        if planned is None:
            return
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self._on_overrun(planned.target, planned.job)
        elif event.code == EVENT_JOB_MISSED and self._on_missed is not None:
            self._on_missed(planned.target, planned.job)
