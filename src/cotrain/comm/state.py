"""Shared state, the peer's whole side of it: hashing named tensors, the sync protocol with the
master, serving them to members, fetching and verifying them.

``SharedState.sync``: send (revision, per-tensor hashes, digest, weight) to the master; it elects
the majority and answers ``ok`` or ``fetch`` (from whom, which tensors, their hashes); a fetcher
reports the outcome, and every member waits for ``sync_done`` (so holders keep serving until all
fetchers are through). A fetch is all-or-nothing: every tensor is received into a scratch buffer
and checked against the majority's hash before any of the caller's tensors is touched, so a
lying source loses nothing.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotrain.comm import messages as m
from cotrain.comm.auth import Credentials, fingerprint
from cotrain.comm.config import CommConfig
from cotrain.comm.errors import CommError, StateSyncError
from cotrain.comm.frames import recv_into_exact, recv_json, send_json
from cotrain.comm.membership import Membership, error_for, match_reply
from cotrain.comm.tensors import FlatView, state_view
from cotrain.comm.transport import close_quietly, dial_peer
from cotrain.core.clock import Deadline

log = logging.getLogger("cotrain.comm")


@dataclass(frozen=True)
class SyncResult:
    revision: int
    fetched: bool
    bytes_received: int
    source: str | None
    total_weight: float = 0.0
    """Sum of the ``weight`` passed by the peers that kept their state (fetchers count zero)."""


@dataclass(frozen=True)
class StateDigest:
    hashes: dict[str, str]
    digest: str


def views(state: Mapping[str, Any]) -> dict[str, FlatView]:
    if not state:
        raise ValueError("shared state must contain at least one named tensor")
    return {name: state_view(state[name]) for name in sorted(state)}


def hash_array(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).data.cast("B")).hexdigest()


def digest(flat: Mapping[str, FlatView], revision: int) -> StateDigest:
    hashes = {name: f"{v.dtype}:{list(v.shape)}:{hash_array(v.array)}" for name, v in flat.items()}
    h = hashlib.sha256(str(revision).encode())
    for name in sorted(hashes):
        h.update(f"\n{name}={hashes[name]}".encode())
    return StateDigest(hashes, h.hexdigest())


def serve_state(sock: socket.socket, flat: Mapping[str, FlatView], max_frame: int) -> int:
    """Answer one fetch request on ``sock``; returns bytes sent."""
    req = m.parse_state_get(recv_json(sock, max_frame))
    sent = 0
    for name in req.names:
        v = flat.get(name)
        if v is None:
            send_json(sock, m.StateMissing(name=name).dump())
            return sent
        data = np.ascontiguousarray(v.array).data.cast("B")
        head = m.StateTensor(name=name, dtype=v.dtype, shape=list(v.shape), nbytes=data.nbytes)
        send_json(sock, head.dump())
        sock.sendall(data)
        sent += data.nbytes
    return sent


def fetch_state(
    sock: socket.socket,
    flat: Mapping[str, FlatView],
    names: list[str],
    expected: Mapping[str, str],
    max_frame: int,
) -> int:
    """Fetch ``names`` into scratch buffers, verify each against ``expected``, then install all."""
    for name in names:
        if name not in flat:
            raise StateSyncError(f"the majority's state has a tensor {name!r} this peer lacks")
    send_json(sock, m.StateGet(names=names).dump())
    scratch: dict[str, np.ndarray] = {}
    received = 0
    for name in names:
        mine = flat[name]
        head = m.parse_state_reply(recv_json(sock, max_frame))
        if not isinstance(head, m.StateTensor) or head.name != name:
            raise StateSyncError(f"source answered {head.type} {head.name[:60]!r} for {name!r}")
        if head.dtype != mine.dtype or tuple(head.shape) != mine.shape:
            raise StateSyncError(
                f"{name}: source has {head.dtype}{head.shape[:8]}, "
                f"this peer {mine.dtype}{list(mine.shape)}"
            )
        nbytes = head.nbytes
        if nbytes != mine.array.nbytes:
            raise StateSyncError(
                f"{name}: source announced {nbytes} bytes, expected {mine.array.nbytes}"
            )
        buf = np.empty_like(mine.array)
        recv_into_exact(sock, buf.data.cast("B"))
        received += nbytes
        got = f"{mine.dtype}:{list(mine.shape)}:{hash_array(buf)}"
        if got != expected.get(name):
            raise StateSyncError(f"{name}: bytes from the source do not match the majority's hash")
        scratch[name] = buf
    for name, buf in scratch.items():
        flat[name].array[...] = buf
        flat[name].commit()
    return received


def fetch_from_sources(
    flat: Mapping[str, FlatView],
    plan: m.SyncPlan,
    *,
    creds: Credentials,
    config: CommConfig,
) -> tuple[str | None, int, str]:
    """Fetch the majority's state from the first of ``plan.sources`` that delivers it intact:
    (source peer id or None, bytes received, why every source failed)."""
    failures = []
    for src in plan.sources:
        try:
            hello = m.StateHello(epoch=plan.epoch, seq=plan.seq)
            sock = dial_peer(src, creds, config, hello)
            try:
                received = fetch_state(
                    sock, flat, plan.names, plan.hashes, config.max_frame_kb * 1024
                )
            finally:
                close_quietly(sock)
            again = digest(flat, plan.revision)
            if again.hashes != plan.hashes:
                raise StateSyncError("state still differs from the majority after the fetch")
            return src.peer_id, received, ""
        except (OSError, CommError, ConnectionError) as e:
            log.warning("fetching shared state from %s failed: %s", src.peer_id, e)
            failures.append(f"{src.peer_id}: {e}")
    return None, 0, "; ".join(failures) or "no source"


class SharedState:
    """The shared-state protocol of one peer, over its ``Membership``."""

    def __init__(self, ms: Membership, config: CommConfig) -> None:
        self._ms = ms
        self.config = config
        self.revision: int | None = None
        """Revision of the last shared state this peer synced."""
        self._serving: tuple[int, int, Mapping[str, FlatView]] | None = None

    def sync(
        self,
        state: Mapping[str, Any],
        *,
        revision: int,
        weight: float = 0.0,
        timeout_s: float | None = None,
    ) -> SyncResult:
        ms = self._ms
        link = ms.link
        flat = views(state)
        mine = digest(flat, revision)
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with ms.op_lock:
            ms.check_ready()
            epoch, seq = ms.next_seq()
            with ms.lock:
                self._serving = (epoch, seq, flat)
            try:
                gen = link.send(
                    m.Sync(
                        epoch=epoch,
                        seq=seq,
                        revision=revision,
                        digest=mine.digest,
                        hashes=mine.hashes,
                        fresh=self.revision is None,
                        weight=weight,
                    )
                )
                plan = link.wait_for(
                    match_reply(m.SyncPlan, epoch, seq),
                    deadline,
                    generation=gen,
                    what="the shared-state plan",
                    abort_check=ms.abort_reason,
                )
                if isinstance(plan, m.Error):
                    raise error_for(plan)
                source, received, failure = None, 0, ""
                if plan.action == "fetch":
                    source, received, failure = fetch_from_sources(
                        flat, plan, creds=ms.creds, config=self.config
                    )
                    link.send(
                        m.SyncResult(epoch=epoch, seq=seq, ok=source is not None, reason=failure)
                    )
                done = link.wait_for(
                    match_reply(m.SyncDone, epoch, seq),
                    deadline,
                    generation=gen,
                    what="the end of the shared-state sync",
                    abort_check=ms.abort_reason,
                )
                if isinstance(done, m.Error):
                    raise error_for(done)
                if plan.action == "fetch" and source is None:
                    raise StateSyncError(f"could not fetch the majority's state: {failure}")
                self.revision = plan.revision
                ms.bytes_received += received
                return SyncResult(
                    plan.revision, plan.action == "fetch", received, source, plan.total_weight
                )
            finally:
                with ms.lock:
                    self._serving = None

    def on_state(self, sock: socket.socket, hello: m.StateHello, key: str) -> None:
        """Data-server handler: serve the sync in progress to a member that asks for it."""
        ms = self._ms
        with ms.lock:
            serving = self._serving
        sock.settimeout(self.config.stall_timeout_s)
        try:
            if not ms.is_member(key):
                raise CommError(f"state request from {fingerprint(key)}, not a member")
            if serving is None or (hello.epoch, hello.seq) != serving[:2]:
                send_json(sock, m.StateMissing(name="(not serving this sync)").dump())
                return
            serve_state(sock, serving[2], self.config.max_frame_kb * 1024)
        finally:
            close_quietly(sock)
