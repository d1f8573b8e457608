"""`cotrain master`, `cotrain peer`, `cotrain demo` (DiLoCo) and `cotrain demo-collective`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def master(
        ctx: typer.Context,
        config: Annotated[Path | None, typer.Option(help="TOML file with master settings")] = None,
        host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
        port: Annotated[int | None, typer.Option(help="TCP port (0 = any free port)")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Run the membership master (moves no tensor data).

        Admits keys on --allow_keys=[...], keys holding a token from --token_issuers=[...], or,
        for quick local runs, any key that knows the run secret (COTRAIN_SECRET or --secret=)."""
        import asyncio
        import logging

        from cotrain.comm.config import MasterConfig
        from cotrain.comm.master import Master, serve
        from cotrain.core.config import load_config

        overrides = list(ctx.args)
        if host is not None:
            overrides.append(f"host={host}")
        if port is not None:
            overrides.append(f"port={port}")
        cfg = _or_exit(lambda: load_config(MasterConfig, config, overrides))
        _or_exit(lambda: Master(cfg))  # no admission rule, a bad key file: one line, exit 2
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )
        try:
            asyncio.run(serve(cfg))
        except KeyboardInterrupt:
            pass

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def peer(
        ctx: typer.Context,
        config: Annotated[Path | None, typer.Option(help="TOML file (PeerProgramConfig)")] = None,
        config_json: Annotated[str | None, typer.Option(help="the whole config as JSON")] = None,
    ) -> None:
        """Run a scripted peer: rounds of all-reduce with JSON events on stdout."""
        import logging

        from cotrain.comm.program import PeerProgramConfig, make_communicator, run
        from cotrain.core.config import load_config

        logging.basicConfig(level=logging.WARNING)
        if config_json is not None:
            cfg = _or_exit(lambda: PeerProgramConfig.model_validate_json(config_json))
        else:
            cfg = _or_exit(lambda: load_config(PeerProgramConfig, config, list(ctx.args)))
        comm = _or_exit(lambda: make_communicator(cfg))  # a missing key file: one line, exit 2
        raise typer.Exit(run(cfg, comm))

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def demo(
        ctx: typer.Context,
        workers: Annotated[int, typer.Option(help="DiLoCo workers at the start")] = 4,
        kill_outer: Annotated[int, typer.Option(help="outer step at which one is killed")] = 2,
    ) -> None:
        """Train a GPT on Shakespeare with DiLoCo: N workers, one killed, a fresh one joins.

        Extra --dotted.overrides change the worker config (e.g. --total_steps=400)."""
        from cotrain.demo.diloco import demo_config, run_demo

        run_demo(demo_config(list(ctx.args)), workers=workers, kill_outer=kill_outer)

    @app.command("demo-collective")
    def demo_collective(
        peers: Annotated[int, typer.Option(help="peers at the start")] = 4,
        numel: Annotated[int, typer.Option(help="values per all-reduce (fp32)")] = 8 << 20,
        rounds: Annotated[int, typer.Option(help="all-reduce rounds")] = 24,
        quantization: Annotated[str, typer.Option(help="none, fp16, bf16, int8, int4")] = "none",
        kill_round: Annotated[int, typer.Option(help="round in which one peer is killed")] = 8,
        join_round: Annotated[int, typer.Option(help="round after which a new peer starts")] = 14,
    ) -> None:
        """A master and N peers all-reducing a model-sized tensor; one is killed, one joins."""
        from cotrain.demo.collective import run_demo

        run_demo(
            peers=peers,
            numel=numel,
            rounds=rounds,
            quantization=quantization,
            kill_round=kill_round,
            join_round=join_round,
        )


def _or_exit(make: Callable[[], T]) -> T:
    """Run ``make``; a bad config or missing secret is one clear line and exit code 2."""
    from pydantic import ValidationError

    try:
        return make()
    except (ValueError, ValidationError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
