"""Process drivers: ``cotrain launch`` (a master and N workers from one terminal) and the
helpers that start cotrain's roles as real processes for the demos, tests and benchmarks.

The public surface::

    LaunchConfig, Launch, Target, LaunchError, Proc, start_master, start_peer, start_worker
"""

from cotrain.launch.config import LaunchConfig
from cotrain.launch.procs import Proc, start_master, start_peer, start_worker
from cotrain.launch.runner import Launch, LaunchError, Target

__all__ = [
    "Launch",
    "LaunchConfig",
    "LaunchError",
    "Proc",
    "Target",
    "start_master",
    "start_peer",
    "start_worker",
]
