"""Crash-safe files: a checkpoint directory is committed so that ``latest`` always names a
complete save, the same step saved again included."""

from __future__ import annotations

import os
from pathlib import Path

from cotrain.core.files import commit_save, remove_stale_saves, sha256_file, write_atomic


def _staged(root: Path, content: str) -> Path:
    tmp = root / f".tmp-{os.getpid()}-{content}"
    tmp.mkdir()
    (tmp / "model.bin").write_text(content)
    return tmp


def _latest(root: Path) -> Path:
    return root / (root / "latest").read_text()


def test_commit_save_keeps_latest_complete_when_a_step_is_saved_again(tmp_path: Path) -> None:
    first = commit_save(_staged(tmp_path, "a"), tmp_path, "step-00000003")
    assert first.name == "step-00000003" and _latest(tmp_path) == first
    # the same step again: its own directory beside the old one, then the old one removed
    again = commit_save(_staged(tmp_path, "b"), tmp_path, "step-00000003")
    assert again != first and again.name.startswith("step-00000003-")
    assert _latest(tmp_path) == again and (again / "model.bin").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", again.name]
    # a later step replaces both
    later = commit_save(_staged(tmp_path, "c"), tmp_path, "step-00000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000004"]
    assert (_latest(tmp_path) / "model.bin").read_text() == "c" and later == _latest(tmp_path)


def test_stale_saves_of_dead_processes_are_removed(tmp_path: Path) -> None:
    mine = _staged(tmp_path, "mine")
    dead = tmp_path / ".tmp-999999999-x"  # no such process
    dead.mkdir()
    remove_stale_saves(tmp_path)
    assert mine.exists() and not dead.exists()
    remove_stale_saves(tmp_path, own=True)
    assert not mine.exists()


def test_write_atomic_and_sha256_file(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "f"
    write_atomic(path, b"x" * (3 << 20))
    assert sha256_file(path) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
