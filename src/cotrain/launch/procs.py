"""Start cotrain's roles as real processes and follow their JSON event streams.

Used by ``cotrain launch``, the demos, the tests and the benchmarks, so they drive processes
exactly as a user's shell would: ``python -m cotrain ROLE --section.key=value ...`` with the
same Python, optionally under a wrapper (``ip netns exec NAME``). A child started from the main
thread gets ``PR_SET_PDEATHSIG`` (SIGKILL): a driver that dies, even by ``kill -9``, leaves no
process behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from cotrain.core.clock import Deadline
from cotrain.core.config import to_overrides
from cotrain.core.errors import TimeoutExpired

if TYPE_CHECKING:
    from cotrain.demo.peer import PeerProgramConfig
    from cotrain.diloco.config import TrainConfig

COTRAIN = (sys.executable, "-m", "cotrain")
"""How a role is started: this Python, ``-m cotrain``."""
_PR_SET_PDEATHSIG = 1
_EOF: dict[str, Any] = {"event": "__eof__"}


def _prctl() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True).prctl if name else None
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved once, here: the child between fork and exec only calls it


def child_setup(*, nice: int = 0) -> Callable[[], None] | None:
    """What a child runs between fork and exec: die with its parent, then ``nice``.

    The parent-death signal fires when the thread that forked ends, so it is set only for
    children started from the main thread (a driver's helper threads come and go)."""
    pdeathsig = _PRCTL is not None and threading.current_thread() is threading.main_thread()
    if not pdeathsig and not nice:
        return None
    parent = os.getpid()

    def setup() -> None:
        if pdeathsig and _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the line above
                os._exit(1)
        if nice:
            os.nice(nice)

    return setup


def popen(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    nice: int = 0,
    new_group: bool = False,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
) -> subprocess.Popen[str]:
    """Start ``cmd`` (text mode) as a child that dies with this process; ``new_group``: in a
    process group of its own (so a terminal's Ctrl-C reaches only its driver, which decides)."""
    return subprocess.Popen(
        list(cmd),
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=dict(env) if env is not None else None,
        preexec_fn=child_setup(nice=nice),
        process_group=0 if new_group else None,
    )


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
            try:
                for line in self.popen.stdout:
                    self.lines.append(line.rstrip("\n"))
                    if line.startswith("{"):
                        try:
                            self.events.put(json.loads(line))
                        except json.JSONDecodeError:
                            pass
            except ValueError:  # stdout closed by stop()
                pass
            self.events.put(_EOF)

        threading.Thread(target=read, daemon=True).start()

    def next_event(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON event; ``TimeoutExpired`` if none comes in time or the process's
        output ended."""
        try:
            ev = self.events.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutExpired(f"{self.name}: no event within {timeout_s}s") from None
        if ev is _EOF:
            self.events.put(_EOF)  # every later call sees the end too
            tail = " | ".join(self.lines[-5:])
            raise TimeoutExpired(f"{self.name} ended (exit code {self.popen.poll()}): {tail}")
        return ev

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


def _env(secret: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["COTRAIN_SECRET"] = secret
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def _dashed(args: Sequence[str]) -> list[str]:
    """``key=value`` (the old form of an override) -> ``--key=value``."""
    return [a if a.startswith("-") or "=" not in a else f"--{a}" for a in args]


def start_master(
    secret: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> tuple[Proc, int]:
    """Start ``cotrain master`` and return it with the port it bound (from its ready line)."""
    cmd = [*wrapper, *COTRAIN, "master", f"--host={host}", f"--port={port}", *_dashed(args)]
    proc = Proc(popen(cmd, env=_env(secret)), "master")
    proc.start_reader()
    try:
        ready = proc.wait_for("ready", timeout_s)
    except TimeoutExpired as e:
        proc.stop()
        raise TimeoutExpired(f"master did not start within {timeout_s}s: {e}") from None
    return proc, int(ready["port"])


def start_peer(cfg: PeerProgramConfig, secret: str, *, wrapper: Sequence[str] = ()) -> Proc:
    """Start ``cotrain peer`` with ``cfg``; its events arrive on ``proc.events``."""
    cmd = [*wrapper, *COTRAIN, "peer", *to_overrides(cfg)]
    proc = Proc(popen(cmd, env=_env(secret)), f"peer{cfg.index}")
    proc.start_reader()
    return proc


def start_worker(
    cfg: TrainConfig, secret: str, *, wrapper: Sequence[str] = (), nice: int = 0
) -> Proc:
    """Start ``cotrain train`` with ``cfg``; its JSON records arrive on ``proc.events``."""
    cmd = [*wrapper, *COTRAIN, "train", *to_overrides(cfg)]
    env = _env(secret, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    proc = Proc(popen(cmd, env=env, nice=nice), f"worker{cfg.worker_index}")
    proc.start_reader()
    return proc
