"""Who is on the other end: mutual ed25519 challenge-response, then the run's admission rule.

Every connection (peer to master, peer to peer) opens with this exchange; nothing secret crosses
the wire::

    server -> client  GREETING | server key (32) | nonce_s (32)
    client -> server  client key (32) | nonce_c (32) | len u16 | credential (JSON) | sig_c (64)
    server -> client  b"\\x00" | sig_s (64) | mac_s (32, zeros without a run secret)
                 or   b"\\x01" | len u16 | why (UTF-8), then the server closes

with ``T0 = sha256(server key | nonce_s | client key | nonce_c)``,
``T = sha256(T0 | credential)``, ``sig_c = sign(client, "cotrain.comm.auth/client" | T)`` and
``sig_s = sign(server, "cotrain.comm.auth/server" | T)``. Both nonces are in both signatures, so
a recorded handshake cannot be replayed, and nobody can speak for a key without holding it: a
peer's id *is* its public key, so resuming a membership needs that key.

The credential says why the server should admit the client (the run's ``Admission``):
``{"mac": HMAC(secret, "client" | T0)}`` with the run secret (quick local runs; the server then
proves the secret too with ``mac_s``), ``{"token": <envelope>}`` with an admission token signed
by a key the run trusts (the coordinator issues these), or ``{}`` for a key on the allow-list.
The client checks the server's key when it knows it (a ring neighbour's key comes with the
topology; a master's key from ``master_key``) and the server's MAC when it holds the secret.

Every read of the handshake is bounded by one deadline for the whole exchange: a client that
sends one byte a second is cut off as fast as one that sends nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotrain.comm.errors import AuthError, ProtocolError
from cotrain.core import jsonsafe
from cotrain.core.clock import Deadline
from cotrain.core.identity import Identity, SignatureError, verify_signature
from cotrain.core.signed import Envelope, EnvelopeError, canonical

GREETING = b"CTAUTH2\n"
KEY = 32
NONCE = 32
SIG = 64
MAC = 32
MAX_CREDENTIAL = 4096
TOKEN_DOMAIN = "cotrain.comm.admission/1"
_CLIENT = b"cotrain.comm.auth/client"
_SERVER = b"cotrain.comm.auth/server"
_NO_MAC = bytes(MAC)


def resolve_secret(secret: str) -> bytes | None:
    """The configured secret, else COTRAIN_SECRET, else None (the run admits by key only)."""
    value = secret or os.environ.get("COTRAIN_SECRET", "")
    return value.encode() if value else None


def load_identity(key_file: str | None) -> Identity:
    """The key in ``key_file`` (from ``cotrain keygen``), or a fresh one for this process."""
    if key_file is None:
        return Identity.generate()
    try:
        return Identity.load(key_file)
    except FileNotFoundError:
        raise ValueError(
            f"no key at {key_file}: create one with `cotrain keygen --key {key_file}`"
        ) from None
    except ValueError as e:
        raise ValueError(f"{key_file} is not an ed25519 key from `cotrain keygen`: {e}") from None


def fingerprint(key_hex: str) -> str:
    """Short name of a key for logs (the first 12 hex digits)."""
    return key_hex[:12]


# ---- admission tokens --------------------------------------------------------------------------


def issue_token(issuer: Identity, peer_key: str, *, run: str, ttl_s: float) -> Envelope:
    """An admission token: ``issuer`` lets ``peer_key`` into run ``run`` for ``ttl_s`` seconds."""
    if len(peer_key) != 64:
        raise ValueError("peer_key must be a 64-hex ed25519 public key")
    bytes.fromhex(peer_key)
    body = {"peer": peer_key, "run": run, "expires_unix": int(time.time() + ttl_s)}
    return Envelope.seal(issuer, TOKEN_DOMAIN, body)


def load_token(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return jsonsafe.loads_object(Path(path).read_bytes(), max_bytes=MAX_CREDENTIAL)
    except FileNotFoundError:
        raise ValueError(f"no admission token at {path}") from None
    except jsonsafe.MalformedJSON as e:
        raise ValueError(f"{path} is not an admission token: {e}") from None


@dataclass(frozen=True)
class Admission:
    """Who a server lets in once the client has proven its key.

    A master admits a key that is on ``allow_keys``, or shows a valid token from one of
    ``token_issuers`` for ``run_id``, or proves the run ``secret``. A peer's data server is
    ``open``: any proven key passes the handshake, and the ring, state and probe handlers then
    admit only the members the master announced (with the secret, it must be proven too)."""

    secret: bytes | None = None
    allow_keys: frozenset[str] = frozenset()
    token_issuers: frozenset[str] = frozenset()
    run_id: str = "default"
    open: bool = False

    def check(self, client_key: str, credential: dict[str, Any], t0: bytes) -> None:
        """Raise ``AuthError`` with the reason unless ``client_key`` may come in."""
        mac = credential.get("mac")
        if self.secret is not None:
            if not isinstance(mac, str) or not hmac.compare_digest(
                mac, hmac.new(self.secret, b"client" + t0, hashlib.sha256).hexdigest()
            ):
                if self.open or not (self.allow_keys or self.token_issuers):
                    raise AuthError("the client does not know the run secret")
            else:
                return
        if self.open:
            return
        if client_key in self.allow_keys:
            return
        token = credential.get("token")
        if token is not None and self.token_issuers:
            self._check_token(client_key, token)
            return
        raise AuthError(f"key {fingerprint(client_key)} is not admitted to this run")

    def _check_token(self, client_key: str, token: Any) -> None:
        try:
            env = Envelope.from_json(token, domain=TOKEN_DOMAIN, signers=self.token_issuers)
        except EnvelopeError as e:
            raise AuthError(f"admission token refused: {e}") from None
        body = env.body
        if body.get("peer") != client_key:
            raise AuthError("admission token was issued to another key")
        if body.get("run") != self.run_id:
            raise AuthError(f"admission token is for run {str(body.get('run'))[:40]!r}")
        expires = body.get("expires_unix")
        if not isinstance(expires, int) or expires < time.time():
            raise AuthError("admission token has expired")


@dataclass(frozen=True)
class Credentials:
    """What a client shows: its key, and the run secret or an admission token if it has one."""

    identity: Identity
    secret: bytes | None = None
    token: dict[str, Any] | None = None

    def credential(self, t0: bytes) -> bytes:
        body: dict[str, Any] = {}
        if self.secret is not None:
            body["mac"] = hmac.new(self.secret, b"client" + t0, hashlib.sha256).hexdigest()
        if self.token is not None:
            body["token"] = self.token
        return canonical(body)


def _t0(server_key: bytes, nonce_s: bytes, client_key: bytes, nonce_c: bytes) -> bytes:
    return hashlib.sha256(server_key + nonce_s + client_key + nonce_c).digest()


def _t(t0: bytes, credential: bytes) -> bytes:
    return hashlib.sha256(t0 + credential).digest()


def _verify(key: bytes, message: bytes, sig: bytes, who: str) -> None:
    try:
        verify_signature(key.hex(), message, sig)
    except SignatureError:
        raise AuthError(f"{who} could not prove its key") from None


def _recv(sock: socket.socket, n: int, deadline: Deadline) -> bytes:
    """Exactly ``n`` bytes before ``deadline`` (not per read: a trickle cannot stretch it)."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline.remaining()
        if left <= 0:
            raise TimeoutError("handshake took too long")
        sock.settimeout(left)
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("connection closed during the handshake")
        buf += part
    return bytes(buf)


# ---- client ------------------------------------------------------------------------------------


def client_handshake(
    sock: socket.socket,
    creds: Credentials,
    *,
    expect_key: str | None,
    timeout_s: float,
) -> str:
    """Prove our key to a server and check its; returns the server's key (hex).

    ``expect_key``: the key the server must hold (None: any, when the run secret vouches for it).
    """
    deadline = Deadline.after(timeout_s)
    try:
        greeting = _recv(sock, len(GREETING) + KEY + NONCE, deadline)
    except ConnectionError:
        raise AuthError("the server closed the connection during the handshake") from None
    if not greeting.startswith(GREETING):
        raise ProtocolError("the other side is not a cotrain endpoint (or an older version)")
    server_key = greeting[len(GREETING) : len(GREETING) + KEY]
    nonce_s = greeting[len(GREETING) + KEY :]
    if expect_key is not None and server_key.hex() != expect_key:
        raise AuthError(f"expected key {fingerprint(expect_key)}, the server holds another")
    if expect_key is None and creds.secret is None:
        raise AuthError("cannot check the server: no expected key and no run secret")
    me = creds.identity
    nonce_c = os.urandom(NONCE)
    t0 = _t0(server_key, nonce_s, me.public_bytes, nonce_c)
    cred = creds.credential(t0)
    t = _t(t0, cred)
    sock.sendall(
        me.public_bytes + nonce_c + struct.pack("!H", len(cred)) + cred + me.sign(_CLIENT + t)
    )
    try:
        status = _recv(sock, 1, deadline)
        if status == b"\x01":
            (n,) = struct.unpack("!H", _recv(sock, 2, deadline))
            why = _recv(sock, min(n, 512), deadline).decode("utf-8", "replace")
            raise AuthError(f"refused: {why}")
        if status != b"\x00":
            raise ProtocolError("bad handshake status")
        reply = _recv(sock, SIG + MAC, deadline)
    except ConnectionError:
        raise AuthError("the server refused us (not admitted to this run?)") from None
    _verify(server_key, _SERVER + t, reply[:SIG], "the server")
    if creds.secret is not None and not hmac.compare_digest(
        reply[SIG:], hmac.new(creds.secret, b"server" + t0, hashlib.sha256).digest()
    ):
        raise AuthError("the server does not know the run secret")
    return server_key.hex()


# ---- server ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hello:
    client_key: bytes
    nonce_c: bytes
    credential: bytes


def _server_mac(admission: Admission, t0: bytes) -> bytes:
    if admission.secret is None:
        return _NO_MAC
    return hmac.new(admission.secret, b"server" + t0, hashlib.sha256).digest()


def _judge(
    identity: Identity, admission: Admission, nonce_s: bytes, hello: _Hello, sig: bytes
) -> tuple[str, bytes]:
    """Check the client's signature and admission; returns (client key, our reply)."""
    t0 = _t0(identity.public_bytes, nonce_s, hello.client_key, hello.nonce_c)
    t = _t(t0, hello.credential)
    _verify(hello.client_key, _CLIENT + t, sig, "the client")
    try:
        cred = jsonsafe.loads_object(hello.credential, max_bytes=MAX_CREDENTIAL)
    except jsonsafe.MalformedJSON as e:
        raise AuthError(f"malformed credential: {e}") from None
    client_key = hello.client_key.hex()
    admission.check(client_key, cred, t0)
    return client_key, b"\x00" + identity.sign(_SERVER + t) + _server_mac(admission, t0)


def _refusal(why: str) -> bytes:
    raw = why.encode()[:512]
    return b"\x01" + struct.pack("!H", len(raw)) + raw


def server_handshake(
    sock: socket.socket, identity: Identity, admission: Admission, *, timeout_s: float
) -> str:
    """Authenticate a client on an accepted socket within ``timeout_s`` in all; returns its key.

    Raises ``AuthError`` (the client is told why, then the caller closes), ``ProtocolError``,
    ``TimeoutError`` or ``ConnectionError``."""
    deadline = Deadline.after(timeout_s)
    nonce_s = os.urandom(NONCE)
    sock.settimeout(max(deadline.remaining(), 0.001))
    sock.sendall(GREETING + identity.public_bytes + nonce_s)
    head = _recv(sock, KEY + NONCE + 2, deadline)
    (n,) = struct.unpack("!H", head[-2:])
    if n > MAX_CREDENTIAL:
        raise ProtocolError(f"credential of {n} bytes")
    rest = _recv(sock, n + SIG, deadline)
    hello = _Hello(head[:KEY], head[KEY : KEY + NONCE], rest[:n])
    try:
        client_key, reply = _judge(identity, admission, nonce_s, hello, rest[n:])
    except AuthError as e:
        sock.settimeout(0.5)
        try:
            sock.sendall(_refusal(str(e)))
        except OSError:
            pass
        raise
    sock.settimeout(max(deadline.remaining(), 0.001))
    sock.sendall(reply)
    return client_key


async def async_server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: Identity,
    admission: Admission,
) -> str:
    """``server_handshake`` for asyncio streams (the caller bounds the whole of it in time)."""
    nonce_s = os.urandom(NONCE)
    writer.write(GREETING + identity.public_bytes + nonce_s)
    await writer.drain()
    try:
        head = await reader.readexactly(KEY + NONCE + 2)
        (n,) = struct.unpack("!H", head[-2:])
        if n > MAX_CREDENTIAL:
            raise ProtocolError(f"credential of {n} bytes")
        rest = await reader.readexactly(n + SIG)
    except asyncio.IncompleteReadError:
        raise ConnectionError("client left during the handshake") from None
    hello = _Hello(head[:KEY], head[KEY : KEY + NONCE], rest[:n])
    try:
        client_key, reply = _judge(identity, admission, nonce_s, hello, rest[n:])
    except AuthError as e:
        writer.write(_refusal(str(e)))
        raise
    writer.write(reply)
    await writer.drain()
    return client_key


def admission_for(
    *,
    secret: bytes | None,
    allow_keys: Collection[str] = (),
    token_issuers: Collection[str] = (),
    run_id: str = "default",
) -> Admission:
    """A master's admission rule; refuses a run that would admit nobody."""
    if secret is None and not allow_keys and not token_issuers:
        raise ValueError(
            "no admission rule: set allow_keys, token_issuers, or a run secret "
            "(`secret` in the config or the COTRAIN_SECRET variable)"
        )
    return Admission(
        secret=secret,
        allow_keys=frozenset(k.lower() for k in allow_keys),
        token_issuers=frozenset(k.lower() for k in token_issuers),
        run_id=run_id,
    )
