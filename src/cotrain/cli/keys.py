"""`cotrain keygen` and `cotrain token`: every participant is an ed25519 key.

One key file per participant and role-independent: the same `cotrain keygen` makes a peer's,
a master's, a shardcast publisher's and a token issuer's key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    @app.command()
    def keygen(
        key: Annotated[Path, typer.Option("--key", help="private key file (PEM, mode 0600)")],
        force: Annotated[bool, typer.Option(help="replace an existing key")] = False,
    ) -> None:
        """Create an ed25519 key (or read the existing one) and print its public key."""
        from cotrain.core.identity import Identity

        try:
            if key.exists() and not force:
                ident = Identity.load(key)
                print(f"{key} exists; its public key:", file=sys.stderr)
            else:
                ident = Identity.generate()
                ident.save(key)
        except (OSError, ValueError) as e:
            _fail(f"{key}: {e}")
            return
        print(ident.public_hex)

    @app.command()
    def token(
        key: Annotated[Path, typer.Option("--key", help="the issuer's key (a run trusts it)")],
        peer: Annotated[str, typer.Option(help="public key (64 hex) of the peer to admit")],
        run: Annotated[str, typer.Option(help="the run the token admits to (its run_id)")],
        ttl_s: Annotated[float, typer.Option(help="seconds the token stays valid")] = 86400.0,
        out: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
    ) -> None:
        """Issue an admission token: a signed envelope that lets one key into one run."""
        from cotrain.comm.auth import issue_token
        from cotrain.core.identity import Identity

        try:
            env = issue_token(Identity.load(key), peer.lower(), run=run, ttl_s=ttl_s)
        except FileNotFoundError:
            _fail(f"no key at {key}: create one with `cotrain keygen --key {key}`")
            return
        except ValueError as e:
            _fail(str(e))
            return
        text = env.to_bytes().decode()
        if out is None:
            print(text)
        else:
            out.write_text(text + "\n")
