"""A worker's JSON-lines log: one record per line, written to a file and echoed to stdout.

Records (``event``): ``start``, ``step`` (loss, lr, tokens), ``outer`` (after each outer step:
val loss, hash, world size, bytes, times), ``failed`` (a synchronisation failed and is retried),
``done``. Times are cumulative seconds since the worker's first step::

    compute_s   batches, forward, backward and optimizer steps (the inner steps)
    comm_s      collectives (all-reduce, shared-state sync) that succeeded
    waiting_s   topology votes (waiting for peers and joiners) and failed attempts
    blocked_s   overlap: the inner loop stood still waiting for a background synchronisation
                (with overlap, comm_s and waiting_s run beside the compute instead)
    eval_s      validation (not counted in the wall time used for utilization)
    utilization compute_s / (wall_s - eval_s)

``report_to`` adds other sinks behind one option: ``"tensorboard"`` (event files under
``<out>/tensorboard/worker<i>``, through ``torch.utils.tensorboard``) and ``"wandb"`` (when the
``wandb`` package is installed; its own settings come from the WANDB_* variables). Every numeric
field of ``step`` and ``outer`` records becomes a scalar at the record's ``step``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cotrain.core.errors import UsageError

Sink = Literal["tensorboard", "wandb"]


@dataclass
class Clocks:
    """Cumulative seconds per activity; ``utilization`` is compute over non-eval wall time."""

    started: float = field(default_factory=time.perf_counter)
    compute_s: float = 0.0
    comm_s: float = 0.0
    waiting_s: float = 0.0
    blocked_s: float = 0.0
    eval_s: float = 0.0

    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def utilization(self) -> float:
        busy = self.wall_s() - self.eval_s
        return self.compute_s / busy if busy > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": round(self.wall_s(), 4),
            "compute_s": round(self.compute_s, 4),
            "comm_s": round(self.comm_s, 4),
            "waiting_s": round(self.waiting_s, 4),
            "blocked_s": round(self.blocked_s, 4),
            "eval_s": round(self.eval_s, 4),
            "utilization": round(self.utilization(), 4),
        }


class MetricsLog:
    """Appends records to ``path`` (JSON lines) and, when ``echo``, to stdout."""

    def __init__(
        self,
        path: Path,
        *,
        echo: bool = True,
        report_to: list[Sink] | None = None,
        run_name: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tb: Any = None
        self._wandb: Any = None
        sinks = report_to or []
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError(
                    "report_to tensorboard: the tensorboard package is not installed "
                    "(pip install 'cotrain[tensorboard]')"
                ) from None
            self._tb = SummaryWriter(str(path.parent / "tensorboard" / path.stem))
        if "wandb" in sinks:
            try:
                import wandb
            except ImportError:
                raise UsageError("report_to wandb: the wandb package is not installed") from None
            self._wandb = wandb.init(name=run_name or path.stem, config=config, reinit=True)
        # line-buffered: a killed worker loses at most its last line
        self._file = open(path, "a", buffering=1)  # noqa: SIM115
        self._echo = echo

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields})
        self._file.write(line + "\n")
        if self._echo:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        if event in ("step", "outer") and (self._tb is not None or self._wandb is not None):
            step = int(fields.get("step", 0))
            scalars = {
                f"{event}/{k}": float(v)
                for k, v in fields.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
            }
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
            if self._wandb is not None:
                self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a JSON-lines log (a torn last line is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
