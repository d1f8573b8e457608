"""Thresholds and sizes of toploc proofs, with the calibration behind the defaults.

Calibrated by ``bench/toploc.py`` on SmolLM2-135M-Instruct and the tiny GPT (see README, toploc):
honest recomputations (other batch size and padding, thread count, KV cache vs prefill, fp32 vs
bf16) and cheats (other models, changed prompt or output, int8 weights, foreign proofs) fall far
apart, and these defaults sit between them with a margin on both sides.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from cotrain.core.config import ConfigModel


class ProofConfig(ConfigModel):
    """How proofs are cut and when a chunk passes."""

    chunk_tokens: int = 32
    """Decoded tokens committed to by one chunk proof (the prompt is one more chunk)."""
    topk: int = 128
    """Entries (largest magnitude) of a chunk's hidden states that a proof commits to."""
    min_exp_matches: int = 90
    """A chunk passes only if at least this many of the top-k sign+exponent bits match."""
    max_mant_err_mean: float = 10.0
    """... and the mean bf16 mantissa error (in ulps, over matched entries) is at most this ..."""
    max_mant_err_median: float = 8.0
    """... and the median bf16 mantissa error is at most this."""

    @model_validator(mode="after")
    def _check(self) -> ProofConfig:
        if not 1 <= self.topk <= 32767:
            raise ValueError(f"topk={self.topk} must be in [1, 32767]")
        if not 0 <= self.min_exp_matches <= self.topk:
            raise ValueError(f"min_exp_matches={self.min_exp_matches} must be in [0, topk]")
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        return self


class ValidatorConfig(ConfigModel):
    """How a validator recomputes hidden states."""

    proof: ProofConfig = ProofConfig()
    """Proof sizes and thresholds; must match what the workers used."""
    batch_size: int = 8
    """Rollouts recomputed together in one padded prefill."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the recomputation."""
    num_threads: int = 0
    """torch threads for the recomputation; 0 keeps torch's default."""
