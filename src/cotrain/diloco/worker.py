"""``cotrain train``: one training worker, a thin program over ``DiLoCo`` and ``DDP``.

The model (cotrain's GPT or a Hugging Face causal LM, optionally with LoRA) and the data (the
built-in corpora or the user's text files) come from the config; the loop is the one a user
would write around the library (see ``diloco.py``), plus validation, JSON-lines records,
checkpoints, and the three modes:

* ``diloco``: ``DiLoCo`` (H inner AdamW steps, then an outer step);
* ``ddp``: ``DDP`` (every step's gradients averaged, same comm, same quantization options);
* ``single``: one worker, no communicator (validation and checkpoints every H steps).

The run length is counted in outer steps of H (``ceil(total_steps / H)``), so every worker,
joiners included, stops at the same step. Files under ``out_dir``::

    run.json                the run's identity (model, data, optimizers, algorithm, length)
    worker<i>.jsonl         the worker's records (``metrics.py``)
    worker<i>/checkpoint/   its latest checkpoint (``checkpoint.py``)
    worker<i>/model/        the trained model (``save_pretrained``)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cotrain.comm.communicator import Communicator
from cotrain.core.errors import UsageError
from cotrain.core.files import write_atomic
from cotrain.data import Batch, ShardReader, prepare, validation_batches
from cotrain.diloco import checkpoint
from cotrain.diloco.config import TrainConfig
from cotrain.diloco.ddp import DDP
from cotrain.diloco.diloco import DiLoCo, SyncReport
from cotrain.diloco.errors import CheckpointError, ConfigChangedError
from cotrain.diloco.metrics import Clocks, MetricsLog
from cotrain.diloco.outer import flatten
from cotrain.models.train import build_model


class _Position:
    """The data position as ``extra_state`` (saved with every checkpoint)."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.reader.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.position = int(state["position"])


class Worker:
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        echo: bool = True,
        on_contribution: Callable[[int, torch.Tensor, int], None] | None = None,
        on_outer: Callable[[SyncReport], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_contribution = on_contribution
        """DiLoCo's hook: each pseudo-gradient this worker puts into an average."""
        self.on_outer = on_outer
        """Called with each synchronisation's ``SyncReport`` (after it is logged)."""
        torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out_dir)
        self.wdir = self.out / f"worker{cfg.worker_index}"
        self.ckpt_dir = self.wdir / "checkpoint"
        self._lock = self._lock_worker()
        try:
            self._setup(echo)
        except BaseException:
            self._release()
            raise

    def _setup(self, echo: bool) -> None:
        cfg = self.cfg
        write_run = self._check_out_dir()
        self.log = MetricsLog(
            self.out / f"worker{cfg.worker_index}.jsonl",
            echo=echo,
            report_to=cfg.report_to,
            config=json.loads(cfg.dump_json()),
        )
        last = [-1.0]

        def progress(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] > 1.0:
                last[0] = now
                self.log.write("prepare", stage=stage, done=done, total=total)

        if cfg.model.kind == "hf":  # the model's own tokenizer prepares the data
            self.lm = build_model(cfg.model)
            data = prepare(cfg.data, tokenizer_file=self.lm.tokenizer_file, progress=progress)
            if data.vocab_size > self.lm.vocab_size:
                raise ConfigChangedError(
                    f"data.tokenizer has {data.vocab_size} tokens, more than the model's "
                    f"{self.lm.vocab_size}: leave data.tokenizer unset to use the model's own"
                )
        else:
            data = prepare(cfg.data, progress=progress)
            self.lm = build_model(cfg.model, vocab_size=data.vocab_size)
        if cfg.data.seq_len > self.lm.max_seq_len:
            raise ConfigChangedError(
                f"data.seq_len={cfg.data.seq_len} exceeds the model's longest sequence "
                f"({self.lm.max_seq_len}): lower data.seq_len"
            )
        if write_run:  # the model and data are fine: this out_dir is this run's now
            write_atomic(self.out / "run.json", json.dumps(cfg.run_identity(), indent=1).encode())
        self.model = self.lm.module
        self.params = self.lm.parameters()
        inner = cfg.inner
        decay = [p for p in self.params if p.dim() >= 2]
        other = [p for p in self.params if p.dim() < 2]
        groups: list[dict[str, Any]] = [{"params": decay}, {"params": other, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=inner.lr,
            betas=(inner.beta1, inner.beta2),
            weight_decay=inner.weight_decay,
        )
        self.reader = ShardReader(data, cfg.data, worker_index=cfg.worker_index)
        self.val = validation_batches(data, cfg.data)
        self.H = cfg.algo.inner_steps
        self.rounds = math.ceil(cfg.total_steps / self.H)
        self.tokens = 0
        self.clocks = Clocks()
        self.losses: list[float] = []
        self.comm: Communicator | None = None
        self.warm: checkpoint.Saved | None = None
        if cfg.resume == "never":
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        if cfg.init_from is not None:
            self.warm = checkpoint.load(self._ckpt_path(Path(cfg.init_from)))
            if self.warm is None:
                raise CheckpointError(f"init_from: no checkpoint at {cfg.init_from}")
        self.data = data

    def _log_start(self, resumed_step: int | None) -> None:
        self.log.write(
            "start",
            worker=self.cfg.worker_index,
            mode=self.cfg.algo.mode,
            model=self.lm.describe(),
            params=sum(p.numel() for p in self.model.parameters()),
            trainable=sum(p.numel() for p in self.params),
            vocab=self.data.vocab_size,
            train_tokens=self.data.train_tokens,
            shard=self.reader.shard,
            resumed_step=resumed_step,
        )

    # ---- the output directory -----------------------------------------------------------------

    def _lock_worker(self) -> int:
        """Hold ``out_dir/worker<i>.lock`` while this worker runs: a second process with the
        same out_dir and worker index is refused instead of writing into the same files."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"worker{self.cfg.worker_index}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"worker {self.cfg.worker_index} of {self.out} is already running (another "
                "process holds its lock): use another worker_index or out_dir"
            ) from None
        return fd

    def _release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = -1

    def _check_out_dir(self) -> bool:
        """``out_dir`` belongs to one run: refuse another run's unless told to resume it with
        the new config (``allow_config_change``) or to start over (``overwrite``). Returns
        whether ``run.json`` is to be (re)written, once the model and data have loaded."""
        cfg = self.cfg
        ident = cfg.run_identity()
        path = self.out / "run.json"
        if cfg.overwrite:
            shutil.rmtree(self.wdir, ignore_errors=True)
            (self.out / f"worker{cfg.worker_index}.jsonl").unlink(missing_ok=True)
            return True
        if not path.exists():
            return True
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        diff = checkpoint.config_diff(old, ident)
        if not diff:
            return False
        if cfg.allow_config_change:
            return True
        raise ConfigChangedError(
            f"{self.out} holds a run with another config ({'; '.join(diff[:6])}): "
            "resume it with --allow_config_change, start over with --overwrite, or "
            "choose another out_dir"
        )

    @staticmethod
    def _ckpt_path(path: Path) -> Path:
        """A checkpoint directory, or a worker directory / output directory holding one."""
        for cand in (path, path / "checkpoint", path / "worker0" / "checkpoint"):
            if (cand / checkpoint.LATEST).is_file():
                return cand
        return path

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
        loss = self.lm.loss(batch.inputs, batch.targets)
        loss.backward()
        value = float(loss.detach())
        del loss
        self.clocks.compute_s += time.perf_counter() - t0
        return value

    def optimizer_step(self, step: int) -> None:
        """The inner optimizer's step number ``step`` (0-based; sets its learning rate)."""
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step)
        if self.cfg.inner.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.inner.grad_clip)
        self.opt.step()
        self.clocks.compute_s += time.perf_counter() - t0
        kill = self.cfg.kill_at_step
        if kill is not None and step + 1 >= kill:
            os.kill(os.getpid(), signal.SIGKILL)

    @torch.no_grad()
    def _val(self) -> float:
        self.model.eval()
        losses = [float(self.lm.loss(b.inputs, b.targets)) for b in self.val]
        return sum(losses) / len(losses)

    def val_loss(self) -> float:
        """The validation loss, its time counted in ``eval_s`` (DiLoCo counts its own)."""
        t0 = time.perf_counter()
        try:
            return self._val()
        finally:
            self.clocks.eval_s += time.perf_counter() - t0

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

    def _log_step(self, step: int, loss: float) -> None:
        if step % self.cfg.log_every_steps == 0:
            self.log.write(
                "step",
                step=step,
                loss=round(loss, 5),
                lr=self.lr_at(step - 1),
                tokens=self.tokens,
                **self._comm_fields(),
                compute_s=round(self.clocks.compute_s, 4),
            )

    def _outer_record(
        self, *, outer_step: int, step: int, val: float | None, digest: str, fetched: bool
    ) -> None:
        loss = sum(self.losses) / len(self.losses) if self.losses else None
        self.log.write(
            "outer",
            outer_step=outer_step,
            step=step,
            loss=None if loss is None else round(loss, 5),
            val_loss=None if val is None else round(val, 5),
            tokens=self.tokens,
            hash=digest,
            fetched=fetched,
            **self._comm_fields(),
            **self.clocks.as_dict(),
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
            self.clocks = Clocks()
            step = self._run_diloco() if cfg.algo.mode == "diloco" else self._run_stepwise()
            summary = {"step": step, "tokens": self.tokens, **self._comm_fields()}
            self.log.write("done", **summary, **self.clocks.as_dict(), hash=self.param_digest())
            if cfg.save_model:
                self.lm.save_pretrained(self.wdir / "model")
            return summary
        finally:
            checkpoint.remove_temporary(self.ckpt_dir)
            if self.comm is not None:
                self.comm.close()
            self.log.close()
            self._release()

    def _warm_start(self) -> tuple[int, int]:
        """(step, tokens) of ``init_from``, loaded into the model, optimizer and reader."""
        if self.warm is None:
            return 0, 0
        self.warm.load_model(self.model)
        self.warm.load_optimizer(self.opt)
        _Position(self.reader).load_state_dict(self.warm.meta["extra"])
        return int(self.warm.meta["step"]), int(self.warm.meta["tokens"])

    def _run_diloco(self) -> int:
        assert self.comm is not None
        cfg, algo = self.cfg, self.cfg.algo
        ckpt = self.ckpt_dir if cfg.checkpoint == "outer" else None

        def on_sync(rep: SyncReport) -> None:
            self._outer_record(
                outer_step=rep.outer_step,
                step=rep.step,
                val=rep.val_loss,
                digest=rep.digest,
                fetched=rep.fetched,
            )
            if self.on_outer is not None:
                self.on_outer(rep)

        d = DiLoCo(
            self.comm,
            self.model,
            self.opt,
            sync_every=self.H,
            outer_lr=algo.outer.lr,
            outer_momentum=algo.outer.momentum,
            outer_method=algo.outer.method,
            quantization=algo.quantization,
            fragments=algo.fragments,
            overlap=algo.overlap,
            inner_time_s=algo.inner_time_s,
            total_steps=self.rounds * self.H,
            world=cfg.world if cfg.join == "start" else None,
            min_workers=algo.min_workers,
            min_workers_timeout_s=algo.min_workers_timeout_s,
            retries=algo.retries,
            checkpoint_dir=ckpt,
            checkpoint_every=cfg.checkpoint_every,
            extra_state=_Position(self.reader),
            run_config=cfg.run_identity(),
            allow_config_change=cfg.allow_config_change,
            evaluate=self._val,
            eval_every=cfg.eval_every_outer,
            on_sync=on_sync,
            on_contribution=self.on_contribution,
            params=self.params,
            clocks=self.clocks,
            log=self.log,
        )
        self.diloco = d
        if self.warm is not None:
            d.warm_start(*self._warm_start())
        self._log_start(d.inner_step if d.resume() else None)
        with d:
            self.tokens = d.tokens
            self.log.write(
                "joined",
                rank=self.comm.rank,
                step=d.inner_step,
                resumed=d.resumed,
                joined_run=d.joined_run,
                **self._comm_fields(),
            )
            total = self.rounds * self.H
            while d.inner_step < total and not d.finished:
                step = d.inner_step
                batch = self.next_batch()
                loss = self.forward_backward(batch)
                self.optimizer_step(step)
                self.losses.append(loss)
                self.tokens += batch.tokens
                synced = d.step(tokens=batch.tokens)
                self._log_step(step + 1, loss)
                if synced:
                    self.losses = []
        return d.inner_step

    def _run_stepwise(self) -> int:
        """DDP (with a communicator) or a single worker: every step is an optimizer step."""
        cfg = self.cfg
        ident = {"run": cfg.run_identity()}
        step, self.tokens = self._warm_start()
        revision = -1
        saved = checkpoint.load(self.ckpt_dir) if cfg.checkpoint == "outer" else None
        if saved is not None:
            checkpoint.check_config(saved, ident, allow_change=cfg.allow_config_change)
            saved.load_model(self.model)
            saved.load_optimizer(self.opt)
            step, self.tokens = int(saved.meta["step"]), int(saved.meta["tokens"])
            _Position(self.reader).load_state_dict(saved.meta["extra"])
            revision = int(saved.meta["revision"])
        self._log_start(step if saved is not None else None)
        ddp = None
        if self.comm is not None:
            algo = cfg.algo
            ddp = DDP(
                self.comm,
                self.model,
                self.opt,
                quantization=algo.quantization,
                vote_every=algo.ddp_vote_every_steps,
                world=cfg.world if cfg.join == "start" else None,
                retries=algo.retries,
                min_workers=algo.min_workers,
                min_workers_timeout_s=algo.min_workers_timeout_s,
                revision_hint=revision + 1,
                params=self.params,
                clocks=self.clocks,
                log=self.log,
            )
            ddp.step = step
            ddp.join()
            self.log.write("joined", rank=self.comm.rank, step=step, **self._comm_fields())
        end = self.rounds * self.H
        if cfg.stop_at_step is not None:
            end = min(end, cfg.stop_at_step)
        while step < end:
            batch = self.next_batch()
            loss = self.forward_backward(batch)
            if ddp is not None:

                def recompute(batch: Batch = batch) -> None:
                    self.forward_backward(batch)

                ddp.step = step
                ddp.sync_gradients(recompute=recompute)
                step = ddp.step - 1
            self.losses.append(loss)
            self.tokens += batch.tokens
            self.optimizer_step(step)
            step += 1
            self._log_step(step, loss)
            if step % self.H == 0:
                rnd = step // self.H
                due = rnd % cfg.eval_every_outer == 0
                self._outer_record(
                    outer_step=rnd,
                    step=step,
                    val=self.val_loss() if due else None,
                    digest=self.param_digest(),
                    fetched=False,
                )
                self.losses = []
                if cfg.checkpoint == "outer" and rnd % cfg.checkpoint_every == 0:
                    rev = self.comm.revision if self.comm is not None else None
                    checkpoint.save(
                        self.ckpt_dir,
                        step=step,
                        model=self.model,
                        optimizer=self.opt,
                        tensors={},
                        meta={
                            "tokens": self.tokens,
                            "revision": rev if rev is not None else -1,
                            "config": ident,
                            "extra": _Position(self.reader).state_dict(),
                        },
                    )
        return step
