"""The io.net adapter against a local server replaying the IO Cloud container API (CaaS) as its
OpenAPI reference describes it: offers are prepaid (one-hour quotes, fees included, a minimum
of one hour) per hardware, GPU count and location with free replicas, filters apply; a launch
deploys a container whose entrypoint runs the start-up script for the prepaid hours, and goes
from starting to running when its container runs; a deploy refused for capacity is
``OutOfStock``, one refused for the balance is not; deployments are listed across pages;
FastAPI's error shapes are one-line errors, and the key is in no error, repr or log line."""

from __future__ import annotations

import json
import logging

import pytest
from market_replays import serve
from market_replays.ionet import KEY, SOLD_OUT, Replay, quote

from cotrain.market import ionet
from cotrain.market.ionet import IoNetProvider
from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError

SPEC = LaunchSpec(coordinator="http://coord:8740", task="t3", invite="ab" * 16)


@pytest.mark.timeout(60)
def test_offers_are_prepaid_quotes_per_hardware_count_and_location() -> None:
    replay = Replay()

    async def body(url: str) -> None:
        p = IoNetProvider(KEY, url=url)
        offers = await p.offers(OfferQuery(in_stock=False))  # through one 429
        assert [c[1] for c in replay.calls[:2]] == ["hardware", "hardware"]
        # the A100 (none free) and the malformed entry are not asked about; nor are counts
        # above a hardware's most GPUs a container
        asked = sorted(
            (int(c[2]["hardware_id"]), int(c[2]["hardware_qty"]))
            for c in replay.calls
            if c[1] == "available-replicas"
        )
        assert asked == [(31, 1), (31, 2), (206, 1), (206, 2), (206, 4), (206, 8)]
        # one quote per hardware and count with free replicas, not one per location
        quotes = [c[2] for c in replay.calls if c[1] == "price"]
        assert len(quotes) == 4
        assert all(q["duration_hours"] == "1" and q["currency"] == "usdc" for q in quotes)
        assert all(json.loads(q["location_ids"]) == [4] for q in quotes)
        assert sorted(o.offer_id for o in offers) == sorted(
            ["206:1:4", "206:1:9", "206:2:4", "206:2:9", "206:4:4", SOLD_OUT]
        )
        by = {o.offer_id: o for o in offers}
        h2 = by["206:2:9"]
        total = quote(206, 2, 1)["total_cost_usdc"]
        assert total == pytest.approx(2.19 * 2 * 1.025)  # their 2.5 % fee included
        assert (h2.gpu, h2.gpu_count, h2.gpu_mem_gb) == ("H100_80GB", 2, 80)
        assert (h2.billing, h2.min_hours, h2.price_is_estimate) == ("prepaid", 1.0, False)
        assert (h2.usd_per_hour, h2.usd_per_gpu_hour) == (
            pytest.approx(total),
            pytest.approx(total / 2),
        )
        assert (h2.country, h2.region, h2.tier, h2.stock) == ("DE", "Germany", "community", "low")
        rtx = by[SOLD_OUT]
        assert (rtx.gpu, rtx.country, rtx.stock) == ("RTX4090_24GB", "US", "available")
        assert rtx.usd_per_hour == pytest.approx(0.35 * 1.025)

        got = await p.offers(OfferQuery(region="EU", gpu="H100"))
        assert sorted(o.offer_id for o in got) == ["206:1:9", "206:2:9"]
        got = await p.offers(OfferQuery(max_price=1.0, billing=["prepaid"]))
        assert [o.offer_id for o in got] == [SOLD_OUT]
        assert await p.offers(OfferQuery(count=8)) == []

    serve(replay, body)


@pytest.mark.timeout(60)
def test_launch_deploys_the_start_up_script_for_the_prepaid_hours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> None:
        p = IoNetProvider(KEY, url=url)
        offer = next(o for o in await p.offers(OfferQuery()) if o.offer_id == "206:2:9")
        inst = await p.launch(offer, SPEC.model_copy(update={"max_hours": 2.5}))
        method, what, sent = replay.calls[-1]
        assert (method, what) == ("POST", "deploy")
        assert (sent["hardware_id"], sent["gpus_per_container"], sent["location_ids"]) == (
            206,
            2,
            [9],
        )
        assert (sent["duration_hours"], sent["resource_private_name"]) == (3, "cotrain-t3")
        config = sent["container_config"]
        assert config["replica_count"] == 1 and config["traffic_port"] == 8080
        assert config["env_variables"] == {"COTRAIN_TASK": "t3", "COTRAIN_OFFER": "206:2:9"}
        shell, flag, script = config["entrypoint"]
        assert (shell, flag) == ("/bin/bash", "-c")
        assert "cotrain node --coordinator http://coord:8740 --task t3 --invite" in script
        assert script.endswith("exec python3 -m http.server 8080 --directory /tmp/cotrain-www")
        assert sent["registry_config"] == {"image_url": p.image}
        assert (inst.state, inst.task, inst.usd_per_hour) == ("starting", "t3", offer.usd_per_hour)

        first = await p.status(inst.instance_id)
        assert (first.state, first.detail, first.task, first.offer_id) == (
            "starting", "deploying", "t3", "206:2:9"
        )  # fmt: skip
        second = await p.status(inst.instance_id)
        assert (second.state, second.host) == (
            "running",
            f"https://{inst.instance_id[:8]}.headless.io.systems",
        )
        # what was paid, over the hours bought
        assert second.usd_per_hour == pytest.approx(quote(206, 2, 3)["total_cost_usdc"] / 3)
        assert second.started_at > 0

        monkeypatch.setattr(ionet, "PAGE_SIZE", 1)  # the earlier deployment is another page
        listed = {i.instance_id: (i.state, i.task) for i in await p.instances()}
        assert listed == {
            "0b5e11c2-6d1f-4a8e-9c3d-2f7a8b9c0d1e": ("exited", None),
            inst.instance_id: ("running", "t3"),
        }
        pages = [c[2]["page"] for c in replay.calls if c[1] == "deployments"]
        assert pages == ["1", "2"]
        await p.terminate(inst.instance_id)
        assert (await p.status(inst.instance_id)).state == "terminated"

        spec = SPEC.model_copy(update={"max_hours": None})
        await p.launch(offer, spec)
        assert replay.calls[-1][2]["duration_hours"] == 24  # the adapter's default prepay

    serve(replay, body)


@pytest.mark.timeout(60)
def test_capacity_refusal_is_out_of_stock_and_a_balance_refusal_is_not() -> None:
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> None:
        p = IoNetProvider(KEY, url=url)
        offers = {o.offer_id: o for o in await p.offers(OfferQuery())}
        with pytest.raises(OutOfStock, match=r"no capacity for this offer now \(400\): Not enough"):
            await p.launch(offers[SOLD_OUT], SPEC)
        replay.balance_usdc = 5.0
        with pytest.raises(ProviderError, match="400 Insufficient balance") as e:
            await p.launch(offers["206:1:4"], SPEC)
        assert not isinstance(e.value, OutOfStock)
        with pytest.raises(ProviderError, match=r"not an io\.net offer id"):
            await p.launch(offers["206:1:4"].model_copy(update={"offer_id": "h100"}), SPEC)

    serve(replay, body)


@pytest.mark.timeout(60)
def test_errors_are_one_line_and_never_show_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> list[str]:
        p = IoNetProvider(KEY, url=url)
        texts = [repr(p)]
        with pytest.raises(ProviderError, match="no deployment nope: Deployment not found") as e:
            await p.status("nope")
        texts.append(str(e.value))
        with pytest.raises(ProviderError) as e:  # FastAPI's validation error, as one line
            await p._quote(206, 16, 4, 1)
        assert str(e.value) == (
            "ionet: GET /enterprise/v1/io-cloud/caas/price: 422 "
            "gpus_per_container: Input should be less than or equal to 8"
        )
        texts.append(str(e.value))
        wrong = IoNetProvider("io-wrong-" + KEY[::-1], url=url)
        with pytest.raises(ProviderError, match=r"the API key was refused \(401\): Invalid") as e:
            await wrong.offers(OfferQuery())
        texts += [str(e.value), repr(wrong)]
        inst = await p.launch((await p.offers(OfferQuery()))[0], SPEC)
        await p.terminate(inst.instance_id)
        return texts

    texts = serve(replay, body)
    assert all("\n" not in text for text in texts)
    for text in [*texts, caplog.text]:
        assert KEY not in text and KEY[::-1] not in text
    assert "ionet: deployment" in caplog.text
