"""The TensorDock adapter against a local server replaying TensorDock's documented v2 API: offers
per location, GPU model and count, priced for the resources a launch will request (GPU, vCPU,
RAM and storage rates), tier and place, filters; the JSON:API-style deploy body (the offer id,
the resources, cloud-init with the start-up script, the SSH key); VM states; errors mapped to
one-line messages; the key only in the Authorization header."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from market_replays import serve
from market_replays.tensordock import AUSTIN, KEY, SOLD_OUT, SSH_KEY, WARSAW, Replay

from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError, onstart_script
from cotrain.market.tensordock import TensorDockProvider, _message, parse_offer_id

SPEC = LaunchSpec(coordinator="http://coord.example:8740", task="t3", invite="ab" * 16)
H100 = "h100-sxm5-80gb"
RTX = "geforcertx4090-pcie-24gb"


def fresh() -> Replay:
    replay = Replay()
    replay.rate_limit_once = False
    return replay


@pytest.mark.timeout(60)
def test_offers_are_priced_for_the_resources_a_launch_requests() -> None:
    replay = fresh()

    async def body(url: str) -> None:
        td = TensorDockProvider(KEY, url=url, ssh_key=SSH_KEY)
        every = {o.offer_id: o for o in await td.offers(OfferQuery())}
        # the A6000 (port forwarding only) and the A100 without pricing are left out
        assert sorted(every) == sorted(
            [f"{AUSTIN}|{H100}|{n}" for n in (1, 2, 4, 8)]
            + [f"{WARSAW}|{RTX}|{n}" for n in (1, 2, 4)]
        )
        one = every[f"{AUSTIN}|{H100}|1"]
        assert (one.gpu, one.gpu_count, one.gpu_mem_gb, one.tier) == ("H100_80GB", 1, 80, "secure")
        assert (one.vcpus, one.ram_gb, one.disk_gb) == (8, 32, 100)
        # 2.25 per GPU + 8 vCPU x 0.003 + 32 GB x 0.002 + 100 GB x 0.00005
        assert one.usd_per_hour == pytest.approx(2.343)
        assert (one.country, one.region) == ("US", "Austin, Texas, United States")
        assert (one.billing, one.stock) == ("on_demand", "available")
        eight = every[f"{AUSTIN}|{H100}|8"]
        assert (eight.vcpus, eight.ram_gb) == (64, 256)
        assert eight.usd_per_hour == pytest.approx(18 + 64 * 0.003 + 256 * 0.002 + 0.005)
        assert eight.usd_per_gpu_hour == pytest.approx(eight.usd_per_hour / 8)
        # 4 x 32 GB is more RAM than Warsaw deploys (100 GB): cut to 96 (steps of 8)
        rtx = every[f"{WARSAW}|{RTX}|4"]
        assert (rtx.gpu, rtx.tier, rtx.country, rtx.vcpus, rtx.ram_gb) == (
            "RTX4090_24GB", "community", "PL", 32, 96
        )  # fmt: skip
        assert rtx.usd_per_hour == pytest.approx(1.4 + 32 * 0.003 + 96 * 0.002 + 0.005)

        def ids(offers: list[Any]) -> set[str]:
            return {o.offer_id for o in offers}

        assert ids(await td.offers(OfferQuery(region="EU"))) == {
            f"{WARSAW}|{RTX}|{n}" for n in (1, 2, 4)
        }
        assert ids(await td.offers(OfferQuery(region="texas"))) == {
            f"{AUSTIN}|{H100}|{n}" for n in (1, 2, 4, 8)
        }
        assert ids(await td.offers(OfferQuery(tier="community", count=2))) == {
            f"{WARSAW}|{RTX}|{n}" for n in (2, 4)
        }
        assert ids(await td.offers(OfferQuery(gpu="H100", count=8))) == {f"{AUSTIN}|{H100}|8"}
        # per GPU, the machine's parts included: 1.693 / 4 = 0.423; 0.443 for one
        assert ids(await td.offers(OfferQuery(max_price=0.43))) == {f"{WARSAW}|{RTX}|4"}
        assert replay.calls and all(c[:2] == ("GET", "locations") for c in replay.calls)

    serve(replay, body)


@pytest.mark.timeout(60)
def test_launch_deploys_the_offer_with_the_start_up_script(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    replay = fresh()

    async def body(url: str) -> None:
        td = TensorDockProvider(KEY, url=url, ssh_key=SSH_KEY, image="ubuntu2204")
        offer = next(o for o in await td.offers(OfferQuery()) if o.offer_id == f"{WARSAW}|{RTX}|2")
        inst = await td.launch(offer, SPEC)
        method, path, sent = replay.calls[-1]
        assert (method, path, sent["data"]["type"]) == ("POST", "instances", "virtualmachine")
        a = sent["data"]["attributes"]
        assert (a["name"], a["type"], a["image"], a["location_id"]) == (
            "cotrain-t3", "virtualmachine", "ubuntu2204", WARSAW
        )  # fmt: skip
        assert a["resources"] == {
            "vcpu_count": 16, "ram_gb": 64, "storage_gb": 100, "gpus": {RTX: {"count": 2}}
        }  # fmt: skip
        assert (a["useDedicatedIp"], a["ssh_key"]) == (True, SSH_KEY)
        assert a["cloud_init"] == {"packages": ["python3-venv"], "runcmd": [onstart_script(SPEC)]}
        assert "cotrain node --coordinator http://coord.example:8740 --task t3" in json.dumps(a)
        assert KEY not in json.dumps(sent)
        assert (inst.offer_id, inst.state, inst.task) == (offer.offer_id, "starting", "t3")
        assert inst.usd_per_hour == pytest.approx(offer.usd_per_hour)

        got = await td.status(inst.instance_id)
        assert (got.state, got.host, got.task) == ("starting", "198.51.100.17", "t3")
        assert (await td.status(inst.instance_id)).state == "running"
        listed = await td.instances()
        assert [(i.instance_id, i.state, i.task) for i in listed] == [
            (inst.instance_id, "running", "t3")
        ]
        await td.terminate(inst.instance_id)
        assert await td.instances() == []
        with pytest.raises(ProviderError, match=f"no instance {inst.instance_id}"):
            await td.status(inst.instance_id)
        with pytest.raises(ProviderError, match=f"no instance {inst.instance_id}"):
            await td.terminate(inst.instance_id)

    serve(replay, body)
    assert all(h.get("Authorization") == f"Bearer {KEY}" for h in replay.headers)
    assert replay.urls and all(KEY not in u for u in replay.urls)
    assert KEY not in caplog.text


@pytest.mark.timeout(60)
def test_errors_are_one_line_and_name_no_key(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh key here
    replay = fresh()

    async def body(url: str) -> list[str]:
        td = TensorDockProvider(KEY, url=url, ssh_key=SSH_KEY)
        every = {o.offer_id: o for o in await td.offers(OfferQuery())}
        with pytest.raises(OutOfStock) as sold:
            await td.launch(every[SOLD_OUT], SPEC)
        assert str(sold.value) == (
            f"tensordock: offer {SOLD_OUT}: No available hostnodes in this location can fit "
            "the requested resources"
        )
        with pytest.raises(ProviderError, match="not a TensorDock offer id"):
            await td.launch(every[SOLD_OUT].model_copy(update={"offer_id": "7000123"}), SPEC)

        keyless = TensorDockProvider(KEY, url=url)
        sent = len(replay.calls)
        with pytest.raises(ProviderError, match=r"SSH public key.*ssh-keygen"):
            await keyless.launch(every[f"{AUSTIN}|{H100}|1"], SPEC)
        assert len(replay.calls) == sent  # refused before asking TensorDock
        (tmp_path / ".ssh").mkdir()
        (tmp_path / ".ssh" / "id_ed25519.pub").write_text("ssh-ed25519 AAAAhome me@here\n")
        await keyless.launch(every[f"{AUSTIN}|{H100}|1"], SPEC)
        assert (
            replay.calls[-1][2]["data"]["attributes"]["ssh_key"] == "ssh-ed25519 AAAAhome me@here"
        )

        wrong = TensorDockProvider("tdv2_WRONG" + KEY[::-1], url=url, ssh_key=SSH_KEY)
        with pytest.raises(ProviderError, match="the API key was refused") as refused:
            await wrong.offers(OfferQuery())
        replay.rate_limit_once = True
        patient = TensorDockProvider(KEY, url=url, retries_429=0)
        with pytest.raises(ProviderError, match=r"rate limited \(429\)") as limited:
            await patient.offers(OfferQuery())
        texts = [str(sold.value), str(refused.value), str(limited.value), repr(td), repr(wrong)]
        assert all("\n" not in t for t in texts)
        return texts

    texts = serve(replay, body)
    for text in [*texts, caplog.text]:
        assert KEY not in text and KEY[::-1] not in text


def test_error_bodies_of_every_shape_read_as_one_line() -> None:
    jsonapi = {"errors": [{"status": "400", "title": "Bad Request", "detail": "No capacity\nhere"}]}
    assert _message(jsonapi) == "Bad Request: No capacity here"
    assert _message({"error": "Instance not found"}) == "Instance not found"
    assert _message({"message": "Minimum storage is 100GB"}) == "Minimum storage is 100GB"
    assert parse_offer_id(f"{AUSTIN}|{H100}|8") == (AUSTIN, H100, 8)
    for bad in ("", f"{AUSTIN}|{H100}", f"{AUSTIN}|{H100}|0", f"|{H100}|1"):
        with pytest.raises(ProviderError, match="not a TensorDock offer id"):
            parse_offer_id(bad)
    with pytest.raises(ValueError, match="minimum is 100 GB"):
        TensorDockProvider(KEY, disk_gb=50)
    assert KEY not in repr(TensorDockProvider(KEY))
