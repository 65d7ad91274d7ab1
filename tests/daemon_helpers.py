"""Run the real daemon (`python -m pgupkeep run`) as a subprocess and watch it from outside.

The daemon tests see what an operator sees: HTTP endpoints, Prometheus text, JSON log lines on
stdout and exit codes. Everything here polls with generous deadlines instead of sleeping fixed
amounts, so the tests hold on a noisy two-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pgupkeep.pgserver import free_port

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# The keys every JSON log line carries (README and docs/operations.md, "Troubleshooting by log event").
LOG_KEYS = ("timestamp", "level", "event")


def policy_text(targets: Iterable[Mapping[str, Any]], **daemon: Any) -> str:
    """A policy document; `listen` reads the port from the daemon's environment.

    Several daemons can then share one policy file, exactly like replicas sharing a ConfigMap.
    """
    settings = {
        "listen": "127.0.0.1:${PGUPKEEP_TEST_PORT}",
        "log_format": "json",
        "reload_on_change": False,
        "shutdown_grace": "5s",
    }
    settings.update(daemon)
    return yaml.safe_dump({"version": 1, "daemon": settings, "targets": list(targets)}, sort_keys=False)


def write_policy(path: Path, targets: Iterable[Mapping[str, Any]], **daemon: Any) -> Path:
    path.write_text(policy_text(targets, **daemon))
    return path


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class Daemon:
    """One `pgupkeep run` subprocess on a free port."""

    def __init__(self, config: Path, env: Mapping[str, str] | None = None, name: str = "daemon"):
        self.config = config
        self.name = name
        self.port = free_port()
        self.env = {**os.environ, **(env or {}), "PGUPKEEP_TEST_PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []  # every stdout line, raw
        self.events: list[dict[str, Any]] = []  # the ones that parsed as JSON objects
        self.bad_lines: list[str] = []  # stdout lines that are not JSON objects
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ process

    def start(self, ready: bool = True, timeout: float = 30) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgupkeep", "run", "--config", str(self.config)],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        for stream, sink in ((self.proc.stdout, self._stdout), (self.proc.stderr, self._stderr)):
            t = threading.Thread(target=self._pump, args=(stream, sink), daemon=True, name=f"{self.name}-pump")
            t.start()
            self._threads.append(t)
        if ready:
            self.wait_ready(timeout)
        return self

    def _pump(self, stream: Any, sink: Callable[[str], None]) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def _stdout(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self.events.append(obj)
            else:
                self.bad_lines.append(line)
            self._cond.notify_all()

    def _stderr(self, line: str) -> None:
        with self._cond:
            self.stderr.append(line)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if not self.running:
                raise AssertionError(f"{self.name} exited with {self.returncode()} before it was ready: {self.output()}")
            try:
                return self.get("/readyz")[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, f"{self.name} /readyz")

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.running:
            self.send(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout:g}s: {self.output()}") from None
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def output(self, last: int = 40) -> str:
        with self._cond:
            return "\nstdout:\n" + "\n".join(self.lines[-last:]) + "\nstderr:\n" + "\n".join(self.stderr[-last:])

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # ------------------------------------------------------------------ HTTP

    def get(self, path: str, accept: str | None = None, timeout: float = 5) -> tuple[int, dict[str, str], str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if accept:
            req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics, keyed by (sample name, labels)."""
        status, _, body = self.get("/metrics")
        assert status == 200, body
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value, or None when the series does not exist (or the daemon is down)."""
        try:
            return self.metrics().get((name, frozenset(labels.items())))
        except OSError:
            return None

    # ------------------------------------------------------------------ logs

    def find(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e for e in self.events
                if (event is None or e.get("event") == event) and all(e.get(k) == v for k, v in match.items())
            ]  # fmt: skip

    def wait_event(self, event: str, timeout: float = 30, after: int = 0, **match: Any) -> dict[str, Any]:
        """The first `event` (matching `match`) logged at index `after` or later."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[after:]:
                    if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self._drained():
                    raise AssertionError(f"no {event} {match} from {self.name} within {timeout:g}s: {self.output()}")
                self._cond.wait(min(left, 0.5))

    def _drained(self) -> bool:
        # The process is gone and its stdout fully read: nothing more can arrive.
        return self.proc is not None and self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)

    def mark(self) -> int:
        """The index of the next event, for `wait_event(after=...)`."""
        with self._cond:
            return len(self.events)


def require_binary(name: str, package: str) -> str:
    """The path of a tool the test needs: absent, the test fails under CI and skips on a laptop."""
    import shutil

    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian: apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class ActivitySampler:
    """Samples pg_stat_activity on a session of its own every `every` seconds, on a thread, for as
    long as the `with` block lasts: `sample(conn)` (a subclass's) records what it sees."""

    every = 0.05

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ActivitySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self, conn: Any) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.wait(self.every):
                self.sample(conn)


class _Seconds:
    """Equal to any non-negative float: durations are real time."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and other >= 0

    def __repr__(self) -> str:
        return "<seconds>"


SECONDS = _Seconds()
