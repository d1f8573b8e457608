"""`cotrain master`, `cotrain peer`, `cotrain demo` (DiLoCo) and `cotrain demo-collective`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cotrain.cli.role import Role, add_role, binding, cannot_join, connect_errors, user_inputs


def _master_model() -> Any:
    from cotrain.comm.config import MasterConfig

    return MasterConfig


def _run_master(cfg: Any) -> int:
    import asyncio

    from cotrain.comm.master import Master
    from cotrain.core.service import Service

    with user_inputs():  # no admission rule, a bad key file
        master = Master(cfg)

    def summary() -> str:
        joined = {e.get("key") for e in master.events if e.get("event") == "joined"}
        return f"{len(joined)} peers joined, epoch {master.epoch}, {len(master.peers)} connected"

    async def serve(svc: Service) -> None:
        try:
            with binding(cfg.host, cfg.port, flag="--port"):
                port = await master.start()
            key = master.identity.public_hex
            print(f"cotrain master listening on {cfg.host}:{port} key {key}", file=sys.stderr)
            svc.ready(host=cfg.host, port=port, key=key, run_id=cfg.run_id)
            if cfg.coordinator:
                from cotrain.protocol.runs import ban_ejected

                watch = asyncio.create_task(
                    ban_ejected(master, cfg.coordinator, cfg.run_id, cfg.coordinator_poll_s)
                )
                try:
                    await svc.stopped()
                finally:
                    watch.cancel()
            else:
                await svc.stopped()
        finally:
            await master.close()

    with Service("master") as svc:
        svc.summary = summary
        asyncio.run(serve(svc))
    return svc.exit_code


MASTER = Role(
    name="master",
    help="""Run the membership master (moves no tensor data).

    Admits keys on --allow_keys '["..."]', keys holding a token from --token_issuers '["..."]',
    or, for quick local runs, any key that knows the run secret (COTRAIN_SECRET). With
    --coordinator URL (the run of a protocol task: --run_id is the task id, --token_issuers the
    coordinator's key) every node the coordinator ejects is banned from the run. Prints its
    ready line {"event": "ready", "role": "master", "port": ..., "key": ...} on stdout.""",
    model=_master_model,
    run=_run_master,
)


def _peer_model() -> Any:
    from cotrain.demo.peer import PeerProgramConfig

    return PeerProgramConfig


def _run_peer(cfg: Any) -> int:
    from cotrain.core.service import Service
    from cotrain.demo.peer import make_communicator, run

    with user_inputs():  # a missing key or token file, no way to check the master
        comm = make_communicator(cfg)
    with Service("peer") as svc:
        svc.summary = lambda: f"epoch {comm.epoch}, {comm.bytes_sent} bytes sent"
        try:
            comm.connect()
        except connect_errors() as e:
            comm.close()
            raise cannot_join(cfg.comm, e) from None
        svc.ready(index=cfg.index, key=comm.peer_id)
        run(cfg, comm)
    return svc.exit_code


PEER = Role(
    name="peer",
    help="""Run a scripted peer: rounds of all-reduce with JSON events on stdout.""",
    model=_peer_model,
    run=_run_peer,
)


def register(app: typer.Typer) -> None:
    add_role(app, MASTER)
    add_role(app, PEER)

    @app.command(
        help="The whole network on this machine: INTELLECT-1 then INTELLECT-2 in miniature."
        "\n\nA coordinator and its dashboard (the URL is printed first); a DiLoCo pretraining "
        "task trained by 4 nodes the market's local provider launches (one is killed, a fresh "
        "one joins); an RL task (SmolLM2-135M-Instruct on chain_sum) with untrusted inference "
        "nodes, one of them a cheater the validators catch and the ledger slashes; both tasks "
        "finalized, `cotrain audit` over the ledger, and a closing table of every node's "
        "work, rewards, shares and slashes. Texts and the model come from the package "
        "registry on first use and are cached. OUT_DIR gets the ledger, keys, logs, "
        "summary.json and demo.png."
    )
    def demo(
        out_dir: Annotated[
            str,
            typer.Option(help="where everything goes (a previous demo's directory is emptied)"),
        ] = "runs/demo",
        quick: Annotated[
            bool, typer.Option("--quick", help="the same story, small (about 2 minutes)")
        ] = False,
        exit_: Annotated[
            bool,
            typer.Option(
                "--exit",
                help="leave when the story ends (default: keep the dashboard up until Ctrl-C)",
            ),
        ] = False,
        port: Annotated[
            int, typer.Option(help="the coordinator's and dashboard's port (0: any free one)")
        ] = 0,
    ) -> None:
        from cotrain.demo.network import main

        raise typer.Exit(main(Path(out_dir), quick=quick, port=port, stay=not exit_))

    @app.command(
        "demo-diloco",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help="Train a GPT on Shakespeare with DiLoCo: N workers, one killed, a fresh one joins."
        "\n\nA live table follows the workers (outside a terminal: one line per event); the "
        "closing table, the summary (OUT_DIR/summary.json) and the loss plot (OUT_DIR/loss.png) "
        "are read from the workers' logs. Extra --dotted.overrides change the worker config, "
        "e.g. --algo.inner_steps=20, --model.n_embd=256, --algo.outer.momentum=0.9.",
    )
    def demo_diloco(
        ctx: typer.Context,
        out_dir: Annotated[
            str,
            typer.Option(
                help="where the workers' logs (worker<i>.jsonl), checkpoints and models, "
                "summary.json and loss.png go (a previous demo's files there are replaced)"
            ),
        ] = "runs/demo-diloco",
        quick: Annotated[
            bool,
            typer.Option(
                "--quick", help="a short run: 2 workers x 120 steps (about 30 s on 2 idle cores)"
            ),
        ] = False,
        workers: Annotated[
            int | None,
            typer.Option(help="DiLoCo workers at the start (default 4; --quick: 2)"),
        ] = None,
        steps: Annotated[
            int | None,
            typer.Option(
                help="inner steps of the run, an outer step every 10 (default 240; --quick: 120)"
            ),
        ] = None,
        kill_outer: Annotated[
            int | None,
            typer.Option(
                help="outer step after which the last worker is killed (default: a quarter "
                "of the run)"
            ),
        ] = None,
    ) -> None:
        from cotrain.demo.diloco import DEFAULT_WORKERS, QUICK_WORKERS, demo_config, run_demo

        cfg = demo_config(list(ctx.args), quick=quick, steps=steps, out_dir=out_dir)
        n = workers if workers is not None else QUICK_WORKERS if quick else DEFAULT_WORKERS
        run_demo(cfg, workers=n, kill_outer=kill_outer)

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
