"""The delay proxy program: a TCP forwarder that adds a fixed one-way latency in each direction.

    python -m cotrain.netem.proxy --target HOST:PORT --delay-ms 20 [--listen-port 0]
        [--listen-host 0.0.0.0] [--max-buffer-kb 4096] [--coalesce-ms MS] [--nice -10]
        [--parent-pid PID]

It prints one JSON line ``{"port": N}`` on stdout once it listens, then accepts connections,
connects each to the target (after ``delay_ms``, as a SYN would travel) and forwards bytes both
ways. Every block read is held until ``delay_ms`` has passed since it arrived, so the RTT seen
through the proxy grows by ``2 * delay_ms``. The kernel has no netem, hence this program.

Memory is bounded per direction of each connection: when more than ``max_buffer_kb`` waits in
the delay queue we stop reading from the sender (TCP backpressure reaches it), and while the
receiver's socket is full we stop draining the queue. A single connection therefore carries at
most ``max_buffer_kb / delay`` bytes per second (4 MiB / 20 ms = 1.6 Gbit/s by default).

It runs at nice -10 when allowed, so the added latency stays close to ``delay_ms`` on a busy
machine. It exits on SIGTERM/SIGINT, and when its parent process (``--parent-pid``) goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

CONNECT_TIMEOUT_S = 10.0
PARENT_POLL_S = 0.2
# Coalescing window: 1/20 of the delay, at most 2 ms (see _CoalescingSelector).
COALESCE_FRACTION = 0.05
MAX_COALESCE_S = 0.002


class _CoalescingSelector(selectors.EpollSelector):
    """An epoll selector that lets events pile up for ``coalesce_s`` while the proxy is busy.

    A shaped link delivers one MTU packet at a time (8,000/s at 100 Mbit/s); waking the event
    loop for each cost 85% of a core per 100 Mbit/s flow (measured), mostly kernel receive work
    done one packet per ``recv``. After a wake-up that found events we sleep up to
    ``coalesce_s`` (never past the loop's next timer) before polling again, so one ``recv``
    takes many packets: 27% of a core at 0.5 ms, 9% at 2 ms. The price: a block may be seen up
    to ``coalesce_s`` late, which only ever adds to its delay. An idle proxy (the first packet
    after a pause, a ping) waits in epoll as usual and is seen at once.
    """

    def __init__(self, coalesce_s: float) -> None:
        super().__init__()
        self.coalesce_s = coalesce_s
        self.busy = False

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.busy and self.coalesce_s > 0 and (timeout is None or timeout > 0):
            pause = self.coalesce_s if timeout is None else min(self.coalesce_s, timeout)
            time.sleep(pause)
            timeout = None if timeout is None else timeout - pause
        if timeout is None or timeout <= 0:
            ready = super().select(timeout)
        else:
            # epoll counts whole milliseconds, rounded up: a timer would fire up to 1 ms late
            # on each hop. Wait the whole milliseconds in epoll, the rest in a precise sleep.
            deadline = time.monotonic() + timeout
            ready = super().select(math.floor(timeout * 1000) / 1000)
            if not ready:
                left = deadline - time.monotonic()
                if left > 0:
                    time.sleep(left)
                ready = super().select(0)
        self.busy = bool(ready)
        return ready


class _Pipe:
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

    def feed_eof(self) -> None:
        self.eof = True
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
            if dest.can_write_eof() and not dest.is_closing():
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


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes to ``out``, ``into`` feeds it."""

    def __init__(self, conn: _Connection, out: _Pipe, into: _Pipe) -> None:
        self.conn = conn
        self.out = out
        self.into = into
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Let the write buffer hold a quarter of the delay queue before pushing back on it.
        transport.set_write_buffer_limits(high=max(self.out.limit // 4, 64 * 1024))
        self.out.source = transport
        self.into.dest = transport
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
        # Whatever we still owed this side cannot be delivered; what it sent still travels on.
        self.into.cancel()
        self.out.source = None
        self.out.feed_eof()
        self.conn.side_lost(self)


class _Connection:
    """A client connection and its upstream: two pipes, two sides, closed when both are done."""

    def __init__(self, proxy: _Proxy) -> None:
        self.proxy = proxy
        loop = proxy.loop
        self.up_pipe = _Pipe(loop, proxy.delay_s, proxy.limit)  # client -> target
        self.down_pipe = _Pipe(loop, proxy.delay_s, proxy.limit)  # target -> client
        self.client = _Side(self, out=self.up_pipe, into=self.down_pipe)
        self.upstream = _Side(self, out=self.down_pipe, into=self.up_pipe)
        self.lost: set[int] = set()
        self.opening: asyncio.Task[None] | None = None
        for pipe in (self.up_pipe, self.down_pipe):
            pipe.on_done.append(self._maybe_close)

    async def open_upstream(self) -> None:
        await asyncio.sleep(self.proxy.delay_s)  # the SYN travels one way first
        try:
            await asyncio.wait_for(
                self.proxy.loop.create_connection(lambda: self.upstream, *self.proxy.target),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            print(f"delay proxy: cannot reach {self.proxy.target}: {exc}", file=sys.stderr)
            self.abort()

    def side_lost(self, side: _Side) -> None:
        self.lost.add(id(side))
        if len(self.lost) == 2:
            self.proxy.connections.discard(self)
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
                side.transport.abort()
        self.proxy.connections.discard(self)


class _Proxy:
    def __init__(self, target: tuple[str, int], delay_s: float, limit: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.delay_s = delay_s
        self.limit = limit
        self.connections: set[_Connection] = set()

    def accept(self) -> _Side:
        conn = _Connection(self)
        self.connections.add(conn)
        conn.opening = self.loop.create_task(conn.open_upstream())  # keep a reference
        return conn.client


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    proxy = _Proxy(args.target, args.delay_ms / 1000.0, args.max_buffer_kb * 1024)
    server = await loop.create_server(
        proxy.accept, args.listen_host, args.listen_port, reuse_address=True, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()

    async def watch_parent() -> None:
        while os.getppid() == args.parent_pid:
            await asyncio.sleep(PARENT_POLL_S)
        stop.set()

    watcher = loop.create_task(watch_parent()) if args.parent_pid else None
    await stop.wait()
    server.close()
    for conn in list(proxy.connections):
        conn.abort()
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cotrain.netem.proxy", description=__doc__)
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way added latency")
    parser.add_argument("--listen-host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--listen-port", type=int, default=0, help="port to listen on, 0: any")
    parser.add_argument(
        "--max-buffer-kb", type=int, default=4096, help="delay queue bound per direction"
    )
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this pid is gone")
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="scheduling priority to take when allowed (root): the emulated network's delay "
        "should not grow with the CPU load of the programs it connects",
    )
    parser.add_argument(
        "--coalesce-ms",
        type=float,
        default=None,
        help="while busy, let packets pile up this long between reads (default: delay/20, "
        "at most 2 ms; 0 reads every packet at once, costing much more CPU)",
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    if args.max_buffer_kb < 64:
        parser.error("--max-buffer-kb must be >= 64")
    if args.coalesce_ms is not None and args.coalesce_ms < 0:
        parser.error("--coalesce-ms must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    if args.coalesce_ms is None:
        coalesce_s = min(MAX_COALESCE_S, args.delay_ms / 1000.0 * COALESCE_FRACTION)
    else:
        coalesce_s = args.coalesce_ms / 1000.0
    loop = asyncio.SelectorEventLoop(_CoalescingSelector(coalesce_s))
    try:
        loop.run_until_complete(_serve(args))
    except OSError as exc:  # e.g. the listen port is taken
        print(f"delay proxy: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
