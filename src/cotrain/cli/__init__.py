"""The one ``cotrain`` command. Each process role is a subcommand; heavy imports happen inside them.

Subcommand groups live in sibling modules (``comm.py``, ``shardcast.py``, ...) and are registered
in ``_GROUPS`` below, so ``cotrain --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="cotrain",
    help="Train one model together over the internet with people you do not trust.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# module name -> how it attaches: "commands" adds its top-level commands to `cotrain`,
# a group name adds its Typer as `cotrain <group>`.
_GROUPS: dict[str, str] = {
    "comm": "commands",
    "keys": "commands",
    "shardcast": "shardcast",
    "toploc": "toploc",
    "train": "commands",
}


def _register() -> None:
    for module_name, how in _GROUPS.items():
        module = importlib.import_module(f"cotrain.cli.{module_name}")
        if how == "commands":
            module.register(app)
        else:
            app.add_typer(module.app, name=how)


_register()


def main() -> None:
    app()
