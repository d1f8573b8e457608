"""Publishing: cut a checkpoint into shards, hash them, sign the manifest, retire old versions.

The origin serves whatever the publisher writes into its directory; the publisher may run in
the origin's process (``Origin.publish``) or in another one (``publish(..., dir=D)``), e.g. the
trainer. The checkpoint is written first and the signed manifest last, so a version is never
visible half-written. The checkpoint is kept whole at the origin (``data.bin``; shards are served as
ranges of it): a hard link to the trainer's file with ``file_mode="link"``, else one copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotrain.core.identity import Identity
from cotrain.shardcast.config import PublishConfig
from cotrain.shardcast.manifest import Manifest, ShardInfo, SignedManifest
from cotrain.shardcast.store import VersionStore


@dataclass(frozen=True)
class PublishResult:
    """A published version."""

    version: int
    manifest: Manifest
    signed: SignedManifest
    retired: list[int]
    seconds: float


def state_dict_bytes(state_dict: Mapping[str, Any]) -> bytes:
    """Serialise a torch state dict as safetensors bytes (CPU, contiguous)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return save(tensors)


def _pieces(source: bytes | memoryview | Path, shard_size: int) -> Iterator[memoryview | bytes]:
    """Yield the checkpoint in shard-sized pieces without holding a file in memory at once."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            while piece := f.read(shard_size):
                yield piece
        return
    view = memoryview(source)
    for start in range(0, len(view), shard_size):
        yield view[start : start + shard_size]


def publish(
    source: Mapping[str, Any] | bytes | str | os.PathLike[str],
    *,
    dir: str | os.PathLike[str],
    identity: Identity,
    config: PublishConfig | None = None,
) -> PublishResult:
    """Publish a state dict, raw bytes, or a file as the next version under ``dir``."""
    config = config or PublishConfig()
    t0 = time.monotonic()
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"cannot publish {path}: no such file")
        data: bytes | Path = path
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        data = state_dict_bytes(source)
    if (data.stat().st_size if isinstance(data, Path) else len(data)) == 0:
        raise ValueError("cannot publish an empty checkpoint")

    store = VersionStore(dir)
    # One publisher at a time per directory, so version numbers never collide.
    with open(store.root / ".publish.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = store.next_version()
        store.version_dir(version).mkdir(parents=True)
        data_path = store.data_path(version)
        tmp = data_path.with_name("data.bin.part")
        if isinstance(data, Path):
            # Place first, then hash what was placed: the manifest describes exactly our bytes.
            _place(data, tmp, config.file_mode)
            data = tmp
        whole = hashlib.sha256()
        shards = []
        offset = 0
        out = None if isinstance(data, Path) else open(tmp, "wb")  # noqa: SIM115
        try:
            # The whole-file hash runs in a second thread (hashlib releases the GIL).
            with ThreadPoolExecutor(1) as pool:
                for piece in _pieces(data, config.shard_size_bytes):
                    pending = pool.submit(whole.update, piece)
                    shards.append(ShardInfo(offset, len(piece), hashlib.sha256(piece).hexdigest()))
                    offset += len(piece)
                    if out is not None:
                        out.write(piece)
                    pending.result()
        finally:
            if out is not None:
                out.close()
        os.replace(tmp, data_path)
        manifest = Manifest(
            channel=config.channel,
            version=version,
            created_unix=time.time(),
            publisher=identity.public_hex,
            name=config.name,
            file_size=offset,
            file_sha256=whole.hexdigest(),
            shard_size=config.shard_size_bytes,
            shards=tuple(shards),
        )
        signed = SignedManifest.sign(manifest, identity)
        store.write_manifest(version, signed.to_bytes())
        retired = store.retire(config.keep_versions)
    return PublishResult(version, manifest, signed, retired, time.monotonic() - t0)


def _place(source: Path, dest: Path, mode: str) -> None:
    """Put the checkpoint file into the version directory: a hard link, or a kernel-side copy."""
    if mode == "link":
        try:
            os.link(source, dest)
            return
        except OSError:
            pass  # another filesystem (or links not allowed): copy instead
    shutil.copyfile(source, dest)
