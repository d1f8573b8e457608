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


def test_cli_exports_proves_and_verifies_a_share(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`cotrain shares export | prove | verify` against a live coordinator's finalized task."""
    import asyncio
    import json
    import os
    import sys

    import protocol_harness as ph

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cotrain", "shares", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    async def main() -> None:
        async with ph.running(ph.config(tmp_path)) as (url, coord):
            ids = await ph.identities(url, init=["initiator"], n=["node"], v=["validator"])
            (_, c_init), (node, c_node), (val, c_val) = ids["init"], ids["n"], ids["v"]
            t = (await c_init.write("/v1/tasks", {
                "name": "s", "kind": "diloco", "budget": 100, "rate_per_unit": 1,
                "admission": "open", "validators": [val.public_hex],
            }))["task"]  # fmt: skip
            await c_init.write(f"/v1/tasks/{t}/open")
            await c_node.write(f"/v1/tasks/{t}/join", {})
            key = os.urandom(32).hex()
            await c_node.write(
                f"/v1/tasks/{t}/work", {"work_key": key, "kind": "units", "units": 7}
            )
            await c_val.write(f"/v1/tasks/{t}/verdicts", {"work_key": key, "verdict": "accept"})
            code, out = await cli("export", url, t, "--out", str(tmp_path / "s.json"))
            assert code == 1 and "shares freeze when it is finalized" in out, out
            await c_init.write(f"/v1/tasks/{t}/finalize")
            code, out = await cli("export", url, t, "--out", str(tmp_path / "s.json"))
            assert code == 0 and "1 contributors, total weight 7" in out, out
            code, out = await cli(
                "prove",
                str(tmp_path / "s.json"),
                "--node",
                node.public_hex,
                "--out",
                str(tmp_path / "p.json"),
            )
            assert code == 0, out
            code, out = await cli("verify", str(tmp_path / "p.json"), "--key", coord.key)
            assert code == 0 and "holds 7 of 7 (100.00%)" in out, out
            proof = json.loads((tmp_path / "p.json").read_text())
            proof["leaf"]["weight"] = 70
            (tmp_path / "p.json").write_text(json.dumps(proof))
            code, out = await cli("verify", str(tmp_path / "p.json"), "--key", coord.key)
            assert code == 1 and out.startswith("error: share proof"), out
            for c in (c_init, c_node, c_val):
                await c.close()

    asyncio.run(main())
