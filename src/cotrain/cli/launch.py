"""`cotrain launch`: a master and N training workers (or N copies of a script) from one terminal.

    cotrain launch --nproc 2 configs/train-debug.toml [--algo.inner_steps 10 ...]
    cotrain launch --nproc 2 my_train.py [script args]
    COTRAIN_SECRET=... cotrain launch --nproc 1 --master HOST:PORT --first-index 2 CONFIG.toml

Launch's own fields (``LaunchConfig``: ``--nproc``, ``--master``, ``--first-index``, ...) come
before the target, or anywhere after a CONFIG.toml; everything else after a CONFIG.toml is a
``TrainConfig`` override (checked here, before anything starts); everything after a script is
the script's. What runs and how it stops: ``cotrain.launch.runner``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from cotrain.cli.role import Role, parse_args, render_help, usage

_VALUELESS = {"-h", "--help", "--print-config", "-v", "--verbose"}


def _launch_model() -> Any:
    from cotrain.launch.config import LaunchConfig

    return LaunchConfig


def _unused(cfg: Any) -> int:
    raise AssertionError("cotrain launch runs through _launch")


LAUNCH = Role(
    name="launch",
    help="""Start a master and N training workers here, stream their logs, stop them together.

    cotrain launch --nproc N CONFIG.toml [--section.key value ...]: N `cotrain train` workers
    (--worker_index=i --world=N, the same config and overrides) and a master (a random secret,
    a free port). cotrain launch --nproc N script.py [args]: N copies of a Python script, each
    with COTRAIN_COMM__MASTER_HOST, COTRAIN_COMM__MASTER_PORT, COTRAIN_SECRET,
    COTRAIN_WORKER_INDEX and COTRAIN_WORLD in its environment (config_from_env(CommConfig,
    "COTRAIN_COMM__") reads them). --master HOST:PORT (COTRAIN_SECRET set) adds the workers to
    a running run (--join=join) instead of starting a master. Output lines are prefixed
    [master] and [w0]; Ctrl-C or SIGTERM stops everything; the exit code is the workers'.""",
    model=_launch_model,
    run=_unused,
    usage="launch [--nproc N --master HOST:PORT --first-index K] CONFIG.toml [--KEY VALUE ...]"
    "\n   or: cotrain launch [--nproc N ...] script.py [ARGS ...]",
)


def _split(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(launch's tokens, the target, the tokens after it)."""
    mine: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("-"):
            return mine, tok, list(argv[i + 1 :])
        mine.append(tok)
        # every launch field takes a value (so does a mistyped one: its error names the key)
        takes_value = "=" not in tok and tok not in _VALUELESS
        if takes_value and i + 1 < len(argv):
            mine.append(argv[i + 1])
            i += 1
        i += 1
    return mine, None, []


def _train_target(inv: Any, model: Any, path: Path, rest: list[str]) -> tuple[Any, Any, list[str]]:
    """(launch's config, the workers' Target, what --print-config prints) for a CONFIG.toml:
    launch's own fields may follow the config too; the rest is checked as worker 0's config."""
    from cotrain.cli.train import TRAIN
    from cotrain.core.config import load_config
    from cotrain.diloco.config import TrainConfig
    from cotrain.launch.runner import Target

    worker_args: list[str] = []
    launch_args: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        key = tok.partition("=")[0][2:].replace("-", "_")
        if (
            tok.startswith("--")
            and key in model.model_fields
            and key not in TrainConfig.model_fields
        ):
            launch_args.append(tok)
            if "=" not in tok and i + 1 < len(rest):
                launch_args.append(rest[i + 1])
                i += 1
        else:
            worker_args.append(tok)
        i += 1
    inv.overrides.update(parse_args(LAUNCH, model, launch_args).overrides)
    cfg = load_config(model, inv.config, inv.overrides)
    train_inv = parse_args(TRAIN, TrainConfig, [str(path), *worker_args])
    inv.help = inv.help or train_inv.help
    inv.print_config = inv.print_config or train_inv.print_config
    first = {"join": "join"} if cfg.master is not None else {"world": str(cfg.nproc)}
    worker0 = load_config(
        TrainConfig, path, {**first, **train_inv.overrides, "worker_index": str(cfg.first_index)}
    )
    single = worker0.algo.mode == "single"
    target = Target("config", path, tuple(worker_args), single=single)
    return cfg, target, [cfg.dump_json(), worker0.dump_json()]


def _run(argv: Sequence[str]) -> int:
    from cotrain.cli.role import configure_logging
    from cotrain.core.config import load_config
    from cotrain.core.service import Service
    from cotrain.launch.runner import Launch, Target

    model = _launch_model()
    mine, name, rest = _split(argv)
    inv = parse_args(LAUNCH, model, mine)
    if not inv.help and name is None:
        raise usage("give a CONFIG.toml or a script.py to launch (see cotrain launch --help)")
    if name is not None and Path(name).suffix == ".toml":
        cfg, target, resolved = _train_target(inv, model, Path(name), rest)
    else:
        cfg = load_config(model, inv.config, inv.overrides)
        target, resolved = Target("script", Path(name or "-"), tuple(rest)), [cfg.dump_json()]
    if inv.help:
        print(render_help(LAUNCH, model))
        return 0
    if inv.print_config:
        print("\n".join(resolved))
        return 0
    if target.kind == "script" and not target.path.is_file():
        raise usage(f"{target.path} does not exist (launch takes a CONFIG.toml or a script.py)")
    if target.kind == "script" and target.path.suffix != ".py":
        raise usage(f"{target.path} is neither a CONFIG.toml nor a script.py: launch takes one")
    configure_logging(inv.log_level)
    code = 0
    with Service("launch") as svc:
        code = Launch(cfg, target).run(svc)
    return svc.exit_code if svc.stop_signal is not None else code


def register(app: typer.Typer) -> None:
    @app.command(
        "launch",
        help=LAUNCH.help,
        add_help_option=False,
        context_settings={
            "ignore_unknown_options": True,
            "allow_extra_args": True,
            "allow_interspersed_args": False,
        },
    )
    def launch(ctx: typer.Context) -> None:
        code = _run(ctx.args)
        if code:
            raise typer.Exit(code)
