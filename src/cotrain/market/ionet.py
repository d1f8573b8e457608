"""io.net: a thin client of the IO Cloud API's containers (CaaS) at https://api.io.solutions
(``x-api-key``), a prepaid market: a deployment is paid for a number of hours up front.

    GET    /enterprise/v1/io-cloud/caas/hardware/max-gpus-per-container
                                          hardware types: {"data": {"hardware": [...]}}
    GET    .../caas/available-replicas?hardware_id=&hardware_qty=
                                          where N GPUs of one type are free: {"data": [...]}
    GET    .../caas/price?location_ids=&hardware_id=&gpus_per_container=&duration_hours=&...
                                          the quote: {"data": {"total_cost_usdc", fees...}}
    POST   .../caas/deploy                {"status", "deployment_id"}
    GET    .../caas/deployments?page=&page_size=   ours, paginated
    GET    .../caas/deployment/{id}       its status, payment and container config
    GET    .../caas/deployment/{id}/containers     its containers' status
    DELETE .../caas/deployment/{id}       destroy it (unused prepaid hours are refunded)

Containers, not VMs: io.net's VM product (``.../vmaas/deploy``) takes SSH keys but no start-up
command, so a VM could not run cotrain's start-up script by itself; a CaaS container runs an
image with our entrypoint. CaaS expects an HTTP server on one port (``traffic_port``): the
container starts ``cotrain node`` in the background, then serves an empty directory there.

An offer is a hardware type, a GPU count and a location (``<hardware_id>:<gpus>:<location_id>``)
with free replicas. Its price is io.net's quote for one hour (``total_cost_usdc``, their fees
included), the same in every location of that hardware and count (one quote each, an
assumption that saves a call per location); ``billing = "prepaid"`` and ``min_hours = 1``: the
first hour is never refunded. A launch prepays ``ceil(spec.max_hours)`` hours, or ``hours``.
io.net names no datacenter tier for CaaS hardware; its supply is permissionless, so offers are
``community``. Listing costs two calls per hardware type and GPU count (1, 2, 4, 8), a few at
once. ``status`` is "running" once a container of the deployment runs; ``instances`` gives each
deployment's own status word only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from datetime import UTC, datetime
from typing import Any, Literal

from cotrain.market.http import JsonApi, message_of
from cotrain.market.offers import Offer, OfferQuery, canonical_gpu, matches
from cotrain.market.provider import (
    Cap,
    Instance,
    LaunchSpec,
    OutOfStock,
    ProviderError,
    State,
    onstart_script,
)

URL = "https://api.io.solutions"
CAAS = "/enterprise/v1/io-cloud/caas"
COUNTS = (1, 2, 4, 8)
MIN_HOURS = 1
"""The first hour of a deployment is never refunded; the rest is, pro rata."""
MAX_HOURS = 8760
PAGE_SIZE = 100
PARALLEL = 6
"""Quote calls at once while listing."""
TASK_PREFIX = "cotrain-"

# GPU memory where io.net's hardware name leaves it out and the model has one size.
_STD_MEM = {
    "H100": 80, "H200": 141, "RTX4090": 24, "RTX3090": 24, "A6000": 48, "L40S": 48, "L40": 48,
    "A40": 48, "A10": 24, "L4": 24, "T4": 16,
}  # fmt: skip

_STATES: dict[str, State] = {
    "deployment requested": "starting",
    "deploying": "starting",
    "pending": "starting",
    "queued": "starting",
    "running": "running",
    "completed": "exited",
    "expired": "exited",
    "stopped": "terminated",
    "termination requested": "terminated",
    "destroyed": "terminated",
    "terminated": "terminated",
    "failed": "failed",
}

# The deploy call's words for "none of that hardware is free there now" (never a payment issue).
_NO_CAPACITY = re.compile(
    r"not enough (available )?(replicas|gpus|devices|hardware|capacity)|no (available )?"
    r"(capacity|replicas|devices|hardware)|sold out|out of stock|insufficient (capacity|"
    r"replicas|gpus|devices|hardware)",
    re.IGNORECASE,
)

log = logging.getLogger(__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def _detail(body: Any) -> str:
    """FastAPI's error body: ``{"detail": "..."}`` or ``{"detail": [{"loc", "msg"}, ...]}``."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        parts = []
        for d in detail:
            if isinstance(d, dict):
                loc = ".".join(str(x) for x in d.get("loc", [])[1:])
                parts.append(f"{loc}: {d.get('msg')}" if loc else str(d.get("msg")))
        return "; ".join(parts)
    return message_of(body)


def _mem_gb(name: str) -> float | None:
    found = re.search(r"(\d+)\s*gb", name, re.IGNORECASE)
    if found:
        return float(found.group(1))
    mem = _STD_MEM.get(canonical_gpu(name))
    return float(mem) if mem else None


def _time(value: Any) -> float:
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return 0.0
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


class IoNetProvider:
    name = "ionet"
    caps = frozenset({Cap.PREPAID, Cap.DOCKER_IMAGE})

    def __init__(
        self,
        api_key: str,
        *,
        url: str = URL,
        image: str = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
        hours: int = 24,
        traffic_port: int = 8080,
        timeout_s: float = 20.0,
        retries_429: int = 3,
    ) -> None:
        self.api = JsonApi(
            self.name,
            url,
            {"x-api-key": api_key},
            secret=api_key,
            timeout_s=timeout_s,
            retries_429=retries_429,
            on_error=self._on_error,
        )
        self.image = image
        self.hours = hours
        """Hours prepaid at launch when the launch spec sets no ``max_hours``."""
        self.traffic_port = traffic_port

    def __repr__(self) -> str:  # never the key
        return f"IoNetProvider(url={self.api.url!r})"

    def _on_error(self, status: int, body: Any, method: str, path: str) -> None:
        msg = _one_line(self.api.scrub(_detail(body)))
        if method == "POST" and path == f"{CAAS}/deploy" and _NO_CAPACITY.search(msg):
            raise OutOfStock(f"ionet: no capacity for this offer now ({status}): {msg}")
        if status == 404 and path.startswith(f"{CAAS}/deployment/"):
            raise ProviderError(f"ionet: no deployment {path.split('/')[6]}: {msg}")
        if status != 429:  # JsonApi words a lasting rate limit itself
            raise ProviderError(f"ionet: {method} {path}: {status} {msg}")

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        return await self.api.call(method, CAAS + path, **kw)

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        body = await self._call("GET", "/hardware/max-gpus-per-container")
        now = time.time()
        combos = []
        for h in body.get("data", {}).get("hardware", []):
            try:
                hw, name = int(h["hardware_id"]), str(h["hardware_name"])
                most, free = int(h["max_gpus_per_container"]), int(h["available"])
            except (KeyError, TypeError, ValueError):
                continue  # a malformed entry is skipped, not fatal
            if free <= 0:
                continue  # nothing to quote where nothing is free
            combos += [(hw, name, n) for n in COUNTS if n <= most]
        gate = asyncio.Semaphore(PARALLEL)

        async def one(hw: int, name: str, n: int) -> list[Offer]:
            async with gate:
                try:
                    return await self._offers_of(hw, name, n, now)
                except (KeyError, TypeError, ValueError, AttributeError):
                    return []  # a malformed answer about one of them is skipped, not fatal

        found = await asyncio.gather(*(one(*c) for c in combos))
        return [o for offers in found for o in offers if matches(o, q)]

    async def _offers_of(self, hw: int, name: str, n: int, now: float) -> list[Offer]:
        """The offers of ``n`` GPUs of hardware ``hw``: one per location with a free replica."""
        params = {"hardware_id": str(hw), "hardware_qty": str(n)}
        got = await self._call("GET", "/available-replicas", params=params)
        places = []
        for loc in got.get("data") or []:
            try:
                if int(loc["available_replicas"]) > 0:
                    places.append((int(loc["id"]), loc))
            except (KeyError, TypeError, ValueError):
                continue
        if not places:
            return []
        quote = await self._quote(hw, n, places[0][0], MIN_HOURS)
        total = float(quote.get("total_cost_usdc") or 0)
        if total <= 0:
            return []
        per_hour = total / MIN_HOURS
        mem = _mem_gb(name)
        out = []
        for loc_id, loc in places:
            free = int(loc["available_replicas"])
            stock: Literal["available", "low"] = "low" if free < 2 else "available"
            out.append(
                Offer(
                    provider=self.name,
                    offer_id=f"{hw}:{n}:{loc_id}",
                    gpu=canonical_gpu(name, mem),
                    gpu_count=n,
                    gpu_mem_gb=mem or 0.0,
                    country=str(loc.get("iso2") or "").upper() or None,
                    region=str(loc.get("name") or "") or None,
                    tier="community",
                    billing="prepaid",
                    usd_per_hour=per_hour,
                    usd_per_gpu_hour=per_hour / n,
                    min_hours=float(MIN_HOURS),
                    stock=stock,
                    fetched_at=now,
                )
            )
        return out

    async def _quote(self, hw: int, n: int, location: int, hours: int) -> dict[str, Any]:
        params = {
            "location_ids": json.dumps([location]),
            "hardware_id": str(hw),
            "gpus_per_container": str(n),
            "duration_hours": str(hours),
            "replica_count": "1",
            "currency": "usdc",
        }
        return dict((await self._call("GET", "/price", params=params)).get("data") or {})

    # ---- instances ---------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        try:
            hw, gpus, location = (int(x) for x in offer.offer_id.split(":"))
        except ValueError:
            raise ProviderError(f"ionet: {offer.offer_id!r} is not an io.net offer id") from None
        hours = math.ceil(spec.max_hours) if spec.max_hours is not None else self.hours
        hours = min(MAX_HOURS, max(MIN_HOURS, hours))
        # The node runs in the background; the foreground is the HTTP server CaaS asks for,
        # serving an empty directory (never the node's key).
        www = "/tmp/cotrain-www"
        script = (
            f"{onstart_script(spec)} mkdir -p {www} && "
            f"exec python3 -m http.server {self.traffic_port} --directory {www}"
        )
        body = {
            "resource_private_name": f"{TASK_PREFIX}{spec.task}",
            "duration_hours": hours,
            "gpus_per_container": gpus,
            "hardware_id": hw,
            "location_ids": [location],
            "container_config": {
                "replica_count": 1,
                "env_variables": {"COTRAIN_TASK": spec.task, "COTRAIN_OFFER": offer.offer_id},
                "entrypoint": ["/bin/bash", "-c", script],
                "traffic_port": self.traffic_port,
            },
            "registry_config": {"image_url": self.image},
        }
        got = await self._call("POST", "/deploy", json=body)
        if not got.get("deployment_id"):
            raise ProviderError(f"ionet: the deploy call named no deployment: {got}")
        log.info("ionet: deployment %s requested, %d h prepaid", got["deployment_id"], hours)
        return Instance(
            provider=self.name,
            instance_id=str(got["deployment_id"]),
            offer_id=offer.offer_id,
            state="starting",
            usd_per_hour=offer.usd_per_hour,
            started_at=time.time(),
            detail=str(got.get("status") or "")[:200],
            task=spec.task,
        )

    async def status(self, instance_id: str) -> Instance:
        got = (await self._call("GET", f"/deployment/{instance_id}")).get("data")
        if not isinstance(got, dict):
            raise ProviderError(f"ionet: deployment {instance_id}: unexpected answer")
        word = str(got.get("status") or "unknown")
        state = _STATES.get(word.lower(), "unknown")
        detail, host = word, None
        if state == "running":  # the deployment is; its container may not be yet
            state, detail, host = await self._readiness(instance_id)
        config = got.get("container_config") or {}
        env = config.get("env_variables") or {}
        minutes = float(got.get("compute_minutes_served") or 0) + float(
            got.get("compute_minutes_remaining") or 0
        )
        paid = float(got.get("amount_paid") or 0)
        return Instance(
            provider=self.name,
            instance_id=str(got.get("id") or instance_id),
            offer_id=str(env.get("COTRAIN_OFFER") or ""),
            state=state,
            usd_per_hour=paid / (minutes / 60) if paid > 0 and minutes > 0 else 0.0,
            started_at=_time(got.get("started_at") or got.get("created_at")),
            host=host,
            detail=detail[:200],
            task=str(env["COTRAIN_TASK"]) if env.get("COTRAIN_TASK") else None,
        )

    async def _readiness(self, instance_id: str) -> tuple[State, str, str | None]:
        got = (await self._call("GET", f"/deployment/{instance_id}/containers")).get("data")
        workers = (got or {}).get("workers") or []
        up = [w for w in workers if str(w.get("status", "")).lower() == "running"]
        if up:
            return "running", "running", str(up[0].get("public_url") or "") or None
        events = [e for w in workers for e in w.get("container_events") or []]
        last = str(events[-1].get("message") or "") if events else ""
        return "starting", f"no container running yet: {last}".rstrip(": "), None

    async def instances(self) -> list[Instance]:
        out: list[Instance] = []
        page = 1
        while True:
            params = {"page": str(page), "page_size": str(PAGE_SIZE)}
            got = (await self._call("GET", "/deployments", params=params)).get("data") or {}
            items = got.get("deployments") or []
            for d in items:
                try:
                    word = str(d["status"])
                    name = str(d.get("name") or "")
                    out.append(
                        Instance(
                            provider=self.name,
                            instance_id=str(d["id"]),
                            offer_id="",
                            state=_STATES.get(word.lower(), "unknown"),
                            started_at=_time(d.get("created_at")),
                            detail=word[:200],
                            task=name.removeprefix(TASK_PREFIX)
                            if name.startswith(TASK_PREFIX)
                            else None,
                        )
                    )
                except (KeyError, TypeError):
                    continue
            if not items or page * PAGE_SIZE >= int(got.get("total") or 0):
                return out
            page += 1

    async def terminate(self, instance_id: str) -> None:
        await self._call("DELETE", f"/deployment/{instance_id}")
        log.info("ionet: deployment %s destroyed", instance_id)
