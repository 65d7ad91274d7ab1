"""The `health` job: the routine checks a DBA runs by hand, as findings and gauges.

Here: connections by state (the target's database) against max_connections (the server's),
transaction-ID wraparound age, invalid and unused indexes, database size. Beside it, one module per
noun: replication (slots, lag), horizon (what holds back vacuum), sequences, tables (freeze age,
autovacuum lag). Read-only, a few set-based statements each, for the connected database; it runs
on standbys too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.db import EXCLUSIVE_LOCKS_CTE, read_past_exclusive_locks
from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.jobs.health import horizon, replication, sequences, tables
from pgupkeep.policy import HealthSection
from pgupkeep.results import Finding, JobOutput, Plan, Sample

# pg_stat_activity's states, as gauge labels; `unknown` counts sessions whose state this role may
# not see (other users' sessions without pg_read_all_stats).
STATES = {
    "active": "active",
    "idle": "idle",
    "idle in transaction": "idle_in_transaction",
    "idle in transaction (aborted)": "idle_in_transaction_aborted",
    "fastpath function call": "fastpath_function_call",
    "disabled": "disabled",
}
UNKNOWN_STATE = "unknown"

# Client backends by state: the target's database (a target is one database), and the whole
# server, which is what max_connections limits. A session this role may not see (no
# pg_read_all_stats) shows neither state nor backend type; those with a database count as `unknown`.
CONNECTIONS_SQL = """
SELECT a.state,
       count(*) FILTER (WHERE a.datname = current_database()) AS n,
       count(*) AS server_n
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend'
   OR (a.backend_type IS NULL AND a.datid IS NOT NULL AND a.query = '<insufficient privilege>')
GROUP BY a.state
"""

# Which server this is, for the `server` label of server-wide figures: the same for every target
# (database) on it, so they are reported once per server. The system identifier tells apart two
# servers behind the same host name; host:port a primary from its standbys (which share it).
SERVER_SQL = "SELECT system_identifier::text FROM pg_control_system()"

DATABASE_SQL = """
SELECT d.datname, age(d.datfrozenxid) AS xid_age, pg_database_size(d.oid) AS size_bytes,
       current_setting('max_connections')::int AS max_connections,
       (SELECT max(age(datfrozenxid)) FROM pg_database WHERE datallowconn) AS cluster_xid_age,
       (SELECT datname FROM pg_database WHERE datallowconn ORDER BY age(datfrozenxid) DESC LIMIT 1) AS oldest_database,
       (SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()) AS stats_reset
FROM pg_database d
WHERE d.datname = current_database()
"""

# An index being built right now by CREATE INDEX / REINDEX CONCURRENTLY is invalid too, but
# only until the command finishes: those are not findings.
INVALID_INDEXES_SQL = """
SELECT ni.nspname AS index_schema, i.relname AS index_name, nt.nspname AS table_schema, t.relname AS table_name,
       i.relkind = 'I' AS partitioned
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_namespace ni ON ni.oid = i.relnamespace
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace nt ON nt.oid = t.relnamespace
WHERE NOT x.indisvalid
  AND x.indexrelid NOT IN (SELECT index_relid FROM pg_stat_progress_create_index WHERE index_relid <> 0)
ORDER BY 1, 2
"""

# Sizes only for indexes nobody holds or awaits an ACCESS EXCLUSIVE lock on (on the index or its
# table): pg_relation_size would wait behind it. Indexes behind a constraint are never unused.
UNUSED_INDEXES_SQL = "WITH " + EXCLUSIVE_LOCKS_CTE + """, sized AS (
    SELECT s.schemaname, s.indexrelname, s.relname,
           CASE WHEN li.relation IS NULL AND lt.relation IS NULL THEN pg_relation_size(s.indexrelid) END AS size_bytes
    FROM pg_stat_user_indexes s
    JOIN pg_index x ON x.indexrelid = s.indexrelid
    LEFT JOIN exclusive_locks li ON li.relation = s.indexrelid
    LEFT JOIN exclusive_locks lt ON lt.relation = s.relid
    WHERE s.idx_scan = 0 AND x.indisvalid AND NOT x.indisunique AND NOT x.indisprimary
      AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = s.indexrelid)
)
SELECT schemaname, indexrelname, relname, size_bytes
FROM sized
WHERE size_bytes >= %(min_size)s
ORDER BY size_bytes DESC, schemaname, indexrelname
"""


@dataclass(frozen=True)
class Snapshot:
    """Everything the health checks read, as plain values."""

    database: str
    connections: Mapping[str | None, int]  # the target's database, by state
    max_connections: int
    xid_age: int
    cluster_xid_age: int
    oldest_database: str
    size_bytes: int
    invalid_indexes: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    unused_indexes: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    stats_reset: Any = None
    server: str = ""  # host:port/system identifier
    server_connections: int = 0  # client backends of every database


def read(conn: psycopg.Connection, section: HealthSection) -> Snapshot:
    with conn.cursor(row_factory=dict_row) as cur:
        by_state = cur.execute(CONNECTIONS_SQL).fetchall()
        conns = {r["state"]: int(r["n"]) for r in by_state}
        sysid = cur.execute(SERVER_SQL).fetchone()
        db = cur.execute(DATABASE_SQL).fetchone()
        assert db is not None
        invalid = cur.execute(INVALID_INDEXES_SQL).fetchall()
        params = {"min_size": section.unused_index_min_size}
        unused = read_past_exclusive_locks(lambda: cur.execute(UNUSED_INDEXES_SQL, params).fetchall())
    return Snapshot(
        database=db["datname"],
        connections=conns,
        max_connections=int(db["max_connections"]),
        xid_age=int(db["xid_age"]),
        cluster_xid_age=int(db["cluster_xid_age"] or db["xid_age"]),
        oldest_database=db["oldest_database"] or db["datname"],
        size_bytes=int(db["size_bytes"]),
        invalid_indexes=invalid,
        unused_indexes=unused,
        stats_reset=db["stats_reset"],
        server=server_label(conn, sysid["system_identifier"] if sysid else ""),
        server_connections=sum(int(r["server_n"]) for r in by_state),
    )


def server_label(conn: psycopg.Connection, system_identifier: str) -> str:
    """host:port/system identifier, host and port as the DSN reached them (a socket directory for
    a Unix-domain socket)."""
    return f"{conn.info.host}:{conn.info.port}/{system_identifier}"


def connection_counts(raw: Mapping[str | None, int]) -> dict[str, int]:
    counts = dict.fromkeys([*STATES.values(), UNKNOWN_STATE], 0)
    for state, n in raw.items():
        counts[STATES.get(state or "", UNKNOWN_STATE)] += n
    return counts


def judge(snap: Snapshot, section: HealthSection) -> JobOutput:
    """Findings and gauges from a snapshot (pure)."""
    out = JobOutput()
    counts = connection_counts(snap.connections)
    total = sum(counts.values())
    out.samples += [Sample("connections", float(n), {"state": state}) for state, n in counts.items()]
    # Server-wide figures carry the server: every target on one server reports the same series
    # values, and `max by (server)` counts them once.
    server = {"server": snap.server}
    out.samples.append(Sample("connections_max", float(snap.max_connections), server))
    out.samples.append(Sample("server_connections", float(snap.server_connections), server))
    used = snap.server_connections
    ratio = used / snap.max_connections if snap.max_connections else 0.0
    if ratio > section.connections_warn_ratio:
        out.findings.append(
            Finding(
                kind="connections_high",
                object=snap.server,
                value=used,
                message=(
                    f"server {snap.server}: {used} of max_connections {snap.max_connections} client connections "
                    f"in use across all databases ({ratio:.0%}), {total} of them in {snap.database}; new sessions "
                    "will be refused at the limit: add a connection pooler or find idle sessions"
                ),
                detail={"server": snap.server, "connections": used, "max_connections": snap.max_connections,
                        "ratio": round(ratio, 4), "database": snap.database, "database_connections": total, **counts},
            )
        )  # fmt: skip

    out.samples.append(Sample("database_xid_age", float(snap.xid_age)))
    if snap.xid_age > section.xid_age_threshold:
        out.findings.append(
            Finding(
                kind="xid_wraparound",
                object=snap.database,
                value=snap.xid_age,
                message=(
                    f"{snap.database}: age(datfrozenxid) is {snap.xid_age} transactions, past {section.xid_age_threshold}; "
                    "PostgreSQL stops accepting writes near 2 billion: find what blocks freezing (long transactions, "
                    "abandoned replication slots or prepared transactions) and VACUUM (FREEZE) the oldest tables"
                ),
                detail={
                    "database": snap.database,
                    "xid_age": snap.xid_age,
                    "threshold": section.xid_age_threshold,
                    "cluster_xid_age": snap.cluster_xid_age,
                    "oldest_database": snap.oldest_database,
                },
            )
        )

    out.samples.append(Sample("invalid_indexes", float(len(snap.invalid_indexes))))
    for ix in snap.invalid_indexes:
        name = f"{ix['index_schema']}.{ix['index_name']}"
        table = f"{ix['table_schema']}.{ix['table_name']}"
        fix = (
            "attach the missing partition indexes (ALTER INDEX ... ATTACH PARTITION)"
            if ix["partitioned"]
            else f"DROP INDEX CONCURRENTLY {name} and create it again, or REINDEX INDEX CONCURRENTLY {name}"
        )
        out.findings.append(
            Finding(
                kind="invalid_index",
                object=name,
                message=(
                    f"{name} on {table} is invalid (a CREATE INDEX CONCURRENTLY or REINDEX that failed): "
                    f"queries do not use it but writes still maintain it; {fix}"
                ),
                detail={"index": name, "table": table},
            )
        )

    out.samples.append(Sample("unused_indexes", float(len(snap.unused_indexes))))
    since = f"since {snap.stats_reset.isoformat()}" if snap.stats_reset else "since statistics began"
    for ix in snap.unused_indexes:
        name = f"{ix['schemaname']}.{ix['indexrelname']}"
        table = f"{ix['schemaname']}.{ix['relname']}"
        out.findings.append(
            Finding(
                kind="unused_index",
                object=name,
                value=int(ix["size_bytes"]),
                message=(
                    f"{name} on {table} ({ix['size_bytes']} bytes) has not been scanned {since} on this server and "
                    "backs no constraint; check standbys too, then DROP INDEX CONCURRENTLY it to save space and write work"
                ),
                detail={"index": name, "table": table, "size_bytes": int(ix["size_bytes"]),
                        "stats_reset": snap.stats_reset.isoformat() if snap.stats_reset else None},
            )
        )

    out.samples.append(Sample("database_size_bytes", float(snap.size_bytes)))
    return out


# Every finding kind this job reports, each counted in `pgupkeep_health_findings{kind}` (0 when
# absent), so alerts fire on the policy's own thresholds.
FINDING_KINDS = (
    "connections_high", "xid_wraparound", "invalid_index", "unused_index",
    "replication_slot_inactive", "replication_slot_wal_retained", "replication_slot_lost", "replication_lag",
    "sequence_exhausting", "xmin_horizon_held", "prepared_transaction_old", "table_freeze_age", "autovacuum_lagging",
)  # fmt: skip


def finding_counts(findings: Sequence[Finding]) -> dict[str, int]:
    """Findings of each kind, counting those left out of a bounded list (`over_threshold`)."""
    listed = dict.fromkeys(FINDING_KINDS, 0)
    total = dict.fromkeys(FINDING_KINDS, 0)
    for f in findings:
        listed[f.kind] = listed.get(f.kind, 0) + 1
        total[f.kind] = max(total.get(f.kind, 0), int(f.detail.get("over_threshold", 0)))
    return {kind: max(listed[kind], total[kind]) for kind in listed}


def plan(ctx: JobContext) -> Plan:
    section: HealthSection = ctx.section
    conn = ctx.conn
    snap = read(conn, section)
    out = judge(snap, section)
    out.extend(replication.judge(replication.read(conn), section, ctx.now, ctx.memo, snap.server))
    out.extend(horizon.judge(horizon.read(conn, section), section))
    out.extend(sequences.judge(sequences.read(conn, ctx.now, ctx.memo), section))
    out.extend(tables.judge(tables.read(conn, section), section, ctx.now, ctx.memo))
    server = {"server": snap.server}
    out.samples += [Sample("health_findings", float(n), {"kind": kind, **server}) for kind, n in finding_counts(out.findings).items()]
    return Plan(findings=out.findings, samples=out.samples, errors=out.errors)


KIND = JobKind(name="health", plan=plan, writes=False)
