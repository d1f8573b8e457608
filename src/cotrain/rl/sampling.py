"""Verifiable sampling: completions a validator can replay from its own prefill.

TOPLOC shows that hidden states came from the model; it does not show that the tokens were
*sampled* from it (a worker may pick tokens any way it likes and still prove one honest
prefill). So the randomness of every rollout is fixed by a seed the worker does not choose
(``derive_seed``: the task's seed, the worker's key and a counter), and tokens are drawn with
the Gumbel-max trick::

    token_t = argmax_v( logits_t[v] / T + g_t[v] ),   g_t[v] ~ Gumbel(0) i.i.d.

where ``g_t`` is fixed by ``(seed, t)`` alone. This is an exact sample of
``softmax(logits_t / T)``. A validator recomputes ``logits_t`` with one prefill of the whole
sequence, draws the same ``g_t`` and checks that each claimed token is the argmax. The logits of
a prefill and of incremental decoding differ in the last bits (other kernels, thread counts,
batch shapes), so a token counts as replayed when its score is within ``tolerance`` of the best
score (a near-tie); a greedy, biased or best-of-N choice, another model's token or a swapped
token differ by far more, almost surely at many positions.

**The noise is drawn lazily, block by block.** Drawing V Gumbels per position costs as much as
the vocabulary projection itself (49,152 double-precision logarithms for SmolLM2), on the worker
and on the validator alike. The vocabulary is cut into blocks of ``BLOCK`` tokens, and the noise
of a block is drawn top-down: first its largest value (the maximum of n Gumbel(0) is
Gumbel(log n)), then, only for a block that could hold the winner, which token has it
(uniform) and the others (Gumbel(0) conditioned to stay below it). The joint law is the same
i.i.d. Gumbel(0) noise. A block whose best logit plus its largest noise cannot reach the best
score found is never opened: per position the draw costs one pass for the blocks' best logits,
``V / BLOCK`` values and usually one or two opened blocks, and the replay opens only the
blocks that could beat the claimed token by more than the tolerance.

Shapes: V vocabulary, T output length, P prompt length, B the blocks of the vocabulary.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cotrain.rl.seeds import DOMAIN

TOLERANCE = 1e-4
"""Default near-tie tolerance on ``logits / T + g``. Honest fp32 noise is ~1e-5: SmolLM2
workers at 1-2 threads and batch sizes 1-8 against a validator at the other thread count chose
the validator's argmax at every one of 192 x 13 positions (gap 0), with logprobs within 4e-5,
and all 11,623 honest rollouts of a benchmark's two runs replayed with gap 0. A cheat passes
only where its token is within the tolerance of the draw, with a probability in proportion to
it: at 0.02 two of 456 greedy submissions passed (argmax within 0.002 and 0.016 of the draw),
at 1e-3 one of 631 (0.0006)."""

BLOCK = 256
"""Tokens per block of lazily drawn noise."""
GAP_ROWS = 64
"""Positions a replay works on at a time (a cheat can make it open every block of each)."""

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_TOP, _WINNER = np.uint64(0x5851F42D4C957F2D), np.uint64(0x14057B7EF767814F)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 (wrapping arithmetic): counter -> random bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(x: np.ndarray) -> np.ndarray:
    """uint64 counters -> float64 uniforms in (0, 1): the centres of 2^52 equal cells (never 0
    or 1; every value is exact in float64)."""
    return ((_mix(x) >> np.uint64(12)).astype(np.float64) + 0.5) * 2.0**-52


def _position_keys(seed: int, positions: Sequence[int]) -> np.ndarray:
    """(N,) uint64: the key of each output position's noise, fixed by ``(seed, position)``."""
    return np.array(
        [
            int.from_bytes(
                hashlib.sha256(DOMAIN + f"|noise2|{seed}|{p}".encode()).digest()[:8], "big"
            )
            for p in positions
        ],
        dtype=np.uint64,
    )


def n_blocks(vocab: int) -> int:
    return -(-vocab // BLOCK)


def _block_sizes(blocks: np.ndarray, vocab: int) -> np.ndarray:
    return np.minimum(BLOCK, vocab - blocks * BLOCK)


class _Noise:
    """The noise of some output positions of one seed, drawn block by block on demand.

    Block b of position p has the key ``mix(key_p + (b + 1) * gamma)``; from it come the
    block's largest value (Gumbel(log n): the maximum of n Gumbel(0)), the index of the token
    that has it (uniform) and the other tokens' values (Gumbel(0) below the largest). Pure
    integer hashing (SplitMix64) and float64 logarithms: the same on every machine."""

    def __init__(self, seed: int, positions: Sequence[int], vocab: int) -> None:
        self.vocab = vocab
        self.keys = _position_keys(seed, positions)  # (N,)
        nb = n_blocks(vocab)
        blocks = np.arange(nb, dtype=np.uint64)
        self.block_keys = _mix(self.keys[:, None] + (blocks[None, :] + np.uint64(1)) * _GAMMA)
        sizes = _block_sizes(np.arange(nb), vocab).astype(np.float64)
        u = _uniform(self.block_keys ^ _TOP)  # (N, B)
        self.tops = np.log(sizes)[None, :] - np.log(-np.log(u))  # (N, B)

    def blocks(self, rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """(K, BLOCK) float64: the noise of block ``blocks[k]`` of position ``rows[k]`` (rows
        index the positions given); past the vocabulary's end, -inf."""
        key = self.block_keys[rows, blocks]  # (K,)
        top = self.tops[rows, blocks]  # (K,)
        n = _block_sizes(blocks, self.vocab)  # (K,)
        idx = np.arange(BLOCK, dtype=np.uint64)
        u = _uniform(key[:, None] + (idx[None, :] + np.uint64(1)) * _GAMMA)  # (K, BLOCK)
        g = -np.log(np.exp(-top)[:, None] - np.log(u))
        winner = (_mix(key ^ _WINNER) % n.astype(np.uint64)).astype(np.int64)
        g[np.arange(len(key)), winner] = top
        g[np.arange(BLOCK)[None, :] >= n[:, None]] = -np.inf
        return g


def noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """(V,) float64: the whole noise vector of one position, every block opened (what the
    lazy draw and replay read a part of; for tests and small vocabularies)."""
    nz = _Noise(seed, [position], vocab)
    nb = n_blocks(vocab)
    g = nz.blocks(np.zeros(nb, dtype=np.int64), np.arange(nb))
    return torch.from_numpy(g.reshape(-1)[:vocab].copy())


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 ``logits / T`` (``logits`` when ``T == 0``): what both sides add the noise to."""
    z = logits.detach().float().cpu()
    return z / temperature if temperature > 0 else z


def _padded_blocks(z: torch.Tensor) -> np.ndarray:
    """(N, V) float32 -> (N, B, BLOCK) float32 array, -inf past the vocabulary."""
    pad = n_blocks(z.size(1)) * BLOCK - z.size(1)
    if pad:
        z = F.pad(z, (0, pad), value=float("-inf"))
    return z.numpy().reshape(z.size(0), -1, BLOCK)


def _open(zb: np.ndarray, nz: _Noise, rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """(K, BLOCK) float64 scores ``z + g`` of the given blocks."""
    return zb[rows, blocks].astype(np.float64) + nz.blocks(rows, blocks)


def draw(logits: torch.Tensor, temperature: float, seeds: list[int], position: int) -> torch.Tensor:
    """(A,) the seeded Gumbel-max choice of each row of ``logits`` (A, V) at output position
    ``position``, row i with seed ``seeds[i]`` (greedy when ``T == 0``).

    Per row: open the block of largest bound (its best logit plus its largest noise), then
    every block whose bound exceeds the best score found; no other block can hold the argmax.
    """
    z = _scaled(logits, temperature)  # (A, V)
    if temperature == 0:
        return torch.argmax(z, dim=1)
    zb = _padded_blocks(z)  # (A, B, BLOCK)
    out = []
    for i, seed in enumerate(seeds):
        nz = _Noise(seed, [position], z.size(1))
        ub = zb[i].max(axis=1).astype(np.float64) + nz.tops[0]  # (B,)
        first = np.array([int(np.argmax(ub))])
        s = _open(zb[i : i + 1], nz, np.zeros(1, dtype=np.int64), first)  # (1, BLOCK)
        best = float(s.max())
        more = np.nonzero(ub > best)[0]
        tok = int(first[0]) * BLOCK + int(s.argmax())
        if len(more):
            sm = _open(zb[i : i + 1], nz, np.zeros(len(more), dtype=np.int64), more)
            k = int(np.argmax(sm.max(axis=1)))
            if float(sm[k].max()) > best:
                tok = int(more[k]) * BLOCK + int(sm[k].argmax())
        out.append(tok)
    return torch.tensor(out, dtype=torch.long)


def gaps(
    logits: torch.Tensor,
    tokens: Sequence[int],
    *,
    temperature: float,
    seed: int,
    tolerance: float,
    start: int = 0,
) -> np.ndarray:
    """(T,) ``best score - claimed token's score`` at each position: exact up to
    ``tolerance``; above it, at least ``tolerance`` (only the blocks whose bound exceeds the
    claimed score by more than the tolerance are opened, and one that holds a better score
    settles the position). ``inf`` for a token outside the vocabulary."""
    z = _scaled(logits, temperature)  # (T, V)
    n, vocab = z.size(0), z.size(1)
    toks = np.asarray(tokens, dtype=np.int64)
    inside = (toks >= 0) & (toks < vocab)
    safe = np.where(inside, toks, 0)
    rows = np.arange(n)
    if temperature == 0:
        top = z.max(dim=1).values.double() - z[torch.from_numpy(rows), torch.from_numpy(safe)]
        return np.where(inside & np.isfinite(top.numpy()), top.numpy(), np.inf)
    out = np.empty(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, a failure below
        for lo in range(0, n, GAP_ROWS):  # bounded memory however long the completion
            hi = min(n, lo + GAP_ROWS)
            out[lo:hi] = _gaps(z[lo:hi], safe[lo:hi], seed, start + lo, tolerance)
    # a non-finite score (NaN logits, inf - inf) is no evidence of a draw
    return np.where(inside & np.isfinite(out), out, np.inf)


def _gaps(z: torch.Tensor, toks: np.ndarray, seed: int, start: int, tolerance: float) -> np.ndarray:
    """``gaps`` of the positions ``start, start + 1, ...`` of ``z`` (scaled logits)."""
    n, vocab = z.size(0), z.size(1)
    rows = np.arange(n)
    zb = _padded_blocks(z)  # (T, B, BLOCK)
    nz = _Noise(seed, range(start, start + n), vocab)
    own = toks // BLOCK
    s_own = _open(zb, nz, rows, own)  # (T, BLOCK)
    mine = s_own[rows, toks - own * BLOCK]  # (T,)
    best = s_own.max(axis=1)
    ub = zb.max(axis=2).astype(np.float64) + nz.tops  # (T, B)
    ub[rows, own] = -np.inf
    r, b = np.nonzero((ub > (mine + tolerance)[:, None]) & (ub > best[:, None]))
    if len(r):
        np.maximum.at(best, r, _open(zb, nz, r, b).max(axis=1))
    return best - mine


@dataclass(frozen=True)
class Sampled:
    """One completion: its tokens, their log-probabilities under ``softmax(logits / T)``,
    and why it stopped."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    """``"eos"`` (the model emitted EOS, kept as the last token) or ``"length"``."""


@torch.no_grad()
def generate(
    model: Any,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos_token_id: int | None,
) -> Sampled:
    """Sample a completion of ``prompt`` from a Hugging Face causal LM (KV cache), with the
    seeded Gumbel-max rule above."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    ids = torch.tensor([prompt], dtype=torch.long)  # (1, P)
    # transformers 5 calls the KV cache ``cache``; 4.x ``past_key_values``
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    past = out.get(kw)
    logits = out.logits[0, -1]  # (V,)
    tokens: list[int] = []
    logprobs: list[float] = []
    reason = "length"
    for t in range(max_new_tokens):
        tok = int(draw(logits[None], temperature, [seed], t)[0])
        logprobs.append(_logprob(logits, tok, temperature))
        tokens.append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            reason = "eos"
            break
        if t + 1 == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{kw: past})
        past = out.get(kw)
        logits = out.logits[0, -1]
    return Sampled(tokens, logprobs, reason)


def _logprob(logits: torch.Tensor, token: int, temperature: float) -> float:
    z = logits.detach().float().cpu()
    if temperature > 0:
        z = z / temperature
    return float(F.log_softmax(z, dim=-1)[token])


@torch.no_grad()
def prefill_logits(model: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(T, V) the logits that predicted each of ``tokens`` after ``prompt``, in one forward
    pass over the whole sequence (what a validator computes once for every check)."""
    ids = torch.tensor([prompt + tokens], dtype=torch.long)  # (1, P + T)
    logits = model(input_ids=ids).logits[0]  # (P + T, V)
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float()


@dataclass(frozen=True)
class Replay:
    """The outcome of replaying a completion's sampling on prefill logits."""

    ok: bool
    mismatches: int
    """Positions whose claimed token is not (within the tolerance) the seeded argmax."""
    first_mismatch: int | None
    worst_gap: float
    """The largest ``best score - claimed token's score`` over the positions (exact up to the
    tolerance; past it, a bound above the tolerance: ``gaps``)."""


def replay(
    logits: torch.Tensor,
    tokens: list[int],
    *,
    temperature: float,
    seed: int,
    tolerance: float = TOLERANCE,
    start: int = 0,
) -> Replay:
    """Check that every token of ``tokens`` is the seeded Gumbel-max choice on ``logits``
    (T, V) from a prefill, up to a near-tie of ``tolerance``; row t is output position
    ``start + t``."""
    if logits.dim() != 2 or logits.size(0) != len(tokens):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(tokens)} tokens")
    g = gaps(logits, tokens, temperature=temperature, seed=seed, tolerance=tolerance, start=start)
    bad = np.nonzero(~(g <= tolerance))[0]
    return Replay(
        not len(bad), len(bad), int(bad[0]) if len(bad) else None, float(g.max(initial=0.0))
    )
