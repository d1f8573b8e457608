"""Workers on one machine share one file per policy version: two fetching the same version at
once end up mapping the same inode (one copy in memory), a file an earlier run left behind
with other bytes is replaced, and a version no server offers is a typed error at once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from cotrain.core.identity import Identity
from cotrain.rl.client import Weights, map_safetensors
from cotrain.shardcast import Origin, OriginConfig, PublishConfig, publish
from cotrain.shardcast.config import ServeConfig
from cotrain.shardcast.errors import VersionNotFound

CHANNEL = "rl-weights-test"


def _blob(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)})


@pytest.mark.timeout(60)
def test_concurrent_fetches_share_one_file_and_stale_files_are_replaced(tmp_path: Path) -> None:
    ident = Identity.generate()
    origin_dir, cache = tmp_path / "origin", tmp_path / "cache"
    cfg = PublishConfig(channel=CHANNEL)
    publish(_blob(1), dir=origin_dir, identity=ident, config=cfg)
    publish(_blob(2), dir=origin_dir, identity=ident, config=cfg)
    cache.mkdir()
    (cache / "v2.safetensors").write_bytes(_blob(99))  # an earlier run's v2: other bytes

    async def main() -> None:
        origin = Origin(OriginConfig(dir=origin_dir, serve=ServeConfig(port=0)))
        await origin.start()
        try:
            a, b = (Weights(cache, publisher_key=ident.public_hex, channel=CHANNEL) for _ in "ab")
            got = await asyncio.gather(a.fetch([origin.url], 1), b.fetch([origin.url], 1))
            assert got == [1, 1] and a.files[1][0] == b.files[1][0]
            # v2: the stale file an earlier run left is replaced by the published bytes
            assert await a.fetch([origin.url], 2) == 2
            fetched = map_safetensors(a.files[2][0])  # a worker maps it
            expected = torch.Generator().manual_seed(2)
            assert torch.equal(fetched["w"], torch.randn(64, 64, generator=expected))
            inode = os.stat(a.files[2][0]).st_ino
            # "the newest" is downloaded whole (which version that is, the manifest says):
            # the file a worker has mapped stays, the second download is dropped
            assert await b.fetch([origin.url]) == 2
            assert b.files[2][0] == a.files[2][0] and os.stat(b.files[2][0]).st_ino == inode
            assert [p.name for p in cache.iterdir() if p.name.startswith("tmp-")] == []
            with pytest.raises(VersionNotFound):
                await a.fetch([origin.url], 7, unavailable_after_s=5)
        finally:
            await origin.close()

    asyncio.run(asyncio.wait_for(main(), 50))


@pytest.mark.timeout(60)
def test_one_download_per_version_per_machine_and_only_of_the_announced_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cotrain.shardcast as shardcast

    ident = Identity.generate()
    origin_dir, cache = tmp_path / "origin", tmp_path / "cache"
    published = publish(
        _blob(1), dir=origin_dir, identity=ident, config=PublishConfig(channel=CHANNEL)
    )
    sha = published.manifest.file_sha256
    downloads = []
    real = shardcast.fetch_async

    async def counted(*args: object, **kwargs: object) -> object:
        downloads.append(kwargs.get("version"))
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shardcast, "fetch_async", counted)

    async def main() -> None:
        origin = Origin(OriginConfig(dir=origin_dir, serve=ServeConfig(port=0)))
        await origin.start()
        try:
            make = lambda: Weights(cache, publisher_key=ident.public_hex, channel=CHANNEL)  # noqa: E731
            procs = [make() for _ in range(4)]  # four processes on one machine
            got = await asyncio.gather(*(w.fetch([origin.url], 1, sha256=sha) for w in procs))
            assert got == [1, 1, 1, 1] and downloads == [1]
            # a sidecar that names another hash (an earlier run's file) is not adopted
            (cache / "v1.sha256").write_text("0" * 64)
            assert await make().fetch([origin.url], 1, sha256=sha) == 1
            assert downloads == [1, 1] and (cache / "v1.sha256").read_text() == sha
        finally:
            await origin.close()

    asyncio.run(asyncio.wait_for(main(), 50))
