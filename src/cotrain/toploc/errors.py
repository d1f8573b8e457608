"""Errors of ``cotrain.toploc``::

    CotrainError
    └── ToplocError                         a proof could not be built, read or checked
        ├── ProofBuildError                 hidden states unusable for a proof (NaN, too narrow)
        ├── ProofFormatError (ValueError)   proof bytes truncated, garbage, or for other shapes
        └── RecordError (ValueError)        a rollout record line is malformed

A proof that reads fine but does not match the recomputed hidden states is not an error: it is
a failed verdict (``ProofVerdict.passed`` is False).
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError


class ToplocError(CotrainError):
    """A proof could not be built, read or checked."""


class ProofBuildError(ToplocError):
    """The hidden states cannot be committed to (non-finite values, fewer than k entries)."""


class ProofFormatError(ToplocError, ValueError):
    """Proof bytes are truncated, corrupt, or do not fit the sequence they claim to cover."""


class RecordError(ToplocError, ValueError):
    """A rollout record is malformed (bad JSON, missing or mistyped fields)."""
