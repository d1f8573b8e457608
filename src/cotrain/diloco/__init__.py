"""Low-communication training: DiLoCo (and the DDP and single-worker baselines) over comm.

The public surface::

    TrainConfig, AlgoConfig, InnerConfig, OuterConfig, OuterState, Worker, train, and the errors.
"""

from cotrain.diloco.config import AlgoConfig, InnerConfig, OuterConfig, TrainConfig
from cotrain.diloco.errors import CheckpointError, RoundFailedError, TrainError
from cotrain.diloco.outer import OuterState
from cotrain.diloco.worker import Worker


def train(config: TrainConfig) -> dict[str, object]:
    """Run one worker to the end; returns its summary (steps, tokens, bytes)."""
    return Worker(config).run()


__all__ = [
    "AlgoConfig",
    "CheckpointError",
    "InnerConfig",
    "OuterConfig",
    "OuterState",
    "RoundFailedError",
    "TrainConfig",
    "TrainError",
    "Worker",
    "train",
]
