"""The long_running_queries job against real sessions held open by the test: what is flagged, what
is signalled, and what is never touched."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep import db
from pgupkeep.jobs import long_running_queries as lrq
from pgupkeep.jobs.base import JobContext
from pgupkeep.policy import parse_policy
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Plan, Sample
from pgupkeep.runner import Fence, apply_plan, execute_job

NOW = datetime(
    2026, 11, 25, tzinfo=UTC
)  # the job must not use it for ages: they come from the server
THRESHOLD = 0.2  # seconds: warn_after / idle_in_transaction_after / cancel_after in these tests


# --------------------------------------------------------------------------- held sessions


def dsn_as(dsn: str, **params: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(dsn), **params})


@dataclass
class Held:
    """A session the test holds open: a sleeper (active) or an idle-in-transaction session."""

    conn: psycopg.Connection
    started: float  # time.monotonic() just before its query or transaction began
    thread: threading.Thread | None = None
    error: BaseException | None = None
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.conn.info.backend_pid

    def _sleep(self, seconds: int) -> None:
        try:
            self.conn.execute(sql.SQL("SELECT pg_sleep({})").format(seconds))
        except psycopg.Error as exc:
            self.error = exc

    def finish(self) -> BaseException | None:
        """Wait for a sleeper's query to end (it was cancelled or its session terminated)."""
        assert self.thread is not None
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.error

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.conn.cancel()
            self.thread.join(10)
        self.conn.close()


class Sessions:
    def __init__(self, admin: psycopg.Connection):
        self.admin = admin
        self.held: list[Held] = []

    def sleeper(self, dsn: str, seconds: int = 60, *, connect=None) -> Held:
        conn = connect() if connect else psycopg.connect(dsn, autocommit=True)
        h = Held(conn, time.monotonic())
        h.thread = threading.Thread(target=h._sleep, args=(seconds,), daemon=True)
        self.held.append(h)
        h.thread.start()
        self.wait(h, "active")
        return h

    def idle_in_transaction(self, dsn: str) -> Held:
        conn = psycopg.connect(dsn)  # not autocommit: the SELECT opens a transaction left open
        h = Held(conn, time.monotonic())
        self.held.append(h)
        conn.execute("SELECT 1")
        self.wait(h, "idle in transaction")
        return h

    def wait(self, h: Held, state: str, older_than: float = 0.0) -> None:
        """Poll pg_stat_activity until the session is in `state` (for longer than older_than)."""
        for _ in range(400):
            row = self.admin.execute(
                "SELECT state, extract(epoch FROM now() - CASE WHEN state = 'active' THEN query_start"
                " ELSE state_change END), backend_start, host(client_addr), usename::text, datname::text,"
                " application_name, query FROM pg_stat_activity WHERE pid = %s",
                (h.pid,),
            ).fetchone()
            if row and row[0] == state and row[1] > older_than:
                h.info = dict(
                    zip(
                        (
                            "backend_start",
                            "client_addr",
                            "usename",
                            "datname",
                            "application_name",
                            "query",
                        ),
                        row[2:],
                        strict=True,
                    )
                )
                return
            time.sleep(0.02)
        raise AssertionError(f"pid {h.pid} never reached {state!r} older than {older_than}s: {row}")

    def gone(self, pid: int) -> None:
        for _ in range(400):
            if not self.admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone():
                return
            time.sleep(0.02)
        raise AssertionError(f"pid {pid} is still there")

    def state(self, pid: int) -> str | None:
        row = self.admin.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        for h in self.held:
            h.close()
        self.held.clear()


@pytest.fixture(scope="module")
def roles(pg_server) -> Iterator[dict[str, str]]:
    """An unprivileged application role, and an agent role that can read but not signal others."""
    names = {"app": f"lrq_app_{secrets.token_hex(3)}", "agent": f"lrq_agent_{secrets.token_hex(3)}"}
    with pg_server.admin() as admin:
        for name in names.values():
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        admin.execute(
            sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(names["agent"]))
        )
    yield names
    with pg_server.admin() as admin:
        for name in names.values():
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def sessions(conn: psycopg.Connection) -> Iterator[Sessions]:
    s = Sessions(conn)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def app(database: str, roles: dict[str, str]) -> str:
    """DSN of an ordinary application session."""
    return dsn_as(database, user=roles["app"], application_name="shop")


# --------------------------------------------------------------------------- running the job


def target_for(dsn: str, **section: str):
    settings = {
        "warn_after": "200ms",
        "idle_in_transaction_after": "200ms",
        "ignore_applications": "[pg_dump]",
        **section,
    }
    lines = "\n".join(f"      {k}: {v}" for k, v in settings.items())
    policy = parse_policy(
        f'version: 1\ntargets:\n  - name: t\n    dsn: "${{DSN}}"\n    long_running_queries:\n{lines}\n',
        environ={"DSN": dsn},
    )
    return policy.targets[0], policy


def context(target, policy, c: psycopg.Connection, apply: bool = True) -> JobContext:
    return JobContext(
        target=target,
        section=target.long_running_queries,
        conn=c,
        now=NOW,
        timezone=policy.daemon.zone,
        apply=apply,
        connect=lambda **kw: db.connect(target, **kw),
    )


def run_job(dsn: str, *, apply: bool = True, **section: str) -> tuple[JobOutput, float]:
    """Run the job once; also return time.monotonic() when it finished (bounds every age)."""
    target, policy = target_for(dsn, **section)
    with db.connect(target) as c:
        out = execute_job(lrq.KIND, context(target, policy, c, apply))
    return out, time.monotonic()


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


def samples(active: list[Finding], idle: list[Finding], oldest: float) -> list[Sample]:
    def longest(fs: list[Finding]) -> float:
        return max((f.value for f in fs), default=0.0)

    return [
        Sample("long_running_queries", float(len(active)), {"state": "active"}),
        Sample("long_running_queries", float(len(idle)), {"state": "idle_in_transaction"}),
        Sample("longest_query_seconds", longest(active), {"state": "active"}),
        Sample("longest_query_seconds", longest(idle), {"state": "idle_in_transaction"}),
        Sample("oldest_transaction_seconds", oldest),
    ]


def oldest(*findings: Finding) -> float:
    return max((f.detail["xact_age_seconds"] or 0.0 for f in findings), default=0.0)


def expected_action(
    out: JobOutput,
    action: str,
    h: Held,
    *,
    applied: bool,
    dry_run: bool = False,
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
            "usename": i["usename"],
            "application_name": i["application_name"],
            "datname": i["datname"],
            "state": state,
            "age_seconds": age,
            "limit_seconds": limit,
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


def _measured(database: str, pid: int) -> tuple[lrq.Judgement, lrq.Activity]:
    target, _ = target_for(database, cancel_after="200ms", terminate_after="200ms")
    with db.connect(target) as c:
        p = lrq.judge(lrq.measure(c), target.long_running_queries)
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
        "or unset cancel_after/terminate_after"
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
    assert lrq.judge([], target.long_running_queries) == lrq.Judgement([], samples([], [], 0.0), [])
