"""DiLoCo against its baselines on the same token budget and seeds, in one run.

    python bench/diloco.py --quick                 # smoke run, under 3 minutes on 2 cores
    python bench/diloco.py --json diloco.json      # single, DDP (4), DiLoCo (4, H=50; int8, fp32)
    python bench/diloco.py --wan --json wan.json   # also DDP and DiLoCo (with and without
                                                   # overlap) with every worker in its own
                                                   # network namespace (root): 100 Mbit/s,
                                                   # 50 ms one-way between two workers

    python bench/diloco.py --model hf-small        # a Hugging Face model (a small Llama with
                                                   # SmolLM2's tokenizer, random init): DDP (4)
                                                   # against DiLoCo int8 (4); --quick: smoke run
    python bench/diloco.py --model hf-smollm2      # SmolLM2-135M fine-tuned from its pretrained
                                                   # weights (no warm start). CPU: 12-20 s per
                                                   # 8 x 64-token step on one core, and a DiLoCo
                                                   # worker holds ~6 GB (4 need > 23 GB)

Every run trains the same model from the same seed on Shakespeare (real processes: a master and
``cotrain train`` workers); a Hugging Face model reads it through its own tokenizer. Equal
tokens: DDP and DiLoCo workers take ``--steps`` steps of ``--batch`` sequences each; the single
worker takes ``--steps`` steps of ``workers x batch`` (from its one shard). All cases use the
same validation windows. Warm start (the DiLoCo paper's protocol): one DDP run of
``--warm-steps`` steps is shared, DDP and DiLoCo both continue from its checkpoint, so bytes
and utilization cover the steps after it; tokens and the learning-rate schedule cover the run.
Printed: a table; written: ``--json`` rows (model, mode, quant, workers, inner_steps, tokens,
final_val_loss, bytes_sent_per_worker, utilization, wan, wall_s, val_loss_vs_ddp,
bytes_fewer_than_ddp, ...) and ``--png`` loss curves. The ratios compare each row with the
loopback DDP row of the same run (target for DiLoCo int8: val loss <= 1.05x DDP's with >= 100x
fewer bytes sent per worker).
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
VAL_BATCHES = 8
"""Validation set: this many batches of ``--batch`` sequences (the same windows in every case)."""


@dataclass(frozen=True)
class Defaults:
    """A model's defaults (pairs: full run, ``--quick``)."""

    steps: tuple[int, int]
    batch: tuple[int, int]
    inner_steps: tuple[int, int]
    lr: float
    outer_lr: float
    outer_momentum: float
    warm_fraction: float
    """Warm start: this fraction of the steps (rounded down to H; none under --quick)."""
    cases: str


DEFAULTS = {
    # gpt: outer lr and momentum chosen by an in-process sweep (README). hf-small: the GPT's
    # settings, untuned; H = 30 because int8 pseudo-gradients every H steps against fp32
    # gradients every step send ~4H x fewer bytes (>= 100x needs H >= 26); 180 steps with a
    # 60-step warm start take 7-10 min on 2 cores (a step costs ~8x the GPT's: the 49,152-token
    # vocabulary). hf-smollm2: the paper's outer settings and a fine-tuning lr, not measured
    # here (too slow and too large for 4 workers on a 2-core, 23 GB machine).
    "gpt": Defaults(
        (800, 60), (8, 4), (50, 50), 3e-3, 0.6, 0.7, 0.25, "single,ddp,diloco-int8,diloco-none"
    ),
    "hf-small": Defaults((180, 24), (8, 4), (30, 8), 3e-3, 0.6, 0.7, 1 / 3, "ddp,diloco-int8"),
    "hf-smollm2": Defaults((60, 6), (4, 1), (20, 3), 5e-5, 0.7, 0.9, 0.0, "ddp,diloco-int8"),
}


@dataclass
class Row:
    model: str
    """What was trained: "gpt-64x2" (cotrain's GPT, width x layers), "hf-small-llama-64x2",
    "hf-smollm2"."""
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
    val_loss_vs_ddp: float | None = None
    """final_val_loss / the loopback DDP row's (1.0 for that row; None without one)."""
    bytes_fewer_than_ddp: float | None = None
    """The loopback DDP row's bytes_sent_per_worker / this row's (None when nothing was sent)."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(tokens seen by all workers, validation loss) after each outer step."""


def model_name(args: argparse.Namespace) -> str:
    if args.model == "gpt":
        return f"gpt-{args.width}x{args.layers}"
    if args.model == "hf-small":
        return f"hf-small-llama-{args.width}x{args.layers}"
    return "hf-smollm2"


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "gpt":
        return {
            "size": "custom",
            "n_layer": args.layers,
            "n_head": 4,
            "n_embd": args.width,
            "block_size": 128,
            "seed": args.seed,
        }
    # hf-small: the directory main() wrote with write_small_hf_model (config and tokenizer,
    # no weights); hf-smollm2: the pretrained weights
    return {
        "kind": "hf",
        "path": args.model_path,
        "init": "random" if args.model == "hf-small" else "pretrained",
        "seed": args.seed,
    }


def base_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {
        "total_steps": args.steps,
        "out_dir": str(out),
        "log_every_steps": 50,
        "checkpoint": "none",
        "resume": "never",
        "save_model": False,
        "model": model_config(args),
        "data": {
            "sources": [args.source],
            "seq_len": args.seq_len,
            "batch_size": args.batch,
            "val_batches": VAL_BATCHES,
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
    out = keep or Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=args.work))  # removed by main
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
        if VAL_BATCHES % args.workers == 0:
            # the same validation windows as the others: VAL_BATCHES x batch sequences
            over.append(f"data.val_batches={VAL_BATCHES // args.workers}")
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
        model=model_name(args),
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
        model=kw["model"],
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
    ax.set_title(f"{rows[0].model if rows else ''}: DiLoCo vs DDP vs single worker, equal tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, few steps (< 3 min)")
    ap.add_argument(
        "--model",
        choices=sorted(DEFAULTS),
        default="gpt",
        help="gpt: cotrain's GPT (--width x --layers); hf-small: a Llama-architecture Hugging\n"
        "Face model of --width x --layers with SmolLM2's tokenizer (write_small_hf_model),\n"
        "random init; hf-smollm2: SmolLM2-135M-Instruct from its pretrained weights",
    )
    ap.add_argument(
        "--source",
        default="shakespeare",
        help="data.sources: a built-in text (shakespeare, kjv) or a local .txt/.jsonl/dir",
    )
    ap.add_argument("--wan", action="store_true", help="also --wan-cases in namespaces")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--png", type=Path, default=Path("diloco.png"), help="loss curves")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, help="steps per worker (gpt 800, quick 60; DEFAULTS)")
    ap.add_argument("--inner-steps", type=int, help="H (gpt 50)")
    ap.add_argument(
        "--inner-time-s",
        type=float,
        default=None,
        help="DiLoCo cases: bound each inner phase by this many seconds instead of H steps\n"
        "(algo.inner_time_s: workers of unequal speed stop together; pseudo-gradients are\n"
        "weighted by tokens). The schedule still advances H steps per outer step.",
    )
    ap.add_argument("--batch", type=int, help="sequences per worker per step (gpt 8; quick 4)")
    ap.add_argument("--width", type=int, default=64, help="gpt, hf-small: hidden size (4 heads)")
    ap.add_argument("--layers", type=int, default=2, help="gpt, hf-small: layers")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, help="inner (and DDP) AdamW peak lr (gpt 3e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outer-lr", type=float, help="DiLoCo outer (Nesterov) lr (gpt 0.6)")
    ap.add_argument("--outer-momentum", type=float, help="DiLoCo outer momentum (gpt 0.7)")
    ap.add_argument(
        "--warm-steps",
        type=int,
        help="DDP and DiLoCo continue from one DDP run of this many steps (the DiLoCo paper's "
        "warm start;\ngpt, hf-small: steps / 4 rounded to H, quick 0; hf-smollm2: 0, it starts "
        "pretrained)",
    )
    ap.add_argument("--fragments", type=int, default=1, help="DiLoCo streaming fragments")
    ap.add_argument(
        "--cases",
        help="comma-separated subset of single, ddp, diloco-int8, diloco-none, "
        "diloco-int8-overlap, diloco-none-overlap\n(gpt: single,ddp,diloco-int8,diloco-none; "
        "hf-*: ddp,diloco-int8)",
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
    d = DEFAULTS[args.model]
    q = int(args.quick)
    for key, value in (
        ("steps", d.steps[q]),
        ("batch", d.batch[q]),
        ("inner_steps", d.inner_steps[q]),
        ("lr", d.lr),
        ("outer_lr", d.outer_lr),
        ("outer_momentum", d.outer_momentum),
        ("cases", d.cases),
    ):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warm_steps is None:
        warm = 0 if args.quick else int(args.steps * d.warm_fraction)
        args.warm_steps = warm // args.inner_steps * args.inner_steps
    work = Path(tempfile.mkdtemp(prefix="bench-diloco-"))
    try:
        return run(args, ap, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, ap: argparse.ArgumentParser, work: Path) -> int:
    args.work = work
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # the table's columns in a log file
    tokenizer_file = None
    args.model_path = None
    if args.model == "hf-small":
        from cotrain.models.train import write_small_hf_model

        args.model_path = str(
            write_small_hf_model(
                work / "model", hidden_size=args.width, layers=args.layers, heads=4
            )
        )
        tokenizer_file = Path(args.model_path) / "tokenizer.json"
    elif args.model == "hf-smollm2":
        from cotrain.models import hf

        args.model_path = "smollm2"
        tokenizer_file = hf.smollm2_dir() / "tokenizer.json"
    cfg = TrainConfig.model_validate(base_config(args, Path("unused")))
    # prepared once here (the workers then find it in the cache), with the model's tokenizer
    data = prepare(cfg.data, tokenizer_file=tokenizer_file, progress=lambda s, d, t: None)
    console.print(
        f"{model_name(args)} on {args.source}: {data.train_tokens:,} training tokens "
        f"(vocabulary {data.vocab_size:,}); {args.workers} workers x {args.batch} x "
        f"{args.seq_len} tokens per step, {args.steps} steps, H={args.inner_steps}, "
        f"lr {args.lr:g}, outer lr {args.outer_lr:g} momentum {args.outer_momentum:g}, "
        f"warm start {args.warm_steps} steps"
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
        warm_dir = work / "warm"
        run_case(
            args,
            console,
            mode="ddp",
            quant="none",
            workers=n,
            extra=(f"stop_at_step={args.warm_steps}", "checkpoint=outer"),
            keep=warm_dir,
        )
        warm = (f"init_from={warm_dir}",)  # its worker0/checkpoint
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
    ddp = next((r for r in rows if r.mode == "ddp" and not r.wan), None)
    # loopback rows only: the WAN ones start cold and their DDP runs fewer steps
    for r in [r for r in rows if not r.wan] if ddp is not None else []:
        assert ddp is not None
        if r.final_val_loss is not None and ddp.final_val_loss:
            r.val_loss_vs_ddp = round(r.final_val_loss / ddp.final_val_loss, 4)
        if r.bytes_sent_per_worker > 0:
            r.bytes_fewer_than_ddp = round(ddp.bytes_sent_per_worker / r.bytes_sent_per_worker, 1)
    table = Table(
        title=f"DiLoCo benchmark: {model_name(args)}, {args.steps} steps per worker, equal tokens"
    )
    cols = ("mode", "quant", "workers", "H", "F", "overlap", "tokens", "val loss")
    more = ("val x DDP", "MiB sent/worker", "x fewer bytes", "utilization", "wan", "wall s")
    for col in (*cols, *more):
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
            "-" if r.val_loss_vs_ddp is None else f"{r.val_loss_vs_ddp:.3f}",
            f"{r.bytes_sent_per_worker / 2**20:.2f}",
            "-" if r.bytes_fewer_than_ddp is None else f"{r.bytes_fewer_than_ddp:.0f}",
            f"{r.utilization:.1%}",
            "yes" if r.wan else "no",
            f"{r.wall_s:.0f}",
        )
    console.print(table)
    for r in rows:
        if r.mode == "diloco" and r.val_loss_vs_ddp and r.bytes_fewer_than_ddp:
            met = r.val_loss_vs_ddp <= 1.05 and r.bytes_fewer_than_ddp >= 100
            target = f"; target (<= 1.05x, >= 100x): {'met' if met else 'NOT met'}"
            target += " (--quick: a smoke run, not the measurement)" if args.quick else ""
            console.print(
                f"{_label(r)}: val loss {r.val_loss_vs_ddp:.3f} x DDP's, "
                f"{r.bytes_fewer_than_ddp:.0f} x fewer bytes per worker"
                + (target if r.quant == "int8" else "")
            )
    plot(rows, args.png)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
