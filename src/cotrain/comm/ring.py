"""The data plane: pipelined ring all-reduce and ring broadcast over S streams per neighbour.

Layout of one all-reduce of ``count`` values over N peers (rank r)::

    values  |----block 0----|----block 1----| ... |--block N-1--|     N blocks (reduce-scatter)
    block   |-s0-|-s1-|-s2-|-s3-|                                      S stream slices
    slice   |c|c|c|c|                                                  chunks of `chunk` values

Stream j carries slice j of every block on its own pair of sockets (to next, from prev), so S TCP
connections fill a long, fat link in parallel. Per stream, a sender thread and a receiver thread
form a pipeline: reduce-scatter step t sends block (r - t) and receives block (r - t - 1), which
is exactly what step t + 1 sends, so each received chunk is combined into the fp32 work buffer and
handed straight to the sender. On the last reduce-scatter step the received chunk completes block
(r + 1), which this peer owns: it is finalised (divided for avg), encoded *once*, decoded into the
work buffer, and becomes the first all-gather send. All-gather chunks are stored and forwarded as
received bytes, never re-encoded, so every peer decodes the same bytes: bit-identical results.

Every peer computes the same chunk plan from (count, N, S, chunk), so the wire carries no
per-chunk headers: only a 24-byte preamble per stream and collective, checked on arrival.
Any error on any thread aborts all sockets, so the other threads (and, by the closed sockets,
the neighbours) fail fast instead of waiting.
"""

from __future__ import annotations

import itertools
import queue
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cotrain.comm.errors import PeerFailedError, ProtocolError
from cotrain.comm.frames import recv_exact, recv_into_exact
from cotrain.comm.quant import Codec
from cotrain.comm.tensors import Backup, aligned_empty
from cotrain.comm.transport import close_quietly

_PREAMBLE = struct.Struct("!QQQ")  # epoch, seq, count


def bounds(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    n = hi - lo
    cuts = [lo + n * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(cuts))


def chunk_plan(
    count: int, world: int, streams: int, chunk: int
) -> list[list[list[tuple[int, int]]]]:
    """plan[block][stream] = list of (start, stop) chunks, identical on every peer."""
    plan = []
    for lo, hi in bounds(0, count, world):
        per_stream = []
        for a, b in bounds(lo, hi, streams):
            per_stream.append([(x, min(x + chunk, b)) for x in range(a, b, chunk)])
        plan.append(per_stream)
    return plan


@dataclass
class Links:
    """Sockets to the next peer (we send) and from the previous one (we receive), one per stream."""

    to_next: list[socket.socket]
    from_prev: list[socket.socket]

    def close(self) -> None:
        for s in self.to_next + self.from_prev:
            close_quietly(s)


@dataclass
class TransferStats:
    bytes_sent: int = 0
    bytes_received: int = 0


class _Run:
    """Shared state of one collective's threads: first error wins and aborts everything."""

    def __init__(self, links: Links, stall_timeout_s: float) -> None:
        self.links = links
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.stall = stall_timeout_s
        self.stats = TransferStats()
        self.aborted = threading.Event()

    def fail(self, err: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = err
        self.aborted.set()
        self.links.close()

    def count(self, sent: int = 0, received: int = 0) -> None:
        """Add one thread's totals (once, when it ends: no lock per chunk)."""
        with self.lock:
            self.stats.bytes_sent += sent
            self.stats.bytes_received += received

    def take(self, q: queue.SimpleQueue[object]) -> object:
        waited = 0.0
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.aborted.is_set():
                    raise PeerFailedError("collective aborted") from None
                waited += 0.05
                if waited > self.stall:
                    raise PeerFailedError(f"no progress for {self.stall:.0f}s") from None


def _run_threads(run: _Run, targets: list[Callable[[], None]], timeout_s: float) -> None:
    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def inner() -> None:
            try:
                fn()
            except BaseException as e:
                run.fail(e)

        return inner

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        if t.is_alive():
            run.fail(PeerFailedError(f"collective did not finish within {timeout_s:.0f}s"))
            t.join(5.0)
    if run.error is not None:
        err = run.error
        if isinstance(err, PeerFailedError | ProtocolError):
            raise err
        raise PeerFailedError(f"ring transfer failed: {err}") from err


def kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking mode with SO_RCVTIMEO/SO_SNDTIMEO instead of Python's poll-based timeouts: a
    whole chunk then moves in one send/recv syscall (MSG_WAITALL), and a silent peer still
    fails the call after ``seconds`` (EAGAIN). A link closed under us (a fault handled on
    another thread) is a dead peer, not a crash."""
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    try:
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    except OSError as e:
        raise PeerFailedError(f"ring link closed before the transfer: {e}") from e


def _check_preamble(sock: socket.socket, epoch: int, seq: int, count: int) -> None:
    got = _PREAMBLE.unpack(recv_exact(sock, _PREAMBLE.size))
    if got != (epoch, seq, count):
        raise ProtocolError(
            f"neighbour is at (epoch, seq, count)={got}, we are at {(epoch, seq, count)}"
        )


def all_reduce(
    work: np.ndarray,
    *,
    op: str,
    codec: Codec,
    rank: int,
    world: int,
    links: Links,
    epoch: int,
    seq: int,
    chunk: int,
    stall_timeout_s: float,
    on_chunk_sent: Callable[[int], None] | None = None,
    backup: Backup | None = None,
) -> TransferStats:
    """Reduce the fp32 ``work`` buffer in place across the ring (see the module docstring).

    ``backup`` (if given) is told about every chunk before its first change: the reduce-scatter
    changes every block but our own (r), which is saved as it is sent at step 0 (the all-gather
    overwrites it at its step 0, after the whole ring has used it)."""
    n = world
    count = work.size
    if n == 1:
        if codec.name != "fp32" and backup is not None:
            backup.save(0, count)
        _finalize(work, 0, count, op, codec, n)
        return TransferStats()
    streams = len(links.to_next)
    plan = chunk_plan(count, n, streams, chunk)
    combine = {"sum": np.add, "avg": np.add, "min": np.minimum, "max": np.maximum}[op]
    run = _Run(links, stall_timeout_s)
    for s in links.from_prev + links.to_next:
        kernel_timeouts(s, stall_timeout_s)
    targets: list[Callable[[], None]] = []
    for j in range(streams):
        q: queue.SimpleQueue[object] = queue.SimpleQueue()

        def sender(j: int = j, q: queue.SimpleQueue[object] = q) -> None:
            sock = links.to_next[j]
            sent = 0
            try:
                sock.sendall(_PREAMBLE.pack(epoch, seq, count))
                # reduce-scatter step 0: our own input
                for k, (a, b) in enumerate(plan[rank % n][j], start=1):
                    if backup is not None:
                        # block r changes first at all-gather step 0; saving it now, while the
                        # send below is about to read it anyway, reads it from memory once
                        backup.save(a, b)
                    buf = codec.encode(work[a:b])
                    sock.sendall(buf.data.cast("B"))
                    sent += buf.nbytes
                    if on_chunk_sent is not None and j == 0:
                        on_chunk_sent(k)
                while (item := run.take(q)) is not None:
                    assert isinstance(item, np.ndarray)
                    sock.sendall(item.data.cast("B"))
                    sent += item.nbytes
            finally:
                run.count(sent=sent)

        def receiver(j: int = j, q: queue.SimpleQueue[object] = q) -> None:
            sock = links.from_prev[j]
            received = 0
            try:
                _check_preamble(sock, epoch, seq, count)
                rbuf = aligned_empty(codec.wire_nbytes(chunk), np.uint8)
                for t in range(n - 1):  # reduce-scatter
                    for a, b in plan[(rank - t - 1) % n][j]:
                        size = codec.wire_nbytes(b - a)
                        recv_into_exact(sock, rbuf.data[:size])
                        received += size
                        if backup is not None:
                            backup.save(a, b)
                        combine(work[a:b], codec.decode(rbuf[:size], b - a), out=work[a:b])
                        if t < n - 2:
                            q.put(codec.encode(work[a:b]))  # fp32: a view, no copy
                        else:  # this chunk of our own block is complete
                            q.put(_finalize(work, a, b, op, codec, n))
                raw = codec.name == "fp32"
                for t in range(n - 1):  # all-gather: store and forward the owners' bytes
                    for a, b in plan[(rank - t) % n][j]:
                        size = codec.wire_nbytes(b - a)
                        if raw:  # the wire bytes are the values: receive straight into place
                            wire = work[a:b]
                            recv_into_exact(sock, wire.data.cast("B"))
                        else:
                            wire = np.empty(size, dtype=np.uint8)
                            recv_into_exact(sock, wire.data)
                            work[a:b] = codec.decode(wire, b - a)
                        received += size
                        if t < n - 2:
                            q.put(wire)
                q.put(None)
            finally:
                run.count(received=received)

        targets += [sender, receiver]
    _run_threads(run, targets, timeout_s=stall_timeout_s * (2 * n + 4))
    return run.stats


def _finalize(work: np.ndarray, a: int, b: int, op: str, codec: Codec, n: int) -> np.ndarray:
    """Owner's last step for work[a:b]: average, encode once, keep the decoded value."""
    if op == "avg" and n > 1:
        work[a:b] /= np.float32(n)
    if codec.name == "fp32":  # the values are their own encoding: send them as they are
        return work[a:b]
    wire = codec.encode(work[a:b]).copy()
    work[a:b] = codec.decode(wire, b - a)
    return wire


def broadcast(
    data: np.ndarray,
    *,
    is_root: bool,
    next_is_root: bool,
    links: Links,
    epoch: int,
    seq: int,
    chunk_bytes: int,
    stall_timeout_s: float,
) -> TransferStats:
    """Pipelined ring broadcast of the uint8 buffer ``data`` (filled in place on non-roots)."""
    streams = len(links.to_next)
    count = data.size
    slices = bounds(0, count, streams)
    run = _Run(links, stall_timeout_s)
    for s in links.from_prev + links.to_next:
        kernel_timeouts(s, stall_timeout_s)
    targets: list[Callable[[], None]] = []
    for j, (lo, hi) in enumerate(slices):
        chunks = [(x, min(x + chunk_bytes, hi)) for x in range(lo, hi, chunk_bytes)]

        def worker(j: int = j, chunks: list[tuple[int, int]] = chunks) -> None:
            out = links.to_next[j]
            inp = links.from_prev[j]
            sent = received = 0
            try:
                if is_root:
                    out.sendall(_PREAMBLE.pack(epoch, seq, count))
                    for a, b in chunks:
                        out.sendall(data[a:b].data)
                        sent += b - a
                    # wait for the ring to close so the root knows everyone has the data
                    _check_preamble(inp, epoch, seq, count)
                    return
                _check_preamble(inp, epoch, seq, count)
                if not next_is_root:
                    out.sendall(_PREAMBLE.pack(epoch, seq, count))
                for a, b in chunks:
                    recv_into_exact(inp, data[a:b].data)
                    received += b - a
                    if not next_is_root:
                        out.sendall(data[a:b].data)
                        sent += b - a
                if next_is_root:
                    out.sendall(_PREAMBLE.pack(epoch, seq, count))
            finally:
                run.count(sent=sent, received=received)

        targets.append(worker)
    _run_threads(run, targets, timeout_s=stall_timeout_s * 4)
    return run.stats
