"""The user's own texts: ``.txt`` files, ``.jsonl`` files and directories of them.

A source that is not a built-in name is a local path:

* ``file.txt``: one document, the whole file (UTF-8).
* ``file.jsonl``: one document per non-blank line, a JSON object whose ``text_field`` holds the
  text. Lines whose text is the empty string are skipped.
* a directory: every ``.txt`` and ``.jsonl`` file below it, recursively, in sorted order of their
  relative paths (hidden files and folders are left out). Files without text are skipped there,
  but the directory as a whole must hold some.

The content of every file is hashed (sha256) into the cache key, so an edited file is prepared
again; the hash of an unchanged file (same inode, size and mtime) is computed once per process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cotrain.data.errors import DataError
from cotrain.data.sources import Document

SUFFIXES = (".txt", ".jsonl")

_hash_memo: dict[tuple[str, int, int, int], str] = {}


@dataclass(frozen=True)
class LocalFile:
    """One text file of a local source."""

    path: Path
    name: str
    """How messages and meta.json name it: the source as written, plus the path inside it."""
    explicit: bool
    """Named directly in ``sources`` (then it must hold text) rather than found in a directory."""

    @property
    def kind(self) -> str:
        return self.path.suffix.lower().lstrip(".")


def resolve(source: str) -> list[LocalFile]:
    """The files of a local source, in reading order; a clear error when there are none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {source!r} does not exist: give a .txt or .jsonl file, a directory "
            "of them, or a built-in text (shakespeare, kjv)"
        )
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(
                f"data source {source!r} is neither a .txt nor a .jsonl file: rename it or "
                "give its directory"
            )
        return [LocalFile(path, source, explicit=True)]
    found = sorted(
        (p.relative_to(path).as_posix(), p)
        for p in path.rglob("*")
        if p.suffix.lower() in SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not found:
        raise DataError(
            f"directory {source!r} holds no .txt or .jsonl files: add some or fix the path"
        )
    return [LocalFile(p, f"{source.rstrip('/')}/{rel}", explicit=False) for rel, p in found]


def sha256(path: Path) -> str:
    """The sha256 of a file's content (memoised per process on inode, size and mtime)."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo_key not in _hash_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _hash_memo[memo_key] = h.hexdigest()
    return _hash_memo[memo_key]


def read_source(source: str, files: list[LocalFile], *, text_field: str) -> list[Document]:
    """The documents of one local source (its files already resolved), in order."""
    docs: list[Document] = []
    for f in files:
        docs.extend(read_file(f, text_field=text_field))
    if not docs:
        raise DataError(f"directory {source!r} holds no text: add some or fix the path")
    return docs


def read_file(f: LocalFile, *, text_field: str) -> list[Document]:
    """The documents of one file; an explicitly named file without text is an error."""
    raw = f.path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{f.name}: byte {e.start} is not UTF-8: convert the file (iconv -t utf-8)"
        ) from None
    text = text.replace("\r\n", "\n")
    if f.kind == "jsonl":
        docs = _jsonl(f.name, text, text_field)
    else:
        docs = [Document(f.name, text)] if text.strip() else []
    if not docs and f.explicit:
        raise DataError(f"{f.name} holds no text: add some or remove it from data.sources")
    return docs


def _jsonl(name: str, text: str, field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name} line {lineno} is not JSON ({e.msg}): fix or remove the line"
            ) from None
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(
                f'{name} line {lineno} has no "{field}" field: set data.text_field to the '
                "field that holds the text"
            )
        value = obj[field]
        if not isinstance(value, str):
            raise DataError(
                f'{name} line {lineno}: "{field}" is a {type(value).__name__}, not a string: '
                "fix the line or set data.text_field"
            )
        if value:
            docs.append(Document(f"{name}:{lineno}", value))
    return docs
