"""Models cotrain trains and serves: a small GPT, Hugging Face causal LMs, one interface."""

from cotrain.models.errors import ModelError, ModelNotFoundError, ModelSpecError
from cotrain.models.gpt import GPT, GPTConfig, GPTOutput, KVCache
from cotrain.models.lm import GPTLM, HFLM, CausalLM
from cotrain.models.registry import load_model
from cotrain.models.tokenizer import ByteTokenizer

__all__ = [
    "GPT",
    "GPTLM",
    "HFLM",
    "ByteTokenizer",
    "CausalLM",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "ModelError",
    "ModelNotFoundError",
    "ModelSpecError",
    "load_model",
]
