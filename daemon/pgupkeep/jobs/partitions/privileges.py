"""Whose a new partition is and who may use it: the parent's owner, its table and column GRANTs and
its replica identity carried over to each partition pgupkeep creates, and whether pgupkeep's role
may do what a run needs (with the exact GRANT to add when it may not).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from psycopg import sql

# After ATTACH has matched or built the new partition's index for the parent's replica-identity
# index (it picks the name), that index becomes the partition's replica identity. Only the server
# knows the name then, so it is looked up in the same transaction.
REPLICA_INDEX_BODY = """BEGIN
  EXECUTE format('ALTER TABLE %s REPLICA IDENTITY USING INDEX %I', {partition}::regclass,
    (SELECT i.relname FROM pg_catalog.pg_inherits h
       JOIN pg_catalog.pg_index x ON x.indexrelid = h.inhrelid
       JOIN pg_catalog.pg_class i ON i.oid = h.inhrelid
     WHERE h.inhparent = {parent_index}::regclass AND x.indrelid = {partition}::regclass));
END"""
_PLAIN_NAME = re.compile(r"^[a-z_][a-z0-9_$]*$")


@dataclass(frozen=True)
class Grant:
    """One privilege the parent gives another role (grantee None: PUBLIC), on a column or the table."""

    grantee: str | None
    privilege: str
    grantable: bool
    column: str | None = None


@dataclass
class Rights:
    """What the catalog says pgupkeep's role may do with a parent and its schema."""

    role: str = ""
    owner: str = ""
    superuser: bool = False
    usage: bool = False  # has the owner's privileges (owner, or member with INHERIT)
    member: bool = False
    may_set: bool = False  # may become the owner (ALTER TABLE ... OWNER TO it)
    may_create: bool = False  # CREATE on the parent's schema
    owner_may_create: bool = False  # the owner's CREATE there, which OWNER TO needs
    grants: list[Grant] = field(default_factory=list)
    replident: str = "d"  # d(efault), n(othing), f(ull), i(ndex)
    replident_index: str | None = None  # the parent's replica-identity index, with replident i


def _name(role: str) -> str:
    return role if _PLAIN_NAME.match(role) else sql.Identifier(role).as_string(None)


def rights_problem(label: str, schema: str, r: Rights, server_version: int) -> str | None:
    """Why pgupkeep's role cannot create, attach and retire this table's partitions, naming the
    GRANT that fixes each gap; None when it can."""
    if r.superuser or (r.usage and r.may_set and r.may_create and (r.role == r.owner or r.owner_may_create)):
        return None
    role, owner, nsp = _name(r.role), _name(r.owner), _name(schema)
    fixes = []
    if not r.member:
        fixes.append((f"role {r.role} is neither the owner ({r.owner}) nor a member of that role", f"GRANT {owner} TO {role}"))
    else:
        if not r.usage:
            fix = f"GRANT {owner} TO {role} WITH INHERIT TRUE" if server_version >= 160000 else f"ALTER ROLE {role} INHERIT"
            fixes.append((f"role {r.role} is a member of {r.owner} but does not inherit its privileges", fix))
        if not r.may_set:
            fixes.append((f"role {r.role} may not SET ROLE to {r.owner}, which giving it a new partition needs",
                          f"GRANT {owner} TO {role} WITH SET TRUE"))
    if not r.may_create:
        fixes.append((f"role {r.role} may not create tables in schema {schema}", f"GRANT CREATE ON SCHEMA {nsp} TO {role}"))
    if r.role != r.owner and not r.owner_may_create:
        fixes.append((f"the owner {r.owner} may not create tables in schema {schema}, so it cannot be given new partitions",
                      f"GRANT CREATE ON SCHEMA {nsp} TO {owner}"))
    if not fixes:
        return None
    return (f"{label}: pgupkeep cannot manage this table's partitions: " + "; ".join(why for why, _ in fixes)
            + "; run " + "; ".join(fix for _, fix in fixes) + " (or remove the table from the policy)")


def grant_statements(grants: Sequence[Grant], partition: sql.Identifier) -> list[sql.Composed]:
    """The parent's GRANTs as statements on a new partition: one per grantee and grant option,
    table privileges first, then column privileges."""
    groups: dict[tuple[bool, str | None, bool], list[Grant]] = {}
    for g in grants:
        groups.setdefault((g.column is not None, g.grantee, g.grantable), []).append(g)
    out = []
    for (_, grantee, grantable), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2])):
        privileges = sql.SQL(", ").join(
            sql.SQL(g.privilege) if g.column is None else sql.SQL("{} ({})").format(sql.SQL(g.privilege), sql.Identifier(g.column))
            for g in items
        )
        to = sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee)
        stmt = sql.SQL("GRANT {} ON TABLE {} TO {}").format(privileges, partition, to)
        out.append(sql.SQL("{} WITH GRANT OPTION").format(stmt) if grantable else stmt)
    return out


def identity_before_attach(r: Rights, partition: sql.Identifier) -> list[sql.Composed]:
    if r.replident == "f":
        return [sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(partition)]
    if r.replident == "n":
        return [sql.SQL("ALTER TABLE {} REPLICA IDENTITY NOTHING").format(partition)]
    return []


def identity_after_attach(r: Rights, schema: str, partition: sql.Identifier) -> list[sql.Composed]:
    if r.replident != "i" or r.replident_index is None:
        return []
    body = sql.SQL(REPLICA_INDEX_BODY).format(
        partition=sql.Literal(partition.as_string(None)),
        parent_index=sql.Literal(sql.Identifier(schema, r.replident_index).as_string(None)),
    )
    text = body.as_string(None)
    quote = "$pgupkeep$"
    if quote in text:  # a name holding the dollar quote itself: fall back to a plain literal
        return [sql.SQL("DO {}").format(sql.Literal(text))]
    return [sql.SQL(f"DO {quote}\n{text}\n{quote}")]
