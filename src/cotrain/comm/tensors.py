"""Views of torch tensors and numpy arrays as flat numpy buffers, without copies where possible."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotrain.comm.quant import bf16_bits_to_fp32, fp32_to_bf16_bits


def _copier() -> Callable[[np.ndarray, np.ndarray], None] | None:
    """The C streaming copy (``_stream.c``), if it was built and not switched off with
    COTRAIN_FAST_COPY=0."""
    if os.environ.get("COTRAIN_FAST_COPY", "1") == "0":
        return None
    try:
        module = importlib.import_module("cotrain.comm._stream")
    except ImportError:
        return None
    copy: Callable[[np.ndarray, np.ndarray], None] = module.copy
    return copy


FAST_COPY = _copier()
"""Copies the input backup with cache-bypassing stores; None: numpy's copy."""

SUPPORTED = ("fp32", "fp16", "bf16")


LINE = 64  # bytes in a cache line


def _line_offset(like: np.ndarray | None) -> int:
    return like.ctypes.data % LINE if like is not None else 0


def aligned_empty(count: int, dtype: Any, *, like: np.ndarray | None = None) -> np.ndarray:
    """``np.empty`` that starts on a cache-line boundary, or at the same offset into a line as
    ``like``. numpy's own arrays start 16 bytes into a line: vector loads of them straddle lines,
    kernel copies into them run slower, and so do copies between arrays at different offsets
    (on this project's machine, ~10% of an all-reduce's CPU)."""
    dt = np.dtype(dtype)
    raw = np.empty(count * dt.itemsize + LINE, dtype=np.uint8)
    skip = (_line_offset(like) - raw.ctypes.data) % LINE
    return raw[skip : skip + count * dt.itemsize].view(dt)


class Scratch:
    """One reusable fp32 buffer that grows to the largest collective seen."""

    def __init__(self) -> None:
        self._raw = np.empty(0, dtype=np.uint8)

    def get(self, count: int, *, like: np.ndarray | None = None) -> np.ndarray:
        """``count`` fp32 values starting at the same offset into a cache line as ``like``
        (default: at a line's start)."""
        if self._raw.size < count * 4 + LINE:
            self._raw = np.empty(count * 4 + LINE, dtype=np.uint8)
        skip = (_line_offset(like) - self._raw.ctypes.data) % LINE
        return self._raw[skip : skip + count * 4].view(np.float32)


class Backup:
    """Original values of the chunks a collective changed, for rolling back on failure."""

    def __init__(self, live: np.ndarray, store: np.ndarray) -> None:
        self._live = live
        self._store = store
        self._saved: list[tuple[int, int]] = []  # list.append is atomic: threads share it

    def save(self, a: int, b: int) -> None:
        """Call before the first change to live[a:b]."""
        if FAST_COPY is not None:
            FAST_COPY(self._store[a:b], self._live[a:b])
        else:
            self._store[a:b] = self._live[a:b]
        self._saved.append((a, b))

    def restore(self) -> None:
        for a, b in self._saved:
            self._live[a:b] = self._store[a:b]


@dataclass
class FlatView:
    """``array`` is a flat, writable numpy view of the tensor's storage (bf16 as uint16 bits)."""

    array: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    source: Any
    staging: Any = None  # CPU copy of a GPU tensor, written back by ``commit``

    @property
    def count(self) -> int:
        return int(self.array.size)

    def work_buffer(
        self, scratch: Scratch, *, rollback: bool = True
    ) -> tuple[np.ndarray, Backup | None]:
        """(fp32 buffer to reduce in, backup for rolling back, or None).

        fp32 tensors are reduced in place: the ring saves each chunk into the backup just
        before it first changes it (``Backup.save``), so the copy is spread over the transfer
        threads instead of delaying the start. Other dtypes get a separate fp32 buffer and the
        tensor itself stays untouched until ``assign_fp32``. Buffers come from ``scratch``,
        reused across collectives: a fresh 64 MiB array costs ~16k page faults every time."""
        if self.dtype == "fp32":
            if not rollback:
                return self.array, None
            return self.array, Backup(self.array, scratch.get(self.count, like=self.array))
        buf = scratch.get(self.count)
        if self.dtype == "bf16":
            buf[...] = bf16_bits_to_fp32(self.array)
        else:
            np.copyto(buf, self.array, casting="unsafe")
        return buf, None

    def finish(self, work: np.ndarray, backup: Backup | None, *, ok: bool) -> None:
        """Install the result (``ok``) or roll back to the input."""
        if backup is None:
            if ok and work is not self.array:
                self.assign_fp32(work)
            elif ok:
                self.commit()
            return
        if ok:
            self.commit()
        else:
            backup.restore()

    def to_fp32(self) -> np.ndarray:
        """A new fp32 copy of the values (the collective's work buffer)."""
        if self.dtype == "bf16":
            return bf16_bits_to_fp32(self.array)
        return self.array.astype(np.float32, copy=True)

    def assign_fp32(self, values: np.ndarray) -> None:
        """Write fp32 ``values`` into the tensor, rounding to its dtype."""
        if self.dtype == "bf16":
            self.array[...] = fp32_to_bf16_bits(values)
        else:
            np.copyto(self.array, values, casting="same_kind")
        self.commit()

    def commit(self) -> None:
        if self.staging is not None:
            self.source.copy_(self.staging)


_STATE_NP = {
    np.dtype(np.int64): "int64",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.float64): "fp64",
}


def state_view(tensor: Any) -> FlatView:
    """Like ``flat_view`` but also accepts integer and fp64 arrays (shared state is only hashed
    and copied, never reduced)."""
    if isinstance(tensor, np.ndarray) and tensor.dtype in _STATE_NP:
        if not tensor.flags.c_contiguous or not tensor.flags.writeable:
            raise ValueError("numpy arrays must be C-contiguous and writable")
        return FlatView(tensor.reshape(-1), _STATE_NP[tensor.dtype], tuple(tensor.shape), tensor)
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tensor, torch.Tensor) and not tensor.is_floating_point():
        if not tensor.is_contiguous():
            raise ValueError("tensors must be contiguous (call .contiguous() first)")
        staging = tensor.detach().to("cpu") if tensor.device.type != "cpu" else None
        arr = (staging if staging is not None else tensor.detach()).numpy()
        return FlatView(arr.reshape(-1), str(arr.dtype), tuple(tensor.shape), tensor, staging)
    return flat_view(tensor)


def flat_view(tensor: Any) -> FlatView:
    """Accept torch tensors (fp32, fp16, bf16; any device) and numpy arrays (fp32, fp16)."""
    if isinstance(tensor, np.ndarray):
        names = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}
        if tensor.dtype not in names:
            raise TypeError(f"numpy arrays must be float32 or float16, not {tensor.dtype}")
        if not tensor.flags.c_contiguous or not tensor.flags.writeable:
            raise ValueError(
                "numpy arrays must be C-contiguous and writable (use np.ascontiguousarray)"
            )
        return FlatView(tensor.reshape(-1), names[tensor.dtype], tuple(tensor.shape), tensor)
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray, not {type(tensor).__name__}")
    names_t = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    if tensor.dtype not in names_t:
        raise TypeError(f"tensors must be float32, float16 or bfloat16, not {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError("tensors must be contiguous (call .contiguous() first)")
    staging = None
    cpu = tensor.detach()
    if cpu.device.type != "cpu":
        staging = cpu.to("cpu")
        cpu = staging
    dtype = names_t[tensor.dtype]
    arr = cpu.view(torch.int16).numpy().view(np.uint16) if dtype == "bf16" else cpu.numpy()
    return FlatView(arr.reshape(-1), dtype, tuple(tensor.shape), tensor, staging)
