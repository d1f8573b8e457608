"""A hostile shardcast server and the honest world around it, for tests/test_shardcast_hostile*.

``Hostile`` is an aiohttp app on port 0 that answers like a shardcast server (from an origin's
directory) except on the routes a test replaces; ``World`` holds the publisher, the origin's
directory and every payload published, and builds client and relay configs; ``run`` bounds a
scenario in time so that a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from cotrain.core.identity import Identity
from cotrain.shardcast import (
    ClientConfig,
    FetchResult,
    Origin,
    OriginConfig,
    PublishConfig,
    RelayConfig,
    fetch_async,
    publish,
)
from cotrain.shardcast.config import ServeConfig
from cotrain.shardcast.manifest import Manifest, SignedManifest
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


def make_world(tmp_path: Path) -> World:
    """An origin directory holding v1 (six shards, the last one short)."""
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
