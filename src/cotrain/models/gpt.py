"""A small decoder-only transformer in the style of nanoGPT, with KV-cache generation.

Positions enter through rotary embeddings on queries and keys (as in nanochat and Llama), so the
residual stream carries only token content.

``GPT(GPTConfig.named("debug"))`` trains in seconds on a CPU; ``"10m"`` is a ~10M-parameter
model. Weights are initialised from ``config.seed`` so two processes that build the same config
hold bit-identical parameters (training and proof checks both rely on this).

Shapes: B batch, T time, C = n_embd channels, nh heads, hs = C // nh head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from cotrain.core.config import ConfigModel

GPTSize = Literal["debug", "10m", "custom"]

# Named sizes; "custom" takes the fields as given.
_SIZES: dict[str, dict[str, int]] = {
    "debug": {"n_layer": 2, "n_head": 4, "n_embd": 256, "block_size": 512},
    "10m": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 512},
}


class GPTConfig(ConfigModel):
    """Sizes of the GPT. ``size`` fills ``n_layer``/``n_head``/``n_embd``/``block_size``."""

    size: GPTSize = "debug"
    """Named size: "debug" (2 layers, 256 wide, ~1.7M params) or "10m" (6 x 384, ~10.8M)."""
    vocab_size: int = 256
    """Vocabulary size; 256 means raw bytes (see ``cotrain.models.ByteTokenizer``)."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 256
    """Width of the residual stream."""
    block_size: int = 512
    """Longest sequence (prompt plus output), in tokens."""
    dropout: float = 0.0
    """Dropout probability during training (0 in generation and validation)."""
    seed: int = 0
    """Seed of the weight initialisation."""

    @classmethod
    def named(cls, size: str, **overrides: Any) -> GPTConfig:
        """The config of a named size, with any field overridden."""
        if size not in _SIZES:
            raise ValueError(f"unknown GPT size {size!r}; choose one of {sorted(_SIZES)}")
        return cls.model_validate({"size": size, **overrides})

    @model_validator(mode="before")
    @classmethod
    def _fill_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("size", "debug") in _SIZES:
            return {**_SIZES[data.get("size", "debug")], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        return self


@dataclass
class GPTOutput:
    """What ``GPT.forward`` returns."""

    logits: torch.Tensor
    """(B, T, V) next-token logits."""
    loss: torch.Tensor | None
    """Mean cross-entropy against ``targets`` when they were given."""


class KVCache:
    """Keys and values of every layer for a batch being generated; grows one step at a time."""

    def __init__(self, config: GPTConfig, batch: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.pos = 0
        """Tokens already stored (the position of the next token)."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store (B, nh, T, hs) keys/values at the current position; return all stored so far."""
        t = k.size(2)
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def rotary_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency): two (block_size, hs / 2) tables."""
    hs = config.n_embd // config.n_head
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))  # (hs/2,)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., hs) queries or keys by their positions' angles (cos, sin broadcastable to
    (..., hs / 2)): (B, T, nh, hs) with (T, 1, hs / 2) tables in the attention below."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if (config.n_embd // config.n_head) % 2:
            raise ValueError("head size n_embd / n_head must be even for rotary embeddings")
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, layer: int, cache: KVCache | None, rope: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
        # rotate before the transpose: the elementwise work then runs along contiguous heads
        cos, sin = (r[:, None, :] for r in rope)  # (T, 1, hs/2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, T, nh, hs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None and cache.pos > 0:
            # Decoding T new tokens after cache.pos stored ones: each new token sees all stored
            # tokens and the new ones before it.
            k, v = cache.append(layer, k, v)  # (B, nh, pos + T, hs)
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            if cache is not None:
                cache.append(layer, k, v)
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, layer: int, cache: KVCache | None, rope: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, cache, rope)
        return x + self.mlp(self.ln_2(x))


class Trunk(nn.Module):
    """Embedding, blocks and final norm (named as in nanoGPT, so checkpoints keep their keys)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)


class GPT(nn.Module):
    """Decoder-only transformer; ``transformer.ln_f`` outputs the last hidden states."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Trunk(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        cos, sin = rotary_tables(config)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(config.seed)

    def reset_parameters(self, seed: int) -> None:
        """GPT-2 init from ``seed``: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif "ln_" in name:
                    p.fill_(1.0)
                else:
                    std = 0.02
                    if name.endswith("c_proj.weight"):
                        std = 0.02 / math.sqrt(2 * self.config.n_layer)
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def num_params(self) -> int:
        """Parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) last hidden states (after ``ln_f``)."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}"
            )
        rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])  # (T, hs/2)
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, cache, rope)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> GPTOutput:
        """(B, T) ids -> logits (B, T, V), and the loss against (B, T) ``targets`` if given.

        Targets equal to -100 are ignored (padding).
        """
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
            )
        return GPTOutput(logits=logits, loss=loss)

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``block_size`` tokens."""
        p = next(self.parameters())
        return KVCache(self.config, batch, p.dtype, p.device)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
    ) -> torch.Tensor:
        """Continue (B, T) prompts of equal length by ``max_new_tokens`` using the KV cache.

        ``temperature`` 0 means greedy. Rows that emitted ``stop_token`` keep emitting it.
        Returns (B, T + max_new_tokens).
        """
        if idx.size(1) + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt {idx.size(1)} + {max_new_tokens} new tokens exceeds "
                f"block_size={self.config.block_size}"
            )
        cache = self.new_cache(idx.size(0))
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        step_input, out = idx, [idx]
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache).logits[:, -1, :].float()  # (B, V)
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done |= nxt == stop_token
            out.append(nxt[:, None])
            step_input = nxt[:, None]
        return torch.cat(out, dim=1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) sampled token ids; temperature 0 is argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
