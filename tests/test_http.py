"""The HTTP server cannot be exhausted: thousands of idle clients cost sockets, not threads or
memory, and a scraper still gets /metrics at once. HEAD, IPv6 and dual-stack addresses work; errors
are JSON log lines, never tracebacks. All against the real daemon process, on loopback only.
"""

from __future__ import annotations

import contextlib
import http.client
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_helpers import REPO, Daemon, policy_text, wait_until, write_policy
from pgupkeep.pgserver import free_port

IDLE_CLIENTS = 3000
MEMORY_LIMIT = 128 * 1024**2  # deploy/kubernetes/deployment.yaml's limit
JOB = {"health": {"schedule": "every 1s"}}


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024


def _raw(host: str, port: int, request: bytes, family: int = socket.AF_INET, timeout: float = 5) -> bytes:
    """Send one request on a fresh connection; everything the server sends until it closes."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _fd_room(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_3000_idle_clients_neither_starve_a_scrape_nor_grow_threads_or_memory(database: str, tmp_path: Path) -> None:
    _fd_room(IDLE_CLIENTS + 1000)
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, **JOB}])
    with Daemon(config) as d:
        d.start()
        d.wait_event("job_finished", target="shop", job="health")
        assert d.proc is not None
        pid = d.proc.pid
        before = _status(pid)
        idle: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 60
            for _ in range(IDLE_CLIENTS):
                s = socket.socket()
                s.settimeout(5)
                s.connect(("127.0.0.1", d.port))  # and then says nothing
                idle.append(s)
                assert time.monotonic() < deadline, "connecting the idle clients took over 60 s"
            during = _status(pid)
            t0 = time.monotonic()
            status, _, body = d.get("/metrics", timeout=5)
            took = time.monotonic() - t0
            assert status == 200 and "pgupkeep_build_info" in body
            assert took < 1.0, f"/metrics took {took:.2f}s with {IDLE_CLIENTS} idle clients"
            after = _status(pid)
        finally:
            for s in idle:
                s.close()
        # A fixed pool, not a thread per connection; memory well under the pod's limit.
        assert int(during["Threads"]) <= int(before["Threads"]) + 2, (before["Threads"], during["Threads"])
        assert int(after["Threads"]) <= 40, after["Threads"]
        assert _kib(after["VmHWM"]) < MEMORY_LIMIT, after["VmHWM"]
        assert _kib(after["VmRSS"]) < MEMORY_LIMIT, after["VmRSS"]
        shed = d.wait_event("http_connections_shed", timeout=10)
        assert shed["level"] == "warning" and shed["closed"] > 0
        # The server is still whole once they are gone.
        assert d.get("/healthz")[0] == 200
        assert d.stop() == 0
    assert d.bad_lines == [] and not any("Traceback" in line for line in d.stderr), d.output()


def test_head_answers_with_headers_only(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, **JOB}])
    with Daemon(config) as d:
        d.start()
        for path, status in (("/metrics", 200), ("/healthz", 200), ("/readyz", 200), ("/nope", 404)):
            raw = _raw("127.0.0.1", d.port, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
            head, _, body = raw.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0].startswith(f"HTTP/1.0 {status} "), lines
            headers = dict(line.split(": ", 1) for line in lines[1:])
            assert int(headers["Content-Length"]) > 0 and body == b"", (path, raw[:200])
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
        conn.request("HEAD", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain")
        assert resp.read() == b""
        conn.close()
        assert d.stop() == 0


def test_bad_requests_are_answered_and_logged_as_json_never_as_tracebacks(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, **JOB}], log_level="debug")
    with Daemon(config) as d:
        d.start()
        assert _raw("127.0.0.1", d.port, b"BREW /pot HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 501 ")
        assert _raw("127.0.0.1", d.port, b"GET /" + b"x" * 70000 + b" HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 431 ")
        assert _raw("127.0.0.1", d.port, b"GET / HTTP/1.0\r\n" + b"X-Pad: y\r\n" * 3000).startswith(b"HTTP/1.0 431 ")
        assert _raw("127.0.0.1", d.port, b"GET / HTTP/1.0 extra\r\n\r\n").startswith(b"HTTP/1.0 400 ")
        # A client that connects, sends half a request line and goes away.
        with socket.create_connection(("127.0.0.1", d.port)) as s:
            s.sendall(b"GET /met")
        # A client that sends a request and never reads the (large) answer, then resets.
        with socket.create_connection(("127.0.0.1", d.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        wait_until(lambda: d.find("http_client_error"), 10, "an http_client_error line")
        assert d.get("/metrics")[0] == 200
        assert d.stop() == 0
    assert d.bad_lines == [], d.bad_lines
    assert not any("Traceback" in line or "Exception" in line for line in d.stderr), d.stderr
    errors = d.find("http_client_error")
    assert all(e["level"] == "debug" and "peer" in e for e in errors), errors


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")


@needs_ipv6
def test_an_ipv6_listen_address_passes_check_and_serves(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, **JOB}], listen="[::1]:${PGUPKEEP_TEST_PORT}")
    with Daemon(config) as d:
        check = subprocess.run(
            [sys.executable, "-m", "pgupkeep", "check", "--config", str(config)],
            capture_output=True, text=True, cwd=REPO, env=d.env, timeout=60,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        d.start(ready=False)

        def ready() -> bool:
            with contextlib.suppress(OSError):
                return _raw("::1", d.port, b"GET /readyz HTTP/1.0\r\n\r\n", socket.AF_INET6).startswith(b"HTTP/1.0 200")
            return False

        wait_until(ready, 30, "/readyz on [::1]")
        assert b"pgupkeep_build_info" in _raw("::1", d.port, b"GET /metrics HTTP/1.0\r\n\r\n", socket.AF_INET6)
        with pytest.raises(OSError):  # bound to ::1 only
            _raw("127.0.0.1", d.port, b"GET /readyz HTTP/1.0\r\n\r\n")
        assert d.stop() == 0
    started = d.find("daemon_started")[0]
    assert started["listen"] == f"[::1]:{d.port}" and started["port"] == d.port


@needs_ipv6
def test_a_dual_stack_listen_address_serves_ipv4_and_ipv6(database: str, tmp_path: Path) -> None:
    config = write_policy(tmp_path / "p.yaml", [{"name": "shop", "dsn": database, **JOB}], listen="[::]:${PGUPKEEP_TEST_PORT}")
    with Daemon(config) as d:
        d.start()  # waits for /readyz over 127.0.0.1
        assert _raw("::1", d.port, b"GET /healthz HTTP/1.0\r\n\r\n", socket.AF_INET6).endswith(b"\r\n\r\nok\n")
        assert _raw("127.0.0.1", d.port, b"GET /healthz HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok\n")
        assert d.stop() == 0


def test_check_refuses_what_run_could_not_bind(tmp_path: Path) -> None:
    for listen in ("::1:9188", "[::1]", "300.1.1.1:9188", "[localhost]:9188", "0.0.0.0:70000"):
        path = tmp_path / "p.yaml"
        path.write_text(policy_text([], listen=listen))
        out = subprocess.run(
            [sys.executable, "-m", "pgupkeep", "check", "--config", str(path)],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2 and f"{path}:3:" in out.stdout and "daemon.listen: " in out.stdout, (listen, out)


def test_a_busy_port_fails_the_daemon_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_policy(tmp_path / "p.yaml", [], listen=f"127.0.0.1:{port}")
        d = Daemon(config)
        d.start(ready=False)
        assert d.wait(30) == 1
    [failed] = d.find("daemon_failed")
    assert failed["level"] == "error" and failed["listen"] == f"127.0.0.1:{port}"
    assert failed["error"] == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert d.bad_lines == [] and d.stderr == []


def test_a_port_freed_by_another_process_is_free_for_the_server_again() -> None:
    from pgupkeep.http import ListenError, bind

    port = free_port()
    first = bind(f"127.0.0.1:{port}")
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
        bind(f"127.0.0.1:{port}")
    first.close()
    bind(f"127.0.0.1:{port}").close()
