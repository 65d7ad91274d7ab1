"""Replication: slots (activity, WAL they keep, whether they are lost) and lag, as the primary sees
its standbys and as a standby sees its own replay. Three small statements, on a primary or a
standby alike: functions that fail during recovery (pg_current_wal_lsn) sit behind
pg_is_in_recovery() in the same statement.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgupkeep.jobs.health.common import bounded, seconds, size, threshold
from pgupkeep.policy import HealthSection
from pgupkeep.results import Finding, JobOutput, Sample

# Where WAL stands on this server: written (primary) or received/replayed (standby).
WAL_POSITION = """CASE WHEN pg_is_in_recovery()
            THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())
            ELSE pg_current_wal_lsn() END"""

# A standby's replay delay: 0 while it streams and has replayed all it received; otherwise the age
# of the last transaction it replayed (an upper bound when the primary was idle before). A
# standby that is not streaming is judged too: it falls behind with nothing received.
SERVER_SQL = f"""
SELECT pg_is_in_recovery() AS in_recovery,
       {WAL_POSITION} AS wal_lsn,
       r.status AS receiver_status,
       r.sender_host,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS replay_paused,
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) AS unreplayed_bytes,
       CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN r.status = 'streaming' AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE greatest(0, extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::float8
       END AS replay_delay_seconds,
       current_setting('cluster_name') AS cluster_name
FROM (SELECT 1) one
LEFT JOIN pg_stat_wal_receiver r ON true
"""

# Columns newer than PostgreSQL 14 (inactive_since, invalidation_reason, synced: 17; conflicting: 16)
# are read through to_jsonb, so one statement serves every version; `knows_inactive_since` says
# whether the server tracks it (before 17 pgupkeep notes when it first saw the slot inactive).
SLOTS_SQL = f"""
SELECT s.slot_name, s.slot_type, s.database, s.temporary, s.active, s.wal_status,
       s.safe_wal_size::float8 AS safe_wal_size,
       pg_wal_lsn_diff(w.lsn, s.restart_lsn)::float8 AS retained_bytes,
       j ? 'inactive_since' AS knows_inactive_since,
       extract(epoch FROM now() - (j ->> 'inactive_since')::timestamptz)::float8 AS inactive_seconds,
       coalesce((j ->> 'conflicting')::bool, false) AS conflicting,
       j ->> 'invalidation_reason' AS invalidation_reason,
       coalesce((j ->> 'synced')::bool, false) AS synced,
       current_setting('max_slot_wal_keep_size') AS max_slot_wal_keep_size
FROM pg_replication_slots s
CROSS JOIN LATERAL to_jsonb(s) AS j
CROSS JOIN (SELECT {WAL_POSITION} AS lsn) w
ORDER BY s.slot_name
"""

# Each standby streaming from this server (on a standby: its cascaded standbys). The *_lag
# columns are NULL once a standby is idle and caught up: that reads as no lag.
STANDBYS_SQL = f"""
SELECT r.application_name, r.client_addr::text AS client_addr, r.state, r.sync_state,
       coalesce(extract(epoch FROM r.write_lag), 0)::float8 AS write,
       coalesce(extract(epoch FROM r.flush_lag), 0)::float8 AS flush,
       coalesce(extract(epoch FROM r.replay_lag), 0)::float8 AS replay,
       pg_wal_lsn_diff(w.lsn, r.replay_lsn)::float8 AS replay_bytes
FROM pg_stat_replication r
CROSS JOIN (SELECT {WAL_POSITION} AS lsn) w
ORDER BY r.application_name, r.client_addr, r.pid
"""

LAG_KINDS = ("write", "flush", "replay")
MEMO_KEY = "slot_inactive_since"  # slot name -> when pgupkeep first saw it inactive (before 17)


@dataclass(frozen=True)
class Replication:
    server: Mapping[str, Any]
    slots: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    standbys: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


def read(conn: psycopg.Connection) -> Replication:
    with conn.cursor(row_factory=dict_row) as cur:
        server = cur.execute(SERVER_SQL).fetchone()
        assert server is not None
        slots = cur.execute(SLOTS_SQL).fetchall()
        standbys = cur.execute(STANDBYS_SQL).fetchall()
    return Replication(server=server, slots=slots, standbys=standbys)


def judge(
    rep: Replication, section: HealthSection, now: datetime, memo: MutableMapping[str, Any], server: str = ""
) -> JobOutput:
    """Slots, standbys and replay belong to the server, not to the target's database: their series
    carry the `server` label (as connections_max does), so `max by (server)` counts them once
    however many targets (databases) of that server report them."""
    out = JobOutput()
    out.extend(_slots(rep.slots, section, now, memo))
    out.extend(_standbys(rep.standbys, section))
    if rep.server["in_recovery"]:
        out.extend(_replay(rep.server, section))
    out.samples = [Sample(s.metric, s.value, {**s.labels, "server": server}) for s in out.samples]
    out.findings = [Finding(f.kind, f.object, f.value, f.message, {**f.detail, "server": server}) for f in out.findings]
    return out


def _slots(slots: Sequence[Mapping[str, Any]], section: HealthSection, now: datetime, memo: MutableMapping[str, Any]) -> JobOutput:
    out = JobOutput()
    first_seen: dict[str, datetime] = memo.get(MEMO_KEY, {})
    seen: dict[str, datetime] = {}
    inactive, retained, lost = [], [], []
    for s in slots:
        name = s["slot_name"]
        kind = s["slot_type"]
        what = f"{kind} slot {name}" + (f" (database {s['database']})" if s["database"] else "")
        held = s["retained_bytes"]
        detail: dict[str, Any] = {
            "slot": name,
            "slot_type": kind,
            "database": s["database"],
            "active": bool(s["active"]),
            "wal_status": s["wal_status"],
            "retained_bytes": held,
            "safe_wal_size": s["safe_wal_size"],
        }
        reason = s["invalidation_reason"] or ("conflict with recovery" if s["conflicting"] else None)
        if s["wal_status"] == "lost" or reason:
            lost.append(
                Finding(
                    kind="replication_slot_lost",
                    object=name,
                    message=(
                        f"{what} is invalidated ({reason or 'the WAL it needed was removed'}): its consumer can never "
                        f"resume from it; rebuild that standby or re-create that subscription, then drop the slot: "
                        f"SELECT pg_drop_replication_slot('{name}')"
                    ),
                    detail={**detail, "invalidation_reason": reason},
                )
            )
            continue
        idle_for: float | None = None
        # A slot a standby keeps in sync with its primary's (17+) has no consumer there by design.
        if not s["active"] and not s["synced"]:
            if s["knows_inactive_since"] and s["inactive_seconds"] is not None:
                idle_for = float(s["inactive_seconds"])
            else:  # before PostgreSQL 17: from when this process first saw it inactive
                seen[name] = first_seen.get(name, now)
                idle_for = (now - seen[name]).total_seconds()
        keep = f"retains {size(held)} of WAL" if held is not None else "retains no WAL"
        if idle_for is not None and idle_for >= section.slot_inactive_after.total_seconds():
            inactive.append(
                Finding(
                    kind="replication_slot_inactive",
                    object=name,
                    value=round(idle_for, 3),
                    message=(
                        f"{what} has had no consumer for {seconds(idle_for)} (past {threshold(section.slot_inactive_after)}) and {keep}, "
                        "which PostgreSQL keeps until the slot is consumed or dropped: restart its standby or subscriber, or if "
                        f"it is gone for good SELECT pg_drop_replication_slot('{name}')"
                    ),
                    detail={**detail, "inactive_seconds": round(idle_for, 3), "since_first_seen": not s["knows_inactive_since"]},
                )
            )
        unreserved = s["wal_status"] == "unreserved"
        if held is not None and (held >= section.slot_retained_warn or unreserved):
            limit = (
                f"{size(s['safe_wal_size'])} more and max_slot_wal_keep_size ({s['max_slot_wal_keep_size']}) invalidates it"
                if s["safe_wal_size"] is not None
                else "max_slot_wal_keep_size is unlimited, so the WAL grows until the disk is full"
            )
            state = "already past max_slot_wal_keep_size: the next checkpoint invalidates it" if unreserved else limit
            out_of = "" if unreserved else f" (past {size(section.slot_retained_warn)})"
            consumer = "catch its consumer up" if s["active"] else "its consumer is not connected: restart it"
            retained.append(
                Finding(
                    kind="replication_slot_wal_retained",
                    object=name,
                    value=held,
                    message=(
                        f"{what} {keep}{out_of}; {state}: {consumer}, or drop the slot if the consumer is gone "
                        f"(SELECT pg_drop_replication_slot('{name}'))"
                    ),
                    detail=detail,
                )
            )
    memo[MEMO_KEY] = seen
    worst = sorted(slots, key=lambda s: -(s["retained_bytes"] or 0))[: section.report_top]
    for s in worst:
        labels = {"slot": s["slot_name"]}
        out.samples.append(Sample("replication_slot_retained_bytes", float(s["retained_bytes"] or 0), labels))
        out.samples.append(Sample("replication_slot_active", 1.0 if s["active"] else 0.0, labels))
    out.findings += lost
    out.findings += bounded(sorted(inactive, key=lambda f: -(f.value or 0)), section.report_top)
    out.findings += bounded(sorted(retained, key=lambda f: -(f.value or 0)), section.report_top)
    return out


def standby_names(standbys: Sequence[Mapping[str, Any]]) -> list[str]:
    """The `standby` label: its application_name, with its address where two share a name."""
    names = [r["application_name"] or "" for r in standbys]
    out = []
    for r, name in zip(standbys, names, strict=True):
        if names.count(name) > 1 or not name:
            name = f"{name}@{r['client_addr'] or 'local'}"
        out.append(name)
    return out


def _standbys(standbys: Sequence[Mapping[str, Any]], section: HealthSection) -> JobOutput:
    out = JobOutput()
    warn = section.replication_lag_warn.total_seconds()
    for r, name in zip(standbys, standby_names(standbys), strict=True):
        lags = {kind: float(r[kind]) for kind in LAG_KINDS}
        out.samples += [Sample("replication_lag_seconds", lag, {"standby": name, "kind": kind}) for kind, lag in lags.items()]
        worst = max(lags, key=lambda k: lags[k])
        if lags[worst] > warn:
            out.findings.append(
                Finding(
                    kind="replication_lag",
                    object=name,
                    value=round(lags[worst], 3),
                    message=(
                        f"standby {name} ({r['state']}, {r['sync_state']}) is {seconds(lags[worst])} behind in {worst} "
                        f"(past {threshold(section.replication_lag_warn)}; {size(r['replay_bytes'] or 0)} not yet replayed): "
                        "check its disk and CPU, the network, and long queries there that pause replay "
                        "(max_standby_streaming_delay)"
                        + ("; a synchronous standby this slow delays every commit here" if r["sync_state"] in ("sync", "quorum") else "")
                    ),
                    detail={
                        "standby": name,
                        "client_addr": r["client_addr"],
                        "state": r["state"],
                        "sync_state": r["sync_state"],
                        **{f"{k}_lag_seconds": round(v, 3) for k, v in lags.items()},
                        "replay_bytes": r["replay_bytes"],
                    },
                )
            )
    return out


def _replay(server: Mapping[str, Any], section: HealthSection) -> JobOutput:
    out = JobOutput()
    delay = server["replay_delay_seconds"]
    if delay is None:  # nothing replayed since this standby started: no timestamp to measure from
        return out
    delay = float(delay)
    out.samples.append(Sample("standby_replay_delay_seconds", delay))
    if delay <= section.replication_lag_warn.total_seconds():
        return out
    name = server["cluster_name"] or "standby"
    streaming = server["receiver_status"] == "streaming"
    if server["replay_paused"]:
        why = "replay is paused: SELECT pg_wal_replay_resume() when whoever paused it is done"
    elif not streaming:
        why = (
            f"it is not receiving WAL (wal receiver: {server['receiver_status'] or 'not running'}): check primary_conninfo, "
            "the primary and the network, or the archive it restores from"
        )
    else:
        why = "check its disk and CPU, and long queries here that pause replay (max_standby_streaming_delay)"
    out.findings.append(
        Finding(
            kind="replication_lag",
            object=name,
            value=round(delay, 3),
            message=(
                f"this standby's replay is {seconds(delay)} behind (past {threshold(section.replication_lag_warn)}; "
                f"{size(server['unreplayed_bytes'] or 0)} received but not replayed); {why}"
            ),
            detail={
                "standby": name,
                "replay_delay_seconds": round(delay, 3),
                "unreplayed_bytes": server["unreplayed_bytes"],
                "receiving": streaming,
                "receiver_status": server["receiver_status"],
                "sender_host": server["sender_host"],
                "replay_paused": bool(server["replay_paused"]),
            },
        )
    )
    return out

