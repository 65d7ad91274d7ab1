"""What ships under deploy/ and the Dockerfile: manifests valid against the Kubernetes schemas, the
policies they carry valid, alert rules proven by promtool, the dashboard querying only real metrics,
and docs that cover every alert, log event and grant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import psycopg
import yaml

from daemon_helpers import require_binary
from pgupkeep.metrics import METRIC_NAMES
from pgupkeep.policy import parse_policy

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
PROMETHEUS_RULE = K8S / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "pgupkeep.json"
COMPOSE = DEPLOY / "compose"
DOCS = REPO / "docs"
DEFAULT_PORT = 9188

# The spec's log events: docs/operations.md has a troubleshooting paragraph for each.
LOG_EVENTS = (
    "daemon_started", "daemon_stopped", "policy_loaded", "policy_reload_failed", "target_unreachable",
    "job_finished", "partition_created", "partition_retired", "default_partition_conflict",
    "lock_timeout", "matview_refreshed", "long_running_query", "idle_in_transaction",
    "lock_wait",
    "backend_signalled", "bloated_table", "table_vacuumed", "bloated_index", "index_reindexed",
    "invalid_index", "xid_wraparound_risk",
    "sql_run", "history_write_failed",
)  # fmt: skip
# Series Prometheus makes itself, which rules may use besides pgupkeep's own.
PROMETHEUS_SERIES = frozenset({"up"})


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bpgupkeep_[a-z0-9_]+", text))


def unknown_metrics(names: set[str]) -> set[str]:
    """Names that pgupkeep does not export (histogram _bucket/_sum/_count count as their base)."""
    out = set()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in METRIC_NAMES and base not in METRIC_NAMES:
            out.add(name)
    return out


def promtool() -> str:
    return require_binary("promtool", "prometheus")


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_non_root_exec_form_with_healthcheck() -> None:
    ins = dockerfile_instructions()
    stages = [rest for kw, rest in ins if kw == "FROM"]
    assert len(stages) >= 2 and all("-slim" in s for s in stages), stages
    runtime = [i for i, (kw, _) in enumerate(ins) if kw == "FROM"][-1]
    final = ins[runtime:]

    users = [rest for kw, rest in final if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1].split(":")[0].isdigit(), "a numeric USER lets runAsNonRoot verify it"

    (entrypoint,) = [json.loads(rest) for kw, rest in final if kw == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for kw, rest in final if kw == "CMD"]
    assert entrypoint == ["pgupkeep"]  # exec form: pgupkeep is PID 1 and gets SIGTERM itself
    assert cmd == ["run", "--config", "/etc/pgupkeep/policy.yaml"]

    assert [rest for kw, rest in final if kw == "EXPOSE"] == [str(DEFAULT_PORT)]
    (health,) = [rest for kw, rest in final if kw == "HEALTHCHECK"]
    probe = json.loads(health[health.index("CMD") + 3 :].strip())
    assert probe[0] == "python" and f"127.0.0.1:{DEFAULT_PORT}/healthz" in probe[-1], probe
    compile(probe[-1], "healthcheck", "exec")  # the inline program is valid Python

    labels = " ".join(rest for kw, rest in final if kw == "LABEL")
    for key in ("title", "version", "source", "licenses", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels
    # Installed offline from the build stage's wheels: nothing is fetched in the runtime stage.
    (install,) = [rest for kw, rest in final if kw == "RUN" and "pip install" in rest]
    assert "--no-index" in install


def test_dockerignore_keeps_only_what_the_build_copies() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "**"
    copied = {"pyproject.toml", "README.md", "daemon/", "config/"}
    assert copied <= {r.removeprefix("!") for r in rules if r.startswith("!")}
    sources = set()
    for kw, rest in dockerfile_instructions():
        if kw == "COPY" and "--from" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources.update(parts[:-1])
    assert {s.rstrip("/").split("/")[0] for s in sources} <= {c.rstrip("/") for c in copied}
    assert all((REPO / s).exists() for s in sources), sources


# --------------------------------------------------------------------------- Kubernetes

# The Prometheus Operator's CRDs are not in the Kubernetes schemas; these are the parts of their
# published schemas (monitoring.coreos.com/v1) that our objects use, strict about unknown keys.
_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": ["string", "integer"]},
        "for": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _METADATA,
            "spec": {
                "type": "object", "additionalProperties": False,
                "properties": {"groups": {"type": "array", "items": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "interval": {"type": "string"},
                                   "rules": {"type": "array", "items": _RULE}},
                }}},
            },
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                    "jobLabel": {"type": "string"},
                    "endpoints": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                       "interval": {"type": "string"}, "scrapeTimeout": {"type": "string"},
                                       "honorLabels": {"type": "boolean"}, "scheme": {"type": "string"}},
                    }},
                },
            },
        },
    },
}  # fmt: skip


def kustomize_resources() -> list[str]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]


def manifests() -> list[dict[str, Any]]:
    docs = []
    for name in [*kustomize_resources(), "secret.example.yaml"]:
        docs.extend(load_all(K8S / name))
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests() if d["kind"] == kind]
    return doc


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomize_resources()) == sorted(files)


def test_every_manifest_is_valid_against_its_schema() -> None:
    version = kubernetes_validate.latest_version()
    kinds = []
    for doc in manifests():
        kinds.append(doc["kind"])
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            jsonschema.validate(doc, crd)
        else:
            kubernetes_validate.validate(doc, version, strict=True)
    assert sorted(kinds) == sorted([
        "Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
        "ServiceMonitor", "PrometheusRule", "Secret",
    ])  # fmt: skip


def test_deployment_is_safe_to_run_twice_and_locked_down() -> None:
    deploy = by_kind("Deployment")
    spec, pod = deploy["spec"], deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["resources"] == {
        "requests": {"cpu": "10m", "memory": "64Mi"},
        "limits": {"cpu": "200m", "memory": "128Mi"},
    }

    policy = configmap_policy()
    assert policy.daemon.listen.endswith(f":{port}") and port == DEFAULT_PORT
    # The pod must outlive shutdown_grace, or SIGKILL lands before leases are released.
    assert pod["terminationGracePeriodSeconds"] > policy.daemon.shutdown_grace.total_seconds()

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/etc/pgupkeep"]]["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the only writable path
    assert container["args"][-1] == "/etc/pgupkeep/" + next(iter(by_kind("ConfigMap")["data"]))

    (env,) = container["env"]
    secret = by_kind("Secret")
    assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "DATABASE_URL"}
    assert "DATABASE_URL" in secret["stringData"]


def test_service_monitor_and_pdb_select_the_pods() -> None:
    pod_labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["name"] == "metrics" and svc_port["port"] == DEFAULT_PORT

    monitor = by_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    # honorLabels keeps pgupkeep's `job` label (the job kind) instead of exported_job.
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True

    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def configmap_policy():
    text = next(iter(by_kind("ConfigMap")["data"].values()))
    return parse_policy(text, file="configmap:policy.yaml", environ={"DATABASE_URL": "postgresql://u@db:5432/app"})


def test_configmap_policy_passes_pgupkeep_check(tmp_path: Path) -> None:
    policy = configmap_policy()
    assert [t.name for t in policy.targets] == ["main"]
    assert policy.targets[0].job_kinds() == ("partitions", "materialized_views", "long_running_queries", "bloat", "health")
    assert policy.daemon.log_format == "json"

    path = tmp_path / "policy.yaml"
    path.write_text(next(iter(by_kind("ConfigMap")["data"].values())))
    env = {**os.environ, "DATABASE_URL": "postgresql://u@db:5432/app"}
    done = subprocess.run(
        [sys.executable, "-m", "pgupkeep", "check", "--config", str(path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    env.pop("DATABASE_URL")
    missing = subprocess.run(
        [sys.executable, "-m", "pgupkeep", "check", "--config", str(path)], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "DATABASE_URL is not set" in missing.stdout, missing.stdout


# --------------------------------------------------------------------------- alert rules


def _block_strings(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class _RuleDumper(yaml.SafeDumper):
    pass


_RuleDumper.add_representer(str, _block_strings)


def render_prometheus_rule() -> str:
    """deploy/kubernetes/prometheusrule.yaml, made from deploy/prometheus/alerts.yaml."""
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "pgupkeep", "labels": {"app.kubernetes.io/name": "pgupkeep"}},
        "spec": yaml.safe_load(ALERTS.read_text()),
    }
    header = (
        "# Generated from deploy/prometheus/alerts.yaml by `python tests/test_deploy.py`; edit that file.\n"
        "# Your Prometheus' ruleSelector may want a label here (e.g. release: <name>).\n"
    )
    return header + yaml.dump(rule, Dumper=_RuleDumper, sort_keys=False, width=10_000)


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_prometheus_rule_carries_exactly_the_alert_rules() -> None:
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule(), "run `python tests/test_deploy.py`"
    assert by_kind("PrometheusRule")["spec"] == yaml.safe_load(ALERTS.read_text())


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_rule_tests_pass() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert firing == names
    assert quiet == names


def test_every_alert_has_severity_summary_and_a_runbook() -> None:
    runbook = (DOCS / "alerts.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, rule["alert"]
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/alerts.md" and anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]


def test_alerts_query_only_metrics_pgupkeep_exports() -> None:
    text = ALERTS.read_text() + ALERT_TESTS.read_text()
    names = metric_names_in(text)
    assert {"pgupkeep_partition_premade", "pgupkeep_target_up", "pgupkeep_job_runs_total"} <= names
    assert unknown_metrics(names) == set()
    for rule in alert_rules():
        bare = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*[{(]", rule["expr"])) - metric_names_in(rule["expr"])
        functions = {"absent", "max", "min", "sum", "increase", "clamp_min", "time", "by", "on", "group_left"}
        # pgupkeep's own process_* series (its uptime stands in where a gauge has no value yet).
        assert bare - functions <= PROMETHEUS_SERIES | {"process_start_time_seconds"}, (rule["alert"], bare)



# --------------------------------------------------------------------------- docker compose trial


def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_compose_stack_wires_postgres_pgupkeep_and_prometheus(tmp_path: Path) -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "pgupkeep", "prometheus"}
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (COMPOSE / source).exists(), source
    app = services["pgupkeep"]
    assert (COMPOSE / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    assert app["read_only"] is True and app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "./policy.yaml:/etc/pgupkeep/policy.yaml:ro" in app["volumes"]
    assert any(v.startswith("../prometheus/alerts.yaml:") for v in services["prometheus"]["volumes"])

    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "pgupkeep" and job["honor_labels"] is True
    assert job["static_configs"] == [{"targets": [f"pgupkeep:{DEFAULT_PORT}"]}]
    # promtool checks the config with the rule file where the container would mount it.
    scrape["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    done = subprocess.run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_policy_is_valid_and_manages_the_seeded_objects() -> None:
    dsn = compose()["services"]["pgupkeep"]["environment"]["DATABASE_URL"]
    policy = parse_policy((COMPOSE / "policy.yaml").read_text(), file="policy.yaml", environ={"DATABASE_URL": dsn})
    (target,) = policy.targets
    assert policy.daemon.listen == f"0.0.0.0:{DEFAULT_PORT}"
    assert [str(t.table) for t in target.partitions.tables] == ["public.events"]
    assert [str(v.view) for v in target.materialized_views.views] == ["public.events_daily"]
    assert target.long_running_queries.dry_run is True


def _sql_statements(text: str) -> list[str]:
    text = re.sub(r"--[^\n]*", "", text)
    return [" ".join(s.split()) for s in text.split(";") if s.strip()]


def _run_as(dsn: str, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {**os.environ, "DATABASE_URL": dsn}
    done = subprocess.run(
        [sys.executable, "-m", "pgupkeep", *args, "--json", "--config", str(COMPOSE / "policy.yaml")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_least_privilege_role_runs_every_job(pg_server, fresh_database: str) -> None:
    doc = (DOCS / "least-privilege.md").read_text()
    grants, _pg17, verify = re.findall(r"```sql\n(.*?)```", doc, re.S)
    role_sql = (COMPOSE / "initdb" / "02-pgupkeep-role.sql").read_text()
    assert _sql_statements(grants) == _sql_statements(role_sql)  # the docs show what the trial runs

    with pg_server.admin() as admin:  # roles are cluster-wide: leave none behind
        admin.execute("DROP ROLE IF EXISTS pgupkeep, app_owner")
    try:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute((COMPOSE / "initdb" / "01-schema.sql").read_text())
            conn.execute(role_sql)
            kinds = dict(conn.execute(
                "SELECT relname, relkind FROM pg_class WHERE relname IN ('events', 'events_daily')"
            ).fetchall())  # fmt: skip
            assert kinds == {"events": "p", "events_daily": "m"}
            conn.execute("REVOKE app_owner FROM pgupkeep")
        as_role = psycopg.conninfo.make_conninfo(fresh_database, user="pgupkeep", password="pgupkeep")

        # Without the owner's rights: the query and `plan` both say what is missing.
        with psycopg.connect(as_role, autocommit=True) as conn:
            rows = conn.execute(verify).fetchall()
        assert rows == [("events", False, True, True, True), ("events_daily", False, True, True, True)]
        code, results, _ = _run_as(as_role, "plan")
        by_job = {r["job"]: r for r in results}
        assert code == 1 and by_job["materialized_views"]["outcome"] == "failure"
        assert "does not own the view" in by_job["materialized_views"]["error"]

        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("GRANT app_owner TO pgupkeep")
        with psycopg.connect(as_role, autocommit=True) as conn:
            assert conn.execute(verify).fetchall() == [
                ("events", True, True, True, True), ("events_daily", True, True, True, True),
            ]  # fmt: skip
        for command in ("plan", "once"):
            code, results, stderr = _run_as(as_role, command)
            outcomes = {r["job"]: (r["outcome"], r["error"]) for r in results}
            assert code == 0 and outcomes == {
                job: ("success", None)
                for job in ("partitions", "materialized_views", "long_running_queries", "bloat", "health")
            }, (command, outcomes, stderr[-2000:])
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            attached = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'public.events'::regclass").fetchone()[0]
        assert attached == 8  # today's partition and premake: 7 after it
    finally:
        pg_server.drop_database(psycopg.conninfo.conninfo_to_dict(fresh_database)["dbname"])
        with pg_server.admin() as admin:
            admin.execute("DROP ROLE IF EXISTS pgupkeep, app_owner")



# --------------------------------------------------------------------------- Grafana


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_is_valid_json_and_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "pgupkeep" and dash["title"] == "pgupkeep"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]

    names = set().union(*(metric_names_in(e) for e in dashboard_queries()))
    assert unknown_metrics(names) == set()
    # The issue's list: runway, job outcomes and durations, view freshness, long-running sessions,
    # bloat top tables, connections, xid age.
    assert {
        "pgupkeep_partition_runway_seconds", "pgupkeep_job_runs_total", "pgupkeep_job_duration_seconds_bucket",
        "pgupkeep_matview_last_refresh_timestamp_seconds", "pgupkeep_long_running_queries",
        "pgupkeep_table_bloat_bytes", "pgupkeep_connections", "pgupkeep_database_xid_age",
    } <= names  # fmt: skip
    # Nearly every family is on the dashboard; build_info alone only says which version runs.
    exported = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    assert METRIC_NAMES - exported == {"pgupkeep_build_info"}



# --------------------------------------------------------------------------- docs


def test_operations_doc_troubleshoots_every_log_event() -> None:
    doc = (DOCS / "operations.md").read_text()
    paragraphs = re.findall(r"^\*\*`([a-z_]+)`\*\* — ", doc, re.M)
    assert paragraphs == list(LOG_EVENTS)
    for section in ("## Deploying", "## Running several replicas", "## Upgrading", "## Troubleshooting by log event"):
        assert section in doc


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}")
