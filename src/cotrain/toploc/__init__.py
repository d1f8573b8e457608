"""TOPLOC-style proofs that an inference worker ran the agreed model on the agreed input.

Workers commit, per chunk of hidden states, to the top-k entries as a polynomial over a prime
field (``proof``, ``field``), captured by hooks while generating (``capture``); validators
recompute the hidden states in one batched prefill and compare (``validate``). Rollouts travel
as JSONL records (``record``).
"""

from cotrain.toploc.capture import GenerationResult, generate_with_proofs
from cotrain.toploc.config import ProofConfig, ValidatorConfig
from cotrain.toploc.errors import ProofBuildError, ProofFormatError, RecordError, ToplocError
from cotrain.toploc.proof import ChunkResult, ProofVerdict, build_proofs, verify_proofs
from cotrain.toploc.record import Rollout, read_rollouts, write_rollouts
from cotrain.toploc.validate import RolloutVerdict, ValidationReport, Validator

__all__ = [
    "ChunkResult",
    "GenerationResult",
    "ProofBuildError",
    "ProofConfig",
    "ProofFormatError",
    "ProofVerdict",
    "RecordError",
    "Rollout",
    "RolloutVerdict",
    "ToplocError",
    "ValidationReport",
    "Validator",
    "ValidatorConfig",
    "build_proofs",
    "generate_with_proofs",
    "read_rollouts",
    "verify_proofs",
    "write_rollouts",
]
