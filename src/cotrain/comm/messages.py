"""The control-plane wire schema: every message between peers and the master, declared once.

Messages are JSON objects with a ``type`` field; ``parse`` validates untrusted input into these
models (a bad message raises ``ProtocolError`` and the sender is dropped).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cotrain.comm.errors import ProtocolError

PeerId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class PeerAddr(_Msg):
    peer_id: PeerId
    host: str = Field(max_length=255)
    port: int = Field(ge=1, le=65535)


class Descriptor(_Msg):
    """What a collective is; every peer must send the same one."""

    kind: Literal["all_reduce", "broadcast", "sync_state", "optimize"]
    count: int = Field(default=0, ge=0)
    dtype: str = Field(default="", max_length=16)
    op: str = Field(default="", max_length=8)
    quant: str = Field(default="", max_length=16)
    root: int = Field(default=0, ge=0)


# ---- peer -> master --------------------------------------------------------------------------


class Resume(_Msg):
    epoch: int = Field(ge=0)
    ring: list[PeerId] = Field(max_length=4096)
    revision: int | None = None


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    peer_id: PeerId
    host: str = Field(max_length=255)
    port: int = Field(ge=1, le=65535)
    resume: Resume | None = None


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"


class Vote(_Msg):
    """update_topology(): an accepted peer's vote, or a joiner's request to be admitted."""

    type: Literal["vote"] = "vote"


class Collective(_Msg):
    type: Literal["collective"] = "collective"
    epoch: int
    seq: int
    desc: Descriptor


class Failed(_Msg):
    type: Literal["failed"] = "failed"
    epoch: int
    seq: int
    reason: str = Field(max_length=2000)


class Sync(_Msg):
    type: Literal["sync"] = "sync"
    epoch: int
    seq: int
    revision: int
    digest: str = Field(max_length=128)
    hashes: dict[str, str] = Field(max_length=100_000)
    fresh: bool = False
    """True until this peer has completed a sync: its state does not take part in the vote."""
    weight: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """This peer's weight in a weighted average that follows (e.g. tokens trained); the plan's
    ``total_weight`` sums it over the peers that keep their state."""


class SyncResult(_Msg):
    type: Literal["sync_result"] = "sync_result"
    epoch: int
    seq: int
    ok: bool
    reason: str = Field(default="", max_length=2000)


class ProbeResult(_Msg):
    type: Literal["probe_result"] = "probe_result"
    epoch: int
    target: PeerId
    mbps: float = Field(ge=0)


class Bye(_Msg):
    type: Literal["bye"] = "bye"


# ---- master -> peer --------------------------------------------------------------------------


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    peer_id: PeerId
    epoch: int
    resumed: bool


class Topology(_Msg):
    type: Literal["topology"] = "topology"
    epoch: int
    ring: list[PeerAddr]


class Go(_Msg):
    type: Literal["go"] = "go"
    epoch: int
    seq: int


ErrorKind = Literal["mismatch", "peer_failed", "topology_changed", "revision", "not_member"]


class Error(_Msg):
    type: Literal["error"] = "error"
    epoch: int
    seq: int
    kind: ErrorKind
    message: str


class Abort(_Msg):
    type: Literal["abort"] = "abort"
    epoch: int
    reason: str


class SyncPlan(_Msg):
    type: Literal["sync_plan"] = "sync_plan"
    epoch: int
    seq: int
    revision: int
    action: Literal["ok", "fetch"]
    sources: list[PeerAddr] = []
    names: list[str] = []
    hashes: dict[str, str] = {}
    total_weight: float = 0.0
    """Sum of the ``weight`` of the peers whose state was elected (fetchers count zero), in
    ring order: the same float on every peer."""


class SyncDone(_Msg):
    type: Literal["sync_done"] = "sync_done"
    epoch: int
    seq: int


class Joining(_Msg):
    """Peers wait to be admitted: members should call ``update_topology()`` at their next
    synchronisation (peers that vote only when needed learn it here)."""

    type: Literal["joining"] = "joining"
    epoch: int


class Probe(_Msg):
    type: Literal["probe"] = "probe"
    epoch: int
    target: PeerAddr
    nbytes: int = Field(ge=1, le=1 << 30)


class Kicked(_Msg):
    type: Literal["kicked"] = "kicked"
    reason: str


ToMaster = Annotated[
    Hello | Heartbeat | Vote | Collective | Failed | Sync | SyncResult | ProbeResult | Bye,
    Field(discriminator="type"),
]
ToPeer = Annotated[
    Welcome | Topology | Go | Error | Abort | SyncPlan | SyncDone | Joining | Probe | Kicked,
    Field(discriminator="type"),
]
_TO_MASTER: TypeAdapter[Any] = TypeAdapter(ToMaster)
_TO_PEER: TypeAdapter[Any] = TypeAdapter(ToPeer)


def parse_to_master(obj: dict[str, Any]) -> Any:
    try:
        return _TO_MASTER.validate_python(obj)
    except ValidationError as e:
        raise ProtocolError(f"invalid message to master: {e.errors()[0]['msg']}") from None


def parse_to_peer(obj: dict[str, Any]) -> Any:
    try:
        return _TO_PEER.validate_python(obj)
    except ValidationError as e:
        raise ProtocolError(f"invalid message from master: {e.errors()[0]['msg']}") from None
