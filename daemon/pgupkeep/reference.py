"""The configuration reference, generated from the policy model.

`python -m pgupkeep.reference` rewrites config/policy.schema.json and docs/configuration.md;
a test fails when either is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pgupkeep.policy import (
    JOB_KINDS,
    BloatSection,
    DaemonPolicy,
    HealthSection,
    HistoryPolicy,
    LongRunningQueriesSection,
    MaterializedViewsSection,
    PartitionsSection,
    PartitionTable,
    QueryInsightsSection,
    SessionSettings,
    SqlJob,
    SqlSection,
    Target,
    ViewPolicy,
    policy_schema,
)
from pgupkeep.reloptions import RELOPTIONS, describe
from pgupkeep.units import format_duration

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("daemon", DaemonPolicy),
    ("daemon.history", HistoryPolicy),
    ("defaults (and each target)", SessionSettings),
    ("targets[]", Target),
    ("targets[].partitions", PartitionsSection),
    ("targets[].partitions.tables[]", PartitionTable),
    ("targets[].materialized_views", MaterializedViewsSection),
    ("targets[].materialized_views.views[]", ViewPolicy),
    ("targets[].long_running_queries", LongRunningQueriesSection),
    ("targets[].bloat", BloatSection),
    ("targets[].health", HealthSection),
    ("targets[].query_insights", QueryInsightsSection),
    ("targets[].sql", SqlSection),
    ("targets[].sql.jobs[]", SqlJob),
]


def _default(value: Any) -> str:
    if value is None:
        return "null"
    if hasattr(value, "total_seconds"):
        return format_duration(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[]" if not value else json.dumps([str(v) for v in value])
    return str(value)


def schema_text() -> str:
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"


def markdown() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the policy model by `python -m pgupkeep.reference`; do not edit by hand.",
        "A commented example of every key is `config/policy.yaml`; the JSON Schema is",
        "`config/policy.schema.json` (also printed by `pgupkeep schema`).",
        "",
        "Durations: `500ms`, `30s`, `5m`, `2h`, `1d`, `1w`, at most `3650d`; PostgreSQL timeouts",
        "(`statement_timeout`, `lock_timeout`, `idle_in_transaction_session_timeout`, a view's `timeout`,",
        "`vacuum_timeout`) at most `2147483647ms` (about 24.8 days), and `0` for the first three means no",
        "limit, as in PostgreSQL. Where `0` has no such meaning it is refused, never rounded to 1ms.",
        "Sizes: `512kB`, `10MB`, `1GB` or bytes, at most 2^63-1 bytes (a bigint).",
        'Schedules: five-field cron in `daemon.timezone` (weekdays as in cron: 0 and 7 are Sunday; when',
        "day-of-month and day-of-week are both restricted a run happens when either matches), `@hourly`,",
        "`@daily`, `@weekly`, `@monthly`, `@yearly` (or `@annually`, `@midnight`), or `every <duration>`",
        "(1s to 3650d). `${VAR}` and `${VAR:-default}` are expanded in every string. Aliases (`*name`) may",
        "repeat an anchor's value, within a budget that refuses alias bombs. Unknown keys are errors (with",
        "a suggestion when one is close). Top level: `version: 1`, `daemon`, `defaults`, `targets`.",
        "",
        "Target-level session keys (`connect_timeout`, `lock_timeout`, `lock_retries`, `statement_timeout`,",
        "`idle_in_transaction_session_timeout`) default to the `defaults` section.",
        "",
    ]
    for title, model in SECTIONS:
        out += [f"## `{title}`", "", "| key | default | meaning |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            if model is Target and name in SessionSettings.model_fields:
                continue
            default = "required" if field.is_required() else f"`{_default(field.default)}`"
            if model is Target and name in JOB_KINDS:
                default = "off"
            text = (field.description or "").replace("|", "\\|")
            out.append(f"| `{field.alias or name}` | {default} | {text} |")
        out.append("")
    out += [
        "## `targets[].partitions.tables[].storage_parameters`",
        "",
        "PostgreSQL's storage parameters for tables (unset: the server's default); each new partition is",
        "created `WITH` them. `pgupkeep check` rejects other names and values out of range; `plan` fails a",
        "table whose parameter the server's version does not know yet.",
        "",
        "| key | meaning |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {describe(option)} |" for name, option in RELOPTIONS.items()]
    out.append("")
    return "\n".join(out)


def write(root: Path) -> None:
    (root / "config" / "policy.schema.json").write_text(schema_text(), encoding="utf-8")
    (root / "docs").mkdir(exist_ok=True)
    (root / "docs" / "configuration.md").write_text(markdown(), encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
