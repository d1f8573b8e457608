"""Streaming DiLoCo's schedule: which slice of the flat parameters is synced at which step.

The parameters (flattened in order, N values) are cut into F contiguous fragments of whole
tensors with about N / F values each. With H inner steps per outer step, a *sync point* comes
every S = H / F inner steps and sync point k carries fragment k mod F::

    steps     0 ........ S ........ 2S ....... 3S = H ... 4S ...
    F = 3            sync 0:f0   sync 1:f1   sync 2:f2   sync 3:f0 ...

so each fragment is still synced every H steps, but only 1/F of the model travels at a time
(peak bandwidth down by F). With F = 1 this is plain DiLoCo: one sync of everything every H.

The run ends at step R x H (R outer steps); then the fragments other than the last are synced
once more with no inner steps in between, so that every fragment's last local progress reaches
the outer params and the run ends with one consensus model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Fragment:
    index: int
    start: int
    """First index in the flat (N,) parameter vector."""
    stop: int
    """One past the last index."""
    params: tuple[int, ...]
    """Indices of the parameter tensors it holds."""

    @property
    def numel(self) -> int:
        return self.stop - self.start


def split(params: list[nn.Parameter], count: int) -> list[Fragment]:
    """``count`` contiguous fragments of whole tensors, each about N / count values."""
    if count > len(params):
        raise ValueError(
            f"algo.fragments={count} exceeds the model's {len(params)} parameter tensors: "
            "lower algo.fragments"
        )
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    bounds, acc = [0], 0
    for i, n in enumerate(sizes):
        acc += n
        closes = count - len(bounds)  # boundaries still to place
        left = len(sizes) - (i + 1)  # tensors after this one
        # close the fragment at its share of N, or when the tensors left are just enough
        if closes > 0 and (acc >= total * len(bounds) / count or left == closes):
            bounds.append(i + 1)
    bounds.append(len(sizes))
    out, start = [], 0
    for f in range(count):
        idx = tuple(range(bounds[f], bounds[f + 1]))
        stop = start + sum(sizes[i] for i in idx)
        out.append(Fragment(f, start, stop, idx))
        start = stop
    assert start == total and all(fr.params for fr in out)
    return out


@dataclass(frozen=True)
class Schedule:
    """Sync points of a run of ``rounds`` outer steps of ``inner_steps``, in ``fragments``."""

    inner_steps: int
    fragments: int
    rounds: int
    stop: int | None = None
    """The run's last inner step when it is not a multiple of ``inner_steps`` (the last
    phase is then shorter); default ``rounds x inner_steps``."""

    @property
    def every(self) -> int:
        """S: inner steps between two sync points."""
        return self.inner_steps // self.fragments

    @property
    def total_steps(self) -> int:
        return self.stop if self.stop is not None else self.rounds * self.inner_steps

    @property
    def sync_points(self) -> int:
        """R x F regular sync points, then F - 1 final ones without inner steps."""
        return self.rounds * self.fragments + self.fragments - 1

    def fragment(self, k: int) -> int:
        """The fragment carried by sync point ``k``."""
        return k % self.fragments

    def end_step(self, k: int) -> int:
        """The inner step at which sync point ``k`` happens (steps before it are trained)."""
        return min((k + 1) * self.every, self.total_steps)

    def start_step(self, k: int) -> int:
        return self.end_step(k - 1) if k > 0 else 0

    @classmethod
    def for_run(cls, *, total_steps: int, inner_steps: int, fragments: int) -> Schedule:
        return cls(inner_steps, fragments, math.ceil(total_steps / inner_steps))
