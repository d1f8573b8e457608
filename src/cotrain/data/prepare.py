"""Prepare a corpus once: download, split, train a byte-level BPE, tokenize, cache.

Layout of ``<cache>/data/<key>/`` (``key`` hashes everything that changes the tokens)::

    tokenizer.json   the trained byte-level BPE (Hugging Face ``tokenizers`` format)
    train.bin        uint16 token ids of the training split, documents joined by <|endoftext|>
    val.bin          uint16 token ids of the held-out split (the tail of every document)
    meta.json        sizes and sources; written last, so its presence means "complete"

Every file is written to a temporary name and renamed (atomic). Workers that start together
take an exclusive lock on ``<key>.lock``: one prepares, the others wait and then read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cotrain.data.config import DataConfig
from cotrain.data.errors import CacheBusyError
from cotrain.data.sources import Document, download, read_documents

EOT = "<|endoftext|>"
_FORMAT = 1

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as preparation advances."""


@dataclass(frozen=True)
class Prepared:
    """A prepared corpus on disk."""

    path: Path
    vocab_size: int
    eot_id: int
    train_tokens: int
    val_tokens: int

    def train(self) -> np.ndarray:
        """(N,) uint16 training tokens, memory-mapped."""
        return np.memmap(self.path / "train.bin", dtype=np.uint16, mode="r")

    def val(self) -> np.ndarray:
        """(M,) uint16 validation tokens, memory-mapped."""
        return np.memmap(self.path / "val.bin", dtype=np.uint16, mode="r")

    def tokenizer(self) -> Any:
        """The trained ``tokenizers.Tokenizer``."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / "tokenizer.json"))


def cache_key(cfg: DataConfig) -> str:
    spec = {"f": _FORMAT, "s": cfg.sources, "v": cfg.vocab_size, "val": cfg.val_fraction}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, *, progress: Progress | None = None) -> Prepared:
    """The prepared corpus of ``cfg``: from the cache, or built now (under a file lock)."""
    report = progress or (lambda stage, done, total: None)
    root = cfg.cache_path() / "data"
    root.mkdir(parents=True, exist_ok=True)
    out = root / cache_key(cfg)
    done = _load(out)
    if done is not None:
        return done
    with _locked(root / f"{out.name}.lock", cfg.lock_timeout_s):
        done = _load(out)  # another process may have finished while we waited
        if done is not None:
            return done
        return _build(cfg, out, report)


def _load(out: Path) -> Prepared | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return Prepared(
        out, meta["vocab_size"], meta["eot_id"], meta["train_tokens"], meta["val_tokens"]
    )


class _locked:
    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path, self.timeout_s = path, timeout_s

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        end = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > end:
                    os.close(self.fd)
                    raise CacheBusyError(
                        f"{self.path} stayed locked for {self.timeout_s}s; if no other cotrain "
                        "process is preparing data, delete it"
                    ) from None
                time.sleep(0.2)  # polling a lock held by another process; not a test sync

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def split_document(doc: Document, val_fraction: float) -> tuple[str, str]:
    """(train, val): the tail of the document, cut at a line start, is held out."""
    cut = int(len(doc.text) * (1 - val_fraction))
    nl = doc.text.find("\n", cut)
    cut = nl + 1 if nl >= 0 else cut
    return doc.text[:cut], doc.text[cut:]


def _build(cfg: DataConfig, out: Path, report: Progress) -> Prepared:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    downloads = cfg.cache_path() / "downloads"
    docs: list[Document] = []
    for i, source in enumerate(cfg.sources):
        report(f"download {source}", i, len(cfg.sources))
        archive = download(source, downloads, timeout_s=cfg.download_timeout_s)
        docs.extend(read_documents(source, archive))
    report("download", len(cfg.sources), len(cfg.sources))
    splits = [split_document(d, cfg.val_fraction) for d in docs]
    train_texts = [s[0] for s in splits]
    val_texts = [s[1] for s in splits if s[1]]

    report("train tokenizer", 0, 1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    report("train tokenizer", 1, 1)
    eot = tok.token_to_id(EOT)
    assert eot is not None

    def encode(texts: list[str], stage: str) -> np.ndarray:
        parts: list[np.ndarray] = []
        for k, text in enumerate(texts):
            ids = tok.encode(text).ids
            parts.append(np.asarray([*ids, eot], dtype=np.uint16))
            report(stage, k + 1, len(texts))
        return np.concatenate(parts)

    train = encode(train_texts, "tokenize train")
    val = encode(val_texts, "tokenize val")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(out / "tokenizer.json", tok.to_str().encode())
    _atomic_bytes(out / "train.bin", train.tobytes())
    _atomic_bytes(out / "val.bin", val.tobytes())
    meta = {
        "sources": cfg.sources,
        "documents": [d.name for d in docs],
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "train_chars": sum(len(t) for t in train_texts),
    }
    _atomic_bytes(out / "meta.json", json.dumps(meta, indent=2).encode())
    loaded = _load(out)
    assert loaded is not None
    return loaded


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
