"""Offers in one shape: GPU names, every filter, every sort, duplicates, and the catalog's
cache and failed providers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cotrain.market.catalog import Catalog
from cotrain.market.offers import Offer, OfferQuery, canonical_gpu, choose, merge_duplicates
from cotrain.market.provider import Cap


def _offer(provider: str, oid: str, gpu: str, n: int, per_gpu: float, **kw: Any) -> Offer:
    mem = float(gpu.rsplit("_", 1)[1].removesuffix("GB")) if "_" in gpu else 0.0
    return Offer(
        provider=provider,
        offer_id=oid,
        gpu=gpu,
        gpu_count=n,
        gpu_mem_gb=mem,
        usd_per_hour=per_gpu * max(n, 1),
        usd_per_gpu_hour=per_gpu,
        **kw,
    )


OFFERS = [
    _offer("vast", "1", "H100_80GB", 8, 2.10, tier="community", country="DE", reliability=0.97),
    _offer("prime", "a", "H100_80GB", 8, 2.40, tier="secure", region="us-east", stock="low"),
    _offer("runpod", "x", "A100_80GB", 4, 1.19, tier="secure", country="US", reliability=0.99),
    _offer("lambda", "gpu_1x_a10", "A10_24GB", 1, 0.75, tier="secure", region="us-west-1"),
    _offer("tensordock", "t", "RTX4090_24GB", 2, 0.35, tier="community", country="FR"),
    _offer("akash", "b", "A100_40GB", 1, 0.90, billing="bid", price_is_estimate=True),
    _offer("ionet", "p", "H100_80GB", 1, 1.99, billing="prepaid", min_hours=24, stock="none"),
    _offer("local", "local:vm", "cpu", 0, 0.0, billing="owned", region="local"),
]


def _ids(offers: list[Offer]) -> list[str]:
    return [f"{o.provider}:{o.offer_id}" for o in offers]


def test_gpu_names_are_canonical() -> None:
    assert canonical_gpu("NVIDIA H100 80GB HBM3") == "H100_80GB"
    assert canonical_gpu("H100 SXM", 80) == "H100_80GB"
    assert canonical_gpu("NVIDIA A100-SXM4-40GB") == "A100_40GB"
    assert canonical_gpu("RTX 4090", 24) == "RTX4090_24GB"
    assert canonical_gpu("NVIDIA RTX A6000", 47.99) == "A6000_48GB"
    assert canonical_gpu("Tesla T4", 15.1) == "T4_15GB"
    assert canonical_gpu("gpu_1x_a10") == "A10"
    assert canonical_gpu("Mystery GPU 12GB") == "MYSTERY_GPU_12GB"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"gpu": "h100"}, ["vast:1", "prime:a"]),  # ionet's has no stock
        ({"gpu": "H100_80GB", "in_stock": False}, ["ionet:p", "vast:1", "prime:a"]),
        ({"gpu": "cpu"}, ["local:local:vm"]),
        ({"count": 4}, ["runpod:x", "vast:1", "prime:a"]),
        ({"min_vram_gb": 41}, ["runpod:x", "vast:1", "prime:a"]),
        ({"tier": "community"}, ["tensordock:t", "vast:1"]),
        ({"region": "EU"}, ["tensordock:t", "vast:1"]),
        ({"region": "us-"}, ["lambda:gpu_1x_a10", "prime:a"]),
        ({"max_price": 1.0}, ["local:local:vm", "tensordock:t", "lambda:gpu_1x_a10", "akash:b"]),
        ({"providers": ["akash", "lambda"]}, ["lambda:gpu_1x_a10", "akash:b"]),
        ({"billing": ["bid", "prepaid"], "in_stock": False}, ["akash:b", "ionet:p"]),
    ],
)
def test_every_filter(query: dict[str, Any], expected: list[str]) -> None:
    assert _ids(choose(OFFERS, OfferQuery(**query))) == expected


def test_every_sort() -> None:
    q = OfferQuery(providers=["vast", "prime", "runpod", "lambda", "tensordock"])
    assert _ids(choose(OFFERS, q, by="price")) == [
        "tensordock:t", "lambda:gpu_1x_a10", "runpod:x", "vast:1", "prime:a"
    ]  # fmt: skip
    assert _ids(choose(OFFERS, q, by="price_per_gpu"))[0] == "tensordock:t"
    # per TFLOP: an H100 at 2.10/h beats an A100 at 1.19/h (989 vs 312 TFLOP/s)
    per_tflop = _ids(choose(OFFERS, q, by="price_per_tflop"))
    assert per_tflop.index("vast:1") < per_tflop.index("runpod:x")
    # reliability: known first, most reliable first; unknown last (by price)
    assert _ids(choose(OFFERS, q, by="reliability"))[:2] == ["runpod:x", "vast:1"]


def test_duplicates_keep_the_cheaper_then_the_fresher() -> None:
    a = _offer("vast", "1", "H100_80GB", 8, 2.10, fetched_at=1.0)
    b = _offer("vast", "1", "H100_80GB", 8, 2.00, fetched_at=0.5)
    c = _offer("vast", "1", "H100_80GB", 8, 2.00, fetched_at=2.0)
    [kept] = merge_duplicates([a, b, c])
    assert (kept.usd_per_gpu_hour, kept.fetched_at) == (2.00, 2.0)


class _Fake:
    """A provider we cannot reach from here, as the catalog sees it."""

    caps = frozenset({Cap.SPOT})

    def __init__(self, name: str, offers: list[Offer], *, fail: str = "", hang: bool = False):
        self.name, self._offers, self.fail, self.hang, self.asked = name, offers, fail, hang, 0

    async def offers(self, q: OfferQuery) -> list[Offer]:
        self.asked += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail:
            raise RuntimeError(self.fail)
        return list(self._offers)


def test_the_catalog_caches_and_lists_failed_providers(tmp_path: Path) -> None:
    good = _Fake("vast", OFFERS[:1])
    broken = _Fake("prime", OFFERS[1:2], fail="503 Service Unavailable")
    slow = _Fake("lambda", OFFERS[3:4], hang=True)
    cat = Catalog([good, broken, slow], tmp_path / "offers.json", ttl_s=60)  # type: ignore[list-item]

    async def main() -> None:
        t0 = time.monotonic()
        got = await cat.listing(timeout_s=0.5)
        assert time.monotonic() - t0 < 3  # the slow one does not hold up the rest
        assert _ids(got.offers) == ["vast:1"]
        by = {s.provider: s for s in got.sources}
        assert by["prime"].error == "RuntimeError: 503 Service Unavailable"
        assert by["lambda"].error == "no answer within 0.5 s"
        assert by["vast"].error is None and by["vast"].age_s == 0
        # within the TTL: from the cache, the good one not asked again, with its age
        again = await cat.listing(timeout_s=0.5)
        assert good.asked == 1 and _ids(again.offers) == ["vast:1"]
        assert {s.provider: s.cached for s in again.sources}["vast"]
        # refresh: asked again; a provider that fails later falls back to its last list
        good.fail = "timeout"
        stale = await cat.listing(refresh=True, timeout_s=0.5)
        assert good.asked == 2 and _ids(stale.offers) == ["vast:1"]
        src = {s.provider: s for s in stale.sources}["vast"]
        assert src.cached and src.error == "RuntimeError: timeout"

    asyncio.run(main())


def test_the_offers_command(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(sys.executable, "-m", "cotrain", "market", "offers"),
                *("--state-dir", str(tmp_path), *args),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    cp = run("--json")
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    assert [o["provider"] for o in got["offers"]] == ["local"]
    assert got["sources"] == [{"provider": "local", "offers": 1, "age_s": 0.0, "error": None}]
    cached = json.loads(run("--json").stdout)["sources"][0]
    assert cached["offers"] == 1 and cached["age_s"] >= 0
    assert (
        json.loads(run("--json", "--max-price", "0.5", "--region", "mars").stdout)["offers"] == []
    )
    for bad, why in ((("--secure", "--community"), "exclude"), (("--sort", "cost"), "--sort")):
        cp = run(*bad)
        assert cp.returncode == 2 and why in cp.stderr and "Traceback" not in cp.stderr, cp.stderr


def test_cost_per_token_weighs_compute_and_the_link() -> None:
    from cotrain.market.value import Workload, usd_per_mtoken, useful_tokens_per_s

    fast_slow_link = _offer("a", "1", "H100_80GB", 8, 2.0, net_up_mbps=50.0)
    slower_fast_link = _offer("b", "2", "A100_80GB", 8, 1.2, net_up_mbps=10_000.0)
    small = Workload(params=1.2e8, inner_steps=500, tokens_per_step=2**20)
    big = Workload(params=7e9, inner_steps=20)
    # a small model, large batches, rare syncs: the price per FLOP decides (H100: 3.2x the
    # FLOPs for 1.7x the price)
    ranked = choose([slower_fast_link, fast_slow_link], OfferQuery(), "cost_per_token", small)
    assert [o.provider for o in ranked] == ["a", "b"]
    # a 7B model synced often over 50 Mbit/s: the link dominates, the cheaper A100 box wins
    ranked = choose([slower_fast_link, fast_slow_link], OfferQuery(), "cost_per_token", big)
    assert [o.provider for o in ranked] == ["b", "a"]
    a_small, a_big = (usd_per_mtoken(fast_slow_link, w) for w in (small, big))
    assert a_small is not None and a_big is not None and a_big > 10 * a_small
    # a benchmark beats the datasheet; an unknown machine has no estimate and sorts last
    measured = _offer("c", "3", "cpu", 0, 0.05, measured_gflops=180.0)
    unknown = _offer("d", "4", "MYSTERY_16GB", 1, 0.01)
    tps = useful_tokens_per_s(measured, small)
    assert tps is not None and tps == pytest.approx(
        500 * 2**20 / (500 * 6 * 1.2e8 * 2**20 / (180e9 * 0.6) + 2 * 1.2e8 * 8 / 1e9)
    )
    assert useful_tokens_per_s(unknown, small) is None
    ranked = choose([unknown, measured, fast_slow_link], OfferQuery(), "cost_per_token", small)
    assert ranked[-1].provider == "d"
