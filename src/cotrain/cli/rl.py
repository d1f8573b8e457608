"""``cotrain rl``: the roles of an asynchronous RL run, and ``run`` to start them all here.

Every role reads the same config file (``configs/rl-debug.toml``) and uses its section; what
differs between processes of one role goes on the command line (``--worker.key w2.pem``).
"""

from __future__ import annotations

from typing import Any

import typer

from cotrain.cli.role import Role, add_role

app = typer.Typer(
    help="Asynchronous RL with untrusted inference workers: orchestrator, worker, validator, "
    "trainer; `run` starts all of them on this machine.",
    no_args_is_help=True,
)


def _model() -> Any:
    from cotrain.rl.config import RLConfig

    return RLConfig


def _orchestrator(cfg: Any) -> int:
    from cotrain.rl.orchestrator import run_orchestrator

    return run_orchestrator(cfg)


def _worker(cfg: Any) -> int:
    from cotrain.rl.worker import run_worker

    return run_worker(cfg)


def _validator(cfg: Any) -> int:
    from cotrain.rl.validator import run_validator

    return run_validator(cfg)


def _trainer(cfg: Any) -> int:
    from cotrain.rl.trainer import run_trainer

    return run_trainer(cfg)


def _run(cfg: Any) -> int:
    from cotrain.rl.launch import run_local

    return run_local(cfg)


ROLES = [
    Role(
        "rl orchestrator",
        """Assign tasks, take signed rollouts, hand them to validators, form the trainer's batches.

        Trusted. Serves HTTP on orchestrator.host:port; journals every event under
        run.out_dir/orchestrator (a restart replays it) and stores each step's rollouts and
        verdicts under orchestrator.store_url (a directory or an s3:// URL).""",
        _model,
        _orchestrator,
    ),
    Role(
        "rl worker",
        """Generate rollouts for the orchestrator's assignments (untrusted; any number).

        Fetches each policy version through shardcast, samples with the assigned seeds,
        proves with TOPLOC, signs with worker.key and submits. JSON lines on stdout.""",
        _model,
        _worker,
    ),
    Role(
        "rl validator",
        """Check rollouts cheapest first and sign verdicts (validator.key must be listed in
        orchestrator.validator_keys).""",
        _model,
        _validator,
    ),
    Role(
        "rl trainer",
        """Train on accepted rollouts (two-sided-clip GRPO), publish each version through
        shardcast, checkpoint and resume. One JSON line per step on stdout.""",
        _model,
        _trainer,
    ),
    Role(
        "rl run",
        """Start a whole RL run on this machine: orchestrator, trainer, validators, workers
        (launch.workers, launch.validators, launch.cheaters); progress per step, then a summary
        in run.out_dir/summary.json with the peak memory of all processes.""",
        _model,
        _run,
    ),
]

for _role in ROLES:
    add_role(app, _role)
