"""The materialized_views job against a real PostgreSQL: modes, guard, order, errors, plan."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from daemon_helpers import SECONDS, wait_until
from pgupkeep import db
from pgupkeep.jobs import materialized_views as mv
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.materialized_views import refreshes as mvplan
from pgupkeep.policy import Target, ViewPolicy, parse_policy
from pgupkeep.results import Action, Finding, ItemError, JobOutput
from pgupkeep.runner import execute_job
from pgupkeep.units import QualifiedName

NOW = datetime(2026, 11, 25, tzinfo=UTC)




def target_for(dsn: str, views: list[dict], **session: str | int) -> Target:
    text = json.dumps(
        {
            "version": 1,
            "targets": [
                {
                    "name": "t",
                    "dsn": "${DSN}",
                    "lock_timeout": "200ms",
                    "lock_retries": 1,
                    **session,
                    "materialized_views": {"schedule": "every 15m", "views": views},
                }
            ],
        }
    )
    return parse_policy(text, environ={"DSN": dsn}).targets[0]


def run_job(target: Target, *, apply: bool = True, items: tuple[str, ...] | None = None,
            now: datetime = NOW, memo: dict | None = None) -> JobOutput:
    with db.connect(target) as c:
        ctx = JobContext(
            target=target,
            section=target.materialized_views,
            conn=c,
            now=now,
            memo={} if memo is None else memo,
            timezone=UTC,  # type: ignore[arg-type]
            apply=apply,
            items=items,
            sleep=lambda _s: None,
            connect=lambda **kw: db.connect(target, **kw),
        )
        return execute_job(mv.KIND, ctx)


def refreshed(view: str, mode: str, rows: int | None, *, concurrent_sql: bool | None = None, **extra: object) -> Action:
    name = '"' + '"."'.join(view.split(".")) + '"'
    concurrently = (mode == "concurrent") if concurrent_sql is None else concurrent_sql
    text = f"REFRESH MATERIALIZED VIEW {'CONCURRENTLY ' if concurrently else ''}{name}"
    detail = {"view": view, "mode": mode, "outcome": "success", "duration_seconds": SECONDS, "rows": rows, **extra}
    return Action("refresh_materialized_view", view, text, True, detail)


def failed(view: str, mode: str, *, duration: object = SECONDS) -> Action:
    name = '"' + '"."'.join(view.split(".")) + '"'
    text = f"REFRESH MATERIALIZED VIEW {'CONCURRENTLY ' if mode == 'concurrent' else ''}{name}"
    detail = {"view": view, "mode": mode, "outcome": "failure", "duration_seconds": duration, "rows": None}
    return Action("refresh_materialized_view", view, text, False, detail)


def assert_samples(out: JobOutput, views: list[str]) -> None:
    assert [(s.metric, dict(s.labels)) for s in out.samples] == [
        (metric, {"view": v})
        for v in views
        for metric in ("matview_last_refresh_timestamp_seconds", "matview_refresh_duration_seconds")
    ]
    for s in out.samples:
        if s.metric == "matview_last_refresh_timestamp_seconds":
            assert NOW.timestamp() <= s.value < NOW.timestamp() + 60
        else:
            assert 0 <= s.value < 60


def reltuples(conn: psycopg.Connection, view: str) -> int | None:
    value = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (view,)).fetchone()[0]
    return None if value < 0 else int(value)


def count(conn: psycopg.Connection, view: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*view.split(".")))).fetchone()[0]


@pytest.fixture
def dsn(fresh_database: str) -> Iterator[str]:
    """A fresh database with a base table and a function whose calls can be made slow."""
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("CREATE TABLE public.base (id int PRIMARY KEY, v int)")
        c.execute("INSERT INTO public.base SELECT g, g % 3 FROM generate_series(1, 3) g")
        c.execute("CREATE TABLE public.knob (seconds float8)")
        c.execute("INSERT INTO public.knob VALUES (0)")
        # Schema-qualified: PostgreSQL 17+ runs REFRESH with a safe search_path.
        c.execute(
            "CREATE FUNCTION public.nap(int) RETURNS boolean LANGUAGE plpgsql VOLATILE AS "
            "$$ BEGIN PERFORM pg_sleep((SELECT seconds FROM public.knob)); RETURN true; END $$"
        )
    yield fresh_database


def refresh_running(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgupkeep' "
        "AND state = 'active' AND query LIKE 'REFRESH%%'"
    ).fetchone()
    return row[0] > 0


# --------------------------------------------------------------------------- refreshing


def test_new_rows_appear_after_a_concurrent_refresh(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.totals AS SELECT id, v FROM public.base")
        c.execute("CREATE UNIQUE INDEX ON public.totals (id)")
        c.execute("INSERT INTO public.base VALUES (4, 1), (5, 2)")
        out = run_job(target_for(dsn, [{"view": "public.totals"}]))
        assert count(c, "public.totals") == 5
        rows = reltuples(c, "public.totals")
    assert out.actions == [refreshed("public.totals", "concurrent", rows)]
    assert (out.findings, out.errors) == ([], [])
    assert_samples(out, ["public.totals"])


def test_readers_are_not_blocked_during_a_concurrent_refresh(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.slow AS SELECT id, v FROM public.base WHERE public.nap(id)")
        c.execute("CREATE UNIQUE INDEX ON public.slow (id)")
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        c.execute("UPDATE public.knob SET seconds = 0.4")  # 4 rows: a 1.6 s refresh
        target = target_for(dsn, [{"view": "public.slow"}])
        result: list[JobOutput] = []
        worker = threading.Thread(target=lambda: result.append(run_job(target)))
        worker.start()
        try:
            wait_until(lambda: refresh_running(c), 10, "the refresh to be running", every=0.02)
            # A reader that would give up after 200 ms of lock wait still reads the old rows.
            with psycopg.connect(dsn, autocommit=True, options="-c lock_timeout=200 -c statement_timeout=1000") as reader:
                started = time.monotonic()
                assert count(reader, "public.slow") == 3
                assert time.monotonic() - started < 1
            assert refresh_running(c)  # the read happened while the refresh ran
        finally:
            worker.join()
        assert count(c, "public.slow") == 4
        rows = reltuples(c, "public.slow")
    assert result[0].actions == [refreshed("public.slow", "concurrent", rows)]
    assert result[0].errors == []


@pytest.mark.parametrize(
    "index",
    [
        None,
        "CREATE UNIQUE INDEX ON public.noidx (id) WHERE id > 0",
        "CREATE UNIQUE INDEX ON public.noidx ((id + 0))",
        "CREATE INDEX ON public.noidx (id)",
    ],
    ids=["no-index", "partial", "expression", "not-unique"],
)
def test_required_fails_without_a_usable_unique_index(dsn: str, index: str | None) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.noidx AS SELECT id, v FROM public.base")
        if index:
            c.execute(index)
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        out = run_job(target_for(dsn, [{"view": "public.noidx", "concurrently": "required"}]))
        assert count(c, "public.noidx") == 3  # untouched
    assert out.actions == [failed("public.noidx", "concurrent", duration=0.0)]
    assert out.errors == [
        ItemError(
            "public.noidx",
            "public.noidx: cannot refresh CONCURRENTLY: it has no unique index on plain columns without a "
            "WHERE clause; create one (CREATE UNIQUE INDEX ON public.noidx (<key columns>)); "
            "or set concurrently: preferred to accept a blocking refresh",
        )
    ]
    assert (out.findings, out.samples) == ([], [])


def test_a_failing_view_keeps_reporting_its_last_successful_refresh(dsn: str) -> None:
    # Gauges of a run replace its previous ones: a view that fails must still report when it last
    # refreshed, or PgupkeepMatviewStale could never fire for it.
    with psycopg.connect(dsn, autocommit=True) as c:
        for name in ("mv_ok", "mv_bad"):
            c.execute(f"CREATE MATERIALIZED VIEW public.{name} AS SELECT id, v FROM public.base")
            c.execute(f"CREATE UNIQUE INDEX {name}_id ON public.{name} (id)")
    target = target_for(dsn, [{"view": "public.mv_ok"}, {"view": "public.mv_bad", "concurrently": "required"}])
    memo: dict = {}
    first = run_job(target, memo=memo)
    last = {s.labels["view"]: s.value for s in first.samples if s.metric == "matview_last_refresh_timestamp_seconds"}
    assert sorted(last) == ["public.mv_bad", "public.mv_ok"]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP INDEX public.mv_bad_id")
    later = NOW + timedelta(hours=1)
    second = run_job(target, memo=memo, now=later)
    assert [e.object for e in second.errors] == ["public.mv_bad"]
    again = {s.labels["view"]: s.value for s in second.samples if s.metric == "matview_last_refresh_timestamp_seconds"}
    assert again["public.mv_bad"] == last["public.mv_bad"]  # the first run's, not this one's
    assert again["public.mv_ok"] >= later.timestamp()
    assert [s.labels["view"] for s in second.samples if s.metric == "matview_refresh_duration_seconds"] == [
        "public.mv_ok", "public.mv_bad"]


def test_required_fails_on_a_view_not_populated_and_says_a_plain_refresh_is_needed(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.empty AS SELECT id, v FROM public.base WITH NO DATA")
        c.execute("CREATE UNIQUE INDEX ON public.empty (id)")
        out = run_job(target_for(dsn, [{"view": "public.empty"}]))
        populated = c.execute("SELECT relispopulated FROM pg_class WHERE oid = 'public.empty'::regclass").fetchone()[0]
    assert populated is False
    assert out.actions == [failed("public.empty", "concurrent", duration=0.0)]
    assert out.errors == [
        ItemError(
            "public.empty",
            "public.empty: cannot refresh CONCURRENTLY: the view is not populated yet (created or last refreshed "
            "WITH NO DATA); a plain refresh is the only way to populate it: run REFRESH MATERIALIZED VIEW "
            "public.empty once; or set concurrently: preferred to accept a blocking refresh",
        )
    ]


@pytest.mark.parametrize("case", ["no-index", "not-populated"])
def test_preferred_falls_back_to_a_blocking_refresh_with_the_reason(dsn: str, case: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        if case == "no-index":
            c.execute("CREATE MATERIALIZED VIEW public.pref AS SELECT id, v FROM public.base")
            reason = "cannot refresh concurrently: it has no unique index on plain columns without a WHERE clause"
        else:
            c.execute("CREATE MATERIALIZED VIEW public.pref AS SELECT id, v FROM public.base WITH NO DATA")
            c.execute("CREATE UNIQUE INDEX ON public.pref (id)")
            reason = "cannot refresh concurrently: the view is not populated yet (created or last refreshed WITH NO DATA)"
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        out = run_job(target_for(dsn, [{"view": "public.pref", "concurrently": "preferred"}]))
        assert count(c, "public.pref") == 4
        rows = reltuples(c, "public.pref")
    assert out.actions == [refreshed("public.pref", "blocking", rows, fallback_reason=reason)]
    assert (out.findings, out.errors) == ([], [])
    assert_samples(out, ["public.pref"])


def test_never_refreshes_plainly_even_with_a_unique_index(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.plain AS SELECT id, v FROM public.base")
        c.execute("CREATE UNIQUE INDEX ON public.plain (id)")
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        out = run_job(target_for(dsn, [{"view": "public.plain", "concurrently": "never"}]))
        assert count(c, "public.plain") == 4
    # A plain refresh rebuilds the indexes, which refreshes the catalog's row estimate.
    assert out.actions == [refreshed("public.plain", "blocking", 4)]
    assert (out.findings, out.errors) == ([], [])


# --------------------------------------------------------------------------- never stack up


def test_a_refresh_overlapping_a_running_one_is_skipped(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.slow AS SELECT id, v FROM public.base WHERE public.nap(id)")
        c.execute("CREATE UNIQUE INDEX ON public.slow (id)")
        c.execute("UPDATE public.knob SET seconds = 0.3")
        target = target_for(dsn, [{"view": "public.slow"}])
        first: list[JobOutput] = []
        worker = threading.Thread(target=lambda: first.append(run_job(target)))
        worker.start()
        try:
            wait_until(lambda: refresh_running(c), 10, "the refresh to be running", every=0.02)
            started = time.monotonic()
            second = run_job(target)
            assert time.monotonic() - started < 0.5  # skipped at once, not queued behind the lock
        finally:
            worker.join()
        rows = reltuples(c, "public.slow")
    assert first[0].actions == [refreshed("public.slow", "concurrent", rows)]
    assert second == JobOutput(
        findings=[
            Finding(
                "matview_refresh_skipped",
                "public.slow",
                None,
                "public.slow: another session is refreshing it (refresh guard held); skipped this run, "
                "the next scheduled run refreshes it",
                {"view": "public.slow", "reason": "refresh_in_progress"},
            )
        ]
    )


def test_the_guard_held_by_another_session_skips_the_view_but_not_others(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.a AS SELECT id, v FROM public.base")
        c.execute("CREATE MATERIALIZED VIEW public.b AS SELECT id, v FROM public.base")
        oid = c.execute("SELECT 'public.a'::regclass::oid::bigint").fetchone()[0]
        with psycopg.connect(dsn, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (mvplan.guard_key(oid),))
            out = run_job(target_for(dsn, [{"view": "public.a", "concurrently": "never"}, {"view": "public.b", "concurrently": "never"}]))
            # The guard of b was released after its refresh; a's is still the other session's only.
            held = c.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
            assert held == [(other.info.backend_pid,)]
        rows = reltuples(c, "public.b")
    assert [f.kind for f in out.findings] == ["matview_refresh_skipped"]
    assert out.findings[0].object == "public.a"
    assert out.actions == [refreshed("public.b", "blocking", rows)]
    assert out.errors == []


def test_guard_keys_are_distinct_per_view_and_fit_a_bigint() -> None:
    keys = {mvplan.guard_key(oid) for oid in (0, 1, 16384, 2**32 - 1)}
    assert len(keys) == 4
    assert all(-(2**63) <= k < 2**63 for k in keys)


# --------------------------------------------------------------------------- dependencies


def test_views_that_read_other_views_are_refreshed_after_them(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.inner_mv AS SELECT id, v FROM public.base")
        c.execute("CREATE MATERIALIZED VIEW public.outer_mv AS SELECT count(*) AS n FROM public.inner_mv")
        c.execute("CREATE VIEW public.bridge AS SELECT id FROM public.inner_mv")
        c.execute("CREATE MATERIALIZED VIEW public.via_view AS SELECT count(*) AS n FROM public.bridge")
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        views = [
            {"view": "public.outer_mv", "concurrently": "never"},
            {"view": "public.via_view", "concurrently": "never"},
            {"view": "public.inner_mv", "concurrently": "never"},
        ]
        out = run_job(target_for(dsn, views))
        counts = [c.execute(f"SELECT n FROM public.{v}").fetchone()[0] for v in ("outer_mv", "via_view")]
        rows = {v: reltuples(c, v) for v in ("public.inner_mv", "public.outer_mv", "public.via_view")}
    assert counts == [4, 4]  # they read the refreshed inner view, so it went first
    assert out.actions == [
        refreshed("public.inner_mv", "blocking", rows["public.inner_mv"]),
        refreshed("public.outer_mv", "blocking", rows["public.outer_mv"]),
        refreshed("public.via_view", "blocking", rows["public.via_view"]),
    ]
    assert out.errors == []


def test_dependency_order_is_pure_and_keeps_policy_order_otherwise() -> None:
    a, b, c, d = (QualifiedName("s", n) for n in "abcd")
    assert mvplan.dependency_order([a, b, c, d], {a: {c}, c: {d}}) == [b, d, c, a]
    assert mvplan.dependency_order([a, b], {}) == [a, b]
    assert mvplan.dependency_order([a, b], {a: {QualifiedName("s", "not_due")}}) == [a, b]


def test_only_the_due_items_are_refreshed(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.a AS SELECT id, v FROM public.base")
        c.execute("CREATE MATERIALIZED VIEW public.b AS SELECT id, v FROM public.base")
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        target = target_for(dsn, [{"view": "public.a", "concurrently": "never"}, {"view": "public.b", "concurrently": "never", "schedule": "every 1h"}])
        out = run_job(target, items=("public.b",))
        assert (count(c, "public.a"), count(c, "public.b")) == (3, 4)
    assert out.actions == [refreshed("public.b", "blocking", None)]


# --------------------------------------------------------------------------- errors


def test_a_missing_view_fails_alone(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.ok AS SELECT id, v FROM public.base")
        c.execute("CREATE UNIQUE INDEX ON public.ok (id)")
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        out = run_job(target_for(dsn, [{"view": "public.nope"}, {"view": "nowhere.nope", "concurrently": "never"}, {"view": "public.ok"}]))
        assert count(c, "public.ok") == 4
        rows = reltuples(c, "public.ok")
    assert out.actions == [
        failed("public.nope", "concurrent", duration=0.0),
        failed("nowhere.nope", "blocking", duration=0.0),
        refreshed("public.ok", "concurrent", rows),
    ]
    assert out.errors == [
        ItemError("public.nope", "public.nope: materialized view does not exist; create it or remove it from the policy"),
        ItemError("nowhere.nope", "nowhere.nope: materialized view does not exist; create it or remove it from the policy"),
    ]
    assert_samples(out, ["public.ok"])


def test_a_table_named_as_a_view_is_reported(dsn: str) -> None:
    out = run_job(target_for(dsn, [{"view": "public.base", "concurrently": "never"}]))
    assert out.errors == [ItemError("public.base", "public.base: is a table, not a materialized view; fix the name in the policy")]
    assert out.actions == [failed("public.base", "blocking", duration=0.0)]


def test_duplicate_rows_and_unique_violations_get_actionable_messages(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE public.pairs (a int, b int)")
        c.execute("INSERT INTO public.pairs VALUES (1, 1)")
        c.execute("CREATE MATERIALIZED VIEW public.dups AS SELECT a, b FROM public.pairs")
        c.execute("CREATE UNIQUE INDEX ON public.dups (a)")
        c.execute("CREATE MATERIALIZED VIEW public.keys AS SELECT a, b FROM public.pairs")
        c.execute("CREATE UNIQUE INDEX keys_a ON public.keys (a)")
        c.execute("INSERT INTO public.pairs VALUES (1, 1)")  # a duplicate row: fails dups (concurrently)
        out = run_job(target_for(dsn, [{"view": "public.dups"}, {"view": "public.keys", "concurrently": "never"}]))
    assert out.actions == [failed("public.dups", "concurrent"), failed("public.keys", "blocking")]
    assert out.errors == [
        ItemError(
            "public.dups",
            "public.dups: the new data contains duplicate rows without any null column, which a concurrent refresh "
            "cannot apply; make the view's rows distinct (SELECT DISTINCT or a key column) or set concurrently: never",
        ),
        ItemError(
            "public.keys",
            "public.keys: the new data violates unique index keys_a (duplicate key); fix the view's query so the key "
            "is unique, or change the index",
        ),
    ]
    assert out.samples == []


def test_a_role_that_does_not_own_the_view_is_told_how_to_fix_it(dsn: str, pg_server) -> None:
    role = f"mv_reader_{secrets.token_hex(3)}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        try:
            c.execute("CREATE MATERIALIZED VIEW public.owned AS SELECT id, v FROM public.base")
            c.execute(sql.SQL("GRANT SELECT ON public.owned TO {}").format(sql.Identifier(role)))
            owner = c.execute("SELECT current_user").fetchone()[0]
            out = run_job(target_for(make_conninfo(dsn, options=f"-c role={role}"), [{"view": "public.owned", "concurrently": "never"}]))
            # The message for a refresh that PostgreSQL itself refused (the catalog changed since).
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                c.execute("REFRESH MATERIALIZED VIEW public.owned")
            c.execute("RESET ROLE")
        finally:
            c.execute("DROP MATERIALIZED VIEW IF EXISTS public.owned")
            c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    maintain = f", or GRANT MAINTAIN ON public.owned TO {role}" if pg_server.version_num >= 170000 else ""
    assert out.errors == [
        ItemError(
            "public.owned",
            f"public.owned: permission denied: role {role} does not own the view (owner: {owner}); "
            f"ALTER MATERIALIZED VIEW public.owned OWNER TO {role}, or connect as {owner}{maintain}",
        )
    ]
    assert out.actions == [failed("public.owned", "blocking", duration=0.0)]
    policy = ViewPolicy(view=QualifiedName("public", "owned"))
    message = mv.error_message(policy.view, refused.value, policy, "blocking")
    assert message.startswith("public.owned: permission denied (")
    assert message.endswith("); the session's role must own the view: ALTER MATERIALIZED VIEW public.owned OWNER TO <pgupkeep's role>")


def test_a_lock_held_too_long_fails_the_view_with_the_blocking_pid(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.locked AS SELECT id, v FROM public.base")
        c.execute("CREATE UNIQUE INDEX ON public.locked (id)")
        with psycopg.connect(dsn) as holder:  # a transaction holding a conflicting lock
            holder.execute("REFRESH MATERIALIZED VIEW public.locked")  # holds ACCESS EXCLUSIVE until rollback
            pid = holder.info.backend_pid
            out = run_job(target_for(dsn, [{"view": "public.locked"}]))
            holder.rollback()
    assert out.actions == [failed("public.locked", "concurrent")]
    assert out.errors == [
        ItemError(
            "public.locked",
            f"public.locked: could not get a lock within lock_timeout 0.2s after 2 attempts; blocked by pids [{pid}] "
            "(see pg_stat_activity; raise lock_timeout/lock_retries or retry later)",
        )
    ]
    text = 'REFRESH MATERIALIZED VIEW CONCURRENTLY "public"."locked"'
    assert out.findings == [
        Finding(
            "lock_timeout",
            "public.locked",
            attempt,
            f"public.locked: lock not granted within lock_timeout (attempt {attempt}); blocked by pids [{pid}]",
            {"blocking_pids": [pid], "attempt": attempt, "sql": text},
        )
        for attempt in (1, 2)
    ]


def test_the_views_timeout_bounds_the_whole_refresh(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.slow AS SELECT id, v FROM public.base WHERE public.nap(id)")
        c.execute("UPDATE public.knob SET seconds = 1")
        started = time.monotonic()
        out = run_job(target_for(dsn, [{"view": "public.slow", "concurrently": "never", "timeout": "300ms"}]))
        assert time.monotonic() - started < 2
        # Lock retries stop at the view's timeout too: 10 retries of 200 ms would take over 2 s.
        with psycopg.connect(dsn) as holder:
            holder.execute("SELECT count(*) FROM public.knob, public.slow")  # ACCESS SHARE, held until rollback
            started = time.monotonic()
            target = target_for(dsn, [{"view": "public.slow", "concurrently": "never", "timeout": "500ms"}], lock_retries=10)
            with db.connect(target) as conn:
                ctx = JobContext(
                    target=target, section=target.materialized_views, conn=conn, now=NOW, timezone=UTC,  # type: ignore[arg-type]
                    connect=lambda **kw: db.connect(target, **kw), sleep=time.sleep,
                )
                locked = execute_job(mv.KIND, ctx)
            assert time.monotonic() - started < 1.5
            holder.rollback()
    assert out.actions == [failed("public.slow", "blocking")]
    assert out.errors == [
        ItemError("public.slow", "public.slow: refresh did not finish within the view's timeout 300ms; raise timeout or make the view's query faster")
    ]
    assert locked.actions == [failed("public.slow", "blocking")]
    assert locked.errors == [
        ItemError(
            "public.slow",
            "public.slow: its lock was not granted within the view's timeout 500ms; see the lock_timeout findings "
            "for the blocking pids, then retry or raise timeout",
        )
    ]
    assert {f.kind for f in locked.findings} == {"lock_timeout"}


# --------------------------------------------------------------------------- plan


def test_plan_reports_the_sql_of_each_mode_and_changes_nothing(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE MATERIALIZED VIEW public.conc AS SELECT id, v FROM public.base")
        c.execute("CREATE UNIQUE INDEX ON public.conc (id)")
        c.execute("CREATE MATERIALIZED VIEW public.pref AS SELECT id, v FROM public.base")
        c.execute("CREATE MATERIALIZED VIEW public.req AS SELECT id, v FROM public.base")
        c.execute("INSERT INTO public.base VALUES (4, 1)")
        views = [
            {"view": "public.conc"},
            {"view": "public.pref", "concurrently": "preferred"},
            {"view": "public.req"},
            {"view": "public.gone"},
        ]
        out = run_job(target_for(dsn, views), apply=False)
        assert [count(c, v) for v in ("public.conc", "public.pref", "public.req")] == [3, 3, 3]
        conc_rows = reltuples(c, "public.conc")

    def planned(view: str, concurrently: bool, mode: str, rows: int | None, **extra: object) -> Action:
        name = '"' + '"."'.join(view.split(".")) + '"'
        text = f"REFRESH MATERIALIZED VIEW {'CONCURRENTLY ' if concurrently else ''}{name}"
        return Action("refresh_materialized_view", view, text, False, {"view": view, "mode": mode, "rows": rows, **extra})

    assert out.actions == [
        planned("public.conc", True, "concurrent", conc_rows),
        planned(
            "public.pref", False, "blocking", None,
            fallback_reason="cannot refresh concurrently: it has no unique index on plain columns without a WHERE clause",
        ),
        planned("public.req", True, "concurrent", None),
        planned("public.gone", True, "concurrent", None),
    ]
    assert [e.object for e in out.errors] == ["public.req", "public.gone"]
    assert (out.findings, out.samples) == ([], [])


def test_plan_view_is_a_pure_function_of_the_catalog_row() -> None:
    view = QualifiedName("r", "m")
    state = mvplan.ViewState(view, 1, "m", True, True, True, "owner", "owner", 10.0)
    for concurrently, mode in (("required", "concurrent"), ("preferred", "concurrent"), ("never", "blocking")):
        policy = ViewPolicy(view=view, concurrently=concurrently, timeout=timedelta(seconds=5))
        assert mvplan.plan_view(policy, state) == mvplan.Refresh(policy, 1, mode, rows=10)
    both = mvplan.ViewState(view, 1, "m", False, False, True, "owner", "owner", -1.0)
    preferred = ViewPolicy(view=view, concurrently="preferred")
    assert mvplan.plan_view(preferred, both) == mvplan.Refresh(
        preferred,
        1,
        "blocking",
        fallback_reason="cannot refresh concurrently: the view is not populated yet (created or last refreshed WITH NO "
        "DATA) and it has no unique index on plain columns without a WHERE clause",
    )
    required = mvplan.plan_view(ViewPolicy(view=view), both)
    assert required.problem == (
        "r.m: cannot refresh CONCURRENTLY: the view is not populated yet (created or last refreshed WITH NO DATA) and "
        "it has no unique index on plain columns without a WHERE clause; a plain refresh is the only way to populate "
        "it: run REFRESH MATERIALIZED VIEW r.m once; create one (CREATE UNIQUE INDEX ON r.m (<key columns>)); "
        "or set concurrently: preferred to accept a blocking refresh"
    )
