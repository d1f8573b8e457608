"""The orchestrator (trusted): assigns tasks, takes signed rollouts, hands them to validators,
computes rewards and advantages, forms the trainer's batches, and records every rollout and
verdict. An aiohttp service; every decision is the ``Planner``'s, every event is journaled
first, so a restarted orchestrator rebuilds its state by replaying the journal.

HTTP API (JSON; writes carry signed envelopes, reads are public)::

    GET  /v1/info                       run id, keys, latest version, shardcast servers
    POST /v1/work      request          -> {"assignments": [envelope], ...}  (worker; long-poll)
    POST /v1/rollouts  {"rollouts": [envelope]} -> {"results": [{id, status, check, reason}]}
    POST /v1/claim     request          -> {"items": [{rollout, expected_sha256, latest_version}]}
    POST /v1/verdicts  {"verdicts": [envelope]} -> {"results": [...]}          (validators)
    GET  /v1/batch?step=N&wait_s=W      -> {"status": "ready"|"pending"|"aborted"|"done", ...}
    POST /v1/version   envelope         the trainer's notice of a published version
    GET  /v1/status                     counters, per worker and per check
    GET  /v1/rollouts?step=N            the step's records once its batch is formed

Cheap checks happen at the door (shape, signatures, an assignment we issued to that key, a
rollout id or completion seen before); everything else is the validators' (``checks``). Every
rollout that passes the door is validated, even one that arrives after its slot was filled, so
that every cheating submission gets a verdict.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from aiohttp import web

from cotrain.core import jsonsafe
from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope, EnvelopeError
from cotrain.rl import wire
from cotrain.rl.config import RLConfig
from cotrain.rl.env import Env
from cotrain.rl.journal import Journal, RolloutStore
from cotrain.rl.planner import Accepted, Planner, RunAborted
from cotrain.rl.wire import Assignment, Request, SignedRollout, Verdict, VersionNotice, WireError

log = logging.getLogger("cotrain.rl.orchestrator")

MAX_ITEMS = 64
"""Rollouts or verdicts per POST."""
MAX_WAIT_S = 30.0
"""Longest a long-poll is held."""


class Forbidden(Exception):
    """A caller we do not accept (unknown validator, banned worker, not the trainer)."""


class StoreError(Exception):
    """The rollout store lacks a formed step or cannot be read (HTTP 503)."""


@dataclass
class Received:
    """A rollout that passed the door."""

    signed: SignedRollout
    seq: int
    status: str = "queued"
    """queued (awaiting a verdict), accepted, rejected."""
    verdict: dict[str, Any] | None = None
    validator: str | None = None
    reward: float | None = None
    claimed_by: str | None = None
    claim_deadline: float = 0.0


def _record(rec: Received) -> dict[str, Any]:
    """What the rollout store keeps of one received rollout."""
    return {
        "id": rec.signed.id,
        "worker": rec.signed.worker,
        "status": rec.status,
        "reward": rec.reward,
        "verdict": rec.verdict,
        "validator": rec.validator,
        "rollout": rec.signed.envelope.to_json(),
    }


@dataclass
class Stats:
    submitted: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejections by the check that failed (door and validators)."""
    superseded: int = 0
    """Accepted rollouts of a slot another rollout had already filled."""
    by_worker: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    verdicts_by_validator: Counter[str] = field(default_factory=Counter)
    staleness: Counter[int] = field(default_factory=Counter)
    """(step - version) of every sample in a formed batch."""


class Orchestrator:
    def __init__(
        self,
        cfg: RLConfig,
        *,
        identity: Identity,
        env: Env,
        encode_prompt: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.env = env
        self.encode_prompt = encode_prompt
        self.decode = decode
        self.clock = clock
        self.started_unix = clock()
        self.seen: dict[str, float] = {}
        """Worker key -> when a checked request of it last arrived."""
        self.run_id = cfg.run.id
        self.planner = Planner(cfg, run_id=self.run_id, env_id=env.id, levels=env.levels)
        self.planner.alive = self._alive
        out = cfg.run.out_dir / "orchestrator"
        self.journal = Journal(out / "journal.jsonl")
        self.store = RolloutStore(cfg.orchestrator.store_url or str(cfg.run.out_dir / "rollouts"))
        self.received: dict[str, Received] = {}
        self.by_sha: set[str] = set()
        self.stats = Stats()
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-store")
        self.door: dict[str, dict[str, Any]] = {}
        """Rollouts rejected at the door, by id (the last one per id)."""
        self.nonces: dict[str, float] = {}
        self.validators = set(cfg.orchestrator.validator_keys)
        self.workers = set(cfg.orchestrator.worker_keys)
        self._seq = 0
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._replaying = False
        self._replayed_steps: list[int] = []
        self.url = ""
        self.prompt = lru_cache(maxsize=4096)(self._prompt)
        self.recorder: Any = None
        """The coordinator's ``Recorder``, when this run is a task of one: every final verdict
        goes there too (those replayed from the journal again: already-recorded ones are
        refused as such, none is lost to a crash)."""
        o = cfg.orchestrator
        if o.coordinator:
            from cotrain.protocol.recorder import Recorder

            if not o.coordinator_task:
                raise ValueError("orchestrator.coordinator needs orchestrator.coordinator_task")
            self.recorder = Recorder(o.coordinator, identity, o.coordinator_task)
        self._replay()

    # ---- the journal -----------------------------------------------------------------------

    def _replay(self) -> None:
        self._replaying = True
        n = 0
        try:
            for ev in self.journal.replay():
                n += 1
                kind = ev.get("e")
                if kind == "version":
                    self._apply_version(VersionNotice.from_body(ev["notice"]["body"]))
                elif kind == "issue":
                    self.planner.apply_issue(Assignment.from_body(ev["assignment"]["body"]))
                elif kind == "rollout":
                    signed = wire.parse_rollout(
                        ev["envelope"], orchestrator=self.identity.public_hex
                    )
                    self._apply_received(signed)
                elif kind == "door":
                    self._apply_door(ev)
                elif kind == "verdict":
                    self._apply_verdict(
                        Verdict.from_body(ev["envelope"]["body"]), ev["envelope"]["signer"]
                    )
        finally:
            self._replaying = False
        if n:
            log.info("replayed %d journal events: next batch %d", n, self.planner.next_batch)
        self._store_missing_steps()

    def _store_missing_steps(self) -> None:
        """Write the replayed steps that the store lacks: the process died before a step's
        write (it runs off the event loop), or the step formed only now (a journal of an
        older orchestrator that left it unformed). Listed and written in the store's thread,
        like every write: a slow or unreachable store does not hold up the start."""
        formed, self._replayed_steps = set(self._replayed_steps), []
        if not formed:
            return
        received = [rec for rec in self.received.values() if rec.signed.assignment.step in formed]
        self._store_pool.submit(self._rewrite_missing, formed, received)

    def _rewrite_missing(self, formed: set[int], received: list[Received]) -> None:
        try:
            missing = sorted(formed - self.store.steps())
        except Exception as e:  # an unreachable store must not stop the run
            log.error("could not list the rollout store %s: %s", self.store.url, e)
            return
        if not missing:
            return
        log.info("writing %d step(s) missing from the store: %s", len(missing), missing)
        by_step: dict[int, list[Received]] = {step: [] for step in missing}
        for rec in received:
            if rec.signed.assignment.step in by_step:
                by_step[rec.signed.assignment.step].append(rec)
        for step in missing:
            self._store(step, [_record(rec) for rec in by_step.pop(step)])

    # ---- state changes (the same code live and on replay) ----------------------------------

    def _apply_version(self, notice: VersionNotice) -> None:
        self.planner.apply_version(notice.version, notice.file_sha256, notice.step, notice.servers)

    def _apply_received(self, signed: SignedRollout) -> None:
        self._seq += 1
        self.received[signed.id] = Received(signed, self._seq)
        self.by_sha.add(signed.sha256)
        self.planner.apply_received(signed.assignment.id, signed.rollout.sample)
        self.stats.submitted += 1
        self.stats.by_worker[signed.worker]["submitted"] += 1

    def _count_reject(self, worker: str, check: str, *, strike: bool = True) -> None:
        self.stats.rejected[check] += 1
        self.stats.submitted += 1
        if worker:
            self.stats.by_worker[worker]["submitted"] += 1
            self.stats.by_worker[worker]["rejected"] += 1
            if strike:
                self.planner.strikes[worker] += 1

    def _apply_verdict(self, verdict: Verdict, validator: str) -> None:
        rec = self.received.get(verdict.rollout_id)
        if rec is None or rec.status != "queued":
            return
        signed = rec.signed
        a = signed.assignment
        rec.verdict = verdict.to_body()
        rec.validator = validator
        self.stats.verdicts_by_validator[validator] += 1
        worker = self.stats.by_worker[signed.worker]
        if not verdict.ok:
            rec.status = "rejected"
            self.stats.rejected[verdict.check or "unknown"] += 1
            worker["rejected"] += 1
            self.planner.apply_reject(a.id, signed.worker)
            # each failed check costs that rollout's credit; the one that gets the worker
            # banned here ejects it from the task (and forfeits what it has locked)
            banned = self.planner.banned(signed.worker)
            self._record_verdict(
                signed,
                "hard_reject" if banned else "soft_reject",
                f"{verdict.check}: {verdict.reason}",
            )
            self._form_batches()  # a dropped slot may be the step's last one
            return
        rec.status = "accepted"
        rec.reward = self._reward(signed)
        if verdict.reward is not None and abs(verdict.reward - rec.reward) > 1e-6:
            log.warning(
                "validator %s... reward %s differs from ours %s for %s",
                validator[:12],
                verdict.reward,
                rec.reward,
                signed.id,
            )
        self.stats.accepted += 1
        worker["accepted"] += 1
        if not self.planner.slot_needs(a.id, signed.rollout.sample):
            self.stats.superseded += 1
            self._record_verdict(signed, "drop", "valid, but its slot was filled before it")
            return
        self._record_verdict(signed, "accept", f"reward {rec.reward:g}")
        r = signed.rollout
        self.planner.apply_accept(
            a.id,
            r.sample,
            Accepted(
                signed.id,
                signed.worker,
                r.prompt_ids,
                r.completion_ids,
                r.logprobs,
                rec.reward,
                r.version,
            ),
        )
        self._form_batches()

    def _record_verdict(self, signed: SignedRollout, verdict: str, reason: str) -> None:
        if self.recorder is not None:
            self.recorder.verdict(signed.sha256, verdict, reason)

    def _form_batches(self) -> None:
        try:
            formed = self.planner.form_batches()
        except RunAborted as e:
            log.error("run aborted: %s", e)
            formed = []
        for batch in formed:
            for s in batch.samples:
                self.stats.staleness[batch.step - s.version] += 1
            if self._replaying:
                self._replayed_steps.append(batch.step)
            else:
                self._write_step(batch.step)

    def _write_step(self, step: int) -> None:
        records = [
            _record(rec) for rec in self.received.values() if rec.signed.assignment.step == step
        ]
        # Off the event loop, one write at a time: an S3 store costs a round trip per step
        # (seconds when its endpoint is down), which must not hold up assignments.
        self._store_pool.submit(self._store, step, records)

    def flush_store(self, timeout_s: float = 60.0) -> None:
        """Wait until every step formed so far is written to the store."""
        self._store_pool.submit(lambda: None).result(timeout_s)

    def _store(self, step: int, records: list[dict[str, Any]]) -> None:
        try:
            self.store.write_step(step, records)
        except Exception as e:  # a full disk or an unreachable store must not stop the run
            log.error("could not store step %d's rollouts at %s: %s", step, self.store.url, e)

    def _reward(self, signed: SignedRollout) -> float:
        a = signed.assignment
        task = self.env.task(a.task_seed, a.level)
        return float(self.env.score(task, self.decode(signed.rollout.completion_ids)))

    def _prompt(self, task_seed: int, level: int) -> list[int]:
        return self.encode_prompt(self.env.task(task_seed, level).prompt)

    # ---- requests --------------------------------------------------------------------------

    def _request(self, obj: Any, role: str) -> tuple[Request, str]:
        """A fresh, never-seen, correctly signed request from ``role``; its signer."""
        try:
            env = Envelope.from_json(obj, domain=wire.REQUEST)
        except EnvelopeError as e:
            raise WireError(str(e)) from None
        req = Request.from_body(env.body)
        now = self.clock()
        if req.run != self.run_id or req.role != role:
            raise WireError(
                f"request for run {req.run!r} as {req.role}, not {self.run_id!r} as {role}"
            )
        if abs(req.unix - now) > self.cfg.orchestrator.max_clock_skew_s:
            raise WireError("request is stale (or its clock is off): refused")
        if req.nonce in self.nonces:
            raise WireError("request nonce seen before: refused as a replay")
        self.nonces[req.nonce] = now
        if len(self.nonces) > 100_000:
            horizon = now - 2 * self.cfg.orchestrator.max_clock_skew_s
            self.nonces = {k: t for k, t in self.nonces.items() if t > horizon}
        return req, env.signer

    def check_worker(self, obj: Any) -> tuple[str, int]:
        """A worker's request, checked: its key and how many assignments it asks for. A
        checked request is a sign of life."""
        req, worker = self._request(obj, "worker")
        if self.cfg.orchestrator.admission == "list" and worker not in self.workers:
            raise Forbidden("this key is not on the run's worker list")
        self.seen[worker] = self.clock()
        return worker, req.max_items

    def _alive(self, worker: str, now: float) -> bool:
        """Heard from within ``worker_timeout_s`` (counted from this process's start for a
        worker not heard from since: a restarted orchestrator gives everyone that long)."""
        last = self.seen.get(worker, self.started_unix)
        return now - last < self.cfg.orchestrator.worker_timeout_s

    def issue(self, worker: str, max_items: int) -> dict[str, Any] | None:
        """Up to ``max_items`` assignments for ``worker``; None when there is nothing now."""
        if self.planner.banned(worker):
            raise Forbidden(
                f"this key is banned after {self.planner.strikes[worker]} rejected rollouts"
            )
        out = []
        now = self.clock()
        for _ in range(max_items):
            a = self.planner.plan(worker, now, prompt_of=self.prompt)
            if a is None:
                break
            sealed = Envelope.seal(self.identity, wire.ASSIGNMENT, a.to_body())
            self.journal.append({"e": "issue", "assignment": sealed.to_json()})
            self.planner.apply_issue(a)
            out.append(sealed.to_json())
        return {"assignments": out, **self._head()} if out else None

    def _head(self) -> dict[str, Any]:
        p = self.planner
        status = "aborted" if p.aborted else "done" if p.done else "running"
        return {
            "status": status,
            "latest_version": p.latest_version,
            "latest_sha256": p.versions.get(p.latest_version),
            "servers": p.servers,
            "reason": p.aborted,
        }

    def rollouts(self, obj: Any) -> list[dict[str, Any]]:
        if not isinstance(obj, dict) or not isinstance(obj.get("rollouts"), list):
            raise WireError('expected {"rollouts": [envelope, ...]}')
        items = obj["rollouts"]
        if len(items) > MAX_ITEMS:
            raise WireError(f"at most {MAX_ITEMS} rollouts per request")
        return [self._one_rollout(item) for item in items]

    def _one_rollout(self, item: Any) -> dict[str, Any]:
        signer = item.get("signer") if isinstance(item, dict) else None
        worker = signer if isinstance(signer, str) and len(signer) == 64 else ""
        try:
            signed = wire.parse_rollout(item, orchestrator=self.identity.public_hex)
        except WireError as e:
            text = str(e)
            check = "signature" if ("forged" in text or "signed by" in text) else "schema"
            return self._door(worker, "?", check, text)
        rid = signed.id
        if signed.assignment.id not in self.planner.assignments:
            return self._door(signed.worker, rid, "assignment", "not an assignment of this run")
        if signed.sha256 in self.by_sha:
            # the very envelope again: a retry after a lost reply, or a replay; it counts once
            # either way, so it is refused without a strike against the worker
            reason = "this exact rollout was received before (it counts once)"
            return self._door(signed.worker, rid, "duplicate", reason, strike=False)
        if rid in self.received:
            return self._door(signed.worker, rid, "duplicate", "this rollout was submitted before")
        # Equal tokens are not a copy in themselves: samples of one prompt coincide when the
        # model is confident. A copy of another task's rollout fails the assignment check (its
        # prompt), and of another sample's the sampling replay (its seed).
        self.journal.append({"e": "rollout", "envelope": signed.envelope.to_json()})
        self._apply_received(signed)
        return {"id": rid, "status": "queued"}

    def _door(
        self, worker: str, rid: str, check: str, reason: str, *, strike: bool = True
    ) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "e": "door",
            "worker": worker,
            "id": rid,
            "check": check,
            "reason": reason,
        }
        if not strike:
            ev["strike"] = False
        self.journal.append(ev)
        self._apply_door(ev)
        return {"id": rid, "status": "rejected", "check": check, "reason": reason}

    def _apply_door(self, ev: dict[str, Any]) -> None:
        self._count_reject(ev["worker"], ev["check"], strike=ev.get("strike", True))
        if ev["id"] != "?" and ev["id"] not in self.received:
            self.door[ev["id"]] = {
                "id": ev["id"],
                "worker": ev["worker"],
                "status": "rejected",
                "check": ev["check"],
                "reason": ev["reason"],
                "at": "door",
            }

    def check_validator(self, obj: Any) -> tuple[str, int]:
        req, validator = self._request(obj, "validator")
        if validator not in self.validators:
            raise Forbidden("this key is not one of the run's validators")
        return validator, req.max_items

    def claim(self, validator: str, max_items: int) -> dict[str, Any]:
        """Up to ``max_items`` queued rollouts for ``validator``, earliest step first; a claim
        not answered within ``validation_timeout_s`` is offered again."""
        now = self.clock()
        timeout = self.cfg.orchestrator.validation_timeout_s
        queued = [
            r
            for r in self.received.values()
            if r.status == "queued" and (r.claimed_by is None or r.claim_deadline < now)
        ]
        queued.sort(key=lambda r: (r.signed.assignment.step, r.seq))
        items = []
        for rec in queued[:max_items]:
            rec.claimed_by, rec.claim_deadline = validator, now + timeout
            v = rec.signed.rollout.version
            items.append(
                {
                    "rollout": rec.signed.envelope.to_json(),
                    "expected_sha256": self.planner.versions.get(v),
                    "latest_version": self.planner.latest_version,
                }
            )
        return {"items": items, **self._head()}

    def verdicts(self, obj: Any) -> list[dict[str, Any]]:
        if not isinstance(obj, dict) or not isinstance(obj.get("verdicts"), list):
            raise WireError('expected {"verdicts": [envelope, ...]}')
        if len(obj["verdicts"]) > MAX_ITEMS:
            raise WireError(f"at most {MAX_ITEMS} verdicts per request")
        out = []
        for item in obj["verdicts"]:
            try:
                env = Envelope.from_json(item, domain=wire.VERDICT, signers=self.validators)
            except EnvelopeError as e:
                raise Forbidden(str(e)) from None
            verdict = Verdict.from_body(env.body)
            rec = self.received.get(verdict.rollout_id)
            if rec is None or rec.signed.sha256 != verdict.rollout_sha256:
                out.append({"id": verdict.rollout_id, "status": "unknown rollout"})
                continue
            if rec.status != "queued":
                out.append({"id": verdict.rollout_id, "status": f"already {rec.status}"})
                continue
            self.journal.append({"e": "verdict", "envelope": env.to_json()})
            self._apply_verdict(verdict, env.signer)
            out.append({"id": verdict.rollout_id, "status": rec.status})
        return out

    def version(self, obj: Any) -> None:
        trainer = self.cfg.orchestrator.trainer_key
        try:
            env = Envelope.from_json(obj, domain=wire.VERSION, signers={trainer})
        except EnvelopeError as e:
            raise Forbidden(str(e)) from None
        notice = VersionNotice.from_body(env.body)
        if notice.run != self.run_id:
            raise WireError(f"version notice for run {notice.run!r}, not {self.run_id!r}")
        known = self.planner.versions.get(notice.version)
        if known == notice.file_sha256:
            self.planner.servers = list(notice.servers)  # a restarted trainer's new address
            return
        self.journal.append({"e": "version", "notice": env.to_json()}, sync=True)
        self._apply_version(notice)
        log.info("version %d published (trainer step %d)", notice.version, notice.step)

    def batch(self, step: int) -> dict[str, Any]:
        p = self.planner
        b = p.batch(step)
        if b is not None:
            return {"status": "ready", "batch": b.to_json()}
        if p.aborted:
            return {"status": "aborted", "reason": p.aborted}
        if step > self.cfg.run.total_steps:
            return {"status": "done"}
        return {"status": "pending", "progress": p.progress(step)}

    def status(self) -> dict[str, Any]:
        p, s = self.planner, self.stats
        return {
            "run": self.run_id,
            **self._head(),
            "trainer_step": p.trainer_step,
            "latest_sha256": p.versions.get(p.latest_version),
            "next_batch": p.next_batch,
            "level": p.curriculum.level,
            "issued": p.issued,
            "submitted": s.submitted,
            "accepted": s.accepted,
            "superseded": s.superseded,
            "rejected_by_check": dict(s.rejected),
            "queued": sum(r.status == "queued" for r in self.received.values()),
            "workers": {w: {**dict(c), "banned": p.banned(w)} for w, c in s.by_worker.items()},
            "validators": dict(s.verdicts_by_validator),
            "staleness": {str(k): v for k, v in sorted(s.staleness.items())},
            **({"ledger": self._ledger_status()} if self.recorder is not None else {}),
        }

    def _ledger_status(self) -> dict[str, Any]:
        r = self.recorder
        return {"sent": r.sent, "pending": r.pending, "refused": dict(r.refused), "lost": r.lost}

    def step_records(self, step: int) -> list[dict[str, Any]] | None:
        if self.planner.batch(step) is None:
            return None
        try:
            return self.store.read_step(step)
        except FileNotFoundError:
            raise StoreError(f"step {step} is not in the rollout store {self.store.url}") from None
        except Exception as e:  # an unreachable store: the caller's error, not a crash
            raise StoreError(f"cannot read step {step} from {self.store.url}: {e}") from None

    # ---- HTTP ------------------------------------------------------------------------------

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _wait_change(self, timeout_s: float) -> None:
        assert self._changed is not None
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                pass

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        return jsonsafe.loads(raw, max_bytes=int(self.cfg.orchestrator.max_body_mb * 1e6))

    def _wait_s(self, request: web.Request, default: float) -> float:
        try:
            return min(MAX_WAIT_S, max(0.0, float(request.query.get("wait_s", default))))
        except ValueError:
            raise WireError("wait_s must be a number") from None

    async def _h_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "run": self.run_id,
                "orchestrator_key": self.identity.public_hex,
                "trainer_key": self.cfg.orchestrator.trainer_key,
                "env": self.env.id,
                "group_size": self.cfg.run.group_size,
                **self._head(),
            }
        )

    async def _h_work(self, request: web.Request) -> web.Response:
        worker, n = self.check_worker(await self._body(request))
        deadline = time.monotonic() + self._wait_s(request, 2.0)
        while True:
            got = self.issue(worker, n)
            if got is not None:
                await self._notify()
                return web.json_response(got)
            left = deadline - time.monotonic()
            if left <= 0 or self.planner.done or self.planner.aborted:
                return web.json_response({"assignments": [], **self._head()})
            # an expired assignment frees a slot without any event: look again every 0.5 s
            await self._wait_change(min(left, 0.5))

    async def _h_heartbeat(self, request: web.Request) -> web.Response:
        self.check_worker(await self._body(request))
        return web.json_response(self._head())

    async def _h_rollouts(self, request: web.Request) -> web.Response:
        results = self.rollouts(await self._body(request))
        await self._notify()
        return web.json_response({"results": results, **self._head()})

    async def _h_claim(self, request: web.Request) -> web.Response:
        validator, n = self.check_validator(await self._body(request))
        deadline = time.monotonic() + self._wait_s(request, 2.0)
        got = self.claim(validator, n)
        while not got["items"] and not self.planner.done and time.monotonic() < deadline:
            await self._wait_change(min(deadline - time.monotonic(), 0.5))
            got = self.claim(validator, n)
        return web.json_response(got)

    async def _h_verdicts(self, request: web.Request) -> web.Response:
        results = self.verdicts(await self._body(request))
        await self._notify()
        return web.json_response({"results": results, **self._head()})

    async def _h_version(self, request: web.Request) -> web.Response:
        self.version(await self._body(request))
        await self._notify()
        return web.json_response({"ok": True})

    async def _h_batch(self, request: web.Request) -> web.Response:
        try:
            step = int(request.query["step"])
        except (KeyError, ValueError):
            raise WireError("batch needs ?step=N") from None
        deadline = time.monotonic() + self._wait_s(request, 10.0)
        got = self.batch(step)
        while got["status"] == "pending" and time.monotonic() < deadline:
            await self._wait_change(deadline - time.monotonic())
            got = self.batch(step)
        return web.json_response(got)

    async def _h_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def record(self, rid: str) -> dict[str, Any] | None:
        """Where one rollout stands: queued, accepted or rejected (at the door or by a
        validator), with the check that failed and why."""
        rec = self.received.get(rid)
        if rec is not None:
            v = rec.verdict or {}
            return {
                "id": rid,
                "worker": rec.signed.worker,
                "status": rec.status,
                "check": v.get("check"),
                "reason": v.get("reason"),
                "reward": rec.reward,
                "validator": rec.validator,
            }
        door = self.door.get(rid)
        return dict(door) if door is not None else None

    async def _h_record(self, request: web.Request) -> web.Response:
        got = self.record(request.query.get("id", ""))
        if got is None:
            return web.json_response({"error": "no such rollout"}, status=404)
        return web.json_response(got)

    async def _h_step_rollouts(self, request: web.Request) -> web.Response:
        try:
            step = int(request.query["step"])
        except (KeyError, ValueError):
            raise WireError("rollouts need ?step=N") from None
        await asyncio.to_thread(self.flush_store)
        records = await asyncio.to_thread(self.step_records, step)
        if records is None:
            return web.json_response({"error": f"step {step} has no batch yet"}, status=404)
        return web.json_response({"step": step, "records": records})

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except (WireError, jsonsafe.MalformedJSON) as e:
            return web.json_response({"error": str(e)[:300]}, status=400)
        except Forbidden as e:
            return web.json_response({"error": str(e)[:300]}, status=403)
        except StoreError as e:
            return web.json_response({"error": str(e)[:300]}, status=503)

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=int(self.cfg.orchestrator.max_body_mb * 1e6),
            middlewares=[self._errors],
        )
        app.add_routes(
            [
                web.get("/v1/info", self._h_info),
                web.post("/v1/work", self._h_work),
                web.post("/v1/heartbeat", self._h_heartbeat),
                web.post("/v1/rollouts", self._h_rollouts),
                web.post("/v1/claim", self._h_claim),
                web.post("/v1/verdicts", self._h_verdicts),
                web.post("/v1/version", self._h_version),
                web.get("/v1/batch", self._h_batch),
                web.get("/v1/status", self._h_status),
                web.get("/v1/rollouts", self._h_step_rollouts),
                web.get("/v1/record", self._h_record),
            ]
        )
        return app

    async def start(self) -> str:
        self._changed = asyncio.Condition()
        o = self.cfg.orchestrator
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, o.host, o.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        if self.recorder is not None:
            self.recorder.start()
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.recorder is not None:
            await self.recorder.close()
        await asyncio.to_thread(self._store_pool.shutdown, wait=True)
        self.journal.close()


def run_orchestrator(cfg: RLConfig) -> int:
    """The orchestrator role's program (``cotrain rl orchestrator``)."""
    from cotrain.cli.role import binding
    from cotrain.core.errors import UsageError
    from cotrain.core.service import Service
    from cotrain.rl import policy
    from cotrain.rl.env import make_env, self_test

    if not cfg.orchestrator.trainer_key:
        raise UsageError(
            "orchestrator.trainer_key is required: the trainer's public key (64 hex), printed "
            "by `cotrain keygen --key TRAINER.pem`; `cotrain rl run` sets it for you"
        )
    if not cfg.orchestrator.validator_keys:
        raise UsageError("orchestrator.validator_keys is empty: no rollout could ever be accepted")
    with Service("rl orchestrator") as svc:
        identity = Identity.load_or_create(cfg.path(cfg.orchestrator.key))
        codec = policy.load_codec(cfg.model)  # no transformers: this process needs no torch
        env = make_env(cfg.env.name)
        self_test(env)
        orch = Orchestrator(
            cfg,
            identity=identity,
            env=env,
            encode_prompt=codec.encode_prompt,
            decode=codec.decode,
        )

        def summary() -> str:
            s = orch.stats
            return (
                f"{orch.planner.issued} assignments, {s.submitted} rollouts submitted, "
                f"{s.accepted} accepted, rejected {dict(s.rejected)}"
            )

        svc.summary = summary

        async def main() -> None:
            o = cfg.orchestrator
            with binding(o.host, o.port, flag="--orchestrator.port"):
                url = await orch.start()
            svc.ready(url=url, key=identity.public_hex, next_batch=orch.planner.next_batch)
            try:
                await svc.stopped()
            finally:
                await orch.close()

        asyncio.run(main())
    return svc.exit_code
