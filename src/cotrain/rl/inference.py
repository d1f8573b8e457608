"""What an inference worker computes for one assignment, and the prefill a validator checks it
with.

``generate_group`` samples the G completions of one prompt with the seeded Gumbel-max rule of
``sampling`` and proves each with TOPLOC from hidden states captured during generation (a hook
on the final norm; no second forward pass). All samples of a group share the prompt, so the
prompt is computed once, at batch size 1 (the same arithmetic as ``sampling.generate``), and
its KV cache is repeated for each batch of ``batch_size`` rows: rows need no padding. A row that
emits EOS leaves the batch (its cache rows are dropped), so finished rows cost nothing and no
position after a row's end reaches its proof.

``prefill`` is one forward pass over prompt and completion that yields both what TOPLOC checks
(the final norm's output at positions 0..P+T-2) and the logits that predicted each completion
token (what the logprob, termination and sampling checks read). ``prefill_group`` does the same
for several completions of one prompt: the prompt once, then the completions together on its
KV cache in padded batches (long completions). ``prefill_packed`` does it for the short
completions of several prompts: each prompt's own part and its completions packed into one
sequence behind a shared beginning, with a block mask, and the packs batched; this is what
makes validating cheap next to generating.

Shapes: P prompt length, T completion length, V vocabulary, H hidden size, B batch rows.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotrain.rl.sampling import draw
from cotrain.toploc.capture import HiddenCapture
from cotrain.toploc.proof import chunk_bytes, encode_chunks, rollout_chunks


@dataclass(frozen=True)
class Generated:
    """One sample of a group, as a worker submits it."""

    tokens: list[int]
    logprobs: list[float]
    """log_softmax(logits / T) of each chosen token (the behaviour policy mu)."""
    finish_reason: str
    """``"eos"`` (EOS kept as the last token) or ``"length"``."""
    proof: bytes
    """TOPLOC proof of the hidden states of positions 0..P+T-2."""


@dataclass(frozen=True)
class Prefill:
    """What one forward pass over prompt + completion gives a validator."""

    logits: torch.Tensor
    """(T, V) float32: row t predicted completion token t."""
    hidden: torch.Tensor
    """(P + T - 1, H) float32: the final norm's output at every position the worker computed."""


def final_norm(model: Any) -> nn.Module:
    """The module whose output is the last hidden state (Llama-style ``model.model.norm``)."""
    base = model.get_decoder()
    for name in ("norm", "final_layer_norm", "ln_f"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise AttributeError(f"{type(model).__name__}: no final norm found in its decoder")


def _cache_kw(model: Any) -> str:
    # transformers 5 calls the KV cache ``cache``; 4.x ``past_key_values``
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _takes_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _check_args(
    prompt_ids: Sequence[int],
    seeds: Sequence[int],
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if not seeds:
        raise ValueError("a group needs at least one seed")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 is greedy)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")


@torch.no_grad()
def generate_group(
    model: Any,
    prompt_ids: list[int],
    seeds: list[int],
    *,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int | None,
    batch_size: int,
    proof_chunk: int,
    proof_topk: int,
) -> list[Generated]:
    """Sample one completion of ``prompt_ids`` per seed (in seed order) and prove each.

    Sample i draws token t as ``sampling.draw`` with ``seeds[i]`` at position t, so its tokens do
    not depend on the batch it was generated in beyond rounding (a validator's replay tolerates
    near-ties)."""
    return generate_group_as(
        model,
        prompt_ids,
        seeds,
        temperature=temperature,
        logprob_temperature=temperature,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        batch_size=batch_size,
        proof_chunk=proof_chunk,
        proof_topk=proof_topk,
    )


@torch.no_grad()
def generate_group_as(
    model: Any,
    prompt_ids: list[int],
    seeds: list[int],
    *,
    temperature: float,
    logprob_temperature: float,
    max_new_tokens: int,
    eos_token_id: int | None,
    batch_size: int,
    proof_chunk: int,
    proof_topk: int,
) -> list[Generated]:
    """``generate_group`` sampling at ``temperature`` but reporting logprobs at
    ``logprob_temperature`` (a greedy cheat that claims the assigned temperature's mu)."""
    _check_args(prompt_ids, seeds, temperature, max_new_tokens, batch_size)
    kw = _cache_kw(model)
    tokens: list[list[int]] = []
    logprobs: list[list[float]] = []
    reasons: list[str] = []
    hidden: list[torch.Tensor] = []
    # the prompt at batch 1, as sampling.generate runs it: the same logits for token 0
    state = prompt_state(model, prompt_ids, all_logits=True)
    with HiddenCapture(final_norm(model)) as cap:
        starts = range(0, len(seeds), batch_size)
        for start in starts:
            cache = state.cache if start == starts[-1] else copy.deepcopy(state.cache)
            rows = _decode_batch(
                model,
                kw,
                cap,
                cache,
                state.last_logits,
                seeds[start : start + batch_size],
                temperature=temperature,
                logprob_temperature=logprob_temperature,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
            )
            for toks, lps, reason, steps in rows:
                tokens.append(toks)
                logprobs.append(lps)
                reasons.append(reason)
                # positions 0..P+T-2: the prompt, then every output token but the last as fed
                hidden.append(torch.cat([state.hidden, *steps])[: len(prompt_ids) + len(toks) - 1])
    proofs = prove_many(hidden, proof_chunk, proof_topk)
    return [
        Generated(t, lp, r, p)
        for t, lp, r, p in zip(tokens, logprobs, reasons, proofs, strict=True)
    ]


def _decode_batch(
    model: Any,
    kw: str,
    cap: HiddenCapture,
    cache: Any,
    first_logits: torch.Tensor,
    seeds: list[int],
    *,
    temperature: float,
    logprob_temperature: float,
    max_new_tokens: int,
    eos_token_id: int | None,
) -> list[tuple[list[int], list[float], str, list[torch.Tensor]]]:
    """Decode one batch of rows from the prompt's cache; per row its tokens, logprobs, finish
    reason and the (1, H) hidden states of the output tokens it fed back."""
    n = len(seeds)
    if n > 1:
        cache.batch_repeat_interleave(n)
    logits = first_logits.expand(n, -1)  # (A, V), A: rows still generating
    active = list(range(n))  # batch row of each cache row
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    steps: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for t in range(max_new_tokens):
        z = logits.detach().float()  # (A, V)
        choice = draw(z, temperature, [seeds[r] for r in active], t)  # (A,)
        zl = z / logprob_temperature if logprob_temperature > 0 else z
        lp = F.log_softmax(zl, dim=-1).gather(1, choice[:, None])[:, 0]  # (A,)
        keep = []
        for i, r in enumerate(active):
            tok = int(choice[i])
            tokens[r].append(tok)
            logprobs[r].append(float(lp[i]))
            if eos_token_id is not None and tok == eos_token_id:
                reasons[r] = "eos"
            else:
                keep.append(i)
        if not keep or t + 1 == max_new_tokens:
            break
        if len(keep) < len(active):  # finished rows leave the batch and the cache
            cache.batch_select_indices(torch.tensor(keep, dtype=torch.long))
            active = [active[i] for i in keep]
            choice = choice[keep]
        out = model(input_ids=choice[:, None], use_cache=True, **{kw: cache})  # (A, 1)
        cache = out.get(kw)
        h = cap.outputs.pop()  # (A, 1, H)
        for i, r in enumerate(active):
            steps[r].append(h[i])
        logits = out.logits[:, -1]  # (A, V)
    return [(tokens[r], logprobs[r], reasons[r], steps[r]) for r in range(n)]


def prove_many(hidden: Sequence[torch.Tensor], chunk: int, topk: int) -> list[bytes]:
    """Each sample's (P + T - 1, H) hidden states -> its TOPLOC proof; the chunks of all samples
    encoded in one pass (one top-k per chunk shape)."""
    chunks: list[torch.Tensor] = []
    counts = []
    for h in hidden:
        mine = rollout_chunks(h, 0, chunk)
        chunks += mine
        counts.append(len(mine))
    blob = encode_chunks(chunks, topk)
    size = chunk_bytes(topk)
    proofs, start = [], 0
    for c in counts:
        proofs.append(blob[start * size : (start + c) * size])
        start += c
    return proofs


@torch.no_grad()
def prefill(model: Any, prompt_ids: list[int], completion_ids: list[int]) -> Prefill:
    """One forward pass over ``prompt_ids + completion_ids[:-1]`` (the positions the worker
    computed): the final norm's output at each, and the logits of the last T."""
    if not prompt_ids or not completion_ids:
        raise ValueError("prefill needs a prompt and at least one completion token")
    n = len(completion_ids)
    seq = list(prompt_ids) + list(completion_ids[:-1])
    extra = {"logits_to_keep": n} if _takes_logits_to_keep(model) else {}
    with HiddenCapture(final_norm(model)) as cap:
        out = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False, **extra)
    hidden = cap.outputs[-1][0].float()  # (P + T - 1, H)
    logits = out.logits[0, -n:].float()  # (T, V)
    return Prefill(logits=logits, hidden=hidden)


@dataclass(frozen=True)
class PromptState:
    """A prompt's own forward pass, kept to prefill any number of its completions: the KV
    cache, the final norm's output and the logits of its last position."""

    prompt_ids: tuple[int, ...]
    cache: Any
    hidden: torch.Tensor
    """(P, H) float32."""
    last_logits: torch.Tensor
    """(1, V) float32: predicts completion token 0."""


@torch.no_grad()
def prompt_state(
    model: Any,
    prompt_ids: list[int],
    *,
    all_logits: bool = False,
    prefix: PromptState | None = None,
) -> PromptState:
    """Run the prompt once (batch 1, with the KV cache). Only the last position's logits are
    needed; ``all_logits`` computes every position's as ``sampling.generate`` does (the same
    arithmetic, so the same first token to the last bit). ``prefix``: the state of a proper
    beginning of the prompt (a chat template's system turn, shared by every task), whose
    positions are not computed again; the rest agrees with one pass to float rounding only, so
    it does not go with ``all_logits``."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    extra = {} if all_logits or not _takes_logits_to_keep(model) else {"logits_to_keep": 1}
    n = 0
    if prefix is not None:
        if all_logits:
            raise ValueError("all_logits is one pass over the whole prompt: no prefix state")
        n = len(prefix.prompt_ids)
        if not n < len(prompt_ids) or tuple(prompt_ids[:n]) != prefix.prompt_ids:
            raise ValueError("the prefix state is not of a proper beginning of the prompt")
        extra[_cache_kw(model)] = copy.deepcopy(prefix.cache)  # the prefix stays its own
    with HiddenCapture(final_norm(model)) as cap:
        ids = torch.tensor([prompt_ids[n:]], dtype=torch.long)  # (1, P - n)
        out = model(input_ids=ids, use_cache=True, **extra)
    hidden = cap.outputs[-1][0].float()  # (P - n, H)
    return PromptState(
        prompt_ids=tuple(prompt_ids),
        cache=out.get(_cache_kw(model)),
        hidden=hidden if prefix is None else torch.cat([prefix.hidden, hidden]),  # (P, H)
        last_logits=out.logits[0, -1:].float(),  # (1, V)
    )


def common_prefix(lists: Sequence[Sequence[int]]) -> int:
    """Length of the longest beginning all of ``lists`` share."""
    n = min(len(x) for x in lists)
    for i in range(n):
        if any(x[i] != lists[0][i] for x in lists):
            return i
    return n


PAD_SLACK, PAD_FREE = 1.25, 16
"""``prefill_group`` batches completions of similar lengths: padding may add 25% to the
positions a batch computes, plus 16 (about what one more forward pass costs in weight reads on
a CPU), so a 5-token and a 128-token completion are not prefilled as two 128-token rows."""


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of at most ``batch_size``, longest first, padded within
    ``PAD_SLACK`` and ``PAD_FREE``; zero lengths (nothing to compute) in a batch of their own."""
    batches: list[list[int]] = []
    width = real = 0
    for i in sorted((i for i in range(len(lengths)) if lengths[i]), key=lambda i: -lengths[i]):
        cur = batches[-1] if batches else []
        padded = (len(cur) + 1) * width
        if cur and len(cur) < batch_size and padded <= PAD_SLACK * (real + lengths[i]) + PAD_FREE:
            cur.append(i)
            real += lengths[i]
        else:
            batches.append([i])
            width = real = lengths[i]
    zeros = [i for i in range(len(lengths)) if not lengths[i]]
    return batches + ([zeros] if zeros else [])


@torch.no_grad()
def prefill_group(
    model: Any,
    prompt_ids: list[int],
    completions: Sequence[list[int]],
    *,
    batch_size: int = 8,
    state: PromptState | None = None,
) -> list[Prefill]:
    """``prefill`` of several completions of one prompt (in their order): the prompt once (or
    its ``state``, kept from an earlier call), then the completions up to ``batch_size`` at a
    time on its KV cache, batched by length and right-padded (causal attention keeps the
    padding out of the real positions)."""
    if not prompt_ids or not completions or not all(completions):
        raise ValueError("prefill_group needs a prompt and non-empty completions")
    if state is None:
        state = prompt_state(model, prompt_ids)
    elif state.prompt_ids != tuple(prompt_ids):
        raise ValueError("the prompt state is of another prompt")
    kw = _cache_kw(model)
    n_prompt = len(prompt_ids)
    result: dict[int, Prefill] = {}
    fed = [len(c) - 1 for c in completions]  # positions past the prompt that the worker fed
    with HiddenCapture(final_norm(model)) as cap:
        for batch in _length_batches(fed, batch_size):
            width = fed[batch[0]]
            if width == 0:  # one-token completions: the prompt pass has it all
                result.update((i, Prefill(state.last_logits, state.hidden)) for i in batch)
                continue
            ids = torch.zeros((len(batch), width), dtype=torch.long)  # (B, W)
            mask = torch.zeros((len(batch), n_prompt + width), dtype=torch.long)  # (B, P + W)
            mask[:, :n_prompt] = 1
            for b, i in enumerate(batch):
                ids[b, : fed[i]] = torch.tensor(completions[i][:-1], dtype=torch.long)
                mask[b, n_prompt : n_prompt + fed[i]] = 1
            cache = copy.deepcopy(state.cache)  # the state stays the prompt's alone
            if len(batch) > 1:
                cache.batch_repeat_interleave(len(batch))
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache})
            hidden = cap.outputs.pop().float()  # (B, W, H)
            logits = out.logits.float()  # (B, W, V)
            for b, i in enumerate(batch):
                m = fed[i]
                result[i] = Prefill(
                    logits=torch.cat([state.last_logits, logits[b, :m]]),  # (T, V)
                    hidden=torch.cat([state.hidden, hidden[b, :m]]),  # (P + T - 1, H)
                )
    return [result[i] for i in range(len(completions))]


PACK_ROWS = 256
"""A pack (one prompt's own part and completions of it, one after the other) holds at most
this many positions: its positions attend to all of its positions (quadratic), so packs are
kept short and several are batched as rows of one forward pass instead."""
PACK_BATCH_ROWS = 512
"""Positions of one forward pass of packs (padding included): enough rows for the matrix
products to run near the machine's peak, and a bounded (rows, V) logits tensor."""
PACK_MAX_FED = 64
"""Completions longer than this are prefilled in padded batches (``prefill_group``), where
each row attends to its own positions only."""


def _takes_2d_logits_mask(model: Any) -> bool:
    """Whether ``model`` takes a (batch, positions) boolean ``logits_to_keep``."""
    if not _takes_logits_to_keep(model):
        return False
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    return "boolean" in (slice_logits_to_keep.__doc__ or "")


def packs_ok(model: Any) -> bool:
    """Whether ``model``'s attention honours a custom 4-D mask (``prefill_packed``); others
    (flash attention) would attend across packs."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in ("sdpa", "eager")


@dataclass(frozen=True)
class _Pack:
    group: int
    members: list[int]
    """Completion indices of the group, in pack order."""
    rows: int


def _packs(tails: Sequence[int], fed: Sequence[Sequence[int]], max_rows: int) -> list[_Pack]:
    """Each group's completions in packs of at most ``max_rows`` positions counting the
    group's own prompt part (one completion at least per pack)."""
    packs: list[_Pack] = []
    for g, lengths in enumerate(fed):
        members: list[int] = []
        rows = tails[g]
        for i, n in enumerate(lengths):
            if members and rows + n > max_rows:
                packs.append(_Pack(g, members, rows))
                members, rows = [], tails[g]
            members.append(i)
            rows += n
        if members:
            packs.append(_Pack(g, members, rows))
    return packs


def _pack_batches(packs: list[_Pack], max_rows: int) -> list[list[_Pack]]:
    """Packs, longest first, in batches whose padded size stays within ``max_rows``."""
    batches: list[list[_Pack]] = []
    for p in sorted(packs, key=lambda p: -p.rows):
        if batches and (len(batches[-1]) + 1) * batches[-1][0].rows <= max_rows:
            batches[-1].append(p)
        else:
            batches.append([p])
    return batches


@torch.no_grad()
def prefill_packed(
    model: Any,
    groups: Sequence[tuple[list[int], Sequence[list[int]]]],
    *,
    prefix: PromptState | None = None,
    max_rows: int = PACK_ROWS,
    batch_rows: int = PACK_BATCH_ROWS,
) -> list[list[Prefill]]:
    """``prefill`` of the completions of several prompts, each ``(prompt, completions)``,
    on the kept state of ``prefix`` (a beginning every prompt shares), without padding
    inside a pack and without a separate pass over each prompt.

    A pack is the part of one prompt after the prefix followed by completions of it, one
    after the other. A block mask lets each position see the prefix, its prompt and the
    earlier positions of its own completion only, and position ids restart after the prompt
    for each completion, so every position computes what it computes in a pass of its own (to
    float rounding). Packs are batched as the rows of one forward pass (padded to the longest
    pack of the batch), and logits are computed for the positions that predict a completion
    token only."""
    n0 = 0 if prefix is None else len(prefix.prompt_ids)
    for prompt, completions in groups:
        if not prompt or not completions or not all(completions):
            raise ValueError("prefill_packed needs prompts and non-empty completions")
        if prefix is not None and (not n0 < len(prompt) or tuple(prompt[:n0]) != prefix.prompt_ids):
            raise ValueError("the prefix state is not of a proper beginning of every prompt")
    tails = [list(prompt[n0:]) for prompt, _ in groups]
    fed = [[list(c[:-1]) for c in completions] for _, completions in groups]
    packs = _packs([len(t) for t in tails], [[len(f) for f in fs] for fs in fed], max_rows)
    kw, low, mask_2d = (
        _cache_kw(model),
        torch.finfo(torch.float32).min,
        _takes_2d_logits_mask(model),
    )
    result: dict[tuple[int, int], Prefill] = {}
    with HiddenCapture(final_norm(model)) as cap:
        for batch in _pack_batches(packs, batch_rows):
            width = batch[0].rows
            ids = torch.zeros((len(batch), width), dtype=torch.long)  # (B, W)
            pos = torch.zeros((len(batch), width), dtype=torch.long)
            see = torch.zeros((len(batch), width, n0 + width), dtype=torch.bool)
            see[:, :, :n0] = True
            see[:, torch.arange(width), n0 + torch.arange(width)] = True  # padding sees itself
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            spans: list[list[tuple[int, int]]] = []  # per pack: (start, length) per member
            for b, pk in enumerate(batch):
                tail, n_prompt = tails[pk.group], n0 + len(tails[pk.group])
                t = len(tail)
                row = list(tail)
                see[b, :t, n0 : n0 + t] = torch.ones(t, t).tril().bool()
                keep[b, t - 1] = True
                mine = []
                for i in pk.members:
                    f, start = fed[pk.group][i], len(row)
                    m = len(f)
                    row += f
                    pos[b, start : start + m] = torch.arange(n_prompt, n_prompt + m)
                    see[b, start : start + m, n0 : n0 + t] = True
                    see[b, start : start + m, n0 + start : n0 + start + m] = (
                        torch.ones(m, m).tril().bool()
                    )
                    keep[b, start : start + m] = True
                    mine.append((start, m))
                ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
                pos[b, :t] = torch.arange(n0, n_prompt)
                spans.append(mine)
            mask = torch.zeros(see.shape).masked_fill_(~see, low)[:, None]  # (B, 1, W, n0 + W)
            extra: dict[str, Any] = {"logits_to_keep": keep} if mask_2d else {}
            if prefix is not None:  # the prefix's cache stays its own
                cache = copy.deepcopy(prefix.cache)
                if len(batch) > 1:
                    cache.batch_repeat_interleave(len(batch))
                extra.update({kw: cache, "use_cache": True})
            else:
                extra["use_cache"] = False
            out = model(input_ids=ids, position_ids=pos, attention_mask=mask, **extra)
            hidden = cap.outputs.pop().float()  # (B, W, H)
            logits = out.logits.float()  # (kept, V), row-major over (B, W)
            if not mask_2d:
                logits = logits[keep]
            at = 0
            for b, (pk, mine) in enumerate(zip(batch, spans, strict=True)):
                t = len(tails[pk.group])
                prompt_hidden = hidden[b, :t]
                if prefix is not None:
                    prompt_hidden = torch.cat([prefix.hidden, prompt_hidden])  # (P, H)
                first = logits[at : at + 1]  # predicts completion token 0
                at += 1
                for i, (start, m) in zip(pk.members, mine, strict=True):
                    result[pk.group, i] = Prefill(
                        logits=torch.cat([first, logits[at : at + m]]),  # (T, V)
                        hidden=torch.cat([prompt_hidden, hidden[b, start : start + m]]),
                    )
                    at += m
    return [[result[g, i] for i in range(len(fed[g]))] for g in range(len(groups))]
