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
    max_row_misses: int = 0
    """A chunk fails if any position has more committed entries than this unmatched (honest
    recomputes in the study never missed one; a changed token sometimes misses only one)."""
    max_chunk_misses: int = 8
    """... or if more than this many of its ``topk`` entries are unmatched."""
    max_median_rel_err: float | None = None
    """A rollout fails if the median relative error of its matched entries exceeds this; None
    takes the value calibrated for the validator's model (``calibrated_median_rel_err``)."""

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
        if self.max_median_rel_err is not None and self.max_median_rel_err <= 0:
            raise ValueError("max_median_rel_err must be positive (or unset for the calibrated)")
        if not 0 < self.match_rel_tol < 1:
            raise ValueError("match_rel_tol must be in (0, 1)")
        return self


# Calibrated by bench/toploc.py (README, toploc): honest bf16 recomputes vs int8 weights.
# SmolLM2-135M: honest rollouts' medians stay below ~0.008, int8 ones above ~0.011.
# Tiny GPT (2 layers): honest medians are 0 (most entries bit-exact), int8 ones >= 0.005.
CALIBRATED_MEDIAN_REL_ERR: dict[str, float] = {
    "smollm2-135m-instruct": 0.01,
    "gpt-debug": 0.0025,
}
DEFAULT_MEDIAN_REL_ERR = 0.01


def calibrated_median_rel_err(model_id: str) -> float:
    """The calibrated median threshold of a model (by spec prefix), else the default."""
    for prefix, value in CALIBRATED_MEDIAN_REL_ERR.items():
        if model_id.startswith(prefix):
            return value
    return DEFAULT_MEDIAN_REL_ERR


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

    @model_validator(mode="after")
    def _check(self) -> ValidatorConfig:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if self.num_threads < 0:
            raise ValueError(f"num_threads={self.num_threads} must be >= 0 (0: torch's default)")
        return self
