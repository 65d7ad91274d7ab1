"""End to end with the real thing: a running pgupkeep scraped by Debian's Prometheus server with the
shipped alert rules loaded; Prometheus' own HTTP API must show pgupkeep's series and a firing alert.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import yaml

from daemon_helpers import Daemon, require_binary, wait_until, write_policy
from pgupkeep.pgserver import free_port

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "pgupkeep.json"
T = TypeVar("T")


def prometheus_binary() -> str:
    return require_binary("prometheus", "prometheus")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, logs: list[Path], daemon: Daemon) -> T:
    """`wait_until`, failing with the tails of the daemon's output and of `logs`."""
    try:
        return wait_until(probe, timeout, what, every=0.25)
    except AssertionError as exc:
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
        pytest.fail(f"{exc}\n--- pgupkeep{daemon.output()}\n{tails}")


def api(base: str, path: str, **params: str) -> Any:
    status, body = get(f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}")
    assert status == 200, (path, params, body)
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return doc["data"]


def rules_with_for_zero() -> str:
    """The shipped rules with every `for:` at 0s, so a provoked alert fires within seconds.

    Only `for` differs from deploy/prometheus/alerts.yaml: the expressions under test are the real ones.
    """
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    return yaml.safe_dump(rules, sort_keys=False)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        out = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        out.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_prometheus_scrapes_pgupkeep_and_fires_its_alerts(database: str, tmp_path: Path, started) -> None:
    prometheus = prometheus_binary()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.e2e_events (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at)"
        )
    policy = write_policy(
        tmp_path / "policy.yaml",
        [
            {
                "name": "shop",
                "dsn": "${E2E_DSN}",
                "partitions": {
                    "schedule": "every 1s",
                    "tables": [{"table": "public.e2e_events", "interval": "daily", "premake": 2}],
                },
                "health": {"schedule": "every 1s"},
            },
            {
                "name": "gone",
                "dsn": "postgresql://postgres@127.0.0.1:1/x",
                "connect_timeout": "1s",
                "health": {"schedule": "every 1s"},
            },
        ],
    )
    daemon = Daemon(policy, env={"E2E_DSN": database}, name="pgupkeep")
    app_port, prom_port = daemon.port, free_port()
    rules = tmp_path / "alerts.yaml"
    rules.write_text(rules_with_for_zero())
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "pgupkeep",
                        "honor_labels": True,
                        "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}],
                    }
                ],
            }
        )
    )
    logs = [tmp_path / "prometheus.log"]
    with daemon:
        daemon.start(timeout=30)  # waits for /readyz
        started(
            "prometheus",
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
        )
        prom = f"http://127.0.0.1:{prom_port}"
        wait_for("Prometheus /-/ready", lambda: get(prom + "/-/ready")[0] == 200, 30, logs, daemon)

        # A pgupkeep series, scraped: runway of the table pgupkeep made partitions for.
        runway = wait_for(
            "pgupkeep_partition_runway_seconds in Prometheus",
            lambda: api(prom, "query", query='pgupkeep_partition_runway_seconds{target="shop"}')["result"],
            60,
            logs,
            daemon,
        )
        (series,) = runway
        assert series["metric"] == {
            "__name__": "pgupkeep_partition_runway_seconds",
            "instance": f"127.0.0.1:{app_port}",
            "job": "pgupkeep",
            "target": "shop",
            "table": "public.e2e_events",
        }
        assert 86_400 < float(series["value"][1]) <= 3 * 86_400  # today's partition and 2 ahead
        # honor_labels: pgupkeep's own `job` label (the job kind) survives the scrape.
        runs = api(prom, "query", query='pgupkeep_job_runs_total{target="shop",outcome="success"}')["result"]
        assert {r["metric"]["job"] for r in runs} == {"partitions", "health"}

        # The alert it provoked: target `gone` cannot be reached.
        def target_down_firing() -> list[dict[str, Any]]:
            alerts = api(prom, "alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "PgupkeepTargetDown" and a["state"] == "firing"]

        (alert,) = wait_for("PgupkeepTargetDown firing", target_down_firing, 60, logs, daemon)
        assert alert["labels"] == {
            "alertname": "PgupkeepTargetDown",
            "severity": "critical",
            "instance": f"127.0.0.1:{app_port}",
            "job": "pgupkeep",
            "target": "gone",
        }
        assert alert["annotations"]["runbook_url"] == "docs/alerts.md#pgupkeeptargetdown"

        # Every rule evaluates without error against real series, and the healthy target raises
        # none of the alerts that watch it.
        groups = api(prom, "rules", type="alert")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert len(loaded) == len([r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]])
        assert {name: r["health"] for name, r in loaded.items() if r["health"] != "ok"} == {}
        # Rule groups evaluate at their own offsets, so PgupkeepAbsent (raised before the first
        # scrape) may need one more evaluation to resolve.
        def only_target_down() -> bool:
            active = {(a["labels"]["alertname"], a["labels"].get("target")) for a in api(prom, "alerts")["alerts"]}
            return active == {("PgupkeepTargetDown", "gone")}

        wait_for("PgupkeepTargetDown as the only active alert", only_target_down, 15, logs, daemon)

        # Every dashboard query is valid PromQL to this Prometheus.
        dash = json.loads(DASHBOARD.read_text())
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$target", ".*").replace("$__rate_interval", "1m")
                api(prom, "query", query=expr)

        # SIGTERM (what a container runtime sends PID 1): a clean stop, exit 0.
        assert daemon.stop(timeout=30) == 0
        events = [e["event"] for e in daemon.events]
        assert events[-1] == "daemon_stopped"


def test_rules_copy_differs_from_the_shipped_rules_only_in_for() -> None:
    shipped = yaml.safe_load(ALERTS.read_text())
    copy = yaml.safe_load(rules_with_for_zero())
    for group in shipped["groups"] + copy["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    assert copy == shipped
    assert re.search(r"for: 0s", rules_with_for_zero())
