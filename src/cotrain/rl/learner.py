"""The trainer's learner: the policy, its optimizer, and one GRPO step on a batch of accepted
rollouts (checkpoints: ``rl.checkpoint``; held-out accuracy: ``rl.evaluate``).

One step (``Learner.step``) goes through the batch in its own order (the orchestrator's: slot,
then sample), in micro-batches of ``micro_batch`` sequences. With ``pack_prompts`` (the
default, for models that take a 4D attention mask) the samples of one prompt share a row: the
prompt once, then each completion, attending to the prompt and to itself only, its positions
numbered on from the prompt's (``_packed_micro_batch``; a group of G completions of length C
after a prompt of length P costs P + G*C tokens instead of G*(P + C): 3.5x less time for
chain_sum on SmolLM2). Otherwise each micro-batch is right-padded (a causal model never looks
at the padding after a real token, so no attention mask is needed). The completion tokens'
log-probabilities are taken under ``log_softmax(logits / T)``
at each sample's sampling temperature, and ``loss.token_loss`` divided by the loss-token count
of the whole batch is back-propagated; the accumulated gradient is clipped and AdamW steps
once. Nothing in a step draws a random number and dropout is off (the ratio must compare the
very function the workers sampled from), so the same batch on the same weights and thread
count gives bit-identical weights, and a run resumed from a checkpoint continues exactly as
one that never stopped.

Memory (SmolLM2-135M in fp32: 0.54 GB of weights). The floor of a step is four copies of the
weights (parameters, gradients, AdamW's two moments: 2.15 GB); what a step adds on top is kept
small, without changing a bit of its result:

* the decoder layers' activations are recomputed in the backward pass instead of being kept
  (``recompute``: 0.6 GB less for a micro-batch of 8 sequences of 56 tokens, for a step about
  a fifth longer on the CPU; the recomputation runs the very same operations);
* the vocabulary projection runs only at the completion positions (the hidden states are
  gathered before it), and the division by the temperature is skipped where it is 1;
* with tied embeddings, the output projection's share of the weight's gradient is added to
  the embedding's share in place (``_keeping_aside``), not into a third weight-sized tensor;
* AdamW runs one tensor at a time (``foreach=False``: what it does on the CPU anyway; the
  multi-tensor form would add a temporary as large as the weights);
* glibc keeps freed memory in its heaps, fragmented, which made the peak grow from step to
  step: allocations of 1 MB and more always come from ``mmap`` (returned when freed; the
  threshold is a process setting, made once by the first learner) and the heaps' free pages
  go back to the system after each micro-batch (``malloc_trim``).

The trainer's peak, two steps of 64 samples in micro-batches of 8 with publishing and
checkpointing: 4.3 GB before these measures, 2.9 GB after (``tests/rl/test_rl_trainer_memory``).

Shapes: N sequences of a micro-batch, L their padded length, K positions whose hidden states
leave the model, C the longest completion, H the hidden size, V the vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cotrain.core.errors import CotrainError
from cotrain.rl import wire
from cotrain.rl.checkpoint import Saved, load_checkpoint, save_checkpoint
from cotrain.rl.config import TrainerConfig
from cotrain.rl.heap import limit_heap_growth, release_memory
from cotrain.rl.loss import completion_logprobs, token_loss


class BatchError(CotrainError, ValueError):
    """A batch the learner cannot train on (a sample without a prompt, a step out of order)."""


@dataclass(frozen=True)
class StepStats:
    """What one step did (JSON-ready through ``to_json``)."""

    step: int
    """The learner's step count after this step (1-based)."""
    loss: float
    """The batch's loss: token sum over the batch's loss-token count."""
    grad_norm: float
    """Before clipping."""
    clip_fraction: float
    """Loss tokens whose policy gradient a clip stopped, over all loss tokens."""
    mismatch_kl: float
    """Mean over tokens of ``rho - 1 - log rho``: trainer against sampling policy."""
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    tokens: int
    samples: int
    micro_batches: int
    staleness: dict[int, int] = field(default_factory=dict)
    """Samples by version lag (``batch.step - sample.version``; 0: on-policy)."""
    mean_staleness: float = 0.0
    applied: bool = True
    """False when the weights did not change: an empty batch, or a non-finite gradient."""

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "clip_fraction": self.clip_fraction,
            "mismatch_kl": self.mismatch_kl,
            "ratio_mean": self.ratio_mean,
            "ratio_min": self.ratio_min,
            "ratio_max": self.ratio_max,
            "tokens": self.tokens,
            "samples": self.samples,
            "micro_batches": self.micro_batches,
            "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
            "mean_staleness": self.mean_staleness,
            "applied": self.applied,
        }


class Learner:
    """The policy being trained and its AdamW; ``step`` trains on one batch.

    ``recompute``: recompute the decoder layers' activations in the backward pass instead of
    keeping them (the same step bit for bit, a step about a fifth longer, a tenth of the
    activations' memory; see the module's docstring)."""

    def __init__(self, model: Any, cfg: TrainerConfig, *, recompute: bool = True) -> None:
        self.model = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        # one tensor at a time: no temporary as large as the weights (the CPU's default)
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            foreach=False,
        )
        self.steps = 0
        """Steps taken (no-op steps of empty batches included): the policy is version
        ``steps + 1``."""
        args = inspect.signature(model.forward).parameters
        self._keep_arg = "logits_to_keep" in args
        self._cache_arg = "use_cache" in args
        self._packs = cfg.pack_prompts and _takes_block_masks(model, args)
        self._layers = _decoder_layers(model) if recompute else []
        self._head = _output_head(model)
        self._tied = _tied_head(model, self._head)
        self._aside: list[torch.Tensor] = []
        limit_heap_growth()

    # ---- one step ----------------------------------------------------------------------------

    def step(self, batch: wire.Batch) -> StepStats:
        """Train on ``batch`` (one optimizer step); an empty batch changes nothing but the
        step count."""
        samples = batch.samples
        for s in samples:
            if not s.prompt_ids:
                raise BatchError(f"sample {s.rollout_id} has no prompt tokens")
        lags = Counter(batch.step - s.version for s in samples)
        mean_lag = sum(k * v for k, v in lags.items()) / len(samples) if samples else 0.0
        total = sum(len(s.completion_ids) for s in samples)
        self.steps += 1
        if total == 0:
            return StepStats(
                self.steps, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0, len(samples), 0,
                dict(lags), mean_lag, applied=False,
            )  # fmt: skip

        self.model.eval()  # dropout off: the same function the workers sampled from
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, clipped, kl_sum, ratio_sum = 0.0, 0, 0.0, 0.0
        ratio_min, ratio_max = float("inf"), 0.0
        mb = self.cfg.micro_batch
        chunks = [samples[i : i + mb] for i in range(0, len(samples), mb)]
        tied = self._tied.register_hook(self._add_aside) if self._tied is not None else None
        try:
            for chunk in chunks:
                if not any(s.completion_ids for s in chunk):
                    continue
                out = self._micro_batch(chunk)
                (out.loss / total).backward()
                loss_sum += float(out.loss.detach()) / total
                clipped += out.clipped
                kl_sum += out.mismatch_kl
                ratio_sum += out.ratio_sum
                ratio_min = min(ratio_min, out.ratio_min)
                ratio_max = max(ratio_max, out.ratio_max)
                del out  # the graph goes before the next micro-batch's is built
                release_memory()

            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
            applied = bool(torch.isfinite(torch.tensor(norm)))
            if applied:
                self.optimizer.step()
        finally:
            if tied is not None:
                tied.remove()
            self._aside.clear()
            self.optimizer.zero_grad(set_to_none=True)
            release_memory()
        return StepStats(
            step=self.steps,
            loss=loss_sum,
            grad_norm=norm,
            clip_fraction=clipped / total,
            mismatch_kl=kl_sum / total,
            ratio_mean=ratio_sum / total,
            ratio_min=ratio_min,
            ratio_max=ratio_max,
            tokens=total,
            samples=len(samples),
            micro_batches=len(chunks),
            staleness=dict(lags),
            mean_staleness=mean_lag,
            applied=applied,
        )

    def _micro_batch(self, chunk: Sequence[wire.Sample]) -> Any:
        """``token_loss`` of one micro-batch (the graph attached)."""
        if self._packs:
            return self._packed_micro_batch(chunk)
        n = len(chunk)
        lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in chunk]
        length = max(lengths)
        c_max = max(len(s.completion_ids) for s in chunk)
        ids = torch.zeros(n, length, dtype=torch.long)  # (N, L); right padding
        targets = torch.zeros(n, c_max, dtype=torch.long)  # (N, C)
        mu = torch.zeros(n, c_max, dtype=torch.float32)  # (N, C)
        mask = torch.zeros(n, c_max, dtype=torch.bool)  # (N, C)
        for i, s in enumerate(chunk):
            seq = s.prompt_ids + s.completion_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            c = len(s.completion_ids)
            targets[i, :c] = torch.tensor(s.completion_ids)
            mu[i, :c] = torch.tensor(s.logprobs)
            mask[i, :c] = True
        # only positions from the earliest completion's predecessor on leave the model (the
        # prompts' logits are never used); completion token t of sequence i is predicted at
        # position P_i - 1 + t (padding: clamped to the last position, masked out)
        first = min(len(s.prompt_ids) for s in chunk) - 1
        keep = length - first
        pos = (
            torch.tensor([len(s.prompt_ids) - 1 - first for s in chunk])[:, None]
            + torch.arange(c_max)[None, :]
        ).clamp(max=keep - 1)  # (N, C), relative to position `first`
        device = next(iter(self.params)).device if self.params else torch.device("cpu")
        logits = self._completion_logits(ids.to(device), pos.to(device), first, keep)  # (N,C,V)
        return self._loss(chunk, logits, targets, mu, mask)

    def _packed_micro_batch(self, chunk: Sequence[wire.Sample]) -> Any:
        """``token_loss`` of one micro-batch with the samples of each prompt packed in rows
        (``pack_prompts``): a row is the prompt once, then completions one after another,
        each attending to the prompt and to its own earlier tokens only, its positions
        numbered on from the prompt's as if it stood alone. Completion token 0 of every
        sample of a row is predicted at the prompt's last position (one hidden state, its
        gradient the sum of theirs); token t > 0 at the sample's own token t - 1."""
        rows = _pack_rows(chunk, self.cfg.pack_tokens)
        width = max(len(r[0].prompt_ids) + sum(len(s.completion_ids) for s in r) for r in rows)
        n, c_max = len(chunk), max(len(s.completion_ids) for s in chunk)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (R, L); right padding
        position = torch.zeros(len(rows), width, dtype=torch.long)  # (R, L)
        allowed = torch.zeros(len(rows), width, width, dtype=torch.bool)  # (R, L, L)
        row_of = torch.zeros(n, dtype=torch.long)  # (N,)
        pos = torch.zeros(n, c_max, dtype=torch.long)  # (N, C) into the row
        targets = torch.zeros(n, c_max, dtype=torch.long)  # (N, C)
        mu = torch.zeros(n, c_max, dtype=torch.float32)  # (N, C)
        mask = torch.zeros(n, c_max, dtype=torch.bool)  # (N, C)
        i = 0
        for r, row in enumerate(rows):
            prompt = row[0].prompt_ids
            p = len(prompt)
            ids[r, :p] = torch.tensor(prompt)
            position[r, :p] = torch.arange(p)
            allowed[r, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
            at = p
            for s in row:
                c = len(s.completion_ids)
                row_of[i] = r
                pos[i, :] = p - 1  # padding entries: any position (masked out)
                if c:
                    ids[r, at : at + c] = torch.tensor(s.completion_ids)
                    position[r, at : at + c] = torch.arange(p, p + c)
                    allowed[r, at : at + c, :p] = True
                    allowed[r, at : at + c, at : at + c] = torch.ones(c, c).tril().bool()
                    pos[i, 1:c] = torch.arange(at, at + c - 1)
                    targets[i, :c] = torch.tensor(s.completion_ids)
                    mu[i, :c] = torch.tensor(s.logprobs)
                    mask[i, :c] = True
                at += c
                i += 1
            tail = torch.arange(at, width)
            allowed[r, tail, tail] = True  # padding sees itself: no row without a key
        device = next(iter(self.params)).device if self.params else torch.device("cpu")
        dtype = next(iter(self.params)).dtype if self.params else torch.float32
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )[:, None]  # (R, 1, L, L): 0 where a query may look, the lowest float elsewhere
        logits = self._gathered_logits(
            {
                "input_ids": ids.to(device),
                "position_ids": position.to(device),
                "attention_mask": bias.to(device),
            },
            row_of.to(device),
            pos.to(device),
        )  # (N, C, V)
        return self._loss(chunk, logits, targets, mu, mask)

    def _loss(
        self,
        chunk: Sequence[wire.Sample],
        logits: torch.Tensor,
        targets: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor,
    ) -> Any:
        """``token_loss`` of the (N, C, V) completion logits of ``chunk`` (both layouts)."""
        temps = [s.temperature for s in chunk]
        temperature: torch.Tensor | float = 0.0  # all 0 or 1: the raw logits (x / 1 is x)
        if any(t not in (0.0, 1.0) for t in temps):
            temperature = torch.tensor(temps, device=logits.device)  # (N,)
        new = completion_logprobs(logits, targets.to(logits.device), temperature)  # (N, C)
        adv = torch.tensor([s.advantage for s in chunk], device=logits.device)  # (N,)
        return token_loss(new, mu.to(logits.device), adv, mask.to(logits.device), self.cfg)

    def _gathered_logits(
        self, inputs: dict[str, torch.Tensor], row_of: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """(N, C, V) logits of row ``row_of[i]`` at positions ``pos[i]`` (N, C); the hidden
        states are gathered before the output projection."""
        kwargs: dict[str, Any] = {"use_cache": False} if self._cache_arg else {}
        shape = tuple(inputs["input_ids"].shape)
        gathered = False

        def gather(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            nonlocal gathered
            hidden = args[0]
            if gathered or hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape:
                return None
            gathered = True
            return (hidden[row_of[:, None], pos], *args[1:])  # (N, C, H)

        head = self._head
        hook = head.register_forward_pre_hook(gather) if head is not None else None
        try:
            with self._recomputing(), self._keeping_aside():
                logits = self.model(**inputs, **kwargs).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits if gathered else logits[row_of[:, None], pos]

    def _completion_logits(
        self, ids: torch.Tensor, pos: torch.Tensor, first: int, keep: int
    ) -> torch.Tensor:
        """(N, C, V) logits at ``pos`` (N, C), positions counted from ``first``. The hidden
        states (N, K, H) are gathered at ``pos`` before the output projection where the model
        has one, so (N, K, V) logits are never made."""
        kwargs: dict[str, Any] = {"use_cache": False} if self._cache_arg else {}
        if self._keep_arg:
            kwargs["logits_to_keep"] = keep
        gathered = False

        def gather(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            nonlocal gathered
            hidden = args[0]
            if gathered or hidden.dim() != 3 or hidden.shape[:2] != (ids.size(0), keep):
                return None  # not the (N, K, H) this forward was asked for: left alone
            gathered = True
            index = pos[..., None].expand(-1, -1, hidden.size(-1))  # (N, C, H)
            return (hidden.gather(1, index), *args[1:])

        head = self._head
        hook = head.register_forward_pre_hook(gather) if head is not None else None
        try:
            with self._recomputing(), self._keeping_aside():
                logits = self.model(input_ids=ids, **kwargs).logits
        finally:
            if hook is not None:
                hook.remove()
        if gathered:
            return logits
        if not self._keep_arg:
            logits = logits[:, first:]  # (N, K, V)
        return logits.gather(1, pos[..., None].expand(-1, -1, logits.size(-1)))

    @contextmanager
    def _keeping_aside(self) -> Iterator[None]:
        """While a forward pass runs, for an output projection tied to the input embeddings:
        the projection's share of the weight's gradient is kept aside (``_KeptAside``) rather
        than buffered by autograd until the embedding's share arrives at the end of the
        backward pass and summed with it into a third tensor of the weight's size;
        ``_add_aside`` adds it to the embedding's share in place. The same sum, bit for bit
        (a + b is b + a), one weight-sized tensor fewer at the peak (0.11 GB for SmolLM2)."""
        head = self._head
        tied = self._tied is not None and torch.is_grad_enabled()
        if not tied or not isinstance(head, torch.nn.Linear):
            yield
            return
        aside = self._aside

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            weight = _KeptAside.apply(head.weight, aside)
            return torch.nn.functional.linear(hidden, weight, head.bias)

        head.forward = forward  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            del head.forward

    def _add_aside(self, grad: torch.Tensor) -> torch.Tensor | None:
        """The tied weight's gradient hook: its embedding share plus the projection's."""
        if not self._aside:
            return None
        return self._aside.pop().add_(grad)

    @contextmanager
    def _recomputing(self) -> Iterator[None]:
        """While a forward pass runs: each decoder layer keeps only its inputs for the
        backward pass, which runs the layer again (``torch.utils.checkpoint``)."""
        if not self._layers or not torch.is_grad_enabled():
            yield
            return
        own = [layer.__dict__.get("forward") for layer in self._layers]
        for layer, fwd in zip(self._layers, own, strict=True):
            layer.forward = functools.partial(_checkpointed, fwd or layer.forward)
        try:
            yield
        finally:
            for layer, fwd in zip(self._layers, own, strict=True):
                if fwd is None:
                    del layer.forward
                else:
                    layer.forward = fwd

    # ---- checkpoints (``rl.checkpoint``) ------------------------------------------------------

    def save(
        self,
        directory: str | Path,
        step: int,
        extra: dict[str, Any] | None = None,
        *,
        weights: bytes | str | os.PathLike[str] | None = None,
        weights_sha256: str | None = None,
    ) -> Path:
        """``checkpoint.save_checkpoint`` of the policy and its AdamW."""
        return save_checkpoint(
            self.model,
            self.optimizer,
            self.steps,
            directory,
            step,
            extra,
            weights=weights,
            weights_sha256=weights_sha256,
        )

    def load(self, directory: str | Path) -> Saved | None:
        """Restore the newest complete checkpoint in ``directory`` (None: there is none)."""
        saved = load_checkpoint(self.model, self.optimizer, self.cfg, directory)
        if saved is not None:
            self.steps = saved.learner_steps
        return saved


# ---- what a step runs ------------------------------------------------------------------------


def _pack_rows(chunk: Sequence[wire.Sample], limit: int) -> list[list[wire.Sample]]:
    """Consecutive samples of one prompt, in rows of at most ``limit`` tokens (a row holds
    at least one sample)."""
    rows: list[list[wire.Sample]] = []
    size = 0
    for s in chunk:
        c = len(s.completion_ids)
        if rows and rows[-1][0].prompt_ids == s.prompt_ids and size + c <= limit:
            rows[-1].append(s)
            size += c
        else:
            rows.append([s])
            size = len(s.prompt_ids) + c
    return rows


def _takes_block_masks(model: Any, args: Any) -> bool:
    """Whether ``model`` takes position ids and a 4D additive attention mask (Hugging Face
    decoders with eager or SDPA attention)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return "position_ids" in args and "attention_mask" in args and impl in ("eager", "sdpa")


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's stack of blocks (the ``ModuleList`` holding the most parameters; an HF
    decoder's ``layers``), whose activations ``recompute`` drops; none where there is no
    such list."""
    best: list[torch.nn.Module] = []
    size = 0
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = list(m), n
    return best


class _KeptAside(torch.autograd.Function):
    """The identity on a weight whose gradient goes to ``aside`` instead of the weight."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, aside: list[torch.Tensor]) -> torch.Tensor:
        ctx.aside = aside
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        ctx.aside.append(grad)
        return None, None


def _tied_head(model: Any, head: torch.nn.Module | None) -> torch.nn.Parameter | None:
    """The weight an ``nn.Linear`` output projection shares with the input embeddings (tied
    embeddings, as SmolLM2's), None where they are not tied or the projection is not a plain
    ``nn.Linear``."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if (
        not isinstance(head, torch.nn.Linear)
        or "forward" in head.__dict__
        or not isinstance(emb, torch.nn.Module)
        or getattr(emb, "weight", None) is not head.weight
        or not head.weight.requires_grad
    ):
        return None
    return head.weight


def _output_head(model: Any) -> torch.nn.Module | None:
    """The vocabulary projection (an HF model's ``get_output_embeddings``), if any."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None
