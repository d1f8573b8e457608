"""Typed configs of a training run: one worker's view (``TrainConfig``) and its parts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cotrain.comm.config import CommConfig, Quantization
from cotrain.comm.faults import FaultPlan
from cotrain.core.config import ConfigModel
from cotrain.data.config import DataConfig
from cotrain.diloco.metrics import Sink
from cotrain.models.train import ModelConfig

Mode = Literal["diloco", "ddp", "single"]


class InnerConfig(ConfigModel):
    """The inner optimizer (AdamW) and its schedule (linear warmup, cosine decay)."""

    lr: float = Field(default=3e-3, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a fraction of ``lr``."""
    warmup_steps: int = Field(default=20, ge=0)
    """Linear warmup, in inner steps."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW decoupled weight decay."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(default=0.95, ge=0, lt=1)
    """AdamW beta2."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the gradient norm to this (0 = no clipping)."""


class OuterConfig(ConfigModel):
    """The outer optimizer: SGD on the fp32 outer parameters (DiLoCo: Nesterov, lr 0.7, 0.9)."""

    lr: float = Field(default=0.7, gt=0)
    """Outer learning rate."""
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """Momentum coefficient."""
    method: Literal["nesterov", "heavy_ball"] = "nesterov"
    """Nesterov (DiLoCo) or plain heavy-ball momentum."""


class AlgoConfig(ConfigModel):
    """How workers combine their work."""

    mode: Mode = "diloco"
    """"diloco" (H local steps, then an outer step), "ddp" (all-reduce of gradients every step)
    or "single" (one worker, no communication)."""
    inner_steps: int = Field(default=50, ge=1)
    """H: inner steps between outer steps (diloco)."""
    inner_time_s: float | None = Field(default=None, gt=0)
    """Bound each inner phase by time instead of steps (mixed-speed workers): each worker runs
    as many steps as fit (at least one) and pseudo-gradients are weighted by tokens processed."""
    quantization: Quantization = "int8"
    """Wire quantization of pseudo-gradients (diloco) or gradients (ddp)."""
    overlap: bool = False
    """Streaming overlap (diloco): the synchronisation of outer step t (vote, shared-state
    check, all-reduce) runs in the background during the inner steps of t+1 and its outer update
    is applied one step late; the local model keeps its own not-yet-averaged progress on top of
    the outer params, so no inner step is thrown away."""
    fragments: int = Field(default=1, ge=1)
    """Streaming fragments (diloco): split the parameters into this many fragments (whole
    tensors, about equal size); fragment f is synced every ``inner_steps`` steps at offset
    (f + 1) x inner_steps / fragments, so one fragment travels at a time. 1 = plain DiLoCo."""
    outer: OuterConfig = Field(default_factory=OuterConfig)
    """Outer optimizer (diloco)."""
    ddp_vote_every_steps: int = Field(default=10, ge=1)
    """DDP: admit joiners (update the topology) every this many steps (and after any failure)."""
    min_workers: int = Field(default=1, ge=1)
    """Blocking joins: before a synchronisation, wait until at least this many workers are in
    the ring (a survivor waits for a replacement instead of training alone)."""
    min_workers_timeout_s: float = Field(default=600.0, gt=0)
    """Longest wait for ``min_workers``."""
    retries: int = Field(default=8, ge=0)
    """Retries of a failed synchronisation with the survivors before giving up."""


class TrainConfig(ConfigModel):
    """One worker of a training run: ``cotrain train CONFIG.toml [--dotted.overrides]``."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model: cotrain's GPT (``kind = "gpt"``, its ``vocab_size`` replaced by the
    tokenizer's) or a Hugging Face causal LM (``kind = "hf"``, ``path``), optionally LoRA."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Text, tokenizer, batches and shards."""
    inner: InnerConfig = Field(default_factory=InnerConfig)
    """Inner optimizer."""
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    """DiLoCo, DDP or single worker."""
    comm: CommConfig = Field(default_factory=CommConfig)
    """How to reach the master and the ring (not used in single mode)."""
    faults: FaultPlan = Field(default_factory=FaultPlan)
    """Faults injected into this worker's communicator (tests)."""
    total_steps: int = Field(default=500, ge=1)
    """Inner steps of the whole run (a joiner stops at the same global step as the others)."""
    worker_index: int = Field(default=0, ge=0)
    """Stable index of this worker: picks its data shard and its log/checkpoint names."""
    world: int = Field(default=1, ge=1)
    """Wait for this many workers before the first step (joiners skip the wait)."""
    join: Literal["start", "join"] = "start"
    """"start": wait for ``world`` workers; "join": enter a running ring and receive its state."""
    out_dir: str = "runs/debug"
    """The run's directory: run.json, each worker's records (worker<i>.jsonl), resolved config
    (config<i>.json), checkpoint (worker<i>/checkpoint/) and final model (worker<i>/model/)."""
    eval_every_outer: int = Field(default=1, ge=1)
    """Validation loss every this many outer steps (diloco) or ``inner_steps`` steps (ddp)."""
    log_every_steps: int = Field(default=10, ge=1)
    """Write a step record every this many inner steps."""
    checkpoint: Literal["outer", "none"] = "outer"
    """"outer": save (atomically: safetensors + state.json, under
    ``out_dir/worker<i>/checkpoint``) as outer steps start (ddp, single: every
    ``inner_steps``)."""
    checkpoint_every: int = Field(default=1, ge=1)
    """Save every this many sync points (diloco) or ``inner_steps`` blocks (ddp, single)."""
    resume: Literal["auto", "never"] = "auto"
    """"auto": continue from this worker's checkpoint in ``out_dir`` when there is one."""
    allow_config_change: bool = False
    """Resume a checkpoint (or use an ``out_dir``) written with another config; without it a
    change of model, data, optimizer or algorithm is refused, the difference named."""
    overwrite: bool = False
    """Start over in an ``out_dir`` that holds another run: this worker's checkpoint, model
    and logs there are deleted first."""
    save_model: bool = True
    """At the end, save the trained model under ``out_dir/worker<i>/model`` (a Hugging Face
    model loads with ``from_pretrained``; the GPT as safetensors + config.json)."""
    report_to: list[Sink] = Field(default_factory=list)
    """Metrics sinks beside the JSON lines: "tensorboard" (``out_dir/tensorboard``), "wandb"
    (when installed)."""
    threads: int = Field(default=1, ge=1)
    """torch intra-op threads of this worker."""
    init_from: str | None = None
    """Warm start: take the model, the inner optimizer, the step, the tokens and the data
    position from this worker checkpoint (any mode; e.g. a DDP run ended with
    ``stop_at_step``) instead of the seed's initialisation. DiLoCo's outer params start from
    its params (momentum zero) at the outer step it falls in. Ignored when resuming."""
    stop_at_step: int | None = Field(default=None, ge=1)
    """End the run at this inner step, keeping ``total_steps``' learning-rate schedule (a
    warm-start phase for other runs; ddp and single modes; a multiple of ``inner_steps``)."""
    kill_at_step: int | None = Field(default=None, ge=0)
    """Fault injection: SIGKILL this worker when it reaches this inner step."""

    def run_identity(self) -> dict[str, object]:
        """What makes two workers part of the same run (recorded in ``out_dir/run.json`` and
        every checkpoint, compared on resume): model, data, optimizers, algorithm, length."""
        data = self.data.model_dump(
            exclude={"cache_dir", "download_timeout_s", "lock_timeout_s", "num_shards"}
        )
        algo = self.algo.model_dump(
            exclude={"retries", "min_workers", "min_workers_timeout_s", "ddp_vote_every_steps"}
        )
        return {
            "model": self.model.model_dump(),
            "data": data,
            "inner": self.inner.model_dump(),
            "algo": algo,
            "total_steps": self.total_steps,
        }

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model.kind == "gpt" and self.data.seq_len > self.model.block_size:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.block_size="
                f"{self.model.block_size}: lower data.seq_len or raise model.block_size"
            )
        if self.algo.inner_steps % self.algo.fragments:
            raise ValueError(
                f"algo.inner_steps={self.algo.inner_steps} is not a multiple of algo.fragments="
                f"{self.algo.fragments}: fragments sync every inner_steps / fragments steps"
            )
        if self.stop_at_step is not None and (
            self.algo.mode == "diloco" or self.stop_at_step % self.algo.inner_steps
        ):
            raise ValueError(
                "stop_at_step ends a ddp or single run at a multiple of algo.inner_steps "
                "(a warm start for others): change algo.mode or stop_at_step"
            )
        if self.algo.mode == "single" and (self.world != 1 or self.join == "join"):
            raise ValueError("single mode runs one worker: set world = 1 and join = 'start'")
        return self
