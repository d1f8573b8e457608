"""What a machine really is: its facts, and a short benchmark, as one JSON line.

``FACTS`` is a Python snippet run with the host's own ``python3`` before anything is installed
(standard library only): the Python version, CPU count, memory, free disk, architecture and the
GPUs ``nvidia-smi`` lists. ``python -m cotrain.market.probe --coordinator URL`` runs after the
install: the same facts, plus the matrix-multiply throughput of the machine's best device
(GFLOP/s in float32 on a CPU, bfloat16 on a GPU), the round-trip time to the task's
coordinator and to the task's other machines (``--peers``). The SSH provider also measures
the link between the launcher and the host both ways (a blob copied over SFTP). The launch
records it all, and a machine that does not match its offer (fewer GPUs than promised, slower
than the floor the user set) is terminated and replaced.
"""

from __future__ import annotations

import argparse
import json
import time

FACTS = r"""
import json, os, platform, shutil, subprocess, sys
gpus = []
smi = shutil.which("nvidia-smi")
if smi:
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20).stdout
        for line in out.splitlines():
            name, _, mib = line.rpartition(",")
            if name.strip() and mib.strip().isdigit():
                gpus.append([name.strip(), round(int(mib) / 1024, 1)])
    except Exception:
        pass
mem = 0.0
try:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
except OSError:
    pass
home = os.path.expanduser("~")
print(json.dumps({"python": list(sys.version_info[:2]), "machine": platform.machine(),
                  "vcpus": os.cpu_count() or 1, "ram_gb": mem,
                  "disk_free_gb": round(shutil.disk_usage(home).free / 2**30, 1),
                  "gpus": gpus}))
"""


def facts() -> dict[str, object]:
    scope: dict[str, object] = {}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(FACTS, scope)  # the same snippet the hosts run
    return dict(json.loads(buf.getvalue()))


def matmul_gflops(seconds: float = 1.0, n: int = 1024) -> tuple[float, str]:
    """Sustained matrix-multiply GFLOP/s of the best device here, and which device."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    n = 8192 if dev == "cuda" else n
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    (a @ b).sum().item()  # warm up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c = a @ b
        done += 1
    c.sum().item()
    return 2.0 * n**3 * done / (time.perf_counter() - t0) / 1e9, dev


def rtt_ms(url: str, tries: int = 3, timeout_s: float = 5.0) -> float | None:
    """The best of ``tries`` round trips to the coordinator's status page, in ms."""
    import urllib.request

    best = None
    for _ in range(tries):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/v1/status", timeout=timeout_s) as r:
                r.read()
        except OSError:
            return None
        ms = (time.perf_counter() - t0) * 1000
        best = ms if best is None else min(best, ms)
    return best


def peer_rtt_ms(
    peers: list[str], tries: int = 3, timeout_s: float = 3.0
) -> dict[str, float | None]:
    """The best TCP connect time to each ``host:port`` (the task's other machines), in ms;
    None for one that cannot be reached."""
    import socket

    out: dict[str, float | None] = {}
    for peer in peers:
        host, _, port = peer.rpartition(":")
        best = None
        for _ in range(tries):
            t0 = time.perf_counter()
            try:
                with socket.create_connection((host, int(port)), timeout=timeout_s):
                    pass
            except (OSError, ValueError):
                break
            ms = (time.perf_counter() - t0) * 1000
            best = ms if best is None else min(best, ms)
        out[peer] = None if best is None else round(best, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cotrain.market.probe")
    ap.add_argument("--coordinator", default="")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--peers", default="", help="host:port,... of the task's other machines")
    args = ap.parse_args(argv)
    out = facts()
    gflops, dev = matmul_gflops(args.seconds)
    out.update(gflops=round(gflops, 1), device=dev)
    if args.coordinator:
        ms = rtt_ms(args.coordinator)
        out["rtt_ms"] = None if ms is None else round(ms, 2)
    if args.peers:
        out["peer_rtt_ms"] = peer_rtt_ms([p for p in args.peers.split(",") if p])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
