"""`cotrain demo` (training): a master and N DiLoCo workers train a GPT on Shakespeare here.

Mid-run one worker is killed (SIGKILL) and a fresh one is started: it joins the ring, receives
the outer state from its peers and trains from the next outer step. A live table follows every
worker (on a terminal; otherwise one plain line per event). At the end the closing table, the
summary and the loss plot are built from the workers' own JSON-lines logs in ``out_dir``, so
every figure they show is one a log holds: the first validation loss any worker logged and the
final one, the largest rise between outer steps, where the victim stopped and the joiner
started, whether the joiner's outer-state hash equals the others' at every outer step from its
join and the final parameters are hash-equal, bytes sent, the share of time in inner steps.
The summary is also saved as ``summary.json`` and the curves as ``loss.png``.

The configuration (``DEMO_DEFAULTS``) is sized for a minute or two on a laptop: 240 steps, an
outer step every H = 10. Its outer optimizer is DiLoCo's Nesterov SGD with lr 0.7 but momentum
0.3, not the paper's 0.9, which is tuned for hundreds of outer steps of H = 500. Early
pseudo-gradients are large and point the same way (the model first learns the token
frequencies); Nesterov with 0.9 applies 1.9 x 0.7 = 1.33 of the first one at once and
re-applies 0.57 of it at the second outer step on top of the second one, so the consensus
model overshoots: with the former configuration (160 steps, H = 20, momentum 0.9) the
validation loss went 6.25 -> 6.58 at outer step 2 and ended at 5.89 (x0.94), barely below the
frequencies-only plateau near 5.9. With momentum 0.3 (a step of about one pseudo-gradient) and
H = 10 it falls at every outer step: 6.87 -> 5.10 (x0.74; 5.19 at step 160).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cotrain.diloco.config import TrainConfig
from cotrain.launch.procs import Proc, start_master, start_worker

DEMO_DEFAULTS: dict[str, Any] = {
    "total_steps": 240,
    "out_dir": "runs/demo",
    "log_every_steps": 5,
    "model": {"size": "custom", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128},
    "data": {"seq_len": 64, "batch_size": 8, "val_batches": 8},
    "inner": {"lr": 3e-3, "warmup_steps": 20},
    "algo": {
        "mode": "diloco",
        "inner_steps": 10,
        "quantization": "int8",
        "outer": {"lr": 0.7, "momentum": 0.3, "method": "nesterov"},
    },
    "comm": {"heartbeat_interval_s": 0.3},
}
"""The workers' config: 4 workers x 240 steps of 8 x 64 tokens, an outer step every 10."""

DEFAULT_WORKERS = 4
QUICK_STEPS = 120
"""``--quick``: 120 steps (12 outer steps) with 2 workers, about 30 s on 2 idle cores."""
QUICK_WORKERS = 2

_DEMO_FILES = re.compile(
    r"(worker\d+(\.jsonl|\.ckpt)?|config\d+\.json|run\.json|loss\.png|summary\.json)"
)


def _pairs(args: Sequence[str]) -> list[str]:
    """``--key value`` and ``--flag`` -> ``--key=value`` and ``--flag=true``."""
    out: list[str] = []
    items = list(args)
    while items:
        item = items.pop(0)
        if item.startswith("--") and "=" not in item:
            if items and not items[0].startswith("--"):
                item = f"{item}={items.pop(0)}"
            else:
                item = f"{item}=true"
        out.append(item)
    return out


def demo_config(
    overrides: Sequence[str],
    *,
    quick: bool = False,
    steps: int | None = None,
    out_dir: str | Path | None = None,
) -> TrainConfig:
    """The demo's worker config: ``DEMO_DEFAULTS`` (``--quick``: ``QUICK_STEPS`` steps), then
    ``steps`` and ``out_dir``, then the dotted ``overrides`` (``--total_steps=400``)."""
    from cotrain.core.config import apply_overrides

    data = copy.deepcopy(DEMO_DEFAULTS)
    if quick:
        data["total_steps"] = QUICK_STEPS
    if steps is not None:
        data["total_steps"] = steps
    if out_dir is not None:
        data["out_dir"] = str(out_dir)
    return TrainConfig.model_validate(apply_overrides(data, _pairs(overrides)))


# ---- the live view ------------------------------------------------------------------------------


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


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(views: dict[int, _View], title: str) -> Table:
    """One row per worker; fits 80 columns (only the note wraps)."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    cols = ("w", "status", "step", "outer", "loss", "val", "tok/s", "MiB", "peers", "hash")
    for col in cols:
        t.add_column(col, justify="left" if col in ("status", "hash") else "right", no_wrap=True)
    t.add_column("note", overflow="fold")
    for i, v in sorted(views.items()):
        t.add_row(
            f"w{i}",
            v.status,
            str(v.step),
            str(v.outer),
            _fmt(v.loss),
            _fmt(v.val),
            f"{v.tok_s:.0f}",
            f"{v.sent / 2**20:.2f}",
            str(v.world),
            v.digest[:6],
            v.note,
        )
    return t


def _absorb(v: _View, ev: dict[str, Any]) -> None:
    """Fold one of a worker's records into its row."""
    kind = ev.get("event")
    if kind == "prepare":
        v.status = "data"
    elif kind == "start":
        v.status = "connecting"
    elif kind == "joined":
        v.status, v.world, v.step = "training", ev["world"], ev.get("step", v.step)
    elif kind == "step":
        v.status = "training"
        v.step, v.loss, v.tokens, v.sent = ev["step"], ev["loss"], ev["tokens"], ev["bytes_sent"]
        v.world = ev["world"]
        now = ev["t"]
        if v.first_t is None:
            v.first_t = now - ev["compute_s"]
        v.tok_s = v.tokens / max(now - v.first_t, 1e-6)
    elif kind == "outer":
        v.outer, v.step, v.sent, v.world = (
            ev["outer_step"],
            ev["step"],
            ev["bytes_sent"],
            ev["world"],
        )
        v.digest, v.util = ev["hash"], ev["utilization"]
        if ev.get("val_loss") is not None:
            v.val = ev["val_loss"]
        if ev.get("fetched"):
            v.note = f"joined@{ev['outer_step']}"
    elif kind == "failed":
        v.note = "sync retried"
    elif kind == "done":
        v.status, v.step, v.sent = "done", ev["step"], ev["bytes_sent"]
        v.digest, v.util = ev["hash"], ev["utilization"]


def _event_line(i: int, ev: dict[str, Any]) -> str | None:
    """One plain line for a record worth a line outside a terminal (None for the others)."""
    kind = ev.get("event")
    if kind == "joined":
        return f"w{i} in the ring: rank {ev['rank']}, {ev['world']} workers, step {ev.get('step')}"
    if kind == "outer":
        got = "  (received the outer state)" if ev.get("fetched") else ""
        return (
            f"w{i} outer {ev['outer_step']:>3}  step {ev['step']:>4}  "
            f"loss {_fmt(ev['loss']):>5}  val {_fmt(ev['val_loss']):>5}  workers {ev['world']}  "
            f"sent {ev['bytes_sent'] / 2**20:6.2f} MiB  hash {ev['hash'][:8]}{got}"
        )
    if kind == "failed":
        return f"w{i} synchronisation at step {ev['step']} failed ({ev['error']}): retrying"
    if kind == "done":
        return f"w{i} done at step {ev['step']}: parameters hash {ev['hash'][:8]}"
    return None


# ---- the logs -----------------------------------------------------------------------------------


def read_logs(out: Path) -> dict[int, list[dict[str, Any]]]:
    """Every worker's records (``worker<i>.jsonl`` in ``out``), by worker index."""
    from cotrain.diloco.metrics import read_log

    logs = {}
    for path in out.glob("worker*.jsonl"):
        m = re.fullmatch(r"worker(\d+)\.jsonl", path.name)
        if m:
            logs[int(m.group(1))] = read_log(path)
    return dict(sorted(logs.items()))


def _of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == kind]


def summarize(logs: dict[int, list[dict[str, Any]]], *, victim: int, joiner: int) -> dict[str, Any]:
    """The run's figures, each read from the logs.

    * validation: the consensus model's loss per outer step (every worker that logged an outer
      step logged the same value); ``first_val_*`` is the first (lowest step) any worker
      logged, ``final_val_*`` the last outer step's; ``max_val_rise`` the largest increase
      between consecutive logged outer steps (0: it never rose).
    * ``victim_last_step``: the last step the killed worker logged; ``joiner_outer`` /
      ``joiner_step``: the outer step the joiner received and the step it trained from.
    * ``joiner_hash_matches``: at every outer step the joiner logged, every other worker that
      logged it reports the same outer-state hash (and at least one did);
      ``final_hash_equal``: every worker that finished reports the same parameters hash.
    * ``bytes_sent``: per worker, from its last record; ``sent_whole_run``: the mean of
      those of the workers that ran the whole run (``whole_run``: finishers but the joiner);
      ``compute_share``: the finishers' mean of ``compute_s / wall_s`` (``done`` records).
    """
    vals: list[tuple[int, int, float]] = []  # (step, outer step, val)
    for recs in logs.values():
        vals += [
            (r["step"], r["outer_step"], r["val_loss"])
            for r in _of(recs, "outer")
            if r.get("val_loss") is not None
        ]
    curve: dict[int, tuple[int, float]] = {}
    for step, k, val in sorted(vals):
        curve.setdefault(k, (step, val))
    outers = sorted(curve)
    first = min(vals) if vals else None
    final = (outers[-1], *curve[outers[-1]]) if outers else None
    rise, rise_at = 0.0, None
    for a, b in itertools.pairwise(outers):
        up = curve[b][1] - curve[a][1]
        if up > rise:
            rise, rise_at = up, b
    hashes: dict[int, dict[int, str]] = {
        i: {r["outer_step"]: r["hash"] for r in _of(recs, "outer")} for i, recs in logs.items()
    }
    j_outer = _of(logs.get(joiner, []), "outer")
    j_first = j_outer[0] if j_outer else None
    others = [h for i, h in hashes.items() if i != joiner]
    matched = 0
    same = j_first is not None
    for k, digest in hashes.get(joiner, {}).items():
        for h in others:
            if k in h:
                matched += 1
                same = same and h[k] == digest
    done = {i: _of(recs, "done")[-1] for i, recs in logs.items() if _of(recs, "done")}
    finals = {d["hash"] for d in done.values()}
    sent = {}
    for i, recs in logs.items():
        with_bytes = [r for r in recs if "bytes_sent" in r]
        sent[i] = with_bytes[-1]["bytes_sent"] if with_bytes else 0
    steps_of_victim = [
        r["step"] for r in logs.get(victim, []) if r.get("event") in ("step", "outer")
    ]
    whole = [i for i in done if i != joiner]  # in the run from its start to its end
    # compute_s / wall_s of each finisher: the share of its time spent in inner steps
    # (validation counts as not computing)
    share = [d["compute_s"] / d["wall_s"] for d in done.values() if d["wall_s"] > 0]
    return {
        "workers": sorted(logs),
        "finished": sorted(done),
        "first_val_loss": first[2] if first else None,
        "first_val_step": first[0] if first else None,
        "first_val_outer": first[1] if first else None,
        "final_val_loss": final[2] if final else None,
        "final_val_step": final[1] if final else None,
        "final_val_outer": final[0] if final else None,
        "val_ratio": final[2] / first[2] if first and final else None,
        "val_curve": [[k, *curve[k]] for k in outers],
        "max_val_rise": rise,
        "max_val_rise_outer": rise_at,
        "victim": victim,
        "victim_last_step": max(steps_of_victim) if steps_of_victim else None,
        "joiner": joiner,
        "joiner_outer": j_first["outer_step"] if j_first else None,
        "joiner_step": j_first["step"] if j_first else None,
        "joiner_fetched": bool(j_first and j_first.get("fetched")),
        "joiner_hash_matches": bool(same and matched > 0),
        "joiner_hash_compared": matched,
        "final_hash_equal": len(done) > 1 and len(finals) == 1,
        "final_hash": next(iter(finals)) if len(finals) == 1 else None,
        "bytes_sent": {str(i): n for i, n in sent.items()},
        "whole_run": whole,
        "sent_whole_run": sum(sent[i] for i in whole) / len(whole) if whole else None,
        "compute_share": sum(share) / len(share) if share else None,
    }


def plot(
    logs: dict[int, list[dict[str, Any]]], summary: dict[str, Any], path: Path, *, title: str
) -> None:
    """The consensus validation loss (bold, one curve: every worker validates the same outer
    params) over each worker's training loss (faint, one legend entry each), against the
    inner step; dashed lines where the victim stopped and the joiner started."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    victim, joiner = summary["victim"], summary["joiner"]
    fig, ax = plt.subplots(figsize=(11.5, 5))
    colors: dict[int, str] = {}
    for i, recs in logs.items():
        pts = [(r["step"], r["loss"]) for r in _of(recs, "step")]
        if not pts:
            continue
        label = f"w{i} training loss"
        if i == victim and summary["victim_last_step"] is not None:
            label += f" (killed after step {summary['victim_last_step']})"
        if i == joiner and summary["joiner_step"] is not None:
            label += f" (from step {summary['joiner_step']})"
        xs, ys = zip(*pts, strict=True)
        (line,) = ax.plot(xs, ys, lw=0.9, alpha=0.5, label=label)
        colors[i] = to_hex(line.get_color())
    curve = summary["val_curve"]
    if curve:
        _, vx, vy = zip(*curve, strict=True)
        ax.plot(vx, vy, "o-", color="black", lw=2.0, ms=4, label="validation loss (consensus)")
        at = {k: (x, y) for k, x, y in curve}
        if summary["joiner_outer"] in at:  # the model the joiner received
            x, y = at[summary["joiner_outer"]]
            ax.plot(
                x,
                y,
                "o",
                ms=11,
                mfc="none",
                mew=2,
                color=colors.get(joiner, "tab:red"),
                label=f"the model w{joiner} received (outer step {summary['joiner_outer']})",
            )
        for x, y in ((vx[0], vy[0]), (vx[-1], vy[-1])):
            ax.annotate(f"{y:.3f}", (x, y), xytext=(4, 6), textcoords="offset points", fontsize=9)
    marks = []
    if summary["victim_last_step"] is not None:
        marks.append((summary["victim_last_step"], f"w{victim} killed"))
    if summary["joiner_step"] is not None:
        marks.append((summary["joiner_step"], f"w{joiner} joins"))
    for step, label in marks:
        ax.axvline(step, ls="--", color="grey", lw=0.8)
        ax.text(step, 1.0, f" {label}", va="top", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xlabel("inner step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary_table(s: dict[str, Any]) -> Table:
    t = Table(
        title="summary (from the workers' logs)",
        box=box.SIMPLE,
        collapse_padding=True,
        show_header=False,
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    if s["first_val_loss"] is not None:
        initial = ": initial model" if s["first_val_step"] == 0 else ""
        t.add_row(
            f"val loss, first logged (outer {s['first_val_outer']}, step "
            f"{s['first_val_step']}{initial})",
            f"{s['first_val_loss']:.3f}",
        )
        t.add_row(
            f"val loss, final (outer {s['final_val_outer']}, step {s['final_val_step']})",
            f"{s['final_val_loss']:.3f} (x{s['val_ratio']:.2f})",
        )
        where = f" (outer {s['max_val_rise_outer']})" if s["max_val_rise_outer"] else ""
        t.add_row("largest val loss rise between outer steps", f"{s['max_val_rise']:+.3f}{where}")
    v, j = s["victim"], s["joiner"]
    t.add_row(f"w{v} killed (SIGKILL) after step", str(s["victim_last_step"]))
    if s["joiner_step"] is not None:
        t.add_row(
            f"w{j} received outer step {s['joiner_outer']}, trained from step",
            str(s["joiner_step"]),
        )
        t.add_row(
            f"w{j}'s outer-state hash = the others' ({s['joiner_hash_compared']} checks)",
            "yes" if s["joiner_hash_matches"] else "NO",
        )
    else:
        t.add_row(f"w{j} joined", "NO (not before the end)")
    finishers = " ".join(f"w{i}" for i in s["finished"])
    t.add_row(
        f"final parameters hash-equal: {finishers}",
        f"yes ({s['final_hash'][:8]})" if s["final_hash_equal"] else "NO",
    )
    if s["sent_whole_run"] is not None:
        whole = " ".join(f"w{i}" for i in s["whole_run"])
        t.add_row(f"MiB sent per worker, whole run ({whole})", f"{s['sent_whole_run'] / 2**20:.2f}")
    if s["compute_share"] is not None:
        t.add_row("time in inner steps (compute_s / wall_s)", f"{s['compute_share']:.1%}")
    t.add_row("wall time", f"{s['wall_s']:.0f} s")
    return t


# ---- the run ------------------------------------------------------------------------------------


def _clean(out: Path) -> None:
    """Remove a previous demo's files from ``out`` (logs, checkpoints, models, plot)."""
    for p in out.iterdir():
        if _DEMO_FILES.fullmatch(p.name):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def run_demo(
    base: TrainConfig,
    *,
    workers: int = DEFAULT_WORKERS,
    kill_outer: int | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Run the demo from ``base`` (a worker config); returns the summary (also written to
    ``out_dir/summary.json``). ``kill_outer``: the outer step after which the last worker is
    killed (default: a quarter of the run's outer steps, at least 1)."""
    from rich.progress import Progress

    from cotrain.data import prepare

    console = Console()
    plain = not console.is_terminal
    if plain:  # a file or a pipe: one line per event, the tables at full width
        console = Console(width=max(console.width, 150))
    out = Path(base.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    H = base.algo.inner_steps
    rounds = math.ceil(base.total_steps / H)
    if kill_outer is None:
        kill_outer = max(1, rounds // 4)
    if plain:
        data = prepare(base.data)
    else:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("preparing data", total=None)
            data = prepare(
                base.data,
                progress=lambda s, d, t: bar.update(task, description=s, completed=d, total=t),
            )
    outer = base.algo.outer
    console.print(
        f"data: {data.train_tokens:,} training tokens, vocabulary {data.vocab_size} "
        f"({', '.join(base.data.sources)}); {workers} workers x {base.total_steps} steps of "
        f"{base.data.batch_size}x{base.data.seq_len} tokens, an outer step every H={H} "
        f"({outer.method} lr {outer.lr} momentum {outer.momentum}), "
        f"{base.algo.quantization} pseudo-gradients; w{workers - 1} is killed after outer "
        f"step {kill_outer}; logs in {out}",
        soft_wrap=plain,
    )
    secret = secrets.token_hex(16)
    master, port = start_master(secret)
    procs: dict[int, Proc] = {}
    views: dict[int, _View] = {}

    def say(text: str) -> None:
        if plain:
            console.print(text, highlight=False, soft_wrap=True)

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
        say(f"w{i} started{' (joining the run in progress)' if join else ''}")

    for i in range(workers):
        launch(i, join=False)
    victim, joiner = workers - 1, workers
    killed = False
    t0 = time.monotonic()
    timed_out = True
    title = f"cotrain DiLoCo demo: {workers} workers on Shakespeare"
    live = None
    if not plain:  # the last frame goes when it stops: the table from the logs replaces it
        live = Live(_table(views, title), console=console, refresh_per_second=4, transient=True)
    try:
        if live is not None:
            live.start()
        while time.monotonic() - t0 < timeout_s:
            for i, p in list(procs.items()):
                while not p.events.empty():
                    ev = p.events.get_nowait()
                    if ev.get("event") == "__eof__":
                        p.events.put(ev)  # the reader's end mark: keep it for later readers
                        break
                    _absorb(views[i], ev)
                    line = _event_line(i, ev)
                    if line is not None:
                        say(line)
                if p.popen.poll() is not None and views[i].status not in ("done", "killed"):
                    rc = p.popen.returncode
                    views[i].status = "killed" if rc < 0 else f"exit {rc}"
                    say(f"w{i} ended: {views[i].status}")
            if not killed and views[victim].outer >= kill_outer:
                procs[victim].popen.kill()  # SIGKILL: no goodbye to the master or the ring
                killed = True
                views[victim].note = f"SIGKILL@{views[victim].outer}"
                say(f"w{victim} killed (SIGKILL) after outer step {views[victim].outer}")
                launch(joiner, join=True)
            if live is not None:
                live.update(_table(views, title))
            if all(p.popen.poll() is not None for p in procs.values()):
                timed_out = False
                break
            time.sleep(0.25)  # UI refresh cadence
    finally:
        if live is not None:
            live.stop()
        for p in procs.values():
            p.stop()
        master.stop()
    wall = time.monotonic() - t0
    if timed_out:
        console.print(f"[red]the run did not end within {timeout_s:.0f} s: stopped")
    for i, v in views.items():
        if v.status not in ("done", "killed"):
            tail = " | ".join(procs[i].lines[-3:])
            console.print(f"[red]w{i} ended as {v.status}: {tail}")

    logs = read_logs(out)
    final = {i: _View(status=views[i].status if i in views else "?") for i in logs}
    for i, recs in logs.items():
        for r in recs:
            _absorb(final[i], r)
        if i in views:  # done, killed, exit N: what the process did
            final[i].status = views[i].status
        if i == victim and killed:
            final[i].note = views[victim].note
    console.print(_table(final, f"{title}: the workers' logs"))
    summary = summarize(logs, victim=victim, joiner=joiner)
    summary.update(wall_s=wall, kill_outer=kill_outer, timed_out=timed_out)
    png, js = out / "loss.png", out / "summary.json"
    plot(
        logs,
        summary,
        png,
        title=f"DiLoCo on Shakespeare: {workers} workers, H={H}, w{victim} killed, w{joiner} joins",
    )
    js.write_text(json.dumps(summary, indent=1) + "\n")
    console.print(_summary_table(summary))
    console.print(f"loss curves: {png}\nsummary: {js}", highlight=False, soft_wrap=True)
    return summary
