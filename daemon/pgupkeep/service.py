"""The daemon's lifecycle: wire the parts, serve HTTP, schedule, reload, shut down cleanly.

Signal handlers only set events; the main thread acts on them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

from pgupkeep import __version__, db, fleet
from pgupkeep.history import History
from pgupkeep.http import HttpServer
from pgupkeep.logs import get_logger, log_result
from pgupkeep.metrics import Metrics
from pgupkeep.policy import Policy, PolicyError, load_policy
from pgupkeep.results import JobResult
from pgupkeep.runner import Runner
from pgupkeep.scheduler import Scheduler, planned_jobs

HEARTBEAT_EVERY = timedelta(seconds=2)
STALL_AFTER = 15.0  # seconds without a heartbeat before /healthz says the scheduler stalled
WATCH_EVERY = 2.0
UNWIND_SECONDS = 4.0  # after cancelling past the grace, how long runs get to return


def _fingerprint(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# daemon keys read only at start-up: a reload that changes them says so in `restart_needed_for`.
RESTART_KEYS = ("listen", "max_parallel_jobs", "timezone", "log_format", "log_level", "misfire_grace", "jitter", "max_leases", "history")


class Service:
    def __init__(self, config_path: str | os.PathLike[str], policy: Policy, metrics: Metrics | None = None):
        self.path = Path(config_path)
        self.policy = policy
        self.metrics = metrics or Metrics()
        self.log = get_logger()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self._beat = 0.0
        self._ready = False
        # Runs that have fired and not returned, counted from the first line of `_run_job` (the
        # runner only counts a run once its session is open): shutdown waits for all of them.
        self._active = 0
        self._active_lock = threading.Lock()
        self._fingerprint = _fingerprint(self.path)
        self.leases = db.Leases(max_leases=policy.daemon.max_leases, on_change=self._lease_changed)
        # What each discovering target found last; the scheduler and runner see the policy with
        # those databases as targets (`effective`).
        self.found: dict[str, fleet.Discovered] = {}
        self._fleet_lock = threading.Lock()
        h = policy.daemon.history  # the run history: one more sink, written on its own thread
        self.history = History(h, self.metrics.history_write_failed, self.metrics.history_rows_dropped) if h else None
        sinks = [log_result, self.metrics.record, *([self.history.record] if self.history else [])]
        self.runner = Runner(self.effective(), sinks=sinks, leases=self.leases)
        self.scheduler = Scheduler(
            run=self._run_job, on_overrun=self._overrun, on_missed=self._missed, probe=self._probe,
            watch=self.leases.watch, discover=self._discover,
        )  # fmt: skip
        self.http: HttpServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.history is not None:
            self.history.start()
        self.metrics.policy_loaded(True)
        self.http = HttpServer(self.policy.daemon.listen, self.metrics.render, self.healthy, self.ready)
        self.http.start()
        effective = self.effective()
        self.metrics.set_targets([t.name for t in effective.targets])
        self.scheduler.start(effective, heartbeat=self._heartbeat, heartbeat_every=HEARTBEAT_EVERY)
        self.scheduler.discoveries(self._discovering())
        self._ready = True
        self.log.info(
            "daemon_started",
            version=__version__,
            listen=self.policy.daemon.listen,
            port=self.http.port,
            targets=len(self.policy.targets),
            jobs=len(planned_jobs(self.effective())),
            config=str(self.path),
        )

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())

    def serve(self) -> int:
        """Run until asked to stop; returns the exit code."""
        next_watch = time.monotonic() + WATCH_EVERY
        while not self.stop_event.wait(0.2):
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload(reason="sighup")
            if self.policy.daemon.reload_on_change and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_EVERY
                current = _fingerprint(self.path)
                if current is not None and current != self._fingerprint:
                    self.reload(reason="file_changed")
        self.shutdown()
        return 0

    def reload(self, reason: str = "sighup") -> bool:
        self._fingerprint = _fingerprint(self.path)
        try:
            new = load_policy(self.path)
        except PolicyError as exc:
            self.metrics.policy_loaded(False)
            self.log.error(
                "policy_reload_failed",
                reason=reason,
                config=str(self.path),
                problems=[str(p) for p in exc.problems],
                action=(
                    "the previous policy keeps running; fix the file: it is watched and re-read when it changes (or on SIGHUP)"
                    if self.policy.daemon.reload_on_change
                    else "the previous policy keeps running; fix the file, then send SIGHUP to re-read it "
                    "(reload_on_change is false: the file is not watched)"
                ),
            )
            return False
        old = self.policy
        restart_needed = [
            key for key in RESTART_KEYS
            if getattr(old.daemon, key) != getattr(new.daemon, key)
        ]  # fmt: skip
        with self._fleet_lock:
            # A discovering target that left or changed its DSN or patterns starts afresh.
            kept = {t.name: t for t in new.targets if t.discover is not None}
            for name in list(self.found):
                was = next((t for t in old.targets if t.name == name), None)
                now = kept.get(name)
                if now is None or was is None or (was.dsn, was.discover) != (now.dsn, now.discover):
                    del self.found[name]
            old_effective = self.runner.policy
            self.policy = new
            self._apply(old_effective)
        self.scheduler.discoveries(self._discovering())
        self.metrics.policy_loaded(True)
        self.log.info(
            "policy_loaded",
            reason=reason,
            config=str(self.path),
            targets=len(new.targets),
            jobs=len(planned_jobs(self.effective())),
            **({"restart_needed_for": restart_needed} if restart_needed else {}),
        )
        return True

    def shutdown(self) -> None:
        """No run starts; runs in flight stop at their next step; past the grace the statements in
        flight are cancelled; leases are released only once every run has returned."""
        grace = self.policy.daemon.shutdown_grace.total_seconds()
        self._ready = False
        self.runner.stop.set()
        self.scheduler.pause()
        deadline = time.monotonic() + grace
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        cancelled = 0
        if self.active():
            cancelled = self.runner.cancel_all()
            unwind = time.monotonic() + UNWIND_SECONDS
            while self.active() and time.monotonic() < unwind:
                time.sleep(0.05)
                if self.runner.inflight():
                    self.runner.cancel_all()  # a session opened after the first cancel
        still = self.active()
        self.scheduler.shutdown()
        if still:
            # A run that ignores cancellation (a driver stuck on a dead network) must not keep
            # writing under a lease this replica gives up: its sessions close with the process.
            self.log.warning("runs_abandoned", runs=still, message="runs still in flight at exit; their sessions close with the process")
        self.leases.release_all()
        if self.history is not None:
            self.history.close()  # what is queued is written within a few seconds, or counted
        if self.http is not None:
            self.http.stop()
        self.log.info("daemon_stopped", cancelled_jobs=cancelled)

    # ------------------------------------------------------------------ fleet

    def effective(self) -> Policy:
        """The policy with each discovered database as a target of its own."""
        return fleet.expand(self.policy, self.found)

    def _discovering(self) -> dict[str, timedelta]:
        return {t.name: t.discover.every for t in self.policy.targets if t.discover is not None}

    def _apply(self, old: Policy, at_once: frozenset[str] = frozenset()) -> None:
        """Hand the effective policy to the runner, scheduler, leases and metrics; let go of the
        targets it no longer has. Call with _fleet_lock held."""
        new = self.effective()
        gone = {t.name for t in old.targets} - {t.name for t in new.targets}
        old_dsn = {t.name: t.dsn for t in old.targets}
        changed_dsn = {t.name for t in new.targets if old_dsn.get(t.name, t.dsn) != t.dsn}
        self.leases.set_homes(fleet.lease_homes(self.policy, self.found))
        for name in gone | changed_dsn:
            self.leases.release(name)
        for name in gone:
            self.metrics.forget_target(name)
            self.runner.forget_target(name)
        self.metrics.keep_jobs({(j.target, j.job, j.item) for j in planned_jobs(new)})
        self.metrics.set_targets([t.name for t in new.targets])
        self.runner.policy = new
        self.scheduler.apply(new, at_once)

    def _discover(self, name: str) -> None:
        """List a discovering target's databases; pick up new ones, let dropped ones go."""
        try:
            parent = self.policy.target(name)
        except KeyError:
            return
        if parent.discover is None:
            return
        try:
            found = fleet.discover(parent, fleet.explicit_targets(self.policy))
        except psycopg.Error as exc:
            self.metrics.set_target_up(name, False)
            self.log.warning("target_unreachable", target=name, error=db.redact(str(exc).strip(), parent.dsn),
                             message="its databases could not be listed; the ones found before keep running")
            return
        self.metrics.set_target_up(name, True)
        with self._fleet_lock:
            if self.policy.target(name) is not parent:
                return  # a reload replaced it meanwhile
            before = self.found.get(name)
            self.found[name] = found
            old_names = before.names() if before else set()
            new_names = found.names()
            if before is None or old_names != new_names:
                # A database that appears while running reports at once; the first discovery's
                # databases spread their first runs over their periods.
                self._apply(self.runner.policy, frozenset(new_names - old_names) if before else frozenset())
        for database, why in found.skipped.items():
            if before is None or database not in before.skipped:
                self.log.warning("database_skipped", target=name, database=database, reason=why)
        if before is None or old_names != new_names:
            self.log.info("targets_discovered", target=name, targets=len(new_names),
                          added=sorted(new_names - old_names), removed=sorted(old_names - new_names))
        home = fleet.lease_homes(self.policy, {name: found})
        self.leases.rebalance([(name, home[name][0])] if name in home else [])

    # ------------------------------------------------------------------ health

    def healthy(self) -> tuple[bool, str]:
        if not self.scheduler.running:
            return False, "scheduler not running"
        age = time.monotonic() - self._beat
        if age > STALL_AFTER:
            return False, f"scheduler stalled: no heartbeat for {age:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self._ready and self.scheduler.running:
            return True, "ready"
        return False, "starting" if not self._ready else "scheduler not running"

    # ------------------------------------------------------------------ scheduler callbacks

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()

    def active(self) -> int:
        with self._active_lock:
            return self._active

    def _run_job(self, target: str, job: str, items: tuple[str, ...] | None) -> JobResult | None:
        """A scheduled run; the target may be a discovered database (see `effective`)."""
        with self._active_lock:
            if self.stop_event.is_set():
                return None
            self._active += 1
        try:
            return self.runner.run(target, job, items)
        except KeyError:  # the target or job left the policy between scheduling and running
            return None
        finally:
            with self._active_lock:
                self._active -= 1

    def _overrun(self, target: str, job: str) -> None:
        self.metrics.overrun(target, job)
        self.log.warning(
            "job_skipped", target=target, job=job, reason="overrun",
            message="the previous run is still going; this run is skipped, not queued",
        )  # fmt: skip

    def _missed(self, target: str, job: str) -> None:
        self.metrics.missed(target, job)
        self.log.warning("job_missed", target=target, job=job, reason="misfire_grace exceeded")

    def _lease_changed(self, target: str, change: str, reason: str) -> None:
        self.metrics.lease_changed(target, change)
        if change == "lost":
            self.log.warning("lease_lost", target=target, reason=reason,
                             message="runs of this target stop at their next step; another replica may lead it now")
        else:
            self.log.info(f"lease_{change}", target=target)

    def _probe(self, target_name: str) -> None:
        try:
            target = self.runner.policy.target(target_name)
        except KeyError:
            return
        ok, error = self.runner.probe(target)
        self.metrics.set_target_up(target.name, ok)
        if not ok:
            self.log.warning("target_unreachable", target=target.name, error=error)


def run_daemon(config_path: str, policy: Policy, **kw: Any) -> int:
    service = Service(config_path, policy, **kw)
    service.install_signal_handlers()
    service.start()
    return service.serve()
