"""The inference worker (untrusted): asks for work, fetches the newest policy through shardcast,
generates each assigned group with the seeded sampler, proves it, signs it, submits it.

A worker holds no state the run needs: killed at any moment, its assignment expires and goes to
another worker; started late, it fetches the newest version and joins. ``worker.cheat`` turns
it into one of the cheating workers the validators must catch (tests and benchmarks): the
generation-level cheats live in ``cheats``, the ones on the envelope here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope, canonical
from cotrain.rl import wire
from cotrain.rl.client import OrchestratorClient, Refused, Weights
from cotrain.rl.config import RLConfig
from cotrain.rl.errors import OrchestratorUnreachable, RLError
from cotrain.rl.heap import release_memory
from cotrain.rl.wire import Assignment, Rollout
from cotrain.shardcast.errors import VersionNotFound

log = logging.getLogger("cotrain.rl.worker")

ENVELOPE_CHEATS = (
    "stale",
    "unfetched_version",
    "replay_own",
    "copy_other",
    "bad_signature",
    "forge_reward",
    "own_task",
)
"""Cheats on what is claimed or signed rather than on the tokens (see ``cheats`` for those)."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


@dataclass
class WorkerStats:
    started: float = field(default_factory=time.monotonic)
    assignments: int = 0
    rollouts: int = 0
    gen_s: float = 0.0
    fetch_s: float = 0.0
    wait_s: float = 0.0

    @property
    def idle_fraction(self) -> float:
        total = time.monotonic() - self.started
        return (total - self.gen_s) / total if total > 0 else 0.0


class Worker:
    def __init__(self, cfg: RLConfig, *, log_line: Callable[[str], None] | None = None) -> None:
        from cotrain.rl import cheats, policy
        from cotrain.rl.env import make_env

        self.cfg = cfg
        self.cheat = cfg.worker.cheat
        if self.cheat != "none" and self.cheat not in ENVELOPE_CHEATS + tuple(cheats.CHEATS):
            raise RLError(
                f"worker.cheat={self.cheat!r} is not a known cheat: "
                f"{', '.join(ENVELOPE_CHEATS + tuple(cheats.CHEATS))}"
            )
        self.identity = Identity.load_or_create(cfg.path(cfg.worker.key))
        say = log_line or (lambda m: print(m, file=sys.stderr, flush=True))
        policy.check_memory("worker", cfg.model, log=say)
        from cotrain.rl.heap import limit_heap_growth

        limit_heap_growth()  # generation's temporaries go back to the system when freed
        self.policy = policy.load_policy(cfg.model, shared=True)
        self.env = make_env(cfg.env.name)
        self.stats = WorkerStats()
        self.weights: Weights | None = None
        self._first_version = 0
        self.recorder: Any = None
        """The coordinator's ``Recorder`` when the run is a task of one."""
        self._beat: asyncio.Task[None] | Any = None

    @property
    def key(self) -> str:
        return self.identity.public_hex

    async def run(self) -> None:
        cfg = self.cfg
        async with OrchestratorClient(
            cfg.orchestrator_url,
            identity=self.identity,
            run=cfg.run.id,
            role="worker",
            timeout_s=cfg.worker.request_timeout_s,
        ) as client:
            info = await client.info()
            self.orchestrator_key = info["orchestrator_key"]
            # one cache per machine: processes holding the same version share its pages
            self.weights = Weights(
                cfg.run.out_dir / "cache" / "weights",
                publisher_key=info["trainer_key"],
                channel=cfg.run.id,
                keep=cfg.keep_versions + 1,
            )
            emit("joined", worker=self.key, run=cfg.run.id)
            recorder = await self._ledger()
            try:
                await self._loop(client)
            finally:
                if recorder is not None:
                    await recorder.close()
                    self._beat.cancel()
                    emit(
                        "recorded",
                        sent=recorder.sent,
                        refused=dict(recorder.refused),
                        lost=recorder.lost,
                    )

    async def _ledger(self) -> Any:
        """Join the coordinator's task as a node, when the run is one (``worker.coordinator``)."""
        w = self.cfg.worker
        if not w.coordinator:
            return None
        from cotrain.protocol.recorder import Recorder

        if not w.coordinator_task:
            raise RLError("worker.coordinator needs worker.coordinator_task (the task id)")
        rec = Recorder(w.coordinator, self.identity, w.coordinator_task)
        try:
            await rec.join_as_node(f"rl-worker-{self.key[:8]}", w.coordinator_invite)
        except Exception as e:
            await rec.client.close()
            raise RLError(f"cannot join {w.coordinator_task} at {w.coordinator}: {e}") from None
        rec.start()
        self._beat = asyncio.create_task(rec.heartbeats())
        self.recorder = rec
        emit("task_joined", task=w.coordinator_task, coordinator=w.coordinator)
        return rec

    async def _loop(self, client: OrchestratorClient) -> None:
        cfg = self.cfg
        assert self.weights is not None
        while True:
            t0 = time.monotonic()
            got = await client.work(have_version=self.weights.loaded, wait_s=cfg.worker.idle_wait_s)
            self.stats.wait_s += time.monotonic() - t0
            if got["status"] != "running" and not got["assignments"]:
                emit("finished", status=got["status"], **self.summary())
                return
            for raw in got["assignments"]:
                await self._one(client, raw, got)
                limit = cfg.worker.max_assignments
                if limit and self.stats.assignments >= limit:
                    emit("finished", status="max_assignments", **self.summary())
                    return

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "assignments": s.assignments,
            "rollouts": s.rollouts,
            "gen_s": round(s.gen_s, 3),
            "fetch_s": round(s.fetch_s, 3),
            "idle_fraction": round(s.idle_fraction, 4),
        }

    async def _ensure_version(self, got: dict[str, Any], a: Assignment) -> int:
        """The newest version (or, for the stale cheat, the first one ever held)."""
        assert self.weights is not None
        w = self.weights
        latest = int(got["latest_version"])
        want: int | None = None
        if self.cheat in ("stale", "unfetched_version") and self._first_version:
            want = self._first_version
            if self.cheat == "stale" and a.min_version > 1:
                want = a.min_version - 1  # older than the bound allows
        elif w.loaded >= latest:
            return w.loaded
        else:  # by number and hash: a version another process here already holds is adopted
            want = latest
        t0 = time.monotonic()
        sha = got.get("latest_sha256") if want == latest else None
        try:
            v = await w.fetch(got["servers"], want, sha256=sha if isinstance(sha, str) else None)
        except VersionNotFound:  # retired meanwhile: the newest there is
            v = await w.fetch(got["servers"])
        await asyncio.to_thread(w.load_into, self.policy.model, v)
        self.stats.fetch_s += time.monotonic() - t0
        self._first_version = self._first_version or v
        return v

    async def _one(self, client: OrchestratorClient, raw: dict[str, Any], got: dict) -> None:
        env = Envelope.from_json(raw, domain=wire.ASSIGNMENT, signers={self.orchestrator_key})
        a = Assignment.from_body(env.body)
        # alive while fetching a version too: on a slow link that takes longer than
        # orchestrator.worker_timeout_s, and the slot must not go to someone else meanwhile
        beat = asyncio.ensure_future(self._heartbeats(client))
        try:
            version = await self._ensure_version(got, a)
            assert self.weights is not None
            t0 = time.monotonic()
            t_unix = time.time()
            gens, same = await asyncio.to_thread(self._generate, a)
        finally:
            beat.cancel()
        release_memory()
        gen_s = time.monotonic() - t0
        self.stats.gen_s += gen_s
        self.stats.assignments += 1
        claimed_version, sha = version, self.weights.sha256(version)
        cheating = self.cheat != "none"
        if self.cheat == "stale" and version >= a.min_version:
            cheating = False  # the run is too young to be stale in: an honest rollout
        if self.cheat == "unfetched_version":
            # a version it did not use: the newest, when that one's weights differ from the
            # ones used (its announced hash says so; two versions can be byte-identical when
            # a step had nothing to learn from, and claiming one for the other is no lie),
            # else one far past anything published (a claim no fetch could back)
            latest = int(got["latest_version"])
            newest_sha = got.get("latest_sha256")
            differs = isinstance(newest_sha, str) and newest_sha != sha
            claimed_version = latest if latest != version and differs else version + 1000
        envelopes = []
        for i, g in enumerate(gens):
            reward = None
            if self.cheat == "forge_reward":
                task = self.env.task(a.task_seed, a.level)
                reward = 1.0 - float(self.env.score(task, self.policy.decode(g.tokens)))
            body = Rollout(
                assignment=raw,
                sample=i,
                version=claimed_version,
                manifest_sha256=sha,
                prompt_ids=list(a.prompt_ids),
                completion_ids=list(g.tokens),
                logprobs=list(g.logprobs),
                finish_reason=g.finish_reason,
                proof=base64.b64encode(g.proof).decode(),
                proof_chunk=self.cfg.proof.chunk_tokens,
                proof_topk=self.cfg.proof.topk,
                claimed_reward=reward,
                t_start_unix=t_unix,
                t_end_unix=time.time(),
                nonce=wire.new_nonce(),
            ).to_body()
            if self.cheat == "own_task":
                tampered = dict(raw, body=dict(raw["body"], task_seed=0, level=0))
                body["assignment"] = tampered
            sealed = Envelope.seal(self.identity, wire.ROLLOUT, body).to_json()
            if self.cheat == "bad_signature":
                sig = sealed["signature"]
                sealed["signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
            envelopes.append(sealed)
        if self.cheat == "copy_other":
            copied = await self._copies(client, a, raw, len(gens))
            cheating = copied is not None
            envelopes = copied or envelopes
        # a cheat whose output is exactly the honest sample's is not a cheat on that sample
        flags = [cheating and not s for s in same]
        # the group's generation speed: the node's throughput on the dashboard
        rate = sum(len(g.tokens) for g in gens) / gen_s if gen_s > 0 else None
        if self.cheat == "replay_own":
            await self._submit(client, envelopes, a, [False] * len(envelopes), rate)
            flags = [True] * len(envelopes)
        await self._submit(client, envelopes, a, flags, rate)

    async def _heartbeats(self, client: OrchestratorClient) -> None:
        """Every ``heartbeat_s`` while a group is generated: a sign of life (a failed one is
        only logged; the submission says the rest)."""
        while True:
            await asyncio.sleep(self.cfg.worker.heartbeat_s)
            try:
                await client.heartbeat()
            except (OrchestratorUnreachable, Refused) as e:
                log.info("heartbeat: %s", e)

    def _generate(self, a: Assignment) -> tuple[list[Any], list[bool]]:
        """The group to submit, and per sample whether it equals the honest one."""
        from cotrain.rl import cheats, inference

        p = self.policy
        kw: dict[str, Any] = {
            "temperature": a.temperature,
            "max_new_tokens": a.max_new_tokens,
            "eos_token_id": p.eos_token_id,
            "batch_size": self.cfg.worker.batch_size,
            "proof_chunk": self.cfg.proof.chunk_tokens,
            "proof_topk": self.cfg.proof.topk,
        }
        if self.cheat in cheats.CHEATS:
            task = self.env.task(a.task_seed, a.level)
            other = self.env.task(a.task_seed + 1, a.level)
            ctx = cheats.CheatContext(
                model=p.model,
                prompt_ids=list(a.prompt_ids),
                seeds=list(a.seeds),
                answer_ids=[int(i) for i in p.tokenizer(task.answer)["input_ids"]],
                other_prompt_ids=p.encode_prompt(other.prompt),
                **kw,
            )
            group = list(cheats.cheat_group(self.cheat, ctx))
            return group, cheats.coincides_with_honest(ctx, group)
        gens = inference.generate_group(p.model, list(a.prompt_ids), list(a.seeds), **kw)
        return list(gens), [False] * len(gens)

    async def _copies(
        self, client: OrchestratorClient, a: Assignment, raw: dict[str, Any], n: int
    ) -> list[dict[str, Any]] | None:
        """Other workers' accepted rollouts of a recently formed step, re-signed as ours (the
        newest step's records may not be in the store yet: the ones before it are)."""
        status = await client.call("GET", "/v1/status")
        last = int(status["next_batch"]) - 1
        theirs: list[dict[str, Any]] = []
        for step in range(last, max(0, last - 4), -1):
            try:
                got = await client.call("GET", "/v1/rollouts", params={"step": step})
            except (Refused, OrchestratorUnreachable):  # not stored, or not readable
                continue
            records = got["records"]
            theirs = [r for r in records if r["status"] == "accepted" and r["worker"] != self.key]
            if theirs:
                break
        if not theirs:
            return None
        out = []
        for i in range(n):
            body = dict(theirs[i % len(theirs)]["rollout"]["body"])
            body.update(assignment=raw, sample=i, nonce=wire.new_nonce())
            out.append(Envelope.seal(self.identity, wire.ROLLOUT, body).to_json())
        return out

    async def _submit(
        self,
        client: OrchestratorClient,
        envelopes: list[dict[str, Any]],
        a: Assignment,
        cheating: list[bool],
        tokens_per_s: float | None,
    ) -> None:
        try:
            got = await client.submit(envelopes)
        except Refused as e:
            emit("refused", assignment=a.id, reason=str(e))
            if e.status == 403:
                raise
            return
        self.stats.rollouts += len(envelopes)
        if self.recorder is not None:  # what the orchestrator took in is this key's work
            record_rollouts(
                self.recorder, envelopes, got["results"], a.step, tokens_per_s=tokens_per_s
            )
        for r, cheat in zip(got["results"], cheating, strict=False):
            emit(
                "submitted",
                id=r.get("id"),
                status=r.get("status"),
                check=r.get("check"),
                cheat=self.cheat if cheat else None,
                step=a.step,
            )


def record_rollouts(
    recorder: Any,
    envelopes: list[dict[str, Any]],
    results: list[dict[str, Any]],
    step: int,
    *,
    tokens_per_s: float | None = None,
) -> int:
    """Record as work each rollout the orchestrator took in (status ``queued``): its key is
    the SHA-256 of the signed envelope (what the orchestrator's verdict names), its units the
    completion's tokens; ``tokens_per_s``, the group's generation speed, is what the dashboard
    shows as the node's throughput. Returns how many were recorded."""
    meta = {} if tokens_per_s is None else {"tokens_per_s": round(tokens_per_s, 1)}
    n = 0
    for env, r in zip(envelopes, results, strict=False):
        if r.get("status") == "queued":
            body = env.get("body", {})
            recorder.work(
                hashlib.sha256(canonical(env)).hexdigest(),
                "rollout_tokens",
                max(1, len(body.get("completion_ids", []))),
                int(step),
                **meta,
            )
            n += 1
    return n


def run_worker(cfg: RLConfig) -> int:
    """The worker role's program (``cotrain rl worker``)."""
    from cotrain.core.service import Service

    with Service("rl worker") as svc:
        worker = Worker(cfg)
        svc.summary = lambda: json.dumps(worker.summary())
        svc.ready(worker=worker.key, cheat=worker.cheat)
        try:
            asyncio.run(worker.run())
        except Refused as e:
            if e.status == 403:
                raise RLError(str(e)) from None
            raise
    return svc.exit_code
