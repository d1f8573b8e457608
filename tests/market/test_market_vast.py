"""The Vast.ai adapter against a local server replaying responses written from Vast's REST API
documentation: offers normalized, a 429 waited out, a refused key, an offer gone (out of stock),
launch, status, terminate; the key is in no log line, error or repr. API keys come from the
environment or an owner-only file."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cotrain.market.keys import key_for
from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError
from cotrain.market.vast import VastProvider

KEY = "vk_5e3c0ffee1d2b3a4_secret"

OFFERS = {
    "offers": [
        {  # a datacenter H100 box: the secure tier
            "id": 7000123, "gpu_name": "H100 SXM", "num_gpus": 8, "gpu_ram": 81559,
            "dph_total": 17.6, "reliability2": 0.9971, "hosting_type": 1,
            "datacenter": "dc-se-1", "geolocation": "Sweden, SE", "inet_down": 8200.5,
            "inet_up": 7900.1, "cpu_cores_effective": 96.0, "cpu_ram": 1031891,
            "disk_space": 1800.0, "rentable": True, "verified": True,
        },
        {  # a community 4090
            "id": 7000456, "gpu_name": "RTX 4090", "num_gpus": 2, "gpu_ram": 24564,
            "dph_total": 0.62, "reliability2": 0.981, "hosting_type": 0,
            "geolocation": "Texas, US", "inet_down": 700.0, "inet_up": 500.0,
            "cpu_cores_effective": 16.0, "cpu_ram": 64000, "disk_space": 200.0,
            "rentable": True,
        },
        {"id": 7000789, "gpu_name": "A100 PCIE"},  # malformed (no count, no price): skipped
    ]
}  # fmt: skip


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.limited_once = False
        self.instances: dict[int, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v0/bundles/", self.bundles)
        app.router.add_put("/api/v0/asks/{id}/", self.ask)
        app.router.add_get("/api/v0/instances/", self.list_instances)
        app.router.add_get("/api/v0/instances/{id}/", self.instance)
        app.router.add_delete("/api/v0/instances/{id}/", self.destroy)
        return app

    def _auth(self, r: web.Request) -> None:
        if r.headers.get("Authorization") != f"Bearer {KEY}":
            raise web.HTTPUnauthorized(
                text=json.dumps({"success": False, "error": "invalid_user", "msg": "bad key"}),
                content_type="application/json",
            )

    async def bundles(self, r: web.Request) -> web.Response:
        self._auth(r)
        self.calls.append(("GET", "bundles", json.loads(r.query["q"])))
        if not self.limited_once:  # the API's rate limit, once
            self.limited_once = True
            return web.json_response({"msg": "too many requests"}, status=429,
                                     headers={"Retry-After": "0"})  # fmt: skip
        return web.json_response(OFFERS)

    async def ask(self, r: web.Request) -> web.Response:
        self._auth(r)
        body = await r.json()
        self.calls.append(("PUT", r.match_info["id"], body))
        if r.match_info["id"] == "7000456":
            return web.json_response({"success": False, "msg": "no_such_ask"}, status=404)
        iid = 90000 + len(self.instances)
        self.instances[iid] = {
            "id": iid, "actual_status": "loading", "label": body["label"], "dph_total": 17.6,
            "ask_contract_id": int(r.match_info["id"]), "public_ipaddr": "203.0.113.7\n",
            "status_msg": "pulling image", "start_date": 1796500000.0,
        }  # fmt: skip
        return web.json_response({"success": True, "new_contract": iid})

    async def list_instances(self, r: web.Request) -> web.Response:
        self._auth(r)
        return web.json_response({"instances": list(self.instances.values())})

    async def instance(self, r: web.Request) -> web.Response:
        self._auth(r)
        inst = self.instances.get(int(r.match_info["id"]))
        return web.json_response({"instances": inst})

    async def destroy(self, r: web.Request) -> web.Response:
        self._auth(r)
        self.instances.pop(int(r.match_info["id"]), None)
        return web.json_response({"success": True})


def test_vast_against_its_documented_api(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = Replay()

    async def main() -> list[str]:
        runner = web.AppRunner(replay.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        texts: list[str] = []
        try:
            vast = VastProvider(KEY, url=url)
            offers = await vast.offers(OfferQuery())  # through one 429
            assert [o.offer_id for o in offers] == ["7000123", "7000456"]
            h100, rtx = offers
            assert (h100.gpu, h100.gpu_count, h100.tier, h100.country) == (
                "H100_80GB",
                8,
                "secure",
                "SE",
            )
            assert h100.usd_per_gpu_hour == pytest.approx(2.2) and h100.reliability == 0.9971
            assert (rtx.gpu, rtx.tier, rtx.usd_per_hour) == ("RTX4090_24GB", "community", 0.62)
            assert replay.calls[0][2]["rentable"] == {"eq": True}
            assert [o.offer_id for o in await vast.offers(OfferQuery(tier="community"))] == [
                rtx.offer_id
            ]
            spec = LaunchSpec(coordinator="http://coord:8740", task="t3", invite="ab" * 16)
            inst = await vast.launch(h100, spec)
            put = replay.calls[-1][2]
            assert "cotrain node --coordinator http://coord:8740 --task t3" in put["onstart"]
            assert (inst.state, inst.task, inst.usd_per_hour) == ("starting", "t3", 17.6)
            got = await vast.status(inst.instance_id)
            assert (got.state, got.host, got.task) == ("starting", "203.0.113.7", "t3")
            replay.instances[int(inst.instance_id)]["actual_status"] = "running"
            assert [i.state for i in await vast.instances()] == ["running"]
            with pytest.raises(OutOfStock, match="7000456 is no longer available"):
                await vast.launch(rtx, spec)
            await vast.terminate(inst.instance_id)
            assert await vast.instances() == []
            with pytest.raises(ProviderError, match="no instance"):
                await vast.status(inst.instance_id)
            wrong = VastProvider("vk_wrong_key", url=url)
            with pytest.raises(ProviderError, match="the API key was refused") as e:
                await wrong.offers(OfferQuery())
            texts += [str(e.value), repr(vast), repr(wrong)]
        finally:
            await runner.cleanup()
        return texts

    texts = asyncio.run(main())
    for text in [*texts, caplog.text]:
        assert KEY not in text and "vk_wrong_key" not in text


def test_keys_come_from_the_environment_or_an_owner_only_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("COTRAIN_VAST_API_KEY", "VAST_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    f = tmp_path / "keys.toml"
    assert key_for("vast", file=f) is None
    f.write_text('vast = "from-file"\n')
    f.chmod(0o644)
    with pytest.raises(ProviderError, match="chmod 600"):
        key_for("vast", file=f)
    f.chmod(0o600)
    assert key_for("vast", file=f) == "from-file"
    assert key_for("lambda", file=f) is None
    monkeypatch.setenv("VAST_API_KEY", "from-vast-variable")
    assert key_for("vast", file=f) == "from-vast-variable"
    monkeypatch.setenv("COTRAIN_VAST_API_KEY", "from-cotrain-variable")
    assert key_for("vast", file=f) == "from-cotrain-variable"


def test_the_offers_command_lists_vast_when_a_key_is_set(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import threading

    replay = Replay()
    replay.limited_once = True
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(replay.app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COTRAIN_", "VAST_"))}
        env.update(VAST_API_KEY=KEY, COTRAIN_VAST_URL=f"http://127.0.0.1:{port}")
        cp = subprocess.run(
            [
                *(sys.executable, "-m", "cotrain", "market", "offers", "--json"),
                *("--state-dir", str(tmp_path), "--sort", "price", "--gpu", "RTX4090"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert cp.returncode == 0, cp.stderr
        got = json.loads(cp.stdout)
        assert [o["offer_id"] for o in got["offers"]] == ["7000456"]
        assert {s["provider"] for s in got["sources"]} == {"local", "vast"}
        assert KEY not in cp.stdout + cp.stderr
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()
