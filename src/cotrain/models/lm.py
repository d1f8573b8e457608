"""One small interface over the causal LMs cotrain runs: its own GPT and Hugging Face models.

``CausalLM`` is what generation, proof capture and validation need: encode a prompt, generate
from a batch of prompts with the KV cache, recompute the last hidden states of whole sequences
in one prefill, and the module whose output *is* the last hidden state (for hooks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from cotrain.models.gpt import GPT
from cotrain.models.tokenizer import ByteTokenizer


class CausalLM(ABC):
    """A causal LM with a tokenizer, behind the few calls that inference and checking need."""

    model_id: str
    """The name rollouts record (``smollm2-135m-instruct``, ``gpt-debug-seed0``, a path)."""
    module: nn.Module
    """The underlying torch module."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The module whose output is the (B, T, H) last hidden state."""

    @property
    @abstractmethod
    def eos_token_id(self) -> int | None:
        """Token that ends an output, if any."""

    @property
    def left_padding(self) -> bool:
        """Whether ``generate`` accepts prompts of different lengths in one batch."""
        return True

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids must be below this."""

    @property
    @abstractmethod
    def max_seq_len(self) -> int:
        """Longest sequence (prompt plus output) the model accepts."""

    @abstractmethod
    def encode_prompt(self, text: str) -> list[int]:
        """A user message -> prompt token ids (with the chat template where the model has one)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Token ids -> text."""

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        """Sample continuations with the KV cache; (B, max_new_tokens) new ids.

        Rows that emit EOS are padded with EOS afterwards; EOS is suppressed before
        ``min_new_tokens`` tokens.
        """

    @abstractmethod
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids and mask -> (B, T, H) last hidden states, one prefill."""

    def to_dtype(self, dtype: torch.dtype) -> CausalLM:
        """Cast the weights in place; returns self."""
        self.module.to(dtype)
        return self


class GPTLM(CausalLM):
    """cotrain's GPT with the byte tokenizer."""

    def __init__(self, model: GPT, model_id: str | None = None):
        self.module = model.eval()
        self.gpt = model
        c = model.config
        self.model_id = model_id or f"gpt-{c.size}-seed{c.seed}"
        self.tokenizer = ByteTokenizer()

    @property
    def final_norm(self) -> nn.Module:
        return self.gpt.transformer.ln_f

    @property
    def eos_token_id(self) -> int | None:
        return None

    @property
    def left_padding(self) -> bool:
        return False  # absolute position embeddings: batches must share a prompt length

    @property
    def vocab_size(self) -> int:
        return self.gpt.config.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.gpt.config.block_size

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("GPT generation needs prompts of one length per batch")
        idx = torch.tensor(prompts, dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        out = self.gpt.generate(idx, max_new_tokens, temperature=temperature, generator=gen)
        return out[:, idx.size(1) :]

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Causal attention: right padding cannot reach the real positions before it.
        return self.gpt.hidden_states(input_ids)


class HFLM(CausalLM):
    """A Hugging Face causal LM (Llama-style: ``model.model.norm`` is the final norm)."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str):
        self.module = model.eval()
        self.hf = model
        self.tokenizer = tokenizer
        self.model_id = model_id

    @property
    def final_norm(self) -> nn.Module:
        base = self.hf.get_decoder()
        for name in ("norm", "final_layer_norm", "ln_f"):
            if isinstance(getattr(base, name, None), nn.Module):
                return getattr(base, name)
        raise AttributeError(f"{type(self.hf).__name__}: no final norm found in its decoder")

    @property
    def max_seq_len(self) -> int:
        return int(getattr(self.hf.config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_input_embeddings().num_embeddings)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else None

    def encode_prompt(self, text: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if not isinstance(ids, list):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        min_new_tokens: int = 0,
    ) -> torch.Tensor:
        pad = self.eos_token_id if self.eos_token_id is not None else 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last token lines up
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        torch.manual_seed(seed)  # HF sampling draws from the global generator
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        out = self.hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=pad,
            **sampling,
        )
        new = out[:, width:]  # (B, <= max_new_tokens): stops early when every row hit EOS
        if new.size(1) < max_new_tokens:
            new = torch.cat(
                [new, new.new_full((new.size(0), max_new_tokens - new.size(1)), pad)], 1
            )
        return new

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = self.hf.get_decoder()  # skips the LM head: logits are not needed
        return base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
