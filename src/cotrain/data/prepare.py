"""Prepare a corpus once: read or download the texts, split, tokenize, cache.

Layout of ``<cache>/data/<key>/`` (``key`` hashes everything that changes the tokens: the
built-in names, the sha256 of every local file and of a given tokenizer, ``text_field``,
``val_fraction`` and the BPE size)::

    tokenizer.json   the tokenizer (the trained byte-level BPE, or a copy of the given one)
    train.bin        token ids of the training split, each document followed by end-of-text
    val.bin          token ids of the held-out split (the tail of every document)
    meta.json        sizes, dtype (uint16 or uint32), sources; written last: "complete"

Every file is written to a temporary name and renamed (atomic); an error or an interrupt
leaves no temporary file behind. Workers that start together take an exclusive lock on
``<key>.lock``: one prepares, the others wait and then read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cotrain.core.files import write_atomic
from cotrain.data import local
from cotrain.data.config import BUILTIN_SOURCES, DataConfig
from cotrain.data.errors import CacheBusyError
from cotrain.data.sources import Document, download, read_documents
from cotrain.data.tokenizer import (
    EOT,
    end_of_text,
    load_tokenizer,
    token_dtype,
    tokenizer_json,
    train_bpe,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_FORMAT = 2
_PIECE_CHARS = 1 << 20  # long documents are tokenized in pieces of about this many characters

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
    dtype: str = "uint16"
    """Numpy dtype of the token files: "uint16" when the vocabulary fits, else "uint32"."""

    @property
    def key(self) -> str:
        """The cache key: equal for every process that prepared the same tokens."""
        return self.path.name

    @property
    def tokenizer_path(self) -> Path:
        """The ``tokenizer.json`` the tokens were made with (load it to decode)."""
        return self.path / "tokenizer.json"

    def train(self) -> np.ndarray:
        """(N,) training tokens, memory-mapped."""
        return np.memmap(self.path / "train.bin", dtype=np.dtype(self.dtype), mode="r")

    def val(self) -> np.ndarray:
        """(M,) validation tokens, memory-mapped."""
        return np.memmap(self.path / "val.bin", dtype=np.dtype(self.dtype), mode="r")

    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` the tokens were made with."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))


@dataclass
class _Plan:
    """The resolved inputs of a preparation: local files found, tokenizer chosen, the key."""

    cfg: DataConfig
    tokenizer: Path | None
    """A given tokenizer.json, or None to train the BPE."""
    files: dict[str, list[local.LocalFile]] = field(default_factory=dict)
    """The files of every local source."""

    def key(self) -> str:
        sources: list[Any] = []
        for s in self.cfg.sources:
            if s in self.files:
                sources.append([[f.kind, local.sha256(f.path)] for f in self.files[s]])
            else:
                sources.append(s)
        spec: dict[str, Any] = {"f": _FORMAT, "s": sources, "val": self.cfg.val_fraction}
        if any(s in self.files for s in self.cfg.sources):
            spec["field"] = self.cfg.text_field
        if self.tokenizer is None:
            spec["bpe"] = self.cfg.vocab_size
        else:
            spec["tok"] = local.sha256(self.tokenizer)
            beside = self.tokenizer.parent / "tokenizer_config.json"  # may choose the EOS
            if beside.is_file():
                spec["tok_cfg"] = local.sha256(beside)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _plan(cfg: DataConfig, tokenizer_file: Path | None) -> _Plan:
    if cfg.tokenizer == "bpe" or (cfg.tokenizer is None and tokenizer_file is None):
        tok = None
    else:
        tok = tokenizer_json(cfg.tokenizer if cfg.tokenizer is not None else str(tokenizer_file))
    plan = _Plan(cfg, tok)
    for s in cfg.sources:
        if s not in BUILTIN_SOURCES:
            plan.files[s] = local.resolve(s)
    return plan


def cache_key(cfg: DataConfig, *, tokenizer_file: Path | None = None) -> str:
    """The key of the tokens ``prepare(cfg, tokenizer_file=...)`` makes (hashes local files)."""
    return _plan(cfg, tokenizer_file).key()


def prepare(
    cfg: DataConfig, *, tokenizer_file: Path | None = None, progress: Progress | None = None
) -> Prepared:
    """The prepared corpus of ``cfg``: from the cache, or built now (under a file lock).

    ``tokenizer_file`` (the tokenizer.json of a Hugging Face model) is used when
    ``cfg.tokenizer`` is unset; without either, a byte-level BPE is trained on the texts.
    """
    report = progress or (lambda stage, done, total: None)
    plan = _plan(cfg, tokenizer_file)
    root = cfg.cache_path() / "data"
    root.mkdir(parents=True, exist_ok=True)
    out = root / plan.key()
    done = _load(out)
    if done is not None:
        return done
    with _locked(root / f"{out.name}.lock", cfg.lock_timeout_s):
        done = _load(out)  # another process may have finished while we waited
        if done is not None:
            return done
        return _build(plan, out, report)


def _load(out: Path) -> Prepared | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return Prepared(
        out,
        meta["vocab_size"],
        meta["eot_id"],
        meta["train_tokens"],
        meta["val_tokens"],
        meta.get("dtype", "uint16"),
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


def _read(plan: _Plan, report: Progress) -> list[Document]:
    cfg = plan.cfg
    downloads = cfg.cache_path() / "downloads"
    docs: list[Document] = []
    for i, source in enumerate(cfg.sources):
        if source in plan.files:
            report(f"read {source}", i, len(cfg.sources))
            docs.extend(local.read_source(source, plan.files[source], text_field=cfg.text_field))
        else:
            report(f"download {source}", i, len(cfg.sources))
            archive = download(source, downloads, timeout_s=cfg.download_timeout_s)
            docs.extend(read_documents(source, archive))
    report("read", len(cfg.sources), len(cfg.sources))
    return docs


def _build(plan: _Plan, out: Path, report: Progress) -> Prepared:
    cfg = plan.cfg
    docs = _read(plan, report)
    splits = [split_document(d, cfg.val_fraction) for d in docs]
    train_texts = [s[0] for s in splits if s[0]]
    val_texts = [s[1] for s in splits if s[1]]

    tok: Tokenizer
    if plan.tokenizer is None:
        report("train tokenizer", 0, 1)
        tok = train_bpe(train_texts, cfg.vocab_size)
        report("train tokenizer", 1, 1)
        eot_id, eot = tok.token_to_id(EOT), EOT
        assert eot_id is not None
        tok_bytes = tok.to_str().encode()
    else:
        tok = load_tokenizer(plan.tokenizer)
        eot_id, eot = end_of_text(tok, plan.tokenizer)
        tok_bytes = plan.tokenizer.read_bytes()
    vocab = max(tok.get_vocab_size(with_added_tokens=True), eot_id + 1)
    dtype = token_dtype(vocab)

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tokenizer.json", tok_bytes)
    train_n = _encode_to(out / "train.bin", tok, train_texts, eot_id, dtype, report, "train")
    val_n = _encode_to(out / "val.bin", tok, val_texts, eot_id, dtype, report, "val")
    meta = {
        "sources": cfg.sources,
        "files": [f.name for files in plan.files.values() for f in files],
        "documents": len(docs),
        "tokenizer": "bpe" if plan.tokenizer is None else str(plan.tokenizer),
        "vocab_size": vocab,
        "eot": eot,
        "eot_id": eot_id,
        "dtype": dtype.name,
        "train_tokens": train_n,
        "val_tokens": val_n,
        "train_chars": sum(len(t) for t in train_texts),
    }
    write_atomic(out / "meta.json", json.dumps(meta, indent=2).encode())
    loaded = _load(out)
    assert loaded is not None
    return loaded


def _encode_to(
    path: Path,
    tok: Tokenizer,
    texts: list[str],
    eot_id: int,
    dtype: np.dtype,
    report: Progress,
    split: str,
) -> int:
    """Tokenize ``texts`` into ``path`` (each followed by end-of-text), streaming; token count."""
    stage = f"tokenize {split}"
    tmp = _tmp_name(path)
    n = 0
    try:
        with open(tmp, "wb") as f:
            for k, text in enumerate(texts):
                for piece in _pieces(text):
                    ids = np.asarray(tok.encode(piece, add_special_tokens=False).ids, dtype=dtype)
                    f.write(ids.tobytes())
                    n += ids.size
                f.write(np.asarray([eot_id], dtype=dtype).tobytes())
                n += 1
                report(stage, k + 1, len(texts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error or ^C: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    return n


def _pieces(text: str) -> Iterator[str]:
    """Pieces of about ``_PIECE_CHARS`` characters, cut after a newline that is followed by a
    non-space character: byte-level pre-tokenizers never join tokens across such a cut, so the
    ids are those of the whole text, and memory stays bounded on a huge single document."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.find("\n", start + _PIECE_CHARS)
        while 0 <= cut < len(text) - 1 and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut < 0 or cut >= len(text) - 1:
            break
        yield text[start : cut + 1]
        start = cut + 1
    yield text[start:]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
