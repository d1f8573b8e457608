"""``cotrain validator``: judges the work of a DiLoCo task and votes through the coordinator.

It keeps its own replica of the run's consensus (outer) state, built like every worker's from
the task's TrainConfig, and follows the task's work records outer step by step. A pseudo-
gradient of outer step k is judged against the replica at k:

* its artifact must be in the store and hash to the record's key (else a hard reject);
* it must be a finite flat tensor of the model's size;
* it must not be a copy of work submitted before it in the same step (cosine above
  ``copy_cosine``): a free rider replaying someone else's progress;
* applied to the consensus params it must not raise the validation loss by more than
  ``tolerance`` (honest local training lowers it; a poisoned, e.g. sign-flipped, update raises
  it): else a hard reject;
* it must lower that loss (a soft reject otherwise: the unit earns nothing, its node stays;
  an update too small to matter, or noise, claims tokens it did not train on).

Work that passes is accepted; every verdict carries the reason and the two losses. Once
the records of step k+1 appear (every worker submits before its synchronisation starts, so
the set of step k is then complete), the replica takes the outer step with the token-weighted
average of all of step k's pseudo-gradients (the run averaged them all, forged ones
included) and moves on. A hard reject needs the task's quorum of validators to eject the node;
a validator gains nothing from it (fees are per verdict).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch
from pydantic import Field

from cotrain.core.config import ConfigModel
from cotrain.core.errors import UsageError
from cotrain.core.identity import Identity
from cotrain.protocol import runs
from cotrain.protocol.client import Client
from cotrain.protocol.errors import Conflict, Forbidden, NotFound, ProtocolError

log = logging.getLogger("cotrain.protocol")
_NET_ERRORS = (ProtocolError, aiohttp.ClientError, OSError, TimeoutError)
_DONE = ("finalized", "cancelled")
_ACTIVE = ("joined", "healthy", "unhealthy")


class ValidatorConfig(ConfigModel):
    """``cotrain validator --coordinator URL --key validator.pem --task t1``."""

    coordinator: str = "http://127.0.0.1:8740"
    """The coordinator's URL."""
    key: str = "validator.pem"
    """This validator's ed25519 key (created if missing); the task must list it."""
    name: str = ""
    """The name it registers under (default: the host name)."""
    task: str = ""
    """The task whose work to judge."""
    work_dir: str = "cotrain-validator"
    """Where the replica's model and data go."""
    poll_s: float = Field(1.0, gt=0)
    """How often to read new work records."""
    tolerance: float = Field(0.01, ge=0)
    """The validation-loss rise (nats) a pseudo-gradient may cause before it is rejected."""
    copy_cosine: float = Field(0.999, gt=0, le=1)
    """Cosine similarity to earlier work of the same step above which work is a copy."""
    timeout_s: float = Field(30.0, gt=0)
    """Deadline of each call to the coordinator."""
    settle_s: float = Field(5.0, gt=0)
    """A step whose records stop coming for this long is judged with those it has (the
    run's last step; a member that did not contribute)."""
    idle_exit_s: float = Field(0.0, ge=0)
    """Stop after this long without new work once every record is judged (0: run until
    the task is finalized or cancelled)."""
    threads: int = Field(1, ge=1)


class Replica:
    """The run's consensus state as the validator rebuilds it, with the model to evaluate."""

    def __init__(self, spec: runs.DiLoCoSpec, task: str, work_dir: Path, threads: int) -> None:
        from cotrain.diloco.outer import OuterState
        from cotrain.diloco.worker import Worker

        cfg = spec.train_config(
            task,
            worker_index=0,
            out_dir=str(work_dir / "replica"),
            threads=threads,
            overwrite=True,
            checkpoint="none",
            save_model=False,
        )
        if cfg.algo.fragments != 1 or cfg.algo.overlap or cfg.algo.mode != "diloco":
            raise UsageError(
                f"task {task}: the validator follows plain DiLoCo runs (mode diloco, "
                "fragments 1, no overlap)"
            )
        self.worker = Worker(cfg, echo=False)  # the same model, init and validation batches
        self.params = self.worker.params
        self.outer = OuterState(self.params, cfg.algo.outer)
        self.step = 0
        self._base: dict[int, float] = {}
        self.snapshots: dict[int, torch.Tensor] = {0: self.outer.params.clone()}

    def close(self) -> None:
        self.worker._release()

    @torch.no_grad()
    def loss_at(self, flat: torch.Tensor) -> float:
        from cotrain.diloco.outer import load_flat

        load_flat(self.params, flat)
        return self.worker._val()

    def base_loss(self, step: int) -> float:
        if step not in self._base:
            self._base[step] = self.loss_at(self.snapshots[step])
        return self._base[step]

    def advance(self, deltas: list[tuple[torch.Tensor, int]]) -> None:
        """The outer step of ``self.step`` with these (pseudo-gradient, tokens) pairs."""
        total = sum(t for _, t in deltas)
        if total > 0:
            avg = torch.zeros_like(self.outer.params)
            for d, t in deltas:
                avg.add_(d, alpha=t / total)
            self.outer.apply(avg)
        else:
            self.outer.step += 1
        self.step += 1
        self.snapshots[self.step] = self.outer.params.clone()
        for old in [s for s in self.snapshots if s < self.step - 1]:
            del self.snapshots[old]


class Validator:
    def __init__(self, cfg: ValidatorConfig, identity: Identity, client: Client) -> None:
        self.cfg = cfg
        self.key = identity.public_hex
        self.client = client
        self.task = cfg.task
        self.spec: runs.DiLoCoSpec | None = None
        self.replica: Replica | None = None
        self.after = -1
        self.rows: dict[int, list[dict[str, Any]]] = {}  # step -> its work records, by seq
        self.judged: set[str] = set()
        self.verdicts: dict[str, int] = {"accept": 0, "drop": 0, "soft_reject": 0, "hard_reject": 0}
        self._deltas: dict[str, torch.Tensor] = {}
        self._bad: dict[str, str] = {}  # work key -> why its artifact is no pseudo-gradient
        self.unused: list[dict[str, Any]] = []  # records their node says the run dropped

    async def setup(self) -> None:
        c = self.client
        try:
            rec = await c.get(f"/v1/identities/{self.key}")
            roles = None if "validator" in rec["roles"] else sorted({*rec["roles"], "validator"})
        except NotFound:
            roles = ["validator"]
        if roles is not None:
            await c.register(roles, self.cfg.name or socket.gethostname()[:60] or "validator")
        try:
            task = await c.get(f"/v1/tasks/{self.task}")
        except NotFound:
            raise UsageError(f"the coordinator has no task {self.task}") from None
        if self.key not in task["validators"]:
            raise UsageError(f"{self.key[:16]}... is not among {self.task}'s validators")
        self.spec = runs.DiLoCoSpec.of(task)
        work_dir = Path(self.cfg.work_dir) / self.task
        self.replica = await asyncio.to_thread(
            Replica, self.spec, self.task, work_dir, self.cfg.threads
        )

    async def poll(self) -> int:
        """Read new work records; returns how many arrived."""
        got = 0
        while True:
            page = await self.client.get(
                f"/v1/tasks/{self.task}/work", after=self.after, limit=1000
            )
            rows = page["work"]
            for row in rows:
                self.after = max(self.after, int(row["seq"]))
                if row.get("kind") != runs.WORK_KIND:
                    continue
                if row.get("meta", {}).get("used") is False:
                    self.unused.append(row)  # the run did not average it: no state needed
                else:
                    self.rows.setdefault(int(row["step"]), []).append(row)
            got += len(rows)
            if len(rows) < 1000:
                return got

    async def judge_ready(self, *, members: int, settled: bool) -> None:
        """Judge the replica's step once its records are all in, then take its outer step, as
        long as later records show the run went on. A step's records are all in when records
        of a later step exist (every worker submits before its synchronisation starts), when
        every active member (``members``) submitted, or when nothing came for a while
        (``settled``: the run's last step)."""
        rep = self.replica
        assert rep is not None
        while self.unused:
            row = self.unused.pop(0)
            if row["key"] not in self.judged:
                await self._judge(row, int(row["step"]))
        while True:
            step = rep.step
            for late in sorted(s for s in self.rows if s < step and s in rep.snapshots):
                await self._judge_step(late)  # a record that came after its step was taken
            rows = self.rows.get(step, [])
            later = any(s > step for s in self.rows)
            if rows and (later or settled or len({r["node"] for r in rows}) >= members):
                await self._judge_step(step)
            if not later:
                return
            deltas = [
                (self._deltas[r["key"]], int(r["units"]))
                for r in self.rows.get(step, [])
                if r["key"] in self._deltas
            ]
            await asyncio.to_thread(rep.advance, deltas)
            for s in [s for s in self.rows if s < rep.step - 1]:
                for r in self.rows.pop(s):
                    self._deltas.pop(r["key"], None)

    async def _judge_step(self, step: int) -> None:
        rows = [r for r in self.rows.get(step, []) if r["key"] not in self.judged]
        if not rows:
            return
        for r in self.rows[step]:  # every contribution of the step, for the comparisons
            if r["key"] not in self._deltas and r["key"] not in self._bad:
                await asyncio.to_thread(self._load, r)
        for row in rows:
            await self._judge(row, step)

    def _load(self, row: dict[str, Any]) -> None:
        rep = self.replica
        assert rep is not None and self.spec is not None
        key = row["key"]
        try:
            delta = runs.get_pseudo_gradient(self.spec.store, self.task, key, numel=rep.outer.numel)
        except runs.ArtifactError as e:
            self._bad[key] = str(e)
            return
        if delta.numel() != rep.outer.numel:
            self._bad[key] = f"{delta.numel()} values, the model has {rep.outer.numel}"
        elif not bool(torch.isfinite(delta).all()):
            self._bad[key] = "the pseudo-gradient holds NaN or inf"
        else:
            self._deltas[key] = delta  # the run averaged it, whatever the verdict

    async def _judge(self, row: dict[str, Any], step: int) -> None:
        key = row["key"]
        self.judged.add(key)
        verdict, reason, evidence = await asyncio.to_thread(self._check, row, step)
        body: dict[str, Any] = {"work_key": key, "verdict": verdict, "reason": reason[:300]}
        if evidence:
            body["evidence"] = evidence
        try:
            await self.client.write(f"/v1/tasks/{self.task}/verdicts", body)
            self.verdicts[verdict] += 1
            print(
                f"{verdict} {key[:16]} node {row['node'][:16]} step {step}: {reason}",
                file=sys.stderr,
                flush=True,
            )
        except Conflict as e:  # judged already, final, or its node ejected meanwhile
            log.info("verdict on %s not taken: %s", key[:16], e)
        except Forbidden as e:
            raise UsageError(f"the coordinator refuses this validator's verdicts: {e}") from None

    def _check(self, row: dict[str, Any], step: int) -> tuple[str, str, str | None]:
        rep = self.replica
        assert rep is not None
        key = row["key"]
        meta = row.get("meta", {})
        if meta.get("used") is False:
            self._load(row)
            self._deltas.pop(key, None)  # not part of any average
            if key in self._bad:
                return "hard_reject", self._bad[key], None
            return "drop", f"the run did not use it: {str(meta.get('why', ''))[:200]}", None
        if key in self._bad:
            return "hard_reject", self._bad[key], None
        delta = self._deltas[key]
        norm = float(delta.norm())
        against: list[float] = []
        for other in self.rows.get(step, []):
            od = self._deltas.get(other["key"])
            if od is None or other["node"] == row["node"]:
                continue
            cos = float(torch.dot(delta, od)) / max(norm * float(od.norm()), 1e-30)
            if cos > self.cfg.copy_cosine and int(other["seq"]) < int(row["seq"]):
                return (
                    "hard_reject",
                    f"a copy of {other['key'][:16]}... (node {other['node'][:16]}..., cosine "
                    f"{cos:.5f})",
                    None,
                )
            against.append(cos)
        if len(against) >= 2 and sum(c < 0 for c in against) * 2 > len(against):
            cosines = ", ".join(f"{c:.3f}" for c in sorted(against))
            return (
                "hard_reject",
                f"it points against most of step {step}'s other contributions (cosines {cosines})",
                None,
            )
        base = rep.base_loss(step)
        after = rep.loss_at(rep.snapshots[step] - delta)
        facts = {"step": step, "work": key, "base_loss": base, "loss_after": after}
        evidence = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
        if after > base + self.cfg.tolerance:
            why = f"applied to the consensus it raises the validation loss {base:.4f} -> "
            return "hard_reject", f"{why}{after:.4f}", evidence
        if after >= base:  # harmless, but no progress: that unit earns nothing
            return "soft_reject", f"no lower validation loss ({base:.4f} -> {after:.4f})", evidence
        return "accept", f"validation loss {base:.4f} -> {after:.4f}", evidence


async def _run(cfg: ValidatorConfig, identity: Identity) -> dict[str, Any]:
    async with Client(cfg.coordinator, identity, timeout_s=cfg.timeout_s) as client:
        v = Validator(cfg, identity, client)
        try:
            await v.setup()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise UsageError(f"cannot reach the coordinator at {cfg.coordinator}: {e}") from None
        print(
            f"validator {v.key[:16]} follows {cfg.task}: replica of "
            f"{v.replica.outer.numel if v.replica else 0} params",
            file=sys.stderr,
            flush=True,
        )
        idle_since = time.monotonic()
        try:
            while True:
                try:
                    view = await client.get(f"/v1/tasks/{cfg.task}")
                    got = await v.poll()
                except _NET_ERRORS as e:
                    log.warning("reading %s: %s", cfg.task, e)
                    await asyncio.sleep(cfg.poll_s)
                    continue
                now = time.monotonic()
                if got:
                    idle_since = now
                done = view["state"] in _DONE
                active = sum(m["status"] in _ACTIVE for m in view["members"])
                await v.judge_ready(
                    members=max(1, active), settled=done or now - idle_since > cfg.settle_s
                )
                if done:
                    break
                if cfg.idle_exit_s and now - idle_since > cfg.idle_exit_s:
                    break
                await asyncio.sleep(cfg.poll_s)
        finally:
            if v.replica is not None:
                v.replica.close()
        return {
            "task": cfg.task,
            "validator": v.key,
            **v.verdicts,
            "outer_step": (v.replica.step if v.replica else 0),
        }


def run(cfg: ValidatorConfig) -> dict[str, Any]:
    if not cfg.task:
        raise UsageError("which task? give --task")
    try:
        identity = Identity.load_or_create(cfg.key)
    except ValueError as e:
        raise UsageError(f"{cfg.key}: not an ed25519 key: {e}") from None
    return asyncio.run(_run(cfg, identity))
