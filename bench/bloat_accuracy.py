"""Accuracy and speed benchmark of the bloat job (run by hand; results in bench/results-bloat.md).

Builds tables and B-tree indexes with known bloat, then compares the wasted share the job
reports, from the statistical estimate alone and measured (pgstattuple_approx, pgstatindex), with
the truth and with check_postgres `--action=bloat`, side by side in one run. Truth for a table is
exact `pgstattuple` on its heap and its TOAST relation ((dead_tuple_len + free_space) /
table_len); for an index, pgstatindex (leaf space below the fillfactor a rebuild packs to, plus
empty and deleted pages) and, independently, what a REINDEX gives back. Then times the whole job
on a database of N tables with two indexes each.

    python bench/bloat_accuracy.py [--dsn DSN] [--big-gb 0] [--tables 10000]

Databases are named bloat_bench_* and dropped at the end. Without --dsn (or
$PGUPKEEP_BENCH_DSN) it starts a throwaway server (fsync off).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from datetime import UTC, datetime

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep import db
from pgupkeep.jobs import bloat
from pgupkeep.jobs.base import JobContext
from pgupkeep.jobs.bloat.indexes import IndexBloat, pgstatindex_wasted
from pgupkeep.pgserver import start_server
from pgupkeep.policy import parse_policy
from pgupkeep.runner import execute_job

ROWS = 200_000
PAYLOAD = "repeat(md5(g::text), 3)"  # 96 characters
# Incompressible ~8 kB values: stored out of line in TOAST, an 18-byte pointer in the heap.
TOAST_PAYLOAD = "(SELECT string_agg(md5((g * 1000 + i)::text), '') FROM generate_series(1, 256) i)"
# Widths from 0 to 299 characters and 10% nulls: the layout model works from averages here.
VARIED_PAYLOAD = "CASE WHEN g % 10 = 0 THEN NULL ELSE repeat(chr(65 + g % 26), (g * 7919) % 300) END"
WIDE_PAYLOAD = "(SELECT string_agg(md5((g * 100 + i)::text), '') FROM generate_series(1, 45) i)"  # 1440 bytes


def execute(dsn: str, *statements: str) -> None:
    """Each call in its own session: its statistics are flushed when the backend exits."""
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s)


def settle(dsn: str, table: str, live: int, dead: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,)
            ).fetchone()
        if row == (live, dead) or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def build(dsn: str, name: str, rows: int, payload: str, *, delete_mod: tuple[int, int] | None = None,
          vacuum: bool = False, update_indexed: bool = False, external: bool = False, analyze_after: bool = False,
          hashed: bool = False) -> str:
    """Create, fill, analyze; then delete `k` of every `m` rows (scattered; by a hash of the id with
    `hashed`, so that the delete does not follow the payload's pattern), VACUUM or non-HOT update."""
    execute(
        dsn,
        f"CREATE TABLE {name} (id int PRIMARY KEY, k int, payload text) WITH (autovacuum_enabled = off)",
        f"ALTER TABLE {name} ALTER COLUMN payload SET STORAGE EXTERNAL" if external else "SELECT 1",
        f"INSERT INTO {name} SELECT g, g, {payload} FROM generate_series(1, {rows}) g",
    )
    settle(dsn, name, rows, 0)
    execute(dsn, f"ANALYZE {name}")
    live, dead = rows, 0
    if delete_mod:
        k, m = delete_mod
        where = f"abs(hashint4(id + 7)) % {m} < {k}" if hashed else f"id % {m} < {k}"
        with psycopg.connect(dsn, autocommit=True) as c:
            dead = c.execute(f"SELECT count(*) FROM {name} WHERE {where}").fetchone()[0]
        execute(dsn, f"DELETE FROM {name} WHERE {where}")
        live = rows - dead
    if update_indexed:
        # k is indexed: every update is non-HOT and leaves a dead version behind.
        execute(dsn, f"CREATE INDEX ON {name} (k)", f"UPDATE {name} SET k = k + 1")
        dead = rows
    settle(dsn, name, live, dead)
    if vacuum:
        execute(dsn, f"VACUUM {name}")
        settle(dsn, name, live, 0)
    if analyze_after:
        execute(dsn, f"ANALYZE {name}")
    return name


def section_for(dsn: str, budget: str, min_size: str = "0") -> tuple:
    text = (
        'version: 1\ntargets:\n  - name: bench\n    dsn: "${DSN}"\n    statement_timeout: 1h\n'
        f"    bloat:\n      min_table_size: {min_size}\n      min_index_size: {min_size}\n      report_top: 10000\n"
        f"      exact_time_budget: {budget}\n"
    )
    policy = parse_policy(text, environ={"DSN": dsn})
    return policy, policy.targets[0]


def measure(dsn: str, budget: str) -> tuple[dict[str, bloat.TableBloat], dict[str, IndexBloat]]:
    _, target = section_for(dsn, budget)
    with db.connect(target) as c:
        a = bloat.assess(c, target.bloat)
    return {t.table: t for t in a.tables}, {i.index: i for i in a.indexes}


def run_job_timed(dsn: str, min_size: str, budget: str, memo: dict | None = None) -> tuple[float, int]:
    policy, target = section_for(dsn, budget, min_size)
    with db.connect(target) as c:
        ctx = JobContext(target=target, section=target.bloat, conn=c, now=datetime.now(UTC), timezone=policy.daemon.zone,
                         memo={} if memo is None else memo)
        started = time.monotonic()
        out = execute_job(bloat.KIND, ctx)
        return time.monotonic() - started, len(out.findings)


def with_db(dsn: str, name: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo(**params)


def fresh_db(admin_dsn: str, name: str) -> str:
    assert name.startswith("bloat_bench"), name
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_db(admin_dsn, name)


def drop_db(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# Real-world shapes: a few statuses, amounts of varying width, mostly-null notes of 0-199
# characters, timestamps; pseudo-random (hashint4) so deletes do not correlate with widths.
ORDERS = (
    "CREATE TABLE {t} (id bigint PRIMARY KEY, customer_id int, status text, amount numeric(10, 2), "
    "created_at timestamptz, note text, paid bool) WITH (autovacuum_enabled = off)",
    "INSERT INTO {t} SELECT g, abs(hashint4(g)) % 50000, (ARRAY['new', 'paid', 'shipped', 'cancelled'])[1 + g % 4], "
    "abs(hashint4(g + 1)) % 100000 / 100.0, '2026-01-01'::timestamptz + g * interval '1 s', "
    "CASE WHEN hashint4(g + 2) % 10 < 7 THEN NULL ELSE repeat('n', abs(hashint4(g + 3)) % 200) END, g % 3 = 0 "
    "FROM generate_series(1, {n}) g",
    "CREATE INDEX {t}_customer ON {t} (customer_id)",
    "CREATE INDEX {t}_status ON {t} (status)",
    "CREATE INDEX {t}_created ON {t} (created_at)",
)
EVENTS = (
    "CREATE TABLE {t} (id bigint, kind smallint, payload jsonb, at timestamptz) WITH (autovacuum_enabled = off)",
    "INSERT INTO {t} SELECT g, g % 20, jsonb_build_object('user', g % 1000, 'path', repeat('/x', g % 30), 'ok', g % 2 = 0), "
    "'2026-01-01'::timestamptz + g * interval '1 s' FROM generate_series(1, {n}) g",
    "CREATE INDEX {t}_at ON {t} (at)",
)


def build_shaped(dsn: str, name: str, ddl: tuple[str, ...], rows: int, *, delete_share: int = 0, vacuum: bool = False,
                 analyze_after: bool = True) -> str:
    execute(dsn, *(d.format(t=name, n=rows) for d in ddl))
    settle(dsn, name, rows, 0)
    execute(dsn, f"ANALYZE {name}")
    if delete_share:
        execute(dsn, f"DELETE FROM {name} WHERE abs(hashint4(id::int + 7)) % 10 < {delete_share}")
        if vacuum:
            execute(dsn, f"VACUUM {name}")
        if analyze_after:
            execute(dsn, f"ANALYZE {name}")
    time.sleep(0.5)
    return name


def random_inserts(dsn: str, name: str, rows: int) -> str:
    """An index that grew by inserts in random key order: page splits leave leaves ~70 % full."""
    execute(
        dsn,
        f"CREATE TABLE {name} (id int, k int) WITH (autovacuum_enabled = off)",
        f"CREATE INDEX {name}_k ON {name} (k)",
        f"INSERT INTO {name} SELECT g, hashint4(g) FROM generate_series(1, {rows}) g",
        f"ANALYZE {name}",
    )
    settle(dsn, name, rows, 0)
    return name


def check_postgres_bloat(dsn: str) -> dict[str, int]:
    """check_postgres --action=bloat, its wasted bytes per relation (tables schema-qualified,
    indexes by bare name), from its performance data."""
    params = conninfo_to_dict(dsn)
    cmd = ["check_postgres", "--action=bloat", f"--host={params.get('host', '127.0.0.1')}", f"--port={params.get('port', 5432)}",
           f"--dbuser={params.get('user', 'postgres')}", f"--db={params['dbname']}", "--warning=1000%", "--critical=2000%",
           "--perflimit=100000"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    perf = out.split("|", 1)[1] if "|" in out else ""
    return {k: int(v.rstrip("B")) for k, v in re.findall(r"(\S+)=(\d+)B", perf)}


def accuracy(admin_dsn: str, big_gb: float) -> list[str]:
    dsn = fresh_db(admin_dsn, "bloat_bench_acc")
    execute(dsn, "CREATE EXTENSION pgstattuple")
    tables = [
        build_shaped(dsn, "orders_untouched", ORDERS, 1_000_000),
        build_shaped(dsn, "events_fresh", EVENTS, 500_000),
        build(dsn, "del_00", ROWS, PAYLOAD),
        build(dsn, "del_20", ROWS, PAYLOAD, delete_mod=(1, 5)),
        build(dsn, "del_50", ROWS, PAYLOAD, delete_mod=(1, 2)),
        build(dsn, "del_80", ROWS, PAYLOAD, delete_mod=(4, 5)),
        build(dsn, "del_50_vacuumed", ROWS, PAYLOAD, delete_mod=(1, 2), vacuum=True),
        build(dsn, "del_80_vacuumed", ROWS, PAYLOAD, delete_mod=(4, 5), vacuum=True),
        build(dsn, "varied_nulls_del_50", ROWS, VARIED_PAYLOAD, delete_mod=(1, 2)),
        build(dsn, "varied_nulls_del_50_vacuumed", ROWS, VARIED_PAYLOAD, delete_mod=(1, 2), vacuum=True),
        # The same after ANALYZE (as autovacuum does after a change of 10 %): here every null row
        # was deleted, so until then the statistics describe rows that are no longer there.
        build(dsn, "varied_nulls_del_50_vacuumed_analyzed", ROWS, VARIED_PAYLOAD, delete_mod=(1, 2), vacuum=True, analyze_after=True),
        # The same delete share with ids picked by a hash: nulls and widths go in proportion.
        build(dsn, "varied_nulls_hashdel_50", ROWS, VARIED_PAYLOAD, delete_mod=(1, 2), hashed=True),
        build(dsn, "varied_nulls_hashdel_50_vacuumed", ROWS, VARIED_PAYLOAD, delete_mod=(1, 2), hashed=True, vacuum=True),
        build(dsn, "non_hot_updates", ROWS, PAYLOAD, update_indexed=True),
        build(dsn, "wide_rows_del_30", 40_000, WIDE_PAYLOAD, delete_mod=(3, 10)),
        build(dsn, "toast_del_50", 20_000, TOAST_PAYLOAD, delete_mod=(1, 2), external=True),
        build(dsn, "toast_del_50_vacuumed", 20_000, TOAST_PAYLOAD, delete_mod=(1, 2), external=True, vacuum=True),
        build_shaped(dsn, "orders_del_30_vacuumed", ORDERS, 500_000, delete_share=3, vacuum=True),
        build_shaped(dsn, "orders_del_70_vacuumed", ORDERS, 500_000, delete_share=7, vacuum=True),
        random_inserts(dsn, "random_inserts", ROWS),
    ]
    if big_gb > 0:
        rows = int(big_gb * 1024**3 / 150)  # ~150 bytes a row with its line pointer
        tables.append(build(dsn, "big_del_30", rows, PAYLOAD, delete_mod=(3, 10)))
    cp = check_postgres_bloat(dsn)
    est_t, est_i = measure(dsn, "0s")
    started = time.monotonic()
    ms_t, ms_i = measure(dsn, "1h")
    measured_seconds = time.monotonic() - started
    lines = [
        "### Tables (heap + TOAST)",
        "",
        "| table | size (heap + TOAST) | truth: pgstattuple | measured (approx) | error | estimate alone | error | check_postgres (heap only) | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = {"measured": 0.0, "estimate": 0.0, "check_postgres": 0.0}
    fresh_worst = current_worst = stale_worst = 0.0
    with psycopg.connect(dsn, autocommit=True) as c:
        for name in tables:
            wasted, size = 0, 0
            for rel in c.execute(
                "SELECT oid FROM pg_class WHERE oid = %s::regclass UNION ALL SELECT reltoastrelid FROM pg_class "
                "WHERE oid = %s::regclass AND reltoastrelid <> 0", (name, name)
            ).fetchall():  # fmt: skip
                w, n = c.execute("SELECT dead_tuple_len + free_space, table_len FROM pgstattuple(%s)", (rel[0],)).fetchone()
                wasted, size = wasted + w, size + n
            truth = wasted / size
            e, m = est_t[f"public.{name}"], ms_t[f"public.{name}"]
            heap_len = c.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()[0]
            cp_ratio = cp.get(f"public.{name}", 0) / heap_len if heap_len else 0.0
            errs = {"measured": (m.bloat_ratio - truth) * 100, "estimate": (e.bloat_ratio - truth) * 100,
                    "check_postgres": (cp_ratio - truth) * 100}  # fmt: skip
            for k, v in errs.items():
                worst[k] = max(worst[k], abs(v))
            if name in ("orders_untouched", "events_fresh", "del_00"):
                fresh_worst = max(fresh_worst, abs(errs["estimate"]))
            lines.append(
                f"| {name} | {size / 1024**2:.1f} MB | {truth:.1%} | {m.bloat_ratio:.1%} | {errs['measured']:+.1f} "
                f"| {e.bloat_ratio:.1%}{' (stale statistics)' if e.basis == 'pg_stats_stale' else ''} "
                f"| {errs['estimate']:+.1f} | {cp_ratio:.1%} | {errs['check_postgres']:+.1f} |"
            )
            if e.basis == "pg_stats_stale":
                stale_worst = max(stale_worst, abs(errs["estimate"]))
            else:
                current_worst = max(current_worst, abs(errs["estimate"]))
        lines += [
            "",
            f"Worst error (points): measured {worst['measured']:.1f}, estimate alone {worst['estimate']:.1f} "
            f"(tables with current statistics: {current_worst:.1f}; marked stale: {stale_worst:.1f}; "
            f"untouched and freshly loaded tables: {fresh_worst:.1f}), check_postgres {worst['check_postgres']:.1f}.",
            "",
            "### B-tree indexes",
            "",
            "| index | size | truth: pgstatindex | REINDEX gives back | measured (pgstatindex) | estimate alone | error | check_postgres | error |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        iworst = {"measured": 0.0, "estimate": 0.0, "check_postgres": 0.0, "reindex": 0.0}
        rows = c.execute(
            "SELECT c.relname, c.oid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = 'public' AND c.relam = 403 ORDER BY 1"
        ).fetchall()  # fmt: skip
        for iname, oid in rows:
            size, leaf, empty, deleted, density = c.execute(
                "SELECT index_size, leaf_pages, empty_pages, deleted_pages, avg_leaf_density FROM pgstatindex(%s)", (oid,)
            ).fetchone()
            truth = pgstatindex_wasted(size, leaf, empty, deleted, float(density), 90, 8192) / size
            e, m = est_i.get(f"public.{iname}"), ms_i.get(f"public.{iname}")
            if e is None or m is None:
                continue
            c.execute(sql.SQL("REINDEX INDEX {}").format(sql.Identifier("public", iname)))
            after = c.execute("SELECT pg_relation_size(%s::regclass)", (f"public.{iname}",)).fetchone()[0]
            gain = 1 - after / size
            cp_ratio = cp.get(iname, 0) / size
            dead = c.execute("SELECT pg_stat_get_dead_tuples(indrelid) FROM pg_index WHERE indexrelid = %s", (oid,)).fetchone()[0]
            errs = {"measured": (m.bloat_ratio - truth) * 100, "estimate": (e.bloat_ratio - truth) * 100,
                    "check_postgres": (cp_ratio - truth) * 100}  # fmt: skip
            if dead == 0:  # a REINDEX also drops the entries of dead rows, which VACUUM has yet to free
                errs["reindex"] = (m.bloat_ratio - gain) * 100
            for k, v in errs.items():
                iworst[k] = max(iworst[k], abs(v))
            lines.append(
                f"| {iname} | {size / 1024**2:.1f} MB | {truth:.1%} | {gain:.1%}{'' if dead == 0 else ' (dead rows)'} "
                f"| {m.bloat_ratio:.1%} | {e.bloat_ratio:.1%} "
                f"| {errs['estimate']:+.1f} | {cp_ratio:.1%} | {errs['check_postgres']:+.1f} |"
            )
    lines += [
        "",
        f"Worst error (points, against pgstatindex): measured {iworst['measured']:.1f}, estimate alone "
        f"{iworst['estimate']:.1f}, check_postgres {iworst['check_postgres']:.1f}; measured against what REINDEX "
        f"gave back (tables without dead rows): {iworst['reindex']:.1f}.",
        f"The measured pass (pgstattuple_approx on {len(tables)} tables and their TOAST, pgstatindex on "
        f"{len(ms_i)} indexes) took {measured_seconds:.1f} s.",
    ]
    drop_db(admin_dsn, "bloat_bench_acc")
    return lines


def many_tables(admin_dsn: str, count: int) -> list[str]:
    dsn = fresh_db(admin_dsn, "bloat_bench_many")
    started = time.monotonic()
    batch = 500
    for lo in range(0, count, batch):
        execute(
            dsn,
            f"DO $$ BEGIN FOR i IN {lo}..{min(lo + batch, count) - 1} LOOP "
            "EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, k int, payload text)', i); "
            "EXECUTE format('CREATE INDEX ON t_%s (k)', i); "
            "EXECUTE format('INSERT INTO t_%s SELECT g, g, md5(g::text) FROM generate_series(1, 20) g', i); "
            "END LOOP; END $$",
        )
    execute(dsn, "ANALYZE")
    built = time.monotonic() - started
    memo: dict = {}
    first_s, _ = run_job_timed(dsn, "10MB", "10s", memo)
    default_s, _ = run_job_timed(dsn, "10MB", "10s", memo)
    all_first, _ = run_job_timed(dsn, "0", "0s")
    memo_all: dict = {}
    run_job_timed(dsn, "0", "0s", memo_all)
    all_s, n_findings = run_job_timed(dsn, "0", "0s", memo_all)
    drop_db(admin_dsn, "bloat_bench_many")
    return [
        f"{count} tables (id int primary key, k int, payload text; an index on k; 20 rows each): {count} tables, "
        f"{2 * count} indexes, {count} TOAST tables; built and analyzed in {built:.0f} s.",
        "",
        "| run | policy | job duration |",
        "|---|---|---:|",
        f"| defaults, first run of a process | min_table_size/min_index_size 10MB, exact_time_budget 10s | {first_s:.2f} s |",
        f"| defaults, later runs | same | {default_s:.2f} s |",
        f"| every table and index assessed, first run | min sizes 0, exact_time_budget 0s | {all_first:.2f} s |",
        f"| every table and index assessed, later runs | same | {all_s:.2f} s ({n_findings} findings) |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", default=os.environ.get("PGUPKEEP_BENCH_DSN"))
    ap.add_argument("--big-gb", type=float, default=0.0, help="size of an extra large table; 0 skips it")
    ap.add_argument("--tables", type=int, default=10_000, help="tables for the timing run; 0 skips it")
    ap.add_argument("--skip-accuracy", action="store_true", help="only the timing run")
    args = ap.parse_args()
    server = None
    if not args.dsn:
        server = start_server()
        args.dsn = server.dsn("postgres")
    try:
        with psycopg.connect(args.dsn) as c:
            version = c.execute("SELECT version()").fetchone()[0]
        cp_version = subprocess.run(["check_postgres", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"# bloat benchmark, {datetime.now(UTC):%Y-%m-%d}\n")
        print(f"- machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}")
        print(f"- server: {version}")
        print(f"- {cp_version}")
        print(f"- pgupkeep: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}\n")
        if not args.skip_accuracy:
            print("## Accuracy\n")
            print("\n".join(accuracy(args.dsn, args.big_gb)))
        if args.tables:
            print("\n## Speed\n")
            print("\n".join(many_tables(args.dsn, args.tables)))
    finally:
        if server is not None:
            server.remove()


if __name__ == "__main__":
    main()
