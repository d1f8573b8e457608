"""Ledger entries and the Merkle tree over them.

An entry is one signed write, sequenced by the coordinator::

    {"v": 1, "seq": 7, "ts": <coordinator's unix ms>, "prev": <hex leaf hash of entry 6>,
     "kind": "work.submit", "req": <the author's signed request: key, ts, nonce, method, path,
                                     body, sig>}

Its bytes are the RFC 8785 form of that object; its Merkle leaf is ``SHA-256(0x00 || bytes)``
(RFC 9162), and ``prev`` chains it to the entry before (the genesis has 64 zeros). The author's
signature covers the request; the coordinator vouches for the order by signing checkpoints of the
tree (``note``), which witnesses co-sign.

``Tree`` keeps what a busy coordinator needs in memory to append and to prove: the hashes of
every complete 256-leaf tile (32 bytes per 256 entries) and the leaves of the last, partial one.
Proofs over older leaves read at most two partial tiles of leaves back from the database.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cotrain.core import jsonsafe
from cotrain.core.signed import EnvelopeError, canonical
from cotrain.protocol import merkle
from cotrain.protocol.auth import SignedRequest
from cotrain.protocol.errors import RequestError

VERSION = 1
ZERO = "0" * 64
TILE = 256
MAX_ENTRY_BYTES = 1 << 20
_PLAIN = re.compile(r"^[a-z.]{1,40}$")


@dataclass(frozen=True)
class Entry:
    seq: int
    ts_ms: int
    prev: str
    kind: str
    req: SignedRequest

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "seq": self.seq,
            "ts": self.ts_ms,
            "prev": self.prev,
            "kind": self.kind,
            "req": self.req.to_json(),
        }

    def encode(self) -> bytes:
        """The canonical (RFC 8785) bytes. Every string but the body is from a fixed alphabet
        (hex, the path's ``[A-Za-z0-9_./-]``, the kind), which JCS writes as is, and the keys
        are in JCS order, so a template gives the same bytes as ``canonical(self.to_json())``
        (a test holds them equal) at a fraction of the cost."""
        r = self.req
        if not _PLAIN.match(self.kind):
            return canonical(self.to_json())
        return (
            b'{"kind":"%s","prev":"%s","req":{"body":%s,"key":"%s","method":"%s",'
            b'"nonce":"%s","path":"%s","sig":"%s","ts":%d},"seq":%d,"ts":%d,"v":%d}'
            % (
                self.kind.encode(),
                self.prev.encode(),
                r.body_bytes(),
                r.key.encode(),
                r.method.encode(),
                r.nonce.encode(),
                r.path.encode(),
                r.sig.encode(),
                r.ts_ms,
                self.seq,
                self.ts_ms,
                VERSION,
            )
        )

    @classmethod
    def from_json(cls, obj: Any) -> Entry:
        fields = {"v", "seq", "ts", "prev", "kind", "req"}
        if not isinstance(obj, dict) or set(obj) != fields:
            raise RequestError(f"a ledger entry is an object with {sorted(fields)}")
        if obj["v"] != VERSION:
            raise RequestError(f"ledger entry version {obj['v']!r}, expected {VERSION}")
        seq, ts, prev, kind = obj["seq"], obj["ts"], obj["prev"], obj["kind"]
        for name, value in (("seq", seq), ("ts", ts)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
                raise RequestError(f"entry {name} must be a non-negative integer")
        if not isinstance(prev, str) or len(prev) != 64 or prev.strip("0123456789abcdef"):
            raise RequestError("entry prev must be 64 lowercase hex")
        if not isinstance(kind, str) or len(kind) > 40:
            raise RequestError("entry kind must be a short string")
        return cls(seq, ts, prev, kind, SignedRequest.from_json(obj["req"]))

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        """An entry from its bytes, which must be exactly its canonical form."""
        try:
            obj = jsonsafe.loads(data, max_bytes=MAX_ENTRY_BYTES)
        except jsonsafe.MalformedJSON as e:
            raise RequestError(f"ledger entry: {e}") from None
        entry = cls.from_json(obj)
        try:
            if entry.encode() != data:
                raise RequestError("ledger entry bytes are not canonical JSON (RFC 8785)")
        except EnvelopeError as e:
            raise RequestError(f"ledger entry: {e}") from None
        return entry


class Tree:
    """The Merkle tree of a ledger, held as complete tiles plus the last tile's leaves.

    ``leaves(lo, hi)`` reads leaf hashes back from storage (only for proofs and roots of old
    sizes, never for appends)."""

    def __init__(self, leaves: Callable[[int, int], Sequence[bytes]]) -> None:
        self._read_leaves = leaves
        self.tiles = bytearray()
        """32 bytes per complete tile: the root of leaves [256 i, 256 (i + 1))."""
        self.tail: list[bytes] = []
        """Leaf hashes after the last complete tile."""
        self.frontier = merkle.Frontier()

    @property
    def size(self) -> int:
        return self.frontier.size

    def append(self, leaf: bytes) -> bytes | None:
        """Add a leaf hash; returns the new tile's hash when it completes one."""
        self.frontier.append(leaf)
        self.tail.append(leaf)
        if len(self.tail) < TILE:
            return None
        tile = merkle.root_of(self.tail)
        self.tiles += tile
        self.tail = []
        return tile

    def root(self, size: int | None = None) -> bytes:
        if size is None or size == self.size:
            return self.frontier.root()
        if not 0 <= size <= self.size:
            raise RequestError(f"tree size {size} is not in 0..{self.size}")
        return self.subtree(0, size) if size else merkle.EMPTY_ROOT

    def subtree(self, lo: int, hi: int) -> bytes:
        """The root of leaves [lo, hi): from tiles where the range covers whole ones."""
        n = hi - lo
        if n == TILE and lo % TILE == 0 and hi <= len(self.tiles) // 32 * TILE:
            i = lo // TILE
            return bytes(self.tiles[32 * i : 32 * i + 32])
        if n <= TILE:
            return merkle.root_of(self._leaves(lo, hi))
        k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
        return merkle.node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))

    def _leaves(self, lo: int, hi: int) -> Sequence[bytes]:
        start = self.size - len(self.tail)
        if lo >= start:
            return self.tail[lo - start : hi - start]
        got = self._read_leaves(lo, hi)
        if len(got) != hi - lo:
            raise RequestError(f"storage returned {len(got)} leaves for [{lo}, {hi})")
        return got

    def inclusion(self, index: int, size: int) -> list[bytes]:
        if not 0 <= index < size <= self.size:
            raise RequestError(f"no leaf {index} in a tree of {size} (the log has {self.size})")
        return merkle.inclusion_proof(index, size, self.subtree)

    def consistency(self, old: int, new: int) -> list[bytes]:
        if not 0 <= old <= new <= self.size:
            raise RequestError(f"sizes {old} and {new} are not in order within {self.size}")
        return merkle.consistency_proof(old, new, self.subtree)
