"""The query_insights job against real PostgreSQL (pg_stat_statements preloaded by the harness):
statement deltas, slow and N+1-shaped statements, resets, unindexed foreign keys, table sizes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from pgupkeep import db
from pgupkeep.jobs import query_insights
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.query_insights import foreign_keys
from pgupkeep.jobs.query_insights.statements import Delta, Entry, Snapshot, interval
from pgupkeep.jobs.query_insights.verdicts import choose_top
from pgupkeep.logs import log_result
from pgupkeep.metrics import Metrics
from pgupkeep.pgserver import start_server
from pgupkeep.policy import parse_policy
from pgupkeep.results import JobOutput, JobResult
from pgupkeep.runner import execute_job

NOW = datetime(2026, 11, 25, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


class Job:
    """One target's job across runs: the same memo, a clock the test moves."""

    def __init__(self, dsn: str, extra: str = "", target_extra: str = "") -> None:
        lines = "".join(f"      {line}\n" for line in extra.strip().splitlines())
        if "min_table_size" not in extra:
            lines += "      min_table_size: 0\n"
        head = "".join(f"    {line}\n" for line in target_extra.strip().splitlines())
        text = 'version: 1\ntargets:\n  - name: t\n    dsn: "${DSN}"\n' + head + "    query_insights:\n" + lines
        policy = parse_policy(text, environ={"DSN": dsn})
        self.target = policy.targets[0]
        self.zone = policy.daemon.zone
        self.memo: dict[str, Any] = {}
        self.now = NOW

    def run(self, after: timedelta = timedelta(0)) -> JobOutput:
        self.now += after
        with db.connect(self.target) as c:
            ctx = JobContext(
                target=self.target, section=self.target.query_insights, conn=c, now=self.now, timezone=self.zone,
                memo=self.memo,
            )  # fmt: skip
            return execute_job(query_insights.KIND, ctx)


def execute(dsn: str, *statements_: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements_:
            c.execute(s)


def queryid(dsn: str, like: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT DISTINCT queryid FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
            "WHERE datname = current_database()) AND query LIKE %s",
            (like,),
        ).fetchall()
    assert len(rows) == 1, (like, rows)
    return str(rows[0][0])


def findings(out: JobOutput, kind: str) -> dict[str, dict[str, Any]]:
    return {f.object: f.to_dict() for f in out.findings if f.kind == kind}


def samples(out: JobOutput, metric: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for s in out.samples if s.metric == metric}


@pytest.fixture
def pgss(fresh_database: str) -> str:
    execute(fresh_database, "CREATE EXTENSION pg_stat_statements")
    return fresh_database


# --------------------------------------------------------------------------- statements


def test_first_run_only_takes_the_snapshot(pgss: str) -> None:
    execute(pgss, *["SELECT pg_sleep(0.15)"] * 5)
    out = Job(pgss).run()
    assert [f for f in out.findings if f.kind in ("slow_statement", "n_plus_one_statement")] == []
    assert samples(out, "statement_calls_total") == {(): 0.0}
    assert samples(out, "statement_time_seconds_total") == {(): 0.0}
    assert samples(out, "top_statement_seconds") == {}
    assert samples(out, "statement_stats_available") == {(): 1.0}


def test_n_plus_one_loop_is_flagged_and_its_batched_equivalent_is_not(pgss: str) -> None:
    execute(
        pgss,
        "CREATE TABLE items (id int PRIMARY KEY, v text)",
        "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
        "ANALYZE items",
    )
    with psycopg.connect(pgss, autocommit=True) as c:
        for i in range(1, 501):  # before the first run: in the cumulative total, not the interval
            c.execute("SELECT v FROM items WHERE id = %s", (i,))
    job = Job(pgss)
    job.run()
    with psycopg.connect(pgss, autocommit=True) as c:
        for i in range(1, 2001):
            c.execute("SELECT v FROM items WHERE id = %s", (i,)).fetchone()
        for start in range(1, 2001, 100):
            c.execute("SELECT id, v FROM items WHERE id = ANY(%s)", (list(range(start, start + 100)),)).fetchall()
    out = job.run(MINUTE)

    lookup = queryid(pgss, "SELECT v FROM items WHERE id = $1")
    batched = queryid(pgss, "SELECT id, v FROM items WHERE id = ANY($1)")
    found = findings(out, "n_plus_one_statement")
    assert list(found) == [lookup]
    f = found[lookup]
    assert (f["value"], f["calls"], f["rows_per_call"], f["interval_seconds"]) == (2000, 2000, 1.0, 60.0)
    assert f["calls_per_second"] == pytest.approx(2000 / 60, abs=0.001)
    assert f["mean_ms"] < 5 and f["query"] == "SELECT v FROM items WHERE id = $1"
    assert "= ANY($1)" in f["suggestion"] and "2000 calls in the last 1m" in f["message"]
    assert batched not in found
    assert findings(out, "slow_statement") == {}
    assert samples(out, "n_plus_one_statements") == {(): 1.0}
    # The same loop at a lower rate (the same calls spread over 10 minutes) is not flagged.
    with psycopg.connect(pgss, autocommit=True) as c:
        for i in range(1, 2001):
            c.execute("SELECT v FROM items WHERE id = %s", (i,)).fetchone()
    assert findings(job.run(10 * MINUTE), "n_plus_one_statement") == {}


def test_slow_statement_is_flagged_and_a_fast_one_is_not(pgss: str) -> None:
    job = Job(pgss)
    job.run()
    with psycopg.connect(pgss, autocommit=True) as c:
        for i in range(5):
            c.execute("SELECT pg_sleep(0.15), %s::int AS slow", (i,))
        for i in range(5):
            c.execute("SELECT %s::int + 1 AS fast", (i,))
        for i in range(4):  # slow, but fewer calls than min_calls
            c.execute("SELECT pg_sleep(0.15), %s::bigint AS rare", (i,))
    out = job.run(MINUTE)
    slow = queryid(pgss, "SELECT pg_sleep($2), $1::int AS slow")
    found = findings(out, "slow_statement")
    assert list(found) == [slow]
    f = found[slow]
    assert f["calls"] == 5 and 150 <= f["mean_ms"] < 400 and f["total_ms"] == pytest.approx(5 * f["mean_ms"], rel=1e-3)
    assert f["rows_per_call"] == 1.0 and f["query"] == "SELECT pg_sleep($2), $1::int AS slow"
    assert f["message"].startswith(f"statement {slow}: mean ") and "over slow_mean_after 100 ms" in f["message"]
    assert samples(out, "slow_statements") == {(): 1.0}
    # Its interval time is a top series; the counters moved by at least the interval's work.
    assert samples(out, "top_statement_seconds")[(slow,)] == pytest.approx(f["total_ms"] / 1000)
    assert samples(out, "statement_time_seconds_total")[()] >= 8 * 0.15
    assert samples(out, "statement_calls_total")[()] >= 14
    # Nothing new in the next interval: nothing flagged again.
    assert findings(job.run(MINUTE), "slow_statement") == {}


def test_reset_between_runs_gives_no_negative_or_spiking_figure(pgss: str) -> None:
    metrics = Metrics(CollectorRegistry())
    job = Job(pgss, "min_calls: 1")

    def run() -> JobOutput:
        out = job.run(MINUTE)
        metrics.record(JobResult("t", "query_insights", "success", 0.1, 0.0, findings=tuple(out.findings), samples=tuple(out.samples)))
        assert all(s.value >= 0 for s in out.samples), out.samples
        return out

    def counter(name: str) -> float:
        return metrics.registry.get_sample_value(f"pgupkeep_{name}", {"target": "t"}) or 0.0

    execute(pgss, *["SELECT pg_sleep(0.15) AS big"] * 6, *["SELECT 1 AS other"] * 300)
    run()
    run()  # a quiet interval: only pgupkeep's own reads
    calls_before, time_before = counter("statement_calls_total"), counter("statement_time_seconds_total")

    # Everything reset, then less than before: the interval is skipped, not negative.
    execute(pgss, "SELECT pg_stat_statements_reset()", *["SELECT pg_sleep(0.15) AS big"] * 2, "SELECT 1 AS other")
    out = run()
    assert samples(out, "statement_calls_total") == {(): 0.0}
    assert samples(out, "statement_time_seconds_total") == {(): 0.0}
    assert findings(out, "slow_statement") == {} and samples(out, "top_statement_seconds") == {}
    assert (counter("statement_calls_total"), counter("statement_time_seconds_total")) == (calls_before, time_before)

    # The next interval is measured from the post-reset snapshot: 3 calls, not 2 + 3 or 6 + 3.
    execute(pgss, *["SELECT pg_sleep(0.15) AS big"] * 3)
    out = run()
    big = queryid(pgss, "SELECT pg_sleep($1) AS big")
    assert findings(out, "slow_statement")[big]["calls"] == 3
    assert counter("statement_calls_total") - calls_before < 30  # pgupkeep's own reads and the 3

    # One entry reset (as an eviction would): that entry's interval is skipped, the others count.
    execute(pgss, *["SELECT pg_sleep(0.15) AS big"] * 2, *["SELECT 1 AS other"] * 40)
    run()
    with psycopg.connect(pgss, autocommit=True) as c:
        c.execute("SELECT pg_stat_statements_reset(0, 0, %s)", (int(big),))
    execute(pgss, "SELECT pg_sleep(0.15) AS big", *["SELECT 1 AS other"] * 40)
    other = queryid(pgss, "SELECT $1 AS other")
    out = run()
    assert findings(out, "slow_statement") == {}  # 1 call after the reset: not "1 - 2"
    assert (big,) not in samples(out, "top_statement_seconds")
    assert samples(out, "statement_calls_total")[()] >= 40
    execute(pgss, "SELECT pg_sleep(0.15) AS big")
    out = run()
    assert findings(out, "slow_statement")[big]["calls"] == 1  # measured again from the next run on
    assert other


def test_interval_skips_what_went_backwards_and_counts_new_entries() -> None:
    t0 = NOW
    prev = Snapshot(t0, 1, None, 0, {(10, 1): Entry(100, 1000.0, 100, 5), (10, 2): Entry(50, 50.0, 50, 0), (10, 3): Entry(5, 5.0, 5, 0)})
    cur = Snapshot(
        t0 + MINUTE, 1, None, 3,
        {
            (10, 1): Entry(160, 1600.0, 160, 5),  # +60 calls
            (10, 2): Entry(20, 20.0, 20, 0),  # went backwards: reset or evicted and re-added
            (11, 1): Entry(4, 40.0, 4, 1),  # another role, same statement, new in the interval
            (10, 4): Entry(7, 7.0, 0, 0),  # new
        },
    )  # fmt: skip
    span = interval(prev, cur)
    assert (span.seconds, span.skipped, span.reason) == (60.0, 1, None)
    assert sorted(span.deltas, key=lambda d: d.queryid) == [
        Delta(1, 64, 640.0, 64, 1), Delta(4, 7, 7.0, 0, 0),
    ]  # fmt: skip
    # stats_since moved (PostgreSQL 17+): re-created even though the counters grew.
    moved = Snapshot(t0 + MINUTE, 1, None, 0, {(10, 1): Entry(200, 2000.0, 200, 5, stats_since=t0)})
    assert interval(prev, moved).deltas == [] and interval(prev, moved).skipped == 1
    # A full reset, the first run, another database, a clock that did not move: nothing measured.
    assert interval(prev, Snapshot(t0 + MINUTE, 1, t0, 0, cur.entries)).reason == "stats_reset"
    assert interval(None, cur).reason == "first_run"
    assert interval(prev, Snapshot(t0 + MINUTE, 2, None, 0, cur.entries)).reason == "first_run"
    assert interval(prev, Snapshot(t0, 1, None, 0, cur.entries)).reason == "clock"


def test_top_statements_are_capped_and_do_not_churn() -> None:
    def deltas(times: dict[int, float]) -> list[Delta]:
        return [Delta(q, 10, t, 10, 0) for q, t in times.items()]

    first = choose_top(deltas({q: 100.0 - q for q in range(1, 11)}), (), 3)
    assert [d.queryid for d in first] == [1, 2, 3]
    # 4 and 5 edge past 3 by a little: no swap. Incumbents stay while within 2 x 3 ranks.
    shuffled = {1: 90.0, 2: 80.0, 4: 71.0, 5: 70.5, 3: 70.0, **{q: 10.0 for q in range(6, 11)}}
    assert [d.queryid for d in choose_top(deltas(shuffled), [1, 2, 3], 3)] == [1, 2, 3]
    # A newcomer with more than twice the weakest incumbent's time takes its series.
    surge = {**shuffled, 9: 500.0}
    assert [d.queryid for d in choose_top(deltas(surge), [1, 2, 3], 3)] == [9, 1, 2]
    # An incumbent that fell past 2 x n ranks leaves; the best newcomer gets the free series.
    fallen = {1: 90.0, 2: 80.0, **{q: 60.0 for q in range(4, 11)}, 3: 1.0}
    assert [d.queryid for d in choose_top(deltas(fallen), [1, 2, 3], 3)] == [1, 2, 4]
    assert choose_top(deltas(shuffled), [1, 2, 3], 0) == []


def test_report_top_caps_findings_and_series(pgss: str) -> None:
    for i in range(30):
        execute(pgss, f"CREATE TABLE t{i:02d} (id int PRIMARY KEY, v text)", f"INSERT INTO t{i:02d} SELECT g, 'x' FROM generate_series(1, {100 * (i + 1)}) g")
    execute(pgss, "ANALYZE")  # the catalog's page counts rank the tables (autovacuum keeps them current)
    job = Job(pgss, "report_top: 4\nmin_calls: 1")
    job.run()
    with psycopg.connect(pgss, autocommit=True) as c:
        for i in range(8):
            c.execute(f"SELECT pg_sleep(0.11) FROM t{i:02d} LIMIT 1")
    out = job.run(MINUTE)
    assert len(findings(out, "slow_statement")) == 4 and samples(out, "slow_statements") == {(): 8.0}
    assert len(samples(out, "top_statement_seconds")) == 4
    sizes_ = samples(out, "table_size_bytes")
    assert {t for t, _ in sizes_} == {"public.t29", "public.t28", "public.t27", "public.t26"}
    assert len(sizes_) == 12 and {p for _, p in sizes_} == {"heap", "indexes", "toast"}


# --------------------------------------------------------------------------- without the extension


def test_without_the_extension_one_clear_finding_and_the_other_checks_still_run(fresh_database: str) -> None:
    execute(
        fresh_database,
        "CREATE TABLE parent (id int PRIMARY KEY)",
        "CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)",
    )
    job = Job(fresh_database)
    for _ in range(2):
        out = job.run(MINUTE)
        missing = [f.to_dict() for f in out.findings if f.kind == "extension_missing"]
        assert len(missing) == 1
        (m,) = missing
        dbname = psycopg.conninfo.conninfo_to_dict(fresh_database)["dbname"]
        assert (m["object"], m["reason"], m["preloaded"], m["database"]) == ("pg_stat_statements", "not_installed", True, dbname)
        assert f"CREATE EXTENSION pg_stat_statements in database {dbname}" in m["message"]
        assert "GRANT pg_read_all_stats TO postgres" in m["message"]
        assert samples(out, "statement_stats_available") == {(): 0.0}
        assert samples(out, "statement_calls_total") == {}
        assert list(findings(out, "unindexed_foreign_key")) == ["public.child(parent_id)"]
        assert {t for t, _ in samples(out, "table_size_bytes")} == {"public.parent", "public.child"}
    # Installed later: the next run is a first run, the one after measures.
    execute(fresh_database, "CREATE EXTENSION pg_stat_statements")
    assert findings(job.run(MINUTE), "extension_missing") == {}
    assert samples(job.run(MINUTE), "statement_calls_total")[()] > 0


@pytest.fixture(scope="module")
def unloaded_server() -> Iterator[str]:
    """A server of the same binaries without pg_stat_statements in shared_preload_libraries."""
    server = start_server(settings={"shared_preload_libraries": "''"})
    try:
        yield server.dsn("postgres")
    finally:
        server.remove()


def test_installed_but_not_preloaded_says_so(unloaded_server: str) -> None:
    execute(unloaded_server, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements", "CREATE TABLE IF NOT EXISTS x (id int)")
    out = Job(unloaded_server).run()
    (m,) = [f.to_dict() for f in out.findings if f.kind == "extension_missing"]
    assert (m["reason"], m["preloaded"]) == ("not_preloaded", False)
    assert "shared_preload_libraries" in m["message"] and "restart PostgreSQL" in m["message"]
    assert "GRANT pg_read_all_stats" in m["message"] and "CREATE EXTENSION" not in m["message"]
    assert ("public.x", "heap") in samples(out, "table_size_bytes")


def test_a_role_without_pg_read_all_stats_is_told_what_it_misses(pg_server: Any, pgss: str) -> None:
    role = "insights_reader"
    with pg_server.admin() as admin:
        admin.execute(f"DROP ROLE IF EXISTS {role}")
        admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        execute(pgss, "SELECT 42 AS by_the_superuser")
        as_role = psycopg.conninfo.make_conninfo(pgss, user=role)
        out = Job(as_role).run()
        (m,) = [f.to_dict() for f in out.findings if f.kind == "extension_missing"]
        assert m["reason"] == "not_readable" and m["hidden"] > 0
        assert f"GRANT pg_read_all_stats TO {role}" in m["message"]
        # With pg_monitor (whose member pg_read_all_stats is) every role's statements are judged.
        with pg_server.admin() as admin:
            admin.execute(f"GRANT pg_monitor TO {role}")
        out = Job(as_role).run()
        assert findings(out, "extension_missing") == {} and samples(out, "statement_stats_available") == {(): 1.0}
    finally:
        with pg_server.admin() as admin:
            admin.execute(f"DROP ROLE IF EXISTS {role}")


# --------------------------------------------------------------------------- foreign keys


def test_unindexed_foreign_key_has_a_create_index_that_makes_the_next_run_clean(pgss: str) -> None:
    execute(
        pgss,
        "CREATE TABLE customers (id int PRIMARY KEY)",
        "INSERT INTO customers SELECT generate_series(1, 100)",
        "CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customers, note text)",
        "INSERT INTO orders SELECT g, 1 + g % 100, 'n' FROM generate_series(1, 5000) g",
        # Quoted names all the way: schema, table, columns.
        'CREATE SCHEMA "Sales Data"',
        'CREATE TABLE "Sales Data"."Regions" ("Code" text, "Year" int, PRIMARY KEY ("Code", "Year"))',
        'CREATE TABLE "Sales Data"."Order Lines" (id int, "Region Code" text, "Year" int, '
        'CONSTRAINT "line region" FOREIGN KEY ("Region Code", "Year") REFERENCES "Sales Data"."Regions")',
        # Covered: by a composite index's leading columns (in any order), or by the primary key.
        "CREATE TABLE lines (order_id int REFERENCES orders, pos int, customer_id int REFERENCES customers, "
        "PRIMARY KEY (order_id, pos))",
        "CREATE TABLE pairs (a text, b int, x int, FOREIGN KEY (a, b) REFERENCES \"Sales Data\".\"Regions\")",
        "CREATE INDEX pairs_b_a_x ON pairs (b, a, x)",
        "CREATE INDEX lines_pos_customer ON lines (pos, customer_id)",  # not leading: still a finding
        # Not covered by a partial index.
        "CREATE TABLE notes (id int, order_id int REFERENCES orders)",
        "CREATE INDEX notes_partial ON notes (order_id) WHERE order_id > 10",
    )
    job = Job(pgss)
    out = job.run()
    found = findings(out, "unindexed_foreign_key")
    assert set(found) == {
        "public.orders(customer_id)", '"Sales Data"."Order Lines"(Region Code, Year)'.replace('"', ""),
        "public.lines(customer_id)", "public.notes(order_id)",
    }  # fmt: skip
    orders = found["public.orders(customer_id)"]
    assert orders["sql"] == ["CREATE INDEX CONCURRENTLY orders_customer_id_idx ON public.orders (customer_id)"]
    assert (orders["referenced_table"], orders["columns"], orders["constraint"]) == ("public.customers", ["customer_id"], "orders_customer_id_fkey")
    assert orders["size_bytes"] == orders["value"] > 0 and orders["partitioned"] is False
    assert orders["message"].startswith("public.orders: foreign key orders_customer_id_fkey (customer_id) -> public.customers")
    quoted = found["Sales Data.Order Lines(Region Code, Year)"]
    assert quoted["sql"] == [
        'CREATE INDEX CONCURRENTLY "Order Lines_Region Code_Year_idx" ON "Sales Data"."Order Lines" ("Region Code", "Year")'
    ]
    assert samples(out, "unindexed_foreign_keys") == {(): 4.0}
    for f in found.values():
        execute(pgss, *f["sql"])
    out = job.run(MINUTE)
    assert findings(out, "unindexed_foreign_key") == {} and samples(out, "unindexed_foreign_keys") == {(): 0.0}


def test_small_tables_and_taken_index_names(pgss: str) -> None:
    execute(
        pgss,
        "CREATE TABLE customers (id int PRIMARY KEY)",
        "CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers)",
        "CREATE TABLE big (id int PRIMARY KEY, customer_id int REFERENCES customers, pad text)",
        "INSERT INTO big SELECT g, NULL, repeat('x', 100) FROM generate_series(1, 5000) g",
        "CREATE INDEX big_customer_id_idx ON big (id, customer_id)",  # the natural name is taken
        "ANALYZE",  # sizes are the catalog's page counts, which autovacuum keeps current
    )
    out = Job(pgss, "min_table_size: 256kB").run()
    found = findings(out, "unindexed_foreign_key")
    assert list(found) == ["public.big(customer_id)"]  # orders is under min_table_size
    (statement,) = found["public.big(customer_id)"]["sql"]
    assert statement.startswith("CREATE INDEX CONCURRENTLY big_customer_id_") and statement != "big_customer_id_idx"
    execute(pgss, statement)
    assert findings(Job(pgss, "min_table_size: 256kB").run(), "unindexed_foreign_key") == {}


def test_index_names_stay_within_namedatalen() -> None:
    name = foreign_keys.index_name("t" * 60, ["column_with_a_long_name"])
    assert len(name.encode()) == 63 and name.endswith("_idx")
    assert foreign_keys.index_name("t" * 60, ["c"]) != foreign_keys.index_name("t" * 60, ["d"])
    assert len(foreign_keys.index_name("ä" * 40, ["ö" * 10]).encode()) <= 63


def test_partitioned_parent_gets_its_index_on_the_parent(pgss: str) -> None:
    execute(
        pgss,
        "CREATE TABLE customers (id int PRIMARY KEY)",
        "INSERT INTO customers SELECT generate_series(1, 10)",
        "CREATE TABLE events (id int, customer_id int REFERENCES customers, at date NOT NULL) PARTITION BY RANGE (at)",
        "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01') PARTITION BY LIST (customer_id)",
        "CREATE TABLE events_2026_a PARTITION OF events_2026 FOR VALUES IN (1, 2, 3)",
        "CREATE TABLE events_2026_b PARTITION OF events_2026 DEFAULT",
        "CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
        "INSERT INTO events SELECT g, 1 + g % 10, date '2026-01-01' + g % 700 FROM generate_series(1, 3000) g",
        "ANALYZE",
    )
    job = Job(pgss)
    found = findings(job.run(), "unindexed_foreign_key")
    assert list(found) == ["public.events(customer_id)"]  # once, for the parent: not per partition
    f = found["public.events(customer_id)"]
    assert f["partitioned"] is True
    assert f["sql"] == [
        "CREATE INDEX CONCURRENTLY events_2026_a_customer_id_idx ON public.events_2026_a (customer_id)",
        "CREATE INDEX CONCURRENTLY events_2026_b_customer_id_idx ON public.events_2026_b (customer_id)",
        "CREATE INDEX CONCURRENTLY events_2027_customer_id_idx ON public.events_2027 (customer_id)",
        "CREATE INDEX events_customer_id_idx ON public.events (customer_id)",
    ]
    with psycopg.connect(pgss, autocommit=True) as c:
        # What the catalog records for all partitions (no index yet, no TOAST table: no wide column).
        expected = c.execute(
            """SELECT sum(c.relpages) * current_setting('block_size')::int
               FROM pg_partition_tree('events') p JOIN pg_class c ON c.oid = p.relid
               WHERE p.isleaf AND c.reltoastrelid = 0"""
        ).fetchone()[0]
    assert f["size_bytes"] == expected > 0
    execute(pgss, *f["sql"])
    with psycopg.connect(pgss, autocommit=True) as c:
        indexes = c.execute(
            "SELECT count(*) FROM pg_partition_tree('events_customer_id_idx') t JOIN pg_index x ON x.indexrelid = t.relid "
            "WHERE x.indisvalid"
        ).fetchone()[0]
    assert indexes == 5  # the parent's, the sub-parent's and one per leaf, all valid and attached
    assert findings(job.run(MINUTE), "unindexed_foreign_key") == {}


# --------------------------------------------------------------------------- sizes


def test_partitions_roll_up_to_their_root(pgss: str) -> None:
    execute(
        pgss,
        "CREATE TABLE metrics (at date NOT NULL, v text) PARTITION BY RANGE (at)",
        *[
            f"CREATE TABLE metrics_{m:02d} PARTITION OF metrics FOR VALUES FROM ('2026-{m:02d}-01') TO "
            f"('{2026 + m // 12}-{m % 12 + 1:02d}-01')"
            for m in range(1, 13)
        ],
        "CREATE INDEX ON metrics (at)",
        "INSERT INTO metrics SELECT date '2026-01-01' + g % 365, repeat(md5(g::text), 200) FROM generate_series(1, 6000) g",
        "CREATE TABLE small (id int)",
        "ANALYZE",
    )
    out = Job(pgss).run()
    sizes_ = samples(out, "table_size_bytes")
    assert {t for t, _ in sizes_} == {"public.metrics", "public.small"}  # not 12 partitions
    with psycopg.connect(pgss, autocommit=True) as c:
        heap, indexes, toast = c.execute(
            """SELECT sum(pg_table_size(c.oid) - coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0)),
                      sum(pg_indexes_size(c.oid)), sum(coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0))
               FROM pg_partition_tree('metrics') t JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf"""
        ).fetchone()
    assert (sizes_[("public.metrics", "heap")], sizes_[("public.metrics", "indexes")], sizes_[("public.metrics", "toast")]) == (heap, indexes, toast)
    assert toast > 0 and indexes > 0


# --------------------------------------------------------------------------- sinks


def test_every_finding_is_a_log_event_of_its_own_name_and_counters_move(pgss: str) -> None:
    execute(pgss, "CREATE TABLE p (id int PRIMARY KEY)", "CREATE TABLE c (p_id int REFERENCES p)")
    job = Job(pgss)
    job.run()
    execute(pgss, *["SELECT pg_sleep(0.12) AS slow"] * 5)
    out = job.run(MINUTE)
    result = JobResult("t", "query_insights", "success", 0.1, 0.0, findings=tuple(out.findings), samples=tuple(out.samples))
    with capture_logs() as logs:
        log_result(result)
    events = {(e["event"], e["log_level"]) for e in logs}
    assert {("slow_statement", "warning"), ("unindexed_foreign_key", "info")} <= events
    slow = next(e for e in logs if e["event"] == "slow_statement")
    assert slow["calls"] == 5 and slow["query"] == "SELECT pg_sleep($1) AS slow"
    metrics = Metrics(CollectorRegistry())
    metrics.record(result)
    calls = metrics.registry.get_sample_value("pgupkeep_statement_calls_total", {"target": "t"})
    assert calls == samples(out, "statement_calls_total")[()] >= 5
    assert metrics.registry.get_sample_value("pgupkeep_top_statement_seconds", {"target": "t", "queryid": slow["queryid"]}) > 0.5


def test_query_text_in_findings_is_what_log_query_text_allows(pgss: str) -> None:
    long = "SELECT pg_sleep(0.11), '" + "x" * 300 + "' AS long_text"
    jobs = {mode: Job(pgss, target_extra=f"log_query_text: {mode}") for mode in ("truncated", "full", "none")}
    for job in jobs.values():
        job.run()
    execute(pgss, *[long] * 5)
    shown = {mode: next(iter(findings(job.run(MINUTE), "slow_statement").values()))["query"] for mode, job in jobs.items()}
    normalized = "SELECT pg_sleep($1), $2 AS long_text"
    assert shown == {"truncated": normalized, "full": normalized, "none": None}
    # pg_stat_statements keeps constants as $n: a long text needs a long statement.
    wide = "SELECT " + ", ".join(f"pg_sleep(0.03) AS column_{i:03d}" for i in range(40))
    for job in jobs.values():
        job.run()
    execute(pgss, *[wide] * 5)
    shown = {mode: next(iter(findings(job.run(MINUTE), "slow_statement").values()))["query"] for mode, job in jobs.items()}
    assert len(shown["full"]) > 600 and shown["full"].startswith("SELECT pg_sleep($1) AS column_000")
    assert shown["truncated"] == shown["full"][:200] + "..." and shown["none"] is None
