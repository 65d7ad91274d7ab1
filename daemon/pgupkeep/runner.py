"""Run one job: lease, session, standby check, plan, then apply its steps one at a time, each
fenced; timing, failure capture, then every sink.

This is the only place a job's steps are applied, a job is timed, its exceptions turned into a
`failure` result and its result handed to the log, metrics and health sinks. A broken sink is
logged, never fatal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgupkeep import db
from pgupkeep.jobs import REGISTRY, JobContext, JobKind
from pgupkeep.logs import get_logger
from pgupkeep.policy import Policy, Target
from pgupkeep.results import ItemError, JobOutput, JobResult, Plan, Step

Sink = Callable[[JobResult], None]


class RunStopped(Exception):
    """A run must stop where it is: shutdown (while it waited between attempts), or a lost lease
    (a new session it opened could not take the fence)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Fence:
    """What the runner asks before each write step: stop requested? lease still ours?"""

    stop: threading.Event
    confirm: Callable[[], str | None] = lambda: None  # None: go on; else the reason to stop

    def check(self) -> str | None:
        if self.stop.is_set():
            return "shutdown"
        return self.confirm()


def apply_plan(plan: Plan, out: JobOutput, fence: Fence | None) -> str | None:
    """Apply a plan's steps into `out`; with no fence, only plan (nothing is applied).

    Returns None when every step was tried, else why the run stopped at a step boundary.
    """
    out.findings.extend(plan.findings)
    out.samples.extend(plan.samples)
    out.errors.extend(plan.errors)
    applied: list[Step] = []
    stopped: str | None = None
    if fence is None:
        out.actions.extend(step.action for step in plan.steps)
    else:
        failed: set[str] = set()
        for step in plan.steps:
            if step.item in failed:
                continue
            if step.writes and (stopped := fence.check()) is not None:
                break
            try:
                done = step.apply()
            except RunStopped as exc:
                stopped = exc.reason
                break
            except Exception as exc:
                if fence.stop.is_set():
                    stopped = "shutdown"  # the statement in flight was cancelled by the shutdown
                    break
                out.actions.append(step.action)
                out.errors.append(ItemError(step.item, step_error(step, exc)))
                failed.add(step.item)
                continue
            if done is None:
                out.actions.append(replace(step.action, applied=True))
                applied.append(step)
                continue
            out.extend(done)
            if done.errors:
                failed.add(step.item)
            else:
                applied.append(step)
    if plan.settle is not None:
        out.extend(plan.settle(applied))
    return stopped


def step_error(step: Step, exc: BaseException) -> str:
    """An item error for a step that raised: the object, what it was doing, what went wrong."""
    text = str(exc).strip() or type(exc).__name__
    if text.startswith(f"{step.action.object}:") or text.startswith(f"{step.item}:"):
        return text
    what = step.action.action.replace("_", " ")
    return f"{step.item}: {what} {step.action.object} failed: {text}"


def execute_job(kind: JobKind, ctx: JobContext) -> JobOutput:
    """Plan and, when `ctx.apply`, apply a job with no lease and no shutdown (tests, benchmarks)."""
    out = JobOutput()
    apply_plan(kind.plan(ctx), out, Fence(threading.Event()) if ctx.apply else None)
    add_lock_findings(out, ctx)
    return out


def add_lock_findings(out: JobOutput, ctx: JobContext) -> None:
    """Each DDL attempt of the run that gave up on a lock, unless the job reported them itself."""
    if not any(f.kind == "lock_timeout" for f in out.findings):
        out.findings.extend(ctx.lock_findings())


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Runner:
    policy: Policy
    sinks: Sequence[Sink] = ()
    leases: db.Leases | None = None  # None: run without a lease (plan, tests)
    clock: Callable[[], datetime] = _utcnow
    sleep: Callable[[float], None] = time.sleep
    connect: Callable[..., psycopg.Connection] = db.connect
    # Each run in flight -> every session it opened (its own first), so a shutdown past its grace
    # can cancel all of them: jobs such as materialized_views do their work on extra sessions.
    _inflight: dict[int, list[psycopg.Connection]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _memos: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (target, job) -> JobContext.memo
    # Set at shutdown: no run starts, and runs in flight stop before their next step.
    stop: threading.Event = field(default_factory=threading.Event)

    # ------------------------------------------------------------------ public

    def forget_target(self, name: str) -> None:
        """Drop what the jobs of a target removed from the policy kept between runs."""
        for key in [k for k in self._memos if k[0] == name]:
            del self._memos[key]

    def run(
        self, target_name: str, job: str, items: tuple[str, ...] | None = None, apply: bool = True
    ) -> JobResult:
        policy = self.policy  # a reload swaps the attribute; this run keeps the policy it began with
        target = policy.target(target_name)
        kind = REGISTRY[job]
        started, t0 = time.time(), time.monotonic()
        item = ",".join(items) if items else None

        def result(outcome: str, **kw: Any) -> JobResult:
            return JobResult(
                target=target.name, job=job, outcome=outcome,  # type: ignore[arg-type]
                duration_seconds=time.monotonic() - t0, started_at=started, item=item, applied=apply, **kw,
            )  # fmt: skip

        if apply and self.stop.is_set():
            return self._finish(result("cancelled", reason="shutdown"))
        leader: bool | None = None
        if self.leases is not None:
            try:
                leader = self.leases.holds(target)
            except psycopg.Error as exc:
                return self._finish(result("failure", error=self._message(exc, target), target_up=False, leader=False))
            if not leader:
                return self._finish(result("skipped", reason="not_leader", target_up=True, leader=False))
        try:
            conn = self.connect(target)
        except psycopg.Error as exc:
            return self._finish(result("failure", error=self._message(exc, target), target_up=False, leader=leader))
        key = id(conn)
        with self._guard:
            self._inflight[key] = [conn]

        def session(**kw: Any) -> psycopg.Connection:
            extra = self.connect(target, **kw)
            with self._guard:
                self._inflight.setdefault(key, []).append(extra)
            # Work done on another session (a view's refresh) holds the fence there too: a new
            # leader must not write while that session still does.
            if apply and leader and self.leases is not None and not self.leases.fence(target, extra):
                extra.close()
                raise RunStopped("lease_lost")
            return extra

        ctx: JobContext | None = None
        out = JobOutput()
        try:
            standby = db.server_is_standby(conn)
            if apply and standby and kind.writes_for(target.section(job), items):
                return self._finish(result("skipped", reason="standby", target_up=True, leader=leader))
            ctx = JobContext(
                target=target,
                section=target.section(job),
                conn=conn,
                now=self.clock(),
                timezone=policy.daemon.zone,
                apply=apply,
                standby=standby,
                items=items,
                sleep=self._sleep,
                connect=session,
                stopping=self.stop.is_set,
                memo=self._memos.setdefault((target.name, job), {}),
            )
            plan = kind.plan(ctx)
            fence = Fence(self.stop, self._confirmer(target, conn, leader)) if apply else None
            stopped = apply_plan(plan, out, fence)
            add_lock_findings(out, ctx)
            if stopped is not None:
                return self._finish(self._cancelled(result, out, stopped, leader))
            errors = tuple(out.errors)
            return self._finish(
                result(
                    "failure" if errors else "success",
                    actions=tuple(out.actions),
                    findings=tuple(out.findings),
                    samples=tuple(out.samples),
                    errors=errors,
                    error=self._summary(errors),
                    target_up=True,
                    leader=leader,
                )
            )
        except Exception as exc:  # the runner is the one place a job's failure is captured
            if ctx is not None:
                add_lock_findings(out, ctx)
            if apply and (self.stop.is_set() or isinstance(exc, RunStopped)):
                reason = exc.reason if isinstance(exc, RunStopped) else "shutdown"
                return self._finish(self._cancelled(result, out, reason, leader))
            up = not isinstance(exc, psycopg.OperationalError) or not conn.closed
            return self._finish(
                result("failure", actions=tuple(out.actions), findings=tuple(out.findings),
                       error=self._message(exc, target), target_up=up, leader=leader)
            )  # fmt: skip
        finally:
            with self._guard:
                self._inflight.pop(key, None)
            try:
                conn.close()
            except Exception:  # closing a broken session can fail; it is gone either way
                get_logger(target=target.name, job=job).debug("session_close_failed")

    def probe(self, target: Target) -> tuple[bool, str | None]:
        """Can we connect? For targets with no job sections, monitored for reachability only."""
        try:
            with self.connect(target) as conn:
                conn.execute("SELECT 1")
            return True, None
        except psycopg.Error as exc:
            return False, self._message(exc, target)

    def inflight(self) -> int:
        with self._guard:
            return len(self._inflight)

    def cancel_all(self) -> int:
        """Cancel every query in flight on the server (shutdown past its grace)."""
        with self._guard:
            runs = len(self._inflight)
            conns = [c for sessions in self._inflight.values() for c in sessions if not c.closed]
        for conn in conns:
            try:
                conn.cancel_safe(timeout=3)
            except Exception:  # a session that is already gone needs no cancel
                get_logger().debug("cancel_failed")
        return runs

    # ------------------------------------------------------------------ internals

    def _sleep(self, seconds: float) -> None:
        """A pause inside a run (lock retries, cancel grace) that a shutdown cuts short."""
        if self.stop.wait(seconds):
            raise RunStopped("shutdown")

    def _confirmer(self, target: Target, conn: psycopg.Connection, leader: bool | None) -> Callable[[], str | None]:
        """What a run asks before each write step: None to go on, else why it must stop there."""
        if self.leases is None or not leader:
            return lambda: None
        leases = self.leases
        fenced = False

        def confirm() -> str | None:
            nonlocal fenced
            # The fence first: a lease confirmed before it could have passed to a new leader
            # that has since found the fence free.
            if not fenced:
                if not leases.fence(target, conn):
                    return "lease_lost" if target.name not in leases.held() else "previous_leader_running"
                fenced = True
            return None if leases.confirm(target) else "lease_lost"

        return confirm

    @staticmethod
    def _cancelled(result: Callable[..., JobResult], out: JobOutput, reason: str, leader: bool | None) -> JobResult:
        """A run stopped at a step boundary: `cancelled` (shutdown, lost lease), or `skipped` when
        it never wrote because a run of the previous leader still held the fence."""
        errors = tuple(out.errors)
        return result(
            "skipped" if reason == "previous_leader_running" else "cancelled", reason=reason, actions=tuple(out.actions), findings=tuple(out.findings),
            samples=tuple(out.samples), errors=errors, error=Runner._summary(errors), target_up=True,
            leader=False if reason == "lease_lost" else leader,
        )  # fmt: skip

    def _finish(self, res: JobResult) -> JobResult:
        for sink in self.sinks:
            try:
                sink(res)
            except Exception as exc:
                get_logger(target=res.target, job=res.job).error(
                    "sink_failed", sink=getattr(sink, "__qualname__", repr(sink)), error=repr(exc)
                )
        return res


    @staticmethod
    def _summary(errors: tuple[ItemError, ...]) -> str | None:
        if not errors:
            return None
        head = "; ".join(e.message if e.message.startswith(e.object) else f"{e.object}: {e.message}" for e in errors[:5])
        return head + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")

    @staticmethod
    def _message(exc: BaseException, target: Target) -> str:
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, psycopg.OperationalError) and "connect" not in text and "server" not in text:
            text = f"database error: {text}"
        elif not isinstance(exc, psycopg.Error):
            text = f"{type(exc).__name__}: {text}"
        return db.redact(text, target.dsn)

