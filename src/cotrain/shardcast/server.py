"""The HTTP face of origin and relays (aiohttp): versions, manifests, shards with ranges.

::

    GET  /v1/health                            role, versions held, upstream status
    GET  /v1/versions?after=N&wait_s=T         long-poll: answers as soon as a version > N exists
    GET  /v1/versions/{v}/manifest             the signed envelope
    GET  /v1/versions/{v}/shards/{i}?wait_s=T  shard bytes (Range supported); a relay still
                                               mirroring the shard holds the request up to T s,
                                               then answers 503 so the client can go elsewhere
    POST /v1/reports                           a client reports a misbehaving server
    GET  /v1/reports                           reports received

Healthy shards go out with ``sendfile`` (no Python per byte), from a shard file (relays) or
as a range of the whole checkpoint (origin). The fault-injection path
(``FaultConfig``) streams through Python so it can flip bytes, stall, or die mid-transfer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cotrain.core import jsonsafe
from cotrain.shardcast.config import FaultConfig, ServeConfig
from cotrain.shardcast.manifest import MAX_VERSION, Manifest, ManifestError, SignedManifest
from cotrain.shardcast.store import (
    RELAY_HEADER,
    UNVERIFIED_HEADER,
    ChangeFeed,
    GrowingShard,
    ShardLocation,
    VersionStore,
)

log = logging.getLogger("cotrain.shardcast.server")

_FAULT_CHUNK = 256 * 1024
_DIGITS = re.compile(r"^[0-9]{1,16}$")


@dataclass
class ServerState:
    """Everything the handlers need; owned by the origin or relay that runs the server."""

    role: str
    store: VersionStore
    serve: ServeConfig
    fault: FaultConfig = field(default_factory=FaultConfig)
    feed: ChangeFeed = field(default_factory=ChangeFeed)
    status: Callable[[], dict[str, Any]] | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    shard_bytes_sent: int = 0
    waiting: int = 0  # long-polls for a new version being held right now
    # Shards a relay is receiving right now, streamed while they grow (relay.py registers them).
    growing: dict[tuple[int, int], GrowingShard] = field(default_factory=dict)
    # Origin: serve clients only while no relay is pulling a shard (see OriginConfig.clients).
    yield_to_relays: bool = False
    relay_streams: int = 0
    _manifests: dict[int, Manifest] = field(default_factory=dict)

    def manifest(self, version: int) -> Manifest | None:
        m = self._manifests.get(version)
        if m is None:
            raw = self.store.read_manifest(version)
            if raw is None:
                return None
            try:
                m = SignedManifest.parse(raw).manifest
            except ManifestError:
                return None
            self._manifests[version] = m
        return m


_STATE = web.AppKey("state", ServerState)


def _wait_s(request: web.Request, state: ServerState) -> float:
    text = request.query.get("wait_s", "0")
    try:
        asked = float(text) if len(text) <= 32 else math.nan
    except ValueError:
        asked = math.nan
    if not math.isfinite(asked):
        raise web.HTTPBadRequest(text="wait_s must be a finite number of seconds")
    return max(0.0, min(asked, state.serve.max_wait_s))


def _bounded_int(text: str, name: str) -> int:
    """A version, index or bound from a request: decimal digits, at most 2^53 (else 400)."""
    if not _DIGITS.match(text) or int(text) > MAX_VERSION:
        raise web.HTTPBadRequest(text=f"{name} must be an integer in [0, 2^53]")
    return int(text)


def _int_param(request: web.Request, name: str) -> int:
    return _bounded_int(request.match_info[name], name)


def _versions_body(state: ServerState) -> dict[str, Any]:
    versions = state.store.versions()
    return {"role": state.role, "latest": versions[-1] if versions else None, "versions": versions}


async def _health(request: web.Request) -> web.Response:
    state: ServerState = request.app[_STATE]
    body = _versions_body(state)
    body["waiting"] = state.waiting
    if state.status is not None:
        body.update(state.status())
    return web.json_response(body)


async def _versions(request: web.Request) -> web.Response:
    state: ServerState = request.app[_STATE]
    after = _bounded_int(request.query.get("after", "0"), "after")
    wait_s = _wait_s(request, state)
    state.waiting += 1
    try:
        await state.feed.wait_until(lambda: (state.store.latest() or 0) > after, wait_s)
    finally:
        state.waiting -= 1
    return web.json_response(_versions_body(state))


async def _manifest(request: web.Request) -> web.Response:
    state: ServerState = request.app[_STATE]
    version = _int_param(request, "version")
    raw = state.store.read_manifest(version)
    if raw is None:
        raise web.HTTPNotFound(text=f"version {version} is not here (never seen, or retired)")
    if state.fault.manifest == "forged":
        raw = _forge(raw)
    elif state.fault.manifest == "replayed":
        oldest = state.store.versions()[0]
        raw = state.store.read_manifest(oldest) or raw
    return web.Response(body=raw, content_type="application/json")


def _forge(raw: bytes) -> bytes:
    """Keep the signature, change what it signed: point shard 0 at other bytes."""
    env = json.loads(raw)
    env["body"]["shards"][0]["sha256"] = "0" * 64
    return json.dumps(env).encode()


async def _shard(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[_STATE]
    version, index = _int_param(request, "version"), _int_param(request, "index")
    _wait_s(request, state)  # a malformed wait is refused up front, not when first needed
    manifest = state.manifest(version)
    if manifest is None:
        raise web.HTTPNotFound(text=f"version {version} is not here (never seen, or retired)")
    if not 0 <= index < len(manifest.shards):
        raise web.HTTPNotFound(text=f"version {version} has no shard {index}")

    if RELAY_HEADER in request.headers:
        state.relay_streams += 1
        try:
            return await _serve_shard(request, state, manifest, version, index)
        finally:
            state.relay_streams -= 1
            if not state.relay_streams:
                state.feed.notify()
    if state.yield_to_relays and state.relay_streams:
        wait_s = _wait_s(request, state)
        if wait_s <= 0:
            raise web.HTTPTooManyRequests(
                text="the origin is feeding its relays: ask a relay", headers={"Retry-After": "1"}
            )
        # Asked to wait: once the relays are done, or the wait is up (no client starves).
        await state.feed.wait_until(lambda: not state.relay_streams, wait_s)
    return await _serve_shard(request, state, manifest, version, index)


async def _serve_shard(
    request: web.Request, state: ServerState, manifest: Manifest, version: int, index: int
) -> web.StreamResponse:
    f = state.fault
    faulty = index in f.corrupt_shards or index in f.stall_shards or f.exit_after_bytes is not None
    key = (version, index)

    def ready() -> bool:
        return (
            state.store.has_shard(version, index)
            or (key in state.growing and not faulty)
            or state.manifest(version) is None
        )

    if not ready():
        await state.feed.wait_until(ready, _wait_s(request, state))
    growing = state.growing.get(key)
    if growing is not None and not faulty and not state.store.has_shard(version, index):
        start, stop = _byte_range(request, growing.size)
        return await _stream_growing(request, state, growing, start, stop)
    if not state.store.has_shard(version, index):
        if state.store.read_manifest(version) is None:
            state._manifests.pop(version, None)
            raise web.HTTPNotFound(text=f"version {version} was retired")
        raise web.HTTPServiceUnavailable(
            text=f"shard {index} of v{version} is still on its way", headers={"Retry-After": "1"}
        )
    where = state.store.locate(version, index, manifest.shards[index].offset)
    if where is None:  # retired between the check and now
        raise web.HTTPNotFound(text=f"version {version} was retired")
    size = manifest.shards[index].size
    start, stop = _byte_range(request, size)
    if faulty:
        return await _faulty_shard(request, state, where, index, size, start, stop)
    resp = _range_response(size, start, stop)
    await resp.prepare(request)
    transport = request.transport
    assert transport is not None
    # sendfile: the kernel copies file pages to the socket, no Python per byte.
    with open(where.path, "rb") as fobj:
        await asyncio.get_running_loop().sendfile(
            transport, fobj, where.offset + start, stop - start
        )
    await resp.write_eof()
    return resp


async def _stream_growing(
    request: web.Request, state: ServerState, shard: GrowingShard, start: int, stop: int
) -> web.StreamResponse:
    """Send [start, stop) of a shard still arriving, each piece as soon as it is written.

    The file is opened before any await: the relay renames it once verified, and an open
    descriptor keeps reading the same bytes. If the relay drops what it had (``epoch``
    changes) or no byte arrives within ``max_wait_s``, the connection is cut: the client sees
    a short body and, told by ``UNVERIFIED_HEADER``, discards it.
    """
    epoch = shard.epoch
    fobj = open(shard.path, "rb")  # noqa: SIM115 (closed below, across awaits)
    try:
        resp = _range_response(shard.size, start, stop)
        resp.headers[UNVERIFIED_HEADER] = "1"
        await resp.prepare(request)
        transport = request.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        pos = start

        def more() -> bool:
            return shard.visible > pos or shard.epoch != epoch

        while pos < stop:
            if not more():
                await shard.feed.wait_until(more, state.serve.max_wait_s)
            if shard.epoch != epoch or shard.visible <= pos:
                log.info("cutting off a stream of %s: its bytes were dropped", shard.path.name)
                transport.abort()
                return resp
            end = min(shard.visible, stop)
            await loop.sendfile(transport, fobj, pos, end - pos)
            pos = end
        if shard.epoch != epoch:  # dropped while the last piece was on its way out
            transport.abort()
            return resp
        await resp.write_eof()
        return resp
    finally:
        fobj.close()


def _byte_range(request: web.Request, size: int) -> tuple[int, int]:
    """[start, stop) asked for by a Range header (whole shard without one)."""
    try:
        rng = request.http_range
    except ValueError:
        raise web.HTTPBadRequest(text="malformed Range header") from None
    start = rng.start or 0
    if start < 0:
        start = max(0, size + start)
    stop = size if rng.stop is None else min(rng.stop, size)
    if start >= size or stop <= start:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def _range_response(size: int, start: int, stop: int) -> web.StreamResponse:
    partial = start > 0 or stop < size
    resp = web.StreamResponse(status=206 if partial else 200)
    resp.content_length = stop - start
    resp.content_type = "application/octet-stream"
    resp.headers["Accept-Ranges"] = "bytes"
    if partial:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return resp


async def _faulty_shard(
    request: web.Request,
    state: ServerState,
    where: ShardLocation,
    index: int,
    size: int,
    start: int,
    stop: int,
) -> web.StreamResponse:
    def read() -> bytes:
        with open(where.path, "rb") as fobj:
            return os.pread(fobj.fileno(), size, where.offset)

    data = await asyncio.to_thread(read)
    if index in state.fault.corrupt_shards:
        mid = size // 2
        data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
    body = data[start:stop]
    resp = _range_response(size, start, stop)
    await resp.prepare(request)
    for pos in range(0, len(body), _FAULT_CHUNK):
        if index in state.fault.stall_shards and pos >= len(body) // 2:
            await asyncio.Event().wait()  # hang on purpose; the client's stall timeout fires
        chunk = body[pos : pos + _FAULT_CHUNK]
        await resp.write(chunk)
        state.shard_bytes_sent += len(chunk)
        limit = state.fault.exit_after_bytes
        if limit is not None and state.shard_bytes_sent >= limit:
            log.warning("fault injection: dying after %d shard bytes", state.shard_bytes_sent)
            os._exit(9)
    await resp.write_eof()
    return resp


async def _report(request: web.Request) -> web.Response:
    state: ServerState = request.app[_STATE]
    # The body is bounded by the app's client_max_size (64 KB) before it is read.
    try:
        body = jsonsafe.loads(await request.read())
    except jsonsafe.MalformedJSON:
        body = None
    if not isinstance(body, dict) or not {"server", "reason"} <= set(body):
        raise web.HTTPBadRequest(text='expected JSON {"server": ..., "reason": ...}')
    entry = {"server": str(body["server"])[:500], "reason": str(body["reason"])[:500]}
    entry["from"] = request.remote or "?"
    log.warning("report: %s misbehaved: %s", entry["server"], entry["reason"])
    state.reports.append(entry)
    del state.reports[:-1000]
    return web.json_response({"ok": True})


async def _reports(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].reports)


def make_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[_STATE] = state
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/v1/versions", _versions)
    app.router.add_get("/v1/versions/{version}/manifest", _manifest)
    app.router.add_get("/v1/versions/{version}/shards/{index}", _shard)
    app.router.add_post("/v1/reports", _report)
    app.router.add_get("/v1/reports", _reports)
    return app


@dataclass
class RunningServer:
    """A started server: its base URL, and ``close()`` to stop it."""

    url: str
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(state: ServerState) -> RunningServer:
    # Long-polls may be open; do not let them hold a shutdown for more than a second.
    runner = web.AppRunner(
        make_app(state), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, state.serve.host, state.serve.port, backlog=1024)
    await site.start()
    host, port = runner.addresses[0][:2]
    return RunningServer(url=f"http://{host}:{port}", runner=runner)
