"""The demo's seed: a database with work for every job, and the application sessions it runs.

A monthly-partitioned table with a default partition, two dependent materialized views, a table
with heavy deletes, a foreign key without an index, and two sessions of an ordinary role: one idle in transaction, one in a long
query.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from pgupkeep.pgserver import LocalServer

DEMO_DB = "pgupkeep_demo"
APP_ROLE = "demo_app"  # not a superuser: superusers' sessions are never signalled, by design
DSN_ENV = "PGUPKEEP_DEMO_DSN"
PAST_MONTHS = 3  # months of events present before the daemon starts; it creates the rest
EVENTS = 20_000
AUDIT_ROWS = 50_000

SETUP_ROLE_SQL = f"""
DO $$ BEGIN
  CREATE ROLE {APP_ROLE} LOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$"""

# Before the month partitions and the events: the parent table with its DEFAULT partition.
TABLES_SQL = (
    "CREATE EXTENSION IF NOT EXISTS pgstattuple",
    "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    """CREATE TABLE public.events (
         id bigint GENERATED ALWAYS AS IDENTITY,
         occurred_at timestamptz NOT NULL,
         kind text NOT NULL,
         amount numeric(12, 2) NOT NULL
       ) PARTITION BY RANGE (occurred_at)""",
    "CREATE TABLE public.events_default PARTITION OF public.events DEFAULT",
)
# After the events: views over them (populated, as REFRESH ... CONCURRENTLY requires), the bloat.
VIEWS_AND_BLOAT_SQL = (
    "CREATE SCHEMA reporting",
    # events_summary reads events_daily: refreshing them in the wrong order shows stale totals.
    """CREATE MATERIALIZED VIEW reporting.events_daily AS
         SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, kind, count(*) AS events, sum(amount) AS amount
         FROM public.events GROUP BY 1, 2""",
    "CREATE UNIQUE INDEX events_daily_day_kind ON reporting.events_daily (day, kind)",
    """CREATE MATERIALIZED VIEW reporting.events_summary AS
         SELECT kind, sum(events)::bigint AS events, sum(amount) AS amount, max(day) AS last_day
         FROM reporting.events_daily GROUP BY kind""",
    "CREATE UNIQUE INDEX events_summary_kind ON reporting.events_summary (kind)",
    # Autovacuum off on this table only, so it stays bloated until pgupkeep vacuums it.
    """CREATE TABLE public.audit_log (
         id bigint PRIMARY KEY,
         logged_at timestamptz NOT NULL DEFAULT now(),
         actor text NOT NULL,
         detail text NOT NULL
       ) WITH (autovacuum_enabled = off)""",
    f"""INSERT INTO public.audit_log (id, actor, detail)
        SELECT i, 'user_' || (i % 97), repeat(md5(i::text), 3) FROM generate_series(1, {AUDIT_ROWS}) AS i""",
    "DELETE FROM public.audit_log WHERE id % 5 < 3",
    "ANALYZE public.audit_log",
    # A foreign key without an index on its column: query_insights names the index to create.
    "CREATE TABLE public.customers (id bigint PRIMARY KEY, name text NOT NULL)",
    "INSERT INTO public.customers SELECT i, 'customer ' || i FROM generate_series(1, 1000) AS i",
    """CREATE TABLE public.orders (
         id bigint PRIMARY KEY,
         customer_id bigint NOT NULL REFERENCES public.customers,
         total numeric(12, 2) NOT NULL
       )""",
    "INSERT INTO public.orders SELECT i, 1 + i % 1000, i % 500 FROM generate_series(1, 20000) AS i",
    "ANALYZE public.customers, public.orders",
    f"GRANT SELECT ON public.events, public.audit_log TO {APP_ROLE}",
)
INSERT_EVENTS_SQL = f"""
INSERT INTO public.events (occurred_at, kind, amount)
SELECT %(start)s::timestamptz + random() * (%(end)s::timestamptz - %(start)s::timestamptz),
       (ARRAY['signup', 'order', 'refund', 'login'])[1 + i %% 4],
       round((random() * 100)::numeric, 2)
FROM generate_series(1, {EVENTS}) AS i
"""
LONG_QUERY_SQL = "SELECT pg_sleep(3600) /* pgupkeep demo: a report that never ends */"
# It reads audit_log, not events: a lock it held on events_default would make the partitions job
# wait for it (ATTACH next to a DEFAULT partition locks that) until it is terminated.
IDLE_TX_SQL = (
    "SELECT count(*) FROM public.audit_log WHERE actor = 'user_1' /* then forgets to commit */"
)


def month_start(today: date, offset: int) -> date:
    """The first day of the month `offset` months from `today`'s."""
    index = today.year * 12 + today.month - 1 + offset
    return date(index // 12, index % 12 + 1, 1)


@dataclass
class Sessions:
    """The application's misbehaving sessions: one idle in transaction, one running a long query."""

    dsn: str
    log: Any
    idle: psycopg.Connection | None = None
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.idle = psycopg.connect(self.dsn, application_name="demo-checkout")
        self.idle.execute(IDLE_TX_SQL)  # psycopg opened a transaction; it stays open
        started = threading.Event()
        thread = threading.Thread(
            target=self._long_query, args=(started,), name="demo-long-query", daemon=True
        )
        thread.start()
        self.threads.append(thread)
        started.wait(10)

    def _long_query(self, started: threading.Event) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, application_name="demo-report") as conn:
                started.set()
                conn.execute(LONG_QUERY_SQL)
        except psycopg.Error as exc:
            self.log.info(
                "demo_session_ended", session="demo-report", error=str(exc).strip().splitlines()[0]
            )
        finally:
            started.set()

    def close(self) -> None:
        for thread in self.threads:
            thread.join(10)
        if self.idle is not None:
            with contextlib.suppress(Exception):  # terminated by pgupkeep, most likely
                self.idle.close()


def seed(server: LocalServer, today: date) -> None:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as admin:
        # An earlier demo's database (--data-dir) is replaced: the demo always starts the same.
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DEMO_DB))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEMO_DB)))
        admin.execute(SETUP_ROLE_SQL)
    with psycopg.connect(server.dsn(DEMO_DB), autocommit=True) as conn:
        for statement in TABLES_SQL:
            conn.execute(statement)
        # Only past months: the daemon's first run creates this month and `premake` more.
        for offset in range(-PAST_MONTHS, 0):
            lower, upper = month_start(today, offset), month_start(today, offset + 1)
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF public.events FOR VALUES FROM ({}) TO ({})"
                ).format(
                    sql.Identifier("public", f"events_{lower:%Y_%m}"),
                    sql.Literal(f"{lower} 00:00:00+00"),
                    sql.Literal(f"{upper} 00:00:00+00"),
                )
            )
        start, end = month_start(today, -PAST_MONTHS), month_start(today, 0)
        conn.execute(
            INSERT_EVENTS_SQL, {"start": f"{start} 00:00:00+00", "end": f"{end} 00:00:00+00"}
        )
        for statement in VIEWS_AND_BLOAT_SQL:
            conn.execute(statement)
