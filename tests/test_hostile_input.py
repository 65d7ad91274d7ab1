"""Bad input: generated policy files, hostile identifiers and odd catalog states.

Nothing crashes, nothing runs that the policy did not ask for, and every error names its object.
Policy documents are generated with hypothesis; identifiers are real objects in real PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from pgupkeep.policy import Policy, PolicyError, parse_policy
from pgupkeep.runner import Runner

PROBLEM_RE = re.compile(r"^p\.yaml:\d+:\d+: .*\S")
SECRET = "pw-never-shown"

VALID = {
    "version": 1,
    "daemon": {"listen": "127.0.0.1:9188", "timezone": "Europe/Berlin", "shutdown_grace": "5s"},
    "defaults": {"lock_timeout": "2s", "lock_retries": 3},
    "targets": [
        {
            "name": "shop",
            "dsn": f"postgresql://app:{SECRET}@db.example:5432/shop",
            "partitions": {"schedule": "every 1h", "tables": [{"table": "public.orders", "interval": "monthly", "premake": 3}]},
            "materialized_views": {"views": [{"view": "reporting.sales", "schedule": "*/5 * * * *"}]},
            "long_running_queries": {"warn_after": "5m", "cancel_after": "10m", "ignore_users": ["replicator"]},
            "bloat": {"min_table_size": "10MB", "max_dead_tuple_ratio": 0.2},
            "health": {"schedule": "every 1m"},
        }
    ],
}

KEYS = sorted(
    {
        "version", "daemon", "defaults", "targets", "name", "dsn", "listen", "timezone", "schedule", "tables",
        "table", "interval", "premake", "retention", "retention_action", "on_default_conflict", "views", "view",
        "concurrently", "timeout", "warn_after", "cancel_after", "terminate_after", "dry_run", "ignore_users",
        "min_table_size", "max_dead_tuple_ratio", "report_top", "vacuum", "lock_timeout", "lock_retries",
        "statement_timeout", "health", "bloat", "partitions", "materialized_views", "long_running_queries",
    }
)  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["every 1s", "every 0s", "* * * * *", "61 * * * *", "0 0 31 2 8", "5m", "-1s", "10XB",
                     "monthly", "weekly", "public.orders", '"a"."b"."c"', "${NOPE}", "${X:-y}", "UTC",
                     "Mars/Olympus", "", " ", "0.0.0.0:99999", "x" * 300]),  # fmt: skip
    st.text(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=25,
)


def _check(text: str) -> Policy | None:
    """parse_policy either returns a Policy or lists located problems; nothing else escapes."""
    try:
        return parse_policy(text, file="p.yaml", environ={"X": "1"})
    except PolicyError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert PROBLEM_RE.match(str(problem)), str(problem)
            assert SECRET not in str(problem)
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_generated_documents_parse_or_list_located_problems(doc: object) -> None:
    _check(yaml.safe_dump(doc))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_loader(text: str) -> None:
    _check(text)


def _paths(node: object, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


VALID_PATHS = [p for p in _paths(VALID) if p]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(VALID_PATHS), documents)
def test_one_value_of_a_valid_policy_replaced_by_junk(path: tuple, junk: object) -> None:
    import copy

    doc = copy.deepcopy(VALID)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = junk
    policy = _check(yaml.safe_dump(doc))
    if policy is None:
        return
    # Whatever got through is well typed: the scheduler can plan it.
    from pgupkeep.scheduler import planned_jobs

    assert all(job.schedule.text for job in planned_jobs(policy))


def test_every_problem_of_a_bad_policy_is_listed_with_its_place() -> None:
    doc = yaml.safe_dump(
        {
            "version": 1,
            "targets": [
                {"name": "Bad Name", "dsn": f"host=h password={SECRET} port",
                 "partitions": {"tables": [{"table": "orders", "interval": "fortnightly"}]}},
            ],
        }
    )  # fmt: skip
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, file="p.yaml")
    text = str(info.value)
    for where in ("targets[0].name", "targets[0].dsn", "targets[0].partitions.tables[0].table", "targets[0].partitions.tables[0].interval"):
        assert where in text, (where, text)
    assert SECRET not in text


# --------------------------------------------------------------------------- hostile identifiers

HOSTILE = [
    ("public", "orders; DROP TABLE canary; --"),
    ("public", 'it\'s "quoted"'),
    ("public", "dotted.name"),
    ("public", "Bestellungen_ü✓"),
    ("public", "x" * 63),
    ("public", "x" * 62 + "y"),  # shares its first 62 bytes with the one above
    ('we"ird.sch', "select * from pg_authid"),
    ("Ünïcødé", "ß" * 31),  # 62 bytes of two-byte characters
]


def _quoted(schema: str, name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, name))


def _snapshot(conn: psycopg.Connection) -> set[tuple[str, str, str]]:
    return set(
        conn.execute(
            "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        ).fetchall()
    )


def _mv(name: str) -> str:
    """A view name as hostile as `name`, distinct per table, within 63 bytes."""
    i = [n for _, n in HOSTILE].index(name)
    return name.encode()[:58].decode(errors="ignore") + f"_mv{i}"


def _policy(dsn: str, tables: list[tuple[str, str]], views: list[tuple[str, str]]) -> Policy:
    doc = {
        "version": 1,
        "targets": [
            {
                "name": "t",
                "dsn": dsn,
                "partitions": {"tables": [{"table": _quoted(s, n), "interval": "monthly", "premake": 1} for s, n in tables]},
                "materialized_views": {"views": [{"view": _quoted(s, n), "concurrently": "never"} for s, n in views]},
                "bloat": {"min_table_size": "0B", "min_dead_tuples": 0},
                "health": {},
                "long_running_queries": {},
            }
        ],
    }
    return parse_policy(yaml.safe_dump(doc, allow_unicode=True), file="p.yaml")


def test_hostile_identifiers_are_managed_exactly_and_nothing_else_runs(fresh_database: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("CREATE TABLE canary (id int)")
        for schema, name in HOSTILE:
            c.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            c.execute(
                sql.SQL("CREATE TABLE {} (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at)").format(
                    sql.Identifier(schema, name)
                )
            )
            c.execute(sql.SQL("CREATE MATERIALIZED VIEW {} AS SELECT 1 AS id").format(sql.Identifier(schema, _mv(name))))
        before = _snapshot(c)
        policy = _policy(fresh_database, HOSTILE, [(s, _mv(n)) for s, n in HOSTILE])
        runner = Runner(policy)

        planned = {job: runner.run("t", job, apply=False) for job in policy.targets[0].job_kinds()}
        assert _snapshot(c) == before, "plan must change nothing"
        for job, res in planned.items():
            assert res.outcome == "success", (job, res.error)
        creates = [a for a in planned["partitions"].actions if a.action == "create_partition"]
        assert len(creates) == 2 * len(HOSTILE)
        assert all(a.applied is False for a in creates)
        assert {a.detail["table"] for a in creates} == {f"{s}.{n}" for s, n in HOSTILE}

        done = {job: runner.run("t", job) for job in policy.targets[0].job_kinds()}
        after = _snapshot(c)
        assert ("public", "canary", "r") in after
        made = after - before
        # Only partitions of the hostile parents, each attached to the parent it was made for.
        assert all(kind == "r" for _, _, kind in made), made
        parents = {
            (s, n): (ps, pn) for s, n, ps, pn in c.execute(
                "SELECT n.nspname, c.relname, pn.nspname, p.relname FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace"
            )
        }  # fmt: skip
        for schema, name, _ in made:
            assert len(name.encode()) <= 63
            assert (schema, name) in parents, f"{schema}.{name} was created but not attached"
        counts = {p: sum(1 for q in parents.values() if q == p) for p in set(parents.values())}
        # Names cut to 63 bytes that would clash (the two x...x tables) are told apart, not refused.
        assert done["partitions"].outcome == "success", done["partitions"].error
        assert counts == {(s, n): 2 for s, n in HOSTILE}
        assert done["materialized_views"].outcome == "success", done["materialized_views"].error
        refreshed = {a.object for a in done["materialized_views"].actions if a.applied}
        assert refreshed == {f"{s}.{_mv(n)}" for s, n in HOSTILE}
        for job in ("health", "bloat", "long_running_queries"):
            assert done[job].outcome == "success", (job, done[job].error)


def test_odd_catalog_states_fail_their_item_only_and_name_it(fresh_database: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as c:
        c.execute("CREATE TABLE plain (id int)")
        c.execute("CREATE TABLE listed (k text) PARTITION BY LIST (k)")
        c.execute("CREATE TABLE texty (k text) PARTITION BY RANGE (k)")
        c.execute("CREATE TABLE multi (a date, b date) PARTITION BY RANGE (a, b)")
        c.execute("CREATE VIEW not_a_matview AS SELECT 1 AS x")
        c.execute("CREATE TABLE good (at timestamptz NOT NULL) PARTITION BY RANGE (at)")
        c.execute("CREATE MATERIALIZED VIEW good_mv AS SELECT 1 AS x")
        before = _snapshot(c)
        tables = [("public", n) for n in ("plain", "listed", "texty", "multi", "missing", "good")]
        views = [("public", n) for n in ("not_a_matview", "missing_mv", "plain", "good_mv")]
        policy = _policy(fresh_database, tables, views)
        runner = Runner(policy)

        parts = runner.run("t", "partitions")
        assert parts.outcome == "failure"
        assert sorted(e.object for e in parts.errors) == sorted(f"public.{n}" for n in ("plain", "listed", "texty", "multi", "missing"))
        for e in parts.errors:
            assert e.object in e.message, e
        made = _snapshot(c) - before
        assert made and all(name.startswith("good_") for _, name, _ in made), made

        views_res = runner.run("t", "materialized_views")
        assert views_res.outcome == "failure"
        assert sorted(e.object for e in views_res.errors) == ["public.missing_mv", "public.not_a_matview", "public.plain"]
        for e in views_res.errors:
            assert e.object in e.message, e
        assert {a.object for a in views_res.actions if a.applied} == {"public.good_mv"}
        assert ("public", "plain", "r") in _snapshot(c) and ("public", "not_a_matview", "v") in _snapshot(c)
