"""The command line: exit codes, `check`, `schema`, `--version`, and `once`/`plan` output."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from pgupkeep import __version__
from pgupkeep.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "pgupkeep", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_version_and_help():
    out = cli("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"pgupkeep {__version__}")
    helped = cli("demo", "--help")
    assert helped.returncode == 0
    for option in ("--port", "--data-dir", "--keep"):
        assert option in helped.stdout


def test_check_accepts_the_example_policy():
    out = cli("check", "--config", "config/policy.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("config/policy.yaml: valid: 3 targets (1 discovering databases")


def test_check_lists_every_problem_and_exits_2(tmp_path):
    path = write(
        tmp_path,
        """\
        version: 1
        targets:
          - name: shop
            dsn: "postgresql://app:s3cret@db/shop"
            lock_timeout: forever
            partitions:
              tables: [{table: orders, interval: monthly}]
        """,
    )
    out = cli("check", "--config", path)
    assert out.returncode == 2
    assert out.stdout.splitlines() == [
        f"{path}:5:5: targets[0].lock_timeout: must be a duration such as 500ms, 30s, 5m, 2h or 1d",
        f'{path}:7:17: targets[0].partitions.tables[0].table: must be a schema-qualified name such as public.orders (quote parts with "" if needed)',
    ]
    assert "s3cret" not in out.stdout + out.stderr


def test_config_defaults_to_the_environment_variable(tmp_path):
    path = write(tmp_path, "version: 1\n")
    out = cli("check", env={"PGUPKEEP_CONFIG": path})
    assert out.returncode == 0 and out.stdout.startswith(f"{path}: valid: 0 targets")


def test_missing_policy_file_is_a_clear_error(capsys):
    assert main(["check", "--config", "/nonexistent/policy.yaml"]) == 2
    # `check` prints its problems on stdout; the message names the missing file.
    out = capsys.readouterr()
    assert "/nonexistent/policy.yaml" in out.out + out.err
    assert "cannot read the policy" in out.out


def test_config_before_the_command_is_honoured(tmp_path, capsys):
    # The subcommand's own --config must not reset one given before the command.
    assert main(["--config", "/nonexistent/policy.yaml", "check"]) == 2
    assert "/nonexistent/policy.yaml" in capsys.readouterr().out
    path = write(tmp_path, "version: 1\n")
    out = cli("--config", path, "check", env={"PGUPKEEP_CONFIG": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"{path}: valid: 0 targets")
    # After the command, it still works, and wins over one given before.
    assert main(["--config", path, "check", "--config", "/nonexistent/policy.yaml"]) == 2
    assert "/nonexistent/policy.yaml" in capsys.readouterr().out


def test_schema_prints_the_checked_in_schema(capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((REPO / "config" / "policy.schema.json").read_text())
    assert printed["properties"]["version"]["const"] == 1 or printed["properties"]["version"].get("enum") == [1]


def test_usage_errors_exit_2():
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["once", "--bogus"]) == 2


@pytest.mark.parametrize("command", ["run", "plan", "once"])
def test_invalid_policy_exits_2_before_anything_starts(tmp_path, command):
    path = write(tmp_path, "version: 1\ndaemon: {listen: nowhere}\n")
    out = cli(command, "--config", path)
    assert out.returncode == 2
    assert "daemon.listen" in out.stderr


def test_unknown_target_or_job_is_a_usage_error(tmp_path, database):
    path = write(tmp_path, "version: 1\ntargets: [{name: a, dsn: '${DSN}', health: {}}]\n")
    assert cli("once", "--config", path, "--target", "nope", env={"DSN": database}).returncode == 2
    assert cli("plan", "--config", path, "--job", "nope", env={"DSN": database}).returncode == 2


def test_once_json_prints_one_object_per_run_and_exit_code_reflects_failures(tmp_path, database):
    path = write(
        tmp_path,
        """\
        version: 1
        targets:
          - name: good
            dsn: "${DSN}"
            health: {}
          - name: down
            dsn: "postgresql://postgres@127.0.0.1:1/none"
            connect_timeout: 1s
            health: {}
        """,
    )
    out = cli("once", "--config", path, "--json", env={"DSN": database})
    assert out.returncode == 1
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["target"], r["job"], r["outcome"]) for r in rows] == [
        ("good", "health", "success"),
        ("down", "health", "failure"),
    ]
    for row in rows:
        assert set(row) >= {"target", "job", "outcome", "duration_seconds", "actions", "findings", "error"}
        assert isinstance(row["duration_seconds"], float)
    assert rows[0]["error"] is None
    assert "port 1 failed" in rows[1]["error"]
    # Logs go to stderr, as JSON lines, so stdout stays machine-readable.
    events = [json.loads(line)["event"] for line in out.stderr.splitlines() if line.startswith("{")]
    assert "job_finished" in events and "target_unreachable" in events

    only_good = cli("once", "--config", path, "--json", "--target", "good", env={"DSN": database})
    assert only_good.returncode == 0
    assert [json.loads(line)["target"] for line in only_good.stdout.splitlines()] == ["good"]


def test_plan_changes_nothing_and_prints_the_sql(tmp_path, database):
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.plan_orders (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at)")
    path = write(
        tmp_path,
        """\
        version: 1
        targets:
          - name: shop
            dsn: "${DSN}"
            partitions:
              tables: [{table: public.plan_orders, interval: monthly, premake: 2}]
        """,
    )
    out = cli("plan", "--config", path, "--json", env={"DSN": database})
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["outcome"] == "success"
    creates = [a for a in row["actions"] if a["action"] == "create_partition"]
    assert len(creates) == 3  # the current month and two more
    assert all(a["applied"] is False and "ATTACH PARTITION" in a["sql"] for a in creates)
    with psycopg.connect(database) as conn:
        count = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'public.plan_orders'::regclass").fetchone()[0]
    assert count == 0

    human = cli("plan", "--config", path, env={"DSN": database})
    assert human.returncode == 0
    assert "planned create_partition" in human.stdout and "ATTACH PARTITION" in human.stdout

    applied = cli("once", "--config", path, "--json", env={"DSN": database})
    assert applied.returncode == 0, applied.stdout + applied.stderr
    (row,) = [json.loads(line) for line in applied.stdout.splitlines()]
    assert [a["applied"] for a in row["actions"] if a["action"] == "create_partition"] == [True] * 3


def test_plan_exits_1_when_a_target_cannot_be_read(tmp_path):
    path = write(
        tmp_path,
        "version: 1\ntargets: [{name: down, dsn: 'postgresql://postgres@127.0.0.1:1/x', connect_timeout: 1s, health: {}}]\n",
    )
    assert cli("plan", "--config", path).returncode == 1
