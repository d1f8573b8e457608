"""RunPod: a thin client of its public GraphQL API (https://docs.runpod.io/sdks/graphql).

    POST /graphql  {"query": ..., "variables": ...}
      gpuTypes { ... lowestPrice(input: {gpuCount, secureCloud}) { ... } }   offers
      podFindAndDeployOnDemand(input) / podRentInterruptable(input)           launch
      pod(input: {podId}) / myself { pods }                                   status, list
      podTerminate(input: {podId})                                            terminate

Authentication: RunPod's examples put the key in the URL (``?api_key=``); it also takes an
``Authorization: Bearer`` header, which is what this client sends, so the key is in no URL, log
line or error message. A failed GraphQL call answers HTTP 200 with an ``errors`` list: it is a
``ProviderError`` here ("the API key was refused" when unauthenticated), and RunPod's "There are
no longer any instances available with the requested specifications" is ``OutOfStock``.

Offers: one per (GPU type, cloud, count, billing), asked for in one query (an aliased
``lowestPrice`` per cloud and count in ``COUNTS``). ``offer_id`` is
``<gpuTypeId>|<SECURE|COMMUNITY>|<count>|<on_demand|spot>``, which is what the launch sends.
SECURE cloud is the secure tier, COMMUNITY the community tier. The per-GPU price is
``lowestPrice`` for that count and cloud (``uninterruptablePrice``; for spot, the interruptible
``minimumBidPrice``, which the launch bids), else the type's list price (``securePrice``,
``communitySpotPrice``, ...); the machine's price is that times the count. ``stockStatus`` null
is stock "none". RunPod places a pod wherever that cloud has the GPU, so offers name no region.

A pod runs ``onstart_script`` as its container command (``dockerArgs``), then sleeps so that the
container stays up. ``desiredStatus`` RUNNING with ``runtime`` null is a pod still starting.
"""

from __future__ import annotations

import shlex
import time
from typing import Any, Literal

from cotrain.market.http import JsonApi, message_of
from cotrain.market.offers import Billing, Offer, OfferQuery, Tier, canonical_gpu, matches
from cotrain.market.provider import (
    Cap,
    Instance,
    LaunchSpec,
    OutOfStock,
    ProviderError,
    State,
    onstart_script,
)

URL = "https://api.runpod.io"
COUNTS = (1, 2, 4, 8)
CLOUDS = ("SECURE", "COMMUNITY")

_STATES: dict[str, State] = {
    "CREATED": "starting",
    "RESTARTING": "starting",
    "RUNNING": "running",
    "EXITED": "exited",
    "PAUSED": "exited",
    "DEAD": "failed",
    "TERMINATED": "terminated",
}
Stock = Literal["available", "low", "none", "unknown"]
_STOCK: dict[str, Stock] = {"High": "available", "Medium": "available", "Low": "low"}
_SOLD_OUT = ("no longer any instances available", "no instances available")
_REFUSED = ("unauthorized", "unauthenticated", "api key")

_TYPE_FIELDS = (
    "id displayName memoryInGb secureCloud communityCloud securePrice communityPrice "
    "secureSpotPrice communitySpotPrice maxGpuCount"
)
_LOWEST_FIELDS = "minimumBidPrice uninterruptablePrice stockStatus minVcpu minMemory"
_POD_FIELDS = (
    "id name desiredStatus costPerHr gpuCount imageName machineId "
    "runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } } "
    "machine { podHostId gpuDisplayName }"
)
_DEPLOY = {
    "on_demand": (
        "podFindAndDeployOnDemand",
        "mutation Deploy($input: PodFindAndDeployOnDemandInput!) { "
        "podFindAndDeployOnDemand(input: $input) { "
        "id desiredStatus imageName machineId costPerHr } }",
    ),
    "spot": (
        "podRentInterruptable",
        "mutation DeploySpot($input: PodRentInterruptableInput!) { "
        "podRentInterruptable(input: $input) { id desiredStatus imageName machineId costPerHr } }",
    ),
}
_POD = f"query Pod($podId: String!) {{ pod(input: {{podId: $podId}}) {{ {_POD_FIELDS} }} }}"
_PODS = f"query Pods {{ myself {{ pods {{ {_POD_FIELDS} }} }} }}"
_TERMINATE = "mutation Terminate($podId: String!) { podTerminate(input: {podId: $podId}) }"


def _alias(cloud: str, n: int) -> str:
    return f"{cloud.lower()}{n}"


def offers_query(counts: tuple[int, ...] = COUNTS) -> tuple[str, dict[str, Any]]:
    """The one query for every offer: each GPU type with a ``lowestPrice`` per (cloud, count),
    aliased ``secure8``, ``community1``, ... (each alias is also its input variable)."""
    keys = [(_alias(c, n), c, n) for n in counts for c in CLOUDS]
    decl = ", ".join(f"${a}: GpuLowestPriceInput" for a, _, _ in keys)
    sel = " ".join(f"{a}: lowestPrice(input: ${a}) {{ {_LOWEST_FIELDS} }}" for a, _, _ in keys)
    query = f"query GpuTypes({decl}) {{ gpuTypes {{ {_TYPE_FIELDS} {sel} }} }}"
    return query, {a: {"gpuCount": n, "secureCloud": c == "SECURE"} for a, c, n in keys}


def _positive(v: Any) -> float | None:
    return float(v) if v is not None and float(v) > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def parse_offer_id(offer_id: str) -> tuple[str, str, int, Billing]:
    """``(gpuTypeId, cloud, count, billing)`` of a RunPod offer id."""
    try:
        gpu, cloud, n, billing = offer_id.rsplit("|", 3)
        count = int(n)
    except ValueError:
        raise ProviderError(f"runpod: {offer_id!r} is not a RunPod offer id") from None
    if cloud not in CLOUDS or count < 1 or billing not in ("on_demand", "spot"):
        raise ProviderError(f"runpod: {offer_id!r} is not a RunPod offer id")
    return gpu, cloud, count, "spot" if billing == "spot" else "on_demand"


class RunPodProvider:
    name = "runpod"
    caps = frozenset({Cap.SPOT, Cap.BID, Cap.DOCKER_IMAGE, Cap.OPEN_PORTS, Cap.STOP})

    def __init__(
        self,
        api_key: str,
        *,
        url: str = URL,
        image: str = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
        disk_gb: int = 40,
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
            on_error=self._on_error,
        )
        self.image = image
        self.disk_gb = disk_gb

    def __repr__(self) -> str:  # never the key
        return f"RunPodProvider(url={self.api.url!r})"

    def _on_error(self, status: int, body: Any, method: str, path: str) -> None:
        # A GraphQL error in a non-200 answer (some gateways answer 400): sold out is still that.
        msg = _one_line(self.api.scrub(message_of(body)))
        if any(s in msg.lower() for s in _SOLD_OUT):
            raise OutOfStock(f"runpod: {msg}")

    async def _gql(self, query: str, variables: dict[str, Any], what: str = "") -> dict[str, Any]:
        """The ``data`` of a GraphQL call; its ``errors`` (HTTP 200) raised as ``ProviderError``."""
        body = await self.api.call(
            "POST", "/graphql", json={"query": query, "variables": variables}
        )
        if not isinstance(body, dict):
            raise ProviderError(f"runpod: {what}an answer that is not a GraphQL response")
        errors = body.get("errors")
        if errors:
            msg = _one_line(self.api.scrub(message_of(body))) or "an unnamed error"
            first = errors[0] if isinstance(errors, list) and errors else {}
            ext = first.get("extensions") if isinstance(first, dict) else None
            code = str(ext.get("code") or "") if isinstance(ext, dict) else ""
            if code == "UNAUTHENTICATED" or any(w in msg.lower() for w in _REFUSED):
                raise ProviderError(f"runpod: the API key was refused: {msg}")
            if any(s in msg.lower() for s in _SOLD_OUT):
                raise OutOfStock(f"runpod: {what}{msg}")
            raise ProviderError(f"runpod: {what}{msg}")
        data = body.get("data")
        if not isinstance(data, dict):
            raise ProviderError(f"runpod: {what}an answer without data")
        return data

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        query, variables = offers_query()
        data = await self._gql(query, variables)
        now = time.time()
        out = []
        for t in data.get("gpuTypes") or []:
            try:
                made = [o for c in CLOUDS for n in COUNTS for o in self._offers_of(t, c, n, now)]
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a malformed GPU type is skipped, not fatal
            out += [o for o in made if matches(o, q)]
        return out

    def _offers_of(self, t: dict[str, Any], cloud: str, n: int, now: float) -> list[Offer]:
        gpu_id = str(t["id"])
        mem = float(t["memoryInGb"])
        tier: Tier = "secure" if cloud == "SECURE" else "community"
        if not t.get(f"{tier}Cloud") or n > int(t.get("maxGpuCount") or 0):
            return []
        lowest = t.get(_alias(cloud, n)) or {}
        listed, listed_spot = t.get(f"{tier}Price"), t.get(f"{tier}SpotPrice")
        prices: dict[Billing, float | None] = {
            "on_demand": _positive(lowest.get("uninterruptablePrice")) or _positive(listed),
            "spot": _positive(lowest.get("minimumBidPrice")) or _positive(listed_spot),
        }
        status = lowest.get("stockStatus")
        stock: Stock = _STOCK.get(str(status), "unknown") if status else "none"
        out = []
        for billing, per_gpu in prices.items():
            if per_gpu is None:
                continue
            out.append(
                Offer(
                    provider=self.name,
                    offer_id=f"{gpu_id}|{cloud}|{n}|{billing}",
                    gpu=canonical_gpu(gpu_id, mem),
                    gpu_count=n,
                    gpu_mem_gb=mem,
                    vcpus=int(lowest["minVcpu"]) if lowest.get("minVcpu") else None,
                    ram_gb=float(lowest["minMemory"]) if lowest.get("minMemory") else None,
                    disk_gb=float(self.disk_gb),
                    tier=tier,
                    billing=billing,
                    usd_per_hour=round(per_gpu * n, 6),
                    usd_per_gpu_hour=per_gpu,
                    stock=stock,
                    fetched_at=now,
                )
            )
        return out

    # ---- instances ---------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        gpu, cloud, count, billing = parse_offer_id(offer.offer_id)
        # dockerArgs replaces the container's command: run the node, then stay up.
        command = shlex.join(["bash", "-c", f"{onstart_script(spec)} sleep infinity"])
        inp: dict[str, Any] = {
            "cloudType": cloud,
            "gpuCount": count,
            "gpuTypeId": gpu,
            "name": f"cotrain:{spec.task}",
            "imageName": self.image,
            "dockerArgs": command,
            "volumeInGb": 0,
            "containerDiskInGb": self.disk_gb,
            "env": [
                {"key": "COTRAIN_TASK", "value": spec.task},
                {"key": "COTRAIN_COORDINATOR", "value": spec.coordinator},
            ],
        }
        if billing == "spot":
            inp["bidPerGpu"] = offer.usd_per_gpu_hour
        field, mutation = _DEPLOY[billing]
        what = f"offer {offer.offer_id}: "
        try:
            data = await self._gql(mutation, {"input": inp}, what=what)
        except OutOfStock as e:  # the offer named, whichever way the answer said it
            if offer.offer_id in str(e):
                raise
            raise OutOfStock(f"runpod: {what}{str(e).removeprefix('runpod: ')}") from None
        pod = data.get(field)
        if not isinstance(pod, dict) or not pod.get("id"):
            raise OutOfStock(
                f"runpod: offer {offer.offer_id} was not rented (no pod in the answer)"
            )
        return Instance(
            provider=self.name,
            instance_id=str(pod["id"]),
            offer_id=offer.offer_id,
            state=self._state(pod),
            usd_per_hour=float(pod.get("costPerHr") or offer.usd_per_hour),
            started_at=time.time(),
            task=spec.task,
        )

    @staticmethod
    def _state(pod: dict[str, Any]) -> State:
        state = _STATES.get(str(pod.get("desiredStatus") or ""), "unknown")
        return "starting" if state == "running" and not pod.get("runtime") else state

    def _instance(self, pod: dict[str, Any]) -> Instance:
        status = str(pod.get("desiredStatus") or "unknown")
        runtime = pod.get("runtime") or {}
        ports = runtime.get("ports") or []
        host = next((str(p["ip"]) for p in ports if p.get("isIpPublic") and p.get("ip")), None)
        uptime = float(runtime.get("uptimeInSeconds") or 0)
        name = str(pod.get("name") or "")
        state = self._state(pod)
        return Instance(
            provider=self.name,
            instance_id=str(pod["id"]),
            offer_id="",
            state=state,
            usd_per_hour=float(pod.get("costPerHr") or 0),
            started_at=time.time() - uptime if uptime else 0.0,
            host=host,
            detail=f"{status}, container not up yet" if state == "starting" else status,
            task=name.removeprefix("cotrain:") if name.startswith("cotrain:") else None,
        )

    async def status(self, instance_id: str) -> Instance:
        data = await self._gql(_POD, {"podId": instance_id})
        pod = data.get("pod")
        if not isinstance(pod, dict) or not pod.get("id"):
            raise ProviderError(f"runpod: no pod {instance_id}")
        return self._instance(pod)

    async def instances(self) -> list[Instance]:
        data = await self._gql(_PODS, {})
        pods = (data.get("myself") or {}).get("pods") or []
        return [self._instance(p) for p in pods if isinstance(p, dict) and p.get("id")]

    async def terminate(self, instance_id: str) -> None:
        await self._gql(_TERMINATE, {"podId": instance_id}, what=f"pod {instance_id}: ")
