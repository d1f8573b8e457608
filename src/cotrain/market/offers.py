"""Offers from every provider in one shape, and how they are chosen.

An ``Offer`` is what one provider will rent now: a machine of ``gpu_count`` x ``gpu`` (a
canonical name such as ``H100_80GB``; ``cpu`` for a machine without one) at a price, somewhere,
under a billing model. Prices are US dollars; ``usd_per_hour`` is the whole machine's, and
``usd_per_gpu_hour`` divides it by the GPUs (for a CPU machine: the machine's). Markets that do
not list prices are modelled as they are: ``billing = "bid"`` offers (Akash) carry the provider's
last winning bid as an *estimate* and are marked so; ``prepaid`` offers (io.net) carry the hourly
price and their ``min_hours``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from cotrain.market.value import Workload

Tier = Literal["secure", "community", "unknown"]
Billing = Literal["on_demand", "spot", "bid", "prepaid", "owned"]
SortKey = Literal["price", "price_per_gpu", "price_per_tflop", "reliability", "cost_per_token"]

# Dense BF16 tensor TFLOP/s per GPU (vendor datasheets, without sparsity): what
# ``price_per_tflop`` divides by. A GPU not listed here sorts last on that key.
TFLOPS: dict[str, float] = {
    "H200_141GB": 989.0,
    "H100_80GB": 989.0,
    "H100_94GB": 835.0,
    "A100_80GB": 312.0,
    "A100_40GB": 312.0,
    "L40S_48GB": 362.0,
    "L40_48GB": 181.0,
    "A6000_48GB": 155.0,
    "A40_48GB": 150.0,
    "RTX4090_24GB": 165.0,
    "RTX3090_24GB": 71.0,
    "A10_24GB": 125.0,
    "L4_24GB": 121.0,
    "V100_32GB": 125.0,
    "V100_16GB": 125.0,
    "T4_16GB": 65.0,
}


class Offer(BaseModel):
    """One rentable machine, normalized."""

    model_config = ConfigDict(extra="forbid")
    provider: str
    offer_id: str
    """The provider's own id: what its launch call takes (a Vast ask, a Prime cloudId, ...)."""
    gpu: str
    """Canonical model and memory, e.g. ``H100_80GB``; ``cpu`` for none."""
    gpu_count: int = Field(ge=0)
    gpu_mem_gb: float = Field(ge=0)
    vcpus: int | None = None
    ram_gb: float | None = None
    disk_gb: float | None = None
    interconnect: str | None = None
    country: str | None = None
    region: str | None = None
    """A region name as the provider says it (``us-east-1``, ``EU``, a city)."""
    datacenter: str | None = None
    tier: Tier = "unknown"
    billing: Billing = "on_demand"
    usd_per_hour: float = Field(ge=0)
    usd_per_gpu_hour: float = Field(ge=0)
    price_is_estimate: bool = False
    """True where the market sets no list price (bids): the figure is what it cost lately."""
    min_hours: float = 0.0
    stock: Literal["available", "low", "none", "unknown"] = "unknown"
    reliability: float | None = Field(default=None, ge=0, le=1)
    net_down_mbps: float | None = None
    net_up_mbps: float | None = None
    provision_eta_s: float | None = None
    measured_gflops: float | None = None
    """What cotrain's benchmark measured on this machine (SSH hosts, once launched)."""
    fetched_at: float = 0.0
    """Unix time the provider was asked."""

    @property
    def tflops(self) -> float | None:
        per = TFLOPS.get(self.gpu)
        return per * self.gpu_count if per is not None and self.gpu_count else None

    @property
    def usd_per_tflop_hour(self) -> float | None:
        t = self.tflops
        return self.usd_per_hour / t if t else None


_GPU_NAMES = [  # (pattern over the provider's name, canonical model); first match wins
    (r"gh200", "GH200"),
    (r"h200", "H200"),
    (r"h100", "H100"),
    (r"a100", "A100"),
    (r"l40s", "L40S"),
    (r"l40", "L40"),
    (r"rtx ?a6000|a6000", "A6000"),
    (r"a40\b", "A40"),
    (r"4090", "RTX4090"),
    (r"3090", "RTX3090"),
    (r"a10g?\b", "A10"),
    (r"\bl4\b", "L4"),
    (r"v100", "V100"),
    (r"\bt4\b", "T4"),
]


def canonical_gpu(name: str, mem_gb: float | None = None) -> str:
    """A provider's GPU name as ``MODEL_MEMGB`` (``NVIDIA H100 80GB HBM3`` -> ``H100_80GB``);
    an unknown model keeps its own name, upper-cased, spaces as underscores."""
    low = name.lower().replace("_", " ").replace("-", " ")
    model = next((m for pat, m in _GPU_NAMES if re.search(pat, low)), None)
    if model is None:
        model = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_") or "UNKNOWN"
        model = re.sub(r"_?\d+GB$", "", model)
    if mem_gb is None:
        found = re.search(r"(\d+)\s*gb", low)
        mem_gb = float(found.group(1)) if found else None
    return f"{model}_{round(mem_gb)}GB" if mem_gb else model


class OfferQuery(BaseModel):
    """What ``cotrain market offers`` filters by (every field optional)."""

    model_config = ConfigDict(extra="forbid")
    gpu: str | None = None
    """A model (``H100``) or canonical name (``H100_80GB``), case-insensitive; ``cpu``."""
    count: int | None = Field(default=None, ge=1)
    """At least this many GPUs in one machine."""
    min_vram_gb: float | None = Field(default=None, ge=0)
    """At least this much memory per GPU."""
    tier: Tier | None = None
    region: str | None = None
    """A substring of the region, country or datacenter (``EU`` also matches EU countries)."""
    max_price: float | None = Field(default=None, ge=0)
    """Most US dollars per GPU-hour (per machine-hour for CPU machines)."""
    providers: list[str] | None = None
    billing: list[Billing] | None = None
    in_stock: bool = True
    """Leave out offers the provider says it has none of."""


EU = {
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT",
    "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "NO", "CH",
    "GB",
}  # fmt: skip


def _in_region(o: Offer, want: str) -> bool:
    w = want.lower()
    if w == "eu" and (o.country or "").upper() in EU:
        return True
    return any(w in (x or "").lower() for x in (o.region, o.country, o.datacenter))


def matches(o: Offer, q: OfferQuery) -> bool:
    if q.gpu is not None:
        want, have = q.gpu.upper(), o.gpu.upper()
        if want != have and want != have.split("_")[0]:
            return False
    if q.count is not None and o.gpu_count < q.count:
        return False
    if q.min_vram_gb is not None and o.gpu_mem_gb < q.min_vram_gb:
        return False
    if q.tier is not None and o.tier != q.tier:
        return False
    if q.region is not None and not _in_region(o, q.region):
        return False
    if q.max_price is not None and o.usd_per_gpu_hour > q.max_price:
        return False
    if q.providers is not None and o.provider not in q.providers:
        return False
    if q.billing is not None and o.billing not in q.billing:
        return False
    return not (q.in_stock and o.stock == "none")


def _key(o: Offer, by: SortKey, workload: Workload | None) -> tuple[float, ...]:
    inf = float("inf")
    if by == "price":
        return (o.usd_per_hour, o.usd_per_gpu_hour)
    if by == "price_per_gpu":
        return (o.usd_per_gpu_hour, o.usd_per_hour)
    if by == "price_per_tflop":
        per = o.usd_per_tflop_hour
        return (per if per is not None else inf, o.usd_per_gpu_hour)
    if by == "cost_per_token":
        from cotrain.market.value import Workload, usd_per_mtoken

        cost = usd_per_mtoken(o, workload or Workload())
        return (cost if cost is not None else inf, o.usd_per_hour)
    rel = o.reliability if o.reliability is not None else -1.0
    return (-rel, o.usd_per_gpu_hour)


def choose(
    offers: Iterable[Offer],
    q: OfferQuery,
    by: SortKey = "price_per_gpu",
    workload: Workload | None = None,
) -> list[Offer]:
    """The offers that match ``q``, duplicates merged, best first by ``by`` (ties: the provider
    and id, so the order is stable). ``cost_per_token`` ranks by ``value.usd_per_mtoken`` for
    ``workload``."""
    return sorted(
        merge_duplicates(o for o in offers if matches(o, q)),
        key=lambda o: (*_key(o, by, workload), o.provider, o.offer_id),
    )


def merge_duplicates(offers: Iterable[Offer]) -> list[Offer]:
    """One offer per (provider, offer id): a provider listed twice (two pages overlapping, two
    sources) keeps the cheaper, then the fresher, of each."""
    best: dict[tuple[str, str], Offer] = {}
    for o in offers:
        k = (o.provider, o.offer_id)
        old = best.get(k)
        if old is None or (o.usd_per_hour, -o.fetched_at) < (old.usd_per_hour, -old.fetched_at):
            best[k] = o
    return list(best.values())
