"""A node that poisons its DiLoCo contributions: ``python forger.py <cotrain node args>``.

It runs the real ``cotrain node`` but, at each sync point, replaces its pseudo-gradient with
``-3x`` itself (gradient ascent, a classic poisoning attack) before the run averages it and
before it is recorded as work, and still claims the tokens. Validators must hard-reject it.
"""

from __future__ import annotations

import sys

import torch

from cotrain.cli import main
from cotrain.protocol import node

_honest = node.Agent.contribute


def _forged(self: node.Agent, step: int, delta: torch.Tensor, tokens: int) -> None:
    delta.mul_(-3.0)  # in place: this is what the run averages too
    _honest(self, step, delta, tokens)


node.Agent.contribute = _forged  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv = ["cotrain", "node", *sys.argv[1:]]
    main()
