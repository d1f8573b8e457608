"""Hostile connections and frames against a live run, measured from outside the processes.

    nice python bench/fuzz.py --json out.json     # >= 10^5 cases
    nice python bench/fuzz.py --quick             # a few thousand, under a minute

A real `cotrain master` and 3 real `cotrain peer` processes all-reduce small tensors in a loop
while this process attacks the master's port and one peer's data port: random bytes, truncated
handshakes, garbage after the greeting, oversized length fields, wrong secrets, unadmitted keys,
bad admission tokens, replayed handshakes, impersonation of a member's id, and, after a valid
handshake, frames with huge integers, deep nesting, NaN, wrong or unknown types, oversized
lengths, ring hellos for future epochs and state or probe requests from non-members. Meanwhile
hundreds of idle and 1-byte-per-second (slowloris) connections are held open, from a stranger's
address (127.0.0.2 and up) and from the honest peers' own (127.0.0.1), and an honest client
handshakes from 127.0.0.1 every 0.2 s. A share of the cases runs in this process against the
state fetch and serve code (a lying state source: bad sizes, shapes, dtypes, truncations).
The cases themselves are in ``fuzz_cases.py``.

Reported (and written with ``--json``):

* ``cases``: hostile connections and frames sent;
* ``accepted_unauthenticated``: handshakes answered with status 0 (or a welcome) without valid
  credentials, and non-members that were served state or a probe;
* ``handler_tracebacks``: "Traceback" in any target's output (logging at WARNING shows
  unexpected handler errors with their traceback) or an unexpected exception in-process;
* ``crashes``: target processes that exited;
* ``fd_growth``, ``rss_growth_mb``: open descriptors and resident memory of the master and the
  peers after the fuzz (settled) minus before it (after a warm-up of every case);
* ``max_stall_s``: the longest gap between two rounds of the honest loop during the fuzz;
* ``unanswered``: cases the server neither answered nor closed within 15 s (a wedge);
* ``honest_refused``, ``honest_handshake_max_s``: the honest client's handshakes from
  127.0.0.1 that were refused, and the slowest that succeeded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from fuzz_cases import (
    DATA_KINDS,
    HONEST_ADDR,
    MASTER_KINDS,
    STRANGERS,
    Holder,
    HonestClient,
    Tally,
    Target,
    World,
    abort,
    client_message,
    connect,
    greet,
    run_case,
    secret_cred,
    state_case,
    status,
)

from cotrain.comm import CommConfig
from cotrain.core.identity import Identity
from cotrain.demo.peer import PeerProgramConfig
from cotrain.launch.procs import Proc, start_master, start_peer

SECRET = "fuzz-secret"
PEERS = 3
PEER_CONNECT_TIMEOUT_S = 5.0

# ---- measuring the processes -------------------------------------------------------------------


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def snapshot(procs: list[Proc]) -> dict[str, tuple[int, float]]:
    return {p.name: (fds(p.popen.pid), rss_mb(p.popen.pid)) for p in procs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def round_times(proc: Proc) -> list[float]:
    times = []
    while True:
        try:
            ev = proc.events.get_nowait()
        except Exception:
            return times
        if ev.get("event") == "round":
            times.append(float(ev["t"]))
        elif ev.get("event") == "failed":
            proc.lines.append("honest round failed: " + json.dumps(ev))


def record_replay(world: World, port: int, kind: str) -> bytes:
    """An honest client's handshake message, recorded from a real exchange."""
    s = connect(port, HONEST_ADDR)
    try:
        g = greet(s)
        assert g is not None, "no greeting from the target"
        msg = client_message(g, world.key(random.Random(0)), secret_cred(world.secret))
        s.sendall(msg)
        assert status(s) == 0, f"the honest handshake to the {kind} port was refused"
        return msg
    finally:
        abort(s)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class FuzzConfig:
    cases: int = 100_000
    """Hostile connections and frames fired from the pool (idle/slowloris ones come on top)."""
    workers: int = 24
    """Client threads firing cases."""
    idle: int = 150
    """Idle connections held per target from a stranger's address."""
    idle_honest_addr: int = 300
    """Idle connections held per target from the honest peers' address (more than the
    per-address limit of handshakes in progress)."""
    slow: int = 30
    """1-byte-per-second connections held per target and per address."""
    inproc_share: float = 0.1
    """Share of the cases run in-process against the state fetch and serve code."""
    handshake_timeout_s: float = 5.0
    """The master's and the peers' whole-handshake deadline."""
    settle_s: float = 30.0
    """Longest wait for the targets' descriptors to come back after the fuzz."""
    seed: int = 0


def fire(
    cfg: FuzzConfig,
    n: int,
    world: World,
    tally: Tally,
    seed: int,
    log: Callable[[str], None] = lambda _: None,
) -> None:
    """Fire ``n`` cases from ``cfg.workers`` threads (deterministic case lists per thread)."""
    done = [0]
    t_start = time.perf_counter()

    def progress() -> None:
        with tally.lock:
            done[0] += 1
            k = done[0]
        if k % max(n // 10, 1) == 0:
            log(f"{k}/{n} cases in {time.perf_counter() - t_start:.0f}s")

    def worker(w: int, count: int) -> None:
        rng = random.Random(seed * 1000 + w)
        for _ in range(count):
            progress()
            if rng.random() < cfg.inproc_share:
                state_case(rng, tally)
                continue
            target = world.master if rng.random() < 0.5 else world.data
            kind = rng.choice(MASTER_KINDS if target.kind == "master" else DATA_KINDS)
            src = HONEST_ADDR if rng.random() < 0.2 else rng.choice(STRANGERS)
            t0 = time.perf_counter()
            try:
                why = run_case(kind, target, src, world, rng)
            except (OSError, ValueError) as e:  # a reset, a timeout, a refused frame header
                why = None
                if isinstance(e, TimeoutError):  # the server neither answered nor closed
                    with tally.lock:
                        tally.unanswered.append(f"{kind} to {target.name} from {src}")
            except Exception:
                why = None
                with tally.lock:
                    tally.errors.append(f"{kind}: {traceback.format_exc(limit=4)}")
            tally.add(f"{target.name}:{kind}", why)
            with tally.lock:
                tally.seconds[f"{target.name}:{kind}"] += time.perf_counter() - t0

    per = [n // cfg.workers + (1 if w < n % cfg.workers else 0) for w in range(cfg.workers)]
    with ThreadPoolExecutor(cfg.workers) as ex:
        for f in [ex.submit(worker, w, k) for w, k in enumerate(per)]:
            f.result()


def start_holders(cfg: FuzzConfig, world: World, tally: Tally) -> list[Holder]:
    holders = []
    for t in (world.master, world.data):
        for src, idle in (("127.0.0.2", cfg.idle), (HONEST_ADDR, cfg.idle_honest_addr)):
            h = Holder(t.port, src, idle=idle, slow=cfg.slow, tally=tally)
            h.start()
            holders.append(h)
    return holders


def stop_holders(holders: list[Holder]) -> None:
    for h in holders:
        h.stop.set()
    for h in holders:
        h.join(30)


def tracebacks(procs: list[Proc]) -> list[str]:
    out = []
    for p in procs:
        for i, line in enumerate(p.lines):
            if "Traceback" in line:
                out.append(f"{p.name}: " + " | ".join(p.lines[i : i + 12]))
    return out


def run(cfg: FuzzConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    issuer = Identity.generate()
    mport = free_port()
    master, mport = start_master(
        SECRET,
        port=mport,
        args=[
            f'token_issuers=["{issuer.public_hex}"]',
            f"handshake_timeout_s={cfg.handshake_timeout_s}",
        ],
    )
    ports = [free_port() for _ in range(PEERS)]
    peers: list[Proc] = []
    holders: list[Holder] = []
    honest: HonestClient | None = None
    try:
        for i in range(PEERS):
            comm = CommConfig(
                master_port=mport,
                listen_port=ports[i],
                streams=2,
                chunk_kb=4,
                heartbeat_interval_s=0.5,
                handshake_timeout_s=cfg.handshake_timeout_s,
                connect_timeout_s=PEER_CONNECT_TIMEOUT_S,
            )
            pc = PeerProgramConfig(
                comm=comm, index=i, numel=1024, world=PEERS, rounds=10**9, digest=False
            )
            peers.append(start_peer(pc, SECRET))
        joined = [p.wait_for("joined", 60) for p in peers]
        procs = [master, *peers]
        world = World(
            master=Target("master", mport, "master"),
            data=Target("peer0", ports[0], "data"),
            secret=SECRET.encode(),
            issuer=issuer,
            members=[str(j["key"]) for j in joined],
            keys=[Identity.generate() for _ in range(64)],
        )
        world.replay = {
            "master": record_replay(world, mport, "master"),
            "data": record_replay(world, ports[0], "data"),
        }
        tally = Tally()
        # Warm-up: every case, with the idle and slowloris connections held, so one-time
        # allocations and the memory a peak of ~500 connection threads leaves with the
        # allocator are in the baseline: growth past it is what a leak would add.
        warm = max(cfg.cases // 50, 300)
        warm_holders = start_holders(cfg, world, tally)
        fire(cfg, warm, world, tally, seed=cfg.seed + 1)
        stop_holders(warm_holders)
        # handlers may hold a warm-up connection up to the peers' connect timeout
        settle(procs, None, cfg.settle_s, min_s=PEER_CONNECT_TIMEOUT_S + cfg.handshake_timeout_s)
        for p in peers:
            round_times(p)
        before = snapshot(procs)
        log(f"baseline {before}")
        tally = Tally()
        holders = start_holders(cfg, world, tally)
        honest = HonestClient(world)
        honest.start()
        trace: list[dict[str, float]] = []
        sampling = threading.Event()

        def sample() -> None:  # RSS every 5 s: a plateau is fragmentation, a slope a leak
            while not sampling.wait(5.0):
                trace.append({k: round(v[1], 1) for k, v in snapshot(procs).items()})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t_start = time.time()
        fire(cfg, cfg.cases, world, tally, seed=cfg.seed, log=log)
        t_end = time.time()
        sampling.set()
        honest.stop.set()
        stop_holders(holders)
        honest.join(30)
        gaps = []
        for p in peers:
            ts = [t for t in round_times(p) if t_start <= t <= t_end]
            pts = [t_start, *ts, t_end]
            gaps.append(max(b - a_ for a_, b in itertools.pairwise(pts)))
        after = settle(procs, before, cfg.settle_s)
        log(f"after {after}")
        crashed = [p.name for p in procs if p.popen.poll() is not None]
        tbs = tracebacks(procs)
        summary: dict[str, Any] = {
            "cases": sum(tally.cases.values()),
            "accepted_unauthenticated": len(tally.accepted),
            "handler_tracebacks": len(tbs) + len(tally.errors),
            "crashes": len(crashed),
            "fd_growth": sum(after[k][0] - before[k][0] for k in before),
            "rss_growth_mb": round(max(after[k][1] - before[k][1] for k in before), 2),
            "max_stall_s": round(max(gaps), 3),
            "unanswered": len(tally.unanswered),
            "honest_refused": len(honest.refused),
            "honest_handshake_max_s": round(honest.slowest_s, 3),
            "honest_handshakes": honest.tries,
            "honest_failed_rounds": sum(
                1 for p in peers for ln in p.lines if ln.startswith("honest round failed")
            ),
            "fuzz_s": round(t_end - t_start, 1),
        }
        return {
            "summary": summary,
            "processes": {k: {"before": before[k], "after": after[k]} for k in before},
            "rss_trace_mb": trace,
            "cases_by_kind": dict(sorted(tally.cases.items())),
            "mean_case_s": {
                k: round(v / tally.cases[k], 4) for k, v in sorted(tally.seconds.items())
            },
            "accepted": tally.accepted[:20],
            "tracebacks": tbs[:10],
            "errors": tally.errors[:10],
            "unanswered": tally.unanswered[:10],
            "honest_refusals": honest.refused[:20],
            "crashed": crashed,
            "config": cfg.__dict__,
        }
    finally:
        if honest is not None:
            honest.stop.set()
        for h in holders:
            h.stop.set()
        for p in peers:
            p.stop()
        master.stop()


def settle(
    procs: list[Proc],
    before: dict[str, tuple[int, float]] | None,
    timeout_s: float,
    *,
    min_s: float = 0.0,
) -> dict[str, tuple[int, float]]:
    """Wait until every process is back to its ``before`` descriptor count (or, without one,
    until counts stop changing for 2 s after at least ``min_s``) or ``timeout_s``; returns the
    last snapshot."""
    t0 = time.monotonic()
    last = snapshot(procs)
    steady_since = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.5)
        now = snapshot(procs)
        now_s = time.monotonic() - t0
        if before is not None and all(now[k][0] <= before[k][0] for k in before):
            return now
        if {k: v[0] for k, v in now.items()} != {k: v[0] for k, v in last.items()}:
            steady_since = time.monotonic()
        elif before is None and min(time.monotonic() - steady_since, now_s - min_s) >= 2.0:
            return now
        last = now
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few thousand cases, under a minute")
    ap.add_argument("--cases", type=int, help="hostile cases to fire (default 10^5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args()
    cfg = FuzzConfig(seed=args.seed)
    if args.quick:
        cfg = FuzzConfig(cases=3000, idle=60, slow=10, handshake_timeout_s=2.0, seed=args.seed)
    if args.cases is not None:
        cfg.cases = args.cases
    t0 = time.time()
    report = run(cfg)
    report["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    s = report["summary"]
    ok = (
        s["accepted_unauthenticated"] == 0
        and s["handler_tracebacks"] == 0
        and s["crashes"] == 0
        and s["fd_growth"] <= 0
        and s["rss_growth_mb"] < 10
        and s["max_stall_s"] < 2
        and s["honest_refused"] == 0
        and s["unanswered"] == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
