"""The Akash adapter against a local server replaying the Console API (managed wallet) as its
documentation and schemas describe it: offers are bid estimates per GPU model and count (median
recent bid per GPU-hour, community tier), filters apply; a launch posts an SDL that runs the
start-up script on the offer's GPUs under a price cap, leases the cheapest open bid under it,
and goes from starting to running with the lease's ready replicas; no bid in the window closes
the deployment and is ``OutOfStock``; per-block prices convert at the documented block time;
the API's error shapes are one-line errors, and the key is in no error, repr or log line."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
from market_replays import serve
from market_replays.akash import CHEAPEST, KEY, SOLD_OUT, Replay

from cotrain.market import akash
from cotrain.market.akash import BLOCKS_PER_HOUR, AkashProvider, usd_per_hour
from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError

SPEC = LaunchSpec(coordinator="http://coord:8740", task="t3", invite="ab" * 16)


def fast(url: str, key: str = KEY, **kw: Any) -> AkashProvider:
    return AkashProvider(key, url=url, bid_window_s=0.05, bid_poll_s=0.01, **kw)


def test_per_block_prices_convert_to_dollars_an_hour() -> None:
    assert pytest.approx(3600 / 6.174) == BLOCKS_PER_HOUR
    assert usd_per_hour({"denom": "uact", "amount": "1000.5"}) == pytest.approx(
        1000.5 * BLOCKS_PER_HOUR / 1e6
    )
    usdc = "ibc/170C677610AC31DF0904FFE09CD3B5C657492170E7E52372E48756B71E56F2F1"
    assert usd_per_hour({"denom": usdc, "amount": "3430"}) == pytest.approx(2.0, rel=1e-3)
    assert usd_per_hour({"denom": "uakt", "amount": "3430"}) is None  # no AKT price here


@pytest.mark.timeout(60)
def test_offers_are_bid_estimates_per_model_and_count() -> None:
    replay = Replay()

    async def body(url: str) -> None:
        p = fast(url)
        offers = await p.offers(OfferQuery(in_stock=False))  # through one 429
        assert [c[1] for c in replay.calls] == ["/v1/gpu-prices"] * 2
        ids = [o.offer_id for o in offers]
        assert ids == [  # T4 (no recent bids) and the entry without a model are left out
            "nvidia:h100:80Gi:SXM5:1",
            "nvidia:h100:80Gi:SXM5:2",
            "nvidia:h100:80Gi:SXM5:4",
            "nvidia:h100:80Gi:SXM5:8",
            "nvidia:a100:80Gi:PCIe:1",
            "nvidia:a100:80Gi:PCIe:2",
            "nvidia:a100:80Gi:PCIe:4",  # 6 free: no x8
            SOLD_OUT,  # one free RTX 4090
            "nvidia:rtxa6000:48Gi:PCIe:1",
        ]
        by = {o.offer_id: o for o in offers}
        h8 = by["nvidia:h100:80Gi:SXM5:8"]
        assert (h8.gpu, h8.gpu_count, h8.gpu_mem_gb, h8.interconnect) == (
            "H100_80GB",
            8,
            80,
            "SXM5",
        )
        assert (h8.billing, h8.price_is_estimate, h8.tier) == ("bid", True, "community")
        assert h8.usd_per_gpu_hour == 1.85 and h8.usd_per_hour == pytest.approx(14.8)
        assert h8.stock == "unknown"  # 24 free GPUs, but 8 on one machine is a provider's say
        assert by["nvidia:h100:80Gi:SXM5:1"].stock == "available"
        a6000 = by["nvidia:rtxa6000:48Gi:PCIe:1"]
        assert (a6000.gpu, a6000.stock) == ("A6000_48GB", "none")
        assert all(
            o.usd_per_gpu_hour * o.gpu_count == pytest.approx(o.usd_per_hour) for o in offers
        )
        assert all(o.fetched_at > 0 and o.min_hours == 0 for o in offers)

        assert "nvidia:rtxa6000:48Gi:PCIe:1" not in {
            o.offer_id for o in await p.offers(OfferQuery())
        }
        got = await p.offers(OfferQuery(gpu="A100", count=2))
        assert [o.offer_id for o in got] == ["nvidia:a100:80Gi:PCIe:2", "nvidia:a100:80Gi:PCIe:4"]
        got = await p.offers(OfferQuery(max_price=1.0, billing=["bid"]))
        assert [o.offer_id for o in got] == [SOLD_OUT]
        assert await p.offers(OfferQuery(billing=["on_demand"])) == []
        assert await p.offers(OfferQuery(tier="secure")) == []

    serve(replay, body)


@pytest.mark.timeout(60)
def test_launch_posts_an_sdl_and_leases_the_cheapest_open_bid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    yaml = pytest.importorskip("yaml")  # only to read the SDL back as YAML
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> None:
        p = fast(url)
        offer = next(o for o in await p.offers(OfferQuery()) if o.offer_id.endswith("SXM5:8"))
        spec = SPEC.model_copy(update={"max_hours": 2.5})
        inst = await p.launch(offer, spec)
        create, bids, lease = replay.calls[-3:]
        assert (create[:2], bids[:2], lease[:2]) == (
            ("POST", "/v1/deployments"),
            ("GET", "/v1/bids"),
            ("POST", "/v1/leases"),
        )
        data = create[2]["data"]
        assert (data["deposit"], data["runtimeLimitHours"]) == (5.0, 3)
        sdl = yaml.safe_load(data["sdl"])
        service = sdl["services"]["cotrain"]
        assert service["command"] == ["bash", "-c"]
        (script,) = service["args"]
        assert "cotrain node --coordinator http://coord:8740 --task t3 --invite" in script
        assert script.endswith("& wait")
        assert "COTRAIN_TASK=t3" in service["env"]
        res = sdl["profiles"]["compute"]["cotrain"]["resources"]
        assert res["gpu"]["units"] == 8
        assert res["gpu"]["attributes"]["vendor"]["nvidia"] == [
            {"model": "h100", "ram": "80Gi", "interface": "sxm"}
        ]
        assert (res["cpu"]["units"], res["memory"]["size"]) == (64, "256Gi")
        cap = sdl["profiles"]["placement"]["akash"]["pricing"]["cotrain"]
        assert cap["denom"] == "uact"
        assert cap["amount"] == math.ceil(14.8 * 1.5 * 1e6 / BLOCKS_PER_HOUR)  # 1.5 x estimate
        assert sdl["deployment"]["cotrain"]["akash"] == {"profile": "cotrain", "count": 1}

        # the cheapest *open* bid (a withdrawn one is cheaper), with the deployment's manifest
        dseq = bids[2]["dseq"]
        assert lease[2]["leases"] == [{"dseq": dseq, "gseq": 1, "oseq": 1, "provider": CHEAPEST}]
        assert (
            "cotrain node --coordinator"
            in json.loads(lease[2]["manifest"])[0]["services"][0]["args"][0]
        )
        price = usd_per_hour(replay.deployments[dseq]["leases"][0]["price"])
        assert price == pytest.approx(0.71 * cap["amount"] * BLOCKS_PER_HOUR / 1e6)
        assert (inst.instance_id, inst.state, inst.usd_per_hour) == (dseq, "starting", price)
        assert inst.usd_per_hour < offer.usd_per_hour * 1.5

        first = await p.status(dseq)
        assert (first.state, first.task, first.offer_id) == ("starting", "t3", offer.offer_id)
        assert first.detail == "no ready replicas: cotrain"
        second = await p.status(dseq)
        assert (second.state, second.host, second.usd_per_hour) == (
            "running",
            "provider.gpu.example.net",
            pytest.approx(price),
        )

        monkeypatch.setattr(akash, "PAGE_SIZE", 1)  # the earlier deployment is on another page
        listed = {i.instance_id: i.state for i in await p.instances()}
        assert listed == {"21873311": "terminated", dseq: "running"}
        skips = [c[2]["skip"] for c in replay.calls if c[1] == "/v1/deployments" and c[0] == "GET"]
        assert skips == ["0", "1"]
        await p.terminate(dseq)
        assert (await p.status(dseq)).state == "terminated"
        assert {i.instance_id: i.state for i in await p.instances()}[dseq] == "terminated"

    serve(replay, body)


@pytest.mark.timeout(60)
def test_no_bid_in_the_window_closes_the_deployment_and_is_out_of_stock() -> None:
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> None:
        p = fast(url)
        sold = next(o for o in await p.offers(OfferQuery()) if o.offer_id == SOLD_OUT)
        with pytest.raises(OutOfStock, match=f"no bid at most .* for {SOLD_OUT} within 0.05 s"):
            await p.launch(sold, SPEC)
        dseq = next(c[2]["dseq"] for c in replay.calls if c[1] == "/v1/bids")
        assert replay.calls[-1] == ("DELETE", f"/v1/deployments/{dseq}", None)
        assert replay.deployments[dseq]["state"] == "closed"
        assert not any(c[1] == "/v1/leases" for c in replay.calls)
        assert "runtimeLimitHours" not in replay.calls[1][2]["data"]  # no max_hours: none

    serve(replay, body)


@pytest.mark.timeout(60)
def test_errors_are_one_line_and_never_show_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> list[str]:
        p = fast(url)
        texts = [repr(p)]
        with pytest.raises(ProviderError, match="no deployment 999: Deployment not found") as e:
            await p.status("999")
        texts.append(str(e.value))
        replay.refuse_create = f"Insufficient balance\n(key {KEY})"
        offer = (await p.offers(OfferQuery()))[0]
        with pytest.raises(ProviderError) as e:
            await p.launch(offer, SPEC)
        assert not isinstance(e.value, OutOfStock)
        assert str(e.value) == "akash: POST /v1/deployments: 400 Insufficient balance (key <key>)"
        texts.append(str(e.value))
        with pytest.raises(ProviderError, match="not an Akash offer id"):
            await p.launch(offer.model_copy(update={"offer_id": "7000123"}), SPEC)
        wrong = fast(url, key="ak-wrong-" + KEY[::-1])
        with pytest.raises(
            ProviderError, match=r"the API key was refused \(401\): Invalid API key"
        ) as e:
            await wrong.offers(OfferQuery())  # the public route refuses a bad key too
        texts += [str(e.value), repr(wrong)]
        return texts

    texts = serve(replay, body)
    assert all("\n" not in text for text in texts)
    for text in [*texts, caplog.text]:
        assert KEY not in text and KEY[::-1] not in text
