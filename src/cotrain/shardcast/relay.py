"""Relays: learn of new versions from upstream at once, mirror them shard by shard, serve them.

For every upstream (the origin or another relay) a task long-polls ``/v1/versions``; the
answer comes the moment a newer version exists. The relay then fetches the manifest, accepts
it only if the publisher signed it, writes it, and starts serving the version right away:
each shard is pulled (``ShardPuller``, the same engine the clients use, over all upstreams),
verified, renamed into place, and every client request waiting for it is woken. With
``forward = "cut_through"`` (the default) clients need not wait for the whole shard: its bytes
are streamed on as they arrive, the last byte only once the shard's hash matched, and a
stream whose bytes turn out corrupt is cut off (``GrowingShard``). Versions beyond
``keep_versions`` are retired, and their unfinished mirrors cancelled.

Upstreams are not trusted either. Only versions whose signed manifest verified count as held
(a long-poll asks for versions newer than those, so an upstream that advertises version 10^15
delays nobody); a version an upstream offered but could not back with a manifest is not asked
of that upstream again for a while; and an upstream caught lying is banned for a time that
doubles with each repeat (``BanList``), never forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp

from cotrain.core.clock import SYSTEM_CLOCK, Clock
from cotrain.shardcast import wire
from cotrain.shardcast.config import ClientConfig, RelayConfig
from cotrain.shardcast.errors import (
    MalformedResponse,
    ManifestError,
    ShardcastError,
    VersionNotFound,
)
from cotrain.shardcast.manifest import Manifest, SignedManifest, TrustPolicy
from cotrain.shardcast.selection import BanList, ServerSelector
from cotrain.shardcast.server import RunningServer, ServerState, start_server
from cotrain.shardcast.store import RELAY_HEADER, ChangeFeed, GrowingShard, VersionStore
from cotrain.shardcast.transfer import ShardPuller

log = logging.getLogger("cotrain.shardcast.relay")

# Rounds of asking every upstream for a version's manifest before giving that version up.
_MANIFEST_ROUNDS = 3
# A version an upstream offered but nobody could back with a manifest is not begun again on
# that upstream's word for this many retry intervals.
_GIVE_UP_INTERVALS = 10


class _ShardFiles:
    """A ``ShardSink`` writing each shard to ``shard_i.bin.part``, renamed once verified.

    With cut-through forwarding each shard in progress is registered in ``growing`` as soon as
    its first bytes are written, so the server streams it to clients while it arrives.
    """

    def __init__(
        self,
        store: VersionStore,
        manifest: Manifest,
        feed: ChangeFeed,
        growing: dict[tuple[int, int], GrowingShard] | None,
    ) -> None:
        self.store, self.manifest, self.feed, self.growing = store, manifest, feed, growing
        self.version = manifest.version
        self._fds: dict[int, int] = {}

    def _part(self, index: int) -> Path:
        path = self.store.shard_path(self.version, index)
        return path.with_name(path.name + ".part")

    def write(self, index: int, pos: int, data: bytes) -> None:
        fd = self._fds.get(index)
        if fd is None:
            fd = self._fds[index] = os.open(self._part(index), os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(fd, data, pos)
        if self.growing is not None:
            key = (self.version, index)
            shard = self.growing.get(key)
            if shard is None:
                size = self.manifest.shards[index].size
                shard = self.growing[key] = GrowingShard(self._part(index), size)
                self.feed.notify()  # requests held for this shard can start streaming
            shard.wrote(pos, len(data))

    def discard(self, index: int) -> None:
        shard = self.growing.get((self.version, index)) if self.growing is not None else None
        if shard is not None:
            shard.drop()

    def complete(self, index: int) -> None:
        fd = self._fds.pop(index, None)
        if fd is not None:
            os.close(fd)
        os.replace(self._part(index), self.store.shard_path(self.version, index))
        if self.growing is not None:
            shard = self.growing.pop((self.version, index), None)
            if shard is not None:
                shard.complete()
        self.feed.notify()

    def close(self) -> None:
        """The pull ended: shards still in progress are abandoned (their readers cut off)."""
        for index, fd in self._fds.items():
            os.close(fd)
            if self.growing is not None:
                shard = self.growing.pop((self.version, index), None)
                if shard is not None:
                    shard.drop()
        self._fds.clear()


class Relay:
    """A relay over ``config.dir``; ``await start()``, then ``await close()``.

    ``clock`` times the bans of upstreams and the versions given up (tests inject a fake one).
    """

    def __init__(self, config: RelayConfig, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if not config.upstreams:
            raise ValueError("a relay needs at least one upstream: pass --upstream URL[,URL...]")
        if not config.publisher_key:
            raise ValueError("a relay needs the publisher's key (--publisher-key HEX)")
        self.config = config
        self.store = VersionStore(config.dir)
        self.state = ServerState("relay", self.store, config.serve, config.fault)
        self.state.status = self._status
        self.policy = TrustPolicy(config.publisher_key, config.channel)
        self._clock = clock
        self._upstream_status: dict[str, str] = {u: "not contacted yet" for u in config.upstreams}
        self._bans = BanList(
            base_s=config.upstream_ban_s, max_s=config.upstream_ban_max_s, clock=clock
        )
        # (upstream, version) -> until: versions offered that no upstream backed with a manifest
        self._given_up: dict[tuple[str, int], float] = {}
        self._pulling: set[ServerSelector] = set()  # of the pulls under way (for bans so far)
        self._mirrors: dict[int, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._server: RunningServer | None = None
        self._session: aiohttp.ClientSession | None = None

    def _status(self) -> dict[str, Any]:
        return {
            "upstreams": dict(self._upstream_status),
            "bad_upstreams": {
                **{u: w for sel in self._pulling for u, w in sel.report().items()},
                **self._bans.active(),
            },
            "mirroring": sorted(v for v, t in self._mirrors.items() if not t.done()),
        }

    async def start(self) -> str:
        from cotrain.shardcast.client import make_session

        self._session = make_session(ClientConfig(transfer=self.config.transfer))
        self._server = await start_server(self.state)
        for v in self.store.versions():  # finish what a previous run left unfinished
            self._begin(v, self.config.upstreams[0])
        for up in self.config.upstreams:
            self._tasks.append(asyncio.create_task(self._watch(up)))
        return self._server.url

    async def close(self) -> None:
        for t in [*self._tasks, *self._mirrors.values()]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._mirrors.values(), return_exceptions=True)
        if self._server is not None:
            await self._server.close()
        if self._session is not None:
            await self._session.close()

    def _held(self) -> int:
        """The newest version whose signed manifest verified here (0: none)."""
        return self.store.latest() or 0

    def _holds_newer_than(self, version: int) -> bool:
        return self._held() > version

    async def _watch(self, upstream: str) -> None:
        """Long-poll one upstream forever; start a mirror for every new version it has."""
        assert self._session is not None
        cfg = self.config
        loop = asyncio.get_running_loop()
        while True:
            if upstream in self._bans:  # not asked anything until its ban runs out
                self._upstream_status[upstream] = "banned (see bad_upstreams)"
                await asyncio.sleep(cfg.retry_interval_s)
                continue
            # Only verified versions count: what an upstream merely claims moves nothing.
            after = self._held()
            url = f"{upstream}/v1/versions?after={after}&wait_s={cfg.poll_wait_s:g}"
            t0 = loop.time()
            try:
                async with asyncio.timeout(cfg.poll_wait_s + cfg.transfer.connect_timeout_s + 5):
                    offered = await wire.get_versions(self._session, url)
                self._upstream_status[upstream] = "ok"
            except (aiohttp.ClientError, TimeoutError, MalformedResponse) as e:
                self._upstream_status[upstream] = f"unreachable: {type(e).__name__}: {e}"[:200]
                log.info("upstream %s: %s", upstream, self._upstream_status[upstream])
                if isinstance(e, MalformedResponse):
                    self._bans.ban(upstream, f"malformed versions listing: {e}"[:300])
                await asyncio.sleep(cfg.retry_interval_s)
                continue
            began = [
                v for v in offered[-cfg.keep_versions :] if v > after and self._begin(v, upstream)
            ]
            if not began and loop.time() - t0 < cfg.poll_wait_s / 2:
                # Answered at once with nothing to start (versions already being mirrored, or
                # ones it could not back): ask again once a version verified here, or later.
                await self.state.feed.wait_until(
                    functools.partial(self._holds_newer_than, after), cfg.retry_interval_s
                )

    def _begin(self, version: int, upstream: str) -> bool:
        """Start mirroring ``version`` on ``upstream``'s word; False if there is nothing to do."""
        task = self._mirrors.get(version)
        if task is not None and not task.done():
            return False
        if task is not None and self._complete(version):
            return False
        now = self._clock.monotonic()
        if self._given_up.get((upstream, version), now) > now:
            return False
        held = set(self.store.versions())
        for v in [v for v, t in self._mirrors.items() if t.done() and v not in held]:
            del self._mirrors[v]  # finished without a manifest (given up) or retired
        self._mirrors[version] = asyncio.create_task(self._mirror(version, upstream))
        return True

    def _complete(self, version: int) -> bool:
        raw = self.store.read_manifest(version)
        if raw is None:
            return False
        try:
            m = SignedManifest.parse(raw).manifest
        except ManifestError:
            return False
        return all(self.store.has_shard(version, i) for i in range(len(m.shards)))

    async def _mirror(self, version: int, announced_by: str) -> None:
        try:
            manifest = await self._manifest(version)
        except ShardcastError as e:
            log.warning("not mirroring v%d (offered by %s): %s", version, announced_by, e)
            now = self._clock.monotonic()
            for key in [k for k, until in self._given_up.items() if until <= now]:
                del self._given_up[key]
            until = now + _GIVE_UP_INTERVALS * self.config.retry_interval_s
            self._given_up[(announced_by, version)] = until
            return
        while True:
            missing = [
                i for i in range(len(manifest.shards)) if not self.store.has_shard(version, i)
            ]
            if not missing:
                log.info("v%d mirrored", version)
                return
            try:
                await self._pull(manifest, missing)
            except ShardcastError as e:
                log.warning("mirroring v%d: %s; trying again", version, e)
                await asyncio.sleep(self.config.retry_interval_s)

    async def _manifest(self, version: int) -> Manifest:
        """The verified manifest of ``version``: from disk, else from the upstreams.

        Every upstream not banned is asked at once, and the first manifest that verifies wins
        (an upstream that stalls delays nobody). One that serves a bad manifest is banned.
        After ``_MANIFEST_ROUNDS`` rounds without one, ``VersionNotFound``.
        """
        raw = self.store.read_manifest(version)
        if raw is not None:
            return SignedManifest.parse(raw).manifest
        for round_ in range(_MANIFEST_ROUNDS):
            if round_:
                await asyncio.sleep(self.config.retry_interval_s)
            ups = [u for u in self.config.upstreams if u not in self._bans]
            tasks = [asyncio.create_task(self._manifest_from(u, version)) for u in ups]
            try:
                for next_done in asyncio.as_completed(tasks):
                    signed = await next_done
                    if signed is not None:
                        self._publish_manifest(version, signed.to_bytes())
                        return signed.manifest
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        raise VersionNotFound(
            f"no upstream delivered a trustworthy manifest of v{version} "
            f"(banned: {self._bans.active() or 'none'})"
        )

    async def _manifest_from(self, upstream: str, version: int) -> SignedManifest | None:
        assert self._session is not None
        try:
            async with asyncio.timeout(self.config.transfer.connect_timeout_s + 10):
                raw = await wire.get_manifest(
                    self._session, f"{upstream}/v1/versions/{version}/manifest"
                )
            signed = SignedManifest.parse(raw)
            self.policy.check(signed, expected_version=version)
            return signed
        except (ManifestError, MalformedResponse) as e:
            log.warning("upstream %s served a bad manifest for v%d: %s", upstream, version, e)
            self._bans.ban(upstream, f"bad manifest for v{version}: {e}"[:300])
        except (aiohttp.ClientError, TimeoutError) as e:
            log.info("manifest v%d from %s: %s", version, upstream, e)
        return None

    def _publish_manifest(self, version: int, raw: bytes) -> None:
        """Make the version visible, then retire what falls out of the window."""
        self.store.write_manifest(version, raw)
        held = self.store.versions()
        if len(held) > self.config.keep_versions:
            oldest_kept = held[-self.config.keep_versions]
            for v in [v for v in self._mirrors if v < oldest_kept]:
                self._mirrors.pop(v).cancel()
            for v in self.store.retire(self.config.keep_versions):
                self.state._manifests.pop(v, None)
        self.state.feed.notify()

    async def _pull(self, manifest: Manifest, missing: list[int]) -> None:
        assert self._session is not None
        ups = [u for u in self.config.upstreams if u not in self._bans]
        selector = ServerSelector(
            ups or self.config.upstreams,
            exploration=self.config.transfer.exploration,
            seed=self.config.transfer.seed,
        )
        growing = self.state.growing if self.config.forward == "cut_through" else None
        sink = _ShardFiles(self.store, manifest, self.state.feed, growing)
        self._pulling.add(selector)
        try:
            puller = ShardPuller(
                self._session,
                manifest,
                selector,
                sink,
                self.config.transfer,
                headers={RELAY_HEADER: "1"},
            )
            report = await puller.run(missing)
        finally:
            self._pulling.discard(selector)
            sink.close()
            for url, why in selector.report().items():
                self._bans.ban(url, why)
        log.info("v%d: %d shards in %.2f s", manifest.version, report.shards, report.seconds)


async def serve_forever(server: Any, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then close ``server`` (an Origin or a Relay)."""
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.close()
