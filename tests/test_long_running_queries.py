"""The long_running_queries job against real sessions held open by the test: what is flagged, what
is signalled, and what is never touched."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pgupkeep import db
from pgupkeep.jobs import long_running_queries as lrq
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Plan, Sample
from pgupkeep.runner import Fence, apply_plan
from session_helpers import Held, context, dsn_as, run_job, target_for

THRESHOLD = 0.2  # seconds: warn_after / idle_in_transaction_after / cancel_after in these tests


# --------------------------------------------------------------------------- expected results


def expected_finding(
    out: JobOutput, h: Held, kind: str, state: str, finished: float, warn: str = "200ms", signals: str = ""
) -> Finding:
    """The finding the job must report for a held session; its ages checked against the test's clock.

    `signals` names the keys the policy set ("cancel", "terminate"): a hint to set one is given only
    while it is unset."""
    actual = next(f for f in out.findings if f.object == f"pid {h.pid}")
    age, xact_age = actual.detail["age_seconds"], actual.detail["xact_age_seconds"]
    # Measured by the server: after the session began, before the job returned.
    if state == "idle in transaction (aborted)":
        assert xact_age is None  # PostgreSQL clears xact_start when the transaction fails
        assert THRESHOLD < age <= finished - h.started + 0.01, age
    else:
        assert THRESHOLD < age <= xact_age <= finished - h.started + 0.01, (age, xact_age)
    i = h.info
    if kind == "long_running_query":
        what = f"query active for {age:g}s, over warn_after {warn}"
        hint = "check it in pg_stat_activity"
        hint += "" if "cancel" in signals else "; set cancel_after to have such queries cancelled"
    else:
        what = f"{state} for {age:g}s, over idle_in_transaction_after {warn}"
        hint = "the application should commit or roll back"
        hint += "" if "terminate" in signals else "; set terminate_after to end such sessions"
    return Finding(
        kind=kind,
        object=f"pid {h.pid}",
        value=age,
        message=f"pid {h.pid} (user {i['usename']}, database {i['datname']}, application {i['application_name']}): {what}; {hint}",
        detail={
            "pid": h.pid,
            "usename": i["usename"],
            "datname": i["datname"],
            "application_name": i["application_name"],
            "client_addr": i["client_addr"],
            "state": state,
            "wait_event_type": "Timeout" if state == "active" else "Client",
            "wait_event": "PgSleep" if state == "active" else "ClientRead",
            "age_seconds": age,
            "xact_age_seconds": xact_age,
            "query": i["query"],
            "backend_start": i["backend_start"].isoformat(),
        },
    )


def samples(active: list[Finding], idle: list[Finding], oldest: float, *, locks: bool = True) -> list[Sample]:
    """The job's gauges; with `locks`, those of blocking chains too (none in these tests)."""
    def longest(fs: list[Finding]) -> float:
        return max((f.value for f in fs), default=0.0)

    return [
        Sample("long_running_queries", float(len(active)), {"state": "active"}),
        Sample("long_running_queries", float(len(idle)), {"state": "idle_in_transaction"}),
        Sample("longest_query_seconds", longest(active), {"state": "active"}),
        Sample("longest_query_seconds", longest(idle), {"state": "idle_in_transaction"}),
        Sample("oldest_transaction_seconds", oldest),
    ] + ([Sample("lock_waiting_sessions", 0.0), Sample("longest_lock_wait_seconds", 0.0)] if locks else [])


def oldest(*findings: Finding) -> float:
    return max((f.detail["xact_age_seconds"] or 0.0 for f in findings), default=0.0)


def expected_action(
    out: JobOutput,
    action: str,
    h: Held,
    *,
    applied: bool,
    dry_run: bool = False,
    repeat: bool = False,
    limit: float = THRESHOLD,
    **extra,
) -> Action:
    actual = next(a for a in out.actions if a.action == action and a.object == f"pid {h.pid}")
    age = actual.detail["age_seconds"]
    assert age > limit
    state = actual.detail["state"]
    assert (
        f"pg_{action.removesuffix('_backend')}_backend" in actual.sql
        and f"a.pid = {h.pid} " in actual.sql
    )
    i = h.info
    return Action(
        action,
        f"pid {h.pid}",
        actual.sql,
        applied=applied,
        detail={
            "pid": h.pid,
            "dry_run": dry_run,
            "reason": "cancel_after" if action == "cancel_backend" else "terminate_after",
            "usename": i["usename"],
            "application_name": i["application_name"],
            "datname": i["datname"],
            "state": state,
            "age_seconds": age,
            "limit_seconds": limit,
            **({"repeat": repeat} if dry_run else {}),
            **extra,
        },
    )


# --------------------------------------------------------------------------- flagging


def test_flags_sleeper_and_idle_in_transaction_not_ignored_nor_own(database, app, sessions):
    sleeper = sessions.sleeper(app)
    idle = sessions.idle_in_transaction(app)
    ignored = sessions.sleeper(dsn_as(app, application_name="pg_dump"))
    target, _ = target_for(database)
    own = sessions.sleeper(database, connect=lambda: db.connect(target))
    for h in (sleeper, ignored, own):
        sessions.wait(h, "active", older_than=THRESHOLD)
    sessions.wait(idle, "idle in transaction", older_than=THRESHOLD)

    out, finished = run_job(database)

    active = [expected_finding(out, sleeper, "long_running_query", "active", finished)]
    idles = [expected_finding(out, idle, "idle_in_transaction", "idle in transaction", finished)]
    assert out == JobOutput(
        findings=active + idles, samples=samples(active, idles, oldest(*active, *idles))
    )
    assert active[0].detail["query"] == "SELECT pg_sleep(60)"


def test_aborted_transaction_counts_as_idle_in_transaction(database, app, sessions):
    h = sessions.idle_in_transaction(app)
    with pytest.raises(psycopg.errors.DivisionByZero):
        h.conn.execute("SELECT 1/0")
    sessions.wait(h, "idle in transaction (aborted)", older_than=THRESHOLD)

    out, finished = run_job(database)

    idles = [
        expected_finding(out, h, "idle_in_transaction", "idle in transaction (aborted)", finished)
    ]
    assert out == JobOutput(findings=idles, samples=samples([], idles, oldest(*idles)))


def test_young_sessions_are_measured_but_not_flagged(database, app, sessions):
    h = sessions.sleeper(app)

    out, _ = run_job(database, warn_after="1h", idle_in_transaction_after="1h", cancel_after="1h")

    longest = next(
        s.value
        for s in out.samples
        if s.metric == "longest_query_seconds" and s.labels["state"] == "active"
    )
    oldest_tx = next(s.value for s in out.samples if s.metric == "oldest_transaction_seconds")
    assert 0 < longest <= oldest_tx < 60
    assert out == JobOutput(
        samples=[
            Sample("long_running_queries", 0.0, {"state": "active"}),
            Sample("long_running_queries", 0.0, {"state": "idle_in_transaction"}),
            Sample("longest_query_seconds", longest, {"state": "active"}),
            Sample("longest_query_seconds", 0.0, {"state": "idle_in_transaction"}),
            Sample("oldest_transaction_seconds", oldest_tx),
            Sample("lock_waiting_sessions", 0.0),
            Sample("longest_lock_wait_seconds", 0.0),
        ]
    )
    assert h.thread is not None and h.thread.is_alive()


def test_gauges_return_to_zero_when_sessions_end(database, app, sessions):
    sleeper = sessions.sleeper(app)
    idle = sessions.idle_in_transaction(app)
    sessions.wait(sleeper, "active", older_than=THRESHOLD)
    sessions.wait(idle, "idle in transaction", older_than=THRESHOLD)
    before, _ = run_job(database)
    assert [s.value for s in before.samples if s.metric == "long_running_queries"] == [1.0, 1.0]

    pids = [sleeper.pid, idle.pid]
    sessions.close()
    for pid in pids:
        sessions.gone(pid)
    after, _ = run_job(database)

    assert after == JobOutput(samples=samples([], [], 0.0))


# --------------------------------------------------------------------------- signalling


def test_cancel_after_cancels_sleeper_but_not_ignored_or_superuser(database, app, sessions):
    sleeper = sessions.sleeper(app)
    ignored = sessions.sleeper(dsn_as(app, application_name="pg_dump"))
    superuser = sessions.sleeper(dsn_as(database, application_name="shop"))
    impostor = sessions.sleeper(dsn_as(app, application_name="pgupkeep"))  # not our role
    for h in (sleeper, ignored, superuser, impostor):
        sessions.wait(h, "active", older_than=THRESHOLD)

    out, finished = run_job(database, cancel_after="200ms")

    active = sorted(
        [
            expected_finding(out, h, "long_running_query", "active", finished, signals="cancel")
            for h in (sleeper, superuser, impostor)
        ],
        key=lambda f: -f.value,
    )
    assert out == JobOutput(
        actions=[expected_action(out, "cancel_backend", sleeper, applied=True)],
        findings=active,
        samples=samples(active, [], oldest(*active)),
    )
    assert isinstance(sleeper.finish(), psycopg.errors.QueryCanceled)  # its client saw the cancel
    for h in (ignored, superuser, impostor):
        assert sessions.state(h.pid) == "active" and h.thread.is_alive()


def test_terminate_after_ends_idle_in_transaction_session(database, app, sessions):
    idle = sessions.idle_in_transaction(app)
    sessions.wait(idle, "idle in transaction", older_than=THRESHOLD)

    out, finished = run_job(database, terminate_after="200ms")

    idles = [expected_finding(out, idle, "idle_in_transaction", "idle in transaction", finished, signals="terminate")]
    assert out == JobOutput(
        actions=[expected_action(out, "terminate_backend", idle, applied=True)],
        findings=idles,
        samples=samples([], idles, oldest(*idles)),
    )
    sessions.gone(idle.pid)
    with pytest.raises(psycopg.OperationalError):
        idle.conn.execute("SELECT 1")


def test_cancel_comes_first_and_spares_the_session_when_it_works(database, app, sessions):
    sleeper = sessions.sleeper(app)
    sessions.wait(sleeper, "active", older_than=THRESHOLD)

    out, finished = run_job(database, cancel_after="200ms", terminate_after="200ms")

    active = [expected_finding(out, sleeper, "long_running_query", "active", finished, signals="cancel terminate")]
    assert out == JobOutput(
        actions=[
            expected_action(out, "cancel_backend", sleeper, applied=True),
            expected_action(
                out,
                "terminate_backend",
                sleeper,
                applied=False,
                skipped_reason="the query ended when it was cancelled",
            ),
        ],
        findings=active,
        samples=samples(active, [], oldest(*active)),
    )
    assert isinstance(sleeper.finish(), psycopg.errors.QueryCanceled)
    assert sleeper.conn.execute("SELECT 1").fetchone() == (1,)  # the session lives on


@pytest.mark.parametrize("mode", ["dry_run", "plan"])
def test_dry_run_and_plan_signal_nobody(database, app, sessions, mode):
    sleeper = sessions.sleeper(app)
    idle = sessions.idle_in_transaction(app)
    sessions.wait(sleeper, "active", older_than=THRESHOLD)
    sessions.wait(idle, "idle in transaction", older_than=THRESHOLD)

    dry = mode == "dry_run"
    out, finished = run_job(
        database,
        apply=mode != "plan",
        cancel_after="200ms",
        terminate_after="200ms",
        dry_run=str(dry).lower(),
    )

    active = [expected_finding(out, sleeper, "long_running_query", "active", finished, signals="cancel terminate")]
    idles = [expected_finding(out, idle, "idle_in_transaction", "idle in transaction", finished, signals="cancel terminate")]
    would = [
        expected_action(out, "cancel_backend", sleeper, applied=False, dry_run=dry),
        *sorted(
            [
                expected_action(out, "terminate_backend", h, applied=False, dry_run=dry)
                for h in (sleeper, idle)
            ],
            key=lambda a: -a.detail["age_seconds"],
        ),
    ]
    assert out == JobOutput(
        actions=would,
        findings=sorted(active + idles, key=lambda f: -f.value),
        samples=samples(active, idles, oldest(*active, *idles)),
    )
    assert (
        sessions.state(sleeper.pid) == "active"
        and sessions.state(idle.pid) == "idle in transaction"
    )
    assert sleeper.thread.is_alive()


def test_dry_run_reports_each_would_be_signal_once_across_runs(database, app, sessions):
    sleeper = sessions.sleeper(app)
    idle = sessions.idle_in_transaction(app)
    sessions.wait(sleeper, "active", older_than=THRESHOLD)
    sessions.wait(idle, "idle in transaction", older_than=THRESHOLD)
    memo: dict = {}  # what the daemon's runner keeps for this target and job between runs
    policy = {"cancel_after": "200ms", "terminate_after": "200ms", "dry_run": "true"}

    def repeats() -> set[tuple[str, int, bool]]:
        out, _ = run_job(database, memo=memo, **policy)
        return {(a.action, a.detail["pid"], a.detail["repeat"]) for a in out.actions}

    first, second = repeats(), repeats()
    sleeper.conn.cancel()  # the same session starts another query: a real run would cancel it too
    sleeper.finish()
    sleeper.thread = threading.Thread(target=sleeper._sleep, args=(60,), daemon=True)
    sleeper.thread.start()
    sessions.wait(sleeper, "active", older_than=THRESHOLD)
    third = repeats()

    s, i = sleeper.pid, idle.pid
    assert first == {("cancel_backend", s, False), ("terminate_backend", s, False), ("terminate_backend", i, False)}
    assert second == {("cancel_backend", s, True), ("terminate_backend", s, True), ("terminate_backend", i, True)}
    assert third == {("cancel_backend", s, False), ("terminate_backend", s, True), ("terminate_backend", i, True)}
    assert sessions.state(i) == "idle in transaction" and sleeper.thread.is_alive()


def _measured(database: str, pid: int) -> tuple[lrq.Judgement, lrq.Activity]:
    target, _ = target_for(database, cancel_after="200ms", terminate_after="200ms")
    with db.connect(target) as c:
        p = lrq.judge(lrq.measure(c, target.long_running_queries), target.long_running_queries)
    return p, next(s.activity for s in p.signals if s.activity.pid == pid)


def _signal(database: str, signals: list[lrq.Signal]) -> JobOutput:
    target, policy = target_for(database, cancel_after="200ms", terminate_after="200ms")
    with db.connect(target) as c:
        ctx = context(target, policy, c)
        out = JobOutput()
        apply_plan(Plan(steps=lrq.signal_steps(ctx, signals)), out, Fence(threading.Event()))
        return out


def test_reused_pid_is_not_signalled(database, app, sessions):
    old = sessions.sleeper(app)
    sessions.wait(old, "active", older_than=THRESHOLD)
    p, stale = _measured(database, old.pid)
    old.close()
    sessions.gone(stale.pid)
    new = sessions.sleeper(app)
    sessions.wait(new, "active", older_than=THRESHOLD)
    # The new session may or may not have got the old pid; make it so: the candidate now names the
    # new session's pid and query, but still the old session's backend_start.
    query_start = sessions.admin.execute(
        "SELECT query_start FROM pg_stat_activity WHERE pid = %s", (new.pid,)
    ).fetchone()[0]
    reused = replace(stale, pid=new.pid, query_start=query_start)
    assert reused.backend_start != new.info["backend_start"]
    signals = [lrq.Signal("cancel_backend", reused, timedelta(milliseconds=200))]

    out = _signal(database, signals)

    assert [(a.action, a.applied, a.detail["skipped_reason"]) for a in out.actions] == [
        (
            "cancel_backend",
            False,
            "the session ended or changed since it was measured (not the same pid and backend_start, "
            "state, query or transaction, or no longer over the limit)",
        )
    ]
    assert out.errors == [] and out.findings == []
    assert sessions.state(new.pid) == "active" and new.thread.is_alive()


def test_session_that_moved_on_to_another_query_is_not_signalled(database, app, sessions):
    h = sessions.sleeper(app)
    sessions.wait(h, "active", older_than=THRESHOLD)
    p, measured = _measured(database, h.pid)
    h.conn.cancel()
    h.finish()
    h.thread = threading.Thread(
        target=h._sleep, args=(60,), daemon=True
    )  # same session, next query
    h.thread.start()
    sessions.wait(h, "active", older_than=THRESHOLD)

    out = _signal(database, [s for s in p.signals if s.activity.pid == h.pid])

    assert [(a.action, a.applied, "skipped_reason" in a.detail) for a in out.actions] == [
        ("cancel_backend", False, True),
        ("terminate_backend", False, True),
    ]
    assert out.errors == []
    assert sessions.state(h.pid) == "active" and h.thread.is_alive()


def test_role_without_signal_privilege_gets_a_clear_error(database, app, roles, sessions):
    sleeper = sessions.sleeper(app)
    sessions.wait(sleeper, "active", older_than=THRESHOLD)
    agent = dsn_as(database, user=roles["agent"])

    out, finished = run_job(agent, cancel_after="200ms")

    active = [expected_finding(out, sleeper, "long_running_query", "active", finished, signals="cancel")]
    assert out.findings == active
    assert out.actions == [
        expected_action(
            out, "cancel_backend", sleeper, applied=False, skipped_reason="permission denied"
        )
    ]
    assert len(out.errors) == 1
    error = out.errors[0]
    assert error.object == f"pid {sleeper.pid}"
    assert error.message.startswith(
        f"pid {sleeper.pid} (user {roles['app']}, database {sleeper.info['datname']}, application shop): not allowed to cancel the query of it ("
    )
    assert error.message.endswith(
        f'); GRANT pg_signal_backend TO "{roles["agent"]}" to let pgupkeep signal other roles\' sessions, '
        "or unset cancel_after"
    )
    assert isinstance(error, ItemError)
    assert sessions.state(sleeper.pid) == "active"


def test_role_that_cannot_see_other_sessions_gets_a_clear_error(database, roles, sessions):
    sleeper = sessions.sleeper(dsn_as(database, application_name="shop"))  # a superuser's session
    sessions.wait(sleeper, "active", older_than=THRESHOLD)
    app_role = roles["app"]

    out, _ = run_job(dsn_as(database, user=app_role))

    hidden = out.errors[0].message.split(" ")[1]
    assert int(hidden) >= 2  # the sleeper and the test's own admin session, at least
    assert out == JobOutput(
        samples=samples([], [], 0.0),
        errors=[
            ItemError(
                "pg_stat_activity",
                f"pg_stat_activity: {hidden} sessions of other roles are hidden from role {app_role}, so "
                f'they cannot be measured; GRANT pg_read_all_stats TO "{app_role}"',
            )
        ],
    )


# --------------------------------------------------------------------------- plan, with plain values


def activity(pid: int, state: str = "active", age: float = 10.0, **kw) -> lrq.Activity:
    start = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    values = dict(
        pid=pid,
        usename="app",
        datname="shop",
        application_name="web",
        client_addr="10.0.0.1",
        state=state,
        wait_event_type=None,
        wait_event=None,
        backend_start=start,
        xact_start=start,
        query_start=start,
        state_change=start,
        age_seconds=age,
        xact_age_seconds=age + 1,
        query="SELECT 1",
        superuser=False,
    )
    values.update(kw)
    return lrq.Activity(**values)


def test_plan_thresholds_exclusions_and_order():
    target, _ = target_for(
        "postgresql://x@localhost/db",
        warn_after="5s",
        idle_in_transaction_after="5s",
        cancel_after="20s",
        terminate_after="60s",
        ignore_users="[replicator]",
    )
    rows = [
        activity(1, age=4.0),  # young: measured, not flagged
        activity(2, age=30.0),  # cancel
        activity(3, age=90.0),  # cancel, then terminate
        activity(4, "idle in transaction", age=70.0),  # terminate (never cancelled)
        activity(5, age=90.0, superuser=True),  # flagged, never signalled
        activity(
            6, age=90.0, application_name="pgupkeep", usename="other"
        ),  # impostor: flagged only
        activity(7, age=500.0, usename="replicator", xact_age_seconds=900.0),  # ignored: nowhere
        activity(8, age=500.0, application_name="pg_dump"),  # ignored: nowhere
        activity(9, "idle", age=500.0),  # not judged, but its transaction counts
    ]

    p = lrq.judge(rows, target.long_running_queries)

    assert [(f.kind, f.object) for f in p.findings] == [
        ("long_running_query", "pid 3"),
        ("long_running_query", "pid 5"),
        ("long_running_query", "pid 6"),
        ("idle_in_transaction", "pid 4"),
        ("long_running_query", "pid 2"),
    ]
    assert [(s.action, s.activity.pid, s.limit.total_seconds()) for s in p.signals] == [
        ("cancel_backend", 3, 20.0),
        ("cancel_backend", 2, 20.0),
        ("terminate_backend", 3, 60.0),
        ("terminate_backend", 4, 60.0),
    ]
    assert p.samples == [
        Sample("long_running_queries", 4.0, {"state": "active"}),
        Sample("long_running_queries", 1.0, {"state": "idle_in_transaction"}),
        Sample("longest_query_seconds", 90.0, {"state": "active"}),
        Sample("longest_query_seconds", 70.0, {"state": "idle_in_transaction"}),
        Sample("oldest_transaction_seconds", 501.0),
    ]


def test_plan_of_nothing_reports_zeroes():
    target, _ = target_for("postgresql://x@localhost/db")
    assert lrq.judge([], target.long_running_queries) == lrq.Judgement([], samples([], [], 0.0, locks=False), [])
