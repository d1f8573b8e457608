"""The protocol's state: a deterministic function of the ledger.

``State.apply(seq, ts_ms, request)`` is the reducer. The coordinator calls it for each signed
write before the write gets a ledger entry (a write it refuses raises and changes nothing);
``cotrain audit`` calls it for every entry of a ledger it fetched and must arrive at the same
``view()``. Nothing else changes state: heartbeats are not logged, only the transitions they
cause (the coordinator writes those entries with its own key).

Money. A task's budget is credits (integers). An accepted unit of work earns
``units * rate_per_unit`` from what is left of the budget; the credit is locked for ``lock_s``
(in 24 buckets, as Prime's rewards contract does), during which a soft reject takes it back and
a quorum of hard rejects forfeits all of the node's locked credit to the task and ejects it.
Then it matures into the node's account and can be claimed. Validators earn a fixed fee per
verdict, whatever the verdict: nobody gains from slashing. Cancel and finalize return what is
left of the budget to the initiator. So for every task, always::

    budget == left + locked + matured + fees + refunded      (``Task.balanced``)

Shares. Each accepted unit adds ``units * weights[kind]`` to its node's weight in the task
(dropped work earns its credit but no weight: the run did not use it); a hard reject removes the
locked weight with the locked credit. At finalize the weights freeze into the task's shares.

Work units live in a ``WorkStore`` (a dict for the auditor, a database table at the
coordinator): they are too many to hold in memory at a busy coordinator. Everything else
(identities, tasks, members, accounts, invites) is small and lives here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from cotrain.core.signed import canonical
from cotrain.protocol import wire
from cotrain.protocol.auth import SignedRequest
from cotrain.protocol.errors import Conflict, Forbidden, NotFound, RequestError

BUCKETS = 24
"""The lock window is cut into this many buckets: a node's locked credit is at most this many
numbers, however much work it submits."""
ACTIVE = frozenset({"joined", "healthy", "unhealthy"})
FINAL_STATES = frozenset({"soft_rejected", "hard_rejected"})


@dataclass
class Unit:
    """One work record: a node's claim of ``units`` of ``kind`` work, and what became of it."""

    key: str
    task: str
    node: str
    kind: str
    units: int
    step: int
    seq: int
    state: str = "submitted"  # submitted | accepted | dropped | soft_rejected | hard_rejected
    credit: int = 0
    weighted: int = 0
    unlock_ms: int = 0
    votes: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    last_seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    """What its node said of it (a DiLoCo node: whether the run used it)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Unit:
        return cls(**obj)


class WorkStore(Protocol):
    """Where work units live; ``get`` after ``put`` returns what was put."""

    def get(self, key: str) -> Unit | None: ...

    def put(self, unit: Unit) -> None: ...


class MemoryWork:
    """Work units in a dict (the auditor, tests)."""

    def __init__(self) -> None:
        self.units: dict[str, Unit] = {}

    def get(self, key: str) -> Unit | None:
        return self.units.get(key)

    def put(self, unit: Unit) -> None:
        self.units[unit.key] = unit


@dataclass
class IdentityRec:
    key: str
    roles: list[str]
    name: str
    specs: dict[str, Any]
    seq: int


@dataclass
class Task:
    id: str
    initiator: str
    name: str
    kind: str
    spec: dict[str, Any]
    budget: int
    rate_per_unit: int
    validator_fee: int
    lock_ms: int
    admission: str
    validators: list[str]
    quorum: int
    weights: dict[str, int]
    max_units: int
    seq: int
    state: str = "published"  # published | open | paused | finalized | cancelled
    left: int = 0
    fees: int = 0
    refunded: int = 0
    forfeited: int = 0
    credited: int = 0
    """Credit given to accepted and dropped work, net of soft rejects and forfeits."""
    submitted_units: int = 0
    accepted_units: int = 0
    shares: dict[str, int] | None = None
    """Frozen at finalize: node -> weight."""
    finalized_seq: int = -1

    def balanced(self) -> bool:
        return self.budget == self.left + self.credited + self.fees + self.refunded


@dataclass
class Member:
    task: str
    node: str
    status: str  # joined | healthy | unhealthy | dead | ejected | left
    seq: int
    submitted_units: int = 0
    accepted_units: int = 0
    rejected_units: int = 0
    locked: list[list[int]] = field(default_factory=list)
    """[unlock_ms, credit, weight, accepted units] buckets, ordered by unlock time."""
    matured: int = 0
    weight: int = 0
    """Matured weight (locked weight is in ``locked``)."""
    forfeited: int = 0

    def split(self, now_ms: int) -> tuple[int, int, int, int]:
        """(matured credit, matured weight, locked credit, locked weight) at ``now_ms``."""
        mc, mw, lc, lw = self.matured, self.weight, 0, 0
        for unlock, credit, weight, _ in self.locked:
            if unlock <= now_ms:
                mc, mw = mc + credit, mw + weight
            else:
                lc, lw = lc + credit, lw + weight
        return mc, mw, lc, lw


@dataclass
class Account:
    key: str
    settled: int = 0
    """Fees, refunds and matured credit moved in so far."""
    claimed: int = 0


@dataclass
class Invite:
    id: str
    task: str
    node: str | None
    expires_ms: int
    used_by: str | None = None


@dataclass
class Applied:
    """What a write did: its ledger kind and what its author is told."""

    kind: str
    result: dict[str, Any]


class State:
    """Everything the ledger says, replayed."""

    def __init__(self, work: WorkStore | None = None) -> None:
        self.work: WorkStore = work if work is not None else MemoryWork()
        self.origin = ""
        self.coordinator = ""
        self.window_ms = 0
        self.size = 0
        """Entries applied."""
        self.ts_ms = 0
        """The time of the last entry applied."""
        self.identities: dict[str, IdentityRec] = {}
        self.tasks: dict[str, Task] = {}
        self.members: dict[tuple[str, str], Member] = {}
        self.accounts: dict[str, Account] = {}
        self.invites: dict[str, Invite] = {}
        self.by_node: dict[str, list[str]] = {}
        self.dirty: set[tuple[str, ...]] = set()
        """Objects changed since ``clean()`` (the coordinator writes them with each batch)."""

    # ---- the reducer ----------------------------------------------------------------------

    def apply(self, seq: int, ts_ms: int, req: SignedRequest) -> Applied:
        """Apply one signed write as entry ``seq`` at coordinator time ``ts_ms``.

        Raises a ``ProtocolError`` (and changes nothing) if the write does not fit the state."""
        if seq != self.size:
            raise Conflict(f"entry {seq} applied to a state of {self.size} entries")
        if ts_ms < self.ts_ms:
            raise Conflict(f"entry time {ts_ms} is before the previous entry's {self.ts_ms}")
        r = wire.route(req.method, req.path, req.body)
        if seq == 0 and r.kind != "ledger.genesis":
            raise Conflict("the first entry of a ledger is its genesis")
        window = self.window_ms if seq else r.body.window_ms
        if abs(ts_ms - req.ts_ms) > 2 * window:
            raise Conflict(
                f"entry time {ts_ms} is {(ts_ms - req.ts_ms) / 1000:+.0f} s from its request's "
                f"signed time: beyond twice the {window / 1000:.0f} s clock window"
            )
        handler = getattr(self, "_" + r.kind.replace(".", "_"))
        result = handler(seq, ts_ms, req, r)
        self.size, self.ts_ms = seq + 1, ts_ms
        self.dirty.add(("meta",))
        return Applied(r.kind, result)

    def _ledger_genesis(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        if seq != 0:
            raise Conflict("a ledger has one genesis")
        body: wire.Genesis = r.body
        if req.key != body.coordinator:
            raise Forbidden("the genesis is signed by the coordinator it names")
        self.origin, self.coordinator = body.origin, body.coordinator
        self.window_ms = body.window_ms
        return {"origin": self.origin}

    def _identity_register(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        body: wire.RegisterIdentity = r.body
        self.identities[req.key] = IdentityRec(
            req.key, list(body.roles), body.name, dict(body.specs), seq
        )
        self.dirty.add(("identity", req.key))
        return {"key": req.key, "roles": list(body.roles)}

    def _task_publish(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        body: wire.PublishTask = r.body
        self._need_role(req.key, "initiator")
        for v in body.validators:
            if "validator" not in self._roles(v):
                raise RequestError(f"validator {v[:16]}... is not registered as a validator")
        n = len(body.validators)
        quorum = body.quorum if body.quorum is not None else max(1, math.ceil(2 * n / 3))
        if n and quorum > n:
            raise RequestError(f"quorum {quorum} is more than the {n} validators")
        task = Task(
            id=f"t{seq}",
            initiator=req.key,
            name=body.name,
            kind=body.kind,
            spec=dict(body.spec),
            budget=body.budget,
            rate_per_unit=body.rate_per_unit,
            validator_fee=body.validator_fee,
            lock_ms=body.lock_s * 1000,
            admission=body.admission,
            validators=list(body.validators),
            quorum=quorum,
            weights=dict(body.weights),
            max_units=body.max_units,
            seq=seq,
            left=body.budget,
        )
        self.tasks[task.id] = task
        self.dirty.add(("task", task.id))
        return {"task": task.id}

    def _task_open(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        return self._transition(req, r, ("published", "paused"), "open")

    def _task_pause(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        return self._transition(req, r, ("open",), "paused")

    def _task_finalize(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        task = self._own_task(req, r)
        self._need_state(task, ("open", "paused"), "finalize")
        shares: dict[str, int] = {}
        for node in self._task_nodes(task.id):
            m = self.members[(task.id, node)]
            self._settle(m, ts)
            weight = m.weight + sum(b[2] for b in m.locked)
            if weight > 0:
                shares[node] = weight
        task.shares = shares
        task.state = "finalized"
        task.finalized_seq = seq
        self._refund(task)
        return {"task": task.id, "state": task.state, "total_weight": sum(shares.values())}

    def _task_cancel(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        task = self._own_task(req, r)
        self._need_state(task, ("published", "open", "paused"), "cancel")
        task.state = "cancelled"
        refunded = task.left
        self._refund(task)
        return {"task": task.id, "state": task.state, "refunded": refunded}

    def _invite_create(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        task = self._own_task(req, r)
        self._need_state(task, ("published", "open", "paused"), "invite to")
        body: wire.CreateInvite = r.body
        if req.nonce in self.invites:
            raise Conflict("an invite with this id exists: sign with a fresh nonce")
        self.invites[req.nonce] = Invite(req.nonce, task.id, body.node, ts + body.ttl_s * 1000)
        self.dirty.add(("invite", req.nonce))
        return {"invite": req.nonce, "expires_ms": ts + body.ttl_s * 1000}

    def _member_join(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        task = self._task(r.task)
        self._need_role(req.key, "node")
        self._need_state(task, ("open",), "join")
        old = self.members.get((task.id, req.key))
        if old is not None and old.status in ACTIVE:
            raise Conflict(f"{req.key[:16]}... is already a member of {task.id}")
        if old is not None and old.status == "ejected":
            raise Forbidden(f"{req.key[:16]}... was ejected from {task.id}")
        body: wire.Join = r.body
        invite = None
        if task.admission == "invite":
            if body.invite is None:
                raise Forbidden(f"{task.id} admits by invite: ask its initiator for one")
            invite = self.invites.get(body.invite)
            if invite is None or invite.task != task.id:
                raise Forbidden(f"no invite {body.invite} for {task.id}")
            if invite.used_by is not None:
                raise Forbidden("this invite was already used")
            if ts > invite.expires_ms:
                raise Forbidden("this invite has expired")
            if invite.node is not None and invite.node != req.key:
                raise Forbidden("this invite is for another key")
        if invite is not None:
            invite.used_by = req.key
            self.dirty.add(("invite", invite.id))
        if old is None:
            m = Member(task.id, req.key, "joined", seq)
            self.members[(task.id, req.key)] = m
            self.by_node.setdefault(req.key, []).append(task.id)
        else:  # back after dead or left: same record, its credit goes on maturing
            m = old
            m.status, m.seq = "joined", seq
        self.dirty.add(("member", task.id, req.key))
        return {"task": task.id, "status": m.status}

    def _member_leave(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        m = self._active_member(r.task, req.key)
        m.status = "left"
        self.dirty.add(("member", m.task, m.node))
        return {"task": m.task, "status": m.status}

    def _member_status(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        if req.key != self.coordinator:
            raise Forbidden("only the coordinator records what heartbeats showed")
        assert r.key is not None
        m = self._active_member(r.task, r.key)
        m.status = r.body.status
        self.dirty.add(("member", m.task, m.node))
        return {"task": m.task, "node": m.node, "status": m.status}

    def _work_submit(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        body: wire.SubmitWork = r.body
        task = self._task(r.task)
        self._need_state(task, ("open",), "submit work to")
        m = self._active_member(task.id, req.key)
        if body.kind not in task.weights:
            raise RequestError(f"{task.id} takes work of kinds {sorted(task.weights)}")
        if body.units > task.max_units:
            raise RequestError(f"{body.units} units is over {task.id}'s {task.max_units}")
        if self.work.get(body.work_key) is not None:
            raise Conflict(f"work {body.work_key[:16]}... was already submitted")
        unit = Unit(
            key=body.work_key,
            task=task.id,
            node=req.key,
            kind=body.kind,
            units=body.units,
            step=body.step,
            seq=seq,
            last_seq=seq,
            meta=dict(body.meta),
        )
        self.work.put(unit)
        m.submitted_units += body.units
        task.submitted_units += body.units
        self.dirty.update({("member", task.id, req.key), ("task", task.id)})
        return {"work_key": unit.key, "state": unit.state}

    def _work_verdict(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        body: wire.SubmitVerdict = r.body
        task = self._task(r.task)
        if req.key not in task.validators:
            raise Forbidden(f"{req.key[:16]}... is not a validator of {task.id}")
        self._need_state(task, ("open", "paused", "finalized"), "judge work of")
        unit = self.work.get(body.work_key)
        if unit is None or unit.task != task.id:
            raise NotFound(f"no work {body.work_key[:16]}... in {task.id}")
        if req.key in unit.votes:
            raise Conflict(f"{req.key[:16]}... already judged this work")
        if unit.state in FINAL_STATES or (unit.unlock_ms and ts >= unit.unlock_ms):
            raise Conflict(f"work {unit.key[:16]}... is final ({unit.state})")
        m = self.members[(task.id, unit.node)]
        if body.verdict in ("accept", "drop") and m.status == "ejected":
            raise Conflict(f"{unit.node[:16]}... was ejected from {task.id}")
        # From here on the verdict is taken: pay the validator, then apply it.
        self._settle(m, ts)
        unit.votes[req.key] = body.verdict
        unit.last_seq = seq
        fee = min(task.validator_fee, task.left)
        task.left -= fee
        task.fees += fee
        self._account(req.key).settled += fee
        if body.verdict in ("accept", "drop") and unit.state == "submitted":
            weight = unit.units * task.weights[unit.kind] if body.verdict == "accept" else 0
            credit = min(unit.units * task.rate_per_unit, task.left)
            unlock = _bucket(ts + task.lock_ms, task.lock_ms)
            unit.state = "accepted" if body.verdict == "accept" else "dropped"
            unit.credit, unit.weighted, unit.unlock_ms = credit, weight, unlock
            unit.reason = body.reason
            task.left -= credit
            task.credited += credit
            _lock(m, unlock, credit, weight, unit.units if body.verdict == "accept" else 0)
            if body.verdict == "accept":
                m.accepted_units += unit.units
                task.accepted_units += unit.units
        elif body.verdict == "soft_reject" and unit.state != "hard_rejected":
            self._take_back(task, m, unit)
            unit.state, unit.reason = "soft_rejected", body.reason
            m.rejected_units += unit.units
        elif body.verdict == "hard_reject":
            hard = sum(v == "hard_reject" for v in unit.votes.values())
            if hard >= task.quorum:
                self._take_back(task, m, unit)
                unit.state, unit.reason = "hard_rejected", body.reason
                m.rejected_units += unit.units
                self._eject(task, m)
        self.work.put(unit)
        self.dirty.update({("member", task.id, m.node), ("task", task.id), ("account", req.key)})
        return {"work_key": unit.key, "state": unit.state, "member": m.status, "fee": fee}

    def _task_report(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        body: wire.SubmitReport = r.body
        task = self._task(r.task)
        if req.key != task.initiator and req.key not in task.validators:
            raise Forbidden(f"only {task.id}'s initiator and validators report its progress")
        self._need_state(task, ("open", "paused"), "report on")
        return {"task": task.id, "step": body.step}

    def _account_claim(self, seq: int, ts: int, req: SignedRequest, r: wire.Route) -> Any:
        amount = r.body.amount
        claimable = self.account_view(req.key, ts)["claimable"]
        if amount > claimable:
            raise Conflict(f"claim of {amount} is over the {claimable} claimable")
        for task_id in self.by_node.get(req.key, []):
            self._settle(self.members[(task_id, req.key)], ts)
        acct = self._account(req.key)
        acct.claimed += amount
        self.dirty.add(("account", req.key))
        return {"claimed": amount, "claimable": claimable - amount}

    # ---- helpers ---------------------------------------------------------------------------

    def _roles(self, key: str) -> list[str]:
        rec = self.identities.get(key)
        return rec.roles if rec is not None else []

    def _need_role(self, key: str, role: str) -> None:
        if role not in self._roles(key):
            raise Forbidden(
                f"{key[:16]}... is not registered as a {role} (POST /v1/identities first)"
            )

    def _task(self, task_id: str | None) -> Task:
        task = self.tasks.get(task_id or "")
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    def _own_task(self, req: SignedRequest, r: wire.Route) -> Task:
        task = self._task(r.task)
        if task.initiator != req.key:
            raise Forbidden(f"only {task.id}'s initiator may do this")
        return task

    @staticmethod
    def _need_state(task: Task, states: tuple[str, ...], what: str) -> None:
        if task.state not in states:
            raise Conflict(f"cannot {what} {task.id}: it is {task.state}")

    def _transition(
        self, req: SignedRequest, r: wire.Route, states: tuple[str, ...], to: str
    ) -> dict[str, Any]:
        task = self._own_task(req, r)
        self._need_state(task, states, f"make {to}")
        task.state = to
        self.dirty.add(("task", task.id))
        return {"task": task.id, "state": to}

    def _active_member(self, task_id: str | None, key: str) -> Member:
        task = self._task(task_id)
        m = self.members.get((task.id, key))
        if m is None or m.status not in ACTIVE:
            status = "not a member" if m is None else m.status
            raise Forbidden(f"{key[:16]}... is {status} of {task.id}")
        return m

    def _task_nodes(self, task_id: str) -> Iterator[str]:
        return (node for (t, node) in self.members if t == task_id)

    def _account(self, key: str) -> Account:
        acct = self.accounts.get(key)
        if acct is None:
            acct = self.accounts[key] = Account(key)
        self.dirty.add(("account", key))
        return acct

    def _settle(self, m: Member, ts: int) -> None:
        """Move ``m``'s matured buckets into its account."""
        n = 0
        while n < len(m.locked) and m.locked[n][0] <= ts:
            _, credit, weight, _ = m.locked[n]
            m.matured += credit
            m.weight += weight
            self._account(m.node).settled += credit
            n += 1
        if n:
            del m.locked[:n]
            self.dirty.add(("member", m.task, m.node))

    def _take_back(self, task: Task, m: Member, unit: Unit) -> None:
        """A locked unit's credit and weight back to the task (soft or hard reject)."""
        if unit.state not in ("accepted", "dropped") or m.status == "ejected":
            return  # nothing locked (an ejected node's locked credit was forfeited already)
        for bucket in m.locked:
            if bucket[0] == unit.unlock_ms:
                bucket[1] -= unit.credit
                bucket[2] -= unit.weighted
                bucket[3] -= unit.units if unit.state == "accepted" else 0
                break
        else:  # the verdict came in time, so the bucket is there
            raise AssertionError(f"unit {unit.key} has no bucket at {unit.unlock_ms}")
        task.left += unit.credit
        task.credited -= unit.credit
        if unit.state == "accepted":
            m.accepted_units -= unit.units
            task.accepted_units -= unit.units
        if task.state == "finalized":  # the budget was settled: the initiator gets it back
            self._refund(task)

    def _eject(self, task: Task, m: Member) -> None:
        """A hard reject: all locked credit back to the task, the node out."""
        forfeit = sum(b[1] for b in m.locked)
        units = sum(b[3] for b in m.locked)  # accepted, but their credit is forfeited
        m.accepted_units -= units
        task.accepted_units -= units
        m.locked.clear()
        m.forfeited += forfeit
        task.forfeited += forfeit
        task.left += forfeit
        task.credited -= forfeit
        m.status = "ejected"
        if task.state == "finalized":
            self._refund(task)

    def _refund(self, task: Task) -> None:
        self._account(task.initiator).settled += task.left
        task.refunded += task.left
        task.left = 0
        self.dirty.add(("task", task.id))

    # ---- views -----------------------------------------------------------------------------

    def account_view(self, key: str, now_ms: int) -> dict[str, Any]:
        acct = self.accounts.get(key) or Account(key)
        pending = locked = 0
        for task_id in self.by_node.get(key, []):
            m = self.members[(task_id, key)]
            mc, _, lc, _ = m.split(now_ms)
            pending += mc - m.matured
            locked += lc
        return {
            "key": key,
            "claimable": acct.settled + pending - acct.claimed,
            "locked": locked,
            "claimed": acct.claimed,
        }

    def member_view(self, m: Member, now_ms: int) -> dict[str, Any]:
        mc, mw, lc, lw = m.split(now_ms)
        return {
            "task": m.task,
            "node": m.node,
            "status": m.status,
            "since_seq": m.seq,
            "submitted_units": m.submitted_units,
            "accepted_units": m.accepted_units,
            "rejected_units": m.rejected_units,
            "earned": mc,
            "locked": lc,
            "forfeited": m.forfeited,
            "weight": mw + lw,
            "locked_weight": lw,
        }

    def task_view(self, task: Task) -> dict[str, Any]:
        out = asdict(task)
        out["lock_s"] = out.pop("lock_ms") // 1000
        return out

    def shares(self, task_id: str) -> dict[str, Any]:
        """A task's ownership shares: frozen at finalize, else as they stand now."""
        task = self._task(task_id)
        if task.shares is not None:
            weights, frozen = dict(task.shares), True
        else:
            weights, frozen = {}, False
            for node in self._task_nodes(task_id):
                view = self.member_view(self.members[(task_id, node)], self.ts_ms)
                if view["weight"] > 0:
                    weights[node] = view["weight"]
        return {
            "task": task_id,
            "frozen": frozen,
            "total": sum(weights.values()),
            "weights": dict(sorted(weights.items())),
        }

    def view(self) -> dict[str, Any]:
        """The whole state at the last entry's time, as plain JSON (what the audit compares)."""
        now = self.ts_ms
        keys = sorted(set(self.accounts) | set(self.by_node))
        return {
            "origin": self.origin,
            "coordinator": self.coordinator,
            "window_ms": self.window_ms,
            "size": self.size,
            "ts_ms": now,
            "identities": {k: asdict(v) for k, v in sorted(self.identities.items())},
            "tasks": {k: self.task_view(t) for k, t in sorted(self.tasks.items())},
            "members": {
                f"{t}/{n}": self.member_view(m, now) for (t, n), m in sorted(self.members.items())
            },
            "accounts": {k: self.account_view(k, now) for k in keys},
            "invites": {k: asdict(v) for k, v in sorted(self.invites.items())},
        }

    def root(self) -> str:
        """sha256 of the canonical ``view()``: what checkpoints carry as ``state``."""
        return hashlib.sha256(canonical(self.view())).hexdigest()

    # ---- persistence of the small objects (the coordinator's database) ---------------------

    def objects(self, ids: set[tuple[str, ...]] | None = None) -> Iterator[tuple[str, Any]]:
        """(object id, JSON) for the ``dirty`` objects (or ``ids``), to store with a batch."""
        for oid in sorted(self.dirty if ids is None else ids):
            kind = oid[0]
            if kind == "meta":
                obj: Any = {
                    "origin": self.origin,
                    "coordinator": self.coordinator,
                    "window_ms": self.window_ms,
                    "size": self.size,
                    "ts_ms": self.ts_ms,
                }
            elif kind == "identity":
                obj = _snapshot(self.identities[oid[1]])
            elif kind == "task":
                obj = _snapshot(self.tasks[oid[1]])
            elif kind == "member":
                obj = _snapshot(self.members[(oid[1], oid[2])])
            elif kind == "account":
                obj = _snapshot(self.accounts[oid[1]])
            else:
                obj = _snapshot(self.invites[oid[1]])
            yield "/".join(oid), obj

    def all_ids(self) -> set[tuple[str, ...]]:
        ids: set[tuple[str, ...]] = {("meta",)}
        ids.update(("identity", k) for k in self.identities)
        ids.update(("task", k) for k in self.tasks)
        ids.update(("member", t, n) for t, n in self.members)
        ids.update(("account", k) for k in self.accounts)
        ids.update(("invite", k) for k in self.invites)
        return ids

    def load(self, oid: str, obj: dict[str, Any]) -> None:
        """Restore one stored object (the inverse of ``objects``)."""
        kind, _, rest = oid.partition("/")
        if kind == "meta":
            self.origin, self.coordinator = obj["origin"], obj["coordinator"]
            self.window_ms = obj["window_ms"]
            self.size, self.ts_ms = obj["size"], obj["ts_ms"]
        elif kind == "identity":
            self.identities[rest] = IdentityRec(**obj)
        elif kind == "task":
            self.tasks[rest] = Task(**obj)
        elif kind == "member":
            m = Member(**obj)
            self.members[(m.task, m.node)] = m
            self.by_node.setdefault(m.node, []).append(m.task)
        elif kind == "account":
            self.accounts[rest] = Account(**obj)
        elif kind == "invite":
            self.invites[rest] = Invite(**obj)
        else:
            raise ValueError(f"unknown stored object {oid!r}")


def _snapshot(obj: Any) -> dict[str, Any]:
    """A state object as a JSON dict, fast (``asdict`` deep-copies through a slow recursion).

    Only a member's buckets change in place after creation; every other list or dict field is
    replaced, never mutated, so a shallow copy is a snapshot."""
    out = dict(vars(obj))
    if isinstance(obj, Member):
        out["locked"] = [list(b) for b in obj.locked]
    return out


def _bucket(unlock_ms: int, lock_ms: int) -> int:
    """Round an unlock time up to the window's bucket boundary."""
    width = max(1, lock_ms // BUCKETS)
    return -(-unlock_ms // width) * width


def _lock(m: Member, unlock: int, credit: int, weight: int, units: int) -> None:
    if m.locked and m.locked[-1][0] == unlock:
        m.locked[-1][1] += credit
        m.locked[-1][2] += weight
        m.locked[-1][3] += units
    else:  # entry times never go back, so buckets are appended in order
        m.locked.append([unlock, credit, weight, units])
