"""Chaos: 8 scripted peers under random kill -9, SIGSTOP beyond the heartbeat timeout, joins and
master kill + restart at the same address, one fault every 20-30 s, for 10 minutes.

    nice python bench/chaos.py --json chaos.json     # 10 minutes, 8 peers
    python bench/chaos.py --quick                     # 30 s, a fault every 3-5 s

Every peer is a real `cotrain peer` process: each round it votes, syncs the round counter and
all-reduces (sum) seeded integer-valued inputs, so the exact result of a round is known from the
ring that computed it and every result's hash is checked against it. A fault's recovery is the
time from the fault until every member active before it has finished a round without the victim
(kill, stop), with the joiner (join) or in a new epoch (master). Outcomes counted:

* ``wrong_results``: a round's bytes differ from the exact sum of its ring's inputs.
* ``split_outcomes``: a collective that returned on some members and failed on others that lived
  on; ``inputs_not_restored``: a failed all-reduce that left its input changed.
* ``repeated_rounds``: a peer that completed the same round twice (a split applied twice).
* ``wedged_runs``: no round completed anywhere for ``--wedge-s``; the run is restarted.
* ``hangs``: a live, running peer silent for ``--hang-s`` while others go on; it is replaced.
* ``crashes``: a peer that exited (a non-retryable error); it is replaced by a joiner.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np
from rich.console import Console
from rich.table import Table

from cotrain.comm import CommConfig
from cotrain.demo.peer import PeerProgramConfig, base_input
from cotrain.launch.procs import Proc, start_master, start_peer

SECRET = "chaos"
KINDS = ("kill", "join", "stop", "master")  # in this order, again and again


@dataclass
class Settings:
    peers: int
    duration_s: float
    interval_s: tuple[float, float]
    numel: int
    compute_s: float
    heartbeat_timeout_s: float
    wedge_s: float
    hang_s: float
    seed: int


@dataclass
class Peer:
    index: int
    proc: Proc
    started: float
    peer_id: str | None = None
    stopped: bool = False
    last_event: float = 0.0
    last_round_t: float = 0.0
    last_epoch: int = -1
    rounds: set[int] = field(default_factory=set)


@dataclass
class Pending:
    """A fault whose recovery is not measured yet."""

    kind: str
    t: float
    victim: str | None  # peer id (kill, stop, join)
    waiting: dict[int, int]  # peer index -> epoch its first round after the fault must exceed


class Chaos:
    def __init__(self, s: Settings, console: Console) -> None:
        self.s = s
        self.console = console
        self.rng = random.Random(s.seed)
        self.master: Proc | None = None
        self.port = 0
        self.peers: dict[int, Peer] = {}
        self.next_index = 0
        self.run_id = 0  # bumps when a wedged run is restarted
        self.bases: dict[int, np.ndarray] = {}
        self.expected: dict[tuple[int, tuple[int, ...]], str] = {}
        self.ok: dict[tuple[int, int, int], dict[int, float]] = {}  # (run, epoch, round) -> peers
        self.failed: list[tuple[int, int, int, int]] = []  # (run, epoch, round, index)
        self.faults: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.recovery: dict[str, list[float]] = {k: [] for k in KINDS}
        self.master_start: list[float] = []  # kill to the new master listening (in recovery)
        self.pending: list[Pending] = []
        self.counts = dict.fromkeys(
            [
                "wrong_results",
                "inputs_not_restored",
                "repeated_rounds",
                "wedged_runs",
                "hangs",
                "crashes",
                "unrecovered",
            ],
            0,
        )
        self.incidents: list[dict[str, Any]] = []
        self.last_progress = time.time()

    # ---- processes ---------------------------------------------------------------------------

    def start_master(self) -> None:
        self.master, self.port = start_master(
            SECRET,
            port=self.port,
            args=[f"heartbeat_timeout_s={self.s.heartbeat_timeout_s}"],
        )

    def start_peer(self, *, join: bool) -> Peer:
        index = self.next_index
        self.next_index += 1
        comm = CommConfig(
            master_port=self.port,
            streams=2,
            chunk_kb=16,
            heartbeat_interval_s=0.25,
            stall_timeout_s=10.0,
            connect_timeout_s=5.0,
            master_reconnect_timeout_s=30.0,
        )
        cfg = PeerProgramConfig(
            comm=comm,
            index=index,
            seed=self.s.seed,
            numel=self.s.numel,
            op="sum",
            inputs="integer",
            rounds=1 << 40,
            world=self.s.peers,
            join=join,
            retries=1 << 30,
            retry_timeout_s=1e9,  # hangs are this benchmark's to find
            compute_s=self.s.compute_s,
        )
        now = time.time()
        peer = Peer(index, start_peer(cfg, SECRET), now, last_event=now)
        self.peers[index] = peer
        return peer

    def stop_all(self) -> None:
        for p in self.peers.values():
            with contextlib.suppress(OSError):
                p.proc.popen.send_signal(signal.SIGKILL)
            p.proc.stop()
        self.peers.clear()
        if self.master is not None:
            self.master.stop()

    def start_run(self) -> None:
        self.run_id += 1
        self.start_master()
        for _ in range(self.s.peers):
            self.start_peer(join=False)
        self.last_progress = time.time()

    # ---- results -----------------------------------------------------------------------------

    def expected_digest(self, rnd: int, members: tuple[int, ...]) -> str:
        key = (rnd, members)
        if key not in self.expected:
            total = np.zeros(self.s.numel, dtype=np.float64)
            for i in members:
                if i not in self.bases:
                    self.bases[i] = base_input(self.s.seed, i, self.s.numel, "integer")
                total += self.bases[i] + rnd
            exact = total.astype(np.float32)  # integers below 2**24: exact in fp32
            self.expected[key] = hashlib.sha256(exact.tobytes()).hexdigest()[:16]
        return self.expected[key]

    def incident(self, kind: str, peer: Peer | None, detail: str) -> None:
        entry: dict[str, Any] = {"kind": kind, "t": time.time(), "detail": detail}
        if peer is not None:
            entry["peer"] = peer.index
            entry["log"] = peer.proc.lines[-30:]
        if self.master is not None and kind in ("wedged_run", "split", "unrecovered"):
            entry["master_log"] = self.master.lines[-30:]
        if len(self.incidents) < 50:
            self.incidents.append(entry)
        self.console.print(f"[red]{kind}[/red] {detail}")

    def on_event(self, peer: Peer, ev: dict[str, Any]) -> None:
        peer.last_event = time.time()
        kind = ev.get("event")
        if kind == "joined":
            peer.peer_id = ev["key"]
        elif kind == "failed":
            if ev.get("stage") == "all_reduce":
                self.failed.append((self.run_id, ev["epoch"], ev["round"], peer.index))
                if ev.get("restored") is False:
                    self.counts["inputs_not_restored"] += 1
                    self.incident("input_not_restored", peer, json.dumps(ev))
        elif kind == "round":
            self.on_round(peer, ev)

    def on_round(self, peer: Peer, ev: dict[str, Any]) -> None:
        t, rnd, epoch = ev["t"], ev["round"], ev["epoch"]
        self.last_progress = time.time()
        members = tuple(sorted(int(name[1:]) for name in ev["ring"]))  # names are p{index}
        if ev["digest"] != self.expected_digest(rnd, members):
            self.counts["wrong_results"] += 1
            self.incident("wrong_result", peer, f"round {rnd} epoch {epoch} ring {members}")
        if rnd in peer.rounds:
            self.counts["repeated_rounds"] += 1
            self.incident("repeated_round", peer, f"round {rnd} epoch {epoch}")
        peer.rounds.add(rnd)
        self.ok.setdefault((self.run_id, epoch, rnd), {})[peer.index] = t
        peer.last_round_t, peer.last_epoch = t, epoch
        for p in list(self.pending):
            want = p.waiting.get(peer.index)
            if want is None or t <= p.t or epoch <= want:
                continue
            if p.kind in ("kill", "stop") and p.victim in ev["ring_keys"]:
                continue
            if p.kind == "join" and p.victim not in ev["ring_keys"]:
                continue
            del p.waiting[peer.index]
            if not p.waiting:
                self.recovery[p.kind].append(t - p.t)
                self.pending.remove(p)

    def pump(self) -> None:
        for peer in list(self.peers.values()):
            while True:
                try:
                    ev = peer.proc.events.get_nowait()
                except Exception:
                    break
                self.on_event(peer, ev)

    # ---- faults ------------------------------------------------------------------------------

    def active(self, now: float) -> list[Peer]:
        """Members that finished a round lately: the ones a fault's recovery waits for."""
        return [
            p
            for p in self.peers.values()
            if not p.stopped and p.peer_id is not None and now - p.last_round_t < 2.0
        ]

    def inject(self, kind: str) -> None:
        now = time.time()
        members = self.active(now)
        victim: Peer | None = None
        if kind in ("kill", "stop"):
            if len(members) < 3:
                return
            victim = self.rng.choice(members)
            members = [p for p in members if p is not victim]
        # a round counts for recovery if its epoch is past the one this peer last reported
        waiting = {p.index: p.last_epoch for p in members}
        if kind in ("kill", "stop"):
            waiting = {p.index: -1 for p in members}  # any epoch without the victim
        t = time.time()
        if kind == "kill":
            assert victim is not None
            victim.proc.popen.send_signal(signal.SIGKILL)
        elif kind == "stop":
            assert victim is not None
            victim.proc.popen.send_signal(signal.SIGSTOP)
            victim.stopped = True
            wake = self.s.heartbeat_timeout_s + 1.5
            self.wakeups.append((t + wake, victim))
        elif kind == "join":
            if len(self.peers) >= self.s.peers:
                return
            joiner = self.start_peer(join=True)
            self.joiners.append((joiner, t, {p.index: -1 for p in members}))
        else:
            assert self.master is not None
            self.master.popen.send_signal(signal.SIGKILL)
            self.master.popen.wait(10)
            self.master.stop()
            self.start_master()
            self.master_start.append(time.time() - t)
        self.faults[kind] += 1
        vid = victim.peer_id if victim is not None else None
        if kind != "join":
            self.pending.append(Pending(kind, t, vid, waiting))
        self.console.print(
            f"{t - self.t0:7.1f}s {kind} {victim.index if victim else ''} ({len(self.peers)} peers)"
        )

    # ---- main loop ---------------------------------------------------------------------------

    def check_health(self, now: float) -> None:
        for peer in list(self.peers.values()):
            if peer.proc.popen.poll() is not None and not peer.stopped:
                if peer.proc.popen.returncode != -signal.SIGKILL:
                    self.counts["crashes"] += 1
                    self.incident("crash", peer, f"exit {peer.proc.popen.returncode}")
                del self.peers[peer.index]
                peer.proc.stop()
            elif (
                not peer.stopped
                and now - peer.last_event > self.s.hang_s
                and now - self.last_progress < self.s.hang_s / 2  # others go on: this one hangs
            ):
                self.counts["hangs"] += 1
                self.incident("hang", peer, f"silent for {now - peer.last_event:.0f}s")
                peer.proc.popen.send_signal(signal.SIGKILL)
        if now - self.last_progress > self.s.wedge_s:
            self.counts["wedged_runs"] += 1
            self.incident("wedged_run", None, f"no round for {self.s.wedge_s:.0f}s; restarting")
            self.stop_all()
            self.pending.clear()
            self.wakeups.clear()
            self.joiners.clear()
            self.start_run()
        for p in list(self.pending):
            if now - p.t > 30:
                self.counts["unrecovered"] += 1
                self.incident("unrecovered", None, f"{p.kind} at {p.t - self.t0:.1f}s")
                self.pending.remove(p)

    def register_joiners(self) -> None:
        for j in list(self.joiners):
            joiner, t, waiting = j
            if joiner.peer_id is not None:  # measured from the joiner's start
                self.pending.append(Pending("join", t, joiner.peer_id, waiting))
                self.joiners.remove(j)

    def run(self) -> None:
        self.wakeups: list[tuple[float, Peer]] = []
        self.joiners: list[tuple[Peer, float, dict[int, int]]] = []
        self.t0 = time.time()
        self.start_run()
        # everyone in the ring before the first fault
        while len([p for p in self.peers.values() if p.last_round_t]) < self.s.peers:
            self.pump()
            time.sleep(0.05)
            if time.time() - self.t0 > 120:
                raise SystemExit("the peers did not start within 120 s")
        self.t0 = time.time()
        end = self.t0 + self.s.duration_s
        next_fault = self.t0 + self.rng.uniform(*self.s.interval_s)
        k = 0
        while time.time() < end:
            self.pump()
            now = time.time()
            for w in list(self.wakeups):
                if now >= w[0]:
                    w[1].proc.popen.send_signal(signal.SIGCONT)
                    w[1].stopped = False
                    w[1].last_event = now
                    self.wakeups.remove(w)
            self.register_joiners()
            if now >= next_fault and not self.wakeups:
                self.inject(KINDS[k % len(KINDS)])
                k += 1
                next_fault = now + self.rng.uniform(*self.s.interval_s)
            self.check_health(now)
            time.sleep(0.02)
        # let the last recoveries finish
        settle = time.time() + 10
        while (self.pending or self.joiners) and time.time() < settle:
            self.pump()
            self.register_joiners()
            time.sleep(0.05)
        self.pump()

    def splits(self) -> int:
        """Collectives that returned on some members and failed (after agreeing) on others."""
        n = 0
        for run, epoch, rnd, index in self.failed:
            done = self.ok.get((run, epoch, rnd), {})
            if done and index not in done:
                n += 1
                self.incident(
                    "split", None, f"round {rnd} epoch {epoch}: {sorted(done)} vs {index}"
                )
        return n

    def report(self, wall_s: float) -> dict[str, Any]:
        def summary(xs: list[float]) -> dict[str, Any]:
            if not xs:
                return {"n": 0}
            return {
                "n": len(xs),
                "min": round(min(xs), 3),
                "median": round(statistics.median(xs), 3),
                "max": round(max(xs), 3),
            }

        return {
            "settings": self.s.__dict__,
            "wall_s": round(wall_s, 1),
            "collectives": len(self.ok),
            "faults": self.faults,
            "wrong_results": self.counts["wrong_results"],
            "split_outcomes": self.splits(),
            "inputs_not_restored": self.counts["inputs_not_restored"],
            "repeated_rounds": self.counts["repeated_rounds"],
            "wedged_runs": self.counts["wedged_runs"],
            "hangs": self.counts["hangs"],
            "crashes": self.counts["crashes"],
            "unrecovered": self.counts["unrecovered"],
            "recovery_s": {k: summary(v) for k, v in self.recovery.items()},
            "master_start_s": summary(self.master_start),
            "incidents": self.incidents,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 s, a fault every 3-5 s")
    ap.add_argument("--duration-s", type=float, help="default 600 (30 with --quick)")
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--numel", type=int, default=16384, help="values per all-reduce")
    ap.add_argument("--compute-s", type=float, default=0.05, help="emulated compute per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    s = Settings(
        peers=args.peers,
        duration_s=args.duration_s or (30.0 if args.quick else 600.0),
        interval_s=(3.0, 5.0) if args.quick else (20.0, 30.0),
        numel=args.numel,
        compute_s=args.compute_s,
        heartbeat_timeout_s=2.5,
        wedge_s=20.0,
        hang_s=30.0,
        seed=args.seed,
    )
    console = Console()
    chaos = Chaos(s, console)
    t0 = time.time()
    try:
        chaos.run()
    finally:
        chaos.stop_all()
    out = chaos.report(time.time() - t0)
    t = Table(title=f"chaos: {s.peers} peers, {s.duration_s:.0f} s")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, v in out.items():
        if key not in ("settings", "incidents"):
            t.add_row(key, json.dumps(v))
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
