"""What holds back vacuum: the oldest xmin holder of each kind (a session of this database, a
replication slot, a prepared transaction of this database, a standby's hot_standby_feedback), and
prepared transactions left open. Two statements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.jobs.health.common import count, seconds, threshold
from pgupkeep.policy import HealthSection
from pgupkeep.results import Finding, JobOutput, Sample

HOLDER_KINDS = ("session", "replication_slot", "prepared_transaction", "standby_feedback")

# Sessions of other databases do not hold this database's horizon (only shared catalogs'), and
# walsenders' xmin is their standby's feedback, read from pg_stat_replication. Autovacuum workers
# are skipped by other vacuums' horizon, so they are not holders. Slots hold every database's:
# xmin (a physical slot with hot_standby_feedback) for all tables, catalog_xmin (a logical slot)
# for the system catalogs, and so for datfrozenxid.
HORIZON_SQL = """
WITH holders AS (
    SELECT 'session' AS holder_kind, a.pid::text AS holder,
           greatest(age(a.backend_xmin), age(a.backend_xid)) AS xid_age,
           jsonb_build_object(
               'pid', a.pid, 'state', a.state, 'usename', a.usename, 'application_name', a.application_name,
               'backend_type', a.backend_type,
               'xact_age_seconds', round(extract(epoch FROM now() - a.xact_start)::numeric, 3),
               'state_age_seconds', round(extract(epoch FROM now() - a.state_change)::numeric, 3)) AS detail
    FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
      AND a.backend_type NOT IN ('walsender', 'autovacuum worker')
      AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
    UNION ALL
    SELECT 'replication_slot', s.slot_name,
           greatest(age(s.xmin), age(s.catalog_xmin)),
           jsonb_build_object(
               'slot', s.slot_name, 'slot_type', s.slot_type, 'database', s.database, 'active', s.active,
               'holds', CASE WHEN s.xmin IS NOT NULL AND age(s.xmin) >= coalesce(age(s.catalog_xmin), 0)
                             THEN 'xmin' ELSE 'catalog_xmin' END)
    FROM pg_replication_slots s
    WHERE s.xmin IS NOT NULL OR s.catalog_xmin IS NOT NULL
    UNION ALL
    SELECT 'prepared_transaction', p.gid, age(p.transaction),
           jsonb_build_object(
               'gid', p.gid, 'owner', p.owner, 'database', p.database,
               'prepared', p.prepared, 'age_seconds', round(extract(epoch FROM now() - p.prepared)::numeric, 3))
    FROM pg_prepared_xacts p
    WHERE p.database = current_database()
    UNION ALL
    SELECT 'standby_feedback', coalesce(nullif(r.application_name, ''), r.client_addr::text, 'local'), age(r.backend_xmin),
           jsonb_build_object('standby', r.application_name, 'client_addr', r.client_addr::text, 'pid', r.pid)
    FROM pg_stat_replication r
    WHERE r.backend_xmin IS NOT NULL
)
SELECT DISTINCT ON (holder_kind) holder_kind, holder, xid_age, detail
FROM holders
ORDER BY holder_kind, xid_age DESC, holder
"""

PREPARED_SQL = """
SELECT p.gid, p.owner, p.prepared, age(p.transaction) AS xid_age,
       extract(epoch FROM now() - p.prepared)::float8 AS age_seconds
FROM pg_prepared_xacts p
WHERE p.database = current_database() AND p.prepared < now() - %(after)s::interval
ORDER BY p.prepared, p.gid
"""


@dataclass(frozen=True)
class Horizon:
    oldest: Mapping[str, Mapping[str, Any]]  # holder_kind -> its oldest holder
    prepared: Sequence[Mapping[str, Any]] = field(default_factory=tuple)  # older than the threshold


def read(conn: psycopg.Connection, section: HealthSection) -> Horizon:
    with conn.cursor(row_factory=dict_row) as cur:
        oldest = {r["holder_kind"]: r for r in cur.execute(HORIZON_SQL)}
        prepared = cur.execute(PREPARED_SQL, {"after": section.prepared_transaction_after}).fetchall()
    return Horizon(oldest=oldest, prepared=prepared)


def judge(h: Horizon, section: HealthSection) -> JobOutput:
    out = JobOutput()
    out.samples += [
        Sample("xmin_horizon_age", float(h.oldest[k]["xid_age"]) if k in h.oldest else 0.0, {"holder_kind": k})
        for k in HOLDER_KINDS
    ]
    if h.oldest:
        top = max(h.oldest.values(), key=lambda r: (r["xid_age"], r["holder_kind"]))
        if top["xid_age"] >= section.xmin_horizon_warn:
            out.findings.append(_held(top, h.oldest, section))
    for p in h.prepared:
        out.findings.append(
            Finding(
                kind="prepared_transaction_old",
                object=p["gid"],
                value=round(p["age_seconds"], 3),
                message=(
                    f"prepared transaction '{p['gid']}' (owner {p['owner']}) was prepared {seconds(p['age_seconds'])} ago "
                    f"(past {threshold(section.prepared_transaction_after)}) and holds its locks and the xmin horizon "
                    f"({count(p['xid_age'])} transactions) until its transaction manager finishes it: find out whether it "
                    f"committed elsewhere, then COMMIT PREPARED '{p['gid']}' or ROLLBACK PREPARED '{p['gid']}'"
                ),
                detail={
                    "gid": p["gid"],
                    "owner": p["owner"],
                    "prepared": p["prepared"].isoformat(),
                    "age_seconds": round(p["age_seconds"], 3),
                    "xid_age": p["xid_age"],
                },
            )
        )
    return out


def _held(top: Mapping[str, Any], oldest: Mapping[str, Mapping[str, Any]], section: HealthSection) -> Finding:
    kind, holder, age, d = top["holder_kind"], top["holder"], int(top["xid_age"]), dict(top["detail"])
    if kind == "session":
        who = (
            f"session pid {d['pid']} (user {d['usename']}, application {d['application_name'] or '-'}, "
            f"{d['state'] or d['backend_type']} for {seconds(float(d['state_age_seconds'] or 0))}, "
            f"transaction open {seconds(float(d['xact_age_seconds'] or 0))})"
        )
        fix = (
            f"end that transaction (its owner, or SELECT pg_terminate_backend({d['pid']})); long_running_queries' "
            "terminate_after can do it for you"
        )
    elif kind == "replication_slot":
        who = f"{d['slot_type']} replication slot {holder} ({d['holds']}{', inactive' if not d['active'] else ''})"
        fix = (
            f"let its consumer catch up, or drop it if nobody consumes it (SELECT pg_drop_replication_slot('{holder}'))"
            if d["holds"] == "catalog_xmin"
            else "end the long queries on the standby that feeds it back (hot_standby_feedback), or drop the slot if unused"
        )
    elif kind == "prepared_transaction":
        who = f"prepared transaction '{holder}' (owner {d['owner']}, prepared {seconds(float(d['age_seconds']))} ago)"
        fix = f"COMMIT PREPARED '{holder}' or ROLLBACK PREPARED '{holder}' once you know its outcome elsewhere"
    else:
        who = f"standby {holder} through hot_standby_feedback"
        fix = "end the long query or transaction on that standby, or lower its max_standby_streaming_delay"
    return Finding(
        kind="xmin_horizon_held",
        object=holder,
        value=age,
        message=(
            f"{who} holds the xmin horizon {count(age)} transactions back (past {count(section.xmin_horizon_warn)}): "
            f"vacuum cannot remove rows deleted since then, and tables cannot be frozen past it; {fix}"
        ),
        detail={
            "holder_kind": kind,
            "holder": holder,
            "xid_age": age,
            **d,
            "oldest_by_kind": {k: int(r["xid_age"]) for k, r in sorted(oldest.items())},
        },
    )
