"""RFC 9162 Merkle trees: the Certificate Transparency known answers, pymerkle as an independent
implementation, a literal transcription of the RFC's recursive definitions, and tampering."""

from __future__ import annotations

import hashlib
import random
from functools import cache

import pytest
from pymerkle import InclusionProof, InmemoryTree

from cotrain.protocol import merkle
from cotrain.protocol.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)


def h(hexdigest: str) -> bytes:
    return bytes.fromhex(hexdigest)


# The eight entries, prefix roots and proofs of the Certificate Transparency test suites
# (google/certificate-transparency, now transparency-dev/merkle proof/verify_test.go).
CT_ENTRIES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
CT_ROOTS = [  # root of the first n entries, n = 1..8
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]
CT_INCLUSION = [  # (leaf index from zero, tree size, audit path)
    (
        0,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        5,
        8,
        [
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (
        1,
        5,
        [
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]
CT_CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (
        1,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")

MAX_N = 70
ENTRIES = [b"entry %d" % i for i in range(MAX_N)]
LEAVES = [leaf_hash(e) for e in ENTRIES]


@pytest.fixture(scope="module")
def reference() -> InmemoryTree:
    """pymerkle 7 in its default (RFC 9162) mode: SHA-256, 0x00/0x01 prefixes, 1-based indices."""
    return InmemoryTree.init_from_entries(ENTRIES, algorithm="sha256")


# RFC 9162 2.1.1, 2.1.3.1 and 2.1.4.1 transcribed literally, over LEAVES[lo:hi].
def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@cache
def rfc_mth(lo: int, hi: int) -> bytes:
    if hi == lo:
        return hashlib.sha256(b"").digest()
    if hi - lo == 1:
        return LEAVES[lo]
    k = _k(hi - lo)
    return hashlib.sha256(b"\x01" + rfc_mth(lo, lo + k) + rfc_mth(lo + k, hi)).digest()


def rfc_path(m: int, lo: int, hi: int) -> list[bytes]:
    if hi - lo == 1:
        return []
    k = _k(hi - lo)
    if m < k:
        return [*rfc_path(m, lo, lo + k), rfc_mth(lo + k, hi)]
    return [*rfc_path(m - k, lo + k, hi), rfc_mth(lo, lo + k)]


def rfc_subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if b else [rfc_mth(lo, hi)]
    k = _k(n)
    if m <= k:
        return [*rfc_subproof(m, lo, lo + k, b), rfc_mth(lo + k, hi)]
    return [*rfc_subproof(m - k, lo + k, hi, False), rfc_mth(lo, lo + k)]


def test_public_names_are_pinned() -> None:
    assert sorted(merkle.__all__) == sorted(
        [
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
    )
    assert issubclass(ProofError, ValueError)


def test_hashes_are_domain_separated_sha256() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_of([]) == EMPTY_ROOT == MemoryTree().root() == Frontier().root()
    assert leaf_hash(b"") == CT_ROOTS[0]  # a one-leaf tree's root is its leaf hash
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert leaf_hash(a + b) != node_hash(a, b)


def test_certificate_transparency_roots() -> None:
    leaves = [leaf_hash(e) for e in CT_ENTRIES]
    tree, frontier = MemoryTree(), Frontier()
    for n, leaf in enumerate(leaves, 1):
        tree.append(leaf)
        frontier.append(leaf)
        assert root_of(leaves[:n]) == tree.root() == frontier.root() == CT_ROOTS[n - 1]
    assert CT_ROOTS[7].hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


def test_certificate_transparency_proofs() -> None:
    leaves = [leaf_hash(e) for e in CT_ENTRIES]
    tree = MemoryTree(leaves)
    for index, size, proof in CT_INCLUSION:
        assert tree.inclusion_proof(index, size) == proof
        verify_inclusion(leaves[index], index, size, proof, CT_ROOTS[size - 1])
    for old, new, proof in CT_CONSISTENCY:
        assert tree.consistency_proof(old, new) == proof
        verify_consistency(old, new, CT_ROOTS[old - 1], CT_ROOTS[new - 1], proof)


def test_roots_and_inclusion_proofs_match_pymerkle_at_every_size(reference: InmemoryTree) -> None:
    tree = MemoryTree(LEAVES)
    for n in range(1, MAX_N + 1):
        assert reference.get_leaf(n) == LEAVES[n - 1]
        root = reference.get_root(n)
        assert root_of(LEAVES[:n]) == tree.root(n) == root == rfc_mth(0, n)
        for i in range(n):
            ours = tree.inclusion_proof(i, n)
            theirs = reference.prove_inclusion(i + 1, n)
            # pymerkle's path is the leaf itself followed by the RFC audit path
            assert theirs.path == [LEAVES[i], *ours]
            assert ours == rfc_path(i, 0, n)
            verify_inclusion(LEAVES[i], i, n, theirs.path[1:], root)
            mine = InclusionProof("sha256", True, n, i + 1, theirs.rule, [LEAVES[i], *ours])
            mine.verify(LEAVES[i], root, index=i + 1, size=n)


def test_consistency_proofs_at_every_pair_of_sizes(reference: InmemoryTree) -> None:
    tree = MemoryTree(LEAVES)
    for n in range(1, MAX_N + 1):
        new_root = reference.get_root(n)
        for m in range(0, n + 1):
            old_root = reference.get_root(m)
            ours = tree.consistency_proof(m, n)
            expected = [] if m in (0, n) else rfc_subproof(m, 0, n, True)
            assert ours == expected, (m, n)
            verify_consistency(m, n, old_root, new_root, ours)
            if m == 0:
                continue
            # pymerkle proves consistency its own way, not RFC 9162's: its path is the leaf at
            # the old size and that leaf's audit path, the left siblings folding to the old root.
            # So its proofs cannot be fed to our verifier; check that it accepts our roots.
            theirs = reference.prove_consistency(m, n)
            theirs.verify(old_root, new_root, prior_size=m, later_size=n)
            if m < n:
                assert theirs.path == [LEAVES[m], *tree.inclusion_proof(m, n)]


def test_random_large_trees_match_pymerkle() -> None:
    rng = random.Random(9162)
    entries = [rng.randbytes(rng.randrange(0, 40)) for _ in range(3000)]
    leaves = [leaf_hash(e) for e in entries]
    reference = InmemoryTree.init_from_entries(entries, algorithm="sha256")
    tree = MemoryTree(leaves)
    for _ in range(40):
        n = rng.randrange(1, len(leaves) + 1)
        root = tree.root(n)
        assert root == reference.get_root(n) == root_of(leaves[:n])
        i = rng.randrange(n)
        proof = tree.inclusion_proof(i, n)
        assert reference.prove_inclusion(i + 1, n).path == [leaves[i], *proof]
        verify_inclusion(leaves[i], i, n, proof, root)
        m = rng.randrange(0, n + 1)
        verify_consistency(m, n, tree.root(m), root, tree.consistency_proof(m, n))
        reference.prove_consistency(max(m, 1), n).verify(tree.root(max(m, 1)), root)


def test_a_hundred_thousand_leaves() -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(100_000)]
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    tree = MemoryTree(leaves)
    root = root_of(leaves)
    assert frontier.root() == tree.root() == root
    assert len(frontier.to_json()["hashes"]) == bin(100_000).count("1")
    for i in (0, 65_535, 65_536, 99_999):
        verify_inclusion(leaves[i], i, 100_000, tree.inclusion_proof(i), root)
    for m in (1, 65_536, 70_001, 99_999):
        verify_consistency(m, 100_000, tree.root(m), root, tree.consistency_proof(m))


def test_frontier_equals_memory_tree_at_every_size_and_round_trips() -> None:
    rng = random.Random(6962)
    tree, frontier = MemoryTree(), Frontier()
    for n in range(300):
        assert frontier.size == tree.size == n
        assert frontier.root() == tree.root()
        back = Frontier.from_json(frontier.to_json())
        assert back.size == n
        assert back.root() == frontier.root()
        leaf = leaf_hash(rng.randbytes(8))
        tree.append(leaf)
        frontier.append(leaf)
        back.append(leaf)
        assert back.root() == frontier.root()


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"size": -1, "hashes": []},
        {"size": 3, "hashes": ["00" * 32]},  # size 3 is two subtrees
        {"size": 1, "hashes": ["00" * 31]},
        {"size": 1, "hashes": ["zz" * 32]},
        {"size": True, "hashes": ["00" * 32]},
        {"size": 1, "hashes": "00" * 32},
    ],
)
def test_frontier_refuses_malformed_json(obj: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Frontier.from_json(obj)


def test_memory_tree_subtree_of_any_range() -> None:
    tree = MemoryTree(LEAVES)
    for lo in range(0, 40):
        for hi in range(lo, 40):
            assert tree.subtree(lo, hi) == root_of(LEAVES[lo:hi])
    with pytest.raises(ValueError):
        tree.subtree(3, MAX_N + 1)


def test_proofs_ask_only_for_nodes_of_the_tree() -> None:
    def is_node(lo: int, hi: int, size: int) -> bool:
        k = 1
        while k < 2 * size:
            if lo % k == 0 and hi == min(lo + k, size):
                return True
            k *= 2
        return False

    tree = MemoryTree(LEAVES)
    asked: list[tuple[int, int]] = []

    def subtree(lo: int, hi: int) -> bytes:
        asked.append((lo, hi))
        return tree.subtree(lo, hi)

    for n in range(1, MAX_N + 1):
        asked.clear()
        for i in range(n):
            assert inclusion_proof(i, n, subtree) == tree.inclusion_proof(i, n)
        for m in range(n + 1):
            assert consistency_proof(m, n, subtree) == tree.consistency_proof(m, n)
        assert all(is_node(lo, hi, n) for lo, hi in asked), n


def test_proof_generation_refuses_impossible_requests() -> None:
    tree = MemoryTree(LEAVES[:5])
    for call in (
        lambda: tree.inclusion_proof(5, 5),
        lambda: tree.inclusion_proof(-1),
        lambda: tree.inclusion_proof(0, 6),
        lambda: tree.consistency_proof(6, 5),
        lambda: tree.consistency_proof(2, 6),
        lambda: tree.root(6),
        lambda: tree.append(b"short"),
        lambda: Frontier().append(b"short"),
        lambda: root_of([b"short"]),
    ):
        with pytest.raises(ValueError):
            call()


def _inclusion_probes(
    index: int, size: int, proof: list[bytes], root: bytes, leaf: bytes
) -> list[tuple[str, int, int, list[bytes], bytes, bytes]]:
    """The corruptions transparency-dev/merkle's tests try (plus a changed last byte)."""
    probes = [
        ("index - 1", index - 1, size, proof, root, leaf),
        ("index + 1", index + 1, size, proof, root, leaf),
        ("index ^ 2", index ^ 2, size, proof, root, leaf),
        ("size * 2", index, size * 2, proof, root, leaf),
        ("size // 2", index, size // 2, proof, root, leaf),
        ("wrong leaf", index, size, proof, root, leaf_hash(b"wrong")),
        ("short leaf", index, size, proof, root, b"WrongLeaf"),
        ("empty root", index, size, proof, EMPTY_ROOT, leaf),
        ("some root", index, size, proof, SOME_HASH, leaf),
        ("trailing empty", index, size, [*proof, b""], root, leaf),
        ("trailing root", index, size, [*proof, root], root, leaf),
        ("preceding empty", index, size, [b"", *proof], root, leaf),
        ("preceding root", index, size, [root, *proof], root, leaf),
    ]
    for i in range(len(proof)):
        for at in (0, -1):
            flipped = bytearray(proof[i])
            flipped[at] ^= 8
            bad = [*proof]
            bad[i] = bytes(flipped)
            probes.append((f"proof[{i}] byte {at}", index, size, bad, root, leaf))
    if proof:
        probes.append(("removed", index, size, proof[:-1], root, leaf))
    if len(proof) > 1:
        probes.append(("inserted", index, size, [proof[0], SOME_HASH, *proof[1:]], root, leaf))
    return [p for p in probes if (p[1], p[2]) != (index, size) or p[3:] != (proof, root, leaf)]


def test_tampered_inclusion_proofs_are_refused() -> None:
    tree = MemoryTree(LEAVES)
    for n in range(1, 34):
        root = tree.root(n)
        for i in range(n):
            proof = tree.inclusion_proof(i, n)
            for desc, index, size, path, r, leaf in _inclusion_probes(i, n, proof, root, LEAVES[i]):
                with pytest.raises(ProofError):
                    verify_inclusion(leaf, index, size, path, r)
                    pytest.fail(f"accepted {desc} for leaf {i} of {n}")


def test_tampered_consistency_proofs_are_refused() -> None:
    tree = MemoryTree(LEAVES)
    for n in range(2, 34):
        r2 = tree.root(n)
        for m in range(1, n):
            r1, proof = tree.root(m), tree.consistency_proof(m, n)
            probes = [
                (m - 1, n, r1, r2, proof),
                (m + 1, n, r1, r2, proof),
                (m ^ 2, n, r1, r2, proof),
                (m, n * 2, r1, r2, proof),
                (m, n // 2, r1, r2, proof),
                (m, n, SOME_HASH, r2, proof),
                (m, n, r1, SOME_HASH, proof),
                (m, n, r2, r1, proof),
                (m, n, r1, r2, []),
                (m, n, r1, r2, [*proof, b""]),
                (m, n, r1, r2, [*proof, r1]),
                (m, n, r1, r2, [*proof, r2]),
                (m, n, r1, r2, [b"", *proof]),
                (m, n, r1, r2, [r1, *proof]),
                (m, n, r1, r2, [r2, *proof]),
                (m, n, r1, r2, [proof[0], *proof]),
                (m, n, r1, r2, proof[:-1]),
            ]
            for i in range(len(proof)):
                bad = [*proof]
                bad[i] = bytes([bad[i][0] ^ 16]) + bad[i][1:]
                probes.append((m, n, r1, r2, bad))
            for old, new, a, b, path in probes:
                if (old, new, a, b, path) == (m, n, r1, r2, proof):
                    continue
                with pytest.raises(ProofError):
                    verify_consistency(old, new, a, b, path)
                    pytest.fail(f"accepted a corrupted proof from {m} to {n}")


def test_verifiers_refuse_impossible_arguments() -> None:
    leaf, root = leaf_hash(b"x"), leaf_hash(b"x")
    verify_inclusion(leaf, 0, 1, [], root)  # a one-leaf tree: the root is the leaf
    for index, size in ((0, 0), (1, 1), (1, 0), (2, 1), (-1, 1)):
        with pytest.raises(ProofError, match="not in a tree"):
            verify_inclusion(leaf, index, size, [], root)
    with pytest.raises(ProofError, match="root must be 32 bytes"):
        verify_inclusion(leaf, 0, 1, [], b"")
    with pytest.raises(ProofError, match="leaf hash must be 32 bytes"):
        verify_inclusion(b"", 0, 1, [], root)
    with pytest.raises(ProofError, match="has 1 hashes, expected 0"):
        verify_inclusion(leaf, 0, 1, [root], root)

    r1, r2 = SOME_HASH, EMPTY_ROOT
    accepted = [(0, 0, r1, r1, []), (0, 1, r1, r2, []), (1, 1, r2, r2, []), (0, 5, r1, r2, [])]
    for case in accepted:
        verify_consistency(*case)
    refused = [
        (0, 0, r1, r2, []),  # one size, two roots
        (1, 1, r1, r2, []),
        (1, 0, r1, r2, []),  # time travel
        (2, 1, r1, r2, []),
        (1, 2, r1, r2, []),  # a proof is needed
        (0, 0, r2, r2, [r2]),  # but not here
        (0, 1, r2, r2, [r2]),
        (1, 1, r2, r2, [r2]),
        (1, 2, b"short", r2, [r2]),
        (-1, 2, r1, r2, []),
    ]
    for case in refused:
        with pytest.raises(ProofError):
            verify_consistency(*case)
