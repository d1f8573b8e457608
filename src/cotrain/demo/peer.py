"""A scripted peer: the process that tests, the demos and the benchmarks start (`cotrain peer`).

Each round it (1) calls ``update_topology()`` so joiners get in, (2) syncs a tiny shared state
(the round counter, revision = round + 1) so a joiner learns where the run is, and (3) all-reduces
a deterministic tensor (seeded by run seed, peer index and round), retrying with the survivors
when a peer fails. It prints one JSON object per line (``event`` = joined, round, failed, done)
for whoever drives it, and can save each result to ``out_dir`` for exact checks.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from cotrain.comm.communicator import Communicator
from cotrain.comm.config import CommConfig, Quantization, ReduceOp
from cotrain.comm.errors import RETRYABLE
from cotrain.comm.faults import FaultPlan
from cotrain.core.clock import Deadline
from cotrain.core.config import ConfigModel


class PeerProgramConfig(ConfigModel):
    """A scripted peer: ``cotrain peer [CONFIG.toml] [--section.key value]``."""

    comm: CommConfig = Field(default_factory=CommConfig)
    """How to reach the master and the ring."""
    faults: FaultPlan = Field(default_factory=FaultPlan)
    """Faults to inject into this peer."""
    index: int = Field(default=0, ge=0)
    """Stable index of this peer; seeds its input tensors."""
    seed: int = 0
    """Run seed."""
    numel: int = Field(default=1 << 20, ge=1)
    """Values per all-reduce."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Tensor dtype (bf16 and fp16 use torch tensors)."""
    op: ReduceOp = "sum"
    """Reduction."""
    quantization: Quantization = "none"
    """Wire quantization."""
    rounds: int = Field(default=10, ge=1)
    """All-reduces to run."""
    world: int = Field(default=1, ge=1)
    """Wait for this many peers before the first round (ignored by joiners)."""
    join: bool = False
    """Join a running ring (learn the round from the shared state) instead of starting it."""
    out_dir: str | None = None
    """Save each round's result as out_dir/r{round}_p{index}.npy."""
    retries: int = Field(default=5, ge=0)
    """Retries of a failed round with the survivors (failed collectives; see retry_timeout_s)."""
    retry_timeout_s: float = Field(default=120.0, gt=0)
    """Give up on a round after this long. Rejoining after being dropped takes a few quick
    failures (kicked, the old master link's EOF, the reconnect) that are not counted as retries."""
    barrier: bool = False
    """Benchmark mode: a 1-value all-reduce right before the timed one, so the timing starts with
    every peer ready (as a barrier does for torch.distributed)."""
    rollback: bool = True
    """Save the input so a failed all-reduce leaves it unchanged (the library's default)."""
    buffer: Literal["numpy", "torch"] = "numpy"
    """Who allocates an fp32 input: numpy (which asks the kernel for transparent huge pages for
    large arrays) or torch (as for model tensors; no huge pages unless the system default)."""
    digest: bool = True
    """Report a SHA-256 prefix of each result (costs a pass over the tensor)."""
    compute_s: float = Field(default=0.0, ge=0)
    """Emulated compute (an idle wait) before each round, as a trainer computes between two
    synchronisations; retries of a failed round do not wait again."""
    inputs: Literal["normal", "integer"] = "normal"
    """Input values: seeded normal floats, or seeded integers in [-1000, 1000) (every sum is
    then exact in fp32 and independent of the order of additions: a checker can recompute the
    result's bytes)."""


def base_input(
    seed: int, index: int, numel: int, inputs: Literal["normal", "integer"] = "normal"
) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    if inputs == "integer":
        return rng.integers(-1000, 1000, numel).astype(np.float32)
    return rng.standard_normal(numel, dtype=np.float32)


def make_input(
    seed: int,
    index: int,
    rnd: int,
    numel: int,
    base: np.ndarray | None = None,
    inputs: Literal["normal", "integer"] = "normal",
) -> np.ndarray:
    """The tensor peer ``index`` contributes in round ``rnd``: fp32, seeded, reproducible."""
    if base is None:
        base = base_input(seed, index, numel, inputs)
    return base + np.float32(rnd)


def _buffers(cfg: PeerProgramConfig) -> tuple[np.ndarray, Any]:
    """(fp32 values the round's input is written into, the tensor the collective reduces).

    Both are allocated once: every round reduces the same memory, as a trainer reducing its
    gradient buffers does (and as the torch.distributed baseline in bench/allreduce.py does),
    not 64 fresh MiB. An fp32 tensor *is* the values (numpy's array, or a torch tensor sharing
    its memory); fp16/bf16 tensors get the values converted in by ``_convert`` each round."""
    if cfg.dtype == "fp32" and cfg.buffer == "numpy":
        values = np.empty(cfg.numel, dtype=np.float32)
        return values, values
    import torch

    if cfg.dtype == "fp32":
        tensor = torch.empty(cfg.numel, dtype=torch.float32)
        return tensor.numpy(), tensor
    dtype = torch.float16 if cfg.dtype == "fp16" else torch.bfloat16
    return np.empty(cfg.numel, dtype=np.float32), torch.empty(cfg.numel, dtype=dtype)


def _convert(values: np.ndarray, tensor: Any) -> None:
    """Round the fp32 ``values`` into the fp16/bf16 torch ``tensor``."""
    import torch

    tensor.copy_(torch.from_numpy(values))


def _as_fp32(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    import torch

    return t.to(torch.float32).numpy()


def emit(**event: Any) -> None:
    event["t"] = time.time()
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def make_communicator(cfg: PeerProgramConfig) -> Communicator:
    """This peer's communicator (``ValueError`` for a missing key, token or admission rule)."""
    return Communicator(cfg.comm, name=f"p{cfg.index}", faults=cfg.faults)


def run(cfg: PeerProgramConfig, comm: Communicator) -> int:
    """The rounds, with ``comm`` connected (``comm.connect()``); closes it at the end."""
    try:
        return _rounds(cfg, comm)
    finally:
        comm.close()


def _rounds(cfg: PeerProgramConfig, comm: Communicator) -> int:
    counter = np.zeros(1, dtype=np.int64)
    if cfg.join:
        comm.update_topology()
    else:
        comm.wait_for_world(cfg.world)
    emit(
        event="joined",
        index=cfg.index,
        key=comm.peer_id,
        rank=comm.rank,
        world=comm.world_size,
        epoch=comm.epoch,
    )
    rnd = 0
    first = True
    base = base_input(cfg.seed, cfg.index, cfg.numel, cfg.inputs)
    values, tensor = _buffers(cfg)
    ping = np.zeros(1, dtype=np.float32)
    while rnd < cfg.rounds:
        if cfg.compute_s:
            time.sleep(cfg.compute_s)
        attempt = 0
        failed_at: float | None = None
        budget = Deadline.after(cfg.retry_timeout_s)
        while True:
            started = time.perf_counter()
            collective = False  # failures before the collective (rejoining) are not retries
            stage, epoch = "vote", comm.epoch
            try:
                if not first:
                    comm.update_topology()
                stage, epoch = "sync", comm.epoch
                rev = comm.revision
                counter[0] = rnd
                comm.sync_shared_state(
                    {"round": counter}, revision=(rev + 1) if rev is not None else 0
                )
                rnd = int(counter[0])  # a joiner (or a peer that was dropped) learns the round
                first = False
                np.add(base, np.float32(rnd), out=values)  # make_input, in place
                if cfg.dtype != "fp32":
                    _convert(values, tensor)
                collective = True
                stage = "all_reduce"
                if cfg.barrier:
                    comm.all_reduce(ping, op="sum")
                started = time.perf_counter()
                cpu0 = time.process_time()
                res = comm.all_reduce(
                    tensor, op=cfg.op, quantization=cfg.quantization, rollback=cfg.rollback
                )
                break
            except RETRYABLE as e:
                failed_at = failed_at or time.time()
                # a failed all-reduce must leave its input as it was (checked when rolled back)
                restored = None
                if stage == "all_reduce" and cfg.rollback and cfg.dtype == "fp32":
                    restored = bool(np.array_equal(_as_fp32(tensor), base + np.float32(rnd)))
                emit(
                    event="failed",
                    index=cfg.index,
                    round=rnd,
                    stage=stage,
                    epoch=epoch,
                    error=type(e).__name__,
                    message=str(e)[:300],
                    seconds=time.perf_counter() - started,
                    restored=restored,
                )
                attempt += int(collective)
                first = False
                if attempt > cfg.retries or budget.expired():
                    raise
        out = _as_fp32(tensor)
        if cfg.out_dir:
            np.save(Path(cfg.out_dir) / f"r{rnd}_p{cfg.index}.npy", out)
        emit(
            event="round",
            index=cfg.index,
            round=rnd,
            world=res.world_size,
            epoch=res.epoch,
            ring=comm.ring_names,
            ring_keys=comm.ring,
            seconds=res.seconds,
            cpu_s=time.process_time() - cpu0,
            bytes_sent=res.bytes_sent,
            bytes_received=res.bytes_received,
            recovery_s=(time.time() - failed_at) if failed_at else None,
            digest=hashlib.sha256(out.tobytes()).hexdigest()[:16] if cfg.digest else None,
        )
        rnd += 1
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    emit(
        event="done",
        index=cfg.index,
        bytes_sent=comm.bytes_sent,
        cpu_user_s=ru.ru_utime,
        cpu_sys_s=ru.ru_stime,
    )
    return 0
