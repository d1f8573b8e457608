"""Errors raised by DiLoCo training.

::

    CotrainError
    └── TrainError                     anything the trainer raises on purpose
        ├── CheckpointError            a checkpoint cannot be read or does not fit this run
        └── RoundFailedError           an outer step (or DDP step) kept failing after its retries
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError


class TrainError(CotrainError):
    """Base class of the trainer's errors."""


class CheckpointError(TrainError):
    """A checkpoint is unreadable or was written by a different run configuration."""


class RoundFailedError(TrainError):
    """A synchronisation kept failing (peers dying faster than retries could recover)."""
