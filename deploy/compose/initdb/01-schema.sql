-- A small application schema for the local trial: a range-partitioned table with no partitions yet
-- (pgupkeep makes them) and a materialized view over it with the unique index that REFRESH
-- CONCURRENTLY needs. Owned by app_owner, as an application's objects would be.
CREATE ROLE app_owner NOLOGIN;
-- The owner creates its tables in its schema, so it may also be given the partitions pgupkeep
-- creates (ALTER TABLE ... OWNER TO needs the new owner's CREATE on the schema). Since
-- PostgreSQL 15 `public` grants CREATE to no one but the database owner.
GRANT CREATE ON SCHEMA public TO app_owner;

CREATE TABLE public.events (
    id         bigint GENERATED ALWAYS AS IDENTITY,
    created_at timestamptz NOT NULL,
    kind       text        NOT NULL,
    payload    jsonb,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
ALTER TABLE public.events OWNER TO app_owner;

CREATE MATERIALIZED VIEW public.events_daily AS
    SELECT date_trunc('day', created_at) AS day, kind, count(*) AS events
    FROM public.events
    GROUP BY 1, 2;
CREATE UNIQUE INDEX events_daily_day_kind ON public.events_daily (day, kind);
ALTER MATERIALIZED VIEW public.events_daily OWNER TO app_owner;

-- A table for the bloat job to look at.
CREATE TABLE public.sessions (id bigint PRIMARY KEY, seen_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE public.sessions OWNER TO app_owner;
INSERT INTO public.sessions (id) SELECT g FROM generate_series(1, 50000) g;
DELETE FROM public.sessions WHERE id % 3 <> 0;
