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
_STATE = typer.Option("--state-dir", help="offers cache, instances and launch records")
_HOSTS = typer.Option("--hosts", help="the SSH hosts file [~/.config/cotrain/ssh-hosts.toml]")


def _providers(
    state_dir: Path, hosts: Path | None = None, *, progress: Any = None, min_gflops: float = 0
) -> dict[str, Any]:
    """Local always, SSH hosts from the hosts file, each cloud whose API key is configured
    (``market/registry.py``); a misconfiguration is one line, exit 2."""
    from cotrain.market.provider import ProviderError
    from cotrain.market.registry import configured

    try:
        return configured(state_dir, hosts_file=hosts, progress=progress, min_gflops=min_gflops)
    except ProviderError as e:
        raise usage(str(e)) from None


def _query(
    gpu: str,
    count: int,
    min_vram_gb: float,
    secure: bool,
    community: bool,
    region: str,
    max_price: float,
    provider: list[str] | None = None,
) -> Any:
    from pydantic import ValidationError

    from cotrain.market.offers import OfferQuery

    if secure and community:
        raise usage("--secure and --community exclude each other")
    try:
        return OfferQuery(
            gpu=gpu or None,
            count=count or None,
            min_vram_gb=min_vram_gb or None,
            tier="secure" if secure else "community" if community else None,
            region=region or None,
            max_price=max_price or None,
            providers=provider or None,
        )
    except ValidationError as e:
        raise usage(str(e.errors()[0]["msg"])) from None


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
        str,
        typer.Option(help="price | price_per_gpu | price_per_tflop | reliability | cost_per_token"),
    ] = "price_per_gpu",
    params: Annotated[float, typer.Option(min=1, help="cost_per_token: model parameters")] = 1e9,
    inner_steps: Annotated[int, typer.Option(min=1, help="cost_per_token: steps per sync")] = 100,
    tokens_per_step: Annotated[
        int, typer.Option(min=1, help="cost_per_token: tokens per inner step")
    ] = 65_536,
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout")] = False,
    provider: Annotated[list[str] | None, typer.Option(help="only these providers")] = None,
    refresh: Annotated[bool, typer.Option(help="ask every provider now (no cache)")] = False,
    state_dir: Annotated[Path, _STATE] = STATE_DIR,
    hosts: Annotated[Path | None, _HOSTS] = None,
) -> None:
    """Offers from every configured provider: cheapest first, with where each list came from
    and how old it is (cached 60 s); a provider that fails is listed as failed."""
    import asyncio

    from cotrain.market.catalog import Catalog
    from cotrain.market.offers import choose
    from cotrain.market.value import Workload, usd_per_mtoken

    sorts = ("price", "price_per_gpu", "price_per_tflop", "reliability", "cost_per_token")
    if sort not in sorts:
        raise usage(f"--sort {sort}: use one of {', '.join(sorts)}")
    q = _query(gpu, count, min_vram_gb, secure, community, region, max_price, provider)
    work = Workload(params=params, inner_steps=inner_steps, tokens_per_step=tokens_per_step)
    state = state_dir.expanduser()
    cat = Catalog(list(_providers(state, hosts).values()), state / "offers.json")
    listing = asyncio.run(cat.listing(refresh=refresh))
    chosen = choose(listing.offers, q, by=sort, workload=work)  # type: ignore[arg-type]
    sources = [
        {"provider": s.provider, "offers": s.offers, "age_s": round(s.age_s, 1), "error": s.error}
        for s in listing.sources
    ]
    if json_out:
        rows = [{**o.model_dump(), "usd_per_mtoken": usd_per_mtoken(o, work)} for o in chosen]
        print(json.dumps({"offers": rows, "sources": sources}, indent=1))
        return
    _table(chosen, sources, work)


def _table(chosen: list[Any], sources: list[dict[str, Any]], work: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from cotrain.market.value import usd_per_mtoken

    t = Table(title=f"{len(chosen)} offers")
    cols = ("provider", "gpu", "n", "$/h", "$/GPU-h", "$/Mtok", "tier", "billing", "where", "rel.")
    for col in cols:
        t.add_column(col)
    for o in chosen:
        price = f"{o.usd_per_hour:.2f}" + ("~" if o.price_is_estimate else "")
        per_tok = usd_per_mtoken(o, work)
        t.add_row(
            o.provider,
            o.gpu,
            str(o.gpu_count),
            price,
            f"{o.usd_per_gpu_hour:.3f}",
            "" if per_tok is None else f"{per_tok:.3f}",
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


def alive(pid: int) -> bool:
    from cotrain.core.pids import alive as live  # here: `cotrain --help` imports no pydantic

    return live(pid)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _launcher(state: Path, hosts: Path | None, **kw: Any) -> Any:
    from cotrain.market.launcher import Launcher, Ledger

    min_gflops = kw.pop("min_gflops", 0.0)
    providers = _providers(state, hosts, progress=_say, min_gflops=min_gflops)
    return Launcher(providers, Ledger(state), say=_say, **kw)


def _find_offer(offers: list[Any], want: str) -> Any:
    """``provider:id`` or a bare id that only one provider has."""
    prov, _, oid = want.rpartition(":")
    hits = [o for o in offers if o.offer_id == oid and (not prov or o.provider == prov)]
    if not hits:
        raise usage(f"no offer {want} (see `cotrain market offers`)")
    if len(hits) > 1:
        raise usage(f"offer {want} is listed by {', '.join(o.provider for o in hits)}: "
                    "write it provider:id")  # fmt: skip
    return hits[0]


@app.command("launch")
def launch(
    offer: Annotated[
        str, typer.Argument(help="an offer (provider:id); default: the cheapest")
    ] = "",
    task: Annotated[str, typer.Option(help="the task the nodes join")] = "",
    coordinator: Annotated[str, typer.Option(help="the task's coordinator, http://host:port")] = (
        "http://127.0.0.1:8740"
    ),
    cheapest: Annotated[bool, typer.Option("--cheapest", help="the cheapest offers that fit")] = (
        False
    ),
    count: Annotated[int, typer.Option(min=1, max=256, help="how many nodes")] = 1,
    budget_usd: Annotated[float, typer.Option(min=0, help="most USD for the task in all")] = 0,
    max_hours: Annotated[float, typer.Option(min=0, help="stop each node after this long")] = 0,
    invite: Annotated[list[str] | None, typer.Option(help="an invite per node (repeat)")] = None,
    key: Annotated[
        Path | None, typer.Option(help="the initiator's key: mint an invite per node")
    ] = None,
    gpu: Annotated[str, typer.Option(help="a GPU model (H100); cpu")] = "",
    gpus: Annotated[int, typer.Option(min=0, help="at least this many GPUs per machine")] = 0,
    min_vram_gb: Annotated[float, typer.Option(min=0, help="memory per GPU, at least")] = 0,
    secure: Annotated[bool, typer.Option("--secure", help="secure (datacenter) tier only")] = False,
    community: Annotated[bool, typer.Option("--community", help="community tier only")] = False,
    region: Annotated[str, typer.Option(help="region, country or datacenter; EU")] = "",
    max_price: Annotated[float, typer.Option(min=0, help="most USD per GPU-hour")] = 0,
    provider: Annotated[list[str] | None, typer.Option(help="only these providers")] = None,
    min_gflops: Annotated[float, typer.Option(min=0, help="a measured floor (SSH hosts)")] = 0,
    rank: Annotated[str, typer.Option(help="price | cost_per_token: which offer first")] = (
        "price"
    ),
    params: Annotated[float, typer.Option(min=1, help="cost_per_token: model parameters")] = 1e9,
    inner_steps: Annotated[int, typer.Option(min=1, help="cost_per_token: steps per sync")] = 100,
    tokens_per_step: Annotated[
        int, typer.Option(min=1, help="cost_per_token: tokens per inner step")
    ] = 65_536,
    ready_timeout_s: Annotated[float, typer.Option(min=1, help="give up on a machine")] = 900,
    watch: Annotated[bool, typer.Option(help="start the budget watchdog in the background")] = (
        True
    ),
    watch_every_s: Annotated[float, typer.Option(min=0.05, help="the watchdog's period")] = 30,
    json_out: Annotated[bool, typer.Option("--json", help="the launch record as JSON")] = False,
    state_dir: Annotated[Path, _STATE] = STATE_DIR,
    hosts: Annotated[Path | None, _HOSTS] = None,
) -> None:
    """Launch COUNT nodes that join TASK: the cheapest offers that fit (or OFFER), each waited
    for until its node has joined; a launch that fails or never becomes ready falls over to
    the next offer. --budget-usd refuses what would cost more and stops every node when spent."""
    import asyncio

    from cotrain.market.catalog import Catalog
    from cotrain.market.offers import choose
    from cotrain.market.provider import LaunchSpec
    from cotrain.market.value import Workload

    if not task:
        raise usage("--task: which task the nodes join")
    if offer and cheapest:
        raise usage("name an OFFER or --cheapest, not both")
    if invite and key:
        raise usage("--invite or --key, not both")
    if rank not in ("price", "cost_per_token"):
        raise usage(f"--rank {rank}: use price or cost_per_token")
    q = _query(gpu, gpus, min_vram_gb, secure, community, region, max_price, provider)
    work = Workload(params=params, inner_steps=inner_steps, tokens_per_step=tokens_per_step)
    state = state_dir.expanduser()
    ln = _launcher(state, hosts, ready_timeout_s=ready_timeout_s, invites=invite,
                   min_gflops=min_gflops)  # fmt: skip
    if key is not None:
        ln.mint_invite = _minter(coordinator, key, task)
    spec = LaunchSpec(coordinator=coordinator, task=task, max_hours=max_hours or None)

    async def run() -> Any:
        await _check_task(coordinator, task)
        listing = await Catalog(list(ln.providers.values()), state / "offers.json").listing(
            refresh=True
        )
        offers = choose(listing.offers, q, by=rank, workload=work)  # type: ignore[arg-type]
        if offer:
            offers = [_find_offer(listing.offers, offer)]
        if not offers:
            raise usage("no offer fits (see `cotrain market offers`)")
        _say(f"{len(offers)} offer(s) fit; launching {count} node(s) for task {task}")
        ln.begin(spec, offers, count=count, budget_usd=budget_usd or None)
        if watch:  # on duty from the first machine on, not once they have all joined
            _start_watchdog(state, hosts, task, watch_every_s)
        return await ln.launch(spec, offers, count=count, budget_usd=budget_usd or None)

    rec = asyncio.run(run())
    if json_out:
        print(rec.model_dump_json(indent=1))
        return
    _nodes_table(rec, {})


async def _check_task(coordinator: str, task: str) -> None:
    """The task exists and admits nodes, or one line (exit 2) before anything is rented."""
    import aiohttp

    from cotrain.protocol.client import Client
    from cotrain.protocol.errors import NotFound

    try:
        async with Client(coordinator, timeout_s=10) as c:
            view = await c.get(f"/v1/tasks/{task}")
    except NotFound:
        raise usage(f"no task {task} at {coordinator}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise usage(f"cannot reach the coordinator at {coordinator}: {e}") from None
    if view.get("state") != "open":
        raise usage(f"task {task} is {view.get('state')}: nodes join open tasks only")


def _minter(coordinator: str, key: Path, task: str) -> Any:
    from cotrain.core.identity import Identity
    from cotrain.protocol.client import Client

    with _inputs(str(key)):
        ident = Identity.load(key)

    async def mint() -> str:
        import aiohttp

        from cotrain.market.provider import ProviderError
        from cotrain.protocol.errors import ProtocolError

        try:
            async with Client(coordinator, ident, timeout_s=30) as c:
                got = await c.write(f"/v1/tasks/{task}/invites", {"ttl_s": 3600})
        except (ProtocolError, aiohttp.ClientError, OSError, TimeoutError) as e:
            raise ProviderError(f"could not mint an invite for {task}: {e}") from None
        return str(got["invite"])

    return mint


def _inputs(what: str) -> Any:
    from cotrain.cli.role import user_inputs

    return user_inputs(what)


def _start_watchdog(state: Path, hosts: Path | None, task: str, every_s: float) -> None:
    """``cotrain market watch --task T`` in its own session, its output in the state dir."""
    import os
    import subprocess

    from cotrain.market.launcher import Ledger

    ledger = Ledger(state)
    rec = ledger.get(task)
    if rec is None:
        return
    if rec.watchdog_pid and alive(rec.watchdog_pid):
        return
    args = [sys.executable, "-m", "cotrain", "market", "watch", "--task", task]
    args += ["--every-s", str(every_s)]
    args += ["--state-dir", str(state)] + (["--hosts", str(hosts)] if hosts else [])
    log = (ledger.dir / f"{task}.watch.log").open("ab")
    with log:
        p = subprocess.Popen(
            args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    with ledger.update(task) as fresh:
        fresh.watchdog_pid = p.pid
    _say(f"watchdog: pid {p.pid}, log {ledger.dir / f'{task}.watch.log'}")


def _member_units(coordinator: str, task: str) -> dict[str, dict[str, Any]]:
    """The task's members on the coordinator, by node key ({} when it cannot be reached)."""
    import asyncio

    from cotrain.protocol.client import Client

    async def run() -> dict[str, dict[str, Any]]:
        async with Client(coordinator, timeout_s=10) as c:
            view = await c.get(f"/v1/tasks/{task}")
        return {m["node"]: m for m in view.get("members", [])}

    try:
        return asyncio.run(run())
    except Exception as e:
        _say(f"coordinator {coordinator}: {type(e).__name__}: {e}")
        return {}


def _nodes_table(rec: Any, members: dict[str, dict[str, Any]]) -> None:
    import time

    from rich.console import Console
    from rich.table import Table

    now = time.time()
    t = Table(title=f"task {rec.task}: {len(rec.nodes)} node(s)")
    for col in ("node", "provider", "instance", "state", "$/h", "hours", "spent", "member"):
        t.add_column(col)
    for n in rec.nodes:
        m = members.get(n.node_key or "", {})
        t.add_row(
            n.name, n.provider, n.instance_id, n.state, f"{n.usd_per_hour:.2f}",
            f"{n.hours(now):.3f}", f"{n.spent(now):.4f}", m.get("status", ""),
        )  # fmt: skip
    Console().print(t)
    budget = f" of ${rec.budget_usd:.2f}" if rec.budget_usd is not None else ""
    print(f"spent ${rec.spent(now):.4f}{budget}; running ${rec.rate():.2f}/h"
          + (f"; stopped: {rec.stopped}" if rec.stopped else ""))  # fmt: skip
    for f in rec.failures:
        print(f"failed: {f['provider']}:{f['offer_id']}: {f['why']}")


def _record(state: Path, task: str) -> Any:
    from cotrain.market.launcher import Ledger

    rec = Ledger(state).get(task)
    if rec is None:
        raise usage(f"no launch for task {task} in {state}")
    return rec


@app.command("status")
def status(
    task: Annotated[str, typer.Option(help="the task (default: every launched task)")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout")] = False,
    state_dir: Annotated[Path, _STATE] = STATE_DIR,
    hosts: Annotated[Path | None, _HOSTS] = None,
) -> None:
    """The launched nodes: their machines' state now, their membership of the task, the spend."""
    import asyncio

    from cotrain.market.launcher import Ledger

    state = state_dir.expanduser()
    ledger = Ledger(state)
    tasks = [task] if task else ledger.tasks()
    ln = _launcher(state, hosts)
    out = []
    for t in tasks:
        _record(state, t)
        asyncio.run(ln.refresh(t))  # the machines' states now
        rec = _record(state, t)
        members = _member_units(rec.coordinator, t)
        if json_out:
            dog = bool(rec.watchdog_pid and alive(rec.watchdog_pid))
            out.append(
                {**rec.model_dump(), "spent_usd": rec.spent(), "members": members, "watchdog": dog}
            )
        else:
            _nodes_table(rec, members)
    if json_out:
        print(json.dumps(out, indent=1))


@app.command("terminate")
def terminate(
    task: Annotated[str, typer.Option(help="the task whose nodes to stop")] = "",
    only: Annotated[list[str] | None, typer.Argument(help="these nodes (default: all)")] = None,
    state_dir: Annotated[Path, _STATE] = STATE_DIR,
    hosts: Annotated[Path | None, _HOSTS] = None,
) -> None:
    """Terminate the task's nodes (or the named ones); on SSH hosts, no process is left."""
    import asyncio

    if not task:
        raise usage("--task: whose nodes to terminate")
    state = state_dir.expanduser()
    _record(state, task)
    stopped = asyncio.run(_launcher(state, hosts).terminate(task, only or None))
    print(f"{len(stopped)} node(s) terminated")


@app.command("cost")
def cost(
    task: Annotated[str, typer.Option(help="the task")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout")] = False,
    state_dir: Annotated[Path, _STATE] = STATE_DIR,
) -> None:
    """What the task's nodes cost: so far, per node, and per unit of work the task accepted."""
    import time

    if not task:
        raise usage("--task: which task's cost")
    state = state_dir.expanduser()
    rec = _record(state, task)
    members = _member_units(rec.coordinator, task)
    now = time.time()
    rows = []
    for n in rec.nodes:
        units = int(members.get(n.node_key or "", {}).get("accepted_units", 0))
        spent = n.spent(now)
        rows.append({
            "node": n.name, "provider": n.provider, "instance_id": n.instance_id,
            "state": n.state, "usd_per_hour": n.usd_per_hour, "hours": n.hours(now),
            "spent_usd": spent, "accepted_units": units,
            "usd_per_accepted_unit": spent / units if units else None,
        })  # fmt: skip
    total = sum(r["spent_usd"] for r in rows)
    units = sum(r["accepted_units"] for r in rows)
    report = {
        "task": task, "spent_usd": total, "budget_usd": rec.budget_usd, "accepted_units": units,
        "usd_per_accepted_unit": total / units if units else None, "nodes": rows,
    }  # fmt: skip
    if json_out:
        print(json.dumps(report, indent=1))
        return
    for r in rows:
        per = r["usd_per_accepted_unit"]
        print(f"{r['node']:<18} {r['state']:<22} ${r['spent_usd']:.4f} for {r['hours']:.3f} h, "
              f"{r['accepted_units']} units" + (f", ${per:.6f}/unit" if per else ""))  # fmt: skip
    per = report["usd_per_accepted_unit"]
    print(f"total ${total:.4f}" + (f" of ${rec.budget_usd:.2f}" if rec.budget_usd else "")
          + f", {units} accepted units" + (f", ${per:.6f}/unit" if per else ""))  # fmt: skip


@app.command("budget")
def budget(
    task: Annotated[str, typer.Option(help="the task")] = "",
    usd: Annotated[float, typer.Option(min=0, help="the task's budget, in US dollars")] = -1.0,
    watch_every_s: Annotated[float, typer.Option(min=0.05, help="the watchdog's period")] = 30,
    state_dir: Annotated[Path, _STATE] = STATE_DIR,
    hosts: Annotated[Path | None, _HOSTS] = None,
) -> None:
    """Set the task's budget (raise it to launch again after the watchdog stopped it, lower
    it to stop sooner); the watchdog is started if its nodes run without one."""
    import time

    from cotrain.market.launcher import Ledger

    if not task or usd < 0:
        raise usage("--task and --usd: which task, and its budget")
    state = state_dir.expanduser()
    _record(state, task)
    with Ledger(state).update(task) as rec:
        spent = rec.spent(time.time())
        if rec.stopped == "budget" and usd > spent:
            rec.stopped = None
        rec.budget_usd = usd
    _start_watchdog(state, hosts, task, watch_every_s)
    print(f"task {task}: budget ${usd:.2f}, spent ${spent:.2f}")


@app.command("watch")
def watch(
    task: Annotated[str, typer.Option(help="the task to watch")] = "",
    every_s: Annotated[float, typer.Option(min=0.05, help="seconds between checks")] = 30.0,
    state_dir: Annotated[Path, _STATE] = STATE_DIR,
    hosts: Annotated[Path | None, _HOSTS] = None,
) -> None:
    """The budget watchdog (launch starts it): terminates every node of the task before its
    budget is spent, each node after --max-hours; exits when no node is left."""
    import asyncio
    import time

    if not task:
        raise usage("--task: which task to watch")
    state = state_dir.expanduser()
    _record(state, task)
    ln = _launcher(state, hosts)

    async def run() -> None:
        while True:
            try:
                if not await ln.watch_once(task, every_s=every_s):
                    return
            except Exception as e:
                _say(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}; again in {every_s:g} s")
            await asyncio.sleep(every_s)

    _say(f"{time.strftime('%H:%M:%S')} watching task {task} every {every_s:g} s")
    asyncio.run(run())
    rec = _record(state, task)
    _say(f"{time.strftime('%H:%M:%S')} nothing left running; spent ${rec.spent():.4f}"
         + (f" ({rec.stopped})" if rec.stopped else ""))  # fmt: skip
