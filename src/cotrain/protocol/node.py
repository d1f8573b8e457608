"""``cotrain node``: the agent on a contributor's machine.

It registers the node's key with the coordinator, joins a task (with an invite, or one that
admits openly), keeps the admission token the coordinator hands out (the run's master admits
the key with it), heartbeats, and runs the task's role: a DiLoCo worker (``Worker`` with the
task's TrainConfig). Each pseudo-gradient the worker puts into an outer step is written to the
task's store and submitted as signed work (``runs.py``); validators judge it. A node the
coordinator ejects stops at its next outer step. At the end it leaves the task and reports
what it earned.

The coordinator is reached from a background thread with its own event loop (the worker
trains in the calling thread); every call has a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import torch
from pydantic import Field

from cotrain.comm.faults import FaultPlan
from cotrain.core.config import ConfigModel
from cotrain.core.errors import UsageError
from cotrain.core.files import write_atomic
from cotrain.core.identity import Identity
from cotrain.core.signed import canonical
from cotrain.diloco.diloco import SyncReport
from cotrain.protocol import runs
from cotrain.protocol.client import Client
from cotrain.protocol.errors import Conflict, Forbidden, NotFound, ProtocolError

log = logging.getLogger("cotrain.protocol")
T = TypeVar("T")
_NET_ERRORS = (ProtocolError, aiohttp.ClientError, OSError, TimeoutError)


class NodeWorker(ConfigModel):
    """This machine's side of the task's run (the rest of its config comes from the task)."""

    listen_host: str = "127.0.0.1"
    """Where the worker's ring server listens (0.0.0.0 for other machines)."""
    listen_port: int = Field(default=0, ge=0, le=65535)
    advertise_host: str | None = None
    """The address the other workers dial (behind NAT: the public one)."""
    advertise_port: int | None = None
    faults: FaultPlan = Field(default_factory=FaultPlan)
    """Faults to inject into this worker's collectives (tests, drills)."""


class NodeConfig(ConfigModel):
    """``cotrain node --coordinator URL --key node.pem``."""

    coordinator: str = "http://127.0.0.1:8740"
    """The coordinator's URL."""
    key: str = "node.pem"
    """This node's ed25519 key (created if missing): its identity, credit and shares."""
    name: str = ""
    """The name it registers under (default: the host name)."""
    task: str = ""
    """The task to join (default: the first open diloco task that admits openly); a diloco
    task makes this node a DiLoCo worker, an rl task one of its inference workers."""
    invite: str = ""
    """An invite id from the task's initiator (tasks that admit by invite)."""
    work_dir: str = "cotrain-node"
    """Where the admission token and the worker's run directory go."""
    timeout_s: float = Field(30.0, gt=0)
    """Deadline of each call to the coordinator."""
    threads: int = Field(1, ge=1)
    """torch threads of the worker."""
    worker: NodeWorker = Field(default_factory=NodeWorker)


def _machine() -> dict[str, Any]:
    """What this machine is (CPUs, memory, GPUs; ``market/probe.py``), in the node's identity:
    a launcher compares it with the offer it paid for."""
    from cotrain.market.probe import facts

    try:
        return facts()
    except Exception:
        return {}


class NodeEjected(Exception):
    """The coordinator ejected this node from the task (its work was hard-rejected)."""


class Agent:
    """The node's link to the coordinator: a loop thread, heartbeats, work records."""

    def __init__(self, cfg: NodeConfig, identity: Identity) -> None:
        self.cfg = cfg
        self.identity = identity
        self.key = identity.public_hex
        self.task = ""
        self.store = ""
        self.ejected: str | None = None
        self.submitted = 0
        self.unrecorded = 0
        self.pending: dict[int, tuple[str, int]] = {}  # outer step -> (work key, tokens)
        self.sent_bytes: Callable[[], int] = lambda: 0
        """Bytes this node's worker has sent to the ring so far (set once it runs)."""
        self._since = (time.monotonic(), 0)  # the last report: when, and bytes sent by then
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cotrain-node")
        self._client = Client(cfg.coordinator, identity, timeout_s=cfg.timeout_s)
        self._beat: concurrent.futures.Future[None] | None = None

    def __enter__(self) -> Agent:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._beat is not None:
            self._beat.cancel()
        try:
            self.call(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread; its result (bounded by the call deadline)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout=self.cfg.timeout_s * 2)

    # ---- joining --------------------------------------------------------------------------

    def register(self) -> None:
        c = self._client
        try:
            rec = self.call(c.get(f"/v1/identities/{self.key}"))
            if "node" in rec.get("roles", []):
                return
            roles = sorted({*rec["roles"], "node"})
        except NotFound:
            roles = ["node"]
        name = self.cfg.name or socket.gethostname()[:60] or "node"
        self.call(c.register(roles, name, _machine()))

    def pick_task(self) -> dict[str, Any]:
        c = self._client
        if self.cfg.task:
            try:
                task: dict[str, Any] = self.call(c.get(f"/v1/tasks/{self.cfg.task}"))
            except NotFound:
                raise UsageError(f"the coordinator has no task {self.cfg.task}") from None
            return task
        tasks = self.call(c.get("/v1/tasks"))["tasks"]
        for t in tasks:
            if t["state"] == "open" and t["kind"] == "diloco" and t["admission"] == "open":
                return self.call(c.get(f"/v1/tasks/{t['id']}"))
        raise UsageError(
            "no open diloco task admits nodes openly: name one with --task (and --invite)"
        )

    def join(self, task: dict[str, Any]) -> dict[str, Any]:
        """Join ``task``; returns the join answer (with the comm admission token)."""
        self.task = task["id"]
        body = {"invite": self.cfg.invite} if self.cfg.invite else {}
        path = f"/v1/tasks/{self.task}/join"
        try:
            try:
                return self.call(self._client.write(path, body))
            except Conflict:
                # still a member (this node restarted): the admission token comes with a join,
                # so leave and join again (a task that admits by invite needs a new invite)
                self.call(self._client.write(f"/v1/tasks/{self.task}/leave", {}))
                return self.call(self._client.write(path, body))
        except Forbidden as e:
            raise UsageError(f"cannot join {self.task}: {_why(e)}") from None

    def worker_index(self) -> int:
        """This node's place in the task's join order: its data shard."""
        view = self.call(self._client.get(f"/v1/tasks/{self.task}"))
        order = sorted(view["members"], key=lambda m: (m["since_seq"], m["node"]))
        for i, m in enumerate(order):
            if m["node"] == self.key:
                return i
        raise ProtocolError(f"{self.task} does not list this node among its members")

    # ---- while it runs ------------------------------------------------------------------------

    def start_heartbeats(self, every_s: float) -> None:
        self._beat = asyncio.run_coroutine_threadsafe(self._heartbeats(every_s), self._loop)

    async def _heartbeats(self, every_s: float) -> None:
        while True:
            try:
                reply = await self._client.heartbeat(self.task)
                every_s = float(reply.get("heartbeat_s", every_s))
            except Forbidden as e:
                self.ejected = _why(e)
                log.error("the coordinator refuses this node: %s", self.ejected)
                return
            except _NET_ERRORS as e:
                log.warning("heartbeat failed: %s", e)
            await asyncio.sleep(every_s)

    def contribute(self, step: int, delta: torch.Tensor, tokens: int) -> None:
        """DiLoCo's hook, as the pseudo-gradient of outer step ``step`` enters the average: put
        it in the store. It is recorded as work once the synchronisation says whether the run
        used it (``reported``); until then it is pending, in a file that outlives a crash."""
        if self.ejected is not None:
            raise NodeEjected(self.ejected)
        key = runs.put_pseudo_gradient(
            self.store, self.task, delta, {"task": self.task, "step": str(step), "node": self.key}
        )
        self.pending[step] = (key, tokens)
        self._save_pending()

    def reported(self, rep: SyncReport) -> None:
        """The worker's hook after each synchronisation: record the pending work, used by the
        run, or dropped by it (this worker's state was replaced by the run's: it fell behind,
        or the collective went on without it)."""
        now, sent = time.monotonic(), self.sent_bytes()
        (then, sent_then), self._since = self._since, (now, sent)
        for step in sorted(self.pending):
            key, tokens = self.pending.pop(step)
            meta: dict[str, Any]
            if not rep.fetched and step == rep.outer_step - 1:
                # what the dashboard shows as the node's throughput and traffic
                meta = {
                    "used": True,
                    "world": rep.world,
                    "tokens_per_s": round(tokens / max(now - then, 1e-3), 1),
                    "sent_mb": round((sent - sent_then) / 1e6, 3),
                }
            else:
                why = "this worker's state was replaced by the run's (it fell behind)"
                meta = {"used": False, "why": why}
            self._submit(step, key, tokens, meta)
        self._save_pending()

    def flush_unfinished(self) -> None:
        """Record what a previous run of this node left pending: the run went on without it
        (the node stopped before that synchronisation finished). Its credit is not lost."""
        path = self._pending_path()
        try:
            left = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            log.warning("%s is not JSON: ignored", path)
            return
        why = "the node stopped before the run's synchronisation finished"
        for step, (key, tokens) in sorted((int(k), v) for k, v in left.items()):
            if runs.artifact_path(self.store, self.task, key).exists():
                self._submit(step, key, int(tokens), {"used": False, "why": why})
        path.unlink(missing_ok=True)

    def _submit(self, step: int, key: str, tokens: int, meta: dict[str, Any]) -> None:
        body = {"work_key": key, "kind": runs.WORK_KIND, "units": tokens, "step": step}
        body["meta"] = meta
        try:
            self.call(self._client.write(f"/v1/tasks/{self.task}/work", body))
            self.submitted += 1
        except Forbidden as e:
            self.ejected = _why(e)
            raise NodeEjected(self.ejected) from None
        except Conflict:  # the same bytes again (a resumed step): recorded already
            pass
        except _NET_ERRORS as e:
            self.unrecorded += 1
            log.warning("work of outer step %d not recorded: %s", step, e)

    def _pending_path(self) -> Path:
        return Path(self.cfg.work_dir) / self.task / "pending-work.json"

    def _save_pending(self) -> None:
        body = {str(k): list(v) for k, v in self.pending.items()}
        write_atomic(self._pending_path(), json.dumps(body).encode())

    def leave(self) -> None:
        try:
            self.call(self._client.write(f"/v1/tasks/{self.task}/leave", {}))
        except _NET_ERRORS as e:
            log.warning("leaving %s: %s", self.task, e)

    def account(self) -> dict[str, Any]:
        try:
            view: dict[str, Any] = self.call(self._client.get(f"/v1/tasks/{self.task}"))
        except _NET_ERRORS:
            return {}
        return next((m for m in view["members"] if m["node"] == self.key), {})


def _why(e: Exception) -> str:
    """What the coordinator said (its reason without method, path and status)."""
    return (getattr(e, "reason", "") or str(e))[:200]


def _run_rl(cfg: NodeConfig, agent: Agent, spec: runs.RLSpec) -> dict[str, Any]:
    """An ``rl`` task: this node is one of its inference workers. The worker records each
    rollout the orchestrator takes in as work, and heartbeats, itself (``rl.worker``)."""
    from cotrain.rl.worker import Worker as RLWorker

    work = Path(cfg.work_dir) / agent.task
    rl_cfg = spec.worker_config(
        agent.task, key=Path(cfg.key), coordinator=cfg.coordinator, out_dir=work / "rl"
    )
    print(
        f"node {agent.key[:16]} joined {agent.task}: inference worker of {spec.orchestrator}",
        file=sys.stderr,
        flush=True,
    )
    from cotrain.rl.client import Refused

    worker = RLWorker(rl_cfg)
    try:
        asyncio.run(worker.run())
    except Refused as e:
        if e.status == 403:  # the orchestrator banned this key
            raise NodeEjected(str(e)) from None
        raise
    finally:
        agent.leave()
    member = agent.account()
    return {
        **worker.summary(),
        "task": agent.task,
        "node": agent.key,
        "accepted_units": member.get("accepted_units"),
        "earned": member.get("earned"),
        "locked": member.get("locked"),
    }


def run(cfg: NodeConfig) -> dict[str, Any]:
    """Run the node to the end of its task's run; its summary."""
    from cotrain.diloco.worker import Worker

    try:
        identity = Identity.load_or_create(cfg.key)
    except ValueError as e:
        raise UsageError(f"{cfg.key}: not an ed25519 key: {e}") from None
    with Agent(cfg, identity) as agent:
        try:
            agent.register()
            task = agent.pick_task()
            if task.get("kind") == "rl":
                rl_spec = runs.RLSpec.of(task)
                agent.join(task)
                return _run_rl(cfg, agent, rl_spec)
            spec = runs.DiLoCoSpec.of(task)
            joined = agent.join(task)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise UsageError(f"cannot reach the coordinator at {cfg.coordinator}: {e}") from None
        agent.store = spec.store
        work = Path(cfg.work_dir) / agent.task
        token = work / "admission-token.json"
        work.mkdir(parents=True, exist_ok=True)
        write_atomic(token, canonical(joined["admission_token"]))
        agent.flush_unfinished()
        index = agent.worker_index()
        train = spec.train_config(
            agent.task,
            comm={
                "key_file": cfg.key,
                "token_file": str(token),
                "secret": "",
                **cfg.worker.model_dump(exclude={"faults"}),
            },
            faults=cfg.worker.faults.model_dump(),
            worker_index=index,
            out_dir=str(work / "run"),
            threads=cfg.threads,
        )
        print(
            f"node {identity.public_hex[:16]} joined {agent.task} as worker {index}: "
            f"master {spec.master}",
            file=sys.stderr,
            flush=True,
        )
        agent.start_heartbeats(10.0)
        left = False
        try:
            worker = Worker(train, on_contribution=agent.contribute, on_outer=agent.reported)
            agent.sent_bytes = lambda: worker.comm.bytes_sent if worker.comm is not None else 0
            agent._since = (time.monotonic(), 0)
            summary = worker.run()
            agent.leave()
            left = True
        finally:
            if not left and agent.ejected is None:
                agent.leave()
        member = agent.account()
        return {
            **summary,
            "task": agent.task,
            "node": agent.key,
            "work_submitted": agent.submitted,
            "work_unrecorded": agent.unrecorded,
            "accepted_units": member.get("accepted_units"),
            "earned": member.get("earned"),
            "locked": member.get("locked"),
        }
