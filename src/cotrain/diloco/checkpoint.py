"""Checkpoints: one file per worker, written atomically (temporary file, fsync, rename).

A checkpoint is taken right after an outer step, when the local parameters equal the outer ones,
so it holds the outer state, the inner optimizer, the data position and the step counters. A
worker killed at any moment loses at most the outer step in progress.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cotrain.diloco.errors import CheckpointError


def save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, *, fingerprint: str | None) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none; errors if it is for another run
    (``fingerprint`` None: any run's, for a warm start)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a torn or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}; delete it to start over") from e
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with another model, data or mode; "
            "use another out_dir or resume=never"
        )
    return state
