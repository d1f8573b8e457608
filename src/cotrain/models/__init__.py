"""Models cotrain trains and serves: a small GPT, Hugging Face causal LMs, one interface.

``build_model(ModelConfig)`` gives the ``TrainableLM`` a training run trains (GPT or any local
Hugging Face causal LM, optionally with LoRA); ``load_model(spec)`` gives the ``CausalLM`` that
inference and proof checking run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cotrain.models.errors import ModelError, ModelNotFoundError, ModelSpecError
    from cotrain.models.gpt import GPT, GPTConfig, GPTOutput, KVCache
    from cotrain.models.lm import GPTLM, HFLM, CausalLM
    from cotrain.models.registry import load_model
    from cotrain.models.tokenizer import ByteTokenizer
    from cotrain.models.train import LoraConfig, ModelConfig, TrainableLM, build_model

# Loaded on first use: ``cotrain.models.hf``'s file lookups (the orchestrator's tokenizer) must
# not pull in torch through this package.
_WHERE = {
    "ModelError": "cotrain.models.errors",
    "ModelNotFoundError": "cotrain.models.errors",
    "ModelSpecError": "cotrain.models.errors",
    "GPT": "cotrain.models.gpt",
    "GPTConfig": "cotrain.models.gpt",
    "GPTOutput": "cotrain.models.gpt",
    "KVCache": "cotrain.models.gpt",
    "GPTLM": "cotrain.models.lm",
    "HFLM": "cotrain.models.lm",
    "CausalLM": "cotrain.models.lm",
    "load_model": "cotrain.models.registry",
    "ByteTokenizer": "cotrain.models.tokenizer",
    "LoraConfig": "cotrain.models.train",
    "ModelConfig": "cotrain.models.train",
    "TrainableLM": "cotrain.models.train",
    "build_model": "cotrain.models.train",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "GPT",
    "GPTLM",
    "HFLM",
    "ByteTokenizer",
    "CausalLM",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "LoraConfig",
    "ModelConfig",
    "ModelError",
    "ModelNotFoundError",
    "ModelSpecError",
    "TrainableLM",
    "build_model",
    "load_model",
]
