"""All-reduce benchmark: cotrain vs torch.distributed (gloo) vs a raw TCP ceiling, same run.

    python bench/allreduce.py --quick                 # loopback, a minute
    python bench/allreduce.py --json out.json         # worlds 2/4/8, 4 and 64 MiB, none/fp16/int8
    python bench/allreduce.py --wan --json wan.json   # also in network namespaces (root):
                                                      # 100 Mbit/s links, 20 ms added latency
    python bench/allreduce.py --wan-only --sizes 64 --quants none,int8   # namespaces only

Bus bandwidth follows nccl-tests: busbw = size x 2(N-1)/N / time. The ring bound on a link of
rate R is 2(N-1)/N x size / R; ``bound_ratio`` = time / bound (1.0 is the best a ring can do).
Every time is the slowest peer's, median over the timed rounds. On loopback every case runs
``--reps`` times, interleaved with gloo, and ``vs_gloo_busbw`` is the median of the per-repetition
ratios: this shared 2-core machine drifts, and a drift then hits both alike. Loopback uses one
TCP connection per neighbour (``--streams 1``, as gloo does); the WAN runs use ``--wan-streams``.
``cpu_s_per_collective`` is the CPU time all peers spent inside one collective (median).
Both sides run the same round: write a seeded input into the same buffer, barrier, timed
all-reduce (a fresh 64 MiB buffer per round would cost the side that gets it ~10%). ``--buffer``
picks who allocates that buffer, for both: torch (the default, as for model tensors) or numpy,
which asks the kernel for transparent huge pages; copies into those are cheaper, and gloo gains
more from them than cotrain (whose scratch buffers are numpy's either way).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
from rich.console import Console
from rich.table import Table

from cotrain.comm.config import CommConfig
from cotrain.demo.peer import PeerProgramConfig, base_input
from cotrain.launch.procs import Proc, start_master, start_peer
from cotrain.netem import DelayProxy, Host, WanNetwork, netns_unavailable_reason
from cotrain.netem.netns import in_ns

SECRET = "bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- cotrain -------------------------------------------------------------------------------------


def _peer_config(
    comm: CommConfig,
    index: int,
    world: int,
    numel: int,
    quant: str,
    rounds: int,
    rollback: bool = True,
    buffer: str = "numpy",
) -> PeerProgramConfig:
    """A benchmark peer: one warm-up round, then ``rounds`` timed sums, each after a barrier."""
    return PeerProgramConfig(
        comm=comm,
        index=index,
        numel=numel,
        rounds=rounds + 1,
        world=world,
        op="sum",
        quantization=quant,
        barrier=True,
        digest=False,
        rollback=rollback,
        buffer=buffer,
    )


@dataclass
class Timed:
    """Per timed round: the slowest peer's seconds, and all peers' CPU seconds in the collective."""

    times: list[float]
    cpu: list[float]


def _collect(procs: list[Proc]) -> tuple[list[float], float, list[float]]:
    """Per-round time of the slowest peer (warm-up round 0 dropped), the peers' CPU seconds over
    the whole run, and per round the CPU seconds all peers spent inside the collective."""
    per_round: dict[int, float] = {}
    cpu_round: dict[int, float] = {}
    cpu_s = 0.0
    for p in procs:
        while True:
            ev = p.next_event(600)
            if ev["event"] == "round":
                r = ev["round"]
                per_round[r] = max(per_round.get(r, 0.0), ev["seconds"])
                cpu_round[r] = cpu_round.get(r, 0.0) + ev.get("cpu_s", 0.0)
            if ev["event"] == "done":
                cpu_s += ev["cpu_user_s"] + ev["cpu_sys_s"]
                break
            if ev["event"] == "failed":
                raise RuntimeError(f"cotrain peer failed: {ev}")
    timed = sorted(r for r in per_round if r > 0)
    return [per_round[r] for r in timed], cpu_s, [cpu_round[r] for r in timed]


def run_cotrain(
    world: int,
    numel: int,
    quant: str,
    rounds: int,
    *,
    streams: int = 4,
    chunk_kb: int = 512,
    rollback: bool = True,
    buffer: str = "numpy",
) -> Timed:
    """Per-round collective time (slowest peer) for ``rounds`` rounds after one warm-up."""
    master, port = start_master(SECRET)
    procs = []
    try:
        for i in range(world):
            comm = CommConfig(master_port=port, streams=streams, chunk_kb=chunk_kb)
            cfg = _peer_config(
                comm, i, world, numel, quant, rounds, rollback=rollback, buffer=buffer
            )
            procs.append(start_peer(cfg, SECRET))
        times, _, cpu = _collect(procs)
        return Timed(times, cpu)
    finally:
        for p in procs:
            p.stop()
        master.stop()


# ---- gloo ----------------------------------------------------------------------------------------


def gloo_worker(
    rank: int, world: int, port: int, numel: int, rounds: int, host: str, buffer: str
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world)
    # the same input regime as the cotrain peers (program.run): a seeded base plus the round,
    # written into the same buffer every round, then a barrier, then the timed all-reduce; the
    # buffer comes from the same allocator as theirs (--buffer)
    base = torch.from_numpy(base_input(0, rank, numel))
    if buffer == "numpy":
        x = torch.from_numpy(np.empty(numel, dtype=np.float32))
    else:
        x = torch.empty(numel, dtype=torch.float32)
    times = []
    cpu = []
    for rnd in range(rounds + 1):
        torch.add(base, float(rnd), out=x)
        dist.barrier()
        t0 = time.perf_counter()
        c0 = time.process_time()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"rank": rank, "times": times[1:], "cpu": cpu[1:]}), flush=True)
    dist.destroy_process_group()


def run_gloo(world: int, numel: int, rounds: int, buffer: str = "numpy") -> Timed:
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
                buffer,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return Timed(
        [max(ts) for ts in zip(*(r["times"] for r in results), strict=True)],
        [sum(cs) for cs in zip(*(r["cpu"] for r in results), strict=True)],
    )


# ---- raw TCP ceiling -----------------------------------------------------------------------------


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


# ---- driver --------------------------------------------------------------------------------------


def row(
    impl: str,
    setup: str,
    world: int,
    size_mib: float,
    quant: str,
    times: list[float],
    link_mbit: float | None = None,
    cpu: list[float] | None = None,
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
    if cpu:
        r["cpu_s_per_collective"] = statistics.median(cpu)
    if link_mbit is not None:
        bound = factor * nbytes * 8 / (link_mbit * 1e6)
        r["ring_bound_s"] = bound
        r["bound_ratio"] = med / bound
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="world 4, 64 MiB, none and int8, 3 rounds")
    ap.add_argument("--wan", action="store_true", help="also run in network namespaces (root)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument(
        "--reps",
        type=int,
        default=0,
        help="loopback: repeat each (gloo, cotrain) set this often, interleaved, so that drifts\n"
        "of this shared machine hit both alike (default 3, --quick 2)",
    )
    ap.add_argument(
        "--streams",
        type=int,
        default=1,
        help="CommConfig.streams on loopback: one TCP connection per neighbour, as gloo uses\n"
        "(several only pay off on long, fat links)",
    )
    ap.add_argument("--chunk-kb", type=int, default=1024, help="CommConfig.chunk_kb on loopback")
    ap.add_argument("--worlds", type=str, default="")
    ap.add_argument("--sizes", type=str, default="")
    ap.add_argument("--quants", type=str, default="")
    ap.add_argument("--link-mbit", type=float, default=100.0)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--wan-only", action="store_true", help="--wan without the loopback runs")
    ap.add_argument("--wan-rounds", type=int, default=3, help="timed rounds per WAN case")
    ap.add_argument("--wan-streams", type=int, default=4, help="CommConfig.streams on the WAN")
    ap.add_argument(
        "--wan-chunk-kb",
        type=int,
        default=512,
        help="CommConfig.chunk_kb on the WAN (KiB on the wire, whatever the quantization)",
    )
    ap.add_argument(
        "--wan-nice",
        type=int,
        default=-10,
        help="priority of the WAN master and peers (the delay proxies take -10 themselves): the\n"
        "5 emulated machines share this one, and other work on it should not be measured",
    )
    ap.add_argument(
        "--wan-proxy-coalesce-ms",
        type=float,
        default=None,
        help="the delay proxies' read coalescing (default: theirs, delay/20 capped at 2 ms)",
    )
    ap.add_argument(
        "--wan-segmentation",
        choices=["mtu", "gso"],
        default="mtu",
        help="WanConfig.segmentation: mtu = one packet per MSS, as on a real WAN",
    )
    ap.add_argument(
        "--buffer",
        choices=["torch", "numpy"],
        default="torch",
        help="who allocates every peer's input, gloo's and cotrain's alike: torch (as model\n"
        "tensors are) or numpy (which asks for transparent huge pages: cheaper kernel copies)",
    )
    ap.add_argument("--gloo-worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gloo_worker:
        r, w, port, n, rounds, host, buffer = args.gloo_worker
        gloo_worker(int(r), int(w), int(port), int(n), int(rounds), host, buffer)
        return
    worlds = (
        [int(x) for x in args.worlds.split(",")]
        if args.worlds
        else ([4] if args.quick else [2, 4, 8])
    )
    sizes = (
        [float(x) for x in args.sizes.split(",")]
        if args.sizes
        else ([64.0] if args.quick else [4.0, 64.0])
    )
    quants = (
        args.quants.split(",")
        if args.quants
        else (["none", "int8"] if args.quick else ["none", "fp16", "int8"])
    )
    rounds = args.rounds or (4 if args.quick else 5)
    reps = args.reps or (2 if args.quick else 3)
    console = Console(width=160)
    rows: list[dict[str, Any]] = []
    for size in [] if args.wan_only else sizes:
        numel = int(size * 2**20 / 4)
        rows.append(row("tcp", "loopback", 2, size, "none", run_tcp(int(size * 2**20), rounds)))
        for world in worlds:
            # (impl, quant, rollback); every repetition runs all of them, gloo first
            cases = [("gloo", "none", True)]
            cases += [("cotrain", q, True) for q in quants]
            cases.append(("cotrain_norollback", "none", False))  # callers that can recompute
            runs: dict[tuple[str, str], list[Timed]] = {(c[0], c[1]): [] for c in cases}
            for rep in range(reps):
                for impl, q, rollback in cases:
                    runs[(impl, q)].append(
                        run_gloo(world, numel, rounds, args.buffer)
                        if impl == "gloo"
                        else run_cotrain(
                            world,
                            numel,
                            q,
                            rounds,
                            streams=args.streams,
                            chunk_kb=args.chunk_kb,
                            rollback=rollback,
                            buffer=args.buffer,
                        )
                    )
                console.print(f"{size:g} MiB, world {world}: repetition {rep + 1}/{reps} done")
            gloo_reps = [statistics.median(t.times) for t in runs[("gloo", "none")]]
            for (impl, q), timed in runs.items():
                r = row(
                    impl,
                    "loopback",
                    world,
                    size,
                    q,
                    [x for t in timed for x in t.times],
                    cpu=[x for t in timed for x in t.cpu],
                )
                r["buffer"] = args.buffer
                if impl != "gloo":
                    r["streams"], r["chunk_kb"] = args.streams, args.chunk_kb
                    # busbw ratio per repetition (gloo's and ours from the same repetition)
                    per_rep = [
                        g / statistics.median(t.times)
                        for g, t in zip(gloo_reps, timed, strict=True)
                    ]
                    r["vs_gloo_busbw_reps"] = per_rep
                    r["vs_gloo_busbw"] = statistics.median(per_rep)
                rows.append(r)
    if args.wan or args.wan_only:
        rows += run_wan(args, sizes, quants, console)
    table = Table(title="all-reduce (median of timed rounds; slowest peer)")
    for col in (
        "impl",
        "setup",
        "world",
        "MiB",
        "quant",
        "median s",
        "busbw GB/s",
        "CPU s/coll.",
        "vs gloo",
        "x ring bound",
        "x fp32 time",
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
            f"{r['cpu_s_per_collective']:.3f}" if "cpu_s_per_collective" in r else "",
            f"{r['vs_gloo_busbw']:.2f}" if "vs_gloo_busbw" in r else "",
            f"{r['bound_ratio']:.2f}" if "bound_ratio" in r else "",
            f"{r['vs_fp32_time']:.2f}" if "vs_fp32_time" in r else "",
        )
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count()}, indent=2))
        console.print(f"wrote {args.json}")


# ---- emulated WAN (network namespaces, root) -----------------------------------------------------
#
# Hosts 0..N-1 run one peer each, host N the master; every host has its own namespace and a link
# shaped to --link-mbit each way (tbf). Latency comes from a delay proxy in front of every server
# (each peer's data server and the master): a peer listens on 0.0.0.0:WAN_DATA_PORT of its host
# and advertises (host ip, proxy port), so every ring connection crosses two shaped links and
# one proxy that holds each byte --delay-ms. The round trip of a ring connection is thus
# 2 x delay (the proxy delays data one way and ACK-clocking the other, as a real path would).

WAN_DATA_PORT = 47000  # the same in every host: each host is its own namespace


@dataclass
class WanRun:
    """One cotrain run on the emulated WAN: timed rounds plus where the CPU went."""

    times: list[float]
    peer_cpu_s: float  # user + system of all peers over the whole run (warm-up included)
    proxy_cpu_s: float  # all delay proxies (peers' and master's), same span
    wall_s: float  # the whole run, from starting the master to the last peer's exit


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cotrain_wan(
    net: WanNetwork,
    world: int,
    numel: int,
    quant: str,
    rounds: int,
    *,
    delay_ms: float,
    streams: int,
    chunk_kb: int,
    coalesce_ms: float | None = None,
    nice: int = 0,
) -> WanRun:
    """``world`` peers on hosts 0..world-1 and the master on host ``world``, all behind proxies.

    ``nice`` != 0 runs the master and peers at that priority (the proxies take -10 themselves).
    """

    def inside(host: Host) -> list[str]:
        return (["nice", "-n", str(nice)] if nice else []) + in_ns(host.name, [])

    t0 = time.perf_counter()
    mhost = net.hosts[world]
    master, port = start_master(SECRET, host=mhost.ip, wrapper=inside(mhost))
    proxies: list[DelayProxy] = []
    procs: list[Proc] = []
    try:
        mproxy = mhost.start_delay_proxy(
            target=(mhost.ip, port), delay_ms=delay_ms, coalesce_ms=coalesce_ms
        )
        proxies.append(mproxy)
        for i, host in enumerate(net.hosts[:world]):
            proxy = host.start_delay_proxy(
                target=("127.0.0.1", WAN_DATA_PORT), delay_ms=delay_ms, coalesce_ms=coalesce_ms
            )
            proxies.append(proxy)
            comm = CommConfig(
                master_host=mhost.ip,
                master_port=mproxy.port,
                streams=streams,
                chunk_kb=chunk_kb,
                listen_host="0.0.0.0",
                listen_port=WAN_DATA_PORT,
                advertise_host=host.ip,
                advertise_port=proxy.port,
            )
            cfg = _peer_config(comm, i, world, numel, quant, rounds)
            procs.append(start_peer(cfg, SECRET, wrapper=inside(host)))
        times, peer_cpu_s, _ = _collect(procs)
        proxy_cpu_s = sum(_cpu_s(pr.process.pid) for pr in proxies)
        for p in procs:
            p.popen.wait(30)
        return WanRun(times, peer_cpu_s, proxy_cpu_s, time.perf_counter() - t0)
    finally:
        for p in procs:
            p.stop()
        master.stop()
        for pr in proxies:
            pr.stop()


def run_tcp_wan(net: WanNetwork, nbytes: int, rounds: int, *, delay_ms: float) -> list[float]:
    """The WAN ceiling: one TCP stream from host 0 to host 1 through a delay proxy, plain sockets.

    Each round sends ``nbytes`` and waits for a 1-byte reply, so it costs one extra round trip.
    """
    src, dst = net.hosts[0], net.hosts[1]
    srv = dst.listen()
    proxy = dst.start_delay_proxy(target=("127.0.0.1", srv.getsockname()[1]), delay_ms=delay_ms)
    times: list[float] = []
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            conn, _ = srv.accept()
            with conn:
                buf = bytearray(4 << 20)
                for _ in range(rounds + 1):
                    left = nbytes
                    while left:
                        got = conn.recv_into(buf, min(left, len(buf)))
                        if not got:
                            raise ConnectionError("sender went away")
                        left -= got
                    conn.sendall(b"k")
        except BaseException as e:  # reported by the sender's side below
            errors.append(e)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    try:
        payload = memoryview(bytearray(nbytes))
        with src.connect((dst.ip, proxy.port), timeout_s=600) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(rounds + 1):
                t1 = time.perf_counter()
                c.sendall(payload)
                if c.recv(1) != b"k":
                    raise RuntimeError(f"tcp ceiling: receiver failed: {errors}")
                times.append(time.perf_counter() - t1)
        t.join(30)
    finally:
        srv.close()
        proxy.stop()
    return times[1:]


def run_wan(
    args: argparse.Namespace, sizes: list[float], quants: list[str], console: Console
) -> list[dict[str, Any]]:
    reason = netns_unavailable_reason()
    if reason is not None:
        console.print(f"[yellow]skipping --wan: {reason}")
        return []
    worlds = [int(x) for x in args.worlds.split(",")] if args.worlds else [4]
    rows = []
    with WanNetwork(
        n_hosts=max(worlds) + 1, rate_mbit=args.link_mbit, segmentation=args.wan_segmentation
    ) as net:
        for size in sizes:
            nbytes = int(size * 2**20)
            times = run_tcp_wan(net, nbytes, args.wan_rounds, delay_ms=args.delay_ms)
            rows.append(row("tcp", "netns", 2, size, "none", times, link_mbit=args.link_mbit))
            console.print(f"done: wan tcp {size:g} MiB: {statistics.median(times):.2f}s")
            for world in worlds:
                for q in quants:
                    chunk_kb = args.wan_chunk_kb
                    run = run_cotrain_wan(
                        net,
                        world,
                        nbytes // 4,
                        q,
                        args.wan_rounds,
                        delay_ms=args.delay_ms,
                        streams=args.wan_streams,
                        chunk_kb=chunk_kb,
                        coalesce_ms=args.wan_proxy_coalesce_ms,
                        nice=args.wan_nice,
                    )
                    r = row("cotrain", "netns", world, size, q, run.times, link_mbit=args.link_mbit)
                    r |= {
                        "times_s": run.times,
                        "streams": args.wan_streams,
                        "chunk_kb": chunk_kb,
                        "proxy_coalesce_ms": args.wan_proxy_coalesce_ms,
                        "nice": args.wan_nice,
                        "delay_ms": args.delay_ms,
                        "link_mbit": args.link_mbit,
                        "segmentation": args.wan_segmentation,
                        "peer_cpu_s": run.peer_cpu_s,
                        "proxy_cpu_s": run.proxy_cpu_s,
                        "run_wall_s": run.wall_s,
                        "load_avg_1m": os.getloadavg()[0],
                    }
                    rows.append(r)
                    console.print(
                        f"done: wan world {world}, {size:g} MiB {q}: {r['median_s']:.2f}s "
                        f"= {r['bound_ratio']:.2f} x ring bound; CPU peers {run.peer_cpu_s:.1f}s "
                        f"proxies {run.proxy_cpu_s:.1f}s in {run.wall_s:.1f}s"
                    )
    fp32 = {
        (r["world"], r["size_mib"]): r["median_s"]
        for r in rows
        if r["impl"] == "cotrain" and r["quant"] == "none"
    }
    for r in rows:
        key = (r["world"], r["size_mib"])
        if r["impl"] == "cotrain" and r["quant"] != "none" and key in fp32:
            r["vs_fp32_time"] = r["median_s"] / fp32[key]
    return rows


if __name__ == "__main__":
    main()
