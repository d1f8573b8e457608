"""The all-reduce's buffers: cache-line placement, the input backup and its streaming copy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cotrain.comm import tensors
from cotrain.comm.tensors import LINE, Backup, Scratch, aligned_empty


def test_aligned_empty_starts_on_a_line_or_at_the_offset_of_like() -> None:
    assert aligned_empty(0, np.float32).size == 0
    for count in (1, 17, 100_003):
        a = aligned_empty(count, np.float32)
        assert a.ctypes.data % LINE == 0 and a.size == count and a.dtype == np.float32
    base = np.empty(1000, dtype=np.uint8)
    for skip in (0, 4, 16, 60):
        like = base[skip:].view(np.uint8)
        b = aligned_empty(10, np.float32, like=like)
        assert b.ctypes.data % LINE == like.ctypes.data % LINE


def test_scratch_matches_the_offset_without_reallocating() -> None:
    s = Scratch()
    raw = np.empty(4096 + 64, dtype=np.float32)
    first = s.get(4096, like=raw)
    assert first.ctypes.data % LINE == raw.ctypes.data % LINE
    shifted = raw[3:]  # 12 bytes further into a line
    again = s.get(1000, like=shifted)
    assert again.ctypes.data % LINE == shifted.ctypes.data % LINE
    assert again.base is first.base  # same allocation: a 64 MiB buffer costs page faults
    assert s.get(10).ctypes.data % LINE == 0


@pytest.mark.parametrize("fast", [True, False])
def test_backup_restores_exactly_what_was_saved(
    monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    if fast and tensors.FAST_COPY is None:
        pytest.skip("the C streaming copy was not built here")
    if not fast:
        monkeypatch.setattr(tensors, "FAST_COPY", None)
    rng = np.random.default_rng(0)
    live = rng.standard_normal(50_001).astype(np.float32)[1:]  # 4 bytes into a line
    original = live.copy()
    backup = Backup(live, Scratch().get(live.size, like=live))
    for a, b in [(0, 7), (7, 20_000), (30_000, 49_999)]:  # saved, then changed
        backup.save(a, b)
        live[a:b] = -1.0
    live[20_000:30_000] = 5.0  # changed without a save: not restored
    backup.restore()
    np.testing.assert_array_equal(live[:20_000], original[:20_000])
    np.testing.assert_array_equal(live[30_000:], original[30_000:])
    assert (live[20_000:30_000] == 5.0).all()


def test_streaming_copy_every_length_and_offset() -> None:
    if tensors.FAST_COPY is None:
        pytest.skip("the C streaming copy was not built here")
    copy = tensors.FAST_COPY
    rng = np.random.default_rng(1)
    src_all = rng.integers(0, 256, 5000, dtype=np.uint8)
    for n in (0, 1, 15, 16, 63, 64, 65, 127, 1000, 4000):
        for s_off in (0, 1, 8, 17):
            for d_off in (0, 3, 16, 33):
                dst_all = np.zeros(5000, dtype=np.uint8)
                src = src_all[s_off : s_off + n]
                copy(dst_all[d_off : d_off + n], src)
                np.testing.assert_array_equal(dst_all[d_off : d_off + n], src)
                assert not dst_all[:d_off].any() and not dst_all[d_off + n :].any()


def test_streaming_copy_rejects_bad_buffers() -> None:
    if tensors.FAST_COPY is None:
        pytest.skip("the C streaming copy was not built here")
    copy = tensors.FAST_COPY
    with pytest.raises(ValueError, match="bytes into"):
        copy(np.zeros(4, np.float32), np.zeros(5, np.float32))
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises((TypeError, BufferError)):
        copy(frozen, np.zeros(4, np.float32))
    with pytest.raises((TypeError, BufferError, ValueError)):  # strided: no flat buffer
        copy(np.zeros(8, np.float32)[::2], np.zeros(4, np.float32))


def test_fast_copy_can_be_switched_off() -> None:
    code = "from cotrain.comm import tensors; print(tensors.FAST_COPY is None)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"COTRAIN_FAST_COPY": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "True"
