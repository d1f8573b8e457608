"""Build and check proofs: per chunk, a polynomial through the top-k hidden-state entries.

A proof is a sequence of chunk proofs of ``2 + 2k`` bytes each (258 for k = 128)::

    uint16 m            modulus that keeps the chunk's top-k flat indices distinct (x mod m)
    uint16 c[0..k-1]    coefficients over GF(65521) of the polynomial x mod m -> bf16 bits

Checking recomputes the top-k of the same chunk, evaluates the polynomial at the recomputed
indices and compares the claimed bf16 values with the recomputed ones: how many sign+exponent
fields match, and the mantissa error (in bf16 ulps) over those that do. A different model or
input moves the top-k indices, so the polynomial returns unrelated field elements there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cotrain.toploc.config import ProofConfig
from cotrain.toploc.errors import ProofBuildError, ProofFormatError
from cotrain.toploc.field import PRIME, evaluate, injective_moduli, interpolate


def chunk_bytes(k: int) -> int:
    """Bytes of one chunk proof committing to ``k`` entries."""
    return 2 + 2 * k


@dataclass
class ChunkResult:
    """How one chunk's recomputed hidden states compare with its proof."""

    exp_matches: int
    """Top-k entries whose sign and exponent match the proof (of k)."""
    mant_err_mean: float
    """Mean |mantissa difference| in bf16 ulps over the matching entries (inf if none match)."""
    mant_err_median: float
    """Median of the same."""
    passed: bool
    """All three within the thresholds of the ``ProofConfig`` used."""


@dataclass
class ProofVerdict:
    """The result of checking one proof against recomputed hidden states."""

    chunks: list[ChunkResult]
    """One result per chunk, in order."""

    @property
    def passed(self) -> bool:
        """Every chunk passed (and there was at least one)."""
        return bool(self.chunks) and all(c.passed for c in self.chunks)

    @property
    def failed_chunks(self) -> list[int]:
        """Indices of the chunks that failed."""
        return [i for i, c in enumerate(self.chunks) if not c.passed]


def split_rows(n_rows: int, chunk: int) -> list[slice]:
    """Row ranges of consecutive chunks of ``chunk`` rows (the last may be shorter)."""
    return [slice(i, min(i + chunk, n_rows)) for i in range(0, n_rows, chunk)]


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """Float tensor -> int64 tensor of its bf16 bit patterns (round to nearest even)."""
    return x.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def topk_entries(chunks: Sequence[torch.Tensor], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each (rows, H) chunk -> its k largest-magnitude entries: flat indices and bf16 bits.

    Chunks are flattened and padded to a common length so one ``topk`` call serves them all.
    Returns two (N, k) int64 arrays.
    """
    sizes = [c.numel() for c in chunks]
    if min(sizes) < k:
        raise ProofBuildError(f"a chunk has {min(sizes)} entries, fewer than topk={k}")
    flat = torch.full((len(chunks), max(sizes)), -1.0)  # (N, S); magnitude -1 is never chosen
    vals = torch.zeros((len(chunks), max(sizes)))
    for i, c in enumerate(chunks):
        v = c.detach().reshape(-1).float().cpu()
        if not torch.isfinite(v).all():
            raise ProofBuildError("hidden states contain NaN or inf")
        flat[i, : v.numel()] = v.abs()
        vals[i, : v.numel()] = v
    idx = flat.topk(k, dim=1).indices  # (N, k)
    bits = _bf16_bits(vals.gather(1, idx))  # (N, k)
    return idx.numpy(), bits.numpy()


def encode_chunks(chunks: Sequence[torch.Tensor], k: int = 128) -> bytes:
    """Chunk proofs for each (rows, H) tensor, concatenated."""
    if not chunks:
        return b""
    idx, bits = topk_entries(chunks, k)
    moduli = injective_moduli(idx)  # (N,)
    coeffs = interpolate(idx % moduli[:, None], bits)  # (N, k)
    out = np.empty((len(chunks), 1 + k), dtype="<u2")
    out[:, 0] = moduli
    out[:, 1:] = coeffs
    return out.tobytes()


def decode_chunks(proof: bytes, n_chunks: int, k: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Proof bytes -> moduli (N,) and coefficients (N, k); ProofFormatError if malformed."""
    if not isinstance(proof, bytes | bytearray | memoryview):
        raise ProofFormatError(f"a proof is bytes, not {type(proof).__name__}")
    size = chunk_bytes(k)
    if len(proof) != n_chunks * size:
        raise ProofFormatError(
            f"proof has {len(proof)} bytes; {n_chunks} chunks of topk={k} need {n_chunks * size}"
            + (" (truncated?)" if len(proof) < n_chunks * size else "")
        )
    arr = np.frombuffer(bytes(proof), dtype="<u2").astype(np.int64).reshape(n_chunks, 1 + k)
    moduli, coeffs = arr[:, 0], arr[:, 1:]
    if ((moduli < k) | (moduli > PRIME)).any():
        bad = int(np.flatnonzero((moduli < k) | (moduli > PRIME))[0])
        raise ProofFormatError(f"chunk {bad}: modulus {int(moduli[bad])} outside [{k}, {PRIME}]")
    if (coeffs >= PRIME).any():
        bad = int(np.flatnonzero((coeffs >= PRIME).any(axis=1))[0])
        raise ProofFormatError(f"chunk {bad}: a coefficient is not an element of GF({PRIME})")
    return moduli, coeffs


def check_chunks(
    proof: bytes, chunks: Sequence[torch.Tensor], config: ProofConfig | None = None
) -> ProofVerdict:
    """Compare each recomputed (rows, H) chunk with its chunk proof."""
    config = config or ProofConfig()
    k = config.topk
    moduli, coeffs = decode_chunks(proof, len(chunks), k)
    if not chunks:
        return ProofVerdict(chunks=[])
    idx, bits = topk_entries(chunks, k)  # recomputed, (N, k)
    claimed = evaluate(coeffs, idx % moduli[:, None])  # (N, k) bf16 bits per the proof
    match = (claimed >> 7) == (bits >> 7)  # sign and exponent (bits 7..15)
    err = np.abs((claimed & 0x7F) - (bits & 0x7F)).astype(np.float64)
    results = []
    for i in range(len(chunks)):
        e = err[i, match[i]]
        mean = float(e.mean()) if e.size else float("inf")
        median = float(np.median(e)) if e.size else float("inf")
        n = int(match[i].sum())
        ok = (
            n >= config.min_exp_matches
            and mean <= config.max_mant_err_mean
            and median <= config.max_mant_err_median
        )
        results.append(ChunkResult(n, mean, median, ok))
    return ProofVerdict(chunks=results)


def build_proofs(hidden_states: torch.Tensor, chunk: int = 32, k: int = 128) -> bytes:
    """(T, H) last hidden states -> proof of ``ceil(T / chunk)`` chunks of ``2 + 2k`` bytes."""
    if hidden_states.dim() != 2:
        raise ProofBuildError(f"hidden states must be (T, H), got {tuple(hidden_states.shape)}")
    return encode_chunks([hidden_states[s] for s in split_rows(hidden_states.size(0), chunk)], k)


def verify_proofs(
    proof: bytes,
    recomputed_hidden_states: torch.Tensor,
    chunk: int = 32,
    k: int = 128,
    config: ProofConfig | None = None,
) -> ProofVerdict:
    """Check a ``build_proofs`` proof against (T, H) recomputed hidden states, chunk by chunk.

    ``config`` supplies the thresholds (its ``topk`` must equal ``k``).
    """
    config = config or ProofConfig(topk=k, chunk_tokens=chunk)
    if config.topk != k:
        raise ValueError(f"config.topk={config.topk} differs from k={k}")
    h = recomputed_hidden_states
    if h.dim() != 2:
        raise ValueError(f"hidden states must be (T, H), got {tuple(h.shape)}")
    return check_chunks(proof, [h[s] for s in split_rows(h.size(0), chunk)], config)


def rollout_chunks(hidden: torch.Tensor, prompt_len: int, chunk: int) -> list[torch.Tensor]:
    """Split a rollout's (L + n - 1, H) hidden states into the chunks its proof covers.

    Position p's hidden state depends on tokens 0..p. Positions 0..L-2 (the prompt but its last
    token) form one prefill chunk; positions L-1..L+n-2, each of which produced one output
    token, form chunks of ``chunk``. The last output token is fixed only by sampling from the
    hidden state before it, which TOPLOC does not check.
    """
    chunks = [hidden[: prompt_len - 1]] if prompt_len > 1 else []
    decode = hidden[prompt_len - 1 :]
    return chunks + [decode[s] for s in split_rows(decode.size(0), chunk)]


def n_rollout_chunks(prompt_len: int, n_output: int, chunk: int) -> int:
    """How many chunk proofs a rollout with these lengths carries."""
    return (1 if prompt_len > 1 else 0) + -(-n_output // chunk)
