"""The partitions catalog read across runs: bounds kept from an earlier run are used only while a
table's partitions are unchanged, and every kind of change is seen on the next run."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import pytest

from partition_helpers import leave_detach_pending
from pgupkeep import db
from pgupkeep.jobs.partitions.catalog import Known, Table, read_catalog
from pgupkeep.policy import Target, parse_policy
from pgupkeep.runner import Runner

TABLES = ("ca", "cb")


@pytest.fixture
def database(fresh_database: str) -> str:
    """Each test here changes the same tables: a database of its own."""
    return fresh_database


def _target(dsn: str) -> Target:
    tables = "".join(f"        - table: public.{n}\n          interval: monthly\n" for n in TABLES)
    text = f'version: 1\ntargets:\n  - name: t\n    dsn: "${{DSN}}"\n    partitions:\n      tables:\n{tables}'
    return parse_policy(text, environ={"DSN": dsn}).targets[0]


def _setup(conn: psycopg.Connection) -> None:
    conn.execute("CREATE SCHEMA other")
    for n in TABLES:
        conn.execute(f"CREATE TABLE {n} (id bigint, k timestamptz NOT NULL) PARTITION BY RANGE (k)")
        for m in (9, 10, 11):
            schema = "other" if m == 10 else "public"
            conn.execute(f"CREATE TABLE {schema}.{n}_{m:02d} PARTITION OF {n} "
                         f"FOR VALUES FROM ('2026-{m:02d}-01+00') TO ('2026-{m + 1:02d}-01+00')")
        conn.execute(f"CREATE TABLE {n}_default PARTITION OF {n} DEFAULT")


def _read(target: Target, known: dict[int, Known]) -> list[Table]:
    with db.connect(target) as c:
        return read_catalog(c, target.partitions.tables, known)


def _shape(tables: list[Table]) -> list[tuple[object, ...]]:
    return [(t.label, t.parts, t.default, t.default_bytes) for t in tables]


def test_unchanged_tables_reuse_the_bounds_read_before(conn: psycopg.Connection, database: str) -> None:
    _setup(conn)
    target = _target(database)
    known: dict[int, Known] = {}
    first = _read(target, known)
    kept = dict(known)
    assert [[p.name for p in t.parts] for t in first] == [[f"{n}_09", f"{n}_10", f"{n}_11"] for n in TABLES]
    conn.execute("ALTER TABLE cb RENAME TO cb_old")  # one table gone from the catalog...
    conn.execute("CREATE TABLE cb (id bigint, k timestamptz NOT NULL) PARTITION BY RANGE (k)")  # ...another in its place
    second = _read(target, known)
    oid_a, oid_b = (conn.execute("SELECT %s::regclass::oid", (n,)).fetchone()[0] for n in TABLES)
    assert known[oid_a] is kept[oid_a]  # not read again
    assert set(known) == {oid_a, oid_b}  # the old cb's entry is dropped
    assert _shape(second) == _shape(_read(target, {}))
    assert (second[1].parts, second[1].default) == ([], None)


def _attach(c: psycopg.Connection) -> None:
    c.execute("CREATE TABLE ca_12 PARTITION OF ca FOR VALUES FROM ('2026-12-01+00') TO ('2027-01-01+00')")


def _reattach_with_other_bounds(c: psycopg.Connection) -> None:
    with c.transaction():  # the same partition, name and count: only its bound differs
        c.execute("ALTER TABLE ca DETACH PARTITION ca_11")
        c.execute("ALTER TABLE ca ATTACH PARTITION ca_11 FOR VALUES FROM ('2026-11-01+00') TO ('2026-11-15+00')")


def _swap_names(c: psycopg.Connection) -> None:
    # The same names, bounds and count as before: only which name goes with which bound changed.
    # Retention would otherwise drop the partition that now carries the old name.
    with c.transaction():
        c.execute("ALTER TABLE ca_09 RENAME TO ca_swap")
        c.execute("ALTER TABLE ca_11 RENAME TO ca_09")
        c.execute("ALTER TABLE ca_swap RENAME TO ca_11")


CHANGES: dict[str, Callable[[psycopg.Connection, str], None]] = {
    "attach": lambda c, dsn: _attach(c),
    "detach": lambda c, dsn: c.execute("ALTER TABLE ca DETACH PARTITION ca_09"),
    "drop": lambda c, dsn: c.execute("DROP TABLE other.ca_10"),
    "rename": lambda c, dsn: c.execute("ALTER TABLE ca_11 RENAME TO ca_november"),
    "two partitions swap names": lambda c, dsn: _swap_names(c),
    "set schema": lambda c, dsn: c.execute("ALTER TABLE ca_09 SET SCHEMA other"),
    "schema rename": lambda c, dsn: c.execute("ALTER SCHEMA other RENAME TO archive"),  # moves ca_10 and cb_10
    "reattach with other bounds": lambda c, dsn: _reattach_with_other_bounds(c),
    "default dropped": lambda c, dsn: c.execute("DROP TABLE ca_default"),
    "default swapped": lambda c, dsn: (c.execute("ALTER TABLE ca DETACH PARTITION ca_default"),
                                       c.execute("CREATE TABLE ca_def2 PARTITION OF ca DEFAULT")),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_change_is_read_on_the_next_run(conn: psycopg.Connection, database: str, change: str) -> None:
    _setup(conn)
    target = _target(database)
    known: dict[int, Known] = {}
    before = _read(target, known)
    CHANGES[change](conn, database)
    after = _read(target, known)
    assert _shape(after) == _shape(_read(target, {}))  # as a read from nothing sees it
    assert _shape(after)[0] != _shape(before)[0]
    if change != "schema rename":
        assert _shape(after)[1] == _shape(before)[1]  # the other table is untouched


def test_a_detach_left_pending_is_read_on_the_next_run(conn: psycopg.Connection, database: str) -> None:
    _setup(conn)
    conn.execute("DROP TABLE ca_default")  # DETACH ... CONCURRENTLY refuses while a default partition exists
    target = _target(database)
    known: dict[int, Known] = {}
    before = _read(target, known)
    leave_detach_pending(database, "ca", "other.ca_10")
    after = _read(target, known)
    assert [p.pending_detach for p in after[0].parts] == [False, True, False]
    assert _shape(after) == _shape(_read(target, {}))
    assert _shape(after)[1] == _shape(before)[1]


def test_the_runner_keeps_bounds_between_runs_of_a_target(conn: psycopg.Connection, database: str) -> None:
    _setup(conn)
    tables = "".join(f"        - table: public.{n}\n          interval: monthly\n          premake: 1\n" for n in TABLES)
    text = f'version: 1\ntargets:\n  - name: t\n    dsn: "${{DSN}}"\n    partitions:\n      tables:\n{tables}'
    runner = Runner(parse_policy(text, environ={"DSN": database}), clock=lambda: datetime(2026, 11, 25, tzinfo=UTC))
    first = runner.run("t", "partitions")
    assert [a.object for a in first.actions] == ["public.ca_2026_12", "public.cb_2026_12"]
    conn.execute("DROP TABLE cb_2026_12")  # a partition dropped by hand between runs is made again
    second = runner.run("t", "partitions")
    assert [(a.object, a.applied) for a in second.actions] == [("public.cb_2026_12", True)]
    third = runner.run("t", "partitions")
    assert (third.outcome, third.actions) == ("success", ())
    memo = runner._memos[("t", "partitions")]["partitions"]
    assert sorted(len(k.parts) for k in memo.values()) == [4, 4]
    runner.forget_target("t")  # the target left the policy on a reload
    assert runner._memos == {}
    assert runner.run("t", "partitions").outcome == "success"


def test_the_catalog_read_scans_foreign_keys_once_whatever_the_planner_estimates(conn: psycopg.Connection) -> None:
    """Inlined, the foreign-key scan could land on the inner side of a nested loop over the managed
    tables and run once per table: with 180,000 relations a read of 10,000 tables took 200 s
    instead of 0.8 s. It is a CTE of its own in every plan, whatever the statistics say."""
    from pgupkeep.jobs.partitions.catalog import MAY_SET_15, TABLES_SQL

    _setup(conn)
    names = [f"t{i}" for i in range(5000)] + list(TABLES)
    query = "EXPLAIN " + TABLES_SQL.replace("{may_set}", MAY_SET_15)
    params = {"schemas": ["public"] * len(names), "names": names, "offset": 0, "digests": True, "retention": True}
    conn.execute("SET enable_hashjoin = off")  # push the planner towards nested loops
    plan = "\n".join(r[0] for r in conn.execute(query, params).fetchall())
    assert "CTE referenced" in plan and "CTE marked" in plan
    assert plan.count("on pg_constraint") == 1
