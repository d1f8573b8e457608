"""``cotrain rl run``: every role of an RL run as real processes on this machine.

Keys are made under ``run.out_dir/keys`` (orchestrator, trainer, validators, workers), ports are
picked once so that a restarted orchestrator or trainer comes back at the same address, and
every process gets the whole resolved config plus what is its own (its key, its cheat). The
tests and ``bench/rl.py`` drive runs through ``LocalRun`` too, killing and adding processes
mid-run. The resident memory of all processes together is sampled and its peak reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotrain.core.config import to_overrides
from cotrain.core.errors import TimeoutExpired
from cotrain.core.identity import Identity
from cotrain.core.pids import descendants
from cotrain.launch.procs import COTRAIN, Proc, popen
from cotrain.rl.config import RLConfig
from cotrain.rl.errors import RLError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def memory_bytes(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process. PSS shares each page among the processes that map it (the
    weights every worker maps from one file count once in total); RSS counts them in each."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        return 0, 0
    return pss, rss


@dataclass
class MemorySampler:
    """Peak of the memory of a set of processes together, sampled every ``every_s``:
    ``peak_bytes`` (sum of PSS: the machine's memory they use) and ``peak_rss_bytes``. The
    processes are ``pids``, or with ``root`` that process and all its descendants."""

    every_s: float = 0.5
    root: int | None = None
    peak_bytes: int = 0
    peak_rss_bytes: int = 0
    peak_processes: int = 0
    pids: set[int] = field(default_factory=set)
    at_peak: dict[int, int] = field(default_factory=dict)
    """Each process's PSS when the sum peaked."""
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._loop, daemon=True, name="memory").start()

    def sample(self) -> int:
        """Sample once now; the processes' summed PSS."""
        pids = descendants(self.root) if self.root is not None else list(self.pids)
        both = [memory_bytes(p) for p in pids]
        total = sum(p for p, _ in both)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, len(pids)
            self.at_peak = {pid: pss for pid, (pss, _) in zip(pids, both, strict=True)}
        self.peak_rss_bytes = max(self.peak_rss_bytes, sum(r for _, r in both))
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(OSError, ValueError):  # a process gone mid-read
                self.sample()

    def stop(self) -> None:
        self._stop.set()


class LocalRun:
    """The processes of one RL run on this machine."""

    def __init__(self, cfg: RLConfig, *, threads: int | None = None) -> None:
        self.cfg = cfg.model_copy(deep=True)
        c = self.cfg
        c.run.out_dir = c.run.out_dir.absolute()
        keys = c.run.out_dir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        self.trainer_key = Identity.load_or_create(keys / "trainer.pem").public_hex
        self.validator_keys = [
            Identity.load_or_create(keys / f"validator{i}.pem").public_hex
            for i in range(c.launch.validators)
        ]
        c.orchestrator.key = keys / "orchestrator.pem"
        c.trainer.key = keys / "trainer.pem"
        c.orchestrator.trainer_key = self.trainer_key
        c.orchestrator.validator_keys = list(
            dict.fromkeys([*c.orchestrator.validator_keys, *self.validator_keys])
        )
        if c.orchestrator.port == 0 or c.orchestrator.port == 8480:
            c.orchestrator.port = free_port(c.orchestrator.host)
        if c.trainer.port == 0 or c.trainer.port == 8490:
            c.trainer.port = free_port(c.trainer.host)
        c.orchestrator.url = f"http://{c.orchestrator.host}:{c.orchestrator.port}"
        self.threads = threads
        self.procs: dict[str, Proc] = {}
        self.memory = MemorySampler()
        self.memory.start()
        self._workers = 0

    def _start(self, name: str, role: str, extra: dict[str, Any]) -> Proc:
        cfg = self.cfg.model_copy(deep=True)
        for dotted, value in extra.items():
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, value)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        threads = cfg.model.threads or self.threads or 1
        env["OMP_NUM_THREADS"] = str(threads)
        env["COTRAIN_SKIP_MEMORY_CHECK"] = env.get("COTRAIN_SKIP_MEMORY_CHECK", "0")
        cmd = [*COTRAIN, "rl", role, *to_overrides(cfg)]
        nice = cfg.launch.trainer_nice if role == "trainer" else 0
        proc = Proc(popen(cmd, env=env, nice=nice), name)
        proc.start_reader()
        self.procs[name] = proc
        self.memory.pids.add(proc.popen.pid)
        return proc

    def start_orchestrator(self, timeout_s: float = 120.0) -> Proc:
        p = self._start("orchestrator", "orchestrator", {})
        p.wait_for("ready", timeout_s)
        return p

    def start_trainer(
        self, timeout_s: float = 300.0, *, wait: bool = True, extra: dict[str, Any] | None = None
    ) -> Proc:
        """The trainer; ``extra``: its own settings, e.g. ``{"model.threads": 2}``."""
        p = self._start("trainer", "trainer", dict(extra or {}))
        if wait:
            p.wait_for("ready", timeout_s)
        return p

    def start_validator(self, i: int = 0, timeout_s: float = 300.0, *, wait: bool = True) -> Proc:
        keys = self.cfg.run.out_dir / "keys"
        p = self._start(f"validator{i}", "validator", {"validator.key": keys / f"validator{i}.pem"})
        if wait:
            p.wait_for("ready", timeout_s)
        return p

    def start_worker(
        self,
        cheat: str = "none",
        *,
        wait: bool = True,
        timeout_s: float = 300.0,
        extra: dict[str, Any] | None = None,
    ) -> Proc:
        """A worker (honest, or ``cheat``); ``extra``: its own settings, e.g.
        ``{"model.threads": 2, "worker.batch_size": 3}``."""
        i = self._workers
        self._workers += 1
        name = f"worker{i}" if cheat == "none" else f"worker{i}-{cheat}"
        keys = self.cfg.run.out_dir / "keys"
        own = {"worker.key": keys / f"{name}.pem", "worker.cheat": cheat, **(extra or {})}
        p = self._start(name, "worker", own)
        if wait:
            p.wait_for("ready", timeout_s)
        return p

    def start_all(self) -> None:
        """Orchestrator, trainer, validators, honest workers and cheaters."""
        c = self.cfg.launch
        self.start_orchestrator()
        # the rest start together (each imports torch and loads the model: seconds), and wait
        # for the orchestrator or the first version on their own
        trainer = self._start("trainer", "trainer", {})
        keys = self.cfg.run.out_dir / "keys"
        validators = [
            self._start(f"validator{i}", "validator", {"validator.key": keys / f"validator{i}.pem"})
            for i in range(c.validators)
        ]
        for _ in range(c.workers):
            self.start_worker(wait=False)
        for cheat in c.cheaters:
            self.start_worker(cheat, wait=False)
        for p in [trainer, *validators]:
            p.wait_for("ready", 300)

    def kill(self, name: str) -> None:
        """SIGKILL, no clean-up: the worst moment for the others."""
        p = self.procs[name]
        p.popen.kill()
        p.popen.wait(10)
        self.memory.pids.discard(p.popen.pid)

    def wait_trainer(self, timeout_s: float, *, on_event: Any = None) -> int:
        """Follow the trainer's events until it exits; its exit code."""
        trainer = self.procs["trainer"]
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutExpired(f"the run did not finish within {timeout_s:g} s")
            try:
                ev = trainer.next_event(min(left, 5.0))
            except TimeoutExpired:
                if trainer.popen.poll() is not None:
                    return int(trainer.popen.returncode)
                self._check_alive()
                continue
            if on_event is not None:
                on_event(ev)

    def _check_alive(self) -> None:
        o = self.procs.get("orchestrator")
        if o is not None and o.popen.poll() is not None:
            tail = " | ".join(o.lines[-3:])
            raise RLError(f"the orchestrator exited (code {o.popen.returncode}): {tail}")

    def status(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.cfg.orchestrator.url + "/v1/status", timeout=10) as r:
            return dict(json.loads(r.read()))

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and keep each one's output in
        ``run.out_dir/logs/NAME.log``."""
        for p in reversed(list(self.procs.values())):
            p.stop()
        self.memory.stop()
        logs = self.cfg.run.out_dir / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
            for name, p in self.procs.items():
                (logs / f"{name}.log").write_text("\n".join(p.lines) + "\n")
        except OSError:
            pass  # a full disk must not hide the run's own error


def run_local(cfg: RLConfig) -> int:
    """``cotrain rl run``: start everything, print progress, summarise, stop everything."""
    started = time.monotonic()
    run = LocalRun(cfg)
    out = run.cfg.run.out_dir
    print(f"[rl] run {cfg.run.id!r} in {out}: orchestrator {run.cfg.orchestrator.url}", flush=True)
    steps: list[dict[str, Any]] = []

    def progress(ev: dict[str, Any]) -> None:
        if ev.get("event") == "step":
            steps.append(ev)
            acc = ev.get("heldout_accuracy")
            acc_s = f"  heldout {acc:.2f}" if isinstance(acc, int | float) else ""
            print(
                f"[rl] step {ev['step']}/{cfg.run.total_steps}  reward "
                f"{ev.get('mean_reward', 0):.2f}{acc_s}  level {ev.get('level', 0)}  "
                f"waited {ev.get('wait_s', 0):.1f} s",
                flush=True,
            )
        elif ev.get("event") == "eval" and ev.get("step") == 0:
            print(f"[rl] base model: heldout {ev.get('heldout_accuracy', 0):.2f}", flush=True)

    try:
        run.start_all()
        print(
            f"[rl] {cfg.launch.workers} workers, {len(cfg.launch.cheaters)} cheaters, "
            f"{cfg.launch.validators} validator(s) started",
            flush=True,
        )
        code = run.wait_trainer(cfg.launch.timeout_s, on_event=progress)
        status = run.status()
    except KeyboardInterrupt:
        print("[rl] interrupted: stopping every process", file=sys.stderr, flush=True)
        run.stop()
        return 130
    finally:
        run.stop()
    summary = {
        "exit_code": code,
        "wall_s": round(time.monotonic() - started, 1),
        "peak_memory_bytes": run.memory.peak_bytes,
        "peak_rss_sum_bytes": run.memory.peak_rss_bytes,
        "peak_memory_by_process": {
            name: run.memory.at_peak.get(p.popen.pid, 0) for name, p in run.procs.items()
        },
        "steps": steps,
        "orchestrator": status,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[rl] done in {summary['wall_s']} s: {status['accepted']} rollouts accepted, "
        f"rejected by check {status['rejected_by_check']}, peak memory (PSS) "
        f"{run.memory.peak_bytes / 2**30:.2f} GB (all processes); {out / 'summary.json'}",
        flush=True,
    )
    return code
