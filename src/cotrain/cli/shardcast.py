"""`cotrain shardcast ...`: origin, publish, relay, fetch (keys: `cotrain keygen`).

Servers print one JSON line ``{"event": "listening", "url": ...}`` on stdout once they serve;
``fetch`` prints one JSON line describing the verified file. Any config field can be set with
``--set section.key=value`` (or a TOML file with ``--config``).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Publish checkpoints and deliver them through relays.", no_args_is_help=True)

_SET = typer.Option([], "--set", "-s", help="Override a config field: section.key=value.")
_CONFIG = typer.Option(None, "--config", help="TOML config file.")
_LOG = typer.Option("warning", "--log-level", help="debug, info, warning or error.")


def _config(model: Any, config: Path | None, explicit: dict[str, Any], sets: list[str]) -> Any:
    """TOML file, then the explicit flags, then --set overrides; errors name the field."""
    from pydantic import ValidationError

    from cotrain.core.config import apply_overrides
    from cotrain.core.errors import ConfigError

    data: dict[str, Any] = {}
    if config is not None:
        try:
            data = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {config}: {e}") from None
    for key, value in explicit.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    apply_overrides(data, sets)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid {model.__name__}:\n" + "\n".join(lines)) from None


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )


def _split(urls: str | None) -> list[str] | None:
    return None if urls is None else [u.strip() for u in urls.split(",") if u.strip()]


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


def _serve(make: Any, role: str) -> None:
    """Run an Origin or Relay until SIGINT/SIGTERM; announce its URL on stdout."""
    import asyncio
    import signal

    from cotrain.shardcast.relay import serve_forever

    async def main() -> None:
        server = make()
        url = await server.start()
        print(json.dumps({"event": "listening", "role": role, "url": url}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_forever(server, stop)

    asyncio.run(main())


@app.command()
def origin(
    dir: Path = typer.Option(None, "--dir", help="Directory the publisher writes versions into."),
    port: int = typer.Option(None, "--port", help="TCP port (0: any free one)."),
    host: str = typer.Option(None, "--host", help="Address to bind."),
    config: Path = _CONFIG,
    sets: list[str] = _SET,
    log_level: str = _LOG,
):
    """Serve the versions published into --dir."""
    from cotrain.core.errors import CotrainError
    from cotrain.shardcast.config import OriginConfig
    from cotrain.shardcast.origin import Origin

    _logging(log_level)
    try:
        explicit = {"dir": dir, "serve.port": port, "serve.host": host}
        cfg = _config(OriginConfig, config, explicit, sets)
        _serve(lambda: Origin(cfg), "origin")
    except (CotrainError, OSError) as e:
        _fail(e)


@app.command()
def publish(
    file: Path = typer.Argument(..., help="Checkpoint file (e.g. .safetensors) to publish."),
    dir: Path = typer.Option(..., "--dir", help="The origin's directory."),
    key: Path = typer.Option(..., "--key", help="Publisher's private key (PEM)."),
    shard_size_mb: float = typer.Option(None, "--shard-size-mb", help="Shard size in MB."),
    keep: int = typer.Option(None, "--keep", help="Versions to keep."),
    config: Path = _CONFIG,
    sets: list[str] = _SET,
):
    """Publish FILE as the next version under --dir; print the version."""
    from cotrain.core.errors import CotrainError
    from cotrain.core.identity import Identity
    from cotrain.shardcast.config import PublishConfig
    from cotrain.shardcast.publisher import publish as do_publish

    try:
        explicit = {"shard_size_mb": shard_size_mb, "keep_versions": keep}
        cfg = _config(PublishConfig, config, explicit, sets)
        result = do_publish(file, dir=dir, identity=Identity.load(key), config=cfg)
    except (CotrainError, OSError, ValueError) as e:
        _fail(e)
    m = result.manifest
    print(json.dumps({"version": result.version, "shards": len(m.shards), "bytes": m.file_size}))


@app.command()
def relay(
    upstream: str = typer.Option(None, "--upstream", help="Upstream URLs, comma separated."),
    dir: Path = typer.Option(None, "--dir", help="Where mirrored versions are kept."),
    port: int = typer.Option(None, "--port", help="TCP port (0: any free one)."),
    host: str = typer.Option(None, "--host", help="Address to bind."),
    publisher_key: str = typer.Option(None, "--publisher-key", help="Publisher's public key."),
    keep: int = typer.Option(None, "--keep", help="Versions to keep."),
    config: Path = _CONFIG,
    sets: list[str] = _SET,
    log_level: str = _LOG,
):
    """Mirror versions from upstream servers as they appear, and serve them."""
    from cotrain.core.errors import CotrainError
    from cotrain.shardcast.config import RelayConfig
    from cotrain.shardcast.relay import Relay

    _logging(log_level)
    try:
        explicit = {
            "upstreams": _split(upstream),
            "dir": dir,
            "serve.port": port,
            "serve.host": host,
            "publisher_key": publisher_key,
            "keep_versions": keep,
        }
        cfg = _config(RelayConfig, config, explicit, sets)
        _serve(lambda: Relay(cfg), "relay")
    except (CotrainError, OSError, ValueError) as e:
        _fail(e)


@app.command()
def fetch(
    servers: str = typer.Option(None, "--servers", help="Server URLs, comma separated."),
    out: Path = typer.Option(..., "--out", help="Where the verified file goes."),
    version: str = typer.Option("latest", "--version", help="'latest' or a version number."),
    publisher_key: str = typer.Option(None, "--publisher-key", help="Publisher's public key."),
    wait_s: float = typer.Option(0.0, "--wait-s", help="Wait this long for the version."),
    min_version: int = typer.Option(1, "--min-version", help="Refuse anything older."),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Show a progress bar."),
    config: Path = _CONFIG,
    sets: list[str] = _SET,
    log_level: str = _LOG,
):
    """Fetch a version from origin/relays, verify it, write it atomically to --out."""
    import asyncio

    from cotrain.core.errors import CotrainError
    from cotrain.shardcast.client import fetch_async
    from cotrain.shardcast.config import ClientConfig

    _logging(log_level)
    try:
        explicit = {
            "servers": _split(servers),
            "publisher_key": publisher_key,
            "progress": "bar" if progress else None,
        }
        cfg = _config(ClientConfig, config, explicit, sets)
        want: Any = "latest" if version == "latest" else int(version)
        result = asyncio.run(
            fetch_async(cfg, out=out, version=want, min_version=min_version, wait_s=wait_s)
        )
    except (CotrainError, OSError, ValueError) as e:
        _fail(e)
    print(
        json.dumps(
            {
                "version": result.version,
                "path": str(result.path),
                "bytes": result.manifest.file_size,
                "seconds": round(result.seconds, 3),
                "resumed_shards": result.resumed_shards,
                "bytes_by_server": result.bytes_by_server,
                "bad_servers": result.bad_servers,
            }
        ),
        flush=True,
    )
