"""The C heap of a process that allocates and frees large tensors (the trainer, workers and
validators): glibc keeps freed memory in its heaps, fragmented across threads, and the peak
grows from step to step unless large blocks come from ``mmap`` and free pages go back."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 1 << 20


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its own allocator's behaviour
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def limit_heap_growth() -> None:
    """glibc only, once per process: blocks of 1 MB and more (tensors: activations, gradients)
    always come from ``mmap`` and go back to the system when freed. By default glibc raises
    that threshold to the size of the largest block freed (up to 32 MB), after which freed
    gradients and activations stay in its heaps, fragmented across threads: the trainer's peak
    grew by about 0.7 GB from its first step to its second."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def release_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
