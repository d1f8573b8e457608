"""Clients: fetch the latest (or a given) version, or watch and fetch each new one; load it.

::

    result = fetch(["http://relay-a:8470", "http://relay-b:8470"], publisher_key=KEY,
                   out="policy.safetensors")
    load_into(model, result.path)

    for result in watch(servers, publisher_key=KEY, out="policy.safetensors"):
        load_into(model, result.path)       # each new version, as soon as it is published

A fetch asks every server which versions it has (long-polling when told to wait), takes the
newest one whose manifest verifies: signed by the publisher for that version and channel
(``TrustPolicy``) and, for the latest version, signed at most ``max_manifest_age_s`` ago, so
a server that hides newer versions cannot hold a client on an old one. Servers that offer
forged or replayed manifests, malformed answers, or corrupt bytes are skipped, listed in
``FetchResult.bad_servers`` and reported to the others (``POST /v1/reports``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from cotrain.core.errors import ConfigError
from cotrain.shardcast import wire
from cotrain.shardcast.config import ClientConfig
from cotrain.shardcast.errors import (
    FetchTimeout,
    MalformedResponse,
    ManifestError,
    ShardcastError,
    UpstreamUnavailable,
    VersionNotFound,
)
from cotrain.shardcast.manifest import Manifest, SignedManifest, TrustPolicy
from cotrain.shardcast.output import OutputFile
from cotrain.shardcast.progress import ByteProgress
from cotrain.shardcast.selection import ServerSelector
from cotrain.shardcast.transfer import ShardPuller

log = logging.getLogger("cotrain.shardcast.client")

# Asking for a manifest: the next server offering the version is asked after this long too.
_MANIFEST_HEDGE_S = 1.0


@dataclass(frozen=True)
class FetchResult:
    """A version now on disk, verified."""

    version: int
    path: Path
    manifest: Manifest
    bytes_downloaded: int
    resumed_shards: int
    seconds: float
    bytes_by_server: dict[str, int]
    bad_servers: dict[str, str]


def make_session(config: ClientConfig) -> aiohttp.ClientSession:
    """One pooled HTTP session; large read buffers so chunks are big and Python work is small."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.transfer.connect_timeout_s),
        auto_decompress=False,
        read_bufsize=1 << 20,
    )


async def _trusted_manifest(
    session: aiohttp.ClientSession,
    config: ClientConfig,
    selector: ServerSelector,
    offers: dict[str, list[int]],
    policy: TrustPolicy,
    version: int | None,
) -> SignedManifest:
    """The newest acceptable manifest (or ``version``'s), banning servers that lie about it.

    Versions are tried newest first; a server that cannot back a version it offered with its
    manifest is not asked for older ones (so bogus offers cost one request each, at most).
    For one version the servers offering it are asked in turn, the next one as soon as the
    previous failed or after ``_MANIFEST_HEDGE_S`` without an answer (one that holds the
    request delays the fetch by that much, not by its timeout); the first that verifies wins.
    """
    wanted = sorted({v for vs in offers.values() for v in vs if v >= policy.min_version})
    if version is not None:
        wanted = [v for v in wanted if v == version]
    if not wanted:
        have = sorted({v for vs in offers.values() for v in vs})
        want = f"v{version}" if version is not None else f"a version >= {policy.min_version}"
        raise VersionNotFound(f"no server offers {want}; offered: {have[-20:] or 'nothing'}")
    failed: set[str] = set()

    async def ask(server: str, v: int) -> SignedManifest | None:
        try:
            async with asyncio.timeout(config.transfer.connect_timeout_s + 10.0):
                raw = await wire.get_manifest(session, f"{server}/v1/versions/{v}/manifest")
            signed = SignedManifest.parse(raw)
            policy.check(signed, expected_version=v)
            return signed
        except (ManifestError, MalformedResponse) as e:
            log.warning("%s served a bad manifest for v%d: %s", server, v, e)
            selector.ban(server, f"bad manifest for v{v}: {e}")
        except (aiohttp.ClientError, TimeoutError) as e:
            selector.record_failure(server, f"manifest v{v}: {e}")
            failed.add(server)
        return None  # StaleVersionError propagates: genuine, but too old, as is all older

    for v in reversed(wanted):
        queue = [s for s, vs in offers.items() if v in vs and s not in failed]
        queue = [s for s in queue if s not in selector.report()]
        pending: set[asyncio.Task[SignedManifest | None]] = set()
        try:
            while queue or pending:
                if queue:
                    pending.add(asyncio.create_task(ask(queue.pop(0), v)))
                done, pending = await asyncio.wait(
                    pending,
                    timeout=_MANIFEST_HEDGE_S if queue else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for t in done:
                    if (signed := t.result()) is not None:
                        return signed
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    bad = selector.report()
    if bad:
        raise UpstreamUnavailable(f"no server served a trustworthy manifest; bad servers: {bad}")
    raise UpstreamUnavailable(f"no server delivered the manifest of v{wanted[-1]}")


async def _report_bad(
    session: aiohttp.ClientSession, servers: list[str], bad: dict[str, str]
) -> None:
    """Tell the honest servers about the dishonest ones (best effort, bounded)."""

    async def post(server: str, about: str, reason: str) -> None:
        url = f"{server}/v1/reports"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(2.0):
                body = {"server": about, "reason": reason}
                async with session.post(url, json=body, allow_redirects=False):
                    pass  # the answer is not needed (an unread body closes the connection)

    honest = [s for s in servers if s not in bad]
    await asyncio.gather(*(post(s, u, r) for s in honest for u, r in bad.items()))


async def fetch_async(
    config: ClientConfig,
    *,
    out: str | os.PathLike[str],
    version: int | Literal["latest"] = "latest",
    min_version: int = 1,
    wait_s: float = 0.0,
    session: aiohttp.ClientSession | None = None,
) -> FetchResult:
    """Fetch a version into ``out``; with ``wait_s`` > 0, wait that long for it to appear."""
    if not config.servers:
        raise ConfigError("no servers to fetch from: pass --servers URL[,URL...]")
    if not config.publisher_key:
        raise ConfigError("publisher_key is required: only manifests it signed are accepted")
    own = session is None
    session = session or make_session(config)
    try:
        async with asyncio.timeout(config.timeout_s):
            return await _fetch(config, session, out, version, min_version, wait_s)
    except TimeoutError:
        raise FetchTimeout(f"fetch did not finish within timeout_s={config.timeout_s:g}") from None
    finally:
        if own:
            await session.close()


async def _fetch(
    config: ClientConfig,
    session: aiohttp.ClientSession,
    out: str | os.PathLike[str],
    version: int | Literal["latest"],
    min_version: int,
    wait_s: float,
) -> FetchResult:
    t0 = time.monotonic()
    exact = None if version == "latest" else int(version)
    floor = max(min_version, exact or 1)
    # Freshness guards "latest"; a version asked for by number is wanted whatever its age.
    max_age_s = config.max_manifest_age_s if exact is None else None
    if max_age_s is not None and math.isinf(max_age_s):
        max_age_s = None
    policy = TrustPolicy(config.publisher_key, config.channel, floor, max_age_s)
    selector = ServerSelector(
        config.servers, exploration=config.transfer.exploration, seed=config.transfer.seed
    )
    listings = wire.Listings(session, config, after=floor - 1, wait_s=wait_s)
    try:
        await listings.wait(until_newer=True, timeout_s=None)
        await listings.wait(until_newer=False, timeout_s=config.transfer.connect_timeout_s)
        t_offers = time.monotonic()
        while True:
            for server, why in listings.malformed.items():
                if server not in selector.report():
                    selector.ban(server, f"malformed versions listing: {why}")
            try:
                if not listings.versions:
                    why = f"; malformed answers: {listings.malformed}" if listings.malformed else ""
                    raise UpstreamUnavailable(
                        f"none of the servers answered: {config.servers}{why}"
                    )
                signed = await _trusted_manifest(
                    session, config, selector, listings.offers(), policy, exact
                )
                break
            except (VersionNotFound, UpstreamUnavailable):
                if not listings.pending:
                    raise
                # What arrived first led nowhere: hear the servers still answering.
                await listings.wait(until_newer=False, timeout_s=None)
    except ShardcastError:
        if selector.report():
            await _report_bad(session, config.servers, selector.report())
        raise
    finally:
        await listings.close()
    for server in config.servers:  # servers that never answered get no shard requests
        if server not in listings.versions and server not in selector.report():
            selector.drop(server)
    manifest = signed.manifest
    t_manifest = time.monotonic()
    output = OutputFile(out, signed)
    resumed = await asyncio.to_thread(output.open)
    todo = [i for i in range(len(manifest.shards)) if i not in resumed]
    progress = ByteProgress(
        f"v{manifest.version}", manifest.file_size, enabled=config.progress == "bar"
    )
    progress.advance(sum(manifest.shards[i].size for i in resumed))
    puller = ShardPuller(
        session, manifest, selector, output, config.transfer, on_bytes=progress.advance
    )
    try:
        with progress:
            t_open = time.monotonic()
            report = await puller.run(todo) if todo else None
            t_pull = time.monotonic()
            path = await asyncio.to_thread(output.commit)
        log.info(
            "v%d: listing %.2f s, manifest %.2f s, open %.2f s, shards %.2f s, commit %.2f s",
            manifest.version, t_offers - t0, t_manifest - t_offers, t_open - t_manifest,
            t_pull - t_open, time.monotonic() - t_pull,
        )  # fmt: skip
    finally:
        output.close()
        if selector.report():
            await _report_bad(session, config.servers, selector.report())
    return FetchResult(
        version=manifest.version,
        path=path,
        manifest=manifest,
        bytes_downloaded=report.bytes if report else 0,
        resumed_shards=len(resumed),
        seconds=time.monotonic() - t0,
        bytes_by_server=report.bytes_by_server if report else {},
        bad_servers=selector.report(),
    )


def fetch(
    servers: list[str],
    *,
    publisher_key: str,
    out: str | os.PathLike[str],
    version: int | Literal["latest"] = "latest",
    wait_s: float = 0.0,
    config: ClientConfig | None = None,
) -> FetchResult:
    """Blocking ``fetch_async``; ``config`` supplies everything but servers and key."""
    base = config or ClientConfig()
    cfg = base.model_copy(update={"servers": servers, "publisher_key": publisher_key})
    cfg = ClientConfig.model_validate(cfg.model_dump())
    return asyncio.run(fetch_async(cfg, out=out, version=version, wait_s=wait_s))


async def watch_async(
    config: ClientConfig, *, out: str | os.PathLike[str], after: int = 0, poll_wait_s: float = 30.0
) -> AsyncGenerator[FetchResult, None]:
    """Yield each version newer than ``after`` once it is at ``out`` (replaced atomically)."""
    last = after
    async with make_session(config) as session:
        while True:
            t0 = time.monotonic()
            try:
                result = await fetch_async(
                    config, out=out, min_version=last + 1, wait_s=poll_wait_s, session=session
                )
            except VersionNotFound:
                # Nothing newer (or nothing fresh enough) within the long-poll window: ask
                # again, after a pause if the servers answered at once (they hold, if honest).
                if time.monotonic() - t0 < poll_wait_s / 2:
                    await asyncio.sleep(min(1.0, poll_wait_s))
                continue
            last = result.version
            yield result


def watch(
    servers: list[str],
    *,
    publisher_key: str,
    out: str | os.PathLike[str],
    after: int = 0,
    config: ClientConfig | None = None,
) -> Iterator[FetchResult]:
    """Blocking ``watch_async``: an endless iterator of new versions."""
    base = config or ClientConfig()
    cfg = ClientConfig.model_validate(
        {**base.model_dump(), "servers": servers, "publisher_key": publisher_key}
    )
    loop = asyncio.new_event_loop()
    agen = watch_async(cfg, out=out, after=after)
    try:
        while True:
            yield loop.run_until_complete(agen.__anext__())
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Tensors of a fetched safetensors checkpoint (CPU)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def load_into(model: Any, path: str | os.PathLike[str], *, strict: bool = True) -> Any:
    """Load a fetched checkpoint into a torch module (in place); returns the module."""
    model.load_state_dict(load_state_dict(path), strict=strict)
    return model
