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
from dataclasses import dataclass
from typing import Any

from cotrain.comm import messages as m
from cotrain.comm.auth import Admission, Credentials, client_handshake, server_handshake
from cotrain.comm.config import CommConfig, TLSConfig
from cotrain.comm.errors import AuthError, CommError, ListenError, ProtocolError
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


@dataclass(eq=False)
class _Slot:
    """One accepted connection, from accept until its handler returns."""

    ip: str
    sock: socket.socket
    handshaking: bool = True


class DataServer:
    """Accepts authenticated peer connections and hands each to the handler for its kind.

    Strangers cannot starve it: every connection gets one deadline for its whole handshake (a
    trickle of bytes does not extend it), at most ``MAX_PER_ADDRESS`` connections are held per
    source address and ``MAX_HANDSHAKES`` in all (large: one costs a sleeping thread), and
    accept errors (out of file descriptors) never stop the accept loop.

    A full address (or server) does not turn newcomers away: the *oldest* connection still in
    its handshake there is cut instead. Honest peers finish a handshake in milliseconds, idle and
    trickling strangers are the old ones, so strangers sharing the honest peers' address (a NAT,
    loopback) cannot lock them out. Only connections whose handlers hold them (a proven key
    waiting, bounded in time) are never cut; with every slot of an address held so, it refuses.
    """

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
        try:
            self._sock = socket.create_server((host, port), backlog=1024)
        except OSError as e:
            raise ListenError(
                f"cannot listen for peers on {host}:{port}: {e.strerror or e} (set "
                "comm.listen_host / comm.listen_port, or 0 for any free port)"
            ) from None
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._pending_lock = threading.Lock()
        # oldest first (dicts keep insertion order); a slot leaves both when released or cut
        self._pending: dict[str, dict[_Slot, None]] = {}
        self._all: dict[_Slot, None] = {}
        self.refused = 0  # connections closed at once because a limit was reached
        self.evicted = 0  # handshakes cut to make room for newer connections
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
            slot = self._reserve(str(addr[0]), conn)
            if slot is None:
                self.refused += 1
                close_quietly(conn)
                continue
            try:
                threading.Thread(target=self._serve, args=(slot,), daemon=True).start()
            except RuntimeError:  # cannot start a thread: drop this one, keep accepting
                self._release(slot)
                close_quietly(conn)

    def _reserve(self, ip: str, conn: socket.socket) -> _Slot | None:
        with self._pending_lock:
            mine = self._pending.get(ip, {})
            if len(mine) >= self.MAX_PER_ADDRESS and not self._evict(mine):
                return None
            if len(self._all) >= self.MAX_HANDSHAKES and not self._evict(self._all):
                return None
            slot = _Slot(ip, conn)
            self._pending.setdefault(ip, {})[slot] = None
            self._all[slot] = None
            return slot

    def _evict(self, pool: dict[_Slot, None]) -> bool:
        """Cut the oldest connection of ``pool`` still in its handshake (lock held)."""
        victim = next((s for s in pool if s.handshaking), None)
        if victim is None:
            return False
        self._forget(victim)
        self.evicted += 1
        # Its thread still owns the socket: a shutdown (never a close, whose descriptor number
        # could be reused at once) makes its pending read fail now. Its owner closes it only
        # after taking it out of the registry under this lock, so the socket is still open.
        # ``socket.socket.shutdown`` also under TLS: SSLSocket's would drop the TLS state
        # under the reading thread.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(victim.sock, socket.SHUT_RDWR)
        return True

    def _forget(self, slot: _Slot) -> None:
        mine = self._pending.get(slot.ip)
        if mine is None or slot not in mine:
            return  # cut earlier
        del mine[slot]
        if not mine:
            del self._pending[slot.ip]
        del self._all[slot]

    def _release(self, slot: _Slot) -> None:
        with self._pending_lock:
            self._forget(slot)

    def _serve(self, slot: _Slot) -> None:
        # The slot is held until the handler returns: a proven key that is not (yet) a member
        # may be held by its handler for a bounded time, and counts against the same limits.
        try:
            accepted = self._handshake(slot)
            if accepted is None:
                return
            conn, handler, hello, key = accepted
            try:
                handler(conn, hello, key)
            except (CommError, OSError) as e:  # a misbehaving peer must not take the server down
                log.debug("data connection handler refused: %s", e)
                close_quietly(conn)
            except Exception:  # a bug: say so loudly, keep serving
                log.warning("data connection handler failed", exc_info=True)
                close_quietly(conn)
        finally:
            self._release(slot)

    def _handshake(self, slot: _Slot) -> tuple[socket.socket, Handler, Any, str] | None:
        deadline = Deadline.after(self._timeout)
        conn = slot.sock
        try:
            conn.settimeout(self._timeout)
            tune(conn)
            if self._tls is not None:
                with self._pending_lock:  # the wrapper takes over the descriptor
                    conn = slot.sock = self._tls.wrap_socket(
                        conn, server_side=True, do_handshake_on_connect=False
                    )
                conn.do_handshake()
            key = server_handshake(
                conn, self._identity, self._admission, timeout_s=deadline.remaining()
            )
            conn.settimeout(max(deadline.remaining(), 0.001))
            hello = m.parse_data_hello(recv_json(conn, self._max_frame))
            handler = self._handlers.get(hello.type)
            if handler is None:
                raise ProtocolError(f"this peer does not serve {hello.type} connections")
            with self._pending_lock:
                slot.handshaking = False
            return conn, handler, hello, key
        except (AuthError, ProtocolError, OSError, ConnectionError, ssl.SSLError) as e:
            log.debug("rejected a data connection: %s", e)
            self._release(slot)  # out of the registry before the close: see _evict
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
