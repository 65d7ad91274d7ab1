"""The runner's guards around every job: leases (and max_leases), and standbys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgupkeep import db
from pgupkeep.pgserver import LocalServer
from pgupkeep.policy import parse_policy
from pgupkeep.runner import Runner


def two_targets(dsn: str) -> str:
    return f"""
version: 1
targets:
  - {{name: one, dsn: "{dsn}", health: {{}}}}
  - {{name: two, dsn: "{dsn}", health: {{}}}}
"""


def test_max_leases_spreads_targets_over_replicas(database: str) -> None:
    policy = parse_policy(two_targets(database))
    first = Runner(policy, leases=db.Leases(max_leases=1))
    second = Runner(policy, leases=db.Leases(max_leases=1))
    try:
        a = [first.run("one", "health"), first.run("two", "health")]
        b = [second.run("one", "health"), second.run("two", "health")]
        assert [(r.outcome, r.reason, r.leader) for r in a] == [("success", None, True), ("skipped", "not_leader", False)]
        assert [(r.outcome, r.reason, r.leader) for r in b] == [("skipped", "not_leader", False), ("success", None, True)]
        # A released lease is taken by the next run of the other replica.
        assert first.leases is not None and second.leases is not None
        first.leases.release("one")
        second.leases.release("two")
        assert second.run("one", "health").outcome == "success"
    finally:
        for runner in (first, second):
            assert runner.leases is not None
            runner.leases.release_all()


def test_a_job_that_raises_becomes_a_failure_and_the_runner_goes_on(database: str) -> None:
    policy = parse_policy(
        f"""
version: 1
targets:
  - name: t
    dsn: "{database}"
    partitions: {{tables: [{{table: public.no_such_table, interval: daily}}]}}
    health: {{}}
"""
    )
    runner = Runner(policy)
    failed = runner.run("t", "partitions")
    assert failed.outcome == "failure" and "public.no_such_table" in (failed.error or "")
    assert runner.run("t", "health").outcome == "success"


@pytest.fixture(scope="module")
def standby(pg_server, database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A streaming standby of the test server, as a DSN to the module's database on it."""
    if pg_server.local is None:
        pytest.skip("needs a server this suite started (PGUPKEEP_TEST_DSN points elsewhere)")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pgupkeep-standby-"))
    server = LocalServer(bindir=pg_server.local.bindir, datadir=root / "pgdata")
    server.init(primary_dsn=pg_server.local.dsn("postgres") + "?application_name=standby")
    server.start()
    server._tmp = root  # removed with the server
    try:
        from psycopg.conninfo import conninfo_to_dict

        dsn = server.dsn(str(conninfo_to_dict(database)["dbname"]))
        deadline = time.monotonic() + 30
        while True:  # the module's database must have been replayed
            try:
                with psycopg.connect(dsn) as c:
                    assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0]
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield dsn
    finally:
        server.remove()


def test_writing_jobs_are_skipped_on_a_standby_and_read_only_jobs_run(standby: str) -> None:
    policy = parse_policy(
        f"""
version: 1
targets:
  - name: replica
    dsn: "{standby}"
    partitions: {{tables: [{{table: public.orders, interval: monthly}}]}}
    materialized_views: {{views: [{{view: public.mv}}]}}
    long_running_queries: {{}}
    health: {{}}
"""
    )
    runner = Runner(policy)
    outcomes = {
        job: (r.outcome, r.reason)
        for job in ("partitions", "materialized_views", "long_running_queries", "health")
        for r in [runner.run("replica", job)]
    }
    assert outcomes == {
        "partitions": ("skipped", "standby"),
        "materialized_views": ("skipped", "standby"),
        "long_running_queries": ("success", None),
        "health": ("success", None),
    }
    # `plan` changes nothing, so it still plans on a standby (here: the table is not there).
    planned = runner.run("replica", "partitions", apply=False)
    assert (planned.outcome, planned.reason) == ("failure", None)
    assert "public.orders" in (planned.error or "")
