"""Asynchronous RL against the synchronous on-policy loop, same seeds, same machine, one run.

    python bench/rl.py --quick                # smoke run: few steps, small batches (~10 min)
    python bench/rl.py --json rl.json         # SmolLM2-135M on chain_sum (2 terms, 1 digit):
                                              # sync (k=0), async k=1 and k=2, each with
                                              # honest workers and one cheater; then every
                                              # cheat on its own against a short run
    python bench/rl.py --report runs/bench-rl/k2   # a run's samples right, by version

Every run is real processes (``cotrain rl run``'s ``LocalRun``): the orchestrator, the trainer
(a shardcast origin), a validator, honest workers and one cheating worker (a different cheat
per run). In the k=2 run one honest worker is killed (SIGKILL) a third of the way in and a new
one joins halfway. Greedy accuracy on held-out tasks is measured after each run for every
version the trainer published (hard-linked as they appear), with the machine to itself: the
runs' clocks hold no evaluation, and evaluation takes no core from them. Printed: a table;
written (``--json``): ``runs`` (``mode``, ``async_level``, ``curve`` [{``step``,
``wall_s``, ``heldout_accuracy``, ``mean_reward``}], ``trainer_idle_fraction``,
``trainer_idle_after_first_batch`` (the same, counted from the first batch's arrival),
``inference_idle_fraction``, ``rollouts`` {``submitted``, ``accepted``,
``rejected_by_check``}, ``peak_memory_bytes``, ``samples``: ``samples_by_version``),
``cheats`` (``case``, ``submitted``, ``detected``), ``honest_rejected``, ``honest_total``
(the runs' honest workers and those of the cheat phase, ``cheat_phase_honest``),
``settings`` (the ``--set`` items), ``async2_time_to_sync_final_ratio`` (wall time for k=2
to reach the sync run's final accuracy over the sync run's wall time; target <= 0.77), and
``validation`` (generation against validation time per rollout).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cotrain.core.config import ConfigError, field_for, parse_value, split_override
from cotrain.core.errors import TimeoutExpired
from cotrain.rl import cheats
from cotrain.rl.config import RLConfig
from cotrain.rl.launch import LocalRun
from cotrain.rl.worker import ENVELOPE_CHEATS

RUN_CHEATS = {0: "greedy", 1: "swap_last", 2: "forge_logprobs"}
CHEATS_AT_ONCE = 6
"""Cheating workers started together in the cheat phase (each loads the model)."""
ALL_CHEATS = [*cheats.CHEATS, *ENVELOPE_CHEATS]


BENCH_SETS = {
    "run.out_dir": "--out",
    "run.async_level": "--levels",
    "run.total_steps": "--steps",
    "run.seed": "--seed",
    "run.group_size": "--group-size",
    "run.groups_per_step": "--groups",
    "model.path": "--model",
    "env.name": "nothing (the benchmark is chain_sum)",
    "env.heldout_items": "--heldout",
    "sampling.max_new_tokens": "--max-new-tokens",
    "trainer.eval_every": "--eval-every (held-out accuracy is measured after each run)",
}
"""Settings the benchmark makes itself (and reads back): ``--set`` refuses them."""


def base_config(args: argparse.Namespace, out: Path, k: int) -> RLConfig:
    cfg = RLConfig()
    r = cfg.run
    r.id, r.out_dir, r.seed = f"bench-k{k}", out, args.seed
    r.total_steps, r.async_level = args.steps, k
    r.group_size, r.groups_per_step = args.group_size, args.groups
    cfg.model.path, cfg.model.threads = args.model, 1
    cfg.env.name, cfg.env.heldout_items = "chain_sum", args.heldout
    # the benchmark's task is its held-out task (2 one-digit terms): no curriculum, whose
    # 3-term level SmolLM2 solves 1-9% of the time, and up to 5 groups of a slot whose
    # groups all failed (README: Benchmark)
    cfg.env.curriculum = "off"
    cfg.run.max_resample = 4
    # held-out accuracy is measured after the run on every published version (evaluate_curve):
    # evaluating during the run would compete with the run for the same two cores
    cfg.trainer.eval_every = 0
    cfg.sampling.max_new_tokens = args.max_new_tokens
    cfg.trainer.micro_batch = 16
    cfg.worker.batch_size = args.group_size
    cfg.orchestrator.assignment_timeout_s = args.assignment_timeout
    cfg.orchestrator.ban_after_rejects = 0  # keep the cheater submitting: every one is judged
    cfg.launch.validators = 1
    if args.set:  # the run's own settings, e.g. --set run.retry_failed_tasks=false
        data = cfg.model_dump(mode="json")
        for item in args.set:
            key, raw = split_override(item)
            if key in BENCH_SETS:
                raise ConfigError(f"{key} is the bench's own: use {BENCH_SETS[key]}")
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = parse_value(raw, field_for(RLConfig, key))
        cfg = RLConfig.model_validate(data)
    return cfg


def _events(proc: Any) -> list[dict[str, Any]]:
    out = []
    for line in proc.lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return dict(json.loads(r.read()))


def judge_cheater(run: LocalRun, name: str, deadline_s: float) -> tuple[int, int]:
    """(cheating submissions, detected) of the cheater process ``name``: each one must end
    rejected, at the door or by a validator."""
    subs = [e for e in _events(run.procs[name]) if e.get("event") == "submitted" and e.get("cheat")]
    detected = 0
    base = run.cfg.orchestrator.url
    end = time.monotonic() + deadline_s
    for e in subs:
        if e.get("status") == "rejected":
            detected += 1
            continue
        while True:
            rec = _get(f"{base}/v1/record?id={urllib.parse.quote(e['id'])}")
            if rec["status"] != "queued" or time.monotonic() > end:
                break
            time.sleep(0.5)
        detected += rec["status"] == "rejected"
    return len(subs), detected


def honest_counts(status: dict[str, Any], honest: set[str]) -> tuple[int, int]:
    rejected = total = 0
    for key, c in status["workers"].items():
        if key in honest:
            total += c.get("submitted", 0)
            rejected += c.get("rejected", 0)
    return rejected, total


def worker_key(run: LocalRun, name: str) -> str:
    for e in _events(run.procs[name]):
        if e.get("event") == "ready":
            return str(e["worker"])
    return ""


def check_disk(args: argparse.Namespace, root: Path) -> None:
    """Refuse to start a run the disk cannot hold: the versions kept for the evaluation (one
    copy of the weights each), the trainer's checkpoints and the workers' weight caches."""
    from cotrain.rl.config import ModelSpec
    from cotrain.rl.policy import parameter_count

    weights = 4 * parameter_count(ModelSpec(path=args.model))
    kept = args.steps // args.eval_every + 2
    need = weights * (kept + 6)  # + the origin's last versions, checkpoints and caches
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(
            f"error: a run needs about {need / 1e9:.1f} GB at {root} ({kept} versions kept for "
            f"evaluation, checkpoints, weight caches) and {free / 1e9:.1f} GB are free: free "
            "some space, choose another --out, or evaluate fewer versions (--eval-every)"
        )


def fresh_dir(path: Path, console: Console) -> Path:
    """A run directory with nothing in it: a run finds its checkpoint and journal there and
    resumes, so a directory left by an earlier benchmark would resume (or end at once)
    instead of measuring a new run."""
    if path.exists():
        console.print(f"  removing the previous run at {path}")
        shutil.rmtree(path)
    return path


def one_run(args: argparse.Namespace, root: Path, k: int, console: Console) -> dict[str, Any]:
    check_disk(args, root)
    cfg = base_config(args, fresh_dir(root / f"k{k}", console), k)
    cheat = RUN_CHEATS[k]
    run = LocalRun(cfg)
    curve: list[dict[str, Any]] = []
    idle = {"trainer": 0.0, "first_wait_s": 0.0, "wait_s": 0.0, "wall_s": 0.0}
    kill_at, join_at = (args.steps // 3, args.steps // 2) if k == 2 else (-1, -1)
    cpu0, t0 = children_cpu_s(), time.monotonic()
    try:
        run.start_orchestrator()
        run.start_trainer(extra={"model.threads": args.trainer_threads})
        run.start_validator(0)
        names = [run.start_worker(wait=False).name for _ in range(args.workers)]
        cheater = run.start_worker(cheat, wait=False).name

        curve.append({"step": 0, "wall_s": 0.0, "heldout_accuracy": None, "mean_reward": None})
        keep_version(cfg.run.out_dir, 1)

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") != "step":
                return
            if ev["step"] % args.eval_every == 0 or ev["step"] >= args.steps:
                keep_version(cfg.run.out_dir, ev["step"] + 1)  # only what will be evaluated
            curve.append(
                {
                    "step": ev["step"],
                    "wall_s": ev["wall_s"],
                    "heldout_accuracy": None,  # measured after the run (evaluate_curve)
                    "mean_reward": ev.get("mean_reward"),
                }
            )
            idle["trainer"] = float(ev.get("idle_fraction", 0.0))
            if ev["step"] == 1:
                idle["first_wait_s"] = float(ev.get("wait_s", 0.0))
            idle["wait_s"] += float(ev.get("wait_s", 0.0))
            idle["wall_s"] = float(ev["wall_s"])
            console.print(
                f"  k={k} step {ev['step']:>3} {ev['wall_s']:6.0f} s  reward "
                f"{ev.get('mean_reward', 0):.2f}  level {ev.get('level')}  idle "
                f"{idle['trainer']:.2f}  lag {ev.get('mean_staleness', 0):.1f}",
                soft_wrap=True,
            )
            if ev["step"] == kill_at:
                console.print(f"  k={k}: killing {names[0]} (SIGKILL)")
                run.kill(names[0])
            if ev["step"] == join_at:
                joined = run.start_worker(wait=False).name
                console.print(f"  k={k}: {joined} joins")
                names.append(joined)

        code = run.wait_trainer(args.timeout, on_event=on_event)
        if code != 0:
            raise SystemExit(
                f"k={k}: the trainer exited with {code}: {run.procs['trainer'].lines[-5:]}"
            )
        for name in names:  # workers see the run is done and exit with their summary
            try:
                run.procs[name].wait_for("finished", 60)
            except TimeoutExpired:
                pass
        status = run.status()
        submitted, detected = judge_cheater(run, cheater, 120)
        honest = {worker_key(run, n) for n in names}
        honest_rej, honest_tot = honest_counts(status, honest)
        idles = [
            e["idle_fraction"]
            for n in names
            for e in _events(run.procs[n])
            if e.get("event") == "finished" and "idle_fraction" in e
        ]
    finally:
        run.stop()
    # every role's CPU time (stop() has reaped them all) over what the machine's cores offered
    cpu_used = (children_cpu_s() - cpu0) / ((time.monotonic() - t0) * usable_cores())
    evaluate_curve(args, cfg.run.out_dir, curve, console, f"k={k}")
    samples = samples_by_version(cfg.run.out_dir)  # the next run's start removes the directory
    return {
        "mode": "sync" if k == 0 else "async",
        "async_level": k,
        "curve": curve,
        "trainer_idle_fraction": idle["trainer"],
        # the same after the first batch (before it the trainer has nothing to train on)
        "trainer_idle_after_first_batch": steady_idle(idle),
        "inference_idle_fraction": sum(idles) / len(idles) if idles else None,
        "cpu_utilization": round(cpu_used, 3),
        "rollouts": {
            "submitted": status["submitted"],
            "accepted": status["accepted"],
            "rejected_by_check": status["rejected_by_check"],
        },
        "peak_memory_bytes": run.memory.peak_bytes,
        "cheat": {"case": cheat, "submitted": submitted, "detected": detected},
        "honest": {"rejected": honest_rej, "total": honest_tot},
        "samples": samples,
    }


_EVAL: dict[str, Any] = {}


def keep_version(run_dir: Path, version: int) -> None:
    """Hard-link a published version's weights into ``run_dir/eval`` as it appears (the
    origin keeps only the last few; a link costs no space while the origin still has it)."""
    src = run_dir / "versions" / f"v{version:08d}" / "data.bin"
    dest = run_dir / "eval" / f"v{version:08d}.bin"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except FileExistsError:
        pass
    except FileNotFoundError:
        print(f"warning: version {version} is gone before it was kept: {src}", file=sys.stderr)


def evaluate_curve(
    args: argparse.Namespace, run_dir: Path, curve: list[dict[str, Any]], console: Console, tag: str
) -> None:
    """Greedy held-out accuracy of the version each point of ``curve`` trained (step s
    published version s + 1; step 0 is the base model, version 1), read from the trainer's
    shardcast origin after the run, with the machine to itself; the versions are deleted
    after."""
    import torch

    from cotrain.rl.client import map_safetensors
    from cotrain.rl.config import ModelSpec
    from cotrain.rl.env import make_env
    from cotrain.rl.evaluate import heldout_accuracy
    from cotrain.rl.policy import load_policy
    from cotrain.rl.seeds import heldout_seeds

    if "policy" not in _EVAL:
        _EVAL["policy"] = load_policy(ModelSpec(path=args.model, threads=0))
        _EVAL["env"] = make_env("chain_sum")
    torch.set_num_threads(2)
    policy, env = _EVAL["policy"], _EVAL["env"]
    seeds = heldout_seeds(args.heldout)
    kept = run_dir / "eval"
    t0 = time.monotonic()
    for point in curve:
        if point["step"] % args.eval_every and point is not curve[-1]:
            continue
        path = kept / f"v{point['step'] + 1:08d}.bin"
        if not path.is_file():
            continue
        state = map_safetensors(path)
        policy.model.load_state_dict(state, strict=False, assign=True)
        policy.model.tie_weights()
        point["heldout_accuracy"] = heldout_accuracy(
            policy.model,
            policy.tokenizer,
            env,
            seeds,
            level=0,
            max_new_tokens=args.max_new_tokens,
        )
        console.print(f"  {tag} step {point['step']:>3}  heldout {point['heldout_accuracy']:.2f}")
    console.print(f"  {tag}: evaluated in {time.monotonic() - t0:.0f} s")
    shutil.rmtree(kept, ignore_errors=True)


def cheat_cases(
    args: argparse.Namespace, root: Path, console: Console
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every cheat against one short async run: each cheater makes a few submissions.
    Returns the cases and the honest workers' ``rejected`` and ``total`` meanwhile."""
    cfg = base_config(args, fresh_dir(root / "cheats", console), 2)
    cfg.run.total_steps = 10_000  # runs until stopped
    cfg.env.heldout_items = 0
    cfg.trainer.eval_every = 0
    cfg.orchestrator.assignment_timeout_s = 60
    run = LocalRun(cfg)
    out = []
    honest_workers = {"rejected": 0, "total": 0}
    try:
        run.start_orchestrator()
        run.start_trainer()
        run.start_validator(0)
        run.start_worker(wait=False)
        # let the run reach step k + 2 so that a stale cheat has a version to be stale with
        deadline = time.monotonic() + args.timeout
        while run.status()["next_batch"] <= cfg.run.async_level + 2:
            if time.monotonic() > deadline:
                raise SystemExit("cheat cases: the run did not get going")
            time.sleep(1.0)
        run.cfg.worker.max_assignments = args.cheat_assignments
        for lo in range(0, len(args.cheats), CHEATS_AT_ONCE):
            procs = {
                c: run.start_worker(c, wait=False) for c in args.cheats[lo : lo + CHEATS_AT_ONCE]
            }
            for cheat, p in procs.items():
                try:
                    p.wait_for("finished", args.timeout)
                except TimeoutExpired as e:
                    console.print(f"  {cheat}: {e}")
            for cheat, p in procs.items():
                submitted, detected = judge_cheater(run, p.name, 300)
                console.print(
                    f"  cheat {cheat:<18} submitted {submitted:>3}  detected {detected:>3}"
                )
                out.append({"case": cheat, "submitted": submitted, "detected": detected})
        status = run.status()
        honest = {worker_key(run, n) for n in run.procs if n.startswith("worker") and "-" not in n}
        rej, tot = honest_counts(status, honest)
        honest_workers = {"rejected": rej, "total": tot}
    finally:
        run.stop()
    return out, honest_workers


def validation_cost(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    """Generation against validation of the same groups, one process, the same number of
    threads each (``--validation-threads``): a worker's ``generate_group`` (prompt once, then
    decoding, proofs) and a validator's ``check_rollouts`` on what it claims at once
    (``validator.batch_size`` rollouts: packed prefills of their prompts and completions,
    every check). Cases: the benchmark's own chain_sum rollouts (EOS allowed), and fixed
    lengths of 16 and 128 tokens
    (EOS ignored)."""
    import base64

    import torch

    from cotrain.core.identity import Identity
    from cotrain.core.signed import Envelope
    from cotrain.rl import seeds, wire
    from cotrain.rl.checks import CheckContext, check_rollouts
    from cotrain.rl.config import ModelSpec, ProofSpec, ValidatorConfig
    from cotrain.rl.env import make_env
    from cotrain.rl.inference import generate_group
    from cotrain.rl.policy import encode_prompt, load_policy

    threads = args.validation_threads
    torch.set_num_threads(threads)
    policy = load_policy(ModelSpec(path=args.model, threads=threads))
    model, tok = policy.model, policy.tokenizer
    env, proof, sha = make_env("chain_sum"), ProofSpec(), "ab" * 32
    orch, worker = Identity.generate(), Identity.generate()
    g = args.group_size
    batch = ValidatorConfig().batch_size
    out = []
    cases = [("chain_sum", args.max_new_tokens, True), ("fixed", 16, False), ("fixed", 128, False)]
    for name, max_new, eos in cases:
        ctx = CheckContext(
            run="vc", run_seed=1, env=env,
            encode_prompt=lambda text: encode_prompt(tok, text),
            decode=lambda ids: str(tok.decode(ids, skip_special_tokens=True)),
            # the fixed lengths are generated without EOS: an EOS token inside is then an
            # ordinary token to the validator too (else they fail termination, skip the replay
            # and their validation looks cheaper than it is)
            eos_token_id=tok.eos_token_id if eos else None, vocab_size=model.config.vocab_size,
            model_id=policy.model_id, config=ValidatorConfig(), proof=proof, group_size=g,
        )  # fmt: skip
        gen_s = check_s = 0.0
        tokens = ok = n = 0
        pending: list[Any] = []
        for slot in range(args.validation_groups):
            task_seed = seeds.task_seed(1, 1, slot, 0)
            prompt = ctx.encode_prompt(env.task(task_seed, 0).prompt)
            sample_seeds = seeds.sample_seeds(task_seed, "vc", f"s1.j{slot}.a0", g)
            a = Envelope.seal(
                orch,
                wire.ASSIGNMENT,
                wire.Assignment(
                    run="vc", id=f"s1.j{slot}.a0.i0", worker=worker.public_hex, step=1,
                    slot=slot, attempt=0, env=env.id, task_seed=task_seed, level=0,
                    prompt_ids=prompt, seeds=sample_seeds,
                    min_version=1, temperature=1.0, max_new_tokens=max_new, issued_unix=1.0,
                    deadline_unix=2.0,
                ).to_body(),
            )  # fmt: skip
            t0 = time.perf_counter()
            gens = generate_group(
                model, prompt, list(a.body["seeds"]), temperature=1.0, max_new_tokens=max_new,
                eos_token_id=tok.eos_token_id if eos else None, batch_size=g,
                proof_chunk=proof.chunk_tokens, proof_topk=proof.topk,
            )  # fmt: skip
            gen_s += time.perf_counter() - t0
            for i, gen in enumerate(gens):
                body = wire.Rollout(
                    assignment=a.to_json(), sample=i, version=1, manifest_sha256=sha,
                    prompt_ids=prompt, completion_ids=gen.tokens, logprobs=gen.logprobs,
                    finish_reason=gen.finish_reason, proof=base64.b64encode(gen.proof).decode(),
                    proof_chunk=proof.chunk_tokens, proof_topk=proof.topk, claimed_reward=None,
                    t_start_unix=1.0, t_end_unix=2.0, nonce=f"{slot:08x}{i:08x}",
                ).to_body()  # fmt: skip
                signed = Envelope.seal(worker, wire.ROLLOUT, body).to_json()
                pending.append(wire.parse_rollout(signed, orchestrator=orch.public_hex))
                tokens += len(gen.tokens)
            if len(pending) < batch and slot + 1 < args.validation_groups:
                continue
            # what a validator claims at once (validator.batch_size rollouts)
            t0 = time.perf_counter()
            verdicts = check_rollouts(model, pending, ctx, expected_sha256=sha, latest_version=1)
            check_s += time.perf_counter() - t0
            ok += sum(v.ok for v in verdicts)
            n += len(verdicts)
            pending = []
        if not eos:
            name = f"{name} {max_new}"
        row = {
            "case": name,
            "threads": threads,
            "rollouts": n,
            "mean_completion_tokens": round(tokens / max(n, 1), 1),
            "generate_s_per_rollout": round(gen_s / max(n, 1), 4),
            "validate_s_per_rollout": round(check_s / max(n, 1), 4),
            "validation_fraction": round(check_s / gen_s, 3) if gen_s else None,
            "honest_passed": ok,
        }
        console.print(
            f"  validation {name:<14} {row['mean_completion_tokens']:>6} tokens  "
            f"generate {row['generate_s_per_rollout']:.3f} s  validate "
            f"{row['validate_s_per_rollout']:.3f} s  = {row['validation_fraction']:.1%}  "
            f"(honest passed {ok}/{n})"
        )
        out.append(row)
    return out


def task_kind(task: Any) -> str:
    """What a sample's task is, for ``samples_by_version``: its number of terms where the
    dataset records it (chain_sum, basic_arithmetic) and the sign of a numeric answer."""
    meta = task.entry.get("metadata")
    parts = []
    if isinstance(meta, dict) and isinstance(meta.get("num_terms"), int):
        parts.append(f"{meta['num_terms']} terms")
    try:
        parts.append("negative" if int(task.answer) < 0 else "positive")
    except ValueError:
        pass
    return ", ".join(parts)


def samples_by_version(run_dir: Path, every: int = 4) -> list[dict[str, Any]]:
    """The accepted samples of a run's rollout store (``run_dir/rollouts``), right (reward 1)
    of all, by policy version (spans of ``every``), level and ``task_kind``: when a run
    learned what (the README's analyses of the runs are these counts)."""
    from cotrain.rl.env import make_env
    from cotrain.rl.journal import RolloutStore

    store = RolloutStore(str(run_dir / "rollouts"))
    envs: dict[str, Any] = {}
    kinds: dict[tuple[str, int, int], str] = {}
    cells: dict[tuple[int, int, str], list[int]] = {}
    for step in sorted(store.steps()):
        for rec in store.read_step(step):
            if rec.get("status") != "accepted":
                continue
            body = rec["rollout"]["body"]
            a = body["assignment"]["body"]
            key = (a["env"], a["task_seed"], a["level"])
            if key not in kinds:
                if a["env"] not in envs:
                    envs[a["env"]] = make_env(a["env"].split("@")[0])
                kinds[key] = task_kind(envs[a["env"]].task(a["task_seed"], a["level"]))
            cell = cells.setdefault(
                (body["version"] // every * every, a["level"], kinds[key]), [0, 0]
            )
            cell[0] += rec["reward"] >= 1.0
            cell[1] += 1
    return [
        {"versions": [lo, lo + every - 1], "level": level, "kind": kind, "right": r, "samples": n}
        for (lo, level, kind), (r, n) in sorted(cells.items())
    ]


def print_samples(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="accepted samples right, by policy version, level and task")
    for col in ("versions", "level", "task", "right", "samples", "share"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        lo, hi = r["versions"]
        share = f"{r['right'] / r['samples']:.2f}" if r["samples"] else "-"
        table.add_row(
            f"{lo}-{hi}", str(r["level"]), r["kind"], str(r["right"]), str(r["samples"]), share
        )
    console.print(table)


def steady_idle(idle: dict[str, float]) -> float | None:
    """The trainer's waiting over its wall time, both counted from the end of its first wait
    (for the first batch)."""
    span = idle["wall_s"] - idle["first_wait_s"]
    return (idle["wait_s"] - idle["first_wait_s"]) / span if span > 0 else None


def children_cpu_s() -> float:
    """User and system CPU seconds of this process's children that have been reaped."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def time_to(curve: list[dict[str, Any]], accuracy: float) -> float | None:
    for p in curve:
        if p["heldout_accuracy"] is not None and p["heldout_accuracy"] >= accuracy:
            return float(p["wall_s"])
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, small batches")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-rl"), help="run directories")
    ap.add_argument("--model", default="smollm2", help="smollm2 or a local HF model directory")
    ap.add_argument("--steps", type=int, help="trainer steps per run (40; quick 6)")
    ap.add_argument("--groups", type=int, help="groups per step (8; quick 4)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="honest workers per run")
    ap.add_argument("--heldout", type=int, default=100, help="held-out items")
    ap.add_argument("--eval-every", type=int, default=1, help="evaluate every this many steps")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--levels", default="0,1,2", help="async levels to run")
    ap.add_argument("--cheats", default=",".join(ALL_CHEATS), help="cheat cases ('' skips)")
    ap.add_argument("--cheat-assignments", type=int, default=2)
    ap.add_argument("--assignment-timeout", type=float, default=120.0)
    ap.add_argument(
        "--validation-groups",
        type=int,
        default=8,
        help="groups timed for the validation cost (0 skips; quick 3)",
    )
    ap.add_argument(
        "--validation-threads",
        type=int,
        default=1,
        help="torch threads of the worker and of the validator when timing the validation cost",
    )
    ap.add_argument(
        "--trainer-threads",
        type=int,
        default=1,
        help="torch threads of the trainer in the runs (it is niced; every other role has one)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=7200.0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any run setting for every run, e.g. --set trainer.lr=2e-5 (repeatable)",
    )
    ap.add_argument(
        "--report",
        type=Path,
        metavar="RUN_DIR",
        help="only print the accepted samples of a finished run (e.g. runs/bench-rl/k2) by "
        "policy version, level and task, and exit",
    )
    ap.add_argument("--every", type=int, default=4, help="versions per row of --report")
    args = ap.parse_args(argv)
    if args.report is not None:
        if not (args.report / "rollouts").is_dir():
            ap.error(f"--report: {args.report} holds no rollouts/ directory")
        if args.every < 1:
            ap.error("--every must be at least 1")
        try:
            rows = samples_by_version(args.report, args.every)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a store not of a run's records
            ap.error(f"--report: {args.report}: {type(e).__name__}: {e}")
        print_samples(rows, Console())
        return 0
    args.steps = args.steps or (6 if args.quick else 40)
    args.groups = args.groups or (4 if args.quick else 8)
    if args.quick:
        args.heldout = min(args.heldout, 50)
        args.validation_groups = min(args.validation_groups, 3)
    args.cheats = [c for c in args.cheats.split(",") if c]
    if args.trainer_threads < 1:
        ap.error("--trainer-threads must be at least 1")
    try:
        base_config(args, Path("x"), 2)
    except (ConfigError, ValueError) as e:
        ap.error(f"--set: {e}")
    console = Console()
    root = args.out.absolute()
    results: dict[str, Any] = {"runs": [], "cheats": [], "settings": args.set}
    t0 = time.monotonic()

    def save_partial() -> None:  # a bench stopped midway keeps what it measured
        if args.json:
            args.json.write_text(json.dumps({**results, "partial": True}, indent=2))

    for k in [int(x) for x in args.levels.split(",") if x]:
        console.print(
            f"[bold]run k={k}[/bold] ({args.steps} steps, {args.groups}x{args.group_size})"
        )
        results["runs"].append(one_run(args, root, k, console))
        save_partial()
    if args.cheats:
        console.print("[bold]cheat cases[/bold]")
        results["cheats"], results["cheat_phase_honest"] = cheat_cases(args, root, console)
        save_partial()
    honest = [r["honest"] for r in results["runs"]] + [results.get("cheat_phase_honest", {})]
    honest_rej = sum(h.get("rejected", 0) for h in honest)
    honest_tot = sum(h.get("total", 0) for h in honest)
    results["cheats"] = results["cheats"] + [r["cheat"] for r in results["runs"]]
    results["honest_rejected"], results["honest_total"] = honest_rej, honest_tot
    runs = {r["async_level"]: r for r in results["runs"]}
    if 0 in runs and 2 in runs:
        sync_final = runs[0]["curve"][-1]["heldout_accuracy"]
        t_sync = runs[0]["curve"][-1]["wall_s"]
        t2 = time_to(runs[2]["curve"], sync_final)
        results["sync_final_accuracy"] = sync_final
        results["async2_time_to_sync_final_ratio"] = t2 / t_sync if t2 is not None else None
    if 0 in runs and runs[0]["cpu_utilization"] > 0:
        # Overlap can at most keep busy the cores the synchronous loop leaves idle: with the
        # same work, async is at most this much faster on this machine
        results["async_speedup_ceiling"] = round(1 / runs[0]["cpu_utilization"], 2)
    if args.validation_groups:
        console.print(
            f"[bold]validation cost[/bold] ({args.validation_threads} thread(s) each, same groups)"
        )
        results["validation"] = validation_cost(args, console)
    results["bench_wall_s"] = round(time.monotonic() - t0, 1)
    table = Table(title="cotrain.rl: async vs sync (same seeds, same machine)")
    for col in ("run", "steps", "final acc", "wall s", "trainer idle", "after 1st batch",
                "inference idle", "CPU used", "accepted", "rejected", "peak GB"):  # fmt: skip
        table.add_column(col)
    for r in results["runs"]:
        last = r["curve"][-1] if r["curve"] else {}
        table.add_row(
            f"{r['mode']} k={r['async_level']}",
            str(last.get("step")),
            f"{last.get('heldout_accuracy') or 0:.2f}",
            f"{last.get('wall_s') or 0:.0f}",
            f"{r['trainer_idle_fraction']:.3f}",
            f"{r.get('trainer_idle_after_first_batch') or 0:.3f}",
            f"{r['inference_idle_fraction'] or 0:.3f}",
            f"{r.get('cpu_utilization') or 0:.2f}",
            str(r["rollouts"]["accepted"]),
            str(sum(r["rollouts"]["rejected_by_check"].values())),
            f"{r['peak_memory_bytes'] / 2**30:.2f}",
        )
    console.print(table)
    cheat_table = Table(title="cheats (each submission must be rejected)")
    for col in ("case", "submitted", "detected"):
        cheat_table.add_column(col)
    for c in results["cheats"]:
        cheat_table.add_row(c["case"], str(c["submitted"]), str(c["detected"]))
    console.print(cheat_table)
    console.print(f"honest rollouts rejected: {honest_rej} of {honest_tot}")
    if "async2_time_to_sync_final_ratio" in results:
        console.print(
            f"k=2 reaches the sync final accuracy {results['sync_final_accuracy']} in "
            f"{results['async2_time_to_sync_final_ratio']} x the sync wall time (target <= 0.77)"
        )
    if "async_speedup_ceiling" in results:
        console.print(
            f"the sync run kept {runs[0]['cpu_utilization']:.0%} of the {usable_cores()} cores "
            f"busy: overlap can make the same work at most {results['async_speedup_ceiling']}x "
            "faster here"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
