"""An optimizer's state as flat tensors (for a safetensors file) and JSON (its scalars and
hyperparameters), and back: what the DiLoCo and RL checkpoints save of AdamW."""

from __future__ import annotations

from typing import Any

import torch


def optimizer_parts(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``({"state.<param>.<key>": tensor}, {"scalars": ..., "param_groups": ...})`` of
    ``optimizer``'s state dict (the tensors are its own, not copies)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"scalars": scalars, "param_groups": groups}


def optimizer_state_dict(flat: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    """The state dict that ``optimizer_parts`` split into ``flat`` and ``saved``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in saved["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": saved["param_groups"]}
