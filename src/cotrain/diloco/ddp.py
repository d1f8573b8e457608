"""``DDP``: every step's gradients averaged over the run, on the same elastic comm as DiLoCo.

::

    with DDP(comm, model, optimizer, quantization="none") as ddp:
        while ddp.step < total_steps:
            loss = model(**next(batches)).loss; loss.backward()
            ddp.sync_gradients()          # average the gradients over the workers
            optimizer.step(); optimizer.zero_grad()

The replicas stay equal because they start equal and apply the same averaged gradient. The
shared state (the params, the optimizer's moments, the step) is compared only when the
membership changed: a joiner, or a worker restored from an older checkpoint, fetches the
majority's in place and recomputes its gradient (``recompute``) before the all-reduce; without
``recompute`` it contributes its stale gradient that once. A step that loses a peer is retried
with the survivors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from cotrain.comm.communicator import Communicator
from cotrain.comm.config import Quantization
from cotrain.core.errors import UsageError
from cotrain.diloco.metrics import Clocks
from cotrain.diloco.outer import flatten, load_flat
from cotrain.diloco.sync import EventLog, Synchronizer, SyncOutcome

_MOMENTS = {
    torch.optim.Adam: ("exp_avg", "exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq"),
    torch.optim.SGD: ("momentum_buffer",),
}


class DDP:
    """Data-parallel training over ``comm``; see the module docstring. ``vote_every`` steps
    it admits joiners (and after any failure); ``world`` workers are awaited at a start."""

    def __init__(
        self,
        comm: Communicator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        quantization: Quantization = "none",
        vote_every: int = 10,
        world: int | None = None,
        retries: int = 8,
        min_workers: int = 1,
        min_workers_timeout_s: float = 600.0,
        revision_hint: int = 0,
        params: list[nn.Parameter] | None = None,
        clocks: Clocks | None = None,
        log: EventLog | None = None,
    ) -> None:
        if vote_every < 1:
            raise UsageError(f"vote_every={vote_every} must be >= 1")
        self.comm = comm
        self.model = model
        self.optimizer = optimizer
        self.params = (
            params if params is not None else [p for p in model.parameters() if p.requires_grad]
        )
        self.quantization: Quantization = quantization
        self.vote_every = vote_every
        self.world = world
        self.clocks = clocks or Clocks()
        self.step = 0
        """Optimizer steps the run has taken (agreed by all workers)."""
        self._joining = False
        self._first = True
        self._shared = self._shared_state()
        self._grads = torch.zeros(sum(p.numel() for p in self.params))  # (N,)
        self._sync = Synchronizer(
            comm,
            clocks=self.clocks,
            log_=log,
            retries=retries,
            revision_hint=revision_hint,
            min_workers=min_workers,
            min_workers_timeout_s=min_workers_timeout_s,
        )

    def _shared_state(self) -> dict[str, torch.Tensor]:
        """The params, the optimizer's moments (created now, zero: the state must exist on
        every replica before the first step to be compared) and the step."""
        keys = next((v for k, v in _MOMENTS.items() if type(self.optimizer) is k), None)
        if keys is None:
            raise UsageError(
                f"DDP shares the optimizer's state: {type(self.optimizer).__name__} is not "
                "supported (use torch.optim.Adam, AdamW or SGD)"
            )
        shared: dict[str, torch.Tensor] = {"step": torch.zeros(1, dtype=torch.int64)}
        for i, p in enumerate(self.params):
            st = self.optimizer.state[p]
            shared[f"p{i:04d}"] = p.data
            if isinstance(self.optimizer, torch.optim.SGD):
                group = self.optimizer.param_groups[0]
                if group["momentum"] == 0:
                    continue
                if group["dampening"] != 0:
                    raise UsageError("DDP with SGD needs dampening = 0")
            elif "step" not in st:
                st["step"] = torch.tensor(0.0)
            for key in keys:
                if key not in st:
                    st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                shared[f"s{i:04d}.{key}"] = st[key]
        return shared

    def join(self) -> None:
        """Enter the ring: at the start of a run, wait for ``world`` workers; in a run in
        progress (the master reports a shared state), join at the others' next vote and
        receive their state at the first step. ``with DDP(...)`` calls it."""
        comm = self.comm
        self._joining = comm.run_revision is not None
        if comm.rank < 0:
            if self.world and not self._joining:
                comm.wait_for_world(self.world, timeout_s=self._sync.min_workers_timeout_s)
            else:
                comm.update_topology()

    def __enter__(self) -> DDP:
        self.join()
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to finish: every step's all-reduce completed within ``sync_gradients``."""

    def sync_gradients(self, recompute: Callable[[], None] | None = None) -> SyncOutcome:
        """Average the gradients of ``params`` over the workers, in place; counts the step.

        ``recompute`` (optional) redoes this step's forward and backward: called when this
        replica just received the others' state, so its gradient is computed on it."""
        shared, grads = self._shared, self._grads

        def fill() -> None:
            torch.cat([_grad(p).reshape(-1) for p in self.params], out=grads)

        def refetched() -> None:
            self.step = int(shared["step"][0])
            for p in self.params:
                st = self.optimizer.state[p]
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = torch.tensor(float(self.step))
            if recompute is not None:
                recompute()
            fill()

        fill()
        shared["step"][0] = self.step
        vote = self.step % self.vote_every == 0 and not (self._first and self._joining)
        out = self._sync.gradients(
            shared,
            grads,
            recompute=refetched,
            quantization=self.quantization,
            vote=vote,
            step=self.step,
        )
        load_flat([_grad(p) for p in self.params], grads)  # type: ignore[misc]
        self._first = False
        self.step += 1
        return out

    def digest(self) -> str:
        """SHA-256 prefix of the params (equal on every replica)."""
        return hashlib.sha256(flatten(self.params).numpy().tobytes()).hexdigest()[:16]


def _grad(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad
