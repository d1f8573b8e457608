"""Length-prefixed frames over TCP, blocking (sockets) and asyncio (streams).

A frame is an 8-byte header ``b"CT" | version u8 | kind u8 | length u32 (big endian)`` followed by
``length`` bytes. Control messages are JSON (kind 1); bulk tensor data on ring connections is
sent raw after a small binary preamble (see ``ring.py``), never through these frames.
Every read is bounded: a header with the wrong magic, version or kind, or a length over the
limit, raises ``ProtocolError`` before anything is allocated.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
from typing import Any

from cotrain.comm.errors import ProtocolError
from cotrain.core import jsonsafe

MAGIC = b"CT"
VERSION = 1
KIND_JSON = 1
KIND_BYTES = 2
_HEADER = struct.Struct("!2sBBI")
HEADER_SIZE = _HEADER.size


def pack_frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


def pack_json(obj: dict[str, Any]) -> bytes:
    return pack_frame(KIND_JSON, json.dumps(obj, separators=(",", ":")).encode())


def parse_header(header: bytes, max_bytes: int) -> tuple[int, int]:
    """Return (kind, length) of a frame header or raise ``ProtocolError``."""
    magic, version, kind, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}: not a cotrain peer")
    if version != VERSION:
        raise ProtocolError(f"frame version {version}, this build speaks {VERSION}")
    if kind not in (KIND_JSON, KIND_BYTES):
        raise ProtocolError(f"unknown frame kind {kind}")
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
    return kind, length


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = jsonsafe.loads(payload)
    except jsonsafe.MalformedJSON as e:
        raise ProtocolError(f"bad control frame: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("control frame must be a JSON object with a string 'type'")
    return obj


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise ``ConnectionError`` on EOF (socket timeouts apply)."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    # On a socket in kernel-blocking mode (see ``ring.kernel_timeouts``) MSG_WAITALL lets one
    # syscall fill the whole chunk: far fewer GIL round trips than one per TCP segment batch.
    plain = not isinstance(sock, ssl.SSLSocket)
    flags = socket.MSG_WAITALL if plain and sock.gettimeout() is None else 0
    while got < n:
        k = sock.recv_into(view[got:], n - got, flags)
        if k == 0:
            raise ConnectionError("connection closed by the other side")
        got += k


def send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(pack_json(obj))


def recv_frame(sock: socket.socket, max_bytes: int) -> tuple[int, bytes]:
    kind, length = parse_header(recv_exact(sock, HEADER_SIZE), max_bytes)
    return kind, recv_exact(sock, length)


def recv_json(sock: socket.socket, max_bytes: int) -> dict[str, Any]:
    kind, payload = recv_frame(sock, max_bytes)
    if kind != KIND_JSON:
        raise ProtocolError("expected a JSON control frame")
    return decode_json(payload)


async def async_recv_json(reader: asyncio.StreamReader, max_bytes: int) -> dict[str, Any]:
    try:
        header = await reader.readexactly(HEADER_SIZE)
        kind, length = parse_header(header, max_bytes)
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionError("connection closed by the other side") from None
    if kind != KIND_JSON:
        raise ProtocolError("expected a JSON control frame")
    return decode_json(payload)


def async_send_json(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(pack_json(obj))
