"""What workers, validators and the trainer use to reach the orchestrator and the weights.

``OrchestratorClient``: signed requests over one aiohttp session, every call bounded by a
timeout, connection failures retried until a deadline and then ``OrchestratorUnreachable``.
``Weights``: policy versions through shardcast (the trainer's signed manifests), kept on disk
under the role's cache directory and loaded into the model when the version changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.rl import wire
from cotrain.rl.errors import OrchestratorUnreachable, RLError

log = logging.getLogger("cotrain.rl.client")


class Refused(RLError):
    """The orchestrator refused a request (4xx): the message is its reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"orchestrator refused ({status}): {reason}")
        self.status = status


class OrchestratorClient:
    def __init__(
        self,
        url: str,
        *,
        identity: Identity,
        run: str,
        role: str,
        timeout_s: float = 30.0,
        unreachable_after_s: float = 120.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.identity = identity
        self.run = run
        self.role = role
        self.timeout_s = timeout_s
        self.unreachable_after_s = unreachable_after_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OrchestratorClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s + 35.0, connect=5.0)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One JSON call; connection errors and 5xx are retried with backoff until
        ``unreachable_after_s`` has passed since the first failure."""
        assert self._session is not None, "use the client as an async context manager"
        first_failure: float | None = None
        delay = 0.2
        while True:
            try:
                async with self._session.request(
                    method, self.url + path, json=body, params=params
                ) as resp:
                    if 400 <= resp.status < 500:
                        try:
                            reason = (await resp.json()).get("error", resp.reason)
                        except (aiohttp.ContentTypeError, ValueError):
                            reason = resp.reason
                        raise Refused(resp.status, str(reason))
                    if resp.status >= 500:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status, message=resp.reason or ""
                        )
                    got = await resp.json()
                    if not isinstance(got, dict):
                        raise aiohttp.ClientPayloadError("expected a JSON object")
                    return got
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.unreachable_after_s:
                    raise OrchestratorUnreachable(
                        f"no answer from the orchestrator at {self.url} for "
                        f"{self.unreachable_after_s:g} s ({type(e).__name__}: {e})"
                    ) from None
                log.info("orchestrator %s: %s; retrying in %.1f s", self.url, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def request(self, *, have_version: int, max_items: int) -> dict[str, Any]:
        body = wire.Request(
            self.run, self.role, wire.new_nonce(), time.time(), have_version, max_items
        ).to_body()
        return Envelope.seal(self.identity, wire.REQUEST, body).to_json()

    async def info(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/info")

    async def work(self, *, have_version: int, max_items: int = 1, wait_s: float = 2.0) -> dict:
        req = self.request(have_version=have_version, max_items=max_items)
        return await self.call("POST", "/v1/work", body=req, params={"wait_s": wait_s})

    async def heartbeat(self) -> dict[str, Any]:
        """Tell the orchestrator this worker is alive (while it generates)."""
        req = self.request(have_version=0, max_items=1)
        return await self.call("POST", "/v1/heartbeat", body=req)

    async def submit(self, rollouts: list[dict[str, Any]]) -> dict[str, Any]:
        return await self.call("POST", "/v1/rollouts", body={"rollouts": rollouts})

    async def claim(self, *, max_items: int, wait_s: float = 2.0) -> dict[str, Any]:
        req = self.request(have_version=0, max_items=max_items)
        return await self.call("POST", "/v1/claim", body=req, params={"wait_s": wait_s})

    async def verdicts(self, verdicts: list[dict[str, Any]]) -> dict[str, Any]:
        return await self.call("POST", "/v1/verdicts", body={"verdicts": verdicts})


class Weights:
    """Policy versions fetched through shardcast into ``dir`` (checked against the trainer's
    key), and which one the model holds."""

    def __init__(self, dir: Path, *, publisher_key: str, channel: str, keep: int = 4) -> None:
        self.dir = dir
        self.publisher_key = publisher_key
        self.channel = channel
        self.keep = keep
        self.files: dict[int, tuple[Path, str]] = {}
        """version -> (file, manifest file_sha256)"""
        self.loaded = 0
        dir.mkdir(parents=True, exist_ok=True)

    async def fetch(
        self,
        servers: list[str],
        version: int | None = None,
        *,
        sha256: str | None = None,
        unavailable_after_s: float = 120.0,
    ) -> int:
        """Fetch ``version`` (None: the newest) unless held; returns the version. A version
        another process on this machine holds is adopted when its hash is ``sha256`` (when
        given: the hash the trainer announced), and processes fetching the same version at
        once download it once (a lock file per version). Servers that cannot be reached (a
        trainer restarting) are retried with backoff for ``unavailable_after_s``; a version no
        server offers raises ``VersionNotFound`` at once."""
        from cotrain.shardcast.errors import ShardcastError, VersionNotFound

        deadline = time.monotonic() + unavailable_after_s
        delay = 0.5
        while True:
            try:
                if version is None:
                    return await self._fetch_once(servers, None, None)
                async with _file_lock(self.dir / f".v{version}.lock", timeout_s=300.0):
                    return await self._fetch_once(servers, version, sha256)
            except VersionNotFound:
                raise
            except ShardcastError as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("weights: %s; retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def _fetch_once(self, servers: list[str], version: int | None, sha256: str | None) -> int:
        from cotrain.shardcast import ClientConfig, fetch_async

        if version is not None:
            if version in self.files and self.files[version][0].exists():
                return version
            if self._adopt(version, sha256):  # another process on this machine fetched it
                return version
        cfg = ClientConfig(
            servers=servers,
            publisher_key=self.publisher_key,
            channel=self.channel,
            timeout_s=300.0,
            max_manifest_age_s=float("inf"),
        )
        target = self.dir / f"tmp-{os.getpid()}-{time.monotonic_ns()}.safetensors"
        try:
            got = await fetch_async(cfg, out=target, version=version if version else "latest")
        except BaseException:
            target.unlink(missing_ok=True)  # a failed fetch leaves nothing behind
            raise
        path = self.dir / f"v{got.version}.safetensors"
        # The hash first, then the data: a file a reader finds always has its hash beside it.
        # (Both are verified bytes of the trainer's signed manifest; a concurrent fetch of the
        # same version by another process writes the same bytes.)
        sidecar = path.with_suffix(".sha256")
        tmp_side = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
        tmp_side.write_text(got.manifest.file_sha256)
        tmp_side.replace(sidecar)
        # Linked, never renamed over: when another process got there first its file stays,
        # so every process maps the same inode and the machine holds one copy of the version.
        # (A file left by an earlier run in this directory has other bytes: replaced.)
        try:
            os.link(got.path, path)
        except FileExistsError:
            if _file_sha256(path) != got.manifest.file_sha256:
                got.path.replace(path)
        finally:
            got.path.unlink(missing_ok=True)
        self.files[got.version] = (path, got.manifest.file_sha256)
        self._retire()
        return got.version

    def _adopt(self, version: int, expected: str | None) -> bool:
        path = self.dir / f"v{version}.safetensors"
        sidecar = path.with_suffix(".sha256")
        try:
            sha = sidecar.read_text().strip()
        except OSError:
            return False
        if not path.is_file() or len(sha) != 64 or (expected is not None and sha != expected):
            return False  # (another hash: a file an earlier run left, fetched again)
        self.files[version] = (path, sha)
        return True

    def _retire(self) -> None:
        # Unlinking a file another process has mapped is safe: its pages live until unmapped.
        for old in sorted(self.files)[: -self.keep]:
            if old != self.loaded:
                path, _ = self.files.pop(old)
                path.unlink(missing_ok=True)
                path.with_suffix(".sha256").unlink(missing_ok=True)

    def sha256(self, version: int) -> str:
        return self.files[version][1]

    def load_into(self, model: Any, version: int) -> None:
        """Make ``model`` use ``version``'s weights, mapped from the file rather than copied:
        every process on this machine that holds the same version shares one copy of it in
        memory (copy-on-write pages of the page cache)."""
        if self.loaded == version:
            return
        state = map_safetensors(self.files[version][0])
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            raise RLError(
                f"version {version} does not fit the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        if tied and hasattr(model, "tie_weights"):
            model.tie_weights()  # the output layer shares the newly assigned embedding
        self.loaded = version


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}


def map_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file as views of a private (copy-on-write) memory map of
    it: no copy is made, and processes mapping the same file share its pages."""
    import json
    import mmap

    import torch

    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 0 < header_len < 100 << 20:
            raise RLError(f"{path} is not a safetensors file")
        header = json.loads(f.read(header_len))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise RLError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = getattr(torch, _DTYPES[info["dtype"]])
        start, stop = info["data_offsets"]
        count = (stop - start) // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start)
        out[name] = t.reshape(info["shape"])
    return out


def _file_sha256(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def _file_lock(path: Path, *, timeout_s: float) -> AsyncIterator[None]:
    """An exclusive ``flock`` on ``path`` between processes, waited for without blocking the
    event loop; past ``timeout_s`` the caller goes on without it (a lock only saves work)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("%s: locked for %.0f s; going on without it", path, timeout_s)
                    break
                await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock
