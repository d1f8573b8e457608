"""Typed configs of the communication layer."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from cotrain.core.config import ConfigModel

Quantization = Literal["none", "fp16", "bf16", "int8", "int8_minmax", "int4"]
ReduceOp = Literal["sum", "avg", "min", "max"]
_KEY = re.compile(r"^[0-9a-f]{64}$")


class TLSConfig(ConfigModel):
    """Optional TLS on every connection (on top of the key challenge-response)."""

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
    key_file: str | None = None
    """This master's ed25519 key (`cotrain keygen --key FILE`); none: a fresh key per start.
    Give it a file when peers pin it with ``master_key`` and the master may restart."""
    secret: str = Field(default="", repr=False)
    """Run secret for quick local runs: any key that proves it knows the secret is admitted.
    Empty means the COTRAIN_SECRET variable, and if that is unset too, admission is by key only."""
    allow_keys: list[str] = Field(default_factory=list)
    """Public keys (64 hex) admitted to the run."""
    token_issuers: list[str] = Field(default_factory=list)
    """Public keys whose admission tokens (``cotrain token``) admit the key they name."""
    run_id: str = Field(default="default", min_length=1, max_length=100)
    """Name of the run; an admission token is valid only for the run it names."""
    events_file: str | None = None
    """Append one JSON line per membership event (which key joined, contributed to collective
    N, left, failed) to this file, for crediting work to keys later."""
    heartbeat_timeout_s: float = Field(default=2.5, gt=0)
    """A peer silent for this long is declared dead and in-flight collectives are aborted."""
    coordinator: str = ""
    """A protocol coordinator's URL (``cotrain master`` only): the run is its task ``run_id``,
    and every node the coordinator ejects from that task (a quorum of validators hard-rejected
    its work) is banned from the run."""
    coordinator_poll_s: float = Field(default=2.0, gt=0)
    """How often to read the task's members from ``coordinator``."""
    vote_timeout_s: float = Field(default=600.0, gt=0)
    """How long update_topology waits for every accepted peer to vote before dropping the absent."""
    handshake_timeout_s: float = Field(default=15.0, gt=0)
    """A connection that has not authenticated within this time is closed. A handshake over a
    lossy link can lose a segment twice (after a lost SYN, Linux retransmits data after 3 s,
    then 6 s), and strangers holding connections open are cut first anyway when the server is
    full: no need to cut honest peers sooner."""
    max_frame_kb: int = Field(default=4096, gt=0)
    """Largest control frame accepted."""
    tls: TLSConfig | None = None
    """TLS settings, or none for plain TCP."""

    @model_validator(mode="after")
    def _check(self) -> MasterConfig:
        for k in [*self.allow_keys, *self.token_issuers]:
            _check_key(k, "allow_keys and token_issuers entries")
        return self


class CommConfig(ConfigModel):
    """One peer's communicator."""

    master_host: str = "127.0.0.1"
    """Master address."""
    master_port: int = Field(default=48400, ge=1, le=65535)
    """Master port."""
    key_file: str | None = None
    """This peer's ed25519 key (`cotrain keygen --key FILE`); its public key is the peer id.
    None: a fresh key for this process (its membership cannot outlive the process)."""
    secret: str = Field(default="", repr=False)
    """Run secret for quick local runs. Empty means the COTRAIN_SECRET variable (if set)."""
    token_file: str | None = None
    """Admission token for this peer's key, signed by a key the run trusts (the coordinator)."""
    master_key: str | None = None
    """The master's public key (printed by `cotrain master`): the master must prove it holds
    it. Required unless the run secret authenticates the master."""
    handshake_timeout_s: float = Field(default=15.0, gt=0)
    """A connection to this peer's data server that has not authenticated within this time is
    closed (the whole handshake, however the bytes trickle in). See the master's."""
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
        if self.master_key is not None:
            _check_key(self.master_key, "master_key")
        return self


def _check_key(key: str, what: str) -> None:
    if not _KEY.match(key):
        raise ValueError(f"{what} must be a 64-hex ed25519 public key (see `cotrain keygen`)")
