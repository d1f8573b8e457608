"""RunPod's GraphQL API (``POST /graphql``) as its documentation describes it, replayed on
loopback: ``gpuTypes`` with ``lowestPrice`` per count and cloud, ``podFindAndDeployOnDemand``,
``podRentInterruptable``, ``pod``, ``myself { pods }`` and ``podTerminate``. Failures are
GraphQL's own shape, an ``errors`` list in an HTTP 200 answer (a wrong key, a sold-out offer);
a query it does not serve is a 400 with ``errors``, as a GraphQL server answers one it cannot
validate. Nothing here paginates (RunPod's lists do not). The replay does not parse GraphQL: it
answers by the top-level field a document asks for, and for ``gpuTypes`` one ``lowestPrice``
per input variable (the adapter's aliases are its variables' names)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cotrain.market.runpod import RunPodProvider

NAME = "runpod"
KEY = "rpa_K7Q2ZC0FFEE1D2B3A4M9X5secret"
SOLD_OUT = "NVIDIA GeForce RTX 4090|COMMUNITY|2|on_demand"

SOLD_OUT_MESSAGE = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)

GPU_TYPES: list[dict[str, Any]] = [
    {
        "id": "NVIDIA H100 80GB HBM3", "displayName": "H100 SXM", "memoryInGb": 80,
        "secureCloud": True, "communityCloud": True, "securePrice": 2.99,
        "communityPrice": 2.69, "secureSpotPrice": 1.75, "communitySpotPrice": 1.55,
        "maxGpuCount": 8,
    },
    {
        "id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24,
        "secureCloud": True, "communityCloud": True, "securePrice": 0.69,
        "communityPrice": 0.34, "secureSpotPrice": 0.35, "communitySpotPrice": 0.2,
        "maxGpuCount": 8,
    },
    {  # secure cloud only, no spot price listed
        "id": "NVIDIA A100 80GB PCIe", "displayName": "A100 PCIe", "memoryInGb": 80,
        "secureCloud": True, "communityCloud": False, "securePrice": 1.64,
        "communityPrice": None, "secureSpotPrice": None, "communitySpotPrice": None,
        "maxGpuCount": 4,
    },
    {"id": "AMD Instinct MI300X OAM", "displayName": "MI300X", "memoryInGb": None},  # malformed
]  # fmt: skip

# (gpu type, cloud, count) -> (stockStatus, uninterruptablePrice, minimumBidPrice,
# minVcpu, minMemory) of the cheapest machine; absent: RunPod has none (stockStatus null).
LOWEST: dict[tuple[str, str, int], tuple[str, float, float | None, int, int]] = {
    ("NVIDIA H100 80GB HBM3", "SECURE", 1): ("High", 2.99, 1.75, 20, 125),
    ("NVIDIA H100 80GB HBM3", "SECURE", 2): ("High", 2.99, 1.75, 40, 250),
    ("NVIDIA H100 80GB HBM3", "SECURE", 4): ("Medium", 2.99, 1.75, 80, 500),
    ("NVIDIA H100 80GB HBM3", "SECURE", 8): ("Low", 2.99, 1.75, 160, 1000),
    ("NVIDIA H100 80GB HBM3", "COMMUNITY", 1): ("Low", 2.69, 1.55, 16, 100),
    ("NVIDIA GeForce RTX 4090", "SECURE", 1): ("High", 0.69, 0.35, 6, 41),
    ("NVIDIA GeForce RTX 4090", "SECURE", 2): ("Medium", 0.69, 0.35, 12, 83),
    ("NVIDIA GeForce RTX 4090", "COMMUNITY", 1): ("High", 0.31, 0.18, 8, 31),
    ("NVIDIA GeForce RTX 4090", "COMMUNITY", 2): ("Low", 0.34, 0.2, 16, 62),
    ("NVIDIA A100 80GB PCIe", "SECURE", 1): ("High", 1.64, None, 8, 117),
    ("NVIDIA A100 80GB PCIe", "SECURE", 2): ("Low", 1.64, None, 16, 234),
}


def _gql_error(message: str, code: str | None = None, status: int = 200) -> web.Response:
    err: dict[str, Any] = {"message": message, "locations": [{"line": 1, "column": 1}]}
    if code:
        err["extensions"] = {"code": code}
    return web.json_response({"data": None, "errors": [err]}, status=status)


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.urls: list[str] = []
        self.rate_limit_once = True
        self.stuck = False
        self.pods: dict[str, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/graphql", self.graphql)
        return app

    async def graphql(self, r: web.Request) -> web.Response:
        self.urls.append(str(r.rel_url))
        body = await r.json()
        query, variables = str(body.get("query") or ""), dict(body.get("variables") or {})
        field = next(
            (f for f in ("gpuTypes", "podFindAndDeployOnDemand", "podRentInterruptable",
                         "podTerminate", "myself", "pod") if f + "(" in query or f + " " in query),
            "",
        )  # fmt: skip
        self.calls.append(("POST", field, variables))
        if r.headers.get("Authorization") != f"Bearer {KEY}" and r.query.get("api_key") != KEY:
            return _gql_error("Unauthorized: invalid API key", "UNAUTHENTICATED")
        if field == "gpuTypes":
            return self.gpu_types(variables)
        if field in ("podFindAndDeployOnDemand", "podRentInterruptable"):
            return self.deploy(field, variables.get("input") or {})
        if field == "pod":
            return self.pod(str(variables.get("podId")))
        if field == "myself":
            pods = [self._view(p) for p in self.pods.values()]
            return web.json_response({"data": {"myself": {"pods": pods}}})
        if field == "podTerminate":
            self.pods.pop(str(variables.get("podId")), None)
            return web.json_response({"data": {"podTerminate": None}})
        return _gql_error(f"Cannot query field in {query[:40]!r}", "GRAPHQL_VALIDATION_FAILED", 400)

    def gpu_types(self, variables: dict[str, Any]) -> web.Response:
        if self.rate_limit_once:  # RunPod's rate limit, once
            self.rate_limit_once = False
            return web.json_response(
                {"errors": [{"message": "Too many requests, please slow down"}]},
                status=429,
                headers={"Retry-After": "0"},
            )
        out = []
        for t in GPU_TYPES:
            t = dict(t)
            for alias, inp in variables.items():  # one aliased lowestPrice per input variable
                cloud = "SECURE" if inp.get("secureCloud") else "COMMUNITY"
                got = LOWEST.get((t["id"], cloud, int(inp["gpuCount"])))
                stock, price, bid, vcpu, mem = got or (None, None, None, None, None)
                t[alias] = {
                    "minimumBidPrice": bid, "uninterruptablePrice": price,
                    "stockStatus": stock, "minVcpu": vcpu, "minMemory": mem,
                }  # fmt: skip
            out.append(t)
        return web.json_response({"data": {"gpuTypes": out}})

    def deploy(self, field: str, inp: dict[str, Any]) -> web.Response:
        need = ["gpuTypeId", "cloudType", "gpuCount", "imageName", "name"]
        need += ["bidPerGpu"] if field == "podRentInterruptable" else []
        missing = [k for k in need if inp.get(k) in (None, "")]
        if missing:
            return _gql_error(f"Field {missing[0]!r} of required type was not provided.",
                              "BAD_USER_INPUT", 400)  # fmt: skip
        billing = "spot" if field == "podRentInterruptable" else "on_demand"
        wanted = f"{inp['gpuTypeId']}|{inp['cloudType']}|{inp['gpuCount']}|{billing}"
        got = LOWEST.get((inp["gpuTypeId"], inp["cloudType"], int(inp["gpuCount"])))
        if wanted == SOLD_OUT or got is None:
            return web.json_response(
                {"data": {field: None}, "errors": [{"message": SOLD_OUT_MESSAGE, "path": [field]}]}
            )
        per_gpu = float(inp["bidPerGpu"]) if billing == "spot" else got[1]
        pid = f"bq8sx1d4m{len(self.pods):05d}"
        self.pods[pid] = {
            "id": pid, "name": inp["name"], "desiredStatus": "RUNNING",
            "imageName": inp["imageName"], "machineId": "p0c2x7hz3k1m",
            "costPerHr": round(per_gpu * int(inp["gpuCount"]), 3),
            "gpuCount": int(inp["gpuCount"]), "dockerArgs": inp.get("dockerArgs", ""),
            "runtime": None,
            "machine": {"podHostId": f"{pid}-64410f2e", "gpuDisplayName": inp["gpuTypeId"]},
        }  # fmt: skip
        return web.json_response({"data": {field: self._view(self.pods[pid])}})

    def pod(self, pid: str) -> web.Response:
        pod = self.pods.get(pid)
        if pod is None:
            return web.json_response({"data": {"pod": None}})
        pod["seen"] = pod.get("seen", 0) + 1
        if pod["seen"] > 1 and not self.stuck:  # the container is up from the second look on
            pod["runtime"] = {
                "uptimeInSeconds": 42,
                "ports": [
                    {"ip": "10.65.0.2", "isIpPublic": False, "privatePort": 22,
                     "publicPort": 22, "type": "tcp"},
                    {"ip": "203.0.113.24", "isIpPublic": True, "privatePort": 22,
                     "publicPort": 40022, "type": "tcp"},
                ],
            }  # fmt: skip
        return web.json_response({"data": {"pod": self._view(pod)}})

    @staticmethod
    def _view(pod: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in pod.items() if k != "seen"}


def provider(url: str, key: str = KEY) -> RunPodProvider:
    return RunPodProvider(key, url=url)
