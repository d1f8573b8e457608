"""``cotrain launch``: a master and N workers from one terminal, and no process left behind.

What runs (``Launch.run``):

1. unless ``--master HOST:PORT`` names a running one (or the run is ``algo.mode = "single"``),
   a master: ``cotrain master --port 0`` with a random run secret, found by its ready line;
2. N workers, each ``cotrain train CONFIG.toml --world=N [overrides] --worker_index=i
   --comm.master_host=H --comm.master_port=P`` (with ``--master``: ``--join=join`` instead of
   ``--world``), or a user's ``python script.py [args]`` with ``COTRAIN_COMM__MASTER_HOST``,
   ``COTRAIN_COMM__MASTER_PORT``, ``COTRAIN_SECRET``, ``COTRAIN_WORKER_INDEX`` and
   ``COTRAIN_WORLD`` in its environment;
3. their output, line by line, prefixed ``[master] `` and ``[w0] `` (stdout to stdout, stderr
   to stderr);
4. the end: when every worker has exited, the master is stopped and launch exits with the
   workers' status (0, or the first worker's failing code). A worker that fails does not stop
   the others (the run is elastic); a master that dies does (they cannot go on without it).

Stopping: Ctrl-C or SIGTERM is forwarded to every worker (each in its own process group, so
a terminal's Ctrl-C reaches only launch, which decides), then the master gets SIGTERM; what
has not exited after ``stop_timeout_s`` is killed with its whole process group. Every child
also has PR_SET_PDEATHSIG: if launch itself is killed with SIGKILL, they die with it.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import IO, Any, Literal

from cotrain.core.clock import Deadline
from cotrain.core.errors import CotrainError, UsageError
from cotrain.core.service import Service
from cotrain.launch.config import LaunchConfig
from cotrain.launch.procs import COTRAIN, popen


class LaunchError(CotrainError):
    """The master started here did not come up, or died while the workers ran."""


@dataclass(frozen=True)
class Target:
    """What each worker runs: ``cotrain train CONFIG.toml ARGS`` or ``python SCRIPT ARGS``."""

    kind: Literal["config", "script"]
    path: Path
    args: tuple[str, ...] = ()
    single: bool = False
    """A config in ``algo.mode = "single"``: no master is needed."""


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[str]
    threads: list[threading.Thread] = field(default_factory=list)


def _status(rc: int) -> int:
    """A shell's view of an exit code: killed by signal N is 128 + N."""
    return 128 - rc if rc < 0 else rc


class Launch:
    """One ``cotrain launch``; ``run(svc)`` under a ``Service("launch")``."""

    def __init__(
        self,
        cfg: LaunchConfig,
        target: Target,
        *,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        command: str = "cotrain launch",
    ) -> None:
        self.cfg = cfg
        self.target = target
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._command = command
        self._lock = threading.Lock()  # one whole line at a time on our stdout and stderr
        self._events: Queue[tuple[str, str, Any]] = Queue()
        self._master: _Child | None = None
        self._workers: list[_Child] = []
        self.codes: dict[str, int] = {}
        """Exit status of each worker that ended (``w0`` -> 0)."""

    # ---- output --------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        with self._lock:
            print(f"[launch] {text}", file=self._err, flush=True)

    def _pump(self, child: _Child, stream: IO[str], sink: IO[str], watch: bool) -> None:
        prefix = f"[{child.name}] "
        for line in stream:
            if watch and line.startswith('{"event": "ready"'):
                try:
                    self._events.put(("ready", child.name, json.loads(line)))
                except json.JSONDecodeError:
                    pass
            with self._lock:
                sink.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
                sink.flush()
        stream.close()

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], watch: bool) -> _Child:
        proc = popen(cmd, env=env, new_group=True, stderr=subprocess.PIPE)
        child = _Child(name, proc)
        assert proc.stdout is not None and proc.stderr is not None
        pumps: list[tuple[IO[str], IO[str], bool]] = [
            (proc.stdout, self._out, watch),
            (proc.stderr, self._err, False),
        ]
        for stream, sink, w in pumps:
            t = threading.Thread(target=self._pump, args=(child, stream, sink, w), daemon=True)
            t.start()
            child.threads.append(t)

        def wait() -> None:
            self._events.put(("exit", name, proc.wait()))

        threading.Thread(target=wait, daemon=True).start()
        return child

    # ---- the run -------------------------------------------------------------------------------

    def run(self, svc: Service) -> int:
        """Start everything, wait for the workers; the workers' status. A signal arrives as
        ``KeyboardInterrupt`` (``Service``); every child is stopped on the way out."""
        svc.summary = self._summary
        try:
            host, port, secret = self._master_address()
            self._start_workers(host, port, secret)
            svc.ready(
                master=f"{host}:{port}" if port else None,
                workers=[self.cfg.first_index + i for i in range(self.cfg.nproc)],
            )
            return self._supervise()
        finally:
            self._stop_all(svc.stop_signal)

    def _master_address(self) -> tuple[str, int, str]:
        cfg = self.cfg
        if cfg.master is not None:
            secret = os.environ.get("COTRAIN_SECRET", "")
            host, port = cfg.master_address()
            self.say(f"adding workers {self._indices()} to the run at {host}:{port}")
            return host, port, secret
        if self.target.single:
            return "", 0, ""
        secret = secrets.token_hex(16)
        env = dict(os.environ, COTRAIN_SECRET=secret, PYTHONUNBUFFERED="1")
        cmd = [*COTRAIN, "master", f"--host={cfg.master_host}", "--port=0"]
        self._master = self._spawn("master", cmd, env, watch=True)
        deadline = Deadline.after(cfg.start_timeout_s)
        while True:
            try:
                kind, name, info = self._events.get(timeout=deadline.remaining())
            except Empty:
                raise LaunchError(
                    f"the master did not listen within {cfg.start_timeout_s} s"
                ) from None
            if kind == "ready" and name == "master":
                port = int(info["port"])
                break
            if kind == "exit" and name == "master":
                rc = _status(info)
                why = f"the master exited with code {rc} before it listened (see [master] above)"
                raise UsageError(why) if rc == 2 else LaunchError(why)
        host = cfg.master_host
        add = [
            "COTRAIN_SECRET=" + secret,
            *shlex.split(self._command),
            "--nproc=1",
            f"--master={host}:{port}",
            f"--first-index={cfg.first_index + cfg.nproc}",
            str(self.target.path),
            *self.target.args,
        ]
        self.say(f"master listening on {host}:{port} (run secret in COTRAIN_SECRET)")
        self.say("add a worker from another shell: " + shlex.join(add))
        return host, port, secret

    def _indices(self) -> list[int]:
        return [self.cfg.first_index + i for i in range(self.cfg.nproc)]

    def _start_workers(self, host: str, port: int, secret: str) -> None:
        n = self.cfg.nproc
        for index in self._indices():
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if secret:
                env["COTRAIN_SECRET"] = secret
            if self.target.kind == "script":
                env.update(
                    COTRAIN_COMM__MASTER_HOST=host,
                    COTRAIN_COMM__MASTER_PORT=str(port),
                    COTRAIN_WORKER_INDEX=str(index),
                    COTRAIN_WORLD=str(n),
                )
                cmd = [sys.executable, str(self.target.path), *self.target.args]
            else:
                first = ["--join=join"] if self.cfg.master is not None else [f"--world={n}"]
                last = [f"--worker_index={index}"]
                if port:
                    last += [f"--comm.master_host={host}", f"--comm.master_port={port}"]
                cmd = [*COTRAIN, "train", str(self.target.path), *first, *self.target.args, *last]
            self._workers.append(self._spawn(f"w{index}", cmd, env, watch=False))

    def _supervise(self) -> int:
        live = {w.name for w in self._workers}
        while live:
            kind, name, rc = self._events.get()
            if kind != "exit":
                continue
            if name == "master":
                self.say(f"the master exited with code {_status(rc)}: stopping the workers")
                raise LaunchError(f"the master exited with code {_status(rc)} during the run")
            self.codes[name] = _status(rc)
            live.discard(name)
        failed = [c for c in self.codes.values() if c]
        return failed[0] if failed else 0

    # ---- stopping ------------------------------------------------------------------------------

    def _signal_group(self, child: _Child, sig: int) -> None:
        try:
            os.killpg(child.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop(self, children: list[_Child], sig: int) -> None:
        """``sig`` to each child's group; SIGKILL for what is left after ``stop_timeout_s``."""
        for c in children:
            if c.popen.poll() is None:
                self._signal_group(c, sig)
        deadline = Deadline.after(self.cfg.stop_timeout_s)
        for c in children:
            try:
                c.popen.wait(timeout=max(deadline.remaining(), 0.01))
            except subprocess.TimeoutExpired:
                self.say(f"{c.name} did not stop within {self.cfg.stop_timeout_s} s: killed")
            self._signal_group(c, signal.SIGKILL)  # and anything it left in its group
            rc = _status(c.popen.wait())
            if c is not self._master:
                self.codes.setdefault(c.name, rc)
            for t in c.threads:
                t.join(timeout=self.cfg.stop_timeout_s)

    def _stop_all(self, stop_signal: int | None) -> None:
        # a second Ctrl-C here ends launch at once (Service); the children then die with it
        self._stop(self._workers, stop_signal or signal.SIGTERM)
        if self._master is not None:
            self._stop([self._master], signal.SIGTERM)

    def _summary(self) -> str:
        codes = ", ".join(f"{k} {v}" for k, v in self.codes.items())
        return f"{len(self._workers)} workers; exit codes: {codes or 'none yet'}"
