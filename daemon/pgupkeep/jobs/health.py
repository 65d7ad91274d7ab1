"""The `health` job (being built; see its issue)."""

from __future__ import annotations

from pgupkeep.jobs.base import JobContext, JobKind
from pgupkeep.results import JobOutput


def run(ctx: JobContext) -> JobOutput:
    raise NotImplementedError("the health job is not built yet")


KIND = JobKind(name="health", run=run, writes=False)
