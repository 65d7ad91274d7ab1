"""New partitions belong to their parent's owner, carry its grants, replica identity and the
policy's storage parameters, and pgupkeep says up front (in `plan`) which GRANT it lacks. Real
roles on a real server: the application's owner migrates the table after pgupkeep created
partitions, as a least-privilege member of the owner role and as a superuser."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from partition_helpers import actions, run_job
from pgupkeep.results import ItemError

NOV = datetime(2026, 11, 20, tzinfo=UTC)


@dataclass(frozen=True)
class Roles:
    owner: str  # owns the application's tables and runs its migrations
    keeper: str  # pgupkeep's least-privilege role: a member of the owner role
    reader: str  # reads the table (and its partitions) with SELECT
    auditor: str  # may read two columns only


@pytest.fixture(scope="module")
def roles(database: str) -> Iterator[Roles]:
    """Cluster-wide roles with names of this run's own; the schema `app` is the application's."""
    tag = secrets.token_hex(3)
    r = Roles(f"app_owner_{tag}", f"keeper_{tag}", f"reader_{tag}", f"auditor_{tag}")
    with psycopg.connect(database, autocommit=True) as c:
        for role in (r.owner, r.keeper, r.reader, r.auditor):
            c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"GRANT {r.owner} TO {r.keeper}")
        c.execute("CREATE SCHEMA app")
        c.execute(f"GRANT USAGE, CREATE ON SCHEMA app TO {r.owner}, {r.keeper}")
        c.execute(f"GRANT USAGE ON SCHEMA app TO {r.reader}, {r.auditor}")
    try:
        yield r
    finally:
        with psycopg.connect(database, autocommit=True) as c:
            for role in (r.owner, r.keeper, r.reader, r.auditor):
                c.execute(f"DROP OWNED BY {role}")
                c.execute(f"DROP ROLE {role}")


def as_role(dsn: str, role: str) -> str:
    return make_conninfo(dsn, user=role)


def orders(conn: psycopg.Connection, r: Roles, name: str, extra: str = "") -> None:
    """The application's table as its owner made it: grants to a reader (one with grant option,
    one to PUBLIC) and column grants to an auditor."""
    conn.execute(f"SET ROLE {r.owner}")
    conn.execute(f"CREATE TABLE app.{name} (id bigint NOT NULL, created_at timestamptz NOT NULL, note text, "
                 f"amount numeric) PARTITION BY RANGE (created_at)")
    conn.execute(f"GRANT SELECT ON app.{name} TO {r.reader}")
    conn.execute(f"GRANT INSERT ON app.{name} TO {r.reader} WITH GRANT OPTION")
    conn.execute(f"GRANT REFERENCES ON app.{name} TO PUBLIC")
    conn.execute(f"GRANT SELECT (id, note), UPDATE (note) ON app.{name} TO {r.auditor}")
    if extra:
        conn.execute(extra)
    conn.execute("RESET ROLE")


def yaml(name: str, more: str = "") -> str:
    return f"        - table: app.{name}\n          interval: monthly\n          premake: 1\n{more}"


ACL_SQL = """
SELECT coalesce((SELECT array_agg(e ORDER BY e) FROM (
                   SELECT format('%%s %%s %%s %%s', pg_get_userbyid(g.grantor),
                                 CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(g.grantee) END,
                                 g.privilege_type, g.is_grantable) AS e
                   FROM aclexplode(c.relacl) g) t), '{}'),
       coalesce((SELECT array_agg(e ORDER BY e) FROM (
                   SELECT format('%%s %%s %%s', a.attname, pg_get_userbyid(g.grantee), g.privilege_type) AS e
                   FROM pg_attribute a, aclexplode(a.attacl) g WHERE a.attrelid = c.oid AND a.attnum > 0) t), '{}')
FROM pg_class c WHERE c.oid = %s::regclass
"""


def shape(conn: psycopg.Connection, relation: str) -> tuple[object, ...]:
    """Owner, table ACL, column ACLs, replica identity and reloptions of a relation."""
    owner, ident, options = conn.execute(
        "SELECT pg_get_userbyid(relowner), relreplident, reloptions FROM pg_class WHERE oid = %s::regclass", (relation,)
    ).fetchone()
    acl, column_acl = conn.execute(ACL_SQL, (relation,)).fetchone()
    return owner, acl, column_acl, ident, options


def migrate_as_owner(dsn: str, r: Roles, name: str) -> None:
    """The application's next migration, run by the table's owner; every statement recurses into
    every partition, so each must be the owner's."""
    with psycopg.connect(as_role(dsn, r.owner), autocommit=True) as c:
        c.execute(f"ALTER TABLE app.{name} ADD COLUMN extra text")
        c.execute(f"ALTER TABLE app.{name} ADD CONSTRAINT {name}_amount_positive CHECK (amount > 0)")
        c.execute(f"ALTER TABLE app.{name} ALTER COLUMN note SET DEFAULT 'none'")
        c.execute(f"ALTER TABLE app.{name} DROP COLUMN extra")


@pytest.mark.parametrize("runner", ["keeper", "superuser"])
def test_partitions_are_the_owners_and_carry_its_grants(conn: psycopg.Connection, database: str, roles: Roles,
                                                        runner: str) -> None:
    name = f"orders_{runner}"
    orders(conn, roles, name)
    dsn = as_role(database, roles.keeper) if runner == "keeper" else database
    planned = run_job(dsn, yaml(name), NOV, apply=False)
    out = run_job(dsn, yaml(name), NOV)
    assert (out.errors, actions(out)) == ([], [("create_partition", f"app.{name}_2026_11", True),
                                               ("create_partition", f"app.{name}_2026_12", True)])
    assert [a.sql for a in planned.actions] == [a.sql for a in out.actions]
    new = f'"app"."{name}_2026_11"'
    assert out.actions[0].sql.split(";\n")[1:5] == [
        f'ALTER TABLE {new} OWNER TO "{roles.owner}"',
        f'GRANT REFERENCES ON TABLE {new} TO PUBLIC',
        f'GRANT SELECT ON TABLE {new} TO "{roles.reader}"',
        f'GRANT INSERT ON TABLE {new} TO "{roles.reader}" WITH GRANT OPTION',
    ]
    parent = shape(conn, f"app.{name}")
    for partition in (f"app.{name}_2026_11", f"app.{name}_2026_12"):
        assert shape(conn, partition) == parent  # owner, grants (grantor too), column grants
    assert parent[0] == roles.owner and len(parent[2]) == 3  # id and note to SELECT, note to UPDATE
    assert sum(roles.reader in entry for entry in parent[1]) == 2

    migrate_as_owner(database, roles, name)
    conn.execute(f"INSERT INTO app.{name} (id, created_at, note, amount) VALUES (1, '2026-11-21+00', 'n', 5)")
    with psycopg.connect(as_role(database, roles.reader), autocommit=True) as c:
        assert c.execute(f"SELECT count(*) FROM app.{name}_2026_11").fetchone() == (1,)
    with psycopg.connect(as_role(database, roles.auditor), autocommit=True) as c:
        assert c.execute(f"SELECT id, note FROM app.{name}_2026_11").fetchone() == (1, "n")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SELECT amount FROM app.{name}_2026_11")


def test_inherit_privileges_false_copies_no_grants(conn: psycopg.Connection, database: str, roles: Roles) -> None:
    orders(conn, roles, "orders_bare")
    out = run_job(as_role(database, roles.keeper), yaml("orders_bare", "          inherit_privileges: false\n"), NOV)
    assert out.errors == [] and len(out.actions) == 2
    assert "GRANT" not in out.actions[0].sql
    assert shape(conn, "app.orders_bare_2026_11") == (roles.owner, [], [], "d", None)
    migrate_as_owner(database, roles, "orders_bare")  # the owner is still the parent's
    with psycopg.connect(as_role(database, roles.reader), autocommit=True) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("SELECT count(*) FROM app.orders_bare_2026_11")


def test_replica_identity_and_storage_parameters(conn: psycopg.Connection, database: str, roles: Roles) -> None:
    orders(conn, roles, "rfull", "ALTER TABLE app.rfull REPLICA IDENTITY FULL")
    orders(conn, roles, "rindex", "CREATE UNIQUE INDEX rindex_key ON app.rindex (id, created_at)")
    conn.execute(f"SET ROLE {roles.owner}")
    conn.execute("ALTER TABLE app.rindex REPLICA IDENTITY USING INDEX rindex_key")
    conn.execute("RESET ROLE")
    storage = ("          storage_parameters:\n            fillfactor: 70\n"
               "            autovacuum_vacuum_scale_factor: 0.05\n            toast.autovacuum_enabled: false\n")
    dsn = as_role(database, roles.keeper)
    planned = run_job(dsn, yaml("rfull", storage) + yaml("rindex"), NOV, apply=False)
    assert planned.actions[0].sql.startswith(
        'CREATE TABLE "app"."rfull_2026_11" (LIKE "app"."rfull" INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING '
        "STORAGE INCLUDING COMMENTS INCLUDING GENERATED INCLUDING COMPRESSION) WITH (fillfactor = 70, "
        "autovacuum_vacuum_scale_factor = 0.05, toast.autovacuum_enabled = false);\n")
    assert 'ALTER TABLE "app"."rfull_2026_11" REPLICA IDENTITY FULL;\nALTER TABLE "app"."rfull" ATTACH' in planned.actions[0].sql
    assert "ATTACH PARTITION" in planned.actions[2].sql.split("\nDO $pgupkeep$\n")[0]
    out = run_job(dsn, yaml("rfull", storage) + yaml("rindex"), NOV)
    assert out.errors == [] and len(out.actions) == 4
    for month in ("2026_11", "2026_12"):
        full = shape(conn, f"app.rfull_{month}")
        assert full[3:] == ("f", ["fillfactor=70", "autovacuum_vacuum_scale_factor=0.05"])
        toast = conn.execute(f"SELECT t.reloptions FROM pg_class c JOIN pg_class t ON t.oid = c.reltoastrelid "
                             f"WHERE c.oid = 'app.rfull_{month}'::regclass").fetchone()[0]
        assert toast == ["autovacuum_enabled=false"]
        ident = conn.execute(
            """SELECT c.relreplident, i.indisreplident, h.inhparent::regclass::text
               FROM pg_class c JOIN pg_index i ON i.indrelid = c.oid JOIN pg_inherits h ON h.inhrelid = i.indexrelid
               WHERE c.oid = %s::regclass""", (f"app.rindex_{month}",)).fetchall()
        assert ident == [("i", True, "app.rindex_key")]  # the partition's own index matching the parent's


def test_moved_rows_make_the_same_partition_as_a_create(conn: psycopg.Connection, database: str, roles: Roles) -> None:
    orders(conn, roles, "omove", "ALTER TABLE app.omove REPLICA IDENTITY FULL")
    conn.execute("CREATE TABLE app.omove_default PARTITION OF app.omove DEFAULT")
    conn.execute(f"ALTER TABLE app.omove_default OWNER TO {roles.owner}")
    conn.execute("INSERT INTO app.omove VALUES (1, '2026-12-05+00', 'x', 1)")  # December's, in the default
    more = "          on_default_conflict: move\n          storage_parameters: {fillfactor: 80}\n"
    out = run_job(as_role(database, roles.keeper), yaml("omove", more), NOV)
    assert (out.errors, actions(out)) == ([], [("create_partition", "app.omove_2026_11", True),
                                               ("move_default_rows", "app.omove_2026_12", True)])
    assert shape(conn, "app.omove_2026_12") == shape(conn, "app.omove_2026_11")
    assert shape(conn, "app.omove_2026_12")[3:] == ("f", ["fillfactor=80"])
    assert conn.execute("SELECT count(*) FROM app.omove_2026_12").fetchone() == (1,)
    migrate_as_owner(database, roles, "omove")


def test_plan_names_the_grant_pgupkeep_lacks(conn: psycopg.Connection, database: str, roles: Roles, pg_server) -> None:
    orders(conn, roles, "odeny")
    conn.execute("CREATE TABLE app.okeep (k timestamptz NOT NULL) PARTITION BY RANGE (k)")
    conn.execute(f"ALTER TABLE app.okeep OWNER TO {roles.keeper}")  # pgupkeep's own: it goes on
    tables = yaml("odeny") + yaml("okeep")
    tag = secrets.token_hex(3)
    stranger = f"stranger_{tag}"
    conn.execute(f"CREATE ROLE {stranger} LOGIN")
    try:
        conn.execute(f"GRANT USAGE ON SCHEMA app TO {stranger}")
        out = run_job(as_role(database, stranger), yaml("odeny"), NOV, apply=False)
        assert out.errors == [ItemError("app.odeny", (
            f"app.odeny: pgupkeep cannot manage this table's partitions: role {stranger} is neither the owner "
            f"({roles.owner}) nor a member of that role; role {stranger} may not create tables in schema app; run "
            f"GRANT {roles.owner} TO {stranger}; GRANT CREATE ON SCHEMA app TO {stranger} (or remove the table from "
            "the policy)"))]
        assert out.actions == []
        conn.execute(f"GRANT CREATE ON SCHEMA app TO {stranger}")
        if pg_server.version_num >= 160000:
            conn.execute(f"GRANT {roles.owner} TO {stranger} WITH SET FALSE")
            fix = f"role {stranger} may not SET ROLE to {roles.owner}, which giving it a new partition needs; run GRANT {roles.owner} TO {stranger} WITH SET TRUE"
        else:
            conn.execute(f"GRANT {roles.owner} TO {stranger}")
            conn.execute(f"ALTER ROLE {stranger} NOINHERIT")
            fix = f"role {stranger} is a member of {roles.owner} but does not inherit its privileges; run ALTER ROLE {stranger} INHERIT"
        out = run_job(as_role(database, stranger), yaml("odeny"), NOV, apply=False)
        assert [e.message for e in out.errors] == [f"app.odeny: pgupkeep cannot manage this table's partitions: {fix} (or remove the table from the policy)"]
    finally:
        conn.execute(f"DROP OWNED BY {stranger}")
        conn.execute(f"DROP ROLE {stranger}")
    # The owner without CREATE on the schema cannot be given a partition (ALTER TABLE ... OWNER TO).
    conn.execute(f"REVOKE CREATE ON SCHEMA app FROM {roles.owner}")
    try:
        out = run_job(as_role(database, roles.keeper), tables, NOV)
    finally:
        conn.execute(f"GRANT CREATE ON SCHEMA app TO {roles.owner}")
    assert out.errors == [ItemError("app.odeny", (
        f"app.odeny: pgupkeep cannot manage this table's partitions: the owner {roles.owner} may not create tables in "
        f"schema app, so it cannot be given new partitions; run GRANT CREATE ON SCHEMA app TO {roles.owner} (or remove "
        "the table from the policy)"))]
    assert actions(out) == [("create_partition", "app.okeep_2026_11", True), ("create_partition", "app.okeep_2026_12", True)]
    assert conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'app.odeny'::regclass").fetchone() == (0,)
