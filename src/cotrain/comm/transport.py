"""Peer-side sockets: dialing with authentication, and the data server that accepts ring, state
and probe connections from other peers.

Every connection starts with the challenge-response handshake (``auth.py``) and then one JSON
``hello`` frame saying what it is for; anything else is closed. Each accepted connection gets its
own short-lived thread whose handshake is bounded by a timeout, so port scans, garbage bytes and
half-open connections can neither crash nor wedge the server.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from cotrain.comm.auth import client_handshake, server_handshake
from cotrain.comm.config import CommConfig, TLSConfig
from cotrain.comm.errors import AuthError, ProtocolError
from cotrain.comm.frames import recv_json, send_json
from cotrain.comm.tls import client_context, server_context
from cotrain.core.clock import Deadline

log = logging.getLogger("cotrain.comm")

SOCK_BUF = 4 << 20


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY (small control frames must not wait ~40 ms for Nagle) and big buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)


def dial(
    host: str,
    port: int,
    secret: bytes,
    *,
    timeout_s: float,
    tls: TLSConfig | None = None,
    hello: dict[str, Any] | None = None,
) -> socket.socket:
    """Connect, authenticate and (optionally) send a hello; the socket keeps ``timeout_s``."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        tune(sock)
        if tls is not None:
            sock = client_context(tls).wrap_socket(sock)
        client_handshake(sock, secret)
        if hello is not None:
            send_json(sock, hello)
        return sock
    except BaseException:
        sock.close()
        raise


def dial_peer(
    host: str, port: int, secret: bytes, config: CommConfig, hello: dict[str, Any]
) -> socket.socket:
    """``dial`` another peer's data server (ring, state or probe) with ``config``'s connect
    timeout and TLS; the socket then times out after ``stall_timeout_s`` of silence."""
    sock = dial(host, port, secret, timeout_s=config.connect_timeout_s, tls=config.tls, hello=hello)
    sock.settimeout(config.stall_timeout_s)
    return sock


def close_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


Handler = Callable[[socket.socket, dict[str, Any]], None]


class DataServer:
    """Accepts authenticated peer connections and hands each to the handler for its ``kind``."""

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        handlers: dict[str, Handler],
        *,
        handshake_timeout_s: float,
        max_frame: int,
        tls: TLSConfig | None = None,
    ) -> None:
        self._secret = secret
        self._handlers = handlers
        self._timeout = handshake_timeout_s
        self._max_frame = max_frame
        self._tls = server_context(tls) if tls is not None else None
        self._sock = socket.create_server((host, port), backlog=256)
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._handshakes = threading.BoundedSemaphore(self.MAX_HANDSHAKES)
        self._thread = threading.Thread(
            target=self._accept_loop, name="cotrain-accept", daemon=True
        )
        self._thread.start()

    MAX_HANDSHAKES = 64  # unauthenticated connections in flight; more are closed at once

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._handshakes.acquire(blocking=False):
                close_quietly(conn)  # a flood of half-open connections cannot pin threads
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            accepted = self._handshake(conn)
        finally:
            self._handshakes.release()
        if accepted is None:
            return
        conn, handler, hello = accepted
        try:
            handler(conn, hello)
        except Exception as e:  # a misbehaving peer must not take the server down
            log.debug("data connection handler failed: %s", e)
            close_quietly(conn)

    def _handshake(
        self, conn: socket.socket
    ) -> tuple[socket.socket, Handler, dict[str, Any]] | None:
        try:
            conn.settimeout(self._timeout)
            tune(conn)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            server_handshake(conn, self._secret)
            hello = recv_json(conn, self._max_frame)
            handler = self._handlers.get(str(hello.get("type")))
            if handler is None:
                raise ProtocolError(f"unknown connection kind {hello.get('type')!r}")
            return conn, handler, hello
        except (AuthError, ProtocolError, OSError, ConnectionError, ssl.SSLError) as e:
            log.debug("rejected a data connection: %s", e)
            close_quietly(conn)
            return None

    def close(self) -> None:
        self._closed.set()
        close_quietly(self._sock)


def wait_deadline(cond: threading.Condition, pred: Callable[[], bool], deadline: Deadline) -> bool:
    """Wait on ``cond`` (held) until ``pred()`` or the deadline; returns ``pred()``."""
    while not pred():
        left = deadline.remaining()
        if left <= 0:
            return False
        cond.wait(min(left, 0.25))
    return True
