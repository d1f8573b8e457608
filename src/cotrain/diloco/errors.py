"""Errors raised by DiLoCo training.

::

    CotrainError
    └── TrainError                     anything the trainer raises on purpose
        ├── CheckpointError (UsageError)  a checkpoint cannot be read or does not fit this run
        │   └── ConfigChangedError     resuming with a changed config (names the difference)
        ├── ConfigMismatchError (UsageError)  a worker's settings differ from the run's
        ├── RoundFailedError           an outer step (or DDP step) kept failing after its retries
        └── RunEndedError (UsageError) joining a run that has no worker left to learn from
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError, UsageError


class TrainError(CotrainError):
    """Base class of the trainer's errors."""


class CheckpointError(TrainError, UsageError):
    """A checkpoint is unreadable or was written by a different run configuration."""


class ConfigChangedError(CheckpointError):
    """The checkpoint (or the output directory) belongs to a run with another config."""


class RoundFailedError(TrainError):
    """A synchronisation kept failing (peers dying faster than retries could recover)."""


class RunEndedError(TrainError, UsageError):
    """A worker joined a run in progress, but no other worker is left to receive its state from."""


class ConfigMismatchError(TrainError, UsageError):
    """This worker's DiLoCo settings (or run config) differ from the other workers'."""
