"""Per-table freeze age and autovacuum lag, in one statement over every table.

Freeze age: age(relfrozenxid) and mxid_age(relminmxid) of a table and its TOAST table, as a share
of the effective autovacuum_freeze_max_age (and the multixact one): the server's, or the table's
storage parameter where that is lower (a higher one is ignored by autovacuum too). Autovacuum lag:
dead tuples over the table's own autovacuum threshold, timed from when pgupkeep first saw the table
over it (kept in the job's memo) until a vacuum runs.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.jobs.health.common import bounded, count, percent, reloption, seconds, threshold
from pgupkeep.policy import HealthSection
from pgupkeep.results import Finding, JobOutput, Sample


def _own(options: str, name: str, server: str) -> str:
    """A table's effective setting: its storage parameter, else the server's."""
    return f"coalesce(({reloption(options, name)})::float8, {server})"


# Rows: the report_top worst tables by freeze share, every table past freeze_age_warn, and every
# table over its autovacuum threshold (temporary tables excepted: autovacuum cannot reach them).
TABLES_SQL = f"""
WITH settings AS MATERIALIZED (
    SELECT current_setting('autovacuum_freeze_max_age')::float8 AS xid_max,
           current_setting('autovacuum_multixact_freeze_max_age')::float8 AS mxid_max,
           current_setting('autovacuum_vacuum_threshold')::float8 AS vac_base,
           current_setting('autovacuum_vacuum_scale_factor')::float8 AS vac_scale,
           coalesce(current_setting('autovacuum_vacuum_max_threshold', true), '-1')::float8 AS vac_cap,
           current_setting('autovacuum')::bool AND current_setting('track_counts')::bool AS autovacuum
),
t AS (
    SELECT c.oid, n.nspname, c.relname, c.relpersistence = 't' AS temporary, c.reloptions,
           greatest(age(c.relfrozenxid), age(tc.relfrozenxid)) AS xid_age,
           greatest(mxid_age(c.relminmxid), mxid_age(tc.relminmxid)) AS mxid_age,
           greatest(age(c.relfrozenxid) / least(s.xid_max, {_own('c.reloptions', 'autovacuum_freeze_max_age', 's.xid_max')}),
                    age(tc.relfrozenxid) / least(s.xid_max, {_own('tc.reloptions', 'autovacuum_freeze_max_age', 's.xid_max')}))
               AS xid_share,
           greatest(mxid_age(c.relminmxid)
                        / least(s.mxid_max, {_own('c.reloptions', 'autovacuum_multixact_freeze_max_age', 's.mxid_max')}),
                    mxid_age(tc.relminmxid)
                        / least(s.mxid_max, {_own('tc.reloptions', 'autovacuum_multixact_freeze_max_age', 's.mxid_max')}))
               AS mxid_share,
           least(s.xid_max, {_own('c.reloptions', 'autovacuum_freeze_max_age', 's.xid_max')}) AS xid_max,
           least(s.mxid_max, {_own('c.reloptions', 'autovacuum_multixact_freeze_max_age', 's.mxid_max')}) AS mxid_max,
           pg_stat_get_dead_tuples(c.oid) AS dead_tuples,
           {_own('c.reloptions', 'autovacuum_vacuum_threshold', 's.vac_base')}
               + {_own('c.reloptions', 'autovacuum_vacuum_scale_factor', 's.vac_scale')} * greatest(c.reltuples, 0)
               AS uncapped_threshold,
           {_own('c.reloptions', 'autovacuum_vacuum_max_threshold', 's.vac_cap')} AS cap,
           s.autovacuum AS server_autovacuum
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_class tc ON tc.oid = c.reltoastrelid
    CROSS JOIN settings s
    WHERE c.relkind IN ('r', 'm')
),
shared AS (
    SELECT t.*, greatest(t.xid_share, t.mxid_share) AS share,
           CASE WHEN t.cap >= 0 THEN least(t.uncapped_threshold, t.cap) ELSE t.uncapped_threshold END AS vacuum_threshold
    FROM t
),
ranked AS (
    SELECT shared.*, row_number() OVER (ORDER BY share DESC, nspname, relname) AS rank
    FROM shared
)
-- Statistics beyond the dead tuples are read for the rows returned only.
SELECT oid, nspname || '.' || relname AS table_name, temporary, xid_age, mxid_age, xid_share, mxid_share, share,
       xid_max, mxid_max, dead_tuples, vacuum_threshold, server_autovacuum,
       coalesce(({reloption('reloptions', 'autovacuum_enabled')})::bool, true) AS table_autovacuum,
       pg_stat_get_vacuum_count(oid) + pg_stat_get_autovacuum_count(oid) AS vacuums,
       pg_stat_get_last_autovacuum_time(oid) AS last_autovacuum, rank
FROM ranked
WHERE rank <= %(top)s OR share >= %(warn)s OR (dead_tuples > vacuum_threshold AND NOT temporary)
ORDER BY rank
"""

MEMO_KEY = "autovacuum_over_since"  # table oid -> (first seen over threshold, vacuum count then)


@dataclass(frozen=True)
class Tables:
    rows: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


def read(conn: psycopg.Connection, section: HealthSection) -> Tables:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(TABLES_SQL, {"top": section.report_top, "warn": section.freeze_age_warn}).fetchall()
    return Tables(rows=rows)


def judge(tables: Tables, section: HealthSection, now: datetime, memo: MutableMapping[str, Any]) -> JobOutput:
    out = JobOutput()
    rows = tables.rows
    out.samples += [
        Sample("table_freeze_age", float(r["xid_age"]), {"table": r["table_name"]}) for r in rows if r["rank"] <= section.report_top
    ]
    out.findings += bounded([_freeze(r, section) for r in rows if r["share"] >= section.freeze_age_warn], section.report_top)
    out.findings += bounded(_lagging(rows, section, now, memo), section.report_top)
    return out


def _freeze(r: Mapping[str, Any], section: HealthSection) -> Finding:
    table = r["table_name"]
    multixact = r["mxid_share"] > r["xid_share"]
    age, limit = (r["mxid_age"], r["mxid_max"]) if multixact else (r["xid_age"], r["xid_max"])
    what = "mxid_age(relminmxid)" if multixact else "age(relfrozenxid)"
    setting = "autovacuum_multixact_freeze_max_age" if multixact else "autovacuum_freeze_max_age"
    if r["temporary"]:
        fix = "it is another session's temporary table, which only that session can vacuum: end that session to drop it"
    else:
        fix = (
            f"VACUUM (FREEZE, VERBOSE) {table} in a quiet hour; if its age does not drop, something holds the xmin "
            "horizon back (see xmin_horizon_held)"
        )
    return Finding(
        kind="table_freeze_age",
        object=table,
        value=int(r["xid_age"]),
        message=(
            f"{table}: {what} is {count(age)}, {percent(r['share'])} of its {setting} {count(limit)} (warn at "
            f"{percent(section.freeze_age_warn)}); at 100% autovacuum forces an anti-wraparound vacuum, and PostgreSQL stops "
            f"accepting writes near 2 billion: {fix}"
        ),
        detail={
            "table": table,
            "xid_age": int(r["xid_age"]),
            "mxid_age": int(r["mxid_age"]),
            "share": round(float(r["share"]), 6),
            "freeze_max_age": int(r["xid_max"]),
            "multixact_freeze_max_age": int(r["mxid_max"]),
            "temporary": bool(r["temporary"]),
        },
    )


def _lagging(rows: Sequence[Mapping[str, Any]], section: HealthSection, now: datetime, memo: MutableMapping[str, Any]) -> list[Finding]:
    before: dict[int, tuple[datetime, int]] = memo.get(MEMO_KEY, {})
    seen: dict[int, tuple[datetime, int]] = {}
    found = []
    for r in rows:
        if r["temporary"] or r["dead_tuples"] <= r["vacuum_threshold"]:
            continue
        since, vacuums = before.get(r["oid"], (now, r["vacuums"]))
        if vacuums != r["vacuums"]:  # vacuumed since, and over the threshold again: a new wait
            since, vacuums = now, r["vacuums"]
        seen[r["oid"]] = (since, vacuums)
        over = (now - since).total_seconds()
        if over < section.autovacuum_lag_after.total_seconds():
            continue
        table = r["table_name"]
        if not r["table_autovacuum"]:
            why = f"autovacuum is off for this table (autovacuum_enabled=false): ALTER TABLE {table} RESET (autovacuum_enabled), or VACUUM it on a schedule of your own"
        elif not r["server_autovacuum"]:
            why = f"autovacuum (or track_counts) is off on the server: turn it on, or VACUUM {table} on a schedule of your own"
        else:
            why = (
                f"the workers may be busy with big tables (autovacuum_max_workers, autovacuum_vacuum_cost_limit) or cancelled "
                f"by lock conflicts ('canceling autovacuum task' in the server log); run VACUUM (ANALYZE) {table} and watch "
                "pg_stat_progress_vacuum"
            )
        last = r["last_autovacuum"]
        found.append(
            Finding(
                kind="autovacuum_lagging",
                object=table,
                value=round(over, 3),
                message=(
                    f"{table}: {count(r['dead_tuples'])} dead tuples, over its autovacuum threshold of {count(r['vacuum_threshold'])} "
                    f"for {seconds(over)} (past {threshold(section.autovacuum_lag_after)}) without a vacuum "
                    f"(last autovacuum: {last.isoformat() if last else 'never'}); {why}"
                ),
                detail={
                    "table": table,
                    "dead_tuples": int(r["dead_tuples"]),
                    "autovacuum_threshold": round(float(r["vacuum_threshold"]), 1),
                    "over_threshold_seconds": round(over, 3),
                    "last_autovacuum": last.isoformat() if last else None,
                    "autovacuum_enabled": bool(r["table_autovacuum"] and r["server_autovacuum"]),
                },
            )
        )
    memo[MEMO_KEY] = seen
    return sorted(found, key=lambda f: -(f.value or 0))
