"""Build and check proofs: per chunk of positions, a polynomial through top hidden-state entries.

A proof is a sequence of chunk proofs of ``2 + 2k`` bytes each (258 for k = 128)::

    uint16 m            modulus that keeps the chunk's flat indices distinct (x mod m)
    uint16 c[0..k-1]    coefficients over GF(65521) of the polynomial x mod m -> bf16 bits

A chunk covers up to ``chunk_tokens`` consecutive positions (rows of hidden states) and commits
to the largest-magnitude entries of *each* row, k spread evenly (4 per row at 32 rows), so a
change at any single position replaces a share of the commitment (published TOPLOC takes the
top-k of the whole flattened chunk, which a few large channels dominate).

Checking recomputes the chunk, takes each row's top (quota + slack) entries, evaluates the
polynomial there, and counts the committed entries it finds within a relative tolerance: an
honest row finds all of its entries, a changed row finds few (the polynomial returns unrelated
field elements at indices it was not built on). The median relative error of the matched
entries over the whole rollout separates lower-precision weights from honest rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cotrain.toploc.config import DEFAULT_MEDIAN_REL_ERR, ProofConfig
from cotrain.toploc.errors import ProofBuildError, ProofFormatError
from cotrain.toploc.field import PRIME, evaluate, injective_moduli, interpolate


def chunk_bytes(k: int) -> int:
    """Bytes of one chunk proof committing to ``k`` entries."""
    return 2 + 2 * k


@dataclass
class ChunkResult:
    """How one chunk's recomputed hidden states compare with its proof."""

    matches: int
    """Committed entries found within ``match_rel_tol`` (of k)."""
    worst_row_misses: int
    """The most committed entries any single position failed to match."""
    exp_matches: int
    """Matched entries whose bf16 sign and exponent are equal."""
    mant_err_mean: float
    """Mean |mantissa difference| in bf16 ulps over those (inf if none)."""
    mant_err_median: float
    """Median of the same."""
    passed: bool
    """Within ``max_chunk_misses`` and ``max_row_misses``."""
    rel_errs: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    """Relative errors of the matched entries."""


@dataclass
class ProofVerdict:
    """The result of checking one proof against recomputed hidden states."""

    chunks: list[ChunkResult]
    """One result per chunk, in order."""
    median_rel_err: float
    """Median relative error of all matched entries (inf if none)."""
    passed: bool
    """Every chunk passed and the median error is within ``max_median_rel_err``."""

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


def _bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (any int array) -> float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def row_quotas(rows: int, k: int) -> np.ndarray:
    """Entries committed per row: k spread evenly over ``rows`` rows, the first rows +1."""
    q = np.full(rows, k // rows, dtype=np.int64)
    q[: k % rows] += 1
    return q


def _prepare(chunk: torch.Tensor) -> torch.Tensor:
    if chunk.dim() != 2:
        raise ProofBuildError(f"a chunk must be (rows, H), got {tuple(chunk.shape)}")
    c = chunk.detach().float().cpu()
    if not torch.isfinite(c).all():
        raise ProofBuildError("hidden states contain NaN or inf")
    return c


def _rows_top_many(
    chunks: Sequence[torch.Tensor], quotas: np.ndarray, slack: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``_row_top`` of G chunks of one shape (rows, H) at once: one topk over (G, rows, H)."""
    rows, width = chunks[0].shape
    take = min(int(quotas.max()) + slack, width)
    c = torch.stack(list(chunks))  # (G, rows, H)
    top = c.abs().topk(take, dim=2).indices  # (G, rows, take)
    keep = torch.arange(take)[None, :] < torch.as_tensor(quotas + slack)[:, None]  # (rows, take)
    row_ids = torch.arange(rows)[:, None].expand(rows, take)[keep]  # row-major: row 0 first
    flat = (torch.arange(rows)[None, :, None] * width + top)[:, keep]  # (G, kept)
    vals = torch.gather(c.reshape(len(chunks), -1), 1, flat)  # (G, kept)
    ids = row_ids.numpy()
    return [(f, ids, v) for f, v in zip(flat.numpy(), vals.numpy(), strict=True)]


def _by_shape(chunks: Sequence[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of the chunks of each (rows, H) shape, so equal shapes are processed together."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, chunk in enumerate(chunks):
        groups.setdefault((int(chunk.size(0)), int(chunk.size(1))), []).append(i)
    return groups


def commit_entries(chunks: Sequence[torch.Tensor], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries each (rows, H) chunk commits to: (N, k) flat indices and bf16 bits."""
    idx = np.empty((len(chunks), k), dtype=np.int64)
    bits = np.empty((len(chunks), k), dtype=np.int64)
    prepared = [_prepare(chunk) for chunk in chunks]
    for (rows, width), members in _by_shape(prepared).items():
        quotas = row_quotas(rows, k)
        if rows > k or width < quotas.max():
            raise ProofBuildError(f"a chunk of shape {(rows, width)} cannot hold topk={k}")
        tops = _rows_top_many([prepared[i] for i in members], quotas, 0)
        for i, (flat, _, vals) in zip(members, tops, strict=True):
            idx[i] = flat
            bits[i] = _bf16_bits(torch.from_numpy(vals)).numpy()
    return idx, bits


def encode_chunks(chunks: Sequence[torch.Tensor], k: int = 128) -> bytes:
    """Chunk proofs for each (rows, H) tensor, concatenated."""
    if not chunks:
        return b""
    idx, bits = commit_entries(chunks, k)
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
    verdict = check_many([proof], [chunks], config)[0]
    if isinstance(verdict, ProofFormatError):
        raise verdict
    return verdict


def check_many(
    proofs: Sequence[bytes],
    chunk_lists: Sequence[Sequence[torch.Tensor]],
    config: ProofConfig | None = None,
) -> list[ProofVerdict | ProofFormatError]:
    """``check_chunks`` of many rollouts at once (a validator's batch): one top-k per chunk
    shape and one polynomial evaluation for all their chunks. A malformed proof gives its
    ``ProofFormatError`` in its place; the others are still checked."""
    config = config or ProofConfig()
    k = config.topk
    out: list[ProofVerdict | ProofFormatError] = []
    decoded: list[tuple[int, np.ndarray, np.ndarray]] = []  # (rollout, moduli, coeffs)
    for r, (proof, chunks) in enumerate(zip(proofs, chunk_lists, strict=True)):
        try:
            moduli, coeffs = decode_chunks(proof, len(chunks), k)
        except ProofFormatError as e:
            out.append(e)
            continue
        out.append(ProofVerdict(chunks=[], median_rel_err=float("inf"), passed=False))
        if chunks:
            decoded.append((r, moduli, coeffs))
    if not decoded:
        return out
    flat_chunks = [c for r, _, _ in decoded for c in chunk_lists[r]]
    moduli = np.concatenate([m for _, m, _ in decoded])
    coeffs = np.concatenate([c for _, _, c in decoded])
    # Candidates of every chunk, padded to one width M so all polynomials evaluate at once.
    prepared = [_prepare(chunk) for chunk in flat_chunks]
    by_index: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for (rows, _), members in _by_shape(prepared).items():
        quotas = row_quotas(rows, k)
        tops = _rows_top_many([prepared[i] for i in members], quotas, config.row_slack)
        for i, top in zip(members, tops, strict=True):
            by_index[i] = (quotas, *top)
    cands = [by_index[i] for i in range(len(flat_chunks))]
    m = max(len(flat) for _, flat, _, _ in cands)
    points = np.zeros((len(cands), m), dtype=np.int64)
    for i, (_, flat, _, _) in enumerate(cands):
        points[i, : len(flat)] = flat
    claimed = evaluate(coeffs, points % moduli[:, None])  # (N, M) bf16 bits per the proof
    results = [_chunk_result(claimed[i], cand, k, config) for i, cand in enumerate(cands)]
    start = 0
    for r, mod, _ in decoded:
        mine = results[start : start + len(mod)]
        start += len(mod)
        pooled = np.concatenate([c.rel_errs for c in mine])
        median = float(np.median(pooled)) if pooled.size else float("inf")
        limit = config.max_median_rel_err
        passed = all(c.passed for c in mine) and median <= (
            DEFAULT_MEDIAN_REL_ERR if limit is None else limit
        )
        out[r] = ProofVerdict(chunks=mine, median_rel_err=median, passed=passed)
    return out


def _chunk_result(
    claimed: np.ndarray,
    cand: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    k: int,
    config: ProofConfig,
) -> ChunkResult:
    quotas, flat, row_ids, vals = cand
    got = claimed[: len(flat)]
    want = _bf16_bits(torch.from_numpy(vals)).numpy()
    with np.errstate(invalid="ignore", over="ignore"):  # claimed bits may decode to NaN
        v = _bits_to_float(want).astype(np.float64)
        u = _bits_to_float(got).astype(np.float64)
        rel = np.abs(u - v) / np.maximum(np.abs(v), 1e-30)
        hit = np.isfinite(u) & (np.sign(u) == np.sign(v)) & (rel <= config.match_rel_tol)
    per_row = np.minimum(np.bincount(row_ids[hit], minlength=len(quotas)), quotas)
    misses = quotas - per_row
    exp_hit = hit & ((got >> 7) == (want >> 7))
    mant = np.abs((got & 0x7F) - (want & 0x7F))[exp_hit].astype(np.float64)
    n_miss = int(misses.sum())
    return ChunkResult(
        matches=k - n_miss,
        worst_row_misses=int(misses.max()),
        exp_matches=int(exp_hit.sum()),
        mant_err_mean=float(mant.mean()) if mant.size else float("inf"),
        mant_err_median=float(np.median(mant)) if mant.size else float("inf"),
        passed=n_miss <= config.max_chunk_misses and int(misses.max()) <= config.max_row_misses,
        rel_errs=rel[hit],
    )


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

    Position p's hidden state depends on tokens 0..p; the worker computed positions 0..L+n-2
    (the prompt, then each output token but the last as it was fed back). All of them are
    committed to, ``chunk`` positions at a time. The last output token is fixed only by
    sampling from the hidden state before it, which TOPLOC does not check.
    """
    del prompt_len  # one layout for prompt and output positions alike
    return [hidden[s] for s in split_rows(hidden.size(0), chunk)]


def n_rollout_chunks(prompt_len: int, n_output: int, chunk: int) -> int:
    """How many chunk proofs a rollout with these lengths carries."""
    return -(-(prompt_len + n_output - 1) // chunk)
