"""A coordinator process and a DiLoCo task for the market's launch tests.

``Coordinator.start(tmp, host=None)`` runs ``cotrain coordinator`` (in a netem host's namespace
when ``host`` is given) and reads its ready line; ``publish(...)`` publishes and opens a tiny
DiLoCo task with ``cotrain task publish``, as an initiator would. ``cli(...)`` runs any
``cotrain`` command (in the host when given) and returns the completed process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diloco_harness import tiny_train_config, write_fake_shakespeare

from cotrain.core.identity import Identity

WAIT_S = 120.0


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def cli(
    *args: str, host: Any = None, timeout_s: float = 300, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cotrain", *args]
    e = {**env(), **(extra_env or {})}
    if host is not None:
        return host.run(argv, timeout_s=timeout_s, env=e)  # type: ignore[no-any-return]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=e)


def popen(name: str, tmp: Path, args: list[str], host: Any = None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cotrain", *args]
    with (tmp / f"{name}.out").open("wb") as out, (tmp / f"{name}.err").open("wb") as err:
        if host is not None:
            return host.popen(argv, stdout=out, stderr=err, env=env())  # type: ignore[no-any-return]
        return subprocess.Popen(argv, stdout=out, stderr=err, env=env())


def ready_line(name: str, tmp: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for line in (tmp / f"{name}.out").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("event") == "ready":
                    return obj
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    err = (tmp / f"{name}.err").read_text(errors="replace")[-2000:]
    raise AssertionError(f"{name}: no ready line\n{err}")


@dataclass
class Coordinator:
    url: str
    key: str
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, tmp: Path, host: Any = None) -> Coordinator:
        args = ["coordinator", "--port", "0", "--key", str(tmp / "coord.pem")]
        args += ["--db", f"sqlite:///{tmp / 'coord.db'}"]
        if host is not None:
            args += ["--host", host.ip]
        p = popen("coordinator", tmp, args, host)
        ready = ready_line("coordinator", tmp, p)
        return cls(ready["url"], ready["key"], p)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def publish(
    tmp: Path,
    url: str,
    *,
    master: str,
    master_key: str,
    validators: list[str] | None = None,
    admission: str = "open",
    host: Any = None,
    **train_over: Any,
) -> str:
    """A tiny DiLoCo task published and opened by ``tmp/init.pem``; its id."""
    cache = tmp / "cache"
    write_fake_shakespeare(cache)
    train = tiny_train_config(cache, tmp / "unused", **train_over)
    del train["out_dir"]
    body = {
        "name": "market test",
        "kind": "diloco",
        "spec": {"master": master, "master_key": master_key, "store": str(tmp / "store"),
                 "train": train},
        "budget": 100_000,
        "rate_per_unit": 10,
        "validator_fee": 1,
        "lock_s": 3600,
        "admission": admission,
        "validators": validators or [],
        "quorum": len(validators or []) or None,
        "weights": {"tokens": 1},
        "max_units": 1_000_000,
    }  # fmt: skip
    (tmp / "task.json").write_text(json.dumps(body))
    if not (tmp / "init.pem").exists():
        Identity.generate().save(tmp / "init.pem")
    cp = cli(
        *("task", "publish", str(tmp / "task.json"), "--coordinator", url),
        *("--key", str(tmp / "init.pem")),
        host=host,
    )
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return cp.stdout.strip()


def start_master(
    tmp: Path, coordinator: Coordinator, task: str, port: int, host: Any = None
) -> subprocess.Popen[bytes]:
    """The task's run master (``cotrain master --coordinator``) on ``port``, key ``master.pem``."""
    args = ["master", "--port", str(port), "--run_id", task]
    args += ["--key_file", str(tmp / "master.pem"), "--events_file", str(tmp / "events.jsonl")]
    args += ["--token_issuers", json.dumps([coordinator.key]), "--coordinator", coordinator.url]
    args += ["--coordinator_poll_s", "0.3", "--heartbeat_timeout_s", "5", "--secret", ""]
    if host is not None:
        args += ["--host", host.ip]
    p = popen("master", tmp, args, host)
    ready_line("master", tmp, p)
    return p


def master_key(tmp: Path) -> str:
    ident = Identity.generate()
    ident.save(tmp / "master.pem")
    return ident.public_hex


class Replays:
    """Every cloud's replay server (``market_replays``) on loopback in a background thread, with
    ``latency_s`` added to each answer (an API across the internet); ``env`` points the CLI at
    them: the API keys, and ``COTRAIN_<NAME>_URL``."""

    def __init__(self, latency_s: float = 0.0) -> None:
        import asyncio
        import threading

        from aiohttp import web
        from market_replays import MODULES, load

        self.latency_s = latency_s
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.replays: dict[str, Any] = {}
        self.env: dict[str, str] = {}

        @web.middleware
        async def slow(request: web.Request, handler: Any) -> Any:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return await handler(request)

        for name in MODULES:
            mod = load(name)
            replay = mod.Replay()
            app = replay.app()
            app.middlewares.append(slow)
            runner = web.AppRunner(app)
            self.loop.run_until_complete(runner.setup())
            self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
            self.runners.append(runner)
            self.replays[mod.NAME] = replay
            up = mod.NAME.upper()
            self.env[f"COTRAIN_{up}_API_KEY"] = mod.KEY
            self.env[f"COTRAIN_{up}_URL"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        for r in self.runners:
            self.loop.run_until_complete(r.cleanup())
        self.loop.close()

    def __enter__(self) -> Replays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
