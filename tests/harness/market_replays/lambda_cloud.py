"""Lambda Cloud's REST API (``/api/v1``) as its OpenAPI documentation describes it, replayed on
loopback: ``{"data": ...}`` answers, ``{"error": {"code", "message", "suggestion"}}`` errors, and
the launch rate limit (``rate_limit_launches``: how many launches answer 429 first)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cotrain.market.lambda_cloud import LambdaProvider

NAME = "lambda"
KEY = "secret_cotrain-ci_4b1e7d0c9a2f4e8b.Xq2vR8sT0uW3yZ5a"
SOLD_OUT = "gpu_1x_a10@us-west-1"

REGIONS = {
    "us-east-1": "Virginia, USA",
    "us-west-1": "California, USA",
    "us-west-3": "Utah, USA",
    "europe-central-1": "Frankfurt, Germany",
}


def _type(name: str, desc: str, gpu: str, cents: int, specs: tuple[int, int, int, int]) -> Any:
    vcpus, mem, disk, gpus = specs
    return {
        "name": name, "description": desc, "gpu_description": gpu,
        "price_cents_per_hour": cents,
        "specs": {"vcpus": vcpus, "memory_gib": mem, "storage_gib": disk, "gpus": gpus},
    }  # fmt: skip


def _regions(*names: str) -> list[dict[str, str]]:
    return [{"name": n, "description": REGIONS[n]} for n in names]


INSTANCE_TYPES = {
    "data": {
        "gpu_8x_h100_sxm5": {
            "instance_type": _type("gpu_8x_h100_sxm5", "8x H100 (80 GB SXM5)",
                                   "H100 (80 GB SXM5)", 2392, (208, 1800, 22000, 8)),
            "regions_with_capacity_available": _regions("us-east-1", "europe-central-1"),
        },
        "gpu_1x_a10": {
            "instance_type": _type("gpu_1x_a10", "1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)",
                                   75, (30, 200, 1400, 1)),
            "regions_with_capacity_available": _regions("us-west-1"),
        },
        "gpu_1x_a100_sxm4": {  # no capacity anywhere
            "instance_type": _type("gpu_1x_a100_sxm4", "1x A100 (40 GB SXM4)",
                                   "A100 (40 GB SXM4)", 129, (30, 200, 512, 1)),
            "regions_with_capacity_available": [],
        },
        "gpu_1x_gh200": {  # no capacity anywhere
            "instance_type": _type("gpu_1x_gh200", "1x GH200 (96 GB)", "GH200 (96 GB)",
                                   149, (64, 432, 4096, 1)),
            "regions_with_capacity_available": [],
        },
        "gpu_2x_broken": {"instance_type": {"name": "gpu_2x_broken"}},  # malformed: skipped
    }
}  # fmt: skip

SSH_KEYS = {
    "data": [
        {
            "id": "0920582c7ff041399e34823a0be62548",
            "name": "cotrain-ci",
            "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk4 ci@cotrain",
        }
    ]
}


def _error(status: int, code: str, message: str, suggestion: str | None = None,
           **headers: str) -> web.Response:  # fmt: skip
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if suggestion:
        body["error"]["suggestion"] = suggestion
    return web.json_response(body, status=status, headers=headers or None)


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.seen: dict[str, int] = {}
        self.rate_limit_once = True
        self.rate_limit_launches = 0
        self.launch_retry_after: str | None = "0"
        self.stuck = False
        self.instances: dict[str, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/instance-types", self.instance_types)
        app.router.add_get("/api/v1/ssh-keys", self.ssh_keys)
        app.router.add_post("/api/v1/instance-operations/launch", self.launch)
        app.router.add_get("/api/v1/instances", self.list_instances)
        app.router.add_get("/api/v1/instances/{id}", self.instance)
        app.router.add_post("/api/v1/instance-operations/terminate", self.terminate)
        return app

    def _auth(self, r: web.Request) -> None:
        if r.headers.get("Authorization") != f"Bearer {KEY}":
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": {
                    "code": "global/invalid-api-key",
                    "message": "API key was invalid, expired, or deleted.",
                    "suggestion": "Check your API key or create a new one, then try again.",
                }}),
                content_type="application/json",
            )  # fmt: skip

    async def instance_types(self, r: web.Request) -> web.Response:
        self._auth(r)
        self.calls.append(("GET", "instance-types", dict(r.query)))
        if self.rate_limit_once:
            self.rate_limit_once = False
            return _error(429, "global/too-many-requests", "Too many requests.",
                          "Wait, then try again.", **{"Retry-After": "0"})  # fmt: skip
        return web.json_response(INSTANCE_TYPES)

    async def ssh_keys(self, r: web.Request) -> web.Response:
        self._auth(r)
        self.calls.append(("GET", "ssh-keys", None))
        return web.json_response(SSH_KEYS)

    async def launch(self, r: web.Request) -> web.Response:
        self._auth(r)
        body = await r.json()
        self.calls.append(("POST", "launch", body))
        if self.rate_limit_launches > 0:
            self.rate_limit_launches -= 1
            headers = {"Retry-After": self.launch_retry_after} if self.launch_retry_after else {}
            return _error(
                429, "global/too-many-requests",
                "Too many requests: at most one launch per 12 seconds.", **headers,
            )  # fmt: skip
        names = [k["name"] for k in SSH_KEYS["data"]]
        if len(body.get("ssh_key_names") or []) != 1 or body["ssh_key_names"][0] not in names:
            return web.json_response({
                "error": {"code": "global/invalid-parameters", "message": "Invalid request data."},
                "field_errors": {"ssh_key_names": {
                    "code": "global/invalid-parameters",
                    "message": "Exactly one existing SSH key name must be given."}},
            }, status=400)  # fmt: skip
        entry = INSTANCE_TYPES["data"].get(body.get("instance_type_name"))
        region = body.get("region_name")
        if entry is None or region not in REGIONS:
            return _error(404, "global/object-does-not-exist",
                          "Specified instance type or region does not exist.")  # fmt: skip
        available = [x["name"] for x in entry["regions_with_capacity_available"]]
        if region not in available or f"{body['instance_type_name']}@{region}" == SOLD_OUT:
            return _error(400, "instance-operations/launch/insufficient-capacity",
                          "Not enough capacity to fulfill launch request.",
                          "Choose an instance type with more availability, or try again "
                          "later.")  # fmt: skip
        iid = f"{len(self.instances):08x}c7ff041399e34823a0be6254"
        self.instances[iid] = {
            "id": iid, "name": body.get("name"), "ip": None, "private_ip": None,
            "status": "booting", "ssh_key_names": body["ssh_key_names"],
            "file_system_names": [], "region": {"name": region, "description": REGIONS[region]},
            "instance_type": entry["instance_type"], "hostname": None, "jupyter_token": None,
            "jupyter_url": None, "is_reserved": False,
        }  # fmt: skip
        return web.json_response({"data": {"instance_ids": [iid]}})

    async def list_instances(self, r: web.Request) -> web.Response:
        self._auth(r)
        return web.json_response({"data": list(self.instances.values())})

    async def instance(self, r: web.Request) -> web.Response:
        self._auth(r)
        inst = self.instances.get(r.match_info["id"])
        if inst is None:
            return _error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        if not self.stuck and inst["status"] == "booting":
            self.seen[inst["id"]] = self.seen.get(inst["id"], 0) + 1
            if self.seen[inst["id"]] > 1:
                inst.update(
                    status="active", ip="192.0.2.41", private_ip="10.19.60.24",
                    hostname="192-0-2-41.cloud.lambdalabs.com",
                )  # fmt: skip
        return web.json_response({"data": inst})

    async def terminate(self, r: web.Request) -> web.Response:
        self._auth(r)
        body = await r.json()
        self.calls.append(("POST", "terminate", body))
        gone = []
        for iid in body.get("instance_ids") or []:
            if iid not in self.instances:
                return _error(404, "global/object-does-not-exist",
                              "Specified instance does not exist.")  # fmt: skip
            self.instances[iid]["status"] = "terminating"
            gone.append(self.instances[iid])
        return web.json_response({"data": {"terminated_instances": gone}})


def provider(url: str, key: str = KEY) -> LambdaProvider:
    return LambdaProvider(key, url=url)
