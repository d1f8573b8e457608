"""DiLoCo against its baselines on the same token budget and seeds, in one run.

    python bench/diloco.py --quick                 # smoke run, under 3 minutes on 2 cores
    python bench/diloco.py --json diloco.json      # single, DDP (4), DiLoCo (4, H=50; int8, fp32)
    python bench/diloco.py --wan --json wan.json   # also DDP and DiLoCo (with and without
                                                   # overlap) with every worker in its own
                                                   # network namespace (root): 100 Mbit/s,
                                                   # 50 ms one-way between two workers

Every run trains the same GPT from the same seed on Shakespeare (real processes: a master and
``cotrain train`` workers). Equal tokens: DDP and DiLoCo workers take ``--steps`` steps of
``--batch`` sequences each; the single worker takes ``--steps`` steps of ``workers x batch``
(from its one shard). Warm start (the DiLoCo paper's protocol): one DDP run of
``--warm-steps`` steps is shared, DDP and DiLoCo both continue from its checkpoint, so bytes
and utilization cover the steps after it; tokens and the learning-rate schedule cover the run.
Printed: a table; written: ``--json`` rows (mode, quant, workers, inner_steps, tokens,
final_val_loss, bytes_sent_per_worker, utilization, wan, wall_s, ...) and ``--png`` loss curves.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cotrain.core.config import apply_overrides
from cotrain.data import prepare
from cotrain.diloco.config import TrainConfig
from cotrain.launch.procs import Proc, start_master, start_worker

SECRET = secrets.token_hex(16)
WAN_DATA_PORT = 47100


@dataclass
class Row:
    mode: str
    quant: str
    workers: int
    inner_steps: int
    tokens: int
    final_val_loss: float | None
    bytes_sent_per_worker: float
    utilization: float
    wan: bool
    overlap: bool
    fragments: int
    warm_start_steps: int
    """Steps of the shared DDP warm start this run continued from (0: from the seed)."""
    wall_s: float
    comm_s_per_worker: float
    blocked_s_per_worker: float
    """Overlap: time the inner loop stood still waiting for a background synchronisation."""
    steps: int
    inner_time_s: float | None = None
    """DiLoCo inner phases bounded by time (``--inner-time-s``) instead of H steps."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(tokens seen by all workers, validation loss) after each outer step."""


def base_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    width = args.width
    return {
        "total_steps": args.steps,
        "out_dir": str(out),
        "log_every_steps": 50,
        "checkpoint": "none",
        "resume": "never",
        "model": {
            "size": "custom",
            "n_layer": 2,
            "n_head": 4,
            "n_embd": width,
            "block_size": 128,
            "seed": args.seed,
        },
        "data": {
            "seq_len": args.seq_len,
            "batch_size": args.batch,
            "val_batches": 8,
            "seed": args.seed,
        },
        "inner": {"lr": args.lr, "warmup_steps": 20},
        "algo": {
            "inner_steps": args.inner_steps,
            "outer": {"lr": args.outer_lr, "momentum": args.outer_momentum},
        },
        "comm": {"heartbeat_interval_s": 0.5},
    }


def run_case(
    args: argparse.Namespace,
    console: Console,
    *,
    mode: str,
    quant: str,
    workers: int,
    wan: bool = False,
    overlap: bool = False,
    steps: int | None = None,
    extra: tuple[str, ...] = (),
    keep: Path | None = None,
) -> Row:
    out = keep or Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    cfg = base_config(args, out)
    over = [f"algo.mode={mode}", f"algo.quantization={quant}", *extra]
    if mode == "diloco":
        over += [f"algo.overlap={str(overlap).lower()}", f"algo.fragments={args.fragments}"]
        if args.inner_time_s:
            over.append(f"algo.inner_time_s={args.inner_time_s}")
    if steps is not None:
        over.append(f"total_steps={steps}")
    if mode == "single":
        over.append(f"data.batch_size={args.batch * args.workers}")
    if mode == "ddp":
        over.append(f"algo.ddp_vote_every_steps={args.inner_steps}")
    apply_overrides(cfg, over)
    t0 = time.perf_counter()
    procs: list[Proc] = []
    master = None
    net = None
    try:
        if mode == "single":
            procs.append(start_worker(TrainConfig.model_validate(cfg), SECRET))
        elif not wan:
            master, port = start_master(SECRET)
            for i in range(workers):
                c = apply_overrides(json.loads(json.dumps(cfg)), [f"comm.master_port={port}"])
                c.update(worker_index=i, world=workers)
                procs.append(start_worker(TrainConfig.model_validate(c), SECRET))
        else:
            from cotrain.netem import WanNetwork
            from cotrain.netem.netns import in_ns

            net = WanNetwork(workers + 1, rate_mbit=args.link_mbit, delay_ms=args.delay_ms)
            mhost = net.hosts[workers]
            master, port = start_master(SECRET, host=mhost.ip, wrapper=in_ns(mhost.name, []))
            for i, host in enumerate(net.hosts[:workers]):
                c = json.loads(json.dumps(cfg))
                c["comm"].update(
                    master_host=mhost.ip,
                    master_port=port,
                    listen_host=host.ip,
                    listen_port=WAN_DATA_PORT,
                )
                c.update(worker_index=i, world=workers)
                w = start_worker(
                    TrainConfig.model_validate(c), SECRET, wrapper=in_ns(host.name, [])
                )
                procs.append(w)
        for p in procs:
            p.popen.wait(args.timeout_s)
    finally:
        for p in procs:
            p.stop()
        if master is not None:
            master.stop()
        if net is not None:
            net.close()
    wall = time.perf_counter() - t0
    row = _row(
        procs,
        out,
        mode=mode,
        quant=quant,
        workers=workers,
        wan=wan,
        wall=wall,
        inner_steps=args.inner_steps,
        overlap=overlap and mode == "diloco",
        fragments=args.fragments if mode == "diloco" else 1,
        warm_start_steps=args.warm_steps if any("init_from" in x for x in extra) else 0,
        inner_time_s=args.inner_time_s,
    )
    if keep is None:
        shutil.rmtree(out, ignore_errors=True)
    console.print(
        f"done: {_label(row)}: val {row.final_val_loss}, "
        f"{row.bytes_sent_per_worker / 2**20:.2f} MiB/worker, util {row.utilization:.1%}, "
        f"{wall:.0f}s"
    )
    return row


def _row(procs: list[Proc], out: Path, **kw: Any) -> Row:
    from cotrain.diloco.metrics import read_log

    logs = [read_log(out / f"worker{i}.jsonl") for i in range(len(procs))]
    for p, log in zip(procs, logs, strict=True):
        if not any(r["event"] == "done" for r in log):
            raise RuntimeError(f"{p.name} did not finish: {' | '.join(p.lines[-6:])}")
    done = [next(r for r in log if r["event"] == "done") for log in logs]
    outer = [r for r in logs[0] if r["event"] == "outer" and r["val_loss"] is not None]
    n = len(procs)
    per_step = sum(d["tokens"] for d in done) / max(done[0]["step"], 1)
    return Row(
        mode=kw["mode"],
        quant=kw["quant"] if kw["mode"] != "single" else "-",
        workers=kw["workers"],
        inner_steps=kw["inner_steps"] if kw["mode"] == "diloco" else 1,
        tokens=sum(d["tokens"] for d in done),
        final_val_loss=outer[-1]["val_loss"] if outer else None,
        bytes_sent_per_worker=sum(d["bytes_sent"] for d in done) / n,
        utilization=sum(d["utilization"] for d in done) / n,
        wan=kw["wan"],
        overlap=kw["overlap"],
        fragments=kw["fragments"],
        warm_start_steps=kw["warm_start_steps"],
        wall_s=round(kw["wall"], 1),
        comm_s_per_worker=sum(d["comm_s"] + d["waiting_s"] for d in done) / n,
        blocked_s_per_worker=sum(d.get("blocked_s", 0.0) for d in done) / n,
        steps=done[0]["step"],
        inner_time_s=kw.get("inner_time_s") if kw["mode"] == "diloco" else None,
        curve=[(int(r["step"] * per_step), r["val_loss"]) for r in outer],
    )


def _label(r: Row) -> str:
    extra = (" overlap" if r.overlap else "") + (f" F={r.fragments}" if r.fragments > 1 else "")
    extra += f" T={r.inner_time_s:g}s" if r.inner_time_s else ""
    return f"{r.mode} {r.quant} x{r.workers}{extra}{' wan' if r.wan else ''}"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        if r.curve and not (r.wan and r.mode == "ddp"):
            xs, ys = zip(*r.curve, strict=True)
            ax.plot(xs, ys, "o-", ms=3, label=_label(r))
    ax.set_xlabel("tokens (all workers)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("DiLoCo vs DDP vs single worker, equal tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, few steps (< 3 min)")
    ap.add_argument("--wan", action="store_true", help="also --wan-cases in namespaces")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--png", type=Path, default=Path("diloco.png"), help="loss curves")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, help="steps per worker (default 800; quick 60)")
    ap.add_argument("--inner-steps", type=int, default=50, help="H")
    ap.add_argument(
        "--inner-time-s",
        type=float,
        default=None,
        help="DiLoCo cases: bound each inner phase by this many seconds instead of H steps\n"
        "(algo.inner_time_s: workers of unequal speed stop together; pseudo-gradients are\n"
        "weighted by tokens). The schedule still advances H steps per outer step.",
    )
    ap.add_argument("--batch", type=int, help="sequences per worker per step (8; quick 4)")
    ap.add_argument("--width", type=int, default=64, help="GPT n_embd (2 layers, 4 heads)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="inner (and DDP) AdamW peak lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outer-lr", type=float, default=0.6, help="DiLoCo outer (Nesterov) lr")
    ap.add_argument("--outer-momentum", type=float, default=0.7, help="DiLoCo outer momentum")
    ap.add_argument(
        "--warm-steps",
        type=int,
        help="DDP and DiLoCo continue from one DDP run of this many steps (the DiLoCo paper's "
        "warm start; default steps / 4 rounded to H, quick 0)",
    )
    ap.add_argument("--fragments", type=int, default=1, help="DiLoCo streaming fragments")
    ap.add_argument(
        "--cases",
        default="single,ddp,diloco-int8,diloco-none",
        help="comma-separated subset of single, ddp, diloco-int8, diloco-none, "
        "diloco-int8-overlap, diloco-none-overlap",
    )
    ap.add_argument(
        "--wan-cases",
        default="diloco-int8-overlap,diloco-int8,ddp",
        help="the cases run under --wan",
    )
    ap.add_argument("--link-mbit", type=float, default=100.0)
    ap.add_argument(
        "--delay-ms",
        type=float,
        default=25.0,
        help="one-way latency per host link (x2 host to host)",
    )
    ap.add_argument("--wan-ddp-steps", type=int, default=20, help="DDP steps under --wan")
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    args = ap.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 800)
    args.batch = args.batch or (4 if args.quick else 8)
    if args.warm_steps is None:
        args.warm_steps = (
            0 if args.quick else args.steps // 4 // args.inner_steps * args.inner_steps
        )
    console = Console()
    cfg = TrainConfig.model_validate(base_config(args, Path("unused")))
    data = prepare(cfg.data, progress=lambda s, d, t: None)
    console.print(
        f"data: {data.train_tokens:,} tokens; {args.workers} workers, H={args.inner_steps}"
    )
    n = args.workers
    cases = {
        "single": ("single", "none", 1, False),
        "ddp": ("ddp", "none", n, False),
        "diloco-int8": ("diloco", "int8", n, False),
        "diloco-none": ("diloco", "none", n, False),
        "diloco-int8-overlap": ("diloco", "int8", n, True),
        "diloco-none-overlap": ("diloco", "none", n, True),
    }
    chosen = [c for c in args.cases.split(",") if c]
    wan_chosen = [c for c in args.wan_cases.split(",") if c] if args.wan else []
    if unknown := [c for c in (*chosen, *wan_chosen) if c not in cases]:
        ap.error(f"unknown cases {unknown}; choose from {', '.join(cases)}")
    rows = []
    warm: tuple[str, ...] = ()
    if args.warm_steps and any(cases[c][0] != "single" for c in chosen):
        # The shared first steps: one DDP run stopped at warm_steps (its lr schedule is the
        # full run's); DDP and DiLoCo both continue from its checkpoint.
        warm_dir = Path(tempfile.mkdtemp(prefix="bench-warm-"))
        run_case(
            args,
            console,
            mode="ddp",
            quant="none",
            workers=n,
            extra=(f"stop_at_step={args.warm_steps}", "checkpoint=outer"),
            keep=warm_dir,
        )
        warm = (f"init_from={warm_dir / 'worker0.ckpt'}",)
    if args.wan:
        from cotrain.netem import netns_unavailable_reason

        if reason := netns_unavailable_reason():
            console.print(f"[yellow]skipping --wan: {reason}")
            wan_chosen = []
    # the loopback cases continue from the warm start; the WAN ones start cold (DDP runs fewer
    # steps there: each one waits on the link)
    for name, wan in [(c, False) for c in chosen] + [(c, True) for c in wan_chosen]:
        mode, quant, workers, overlap = cases[name]
        rows.append(
            run_case(
                args,
                console,
                mode=mode,
                quant=quant,
                workers=workers,
                wan=wan,
                overlap=overlap,
                steps=args.wan_ddp_steps if wan and mode == "ddp" else None,
                extra=warm if not wan and mode != "single" else (),
            )
        )
    table = Table(title=f"DiLoCo benchmark ({args.steps} steps per worker, equal tokens)")
    cols = ("mode", "quant", "workers", "H", "F", "overlap", "tokens", "val loss")
    for col in (*cols, "MiB sent/worker", "utilization", "wan", "wall s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.mode,
            r.quant,
            str(r.workers),
            str(r.inner_steps),
            str(r.fragments),
            "yes" if r.overlap else "no",
            f"{r.tokens:,}",
            "-" if r.final_val_loss is None else f"{r.final_val_loss:.4f}",
            f"{r.bytes_sent_per_worker / 2**20:.2f}",
            f"{r.utilization:.1%}",
            "yes" if r.wan else "no",
            f"{r.wall_s:.0f}",
        )
    console.print(table)
    ddp = next((r for r in rows if r.mode == "ddp" and not r.wan), None)
    for r in rows if ddp is not None else []:
        if r.mode == "diloco" and not r.wan and ddp and ddp.final_val_loss and r.final_val_loss:
            console.print(
                f"{_label(r)}: val loss {r.final_val_loss / ddp.final_val_loss:.3f} x DDP's, "
                f"{ddp.bytes_sent_per_worker / max(r.bytes_sent_per_worker, 1):.0f} x fewer bytes"
            )
    plot(rows, args.png)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
