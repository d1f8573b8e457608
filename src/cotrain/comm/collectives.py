"""All-reduce and broadcast: agree with the master, then move bytes around the ring.

Every collective follows the same three phases: agree (each peer sends its descriptor to the
master; the master answers ``go`` once all members sent the same one, or a typed error to all),
move bytes peer to peer around the ring (``ring.py``), then commit (each peer reports ``done``;
the master answers ``commit`` to all once every member did, or ``peer_failed`` to all if one
failed first). The caller's tensor keeps the result only on commit; any failure, including a
member dying after this peer's transfer ended, leaves it exactly as it was on every survivor.
Collectives are serialised per peer (``Membership.op_lock``); ``all_reduce_async`` runs them on
a worker thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotrain.comm import messages as m
from cotrain.comm import ring
from cotrain.comm.config import CommConfig, Quantization, ReduceOp
from cotrain.comm.errors import CollectiveError, PeerFailedError
from cotrain.comm.faults import FaultInjector
from cotrain.comm.membership import Membership
from cotrain.comm.quant import Codec, codec_for
from cotrain.comm.ring import TransferStats
from cotrain.comm.tensors import Scratch, flat_view
from cotrain.core.clock import Deadline
from cotrain.core.errors import TimeoutExpired

OPS = ("sum", "avg", "min", "max")
QUANTS = ("none", "fp16", "bf16", "int8", "int8_minmax", "int4")


@dataclass(frozen=True)
class CollectiveResult:
    seconds: float
    bytes_sent: int
    bytes_received: int
    world_size: int
    epoch: int


class Handle:
    """An all-reduce in flight; ``wait()`` returns its result or raises its error."""

    def __init__(self, future: Future[CollectiveResult]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout_s: float | None = None) -> CollectiveResult:
        try:
            return self._future.result(timeout=timeout_s)
        except TimeoutError:
            raise TimeoutExpired(f"all-reduce still running after {timeout_s}s") from None


class Collectives:
    """The collectives of one peer, over its ``Membership``."""

    def __init__(self, ms: Membership, config: CommConfig, faults: FaultInjector) -> None:
        self._ms = ms
        self.config = config
        self._faults = faults
        self._allreduces = 0
        self._scratch = Scratch()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cotrain-async")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def all_reduce(
        self,
        tensor: Any,
        *,
        op: ReduceOp = "avg",
        quantization: Quantization = "none",
        timeout_s: float | None = None,
        rollback: bool = True,
    ) -> CollectiveResult:
        """Reduce ``tensor`` in place across the ring. On error it is left as it was.

        ``rollback=False`` skips saving the input of an fp32 tensor reduced in place (about 18%
        of an all-reduce on loopback): on error its contents are then undefined. For callers
        that can recompute the input, such as DiLoCo's pseudo-gradients."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose one of {', '.join(OPS)}")
        if quantization not in QUANTS:
            raise ValueError(
                f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTS)}"
            )
        ms = self._ms
        view = flat_view(tensor)
        codec = codec_for(quantization, view.dtype)
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with ms.op_lock:
            index = self._allreduces
            self._allreduces += 1
            self._faults.check(index, 0)
            t0 = time.perf_counter()
            desc = m.Descriptor(
                kind="all_reduce", count=view.count, dtype=view.dtype, op=op, quant=quantization
            )
            seq = ms.begin(desc, deadline)
            work, backup = view.work_buffer(self._scratch, rollback=rollback)
            links = ms.links
            assert links is not None

            def on_chunk(k: int) -> None:
                self._faults.check(index, k)
                if self._faults.cut.is_set():  # emulate a dead link: go silent, then give up
                    threading.Event().wait(self.config.stall_timeout_s)
                    raise PeerFailedError("link cut (fault injection)")

            try:
                stats = ring.all_reduce(
                    work,
                    op=op,
                    codec=codec,
                    rank=ms.rank,
                    world=len(ms.ring),
                    links=links,
                    epoch=ms.epoch,
                    seq=seq,
                    chunk=self._chunk_values(codec),
                    stall_timeout_s=self.config.stall_timeout_s,
                    on_chunk_sent=on_chunk,
                    backup=backup,
                )
            except CollectiveError as e:
                view.finish(work, backup, ok=False)
                reason = ms.broken or str(e)
                ms.fail(seq, reason)
                raise PeerFailedError(f"all-reduce failed: {reason}") from None
            except BaseException:
                view.finish(work, backup, ok=False)
                raise
            try:
                ms.commit(seq, deadline, "all-reduce")
            except BaseException:
                view.finish(work, backup, ok=False)
                raise
            view.finish(work, backup, ok=True)
            return self._account(stats, t0)

    def _chunk_values(self, codec: Codec) -> int:
        """Values per pipelined chunk: ``chunk_kb`` of *wire* bytes, so a quantized collective
        moves as few, as large, chunks as an fp32 one (and encodes fewer, larger blocks)."""
        per_value = codec.wire_nbytes(1 << 16) / (1 << 16)
        return max(1, int(self.config.chunk_kb * 1024 / per_value))

    def all_reduce_async(self, tensor: Any, **kwargs: Any) -> Handle:
        """Start an all-reduce on a worker thread; do not touch ``tensor`` until ``wait()``."""
        return Handle(self._executor.submit(self.all_reduce, tensor, **kwargs))

    def broadcast(
        self, tensor: Any, *, root: int = 0, timeout_s: float | None = None
    ) -> CollectiveResult:
        """Copy rank ``root``'s tensor into every peer's (bytes as they are, no quantization)."""
        ms = self._ms
        view = flat_view(tensor)
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with ms.op_lock:
            t0 = time.perf_counter()
            n = len(ms.ring)
            if not 0 <= root < max(n, 1):
                raise ValueError(f"root {root} is not a rank of this {n}-peer ring")
            desc = m.Descriptor(kind="broadcast", count=view.count, dtype=view.dtype, root=root)
            seq = ms.begin(desc, deadline)
            is_root = ms.rank == root
            src = view.array.view(np.uint8)
            data = src if is_root else np.empty_like(src)
            links = ms.links
            assert links is not None
            if n == 1:
                ms.commit(seq, deadline, "broadcast")
                return self._account(TransferStats(), t0)
            try:
                stats = ring.broadcast(
                    data,
                    is_root=is_root,
                    next_is_root=(ms.rank + 1) % n == root,
                    links=links,
                    epoch=ms.epoch,
                    seq=seq,
                    chunk_bytes=self.config.chunk_kb * 1024,
                    stall_timeout_s=self.config.stall_timeout_s,
                )
            except CollectiveError as e:
                reason = ms.broken or str(e)
                ms.fail(seq, reason)
                raise PeerFailedError(f"broadcast failed: {reason}") from None
            ms.commit(seq, deadline, "broadcast")
            if not is_root:
                src[...] = data
                view.commit()
            return self._account(stats, t0)

    def _account(self, stats: TransferStats, t0: float) -> CollectiveResult:
        ms = self._ms
        ms.bytes_sent += stats.bytes_sent
        ms.bytes_received += stats.bytes_received
        return CollectiveResult(
            time.perf_counter() - t0,
            stats.bytes_sent,
            stats.bytes_received,
            len(ms.ring),
            ms.epoch,
        )
