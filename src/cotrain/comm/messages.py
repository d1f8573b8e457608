"""The control-plane wire schema: every message between peers and the master, declared once.

Messages are JSON objects with a ``type`` field; the ``parse_*`` functions validate untrusted
input into these models (a bad message raises ``ProtocolError`` and the sender is dropped).
Three conversations: peer <-> master (control), and the first frame of every peer-to-peer data
connection (ring, state, probe) with the state fetch that follows. Every number is bounded and
every string and list has a maximum length, so no field of a stranger's frame can blow up later.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cotrain.comm.errors import ProtocolError

PeerId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
"""A peer's id: its ed25519 public key, 64 hex digits (what the handshake proved)."""
Count = Annotated[int, Field(ge=0, le=(1 << 62))]
"""Epochs, sequence numbers, revisions, sizes: a stranger's 300-digit integer stops here."""
Name = Annotated[str, Field(max_length=256)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class PeerAddr(_Msg):
    peer_id: PeerId
    host: str = Field(max_length=255)
    port: int = Field(ge=1, le=65535)
    name: str = Field(default="", max_length=64)
    """The label the peer gave itself (logs only; the id is the key)."""


class Descriptor(_Msg):
    """What a collective is; every peer must send the same one."""

    kind: Literal["all_reduce", "broadcast", "sync_state", "optimize"]
    count: int = Field(default=0, ge=0, le=1 << 62)
    dtype: str = Field(default="", max_length=16)
    op: str = Field(default="", max_length=8)
    quant: str = Field(default="", max_length=16)
    root: int = Field(default=0, ge=0, le=1 << 20)


# ---- peer -> master --------------------------------------------------------------------------


class Resume(_Msg):
    epoch: Count
    ring: list[PeerId] = Field(max_length=4096)
    revision: Count | None = None
    done_seq: Count | None = None
    """The collective of ``epoch`` whose transfer this peer last reported done, if any."""
    committed: bool = False
    """Whether the master's commit of ``done_seq`` arrived (False: still waiting for it)."""


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    peer_id: PeerId
    host: str = Field(max_length=255)
    port: int = Field(ge=1, le=65535)
    resume: Resume | None = None
    name: str = Field(default="", max_length=64)
    """A label for logs (``p3``, a host name); the id is the key."""


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"


class Vote(_Msg):
    """update_topology(): an accepted peer's vote, or a joiner's request to be admitted."""

    type: Literal["vote"] = "vote"


class Collective(_Msg):
    type: Literal["collective"] = "collective"
    epoch: Count
    seq: Count
    desc: Descriptor


class Failed(_Msg):
    type: Literal["failed"] = "failed"
    epoch: Count
    seq: Count
    reason: str = Field(max_length=2000)


class Sync(_Msg):
    type: Literal["sync"] = "sync"
    epoch: Count
    seq: Count
    revision: Count
    digest: str = Field(max_length=128)
    hashes: dict[Name, Name] = Field(max_length=100_000)
    fresh: bool = False
    """True until this peer has completed a sync: its state does not take part in the vote."""
    weight: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """This peer's weight in a weighted average that follows (e.g. tokens trained); the plan's
    ``total_weight`` sums it over the peers that keep their state."""


class SyncResult(_Msg):
    type: Literal["sync_result"] = "sync_result"
    epoch: Count
    seq: Count
    ok: bool
    reason: str = Field(default="", max_length=2000)


class ProbeResult(_Msg):
    type: Literal["probe_result"] = "probe_result"
    epoch: Count
    target: PeerId
    mbps: float = Field(ge=0, allow_inf_nan=False)


class Bye(_Msg):
    type: Literal["bye"] = "bye"


# ---- master -> peer --------------------------------------------------------------------------


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    peer_id: PeerId
    epoch: Count
    resumed: bool
    state_revision: Count | None = None
    """The run's shared-state revision (None: no state synced yet, the run has not started):
    a newcomer that finds one is joining a run in progress."""


class Topology(_Msg):
    type: Literal["topology"] = "topology"
    epoch: Count
    ring: list[PeerAddr]


class Go(_Msg):
    type: Literal["go"] = "go"
    epoch: Count
    seq: Count


ErrorKind = Literal["mismatch", "peer_failed", "topology_changed", "revision", "not_member"]


class Error(_Msg):
    type: Literal["error"] = "error"
    epoch: Count
    seq: Count
    kind: ErrorKind
    message: str = Field(max_length=100_000)


class Abort(_Msg):
    type: Literal["abort"] = "abort"
    epoch: Count
    reason: str = Field(max_length=2000)


class SyncPlan(_Msg):
    type: Literal["sync_plan"] = "sync_plan"
    epoch: Count
    seq: Count
    revision: Count
    action: Literal["ok", "fetch"]
    sources: list[PeerAddr] = Field(default=[], max_length=4096)
    names: list[Name] = Field(default=[], max_length=100_000)
    hashes: dict[Name, Name] = Field(default={}, max_length=100_000)
    total_weight: float = Field(default=0.0, allow_inf_nan=False)
    """Sum of the ``weight`` of the peers whose state was elected (fetchers count zero), in
    ring order: the same float on every peer."""


class SyncDone(_Msg):
    type: Literal["sync_done"] = "sync_done"
    epoch: Count
    seq: Count


class Joining(_Msg):
    """Peers wait to be admitted: members should call ``update_topology()`` at their next
    synchronisation (peers that vote only when needed learn it here)."""

    type: Literal["joining"] = "joining"
    epoch: Count


class Probe(_Msg):
    type: Literal["probe"] = "probe"
    epoch: Count
    target: PeerAddr
    nbytes: int = Field(ge=1, le=1 << 30)


class Kicked(_Msg):
    type: Literal["kicked"] = "kicked"
    reason: str = Field(max_length=2000)


# ---- peer -> peer: the first frame of a data connection, and the state fetch ----------------


class RingHello(_Msg):
    """Opens ring stream ``stream`` from the sender to its next neighbour for ``epoch``."""

    type: Literal["ring"] = "ring"
    epoch: Count
    stream: int = Field(ge=0, le=64)


class StateHello(_Msg):
    """Opens a fetch of the shared state of sync ``(epoch, seq)``."""

    type: Literal["state"] = "state"
    epoch: Count
    seq: Count


class ProbeHello(_Msg):
    """Opens a bandwidth probe of ``nbytes`` bytes."""

    type: Literal["probe"] = "probe"
    nbytes: int = Field(ge=1, le=1 << 30)


class StateGet(_Msg):
    type: Literal["get"] = "get"
    names: list[Name] = Field(max_length=100_000)


class StateTensor(_Msg):
    """Header of one tensor's raw bytes, which follow the frame."""

    type: Literal["tensor"] = "tensor"
    name: Name
    dtype: str = Field(max_length=16)
    shape: list[Count] = Field(max_length=64)
    nbytes: Count


class StateMissing(_Msg):
    type: Literal["missing"] = "missing"
    name: Name


DataHello = Annotated[RingHello | StateHello | ProbeHello, Field(discriminator="type")]
StateReply = Annotated[StateTensor | StateMissing, Field(discriminator="type")]
_DATA_HELLO: TypeAdapter[Any] = TypeAdapter(DataHello)
_STATE_GET: TypeAdapter[Any] = TypeAdapter(StateGet)
_STATE_REPLY: TypeAdapter[Any] = TypeAdapter(StateReply)


def _parse(adapter: TypeAdapter[Any], obj: dict[str, Any], what: str) -> Any:
    try:
        return adapter.validate_python(obj)
    except ValidationError as e:
        raise ProtocolError(f"invalid {what}: {e.errors()[0]['msg']}") from None


def parse_data_hello(obj: dict[str, Any]) -> RingHello | StateHello | ProbeHello:
    return _parse(_DATA_HELLO, obj, "data connection hello")


def parse_state_get(obj: dict[str, Any]) -> StateGet:
    return _parse(_STATE_GET, obj, "state request")


def parse_state_reply(obj: dict[str, Any]) -> StateTensor | StateMissing:
    return _parse(_STATE_REPLY, obj, "state reply")


class Done(_Msg):
    """peer -> master: this peer's ring transfer of collective ``seq`` finished; it keeps the
    result aside until the master's ``commit`` (or restores its input on an ``error``)."""

    type: Literal["done"] = "done"
    epoch: Count
    seq: Count


class Commit(_Msg):
    """master -> peers: every member reported ``done`` for collective ``seq``: keep the result."""

    type: Literal["commit"] = "commit"
    epoch: Count
    seq: Count


ToMaster = Annotated[
    Hello | Heartbeat | Vote | Collective | Failed | Sync | SyncResult | ProbeResult | Bye | Done,
    Field(discriminator="type"),
]
ToPeer = Annotated[
    Welcome
    | Topology
    | Go
    | Error
    | Abort
    | SyncPlan
    | SyncDone
    | Joining
    | Probe
    | Kicked
    | Commit,
    Field(discriminator="type"),
]
_TO_MASTER: TypeAdapter[Any] = TypeAdapter(ToMaster)
_TO_PEER: TypeAdapter[Any] = TypeAdapter(ToPeer)


def parse_to_master(obj: dict[str, Any]) -> Any:
    return _parse(_TO_MASTER, obj, "message to master")


def parse_to_peer(obj: dict[str, Any]) -> Any:
    return _parse(_TO_PEER, obj, "message from master")
