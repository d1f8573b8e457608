"""Measuring programs for emulated links: run them inside hosts with ``Host.popen``.

    python -m cotrain.netem.probe echo --port 0            # echo server
    python -m cotrain.netem.probe sink --port 0 --flows K  # receive K flows, report goodput
    python -m cotrain.netem.probe send --to H:P --bytes N --flows K
    python -m cotrain.netem.probe rtt --to H:P --count 20  # ping-pong through an echo server
    python -m cotrain.netem.probe --nice -10 ...            # a higher priority (as root)

Servers print ``{"port": N}`` first. Every program prints one JSON result line and exits; the
sink measures from the first byte it receives to the last EOF (the sender cannot know when
its bytes really arrived), over all flows together, and hashes what it received.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

CHUNK = 256 * 1024
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FlowResult:
    """What one side saw of one TCP flow."""

    bytes: int
    sha256: str
    first_byte_s: float  # time.monotonic() when the first byte went out / came in
    last_byte_s: float


@dataclass(frozen=True)
class TransferResult:
    """All flows of one measurement: goodput from first byte to last, over every flow."""

    bytes: int
    seconds: float
    mbit_s: float
    flows: list[FlowResult]


def _summarise(flows: list[FlowResult]) -> TransferResult:
    total = sum(f.bytes for f in flows)
    seconds = max(f.last_byte_s for f in flows) - min(f.first_byte_s for f in flows)
    mbit_s = total * 8 / seconds / 1e6 if seconds > 0 else float("inf")
    return TransferResult(total, seconds, mbit_s, flows)


def _listen(port: int) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    return srv


def _accept(srv: socket.socket) -> socket.socket:
    srv.settimeout(TIMEOUT_S)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT_S)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _receive(conn: socket.socket) -> FlowResult:
    digest = hashlib.sha256()
    total = 0
    first = last = 0.0
    buf = bytearray(CHUNK)
    with conn:
        while n := conn.recv_into(buf):
            last = time.monotonic()
            if total == 0:
                first = last
            total += n
            digest.update(memoryview(buf)[:n])
    return FlowResult(total, digest.hexdigest(), first, last)


def _send(address: tuple[str, int], n_bytes: int, seed: int) -> FlowResult:
    block = random.Random(seed).randbytes(CHUNK)
    digest = hashlib.sha256()
    with socket.create_connection(address, TIMEOUT_S) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = time.monotonic()
        left = n_bytes
        while left > 0:
            piece = memoryview(block)[: min(left, CHUNK)]
            conn.sendall(piece)
            digest.update(piece)
            left -= len(piece)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the receiver's EOF: every byte has arrived
        last = time.monotonic()
    return FlowResult(n_bytes, digest.hexdigest(), first, last)


def _parallel(fn: Callable[..., FlowResult], args_list: list[tuple[Any, ...]]) -> list[FlowResult]:
    """Run ``fn(*args)`` for each ``args`` on its own thread; re-raise the first failure."""
    results: list[FlowResult | BaseException] = [TimeoutError("flow did not finish")] * len(
        args_list
    )

    def run(i: int) -> None:
        try:
            results[i] = fn(*args_list[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(args_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    flows = []
    for r in results:
        if isinstance(r, BaseException):
            raise r
        flows.append(r)
    return flows


def cmd_sink(args: argparse.Namespace) -> None:
    srv = _listen(args.port)
    conns = [_accept(srv) for _ in range(args.flows)]
    flows = _parallel(_receive, [(c,) for c in conns])
    print(json.dumps(asdict(_summarise(flows))), flush=True)


def cmd_send(args: argparse.Namespace) -> None:
    flows = _parallel(_send, [(args.to, args.bytes, args.seed + i) for i in range(args.flows)])
    print(json.dumps(asdict(_summarise(flows))), flush=True)


def cmd_echo(args: argparse.Namespace) -> None:
    srv = _listen(args.port)
    srv.settimeout(None)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(CHUNK):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def cmd_rtt(args: argparse.Namespace) -> None:
    payload = b"x" * args.size
    rtts_ms = []
    with socket.create_connection(args.to, TIMEOUT_S) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(TIMEOUT_S)
        for _ in range(args.count):
            start = time.monotonic()
            conn.sendall(payload)
            got = 0
            while got < len(payload):
                chunk = conn.recv(len(payload) - got)
                if not chunk:
                    raise ConnectionError("echo server closed the connection")
                got += len(chunk)
            rtts_ms.append((time.monotonic() - start) * 1000)
    result = {"rtts_ms": rtts_ms, "median_ms": statistics.median(rtts_ms), "min_ms": min(rtts_ms)}
    print(json.dumps(result), flush=True)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cotrain.netem.probe", description=__doc__)
    parser.add_argument(
        "--nice", type=int, default=0, help="scheduling priority (negative needs root)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("echo", help="echo server")
    p.add_argument("--port", type=int, default=0)
    p.set_defaults(fn=cmd_echo)
    p = sub.add_parser("sink", help="receive --flows connections, report goodput")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--flows", type=int, default=1)
    p.set_defaults(fn=cmd_sink)
    p = sub.add_parser("send", help="send --bytes on each of --flows connections")
    p.add_argument("--to", type=_address, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--flows", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_send)
    p = sub.add_parser("rtt", help="round trips of --size bytes through an echo server")
    p.add_argument("--to", type=_address, required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(fn=cmd_rtt)
    args = parser.parse_args(argv)
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    try:
        args.fn(args)
    except (OSError, TimeoutError) as exc:
        print(f"probe {args.command}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
