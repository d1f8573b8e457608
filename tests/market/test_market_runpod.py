"""The RunPod adapter against a local server replaying RunPod's documented GraphQL API: offers
per GPU type, cloud, count and billing (prices, tier, stock, filters), the launch mutations and
what they carry (the offer id, the start-up script, the bid), pod states, GraphQL errors in
HTTP 200 answers mapped to one-line errors, and the key kept in a header, out of every URL,
message, repr and log line."""

from __future__ import annotations

import logging
import shlex

import pytest
from market_replays import serve
from market_replays.runpod import KEY, SOLD_OUT, SOLD_OUT_MESSAGE, Replay

from cotrain.market.offers import OfferQuery, canonical_gpu
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError, onstart_script
from cotrain.market.runpod import RunPodProvider, parse_offer_id

SPEC = LaunchSpec(coordinator="http://coord.example:8740", task="t3", invite="ab" * 16)
ALL = OfferQuery(in_stock=False)


def fresh() -> Replay:
    replay = Replay()
    replay.rate_limit_once = False
    return replay


@pytest.mark.timeout(60)
def test_offers_are_one_per_type_cloud_count_and_billing() -> None:
    replay = fresh()

    async def body(url: str) -> None:
        rp = RunPodProvider(KEY, url=url)
        every = {o.offer_id: o for o in await rp.offers(ALL)}
        # one query for everything: a lowestPrice per cloud and count, as variables
        assert [c[1] for c in replay.calls] == ["gpuTypes"]
        assert replay.calls[0][2]["secure8"] == {"gpuCount": 8, "secureCloud": True}
        assert replay.calls[0][2]["community1"] == {"gpuCount": 1, "secureCloud": False}

        h100 = every["NVIDIA H100 80GB HBM3|SECURE|8|on_demand"]
        assert (h100.gpu, h100.gpu_count, h100.gpu_mem_gb, h100.tier) == (
            "H100_80GB",
            8,
            80,
            "secure",
        )
        assert (h100.usd_per_gpu_hour, h100.usd_per_hour) == (2.99, pytest.approx(23.92))
        assert (h100.vcpus, h100.ram_gb, h100.disk_gb, h100.stock) == (160, 1000, 40, "low")
        assert (h100.billing, h100.region, h100.country) == ("on_demand", None, None)
        spot = every["NVIDIA H100 80GB HBM3|SECURE|8|spot"]
        assert (spot.billing, spot.usd_per_gpu_hour, spot.usd_per_hour) == ("spot", 1.75, 14.0)
        # the live lowestPrice for that cloud and count wins over the type's list price (0.34)
        rtx = every["NVIDIA GeForce RTX 4090|COMMUNITY|1|on_demand"]
        assert (rtx.gpu, rtx.tier, rtx.usd_per_gpu_hour, rtx.stock) == (
            "RTX4090_24GB", "community", 0.31, "available"
        )  # fmt: skip
        assert every["NVIDIA GeForce RTX 4090|COMMUNITY|1|spot"].usd_per_gpu_hour == 0.18
        # no machine with that count now: listed with stock "none", at the list price
        none = every["NVIDIA GeForce RTX 4090|COMMUNITY|8|on_demand"]
        assert (none.stock, none.usd_per_gpu_hour) == ("none", 0.34)
        # A100: secure cloud only, up to 4 GPUs, no spot price
        a100 = {i for i in every if i.startswith("NVIDIA A100")}
        assert a100 == {f"NVIDIA A100 80GB PCIe|SECURE|{n}|on_demand" for n in (1, 2, 4)}
        assert {o.gpu for o in every.values()} == {"H100_80GB", "RTX4090_24GB", "A100_80GB"}
        for o in every.values():  # the offer id names what the launch asks for
            gpu, cloud, n, billing = parse_offer_id(o.offer_id)
            assert (canonical_gpu(gpu, o.gpu_mem_gb), cloud.lower(), n, billing) == (
                o.gpu, o.tier, o.gpu_count, o.billing
            )  # fmt: skip
            assert o.usd_per_hour == pytest.approx(o.usd_per_gpu_hour * n)

        in_stock = await rp.offers(OfferQuery())
        assert in_stock and all(o.stock != "none" for o in in_stock)
        assert len(in_stock) < len(every)
        cheap = await rp.offers(OfferQuery(gpu="RTX4090", tier="community", billing=["spot"]))
        assert [o.offer_id for o in cheap] == [
            "NVIDIA GeForce RTX 4090|COMMUNITY|1|spot",
            "NVIDIA GeForce RTX 4090|COMMUNITY|2|spot",
        ]
        big = await rp.offers(OfferQuery(gpu="H100_80GB", count=8, max_price=2.0))
        assert [o.offer_id for o in big] == ["NVIDIA H100 80GB HBM3|SECURE|8|spot"]
        assert await rp.offers(OfferQuery(region="US")) == []  # RunPod offers name no region

    serve(replay, body)


@pytest.mark.timeout(60)
def test_launch_sends_the_offer_and_the_start_up_script(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = fresh()

    async def body(url: str) -> None:
        rp = RunPodProvider(KEY, url=url, image="runpod/pytorch:test", disk_gb=60)
        every = {o.offer_id: o for o in await rp.offers(ALL)}
        offer = every["NVIDIA H100 80GB HBM3|SECURE|8|on_demand"]
        inst = await rp.launch(offer, SPEC)
        _, field, variables = replay.calls[-1]
        inp = variables["input"]
        assert field == "podFindAndDeployOnDemand" and "bidPerGpu" not in inp
        assert (inp["gpuTypeId"], inp["cloudType"], inp["gpuCount"]) == (
            "NVIDIA H100 80GB HBM3", "SECURE", 8
        )  # fmt: skip
        assert (inp["imageName"], inp["containerDiskInGb"], inp["name"]) == (
            "runpod/pytorch:test", 60, "cotrain:t3"
        )  # fmt: skip
        assert shlex.split(inp["dockerArgs"]) == [
            "bash",
            "-c",
            f"{onstart_script(SPEC)} sleep infinity",
        ]
        assert {"key": "COTRAIN_TASK", "value": "t3"} in inp["env"]
        assert (inst.offer_id, inst.state, inst.task) == (offer.offer_id, "starting", "t3")
        assert inst.usd_per_hour == pytest.approx(23.92)

        got = await rp.status(inst.instance_id)  # RUNNING, but no runtime yet
        assert (got.state, got.host, got.task) == ("starting", None, "t3")
        assert "container not up yet" in got.detail
        got = await rp.status(inst.instance_id)
        assert (got.state, got.host, got.detail) == ("running", "203.0.113.24", "RUNNING")
        assert got.started_at > 0

        spot_offer = every["NVIDIA GeForce RTX 4090|COMMUNITY|1|spot"]
        spot = await rp.launch(spot_offer, SPEC)
        _, field, variables = replay.calls[-1]
        assert field == "podRentInterruptable" and variables["input"]["bidPerGpu"] == 0.18
        assert spot.usd_per_hour == pytest.approx(0.18)

        assert {i.instance_id: i.state for i in await rp.instances()} == {
            inst.instance_id: "running", spot.instance_id: "starting"
        }  # fmt: skip
        await rp.terminate(inst.instance_id)
        assert [i.instance_id for i in await rp.instances()] == [spot.instance_id]
        with pytest.raises(ProviderError, match=f"no pod {inst.instance_id}"):
            await rp.status(inst.instance_id)

    serve(replay, body)
    # the key travelled in the Authorization header, never in a URL
    assert replay.urls and all("api_key" not in u and KEY not in u for u in replay.urls)
    assert KEY not in caplog.text


@pytest.mark.timeout(60)
def test_graphql_errors_are_one_line_provider_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = fresh()

    async def body(url: str) -> list[str]:
        rp = RunPodProvider(KEY, url=url)
        every = {o.offer_id: o for o in await rp.offers(ALL)}
        with pytest.raises(OutOfStock) as sold:  # HTTP 200 with RunPod's sold-out error
            await rp.launch(every[SOLD_OUT], SPEC)
        assert str(sold.value) == f"runpod: offer {SOLD_OUT}: {SOLD_OUT_MESSAGE}"
        gone = every["NVIDIA GeForce RTX 4090|COMMUNITY|8|on_demand"]  # stock none
        with pytest.raises(OutOfStock, match="no longer any instances"):
            await rp.launch(gone, SPEC)
        with pytest.raises(ProviderError, match="not a RunPod offer id"):
            await rp.launch(every[SOLD_OUT].model_copy(update={"offer_id": "7000123"}), SPEC)

        wrong = RunPodProvider("rpa_WRONG" + KEY[::-1], url=url)
        with pytest.raises(ProviderError, match="the API key was refused") as refused:
            await wrong.offers(ALL)
        assert not isinstance(refused.value, OutOfStock)
        with pytest.raises(ProviderError, match="the API key was refused"):
            await wrong.status("bq8sx1d4m00000")

        # a 429 that does not end: named, after the retries
        replay.rate_limit_once = True
        patient = RunPodProvider(KEY, url=url, retries_429=0)
        with pytest.raises(ProviderError, match=r"rate limited \(429\)"):
            await patient.offers(ALL)
        texts = [str(sold.value), str(refused.value), repr(rp), repr(wrong)]
        assert all("\n" not in t for t in texts)
        return texts

    texts = serve(replay, body)
    for text in [*texts, caplog.text]:
        assert KEY not in text and KEY[::-1] not in text


def test_offer_ids_round_trip() -> None:
    assert parse_offer_id("NVIDIA H100 80GB HBM3|SECURE|8|on_demand") == (
        "NVIDIA H100 80GB HBM3", "SECURE", 8, "on_demand"
    )  # fmt: skip
    assert parse_offer_id("NVIDIA A40|COMMUNITY|2|spot")[3] == "spot"
    for bad in ("", "NVIDIA A40|SECURE|x|spot", "NVIDIA A40|ALL|1|spot", "A40|SECURE|1|bid"):
        with pytest.raises(ProviderError, match="not a RunPod offer id"):
            parse_offer_id(bad)
    assert KEY not in repr(RunPodProvider(KEY))
