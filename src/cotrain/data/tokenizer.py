"""Tokenizers for the data: a byte-level BPE trained on the texts, or a given Hugging Face one.

Both are ``tokenizers.Tokenizer`` objects (the ``tokenizers`` library alone, no transformers).
Documents are joined with an end-of-text token: ``<|endoftext|>`` in the trained BPE; in a given
tokenizer the first of ``<|endoftext|>`` / ``<|end_of_text|>`` (the document separator of most
pretraining corpora, also in chat models whose EOS is an end-of-turn token), else the
``eos_token`` of the ``tokenizer_config.json`` beside it, else ``</s>`` / ``<eos>``.

Token files hold ``uint16`` ids when the vocabulary fits (at most 65,536 ids), else ``uint32``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cotrain.data.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT = "<|endoftext|>"
_END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")
_EOS_FALLBACK = ("</s>", "<eos>")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"a vocabulary of {vocab_size} tokens does not fit 32-bit ids")


def tokenizer_json(spec: str | Path) -> Path:
    """The ``tokenizer.json`` that ``spec`` names: the file itself or a directory holding one."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"tokenizer directory {str(spec)!r} holds no tokenizer.json: point data.tokenizer "
                'at a Hugging Face tokenizer.json or use "bpe"'
            )
    elif not path.is_file():
        raise DataError(
            f"tokenizer {str(spec)!r} does not exist: give a tokenizer.json, a directory holding "
            'one, or "bpe"'
        )
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``; a clear error if it is not one."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{path} is not a Hugging Face tokenizer.json ({first}): give a tokenizer.json "
            "saved by the tokenizers or transformers library"
        ) from None


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (bytes, ``<|endoftext|>``, merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def end_of_text(tok: Tokenizer, path: Path) -> tuple[int, str]:
    """(id, token) of the document separator of the tokenizer loaded from ``path``."""
    for name in _END_OF_TEXT:
        i = tok.token_to_id(name)
        if i is not None:
            return i, name
    eos = _config_eos(path.parent / "tokenizer_config.json")
    for name in ([eos] if eos else []) + list(_EOS_FALLBACK):
        i = tok.token_to_id(name)
        if i is not None:
            return i, name
    raise DataError(
        f"tokenizer {path} has no end-of-text token (<|endoftext|>, <|end_of_text|>, the "
        "eos_token of a tokenizer_config.json beside it, </s>, <eos>): add one or use "
        'data.tokenizer="bpe"'
    )


def _config_eos(path: Path) -> str | None:
    try:
        eos = json.loads(path.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
