"""Proofs captured during generation: a forward hook on the final norm records the last
hidden state of every position the model computes (no second forward pass), and the proofs of
all chunks of all rollouts in a batch are built together once the batch is done.

The hook sees one (B, L_max, H) output for the prefill, then one (B, 1, H) per decode step; the
decode step that consumes output token j produces the hidden state that samples token j + 1.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cotrain.models.lm import CausalLM
from cotrain.toploc.config import ProofConfig
from cotrain.toploc.proof import chunk_bytes, encode_chunks, rollout_chunks
from cotrain.toploc.record import Rollout


class HiddenCapture:
    """Context manager: keeps the output of every forward call of ``module``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.outputs: list[torch.Tensor] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, _mod: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
        self.outputs.append(out.detach())  # a reference, no copy: the step made a new tensor

    def __enter__(self) -> HiddenCapture:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()


@dataclass
class GenerationResult:
    """Rollouts with proofs and where the time went."""

    rollouts: list[Rollout]
    generate_s: float = 0.0
    """Wall time inside the model's generate calls (hooks included)."""
    build_s: float = 0.0
    """Wall time assembling hidden states and encoding proofs (the overhead of proving)."""
    tokens: int = 0
    """Output tokens generated."""
    hidden: list[torch.Tensor] = field(default_factory=list)
    """With ``keep_hidden``: each rollout's (L + n - 1, H) captured hidden states."""


def _cut_at_eos(row: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


MAX_SEED = 2**62
"""Seeds are in [-MAX_SEED, MAX_SEED] (torch takes 64 bits; batches add their offset)."""


def check_generation_args(
    max_new_tokens: int, *, batch_size: int, temperature: float, seed: int
) -> None:
    """ValueError, saying what to change, if generation settings cannot work."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 is greedy)")
    if abs(seed) > MAX_SEED:
        raise ValueError(f"seed={seed} must be within +-2**62")


def check_prompts(lm: CausalLM, prompts: Sequence[list[int]], max_new_tokens: int) -> None:
    """ValueError naming the first prompt (1-based) that ``lm`` cannot continue by
    ``max_new_tokens`` tokens: empty, token ids outside its vocabulary, or too long."""
    limit = lm.max_seq_len
    for n, p in enumerate(prompts, 1):
        if not p:
            raise ValueError(f"prompt {n} is empty (it encodes to no tokens)")
        if min(p) < 0 or max(p) >= lm.vocab_size:
            raise ValueError(f"prompt {n} has token ids outside [0, {lm.vocab_size})")
        if len(p) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {n} is {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens}, over {lm.model_id}'s {limit}: shorten the prompt "
                "or generate fewer tokens"
            )


def generate_with_proofs(
    lm: CausalLM,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    config: ProofConfig | None = None,
    id_prefix: str = "r",
    min_new_tokens: int = 0,
    keep_hidden: bool = False,
) -> GenerationResult:
    """Sample an output for every prompt and prove it; rollouts come back in prompt order.

    Prompts are generated ``batch_size`` at a time (for models without left padding, in groups
    of one prompt length). Each batch uses seed ``seed + first prompt index``.
    ``min_new_tokens`` suppresses EOS until that many tokens exist (for fixed-length studies).
    Settings or prompts that cannot work raise ValueError before anything runs
    (``check_generation_args``, ``check_prompts``).
    """
    config = config or ProofConfig()
    check_generation_args(max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed)
    check_prompts(lm, prompts, max_new_tokens)
    order = list(range(len(prompts)))
    if not lm.left_padding:  # group equal lengths; stable so seeds do not depend on the rest
        groups: dict[int, list[int]] = defaultdict(list)
        for i in order:
            groups[len(prompts[i])].append(i)
        batches = [
            g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)
        ]
    else:
        batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    result = GenerationResult(rollouts=[])
    by_index: dict[int, Rollout] = {}
    hidden_by_index: dict[int, torch.Tensor] = {}
    for batch in batches:
        rows = [list(prompts[i]) for i in batch]
        t0 = time.perf_counter()
        with HiddenCapture(lm.final_norm) as cap:
            new = lm.generate(
                rows,
                max_new_tokens,
                temperature=temperature,
                seed=seed + batch[0],
                min_new_tokens=min_new_tokens,
            )
        t1 = time.perf_counter()
        outputs = [_cut_at_eos(r, lm.eos_token_id) for r in new.tolist()]
        hidden = _rollout_hidden(cap.outputs, rows, outputs)
        proofs = _prove(hidden, rows, config)
        result.build_s += time.perf_counter() - t1
        result.generate_s += t1 - t0
        if keep_hidden:
            hidden_by_index.update(zip(batch, hidden, strict=True))
        for i, p, o, proof in zip(batch, rows, outputs, proofs, strict=True):
            by_index[i] = Rollout(
                id=f"{id_prefix}{i}",
                model=lm.model_id,
                prompt_tokens=p,
                output_tokens=o,
                proof=proof,
                chunk_tokens=config.chunk_tokens,
                topk=config.topk,
            )
            result.tokens += len(o)
    result.rollouts = [by_index[i] for i in order]
    result.hidden = [hidden_by_index[i] for i in order] if keep_hidden else []
    return result


def _rollout_hidden(
    steps: list[torch.Tensor], prompts: list[list[int]], outputs: list[list[int]]
) -> list[torch.Tensor]:
    """Per-step hook outputs of one generate call -> each row's (L + n - 1, H) hidden states."""
    prefill = steps[0]  # (B, L_max, H), prompts left-padded to L_max
    width = prefill.size(1)
    decode = torch.cat([s[:, -1:] for s in steps[1:]], dim=1) if len(steps) > 1 else None
    hidden = []
    for b, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        parts = [prefill[b, width - len(p) :]]  # (L, H)
        if decode is not None:
            parts.append(decode[b])  # (steps - 1, H)
        hidden.append(torch.cat(parts)[: len(p) + len(o) - 1])  # (L + n - 1, H)
    return hidden


def _prove(
    hidden: list[torch.Tensor], prompts: list[list[int]], config: ProofConfig
) -> list[bytes]:
    """Each row's hidden states -> its proof; all chunks of the batch encoded in one pass."""
    chunks: list[torch.Tensor] = []
    counts = []
    for h, p in zip(hidden, prompts, strict=True):
        row_chunks = rollout_chunks(h, len(p), config.chunk_tokens)
        chunks += row_chunks
        counts.append(len(row_chunks))
    blob = encode_chunks(chunks, config.topk)
    size = chunk_bytes(config.topk)
    proofs, start = [], 0
    for c in counts:
        proofs.append(blob[start * size : (start + c) * size])
        start += c
    return proofs
