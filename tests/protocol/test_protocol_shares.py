"""Exported shares: a signed file whose Merkle root lets each contributor prove a share alone."""

from __future__ import annotations

import copy

import pytest

from cotrain.core.identity import Identity
from cotrain.protocol import shares
from cotrain.protocol.errors import AuditError, Conflict


def _doc(n: int = 5) -> tuple[Identity, dict, dict[str, int]]:
    coord = Identity.generate()
    weights = {Identity.generate().public_hex: 10 * (i + 1) for i in range(n)}
    doc = shares.export(coord, task="t4", origin="o", finalized_seq=99, weights=weights)
    return coord, doc, weights


def test_every_contributor_proves_its_share_offline() -> None:
    coord, doc, weights = _doc(7)
    body = shares.check(doc, coord.public_hex)
    assert body["total"] == sum(weights.values()) and body["count"] == 7
    for node, w in weights.items():
        proof = shares.proof_for(doc, node)
        assert shares.verify_proof(proof, coord.public_hex) == (w, sum(weights.values()))


def test_a_changed_weight_or_leaf_or_key_is_refused() -> None:
    coord, doc, weights = _doc()
    node = next(iter(weights))
    proof = shares.proof_for(doc, node)
    inflated = copy.deepcopy(proof)
    inflated["leaf"]["weight"] += 1
    with pytest.raises(AuditError):
        shares.verify_proof(inflated, coord.public_hex)
    with pytest.raises(AuditError):
        shares.verify_proof(proof, Identity.generate().public_hex)  # another coordinator
    moved = copy.deepcopy(proof)
    moved["index"] = (moved["index"] + 1) % 5
    with pytest.raises(AuditError):
        shares.verify_proof(moved, coord.public_hex)
    tampered = copy.deepcopy(doc)
    tampered["leaves"][0]["weight"] *= 2
    with pytest.raises(AuditError, match="root"):
        shares.check(tampered, coord.public_hex)
    with pytest.raises(Conflict):
        shares.proof_for(doc, Identity.generate().public_hex)
    with pytest.raises(AuditError):
        shares.verify_proof({"garbage": 1}, coord.public_hex)


def test_one_contributor() -> None:
    coord, doc, weights = _doc(1)
    node = next(iter(weights))
    assert shares.verify_proof(shares.proof_for(doc, node), coord.public_hex)[0] == 10
