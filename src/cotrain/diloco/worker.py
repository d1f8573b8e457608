"""One training worker: the inner loop, validation, checkpoints, and the three modes.

* ``diloco``: H inner AdamW steps from the outer params, pseudo-gradient = outer - local,
  token-weighted average over the workers (``sync.Synchronizer.outer``), one outer Nesterov step
  on the fp32 outer state, which then replaces the local params. A joiner (``join = "join"``)
  takes part in its first outer step with weight zero: it receives the outer state there and
  trains from the next one.
* ``ddp``: every step's gradients are averaged (same comm, same quantization options).
* ``single``: one worker, no communicator (validation and checkpoints every H steps).

The run length is counted in outer steps of H (``ceil(total_steps / H)``), so every worker,
joiners included, stops at the same step.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cotrain.comm.communicator import Communicator
from cotrain.data import Batch, ShardReader, prepare, validation_batches
from cotrain.data.prepare import cache_key
from cotrain.diloco import checkpoint
from cotrain.diloco.config import TrainConfig
from cotrain.diloco.errors import CheckpointError
from cotrain.diloco.fragments import Schedule, split
from cotrain.diloco.metrics import Clocks, MetricsLog
from cotrain.diloco.outer import OuterState, flatten, load_flat
from cotrain.diloco.sync import Synchronizer, SyncOutcome
from cotrain.models.gpt import GPT


@dataclass(frozen=True)
class _InFlight:
    """A DiLoCo synchronisation started (done already without overlap)."""

    tokens: int
    future: Future[SyncOutcome]


@dataclass(frozen=True)
class _Applied:
    """The outer update of a finished synchronisation, applied."""

    fetched: bool
    """Our outer state was replaced by the majority's."""
    write_record: Callable[[], None]
    """Validates and writes its ``outer`` record."""


class Worker:
    def __init__(self, cfg: TrainConfig, *, echo: bool = True) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.out / f"worker{cfg.worker_index}.jsonl", echo=echo)
        last = [-1.0]

        def progress(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] > 1.0:
                last[0] = now
                self.log.write("prepare", stage=stage, done=done, total=total)

        data = prepare(cfg.data, progress=progress)
        self.model = GPT(cfg.model.model_copy(update={"vocab_size": data.vocab_size}))
        self.params = list(self.model.parameters())
        decay: list[torch.Tensor] = [p for p in self.params if p.dim() >= 2]
        other: list[torch.Tensor] = [p for p in self.params if p.dim() < 2]
        inner = cfg.inner
        groups: list[dict[str, Any]] = [{"params": decay}, {"params": other, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(
            groups,
            lr=inner.lr,
            betas=(inner.beta1, inner.beta2),
            weight_decay=inner.weight_decay,
        )
        for p in self.params:  # eager state: the DDP shared state needs the tensors to exist
            self.opt.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        self.outer = OuterState(self.params, cfg.algo.outer)
        self.reader = ShardReader(data, cfg.data, worker_index=cfg.worker_index)
        self.val = validation_batches(data, cfg.data)
        self.step = 0
        self.tokens = 0
        self.clocks = Clocks()
        self.H = cfg.algo.inner_steps
        self.rounds = math.ceil(cfg.total_steps / self.H)
        # DiLoCo's sync points and the buffers of its pseudo-gradients, all (N,)
        self.schedule = Schedule.for_run(
            total_steps=cfg.total_steps, inner_steps=self.H, fragments=cfg.algo.fragments
        )
        self.frags = split(self.params, cfg.algo.fragments)
        self.delta = torch.zeros(self.outer.numel)  # this worker's pseudo-gradient
        self.avg = torch.zeros(self.outer.numel)  # the workers' token-weighted mean
        self.anchor = torch.zeros(self.outer.numel)  # local params when delta was taken
        self.since = [0] * cfg.algo.fragments  # tokens trained since each fragment was sent
        self.pending_tokens: int | None = None  # resumed with a synchronisation to restart
        self.pool: ThreadPoolExecutor | None = None
        algo = cfg.algo
        self.fingerprint = hashlib.sha256(
            f"{cfg.model.model_dump_json()}|{cache_key(cfg.data)}|{algo.mode}|{self.H}|"
            f"{algo.fragments}|{algo.overlap}".encode()
        ).hexdigest()[:16]
        self.ckpt_path = self.out / f"worker{cfg.worker_index}.ckpt"
        self.revision_hint = 0
        self.resumed = self._resume() if cfg.resume == "auto" else False
        if not self.resumed and cfg.init_from is not None:
            self._warm_start(Path(cfg.init_from))
        self.comm: Communicator | None = None
        self.log.write(
            "start",
            worker=cfg.worker_index,
            mode=cfg.algo.mode,
            params=self.model.num_params(),
            vocab=data.vocab_size,
            train_tokens=data.train_tokens,
            shard=self.reader.shard,
            resumed_step=self.step if self.resumed else None,
        )

    # ---- pieces -------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        c = self.cfg.inner
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        frac = min(1.0, (step - c.warmup_steps) / max(1, self.rounds * self.H - c.warmup_steps))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def next_batch(self) -> Batch:
        """The next batch of this worker's shard (its making counts as compute)."""
        t0 = time.perf_counter()
        batch = self.reader.next()
        self.clocks.compute_s += time.perf_counter() - t0
        return batch

    def forward_backward(self, batch: Batch) -> float:
        t0 = time.perf_counter()
        self.model.train()
        self.opt.zero_grad(set_to_none=False)
        out = self.model(batch.inputs, batch.targets)
        assert out.loss is not None
        out.loss.backward()
        loss = float(out.loss.detach())
        # Release the step's logits here: freeing them (about 1% of a step at this size) is
        # part of the step, not time between steps.
        del out
        self.clocks.compute_s += time.perf_counter() - t0
        return loss

    def optimizer_step(self) -> None:
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        if self.cfg.inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.inner.grad_clip)
        self.opt.step()
        self.clocks.compute_s += time.perf_counter() - t0
        self.step += 1
        if self.cfg.kill_at_step is not None and self.step >= self.cfg.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    @torch.no_grad()
    def val_loss(self) -> float:
        t0 = time.perf_counter()
        self.model.eval()
        losses = []
        for b in self.val:
            loss = self.model(b.inputs, b.targets).loss
            assert loss is not None
            losses.append(float(loss))
        self.clocks.eval_s += time.perf_counter() - t0
        return sum(losses) / len(losses)

    def param_digest(self) -> str:
        return hashlib.sha256(flatten(self.params).numpy().tobytes()).hexdigest()[:16]

    def _comm_fields(self) -> dict[str, Any]:
        c = self.comm
        if c is None:
            return {"world": 1, "bytes_sent": 0, "bytes_received": 0}
        return {
            "world": c.world_size,
            "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received,
        }

    def _record(
        self, *, loss: float | None, fetched: bool = False, checkpoint: bool = True
    ) -> None:
        self._outer_record(loss=loss, fetched=fetched)()
        if checkpoint and self.cfg.checkpoint == "outer":
            self._save()

    def _outer_record(self, *, loss: float | None, fetched: bool) -> Callable[[], None]:
        """The ``outer`` record of the step just taken, as a call that writes it. The state it
        reports is read now; its validation, the slow part, runs when it is called (DiLoCo with
        overlap: after the next synchronisation started, so it delays no other worker)."""
        if self.cfg.algo.mode == "diloco":
            # one record per sync point; validation of the outer params (the consensus model)
            rnd = int(self.outer.step[0])
            every = self.cfg.eval_every_outer * self.cfg.algo.fragments
            due = rnd % every == 0 or rnd == self.schedule.sync_points
            digest = self.outer.digest()
            outer = self.outer.params.clone() if due else None  # (N,)

            def val() -> float | None:
                return None if outer is None else self._outer_val_loss(outer)
        else:
            rnd = self.step // self.H
            due = rnd % self.cfg.eval_every_outer == 0
            digest = self.param_digest()

            def val() -> float | None:
                return self.val_loss() if due else None

        head = {
            "outer_step": rnd,
            "step": self.step,
            "loss": None if loss is None else round(loss, 5),
        }
        tail = {"tokens": self.tokens, "hash": digest, "fetched": fetched, **self._comm_fields()}

        def write() -> None:
            v = val()
            vl = None if v is None else round(v, 5)
            self.log.write("outer", **head, val_loss=vl, **tail, **self.clocks.as_dict())

        return write

    def _outer_val_loss(self, outer: torch.Tensor) -> float:
        """Validation loss of outer params ``outer`` (N,) (the local ones differ with overlap)."""
        local = flatten(self.params)
        if torch.equal(local, outer):
            return self.val_loss()
        load_flat(self.params, outer)
        try:
            return self.val_loss()
        finally:
            load_flat(self.params, local)

    def _save(self, *, pending_tokens: int | None = None) -> None:
        state: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "tokens": self.tokens,
            "position": self.reader.position,
            "opt": self.opt.state_dict(),
            "model": self.model.state_dict(),
            "outer": self.outer.state_dict(),
            "revision": self.comm.revision if self.comm and self.comm.revision is not None else -1,
            # DiLoCo, taken as a synchronisation starts: what it sends, to start it again
            "since": self.since,
            "pending_tokens": pending_tokens,
            "delta": self.delta,
            "anchor": self.anchor,
        }
        checkpoint.save(self.ckpt_path, state)

    def _resume(self) -> bool:
        state = checkpoint.load(self.ckpt_path, fingerprint=self.fingerprint)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.outer.load_state_dict(state["outer"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.reader.position = state["position"]
        self.revision_hint = state["revision"] + 1
        self.since = list(state["since"])
        self.pending_tokens = state["pending_tokens"]
        self.delta.copy_(state["delta"])
        self.anchor.copy_(state["anchor"])
        return True

    def _warm_start(self, path: Path) -> None:
        state = checkpoint.load(path, fingerprint=None)
        if state is None:
            raise CheckpointError(f"init_from: no checkpoint at {path}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.reader.position = state["position"]
        self.outer.params.copy_(flatten(self.params))
        if self.step % self.schedule.every:
            raise CheckpointError(
                f"init_from: step {self.step} of {path} is not a sync point (a multiple of "
                f"inner_steps / fragments = {self.schedule.every})"
            )
        self.outer.step[0] = self.step // self.schedule.every

    def _log_step(self, loss: float, batch: Batch) -> None:
        if self.step % self.cfg.log_every_steps == 0:
            self.log.write(
                "step",
                step=self.step,
                loss=round(loss, 5),
                lr=self.lr_at(self.step - 1),
                tokens=self.tokens,
                **self._comm_fields(),
                compute_s=round(self.clocks.compute_s, 4),
            )

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        try:
            if cfg.algo.mode != "single":
                self.comm = Communicator(
                    cfg.comm, name=f"w{cfg.worker_index}-{os.getpid()}", faults=cfg.faults
                )
                self.comm.connect()
                if cfg.join == "join":
                    self.comm.update_topology()
                else:
                    self.comm.wait_for_world(cfg.world, timeout_s=cfg.comm.request_timeout_s)
                self.log.write("joined", rank=self.comm.rank, **self._comm_fields())
            self.clocks = Clocks()
            if cfg.algo.mode == "diloco":
                self._run_diloco()
            else:
                self._run_ddp()
            summary = {"step": self.step, "tokens": self.tokens, **self._comm_fields()}
            self.log.write("done", **summary, **self.clocks.as_dict(), hash=self.param_digest())
            return summary
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            if self.comm is not None:
                self.comm.close()
            self.log.close()

    def _run_diloco(self) -> None:
        """Sync points (``fragments.Schedule``): train up to the next one, finish the
        synchronisation in flight (apply its outer update), start this one's.

        Per fragment the local params are ``outer - in_flight - since``: the outer params, minus
        this worker's progress still being averaged, minus its progress since it was sent. A
        pseudo-gradient is ``outer - local`` taken right after the previous update of that
        fragment was applied; when the average comes back the local params become
        ``new outer - since``. Without overlap the average comes back at once (``since`` = 0,
        local = outer exactly), which is plain (streaming) DiLoCo.
        """
        assert self.comm is not None
        algo = self.cfg.algo
        self.sync = Synchronizer(
            self.comm,
            clocks=self.clocks,
            log_=self.log,
            retries=algo.retries,
            revision_hint=self.revision_hint,
            min_workers=algo.min_workers,
            min_workers_timeout_s=algo.min_workers_timeout_s,
        )
        self.pool = (
            ThreadPoolExecutor(1, thread_name_prefix="cotrain-outer") if algo.overlap else None
        )
        sched = self.schedule
        flight: _InFlight | None = None
        if self.pending_tokens is not None:
            # resumed from a checkpoint taken as a synchronisation started: start it again
            # (if the others went on meanwhile, it fetches their state and starts over)
            flight = self._launch(tokens=self.pending_tokens, vote=True)
            if self.pool is None:
                self._finish(flight).write_record()
                flight = None
        elif self.cfg.join == "join":
            # A joiner has nothing to contribute: it takes part in the synchronisation in
            # progress with weight zero (it voted in update_topology already), receives the
            # outer state there, applies the same average as everyone and trains from the next.
            self.delta.zero_()
            self._finish(self._launch(tokens=0, vote=False)).write_record()
        while True:
            k = int(self.outer.step[0]) + (flight is not None)
            if k >= sched.sync_points:
                break
            self.step = sched.start_step(k)
            losses = self._inner_phase(sched.end_step(k))
            applied = None
            if flight is not None:
                applied = self._finish(flight, losses=losses)
                flight = None
                if applied.fetched:  # our progress was measured from another state: start over
                    applied.write_record()
                    continue
            fr = self.frags[sched.fragment(k)]
            span = slice(fr.start, fr.stop)
            local = flatten([self.params[i] for i in fr.params])  # (n,)
            torch.sub(self.outer.params[span], local, out=self.delta[span])  # pseudo-gradient
            self.anchor[span] = local
            tokens, self.since[fr.index] = self.since[fr.index], 0
            if self.cfg.checkpoint == "outer":
                self._save(pending_tokens=tokens)
            # no forced vote: the synchroniser votes when the membership has to change
            flight = self._launch(tokens=tokens, vote=False)
            if applied is not None:
                # validate only now: the synchronisation just started waits for every worker
                # to start it, so validating before would hold up the others too
                applied.write_record()
            if self.pool is None:
                self._finish(flight, losses=losses).write_record()
                flight = None
        if flight is not None:
            self._finish(flight).write_record()
        if self.cfg.checkpoint == "outer":
            self._save()

    def _inner_phase(self, end: int) -> list[float]:
        """Inner steps up to schedule step ``end`` (or for ``inner_time_s / fragments``)."""
        bound = self.cfg.algo.inner_time_s
        if bound is not None:
            bound /= self.cfg.algo.fragments
        t_end = time.perf_counter() + (bound or 0.0)
        last = end - 1
        losses: list[float] = []
        if self.step >= end:  # the final sync points of the fragments: no inner steps
            return losses
        h = 0
        while True:
            if bound is None:
                if self.step >= end:
                    break
            elif h > 0 and time.perf_counter() >= t_end:
                break
            else:  # a time-bounded phase may run past its steps: hold the schedule position
                self.step = min(self.step, last)
            batch = self.next_batch()
            losses.append(self.forward_backward(batch))
            self.optimizer_step()
            h += 1
            self.tokens += batch.tokens
            self.since = [n + batch.tokens for n in self.since]
            self._log_step(losses[-1], batch)
        self.step = end
        return losses

    def _launch(self, *, tokens: int, vote: bool) -> _InFlight:
        """Start the synchronisation of the next sync point (in the background with overlap).

        Its fragment is the one of the outer step the shared-state sync settles on: a replica
        that fetches the majority's state (a joiner, one that fell behind) reduces that
        fragment, with weight zero, so every peer's all-reduce has the same size."""
        job = partial(
            self.sync.outer,
            self.outer.shared(),
            self.delta,
            self.avg,
            span=self._span,
            tokens=tokens,
            quantization=self.cfg.algo.quantization,
            vote=vote,
            step=self.step,
        )
        if self.pool is not None:
            return _InFlight(tokens, self.pool.submit(job))
        done: Future[SyncOutcome] = Future()
        done.set_result(job())
        return _InFlight(tokens, done)

    def _span(self) -> slice:
        """The flat slice of the fragment of the current outer step."""
        fr = self.frags[self.schedule.fragment(int(self.outer.step[0]))]
        return slice(fr.start, fr.stop)

    def _finish(self, flight: _InFlight, *, losses: list[float] | None = None) -> _Applied:
        """Wait for ``flight`` and apply its outer update (its record is the caller's to write)."""
        t0 = time.perf_counter()
        out = flight.future.result(timeout=self._sync_timeout_s)
        if self.pool is not None:
            self.clocks.blocked_s += time.perf_counter() - t0
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
        else:
            # local = new outer - progress since the pseudo-gradient was taken (exactly the
            # outer params when there was none: no overlap, or the end of the run)
            since = self.anchor[span] - flatten([self.params[i] for i in fr.params])
            load_flat([self.params[i] for i in fr.params], self.outer.params[span] - since)
        loss = sum(losses) / len(losses) if losses else None
        return _Applied(out.fetched, self._outer_record(loss=loss, fetched=out.fetched))

    @property
    def _sync_timeout_s(self) -> float:
        """Longest wait for a synchronisation: every attempt may run to its deadlines."""
        algo, comm = self.cfg.algo, self.cfg.comm
        return (algo.retries + 1) * 4 * comm.request_timeout_s + algo.min_workers_timeout_s

    def _run_ddp(self) -> None:
        shared = self._ddp_shared()
        grads = torch.zeros(self.outer.numel)  # (N,) flat gradients
        sync = None
        if self.comm is not None:
            sync = Synchronizer(
                self.comm,
                clocks=self.clocks,
                log_=self.log,
                retries=self.cfg.algo.retries,
                revision_hint=self.revision_hint,
                min_workers=self.cfg.algo.min_workers,
                min_workers_timeout_s=self.cfg.algo.min_workers_timeout_s,
            )
        first = True
        losses: list[float] = []
        end = self.rounds * self.H
        if self.cfg.stop_at_step is not None:
            end = min(end, self.cfg.stop_at_step)
        while self.step < end:
            batch = self.next_batch()
            loss = self.forward_backward(batch)
            if sync is not None:

                def recompute(batch: Batch = batch) -> None:
                    self.step = int(shared["step"][0])
                    for p in self.params:
                        self.opt.state[p]["step"] = torch.tensor(float(self.step))
                    self.forward_backward(batch)
                    torch.cat([p.grad.reshape(-1) for p in self.params], out=grads)  # type: ignore[union-attr]

                torch.cat([p.grad.reshape(-1) for p in self.params], out=grads)  # type: ignore[union-attr]
                shared["step"][0] = self.step
                vote = (self.step % self.cfg.algo.ddp_vote_every_steps == 0) and not (
                    first and self.cfg.join == "join"
                )
                sync.gradients(
                    shared,
                    grads,
                    recompute=recompute,
                    quantization=self.cfg.algo.quantization,
                    vote=vote,
                    step=self.step,
                )
                load_flat([p.grad for p in self.params], grads)  # type: ignore[misc]
            first = False
            losses.append(loss)
            self.tokens += batch.tokens
            self.optimizer_step()
            self._log_step(loss, batch)
            if self.step % self.H == 0:
                self._record(loss=sum(losses) / len(losses))
                losses = []

    def _ddp_shared(self) -> dict[str, torch.Tensor]:
        shared: dict[str, torch.Tensor] = {"step": torch.zeros(1, dtype=torch.int64)}
        for i, p in enumerate(self.params):
            st = self.opt.state[p]
            shared[f"p{i:03d}"] = p.data
            shared[f"m{i:03d}"] = st["exp_avg"]
            shared[f"v{i:03d}"] = st["exp_avg_sq"]
        return shared
