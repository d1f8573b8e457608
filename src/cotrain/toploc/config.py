"""Sizes and thresholds of toploc proofs, with the calibration behind the defaults.

Calibrated by ``bench/toploc.py`` on SmolLM2-135M-Instruct and the tiny GPT (figures in the
README's toploc section). Honest recomputations (other batch size and padding, thread count, KV
cache vs prefill) agree to ~1e-6; an fp32 vs bf16 recompute moves SmolLM2's committed values by a
median 0.7% (at most ~17% for single entries); a changed token replaces its row (median ~30-40%
off, half of the top entries move); int8 weights move the median to ~1.3%.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from cotrain.core.config import ConfigModel


class ProofConfig(ConfigModel):
    """How proofs are cut and when they pass."""

    chunk_tokens: int = 32
    """Positions committed to by one chunk proof (the last chunk of a rollout may be shorter)."""
    topk: int = 128
    """Entries per chunk proof, spread evenly over its positions (4 per position at 32)."""
    row_slack: int = 4
    """The validator looks for a position's committed entries among its top (quota + slack)."""
    match_rel_tol: float = 0.25
    """A committed value matches if within this relative distance of the recomputed one."""
    max_row_misses: int = 1
    """A chunk fails if any position has more committed entries than this unmatched."""
    max_chunk_misses: int = 8
    """... or if more than this many of its ``topk`` entries are unmatched."""
    max_median_rel_err: float = 0.01
    """A rollout fails if the median relative error of its matched entries exceeds this."""

    @model_validator(mode="after")
    def _check(self) -> ProofConfig:
        if not 1 <= self.topk <= 32767:
            raise ValueError(f"topk={self.topk} must be in [1, 32767]")
        if not 1 <= self.chunk_tokens <= self.topk:
            raise ValueError(
                f"chunk_tokens={self.chunk_tokens} must be in [1, topk={self.topk}]: "
                "every position needs at least one committed entry"
            )
        if self.row_slack < 0 or self.max_row_misses < 0 or self.max_chunk_misses < 0:
            raise ValueError("row_slack, max_row_misses and max_chunk_misses must be >= 0")
        if not 0 < self.match_rel_tol < 1:
            raise ValueError("match_rel_tol must be in (0, 1)")
        return self


class ValidatorConfig(ConfigModel):
    """How a validator recomputes hidden states."""

    proof: ProofConfig = ProofConfig()
    """Proof sizes and thresholds; sizes must match what the workers used."""
    batch_size: int = 8
    """Rollouts recomputed together in one padded prefill."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the recomputation."""
    num_threads: int = 0
    """torch threads for the recomputation; 0 keeps torch's default."""
