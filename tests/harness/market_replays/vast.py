"""Vast.ai's REST API (``/api/v0``) as its documentation describes it, replayed on loopback."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cotrain.market.vast import VastProvider

NAME = "vast"
SOLD_OUT = "7000456"

KEY = "vk_5e3c0ffee1d2b3a4_secret"

OFFERS = {
    "offers": [
        {  # a datacenter H100 box: the secure tier
            "id": 7000123, "gpu_name": "H100 SXM", "num_gpus": 8, "gpu_ram": 81559,
            "dph_total": 17.6, "reliability2": 0.9971, "hosting_type": 1,
            "datacenter": "dc-se-1", "geolocation": "Sweden, SE", "inet_down": 8200.5,
            "inet_up": 7900.1, "cpu_cores_effective": 96.0, "cpu_ram": 1031891,
            "disk_space": 1800.0, "rentable": True, "verified": True,
        },
        {  # a community 4090
            "id": 7000456, "gpu_name": "RTX 4090", "num_gpus": 2, "gpu_ram": 24564,
            "dph_total": 0.62, "reliability2": 0.981, "hosting_type": 0,
            "geolocation": "Texas, US", "inet_down": 700.0, "inet_up": 500.0,
            "cpu_cores_effective": 16.0, "cpu_ram": 64000, "disk_space": 200.0,
            "rentable": True,
        },
        {"id": 7000789, "gpu_name": "A100 PCIE"},  # malformed (no count, no price): skipped
    ]
}  # fmt: skip


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.rate_limit_once = True
        self.stuck = False
        self.instances: dict[int, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v0/bundles/", self.bundles)
        app.router.add_put("/api/v0/asks/{id}/", self.ask)
        app.router.add_get("/api/v0/instances/", self.list_instances)
        app.router.add_get("/api/v0/instances/{id}/", self.instance)
        app.router.add_delete("/api/v0/instances/{id}/", self.destroy)
        return app

    def _auth(self, r: web.Request) -> None:
        if r.headers.get("Authorization") != f"Bearer {KEY}":
            raise web.HTTPUnauthorized(
                text=json.dumps({"success": False, "error": "invalid_user", "msg": "bad key"}),
                content_type="application/json",
            )

    async def bundles(self, r: web.Request) -> web.Response:
        self._auth(r)
        self.calls.append(("GET", "bundles", json.loads(r.query["q"])))
        if self.rate_limit_once:  # the API's rate limit, once
            self.rate_limit_once = False
            return web.json_response({"msg": "too many requests"}, status=429,
                                     headers={"Retry-After": "0"})  # fmt: skip
        return web.json_response(OFFERS)

    async def ask(self, r: web.Request) -> web.Response:
        self._auth(r)
        body = await r.json()
        self.calls.append(("PUT", r.match_info["id"], body))
        if r.match_info["id"] == SOLD_OUT:
            return web.json_response({"success": False, "msg": "no_such_ask"}, status=404)
        iid = 90000 + len(self.instances)
        self.instances[iid] = {
            "id": iid, "actual_status": "loading", "label": body["label"], "dph_total": 17.6,
            "ask_contract_id": int(r.match_info["id"]), "public_ipaddr": "203.0.113.7\n",
            "status_msg": "pulling image", "start_date": 1796500000.0,
        }  # fmt: skip
        return web.json_response({"success": True, "new_contract": iid})

    async def list_instances(self, r: web.Request) -> web.Response:
        self._auth(r)
        return web.json_response({"instances": list(self.instances.values())})

    async def instance(self, r: web.Request) -> web.Response:
        self._auth(r)
        inst = self.instances.get(int(r.match_info["id"]))
        if inst is not None and not self.stuck:
            inst["seen"] = inst.get("seen", 0) + 1
            if inst["seen"] > 1:
                inst["actual_status"] = "running"
        return web.json_response({"instances": inst})

    async def destroy(self, r: web.Request) -> web.Response:
        self._auth(r)
        self.instances.pop(int(r.match_info["id"]), None)
        return web.json_response({"success": True})


def provider(url: str, key: str = KEY) -> VastProvider:
    return VastProvider(key, url=url)
