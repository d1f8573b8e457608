"""Reading what peers answer: every body bounded and read incrementally, every JSON checked.

Whatever a server sends (a listing of ``Infinity``, JSON nested a million deep, a body of
gigabytes announced or not by ``Content-Length``) ends here as ``MalformedResponse`` or as a
sound value, never as another exception or as memory we did not mean to spend. Shard bodies are
not read here: ``transfer`` streams them and stops at the size the signed manifest gives.
No request to a peer follows redirects (a peer could otherwise point us at any address our
network reaches); a 3xx is a failed answer like any other.
"""

from __future__ import annotations

import aiohttp

from cotrain.core import jsonsafe
from cotrain.shardcast.errors import MalformedResponse
from cotrain.shardcast.manifest import MAX_MANIFEST_BYTES, MAX_VERSION

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
