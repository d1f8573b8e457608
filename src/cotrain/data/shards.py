"""Deterministic, disjoint training shards and a fixed validation set.

The training tokens are cut into ``num_shards`` contiguous, disjoint slices; worker ``i`` reads
slice ``i mod num_shards``. Batch ``k`` of a shard is a pure function of (seed, shard, k): random
windows drawn by a generator seeded with those three numbers, so the position in the data is one
integer (``position``), saved with checkpoints, and a resumed or restarted worker continues with
exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cotrain.data.config import DataConfig
from cotrain.data.errors import DataError
from cotrain.data.prepare import Prepared


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    """(B, T) int64 token ids."""
    targets: torch.Tensor
    """(B, T) int64 next-token ids."""

    @property
    def tokens(self) -> int:
        return self.inputs.numel()


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T + 1)
    rows = torch.from_numpy(tokens[idx].astype(np.int64))
    return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


class ShardReader:
    """The batches of one worker's shard; ``position`` counts batches already taken."""

    def __init__(self, data: Prepared, cfg: DataConfig, *, worker_index: int, position: int = 0):
        train = data.train()
        self.shard = worker_index % cfg.num_shards
        size = len(train) // cfg.num_shards
        if size < cfg.seq_len + 2:
            raise DataError(
                f"a shard holds {size} tokens, fewer than seq_len={cfg.seq_len}: lower "
                "data.num_shards or data.seq_len"
            )
        self.tokens = train[self.shard * size : (self.shard + 1) * size]  # (size,)
        self.cfg = cfg
        self.position = position

    def batch_at(self, k: int) -> Batch:
        rng = np.random.default_rng([self.cfg.seed, self.shard, k])
        starts = rng.integers(0, len(self.tokens) - self.cfg.seq_len - 1, self.cfg.batch_size)
        return _windows(self.tokens, starts, self.cfg.seq_len)

    def next(self) -> Batch:
        b = self.batch_at(self.position)
        self.position += 1
        return b


def validation_batches(data: Prepared, cfg: DataConfig) -> list[Batch]:
    """The fixed validation set: ``val_batches`` batches of evenly spaced windows."""
    val = data.val()
    n = cfg.val_batches * cfg.batch_size
    if len(val) < cfg.seq_len + 2:
        raise DataError("the validation split is shorter than one sequence: raise val_fraction")
    starts = np.linspace(0, len(val) - cfg.seq_len - 1, n).astype(np.int64)
    return [
        _windows(val, starts[i : i + cfg.batch_size], cfg.seq_len)
        for i in range(0, n, cfg.batch_size)
    ]
