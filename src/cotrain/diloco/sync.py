"""Synchronisation with the other workers: one outer step (DiLoCo) or one gradient (DDP).

Each attempt is the same sequence of agreed phases on every peer, so peers never wait for a
collective that another peer skipped:

1. ``update_topology()``: admit joiners, drop the dead; only when there is something to do
   (``Communicator.vote_wanted``: the master announced joiners, a peer failed, fewer than
   ``min_workers``) or the caller asks for it. A member that skipped it while another votes
   fails its next phase with a retryable error and votes on the retry;
2. ``sync_shared_state()``: every replica's shared tensors are hashed; one that differs (a
   joiner, a worker restored from an older checkpoint) fetches the majority's in place. DiLoCo
   passes the tokens each worker contributes as its weight and gets their total back;
3. (DiLoCo) the pseudo-gradients, scaled by tokens / total tokens, are summed (quantized on the
   wire); (DDP) the gradients are averaged.

A failure (a peer killed or cut, a request timed out) raises on every survivor; the inputs are
left as they were, so the attempt is simply repeated with the new topology (commit or roll
back, per step).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from cotrain.comm.communicator import Communicator, SyncResult
from cotrain.comm.config import Quantization
from cotrain.comm.errors import PeerFailedError, RevisionError, TopologyChangedError
from cotrain.core.clock import Deadline
from cotrain.core.errors import TimeoutExpired
from cotrain.diloco.errors import RoundFailedError
from cotrain.diloco.metrics import Clocks

log = logging.getLogger("cotrain.diloco")


class EventLog(Protocol):
    """Where ``failed`` records go (``MetricsLog`` in the trainer)."""

    def write(self, event: str, **fields: Any) -> None: ...


_FOLLOW = re.compile(r"does not follow (\d+)")


@dataclass(frozen=True)
class SyncOutcome:
    fetched: bool
    """This replica's shared state was replaced by the majority's."""
    total_weight: float
    """Tokens contributed by all workers (DiLoCo); 0 means nobody had work to contribute."""
    world: int
    attempts: int


class Synchronizer:
    """Runs synchronisation rounds with retries; accounts their time in ``clocks``."""

    def __init__(
        self,
        comm: Communicator,
        *,
        clocks: Clocks,
        log_: EventLog | None,
        retries: int,
        revision_hint: int = 0,
        min_workers: int = 1,
        min_workers_timeout_s: float = 600.0,
    ) -> None:
        self.comm = comm
        self.min_workers = min_workers
        self.min_workers_timeout_s = min_workers_timeout_s
        self.clocks = clocks
        self.log = log_
        self.retries = retries
        self.revision_hint = revision_hint
        self.synced_epoch = -1

    def _state(self, state: dict[str, torch.Tensor], *, weight: float = 0.0) -> SyncResult:
        """Shared-state sync; a fresh process takes its revision from a hint (0, or the
        checkpoint's) and, if a live master expects another one, from the master's answer."""
        rev = self.comm.revision
        revision = rev + 1 if rev is not None else self.revision_hint
        try:
            res = self.comm.sync_shared_state(state, revision=revision, weight=weight)
        except RevisionError as e:
            found = _FOLLOW.search(str(e))
            if rev is not None or found is None:
                raise
            res = self.comm.sync_shared_state(state, revision=int(found[1]) + 1, weight=weight)
        self.synced_epoch = self.comm.epoch
        return res

    def run(
        self,
        attempt: Callable[[bool], SyncOutcome],
        *,
        vote: bool,
        step: int,
    ) -> SyncOutcome:
        """Call ``attempt(vote)`` until it succeeds, voting before every retry."""
        last: Exception | None = None
        for k in range(self.retries + 1):
            t0 = time.perf_counter()
            try:
                out = attempt(vote)
                return SyncOutcome(out.fetched, out.total_weight, out.world, k + 1)
            # A timeout (the master or a peer stayed silent past request_timeout_s) is retried
            # too: the vote that starts the retry realigns every member's phase numbers.
            except (PeerFailedError, TopologyChangedError, TimeoutExpired) as e:
                last = e
                self.clocks.waiting_s += time.perf_counter() - t0
                log.info("synchronisation at step %d failed (%s); retrying", step, e)
                if self.log is not None:
                    self.log.write(
                        "failed",
                        step=step,
                        attempt=k,
                        error=type(e).__name__,
                        message=str(e)[:200],
                    )
                vote = True
        raise RoundFailedError(
            f"synchronisation at step {step} failed {self.retries + 1} times, the last with "
            f"{type(last).__name__}: {last}"
        )

    def _vote(self, vote: bool) -> None:
        if not (vote or self.comm.vote_wanted or self.comm.world_size < self.min_workers):
            return
        t0 = time.perf_counter()
        self.comm.update_topology()
        # Blocking join: with fewer than min_workers, keep voting until joiners arrive. A vote
        # among members only returns at once, so pause between votes instead of spinning.
        deadline = Deadline.after(self.min_workers_timeout_s)
        while self.comm.world_size < self.min_workers:
            deadline.check(f"{self.min_workers} workers")
            threading.Event().wait(min(0.2, deadline.remaining()))
            self.comm.update_topology()
        self.clocks.waiting_s += time.perf_counter() - t0

    def outer(
        self,
        state: dict[str, torch.Tensor],
        delta: torch.Tensor,
        out: torch.Tensor,
        *,
        tokens: int,
        quantization: Quantization,
        vote: bool,
        step: int,
        span: Callable[[], slice] | None = None,
    ) -> SyncOutcome:
        """DiLoCo: ``out`` (N,) = token-weighted mean of the workers' ``delta`` (N,); with
        ``span``, only ``out[span()]`` from ``delta[span()]``, the slice chosen after the
        shared-state sync (streaming fragments: it depends on the agreed outer step)."""
        whole_delta, whole_out = delta, out

        def attempt(vote: bool) -> SyncOutcome:
            self._vote(vote)
            t0 = time.perf_counter()
            # The token total comes back with the state check (no collective of its own). A
            # replica whose outer state was just replaced computed its delta from another
            # starting point: it counts zero there and takes part in the all-reduce with
            # weight zero.
            res = self._state(state, weight=float(tokens))
            sl = span() if span is not None else slice(None)
            delta, out = whole_delta[sl], whole_out[sl]
            weight = 0.0 if res.fetched else float(tokens)
            total = res.total_weight
            if total > 0:
                torch.mul(delta, weight / total, out=out)
            else:
                out.zero_()
            # rollback=False: ``out`` is rebuilt from ``delta`` by the next attempt
            self.comm.all_reduce(out, op="sum", quantization=quantization, rollback=False)
            self.clocks.comm_s += time.perf_counter() - t0
            return SyncOutcome(res.fetched, total, self.comm.world_size, 1)

        return self.run(attempt, vote=vote, step=step)

    def gradients(
        self,
        state: dict[str, torch.Tensor],
        grads: torch.Tensor,
        *,
        recompute: Callable[[], None],
        quantization: Quantization,
        vote: bool,
        step: int,
    ) -> SyncOutcome:
        """DDP: ``grads`` (N,) averaged in place; the shared state (params, AdamW moments, step)
        is synced only when the membership changed, and a replica that fetched it recomputes
        its gradient (``recompute`` refills ``grads``) before the all-reduce."""

        def attempt(vote: bool) -> SyncOutcome:
            self._vote(vote)
            t0 = time.perf_counter()
            fetched = False
            if self.comm.epoch != self.synced_epoch:
                fetched = self._state(state).fetched
                if fetched:
                    self.clocks.comm_s += time.perf_counter() - t0
                    recompute()
                    t0 = time.perf_counter()
            self.comm.all_reduce(grads, op="avg", quantization=quantization)
            self.clocks.comm_s += time.perf_counter() - t0
            return SyncOutcome(fetched, 1.0, self.comm.world_size, 1)

        return self.run(attempt, vote=vote, step=step)
