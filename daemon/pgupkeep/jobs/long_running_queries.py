"""The `long_running_queries` job (being built; see its issue)."""

from __future__ import annotations

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.results import JobOutput


def run(ctx: JobContext) -> JobOutput:
    raise NotImplementedError("the long_running_queries job is not built yet")


KIND = JobKind(name="long_running_queries", run=run, writes=False)
