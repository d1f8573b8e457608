"""The coordinator end to end over HTTP, on SQLite and on PostgreSQL (``db_url``).

A market runs through real clients: a task published and opened, nodes invited and joined
(each answer carries a comm admission token), heartbeats, work, verdicts with a hard reject by
quorum, finalize, shares and claims. Then the public data is audited, the log's proofs are
checked against signed checkpoints, a witness co-signs, the coordinator restarts on the same
database, a coordinator with another key is refused, the liveness sweep runs on a fake clock,
and a full disk answers 503 without losing anything acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from protocol_harness import config, running
from sqlalchemy import event, text

from cotrain.comm.auth import TOKEN_DOMAIN, Admission
from cotrain.comm.errors import AuthError as CommAuthError
from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.protocol import audit, merkle, note
from cotrain.protocol.client import Client
from cotrain.protocol.config import CoordinatorConfig
from cotrain.protocol.errors import Conflict, Forbidden, NotFound, RequestError, Unavailable

BUDGET, RATE, FEE = 100_000, 5, 1
QUIET = {"unhealthy_after_s": 3600.0, "dead_after_s": 7200.0}
"""Liveness far beyond a test's length: the real sweeper writes nothing of its own."""
U, D = 1000.0, 3000.0
"""unhealthy_after_s and dead_after_s of the liveness test, which drives a fake clock."""


def work_key(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


async def poll(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    """Wait until ``check()`` holds, or fail naming ``what`` (writes the coordinator makes
    itself, such as a member's status, land a moment after the request that caused them)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Market:
    url: str
    coord_key: str
    init: Client
    vals: list[Client]
    nodes: list[Client]
    witness: Client
    task: str
    work: dict[int, list[str]] = field(default_factory=dict)
    """node index -> its work keys."""
    joined: list[dict[str, Any]] = field(default_factory=list)
    """The answers to the nodes' joins."""

    @property
    def clients(self) -> list[Client]:
        return [self.init, *self.vals, *self.nodes, self.witness]

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


def key_of(c: Client) -> str:
    assert c.identity is not None
    return c.identity.public_hex


async def registered(url: str, roles: list[str], name: str) -> Client:
    c = Client(url, Identity.generate(), timeout_s=60)
    await c.register(roles, name)
    return c


async def member_status(c: Client, task: str, node: str) -> str | None:
    info = await c.get(f"/v1/tasks/{task}")
    return next((m["status"] for m in info["members"] if m["node"] == node), None)


async def entries(c: Client) -> list[dict[str, Any]]:
    size = (await c.get("/v1/status"))["size"]
    await poll(lambda: _committed(c, size), f"{size} entries to be committed")
    return [json.loads(line) for line in await c.entries(0, size)]


async def _committed(c: Client, size: int) -> bool:
    raw = await c.get_bytes("/v1/log/entries", start=max(0, size - 1), end=size)
    return raw.count(b"\n") == 1


async def open_market(url: str, coord_key: str, *, nodes: int = 4) -> Market:
    """An initiator, three validators (quorum 2), a witness and ``nodes`` nodes joined to an
    open invite-only task; every node has heartbeated once."""
    init = await registered(url, ["initiator"], "init")
    vals = [await registered(url, ["validator"], f"val{i}") for i in range(3)]
    witness = await registered(url, ["witness"], "witness-1")
    ns = [await registered(url, ["node"], f"node{i}") for i in range(nodes)]
    out = await init.write(
        "/v1/tasks",
        {
            "name": "tiny-diloco",
            "kind": "diloco",
            "spec": {"model": "tiny", "outer_steps": 3},
            "budget": BUDGET,
            "rate_per_unit": RATE,
            "validator_fee": FEE,
            "lock_s": 3600,
            "admission": "invite",
            "validators": [key_of(v) for v in vals],
            "quorum": 2,
            "weights": {"tokens": 1, "rollouts": 3},
        },
    )
    task = out["task"]
    await init.write(f"/v1/tasks/{task}/open")
    m = Market(url, coord_key, init, vals, ns, witness, task)
    for n in ns:
        invite = await init.write(f"/v1/tasks/{task}/invites", {"node": key_of(n)})
        m.joined.append(await n.write(f"/v1/tasks/{task}/join", {"invite": invite["invite"]}))
        await n.heartbeat(task)
    return m


# ---- the market, end to end -----------------------------------------------------------------


@pytest.mark.timeout(240)
def test_market_end_to_end_and_audit(tmp_path: Path, db_url: str) -> None:
    asyncio.run(_market_end_to_end(tmp_path, db_url))


async def _market_end_to_end(tmp_path: Path, db_url: str) -> None:
    cfg = config(tmp_path, db_url, checkpoint_every=8, **QUIET)
    async with running(cfg) as (url, coord):
        m = await open_market(url, coord.key)
        t, (v0, v1, v2), nodes = m.task, m.vals, m.nodes
        try:
            # each join's answer: a comm admission token for this node, signed by the coordinator
            for n, ans in zip(nodes, m.joined, strict=True):
                assert ans["status"] == "joined" and ans["coordinator"] == coord.key
                token = ans["admission_token"]
                env = Envelope.from_json(token, domain=TOKEN_DOMAIN, signers={coord.key})
                assert env.body["peer"] == key_of(n) and env.body["run"] == t
                Admission(token_issuers=frozenset({coord.key}), run_id=t).check(
                    key_of(n), {"token": token}, b""
                )
                with pytest.raises(CommAuthError, match="another key"):
                    Admission(token_issuers=frozenset({coord.key}), run_id=t).check(
                        key_of(m.init), {"token": token}, b""
                    )
                with pytest.raises(CommAuthError, match="for run"):
                    Admission(token_issuers=frozenset({coord.key}), run_id="t999").check(
                        key_of(n), {"token": token}, b""
                    )
            # heartbeats turn joined into healthy: an entry the coordinator signs
            for n in nodes:
                await poll(
                    lambda n=n: _is(m.init, t, key_of(n), "healthy"), "a member to be healthy"
                )
            log = await entries(m.init)
            healthy = [e for e in log if e["kind"] == "member.status"]
            assert len(healthy) == len(nodes)
            assert all(e["req"]["key"] == coord.key for e in healthy)
            assert all(e["req"]["body"] == {"status": "healthy"} for e in healthy)
            hb = await nodes[0].heartbeat(t)
            assert (hb["status"], hb["task_state"]) == ("healthy", "open")

            # work: nodes 0-2 honest, node 3 forges its second record
            for i, n in enumerate(nodes):
                m.work[i] = []
                for step in range(2):
                    k = work_key(f"{t}/{i}/{step}")
                    body = {"work_key": k, "kind": "tokens", "units": 100, "step": step}
                    out = await n.write(f"/v1/tasks/{t}/work", body)
                    assert out["state"] == "submitted"
                    m.work[i].append(k)
            rollouts = work_key(f"{t}/1/rollouts")
            await nodes[1].write(
                f"/v1/tasks/{t}/work", {"work_key": rollouts, "kind": "rollouts", "units": 10}
            )
            with pytest.raises(Conflict, match="already submitted"):
                await nodes[2].write(
                    f"/v1/tasks/{t}/work", {"work_key": rollouts, "kind": "rollouts", "units": 1}
                )
            verdicts = f"/v1/tasks/{t}/verdicts"
            for i in range(4):
                for k in m.work[i]:
                    out = await v0.write(verdicts, {"work_key": k, "verdict": "accept"})
                    assert out["state"] == "accepted" and out["fee"] == FEE
            await v0.write(verdicts, {"work_key": rollouts, "verdict": "accept"})
            out = await v1.write(
                verdicts, {"work_key": m.work[2][1], "verdict": "soft_reject", "reason": "stale"}
            )
            assert out["state"] == "soft_rejected"
            with pytest.raises(Forbidden, match="not a validator"):
                await nodes[0].write(verdicts, {"work_key": m.work[3][1], "verdict": "hard_reject"})
            # the forged record: one hard reject is a vote, the second makes the quorum of 2
            forged = m.work[3][1]
            out = await v1.write(verdicts, {"work_key": forged, "verdict": "hard_reject"})
            assert (out["state"], out["member"]) == ("accepted", "healthy")
            with pytest.raises(Conflict, match="already judged"):
                await v1.write(verdicts, {"work_key": forged, "verdict": "hard_reject"})
            out = await v2.write(
                verdicts, {"work_key": forged, "verdict": "hard_reject", "reason": "forged"}
            )
            assert (out["state"], out["member"]) == ("hard_rejected", "ejected")
            ejected = await m.init.get(f"/v1/tasks/{t}")
            n3 = next(x for x in ejected["members"] if x["node"] == key_of(nodes[3]))
            assert (n3["status"], n3["locked"], n3["forfeited"], n3["weight"]) == (
                "ejected",
                0,
                100 * RATE,  # its other record's credit: forfeited with the forged one's
                0,
            )
            with pytest.raises(Forbidden, match="ejected"):
                await nodes[3].heartbeat(t)
            invite = await m.init.write(f"/v1/tasks/{t}/invites", {})
            with pytest.raises(Forbidden, match="was ejected"):
                await nodes[3].write(f"/v1/tasks/{t}/join", {"invite": invite["invite"]})
            with pytest.raises(Forbidden):
                await nodes[3].write(
                    f"/v1/tasks/{t}/work", {"work_key": work_key("x"), "kind": "tokens", "units": 1}
                )

            # finalize: shares freeze, what is left of the budget goes back to the initiator
            live = await m.init.get(f"/v1/tasks/{t}/shares")
            assert live["frozen"] is False
            out = await m.init.write(f"/v1/tasks/{t}/finalize")
            assert out["state"] == "finalized"
            shares = await m.init.get(f"/v1/tasks/{t}/shares")
            expected = {key_of(nodes[0]): 200, key_of(nodes[1]): 230, key_of(nodes[2]): 100}
            assert shares == {
                "task": t,
                "frozen": True,
                "total": 530,
                "weights": dict(sorted(expected.items())),
            }
            task = await m.init.get(f"/v1/tasks/{t}")
            n_verdicts = 8 + 1 + 1 + 2
            credited = (200 + 200 + 100 + 10) * RATE  # n3's 200 units forfeited, n2's 100 rejected
            refund = BUDGET - n_verdicts * FEE - credited
            assert (task["state"], task["left"], task["refunded"], task["fees"]) == (
                "finalized",
                0,
                refund,
                n_verdicts * FEE,
            )
            assert task["credited"] == credited and task["forfeited"] == 100 * RATE

            # claims: validators' fees and the initiator's refund are claimable at once
            acct = await m.init.get(f"/v1/accounts/{key_of(m.init)}")
            assert acct == {"key": key_of(m.init), "claimable": refund, "locked": 0, "claimed": 0}
            out = await m.init.write("/v1/claims", {"amount": refund - 1})
            assert out == {"claimed": refund - 1, "claimable": 1, "seq": out["seq"]}
            with pytest.raises(Conflict, match="over the 1 claimable"):
                await m.init.write("/v1/claims", {"amount": 2})
            assert (await v0.get(f"/v1/accounts/{key_of(v0)}"))["claimable"] == 9 * FEE
            await v0.write("/v1/claims", {"amount": 9 * FEE})
            node_acct = await nodes[0].get(f"/v1/accounts/{key_of(nodes[0])}")
            assert (node_acct["claimable"], node_acct["locked"]) == (0, 200 * RATE)
            with pytest.raises(Conflict, match="over the 0 claimable"):
                await nodes[0].write("/v1/claims", {"amount": 1})

            # the audit: every entry, signature, checkpoint and balance from public data alone
            ledger = await audit.fetch(url)
            report = audit.audit(ledger, key=coord.key)
            published = await m.init.get("/v1/state")
            assert report.size == published["size"] == len(ledger.entries)
            assert report.state == {k: v for k, v in published.items() if k != "root"}
            assert report.state_root == published["root"]
            assert report.checkpoints >= 3
            assert report.kinds["work.verdict"] == n_verdicts
            assert report.kinds["member.status"] == 4
            with pytest.raises(audit.AuditError, match="not the key you trust"):
                audit.audit(ledger, key=key_of(m.init))
        finally:
            await m.close()


async def _is(c: Client, task: str, node: str, status: str) -> bool:
    return await member_status(c, task, node) == status


# ---- the log: proofs, checkpoints, witnesses ------------------------------------------------


async def check_log(c: Client, coord_key: str) -> dict[int, bytes]:
    """Every signed checkpoint verifies; inclusion and consistency proofs served at
    /v1/log/proof/* verify against their roots. The roots by size."""
    state = await c.get("/v1/state")
    origin = state["origin"]
    cps = (await c.get("/v1/log/checkpoints"))["checkpoints"]
    assert cps, "no checkpoints"
    roots: dict[int, bytes] = {}
    for cp in cps:
        verified = note.verify_note(cp["note"], {origin: bytes.fromhex(coord_key)})
        parsed = note.parse_checkpoint(verified.text)
        assert (parsed.origin, parsed.size) == (origin, cp["size"])
        assert verified.verified[0] == origin
        roots[parsed.size] = parsed.root
    latest = note.verify_note(await c.checkpoint(), {origin: bytes.fromhex(coord_key)})
    assert note.parse_checkpoint(latest.text).size == max(roots)
    sizes = sorted(roots)
    leaves = [merkle.leaf_hash(e) for e in await c.entries(0, sizes[-1])]
    for size in sizes:
        for index in sorted({0, size // 2, size - 1}):
            proof = await c.get("/v1/log/proof/inclusion", index=index, size=size)
            hashes = [bytes.fromhex(h) for h in proof["proof"]]
            merkle.verify_inclusion(leaves[index], index, size, hashes, roots[size])
            if hashes:
                bad = [bytes([hashes[0][0] ^ 1]) + hashes[0][1:], *hashes[1:]]
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion(leaves[index], index, size, bad, roots[size])
    pairs = [*itertools.pairwise(sizes), (sizes[0], sizes[-1])]
    for old, new in pairs:
        proof = await c.get("/v1/log/proof/consistency", old=old, new=new)
        hashes = [bytes.fromhex(h) for h in proof["proof"]]
        merkle.verify_consistency(old, new, roots[old], roots[new], hashes)
        if old != new:
            with pytest.raises(merkle.ProofError):
                merkle.verify_consistency(old, new, roots[new], roots[new], hashes)
    return roots


@pytest.mark.timeout(240)
def test_log_proofs_witness_and_restart(tmp_path: Path, db_url: str) -> None:
    asyncio.run(_log_proofs_witness_and_restart(tmp_path, db_url))


async def _log_proofs_witness_and_restart(tmp_path: Path, db_url: str) -> None:
    cfg = config(tmp_path, db_url, checkpoint_every=5, checkpoint_interval_s=0.2, **QUIET)
    async with running(cfg) as (url, coord):
        m = await open_market(url, coord.key, nodes=2)
        try:
            for i, n in enumerate(m.nodes):
                for step in range(3):
                    k = work_key(f"{i}/{step}")
                    await n.write(
                        f"/v1/tasks/{m.task}/work", {"work_key": k, "kind": "tokens", "units": 7}
                    )
                    await m.vals[0].write(
                        f"/v1/tasks/{m.task}/verdicts", {"work_key": k, "verdict": "accept"}
                    )
            size = (await m.init.get("/v1/status"))["size"]
            await poll(lambda: _checkpoint_at(m.init, size), "a checkpoint of the whole log")
            roots = await check_log(m.init, coord.key)
            assert len(roots) >= 4

            # bad proof requests
            with pytest.raises(NotFound, match="committed entries"):
                await m.init.get("/v1/log/proof/inclusion", index=0, size=size + 100)
            with pytest.raises(RequestError, match="no leaf"):
                await m.init.get("/v1/log/proof/inclusion", index=size, size=size)
            with pytest.raises(RequestError, match="not in order"):
                await m.init.get("/v1/log/proof/consistency", old=3, new=2)

            # a witness co-signs the latest checkpoint; the note served afterwards carries it
            origin = (await m.init.get("/v1/status"))["origin"]
            text = await m.witness.checkpoint(size)
            assert text.count("\n\u2014 ") == 1  # the coordinator's own line only
            assert m.witness.identity is not None
            cosigned = note.add_signature(text, "witness-1", m.witness.identity)
            out = await m.witness.write("/v1/log/cosign", {"note": cosigned})
            assert out == {"size": size, "witness": key_of(m.witness)}
            served = await m.init.checkpoint(size)
            both = {origin: bytes.fromhex(coord.key), "witness-1": m.witness.identity.public_bytes}
            assert note.verify_note(served, both).verified == [origin, "witness-1"]
            listed = (await m.init.get("/v1/log/checkpoints", after=size - 1))["checkpoints"]
            assert listed[0]["note"] == served
            # who may not co-sign, and what is not a checkpoint of this log
            with pytest.raises(Forbidden, match="not registered as a witness"):
                assert m.nodes[0].identity is not None
                await m.nodes[0].write(
                    "/v1/log/cosign",
                    {"note": note.add_signature(text, "node0", m.nodes[0].identity)},
                )
            with pytest.raises(RequestError, match="cosignature"):
                await m.witness.write("/v1/log/cosign", {"note": text})  # not its signature
            with pytest.raises(RequestError, match="cosignature"):
                await m.witness.write("/v1/log/cosign", {"note": "junk"})
            forged_cp = note.format_checkpoint(note.Checkpoint(origin, size, b"\x07" * 32))
            forged = note.sign_note(forged_cp, "witness-1", m.witness.identity)
            with pytest.raises(NotFound, match="no checkpoint of size"):
                await m.witness.write("/v1/log/cosign", {"note": forged})
            report = audit.audit(await audit.fetch(url), key=coord.key)
            assert report.cosignatures == 1

            before_state = await m.init.get("/v1/state")
            before_cps = {
                cp["size"]: cp["note"]
                for cp in (await m.init.get("/v1/log/checkpoints"))["checkpoints"]
            }
            before_entries = await m.init.entries(0, before_state["size"])
        finally:
            await m.close()

    # restart on the same database with the same key: everything is still there
    async with running(cfg) as (url, coord2):
        assert coord2.key == coord.key
        c = Client(url, Identity.generate(), timeout_s=60)
        try:
            assert await c.get("/v1/state") == before_state
            after_cps = {
                cp["size"]: cp["note"] for cp in (await c.get("/v1/log/checkpoints"))["checkpoints"]
            }
            assert {s: after_cps[s] for s in before_cps} == before_cps
            assert await c.entries(0, before_state["size"]) == before_entries
            # new writes continue the chain and the tree
            n = before_state["size"]
            out = await c.register(["node"], "late")
            assert out["seq"] == n
            await poll(lambda: _checkpoint_at(c, n + 1), "a checkpoint after the restart")
            new = json.loads((await c.entries(n, n + 1))[0])
            assert new["prev"] == merkle.leaf_hash(before_entries[-1]).hex()
            roots = await check_log(c, coord.key)
            for s in before_cps:  # each old root is consistent with the new tree
                proof = await c.get("/v1/log/proof/consistency", old=s, new=n + 1)
                hashes = [bytes.fromhex(h) for h in proof["proof"]]
                merkle.verify_consistency(s, n + 1, roots[s], roots[n + 1], hashes)
            report = audit.audit(await audit.fetch(url), key=coord.key)
            assert report.size == n + 1 and report.cosignatures == 1
        finally:
            await c.close()


async def _checkpoint_at(c: Client, size: int) -> bool:
    try:
        await c.checkpoint(size)
    except NotFound:
        return False
    return True


def test_a_database_of_another_key_is_refused(tmp_path: Path, db_url: str) -> None:
    async def main() -> None:
        async with running(config(tmp_path, db_url)) as (url, coord):
            c = Client(url, Identity.generate())
            await c.register(["node"], "n")
            await c.close()
        other = CoordinatorConfig(port=0, db=db_url, key=str(tmp_path / "other.pem"))
        with pytest.raises(Forbidden, match=f"ledger of coordinator {coord.key[:16]}.*that key"):
            async with running(other):
                pass
        async with running(config(tmp_path, db_url)) as (url, coord2):  # its own key still works
            assert coord2.state.size == 2

    asyncio.run(main())


# ---- liveness on a fake clock ---------------------------------------------------------------


def test_liveness_sweep_records_unhealthy_then_dead(tmp_path: Path, db_url: str) -> None:
    asyncio.run(_liveness(tmp_path, db_url))


async def _liveness(tmp_path: Path, db_url: str) -> None:
    cfg = config(tmp_path, db_url, unhealthy_after_s=U, dead_after_s=D)
    async with running(cfg) as (url, coord):
        init = await registered(url, ["initiator"], "init")
        a = await registered(url, ["node"], "a")
        b = await registered(url, ["node"], "b")
        clients = [init, a, b]
        try:
            publish = {"name": "live", "kind": "rl", "budget": 0, "rate_per_unit": 0}
            t = (await init.write("/v1/tasks", {**publish, "admission": "open"}))["task"]
            await init.write(f"/v1/tasks/{t}/open")
            for n in (a, b):
                await n.write(f"/v1/tasks/{t}/join")
                await n.heartbeat(t)
                await poll(lambda n=n: _is(init, t, key_of(n), "healthy"), "healthy")
            # the fake clock: a was last seen at t0, b at t0 + 2000 (the real clock, and so the
            # coordinator's own sweeper, stays near t0 and finds nobody silent)
            t0 = time.monotonic()
            coord.seen_ms[(t, key_of(a))] = t0
            coord.seen_ms[(t, key_of(b))] = t0 + 2000
            coord.sweep(t0 + U + 1)
            await poll(lambda: _is(init, t, key_of(a), "unhealthy"), "a unhealthy")
            assert await member_status(init, t, key_of(b)) == "healthy"
            size = coord.state.size
            coord.sweep(t0 + U + 500)  # still unhealthy: no second entry
            coord.sweep(t0 + U + 501)
            await init.get("/v1/status")  # a round trip: a write the sweeps began would be in
            assert coord.state.size == size
            coord.sweep(t0 + D + 1)  # a: dead; b: silent U + 1, unhealthy
            await poll(lambda: _is(init, t, key_of(a), "dead"), "a dead")
            await poll(lambda: _is(init, t, key_of(b), "unhealthy"), "b unhealthy")
            with pytest.raises(Forbidden, match="dead"):
                await a.heartbeat(t)
            with pytest.raises(Forbidden, match="dead"):
                await a.write(
                    f"/v1/tasks/{t}/work", {"work_key": work_key("a"), "kind": "units", "units": 1}
                )
            # b comes back before it is dead: healthy again
            await b.heartbeat(t)
            await poll(lambda: _is(init, t, key_of(b), "healthy"), "b healthy again")
            # a dead node joins again and is healthy once it heartbeats
            assert (await a.write(f"/v1/tasks/{t}/join"))["status"] == "joined"
            await a.heartbeat(t)
            await poll(lambda: _is(init, t, key_of(a), "healthy"), "a healthy again")
            log = await entries(init)
            statuses = [
                (e["req"]["path"].rsplit("/", 1)[1], e["req"]["body"]["status"])
                for e in log
                if e["kind"] == "member.status"
            ]
            ka, kb = key_of(a), key_of(b)
            assert [s for k, s in statuses if k == ka] == [
                "healthy",
                "unhealthy",
                "dead",
                "healthy",
            ]
            assert [s for k, s in statuses if k == kb] == ["healthy", "unhealthy", "healthy"]
            assert all(e["req"]["key"] == coord.key for e in log if e["kind"] == "member.status")
            audit.audit(await audit.fetch(url), key=coord.key)
        finally:
            for c in clients:
                await c.close()


# ---- a full disk -----------------------------------------------------------------------------


class DiskFull:
    """Make the coordinator's commits fail, then succeed again: SQLite with ``max_page_count``
    at the file's current size; PostgreSQL with a constraint no new entry can meet."""

    def __init__(self, coord: Any, db_url: str) -> None:
        self.engine = coord.db.engine
        self.dialect = self.engine.dialect.name

    def _limit(self, dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count={self.pages}")

    def __enter__(self) -> DiskFull:
        if self.dialect == "sqlite":
            with self.engine.connect() as c:
                self.pages = int(c.execute(text("PRAGMA page_count")).scalar_one())
            event.listen(self.engine, "connect", self._limit)
            self.engine.dispose()  # every new connection gets the limit
        else:
            with self.engine.begin() as c:
                c.execute(
                    text("ALTER TABLE entries ADD CONSTRAINT disk_full CHECK (false) NOT VALID")
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dialect == "sqlite":
            event.remove(self.engine, "connect", self._limit)
            self.engine.dispose()
        else:
            with self.engine.begin() as c:
                c.execute(text("ALTER TABLE entries DROP CONSTRAINT disk_full"))


@pytest.mark.timeout(180)
def test_disk_full_answers_503_and_loses_nothing_acknowledged(tmp_path: Path, db_url: str) -> None:
    asyncio.run(_disk_full(tmp_path, db_url))


async def _disk_full(tmp_path: Path, db_url: str) -> None:
    cfg = config(tmp_path, db_url)
    acked: dict[str, int] = {}  # key -> seq of its registration
    refused: list[str] = []

    async def register(i: int, pad: int) -> None:
        c = Client(url, Identity.generate(), timeout_s=60)
        try:
            out = await c.register(["node"], f"n{i}", {"pad": "x" * pad})
            acked[key_of(c)] = out["seq"]
        except Unavailable as e:
            assert "nothing was written" in str(e)
            refused.append(key_of(c))
        finally:
            await c.close()

    async with running(cfg) as (url, coord):
        for i in range(5):
            await register(i, 10)
        with DiskFull(coord, db_url):
            for round_ in range(50):  # concurrent writers fill the last free pages, then fail
                await asyncio.gather(*(register(100 * round_ + j, 1500) for j in range(8)))
                if len(refused) >= 8:
                    break
            assert refused, "the full disk never refused a write"
            assert coord.failed_commits >= 1
            status_c = Client(url)
            status = await status_c.get("/v1/status")
            await status_c.close()
            assert status["failed_commits"] == coord.failed_commits
            state = await _state(url)
            assert set(acked) <= set(state["identities"])  # nothing acknowledged was lost
            assert not set(refused) & set(state["identities"])  # nothing refused was kept
        # space is back: writes go through again
        for i in range(3):
            await register(1000 + i, 10)
        state = await _state(url)
        assert set(acked) <= set(state["identities"])
        assert len(state["identities"]) == len(acked)
        assert sorted(acked.values()) == list(range(1, state["size"]))
        audit.audit(await audit.fetch(url), key=coord.key)
    async with running(cfg) as (url, _):  # and after a restart
        restarted = await _state(url)
        assert restarted == state


async def _state(url: str) -> Any:
    c = Client(url)
    try:
        return await c.get("/v1/state")
    finally:
        await c.close()
