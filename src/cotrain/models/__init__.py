"""Models cotrain trains and serves: a small GPT, Hugging Face causal LMs, one interface.

``build_model(ModelConfig)`` gives the ``TrainableLM`` a training run trains (GPT or any local
Hugging Face causal LM, optionally with LoRA); ``load_model(spec)`` gives the ``CausalLM`` that
inference and proof checking run.
"""

from cotrain.models.errors import ModelError, ModelNotFoundError, ModelSpecError
from cotrain.models.gpt import GPT, GPTConfig, GPTOutput, KVCache
from cotrain.models.lm import GPTLM, HFLM, CausalLM
from cotrain.models.registry import load_model
from cotrain.models.tokenizer import ByteTokenizer
from cotrain.models.train import LoraConfig, ModelConfig, TrainableLM, build_model

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
