"""``cotrain market offers`` over every provider at once: the seven clouds' replay servers, this
machine (local) and an SSH host. Every offer is normalized; every filter and sort of the
command is checked on the combined list; a second call is served from the cache (its age
shown); a provider that fails is listed as failed while the others still answer."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from market_harness import Replays, cli
from sshd_harness import SshServer, hosts_toml

from cotrain.market.offers import EU, TFLOPS


@pytest.fixture(scope="module")
def replays() -> Iterator[Replays]:
    with Replays() as r:
        yield r


@pytest.fixture
def hosts_file(tmp_path: Path) -> Iterator[Path | None]:
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
        yield None
        return
    s = SshServer.start(tmp_path, "rig")
    h = s.ssh_host(tmp_path, usd_per_hour=0.25, region="DE")
    f = tmp_path / "hosts.toml"
    f.write_text(hosts_toml([h]))
    try:
        yield f
    finally:
        s.stop()


def _offers(replays: Replays, tmp: Path, hosts: Path | None, *args: str) -> dict[str, Any]:
    extra = ["--hosts", str(hosts)] if hosts else ["--hosts", str(tmp / "none.toml")]
    cp = cli(
        "market", "offers", "--json", "--state-dir", str(tmp / "state"), *extra, *args,
        extra_env=replays.env,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    for mod_key in (v for k, v in replays.env.items() if k.endswith("_API_KEY")):
        assert mod_key not in cp.stdout + cp.stderr
    return dict(json.loads(cp.stdout))


@pytest.mark.timeout(180)
def test_every_provider_normalized_filtered_sorted(
    replays: Replays, tmp_path: Path, hosts_file: Path | None
) -> None:
    got = _offers(replays, tmp_path, hosts_file, "--refresh", "--sort", "price")
    sources = {s["provider"]: s for s in got["sources"]}
    want = {"local", "vast", "prime", "runpod", "lambda", "tensordock", "akash", "ionet"}
    want |= {"ssh"} if hosts_file else set()
    assert set(sources) == want and not any(s["error"] for s in sources.values()), sources
    offers = got["offers"]
    assert {o["provider"] for o in offers} == want
    for o in offers:
        assert o["gpu"] in TFLOPS or o["gpu"] == "cpu", o
        n = max(o["gpu_count"], 1)
        assert o["usd_per_gpu_hour"] == pytest.approx(o["usd_per_hour"] / n, rel=1e-3)
    prices = [o["usd_per_hour"] for o in offers]
    assert prices == sorted(prices)
    bids = [o for o in offers if o["billing"] == "bid"]
    assert bids and all(o["price_is_estimate"] for o in bids)
    assert any(o["billing"] == "prepaid" and o["min_hours"] > 0 for o in offers)

    # from the cache now: the same list, an age
    again = _offers(replays, tmp_path, hosts_file, "--sort", "price")
    assert [o["offer_id"] for o in again["offers"]] == [o["offer_id"] for o in offers]

    def ids(*args: str) -> list[dict[str, Any]]:
        return list(_offers(replays, tmp_path, hosts_file, *args)["offers"])

    h100 = ids("--gpu", "H100")
    assert h100 and all(o["gpu"].startswith("H100_") for o in h100)
    assert len({o["provider"] for o in h100}) >= 5
    eight = ids("--count", "8")
    assert eight and all(o["gpu_count"] >= 8 for o in eight)
    big = ids("--min-vram-gb", "80")
    assert big and all(o["gpu_mem_gb"] >= 80 for o in big)
    secure = ids("--secure")
    assert secure and all(o["tier"] == "secure" for o in secure)
    community = ids("--community")
    assert community and all(o["tier"] == "community" for o in community)
    eu = ids("--region", "EU")
    assert eu and all(
        (o["country"] or "").upper() in EU or "eu" in (o["region"] or "").lower() for o in eu
    )
    cheap = ids("--max-price", "2.5")
    assert cheap and all(o["usd_per_gpu_hour"] <= 2.5 for o in cheap)
    assert len(cheap) < len(offers)
    only = ids("--provider", "lambda", "--provider", "vast")
    assert {o["provider"] for o in only} == {"lambda", "vast"}
    per_gpu = [o["usd_per_gpu_hour"] for o in ids("--sort", "price_per_gpu")]
    assert per_gpu == sorted(per_gpu)
    rel = [o["reliability"] for o in ids("--sort", "reliability") if o["reliability"] is not None]
    assert rel == sorted(rel, reverse=True)
    per_tflop = [
        o["usd_per_hour"] / (TFLOPS[o["gpu"]] * o["gpu_count"])
        for o in ids("--sort", "price_per_tflop")
        if o["gpu"] in TFLOPS and o["gpu_count"]
    ]
    assert per_tflop == sorted(per_tflop)
    both = ids("--gpu", "H100", "--count", "8", "--secure", "--max-price", "4")
    assert all(
        o["gpu"].startswith("H100_") and o["gpu_count"] >= 8 and o["tier"] == "secure"
        and o["usd_per_gpu_hour"] <= 4 for o in both
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_a_failing_provider_is_listed_as_failed(replays: Replays, tmp_path: Path) -> None:
    env = dict(replays.env)
    env["COTRAIN_RUNPOD_URL"] = "http://127.0.0.1:9"  # nothing listens there
    env["COTRAIN_LAMBDA_API_KEY"] = "a-wrong-key"
    cp = cli(
        "market", "offers", "--json", "--refresh", "--state-dir", str(tmp_path),
        "--hosts", str(tmp_path / "none.toml"), extra_env=env,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    errors = {s["provider"]: s["error"] for s in got["sources"]}
    assert errors["runpod"] and "runpod" in errors["runpod"]
    assert "API key was refused" in (errors["lambda"] or "")
    assert not errors["vast"] and not errors["prime"]
    assert {o["provider"] for o in got["offers"]} >= {"vast", "prime", "akash"}
    assert "a-wrong-key" not in cp.stdout + cp.stderr
