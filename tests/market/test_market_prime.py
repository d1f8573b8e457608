"""The Prime Intellect adapter against a local server replaying responses written from Prime's
API documentation and the prime CLI: offers read from every page and normalized (canonical GPU,
whole-machine and per-GPU price, tier, spot, stock, the upstream provider and data center),
filters applied, a launch body that carries the offer id's fields and the start-up script,
pods listed across pages, and Prime's error shapes as one-line errors without the key."""

from __future__ import annotations

import json
import logging

import pytest
from market_replays import serve
from market_replays.prime import KEY, SOLD_OUT, Replay

from cotrain.market.offers import OfferQuery
from cotrain.market.prime import PrimeProvider, offer_id_of, parse_offer_id
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError

SPEC = LaunchSpec(coordinator="http://coord:8740", task="t3", invite="ab" * 16)


@pytest.mark.timeout(60)
def test_offers_from_every_page_normalized_and_filtered() -> None:
    replay = Replay()

    async def body(url: str) -> None:
        prime = PrimeProvider(KEY, url=url)
        offers = await prime.offers(OfferQuery(in_stock=False))  # through one 429
        pages = [c[2]["page"] for c in replay.calls if c[1] == "availability"]
        assert pages == ["1", "1", "2", "3", "4"]  # the 429, then all four pages of two
        assert {c[2]["page_size"] for c in replay.calls} == {"100"}
        by = {o.datacenter: o for o in offers}
        assert list(by) == [  # the euro-priced and the malformed entries are skipped
            "hyperstack/CANADA-1",
            "runpod/US-KS-2",
            "runpod/EU-SE-1",
            "datacrunch/FIN-01",
            "lambdalabs/us-east-1",
            "primecompute/US-TX-1",
        ]
        hs = by["hyperstack/CANADA-1"]
        assert (hs.gpu, hs.gpu_count, hs.gpu_mem_gb, hs.usd_per_hour) == ("H100_80GB", 1, 80, 1.9)
        assert (hs.tier, hs.billing, hs.stock, hs.country, hs.region) == (
            "secure",
            "on_demand",
            "available",
            "CA",
            "CANADA-1",
        )
        assert (hs.vcpus, hs.ram_gb, hs.disk_gb, hs.interconnect) == (28, 180, 100, "PCIe")
        assert hs.offer_id == "n3-H100x1:H100_80GB:PCIe:1:hyperstack:CANADA-1:secure_cloud"
        box = by["runpod/US-KS-2"]
        assert (box.gpu, box.gpu_count, box.stock, box.interconnect) == (
            "H100_80GB",
            8,
            "low",
            "NVLink",
        )
        assert box.usd_per_hour == 23.92 and box.usd_per_gpu_hour == pytest.approx(2.99)
        assert (box.net_down_mbps, box.provision_eta_s, box.reliability) == (9500, 300, None)
        rtx = by["runpod/EU-SE-1"]
        assert (rtx.gpu, rtx.tier, rtx.country, rtx.usd_per_hour) == (
            "RTX4090_24GB",
            "community",
            "SE",
            0.68,  # the community price
        )
        assert rtx.usd_per_gpu_hour == pytest.approx(0.34) and rtx.offer_id == SOLD_OUT
        a100 = by["datacrunch/FIN-01"]
        assert (a100.gpu, a100.billing, a100.interconnect) == ("A100_80GB", "spot", "SXM4")
        assert by["lambdalabs/us-east-1"].stock == "none"
        assert by["lambdalabs/us-east-1"].gpu == "H200_141GB"
        cpu = by["primecompute/US-TX-1"]
        assert (cpu.gpu, cpu.gpu_count, cpu.gpu_mem_gb, cpu.usd_per_gpu_hour) == ("cpu", 0, 0, 0.32)

        queries = {
            "in stock": OfferQuery(),
            "H100 x8": OfferQuery(gpu="H100", count=8),
            "community": OfferQuery(tier="community"),
            "EU": OfferQuery(region="EU"),
            "spot": OfferQuery(billing=["spot"]),
            "cheap": OfferQuery(max_price=1.0),
        }
        got = {k: [o.datacenter for o in await prime.offers(q)] for k, q in queries.items()}
        assert got == {
            "in stock": [d for d in by if d != "lambdalabs/us-east-1"],
            "H100 x8": ["runpod/US-KS-2"],
            "community": ["runpod/EU-SE-1"],
            "EU": ["runpod/EU-SE-1", "datacrunch/FIN-01"],
            "spot": ["datacrunch/FIN-01"],
            "cheap": ["runpod/EU-SE-1", "datacrunch/FIN-01", "primecompute/US-TX-1"],
        }
        community = [c[2] for c in replay.calls if c[2].get("security")]
        assert community and {c["security"] for c in community} == {"community_cloud"}

    serve(replay, body)


def test_offer_ids_round_trip_even_with_colons() -> None:
    raw = {
        "cloudId": "odd:cloud%id",
        "gpuType": "A100_80GB",
        "socket": "SXM4",
        "gpuCount": 4,
        "provider": "massedcompute",
        "dataCenter": "",
        "security": "secure_cloud",
    }
    got = parse_offer_id(offer_id_of(raw))
    assert got == {k: str(v) for k, v in raw.items()}
    with pytest.raises(ProviderError, match="not a Prime offer id"):
        parse_offer_id("gpu_8x_h100_sxm5@us-east-1")


@pytest.mark.timeout(60)
def test_launch_body_status_pages_of_pods_and_terminate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> None:
        prime = PrimeProvider(KEY, url=url)
        offers = {o.datacenter: o for o in await prime.offers(OfferQuery())}
        hs = offers["hyperstack/CANADA-1"]
        inst = await prime.launch(hs, SPEC)
        call = replay.calls[-1]
        assert call[:2] == ("POST", "pods")
        sent = call[2]
        assert sent["provider"] == {"type": "hyperstack"}
        pod = sent["pod"]
        assert {k: pod[k] for k in ("cloudId", "gpuType", "socket", "gpuCount")} == {
            "cloudId": "n3-H100x1",
            "gpuType": "H100_80GB",
            "socket": "PCIe",
            "gpuCount": 1,
        }
        assert (pod["dataCenterId"], pod["security"], pod["country"]) == (
            "CANADA-1",
            "secure_cloud",
            "CA",
        )
        assert (pod["diskSize"], pod["vcpus"], pod["memory"]) == (100, 28, 180)
        assert (pod["name"], pod["image"], pod["maxPrice"]) == (
            "cotrain-t3",
            "ubuntu_22_cuda_12",
            1.9,
        )
        [env] = pod["envVars"]
        assert env["key"] == "COTRAIN_ONSTART"
        assert "cotrain node --coordinator http://coord:8740 --task t3" in env["value"]
        assert (inst.offer_id, inst.state, inst.task, inst.usd_per_hour) == (
            hs.offer_id,
            "starting",
            "t3",
            1.9,
        )
        first = await prime.status(inst.instance_id)
        assert (first.state, first.host, first.task) == ("starting", None, "t3")
        second = await prime.status(inst.instance_id)
        assert (second.state, second.host, second.usd_per_hour) == ("running", "198.51.100.23", 1.9)
        assert second.started_at > 0
        more = [
            await prime.launch(offers[d], SPEC) for d in ("runpod/US-KS-2", "datacrunch/FIN-01")
        ]
        listed = await prime.instances()  # three pods, two a page
        assert {i.instance_id for i in listed} == {inst.instance_id, *(m.instance_id for m in more)}
        assert [c[2]["offset"] for c in replay.calls if c[1] == "pods" and c[0] == "GET"] == [
            "0",
            "2",
        ]
        for i in listed:
            await prime.terminate(i.instance_id)
        assert await prime.instances() == []
        with pytest.raises(ProviderError, match=f"^prime: no pod {inst.instance_id}$"):
            await prime.status(inst.instance_id)

        templated = PrimeProvider(KEY, url=url, custom_template_id="tpl_cotrain")
        await templated.launch(hs, SPEC)
        pod = replay.calls[-1][2]["pod"]
        assert (pod["image"], pod["customTemplateId"]) == ("custom_template", "tpl_cotrain")

    serve(replay, body)
    assert KEY not in json.dumps(replay.calls) and KEY not in caplog.text


@pytest.mark.timeout(60)
def test_prime_errors_are_one_line_and_keyless(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = Replay()
    replay.rate_limit_once = False

    async def body(url: str) -> list[str]:
        prime = PrimeProvider(KEY, url=url)
        offers = await prime.offers(OfferQuery())
        errors: list[str] = []
        sold = next(o for o in offers if o.offer_id == SOLD_OUT)
        with pytest.raises(OutOfStock, match="no longer available: No capacity available") as e1:
            await prime.launch(sold, SPEC)
        bad_count = sold.model_copy(update={"offer_id": SOLD_OUT.replace(":2:", ":0:")})
        with pytest.raises(
            ProviderError,
            match=r"refused \(422\): pod.gpuCount: Input should be greater than or equal to 1",
        ) as e2:
            await prime.launch(bad_count, SPEC)
        with pytest.raises(ProviderError, match="not a Prime offer id") as e3:
            await prime.launch(sold.model_copy(update={"offer_id": "nonsense"}), SPEC)
        with pytest.raises(ProviderError, match=r"^prime: no pod nope$") as e4:
            await prime.terminate("nope")
        wrong = PrimeProvider("pi_live_wrong_key", url=url)
        with pytest.raises(
            ProviderError, match=r"API key was refused \(401\): Invalid API key"
        ) as e5:
            await wrong.offers(OfferQuery())
        replay.rate_limit_once = True
        impatient = PrimeProvider(KEY, url=url, retries_429=0)
        with pytest.raises(ProviderError, match=r"rate limited \(429\)") as e6:
            await impatient.offers(OfferQuery())
        errors += [str(e.value) for e in (e1, e2, e3, e4, e5, e6)]
        return [*errors, repr(prime), repr(wrong)]

    texts = serve(replay, body)
    for text in texts:
        assert "\n" not in text
    for text in [*texts, caplog.text, json.dumps(replay.calls)]:
        assert KEY not in text and "pi_live_wrong_key" not in text
