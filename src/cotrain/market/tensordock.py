"""TensorDock: a thin client of its public v2 REST API (https://dashboard.tensordock.com/api/docs).

    GET    /locations        offers: {"data": {"locations": [{id, city, ..., tier, gpus: [...]}]}}
    POST   /instances        deploy a VM (JSON:API style {"data": {"type": "virtualmachine", ...}})
    GET    /instances        ours: {"data": {"instances": [{type, id, attributes: {...}}]}}
    GET    /instances/{id}   one: {id, name, status, ipAddress, portForwards}
    DELETE /instances/{id}   delete it

Authentication is a Bearer token in a header (the API allows 100 requests a minute per
organization; a 429 is waited out). Errors are read from ``{"error": ...}``, ``{"message": ...}``
or JSON:API ``{"errors": [{title, detail}]}`` bodies; a deploy refused for want of capacity is
``OutOfStock``.

Offers: one per (location, GPU model, count in ``COUNTS`` up to the location's ``max_count``).
A TensorDock VM is priced by its parts, so each offer states the resources a launch will request
and is priced for them: ``price_per_hr`` x count, plus ``vcpus_per_gpu`` x count vCPUs (in steps
of 2) and ``ram_gb_per_gpu`` x count GB of RAM (in steps of 8), both cut to what the location can
deploy, plus ``disk_gb`` of storage (TensorDock's minimum is 100 GB), each at the location's
``pricing`` rates. ``offer_id`` is ``<location id>|<v0Name>|<count>``; the launch requests the
offer's own ``vcpus``, ``ram_gb`` and ``disk_gb``. Only GPUs whose location offers a dedicated
IP are listed, and a launch asks for one (whatever TensorDock charges for it is not in the
listed rates). Tier: the documentation gives a location's ``tier`` as a number without defining
it; it is read as a data-centre tier (I-IV): 3 and up is the secure tier, 1 and 2 community.

A VM runs ``onstart_script`` from cloud-init (``runcmd``, with ``python3-venv`` installed).
TensorDock requires an SSH public key on every VM: ``ssh_key``, else ``~/.ssh/id_ed25519.pub``
or ``~/.ssh/id_rsa.pub``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from cotrain.market.http import JsonApi, message_of
from cotrain.market.offers import Offer, OfferQuery, Tier, canonical_gpu, matches
from cotrain.market.provider import (
    Cap,
    Instance,
    LaunchSpec,
    OutOfStock,
    ProviderError,
    State,
    onstart_script,
)

URL = "https://dashboard.tensordock.com"
"""The host; every path is under its ``/api/v2``."""
COUNTS = (1, 2, 4, 8)
MIN_DISK_GB = 100

_STATES: dict[str, State] = {
    "running": "running",
    "starting": "starting",
    "pending": "starting",
    "provisioning": "starting",
    "creating": "starting",
    "stopping": "exited",
    "stopped": "exited",
    "stoppeddisassociated": "exited",
    "deleting": "terminated",
    "deleted": "terminated",
    "error": "failed",
    "failed": "failed",
}
_SOLD_OUT = re.compile(
    r"no (longer )?(available|capacity|hostnodes?)|not available|insufficient|"
    r"out of stock|sold out|capacity",
    re.IGNORECASE,
)
_MEM = re.compile(r"(\d+)\s*gb", re.IGNORECASE)

COUNTRIES = {
    "united states": "US", "canada": "CA", "united kingdom": "GB", "germany": "DE",
    "netherlands": "NL", "france": "FR", "poland": "PL", "czech republic": "CZ",
    "czechia": "CZ", "finland": "FI", "sweden": "SE", "norway": "NO", "iceland": "IS",
    "spain": "ES", "italy": "IT", "belgium": "BE", "austria": "AT", "switzerland": "CH",
    "ireland": "IE", "portugal": "PT", "romania": "RO", "bulgaria": "BG", "hungary": "HU",
    "japan": "JP", "singapore": "SG", "india": "IN", "australia": "AU", "brazil": "BR",
    "south korea": "KR", "taiwan": "TW", "hong kong": "HK", "united arab emirates": "AE",
}  # fmt: skip


def _message(body: Any) -> str:
    """One line of a TensorDock error body, whichever shape it has."""
    errs = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errs, list) and errs and isinstance(errs[0], dict):
        e = errs[0]
        parts = [str(e[k]) for k in ("title", "detail", "message") if e.get(k)]
        text = ": ".join(parts) or str(e)
    else:
        text = message_of(body)
    return " ".join(text.split())[:200]


def _unwrap(body: Any) -> dict[str, Any]:
    """A JSON:API resource (``{"data": {type, id, attributes}}``) or a flat object, as one dict."""
    d = body.get("data", body) if isinstance(body, dict) else None
    if not isinstance(d, dict):
        raise ProviderError("tensordock: an answer that is not an object")
    attrs = d.get("attributes")
    return {**attrs, "id": d.get("id"), "type": d.get("type")} if isinstance(attrs, dict) else d


def _tier(value: Any) -> Tier:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return "unknown"
    return "secure" if n >= 3 else "community" if n >= 1 else "unknown"


def parse_offer_id(offer_id: str) -> tuple[str, str, int]:
    """``(location id, v0Name, count)`` of a TensorDock offer id."""
    try:
        location, gpu, n = offer_id.split("|")
        count = int(n)
    except ValueError:
        raise ProviderError(f"tensordock: {offer_id!r} is not a TensorDock offer id") from None
    if not location or not gpu or count < 1:
        raise ProviderError(f"tensordock: {offer_id!r} is not a TensorDock offer id")
    return location, gpu, count


class TensorDockProvider:
    name = "tensordock"
    caps = frozenset({Cap.OPEN_PORTS, Cap.STOP})

    def __init__(
        self,
        api_key: str,
        *,
        url: str = URL,
        image: str = "ubuntu2404",
        vcpus_per_gpu: int = 8,
        ram_gb_per_gpu: int = 32,
        disk_gb: int = MIN_DISK_GB,
        ssh_key: str = "",
        timeout_s: float = 20.0,
        retries_429: int = 3,
    ) -> None:
        if disk_gb < MIN_DISK_GB:
            raise ValueError(f"disk_gb={disk_gb}: TensorDock's minimum is {MIN_DISK_GB} GB")
        self.api = JsonApi(
            self.name,
            url.rstrip("/") + "/api/v2",
            {"Authorization": f"Bearer {api_key}"},
            secret=api_key,
            timeout_s=timeout_s,
            retries_429=retries_429,
            on_error=self._on_error,
        )
        self.image = image
        self.vcpus_per_gpu = vcpus_per_gpu
        self.ram_gb_per_gpu = ram_gb_per_gpu
        self.disk_gb = disk_gb
        self.ssh_key = ssh_key

    def __repr__(self) -> str:  # never the key
        return f"TensorDockProvider(url={self.api.url!r})"

    def _on_error(self, status: int, body: Any, method: str, path: str) -> None:
        if status == 429:
            return  # JsonApi names it
        msg = self.api.scrub(_message(body))
        if method == "POST" and path == "/instances" and _SOLD_OUT.search(msg):
            raise OutOfStock(f"tensordock: {msg}")
        if status == 404 and path.startswith("/instances/"):
            raise ProviderError(f"tensordock: no instance {path.split('/')[2]}")
        raise ProviderError(f"tensordock: {method} {path}: {status} {msg}")

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        body = await self.api.call("GET", "/locations")
        data = body.get("data", body) if isinstance(body, dict) else {}
        now = time.time()
        out = []
        for loc in (data.get("locations") if isinstance(data, dict) else None) or []:
            for g in (loc.get("gpus") if isinstance(loc, dict) else None) or []:
                try:
                    made = self._offers_of(loc, g, now)
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue  # a malformed entry is skipped, not fatal
                out += [o for o in made if matches(o, q)]
        return out

    def _offers_of(self, loc: dict[str, Any], g: dict[str, Any], now: float) -> list[Offer]:
        if not (g.get("network_features") or {}).get("dedicated_ip_available"):
            return []
        v0, shown = str(g["v0Name"]), str(g.get("displayName") or g["v0Name"])
        found = _MEM.search(shown) or _MEM.search(v0)
        mem = float(found.group(1)) if found else 0.0
        res, rate = g["resources"], g["pricing"]
        per_gpu = float(g["price_per_hr"])
        per_vcpu, per_ram = float(rate["per_vcpu_hr"]), float(rate["per_gb_ram_hr"])
        per_disk = float(rate["per_gb_storage_hr"])
        if per_gpu <= 0 or int(res["max_storage_gb"]) < self.disk_gb:
            return []
        country_name = str(loc.get("country") or "")
        place = [str(loc[k]) for k in ("city", "stateprovince", "country") if loc.get(k)]
        out = []
        for n in COUNTS:
            if n > int(g["max_count"]):
                break
            vcpus = min(self.vcpus_per_gpu * n, int(res["max_vcpus"])) // 2 * 2
            ram = min(self.ram_gb_per_gpu * n, int(res["max_ram_gb"])) // 8 * 8
            if vcpus < 2 or ram < 8:
                continue
            price = per_gpu * n + per_vcpu * vcpus + per_ram * ram + per_disk * self.disk_gb
            out.append(
                Offer(
                    provider=self.name,
                    offer_id=f"{loc['id']}|{v0}|{n}",
                    gpu=canonical_gpu(shown, mem or None),
                    gpu_count=n,
                    gpu_mem_gb=mem,
                    vcpus=vcpus,
                    ram_gb=float(ram),
                    disk_gb=float(self.disk_gb),
                    country=COUNTRIES.get(country_name.lower(), country_name or None),
                    region=", ".join(place) or None,
                    tier=_tier(loc.get("tier")),
                    billing="on_demand",
                    usd_per_hour=round(price, 6),
                    usd_per_gpu_hour=round(price / n, 6),
                    stock="available",
                    fetched_at=now,
                )
            )
        return out

    # ---- instances ---------------------------------------------------------------------------

    def _public_key(self) -> str:
        if self.ssh_key:
            return self.ssh_key
        for name in ("id_ed25519.pub", "id_rsa.pub"):
            path = Path("~/.ssh").expanduser() / name
            if path.is_file():
                return path.read_text().strip()
        raise ProviderError(
            "tensordock: every VM needs an SSH public key: pass ssh_key, or create one "
            "(ssh-keygen -t ed25519 writes ~/.ssh/id_ed25519.pub)"
        )

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        location, gpu, count = parse_offer_id(offer.offer_id)
        attributes = {
            "name": f"cotrain-{spec.task}",
            "type": "virtualmachine",
            "image": self.image,
            "resources": {
                "vcpu_count": offer.vcpus or max(2, self.vcpus_per_gpu * count // 2 * 2),
                "ram_gb": round(offer.ram_gb or self.ram_gb_per_gpu * count),
                "storage_gb": round(max(offer.disk_gb or 0, MIN_DISK_GB)),
                "gpus": {gpu: {"count": count}},
            },
            "location_id": location,
            "useDedicatedIp": True,
            "ssh_key": self._public_key(),
            "cloud_init": {"packages": ["python3-venv"], "runcmd": [onstart_script(spec)]},
        }
        body = {"data": {"type": "virtualmachine", "attributes": attributes}}
        try:
            got = _unwrap(await self.api.call("POST", "/instances", json=body))
        except OutOfStock as e:
            detail = str(e).removeprefix("tensordock: ")
            raise OutOfStock(f"tensordock: offer {offer.offer_id}: {detail}") from None
        if not got.get("id"):
            raise ProviderError(f"tensordock: offer {offer.offer_id}: no instance id in answer")
        status = str(got.get("status") or "starting")
        return Instance(
            provider=self.name,
            instance_id=str(got["id"]),
            offer_id=offer.offer_id,
            state=_STATES.get(status.lower(), "starting"),
            usd_per_hour=offer.usd_per_hour,
            started_at=time.time(),
            detail=status,
            task=spec.task,
        )

    def _instance(self, r: dict[str, Any]) -> Instance:
        status = str(r.get("status") or "unknown")
        name = str(r.get("name") or "")
        ip = r.get("ipAddress") or r.get("ip_address")
        return Instance(
            provider=self.name,
            instance_id=str(r["id"]),
            offer_id="",
            state=_STATES.get(status.lower(), "unknown"),
            usd_per_hour=float(r.get("rateHourly") or 0),
            host=str(ip) if ip else None,
            detail=status[:200],
            task=name.removeprefix("cotrain-") if name.startswith("cotrain-") else None,
        )

    async def status(self, instance_id: str) -> Instance:
        got = _unwrap(await self.api.call("GET", f"/instances/{instance_id}"))
        if not got.get("id"):
            raise ProviderError(f"tensordock: no instance {instance_id}")
        return self._instance(got)

    async def instances(self) -> list[Instance]:
        data = _unwrap(await self.api.call("GET", "/instances"))
        rows = data.get("instances") or []
        out = []
        for row in rows:
            try:
                r = _unwrap(row)
            except ProviderError:
                continue
            if r.get("id"):
                out.append(self._instance(r))
        return out

    async def terminate(self, instance_id: str) -> None:
        await self.api.call("DELETE", f"/instances/{instance_id}")
