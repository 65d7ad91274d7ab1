"""A lock_timeout blames the sessions that blocked the DDL, and only them: a holder (or an earlier
waiter) whose lock mode conflicts with the mode the DDL asked for. Checked against the server's own
pg_blocking_pids() of the waiting DDL, and the conflict matrix against the server's locking."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from pgupkeep.db import DdlRunner, LockTimeoutError
from pgupkeep.db.ddl import CONFLICTS, LOCK_MODES, requested_locks
from pgupkeep.units import QualifiedName

PARENT = QualifiedName("public", "events")
MODE_WORDS = {
    "AccessShareLock": "ACCESS SHARE", "RowShareLock": "ROW SHARE", "RowExclusiveLock": "ROW EXCLUSIVE",
    "ShareUpdateExclusiveLock": "SHARE UPDATE EXCLUSIVE", "ShareLock": "SHARE",
    "ShareRowExclusiveLock": "SHARE ROW EXCLUSIVE", "ExclusiveLock": "EXCLUSIVE",
    "AccessExclusiveLock": "ACCESS EXCLUSIVE",
}  # fmt: skip


def test_the_conflict_matrix_is_postgresqls(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS matrix (id int)")
    with psycopg.connect(database) as holder, psycopg.connect(database) as asker:
        for held, asked in itertools.product(LOCK_MODES, LOCK_MODES):
            holder.execute(f"LOCK TABLE matrix IN {MODE_WORDS[held]} MODE")
            try:
                asker.execute(f"LOCK TABLE matrix IN {MODE_WORDS[asked]} MODE NOWAIT")
                conflict = False
            except psycopg.errors.LockNotAvailable:
                conflict = True
            asker.rollback()
            holder.rollback()
            assert conflict == (held in CONFLICTS[asked]), (held, asked)
            assert conflict == (asked in CONFLICTS[held]), (held, asked)  # symmetric


class Holder:
    """A session that takes a lock on the parent in a transaction and keeps it until closed."""

    def __init__(self, dsn: str, statement: str, wait: bool = False):
        self.conn = psycopg.connect(dsn)
        self.pid = self.conn.info.backend_pid
        self.thread: threading.Thread | None = None
        if wait:  # a lock that will queue: take it from a thread
            self.thread = threading.Thread(target=self._take, args=(statement,), daemon=True)
            self.thread.start()
        else:
            self.conn.execute(statement)

    def _take(self, statement: str) -> None:
        with contextlib.suppress(psycopg.Error):  # cancelled when the test is done
            self.conn.execute(statement)

    def close(self) -> None:
        if self.thread is not None:
            self.conn.cancel()
            self.thread.join(10)
        self.conn.close()


@pytest.fixture
def parent(fresh_database: str) -> Iterator[str]:
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("CREATE TABLE events (at date NOT NULL, v int) PARTITION BY RANGE (at)")
    yield fresh_database


def _waiting(admin: psycopg.Connection, pid: int) -> bool:
    row = admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0] == "Lock")


def _attach(dsn: str, holders: list[Holder]) -> tuple[set[int], list[int]]:
    """Create and attach a partition under lock_timeout while `holders` hold their locks; returns
    (what the server's pg_blocking_pids said while the DDL waited, the pids the DDL blamed)."""
    statements = [
        sql.SQL("CREATE TABLE public.events_2026 (LIKE public.events INCLUDING ALL)"),
        sql.SQL("ALTER TABLE public.events ATTACH PARTITION public.events_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"),
    ]
    runner = DdlRunner(lock_timeout=timedelta(seconds=2), retries=0, sleep=lambda _: None)
    seen: set[int] = set()
    with psycopg.connect(dsn, autocommit=True) as ddl, psycopg.connect(dsn, autocommit=True) as admin:
        ddl.execute("SET lock_timeout = '2s'")
        ddl_pid = ddl.info.backend_pid
        failure: list[LockTimeoutError] = []

        def run() -> None:
            try:
                runner.execute(ddl, statements, relations=[PARENT])
            except LockTimeoutError as exc:
                failure.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            if _waiting(admin, ddl_pid):
                seen |= set(admin.execute("SELECT pg_blocking_pids(%s)", (ddl_pid,)).fetchone()[0])
            time.sleep(0.05)
        thread.join(10)
    assert failure, "the DDL was expected to time out"
    return seen, failure[0].blocking_pids


def test_a_reader_that_does_not_conflict_is_not_blamed_one_that_does_is(parent: str) -> None:
    reader = Holder(parent, "SELECT count(*) FROM events")  # ACCESS SHARE: no conflict with ATTACH's SUE
    maintainer = Holder(parent, "LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE")  # conflicts
    try:
        seen, blamed = _attach(parent, [reader, maintainer])
    finally:
        reader.close()
        maintainer.close()
    assert blamed == [maintainer.pid]
    assert seen == {maintainer.pid}  # what the server itself says


def test_a_session_queued_ahead_of_the_ddl_is_blamed_and_the_reader_it_waits_for_is_not(parent: str) -> None:
    reader = Holder(parent, "SELECT count(*) FROM events")
    with psycopg.connect(parent, autocommit=True) as admin:
        queued = Holder(parent, "LOCK TABLE events IN ACCESS EXCLUSIVE MODE", wait=True)  # waits for the reader
        for _ in range(200):
            if _waiting(admin, queued.pid):
                break
            time.sleep(0.02)
        try:
            seen, blamed = _attach(parent, [reader, queued])
        finally:
            queued.close()
            reader.close()
    assert blamed == [queued.pid]
    assert seen == {queued.pid}


def test_a_reader_alone_never_times_out_an_attach(parent: str) -> None:
    reader = Holder(parent, "SELECT count(*) FROM events")
    try:
        runner = DdlRunner(lock_timeout=timedelta(seconds=1), retries=0, sleep=lambda _: None)
        with psycopg.connect(parent, autocommit=True) as ddl:
            ddl.execute("SET lock_timeout = '1s'")
            runner.execute(
                ddl,
                [
                    sql.SQL("CREATE TABLE public.events_2025 (LIKE public.events INCLUDING ALL)"),
                    sql.SQL("ALTER TABLE public.events ATTACH PARTITION public.events_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"),
                ],
                relations=[PARENT],
            )
    finally:
        reader.close()
    assert runner.waits == []


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ('REFRESH MATERIALIZED VIEW CONCURRENTLY "r"."v"', {'"r"."v"': "ExclusiveLock"}),
        ('REFRESH MATERIALIZED VIEW "r"."v"', {'"r"."v"': "AccessExclusiveLock"}),
        ('VACUUM (ANALYZE) "r"."v"', {'"r"."v"': "ShareUpdateExclusiveLock"}),
        ('ALTER TABLE "p"."t" DETACH PARTITION "p"."t_1" CONCURRENTLY', {'"p"."t"': "ShareUpdateExclusiveLock", '"p"."t_1"': "ShareUpdateExclusiveLock"}),
        ('ALTER TABLE "p"."t" DETACH PARTITION "p"."t_1"', {'"p"."t"': "AccessExclusiveLock", '"p"."t_1"': "AccessExclusiveLock", '"p"."d"': "AccessExclusiveLock"}),
        ('ALTER TABLE "p"."t" ATTACH PARTITION "p"."t_2" FOR VALUES FROM (1) TO (2)', {'"p"."t"': "ShareUpdateExclusiveLock", '"p"."t_1"': "AccessExclusiveLock", '"p"."d"': "AccessExclusiveLock"}),
        ('CREATE TABLE "p"."t_2" (LIKE "p"."t" INCLUDING ALL)', {'"p"."t"': "AccessShareLock"}),
        ("create table p.t_2 (like p.t including all)", {'"p"."t"': "AccessShareLock"}),  # unquoted names too
        ('DROP TABLE "p"."t_1"', {'"p"."t"': "AccessExclusiveLock", '"p"."t_1"': "AccessExclusiveLock", '"p"."d"': "AccessExclusiveLock"}),
    ],
)
def test_requested_lock_modes(statement: str, expected: dict[str, str]) -> None:
    relations = ['"p"."t"', '"p"."t_1"', '"p"."d"'] if "p." in statement.replace('"', "") else ['"r"."v"']
    assert requested_locks(statement, relations) == expected
