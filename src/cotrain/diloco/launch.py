"""Start training workers as real processes (`python -m cotrain train --config-json ...`).

Their JSON-lines records arrive on ``Proc.events`` (see ``cotrain.comm.launch.Proc``), so the
demo, the benchmark and the tests drive workers exactly as a user's shell would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from cotrain.comm.launch import Proc
from cotrain.diloco.config import TrainConfig


def start_worker(
    cfg: TrainConfig, secret: str, *, wrapper: Sequence[str] = (), nice: int = 0
) -> Proc:
    """Start one worker; its stdout (JSON records) is followed by a reader thread."""
    cmd = [*wrapper, sys.executable, "-m", "cotrain", "train", "--config-json"]
    cmd.append(cfg.model_dump_json())
    env = dict(os.environ, COTRAIN_SECRET=secret, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    popen = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )
    proc = Proc(popen, f"worker{cfg.worker_index}")
    proc.start_reader()
    return proc
