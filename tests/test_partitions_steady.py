"""The partitions job in steady state: a table the last run planned with nothing to do is not
planned again while nothing it depends on changed, and every change is still seen on the next run;
a long list of tables is read on two sessions at once, with the same result as one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from partition_helpers import actions, samples
from pgupkeep import db
from pgupkeep.jobs.partitions import catalog
from pgupkeep.jobs.partitions.catalog import read_catalog
from pgupkeep.policy import parse_policy
from pgupkeep.results import JobResult
from pgupkeep.runner import Runner

TABLES = """        - {table: public.orders, interval: monthly, premake: 1}
        - {table: public.events, interval: monthly, premake: 1, retention: 1 month}
"""


def _policy(dsn: str, tables: str = TABLES):
    text = f'version: 1\ntargets:\n  - name: t\n    dsn: "${{DSN}}"\n    partitions:\n      tables:\n{tables}'
    return parse_policy(text, environ={"DSN": dsn})


def _setup(conn: psycopg.Connection) -> None:
    for n in ("orders", "events"):
        conn.execute(f"CREATE TABLE {n} (id bigint, k timestamptz NOT NULL) PARTITION BY RANGE (k)")
        conn.execute(f"CREATE TABLE {n}_default PARTITION OF {n} DEFAULT")


def _by_table(res: JobResult, metric: str) -> dict[str, float]:
    return {table: v for (m, table), v in samples(res).items() if m == metric}


def test_a_settled_table_is_reused_until_something_it_depends_on_changes(conn: psycopg.Connection, database: str) -> None:
    _setup(conn)
    now = [datetime(2026, 11, 25, tzinfo=UTC)]
    runner = Runner(_policy(database), clock=lambda: now[0])
    first = runner.run("t", "partitions")
    assert actions(first) == [("create_partition", f"public.{n}_{m}", True)
                              for n in ("orders", "events") for m in ("2026_11", "2026_12")]
    second = runner.run("t", "partitions")
    settled = runner._memos[("t", "partitions")]["settled"]
    assert (second.outcome, second.actions) == ("success", ()) and len(settled) == 2
    kept = dict(settled)

    now[0] += timedelta(hours=1)
    third = runner.run("t", "partitions")
    assert (third.outcome, third.actions, third.findings) == ("success", (), ())
    assert all(settled[k] is kept[k] for k in kept)  # neither table was read into a new Table nor planned again
    for metric in ("partition_premade", "partition_premake_target", "partition_runway_warn", "partition_default_rows"):
        assert _by_table(third, metric) == _by_table(second, metric)
    runway = _by_table(third, "partition_runway_seconds")
    assert {t: _by_table(second, "partition_runway_seconds")[t] - v for t, v in runway.items()} == {
        "public.orders": 3600.0, "public.events": 3600.0}

    # Rows land in a default partition: its size changed, so it is counted and reported.
    conn.execute("INSERT INTO orders VALUES (1, '2001-01-01+00')")
    rows = runner.run("t", "partitions")
    assert [(f.kind, f.object, f.value) for f in rows.findings] == [("default_partition_rows", "public.orders", 1)]
    assert _by_table(rows, "partition_default_rows") == {"public.orders": 1.0, "public.events": 0.0}
    assert settled.get(2) is kept[2] and 1 not in settled  # orders is planned each run while it has rows there

    # Another session's lock on a settled table's default partition: the table is left alone.
    with psycopg.connect(database) as holder:
        holder.execute("LOCK TABLE events_default IN ACCESS EXCLUSIVE MODE")
        locked = runner.run("t", "partitions")
    assert [e.object for e in locked.errors] == ["public.events"]
    assert "ACCESS EXCLUSIVE lock on public.events_default is held" in locked.errors[0].message

    # A partition renamed by hand: the next run knows it by its new name.
    conn.execute("ALTER TABLE events_2026_12 RENAME TO events_december")
    assert runner.run("t", "partitions").outcome == "success"
    assert [p.name for p in settled[2].parts] == ["events_2026_11", "events_december"]
    # One dropped by hand is made again.
    conn.execute("DROP TABLE events_december")
    assert actions(runner.run("t", "partitions")) == [("create_partition", "public.events_2026_12", True)]

    # The clock reaches the next month: each table gets its next partition, and the one older
    # than the retention is retired.
    now[0] = datetime(2027, 1, 5, tzinfo=UTC)
    turned = runner.run("t", "partitions")
    assert ("create_partition", "public.events_2027_01", True) in actions(turned)
    assert ("create_partition", "public.orders_2027_01", True) in actions(turned)
    assert any(a.action == "detach_partition" and a.object == "public.events_2026_11" for a in turned.actions)


def test_a_long_list_of_tables_is_read_on_two_sessions_with_the_same_result(
    conn: psycopg.Connection, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"s{i}" for i in range(7)]
    for n in names:
        conn.execute(f"CREATE TABLE {n} (id bigint, k timestamptz NOT NULL) PARTITION BY RANGE (k)")
        conn.execute(f"CREATE TABLE {n}_10 PARTITION OF {n} FOR VALUES FROM ('2026-10-01+00') TO ('2026-11-01+00')")
        conn.execute(f"CREATE TABLE {n}_default PARTITION OF {n} DEFAULT")
    conn.execute("INSERT INTO s5 VALUES (1, '2001-01-01+00')")
    conn.execute("GRANT SELECT ON s6 TO PUBLIC")
    tables = "".join(f"        - {{table: public.{n}, interval: monthly}}\n" for n in [*names, "missing"])
    target = _policy(database, tables).targets[0]
    opened: list[str] = []

    def connect() -> psycopg.Connection:
        opened.append("session")
        return db.connect(target)

    def refused() -> psycopg.Connection:
        raise psycopg.OperationalError("too many clients already")

    monkeypatch.setattr(catalog, "SPLIT_TABLES", 2)
    with db.connect(target) as c:
        whole = read_catalog(c, target.partitions.tables, {})
        split = read_catalog(c, target.partitions.tables, {}, None, connect)
        alone = read_catalog(c, target.partitions.tables, {}, None, refused)  # no second session: one after the other
    assert opened == ["session"]
    shape = [[(t.label, t.found, t.row, t.parts, t.default, t.default_bytes) for t in r] for r in (whole, split, alone)]
    assert shape[1] == shape[0] and shape[2] == shape[0]
    assert [t.found for t in split] == [True] * 7 + [False]
    assert split[5].default_bytes > 0 and split[6].rights.grants
