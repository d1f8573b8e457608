"""Cheating inference workers, shipped so tests and benchmarks can run them as real processes.

A worker configured with ``worker.cheat = NAME`` calls ``cheat_group(NAME, ctx)`` where an
honest one calls ``inference.generate_group``. Each cheat makes its rollouts as plausible as it
can: lengths consistent with the finish reason it claims where the cheat allows, proofs and
log-probabilities from an honest prefill wherever the cheat can compute them, so that only the
check aimed at it catches it::

    other_model     tokens of another model (perturbed weights)     -> sampling
    by_hand         the gold answer's tokens + EOS                  -> termination / sampling
    swap_last       the last token replaced (TOPLOC does not cover it) -> sampling / termination
    truncate        cut short and claimed as "length"               -> termination
    early_eos       an honest prefix, then EOS                      -> termination / sampling
    smaller_model   the model without its last layer                -> toploc
    quantized       int8 fake-quantized weights                     -> toploc
    other_prompt    generated on another prompt of the same length  -> toploc
    forge_logprobs  honest tokens, every log-probability >= 1 nat off -> logprobs
    greedy          greedy decoding, logprobs at the assigned T     -> sampling
    best_of_n       the likeliest of 4 samples with other seeds     -> sampling

A cheat's output can coincide with the honest sample (a confident model's greedy choice is
often its sample too; an early EOS at position 0 of a sample that ended there): such a rollout
is the honest one, passes, and does no harm. ``coincides_with_honest`` tells them apart.

One near-miss remains on SmolLM2: ``other_prompt`` on another task's prompt (the same chat
template, a few digits changed) produced, once in 16 samples, the honest sample's tokens (the
seeded noise decides where the model is unsure) with a proof that passed (TOPLOC's 4 entries per
position follow SmolLM2's outlier channels, which a changed digit barely moves) and logprobs off
by a median 9.6%, inside ``logprob_tolerance``: the honest rollout up to a mu within tolerance.

Derived models (perturbed, smaller, quantized) are made once per honest model and cached.
"""

from __future__ import annotations

import copy
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotrain.rl.inference import (
    Generated,
    generate_group,
    generate_group_as,
    prefill_group,
    prove_many,
)
from cotrain.rl.seeds import derive_seed

CHEATS = (
    "other_model",
    "by_hand",
    "swap_last",
    "truncate",
    "early_eos",
    "smaller_model",
    "quantized",
    "other_prompt",
    "forge_logprobs",
    "greedy",
    "best_of_n",
)

BEST_OF = 4
PERTURB_SCALE = 1.0
"""The other model adds noise of this many times each weight matrix's std (a different model,
not a rounding of this one)."""


@dataclass
class CheatContext:
    """What the cheating worker has: the honest model and the assignment."""

    model: Any
    prompt_ids: list[int]
    seeds: list[int]
    temperature: float
    max_new_tokens: int
    eos_token_id: int | None
    batch_size: int
    proof_chunk: int
    proof_topk: int
    answer_ids: list[int] = field(default_factory=list)
    """``by_hand``: the gold answer's token ids (without EOS)."""
    other_prompt_ids: list[int] = field(default_factory=list)
    """``other_prompt``: another prompt (default: the assigned one rotated by one token)."""

    def generate(self, model: Any = None, prompt: list[int] | None = None) -> list[Generated]:
        """Honest ``generate_group`` of ``model`` (default: the honest one) on ``prompt``."""
        return generate_group(
            self.model if model is None else model,
            self.prompt_ids if prompt is None else prompt,
            self.seeds,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id,
            batch_size=self.batch_size,
            proof_chunk=self.proof_chunk,
            proof_topk=self.proof_topk,
        )


def cheat_group(name: str, ctx: CheatContext) -> list[Generated]:
    """The group a cheat named ``name`` submits for ``ctx``'s assignment (seed order)."""
    if name not in _CHEATS:
        raise ValueError(f"unknown cheat {name!r}; one of {', '.join(CHEATS)}")
    return _CHEATS[name](ctx)


def coincides_with_honest(ctx: CheatContext, group: list[Generated]) -> list[bool]:
    """Per sample: are its tokens, finish reason and log-probabilities (to 1e-4) those of the
    honest sample? (Such a submission is the honest rollout, whatever the cheat meant to do.)"""
    honest = ctx.generate()
    return [
        g.tokens == h.tokens
        and g.finish_reason == h.finish_reason
        and max(abs(a - b) for a, b in zip(g.logprobs, h.logprobs, strict=True)) < 1e-4
        for g, h in zip(group, honest, strict=True)
    ]


# ---- helpers ---------------------------------------------------------------------------------


def _prefilled(
    ctx: CheatContext, completions: list[list[int]], reasons: list[str]
) -> list[Generated]:
    """Rollouts of chosen tokens with honest logprobs (at the assigned temperature) and honest
    proofs, from the honest model's prefill: what a cheat that picks tokens itself can build."""
    fills = prefill_group(ctx.model, ctx.prompt_ids, completions, batch_size=ctx.batch_size)
    proofs = prove_many([f.hidden for f in fills], ctx.proof_chunk, ctx.proof_topk)
    out = []
    for toks, reason, fill, proof in zip(completions, reasons, fills, proofs, strict=True):
        z = fill.logits / ctx.temperature if ctx.temperature > 0 else fill.logits  # (T, V)
        lp = F.log_softmax(z, dim=-1).gather(1, torch.tensor(toks)[:, None])[:, 0]  # (T,)
        out.append(Generated(list(toks), [float(x) for x in lp], reason, proof))
    return out


def _body(g: Generated) -> list[int]:
    """The tokens without a final EOS."""
    return g.tokens[:-1] if g.finish_reason == "eos" else list(g.tokens)


_DERIVED: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def _derived(model: nn.Module, kind: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    per_model = _DERIVED.setdefault(model, {})
    if kind not in per_model:
        per_model[kind] = make(copy.deepcopy(model)).eval()
    return per_model[kind]


@torch.no_grad()
def _perturb(m: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1234)
    for p in m.parameters():
        if p.dim() >= 2:
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(noise * (PERTURB_SCALE * float(p.float().std())))
    return m


def _drop_last_layer(m: Any) -> Any:
    decoder = m.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        raise ValueError(f"{type(m).__name__}: no decoder layer list to drop a layer from")
    decoder.layers = nn.ModuleList(list(layers)[:-1])
    cfg = m.config
    cfg.num_hidden_layers = len(decoder.layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: len(decoder.layers)]
    return m


@torch.no_grad()
def _fake_int8(m: nn.Module) -> nn.Module:
    """Every weight matrix rounded to int8 with one absmax scale per output row (parameters()
    yields tied embeddings once)."""
    for p in m.parameters():
        if p.dim() == 2:
            scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127  # (out, 1)
            p.copy_((p / scale).round().clamp(-127, 127) * scale)
    return m


# ---- the cheats ------------------------------------------------------------------------------


def _other_model(ctx: CheatContext) -> list[Generated]:
    other = _derived(ctx.model, "perturbed", _perturb)
    gen = ctx.generate(model=other)
    return _prefilled(ctx, [g.tokens for g in gen], [g.finish_reason for g in gen])


def _by_hand(ctx: CheatContext) -> list[Generated]:
    toks = list(ctx.answer_ids)
    if ctx.eos_token_id is not None:
        toks.append(ctx.eos_token_id)
    toks = toks[: ctx.max_new_tokens] or [0]
    reason = "eos" if toks[-1] == ctx.eos_token_id else "length"
    return _prefilled(ctx, [toks] * len(ctx.seeds), [reason] * len(ctx.seeds))


def _swap_last(ctx: CheatContext) -> list[Generated]:
    vocab = int(ctx.model.get_input_embeddings().num_embeddings)
    out = []
    swapped_rows = []
    for g, seed in zip(ctx.generate(), ctx.seeds, strict=True):
        rng = random.Random(seed)
        new = g.tokens[-1]
        while new in (g.tokens[-1], ctx.eos_token_id):
            new = rng.randrange(vocab)
        swapped_rows.append([*g.tokens[:-1], new])
        out.append(g)
    # the swapped token's logprob from a prefill; the proof stays (it never covered that token)
    fills = prefill_group(ctx.model, ctx.prompt_ids, swapped_rows, batch_size=ctx.batch_size)
    result = []
    for g, toks, fill in zip(out, swapped_rows, fills, strict=True):
        z = fill.logits[-1] / ctx.temperature if ctx.temperature > 0 else fill.logits[-1]  # (V,)
        lp = float(F.log_softmax(z, dim=-1)[toks[-1]])
        result.append(Generated(toks, [*g.logprobs[:-1], lp], "length", g.proof))
    return result


def _truncate(ctx: CheatContext) -> list[Generated]:
    # Claimed as "length": a full budget's worth of work, delivered short (an "eos" claim
    # without the EOS token is caught the same way, by the termination check).
    cut = [g.tokens[: max(1, len(_body(g)) // 2)] for g in ctx.generate()]
    return _prefilled(ctx, cut, ["length"] * len(cut))


def _early_eos(ctx: CheatContext) -> list[Generated]:
    if ctx.eos_token_id is None:
        raise ValueError("early_eos needs a model with an EOS token")
    rows = [[*_body(g)[: len(_body(g)) // 2], ctx.eos_token_id] for g in ctx.generate()]
    return _prefilled(ctx, rows, ["eos"] * len(rows))


def _smaller_model(ctx: CheatContext) -> list[Generated]:
    return ctx.generate(model=_derived(ctx.model, "smaller", _drop_last_layer))


def _quantized(ctx: CheatContext) -> list[Generated]:
    return ctx.generate(model=_derived(ctx.model, "int8", _fake_int8))


def _other_prompt(ctx: CheatContext) -> list[Generated]:
    n = len(ctx.prompt_ids)
    alt = ctx.other_prompt_ids or [*ctx.prompt_ids[1:], ctx.prompt_ids[0]]
    alt = (alt * (n // len(alt) + 1))[:n]  # the assigned length: a proof of the right size
    return ctx.generate(prompt=alt)


def _forge_logprobs(ctx: CheatContext) -> list[Generated]:
    # Certainty claimed where the model was unsure, less certainty where it was sure: every
    # position at least 1 nat off (a smaller forgery is within tolerance by design).
    out = []
    for g in ctx.generate():
        forged = [-1e-3 if lp < -1.0 else lp - 1.0 for lp in g.logprobs]
        out.append(Generated(g.tokens, forged, g.finish_reason, g.proof))
    return out


def _greedy(ctx: CheatContext) -> list[Generated]:
    return generate_group_as(
        ctx.model,
        ctx.prompt_ids,
        ctx.seeds,
        temperature=0.0,
        logprob_temperature=ctx.temperature,
        max_new_tokens=ctx.max_new_tokens,
        eos_token_id=ctx.eos_token_id,
        batch_size=ctx.batch_size,
        proof_chunk=ctx.proof_chunk,
        proof_topk=ctx.proof_topk,
    )


def _best_of_n(ctx: CheatContext) -> list[Generated]:
    others = [derive_seed(seed, "best_of_n", k) for seed in ctx.seeds for k in range(BEST_OF)]
    cands = generate_group(
        ctx.model,
        ctx.prompt_ids,
        others,
        temperature=ctx.temperature,
        max_new_tokens=ctx.max_new_tokens,
        eos_token_id=ctx.eos_token_id,
        batch_size=ctx.batch_size,
        proof_chunk=ctx.proof_chunk,
        proof_topk=ctx.proof_topk,
    )
    return [
        max(cands[i * BEST_OF : (i + 1) * BEST_OF], key=lambda g: sum(g.logprobs))
        for i in range(len(ctx.seeds))
    ]


_CHEATS: dict[str, Callable[[CheatContext], list[Generated]]] = {
    "other_model": _other_model,
    "by_hand": _by_hand,
    "swap_last": _swap_last,
    "truncate": _truncate,
    "early_eos": _early_eos,
    "smaller_model": _smaller_model,
    "quantized": _quantized,
    "other_prompt": _other_prompt,
    "forge_logprobs": _forge_logprobs,
    "greedy": _greedy,
    "best_of_n": _best_of_n,
}
