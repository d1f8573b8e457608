"""shardcast relays against upstreams that lie, advertise what they do not have, or flood.

A relay must keep mirroring from its honest upstreams whatever the others do, count only
versions whose signed manifests verified, and forgive an upstream whose ban ran out. Real
servers on loopback, port 0, in this process (``shardcast_harness``); every wait is a
long-poll or an event, under a hard bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from shardcast_harness import (
    SHARD,
    Hostile,
    World,
    blob,
    long_poll,
    make_world,
    origin_for,
    run,
)

from cotrain.shardcast import Relay
from cotrain.shardcast.selection import BanList


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


# -- 1. a malformed versions listing -------------------------------------------------------


@pytest.mark.timeout(30)
def test_relay_survives_a_malformed_listing(world: World) -> None:
    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def listing(request: web.Request) -> web.StreamResponse:
            return web.Response(body=b'{"versions": [Infinity]}', content_type="application/json")

        hostile.versions = listing
        await hostile.start()
        relay = Relay(world.relay_config([hostile.url, origin.url], "relay"))
        url = await relay.start()
        try:
            assert await long_poll(url, after=0) == [1]
            got = await world.fetch([url], "out.bin")
            assert got.path.read_bytes() == world.data[0]
            world.publish(blob(3 * SHARD, seed=2))  # the relay's watch of the origin still runs
            assert await long_poll(url, after=1) == [1, 2]
            assert hostile.url in relay._status()["bad_upstreams"]
        finally:
            await relay.close()
            await hostile.close()
            await origin.close()

    run(main)


# -- 4. bans expire ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t


def test_bans_expire_double_and_are_forgiven() -> None:
    clock = FakeClock()
    bans = BanList(base_s=10.0, max_s=100.0, clock=clock)
    bans.ban("a", "forged manifest")
    assert "a" in bans and bans.active() == {"a": "forged manifest"}
    clock.t = 10.0
    assert "a" not in bans and bans.active() == {}
    bans.ban("a", "again")  # a repeat soon after: twice as long
    clock.t = 29.0
    assert "a" in bans
    clock.t = 30.0
    assert "a" not in bans
    for _ in range(10):
        bans.ban("a", "and again")
    clock.t += 99.0
    assert "a" in bans  # capped at max_s
    clock.t += 1.0
    assert "a" not in bans
    clock.t += 100.0  # behaved for max_s after its ban: forgiven, back to base_s
    bans.ban("a", "once more")
    clock.t += 10.0
    assert "a" not in bans


@pytest.mark.timeout(30)
def test_relay_forgives_an_upstream_that_lied_once(world: World) -> None:
    """A relay's only upstream served one forged manifest, then behaved: it is used again."""

    async def main() -> None:
        hostile = Hostile(world.origin_dir)

        async def forged_once(request: web.Request) -> web.StreamResponse:
            if hostile.hits["manifest"] == 1:
                env = hostile.signed(int(request.match_info["version"])).envelope.to_json()
                env["body"]["shards"][0]["sha256"] = "0" * 64
                return web.json_response(env)
            return await hostile.honest_manifest(request)

        hostile.manifest = forged_once
        await hostile.start()
        relay = Relay(world.relay_config([hostile.url], "relay", upstream_ban_s=0.2))
        url = await relay.start()
        try:
            assert await long_poll(url, after=0) == [1]
            got = await world.fetch([url], "out.bin")
        finally:
            await relay.close()
            await hostile.close()
        assert got.path.read_bytes() == world.data[0]
        assert hostile.hits["manifest"] >= 2  # asked again once the ban ran out

    run(main)


# -- 5. a huge advertised version --------------------------------------------------------------


@pytest.mark.timeout(30)
def test_huge_advertised_version_stops_nobody(world: World) -> None:
    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def huge(request: web.Request) -> web.StreamResponse:
            return web.json_response({"versions": [10**15]})

        hostile.versions = huge  # and its manifest: 404 (it has none)
        await hostile.start()
        relay = Relay(world.relay_config([hostile.url, origin.url], "relay"))
        url = await relay.start()
        try:
            assert await long_poll(url, after=0) == [1]
            world.publish(blob(3 * SHARD, seed=2))
            assert await long_poll(url, after=1) == [1, 2]
            got = await world.fetch([url], "relay.bin")
            direct = await world.fetch([hostile.url, origin.url], "direct.bin")
        finally:
            await relay.close()
            await hostile.close()
            await origin.close()
        assert got.version == 2 and got.path.read_bytes() == world.data[1]
        assert direct.version == 2 and direct.path.read_bytes() == world.data[1]
        assert direct.bad_servers == {}  # a 404 is not a lie
        # The hostile's bogus version is given up, not chased in a loop.
        assert hostile.hits["manifest"] < 50, hostile.hits

    run(main)
