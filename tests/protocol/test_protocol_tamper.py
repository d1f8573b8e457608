"""Tampering with a real ledger: every kind of alteration fails the audit, naming what is at fault.

One honest ledger is built once (a coordinator in this process, ``checkpoint_every=5``): a task
with three nodes and two validators, work, accepts, a soft reject, a drop, a quorum of hard
rejects that ejects a node, claims, and the task finalized. Each test alters a copy of what
``audit.fetch`` got, as a coordinator or whoever holds its files could, and checks that
``audit.audit`` raises ``AuditError`` naming the entry (``seq``) or checkpoint at fault; some
run the real ``cotrain audit DIR`` (exit 1, the entry named on stdout). The last two tamper with
a running coordinator's database (its SQLite file; PostgreSQL too where the ``db_url`` fixture
can start one), as a malicious operator would, and audit its URL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import protocol_harness as ph
import pytest
import sqlalchemy

from cotrain.core.identity import Identity
from cotrain.core.signed import canonical
from cotrain.protocol import audit, auth, merkle, note
from cotrain.protocol.errors import AuditError
from cotrain.protocol.ledger import ZERO, Entry
from cotrain.protocol.state import State

pytestmark = pytest.mark.timeout(300)  # seconds on an idle machine; more on a busy one

CHECKPOINT_EVERY = 5


@dataclass
class Honest:
    """The honest ledger and everything needed to forge variants of it."""

    ledger: audit.Ledger
    ids: dict[str, Identity]
    coordinator: Identity
    task: str
    seqs: dict[str, int]
    """What happened at which entry: label -> seq."""
    work: dict[str, str]
    """Work label -> work key."""

    def copy(self) -> audit.Ledger:
        return audit.Ledger(
            list(self.ledger.entries),
            dict(self.ledger.checkpoints),
            copy.deepcopy(self.ledger.published),
        )

    def key(self, name: str) -> str:
        return self.ids[name].public_hex


def _work_key(label: str) -> str:
    return hashlib.sha256(f"tamper-{label}".encode()).hexdigest()


async def _build(tmp: Path) -> Honest:
    cfg = ph.config(tmp, checkpoint_every=CHECKPOINT_EVERY, checkpoint_interval_s=3600.0)
    seqs: dict[str, int] = {}
    work: dict[str, str] = {}
    async with ph.running(cfg) as (url, _coord):
        named = await ph.identities(
            url,
            init=["initiator"],
            v1=["validator"],
            v2=["validator"],
            n1=["node"],
            n2=["node"],
            bad=["node"],
            idle=["node"],  # registered, never joins
        )
        clients = {name: c for name, (_, c) in named.items()}
        try:
            ids = {name: ident for name, (ident, _) in named.items()}
            published = await clients["init"].write(
                "/v1/tasks",
                {
                    "name": "tamper",
                    "kind": "diloco",
                    "budget": 10_000,
                    "rate_per_unit": 10,
                    "validator_fee": 1,
                    "lock_s": 0,  # accepted credit is claimable at once
                    "admission": "open",
                    "validators": [ids["v1"].public_hex, ids["v2"].public_hex],
                    "quorum": 2,
                },
            )
            task = published["task"]
            seqs["publish"] = published["seq"]

            async def w(label: str, who: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
                got = await clients[who].write(path.format(t=task), body)
                seqs[label] = got["seq"]
                return got

            async def submit(label: str, who: str, units: int) -> None:
                work[label] = _work_key(label)
                await w(
                    f"work:{label}",
                    who,
                    "/v1/tasks/{t}/work",
                    {"work_key": work[label], "kind": "units", "units": units, "step": 1},
                )

            async def verdict(label: str, who: str, v: str) -> None:
                await w(
                    f"verdict:{label}:{who}",
                    who,
                    "/v1/tasks/{t}/verdicts",
                    {"work_key": work[label], "verdict": v, "reason": v},
                )

            await w("open", "init", "/v1/tasks/{t}/open", {})
            for n in ("n1", "n2", "bad"):
                await w(f"join:{n}", n, "/v1/tasks/{t}/join", {})
            await submit("w1", "n1", 5)
            await submit("w2", "n2", 3)
            await submit("wb", "bad", 100)
            await verdict("w1", "v1", "accept")
            await verdict("w2", "v2", "accept")
            await verdict("wb", "v1", "hard_reject")
            await verdict("wb", "v2", "hard_reject")  # the quorum: bad is ejected
            await w("claim:n1", "n1", "/v1/claims", {"amount": 20})
            await submit("w3", "n1", 2)
            await verdict("w3", "v1", "accept")
            await w("claim:v1", "v1", "/v1/claims", {"amount": 2})
            await submit("w4", "n2", 4)
            await verdict("w4", "v2", "soft_reject")
            await submit("w5", "n1", 1)
            await verdict("w5", "v2", "drop")
            await w("claim:n2", "n2", "/v1/claims", {"amount": 10})
            await w("finalize", "init", "/v1/tasks/{t}/finalize", {})
            size = seqs["finalize"] + 1
            assert size % CHECKPOINT_EVERY == 0, size  # so the last entry is checkpointed too
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # the checkpoint at the last size commits with the last write
                ledger = await audit.fetch(url, timeout_s=30)
                if max(ledger.checkpoints, default=0) == size:
                    break
                assert asyncio.get_running_loop().time() < deadline, sorted(ledger.checkpoints)
                await asyncio.sleep(0.05)
        finally:
            for c in clients.values():
                await c.close()
    coordinator = Identity.load(cfg.key)
    return Honest(ledger, ids, coordinator, task, seqs, work)


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Honest:
    return asyncio.run(_build(tmp_path_factory.mktemp("honest")))


# ---- forging helpers ---------------------------------------------------------------------------


def _obj(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def _edit(data: bytes, **req_body: Any) -> bytes:
    """The entry with its request body's fields changed (the author's signature left as it was)."""
    o = _obj(data)
    o["req"]["body"].update(req_body)
    return canonical(o)


def _resign_entry(data: bytes, who: Identity, **req_body: Any) -> bytes:
    """The entry with its request body changed and signed again by ``who`` (a consistent
    statement by that key, which the rules must then judge)."""
    o = _obj(data)
    r = o["req"]
    body = {**r["body"], **req_body}
    req = auth.sign(who, r["method"], r["path"], body, ts_ms=r["ts"])
    o["req"] = req.to_json()
    return canonical(o)


def _entry(ts_ms: int, kind: str, req: auth.SignedRequest) -> bytes:
    """A new entry (its seq and prev are set by ``_rechain``)."""
    return canonical(
        {"v": 1, "seq": 0, "ts": ts_ms, "prev": ZERO, "kind": kind, "req": req.to_json()}
    )


def _rechain(entries: list[bytes]) -> list[bytes]:
    """Renumber the entries and recompute every ``prev``: a chain that is consistent again."""
    out, prev = [], ZERO
    for i, data in enumerate(entries):
        o = _obj(data)
        o["seq"], o["prev"] = i, prev
        b = canonical(o)
        out.append(b)
        prev = merkle.leaf_hash(b).hex()
    return out


def _checkpoint_note(
    signer: Identity, origin: str, size: int, root: bytes, state_root: str, ts_ms: int
) -> str:
    cp = note.Checkpoint(origin, size, root, [f"state {state_root}", f"time {ts_ms}"])
    return note.sign_note(note.format_checkpoint(cp), origin, signer)


def _resign_all(entries: list[bytes], signer: Identity) -> audit.Ledger:
    """What a coordinator that rewrote its log would publish: a checkpoint every
    ``CHECKPOINT_EVERY`` entries signed by its own key, and the state of its log (replayed by
    the state's reducer alone, without the auditor's checks)."""
    state, frontier, notes = State(), merkle.Frontier(), {}
    for i, data in enumerate(entries):
        e = Entry.decode(data)
        state.apply(i, e.ts_ms, e.req)
        frontier.append(merkle.leaf_hash(data))
        if (i + 1) % CHECKPOINT_EVERY == 0:
            notes[i + 1] = _checkpoint_note(
                signer, state.origin, i + 1, frontier.root(), state.root(), state.ts_ms
            )
    return audit.Ledger(list(entries), notes, {**state.view(), "root": state.root()})


def _fails(ledger: audit.Ledger, **kw: Any) -> AuditError:
    with pytest.raises(AuditError) as caught:
        audit.audit(ledger, **kw)
    return caught.value


def _cli_audit(ledger: audit.Ledger, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``cotrain audit DIR`` on a saved copy of ``ledger`` (no audit cache unless ``extra``
    names one)."""
    d = tmp / f"ledger-{os.urandom(4).hex()}"
    audit.save(ledger, d)
    return _cli(str(d), *(extra or ("--cache", "")))


def _cli(*args: str, timeout_s: float = 150) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
    return subprocess.run(
        [sys.executable, "-m", "cotrain", "audit", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )


def _cli_failed(ran: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert ran.returncode == 1, (ran.returncode, ran.stdout, ran.stderr)
    line = next((x for x in ran.stdout.splitlines() if x.startswith("AUDIT FAILED: ")), None)
    assert line is not None, (ran.stdout, ran.stderr)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ---- the honest ledger -------------------------------------------------------------------------


def test_honest_ledger_audits_clean(honest: Honest, tmp_path: Path) -> None:
    n = len(honest.ledger.entries)
    report = audit.audit(honest.ledger)
    assert report.size == n
    assert sorted(honest.ledger.checkpoints) == list(range(CHECKPOINT_EVERY, n + 1, 5))
    assert report.checkpoints == n // CHECKPOINT_EVERY
    assert report.coordinator == honest.coordinator.public_hex
    assert report.kinds["work.verdict"] == 7 and report.kinds["account.claim"] == 3
    st = report.state
    bad, n1 = honest.key("bad"), honest.key("n1")
    assert st["members"][f"{honest.task}/{bad}"]["status"] == "ejected"
    assert st["tasks"][honest.task]["state"] == "finalized"
    assert st["tasks"][honest.task]["shares"] == {n1: 7, honest.key("n2"): 3}
    assert st["accounts"][n1]["claimed"] == 20
    # pinned to the right key, and with a cache of what was seen (twice: the same log again)
    seen = tmp_path / "seen.json"
    audit.audit(honest.ledger, key=honest.coordinator.public_hex, seen=audit.SeenCheckpoints(seen))
    audit.audit(honest.ledger, seen=audit.SeenCheckpoints(seen))
    ran = _cli_audit(honest.ledger, tmp_path)
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    assert f"audit ok: {n} entries" in ran.stdout


# ---- entries altered ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "change"),
    [
        ("work:w1", {"units": 50}),
        ("verdict:w2:v2", {"verdict": "hard_reject"}),
        ("claim:n1", {"amount": 2}),
    ],
)
def test_altered_body_is_named(honest: Honest, label: str, change: dict[str, Any]) -> None:
    seq = honest.seqs[label]
    lg = honest.copy()
    lg.entries[seq] = _edit(lg.entries[seq], **change)
    e = _fails(lg)
    assert e.seq == seq and "not signed by its author" in str(e), e


def test_altered_body_through_the_cli(honest: Honest, tmp_path: Path) -> None:
    seq = honest.seqs["work:w1"]
    lg = honest.copy()
    lg.entries[seq] = _edit(lg.entries[seq], units=500)
    _cli_failed(_cli_audit(lg, tmp_path), f"entry {seq}:", "not signed by its author")


@pytest.mark.parametrize("what", ["author", "request time", "path"])
def test_altered_signed_request_fields_are_named(honest: Honest, what: str) -> None:
    seq = honest.seqs["work:w2"]
    lg = honest.copy()
    o = _obj(lg.entries[seq])
    if what == "author":
        o["req"]["key"] = honest.key("n1")
    elif what == "request time":
        o["req"]["ts"] += 1
    else:
        o["req"]["path"] = "/v1/tasks/t1/work"
    lg.entries[seq] = canonical(o)
    e = _fails(lg)
    assert e.seq == seq and "not signed by its author" in str(e), e


def test_non_canonical_bytes_are_named(honest: Honest) -> None:
    seq = honest.seqs["work:w1"]
    lg = honest.copy()
    lg.entries[seq] = json.dumps(_obj(lg.entries[seq]), indent=1).replace("\n", " ").encode()
    e = _fails(lg)
    assert e.seq == seq and "malformed" in str(e) and "canonical" in str(e), e


def test_altered_kind_label_is_named(honest: Honest) -> None:
    seq = honest.seqs["work:w1"]
    lg = honest.copy()
    o = _obj(lg.entries[seq])
    o["kind"] = "work.verdict"
    lg.entries[seq] = canonical(o)
    e = _fails(lg)
    assert e.seq == seq and "labelled work.verdict but is a work.submit" in str(e), e


def test_altered_coordinator_time_breaks_the_chain(honest: Honest) -> None:
    """The entry's own ``ts`` is the coordinator's (not the author's signature): the change
    shows in the next entry's ``prev``, which names the entry before it as altered."""
    seq = honest.seqs["claim:n1"]
    lg = honest.copy()
    o = _obj(lg.entries[seq])
    o["ts"] += 1
    lg.entries[seq] = canonical(o)
    e = _fails(lg)
    assert e.seq == seq + 1 and "does not chain to the entry before it" in str(e), e
    # the same on the last entry, which no entry follows: its signed checkpoint catches it
    lg = honest.copy()
    o = _obj(lg.entries[-1])
    o["ts"] += 1
    lg.entries[-1] = canonical(o)
    n = len(lg.entries)
    e = _fails(lg)
    assert e.seq is None and str(e).startswith(f"checkpoint {n}: its root"), e
    # time going back is against the rules
    lg = honest.copy()
    o = _obj(lg.entries[seq])
    o["ts"] = _obj(lg.entries[seq - 1])["ts"] - 1
    lg.entries[seq] = canonical(o)
    e = _fails(lg)
    assert e.seq == seq and "breaks the rules" in str(e) and "before the previous" in str(e), e


# ---- entries removed, reordered, inserted ------------------------------------------------------


def test_removed_entry_is_named(honest: Honest, tmp_path: Path) -> None:
    seq = honest.seqs["verdict:wb:v2"]  # the vote that made the quorum
    lg = honest.copy()
    del lg.entries[seq]
    e = _fails(lg)
    assert e.seq == seq and f"says it is entry {seq + 1}" in str(e) and "removed" in str(e), e
    _cli_failed(_cli_audit(lg, tmp_path), f"entry {seq}:", "removed")


def test_removed_last_entry_is_named(honest: Honest, tmp_path: Path) -> None:
    lg = honest.copy()
    n = len(lg.entries)
    del lg.entries[-1]
    e = _fails(lg)
    assert f"checkpoint {n} is beyond the {n - 1} entries" in str(e), e
    # dropping the checkpoint as well and publishing the state of the shorter log is a log
    # that is all true as far as it goes: only an auditor who saw the longer one can tell
    lg = _resign_all(lg.entries, honest.coordinator)
    lg.checkpoints = {s: t for s, t in honest.ledger.checkpoints.items() if s < n}
    audit.audit(lg)
    seen = tmp_path / "seen.json"
    audit.audit(honest.ledger, seen=audit.SeenCheckpoints(seen))
    e = _fails(lg, seen=audit.SeenCheckpoints(seen))
    assert f"the log shrank: this auditor saw {n} entries before, it now has {n - 1}" in str(e)


def test_swapped_entries_are_named(honest: Honest, tmp_path: Path) -> None:
    a, b = honest.seqs["work:w1"], honest.seqs["work:w2"]
    assert b == a + 1
    lg = honest.copy()
    lg.entries[a], lg.entries[b] = lg.entries[b], lg.entries[a]
    e = _fails(lg)
    assert e.seq == a and f"says it is entry {b}" in str(e) and "reordered" in str(e), e
    _cli_failed(_cli_audit(lg, tmp_path), f"entry {a}:", "reordered")


def test_swapped_and_rechained_entries_fail_the_checkpoint(honest: Honest) -> None:
    """Reordered with seq and prev rewritten to match: two submissions in either order obey the
    rules, so it is the signed checkpoint after them that names the alteration."""
    a, b = honest.seqs["work:w1"], honest.seqs["work:w2"]
    lg = honest.copy()
    oa, ob = _obj(lg.entries[a]), _obj(lg.entries[b])
    oa["ts"], ob["ts"] = ob["ts"], oa["ts"]  # the coordinator's times stay in order
    lg.entries[a], lg.entries[b] = canonical(ob), canonical(oa)
    lg.entries = _rechain(lg.entries)
    first = min(s for s in lg.checkpoints if s > b)
    e = _fails(lg)
    assert str(e).startswith(f"checkpoint {first}: its root"), e
    assert "altered after it was signed" in str(e)


def test_swapped_so_that_the_rules_break(honest: Honest) -> None:
    """A verdict moved before the work it judges, the chain rebuilt: the replay refuses it."""
    sub, ver = honest.seqs["work:w1"], honest.seqs["verdict:w1:v1"]
    lg = honest.copy()
    moved = lg.entries.pop(ver)
    lg.entries.insert(sub, moved)
    lg.entries = _rechain(lg.entries)
    e = _fails(lg)
    assert e.seq == sub and "breaks the rules (work.verdict)" in str(e) and "no work" in str(e)


def _insert(honest: Honest, at: int, req: auth.SignedRequest, kind: str) -> audit.Ledger:
    """``req`` inserted as entry ``at``, the chain rebuilt around it (seq and prev of every later
    entry rewritten, as the coordinator could); the checkpoints are left as they were."""
    lg = honest.copy()
    ts = _obj(lg.entries[at - 1])["ts"]
    lg.entries.insert(at, _entry(ts, kind, req))
    lg.entries = _rechain(lg.entries)
    return lg


def _sign(honest: Honest, who: Identity, path: str, body: dict[str, Any], at: int) -> Any:
    ts = _obj(honest.ledger.entries[at - 1])["req"]["ts"]
    return auth.sign(who, "POST", path.format(t=honest.task), body, ts_ms=ts)


def test_inserted_entry_with_a_forged_signature_is_named(honest: Honest, tmp_path: Path) -> None:
    """Work "by n1", signed by another key (bad's) over the same statement."""
    at = honest.seqs["verdict:w2:v2"]
    body = {"work_key": _work_key("forged"), "kind": "units", "units": 1000, "step": 1}
    req = _sign(honest, honest.ids["bad"], "/v1/tasks/{t}/work", body, at)
    req = dataclasses.replace(req, key=honest.key("n1"))
    lg = _insert(honest, at, req, "work.submit")
    e = _fails(lg)
    assert e.seq == at and "not signed by its author" in str(e), e
    _cli_failed(_cli_audit(lg, tmp_path), f"entry {at}:", "not signed by its author")
    # the same request with a signature of the right shape but made up
    lg.entries[at] = canonical({**_obj(lg.entries[at]), "req": {**req.to_json(), "sig": "ab" * 64}})
    e = _fails(lg)
    assert e.seq == at and "not signed by its author" in str(e), e


@pytest.mark.parametrize(
    ("path", "body", "kind", "why"),
    [
        (
            "/v1/tasks/{t}/work",
            {"work_key": _work_key("stranger"), "kind": "units", "units": 9, "step": 1},
            "work.submit",
            "is not a member of",
        ),
        ("/v1/claims", {"amount": 5}, "account.claim", "over the 0 claimable"),
        (
            "/v1/tasks",
            {"name": "x", "kind": "rl", "budget": 5, "rate_per_unit": 1},
            "task.publish",
            "is not registered as a initiator",
        ),
    ],
)
def test_inserted_entry_signed_by_an_unregistered_key_is_named(
    honest: Honest, path: str, body: dict[str, Any], kind: str, why: str
) -> None:
    at = honest.seqs["claim:n1"]
    req = _sign(honest, Identity.generate(), path, body, at)
    e = _fails(_insert(honest, at, req, kind))
    assert e.seq == at and f"breaks the rules ({kind})" in str(e) and why in str(e), e


@pytest.mark.parametrize(
    ("case", "who", "where", "why"),
    [
        ("work from a registered node that never joined", "idle", "claim:n1", "not a member"),
        ("work from the node after its ejection", "bad", "claim:n1", "is ejected of"),
        ("work before the task opened", "n1", "open", "cannot submit work to"),
        ("a verdict from a node, not a validator", "n2", "claim:n1", "is not a validator of"),
        ("a second verdict from the same validator", "v1", "claim:n1", "already judged"),
        ("the coordinator's status entry signed by a node", "bad", "claim:n1", "only the coord"),
    ],
)
def test_consistently_signed_entry_that_breaks_the_rules_is_named(
    honest: Honest, case: str, who: str, where: str, why: str
) -> None:
    at = honest.seqs[where]
    ident = honest.ids[who]
    if "verdict" in case:
        body: dict[str, Any] = {"work_key": honest.work["w1"], "verdict": "accept"}
        req, kind = _sign(honest, ident, "/v1/tasks/{t}/verdicts", body, at), "work.verdict"
    elif "status" in case:
        path = f"/v1/tasks/{honest.task}/members/{ident.public_hex}"
        ts = _obj(honest.ledger.entries[at - 1])["req"]["ts"]
        req = auth.sign(ident, "LEDGER", path, {"status": "healthy"}, ts_ms=ts)
        kind = "member.status"
    else:
        body = {"work_key": _work_key(case), "kind": "units", "units": 7, "step": 2}
        req, kind = _sign(honest, ident, "/v1/tasks/{t}/work", body, at), "work.submit"
    e = _fails(_insert(honest, at, req, kind))
    assert e.seq == at and f"breaks the rules ({kind})" in str(e) and why in str(e), (case, e)


def test_claim_over_the_claimable_resigned_by_its_author_is_named(
    honest: Honest, tmp_path: Path
) -> None:
    """n1 itself signs a bigger claim than it had (50 credit), in place of its real claim."""
    seq = honest.seqs["claim:n1"]
    lg = honest.copy()
    lg.entries[seq] = _resign_entry(lg.entries[seq], honest.ids["n1"], amount=1000)
    e = _fails(lg)
    assert e.seq == seq and "breaks the rules (account.claim)" in str(e), e
    assert "claim of 1000 is over the 50 claimable" in str(e)
    _cli_failed(_cli_audit(lg, tmp_path), f"entry {seq}:", "over the 50 claimable")


def test_a_replayed_request_is_named(honest: Honest) -> None:
    """The coordinator sequences n1's signed claim a second time (a captured request replayed,
    or one it was sent once and entered twice): the rules allow the second claim (n1 has the
    credit), but a key never uses a nonce twice, so the audit must refuse the copy even when
    the coordinator re-signed every checkpoint over the result."""
    seq = honest.seqs["claim:n1"]
    at = honest.seqs["verdict:w3:v1"] + 1
    lg = honest.copy()
    o = _obj(lg.entries[seq])
    o["ts"] = _obj(lg.entries[at - 1])["ts"]
    lg.entries.insert(at, canonical(o))
    forged = _resign_all(_rechain(lg.entries), honest.coordinator)
    e = _fails(forged)
    assert e.seq == at and f"entry {seq}" in str(e) and "replay" in str(e), e


# ---- history rewritten, equivocation -----------------------------------------------------------


def _rewritten(honest: Honest) -> tuple[audit.Ledger, int]:
    """The log without the vote that ejected bad, the chain rebuilt: (the log with the
    checkpoints it can still show, the seq removed)."""
    seq = honest.seqs["verdict:wb:v2"]
    entries = list(honest.ledger.entries)
    del entries[seq]
    lg = honest.copy()
    lg.entries = _rechain(entries)
    n = len(lg.entries)
    lg.checkpoints = {s: t for s, t in lg.checkpoints.items() if s <= n}
    lg.published = None
    audit.replay(lg.entries)  # every entry still obeys the rules
    return lg, seq


def test_rebuilt_chain_fails_the_signed_checkpoints(honest: Honest) -> None:
    lg, seq = _rewritten(honest)
    first = min(s for s in lg.checkpoints if s > seq)
    e = _fails(lg)
    assert str(e).startswith(f"checkpoint {first}: its root"), e
    # the checkpoints before the alteration still hold
    keep = audit.Ledger(lg.entries, {s: t for s, t in lg.checkpoints.items() if s < first})
    assert audit.audit(keep).checkpoints == first // CHECKPOINT_EVERY - 1


def test_history_rewritten_and_resigned_is_caught_by_what_was_seen(
    honest: Honest, tmp_path: Path
) -> None:
    """The coordinator rewrites its log and signs new checkpoints over it with its own key: the
    new log is consistent in itself, so only an auditor who saw the old checkpoints can tell."""
    lg, seq = _rewritten(honest)
    forged = _resign_all(lg.entries, honest.coordinator)
    audit.audit(forged)  # consistent in itself: nothing in it shows the rewrite
    seen = tmp_path / "seen.json"
    audit.audit(honest.ledger, seen=audit.SeenCheckpoints(seen))
    e = _fails(forged, seen=audit.SeenCheckpoints(seen))
    first = min(s for s in honest.ledger.checkpoints if s > seq)
    assert f"history was rewritten: the log's root at size {first}" in str(e), e
    assert "equivocation" in str(e)
    # the same through the CLI and its cache: an honest audit first, then the rewritten log
    cache = tmp_path / "cache"
    ran = _cli_audit(honest.ledger, tmp_path, "--cache", str(cache))
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    _cli_failed(
        _cli_audit(forged, tmp_path, "--cache", str(cache)),
        f"history was rewritten: the log's root at size {first}",
    )


def test_history_rewritten_from_a_new_genesis_meets_the_cli_cache(
    honest: Honest, tmp_path: Path
) -> None:
    """The coordinator starts its log over under the same key (a new genesis: other bytes),
    copies every signed request but the vote that ejected bad, and signs new checkpoints. The
    CLI keeps what it saw per coordinator key, not per genesis, so the rewrite is still seen."""
    seq = honest.seqs["verdict:wb:v2"]
    entries = list(honest.ledger.entries)
    del entries[seq]
    g = _obj(entries[0])
    r = g["req"]
    g["req"] = auth.sign(honest.coordinator, r["method"], r["path"], r["body"]).to_json()
    entries[0] = canonical(g)
    forged = _resign_all(_rechain(entries), honest.coordinator)
    assert forged.entries[0] != honest.ledger.entries[0]
    audit.audit(forged, key=honest.coordinator.public_hex)  # consistent in itself
    cache = tmp_path / "cache"
    ran = _cli_audit(honest.ledger, tmp_path, "--cache", str(cache))
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    line = _cli_failed(_cli_audit(forged, tmp_path, "--cache", str(cache)), "history was rewritten")
    assert "root at size 5 is" in line, line  # the new genesis changed every root


def test_equivocation_two_checkpoints_of_one_size(honest: Honest, tmp_path: Path) -> None:
    """The coordinator's key signs two checkpoints of the same size with different roots (one
    for the honest log, one for a fork): each auditor holding both can show the
    equivocation; an auditor with the one against the other log names that checkpoint."""
    lg, seq = _rewritten(honest)
    forked = _resign_all(lg.entries, honest.coordinator)
    size = min(s for s in honest.ledger.checkpoints if s > seq)
    assert forked.published is not None
    coord = {forked.published["origin"]: honest.coordinator.public_bytes}
    a = note.parse_checkpoint(note.verify_note(honest.ledger.checkpoints[size], coord).text)
    b = note.parse_checkpoint(note.verify_note(forked.checkpoints[size], coord).text)
    assert a.size == b.size == size and a.root != b.root  # both genuinely signed
    # the fork's checkpoint beside the honest entries
    mixed = honest.copy()
    mixed.checkpoints[size] = forked.checkpoints[size]
    e = _fails(mixed)
    assert str(e).startswith(f"checkpoint {size}: its root"), e
    # an auditor who saw the honest checkpoint, then is shown the fork
    seen = tmp_path / "seen.json"
    audit.audit(honest.ledger, seen=audit.SeenCheckpoints(seen))
    e = _fails(forked, seen=audit.SeenCheckpoints(seen))
    assert f"at size {size}" in str(e) and "(equivocation)" in str(e), e
    # and the other way round: saw the fork first, then the honest log
    seen2 = tmp_path / "seen2.json"
    audit.audit(forked, seen=audit.SeenCheckpoints(seen2))
    e = _fails(honest.copy(), seen=audit.SeenCheckpoints(seen2))
    assert f"at size {size}" in str(e) and "(equivocation)" in str(e), e


# ---- checkpoints altered -----------------------------------------------------------------------


def test_checkpoint_with_a_wrong_state_root_is_named(honest: Honest, tmp_path: Path) -> None:
    size = 15
    _, at, _ = audit.replay(honest.ledger.entries, record_at={size - 1, size})
    root, _, view = at[size]
    other_state = at[size - 1][1]  # a real state root, of the size before
    lg = honest.copy()
    origin = view["origin"]
    lg.checkpoints[size] = _checkpoint_note(
        honest.coordinator, origin, size, root, other_state, view["ts_ms"]
    )
    e = _fails(lg)
    assert str(e).startswith(f"checkpoint {size}: its state root {other_state[:16]}"), e
    _cli_failed(_cli_audit(lg, tmp_path), f"checkpoint {size}: its state root")


def test_checkpoint_signed_by_the_wrong_key_is_named(honest: Honest) -> None:
    size = 10
    lg = honest.copy()
    text = note.parse_note(lg.checkpoints[size]).text
    origin = text.split("\n", 1)[0]
    impostor = Identity.generate()
    lg.checkpoints[size] = note.sign_note(text, origin, impostor)
    e = _fails(lg)
    assert str(e).startswith(f"checkpoint {size}:") and "no signature by a known key" in str(e)
    # the right key ID with a signature that does not verify
    lg = honest.copy()
    parsed = note.parse_note(lg.checkpoints[size])
    sig = parsed.signatures[0]
    bent = base64.b64encode(sig.key_id + bytes([sig.sig[0] ^ 1]) + sig.sig[1:]).decode()
    lg.checkpoints[size] = f"{parsed.text}\n\u2014 {sig.name} {bent}\n"
    e = _fails(lg)
    assert str(e).startswith(f"checkpoint {size}:") and "bad signature by known key" in str(e)
    # a checkpoint text altered under the coordinator's untouched signature
    lg = honest.copy()
    lg.checkpoints[size] = lg.checkpoints[size].replace(f"\n{size}\n", f"\n{size + 1}\n", 1)
    e = _fails(lg)
    assert str(e).startswith(f"checkpoint {size}:") and "bad signature by known key" in str(e)


def test_a_whole_ledger_by_another_coordinator_fails_the_pinned_key(honest: Honest) -> None:
    impostor = Identity.generate()
    e = _fails(honest.copy(), key=impostor.public_hex)
    assert e.seq == 0 and "not the key you trust" in str(e), e


# ---- what the coordinator publishes ------------------------------------------------------------


@pytest.mark.parametrize("what", ["claimable", "shares", "status", "identity", "root"])
def test_published_state_that_differs_from_the_replay_is_named(
    honest: Honest, what: str, tmp_path: Path
) -> None:
    lg = honest.copy()
    pub = lg.published
    assert pub is not None
    n1, bad, t = honest.key("n1"), honest.key("bad"), honest.task
    if what == "claimable":
        was = pub["accounts"][n1]["claimable"]
        pub["accounts"][n1]["claimable"] = was + 1000
        needle = f"accounts.{n1}.claimable: published {was + 1000}, the ledger says {was}"
    elif what == "shares":
        pub["tasks"][t]["shares"][n1] += 1
        needle = f"tasks.{t}.shares.{n1}: published 8, the ledger says 7"
    elif what == "status":
        pub["members"][f"{t}/{bad}"]["status"] = "healthy"
        needle = f"members.{t}/{bad}.status: published 'healthy', the ledger says 'ejected'"
    elif what == "identity":
        del pub["identities"][bad]
        needle = f"identities.{bad}: only the ledger has it"
    else:  # the state root it publishes beside the state
        was = pub["root"]
        pub["root"] = hashlib.sha256(b"another state").hexdigest()
        needle = f"root: published '{pub['root']}', the ledger says '{was}'"
    e = _fails(lg)
    assert "published state" in str(e) and needle in str(e), e
    if what == "claimable":
        _cli_failed(_cli_audit(lg, tmp_path), needle)


# ---- a malicious operator edits a live coordinator's database ----------------------------------


@contextlib.contextmanager
def _operator(url: str) -> Iterator[Any]:
    """A connection of the operator's own to the coordinator's database (SQLite file or
    PostgreSQL), beside the coordinator's; one transaction."""
    engine = sqlalchemy.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://"), poolclass=sqlalchemy.NullPool
    )
    try:
        with engine.begin() as conn:
            yield lambda sql, **params: conn.execute(sqlalchemy.text(sql), params)
    finally:
        engine.dispose()


async def _cli_async(*args: str, timeout_s: float = 150) -> tuple[int, str]:
    """``cotrain audit ARGS`` without blocking the loop that serves the coordinator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cotrain", "audit", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _small_ledger(url: str) -> dict[str, Any]:
    """A task, two nodes with accepted work and a claim; name -> seq."""
    named = await ph.identities(url, init=["initiator"], v=["validator"], a=["node"], b=["node"])
    c = {name: cl for name, (_, cl) in named.items()}
    try:
        v = named["v"][0].public_hex
        t = (
            await c["init"].write(
                "/v1/tasks",
                {
                    "name": "live",
                    "kind": "rl",
                    "budget": 1000,
                    "rate_per_unit": 3,
                    "lock_s": 0,
                    "admission": "open",
                    "validators": [v],
                },
            )
        )["task"]
        await c["init"].write(f"/v1/tasks/{t}/open", {})
        seqs: dict[str, Any] = {"task": t, "a": named["a"][0].public_hex}
        for n in ("a", "b"):
            await c[n].write(f"/v1/tasks/{t}/join", {})
            key = _work_key(f"live-{n}")
            got = await c[n].write(
                f"/v1/tasks/{t}/work", {"work_key": key, "kind": "units", "units": 4}
            )
            seqs[f"work:{n}"] = got["seq"]
            await c["v"].write(f"/v1/tasks/{t}/verdicts", {"work_key": key, "verdict": "accept"})
        seqs["claim:a"] = (await c["a"].write("/v1/claims", {"amount": 5}))["seq"]
        return seqs
    finally:
        for cl in c.values():
            await cl.close()


def test_live_database_row_altered_is_named(tmp_path: Path, db_url: str) -> None:
    """UPDATE entries SET data=... for one row of a running coordinator's database (its SQLite
    file, or PostgreSQL): the coordinator serves the altered bytes, and ``cotrain audit URL``
    names that entry."""

    async def main() -> None:
        cfg = ph.config(
            tmp_path, db_url, checkpoint_every=CHECKPOINT_EVERY, checkpoint_interval_s=3600
        )
        async with ph.running(cfg) as (url, _coord):
            seqs = await _small_ledger(url)
            code, out = await _cli_async(url, "--cache", "")
            assert code == 0 and "audit ok" in out, out
            seq = seqs["work:b"]
            with _operator(cfg.db) as sql:
                data = bytes(sql("SELECT data FROM entries WHERE seq = :s", s=seq).scalar_one())
                sql("UPDATE entries SET data = :d WHERE seq = :s", d=_edit(data, units=400), s=seq)
            code, out = await _cli_async(url, "--cache", "")
            assert code == 1, out
            assert f"AUDIT FAILED: entry {seq}: is not signed by its author" in out, out
            # put it back and delete another row instead
            with _operator(cfg.db) as sql:
                sql("UPDATE entries SET data = :d WHERE seq = :s", d=data, s=seq)
                sql("DELETE FROM entries WHERE seq = :s", s=seqs["work:a"])
            code, out = await _cli_async(url, "--cache", "")
            assert code == 1 and f"AUDIT FAILED: entry {seqs['work:a']}: says it is" in out, out

    asyncio.run(main())


def test_live_database_state_altered_is_named(tmp_path: Path, db_url: str) -> None:
    """The operator edits the stored state (an account's claims) and restarts the coordinator,
    which loads it: what it publishes differs from the replay of its own ledger, by name."""

    async def main() -> None:
        cfg = ph.config(
            tmp_path, db_url, checkpoint_every=CHECKPOINT_EVERY, checkpoint_interval_s=3600
        )
        async with ph.running(cfg) as (url, _coord):
            seqs = await _small_ledger(url)
        a = seqs["a"]
        with _operator(cfg.db) as sql:
            oid = f"account/{a}"
            obj = json.loads(sql("SELECT data FROM objects WHERE oid = :o", o=oid).scalar_one())
            assert obj["claimed"] == 5
            obj["claimed"] = 0
            sql("UPDATE objects SET data = :d WHERE oid = :o", d=json.dumps(obj), o=oid)
        async with ph.running(cfg) as (url, _coord):
            code, out = await _cli_async(url, "--cache", "")
            assert code == 1, out
            assert "published state" in out and f"accounts.{a}.claimed: published 0" in out, out

    asyncio.run(main())
