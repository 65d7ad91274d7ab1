"""The `materialized_views` job (being built; see its issue)."""

from __future__ import annotations

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.results import JobOutput


def run(ctx: JobContext) -> JobOutput:
    raise NotImplementedError("the materialized_views job is not built yet")


KIND = JobKind(name="materialized_views", run=run, writes=True)
