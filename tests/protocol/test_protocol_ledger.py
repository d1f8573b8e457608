"""Ledger entries' bytes and the tiled Merkle tree the coordinator keeps."""

from __future__ import annotations

import random

import pytest

from cotrain.core.identity import Identity
from cotrain.core.signed import canonical
from cotrain.protocol import auth, merkle
from cotrain.protocol.errors import RequestError
from cotrain.protocol.ledger import TILE, Entry, Tree


def _entry(body: dict, seq: int = 3) -> Entry:
    req = auth.sign(Identity.generate(), "POST", "/v1/tasks/t1/work", body)
    return Entry(seq, 1_700_000_000_000 + seq, "ab" * 32, "work.submit", req)


BODIES = [
    {},
    {"work_key": "cd" * 32, "kind": "units", "units": 5, "step": 0, "meta": {}},
    {"name": 'ünïcødé ☃ "quoted" \\ back\nslash', "n": -17, "z": [1, {"b": 2, "a": None}]},
    {"€": 1, "a": 2, "\u007f": 3, "big": 2**53 - 1, "t": True, "f": False},
]


@pytest.mark.parametrize("body", BODIES)
def test_fast_encoding_is_the_canonical_form(body: dict) -> None:
    e = _entry(body)
    assert e.encode() == canonical(e.to_json())
    assert Entry.decode(e.encode()) == e
    # the raw body the coordinator keeps from the wire gives the same bytes
    assert e.req.raw == canonical(body)


def test_non_canonical_bytes_are_refused() -> None:
    e = _entry(BODIES[1])
    data = e.encode()
    for bad in (
        data.replace(b'"kind":', b'"kind": '),  # whitespace
        data.replace(b'"units":5', b'"units":5.0'),  # another number form
        b"{" + data[1:].replace(b'"v":1', b'"v":1 '),
        data.replace(b'"seq":3', b'"seq":03'),
    ):
        with pytest.raises(RequestError):
            Entry.decode(bad)
    obj = e.to_json()
    reordered = b'{"v":1,' + canonical(obj)[1:].replace(b',"v":1', b"")
    with pytest.raises(RequestError, match="canonical"):
        Entry.decode(reordered)


def test_tiled_tree_matches_a_memory_tree_across_tiles() -> None:
    rng = random.Random(7)
    leaves = [merkle.leaf_hash(rng.randbytes(20)) for _ in range(3 * TILE + 37)]
    reads: list[tuple[int, int]] = []

    def read(lo: int, hi: int) -> list[bytes]:
        reads.append((lo, hi))
        return leaves[lo:hi]

    tree, ref = Tree(read), merkle.MemoryTree()
    for leaf in leaves:
        tree.append(leaf)
        ref.append(leaf)
    n = len(leaves)
    assert tree.root() == ref.root()
    for size in (1, 2, TILE - 1, TILE, TILE + 1, 2 * TILE, n - 1, n):
        assert tree.root(size) == ref.root(size)
    for index, size in [(0, n), (n - 1, n), (TILE, n), (5, TILE + 3), (700, 701)]:
        proof = tree.inclusion(index, size)
        assert proof == ref.inclusion_proof(index, size)
        merkle.verify_inclusion(leaves[index], index, size, proof, ref.root(size))
    for old, new in [(1, n), (TILE, n), (TILE + 1, 2 * TILE + 5), (n - 1, n), (300, 513)]:
        proof = tree.consistency(old, new)
        assert proof == ref.consistency_proof(old, new)
        merkle.verify_consistency(old, new, ref.root(old), ref.root(new), proof)
    assert all(hi - lo <= TILE for lo, hi in reads)  # never more than a tile of leaves read
    with pytest.raises(RequestError):
        tree.inclusion(n, n)
    with pytest.raises(RequestError):
        tree.consistency(5, n + 1)


def _ledger(n: int) -> list[bytes]:
    """A valid ledger: a genesis and ``n`` identity registrations, chained."""
    coord = Identity.generate()
    t0 = 1_700_000_000_000
    reqs = [
        auth.sign(
            coord,
            "LEDGER",
            "/v1/genesis",
            {"origin": "o", "coordinator": coord.public_hex, "window_ms": 60_000},
            ts_ms=t0,
        )
    ]
    kinds = ["ledger.genesis"]
    for i in range(n):
        body = {"roles": ["node"], "name": f"n{i}", "specs": {}}
        reqs.append(auth.sign(Identity.generate(), "POST", "/v1/identities", body, ts_ms=t0 + i))
        kinds.append("identity.register")
    out, prev = [], "0" * 64
    for seq, (req, kind) in enumerate(zip(reqs, kinds, strict=True)):
        data = Entry(seq, req.ts_ms, prev, kind, req).encode()
        out.append(data)
        prev = merkle.leaf_hash(data).hex()
    return out


@pytest.mark.timeout(300)
def test_audit_checks_signatures_on_other_cores_and_names_the_bad_one() -> None:
    from cotrain.protocol import audit
    from cotrain.protocol.errors import AuditError

    entries = _ledger(2 * audit.VERIFY_CHUNK + 10)
    state, _, kinds = audit.replay(entries, workers=1)
    assert state.size == len(entries) and kinds["identity.register"] == len(entries) - 1
    bad = audit.VERIFY_CHUNK + 7  # in the second job
    e = Entry.decode(entries[bad])
    forged = auth.SignedRequest(
        e.req.key,
        e.req.ts_ms,
        e.req.nonce,
        e.req.method,
        e.req.path,
        {**e.req.body, "name": "mallory"},
        e.req.sig,
    )
    entries[bad] = Entry(e.seq, e.ts_ms, e.prev, e.kind, forged).encode()
    for workers in (1, 0):
        with pytest.raises(AuditError) as got:
            audit.replay(entries, workers=workers)
        assert got.value.seq == bad and "not signed by its author" in str(got.value)
