"""The cases of bench/fuzz.py: a client that speaks the key handshake by hand (to lie in it),
hostile connections and frames, a lying state source, and the background pressure (idle and
1-byte-per-second connections, an honest client that must never be refused)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

from cotrain.comm import auth as a
from cotrain.comm.errors import CommError
from cotrain.comm.frames import HEADER_SIZE, MAGIC, VERSION, pack_frame, pack_json, parse_header
from cotrain.comm.state import digest, fetch_state, serve_state
from cotrain.comm.tensors import state_view
from cotrain.core.identity import Identity
from cotrain.core.signed import canonical

IO_TIMEOUT_S = 15.0
STRANGERS = [f"127.0.0.{i}" for i in range(2, 10)]
HONEST_ADDR = "127.0.0.1"
_LINGER0 = struct.pack("ii", 1, 0)


# ---- a client that speaks the handshake by hand (to lie in it) ---------------------------------


def connect(port: int, src: str, timeout_s: float = IO_TIMEOUT_S) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT: pick the port at connect
    s.settimeout(timeout_s)
    try:
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    return s


def abort(s: socket.socket) -> None:
    """Close with a reset (no TIME_WAIT on our side: 10^5 connections would exhaust ports)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    s.close()


def recv_n(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            break
        buf += part
    return bytes(buf)


def drain(s: socket.socket, limit: int = 1 << 16) -> bytes:
    """Everything the server sends until it closes (or ``limit`` bytes)."""
    buf = bytearray()
    try:
        while len(buf) < limit:
            part = s.recv(limit - len(buf))
            if not part:
                break
            buf += part
    except OSError:
        pass
    return bytes(buf)


@dataclass(frozen=True)
class Greeting:
    key: bytes
    nonce: bytes


def greet(s: socket.socket) -> Greeting | None:
    g = recv_n(s, len(a.GREETING) + a.KEY + a.NONCE)
    if len(g) < len(a.GREETING) + a.KEY + a.NONCE or not g.startswith(a.GREETING):
        return None
    return Greeting(g[len(a.GREETING) : len(a.GREETING) + a.KEY], g[len(a.GREETING) + a.KEY :])


def mac_for(secret: bytes, t0: bytes) -> str:
    return hmac.new(secret, b"client" + t0, hashlib.sha256).hexdigest()


def client_message(
    g: Greeting,
    ident: Identity,
    cred: Callable[[bytes], bytes],
    nonce_c: bytes | None = None,
) -> bytes:
    """Our half of the handshake, signed by ``ident``; ``cred(t0)`` gives the credential."""
    nonce_c = nonce_c or os.urandom(a.NONCE)
    t0 = hashlib.sha256(g.key + g.nonce + ident.public_bytes + nonce_c).digest()
    body = cred(t0)
    t = hashlib.sha256(t0 + body).digest()
    sig = ident.sign(b"cotrain.comm.auth/client" + t)
    return ident.public_bytes + nonce_c + struct.pack("!H", len(body)) + body + sig


def status(s: socket.socket) -> int | None:
    """The server's handshake status byte (0 accepted, 1 refused), None if it just closed."""
    try:
        b = recv_n(s, 1)
    except OSError:
        return None
    return b[0] if b else None


def secret_cred(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda t0: canonical({"mac": mac_for(secret, t0)})


def read_frame(s: socket.socket, max_bytes: int = 1 << 22) -> dict[str, Any] | None:
    head = recv_n(s, HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        return None
    _, length = parse_header(head, max_bytes)
    body = recv_n(s, length)
    return json.loads(body) if len(body) == length else None


# ---- the cases ---------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    kind: str  # "master" or "data"


@dataclass
class World:
    """What the cases know about the run."""

    master: Target
    data: Target
    secret: bytes
    issuer: Identity
    members: list[str]
    replay: dict[str, bytes] = field(default_factory=dict)
    keys: list[Identity] = field(default_factory=list)

    def key(self, rng: random.Random) -> Identity:
        return rng.choice(self.keys)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    cases: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # unexpected exceptions in this process
    unanswered: list[str] = field(default_factory=list)  # no answer nor close in IO_TIMEOUT_S
    refused_at_once: int = 0

    def add(self, kind: str, accepted: str | None = None) -> None:
        with self.lock:
            self.cases[kind] += 1
            if accepted is not None:
                self.accepted.append(f"{kind}: {accepted}")


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def deep_json(rng: random.Random) -> bytes:
    depth = rng.choice([40, 1000, 100_000])
    return b'{"type":"ring","epoch":' + b"[" * depth + b"]" * depth + b"}"


def huge_int_json(rng: random.Random) -> bytes:
    digits = rng.choice([41, 400, 5000, 100_000])
    field_ = rng.choice(["epoch", "seq", "stream", "nbytes", "port"])
    return b'{"type":"%s","%s":%s}' % (
        rng.choice([b"ring", b"state", b"probe", b"hello", b"collective"]),
        field_.encode(),
        b"9" * digits,
    )


def nan_json(rng: random.Random) -> bytes:
    v = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
    return b'{"type":"%s","epoch":%s,"nbytes":%s,"mbps":%s}' % (
        rng.choice([b"ring", b"probe", b"probe_result", b"sync"]),
        v,
        v,
        v,
    )


def hostile_objects(rng: random.Random, world: World) -> dict[str, Any]:
    """Schema-level lies: wrong types, unknown types, out-of-range numbers."""
    member = rng.choice(world.members)
    choices: list[dict[str, Any]] = [
        {"type": "ring", "epoch": "1", "stream": 0},
        {"type": "ring", "epoch": -1, "stream": 0},
        {"type": "ring", "epoch": 1 << 70, "stream": 0},
        {"type": "ring", "epoch": 0, "stream": 10_000},
        {"type": "ring", "epoch": 0, "stream": None},
        {"type": "state", "epoch": [], "seq": {}},
        {"type": "probe", "nbytes": 1 << 40},
        {"type": "probe", "nbytes": 0},
        {"type": "nope"},
        {"type": 5},
        {"type": "hello", "peer_id": 123, "host": "h", "port": 1},
        {"type": "hello", "peer_id": member, "host": "h" * 10_000, "port": 1},
        {"type": "hello", "peer_id": "x" * 500, "host": "h", "port": 0},
        {"type": "collective", "epoch": 0, "seq": 0, "desc": {"kind": "all_reduce", "count": -5}},
        {"type": "sync", "epoch": 0, "seq": 0, "revision": 0, "digest": "", "hashes": [1, 2]},
        {"type": "get", "names": ["x"] * 10},
        {"type": "tensor", "name": "w", "dtype": "float32", "shape": [1 << 62], "nbytes": -1},
        {"type": "ring", "epoch": 0, "stream": 0, "extra": True},
    ]
    return rng.choice(choices)


def hostile_frame(rng: random.Random, world: World) -> bytes:
    """One frame (or frame-shaped lie) sent after a valid handshake."""
    k = rng.randrange(9)
    if k == 0:
        return pack_frame(1, deep_json(rng))
    if k == 1:
        return pack_frame(1, huge_int_json(rng))
    if k == 2:
        return pack_frame(1, nan_json(rng))
    if k == 3:
        return pack_json(hostile_objects(rng, world))
    if k == 4:  # oversized length field (the payload never comes)
        return struct.pack("!2sBBI", MAGIC, VERSION, 1, rng.choice([1 << 31, (4 << 20) + 1]))
    if k == 5:  # wrong magic, version or kind
        return rng.choice(
            [b"XX\x01\x01\x00\x00\x00\x02{}", b"CT\x09\x01\x00\x00\x00\x02{}", b"CT\x01\x07\x00"]
        )
    if k == 6:  # not JSON, not UTF-8
        return pack_frame(1, _random_bytes(rng, rng.randrange(1, 300)))
    if k == 7:  # a JSON array or scalar
        return pack_frame(1, rng.choice([b"[]", b"1", b'"hello"', b"null", b"{}"]))
    return pack_frame(2, _random_bytes(rng, rng.randrange(0, 64)))  # a bytes frame


def run_case(kind: str, target: Target, src: str, world: World, rng: random.Random) -> str | None:
    """One hostile connection; returns why it counts as accepted without credentials, or None."""
    if kind == "connect_close":
        s = connect(target.port, src)
        abort(s)
        return None
    s = connect(target.port, src)
    try:
        if kind == "random":
            s.sendall(_random_bytes(rng, rng.randrange(1, 4096)))
            s.shutdown(socket.SHUT_WR)
            drain(s)
            return None
        g = greet(s)
        if g is None:  # refused at once (a per-address limit): fine
            return None
        ident = world.key(rng)
        if kind == "truncated":
            msg = client_message(g, ident, secret_cred(world.secret))
            s.sendall(msg[: rng.randrange(0, len(msg))])
            s.shutdown(socket.SHUT_WR)
            st = status(s)
            return f"status {st} for a truncated handshake" if st == 0 else None
        if kind == "garbage":
            s.sendall(_random_bytes(rng, rng.randrange(1, 2000)))
            s.shutdown(socket.SHUT_WR)
            st = status(s)
            return f"status {st} for garbage" if st == 0 else None
        if kind == "oversized":
            n = rng.choice([a.MAX_CREDENTIAL + 1, 0xFFFF])
            s.sendall(ident.public_bytes + os.urandom(a.NONCE) + struct.pack("!H", n) + b"{" * 100)
            s.shutdown(socket.SHUT_WR)
            st = status(s)
            return f"status {st} for an oversized credential" if st == 0 else None
        if kind == "wrong_secret":
            s.sendall(client_message(g, ident, secret_cred(b"not-" + world.secret)))
            st = status(s)
            return f"status {st} with a wrong secret" if st == 0 else None
        if kind == "unadmitted":
            cred = rng.choice(
                [
                    lambda t0: b"{}",
                    lambda t0: b'{"mac":null}',
                    lambda t0: b'{"mac":' + b"[" * 200 + b"]" * 200 + b"}",
                    lambda t0: b'{"mac":' + b"7" * 3000 + b"}",
                    lambda t0: b'{"mac":NaN}',
                    lambda t0: b"\xff\xfe",
                    lambda t0: b"[]",
                ]
            )
            s.sendall(client_message(g, ident, cred))
            st = status(s)
            return f"status {st} without a credential" if st == 0 else None
        if kind == "bad_token":
            s.sendall(client_message(g, ident, bad_token(rng, world, ident)))
            st = status(s)
            return f"status {st} with a bad token" if st == 0 else None
        if kind == "replay":
            s.sendall(world.replay[target.kind])
            st = status(s)
            return f"status {st} for a replayed handshake" if st == 0 else None
        if kind == "bad_signature":
            msg = bytearray(client_message(g, ident, secret_cred(world.secret)))
            msg[-1 - rng.randrange(a.SIG)] ^= 1 << rng.randrange(8)
            s.sendall(bytes(msg))
            st = status(s)
            return f"status {st} for a bad signature" if st == 0 else None
        # insiders: the handshake is valid (the key proves the secret); what follows is not
        s.sendall(client_message(g, ident, secret_cred(world.secret)))
        if status(s) != 0:
            return None
        recv_n(s, a.SIG + a.MAC)
        if kind == "impersonate":
            member = rng.choice(world.members)
            hello = {"type": "hello", "peer_id": member, "host": "127.0.0.1", "port": 9}
            if rng.random() < 0.5:
                hello["resume"] = {"epoch": 1, "ring": world.members}
            s.sendall(pack_json(hello))
            reply = read_frame(s)
            if reply is not None and reply.get("type") == "welcome":
                return "a welcome for another key's id"
            return None
        if kind == "frame":
            if target.kind == "master" and rng.random() < 0.5:
                s.sendall(
                    pack_json(
                        {
                            "type": "hello",
                            "peer_id": ident.public_hex,
                            "port": 9,
                            "host": "127.0.0.1",
                        }
                    )
                )
                read_frame(s)
            s.sendall(hostile_frame(rng, world))
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
            drain(s)
            return None
        if kind == "future_ring":  # data port: a ring stream for an epoch that has not come
            epoch = rng.choice([1 + rng.randrange(1, 5), 1 << 40, 1 << 62])
            s.sendall(pack_json({"type": "ring", "epoch": epoch, "stream": rng.randrange(2)}))
            s.settimeout(0.2)  # the server may hold it until its wait for the epoch ends
            drain(s)
            return None
        if kind == "state_request":  # data port: a non-member asks for the shared state
            s.sendall(pack_json({"type": "state", "epoch": rng.randrange(3), "seq": 0}))
            s.sendall(pack_json({"type": "get", "names": ["round"]}))
            got = drain(s)
            return "state served to a non-member" if b"tensor" in got else None
        if kind == "probe_request":  # data port: a non-member asks for a probe
            n = rng.choice([1, 1000, 1 << 20])
            s.sendall(pack_json({"type": "probe", "nbytes": n}))
            with contextlib.suppress(OSError):
                s.sendall(bytes(min(n, 1 << 16)))
            got = drain(s)
            return "probe acknowledged for a non-member" if got else None
        raise AssertionError(kind)
    finally:
        abort(s)


def bad_token(rng: random.Random, world: World, ident: Identity) -> Callable[[bytes], bytes]:
    rogue = world.key(rng)  # not the run's issuer
    other = rng.choice([k for k in world.keys if k is not ident])
    k = rng.randrange(6)
    if k == 0:
        tok = a.issue_token(rogue, ident.public_hex, run="default", ttl_s=600).to_json()
    elif k == 1:
        tok = a.issue_token(world.issuer, other.public_hex, run="default", ttl_s=600).to_json()
    elif k == 2:
        tok = a.issue_token(world.issuer, ident.public_hex, run="default", ttl_s=-10).to_json()
    elif k == 3:
        tok = a.issue_token(world.issuer, ident.public_hex, run="other", ttl_s=600).to_json()
    elif k == 4:  # a body edited after signing
        tok = a.issue_token(world.issuer, other.public_hex, run="default", ttl_s=600).to_json()
        tok["body"]["peer"] = ident.public_hex
    else:
        tok = {"body": {"peer": [[[[]]]]}, "sig": 12, "signer": None, "domain": 1e300}
    return lambda t0: canonical({"token": tok, "mac": "0" * 64})


HANDSHAKE_KINDS = [
    "connect_close",
    "random",
    "truncated",
    "garbage",
    "oversized",
    "wrong_secret",
    "unadmitted",
    "bad_token",
    "replay",
    "bad_signature",
]
MASTER_KINDS = [*HANDSHAKE_KINDS, "impersonate", "frame", "frame"]
DATA_KINDS = [
    *HANDSHAKE_KINDS,
    "frame",
    "frame",
    "future_ring",
    "state_request",
    "probe_request",
]


# ---- in-process: a lying state source and a hostile state request -----------------------------


def state_case(rng: random.Random, tally: Tally) -> None:
    """Run ``fetch_state`` against a source that lies, or ``serve_state`` against a bad request;
    anything but a typed error (CommError, OSError) is a handler traceback."""
    w = np.arange(16, dtype=np.float32)
    flat = {"w": state_view(w.copy())}
    expected = digest({"w": state_view(w)}, 1).hashes
    left, right = socket.socketpair()
    left.settimeout(2.0)
    right.settimeout(2.0)
    try:
        if rng.random() < 0.5:
            shape: Any = rng.choice([[16], [4, 4], [17], [1 << 62], [], [0], [-1]])
            head = {
                "type": rng.choice(["tensor", "tensor", "missing", "nope"]),
                "name": rng.choice(["w", "v", "w" * 300]),
                "dtype": rng.choice(["float32", "int8", "float16", "x" * 20]),
                "shape": shape,
                "nbytes": rng.choice([64, 63, 65, 0, 1 << 62, -1, 10**30]),
            }
            raw = pack_json(head) if rng.random() < 0.8 else hostile_frame(rng, _NO_WORLD)
            body = w.tobytes()[: rng.randrange(0, 65)]
            right.sendall(raw + body)
            right.shutdown(socket.SHUT_WR)
            fetch_state(left, flat, ["w"], expected, 1 << 20)
        else:
            right.sendall(
                rng.choice(
                    [
                        pack_json({"type": "get", "names": ["w", "zz"]}),
                        pack_json({"type": "get", "names": "w"}),
                        pack_json({"type": "get", "names": ["w"] * 100_001}),
                        hostile_frame(rng, _NO_WORLD),
                    ]
                )
            )
            right.shutdown(socket.SHUT_WR)
            serve_state(left, flat, 1 << 20)
    except (CommError, OSError):
        pass
    except Exception:
        with tally.lock:
            tally.errors.append(traceback.format_exc(limit=6))
    finally:
        left.close()
        right.close()
    tally.add("state_inproc")


_NO_WORLD = World(
    master=Target("", 0, "master"),
    data=Target("", 0, "data"),
    secret=b"",
    issuer=Identity.generate(),
    members=["0" * 64],
)


# ---- background pressure: idle and slowloris connections, an honest client --------------------


class Holder(threading.Thread):
    """Keeps ``idle`` silent connections and ``slow`` 1-byte-per-second ones open to ``port``
    from ``src``, reopening those the server closes; counts every connection as a case."""

    def __init__(self, port: int, src: str, *, idle: int, slow: int, tally: Tally) -> None:
        super().__init__(daemon=True)
        self.port, self.src, self.idle, self.slow, self.tally = port, src, idle, slow, tally
        self.stop = threading.Event()
        self.sel = selectors.DefaultSelector()
        self.open: dict[socket.socket, tuple[str, bytes]] = {}

    def _open(self, kind: str) -> None:
        try:
            s = connect(self.port, self.src, timeout_s=2.0)
        except OSError:
            return
        s.setblocking(False)
        # a slowloris trickles a plausible handshake: key, nonce, length, credential...
        trickle = os.urandom(a.KEY + a.NONCE) + struct.pack("!H", 200) + b"{" * 400
        self.open[s] = (kind, trickle)
        self.sel.register(s, selectors.EVENT_READ)
        self.tally.add(kind)

    def _close(self, s: socket.socket) -> None:
        self.sel.unregister(s)
        self.open.pop(s, None)
        abort(s)

    def run(self) -> None:
        last_drip = last_fill = 0.0
        while not self.stop.is_set():
            if time.monotonic() - last_fill >= 0.25:  # a refused slot is not retried in a spin
                last_fill = time.monotonic()
                kinds = Counter(k for k, _ in self.open.values())
                for _ in range(self.idle - kinds["idle"]):
                    self._open("idle")
                for _ in range(self.slow - kinds["slowloris"]):
                    self._open("slowloris")
            for key, _ in self.sel.select(timeout=0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._close(s)
            if time.monotonic() - last_drip >= 1.0:
                last_drip = time.monotonic()
                for s, (kind, trickle) in list(self.open.items()):
                    if kind == "slowloris" and trickle:
                        try:
                            s.send(trickle[:1])
                            self.open[s] = (kind, trickle[1:])
                        except OSError:
                            self._close(s)
        for s in list(self.open):
            self._close(s)


class HonestClient(threading.Thread):
    """An honest handshake (the run secret) from the honest peers' address every 0.2 s to the
    master and the data port: none may be refused, none may be slow."""

    def __init__(self, world: World) -> None:
        super().__init__(daemon=True)
        self.world = world
        self.stop = threading.Event()
        self.refused: list[str] = []
        self.slowest_s = 0.0
        self.tries = 0
        self.identity = Identity.generate()

    def once(self, target: Target) -> None:
        t0 = time.perf_counter()
        why = ""
        try:
            s = connect(target.port, HONEST_ADDR, timeout_s=10.0)
            try:
                g = greet(s)
                if g is None:
                    why = "closed before the greeting"
                else:
                    s.sendall(client_message(g, self.identity, secret_cred(self.world.secret)))
                    st = status(s)
                    if st != 0:
                        why = f"handshake status {st}"
            finally:
                abort(s)
        except OSError as e:
            why = str(e)
        self.tries += 1
        dt = time.perf_counter() - t0
        if why:
            self.refused.append(f"{target.name}: {why} after {dt:.2f}s")
        else:
            self.slowest_s = max(self.slowest_s, dt)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for t in (self.world.master, self.world.data):
                self.once(t)
