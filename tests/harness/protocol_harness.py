"""A coordinator in this process on port 0, for protocol tests (SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cotrain.core.identity import Identity
from cotrain.protocol.client import Client
from cotrain.protocol.config import CoordinatorConfig
from cotrain.protocol.coordinator import serve


@contextlib.asynccontextmanager
async def running(cfg: CoordinatorConfig) -> AsyncIterator[Any]:
    """Yield (url, coordinator) while a coordinator serves ``cfg`` on a free port."""
    ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    box: dict[str, Any] = {}

    def on_ready(**fields: Any) -> None:
        ready.set_result(fields)

    async def stopped() -> None:
        await stop.wait()

    task = asyncio.create_task(serve(cfg, ready=on_ready, stopped=stopped, box=box))
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what went wrong
    fields = ready.result()
    try:
        yield fields["url"], box["coordinator"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def config(tmp: Path, db: str | None = None, **over: Any) -> CoordinatorConfig:
    return CoordinatorConfig(
        port=0,
        db=db or str(tmp / "coord.db"),
        key=str(tmp / "coord.pem"),
        **over,
    )


async def identities(url: str, **roles: list[str]) -> dict[str, tuple[Identity, Client]]:
    """Register one identity per name with its roles; name -> (identity, client)."""
    out = {}
    for name, rs in roles.items():
        ident = Identity.generate()
        c = Client(url, ident)
        await c.register(rs, name)
        out[name] = (ident, c)
    return out
