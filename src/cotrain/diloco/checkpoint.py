"""Checkpoints: one directory per save, safetensors for tensors, one JSON file for the rest.

Layout of a checkpoint directory::

    latest               the name of the newest complete save; written last, atomically
    step-00000120/
        model.safetensors      the model's state (shared tensors, e.g. tied embeddings, once)
        optimizer.safetensors  the inner optimizer's tensors (``state.<param>.<key>``)
        outer.safetensors      DiLoCo's outer state and its in-flight synchronisation
        state.json             step, tokens, the run's config, the optimizer's hyperparameters,
                               the caller's extra state and the sha256 of every file above
    .tmp-<pid>-<n>/      a save in progress: removed on any error, Ctrl-C included; one left by
                         a killed process is removed by the next save

A save is complete once ``latest`` names it (``os.replace`` of a fully written, fsynced file),
so a process killed at any moment leaves the previous save intact. Older saves are deleted
after the new one is in place. ``load`` checks every file's hash before anything is used.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from cotrain.core.files import commit_save, read_latest_save, remove_stale_saves, sha256_file
from cotrain.diloco.errors import CheckpointError, ConfigChangedError
from cotrain.models.optim_state import optimizer_parts, optimizer_state_dict

STATE = "state.json"
LATEST = "latest"
_FORMAT = 2


@dataclass(frozen=True)
class Saved:
    """A complete save, read from disk (its files' hashes checked)."""

    path: Path
    meta: dict[str, Any]
    """``state.json``: ``step``, ``config``, ``extra`` and whatever the writer put there."""

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``<name>.safetensors`` (an empty dict when the save has none)."""
        f = self.path / f"{name}.safetensors"
        if name not in self.meta["files"]:
            return {}
        return load_file(f)

    def load_model(self, module: nn.Module) -> None:
        """Load the model's weights into ``module`` (same architecture)."""
        missing, unexpected = load_model(module, self.path / "model.safetensors", strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.path} holds another model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}; use another out_dir or resume=never"
            )

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Load the inner optimizer's state (tensors and hyperparameters)."""
        saved = self.meta.get("optimizer")
        if saved is None:
            return
        sd = optimizer_state_dict(self.tensors("optimizer"), saved)
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint {self.path}: optimizer state does not fit: {e}"
            ) from None


def remove_temporary(directory: str | Path) -> None:
    """Remove every unfinished save of this process in ``directory`` (for a ``finally``: a
    save cut short by a second Ctrl-C during its own clean-up)."""
    if Path(directory).is_dir():
        remove_stale_saves(Path(directory), own=True)


def save(
    directory: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
) -> Path:
    """Write a complete save of ``step`` into ``directory`` and point ``latest`` at it.

    ``tensors`` maps a file name (``"outer"``) to the tensors it holds; ``meta`` (JSON) goes
    into ``state.json`` beside ``step``, the file hashes and the optimizer's hyperparameters."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(root)
    # named before it exists: an interrupt at any point after this line can remove it
    tmp = root / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    name = f"step-{step:08d}"
    try:
        tmp.mkdir()
        files: dict[str, str] = {}
        save_model(model, str(tmp / "model.safetensors"))
        files["model"] = sha256_file(tmp / "model.safetensors")
        state: dict[str, Any] = {"format": _FORMAT, "step": step, **meta}
        if optimizer is not None:
            opt_tensors, opt_meta = optimizer_parts(optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            files["optimizer"] = sha256_file(tmp / "optimizer.safetensors")
            state["optimizer"] = opt_meta
        for fname, group in tensors.items():
            path = tmp / f"{fname}.safetensors"
            save_file({k: v.detach().contiguous() for k, v in group.items()}, str(path))
            files[fname] = sha256_file(path)
        state["files"] = files
        with open(tmp / STATE, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = commit_save(tmp, root, name, LATEST)
    except BaseException:  # Ctrl-C included: leave no temporary directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load(directory: str | Path) -> Saved | None:
    """The newest complete save in ``directory`` (None when there is none), hashes checked."""
    found = read_latest_save(
        Path(directory), CheckpointError, latest=LATEST, state=STATE, fmt=_FORMAT
    )
    if found is None:
        return None
    path, meta = found
    return Saved(path, meta)


def check_config(saved: Saved, current: Any, *, allow_change: bool) -> None:
    """Refuse a save written with another config than ``current`` (the difference named),
    unless ``allow_change``."""
    diff = config_diff(saved.meta.get("config"), current)
    if diff and not allow_change:
        raise ConfigChangedError(
            f"checkpoint {saved.path} is from a run with another config ("
            + "; ".join(diff[:6])
            + "): resume it with --allow_config_change (allow_config_change=True), or start "
            "over in another out_dir"
        )


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["inner.lr: 0.003 -> 0.001", ...]``: the leaves that differ between two JSON trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: (none) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{where}: {old[key]!r} -> (none)")
            else:
                out.extend(config_diff(old[key], new[key], where))
        return out
    return [] if old == new else [f"{prefix or 'config'}: {old!r} -> {new!r}"]
