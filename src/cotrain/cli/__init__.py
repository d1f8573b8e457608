"""The one ``cotrain`` command. Each process role is a subcommand; heavy imports happen inside them.

Subcommand groups live in sibling modules (``comm.py``, ``shardcast.py``, ...) and are registered
in ``_GROUPS`` below, so ``cotrain --help`` stays fast. Every role reads its command line the
same way (``role.py``). Errors are handled here, once, for every command:

* ``UsageError`` (a user's mistake: a bad key or value, a missing file, a port in use, no
  master at that address), pydantic's ``ValidationError`` and click's own usage errors: one
  ``error: ...`` line on stderr, exit code 2.
* any other ``CotrainError`` (raised on purpose: a fetch that found no server, a failed round):
  one ``error: ...`` line, exit code 1.
* Ctrl-C outside a service's own handling: ``interrupted``, exit code 130; a closed stdout
  (``cotrain ... | head``): nothing more, exit code 141.
* anything else is a bug: its traceback is printed.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

__all__ = ["app", "main"]


def _one_line(message: str) -> str:
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` (folded to one line) on stderr; the ``Exit`` to raise."""
    print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _Cotrain(TyperGroup):
    """The root group: one place that turns every error into its line and exit code."""

    def invoke(self, ctx: Any) -> Any:
        from pydantic import ValidationError

        from cotrain.core.errors import CotrainError, UsageError

        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # click's own: handled in main
        except (UsageError, ValidationError) as e:
            raise fail(str(e), 2) from None
        except CotrainError as e:
            raise fail(str(e), 1) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            _quiet_stdout()
            raise typer.Exit(141) from None

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click's parse errors: one line, not a box
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":  # `cotrain shardcast`: its help
                print(e.format_message())
            else:
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                fail(e.format_message() + hint)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="cotrain",
    cls=_Cotrain,
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
    "launch": "commands",
    "market": "market",
    "protocol": "commands",
    "rl": "rl",
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
    app(prog_name="cotrain")
