"""Integer keys at the top of their type: the last partition ends at MAXVALUE, never past the
type's max; partition_key_exhausting says how much of the type is used; the runway is counted in
key values and, from the growth seen between runs, in seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from partition_helpers import actions, bounds, run_job, samples
from pgupkeep.results import Finding

NOW = datetime(2026, 11, 20, tzinfo=UTC)
INT4_MAX = 2**31 - 1


def test_int4_key_near_the_top(conn: psycopg.Connection, database: str) -> None:
    conn.execute("CREATE TABLE ids (k int4 NOT NULL, v text) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE ids_2000000000 PARTITION OF ids FOR VALUES FROM (2000000000) TO (2100000000)")
    conn.execute("INSERT INTO ids SELECT g, 'x' FROM generate_series(2000000000, 2050000000, 1000000) g")
    yaml = "        - table: public.ids\n          interval: 100000000\n          premake: 3\n"
    memo: dict = {}
    out = run_job(database, yaml, NOW, memo=memo)
    assert actions(out) == [("create_partition", "public.ids_2100000000", True)]  # the only one that fits
    assert "FOR VALUES FROM (2100000000) TO (MAXVALUE);" in out.actions[0].sql
    assert bounds(conn, "ids")[1] == ("ids_2100000000", "FOR VALUES FROM (2100000000) TO (MAXVALUE)")
    share = round(2_050_000_000 / INT4_MAX, 6)
    assert out.findings == [Finding(
        "partition_key_exhausting", "public.ids", share,
        f"public.ids: the partition key k (int4) has reached 2050000000, {2_050_000_000 / INT4_MAX:.1%} of its type's "
        f"maximum {INT4_MAX} (key_exhaustion_warn 0.8); the last partition ends at MAXVALUE; convert it to bigint "
        "(ALTER TABLE ... ALTER COLUMN ... TYPE bigint rewrites the table) before it runs out",
        {"table": "public.ids", "key_type": "int4", "max_key": 2_050_000_000, "type_max": INT4_MAX, "share": share,
         "warn": 0.8},
    )]  # and no partition_runway_low: the targets are what fits before the type's end
    assert out.errors == []
    assert samples(out) == {
        ("partition_premade", "public.ids"): 1.0,
        ("partition_premake_target", "public.ids"): 1.0,
        ("partition_runway_warn", "public.ids"): 1.0,
        ("partition_default_rows", "public.ids"): 0.0,
        ("partition_runway_values", "public.ids"): float(INT4_MAX + 1 - 2_050_000_000),
    }  # no runway in seconds yet: one run has seen no growth
    conn.execute(f"INSERT INTO ids VALUES ({INT4_MAX}, 'the last one')")  # the type's max has a partition
    conn.execute(f"DELETE FROM ids WHERE k = {INT4_MAX}")

    # An hour later the key has grown by 10,000,000: about 2,778 values a second.
    conn.execute("INSERT INTO ids VALUES (2060000000, 'y')")
    later = run_job(database, yaml, NOW + timedelta(hours=1), memo=memo)
    assert (later.actions, later.errors) == ([], [])
    values = INT4_MAX + 1 - 2_060_000_000
    assert samples(later)[("partition_runway_values", "public.ids")] == values
    assert samples(later)[("partition_runway_seconds", "public.ids")] == values / (10_000_000 / 3600)
    assert [f.kind for f in later.findings] == ["partition_key_exhausting"]


def test_key_exhaustion_warn_is_per_table(conn: psycopg.Connection, database: str) -> None:
    conn.execute("CREATE TABLE calm (k int2 NOT NULL) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE calm_0 PARTITION OF calm FOR VALUES FROM (0) TO (8192)")
    conn.execute("INSERT INTO calm VALUES (8000)")  # 24 % of int2
    yaml = ("        - table: public.calm\n          interval: 8192\n          premake: 5\n"
            "          key_exhaustion_warn: 0.2\n")
    out = run_job(database, yaml, NOW)
    # 8192 .. 24575, then the slot that would end at 32768 ends at MAXVALUE: three fit, not five.
    assert actions(out) == [("create_partition", f"public.calm_{lo}", True) for lo in (8192, 16384, 24576)]
    assert [f.kind for f in out.findings] == ["partition_key_exhausting"]
    assert samples(out)[("partition_premake_target", "public.calm")] == 3.0
    assert samples(out)[("partition_runway_values", "public.calm")] == 32768.0 - 8000
    quiet = run_job(database, yaml.replace("0.2", "0.9"), NOW)
    assert (quiet.actions, quiet.findings, quiet.errors) == ([], [], [])


def test_integer_growth_stalled_reads_as_infinite_runway(conn: psycopg.Connection, database: str) -> None:
    conn.execute("CREATE TABLE still (k bigint NOT NULL) PARTITION BY RANGE (k)")
    yaml = "        - table: public.still\n          interval: 1000\n          premake: 1\n"
    memo: dict = {}
    first = run_job(database, yaml, NOW, memo=memo)
    assert ("partition_runway_seconds", "public.still") not in samples(first)
    second = run_job(database, yaml, NOW + timedelta(hours=2), memo=memo)
    assert samples(second)[("partition_runway_seconds", "public.still")] == float("inf")
    assert samples(second)[("partition_runway_values", "public.still")] == 2000.0
