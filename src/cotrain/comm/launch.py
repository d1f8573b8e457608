"""Start a master and scripted peers as real processes, and follow their JSON event streams.

Used by the demo, the tests and the benchmarks. Processes are started with the same Python
(`python -m cotrain ...`), optionally under a wrapper (``ip netns exec NAME``), and always reaped.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cotrain.comm.program import PeerProgramConfig
from cotrain.core.clock import Deadline
from cotrain.core.errors import TimeoutExpired

_LISTEN = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class Proc:
    """A child process whose stdout lines (JSON events) are collected by a reader thread."""

    popen: subprocess.Popen[str]
    name: str
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    lines: list[str] = field(default_factory=list)

    def start_reader(self) -> None:
        def read() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("{"):
                    try:
                        self.events.put(json.loads(line))
                    except json.JSONDecodeError:
                        pass

        threading.Thread(target=read, daemon=True).start()

    def next_event(self, timeout_s: float) -> dict[str, Any]:
        try:
            return self.events.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutExpired(f"{self.name}: no event within {timeout_s}s") from None

    def wait_for(self, event: str, timeout_s: float, **match: Any) -> dict[str, Any]:
        deadline = Deadline.after(timeout_s)
        while True:
            ev = self.next_event(deadline.check(f"{self.name} to report {event}"))
            if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
                return ev

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout_s)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def _env(secret: str) -> dict[str, str]:
    env = dict(os.environ)
    env["COTRAIN_SECRET"] = secret
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_master(
    secret: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> tuple[Proc, int]:
    """Start `cotrain master` and return it with the port it bound."""
    cmd = [
        *wrapper,
        sys.executable,
        "-m",
        "cotrain",
        "master",
        "--host",
        host,
        "--port",
        str(port),
        *args,
    ]
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(secret)
    )
    proc = Proc(popen, "master")
    assert popen.stdout is not None
    deadline = Deadline.after(timeout_s)
    result: list[int] = []

    def find_port() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            proc.lines.append(line.rstrip("\n"))
            mt = _LISTEN.search(line)
            if mt:
                result.append(int(mt.group(2)))
                return

    t = threading.Thread(target=find_port, daemon=True)
    t.start()
    t.join(deadline.remaining())
    if not result:
        proc.stop()
        raise TimeoutExpired(
            f"master did not start within {timeout_s}s: {' | '.join(proc.lines[-5:])}"
        )
    proc.start_reader()
    return proc, result[0]


def start_peer(cfg: PeerProgramConfig, secret: str, *, wrapper: Sequence[str] = ()) -> Proc:
    """Start `cotrain peer` with ``cfg``; its events arrive on ``proc.events``."""
    cmd = [
        *wrapper,
        sys.executable,
        "-m",
        "cotrain",
        "peer",
        "--config-json",
        cfg.model_dump_json(),
    ]
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(secret)
    )
    proc = Proc(popen, f"peer{cfg.index}")
    proc.start_reader()
    return proc
