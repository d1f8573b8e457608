"""Ownership shares as a signed file each contributor can check offline.

At finalize a task's weights freeze (``State.shares``). The export is::

    {"envelope": <signed by the coordinator, domain cotrain.protocol.shares/1:
                  {task, origin, finalized_seq, total, count, root}>,
     "leaves":   [{"node": KEY, "weight": W}, ...]            sorted by node}

``root`` is the RFC 9162 Merkle root over the leaves' canonical JSON, so a contributor can keep
just their leaf, its inclusion proof and the envelope (``proof_for``) and show their share to
anyone who trusts the coordinator's key, without the rest of the file or the ledger; and anyone
with the ledger can recompute the whole file (``cotrain audit`` replays the same weights).
"""

from __future__ import annotations

from typing import Any

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope, EnvelopeError, canonical
from cotrain.protocol import merkle
from cotrain.protocol.errors import AuditError, Conflict

DOMAIN = "cotrain.protocol.shares/1"


def _leaves(task: str, weights: dict[str, int]) -> list[dict[str, Any]]:
    return [{"task": task, "node": k, "weight": w} for k, w in sorted(weights.items())]


def _root(leaves: list[dict[str, Any]]) -> bytes:
    return merkle.root_of([merkle.leaf_hash(canonical(leaf)) for leaf in leaves])


def export(
    identity: Identity, *, task: str, origin: str, finalized_seq: int, weights: dict[str, int]
) -> dict[str, Any]:
    leaves = _leaves(task, weights)
    body = {
        "task": task,
        "origin": origin,
        "finalized_seq": finalized_seq,
        "total": sum(weights.values()),
        "count": len(leaves),
        "root": _root(leaves).hex(),
    }
    return {"envelope": Envelope.seal(identity, DOMAIN, body).to_json(), "leaves": leaves}


def check(doc: Any, coordinator: str) -> dict[str, Any]:
    """Verify a whole export; its signed body. ``AuditError`` if anything is off."""
    if not isinstance(doc, dict) or not isinstance(doc.get("leaves"), list):
        raise AuditError("a shares file has an envelope and a list of leaves")
    try:
        env = Envelope.from_json(doc.get("envelope"), domain=DOMAIN, signers={coordinator})
    except EnvelopeError as e:
        raise AuditError(f"shares file: {e}") from None
    leaves = doc["leaves"]
    body = env.body
    if _root(leaves).hex() != body.get("root") or len(leaves) != body.get("count"):
        raise AuditError("shares file: the leaves do not hash to the signed root")
    if sum(int(leaf["weight"]) for leaf in leaves) != body.get("total"):
        raise AuditError("shares file: the weights do not add up to the signed total")
    return body


def proof_for(doc: dict[str, Any], node: str) -> dict[str, Any]:
    """What ``node`` keeps to show its share: the envelope, its leaf, its inclusion proof."""
    leaves = doc["leaves"]
    index = next((i for i, leaf in enumerate(leaves) if leaf["node"] == node), None)
    if index is None:
        raise Conflict(f"{node[:16]}... has no share in this task")
    tree = merkle.MemoryTree([merkle.leaf_hash(canonical(leaf)) for leaf in leaves])
    return {
        "envelope": doc["envelope"],
        "leaf": leaves[index],
        "index": index,
        "proof": [h.hex() for h in tree.inclusion_proof(index, len(leaves))],
    }


def verify_proof(proof: dict[str, Any], coordinator: str) -> tuple[int, int]:
    """Check a contributor's proof offline; (its weight, the task's total)."""
    try:
        env = Envelope.from_json(proof.get("envelope"), domain=DOMAIN, signers={coordinator})
        leaf, index = proof["leaf"], int(proof["index"])
        path = [bytes.fromhex(h) for h in proof["proof"]]
        merkle.verify_inclusion(
            merkle.leaf_hash(canonical(leaf)),
            index,
            int(env.body["count"]),
            path,
            bytes.fromhex(env.body["root"]),
        )
    except (EnvelopeError, merkle.ProofError, KeyError, TypeError, ValueError) as e:
        raise AuditError(f"share proof: {e}") from None
    if leaf.get("task") != env.body["task"]:
        raise AuditError("share proof: the leaf is for another task")
    return int(leaf["weight"]), int(env.body["total"])
