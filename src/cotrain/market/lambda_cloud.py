"""Lambda Cloud: a thin client of its public REST API (https://docs-api.lambda.ai, ``/api/v1``).

    GET  /api/v1/instance-types                {"data": {type: {instance_type, regions_with_...}}}
    POST /api/v1/instance-operations/launch    {"data": {"instance_ids": [...]}}
    GET  /api/v1/instances                     ours: {"data": [...]}
    GET  /api/v1/instances/{id}                one: {"data": {...}}
    POST /api/v1/instance-operations/terminate {"data": {"terminated_instances": [...]}}
    GET  /api/v1/ssh-keys                      the account's keys (a launch needs exactly one)

An offer is an instance type in one region that has capacity now (``gpu_8x_h100_sxm5@us-east-1``);
a type with capacity nowhere is listed once, without a region, with ``stock="none"``. Lambda is
the secure tier and bills on demand; ``price_cents_per_hour`` is the whole machine's.

A launch passes the start-up script (``onstart_script``) as cloud-init ``user_data`` and names
the instance ``cotrain:<task>``. Lambda takes one launch per 12 s: a 429 is waited out
(``Retry-After`` by the HTTP client, then ``launch_wait_s`` between a few more tries). Errors
come as ``{"error": {"code", "message", "suggestion"}}``; the code
``instance-operations/launch/insufficient-capacity`` is ``OutOfStock``, so a launch moves on to
the next offer. Authentication is a Bearer key (``api_keys.key_for("lambda")``), in a header only.
"""

from __future__ import annotations

import asyncio
import re
import time
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

URL = "https://cloud.lambda.ai"
LAUNCH = "/api/v1/instance-operations/launch"
LAUNCH_INTERVAL_S = 12.0
"""Lambda's documented launch rate limit: one per this many seconds."""
LAUNCH_TRIES = 4
INSUFFICIENT_CAPACITY = "instance-operations/launch/insufficient-capacity"

_STATES: dict[str, State] = {
    "booting": "starting",
    "active": "running",
    "unhealthy": "failed",
    "terminating": "terminated",
    "terminated": "terminated",
    "preempted": "terminated",
}


class _LaunchRateLimited(ProviderError):
    """A launch answered 429 after the HTTP client's own retries."""


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _error(body: Any) -> dict[str, Any]:
    return _dict(_dict(body).get("error"))


def _gpu(desc: str, n: int) -> tuple[str, float]:
    """Canonical GPU and its memory from Lambda's ``H100 (80 GB SXM5)``."""
    if not n:
        return "cpu", 0.0
    found = re.search(r"(\d+)\s*GB", desc, re.I)
    mem = float(found.group(1)) if found else 0.0
    return canonical_gpu(desc.split("(")[0].strip(), mem or None), mem


def _socket(desc: str) -> str | None:
    found = re.search(r"\b(SXM\d*|PCIe)\b", desc, re.I)
    return found.group(1) if found else None


class LambdaProvider:
    name = "lambda"
    caps: frozenset[Cap] = frozenset()

    def __init__(
        self,
        api_key: str,
        *,
        url: str = URL,
        ssh_key: str | None = None,
        launch_wait_s: float = LAUNCH_INTERVAL_S,
        timeout_s: float = 20.0,
        retries_429: int = 3,
    ) -> None:
        """``ssh_key``: the name of the account's SSH key to launch with (Lambda requires
        one; default: the account's first)."""
        self.api = JsonApi(
            self.name,
            url,
            {"Authorization": f"Bearer {api_key}"},
            secret=api_key,
            timeout_s=timeout_s,
            retries_429=retries_429,
            on_error=self._on_error,
        )
        self.ssh_key = ssh_key
        self.launch_wait_s = launch_wait_s

    def __repr__(self) -> str:  # never the key
        return f"LambdaProvider(url={self.api.url!r})"

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        return await self.api.call(method, path, **kw)

    def _on_error(self, status: int, body: Any, method: str, path: str) -> None:
        err = _error(body)
        code = str(err.get("code") or "")
        msg = " ".join(self.api.scrub(message_of(body)).split())[:200]
        if code == INSUFFICIENT_CAPACITY:
            raise OutOfStock(f"lambda: {msg}")
        if status == 429 and path == LAUNCH:
            raise _LaunchRateLimited("lambda: launches are rate limited (one per 12 s)")
        if status == 404 and path.startswith("/api/v1/instances/"):
            raise ProviderError(f"lambda: no instance {path.rsplit('/', 1)[-1]}")
        if code and status != 429:  # (a 429 keeps the HTTP client's own message)
            fields = body.get("field_errors") if isinstance(body, dict) else None
            if isinstance(fields, dict) and fields:
                field, ferr = next(iter(fields.items()))
                msg += f" ({field}: {message_of(ferr)})"
            hint = str(err.get("suggestion") or "")
            text = f"lambda: {method} {path}: {status} {code}: {msg}" + (
                f"; {hint}" if hint else ""
            )
            raise ProviderError(" ".join(self.api.scrub(text).split())[:400])

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        body = await self._call("GET", "/api/v1/instance-types")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise ProviderError("lambda: the instance-types answer has no data")
        now = time.time()
        out = []
        for type_name, entry in data.items():
            try:
                offers = self._offers(str(type_name), entry, now)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a malformed instance type is skipped, not fatal
            out += [o for o in offers if matches(o, q)]
        return out

    def _offers(self, type_name: str, entry: dict[str, Any], now: float) -> list[Offer]:
        t = entry["instance_type"]
        specs = t["specs"]
        n = int(specs["gpus"])
        price = int(t["price_cents_per_hour"]) / 100
        if price <= 0:
            raise ValueError("no price")
        desc = str(t.get("gpu_description") or t.get("description") or type_name)
        gpu, mem = _gpu(desc, n)
        base = Offer(
            provider=self.name,
            offer_id=type_name,
            gpu=gpu,
            gpu_count=n,
            gpu_mem_gb=mem,
            vcpus=int(specs["vcpus"]) if specs.get("vcpus") else None,
            ram_gb=float(specs["memory_gib"]) if specs.get("memory_gib") else None,
            disk_gb=float(specs["storage_gib"]) if specs.get("storage_gib") else None,
            interconnect=_socket(desc),
            tier="secure",
            billing="on_demand",
            usd_per_hour=price,
            usd_per_gpu_hour=price / max(n, 1),
            stock="none",
            fetched_at=now,
        )
        out = []
        for r in entry.get("regions_with_capacity_available") or []:
            if not isinstance(r, dict) or not r.get("name"):
                continue
            region = str(r["name"])
            out.append(
                base.model_copy(
                    update={
                        "offer_id": f"{type_name}@{region}",
                        "region": region,
                        "country": "US" if region.startswith("us-") else None,
                        "datacenter": str(r.get("description") or "") or None,
                        "stock": "available",
                    }
                )
            )
        return out or [base]

    # ---- instances ---------------------------------------------------------------------------

    async def _key_name(self) -> str:
        if self.ssh_key:
            return self.ssh_key
        got = await self._call("GET", "/api/v1/ssh-keys")
        keys = got.get("data") if isinstance(got, dict) else None
        names = [str(k["name"]) for k in keys or [] if isinstance(k, dict) and k.get("name")]
        if not names:
            raise ProviderError(
                "lambda: the account has no SSH key, and Lambda launches nothing without one: "
                "add one in the Lambda Cloud dashboard (SSH keys)"
            )
        return names[0]

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        type_name, _, region = offer.offer_id.partition("@")
        if not region:
            raise OutOfStock(f"lambda: {type_name} has no capacity in any region")
        body = {
            "region_name": region,
            "instance_type_name": type_name,
            "ssh_key_names": [await self._key_name()],
            "quantity": 1,
            "name": f"cotrain:{spec.task}"[:64],
            "user_data": f"#!/bin/bash\n{onstart_script(spec)}\n",
        }
        for attempt in range(LAUNCH_TRIES):
            try:
                got = await self._call("POST", LAUNCH, json=body)
                break
            except OutOfStock as e:
                why = str(e).removeprefix("lambda: ")
                raise OutOfStock(f"lambda: {offer.offer_id} is sold out: {why}") from None
            except _LaunchRateLimited:
                if attempt == LAUNCH_TRIES - 1:
                    raise ProviderError(
                        f"lambda: launches are still rate limited after {LAUNCH_TRIES} tries "
                        "(one per 12 s): try again in a minute"
                    ) from None
                await asyncio.sleep(self.launch_wait_s)
        data = got.get("data") if isinstance(got, dict) else None
        ids = data.get("instance_ids") if isinstance(data, dict) else None
        if not ids:
            raise OutOfStock(f"lambda: {offer.offer_id} launched no instance")
        return Instance(
            provider=self.name,
            instance_id=str(ids[0]),
            offer_id=offer.offer_id,
            state="starting",
            usd_per_hour=offer.usd_per_hour,
            started_at=time.time(),
            task=spec.task,
        )

    def _instance(self, r: dict[str, Any]) -> Instance:
        status = str(r.get("status") or "unknown")
        t = _dict(r.get("instance_type"))
        region = _dict(r.get("region")).get("name")
        name = str(r.get("name") or "")
        cents = t.get("price_cents_per_hour")
        return Instance(
            provider=self.name,
            instance_id=str(r["id"]),
            offer_id=f"{t['name']}@{region}" if t.get("name") and region else "",
            state=_STATES.get(status, "unknown"),
            usd_per_hour=int(cents) / 100 if cents is not None else 0.0,
            host=str(r["ip"]) if r.get("ip") else None,
            detail=status,
            task=name.removeprefix("cotrain:") if name.startswith("cotrain:") else None,
        )

    async def status(self, instance_id: str) -> Instance:
        got = await self._call("GET", f"/api/v1/instances/{instance_id}")
        data = got.get("data") if isinstance(got, dict) else None
        if not isinstance(data, dict):
            raise ProviderError(f"lambda: no instance {instance_id}")
        return self._instance(data)

    async def instances(self) -> list[Instance]:
        got = await self._call("GET", "/api/v1/instances")
        out = []
        for r in (got.get("data") or []) if isinstance(got, dict) else []:
            try:
                out.append(self._instance(r))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        return out

    async def terminate(self, instance_id: str) -> None:
        await self._call(
            "POST", "/api/v1/instance-operations/terminate", json={"instance_ids": [instance_id]}
        )
