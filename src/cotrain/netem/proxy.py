"""The delay proxy program: a TCP forwarder that adds a fixed one-way latency in each direction.

    python -m cotrain.netem.proxy --target HOST:PORT --delay-ms 20 [--listen-port 0]
        [--listen-host 0.0.0.0] [--max-buffer-kb 4096] [--coalesce-ms MS] [--nice -10]
        [--parent-pid PID]
    python -m cotrain.netem.proxy --transparent-for OWN_IP --control SOCKET_PATH   # agent mode

It prints one JSON line ``{"port": N}`` on stdout once it listens, then accepts connections,
connects each to the target (after ``delay_ms``, as a SYN would travel) and forwards bytes both
ways. Every block read is held until ``delay_ms`` has passed since it arrived, so the RTT seen
through the proxy grows by ``2 * delay_ms``. The kernel has no netem, hence this program.

In agent mode (used by ``WanNetwork.set_delay``, see latency.py) it serves the connections an
nftables rule redirected to it: each goes to its original destination, delayed by the sum of
the two hosts' link delays, which the parent sets over the ``--control`` unix socket.

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
from collections.abc import Callable
from dataclasses import dataclass

from cotrain.netem.relay import Relay, Route

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


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a redirected connection was headed


@dataclass
class FixedRouter:
    """Every connection goes to one target with one delay (the explicit proxy)."""

    target: tuple[str, int]
    delay_s: float

    def route(self, client: socket.socket) -> Route:
        return Route(self.target, self.delay_s)

    def delay_for(self, target: tuple[str, int]) -> float:
        return self.delay_s


@dataclass
class TransparentRouter:
    """Connections redirected here by nftables go where they were headed, delayed by the sum
    of this host's link delay and the destination host's (``delays_s`` maps IP to seconds)."""

    own_ip: str
    delays_s: dict[str, float]

    def route(self, client: socket.socket) -> Route:
        raw = client.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
        target = (socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
        return Route(target, self.delay_for(target))

    def delay_for(self, target: tuple[str, int]) -> float:
        return self.delays_s.get(self.own_ip, 0.0) + self.delays_s.get(target[0], 0.0)

    def min_delay_s(self) -> float:
        """The smallest delay any connection from here gets (sizes the coalescing window)."""
        others = [d for ip, d in self.delays_s.items() if ip != self.own_ip]
        return self.delays_s.get(self.own_ip, 0.0) + min(others, default=0.0)


async def _control(
    router: TransparentRouter, on_update: Callable[[], None], path: str
) -> asyncio.Server:
    """Serve ``{"delays_ms": {ip: ms}}`` lines on a unix socket; reply once they apply."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            while line := await reader.readline():
                try:
                    delays = json.loads(line)["delays_ms"]
                    router.delays_s = {str(ip): float(ms) / 1000.0 for ip, ms in delays.items()}
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    writer.write(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
                else:
                    on_update()
                    writer.write(b'{"ok": true}\n')
                await writer.drain()

    return await asyncio.start_unix_server(handle, path)


async def _serve(args: argparse.Namespace, selector: _CoalescingSelector) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    limit = args.max_buffer_kb * 1024
    control = None
    if args.transparent_for is not None:
        router = TransparentRouter(args.transparent_for, {})
        relay = Relay(router, limit, mark=args.mark)

        def on_update() -> None:
            relay.reroute()
            selector.coalesce_s = _coalesce_s(args, router.min_delay_s())

        control = await _control(router, on_update, args.control)
    else:
        relay = Relay(FixedRouter(args.target, args.delay_ms / 1000.0), limit)
    server = await loop.create_server(
        relay.accept, args.listen_host, args.listen_port, reuse_address=True, backlog=1024
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
    if control is not None:
        control.close()
    relay.abort_all()
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
    parser.add_argument("--target", type=_address, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way added latency")
    parser.add_argument(
        "--transparent-for",
        metavar="OWN_IP",
        help="agent mode: forward nftables-redirected connections to their original "
        "destination, with delays set through --control (instead of --target/--delay-ms)",
    )
    parser.add_argument("--control", help="agent mode: unix socket for delay updates")
    parser.add_argument(
        "--mark", type=lambda v: int(v, 0), default=0x213, help="agent mode: SO_MARK of upstreams"
    )
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
    if args.transparent_for is None and args.target is None:
        parser.error("give --target HOST:PORT (or --transparent-for OWN_IP for agent mode)")
    if args.transparent_for is not None and args.control is None:
        parser.error("--transparent-for needs --control PATH")
    if args.max_buffer_kb < 64:
        parser.error("--max-buffer-kb must be >= 64")
    if args.coalesce_ms is not None and args.coalesce_ms < 0:
        parser.error("--coalesce-ms must be >= 0")
    return args


def _coalesce_s(args: argparse.Namespace, delay_s: float) -> float:
    if args.coalesce_ms is not None:
        return float(args.coalesce_ms) / 1000.0
    return min(MAX_COALESCE_S, delay_s * COALESCE_FRACTION)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    selector = _CoalescingSelector(_coalesce_s(args, args.delay_ms / 1000.0))
    loop = asyncio.SelectorEventLoop(selector)
    try:
        loop.run_until_complete(_serve(args, selector))
    except OSError as exc:  # e.g. the listen port is taken
        print(f"delay proxy: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
