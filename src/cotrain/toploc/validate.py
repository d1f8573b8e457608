"""Check rollouts: recompute every rollout's hidden states in one batched prefill, compare.

Rollouts are sorted by length so a batch pads little, right-padded (causal attention keeps the
padding out of the real positions), and recomputed ``batch_size`` at a time. A rollout passes
when every chunk passes; a rollout whose claims do not even parse (wrong model, malformed
proof, token ids the model does not have, an empty prompt) fails with the reason, and the others
are still checked. ``Rollout`` objects may be built by callers from anything, so the precheck
trusts none of their fields' types.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from cotrain.models.lm import CausalLM
from cotrain.toploc.config import ValidatorConfig, calibrated_median_rel_err
from cotrain.toploc.errors import ProofFormatError
from cotrain.toploc.proof import ProofVerdict, check_many, n_rollout_chunks, rollout_chunks
from cotrain.toploc.record import Rollout


@dataclass
class RolloutVerdict:
    """The validator's decision on one rollout."""

    id: str
    passed: bool
    reason: str
    """"ok", or why it failed (first failing chunk and its figures, or a format problem)."""
    proof: ProofVerdict | None = None
    """Per-chunk results when the proof could be checked."""


@dataclass
class ValidationReport:
    """Verdicts in input order, plus time spent."""

    verdicts: list[RolloutVerdict]
    prefill_s: float
    """Wall time of the recomputation (the batched prefills)."""
    check_s: float
    """Wall time comparing with proofs."""
    hidden: list[torch.Tensor | None] | None = None
    """With ``keep_hidden``: each rollout's recomputed (L + n - 1, H) states (None if skipped)."""

    @property
    def n_passed(self) -> int:
        return sum(v.passed for v in self.verdicts)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Validator:
    """Checks rollouts against one model. Casts ``lm`` to ``config.dtype`` in place."""

    def __init__(self, lm: CausalLM, config: ValidatorConfig | None = None):
        self.config = config or ValidatorConfig()
        self.lm = lm.to_dtype(_DTYPES[self.config.dtype])
        if self.config.proof.max_median_rel_err is None:  # resolve for this model
            self.config = self.config.model_copy(deep=True)
            self.config.proof.max_median_rel_err = calibrated_median_rel_err(lm.model_id)

    def _precheck(self, r: Rollout) -> str | None:
        """Why a rollout cannot pass before any compute, or None."""
        proof_cfg = self.config.proof
        if r.model != self.lm.model_id:
            return f"claims model {_short(r.model)}, validator runs {self.lm.model_id!r}"
        if r.topk != proof_cfg.topk or r.chunk_tokens != proof_cfg.chunk_tokens:
            return (
                f"proof uses chunk_tokens={_short(r.chunk_tokens)} topk={_short(r.topk)}; "
                f"validator expects {proof_cfg.chunk_tokens}/{proof_cfg.topk}"
            )
        if not (_is_int(r.topk) and _is_int(r.chunk_tokens)):
            return "chunk_tokens and topk must be integers"
        for name, tokens in (
            ("prompt_tokens", r.prompt_tokens),
            ("output_tokens", r.output_tokens),
        ):
            if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
                return f"{name} must be a list of integers"
        if not r.prompt_tokens:
            return "empty prompt"
        if not r.output_tokens:
            return "no output tokens"
        ids = r.prompt_tokens + r.output_tokens
        if min(ids) < 0 or max(ids) >= self.lm.vocab_size:
            return f"token ids outside the model's vocabulary [0, {self.lm.vocab_size})"
        if len(ids) > self.lm.max_seq_len:
            return f"sequence longer than the model's {self.lm.max_seq_len} tokens"
        if not isinstance(r.proof, bytes | bytearray):
            return f"malformed proof: {type(r.proof).__name__}, not bytes"
        want = n_rollout_chunks(len(r.prompt_tokens), len(r.output_tokens), r.chunk_tokens)
        if len(r.proof) != want * (2 + 2 * r.topk):
            return f"malformed proof: {len(r.proof)} bytes, expected {want * (2 + 2 * r.topk)}"
        return None

    def validate(self, rollouts: Sequence[Rollout], keep_hidden: bool = False) -> ValidationReport:
        """Verdicts for ``rollouts`` (in their order)."""
        verdicts: dict[int, RolloutVerdict] = {}
        kept: dict[int, torch.Tensor] = {}
        todo = []
        for i, r in enumerate(rollouts):
            why = self._precheck(r)
            if why is None:
                todo.append(i)
            else:
                verdicts[i] = RolloutVerdict(r.id, False, why)
        todo.sort(key=lambda i: len(rollouts[i].prompt_tokens) + len(rollouts[i].output_tokens))
        prefill_s = check_s = 0.0
        threads = torch.get_num_threads()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        try:
            bs = self.config.batch_size
            for j in range(0, len(todo), bs):
                t0 = time.perf_counter()
                hidden = self._prefill([rollouts[i] for i in todo[j : j + bs]])  # (B, T_max, H)
                t1 = time.perf_counter()
                ids, batch, states = [], [], []
                for i, h in zip(todo[j : j + bs], hidden, strict=True):
                    r = rollouts[i]
                    h = h[: len(r.prompt_tokens) + len(r.output_tokens) - 1]  # (L + n - 1, H)
                    # Only our own model makes NaN here (a broken checkpoint, overflow in low
                    # precision): that rollout cannot be judged; the rest of the batch can.
                    if not bool(h.isfinite().all()):
                        verdicts[i] = RolloutVerdict(r.id, False, "recomputed states not finite")
                        continue
                    ids.append(i)
                    batch.append(r)
                    states.append(h)
                checked = check_many(
                    [r.proof for r in batch],
                    [
                        rollout_chunks(h, len(r.prompt_tokens), r.chunk_tokens)
                        for r, h in zip(batch, states, strict=True)
                    ],
                    self.config.proof,
                )
                for i, r, h, v in zip(ids, batch, states, checked, strict=True):
                    verdicts[i] = self._verdict(r, v)
                    if keep_hidden:
                        kept[i] = h.float()
                prefill_s += t1 - t0
                check_s += time.perf_counter() - t1
        finally:
            torch.set_num_threads(threads)
        n = len(rollouts)
        return ValidationReport(
            [verdicts[i] for i in range(n)],
            prefill_s,
            check_s,
            [kept.get(i) for i in range(n)] if keep_hidden else None,
        )

    def _prefill(self, batch: list[Rollout]) -> torch.Tensor:
        # Every position but the last output token: those are the ones the worker computed.
        seqs = [r.prompt_tokens + r.output_tokens[:-1] for r in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        with torch.no_grad():
            return self.lm.hidden_states(ids, mask)

    def _verdict(self, r: Rollout, verdict: ProofVerdict | ProofFormatError) -> RolloutVerdict:
        if isinstance(verdict, ProofFormatError):
            return RolloutVerdict(r.id, False, f"malformed proof: {verdict}")
        if verdict.passed:
            return RolloutVerdict(r.id, True, "ok", verdict)
        if not verdict.failed_chunks:
            return RolloutVerdict(
                r.id,
                False,
                f"median relative error {verdict.median_rel_err:.4f} > "
                f"{self.config.proof.max_median_rel_err} (other weights or lower precision)",
                verdict,
            )
        i = verdict.failed_chunks[0]
        c = verdict.chunks[i]
        start = i * r.chunk_tokens
        what = "prompt" if start < len(r.prompt_tokens) - 1 else "output"
        return RolloutVerdict(
            r.id,
            False,
            f"chunk {i} (positions {start}+, {what}) differs: {c.matches}/{r.topk} entries "
            f"match, a position misses {c.worst_row_misses}",
            verdict,
        )


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _short(x: object) -> str:
    """A caller-supplied value for a reason line: repr'd (no control characters), cut short."""
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
