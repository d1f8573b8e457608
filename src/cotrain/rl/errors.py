"""Errors of ``cotrain.rl``::

CotrainError
├── UsageError
│   ├── EnvError                 an environment is unknown, not installed, or fails its self-test
│   └── MemoryError_             (policy) the machine cannot hold a role
├── WireError (ValueError)       a message is malformed, out of bounds or forged
└── RLError                      a run cannot go on
    ├── RunAbortedError          too many batches in a row without signal (or aborted by the
    │                            orchestrator): the message says what to check
    └── OrchestratorUnreachable  no answer from the orchestrator within the deadline
"""

from __future__ import annotations

from cotrain.core.errors import CotrainError


class RLError(CotrainError):
    """An RL run cannot go on."""


class RunAbortedError(RLError):
    """The run was aborted (no learning signal for too long); the message says why."""


class OrchestratorUnreachable(RLError):
    """The orchestrator did not answer within the deadline."""
