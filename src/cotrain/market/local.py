"""The ``local`` provider: this machine, running ``cotrain node`` processes.

Its one offer is the machine itself (its GPUs as ``nvidia-smi`` lists them, else its CPU) at no
cost. A launch starts ``python -m cotrain node`` in its own session, with its own key and work
directory under ``state_dir``; the instances are kept in ``state_dir/instances.json`` so that
``status`` and ``terminate`` work from another process (the CLI), and a recorded process is
recognised by its pid *and* its start time (a reused pid is not ours).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cotrain.core.files import write_atomic
from cotrain.core.pids import start_ticks
from cotrain.market.offers import Offer, OfferQuery, canonical_gpu, matches
from cotrain.market.provider import Cap, Instance, LaunchSpec, ProviderError


def _gpus() -> list[tuple[str, float]]:
    """(name, memory GB) of each GPU ``nvidia-smi`` lists; none without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            gpus.append((name.strip(), int(mib) / 1024))
    return gpus


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


class LocalProvider:
    name = "local"
    caps = frozenset({Cap.STOP})

    def __init__(self, state_dir: str | Path, *, python: str = sys.executable) -> None:
        self.dir = Path(state_dir).expanduser()
        self.python = python

    async def offers(self, q: OfferQuery) -> list[Offer]:
        gpus = await asyncio.to_thread(_gpus)
        if gpus:
            name, mem = gpus[0]
            gpu, count = canonical_gpu(name, mem), len(gpus)
        else:
            gpu, count, mem = "cpu", 0, 0.0
        offer = Offer(
            provider=self.name,
            offer_id=f"local:{socket.gethostname()}",
            gpu=gpu,
            gpu_count=count,
            gpu_mem_gb=round(mem, 1),
            vcpus=os.cpu_count(),
            ram_gb=_ram_gb(),
            region="local",
            tier="secure",
            billing="owned",
            usd_per_hour=0.0,
            usd_per_gpu_hour=0.0,
            stock="available",
            reliability=1.0,
            provision_eta_s=5.0,
            fetched_at=time.time(),
        )
        return [offer] if matches(offer, q) else []

    # ---- instances --------------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(json.loads((self.dir / "instances.json").read_text()))
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise ProviderError(f"{self.dir / 'instances.json'} is not JSON: {e}") from None

    def _save(self, recs: dict[str, dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / "instances.json", json.dumps(recs, indent=1).encode())

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        if offer.provider != self.name:
            raise ProviderError(f"offer {offer.offer_id} is {offer.provider}'s, not local")
        recs = self._load()
        n = 1 + max((int(k.rsplit("-", 1)[1]) for k in recs), default=0)
        iid = f"local-{n}"
        work = self.dir / iid
        work.mkdir(parents=True, exist_ok=True)
        cmd = [
            *(self.python, "-m", "cotrain", "node", "--coordinator", spec.coordinator),
            *("--task", spec.task, "--key", str(work / "node.pem"), "--work_dir", str(work)),
            *("--name", spec.name or iid),
            *(("--invite", spec.invite) if spec.invite else ()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
        with (work / "node.out").open("ab") as out, (work / "node.err").open("ab") as err:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=env, start_new_session=True, cwd=work
            )
        recs[iid] = {
            "pid": proc.pid,
            "start": start_ticks(proc.pid),
            "offer": offer.offer_id,
            "task": spec.task,
            "started_at": time.time(),
            "state": "running",
        }
        self._save(recs)
        return self._instance(iid, recs[iid])

    def _alive(self, rec: dict[str, Any]) -> bool:
        _reap(rec["pid"])
        return rec.get("start") is not None and start_ticks(rec["pid"]) == rec["start"]

    def _instance(self, iid: str, rec: dict[str, Any]) -> Instance:
        state = rec["state"]
        if state == "running" and not self._alive(rec):
            state = "exited"
        return Instance(
            provider=self.name,
            instance_id=iid,
            offer_id=rec["offer"],
            state=state,
            started_at=rec["started_at"],
            host="localhost",
            task=rec.get("task"),
            detail=f"pid {rec['pid']}",
        )

    async def status(self, instance_id: str) -> Instance:
        rec = self._load().get(instance_id)
        if rec is None:
            raise ProviderError(f"no local instance {instance_id}")
        return self._instance(instance_id, rec)

    async def instances(self) -> list[Instance]:
        return [self._instance(k, v) for k, v in sorted(self._load().items())]

    async def terminate(self, instance_id: str, *, grace_s: float = 20.0) -> None:
        """SIGTERM its process group (the node leaves its task), SIGKILL after ``grace_s``."""
        recs = self._load()
        rec = recs.get(instance_id)
        if rec is None:
            raise ProviderError(f"no local instance {instance_id}")
        if self._alive(rec):
            pid = rec["pid"]
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace_s
            while self._alive(rec) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                _reap(pid)
            if self._alive(rec):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        rec["state"] = "terminated"
        self._save(recs)


def _reap(pid: int) -> None:
    """Collect our own child's exit (a zombie still shows in /proc), if it is ours."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
