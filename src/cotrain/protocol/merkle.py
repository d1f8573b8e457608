"""Merkle tree hashing, proofs and their verification for append-only logs (SHA-256).

The tree is the one of RFC 9162 (Certificate Transparency 2.0), section 2.1,
https://www.rfc-editor.org/rfc/rfc9162#section-2.1 (the same as RFC 6962's)::

    MTH({})      = SHA-256()
    MTH({d0})    = SHA-256(0x00 || d0)                       leaf_hash
    MTH(D[n])    = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))  node_hash,
                   k = the largest power of two smaller than n

so every node covers the leaves ``[lo, min(lo + K, n))`` for a power of two ``K`` and ``lo`` a
multiple of ``K``; only the nodes on the right edge are incomplete. Functions here work on leaf
*hashes*: hash entries with ``leaf_hash`` first.

- ``root_of`` hashes a list of leaf hashes; ``Frontier`` keeps the O(log n) complete subtrees on
  the right edge so a log can append and publish roots without holding its leaves.
- ``inclusion_proof`` and ``consistency_proof`` build RFC 9162 proofs (2.1.3.1 and 2.1.4.1)
  from a ``subtree(lo, hi)`` callback, so the leaves can stay in a database; ``MemoryTree``
  is the in-memory log that implements it.
- ``verify_inclusion`` and ``verify_consistency`` are the verification algorithms of 2.1.3.2
  and 2.1.4.2, step by step; they raise ``ProofError`` with a one-line reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cotrain.core.errors import CotrainError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "MemoryTree",
    "ProofError",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256

Subtree = Callable[[int, int], bytes]
"""``subtree(lo, hi)`` returns MTH(leaves[lo:hi]); see ``inclusion_proof`` for the ranges asked."""


class ProofError(CotrainError, ValueError):
    """A Merkle proof does not prove what it claims (or its arguments cannot be right)."""


def leaf_hash(data: bytes) -> bytes:
    """The hash of one log entry: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an interior node: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): the size of the left subtree."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves; ``EMPTY_ROOT`` for none.

    Hashes level by level, carrying an unpaired last node up unchanged: that builds exactly the
    RFC 9162 tree (left subtrees are the largest power of two), in n - 1 hashes.
    """
    level = list(leaf_hashes)
    if not level:
        return EMPTY_ROOT
    if any(len(h) != HASH_SIZE for h in level):
        raise ValueError(f"leaf hashes must be {HASH_SIZE} bytes; hash entries with leaf_hash")
    while len(level) > 1:
        odd = level[-1] if len(level) % 2 else None
        level = [
            _sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if odd is not None:
            level.append(odd)
    return level[0]


class Frontier:
    """The right edge of an append-only log: enough to append and to compute the root.

    Holds the hashes of the complete power-of-two subtrees the leaves so far decompose into,
    largest (leftmost) first: one per set bit of ``size``, so at most 64 hashes for any log.
    """

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash (``leaf_hash(entry)``) at index ``size``."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf)}")
        h, s = leaf, self._size
        # Each trailing one bit of the old size is a complete subtree of the same height as the
        # one being carried: merge them, like a binary increment.
        while s & 1:
            h = node_hash(self._hashes.pop(), h)
            s >>= 1
        self._hashes.append(h)
        self._size += 1

    def root(self) -> bytes:
        """MTH of the leaves so far: the subtrees folded from the right."""
        if not self._hashes:
            return EMPTY_ROOT
        r = self._hashes[-1]
        for h in reversed(self._hashes[:-1]):
            r = node_hash(h, r)
        return r

    def to_json(self) -> dict[str, Any]:
        """``{"size": n, "hashes": [hex, ...]}``, largest subtree first."""
        return {"size": self._size, "hashes": [h.hex() for h in self._hashes]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Frontier:
        """The inverse of ``to_json``; raises ``ValueError`` on anything else."""
        size, hashes = obj.get("size"), obj.get("hashes")
        if type(size) is not int or size < 0 or not isinstance(hashes, list):
            raise ValueError('a frontier is {"size": int >= 0, "hashes": [hex, ...]}')
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"a frontier of size {size} has {size.bit_count()} hashes, got {len(hashes)}"
            )
        out = cls()
        for h in hashes:
            if not isinstance(h, str) or len(h) != 2 * HASH_SIZE:
                raise ValueError(f"frontier hashes are {2 * HASH_SIZE} hex digits")
            out._hashes.append(bytes.fromhex(h))
        out._size = size
        return out


def inclusion_proof(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of the first ``size`` leaves (RFC 9162
    2.1.3.1), leaf level first.

    ``subtree(lo, hi)`` must return MTH(leaves[lo:hi]). Every range asked for, here and in
    ``consistency_proof``, is a node of the tree of ``size`` leaves: ``lo`` is a multiple of a
    power of two ``K`` and ``hi = min(lo + K, size)``, so all but the right-edge ones are
    complete subtrees a database can store by (level, lo // K). At most log2(size) calls.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of {size} leaves")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:  # from the root down; the RFC lists the path bottom up
        k = _split(hi - lo)
        if index < lo + k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(old_size: int, new_size: int, subtree: Subtree) -> list[bytes]:
    """The proof that the tree of ``new_size`` leaves extends that of ``old_size`` (RFC 9162
    2.1.4.1, SUBPROOF); empty when ``old_size`` is 0 or equals ``new_size``.

    ``subtree`` is as for ``inclusion_proof``, ranges being nodes of the ``new_size`` tree.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    path: list[bytes] = []
    m, lo, hi = old_size, 0, new_size
    complete = True  # the RFC's b: the old tree so far is a left-edge subtree it knows the root of
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo += k
            m -= k
            complete = False
    if not complete:
        path.append(subtree(lo, hi))
    path.reverse()
    return path


class MemoryTree:
    """An append-only log of leaf hashes in memory, with roots and proofs at any past size.

    Keeps every complete subtree (about 2n hashes), so roots and proofs cost O(log n) hashes.
    """

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        # _levels[h][j] = MTH of leaves [j * 2^h, (j + 1) * 2^h), only for complete subtrees
        self._levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    def __len__(self) -> int:
        return len(self._levels[0])

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; returns its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf)}")
        levels = self._levels
        levels[0].append(leaf)
        h = 0
        while len(levels[h]) % 2 == 0:
            if h + 1 == len(levels):
                levels.append([])
            levels[h + 1].append(node_hash(levels[h][-2], levels[h][-1]))
            h += 1
        return len(levels[0]) - 1

    def leaf(self, index: int) -> bytes:
        return self._levels[0][index]

    def subtree(self, lo: int, hi: int) -> bytes:
        """MTH(leaves[lo:hi]) for any range; O(log n) for the tree's own nodes."""
        if not 0 <= lo <= hi <= self.size:
            raise ValueError(f"range [{lo}, {hi}) is not within the {self.size} leaves")
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        k = n if n & (n - 1) == 0 else _split(n)
        if lo % k:  # not a node of this tree: hash it out
            return root_of(self._levels[0][lo:hi])
        left = self._levels[k.bit_length() - 1][lo // k]  # complete, so stored
        # a right-edge node: its right part starts at a multiple of every smaller power of two
        return left if k == n else node_hash(left, self.subtree(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (all by default)."""
        return self.subtree(0, self.size if size is None else size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        n = self.size if size is None else size
        if n > self.size:
            raise ValueError(f"the tree has {self.size} leaves, not {n}")
        return inclusion_proof(index, n, self.subtree)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        n = self.size if new_size is None else new_size
        if n > self.size:
            raise ValueError(f"the tree has {self.size} leaves, not {n}")
        return consistency_proof(old_size, n, self.subtree)


def _check_hash(what: str, h: bytes) -> None:
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        got = f"{len(h)} bytes" if isinstance(h, bytes) else type(h).__name__
        raise ProofError(f"{what} must be {HASH_SIZE} bytes, got {got}")


def _check_path(what: str, proof: Sequence[bytes], expected: int) -> None:
    if len(proof) != expected:
        raise ProofError(f"{what} has {len(proof)} hashes, expected {expected}")
    for i, h in enumerate(proof):
        _check_hash(f"{what}[{i}]", h)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ``ProofError`` unless ``proof`` shows that ``leaf`` (a leaf hash) is leaf ``index``
    of the tree of ``size`` leaves whose root is ``root`` (RFC 9162 2.1.3.2).

    The proof does not commit to ``size``: a proof for size n can also check out against the
    same root claimed as size n + 1. Take ``size`` and ``root`` from one signed checkpoint."""
    if type(index) is not int or type(size) is not int or not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of {size} leaves")
    _check_hash("leaf hash", leaf)
    _check_hash("root", root)
    inner = (index ^ (size - 1)).bit_length()  # levels where the path has a sibling below ...
    border = (index >> inner).bit_count()  # ... and right-edge levels above, where it may not
    _check_path(f"inclusion proof of leaf {index} in a tree of {size}", proof, inner + border)
    # 2.1.3.2, steps 2-5, verbatim.
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path to the root")
    if r != root:
        raise ProofError(f"inclusion proof of leaf {index} does not lead to the root of {size}")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ``ProofError`` unless ``proof`` shows that the tree of ``new_size`` leaves with root
    ``new_root`` extends the one of ``old_size`` leaves with root ``old_root`` (RFC 9162
    2.1.4.2). Equal sizes need equal roots and an empty proof; from size 0 any tree is
    consistent, with an empty proof. As with ``verify_inclusion``, each size must come from the
    signed checkpoint its root comes from."""
    if type(old_size) is not int or type(new_size) is not int or not 0 <= old_size <= new_size:
        raise ProofError(f"no tree of size {new_size} extends one of size {old_size}")
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    if old_size == 0 or old_size == new_size:
        if proof:
            raise ProofError(f"consistency proof from size {old_size} must be empty")
        if old_size == new_size and old_root != new_root:
            raise ProofError(f"two different roots for the same size {old_size}")
        return
    # The length the RFC's SUBPROOF yields: the inclusion path of leaf old_size - 1, less the
    # levels below the largest complete subtree it ends, plus that subtree's root unless it is
    # the whole old tree.
    shift = (old_size & -old_size).bit_length() - 1
    inner = ((old_size - 1) ^ (new_size - 1)).bit_length()
    border = ((old_size - 1) >> inner).bit_count()
    seeded = old_size != 1 << shift
    expected = inner - shift + border + int(seeded)
    what = f"consistency proof from size {old_size} to {new_size}"
    _check_path(what, proof, expected)
    # 2.1.4.2, steps 2-7, verbatim.
    path = list(proof) if seeded else [old_root, *proof]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"{what} is longer than the path to the root")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"{what} is shorter than the path to the root")
    if fr != old_root:
        raise ProofError(f"{what} does not lead to the old root")
    if sr != new_root:
        raise ProofError(f"{what} does not lead to the new root")
