"""Measured figures for the worst candidates: `pgstattuple_approx` on a table's heap and TOAST
relation, `pgstatindex` on a B-tree, worst first, within `exact_time_budget`.

Without the extension, or without the right to run it, every figure stays an estimate and the
job says so once per run: a finding naming what to install or GRANT.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgupkeep.jobs.bloat.catalog import Settings
from pgupkeep.jobs.bloat.estimate import Part, TableBloat, approx_wasted, rank_key
from pgupkeep.jobs.bloat.indexes import IndexBloat, fillfactor, index_rank_key, pgstatindex_wasted
from pgupkeep.policy import BloatSection
from pgupkeep.results import Finding

# The functions the job calls, with the caller's right to execute each (regclass variants).
FUNCTIONS_SQL = """
SELECT n.nspname, p.proname, has_function_privilege(p.oid, 'EXECUTE'), current_user
FROM pg_extension e
JOIN pg_namespace n ON n.oid = e.extnamespace
JOIN pg_proc p ON p.pronamespace = n.oid AND p.proname IN ('pgstattuple_approx', 'pgstatindex')
WHERE e.extname = 'pgstattuple' AND p.proargtypes = '2205'::oidvector
"""
APPROX_SQL = "SELECT table_len, dead_tuple_len, approx_free_space FROM {}(%s::oid::regclass)"
INDEX_SQL = "SELECT index_size, leaf_pages, empty_pages, deleted_pages, avg_leaf_density FROM {}(%s::oid::regclass)"
# A measurement is worth no wait: a lock taken since the catalog read makes it give up at once.
ARM_SQL = "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', '100ms', true)"
MIN_CALL_SECONDS = 0.05  # below this a call cannot finish; keep the estimate
GRANT_HINT = "GRANT pg_stat_scan_tables TO {role}"


@dataclass
class Functions:
    approx: sql.Identifier | None = None
    index: sql.Identifier | None = None
    findings: tuple[Finding, ...] = ()


def functions(conn: psycopg.Connection, section: BloatSection) -> Functions:
    """The pgstattuple functions this role may call; a finding when they are missing or denied."""
    if section.exact_time_budget.total_seconds() <= 0:
        return Functions()
    rows = conn.execute(FUNCTIONS_SQL).fetchall()
    if not rows:
        return Functions(findings=(Finding(
            kind="extension_missing", object="pgstattuple", value=None,
            message=(
                "pgstattuple is not installed in this database: bloat figures are estimates only (method "
                "estimate); CREATE EXTENSION pgstattuple to measure the worst tables and indexes, or set "
                "exact_time_budget: 0s to not ask for it"
            ),
            detail={"extension": "pgstattuple", "remedy": "CREATE EXTENSION pgstattuple"},
        ),))  # fmt: skip
    out = Functions()
    denied = []
    for schema, name, allowed, _role in rows:
        if not allowed:
            denied.append(name)
        elif name == "pgstattuple_approx":
            out.approx = sql.Identifier(schema, name)
        else:
            out.index = sql.Identifier(schema, name)
    if denied:
        role_ident = sql.Identifier(rows[0][3]).as_string(conn)
        grant = GRANT_HINT.format(role=role_ident)
        out.findings = (Finding(
            kind="insufficient_privilege", object="pgstattuple", value=None,
            message=(
                f"role {rows[0][3]} may not execute {', '.join(sorted(denied))}: the bloat figures of "
                f"{'tables' if 'pgstattuple_approx' in denied else ''}"
                f"{' and ' if len(denied) == 2 else ''}{'indexes' if 'pgstatindex' in denied else ''} "
                f"are estimates only (method estimate); {grant}"
            ),
            detail={"extension": "pgstattuple", "functions": sorted(denied), "grant": grant},
        ),)  # fmt: skip
    return out


def table_candidates(tables: Sequence[TableBloat], section: BloatSection) -> list[TableBloat]:
    """Tables near or over a threshold, every table that may get a series, and tables whose TOAST
    part is large (its estimate is a lower bound)."""
    ranked = sorted(tables, key=rank_key)
    return [
        t
        for i, t in enumerate(ranked)
        if i < section.report_top
        or (t.dead_tuples >= section.min_dead_tuples and t.dead_tuple_ratio > section.max_dead_tuple_ratio)
        or t.bloat_ratio >= section.max_bloat_ratio / 2
        or (t.toast is not None and t.toast.size_bytes >= t.size_bytes / 4)
    ]


def index_candidates(indexes: Sequence[IndexBloat], section: BloatSection) -> list[IndexBloat]:
    ranked = sorted(indexes, key=index_rank_key)
    return [i for n, i in enumerate(ranked) if n < section.report_top or i.bloat_ratio >= section.max_index_bloat_ratio / 2]


def refine(
    conn: psycopg.Connection,
    tables: Sequence[TableBloat],
    indexes: Sequence[IndexBloat],
    section: BloatSection,
    settings: Settings,
    fns: Functions,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Replace estimates by measured figures, worst candidates (tables and indexes) first, until
    the budget is spent."""
    budget = section.exact_time_budget.total_seconds()
    work: list[tuple[int, str, TableBloat | IndexBloat]] = []
    if fns.approx is not None:
        work += [(t.bloat_bytes, "table", t) for t in table_candidates(tables, section)]
    if fns.index is not None:
        work += [(i.bloat_bytes, "index", i) for i in index_candidates(indexes, section)]
    if budget <= 0 or not work:
        return
    deadline = clock() + budget
    for _, what, item in sorted(work, key=lambda w: -w[0]):
        remaining = deadline - clock()
        if remaining < MIN_CALL_SECONDS:
            return
        try:
            if what == "table":
                assert isinstance(item, TableBloat) and fns.approx is not None
                _measure_table(conn, item, fns.approx, settings, deadline, clock)
            else:
                assert isinstance(item, IndexBloat) and fns.index is not None
                _measure_index(conn, item, fns.index, settings, remaining)
        except psycopg.errors.QueryCanceled:
            return  # budget spent
        except psycopg.errors.InsufficientPrivilege:
            continue  # e.g. a role allowed the function but not this relation: keep the estimate
        except psycopg.Error:
            continue  # locked meanwhile (lock_timeout) or dropped: keep this estimate


def _call(conn: psycopg.Connection, query: sql.Composed, oid: int, remaining: float) -> tuple | None:
    with conn.transaction():
        # The call may not outlive what is left of the budget.
        conn.execute(ARM_SQL, (str(max(1, int(remaining * 1000))),))
        return conn.execute(query, (oid,)).fetchone()


def _measure_table(
    conn: psycopg.Connection, t: TableBloat, fn: sql.Identifier, s: Settings, deadline: float, clock: Callable[[], float]
) -> None:
    query = sql.SQL(APPROX_SQL).format(fn)
    assert t.oid is not None and t.heap is not None
    row = _call(conn, query, t.oid, deadline - clock())
    if row is None:
        return
    table_len, dead_len, free = (int(v) for v in row)
    heap = Part(table_len, approx_wasted(table_len, dead_len, free, t.fillfactor, s.block_size), "pgstattuple_approx")
    toast = t.toast
    if toast is not None and t.toast_oid and toast.size_bytes and deadline - clock() >= MIN_CALL_SECONDS:
        try:
            trow = _call(conn, query, t.toast_oid, deadline - clock())
        except psycopg.errors.QueryCanceled:
            trow = None
        if trow is not None:
            tlen, tdead, tfree = (int(v) for v in trow)
            toast = Part(tlen, approx_wasted(tlen, tdead, tfree, 100, s.block_size), "pgstattuple_approx")
    t.set_parts(heap, toast)
    t.basis = "measured"


def _measure_index(conn: psycopg.Connection, i: IndexBloat, fn: sql.Identifier, s: Settings, remaining: float) -> None:
    row = _call(conn, sql.SQL(INDEX_SQL).format(fn), i.row.oid, remaining)
    if row is None:
        return
    size, leaf, empty, deleted, density = row
    i.size_bytes = int(size)
    i.bloat_bytes = pgstatindex_wasted(int(size), int(leaf), int(empty), int(deleted), float(density), fillfactor(i.row), s.block_size)
    i.method = "pgstatindex"
