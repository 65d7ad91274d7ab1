"""The job registry: every job kind plugs in here, and only here.

kind = module name = policy key = `job` label.
"""

from __future__ import annotations

from pgupkeep.jobs import (
    bloat,
    health,
    long_running_queries,
    materialized_views,
    partitions,
    query_insights,
    sql,
)
from pgupkeep.jobs.base import JobContext, JobKind

REGISTRY: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        partitions.KIND,
        materialized_views.KIND,
        long_running_queries.KIND,
        bloat.KIND,
        health.KIND,
        query_insights.KIND,
        sql.KIND,
    )
}

__all__ = ["REGISTRY", "JobContext", "JobKind"]
