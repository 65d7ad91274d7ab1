"""The bloat job against real PostgreSQL: flagging, accuracy, VACUUM, lock safety, series caps."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep import db
from pgupkeep.jobs import bloat
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.bloat.catalog import Settings, TableRow
from pgupkeep.jobs.bloat.estimate import TableBloat, autovacuum_threshold, rank_key
from pgupkeep.jobs.bloat.layout import Column, heap_tuple
from pgupkeep.policy import parse_policy
from pgupkeep.results import Action, JobOutput
from pgupkeep.runner import execute_job

NOW = datetime(2026, 11, 25, tzinfo=UTC)
ROWS = 20_000  # ~2.7 MB with the payload below


def policy_yaml(extra: str) -> str:
    lines = "".join(f"      {line}\n" for line in extra.strip().splitlines()) if extra.strip() else ""
    return (
        "version: 1\n"
        "targets:\n"
        "  - name: t\n"
        '    dsn: "${DSN}"\n'
        "    lock_timeout: 3s\n"
        "    bloat:\n" + ("" if "min_table_size" in extra else "      min_table_size: 1MB\n") + lines
    )


def run_job(
    dsn: str, extra: str = "exact_time_budget: 0s", *, apply: bool = True, standby: bool = False, now: datetime = NOW
) -> JobOutput:
    policy = parse_policy(policy_yaml(extra), environ={"DSN": dsn})
    target = policy.targets[0]
    with db.connect(target) as c:
        ctx = JobContext(
            target=target,
            section=target.bloat,
            conn=c,
            now=now,
            timezone=policy.daemon.zone,
            apply=apply,
            standby=standby,
            connect=lambda **kw: db.connect(target, **kw),
        )
        return execute_job(bloat.KIND, ctx)


def execute(dsn: str, *statements: str) -> None:
    """Each call in its own session: a backend flushes its statistics when it exits."""
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s)


def settle(dsn: str, table: str, live: int, dead: int) -> None:
    """Wait until the statistics views show what the last statements did."""
    deadline = time.monotonic() + 15
    while True:
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,)
            ).fetchone()
        if row == (live, dead):
            return
        assert time.monotonic() < deadline, f"{table}: statistics show {row}, expected {(live, dead)}"
        time.sleep(0.05)


def make_table(dsn: str, name: str, rows: int = ROWS, delete_every: int = 0, options: str = "") -> None:
    """A table of `rows` rows, analyzed; then every `delete_every`-th row deleted (scattered)."""
    opts = "autovacuum_enabled = off" + (f", {options}" if options else "")
    execute(
        dsn,
        f"CREATE TABLE {name} (id int PRIMARY KEY, payload text) WITH ({opts})",
        f"INSERT INTO {name} SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, {rows}) g",
    )
    settle(dsn, name, rows, 0)
    execute(dsn, f"ANALYZE {name}")
    if delete_every:
        execute(dsn, f"DELETE FROM {name} WHERE id % {delete_every} = 0")
        deleted = rows // delete_every
        settle(dsn, name, rows - deleted, deleted)


def exact_wasted(dsn: str, table: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        row = c.execute(
            "SELECT (dead_tuple_len + free_space)::float8 / table_len FROM pgstattuple(%s::regclass)", (table,)
        ).fetchone()
    assert row is not None
    return float(row[0])


def findings_by_object(out: JobOutput, kind: str = "bloated_table") -> dict[str, dict]:
    return {f.object: f.to_dict() for f in out.findings if f.kind == kind}


def series(out: JobOutput, metric: str) -> dict[str, float]:
    return {s.labels.get("table", ""): s.value for s in out.samples if s.metric == metric}


def dead_tuples(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,)).fetchone()[0]


# --------------------------------------------------------------------------- flagging and accuracy


def test_half_deleted_table_is_flagged_near_truth_and_clean_table_is_not(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "half", delete_every=2)
    make_table(dsn, "clean")
    make_table(dsn, "small", rows=100, delete_every=2)  # under min_table_size: not considered
    truth = exact_wasted(dsn, "half")

    out = run_job(dsn)

    found = findings_by_object(out)
    assert set(found) == {"public.half"}
    f = found["public.half"]
    assert f["bloat_ratio"] == pytest.approx(truth, abs=0.12)
    assert f == {
        "kind": "bloated_table",
        "object": "public.half",
        "value": f["bloat_ratio"],
        "message": f["message"],
        "table": "public.half",
        "size_bytes": f["size_bytes"],
        "dead_tuples": 10_000,
        "dead_tuple_ratio": 0.5,
        "bloat_ratio": f["bloat_ratio"],
        "bloat_bytes": f["bloat_bytes"],
        "method": "estimate",
        # Half the rows went after the statistics were taken (past autovacuum's ANALYZE threshold):
        # the figure says what it rests on.
        "estimate_basis": "pg_stats_stale",
        "changed_since_analyze": 10_000,
        "last_vacuum": None,
        "last_autovacuum": None,
        "autovacuum_overdue": True,
        "over": f["over"],
        "vacuum": "off",
        "remedy": f["remedy"],
        "heap": {"size_bytes": f["size_bytes"], "bloat_bytes": f["bloat_bytes"], "method": "estimate"},
        "toast": {"size_bytes": 0, "bloat_bytes": 0, "method": "estimate"},
    }
    assert "column statistics taken before 10000 rows changed (ANALYZE public.half" in f["message"]
    assert "dead_tuples" in f["over"]
    assert f["size_bytes"] > 2_000_000 and f["bloat_bytes"] == pytest.approx(f["size_bytes"] * f["bloat_ratio"], rel=0.01)
    assert "VACUUM (ANALYZE) public.half" in f["remedy"] and f["message"].startswith("public.half: ")
    assert out.actions == [] and out.errors == []
    assert series(out, "bloated_tables") == {"": 1.0}
    assert series(out, "table_dead_tuples") == {"public.half": 10_000.0, "public.clean": 0.0}
    assert series(out, "table_bloat_ratio")["public.clean"] < 0.05

    # Statistics taken again: the same figure, no longer marked.
    execute(dsn, "ANALYZE half")
    deadline = time.monotonic() + 15
    while True:
        with psycopg.connect(dsn, autocommit=True) as c:
            if c.execute("SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relid = 'half'::regclass").fetchone()[0] == 0:
                break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = findings_by_object(run_job(dsn))["public.half"]
    assert again["estimate_basis"] == "pg_stats" and "changed_since_analyze" not in again
    assert "column statistics taken before" not in again["message"]
    assert again["bloat_ratio"] == pytest.approx(truth, abs=0.03)


def test_free_space_after_plain_vacuum_is_still_reported_as_wasted(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "vacuumed", delete_every=3)
    execute(dsn, "DELETE FROM vacuumed WHERE id % 3 = 1")  # 2/3 gone, scattered over every page
    execute(dsn, "VACUUM vacuumed")
    settle(dsn, "vacuumed", ROWS - 2 * (ROWS // 3) - 1, 0)
    truth = exact_wasted(dsn, "vacuumed")
    assert truth > 0.55  # VACUUM made the space reusable but kept it in the table

    out = run_job(dsn)

    f = findings_by_object(out)["public.vacuumed"]
    assert f["dead_tuples"] == 0 and f["dead_tuple_ratio"] == 0.0  # dead tuples alone would say 0
    assert f["bloat_ratio"] == pytest.approx(truth, abs=0.12)
    assert f["over"] == ["bloat"] and f["method"] == "estimate" and f["last_vacuum"] is not None
    assert "pg_repack" in f["remedy"] and "VACUUM FULL" in f["remedy"] and "VACUUM (ANALYZE)" not in f["remedy"]
    assert f["autovacuum_overdue"] is False


def test_pgstattuple_approx_refines_the_worst_tables_within_budget(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "eighty", delete_every=5)
    execute(dsn, "DELETE FROM eighty WHERE id % 5 IN (1, 2, 3)")
    settle(dsn, "eighty", ROWS // 5, ROWS * 4 // 5)
    truth = exact_wasted(dsn, "eighty")  # also installs the extension

    with_approx = run_job(dsn, "exact_time_budget: 10s")
    without = run_job(dsn, "exact_time_budget: 0s")

    f = findings_by_object(with_approx)["public.eighty"]
    assert f["method"] == "pgstattuple_approx" and f["estimate_basis"] == "measured"
    assert f["bloat_ratio"] == pytest.approx(truth, abs=0.05)
    g = findings_by_object(without)["public.eighty"]
    assert g["method"] == "estimate" and g["bloat_ratio"] == pytest.approx(truth, abs=0.12)
    assert sorted(f["over"]) == ["bloat", "dead_tuples"]


def pgstattuple_wasted(dsn: str, relation: str) -> tuple[int, int]:
    """(dead_tuple_len + free_space, table_len) by exact pgstattuple."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        row = c.execute("SELECT dead_tuple_len + free_space, table_len FROM pgstattuple(%s::regclass)", (relation,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_toast_half_deleted_and_vacuumed_is_flagged_with_its_toast_waste(fresh_database: str):
    dsn = fresh_database
    # ~8 kB incompressible values stored out of line: a small heap, a large TOAST relation.
    execute(
        dsn,
        "CREATE TABLE docs (id int PRIMARY KEY, body text) WITH (autovacuum_enabled = off, toast.autovacuum_enabled = off)",
        "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
        "INSERT INTO docs SELECT g, (SELECT string_agg(md5((g * 1000 + i)::text), '') FROM generate_series(1, 256) i) "
        "FROM generate_series(1, 2500) g",
    )
    settle(dsn, "docs", 2500, 0)
    execute(dsn, "ANALYZE docs")
    execute(dsn, "DELETE FROM docs WHERE id % 2 = 0")
    settle(dsn, "docs", 1250, 1250)
    execute(dsn, "VACUUM docs")
    settle(dsn, "docs", 1250, 0)
    with psycopg.connect(dsn, autocommit=True) as c:
        toast = c.execute("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'docs'::regclass").fetchone()[0]
    toast_truth, toast_len = pgstattuple_wasted(dsn, toast)
    heap_truth, heap_len = pgstattuple_wasted(dsn, "docs")
    assert toast_len > 50 * heap_len and toast_truth > 0.45 * toast_len  # the case of the issue, in small

    measured = findings_by_object(run_job(dsn, "exact_time_budget: 10s\nmax_bloat_ratio: 0.3"))["public.docs"]
    assert measured["toast"]["method"] == "pgstattuple_approx" and measured["method"] == "pgstattuple_approx"
    assert measured["toast"]["size_bytes"] == toast_len and measured["heap"]["size_bytes"] == heap_len
    assert measured["toast"]["bloat_bytes"] == pytest.approx(toast_truth, rel=0.05)
    assert measured["size_bytes"] == heap_len + toast_len
    assert measured["bloat_bytes"] == measured["heap"]["bloat_bytes"] + measured["toast"]["bloat_bytes"]
    assert measured["bloat_ratio"] == pytest.approx((heap_truth + toast_truth) / (heap_len + toast_len), abs=0.05)
    assert measured["over"] == ["bloat"] and f"TOAST {measured['toast']['bloat_bytes']} of {toast_len}" in measured["message"]

    # Without pgstattuple: no freed chunk can have been reused (one VACUUM, no insert since), so
    # the chunks ever written give their average size.
    estimated = findings_by_object(run_job(dsn, "exact_time_budget: 0s\nmax_bloat_ratio: 0.3"))["public.docs"]
    assert estimated["toast"]["method"] == "estimate"
    assert estimated["toast"]["bloat_bytes"] == pytest.approx(toast_truth, rel=0.05)

    # New values after that VACUUM may have filled freed chunks: then every live chunk counts as a
    # full one, a lower bound.
    execute(dsn, "INSERT INTO docs SELECT 5001, (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 256) i)")
    settle(dsn, "docs", 1251, 0)
    toast_truth, _ = pgstattuple_wasted(dsn, toast)
    bound = findings_by_object(run_job(dsn, "exact_time_budget: 0s\nmax_bloat_ratio: 0.3"))["public.docs"]
    assert 0.6 * toast_truth <= bound["toast"]["bloat_bytes"] < 0.95 * toast_truth


@pytest.mark.slow
def test_untouched_million_row_table_estimate_is_within_a_point_of_pgstattuple(fresh_database: str):
    dsn = fresh_database
    # Real-world shapes: a few statuses, amounts of varying width, mostly-null notes of 0-199 characters.
    execute(
        dsn,
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, status text, amount numeric(10, 2), "
        "created_at timestamptz, note text, paid bool) WITH (autovacuum_enabled = off)",
        "INSERT INTO orders SELECT g, hashint4(g) % 50000, (ARRAY['new', 'paid', 'shipped', 'cancelled'])[1 + g % 4], "
        "abs(hashint4(g + 1)) % 100000 / 100.0, '2026-01-01'::timestamptz + g * interval '1 s', "
        "CASE WHEN hashint4(g + 2) % 10 < 7 THEN NULL ELSE repeat('n', abs(hashint4(g + 3)) % 200) END, g % 3 = 0 "
        "FROM generate_series(1, 1000000) g",
    )
    settle(dsn, "orders", 1_000_000, 0)
    execute(dsn, "ANALYZE orders")
    truth, size = pgstattuple_wasted(dsn, "orders")

    out = run_job(dsn, "exact_time_budget: 0s\nmin_table_size: 0\nreport_top: 10")

    ratio = series(out, "table_bloat_ratio")["public.orders"]
    assert ratio == pytest.approx(truth / size, abs=0.01)
    assert findings_by_object(out) == {}


def test_fillfactor_reserve_is_not_bloat(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "sparse", options="fillfactor = 10")
    truth, size = pgstattuple_wasted(dsn, "sparse")
    assert truth > 0.85 * size  # pgstattuple counts the reserve as free space ...

    for budget in ("0s", "10s"):
        out = run_job(dsn, f"exact_time_budget: {budget}")
        assert findings_by_object(out) == {}  # ... pgupkeep does not: fillfactor keeps it on purpose
        assert series(out, "table_bloat_ratio")["public.sparse"] < 0.05


def test_without_the_right_to_pgstattuple_the_job_says_so_once(fresh_database: str, pg_server):
    dsn = fresh_database
    make_table(dsn, "half", delete_every=2)
    make_table(dsn, "third", delete_every=3)
    role = f"bloat_nogrant_{secrets.token_hex(3)}"
    execute(dsn, "CREATE EXTENSION IF NOT EXISTS pgstattuple", f"CREATE ROLE {role} LOGIN", f"GRANT SELECT ON half, third TO {role}")
    params = conninfo_to_dict(dsn)
    params["user"] = role
    try:
        out = run_job(make_conninfo(**params), "exact_time_budget: 10s")
    finally:
        execute(dsn, f"DROP OWNED BY {role}", f"DROP ROLE {role}")

    denied = [f.to_dict() for f in out.findings if f.kind == "insufficient_privilege"]
    grant = f'GRANT pg_stat_scan_tables TO "{role}"'
    assert denied == [{
        "kind": "insufficient_privilege", "object": "pgstattuple", "value": None, "message": denied[0]["message"],
        "extension": "pgstattuple", "functions": ["pgstatindex", "pgstattuple_approx"], "grant": grant,
    }]  # fmt: skip
    assert denied[0]["message"].endswith(grant) and "estimates only" in denied[0]["message"]
    assert {o: f["method"] for o, f in findings_by_object(out).items()} == {"public.half": "estimate", "public.third": "estimate"}
    assert out.errors == []


def test_without_pgstattuple_installed_the_job_says_so(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "half", delete_every=2)
    out = run_job(dsn, "exact_time_budget: 10s")
    missing = [(f.kind, f.object, f.detail["remedy"]) for f in out.findings if f.kind == "extension_missing"]
    assert missing == [("extension_missing", "pgstattuple", "CREATE EXTENSION pgstattuple")]
    assert findings_by_object(out)["public.half"]["method"] == "estimate"
    assert not [f for f in run_job(dsn, "exact_time_budget: 0s").findings if f.kind == "extension_missing"]


# --------------------------------------------------------------------------- VACUUM


def test_vacuum_true_plans_then_vacuums_flagged_tables(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "dirty", delete_every=2)
    make_table(dsn, "clean")
    vacuum_sql = 'VACUUM (ANALYZE) "public"."dirty"'

    planned = run_job(dsn, "exact_time_budget: 0s\nvacuum: true", apply=False)
    assert planned.actions == [
        Action("vacuum_table", "public.dirty", vacuum_sql, False, {"table": "public.dirty", "dead_tuples": 10_000, "bloat_ratio": planned.actions[0].detail["bloat_ratio"]})
    ]
    assert findings_by_object(planned)["public.dirty"]["vacuum"] == "planned"
    assert dead_tuples(dsn, "dirty") == 10_000  # plan changed nothing

    applied = run_job(dsn, "exact_time_budget: 0s\nvacuum: true")
    assert [(a.action, a.object, a.sql, a.applied, a.detail["table"], a.detail["outcome"]) for a in applied.actions] == [
        ("vacuum_table", "public.dirty", vacuum_sql, True, "public.dirty", "success")
    ]
    assert applied.errors == []
    settle(dsn, "dirty", ROWS // 2, 0)
    again = run_job(dsn, "exact_time_budget: 0s\nvacuum: true")
    assert again.actions == []  # dead tuples are gone: VACUUM has nothing left to reclaim
    assert series(again, "table_dead_tuples")["public.dirty"] == 0.0


def test_standby_skips_vacuum_and_says_so(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "dirty", delete_every=2)

    out = run_job(dsn, "exact_time_budget: 0s\nvacuum: true", standby=True)

    assert out.actions == []
    assert findings_by_object(out)["public.dirty"]["vacuum"] == "skipped_standby"
    assert dead_tuples(dsn, "dirty") == 10_000


# --------------------------------------------------------------------------- locks


@pytest.fixture
def locked_table(fresh_database: str) -> Iterator[tuple[str, int]]:
    """`public.busy` held ACCESS EXCLUSIVE by another session for the duration of the test."""
    make_table(fresh_database, "busy", delete_every=2)
    make_table(fresh_database, "free", delete_every=2)
    holder = psycopg.connect(fresh_database, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
    try:
        yield fresh_database, holder.info.backend_pid
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_table_locked_access_exclusive_is_skipped_without_waiting(locked_table: tuple[str, int]):
    dsn, pid = locked_table
    started = time.monotonic()
    out = run_job(dsn, "exact_time_budget: 10s\nvacuum: true\nmin_index_size: 100kB")
    assert time.monotonic() - started < 2.5  # lock_timeout is 3s: nothing waited for it
    assert [(f.object, f.detail["lock"], f.detail["blocking_pids"]) for f in out.findings if f.kind == "index_skipped_locked"] == [
        ("public.busy_pkey", "held", [pid])
    ]
    assert "public.free_pkey" in {s.labels.get("index") for s in out.samples}  # the other table's index is measured

    skipped = [f.to_dict() for f in out.findings if f.kind == "table_skipped_locked"]
    assert skipped == [
        {
            "kind": "table_skipped_locked",
            "object": "public.busy",
            "value": None,
            "message": skipped[0]["message"],
            "table": "public.busy",
            "lock": "held",
            "blocking_pids": [pid],
        }
    ]
    assert str(pid) in skipped[0]["message"]
    assert set(findings_by_object(out)) == {"public.free"}
    assert [a.object for a in out.actions] == ["public.free"] and out.errors == []


def test_waiting_access_exclusive_lock_also_skips_the_table(fresh_database: str):
    dsn = fresh_database
    make_table(dsn, "queued")
    reader = psycopg.connect(dsn, autocommit=True)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM queued")  # ACCESS SHARE held ...
    waiter = psycopg.connect(dsn, autocommit=True)
    waiter_pid = waiter.info.backend_pid
    waiter.execute("BEGIN")
    # ... so this ACCESS EXCLUSIVE request queues; anything asking for the table queues behind it.
    t = threading.Thread(target=lambda: waiter.execute("LOCK TABLE queued IN ACCESS EXCLUSIVE MODE"))
    t.start()
    try:
        deadline = time.monotonic() + 10
        with psycopg.connect(dsn, autocommit=True) as c:
            while not c.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (waiter_pid,)).fetchone()[0]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        started = time.monotonic()
        out = run_job(dsn)
        assert time.monotonic() - started < 2.5
        skipped = [f.to_dict() for f in out.findings if f.kind == "table_skipped_locked"]
        assert [(f["object"], f["lock"], f["blocking_pids"]) for f in skipped] == [("public.queued", "awaited", [waiter_pid])]
    finally:
        reader.execute("ROLLBACK")
        t.join(10)
        waiter.close()
        reader.close()


# --------------------------------------------------------------------------- series and partitions


def test_report_top_caps_the_series_and_keeps_them_stable(fresh_database: str):
    dsn = fresh_database
    for name, every in (("t_a", 2), ("t_b", 3), ("t_c", 5), ("t_d", 0)):
        make_table(dsn, name, delete_every=every)

    first = run_job(dsn, "exact_time_budget: 0s\nreport_top: 2")
    second = run_job(dsn, "exact_time_budget: 0s\nreport_top: 2")

    for metric in ("table_dead_tuples", "table_dead_tuple_ratio", "table_bloat_ratio", "table_bloat_bytes"):
        assert set(series(first, metric)) == {"public.t_a", "public.t_b"}
    assert [s for s in first.samples] == [s for s in second.samples]
    assert series(first, "bloated_tables") == {"": 2.0}  # t_a and t_b; all four counted, two get series


def test_partitions_count_per_partition_and_roll_up_to_the_parent(fresh_database: str):
    dsn = fresh_database
    execute(
        dsn,
        "CREATE TABLE events (id int, payload text) PARTITION BY RANGE (id)",
        "CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (20001) WITH (autovacuum_enabled = off)",
        "CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (20001) TO (40001) WITH (autovacuum_enabled = off)",
        "INSERT INTO events SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 40000) g",
    )
    settle(dsn, "events_2", 20_000, 0)
    execute(dsn, "ANALYZE events", "DELETE FROM events WHERE id % 2 = 0")
    settle(dsn, "events_1", 10_000, 10_000)
    settle(dsn, "events_2", 10_000, 10_000)

    out = run_job(dsn)

    found = findings_by_object(out)
    assert set(found) == {"public.events_1", "public.events_2", "public.events"}
    parent = found["public.events"]
    assert parent["partitions"] == 2 and parent["dead_tuples"] == 20_000 and parent["vacuum"] == "partitions"
    assert parent["size_bytes"] == found["public.events_1"]["size_bytes"] + found["public.events_2"]["size_bytes"]
    assert series(out, "bloated_tables") == {"": 2.0}  # the roll-up is not a table of its own
    assert series(out, "table_dead_tuples") == {"public.events": 20_000.0, "public.events_1": 10_000.0, "public.events_2": 10_000.0}


# --------------------------------------------------------------------------- the pure parts


def _row(**kw: object) -> TableRow:
    base: dict = dict(
        oid=1, schema="public", name="t", root=None, reltuples=1000.0, relpages=10, natts=2, reloptions={},
        size_bytes=81920, lock_granted=None, lock_pids=(), n_live_tup=1000, n_dead_tup=0, stats_seen=True,
        last_vacuum=None, last_autovacuum=None, columns=(),
    )  # fmt: skip
    base.update(kw)
    return TableRow(**base)


def test_autovacuum_threshold_follows_reloptions_over_server_settings():
    s = Settings(vacuum_threshold=50, vacuum_scale_factor=0.2)
    assert autovacuum_threshold(_row(), s) == (250.0, True)
    tuned = _row(reloptions={"autovacuum_vacuum_threshold": "10", "autovacuum_vacuum_scale_factor": "0.01"})
    assert autovacuum_threshold(tuned, s) == (20.0, True)
    assert autovacuum_threshold(_row(reloptions={"autovacuum_enabled": "false"}), s) == (250.0, False)
    assert autovacuum_threshold(_row(), Settings(vacuum_max_threshold=100)) == (100.0, True)
    assert autovacuum_threshold(_row(reltuples=-1.0), s) == (50.0, True)  # never vacuumed (14+)


def test_tuple_layout_averages_each_rows_padding():
    def per_row(*columns: Column, natts: int = 2) -> float:
        layout = heap_tuple(columns, natts)
        assert layout is not None
        return layout[0]

    # int4 then int8: 4 bytes of padding before the int8; header 24; data 16 -> 40 + line pointer.
    assert per_row(Column(4, "i", 4, 0.0), Column(8, "d", 8, 0.0)) == 44
    # int4 then a text always 33 bytes stored: no padding (1-byte header) -> 24 + 37 = 61 -> 64 + 4.
    assert per_row(Column(4, "i", 4, 0.0), Column(-1, "i", 33, 0.0, ((33, 1.0),))) == 68
    # Half the texts 30 bytes, half 36: rows of 58 and 64 bytes take 64 each, not MAXALIGN(61) = 64 ...
    assert per_row(Column(4, "i", 4, 0.0), Column(-1, "i", 33, 0.0, ((30, 0.5), (36, 0.5)))) == 68
    # ... but 33 and 39 take 64 and 72: the average row (64.5 raw) is 68 + 4, not MAXALIGN(64.5) + 4 = 76.
    assert per_row(Column(4, "i", 4, 0.0), Column(-1, "i", 36, 0.0, ((33, 0.5), (39, 0.5)))) == 72
    # Widths unknown (not a string type): every residue equally likely, 3.5 bytes of padding on average.
    assert per_row(Column(4, "i", 4, 0.0), Column(-1, "i", 33, 0.0)) == pytest.approx(24 + 37 + 3.5 + 4)
    # A null takes no space (28 -> 32 bytes, against 40); the bitmap fits the 24-byte header up to 8 columns.
    assert per_row(Column(4, "i", 4, 0.0), Column(8, "d", 8, 0.5)) == pytest.approx(0.5 * 32 + 0.5 * 40 + 4)
    nine = [Column(4, "i", 4, 0.0)] * 8 + [Column(4, "i", 4, 0.5)]
    # 9 columns: rows with the null have a 32-byte header and 32 bytes of data, the others 24 + 36 -> 64.
    assert heap_tuple(nine, 9)[0] == pytest.approx(0.5 * (32 + 32) + 0.5 * 64 + 4)
    assert heap_tuple((Column(4, "i", 4, 0.0), Column(-1, "i", None, None)), 2) is None


def test_ranking_ignores_small_drift_and_breaks_ties_by_name():
    def t(name: str, wasted: int) -> TableBloat:
        return TableBloat(name, 10**9, 0, 0, wasted, "estimate", "pg_stats")

    # 1.10 MB and 1.15 MB share a quarter-octave bucket: order by name, whichever drifted up.
    assert [x.table for x in sorted([t("b", 1_100_000), t("a", 1_150_000)], key=rank_key)] == ["a", "b"]
    assert [x.table for x in sorted([t("b", 1_150_000), t("a", 1_100_000)], key=rank_key)] == ["a", "b"]
    assert [x.table for x in sorted([t("b", 4_000_000), t("a", 1_100_000)], key=rank_key)] == ["b", "a"]
