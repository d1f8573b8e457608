"""The delayed TCP relay inside the delay proxy: per-connection pipes with bounded queues.

A ``Relay`` is an asyncio protocol factory. Each accepted client becomes a ``Connection``: it
asks the relay's ``Router`` where to connect and how long to hold bytes, opens the upstream
socket after that delay (as a SYN would travel), and runs two ``Pipe``s, one per direction.
Every block is held until ``delay_s`` has passed since it arrived; a pipe stops reading from
its source while more than ``limit`` bytes wait, and stops writing while its destination's
socket is full, so memory per connection stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Route:
    """Where one accepted connection goes, and the one-way delay to add each way."""

    target: tuple[str, int]
    delay_s: float


class Router(Protocol):
    def route(self, client: socket.socket) -> Route: ...

    def delay_for(self, target: tuple[str, int]) -> float: ...


class Pipe:
    """One direction of one connection: bytes from ``source`` to ``dest``, each held ``delay``.

    Invariant: ``queued`` is the byte count in ``queue``; reading from ``source`` is paused
    while it exceeds ``limit`` and resumes once it falls to half, so memory stays bounded.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float, limit: int) -> None:
        self.loop = loop
        self.delay_s = delay_s
        self.limit = limit
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.source: asyncio.Transport | None = None
        self.dest: asyncio.Transport | None = None
        self.reading_paused = False
        self.dest_full = False
        self.eof = False  # the source finished; forward EOF after the queue drains
        self.reset = False  # ... and it was a reset: forward a reset instead of a FIN
        self.done = False  # EOF forwarded (or the pipe was torn down)
        self.timer: asyncio.TimerHandle | None = None
        self.on_done: list[Callable[[], None]] = []

    def feed(self, data: bytes) -> None:
        self.queue.append((self.loop.time() + self.delay_s, data))
        self.queued += len(data)
        if self.queued > self.limit and not self.reading_paused and self.source is not None:
            self.reading_paused = True
            self.source.pause_reading()
        self._schedule()

    def feed_eof(self, *, reset: bool = False) -> None:
        self.eof = True
        self.reset = reset
        self._schedule()

    def set_dest_full(self, full: bool) -> None:
        self.dest_full = full
        if not full:
            self._schedule()

    def _schedule(self) -> None:
        if self.timer is not None or self.dest is None or self.dest_full or self.done:
            return
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)
        elif self.eof:
            self.done = True
            dest = self.dest
            if self.reset:
                reset(dest)
            elif dest.can_write_eof() and not dest.is_closing():
                dest.write_eof()
            for callback in self.on_done:
                callback()

    def _flush(self) -> None:
        self.timer = None
        if self.dest is None or self.dest.is_closing():
            return
        now = self.loop.time()
        chunks = []
        while self.queue and self.queue[0][0] <= now:
            chunks.append(self.queue.popleft()[1])
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.queued -= len(data)
            self.dest.write(data)  # may call pause_writing -> set_dest_full(True)
        if self.reading_paused and self.queued <= self.limit // 2 and self.source is not None:
            self.reading_paused = False
            self.source.resume_reading()
        self._schedule()

    def cancel(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0


class Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes to ``out``, ``into`` feeds it."""

    def __init__(self, conn: Connection, out: Pipe, into: Pipe, *, is_client: bool) -> None:
        self.conn = conn
        self.out = out
        self.into = into
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Let the write buffer hold a quarter of the delay queue before pushing back on it.
        transport.set_write_buffer_limits(high=max(self.out.limit // 4, 64 * 1024))
        self.out.source = transport
        self.into.dest = transport
        if self.is_client:
            self.conn.client_connected(sock)
        self.into._schedule()

    def data_received(self, data: bytes) -> None:
        self.out.feed(data)

    def eof_received(self) -> bool:
        self.out.feed_eof()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        self.into.set_dest_full(True)

    def resume_writing(self) -> None:
        self.into.set_dest_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        # Whatever we still owed this side cannot be delivered; what it sent still travels on,
        # followed by a FIN, or by a reset when this side was reset.
        self.into.cancel()
        self.out.source = None
        self.out.feed_eof(reset=isinstance(exc, ConnectionError))
        self.conn.side_lost(self)


class Connection:
    """A client connection and its upstream: two pipes, two sides, closed when both are done."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.route: Route | None = None
        self.up_pipe = Pipe(relay.loop, 0.0, relay.limit)  # client -> target
        self.down_pipe = Pipe(relay.loop, 0.0, relay.limit)  # target -> client
        self.client = Side(self, out=self.up_pipe, into=self.down_pipe, is_client=True)
        self.upstream = Side(self, out=self.down_pipe, into=self.up_pipe, is_client=False)
        self.lost: set[int] = set()
        self.opening: asyncio.Task[None] | None = None
        for pipe in (self.up_pipe, self.down_pipe):
            pipe.on_done.append(self._maybe_close)

    def client_connected(self, sock: socket.socket) -> None:
        try:
            self.route = self.relay.router.route(sock)
        except OSError as exc:
            print(f"delay proxy: no route for a connection: {exc}", file=sys.stderr)
            self.relay.loop.call_soon(self.abort)
            return
        self.set_delay(self.route.delay_s)
        self.opening = self.relay.loop.create_task(self._open_upstream(self.route))

    def set_delay(self, delay_s: float) -> None:
        # Bytes already queued keep their due times: a shorter delay never reorders a stream.
        self.up_pipe.delay_s = self.down_pipe.delay_s = delay_s

    async def _open_upstream(self, route: Route) -> None:
        await asyncio.sleep(route.delay_s)  # the SYN travels one way first
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self.relay.mark is not None:
                # Marked sockets skip the redirect rule, so our own upstream is not looped back.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.relay.mark)
            await asyncio.wait_for(
                self.relay.loop.sock_connect(sock, route.target), CONNECT_TIMEOUT_S
            )
            await self.relay.loop.create_connection(lambda: self.upstream, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            print(f"delay proxy: cannot reach {route.target}: {exc}", file=sys.stderr)
            # The refusal travels back one way too; then the client gets a reset, the nearest
            # we can come to ECONNREFUSED once its connect() has already succeeded here.
            self.relay.loop.call_later(route.delay_s, self.abort)

    def side_lost(self, side: Side) -> None:
        self.lost.add(id(side))
        if len(self.lost) == 2:
            self.relay.connections.discard(self)
        else:
            self._maybe_close()

    def _maybe_close(self) -> None:
        # Close a side once nothing more can flow to it: its inbound pipe has finished, and
        # either its outbound one has too or its peer is gone.
        for side in (self.client, self.upstream):
            t = side.transport
            if t is None or t.is_closing():
                continue
            if side.into.done and (side.out.done or side.out.eof):
                t.close()  # flushes the write buffer first

    def abort(self) -> None:
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
        for pipe in (self.up_pipe, self.down_pipe):
            pipe.cancel()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                reset(side.transport)
        self.relay.connections.discard(self)


def reset(transport: asyncio.Transport) -> None:
    """Close with a TCP reset (linger 0), dropping whatever is still buffered."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Relay:
    """Accepts clients (as an asyncio protocol factory) and relays each per its ``Route``."""

    def __init__(self, router: Router, limit: int, mark: int | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.router = router
        self.limit = limit
        self.mark = mark
        self.connections: set[Connection] = set()

    def accept(self) -> Side:
        conn = Connection(self)
        self.connections.add(conn)
        return conn.client

    def reroute(self) -> None:
        """Apply the router's current delays to every live connection."""
        for conn in self.connections:
            if conn.route is not None:
                conn.set_delay(self.router.delay_for(conn.route.target))

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()
