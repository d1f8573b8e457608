"""Clocks and deadlines, injectable so heartbeats, leases and retries test without sleeps."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from cotrain.core.errors import TimeoutExpired


class Clock(Protocol):
    def monotonic(self) -> float: ...


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = MonotonicClock()


@dataclass(frozen=True)
class Deadline:
    """An absolute point on a clock; ``remaining()`` never goes below zero."""

    at: float
    clock: Clock = SYSTEM_CLOCK

    @classmethod
    def after(cls, seconds: float, clock: Clock = SYSTEM_CLOCK) -> Deadline:
        return cls(clock.monotonic() + seconds, clock)

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock.monotonic())

    def expired(self) -> bool:
        return self.clock.monotonic() >= self.at

    def check(self, what: str) -> float:
        """Return the time left, or raise ``TimeoutExpired`` naming ``what`` we waited for."""
        left = self.remaining()
        if left <= 0.0:
            raise TimeoutExpired(f"timed out waiting for {what}")
        return left
