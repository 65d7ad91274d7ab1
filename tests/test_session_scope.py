"""A target is one database: two targets on one server, and a third database pgupkeep does not
manage, each with sessions of their own. Each target judges and signals only its own sessions;
`scope: server` sees them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgupkeep import db
from pgupkeep.jobs import long_running_queries as lrq
from pgupkeep.results import JobOutput, Plan
from pgupkeep.runner import Fence, apply_plan
from session_helpers import Held, Sessions, context, dsn_as, run_job, target_for

THRESHOLD = 0.2
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tenants(pg_server) -> Iterator[dict[str, str]]:
    """DSNs of three databases on the test server: targets a and b, and c that no target names."""
    names = {k: pg_server.create_database(f"scope_{k}") for k in "abc"}
    try:
        yield {k: pg_server.dsn(name) for k, name in names.items()}
    finally:
        for name in names.values():
            pg_server.drop_database(name)


@pytest.fixture
def busy(tenants: dict[str, str], roles: dict[str, str], sessions: Sessions) -> dict[str, tuple[Held, Held]]:
    """In each database, an application's sleeper and idle-in-transaction session, both over 200ms."""
    held = {}
    for k, dsn in tenants.items():
        app = dsn_as(dsn, user=roles["app"], application_name="shop")
        held[k] = (sessions.sleeper(app), sessions.idle_in_transaction(app))
    for sleeper, idle in held.values():
        sessions.wait(sleeper, "active", older_than=THRESHOLD)
        sessions.wait(idle, "idle in transaction", older_than=THRESHOLD)
    return held


def objects(held: dict[str, tuple[Held, Held]], *keys: str) -> set[str]:
    return {f"pid {h.pid}" for k in keys for h in held[k]}


def alive(sessions: Sessions, held: dict[str, tuple[Held, Held]], *keys: str) -> bool:
    return all(
        sessions.state(sleeper.pid) == "active" and sessions.state(idle.pid) == "idle in transaction"
        for sleeper, idle in (held[k] for k in keys)
    )


def dbname(dsn: str) -> str:
    return conninfo_to_dict(dsn)["dbname"]


def test_each_target_flags_and_signals_only_its_own_database(tenants, busy, roles, sessions):
    own = {k: objects(busy, k) for k in "abc"}  # before the terminated sessions lose their pids
    pids = {k: [h.pid for h in busy[k]] for k in "abc"}
    # Target a ignores the application's user: target b's terminate_after must not override that.
    ignoring, _ = run_job(tenants["a"], terminate_after="200ms", ignore_users=f"[{roles['app']}]")
    only_b, _ = run_job(tenants["b"], terminate_after="200ms")

    assert ignoring.findings == [] and ignoring.actions == []
    assert {f.object for f in only_b.findings} == own["b"]
    assert {f.detail["datname"] for f in only_b.findings} == {dbname(tenants["b"])}
    assert {(a.action, a.object, a.applied) for a in only_b.actions} == {
        ("terminate_backend", o, True) for o in own["b"]
    }
    for pid in pids["b"]:
        sessions.gone(pid)
    assert alive(sessions, busy, "a", "c")

    only_a, _ = run_job(tenants["a"], terminate_after="200ms")

    assert {f.object for f in only_a.findings} == own["a"]
    assert {(a.object, a.applied) for a in only_a.actions} == {(o, True) for o in own["a"]}
    for pid in pids["a"]:
        sessions.gone(pid)
    assert alive(sessions, busy, "c")  # the database no target names is never touched


def test_plan_on_target_b_never_plans_a_signal_for_a_session_of_a(tmp_path, tenants, busy):
    policy = tmp_path / "policy.yaml"
    section = "long_running_queries: {warn_after: 200ms, idle_in_transaction_after: 200ms, cancel_after: 200ms, terminate_after: 200ms}"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            targets:
              - name: a
                dsn: "${{DSN_A}}"
                {section}
              - name: b
                dsn: "${{DSN_B}}"
                {section}
            """
        )
    )

    def plan(*args: str) -> dict[str, dict]:
        out = subprocess.run(
            [sys.executable, "-m", "pgupkeep", "plan", "--config", str(policy), "--job", "long_running_queries", "--json", *args],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env={**os.environ, "DSN_A": tenants["a"], "DSN_B": tenants["b"]},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return {row["target"]: row for row in map(json.loads, out.stdout.splitlines())}

    (b,) = plan("--target", "b").values()
    both = plan()

    sleeper_b, idle_b = busy["b"]
    assert b["target"] == "b"
    assert sorted((a["action"], a["object"]) for a in b["actions"]) == sorted(
        [("cancel_backend", f"pid {sleeper_b.pid}"), ("terminate_backend", f"pid {sleeper_b.pid}"),
         ("terminate_backend", f"pid {idle_b.pid}")]
    )  # fmt: skip
    assert all(a["applied"] is False and "AND a.datname = current_database()" in a["sql"] for a in b["actions"])
    assert {f["object"] for f in b["findings"]} == objects(busy, "b")
    assert {a["object"] for a in both["a"]["actions"]} == objects(busy, "a")
    assert {a["object"] for a in both["b"]["actions"]} == objects(busy, "b")


def test_scope_server_judges_every_database(tenants, busy, sessions):
    out, _ = run_job(tenants["a"], scope="server", terminate_after="200ms", dry_run="true")

    everyone = objects(busy, "a", "b", "c")
    assert {f.object for f in out.findings} == everyone
    assert {f.detail["datname"] for f in out.findings} == {dbname(tenants[k]) for k in "abc"}
    assert {(a.object, a.applied, a.detail["dry_run"]) for a in out.actions} == {(o, False, True) for o in everyone}
    assert all("current_database()" not in a.sql for a in out.actions)
    assert alive(sessions, busy, "a", "b", "c")
    flagged = {s.labels.get("state"): s.value for s in out.samples if s.metric == "long_running_queries"}
    assert flagged == {"active": 3.0, "idle_in_transaction": 3.0}


def test_a_signal_planned_for_another_database_is_refused_by_its_statement(tenants, busy, sessions):
    target, policy = target_for(tenants["a"], terminate_after="200ms")
    with db.connect(target) as c:
        measured = lrq.judge(lrq.measure(c, target.long_running_queries), target.long_running_queries)
    assert {f"pid {s.activity.pid}" for s in measured.signals} == objects(busy, "a")

    # The same statements, sent from a session of database b (as if b's run had measured them).
    target_b, _ = target_for(tenants["b"], terminate_after="200ms")
    with db.connect(target_b) as c:
        out = JobOutput()
        apply_plan(Plan(steps=lrq.signal_steps(context(target_b, policy, c), measured.signals)), out, Fence(threading.Event()))

    assert [a.applied for a in out.actions] == [False, False] and out.errors == []
    assert all(a.detail["skipped_reason"].startswith("the session ended or changed") for a in out.actions)
    assert alive(sessions, busy, "a")


def test_sessions_hidden_in_other_databases_do_not_fail_a_database_scoped_run(tenants, roles, sessions):
    sleeper = sessions.sleeper(dsn_as(tenants["a"], application_name="admin"))  # a superuser's, in a
    sessions.wait(sleeper, "active", older_than=THRESHOLD)
    as_app = dsn_as(tenants["b"], user=roles["app"])

    scoped, _ = run_job(as_app)
    server, _ = run_job(as_app, scope="server")

    assert scoped.errors == []
    assert [e.object for e in server.errors] == ["pg_stat_activity"]
    assert "hidden from role" in server.errors[0].message

