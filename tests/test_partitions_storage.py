"""storage_parameters: every name and bound the policy accepts is one PostgreSQL accepts for a
table (proved against the real server, both edges of every range), bad ones are reported by
`check` with their line, and a parameter the server is too old for fails that table at `plan`."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from partition_helpers import run_job
from pgupkeep import reloptions
from pgupkeep.policy import PolicyError, parse_policy

NOV = datetime(2026, 11, 20, tzinfo=UTC)


def accepts(conn: psycopg.Connection, name: str, value: str) -> bool:
    try:
        with conn.transaction():
            conn.execute(f"CREATE TEMP TABLE probe (x text) WITH ({name} = {value})")
            raise RuntimeError("rolled back")
    except RuntimeError:
        return True
    except psycopg.errors.InvalidParameterValue:
        return False


def edges(option: reloptions.Reloption) -> tuple[list[object], list[object]]:
    """(values just inside the range, values just outside it), as the policy would hold them."""
    if option.kind == "bool":
        return [True, False], ["maybe"]
    if option.kind == "enum":
        return ["auto", "on", "off", True], ["sometimes"]
    assert option.lo is not None and option.hi is not None
    if option.kind == "int":
        return [int(option.lo), int(option.hi)], [int(option.lo) - 1, int(option.hi) + 1]
    return [float(option.lo), float(option.hi)], [option.lo - 0.001, option.hi + 0.001]


def test_every_storage_parameter_and_bound_is_postgresql_s(conn: psycopg.Connection) -> None:
    version = conn.info.server_version
    known = [o for o in reloptions.RELOPTIONS.values() if o.since <= version]
    assert len(known) == (42 if version >= 180000 else 38)  # 18 added two, each for the table and its TOAST
    for option in known:
        inside, outside = edges(option)
        for value in inside:
            checked = reloptions.check(option.name, value)
            assert accepts(conn, option.name, reloptions.sql_value(checked)), (option.name, value)
        for value in outside:
            with pytest.raises(ValueError):
                reloptions.check(option.name, value)
            text = repr(value) if isinstance(value, float) else f"'{value}'" if isinstance(value, str) else str(value)
            assert not accepts(conn, option.name, text), (option.name, value)
    for option in reloptions.RELOPTIONS.values():
        if option.since > version:  # what this server does not know yet, it refuses
            assert not accepts(conn, option.name, reloptions.sql_value(reloptions.check(option.name, edges(option)[0][0])))
    # Names PostgreSQL has only for indexes, or only for the table (not its TOAST table), or not at all.
    for name in ("toast.fillfactor", "toast.autovacuum_analyze_threshold", "toast.parallel_workers", "fillfactr",
                 "deduplicate_items"):
        assert name not in reloptions.RELOPTIONS
        assert not accepts(conn, name, "10")


def test_check_reports_each_bad_parameter_at_its_line() -> None:
    text = """version: 1
targets:
  - name: t
    dsn: host=db
    partitions:
      tables:
        - table: public.orders
          interval: monthly
          storage_parameters:
            fillfactor: 5
            autovacuum_vacuum_scale_factor: "lots"
            vacuum_index_cleanup: sometimes
            toast.fillfactor: 70
            autovacuum_enabled: false
"""
    with pytest.raises(PolicyError) as err:
        parse_policy(text)
    at = "<policy>:{}:13: targets[0].partitions.tables[0].storage_parameters.{}"
    assert [str(p) for p in err.value.problems] == [
        at.format(10, "fillfactor") + ": must be between 10 and 100, got 5",
        at.format(11, "autovacuum_vacuum_scale_factor") + ": must be a number between 0 and 100",
        at.format(12, "vacuum_index_cleanup") + ": must be auto, on or off",
        at.format(13, '"toast.fillfactor"') + ": unknown key",
    ]


def test_a_parameter_the_server_is_too_old_for_fails_that_table(conn: psycopg.Connection, database: str) -> None:
    for name in ("st_new", "st_plain"):
        conn.execute(f"CREATE TABLE {name} (k timestamptz NOT NULL) PARTITION BY RANGE (k)")
    tables = ("        - table: public.st_new\n          interval: monthly\n          premake: 0\n"
              "          storage_parameters: {autovacuum_vacuum_max_threshold: 100000, fillfactor: 90}\n"
              "        - table: public.st_plain\n          interval: monthly\n          premake: 0\n")
    out = run_job(database, tables, NOV, apply=False)
    if conn.info.server_version >= 180000:
        assert out.errors == []
        assert "WITH (fillfactor = 90, autovacuum_vacuum_max_threshold = 100000)" in out.actions[0].sql
    else:
        assert [(e.object, e.message) for e in out.errors] == [("public.st_new", (
            f"public.st_new: storage parameter autovacuum_vacuum_max_threshold needs PostgreSQL 18 or later and the "
            f"server runs {conn.info.server_version // 10000}; remove it from storage_parameters"))]
        assert [a.object for a in out.actions] == ["public.st_plain_2026_11"]
