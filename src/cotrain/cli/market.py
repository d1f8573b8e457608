"""`cotrain market`: compare compute offers across providers (and, next, launch them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cotrain.cli.role import usage

app = typer.Typer(
    help="Compute offers from every configured provider, normalized, filtered and sorted.",
    no_args_is_help=True,
)

STATE_DIR = Path("~/.cache/cotrain/market")


def _providers(state_dir: Path) -> list[Any]:
    """Local always; each cloud whose API key is configured (``market/keys.py``). A provider's
    API address can be pointed elsewhere with ``COTRAIN_<NAME>_URL`` (a proxy, a replay)."""
    import os

    from cotrain.market.keys import key_for
    from cotrain.market.local import LocalProvider
    from cotrain.market.provider import ProviderError
    from cotrain.market.vast import VastProvider

    out: list[Any] = [LocalProvider(state_dir / "local")]
    try:
        vast = key_for("vast")
    except ProviderError as e:
        raise usage(str(e)) from None
    if vast:
        url = os.environ.get("COTRAIN_VAST_URL", "https://console.vast.ai")
        out.append(VastProvider(vast, url=url))
    return out


@app.command("offers")
def offers(
    gpu: Annotated[str, typer.Option(help="a GPU model (H100) or name (H100_80GB); cpu")] = "",
    count: Annotated[int, typer.Option(min=0, help="at least this many GPUs per machine")] = 0,
    min_vram_gb: Annotated[float, typer.Option(min=0, help="memory per GPU, at least")] = 0,
    secure: Annotated[bool, typer.Option("--secure", help="secure (datacenter) tier only")] = False,
    community: Annotated[bool, typer.Option("--community", help="community tier only")] = False,
    region: Annotated[str, typer.Option(help="region, country or datacenter; EU")] = "",
    max_price: Annotated[float, typer.Option(min=0, help="most USD per GPU-hour")] = 0,
    sort: Annotated[
        str, typer.Option(help="price | price_per_gpu | price_per_tflop | reliability")
    ] = "price_per_gpu",
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout")] = False,
    refresh: Annotated[bool, typer.Option(help="ask every provider now (no cache)")] = False,
    state_dir: Annotated[Path, typer.Option(help="cache and instances")] = STATE_DIR,
) -> None:
    """Offers from every configured provider: cheapest first, with where each list came from
    and how old it is (cached 60 s); a provider that fails is listed as failed."""
    import asyncio

    from pydantic import ValidationError

    from cotrain.market.catalog import Catalog
    from cotrain.market.offers import OfferQuery, choose

    if secure and community:
        raise usage("--secure and --community exclude each other")
    if sort not in ("price", "price_per_gpu", "price_per_tflop", "reliability"):
        raise usage(f"--sort {sort}: use price, price_per_gpu, price_per_tflop or reliability")
    try:
        q = OfferQuery(
            gpu=gpu or None,
            count=count or None,
            min_vram_gb=min_vram_gb or None,
            tier="secure" if secure else "community" if community else None,
            region=region or None,
            max_price=max_price or None,
        )
    except ValidationError as e:
        raise usage(str(e.errors()[0]["msg"])) from None
    state = state_dir.expanduser()
    cat = Catalog(_providers(state), state / "offers.json")
    listing = asyncio.run(cat.listing(refresh=refresh))
    chosen = choose(listing.offers, q, by=sort)  # type: ignore[arg-type]
    sources = [
        {"provider": s.provider, "offers": s.offers, "age_s": round(s.age_s, 1), "error": s.error}
        for s in listing.sources
    ]
    if json_out:
        out = {"offers": [o.model_dump() for o in chosen], "sources": sources}
        print(json.dumps(out, indent=1))
        return
    _table(chosen, sources)


def _table(chosen: list[Any], sources: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(chosen)} offers")
    for col in ("provider", "gpu", "n", "$/h", "$/GPU-h", "tier", "billing", "where", "rel."):
        t.add_column(col)
    for o in chosen:
        price = f"{o.usd_per_hour:.2f}" + ("~" if o.price_is_estimate else "")
        t.add_row(
            o.provider,
            o.gpu,
            str(o.gpu_count),
            price,
            f"{o.usd_per_gpu_hour:.3f}",
            o.tier,
            o.billing,
            o.region or o.country or "",
            "" if o.reliability is None else f"{o.reliability:.2f}",
        )
    console = Console()
    console.print(t)
    for s in sources:
        line = f"{s['provider']}: {s['offers']} offers, {s['age_s']:.0f} s old"
        print(line + (f"; FAILED: {s['error']}" if s["error"] else ""), file=sys.stderr)
