"""The origin: serves the versions the publisher writes into its directory.

The publisher may run inside this process (``Origin.publish``) or anywhere that can write the
directory (``publish(..., dir=D)``, ``cotrain shardcast publish``). A cheap scan of the
directory every ``scan_interval_s`` notices versions written by other processes and wakes the
relays' long-polls at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from cotrain.core.identity import Identity
from cotrain.shardcast.config import OriginConfig, PublishConfig
from cotrain.shardcast.publisher import PublishResult, publish
from cotrain.shardcast.server import RunningServer, ServerState, start_server
from cotrain.shardcast.store import VersionStore

log = logging.getLogger("cotrain.shardcast.origin")


class Origin:
    """An origin server over ``config.dir``; ``await start()``, then ``await close()``."""

    def __init__(self, config: OriginConfig) -> None:
        self.config = config
        self.store = VersionStore(config.dir)
        self.state = ServerState("origin", self.store, config.serve, config.fault)
        self.state.yield_to_relays = config.clients == "when_relays_idle"
        self._server: RunningServer | None = None
        self._scan: asyncio.Task[None] | None = None
        self._seen: list[int] = []

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the origin first"
        return self._server.url

    async def start(self) -> str:
        self._seen = self.store.versions()
        self._server = await start_server(self.state)
        self._scan = asyncio.create_task(self._scan_loop())
        return self._server.url

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_interval_s)
            self.rescan()

    def rescan(self) -> None:
        """Wake waiters if the set of versions on disk changed."""
        now = self.store.versions()
        if now != self._seen:
            self._seen = now
            self.state.feed.notify()

    async def publish(
        self,
        source: Mapping[str, Any] | bytes | str | os.PathLike[str],
        *,
        identity: Identity,
        config: PublishConfig | None = None,
    ) -> PublishResult:
        """Publish from inside the origin's process; waiters learn of it immediately."""
        result = await asyncio.to_thread(
            publish, source, dir=self.config.dir, identity=identity, config=config
        )
        self.rescan()
        log.info("published v%d (%d bytes)", result.version, result.manifest.file_size)
        return result

    async def close(self) -> None:
        if self._scan is not None:
            self._scan.cancel()
        if self._server is not None:
            await self._server.close()
