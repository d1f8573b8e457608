"""TensorDock's v2 REST API (``/api/v2``) as its documentation describes it, replayed on loopback:
``GET /locations``, ``POST /instances`` (JSON:API style body), ``GET /instances``,
``GET /instances/{id}`` (a flat object, as documented), ``DELETE /instances/{id}``. Every answer
carries the documented rate-limit headers (100 requests a minute). The documentation shows no
error bodies: these answer ``{"error": "..."}`` (assumed, not documented). Nothing paginates
(the documented lists do not)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cotrain.market.tensordock import TensorDockProvider

NAME = "tensordock"
KEY = "tdv2_5e3c0ffee91d2b3a4f7_secret"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9jb3RyYWluLXJlcGxheS1rZXk cotrain-replay"

AUSTIN = "1d5e6c8a-0b1f-4c52-9a7e-3f2d1c0b9a81"
WARSAW = "7c2b9e41-5d3a-4e8f-b6c0-2a1f9e8d7c65"
SOLD_OUT = f"{WARSAW}|geforcertx4090-pcie-24gb|4"

LOCATIONS = {
    "data": {
        "locations": [
            {
                "id": AUSTIN, "city": "Austin", "stateprovince": "Texas",
                "country": "United States", "tier": 3,
                "gpus": [
                    {
                        "v0Name": "h100-sxm5-80gb", "displayName": "H100 SXM5 80GB",
                        "max_count": 8, "price_per_hr": 2.25,
                        "resources": {"max_vcpus": 128, "max_ram_gb": 960,
                                      "max_storage_gb": 4000},
                        "pricing": {"per_vcpu_hr": 0.003, "per_gb_ram_hr": 0.002,
                                    "per_gb_storage_hr": 0.00005},
                        "network_features": {"dedicated_ip_available": True,
                                             "port_forwarding_available": True,
                                             "network_storage_available": False},
                    },
                ],
            },
            {
                "id": WARSAW, "city": "Warsaw", "stateprovince": "Masovian",
                "country": "Poland", "tier": 1,
                "gpus": [
                    {
                        "v0Name": "geforcertx4090-pcie-24gb",
                        "displayName": "NVIDIA GeForce RTX 4090 PCIe 24GB",
                        "max_count": 4, "price_per_hr": 0.35,
                        "resources": {"max_vcpus": 32, "max_ram_gb": 100,
                                      "max_storage_gb": 2000},
                        "pricing": {"per_vcpu_hr": 0.003, "per_gb_ram_hr": 0.002,
                                    "per_gb_storage_hr": 0.00005},
                        "network_features": {"dedicated_ip_available": True,
                                             "port_forwarding_available": True,
                                             "network_storage_available": False},
                    },
                    {  # port forwarding only: not listed (a launch asks for a dedicated IP)
                        "v0Name": "rtxa6000-pcie-48gb", "displayName": "RTX A6000 PCIe 48GB",
                        "max_count": 2, "price_per_hr": 0.45,
                        "resources": {"max_vcpus": 16, "max_ram_gb": 64,
                                      "max_storage_gb": 1000},
                        "pricing": {"per_vcpu_hr": 0.003, "per_gb_ram_hr": 0.002,
                                    "per_gb_storage_hr": 0.00005},
                        "network_features": {"dedicated_ip_available": False,
                                             "port_forwarding_available": True,
                                             "network_storage_available": False},
                    },
                    {  # malformed (no pricing, no resources): skipped
                        "v0Name": "a100-pcie-80gb", "displayName": "A100 PCIe 80GB",
                        "max_count": 1, "price_per_hr": 1.2,
                        "network_features": {"dedicated_ip_available": True},
                    },
                ],
            },
        ]
    }
}  # fmt: skip


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.urls: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.rate_limit_once = True
        self.stuck = False
        self.instances: dict[str, dict[str, Any]] = {}
        self.budget = 100

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app.router.add_get("/api/v2/locations", self.locations)
        app.router.add_post("/api/v2/instances", self.create)
        app.router.add_get("/api/v2/instances", self.list_instances)
        app.router.add_get("/api/v2/instances/{id}", self.instance)
        app.router.add_delete("/api/v2/instances/{id}", self.delete)
        return app

    @web.middleware
    async def _gate(self, r: web.Request, handler: Any) -> web.StreamResponse:
        self.urls.append(str(r.rel_url))
        self.headers.append(dict(r.headers))
        if r.headers.get("Authorization") != f"Bearer {KEY}":
            return _error(401, "Unauthorized: invalid or expired API token")
        self.budget -= 1
        resp = await handler(r)
        resp.headers["X-RateLimit-Limit"] = "100"
        resp.headers["X-RateLimit-Remaining"] = str(max(self.budget, 0))
        return resp

    async def locations(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "locations", dict(r.query)))
        if self.rate_limit_once:  # the API's rate limit, once
            self.rate_limit_once = False
            return _error(429, "Too many requests", **{"Retry-After": "0"})
        return web.json_response(LOCATIONS)

    async def create(self, r: web.Request) -> web.Response:
        body = await r.json()
        self.calls.append(("POST", "instances", body))
        data = body.get("data") or {}
        a = data.get("attributes") or {}
        res = a.get("resources") or {}
        gpus = res.get("gpus") or {}
        if data.get("type") != "virtualmachine" or not a.get("name") or not a.get("image"):
            return _error(400, "Invalid request body: data.type, name and image are required")
        if not a.get("ssh_key") and not a.get("ssh_key_id"):
            return _error(400, "An SSH key is required")
        if int(res.get("storage_gb") or 0) < 100:
            return _error(400, "Minimum storage is 100GB")
        if len(gpus) != 1:
            return _error(400, "At least one GPU is required for location-based deployment")
        [(v0, want)] = gpus.items()
        loc = next((x for x in LOCATIONS["data"]["locations"] if x["id"] == a.get("location_id")),
                   None)  # fmt: skip
        gpu = next((g for g in (loc or {}).get("gpus", []) if g["v0Name"] == v0), None)
        if loc is None or gpu is None:
            return _error(404, "Location or GPU model not found")
        if f"{loc['id']}|{v0}|{want['count']}" == SOLD_OUT or want["count"] > gpu["max_count"]:
            return _error(400, "No available hostnodes in this location can fit the requested "
                               "resources")  # fmt: skip
        iid = f"550e8400-e29b-41d4-a716-4466554400{len(self.instances):02d}"
        self.instances[iid] = {
            "type": "instance", "id": iid, "name": a["name"], "status": "starting",
            "ipAddress": "198.51.100.17", "portForwards": [],
        }  # fmt: skip
        return web.json_response(
            {"data": {"type": "virtualmachine", "id": iid, "name": a["name"],
                      "status": "starting"}}
        )  # fmt: skip

    async def list_instances(self, r: web.Request) -> web.Response:
        rows = [
            {"type": "VM", "id": i["id"], "attributes": {"name": i["name"], "status": i["status"]}}
            for i in self.instances.values()
        ]
        return web.json_response({"data": {"instances": rows}})

    async def instance(self, r: web.Request) -> web.Response:
        inst = self.instances.get(r.match_info["id"])
        if inst is None:
            return _error(404, "Instance not found")
        inst["seen"] = inst.get("seen", 0) + 1
        if inst["seen"] > 1 and not self.stuck:
            inst["status"] = "running"
        return web.json_response({k: v for k, v in inst.items() if k != "seen"})

    async def delete(self, r: web.Request) -> web.Response:
        if self.instances.pop(r.match_info["id"], None) is None:
            return _error(404, "Instance not found")
        return web.json_response(
            {
                "data": {
                    "type": "success",
                    "attributes": {"message": "Instance deleted successfully"},
                }
            }
        )


def provider(url: str, key: str = KEY) -> TensorDockProvider:
    return TensorDockProvider(key, url=url, ssh_key=SSH_KEY)
