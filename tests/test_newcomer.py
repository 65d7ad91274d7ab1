"""What a newcomer hits first: the demo's banner where it can be seen, readable console lines, help
that says what a command does, `once` that says it ran nothing, a reload failure that says how the
file will be re-read. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from daemon_helpers import REPO, Daemon, write_policy
from pgupkeep import logs
from pgupkeep.pgserver import candidate_bindirs, free_port


def pgupkeep(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgupkeep", *args], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("demo", "throwaway PostgreSQL"),
        ("schema", "JSON Schema"),
        ("run", "Run the daemon"),
        ("check", "without contacting any database"),
        ("plan", "changing nothing"),
        ("once", "3 when another replica holds the lease"),
    ],
)
def test_every_command_help_says_what_it_does(command: str, says: str) -> None:
    out = pgupkeep(command, "--help")
    assert out.returncode == 0 and out.stderr == ""
    description = " ".join(out.stdout.split("\n\n", 2)[1].split())  # the paragraph after the usage
    assert says in description, out.stdout


def test_demo_help_names_its_own_default_policy() -> None:
    out = pgupkeep("demo", "--help")
    assert "default: config/demo.yaml" in " ".join(out.stdout.split())


def test_console_lines_lead_with_the_event_then_what_it_is_about() -> None:
    renderer = logs.ConsoleRenderer(colors=False)
    line = renderer(
        None, "warning",
        {"timestamp": "2026-11-30T10:20:42.051Z", "level": "warning", "event": "long_running_query", "value": 301.5,
         "detail": {"pid": 7}, "message": "pid 7 (user app): query active for 301.5s", "object": "pid 7",
         "job": "long_running_queries", "target": "shop"},
    )  # fmt: skip
    assert line == (
        'long_running_query [warning]  target=shop job=long_running_queries object="pid 7" '
        'message="pid 7 (user app): query active for 301.5s" value=301.5 detail={"pid":7}  (10:20:42)'
    )
    assert renderer(None, "info", {"event": "daemon_started", "level": "info", "port": 9188}) == "daemon_started  port=9188"


def test_a_console_daemon_writes_no_json_and_starts_each_line_with_the_event(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, "health": {"schedule": "every 1s"}}],
                          log_format="console")  # fmt: skip
    with Daemon(config) as d:
        d.start()
        assert d.stop() == 0
    assert d.events == []  # nothing JSON on a console
    first_words = [line.split()[0] for line in d.lines if line.strip()]
    assert first_words[:2] == ["policy_loaded", "daemon_started"] and first_words[-1] == "daemon_stopped"
    assert any(line.startswith("job_finished  target=shop job=health outcome=success") for line in d.lines), d.lines


def test_once_while_another_replica_leads_says_so_and_exits_3(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, "health": {"schedule": "every 1s"}}])
    with Daemon(config) as d:
        d.start()
        d.wait_event("job_finished", target="shop", job="health", outcome="success")
        out = pgupkeep("once", "--config", str(config), env={"PGUPKEEP_TEST_PORT": str(free_port())})
        assert out.returncode == 3, out
        assert out.stdout.startswith("shop/health: skipped in ") and "(not_leader)" in out.stdout
        assert (
            "pgupkeep: shop/health: not run: another replica holds the lease of target shop "
            "(a running daemon leads it; its own runs do this work)"
        ) in out.stderr
        as_json = pgupkeep("once", "--json", "--config", str(config), env={"PGUPKEEP_TEST_PORT": str(free_port())})
        assert as_json.returncode == 3
        [row] = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert (row["outcome"], row["reason"]) == ("skipped", "not_leader")
        assert d.stop() == 0
    alone = pgupkeep("once", "--config", str(config), env={"PGUPKEEP_TEST_PORT": str(free_port())})
    assert alone.returncode == 0 and alone.stdout.startswith("shop/health: success"), alone


@pytest.mark.parametrize("watching", [True, False])
def test_policy_reload_failed_says_how_the_file_will_be_read_again(database: str, tmp_path: Path, watching: bool) -> None:
    targets = [{"name": "shop", "dsn": database, "health": {"schedule": "every 1s"}}]
    config = write_policy(tmp_path / "p.yaml", targets, reload_on_change=watching)
    with Daemon(config) as d:
        d.start()
        mark = d.mark()
        config.write_text(config.read_text() + "bogus: 1\n")
        if not watching:
            d.send(signal.SIGHUP)
        failed = d.wait_event("policy_reload_failed", after=mark, timeout=30)
        assert failed["reason"] == ("file_changed" if watching else "sighup")
        assert failed["action"] == (
            "the previous policy keeps running; fix the file: it is watched and re-read when it changes (or on SIGHUP)"
            if watching
            else "the previous policy keeps running; fix the file, then send SIGHUP to re-read it "
            "(reload_on_change is false: the file is not watched)"
        )
        assert d.stop() == 0


needs_server = pytest.mark.skipif(not candidate_bindirs(), reason="no PostgreSQL server binaries (install the test extra)")


@needs_server
def test_the_demo_banner_comes_before_the_first_log_line_and_again_after_the_last() -> None:
    with tempfile.TemporaryDirectory(prefix="pgupkeep-newcomer-") as cwd:
        # One pipe for both streams keeps their order, as a terminal shows it.
        proc = subprocess.run(
            [sys.executable, "-m", "pgupkeep", "demo", "--config", str(REPO / "config" / "demo.yaml"),
             "--metrics-port", "0", "--duration", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, timeout=180,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    json_at = [i for i, line in enumerate(lines) if line.startswith("{")]
    banner_at = [i for i, line in enumerate(lines) if line.startswith("  metrics   http://127.0.0.1:")]
    assert json_at and len(banner_at) == 2, proc.stdout
    assert banner_at[0] < json_at[0], "the banner must come before any log line"
    assert banner_at[1] > json_at[-1], "and again after the last"
    assert lines[banner_at[0]] == lines[banner_at[1]]
    started = json.loads(next(line for line in lines if '"demo_started"' in line))
    assert lines[banner_at[0]] == f"  metrics   {started['metrics_url']}"
    assert "pgupkeep demo: stopped. It ran with:" in proc.stdout
