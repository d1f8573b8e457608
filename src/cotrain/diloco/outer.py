"""The outer state of DiLoCo: fp32 outer parameters, outer momentum and the outer step.

All three live in flat tensors so they can be handed to ``Communicator.sync_shared_state`` as
they are (it hashes them, and a peer that differs fetches them in place). Because the averaged
pseudo-gradient is bit-identical on every peer (comm's owner-quantized ring) and the update below
is elementwise (no reduction whose order could depend on threads), every replica that enters an
outer step with the same state leaves it with the same state, bit for bit.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from cotrain.diloco.config import OuterConfig


def flatten(params: list[nn.Parameter]) -> torch.Tensor:
    """(N,) fp32 copy of the parameters, in order, on the CPU (where the outer state and the
    wire buffers live, whatever device the model trains on)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in params])


def load_flat(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Copy a (N,) vector into the parameters (cast to their dtype)."""
    i = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[i : i + n].view_as(p))
            i += n
    assert i == flat.numel()


class OuterState:
    """Outer params (N,) fp32, momentum (N,) fp32 and step (1,) int64, updated in place."""

    def __init__(self, params: list[nn.Parameter], config: OuterConfig) -> None:
        self.config = config
        self.params = flatten(params)  # (N,)
        self.momentum = torch.zeros_like(self.params)  # (N,)
        self.step = torch.zeros(1, dtype=torch.int64)

    @property
    def numel(self) -> int:
        return self.params.numel()

    def shared(self) -> dict[str, torch.Tensor]:
        """The tensors every replica must agree on (for ``sync_shared_state``)."""
        return {
            "outer.params": self.params,
            "outer.momentum": self.momentum,
            "outer.step": self.step,
        }

    def pseudo_gradient(self, params: list[nn.Parameter], out: torch.Tensor) -> torch.Tensor:
        """``out`` = outer params - local params: the direction the local steps moved, negated."""
        torch.sub(self.params, flatten(params), out=out)
        return out

    def apply(self, grad: torch.Tensor, *, start: int = 0) -> torch.Tensor:
        """One outer SGD step on ``params[start : start + len(grad)]`` (a fragment; all of them
        by default) with the averaged pseudo-gradient ``grad`` (n,); returns the change of
        those params (n,), new - old. Counts one outer step (one sync point)."""
        cfg = self.config
        stop = start + grad.numel()
        params, momentum = self.params[start:stop], self.momentum[start:stop]
        momentum.mul_(cfg.momentum).add_(grad)  # m = mu m + g
        if cfg.method == "nesterov":
            update = grad.add(momentum, alpha=cfg.momentum)  # g + mu m
        else:
            update = momentum.clone()
        before = params.clone()
        params.add_(update, alpha=-cfg.lr)
        self.step += 1
        return params - before

    def digest(self) -> str:
        """SHA-256 prefix of params, momentum and step: equal on every replica."""
        h = hashlib.sha256()
        for t in (self.params, self.momentum, self.step):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shared().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.shared().items():
            if state[k].shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(state[k].shape)} != {tuple(v.shape)}")
            v.copy_(state[k])
