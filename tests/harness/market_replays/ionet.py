"""io.net's IO Cloud container API (CaaS, ``/enterprise/v1/io-cloud/caas``) as its OpenAPI
reference describes it, replayed on loopback: hardware, free replicas per location, quotes,
deploy, deployments (paginated), containers, destroy.

Errors are FastAPI's: ``{"detail": "..."}``, or ``{"detail": [{"loc", "msg", "type"}]}`` for a
request that does not validate (422). The RTX 4090 in the US (``SOLD_OUT``) is listed with free
replicas, but its deploy is refused for capacity: someone rented it in between. A deployment
is "deploying" on its first status call and "running" after; its container runs from then on,
unless ``stuck`` (it stays pulling its image)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cotrain.market.ionet import IoNetProvider

NAME = "ionet"
KEY = "io-v2-5c1e8f3b9d0a47e2-api-secret"
SOLD_OUT = "31:1:4"

HARDWARE = [
    {"hardware_id": 206, "hardware_name": "H100 80GB HBM3", "brand_name": "NVIDIA",
     "max_gpus_per_container": 8, "available": 12},
    {"hardware_id": 31, "hardware_name": "GeForce RTX 4090", "brand_name": "NVIDIA",
     "max_gpus_per_container": 2, "available": 3},
    {"hardware_id": 44, "hardware_name": "A100-SXM4-80GB", "brand_name": "NVIDIA",
     "max_gpus_per_container": 8, "available": 0},  # none free: not quoted
    {"hardware_id": 77, "brand_name": "NVIDIA"},  # malformed: skipped
]  # fmt: skip
US = {"id": 4, "iso2": "US", "name": "United States"}
DE = {"id": 9, "iso2": "DE", "name": "Germany"}
FREE = {  # (hardware, GPUs a container): free replicas per location
    (206, 1): [(US, 6), (DE, 3)],
    (206, 2): [(US, 3), (DE, 1)],
    (206, 4): [(US, 1), (DE, 0)],
    (206, 8): [(US, 0)],
    (31, 1): [(US, 2)],
    (31, 2): [(US, 0)],
}
USD_PER_GPU_HOUR = {206: 2.19, 31: 0.35, 44: 1.29}
FEE_PERCENT = 2.5


def _invalid(loc: list[Any], msg: str, kind: str) -> web.HTTPException:
    body = {"detail": [{"loc": loc, "msg": msg, "type": kind}]}
    return web.HTTPUnprocessableEntity(text=json.dumps(body), content_type="application/json")


def _refused(cls: type[web.HTTPException], detail: str) -> web.HTTPException:
    return cls(text=json.dumps({"detail": detail}), content_type="application/json")


def quote(hardware: int, gpus: int, hours: int) -> dict[str, Any]:
    base = USD_PER_GPU_HOUR[hardware] * gpus * hours
    fee = round(base * FEE_PERCENT / 100, 6)
    return {
        "replica_count": 1, "gpus_per_container": gpus, "available_replica_count": [1],
        "discount": 0, "ionet_fee": fee, "ionet_fee_percent": FEE_PERCENT,
        "currency_conversion_fee": 0, "currency_conversion_fee_percent": 0,
        "total_cost_usdc": round(base + fee, 6),
    }  # fmt: skip


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.rate_limit_once = True
        self.stuck = False
        self.balance_usdc = 10_000.0
        """A deploy costing more is refused for the balance (not for capacity)."""
        self.deployments: dict[str, dict[str, Any]] = {}
        self._add("0b5e11c2-6d1f-4a8e-9c3d-2f7a8b9c0d1e", name="llama-finetune", hw=206,
                  gpus=8, hours=2, status="completed", config={})  # fmt: skip

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        caas = "/enterprise/v1/io-cloud/caas"
        app.router.add_get(f"{caas}/hardware/max-gpus-per-container", self.hardware)
        app.router.add_get(f"{caas}/available-replicas", self.available)
        app.router.add_get(f"{caas}/price", self.price)
        app.router.add_post(f"{caas}/deploy", self.deploy)
        app.router.add_get(f"{caas}/deployments", self.list_deployments)
        app.router.add_get(f"{caas}/deployment/{{id}}", self.details)
        app.router.add_get(f"{caas}/deployment/{{id}}/containers", self.containers)
        app.router.add_delete(f"{caas}/deployment/{{id}}", self.destroy)
        return app

    @web.middleware
    async def _auth(self, r: web.Request, handler: Any) -> web.StreamResponse:
        if r.headers.get("x-api-key") != KEY:
            raise _refused(web.HTTPUnauthorized, "Invalid or expired API key")
        resp: web.StreamResponse = await handler(r)
        return resp

    def _add(self, dep_id: str, *, name: str, hw: int, gpus: int, hours: int, status: str,
             config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        dep = {"id": dep_id, "name": name, "hw": hw, "gpus": gpus, "hours": hours,
               "status": status, "config": config, "seen": 0,
               "paid": quote(hw, gpus, hours)["total_cost_usdc"]}  # fmt: skip
        self.deployments[dep_id] = dep
        return dep

    # ---- routes ------------------------------------------------------------------------------

    async def hardware(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "hardware", None))
        if self.rate_limit_once:
            self.rate_limit_once = False
            return web.json_response(
                {"detail": "Rate limit exceeded"}, status=429, headers={"Retry-After": "0"}
            )
        return web.json_response({"data": {"hardware": HARDWARE, "total": len(HARDWARE)}})

    async def available(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "available-replicas", dict(r.query)))
        key = (int(r.query["hardware_id"]), int(r.query["hardware_qty"]))
        places = [{**loc, "available_replicas": n} for loc, n in FREE.get(key, [])]
        return web.json_response({"data": places})

    async def price(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "price", dict(r.query)))
        q = r.query
        required = ("location_ids", "hardware_id", "currency", "duration_hours",
                    "gpus_per_container", "replica_count")  # fmt: skip
        for field in required:
            if field not in q:
                raise _invalid(["query", field], "Field required", "missing")
        hw, gpus, hours = (
            int(q["hardware_id"]),
            int(q["gpus_per_container"]),
            int(q["duration_hours"]),
        )
        most = next(
            (h["max_gpus_per_container"] for h in HARDWARE if h.get("hardware_id") == hw), 0
        )
        if gpus > most:
            msg = f"Input should be less than or equal to {most}"
            raise _invalid(["query", "gpus_per_container"], msg, "less_than_equal")
        if not isinstance(json.loads(q["location_ids"]), list):
            msg = "Value error, expected a JSON array"
            raise _invalid(["query", "location_ids"], msg, "value_error")
        return web.json_response({"data": quote(hw, gpus, hours)})

    async def deploy(self, r: web.Request) -> web.Response:
        body = await r.json()
        self.calls.append(("POST", "deploy", body))
        for field in (
            "resource_private_name",
            "duration_hours",
            "gpus_per_container",
            "hardware_id",
        ):
            if field not in body:
                raise _invalid(["body", field], "Field required", "missing")
        hw, gpus, hours = (
            int(body["hardware_id"]),
            int(body["gpus_per_container"]),
            int(body["duration_hours"]),
        )
        loc = body["location_ids"][0]
        if f"{hw}:{gpus}:{loc}" == SOLD_OUT:
            raise _refused(
                web.HTTPBadRequest,
                f"Not enough available replicas for hardware {hw} in location {loc}: "
                "requested 1, available 0",
            )
        cost = quote(hw, gpus, hours)["total_cost_usdc"]
        if cost > self.balance_usdc:
            raise _refused(
                web.HTTPBadRequest,
                f"Insufficient balance: {cost:.2f} USDC needed, {self.balance_usdc:.2f} available",
            )
        dep_id = f"3fa85f64-5717-4562-b3fc-{len(self.deployments):012x}"
        config = {**body["container_config"], "image_url": body["registry_config"]["image_url"],
                  "secret_env_keys": []}  # fmt: skip
        self._add(dep_id, name=body["resource_private_name"], hw=hw, gpus=gpus, hours=hours,
                  status="deploying", config=config)  # fmt: skip
        return web.json_response({"status": "DEPLOYMENT REQUESTED", "deployment_id": dep_id})

    def _summary(self, dep: dict[str, Any]) -> dict[str, Any]:
        name = next(h["hardware_name"] for h in HARDWARE if h.get("hardware_id") == dep["hw"])
        served = 1 if dep["status"] == "running" else 0
        return {"id": dep["id"], "status": dep["status"], "name": dep["name"],
                "completed_percent": round(100 * served / (dep["hours"] * 60), 2),
                "hardware_quantity": dep["gpus"], "brand_name": "NVIDIA", "hardware_name": name,
                "compute_minutes_served": served,
                "compute_minutes_remaining": dep["hours"] * 60 - served,
                "created_at": "2026-11-02T09:14:07"}  # fmt: skip

    async def list_deployments(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "deployments", dict(r.query)))
        page, size = int(r.query.get("page", 1)), min(100, int(r.query.get("page_size", 20)))
        deps = list(self.deployments.values())
        chunk = [self._summary(d) for d in deps[(page - 1) * size : page * size]]
        return web.json_response(
            {"data": {"deployments": chunk, "total": len(deps),
                      "statuses": sorted({d["status"] for d in deps})}}
        )  # fmt: skip

    def _get(self, r: web.Request) -> dict[str, Any]:
        dep = self.deployments.get(r.match_info["id"])
        if dep is None:
            raise _refused(web.HTTPNotFound, "Deployment not found")
        return dep

    async def details(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "deployment", r.match_info["id"]))
        dep = self._get(r)
        dep["seen"] += 1
        if dep["status"] == "deploying" and dep["seen"] > 1:
            dep["status"] = "running"
        data = {
            **self._summary(dep), "started_at": "2026-11-02T09:15:31Z", "finished_at": None,
            "amount_paid": dep["paid"], "total_gpus": dep["gpus"],
            "gpus_per_container": dep["gpus"], "total_containers": 1, "hardware_id": dep["hw"],
            "locations": [US], "container_config": dep["config"],
        }  # fmt: skip
        for k in ("name", "hardware_quantity"):
            data.pop(k)
        return web.json_response({"data": data})

    async def containers(self, r: web.Request) -> web.Response:
        self.calls.append(("GET", "containers", r.match_info["id"]))
        dep = self._get(r)
        events = [{"time": "2026-11-02T09:15:40Z", "message": "Pulling image"}]
        status = "running"
        if self.stuck:
            status = "creating"
            events.append({"time": "2026-11-02T09:19:02Z", "message": "Back-off pulling image"})
        else:
            events.append({"time": "2026-11-02T09:17:12Z", "message": "Started container"})
        worker = {
            "container_id": f"c-{dep['id'][-6:]}",
            "device_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
            "status": status, "hardware": "H100 80GB HBM3", "brand_name": "NVIDIA",
            "created_at": "2026-11-02T09:15:31Z",
            "uptime_percent": 100 if status == "running" else 0,
            "gpus_per_container": dep["gpus"], "container_events": events,
            "public_url": f"https://{dep['id'][:8]}.headless.io.systems",
        }  # fmt: skip
        return web.json_response({"data": {"total": 1, "workers": [worker]}})

    async def destroy(self, r: web.Request) -> web.Response:
        self.calls.append(("DELETE", "deployment", r.match_info["id"]))
        dep = self._get(r)
        dep["status"] = "destroyed"
        return web.json_response({"status": "TERMINATION REQUESTED", "deployment_id": dep["id"]})


def provider(url: str, key: str = KEY) -> IoNetProvider:
    return IoNetProvider(key, url=url)
