"""The coordinator's typed config (``cotrain coordinator [CONFIG.toml] [--a.b value]``)."""

from __future__ import annotations

from pydantic import Field

from cotrain.core.config import ConfigModel


class CoordinatorConfig(ConfigModel):
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 to serve other machines)."""
    port: int = Field(8740, ge=0, le=65535)
    """Port to listen on (0: any free port, printed in the ready line)."""
    db: str = "coordinator.db"
    """A SQLite file path, or a database URL (postgresql://user@host/db)."""
    key: str = "coordinator.pem"
    """The coordinator's ed25519 key (created if missing): it signs checkpoints and tokens."""
    origin: str = "cotrain.coordinator"
    """The ledger's name in its checkpoints (C2SP origin)."""
    market_state: str = ""
    """A market state directory (``cotrain market --state-dir``, e.g. ~/.cotrain/market) whose
    cached offers and launched nodes the dashboard shows, read-only ("": no market page)."""
    window_s: float = Field(60.0, gt=0, le=3600)
    """Clock window: a write signed further than this from our clock is refused."""
    rate_per_key: float = Field(200.0, gt=0)
    """Writes per second each key may send (token bucket)."""
    burst_per_key: float = Field(400.0, ge=1)
    max_body_kb: int = Field(64, ge=1, le=16384)
    """The largest write body accepted."""
    checkpoint_every: int = Field(1000, ge=1)
    """Sign a checkpoint at least every this many entries..."""
    checkpoint_interval_s: float = Field(5.0, gt=0)
    """...and at least this often while entries arrive."""
    heartbeat_s: float = Field(10.0, gt=0)
    """How often nodes should heartbeat (told to them in each reply)."""
    unhealthy_after_s: float = Field(30.0, gt=0)
    """A member silent this long is recorded unhealthy..."""
    dead_after_s: float = Field(90.0, gt=0)
    """...and this long, dead (it must join again)."""
    token_ttl_s: float = Field(3600.0, gt=0)
    """Lifetime of the comm admission tokens handed out at join."""
    write_timeout_s: float = Field(30.0, gt=0)
    """A write not committed within this long is answered 503."""
    ingest: int = Field(0, ge=0, le=64)
    """Processes that parse HTTP and check signatures in front of the one that sequences the
    ledger (0: it serves HTTP itself). Under load, one per core left after the sequencer."""


class AuditConfig(ConfigModel):
    source: str = ""
    """A coordinator's URL (http://host:port) or a ledger directory saved with --save."""
    key: str = ""
    """The coordinator key you trust (64 hex); without it, the key in the genesis entry."""
    save: str = ""
    """Also write what was fetched to this directory (audit it again offline later)."""
    cache: str = "~/.cache/cotrain/audit"
    """Where checkpoints seen before are kept, per coordinator ('' to keep none)."""
    json_out: str = ""
    """Write the report (and the replayed state) as JSON here."""
    timeout_s: float = Field(120.0, gt=0)
    """Deadline for each read from the coordinator."""
