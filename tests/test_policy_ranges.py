"""A policy that cannot lie: every duration and size is one PostgreSQL and the scheduler accept,
0 means what PostgreSQL means or is refused, aliases cannot explode, DSNs are checked at `check`,
misspelled keys get a suggestion and cron macros work.

Accepted values are handed to a real PostgreSQL: what `check` passes, the server takes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgupkeep import db
from pgupkeep.policy import PolicyError, parse_policy
from pgupkeep.schedules import parse_schedule
from pgupkeep.units import BIGINT_MAX, PG_INT_MAX, pg_milliseconds, split_listen

REPO = Path(__file__).resolve().parent.parent
UNITS = ("ms", "s", "m", "h", "d", "w")
PG_TIMEOUTS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")


def policy(defaults: str = "", target: str = "", daemon: str = "", dsn: str = "postgresql://u@h/db") -> str:
    return textwrap.dedent(
        f"""\
        version: 1
        daemon: {{{daemon}}}
        defaults: {{{defaults}}}
        targets:
          - {{name: shop, dsn: "{dsn}", {target}}}
        """
    )


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    """Each problem as "p.yaml:LINE: path: message" (columns are checked by test_policy.py)."""
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml", environ or {})
    assert all(p.column >= 1 for p in err.value.problems)
    return [f"{p.file}:{p.line}: {p.path}: {p.message}" if p.path else f"{p.file}:{p.line}: {p.message}" for p in err.value.problems]


# Numbers as a person might write them: 0, small, huge, decimals.
numbers = st.one_of(
    st.integers(min_value=0, max_value=10**15).map(str),
    st.integers(min_value=0, max_value=10**40).map(str),
    st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 10**6), st.integers(0, 10**4)),
    st.sampled_from(["0", "0.0", "0.0001", "0.5", "2147483647", "2147483648", "99999999999", "24.855134814"]),
)
durations = st.builds(lambda n, u: f"{n}{u}", numbers, st.sampled_from(UNITS))


@pytest.fixture(scope="module")
def pg(database: str):
    with psycopg.connect(database, autocommit=True) as conn:
        yield conn


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(PG_TIMEOUTS), text=durations)
def test_an_accepted_timeout_is_one_postgresql_accepts_and_0_means_no_limit(pg, key: str, text: str) -> None:
    try:
        parsed = parse_policy(policy(defaults=f"{key}: {text}"), "p.yaml", {})
    except PolicyError as exc:
        # Refused: located at the key, saying why (never a crash, never a silent clamp).
        [problem] = exc.problems
        assert problem.path == f"defaults.{key}" and problem.line == 3, problem
        assert "at most 2147483647ms" in problem.message or "at least 1ms" in problem.message or "at most 3650d" in problem.message
        return
    value = getattr(parsed.target("shop").session, key)
    millis = pg_milliseconds(value)
    if value == timedelta(0):
        assert millis == "0"  # PostgreSQL's "no limit", never 1ms
    else:
        assert 1 <= int(millis) <= PG_INT_MAX
    pg.execute("SELECT set_config(%s, %s, false)", (key, millis))
    assert pg.execute("SELECT current_setting(%s)", (key,)).fetchone()[0] == _shown(int(millis))


def _shown(ms: int) -> str:
    """How PostgreSQL shows a millisecond GUC: in the largest unit that divides it."""
    if ms == 0:
        return "0"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


sizes = st.one_of(
    st.integers(min_value=-5, max_value=2**70),
    st.builds(lambda n, u: f"{n}{u}", numbers, st.sampled_from(["b", "B", "kB", "MB", "GB", "TB", "KiB", "GiB", "TiB"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(size=sizes)
def test_an_accepted_size_fits_a_bigint_and_the_rest_is_refused_with_its_place(pg, size: object) -> None:
    text = policy(target=f"bloat: {{min_table_size: {size}}}")
    try:
        parsed = parse_policy(text, "p.yaml", {})
    except PolicyError as exc:
        [problem] = exc.problems
        assert problem.path == "targets[0].bloat.min_table_size" and problem.line == 5, problem
        return
    value = parsed.target("shop").bloat.min_table_size
    assert 0 <= value <= BIGINT_MAX
    assert pg.execute("SELECT %s::bigint", (value,)).fetchone()[0] == value


@settings(max_examples=200, deadline=None)
@given(text=durations)
def test_every_duration_key_refuses_or_accepts_but_never_crashes(text: str) -> None:
    doc = policy(
        daemon=f"shutdown_grace: {text}, jitter: {text}, misfire_grace: {text}",
        defaults=f"connect_timeout: {text}",
        target=(
            f"long_running_queries: {{schedule: 'every {text}', warn_after: {text}, cancel_after: {text}}}, "
            f"materialized_views: {{views: [{{view: a.b, timeout: {text}}}]}}, "
            f"bloat: {{exact_time_budget: {text}, vacuum_timeout: {text}}}"
        ),
    )
    try:
        parsed = parse_policy(doc, "p.yaml", {})
    except PolicyError as exc:
        assert all(p.path and p.line > 1 for p in exc.problems), exc.problems
        return
    # Whatever was accepted, the scheduler can fire and the clock arithmetic holds.
    now = datetime.now(UTC)
    schedule = parsed.target("shop").long_running_queries.schedule
    assert schedule.trigger(UTC, parsed.daemon.jitter).get_next_fire_time(None, now) >= now
    assert now + parsed.daemon.shutdown_grace + parsed.daemon.misfire_grace > now


def test_zero_means_no_limit_on_the_server_and_is_refused_where_it_means_nothing(database: str) -> None:
    parsed = parse_policy(
        policy(dsn=database, defaults="statement_timeout: 0s, lock_timeout: 0, idle_in_transaction_session_timeout: 0ms"),
        "p.yaml",
        {},
    )
    with db.connect(parsed.target("shop")) as conn:
        shown = [conn.execute(f"SHOW {key}").fetchone()[0] for key in PG_TIMEOUTS]
    assert shown == ["0", "0", "0"]

    found = problems(
        policy(
            defaults="connect_timeout: 0s",
            target=(
                "long_running_queries: {cancel_after: 0s, warn_after: 0s}, "
                "materialized_views: {views: [{view: a.b, timeout: 0s}]}, bloat: {vacuum_timeout: 0ms}"
            ),
            daemon="misfire_grace: 0s",
        )
    )
    assert found == [
        "p.yaml:2: daemon.misfire_grace: must be more than 0 (at least 1s)",
        "p.yaml:3: defaults.connect_timeout: must be more than 0 (at least 1ms); libpq would wait forever",
        "p.yaml:5: targets[0].long_running_queries.cancel_after: must be more than 0 (at least 1ms); "
        "to turn a check or signal off, leave its key out",
        "p.yaml:5: targets[0].long_running_queries.warn_after: must be more than 0 (at least 1ms); "
        "to turn a check or signal off, leave its key out",
        "p.yaml:5: targets[0].materialized_views.views[0].timeout: must be more than 0 (at least 1ms); "
        "pgupkeep always bounds its own refreshes and VACUUMs",
        "p.yaml:5: targets[0].bloat.vacuum_timeout: must be more than 0 (at least 1ms); "
        "pgupkeep always bounds its own refreshes and VACUUMs",
    ]


def test_the_largest_timeout_postgresql_takes_is_accepted_and_one_more_is_refused(database: str) -> None:
    parsed = parse_policy(policy(dsn=database, defaults="statement_timeout: 2147483647ms"), "p.yaml", {})
    with db.connect(parsed.target("shop")) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "2147483647ms"
    assert problems(policy(defaults="statement_timeout: 30d")) == [
        "p.yaml:3: defaults.statement_timeout: is too long: at most 2147483647ms (about 24.8 days), "
        "PostgreSQL's limit for a timeout; 0 means no limit"
    ]


def run_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "pgupkeep", "check", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip


def test_check_refuses_a_duration_too_long_for_any_clock_with_exit_2(tmp_path: Path) -> None:
    out = run_check(tmp_path, policy(defaults="statement_timeout: 99999999999d", target="lock_timeout: 99999999999d"))
    assert out.returncode == 2, out
    assert out.stderr == ""
    assert out.stdout.splitlines() == [
        f"{tmp_path / 'p.yaml'}:3:12: defaults.statement_timeout: is too long: at most 3650d",
        f"{tmp_path / 'p.yaml'}:5:46: targets[0].lock_timeout: is too long: at most 3650d",
    ]


def test_ranges_of_the_other_numbers() -> None:
    found = problems(
        policy(
            target=(
                "partitions: {tables: [{table: a.b, interval: 9223372036854775808, retention: 1001 years}]}, "
                "bloat: {min_dead_tuples: 9223372036854775808, min_table_size: 9999999999999TB}, "
                "long_running_queries: {schedule: every 3651d}"
            )
        )
    )
    assert [p.split(": ", 2)[1:] for p in found] == [
        ["targets[0].partitions.tables[0].interval", "is too large: at most 9223372036854775807 (PostgreSQL's bigint)"],
        ["targets[0].partitions.tables[0].retention", "is too long: at most 1000 years"],
        ["targets[0].bloat.min_dead_tuples", "input should be less than or equal to 9223372036854775807"],
        ["targets[0].bloat.min_table_size", "is too large: at most 9223372036854775807 bytes (8 EiB, PostgreSQL's bigint)"],
        ["targets[0].long_running_queries.schedule", "the period after 'every' is too long: at most 3650d"],
    ]


# --------------------------------------------------------------------------- YAML aliases

BOMB = textwrap.dedent(
    """\
    version: 1
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    """
)


def test_an_alias_bomb_is_refused_with_its_place_in_under_100ms() -> None:
    parse_policy("version: 1\n", "warm.yaml", {})  # imports and first-use costs are not the bomb's
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        found = problems(BOMB)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.1, f"{best * 1000:.0f} ms"
    assert found == [
        'p.yaml:5: d: aliases expand the document beyond 10000 nodes (nested aliases, a "billion laughs"?); '
        "write the repeated parts out or use fewer levels of aliases"
    ]
    assert problems("version: 1\nx: &x [1, *x]\n") == ["p.yaml:2: x: an alias is used inside its own anchor: the value never ends"]


def test_ordinary_anchors_and_aliases_still_work() -> None:
    text = textwrap.dedent(
        """\
        version: 1
        targets:
          - name: a
            dsn: postgresql://u@h/a
            long_running_queries: &sessions {warn_after: 2m, ignore_users: [replicator]}
            health: &health {schedule: "@hourly"}
          - name: b
            dsn: postgresql://u@h/b
            long_running_queries: *sessions
            health: *health
        """
    )
    parsed = parse_policy(text, "p.yaml", {})
    a, b = parsed.target("a"), parsed.target("b")
    assert a.long_running_queries == b.long_running_queries
    assert b.long_running_queries.warn_after == timedelta(minutes=2)
    assert str(b.health.schedule) == "@hourly"


def test_a_list_as_a_key_is_a_located_problem() -> None:
    assert problems("version: 1\ndaemon:\n  ? [a, b]\n  : 1\n") == [
        "p.yaml:3: daemon: a key must be plain text, not a list or mapping"
    ]


# --------------------------------------------------------------------------- keys and DSNs


def test_a_misspelled_key_gets_a_suggestion() -> None:
    found = problems(
        policy(
            daemon="lisen: ':9188'",
            target="lock_timout: 1s, long_running_queries: {cancel_afer: 1m}, partitions: {tabels: []}, whatever: 1",
        )
    )
    assert [p.split(": ", 1)[1] for p in found] == [
        "daemon.lisen: unknown key; did you mean listen?",
        "targets[0].lock_timout: unknown key; did you mean lock_timeout?",
        "targets[0].long_running_queries.cancel_afer: unknown key; did you mean cancel_after?",
        "targets[0].partitions.tabels: unknown key; did you mean tables?",
        "targets[0].whatever: unknown key",
    ]


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("host=db sslmode=requir", "sslmode 'requir' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
        ("postgresql://u:pw@db/x?sslmode=bogus", "sslmode 'bogus' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
        ("host=db target_session_attrs=readwrite", "target_session_attrs 'readwrite' is not one of any, read-write, read-only, primary, standby, prefer-standby"),
        ("host=db gssencmode=on", "gssencmode 'on' is not one of disable, prefer, require"),
        ("host=db channel_binding=yes", "channel_binding 'yes' is not one of disable, prefer, require"),
        ("host=db load_balance_hosts=roundrobin", "load_balance_hosts 'roundrobin' is not one of disable, random"),
        ("host=db sslmod=require", "has an unknown connection option 'sslmod'; did you mean sslmode?"),
        ("postgresql://db/x?aplication_name=x", "has an unknown connection option 'aplication_name'; did you mean application_name?"),
        ("host=db port=99999", "port '99999' is not a port number (1 to 65535)"),
        ("host=a,b port=1,2,3", "has 3 ports for 2 hosts; give one port, or one for each host"),
        ("host=db connect_timeout=soon", "connect_timeout 'soon' is not a whole number"),
        ("host=db password='s3cret", "is not a valid libpq connection URI or key=value string"),
    ],
)
def test_a_dsn_is_checked_as_libpq_would_at_connect_time_and_never_quotes_a_password(dsn: str, message: str) -> None:
    found = problems(policy(dsn=dsn.replace('"', '\\"')))
    assert found == [f"p.yaml:5: targets[0].dsn: {message}"]
    assert "s3cret" not in found[0] and "pw" not in found[0].split("dsn: ")[1]


def test_a_dsn_from_the_environment_is_checked_after_expansion() -> None:
    text = policy(dsn="${SHOP_DSN}")
    assert problems(text, {"SHOP_DSN": "host=db sslmode=verify_full"}) == [
        "p.yaml:5: targets[0].dsn: sslmode 'verify_full' is not one of disable, allow, prefer, require, verify-ca, verify-full"
    ]
    assert parse_policy(text, "p.yaml", {"SHOP_DSN": "host=db sslmode=verify-full target_session_attrs=read-write"})


def test_an_enumerated_dsn_value_check_agrees_with_libpq(database: str) -> None:
    # The premise: libpq refuses these only when it connects, so `check` is the first to notice.
    with pytest.raises(psycopg.OperationalError, match="sslmode"):
        psycopg.connect(database + " sslmode=requir").close()


# --------------------------------------------------------------------------- schedules and listen


@pytest.mark.parametrize(
    ("macro", "after", "expected"),
    [
        ("@hourly", datetime(2026, 3, 5, 10, 30, tzinfo=UTC), datetime(2026, 3, 5, 11, 0, tzinfo=UTC)),
        ("@daily", datetime(2026, 3, 5, 10, 30, tzinfo=UTC), datetime(2026, 3, 6, 0, 0, tzinfo=UTC)),
        ("@midnight", datetime(2026, 3, 5, 10, 30, tzinfo=UTC), datetime(2026, 3, 6, 0, 0, tzinfo=UTC)),
        ("@weekly", datetime(2026, 3, 5, 10, 30, tzinfo=UTC), datetime(2026, 3, 8, 0, 0, tzinfo=UTC)),  # a Sunday
        ("@monthly", datetime(2026, 3, 5, 10, 30, tzinfo=UTC), datetime(2026, 4, 1, 0, 0, tzinfo=UTC)),
        ("@yearly", datetime(2026, 3, 5, 10, 30, tzinfo=UTC), datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
        ("@annually", datetime(2026, 3, 5, 10, 30, tzinfo=UTC), datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
    ],
)
def test_cron_macros(macro: str, after: datetime, expected: datetime) -> None:
    schedule = parse_schedule(macro)
    assert str(schedule) == macro
    assert schedule.trigger(UTC).get_next_fire_time(None, after) == expected


def test_an_unknown_cron_macro_is_refused() -> None:
    assert problems(policy(target='health: {schedule: "@reboot"}')) == [
        "p.yaml:5: targets[0].health.schedule: unknown cron macro '@reboot'; use one of "
        "@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"
    ]


def test_listen_addresses_check_accepts_exactly_what_the_server_can_bind() -> None:
    for good in ("0.0.0.0:9188", "[::1]:9188", "[::]:9188", ":9188", "localhost:9188", "127.0.0.1:0", "[::ffff:127.0.0.1]:1"):
        assert parse_policy(policy(daemon=f'listen: "{good}"'), "p.yaml", {}).daemon.listen == good
        split_listen(good)
    for bad in ("::1:9188", "[::1]", "999.1.1.1:9188", "[1.2.3.4]:9188", "host_name:9188", "h:65536", "nowhere", "[::1]:-1"):
        [problem] = problems(policy(daemon=f'listen: "{bad}"'))
        assert problem.startswith("p.yaml:2: daemon.listen: "), problem
