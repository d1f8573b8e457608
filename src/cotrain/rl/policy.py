"""The policy model every RL role loads, and what it costs in memory before loading it.

Users of other RL swarms hit silent OOM kills ("Killed: 9"); every role here prints its
estimate first and refuses with one line when the machine cannot hold it.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cotrain.core.errors import UsageError
from cotrain.rl.config import ModelSpec

GB = 1 << 30

# Resident cost per role beyond the weights, measured on SmolLM2-135M (fp32, CPU): the python
# process with torch and transformers imported, activations and KV caches of a batch, and for
# the trainer the gradients and AdamW moments (3 more copies of the weights).
_BASE_BYTES = 350 << 20
_WEIGHT_COPIES = {"worker": 1.4, "validator": 1.5, "trainer": 4.6, "orchestrator": 0.0}


class MemoryError_(UsageError):
    """The machine has less memory available than a role needs."""


@dataclass(frozen=True)
class Policy:
    """A loaded policy: the HF module, its tokenizer, and the name rollouts record."""

    model: Any
    tokenizer: Any
    model_id: str
    path: Path

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else None

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    @functools.cached_property
    def codec(self) -> PromptCodec:
        return PromptCodec(self.path)

    def encode_prompt(self, text: str) -> list[int]:
        """A user message -> prompt ids, with the chat template where the model has one (the
        ``PromptCodec`` the orchestrator encodes assignments with)."""
        return self.codec.encode_prompt(text)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(text)["input_ids"]]


def model_dir(spec: ModelSpec) -> Path:
    """The local directory of the policy (SmolLM2 converted into the cache on first use)."""
    if spec.path == "smollm2":
        from cotrain.models.hf import smollm2_dir

        return smollm2_dir()
    path = Path(spec.path)
    if not (path / "config.json").is_file():
        raise UsageError(
            f"model.path={spec.path!r} is not a Hugging Face model directory (no config.json); "
            "use 'smollm2' or a local directory"
        )
    return path


TEMPLATE_DATE = datetime(2025, 1, 1)
"""The date a chat template's ``strftime_now`` renders (fixed: see ``PromptCodec``)."""


class PromptCodec:
    """Prompt encoding and completion decoding without transformers (which imports torch:
    ~200 MB of a process that never runs the model, the orchestrator). The model directory's
    ``tokenizer.json`` through ``tokenizers``, and its chat template rendered by jinja2 the
    way transformers renders it (sandboxed, ``trim_blocks``, ``lstrip_blocks``, the special
    tokens as variables); ``encode_prompt`` gives the ids transformers' ``apply_chat_template``
    gives (a test holds them equal), with one difference: ``strftime_now`` renders
    ``TEMPLATE_DATE``, not today's date, so that the orchestrator and every validator render one
    prompt the same on any day and in any time zone (a date in the prompt would otherwise
    reject honest rollouts around midnight). Every role encodes prompts with it
    (``Policy.encode_prompt``)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text())
        source = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        self.special = {
            k: _token_text(config.get(k))
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.template = None
        if isinstance(source, str) and source:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True,
                lstrip_blocks=True,
                extensions=[loopcontrols, _generation_block()],
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = TEMPLATE_DATE.strftime
            try:
                self.template = env.from_string(source)
            except TemplateError as e:
                raise UsageError(f"{path}: the chat template does not parse: {e}") from None

    def encode_prompt(self, text: str) -> list[int]:
        if self.template is None:
            return list(self.tokenizer.encode(text).ids)
        try:
            rendered = self.render([{"role": "user", "content": text}])
        except UsageError:
            raise
        except Exception as e:  # a template is code from the model's author
            raise UsageError(f"the model's chat template failed on a prompt: {e}") from None
        return list(self.tokenizer.encode(rendered, add_special_tokens=False).ids)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The chat template's text of ``messages``, ready for the assistant's reply."""
        if self.template is None:
            raise UsageError("the model has no chat template")
        return str(
            self.template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special,
            )
        )

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # an AddedToken written out
        return str(token.get("content"))
    return None if token is None else str(token)


def _generation_block() -> Any:
    """The ``{% generation %}...{% endgeneration %}`` tag of transformers' templates (it marks
    the assistant's tokens for training masks); rendered here as its content."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2 declares it so)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    return Generation


def _raise_template_error(message: str) -> None:
    raise UsageError(f"the model's chat template refused the prompt: {message}")


def load_codec(spec: ModelSpec) -> PromptCodec:
    """The policy's ``PromptCodec`` (no torch)."""
    return PromptCodec(model_dir(spec))


def load_tokenizer(spec: ModelSpec) -> Any:
    from cotrain.models.hf import _offline_transformers

    return _offline_transformers().AutoTokenizer.from_pretrained(model_dir(spec))


def load_policy(spec: ModelSpec, *, shared: bool = False) -> Policy:
    """The policy in fp32. ``shared``: its weights mapped from the model's safetensors file
    instead of copied (inference roles: every process on the machine shares one copy)."""
    import torch

    from cotrain.models.hf import SMOLLM2_ID, load_hf_causal_lm

    if spec.threads:
        torch.set_num_threads(spec.threads)
    path = model_dir(spec)
    model_id = SMOLLM2_ID if spec.path == "smollm2" else path.name
    if shared and (path / "model.safetensors").is_file():
        mapped = _load_mapped(path)
        if mapped is not None:
            return Policy(mapped, load_tokenizer(spec), model_id, path)
    loaded = load_hf_causal_lm(path, dtype=torch.float32)
    return Policy(loaded.model, loaded.tokenizer, model_id, path)


def _load_mapped(path: Path) -> Any:
    """The model built without weights, then given the file's tensors as mapped views; None
    when the file does not hold every parameter in fp32 (then it is loaded the usual way)."""
    import torch
    from accelerate import init_empty_weights

    from cotrain.models.hf import _offline_transformers
    from cotrain.rl.client import map_safetensors

    tf = _offline_transformers()
    config = tf.AutoConfig.from_pretrained(path)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary) real
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = map_safetensors(path / "model.safetensors")
    if any(t.dtype != torch.float32 for t in state.values()):
        return None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {k for k in missing if k.endswith("lm_head.weight")}:
        return None
    model.tie_weights()
    if any(p.is_meta for p in model.parameters()):
        return None
    return model.eval()


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the policy, from its config alone (nothing loaded)."""
    cfg = json.loads((model_dir(spec) / "config.json").read_text())
    h, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    inter = int(cfg.get("intermediate_size") or 4 * h)
    vocab = int(cfg["vocab_size"])
    heads = int(cfg.get("num_attention_heads") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    attn = h * h * 2 + 2 * h * (h // heads) * kv
    per_layer = attn + 3 * h * inter + 2 * h
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return embed + layers * per_layer + h


def estimate_bytes(role: str, spec: ModelSpec) -> int:
    """Peak resident bytes of one process of ``role`` (fp32 weights)."""
    weights = 4 * parameter_count(spec)
    return int(_BASE_BYTES + _WEIGHT_COPIES[role] * weights)


def available_bytes() -> int | None:
    """MemAvailable of this machine (None where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(role: str, spec: ModelSpec, *, log: Any = None) -> int:
    """Print the role's estimate; ``MemoryError_`` (one line, exit 2) if it cannot fit.
    ``COTRAIN_SKIP_MEMORY_CHECK=1`` skips the refusal."""
    need = estimate_bytes(role, spec)
    have = available_bytes()
    msg = f"{role}: estimated peak memory {need / GB:.2f} GB"
    if have is not None:
        msg += f" ({have / GB:.1f} GB available)"
    if log is not None:
        log(msg)
    if have is not None and need > have and os.environ.get("COTRAIN_SKIP_MEMORY_CHECK") != "1":
        raise MemoryError_(
            f"{role} needs about {need / GB:.2f} GB but only {have / GB:.2f} GB is available: "
            "stop other processes, use a smaller model, or run fewer roles on this machine"
        )
    return need
