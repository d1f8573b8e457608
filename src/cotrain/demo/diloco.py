"""`cotrain demo` (training): a master and N DiLoCo workers train a GPT on Shakespeare here.

Mid-run one worker is killed (SIGKILL) and a fresh one is started: it joins the ring, receives
the outer state from its peers and trains from the next outer step. A live table follows every
worker; at the end a summary (final validation loss, bytes, utilization, whether the joiner's
parameters hash equal to the others') is printed and the loss curves are saved as a PNG.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cotrain.diloco.config import TrainConfig
from cotrain.launch.procs import Proc, start_master, start_worker


@dataclass
class _View:
    status: str = "starting"
    step: int = 0
    outer: int = 0
    loss: float | None = None
    val: float | None = None
    tokens: int = 0
    sent: int = 0
    world: int = 0
    digest: str = ""
    util: float = 0.0
    tok_s: float = 0.0
    note: str = ""
    first_t: float | None = None
    steps: list[tuple[int, float]] = field(default_factory=list)
    vals: list[tuple[int, float]] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)
    val_by_outer: dict[int, float] = field(default_factory=dict)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(views: dict[int, _View], title: str) -> Table:
    t = Table(title=title)
    cols = ("w", "status", "step", "outer", "loss", "val", "tok/s", "KiB out")
    for col in (*cols, "peers", "hash", "note"):
        t.add_column(col, justify="left" if col in ("status", "hash", "note") else "right")
    for i, v in sorted(views.items()):
        t.add_row(
            f"w{i}",
            v.status,
            str(v.step),
            str(v.outer),
            _fmt(v.loss),
            _fmt(v.val),
            f"{v.tok_s:.0f}",
            f"{v.sent / 1024:.0f}",
            str(v.world),
            v.digest[:8],
            v.note,
        )
    return t


def _absorb(v: _View, ev: dict[str, Any]) -> None:
    kind = ev.get("event")
    if kind == "prepare":
        v.status = "data"
    elif kind == "start":
        v.status = "connecting"
    elif kind == "joined":
        v.status, v.world = "training", ev["world"]
    elif kind == "step":
        v.status = "training"
        v.step, v.loss, v.tokens, v.sent = ev["step"], ev["loss"], ev["tokens"], ev["bytes_sent"]
        v.world = ev["world"]
        now = ev["t"]
        if v.first_t is None:
            v.first_t = now - ev["compute_s"]
        v.tok_s = v.tokens / max(now - v.first_t, 1e-6)
        v.steps.append((ev["step"], ev["loss"]))
    elif kind == "outer":
        v.outer, v.step, v.sent, v.world = (
            ev["outer_step"],
            ev["step"],
            ev["bytes_sent"],
            ev["world"],
        )
        v.digest, v.util = ev["hash"], ev["utilization"]
        v.hashes[ev["outer_step"]] = ev["hash"]
        if ev.get("val_loss") is not None:
            v.val = ev["val_loss"]
            v.vals.append((ev["step"], ev["val_loss"]))
            v.val_by_outer[ev["outer_step"]] = ev["val_loss"]
        if ev.get("fetched"):
            v.note = f"got state @outer {ev['outer_step']}"
    elif kind == "failed":
        v.note = "peer lost: retrying"
    elif kind == "done":
        v.status = "done"


def plot(views: dict[int, _View], path: Path, *, events: list[tuple[int, str]]) -> None:
    """Training loss (thin) and validation loss (dots) per worker against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, v in sorted(views.items()):
        if v.steps:
            xs, ys = zip(*v.steps, strict=True)
            (line,) = ax.plot(xs, ys, lw=0.8, alpha=0.6, label=f"w{i} train")
            if v.vals:
                vx, vy = zip(*v.vals, strict=True)
                ax.plot(vx, vy, "o-", ms=3, color=line.get_color(), label=f"w{i} val")
    for step, label in events:
        ax.axvline(step, ls="--", color="grey", lw=0.8)
        ax.text(step, ax.get_ylim()[1], f" {label}", va="top", fontsize=8)
    ax.set_xlabel("inner step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("DiLoCo on Shakespeare: a worker killed, a fresh one joins")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    base: TrainConfig,
    *,
    workers: int,
    kill_outer: int,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Run the demo from ``base`` (a worker config); returns the summary."""
    from rich.progress import Progress

    from cotrain.data import prepare

    console = Console()
    out = Path(base.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in (*out.glob("worker*.jsonl"), *out.glob("worker*.ckpt")):
        old.unlink()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("preparing data", total=None)
        data = prepare(
            base.data,
            progress=lambda s, d, t: bar.update(task, description=s, completed=d, total=t),
        )
    console.print(
        f"data: {data.train_tokens:,} training tokens, vocabulary {data.vocab_size} "
        f"({', '.join(base.data.sources)}); {workers} workers, H={base.algo.inner_steps}, "
        f"{base.algo.quantization} pseudo-gradients"
    )
    secret = secrets.token_hex(16)
    master, port = start_master(secret)
    procs: dict[int, Proc] = {}
    views: dict[int, _View] = {}

    def launch(i: int, join: bool) -> None:
        cfg = base.model_copy(
            update={
                "comm": base.comm.model_copy(update={"master_port": port}),
                "worker_index": i,
                "world": workers,
                "join": "join" if join else "start",
                "resume": "never",
            }
        )
        procs[i] = start_worker(cfg, secret)
        views[i] = _View(status="joining" if join else "starting")

    for i in range(workers):
        launch(i, join=False)
    victim, joiner = workers - 1, workers
    events: list[tuple[int, str]] = []
    killed_at = joined_at = None
    t0 = time.time()
    title = f"cotrain DiLoCo demo: {workers} workers on Shakespeare"
    try:
        with Live(_table(views, title), console=console, refresh_per_second=4) as live:
            while time.time() - t0 < timeout_s:
                for i, p in list(procs.items()):
                    while not p.events.empty():
                        _absorb(views[i], p.events.get_nowait())
                    if p.popen.poll() is not None and views[i].status not in ("done", "killed"):
                        rc = p.popen.returncode
                        views[i].status = "killed" if rc < 0 else f"exit {rc}"
                if killed_at is None and views[victim].outer >= kill_outer:
                    procs[victim].popen.kill()  # SIGKILL: no goodbye to the master or the ring
                    killed_at = views[victim].step
                    views[victim].note = f"SIGKILL @step {killed_at}"
                    events.append((killed_at, f"w{victim} killed"))
                    launch(joiner, join=True)
                if joined_at is None and views.get(joiner) and views[joiner].outer > 0:
                    joined_at = views[joiner].step
                    events.append((joined_at, f"w{joiner} joined"))
                live.update(_table(views, title))
                if all(p.popen.poll() is not None for p in procs.values()):
                    break
                time.sleep(0.25)  # UI refresh cadence
    finally:
        for p in procs.values():
            p.stop()
        master.stop()
    wall = time.time() - t0
    for i, v in views.items():
        if v.status not in ("done", "killed"):
            tail = " | ".join(procs[i].lines[-3:])
            console.print(f"[red]w{i} ended as {v.status}: {tail}")
    png = out / "loss.png"
    plot(views, png, events=events)
    return _summary(console, views, workers, victim, joiner, wall, png)


def _summary(
    console: Console,
    views: dict[int, _View],
    workers: int,
    victim: int,
    joiner: int,
    wall: float,
    png: Path,
) -> dict[str, Any]:
    live = [v for i, v in views.items() if i != victim]
    j = views.get(joiner)
    first = min(j.hashes) if j is not None and j.hashes else None
    same = (
        j is not None
        and first is not None
        and all(v.hashes.get(first) == j.hashes[first] for v in live if v is not j)
    )
    first_val = min((x for v in live for x in v.vals), default=None)
    finals = [v.val for v in live if v.val is not None]
    final_val = min(finals) if finals else None
    # The loss across the join: the outer step where the joiner received the state (it
    # contributes nothing there) and the next one (its first contribution, fresh AdamW state).
    rise = 0.0
    for v in live:
        by_outer = v.val_by_outer
        for k in (first, (first or 0) + 1):
            if k is not None and k in by_outer and k - 1 in by_outer:
                rise = max(rise, by_outer[k] - by_outer[k - 1])
    sent = sum(v.sent for v in live) / max(len(live), 1)
    util = sum(v.util for v in live) / max(len(live), 1)
    summary = {
        "workers": workers,
        "final_val_loss": final_val,
        "first_val_loss": first_val[1] if first_val else None,
        "joiner_hash_matches": same,
        "val_rise_across_join": rise,
        "bytes_sent_per_worker": sent,
        "utilization": util,
        "wall_s": wall,
        "plot": str(png),
    }
    t = Table(title="summary")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row(
        "validation loss (first -> final)",
        f"{_fmt(first_val[1] if first_val else None)} -> {_fmt(final_val)}",
    )
    t.add_row(
        f"w{victim} killed, w{joiner} joined; joiner's hash = others' after its first outer step",
        "yes" if same else "NO",
    )
    t.add_row("validation loss rise across the join (0 = none)", f"{rise:+.3f}")
    t.add_row("bytes sent per worker", f"{sent / 2**20:.2f} MiB")
    t.add_row("compute utilization (mean)", f"{util:.1%}")
    t.add_row("wall time", f"{wall:.0f} s")
    t.add_row("loss curves", str(png))
    console.print(t)
    return summary


DEMO_DEFAULTS: dict[str, Any] = {
    "total_steps": 160,
    "out_dir": "runs/demo",
    "log_every_steps": 5,
    "model": {"size": "custom", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128},
    "data": {"seq_len": 64, "batch_size": 8, "val_batches": 4},
    "algo": {"mode": "diloco", "inner_steps": 20, "quantization": "int8"},
    "comm": {"heartbeat_interval_s": 0.3},
}


def demo_config(overrides: list[str]) -> TrainConfig:
    """The demo's worker config: ``DEMO_DEFAULTS`` plus dotted overrides."""
    import copy

    from cotrain.core.config import apply_overrides

    return TrainConfig.model_validate(apply_overrides(copy.deepcopy(DEMO_DEFAULTS), overrides))
