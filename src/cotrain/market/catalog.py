"""Offers from every configured provider at once, with a cache whose age is shown.

Each provider is asked for *all* its offers (the filters apply afterwards, so one cached list
serves every query) concurrently, each within ``timeout_s``. A provider that fails is reported
as failed with its reason, and the others are still shown; its last good list, if the cache
has one, is used and marked stale. The cache is one JSON file, written atomically.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotrain.core.files import write_atomic
from cotrain.market.offers import Offer, OfferQuery
from cotrain.market.provider import Provider

ALL = OfferQuery(in_stock=False)


@dataclass
class Source:
    """What one provider contributed to a listing."""

    provider: str
    offers: int = 0
    age_s: float = 0.0
    """How old its offers are (0: asked now)."""
    error: str | None = None
    cached: bool = False


@dataclass
class Listing:
    offers: list[Offer] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)


class Catalog:
    def __init__(
        self, providers: list[Provider], cache_file: Path | None, *, ttl_s: float = 60.0
    ) -> None:
        self.providers = providers
        self.cache_file = cache_file
        self.ttl_s = ttl_s

    def _read(self) -> dict[str, Any]:
        if self.cache_file is None:
            return {}
        try:
            return dict(json.loads(self.cache_file.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def _write(self, cache: dict[str, Any]) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.cache_file, json.dumps(cache).encode())

    async def listing(self, *, refresh: bool = False, timeout_s: float = 10.0) -> Listing:
        cache = self._read()
        now = time.time()
        out = Listing()
        stale: list[Provider] = []
        for p in self.providers:
            got = cache.get(p.name)
            if not refresh and got and now - got["fetched_at"] < self.ttl_s:
                offers = [Offer.model_validate(o) for o in got["offers"]]
                out.offers += offers
                age = now - got["fetched_at"]
                out.sources.append(Source(p.name, len(offers), age, cached=True))
            else:
                stale.append(p)

        async def ask(p: Provider) -> list[Offer]:
            return await asyncio.wait_for(p.offers(ALL), timeout_s)

        results = await asyncio.gather(*(ask(p) for p in stale), return_exceptions=True)
        for p, res in zip(stale, results, strict=True):
            if isinstance(res, BaseException):
                if isinstance(res, TimeoutError):
                    why = f"no answer within {timeout_s:g} s"
                else:
                    why = f"{type(res).__name__}: {res}"
                src = Source(p.name, error=why[:300])
                old = cache.get(p.name)
                if old:  # its last good list, marked stale
                    offers = [Offer.model_validate(o) for o in old["offers"]]
                    out.offers += offers
                    src.offers, src.age_s, src.cached = len(offers), now - old["fetched_at"], True
                out.sources.append(src)
                continue
            out.offers += res
            out.sources.append(Source(p.name, len(res)))
            cache[p.name] = {"fetched_at": now, "offers": [o.model_dump() for o in res]}
        if stale:
            self._write(cache)
        out.sources.sort(key=lambda s: s.provider)
        return out
