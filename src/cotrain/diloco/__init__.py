"""Low-communication training over comm: the ``DiLoCo`` and ``DDP`` libraries around a user's
own model, optimizer and loop, and ``cotrain train`` (``Worker``), a thin program on top.

The public surface::

    DiLoCo, DDP, SyncReport, TrainConfig, AlgoConfig, InnerConfig, OuterConfig, OuterState,
    Worker, train, and the errors.
"""

from cotrain.diloco.config import AlgoConfig, InnerConfig, OuterConfig, TrainConfig
from cotrain.diloco.ddp import DDP
from cotrain.diloco.diloco import DiLoCo, SyncReport
from cotrain.diloco.errors import (
    CheckpointError,
    ConfigChangedError,
    ConfigMismatchError,
    RoundFailedError,
    RunEndedError,
    TrainError,
)
from cotrain.diloco.outer import OuterState


def train(config: TrainConfig) -> dict[str, object]:
    """Run one worker to the end; returns its summary (steps, tokens, bytes)."""
    from cotrain.diloco.worker import Worker

    return Worker(config).run()


def __getattr__(name: str) -> object:
    if name == "Worker":  # the trainer imports models and data: only when asked for
        from cotrain.diloco.worker import Worker

        return Worker
    raise AttributeError(name)


__all__ = [
    "DDP",
    "AlgoConfig",
    "CheckpointError",
    "ConfigChangedError",
    "ConfigMismatchError",
    "DiLoCo",
    "InnerConfig",
    "OuterConfig",
    "OuterState",
    "RoundFailedError",
    "RunEndedError",
    "SyncReport",
    "TrainConfig",
    "TrainError",
    "Worker",
    "train",
]
