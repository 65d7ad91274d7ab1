"""Sessions held open by the session-judgement tests (sleepers, idle transactions, lock waiters),
and running the long_running_queries job against them."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep import db
from pgupkeep.jobs import long_running_queries as lrq
from pgupkeep.jobs.base import JobContext
from pgupkeep.policy import parse_policy
from pgupkeep.results import JobOutput
from pgupkeep.runner import execute_job

NOW = datetime(
    2026, 11, 25, tzinfo=UTC
)  # the job must not use it for ages: they come from the server

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
        self._run(sql.SQL("SELECT pg_sleep({})").format(seconds))

    def _run(self, statement: sql.Composable | str) -> None:
        try:
            self.conn.execute(statement)
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

    def waiter(self, dsn: str, statement: str) -> Held:
        """A session running `statement`, which must wait on a lock; returns once it waits."""
        conn = psycopg.connect(dsn, autocommit=True)
        h = Held(conn, time.monotonic())
        h.thread = threading.Thread(target=h._run, args=(statement,), daemon=True)
        self.held.append(h)
        h.thread.start()
        self.waiting(h)
        return h

    def waiting(self, h: Held, older_than: float = 0.0) -> None:
        """Poll until the session has waited on a lock for longer than older_than."""
        for _ in range(400):
            row = self.admin.execute(
                "SELECT extract(epoch FROM now() - l.waitstart) FROM pg_locks AS l"
                " WHERE l.pid = %s AND NOT l.granted AND l.waitstart IS NOT NULL",
                (h.pid,),
            ).fetchone()
            if row and row[0] > older_than:
                return
            time.sleep(0.02)
        raise AssertionError(f"pid {h.pid} never waited on a lock for {older_than}s")

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


def context(target, policy, c: psycopg.Connection, apply: bool = True, memo: dict | None = None) -> JobContext:
    return JobContext(
        target=target,
        section=target.long_running_queries,
        conn=c,
        now=NOW,
        timezone=policy.daemon.zone,
        apply=apply,
        connect=lambda **kw: db.connect(target, **kw),
        memo={} if memo is None else memo,
    )


def run_job(dsn: str, *, apply: bool = True, memo: dict | None = None, **section: str) -> tuple[JobOutput, float]:
    """Run the job once (`memo`: what it kept from earlier runs, as the daemon's runner hands it);
    also return time.monotonic() when it finished (bounds every age)."""
    target, policy = target_for(dsn, **section)
    with db.connect(target) as c:
        out = execute_job(lrq.KIND, context(target, policy, c, apply, memo))
    return out, time.monotonic()


# --------------------------------------------------------------------------- fixtures


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
