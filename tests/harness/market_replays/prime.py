"""Prime Intellect's REST API (``/api/v1``) as its documentation and the prime CLI describe it,
replayed on loopback. Both listings page by two (the real API by up to 100), so a client that
reads one page only misses offers and pods."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cotrain.market.prime import PrimeProvider, offer_id_of

NAME = "prime"
KEY = "pi_live_7f3a9c2e5b1d4f60_secret"
PAGE_SIZE = 2


def _res(
    default: int, lo: int | None = None, hi: int | None = None, unit: float | None = None
) -> dict[str, Any]:
    return {
        "minCount": lo, "defaultCount": default, "maxCount": hi, "pricePerUnit": unit,
        "step": 1 if lo is not None else None, "defaultIncludedInPrice": lo is None,
        "additionalInfo": None,
    }  # fmt: skip


IMAGES = ["ubuntu_22_cuda_12", "cuda_12_1_pytorch_2_2", "cuda_11_8_pytorch_2_1", "axolotl"]

OFFERS: list[dict[str, Any]] = [
    {  # the docs' provisioning example: a fixed Hyperstack H100
        "cloudId": "n3-H100x1", "gpuType": "H100_80GB", "socket": "PCIe",
        "provider": "hyperstack", "dataCenter": "CANADA-1", "country": "CA", "gpuCount": 1,
        "gpuMemory": 80, "disk": _res(100), "vcpu": _res(28), "memory": _res(180),
        "internetSpeed": None, "interconnect": None, "interconnectType": None,
        "provisioningTime": None, "stockStatus": "Available", "security": "secure_cloud",
        "prices": {"onDemand": 1.9, "communityPrice": None, "isVariable": None,
                   "currency": "USD"},
        "images": IMAGES, "isSpot": None, "prepaidTime": None,
    },
    {  # an 8x H100 SXM5 box, stock low, with configurable disk
        "cloudId": "NVIDIA H100 80GB HBM3", "gpuType": "H100_80GB", "socket": "SXM5",
        "provider": "runpod", "dataCenter": "US-KS-2", "country": "US", "gpuCount": 8,
        "gpuMemory": 80, "disk": _res(80, 80, 1000, 0.00014), "vcpu": _res(128),
        "memory": _res(1510), "internetSpeed": 9500, "interconnect": 900,
        "interconnectType": "NVLink", "provisioningTime": 5, "stockStatus": "Low",
        "security": "secure_cloud",
        "prices": {"onDemand": 23.92, "communityPrice": None, "isVariable": False,
                   "currency": "USD"},
        "images": IMAGES, "isSpot": False, "prepaidTime": None,
    },
    {  # a community 2x RTX 4090 (community price): the one that sells out before launch
        "cloudId": "NVIDIA GeForce RTX 4090", "gpuType": "RTX4090_24GB", "socket": "PCIe",
        "provider": "runpod", "dataCenter": "EU-SE-1", "country": "SE", "gpuCount": 2,
        "gpuMemory": 24, "disk": _res(40, 20, 500, 0.0001), "vcpu": _res(12),
        "memory": _res(62), "internetSpeed": 1000, "interconnect": None,
        "interconnectType": None, "provisioningTime": 2, "stockStatus": "Available",
        "security": "community_cloud",
        "prices": {"onDemand": None, "communityPrice": 0.68, "isVariable": True,
                   "currency": "USD"},
        "images": IMAGES, "isSpot": False, "prepaidTime": None,
    },
    {  # a spot A100
        "cloudId": "1A100.22V", "gpuType": "A100_80GB", "socket": "SXM4",
        "provider": "datacrunch", "dataCenter": "FIN-01", "country": "FI", "gpuCount": 1,
        "gpuMemory": 80, "disk": _res(50, 50, 2000, 0.0002), "vcpu": _res(22),
        "memory": _res(120), "internetSpeed": None, "interconnect": None,
        "interconnectType": None, "provisioningTime": None, "stockStatus": "Available",
        "security": "secure_cloud",
        "prices": {"onDemand": 0.55, "communityPrice": None, "isVariable": True,
                   "currency": "USD"},
        "images": IMAGES, "isSpot": True, "prepaidTime": None,
    },
    {  # nothing left of it
        "cloudId": "gpu_8x_h200_sxm5", "gpuType": "H200_141GB", "socket": "SXM5",
        "provider": "lambdalabs", "dataCenter": "us-east-1", "country": "US", "gpuCount": 8,
        "gpuMemory": 141, "disk": _res(2000), "vcpu": _res(208), "memory": _res(1800),
        "internetSpeed": None, "interconnect": None, "interconnectType": "NVLink",
        "provisioningTime": None, "stockStatus": "Unavailable", "security": "secure_cloud",
        "prices": {"onDemand": 35.92, "communityPrice": None, "isVariable": None,
                   "currency": "USD"},
        "images": IMAGES, "isSpot": None, "prepaidTime": None,
    },
    {  # a CPU node of Prime's own
        "cloudId": "cpu-16c-64g", "gpuType": "CPU_NODE", "socket": None,
        "provider": "primecompute", "dataCenter": "US-TX-1", "country": "US", "gpuCount": 1,
        "gpuMemory": 0, "disk": _res(100), "vcpu": _res(16), "memory": _res(64),
        "internetSpeed": None, "interconnect": None, "interconnectType": None,
        "provisioningTime": None, "stockStatus": "Available", "security": "secure_cloud",
        "prices": {"onDemand": 0.32, "communityPrice": None, "isVariable": None,
                   "currency": "USD"},
        "images": ["ubuntu_22_cuda_12"], "isSpot": None, "prepaidTime": None,
    },
    {  # priced in euros: not comparable, skipped
        "cloudId": "H100-1-80G", "gpuType": "H100_80GB", "socket": "PCIe",
        "provider": "scaleway", "dataCenter": "fr-par-2", "country": "FR", "gpuCount": 1,
        "gpuMemory": 80, "disk": _res(3000), "vcpu": _res(24), "memory": _res(240),
        "stockStatus": "Available", "security": "secure_cloud",
        "prices": {"onDemand": 2.73, "communityPrice": None, "isVariable": None,
                   "currency": "EUR"},
        "images": IMAGES, "isSpot": None, "prepaidTime": None,
    },
    {"cloudId": "broken", "gpuType": "A100_80GB", "stockStatus": "Available"},  # malformed
]  # fmt: skip

SOLD_OUT = offer_id_of(OFFERS[2])


def _detail(status: int, detail: Any, **headers: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers or None)


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.seen: dict[str, int] = {}
        self.rate_limit_once = True
        self.stuck = False
        self.pods: dict[str, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/availability/gpus", self.availability)
        app.router.add_post("/api/v1/pods", self.create)
        app.router.add_get("/api/v1/pods", self.list_pods)
        app.router.add_get("/api/v1/pods/{id}", self.pod)
        app.router.add_delete("/api/v1/pods/{id}", self.delete)
        return app

    def _auth(self, r: web.Request) -> None:
        if r.headers.get("Authorization") != f"Bearer {KEY}":
            raise web.HTTPUnauthorized(
                text=json.dumps({"detail": "Invalid API key"}), content_type="application/json"
            )

    async def availability(self, r: web.Request) -> web.Response:
        self._auth(r)
        q = {k: r.query.getall(k) if k == "regions" else v for k, v in r.query.items()}
        self.calls.append(("GET", "availability", q))
        if self.rate_limit_once:
            self.rate_limit_once = False
            return _detail(429, "Rate limit exceeded", **{"Retry-After": "0"})
        items = [
            o
            for o in OFFERS
            if all(
                str(o.get(field)) == q[param]
                for param, field in (
                    ("security", "security"), ("gpu_type", "gpuType"), ("gpu_count", "gpuCount")
                )
                if param in q
            )
        ]  # fmt: skip
        page = int(q.get("page", 1))
        size = min(int(q.get("page_size", 100)), PAGE_SIZE)
        return web.json_response(
            {"items": items[(page - 1) * size : page * size], "totalCount": len(items)}
        )

    async def create(self, r: web.Request) -> web.Response:
        self._auth(r)
        body = await r.json()
        self.calls.append(("POST", "pods", body))
        pod = body.get("pod") or {}
        missing = [k for k in ("cloudId", "gpuType", "gpuCount") if k not in pod]
        if missing:
            return _detail(422, [
                {"type": "missing", "loc": ["body", "pod", k], "msg": "Field required",
                 "input": pod} for k in missing
            ])  # fmt: skip
        if not isinstance(pod["gpuCount"], int) or pod["gpuCount"] < 1:
            return _detail(422, [
                {"type": "greater_than_equal", "loc": ["body", "pod", "gpuCount"],
                 "msg": "Input should be greater than or equal to 1", "input": pod["gpuCount"]}
            ])  # fmt: skip
        key = {
            "cloudId": pod["cloudId"], "gpuType": pod["gpuType"], "socket": pod.get("socket"),
            "gpuCount": pod["gpuCount"], "provider": (body.get("provider") or {}).get("type"),
            "dataCenter": pod.get("dataCenterId"), "security": pod.get("security"),
        }  # fmt: skip
        offer = next((o for o in OFFERS if offer_id_of(o) == offer_id_of(key)), None)
        if offer is None or offer_id_of(offer) == SOLD_OUT:
            return _detail(400, "No capacity available for the requested configuration. "
                           "Please select a different offer.")  # fmt: skip
        pid = f"c5f1e9a7{len(self.pods):024x}"
        self.pods[pid] = {
            "id": pid, "userId": "u_8c1f2e", "teamId": None, "walletId": "w_41d0",
            "name": pod.get("name"), "type": "HOSTED", "providerType": key["provider"],
            "status": "PROVISIONING", "installationStatus": "PENDING",
            "installationFailure": None, "installationProgress": 0,
            "createdAt": "2026-11-02T09:14:07.512Z", "updatedAt": "2026-11-02T09:14:07.512Z",
            "gpuName": pod["gpuType"], "gpuCount": pod["gpuCount"], "socket": pod.get("socket"),
            "priceHr": offer["prices"]["communityPrice"] or offer["prices"]["onDemand"],
            "stoppedPriceHr": 0.005, "provisioningPriceHr": 0.0,
            "environmentType": pod.get("image"), "customTemplateId": None,
            "primePortMapping": [], "sshConnection": None, "ip": [None],
            "resources": {"memory": str(pod.get("memory")), "disk": str(pod.get("diskSize")),
                          "vcpus": str(pod.get("vcpus"))},
            "attachedResources": [], "isSpot": bool(offer.get("isSpot")), "autoRestart": False,
        }  # fmt: skip
        return web.json_response(self.pods[pid])

    async def list_pods(self, r: web.Request) -> web.Response:
        self._auth(r)
        offset = int(r.query.get("offset", 0))
        limit = min(int(r.query.get("limit", 100)), PAGE_SIZE)
        self.calls.append(("GET", "pods", dict(r.query)))
        pods = list(self.pods.values())
        return web.json_response(
            {"data": pods[offset : offset + limit], "total_count": len(pods),
             "offset": offset, "limit": limit}
        )  # fmt: skip

    async def pod(self, r: web.Request) -> web.Response:
        self._auth(r)
        pod = self.pods.get(r.match_info["id"])
        if pod is None:
            return _detail(404, "Pod not found")
        if not self.stuck:
            self.seen[pod["id"]] = self.seen.get(pod["id"], 0) + 1
            if self.seen[pod["id"]] > 1:
                pod.update(
                    status="ACTIVE", installationStatus="FINISHED", installationProgress=100,
                    ip="198.51.100.23", sshConnection="root@198.51.100.23 -p 22",
                )  # fmt: skip
        return web.json_response(pod)

    async def delete(self, r: web.Request) -> web.Response:
        self._auth(r)
        self.calls.append(("DELETE", r.match_info["id"], None))
        if self.pods.pop(r.match_info["id"], None) is None:
            return _detail(404, "Pod not found")
        return web.json_response({"status": "ok"})


def provider(url: str, key: str = KEY) -> PrimeProvider:
    return PrimeProvider(key, url=url)
