"""On-disk layout of versions, shared by origin and relays, and a feed of changes to it.

::

    DIR/v00000007/data.bin            origin: the whole checkpoint (shards are ranges of it)
    DIR/v00000007/shard_00000.bin     relay: shards appear atomically (.part, then renamed)
    DIR/v00000007/shard_00001.bin
    DIR/v00000007/manifest.json       the signed envelope

At the origin the manifest is written last, so a version is visible only once it is complete;
the checkpoint is kept whole (a hard link to the trainer's file, or one write), not copied
into shards. At a relay the manifest is written first: the relay serves each shard while it is
still arriving (cut-through, ``GrowingShard``: a relay's uplink is busy from the first bytes
on, not from the first whole shard), and holds requests for shards not yet started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_VERSION_DIR = re.compile(r"^v(\d{8,16})$")  # v00000007; wider past 10^8 (up to 2^53)

# Response header of a shard streamed while the relay is still receiving (and has not yet
# verified) it: a client keeps such bytes only if the whole shard arrives and hashes right.
UNVERIFIED_HEADER = "X-Shardcast-Unverified"
# Request header of a relay's shard requests: an origin serves relays first (each relay
# multiplies what the origin's uplink carries) and clients with what is left.
RELAY_HEADER = "X-Shardcast-Relay"


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (fsync'd if durable)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class ShardLocation:
    """A shard's bytes: ``path`` from byte ``offset`` on."""

    path: Path
    offset: int


class VersionStore:
    """Versions under one directory; methods are cheap enough to call per request."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version:08d}"

    def manifest_path(self, version: int) -> Path:
        return self.version_dir(version) / "manifest.json"

    def shard_path(self, version: int, index: int) -> Path:
        return self.version_dir(version) / f"shard_{index:05d}.bin"

    def _dirs(self) -> list[int]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                m = _VERSION_DIR.match(entry.name)
                if m and entry.is_dir():
                    out.append(int(m.group(1)))
        return sorted(out)

    def versions(self) -> list[int]:
        """Versions whose manifest is present, oldest first."""
        return [v for v in self._dirs() if self.manifest_path(v).exists()]

    def latest(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def next_version(self) -> int:
        dirs = self._dirs()
        return dirs[-1] + 1 if dirs else 1

    def read_manifest(self, version: int) -> bytes | None:
        try:
            return self.manifest_path(version).read_bytes()
        except FileNotFoundError:
            return None

    def write_manifest(self, version: int, raw: bytes) -> None:
        self.version_dir(version).mkdir(parents=True, exist_ok=True)
        write_atomic(self.manifest_path(version), raw)

    def data_path(self, version: int) -> Path:
        return self.version_dir(version) / "data.bin"

    def has_shard(self, version: int, index: int) -> bool:
        return self.shard_path(version, index).exists() or self.data_path(version).exists()

    def locate(self, version: int, index: int, offset: int) -> ShardLocation | None:
        """Where shard ``index`` (at ``offset`` in the checkpoint) lies on disk, if anywhere."""
        path = self.shard_path(version, index)
        if path.exists():
            return ShardLocation(path, 0)
        data = self.data_path(version)
        return ShardLocation(data, offset) if data.exists() else None

    def discard_partial(self) -> list[int]:
        """Delete the version directories above the newest complete version that have no
        manifest: what a publisher killed mid-publish leaves. Without this, the next publish
        would number itself after the partial one and skip a version. Under the publish
        lock, so no publish in progress is touched."""
        import fcntl

        with open(self.root / ".publish.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            newest = self.latest() or 0
            gone = [v for v in self._dirs() if v > newest and not self.manifest_path(v).exists()]
            for v in gone:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)
        return gone

    def retire(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` complete versions (and stale partial ones)."""
        complete = self.versions()
        if len(complete) <= keep:
            return []
        cutoff = complete[-keep]
        gone = [v for v in self._dirs() if v < cutoff]
        for v in gone:
            # A reader that still has a shard open keeps its bytes (POSIX unlink semantics).
            shutil.rmtree(self.version_dir(v), ignore_errors=True)
        return gone


class ChangeFeed:
    """Wakes every waiter whenever the store changes; waiters re-check their own condition.

    One event per generation: ``notify`` sets the current event and installs a fresh one, so a
    waiter never misses a change that happens between its check and its wait.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                return False
            event = self._event
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return predicate()
        return True


class GrowingShard:
    """A shard a relay is still receiving into ``path`` (``shard_i.bin.part``), served as it grows.

    ``visible`` bytes from the start may be streamed. The relay has not checked the hash yet,
    so the last byte is held back until it has (``complete``): no reader ever gets a whole shard
    the relay could not verify. If the relay drops the bytes (its upstream sent corrupt ones,
    or the mirror stopped), ``drop`` bumps ``epoch``; readers that see it cut their stream off,
    and their clients, told by the response that the bytes were unverified, discard them.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.visible = 0
        self.epoch = 0
        self.done = False
        self.feed = ChangeFeed()

    def wrote(self, pos: int, n: int) -> None:
        """Bytes [pos, pos + n) are in the file (writes arrive in order, from 0)."""
        if pos <= self.visible:
            self.visible = max(self.visible, min(pos + n, self.size - 1))
            self.feed.notify()

    def drop(self) -> None:
        """The bytes so far are worthless: cut off every reader, start again from 0."""
        self.visible = 0
        self.epoch += 1
        self.feed.notify()

    def complete(self) -> None:
        """The shard is whole and verified (and renamed; open readers keep the same inode)."""
        self.visible, self.done = self.size, True
        self.feed.notify()
