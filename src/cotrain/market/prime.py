"""Prime Intellect: a thin client of its public REST API (https://docs.primeintellect.ai).

    GET    /api/v1/availability/gpus?page=&page_size=   offers: {"items": [...], "totalCount": n}
    POST   /api/v1/pods                                 rent one: {"pod": {...}, "provider": {...}}
    GET    /api/v1/pods?offset=&limit=                  ours: {"data": [...], "total_count": n}
    GET    /api/v1/pods/{id}                            one pod
    DELETE /api/v1/pods/{id}                            terminate it

Prime is an aggregator: each offer is an upstream provider's (``runpod``, ``hyperstack``, its
own ``primecompute``, ...) machine in one of its data centers, and launching it takes the
upstream ``cloudId`` with the GPU type, socket, count, provider, data center and security tier.
An offer's ``offer_id`` carries all of them, so it alone names what to launch::

    cloudId:gpuType:socket:gpuCount:provider:dataCenter:security   (":" and "%" %-escaped)

The upstream provider and data center are kept in ``datacenter`` (``hyperstack/CANADA-1``),
the data center alone in ``region``. Prices are the whole machine's (``communityPrice`` where
set, else ``onDemand``, as the prime CLI reads them); ``secure_cloud`` is the secure tier,
``community_cloud`` the community one; ``isSpot`` offers are billed as spot. Both listings are
paginated and every page is read. A launch asks at most the listed price (``maxPrice``).

Start-up: Prime's create-pod body has no start-up command field, only environment variables
(``envVars``) and an image or custom template. The start-up script (``onstart_script``) goes in
``COTRAIN_ONSTART``; a custom template (``custom_template_id``) whose start command runs
``sh -c "$COTRAIN_ONSTART"`` makes the pod join its task by itself.

Authentication is a Bearer key (``api_keys.key_for("prime")``), in a header only. A launch
Prime refuses for want of capacity is ``OutOfStock``, so a launch moves on to the next offer.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

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

URL = "https://api.primeintellect.ai"
PAGE_SIZE = 100
"""The most the API returns per page."""
MAX_PAGES = 100
"""A listing longer than this many pages is cut there (a bound on a paging bug)."""

_STOCK: dict[str, Any] = {
    "available": "available",
    "high": "available",
    "medium": "available",
    "low": "low",
    "unavailable": "none",
    "out of stock": "none",
}
_TIER: dict[str, Any] = {"secure_cloud": "secure", "community_cloud": "community"}
_SECURITY = {tier: security for security, tier in _TIER.items()}
_STATES: dict[str, State] = {
    "PROVISIONING": "starting",
    "PENDING": "starting",
    "ACTIVE": "running",
    "STOPPED": "exited",
    "ERROR": "failed",
    "DELETING": "terminated",
    "TERMINATED": "terminated",
}
# What a create-pod refusal says when the offer's capacity is gone (Prime has no error code
# for it, so its words are matched).
_NO_CAPACITY = re.compile(
    r"capacity|out of stock|sold out|no longer available|not available|unavailable", re.I
)
_ID_FIELDS = ("cloudId", "gpuType", "socket", "gpuCount", "provider", "dataCenter", "security")


def _esc(s: str) -> str:
    return s.replace("%", "%25").replace(":", "%3A")


def _unesc(s: str) -> str:
    return s.replace("%3A", ":").replace("%25", "%")


def offer_id_of(r: dict[str, Any]) -> str:
    """The offer id of an availability entry: every field its launch needs, ``:``-joined."""
    return ":".join(_esc(str(r.get(k) or "")) for k in _ID_FIELDS)


def parse_offer_id(offer_id: str) -> dict[str, str]:
    """The launch fields of an offer id (``offer_id_of``'s inverse)."""
    parts = offer_id.split(":")
    if len(parts) != len(_ID_FIELDS) or not parts[0] or not parts[3].isdigit():
        raise ProviderError(
            f"prime: {offer_id!r} is not a Prime offer id "
            "(cloudId:gpuType:socket:gpuCount:provider:dataCenter:security)"
        )
    return {k: _unesc(v) for k, v in zip(_ID_FIELDS, parts, strict=True)}


def _detail(body: Any) -> str:
    """Prime's error words: FastAPI's ``detail``, a string or a list of field errors."""
    d = body.get("detail") if isinstance(body, dict) else None
    if isinstance(d, list):
        parts = []
        for e in d[:3]:
            if isinstance(e, dict):
                loc = [str(x) for x in e.get("loc") or [] if x != "body"]
                parts.append(f"{'.'.join(loc)}: {e.get('msg', '')}" if loc else str(e.get("msg")))
        return "; ".join(parts)
    return message_of(body)


def _pod_name(task: str) -> str:
    # Prime takes letters, digits and dashes in a pod's name.
    return ("cotrain-" + re.sub(r"[^A-Za-z0-9-]+", "-", task).strip("-"))[:64]


def _unix(iso: Any) -> float:
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _first(v: Any) -> str | None:
    """An address Prime gives as a string, a list of them, or ``[null]``."""
    if isinstance(v, list):
        v = next((x for x in v if x), None)
    return str(v).strip() if v else None


def _per_gpu_mem(gpu_type: str, gpu_memory: Any) -> float:
    # Prime's GPU type names carry the per-GPU memory (H100_80GB); gpuMemory is the fallback.
    found = re.search(r"_(\d+)GB$", gpu_type)
    if found:
        return float(found.group(1))
    return float(gpu_memory or 0)


class PrimeProvider:
    name = "prime"
    caps = frozenset({Cap.SPOT, Cap.DOCKER_IMAGE})

    def __init__(
        self,
        api_key: str,
        *,
        url: str = URL,
        image: str = "ubuntu_22_cuda_12",
        custom_template_id: str | None = None,
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
        self.custom_template_id = custom_template_id

    def __repr__(self) -> str:  # never the key
        return f"PrimeProvider(url={self.api.url!r})"

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        return await self.api.call(method, path, **kw)

    def _on_error(self, status: int, body: Any, method: str, path: str) -> None:
        msg = " ".join(self.api.scrub(_detail(body)).split())[:200]
        if status == 404 and path.startswith("/api/v1/pods/"):
            raise ProviderError(f"prime: no pod {path.rsplit('/', 1)[-1]}")
        if method == "POST" and path == "/api/v1/pods":
            if status != 429 and _NO_CAPACITY.search(msg):
                raise OutOfStock(f"prime: the offer is no longer available: {msg}")
            if status in (400, 402, 409, 422):
                raise ProviderError(f"prime: the pod was refused ({status}): {msg}")

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        params = {"page_size": str(PAGE_SIZE)}
        if q.tier in _SECURITY:  # the one filter Prime applies exactly as ``matches`` does
            params["security"] = _SECURITY[q.tier]
        items: list[Any] = []
        for page in range(1, MAX_PAGES + 1):
            body = await self._call(
                "GET", "/api/v1/availability/gpus", params={**params, "page": str(page)}
            )
            if not isinstance(body, dict):
                raise ProviderError("prime: the availability answer is not an object")
            got = body.get("items") or []
            items += got
            if not got or len(items) >= int(body.get("totalCount") or 0):
                break
        now = time.time()
        out = []
        for raw in items:
            try:
                o = self._offer(raw, now)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a malformed entry is skipped, not fatal
            if matches(o, q):
                out.append(o)
        return out

    def _offer(self, r: dict[str, Any], now: float) -> Offer:
        prices = r["prices"]
        if (prices.get("currency") or "USD") != "USD":
            raise ValueError("not priced in US dollars")
        price = prices.get("communityPrice")
        price = float(price if price is not None else prices["onDemand"])
        if price <= 0:
            raise ValueError("no price")
        gpu_type = str(r["gpuType"])
        n = 0 if gpu_type == "CPU_NODE" else int(r["gpuCount"])
        mem = _per_gpu_mem(gpu_type, r.get("gpuMemory")) if n else 0.0
        provider = str(r.get("provider") or "")
        dc = str(r.get("dataCenter") or "")
        speed = r.get("internetSpeed")
        eta = r.get("provisioningTime")
        return Offer(
            provider=self.name,
            offer_id=offer_id_of(r),
            gpu=canonical_gpu(gpu_type, mem) if n else "cpu",
            gpu_count=n,
            gpu_mem_gb=mem,
            vcpus=_default(r.get("vcpu")),
            ram_gb=_default(r.get("memory")),
            disk_gb=_default(r.get("disk")),
            interconnect=str(r.get("interconnectType") or r.get("socket") or "") or None,
            country=str(r["country"]) if r.get("country") else None,
            region=dc or None,
            datacenter="/".join(x for x in (provider, dc) if x) or None,
            tier=_TIER.get(str(r.get("security")), "unknown"),
            billing="spot" if r.get("isSpot") else "on_demand",
            usd_per_hour=price,
            usd_per_gpu_hour=price / max(n, 1),
            stock=_STOCK.get(str(r.get("stockStatus") or "").lower(), "unknown"),
            net_down_mbps=float(speed) if speed is not None else None,  # assumed Mbps
            provision_eta_s=float(eta) * 60 if eta is not None else None,  # assumed minutes
            fetched_at=now,
        )

    # ---- instances ---------------------------------------------------------------------------

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        ids = parse_offer_id(offer.offer_id)
        pod: dict[str, Any] = {
            "name": _pod_name(spec.task),
            "cloudId": ids["cloudId"],
            "gpuType": ids["gpuType"],
            "socket": ids["socket"] or None,
            "gpuCount": int(ids["gpuCount"]),
            "image": "custom_template" if self.custom_template_id else self.image,
            "maxPrice": offer.usd_per_hour,
            "autoRestart": False,
            "envVars": [{"key": "COTRAIN_ONSTART", "value": onstart_script(spec)}],
        }
        optional = {
            "diskSize": offer.disk_gb,
            "vcpus": offer.vcpus,
            "memory": offer.ram_gb,
            "dataCenterId": ids["dataCenter"],
            "country": offer.country,
            "security": ids["security"],
            "customTemplateId": self.custom_template_id,
        }
        for k, v in optional.items():
            if v:
                pod[k] = int(v) if isinstance(v, float) else v
        body = {"pod": pod, "provider": {"type": ids["provider"]} if ids["provider"] else {}}
        got = await self._call("POST", "/api/v1/pods", json=body)
        if not isinstance(got, dict) or not got.get("id"):
            raise ProviderError(f"prime: offer {offer.offer_id} was not launched: no pod id")
        inst = self._instance(got)
        return inst.model_copy(
            update={
                "offer_id": offer.offer_id,
                "usd_per_hour": inst.usd_per_hour or offer.usd_per_hour,
                "started_at": time.time(),
                "state": "starting" if inst.state == "unknown" else inst.state,
                "task": spec.task,
            }
        )

    def _instance(self, r: dict[str, Any]) -> Instance:
        status = str(r.get("status") or "UNKNOWN").upper()
        install = str(r.get("installationStatus") or "").upper()
        failure = r.get("installationFailure")
        state = _STATES.get(status, "unknown")
        if state == "running" and failure:
            state = "failed"
        elif state == "running" and install and install != "FINISHED":
            state = "starting"  # the machine is up, Prime is still installing its image
        name = str(r.get("name") or "")
        detail = str(failure) if failure else " ".join(x for x in (status, install) if x)
        return Instance(
            provider=self.name,
            instance_id=str(r["id"]),
            offer_id="",
            state=state,
            usd_per_hour=float(r.get("priceHr") or 0),
            started_at=_unix(r.get("createdAt")),
            host=_first(r.get("ip")),
            detail=detail[:200],
            task=name.removeprefix("cotrain-") if name.startswith("cotrain-") else None,
        )

    async def status(self, instance_id: str) -> Instance:
        got = await self._call("GET", f"/api/v1/pods/{instance_id}")
        if not isinstance(got, dict) or not got.get("id"):
            raise ProviderError(f"prime: no pod {instance_id}")
        return self._instance(got)

    async def instances(self) -> list[Instance]:
        out = []
        offset = 0
        for _ in range(MAX_PAGES):
            body = await self._call(
                "GET", "/api/v1/pods", params={"offset": str(offset), "limit": str(PAGE_SIZE)}
            )
            data = (body.get("data") or []) if isinstance(body, dict) else []
            for r in data:
                try:
                    out.append(self._instance(r))
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
            offset += len(data)
            if not data or offset >= int(body.get("total_count") or 0):
                break
        return out

    async def terminate(self, instance_id: str) -> None:
        await self._call("DELETE", f"/api/v1/pods/{instance_id}")


def _default(resource: Any) -> Any:
    """The default of a resource block (``{"defaultCount": 16, "minCount": ...}``), or None."""
    v = resource.get("defaultCount") if isinstance(resource, dict) else None
    return v if isinstance(v, int | float) and v > 0 else None
