"""shardcast against servers that lie, hang, flood and stall on purpose.

The rule under test: with at least one honest server listed, a fetch ends with the publisher's
exact bytes whatever the others do, and blames only a server whose own bytes were bad. Each
test runs real servers on loopback, port 0, in this process: the honest side is shardcast's
own ``Origin`` (and ``Relay``), the hostile side an aiohttp app written here (``Hostile``) that
answers like a shardcast server except where the test says otherwise. Nothing waits on a
timer: every wait is a long-poll or an event, under a hard bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cotrain.core.identity import Identity
from cotrain.shardcast import (
    ClientConfig,
    FetchResult,
    Origin,
    OriginConfig,
    PublishConfig,
    Relay,
    RelayConfig,
    fetch_async,
    publish,
)
from cotrain.shardcast.config import ServeConfig
from cotrain.shardcast.errors import StaleVersionError
from cotrain.shardcast.manifest import Manifest, SignedManifest
from cotrain.shardcast.selection import BanList
from cotrain.shardcast.store import VersionStore

SHARD = 200_000
BOUND_S = 20.0  # hard bound of every scenario below (a hang fails the test, it never blocks)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def blob(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


class Hostile:
    """A shardcast server for tests: honest by default, each route replaceable by a test.

    It serves what lies under ``root`` (an origin's directory): the versions listed there, their
    signed manifests, and shard bytes cut from ``data.bin`` (with Range). ``hits`` counts
    requests per route; ``released`` ends every handler told to hang (set by ``close``).
    """

    def __init__(self, root: Path) -> None:
        self.store = VersionStore(root)
        self.hits: Counter[str] = Counter()
        self.ranges: list[str] = []  # Range headers of shard requests, in order
        self.sent = 0  # most bytes one flooding answer wrote before its reader hung up
        self.released = asyncio.Event()
        self.versions: Handler = self.honest_versions
        self.manifest: Handler = self.honest_manifest
        self.shard: Handler = self.honest_shard
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()

        def route(name: str, attr: str) -> Handler:
            async def handle(request: web.Request) -> web.StreamResponse:
                self.hits[name] += 1
                if name == "shard":
                    self.ranges.append(request.headers.get("Range", ""))
                return await getattr(self, attr)(request)

            return handle

        app.router.add_get("/v1/versions", route("versions", "versions"))
        app.router.add_get("/v1/versions/{version}/manifest", route("manifest", "manifest"))
        app.router.add_get("/v1/versions/{version}/shards/{index}", route("shard", "shard"))
        app.router.add_post("/v1/reports", route("reports", "report"))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        self.released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- honest behaviour, and pieces for dishonest ones --------------------------------------
    def signed(self, version: int) -> SignedManifest:
        return SignedManifest.parse(self.store.read_manifest(version) or b"")

    def shard_bytes(self, request: web.Request) -> bytes:
        version, index = int(request.match_info["version"]), int(request.match_info["index"])
        s = self.signed(version).manifest.shards[index]
        with open(self.store.data_path(version), "rb") as f:
            f.seek(s.offset)
            return f.read(s.size)

    async def honest_versions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"versions": self.store.versions()})  # answers at once

    async def honest_manifest(self, request: web.Request) -> web.StreamResponse:
        raw = self.store.read_manifest(int(request.match_info["version"]))
        if raw is None:
            raise web.HTTPNotFound()
        return web.Response(body=raw, content_type="application/json")

    async def honest_shard(self, request: web.Request) -> web.StreamResponse:
        data = self.shard_bytes(request)
        start = request.http_range.start or 0
        resp = web.Response(body=data[start:], status=206 if start else 200)
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        return resp

    async def report(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    async def flood(self, request: web.Request, head: bytes, *, limit: int) -> web.StreamResponse:
        """Send ``head`` and then filler (chunked) until ``limit`` bytes or the peer leaves."""
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        piece = b"1," * 32768
        sent = 0
        try:
            await resp.write(head)
            sent += len(head)
            while sent < limit:
                await resp.write(piece)
                sent += len(piece)
                self.sent = max(self.sent, sent)
        except ConnectionError:
            return resp
        return resp


@dataclass
class World:
    tmp: Path
    ident: Identity
    origin_dir: Path
    data: list[bytes]

    def publish(self, data: bytes, *, created_unix: float | None = None) -> SignedManifest:
        cfg = PublishConfig(shard_size_mb=SHARD / 1e6)
        res = publish(data, dir=self.origin_dir, identity=self.ident, config=cfg)
        self.data.append(data)
        if created_unix is None:
            return res.signed
        # Re-sign with another time, as if the publisher had published it then.
        m = res.manifest
        old = Manifest(**{**m.__dict__, "created_unix": created_unix})
        signed = SignedManifest.sign(old, self.ident)
        VersionStore(self.origin_dir).write_manifest(m.version, signed.to_bytes())
        return signed

    def client(self, **over: Any) -> ClientConfig:
        transfer = {
            "exploration": 0.0,
            "seed": 0,
            "stall_timeout_s": 60.0,
            **over.pop("transfer", {}),
        }
        return ClientConfig.model_validate(
            {
                "publisher_key": self.ident.public_hex,
                "timeout_s": BOUND_S,
                "transfer": transfer,
                **over,
            }
        )

    async def fetch(self, servers: list[str], name: str, **over: Any) -> FetchResult:
        version, wait_s = over.pop("version", "latest"), over.pop("wait_s", 0.0)
        min_version = over.pop("min_version", 1)
        cfg = self.client(**over).model_copy(update={"servers": servers})
        return await fetch_async(
            cfg, out=self.tmp / name, version=version, wait_s=wait_s, min_version=min_version
        )

    def relay_config(self, upstreams: list[str], name: str, **over: Any) -> RelayConfig:
        return RelayConfig.model_validate(
            {
                "upstreams": upstreams,
                "dir": str(self.tmp / name),
                "publisher_key": self.ident.public_hex,
                "retry_interval_s": 0.05,
                "poll_wait_s": 5.0,
                "serve": {"port": 0, "max_wait_s": 10.0},
                **over,
            }
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path, Identity.generate(), tmp_path / "origin", [])
    w.publish(blob(5 * SHARD + 1234, seed=1))
    return w


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND_S + 5):
            await main()

    asyncio.run(bounded())


async def origin_for(world: World) -> Origin:
    origin = Origin(OriginConfig(dir=world.origin_dir, serve=ServeConfig(port=0), clients="always"))
    await origin.start()
    return origin


async def long_poll(url: str, after: int) -> list[int]:
    """A server's versions once it holds one newer than ``after`` (or its answer at 10 s)."""
    params = {"after": after, "wait_s": 10}
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/versions", params=params) as r:
        return (await r.json())["versions"]


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
def test_relay_survives_a_malformed_listing(world: World) -> None:
    async def main() -> None:
        origin = await origin_for(world)
        hostile = Hostile(world.origin_dir)

        async def listing(request: web.Request) -> web.StreamResponse:
            return web.Response(body=LISTINGS["infinity"], content_type="application/json")

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
