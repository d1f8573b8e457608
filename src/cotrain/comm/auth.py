"""Mutual challenge-response authentication with the run secret; the secret never crosses the wire.

Server -> client: ``AUTH1 | nonce_s`` (32 random bytes).
Client -> server: ``nonce_c | HMAC(secret, "client" | nonce_s | nonce_c)``.
Server -> client: ``HMAC(secret, "server" | nonce_s | nonce_c)`` if the client's MAC was right;
otherwise the server closes the connection. Both sides compare MACs in constant time, and both
nonces bind the exchange to this connection, so a recorded handshake cannot be replayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket

from cotrain.comm.errors import AuthError, ProtocolError
from cotrain.comm.frames import recv_exact

GREETING = b"CTAUTH1\n"
NONCE = 32
MAC = 32


def resolve_secret(secret: str) -> bytes:
    """The configured secret, or COTRAIN_SECRET; refusing to run without one."""
    value = secret or os.environ.get("COTRAIN_SECRET", "")
    if not value:
        raise ValueError("no run secret: set `secret` in the config or the COTRAIN_SECRET variable")
    return value.encode()


def _mac(secret: bytes, role: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(secret, role + nonce_s + nonce_c, hashlib.sha256).digest()


def client_handshake(sock: socket.socket, secret: bytes) -> None:
    """Authenticate to a server on a connected blocking socket (its timeout bounds the wait)."""
    try:
        greeting = recv_exact(sock, len(GREETING) + NONCE)
    except ConnectionError:
        raise AuthError("server closed the connection during the handshake") from None
    if not greeting.startswith(GREETING):
        raise ProtocolError("the other side is not a cotrain endpoint")
    nonce_s = greeting[len(GREETING) :]
    nonce_c = os.urandom(NONCE)
    sock.sendall(nonce_c + _mac(secret, b"client", nonce_s, nonce_c))
    try:
        reply = recv_exact(sock, MAC)
    except ConnectionError:
        raise AuthError("server rejected our secret (wrong run secret?)") from None
    if not hmac.compare_digest(reply, _mac(secret, b"server", nonce_s, nonce_c)):
        raise AuthError("server does not know the run secret")


def server_handshake(sock: socket.socket, secret: bytes) -> None:
    """Authenticate a client on an accepted blocking socket; raise ``AuthError`` if it fails."""
    nonce_s = os.urandom(NONCE)
    sock.sendall(GREETING + nonce_s)
    try:
        answer = recv_exact(sock, NONCE + MAC)
    except ConnectionError:
        raise AuthError("client left during the handshake") from None
    nonce_c, mac = answer[:NONCE], answer[NONCE:]
    if not hmac.compare_digest(mac, _mac(secret, b"client", nonce_s, nonce_c)):
        raise AuthError("client does not know the run secret")
    sock.sendall(_mac(secret, b"server", nonce_s, nonce_c))


async def async_server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> None:
    nonce_s = os.urandom(NONCE)
    writer.write(GREETING + nonce_s)
    await writer.drain()
    try:
        answer = await reader.readexactly(NONCE + MAC)
    except asyncio.IncompleteReadError:
        raise AuthError("client left during the handshake") from None
    nonce_c, mac = answer[:NONCE], answer[NONCE:]
    if not hmac.compare_digest(mac, _mac(secret, b"client", nonce_s, nonce_c)):
        raise AuthError("client does not know the run secret")
    writer.write(_mac(secret, b"server", nonce_s, nonce_c))
    await writer.drain()
