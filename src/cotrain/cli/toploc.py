"""``cotrain toploc``: generate rollouts with proofs, and verify rollout files.

Exit codes: 0 all rollouts pass (or generation succeeded), 1 some rollout or the whole file is
rejected, 2 a usage error (one ``error:`` line on stderr), 130 interrupted (Ctrl-C), 141 stdout
closed by its reader (the last three from the one handler in ``cotrain.cli``). Rollout files
are untrusted: whatever is in them ends as a failing verdict, never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from cotrain.cli.role import Alias, Role, add_role, usage

app = typer.Typer(
    help="TOPLOC proofs: generate rollouts with proofs; verify them.",
    no_args_is_help=True,
)

_GROUP_RECORDS = 64
"""Records ``verify`` reads before checking them (memory: at most 64 lines of 8 MiB)."""


def _flag(message: str) -> str:
    """``max_new_tokens=0 must ...`` -> ``--max-new-tokens=0 must ...`` (the alias users type)."""
    key, sep, rest = message.partition("=")
    return f"--{key.replace('_', '-')}{sep}{rest}" if sep and " " not in key else message


def _load_model(spec: str) -> Any:
    from cotrain.models import ModelError, load_model

    try:
        return load_model(spec)
    except ModelError as e:
        raise usage(str(e)) from None
    except ValueError as e:  # a spec that parses but torch cannot build (a seed over 64 bits)
        raise usage(f"model spec {spec!r}: {e}") from None


def _generate_model() -> Any:
    from cotrain.cli.toploc_jobs import GenerateJob

    return GenerateJob


def _run_generate(cfg: Any) -> int:
    from cotrain.cli.train import write_config
    from cotrain.toploc.capture import check_generation_args

    try:
        check_generation_args(
            cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
    except ValueError as e:
        raise usage(_flag(str(e))) from None
    texts = list(cfg.prompts)
    for n, text in enumerate(texts, 1):
        if not text.strip():
            raise usage(f"--prompt number {n} is empty")
    if cfg.prompts_file is not None:
        try:
            texts += [t for t in cfg.prompts_file.read_text().splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise usage(f"cannot read {cfg.prompts_file}: {e}") from None
    if not texts:
        raise usage("give at least one --prompt or a --prompts-file")

    from cotrain.toploc import generate_with_proofs, write_rollouts
    from cotrain.toploc.capture import check_prompts

    lm = _load_model(cfg.model)
    prompts = [lm.encode_prompt(t) for t in texts]
    try:
        check_prompts(lm, prompts, cfg.max_new_tokens)
    except ValueError as e:
        raise usage(str(e).replace("max_new_tokens=", "--max-new-tokens ")) from None
    res = generate_with_proofs(
        lm,
        prompts,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    try:
        write_rollouts(cfg.out, res.rollouts)
    except OSError as e:
        raise usage(f"cannot write {cfg.out}: {e}") from None
    write_config(cfg.out.with_name(cfg.out.name + ".config.json"), cfg.dump_json())
    proof_bytes = sum(len(r.proof) for r in res.rollouts)
    print(
        f"wrote {len(res.rollouts)} rollouts ({res.tokens} tokens, {proof_bytes} proof bytes) "
        f"to {cfg.out}; generation {res.generate_s:.2f} s, proofs {res.build_s * 1000:.1f} ms"
    )
    return 0


GENERATE = Role(
    name="toploc generate",
    help="""Generate one rollout per prompt, with its proof, into a JSONL file.

    The resolved config is written beside the output (OUT.config.json).""",
    model=_generate_model,
    run=_run_generate,
    aliases=(Alias("--prompt", "prompts", "append"),),
)


@dataclass
class _Row:
    """One line of the verdict table: all ``verify`` keeps per record (no hidden states, no
    per-chunk errors), so a file of many records is held in bounded memory."""

    id: str
    passed: bool
    chunks: int
    reason: str


def _reject(msg: str, json_out: Path | None) -> int:
    """The whole file fails: one line on stderr, exit code 1."""
    import sys

    print(f"rejected: {msg}", file=sys.stderr, flush=True)
    if json_out is not None:
        body = {"passed": 0, "failed": 0, "rejected": msg, "rollouts": []}
        try:
            json_out.write_text(json.dumps(body, indent=2))
        except OSError as e:
            raise usage(f"cannot write {json_out}: {e}") from None
    return 1


def _verify_model() -> Any:
    from cotrain.cli.toploc_jobs import VerifyJob

    return VerifyJob


def _run_verify(cfg: Any) -> int:
    """Recompute every rollout in the file with the model; print a verdict per rollout.

    Exits 0 when all rollouts pass, 1 when any fails (or the file is rejected whole: no
    records, too large, too many records)."""
    from cotrain.toploc import Validator, read_rollouts
    from cotrain.toploc.record import RecordLine

    file, json_out = cfg.file, cfg.json_out
    if json_out is not None and (json_out.is_dir() or not json_out.parent.is_dir()):
        raise usage(f"cannot write {json_out}: not a file in an existing directory")
    if cfg.max_file_mb < 1 or cfg.max_records < 1:
        raise usage("--max-file-mb and --max-records must be at least 1")
    if not file.is_file():
        raise usage(f"{file} does not exist or is not a file")
    try:
        size = file.stat().st_size
    except OSError as e:
        raise usage(f"cannot read {file}: {e}") from None
    if size > cfg.max_file_mb << 20:
        mb = size / 2**20
        return _reject(f"{file} is {mb:.1f} MB, over --max-file-mb {cfg.max_file_mb}", json_out)
    lm = _load_model(cfg.model)
    validator = Validator(lm, cfg)
    rows: list[_Row] = []
    tokens = 0
    prefill_s = 0.0

    def check(group: list[RecordLine]) -> None:
        nonlocal tokens, prefill_s
        rollouts = [ln.rollout for ln in group if ln.rollout is not None]
        report = validator.validate(rollouts)
        prefill_s += report.prefill_s
        tokens += sum(len(r.output_tokens) for r in rollouts)
        verdicts = iter(report.verdicts)
        for ln in group:
            if ln.rollout is None:
                rows.append(_Row(f"line {ln.line_no}", False, 0, f"bad record: {ln.error}"))
            else:
                v = next(verdicts)
                rows.append(_Row(v.id, v.passed, len(v.proof.chunks) if v.proof else 0, v.reason))

    # Records are read and checked a group at a time, so memory stays bounded by the group
    # (lines are capped at record.MAX_RECORD_BYTES) plus one small row per record.
    group: list[RecordLine] = []
    n_lines = 0
    try:
        for ln in read_rollouts(file):
            n_lines += 1
            if n_lines > cfg.max_records:
                return _reject(f"{file} has over --max-records {cfg.max_records} records", json_out)
            group.append(ln)
            if len(group) == _GROUP_RECORDS:
                check(group)
                group = []
    except OSError as e:
        raise usage(f"cannot read {file}: {e}") from None
    check(group)
    if not rows:
        return _reject(f"{file} holds no rollout records", json_out)
    return _report(cfg, rows, lm.model_id, tokens=tokens, prefill_s=prefill_s)


def _report(cfg: Any, rows: list[_Row], model_id: str, *, tokens: int, prefill_s: float) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{cfg.file} vs {model_id}"))
    for col in ("rollout", "verdict", "chunks", "reason"):
        table.add_column(col)
    for row in rows:
        verdict = Text("pass", style="green") if row.passed else Text("FAIL", style="red")
        # Text, not markup: ids and reasons come from the file, and "[/x]" would be parsed.
        table.add_row(Text(row.id), verdict, str(row.chunks), Text(row.reason))

    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich would exit 1, which here means "some fail"
            raise BrokenPipeError

    console = _Console()
    console.print(table)
    n_pass = sum(row.passed for row in rows)
    console.print(
        f"{n_pass}/{len(rows)} rollouts pass, {len(rows) - n_pass} fail; recomputed {tokens} "
        f"output tokens in {prefill_s:.2f} s ({cfg.dtype}, batch {cfg.batch_size})",
        markup=False,
    )
    if cfg.json_out is not None:
        body = {
            "model": model_id,
            "passed": n_pass,
            "failed": len(rows) - n_pass,
            "rollouts": [{"id": r.id, "passed": r.passed, "reason": r.reason} for r in rows],
        }
        try:
            cfg.json_out.write_text(json.dumps(body, indent=2))
        except OSError as e:
            raise usage(f"cannot write {cfg.json_out}: {e}") from None
    return 0 if n_pass == len(rows) else 1


VERIFY = Role(
    name="toploc verify",
    help="""Recompute every rollout in ROLLOUTS with --model; print a verdict per rollout.

    Exits 0 when all rollouts pass, 1 when any fails (or the file is rejected whole: no
    records, too large, too many records), 2 on usage errors, 130 on Ctrl-C.""",
    model=_verify_model,
    run=_run_verify,
    positionals=(("file", "ROLLOUTS.jsonl"),),
    aliases=(Alias("--json", "json_out"),),
)

add_role(app, GENERATE)
add_role(app, VERIFY)
