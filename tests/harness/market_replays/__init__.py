"""Local HTTP servers that replay each cloud provider's documented API, for the adapters' tests.

One module per provider (``vast.py``, ``prime.py``, ...), each with:

    NAME: str                 the adapter's ``Provider.name``
    KEY: str                  the one API key the replay accepts (anything else: 401/403)
    SOLD_OUT: str             an offer id the replay lists, whose launch answers the provider's
                              own out-of-stock error
    class Replay:
        rate_limit_once: bool = True   the first offers call answers 429 (Retry-After: 0)
        stuck: bool = False            launched instances never become ready
        calls: list[tuple[str, str, Any]]   (method, path, JSON body or query) of every call
        def app(self) -> aiohttp.web.Application
    def provider(url: str, key: str = KEY) -> Provider

A launched instance is "starting" on its first status call and "running" from the second on
(unless ``stuck``); a terminated one is gone from ``instances()`` or reported "terminated".
``tests/market/test_market_contract.py`` runs the same contract against every module here
(``MODULES``); each provider's own test file checks what is particular to it (field mapping,
pagination, its error shapes).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web

MODULES = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem != "__init__")


def load(name: str) -> ModuleType:
    return importlib.import_module(f"market_replays.{name}")


def serve(replay: Any, body: Callable[[str], Awaitable[Any]], timeout_s: float = 60) -> Any:
    """Run ``body(url)`` while ``replay`` answers on a loopback port; its result."""

    async def main() -> Any:
        runner = web.AppRunner(replay.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            return await asyncio.wait_for(body(url), timeout_s)
        finally:
            await runner.cleanup()

    return asyncio.run(main())
