"""The Akash Console API (managed wallet) as its documentation and OpenAPI schemas describe it,
replayed on loopback: GPU prices, deployments from an SDL, bids, leases, closing.

Every answer is wrapped in ``{"data": ...}``; errors are ``{"error": "<Code>", "message": ...}``;
an ``x-api-key`` that is present but unknown is refused on every route, public ones included.
Providers bid on a new deployment at once, below the SDL's price cap, except for the RTX 4090
(``SOLD_OUT``): nobody bids on that. A lease's service has a ready replica from the second
status call on, unless ``stuck``."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from cotrain.market.akash import AkashProvider

NAME = "akash"
KEY = "ak-live-3f9c27d1e08b44a6-console-secret"
SOLD_OUT = "nvidia:rtx4090:24Gi:PCIe:1"

OWNER = "akash1q7spv3vz8wqn5mxrkl2kc9xfq9x8v4h3xe2l7u"
PROVIDERS = {  # (address, share of the price cap it bids, bid state)
    "akash1hpr9a7w5kkz8x3hdd0ns4l8xcg2a6tqfuyzv3k": (0.92, "open"),
    "akash1f6gmtjpx4r8qda9nxjwq3e5l2y6ksz0vt7c8uh": (0.71, "open"),  # the cheapest open bid
    "akash1ccl5dftm0p9zdr2xh4vqfu7s3ek8jn6wya0g5t": (0.50, "closed"),  # withdrawn: not leasable
}
CHEAPEST = "akash1f6gmtjpx4r8qda9nxjwq3e5l2y6ksz0vt7c8uh"


def _model(vendor: str, model: str, ram: str, iface: str, free: int, price: Any) -> dict[str, Any]:
    return {
        "vendor": vendor, "model": model, "ram": ram, "interface": iface,
        "availability": {"total": max(free, 1) * 4, "available": free},
        "providerAvailability": {"total": 6, "available": 3 if free else 0},
        "price": price,
    }  # fmt: skip


def _usd(med: float) -> dict[str, Any]:
    return {
        "currency": "USD", "min": round(med * 0.8, 2), "max": round(med * 1.4, 2),
        "avg": round(med * 1.05, 2), "weightedAverage": round(med * 1.02, 2), "med": med,
    }  # fmt: skip


GPU_PRICES = {
    "availability": {"total": 210, "available": 39},
    "models": [
        _model("nvidia", "h100", "80Gi", "SXM5", 24, _usd(1.85)),
        _model("nvidia", "a100", "80Gi", "PCIe", 6, _usd(1.1)),
        _model("nvidia", "rtx4090", "24Gi", "PCIe", 1, _usd(0.38)),
        _model("nvidia", "t4", "16Gi", "PCIe", 8, None),  # no recent bids: no estimate
        _model("nvidia", "rtxa6000", "48Gi", "PCIe", 0, _usd(0.55)),  # none free now
        {"vendor": "nvidia", "ram": "80Gi", "price": _usd(2.0)},  # malformed: no model
    ],
}


def _field(sdl: str, key: str) -> Any:
    """A JSON-valued line of the SDL (``    args: [...]``)."""
    found = re.search(rf"^\s+{key}: (.+)$", sdl, re.MULTILINE)
    return json.loads(found.group(1)) if found else None


def _error(cls: type[web.HTTPException], code: str, message: str) -> web.HTTPException:
    return cls(
        text=json.dumps({"error": code, "message": message}), content_type="application/json"
    )


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.rate_limit_once = True
        self.stuck = False
        self.refuse_create: str | None = None
        """When set, creating a deployment answers 400 with this message."""
        self.deployments: dict[str, dict[str, Any]] = {}
        self.next_dseq = 21873400
        self._add("21873311", sdl="", state="closed")  # an earlier deployment of this account

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/gpu-prices", self.gpu_prices)
        app.router.add_post("/v1/deployments", self.create)
        app.router.add_get("/v1/deployments", self.list_deployments)
        app.router.add_get("/v1/deployments/{dseq}", self.get)
        app.router.add_delete("/v1/deployments/{dseq}", self.close)
        app.router.add_get("/v1/bids", self.bids)
        app.router.add_post("/v1/leases", self.lease)
        return app

    @web.middleware
    async def _auth(self, r: web.Request, handler: Any) -> web.StreamResponse:
        key = r.headers.get("x-api-key")
        # The interceptor checks a key wherever one is sent; only public routes do without.
        if (key is not None and key != KEY) or (key is None and r.path != "/v1/gpu-prices"):
            raise _error(web.HTTPUnauthorized, "Unauthorized", "Invalid API key")
        resp: web.StreamResponse = await handler(r)
        return resp

    def _add(self, dseq: str, *, sdl: str, state: str = "active") -> dict[str, Any]:
        dep = {"dseq": dseq, "sdl": sdl, "state": state, "leases": [], "bids": [], "seen": 0,
               "manifest": ""}  # fmt: skip
        self.deployments[dseq] = dep
        return dep

    # ---- routes ------------------------------------------------------------------------------

    async def gpu_prices(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "/v1/gpu-prices", None))
        if self.rate_limit_once:
            self.rate_limit_once = False
            return web.json_response(
                {"error": "TooManyRequests", "message": "Rate limit exceeded"},
                status=429,
                headers={"Retry-After": "0"},
            )
        return web.json_response(GPU_PRICES)  # this route answers without the envelope

    async def create(self, r: web.Request) -> web.Response:
        body = await r.json()
        self.calls.append(("POST", "/v1/deployments", body))
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("sdl"), str):
            raise _error(web.HTTPBadRequest, "BadRequest", "data.sdl: Required")
        if self.refuse_create:
            raise _error(web.HTTPBadRequest, "BadRequest", self.refuse_create)
        sdl = data["sdl"]
        dseq = str(self.next_dseq)
        self.next_dseq += 1
        dep = self._add(dseq, sdl=sdl)
        dep["manifest"] = json.dumps(
            [{"name": "akash", "services": [{
                "name": "cotrain", "image": _field(sdl, "image"), "command": _field(sdl, "command"),
                "args": _field(sdl, "args"), "env": _field(sdl, "env"), "count": 1}]}]
        )  # fmt: skip
        cap = re.search(r"denom: (\"[^\"]+\"), amount: (\d+)", sdl)
        gpus = re.search(r"units: (\d+)\n\s+attributes:", sdl)
        if cap and gpus and '"rtx4090"' not in sdl:  # nobody bids on the RTX 4090
            denom, amount = json.loads(cap.group(1)), int(cap.group(2))
            for provider, (share, state) in PROVIDERS.items():
                dep["bids"].append(self._bid(dseq, provider, state, denom, amount * share))
        return web.json_response(
            {"data": {"dseq": dseq, "manifest": dep["manifest"],
                      "signTx": {"code": 0, "hash": "9F1C0E" + dseq, "rawLog": "[]"}}},
            status=201,
        )  # fmt: skip

    def _bid(self, dseq: str, provider: str, state: str, denom: str, amount: float) -> Any:
        bid_id = {"owner": OWNER, "dseq": dseq, "gseq": 1, "oseq": 1, "provider": provider,
                  "bseq": 0}  # fmt: skip
        return {
            "bid": {
                "id": bid_id, "state": state,
                "price": {"denom": denom, "amount": f"{amount:.18f}"},
                "created_at": str(int(dseq) + 3),
                "resources_offer": [{"resources": {}, "count": 1}],
            },
            "escrow_account": {"id": {"scope": "bid", "xid": f"{OWNER}/{dseq}/1/1/{provider}"}},
            "isCertificateRequired": False,
        }  # fmt: skip

    async def bids(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "/v1/bids", dict(r.query)))
        dep = self.deployments.get(r.query.get("dseq", ""))
        if dep is None:
            raise _error(web.HTTPNotFound, "NotFound", "Deployment not found")
        return web.json_response({"data": dep["bids"] if dep["state"] == "active" else []})

    async def lease(self, r: web.Request) -> web.Response:
        body = await r.json()
        self.calls.append(("POST", "/v1/leases", body))
        want = body["leases"][0]
        dep = self.deployments.get(str(want["dseq"]))
        if dep is None:
            raise _error(web.HTTPNotFound, "NotFound", "Deployment not found")
        if body.get("manifest") != dep["manifest"]:
            raise _error(web.HTTPBadRequest, "BadRequest", "manifest does not match the deployment")
        bid = next(
            (b["bid"] for b in dep["bids"] if b["bid"]["id"]["provider"] == want["provider"]), None
        )
        if bid is None or bid["state"] != "open":
            raise _error(web.HTTPBadRequest, "BadRequest", "bid not open")
        bid["state"] = "active"
        dep["leases"].append({
            "id": {**bid["id"]}, "state": "active", "price": bid["price"],
            "created_at": str(int(dep["dseq"]) + 9), "closed_on": "0",
        })  # fmt: skip
        return web.json_response({"data": self._deployment(dep, with_status=False)})

    def _deployment(self, dep: dict[str, Any], *, with_status: bool) -> dict[str, Any]:
        leases = []
        for lease in dep["leases"]:
            lease = dict(lease)
            if with_status:
                ready = (
                    1 if dep["seen"] > 1 and not self.stuck and lease["state"] == "active" else 0
                )
                lease["status"] = {
                    "forwarded_ports": {"cotrain": [{"port": 8080, "externalPort": 31522,
                                                     "host": "provider.gpu.example.net",
                                                     "available": ready}]},
                    "ips": {},
                    "services": {"cotrain": {
                        "name": "cotrain", "available": ready, "total": 1, "uris": [],
                        "observed_generation": 1, "replicas": 1, "updated_replicas": 1,
                        "ready_replicas": ready, "available_replicas": ready}},
                }  # fmt: skip
            leases.append(lease)
        return {
            "deployment": {"id": {"owner": OWNER, "dseq": dep["dseq"]}, "state": dep["state"],
                           "hash": "", "created_at": dep["dseq"]},
            "leases": leases,
            "escrow_account": {"id": {"scope": "deployment", "xid": f"{OWNER}/{dep['dseq']}"},
                               "state": {"owner": OWNER, "state": "open", "transferred": [],
                                         "settled_at": dep["dseq"], "funds": [], "deposits": []}},
        }  # fmt: skip

    async def get(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", r.path, None))
        dep = self.deployments.get(r.match_info["dseq"])
        if dep is None:
            raise _error(web.HTTPNotFound, "NotFound", "Deployment not found")
        if dep["leases"]:
            dep["seen"] += 1
        data = self._deployment(dep, with_status=True)
        data["consoleSettings"] = {"sdl": dep["sdl"], "manifestVersion": "bWFuaWZlc3Q="}
        return web.json_response({"data": data})

    async def list_deployments(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "/v1/deployments", dict(r.query)))
        skip, limit = int(r.query.get("skip", 0)), min(100, int(r.query.get("limit", 10)))
        deps = list(self.deployments.values())
        page = [self._deployment(d, with_status=False) for d in deps[skip : skip + limit]]
        return web.json_response(
            {"data": {"deployments": page, "pagination": {
                "total": len(deps), "skip": skip, "limit": limit,
                "hasMore": skip + limit < len(deps)}}}
        )  # fmt: skip

    async def close(self, r: web.Request) -> web.Response:
        self.calls.append(("DELETE", r.path, None))
        dep = self.deployments.get(r.match_info["dseq"])
        if dep is None:
            raise _error(web.HTTPNotFound, "NotFound", "Deployment not found")
        dep["state"] = "closed"
        for lease in dep["leases"]:
            lease["state"] = "closed"
        return web.json_response({"data": {"success": True}})


def provider(url: str, key: str = KEY) -> AkashProvider:
    # Bids arrive at once here: a short window keeps the no-bid launch short.
    return AkashProvider(key, url=url, bid_window_s=0.2, bid_poll_s=0.02)
