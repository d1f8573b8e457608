"""Records a running job's work and verdicts with the coordinator, in the background.

The RL worker records each rollout the orchestrator took in (``work``), the RL orchestrator
each final verdict (``verdict``). Neither may hold up the job, so writes go through a queue
that one task drains, in order, each signed with the recorder's key:

* a verdict on work the coordinator does not know yet (its worker has not recorded it: the
  two race) is tried again for ``patience_s``;
* an unreachable or busy coordinator (connection errors, 429, 503) is tried again with
  backoff, for as long as it takes; the queue holds up to ``max_queue`` writes, and a write
  that does not fit is counted in ``lost`` and logged, never dropped silently;
* a write the coordinator refuses for good (judged already, a duplicate: 409; not a member or
  not a validator: 403; a malformed body: 400) is counted in ``refused`` with its reason.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import aiohttp

from cotrain.core.identity import Identity
from cotrain.protocol.client import Client
from cotrain.protocol.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ProtocolError,
    RateLimited,
    RequestError,
    Unavailable,
)

log = logging.getLogger("cotrain.protocol")
_RETRY = (RateLimited, Unavailable, aiohttp.ClientError, OSError, TimeoutError)


class Recorder:
    def __init__(
        self,
        url: str,
        identity: Identity,
        task: str,
        *,
        patience_s: float = 120.0,
        max_queue: int = 100_000,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self.identity = identity
        self.task = task
        self.patience_s = patience_s
        self.max_queue = max_queue
        self.client = Client(url, identity, timeout_s=timeout_s)
        self.sent = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.lost = 0
        self._queue: collections.deque[tuple[str, dict[str, Any], float]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- joining (a node's side) ----------------------------------------------------------------

    async def join_as_node(self, name: str, invite: str = "") -> dict[str, Any]:
        """Register this key as a node (if it is not) and join the task (if not a member)."""
        c = self.client
        try:
            rec = await c.get(f"/v1/identities/{self.identity.public_hex}")
            if "node" not in rec["roles"]:
                await c.register(sorted({*rec["roles"], "node"}), name)
        except NotFound:
            await c.register(["node"], name)
        try:
            return await c.write(
                f"/v1/tasks/{self.task}/join", {"invite": invite} if invite else {}
            )
        except Conflict:  # a member already (a restarted worker)
            return {"task": self.task, "status": "member"}

    async def heartbeats(self, every_s: float = 10.0) -> None:
        """Until cancelled: keep this node's membership alive."""
        while True:
            try:
                reply = await self.client.heartbeat(self.task)
                every_s = float(reply.get("heartbeat_s", every_s))
            except Forbidden as e:
                log.error("the coordinator refuses this node's heartbeats: %s", e)
                return
            except (ProtocolError, *_RETRY) as e:
                log.warning("heartbeat failed: %s", e)
            await asyncio.sleep(every_s)

    # ---- recording --------------------------------------------------------------------------

    def work(self, work_key: str, kind: str, units: int, step: int, **meta: Any) -> None:
        body = {"work_key": work_key, "kind": kind, "units": units, "step": step, "meta": meta}
        self._put(f"/v1/tasks/{self.task}/work", body)

    def verdict(self, work_key: str, verdict: str, reason: str = "") -> None:
        body = {"work_key": work_key, "verdict": verdict, "reason": reason[:300]}
        self._put(f"/v1/tasks/{self.task}/verdicts", body)

    def report(self, step: int, metrics: dict[str, float], note: str = "") -> None:
        """The task's progress at ``step`` (a validator's or the initiator's word)."""
        body: dict[str, Any] = {"step": step, "metrics": metrics}
        if note:
            body["note"] = note[:200]
        self._put(f"/v1/tasks/{self.task}/reports", body)

    def _put(self, path: str, body: dict[str, Any]) -> None:
        if len(self._queue) >= self.max_queue:
            self.lost += 1
            log.error("recorder queue full (%d): %s not recorded", self.max_queue, path)
            return
        self._queue.append((path, body, time.monotonic()))
        self._idle.clear()
        self._wake.set()

    @property
    def pending(self) -> int:
        """Writes queued, not yet answered."""
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until the queue is empty (or ``timeout_s``); whether it emptied."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout_s: float = 10.0) -> None:
        await self.flush(timeout_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue:
            log.warning("%d writes to the coordinator left unsent", len(self._queue))
        await self.client.close()

    async def _drain(self) -> None:
        backoff = 0.5
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            path, body, since = self._queue[0]
            try:
                await self.client.write(path, body)
                self.sent += 1
            except NotFound as e:
                if time.monotonic() - since < self.patience_s:  # its work is not in yet
                    self._queue.rotate(-1)
                    await asyncio.sleep(min(1.0, backoff))
                    continue
                self.refused[f"not found: {_why(e)}"] += 1
            except (Conflict, Forbidden, RequestError) as e:
                self.refused[_why(e)] += 1
                log.info("coordinator refused %s: %s", path, e)
            except _RETRY as e:
                log.warning("coordinator unreachable (%s): retrying in %.1f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._queue.popleft()
            backoff = 0.5


def _why(e: Exception) -> str:
    """What the coordinator said (its reason without method, path and status)."""
    return (getattr(e, "reason", "") or str(e))[:200]
