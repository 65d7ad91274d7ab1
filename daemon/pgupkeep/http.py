"""HTTP endpoints: /metrics (from memory, never the database), /healthz and /readyz.

A server no client can exhaust. One thread watches every connection with a selector until its
request has fully arrived (at most REQUEST_TIMEOUT, at most MAX_HEADER bytes); only then does one
of WORKERS threads answer it. An idle or slow client costs a socket, never a thread. At most
MAX_OPEN connections are held open: past that the oldest one still waiting for its request is
closed to make room, and when every one of them is a complete request being answered, new
connections wait in the listen backlog. Errors are logged through structlog, never printed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import queue
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from pgupkeep.logs import get_logger
from pgupkeep.units import split_listen

WORKERS = 8
MAX_OPEN = 256  # connections held at once, waiting for their request or being answered
BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request line and headers
SEND_TIMEOUT = 10.0  # seconds any one send of the answer may block
MAX_HEADER = 16 * 1024
SHED_LOG_EVERY = 60.0  # seconds between two `http_connections_shed` warnings
ACCEPT_BATCH = 64  # connections accepted per turn of the loop, so reads are served meanwhile

_INDEX = (
    b'<html><body><a href="/metrics">/metrics</a> <a href="/healthz">/healthz</a> '
    b'<a href="/readyz">/readyz</a></body></html>'
)


class ListenError(OSError):
    """The listen address cannot be bound; the message names it."""

    def __str__(self) -> str:
        return str(self.strerror)


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) to bind; an empty host is every interface."""
    return split_listen(listen)


def bind(listen: str) -> socket.socket:
    """A listening socket for `listen`: IPv4, IPv6, or both for `[::]` and an empty host."""
    host, port = parse_listen(listen)
    try:
        if host in ("", "::"):
            if socket.has_dualstack_ipv6():
                return socket.create_server(("::", port), family=socket.AF_INET6, backlog=BACKLOG, dualstack_ipv6=True)
            if host == "":
                return socket.create_server(("0.0.0.0", port), backlog=BACKLOG)
        family, _, _, _, address = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )[0]
        return socket.create_server(address, family=family, backlog=BACKLOG)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
        raise ListenError(exc.errno, f"cannot listen on {listen}: {why}") from None


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Any
    deadline: float
    data: bytearray = field(default_factory=bytearray)

    def complete(self) -> bool:
        return b"\r\n\r\n" in self.data or b"\n\n" in self.data


class _SocketWriter(io.BufferedIOBase):
    """wfile over a blocking socket with a timeout: sendall, no buffering to flush."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


class HttpServer:
    def __init__(
        self,
        listen: str,
        render: Callable[[str], tuple[bytes, str]],
        healthy: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
        *,
        workers: int = WORKERS,
        max_open: int = MAX_OPEN,
        request_timeout: float = REQUEST_TIMEOUT,
    ):
        self.listen = listen
        self._render, self._healthy, self._ready = render, healthy, ready
        self._workers_n, self._max_open, self._request_timeout = workers, max_open, request_timeout
        self._log = get_logger()
        self._sock = bind(listen)
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._waiting: OrderedDict[socket.socket, _Connection] = OrderedDict()  # oldest first
        self._ready_q: queue.Queue[_Connection | None] = queue.Queue()
        self._open = 0  # waiting + queued + being answered
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._accepting = False
        self._resume_at = 0.0  # out of file descriptors: accept again at this monotonic time
        self._shed = 0
        self._shed_logged = 0.0
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def open_connections(self) -> int:
        with self._lock:
            return self._open

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listen_on()
        self._threads.append(threading.Thread(target=self._loop, name="http", daemon=True))
        self._threads += [
            threading.Thread(target=self._work, name=f"http-worker-{i}", daemon=True) for i in range(self._workers_n)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, wait: float = 2.0) -> None:
        """Stop accepting and answering; wait at most `wait` seconds in all for answers under way
        (a worker stuck sending to a client that stopped reading is a daemon thread: it does not
        hold the process)."""
        self._stopping.set()
        self._wake()
        for _ in range(self._workers_n):
            self._ready_q.put(None)
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._sock.close()
        for conn in list(self._waiting.values()):
            self._close(conn)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ the selector thread

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(self._next_timeout()):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        self._read(key.data)
                self._expire()
                if not self._accepting and time.monotonic() >= self._resume_at and self._has_room():
                    self._listen_on()
                self._log_shed()
        except Exception:  # a bug here must not go unseen, nor print a bare traceback
            self._log.exception("http_server_failed", listen=self.listen)

    def _next_timeout(self) -> float:
        timeout = 1.0
        if self._waiting:
            oldest = next(iter(self._waiting.values()))
            timeout = min(timeout, max(0.0, oldest.deadline - time.monotonic()))
        if not self._accepting:
            timeout = min(timeout, 0.1)
        return timeout

    def _listen_on(self) -> None:
        if not self._accepting:
            self._selector.register(self._sock, selectors.EVENT_READ, "listen")
            self._accepting = True

    def _listen_off(self) -> None:
        if self._accepting:
            self._selector.unregister(self._sock)
            self._accepting = False

    def _has_room(self) -> bool:
        with self._lock:
            return self._open < self._max_open or bool(self._waiting)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            with self._lock:
                full = self._open >= self._max_open
            if full and not self._waiting:
                self._listen_off()  # every slot is a request being answered: the backlog holds the rest
                return
            try:
                sock, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free one if we can, else stop accepting for a moment
                    # (the listening socket stays readable; selecting on it would spin).
                    if not self._evict_oldest():
                        self._listen_off()
                        self._resume_at = time.monotonic() + 0.1
                    self._log_limited("http_accept_failed", error=str(exc))
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if full:
                self._evict_oldest()  # the oldest connection that sent no request makes room
            sock.setblocking(False)
            conn = _Connection(sock, peer, time.monotonic() + self._request_timeout)
            with self._lock:
                self._open += 1
            self._waiting[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_oldest(self) -> bool:
        if not self._waiting:
            return False
        _, conn = self._waiting.popitem(last=False)
        self._shed += 1
        self._close(conn)
        return True

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._waiting.pop(conn.sock, None)
            self._close(conn)
            return
        conn.data += chunk
        if conn.complete() or len(conn.data) > MAX_HEADER:
            self._waiting.pop(conn.sock, None)
            self._selector.unregister(conn.sock)
            self._ready_q.put(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            sock, conn = next(iter(self._waiting.items()))
            if conn.deadline > now:
                return
            del self._waiting[sock]
            self._close(conn)

    def _close(self, conn: _Connection, registered: bool = True) -> None:
        if registered:  # only the selector thread (or stop(), after it) touches the selector
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        with self._lock:
            self._open -= 1

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _log_shed(self) -> None:
        now = time.monotonic()
        if self._shed and now - self._shed_logged >= SHED_LOG_EVERY:
            self._log.warning(
                "http_connections_shed",
                listen=self.listen,
                closed=self._shed,
                max_open=self._max_open,
                message="connections that sent no request were closed to make room for new ones",
            )
            self._shed, self._shed_logged = 0, now

    def _log_limited(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._shed_logged >= SHED_LOG_EVERY:
            self._shed_logged = now
            self._log.warning(event, listen=self.listen, **fields)

    # ------------------------------------------------------------------ the workers

    def _work(self) -> None:
        while True:
            conn = self._ready_q.get()
            if conn is None:
                return
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(SEND_TIMEOUT)
                self._answer(conn)
            except OSError as exc:  # the client went away or stopped reading: its loss only
                self._log.debug("http_client_error", peer=str(conn.peer), error=str(exc))
            except Exception:
                self._log.exception("http_handler_failed", peer=str(conn.peer))
            finally:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
                self._close(conn, registered=False)
                self._wake()  # a slot is free: the selector may accept again

    def _answer(self, conn: _Connection) -> None:
        if not conn.complete():
            body = b"request header too large\n"
            head = (
                "HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            conn.sock.sendall(head.encode() + body)
            return
        _Handler(conn.sock, conn.peer, conn.data, self._route)

    def _route(self, path: str, accept: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            body, content_type = self._render(accept)
            return 200, body, content_type
        if path in ("/healthz", "/readyz"):
            ok, why = (self._healthy if path == "/healthz" else self._ready)()
            return (200 if ok else 503), (why + "\n").encode(), "text/plain; charset=utf-8"
        if path == "/":
            return 200, _INDEX, "text/html; charset=utf-8"
        return 404, b"not found\n", "text/plain; charset=utf-8"


class _Handler(BaseHTTPRequestHandler):
    """The stdlib's request parsing over a request already read in full; one request a connection."""

    server_version = "pgupkeep"
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # even a garbled request gets a status line back

    def __init__(self, sock: socket.socket, peer: Any, data: bytes, route: Callable[[str, str], tuple[int, bytes, str]]):
        self.request, self.client_address, self.server = sock, peer, None  # type: ignore[assignment]
        self.route = route
        self.rfile = io.BytesIO(bytes(data))
        self.wfile = _SocketWriter(sock)
        self.close_connection = True
        self.handle_one_request()

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._respond(body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self._respond(body=False)

    def _respond(self, body: bool) -> None:
        try:
            status, payload, content_type = self.route(self.path.split("?", 1)[0], self.headers.get("Accept", ""))
        except Exception:
            get_logger().exception("http_handler_failed", path=self.path)
            status, payload, content_type = 500, b"internal error\n", "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass  # scrapes every few seconds would drown the log

    def log_error(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        # Malformed requests and unsupported methods: the client's mistake, not ours.
        get_logger().debug("http_client_error", peer=str(self.client_address), error=format % args)
