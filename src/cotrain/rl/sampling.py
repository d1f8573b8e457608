"""Verifiable sampling: completions a validator can replay from its own prefill.

TOPLOC shows that hidden states came from the model; it does not show that the tokens were
*sampled* from it (a worker may pick tokens any way it likes and still prove one honest
prefill). So the randomness of every rollout is fixed by a seed the worker does not choose
(``derive_seed``: the task's seed, the worker's key and a counter), and tokens are drawn with
the Gumbel-max trick::

    token_t = argmax_v( logits_t[v] / T + g_t[v] ),   g_t = -log(-log(U_t)),   U_t ~ U(0, 1)^V

where ``U_t`` comes from a generator seeded by ``(seed, t)`` alone. This is an exact sample of
``softmax(logits_t / T)``. A validator recomputes ``logits_t`` with one prefill of the whole
sequence, draws the same ``g_t`` and checks that each claimed token is the argmax. The logits of
a prefill and of incremental decoding differ in the last bits (other kernels, thread counts,
batch shapes), so a token counts as replayed when its score is within ``tolerance`` of the best
score (a near-tie); a greedy, biased or best-of-N choice, another model's token or a swapped
token differ by far more, almost surely at many positions.

Shapes: V vocabulary, T output length, P prompt length.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any

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


def gumbel(seed: int, position: int, vocab: int) -> torch.Tensor:
    """(V,) float32 Gumbel noise of output position ``position`` (the same on every machine:
    drawn on the CPU from a generator seeded by ``(seed, position)`` alone)."""
    h = hashlib.sha256(DOMAIN + f"|noise|{seed}|{position}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(h[:8], "big") >> 1)
    u = torch.rand(vocab, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0 - 1e-16)
    return (-torch.log(-torch.log(u))).float()


def scores(logits: torch.Tensor, temperature: float, seed: int, position: int) -> torch.Tensor:
    """(V,) ``logits / T + g`` for one position (greedy ``logits`` when ``T == 0``)."""
    z = logits.detach().float().cpu()
    if temperature == 0:
        return z
    return z / temperature + gumbel(seed, position, z.numel())


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
        tok = int(torch.argmax(scores(logits, temperature, seed, t)))
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
    """The largest ``best score - claimed token's score`` over the positions."""


def replay(
    logits: torch.Tensor,
    tokens: list[int],
    *,
    temperature: float,
    seed: int,
    tolerance: float = TOLERANCE,
) -> Replay:
    """Check that every token of ``tokens`` is the seeded Gumbel-max choice on ``logits``
    (T, V) from a prefill, up to a near-tie of ``tolerance``."""
    if logits.dim() != 2 or logits.size(0) != len(tokens):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(tokens)} tokens")
    mismatches, first, worst = 0, None, 0.0
    vocab = logits.size(1)
    for t, tok in enumerate(tokens):
        if not 0 <= tok < vocab:
            gap = float("inf")
        else:
            s = scores(logits[t], temperature, seed, t)
            gap = float(s.max() - s[tok])
        worst = max(worst, gap)
        if gap > tolerance:
            mismatches += 1
            first = t if first is None else first
    return Replay(mismatches == 0, mismatches, first, worst)
