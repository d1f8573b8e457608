"""Bandwidth probes between peers, for ordering the ring (``Communicator.optimize_topology``).

The prober sends ``nbytes`` of zeros on a fresh authenticated connection and waits for a one-byte
acknowledgement, so the time covers the bytes' arrival, not just the local socket buffer.
"""

from __future__ import annotations

import logging
import socket
import time

from cotrain.comm import messages as m
from cotrain.comm.auth import Credentials
from cotrain.comm.config import CommConfig
from cotrain.comm.errors import CommError
from cotrain.comm.frames import recv_exact
from cotrain.comm.transport import close_quietly, dial_peer

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
