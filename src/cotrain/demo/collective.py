"""`cotrain demo` (collectives): a master and N peers all-reduce a model-sized tensor on this
machine; one peer is killed mid-collective, the survivors recover, a new peer joins, and a
closing table reports rounds, peers, bytes, bus bandwidth and recovery time."""

from __future__ import annotations

import secrets
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cotrain.comm.config import CommConfig
from cotrain.comm.faults import Fault, FaultPlan
from cotrain.demo.peer import PeerProgramConfig
from cotrain.launch.procs import Proc, start_master, start_peer


@dataclass
class _PeerView:
    status: str = "starting"
    round: int = -1
    world: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    note: str = ""
    busbw: list[float] = field(default_factory=list)


def _table(views: dict[int, _PeerView], numel: int) -> Table:
    t = Table(title=f"cotrain all-reduce demo: {numel * 4 / 2**20:.0f} MiB fp32 per round")
    for col in ("peer", "status", "round", "world", "last s", "bus GB/s", "sent MiB", "note"):
        t.add_column(col, justify="right" if col not in ("status", "note") else "left")
    for i, v in sorted(views.items()):
        bw = f"{v.busbw[-1]:.2f}" if v.busbw else "-"
        t.add_row(
            f"p{i}",
            v.status,
            str(max(v.round, 0)),
            str(v.world),
            f"{v.seconds:.3f}",
            bw,
            f"{v.bytes_sent / 2**20:.0f}",
            v.note,
        )
    return t


def run_demo(
    *, peers: int, numel: int, rounds: int, quantization: str, kill_round: int, join_round: int
) -> dict[str, Any]:
    console = Console()
    secret = secrets.token_hex(16)
    master, port = start_master(secret)
    comm = CommConfig(master_port=port, heartbeat_interval_s=0.3)
    procs: dict[int, Proc] = {}
    views: dict[int, _PeerView] = {}

    def launch(i: int, *, faults: FaultPlan | None = None, join: bool = False) -> None:
        cfg = PeerProgramConfig(
            comm=comm,
            faults=faults or FaultPlan(),
            index=i,
            numel=numel,
            rounds=rounds,
            world=peers,
            op="avg",
            join=join,
            quantization=quantization,  # type: ignore[arg-type]
        )
        procs[i] = start_peer(cfg, secret)
        views[i] = _PeerView(status="joining" if join else "starting")

    victim = peers - 1
    for i in range(peers):
        kill = FaultPlan(faults=[Fault(kind="kill", at_collective=kill_round, after_chunks=2)])
        launch(i, faults=kill if i == victim else None)
    joined = False
    failures: list[dict[str, Any]] = []
    recoveries: list[float] = []
    worlds: list[int] = []
    t0 = time.time()
    deadline = t0 + 600
    try:
        with Live(_table(views, numel), console=console, refresh_per_second=4) as live:
            while time.time() < deadline:
                for i, p in list(procs.items()):
                    v = views[i]
                    while not p.events.empty():
                        ev = p.events.get_nowait()
                        kind = ev.get("event")
                        if kind == "joined":
                            v.status, v.world = "running", ev["world"]
                        elif kind == "round":
                            v.round, v.world, v.seconds = ev["round"], ev["world"], ev["seconds"]
                            v.bytes_sent += ev["bytes_sent"]
                            n = ev["world"]
                            if n > 1 and ev["seconds"] > 0:
                                v.busbw.append(numel * 4 * 2 * (n - 1) / n / ev["seconds"] / 1e9)
                            if ev.get("recovery_s"):
                                recoveries.append(ev["recovery_s"])
                                v.note = f"recovered in {ev['recovery_s']:.2f}s"
                            worlds.append(n)
                        elif kind == "failed":
                            failures.append(ev)
                            v.note = f"{ev['error']} after {ev['seconds']:.2f}s"
                        elif kind == "done":
                            v.status = "done"
                    if p.popen.poll() is not None and v.status not in ("done", "killed"):
                        v.status = (
                            "killed" if p.popen.returncode < 0 else f"exit {p.popen.returncode}"
                        )
                if not joined and any(v.round >= join_round for v in views.values()):
                    launch(peers, join=True)
                    joined = True
                live.update(_table(views, numel))
                if all(p.popen.poll() is not None for p in procs.values()):
                    break
                time.sleep(0.1)
    finally:
        for p in procs.values():
            p.stop()
        master.stop()
    elapsed = time.time() - t0
    bws = [b for v in views.values() for b in v.busbw]
    summary = {
        "rounds": max((v.round for v in views.values()), default=-1) + 1,
        "peers_start": peers,
        "peers_min": min(worlds) if worlds else 0,
        "peers_end": worlds[-1] if worlds else 0,
        "bytes_sent_mib": sum(v.bytes_sent for v in views.values()) / 2**20,
        "median_busbw_gbps": statistics.median(bws) if bws else 0.0,
        "detect_s": max((f["seconds"] for f in failures), default=0.0),
        "recovery_s": max(recoveries, default=0.0),
        "wall_s": elapsed,
    }
    out = Table(title="summary")
    out.add_column("metric")
    out.add_column("value", justify="right")
    out.add_row("rounds completed", str(summary["rounds"]))
    out.add_row(
        "peers (start / after kill / end)",
        f"{peers} / {summary['peers_min']} / {summary['peers_end']}",
    )
    out.add_row("bytes sent, all peers", f"{summary['bytes_sent_mib']:.0f} MiB")
    out.add_row("median bus bandwidth", f"{summary['median_busbw_gbps']:.2f} GB/s")
    out.add_row("failure detected after", f"{summary['detect_s']:.2f} s")
    out.add_row("recovery (failure to next good round)", f"{summary['recovery_s']:.2f} s")
    out.add_row("wall time", f"{elapsed:.1f} s")
    console.print(out)
    return summary
