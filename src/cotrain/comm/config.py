"""Typed configs of the communication layer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cotrain.core.config import ConfigModel

Quantization = Literal["none", "fp16", "bf16", "int8", "int8_minmax", "int4"]
ReduceOp = Literal["sum", "avg", "min", "max"]


class TLSConfig(ConfigModel):
    """Optional TLS on every connection (on top of the secret's challenge-response)."""

    cert_file: str
    """PEM certificate this process presents."""
    key_file: str
    """PEM private key of ``cert_file``."""
    ca_file: str
    """PEM bundle the other side's certificate must chain to (a shared self-signed cert works)."""


class MasterConfig(ConfigModel):
    """The membership master: `cotrain master`."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=48400, ge=0, le=65535)
    """TCP port (0 picks a free one and prints it)."""
    secret: str = Field(default="", repr=False)
    """Run secret every peer must prove it knows. Empty means the COTRAIN_SECRET variable."""
    heartbeat_timeout_s: float = Field(default=2.5, gt=0)
    """A peer silent for this long is declared dead and in-flight collectives are aborted."""
    vote_timeout_s: float = Field(default=600.0, gt=0)
    """How long update_topology waits for every accepted peer to vote before dropping the absent."""
    handshake_timeout_s: float = Field(default=5.0, gt=0)
    """A connection that has not authenticated within this time is closed."""
    max_frame_kb: int = Field(default=4096, gt=0)
    """Largest control frame accepted."""
    tls: TLSConfig | None = None
    """TLS settings, or none for plain TCP."""


class CommConfig(ConfigModel):
    """One peer's communicator."""

    master_host: str = "127.0.0.1"
    """Master address."""
    master_port: int = Field(default=48400, ge=1, le=65535)
    """Master port."""
    secret: str = Field(default="", repr=False)
    """Run secret. Empty means the COTRAIN_SECRET variable."""
    listen_host: str = "127.0.0.1"
    """Address this peer's data server binds (ring, state and probe connections)."""
    listen_port: int = Field(default=0, ge=0, le=65535)
    """Data server port (0 = any free port)."""
    advertise_host: str | None = None
    """Address other peers should dial (behind NAT or a proxy); default listen_host."""
    advertise_port: int | None = None
    """Port other peers should dial; default the bound data port."""
    streams: int = Field(default=4, ge=1, le=64)
    """TCP connections to each ring neighbour (one stream cannot fill a long, fat link)."""
    chunk_kb: int = Field(default=512, ge=1)
    """Pipelining granularity of ring transfers, in KiB on the wire (after quantization)."""
    heartbeat_interval_s: float = Field(default=0.5, gt=0)
    """How often this peer tells the master it is alive."""
    stall_timeout_s: float = Field(default=30.0, gt=0)
    """A ring socket with no progress this long fails the collective (backstop to heartbeats)."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Time to reach the master or a neighbour (including the handshake)."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Longest wait for the master's answer to a request (peers may be busy computing)."""
    master_reconnect_timeout_s: float = Field(default=60.0, gt=0)
    """After losing the master, keep trying to reconnect for this long before giving up."""
    max_frame_kb: int = Field(default=4096, gt=0)
    """Largest control frame accepted."""
    tls: TLSConfig | None = None
    """TLS settings, or none for plain TCP."""

    @model_validator(mode="after")
    def _check(self) -> CommConfig:
        if self.advertise_port is not None and not (1 <= self.advertise_port <= 65535):
            raise ValueError("advertise_port must be a TCP port in 1..65535")
        return self
