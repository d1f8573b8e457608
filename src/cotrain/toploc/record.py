"""The rollout record: what an inference worker hands back, one JSON object per line (JSONL).

    {"format": "cotrain.toploc.rollout/1", "id": "r0", "model": "smollm2-135m-instruct",
     "prompt_tokens": [...], "output_tokens": [...], "chunk_tokens": 32, "topk": 128,
     "proof": "<base64>"}

The proof covers the hidden state of every position the worker computed: the prompt minus its
last token as one chunk, then the positions that produced output tokens, ``chunk_tokens`` at a
time (see ``layout``).

Records come from strangers: ``from_json`` reads them with ``cotrain.core.jsonsafe`` (bounded
size, depth and integers; no NaN) and ``read_rollouts`` reads a file as bytes, one bounded line
at a time, so any file (binary, truncated, one endless line) gives per-line errors, not a crash.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotrain.core.jsonsafe import MalformedJSON, loads_object
from cotrain.toploc.errors import RecordError

FORMAT = "cotrain.toploc.rollout/1"
MAX_RECORD_BYTES = 8 << 20
"""Longest record line read (a 32k-token rollout with its proof is about 1 MB)."""
MAX_ID_CHARS = 256
"""Longest rollout id."""
MAX_MODEL_CHARS = 4096
"""Longest model spec (a directory path)."""
_FIELDS: dict[str, type] = {
    "id": str,
    "model": str,
    "prompt_tokens": list,
    "output_tokens": list,
    "proof": str,
    "chunk_tokens": int,
    "topk": int,
}


@dataclass
class Rollout:
    """One generated sequence with its proof."""

    id: str
    """Unique within a file."""
    model: str
    """The model spec the worker claims to have run (``cotrain.models.load_model``)."""
    prompt_tokens: list[int]
    """The prompt's token ids."""
    output_tokens: list[int]
    """The generated token ids (up to and including EOS, if emitted)."""
    proof: bytes
    """Chunk proofs, ``2 + 2 * topk`` bytes each."""
    chunk_tokens: int = 32
    """Output tokens per chunk proof."""
    topk: int = 128
    """Entries committed to per chunk."""

    def to_json(self) -> str:
        """The record as one JSON line (no newline)."""
        d: dict[str, Any] = {"format": FORMAT, **self.__dict__}
        d["proof"] = base64.b64encode(self.proof).decode("ascii")
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> Rollout:
        """Parse one record; RecordError says what is wrong."""
        try:
            d = loads_object(line, max_bytes=MAX_RECORD_BYTES)
        except MalformedJSON as e:
            raise RecordError(f"bad JSON: {e}") from None
        if d.pop("format", FORMAT) != FORMAT:
            raise RecordError(f"unknown record format; expected {FORMAT!r}")
        for key, typ in _FIELDS.items():
            if key not in d:
                raise RecordError(f"missing field {key!r}")
            if not isinstance(d[key], typ) or isinstance(d[key], bool):
                raise RecordError(f"field {key!r} must be {typ.__name__}")
        extra = sorted(set(d) - set(_FIELDS))
        if extra:
            shown = ", ".join(repr(k[:40]) for k in extra[:5])
            raise RecordError(f"{len(extra)} unknown fields ({shown})")
        _check_name("id", d["id"], MAX_ID_CHARS)
        _check_name("model", d["model"], MAX_MODEL_CHARS)
        for key in ("prompt_tokens", "output_tokens"):
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in d[key]):
                raise RecordError(f"{key} must be non-negative integers")
        if not d["prompt_tokens"]:
            raise RecordError("prompt_tokens is empty")
        if d["chunk_tokens"] < 1 or d["topk"] < 1:
            raise RecordError("chunk_tokens and topk must be positive")
        try:
            d["proof"] = base64.b64decode(d["proof"], validate=True)
        except (binascii.Error, ValueError):
            raise RecordError("proof is not valid base64") from None
        return cls(**d)


def _check_name(key: str, value: str, limit: int) -> None:
    # Ids and model specs end up in logs and terminal tables: no control characters.
    if not value:
        raise RecordError(f"field {key!r} is empty")
    if len(value) > limit:
        raise RecordError(f"field {key!r} is longer than {limit} characters")
    if not value.isprintable():
        raise RecordError(f"field {key!r} contains control characters")


def write_rollouts(path: str | Path, rollouts: Iterable[Rollout]) -> None:
    """Write records atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for r in rollouts:
                f.write(r.to_json() + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class RecordLine:
    """One line of a rollout file: the record, or why it could not be read."""

    line_no: int
    rollout: Rollout | None
    error: str | None


def read_rollouts(path: str | Path) -> Iterator[RecordLine]:
    """Records of a JSONL file, one per non-empty line; bad lines are reported, not raised.

    Lines longer than ``MAX_RECORD_BYTES`` are skipped (with an error) without being held in
    memory. OSError (missing or unreadable file) is raised.
    """
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b""), 1):
            if len(line) > MAX_RECORD_BYTES:
                while not line.endswith(b"\n"):  # the rest of the line, a block at a time
                    line = f.readline(1 << 20)
                    if not line:
                        break
                yield RecordLine(n, None, f"record longer than {MAX_RECORD_BYTES} bytes")
                continue
            if not line.strip():
                continue
            try:
                yield RecordLine(n, Rollout.from_json(line), None)
            except RecordError as e:
                yield RecordLine(n, None, str(e))
