"""`cotrain train` (one worker of a DiLoCo / DDP / single-worker run) and `cotrain data prepare`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from cotrain.cli.role import Role, add_role, cannot_join, connect_errors, user_inputs

data_app = typer.Typer(
    help="Training data: download, tokenizer, cached tokens.", no_args_is_help=True
)


def _train_model() -> Any:
    from cotrain.diloco.config import TrainConfig

    return TrainConfig


def write_config(path: Path, text: str) -> None:
    """Write the resolved config atomically (a tmp file, then rename)."""
    with user_inputs(f"cannot write {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)


def _run_train(cfg: Any) -> int:
    from cotrain.core.service import Service
    from cotrain.diloco.worker import Worker

    if cfg.algo.mode != "single":
        from cotrain.comm import Communicator

        with user_inputs():  # a missing key or token file, no way to check the master
            Communicator(cfg.comm).close()
    write_config(Path(cfg.out_dir) / f"config{cfg.worker_index}.json", cfg.dump_json())
    with Service("train") as svc:
        worker = Worker(cfg)  # data and model; a checkpoint of another run is a UsageError

        def summary() -> str:
            sent = worker.comm.bytes_sent if worker.comm is not None else 0
            return f"worker {cfg.worker_index}: {worker.tokens} tokens, {sent} bytes sent"

        svc.summary = summary
        svc.ready(worker_index=cfg.worker_index, mode=cfg.algo.mode, out_dir=cfg.out_dir)
        try:
            worker.run()
        except connect_errors() as e:
            if worker.comm is None or worker.comm.epoch == 0:  # never got into the run
                raise cannot_join(cfg.comm, e) from None
            raise
    return svc.exit_code


TRAIN = Role(
    name="train",
    help="""Run one training worker (DiLoCo, DDP or single); JSON-lines metrics on stdout.

    The resolved config is written to out_dir/config<worker_index>.json. SIGINT and SIGTERM
    stop it (the last checkpoint stays); several workers on one machine: cotrain launch.""",
    model=_train_model,
    run=_run_train,
)


def _run_prepare(cfg: Any) -> int:
    from rich.progress import Progress

    from cotrain.data import prepare

    with Progress() as bar:
        tasks: dict[str, object] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)  # type: ignore[arg-type]

        data = prepare(cfg.data, progress=progress)
    print(
        f"{data.path}: vocabulary {data.vocab_size}, {data.train_tokens} training and "
        f"{data.val_tokens} validation tokens"
    )
    return 0


PREPARE = Role(
    name="data prepare",
    help="""Download the texts, train the BPE and cache the tokens (what training does first).

    Reads the [data] section of a train config.""",
    model=_train_model,
    run=_run_prepare,
)


def register(app: typer.Typer) -> None:
    add_role(app, TRAIN)
    add_role(data_app, PREPARE)
    app.add_typer(data_app, name="data")
