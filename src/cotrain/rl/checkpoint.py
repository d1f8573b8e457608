"""The trainer's checkpoints: the policy and AdamW's state, laid out as ``diloco.checkpoint``
lays out its own::

    latest               the name of the newest complete save; written last, atomically
    step-00000012/
        model.safetensors      the policy as ``weights_bytes`` lays it out (tied tensors once);
                               a hard link of the published version's file where possible
        optimizer.safetensors  AdamW's tensors (``state.<param>.<key>``), written one tensor at
                               a time (never the whole state as bytes in memory)
        state.json             step, AdamW's scalars and hyperparameters, the caller's extra
                               state, and the sha256 of every file above
    .tmp-<pid>-<hex>/    a save in progress (removed on any error; a dead process's by the
                         next save)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model

from cotrain.core.errors import CotrainError
from cotrain.core.files import commit_save, read_latest_save, remove_stale_saves, sha256_file
from cotrain.models.optim_state import optimizer_parts, optimizer_state_dict
from cotrain.rl.config import TrainerConfig
from cotrain.rl.heap import release_memory
from cotrain.rl.weights import write_safetensors, write_weights

STATE = "state.json"
LATEST = "latest"
_FORMAT = 1


class CheckpointError(CotrainError):
    """A trainer checkpoint that is unreadable, corrupt, or of another model."""


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint read from disk (hashes checked)."""

    path: Path
    step: int
    extra: dict[str, Any]
    model_sha256: str = ""
    """The sha256 of its ``model.safetensors`` (the weights now in the model)."""
    learner_steps: int = 0
    """The learner's step count when it was saved."""


def save_checkpoint(
    model: Any,
    optimizer: torch.optim.Optimizer,
    learner_steps: int,
    directory: str | Path,
    step: int,
    extra: dict[str, Any] | None = None,
    *,
    weights: bytes | str | os.PathLike[str] | None = None,
    weights_sha256: str | None = None,
) -> Path:
    """Write a complete checkpoint of ``step`` into ``directory`` and point ``latest`` at it;
    older saves are removed once it is in place. ``weights``: the model's weights as
    ``weights_bytes`` or ``write_weights`` made them, if the caller has them already (the
    version it publishes): bytes are written as they are, a file is hard-linked (copied where
    it cannot be), instead of serialising the model again; ``weights_sha256``: the file's hash
    if known. Nothing larger than one tensor is held in memory."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(root)
    tmp = root / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    name = f"step-{step:08d}"
    try:
        tmp.mkdir()
        model_file = tmp / "model.safetensors"
        if weights is None:
            write_weights(model, model_file)
            model_sha = sha256_file(model_file)
        elif isinstance(weights, bytes | bytearray | memoryview):
            model_file.write_bytes(weights)
            model_sha = hashlib.sha256(weights).hexdigest()
        else:
            _link_or_copy(Path(weights), model_file)
            model_sha = weights_sha256 or sha256_file(model_file)
        tensors, scalars = optimizer_parts(optimizer)
        optimizer_sha = write_safetensors(tensors, tmp / "optimizer.safetensors")
        del tensors
        state = {
            "format": _FORMAT,
            "step": step,
            "learner_steps": learner_steps,
            "optimizer": scalars,
            "extra": extra or {},
            "files": {"model": model_sha, "optimizer": optimizer_sha},
        }
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        final = commit_save(tmp, root, name, LATEST)
    except BaseException:  # Ctrl-C included: leave no temporary directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(
    model: Any, optimizer: torch.optim.Optimizer, cfg: TrainerConfig, directory: str | Path
) -> Saved | None:
    """Restore the newest complete checkpoint in ``directory`` into ``model`` and
    ``optimizer`` (None: there is none). The hyperparameters are ``cfg``'s: the config file
    decides those of a resumed run."""
    found = read_latest_save(
        Path(directory), CheckpointError, latest=LATEST, state=STATE, fmt=_FORMAT
    )
    if found is None:
        return None
    path, meta = found
    try:
        load_model(model, path / "model.safetensors", strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} holds another model ({first})") from None
    release_memory()
    sd = optimizer_state_dict(load_file(path / "optimizer.safetensors"), meta["optimizer"])
    for g in sd["param_groups"]:
        g.update(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None
    return Saved(
        path,
        int(meta["step"]),
        dict(meta["extra"]),
        str(meta["files"]["model"]),
        int(meta["learner_steps"]),
    )


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or no hard links
        shutil.copyfile(source, dest)
