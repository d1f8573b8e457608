"""Akash: a thin client of the Akash Console API for managed-wallet users
(https://console-api.akash.network, ``x-api-key``), a reverse-auction market with no list prices.

    GET    /v1/gpu-prices                 per GPU model: availability and recent winning bids
                                          (USD per GPU-hour: min, max, avg, med)
    POST   /v1/deployments                {"data": {"sdl", "deposit"}}: {"data": {"dseq", ...}}
    GET    /v1/bids?dseq=                 {"data": [{"bid": {"id", "state", "price"}}, ...]}
    POST   /v1/leases                     accept a bid: {"manifest", "leases": [{dseq, gseq, ...}]}
    GET    /v1/deployments/{dseq}         {"data": {"deployment", "leases": [{"status"}], ...}}
    GET    /v1/deployments?skip=&limit=   ours, paginated: {"data": {"deployments", "pagination"}}
    DELETE /v1/deployments/{dseq}         close it (the escrow's rest is refunded)

An offer is a GPU model and count (``nvidia:h100:80Gi:SXM5:8``), billed by ``bid``: its price is
the median of the recent winning bids per GPU-hour that the API publishes, times the count, an
*estimate* (``price_is_estimate``). Those bids are for one-GPU deployments, so a machine of N GPUs
is estimated at N times the one-GPU price. Akash names no provider tier in that listing and this
adapter places no audit requirement, so every offer is ``community``.

A launch is a deployment whose SDL runs cotrain's start-up script and caps the price at
``max_over_estimate`` times the estimate; providers bid, the cheapest acceptable bid within
``bid_window_s`` is leased, and a deployment that got none is closed and the offer is
``OutOfStock``. ``status`` is "running" once every service of the lease has a ready replica;
``instances`` (every deployment of the account) calls an active lease "running", as the
listing carries no readiness.

Bid prices are per block in the chain's micro-denomination. ``uact`` (ACT, USD-pegged) and USDC
count as US dollars; at the Console API's own average of 6.174 s a block (``BLOCK_TIME_S``), an
hour is about 583 blocks. A price in any other denomination (``uakt``) is not converted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Literal

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

URL = "https://console-api.akash.network"

BLOCK_TIME_S = 6.174
"""Seconds a block, on average (the Console API's own figure): what converts per-block prices."""
BLOCKS_PER_HOUR = 3600 / BLOCK_TIME_S
USD_DENOMS = frozenset(
    {
        "uact",  # ACT, the USD-pegged deployment currency
        "uusdc",
        "ibc/170C677610AC31DF0904FFE09CD3B5C657492170E7E52372E48756B71E56F2F1",  # USDC (IBC)
    }
)
"""Micro-denominations of a US dollar (1e6 to the dollar)."""
COUNTS = (1, 2, 4, 8)
"""The GPU counts offered per model."""
CPU_PER_GPU = 8
RAM_GB_PER_GPU = 32
SERVICE = "cotrain"
PAGE_SIZE = 100
"""Deployments asked for per page (the API's most)."""

log = logging.getLogger(__name__)


def usd_per_hour(price: Mapping[str, Any]) -> float | None:
    """A per-block chain price (``{"denom", "amount"}``) in US dollars an hour; None for a
    denomination that is not a dollar."""
    if price.get("denom") not in USD_DENOMS:
        return None
    return float(price["amount"]) * BLOCKS_PER_HOUR / 1e6


def sdl(
    *,
    image: str,
    script: str,
    env: Mapping[str, str],
    vendor: str,
    model: str,
    ram: str,
    interface: str,
    gpus: int,
    disk_gb: float,
    denom: str,
    amount: int,
) -> str:
    """The SDL (YAML) of one service running ``script`` on ``gpus`` x ``model``, bidding at
    most ``amount`` ``denom`` a block. Every string is a JSON string, a valid YAML scalar."""
    q = json.dumps
    # The SDL knows two interfaces; the listing says "SXM5", "sxm4", "PCIe", ...
    iface = "sxm" if interface.lower().startswith("sxm") else interface.lower()
    gpu_attrs = f"model: {q(model)}, ram: {q(ram)}"
    if iface in ("sxm", "pcie"):
        gpu_attrs += f", interface: {q(iface)}"
    return "\n".join(
        [
            'version: "2.0"',
            "services:",
            f"  {SERVICE}:",
            f"    image: {q(image)}",
            f"    command: {q(['bash', '-c'])}",
            f"    args: {q([script])}",
            f"    env: {q([f'{k}={v}' for k, v in env.items()])}",
            "profiles:",
            "  compute:",
            f"    {SERVICE}:",
            "      resources:",
            f"        cpu: {{units: {CPU_PER_GPU * gpus}}}",
            f"        memory: {{size: {q(f'{RAM_GB_PER_GPU * gpus}Gi')}}}",
            f"        storage: [{{size: {q(f'{math.ceil(disk_gb)}Gi')}}}]",
            "        gpu:",
            f"          units: {gpus}",
            "          attributes:",
            "            vendor:",
            f"              {q(vendor)}: [{{{gpu_attrs}}}]",
            "  placement:",
            "    akash:",
            "      pricing:",
            f"        {SERVICE}: {{denom: {q(denom)}, amount: {amount}}}",
            "deployment:",
            f"  {SERVICE}:",
            "    akash:",
            f"      profile: {SERVICE}",
            "      count: 1",
            "",
        ]
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def _ram_gb(ram: str) -> float:
    found = re.match(r"\s*(\d+(?:\.\d+)?)", ram)
    if not found:
        raise ValueError(f"no size in {ram!r}")
    return float(found.group(1))


def _bid_id(entry: Mapping[str, Any]) -> dict[str, Any]:
    bid = entry["bid"]
    return dict(bid.get("id") or bid["bid_id"])  # "bid_id" in older answers


_ENV = re.compile(r"COTRAIN_(TASK|OFFER)=([^\s\"',\]\}]+)")


class AkashProvider:
    name = "akash"
    caps = frozenset({Cap.BID, Cap.DOCKER_IMAGE})

    def __init__(
        self,
        api_key: str,
        *,
        url: str = URL,
        image: str = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
        disk_gb: float = 100.0,
        deposit_usd: float = 5.0,
        denom: str = "uact",
        max_over_estimate: float = 1.5,
        bid_window_s: float = 90.0,
        bid_poll_s: float = 3.0,
        timeout_s: float = 20.0,
        retries_429: int = 3,
    ) -> None:
        self.api = JsonApi(
            self.name,
            url,
            {"x-api-key": api_key},
            secret=api_key,
            timeout_s=timeout_s,
            retries_429=retries_429,
            on_error=self._on_error,
        )
        self.image = image
        self.disk_gb = disk_gb
        self.deposit_usd = deposit_usd
        self.denom = denom
        self.max_over_estimate = max_over_estimate
        """The bid cap (in the SDL, and for accepting a bid): this times the offer's estimate."""
        self.bid_window_s = bid_window_s
        """How long a launch waits for an acceptable bid before the offer counts as sold out."""
        self.bid_poll_s = bid_poll_s

    def __repr__(self) -> str:  # never the key
        return f"AkashProvider(url={self.api.url!r})"

    def _on_error(self, status: int, body: Any, method: str, path: str) -> None:
        # The API's errors are {"error": "NotFound", "message": "..."}: one line, key scrubbed.
        msg = _one_line(self.api.scrub(message_of(body)))
        if status == 404 and path.startswith("/v1/deployments/"):
            raise ProviderError(f"akash: no deployment {path.rsplit('/', 1)[-1]}: {msg}")
        if status != 429:  # JsonApi words a lasting rate limit itself
            raise ProviderError(f"akash: {method} {path}: {status} {msg}")

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        return await self.api.call(method, path, **kw)

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        body = await self._call("GET", "/v1/gpu-prices")
        now = time.time()
        out = []
        for raw in body.get("models", []):
            try:
                found = self._offers(raw, now)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a malformed model is skipped, not fatal
            out += [o for o in found if matches(o, q)]
        return out

    def _offers(self, m: Mapping[str, Any], now: float) -> list[Offer]:
        price = m.get("price")
        if not price:
            return []  # no recent bids: nothing to estimate from
        per_gpu = float(price.get("med") or price.get("weightedAverage") or price["avg"])
        if per_gpu <= 0:
            return []
        vendor, model, ram = str(m["vendor"]), str(m["model"]), str(m["ram"])
        interface = str(m.get("interface") or "")
        mem = _ram_gb(ram)
        available = int(m["availability"]["available"])
        out = []
        for n in COUNTS:
            if n > 1 and n > available:
                break
            # One free GPU is one free GPU; N of them on one machine is the provider's to say.
            stock: Literal["none", "available", "unknown"] = (
                "none" if available <= 0 else "available" if n == 1 else "unknown"
            )
            out.append(
                Offer(
                    provider=self.name,
                    offer_id=f"{vendor}:{model}:{ram}:{interface}:{n}",
                    gpu=canonical_gpu(model, mem),
                    gpu_count=n,
                    gpu_mem_gb=mem,
                    interconnect=interface or None,
                    tier="community",
                    billing="bid",
                    usd_per_hour=per_gpu * n,
                    usd_per_gpu_hour=per_gpu,
                    price_is_estimate=True,
                    stock=stock,
                    fetched_at=now,
                )
            )
        return out

    # ---- instances ---------------------------------------------------------------------------

    def _sdl_for(self, offer: Offer, spec: LaunchSpec) -> tuple[str, float]:
        """The SDL of ``offer`` running ``spec``, and its bid cap in dollars an hour."""
        try:
            vendor, model, ram, interface, count = offer.offer_id.split(":")
            gpus = int(count)
        except ValueError:
            raise ProviderError(f"akash: {offer.offer_id!r} is not an Akash offer id") from None
        cap_usd = offer.usd_per_hour * self.max_over_estimate
        amount = max(1, math.ceil(cap_usd * 1e6 / BLOCKS_PER_HOUR))
        # The node runs in the background; `wait` keeps the container (and the lease) alive.
        script = onstart_script(spec) + " wait"
        env = {"COTRAIN_TASK": spec.task, "COTRAIN_OFFER": offer.offer_id}
        text = sdl(
            image=self.image,
            script=script,
            env=env,
            vendor=vendor,
            model=model,
            ram=ram,
            interface=interface,
            gpus=gpus,
            disk_gb=self.disk_gb,
            denom=self.denom,
            amount=amount,
        )
        return text, amount * BLOCKS_PER_HOUR / 1e6

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        text, cap_usd = self._sdl_for(offer, spec)
        data: dict[str, Any] = {"sdl": text, "deposit": self.deposit_usd}
        if spec.max_hours is not None and spec.max_hours <= 48:
            # The console closes the deployment at the limit (at most 48 hours at a time).
            data["runtimeLimitHours"] = max(1, math.ceil(spec.max_hours))
        created = (await self._call("POST", "/v1/deployments", json={"data": data}))["data"]
        dseq, manifest = str(created["dseq"]), str(created["manifest"])
        try:
            bid = await self._cheapest_bid(dseq, cap_usd)
            if bid is None:
                raise OutOfStock(
                    f"akash: no bid at most ${cap_usd:.2f}/h for {offer.offer_id} "
                    f"within {self.bid_window_s:g} s"
                )
            bid_id = _bid_id(bid)
            lease = {k: bid_id[k] for k in ("dseq", "gseq", "oseq", "provider")}
            await self._call("POST", "/v1/leases", json={"manifest": manifest, "leases": [lease]})
        except (ProviderError, asyncio.CancelledError):
            # No lease, no machine: close the deployment so its deposit comes back.
            log.info("akash: closing deployment %s (no lease)", dseq)
            try:
                await self._call("DELETE", f"/v1/deployments/{dseq}")
            except ProviderError as e:
                log.warning("akash: deployment %s could not be closed: %s", dseq, e)
            raise
        price = usd_per_hour(bid["bid"]["price"]) or offer.usd_per_hour
        log.info("akash: deployment %s leased from %s at $%.3f/h", dseq, lease["provider"], price)
        return Instance(
            provider=self.name,
            instance_id=dseq,
            offer_id=offer.offer_id,
            state="starting",
            usd_per_hour=price,
            started_at=time.time(),
            detail=f"leased from {lease['provider']}",
            task=spec.task,
        )

    async def _cheapest_bid(self, dseq: str, cap_usd: float) -> dict[str, Any] | None:
        """The cheapest open bid in dollars at most ``cap_usd`` an hour, waiting up to the bid
        window for one."""
        deadline = time.monotonic() + self.bid_window_s
        while True:
            got = await self._call("GET", "/v1/bids", params={"dseq": dseq})
            best: tuple[float, dict[str, Any]] | None = None
            for entry in got.get("data", []):
                try:
                    if entry["bid"]["state"] != "open":
                        continue
                    price = usd_per_hour(entry["bid"]["price"])
                    _bid_id(entry)
                except (KeyError, TypeError, ValueError):
                    continue
                if price is None or price > cap_usd * (1 + 1e-9):
                    continue  # not dollars, or over the cap
                if best is None or price < best[0]:
                    best = (price, entry)
            if best is not None:
                return best[1]
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(self.bid_poll_s)

    def _instance(self, d: Mapping[str, Any], *, detailed: bool) -> Instance:
        dep = d["deployment"]
        dseq = str(dep["id"]["dseq"])
        leases = d.get("leases") or []
        active = [x for x in leases if x.get("state") == "active"]
        state: State
        if dep.get("state") == "closed":
            state, detail = "terminated", "closed"
        elif not leases:
            state, detail = "starting", "no lease yet"
        elif not active:
            reasons = {str(x.get("reason") or x.get("state")) for x in leases}
            state, detail = "exited", "lease " + ", ".join(sorted(reasons))
        elif not detailed:
            state, detail = "running", "lease active"  # the listing carries no readiness
        else:
            state, detail = _readiness(active)
        settings = d.get("consoleSettings") or {}
        found = {m[1]: m[2] for m in _ENV.finditer(str(settings.get("sdl") or ""))}
        price = usd_per_hour(active[0]["price"]) if active and "price" in active[0] else None
        return Instance(
            provider=self.name,
            instance_id=dseq,
            offer_id=found.get("OFFER", ""),
            state=state,
            usd_per_hour=price or 0.0,
            host=_host(active[0].get("status")) if active else None,
            detail=detail[:200],
            task=found.get("TASK"),
        )

    async def status(self, instance_id: str) -> Instance:
        got = await self._call("GET", f"/v1/deployments/{instance_id}")
        try:
            return self._instance(got["data"], detailed=True)
        except (KeyError, TypeError) as e:
            raise ProviderError(
                f"akash: deployment {instance_id}: unexpected answer ({e})"
            ) from None

    async def instances(self) -> list[Instance]:
        out: list[Instance] = []
        skip = 0
        while True:
            params = {"skip": str(skip), "limit": str(PAGE_SIZE)}
            page = (await self._call("GET", "/v1/deployments", params=params)).get("data", {})
            items = page.get("deployments", [])
            for d in items:
                try:
                    out.append(self._instance(d, detailed=False))
                except (KeyError, TypeError):
                    continue
            skip += len(items)
            if not items or not page.get("pagination", {}).get("hasMore"):
                return out

    async def terminate(self, instance_id: str) -> None:
        await self._call("DELETE", f"/v1/deployments/{instance_id}")
        log.info("akash: deployment %s closed", instance_id)


def _readiness(active: list[Mapping[str, Any]]) -> tuple[State, str]:
    """Running once every service of every active lease has a ready replica."""
    services = []
    for lease in active:
        status = lease.get("status")
        if not status:
            return "starting", "the provider has not reported the lease yet"
        services += list((status.get("services") or {}).values())
    if not services:
        return "starting", "no service reported yet"
    waiting = [str(s.get("name")) for s in services if int(s.get("ready_replicas") or 0) < 1]
    if waiting:
        return "starting", "no ready replicas: " + ", ".join(waiting)
    return "running", "ready"


def _host(status: Mapping[str, Any] | None) -> str | None:
    if not status:
        return None
    for ports in (status.get("forwarded_ports") or {}).values():
        for p in ports:
            if p.get("host"):
                return str(p["host"])
    for s in (status.get("services") or {}).values():
        for uri in s.get("uris") or []:
            return str(uri)
    return None
