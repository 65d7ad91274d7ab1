"""Run one job: lease, session, standby check, timing, failure capture, then every sink.

This is the only place a job is timed, its exceptions turned into a `failure` result and its
result handed to the log, metrics and health sinks. A broken sink is logged, never fatal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgupkeep import db
from pgupkeep.jobs import REGISTRY, JobContext
from pgupkeep.logs import get_logger
from pgupkeep.policy import Policy, Target
from pgupkeep.results import ItemError, JobOutput, JobResult

Sink = Callable[[JobResult], None]


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
            return extra
        ctx: JobContext | None = None
        try:
            standby = db.server_is_standby(conn)
            if kind.writes and apply and standby:
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
                sleep=self.sleep,
                connect=session,
                memo=self._memos.setdefault((target.name, job), {}),
            )
            out = kind.run(ctx)
            self._add_lock_findings(out, ctx)
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
            out = JobOutput()
            if ctx is not None:
                self._add_lock_findings(out, ctx)
            up = not isinstance(exc, psycopg.OperationalError) or not conn.closed
            return self._finish(
                result("failure", findings=tuple(out.findings), error=self._message(exc, target), target_up=up, leader=leader)
            )
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
    def _add_lock_findings(out: JobOutput, ctx: JobContext) -> None:
        if not any(f.kind == "lock_timeout" for f in out.findings):
            out.findings.extend(ctx.lock_findings())

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

