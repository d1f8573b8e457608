"""shardcast clients (and servers) against servers that lie, hang, flood and stall on purpose.

The rule under test: with at least one honest server listed, a fetch ends with the publisher's
exact bytes whatever the others do, and blames only a server whose own bytes were bad. Each
test runs real servers on loopback, port 0, in this process: the honest side is shardcast's
own ``Origin``, the hostile side ``shardcast_harness.Hostile``, an aiohttp app that answers
like a shardcast server except where the test says otherwise. Nothing waits on a timer: every
wait is a long-poll or an event, under a hard bound. Relays: test_shardcast_hostile_relays.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from pathlib import Path

import aiohttp
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
from cotrain.shardcast.errors import StaleVersionError
from cotrain.shardcast.store import VersionStore


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


# -- 1. malformed versions listings ------------------------------------------------------------

LISTINGS = {
    "infinity": b'{"versions": [Infinity]}',
    "nan": b'{"versions": [1, NaN]}',
    "overflowing float": b'{"versions": [1e400]}',
    "300 digits": b'{"versions": [' + b"9" * 300 + b"]}",
    "deep nesting": b'{"versions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "strings": b'{"versions": ["1"]}',
    "negative": b'{"versions": [-1]}',
    "not an object": b"[1, 2, 3]",
    "not JSON": b"\xff\xfe<html>",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(LISTINGS))
def test_malformed_versions_listing(world: World, kind: str) -> None:
    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def listing(request: web.Request) -> web.StreamResponse:
            return web.Response(body=LISTINGS[kind], content_type="application/json")

        hostile.versions = listing
        await hostile.start()
        try:
            got = await world.fetch([hostile.url, origin.url], "out.bin")
        finally:
            await hostile.close()
            await origin.close()
        assert got.path.read_bytes() == world.data[0]
        assert list(got.bad_servers) == [hostile.url]
        assert "malformed versions listing" in got.bad_servers[hostile.url]

    run(main)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("route", ["versions", "manifest"])
def test_a_server_that_holds_its_answer_holds_nobody(world: World, route: str) -> None:
    """A listing or manifest request held open for good delays a fetch by a grace period
    (connect_timeout_s, or the 1 s manifest hedge), not by the whole long-poll window or the
    request's timeout: 15 s or more here, against 8 s allowed."""
    # The listing's grace is connect_timeout_s; the manifest's timeout is connect_timeout_s + 10.
    connect_s = 0.5 if route == "versions" else 5.0

    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def hold(request: web.Request) -> web.StreamResponse:
            await hostile.released.wait()
            raise web.HTTPServiceUnavailable()

        setattr(hostile, route, hold)
        await hostile.start()
        t0 = time.monotonic()
        try:
            got = await world.fetch(
                [hostile.url, origin.url],
                "out.bin",
                wait_s=10.0,
                transfer={"connect_timeout_s": connect_s},
            )
        finally:
            await hostile.close()
            await origin.close()
        assert got.path.read_bytes() == world.data[0]
        assert got.bad_servers == {}
        assert time.monotonic() - t0 < 8.0

    run(main)


@pytest.mark.timeout(30)
def test_redirects_are_not_followed(world: World) -> None:
    """A peer cannot point us at another address (an internal service, say)."""

    async def main() -> None:
        origin = await origin_for(world)
        canary = Hostile(world.origin_dir)  # stands for an address nobody should be sent to
        await canary.start()
        hostile = Hostile(world.origin_dir)

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(location=canary.url + request.path_qs)

        await hostile.start()
        try:
            hostile.shard = redirect
            got = await world.fetch([hostile.url, origin.url], "shards.bin")
            assert got.path.read_bytes() == world.data[0] and got.bad_servers == {}
            hostile.versions = redirect
            got = await world.fetch([hostile.url, origin.url], "listing.bin")
            assert got.path.read_bytes() == world.data[0]
            assert "HTTP 302" in got.bad_servers[hostile.url]
            hostile.versions, hostile.manifest = hostile.honest_versions, redirect
            got = await world.fetch([hostile.url, origin.url], "manifest.bin")
            assert got.path.read_bytes() == world.data[0]
            assert "HTTP 302" in got.bad_servers[hostile.url]
        finally:
            await hostile.close()
            await canary.close()
            await origin.close()
        assert hostile.hits["shard"] >= 1 and sum(canary.hits.values()) == 0

    run(main)


# -- 2. a response that sends every byte and never ends ----------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("framing", ["chunked", "content_length_too_long"])
def test_response_that_never_ends(world: World, framing: str) -> None:
    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def endless(request: web.Request) -> web.StreamResponse:
            data = hostile.shard_bytes(request)
            resp = web.StreamResponse()
            if framing == "content_length_too_long":
                resp.content_length = len(data) + 10_000
            await resp.prepare(request)
            await resp.write(data)  # every byte, right ones...
            await hostile.released.wait()  # ...and then nothing, ever
            return resp

        hostile.shard = endless
        await hostile.start()
        try:
            # A stall timeout longer than the test: only a client that stops at the shard's
            # size finishes in time.
            got = await world.fetch(
                [hostile.url, origin.url], "out.bin", transfer={"parallel_downloads": 2}
            )
        finally:
            await hostile.close()
            await origin.close()
        assert got.path.read_bytes() == world.data[0]
        assert got.bad_servers == {}
        assert got.bytes_by_server[hostile.url] > 0  # its bytes were right, and were used
        assert all(r == "" for r in hostile.ranges)  # nobody was asked for an empty range

    run(main)


@pytest.mark.timeout(30)
def test_a_trickling_response_counts_as_stalled(world: World) -> None:
    """A few bytes at a time, never a pause as long as the stall timeout: still a stall."""

    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def trickle(request: web.Request) -> web.StreamResponse:
            data = hostile.shard_bytes(request)
            resp = web.StreamResponse()  # chunked: no Content-Length, so no SO_RCVLOWAT either
            await resp.prepare(request)
            with contextlib.suppress(ConnectionError):
                for pos in range(0, len(data), 64):  # 64 bytes per 20 ms: 200 KB in a minute
                    await resp.write(data[pos : pos + 64])
                    await asyncio.sleep(0.02)  # the hostile's pace, not a synchronisation
            return resp

        hostile.shard = trickle
        await hostile.start()
        try:
            got = await world.fetch(
                [hostile.url, origin.url],
                "out.bin",
                transfer={"parallel_downloads": 2, "stall_timeout_s": 0.5},
            )
        finally:
            await hostile.close()
            await origin.close()
        assert got.path.read_bytes() == world.data[0]
        assert got.bad_servers == {}  # slow is not a lie
        assert hostile.hits["shard"] >= 1

    run(main)


# -- 3. half a shard corrupted, then the connection closed -------------------------------------


@pytest.mark.timeout(30)
def test_corrupt_half_then_close_blames_nobody_honest(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def half_corrupt(request: web.Request) -> web.StreamResponse:
            data = hostile.shard_bytes(request)
            resp = web.StreamResponse()
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(bytes(b ^ 0xFF for b in data[: len(data) // 2]))
            assert request.transport is not None
            request.transport.close()  # gone, as if the link dropped
            return resp

        hostile.shard = half_corrupt
        await hostile.start()
        try:
            got = await world.fetch(
                [hostile.url, origin.url], "out.bin", transfer={"parallel_downloads": 2}
            )
        finally:
            await hostile.close()
            await origin.close()
        assert got.path.read_bytes() == world.data[0]
        assert origin.url not in got.bad_servers  # it resumed the hostile's bytes: not its fault
        assert got.bad_servers == {}  # and the hostile's bytes were never proven bad alone
        assert hostile.hits["shard"] >= 1
        assert any("fetching it whole from one server" in r.message for r in caplog.records)

    caplog.set_level(logging.INFO, logger="cotrain.shardcast.transfer")
    run(main)


@pytest.mark.timeout(30)
def test_a_whole_corrupt_shard_blames_its_sender(world: World) -> None:
    """The other side of 3: bytes one server sent alone are proof, and it is banned."""

    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def corrupt(request: web.Request) -> web.StreamResponse:
            data = bytearray(hostile.shard_bytes(request))
            data[len(data) // 2] ^= 0xFF
            return web.Response(body=bytes(data))

        hostile.shard = corrupt
        await hostile.start()
        try:
            got = await world.fetch(
                [hostile.url, origin.url], "out.bin", transfer={"parallel_downloads": 2}
            )
        finally:
            await hostile.close()
            await origin.close()
        assert got.path.read_bytes() == world.data[0]
        assert list(got.bad_servers) == [hostile.url]
        assert "corrupt shard" in got.bad_servers[hostile.url]

    run(main)


@pytest.mark.timeout(30)
def test_a_bogus_version_offered_at_once_cuts_no_long_poll_short(world: World) -> None:
    """A client waiting for v2: the hostile answers at once with version 10^15 (no manifest),
    the origin only once v2 exists. The fetch must wait for the origin, not give up."""

    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)
        asked = asyncio.Event()

        async def huge(request: web.Request) -> web.StreamResponse:
            return web.json_response({"versions": [10**15]})

        async def none(request: web.Request) -> web.StreamResponse:
            asked.set()
            raise web.HTTPNotFound()

        hostile.versions, hostile.manifest = huge, none
        await hostile.start()
        try:
            fetching = asyncio.create_task(
                world.fetch(
                    [hostile.url, origin.url],
                    "out.bin",
                    min_version=2,
                    wait_s=15.0,
                    transfer={"connect_timeout_s": 0.5},
                )
            )
            await asyncio.wait_for(asked.wait(), 10.0)  # the bogus version was tried first
            world.publish(blob(3 * SHARD, seed=2))
            origin.rescan()  # the origin's long-poll answers now
            got = await asyncio.wait_for(fetching, 15.0)
        finally:
            await hostile.close()
            await origin.close()
        assert got.version == 2 and got.path.read_bytes() == world.data[1]
        assert got.bad_servers == {}

    run(main)


# -- 6. bodies are bounded ---------------------------------------------------------------------

FLOOD_LIMIT = 256 << 20


@pytest.mark.timeout(30)
@pytest.mark.parametrize("route", ["versions", "manifest"])
def test_flooding_bodies_are_cut_off(world: World, route: str) -> None:
    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def flood(request: web.Request) -> web.StreamResponse:
            head = b'{"versions": [1,' if route == "versions" else b'{"domain": "'
            return await hostile.flood(request, head, limit=FLOOD_LIMIT)

        async def announced(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            resp.content_length = 10**12  # say so up front: refused before any byte is read
            await resp.prepare(request)
            await hostile.released.wait()
            return resp

        setattr(hostile, route, flood)
        await hostile.start()
        relay = Relay(world.relay_config([hostile.url, origin.url], "relay"))
        relay_url = await relay.start()
        try:
            got = await world.fetch([hostile.url, origin.url], "out.bin")
            assert got.path.read_bytes() == world.data[0]
            assert list(got.bad_servers) == [hostile.url]
            # A relay reading the same floods still mirrors from its honest upstream.
            assert await long_poll(relay_url, after=0) == [1]
            assert hostile.sent < 64 << 20, hostile.sent  # read bounded, then hung up on
            setattr(hostile, route, announced)
            again = await world.fetch([hostile.url, origin.url], "again.bin")
            assert again.path.read_bytes() == world.data[0]
            assert list(again.bad_servers) == [hostile.url]
        finally:
            await relay.close()
            await hostile.close()
            await origin.close()

    run(main)


# -- 7. numbers in requests --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_request_numbers_out_of_range_get_4xx(world: World) -> None:
    big = "9" * 300
    paths = [
        f"/v1/versions/{big}/manifest",
        f"/v1/versions/{big}/shards/0",
        f"/v1/versions/1/shards/{big}",
        "/v1/versions/-1/manifest",
        f"/v1/versions?after={big}",
        "/v1/versions?after=-5",
        "/v1/versions?wait_s=nan",
        "/v1/versions?wait_s=inf",
        f"/v1/versions?wait_s=1{big}",
        "/v1/versions/1/shards/0?wait_s=nan",
    ]

    async def main() -> None:
        origin = await origin_for(world)
        try:
            async with aiohttp.ClientSession() as s:
                for path in paths:
                    async with s.get(origin.url + path) as r:
                        assert 400 <= r.status < 500, (path, r.status)
                headers = {"Range": f"bytes={big}-"}
                async with s.get(f"{origin.url}/v1/versions/1/shards/0", headers=headers) as r:
                    assert r.status == 416
                deep = b"[" * 20_000 + b"]" * 20_000  # under the 64 KB body bound
                for body in (deep, b'{"server": Infinity, "reason": 1}', b"\xff"):
                    async with s.post(f"{origin.url}/v1/reports", data=body) as r:
                        assert r.status == 400, body[:20]
            got = await world.fetch([origin.url], "out.bin")
        finally:
            await origin.close()
        assert got.path.read_bytes() == world.data[0]

    run(main)


# -- 8. freshness ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_an_old_version_is_not_taken_for_the_newest(world: World, tmp_path: Path) -> None:
    """A relay that hides v2 and shows v1 (genuine, but signed two hours ago)."""
    stale_dir = tmp_path / "stale"
    stale = VersionStore(stale_dir)
    old = world.publish(blob(4 * SHARD, seed=3), created_unix=time.time() - 7200)
    v = old.manifest.version
    stale.write_manifest(v, old.to_bytes())
    stale.data_path(v).write_bytes(world.data[-1])
    world.publish(blob(3 * SHARD, seed=4))  # the newest, which the stale relay hides

    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(stale_dir)
        await hostile.start()
        try:
            with pytest.raises(StaleVersionError, match="max_manifest_age_s"):
                await world.fetch([hostile.url], "alone.bin")
            assert not (tmp_path / "alone.bin").exists()
            # The client asks every server and takes the newest version that verifies.
            got = await world.fetch([hostile.url, origin.url], "both.bin")
            assert got.version == v + 1 and got.path.read_bytes() == world.data[-1]
            assert got.bad_servers == {}  # old is not forged: nobody lied
            # Opting out of the bound, or asking for the version by number, gets the old one.
            anyage = await world.fetch([hostile.url], "anyage.bin", max_manifest_age_s=math.inf)
            assert anyage.version == v and anyage.path.read_bytes() == world.data[-2]
            exact = await world.fetch([hostile.url], "exact.bin", version=v)
            assert exact.path.read_bytes() == world.data[-2]
        finally:
            await hostile.close()
            await origin.close()

    run(main)
