"""The partitions job against a real PostgreSQL: premake, bounds recognition, default-partition
conflicts, retention, bad input, lock safety and a 200-table target. The clock is injected."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import psycopg
import pytest

from partition_helpers import actions, bounds, leave_detach_pending, mark, run_job, samples
from pgupkeep import db
from pgupkeep.jobs import partitions
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.partitions import plan_table
from pgupkeep.jobs.partitions.catalog import read_catalog
from pgupkeep.jobs.partitions.reads import assign_names, probe_defaults, read_integer_bases
from pgupkeep.policy import Target, parse_policy
from pgupkeep.results import Action, Finding, ItemError, JobOutput, Plan
from pgupkeep.runner import Fence, apply_plan, execute_job

BERLIN = ZoneInfo("Europe/Berlin")


MONTHLY = "        - table: public.orders\n          interval: monthly\n"


def test_monthly_premake_then_idempotent(conn: psycopg.Connection, database: str) -> None:
    conn.execute("CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY, created_at timestamptz NOT NULL "
                 "DEFAULT now(), note text COMMENT_ME, amount numeric CHECK (amount >= 0)) PARTITION BY RANGE (created_at)"
                 .replace(" COMMENT_ME", ""))
    conn.execute("COMMENT ON COLUMN orders.note IS 'free text'")
    conn.execute("ALTER TABLE orders ADD PRIMARY KEY (id, created_at)")
    now = datetime(2026, 11, 25, 10, tzinfo=UTC)

    planned = run_job(database, MONTHLY, now, apply=False)
    assert bounds(conn, "orders") == []  # plan changes nothing
    out = run_job(database, MONTHLY, now)
    assert [a.sql for a in planned.actions] == [a.sql for a in out.actions]
    assert actions(out) == [
        ("create_partition", "public.orders_2026_11", True),
        ("create_partition", "public.orders_2026_12", True),
        ("create_partition", "public.orders_2027_01", True),
        ("create_partition", "public.orders_2027_02", True),
    ]
    assert out.actions[0] == Action(
        "create_partition", "public.orders_2026_11",
        'CREATE TABLE "public"."orders_2026_11" (LIKE "public"."orders" INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
        "INCLUDING STORAGE INCLUDING COMMENTS INCLUDING GENERATED INCLUDING COMPRESSION);\n"
        'ALTER TABLE "public"."orders" ATTACH PARTITION "public"."orders_2026_11" FOR VALUES FROM '
        "('2026-11-01 00:00:00+00:00') TO ('2026-12-01 00:00:00+00:00');",
        True,
        {"table": "public.orders", "range": "[2026-11-01 00:00:00+00:00, 2026-12-01 00:00:00+00:00)", "interval": "monthly"},
    )
    assert out.errors == [] and out.findings == []
    assert samples(out) == {
        ("partition_premade", "public.orders"): 3.0,
        ("partition_premake_target", "public.orders"): 3.0,
        ("partition_runway_warn", "public.orders"): 3.0,
        ("partition_default_rows", "public.orders"): 0.0,
        ("partition_runway_seconds", "public.orders"): (datetime(2027, 3, 1, tzinfo=UTC) - now).total_seconds(),
    }
    assert bounds(conn, "orders")[0] == (
        "orders_2026_11", "FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-12-01 00:00:00+00')")
    # The partition has the parent's shape: defaults, checks, comments, and the PK on ATTACH.
    conn.execute("INSERT INTO orders (note, amount) VALUES ('x', 1)")
    assert conn.execute("SELECT col_description('orders_2026_12'::regclass, 3)").fetchone()[0] == "free text"
    assert conn.execute("SELECT count(*) FROM pg_index WHERE indrelid = 'orders_2027_01'::regclass AND indisprimary").fetchone()[0] == 1

    again = run_job(database, MONTHLY, now)
    assert (again.actions, again.findings, again.errors) == ([], [], [])
    assert samples(again) == samples(out)


def test_plan_reports_low_runway_and_changes_nothing(conn: psycopg.Connection, database: str) -> None:
    conn.execute("CREATE TABLE low (ts timestamptz NOT NULL) PARTITION BY RANGE (ts)")
    conn.execute("CREATE TABLE low_cur PARTITION OF low FOR VALUES FROM ('2026-11-01+00') TO ('2026-12-01+00')")
    now = datetime(2026, 11, 25, tzinfo=UTC)
    yaml = "        - table: public.low\n          interval: monthly\n          premake: 2\n"
    out = run_job(database, yaml, now, apply=False)
    assert actions(out) == [("create_partition", "public.low_2026_12", False), ("create_partition", "public.low_2027_01", False)]
    assert out.findings == [Finding(
        "partition_runway_low", "public.low", 0,
        "public.low: only 0 partitions are ready after the current one (want 2); see this run's errors or "
        "findings for what stopped pgupkeep from creating more",
        {"table": "public.low", "premade": 0, "want": 2, "runway_seconds": 6 * 86400.0},
    )]
    assert bounds(conn, "low") == [("low_cur", "FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-12-01 00:00:00+00')")]


def create_parent(conn: psycopg.Connection, name: str, key_type: str = "timestamptz") -> None:
    conn.execute(f"CREATE TABLE {name} (id bigint, k {key_type} NOT NULL, v text) PARTITION BY RANGE (k)")


CALENDAR_CASES = [
    # interval, key type, now, premake, expected (name suffix, bound expression read in UTC)
    ("daily", "timestamptz", datetime(2026, 3, 28, 12, tzinfo=BERLIN), 2, [
        ("2026_03_28", "FROM ('2026-03-27 23:00:00+00') TO ('2026-03-28 23:00:00+00')"),
        ("2026_03_29", "FROM ('2026-03-28 23:00:00+00') TO ('2026-03-29 22:00:00+00')"),
        ("2026_03_30", "FROM ('2026-03-29 22:00:00+00') TO ('2026-03-30 22:00:00+00')")]),
    ("daily", "timestamptz", datetime(2026, 10, 24, 12, tzinfo=BERLIN), 1, [
        ("2026_10_24", "FROM ('2026-10-23 22:00:00+00') TO ('2026-10-24 22:00:00+00')"),
        ("2026_10_25", "FROM ('2026-10-24 22:00:00+00') TO ('2026-10-25 23:00:00+00')")]),
    # Autumn: the wall clock shows 02:00 twice; both hours get a partition, neither twice.
    ("hourly", "timestamptz", datetime(2026, 10, 25, 0, 30, tzinfo=UTC), 3, [
        ("2026_10_25_02", "FROM ('2026-10-25 00:00:00+00') TO ('2026-10-25 01:00:00+00')"),
        ("2026_10_25_02_2", "FROM ('2026-10-25 01:00:00+00') TO ('2026-10-25 02:00:00+00')"),
        ("2026_10_25_03", "FROM ('2026-10-25 02:00:00+00') TO ('2026-10-25 03:00:00+00')"),
        ("2026_10_25_04", "FROM ('2026-10-25 03:00:00+00') TO ('2026-10-25 04:00:00+00')")]),
    # Spring: 02:00 does not exist; 01:00 is followed by 03:00 with no hole.
    ("hourly", "timestamptz", datetime(2026, 3, 29, 0, 30, tzinfo=UTC), 1, [
        ("2026_03_29_01", "FROM ('2026-03-29 00:00:00+00') TO ('2026-03-29 01:00:00+00')"),
        ("2026_03_29_03", "FROM ('2026-03-29 01:00:00+00') TO ('2026-03-29 02:00:00+00')")]),
    ("hourly", "timestamp", datetime(2026, 12, 31, 23, 30, tzinfo=BERLIN), 1, [
        ("2026_12_31_23", "FROM ('2026-12-31 23:00:00') TO ('2027-01-01 00:00:00')"),
        ("2027_01_01_00", "FROM ('2027-01-01 00:00:00') TO ('2027-01-01 01:00:00')")]),
    ("daily", "date", datetime(2028, 2, 28, 23, 30, tzinfo=BERLIN), 2, [
        ("2028_02_28", "FROM ('2028-02-28') TO ('2028-02-29')"),
        ("2028_02_29", "FROM ('2028-02-29') TO ('2028-03-01')"),
        ("2028_03_01", "FROM ('2028-03-01') TO ('2028-03-02')")]),
    ("weekly", "timestamp", datetime(2026, 12, 30, tzinfo=BERLIN), 1, [
        ("2026_w53", "FROM ('2026-12-28 00:00:00') TO ('2027-01-04 00:00:00')"),
        ("2027_w01", "FROM ('2027-01-04 00:00:00') TO ('2027-01-11 00:00:00')")]),
    ("monthly", "timestamptz", datetime(2028, 1, 31, 23, 30, tzinfo=BERLIN), 1, [
        ("2028_01", "FROM ('2027-12-31 23:00:00+00') TO ('2028-01-31 23:00:00+00')"),
        ("2028_02", "FROM ('2028-01-31 23:00:00+00') TO ('2028-02-29 23:00:00+00')")]),
    ("quarterly", "date", datetime(2026, 12, 31, 23, 30, tzinfo=BERLIN), 1, [
        ("2026_q4", "FROM ('2026-10-01') TO ('2027-01-01')"),
        ("2027_q1", "FROM ('2027-01-01') TO ('2027-04-01')")]),
    # 23:30 UTC on New Year's Eve is already 2027 in Berlin.
    ("yearly", "timestamptz", datetime(2026, 12, 31, 23, 30, tzinfo=UTC), 1, [
        ("2027", "FROM ('2026-12-31 23:00:00+00') TO ('2027-12-31 23:00:00+00')"),
        ("2028", "FROM ('2027-12-31 23:00:00+00') TO ('2028-12-31 23:00:00+00')")]),
]


@pytest.mark.parametrize("interval,key_type,now,premake,expected", CALENDAR_CASES)
def test_calendar_in_berlin(conn: psycopg.Connection, database: str, interval, key_type, now, premake, expected) -> None:
    name = f"cal_{interval}_{key_type}_{now:%Y%m%d%H}"
    create_parent(conn, name, key_type)
    yaml = f"        - table: public.{name}\n          interval: {interval}\n          premake: {premake}\n"
    out = run_job(database, yaml, now, timezone="Europe/Berlin")
    assert out.errors == [] and out.findings == []
    assert bounds(conn, name) == [(f"{name}_{s}", f"FOR VALUES {b}") for s, b in expected]
    assert run_job(database, yaml, now, timezone="Europe/Berlin").actions == []


def test_integer_interval_counts_from_max_key(conn: psycopg.Connection, database: str) -> None:
    create_parent(conn, "ints", "bigint")
    conn.execute("CREATE TABLE ints_low PARTITION OF ints FOR VALUES FROM (0) TO (1000)")
    conn.execute("CREATE TABLE ints_mid PARTITION OF ints FOR VALUES FROM (1000) TO (2000)")
    conn.execute("CREATE TABLE ints_def PARTITION OF ints DEFAULT")
    conn.execute("INSERT INTO ints (k) VALUES (5), (1500), (99999999)")  # the stray one sits in the default
    yaml = "        - table: public.ints\n          interval: 1000\n          premake: 2\n          retention: 500\n"
    out = run_job(database, yaml, datetime(2026, 1, 1, tzinfo=UTC))
    assert actions(out) == [
        ("create_partition", "public.ints_2000", True),
        ("create_partition", "public.ints_3000", True),
        ("detach_partition", "public.ints_low", True),
    ]
    assert out.actions[2].sql == ('COMMENT ON TABLE "public"."ints_low" ' + mark("ints", "detach")
                                  + 'ALTER TABLE "public"."ints" DETACH PARTITION "public"."ints_low";')
    assert out.errors == []
    assert out.findings == [Finding(
        "default_partition_rows", "public.ints", 1,
        "public.ints: 1 rows sit in the default partition public.ints_def, outside any range pgupkeep is "
        "about to create; create partitions for them and move them out",
        {"table": "public.ints", "conflict": False, "range": None, "resolution": None,
         "default_partition": "public.ints_def"},
    )]
    assert samples(out) == {
        ("partition_premade", "public.ints"): 2.0, ("partition_premake_target", "public.ints"): 2.0,
        ("partition_runway_warn", "public.ints"): 2.0, ("partition_default_rows", "public.ints"): 1.0,
        ("partition_runway_values", "public.ints"): 2500.0,  # from the max key 1500 to 4000, where ints_3000 ends
        ("partitions_detached", "public.ints"): 1.0,
    }
    assert bounds(conn, "ints") == [
        ("ints_2000", "FOR VALUES FROM ('2000') TO ('3000')"),
        ("ints_3000", "FOR VALUES FROM ('3000') TO ('4000')"),
        ("ints_def", "DEFAULT"),
        ("ints_mid", "FOR VALUES FROM ('1000') TO ('2000')"),
    ]


def test_bounds_not_names(conn: psycopg.Connection, database: str) -> None:
    create_parent(conn, "bnn")
    conn.execute("CREATE TABLE bnn_by_hand PARTITION OF bnn FOR VALUES FROM ('2026-11-01+00') TO ('2026-12-01+00')")
    conn.execute("CREATE TABLE other_tool_name PARTITION OF bnn FOR VALUES FROM ('2026-12-01+00') TO ('2027-01-01+00')")
    conn.execute("CREATE TABLE bnn_2027_01 (x int)")  # the spec name is taken by an unrelated table
    conn.execute("CREATE TABLE bnn_2027_02 PARTITION OF bnn FOR VALUES FROM ('2026-03-01+00') TO ('2026-04-01+00')")
    out = run_job(database, "        - table: public.bnn\n          interval: monthly\n", datetime(2026, 11, 2, tzinfo=UTC))
    assert actions(out) == [
        ("create_partition", "public.bnn_2027_01_2", True),
        ("create_partition", "public.bnn_2027_02_2", True),
    ]
    kinds = sorted(f.kind for f in out.findings)
    assert kinds == ["partition_gap"]  # the old March one is followed by a hole until November
    assert out.findings[0].detail["range"] == "[2026-04-01 00:00:00+00:00, 2026-11-01 00:00:00+00:00)"
    assert out.errors == []


def test_gap_and_overlap_are_reported_not_fixed(conn: psycopg.Connection, database: str) -> None:
    create_parent(conn, "go")
    conn.execute("CREATE TABLE go_a PARTITION OF go FOR VALUES FROM ('2026-10-01+00') TO ('2026-11-01+00')")
    conn.execute("CREATE TABLE go_b PARTITION OF go FOR VALUES FROM ('2026-11-10+00') TO ('2026-12-15+00')")
    out = run_job(database, "        - table: public.go\n          interval: monthly\n          premake: 2\n",
                  datetime(2026, 11, 20, tzinfo=UTC), apply=False)
    assert actions(out) == [("create_partition", "public.go_2027_01", False)]
    assert [(f.kind, f.detail.get("range")) for f in out.findings] == [
        ("partition_gap", "[2026-11-01 00:00:00+00:00, 2026-11-10 00:00:00+00:00)"),
        ("partition_overlap", "[2026-11-01 00:00:00+00:00, 2026-12-01 00:00:00+00:00)"),
        ("partition_overlap", "[2026-12-01 00:00:00+00:00, 2027-01-01 00:00:00+00:00)"),
        ("partition_runway_low", None),
    ]
    assert out.findings[1].message == (
        "public.go: the monthly range [2026-11-01 00:00:00+00:00, 2026-12-01 00:00:00+00:00) is partly covered by "
        "public.go_b; pgupkeep will not create an overlapping partition: align those bounds to the interval by hand")
    assert samples(out)[("partition_premade", "public.go")] == 0.0
    assert samples(out)[("partition_runway_seconds", "public.go")] == 25 * 86400.0


def test_bad_input_fails_only_that_table(conn: psycopg.Connection, database: str) -> None:
    conn.execute("CREATE TABLE plain (k timestamptz)")
    conn.execute("CREATE TABLE bylist (k int) PARTITION BY LIST (k)")
    conn.execute("CREATE TABLE byhash (k int) PARTITION BY HASH (k)")
    conn.execute("CREATE TABLE intkey (k int) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE tskey (k timestamptz) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE datekey (k date) PARTITION BY RANGE (k)")
    conn.execute("CREATE TABLE exprkey (k int) PARTITION BY RANGE ((k + 1))")
    conn.execute("CREATE TABLE good (k timestamptz) PARTITION BY RANGE (k)")
    yaml = "".join(f"        - table: public.{n}\n          interval: {i}\n          premake: 0\n" for n, i in [
        ("missing", "daily"), ("plain", "daily"), ("bylist", "daily"), ("byhash", "daily"), ("intkey", "monthly"),
        ("tskey", 100), ("datekey", "hourly"), ("exprkey", "daily"), ("good", "daily")])
    out = run_job(database, yaml, datetime(2026, 5, 5, tzinfo=UTC))
    assert out.errors == [
        ItemError("public.missing", "public.missing: table does not exist; create it PARTITION BY RANGE or remove it from the policy"),
        ItemError("public.plain", "public.plain: is not a partitioned table; recreate it PARTITION BY RANGE (<key>) or remove it from the policy"),
        ItemError("public.bylist", "public.bylist: is partitioned by list, pgupkeep manages only PARTITION BY RANGE tables; remove it from the policy"),
        ItemError("public.byhash", "public.byhash: is partitioned by hash, pgupkeep manages only PARTITION BY RANGE tables; remove it from the policy"),
        ItemError("public.intkey", "public.intkey: interval monthly needs a time key but the partition key has type int4; use an integer width"),
        ItemError("public.tskey", "public.tskey: interval 100 is an integer width but the partition key has type timestamptz; use a time interval such as monthly"),
        ItemError("public.datekey", "public.datekey: interval hourly needs a timestamp or timestamptz key, the partition key has type date; use daily or longer"),
        ItemError("public.exprkey", "public.exprkey: the partition key must be a single column (not an expression or several columns); remove it from the policy"),
    ]
    assert actions(out) == [("create_partition", "public.good_2026_05_05", True)]


def _default_table(conn: psycopg.Connection, name: str) -> None:
    create_parent(conn, name)
    conn.execute(f"CREATE TABLE {name}_cur PARTITION OF {name} FOR VALUES FROM ('2026-11-01+00') TO ('2026-12-01+00')")
    conn.execute(f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT")
    # 12 rows in December (the range about to be created), 1 row in 1999 (no range of ours)
    conn.execute(f"INSERT INTO {name} (id, k, v) SELECT g, '2026-12-01+00'::timestamptz + g * interval '1 hour', 'r' || g "
                 "FROM generate_series(1, 12) g")
    conn.execute(f"INSERT INTO {name} (id, k, v) VALUES (0, '1999-01-01+00', 'old')")


def _default_yaml(name: str, mode: str) -> str:
    return f"        - table: public.{name}\n          interval: monthly\n          premake: 2\n          on_default_conflict: {mode}\n"


NOV = datetime(2026, 11, 20, tzinfo=UTC)
DEC_RANGE = "[2026-12-01 00:00:00+00:00, 2027-01-01 00:00:00+00:00)"


def test_default_conflict_fail_withholds_only_the_conflicting_range(conn: psycopg.Connection, database: str) -> None:
    _default_table(conn, "dfail")
    yaml = _default_yaml("dfail", "fail").replace("premake: 2", "premake: 4")
    out = run_job(database, yaml, NOV)
    message = (f"public.dfail: 12 rows in the default partition public.dfail_default fall in {DEC_RANGE}, the range of "
               "new partition public.dfail_2026_12; move them out, or set on_default_conflict: move (or skip)")
    assert out.errors == [ItemError("public.dfail", message)]
    # December is withheld; the months after it are not.
    assert actions(out) == [("create_partition", f"public.dfail_2027_{m}", True) for m in ("01", "02", "03")]
    assert out.findings[0] == Finding("default_partition_rows", "public.dfail", 12, message, {
        "table": "public.dfail", "conflict": True, "range": DEC_RANGE, "resolution": "fail",
        "default_partition": "public.dfail_default", "partition": "public.dfail_2026_12"})
    assert [f.kind for f in out.findings] == ["default_partition_rows", "partition_runway_low"]
    assert samples(out)[("partition_default_rows", "public.dfail")] == 13.0
    # The hole at December is the conflict's, reported as such, not as a gap to fill by hand.
    again = run_job(database, yaml, NOV)
    assert (again.actions, again.errors) == ([], [ItemError("public.dfail", message)])
    assert [f.kind for f in again.findings] == ["default_partition_rows", "partition_runway_low"]
    conn.execute("DELETE FROM dfail_default WHERE k >= '2026-12-01+00'")  # the operator moves the rows out
    fixed = run_job(database, yaml, NOV)
    assert (actions(fixed), fixed.errors) == ([("create_partition", "public.dfail_2026_12", True)], [])
    assert [(f.kind, f.value, f.detail["conflict"]) for f in fixed.findings] == [("default_partition_rows", 1, False)]  # 1999's
    assert samples(fixed)[("partition_premade", "public.dfail")] == 4.0


def test_default_conflict_skip(conn: psycopg.Connection, database: str) -> None:
    _default_table(conn, "dskip")
    out = run_job(database, _default_yaml("dskip", "skip"), NOV)
    assert out.errors == []
    assert actions(out) == [("create_partition", "public.dskip_2027_01", True)]
    assert [(f.kind, f.value, f.detail.get("resolution")) for f in out.findings] == [
        ("default_partition_rows", 12, "skip"), ("partition_runway_low", 0, None)]
    assert samples(out)[("partition_default_rows", "public.dskip")] == 13.0


def test_default_conflict_move_keeps_rows_visible(conn: psycopg.Connection, database: str) -> None:
    _default_table(conn, "dmove")
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        with psycopg.connect(database, autocommit=True) as r:
            while not stop.is_set():
                seen.append(r.execute("SELECT count(*) FROM dmove").fetchone()[0])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        planned = run_job(database, _default_yaml("dmove", "move"), NOV, apply=False)
        out = run_job(database, _default_yaml("dmove", "move"), NOV)
    finally:
        stop.set()
        thread.join()
    assert [a.sql for a in planned.actions] == [a.sql for a in out.actions]
    assert actions(out) == [("move_default_rows", "public.dmove_2026_12", True), ("create_partition", "public.dmove_2027_01", True)]
    assert out.actions[0].sql == (
        'CREATE TABLE "public"."dmove_2026_12" (LIKE "public"."dmove" INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
        "INCLUDING STORAGE INCLUDING COMMENTS INCLUDING GENERATED INCLUDING COMPRESSION);\n"
        'ALTER TABLE "public"."dmove_2026_12" ADD CONSTRAINT "dmove_2026_12_bounds" CHECK ("k" IS NOT NULL AND '
        "\"k\" >= '2026-12-01 00:00:00+00:00' AND \"k\" < '2027-01-01 00:00:00+00:00');\n"
        'WITH moved AS (DELETE FROM "public"."dmove_default" WHERE "k" >= \'2026-12-01 00:00:00+00:00\' AND '
        "\"k\" < '2027-01-01 00:00:00+00:00' RETURNING \"id\", \"k\", \"v\") INSERT INTO \"public\".\"dmove_2026_12\" "
        '("id", "k", "v") SELECT "id", "k", "v" FROM moved;\n'
        'ALTER TABLE "public"."dmove" ATTACH PARTITION "public"."dmove_2026_12" FOR VALUES FROM '
        "('2026-12-01 00:00:00+00:00') TO ('2027-01-01 00:00:00+00:00');\n"
        'ALTER TABLE "public"."dmove_2026_12" DROP CONSTRAINT "dmove_2026_12_bounds";'
    )
    assert out.actions[0].detail == {"table": "public.dmove", "range": DEC_RANGE, "interval": "monthly",
                                     "rows": 12, "partition": "public.dmove_2026_12"}
    assert out.errors == []
    assert [(f.kind, f.value, f.detail.get("resolution")) for f in out.findings] == [("default_partition_rows", 12, "move")]
    assert samples(out)[("partition_default_rows", "public.dmove")] == 1.0
    assert samples(out)[("partition_premade", "public.dmove")] == 2.0
    assert conn.execute("SELECT count(*) FROM dmove_2026_12").fetchone()[0] == 12
    assert conn.execute("SELECT count(*) FROM dmove_default").fetchone()[0] == 1
    assert set(seen) == {13}  # a reader never saw a row go missing
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conrelid = 'dmove_2026_12'::regclass AND contype = 'c'").fetchone()[0] == 0


def _history(conn: psycopg.Connection, name: str, default: bool = False) -> None:
    create_parent(conn, name)
    for month in range(6, 13):
        conn.execute(f"CREATE TABLE {name}_{month:02d} PARTITION OF {name} FOR VALUES FROM ('2026-{month:02d}-01+00') "
                     f"TO ('{'2027-01' if month == 12 else f'2026-{month + 1:02d}'}-01+00')")
    conn.execute(f"CREATE TABLE {name}_min PARTITION OF {name} FOR VALUES FROM (MINVALUE) TO ('2026-06-01+00')")
    if default:
        conn.execute(f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT")


def _retention_yaml(name: str, action: str = "detach") -> str:
    return (f"        - table: public.{name}\n          interval: monthly\n          premake: 1\n"
            f"          retention: 2 months\n          retention_action: {action}\n")


def test_retention_detach_concurrently(conn: psycopg.Connection, database: str) -> None:
    _history(conn, "rc")
    out = run_job(database, _retention_yaml("rc"), NOV)  # cutoff 2026-09-20: June..August are old
    assert actions(out) == [("detach_partition", f"public.rc_{m}", True) for m in ("min", "06", "07", "08")]
    assert out.actions[1].sql == ('COMMENT ON TABLE "public"."rc_06" ' + mark("rc", "detach")
                                  + 'ALTER TABLE "public"."rc" DETACH PARTITION "public"."rc_06" CONCURRENTLY;')
    assert out.actions[1].detail == {"table": "public.rc", "range": "[2026-06-01 00:00:00+00:00, 2026-07-01 00:00:00+00:00)",
                                     "retention": "2 months", "mode": "concurrent"}
    assert (out.errors, out.findings) == ([], [])
    assert [n for n, _ in bounds(conn, "rc")] == ["rc_09", "rc_10", "rc_11", "rc_12"]
    assert conn.execute("SELECT to_regclass('rc_06') IS NOT NULL").fetchone()[0]  # detached, kept
    assert run_job(database, _retention_yaml("rc"), NOV).actions == []


def test_retention_plain_detach_with_default_and_drop(conn: psycopg.Connection, database: str) -> None:
    _history(conn, "rp", default=True)
    out = run_job(database, _retention_yaml("rp", "drop"), NOV)
    assert actions(out) == [("drop_partition", f"public.rp_{m}", True) for m in ("min", "06", "07", "08")]
    assert out.actions[1].sql == ('COMMENT ON TABLE "public"."rp_06" ' + mark("rp", "drop")
                                  + 'ALTER TABLE "public"."rp" DETACH PARTITION "public"."rp_06";\n'
                                  'DROP TABLE "public"."rp_06";')
    assert out.actions[1].detail["mode"] == "plain"
    assert out.errors == []
    assert conn.execute("SELECT to_regclass('rp_06') IS NULL").fetchone()[0]
    assert [n for n, _ in bounds(conn, "rp")] == ["rp_09", "rp_10", "rp_11", "rp_12", "rp_default"]


def _retire_with_a_reader_at_drop(database: str, name: str, leaves: bool) -> tuple[JobOutput, int]:
    """Retention (drop) where a reader takes the first old partition right after its DETACH has
    committed and before its DROP; with `leaves`, the reader is gone by the first retry."""
    target = _target(database, _retention_yaml(name, "drop"))
    with psycopg.connect(database) as holder, db.connect(target) as c:
        execute, arrived = c.execute, []

        def execute_with_reader(query, *args, **kwargs):  # noqa: ANN001, ANN202
            text = query.as_string(c) if hasattr(query, "as_string") else str(query)
            if text.startswith("DROP TABLE") and not arrived:  # the first DROP only
                arrived.append(text)
                holder.execute(f"SELECT count(*) FROM {text.removeprefix('DROP TABLE ')}")
            return execute(query, *args, **kwargs)

        c.execute = execute_with_reader  # type: ignore[method-assign]
        ctx = JobContext(target=target, section=target.partitions, conn=c, now=NOV, timezone=ZoneInfo("UTC"),
                         sleep=lambda s: holder.rollback() if leaves else None)
        out = execute_job(partitions.KIND, ctx)
        pid = holder.info.backend_pid
        holder.rollback()
    return out, pid


def test_a_drop_retried_after_its_detach_committed_resumes_at_the_drop(conn: psycopg.Connection, database: str) -> None:
    _history(conn, "rd")
    out, _ = _retire_with_a_reader_at_drop(database, "rd", leaves=True)
    assert out.errors == []
    assert actions(out) == [("drop_partition", f"public.rd_{m}", True) for m in ("min", "06", "07", "08")]
    assert [f.kind for f in out.findings] == ["lock_timeout"]  # the DROP waited once, then went through
    assert [n for n, _ in bounds(conn, "rd")] == ["rd_09", "rd_10", "rd_11", "rd_12"]
    assert conn.execute("SELECT to_regclass('rd_min') IS NULL").fetchone()[0]


def test_a_drop_that_gives_up_after_its_detach_is_finished_by_the_next_run(conn: psycopg.Connection, database: str) -> None:
    _history(conn, "re")
    out, pid = _retire_with_a_reader_at_drop(database, "re", leaves=False)
    assert len(out.errors) == 1
    message = out.errors[0].message
    assert message.startswith("public.re: public.re_min was detached but not dropped: ")
    assert f"blocked by pids [{pid}]" in message
    assert message.endswith("; it is marked as being retired and the next run drops it (finish_retirement)")
    assert actions(out) == [("drop_partition", "public.re_min", False)]  # the table's next steps wait for the next run
    assert conn.execute("SELECT relispartition FROM pg_class WHERE oid = 're_min'::regclass").fetchone()[0] is False
    assert samples(out)[("partitions_detached", "public.re")] == 1.0  # not dropped yet: counted
    again = run_job(database, _retention_yaml("re", "drop"), NOV)
    assert actions(again) == [("finish_retirement", "public.re_min", True)] + [
        ("drop_partition", f"public.re_{m}", True) for m in ("06", "07", "08")]
    assert again.actions[0].sql == 'DROP TABLE "public"."re_min";'
    assert again.actions[0].detail == {"table": "public.re", "state": "detached", "retention_action": "drop"}
    assert again.errors == []
    assert samples(again)[("partitions_detached", "public.re")] == 0.0
    assert conn.execute("SELECT to_regclass('re_min') IS NULL").fetchone()[0]


def test_retention_finishes_a_half_done_detach(conn: psycopg.Connection, database: str) -> None:
    _history(conn, "rf")
    leave_detach_pending(database, "rf", "rf_07")
    assert conn.execute("SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = 'rf_07'::regclass").fetchone()[0]
    out = run_job(database, _retention_yaml("rf", "drop"), NOV)
    assert actions(out) == [("drop_partition", f"public.rf_{m}", True) for m in ("07", "min", "06", "08")]
    assert out.actions[0].sql == ('COMMENT ON TABLE "public"."rf_07" ' + mark("rf", "drop")
                                  + 'ALTER TABLE "public"."rf" DETACH PARTITION "public"."rf_07" FINALIZE;\n'
                                  'DROP TABLE "public"."rf_07";')
    assert out.errors == []
    assert [n for n, _ in bounds(conn, "rf")] == ["rf_09", "rf_10", "rf_11", "rf_12"]


def test_retention_refused_when_referenced(conn: psycopg.Connection, database: str) -> None:
    _history(conn, "rr")
    conn.execute("ALTER TABLE rr ADD PRIMARY KEY (id, k)")
    conn.execute("CREATE TABLE rr_ref (id bigint, k timestamptz, FOREIGN KEY (id, k) REFERENCES rr)")
    out = run_job(database, _retention_yaml("rr"), NOV)
    assert out.errors == [ItemError("public.rr", (
        "public.rr: a foreign key references this table, so retiring partitions would break it or fail; "
        "retention is refused: drop the foreign key or remove retention from the policy"))]
    assert out.actions == []
    assert len(bounds(conn, "rr")) == 8


def test_lock_wait_is_bounded_and_others_go_on(conn: psycopg.Connection, database: str) -> None:
    create_parent(conn, "lk")
    conn.execute("CREATE TABLE lk_cur PARTITION OF lk FOR VALUES FROM ('2026-11-01+00') TO ('2026-12-01+00')")
    conn.execute("CREATE TABLE lk_default PARTITION OF lk DEFAULT")
    create_parent(conn, "lk_free")
    waits: list[float] = []
    stop = threading.Event()

    def inserter() -> None:  # the application, writing rows that land in the default partition
        with psycopg.connect(database, autocommit=True) as w:
            while not stop.is_set():
                t0 = time.monotonic()
                w.execute("INSERT INTO lk (k) VALUES ('1999-01-01+00')")
                waits.append(time.monotonic() - t0)
                time.sleep(0.01)

    yaml = ("        - table: public.lk\n          interval: monthly\n          premake: 1\n"
            "        - table: public.lk_free\n          interval: monthly\n          premake: 0\n")
    with psycopg.connect(database) as holder:
        holder.execute("SELECT count(*) FROM lk_default")  # an open transaction keeps ACCESS SHARE
        holder_pid = holder.info.backend_pid
        thread = threading.Thread(target=inserter)
        thread.start()
        try:
            time.sleep(0.1)
            started = time.monotonic()
            out = run_job(database, yaml, NOV, session="    lock_timeout: 200ms\n    lock_retries: 2\n", sleep=time.sleep)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            thread.join()
        holder.rollback()
    assert [e.object for e in out.errors] == ["public.lk"]
    message = out.errors[0].message
    assert message.startswith("public.lk: create partition public.lk_2026_12 failed: public.lk, public.lk_default: "
                              "could not get a lock within lock_timeout 0.2s after 3 attempts; blocked by pids [")
    assert str(holder_pid) in message
    assert actions(out) == [("create_partition", "public.lk_2026_12", False), ("create_partition", "public.lk_free_2026_11", True)]
    timeouts = [f for f in out.findings if f.kind == "lock_timeout"]
    assert [f.value for f in timeouts] == [1, 2, 3]
    assert all(holder_pid in f.detail["blocking_pids"] for f in timeouts)
    assert 0.6 <= elapsed < 5
    assert len(waits) > 5
    assert max(waits) < 0.2 + 0.25  # no insert waited much longer than lock_timeout


def test_two_hundred_tables_in_one_target(conn: psycopg.Connection, database: str) -> None:
    conn.execute("CREATE SCHEMA many")
    conn.execute("DO $$ BEGIN FOR i IN 1..200 LOOP EXECUTE format("
                 "'CREATE TABLE many.t%s (id bigint, k timestamptz NOT NULL) PARTITION BY RANGE (k)', i); END LOOP; END $$")
    yaml = "".join(f"        - table: many.t{i}\n          interval: monthly\n          premake: 1\n" for i in range(1, 201))
    out = run_job(database, yaml, NOV)
    assert (out.errors, out.findings) == ([], [])
    assert actions(out) == [("create_partition", f"many.t{i}_{m}", True) for i in range(1, 201) for m in ("2026_11", "2026_12")]
    assert len(out.samples) == 5 * 200 and {s.value for s in out.samples if s.metric == "partition_premade"} == {1.0}
    again = run_job(database, yaml, NOV)
    assert (again.actions, again.errors, again.findings) == ([], [], [])
    assert conn.execute("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent "
                        "WHERE c.relnamespace = 'many'::regnamespace").fetchone()[0] == 400


LOCKED_SESSION = "    lock_timeout: 200ms\n    lock_retries: 1\n"


def _locked_pair(conn: psycopg.Connection, a: str, b: str) -> str:
    _default_table(conn, a)  # a default partition holding rows, so its size matters
    create_parent(conn, b)
    conn.execute(f"CREATE TABLE {b}_default PARTITION OF {b} DEFAULT")
    return (f"        - table: public.{a}\n          interval: monthly\n          premake: 1\n"
            f"        - table: public.{b}\n          interval: monthly\n          premake: 1\n")


def test_locked_default_partition_fails_only_that_table(conn: psycopg.Connection, database: str) -> None:
    yaml = _locked_pair(conn, "la", "lb")
    with psycopg.connect(database) as holder:
        holder.execute("LOCK TABLE la_default IN ACCESS EXCLUSIVE MODE")  # held in an open transaction
        holder_pid = holder.info.backend_pid
        started = time.monotonic()
        out = run_job(database, yaml, NOV, session=LOCKED_SESSION, sleep=time.sleep)
        elapsed = time.monotonic() - started
        holder.rollback()
    assert out.errors == [ItemError("public.la", (
        f"public.la: an ACCESS EXCLUSIVE lock on public.la_default is held by pids [{holder_pid}]; pgupkeep does not "
        "wait behind it (it must read the default partition first): the table is skipped and retried on the next run; "
        "see pg_stat_activity for those sessions"))]
    assert actions(out) == [("create_partition", "public.lb_2026_11", True), ("create_partition", "public.lb_2026_12", True)]
    assert out.findings == [Finding(
        "partition_runway_low", "public.la", 0,
        "public.la: only 0 partitions are ready after the current one (want 1); see this run's errors or findings "
        "for what stopped pgupkeep from creating more",
        {"table": "public.la", "premade": 0, "want": 1, "runway_seconds": (datetime(2026, 12, 1, tzinfo=UTC) - NOV).total_seconds()})]
    # The locked table's premade and runway are still known from the catalog; its default rows are not.
    assert samples(out) == {
        ("partition_premade", "public.la"): 0.0,
        ("partition_premake_target", "public.la"): 1.0,
        ("partition_runway_warn", "public.la"): 1.0,
        ("partition_runway_seconds", "public.la"): (datetime(2026, 12, 1, tzinfo=UTC) - NOV).total_seconds(),
        ("partition_premade", "public.lb"): 1.0,
        ("partition_premake_target", "public.lb"): 1.0,
        ("partition_runway_warn", "public.lb"): 1.0,
        ("partition_default_rows", "public.lb"): 0.0,
        ("partition_runway_seconds", "public.lb"): (datetime(2027, 1, 1, tzinfo=UTC) - NOV).total_seconds(),
    }
    assert elapsed < 3


def _target(dsn: str, tables_yaml: str, session: str = LOCKED_SESSION) -> Target:
    text = (f"version: 1\ntargets:\n  - name: t\n    dsn: \"${{DSN}}\"\n{session}"
            f"    partitions:\n      tables:\n{tables_yaml}")
    return parse_policy(text, environ={"DSN": dsn}).targets[0]


def test_lock_taken_after_the_catalog_read_fails_only_that_table(conn: psycopg.Connection, database: str) -> None:
    # The lock comes between the catalog read and the counts, too late for pg_locks to show it:
    # the shared statement waits out lock_timeout, and the tables are then read one by one.
    yaml = _locked_pair(conn, "pa", "pb")
    conn.execute("INSERT INTO pb (id, k) VALUES (1, '1999-01-01+00')")  # so pb's default is counted too
    target = _target(database, yaml)
    with db.connect(target) as c, psycopg.connect(database) as holder:
        tables = read_catalog(c, target.partitions.tables)
        for t in tables:
            plan_table(t, NOV, ZoneInfo("UTC"))
        holder.execute("LOCK TABLE pa_default IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        probe_defaults(c, tables)
        elapsed = time.monotonic() - started
        holder_pid = holder.info.backend_pid
        holder.rollback()
    a, b = tables
    assert a.blocked == (
        f"public.pa: reading the default partition waited out lock_timeout: an ACCESS EXCLUSIVE lock on "
        f"public.pa_default is held by pids [{holder_pid}]; the table is skipped and retried on the next run; "
        "see pg_stat_activity for those sessions")
    assert (a.default_rows, a.conflicts) == (0, {})  # not counted, so nothing is planned over its rows
    assert (b.blocked, b.default_rows, b.conflicts) == (None, 1, {})
    assert elapsed < 1.5  # two waits of lock_timeout 200ms


def test_integer_max_key_read_behind_a_lock_fails_only_that_table(conn: psycopg.Connection, database: str) -> None:
    for name in ("ia", "ib"):
        create_parent(conn, name, "bigint")
        conn.execute(f"CREATE TABLE {name}_0 PARTITION OF {name} FOR VALUES FROM (0) TO (100)")
        conn.execute(f"INSERT INTO {name} (id, k) VALUES (1, 42)")
    yaml = "".join(f"        - table: public.{n}\n          interval: 100\n          premake: 1\n" for n in ("ia", "ib"))
    target = _target(database, yaml)
    with db.connect(target) as c, psycopg.connect(database) as holder:
        tables = read_catalog(c, target.partitions.tables)
        holder.execute("LOCK TABLE ONLY ia_0 IN ACCESS EXCLUSIVE MODE")
        read_integer_bases(c, tables)
        holder_pid = holder.info.backend_pid
        holder.rollback()
    assert [(t.blocked, t.base) for t in tables] == [
        (f"public.ia: reading the current max key waited out lock_timeout: an ACCESS EXCLUSIVE lock on public.ia_0 "
         f"is held by pids [{holder_pid}]; the table is skipped and retried on the next run; "
         "see pg_stat_activity for those sessions", None),
        (None, 42),
    ]


def test_locks_seen_in_the_catalog_skip_only_reads_they_block(conn: psycopg.Connection, database: str) -> None:
    # An integer table's max key reads every partition: a lock on any of them (here LOCK TABLE on
    # the parent, which locks every partition too) is in the way. A time table reads only its
    # default partition: a lock on an old partition stops nothing but that partition's retirement.
    create_parent(conn, "ic", "bigint")
    for lo in (0, 100, 200, 300):
        conn.execute(f"CREATE TABLE ic_{lo} PARTITION OF ic FOR VALUES FROM ({lo}) TO ({lo + 100})")
    create_parent(conn, "tc")
    conn.execute("CREATE TABLE tc_old PARTITION OF tc FOR VALUES FROM ('2025-01-01+00') TO ('2025-02-01+00')")
    yaml = ("        - table: public.ic\n          interval: 100\n          premake: 1\n"
            "        - table: public.tc\n          interval: monthly\n          premake: 1\n")
    with psycopg.connect(database) as holder:
        holder.execute("LOCK TABLE ic, tc_old IN ACCESS EXCLUSIVE MODE")
        out = run_job(database, yaml, NOV, session=LOCKED_SESSION, sleep=time.sleep)
        holder_pid = holder.info.backend_pid
        holder.rollback()
    assert out.errors == [ItemError("public.ic", (
        f"public.ic: ACCESS EXCLUSIVE locks on public.ic, public.ic_0, public.ic_100 and 2 more are held by pids "
        f"[{holder_pid}]; pgupkeep does not wait behind it (it must read the current max key first): the table is "
        "skipped and retried on the next run; see pg_stat_activity for those sessions"))]
    assert actions(out) == [("create_partition", "public.tc_2026_11", True), ("create_partition", "public.tc_2026_12", True)]
    assert [s.labels["table"] for s in out.samples] == ["public.tc"] * 5  # ic's max key, so its runway, is unknown


def test_rows_arriving_after_the_count_fail_attach_for_that_table_only(conn: psycopg.Connection, database: str) -> None:
    # The default partition was empty (0 bytes, not counted) when read; a row for December lands
    # there before the DDL. ATTACH re-checks the default partition under its lock and refuses.
    create_parent(conn, "sa")
    conn.execute("CREATE TABLE sa_default PARTITION OF sa DEFAULT")
    create_parent(conn, "sb")
    yaml = "".join(f"        - table: public.{n}\n          interval: monthly\n          premake: 1\n" for n in ("sa", "sb"))
    target = _target(database, yaml)
    with db.connect(target) as c:
        ctx = JobContext(target=target, section=target.partitions, conn=c, now=NOV, timezone=ZoneInfo("UTC"))
        tables = read_catalog(c, target.partitions.tables)
        assert tables[0].default_bytes == 0
        conn.execute("INSERT INTO sa (id, k) VALUES (1, '2026-12-05+00')")
        for t in tables:
            plan_table(t, NOV, ctx.timezone)
        assign_names(c, tables)
        outs = []
        for t in tables:
            p = Plan()
            partitions.table_steps(ctx, t, p)
            outs.append(JobOutput())
            apply_plan(p, outs[-1], Fence(threading.Event()))
    assert outs[0].errors == [ItemError("public.sa", (
        'public.sa: create partition public.sa_2026_12 failed: updated partition constraint for default partition '
        '"sa_default" would be violated by some row; rows in its range reached the default partition after '
        "pgupkeep counted them: the next run counts again and applies on_default_conflict"))]
    assert actions(outs[0]) == [("create_partition", "public.sa_2026_11", True), ("create_partition", "public.sa_2026_12", False)]
    assert (outs[1].errors, actions(outs[1])) == ([], [("create_partition", "public.sb_2026_11", True),
                                                       ("create_partition", "public.sb_2026_12", True)])
    assert conn.execute("SELECT to_regclass('sa_2026_12') IS NULL").fetchone()[0]  # rolled back whole
    assert conn.execute("SELECT count(*) FROM sa_default").fetchone()[0] == 1
    # The next run counts the row and applies on_default_conflict (fail).
    again = run_job(database, yaml, NOV)
    assert [e.message.split(";")[0] for e in again.errors] == [
        "public.sa: 1 rows in the default partition public.sa_default fall in "
        f"{DEC_RANGE}, the range of new partition public.sa_2026_12"]
