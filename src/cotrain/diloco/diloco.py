"""``DiLoCo``: low-communication training around *your* model, optimizer and loop.

::

    comm = Communicator(CommConfig(...)); comm.connect()
    with DiLoCo(comm, model, inner_optimizer, sync_every=50, quantization="int8") as diloco:
        while diloco.inner_step < total_steps:
            loss = model(**next(batches)).loss; loss.backward()
            inner_optimizer.step(); inner_optimizer.zero_grad()
            diloco.step(tokens=n)   # after every inner step; synchronises at the sync points

Every ``sync_every`` inner steps (a *sync point*; with ``fragments`` F, every
``sync_every / F`` steps for one fragment of the parameters) the workers average their
pseudo-gradients (outer params - local params), token-weighted and quantized on the wire
(``Synchronizer.outer``), and take one outer Nesterov step on the fp32 outer state, which then
replaces the local params. With ``overlap`` the averaging runs in the background during the
next inner phase and its update lands one phase late, keeping the local progress made since.
``inner_time_s`` bounds each inner phase by time instead (mixed-speed workers).

Membership is elastic: a worker that enters a run in progress (the master reports a shared
state) takes part in the next synchronisation with weight zero, receives the outer state there
and trains from the next phase; ``inner_step`` then tells it where the run is. A synchronisation
that loses a peer is retried with the survivors. With ``checkpoint_dir``, the outer state, the
model, the inner optimizer and ``extra_state`` are saved (atomically) as each synchronisation
starts, and a restarted worker resumes from there; a checkpoint of a run with another config is
refused with the difference named (``allow_config_change`` overrides).

Every replica that enters an outer step with the same state leaves it with the same state, bit
for bit (``outer.py``), so all workers that finish the run hold bit-identical parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from cotrain.comm.communicator import Communicator
from cotrain.comm.config import Quantization
from cotrain.core.errors import UsageError
from cotrain.diloco import checkpoint
from cotrain.diloco.config import OuterConfig
from cotrain.diloco.errors import ConfigMismatchError, RunEndedError
from cotrain.diloco.fragments import Schedule, split
from cotrain.diloco.metrics import Clocks
from cotrain.diloco.outer import OuterState, flatten, load_flat
from cotrain.diloco.sync import EventLog, Synchronizer, SyncOutcome

_QUANTS = ("none", "fp16", "bf16", "int8", "int4")


class Stateful(Protocol):
    """What ``extra_state`` must offer (a data loader's position, a step counter, ...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SyncReport:
    """One finished synchronisation, as handed to ``on_sync``."""

    outer_step: int
    """Sync points completed by the run (the outer step count)."""
    step: int
    """The inner step the run is at."""
    fetched: bool
    """This worker's outer state was replaced by the majority's (joined, fell behind)."""
    world: int
    """Workers in the synchronisation."""
    total_tokens: float
    """Tokens all workers contributed to it (their weights)."""
    digest: str
    """SHA-256 prefix of the outer state after it: equal on every worker."""
    val_loss: float | None
    """``evaluate()`` of the consensus (outer) model, when it was due."""
    attempts: int


@dataclass(frozen=True)
class _InFlight:
    tokens: int
    future: Future[SyncOutcome]


@dataclass(frozen=True)
class _Applied:
    fetched: bool
    report: Callable[[], SyncReport]


def _check_quant(q: str) -> None:
    if q not in _QUANTS:
        raise UsageError(f"quantization={q!r}: choose one of {', '.join(_QUANTS)}")


class DiLoCo:
    """DiLoCo around a model and its inner optimizer; see the module docstring.

    Arguments beyond the model and optimizer:

    * ``sync_every`` (H), ``fragments``, ``overlap``, ``inner_time_s``, ``quantization``:
      the algorithm (see ``AlgoConfig`` for each);
    * ``outer_lr``, ``outer_momentum``, ``outer_method``: the outer SGD;
    * ``total_steps``: the run's length in inner steps (the last phase is shorter when it is
      not a multiple of H); needed for the final synchronisation of every fragment when
      ``fragments > 1``;
    * ``world``: at the start of a run, wait for this many workers before the first step;
    * ``min_workers`` / ``min_workers_timeout_s`` / ``retries``: elasticity;
    * ``checkpoint_dir`` / ``checkpoint_every`` (sync points) / ``extra_state`` /
      ``run_config`` (recorded and compared on resume) / ``allow_config_change``;
    * ``evaluate`` / ``eval_every`` (outer steps): a validation loss of the consensus model,
      reported to ``on_sync`` after each synchronisation (and, at the start of a fresh run, of
      the initial model as outer step 0); its time is counted in ``clocks.eval_s``;
    * ``params``: the parameters to train together (default: those that require grad, in
      ``model.parameters()`` order; frozen ones, e.g. a LoRA base, must be equal everywhere);
    * ``on_contribution(outer_step, pseudo_gradient, tokens)``: called at each sync point
      before this worker's pseudo-gradient (a view of its fragment, flat) enters the average,
      e.g. to record the work with a coordinator; an exception from it stops the run;
    * ``clocks`` / ``log``: time accounting and a sink for ``failed`` records (the trainer's).
    """

    def __init__(
        self,
        comm: Communicator,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        sync_every: int = 50,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_method: Literal["nesterov", "heavy_ball"] = "nesterov",
        quantization: Quantization = "int8",
        fragments: int = 1,
        overlap: bool = False,
        inner_time_s: float | None = None,
        total_steps: int | None = None,
        world: int | None = None,
        min_workers: int = 1,
        min_workers_timeout_s: float = 600.0,
        retries: int = 8,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        extra_state: Stateful | None = None,
        run_config: dict[str, Any] | None = None,
        allow_config_change: bool = False,
        evaluate: Callable[[], float] | None = None,
        eval_every: int = 1,
        on_sync: Callable[[SyncReport], None] | None = None,
        on_contribution: Callable[[int, torch.Tensor, int], None] | None = None,
        params: list[nn.Parameter] | None = None,
        clocks: Clocks | None = None,
        log: EventLog | None = None,
    ) -> None:
        if sync_every < 1 or fragments < 1 or sync_every % fragments:
            raise UsageError(
                f"sync_every={sync_every} must be a positive multiple of fragments={fragments}"
            )
        if inner_time_s is not None and inner_time_s <= 0:
            raise UsageError(f"inner_time_s={inner_time_s} must be positive")
        if total_steps is not None and total_steps < 1:
            raise UsageError(f"total_steps={total_steps} must be positive")
        if checkpoint_every < 1 or eval_every < 1 or retries < 0 or min_workers < 1:
            raise UsageError("checkpoint_every, eval_every and min_workers must be >= 1")
        _check_quant(quantization)
        self.comm = comm
        self.model = model
        self.optimizer = inner_optimizer
        self.params = (
            params if params is not None else [p for p in model.parameters() if p.requires_grad]
        )
        if not self.params:
            raise UsageError("the model has no parameter that requires grad")
        self.H = sync_every
        self.quantization: Quantization = quantization
        self.overlap = overlap
        self.inner_time_s = inner_time_s
        self.total_steps = total_steps
        self.world = world
        self.min_workers = min_workers
        self.min_workers_timeout_s = min_workers_timeout_s
        self.retries = retries
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.extra_state = extra_state
        self.allow_config_change = allow_config_change
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.on_sync = on_sync
        self.on_contribution = on_contribution
        self.clocks = clocks or Clocks()
        self.log = log
        self.outer = OuterState(
            self.params, OuterConfig(lr=outer_lr, momentum=outer_momentum, method=outer_method)
        )
        rounds = math.ceil(total_steps / sync_every) if total_steps else (1 << 40) // sync_every
        # a total that is not a multiple of H ends with a shorter phase
        self.schedule = Schedule(sync_every, fragments, rounds, stop=total_steps)
        self.frags = split(self.params, fragments)
        n = self.outer.numel
        self.delta = torch.zeros(n)  # this worker's pseudo-gradient (N,)
        self.avg = torch.zeros(n)  # the workers' token-weighted mean (N,)
        # local params when delta was taken (N,): only overlap trains between taking a
        # pseudo-gradient and applying its average (without, that is N floats saved)
        self.anchor = torch.zeros(n if overlap else 0)
        self.since = [0] * fragments  # tokens trained since each fragment was sent
        self.tokens = 0
        """Tokens this worker trained on (all phases)."""
        self.inner_step = 0
        """The run's inner step (the schedule position; agreed by all workers at sync points)."""
        self.resumed = False
        """Whether ``__enter__`` resumed from ``checkpoint_dir``."""
        self.joined_run = False
        """Whether ``__enter__`` joined a run in progress (and received its state)."""
        self.run_config = {
            "diloco": {
                "sync_every": sync_every,
                "fragments": fragments,
                "overlap": overlap,
                "inner_time_s": inner_time_s,
                "quantization": quantization,
                "outer": self.outer.config.model_dump(),
                "total_steps": total_steps,
            },
            "params": _shapes_digest(model, self.params),
            "run": run_config or {},
        }
        # The settings every worker must share, hashed into the shared state: a worker whose
        # settings differ from the majority's gets theirs at its first synchronisation, and
        # stops with ConfigMismatchError instead of drifting away from the others.
        blob = json.dumps(self.run_config, sort_keys=True, default=str).encode()
        code = int.from_bytes(hashlib.sha256(blob).digest()[:7], "big")
        self._config_code = torch.tensor([code], dtype=torch.int64)
        self._expected_code = code
        self._pending: int | None = None  # resumed with a synchronisation to start again
        self._revision_hint = 0
        self._flight: _InFlight | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._sync: Synchronizer | None = None
        self._entered = False
        self._resume_checked = False
        self._k = 0  # the sync point the current phase ends at
        self._end = 0  # its inner step
        self._h = 0  # inner steps in this phase
        self._t_end = 0.0

    # ---- entering and leaving -----------------------------------------------------------------

    def warm_start(self, step: int, tokens: int = 0) -> None:
        """Start the outer state from the model's current params at inner step ``step`` (a
        multiple of ``sync_every / fragments``), e.g. after a DDP warm-up. Before entering."""
        if self._entered:
            raise UsageError("warm_start() comes before entering the DiLoCo context")
        if step % self.schedule.every:
            raise UsageError(
                f"warm start at step {step}: not a sync point (a multiple of "
                f"sync_every / fragments = {self.schedule.every})"
            )
        self.outer.params.copy_(flatten(self.params))
        self.outer.step[0] = step // self.schedule.every
        self.inner_step, self.tokens = step, tokens

    def resume(self) -> bool:
        """Load the newest save in ``checkpoint_dir``, if there is one (``__enter__`` does it
        when it was not called before); returns whether it did. A save of a run with another
        config raises ``ConfigChangedError`` naming the difference."""
        if self._resume_checked:
            return self.resumed
        self._resume_checked = True
        self.resumed = self._resume()
        return self.resumed

    def __enter__(self) -> DiLoCo:
        self._entered = True
        self.resume()
        comm = self.comm
        joining = comm.run_revision is not None
        t0 = time.perf_counter()
        if comm.rank < 0:
            if self.world and not joining:
                comm.wait_for_world(self.world, timeout_s=self.min_workers_timeout_s)
            else:
                comm.update_topology()
        self.clocks.waiting_s += time.perf_counter() - t0
        self._sync = Synchronizer(
            comm,
            clocks=self.clocks,
            log_=self.log,
            retries=self.retries,
            revision_hint=self._revision_hint,
            min_workers=self.min_workers,
            min_workers_timeout_s=self.min_workers_timeout_s,
        )
        if self.overlap:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cotrain-outer")
        if self._pending is not None:
            # resumed from a save taken as a synchronisation started: start it again (if the
            # others went on meanwhile, it fetches their state and starts over)
            self._flight = self._launch(tokens=self._pending, vote=True)
            self._pending = None
            if self._pool is None:
                self._report(self._finish(self._take_flight()))
        elif joining:
            # Nothing to contribute: take part in the synchronisation in progress with weight
            # zero (the vote in update_topology admitted us), receive the outer state there,
            # apply the same average as everyone and train from the next phase.
            self.joined_run = True
            self.delta.zero_()
            applied = self._finish(self._launch(tokens=0, vote=False))
            if not applied.fetched and comm.world_size == 1:
                raise RunEndedError(
                    f"the run at {comm.config.master_host}:{comm.config.master_port} has no "
                    "other worker left to take its state from (it ended, or all its workers "
                    "are gone): start a new run with a new master, or resume a worker from "
                    "its checkpoint"
                )
            self._report(applied)
        elif self.evaluate is not None and not self.resumed and self.inner_step == 0:
            # a fresh run: the consensus model before any training, as outer step 0
            val = self._evaluate_at(self.outer.params)
            if self.on_sync is not None:
                self.on_sync(
                    SyncReport(0, 0, False, comm.world_size, 0.0, self.outer.digest(), val, 0)
                )
        self._begin_phase()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=exc_type is None, cancel_futures=True)
                self._pool = None

    def finish(self) -> None:
        """End the run here: finish the synchronisation in flight and, with fragments, sync
        every fragment's last progress; then the model holds the consensus params (bit-equal
        on every worker). Called by ``__exit__``; every worker must stop at the same step."""
        if self._h and not self.finished:
            raise UsageError(
                f"finish() at inner step {self.inner_step}, between sync points: stop at a "
                f"multiple of {self.schedule.every} steps (e.g. while inner_step < total)"
            )
        if self.total_steps is None:  # the run ends here: its last fragment syncs follow
            rounds = max(1, math.ceil(self.inner_step / self.H))
            self.schedule = Schedule(self.H, self.schedule.fragments, rounds)
        while True:
            k = int(self.outer.step[0]) + (self._flight is not None)
            if k >= self.schedule.sync_points or self.schedule.end_step(k) > self.inner_step:
                break
            self._k, self._end = k, self.schedule.end_step(k)
            self._sync_point()
        if self._flight is not None:
            self._report(self._finish(self._take_flight()))
        if self.checkpoint_dir is not None:
            self._save(pending=None)

    @property
    def finished(self) -> bool:
        """Whether the run reached ``total_steps`` (no more inner steps to train)."""
        return self.total_steps is not None and self._k >= self.schedule.sync_points

    # ---- the inner loop's one call -----------------------------------------------------------

    def step(self, tokens: int = 1) -> bool:
        """Count one inner step of ``tokens`` tokens (its weight); at a sync point, synchronise.
        Returns True when an outer update was applied to the model by this call."""
        if not self._entered:
            raise UsageError("use DiLoCo as a context manager: with DiLoCo(...) as diloco:")
        if self.finished:
            raise UsageError(f"the run is over: total_steps={self.total_steps} reached")
        if tokens < 0:
            raise UsageError(f"step(tokens={tokens}): a step's weight cannot be negative")
        self._h += 1
        self.tokens += tokens
        self.since = [n + tokens for n in self.since]
        if self.inner_time_s is None:
            self.inner_step += 1
            due = self.inner_step >= self._end
        else:  # a time-bounded phase may run past its steps: hold the schedule position
            due = time.perf_counter() >= self._t_end
            self.inner_step = min(self.inner_step + 1, self._end - 1)
        if not due:
            return False
        self.inner_step = self._end
        self._sync_point()
        self._begin_phase()
        return True

    # ---- sync points --------------------------------------------------------------------------

    def _begin_phase(self) -> None:
        k = int(self.outer.step[0]) + (self._flight is not None)
        self._k = k
        self._h = 0
        if k < self.schedule.sync_points:
            self.inner_step = self.schedule.start_step(k)
            self._end = self.schedule.end_step(k)
        bound = self.inner_time_s
        self._t_end = time.perf_counter() + (bound / self.schedule.fragments if bound else 0.0)

    def _sync_point(self) -> None:
        """Finish the synchronisation in flight (apply its update), start this one's.

        Per fragment the local params are ``outer - in_flight - since``: the outer params,
        minus this worker's progress still being averaged, minus its progress since it was
        sent. A pseudo-gradient is ``outer - local`` taken right after the previous update of
        that fragment was applied; when the average comes back the local params become
        ``new outer - since``. Without overlap the average comes back at once (``since`` = 0,
        local = outer exactly), which is plain (streaming) DiLoCo."""
        applied = None
        if self._flight is not None:
            applied = self._finish(self._take_flight())
            if applied.fetched:  # our progress was measured from another state: start over
                self._report(applied)
                return
        fr = self.frags[self.schedule.fragment(self._k)]
        span = slice(fr.start, fr.stop)
        local = flatten([self.params[i] for i in fr.params])  # (n,)
        torch.sub(self.outer.params[span], local, out=self.delta[span])  # pseudo-gradient
        if self.overlap:
            self.anchor[span] = local
        tokens, self.since[fr.index] = self.since[fr.index], 0
        if self.on_contribution is not None and tokens > 0:
            # what this worker is about to put into the average (a record of its work): the
            # outer step, its pseudo-gradient (n,) (a view: copy to keep) and its weight
            self.on_contribution(self._k, self.delta[span], tokens)
        if self.checkpoint_dir is not None and self._k % self.checkpoint_every == 0:
            self._save(pending=tokens)
        # no forced vote: the synchroniser votes when the membership has to change
        self._flight = self._launch(tokens=tokens, vote=False)
        if applied is not None:
            # report (validate) only now: the synchronisation just started waits for every
            # worker to start it, so validating before would hold up the others too
            self._report(applied)
        if self._pool is None:
            self._report(self._finish(self._take_flight()))

    def _take_flight(self) -> _InFlight:
        flight, self._flight = self._flight, None
        assert flight is not None
        return flight

    def _launch(self, *, tokens: int, vote: bool) -> _InFlight:
        """Start the synchronisation of the next sync point (in the background with overlap).

        Its fragment is the one of the outer step the shared-state sync settles on: a replica
        that fetches the majority's state (a joiner, one that fell behind) reduces that
        fragment, with weight zero, so every peer's all-reduce has the same size."""
        assert self._sync is not None
        job = partial(
            self._sync.outer,
            {**self.outer.shared(), "diloco.config": self._config_code},
            self.delta,
            self.avg,
            span=self._span,
            tokens=tokens,
            quantization=self.quantization,
            vote=vote,
            step=self.inner_step,
        )
        if self._pool is not None:
            return _InFlight(tokens, self._pool.submit(job))
        done: Future[SyncOutcome] = Future()
        done.set_result(job())
        return _InFlight(tokens, done)

    def _span(self) -> slice:
        fr = self.frags[self.schedule.fragment(int(self.outer.step[0]))]
        return slice(fr.start, fr.stop)

    def _finish(self, flight: _InFlight) -> _Applied:
        """Wait for ``flight`` and apply its outer update (reported by the caller)."""
        t0 = time.perf_counter()
        out = flight.future.result(timeout=self._sync_timeout_s)
        if self._pool is not None:
            self.clocks.blocked_s += time.perf_counter() - t0
        if int(self._config_code[0]) != self._expected_code:
            raise ConfigMismatchError(
                "this worker's settings differ from the run's (the other workers'): every "
                "worker of a run must use the same sync_every, fragments, overlap, "
                "inner_time_s, quantization, outer optimizer, total_steps, model and "
                "run_config (cotrain train: the same model, data, inner, algo and "
                "total_steps)"
            )
        # the outer step is still the one the synchronisation settled on (only we change it)
        fr = self.frags[self.schedule.fragment(int(self.outer.step[0]))]
        span = slice(fr.start, fr.stop)
        if out.total_weight > 0:
            self.outer.apply(self.avg[span], start=fr.start)
        else:
            self.outer.step += 1  # nobody trained: skip the update, keep the schedule
        if out.fetched:
            load_flat(self.params, self.outer.params)
            self.since = [0] * len(self.frags)
        elif self.overlap:
            # local = new outer - progress since the pseudo-gradient was taken (exactly the
            # outer params when there was none, as at the end of the run)
            since = self.anchor[span] - flatten([self.params[i] for i in fr.params])
            load_flat([self.params[i] for i in fr.params], self.outer.params[span] - since)
        else:  # no inner step since the pseudo-gradient was taken: local = the new outer
            load_flat([self.params[i] for i in fr.params], self.outer.params[span])
        if out.fetched:
            # where the run is: the start of the phase after the outer step we received
            self.inner_step = self.schedule.start_step(int(self.outer.step[0]))
        rnd = int(self.outer.step[0])
        every = self.eval_every * self.schedule.fragments
        due = self.evaluate is not None and (rnd % every == 0 or rnd == self.schedule.sync_points)
        consensus = self.outer.params.clone() if due else None  # (N,), read now
        digest = self.outer.digest()
        step = self.inner_step

        def report() -> SyncReport:
            val = None if consensus is None else self._evaluate_at(consensus)
            return SyncReport(
                rnd, step, out.fetched, out.world, out.total_weight, digest, val, out.attempts
            )

        return _Applied(out.fetched, report)

    def _report(self, applied: _Applied) -> None:
        rep = applied.report()
        if self.on_sync is not None:
            self.on_sync(rep)

    def _evaluate_at(self, outer: torch.Tensor) -> float:
        """``evaluate()`` with the params set to ``outer`` (N,) (the local ones differ with
        overlap), restored afterwards."""
        assert self.evaluate is not None
        t0 = time.perf_counter()
        local = flatten(self.params)
        try:
            if torch.equal(local, outer):
                return self.evaluate()
            load_flat(self.params, outer)
            try:
                return self.evaluate()
            finally:
                load_flat(self.params, local)
        finally:
            self.clocks.eval_s += time.perf_counter() - t0

    @property
    def _sync_timeout_s(self) -> float:
        """Longest wait for a synchronisation: every attempt may run to its deadlines."""
        return (self.retries + 1) * 4 * self.comm.config.request_timeout_s + (
            self.min_workers_timeout_s
        )

    # ---- checkpoints --------------------------------------------------------------------------

    def outer_params(self) -> torch.Tensor:
        """The consensus (outer) parameters, flat (N,) fp32: equal on every worker."""
        return self.outer.params

    def digest(self) -> str:
        return self.outer.digest()

    def _save(self, *, pending: int | None) -> None:
        assert self.checkpoint_dir is not None
        rev = self.comm.revision
        checkpoint.save(
            self.checkpoint_dir,
            step=self.inner_step,
            model=self.model,
            optimizer=self.optimizer,
            tensors={
                "outer": {
                    **self.outer.state_dict(),
                    "delta": self.delta,
                    "anchor": self.anchor,
                }
            },
            meta={
                "tokens": self.tokens,
                "since": self.since,
                "pending_tokens": pending,
                "revision": rev if rev is not None else -1,
                "config": self.run_config,
                "extra": self.extra_state.state_dict() if self.extra_state else None,
            },
        )

    def _resume(self) -> bool:
        if self.checkpoint_dir is None:
            return False
        saved = checkpoint.load(self.checkpoint_dir)
        if saved is None:
            return False
        checkpoint.check_config(saved, self.run_config, allow_change=self.allow_config_change)
        saved.load_model(self.model)
        saved.load_optimizer(self.optimizer)
        outer = saved.tensors("outer")
        self.outer.load_state_dict(outer)
        self.delta.copy_(outer["delta"])
        if outer["anchor"].numel() == self.anchor.numel():
            self.anchor.copy_(outer["anchor"])
        elif self.overlap:  # overlap switched on: a save is taken as the params were sent
            self.anchor.copy_(flatten(self.params))
        meta = saved.meta
        self.inner_step, self.tokens = int(meta["step"]), int(meta["tokens"])
        self.since = [int(x) for x in meta["since"]]
        if len(self.since) != len(self.frags):
            self.since = [0] * len(self.frags)
        self._pending = meta["pending_tokens"]
        self._revision_hint = int(meta["revision"]) + 1
        if self.extra_state is not None and meta.get("extra") is not None:
            self.extra_state.load_state_dict(meta["extra"])
        return True


def _shapes_digest(model: nn.Module, params: list[nn.Parameter]) -> str:
    """What identifies the trained parameters: the names and shapes, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    text = ";".join(f"{names.get(id(p), '?')}:{tuple(p.shape)}" for p in params)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
