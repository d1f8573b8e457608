"""The README's user script (examples/diloco_hf.py): 4 workers fine-tune a Hugging Face causal
LM with DiLoCo, one is killed and a new one added mid-run, and every worker that finishes
holds bit-identical parameters."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from comm_harness import SECRET, MasterThread
from hf_harness import small_hf_model, write_text

from cotrain.core.clock import Deadline

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "diloco_hf.py"
STEPS = 60
_DONE = re.compile(r"worker (\d+): step (\d+), params sha256 ([0-9a-f]{64})")


def test_the_script_is_at_most_40_lines() -> None:
    assert len(SCRIPT.read_text().splitlines()) <= 40


def _start(port: int, index: int, model: Path, text: Path, steps: int) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        COTRAIN_COMM__MASTER_PORT=str(port),
        COTRAIN_COMM__HEARTBEAT_INTERVAL_S="0.2",
        COTRAIN_SECRET=SECRET,
        COTRAIN_WORKER_INDEX=str(index),
        COTRAIN_WORLD="4",
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, str(SCRIPT), str(model), str(text), str(steps)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


@pytest.mark.timeout(300)
def test_kill_one_add_one_ends_bit_identical(tmp_path: Path) -> None:
    text = write_text(tmp_path / "text.txt")
    model = small_hf_model(tmp_path / "model", text)
    master = MasterThread()
    procs: dict[int, subprocess.Popen[str]] = {}
    try:
        procs = {i: _start(master.port, i, model, text, STEPS) for i in range(4)}

        def seen(event: str, name: str | None = None) -> int:
            events = master.call(lambda: list(master.master.events))
            return sum(1 for e in events if e["event"] == event and name in (None, e.get("name")))

        def wait_for(event: str, count: int, name: str | None = None) -> None:
            while seen(event, name) < count:
                deadline.check(f"{count} {event} events")
                assert all(p.poll() is None for p in procs.values()), "a worker stopped early"
                threading.Event().wait(0.1)  # polling the master's log, not a synchronisation

        deadline = Deadline.after(240)
        wait_for("collective", 2)  # two collectives committed: the run is under way
        procs[1].send_signal(signal.SIGKILL)  # one is killed: the survivors wait (min_workers)
        procs[4] = _start(master.port, 4, model, text, STEPS)  # for the one added now
        outs = {i: p.communicate(timeout=deadline.remaining())[0] for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        master.stop()
    assert procs[1].returncode == -signal.SIGKILL
    done = {}
    for i, out in outs.items():
        if i == 1:
            continue
        m = _DONE.search(out)
        assert m and procs[i].returncode == 0, out[-2000:]
        done[i] = m
    assert {m[2] for m in done.values()} == {str(STEPS)}
    assert len({m[3] for m in done.values()}) == 1, {i: m[3] for i, m in done.items()}
