"""Reading what peers answer: every body bounded and read incrementally, every JSON checked.

Whatever a server sends (a listing of ``Infinity``, JSON nested a million deep, a body of
gigabytes announced or not by ``Content-Length``) ends here as ``MalformedResponse`` or as a
sound value, never as another exception or as memory we did not mean to spend. Shard bodies are
not read here: ``transfer`` streams them and stops at the size the signed manifest gives.
No request to a peer follows redirects (a peer could otherwise point us at any address our
network reaches); a 3xx is a failed answer like any other. ``Listings`` gathers the versions
listings of many servers as they arrive, so that none can hold a fetch by holding its answer.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from cotrain.core import jsonsafe
from cotrain.shardcast.config import ClientConfig
from cotrain.shardcast.errors import MalformedResponse
from cotrain.shardcast.manifest import MAX_MANIFEST_BYTES, MAX_VERSION

log = logging.getLogger("cotrain.shardcast.wire")

MAX_LISTING_BYTES = 1 << 20
"""A versions listing is read only up to this size (tens of thousands of versions)."""
_READ_CHUNK = 64 * 1024


def _check_status(resp: aiohttp.ClientResponse, what: str) -> None:
    """4xx/5xx: ``ClientResponseError`` (a failure, nobody lied); anything else but 200 (a
    redirect, say) is outside the protocol: ``MalformedResponse``."""
    resp.raise_for_status()
    if resp.status != 200:
        raise MalformedResponse(f"{what}: HTTP {resp.status} where 200 was due")


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body of ``resp``, read piece by piece; ``MalformedResponse`` past ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise MalformedResponse(f"{what} of {resp.content_length} bytes exceeds {limit}")
    buf = bytearray()
    while chunk := await resp.content.read(_READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise MalformedResponse(f"{what} exceeds {limit} bytes")
    return bytes(buf)


def parse_versions(raw: bytes) -> list[int]:
    """The ``versions`` of a ``/v1/versions`` answer: distinct integers in [1, 2^53], sorted."""
    try:
        body = jsonsafe.loads(raw, max_bytes=MAX_LISTING_BYTES)
    except jsonsafe.MalformedJSON as e:
        raise MalformedResponse(f"versions listing: {e}") from None
    versions = body.get("versions") if isinstance(body, dict) else None
    if not isinstance(versions, list) or not all(
        type(v) is int and 1 <= v <= MAX_VERSION for v in versions
    ):
        raise MalformedResponse("versions listing: 'versions' must be a list of integers >= 1")
    return sorted(set(versions))


async def get_versions(session: aiohttp.ClientSession, url: str) -> list[int]:
    """GET a versions listing (the caller bounds the time)."""
    async with session.get(url, allow_redirects=False) as resp:
        _check_status(resp, "versions listing")
        return parse_versions(await read_bounded(resp, MAX_LISTING_BYTES, "versions listing"))


async def get_manifest(session: aiohttp.ClientSession, url: str) -> bytes:
    """GET a signed manifest's bytes (the caller bounds the time and checks them)."""
    async with session.get(url, allow_redirects=False) as resp:
        _check_status(resp, "manifest")
        return await read_bounded(resp, MAX_MANIFEST_BYTES, "manifest")


class Listings:
    """The servers' answers to "which versions do you have?", taken in as they arrive.

    Every server is asked at once (long-polling for a version newer than ``after``). A fetch
    goes ahead once one server offers a newer version and the others had ``connect_timeout_s``
    more to answer, so a server that holds its answer cannot hold the fetch for the whole
    long-poll window; if what has arrived by then leads to no trustworthy manifest (a bogus
    version offered at once, say), the fetch waits for the rest before giving up.
    """

    def __init__(
        self, session: aiohttp.ClientSession, config: ClientConfig, *, after: int, wait_s: float
    ) -> None:
        self.session, self.config, self.after, self.wait_s = session, config, after, wait_s
        self.versions: dict[str, list[int]] = {}
        self.malformed: dict[str, str] = {}
        self._tasks = {asyncio.create_task(self._ask(s)): s for s in config.servers}
        self._pending = set(self._tasks)

    async def _ask(self, server: str) -> list[int] | None:
        url = f"{server}/v1/versions?after={self.after}&wait_s={self.wait_s:g}"
        try:
            async with asyncio.timeout(self.config.transfer.connect_timeout_s + self.wait_s + 5.0):
                return await get_versions(self.session, url)
        except MalformedResponse as e:
            log.warning("%s: %s", server, e)
            self.malformed[server] = str(e)[:300]
        except (aiohttp.ClientError, TimeoutError) as e:
            log.info("cannot list versions at %s: %s", server, e)
        return None

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def offers(self) -> dict[str, list[int]]:
        """Answers so far, in the caller's order of servers (choices stay deterministic)."""
        return {s: self.versions[s] for s in self.config.servers if s in self.versions}

    def _newer(self) -> bool:
        return any(v > self.after for vs in self.versions.values() for v in vs)

    async def wait(self, *, until_newer: bool, timeout_s: float | None) -> None:
        """Take in answers until all are in, or (``until_newer``) one offers a newer version,
        or ``timeout_s`` passed (each request is bounded by its own budget in any case)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self._pending and not (until_newer and self._newer()):
            left = None if deadline is None else max(0.0, deadline - loop.time())
            done, self._pending = await asyncio.wait(
                self._pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return
            for t in done:
                if (answer := t.result()) is not None:
                    self.versions[self._tasks[t]] = answer

    async def close(self) -> None:
        for t in self._pending:
            t.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()
