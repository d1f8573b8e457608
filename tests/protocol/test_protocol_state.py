"""The reducer (``state.State``) without HTTP: every write kind and every rule that refuses one.

A ``Book`` signs writes with real keys and applies them at a clock the test sets, as the
coordinator and the auditor do. Every refusal is checked to change nothing (``refuse``); a
seeded random walk of thousands of writes checks the money invariants after every entry, and
that replaying its entries, or reloading its stored objects, gives the same state.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
from dataclasses import dataclass
from typing import Any

import pytest

from cotrain.core.identity import Identity
from cotrain.protocol import auth
from cotrain.protocol.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ProtocolError,
    RequestError,
)
from cotrain.protocol.state import ACTIVE, BUCKETS, MemoryWork, State, Unit

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000
WINDOW_MS = 60_000


def wk(n: int | str) -> str:
    """A work key (any 64 hex)."""
    return f"{n:0>64}" if isinstance(n, str) else f"{n:064x}"


class CountingWork(MemoryWork):
    """Work units in a dict, counting writes (a refused write must make none)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, unit: Unit) -> None:
        super().put(unit)
        self.puts += 1


class Book:
    """A ``State`` fed signed writes at ``now`` (unix ms), entry after entry."""

    def __init__(self) -> None:
        self.coord = Identity.generate()
        self.state = State(CountingWork())
        self.now = T0
        self.log: list[tuple[int, auth.SignedRequest]] = []
        """The entries: (time, request)."""
        self.attempts: list[list[Any]] = []
        """Every write tried: [time, request, its result or the refusal's message]."""
        self.write(
            self.coord,
            "/v1/genesis",
            {"origin": "test.ledger", "coordinator": self.coord.public_hex, "window_ms": WINDOW_MS},
            method="LEDGER",
        )

    def sign(
        self, who: Identity, path: str, body: dict[str, Any] | None = None, **kw: Any
    ) -> auth.SignedRequest:
        method = kw.pop("method", "POST")
        return auth.sign(who, method, path, body or {}, ts_ms=self.now, **kw)

    def write(self, who: Identity, path: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        req = self.sign(who, path, body, **kw)
        attempt: list[Any] = [self.now, req, None]
        self.attempts.append(attempt)
        try:
            result = self.state.apply(self.state.size, self.now, req).result
        except ProtocolError as e:
            attempt[2] = f"{type(e).__name__}: {e}"
            raise
        attempt[2] = result
        self.log.append((self.now, req))
        return result

    def snapshot(self) -> dict[str, Any]:
        """Everything a write could change: the view, the stored objects, the node index and
        the work store's write count."""
        st = self.state
        assert isinstance(st.work, CountingWork)
        return {
            "view": st.view(),
            "objects": dict(st.objects(st.all_ids())),
            "by_node": copy.deepcopy(st.by_node),
            "work_puts": st.work.puts,
            "work_units": len(st.work.units),
        }

    def refuse(
        self,
        error: type[ProtocolError],
        who: Identity,
        path: str,
        body: dict[str, Any] | None = None,
        **kw: Any,
    ) -> str:
        """Apply a write that must be refused with ``error``; check it changed nothing."""
        before = self.snapshot()
        with pytest.raises(error) as info:
            self.write(who, path, body, **kw)
        assert self.snapshot() == before
        return str(info.value)

    # ---- conveniences ----------------------------------------------------------------------

    def identity(self, *roles: str, name: str = "someone") -> Identity:
        ident = Identity.generate()
        self.write(ident, "/v1/identities", {"roles": list(roles), "name": name})
        return ident

    def publish(self, who: Identity, **over: Any) -> str:
        body: dict[str, Any] = {
            "name": "task",
            "kind": "diloco",
            "budget": 10_000,
            "rate_per_unit": 5,
            "validator_fee": 1,
            "lock_s": 2400,
            "admission": "invite",
        }
        body.update(over)
        return str(self.write(who, "/v1/tasks", body)["task"])

    def invite(
        self, who: Identity, task: str, node: Identity | None = None, ttl_s: int = 600
    ) -> str:
        body: dict[str, Any] = {"ttl_s": ttl_s}
        if node is not None:
            body["node"] = node.public_hex
        return str(self.write(who, f"/v1/tasks/{task}/invites", body)["invite"])

    def join(self, node: Identity, task: str, invite: str | None = None) -> Any:
        return self.write(node, f"/v1/tasks/{task}/join", {"invite": invite} if invite else {})

    def work(
        self, node: Identity, task: str, key: str, units: int = 10, kind: str = "units"
    ) -> Any:
        body = {"work_key": key, "kind": kind, "units": units}
        return self.write(node, f"/v1/tasks/{task}/work", body)

    def verdict(self, v: Identity, task: str, key: str, verdict: str, reason: str = "") -> Any:
        body = {"work_key": key, "verdict": verdict, "reason": reason}
        return self.write(v, f"/v1/tasks/{task}/verdicts", body)

    def status(self, task: str, node: Identity, status: str) -> Any:
        path = f"/v1/tasks/{task}/members/{node.public_hex}"
        return self.write(self.coord, path, {"status": status}, method="LEDGER")

    def member(self, task: str, node: Identity) -> dict[str, Any]:
        return self.state.view()["members"][f"{task}/{node.public_hex}"]

    def account(self, who: Identity, at_ms: int | None = None) -> dict[str, Any]:
        return self.state.account_view(who.public_hex, self.now if at_ms is None else at_ms)

    def task(self, task: str) -> dict[str, Any]:
        return self.state.view()["tasks"][task]


@dataclass
class Market:
    """A book with an initiator, three validators (quorum 2), three nodes and one open task."""

    book: Book
    init: Identity
    vals: list[Identity]
    nodes: list[Identity]
    task: str


@pytest.fixture
def market() -> Market:
    b = Book()
    init = b.identity("initiator", name="init")
    vals = [b.identity("validator", name=f"v{i}") for i in range(3)]
    nodes = [b.identity("node", name=f"n{i}") for i in range(3)]
    task = b.publish(
        init,
        validators=[v.public_hex for v in vals],
        weights={"units": 1, "rollouts": 2},
        max_units=1000,
    )
    b.write(init, f"/v1/tasks/{task}/open")
    for n in nodes:
        b.join(n, task, b.invite(init, task, n))
    return Market(b, init, vals, nodes, task)


# ---- the ledger's own rules -----------------------------------------------------------------


def test_genesis_sequence_and_time() -> None:
    st = State()
    coord, other = Identity.generate(), Identity.generate()

    def sign(who: Identity, method: str, path: str, body: dict[str, Any], ts: int = T0) -> Any:
        return auth.sign(who, method, path, body, ts_ms=ts)

    reg = sign(other, "POST", "/v1/identities", {"roles": ["node"], "name": "n"})
    with pytest.raises(Conflict, match="genesis"):
        st.apply(0, T0, reg)
    body = {"origin": "o", "coordinator": coord.public_hex, "window_ms": WINDOW_MS}
    with pytest.raises(Forbidden, match="signed by the coordinator"):
        st.apply(0, T0, sign(other, "LEDGER", "/v1/genesis", body))
    with pytest.raises(RequestError, match="window_ms"):
        st.apply(0, T0, sign(coord, "LEDGER", "/v1/genesis", {**body, "window_ms": 10}))
    assert st.size == 0 and st.coordinator == ""
    st.apply(0, T0, sign(coord, "LEDGER", "/v1/genesis", body))
    assert (st.size, st.coordinator, st.origin) == (1, coord.public_hex, "o")
    with pytest.raises(Conflict, match="one genesis"):
        st.apply(1, T0, sign(coord, "LEDGER", "/v1/genesis", body))
    with pytest.raises(Conflict, match="applied to a state of 1"):
        st.apply(2, T0, reg)
    with pytest.raises(Conflict, match="before the previous"):
        st.apply(1, T0 - 1, reg)
    # an entry's time is within twice the clock window of its request's signed time
    for skew in (2 * WINDOW_MS + 1, -2 * WINDOW_MS - 1):
        late = sign(other, "POST", "/v1/identities", {"roles": ["node"], "name": "n"}, T0 + skew)
        with pytest.raises(Conflict, match="clock window"):
            st.apply(1, T0 + max(0, 2 * skew), late)
    assert st.size == 1
    st.apply(1, T0, reg)  # the same time as the entry before is fine
    edge = sign(other, "POST", "/v1/identities", {"roles": ["node"], "name": "m"}, T0)
    st.apply(2, T0 + 2 * WINDOW_MS, edge)
    assert st.size == 3


def test_unknown_writes_and_bad_bodies_are_refused() -> None:
    b = Book()
    n = b.identity("node")
    assert "no write" in b.refuse(NotFound, n, "/v1/nothing")
    assert "no write" in b.refuse(NotFound, n, "/v1/genesis")  # POST: not the ledger's own
    b.refuse(RequestError, n, "/v1/identities", {"roles": [], "name": "x"})
    b.refuse(RequestError, n, "/v1/identities", {"roles": ["node", "node"], "name": "x"})
    b.refuse(RequestError, n, "/v1/identities", {"roles": ["king"], "name": "x"})
    b.refuse(RequestError, n, "/v1/identities", {"roles": ["node"], "name": " leading space"})
    b.refuse(RequestError, n, "/v1/identities", {"roles": ["node"], "name": "x", "extra": 1})
    big = {"roles": ["node"], "name": "x", "specs": {"blob": "x" * 3000}}
    assert "specs" in b.refuse(RequestError, n, "/v1/identities", big)
    # someone else may not speak for the coordinator
    b.refuse(
        Forbidden, n, f"/v1/tasks/t1/members/{n.public_hex}", {"status": "dead"}, method="LEDGER"
    )


# ---- identities and roles -------------------------------------------------------------------


def test_roles() -> None:
    b = Book()
    nobody = Identity.generate()
    node = b.identity("node")
    val = b.identity("validator")
    init = b.identity("initiator", "node")
    assert "not registered as a initiator" in b.refuse(
        Forbidden, nobody, "/v1/tasks", {"name": "x", "kind": "rl", "budget": 1, "rate_per_unit": 1}
    )
    b.refuse(
        Forbidden, node, "/v1/tasks", {"name": "x", "kind": "rl", "budget": 1, "rate_per_unit": 1}
    )
    publish = {"name": "x", "kind": "rl", "budget": 1, "rate_per_unit": 1}
    msg = b.refuse(RequestError, init, "/v1/tasks", {**publish, "validators": [node.public_hex]})
    assert "not registered as a validator" in msg
    msg = b.refuse(
        RequestError, init, "/v1/tasks", {**publish, "validators": [val.public_hex], "quorum": 2}
    )
    assert "quorum 2 is more than the 1 validators" in msg
    b.refuse(RequestError, init, "/v1/tasks", {**publish, "validators": [val.public_hex] * 2})
    # default quorum: two thirds of the validators, rounded up; one without validators
    vals = [b.identity("validator") for _ in range(4)]
    for n, quorum in ((0, 1), (1, 1), (2, 2), (3, 2), (4, 3)):
        t = b.publish(init, validators=[v.public_hex for v in vals[:n]])
        assert b.task(t)["quorum"] == quorum
    t = b.publish(init, admission="open")
    b.write(init, f"/v1/tasks/{t}/open")
    b.refuse(Forbidden, val, f"/v1/tasks/{t}/join")  # a validator is not a node
    b.refuse(Forbidden, nobody, f"/v1/tasks/{t}/join")
    b.join(init, t)  # an initiator that is also a node may work on its own task
    # registering again replaces the roles
    b.write(node, "/v1/identities", {"roles": ["initiator"], "name": "changed"})
    assert b.state.view()["identities"][node.public_hex]["roles"] == ["initiator"]
    b.refuse(Forbidden, node, f"/v1/tasks/{t}/join")


# ---- tasks ----------------------------------------------------------------------------------

ALLOWED = {
    "open": {"published", "paused"},
    "pause": {"open"},
    "finalize": {"open", "paused"},
    "cancel": {"published", "open", "paused"},
}
TO_STATE = {  # how to bring a fresh task into each state
    "published": [],
    "open": ["open"],
    "paused": ["open", "pause"],
    "finalized": ["open", "finalize"],
    "cancelled": ["cancel"],
}
RESULT = {"open": "open", "pause": "paused", "finalize": "finalized", "cancel": "cancelled"}


@pytest.mark.parametrize("start", sorted(TO_STATE))
@pytest.mark.parametrize("action", sorted(ALLOWED))
def test_task_state_machine(start: str, action: str) -> None:
    b = Book()
    init = b.identity("initiator")
    other = b.identity("initiator")
    t = b.publish(init)
    for step in TO_STATE[start]:
        b.write(init, f"/v1/tasks/{t}/{step}")
    assert b.task(t)["state"] == start
    b.refuse(Forbidden, other, f"/v1/tasks/{t}/{action}")
    b.refuse(NotFound, init, f"/v1/tasks/t999/{action}")
    if start in ALLOWED[action]:
        b.write(init, f"/v1/tasks/{t}/{action}")
        assert b.task(t)["state"] == RESULT[action]
    else:
        assert f"it is {start}" in b.refuse(Conflict, init, f"/v1/tasks/{t}/{action}")


# ---- invites and admission ------------------------------------------------------------------


def test_invites(market: Market) -> None:
    b, init, t = market.book, market.init, market.task
    a, c = b.identity("node", name="a"), b.identity("node", name="c")
    path = f"/v1/tasks/{t}/join"
    assert "admits by invite" in b.refuse(Forbidden, a, path)
    assert "no invite" in b.refuse(Forbidden, a, path, {"invite": "0" * 32})
    b.refuse(Forbidden, market.nodes[0], f"/v1/tasks/{t}/invites", {"ttl_s": 10})  # not its task
    # single use
    inv = b.invite(init, t)
    b.join(a, t, inv)
    assert "already used" in b.refuse(Forbidden, c, path, {"invite": inv})
    assert b.state.invites[inv].used_by == a.public_hex
    # bound to a key: the wrong key is refused and the invite stays usable
    inv = b.invite(init, t, c)
    d = b.identity("node", name="d")
    assert "another key" in b.refuse(Forbidden, d, path, {"invite": inv})
    b.join(c, t, inv)
    # expiry: usable up to and including expires_ms
    inv = b.invite(init, t, ttl_s=10)
    expires = b.state.invites[inv].expires_ms
    assert expires == b.now + 10_000
    b.now = expires + 1
    assert "expired" in b.refuse(Forbidden, d, path, {"invite": inv})
    inv = b.invite(init, t, ttl_s=10)
    b.now += 10_000
    b.join(d, t, inv)
    # an invite to another task does not open this one
    t2 = b.publish(init)
    inv2 = b.invite(init, t2)  # invites may be made before the task opens
    e = b.identity("node", name="e")
    assert f"no invite {inv2} for {t}" in b.refuse(Forbidden, e, path, {"invite": inv2})
    assert "cannot join" in b.refuse(Conflict, e, f"/v1/tasks/{t2}/join", {"invite": inv2})
    # the invite id is the signed request's nonce: the same one twice is refused
    nonce = "ab" * 16
    b.write(init, f"/v1/tasks/{t}/invites", {}, nonce=nonce)
    assert "exists" in b.refuse(Conflict, init, f"/v1/tasks/{t}/invites", {}, nonce=nonce)
    # no invites to a task that is over
    b.write(init, f"/v1/tasks/{t2}/cancel")
    assert "cannot invite to" in b.refuse(Conflict, init, f"/v1/tasks/{t2}/invites", {})
    b.refuse(NotFound, init, "/v1/tasks/t424242/invites", {})


def test_open_admission() -> None:
    b = Book()
    init = b.identity("initiator")
    n = b.identity("node")
    t = b.publish(init, admission="open")
    assert "cannot join" in b.refuse(Conflict, n, f"/v1/tasks/{t}/join")  # not open yet
    b.write(init, f"/v1/tasks/{t}/open")
    assert b.join(n, t) == {"task": t, "status": "joined"}
    assert "already a member" in b.refuse(Conflict, n, f"/v1/tasks/{t}/join")
    b.write(init, f"/v1/tasks/{t}/pause")
    m = b.identity("node")
    b.refuse(Conflict, m, f"/v1/tasks/{t}/join")  # paused tasks take nobody


def test_member_lifecycle_and_rejoin(market: Market) -> None:
    b, init, t = market.book, market.init, market.task
    a, c, d = market.nodes
    # heartbeats' transitions, recorded by the coordinator
    for s in ("healthy", "unhealthy", "healthy", "unhealthy", "dead"):
        assert b.status(t, a, s)["status"] == s
    path = f"/v1/tasks/{t}/members/{a.public_hex}"
    b.refuse(Forbidden, b.coord, path, {"status": "healthy"}, method="LEDGER")  # dead: rejoin first
    b.refuse(RequestError, b.coord, path, {"status": "joined"}, method="LEDGER")
    b.refuse(Forbidden, a, f"/v1/tasks/{t}/work", {"work_key": wk(1), "kind": "units", "units": 1})
    b.refuse(Forbidden, a, f"/v1/tasks/{t}/leave")
    b.refuse(Forbidden, a, f"/v1/tasks/{t}/join")  # invite admission: a dead node needs a new one
    b.join(a, t, b.invite(init, t, a))
    assert b.member(t, a)["status"] == "joined"
    # leave, then back: the same record, its credit keeps maturing
    b.work(c, t, wk(2))
    b.verdict(market.vals[0], t, wk(2), "accept")
    locked = b.member(t, c)["locked"]
    assert locked == 50
    b.write(c, f"/v1/tasks/{t}/leave")
    assert b.member(t, c)["status"] == "left"
    b.refuse(Forbidden, c, f"/v1/tasks/{t}/leave")
    b.refuse(
        Forbidden,
        b.coord,
        f"/v1/tasks/{t}/members/{c.public_hex}",
        {"status": "dead"},
        method="LEDGER",
    )
    b.join(c, t, b.invite(init, t))
    m = b.member(t, c)
    assert (m["status"], m["locked"], m["accepted_units"]) == ("joined", 50, 10)
    assert b.state.by_node[c.public_hex] == [t]
    b.refuse(
        NotFound,
        b.coord,
        f"/v1/tasks/{t}/members/{d.public_hex}0",
        {"status": "dead"},
        method="LEDGER",
    )
    outsider = Identity.generate()
    b.refuse(
        Forbidden,
        b.coord,
        f"/v1/tasks/{t}/members/{outsider.public_hex}",
        {"status": "dead"},
        method="LEDGER",
    )


# ---- work -----------------------------------------------------------------------------------


def test_work_rules(market: Market) -> None:
    b, init, t = market.book, market.init, market.task
    a, c, _ = market.nodes
    path = f"/v1/tasks/{t}/work"
    assert b.work(a, t, wk(1), units=7) == {"work_key": wk(1), "state": "submitted"}
    assert b.work(a, t, wk(2), units=1000, kind="rollouts")["state"] == "submitted"
    assert "already submitted" in b.refuse(
        Conflict, a, path, {"work_key": wk(1), "kind": "units", "units": 1}
    )
    b.refuse(Conflict, c, path, {"work_key": wk(1), "kind": "units", "units": 1})  # by anyone
    assert "takes work of kinds" in b.refuse(
        RequestError, a, path, {"work_key": wk(3), "kind": "tokens", "units": 1}
    )
    assert "over t" in b.refuse(
        RequestError, a, path, {"work_key": wk(3), "kind": "units", "units": 1001}
    )
    b.refuse(RequestError, a, path, {"work_key": wk(3), "kind": "units", "units": 0})
    b.refuse(RequestError, a, path, {"work_key": wk(3), "kind": "units", "units": 1.5})
    b.refuse(RequestError, a, path, {"work_key": "XYZ", "kind": "units", "units": 1})
    b.refuse(
        RequestError,
        a,
        path,
        {"work_key": wk(3), "kind": "units", "units": 1, "meta": {"x": "y" * 3000}},
    )
    stranger = b.identity("node")
    assert "not a member" in b.refuse(
        Forbidden, stranger, path, {"work_key": wk(3), "kind": "units", "units": 1}
    )
    b.refuse(NotFound, a, "/v1/tasks/t9999/work", {"work_key": wk(3), "kind": "units", "units": 1})
    b.write(init, f"/v1/tasks/{t}/pause")
    assert "cannot submit work to" in b.refuse(
        Conflict, a, path, {"work_key": wk(3), "kind": "units", "units": 1}
    )
    b.write(init, f"/v1/tasks/{t}/open")
    b.work(a, t, wk(3), units=1)
    m, task = b.member(t, a), b.task(t)
    assert (m["submitted_units"], task["submitted_units"]) == (1008, 1008)
    unit = b.state.work.get(wk(1))
    assert unit is not None and (unit.node, unit.task, unit.units, unit.kind) == (
        a.public_hex,
        t,
        7,
        "units",
    )


# ---- verdicts and money ---------------------------------------------------------------------


def test_verdict_rules(market: Market) -> None:
    b, init, t = market.book, market.init, market.task
    a, c, _ = market.nodes
    v0, v1, v2 = market.vals
    path = f"/v1/tasks/{t}/verdicts"
    b.work(a, t, wk(1))
    outsider = b.identity("validator", name="outsider")
    vote = {"work_key": wk(1), "verdict": "accept"}
    assert "not a validator of" in b.refuse(Forbidden, outsider, path, vote)
    b.refuse(Forbidden, a, path, vote)  # nobody judges their own work unless a validator
    b.refuse(Forbidden, init, path, vote)
    assert "no work" in b.refuse(NotFound, v0, path, {**vote, "work_key": wk(99)})
    b.refuse(RequestError, v0, path, {**vote, "verdict": "maybe"})
    b.refuse(RequestError, v0, path, {**vote, "reason": "x" * 301})
    # work of another task is not found through this one
    t2 = b.publish(init, validators=[v0.public_hex], admission="open")
    b.write(init, f"/v1/tasks/{t2}/open")
    b.join(c, t2)
    b.work(c, t2, wk(2))
    b.refuse(NotFound, v0, path, {**vote, "work_key": wk(2)})
    b.refuse(Forbidden, v1, f"/v1/tasks/{t2}/verdicts", {**vote, "work_key": wk(2)})
    # one vote per validator
    b.verdict(v0, t, wk(1), "accept")
    assert "already judged" in b.refuse(Conflict, v0, path, {**vote, "verdict": "soft_reject"})
    # a final unit takes no more verdicts
    b.verdict(v1, t, wk(1), "soft_reject")
    assert "is final (soft_rejected)" in b.refuse(Conflict, v2, path, vote)
    # nor does a unit whose lock matured
    b.work(a, t, wk(3))
    b.verdict(v0, t, wk(3), "accept")
    b.now = b.state.work.get(wk(3)).unlock_ms  # type: ignore[union-attr]
    assert "is final (accepted)" in b.refuse(
        Conflict, v1, path, {**vote, "work_key": wk(3), "verdict": "soft_reject"}
    )
    # a cancelled task takes no verdicts; a published one has no work
    b.work(c, t2, wk(4))
    b.write(init, f"/v1/tasks/{t2}/cancel")
    assert "cannot judge work of" in b.refuse(
        Conflict, v0, f"/v1/tasks/{t2}/verdicts", {**vote, "work_key": wk(4)}
    )


def test_accept_locks_credit_until_the_window_ends(market: Market) -> None:
    b, t = market.book, market.task
    a = market.nodes[0]
    v0 = market.vals[0]
    lock_ms = 2400 * 1000
    width = lock_ms // BUCKETS
    b.now = T0 + 12_345  # not on a bucket boundary
    b.work(a, t, wk(1), units=10)
    out = b.verdict(v0, t, wk(1), "accept")
    assert out == {"work_key": wk(1), "state": "accepted", "member": "joined", "fee": 1}
    unit = b.state.work.get(wk(1))
    assert unit is not None
    unlock = -(-(b.now + lock_ms) // width) * width  # rounded up to the bucket boundary
    assert (unit.credit, unit.weighted, unit.unlock_ms) == (50, 10, unlock)
    task = b.task(t)
    assert (task["left"], task["credited"], task["fees"], task["accepted_units"]) == (
        10_000 - 51,
        50,
        1,
        10,
    )
    m = b.member(t, a)
    assert (m["locked"], m["earned"], m["weight"], m["locked_weight"]) == (50, 0, 10, 10)
    assert b.account(a) == {"key": a.public_hex, "claimable": 0, "locked": 50, "claimed": 0}
    assert b.account(v0)["claimable"] == 1  # the fee is the validator's at once
    assert b.account(a, unlock - 1)["claimable"] == 0
    assert b.account(a, unlock) == {"key": a.public_hex, "claimable": 50, "locked": 0, "claimed": 0}
    # claims: never over what is claimable at the entry's time
    claim = "/v1/claims"
    assert "over the 0 claimable" in b.refuse(Conflict, a, claim, {"amount": 1})
    b.now = unlock
    assert "over the 50 claimable" in b.refuse(Conflict, a, claim, {"amount": 51})
    b.refuse(RequestError, a, claim, {"amount": 0})
    assert b.write(a, claim, {"amount": 20}) == {"claimed": 20, "claimable": 30}
    b.write(a, claim, {"amount": 30})
    b.refuse(Conflict, a, claim, {"amount": 1})
    assert b.account(a) == {"key": a.public_hex, "claimable": 0, "locked": 0, "claimed": 50}
    m = b.member(t, a)
    assert (m["earned"], m["locked"], m["weight"], m["locked_weight"]) == (50, 0, 10, 0)
    b.write(v0, claim, {"amount": 1})
    assert b.state.tasks[t].balanced()


def test_buckets_stay_few(market: Market) -> None:
    """However many units a node submits, its locked credit is at most ``BUCKETS`` numbers."""
    b, t = market.book, market.task
    a, v0 = market.nodes[0], market.vals[0]
    for i in range(100):
        b.now += 2400 * 1000 // 50  # two units per bucket width
        b.work(a, t, wk(i), units=1)
        b.verdict(v0, t, wk(i), "accept")
        assert len(b.state.members[(t, a.public_hex)].locked) <= BUCKETS + 1
    m = b.member(t, a)
    assert m["earned"] + m["locked"] == 500


def test_soft_reject_returns_the_credit(market: Market) -> None:
    b, t = market.book, market.task
    a = market.nodes[0]
    v0, v1 = market.vals[:2]
    b.work(a, t, wk(1), units=10)
    b.work(a, t, wk(2), units=4)
    b.verdict(v0, t, wk(1), "accept")
    b.verdict(v0, t, wk(2), "accept")
    out = b.verdict(v1, t, wk(1), "soft_reject", reason="loss went up")
    assert out == {"work_key": wk(1), "state": "soft_rejected", "member": "joined", "fee": 1}
    m, task = b.member(t, a), b.task(t)
    assert (m["locked"], m["weight"], m["accepted_units"], m["rejected_units"]) == (20, 4, 4, 10)
    assert (task["left"], task["credited"], task["fees"], task["accepted_units"]) == (
        10_000 - 23,
        20,
        3,
        4,
    )
    assert b.state.work.get(wk(1)).reason == "loss went up"  # type: ignore[union-attr]
    # a soft reject of work nobody accepted yet: no credit moves, the unit is final
    b.work(a, t, wk(3))
    b.verdict(v1, t, wk(3), "soft_reject")
    assert b.state.work.get(wk(3)).state == "soft_rejected"  # type: ignore[union-attr]
    assert b.member(t, a)["status"] == "joined"  # a soft reject never ejects
    assert b.state.tasks[t].balanced()


def test_hard_reject_needs_the_quorum_and_forfeits_all_locked_credit(market: Market) -> None:
    b, init, t = market.book, market.init, market.task
    a, c, _ = market.nodes
    v0, v1, v2 = market.vals
    lock_ms = 2400 * 1000
    b.work(a, t, wk(1), units=10)
    b.verdict(v0, t, wk(1), "accept")
    b.now += lock_ms + HOUR_MS  # unit 1 matures: it is the node's for good
    b.work(a, t, wk(2), units=10)
    b.work(a, t, wk(3), units=20)
    b.work(a, t, wk(4), units=1)
    b.work(c, t, wk(5), units=3)
    for k in (2, 3, 5):
        b.verdict(v0, t, wk(k), "accept")
    assert b.member(t, a)["locked"] == 150
    assert b.account(a)["claimable"] == 50
    left_before = b.task(t)["left"]
    # one hard reject is a vote, not a verdict
    out = b.verdict(v1, t, wk(3), "hard_reject", reason="forged gradient")
    assert (out["state"], out["member"]) == ("accepted", "joined")
    assert b.member(t, a)["locked"] == 150
    # the second reaches the quorum of 2: all locked credit of the node goes back to the task
    out = b.verdict(v2, t, wk(3), "hard_reject")
    assert (out["state"], out["member"]) == ("hard_rejected", "ejected")
    m = b.member(t, a)
    assert (m["status"], m["locked"], m["earned"], m["weight"]) == ("ejected", 0, 50, 10)
    assert m["forfeited"] == 50  # unit 2's credit; unit 3's was taken back as the rejected unit
    assert m["accepted_units"] == 10  # unit 1 (matured); units 2 and 3 no longer count
    task = b.task(t)
    assert task["left"] == left_before + 150 - 2  # minus the two validators' fees
    assert task["forfeited"] == 50
    assert b.account(a)["claimable"] == 50  # matured credit is kept
    # validators earned their fees and nothing else: slashing pays nobody
    assert [b.account(v)["claimable"] for v in (v0, v1, v2)] == [4, 1, 1]
    # the ejected node: no work, no rejoin, its pending work cannot be accepted
    b.refuse(Forbidden, a, f"/v1/tasks/{t}/work", {"work_key": wk(6), "kind": "units", "units": 1})
    assert "was ejected" in b.refuse(
        Forbidden, a, f"/v1/tasks/{t}/join", {"invite": b.invite(init, t, a)}
    )
    assert "was ejected" in b.refuse(
        Conflict, v0, f"/v1/tasks/{t}/verdicts", {"work_key": wk(4), "verdict": "accept"}
    )
    b.refuse(Conflict, v0, f"/v1/tasks/{t}/verdicts", {"work_key": wk(4), "verdict": "drop"})
    b.verdict(v0, t, wk(4), "soft_reject")  # rejecting it is still fine
    # the other node is untouched
    assert b.member(t, c)["locked"] == 15 and b.member(t, c)["status"] == "joined"
    # a matured unit cannot be clawed back
    b.refuse(Conflict, v1, f"/v1/tasks/{t}/verdicts", {"work_key": wk(1), "verdict": "hard_reject"})
    assert b.state.tasks[t].balanced()


def test_hard_reject_quorum_of_one() -> None:
    b = Book()
    init, v = b.identity("initiator"), b.identity("validator")
    n = b.identity("node")
    t = b.publish(init, validators=[v.public_hex], quorum=1, admission="open")
    b.write(init, f"/v1/tasks/{t}/open")
    b.join(n, t)
    b.work(n, t, wk(1))
    assert b.verdict(v, t, wk(1), "hard_reject")["member"] == "ejected"
    assert b.state.work.get(wk(1)).state == "hard_rejected"  # type: ignore[union-attr]


def test_drop_earns_credit_but_no_weight(market: Market) -> None:
    b, init, t = market.book, market.init, market.task
    a, c, _ = market.nodes
    v0 = market.vals[0]
    b.work(a, t, wk(1), units=10)
    b.work(c, t, wk(2), units=10)
    assert b.verdict(v0, t, wk(1), "drop", reason="state re-fetched")["state"] == "dropped"
    b.verdict(v0, t, wk(2), "accept")
    m = b.member(t, a)
    assert (m["locked"], m["weight"], m["accepted_units"]) == (50, 0, 0)
    assert b.state.shares(t)["weights"] == {c.public_hex: 10}
    # a dropped unit can still be rejected while it is locked
    b.verdict(market.vals[1], t, wk(1), "soft_reject")
    assert b.member(t, a)["locked"] == 0
    b.write(init, f"/v1/tasks/{t}/finalize")
    assert b.state.shares(t) == {
        "task": t,
        "frozen": True,
        "total": 10,
        "weights": {c.public_hex: 10},
    }


def test_finalize_freezes_shares_and_refunds(market: Market) -> None:
    b, init, t = market.book, market.init, market.task
    a, c, d = market.nodes
    v0, v1 = market.vals[:2]
    b.work(a, t, wk(1), units=10)  # weight 10
    b.work(c, t, wk(2), units=5, kind="rollouts")  # weight 10
    b.work(d, t, wk(3), units=30)  # never judged: no share
    b.verdict(v0, t, wk(1), "accept")
    b.verdict(v0, t, wk(2), "accept")
    b.now += 1000
    live = b.state.shares(t)
    assert live["frozen"] is False and live["weights"] == {a.public_hex: 10, c.public_hex: 10}
    out = b.write(init, f"/v1/tasks/{t}/finalize")
    assert out == {"task": t, "state": "finalized", "total_weight": 20}
    task = b.task(t)
    assert task["shares"] == {a.public_hex: 10, c.public_hex: 10}
    refund = 10_000 - 75 - 2
    assert (task["left"], task["refunded"]) == (0, refund)
    assert b.account(init)["claimable"] == refund
    # locked credit keeps maturing after finalize; shares stay frozen
    assert b.member(t, a)["locked"] == 50
    b.now += 2400 * 1000 + HOUR_MS
    assert b.account(a)["claimable"] == 50
    b.verdict(v1, t, wk(3), "accept")  # the budget is spent: no credit, no fee
    assert b.state.work.get(wk(3)).credit == 0  # type: ignore[union-attr]
    assert b.state.shares(t)["weights"] == {a.public_hex: 10, c.public_hex: 10}
    b.refuse(Conflict, d, f"/v1/tasks/{t}/work", {"work_key": wk(4), "kind": "units", "units": 1})
    b.refuse(Conflict, init, f"/v1/tasks/{t}/open")
    assert b.state.tasks[t].balanced()


def test_cancel_refunds_what_is_left() -> None:
    b = Book()
    init, v = b.identity("initiator"), b.identity("validator")
    n = b.identity("node")
    t1 = b.publish(init, budget=500)
    assert b.write(init, f"/v1/tasks/{t1}/cancel") == {
        "task": t1,
        "state": "cancelled",
        "refunded": 500,
    }
    t2 = b.publish(init, budget=1000, validators=[v.public_hex], admission="open", lock_s=60)
    b.write(init, f"/v1/tasks/{t2}/open")
    b.join(n, t2)
    b.work(n, t2, wk(1), units=10)
    b.verdict(v, t2, wk(1), "accept")
    out = b.write(init, f"/v1/tasks/{t2}/cancel")
    assert out["refunded"] == 1000 - 51
    assert b.account(init)["claimable"] == 500 + 949
    # the node keeps its locked credit: it matures as usual
    b.now += 61_000
    assert b.account(n)["claimable"] == 50
    b.refuse(Conflict, n, f"/v1/tasks/{t2}/work", {"work_key": wk(2), "kind": "units", "units": 1})
    assert all(task.balanced() for task in b.state.tasks.values())


def test_budget_caps_credit_and_fees() -> None:
    b = Book()
    init = b.identity("initiator")
    vs = [b.identity("validator") for _ in range(2)]
    n = b.identity("node")
    t = b.publish(
        init,
        budget=60,
        rate_per_unit=5,
        validator_fee=7,
        validators=[v.public_hex for v in vs],
        admission="open",
    )
    b.write(init, f"/v1/tasks/{t}/open")
    b.join(n, t)
    b.work(n, t, wk(1), units=10)
    b.work(n, t, wk(2), units=10)
    assert b.verdict(vs[0], t, wk(1), "accept")["fee"] == 7
    assert b.state.work.get(wk(1)).credit == 50  # type: ignore[union-attr]
    assert b.task(t)["left"] == 3
    assert b.verdict(vs[0], t, wk(2), "accept")["fee"] == 3
    assert b.state.work.get(wk(2)).credit == 0  # type: ignore[union-attr]
    assert b.task(t)["left"] == 0
    assert b.verdict(vs[1], t, wk(2), "accept")["fee"] == 0
    assert b.state.tasks[t].balanced()


# ---- a long random walk: the invariants after every entry -----------------------------------


class Walk:
    """Random writes over a small world: mostly plausible ones (a node of the task, a validator
    of the task, an unused invite), and a steady share that the rules must refuse."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.b = Book()
        b = self.b
        self.inits = [b.identity("initiator", name=f"i{i}") for i in range(2)]
        self.vals = [b.identity("validator", name=f"v{i}") for i in range(4)]
        self.nodes = [b.identity("node", name=f"n{i}") for i in range(6)]
        self.everyone = [*self.inits, *self.vals, *self.nodes]
        self.by_key = {i.public_hex: i for i in self.everyone}
        self.invites: list[str] = []
        self.work: list[tuple[str, str]] = []  # (task, key)
        self.counts: dict[str, int] = {}
        self.refused = 0
        self.last = self.snapshot()

    def pick(self, xs: list[Any]) -> Any:
        return self.rng.choice(xs)

    def likely(self, p: float = 0.85) -> bool:
        return self.rng.random() < p

    def snapshot(self) -> bytes:
        """All of the state as pickle bytes: ``Book.snapshot`` is too slow to take per step."""
        st = self.b.state
        assert isinstance(st.work, CountingWork)
        small = (st.identities, st.tasks, st.members, st.accounts, st.invites, st.by_node)
        return pickle.dumps((st.size, st.ts_ms, st.work.puts, small))

    def step(self) -> None:
        b, rng, st = self.b, self.rng, self.b.state
        tasks = sorted(st.tasks) or ["t1"]
        live = [t for t in tasks if st.tasks.get(t) and st.tasks[t].state == "open"]
        action = rng.choices(
            ["publish", "state", "invite", "join", "leave", "status", "work", "verdict", "claim"],
            weights=[2 if len(live) < 2 else 0.1, 2, 2, 6, 1, 3, 16, 16, 3],
        )[0]
        staffed = [t for t in live if any(tt == t for tt, _ in st.members)]
        if action in ("work", "leave", "status") and staffed and self.likely():
            live = staffed
        t = self.pick(live) if live and self.likely() else self.pick(tasks)
        task = st.tasks.get(t)
        members = [n for (tt, n), m in st.members.items() if tt == t and m.status in ACTIVE]
        b.now += rng.choice([0, 0, 0, 1, 1000, 60_000, 600_000, HOUR_MS // 2])
        method, body = "POST", {}
        if action == "publish":
            vals = rng.sample(self.vals, rng.randint(0 if self.likely(0.1) else 1, 4))
            body = {
                "name": "walk",
                "kind": "rl",
                "budget": rng.choice([0, 50, 1000, 100_000]),
                "rate_per_unit": rng.randint(0, 20),
                "validator_fee": rng.randint(0, 3),
                "lock_s": rng.choice([0, 60, 3600, 6 * 3600]),
                "admission": rng.choice(["open", "invite"]),
                "validators": [v.public_hex for v in vals],
                "weights": {"units": rng.randint(0, 3), "rollouts": 2},
                "max_units": rng.choice([50, 100]),
            }
            if vals and rng.random() < 0.5:
                body["quorum"] = rng.randint(1, len(vals) + 1)
            who, path = (
                (self.pick(self.inits) if self.likely() else self.pick(self.everyone)),
                "/v1/tasks",
            )
        elif action == "state":
            owner = self.by_key[task.initiator] if task else self.inits[0]
            who = owner if self.likely(0.9) else self.pick(self.inits)
            opening = task is not None and task.state in ("published", "paused")
            verbs, weights = ["open", "pause", "finalize", "cancel"], [8, 3, 0.5, 0.5]
            verb = "open" if opening and self.likely() else rng.choices(verbs, weights)[0]
            path = f"/v1/tasks/{t}/{verb}"
        elif action == "invite":
            who = self.by_key[task.initiator] if task and self.likely() else self.pick(self.inits)
            path = f"/v1/tasks/{t}/invites"
            body = {"ttl_s": rng.choice([1, 60, 86400])}
            if rng.random() < 0.5:
                body["node"] = self.pick(self.nodes).public_hex
        elif action == "join":
            outside = [n for n in self.nodes if n.public_hex not in members]
            who = self.pick(outside) if outside and self.likely() else self.pick(self.nodes)
            path = f"/v1/tasks/{t}/join"
            fitting = [
                i
                for i in self.invites
                if st.invites[i].task == t
                and st.invites[i].used_by is None
                and st.invites[i].node in (None, who.public_hex)
            ]
            if fitting and self.likely():
                body = {"invite": self.pick(fitting)}
            elif self.invites and self.likely(0.5):
                body = {"invite": self.pick(self.invites)}
        elif action == "leave":
            node = self.pick(members) if members and self.likely() else self.pick(self.nodes)
            who = self.by_key[node] if isinstance(node, str) else node
            path = f"/v1/tasks/{t}/leave"
        elif action == "status":
            node = (
                self.pick(members)
                if members and self.likely()
                else self.pick(self.nodes).public_hex
            )
            method, who, path = "LEDGER", b.coord, f"/v1/tasks/{t}/members/{node}"
            body = {"status": rng.choices(["healthy", "unhealthy", "dead"], weights=[4, 2, 1])[0]}
        elif action == "work":
            who = (
                self.by_key[self.pick(members)]
                if members and self.likely()
                else self.pick(self.nodes)
            )
            path = f"/v1/tasks/{t}/work"
            fresh = self.likely(0.95) or not self.work
            key = wk(rng.getrandbits(60)) if fresh else self.pick(self.work)[1]
            kind = rng.choices(["units", "rollouts", "bogus"], weights=[10, 5, 1])[0]
            body = {"work_key": key, "kind": kind, "units": rng.randint(1, 120)}
        elif action == "verdict":
            if not self.work:
                return
            open_units = [
                (wt, key)
                for wt, key in self.work[-40:]
                if st.tasks[wt].state in ("open", "paused")
                and (u := st.work.get(key)) is not None
                and u.state in ("submitted", "accepted", "dropped")
                and not (u.unlock_ms and b.now >= u.unlock_ms)
            ]
            wt, key = self.pick(open_units if open_units and self.likely() else self.work)
            unit = st.work.get(key)
            voted = unit.votes if unit is not None else {}
            fresh_voters = [v for v in st.tasks[wt].validators if v not in voted]
            who = (
                self.by_key[self.pick(fresh_voters)]
                if fresh_voters and self.likely()
                else self.pick(self.vals)
            )
            verdict = rng.choices(
                ["accept", "drop", "soft_reject", "hard_reject"], weights=[6, 1, 2, 3]
            )[0]
            path, body = f"/v1/tasks/{wt}/verdicts", {"work_key": key, "verdict": verdict}
        else:  # claim
            who = self.pick(self.everyone)
            have = b.account(who)["claimable"]
            amount = rng.choice([1, max(1, have // 2), max(1, have), have + 1])
            path, body = "/v1/claims", {"amount": amount}
        try:
            out = b.write(who, path, body, method=method)
        except ProtocolError:
            assert self.snapshot() == self.last, f"a refused {action} changed the state"
            self.refused += 1
            return
        self.counts[action] = self.counts.get(action, 0) + 1
        if action == "invite":
            self.invites.append(out["invite"])
        elif action == "work":
            self.work.append((t, body["work_key"]))
        elif action == "verdict" and out["state"] == "hard_rejected":
            self.counts["hard_rejected"] = self.counts.get("hard_rejected", 0) + 1
        self.check()
        self.last = self.snapshot()

    def check(self) -> None:
        st = self.b.state
        now = st.ts_ms
        credited_by_members: dict[str, int] = {}
        for (t, _), m in st.members.items():
            assert all(c >= 0 and w >= 0 and n >= 0 for _, c, w, n in m.locked), m
            assert [b[0] for b in m.locked] == sorted(b[0] for b in m.locked)
            assert m.accepted_units >= 0, m
            credited_by_members[t] = (
                credited_by_members.get(t, 0) + m.matured + sum(b[1] for b in m.locked)
            )
        supply = 0
        for task in st.tasks.values():
            assert task.balanced(), task
            assert task.left >= 0 and task.credited >= 0 and task.fees >= 0
            assert task.credited == credited_by_members.get(task.id, 0), task.id
            if task.state in ("finalized", "cancelled"):
                assert task.refunded >= 0
            supply += task.fees + task.refunded + task.credited
        held = 0
        for key in set(st.accounts) | set(st.by_node):
            acct = st.account_view(key, now)
            assert acct["claimable"] >= 0 and acct["locked"] >= 0, acct
            held += acct["claimable"] + acct["claimed"] + acct["locked"]
        assert held == supply  # every credit is somewhere: nothing made, nothing lost


@pytest.mark.timeout(300)
def test_random_walk_keeps_the_books_balanced() -> None:
    w = Walk(seed=20240613)
    while w.b.state.size < 2000:
        w.step()
    counts = w.counts
    assert w.refused > 500, "the walk should try many writes that must be refused"
    for kind in (
        "publish",
        "state",
        "invite",
        "join",
        "leave",
        "status",
        "work",
        "verdict",
        "claim",
    ):
        assert counts.get(kind, 0) >= 5, (kind, counts)
    assert counts.get("hard_rejected", 0) >= 3, counts
    # the auditor's replay of the same entries arrives at the same state
    replayed = State()
    for i, (ts, req) in enumerate(w.b.log):
        replayed.apply(i, ts, req)
    assert replayed.view() == w.b.state.view()
    assert replayed.root() == w.b.state.root()


# ---- persistence ----------------------------------------------------------------------------


def _reloaded(st: State) -> State:
    """What a coordinator rebuilds from its stored objects (through JSON, as in the database)."""
    assert isinstance(st.work, CountingWork)
    work = CountingWork()
    work.units = copy.deepcopy(st.work.units)
    new = State(work)
    for oid, obj in st.objects(st.all_ids()):
        new.load(oid, json.loads(json.dumps(obj)))
    return new


def test_objects_load_round_trip() -> None:
    w = Walk(seed=7)
    while w.b.state.size < 600:
        w.step()
    st = w.b.state
    new = _reloaded(st)
    assert new.view() == st.view()
    assert new.root() == st.root()
    # the reloaded state goes on exactly as the original: the same writes, the same outcomes
    start = len(w.b.attempts)
    while st.size < 900:
        w.step()
    for ts, req, outcome in w.b.attempts[start:]:
        try:
            got: Any = new.apply(new.size, ts, req).result
        except ProtocolError as e:
            got = f"{type(e).__name__}: {e}"
        assert got == outcome
    assert new.view() == st.view()


def test_objects_are_the_dirty_ones(market: Market) -> None:
    b = market.book
    st = b.state
    st.dirty.clear()
    b.work(market.nodes[0], market.task, wk(1))
    ids = {oid for oid, _ in st.objects()}
    assert ids == {
        "meta",
        f"task/{market.task}",
        f"member/{market.task}/{market.nodes[0].public_hex}",
    }
    with pytest.raises(ValueError, match="unknown stored object"):
        State().load("planet/earth", {})


def test_credit_taken_back_after_finalize_goes_to_the_initiator(market: Market) -> None:
    """A reject after finalize returns the unit's (or the ejected node's locked) credit to the
    initiator, not to a budget nobody can spend any more."""
    b, init, t = market.book, market.init, market.task
    a, c, _ = market.nodes
    v0, v1, v2 = market.vals
    b.work(a, t, wk(1), units=10)
    b.work(a, t, wk(2), units=20)
    b.work(c, t, wk(3), units=4)
    for k in (1, 2, 3):
        b.verdict(v0, t, wk(k), "accept")
    b.write(init, f"/v1/tasks/{t}/finalize")
    refunded = b.task(t)["refunded"]
    b.verdict(v1, t, wk(3), "soft_reject")  # 4 units x 5 back; no fee left to pay
    assert b.task(t)["refunded"] == refunded + 20 and b.task(t)["left"] == 0
    b.verdict(v1, t, wk(2), "hard_reject")
    b.verdict(v2, t, wk(2), "hard_reject")  # the quorum: a's locked 150 go back
    task = b.task(t)
    assert (task["left"], task["refunded"]) == (0, refunded + 20 + 150)
    assert b.account(init)["claimable"] == task["refunded"]
    assert b.member(t, a)["status"] == "ejected"
    assert b.state.tasks[t].balanced()
