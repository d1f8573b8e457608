"""``cotrain launch`` and the one service lifecycle: a run of two workers that completes, Ctrl-C
that leaves no process behind, workers added to a running master, a dead master that stops the
workers, and SIGINT/SIGTERM on a server (ready line, one stop line, exit code)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import IO

import pytest
from cli_harness import Cotrain, child_env, tagged

# A user's script under `cotrain launch`: its CommConfig comes from the environment.
SCRIPT = """
import json, os, sys, threading
from cotrain.comm import Communicator, CommConfig
from cotrain.core.config import config_from_env

cfg = config_from_env(CommConfig, "COTRAIN_COMM__")
with Communicator(cfg) as comm:
    comm.connect()
    print(json.dumps({"event": "connected", "index": int(os.environ["COTRAIN_WORKER_INDEX"]),
                      "world": int(os.environ["COTRAIN_WORLD"]), "port": cfg.master_port}),
          flush=True)
    if sys.argv[1:] == ["--stay"]:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            sys.exit(130)
"""


class Running:
    """A ``cotrain`` process whose stdout and stderr lines arrive on queues (no sleeps)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "cotrain", *args]
        self.popen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        assert self.popen.stdout is not None and self.popen.stderr is not None
        for stream, sink in ((self.popen.stdout, self.out.put), (self.popen.stderr, None)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream: IO[str], sink: object) -> None:
        for line in stream:
            if sink is None:
                self.err.append(line.rstrip("\n"))
            else:
                self.out.put(line.rstrip("\n"))
        stream.close()
        if sink is not None:
            self.out.put(None)

    def expect(self, pattern: str, timeout_s: float = 60.0) -> str:
        """The next stdout line matching ``pattern``."""
        while True:
            line = self.out.get(timeout=timeout_s)
            assert line is not None, f"ended without {pattern!r}: {self.err[-10:]}"
            if re.search(pattern, line):
                return line

    def finish(self, timeout_s: float = 60.0) -> int:
        return self.popen.wait(timeout=timeout_s)


@pytest.mark.timeout(180)
def test_launch_two_workers_to_the_end(tiny_toml, tmp_path: Path, cotrain: Cotrain) -> None:
    config = tiny_toml(total_steps=8)
    ran = cotrain("launch", "--nproc", "2", config, "--log_every_steps", "8", timeout_s=170)
    assert ran.code == 0, ran.stderr
    assert ran.left == []
    done = {}
    for line in ran.stdout.splitlines():
        name, _, rest = line.partition(" ")
        if rest.startswith('{"event": "done"'):
            done[name] = json.loads(rest)
    assert set(done) == {"[w0]", "[w1]"}, ran.stdout
    assert done["[w0]"]["hash"] == done["[w1]"]["hash"] and done["[w0]"]["step"] == 8
    ready = json.loads(next(x for x in ran.stdout.splitlines() if '"role": "launch"' in x))
    assert ready["event"] == "ready" and ready["workers"] == [0, 1]
    hint = next(x for x in ran.stderr.splitlines() if "add a worker" in x)
    assert f"--master={ready['master']}" in hint and "--first-index=2" in hint
    assert "COTRAIN_SECRET=" in hint and str(config) in hint
    assert "[master] master stopped after" in ran.stderr
    assert ran.stderr.splitlines()[-1].startswith("launch finished after")
    for i in (0, 1):  # each worker's resolved config, next to its output
        written = json.loads((tmp_path / "run" / f"config{i}.json").read_text())
        assert written["worker_index"] == i and written["world"] == 2
        assert written["comm"]["secret"] == "<redacted>"


@pytest.mark.timeout(120)
def test_ctrl_c_stops_everything_and_workers_join_a_running_master(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    tag = uuid.uuid4().hex
    first = Running(["launch", "--nproc", "2", str(script), "--stay"], child_env(tag))
    try:
        ready = json.loads(first.expect('"role": "launch"'))
        host, port = ready["master"].split(":")
        seen = [json.loads(first.expect('"event": "connected"').split(" ", 1)[1]) for _ in "ab"]
        assert sorted(e["index"] for e in seen) == [0, 1]
        assert {(e["world"], e["port"]) for e in seen} == {(2, int(port))}
        # a worker added to the running run: the secret and address the launch printed
        hint = next(x for x in first.err if "add a worker" in x)
        secret = re.search(r"COTRAIN_SECRET=(\w+)", hint)
        assert secret is not None
        tag2 = uuid.uuid4().hex
        args = ["launch", "--nproc", "1", "--master", ready["master"], "--first-index", "2"]
        more = Running([*args, str(script)], child_env(tag2, COTRAIN_SECRET=secret[1]))
        joined = json.loads(more.expect('"event": "connected"').split(" ", 1)[1])
        assert (joined["index"], joined["port"]) == (2, int(port))
        assert more.finish() == 0 and tagged(tag2) == []
        first.popen.send_signal(signal.SIGINT)
        assert first.finish() == 130
    finally:
        first.popen.kill()
        first.popen.wait(timeout=30)
    assert tagged(tag) == [], "processes left behind"
    assert first.err[-1].startswith("launch stopped after") and "(SIGINT)" in first.err[-1]
    assert host == "127.0.0.1"


@pytest.mark.timeout(120)
def test_a_dead_master_stops_the_workers(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    tag = uuid.uuid4().hex
    run = Running(["launch", "--nproc", "2", str(script), "--stay"], child_env(tag))
    try:
        master = json.loads(run.expect(r'^\[master\] \{"event": "ready"').split(" ", 1)[1])
        for _ in range(2):
            run.expect('"event": "connected"')
        os.kill(master["pid"], signal.SIGKILL)
        code = run.finish()
    finally:
        run.popen.kill()
        run.popen.wait(timeout=30)
    assert code == 1
    assert run.err[-1] == "error: the master exited with code 137 during the run", run.err[-5:]
    assert tagged(tag) == [], "processes left behind"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("role", ["master", "shardcast origin"])
def test_servers_stop_the_same_way(role: str, sig: signal.Signals, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    args = [*role.split(), "--port", "0"]
    if role == "master":
        env = child_env(tag, COTRAIN_SECRET="x")
    else:
        env = child_env(tag)
        args += ["--dir", str(tmp_path / "o")]
    server = Running(args, env)
    try:
        ready = json.loads(server.expect('"event": "ready"'))
        assert ready["role"] == role.split()[-1] and ready["port"] > 0
        server.popen.send_signal(sig)
        code = server.finish()
    finally:
        server.popen.kill()
        server.popen.wait(timeout=30)
    assert code == (130 if sig == signal.SIGINT else 0)
    last = server.err[-1]
    assert re.match(rf"{role.split()[-1]} stopped after [\d.]+ s \({sig.name}\): \S", last), last
    assert tagged(tag) == []
    if role != "master":  # the resolved config, beside the directory it serves
        assert json.loads((tmp_path / "o.config.json").read_text())["serve"]["port"] == 0
