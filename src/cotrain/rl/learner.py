"""The trainer's learner: the policy, its optimizer, one GRPO step on a batch of accepted
rollouts, checkpoints, and the held-out accuracy of greedy decoding.

One step (``Learner.step``) goes through the batch in its own order (the orchestrator's: slot,
then sample), in micro-batches of ``micro_batch`` sequences. Each micro-batch is right-padded
(a causal model never looks at the padding after a real token, so no attention mask is
needed), its completion tokens' log-probabilities are taken under ``log_softmax(logits / T)``
at each sample's sampling temperature, and ``loss.token_loss`` divided by the loss-token count
of the whole batch is back-propagated; the accumulated gradient is clipped and AdamW steps
once. Nothing in a step draws a random number and dropout is off (the ratio must compare the
very function the workers sampled from), so the same batch on the same weights and thread
count gives bit-identical weights, and a run resumed from a checkpoint continues exactly as
one that never stopped.

Checkpoints (``save`` / ``load``) imitate ``diloco.checkpoint``::

    latest               the name of the newest complete save; written last, atomically
    step-00000012/
        model.safetensors      the policy (tied tensors such as embeddings once)
        optimizer.safetensors  AdamW's tensors (``state.<param>.<key>``)
        state.json             step, AdamW's scalars and hyperparameters, the caller's extra
                               state, and the sha256 of every file above
    .tmp-<pid>-<hex>/    a save in progress (removed on any error; a dead process's by the
                         next save)

Shapes: N sequences of a micro-batch, L their padded length, K positions whose logits are
kept, C the longest completion, V the vocabulary.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from cotrain.core.errors import CotrainError
from cotrain.core.files import write_atomic
from cotrain.rl import wire
from cotrain.rl.config import TrainerConfig
from cotrain.rl.env import Task
from cotrain.rl.loss import completion_logprobs, token_loss

STATE = "state.json"
LATEST = "latest"
_FORMAT = 1


class BatchError(CotrainError, ValueError):
    """A batch the learner cannot train on (a sample without a prompt, a step out of order)."""


class CheckpointError(CotrainError):
    """A trainer checkpoint that is unreadable, corrupt, or of another model."""


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


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint read from disk (hashes checked)."""

    path: Path
    step: int
    extra: dict[str, Any]


class Scorer(Protocol):
    """What ``heldout_accuracy`` needs of an environment (``env.Env``'s task and score)."""

    def task(self, seed: int, level: int = 0) -> Task: ...

    def score(self, task: Task, reply: str) -> float: ...


class Learner:
    """The policy being trained and its AdamW; ``step`` trains on one batch."""

    def __init__(self, model: Any, cfg: TrainerConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.steps = 0
        """Steps taken (no-op steps of empty batches included): the policy is version
        ``steps + 1``."""
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

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
        for chunk in chunks:
            if not any(s.completion_ids for s in chunk):
                continue
            out = self._micro_batch(chunk)
            (out.loss / total).backward()
            loss_sum += float(out.loss.detach()) / total
            clipped += out.clipped
            kl_sum += out.mismatch_kl
            ratio_sum += out.ratio_sum
            ratio_min, ratio_max = min(ratio_min, out.ratio_min), max(ratio_max, out.ratio_max)

        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        applied = bool(torch.isfinite(torch.tensor(norm)))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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
        # only positions from the earliest completion's predecessor on need the vocabulary
        # projection (the prompts' logits are never used)
        first = min(len(s.prompt_ids) for s in chunk) - 1
        keep = length - first
        device = next(iter(self.params)).device if self.params else torch.device("cpu")
        if self._keep_arg:
            logits = self.model(input_ids=ids.to(device), logits_to_keep=keep).logits  # (N,K,V)
        else:
            logits = self.model(input_ids=ids.to(device)).logits[:, first:]  # (N, K, V)
        # completion token t of sequence i is predicted at position P_i - 1 + t
        pos = (
            torch.tensor([len(s.prompt_ids) - 1 - first for s in chunk])[:, None]
            + torch.arange(c_max)[None, :]
        )  # (N, C)
        pos = pos.clamp(max=keep - 1).to(logits.device)
        picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.size(-1)))  # (N, C, V)
        temps = torch.tensor([s.temperature for s in chunk], device=logits.device)  # (N,)
        new = completion_logprobs(picked, targets.to(logits.device), temps)  # (N, C)
        adv = torch.tensor([s.advantage for s in chunk], device=logits.device)  # (N,)
        return token_loss(new, mu.to(logits.device), adv, mask.to(logits.device), self.cfg)

    # ---- checkpoints -------------------------------------------------------------------------

    def save(
        self,
        directory: str | Path,
        step: int,
        extra: dict[str, Any] | None = None,
        *,
        weights: bytes | None = None,
    ) -> Path:
        """Write a complete checkpoint of ``step`` into ``directory`` and point ``latest`` at
        it; older saves are removed once it is in place. ``weights``: the model's
        ``weights_bytes`` if the caller has them already (the version it publishes), written
        as they are instead of serialising the model again."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp = root / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
        name = f"step-{step:08d}"
        try:
            tmp.mkdir()
            if weights is None:
                save_model(self.model, str(tmp / "model.safetensors"))
                model_sha = _sha256(tmp / "model.safetensors")
            else:
                (tmp / "model.safetensors").write_bytes(weights)
                model_sha = hashlib.sha256(weights).hexdigest()
            tensors, scalars = _optimizer_parts(self.optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = {
                "format": _FORMAT,
                "step": step,
                "learner_steps": self.steps,
                "optimizer": scalars,
                "extra": extra or {},
                "files": {
                    "model": model_sha,
                    "optimizer": _sha256(tmp / "optimizer.safetensors"),
                },
            }
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            write_atomic(root / LATEST, name.encode())
            _fsync_dir(root)
        except BaseException:  # Ctrl-C included: leave no temporary directory behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return root / name

    def load(self, directory: str | Path) -> Saved | None:
        """Restore the newest complete checkpoint in ``directory`` (None: there is none)."""
        root = Path(directory)
        try:
            name = (root / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CheckpointError(f"cannot read {root / LATEST}: {e}") from None
        path = root / name
        try:
            meta = json.loads((path / STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is unreadable ({e}); delete {root}") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise CheckpointError(f"checkpoint {path} has an unknown format; delete {root}")
        for fname, digest in meta["files"].items():
            f = path / f"{fname}.safetensors"
            if not f.is_file() or _sha256(f) != digest:
                raise CheckpointError(f"checkpoint file {f} is missing or corrupt; delete {root}")
        try:
            load_model(self.model, path / "model.safetensors", strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[-1].strip()
            raise CheckpointError(f"checkpoint {path} holds another model ({first})") from None
        self._load_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"], path)
        self.steps = int(meta["learner_steps"])
        return Saved(path, int(meta["step"]), dict(meta["extra"]))

    def _load_optimizer(
        self, flat: dict[str, torch.Tensor], saved: dict[str, Any], path: Path
    ) -> None:
        state: dict[int, dict[str, Any]] = {}
        for key, value in flat.items():
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
        for idx, extra in saved["scalars"].items():
            state.setdefault(int(idx), {}).update(extra)
        groups = saved["param_groups"]
        # the config file decides the hyperparameters of a resumed run
        for g in groups:
            g.update(lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None


def _optimizer_parts(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(directory: Path) -> None:
    """Remove ``.tmp-<pid>-*`` saves of processes that no longer run."""
    for p in directory.glob(".tmp-*"):
        try:
            pid = int(p.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(p, ignore_errors=True)


# ---- published weights -----------------------------------------------------------------------


def weights_bytes(model: Any) -> bytes:
    """The policy as safetensors bytes, what each version publishes. Tensors that share storage
    (tied input and output embeddings) are written once, under the name ``named_parameters``
    gives them (the first module that registered it: ``model.embed_tokens.weight``, as
    ``save_pretrained`` does), so a copy of the architecture loads a version with
    ``safetensors.torch.load_model(model, path)`` or with ``load_state_dict(strict=False)``
    missing only the tied output name. The same weights always give the same bytes."""
    from safetensors.torch import save

    sd = model.state_dict()
    owners = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    groups: dict[tuple[int, int], list[str]] = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        groups.setdefault(key, []).append(name)
    keep = set()
    for names in groups.values():
        owned = sorted(n for n in names if n in owners)
        keep.add(owned[0] if owned else sorted(names)[0])
    return save({k: v.detach().to("cpu").contiguous() for k, v in sd.items() if k in keep})


# ---- held-out accuracy -----------------------------------------------------------------------


@torch.no_grad()
def heldout_accuracy(
    model: Any,
    tokenizer: Any,
    env: Scorer,
    seeds: Sequence[int],
    *,
    level: int,
    max_new_tokens: int,
    batch_size: int = 32,
    encode: Callable[[Any, str], list[int]] | None = None,
) -> float:
    """Mean score of greedy replies to the held-out tasks of ``seeds`` at ``level`` (the
    fraction solved, for 0/1 rewards). Prompts are sorted by length and decoded in
    left-padded batches of ``batch_size``; replies are scored on their text without special
    tokens. Deterministic for given weights and thread count."""
    if not seeds:
        raise ValueError("heldout_accuracy needs at least one seed")
    if encode is None:
        from cotrain.rl.policy import encode_prompt

        encode = encode_prompt
    from transformers import GenerationConfig

    tasks = [env.task(s, level) for s in seeds]
    prompts = [encode(tokenizer, t.prompt) for t in tasks]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    pad = 0 if pad is None else int(pad)
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos
    )
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters())).device
    order = sorted(range(len(tasks)), key=lambda i: (len(prompts[i]), i))
    total = 0.0
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (N, P); left padding
            attn = torch.zeros(len(idx), width, dtype=torch.long)  # (N, P)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p) :] = torch.tensor(p)
                attn[row, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen
            )  # (N, P + new)
            for row, i in enumerate(idx):
                reply = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True)
                total += float(env.score(tasks[i], reply))
    finally:
        model.train(was_training)
    return total / len(tasks)
