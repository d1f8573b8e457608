"""`cotrain shardcast ...`: origin, publish, relay, fetch (keys: `cotrain keygen`).

Servers announce themselves with one JSON line on stdout, ``{"event": "ready", "role":
"origin", "url": ..., "port": ...}``; ``publish`` and ``fetch`` print one JSON line describing
what they did. Every field is set the one way (``cotrain.cli.role``); ``--set key=value`` is
kept as an alias of ``--key=value`` for old scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from cotrain.cli.role import Alias, Role, add_role, binding, user_inputs
from cotrain.cli.train import write_config

app = typer.Typer(help="Publish checkpoints and deliver them through relays.", no_args_is_help=True)

_SERVE = (Alias("--port", "serve.port"), Alias("--host", "serve.host"))


def _config_path(directory: Path) -> Path:
    """Where a server's resolved config goes: beside its directory (``ckpts.config.json``),
    so the directory holds only what it serves."""
    d = directory.resolve()
    return d.with_name(d.name + ".config.json")


def _serve(cfg: Any, role: str) -> int:
    """Run an Origin or Relay until SIGINT/SIGTERM; announce its URL on stdout."""
    import asyncio

    from cotrain.core.service import Service

    with user_inputs():
        if role == "origin":
            from cotrain.shardcast.origin import Origin

            server: Any = Origin(cfg)
        else:
            from cotrain.shardcast.relay import Relay

            server = Relay(cfg)
    write_config(_config_path(cfg.dir), cfg.dump_json())

    async def main(svc: Service) -> None:
        try:
            with binding(cfg.serve.host, cfg.serve.port, flag="--port"):
                url = await server.start()
            svc.ready(url=url, host=cfg.serve.host, port=int(url.rsplit(":", 1)[1]))
            await svc.stopped()
        finally:
            await server.close()

    def summary() -> str:
        state = server.state
        return f"versions {server.store.versions()}, {state.shard_bytes_sent} shard bytes sent"

    with Service(role) as svc:
        svc.summary = summary
        asyncio.run(main(svc))
    return svc.exit_code


def _origin_model() -> Any:
    from cotrain.shardcast.config import OriginConfig

    return OriginConfig


ORIGIN = Role(
    name="shardcast origin",
    help="""Serve the versions published into --dir.

    The resolved config is written beside the directory (DIR.config.json).""",
    model=_origin_model,
    run=lambda cfg: _serve(cfg, "origin"),
    aliases=_SERVE,
)


def _relay_model() -> Any:
    from cotrain.shardcast.config import RelayConfig

    return RelayConfig


RELAY = Role(
    name="shardcast relay",
    help="""Mirror versions from upstream servers as they appear, and serve them.""",
    model=_relay_model,
    run=lambda cfg: _serve(cfg, "relay"),
    aliases=(
        Alias("--upstream", "upstreams"),
        *_SERVE,
        Alias("--keep", "keep_versions"),
    ),
)


def _publish_model() -> Any:
    from cotrain.cli.shardcast_jobs import PublishJob

    return PublishJob


def _run_publish(cfg: Any) -> int:
    from cotrain.core.errors import UsageError
    from cotrain.core.identity import Identity
    from cotrain.shardcast.publisher import publish

    if not cfg.file.is_file():
        raise UsageError(f"{cfg.file} does not exist or is not a file")
    with user_inputs(f"key {cfg.key}"):
        identity = Identity.load(cfg.key)
    result = publish(cfg.file, dir=cfg.dir, identity=identity, config=cfg)
    m = result.manifest
    print(json.dumps({"version": result.version, "shards": len(m.shards), "bytes": m.file_size}))
    return 0


PUBLISH = Role(
    name="shardcast publish",
    help="""Publish FILE as the next version under --dir; print the version.""",
    model=_publish_model,
    run=_run_publish,
    positionals=(("file", "FILE"),),
    aliases=(Alias("--keep", "keep_versions"),),
)


def _fetch_model() -> Any:
    from cotrain.cli.shardcast_jobs import FetchJob

    return FetchJob


def _run_fetch(cfg: Any) -> int:
    import asyncio

    from cotrain.shardcast.client import fetch_async

    result = asyncio.run(
        fetch_async(
            cfg, out=cfg.out, version=cfg.version, min_version=cfg.min_version, wait_s=cfg.wait_s
        )
    )
    report = {
        "version": result.version,
        "path": str(result.path),
        "bytes": result.manifest.file_size,
        "seconds": round(result.seconds, 3),
        "resumed_shards": result.resumed_shards,
        "bytes_by_server": result.bytes_by_server,
        "bad_servers": result.bad_servers,
    }
    print(json.dumps(report), flush=True)
    return 0


FETCH = Role(
    name="shardcast fetch",
    help="""Fetch a version from origin/relays, verify it, write it atomically to --out.""",
    model=_fetch_model,
    run=_run_fetch,
    aliases=(
        Alias("--progress", "progress", "const", "bar"),
        Alias("--no-progress", "progress", "const", "none"),
    ),
)

for _role in (ORIGIN, PUBLISH, RELAY, FETCH):
    add_role(app, _role)
