"""``cotrain toploc``: generate rollouts with proofs, and verify rollout files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="TOPLOC proofs: generate rollouts with proofs; verify them.",
    no_args_is_help=True,
)


def _fail(msg: str) -> typer.Exit:
    typer.secho(f"error: {msg}", err=True, fg="red")
    return typer.Exit(2)


@app.command()
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
    texts = list(prompt or [])
    if prompts_file is not None:
        try:
            texts += [t for t in prompts_file.read_text().splitlines() if t.strip()]
        except OSError as e:
            raise _fail(f"cannot read {prompts_file}: {e}") from None
    if not texts:
        raise _fail("give at least one --prompt or a --prompts-file")

    from cotrain.models import ModelError, load_model
    from cotrain.toploc import generate_with_proofs, write_rollouts

    try:
        lm = load_model(model)
    except ModelError as e:
        raise _fail(str(e)) from None
    res = generate_with_proofs(
        lm,
        [lm.encode_prompt(t) for t in texts],
        max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    write_rollouts(out, res.rollouts)
    proof_bytes = sum(len(r.proof) for r in res.rollouts)
    typer.echo(
        f"wrote {len(res.rollouts)} rollouts ({res.tokens} tokens, {proof_bytes} proof bytes) "
        f"to {out}; generation {res.generate_s:.2f} s, proofs {res.build_s * 1000:.1f} ms"
    )


@app.command()
def verify(
    file: Path = typer.Argument(..., help="JSONL rollout file."),
    model: str = typer.Option(..., "--model", help="The model to recompute with (its spec)."),
    batch_size: int = typer.Option(8, help="Rollouts per prefill."),
    dtype: str = typer.Option("float32", help="Recompute precision: float32 or bfloat16."),
    config: Path | None = typer.Option(None, help="TOML file with a ValidatorConfig."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write verdicts as JSON."),
) -> None:
    """Recompute every rollout in FILE with MODEL and print a verdict per rollout.

    Exits 0 when all rollouts pass, 1 when any fails, 2 on usage errors.
    """
    from rich.console import Console
    from rich.table import Table

    from cotrain.core.config import load_config
    from cotrain.core.errors import ConfigError
    from cotrain.models import ModelError, load_model
    from cotrain.toploc import RolloutVerdict, Validator, ValidatorConfig, read_rollouts

    overrides = [f"batch_size={batch_size}", f"dtype={json.dumps(dtype)}"]
    try:
        cfg = load_config(ValidatorConfig, config, overrides)
    except ConfigError as e:
        raise _fail(str(e)) from None
    if not file.is_file():
        raise _fail(f"{file} does not exist")
    lines = list(read_rollouts(file))
    try:
        lm = load_model(model)
    except ModelError as e:
        raise _fail(str(e)) from None
    rollouts = [ln.rollout for ln in lines if ln.rollout is not None]
    report = Validator(lm, cfg).validate(rollouts)
    verdicts = iter(report.verdicts)
    rows: list[RolloutVerdict] = []
    for ln in lines:
        rows.append(
            next(verdicts)
            if ln.rollout is not None
            else RolloutVerdict(f"line {ln.line_no}", False, f"bad record: {ln.error}")
        )
    table = Table(title=f"{file} vs {lm.model_id}")
    for col in ("rollout", "verdict", "chunks", "reason"):
        table.add_column(col)
    for v in rows:
        n = len(v.proof.chunks) if v.proof else 0
        table.add_row(v.id, "[green]pass[/]" if v.passed else "[red]FAIL[/]", str(n), v.reason)
    console = Console()
    console.print(table)
    n_pass = sum(v.passed for v in rows)
    tokens = sum(len(r.output_tokens) for r in rollouts)
    console.print(
        f"{n_pass}/{len(rows)} rollouts pass, {len(rows) - n_pass} fail; recomputed {tokens} "
        f"output tokens in {report.prefill_s:.2f} s ({cfg.dtype}, batch {cfg.batch_size})"
    )
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "model": lm.model_id,
                    "passed": n_pass,
                    "failed": len(rows) - n_pass,
                    "rollouts": [
                        {"id": v.id, "passed": v.passed, "reason": v.reason} for v in rows
                    ],
                },
                indent=2,
            )
        )
    raise typer.Exit(0 if n_pass == len(rows) else 1)
