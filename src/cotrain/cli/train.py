"""`cotrain train` (one worker of a DiLoCo / DDP / single-worker run) and `cotrain data prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(
    help="Training data: download, tokenizer, cached tokens.", no_args_is_help=True
)


@data_app.command("prepare", context_settings={"allow_extra_args": True})
def prepare_cmd(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Argument(help="TOML file (a TrainConfig)")] = None,
) -> None:
    """Download the texts, train the BPE and cache the tokens (what training does on first use)."""
    from rich.progress import Progress

    from cotrain.core.config import load_config
    from cotrain.data import prepare
    from cotrain.diloco.config import TrainConfig

    cfg = load_config(TrainConfig, config, list(ctx.args))
    with Progress() as bar:
        tasks: dict[str, object] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)  # type: ignore[arg-type]

        data = prepare(cfg.data, progress=progress)
    typer.echo(
        f"{data.path}: vocabulary {data.vocab_size}, {data.train_tokens} training and "
        f"{data.val_tokens} validation tokens"
    )


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def train(
        ctx: typer.Context,
        config: Annotated[Path | None, typer.Argument(help="TOML file (a TrainConfig)")] = None,
        config_json: Annotated[str | None, typer.Option(help="the whole config as JSON")] = None,
    ) -> None:
        """Run one training worker (DiLoCo, DDP or single); JSON-lines metrics on stdout."""
        import logging

        from cotrain.core.config import load_config
        from cotrain.diloco import TrainConfig, train

        logging.basicConfig(level=logging.WARNING)
        if config_json is not None:
            cfg = TrainConfig.model_validate_json(config_json)
        else:
            cfg = load_config(TrainConfig, config, list(ctx.args))
        if cfg.algo.mode != "single":
            from cotrain.comm import Communicator

            try:  # a missing key or token file, no way to check the master: one line, exit 2
                Communicator(cfg.comm).close()
            except ValueError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"config{cfg.worker_index}.json").write_text(cfg.dump_json())
        train(cfg)

    app.add_typer(data_app, name="data")
