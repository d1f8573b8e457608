"""All-reduce benchmark: cotrain vs torch.distributed (gloo) vs a raw TCP ceiling, same run.

    python bench/allreduce.py --quick                 # loopback, a minute
    python bench/allreduce.py --json out.json         # worlds 2/4/8, 4 and 64 MiB, none/fp16/int8
    python bench/allreduce.py --wan --json wan.json   # also in network namespaces (root):
                                                      # 100 Mbit/s links, 20 ms added latency

Bus bandwidth follows nccl-tests: busbw = size x 2(N-1)/N / time. The ring bound on a link of
rate R is 2(N-1)/N x size / R; ``bound_ratio`` = time / bound (1.0 is the best a ring can do).
Every cotrain time is the slowest peer's, median over the timed rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from cotrain.comm.config import CommConfig  # noqa: E402
from cotrain.comm.launch import start_master, start_peer  # noqa: E402
from cotrain.comm.program import PeerProgramConfig  # noqa: E402

SECRET = "bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- cotrain -------------------------------------------------------------------------------------


def run_cotrain(
    world: int, numel: int, quant: str, rounds: int, *, streams: int = 4, wan: Any = None
) -> list[float]:
    """Per-round collective time (slowest peer) for ``rounds`` rounds after one warm-up."""
    wrappers: list[list[str]] = [[] for _ in range(world + 1)]
    master_host = "127.0.0.1"
    if wan is not None:
        net, delay_ms = wan
        from cotrain.netem.netns import in_ns

        wrappers = [in_ns(h.name, []) for h in net.hosts]
        master_host = net.hosts[world].ip
    master, port = start_master(SECRET, host=master_host, wrapper=wrappers[world])
    proxies = []
    procs = []
    try:
        if wan is not None:
            mproxy = net.hosts[world].start_delay_proxy(
                listen_port=0, target=(master_host, port), delay_ms=delay_ms
            )
            proxies.append(mproxy)
        for i in range(world):
            comm = CommConfig(
                master_port=port,
                streams=streams,
                master_host=master_host,
                chunk_kb=int(os.environ.get("CK", "512")),
            )
            if wan is not None:
                h = net.hosts[i]
                data_port = 47000 + i
                proxy = h.start_delay_proxy(
                    listen_port=0, target=("127.0.0.1", data_port), delay_ms=delay_ms
                )
                proxies.append(proxy)
                comm = CommConfig(
                    master_host=net.hosts[world].ip,
                    master_port=mproxy.port,
                    streams=streams,
                    listen_host="0.0.0.0",
                    listen_port=data_port,
                    advertise_host=h.ip,
                    advertise_port=proxy.port,
                    heartbeat_interval_s=0.5,
                )
            cfg = PeerProgramConfig(
                comm=comm,
                index=i,
                numel=numel,
                rounds=rounds + 1,
                world=world,
                op="sum",
                quantization=quant,  # type: ignore[arg-type]
                barrier=True,
                digest=False,
            )
            procs.append(start_peer(cfg, SECRET, wrapper=wrappers[i]))
        per_round: dict[int, float] = {}
        for p in procs:
            while True:
                ev = p.next_event(600)
                if ev["event"] == "round":
                    per_round[ev["round"]] = max(per_round.get(ev["round"], 0.0), ev["seconds"])
                if ev["event"] == "done":
                    break
                if ev["event"] == "failed":
                    raise RuntimeError(f"cotrain peer failed: {ev}")
        return [per_round[r] for r in sorted(per_round) if r > 0]
    finally:
        for p in procs:
            p.stop()
        master.stop()
        for pr in proxies:
            pr.stop()


# ---- gloo ------------------------------------------------------------------------------------------


def gloo_worker(rank: int, world: int, port: int, numel: int, rounds: int, host: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world)
    x = torch.randn(numel)
    times = []
    for _ in range(rounds + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"rank": rank, "times": times[1:]}), flush=True)
    dist.destroy_process_group()


def run_gloo(world: int, numel: int, rounds: int) -> list[float]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--gloo-worker",
                str(r),
                str(world),
                str(port),
                str(numel),
                str(rounds),
                "127.0.0.1",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(json.loads(out.strip().splitlines()[-1])["times"])
    return [max(ts) for ts in zip(*results, strict=True)]


# ---- raw TCP ceiling -------------------------------------------------------------------------------


def run_tcp(nbytes: int, rounds: int) -> list[float]:
    """One sender, one receiver, plain sockets: the fastest a single loopback stream moves bytes."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    payload = memoryview(bytearray(nbytes))
    times: list[float] = []

    def receive() -> None:
        conn, _ = srv.accept()
        buf = bytearray(4 << 20)
        for _ in range(rounds + 1):
            left = nbytes
            while left:
                left -= conn.recv_into(buf, min(left, len(buf)))
            conn.sendall(b"k")
        conn.close()

    t = threading.Thread(target=receive)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        c.sendall(payload)
        c.recv(1)
        times.append(time.perf_counter() - t0)
    t.join()
    c.close()
    srv.close()
    return times[1:]


# ---- driver ----------------------------------------------------------------------------------------


def row(
    impl: str,
    setup: str,
    world: int,
    size_mib: float,
    quant: str,
    times: list[float],
    link_mbit: float | None = None,
) -> dict[str, Any]:
    med = statistics.median(times)
    nbytes = size_mib * 2**20
    factor = 2 * (world - 1) / world if impl != "tcp" else 1.0
    r: dict[str, Any] = {
        "impl": impl,
        "setup": setup,
        "world": world,
        "size_mib": size_mib,
        "quant": quant,
        "median_s": med,
        "busbw_gbps": nbytes * factor / med / 1e9,
        "rounds": len(times),
    }
    if link_mbit is not None:
        bound = factor * nbytes * 8 / (link_mbit * 1e6)
        r["ring_bound_s"] = bound
        r["bound_ratio"] = med / bound
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="world 4, 4 and 64 MiB, fewer rounds")
    ap.add_argument("--wan", action="store_true", help="also run in network namespaces (root)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--worlds", type=str, default="")
    ap.add_argument("--sizes", type=str, default="")
    ap.add_argument("--quants", type=str, default="")
    ap.add_argument("--link-mbit", type=float, default=100.0)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--gloo-worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gloo_worker:
        r, w, port, n, rounds, host = args.gloo_worker
        gloo_worker(int(r), int(w), int(port), int(n), int(rounds), host)
        return
    worlds = (
        [int(x) for x in args.worlds.split(",")]
        if args.worlds
        else ([4] if args.quick else [2, 4, 8])
    )
    sizes = [float(x) for x in args.sizes.split(",")] if args.sizes else [4.0, 64.0]
    quants = args.quants.split(",") if args.quants else ["none", "fp16", "int8"]
    rounds = args.rounds or (3 if args.quick else 5)
    console = Console()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        numel = int(size * 2**20 / 4)
        rows.append(row("tcp", "loopback", 2, size, "none", run_tcp(int(size * 2**20), rounds)))
        for world in worlds:
            rows.append(
                row("gloo", "loopback", world, size, "none", run_gloo(world, numel, rounds))
            )
            for q in quants:
                rows.append(
                    row(
                        "cotrain",
                        "loopback",
                        world,
                        size,
                        q,
                        run_cotrain(
                            world, numel, q, rounds, streams=int(os.environ.get("ST", "4"))
                        ),
                    )
                )
            console.print(f"done: {size} MiB, world {world}")
    if args.wan:
        rows += run_wan(args, sizes, quants, rounds, console)
    gloo = {(r["world"], r["size_mib"]): r["median_s"] for r in rows if r["impl"] == "gloo"}
    for r in rows:
        if r["impl"] == "cotrain" and (r["world"], r["size_mib"]) in gloo:
            r["vs_gloo_busbw"] = gloo[(r["world"], r["size_mib"])] / r["median_s"]
    table = Table(title="all-reduce (median of timed rounds; slowest peer)")
    for col in (
        "impl",
        "setup",
        "world",
        "MiB",
        "quant",
        "median s",
        "busbw GB/s",
        "vs gloo",
        "x ring bound",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["impl"],
            r["setup"],
            str(r["world"]),
            f"{r['size_mib']:g}",
            r["quant"],
            f"{r['median_s']:.4f}",
            f"{r['busbw_gbps']:.3f}",
            f"{r['vs_gloo_busbw']:.2f}" if "vs_gloo_busbw" in r else "",
            f"{r['bound_ratio']:.2f}" if "bound_ratio" in r else "",
        )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count()}, indent=2))
        console.print(f"wrote {args.json}")


def run_wan(
    args: argparse.Namespace, sizes: list[float], quants: list[str], rounds: int, console: Console
) -> list[dict[str, Any]]:
    from cotrain.netem import WanNetwork, netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason is not None:
        console.print(f"[yellow]skipping --wan: {reason}")
        return []
    rows = []
    world = 4
    with WanNetwork(n_hosts=world + 1, rate_mbit=args.link_mbit) as net:
        for size in sizes:
            numel = int(size * 2**20 / 4)
            for q in quants:
                times = run_cotrain(world, numel, q, max(2, rounds // 2), wan=(net, args.delay_ms))
                rows.append(
                    row("cotrain", "netns", world, size, q, times, link_mbit=args.link_mbit)
                )
                console.print(f"done: wan {size} MiB {q}: {statistics.median(times):.2f}s")
    return rows


if __name__ == "__main__":
    main()
