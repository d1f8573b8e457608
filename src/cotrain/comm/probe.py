"""Bandwidth probes between peers, for ordering the ring (``Communicator.optimize_topology``).

``optimize``: every member agrees on an ``optimize`` collective; the master then orders each
peer in turn to probe every other and reports back, and finally sends the reordered ring.

The prober sends ``nbytes`` of zeros on a fresh authenticated connection and waits for a one-byte
acknowledgement, so the time covers the bytes' arrival, not just the local socket buffer.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from cotrain.comm import messages as m
from cotrain.comm.auth import Credentials, fingerprint
from cotrain.comm.config import CommConfig
from cotrain.comm.errors import CommError
from cotrain.comm.frames import recv_exact
from cotrain.comm.membership import Membership
from cotrain.comm.transport import close_quietly, dial_peer
from cotrain.core.clock import Deadline

log = logging.getLogger("cotrain.comm")

MAX_PROBE_BYTES = 1 << 30


def send(target: m.PeerAddr, nbytes: int, creds: Credentials, config: CommConfig) -> float:
    """Megabits per second to ``target`` (0.0 if it cannot be reached)."""
    try:
        sock = dial_peer(target, creds, config, m.ProbeHello(nbytes=nbytes))
    except (OSError, CommError) as e:
        log.warning("probe to %s failed: %s", target.peer_id, e)
        return 0.0
    try:
        payload = memoryview(bytes(min(nbytes, 1 << 20)))
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            k = min(left, len(payload))
            sock.sendall(payload[:k])
            left -= k
        recv_exact(sock, 1)
        return nbytes * 8 / max(time.perf_counter() - t0, 1e-9) / 1e6
    except OSError:
        return 0.0
    finally:
        close_quietly(sock)


def serve(sock: socket.socket, hello: m.ProbeHello, *, stall_timeout_s: float) -> None:
    """Receive one probe on an accepted connection and acknowledge it."""
    nbytes = hello.nbytes
    sock.settimeout(stall_timeout_s)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    try:
        left = nbytes
        while left > 0:
            k = sock.recv_into(view, min(left, len(buf)))
            if k == 0:
                return
            left -= k
        sock.sendall(b"k")
    finally:
        close_quietly(sock)


def optimize(ms: Membership, *, probe_mb: float, deadline: Deadline) -> list[str]:
    """Measure peer-to-peer bandwidth as the master orders, then adopt its reordered ring."""
    link = ms.link
    with ms.op_lock, ms.awaiting_topology():
        nbytes = max(1, int(probe_mb * (1 << 20)))
        ms.begin(m.Descriptor(kind="optimize", count=nbytes), deadline)
        epoch = ms.epoch
        gen = link.generation
        while True:
            msg = link.wait_for(
                lambda x: (
                    (isinstance(x, m.Probe) and x.epoch == epoch)
                    or (isinstance(x, m.Topology) and x.epoch > epoch)
                ),
                deadline,
                generation=gen,
                what="probe orders",
                abort_check=ms.abort_reason,
            )
            if isinstance(msg, m.Topology):
                ms.apply_topology(msg)
                return ms.ids
            mbps = send(msg.target, msg.nbytes, ms.creds, ms.config)
            link.send(m.ProbeResult(epoch=epoch, target=msg.target.peer_id, mbps=mbps))


def handler(ms: Membership) -> Callable[[socket.socket, m.ProbeHello, str], None]:
    """The data-server handler for probes: members only."""

    def on_probe(sock: socket.socket, hello: m.ProbeHello, key: str) -> None:
        if not ms.is_member(key):
            close_quietly(sock)
            raise CommError(f"probe from {fingerprint(key)}, not a member")
        serve(sock, hello, stall_timeout_s=ms.config.stall_timeout_s)

    return on_probe
