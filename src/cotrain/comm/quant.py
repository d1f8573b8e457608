"""Wire codecs: how a chunk of fp32 values travels between peers.

Quantization happens on the wire only: peers accumulate in fp32, encode a partial sum just to send
it, and decode on arrival. The owner of each block encodes its final value exactly once and every
peer (the owner included) decodes those same bytes, so all peers end bit-identical.

Every codec's encoded size depends only on the element count, so receivers read exact byte counts
with no per-chunk header.

==============  ==========================================================  ===============
codec           encoding                                                    bytes / value
==============  ==========================================================  ===============
fp32            raw                                                         4
fp16 / bf16     IEEE half / bfloat16 (round to nearest even)                2
int8            INTELLECT-1: mean ± 6σ into 256 buckets, each decoded as
                the mean of the values that fell in it (256-entry table)    1 (+1 KiB/chunk)
int8_minmax     per block of 64: min and scale (fp32), uint8 codes          1.125
int4            per block of 64: min and scale (fp32), 4-bit codes packed   0.625
==============  ==========================================================  ===============
"""

from __future__ import annotations

import numpy as np

BLOCK = 64  # values per min-max block


def _fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # round to nearest even on the 16 bits we drop
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_fp32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    return _fp32_to_bf16_bits(x)


class Codec:
    """Encode/decode chunks of fp32 values; subclasses define the format."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Codec({self.name})"

    def wire_nbytes(self, n: int) -> int:
        raise AssertionError("abstract")

    def encode(self, x: np.ndarray) -> np.ndarray:
        """fp32 values -> uint8 (or raw) array of exactly ``wire_nbytes(len(x))`` bytes."""
        raise AssertionError("abstract")

    def decode(self, buf: np.ndarray, n: int) -> np.ndarray:
        """uint8 wire bytes -> ``n`` fp32 values (a new array)."""
        raise AssertionError("abstract")


class _Raw(Codec):
    def __init__(self, name: str, dtype: np.dtype) -> None:
        super().__init__(name)
        self.dtype = np.dtype(dtype)

    def wire_nbytes(self, n: int) -> int:
        return n * self.dtype.itemsize

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=self.dtype).view(np.uint8)

    def decode(self, buf: np.ndarray, n: int) -> np.ndarray:
        return buf.view(self.dtype).astype(np.float32, copy=False)


class _BF16(Codec):
    def wire_nbytes(self, n: int) -> int:
        return 2 * n

    def encode(self, x: np.ndarray) -> np.ndarray:
        return _fp32_to_bf16_bits(x).view(np.uint8)

    def decode(self, buf: np.ndarray, n: int) -> np.ndarray:
        return bf16_bits_to_fp32(buf.view(np.uint16))


class _SigmaInt8(Codec):
    """Each bucket's value is the mean of the values that fell in it, estimated on a strided
    sample of at most ``SAMPLE`` values per chunk (a weighted bincount over every value would
    cost more than the rest of the codec together)."""

    TABLE = 256
    SAMPLE = 32768

    def wire_nbytes(self, n: int) -> int:
        return 4 * self.TABLE + n

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.size
        out = np.empty(4 * self.TABLE + n, dtype=np.uint8)
        table = out[: 4 * self.TABLE].view(np.float32)
        if n == 0:
            table[:] = 0.0
            return out
        mean = float(x.sum(dtype=np.float64)) / n
        var = max(float(np.dot(x, x)) / n - mean * mean, 0.0)
        sigma = var**0.5
        lo, hi = mean - 6.0 * sigma, mean + 6.0 * sigma
        if not hi > lo:  # a constant chunk
            lo, hi = mean - 1.0, mean + 1.0
        scale = self.TABLE / (hi - lo)
        scaled = x - np.float32(lo)
        scaled *= np.float32(scale)
        np.clip(scaled, 0.0, self.TABLE - 0.5, out=scaled)
        codes = out[4 * self.TABLE :]
        codes[:] = scaled  # float -> uint8 truncates: floor of a non-negative value
        stride = max(1, n // self.SAMPLE)
        sample_codes, sample = codes[::stride], x[::stride]
        counts = np.bincount(sample_codes, minlength=self.TABLE)
        sums = np.bincount(sample_codes, weights=sample, minlength=self.TABLE)
        centres = lo + (np.arange(self.TABLE) + 0.5) / scale
        table[:] = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        return out

    def decode(self, buf: np.ndarray, n: int) -> np.ndarray:
        table = buf[: 4 * self.TABLE].view(np.float32)
        return np.take(table, buf[4 * self.TABLE : 4 * self.TABLE + n])


class _MinMax(Codec):
    """Per-block affine codes; ``bits`` is 8 or 4 (two codes per byte)."""

    def __init__(self, name: str, bits: int) -> None:
        super().__init__(name)
        self.bits = bits

    def _blocks(self, n: int) -> int:
        return -(-n // BLOCK)

    def _code_bytes(self, n: int) -> int:
        return n if self.bits == 8 else -(-n // 2)

    def wire_nbytes(self, n: int) -> int:
        return 8 * self._blocks(n) + self._code_bytes(n)

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        n = x.size
        nb = self._blocks(n)
        levels = (1 << self.bits) - 1
        padded = np.empty(nb * BLOCK, dtype=np.float32)
        padded[:n] = x
        if n:
            padded[n:] = x[-1]
        blocks = padded.reshape(nb, BLOCK)
        mn = blocks.min(axis=1)
        scale = (blocks.max(axis=1) - mn) / np.float32(levels)
        inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)
        codes = np.rint((blocks - mn[:, None]) * inv[:, None]).clip(0, levels).astype(np.uint8)
        codes = codes.reshape(-1)[:n]
        out = np.empty(self.wire_nbytes(n), dtype=np.uint8)
        head = out[: 8 * nb].view(np.float32).reshape(nb, 2)
        head[:, 0] = mn
        head[:, 1] = scale
        body = out[8 * nb :]
        if self.bits == 8:
            body[:] = codes
        else:
            if n % 2:
                codes = np.append(codes, np.uint8(0))
            body[:] = codes[0::2] | (codes[1::2] << 4)
        return out

    def decode(self, buf: np.ndarray, n: int) -> np.ndarray:
        nb = self._blocks(n)
        head = buf[: 8 * nb].view(np.float32).reshape(nb, 2)
        body = buf[8 * nb : 8 * nb + self._code_bytes(n)]
        codes = np.empty(nb * BLOCK, dtype=np.uint8)
        if self.bits == 8:
            codes[:n] = body
        else:
            codes[0 : 2 * body.size : 2] = body & 0x0F
            codes[1 : 2 * body.size : 2] = body >> 4
        codes[n:] = 0
        values = codes.reshape(nb, BLOCK).astype(np.float32)
        values *= head[:, 1:2]
        values += head[:, 0:1]
        return values.reshape(-1)[:n]


CODECS: dict[str, Codec] = {
    "fp32": _Raw("fp32", np.dtype(np.float32)),
    "fp16": _Raw("fp16", np.dtype(np.float16)),
    "bf16": _BF16("bf16"),
    "int8": _SigmaInt8("int8"),
    "int8_minmax": _MinMax("int8_minmax", 8),
    "int4": _MinMax("int4", 4),
}


def codec_for(quantization: str, tensor_dtype: str) -> Codec:
    """The wire codec: ``none`` sends the tensor's own precision (fp32, fp16 or bf16)."""
    if quantization == "none":
        return CODECS[tensor_dtype]
    try:
        return CODECS[quantization]
    except KeyError:
        raise ValueError(
            f"unknown quantization {quantization!r}; choose none, {', '.join(CODECS)}"
        ) from None
