"""The README's user script (examples/diloco_hf.py) under ``cotrain launch``: 4 workers
fine-tune a Hugging Face causal LM with DiLoCo, one is killed mid-run and one is added with the
command launch prints, and every worker that finishes holds bit-identical parameters."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hf_harness import small_hf_model, write_text
from proc_harness import processes_with

from cotrain.core.clock import Deadline

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "diloco_hf.py"
STEPS = 60
_DONE = re.compile(r"\[w(\d+)\] worker (\d+): step (\d+), params sha256 ([0-9a-f]{64})")
_ADD = re.compile(r"\[launch\] add a worker from another shell: (.*)$")


def test_the_script_is_at_most_40_lines() -> None:
    assert len(SCRIPT.read_text().splitlines()) <= 40


def _launch(cmd: list[str], env: dict[str, str], lines: queue.Queue[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return proc


def _pids(port: int, index: int) -> list[int]:
    """The script processes of worker ``index`` of the run whose master is on ``port``."""
    return processes_with(f"COTRAIN_WORKER_INDEX={index}", f"COTRAIN_COMM__MASTER_PORT={port}")


@pytest.mark.timeout(300)
def test_launch_kill_one_add_one_ends_bit_identical(tmp_path: Path) -> None:
    text = write_text(tmp_path / "text.txt")
    model = small_hf_model(tmp_path / "model", text)
    events = tmp_path / "events.jsonl"  # the master's membership log (COTRAIN_EVENTS_FILE)
    env = dict(os.environ, OMP_NUM_THREADS="1", COTRAIN_EVENTS_FILE=str(events))
    env.pop("COTRAIN_SECRET", None)
    out: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    base = [sys.executable, "-m", "cotrain", "launch", "--nproc", "4"]
    procs = [_launch([*base, str(SCRIPT), str(model), str(text), str(STEPS)], env, out)]
    deadline = Deadline.after(240)

    def until(pattern: re.Pattern[str]) -> re.Match[str]:
        while True:
            line = out.get(timeout=deadline.check(f"a line matching {pattern.pattern}"))
            seen.append(line)
            if m := pattern.search(line):
                return m

    def collectives() -> int:
        try:
            recs = [json.loads(x) for x in events.read_text().splitlines() if x.strip()]
        except (OSError, ValueError):
            return 0
        return sum(1 for r in recs if r["event"] == "collective")

    try:
        add = shlex.split(until(_ADD)[1])
        port = int(next(a for a in add if a.startswith("--master=")).rsplit(":", 1)[1])
        while collectives() < 2:  # two collectives committed: the run is under way
            deadline.check("two collectives")
            assert procs[0].poll() is None, "\n".join(seen[-20:])
            threading.Event().wait(0.1)  # polling the master's log, not a synchronisation
        victims = _pids(port, 1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)  # the survivors wait for a replacement (min_workers)
        secret, cmd = add[0].split("=", 1), add[1:]
        assert secret[0] == "COTRAIN_SECRET" and cmd[:2] == ["cotrain", "launch"], add
        cmd = [sys.executable, "-m", *cmd]  # the venv's cotrain, as the printed command means
        procs.append(_launch(cmd, {**env, "COTRAIN_SECRET": secret[1]}, out))
        for p in procs:
            p.wait(deadline.remaining())
        while not out.empty():
            seen.append(out.get())
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(30)
    log = "\n".join(seen)
    assert procs[0].returncode != 0  # launch reports the worker that was killed ...
    assert procs[1].returncode == 0, log[-3000:]  # ... the added worker ran to the end
    done = {int(m[1]): m for m in _DONE.finditer(log)}
    assert sorted(done) == [0, 2, 3, 4], log[-3000:]
    assert {m[3] for m in done.values()} == {str(STEPS)}
    assert len({m[4] for m in done.values()}) == 1, {i: m[4] for i, m in done.items()}
    assert not _pids(port, 0) and not _pids(port, 4)  # nothing left running
