"""The Vast.ai adapter against a local server replaying responses written from Vast's REST API
documentation: offers normalized, a 429 waited out, a refused key, an offer gone (out of stock),
launch, status, terminate; the key is in no log line, error or repr. API keys come from the
environment or an owner-only file."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from aiohttp import web
from market_replays.vast import KEY, Replay

from cotrain.market.keys import key_for
from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError
from cotrain.market.vast import VastProvider


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
    replay.rate_limit_once = False
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
