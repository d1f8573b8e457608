"""Ctrl-C (SIGINT) on ``cotrain train``: a clean stop with one summary line and exit code 130,
no temporary file anywhere in the output directory, and a checkpoint the next run resumes."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import pytest
from diloco_harness import tiny_train_config, write_fake_shakespeare

from cotrain.diloco import TrainConfig
from cotrain.diloco import checkpoint as ckpt
from cotrain.launch.procs import Proc, start_master, start_worker

pytestmark = pytest.mark.timeout(240)


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("mode", ["diloco", "single"])
def test_sigint_leaves_no_temp_files_and_a_resumable_checkpoint(tmp_path: Path, mode: str) -> None:
    cache = tmp_path / "cache"
    write_fake_shakespeare(cache)
    secret = secrets.token_hex(8)
    master, port = start_master(secret)
    procs: list[Proc] = []
    try:
        cfg = TrainConfig.model_validate(
            tiny_train_config(
                cache,
                tmp_path / "run",
                total_steps=400,
                **{"algo.mode": mode, "comm.master_port": port, "algo.inner_steps": 4},
            )
        )
        first = start_worker(cfg, secret)
        procs.append(first)
        # two outer records: the run is under way and has written checkpoints
        first.wait_for("outer", 120, outer_step=2)
        first.popen.send_signal(signal.SIGINT)
        assert first.popen.wait(60) == 130
        tail = first.lines[-3:]
        assert any(line.startswith("train stopped after") for line in tail), tail
        assert not any("Traceback" in line for line in first.lines)
        assert _leftovers(tmp_path / "run") == []
        saved = ckpt.load(tmp_path / "run" / "worker0" / "checkpoint")
        assert saved is not None and saved.meta["step"] >= 4
        # the next run resumes from it (a shorter run ends sooner: same config, so resume)
        second = start_worker(cfg, secret)
        procs.append(second)
        start = second.wait_for("start", 120)
        assert start["resumed_step"] is not None and start["resumed_step"] >= saved.meta["step"]
        second.popen.send_signal(signal.SIGINT)
        assert second.popen.wait(60) == 130
        assert _leftovers(tmp_path / "run") == []
    finally:
        for p in procs:
            p.stop()
        master.stop()
