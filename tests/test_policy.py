"""Policy loading: the example policy, each kind of problem with its line and path, env expansion,
defaults merging, schedules and time zones; garbage never crashes the loader."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgupkeep.policy import PolicyError, load_policy, parse_policy
from pgupkeep.schedules import parse_schedule
from pgupkeep.units import (
    QualifiedName,
    Retention,
    parse_qualified_name,
    parse_retention,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent
ENV = {"SHOP_DATABASE_URL": "postgresql://u@h/shop", "DSN": "postgresql://u@h/db"}


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as err:
        parse_policy(textwrap.dedent(text), "policy.yaml", ENV if environ is None else environ)
    return [str(p) for p in err.value.problems]


def test_example_policy_is_valid_and_covers_every_section():
    policy = load_policy(REPO / "config" / "policy.yaml", environ={})
    shop = policy.target("shop")
    assert shop.job_kinds() == (
        "partitions", "materialized_views", "long_running_queries", "bloat", "health", "query_insights", "sql",
    )  # fmt: skip
    assert [(j.name, str(j.schedule), j.transaction) for j in shop.sql.jobs] == [
        ("purge_sessions", "*/10 * * * *", True), ("analyze_events", "@daily", True), ("vacuum_events", "30 3 * * 0", False),
    ]  # fmt: skip
    assert policy.daemon.history is not None and str(policy.daemon.history.table) == "pgupkeep.job_runs"
    assert shop.partitions.tables[0].table == QualifiedName("public", "orders")
    assert shop.partitions.tables[0].retention == Retention(months=24, text="24 months")
    assert shop.partitions.tables[1].interval == 1_000_000
    assert shop.lock_timeout == timedelta(seconds=1)  # the target's override
    assert shop.statement_timeout == timedelta(minutes=15)  # from defaults
    assert shop.bloat.min_table_size == 10 * 1024**2
    assert policy.target("analytics").job_kinds() == ()


def test_every_problem_is_reported_with_file_line_column_and_path():
    found = problems(
        """\
        version: 1
        daemon:
          timezone: Mars/Base
          colour: blue
        targets:
          - name: shop
            dsn: "${DSN}"
            partitions:
              tables:
                - table: public.orders
                  interval: fortnightly
                - table: orders
                  interval: monthly
        """
    )
    assert found == [
        "policy.yaml:3:3: daemon.timezone: unknown time zone 'Mars/Base'; use an IANA name such as Europe/Berlin",
        "policy.yaml:4:3: daemon.colour: unknown key",
        "policy.yaml:11:11: targets[0].partitions.tables[0].interval: must be one of hourly, daily, weekly, "
        "monthly, quarterly, yearly or a positive integer",
        "policy.yaml:12:11: targets[0].partitions.tables[1].table: must be a schema-qualified name such as "
        'public.orders (quote parts with "" if needed)',
    ]


def test_cross_key_problems_are_reported_alongside_the_others():
    found = problems(
        """\
        version: 1
        targets:
          - name: a
            dsn: "${DSN}"
            lock_timeout: soon
            partitions:
              schedule: "every 500ms"
              tables:
                - {table: public.t, interval: daily, retention: 30}
                - {table: public.t, interval: daily}
            materialized_views:
              views: [{view: r.v}, {view: r.v}]
            long_running_queries: {cancel_after: 10m, terminate_after: 1m}
          - name: a
            dsn: "${DSN}"
        """
    )
    assert found == [
        "policy.yaml:5:5: targets[0].lock_timeout: must be a duration such as 500ms, 30s, 5m, 2h or 1d",
        "policy.yaml:7:7: targets[0].partitions.schedule: must not fire more often than every second",
        "policy.yaml:9:46: targets[0].partitions.tables[0].retention: time intervals take a time retention such as 90 days or 24 months",
        "policy.yaml:10:12: targets[0].partitions.tables[1].table: duplicate table public.t (also tables[0])",
        "policy.yaml:12:29: targets[0].materialized_views.views[1].view: duplicate view r.v (also views[0])",
        "policy.yaml:13:47: targets[0].long_running_queries.terminate_after: must not be shorter than cancel_after "
        "(a session is cancelled before it is terminated)",
        "policy.yaml:14:5: targets[1].name: duplicate target name 'a' (also targets[0])",
    ]


def test_missing_and_duplicate_keys():
    found = problems(
        """\
        version: 1
        targets:
          - name: a
            name: b
          - dsn: "host=x"
        """
    )
    assert "policy.yaml:4:5: targets[0].name: duplicate key" in found
    assert "policy.yaml:3:5: targets[0].dsn: is required" in found
    assert "policy.yaml:5:5: targets[1].name: is required" in found


def test_version_is_required_and_must_be_1():
    assert problems("targets: []\n") == ["policy.yaml:1:1: version: is required"]
    assert problems("version: 2\n") == ["policy.yaml:1:1: version: must be one of 1"]


def test_env_expansion_with_defaults_and_unset_variables():
    text = """\
    version: 1
    daemon: {listen: "${LISTEN:-127.0.0.1:9999}", log_level: "${LEVEL}"}
    targets:
      - {name: a, dsn: "host=${HOST} dbname=x", lock_retries: "${RETRIES:-7}"}
    """
    policy = parse_policy(textwrap.dedent(text), environ={"HOST": "db1", "LEVEL": "debug"})
    assert policy.daemon.listen == "127.0.0.1:9999"
    assert policy.daemon.log_level == "debug"
    assert policy.targets[0].dsn == "host=db1 dbname=x"
    assert policy.targets[0].lock_retries == 7
    found = problems(text, environ={"LEVEL": "info"})
    assert found == [
        "policy.yaml:4:15: targets[0].dsn: environment variable HOST is not set (write ${HOST:-default} to give a default)"
    ]


def test_a_password_never_appears_in_an_error():
    found = problems(
        """\
        version: 1
        targets:
          - name: a
            dsn: "host=x password=hunter2 =broken"
        """
    )
    assert found == ["policy.yaml:4:5: targets[0].dsn: is not a valid libpq connection URI or key=value string"]
    assert not any("hunter2" in p for p in found)


def test_defaults_are_merged_under_each_target_and_overridable():
    policy = parse_policy(
        textwrap.dedent(
            """\
            version: 1
            defaults: {lock_timeout: 3s, lock_retries: 9, connect_timeout: 2s}
            targets:
              - {name: a, dsn: "host=a"}
              - {name: b, dsn: "host=b", lock_timeout: 250ms}
            """
        )
    )
    a, b = policy.targets
    assert (a.lock_timeout, a.lock_retries, a.connect_timeout) == (timedelta(seconds=3), 9, timedelta(seconds=2))
    assert (b.lock_timeout, b.lock_retries) == (timedelta(milliseconds=250), 9)
    assert b.session.statement_timeout == timedelta(minutes=15)
    assert b.session.idle_in_transaction_session_timeout == timedelta(minutes=1)


def test_timezone_and_policy_are_frozen():
    policy = parse_policy("version: 1\ndaemon: {timezone: Europe/Berlin}\n")
    assert policy.daemon.zone == ZoneInfo("Europe/Berlin")
    with pytest.raises(Exception, match="frozen"):
        policy.daemon.timezone = "UTC"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cron", "after", "expected"),
    [
        # cron's 0 and 7 are Sunday (APScheduler's 0 is Monday): 2026-11-25 is a Wednesday.
        ("0 3 * * 0", datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 29, 3, tzinfo=UTC)),
        ("0 3 * * 7", datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 29, 3, tzinfo=UTC)),
        ("0 3 * * 1-5", datetime(2026, 11, 28, tzinfo=UTC), datetime(2026, 11, 30, 3, tzinfo=UTC)),
        ("0 3 * * fri", datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 27, 3, tzinfo=UTC)),
        ("15 * * * *", datetime(2026, 11, 25, 10, 20, tzinfo=UTC), datetime(2026, 11, 25, 11, 15, tzinfo=UTC)),
        # Day of month and day of week both restricted: cron runs when either matches.
        ("0 0 1 * 1", datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC)),
        ("0 0 1 * 1", datetime(2026, 11, 30, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
    ],
)
def test_cron_schedules_use_crons_weekday_numbers(cron, after, expected):
    trigger = parse_schedule(cron).trigger(UTC)
    assert trigger.get_next_fire_time(None, after) == expected


def test_cron_schedules_follow_the_policy_timezone_across_dst():
    berlin = ZoneInfo("Europe/Berlin")
    trigger = parse_schedule("30 2 * * *").trigger(berlin)
    # 2027-03-28 has no 02:30 in Berlin (clocks jump 02:00 -> 03:00): the run moves, it is not lost.
    after = datetime(2027, 3, 27, 3, 0, tzinfo=berlin)
    nxt = trigger.get_next_fire_time(None, after)
    assert nxt is not None and nxt.date().isoformat() in ("2027-03-28", "2027-03-29")
    assert trigger.get_next_fire_time(None, datetime(2027, 1, 10, 12, tzinfo=berlin)) == datetime(
        2027, 1, 11, 2, 30, tzinfo=berlin
    )


def test_interval_schedules():
    schedule = parse_schedule("every 30s")
    assert schedule.every == timedelta(seconds=30)
    start = datetime(2026, 11, 25, 12, tzinfo=UTC)
    trigger = schedule.trigger(UTC)
    first = trigger.get_next_fire_time(None, start)
    assert trigger.get_next_fire_time(first, first) - first == timedelta(seconds=30)
    for bad in ("every 0s", "every 999ms", "every", "every day", "* * * *", "61 * * * *", "0 0 * * 8"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_small_languages():
    assert parse_size("10MB") == 10 * 1024**2 and parse_size("1GB") == 1024**3 and parse_size(512) == 512
    assert parse_retention("2 years") == Retention(months=24, text="2 years")
    assert parse_retention("90 days") == Retention(days=90, text="90 days")
    assert parse_retention(5000).integer == 5000
    assert parse_qualified_name('"My Schema"."Orders.2026"') == QualifiedName("My Schema", "Orders.2026")
    assert parse_qualified_name("Public.Orders") == QualifiedName("public", "orders")
    for bad in ("orders", "a.b.c", "a.", '"a.b', "", "a." + "x" * 64):
        with pytest.raises(ValueError):
            parse_qualified_name(bad)


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
policy_like = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 2, "1", None])},
    optional={
        "daemon": yaml_values,
        "defaults": yaml_values,
        "targets": st.lists(
            st.dictionaries(
                st.sampled_from(["name", "dsn", "partitions", "health", "bloat", "lock_timeout", "x"]),
                yaml_values,
                max_size=5,
            ),
            max_size=3,
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_garbage_text_never_crashes_the_loader(text):
    try:
        parse_policy(text, "g.yaml", {})
    except PolicyError as exc:
        assert exc.problems and all(str(p).startswith("g.yaml:") for p in exc.problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_like)
def test_garbage_structures_never_crash_the_loader(doc):
    import yaml

    text = yaml.safe_dump(doc, allow_unicode=True)
    try:
        parse_policy(text, "g.yaml", {})
    except PolicyError as exc:
        assert exc.problems and all(str(p).startswith("g.yaml:") for p in exc.problems)
