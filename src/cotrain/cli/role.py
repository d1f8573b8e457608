"""How every role reads its command line: ``cotrain ROLE [CONFIG.toml] [--section.key value]``.

A role is a config model plus a function. Its command line, in any order:

* ``CONFIG.toml`` (a positional ending in ``.toml``; or ``--config PATH``): the TOML file.
* ``--section.key value`` or ``--section.key=value``: any field of the model (``-`` reads as
  ``_``). A bool field alone (``--algo.overlap``) is true; ``--algo.overlap=false`` is false.
  A list field takes TOML (``'["a", "b"]'``) or a comma list (``a,b``).
* the role's positionals (``cotrain toploc verify ROLLOUTS.jsonl``), each a field too.
* the role's aliases: short flags, each exactly one field (``--port`` is ``--serve.port``);
  ``--set key=value`` is ``--key=value`` (the old shardcast spelling, kept for scripts).
* ``--print-config`` (print the resolved config as JSON, exit 0), ``--log-level LEVEL``
  (``-v``: info), ``-h``/``--help`` (every field: dotted name, type, default, docstring).

Environment variables ``COTRAIN_<SECTION>__<KEY>`` sit between the file and the command line
(``cotrain.core.config``). Mistakes are ``UsageError``s, reported by the CLI in one line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel

LOG_LEVELS = ("debug", "info", "warning", "error")
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def usage(message: str) -> Exception:
    """A ``UsageError`` (imported when needed: ``cotrain --help`` imports no pydantic)."""
    from cotrain.core.errors import UsageError

    return UsageError(message)


@dataclass(frozen=True)
class Alias:
    """A short flag kept for convenience; it sets exactly one field."""

    flag: str
    """The flag, e.g. ``--port``."""
    key: str
    """The field it sets, e.g. ``serve.port``."""
    form: Literal["value", "append", "const"] = "value"
    """``value``: takes a value; ``append``: repeatable, each adds one list item;
    ``const``: takes none and sets ``const``."""
    const: str = ""
    """The value a ``const`` flag sets."""


@dataclass(frozen=True)
class Role:
    """One ``cotrain`` role: its config model and what runs it."""

    name: str
    """As typed: ``master``, ``shardcast relay``."""
    help: str
    """First line: what the role does; the rest: details for ``--help``."""
    model: Callable[[], type[BaseModel]]
    """The config model, imported when needed (some import torch)."""
    run: Callable[[Any], int | None]
    """Runs the role with its resolved config; returns the exit code (None: 0)."""
    positionals: tuple[tuple[str, str], ...] = ()
    """(field, METAVAR) filled by positional arguments, in order."""
    aliases: tuple[Alias, ...] = ()
    usage: str = ""
    """The usage line after ``cotrain``, when not the usual one."""


@dataclass
class Invocation:
    """A parsed command line."""

    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    print_config: bool = False
    help: bool = False
    log_level: str | None = None


# ---- parsing -------------------------------------------------------------------------------------


def _is_bool(model: type[BaseModel], key: str) -> bool:
    from cotrain.core.config import field_for, is_bool

    info = field_for(model, key)
    return info is not None and is_bool(info)


def parse_args(role: Role, model: type[BaseModel], argv: Sequence[str]) -> Invocation:
    """Read ``argv`` (everything after the role's name); ``UsageError`` for a mistake."""
    from cotrain.core.config import field_for

    inv = Invocation()
    aliases = {a.flag: a for a in role.aliases}
    positionals = list(role.positionals)
    args = list(argv)
    i = 0

    def value_of(flag: str, inline: str | None) -> str:
        nonlocal i
        if inline is not None:
            return inline
        if i + 1 >= len(args):
            raise usage(f"{flag} needs a value")
        i += 1
        return args[i]

    while i < len(args):
        tok = args[i]
        name, eq, inline_text = tok.partition("=")
        inline = inline_text if eq else None
        if tok in ("-h", "--help"):
            inv.help = True
        elif tok == "--print-config":
            inv.print_config = True
        elif name == "--config":
            inv.config = Path(value_of(name, inline))
        elif tok in ("-v", "--verbose"):
            inv.log_level = "info"
        elif name == "--log-level":
            level = value_of(name, inline).lower()
            if level not in LOG_LEVELS:
                raise usage(f"--log-level {level!r}: use one of {', '.join(LOG_LEVELS)}")
            inv.log_level = level
        elif name in ("--set", "-s"):  # the old shardcast spelling of an override
            key, sep, raw = value_of(name, inline).partition("=")
            if not sep:
                raise usage(f"{name} takes KEY=VALUE, e.g. {name} serve.port=0")
            key = key.strip().replace("-", "_")
            field_for(model, key)
            inv.overrides[key] = raw
        elif name in aliases:
            alias = aliases[name]
            if alias.form == "const":
                if inline is not None:
                    raise usage(f"{name} takes no value")
                inv.overrides[alias.key] = alias.const
            elif alias.form == "append":
                inv.overrides.setdefault(alias.key, []).append(value_of(name, inline))
            else:
                inv.overrides[alias.key] = value_of(name, inline)
        elif tok.startswith("--") and len(tok) > 2:
            key = name[2:].replace("-", "_")
            field_for(model, key)  # an unknown key fails here, with a hint
            if inline is None and _is_bool(model, key):
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is None or nxt.lower() not in _BOOL_WORDS:
                    inline = "true"
            inv.overrides[key] = value_of(name, inline)
        elif tok.startswith("-") and tok != "-":
            raise usage(f"unknown option {tok!r} (options set config fields: --KEY VALUE)")
        elif tok.endswith(".toml") and inv.config is None:
            inv.config = Path(tok)
        elif positionals:
            key, _ = positionals.pop(0)
            inv.overrides[key] = tok
        else:
            raise usage(f"unexpected argument {tok!r} (see cotrain {role.name} --help)")
        i += 1
    return inv


# ---- help ----------------------------------------------------------------------------------------


def render_help(role: Role, model: type[BaseModel]) -> str:
    """The ``--help`` text: usage, options, aliases and every config field."""
    from cotrain.core.config import describe

    pos = " ".join(meta for _, meta in role.positionals)
    usual = f"{role.name} {pos + ' ' if pos else ''}[CONFIG.toml] [--KEY VALUE ...]"
    first = f"Usage: cotrain {role.usage or usual}"
    head, _, body = role.help.partition("\n")
    out = [first, "", head.strip()]
    if body.strip():
        out += ["", textwrap.dedent(body).strip()]
    out += [
        "",
        "Options:",
        "  CONFIG.toml, --config PATH   TOML file with the fields below",
        "  --KEY VALUE, --KEY=VALUE     set a field (a bool field alone is true; lists: a,b or",
        '                               TOML \'["a", "b"]\'); env: COTRAIN_KEY with __ for dots',
        "  --set KEY=VALUE              the same as --KEY=VALUE (kept for old scripts)",
        "  --print-config               print the resolved config as JSON and exit",
        "  --log-level LEVEL            debug, info, warning (default) or error; -v: info",
        "  -h, --help                   this help",
    ]
    if role.aliases:
        out += ["", "Aliases (each sets one field):"]
        for a in role.aliases:
            flag = a.flag if a.form == "const" else f"{a.flag} VALUE"
            what = {"value": f"--{a.key}", "append": f"adds one item to --{a.key}"}.get(
                a.form, f"--{a.key}={a.const}"
            )
            out.append(f"  {flag:<28} {what}")
    out += ["", f"Config fields ({model.__name__}; precedence: defaults < TOML < env < CLI):"]
    for doc in describe(model):
        out.append(f"  --{doc.key}  {doc.type} = {doc.default}")
        if doc.doc:
            out += textwrap.wrap(doc.doc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)


# ---- running -------------------------------------------------------------------------------------


def configure_logging(level: str | None) -> None:
    logging.basicConfig(
        level=(level or "warning").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def run_role(role: Role, argv: Sequence[str]) -> int:
    """Parse ``argv``, resolve the config, run the role; its exit code. Errors propagate to the
    one handler in ``cotrain.cli`` (``UsageError``: one line, exit 2)."""
    from cotrain.core.config import load_config

    model = role.model()
    inv = parse_args(role, model, argv)
    if inv.help:
        print(render_help(role, model))
        return 0
    cfg = load_config(model, inv.config, inv.overrides)
    if inv.print_config:
        print(cfg.dump_json())  # type: ignore[attr-defined]
        return 0
    configure_logging(inv.log_level)
    code = role.run(cfg)
    return 0 if code is None else code


@contextlib.contextmanager
def user_inputs(what: str = "") -> Iterator[None]:
    """A ``ValueError`` or ``OSError`` raised inside came from what the user gave (a key file,
    an address, a value a library refused): re-raised as a ``UsageError``."""
    from cotrain.core.errors import UsageError

    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as e:
        raise usage(f"{what}: {e}" if what else str(e)) from None


@contextlib.contextmanager
def binding(host: str, port: int, *, flag: str) -> Iterator[None]:
    """Around a server's bind: an address in use or not ours is the user's mistake."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise usage(
                f"port {port} on {host} is in use: pick another with {flag} (0: any free port)"
            ) from None
        raise usage(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def add_role(app: typer.Typer, role: Role, name: str | None = None) -> None:
    """Register ``role`` as a command of the Typer ``app`` (its last word by default); the
    command line is read by ``run_role``, not by click."""

    def command(ctx: typer.Context) -> None:
        code = run_role(role, ctx.args)
        if code:
            raise typer.Exit(code)

    app.command(
        name or role.name.split()[-1],
        help=role.help,
        add_help_option=False,
        context_settings={
            "ignore_unknown_options": True,
            "allow_extra_args": True,
            "allow_interspersed_args": False,
        },
    )(command)


def connect_errors() -> tuple[type[BaseException], ...]:
    """The errors of reaching and joining a master: the wrong address, secret or key."""
    from cotrain.comm.errors import AuthError, KickedError, MasterUnreachableError

    return (MasterUnreachableError, AuthError, KickedError)


def cannot_join(comm: Any, e: BaseException) -> Exception:
    """A peer or worker that never got into the run: the user's address, secret or key."""
    return usage(
        f"cannot join the run at {comm.master_host}:{comm.master_port}: {e} (check "
        f"comm.master_host, comm.master_port and the secret or key; comm.connect_timeout_s="
        f"{comm.connect_timeout_s:g} bounds the wait)"
    )
