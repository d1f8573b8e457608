"""How bytes flow fastest: relays stream a shard on while it still arrives (and retract it if
it turns out bad), and an origin feeds its relays before any client.

In-process servers (aiohttp on port 0, loopback) driven step by step, so what the relay has
received at each moment is exact: no timing decides what these tests see.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from cotrain.core.identity import Identity
from cotrain.shardcast import ClientConfig, OriginConfig, PublishConfig, publish
from cotrain.shardcast.client import make_session
from cotrain.shardcast.config import ServeConfig, TransferConfig
from cotrain.shardcast.manifest import Manifest
from cotrain.shardcast.origin import Origin
from cotrain.shardcast.selection import ServerSelector
from cotrain.shardcast.server import ServerState, start_server
from cotrain.shardcast.store import (
    RELAY_HEADER,
    UNVERIFIED_HEADER,
    GrowingShard,
    VersionStore,
)
from cotrain.shardcast.transfer import ShardPuller

SHARD = 300_000
STEP_S = 5.0  # bound on any single wait below; a hang fails the test instead of blocking it


def blob(n: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


class Relayish:
    """A relay's server with one shard that the test feeds by hand."""

    def __init__(self, tmp: Path) -> None:
        ident = Identity.generate()
        self.origin_dir = tmp / "origin"
        self.data = blob(2 * SHARD)
        cfg = PublishConfig(shard_size_mb=SHARD / 1e6)
        res = publish(self.data, dir=self.origin_dir, identity=ident, config=cfg)
        self.manifest: Manifest = res.manifest
        self.store = VersionStore(tmp / "relay")
        self.store.write_manifest(res.version, res.signed.to_bytes())
        self.state = ServerState("relay", self.store, ServeConfig(port=0, max_wait_s=STEP_S))
        final = self.store.shard_path(res.version, 0)
        self.final = final
        self.shard = GrowingShard(final.with_name(final.name + ".part"), SHARD)
        self.state.growing[(res.version, 0)] = self.shard
        self.bytes = self.data[:SHARD]

    def arrive(self, start: int, stop: int) -> None:
        with open(self.shard.path, "r+b" if self.shard.path.exists() else "wb") as f:
            f.seek(start)
            f.write(self.bytes[start:stop])
        self.shard.wrote(start, stop - start)

    def verified(self) -> None:
        os.replace(self.shard.path, self.final)
        del self.state.growing[(self.manifest.version, 0)]
        self.shard.complete()


@pytest.mark.timeout(30)
def test_growing_shard_is_streamed_as_it_arrives(tmp_path: Path) -> None:
    relay = Relayish(tmp_path)

    async def main() -> None:
        server = await start_server(relay.state)
        relay.arrive(0, SHARD // 2)
        try:
            async with aiohttp.ClientSession() as s:
                url = f"{server.url}/v1/versions/1/shards/0"
                async with s.get(url) as resp:
                    assert resp.status == 200 and resp.headers[UNVERIFIED_HEADER] == "1"
                    assert resp.content_length == SHARD
                    got = await asyncio.wait_for(resp.content.readexactly(SHARD // 2), STEP_S)
                    relay.arrive(SHARD // 2, SHARD)
                    # All but the last byte: that one waits for the relay's hash check.
                    rest = SHARD - SHARD // 2 - 1
                    got += await asyncio.wait_for(resp.content.readexactly(rest), STEP_S)
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(resp.content.read(1), 0.3)
                    relay.verified()
                    got += await asyncio.wait_for(resp.content.read(), STEP_S)
                assert got == relay.bytes
                # Once verified, the shard is served from its file like any other.
                async with s.get(url) as resp:
                    assert UNVERIFIED_HEADER not in resp.headers
                    assert await resp.read() == relay.bytes
        finally:
            await server.close()

    asyncio.run(main())


class Sink:
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.written = 0
        self.discarded: list[int] = []
        self.completed: list[int] = []
        self.halfway = asyncio.Event()

    def write(self, index: int, pos: int, data: bytes) -> None:
        self.buf[pos : pos + len(data)] = data
        self.written += len(data)
        if self.written >= SHARD // 2:
            self.halfway.set()

    def complete(self, index: int) -> None:
        self.completed.append(index)

    def discard(self, index: int) -> None:
        self.discarded.append(index)


@pytest.mark.timeout(30)
def test_dropped_stream_is_cut_and_discarded_without_blaming_the_relay(tmp_path: Path) -> None:
    """The relay's own check failed: the client drops the bytes and gets them elsewhere."""
    relay = Relayish(tmp_path)

    async def main() -> None:
        server = await start_server(relay.state)
        origin = Origin(OriginConfig(dir=relay.origin_dir, serve=ServeConfig(port=0)))
        await origin.start()
        relay.arrive(0, SHARD // 2)
        cfg = ClientConfig(transfer=TransferConfig(exploration=0.0, stall_timeout_s=STEP_S))
        session = make_session(cfg)
        try:
            selector = ServerSelector([server.url, origin.url], exploration=0.0, seed=0)
            selector.stats[server.url].rate_bps = 1e9  # ask the relay first
            selector.stats[origin.url].rate_bps = 1.0
            sink = Sink(SHARD)
            puller = ShardPuller(session, relay.manifest, selector, sink, cfg.transfer)
            task = asyncio.create_task(puller.run([0]))
            await asyncio.wait_for(sink.halfway.wait(), STEP_S)
            relay.shard.drop()  # e.g. the relay's upstream turned out to have sent bad bytes
            report = await asyncio.wait_for(task, STEP_S)
        finally:
            await session.close()
            await server.close()
            await origin.close()
        assert sink.discarded == [0] and sink.completed == [0]
        assert bytes(sink.buf) == relay.bytes
        assert report.bad_servers == {}  # the relay cut its stream off: not a liar
        assert report.bytes_by_server == {server.url: 0, origin.url: SHARD}

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_origin_serves_clients_once_its_relays_are_fed(tmp_path: Path) -> None:
    ident = Identity.generate()
    big = 32_000_000  # far more than socket buffers hold: an unread response stays in flight
    cfg = PublishConfig(shard_size_mb=big / 1e6)
    publish(blob(big), dir=tmp_path, identity=ident, config=cfg)

    async def main() -> None:
        origin = Origin(OriginConfig(dir=tmp_path, serve=ServeConfig(port=0)))
        await origin.start()
        url = f"{origin.url}/v1/versions/1/shards/0"
        try:
            async with aiohttp.ClientSession() as s:
                relay = await s.get(url, headers={RELAY_HEADER: "1"})
                assert relay.status == 200 and origin.state.relay_streams == 1
                async with s.get(url, params={"wait_s": "0"}) as resp:
                    assert resp.status == 429  # go to a relay
                waiting = asyncio.create_task(s.get(url, params={"wait_s": "10"}))
                done, _ = await asyncio.wait({waiting}, timeout=0.3)
                assert not done  # held while the relay is still being fed
                relay.close()  # the relay is done (here: gone)
                resp = await asyncio.wait_for(waiting, STEP_S)
                assert resp.status == 200 and resp.content_length == big
                resp.close()
        finally:
            await origin.close()

    asyncio.run(main())
