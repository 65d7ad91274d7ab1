"""Every Prometheus metric pgupkeep exports, and `record(result)` that moves them.

Counters are derived from a result's actions and findings. Job gauges are not stored at all: a
collector renders each (target, job, item)'s last result's samples, so a series exists only while
the last result carries it, and forgetting a target is deleting its results. A scrape only reads
memory: it never touches a database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from pgupkeep import __version__
from pgupkeep.results import JobResult, Sample

# `_created` series double the series count and tell an operator nothing here.
disable_created_metrics()

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

# Gauges a job reports through samples: name (without prefix) -> (labels besides target, help).
SAMPLE_GAUGES: dict[str, tuple[tuple[str, ...], str]] = {
    "partition_premade": (("table",), "Partitions ready after the current one."),
    "partition_runway_seconds": (("table",), "Seconds until the last partition's upper bound (integer keys: at the growth seen between runs)."),
    "partition_default_rows": (("table",), "Rows in the default partition."),
    "partition_premake_target": (("table",), "The table's premake: partitions to keep ready (what fits, near an integer type's end)."),
    "partition_runway_warn": (("table",), "Fewer ready partitions than this is low runway (runway_warn, default premake)."),
    "partition_runway_values": (("table",), "Integer keys: key values left before the last ready partition's upper bound."),
    "partitions_detached": (("table",), "Partitions retired by detach and kept (or not yet dropped) as plain tables."),
    "matview_last_refresh_timestamp_seconds": (("view",), "Unix time of the last successful refresh."),
    "matview_refresh_duration_seconds": (("view",), "Duration of the last refresh."),
    "long_running_queries": (("state",), "Sessions over threshold, by state (active, idle_in_transaction)."),
    "longest_query_seconds": (("state",), "Age of the oldest session over threshold in that state."),
    "oldest_transaction_seconds": ((), "Age of the oldest open transaction of a client backend."),
    "lock_waiting_sessions": ((), "Sessions waiting on a lock longer than lock_wait_after."),
    "longest_lock_wait_seconds": ((), "Longest current wait of a session on a lock."),
    "connections": (("state",), "Client sessions of the target's database, by state."),
    "connections_max": (("server",), "The server's max_connections (server: host:port/system identifier)."),
    "server_connections": (("server",), "Client sessions of the whole server, every database (server: host:port/system identifier)."),
    "bloated_tables": ((), "Tables over any bloat threshold."),
    "table_dead_tuples": (("table",), "Dead tuples (worst report_top tables)."),
    "table_dead_tuple_ratio": (("table",), "Dead tuples / all tuples, 0-1 (worst report_top tables)."),
    "table_bloat_ratio": (("table",), "Estimated wasted share of the table, 0-1."),
    "table_bloat_bytes": (("table",), "Estimated wasted bytes."),
    "bloated_indexes": ((), "B-tree indexes over max_index_bloat_ratio."),
    "index_bloat_ratio": (("index",), "Wasted share of a B-tree index, 0-1 (worst report_top indexes)."),
    "index_bloat_bytes": (("index",), "Wasted bytes of a B-tree index (what a REINDEX would give back)."),
    "database_xid_age": ((), "age(datfrozenxid) of the database, in transactions."),
    "invalid_indexes": ((), "Invalid indexes."),
    "unused_indexes": ((), "Unused indexes over the size threshold."),
    "database_size_bytes": ((), "Database size in bytes."),
    "replication_slot_retained_bytes": (("slot", "server"), "WAL a replication slot keeps, in bytes (worst report_top slots)."),
    "replication_slot_active": (("slot", "server"), "1 if a consumer is connected to the replication slot."),
    "replication_lag_seconds": (("standby", "kind", "server"), "A standby's write, flush and replay lag as the primary sees it."),
    "standby_replay_delay_seconds": (("server",), "On a standby: how far replay is behind the WAL it has received (0 when caught up)."),
    "sequence_used_ratio": (("sequence",), "Share of its range a sequence has used, capped by the column type it feeds (worst report_top)."),
    "sequences_unreadable": ((), "Sequences whose value this role may not read (no SELECT or USAGE), so not judged."),
    "xmin_horizon_age": (("holder_kind",), "Age in transactions of the oldest xmin holder of each kind (0: none)."),
    "table_freeze_age": (("table",), "age(relfrozenxid) of the worst report_top tables by share of their freeze max age."),
    "health_findings": (("kind", "server"), "Findings of each kind in the last health run (alerts read these: the thresholds are the policy's)."),
    "statement_stats_available": ((), "1 if pg_stat_statements could be read in the target database."),
    "slow_statements": ((), "Statements over slow_mean_after in the last interval."),
    "n_plus_one_statements": ((), "N+1-shaped statements in the last interval."),
    "top_statement_seconds": (("queryid",), "Execution time in the last interval (top report_top statements)."),
    "unindexed_foreign_keys": ((), "Foreign keys without an index on their referencing columns."),
    "table_size_bytes": (("table", "part"), "Size of the largest tables (partitions rolled up); part = heap, indexes, toast."),
    "sql_last_success_timestamp_seconds": (("name",), "Unix time a named statement last ran to the end without error."),
    "sql_last_duration_seconds": (("name",), "Duration of a named statement's last successful run (all its batches)."),
    "sql_period_seconds": (("name",), "Longest time between two scheduled runs of a named statement."),
}
# Counters a job moves through samples: the sample's value is the increase since its last run.
SAMPLE_COUNTERS: dict[str, str] = {
    "statement_time_seconds_total": "Execution time of top-level statements (pg_stat_statements deltas).",
    "statement_calls_total": "Calls of top-level statements (pg_stat_statements deltas).",
}


ResultKey = tuple[str, str, str | None]  # (target, job, item)


class LastResults(Collector):
    """The job gauges: each (target, job, item)'s last measuring result's samples, rendered at
    collection. A sample a job did not report is no series."""

    def __init__(self) -> None:
        self.samples: dict[ResultKey, tuple[Sample, ...]] = {}

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("pgupkeep_" + name, help_, labels=["target", *labels])
                for name, (labels, help_) in SAMPLE_GAUGES.items()]  # fmt: skip

    def collect(self) -> list[GaugeMetricFamily]:
        families = {
            name: GaugeMetricFamily("pgupkeep_" + name, help_, labels=["target", *labels])
            for name, (labels, help_) in SAMPLE_GAUGES.items()
        }
        seen: set[tuple[str, tuple[str, ...]]] = set()
        # Rendering runs beside the runs that record results: a snapshot (one C-level copy under
        # the GIL) rather than iterating the dict they update.
        items = list(self.samples.items())
        # Sorted for a stable page; where two runs report one series, the first in that order wins.
        for (target, _job, _item), samples in sorted(items, key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")):
            for sample in samples:
                spec = SAMPLE_GAUGES.get(sample.metric)
                if spec is None:
                    continue  # an unknown name is a job bug; never let it break the scrape
                values = (target, *(str(sample.labels.get(name, "")) for name in spec[0]))
                if (sample.metric, values) in seen:
                    continue
                seen.add((sample.metric, values))
                families[sample.metric].add_metric(list(values), sample.value)
        return [f for f in families.values() if f.samples]


class TargetStates(Collector):
    """pgupkeep_targets{state}: how many of this replica's targets it leads, follows, cannot reach
    (a fleet-level figure that stays one series per state however many databases there are)."""

    STATES = ("leading", "following", "unreachable")

    def __init__(self) -> None:
        self.targets: set[str] = set()
        self.up: dict[str, bool] = {}
        self.leader: dict[str, bool] = {}

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("pgupkeep_targets", "Targets by state in this replica.", labels=["state"])]

    def collect(self) -> list[GaugeMetricFamily]:
        counts = dict.fromkeys(self.STATES, 0)
        up, leader = dict(self.up), dict(self.leader)  # snapshots: see LastResults.collect
        for t in self.targets:
            if up.get(t) is False:
                counts["unreachable"] += 1
            elif leader.get(t):
                counts["leading"] += 1
            else:
                counts["following"] += 1
        family = GaugeMetricFamily("pgupkeep_targets", "Targets by state in this replica.", labels=["state"])
        for state, n in counts.items():
            family.add_metric([state], n)
        return [family]


class Metrics:
    """The metric objects, in a registry of their own (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None, render_every: float = 1.0):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "pgupkeep_"
        self.build_info = Gauge(p + "build_info", "Always 1; the version is in the label.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.reload_ok = Gauge(p + "policy_last_reload_successful", "1 if the last policy (re)load succeeded.", registry=r)
        self.reload_ts = Gauge(p + "policy_last_reload_timestamp_seconds", "Unix time of the last (re)load attempt.", registry=r)
        self.target_up = Gauge(p + "target_up", "1 if the last connection attempt succeeded.", ["target"], registry=r)
        self.target_leader = Gauge(p + "target_leader", "1 if this replica holds the target's lease.", ["target"], registry=r)
        self.job_runs = Counter(p + "job_runs_total", "Job runs by outcome.", ["target", "job", "outcome"], registry=r)
        self.job_duration = Histogram(
            p + "job_duration_seconds", "Job run duration.", ["target", "job"], buckets=_DURATION_BUCKETS, registry=r
        )
        self.job_last_success = Gauge(
            p + "job_last_success_timestamp_seconds", "Unix time of the last successful run.", ["target", "job"], registry=r
        )
        self.job_overruns = Counter(
            p + "job_skipped_overrun_total",
            "Runs skipped because the previous run was still going (never queued).",
            ["target", "job"],
            registry=r,
        )
        self.partitions_created = Counter(p + "partitions_created_total", "Partitions created.", ["target", "table"], registry=r)
        self.partitions_retired = Counter(
            p + "partitions_retired_total", "Partitions retired.", ["target", "table", "action"], registry=r
        )
        self.lock_timeouts = Counter(
            p + "lock_timeouts_total", "DDL attempts that gave up on a lock.", ["target", "job"], registry=r
        )
        self.matview_refreshes = Counter(
            p + "matview_refreshes_total", "Materialized view refreshes.", ["target", "view", "mode", "outcome"], registry=r
        )
        self.backend_signals = Counter(
            p + "backend_signals_total", "Sessions signalled (or, dry run, that would have been).",
            ["target", "action", "dry_run"], registry=r,
        )  # fmt: skip
        self.tables_vacuumed = Counter(p + "tables_vacuumed_total", "Tables vacuumed.", ["target"], registry=r)
        self.indexes_reindexed = Counter(p + "indexes_reindexed_total", "Indexes rebuilt (REINDEX INDEX CONCURRENTLY).", ["target"], registry=r)
        self.lease_changes = Counter(
            p + "lease_changes_total", "Lease changes of this replica: acquired, lost, released.",
            ["target", "change"], registry=r,
        )  # fmt: skip
        self.job_missed = Counter(
            p + "job_missed_total", "Runs not started because the scheduler was late past misfire_grace.",
            ["target", "job"], registry=r,
        )  # fmt: skip
        self.sql_rows = Counter(
            p + "sql_rows_total", "Rows affected by named statements (every batch that committed).",
            ["target", "name"], registry=r,
        )  # fmt: skip
        self.history_write_failures = Counter(
            p + "history_write_failures_total",
            "Failed attempts to write the run history: unavailable (its database did not answer; the "
            "rows wait and are retried) or rejected (it refused the rows).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.history_rows_dropped = Counter(
            p + "history_rows_dropped_total",
            "Job runs that will not be in the run history: queue_full, rejected, shutdown.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.sample_counters: dict[str, Counter] = {
            name: Counter(p + name.removesuffix("_total"), help_, ["target"], registry=r)
            for name, help_ in SAMPLE_COUNTERS.items()
        }
        self.last = LastResults()
        r.register(self.last)
        self.states = TargetStates()
        r.register(self.states)
        ProcessCollector(registry=r)
        self._lock = threading.RLock()
        # content type -> (encoder, rendered body). A scrape sends these bytes and never renders
        # (but for the first scrape of a format); a background thread renders again after a
        # change, at most once every `render_every` seconds and never more than ~2 % of a core.
        self._pages: dict[str, tuple[Any, bytes]] = {}
        self._dirty = threading.Event()
        self._urgent = threading.Event()  # a leadership change: render now, not after the pause
        self._renderer: threading.Thread | None = None
        self.render_every = render_every

    # ------------------------------------------------------------------ exposition

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body for an Accept header: the latest rendering, at most about
        `render_every` seconds behind the values."""
        encoder, content_type = choose_encoder(accept)
        page = self._pages.get(content_type)
        if page is None:
            page = (encoder, encoder(self.registry))
            with self._lock:
                page = self._pages.setdefault(content_type, page)
        with self._lock:
            if self._renderer is None:
                self._renderer = threading.Thread(target=self._render_loop, name="metrics-render", daemon=True)
                self._renderer.start()
        return page[1], content_type

    def _render_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            started = time.monotonic()
            # Encoded without self._lock: with a thousand targets one rendering takes a second or
            # more, and every result, lease change and probe would wait for it (a rebalance of
            # 600 leases took minutes). Counters and gauges are safe to read while they change;
            # the collectors read snapshots. A change during the encoding is in the next page.
            for content_type, (encoder, _) in list(self._pages.items()):
                body = encoder(self.registry)
                with self._lock:
                    self._pages[content_type] = (encoder, body)
            spent = time.monotonic() - started
            # Changes during the pause are picked up by the next rendering: coalesced, not queued.
            self._urgent.wait(max(self.render_every, 50 * spent))
            self._urgent.clear()

    def _changed(self) -> None:
        self._dirty.set()

    # ------------------------------------------------------------------ daemon-level

    def policy_loaded(self, ok: bool, when: float | None = None) -> None:
        with self._lock:
            self.reload_ok.set(1 if ok else 0)
            self.reload_ts.set(when if when is not None else time.time())
            self._changed()

    def set_target_up(self, target: str, up: bool) -> None:
        with self._lock:
            self.target_up.labels(target).set(1 if up else 0)
            self.states.up[target] = up
            self._changed()

    def set_targets(self, names: list[str]) -> None:
        """The targets this replica schedules (discovered databases included)."""
        with self._lock:
            self.states.targets = set(names)
            self.states.up = {k: v for k, v in self.states.up.items() if k in self.states.targets}
            self.states.leader = {k: v for k, v in self.states.leader.items() if k in self.states.targets}
            self._changed()

    def overrun(self, target: str, job: str) -> None:
        with self._lock:
            self.job_overruns.labels(target, job).inc()
            self.job_runs.labels(target, job, "skipped").inc()
            self._changed()

    def lease_changed(self, target: str, change: str) -> None:
        with self._lock:
            self.lease_changes.labels(target, change).inc()
            self.target_leader.labels(target).set(1 if change == "acquired" else 0)
            self.states.leader[target] = change == "acquired"
            self._changed()
            # Who leads must not read stale: two replicas' pages could otherwise both say 1.
            self._urgent.set()

    def missed(self, target: str, job: str) -> None:
        with self._lock:
            self.job_missed.labels(target, job).inc()
            self._changed()

    def history_write_failed(self, reason: str, attempts: int = 1) -> None:
        with self._lock:
            self.history_write_failures.labels(reason).inc(attempts)
            self._changed()

    def history_rows_dropped(self, reason: str, rows: int) -> None:
        with self._lock:
            self.history_rows_dropped.labels(reason).inc(rows)
            self._changed()

    def forget_target(self, target: str) -> None:
        """Remove every series of a target that left the policy."""
        with self._lock:
            for metric in self.registry_metrics():
                for labels in list(_label_sets(metric)):
                    if labels.get("target") == target:
                        metric.remove(*labels.values())
            self.last.samples = {k: v for k, v in self.last.samples.items() if k[0] != target}
            self._changed()

    def keep_jobs(self, wanted: set[ResultKey]) -> None:
        """Forget the results of (target, job, item) runs a reloaded policy no longer schedules (a
        section or view removed): their gauges are gone."""
        with self._lock:
            self.last.samples = {k: v for k, v in self.last.samples.items() if k in wanted}
            self._changed()

    def registry_metrics(self) -> list[MetricWrapperBase]:
        return [
            self.target_up, self.target_leader, self.job_runs, self.job_duration, self.job_last_success,
            self.job_overruns, self.partitions_created, self.partitions_retired, self.lock_timeouts,
            self.matview_refreshes, self.backend_signals, self.tables_vacuumed, self.indexes_reindexed,
            self.lease_changes, self.job_missed, self.sql_rows, *self.sample_counters.values(),
        ]  # fmt: skip

    # ------------------------------------------------------------------ results

    def record(self, result: JobResult) -> None:
        t, job = result.target, result.job
        with self._lock:
            if result.target_up is not None:
                self.target_up.labels(t).set(1 if result.target_up else 0)
                self.states.up[t] = result.target_up
            if result.leader is False and not self.states.leader.get(t):
                # Leadership itself moves with lease changes (lease_changed); a run that found
                # this replica not leading only makes the series exist.
                self.target_leader.labels(t).set(0)
                self.states.leader[t] = False
            if not result.applied:  # `plan` changes nothing and counts nothing
                self._changed()
                return
            self.job_runs.labels(t, job, result.outcome).inc()
            if result.outcome != "skipped":
                self.job_duration.labels(t, job).observe(result.duration_seconds)
            if result.outcome == "success":
                self.job_last_success.labels(t, job).set(result.started_at + result.duration_seconds)
            if result.reason == "not_leader":
                # What this replica measured while it led is stale now; the leader reports it.
                self.last.samples = {k: v for k, v in self.last.samples.items() if k[:2] != (t, job)}
            for action in result.actions:
                self._count_action(t, action.action, action.applied, action.detail)
            for finding in result.findings:
                if finding.kind == "lock_timeout":
                    self.lock_timeouts.labels(t, job).inc()
            for sample in result.samples:
                counter = self.sample_counters.get(sample.metric)
                if counter is not None and sample.value >= 0:
                    counter.labels(t).inc(sample.value)
            if result.target_up is not False:
                # A run that reached the database measured: its samples are the gauges now. One
                # that could not connect measured nothing and leaves them (target_up says why).
                self.last.samples[(t, job, result.item)] = result.samples
            self._changed()

    def _count_action(self, t: str, kind: str, applied: bool, detail: Mapping[str, object]) -> None:
        table = str(detail.get("table", ""))
        # A `move` creates the partition too (create, move the default's rows, attach).
        if kind in ("create_partition", "move_default_rows") and applied:
            self.partitions_created.labels(t, table).inc()
        elif kind in ("detach_partition", "drop_partition") and applied:
            self.partitions_retired.labels(t, table, kind.split("_")[0]).inc()
        elif kind == "finish_retirement" and applied:  # the run that began it stopped before it counted
            self.partitions_retired.labels(t, table, str(detail.get("retention_action", ""))).inc()
        elif kind == "refresh_materialized_view" and "outcome" in detail:
            self.matview_refreshes.labels(t, str(detail.get("view", "")), str(detail.get("mode", "")), str(detail["outcome"])).inc()
        elif kind in ("cancel_backend", "terminate_backend"):
            dry = bool(detail.get("dry_run"))
            # A dry run reports a still-running session on every run; it is counted once.
            if applied or (dry and not detail.get("repeat")):
                self.backend_signals.labels(t, kind.split("_")[0], "true" if dry else "false").inc()
        elif kind == "vacuum_table" and applied:
            self.tables_vacuumed.labels(t).inc()
        elif kind == "reindex_index" and applied:
            self.indexes_reindexed.labels(t).inc()
        elif kind == "run_sql" and "batches" in detail:  # a run that began (not a plan's action)
            rows = detail.get("rows")
            self.sql_rows.labels(t, str(detail.get("name", ""))).inc(rows if isinstance(rows, int) and rows > 0 else 0)


def _label_sets(metric: MetricWrapperBase) -> list[dict[str, str]]:
    out = []
    for family in metric.collect():
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k in metric._labelnames}
            if labels and labels not in out:
                out.append(labels)
    return out


METRIC_NAMES = frozenset(
    {f"pgupkeep_{n}" for n in SAMPLE_GAUGES}
    | {f"pgupkeep_{n}" for n in SAMPLE_COUNTERS}
    | {
        "pgupkeep_build_info",
        "pgupkeep_policy_last_reload_successful",
        "pgupkeep_policy_last_reload_timestamp_seconds",
        "pgupkeep_target_up",
        "pgupkeep_target_leader",
        "pgupkeep_job_runs_total",
        "pgupkeep_job_duration_seconds",
        "pgupkeep_job_last_success_timestamp_seconds",
        "pgupkeep_job_skipped_overrun_total",
        "pgupkeep_partitions_created_total",
        "pgupkeep_partitions_retired_total",
        "pgupkeep_lock_timeouts_total",
        "pgupkeep_matview_refreshes_total",
        "pgupkeep_backend_signals_total",
        "pgupkeep_tables_vacuumed_total",
        "pgupkeep_indexes_reindexed_total",
        "pgupkeep_lease_changes_total",
        "pgupkeep_job_missed_total",
        "pgupkeep_targets",
        "pgupkeep_sql_rows_total",
        "pgupkeep_history_write_failures_total",
        "pgupkeep_history_rows_dropped_total",
    }
)
# The standard process_* families of prometheus_client's ProcessCollector (Linux).
PROCESS_METRIC_NAMES = frozenset(
    {
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    }
)
