"""The Lambda Cloud adapter against a local server replaying responses written from Lambda's
OpenAPI documentation: one offer per instance type and region with capacity (types with none
listed as out of stock), canonical GPUs and per-GPU prices, filters applied, a launch that
carries the offer's type and region, an SSH key and the start-up script as cloud-init user
data, the launch rate limit waited out, and Lambda's ``{"error": {code, message}}`` shapes as
one-line errors without the key."""

from __future__ import annotations

import json
import logging

import pytest
from market_replays import serve
from market_replays.lambda_cloud import KEY, SOLD_OUT, Replay

from cotrain.market.lambda_cloud import LambdaProvider
from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError

SPEC = LaunchSpec(coordinator="http://coord:8740", task="t3", invite="ab" * 16)


@pytest.mark.timeout(60)
def test_an_offer_per_type_and_region_normalized_and_filtered() -> None:
    replay = Replay()

    async def body(url: str) -> None:
        lam = LambdaProvider(KEY, url=url)
        offers = await lam.offers(OfferQuery(in_stock=False))  # through one 429
        assert [c[1] for c in replay.calls] == ["instance-types", "instance-types"]
        by = {o.offer_id: o for o in offers}
        assert list(by) == [  # the malformed type is skipped
            "gpu_8x_h100_sxm5@us-east-1",
            "gpu_8x_h100_sxm5@europe-central-1",
            SOLD_OUT,
            "gpu_1x_a100_sxm4",
            "gpu_1x_gh200",
        ]
        h100 = by["gpu_8x_h100_sxm5@us-east-1"]
        assert (h100.gpu, h100.gpu_count, h100.gpu_mem_gb, h100.interconnect) == (
            "H100_80GB",
            8,
            80,
            "SXM5",
        )
        assert h100.usd_per_hour == 23.92 and h100.usd_per_gpu_hour == pytest.approx(2.99)
        assert (h100.tier, h100.billing, h100.stock) == ("secure", "on_demand", "available")
        assert (h100.region, h100.country, h100.datacenter) == ("us-east-1", "US", "Virginia, USA")
        assert (h100.vcpus, h100.ram_gb, h100.disk_gb) == (208, 1800, 22000)
        eu = by["gpu_8x_h100_sxm5@europe-central-1"]
        assert (eu.country, eu.datacenter) == (None, "Frankfurt, Germany")
        a10 = by[SOLD_OUT]
        assert (a10.gpu, a10.usd_per_hour, a10.region) == ("A10_24GB", 0.75, "us-west-1")
        for none in ("gpu_1x_a100_sxm4", "gpu_1x_gh200"):
            assert (by[none].stock, by[none].region) == ("none", None)
        assert (by["gpu_1x_a100_sxm4"].gpu, by["gpu_1x_gh200"].gpu) == ("A100_40GB", "GH200_96GB")

        queries = {
            "in stock": OfferQuery(),
            "A10": OfferQuery(gpu="A10"),
            "A100 too": OfferQuery(gpu="A100", in_stock=False),
            "8 GPUs": OfferQuery(count=8),
            "EU": OfferQuery(region="EU"),
            "Germany": OfferQuery(region="germany"),
            "cheap": OfferQuery(max_price=1.0),
            "community": OfferQuery(tier="community"),
        }
        got = {k: [o.offer_id for o in await lam.offers(q)] for k, q in queries.items()}
        assert got == {
            "in stock": list(by)[:3],
            "A10": [SOLD_OUT],
            "A100 too": ["gpu_1x_a100_sxm4"],
            "8 GPUs": list(by)[:2],
            "EU": ["gpu_8x_h100_sxm5@europe-central-1"],
            "Germany": ["gpu_8x_h100_sxm5@europe-central-1"],
            "cheap": [SOLD_OUT],
            "community": [],
        }

    serve(replay, body)


@pytest.mark.timeout(60)
def test_launch_body_status_and_terminate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> None:
        lam = LambdaProvider(KEY, url=url)
        offer = (await lam.offers(OfferQuery(gpu="H100", region="us-east")))[0]
        inst = await lam.launch(offer, SPEC)
        assert [c[1] for c in replay.calls[-2:]] == ["ssh-keys", "launch"]  # its first key
        sent = replay.calls[-1][2]
        assert {k: v for k, v in sent.items() if k != "user_data"} == {
            "region_name": "us-east-1",
            "instance_type_name": "gpu_8x_h100_sxm5",
            "ssh_key_names": ["cotrain-ci"],
            "quantity": 1,
            "name": "cotrain:t3",
        }
        assert sent["user_data"].startswith("#!/bin/bash\n")
        assert "cotrain node --coordinator http://coord:8740 --task t3" in sent["user_data"]
        assert (inst.offer_id, inst.state, inst.usd_per_hour, inst.task) == (
            offer.offer_id,
            "starting",
            23.92,
            "t3",
        )
        first = await lam.status(inst.instance_id)
        assert (first.state, first.host, first.offer_id) == ("starting", None, offer.offer_id)
        second = await lam.status(inst.instance_id)
        assert (second.state, second.host, second.task, second.usd_per_hour) == (
            "running",
            "192.0.2.41",
            "t3",
            23.92,
        )
        assert [i.state for i in await lam.instances()] == ["running"]
        await lam.terminate(inst.instance_id)
        assert replay.calls[-1] == ("POST", "terminate", {"instance_ids": [inst.instance_id]})
        assert [i.state for i in await lam.instances()] == ["terminated"]
        with pytest.raises(ProviderError, match=r"^lambda: no instance nope$"):
            await lam.status("nope")

        named = LambdaProvider(KEY, url=url, ssh_key="cotrain-ci")
        n = len(replay.calls)
        await named.launch(offer, SPEC)
        assert [c[1] for c in replay.calls[n:]] == ["launch"]  # no key look-up
        unknown = LambdaProvider(KEY, url=url, ssh_key="laptop")
        with pytest.raises(
            ProviderError,
            match="global/invalid-parameters: Invalid request data. "
            r"\(ssh_key_names: Exactly one existing SSH key name must be given.\)",
        ):
            await unknown.launch(offer, SPEC)
        n = len(replay.calls)
        nowhere = next(o for o in await lam.offers(OfferQuery(in_stock=False)) if not o.region)
        with pytest.raises(OutOfStock, match="has no capacity in any region"):
            await lam.launch(nowhere, SPEC)
        assert [c[1] for c in replay.calls[n:]] == ["instance-types"]  # no launch was asked

    serve(replay, body)
    assert KEY not in json.dumps(replay.calls) and KEY not in caplog.text


@pytest.mark.timeout(60)
def test_the_launch_rate_limit_is_waited_out() -> None:
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> None:
        # Retry-After given: the HTTP client waits it out.
        lam = LambdaProvider(KEY, url=url, ssh_key="cotrain-ci", launch_wait_s=0)
        offer = (await lam.offers(OfferQuery(count=8)))[0]
        replay.rate_limit_launches = 2
        await lam.launch(offer, SPEC)
        assert [c[1] for c in replay.calls].count("launch") == 3
        # No Retry-After: the adapter waits one launch interval (here 0 s) between tries.
        replay.launch_retry_after = None
        replay.rate_limit_launches = 3
        bare = LambdaProvider(KEY, url=url, ssh_key="cotrain-ci", launch_wait_s=0, retries_429=0)
        await bare.launch(offer, SPEC)
        assert [c[1] for c in replay.calls].count("launch") == 7
        replay.rate_limit_launches = 100
        with pytest.raises(ProviderError, match="still rate limited after 4 tries"):
            await bare.launch(offer, SPEC)
        assert len(replay.instances) == 2

    serve(replay, body)


@pytest.mark.timeout(60)
def test_lambda_errors_are_one_line_and_keyless(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> list[str]:
        lam = LambdaProvider(KEY, url=url, ssh_key="cotrain-ci")
        sold = next(o for o in await lam.offers(OfferQuery()) if o.offer_id == SOLD_OUT)
        with pytest.raises(
            OutOfStock,
            match=f"^lambda: {SOLD_OUT} is sold out: Not enough capacity to fulfill launch",
        ) as e1:
            await lam.launch(sold, SPEC)
        wrong = LambdaProvider("secret_wrong.key", url=url)
        with pytest.raises(
            ProviderError,
            match=r"API key was refused \(401\): API key was invalid, expired, or deleted",
        ) as e2:
            await wrong.offers(OfferQuery())
        with pytest.raises(ProviderError, match="global/object-does-not-exist") as e3:
            await lam.terminate("nope")
        replay.rate_limit_once = True
        impatient = LambdaProvider(KEY, url=url, retries_429=0)
        with pytest.raises(ProviderError, match=r"^lambda: rate limited \(429\)") as e4:
            await impatient.offers(OfferQuery())
        return [*(str(e.value) for e in (e1, e2, e3, e4)), repr(lam), repr(wrong)]

    texts = serve(replay, body)
    for text in texts:
        assert "\n" not in text
    for text in [*texts, caplog.text, json.dumps(replay.calls)]:
        assert KEY not in text and "secret_wrong.key" not in text
