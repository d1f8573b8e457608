"""Files written so that a reader sees the old content or the new, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it (fsynced, then renamed
    over it); the temporary file is removed on any error, Ctrl-C included."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read 1 MB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_save(staged: Path, root: Path, name: str, latest: str = "latest") -> Path:
    """Make the save written into directory ``staged`` the newest one under ``root``: its files
    fsynced, renamed to ``root/name``, the file ``root/latest`` pointed at it atomically, then
    every other ``step-*`` save removed. When ``root/name`` exists (the same step saved again)
    the new save gets a name of its own beside it, so that a crash at any point leaves
    ``latest`` naming a complete save. Returns the save's directory."""
    for p in staged.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    final = root / name
    while final.exists():
        final = root / f"{name}-{secrets.token_hex(3)}"
    os.rename(staged, final)
    fsync_dir(root)
    write_atomic(root / latest, final.name.encode())
    fsync_dir(root)
    for old in root.glob("step-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_saves(directory: Path, *, own: bool = False) -> None:
    """Remove ``.tmp-<pid>-*`` saves in progress of processes that no longer run (``own``:
    this process's too, when it is done saving)."""
    for p in directory.glob(".tmp-*"):
        try:
            pid = int(p.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        mine = pid == os.getpid()
        if (own and mine) or (not mine and not Path(f"/proc/{pid}").exists()):
            shutil.rmtree(p, ignore_errors=True)


def read_latest_save(
    root: Path,
    error: Callable[[str], Exception],
    *,
    latest: str = "latest",
    state: str = "state.json",
    fmt: int = 1,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest save ``commit_save`` made under ``root`` and its ``state`` JSON, every file
    the state lists (``files``: name -> sha256 of ``<name>.safetensors``) hash-checked; None
    when there is none. Anything unreadable, of another format or corrupt raises ``error``
    with a message that names what to delete."""
    try:
        name = (root / latest).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"cannot read {root / latest}: {e}") from None
    path = root / name
    try:
        meta = json.loads((path / state).read_text())
    except (OSError, ValueError) as e:
        raise error(f"checkpoint {path} is unreadable ({e}); delete {root} to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"checkpoint {path} has an unknown format; delete {root} to start over")
    for fname, digest in dict(meta.get("files", {})).items():
        file = path / f"{fname}.safetensors"
        if not file.is_file() or sha256_file(file) != digest:
            raise error(
                f"checkpoint file {file} is missing or corrupt; delete {root} to start over"
            )
    return path, meta
