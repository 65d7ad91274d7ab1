"""The result sinks: metrics derived from a result (fresh registry) and the log events it writes."""

from __future__ import annotations

import io
import json

import structlog
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgupkeep import logs
from pgupkeep.metrics import METRIC_NAMES, PROCESS_METRIC_NAMES, Metrics
from pgupkeep.results import Action, Finding, JobResult, Sample


def result(**kw) -> JobResult:
    base = {"target": "shop", "job": "partitions", "outcome": "success", "duration_seconds": 0.25, "started_at": 1000.0}
    return JobResult(**{**base, **kw})


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


def test_counters_come_from_actions_and_findings():
    m = Metrics()
    m.lease_changed("shop", "acquired")  # leadership moves with the lease, not with results
    m.record(
        result(
            actions=(
                Action("create_partition", "public.orders_2027_01", "CREATE ...", True, {"table": "public.orders"}),
                Action("create_partition", "public.orders_2027_02", "CREATE ...", False, {"table": "public.orders"}),
                Action("move_default_rows", "public.orders_2027_03", "INSERT ...", True, {"table": "public.orders"}),
                Action("detach_partition", "public.orders_2024_01", "ALTER ...", True, {"table": "public.orders"}),
                Action("drop_partition", "public.orders_2023_12", "DROP ...", True, {"table": "public.orders"}),
            ),
            findings=(Finding("lock_timeout", "public.orders", 1), Finding("lock_timeout", "public.orders", 2)),
            target_up=True,
            leader=True,
        )
    )
    assert value(m, "pgupkeep_partitions_created_total", target="shop", table="public.orders") == 2
    assert value(m, "pgupkeep_partitions_retired_total", target="shop", table="public.orders", action="detach") == 1
    assert value(m, "pgupkeep_partitions_retired_total", target="shop", table="public.orders", action="drop") == 1
    assert value(m, "pgupkeep_lock_timeouts_total", target="shop", job="partitions") == 2
    assert value(m, "pgupkeep_job_runs_total", target="shop", job="partitions", outcome="success") == 1
    assert value(m, "pgupkeep_job_last_success_timestamp_seconds", target="shop", job="partitions") == 1000.25
    assert value(m, "pgupkeep_job_duration_seconds_count", target="shop", job="partitions") == 1
    assert value(m, "pgupkeep_target_up", target="shop") == 1
    assert value(m, "pgupkeep_target_leader", target="shop") == 1


def test_signals_refreshes_and_vacuums():
    m = Metrics()
    m.record(
        result(
            job="long_running_queries",
            actions=(
                Action("cancel_backend", "pid 10", "SELECT ...", True, {"pid": 10, "dry_run": False}),
                Action("terminate_backend", "pid 11", "SELECT ...", False, {"pid": 11, "dry_run": True}),
                Action("cancel_backend", "pid 12", "SELECT ...", False, {"pid": 12, "dry_run": False, "skipped_reason": "gone"}),
                # Reported by an earlier dry run already: counted then, not again.
                Action("terminate_backend", "pid 13", "SELECT ...", False, {"pid": 13, "dry_run": True, "repeat": True}),
            ),
        )
    )
    m.record(
        result(
            job="materialized_views",
            actions=(
                Action("refresh_materialized_view", "r.v", "REFRESH ...", True, {"view": "r.v", "mode": "concurrent", "outcome": "success"}),
                Action("refresh_materialized_view", "r.w", "REFRESH ...", False, {"view": "r.w", "mode": "blocking", "outcome": "failure"}),
            ),
        )
    )
    m.record(result(job="bloat", actions=(Action("vacuum_table", "public.t", "VACUUM ...", True, {"table": "public.t"}),)))
    assert value(m, "pgupkeep_backend_signals_total", target="shop", action="cancel", dry_run="false") == 1
    assert value(m, "pgupkeep_backend_signals_total", target="shop", action="terminate", dry_run="true") == 1
    assert value(m, "pgupkeep_matview_refreshes_total", target="shop", view="r.v", mode="concurrent", outcome="success") == 1
    assert value(m, "pgupkeep_matview_refreshes_total", target="shop", view="r.w", mode="blocking", outcome="failure") == 1
    assert value(m, "pgupkeep_tables_vacuumed_total", target="shop") == 1


def test_gauges_a_job_stops_reporting_disappear_and_plans_count_nothing():
    m = Metrics()
    first = (
        Sample("table_bloat_ratio", 0.5, {"table": "public.a"}),
        Sample("table_bloat_ratio", 0.4, {"table": "public.b"}),
        Sample("bloated_tables", 2),
    )
    m.record(result(job="bloat", samples=first))
    m.record(result(job="bloat", samples=(Sample("table_bloat_ratio", 0.6, {"table": "public.b"}), Sample("bloated_tables", 1))))
    assert value(m, "pgupkeep_table_bloat_ratio", target="shop", table="public.a") is None
    assert value(m, "pgupkeep_table_bloat_ratio", target="shop", table="public.b") == 0.6
    assert value(m, "pgupkeep_bloated_tables", target="shop") == 1
    m.record(result(job="bloat", applied=False, samples=(Sample("bloated_tables", 9),)))
    assert value(m, "pgupkeep_bloated_tables", target="shop") == 1
    assert value(m, "pgupkeep_job_runs_total", target="shop", job="bloat", outcome="success") == 2


def test_overruns_and_forgotten_targets():
    m = Metrics()
    m.overrun("shop", "materialized_views")
    assert value(m, "pgupkeep_job_skipped_overrun_total", target="shop", job="materialized_views") == 1
    assert value(m, "pgupkeep_job_runs_total", target="shop", job="materialized_views", outcome="skipped") == 1
    m.record(result(samples=(Sample("partition_premade", 3, {"table": "public.orders"}),), target_up=True))
    m.forget_target("shop")
    assert not [k for k in samples(m) if ("target", "shop") in k[1]]


def test_a_reload_removes_the_gauges_of_runs_it_no_longer_schedules():
    m = Metrics()
    mv = {"job": "materialized_views"}
    m.record(result(**mv, item="public.a,public.b", samples=(
        Sample("matview_last_refresh_timestamp_seconds", 10, {"view": "public.a"}),
        Sample("matview_last_refresh_timestamp_seconds", 20, {"view": "public.b"}),
    )))
    m.record(result(**mv, item="public.c", samples=(Sample("matview_last_refresh_timestamp_seconds", 40, {"view": "public.c"}),)))
    m.record(result(samples=(Sample("partition_premade", 3, {"table": "public.orders"}),)))
    # public.b and the partitions section left the policy; public.a now has a schedule of its own:
    # its gauge is gone until that run reports it (absent, never stale).
    m.keep_jobs({("shop", "materialized_views", "public.a"), ("shop", "materialized_views", "public.c")})
    last = "pgupkeep_matview_last_refresh_timestamp_seconds"
    assert value(m, last, target="shop", view="public.b") is None
    assert value(m, "pgupkeep_partition_premade", target="shop", table="public.orders") is None
    assert value(m, last, target="shop", view="public.c") == 40
    assert value(m, last, target="shop", view="public.a") is None
    m.record(result(**mv, item="public.a", samples=(Sample("matview_last_refresh_timestamp_seconds", 30, {"view": "public.a"}),)))
    assert value(m, last, target="shop", view="public.a") == 30


def test_every_exported_family_is_known():
    m = Metrics()
    m.policy_loaded(True, when=5.0)
    names = {f.name for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    assert {n.removesuffix("_total") for n in METRIC_NAMES | PROCESS_METRIC_NAMES} >= names
    assert value(m, "pgupkeep_policy_last_reload_successful") == 1
    assert value(m, "pgupkeep_policy_last_reload_timestamp_seconds") == 5.0


def test_log_result_writes_one_job_finished_and_an_event_per_action_and_finding():
    res = result(
        actions=(Action("create_partition", "public.orders_2027_01", "CREATE TABLE ...", True, {"table": "public.orders"}),),
        findings=(
            Finding("default_partition_rows", "public.orders", 12, "12 rows", {"conflict": True, "range": "2027-03"}),
            Finding("default_partition_rows", "public.items", 0, "", {"conflict": False}),
            Finding("lock_timeout", "public.orders", 1, "blocked", {"blocking_pids": [42]}),
        ),
    )
    with structlog.testing.capture_logs() as captured:
        logs.log_result(res)
    assert [(e["event"], e["log_level"]) for e in captured] == [
        ("partition_created", "info"),
        ("default_partition_conflict", "warning"),
        ("lock_timeout", "warning"),
        ("job_finished", "info"),
    ]
    assert captured[-1] == {
        "event": "job_finished", "log_level": "info", "target": "shop", "job": "partitions",
        "outcome": "success", "duration_seconds": 0.25, "actions": 1, "findings": 3,
    }  # fmt: skip
    assert captured[2]["blocking_pids"] == [42]


def test_failures_and_unreachable_targets_are_logged_as_such():
    res = result(outcome="failure", error="connection refused", target_up=False)
    with structlog.testing.capture_logs() as captured:
        logs.log_result(res)
    assert [(e["event"], e["log_level"]) for e in captured] == [("target_unreachable", "warning"), ("job_finished", "error")]


def test_json_lines_have_timestamp_level_event_first():
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        logs.get_logger().info("daemon_started", version="x")
        import logging

        logging.getLogger("psycopg").warning("from the standard library")
    finally:
        logs.configure("info", "json")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert list(lines[0])[:3] == ["timestamp", "level", "event"]
    assert lines[0]["event"] == "daemon_started" and lines[0]["timestamp"].endswith("Z")
    assert lines[1]["event"] == "from the standard library" and lines[1]["logger"] == "psycopg"


def test_a_replica_that_lost_the_lease_drops_its_job_gauges():
    m = Metrics()
    m.record(result(job="health", samples=(Sample("database_size_bytes", 123),), target_up=True, leader=True))
    assert value(m, "pgupkeep_database_size_bytes", target="shop") == 123
    m.record(result(job="health", outcome="skipped", reason="not_leader", target_up=True, leader=False))
    assert value(m, "pgupkeep_database_size_bytes", target="shop") is None
    assert value(m, "pgupkeep_target_leader", target="shop") == 0


def test_scrapes_are_served_from_a_rendering_made_when_something_changed():
    import time

    m = Metrics(render_every=0.05)
    text, content_type = m.render("")
    again, _ = m.render("")
    assert again is text and content_type.startswith("text/plain")
    om, om_type = m.render("application/openmetrics-text; version=1.0.0")
    assert om_type.startswith("application/openmetrics-text") and om.endswith(b"# EOF\n")
    m.record(result(job="health", samples=(Sample("database_size_bytes", 77),)))
    line = b'pgupkeep_database_size_bytes{target="shop"} 77.0'
    deadline = time.monotonic() + 5
    while line not in m.render("")[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert line in m.render("")[0]
    assert line in m.render("application/openmetrics-text")[0]
    # Nothing changed since: the same bytes, not a new rendering.
    time.sleep(0.2)
    assert m.render("")[0] is m.render("")[0]


def test_every_action_and_finding_of_the_vocabulary_has_its_log_event():
    from pgupkeep.results import ACTIONS, FINDINGS

    events = {}
    for kind in ACTIONS:
        with structlog.testing.capture_logs() as captured:
            logs.log_result(result(actions=(Action(kind, "x", "SQL", True),)))
        events[kind] = captured[0]["event"]
    for kind in FINDINGS:
        detail = {"conflict": True} if kind == "default_partition_rows" else {}
        with structlog.testing.capture_logs() as captured:
            logs.log_result(result(findings=(Finding(kind, "x", 1, "", detail),)))
        events[kind] = captured[0]["event"]
    # The spec's event names, for the kinds it names.
    assert {k: events[k] for k in ("create_partition", "detach_partition", "drop_partition", "refresh_materialized_view",
                                   "cancel_backend", "terminate_backend", "vacuum_table", "default_partition_rows",
                                   "lock_timeout", "long_running_query", "idle_in_transaction", "bloated_table",
                                   "invalid_index", "xid_wraparound")} == {
        "create_partition": "partition_created", "detach_partition": "partition_retired",
        "drop_partition": "partition_retired", "refresh_materialized_view": "matview_refreshed",
        "cancel_backend": "backend_signalled", "terminate_backend": "backend_signalled",
        "vacuum_table": "table_vacuumed", "default_partition_rows": "default_partition_conflict",
        "lock_timeout": "lock_timeout", "long_running_query": "long_running_query",
        "idle_in_transaction": "idle_in_transaction", "bloated_table": "bloated_table",
        "invalid_index": "invalid_index", "xid_wraparound": "xid_wraparound_risk",
    }  # fmt: skip
    assert "job_finished" not in events.values()


def test_a_gauge_family_a_later_result_does_not_mention_is_gone():
    m = Metrics()
    m.record(result(job="bloat", samples=(Sample("table_bloat_ratio", 0.9, {"table": "public.big"}), Sample("bloated_tables", 1))))
    assert value(m, "pgupkeep_table_bloat_ratio", target="shop", table="public.big") == 0.9
    # The next run reports no table at all (nothing over min_table_size): no series is left behind.
    m.record(result(job="bloat", samples=(Sample("bloated_tables", 0),)))
    assert value(m, "pgupkeep_table_bloat_ratio", target="shop", table="public.big") is None
    assert value(m, "pgupkeep_bloated_tables", target="shop") == 0
    # A run that could not connect measured nothing: the last measurement stays, target_up says why.
    m.record(result(job="bloat", outcome="failure", target_up=False))
    assert value(m, "pgupkeep_bloated_tables", target="shop") == 0
    assert value(m, "pgupkeep_target_up", target="shop") == 0


def test_process_metrics_and_lease_changes_are_exported():
    m = Metrics()
    m.lease_changed("shop", "acquired")
    assert value(m, "pgupkeep_target_leader", target="shop") == 1
    m.lease_changed("shop", "lost")
    assert value(m, "pgupkeep_target_leader", target="shop") == 0
    assert value(m, "pgupkeep_lease_changes_total", target="shop", change="acquired") == 1
    assert value(m, "pgupkeep_lease_changes_total", target="shop", change="lost") == 1
    assert (value(m, "process_resident_memory_bytes") or 0) > 0


def test_a_slow_rendering_never_holds_up_results_or_lease_changes():
    """With a thousand targets one rendering takes seconds; recording a result or a lease change
    meanwhile must not wait for it (a rebalance of hundreds of leases once took minutes)."""
    import threading

    from prometheus_client.registry import Collector

    m = Metrics(render_every=0.01)
    entered, release = threading.Event(), threading.Event()

    class Slow(Collector):
        def collect(self):
            if threading.current_thread().name == "metrics-render":
                entered.set()
                release.wait(30)
            return []

    m.render("")  # the first page (and the renderer thread), before the collector is slow
    m.registry.register(Slow())
    try:
        m.record(result(job="health", samples=(Sample("database_size_bytes", 5),)))
        assert entered.wait(10), "the renderer did not start a rendering"
        done = threading.Event()

        def change() -> None:
            for i in range(100):
                m.lease_changed(f"shop/t{i}", "acquired")
            m.record(result(job="health", samples=(Sample("database_size_bytes", 6),)))
            m.render("")  # a scrape is served the last page meanwhile
            done.set()

        threading.Thread(target=change, daemon=True).start()
        assert done.wait(10), "lease changes and results waited for the rendering"
        assert not release.is_set()
    finally:
        release.set()
    line = b'pgupkeep_target_leader{target="shop/t99"} 1.0'
    import time

    deadline = time.monotonic() + 10
    while line not in m.render("")[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert line in m.render("")[0]
