"""Typed configs of shardcast's roles: publisher, origin, relay, client, and fault injection."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from cotrain.core.config import ConfigModel

MB = 1_000_000


def _check_key(value: str) -> str:
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(
            "publisher_key must be the publisher's ed25519 public key as 64 hex characters "
            "(print it with `cotrain keygen --key KEY.pem`)"
        )
    return value


class FaultConfig(ConfigModel):
    """Faults a server injects on purpose, so tests (and drills) can exercise the clients."""

    corrupt_shards: list[int] = Field(default_factory=list)
    """Shard indices served with one byte flipped (every version)."""
    manifest: Literal["honest", "forged", "replayed"] = "honest"
    """`forged`: serve manifests with a field changed under the original signature;
    `replayed`: answer every manifest request with the oldest signed manifest held."""
    exit_after_bytes: int | None = None
    """Kill the server process (exit code 9, no cleanup) once it has sent this many shard bytes."""
    stall_shards: list[int] = Field(default_factory=list)
    """Shard indices whose transfer stops halfway and then hangs without closing."""


class ServeConfig(ConfigModel):
    """Where a server listens."""

    host: str = "127.0.0.1"
    """Address to bind (a test address, not all interfaces, unless you mean it)."""
    port: int = Field(default=8470, ge=0, le=65535)
    """TCP port; 0 picks a free one (printed at startup)."""
    max_wait_s: float = Field(default=60.0, gt=0)
    """Longest a long-poll (new version, shard not yet mirrored) may hold a request open."""


class PublishConfig(ConfigModel):
    """How the publisher cuts and keeps versions."""

    shard_size_mb: float = Field(default=50.0, gt=0)
    """Size of each shard in MB (10^6 bytes); the last shard may be shorter."""
    keep_versions: int = Field(default=5, ge=1)
    """How many of the newest versions stay on disk; older ones are retired."""
    channel: str = "default"
    """Name of the stream of versions; signed into every manifest so runs cannot be mixed."""
    name: str = "model.safetensors"
    """File name recorded in the manifest (informational)."""
    file_mode: Literal["copy", "link"] = "copy"
    """Publishing a file: `copy` it into the origin's directory, or `link` it (a hard link:
    instant, but the file must never be modified in place afterwards)."""

    @property
    def shard_size_bytes(self) -> int:
        return max(1, int(self.shard_size_mb * MB))


class TransferConfig(ConfigModel):
    """How shards are pulled from a set of servers (used by clients and relays alike)."""

    parallel_downloads: int = Field(default=6, ge=1)
    """Shards in flight at once."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Time allowed to open a connection to a server."""
    stall_timeout_s: float = Field(default=10.0, gt=0)
    """A transfer that delivers no byte for this long is abandoned and retried elsewhere."""
    stall_min_kb: float = Field(default=64.0, ge=0)
    """A transfer that delivers less than this many KB in any ``stall_timeout_s`` is abandoned
    too (its bytes kept, the rest asked of another server): a server that trickles a byte at a
    time is as stuck as one that sends none. 0: any byte counts as progress."""
    shard_wait_s: float = Field(default=20.0, ge=0)
    """How long a server may hold a shard request open while it is still mirroring that shard."""
    max_attempts_per_shard: int = Field(default=8, ge=1)
    """Failed attempts (errors, stalls, corruption) on one shard before the fetch gives up."""
    exploration: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of choices that try a random healthy server instead of the best measured one."""
    read_chunk_kb: int = Field(default=1024, ge=16)
    """Bytes read from a response at a time (hashing and writing work on whole chunks)."""
    seed: int | None = None
    """Seed of the server-choice randomness (None: nondeterministic)."""
    rcvlowat_kb: int = Field(default=256, ge=0)
    """Wake up only once this many KB are waiting on a socket (SO_RCVLOWAT; 0: every packet).
    Saves CPU on slow links, where packets otherwise arrive, and wake us, one by one."""


class ClientConfig(ConfigModel):
    """A client that fetches versions from origin and relays."""

    servers: list[str] = Field(default_factory=list)
    """Base URLs of servers to fetch from (origin and/or relays)."""
    publisher_key: str = ""
    """The publisher's ed25519 public key (hex); only manifests it signed are accepted."""
    channel: str = "default"
    """Only manifests of this channel are accepted."""
    timeout_s: float = Field(default=600.0, gt=0)
    """Deadline of one whole fetch."""
    max_manifest_age_s: float = Field(default=3600.0, gt=0)
    """Freshness bound of a fetch of the latest version: refuse it (``StaleVersionError``) if the
    newest version any server offers was signed more than this many seconds ago. One relay
    can show an old version as the newest, by hiding newer ones; this bounds how old (and the
    client also asks every listed server and takes the newest version that verifies, so one
    honest server with the real latest wins). Default 3600 s (one hour), meant for a run that
    publishes more often than that; set it to ``inf`` (``--set max_manifest_age_s=inf``) to
    accept any age. A version fetched by number (``--version N``) is never refused for age."""
    progress: Literal["bar", "none"] = "none"
    """Show a progress bar on stderr."""
    transfer: TransferConfig = TransferConfig()

    @field_validator("publisher_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return _check_key(v)

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        return [s.rstrip("/") for s in v if s.strip()]


class OriginConfig(ConfigModel):
    """The origin: serves the versions the publisher writes into `dir`."""

    dir: Path = Path("shardcast-origin")
    """Directory the publisher writes versions into."""
    serve: ServeConfig = ServeConfig()
    scan_interval_s: float = Field(default=0.1, gt=0)
    """How often the origin looks at `dir` for versions written by another process."""
    clients: Literal["always", "when_relays_idle"] = "when_relays_idle"
    """When shards go to clients (requests from relays are always served): `always`, or only
    while no relay is pulling one (`when_relays_idle`): the uplink goes to the relays first,
    since each relay passes every byte on to many clients; a client that asks meanwhile gets
    429 and goes to a relay, or, if it asked to wait, is served once the relays are done or
    its wait is up."""
    fault: FaultConfig = FaultConfig()


class RelayConfig(ConfigModel):
    """A relay: mirrors versions from upstream servers as they arrive and serves them."""

    upstreams: list[str] = Field(default_factory=list)
    """Base URLs of the origin and/or other relays to mirror from."""
    dir: Path = Path("shardcast-relay")
    """Where mirrored versions are kept."""
    publisher_key: str = ""
    """The publisher's ed25519 public key (hex); unsigned or forged versions are not mirrored."""
    channel: str = "default"
    """Only versions of this channel are mirrored."""
    keep_versions: int = Field(default=5, ge=1)
    """How many of the newest versions are kept; older ones are retired."""
    upstream_ban_s: float = Field(default=30.0, gt=0)
    """How long an upstream caught lying (a forged manifest, a corrupt shard it alone sent, a
    malformed answer) is avoided. Bans expire: each repeat doubles the next one, up to
    ``upstream_ban_max_s``, and an upstream that behaves for ``upstream_ban_max_s`` after its
    ban starts from ``upstream_ban_s`` again."""
    upstream_ban_max_s: float = Field(default=3600.0, gt=0)
    """Longest ban of a repeatedly lying upstream."""
    poll_wait_s: float = Field(default=30.0, gt=0)
    """Long-poll window asked of upstreams (they answer at once when a version appears)."""
    retry_interval_s: float = Field(default=1.0, gt=0)
    """Pause before asking an unreachable upstream again."""
    forward: Literal["cut_through", "verified_shards"] = "cut_through"
    """`cut_through`: stream each shard on to clients while it still arrives from upstream
    (the last byte only once its hash matched; a corrupt stream is cut off and its bytes
    discarded by the client); `verified_shards`: serve a shard only once it is whole and
    verified (store and forward: the relay's uplink idles until its first shard is in)."""
    serve: ServeConfig = ServeConfig()
    # Many flows from upstream: a relay's uplink is saturated by its clients, and the ACKs of
    # its own downloads queue (and drop) behind that traffic, which starves each single flow.
    transfer: TransferConfig = TransferConfig(parallel_downloads=8)
    fault: FaultConfig = FaultConfig()

    @field_validator("publisher_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return _check_key(v)

    @field_validator("upstreams")
    @classmethod
    def _ups(cls, v: list[str]) -> list[str]:
        return [s.rstrip("/") for s in v if s.strip()]
