"""Configs of the shardcast commands that take more than their component's config: ``publish``
(a file, a directory and a key besides ``PublishConfig``) and ``fetch`` (where the file goes,
which version, how long to wait, besides ``ClientConfig``). Each *is* its component's config
with those fields added, so a component's TOML file is also the command's."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cotrain.shardcast.config import ClientConfig, PublishConfig


class PublishJob(PublishConfig):
    """``cotrain shardcast publish FILE --dir DIR --key KEY.pem``."""

    file: Path
    """Checkpoint file (e.g. a .safetensors) to publish as the next version."""
    dir: Path
    """The origin's directory (what ``cotrain shardcast origin`` serves)."""
    key: Path
    """The publisher's private key (PEM; ``cotrain keygen --key FILE``)."""


class FetchJob(ClientConfig):
    """``cotrain shardcast fetch --servers URL[,URL] --publisher-key HEX --out FILE``."""

    out: Path
    """Where the verified file goes (written atomically)."""
    version: int | Literal["latest"] = "latest"
    """"latest" or a version number."""
    min_version: int = Field(default=1, ge=1)
    """Refuse any version older than this."""
    wait_s: float = Field(default=0.0, ge=0)
    """Wait this long for the version to appear."""
