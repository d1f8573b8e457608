"""``cotrain toploc``: generate rollouts with proofs, and verify rollout files.

Exit codes: 0 all rollouts pass (or generation succeeded), 1 some rollout or the whole file is
rejected, 2 a usage error (one ``error:`` line on stderr), 130 interrupted (Ctrl-C), 141 stdout
closed by its reader. Rollout
files are untrusted: whatever is in them ends as a failing verdict, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer

app = typer.Typer(
    help="TOPLOC proofs: generate rollouts with proofs; verify them.",
    no_args_is_help=True,
)

MAX_FILE_MB = 1024
"""Default for ``verify --max-file-mb``."""
MAX_RECORDS = 1_000_000
"""Default for ``verify --max-records`` (a row of the verdict table is a few hundred bytes)."""
_GROUP_RECORDS = 64
"""Records ``verify`` reads before checking them (memory: at most 64 lines of 8 MiB)."""

F = TypeVar("F", bound=Callable[..., None])


def _fail(msg: str) -> typer.Exit:
    """One ``error:`` line on stderr (multi-line messages are folded); exit code 2."""
    line = "; ".join(part.strip() for part in msg.splitlines() if part.strip())
    typer.secho(f"error: {line}", err=True, fg="red")
    return typer.Exit(2)


def _interruptible(command: F) -> F:
    """Ctrl-C ends the command with one line and exit code 130 (outputs are written
    atomically, so nothing half-written is left behind); a reader that closed our stdout
    (``| head``) ends it quietly with 141, as SIGPIPE would."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True, fg="red")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # Point stdout at /dev/null so the interpreter's final flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None

    return run  # type: ignore[return-value]


def _reject(msg: str, json_out: Path | None) -> typer.Exit:
    """The whole file fails (too large, no records): one line on stderr, exit code 1."""
    typer.secho(f"rejected: {msg}", err=True, fg="red")
    if json_out is not None:
        body = {"passed": 0, "failed": 0, "rejected": msg, "rollouts": []}
        try:
            json_out.write_text(json.dumps(body, indent=2))
        except OSError as e:
            return _fail(f"cannot write {json_out}: {e}")
    return typer.Exit(1)


@app.command()
@_interruptible
def generate(
    out: Path = typer.Option(..., "--out", help="JSONL file to write the rollouts to."),
    model: str = typer.Option(
        "smollm2-135m-instruct", "--model", help="smollm2-135m-instruct, gpt-debug-seed0, a dir."
    ),
    prompt: list[str] = typer.Option(None, "--prompt", help="A user message (repeatable)."),
    prompts_file: Path | None = typer.Option(None, help="Text file, one user message a line."),
    max_new_tokens: int = typer.Option(64, help="Output tokens per rollout at most."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 is greedy."),
    seed: int = typer.Option(0, help="Sampling seed."),
    batch_size: int = typer.Option(8, help="Prompts generated together."),
) -> None:
    """Generate one rollout per prompt, with its proof, into a JSONL file."""
    from cotrain.toploc.capture import check_generation_args

    try:
        check_generation_args(
            max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed
        )
    except ValueError as e:
        raise _fail("--" + str(e).replace("_", "-")) from None
    texts = list(prompt or [])
    for n, text in enumerate(texts, 1):
        if not text.strip():
            raise _fail(f"--prompt number {n} is empty")
    if prompts_file is not None:
        try:
            texts += [t for t in prompts_file.read_text().splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise _fail(f"cannot read {prompts_file}: {e}") from None
    if not texts:
        raise _fail("give at least one --prompt or a --prompts-file")

    from cotrain.models import ModelError, load_model
    from cotrain.toploc import generate_with_proofs, write_rollouts
    from cotrain.toploc.capture import check_prompts

    try:
        lm = load_model(model)
    except ModelError as e:
        raise _fail(str(e)) from None
    except ValueError as e:  # a spec that parses but torch cannot build (a seed over 64 bits)
        raise _fail(f"model spec {model!r}: {e}") from None
    prompts = [lm.encode_prompt(t) for t in texts]
    try:
        check_prompts(lm, prompts, max_new_tokens)
    except ValueError as e:
        raise _fail(str(e).replace("max_new_tokens=", "--max-new-tokens ")) from None
    res = generate_with_proofs(
        lm, prompts, max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size
    )
    try:
        write_rollouts(out, res.rollouts)
    except OSError as e:
        raise _fail(f"cannot write {out}: {e}") from None
    proof_bytes = sum(len(r.proof) for r in res.rollouts)
    typer.echo(
        f"wrote {len(res.rollouts)} rollouts ({res.tokens} tokens, {proof_bytes} proof bytes) "
        f"to {out}; generation {res.generate_s:.2f} s, proofs {res.build_s * 1000:.1f} ms"
    )


@dataclass
class _Row:
    """One line of the verdict table: all ``verify`` keeps per record (no hidden states, no
    per-chunk errors), so a file of many records is held in bounded memory."""

    id: str
    passed: bool
    chunks: int
    reason: str


@app.command()
@_interruptible
def verify(
    file: Path = typer.Argument(..., help="JSONL rollout file."),
    model: str = typer.Option(..., "--model", help="The model to recompute with (its spec)."),
    batch_size: int = typer.Option(8, help="Rollouts per prefill."),
    dtype: str = typer.Option("float32", help="Recompute precision: float32 or bfloat16."),
    config: Path | None = typer.Option(None, help="TOML file with a ValidatorConfig."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write verdicts as JSON."),
    max_file_mb: int = typer.Option(MAX_FILE_MB, help="Reject rollout files larger than this."),
    max_records: int = typer.Option(MAX_RECORDS, help="Reject files with more records than this."),
) -> None:
    """Recompute every rollout in FILE with MODEL and print a verdict per rollout.

    Exits 0 when all rollouts pass, 1 when any fails (or FILE is rejected whole: no records,
    too large, too many records), 2 on usage errors, 130 on Ctrl-C.
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from cotrain.core.config import load_config
    from cotrain.core.errors import ConfigError
    from cotrain.models import ModelError, load_model
    from cotrain.toploc import Validator, ValidatorConfig, read_rollouts
    from cotrain.toploc.record import RecordLine

    overrides = [f"batch_size={batch_size}", f"dtype={json.dumps(dtype)}"]
    try:
        cfg = load_config(ValidatorConfig, config, overrides)
    except (ConfigError, OSError, UnicodeDecodeError) as e:
        raise _fail(str(e)) from None
    if json_out is not None and (json_out.is_dir() or not json_out.parent.is_dir()):
        raise _fail(f"cannot write {json_out}: not a file in an existing directory")
    if max_file_mb < 1 or max_records < 1:
        raise _fail("--max-file-mb and --max-records must be at least 1")
    if not file.is_file():
        raise _fail(f"{file} does not exist or is not a file")
    try:
        size = file.stat().st_size
    except OSError as e:
        raise _fail(f"cannot read {file}: {e}") from None
    if size > max_file_mb << 20:
        mb = size / 2**20
        raise _reject(f"{file} is {mb:.1f} MB, over --max-file-mb {max_file_mb}", json_out)
    try:
        lm = load_model(model)
    except ModelError as e:
        raise _fail(str(e)) from None
    except ValueError as e:  # a spec that parses but torch cannot build (a seed over 64 bits)
        raise _fail(f"model spec {model!r}: {e}") from None
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
            if n_lines > max_records:
                raise _reject(f"{file} has over --max-records {max_records} records", json_out)
            group.append(ln)
            if len(group) == _GROUP_RECORDS:
                check(group)
                group = []
    except OSError as e:
        raise _fail(f"cannot read {file}: {e}") from None
    check(group)
    if not rows:
        raise _reject(f"{file} holds no rollout records", json_out)
    table = Table(title=Text(f"{file} vs {lm.model_id}"))
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
    if json_out is not None:
        body = {
            "model": lm.model_id,
            "passed": n_pass,
            "failed": len(rows) - n_pass,
            "rollouts": [{"id": r.id, "passed": r.passed, "reason": r.reason} for r in rows],
        }
        try:
            json_out.write_text(json.dumps(body, indent=2))
        except OSError as e:
            raise _fail(f"cannot write {json_out}: {e}") from None
    raise typer.Exit(0 if n_pass == len(rows) else 1)
