"""Fault injection shipped with the library: kill, stall or cut this peer at a given collective.

Used by cotrain's own tests and demo; available to anyone who wants to see their training loop
survive. ``at_collective`` counts this communicator's all-reduces from 0; ``after_chunks`` fires
mid-transfer once that many chunks have left on the first stream (0 = before the transfer).

* ``kill``  — SIGKILL ourselves: sockets close, neighbours see it at once.
* ``stall`` — SIGSTOP ourselves: sockets stay open and silent; only heartbeats can tell.
* ``cut``   — the process runs on but goes silent, as if its link were cut: no heartbeats, no
  data; its own collective fails after ``stall_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Literal

from pydantic import Field

from cotrain.core.config import ConfigModel


class Fault(ConfigModel):
    kind: Literal["kill", "stall", "cut"]
    """What happens to this peer."""
    at_collective: int = Field(ge=0)
    """Index of the all-reduce (0-based, counted by this communicator) where it happens."""
    after_chunks: int = Field(default=1, ge=0)
    """Chunks sent on stream 0 before it happens (0 = as the collective starts)."""


class FaultPlan(ConfigModel):
    faults: list[Fault] = Field(default_factory=list)
    """Faults to inject, in any order."""


class FaultInjector:
    """Evaluated by the communicator at the start of, and during, each collective."""

    def __init__(self, plan: FaultPlan | None) -> None:
        self.plan = plan or FaultPlan()
        self.cut = threading.Event()

    def _due(self, index: int, chunks: int) -> Fault | None:
        for f in self.plan.faults:
            if f.at_collective == index and f.after_chunks == chunks:
                return f
        return None

    def check(self, index: int, chunks: int) -> None:
        fault = self._due(index, chunks)
        if fault is None:
            return
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "stall":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            self.cut.set()
