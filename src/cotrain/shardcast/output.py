"""The client's output file: preallocated, written at shard offsets, resumable, atomic.

``OUT.part`` holds the bytes as they arrive; ``OUT.part.json`` names the signed manifest they
belong to and the shards already verified, so a fetch that was interrupted (killed, timed out)
resumes where it stopped. Only after the whole file's SHA-256 matches the manifest is ``OUT.part``
renamed to ``OUT``: a reader never sees a partial or unverified ``OUT``. When the disk is full
(or any write fails) both side files are removed and ``OutputError`` says why.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

from cotrain.shardcast.errors import IntegrityError, OutputError
from cotrain.shardcast.manifest import Manifest, SignedManifest
from cotrain.shardcast.store import write_atomic

_HASH_CHUNK = 4 * 1024 * 1024


class OutputFile:
    """A ``ShardSink`` writing into ``OUT.part`` at each shard's offset."""

    def __init__(self, out: str | os.PathLike[str], signed: SignedManifest) -> None:
        self.out = Path(out)
        self.part = self.out.with_name(self.out.name + ".part")
        self.state = self.out.with_name(self.out.name + ".part.json")
        self.signed = signed
        self.manifest: Manifest = signed.manifest
        self.done: set[int] = set()
        self._fd: int | None = None
        # The whole-file hash runs over the file as written, shard by shard in file order, as
        # soon as each prefix is complete: the final check then costs only the last shards.
        self._whole = hashlib.sha256()
        self._hashed = 0  # shards [0, _hashed) are in _whole

    # -- opening, resuming -------------------------------------------------------------------
    def open(self) -> set[int]:
        """Open (or resume) the part file; return the shards already verified on disk."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            claimed = self._claimed_from_state()
            if not claimed:
                self.part.unlink(missing_ok=True)
            self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
            # Reserve the space up front: a full disk fails here, before any download.
            if self.manifest.file_size:
                os.posix_fallocate(self._fd, 0, self.manifest.file_size)
            self.done = {i for i in claimed if self._shard_ok(i)}
            self._save_state()
            self._hash_prefix()
        except OSError as e:
            self.abort()
            raise self._output_error(e) from None
        return set(self.done)

    def _claimed_from_state(self) -> set[int]:
        try:
            state = json.loads(self.state.read_text())
            if state.get("manifest_digest") != self.signed.digest or not self.part.exists():
                return set()
            return {int(i) for i in state["done"] if 0 <= int(i) < len(self.manifest.shards)}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _shard_ok(self, index: int) -> bool:
        """Re-hash a shard the state file claims is done (trust no bytes we did not just write)."""
        assert self._fd is not None
        s = self.manifest.shards[index]
        h = hashlib.sha256()
        pos = 0
        while pos < s.size:
            piece = os.pread(self._fd, min(_HASH_CHUNK, s.size - pos), s.offset + pos)
            if not piece:
                return False
            h.update(piece)
            pos += len(piece)
        return h.hexdigest() == s.sha256

    def _save_state(self) -> None:
        body = {"manifest_digest": self.signed.digest, "done": sorted(self.done)}
        # A hint, not a promise (resumed shards are hashed again): no fsync per shard.
        write_atomic(self.state, json.dumps(body).encode(), durable=False)

    # -- ShardSink ---------------------------------------------------------------------------
    def write(self, index: int, pos: int, data: bytes) -> None:
        assert self._fd is not None
        offset = self.manifest.shards[index].offset + pos
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            self.abort()
            raise self._output_error(e) from None

    def discard(self, index: int) -> None:
        pass  # the shard's bytes are simply written again at the same offsets

    def complete(self, index: int) -> None:
        self.done.add(index)
        try:
            self._save_state()
            self._hash_prefix()
        except OSError as e:
            self.abort()
            raise self._output_error(e) from None

    def _hash_prefix(self) -> None:
        assert self._fd is not None
        while self._hashed in self.done:
            s = self.manifest.shards[self._hashed]
            pos = 0
            while pos < s.size:
                piece = os.pread(self._fd, min(_HASH_CHUNK, s.size - pos), s.offset + pos)
                if not piece:
                    raise OSError(errno.EIO, f"{self.part} is shorter than the manifest says")
                self._whole.update(piece)
                pos += len(piece)
            self._hashed += 1

    # -- finishing ---------------------------------------------------------------------------
    def commit(self) -> Path:
        """Check the whole file's hash, then rename it into place (atomic); return ``OUT``."""
        assert self._fd is not None
        missing = len(self.manifest.shards) - len(self.done)
        if missing:
            raise IntegrityError(f"{missing} shards of v{self.manifest.version} never verified")
        try:
            os.fsync(self._fd)
            self._hash_prefix()
        except OSError as e:
            self.abort()
            raise self._output_error(e) from None
        if self._whole.hexdigest() != self.manifest.file_sha256:
            self.abort()
            raise IntegrityError(
                f"v{self.manifest.version}: assembled file hash does not match the manifest"
            )
        self.close()
        os.replace(self.part, self.out)
        self.state.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            dfd = os.open(self.out.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return self.out

    def close(self) -> None:
        """Close, keeping ``OUT.part`` and its state so a later fetch can resume."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Close and delete the side files: nothing partial is left behind."""
        self.close()
        self.part.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)

    def _output_error(self, e: OSError) -> OutputError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            what = (
                f"not enough space for {self.manifest.file_size / 1e6:.1f} MB "
                f"at {self.out.parent} ({os.strerror(e.errno)}); free some space or choose "
                "another --out"
            )
        else:
            what = f"cannot write {self.part}: {e}"
        return OutputError(e.errno or 0, what)
