"""A fleet from one policy: a target with `discover` names a server, and each of its databases that
matches becomes a target `<target>/<database>` with the discovering target's job sections.

Discovery is one catalog read on the database the target's DSN names (`postgres` if it names
none). A database that explicitly has a target of its own is left to that target.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgupkeep.db import connect
from pgupkeep.policy import Policy, Target

# Databases that take connections; the ones this role may not connect to are named with why.
DATABASES_SQL = """
SELECT datname::text, datallowconn, has_database_privilege(oid, 'CONNECT')
FROM pg_database
WHERE NOT datistemplate
ORDER BY datname
"""
SEPARATOR = "/"


@dataclass(frozen=True)
class Discovered:
    """What one discovery of a target found."""

    parent: str
    databases: tuple[str, ...] = ()  # each one a target `<parent>/<database>`
    skipped: Mapping[str, str] = field(default_factory=dict)  # database -> why it is not a target

    def names(self) -> set[str]:
        return {f"{self.parent}{SEPARATOR}{d}" for d in self.databases}


def discovery_dsn(target: Target) -> str:
    """The DSN discovery (and the shared lease session) connects to: `postgres` unless it names one."""
    params = conninfo_to_dict(target.dsn)
    if not params.get("dbname") and not os.environ.get("PGDATABASE"):
        params["dbname"] = "postgres"
    return make_conninfo(**params)


def database_dsn(dsn: str, database: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = database
    return make_conninfo(**params)


def _address(dsn: str) -> tuple[str, str, str]:
    params = conninfo_to_dict(dsn)
    env = os.environ
    return (
        str(params.get("host") or env.get("PGHOST") or "localhost"),
        str(params.get("port") or env.get("PGPORT") or "5432"),
        str(params.get("dbname") or env.get("PGDATABASE") or params.get("user") or env.get("PGUSER") or ""),
    )


def matches(database: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Shell-style patterns (`tenant_*`), matched case-sensitively as database names are."""
    return any(fnmatch.fnmatchcase(database, p) for p in include) and not any(
        fnmatch.fnmatchcase(database, p) for p in exclude
    )


def child(parent: Target, database: str) -> Target:
    """The target for one discovered database: the parent's sections and settings, its own DSN."""
    return parent.model_copy(
        update={"name": f"{parent.name}{SEPARATOR}{database}", "dsn": database_dsn(discovery_dsn(parent), database), "discover": None}
    )


def home(parent: Target) -> Target:
    """The target whose session holds the leases of a parent's databases: the discovery database."""
    return parent.model_copy(update={"dsn": discovery_dsn(parent), "discover": None})


def judge(parent: Target, rows: Iterable[tuple[str, bool, bool]], explicit: Iterable[Target]) -> Discovered:
    """Which databases become targets (pure: catalog rows + policy)."""
    assert parent.discover is not None
    server = _address(discovery_dsn(parent))[:2]
    owned = {addr[2] for addr in (_address(t.dsn) for t in explicit) if addr[:2] == server}
    databases, skipped = [], {}
    for database, allow, may_connect in rows:
        if not matches(database, parent.discover.include, parent.discover.exclude) or database in owned:
            continue
        if not allow:
            skipped[database] = "datallowconn is false: the database accepts no connections"
        elif not may_connect:
            skipped[database] = "no CONNECT privilege for this role: GRANT CONNECT ON DATABASE ... TO it, or exclude it"
        else:
            databases.append(database)
    return Discovered(parent.name, tuple(databases), skipped)


def discover(
    parent: Target, explicit: Iterable[Target], connect_fn: Callable[[Target], psycopg.Connection] = connect
) -> Discovered:
    with connect_fn(home(parent)) as conn:
        rows = conn.execute(DATABASES_SQL).fetchall()
    return judge(parent, rows, explicit)


def explicit_targets(policy: Policy) -> tuple[Target, ...]:
    return tuple(t for t in policy.targets if t.discover is None)


def expand(policy: Policy, found: Mapping[str, Discovered]) -> Policy:
    """The policy the scheduler and runner see: explicit targets, then each discovered database."""
    targets = list(explicit_targets(policy))
    for parent in policy.targets:
        if parent.discover is not None and parent.name in found:
            targets.extend(child(parent, d) for d in found[parent.name].databases)
    return policy.model_copy(update={"targets": tuple(targets)})


def lease_homes(policy: Policy, found: Mapping[str, Discovered]) -> dict[str, tuple[Target, tuple[str, ...]]]:
    """Shared lease sessions: each discovering target's home and the targets it leases."""
    return {
        parent.name: (home(parent), tuple(sorted(found[parent.name].names())))
        for parent in policy.targets
        if parent.discover is not None and parent.name in found
    }


def discover_all(policy: Policy) -> tuple[Policy, dict[str, Discovered], dict[str, str]]:
    """Discover every discovering target once (the CLI's `plan` and `once`): the expanded policy,
    what was found, and the targets whose discovery failed (name -> error)."""
    found: dict[str, Discovered] = {}
    errors: dict[str, str] = {}
    explicit = explicit_targets(policy)
    for parent in policy.targets:
        if parent.discover is None:
            continue
        try:
            found[parent.name] = discover(parent, explicit)
        except psycopg.Error as exc:
            errors[parent.name] = str(exc).strip()
    return expand(policy, found), found, errors
