"""Vast.ai: a thin client of its public REST API (https://docs.vast.ai, ``/api/v0``).

    GET    /api/v0/bundles/?q=<json>     offers ("asks"): {"offers": [...]}
    PUT    /api/v0/asks/{id}/            rent one: {"success": true, "new_contract": <id>}
    GET    /api/v0/instances/            ours: {"instances": [...]}
    GET    /api/v0/instances/{id}/       one: {"instances": {...}}
    DELETE /api/v0/instances/{id}/       destroy it

Authentication is a Bearer key (``api_keys.key_for("vast")``): it goes in a header only, so it
is in no URL, log line or error message. A 429 is waited out (``Retry-After``, a few times); an
ask that is gone (404, or ``success: false``) is ``OutOfStock``, so a launch moves on to the
next offer. Vast's "datacenter" hosts are the secure tier, the rest community; its on-demand
asks are what ``offers`` lists.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cotrain.market.http import JsonApi
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

_STATES: dict[str, State] = {
    "running": "running",
    "loading": "starting",
    "created": "starting",
    "scheduling": "starting",
    "exited": "exited",
    "stopped": "exited",
    "offline": "failed",
}


URL = "https://console.vast.ai"


def _gone(status: int, body: Any, method: str, path: str) -> None:
    if status == 404 and path.startswith("/api/v0/asks/"):
        raise OutOfStock(f"vast: offer {path.split('/')[4]} is no longer available")


class VastProvider:
    name = "vast"
    caps = frozenset({Cap.SPOT, Cap.BID, Cap.DOCKER_IMAGE, Cap.OPEN_PORTS, Cap.STOP})

    def __init__(
        self,
        api_key: str,
        *,
        url: str = URL,
        image: str = "pytorch/pytorch:latest",
        disk_gb: float = 40.0,
        timeout_s: float = 20.0,
        retries_429: int = 3,
    ) -> None:
        self.api = JsonApi(
            self.name,
            url,
            {"Authorization": f"Bearer {api_key}"},
            secret=api_key,
            timeout_s=timeout_s,
            retries_429=retries_429,
            on_error=_gone,
        )
        self.image = image
        self.disk_gb = disk_gb

    def __repr__(self) -> str:  # never the key
        return f"VastProvider(url={self.api.url!r})"

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        return await self.api.call(method, path, **kw)

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        query = {"rentable": {"eq": True}, "type": "on-demand", "limit": 1000}
        body = await self._call("GET", "/api/v0/bundles/", params={"q": json.dumps(query)})
        now = time.time()
        out = []
        for raw in body.get("offers", []):
            try:
                o = self._offer(raw, now)
            except (KeyError, TypeError, ValueError):
                continue  # a malformed ask is skipped, not fatal
            if matches(o, q):
                out.append(o)
        return out

    def _offer(self, r: dict[str, Any], now: float) -> Offer:
        n = int(r["num_gpus"])
        mem = float(r.get("gpu_ram") or 0) / 1024
        price = float(r["dph_total"])
        geo = str(r.get("geolocation") or "")
        country = geo.rsplit(",", 1)[-1].strip() if "," in geo else None
        return Offer(
            provider=self.name,
            offer_id=str(r["id"]),
            gpu=canonical_gpu(str(r["gpu_name"]), mem) if n else "cpu",
            gpu_count=n,
            gpu_mem_gb=round(mem, 1),
            vcpus=int(r["cpu_cores_effective"]) if r.get("cpu_cores_effective") else None,
            ram_gb=round(float(r["cpu_ram"]) / 1024, 1) if r.get("cpu_ram") else None,
            disk_gb=float(r["disk_space"]) if r.get("disk_space") else None,
            country=country,
            region=geo or None,
            datacenter=str(r["datacenter"]) if r.get("datacenter") else None,
            tier="secure" if r.get("hosting_type") == 1 or r.get("datacenter") else "community",
            billing="on_demand",
            usd_per_hour=price,
            usd_per_gpu_hour=price / max(n, 1),
            stock="available" if r.get("rentable", True) else "none",
            reliability=min(1.0, float(r["reliability2"])) if "reliability2" in r else None,
            net_down_mbps=float(r["inet_down"]) if r.get("inet_down") is not None else None,
            net_up_mbps=float(r["inet_up"]) if r.get("inet_up") is not None else None,
            fetched_at=now,
        )

    # ---- instances ---------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        body = {
            "client_id": "me",
            "image": self.image,
            "disk": self.disk_gb,
            "runtype": "ssh",
            "onstart": onstart_script(spec),
            "label": f"cotrain:{spec.task}",
        }
        got = await self._call("PUT", f"/api/v0/asks/{offer.offer_id}/", json=body)
        if not got.get("success") or "new_contract" not in got:
            raise OutOfStock(f"vast: offer {offer.offer_id} was not rented: {got.get('msg', '')}")
        return Instance(
            provider=self.name,
            instance_id=str(got["new_contract"]),
            offer_id=offer.offer_id,
            state="starting",
            usd_per_hour=offer.usd_per_hour,
            started_at=time.time(),
            task=spec.task,
        )

    def _instance(self, r: dict[str, Any]) -> Instance:
        status = str(r.get("actual_status") or r.get("cur_state") or "unknown")
        label = str(r.get("label") or "")
        return Instance(
            provider=self.name,
            instance_id=str(r["id"]),
            offer_id=str(r.get("ask_contract_id") or ""),
            state=_STATES.get(status, "unknown"),
            usd_per_hour=float(r.get("dph_total") or 0),
            started_at=float(r.get("start_date") or 0),
            host=str(r["public_ipaddr"]).strip() if r.get("public_ipaddr") else None,
            detail=str(r.get("status_msg") or status)[:200],
            task=label.removeprefix("cotrain:") if label.startswith("cotrain:") else None,
        )

    async def status(self, instance_id: str) -> Instance:
        got = await self._call("GET", f"/api/v0/instances/{instance_id}/")
        inst = got.get("instances")
        if not inst:
            raise ProviderError(f"vast: no instance {instance_id}")
        return self._instance(inst)

    async def instances(self) -> list[Instance]:
        got = await self._call("GET", "/api/v0/instances/")
        return [self._instance(r) for r in got.get("instances", [])]

    async def terminate(self, instance_id: str) -> None:
        await self._call("DELETE", f"/api/v0/instances/{instance_id}/")
