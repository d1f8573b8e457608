"""Peer-side sockets: dialing with authentication, and the data server that accepts ring, state
and probe connections from other peers.

Every connection starts with the key handshake (``auth.py``) and then one ``hello`` frame saying
what it is for (``messages.DataHello``); anything else is closed. Each accepted connection gets
its own short-lived thread whose whole handshake is bounded by one deadline, so port scans,
garbage bytes, slow trickles and half-open connections can neither crash nor wedge the server.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from cotrain.comm import messages as m
from cotrain.comm.auth import Admission, Credentials, client_handshake, server_handshake
from cotrain.comm.config import CommConfig, TLSConfig
from cotrain.comm.errors import AuthError, ProtocolError
from cotrain.comm.frames import recv_json, send_json
from cotrain.comm.tls import client_context, server_context
from cotrain.core.clock import Deadline
from cotrain.core.identity import Identity

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
    creds: Credentials,
    *,
    expect_key: str | None,
    timeout_s: float,
    tls: TLSConfig | None = None,
    hello: dict[str, Any] | None = None,
) -> socket.socket:
    """Connect, authenticate both ways (the server must hold ``expect_key`` when given) and
    optionally send a hello; the socket keeps ``timeout_s``."""
    deadline = Deadline.after(timeout_s)
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        tune(sock)
        if tls is not None:
            sock = client_context(tls).wrap_socket(sock)
        client_handshake(sock, creds, expect_key=expect_key, timeout_s=deadline.remaining())
        sock.settimeout(timeout_s)
        if hello is not None:
            send_json(sock, hello)
        return sock
    except BaseException:
        sock.close()
        raise


def dial_peer(
    addr: m.PeerAddr, creds: Credentials, config: CommConfig, hello: m._Msg
) -> socket.socket:
    """``dial`` another peer's data server (ring, state or probe): it must prove the key that is
    its id. Uses ``config``'s connect timeout and TLS; the socket then times out after
    ``stall_timeout_s`` of silence."""
    sock = dial(
        addr.host,
        addr.port,
        creds,
        expect_key=addr.peer_id,
        timeout_s=config.connect_timeout_s,
        tls=config.tls,
        hello=hello.dump(),
    )
    sock.settimeout(config.stall_timeout_s)
    return sock


def close_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


Handler = Callable[[socket.socket, Any, str], None]
"""Takes an authenticated connection, its parsed hello and the key the client proved."""


class DataServer:
    """Accepts authenticated peer connections and hands each to the handler for its kind.

    Strangers cannot starve it: every connection gets one deadline for its whole handshake (a
    trickle of bytes does not extend it), at most ``MAX_PER_ADDRESS`` handshakes run per source
    address and ``MAX_HANDSHAKES`` in all (large: a pending handshake costs a sleeping thread),
    and accept errors (out of file descriptors) never stop the accept loop."""

    MAX_HANDSHAKES = 4096
    MAX_PER_ADDRESS = 256

    def __init__(
        self,
        host: str,
        port: int,
        identity: Identity,
        admission: Admission,
        handlers: dict[str, Handler],
        *,
        handshake_timeout_s: float,
        max_frame: int,
        tls: TLSConfig | None = None,
    ) -> None:
        self._identity = identity
        self._admission = admission
        self._handlers = handlers
        self._timeout = handshake_timeout_s
        self._max_frame = max_frame
        self._tls = server_context(tls) if tls is not None else None
        self._sock = socket.create_server((host, port), backlog=1024)
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._pending_lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._pending_total = 0
        self.refused = 0  # connections closed at once because a limit was reached
        self._thread = threading.Thread(
            target=self._accept_loop, name="cotrain-accept", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError as e:
                if self._closed.is_set():
                    return
                log.warning("data server accept failed: %s", e)  # EMFILE and friends
                self._closed.wait(0.05)
                continue
            ip = str(addr[0])
            if not self._reserve(ip):
                self.refused += 1
                close_quietly(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, ip), daemon=True).start()
            except RuntimeError:  # cannot start a thread: drop this one, keep accepting
                self._release(ip)
                close_quietly(conn)

    def _reserve(self, ip: str) -> bool:
        with self._pending_lock:
            mine = self._pending.get(ip, 0)
            if mine >= self.MAX_PER_ADDRESS or self._pending_total >= self.MAX_HANDSHAKES:
                return False
            self._pending[ip] = mine + 1
            self._pending_total += 1
            return True

    def _release(self, ip: str) -> None:
        with self._pending_lock:
            self._pending_total -= 1
            left = self._pending[ip] - 1
            if left:
                self._pending[ip] = left
            else:
                del self._pending[ip]

    def _serve(self, conn: socket.socket, ip: str) -> None:
        # The slot is held until the handler returns: a proven key that is not (yet) a member
        # may be held by its handler for a bounded time, and counts against the same limits.
        try:
            accepted = self._handshake(conn)
            if accepted is None:
                return
            conn, handler, hello, key = accepted
            try:
                handler(conn, hello, key)
            except Exception as e:  # a misbehaving peer must not take the server down
                log.debug("data connection handler failed: %s", e)
                close_quietly(conn)
        finally:
            self._release(ip)

    def _handshake(self, conn: socket.socket) -> tuple[socket.socket, Handler, Any, str] | None:
        deadline = Deadline.after(self._timeout)
        try:
            conn.settimeout(self._timeout)
            tune(conn)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            key = server_handshake(
                conn, self._identity, self._admission, timeout_s=deadline.remaining()
            )
            conn.settimeout(max(deadline.remaining(), 0.001))
            hello = m.parse_data_hello(recv_json(conn, self._max_frame))
            handler = self._handlers.get(hello.type)
            if handler is None:
                raise ProtocolError(f"this peer does not serve {hello.type} connections")
            return conn, handler, hello, key
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
