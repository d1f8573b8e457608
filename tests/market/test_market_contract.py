"""One contract, run against every cloud adapter over its replay server
(``tests/harness/market_replays``): offers through a 429 come back normalized; a launch carries
the coordinator and task to the machine; status goes from starting to running; instances lists
it; terminate ends it; a sold-out offer is ``OutOfStock`` (the launcher moves on); an instance
that never becomes ready stays "starting" (the launcher gives up on it); a refused key is a
one-line ``ProviderError`` and no key appears in any message, repr or log line."""

from __future__ import annotations

import logging
from types import ModuleType

import pytest
from market_replays import MODULES, load, serve

from cotrain.market.offers import TFLOPS, OfferQuery
from cotrain.market.provider import LaunchSpec, OutOfStock, ProviderError

SPEC = LaunchSpec(coordinator="http://coord.example:8740", task="t-contract", invite="ab" * 16)


@pytest.fixture(params=MODULES)
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return load(request.param)


@pytest.mark.timeout(90)
def test_offers_launch_status_terminate(mod: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    replay = mod.Replay()
    assert replay.rate_limit_once

    async def body(url: str) -> list[str]:
        p = mod.provider(url)
        assert p.name == mod.NAME and mod.KEY not in repr(p)
        offers = await p.offers(OfferQuery())  # through one 429
        assert offers, "no offers"
        assert not replay.rate_limit_once, "the replay's 429 was never asked for"
        for o in offers:
            assert o.provider == mod.NAME and o.offer_id
            assert o.gpu in TFLOPS or o.gpu == "cpu", o.gpu
            assert o.usd_per_hour > 0 and o.fetched_at > 0
            n = max(o.gpu_count, 1)
            assert o.usd_per_gpu_hour == pytest.approx(o.usd_per_hour / n, rel=1e-3)
            assert o.tier in ("secure", "community", "unknown")
            assert o.billing in ("on_demand", "spot", "bid", "prepaid")
        assert mod.SOLD_OUT in {o.offer_id for o in offers}
        offer = next(o for o in offers if o.offer_id != mod.SOLD_OUT and o.stock != "none")
        inst = await p.launch(offer, SPEC)
        assert inst.provider == mod.NAME and inst.offer_id == offer.offer_id
        assert inst.state in ("starting", "running") and inst.usd_per_hour > 0
        launch_call = " ".join(str(c) for c in replay.calls[-3:])
        assert SPEC.coordinator in launch_call and SPEC.task in launch_call, launch_call
        assert (await p.status(inst.instance_id)).state == "starting"
        assert (await p.status(inst.instance_id)).state == "running"
        assert inst.instance_id in {i.instance_id for i in await p.instances()}
        await p.terminate(inst.instance_id)
        left = {i.instance_id: i.state for i in await p.instances()}
        assert left.get(inst.instance_id, "terminated") in ("terminated", "exited")
        sold = next(o for o in offers if o.offer_id == mod.SOLD_OUT)
        with pytest.raises(OutOfStock):
            await p.launch(sold, SPEC)
        wrong = mod.provider(url, key="wrong-" + mod.KEY[::-1])
        with pytest.raises(ProviderError, match="API key was refused") as e:
            await wrong.offers(OfferQuery())
        return [str(e.value), repr(wrong)]

    texts = serve(replay, body)
    for text in [*texts, caplog.text]:
        assert mod.KEY not in text and mod.KEY[::-1] not in text


@pytest.mark.timeout(90)
def test_an_instance_that_never_becomes_ready_stays_starting(mod: ModuleType) -> None:
    replay = mod.Replay()
    replay.rate_limit_once = False
    replay.stuck = True

    async def body(url: str) -> None:
        p = mod.provider(url)
        offers = await p.offers(OfferQuery())
        offer = next(o for o in offers if o.offer_id != mod.SOLD_OUT and o.stock != "none")
        inst = await p.launch(offer, SPEC)
        for _ in range(4):
            assert (await p.status(inst.instance_id)).state == "starting"
        await p.terminate(inst.instance_id)

    serve(replay, body)


def _classes() -> list[tuple[str, type]]:
    import importlib

    from cotrain.market.local import LocalProvider
    from cotrain.market.registry import CLOUDS
    from cotrain.market.ssh import SshProvider

    out: list[tuple[str, type]] = [("local", LocalProvider), ("ssh", SshProvider)]
    for name, (module, cls) in CLOUDS.items():
        out.append((name, getattr(importlib.import_module(module), cls)))
    return out


@pytest.mark.parametrize(("name", "cls"), _classes(), ids=[n for n, _ in _classes()])
def test_every_provider_implements_the_interface(name: str, cls: type) -> None:
    """All nine providers (the seven clouds above, local and ssh, whose behaviour their own
    tests check against real processes and sshd) have the one interface: a name, their
    capabilities, and offers, launch, status, terminate and instances as coroutines."""
    import inspect

    from cotrain.market.provider import Cap

    assert cls.name == name
    assert isinstance(cls.caps, frozenset) and all(isinstance(c, Cap) for c in cls.caps)
    for method, params in [
        ("offers", ["q"]),
        ("launch", ["offer", "spec"]),
        ("status", ["instance_id"]),
        ("terminate", ["instance_id"]),
        ("instances", []),
    ]:
        fn = getattr(cls, method)
        assert inspect.iscoroutinefunction(fn), (name, method)
        got = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert got[: len(params)] == params, (name, method, got)
