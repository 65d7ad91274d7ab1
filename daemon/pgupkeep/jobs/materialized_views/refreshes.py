"""Planning of materialized view refreshes, pure: catalog rows + policy -> intended refreshes.

Which mode each view gets (or why it cannot be refreshed), and the order that refreshes a view
only after the views it reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from psycopg import sql

from pgupkeep.policy import MaterializedViewsSection, ViewPolicy
from pgupkeep.units import QualifiedName

Mode = Literal["concurrent", "blocking"]

_GUARD_PREFIX = int.from_bytes(hashlib.sha256(b"pgupkeep matview refresh").digest()[:4], "big", signed=True)

RELKINDS = {"r": "table", "p": "partitioned table", "v": "view", "f": "foreign table", "S": "sequence", "i": "index"}
NOT_POPULATED = "the view is not populated yet (created or last refreshed WITH NO DATA)"
NO_UNIQUE_INDEX = "it has no unique index on plain columns without a WHERE clause"


def guard_key(oid: int) -> int:
    """The advisory-lock key that keeps two sessions from refreshing one view at once.

    Keyed on the view's oid (advisory locks are per database, as oids are), under a prefix of
    our own so it cannot meet a lease key or an application's lock in practice.
    """
    return _GUARD_PREFIX * 2**32 + oid


@dataclass(frozen=True)
class ViewState:
    """What the catalog says about one configured view (oid None: it does not exist)."""

    view: QualifiedName
    oid: int | None
    relkind: str | None
    populated: bool
    unique_index: bool
    may_refresh: bool
    owner: str | None
    role: str
    rows: float | None


@dataclass(frozen=True)
class Refresh:
    """One intended refresh: its mode, and why it cannot run (`problem`) or falls back."""

    policy: ViewPolicy
    oid: int | None
    mode: Mode
    problem: str | None = None
    fallback_reason: str | None = None
    rows: int | None = None

    @property
    def view(self) -> QualifiedName:
        return self.policy.view


def refresh_sql(view: QualifiedName, mode: Mode) -> sql.Composed:
    if mode == "concurrent":
        return sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(sql.Identifier(*view.parts))
    return sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.Identifier(*view.parts))


def rows_estimate(reltuples: float | None) -> int | None:
    # reltuples is -1 until the relation was first vacuumed, analyzed or indexed (PG 14+).
    return None if reltuples is None or reltuples < 0 else int(reltuples)


# --------------------------------------------------------------------------- plan (pure)


def dependency_order(views: Sequence[QualifiedName], reads: Mapping[QualifiedName, set[QualifiedName]]) -> list[QualifiedName]:
    """Views ordered so that each comes after the views it reads; otherwise in policy order."""
    pending = list(views)
    ordered: list[QualifiedName] = []
    while pending:
        # `pending[0]` only on a cycle, which PostgreSQL does not let matviews form.
        ready = next((v for v in pending if not reads.get(v, set()) & (set(pending) - {v})), pending[0])
        pending.remove(ready)
        ordered.append(ready)
    return ordered


def _permission_message(state: ViewState, maintain: bool) -> str:
    v = state.view
    how = f"ALTER MATERIALIZED VIEW {v} OWNER TO {state.role}, or connect as {state.owner}"
    if maintain:
        how += f", or GRANT MAINTAIN ON {v} TO {state.role}"
    return f"{v}: permission denied: role {state.role} does not own the view (owner: {state.owner}); {how}"


def plan_view(policy: ViewPolicy, state: ViewState, *, maintain: bool = False) -> Refresh:
    """Decide how one view is refreshed, or why it cannot be, from its catalog row alone."""
    v = policy.view
    mode: Mode = "blocking" if policy.concurrently == "never" else "concurrent"
    rows = rows_estimate(state.rows)
    if state.oid is None:
        return Refresh(policy, None, mode, f"{v}: materialized view does not exist; create it or remove it from the policy")
    if state.relkind != "m":
        kind = RELKINDS.get(state.relkind or "", "relation")
        return Refresh(policy, state.oid, mode, f"{v}: is a {kind}, not a materialized view; fix the name in the policy")
    if not state.may_refresh:
        return Refresh(policy, state.oid, mode, _permission_message(state, maintain))
    if mode == "blocking":
        return Refresh(policy, state.oid, mode, rows=rows)
    reasons = [r for r, bad in ((NOT_POPULATED, not state.populated), (NO_UNIQUE_INDEX, not state.unique_index)) if bad]
    if not reasons:
        return Refresh(policy, state.oid, mode, rows=rows)
    reason = " and ".join(reasons)
    if policy.concurrently == "preferred":
        return Refresh(policy, state.oid, "blocking", fallback_reason=f"cannot refresh concurrently: {reason}", rows=rows)
    return Refresh(policy, state.oid, mode, _concurrent_problem(v, reasons), rows=rows)


def _concurrent_problem(view: QualifiedName, reasons: Sequence[str]) -> str:
    todo = []
    if NOT_POPULATED in reasons:
        todo.append(f"a plain refresh is the only way to populate it: run REFRESH MATERIALIZED VIEW {view} once")
    if NO_UNIQUE_INDEX in reasons:
        todo.append(f"create one (CREATE UNIQUE INDEX ON {view} (<key columns>))")
    todo.append("or set concurrently: preferred to accept a blocking refresh")
    return f"{view}: cannot refresh CONCURRENTLY: {' and '.join(reasons)}; {'; '.join(todo)}"


def plan_refreshes(
    section: MaterializedViewsSection,
    states: Mapping[QualifiedName, ViewState],
    reads: Mapping[QualifiedName, set[QualifiedName]],
    *,
    items: Sequence[str] | None = None,
    maintain: bool = False,
) -> list[Refresh]:
    """The refreshes due now (all configured views when `items` is None), in dependency order."""
    policies = {p.view: p for p in section.views if items is None or str(p.view) in items}
    return [plan_view(policies[v], states[v], maintain=maintain) for v in dependency_order(list(policies), reads)]
