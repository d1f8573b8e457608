"""Pulling the shards of one version from a set of servers, in parallel, verifying each.

Used by clients (shards land at their offsets in one output file) and by relays (each shard
lands in its own file, served as soon as it is verified). ``parallel_downloads`` workers take
shards from a queue; for each attempt a worker asks the ``ServerSelector`` for a server and
streams the shard, hashing every chunk as it arrives (hashlib, whole chunks: no per-byte
Python). What can happen to an attempt:

- the bytes arrive and hash right: the shard is done and the server's rate is measured;
- the connection fails or stalls (no byte for ``stall_timeout_s``, or less than
  ``stall_min_kb`` in that time: a trickle is a stall): the bytes so far are kept
  and the next attempt asks another server for the rest (HTTP Range), unless they came from a
  relay that was still receiving the shard itself (``UNVERIFIED_HEADER``: it cuts the stream
  off when its own hash check fails, so a cut stream's bytes are dropped, and the relay is not
  blamed for them);
- all the shard's bytes arrived: the shard is checked at once, whether or not the server ends
  its response (one that sends every byte and then hangs gains nothing);
- the hash is wrong: the bytes are dropped. If one server sent them all, it is banned: its
  bytes are proven bad. If several contributed (a resumed download), nobody can tell whose
  bytes were bad, so nobody is blamed and the shard is fetched again whole from one server
  (``_Partial.solo``), which then alone answers for what it sends;
- the server does not have the shard yet (503, a relay still mirroring) or not the version
  (404, a relay that has not heard of it), or is busy feeding relays (429, an origin): another
  server is asked, and once every server has said so the best one is asked to hold the
  request until it can send the shard (one that lacks the shard before a busy one).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from cotrain.shardcast.config import TransferConfig
from cotrain.shardcast.errors import IntegrityError, UpstreamUnavailable, VersionNotFound
from cotrain.shardcast.manifest import Manifest
from cotrain.shardcast.selection import ServerSelector
from cotrain.shardcast.store import UNVERIFIED_HEADER

log = logging.getLogger("cotrain.shardcast.transfer")

# A version every server has answered 404 for this many rounds in a row is gone (retired).
_NOT_FOUND_ROUNDS = 3
_CONTENT_RANGE = re.compile(r"^bytes (\d{1,16})-(\d{1,16})/(\d{1,16})$")


class ShardSink(Protocol):
    """Where verified bytes go."""

    def write(self, index: int, pos: int, data: bytes) -> None:
        """Write ``data`` at byte ``pos`` of shard ``index`` (not yet verified)."""

    def complete(self, index: int) -> None:
        """Shard ``index`` is whole and its hash matched."""

    def discard(self, index: int) -> None:
        """The bytes of shard ``index`` written so far are dropped; writing starts again at 0."""


@dataclass
class TransferReport:
    """What a transfer did."""

    shards: int
    bytes: int
    seconds: float
    bytes_by_server: dict[str, int]
    bad_servers: dict[str, str]
    failed_attempts: int


@dataclass
class _Partial:
    """Bytes of one shard received so far (possibly from several servers)."""

    have: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    contributors: set[str] = field(default_factory=set)
    # Set once bytes from several servers failed the hash: from then on every attempt starts
    # from byte 0 and keeps nothing it does not finish, so a mismatch names one server.
    solo: bool = False

    def reset(self) -> None:
        self.have, self.hasher, self.contributors = 0, hashlib.sha256(), set()


class _Retry(Exception):
    """One attempt ended without the shard.

    ``status`` 404/503 means the server does not have it (yet), 429 that it is busy: not a
    failure. ``None`` means a
    real failure (error, stall, truncation, corruption) that counts toward the attempt limit;
    ``innocent`` marks one that is no fault of the server asked (it may be asked again at once).
    """

    def __init__(self, reason: str, *, status: int | None = None, innocent: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.innocent = innocent


class ShardPuller:
    """Pulls the listed shards of ``manifest`` into ``sink``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        manifest: Manifest,
        selector: ServerSelector,
        sink: ShardSink,
        config: TransferConfig,
        on_bytes: Callable[[int], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.session = session
        self.manifest = manifest
        self.selector = selector
        self.sink = sink
        self.config = config
        self.on_bytes = on_bytes
        self.headers = dict(headers or {})  # sent with every shard request
        self._failed = 0
        self._bytes = 0

    async def run(self, indices: list[int]) -> TransferReport:
        t0 = time.monotonic()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in indices:
            queue.put_nowait(i)
        workers = min(self.config.parallel_downloads, len(indices))
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(workers):
                    tg.create_task(self._worker(queue))
        except BaseExceptionGroup as group:
            # Surface the first real error, not the group (siblings were cancelled by it).
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return TransferReport(
            shards=len(indices),
            bytes=self._bytes,
            seconds=time.monotonic() - t0,
            bytes_by_server={u: s.bytes_ok for u, s in self.selector.stats.items()},
            bad_servers=self.selector.report(),
            failed_attempts=self._failed,
        )

    async def _worker(self, queue: asyncio.Queue[int]) -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await self._pull(index)

    async def _pull(self, index: int) -> None:
        part = _Partial()
        failures = 0
        not_here: set[str] = set()  # servers that answered 503/404 for this shard lately
        busy: set[str] = set()  # servers that answered 429 (an origin feeding its relays)
        failed: set[str] = set()  # servers that failed this shard lately
        gone_rounds = 0
        while True:
            server = self.selector.choose(avoid=not_here | busy | failed)
            wait_s = 0.0
            if server is None:
                healthy = set(self.selector.healthy())
                if not healthy:
                    raise UpstreamUnavailable(f"every server misbehaved: {self.selector.report()}")
                waiting = (not_here & healthy) or (busy & healthy)
                if not waiting:
                    # Every server failed this shard lately: start a new round after a pause.
                    failed.clear()
                    await asyncio.sleep(0.2)
                    continue
                # Nobody can send it now: ask the best of those who will to hold the request.
                server = self.selector.choose(avoid=healthy - waiting)
                assert server is not None
                not_here.clear()
                busy.clear()
                wait_s = self.config.shard_wait_s
            try:
                await self._attempt(server, index, part, wait_s)
                return
            except _Retry as r:
                if r.status is None:
                    if not r.innocent:
                        failed.add(server)
                    failures += 1
                    self._failed += 1
                    log.info("shard %d from %s: %s (failure %d)", index, server, r, failures)
                    if failures >= self.config.max_attempts_per_shard:
                        raise UpstreamUnavailable(
                            f"shard {index} of v{self.manifest.version} failed "
                            f"{failures} times; last from {server}: {r}"
                        ) from None
                    continue
                (busy if r.status == 429 else not_here).add(server)
                if wait_s > 0 and r.status == 404:
                    # Even the server we asked to wait does not know the version: it was
                    # retired, or the server that announced it is gone. Give relays a moment.
                    gone_rounds += 1
                    if gone_rounds >= _NOT_FOUND_ROUNDS:
                        raise VersionNotFound(
                            f"v{self.manifest.version} is no longer offered by any server"
                        ) from None
                    await asyncio.sleep(0.5)
                elif wait_s > 0:
                    gone_rounds = 0

    async def _attempt(self, server: str, index: int, part: _Partial, wait_s: float) -> None:
        shard = self.manifest.shards[index]
        cfg = self.config
        url = f"{server}/v1/versions/{self.manifest.version}/shards/{index}"
        headers = dict(self.headers)
        if part.have:
            headers["Range"] = f"bytes={part.have}-"
        self.selector.started(server)
        t0 = time.monotonic()
        got = 0
        unverified = False
        try:
            async with asyncio.timeout(cfg.connect_timeout_s + wait_s + cfg.stall_timeout_s):
                resp = await self.session.get(
                    url, params={"wait_s": f"{wait_s:g}"}, headers=headers, allow_redirects=False
                )
            # Leaving this block before the body ended (the shard is whole; a server that never
            # ends its response) closes the connection instead of returning it to the pool.
            async with resp:
                if resp.status in (404, 429, 503):
                    raise _Retry(f"HTTP {resp.status}", status=resp.status)
                if resp.status not in (200, 206):
                    raise _Retry(f"HTTP {resp.status}")
                if resp.status == 206 and not _range_is(resp, part.have, shard.size):
                    raise _Retry(f"answered Range {part.have}- with {_content_range(resp)!r}")
                if resp.status == 200 and part.have:
                    self._discard(index, part)  # the server ignored our Range: start over
                unverified = UNVERIFIED_HEADER in resp.headers
                t0 = time.monotonic()  # measure the transfer, not the wait for the shard
                lowat = _LowWater(resp, cfg.rcvlowat_kb * 1024)
                chunk_size = cfg.read_chunk_kb * 1024
                # Progress is checked per stall_timeout_s window, so a trickle counts as a stall.
                window_end, window_from = t0 + cfg.stall_timeout_s, got
                # Never read past the shard's signed size: what a server sends beyond it is
                # not ours to buffer, and the shard is checked as soon as it is whole.
                while part.have < shard.size:
                    lowat.before_read(stop_at=got + shard.size - part.have)
                    async with asyncio.timeout(cfg.stall_timeout_s):
                        chunk = await resp.content.read(min(chunk_size, shard.size - part.have))
                    if not chunk:
                        break
                    now = time.monotonic()
                    if now >= window_end:
                        if got + len(chunk) - window_from < cfg.stall_min_kb * 1024:
                            raise TimeoutError(
                                f"under {cfg.stall_min_kb:g} KB in {cfg.stall_timeout_s:g} s"
                            )
                        window_end, window_from = now + cfg.stall_timeout_s, got + len(chunk)
                    part.contributors.add(server)
                    part.hasher.update(chunk)
                    self.sink.write(index, part.have, chunk)
                    part.have += len(chunk)
                    got += len(chunk)
                    if self.on_bytes is not None:
                        self.on_bytes(len(chunk))
                lowat.reset()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            self.selector.record_failure(server, f"{type(e).__name__}: {e}"[:200])
            if unverified or part.solo:
                self._discard(index, part)
            raise _Retry(f"{type(e).__name__}: {e}") from None
        finally:
            self.selector.finished(server)
        if part.have < shard.size:
            self.selector.record_failure(server, "truncated")
            if unverified or part.solo:
                self._discard(index, part)
            raise _Retry(f"truncated at {part.have}/{shard.size} bytes")
        if part.hasher.hexdigest() != shard.sha256:
            self._corrupt(index, part, "hash mismatch")
        self.selector.record_success(server, got, time.monotonic() - t0)
        self._bytes += got
        self.sink.complete(index)

    def _corrupt(self, index: int, part: _Partial, what: str) -> None:
        """Drop the bytes; blame their sender if there was only one; make the caller retry."""
        reason = f"corrupt shard {index} of v{self.manifest.version} ({what})"
        innocent = len(part.contributors) != 1
        if innocent:
            # A resumed download: the bad bytes may be the first server's, the resumer's, or
            # both. Blame nobody; fetch the shard again whole from one server, which is then
            # the only one its bytes can prove wrong.
            log.info("%s from %s; fetching it whole from one server", reason, part.contributors)
            part.solo = True
        else:
            (server,) = part.contributors
            log.warning("banning %s: %s", server, reason)
            self.selector.ban(server, reason)
        self._discard(index, part)
        raise _Retry(reason, innocent=innocent)

    def _discard(self, index: int, part: _Partial) -> None:
        if self.on_bytes is not None:
            self.on_bytes(-part.have)
        part.reset()
        self.sink.discard(index)


def _content_range(resp: aiohttp.ClientResponse) -> str:
    return resp.headers.get("Content-Range", "")[:100]


def _range_is(resp: aiohttp.ClientResponse, start: int, size: int) -> bool:
    """Whether a 206 answer carries the bytes from ``start`` to the end of a ``size`` shard."""
    m = _CONTENT_RANGE.match(_content_range(resp))
    return m is not None and (int(m[1]), int(m[2]), int(m[3])) == (start, size - 1, size)


class _LowWater:
    """SO_RCVLOWAT on the response's socket: wake us once per ``lowat`` bytes, not per packet.

    On a slow link packets arrive one by one, and waking the event loop for each costs more
    CPU than the bytes themselves. The mark never exceeds what the body still has to deliver,
    nor what we still want of it (or the last bytes would never wake us), and is reset before
    the connection is reused.
    """

    def __init__(self, resp: aiohttp.ClientResponse, lowat: int) -> None:
        self.resp, self.lowat = resp, lowat
        self.sock = None
        self.set_to = 1
        if lowat > 1 and resp.content_length and resp.connection is not None:
            transport = resp.connection.transport
            self.sock = transport.get_extra_info("socket") if transport is not None else None

    def before_read(self, *, stop_at: int) -> None:
        """Set the mark for the next read; we read the body up to byte ``stop_at`` at most."""
        if self.sock is None:
            return
        assert self.resp.content_length is not None
        received = self.resp.content.total_bytes
        on_the_wire = min(self.resp.content_length, stop_at) - received
        want = max(1, min(self.lowat, on_the_wire))
        if want != self.set_to:
            self._set(want)

    def reset(self) -> None:
        if self.sock is not None and self.set_to != 1:
            self._set(1)

    def _set(self, value: int) -> None:
        assert self.sock is not None
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
            self.set_to = value
        except OSError:
            self.sock = None  # closed under us: nothing left to tune


def check_complete(manifest: Manifest, done: set[int]) -> None:
    missing = [i for i in range(len(manifest.shards)) if i not in done]
    if missing:
        raise IntegrityError(f"v{manifest.version}: shards {missing[:8]} never verified")
